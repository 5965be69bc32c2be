"""A resumed coordinator continues exactly like an uninterrupted one: optimizer state and sampling.

Hand-made arrays and replies drive the strategies directly (no processes): the run is cut after
round 2, a fresh strategy is restored from the state ``save_server_state`` wrote, and rounds 3-4
must give bit-identical aggregates and the same sampled clients as the run that never stopped.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg, Strategy

from privet.common.config import AggregationConfig, ClientLevelConfig, FederationConfig
from privet.common.errors import DeploymentError
from privet.common.privacy.federation import plan_federation
from privet.server.privacy import ClientLevelDP
from privet.server.recording import RecordingStrategy
from privet.server.resume import restore_server_state, save_server_state, server_state_path
from privet.server.strategies import build_strategy
from tests.flower_fakes import NodesGrid, arrays, reply, run_identity

NODES = list(range(101, 109))  # eight connected nodes
CUT = 2  # the coordinator dies after this round
ROUNDS = 4


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with run_identity():
        yield


def _strategy(name: str) -> Strategy:
    fed = FederationConfig(
        strategy=name,  # type: ignore[arg-type]
        fraction_train=0.5,
        min_train_clients=2,
        fraction_evaluate=0.0,
        min_available_clients=2,
    )
    inner = build_strategy(fed, num_clients=len(NODES), aggregation=AggregationConfig())
    return RecordingStrategy(inner, client_names=[f"site-{i}" for i in range(len(NODES))])


def _update(server_round: int, node: int) -> np.ndarray:
    # Different per round and node, so moments and momentum really accumulate.
    rng = np.random.default_rng(1000 * server_round + node)
    return rng.normal(0.0, 0.1, size=6).astype(np.float32)


def _rounds(
    strategy: Strategy, start: ArrayRecord, first: int, last: int, *, save_to: Path | None = None
) -> tuple[ArrayRecord, list[tuple[list[int], np.ndarray]]]:
    """Rounds ``first..last`` with hand-made replies; (final arrays, [(sampled nodes, aggregate)])."""
    grid = NodesGrid(NODES)
    current = start
    seen: list[tuple[list[int], np.ndarray]] = []
    for rnd in range(first, last + 1):
        msgs = list(strategy.configure_train(rnd, current, ConfigRecord(), grid))
        nodes = sorted(m.metadata.dst_node_id for m in msgs)
        base = current["w"].numpy()
        replies = [reply(n, {"w": base + _update(rnd, n)}, n=10 + n % 3) for n in nodes]
        out, _ = strategy.aggregate_train(rnd, replies)
        assert out is not None
        current = out
        seen.append((nodes, current["w"].numpy().copy()))
        if save_to is not None:
            save_server_state(save_to, rnd, strategy)
    return current, seen


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedavg"])
def test_resumed_strategy_matches_the_uninterrupted_one(name: str, tmp_path: Path) -> None:
    crashed = tmp_path / "crashed"
    for d in (tmp_path, crashed):
        (d / "checkpoints").mkdir(parents=True)
    start = arrays({"w": np.linspace(-1, 1, 6)})
    random.seed(7)
    _, straight = _rounds(_strategy(name), start, 1, ROUNDS, save_to=tmp_path)

    # The crashed run: rounds 1..CUT, its state saved after each round, then the process is gone.
    random.seed(7)
    cut_arrays, before = _rounds(_strategy(name), start, 1, CUT, save_to=crashed)
    assert [n for n, _ in before] == [n for n, _ in straight[:CUT]]

    random.seed(12345)  # a new process: another RNG state until the restore
    fresh = _strategy(name)
    restore_server_state(crashed, CUT, fresh)
    _, after = _rounds(fresh, cut_arrays, CUT + 1, ROUNDS)
    for (nodes, agg), (nodes_ref, agg_ref) in zip(after, straight[CUT:], strict=True):
        assert nodes == nodes_ref
        np.testing.assert_array_equal(agg, agg_ref)

    # Without the restore the resumed run samples other clients (and the optimizers drift).
    random.seed(12345)
    _, unrestored = _rounds(_strategy(name), cut_arrays, CUT + 1, ROUNDS)
    assert [n for n, _ in unrestored] != [n for n, _ in straight[CUT:]]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_optimizer_state_alone_makes_the_difference(name: str, tmp_path: Path) -> None:
    # Same clients every round (all of them): only the restored moments/momentum can match.
    (tmp_path / "checkpoints").mkdir()
    start = arrays({"w": np.linspace(-1, 1, 6)})
    fed = FederationConfig(strategy=name, fraction_train=1.0, fraction_evaluate=0.0)  # type: ignore[arg-type]

    def build() -> Strategy:
        return build_strategy(fed, num_clients=len(NODES), aggregation=AggregationConfig())

    _, straight = _rounds(build(), start, 1, ROUNDS)
    cut, _ = _rounds(build(), start, 1, CUT, save_to=tmp_path)
    restored = build()
    restore_server_state(tmp_path, CUT, restored)
    _, resumed = _rounds(restored, cut, CUT + 1, ROUNDS)
    _, reset = _rounds(build(), cut, CUT + 1, ROUNDS)
    for (_, agg), (_, ref), (_, bad) in zip(resumed, straight[CUT:], reset, strict=True):
        np.testing.assert_array_equal(agg, ref)
        assert not np.allclose(bad, ref)


def test_adaptive_clip_and_federation_report_are_restored(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    cl = ClientLevelConfig(
        enabled=True, noise_multiplier=1.0, clipping_norm=1.0, clipping="adaptive"
    )

    def build() -> ClientLevelDP:
        fed = FederationConfig(rounds=ROUNDS, min_train_clients=8, min_available_clients=8)
        mech = plan_federation(cl, fed, num_clients=len(NODES))
        inner = FedAvg(min_train_nodes=8, min_available_nodes=8, fraction_evaluate=0)
        return ClientLevelDP(inner, cl=cl, mechanism=mech, ledger_path=tmp_path / "fed.json")

    dp = build()
    _rounds(dp, arrays({"w": np.zeros(6)}), 1, CUT, save_to=tmp_path)
    clip = dp.dp.clipping_norm  # type: ignore[attr-defined]
    assert clip != 1.0  # the clip did adapt
    fresh = build()
    restore_server_state(tmp_path, CUT, fresh)
    assert fresh.dp.clipping_norm == clip  # type: ignore[attr-defined]
    assert fresh.rounds == dp.rounds and len(fresh.rounds) == CUT


class _HomeMadeAvg(FedAvg):
    """A strategy privet has no resume knowledge of."""


def test_an_unknown_strategy_is_refused(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    strategy = RecordingStrategy(_HomeMadeAvg(), client_names=[])
    save_server_state(tmp_path, 1, strategy)
    with pytest.raises(DeploymentError, match="_HomeMadeAvg") as info:
        restore_server_state(tmp_path, 1, strategy)
    assert "\n" not in str(info.value)


def test_missing_state_refuses_a_stateful_strategy_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(DeploymentError, match=r"FedAdam.*round 3"):
        restore_server_state(tmp_path, 3, _strategy("fedadam"))
    with caplog.at_level(logging.WARNING, logger="privet"):
        restore_server_state(tmp_path, 3, _strategy("fedavg"))
    assert "no saved server state" in caplog.text


def test_a_changed_strategy_is_refused(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    save_server_state(tmp_path, 1, _strategy("fedadam"))
    assert server_state_path(tmp_path, 1).exists()
    with pytest.raises(DeploymentError, match="config.toml"):
        restore_server_state(tmp_path, 1, _strategy("fedyogi"))
