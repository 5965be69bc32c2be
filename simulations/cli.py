"""The ``privet`` command. Subcommands live beside the role they start; this module assembles them."""

from __future__ import annotations

import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from privet.common.config import PrivetConfig, config_reference, load_config
from privet.common.errors import PrivetError

__all__ = ["app", "main"]

app = typer.Typer(
    name="privet",
    help="Federated, privacy-preserving fine-tuning of pretrained transformers (Flower + Opacus + PEFT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"privet {version('privet')}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Federated, privacy-preserving fine-tuning of pretrained transformers."""


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML file with \\[model], \\[adapter], \\[privacy], \\[train], \\[data], "
        "\\[federation], \\[simulation] sections (every field is optional; `privet config-reference` "
        "lists them all). No file: the demo federation.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override one field, e.g. --set train.lr=3e-4 (repeatable; values are TOML).",
    ),
]


@app.command()
def simulate(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's log lines.")
    ] = False,
) -> None:
    """Run a whole federation on this machine (Flower Simulation Engine) and report each round.

    Writes a run directory under simulation.output_dir with config.toml, metrics.jsonl, checkpoints/,
    final_adapter/ (PEFT format), summary.json and plots.png.
    """
    cfg = load_config(config, overrides or [])
    _quiet_libraries(verbose)
    from privet.simulations.report import ConsoleReporter, load_summary, plot_run, round_table
    from privet.simulations.run import simulate as run

    _announce_privacy(cfg)
    with ConsoleReporter(console, dp=cfg.privacy.enabled) as reporter:
        run_dir = run(cfg, observer=reporter, verbose=verbose)
    console.print(round_table(reporter.records, dp=cfg.privacy.enabled))
    summary = load_summary(run_dir)
    plot = plot_run(run_dir)
    init, final = summary.get("initial_server_accuracy"), summary.get("final_server_accuracy")
    if final is not None:
        line = f"final server test accuracy {final:.2%}"
        if init is not None:
            line += f" (untrained model: {init:.2%})"
        console.print(f"[bold green]{line}[/bold green]")
    if cfg.privacy.enabled:
        eps = summary.get("max_epsilon")
        budget = cfg.privacy.effective_budget
        console.print(
            f"[bold]largest cumulative ε among clients: {eps if eps is None else round(eps, 3)} "
            f"(budget {budget}, δ = {cfg.privacy.delta}, {cfg.privacy.accountant.upper()} accountant)[/bold]"
        )
    ray_s, loads_s = summary.get("ray_start_seconds"), summary.get("startup_seconds")
    if ray_s is not None and loads_s is not None:
        console.print(
            f"start-up: Ray {ray_s:.1f} s before round 1; cold model/data loads on the workers "
            f"{loads_s:.1f} s (counted in the round times above)"
        )
    console.print(f"run directory: {run_dir}" + (f"; plot: {plot}" if plot else ""))


def _quiet_libraries(verbose: bool) -> None:
    # Library warnings and download bars bury the per-round table a user reads.
    if verbose:
        return
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _announce_privacy(cfg: PrivetConfig) -> None:
    p = cfg.privacy
    if not p.enabled:
        console.print(
            "[bold red on white] DIFFERENTIAL PRIVACY IS OFF [/bold red on white] [red]clients' updates "
            "carry no privacy guarantee; use this only for non-private baselines.[/red]"
        )
    else:
        how = (
            f"target ε = {p.target_epsilon}"
            if p.target_epsilon is not None
            else f"noise σ = {p.noise_multiplier}"
        )
        console.print(
            f"[bold]DP-SGD on[/bold]: sample-level ({how}, δ = {p.delta}, clip C = {p.max_grad_norm}, "
            f"{p.accountant.upper()} accountant, budget ε ≤ {p.effective_budget} per client)"
        )


@app.command("config-reference")
def config_reference_cmd() -> None:
    """Print every configuration field with its default and meaning (Markdown)."""
    console.print(config_reference(), markup=False, highlight=False)


def main() -> None:
    """Console entry point: one clear line on bad input, never a traceback."""
    try:
        app()
    except PrivetError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted; Ray workers stopped[/yellow]")
        # Flower's ServerApp thread is not a daemon and would wait for the round timeout; Ray is
        # already shut down (simulate's finally), so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
