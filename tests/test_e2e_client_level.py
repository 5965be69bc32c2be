"""End to end: client-level DP with client-side clipping in a whole federation, budget stop."""

import json

import pytest

from privet.common.config import load_config
from privet.common.privacy.federation import plan_federation
from privet.server.rundir import read_metrics
from privet.server.rundir.privacy_report import plot_privacy
from privet.simulations import simulate

pytestmark = pytest.mark.slow


def test_client_level_dp_accounts_every_round_and_stops_at_the_budget(tmp_path) -> None:
    overrides = [
        "model.num_hidden_layers=1",
        "model.max_length=32",
        "data.max_examples=400",
        "data.num_clients=3",
        "data.server_test_fraction=0.25",
        "federation.rounds=3",
        "federation.fraction_evaluate=0",
        "federation.min_train_clients=3",
        "privacy.target_epsilon=20",
        "privacy.delta=1e-3",
        "train.batch_size=40",
        "train.local_epochs=0.5",
        "privacy.client_level.enabled=true",
        "privacy.client_level.side='client'",
        "privacy.client_level.noise_multiplier=1.0",
        "privacy.client_level.clipping_norm=0.05",
        f"simulation.output_dir='{tmp_path}'",
        "simulation.engine='inprocess'",  # the same apps, without Ray's start-up
        "simulation.run_name='cl'",
    ]
    cfg = load_config(None, overrides)
    mech = plan_federation(cfg.privacy.client_level, cfg.federation, num_clients=3)
    budget = (mech.epsilon_after(2) + mech.epsilon_after(3)) / 2  # room for 2 of 3 rounds
    cfg = load_config(None, [*overrides, f"privacy.client_level.budget_epsilon={budget}"])

    run_dir = simulate(cfg, preflight=False)  # the preflight would refuse this plan (by design)

    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["stopped"] and "round 3 would bring it" in records[-1]["stopped"]
    fed_eps = [r["federation_epsilon"] for r in records[1:3]]
    assert fed_eps == pytest.approx([mech.epsilon_after(1), mech.epsilon_after(2)], abs=1e-9)
    report = json.loads((run_dir / "privacy.json").read_text())
    fed = report["client_level"]
    assert fed["side"] == "client" and fed["clients_per_round"] == 3
    assert [r["updates_aggregated"] for r in fed["rounds"]] == [3, 3]  # every client clipped
    assert fed["final_epsilon"] <= budget
    assert report["stopped"] and report["rounds_run"] == 2
    for c in report["sample_level"]["clients"].values():
        assert c["rounds_joined"] == [1, 2]
        assert 0 < c["final_epsilon"] <= 20
    ledger = json.loads((run_dir / "privacy" / "federation-ledger.json").read_text())
    assert [e["round"] for e in ledger["entries"]] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] and summary["federation_epsilon"] == pytest.approx(fed_eps[-1])
    assert (run_dir / "final_adapter" / "adapter_config.json").exists()
    assert plot_privacy(run_dir) is not None
