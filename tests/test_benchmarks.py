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


def _report_module():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCH))
    try:
        import report
    finally:
        sys.path.remove(str(BENCH))
    return report


@pytest.mark.slow
def test_gpu_suite_dry_run_on_cpu_measures_every_figure(tmp_path: Path) -> None:
    """``gpu_suite.py --device cpu --quick``: every stage of the GPU run, at toy sizes."""
    cmd = [sys.executable, str(BENCH / "gpu_suite.py"), "--device", "cpu", "--quick"]
    out = subprocess.run(
        [*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=1500
    )
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu.json").read_text())
    stages = doc["details"]["stages"]
    assert list(stages) == [
        "lora_cls",
        "full_ft",
        "llm",
        "federation",
        "llm_compile",
        "llm_quant",
        "llm_profile",
    ]
    # the quantized bases need CUDA: skipped here with the reason, not failed
    assert stages.pop("llm_quant")["status"] == "skipped"
    assert all(s["status"] == "ok" for s in stages.values()), stages
    rows = {r["metric"]: r for r in doc["rows"]}
    assert str(rows["llm_quant: skipped"]["value"]).startswith(
        "needs CUDA: model.base_quantization is refused on a CPU"
    )
    for metric in (
        "classifier batch 512: LoRA fp32 DP bookkeeping / LoRA fp32 no DP",
        "classifier batch 512: LoRA fp32 DP flat / LoRA fp32 no DP",
        "classifier batch 512: LoRA bf16-base DP bookkeeping / LoRA bf16-base no DP",
        "classifier batch 512: full FT DP bookkeeping / full FT no DP",
        "135M LoRA fp32 16x256 DP bookkeeping / 135M LoRA fp32 16x256 no DP",
        "135M LoRA fp32 16x256 DP ghost / 135M LoRA fp32 16x256 no DP",
        "135M LoRA bf16-base 64x512 DP bookkeeping / 135M LoRA bf16-base 64x512 no DP",
    ):
        assert rows[metric]["unit"] == "x" and 0 < rows[metric]["value"] < 100, metric
    assert rows["135M LoRA bf16-base 64x512 DP bookkeeping: tokens/s"]["goal"] == ">= 100,000"
    # every causal-LM step trained every LoRA weight (DP hooks run, also beside compiled MLPs)
    for name in ("llm", "llm_compile"):
        cases = {k: v for k, v in doc["details"][name].items() if k != "times"}
        assert cases and all(v.get("all_weights_moved") for v in cases.values()), cases
    # the profile of the causal LM's DP step: both sides profiled, book-keeping's phases marked
    prof = doc["details"]["llm_profile"]
    for side in ("no DP", "DP bookkeeping"):
        assert prof[side]["host_ms_per_step_by_phase"]["step"] > 0
        assert (tmp_path / f"profile-{side.replace(' ', '-')}.txt").is_file()
    marks = prof["DP bookkeeping"]["host_ms_per_step_by_phase"]
    assert {"bookkeeping_norm_sq", "bookkeeping_add_clipped_sum"} <= set(marks)
    assert "bookkeeping_norm_sq" not in prof["no DP"]["host_ms_per_step_by_phase"]
    fed = doc["details"]["federation"]
    # one base model served every virtual client and the server's evaluation
    assert fed["models_built"]["total"] == 1 and fed["lanes"] == ["cpu"]
    assert rows["4 clients x 3 rounds in process: wall"]["unit"] == "s"
    assert fed["last_metrics"]["round"] == 3
    # ... and the report turns the result file into the GPU section of the docs
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    _report_module().write_docs([doc], docs, gpu=True)
    assert "135M LoRA fp32 16x256 DP bookkeeping" in docs.read_text()


@pytest.mark.slow  # the driver imports the whole stack to record its versions
def test_gpu_suite_stage_over_its_time_limit_is_cut_and_reported(tmp_path: Path) -> None:
    cmd = [sys.executable, str(BENCH / "gpu_suite.py"), "--device", "cpu", "--quick"]
    cmd += ["--stages", "full_ft", "--limit", "full_ft=1", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["details"]["stages"]["full_ft"]["status"] == "timed out"
    assert doc["rows"][0]["metric"] == "full_ft: no result"
    assert "timed out after" in doc["rows"][0]["value"]


def test_report_keeps_the_gpu_section_beside_the_cpu_one(tmp_path: Path) -> None:
    report = _report_module()
    cpu = {
        "name": "dp_overhead",
        "command": "python benchmarks/bench_dp.py",
        "when": "now",
        "machine": {"nproc": 2, "cpu": "X", "gpu": None, "memory_gib": 8, "torch": "t"},
        "rows": [{"metric": "LoRA", "value": 1.04, "unit": "x", "goal": "<= 1.1", "met": True}],
    }
    gpu = {
        **cpu,
        "name": "gpu",
        "command": "python benchmarks/gpu_suite.py --device cuda",
        "machine": {**cpu["machine"], "gpu": "NVIDIA H200"},  # type: ignore[dict-item]
        "rows": [{"metric": "LoRA DP", "value": 1.1, "unit": "x", "goal": "<= 1.15", "met": True}],
    }
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    report.write_docs([cpu], docs)
    report.write_docs([gpu], docs, gpu=True)
    report.write_docs([cpu], docs)  # a CPU rerun leaves the GPU table alone, and back
    report.write_docs([gpu], docs, gpu=True)
    text = docs.read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.GPU_BEGIN) == 1
    assert "| LoRA | 1.04 x | <= 1.1 | yes |" in text
    assert "| LoRA DP | 1.10 x | <= 1.15 | yes |" in text or "| LoRA DP | 1.1 x |" in text
    assert "GPU NVIDIA H200" in text


QUANT_PATHS = """
import json, sys
import gpu_suite as g
import privet.common.modeling as modeling
args = g.parser().parse_args(["--device", "cpu", "--quick", "--out", sys.argv[1]])
modeling._quantized_base_refusal = lambda cfg: None  # the stage runs on CUDA only
cases = [(q, "bfloat16+" + q, 2, 16, "bookkeeping", None) for q in ("int8", "nf4")]
_, details = g._llm_cases(args, cases)
print(json.dumps({"cases": details, "privet": g._privet_quant_step(args, "nf4")}, default=str))
"""


@pytest.mark.slow
def test_gpu_suite_quantized_paths_run_on_cpu_with_the_device_refusal_bypassed(
    tmp_path: Path,
) -> None:
    """llm_quant's code (skipped by the CPU dry run) runs here, so the GPU session only measures."""
    pytest.importorskip("torchao", reason="torchao (pip install 'privet[gpu]') is not installed")
    out = subprocess.run(
        [sys.executable, "-c", QUANT_PATHS, str(tmp_path)],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    for q in ("int8", "nf4"):
        case = doc["cases"][q]
        assert case["all_weights_moved"] is True and case["tokens_per_s"] > 0, case
        assert 0 < case["weights_mib"] < 1
    # through build_model and train: 'auto' is flat on this CPU (book-keeping on the GPU)
    assert doc["privet"]["clipping"] == "flat" and doc["privet"]["all_weights_moved"] is True
