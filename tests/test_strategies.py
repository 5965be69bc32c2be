"""Every federation.strategy aggregates hand-made replies to the result its rule prescribes."""

from __future__ import annotations

import numpy as np
import pytest

from privet.common.config import STRATEGIES, load_config
from privet.common.errors import ConfigError
from privet.server.strategies import build_strategy

from .flower_fakes import NodesGrid, arrays, reply, run_identity


@pytest.fixture(autouse=True)
def _identity():
    with run_identity():
        yield


def _strategy(name: str, n: int, *sets: str):
    cfg = load_config(None, [f"federation.strategy='{name}'", f"data.num_clients={n}", *sets])
    return build_strategy(cfg.federation, num_clients=n, aggregation=cfg.aggregation)


def _round(strategy, start: dict, replies: list, server_round: int = 1) -> dict:
    """configure_train (so server optimizers see the global arrays) then aggregate_train."""
    grid = NodesGrid(range(1, len(replies) + 1))
    list(strategy.configure_train(server_round, arrays(start), _cfg(), grid))
    out, _ = strategy.aggregate_train(server_round, replies)
    assert out is not None
    return {k: v.numpy() for k, v in out.items()}


def _cfg():
    from flwr.app import ConfigRecord

    return ConfigRecord({})


def test_every_strategy_name_builds_flowers_class() -> None:
    expected = {
        "fedavg": "FedAvg",
        "fedprox": "FedProx",
        "fedavgm": "FedAvgM",
        "fedadam": "FedAdam",
        "fedyogi": "FedYogi",
        "fedadagrad": "FedAdagrad",
        "fedmedian": "FedMedian",
        "fedtrimmedavg": "FedTrimmedAvg",
        "krum": "Krum",
        "multikrum": "MultiKrum",
        "bulyan": "Bulyan",
    }
    assert set(expected) == set(STRATEGIES)
    for name, cls in expected.items():
        s = _strategy(name, 7)
        assert type(s).__name__ == cls
        assert type(s).__module__.startswith("flwr.serverapp.strategy")


def test_fedavg_weights_by_examples() -> None:
    out = _round(
        _strategy("fedavg", 2),
        {"w": [0.0, 0.0]},
        [reply(1, {"w": [0.0, 4.0]}, n=1), reply(2, {"w": [4.0, 0.0]}, n=3)],
    )
    assert out["w"].tolist() == [3.0, 1.0]


def test_fedprox_averages_and_sends_mu() -> None:
    s = _strategy("fedprox", 2, "aggregation.proximal_mu=0.25")
    msgs = list(s.configure_train(1, arrays({"w": [0.0]}), _cfg(), NodesGrid([1, 2])))
    assert all(m.content.config_records["config"]["proximal-mu"] == 0.25 for m in msgs)
    out, _ = s.aggregate_train(1, [reply(1, {"w": [1.0]}, n=1), reply(2, {"w": [3.0]}, n=1)])
    assert out["w"].numpy().tolist() == [2.0]


def test_fedavgm_applies_server_momentum() -> None:
    s = _strategy(
        "fedavgm", 2, "aggregation.server_momentum=0.5", "aggregation.server_learning_rate=1.0"
    )
    # round 1: pseudo-gradient g1 = x0 - mean = -2, momentum v1 = g1, x1 = x0 - v1 = 2
    x1 = _round(s, {"w": [0.0]}, [reply(1, {"w": [2.0]}), reply(2, {"w": [2.0]})])
    assert x1["w"].tolist() == [2.0]
    # round 2: mean 3, g2 = -1, v2 = 0.5 * -2 + -1 = -2, x2 = 2 + 2 = 4 (plain FedAvg: 3)
    x2 = _round(s, x1, [reply(1, {"w": [3.0]}), reply(2, {"w": [3.0]})], server_round=2)
    assert x2["w"].tolist() == [4.0]


def test_fedadagrad_step() -> None:
    s = _strategy("fedadagrad", 2, "aggregation.eta=0.5", "aggregation.tau=1.0")
    # delta = mean - x0 = [1, -4]; m = delta (beta_1 = 0); v = delta^2;
    # x1 = x0 + eta * delta / (|delta| + tau) = [0.5 * 1/2, 0.5 * -4/5] = [0.25, -0.4]
    out = _round(s, {"w": [0.0, 0.0]}, [reply(1, {"w": [1.0, -4.0]}), reply(2, {"w": [1.0, -4.0]})])
    np.testing.assert_allclose(out["w"], [0.25, -0.4], rtol=1e-6)


