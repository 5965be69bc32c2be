"""One process, no Ray: the ServerApp and ClientApp objects talking through a grid that calls them.

For small studies, tests, debugging and GPU machines (``simulation.engine = "inprocess"``): clients
run one after another in this process, so a run is deterministic and starts in a second instead of
Ray's 15-25. The apps are the same objects ``privet simulate`` gives Flower's Simulation Engine;
only delivery differs. Flower's own in-memory grid needs its SuperLink state machinery; this one
only delivers. Every virtual client and the ServerApp's evaluation share one base model
(``common/model_pool.py``); only adapters, optimizer state and data change per client.

With CUDA devices and ``simulation.gpus_per_client > 0`` the clients of a round run in parallel
"lanes" (threads), placed by :func:`lane_devices`: each lane holds one base model on its device
and takes the next message when it is free; replies come back in message order, so the server sees
what it sees when the clients run one after another, and so do the numbers (each client's sampling,
noise and dropout are seeded per client and round).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from privet.common.config import PrivetConfig
from privet.common.errors import ConfigError
from privet.common.model_pool import Placement, normal_device, placed
from privet.common.modeling import pick_device
from privet.common.protocol import NUM_PARTITIONS, PARTITION_ID
from privet.server.flower_door import set_task_node, task_identity

__all__ = ["InProcessGrid", "engine_lanes", "lane_devices", "run_in_process"]

SERVER_NODE = 0


@contextmanager
def _task_identity(run_id: int) -> Iterator[None]:
    # Flower's Message() stamps the run and node of the current task; outside a Flower process
    # nobody has set them, so the driver sets them (and restores them afterwards).
    with task_identity(run_id, SERVER_NODE):
        yield


def lane_devices(num_gpus: int, gpus_per_client: float) -> list[str]:
    """The devices of the in-process engine's lanes (``[]``: no lanes, clients run one after another).

    Each GPU takes ``floor(1 / gpus_per_client)`` lanes, filled one GPU after the other, so that a
    client's share never spans two GPUs (Ray packs fractional GPUs the same way): lane ``i`` runs
    on ``cuda:(i // lanes_per_gpu)``. When ``1 / gpus_per_client`` is a whole number this is
    ``floor(num_gpus / gpus_per_client)`` lanes with lane ``i`` on ``cuda:floor(i * gpus_per_client)``.

    Parameters
    ----------
    num_gpus
        CUDA devices the run may use (0: none visible, or the model runs on the CPU).
    gpus_per_client
        ``simulation.gpus_per_client``: 0 (no lanes), or a share of one GPU, at most 1.

    Raises
    ------
    ConfigError
        When ``gpus_per_client`` is above 1: one client runs on one device in this process.

    """
    if gpus_per_client > 1:
        raise ConfigError(
            f"simulation.gpus_per_client = {gpus_per_client:g} with simulation.engine = "
            "'inprocess': the in-process engine runs one client on one device",
            fix="set simulation.gpus_per_client to at most 1 (1: one client per GPU, 0.5: two), "
            "or use simulation.engine = 'ray'",
        )
    if num_gpus < 1 or gpus_per_client <= 0:
        return []
    # 1e-9: a share like 1/3 typed as 0.3333333333333333 is three lanes, not two.
    per_gpu = max(1, math.floor(1 / gpus_per_client + 1e-9))
    return [f"cuda:{i // per_gpu}" for i in range(num_gpus * per_gpu)]


def engine_lanes(cfg: PrivetConfig) -> list[str] | None:
    """The lanes of an in-process run of ``cfg`` on this machine (``None``: one after another)."""
    gpus = torch.cuda.device_count() if pick_device(cfg.model.device).type == "cuda" else 0
    return lane_devices(gpus, cfg.simulation.gpus_per_client) or None


def _placements(devices: Sequence[str | torch.device]) -> list[Placement]:
    """One placement per lane: its device, and which of that device's base models it uses."""
    seen: dict[str, int] = {}
    out = []
    for d in devices:
        device = normal_device(d)
        replica = seen.get(str(device), 0)
        seen[str(device)] = replica + 1
        out.append(Placement(device, replica))
    return out


class InProcessGrid(Grid):
    """A grid whose nodes ``1..num_nodes`` are ``client_app`` with ``partition-id = node - 1``.

    ``send_and_receive`` delivers each message by calling the ClientApp and returns the replies,
    in message order; ``timeout`` is not enforced (a client that is late is simulated by the fault
    plan instead). With ``devices`` (more than one) the messages run on that many lanes at once.
    """

    def __init__(
        self,
        client_app: ClientApp,
        *,
        num_nodes: int,
        run_id: int = 1,
        devices: Sequence[str | torch.device] | None = None,
    ) -> None:
        self.client_app = client_app
        self.run_id = run_id
        self.lanes = _placements(devices or [])
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
        """Deliver each message to its node's ClientApp; return the replies in message order."""
        msgs = [self._own_copy(msg) for msg in messages]
        if len(self.lanes) > 1:
            return self._on_lanes(msgs)
        lane = placed(self.lanes[0]) if self.lanes else nullcontext()
        replies = []
        with lane:
            for msg in msgs:
                node = msg.metadata.dst_node_id
                set_task_node(node)
                try:
                    replies.append(self.client_app(msg, self.contexts[node]))
                finally:
                    set_task_node(SERVER_NODE)
        return replies

    @staticmethod
    def _own_copy(msg: Message) -> Message:
        # A real transport gives every node its own copy. Config records are copied (they are
        # small): Flower's secaggplus_mod pops its stage key from a record the server addresses
        # to every node. Arrays are shared, read-only by convention.
        msg.content = RecordDict(
            {
                k: ConfigRecord(dict(v.items())) if isinstance(v, ConfigRecord) else v
                for k, v in msg.content.items()
            }
        )
        return msg

    def _on_lanes(self, msgs: list[Message]) -> list[Message]:
        """Run ``msgs`` on the lanes, each lane taking the next node's messages when it is free.

        A node's messages run in order, on one lane (its Context, e.g. SecAgg+'s keys, is its
        own); different nodes' run in parallel. The lanes do not set Flower's task identity (a
        class-level singleton, set_task_node): a reply takes its run and nodes from the message it
        answers (``Message(reply_to=...)``), and no client code creates any other message.
        """
        chains: dict[int, list[int]] = {}
        for i, msg in enumerate(msgs):
            chains.setdefault(msg.metadata.dst_node_id, []).append(i)
        work: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        for chain in chains.values():
            work.put(chain)
        replies: list[Message | None] = [None] * len(msgs)
        failures: list[BaseException] = []
        stop = threading.Event()

        def lane(where: Placement) -> None:
            device = (
                torch.cuda.device(where.device) if where.device.type == "cuda" else nullcontext()
            )
            with placed(where), device:
                while not stop.is_set():
                    try:
                        chain = work.get_nowait()
                    except queue.Empty:
                        return
                    for i in chain:
                        node = msgs[i].metadata.dst_node_id
                        replies[i] = self.client_app(msgs[i], self.contexts[node])

        def guarded(where: Placement) -> None:
            try:
                lane(where)
            except BaseException as exc:  # handed to the caller's thread below
                failures.append(exc)
                stop.set()

        threads = [
            threading.Thread(target=guarded, args=(where,), name=f"privet-lane-{k}")
            for k, where in enumerate(self.lanes[: len(chains)])
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # Ctrl-C: no lane starts another client; wait for the running ones
            stop.set()
            for t in threads:
                t.join()
            raise
        if failures:
            raise failures[0]
        return [r for r in replies if r is not None]

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


def run_in_process(
    server_app: ServerApp,
    client_app: ClientApp,
    *,
    num_nodes: int,
    devices: Sequence[str | torch.device] | None = None,
) -> None:
    """Run ``server_app`` to the end with ``num_nodes`` in-process clients.

    ``devices``: one lane per entry (:func:`engine_lanes`; tests give ``["cpu", "cpu"]``); none,
    the clients run one after another on the configured device.
    """
    with _task_identity(run_id=1):
        grid = InProcessGrid(client_app, num_nodes=num_nodes, devices=devices)
        context = Context(
            run_id=1, node_id=SERVER_NODE, node_config={}, state=RecordDict(), run_config={}
        )
        server_app(grid, context)
