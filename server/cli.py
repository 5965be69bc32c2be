"""``privet server``, ``privet sites`` and ``privet certs``: the coordinator's commands.

They parse options, print what an operator needs, and call :mod:`privet.server.deploy`; they own
signal handling and exit codes, which the library code never touches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from privet.common.config import PrivetConfig, load_config
from privet.common.console import INSECURE_WARNING, sigterm_as_interrupt
from privet.common.errors import ConfigError, DeploymentError

__all__ = ["certs_app", "server", "sites"]

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

certs_app = typer.Typer(
    suggest_commands=False,
    help="Make the federation's TLS certificates and node keys.",
    no_args_is_help=True,
)


def server(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="The federation's TOML file.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override one field, e.g. --set deployment.port=9092."),
    ] = None,
    certs: Annotated[
        Path | None,
        typer.Option(
            "--certs",
            help="Folder made by `privet certs init` (TLS on; only nodes whose keys are in its "
            "nodes/ folder are admitted).",
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no node authentication (local trials).")
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume", help="Continue the run in this run directory after its last round."
        ),
    ] = None,
    public: Annotated[
        str | None,
        typer.Option(
            "--public",
            help="Listen for sites on this address of the machine (0.0.0.0: all interfaces); "
            "the default, deployment.host = 127.0.0.1, admits sites on this machine only.",
        ),
    ] = None,
    test_pause_after_replies: Annotated[
        int | None,
        typer.Option(
            "--test-pause-after-replies",
            hidden=True,
            help="TESTING ONLY: stop for good once round R's train replies are in, before the "
            "round is recorded (a test then kills the coordinator there).",
        ),
    ] = None,
) -> None:
    """Start the coordinator: Flower's SuperLink, privet's ServerApp, and a live per-round table.

    Writes the run directory (config.toml, metrics.jsonl, checkpoints/, final_adapter/,
    summary.json, plots.png; Flower's logs and database under flower/). Stops every process it
    started when the run ends, fails, or on Ctrl-C.
    """
    from privet.common.certs import cert_paths
    from privet.common.console import announce_privacy, quiet_libraries
    from privet.common.data import cached_federated_data
    from privet.common.modeling import check_model_loads
    from privet.server.deploy import serve
    from privet.server.rundir import create_run_dir
    from privet.server.rundir.report import ConsoleReporter, load_summary, plot_run, round_table

    if (certs is None) == (not insecure):
        raise DeploymentError(
            "say how clients connect: --certs DIR (TLS and node authentication) or --insecure",
            fix="make DIR with `privet certs init --out DIR --host <name>`",
        )
    if insecure:
        err_console.print(INSECURE_WARNING)
    if test_pause_after_replies is not None:
        import os

        from privet.server.app import TEST_PAUSE_ENV

        err_console.print(
            f"[bold red]TESTING: this coordinator stops after the replies of round "
            f"{test_pause_after_replies}[/bold red]"
        )
        # Read by the ServerApp process, which the SuperLink starts with this environment.
        os.environ[TEST_PAUSE_ENV] = str(test_pause_after_replies)
    quiet_libraries(False)
    paths = cert_paths(certs) if certs is not None else None
    if resume is not None:
        if config is not None:
            raise ConfigError(
                "--resume uses the run's own config.toml", fix="drop --config when resuming"
            )
        bad = [o for o in overrides or [] if not o.startswith("deployment.")]
        if bad:
            raise ConfigError(
                f"--set {bad[0]!r}: a resumed run keeps its configuration",
                fix="only deployment.* may change when resuming",
            )
        run_dir = resume
        cfg = load_config(run_dir / "config.toml", overrides or [])
        console.print(_resume_line(run_dir, cfg.federation.rounds))
    else:
        cfg = load_config(config, overrides or [])
        fed = cached_federated_data(cfg.data)  # the server test set; fails early on bad data
        check_model_loads(cfg.model)
        # Clients build their classification head from this: fix it once, for everyone.
        # Data paths absolute: the ServerApp process reads config.toml in another directory.
        data = cfg.data.model_copy(
            update={
                "num_labels": fed.num_labels,
                # Sites map their name labels with the coordinator's mapping, not their own.
                "label_names": list(fed.label_names) if fed.label_names else None,
                "train_files": [p.resolve() for p in cfg.data.train_files],
                "test_file": cfg.data.test_file.resolve() if cfg.data.test_file else None,
            }
        )
        cfg = cfg.model_copy(update={"data": data})
        run_dir = create_run_dir(cfg)
    if public is not None:
        cfg = cfg.model_copy(
            update={"deployment": cfg.deployment.model_copy(update={"host": public})}
        )
    announce_privacy(cfg, console)
    where = f"{cfg.deployment.host}:{cfg.deployment.port}"
    console.print(f"starting the coordinator on {where}; run directory {run_dir}")

    def _ready() -> None:
        # Only now can a site connect: said after the SuperLink's health check, not before.
        console.print(
            f"coordinator on {where} ({'TLS, node authentication' if paths else 'INSECURE'}); "
            f"waiting for {cfg.federation.min_available_clients} clients; a round gives up on "
            f"missing clients after {cfg.federation.round_timeout:g} s (federation.round_timeout)"
        )

    sigterm_as_interrupt()
    with ConsoleReporter(console, dp=cfg.privacy.enabled) as reporter:
        serve(
            cfg,
            run_dir=run_dir,
            certs=paths,
            observer=reporter,
            resume=resume is not None,
            on_ready=_ready,
            on_note=lambda line: console.print(f"[yellow]{line}[/yellow]"),
        )
    console.print(round_table(reporter.records, dp=cfg.privacy.enabled))
    _print_outcome(cfg, run_dir, load_summary(run_dir), plot_run(run_dir))


def _resume_line(run_dir: Path, rounds: int) -> str:
    """What ``--resume`` will continue from (the ServerApp decides the same way, in ``resume_point``)."""
    from privet.server.resume import server_state_path
    from privet.server.rundir import checkpoint_path, read_metrics

    recorded = {int(r["round"]) for r in read_metrics(run_dir) if "round" in r}
    done = 0
    while (done + 1) in recorded and checkpoint_path(run_dir, done + 1).exists():
        done += 1
    if done == 0:
        return f"resuming {run_dir}: no round completed yet, starting from round 1"
    state = "with" if server_state_path(run_dir, done).exists() else "WITHOUT"
    return (
        f"resuming after round {done} of {rounds}: that round's global adapter, {state} its "
        "server optimizer state and client-sampling RNG"
    )


def _print_outcome(
    cfg: PrivetConfig, run_dir: Path, summary: dict[str, object], plot: object
) -> None:
    final = summary.get("final_server_accuracy")
    if isinstance(final, float):
        console.print(f"[bold green]final server test accuracy {final:.2%}[/bold green]")
    eps = summary.get("max_epsilon")
    if cfg.privacy.enabled and isinstance(eps, float):
        console.print(f"[bold]largest cumulative ε among clients: {eps:.3f}[/bold]")
    console.print(f"run directory: {run_dir}" + (f"; plot: {plot}" if plot else ""))


def sites(
    out: Annotated[Path, typer.Option("--out", help="Folder to write one file per site into.")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML whose \\[data] section splits.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override one field, e.g. --set data.num_clients=2."),
    ] = None,
) -> None:
    """Write each client's share of the configured data as its own file (sites for a trial).

    The split is the simulation's (``[data]``: source, partition, num_clients, seed), so the
    coordinator's server test set, held out from the same data, never overlaps a site's rows.
    Classification data: ``SITE.csv`` with ``text`` and ``label`` columns. Causal-LM data
    (``model.task = 'causal_lm'``): ``SITE.jsonl``, chat ``messages`` rows or plain ``text``
    rows, which ``privet client --data SITE.jsonl`` reads back as the same examples.
    """
    import csv

    from privet.common.data import (
        GenerationExamples,
        cached_federated_data,
        classification_examples,
        concat_generation,
    )
    from privet.common.data.instructions import write_generation

    cfg = load_config(config, overrides or [])
    fed = cached_federated_data(cfg.data)
    out.mkdir(parents=True, exist_ok=True)
    for site in fed.clients:
        if isinstance(site.train, GenerationExamples) and isinstance(site.test, GenerationExamples):
            path = out / f"{site.name}.jsonl"
            write_generation(path, concat_generation([site.train, site.test]))
        else:
            path = out / f"{site.name}.csv"
            with open(path, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(["text", "label"])
                for part in map(classification_examples, (site.train, site.test)):
                    writer.writerows(zip(part.texts, part.labels.tolist(), strict=True))
        console.print(f"{path}: {len(site.train) + len(site.test)} rows")


@certs_app.command("init")
def certs_init(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the certificates into.")],
    host: Annotated[
        list[str],
        typer.Option("--host", help="A name or IP clients use to reach the coordinator (repeat)."),
    ],
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    overwrite: Annotated[bool, typer.Option(help="Replace existing certificates.")] = False,
) -> None:
    """Make a CA and the coordinator's TLS certificate (private keys 0600, never printed)."""
    from privet.common.certs import init_certs

    paths = init_certs(out, hosts=host, days=days, overwrite=overwrite)
    console.print(
        f"CA {paths.ca} (give it to every site), server certificate {paths.cert} for "
        f"{', '.join(host)}; private keys {paths.ca_key.name}, {paths.key.name} (mode 0600) stay here."
    )


@certs_app.command("node")
def certs_node(
    name: Annotated[str, typer.Argument(help="The site's name, e.g. site-a.")],
    out: Annotated[Path, typer.Option("--out", help="The certificate folder.")] = Path("certs"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing key.")] = False,
) -> None:
    """Make a node key pair; the coordinator admits the node once its public key is in nodes/."""
    from privet.common.certs import make_node_key

    private, public = make_node_key(name, out=out, overwrite=overwrite)
    console.print(
        f"node key for {name}: private {private} (mode 0600: hand it to the site over a secure "
        f"channel, then delete it here), public {public}.\n"
        f"Registration: `privet server --certs {out}` registers every key in {public.parent} "
        f"when it starts. The site joins with:"
    )
    # One unwrapped line: a command broken inside a path cannot be copied and pasted.
    console.print(
        f"  privet client --server HOST:PORT --ca {out / 'ca.pem'} --key {private} "
        "--data FILE --state-dir DIR",
        soft_wrap=True,
        highlight=False,
    )