def test_fedadam_first_step() -> None:
    s = _strategy("fedadam", 2, "aggregation.eta=0.1", "aggregation.tau=0.001")
    # delta = 2; m = 0.1 * 2 = 0.2; v = 0.01 * 4 = 0.04;
    # eta_norm = 0.1 * sqrt(1 - 0.99^2) / (1 - 0.9^2); x1 = 1 + eta_norm * 0.2 / (0.2 + 0.001)
    out = _round(s, {"w": [1.0]}, [reply(1, {"w": [3.0]}), reply(2, {"w": [3.0]})])
    eta_norm = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    np.testing.assert_allclose(out["w"], [1.0 + eta_norm * 0.2 / 0.201], rtol=1e-6)


def test_fedyogi_first_step() -> None:
    s = _strategy("fedyogi", 2, "aggregation.eta=0.1", "aggregation.tau=0.001")
    # delta = -2; m = 0.1 * -2 = -0.2; v = 0 - 0.01 * 4 * sign(0 - 4) = 0.04;
    # x1 = 1 + 0.1 * -0.2 / (0.2 + 0.001)
    out = _round(s, {"w": [1.0]}, [reply(1, {"w": [-1.0]}), reply(2, {"w": [-1.0]})])
    np.testing.assert_allclose(out["w"], [1.0 - 0.02 / 0.201], rtol=1e-6)


def test_fedmedian_ignores_the_outlier() -> None:
    out = _round(
        _strategy("fedmedian", 3),
        {"w": [0.0, 0.0]},
        [reply(1, {"w": [1.0, 5.0]}), reply(2, {"w": [100.0, -7.0]}), reply(3, {"w": [2.0, 6.0]})],
    )
    assert out["w"].tolist() == [2.0, 5.0]


def test_fedtrimmedavg_cuts_each_end() -> None:
    out = _round(
        _strategy("fedtrimmedavg", 5, "aggregation.trim_beta=0.2"),
        {"w": [0.0]},
        [reply(i + 1, {"w": [v]}) for i, v in enumerate([3.0, -50.0, 1.0, 100.0, 2.0])],
    )
    assert out["w"].tolist() == [2.0]  # mean of 1, 2, 3


POINTS = [0.0, 1.0, 2.0, 4.0, 100.0]


def test_krum_selects_the_most_central_reply() -> None:
    # n = 5, f = 1: score = squared distances to the n - f - 2 = 2 nearest others:
    # 0 -> 1 + 4 = 5, 1 -> 1 + 1 = 2, 2 -> 1 + 4 = 5, 4 -> 4 + 9 = 13, 100 -> 96^2 + 98^2
    out = _round(
        _strategy("krum", 5, "aggregation.num_malicious=1"),
        {"w": [0.0]},
        [reply(i + 1, {"w": [v]}) for i, v in enumerate(POINTS)],
    )
    assert out["w"].tolist() == [1.0]


def test_multikrum_averages_the_best_scored() -> None:
    # the three lowest scores (2, 5, 5) are the points 1, 0, 2; averaged weighted by examples
    out = _round(
        _strategy("multikrum", 5, "aggregation.num_malicious=1", "aggregation.num_selected=3"),
        {"w": [0.0]},
        [reply(i + 1, {"w": [v]}, n=2 if v == 2.0 else 1) for i, v in enumerate(POINTS)],
    )
    assert out["w"].tolist() == [(0.0 + 1.0 + 2 * 2.0) / 4]


def test_multikrum_default_selects_n_minus_f() -> None:
    s = _strategy("multikrum", 5, "aggregation.num_malicious=1")
    assert s.num_nodes_to_select == 4


def test_bulyan_median_of_krum_selection() -> None:
    # n = 7, f = 1: Krum picks theta = n - 2f = 5 replies one by one ({0, 1, 2, 3, 4}: the far 6 and
    # 100 lose), then each coordinate averages the beta = theta - 2f = 3 values closest to their
    # median 2: {1, 2, 3} -> 2.
    out = _round(
        _strategy("bulyan", 7, "aggregation.num_malicious=1"),
        {"w": [0.0]},
        [reply(i + 1, {"w": [v]}) for i, v in enumerate([0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 100.0])],
    )
    assert out["w"].tolist() == [2.0]


