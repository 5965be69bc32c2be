"""Client-level DP (DP-FedAvg): mechanism, fixed denominator, accounting, budget stop, config."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from privet.common.config import ClientLevelConfig, FederationConfig, load_config
from privet.common.errors import ConfigError, PrivacyError
from privet.common.privacy.federation import (
    clients_per_round,
    federation_delta,
    plan_federation,
)
from privet.server.privacy import (
    ClientLevelDP,
    FederationBudgetExhausted,
    update_norm,
)

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
