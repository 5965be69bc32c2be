"""``privet server``, ``privet client`` and ``privet certs``: a federation across machines.

The commands parse options, print what a person needs, and call the role's deploy module
(``privet.server.deploy``, ``privet.client.deploy``); they own signal handling and exit codes, which
the library code never touches.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from privet.common.config import PrivetConfig, format_validation_error, load_config
from privet.common.errors import ConfigError, DeploymentError
from privet.common.protocol import CONFIG, EPSILON, METRICS, NUM_EXAMPLES, SERVER_ROUND

if TYPE_CHECKING:
    from flwr.app import Message

    from privet.client.policy import SitePolicy

__all__ = ["certs_app", "client", "server", "sites"]

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

certs_app = typer.Typer(
    suggest_commands=False,
    help="Make the federation's TLS certificates and node keys.",
    no_args_is_help=True,
)

INSECURE_WARNING = (
    "[bold red]--insecure:[/bold red] [red]no TLS and no node authentication; anyone who reaches "
    "this port can read the updates or join. Use it only for local trials.[/red]"
)


def _sigterm_as_interrupt() -> None:
    """Let SIGTERM unwind like Ctrl-C, so every child process is stopped (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


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
) -> None:
    """Start the coordinator: Flower's SuperLink, privet's ServerApp, and a live per-round table.

    Writes the run directory (config.toml, metrics.jsonl, checkpoints/, final_adapter/,
    summary.json, plots.png; Flower's logs and database under flower/). Stops every process it
    started when the run ends, fails, or on Ctrl-C.
    """
    from privet.common.certs import cert_paths
    from privet.common.data import cached_federated_data
    from privet.common.modeling import check_model_loads
    from privet.server.deploy import serve
    from privet.server.rundir import create_run_dir
    from privet.simulations.cli import _announce_privacy, _quiet_libraries
    from privet.simulations.report import ConsoleReporter, load_summary, plot_run, round_table

    if (certs is None) == (not insecure):
        raise DeploymentError(
            "say how clients connect: --certs DIR (TLS and node authentication) or --insecure",
            fix="make DIR with `privet certs init --out DIR --host <name>`",
        )
    if insecure:
        err_console.print(INSECURE_WARNING)
    _quiet_libraries(False)
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
    _announce_privacy(cfg)
    where = f"{cfg.deployment.host}:{cfg.deployment.port}"
    console.print(f"starting the coordinator on {where}; run directory {run_dir}")

    def _ready() -> None:
        # Only now can a site connect: said after the SuperLink's health check, not before.
        console.print(
            f"coordinator on {where} ({'TLS, node authentication' if paths else 'INSECURE'}); "
            f"waiting for {cfg.federation.min_available_clients} clients; a round gives up on "
            f"missing clients after {cfg.federation.round_timeout:g} s (federation.round_timeout)"
        )

    _sigterm_as_interrupt()
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


