"""The benchmark harness: a DP-overhead smoke run on CPU, the device check, the docs table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


@pytest.mark.slow
def test_dp_overhead_benchmark_runs_and_writes_its_rows(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(BENCH / "bench_dp.py"),
        "--quick",
        "--layers",
        "1",
        "--batch",
        "8",
        "--repeats",
        "1",
        "--mixed-precision",
        "bf16",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    doc = json.loads((tmp_path / "dp_overhead.json").read_text())
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["torch"] == torch.__version__
    ratios = {r["metric"]: r["value"] for r in doc["rows"] if r["unit"] == "x"}
    assert set(ratios) >= {
        "LoRA: DP (flat clipping) / no DP",
        "full fine-tuning: DP (bookkeeping clipping) / no DP",
        "full fine-tuning: DP (ghost clipping) / no DP",
        "full fine-tuning: DP (flat clipping) / no DP",
    }
    assert all(0 < v < 100 for v in ratios.values())
    assert "bench_dp.py" in doc["command"]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message of a machine without a GPU"
)
def test_asking_for_cuda_without_a_gpu_is_one_clear_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_dp.py"), "--device", "cuda", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("--device cuda: no CUDA device")
    assert "Traceback" not in out.stderr


def test_report_writes_the_docs_block_once(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import report
    finally:
        sys.path.remove(str(BENCH))
    doc = {
        "name": "dp_overhead",
        "command": "python benchmarks/bench_dp.py",
        "when": "now",
        "machine": {"nproc": 2, "cpu": "X", "gpu": None, "memory_gib": 8, "torch": "t"},
        "rows": [{"metric": "LoRA", "value": 1.04, "unit": "x", "goal": "<= 1.1", "met": True}],
    }
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nhand-written text\n")
    report.write_docs([doc], docs)
    report.write_docs([doc], docs)
    text = docs.read_text()
    assert text.count(report.BEGIN) == 1 and "hand-written text" in text
    assert "| LoRA | 1.04 x | <= 1.1 | yes |" in text
    assert "Command: `python benchmarks/bench_dp.py`" in text
