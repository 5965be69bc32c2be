"""The robustness study: robust aggregators under attack, and FedAvg / FedProx / FedAdam under skew.

Part A runs FedAvg and every robust strategy with 0% and 20% sign-flipping attackers; part B runs
FedAvg, FedProx and FedAdam on Dirichlet label skew with alpha 100, 1 and 0.1. Every run is a real
privet federation (the same ServerApp and ClientApp) on the in-process engine, small enough for a
CPU. Writes ``results.json``, ``robustness.md`` (tables) and ``robustness.png`` into ``--out``.

Run: ``privet study robustness --out docs/robustness`` (or ``python -m privet.simulations.studies.robustness``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from privet.common.config import load_config
from privet.server.rundir import read_metrics

__all__ = ["BASE", "StudyRun", "plan_runs", "run_robustness_study", "study_app", "write_outputs"]

log = logging.getLogger("privet")

#: The small federation every run shares (CPU-sized: a one-layer MiniLM cut, 800 examples, 3 rounds).
BASE = [
    "model.num_hidden_layers=1",
    "model.max_length=32",
    "data.max_examples=800",
    "data.server_test_fraction=0.2",
    "federation.rounds=3",
    "federation.fraction_evaluate=0",
    # DP off: the study isolates what aggregation does; DP noise would blur the comparison.
    "privacy.enabled=false",
    "train.local_epochs=2",
    "train.batch_size=16",
    "train.lr=0.02",
    "train.num_threads=1",
    "simulation.engine='inprocess'",
]
ROBUST = ["fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"]
SKEW = ["fedavg", "fedprox", "fedadam"]
ALPHAS = [100.0, 1.0, 0.1]


@dataclass
class StudyRun:
    """One federation of the study and its outcome."""

    part: str
    strategy: str
    setting: str
    overrides: list[str]
    accuracy: list[float] = field(default_factory=list)
    rejected: int = 0
    seconds: float = 0.0

    @property
    def final(self) -> float:
        """Server test accuracy after the last round."""
        return self.accuracy[-1] if self.accuracy else float("nan")


def plan_runs(
    *, clients_a: int = 11, clients_b: int = 10, attack: str = "sign_flip"
) -> list[StudyRun]:
    """The runs of both parts. Part A: 11 clients, so 20% = 2 attackers and Bulyan (n >= 4f+3) fits f = 2."""
    runs = []
    f = round(0.2 * clients_a)
    for strategy in ROBUST:
        params = {
            "krum": [f"aggregation.num_malicious={f}"],
            "multikrum": [f"aggregation.num_malicious={f}"],
            "bulyan": [f"aggregation.num_malicious={f}"],
        }.get(strategy, [])
        for frac in (0.0, 0.2):
            sets = [
                f"data.num_clients={clients_a}",
                f"federation.strategy='{strategy}'",
                *params,
            ]
            if frac:
                sets += [f"faults.byzantine_fraction={frac}", f"faults.attack='{attack}'"]
            runs.append(StudyRun("A", strategy, f"{frac:.0%} {attack}", sets))
    for alpha in ALPHAS:
        for strategy in SKEW:
            sets = [
                f"data.num_clients={clients_b}",
                "data.partition='dirichlet'",
                f"data.alpha={alpha}",
                f"federation.strategy='{strategy}'",
            ]
            if strategy == "fedprox":
                sets.append("aggregation.proximal_mu=0.1")
            runs.append(StudyRun("B", strategy, f"alpha={alpha:g}", sets))
    return runs


def run_robustness_study(
    *,
    out: Path,
    seed: int = 0,
    extra: list[str] | None = None,
    parts: str = "AB",
    console: Console | None = None,
) -> list[StudyRun]:
    """Run every federation of the study and write results, tables and the plot into ``out``.

    Parameters
    ----------
    out
        Output folder (created).
    seed
        ``train.seed``, ``data.seed`` and ``faults.seed`` of every run.
    extra
        Overrides applied to every run after the study's own (e.g. a smaller ``data.max_examples``).
    parts
        Which parts to run: ``"A"`` (attackers), ``"B"`` (label skew) or ``"AB"``.
    console
        Where the progress bar goes.

    Returns
    -------
    list
        The runs with their per-round server accuracy.

    """
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in plan_runs() if r.part in parts]
    # Every client of every run would announce that DP is off (the study says so once, here) and
    # every attacked run would list its attackers: the progress bar is what a reader follows.
    log.warning("robustness study: %d runs, DP off in all of them (aggregation only)", len(runs))
    level = log.level
    log.setLevel(logging.ERROR)
    seeds = [f"train.seed={seed}", f"data.seed={seed}", f"faults.seed={seed}"]
    try:
        with (
            tempfile.TemporaryDirectory(prefix="privet-study-") as tmp,
            study_progress(console) as progress,
        ):
            task = progress.add_task("robustness study", total=len(runs))
            for i, run in enumerate(runs):
                progress.update(
                    task, description=f"{run.part} {run.strategy:<13} {run.setting:<16}"
                )
                run_dir, run.seconds = timed_run(
                    [*BASE, *run.overrides, *seeds, *(extra or [])],
                    output_dir=tmp,
                    run_name=f"run{i:02d}",
                )
                records = read_metrics(run_dir)
                run.accuracy = [float(r["server_accuracy"]) for r in records]
                run.rejected = sum(len(r.get("rejected", {})) for r in records)
                progress.advance(task)
    finally:
        log.setLevel(level)
    write_outputs(runs, out=out, seed=seed, extra=extra or [])
    return runs


def timed_run(overrides: list[str], *, output_dir: str | Path, run_name: str) -> tuple[Path, float]:
    """Run one study federation (defaults plus ``overrides``) into ``output_dir/run_name``.

    Returns the run directory and the seconds the run took.
    """
    from privet.simulations.run import simulate  # torch and Flower load only when a study runs

    cfg = load_config(
        None,
        [
            *overrides,
            f"simulation.output_dir='{output_dir}'",
            f"simulation.run_name='{run_name}'",
        ],
    )
    start = time.perf_counter()
    run_dir = simulate(cfg)
    return run_dir, time.perf_counter() - start


def study_progress(console: Console | None) -> Progress:
    """The progress bar every study shows: the current run, runs done of all, time elapsed."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
    )


