"""Client-level DP (DP-FedAvg): mechanism, fixed denominator, accounting, budget stop, config."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore.task_identity import TaskIdentity

from privet.common.config import ClientLevelConfig, FederationConfig, PrivetConfig, load_config
from privet.common.errors import ConfigError, PrivacyError
from privet.common.privacy.federation import (
    clients_per_round,
    federation_delta,
    plan_federation,
)
from privet.common.protocol import ErrorCode
from privet.server.flower_door import ClientSideAdaptiveClipping
from privet.server.privacy import (
    ClientLevelDP,
    FederationBudgetExhausted,
    _FixedDenominatorMean,
    _RoundClipNoise,
    _scaled_update,
    client_level_of,
    federation_ledger_path,
    update_norm,
    wrap_client_level_dp,
)
from privet.server.recording import RoundRecord
from privet.server.rundir.privacy_report import (
    load_privacy_report,
    privacy_lines,
    privacy_report,
    secure_aggregation_report,
)
from privet.server.wrapping import WrappedStrategy

SIZE = 40_000  # elements per array: enough to measure a noise std to ~1%


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    # Flower's Message constructor reads the run id of the current task; tests have none.
    old = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


class _Grid:
    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _arrays(value: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"w": Array(value.astype(np.float32))})


def _reply(msg: Message, update: np.ndarray, current: np.ndarray, **metrics: float) -> Message:
    content = RecordDict(
        {
            "arrays": _arrays(current + update),
            "metrics": MetricRecord({"num-examples": 10, **metrics}),
        }
    )
    out = Message(content, reply_to=msg)
    return out


def _error(msg: Message) -> Message:
    out = Message(Error(code=1001, reason="[0] budget"), reply_to=msg)
    return out


def _cl(**kw: object) -> ClientLevelConfig:
    base: dict[str, object] = {"enabled": True, "noise_multiplier": 1.0, "clipping_norm": 1.0}
    base.update(kw)
    return ClientLevelConfig(**base)  # type: ignore[arg-type]


def _dp(
    tmp_path: Path, cl: ClientLevelConfig, *, clients: int = 3, rounds: int = 5
) -> ClientLevelDP:
    fed = FederationConfig(rounds=rounds, min_train_clients=clients, min_available_clients=clients)
    mech = plan_federation(cl, fed, num_clients=clients)
    inner = FedAvg(min_train_nodes=clients, min_available_nodes=clients, fraction_evaluate=0)
    return ClientLevelDP(inner, cl=cl, mechanism=mech, ledger_path=tmp_path / "fed.json")


def _round(
    dp: ClientLevelDP, server_round: int, current: np.ndarray, updates: list[np.ndarray | None]
) -> tuple[list[Message], ArrayRecord | None]:
    msgs = list(
        dp.configure_train(server_round, _arrays(current), ConfigRecord(), _Grid(len(updates)))
    )  # type: ignore[arg-type]
    assert len(msgs) == len(updates)
    replies = [
        _error(m) if u is None else _reply(m, u, current)
        for m, u in zip(msgs, updates, strict=True)
    ]
    arrays, _ = dp.aggregate_train(server_round, replies)
    return replies, arrays


def _big(rng: np.random.Generator, norm: float) -> np.ndarray:
    v = rng.normal(size=SIZE)
    return v / np.linalg.norm(v) * norm


def test_server_side_clipping_bounds_each_update_and_noise_matches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dp = _dp(tmp_path, _cl(noise_multiplier=1.5, clipping_norm=0.5))
    current = rng.normal(size=SIZE)
    updates = [_big(rng, 10.0), _big(rng, 0.1), _big(rng, 3.0)]
    np.random.seed(1)
    replies, arrays = _round(dp, 1, current, updates)
    assert arrays is not None
    # Flower's wrapper clipped every reply in place: each update is within the clip.
    for r in replies:
        assert update_norm(r.content.array_records["arrays"], _arrays(current)) <= 0.5 * (1 + 1e-5)
    # The aggregate is current + (sum of clipped updates) / m + N(0, (z C / m)^2).
    clipped = [u * min(1.0, 0.5 / np.linalg.norm(u)) for u in updates]
    expected = current + sum(clipped) / 3
    noise = arrays["w"].numpy().astype(np.float64) - expected
    assert abs(noise.mean()) < 0.01 * (1.5 * 0.5 / 3)
    assert noise.std() == pytest.approx(1.5 * 0.5 / 3, rel=0.02)
    assert dp.rounds[0].noise_std == pytest.approx(0.25)


@pytest.mark.filterwarnings("ignore:Optimal order:UserWarning")
def test_an_error_reply_keeps_the_round_with_a_fixed_denominator(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    # Negligible noise (std z C / m = 3e-5 per weight, against a per-weight signal of about
    # 1e-3), so the mean itself is asserted: dividing by the 2 replies that arrived instead of
    # the 3 clients asked moves every weight by u / 6, about 30 noise stds.
    z = 1e-4
    dp = _dp(tmp_path, _cl(noise_multiplier=z, clipping_norm=1.0))
    current = np.zeros(SIZE)
    u = _big(rng, 0.6)
    np.random.seed(2)
    _, arrays = _round(dp, 1, current, [u, None, u])
    assert arrays is not None
    rec = dp.rounds[0]
    assert rec.released and rec.clients_asked == 3 and rec.updates_aggregated == 2
    assert len(rec.updates_dropped) == 1
    released = arrays["w"].numpy().astype(np.float64)
    # Divided by the 3 clients asked, not the 2 that answered: within twice the noise's expected
    # norm (z C / 3 * sqrt(SIZE) = 0.0067) of 2u/3, where 2u/2 = u is 0.2 away.
    noise_norm = z / 3 * math.sqrt(SIZE)
    assert np.linalg.norm(released - 2 * u / 3) < 2 * noise_norm
    assert np.linalg.norm(released - u) > 20 * noise_norm
    # And the noise on the sum is still z C, over the same denominator.
    noise = released - 2 * u / 3
    assert noise.std() == pytest.approx(z / 3, rel=0.05)
    assert dp.epsilon() > 0


def test_a_round_with_no_update_releases_nothing_but_is_charged(tmp_path: Path) -> None:
    dp = _dp(tmp_path, _cl())
    _, arrays = _round(dp, 1, np.zeros(SIZE), [None, None, None])
    assert arrays is None
    assert not dp.rounds[0].released
    assert len(dp.ledger.entries) == 1


@pytest.mark.filterwarnings("ignore:Optimal order:UserWarning")
def test_uniform_weights_not_example_counts(tmp_path: Path) -> None:
    dp = _dp(tmp_path, _cl(noise_multiplier=1e-3, clipping_norm=100.0), clients=2)
    current = np.zeros(SIZE)
    msgs = list(dp.configure_train(1, _arrays(current), ConfigRecord(), _Grid(2)))  # type: ignore[arg-type]
    a, b = np.full(SIZE, 0.1), np.full(SIZE, -0.1)
    replies = [
        _reply(msgs[0], a, current, **{"num-examples": 1000}),
        _reply(msgs[1], b, current, **{"num-examples": 1}),
    ]
    arrays, _ = dp.aggregate_train(1, replies)
    assert arrays is not None
    assert abs(arrays["w"].numpy().mean()) < 1e-3  # (a + b) / 2 = 0, whatever the example counts


def test_client_side_unclipped_update_is_dropped_and_rounding_is_projected(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(3)
    dp = _dp(tmp_path, _cl(side="client", clipping_norm=1.0, noise_multiplier=1.0))
    current = rng.normal(size=SIZE)
    msgs = list(dp.configure_train(1, _arrays(current), ConfigRecord(), _Grid(3)))  # type: ignore[arg-type]
    assert all(m.content.config_records["config"]["clipping_norm"] == 1.0 for m in msgs)
    replies = [
        _reply(msgs[0], _big(rng, 5.0), current),  # did not clip
        _reply(msgs[1], _big(rng, 1.0 + 1e-5), current),  # rounding above the clip
        _reply(msgs[2], _big(rng, 0.5), current),
    ]
    dp.aggregate_train(1, replies)
    rec = dp.rounds[0]
    assert rec.updates_aggregated == 2
    assert any("did not clip" in why for why in rec.updates_dropped.values())
    projected = update_norm(replies[1].content.array_records["arrays"], _arrays(current))
    assert projected <= 1.0 + 1e-6


def test_adaptive_clip_grows_when_every_update_is_clipped(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    cl = _cl(clipping="adaptive", clipping_norm=0.1, noise_multiplier=0.5, clipped_count_stddev=0.5)
    dp = _dp(tmp_path, cl, rounds=10)
    current = np.zeros(SIZE)
    clips = []
    np.random.seed(5)
    for r in range(1, 6):
        clips.append(dp.rounds[-1].clipping_norm if dp.rounds else 0.1)
        _round(dp, r, current, [_big(rng, 10.0) for _ in range(3)])
    # Every update is far above the clip: the clip must rise (Flower's own rule would shrink it).
    assert dp.rounds[-1].clipping_norm > 0.1
    assert [r.clipping_norm for r in dp.rounds] == sorted(r.clipping_norm for r in dp.rounds)


def test_adaptive_noise_uses_the_clip_of_the_round(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    cl = _cl(clipping="adaptive", clipping_norm=1.0, noise_multiplier=0.5, clipped_count_stddev=0.5)
    dp = _dp(tmp_path, cl)
    current = np.zeros(SIZE)
    updates = [_big(rng, 1e-3) for _ in range(3)]  # all unclipped: the clip will shrink
    np.random.seed(7)
    _, arrays = _round(dp, 1, current, updates)
    assert arrays is not None
    assert float(dp.dp.clipping_norm) < 1.0  # type: ignore[attr-defined]
    z_delta = (0.5**-2 - (2 * 0.5) ** -2) ** -0.5  # Flower's split of z between update and count
    noise = arrays["w"].numpy().astype(np.float64) - sum(updates) / 3
    assert noise.std() == pytest.approx(z_delta * 1.0 / 3, rel=0.02)


def test_budget_stops_before_the_round_that_would_pass_it_across_restarts(
    tmp_path: Path,
) -> None:
    z = 2.0
    cl = _cl(noise_multiplier=z)
    mech = plan_federation(cl, FederationConfig(rounds=5, min_train_clients=3), num_clients=3)
    two, three = mech.epsilon_after(2), mech.epsilon_after(3)
    budget = (two + three) / 2
    cl = _cl(noise_multiplier=z, budget_epsilon=budget)
    dp = _dp(tmp_path, cl)
    for r in (1, 2):
        _round(dp, r, np.zeros(SIZE), [np.full(SIZE, 1e-3)] * 3)
    assert dp.epsilon() == pytest.approx(two, abs=1e-9)
    with pytest.raises(FederationBudgetExhausted, match="round 3 would bring it"):
        dp.configure_train(3, _arrays(np.zeros(SIZE)), ConfigRecord(), _Grid(3))  # type: ignore[arg-type]
    again = _dp(tmp_path, cl)  # a restarted server reads the same ledger
    assert again.epsilon() == pytest.approx(two, abs=1e-9)
    with pytest.raises(FederationBudgetExhausted):
        again.configure_train(3, _arrays(np.zeros(SIZE)), ConfigRecord(), _Grid(3))  # type: ignore[arg-type]


def test_a_round_redone_after_a_resume_is_charged_again(tmp_path: Path) -> None:
    # The server died after round 2 was charged, before its checkpoint: the resumed server
    # (a new ClientLevelDP on the same ledger) runs round 2 again, a new noised release.
    z = 2.0
    cl = _cl(noise_multiplier=z)
    mech = plan_federation(cl, FederationConfig(rounds=5, min_train_clients=3), num_clients=3)
    dp = _dp(tmp_path, cl)
    for r in (1, 2):
        _round(dp, r, np.zeros(SIZE), [np.full(SIZE, 1e-3)] * 3)
    resumed = _dp(tmp_path, cl)
    _round(resumed, 2, np.zeros(SIZE), [np.full(SIZE, 1e-3)] * 3)
    assert resumed.epsilon() == pytest.approx(mech.epsilon_after(3), abs=1e-12)
    assert resumed.epsilon() == pytest.approx(
        _closed_form_gaussian_epsilon(z, 3, mech.delta), rel=1e-6
    )
    assert [(r.round, r.attempt) for r in resumed.rounds] == [(2, 2)]
    assert resumed.ledger.attempts() == {1: 1, 2: 2}
    # A redo that would pass the budget is refused before anything is sent.
    budget = (mech.epsilon_after(2) + mech.epsilon_after(3)) / 2
    tight = _cl(noise_multiplier=z, budget_epsilon=budget)
    again = _dp(tmp_path / "tight", tight)
    for r in (1, 2):
        _round(again, r, np.zeros(SIZE), [np.full(SIZE, 1e-3)] * 3)
    with pytest.raises(FederationBudgetExhausted, match="round 2 would bring it"):
        _dp(tmp_path / "tight", tight).configure_train(
            2,
            _arrays(np.zeros(SIZE)),
            ConfigRecord(),
            _Grid(3),  # type: ignore[arg-type]
        )


# Opacus 1.6's default RDP orders, copied (not imported) so a change in Opacus shows up here.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _closed_form_gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    # RDP of the Gaussian mechanism (q = 1): alpha / (2 z^2) per round; Opacus's conversion to
    # (eps, delta) (Balle et al. 2020), minimised over Opacus's default orders. Written out here so
    # the test does not use the code it checks.
    best = math.inf
    for a in ORDERS:
        rdp = rounds * a / (2 * z * z)
        eps = rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return best


@pytest.mark.parametrize(
    ("z", "rounds", "delta"), [(1.0, 10, 1e-3), (2.5, 50, 1e-5), (0.8, 3, 0.025)]
)
def test_federation_epsilon_equals_the_closed_form(z: float, rounds: int, delta: float) -> None:
    cl = _cl(noise_multiplier=z, delta=delta)
    mech = plan_federation(
        cl,
        FederationConfig(rounds=rounds, min_train_clients=2),
        num_clients=2 if delta > 1e-3 else 20,
    )
    assert mech.sample_rate == 1.0
    assert mech.epsilon_after(rounds) == pytest.approx(
        _closed_form_gaussian_epsilon(z, rounds, delta), abs=1e-6
    )


# Pinned from the closed form above (RDP, q = 1, opacus 1.6 default orders).
GOLDEN_FEDERATION = {
    (1.0, 10, 1e-3): 15.45866186621382,
    (2.5, 50, 1e-5): 16.512875946682545,
    (0.8, 3, 0.025): 6.954286116333638,
}


@pytest.mark.parametrize(("key", "value"), sorted(GOLDEN_FEDERATION.items()))
def test_federation_golden_values(key: tuple[float, int, float], value: float) -> None:
    z, rounds, delta = key
    assert _closed_form_gaussian_epsilon(z, rounds, delta) == pytest.approx(value, abs=1e-6)
    cl = _cl(noise_multiplier=z, delta=delta)
    mech = plan_federation(
        cl,
        FederationConfig(rounds=rounds, min_train_clients=2),
        num_clients=2 if delta > 1e-3 else 20,
    )
    assert mech.epsilon_after(rounds) == pytest.approx(value, abs=1e-6)


def test_calibrated_noise_spends_at_most_the_target(tmp_path: Path) -> None:
    cl = ClientLevelConfig(enabled=True, target_epsilon=3.0)
    mech = plan_federation(cl, FederationConfig(rounds=4, min_train_clients=2), num_clients=10)
    assert mech.delta == pytest.approx(0.01)
    assert 3.0 - 0.01 <= mech.epsilon_after(4) <= 3.0


def test_amplification_uses_clients_per_round_over_population() -> None:
    fed = FederationConfig(rounds=3, fraction_train=0.25, min_train_clients=2)
    assert clients_per_round(fed, num_clients=20) == 5
    assert clients_per_round(fed, num_clients=4) == 2
    cl = _cl(sampling_amplification=True)
    assert plan_federation(cl, fed, num_clients=20).sample_rate == 0.25
    assert plan_federation(_cl(), fed, num_clients=20).sample_rate == 1.0


def test_delta_must_be_below_one_over_the_population() -> None:
    assert federation_delta(_cl(), num_clients=4) == pytest.approx(0.025)
    with pytest.raises(PrivacyError, match="below 1 / number of clients"):
        federation_delta(_cl(delta=0.3), num_clients=4)


def test_config_refuses_bad_client_level_settings() -> None:
    with pytest.raises(ConfigError, match="exactly one of target_epsilon and noise_multiplier"):
        load_config(None, ["privacy.client_level.enabled=true"])
    with pytest.raises(ConfigError, match="above privacy.client_level.budget_epsilon"):
        load_config(
            None,
            [
                "privacy.client_level.enabled=true",
                "privacy.client_level.target_epsilon=5",
                "privacy.client_level.budget_epsilon=2",
            ],
        )
    with pytest.raises(ConfigError, match="side = 'server' cannot be combined with secure"):
        load_config(
            None,
            [
                "privacy.secure_aggregation=true",
                "privacy.client_level.enabled=true",
                "privacy.client_level.target_epsilon=5",
            ],
        )
    cfg = load_config(
        None, ["privacy.client_level.enabled=true", "privacy.client_level.target_epsilon=5"]
    )
    assert cfg.privacy.client_level.effective_budget == 5


def test_non_linear_strategies_are_refused(tmp_path: Path) -> None:
    from flwr.serverapp.strategy import FedAdam

    cl = _cl()
    mech = plan_federation(cl, FederationConfig(rounds=2), num_clients=3)
    with pytest.raises(ConfigError, match="averages like FedAvg"):
        ClientLevelDP(FedAdam(), cl=cl, mechanism=mech, ledger_path=tmp_path / "f.json")


# -- the aggregation's parts, on hand-made numbers (docs/testing.md, "Client-level aggregation
# survivors": each test below answers mutants that the end-to-end numbers above let through) ----


def _privet_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "privet"]


def _one_key(values: list[float]) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(values, dtype=np.float32))})


def test_update_norm_sums_over_every_array() -> None:
    new = ArrayRecord(
        {
            "a": Array(np.asarray([4.0, 1.0], dtype=np.float32)),
            "b": Array(np.asarray([0.0, 4.0], dtype=np.float32)),
        }
    )
    old = ArrayRecord(
        {
            "a": Array(np.asarray([1.0, 1.0], dtype=np.float32)),
            "b": Array(np.asarray([0.0, 0.0], dtype=np.float32)),
        }
    )
    assert update_norm(new, old) == 5.0  # sqrt(3^2 + 4^2): both arrays count


def test_a_scaled_update_moves_toward_the_old_weights_and_keeps_their_dtype() -> None:
    old = _one_key([1.0, -1.0])
    out = _scaled_update(_one_key([4.0, 3.0]), old, 0.5)  # update (3, 4), halved
    assert out["w"].numpy().tolist() == [2.5, 1.0]
    assert out["w"].numpy().dtype == np.float32


def test_the_fixed_denominator_mean_on_hand_made_updates() -> None:
    mean = _FixedDenominatorMean(FedAvg(min_train_nodes=2, min_available_nodes=2))
    # Before any round: the mean of nothing over nothing is an empty record, not a crash.
    empty, metrics = mean.aggregate_train(1, [])
    assert empty is not None and len(empty) == 0 and metrics is None
    current = np.asarray([1.0, 2.0])
    msgs = list(mean.configure_train(1, _arrays(current), ConfigRecord(), _Grid(2)))  # type: ignore[arg-type]
    # The denominator is 1 until the client-level wrapper sets it: one reply is the new model.
    one, _ = mean.aggregate_train(1, [_reply(msgs[0], np.asarray([0.5, -0.25]), current)])
    assert one is not None
    assert one["w"].numpy().tolist() == [1.5, 1.75]
    assert one["w"].numpy().dtype == np.float32
    mean.denominator = 4
    replies = [
        _reply(msgs[0], np.asarray([1.0, -2.0]), current),
        _reply(msgs[1], np.asarray([3.0, 0.0]), current),
    ]
    four, _ = mean.aggregate_train(1, replies)
    assert four is not None
    assert four["w"].numpy().tolist() == [2.0, 1.5]  # current + (sum 4, -2) / 4


def test_a_dp_round_evaluates_through_every_wrapper(tmp_path: Path) -> None:
    cl = _cl()
    mech = plan_federation(cl, FederationConfig(rounds=2, min_train_clients=3), num_clients=3)
    inner = FedAvg(min_train_nodes=3, min_available_nodes=3, min_evaluate_nodes=3)
    dp = ClientLevelDP(inner, cl=cl, mechanism=mech, ledger_path=tmp_path / "fed.json")
    msgs = list(dp.configure_evaluate(1, _arrays(np.zeros(4)), ConfigRecord(), _Grid(3)))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2, 3]
    assert {m.metadata.message_type for m in msgs} == {"evaluate"}


def test_the_federation_ledger_is_the_federations_and_lives_under_the_run(tmp_path: Path) -> None:
    assert federation_ledger_path(tmp_path / "run") == tmp_path / "run" / "privacy" / (
        "federation-ledger.json"
    )
    dp = _dp(tmp_path, _cl())
    assert dp.ledger.client_id == "federation"


def test_a_round_aggregated_before_any_was_configured_asked_nobody(tmp_path: Path) -> None:
    dp = _dp(tmp_path, _cl(noise_multiplier=2.0, clipping_norm=0.5))
    arrays, metrics = dp.aggregate_train(1, [])
    assert (arrays, metrics) == (None, None)
    rec = dp.rounds[0]
    assert (rec.clients_asked, rec.updates_aggregated, rec.updates_dropped) == (0, 0, {})
    assert rec.noise_std == 1.0  # z C / max(1, 0)


def test_a_lone_client_is_averaged_over_one_and_noised_at_z_c(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    current = rng.normal(size=SIZE)
    u = _big(rng, 0.5)
    # Negligible noise: the release is current + u, divided by the one client asked.
    quiet = _dp(tmp_path / "quiet", _cl(noise_multiplier=1e-4), clients=1)
    np.random.seed(9)
    _, arrays = _round(quiet, 1, current, [u])
    assert arrays is not None
    released = arrays["w"].numpy().astype(np.float64) - current
    assert np.linalg.norm(released - u) < 2 * 1e-4 * math.sqrt(SIZE)
    assert np.linalg.norm(released - u / 2) > 0.2
    # Real noise: std z C / 1 on every weight, and the record says so.
    loud = _dp(tmp_path / "loud", _cl(noise_multiplier=1.0), clients=1)
    np.random.seed(10)
    _, arrays = _round(loud, 1, current, [u])
    assert arrays is not None
    noise = arrays["w"].numpy().astype(np.float64) - current - u
    assert noise.std() == pytest.approx(1.0, rel=0.02)
    assert loud.rounds[0].noise_std == 1.0
    assert (loud.rounds[0].clients_asked, loud.rounds[0].updates_aggregated) == (1, 1)


def test_each_reply_that_contributes_zero_is_named_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="privet")
    dp = _dp(tmp_path, _cl(noise_multiplier=1e-4, clipping_norm=1.0), clients=5)
    current = np.zeros(4)
    msgs = list(dp.configure_train(1, _arrays(current), ConfigRecord(), _Grid(5)))  # type: ignore[arg-type]
    assert len(msgs) == 5
    no_arrays = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 10})}), reply_to=msgs[1]
    )
    unit = np.asarray([1.0, 0.0, 0.0, 0.0])  # norm exactly 1.0: kept, and inside the clip
    replies = [
        _error(msgs[0]),
        no_arrays,
        _reply(msgs[2], np.zeros(4), current),
        _reply(msgs[3], unit, current),
    ]  # msgs[4] never answers
    np.random.seed(11)
    arrays, _ = dp.aggregate_train(1, replies)
    rec = dp.rounds[0]
    node = [f"node-{m.metadata.dst_node_id}" for m in msgs]  # FedAvg samples in random order
    assert rec.updates_dropped == {
        node[0]: "error reply (1001)",
        node[1]: "no arrays in the reply",
        node[2]: "zero update",
        "(no reply)": "1 client(s) did not answer or were rejected",
    }
    assert (rec.clients_asked, rec.updates_aggregated, rec.released) == (5, 1, True)
    assert arrays is not None
    assert np.allclose(arrays["w"].numpy(), unit / 5, atol=1e-3)
    # The round's budget check is logged, with the epsilon the round will bring.
    eps = dp.mechanism.epsilon_after(1)
    assert f"round 1: federation eps after it would be {eps:.4f}" in _privet_log(caplog)
    assert rec.epsilon_after == eps == dp.epsilon()


def test_a_round_without_updates_is_logged_and_returns_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="privet")
    dp = _dp(tmp_path, _cl())
    msgs = list(dp.configure_train(7, _arrays(np.zeros(4)), ConfigRecord(), _Grid(3)))  # type: ignore[arg-type]
    assert dp.aggregate_train(7, [_error(m) for m in msgs]) == (None, None)
    assert _privet_log(caplog) == [
        "round 7: no client update arrived; the global model is unchanged (the round is still "
        "charged to the federation's budget)"
    ]


def _client_side_round(
    tmp_path: Path, clip: float, norms: list[float], caplog: pytest.LogCaptureFixture
) -> tuple[ClientLevelDP, str]:
    """One client-side round of 1-weight updates with these norms; the second reply's node."""
    caplog.set_level(logging.WARNING, logger="privet")
    dp = _dp(tmp_path, _cl(side="client", clipping_norm=clip, noise_multiplier=1e-4))
    current = np.zeros(1)
    msgs = list(dp.configure_train(1, _arrays(current), ConfigRecord(), _Grid(3)))  # type: ignore[arg-type]
    replies = [
        _reply(m, np.asarray([n], dtype=np.float32), current)
        for m, n in zip(msgs, norms, strict=True)
    ]
    np.random.seed(12)
    dp.aggregate_train(1, replies)
    return dp, f"node-{msgs[1].metadata.dst_node_id}"  # FedAvg samples in random order


