"""A population larger than the Flower nodes that play it (server/population.py)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from privet.common.config import load_config
from privet.server.population import PARTITION_KEY, PopulationGrid
from privet.server.rundir import read_metrics
from privet.simulations import simulate
from privet.simulations.run import simulated_nodes
from tests.flower_fakes import NodesGrid, run_identity


class _EchoGrid:
    """Physical nodes 101..103 that answer every message at once with the partition they played."""

    owns_delivery = True

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, int]]] = []

    def get_node_ids(self) -> list[int]:
        return [101, 102, 103]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        self.calls.append(
            [
                (m.metadata.dst_node_id, int(m.content.config_records["config"][PARTITION_KEY]))
                for m in messages
            ]
        )
        replies = []
        for m in messages:
            pid = int(m.content.config_records["config"][PARTITION_KEY])
            reply = Message(
                RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=m
            )
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            replies.append(reply)
        return replies


def test_messages_go_out_in_waves_as_their_logical_clients() -> None:
    inner = _EchoGrid()
    grid = PopulationGrid(inner, population=7, nodes=3)  # type: ignore[arg-type]
    assert list(grid.get_node_ids()) == [1, 2, 3, 4, 5, 6, 7]
    with run_identity():
        shared = RecordDict({"config": ConfigRecord({"server-round": 1})})
        logical = [7, 2, 5, 1, 4]
        msgs = [Message(shared, dst_node_id=n, message_type="train") for n in logical]
        replies = list(grid.send_and_receive(msgs, timeout=10))
    # Two waves, one message per physical node in each, each carrying its client's partition.
    assert inner.calls == [[(101, 6), (102, 1), (103, 4)], [(101, 0), (102, 3)]]
    # The strategy sees the logical sender; the content shared by all messages is untouched.
    assert [r.metadata.src_node_id for r in replies] == logical
    assert [int(r.content.metric_records["metrics"]["partition-id"]) for r in replies] == [
        6,
        1,
        4,
        0,
        3,
    ]
    assert PARTITION_KEY not in shared.config_records["config"]


class _QueueGrid(NodesGrid):
    """Flower's push/pull grid with nodes 101 and 102; clients in ``held`` answer only when freed.

    It fails the test if a node is handed a message while it still owes a reply, which Flower's
    Simulation Engine would accept (and run both clients at once on that node).
    """

    def __init__(self) -> None:
        super().__init__([101, 102])
        self.held: set[int] = set()
        self.owed: dict[str, tuple[int, int]] = {}  # message id -> (node, partition)
        self.pushed: list[tuple[int, int]] = []  # (node, partition) in push order
        self.allow_reuse = False
        self._n = 0

    def push_messages(self, messages):  # type: ignore[no-untyped-def,override]
        ids = []
        for m in messages:
            node = m.metadata.dst_node_id
            pid = int(m.content.config_records["config"][PARTITION_KEY])
            busy = {n for n, _ in self.owed.values()}
            assert self.allow_reuse or node not in busy, f"node {node} reused while busy"
            self._n += 1
            m.metadata.__dict__["_message_id"] = mid = f"m{self._n}"
            self.owed[mid] = (node, pid)
            self.pushed.append((node, pid))
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def,override]
        out = []
        for mid in list(message_ids):
            if mid not in self.owed or self.owed[mid][1] in self.held:
                continue
            node, pid = self.owed.pop(mid)
            ins = Message(RecordDict(), dst_node_id=node, message_type="train")
            ins.metadata.__dict__["_message_id"] = mid
            reply = Message(RecordDict({"metrics": MetricRecord({"pid": pid})}), reply_to=ins)
            reply.metadata.__dict__["_src_node_id"] = node
            out.append(reply)
        return out


def _train(*clients: int) -> list[Message]:
    shared = RecordDict({"config": ConfigRecord({"server-round": 1})})
    return [Message(shared, dst_node_id=c, message_type="train") for c in clients]


def _pids(replies: Iterable[Message]) -> list[int]:
    return [int(r.content.metric_records["metrics"]["pid"]) for r in replies]


def test_each_node_plays_one_client_at_a_time_and_takes_the_next_when_free() -> None:
    inner = _QueueGrid()
    grid = PopulationGrid(inner, population=9, nodes=2, poll=0.001)  # type: ignore[arg-type]
    with run_identity():
        replies = list(grid.send_and_receive(_train(3, 9, 1, 4, 7), timeout=10))
    assert sorted(_pids(replies)) == [0, 2, 3, 6, 8]
    # the strategy sees each reply from its logical client (partition + 1)
    assert all(
        r.metadata.src_node_id == p + 1 for r, p in zip(replies, _pids(replies), strict=True)
    )
    assert [p for _, p in inner.pushed] == [2, 8, 0, 3, 6]
    assert grid.busy_nodes() == set()


def test_a_node_whose_reply_is_late_gets_no_new_client_until_it_answers() -> None:
    inner = _QueueGrid()
    grid = PopulationGrid(inner, population=9, nodes=2, poll=0.001)  # type: ignore[arg-type]
    inner.held = {2}  # client 3 (partition 2) is a straggler on node 101
    with run_identity():
        first = list(grid.send_and_receive(_train(3, 5), timeout=0.2))
        assert _pids(first) == [4]
        assert grid.busy_nodes() == {101}
        # The next step: node 101 still owes client 3's reply, so node 102 plays both clients,
        # one after the other (the fake grid fails the test on any reuse of a busy node).
        second = list(grid.send_and_receive(_train(6, 8), timeout=10))
        assert sorted(_pids(second)) == [5, 7]
        assert inner.pushed[2:] == [(102, 5), (102, 7)]
        # Client 3's late reply arrives: it is discarded (its step is over) and 101 is free.
        inner.held = set()
        third = list(grid.send_and_receive(_train(2, 4), timeout=10))
    assert sorted(_pids(third)) == [1, 3]
    assert {node for node, _ in inner.pushed[4:]} == {101, 102}
    assert grid.busy_nodes() == set()


def test_a_node_that_never_answers_is_given_up_after_one_more_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inner = _QueueGrid()
    grid = PopulationGrid(inner, population=4, nodes=2, poll=0.001)  # type: ignore[arg-type]
    inner.held = {0, 1}  # both nodes stall
    with run_identity(), caplog.at_level("WARNING", logger="privet"):
        assert list(grid.send_and_receive(_train(1, 2), timeout=0.05)) == []
        assert grid.busy_nodes() == {101, 102}
        assert "busy nodes: [101, 102]" in caplog.text
        # No idle node: the step sends nothing within its time (bounded, no hang)...
        assert list(grid.send_and_receive(_train(3), timeout=0.02)) == []
        assert len(inner.pushed) == 2
        # ...and once one more step timeout (0.05 s) has passed since, the nodes are used again.
        inner.allow_reuse = True
        replies = list(grid.send_and_receive(_train(3, 4), timeout=10))
    assert sorted(_pids(replies)) == [2, 3]


def test_no_logical_clients_until_the_nodes_are_up() -> None:
    inner = _EchoGrid()
    assert list(PopulationGrid(inner, population=9, nodes=4).get_node_ids()) == []  # type: ignore[arg-type]


def test_node_count_follows_the_clients_that_train() -> None:
    base = [
        "data.num_clients=1000",
        "federation.fraction_train=0.01",
        "federation.min_train_clients=10",
    ]
    ray = load_config(None, [*base, "simulation.num_cpus=2"])
    assert simulated_nodes(ray, 1000) == 10
    assert (
        simulated_nodes(load_config(None, [*base, "simulation.nodes='population'"]), 1000) == 1000
    )
    # never fewer nodes than Ray runs at once
    wide = load_config(
        None,
        [
            *base,
            "simulation.num_cpus=16",
            "federation.min_train_clients=2",
            "federation.fraction_train=0.002",
        ],
    )
    assert simulated_nodes(wide, 1000) == 16
    inproc = load_config(None, [*base, "simulation.engine='inprocess'"])
    assert simulated_nodes(inproc, 1000) == 10


def test_a_population_of_six_played_by_two_nodes_keeps_every_clients_own_ledger(
    tmp_path: Path,
) -> None:
    cfg = load_config(
        None,
        [
            "model.num_hidden_layers=1",
            "model.max_length=32",
            "data.max_examples=360",
            "data.num_clients=6",
            "data.server_test_fraction=0.2",
            "federation.rounds=3",
            "federation.fraction_train=0.34",
            "federation.fraction_evaluate=0",
            "federation.server_evaluation=false",
            "train.local_epochs=0.5",
            "train.batch_size=16",
            "train.num_threads=1",
            "privacy.target_epsilon=8",
            "simulation.engine='inprocess'",
            f"simulation.output_dir='{tmp_path}'",
            "simulation.run_name='pop'",
        ],
    )
    assert simulated_nodes(cfg, 6) == 2
    random.seed(12345)
    caller = random.getstate()
    run_dir = simulate(cfg)
    assert random.getstate() == caller  # the simulation gave the caller's RNG back
    records = read_metrics(run_dir)[1:]
    trained = [r["clients_trained"] for r in records]
    # a simulation samples its clients from train.seed (0): the same clients on every run
    assert trained == [["client-3", "client-5"], ["client-0", "client-2"], ["client-4", "client-3"]]
    assert all(len(t) == 2 and len(set(t)) == 2 for t in trained)
    names = {n for t in trained for n in t}
    assert len(names) > 2  # two nodes played more than two clients
    # Each client's ledger counts exactly the rounds that client trained, and the epsilon it
    # reported is its own cumulative one (it grows only in the rounds it took part in).
    for name in names:
        rounds = [r["round"] for r in records if name in r["clients_trained"]]
        ledger = json.loads((run_dir / "clients" / f"ledger-{name}.json").read_text())
        assert [e["round"] for e in ledger["entries"]] == rounds
        eps = [r["epsilon_per_client"][name] for r in records if name in r["clients_trained"]]
        assert eps == [e["epsilon_after"] for e in ledger["entries"]]
        assert eps == sorted(eps) and eps[-1] <= 8.0
    ledgers = {p.name for p in (run_dir / "clients").glob("ledger-*.json")}
    assert ledgers == {f"ledger-{n}.json" for n in names}
