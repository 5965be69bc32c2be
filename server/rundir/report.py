"""What a person watches and reads: a live per-round table in the terminal, and plots of the run."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from privet.server import RoundRecord
from privet.server.rundir import read_metrics

__all__ = ["ConsoleReporter", "load_summary", "plot_run", "round_line", "round_table"]


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _trained(r: dict[str, Any]) -> str:
    names = r.get("clients_trained") or []
    if r["round"] == 0:
        return "untrained"
    text = str(len(names))
    if r.get("errors"):
        text += f" [red]+{len(r['errors'])} refused/failed[/red]"
    return text


def round_table(records: list[dict[str, Any]], *, dp: bool) -> Table:
    """A rich table with one row per round (round 0 is the untrained model)."""
    table = Table(
        title="privet federation", title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False
    )
    for name in (
        "round",
        "trained",
        "loss",
        "server acc",
        "client acc",
        "max ε" if dp else "ε",
        "MiB out/in",
        "s",
    ):
        table.add_column(name, justify="right", no_wrap=True)
    for r in records:
        sent = r.get("bytes_sent", 0) / 2**20
        recv = r.get("bytes_received", 0) / 2**20
        table.add_row(
            str(r["round"]),
            _trained(r),
            _fmt(r.get("train_loss")),
            _fmt(r.get("server_accuracy"), ".2%"),
            _fmt(r.get("client_accuracy"), ".2%"),
            _fmt(r.get("max_epsilon"), ".3f") if dp else "off",
            f"{sent:.2f}/{recv:.2f}" if r["round"] else "-",
            f"{r.get('seconds', 0.0):.0f}" if r["round"] else "-",
        )
    return table


def round_line(r: dict[str, Any], *, dp: bool) -> str:
    """One line per finished round, printed while the run goes on."""
    # A causal LM's perplexity on the server's test set, beside its accuracy.
    ppl = (r.get("server_metrics") or {}).get("perplexity")
    ppl_text = f" | server ppl {_fmt(ppl, '.2f')}" if ppl is not None else ""
    if r["round"] == 0:
        return f"round 0 (untrained): server acc {_fmt(r.get('server_accuracy'), '.2%')}{ppl_text}"
    names = ", ".join(r.get("clients_trained") or []) or "none"
    eps = f"max ε {_fmt(r.get('max_epsilon'), '.3f')}" if dp else "DP off"
    if r.get("federation_epsilon") is not None:
        eps += f" | federation ε {r['federation_epsilon']:.3f}"
    return (
        f"round {r['round']}: trained {names} | loss {_fmt(r.get('train_loss'))} | "
        f"server acc {_fmt(r.get('server_accuracy'), '.2%')}{ppl_text} | client acc "
        f"{_fmt(r.get('client_accuracy'), '.2%')} | {eps} | {r.get('seconds', 0.0):.0f} s"
    )


class ConsoleReporter:
    """Renders server events: a progress bar while rounds run and a row per finished round."""

    def __init__(self, console: Console | None = None, *, dp: bool) -> None:
        self.console = console or Console()
        self.dp = dp
        self.records: list[dict[str, Any]] = []
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} rounds"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._task = self.progress.add_task(
            "starting (loading model, data and workers)", total=None
        )
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._round: int | None = None
        self._progress_dir: Path | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def __enter__(self) -> ConsoleReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=2.0)
        self.progress.stop()

    def watch_progress(self, folder: Path, *, interval: float = 0.5) -> None:
        """Show the clients' steps inside each round, read from their progress files in ``folder``.

        ``privet simulate`` calls it with the clients' ``progress/`` folder (``client/app.py``
        writes one small file per client); the poll ends when the reporter does.
        """
        self._progress_dir = Path(folder)

        def poll() -> None:
            while not self._stop.wait(interval):
                with self._lock:
                    server_round = self._round
                if server_round is None:
                    continue
                line = round_progress(self._progress_dir, server_round)  # type: ignore[arg-type]
                if line:
                    with self._lock:
                        if self._round == server_round:
                            self.progress.update(
                                self._task, description=f"round {server_round}: {line}"
                            )

        self._poller = threading.Thread(target=poll, name="privet-progress", daemon=True)
        self._poller.start()

    def run_started(self, *, rounds: int, clients: int, run_dir: Path) -> None:
        """Announce the run and size the progress bar."""
        with self._lock:
            self.progress.update(
                self._task, total=rounds, description="evaluating the untrained model"
            )
            self.console.print(
                f"[bold]{clients} clients, {rounds} rounds[/bold]; outputs in {run_dir}"
            )

    def round_started(self, server_round: int) -> None:
        """Show which round is training."""
        with self._lock:
            self._round = server_round
            self.progress.update(self._task, description=f"round {server_round}: clients training")

    def round_finished(self, record: RoundRecord) -> None:
        """Print the round's row and advance the bar."""
        with self._lock:
            self._round = None
            rec = record.as_json()
            self.records.append(rec)
            self.progress.update(
                self._task, completed=record.round, description="waiting for the next round"
            )
            self.console.print(round_line(rec, dp=self.dp), highlight=False)
            for who, why in record.errors.items():
                self.console.print(f"  [yellow]{who}[/yellow]: {why}")


def round_progress(folder: Path, server_round: int, *, shown: int = 4) -> str:
    """One line on the clients inside ``server_round``: how many are done, the others' steps.

    Reads the ``<client>.json`` files ``client/app.py`` writes in a simulation; files of another
    round and unreadable (half-written) files are skipped.  Empty when no client has started.
    """
    done: list[str] = []
    busy: list[tuple[str, int, int, str]] = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if rec.get("round") != server_round:
            continue
        if rec.get("done"):
            done.append(path.stem)
        else:
            unit = str(rec.get("unit", "steps"))
            busy.append((path.stem, int(rec.get("step", 0)), int(rec.get("steps", 0)), unit))
    if not done and not busy:
        return ""
    parts = [f"{len(done)} of {len(done) + len(busy)} clients done"]
    steps = [f"{name} {step}/{total or '?'} {unit}" for name, step, total, unit in busy[:shown]]
    if len(busy) > shown:
        steps.append(f"{len(busy) - shown} more")
    return ", ".join(parts + steps)


def plot_run(run_dir: Path) -> Path | None:
    """Write ``plots.png``: accuracy and cumulative epsilon per round. Returns its path."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("server_accuracy", "server test"), ("client_accuracy", "clients' tests")):
        pts = [(r["round"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax1.set_xlabel("round")
    ax1.set_ylabel("accuracy")
    ax1.set_title("Accuracy of the global model")
    ax1.set_xticks(rounds)
    ax1.legend()
    clients = sorted({c for r in records for c in (r.get("epsilon_per_client") or {})})
    for c in clients:
        pts = [(0, 0.0)] + [
            (r["round"], r["epsilon_per_client"][c])
            for r in records
            if c in (r.get("epsilon_per_client") or {})
        ]
        ax2.plot(*zip(*pts, strict=True), marker="o", label=c)
    if clients:
        ax2.set_ylim(bottom=0)
    ax2.set_xlabel("round")
    ax2.set_ylabel("cumulative ε")
    ax2.set_title("Privacy spent per client")
    ax2.set_xticks(rounds)
    if clients:
        ax2.legend(fontsize="small")
    else:
        ax2.text(0.5, 0.5, "DP off", ha="center", va="center", transform=ax2.transAxes)
    fig.tight_layout()
    out = Path(run_dir) / "plots.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def load_summary(run_dir: Path) -> dict[str, Any]:
    """Read ``summary.json``."""
    return dict(json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8")))