def test_a_client_that_did_not_clip_is_named_word_for_word(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 1.5 C: above the rounding slack (0.1 %) by far, far below any "obviously unclipped" size.
    dp, second = _client_side_round(tmp_path, 1.0, [0.5, 1.5, 0.25], caplog)
    why = (
        "update norm 1.5 above the clip 1: the client did not clip (is it running privet with "
        "privacy.client_level.side = 'client'?)"
    )
    assert dp.rounds[0].updates_dropped == {second: why}
    assert dp.rounds[0].updates_aggregated == 2
    assert _privet_log(caplog) == [f"client-level DP: dropped the update of {second}: {why}"]


def test_the_client_rounding_slack_is_inclusive(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A float32 update whose norm is exactly clip * (1 + 0.001) in float64: still rounding.
    top = float(np.float32(1.001))
    clip = 1.0000000466833583
    assert clip * (1 + 1e-3) == top
    dp, _ = _client_side_round(tmp_path, clip, [top, 0.5, 0.5], caplog)
    assert dp.rounds[0].updates_dropped == {}
    assert dp.rounds[0].updates_aggregated == 3
    assert _privet_log(caplog) == []


def test_a_budget_refusal_says_what_was_spent_word_for_word(tmp_path: Path) -> None:
    cl = _cl(noise_multiplier=2.0)
    mech = plan_federation(cl, FederationConfig(rounds=5, min_train_clients=3), num_clients=3)
    two, three = mech.epsilon_after(2), mech.epsilon_after(3)
    budget = (two + three) / 2
    dp = _dp(tmp_path, _cl(noise_multiplier=2.0, budget_epsilon=budget))
    for r in (1, 2):
        _round(dp, r, np.zeros(SIZE), [np.full(SIZE, 1e-3)] * 3)
    with pytest.raises(FederationBudgetExhausted) as exc:
        dp.configure_train(3, _arrays(np.zeros(SIZE)), ConfigRecord(), _Grid(3))  # type: ignore[arg-type]
    assert exc.value.message == (
        f"the federation has spent client-level eps={two:.4f} of its budget {budget:g} "
        f"(delta={mech.delta:g}); round 3 would bring it to {three:.4f}, so training stops "
        "before it"
    )
    assert exc.value.fix == (
        "raise privacy.client_level.budget_epsilon (a deliberate decision to spend more privacy), "
        "or plan fewer rounds"
    )


def test_a_non_linear_strategy_is_refused_word_for_word(tmp_path: Path) -> None:
    from flwr.serverapp.strategy import FedAdam

    class _ReweightedFedAvg(FedAvg):
        def aggregate_train(  # type: ignore[override]
            self, server_round: int, replies: object
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            return None, None

    cl = _cl()
    mech = plan_federation(cl, FederationConfig(rounds=2), num_clients=3)
    for strategy, name in [(FedAdam(), "FedAdam"), (_ReweightedFedAvg(), "_ReweightedFedAvg")]:
        with pytest.raises(ConfigError) as exc:
            ClientLevelDP(strategy, cl=cl, mechanism=mech, ledger_path=tmp_path / "f.json")
        assert exc.value.message == (
            f"client-level DP needs a strategy that averages like FedAvg, got {name}: Flower's DP "
            "wrappers add the noise after the strategy aggregates, so a server optimizer in "
            "between would see un-noised updates"
        )
        assert exc.value.fix == (
            "set federation.strategy = 'fedavg' (or 'fedprox'), or "
            "privacy.client_level.enabled = false"
        )


def test_adaptive_clipping_takes_every_setting_and_refuses_too_little_count_noise(
    tmp_path: Path,
) -> None:
    cl = _cl(
        clipping="adaptive",
        side="client",
        clipping_norm=1.0,
        noise_multiplier=1.0,
        target_quantile=0.3,
        clip_learning_rate=0.05,
        clipped_count_stddev=0.51,
    )
    dp = _dp(tmp_path, cl)
    wrapper = dp.dp
    assert isinstance(wrapper, ClientSideAdaptiveClipping)
    assert isinstance(wrapper, _RoundClipNoise)
    assert (wrapper.target_clipped_quantile, wrapper.clip_norm_lr) == (0.3, 0.05)
    assert wrapper.clipped_count_stddev == 0.51
    # Andrew et al.'s rule on the unclipped fraction (0.75 here): C * exp(-lr (0.75 - target)).
    assert wrapper.noise_clip() == 1.0  # no round clip set yet: Flower's own
    wrapper.update_clip(0.25)
    assert wrapper.clipping_norm == pytest.approx(math.exp(-0.05 * (0.75 - 0.3)), rel=1e-12)
    wrapper.round_clip = 0.125
    assert wrapper.noise_clip() == 0.125
    # The default count noise: Flower's m / 20 unless z is larger (z = 1 here, m = 3).
    default = _dp(tmp_path / "d", _cl(clipping="adaptive", noise_multiplier=1.0))
    assert default.dp.clipped_count_stddev == 1.0  # type: ignore[attr-defined]
    many = _dp(tmp_path / "m", _cl(clipping="adaptive", noise_multiplier=1.0), clients=50)
    assert many.dp.clipped_count_stddev == 2.5  # type: ignore[attr-defined]  # 50 / 20
    # z must stay below twice the count noise: equal is refused.
    with pytest.raises(ConfigError) as exc:
        _dp(
            tmp_path / "r", _cl(clipping="adaptive", noise_multiplier=1.0, clipped_count_stddev=0.5)
        )
    assert exc.value.message == (
        "privacy.client_level.clipped_count_stddev = 0.5 must exceed half the noise multiplier "
        "(1 / 2) for adaptive clipping"
    )
    assert exc.value.fix == "set privacy.client_level.clipped_count_stddev >= 1 (or unset it)"


def test_the_wrapper_is_built_from_the_config_and_found_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="privet")
    inner = FedAvg(min_train_nodes=2, min_available_nodes=2)
    off = load_config(None, [])
    assert wrap_client_level_dp(inner, off, num_clients=2, run_dir=tmp_path) is inner
    assert client_level_of(inner) is None
    assert _privet_log(caplog) == []
    sets = [
        "privacy.client_level.enabled=true",
        "privacy.client_level.noise_multiplier=1.5",
        "privacy.client_level.clipping_norm=0.25",
        "privacy.client_level.budget_epsilon=7",
        "federation.min_train_clients=2",
        "federation.min_available_clients=2",
    ]
    cfg = load_config(None, sets)
    dp = wrap_client_level_dp(inner, cfg, num_clients=2, run_dir=tmp_path / "run")
    assert isinstance(dp, ClientLevelDP)
    assert dp.cl == cfg.privacy.client_level
    assert dp.mechanism == plan_federation(cfg.privacy.client_level, cfg.federation, num_clients=2)
    assert dp.ledger_path == tmp_path / "run" / "privacy" / "federation-ledger.json"
    assert dp._mean.base is inner
    assert _privet_log(caplog) == [
        "client-level DP: z=1.5, clip=0.25 (fixed, server side), 2 of 2 clients per round, q=1, "
        "delta=0.05, budget eps=7.0"
    ]
    assert client_level_of(dp) is dp
    # Found under wrappers, up to 15 of them (the walk is bounded, never a loop).
    node: Strategy = dp
    for depth in range(1, 17):
        node = WrappedStrategy(node)
        assert client_level_of(node) is (dp if depth <= 15 else None), depth


def test_one_client_per_round_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="privet")
    one = load_config(
        None,
        [
            "privacy.client_level.enabled=true",
            "privacy.client_level.noise_multiplier=1.0",
            "federation.min_train_clients=1",
            "federation.min_available_clients=1",
        ],
    )
    wrap_client_level_dp(FedAvg(), one, num_clients=1, run_dir=tmp_path / "one")
    assert _privet_log(caplog) == [
        "client-level DP with one client per round: the noise must hide that client's whole "
        "update, so expect the model to learn little"
    ]
    caplog.clear()
    two = one.model_copy(
        update={"federation": one.federation.model_copy(update={"min_train_clients": 2})}
    )
    wrap_client_level_dp(FedAvg(), two, num_clients=2, run_dir=tmp_path / "two")
    assert _privet_log(caplog) == []


@pytest.mark.parametrize(
    ("sets", "mods"),
    [
        ([], []),
        (["privacy.client_level.side='client'"], []),  # off, whatever the side
        (["privacy.client_level.enabled=true"], []),  # server-side clipping: no mod
        (["privacy.client_level.enabled=true", "privacy.client_level.side='client'"], ["fixed"]),
        (
            [
                "privacy.client_level.enabled=true",
                "privacy.client_level.side='client'",
                "privacy.client_level.clipping='adaptive'",
            ],
            ["adaptive"],
        ),
    ],
)
def test_the_client_gets_the_clipping_mod_of_its_side(sets: list[str], mods: list[str]) -> None:
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    from privet.client.client_level import client_level_mods

    by_name = {"fixed": fixedclipping_mod, "adaptive": adaptiveclipping_mod}
    enabled = ["privacy.client_level.noise_multiplier=1.0"] if sets else []
    cfg = load_config(None, [*sets, *enabled])
    assert client_level_mods(cfg) == [by_name[m] for m in mods]


def test_the_planned_mechanism_word_for_word(tmp_path: Path) -> None:
    cl = _cl(noise_multiplier=1.25, budget_epsilon=9.0)
    fed = FederationConfig(rounds=7, fraction_train=0.5, min_train_clients=2)
    mech = plan_federation(cl, fed, num_clients=4)
    assert mech.as_json() == {
        "noise_multiplier": 1.25,
        "sample_rate": 1.0,
        "delta": 0.025,
        "clients_per_round": 2,
        "population": 4,
        "rounds": 7,
        "accountant": "rdp",
        "budget_epsilon": 9.0,
    }
    assert mech.epsilon_after(0) == 0.0
    assert mech.epsilon_after(-1) == 0.0
    assert mech.epsilon_after(1) > 0.0


def test_federation_refusals_word_for_word() -> None:
    from privet.common.privacy.mechanism import client_sampling, round_mechanism

    with pytest.raises(PrivacyError) as exc:
        plan_federation(ClientLevelConfig(), FederationConfig(), num_clients=3)
    assert (exc.value.message, exc.value.fix) == ("privacy.client_level is not enabled", None)
    # delta = 1 / N exactly is refused: it certifies nothing.
    with pytest.raises(PrivacyError) as exc:
        federation_delta(_cl(delta=0.25), num_clients=4)
    assert exc.value.message == (
        "privacy.client_level.delta = 0.25 is not below 1 / number of clients = 0.25: a mechanism "
        "that publishes one client's update in the clear would satisfy it"
    )
    assert exc.value.fix == "set privacy.client_level.delta below 0.25 (or leave it unset)"
    with pytest.raises(PrivacyError) as exc:
        federation_delta(_cl(delta=0.5), num_clients=3)
    assert "= 0.333: a mechanism" in exc.value.message
    assert exc.value.fix == "set privacy.client_level.delta below 0.333 (or leave it unset)"
    # A target below what the accountant can certify (delta 1e-4 has a floor near 0.15).
    cl = ClientLevelConfig(enabled=True, target_epsilon=0.01)
    fed = FederationConfig(rounds=3, min_train_clients=2)
    with pytest.raises(PrivacyError) as inner:
        round_mechanism(
            client_sampling(1000, fraction=1.0, minimum=2, amplification=False),
            rounds=3,
            delta=1e-4,
            accountant="rdp",
            noise_multiplier=None,
            target_epsilon=0.01,
        )
    with pytest.raises(PrivacyError) as exc:
        plan_federation(cl, fed, num_clients=1000)
    assert exc.value.message == f"client-level DP: {inner.value.message}"
    assert exc.value.fix == "raise privacy.client_level.target_epsilon or lower federation.rounds"


# -- the privacy report (server/rundir/privacy_report.py) on a hand-made run -----------------------


def _report_config(*sets: str) -> PrivetConfig:
    base = [
        "data.num_clients=6",
        "federation.rounds=3",
        "federation.fraction_train=0.5",
        "federation.min_train_clients=3",
        "federation.min_available_clients=3",
        "train.batch_size=10",
        "train.local_epochs=2",
    ]
    return load_config(None, [*base, *sets])


def test_the_privacy_report_says_everything_word_for_word(tmp_path: Path) -> None:
    cfg = _report_config(
        "privacy.secure_aggregation=true",
        "privacy.client_level.enabled=true",
        "privacy.client_level.side='client'",
        "privacy.client_level.noise_multiplier=1.5",
        "privacy.client_level.sampling_amplification=true",
        "privacy.client_level.budget_epsilon=50",
    )
    cl = cfg.privacy.client_level
    mech = plan_federation(cl, cfg.federation, num_clients=6)
    inner = FedAvg(
        min_train_nodes=3, min_available_nodes=3, fraction_train=0.5, fraction_evaluate=0
    )
    dp = ClientLevelDP(inner, cl=cl, mechanism=mech, ledger_path=tmp_path / "fed.json")
    np.random.seed(13)
    _round(dp, 1, np.zeros(8), [np.full(8, 0.01)] * 3)
    history = [
        RoundRecord(round=0),
        RoundRecord(
            round=1,
            epsilon_per_client={"a": 0.5, "b": 0.75, "c": 0.25},
            examples_per_client={"a": 100, "c": 50},  # c: a client the server did not list
            charged_again={"a": 2},
            errors={"k1": "[3] crashed"},  # partition 3 of 3 names: nobody
            error_codes={"k1": int(ErrorCode.BUDGET)},
        ),
        RoundRecord(
            round=2,
            epsilon_per_client={"a": 1.0},
            errors={"k2": "[1] budget", "k3": "[0] out of memory"},
            error_codes={"k2": int(ErrorCode.BUDGET), "k3": 1},
        ),
    ]
    report = privacy_report(
        cfg,
        history=history,
        client_names=["a", "b", "d"],
        examples_per_client={"a": 999, "b": 40},  # a reported its own 100
        client_level=dp,
        stopped="the budget",
    )

    def client(examples: int, rate: float | None, steps: int | None, **kw: object) -> dict:
        row: dict[str, object] = {
            "examples": examples,
            "sample_rate": rate,
            "steps_per_round": steps,
            "epsilon_per_round": {},
            "rounds_joined": [],
            "budget_refused_rounds": [],
            "charges_per_round": {},
            "final_epsilon": 0.0,
            "budget_stopped": False,
        }
        row.update(kw)
        return row

    eps = mech.epsilon_after(1)
    assert report == {
        "sample_level": {
            "enabled": True,
            "mechanism": "DP-SGD (Opacus), Poisson sampling, per-sample clipping",
            "accountant": "rdp",
            "delta": 1e-5,
            "target_epsilon": 8.0,
            "noise_multiplier": None,
            "noise_multiplier_note": "calibrated per client at its first round to spend "
            "target_epsilon over all planned rounds (stored in the client's ledger)",
            "max_grad_norm": 1.0,
            "budget_epsilon": 8.0,
            "batch_size": 10,
            "local_epochs": 2.0,
            "clients": {
                # 100 examples in batches of 10 for 2 epochs: q = 0.1, 20 steps.
                "a": client(
                    100,
                    0.1,
                    20,
                    epsilon_per_round={"1": 0.5, "2": 1.0},
                    rounds_joined=[1, 2],
                    charges_per_round={"1": 2},
                    final_epsilon=1.0,
                ),
                "b": client(
                    40,
                    0.25,
                    8,
                    epsilon_per_round={"1": 0.75},
                    rounds_joined=[1],
                    budget_refused_rounds=[2],
                    final_epsilon=0.75,
                    budget_stopped=True,
                ),
                "d": client(0, None, None),
                "c": client(
                    50,
                    0.2,
                    10,
                    epsilon_per_round={"1": 0.25},
                    rounds_joined=[1],
                    final_epsilon=0.25,
                ),
            },
        },
        "client_level": {
            "enabled": True,
            "mechanism": "DP-FedAvg: clipped client updates, fixed-denominator mean, Gaussian noise",
            "clipping": "fixed",
            "side": "client",
            "initial_clipping_norm": 0.5,
            "noise_multiplier": 1.5,
            "sample_rate": 0.5,
            "delta": 1 / 60,
            "clients_per_round": 3,
            "population": 6,
            # The mechanism's planned "rounds" (3) is shadowed by the rounds run, below; the plan
            # is the report's rounds_planned.
            "accountant": "rdp",
            "budget_epsilon": 50.0,
            "sampling": "Poisson-subsampling bound at q = clients per round / population "
            "(approximation for Flower's fixed-size sampling)",
            "rounds": [
                {
                    "round": 1,
                    "clients_asked": 3,
                    "updates_aggregated": 3,
                    "updates_dropped": {},
                    "clipping_norm": 0.5,
                    "noise_std": 0.25,  # z C / m = 1.5 * 0.5 / 3
                    "released": True,
                    "epsilon_after": eps,
                    "attempt": 1,
                }
            ],
            "charges_per_round": {"1": 1},
            "final_epsilon": eps,
            "ledger": str(tmp_path / "fed.json"),
        },
        "secure_aggregation": {
            "enabled": True,
            "protocol": "SecAgg+ (Flower's SecAggPlusWorkflow and secaggplus_mod)",
            "server_sees": "only the sum of each round's updates; per-client metrics (loss, "
            "examples, epsilon) travel in the clear",
            "weights": "equal (client-level DP)",
            "clipping_range": 8.0,
            "quantization_range": 4194304,
            "modulus_range": 4294967296,
            "quantization_step": 16 / 4194304,  # 2 * clipping_range / quantization_range
            "clients_per_round": 3,
            "num_shares": 3,
            "reconstruction_threshold": 2,
            "tolerated_dropouts_per_neighbourhood": 1,
        },
        "stopped": "the budget",
        "rounds_run": 2,
        "rounds_planned": 3,
    }
    assert privacy_lines(report) == [
        "client a: ε = 1.000 (δ = 1e-05), joined rounds [1, 2], round 1 charged 2 times "
        "(redone after a resume)",
        "client b: ε = 0.750 (δ = 1e-05), joined rounds [1], budget refused rounds [2]",
        "client c: ε = 0.250 (δ = 1e-05), joined rounds [1]",
        "client d: ε = 0.000 (δ = 1e-05), joined rounds []",
        f"federation (client-level): ε = {eps:.3f} (δ = 0.0166667, z = 1.5, budget 50.0)",
        "secure aggregation: SecAgg+, the server saw only sums, 3 shares, threshold 2 (tolerates "
        "1 dropouts per round)",
        "training stopped early: the budget",
    ]


def test_the_privacy_report_of_fixed_noise_without_amplification_or_secagg(
    tmp_path: Path,
) -> None:
    cfg = _report_config(
        "privacy.noise_multiplier=1.1",
        "privacy.target_epsilon=None",
        "privacy.client_level.enabled=true",
        "privacy.client_level.noise_multiplier=2.0",
    )
    cl = cfg.privacy.client_level
    mech = plan_federation(cl, cfg.federation, num_clients=6)
    inner = FedAvg(min_train_nodes=3, min_available_nodes=3, fraction_train=0.5)
    dp = ClientLevelDP(inner, cl=cl, mechanism=mech, ledger_path=tmp_path / "fed.json")
    kw: dict[str, Any] = {"history": [], "client_names": [], "examples_per_client": {}}
    report = privacy_report(cfg, client_level=dp, stopped=None, **kw)
    assert report["sample_level"]["noise_multiplier"] == 1.1
    assert report["sample_level"]["noise_multiplier_note"] == "fixed"
    assert report["client_level"]["sampling"] == (
        "no amplification (q = 1): valid for any choice of clients"
    )
    assert report["secure_aggregation"] == {"enabled": False}
    assert (report["rounds_run"], report["stopped"]) == (0, None)
    assert privacy_report(cfg, client_level=None, stopped=None, **kw)["client_level"] == {
        "enabled": False
    }
    plain = _report_config("privacy.secure_aggregation=true")
    assert secure_aggregation_report(plain)["weights"] == "examples"


def test_privacy_lines_on_a_hand_made_report() -> None:
    report = {
        "sample_level": {"enabled": False, "clients": {"x": {}}},
        "client_level": {
            "enabled": True,
            "final_epsilon": 2.0,
            "delta": 0.001,
            "noise_multiplier": 0.123456,
            "budget_epsilon": None,
            "charges_per_round": {"10": 2, "9": 3, "1": 1},
        },
        "secure_aggregation": {"enabled": True},
        "stopped": None,
    }
    assert privacy_lines(report) == [
        "federation (client-level): ε = 2.000 (δ = 0.001, z = 0.1235, budget None), round 9 "
        "charged 3 times (redone after a resume), round 10 charged 2 times (redone after a resume)",
        "secure aggregation: SecAgg+, the server saw only sums",
    ]
    assert privacy_lines({"secure_aggregation": {"enabled": False}, "stopped": ""}) == []
    # Reports of older runs lack the newer keys: the lines do without them.
    older = {
        "sample_level": {
            "enabled": True,
            "delta": 1e-5,
            "clients": {
                "y": {"final_epsilon": 1.0, "rounds_joined": [1, 9, 10]},
                "x": {
                    "final_epsilon": 3.0,
                    "rounds_joined": [9, 10],
                    "charges_per_round": {"10": 2, "9": 3},
                },
            },
        },
        "client_level": {
            "enabled": True,
            "final_epsilon": 2.0,
            "delta": 0.001,
            "noise_multiplier": 1.0,
            "budget_epsilon": 4,
        },
    }
    assert privacy_lines(older) == [
        "client x: ε = 3.000 (δ = 1e-05), joined rounds [9, 10], round 9 charged 3 times (redone "
        "after a resume), round 10 charged 2 times (redone after a resume)",
        "client y: ε = 1.000 (δ = 1e-05), joined rounds [1, 9, 10]",
        "federation (client-level): ε = 2.000 (δ = 0.001, z = 1, budget 4)",
    ]
    assert privacy_lines({"sample_level": {"enabled": True, "delta": 1e-5}}) == []


def test_a_history_without_reported_counts_uses_the_servers(tmp_path: Path) -> None:
    from types import SimpleNamespace

    cfg = _report_config()
    bare = SimpleNamespace(  # a round record without examples_per_client
        round=1, epsilon_per_client={"a": 0.5}, charged_again={}, errors={}, error_codes={}
    )
    report = privacy_report(
        cfg,
        history=[bare],
        client_names=["a"],
        examples_per_client={"a": 40},
        client_level=None,
        stopped=None,
    )
    row = report["sample_level"]["clients"]["a"]
    assert (row["examples"], row["sample_rate"], row["steps_per_round"]) == (40, 0.25, 8)


def test_a_privacy_report_is_read_back(tmp_path: Path) -> None:
    assert load_privacy_report(tmp_path) == {}
    (tmp_path / "privacy.json").write_text(
        json.dumps({"stopped": "ε spent"}, ensure_ascii=False), encoding="utf-8"
    )
    assert load_privacy_report(tmp_path) == {"stopped": "ε spent"}
