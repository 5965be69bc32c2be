"""The privacy-utility study: accuracy at several epsilons, centralized and federated, both DP levels.

Every row is a complete privet run of the demo's model and task (all-MiniLM-L6-v2, FFA-LoRA, VADER
sentiment) on a shared CPU-sized slice: 6,000 sentences, 3 rounds of half a local epoch.

- *federated, IID*: 4 clients, sample-level DP at epsilon 1, 3 and 8 per client, and without DP;
- *federated, by VADER domain*: one client per domain (tweets, movie reviews, Amazon reviews, NYT
  editorials: unequal sizes and label mixes), epsilon 8 and without DP;
- *centralized*: one client holding every training sentence, so the same samples and the same
  number of optimizer steps as the 4-client federation, epsilon 8 and without DP;
- *client-level DP*: DP-FedAvg over a population of 1,000 clients (all 19,136 sentences, 16 each),
  100 per round, federation epsilon 8, and the same population without DP; it needs a large
  population, so its slice differs.

Writes ``results.json``, ``privacy-utility.md`` (the table) and ``privacy-utility.png`` into
``--out``. ``--from-runs DIR`` rebuilds them from run directories already there (one per row,
named as the row), without training.

Run: ``privet study privacy-utility --out docs/privacy-utility``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from privet.common.config import load_config
from privet.server.rundir import read_metrics
from privet.simulations.studies.robustness import study_progress, timed_run

__all__ = ["COMMON", "ROWS", "UtilityRow", "collect_row", "run_privacy_utility_study"]

log = logging.getLogger("privet")

#: The slice every row but the client-level one shares (the demo's defaults otherwise).
COMMON = ["data.max_examples=6000", "train.local_epochs=0.5", "federation.rounds=3"]
_ONE_CLIENT = [
    "data.num_clients=1",
    "federation.min_train_clients=1",
    "federation.min_available_clients=1",
    # one client: Ray would only add its start-up
    "simulation.engine='inprocess'",
]
_NO_DP = ["privacy.enabled=false"]
#: Client-level DP needs many clients per round: all 19,136 sentences over 1,000 clients (16 training
#: sentences each), 100 of them per round, one local step each.
_POPULATION = [
    "data.max_examples=19136",
    "data.num_clients=1000",
    "federation.fraction_train=0.1",
    "federation.min_train_clients=100",
    "federation.rounds=6",
    "train.local_epochs=1",
    "train.batch_size=16",
    *_NO_DP,
    # 100 small clients a round: one process, no Ray scheduling per client
    "simulation.engine='inprocess'",
]


@dataclass
class UtilityRow:
    """One run of the study and its outcome."""

    name: str
    setting: str
    partition: str
    dp: str
    overrides: list[str]
    accuracy: list[float] = field(default_factory=list)
    #: Largest client epsilon (sample-level) and the federation's (client-level), when on.
    epsilon: float | None = None
    federation_epsilon: float | None = None
    #: Largest per-client noise multiplier (sample-level) or z (client-level), from the run's plan.
    noise: float | None = None
    seconds: float = 0.0

    @property
    def final(self) -> float:
        """Server test accuracy after the last round."""
        return self.accuracy[-1] if self.accuracy else float("nan")


def _eps(target: float) -> list[str]:
    return [f"privacy.target_epsilon={target:g}"]


ROWS: list[UtilityRow] = [
    UtilityRow("eps1", "federated", "IID, 4 clients", "sample-level ε=1", _eps(1)),
    UtilityRow("eps3", "federated", "IID, 4 clients", "sample-level ε=3", _eps(3)),
    UtilityRow("eps8", "federated", "IID, 4 clients", "sample-level ε=8", _eps(8)),
    UtilityRow("nodp", "federated", "IID, 4 clients", "none", _NO_DP),
    UtilityRow(
        "domain_eps8",
        "federated",
        "VADER domain, 4 clients",
        "sample-level ε=8",
        ["data.partition='natural'", *_eps(8)],
    ),
    UtilityRow(
        "domain_nodp",
        "federated",
        "VADER domain, 4 clients",
        "none",
        ["data.partition='natural'", *_NO_DP],
    ),
    UtilityRow(
        "central_eps8", "centralized", "1 client", "sample-level ε=8", [*_ONE_CLIENT, *_eps(8)]
    ),
    UtilityRow("central_nodp", "centralized", "1 client", "none", [*_ONE_CLIENT, *_NO_DP]),
    UtilityRow(
        "clientlevel",
        "federated",
        "IID, 1,000 clients, 100 per round",
        "client-level ε=8",
        [
            *_POPULATION,
            "privacy.client_level.enabled=true",
            "privacy.client_level.target_epsilon=8",
            "privacy.client_level.sampling_amplification=true",
        ],
    ),
    UtilityRow(
        "population_nodp", "federated", "IID, 1,000 clients, 100 per round", "none", _POPULATION
    ),
]


def _fresh(names: list[str] | None) -> list[UtilityRow]:
    rows = [
        UtilityRow(r.name, r.setting, r.partition, r.dp, list(r.overrides))
        for r in ROWS
        if names is None or r.name in names
    ]
    unknown = set(names or []) - {r.name for r in ROWS}
    if unknown:
        raise typer.BadParameter(
            f"unknown row(s) {sorted(unknown)}; the rows are {[r.name for r in ROWS]}"
        )
    return rows


def collect_row(row: UtilityRow, run_dir: Path) -> UtilityRow:
    """Fill ``row`` from a finished run directory: accuracy per round, epsilons, noise."""
    from privet.simulations.plan import make_plan

    records = read_metrics(run_dir)
    row.accuracy = [float(r["server_accuracy"]) for r in records]
    summary = json.loads((run_dir / "summary.json").read_text())
    row.epsilon = summary.get("max_epsilon")
    row.federation_epsilon = summary.get("federation_epsilon")
    if not row.seconds:
        row.seconds = float(summary.get("seconds") or 0.0)
    cfg = load_config(run_dir / "config.toml")
    plan = make_plan(cfg, with_model=False)
    sigmas = [c.noise_multiplier for c in plan.clients if c.noise_multiplier is not None]
    if sigmas:
        row.noise = max(sigmas)
    elif plan.federation is not None:
        row.noise = plan.federation.noise_multiplier
    return row


def run_privacy_utility_study(
    *,
    out: Path,
    runs_dir: Path,
    names: list[str] | None = None,
    extra: list[str] | None = None,
    train: bool = True,
    console: Console | None = None,
) -> list[UtilityRow]:
    """Run (or, with ``train=False``, collect) the rows and write the table and plot into ``out``.

    Parameters
    ----------
    out
        Output folder for ``results.json``, ``privacy-utility.md`` and ``privacy-utility.png``.
    runs_dir
        Where each row's run directory is written (or read), named as the row.
    names
        Rows to run; ``None``: all of them.
    extra
        Overrides applied to every row after its own.
    train
        ``False``: read finished run directories instead of training.
    console
        Where the progress bar goes.

    Returns
    -------
    list
        The rows with their outcomes.

    """
    rows = _fresh(names)
    out.mkdir(parents=True, exist_ok=True)
    with study_progress(console) as progress:
        task = progress.add_task("privacy-utility study", total=len(rows))
        for row in rows:
            progress.update(task, description=f"{row.name:<13} {row.dp:<18}")
            run_dir = runs_dir / row.name
            if train:
                run_dir, row.seconds = timed_run(
                    [*COMMON, *row.overrides, *(extra or [])],
                    output_dir=runs_dir,
                    run_name=row.name,
                )
            elif not (run_dir / "summary.json").is_file():
                raise typer.BadParameter(f"{run_dir} holds no finished run (no summary.json)")
            collect_row(row, run_dir)
            progress.advance(task)
    write_outputs(rows, out=out, extra=extra or [])
    return rows


def write_outputs(rows: list[UtilityRow], *, out: Path, extra: list[str]) -> None:
    """Write ``results.json``, ``privacy-utility.md`` and ``privacy-utility.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "common": COMMON,
        "extra": extra,
        "rows": [asdict(r) | {"final": r.final} for r in rows],
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "privacy-utility.md").write_text(table(rows))
    plot(rows, out / "privacy-utility.png")


