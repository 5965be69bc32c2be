"""`privet report`, `privet runs` and the privacy plot on the files a REAL run wrote.

The other report tests use hand-made run directories with numbers chosen to be looked for. Those
once hid a bug that emptied every real report: real ``metrics.jsonl`` lines carried keys the
hand-made ones did not. Here one small in-process federation writes its run directory, and the
readers must show every round of it.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from privet.common.config import load_config
from privet.server.rundir import read_metrics, read_rounds
from privet.server.rundir.html_report import write_report
from privet.server.rundir.runs import find_runs, runs_table
from privet.simulations import simulate

pytestmark = pytest.mark.slow

ROUNDS = 2
#: matplotlib's first two line colours (#1f77b4, #ff7f0e): present only where a series was drawn
#: (clients with equal ε draw on top of each other, so either may show).
SERIES = (np.array([31, 119, 180]), np.array([255, 127, 14]))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        None,
        [
            "model.num_hidden_layers=1",
            "model.max_length=32",
            "data.max_examples=300",
            "data.num_clients=2",
            f"federation.rounds={ROUNDS}",
            "train.batch_size=32",
            "train.local_epochs=1",
            f"simulation.output_dir='{out}'",
            "simulation.run_name='real'",
            "simulation.engine='inprocess'",
        ],
    )
    run_dir = simulate(cfg)
    return run_dir, read_metrics(run_dir)


def _series_pixels(png: Path) -> int:
    import matplotlib.image as mpimg

    pixels = (mpimg.imread(str(png))[..., :3] * 255).round().astype(np.int16)
    return sum(int((np.abs(pixels - c).sum(axis=-1) <= 12).sum()) for c in SERIES)


def test_every_round_is_a_round(run) -> None:
    run_dir, raw = run
    rounds, stopped = read_rounds(run_dir)
    assert stopped is None
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1)) == [r["round"] for r in raw]


def test_report_shows_every_round(run) -> None:
    run_dir, raw = run
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert f"{ROUNDS} / {ROUNDS}" in page and "finished" in page
    body = page.split("<h2>Per round</h2>", 1)[1].split("<h2>Privacy</h2>", 1)[0]
    table_rows = re.findall(r'<tr><td class="l">(\d+)</td>', body)
    assert table_rows == [str(r["round"]) for r in raw]
    for r in raw:
        assert f"{r['server_accuracy']:.2%}" in page
    last = raw[-1]
    for client, eps in last["epsilon_per_client"].items():
        assert client in page and f"{eps:.4f}" in page
    assert "DP off" not in page and "no trained round yet" not in page
    # Each plot has its series drawn (the accuracy line, the clients' ε lines, the byte bars).
    plots = run_dir / "report-plots"
    for name in ("accuracy", "loss", "bytes"):
        assert _series_pixels(plots / f"{name}.png") > 150, name
    # The federation's thick dotted line hides most of the clients' ε lines; their markers show.
    assert _series_pixels(plots / "epsilon.png") > 0


def test_runs_lists_the_run_finished_with_its_numbers(run) -> None:
    run_dir, raw = run
    (info,) = find_runs(run_dir.parent)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert info.status == "finished"
    assert (info.rounds_done, info.rounds_planned) == (ROUNDS, ROUNDS)
    assert info.initial_accuracy == raw[0]["server_accuracy"]
    assert info.server_accuracy == summary["final_server_accuracy"]
    assert info.max_epsilon == pytest.approx(summary["max_epsilon"])


def test_runs_table_fits_80_columns(run) -> None:
    run_dir, raw = run
    buf = io.StringIO()
    Console(file=buf, width=80, color_system=None).print(
        runs_table(find_runs(run_dir.parent), width=80)
    )
    text = buf.getvalue()
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "real" in text and "finished" in text and f"{ROUNDS}/{ROUNDS}" in text
    assert (
        f"{raw[0]['server_accuracy']:.1%}" in text and f"{raw[-1]['server_accuracy']:.1%}" in text
    )


def test_a_line_with_stopped_null_is_a_round(tmp_path: Path) -> None:
    # Run directories written before the field left the round records have it on every line.
    (tmp_path / "metrics.jsonl").write_text(
        '{"round": 0, "stopped": null}\n{"round": 1, "stopped": null}\n'
        '{"round": 2, "stopped": "the federation budget would be passed"}\n'
    )
    rounds, stopped = read_rounds(tmp_path)
    assert [r["round"] for r in rounds] == [0, 1]
    assert stopped == "the federation budget would be passed"