def test_server_optimizers_keep_lora_shapes_and_keys() -> None:
    """FedAdam on a LoRA-like state (matrices of different shapes) returns the same keys/shapes."""
    rng = np.random.default_rng(0)
    start = {
        "a.lora_B.default.weight": np.zeros((6, 2)),
        "classifier.weight": rng.normal(size=(2, 6)),
    }
    reps = [
        reply(i + 1, {k: v + rng.normal(size=v.shape) * 0.01 for k, v in start.items()})
        for i in range(3)
    ]
    out = _round(_strategy("fedadam", 3), start, reps)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in start.items()}
    assert all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["federation.strategy='krum'", "data.num_clients=4"], "n >= 2f+3 = 5"),
        (
            ["federation.strategy='bulyan'", "data.num_clients=6", "aggregation.num_malicious=1"],
            "n >= 4f+3 = 7",
        ),
        (["federation.strategy='fedavg'", "aggregation.proximal_mu=0.1"], "only used by fedprox"),
        (["federation.strategy='fedmedian'", "data.num_clients=2"], "at least 3 replies"),
        (
            [
                "federation.strategy='fedtrimmedavg'",
                "data.num_clients=4",
                "aggregation.trim_beta=0.2",
            ],
            "plain averaging",
        ),
        (
            [
                "federation.strategy='multikrum'",
                "data.num_clients=5",
                "aggregation.num_selected=5",
            ],
            "exceeds n - f = 4",
        ),
        (["aggregation.lora='svd'"], "nothing to correct"),
        (
            [
                "adapter.freeze_a=false",
                "aggregation.lora='svd'",
                "federation.strategy='fedmedian'",
                "data.num_clients=3",
            ],
            "use fedavg or fedprox",
        ),
        (["adapter.freeze_a=false", "aggregation.require_exact_lora=true"], "FFA-LoRA"),
        (["aggregation.lora='fedex'"], "nothing to correct"),
        (
            [
                "adapter.freeze_a=false",
                "aggregation.lora='fedex'",
                "federation.strategy='fedadam'",
            ],
            "use fedavg or fedprox",
        ),
        (
            [
                "adapter.freeze_a=false",
                "aggregation.lora='fedex'",
                "privacy.client_level.enabled=true",
                "privacy.client_level.noise_multiplier=1.0",
            ],
            "accountant does not cover",
        ),
        (
            ["adapter.freeze_a=false", "aggregation.lora='fedex'", "federation.transport='int8'"],
            "use transport = 'float32'",
        ),
    ],
)
def test_impossible_combinations_are_refused_with_the_reason(sets: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, sets)
    assert needle in str(exc.value)


def test_sampling_fraction_counts_toward_the_krum_bound() -> None:
    # 10 clients, 40% sampled = 4 per round < 2f+3 = 5
    with pytest.raises(ConfigError, match="4 clients are sampled"):
        load_config(
            None,
            ["federation.strategy='krum'", "data.num_clients=10", "federation.fraction_train=0.4"],
        )
    load_config(
        None, ["federation.strategy='krum'", "data.num_clients=10", "federation.fraction_train=0.5"]
    )


def test_require_plain_averaging_refuses_robust_rules() -> None:
    from privet.common.config import require_plain_averaging

    cfg = load_config(None, ["federation.strategy='fedmedian'", "data.num_clients=3"])
    with pytest.raises(ValueError, match="cannot be combined with privacy.x: because"):
        require_plain_averaging(cfg, feature="privacy.x", why="because")
    require_plain_averaging(load_config(None, []), feature="privacy.x", why="because")


def test_a_dumped_config_with_every_default_loads_again() -> None:
    from privet.common.config import dump_config

    cfg = load_config(None, ["federation.strategy='fedadam'", "aggregation.eta=0.05"])
    import tomllib

    from privet.common.config import PrivetConfig

    assert PrivetConfig.model_validate(tomllib.loads(dump_config(cfg))) == cfg
