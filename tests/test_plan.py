"""The preflight (``privet plan``): projections equal the run's own accounting; bad budgets refused."""

import pytest

from privet.common.config import load_config
from privet.common.errors import PrivacyError
from privet.common.privacy import calibrate_noise, epsilon_from_history
from privet.simulations.plan import _secagg_plan, check_plan, make_plan

BASE = [
    "model.num_hidden_layers=1",
    "data.max_examples=400",
    "data.num_clients=2",
    "federation.rounds=3",
    "privacy.delta=1e-3",
    "train.batch_size=40",
    "train.local_epochs=0.5",
]


def test_plan_projects_the_calibrated_noise_and_epsilon() -> None:
    cfg = load_config(None, [*BASE, "privacy.target_epsilon=6"])
    plan = make_plan(cfg, with_model=False)
    assert not plan.problems
    check_plan(plan)
    for c in plan.clients:
        assert c.sample_rate == pytest.approx(40 / c.examples)
        assert c.steps_per_round == max(1, round(0.5 / c.sample_rate))
        sigma = calibrate_noise(
            target_epsilon=6,
            delta=1e-3,
            sample_rate=c.sample_rate,
            steps=3 * c.steps_per_round,
            accountant="rdp",
        )
        assert c.noise_multiplier == sigma
        assert c.epsilon_planned == pytest.approx(
            epsilon_from_history(
                [(sigma, c.sample_rate, 3 * c.steps_per_round)], delta=1e-3, accountant="rdp"
            )
        )
        assert c.epsilon_planned is not None and c.epsilon_planned <= 6


def test_fixed_noise_that_cannot_hold_is_refused_naming_the_knob() -> None:
    cfg = load_config(
        None,
        [
            *BASE,
            "privacy.target_epsilon=none",
            "privacy.noise_multiplier=0.7",
            "privacy.budget_epsilon=3",
        ],
    )
    plan = make_plan(cfg, with_model=False)
    assert plan.problems and all(c.rounds_within_budget is not None for c in plan.clients)
    with pytest.raises(
        PrivacyError, match=r"runs out after round \d of 3.*privacy.noise_multiplier"
    ):
        check_plan(plan)


def test_federation_budget_that_cannot_hold_is_refused() -> None:
    cfg = load_config(
        None,
        [
            *BASE,
            "privacy.client_level.enabled=true",
            "privacy.client_level.noise_multiplier=1.0",
            "privacy.client_level.budget_epsilon=2",
            "privacy.client_level.delta=0.1",
        ],
    )
    plan = make_plan(cfg, with_model=False)
    assert len(plan.federation_epsilon_per_round) == 3
    assert plan.federation_epsilon_per_round == sorted(plan.federation_epsilon_per_round)
    with pytest.raises(PrivacyError, match="privacy.client_level.budget_epsilon = 2 runs out"):
        check_plan(plan)


def test_delta_too_large_for_a_client_is_refused() -> None:
    cfg = load_config(None, [*BASE, "privacy.delta=0.1"])
    with pytest.raises(PrivacyError, match="privacy.delta"):
        check_plan(make_plan(cfg, with_model=False))


def test_payload_counts_the_trainable_weights() -> None:
    cfg = load_config(None, [*BASE, "model.max_length=32"])
    plan = make_plan(cfg)
    assert plan.trainable_parameters > 0 and plan.payload_bytes == 4 * plan.trainable_parameters
    assert plan.memory_bytes_estimate > 4 * plan.frozen_parameters


def test_simulate_refuses_before_any_worker_starts(tmp_path) -> None:
    from privet.simulations import simulate

    cfg = load_config(
        None,
        [
            *BASE,
            "privacy.target_epsilon=none",
            "privacy.noise_multiplier=0.7",
            "privacy.budget_epsilon=3",
            f"simulation.output_dir='{tmp_path}'",
        ],
    )
    with pytest.raises(PrivacyError, match="the plan cannot hold"):
        simulate(cfg)
    assert not any(tmp_path.iterdir())  # refused before the run directory was made


def test_rendered_plan_names_the_problem() -> None:
    from rich.console import Console

    from privet.simulations.plan import render_plan

    cfg = load_config(
        None,
        [
            *BASE,
            "privacy.target_epsilon=none",
            "privacy.noise_multiplier=0.7",
            "privacy.budget_epsilon=3",
            "privacy.client_level.enabled=true",
            "privacy.client_level.noise_multiplier=2.0",
            "privacy.client_level.delta=0.1",
        ],
    )
    plan = make_plan(cfg, with_model=False)
    console = Console(record=True, width=200)
    console.print(render_plan(plan, cfg))
    text = console.export_text()
    assert "REFUSED" in text and "budget ends after round" in text
    assert "client-level DP (DP-FedAvg)" in text and "federation ε" in text


def test_secure_aggregation_plan_prints_the_dropout_tolerance_and_refuses_a_coarse_grid() -> None:
    secagg = [
        "data.num_clients=5",
        "privacy.secure_aggregation=true",
        "privacy.client_level.enabled=true",
        "privacy.client_level.side='client'",
        "privacy.client_level.noise_multiplier=1.0",
        "privacy.client_level.clipping_norm=0.01",
    ]
    plan = make_plan(load_config(None, [*BASE, *secagg]), with_model=False)
    sa = plan.secure_aggregation
    assert sa is not None and not plan.problems
    assert (sa["num_shares"], sa["threshold"], sa["tolerated_dropouts"]) == (5, 3, 2)
    # 10,000 weights, 2**22 levels over [-8, 8]: sqrt(1e4) * 16 / 2**22 in L2 norm, below 0.01 / 2
    problems: list[str] = []
    fine = _secagg_plan(load_config(None, [*BASE, *secagg]), 10_000, problems)
    assert fine["upload_bytes"] == 8 * 10_001 and not problems
    assert fine["quantization_slack_l2"] == pytest.approx(100 * 16 / 2**22, rel=1e-12)
    # 2**12 levels: the rounding error alone would exceed half the clip
    coarse = load_config(None, [*BASE, *secagg, "privacy.secagg.quantization_range=4096"])
    _secagg_plan(coarse, 10_000, problems)
    assert len(problems) == 1 and "privacy.secagg.quantization_range" in problems[0]
