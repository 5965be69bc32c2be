"""Past runs in an output directory, with their final metrics (``privet runs``)."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from privet.server.rundir import read_metrics

__all__ = ["RunInfo", "find_runs", "runs_table"]


@dataclass
class RunInfo:
    """One run directory, summarised from its files."""

    path: Path
    started: datetime
    status: str
    rounds_done: int
    rounds_planned: int | None
    model: str
    dp: bool
    initial_accuracy: float | None
    server_accuracy: float | None
    client_accuracy: float | None
    max_epsilon: float | None
    seconds: float


def _read_run(path: Path) -> RunInfo:
    try:
        config: dict[str, Any] = tomllib.loads((path / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        config = {}
    try:
        records = read_metrics(path)
    except (OSError, json.JSONDecodeError):
        records = []
    summary_path = path / "summary.json"
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            summary = {}
    planned = (config.get("federation") or {}).get("rounds")
    done = max((int(r.get("round", 0)) for r in records), default=0)
    # A budget stop appends {"round": n, "stopped": why} to metrics.jsonl and sets summary["stopped"].
    records = [r for r in records if "stopped" not in r]
    if summary.get("stopped"):
        status = "stopped early"
    elif summary:
        status = "finished"
    elif not records:
        status = "no rounds"
    else:
        # No summary: still running, or stopped (crash, Ctrl-C, budget); the files cannot tell which.
        status = "unfinished"
    last = records[-1] if records else {}
    eps = [float(r["max_epsilon"]) for r in records if r.get("max_epsilon") is not None]
    return RunInfo(
        path=path,
        started=datetime.fromtimestamp((path / "config.toml").stat().st_mtime, tz=UTC),
        status=status,
        rounds_done=done,
        rounds_planned=int(planned) if planned is not None else None,
        model=str((config.get("model") or {}).get("name", "?")),
        dp=bool((config.get("privacy") or {}).get("enabled", True)),
        initial_accuracy=records[0].get("server_accuracy") if records else None,
        server_accuracy=summary.get("final_server_accuracy", last.get("server_accuracy")),
        client_accuracy=summary.get("final_client_accuracy", last.get("client_accuracy")),
        max_epsilon=summary.get("max_epsilon", max(eps) if eps else None),
        seconds=float(summary.get("seconds", sum(float(r.get("seconds", 0.0)) for r in records))),
    )


def find_runs(output_dir: Path) -> list[RunInfo]:
    """Every run directory (a folder holding ``config.toml``) directly under ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [_read_run(p) for p in output_dir.iterdir() if (p / "config.toml").is_file()]
    return sorted(found, key=lambda r: (r.started, r.path.name))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def runs_table(runs: list[RunInfo]) -> Table:
    """A rich table, one row per run."""
    table = Table(title="privet runs", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (
        ("run", "left"),
        ("started (UTC)", "left"),
        ("status", "left"),
        ("rounds", "right"),
        ("server acc", "right"),
        ("untrained", "right"),
        ("client acc", "right"),
        ("max ε", "right"),
        ("minutes", "right"),
        ("model", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name != "model")  # type: ignore[arg-type]
    for r in runs:
        status = {
            "finished": "[green]finished[/green]",
            "unfinished": "[yellow]unfinished[/yellow]",
        }
        planned = "?" if r.rounds_planned is None else str(r.rounds_planned)
        table.add_row(
            r.path.name,
            r.started.strftime("%Y-%m-%d %H:%M"),
            status.get(r.status, r.status),
            f"{r.rounds_done}/{planned}",
            _pct(r.server_accuracy),
            _pct(r.initial_accuracy),
            _pct(r.client_accuracy),
            ("-" if r.max_epsilon is None else f"{r.max_epsilon:.3f}")
            if r.dp
            else "[red]DP off[/red]",
            f"{r.seconds / 60:.1f}",
            r.model,
        )
    return table
