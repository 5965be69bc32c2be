"""A client whose budget is spent refuses to train; the server logs the refusal and goes on."""

import json

import pytest

from privet.common.config import load_config
from privet.server.rundir import read_metrics
from privet.simulations import simulate

pytestmark = pytest.mark.slow


def test_exhausted_budget_refuses_and_the_run_goes_on(tmp_path) -> None:
    cfg = load_config(
        None,
        [
            "model.num_hidden_layers=1",
            "model.max_length=32",
            "data.max_examples=400",
            "data.num_clients=2",
            "data.server_test_fraction=0.25",
            "federation.rounds=3",
            "federation.fraction_evaluate=0",
            # a fixed noise that spends ~3.5 of the budget of 4 in round 1: round 2 must be refused
            "privacy.target_epsilon=none",
            "privacy.noise_multiplier=1.0",
            "privacy.budget_epsilon=4.0",
            "privacy.delta=1e-3",
            "train.batch_size=40",
            "train.local_epochs=1",
            f"simulation.output_dir='{tmp_path}'",
            "simulation.engine='inprocess'",  # the same apps, without Ray's start-up
            "simulation.run_name='budget'",
        ],
    )
    # The preflight would refuse this plan; the test is about the budget enforced at run time.
    run_dir = simulate(cfg, preflight=False)
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert len(records[1]["clients_trained"]) == 2 and not records[1]["errors"]
    for r in records[2:]:
        assert r["clients_trained"] == []
        assert len(r["errors"]) == 2
        assert all("budget" in why for why in r["errors"].values())
    for path in (run_dir / "clients").glob("ledger-*.json"):
        ledger = json.loads(path.read_text())
        assert [e["round"] for e in ledger["entries"]] == [1]  # nothing recorded past the budget
        assert 0 < ledger["entries"][0]["epsilon_after"] <= 4.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0 < summary["max_epsilon"] <= 4.0
    assert (run_dir / "final_adapter" / "adapter_config.json").exists()
