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
of the whole population, say) runs in waves of at most one message per node, so two clients never
share a node at the same time.  Flower has no such mode; this is our own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from privet.server.loop import WrappedGrid, send_and_receive

__all__ = ["PARTITION_KEY", "PopulationGrid"]

log = logging.getLogger("privet")

#: The config key that names the logical client a message is for (the ClientApp reads it).
PARTITION_KEY = "partition-id"


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

    def __init__(self, inner: Grid, *, population: int, nodes: int) -> None:
        if population < 1 or nodes < 1:
            raise ValueError("population and nodes must be >= 1")
        self.inner = inner
        self.population = population
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        """All logical clients once the physical nodes are up, else none."""
        if len(list(self.inner.get_node_ids())) < self.nodes:
            return []
        return range(1, self.population + 1)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send each message to a free node as its logical client; replies under logical ids."""
        pending = list(messages)
        physical = sorted(self.inner.get_node_ids())
        if not physical:
            return []
        end = time.monotonic() + (timeout if timeout is not None else 3600.0)
        replies: list[Message] = []
        waves = 0
        while pending and (left := end - time.monotonic()) > 0:
            wave, pending = pending[: len(physical)], pending[len(physical) :]
            logical_of: dict[int, int] = {}
            out = []
            for node, msg in zip(physical, wave, strict=False):
                logical = msg.metadata.dst_node_id
                if not 1 <= logical <= self.population:
                    raise ValueError(f"message for node {logical}, not a client of this population")
                # Strategies address one content object to many nodes: give each message its own
                # RecordDict and config record (never write into the shared one).
                content = RecordDict(dict(msg.content.items()))
                config = msg.content.config_records.get("config")
                conf = ConfigRecord(dict(config.items()) if config is not None else {})
                conf[PARTITION_KEY] = logical - 1
                content["config"] = conf
                msg.content = content
                msg.metadata.dst_node_id = node
                logical_of[node] = logical
                out.append(msg)
            got = list(send_and_receive(self.inner, out, timeout=left))
            for reply in got:
                _set_src_node_id(reply, logical_of.get(reply.metadata.src_node_id, 0))
            replies.extend(got)
            waves += 1
        if pending:
            log.warning(
                "%d messages not sent: the step's time ran out after %d waves", len(pending), waves
            )
        return replies

    # -- the wrapped grid's run and messages; no direct push or pull -----------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        raise NotImplementedError("PopulationGrid delivers messages itself: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        raise NotImplementedError("PopulationGrid delivers messages itself: use send_and_receive")


def _set_src_node_id(reply: Message, node_id: int) -> None:
    # Flower's Metadata has no setter for the sender (a deployed reply's sender is authenticated);
    # here the sender *is* a stand-in, and the strategy and the reply checks must see the client.
    reply.metadata.__dict__["_src_node_id"] = node_id
