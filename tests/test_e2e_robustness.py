"""Whole federations (in-process engine) with misbehaving clients: rejected, or outvoted."""

from __future__ import annotations

import math

import pytest

from privet.common.config import load_config
from privet.server.rundir import read_metrics
from privet.simulations import simulate
from privet.simulations.faults import FaultPlan

pytestmark = pytest.mark.slow

# Small enough for a CPU test, large enough to learn in three rounds (non-private: the test is
# about aggregation, and DP noise would blur a 3-point comparison).
BASE = [
    "model.num_hidden_layers=1",
    "model.max_length=32",
    "data.max_examples=600",
    "data.num_clients=5",
    "data.server_test_fraction=0.3",
    "federation.rounds=3",
    "federation.fraction_evaluate=0",
    "privacy.enabled=false",
    "train.local_epochs=2",
    "train.batch_size=16",
    "train.lr=0.02",
    "train.num_threads=1",
    "simulation.engine='inprocess'",
]


def _final(tmp_path, name: str, *sets: str) -> float:
    cfg = load_config(
        None, [*BASE, *sets, f"simulation.output_dir='{tmp_path}'", f"simulation.run_name='{name}'"]
    )
    records = read_metrics(simulate(cfg))
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    return float(records[-1]["server_accuracy"])


def test_a_robust_strategy_shrugs_off_sign_flippers_that_wreck_fedavg(tmp_path) -> None:
    attack = ["faults.byzantine_fraction=0.2", "faults.attack='sign_flip'", "faults.attack_scale=4"]
    clean = _final(tmp_path, "clean")
    fedavg = _final(tmp_path, "fedavg", *attack)
    median = _final(tmp_path, "median", *attack, "federation.strategy='fedmedian'")
    print(f"clean {clean:.3f}, fedavg attacked {fedavg:.3f}, fedmedian attacked {median:.3f}")
    assert clean > 0.62  # the clean run learned (untrained: about 0.53)
    assert median >= clean - 0.03
    assert fedavg <= clean - 0.06


def test_nan_attackers_are_rejected_and_the_rounds_go_on(tmp_path) -> None:
    cfg = load_config(
        None,
        [
            *BASE,
            "data.max_examples=200",
            "federation.rounds=2",
            "train.local_epochs=0.5",
            "faults.byzantine_fraction=0.2",
            "faults.attack='nan'",
            f"simulation.output_dir='{tmp_path}'",
        ],
    )
    (attacker,) = FaultPlan(cfg.faults, num_clients=5, round_timeout=1.0).byzantine
    records = read_metrics(simulate(cfg))
    for rec in records[1:]:
        assert list(rec["rejected"]) == [f"client-{attacker}"]
        assert "NaN" in rec["rejected"][f"client-{attacker}"]
        assert rec["aggregated"] is True
        assert len(rec["clients_trained"]) == 4
        assert math.isfinite(rec["server_accuracy"])
