"""`privet runs`: past runs and their final metrics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privet.server.rundir.runs import find_runs
from privet.simulations.cli import app

from .rundirs import RECORDS, make_run


def test_lists_finished_unfinished_and_dp_off_runs(tmp_path: Path) -> None:
    a, _ = make_run(tmp_path, "a-finished", adapter=False)
    b, _ = make_run(tmp_path, "b-stopped", records=RECORDS[:2], finished=False)
    c, _ = make_run(
        tmp_path,
        "c-baseline",
        extra=["privacy.enabled=false"],
        records=[{**r, "epsilon_per_client": {}, "max_epsilon": None} for r in RECORDS],
        adapter=False,
    )
    (tmp_path / "not-a-run").mkdir()
    for i, d in enumerate((a, b, c)):  # started order: a, b, c
        os.utime(d / "config.toml", (1_700_000_000 + i, 1_700_000_000 + i))
    runs = find_runs(tmp_path)
    assert [r.path.name for r in runs] == ["a-finished", "b-stopped", "c-baseline"]
    fin, stopped, base = runs
    assert (fin.status, fin.rounds_done, fin.rounds_planned) == ("finished", 2, 2)
    assert (fin.server_accuracy, fin.initial_accuracy, fin.max_epsilon) == (0.875, 0.5, 2.75)
    assert fin.seconds == 8.0
    assert (stopped.status, stopped.rounds_done, stopped.server_accuracy) == (
        "unfinished",
        1,
        0.625,
    )
    assert stopped.max_epsilon == 1.5
    assert not base.dp and base.max_epsilon is None


def test_cli_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    import privet.server.rundir.commands as commands

    # rich sizes a console when it is made, from the terminal or COLUMNS at that moment; a wide one
    # keeps every column whole wherever the test runs (a pytest-xdist worker has no terminal)
    monkeypatch.setattr(commands, "console", Console(width=200))
    make_run(tmp_path, "only", adapter=False)
    res = CliRunner().invoke(app, ["runs", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if "only" in line)
    for text in ("finished", "2/2", "87.5%", "50.0%", "81.2%", "2.750"):
        assert text in row, (text, row)
    res = CliRunner().invoke(app, ["runs", str(tmp_path / "nothing")])
    assert res.exit_code == 0 and "no runs" in res.output