def write_outputs(runs: list[StudyRun], *, out: Path, seed: int, extra: list[str]) -> None:
    """Write ``results.json``, ``robustness.md`` and ``robustness.png`` of ``runs`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {
                "base": BASE,
                "seed": seed,
                "extra": extra,
                "runs": [asdict(r) | {"final": r.final} for r in runs],
            },
            indent=2,
        )
    )
    (out / "robustness.md").write_text(tables(runs))
    plot(runs, out / "robustness.png")


def _find(runs: list[StudyRun], part: str, strategy: str, setting: str) -> StudyRun | None:
    return next(
        (r for r in runs if r.part == part and r.strategy == strategy and r.setting == setting),
        None,
    )


def _fmt(run: StudyRun | None) -> str:
    return "-" if run is None else f"{run.final:.1%}"


def tables(runs: list[StudyRun]) -> str:
    """The result tables (Markdown) of the parts present: final server test accuracy."""
    lines: list[str] = []
    attacked = next(
        (r.setting for r in runs if r.part == "A" and not r.setting.startswith("0%")), ""
    )
    if any(r.part == "A" for r in runs):
        lines += [f"| strategy | clean | {attacked} | change |", "| --- | --- | --- | --- |"]
        for strategy in ROBUST:
            clean = next(
                (
                    r
                    for r in runs
                    if r.part == "A" and r.strategy == strategy and r.setting.startswith("0%")
                ),
                None,
            )
            hit = _find(runs, "A", strategy, attacked)
            change = (
                "-"
                if clean is None or hit is None
                else f"{100 * (hit.final - clean.final):+.1f} pts"
            )
            lines.append(f"| {strategy} | {_fmt(clean)} | {_fmt(hit)} | {change} |")
        lines.append("")
    if any(r.part == "B" for r in runs):
        lines += [
            "| strategy | " + " | ".join(f"alpha = {a:g}" for a in ALPHAS) + " |",
            "| --- | " + " | ".join("---" for _ in ALPHAS) + " |",
        ]
        for strategy in SKEW:
            cells = [_fmt(_find(runs, "B", strategy, f"alpha={a:g}")) for a in ALPHAS]
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[StudyRun], path: Path) -> None:
    """One panel per part present: accuracy after each round, per strategy and setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    parts = [p for p in ("A", "B") if any(r.part == p for r in runs)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.4), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        names = ROBUST if part == "A" else SKEW
        colors = {s: f"C{i}" for i, s in enumerate(names)}
        for r in (r for r in runs if r.part == part):
            if part == "A":
                style = "-" if r.setting.startswith("0%") else "--"
            else:
                style = {"alpha=100": "-", "alpha=1": "--"}.get(r.setting, ":")
            ax.plot(
                range(len(r.accuracy)),
                r.accuracy,
                style,
                color=colors[r.strategy],
                marker="o",
                ms=3,
                label=f"{r.strategy}, {r.setting}",
            )
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("server test accuracy")
        ax.set_title(
            "A: attackers (solid: clean, dashed: attacked)"
            if part == "A"
            else "B: label skew (solid 100, dashed 1, dotted 0.1)"
        )
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


study_app = typer.Typer(
    help="Studies: many small federations summarised as a table and a plot.", no_args_is_help=True
)


@study_app.command("robustness")
def robustness_cmd(
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Folder for results.json, robustness.md and robustness.png."
        ),
    ] = Path("robustness-study"),
    seed: Annotated[int, typer.Option(help="Seed of data, training and attackers.")] = 0,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-s", help="Override a field of every run, e.g. --set data.max_examples=600."
        ),
    ] = None,
    part: Annotated[
        str,
        typer.Option(help="Run part A (attackers), B (label skew) or AB (both)."),
    ] = "AB",
) -> None:
    """FedAvg vs robust strategies with 0% and 20% attackers; FedAvg vs FedProx vs FedAdam under label skew."""
    console = Console()
    if part not in ("A", "B", "AB"):
        raise typer.BadParameter("--part must be A, B or AB")
    runs = run_robustness_study(
        out=out, seed=seed, extra=overrides or [], parts=part, console=console
    )
    console.print(tables(runs), markup=False, highlight=False)
    console.print(f"written: {out}/results.json, {out}/robustness.md, {out}/robustness.png")


if __name__ == "__main__":
    study_app()
