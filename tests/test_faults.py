"""The fault plan: seeded choice of attackers, dropouts and delays, and what each attack sends."""

from __future__ import annotations

import numpy as np
import pytest

from privet.common.config import FaultsConfig
from privet.common.data import ClientData, Examples
from privet.simulations.faults import FaultPlan

from .flower_fakes import arrays


def _plan(**kw: object) -> FaultPlan:
    return FaultPlan(FaultsConfig(**kw), num_clients=10, round_timeout=30.0)


def test_attackers_are_a_seeded_fraction() -> None:
    a = _plan(byzantine_fraction=0.2, seed=1).byzantine
    assert len(a) == 2 and a == _plan(byzantine_fraction=0.2, seed=1).byzantine
    assert all(0 <= i < 10 for i in a)
    assert _plan().byzantine == frozenset()


def test_dropout_rate_and_determinism() -> None:
    plan = _plan(dropout=0.3, seed=4)
    draws = [plan.drops_out(p, r) for p in range(10) for r in range(1, 201)]
    assert 0.25 < np.mean(draws) < 0.35
    assert draws == [plan.drops_out(p, r) for p in range(10) for r in range(1, 201)]


def test_straggler_delays_follow_the_distribution() -> None:
    fixed = _plan(straggler_fraction=0.5, straggler_delay="fixed", straggler_delay_mean=7.0)
    slow = sorted(fixed.stragglers)
    assert len(slow) == 5
    assert fixed.delay(slow[0], 1) == 7.0
    punctual = next(p for p in range(10) if p not in fixed.stragglers)
    assert fixed.delay(punctual, 1) == 0.0
    expo = _plan(straggler_fraction=1.0, straggler_delay_mean=10.0)
    d = [expo.delay(p, r) for p in range(10) for r in range(300)]
    assert 9.0 < np.mean(d) < 11.0
    # with a 30 s timeout, P(exp(10) > 30) = e^-3 ~ 5% of the replies are lost
    assert 0.03 < np.mean([x > 30.0 for x in d]) < 0.07
    uni = _plan(straggler_fraction=1.0, straggler_delay="uniform", straggler_delay_mean=2.0)
    assert all(0.0 <= uni.delay(p, 1) <= 4.0 for p in range(10))


SENT = {"w": [1.0, 1.0], "m": [[0.0, 0.0], [0.0, 0.0]]}
HONEST = {"w": [2.0, 0.0], "m": [[1.0, 1.0], [1.0, 1.0]]}


@pytest.mark.parametrize(
    ("attack", "expected_w"),
    [
        ("sign_flip", [1.0 - 3.0 * 1.0, 1.0 - 3.0 * -1.0]),  # w - s (local - w), s = 3
        ("scale", [1.0 + 3.0, 1.0 - 3.0]),  # w + s (local - w)
        ("label_flip", [2.0, 0.0]),  # the update itself is honest
    ],
)
def test_update_attacks(attack: str, expected_w: list[float]) -> None:
    plan = _plan(byzantine_fraction=0.1, attack=attack, attack_scale=3.0)
    out = plan.corrupt(arrays(SENT), arrays(HONEST), partition=0, server_round=1)
    assert out["w"].numpy().tolist() == expected_w
    assert out["w"].numpy().dtype == np.float32


def test_nan_gaussian_and_wrong_shape() -> None:
    nan = _plan(attack="nan").corrupt(arrays(SENT), arrays(HONEST), partition=0, server_round=1)
    assert np.isnan(nan["w"].numpy()).all()
    shape = _plan(attack="wrong_shape").corrupt(
        arrays(SENT), arrays(HONEST), partition=0, server_round=1
    )
    assert shape["w"].numpy().shape == (1,) and shape["m"].numpy().shape == (2, 2)
    g = _plan(attack="gaussian", noise_std=2.0)
    one = g.corrupt(arrays(SENT), arrays(HONEST), partition=0, server_round=1)
    two = g.corrupt(arrays(SENT), arrays(HONEST), partition=0, server_round=1)
    assert np.array_equal(one["m"].numpy(), two["m"].numpy())  # seeded
    assert not np.array_equal(one["m"].numpy(), np.zeros((2, 2)))


