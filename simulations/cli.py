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

from privet.common.config import config_reference, load_config
from privet.common.console import announce_privacy, quiet_libraries
from privet.common.errors import PrivetError
from privet.server.rundir.commands import export_cmd, report_cmd, runs_cmd

__all__ = ["app", "main"]

app = typer.Typer(
    name="privet",
    help="Federated, privacy-preserving fine-tuning of pretrained transformers (Flower + Opacus + PEFT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click already says "Did you mean 'simulate'?"; typer's own suggestion would repeat it.
    suggest_commands=False,
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
        "\\[federation], \\[simulation], \\[tracking] sections (every field is optional; `privet config-reference` "
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
    quiet_libraries(verbose)
    from privet.server.rundir.report import ConsoleReporter, load_summary, plot_run, round_table
    from privet.simulations.run import simulate as run

    announce_privacy(cfg, console)
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
    from privet.server.rundir.privacy_report import load_privacy_report, plot_privacy, privacy_lines

    for line in privacy_lines(load_privacy_report(run_dir)):
        console.print(escape(line), highlight=False)
    privacy_plot = plot_privacy(run_dir)
    console.print(
        f"run directory: {run_dir}"
        + (f"; plot: {plot}" if plot else "")
        + (f"; privacy report: {run_dir / 'privacy.json'}, {privacy_plot}" if privacy_plot else "")
    )


@app.command()
def plan(config: ConfigOpt = None, overrides: SetOpt = None) -> None:
    """Preflight: noise, projected epsilon per client and for the federation, payload and memory.

    Exits with status 2 when a budget cannot hold for the planned rounds, naming the setting to change.
    """
    from privet.server.rundir import check_output_dir
    from privet.simulations.plan import check_plan, make_plan, render_plan

    cfg = load_config(config, overrides or [])
    check_output_dir(cfg.simulation.output_dir)  # where `simulate` would write
    quiet_libraries(False)
    run_plan = make_plan(cfg)
    console.print(render_plan(run_plan, cfg))
    check_plan(run_plan)


@app.command()
def audit(
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    canaries: Annotated[
        int, typer.Option(help="Planted canaries (the largest bound shown grows like log of this).")
    ] = 100_000,
    beta: Annotated[float, typer.Option(help="Significance of the lower bound.")] = 0.05,
    broken: Annotated[
        bool,
        typer.Option(
            "--broken",
            help="Self-test: train WITHOUT noise or clipping while claiming the configured epsilon; "
            "the audit must flag it.",
        ),
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the result as JSON here.")] = None,
) -> None:
    """Empirical privacy audit: planted canaries give a lower bound on epsilon beside the accounted one.

    Exits with status 1 when the lower bound exceeds the accounted epsilon (the claim is wrong).
    """
    import json

    from privet.simulations.audit import run_audit

    cfg = load_config(config, overrides or [])
    quiet_libraries(False)
    with console.status(f"training with {canaries:,} planted canaries ..."):
        result = run_audit(cfg, canaries=canaries, beta=beta, broken=broken)
    console.print(
        f"accounted ε = {result.accounted_epsilon:.3f} (δ = {result.delta:g}, σ = "
        f"{result.noise_multiplier:.4f}, C = {result.max_grad_norm:g}, q = {result.sample_rate:.4g}, "
        f"{result.steps} steps{'; BROKEN on purpose: no noise, no clipping' if broken else ''})\n"
        f"empirical lower bound ε ≥ {result.empirical_epsilon_lower_bound:.3f} "
        f"({result.correct} of {result.guesses} membership guesses right, {result.canaries:,} "
        f"canaries, β = {beta:g})",
        highlight=False,
    )
    style = "bold red" if result.flagged else "bold green"
    console.print(f"[{style}]{escape(result.verdict)}[/{style}]")
    if out is not None:
        out.write_text(json.dumps(result.as_json(), indent=2) + "\n", encoding="utf-8")
    if result.flagged:
        raise typer.Exit(1)


app.command("export")(export_cmd)
app.command("report")(report_cmd)
app.command("runs")(runs_cmd)


@app.command("config-reference")
def config_reference_cmd() -> None:
    """Print every configuration field with its default and meaning (Markdown)."""
    console.print(config_reference(), markup=False, highlight=False, soft_wrap=True)


def _register_studies() -> None:
    from privet.simulations.studies import study_app

    app.add_typer(study_app, name="study")


_register_studies()


import privet.client.cli as _client_cli  # noqa: E402
from privet.client.cli import client  # noqa: E402
from privet.server.cli import certs_app, server, sites  # noqa: E402


def _attacking_app(app_: object, **options: object) -> object:
    # `privet client --test-attack` (hidden): the site plays one of the simulation's attacks.
    from privet.simulations.faults import AttackingApp

    return AttackingApp(app_, **options)  # type: ignore[arg-type]


_client_cli.attack_wrapper = _attacking_app
app.command("server")(server)
app.command("client")(client)
app.command("sites")(sites)
app.add_typer(certs_app, name="certs")


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
