"""A simulated population larger than the Flower nodes that play it.

Flower's Simulation Engine gives every simulated client its own node, and its dispatcher polls the
link state for every node every 0.1 s, scanning all stored messages each time
(``vce_api.add_messages_to_queue``): with 1,000 clients of which 10 train, most of the driver's CPU
went to that loop (57% of its samples in a py-spy profile), not to the clients that train.

:class:`PopulationGrid` decouples the population from the nodes.  The strategy sees one logical
node per client (ids ``1..N``, the client with partition id ``p`` is node ``p + 1``) and samples
from all of them exactly as it would from N real nodes, so client sampling (and client-level DP's
sampling rate) is unchanged.  Each message is then sent to a free physical node with the logical
client's ``partition-id`` written into its ``config`` record; the ClientApp plays that client: its
data, its seed and its own privacy ledger (ledgers are keyed by the client's name, not by the
node).  Replies come back under the logical node's id.  There are only as many physical nodes as
clients train per round; a step addressing more clients than there are nodes (client evaluation
of the whole population, say) waits for a node to free up, so two clients never share a node at the
same time.  That holds across steps too: a node whose reply missed a step's timeout is still busy
with that client (Flower's Simulation Engine would otherwise run both at once on one node, and its
late context would overwrite the new one's), so it gets no new message until its late reply comes
back (then discarded) or one more step timeout has passed.  Flower has no such mode; this is our
own.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from privet.common.protocol import CONFIG, PARTITION_ID
from privet.server.flower_door import NodeInfo, set_src_node_id
from privet.server.loop import WrappedGrid, send_and_receive

__all__ = ["PARTITION_KEY", "PopulationGrid"]

log = logging.getLogger("privet")

#: The config key that names the logical client a message is for (the ClientApp reads it).
PARTITION_KEY = PARTITION_ID


class PopulationGrid(WrappedGrid):
    """Show ``population`` logical clients to the strategy; deliver on the wrapped grid's nodes.

    Parameters
    ----------
    inner
        The grid whose nodes play the clients (the Simulation Engine's).
    population
        Number of logical clients (partition ids ``0..population-1``).
    nodes
        Physical nodes to wait for before the population counts as connected.

    """

    owns_delivery = True

    def __init__(self, inner: Grid, *, population: int, nodes: int, poll: float = 0.25) -> None:
        if population < 1 or nodes < 1:
            raise ValueError("population and nodes must be >= 1")
        self.inner = inner
        self.population = population
        self.nodes = nodes
        self.poll = poll
        #: Messages of earlier steps still unanswered: message id -> (node, when to stop waiting).
        self.late: dict[str, tuple[int, float]] = {}

    def get_node_ids(self) -> Iterable[int]:
        """All logical clients once the physical nodes are up, else none."""
        if len(list(self.inner.get_node_ids())) < self.nodes:
            return []
        return range(1, self.population + 1)

    def get_nodes(self) -> Iterable[NodeInfo]:
        """None: the logical clients are not Flower nodes (they are named by partition id)."""
        return []

    def busy_nodes(self) -> set[int]:
        """Physical nodes still working on a message whose step gave up on it."""
        return {node for node, _ in self.late.values()}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send each message to an idle node as its logical client; replies under logical ids."""
        pending = deque(messages)
        physical = sorted(self.inner.get_node_ids())
        if not physical or not pending:
            return []
        step = timeout if timeout is not None else 3600.0
        end = time.monotonic() + step
        if getattr(self.inner, "owns_delivery", False):
            # A grid that delivers synchronously (the in-process engine) has no late replies.
            return self._in_waves(pending, physical, end)
        in_flight: dict[str, tuple[int, int]] = {}  # message id -> (node, logical client)
        replies: list[Message] = []
        while (pending or in_flight) and time.monotonic() < end:
            self._reap_late()
            taken = self.busy_nodes() | {node for node, _ in in_flight.values()}
            placed = [
                (node, pending.popleft()) for node in physical if node not in taken and pending
            ]
            if placed:
                out = [self._address(msg, node) for node, msg in placed]
                ids = list(self.inner.push_messages([msg for msg, _ in out]))
                for mid, (_, logical), (node, _) in zip(ids, out, placed, strict=True):
                    in_flight[mid] = (node, logical)
            if in_flight:
                for reply in self.inner.pull_messages(list(in_flight)):
                    found = in_flight.pop(reply.metadata.reply_to_message_id, None)
                    if found is not None:
                        set_src_node_id(reply, found[1])
                        replies.append(reply)
            if pending or in_flight:
                time.sleep(self.poll)
        # Unanswered messages keep their nodes busy for at most one more step of this length.
        for mid, (node, _) in in_flight.items():
            self.late[mid] = (node, time.monotonic() + step)
        if in_flight or pending:
            log.warning(
                "%d clients did not reply and %d were not sent (no idle node) within %.0f s; "
                "busy nodes: %s",
                len(in_flight),
                len(pending),
                step,
                sorted(self.busy_nodes()),
            )
        return replies

    def _reap_late(self) -> None:
        """Free the nodes whose late replies came back (discarded) or whose wait ran out."""
        if not self.late:
            return
        for reply in self.inner.pull_messages(list(self.late)):
            self.late.pop(reply.metadata.reply_to_message_id, None)
        now = time.monotonic()
        for mid in [mid for mid, (_, until) in self.late.items() if until <= now]:
            del self.late[mid]

    def _address(self, msg: Message, node: int) -> tuple[Message, int]:
        """Point ``msg`` at physical ``node``, naming its logical client; returns (msg, client)."""
        logical = msg.metadata.dst_node_id
        if not 1 <= logical <= self.population:
            raise ValueError(f"message for node {logical}, not a client of this population")
        # Strategies address one content object to many nodes: give each message its own
        # RecordDict and config record (never write into the shared one).
        content = RecordDict(dict(msg.content.items()))
        config = msg.content.config_records.get(CONFIG)
        conf = ConfigRecord(dict(config.items()) if config is not None else {})
        conf[PARTITION_KEY] = logical - 1
        content[CONFIG] = conf
        msg.content = content
        msg.metadata.dst_node_id = node
        return msg, logical

    def _in_waves(self, pending: deque[Message], physical: list[int], end: float) -> list[Message]:
        """Synchronous delivery: at most one message per node per call of the inner grid."""
        replies: list[Message] = []
        while pending and (left := end - time.monotonic()) > 0:
            wave = [self._address(pending.popleft(), node) for node in physical[: len(pending)]]
            logical_of = {msg.metadata.dst_node_id: logical for msg, logical in wave}
            got = list(send_and_receive(self.inner, [m for m, _ in wave], timeout=left))
            for reply in got:
                set_src_node_id(reply, logical_of.get(reply.metadata.src_node_id, 0))
            replies.extend(got)
        if pending:
            log.warning("%d messages not sent: the step's time ran out", len(pending))
        return replies

    # -- the wrapped grid's run and messages; no direct push or pull -----------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        raise NotImplementedError("PopulationGrid delivers messages itself: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        raise NotImplementedError("PopulationGrid delivers messages itself: use send_and_receive")
