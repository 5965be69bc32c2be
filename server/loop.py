"""The round loop: Flower's ``Strategy.start`` written out, so a run can start at any round.

Flower's ``Strategy.start`` always begins at round 1 and keeps its history in memory; a coordinator
that resumes after a crash (``privet server --resume``) must begin at the round after the last
checkpoint. So privet drives the strategy's four steps itself; the steps are Flower's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privet.server.flower_door import NodeInfo, Run

__all__ = ["RoundEnd", "WrappedGrid", "run_rounds", "send_and_receive"]

log = logging.getLogger("privet")

#: Seconds between the "still waiting" lines a long wait for clients or replies logs.
WAIT_NOTE_SECONDS = 30.0
#: How those lines start (``privet server`` shows them from the deployed ServerApp's log).
WAITING = "still waiting for"

#: Called after each round (and for round ``first_round - 1`` before training starts) with the
#: round number and the global arrays after it.
RoundEnd = Callable[[int, ArrayRecord], None]


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    *,
    arrays: ArrayRecord,
    first_round: int,
    last_round: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord | None = None,
    on_round_end: RoundEnd,
    min_nodes: int = 1,
    after_replies: Callable[[int], None] | None = None,
) -> ArrayRecord:
    """Run rounds ``first_round..last_round`` of ``strategy`` starting from ``arrays``.

    Returns the global arrays after the last round. A round in which no update was aggregated keeps
    the previous global arrays (the wrapped strategy returned ``None``).

    Flower's strategies wait without limit until ``min_nodes`` clients are connected, before
    training and again before evaluating. Here the wait before training is bounded by ``timeout``
    (then the run stops with an error; ``privet server --resume`` continues it), and client
    evaluation is skipped for a round in which a client died after training, instead of hanging.
    """
    evaluate_config = evaluate_config if evaluate_config is not None else ConfigRecord()
    # The "still waiting" lines name the missing sites as the records do (RecordingStrategy).
    name_of = getattr(strategy, "name_of", None)
    label = (lambda node: str(name_of(None, node))) if callable(name_of) else None
    on_round_end(first_round - 1, arrays)
    for server_round in range(first_round, last_round + 1):
        _wait_for_nodes(grid, min_nodes, timeout=timeout, server_round=server_round)
        replies = send_and_receive(
            grid,
            strategy.configure_train(server_round, arrays, train_config, grid),
            timeout=timeout,
            label=label,
        )
        if after_replies is not None:
            after_replies(server_round)
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        else:
            log.warning(
                "round %d: no update was aggregated; the global model is unchanged", server_round
            )
        connected = len(list(grid.get_node_ids()))
        if connected < min_nodes:
            log.warning(
                "round %d: %d of %d clients connected; client evaluation skipped",
                server_round,
                connected,
                min_nodes,
            )
            eval_messages = []
        else:
            eval_messages = list(
                strategy.configure_evaluate(server_round, arrays, evaluate_config, grid)
            )
        if eval_messages:
            eval_replies = send_and_receive(grid, eval_messages, timeout=timeout, label=label)
            strategy.aggregate_evaluate(server_round, eval_replies)
        on_round_end(server_round, arrays)
    return arrays


def send_and_receive(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    poll: float = 0.25,
    label: Callable[[int], str] | None = None,
) -> list[Message]:
    """Flower's ``Grid.send_and_receive`` with a short poll.

    The deployed grid (``HttpGrid``) sleeps 3 s between pulls, which adds up to 3 s to every train
    and every evaluate step; pulling every ``poll`` seconds costs one small local request instead.
    Returns the replies that arrived within ``timeout`` seconds (stragglers are left out).
    ``label`` names a node in the "still waiting" lines (default ``node-<id>``).

    A grid that changes messages on their way (``TransportGrid``) or delivers them itself
    (the in-process engine) says so with ``owns_delivery = True``; its own ``send_and_receive``
    is used then.
    """
    if getattr(grid, "owns_delivery", False):
        return list(grid.send_and_receive(messages, timeout=timeout))
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    dest = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=False)}
    pending = set(ids)
    replies: list[Message] = []
    end = time.monotonic() + timeout
    note = time.monotonic() + WAIT_NOTE_SECONDS
    while pending and time.monotonic() < end:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending and time.monotonic() >= note:
            # A long wait must not look like a hang: say who is missing and until when.
            note = time.monotonic() + WAIT_NOTE_SECONDS
            name = label or (lambda node: f"node-{node}")
            nodes = ", ".join(sorted(name(dest[mid]) if mid in dest else "?" for mid in pending))
            log.warning(
                "%s %d of %d replies (%s); giving up on them at %s (federation.round_timeout)",
                WAITING,
                len(pending),
                len(ids),
                nodes,
                _clock(end),
            )
        if pending:
            time.sleep(poll)
    if pending:
        log.warning("%d replies did not arrive within %.0f s", len(pending), timeout)
    return replies


def _wait_for_nodes(grid: Grid, n: int, *, timeout: float, server_round: int) -> None:
    """Wait until ``n`` clients are connected, at most ``timeout`` seconds (polled every 1 s)."""
    deadline = time.monotonic() + timeout
    note = time.monotonic() + WAIT_NOTE_SECONDS
    while (connected := len(list(grid.get_node_ids()))) < n:
        if time.monotonic() >= note:
            note = time.monotonic() + WAIT_NOTE_SECONDS
            log.warning(
                "%s clients before round %d: %d of %d connected; giving up at %s "
                "(federation.round_timeout)",
                WAITING,
                server_round,
                connected,
                n,
                _clock(deadline),
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"round {server_round}: only {connected} of the {n} clients needed "
                f"(federation.min_available_clients) connected within {timeout:.0f} s"
            )
        time.sleep(1.0)


def _clock(deadline: float) -> str:
    """A monotonic deadline as local wall-clock time (what an operator compares with)."""
    return time.strftime("%H:%M:%S", time.localtime(time.time() + deadline - time.monotonic()))


class WrappedGrid(Grid):
    """A grid around another one (``inner``) that hands it everything it does not change itself.

    privet's grids (transport encoding, SecAgg+, the simulated population) each change how
    messages travel and delegate the rest here; Flower has no such base class.
    """

    inner: Grid

    def set_run(self, run: Run) -> None:  # noqa: D102
        self.inner.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]  # noqa: D102
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:  # noqa: D102
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.inner.pull_messages(message_ids)

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)