def client(
    server_address: Annotated[str, typer.Option("--server", help="The coordinator's host:port.")],
    data: Annotated[Path, typer.Option("--data", help="This site's CSV/JSONL/Parquet file.")],
    state_dir: Annotated[
        Path,
        typer.Option("--state-dir", help="Folder for this site's privacy ledger; keep it."),
    ],
    ca: Annotated[Path | None, typer.Option("--ca", help="The federation's ca.pem (TLS).")] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="This site's node key (`privet certs node`)."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS (local trials with an insecure server).")
    ] = False,
    name: Annotated[
        str | None, typer.Option("--name", help="This site's name (default: the data file's stem).")
    ] = None,
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    label_column: Annotated[str, typer.Option(help="Column holding the label.")] = "label",
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="TOML with this site's policy: \\[privacy] and \\[model] (docs/security.md); "
            "default: DP on at ε 8, the embedded model, no remote code. Never the coordinator's.",
        ),
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option("--epsilon", help="privacy.target_epsilon this site grants a run."),
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option("--budget", help="privacy.budget_epsilon: this site's cap over all runs."),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="model.name: the only model this site loads.")
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch threads for training.")
    ] = None,
    reconnect_timeout: Annotated[
        float,
        typer.Option(
            "--reconnect-timeout",
            min=1.0,
            help="Seconds to keep trying to reach a coordinator that went away before leaving.",
        ),
    ] = 600.0,
    test_attack: Annotated[
        str | None,
        typer.Option(
            "--test-attack",
            hidden=True,
            help="TESTING ONLY: play a malicious site ([faults] attack: scale, sign_flip, ...).",
        ),
    ] = None,
    test_attack_scale: Annotated[
        float, typer.Option("--test-attack-scale", hidden=True, help="TESTING ONLY.")
    ] = 1000.0,
    test_claim_examples: Annotated[
        int | None,
        typer.Option("--test-claim-examples", hidden=True, help="TESTING ONLY: num-examples sent."),
    ] = None,
) -> None:
    """Join a federation with this site's own data, policy and ledger (a Flower SuperNode).

    Runs until Ctrl-C; prints each round this site trains with its cumulative ε.
    """
    from privet.client.deploy import SiteClient, SiteSettings
    from privet.simulations.cli import _quiet_libraries

    _quiet_libraries(False)
    if insecure:
        err_console.print(INSECURE_WARNING)
    policy = _site_policy(config, epsilon=epsilon, budget=budget, model=model)
    settings = SiteSettings(
        name=name or data.stem,
        data_file=data.resolve(),
        text_column=text_column,
        label_column=label_column,
        state_dir=state_dir.resolve(),
        policy=policy,
        num_threads=threads,
        reconnect_timeout=reconnect_timeout,
    )
    site = SiteClient(settings, server=server_address, ca=ca, key=key, insecure=insecure)
    if test_attack is not None:
        from privet.simulations.faults import AttackingApp

        err_console.print(f"[bold red]TESTING: this site attacks ({test_attack})[/bold red]")
        site.app = AttackingApp(  # type: ignore[assignment]
            site.app,
            attack=test_attack,
            scale=test_attack_scale,
            claim_examples=test_claim_examples,
        )
    site.preflight()
    _sigterm_as_interrupt()
    refused = (
        "ask the operator to register this site's public key (`privet certs node`); see "
        f"{settings.state_dir / 'flower' / 'supernode.log'}"
    )
    # Joining takes tens of seconds (Flower's SuperNode starts, connects and is activated): say so.
    console.print(
        f"site {settings.name}: data and coordinator checked; asking {server_address} to admit "
        "this node (up to a minute)..."
    )
    try:
        try:
            site.start(on_wait=lambda why: console.print(f"[yellow]{why}[/yellow]"))
        except DeploymentError:
            # A coordinator that refuses the node can end the SuperNode before its health service
            # ever answered; report that as the refusal it is, not as a failed start.
            if site.child is None or site.alive():
                raise
            raise DeploymentError(site.exit_reason(), fix=refused) from None
        console.print(
            f"site {settings.name} joined {server_address} "
            f"({'TLS' if ca else 'INSECURE'}); ledger in {settings.state_dir}; Ctrl-C to leave"
        )
        site.serve(threading.Event(), on_done=_report_reply, on_error=_report_dropped)
        raise DeploymentError(site.exit_reason(), fix=refused)
    finally:
        site.stop()


def _site_policy(
    config: Path | None, *, epsilon: float | None, budget: float | None, model: str | None
) -> SitePolicy:
    """The site's policy: its ``--config`` file (or the safe defaults), then the options."""
    from privet.client.policy import SitePolicy

    policy = SitePolicy.load(config) if config is not None else SitePolicy()
    privacy: dict[str, object] = {}
    if epsilon is not None:
        privacy["target_epsilon"] = epsilon
    if budget is not None:
        privacy["budget_epsilon"] = budget
    try:
        return SitePolicy.model_validate(
            {
                "privacy": policy.privacy.model_dump() | privacy,
                "model": policy.model.model_dump() | ({"name": model} if model else {}),
            }
        )
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def sites(
    out: Annotated[Path, typer.Option("--out", help="Folder to write one CSV per site into.")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML whose \\[data] section splits.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override one field, e.g. --set data.num_clients=2."),
    ] = None,
) -> None:
    """Write each client's share of the configured data as its own CSV (sites for a trial).

    The split is the simulation's (``[data]``: source, partition, num_clients, seed), so the
    coordinator's server test set, held out from the same data, never overlaps a site's rows.
    """
    import csv

    from privet.common.data import cached_federated_data

    cfg = load_config(config, overrides or [])
    fed = cached_federated_data(cfg.data)
    out.mkdir(parents=True, exist_ok=True)
    for site in fed.clients:
        path = out / f"{site.name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for part in (site.train, site.test):
                writer.writerows(zip(part.texts, part.labels.tolist(), strict=True))
        console.print(f"{path}: {len(site.train) + len(site.test)} rows")


def _report_dropped(exc: BaseException) -> None:
    from privet.client.worker import TaskAbandonedError

    if isinstance(exc, TaskAbandonedError):
        console.print(f"[yellow]{exc}[/yellow]")


def _report_reply(message: Message, reply: Message) -> None:
    if reply.has_error():
        console.print(f"[yellow]{reply.metadata.message_type}: {reply.error.reason}[/yellow]")
        return
    metrics = reply.content.metric_records.get(METRICS)
    if metrics is not None and EPSILON in metrics:
        server_round = message.content.config_records[CONFIG].get(SERVER_ROUND, "?")
        eps = float(metrics[EPSILON])  # type: ignore[arg-type]
        console.print(
            f"round {server_round!s}: trained on {int(metrics[NUM_EXAMPLES])} examples; "  # type: ignore[arg-type]
            f"cumulative ε = {eps:.3f}"
        )


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