def test_label_flip_changes_only_an_attackers_training_labels() -> None:
    plan = _plan(byzantine_fraction=0.1, attack="label_flip")
    (attacker,) = plan.byzantine
    honest = next(p for p in range(10) if p != attacker)
    data = ClientData(
        name="c",
        train=Examples(texts=["a", "b", "c"], labels=np.array([0, 1, 1])),
        test=Examples(texts=["d"], labels=np.array([1])),
    )
    flipped = plan.flip_labels(attacker, data)
    assert flipped.train.labels.tolist() == [1, 0, 0]
    assert flipped.test.labels.tolist() == [1]
    assert plan.flip_labels(honest, data) is data


def test_the_ray_engine_gets_the_fault_mod_and_it_survives_ray_serialization(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``simulate`` hands Flower's Ray engine applies ``[faults]``, after a cloudpickle round trip.

    No Ray is started: Flower's ``run_simulation`` is replaced by a stand-in that keeps the
    ClientApp, which Ray's ``actor.run.remote(app_fn, ...)`` would ship to a worker by cloudpickle.
    Dropouts and a straggler far over the timeout answer from the mod before any training.
    """
    import flwr.simulation
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from ray import cloudpickle

    import privet.simulations.run as run_mod
    from privet.common.config import load_config
    from privet.simulations.faults import ERROR_DROPOUT, ERROR_LATE

    from .flower_fakes import run_identity

    got: dict[str, object] = {}

    def fake_run_simulation(*, server_app, client_app, num_supernodes, backend_config, **_):  # type: ignore[no-untyped-def]
        got.update(client_app=client_app, nodes=num_supernodes)

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    monkeypatch.setattr(run_mod, "_start_ray", lambda init_args: 0.0)
    monkeypatch.setattr(run_mod, "_ray_shutdown", lambda *_: None)

    def shipped(*sets: str):  # type: ignore[no-untyped-def]
        got.clear()
        cfg = load_config(
            None,
            [
                "model.num_hidden_layers=1",
                "data.max_examples=100",
                "data.num_clients=3",
                "federation.round_timeout=5",
                "simulation.engine='ray'",
                f"simulation.output_dir='{tmp_path}'",
                *sets,
            ],
        )
        run_mod.simulate(cfg, preflight=False)
        assert got["nodes"] == 3
        return cloudpickle.loads(cloudpickle.dumps(got["client_app"]))

    def train_reply(app, partition: int):  # type: ignore[no-untyped-def]
        ctx = Context(
            run_id=1,
            node_id=partition + 1,
            node_config={"partition-id": partition, "num-partitions": 3},
            state=RecordDict(),
            run_config={},
        )
        msg = Message(
            RecordDict({"config": ConfigRecord({"server-round": 1})}),
            dst_node_id=partition + 1,
            message_type="train",
        )
        return app(msg, ctx)

    with run_identity():
        app = shipped("faults.dropout=0.9", "simulation.run_name='drop'")
        plan = FaultPlan(FaultsConfig(dropout=0.9), num_clients=3, round_timeout=5.0)
        dropped = [p for p in range(3) if plan.drops_out(p, 1)]
        assert dropped  # 1 - 0.1^3 likely, and fixed by the default seed
        assert [train_reply(app, p).error.code for p in dropped] == [ERROR_DROPOUT] * len(dropped)
        app = shipped(
            "faults.straggler_fraction=1.0",
            "faults.straggler_delay='fixed'",
            "faults.straggler_delay_mean=60",
            "simulation.run_name='late'",
        )
        reply = train_reply(app, 1)
        assert (
            reply.error.code == ERROR_LATE
            and "exceeds the round timeout of 5 s" in reply.error.reason
        )