def _pct(x: float) -> str:
    return f"{x:.2%}"


def table(rows: list[UtilityRow]) -> str:
    """The result table (Markdown): server test accuracy after each round, noise and epsilon."""
    width = max((len(r.accuracy) - 1 for r in rows), default=0)
    head = ["setting", "partition", "DP", "noise", *(f"round {i}" for i in range(1, width + 1))]
    head += ["final ε"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        rounds = [_pct(a) for a in r.accuracy[1:]]
        rounds += ["-"] * (width - len(rounds))
        if len(r.accuracy) > 1:  # the final accuracy in bold, wherever the row ends
            last = len(r.accuracy) - 2
            rounds[last] = f"**{rounds[last]}**"
        noise = (
            "-"
            if r.noise is None
            else (
                f"z = {r.noise:.3f}" if r.federation_epsilon is not None else f"σ = {r.noise:.3f}"
            )
        )
        eps = (
            f"{r.federation_epsilon:.3f} (federation)"
            if r.federation_epsilon is not None
            else ("-" if not r.epsilon else f"{r.epsilon:.3f} (per client, max)")
        )
        lines.append("| " + " | ".join([r.setting, r.partition, r.dp, noise, *rounds, eps]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[UtilityRow], path: Path) -> None:
    """Final accuracy per row (bars), grouped by setting, with the untrained model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.6))
    colors = {"none": "C2", "client-level ε=8": "C3"}
    labels = [f"{r.setting}\n{r.partition}\n{r.dp}" for r in rows]
    bars = ax.bar(
        range(len(rows)),
        [100 * r.final for r in rows],
        color=[colors.get(r.dp, "C0") for r in rows],
    )
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(
            f"{r.final:.1%}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    untrained = next((r.accuracy[0] for r in rows if r.accuracy), None)
    if untrained is not None:
        ax.axhline(100 * untrained, color="grey", ls="--", lw=1, label="untrained model")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xticks(range(len(rows)), labels, fontsize=6.5)
    ax.set_ylabel("server test accuracy after the last round (%)")
    ax.set_ylim(40, 90)
    ax.set_title("privacy and utility (green: no DP, blue: sample-level DP, red: client-level DP)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def privacy_utility_cmd(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder for results.json, privacy-utility.md and privacy-utility.png.",
        ),
    ] = Path("privacy-utility-study"),
    runs: Annotated[
        Path, typer.Option(help="Folder for the rows' run directories (one per row).")
    ] = Path("privacy-utility-runs"),
    only: Annotated[
        list[str] | None, typer.Option(help="Run only this row (repeatable), e.g. --only eps8.")
    ] = None,
    from_runs: Annotated[
        bool,
        typer.Option(
            "--from-runs",
            help="Do not train: rebuild the outputs from the run directories in --runs.",
        ),
    ] = False,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a field of every row, e.g. --set train.seed=1."),
    ] = None,
) -> None:
    """Accuracy at ε 1, 3, 8 and without DP: centralized, federated IID and by domain, both DP levels."""
    console = Console()
    rows = run_privacy_utility_study(
        out=out,
        runs_dir=runs,
        names=only,
        extra=overrides or [],
        train=not from_runs,
        console=console,
    )
    console.print(table(rows), markup=False, highlight=False)
    console.print(
        f"written: {out}/results.json, {out}/privacy-utility.md, {out}/privacy-utility.png"
    )
