"""``privet client``: a site joins a federation with its own data, policy and ledger.

It parses options, prints what a site's operator needs, and calls :mod:`privet.client.deploy`; it
owns signal handling and exit codes, which the library code never touches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from privet.common.config import format_validation_error
from privet.common.console import INSECURE_WARNING, sigterm_as_interrupt
from privet.common.errors import ConfigError, DeploymentError
from privet.common.protocol import CONFIG, EPSILON, METRICS, NUM_EXAMPLES, REPLAYED, SERVER_ROUND

if TYPE_CHECKING:
    from flwr.app import Message

    from privet.client.policy import SitePolicy

__all__ = ["client"]

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

# `--test-attack` (hidden, tests only) wraps the site's app in one of the simulation's attacks. The
# client package may not import the simulation harness, so the `privet` command that assembles
# every role's commands (privet.simulations.cli) hands the wrapper in here.
attack_wrapper: Callable[..., Any] | None = None


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
    from privet.common.console import quiet_libraries

    quiet_libraries(False)
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
        if attack_wrapper is None:
            raise DeploymentError(
                "--test-attack is a testing option of the `privet` command",
                fix="run it as `privet client --test-attack ...`",
            )
        err_console.print(f"[bold red]TESTING: this site attacks ({test_attack})[/bold red]")
        site.app = attack_wrapper(
            site.app,
            attack=test_attack,
            scale=test_attack_scale,
            claim_examples=test_claim_examples,
        )
    site.preflight()
    sigterm_as_interrupt()
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
        if metrics.get(REPLAYED):
            # A coordinator that crashed and resumed asked for this round again with the same
            # inputs: the update already released was sent again, nothing charged.
            console.print(
                f"round {server_round!s}: asked again; sent the update already released "
                f"(replayed, no privacy charged); cumulative ε = {eps:.3f}"
            )
            return
        console.print(
            f"round {server_round!s}: trained on {int(metrics[NUM_EXAMPLES])} examples; "  # type: ignore[arg-type]
            f"cumulative ε = {eps:.3f}"
        )
