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

from privet.server.rundir import read_rounds

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
        records, _ = read_rounds(path)
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
    return "-" if x is None else f"{x:.1%}"


#: The columns of ``privet runs``, left to right, with their alignment.
COLUMNS = (
    ("run", "left"),
    ("started (UTC)", "left"),
    ("status", "left"),
    ("rounds", "right"),
    ("server acc", "right"),
    ("untrained", "right"),
    ("client acc", "right"),
    ("max ε", "right"),
    ("min", "right"),
    ("model", "left"),
)
#: Dropped in this order while the table is wider than the terminal: rich would otherwise shrink
#: every cell to "…" and nothing would be readable.
OPTIONAL_COLUMNS = ("model", "started (UTC)", "min", "client acc")


def _row(r: RunInfo) -> dict[str, str]:
    planned = "?" if r.rounds_planned is None else str(r.rounds_planned)
    status = {"finished": "[green]finished[/green]", "unfinished": "[yellow]unfinished[/yellow]"}
    eps = (
        ("-" if r.max_epsilon is None else f"{r.max_epsilon:.3f}") if r.dp else "[red]DP off[/red]"
    )
    return {
        "run": r.path.name,
        "started (UTC)": r.started.strftime("%Y-%m-%d %H:%M"),
        "status": status.get(r.status, r.status),
        "rounds": f"{r.rounds_done}/{planned}",
        "server acc": _pct(r.server_accuracy),
        "untrained": _pct(r.initial_accuracy),
        "client acc": _pct(r.client_accuracy),
        "max ε": eps,
        "min": f"{r.seconds / 60:.1f}",
        "model": r.model,
    }


def runs_table(runs: list[RunInfo], *, width: int | None = None) -> Table:
    """A rich table, one row per run.

    Parameters
    ----------
    runs
        The runs, one row each.
    width
        The terminal's width: the optional columns (model, start time, minutes, client
        accuracy, in that order) are left out until the table fits. ``None``: all columns.

    """
    from rich.console import Console

    rows = [_row(r) for r in runs]
    names = [name for name, _ in COLUMNS]
    measure = Console(width=10_000, color_system=None)
    for drop in range(len(OPTIONAL_COLUMNS) + 1):
        shown = [n for n in names if n not in OPTIONAL_COLUMNS[:drop]]
        table = Table(title="privet runs", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
        for name, justify in COLUMNS:
            if name in shown:
                table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
        for row in rows:
            table.add_row(*(row[n] for n in shown))
        if width is None or measure.measure(table).maximum <= width:
            break
    return table
