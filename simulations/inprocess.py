"""One process, no Ray: the ServerApp and ClientApp objects talking through a grid that calls them.

For small studies, tests and debugging (``simulation.engine = "inprocess"``): clients run one after
another in this process, so a run is deterministic and starts in a second instead of Ray's 15-25.
The apps are the same objects ``privet simulate`` gives Flower's Simulation Engine; only delivery
differs. Flower's own in-memory grid needs its SuperLink state machinery; this one only delivers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from privet.common.protocol import NUM_PARTITIONS, PARTITION_ID
from privet.server.flower_door import set_task_node, task_identity

__all__ = ["InProcessGrid", "run_in_process"]

SERVER_NODE = 0


@contextmanager
def _task_identity(run_id: int) -> Iterator[None]:
    # Flower's Message() stamps the run and node of the current task; outside a Flower process
    # nobody has set them, so the driver sets them (and restores them afterwards).
    with task_identity(run_id, SERVER_NODE):
        yield


class InProcessGrid(Grid):
    """A grid whose nodes ``1..num_nodes`` are ``client_app`` with ``partition-id = node - 1``.

    ``send_and_receive`` delivers each message by calling the ClientApp and returns the replies;
    ``timeout`` is not enforced (a client that is late is simulated by the fault plan instead).
    """

    def __init__(self, client_app: ClientApp, *, num_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self.run_id = run_id
        self.contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config={PARTITION_ID: node - 1, NUM_PARTITIONS: num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node in range(1, num_nodes + 1)
        }

    def get_node_ids(self) -> list[int]:  # type: ignore[override]
        """The node ids, ``1..num_nodes``."""
        return list(self.contexts)

    #: server/loop.py calls send_and_receive: this grid delivers by calling the ClientApp.
    owns_delivery = True

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:  # type: ignore[override]
        """Deliver each message to its node's ClientApp, in order; return the replies."""
        replies = []
        for msg in messages:
            # A real transport gives every node its own copy. Config records are copied (they are
            # small): Flower's secaggplus_mod pops its stage key from a record the server addresses
            # to every node. Arrays are shared, read-only by convention.
            msg.content = RecordDict(
                {
                    k: ConfigRecord(dict(v.items())) if isinstance(v, ConfigRecord) else v
                    for k, v in msg.content.items()
                }
            )
            node = msg.metadata.dst_node_id
            set_task_node(node)
            try:
                replies.append(self.client_app(msg, self.contexts[node]))
            finally:
                set_task_node(SERVER_NODE)
        return replies

    # The rest of Grid's interface is not needed by privet's server loop.
    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        """Not used in process."""
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def,override]
        """Not used in process."""
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        """Not used in process."""
        raise NotImplementedError

    def get_nodes(self):  # type: ignore[no-untyped-def,override]
        """Not used in process."""
        raise NotImplementedError

    def push_messages(self, messages):  # type: ignore[no-untyped-def,override]
        """Not used in process."""
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def,override]
        """Not used in process."""
        raise NotImplementedError


def run_in_process(server_app: ServerApp, client_app: ClientApp, *, num_nodes: int) -> None:
    """Run ``server_app`` to the end with ``num_nodes`` in-process clients."""
    with _task_identity(run_id=1):
        grid = InProcessGrid(client_app, num_nodes=num_nodes)
        context = Context(
            run_id=1, node_id=SERVER_NODE, node_config={}, state=RecordDict(), run_config={}
        )
        server_app(grid, context)
