"""Hand-made Flower messages and a grid that only lists nodes, for driving strategies in tests."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


@contextmanager
def run_identity(run_id: int = 1) -> Iterator[None]:
    """Flower's Message() reads the run id of the current task; set one (and restore it)."""
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = run_id
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


class NodesGrid(Grid):
    """Only ``get_node_ids`` works: enough for a strategy's ``configure_train``."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:  # type: ignore[override]
        return list(self.nodes)

    def set_run(self, run):  # type: ignore[no-untyped-def,override]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def,override]
        raise NotImplementedError

    def create_message(self, *a, **k):  # type: ignore[no-untyped-def,override]
        raise NotImplementedError

    def get_nodes(self):  # type: ignore[no-untyped-def,override]
        raise NotImplementedError

    def push_messages(self, messages):  # type: ignore[no-untyped-def,override]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def,override]
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def,override]
        raise NotImplementedError


def arrays(values: dict[str, list[float] | np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def instruction(node: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")


def reply(
    node: int,
    values: dict[str, list[float] | np.ndarray] | ArrayRecord,
    *,
    n: int = 1,
    partition: int | None = None,
    extra: dict[str, float] | None = None,
) -> Message:
    """A train reply from ``node`` holding ``values`` and ``num-examples = n``."""
    metrics: dict[str, float | int] = {"num-examples": n, "train-loss": 0.5}
    if partition is not None:
        metrics["partition-id"] = partition
    metrics.update(extra or {})
    rec = values if isinstance(values, ArrayRecord) else arrays(values)
    TaskIdentity.node_id = node  # a reply's source is the node of the current task
    return Message(
        RecordDict({"arrays": rec, "metrics": MetricRecord(metrics)}), reply_to=instruction(node)
    )
