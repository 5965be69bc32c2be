"""The one privacy arithmetic (common/privacy/mechanism.py): exact numbers on hand-made inputs,
golden noise levels equal to what the code computed before the arithmetic moved there, and every
caller (client, server, plan, report, federation) agreeing with it by construction."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from privet.client.privacy import plan_round
from privet.client.training import plan_steps
from privet.common.config import (
    ClientLevelConfig,
    FederationConfig,
    PrivacyConfig,
    TrainConfig,
    load_config,
    sampled_per_round,
)
from privet.common.errors import PrivacyError
from privet.common.privacy import (
    Mechanism,
    Sampling,
    accountant_steps,
    client_sampling,
    epsilon_from_history,
    example_sampling,
    flower_sample_size,
    open_ledger,
    round_mechanism,
)
from privet.common.privacy.federation import clients_per_round, plan_federation
from privet.server.rundir.privacy_report import privacy_report
from privet.server.strategies import _expected_replies

# Noise multipliers the code computed before the arithmetic moved into mechanism.py (commit
# 515c7a1: calibrate_noise as plan_round called it, plan_round itself, plan_federation; same
# inputs), pinned to 1e-12: behaviour must not change.
GOLDEN_EXAMPLE_SIGMA = 0.8576104402617554  # q = 0.1, 10 steps x 5 rounds, eps 8, delta 1e-5, RDP
GOLDEN_PLAN_ROUND_SIGMA = 1.2919136575099752  # 400 examples, batch 64, 3 epochs, 5 rounds, eps 8
GOLDEN_CLIENT_SIGMA = 4.3931225729426355  # 5 of 20 clients, q = 1, 10 rounds, eps 2


@pytest.mark.parametrize(
    ("population", "fraction", "minimum", "expected"),
    [
        (10, 0.5, 2, 5),  # int(10 * 0.5)
        (10, 0.1, 3, 3),  # the minimum wins
        (4, 1.0, 10, 4),  # the minimum is capped at N
        (3, 0.0, 5, 3),
        (7, 0.33, 1, 2),  # int(2.31): Flower truncates
        (7, 0.99, 1, 6),  # int(6.93)
        (1, 0.5, 1, 1),
        (20, 0.25, 2, 5),
    ],
)
def test_flower_sample_size(population: int, fraction: float, minimum: int, expected: int) -> None:
    assert flower_sample_size(population, fraction=fraction, minimum=minimum) == expected


@pytest.mark.parametrize("population", [0, -3])
def test_flower_sample_size_needs_a_client(population: int) -> None:
    with pytest.raises(PrivacyError, match="at least one client"):
        flower_sample_size(population, fraction=0.5, minimum=1)


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "expected"),
    [
        (1000, 100, 1.0, Sampling(sample_rate=0.1, steps=10, per_round=100, population=1000)),
        (1000, 100, 0.25, Sampling(sample_rate=0.1, steps=2, per_round=100, population=1000)),
        (1000, 300, 0.5, Sampling(sample_rate=0.3, steps=2, per_round=300, population=1000)),
        (50, 100, 2.0, Sampling(sample_rate=1.0, steps=2, per_round=50, population=50)),
        (3, 2, 0.01, Sampling(sample_rate=2 / 3, steps=1, per_round=2, population=3)),
        (400, 64, 3.0, Sampling(sample_rate=0.16, steps=19, per_round=64, population=400)),
        (1, 5, 1.0, Sampling(sample_rate=1.0, steps=1, per_round=1, population=1)),  # one example
        (5, 1, 1.0, Sampling(sample_rate=0.2, steps=5, per_round=1, population=5)),  # batches of 1
    ],
)
def test_example_sampling(n: int, batch: int, epochs: float, expected: Sampling) -> None:
    got = example_sampling(n, batch_size=batch, local_epochs=epochs)
    assert got == expected
    # The client's training loop takes the same rate and step count.
    assert plan_steps(n, TrainConfig(batch_size=batch, local_epochs=epochs)) == (
        expected.sample_rate,
        expected.steps,
    )


@pytest.mark.parametrize("n", [0, -1])
def test_example_sampling_needs_examples(n: int) -> None:
    with pytest.raises(ValueError, match="^no training examples$"):
        example_sampling(n, batch_size=10, local_epochs=1.0)


def test_accountant_steps_rounds_half_to_even_and_never_below_one() -> None:
    assert accountant_steps(sample_rate=0.5, epochs=1.25) == 2  # round(2.5) == 2
    assert accountant_steps(sample_rate=0.5, epochs=1.75) == 4  # round(3.5) == 4
    assert accountant_steps(sample_rate=1.0, epochs=1e-9) == 1
    assert accountant_steps(sample_rate=1.0, epochs=1.0) == 1
    for q, epochs in [(0.0, 1.0), (1.5, 1.0), (math.nan, 1.0), (0.5, 0.0), (0.5, math.inf)]:
        with pytest.raises(PrivacyError):
            accountant_steps(sample_rate=q, epochs=epochs)


@pytest.mark.parametrize(
    ("amplification", "expected"),
    [
        (True, Sampling(sample_rate=0.25, steps=1, per_round=5, population=20)),
        (False, Sampling(sample_rate=1.0, steps=1, per_round=5, population=20)),
    ],
)
def test_client_sampling(amplification: bool, expected: Sampling) -> None:
    got = client_sampling(20, fraction=0.25, minimum=2, amplification=amplification)
    assert got == expected


SAMPLING = Sampling(sample_rate=0.1, steps=10, per_round=100, population=1000)


def test_a_fixed_noise_is_taken_as_it_is() -> None:
    mech = round_mechanism(
        SAMPLING, rounds=5, delta=1e-5, accountant="rdp", noise_multiplier=1.3, target_epsilon=8.0
    )
    assert mech == Mechanism(noise_multiplier=1.3, sample_rate=0.1, steps=10, calibrated=False)
    assert mech.history_entry() == (1.3, 0.1, 10)
    assert mech.history_entry(5) == (1.3, 0.1, 50)


@pytest.mark.filterwarnings("ignore:Optimal order:UserWarning")
def test_a_target_is_calibrated_over_all_rounds_and_never_overshot() -> None:
    mech = round_mechanism(SAMPLING, rounds=5, delta=1e-5, accountant="rdp", target_epsilon=8.0)
    assert mech.calibrated and (mech.sample_rate, mech.steps) == (0.1, 10)
    assert mech.noise_multiplier == pytest.approx(GOLDEN_EXAMPLE_SIGMA, abs=1e-12)
    eps = epsilon_from_history([mech.history_entry(5)], delta=1e-5, accountant="rdp")
    assert 8.0 - 0.01 <= eps <= 8.0
    # A prior history leaves less to spend: more noise for the same target.
    later = round_mechanism(
        SAMPLING,
        rounds=2,
        delta=1e-5,
        accountant="rdp",
        target_epsilon=8.0,
        prior_history=[mech.history_entry(3)],
    )
    assert later.noise_multiplier > 0
    total = epsilon_from_history(
        [mech.history_entry(3), later.history_entry(2)], delta=1e-5, accountant="rdp"
    )
    assert 8.0 - 0.01 <= total <= 8.0


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.nan, math.inf])
def test_a_noise_that_is_not_positive_and_finite_is_refused(sigma: float) -> None:
    with pytest.raises(PrivacyError, match="finite number > 0"):
        round_mechanism(SAMPLING, rounds=1, delta=1e-5, accountant="rdp", noise_multiplier=sigma)


def test_neither_noise_nor_target_is_refused() -> None:
    with pytest.raises(PrivacyError) as info:
        round_mechanism(SAMPLING, rounds=1, delta=1e-5, accountant="rdp")
    assert info.value.message == (
        "a DP mechanism needs a noise multiplier or a target epsilon, got neither"
    )
    assert info.value.fix == "set privacy.target_epsilon (or privacy.noise_multiplier)"


# ---- every caller agrees ------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Optimal order:UserWarning")
def test_the_client_ledger_and_privacy_json_agree(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "train.batch_size=64",
            "train.local_epochs=3.0",
            "privacy.target_epsilon=8.0",
            "privacy.delta=1e-5",
            "federation.rounds=5",
        ],
    )
    plan = plan_round(
        privacy=cfg.privacy,
        train=cfg.train,
        num_examples=400,
        total_rounds=5,
        state_dir=tmp_path,
        client_id="a",
    )
    assert plan.dp is not None
    expected = round_mechanism(
        example_sampling(400, batch_size=64, local_epochs=3.0),
        rounds=5,
        delta=1e-5,
        accountant=cfg.privacy.accountant,
        target_epsilon=8.0,
    )
    assert (plan.dp.noise_multiplier, plan.dp.sample_rate, plan.dp.steps) == (
        expected.noise_multiplier,
        0.16,
        19,
    )
    assert plan.dp.noise_multiplier == pytest.approx(GOLDEN_PLAN_ROUND_SIGMA, abs=1e-12)
    # The ledger stores the calibrated noise; a second round reuses it without calibrating.
    ledger = open_ledger(
        tmp_path / "ledger-a.json",
        client_id="a",
        accountant=cfg.privacy.accountant,
        delta=1e-5,
        budget_epsilon=cfg.privacy.effective_budget,
    )
    assert ledger.planned_noise_multiplier == expected.noise_multiplier
    report = privacy_report(
        cfg,
        history=[],
        client_names=["a"],
        examples_per_client={"a": 400},
        client_level=None,
        stopped=None,
    )
    row = report["sample_level"]["clients"]["a"]
    assert (row["sample_rate"], row["steps_per_round"]) == (plan.dp.sample_rate, plan.dp.steps)


def test_a_client_with_fixed_noise_keeps_it(tmp_path: Path) -> None:
    plan = plan_round(
        privacy=PrivacyConfig(noise_multiplier=1.1, target_epsilon=None),
        train=TrainConfig(batch_size=100, local_epochs=1.0),
        num_examples=1000,
        total_rounds=3,
        state_dir=tmp_path,
        client_id="b",
    )
    assert plan.dp is not None and plan.ledger is not None
    assert (plan.dp.noise_multiplier, plan.dp.sample_rate, plan.dp.steps) == (1.1, 0.1, 10)
    assert plan.ledger.planned_noise_multiplier is None  # nothing calibrated, nothing stored


def test_every_per_round_sample_size_is_flowers() -> None:
    cfg = load_config(
        None,
        ["data.num_clients=20", "federation.fraction_train=0.25", "federation.min_train_clients=2"],
    )
    fed = cfg.federation
    assert sampled_per_round(cfg) == 5
    assert clients_per_round(fed, num_clients=20) == 5
    assert _expected_replies(fed, 20) == 5


@pytest.mark.filterwarnings("ignore:Optimal order:UserWarning")
def test_the_federation_mechanism_is_the_round_mechanism() -> None:
    cl = ClientLevelConfig(enabled=True, target_epsilon=2.0, clipping_norm=1.0)
    fed = FederationConfig(rounds=10, fraction_train=0.25, min_train_clients=2)
    mech = plan_federation(cl, fed, num_clients=20)
    assert (mech.clients_per_round, mech.sample_rate, mech.delta) == (5, 1.0, 0.005)
    assert mech.noise_multiplier == pytest.approx(GOLDEN_CLIENT_SIGMA, abs=1e-12)
    fixed = plan_federation(
        ClientLevelConfig(enabled=True, noise_multiplier=0.7, clipping_norm=1.0),
        fed,
        num_clients=20,
    )
    assert fixed.noise_multiplier == 0.7
    assert fixed.epsilon_after(10) == epsilon_from_history(
        [(0.7, 1.0, 10)], delta=0.005, accountant=cl.accountant
    )
    amplified = plan_federation(
        ClientLevelConfig(
            enabled=True, noise_multiplier=0.7, clipping_norm=1.0, sampling_amplification=True
        ),
        fed,
        num_clients=20,
    )
    assert (amplified.sample_rate, amplified.clients_per_round) == (0.25, 5)
