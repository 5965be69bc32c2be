"""The client's privacy engine: one place that owns its privacy state.

Before a round it reads the ledger (the source of truth for the client's cumulative epsilon),
decides the noise, and refuses the round if it would pass the budget; after the round it records
the steps actually taken, atomically, *before* the update leaves the client.  Nothing here is
recreated per round from scratch: the accountant history lives on disk, so epsilon is cumulative
across rounds and across restarts of the client process.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from privet.client.training import DPSettings, TrainResult
from privet.common.config import PrivacyConfig, TrainConfig
from privet.common.errors import PrivacyError
from privet.common.modeling import readout_scale
from privet.common.privacy import (
    Ledger,
    example_sampling,
    open_ledger,
    readout_center_minimum,
    round_mechanism,
    save_ledger,
)

__all__ = [
    "RoundPrivacy",
    "ledger_path",
    "plan_round",
    "readout_direction",
    "record_round",
]

log = logging.getLogger("privet")


def ledger_path(state_dir: Path, client_id: str) -> Path:
    """Where a client keeps its ledger inside its state directory."""
    return Path(state_dir) / f"ledger-{client_id}.json"


def _client_ledger(
    privacy: PrivacyConfig, num_examples: int, state_dir: Path, client_id: str
) -> tuple[Ledger, Path]:
    """The client's ledger, after refusing a delta its data set makes meaningless.

    Every release a client makes (a round's DP-SGD steps, a centered readout's direction) goes
    through here first, so none is charged under a delta that would not hold.
    """
    if privacy.delta >= 1.0 / num_examples:
        raise PrivacyError(
            f"privacy.delta = {privacy.delta} is not below 1 / n = {1.0 / num_examples:.2g} for client "
            f"{client_id} with {num_examples} examples: a mechanism that publishes one random example "
            "would satisfy it",
            fix="lower privacy.delta (e.g. 1e-5 or 1 / (10 n))",
        )
    path = ledger_path(state_dir, client_id)
    ledger = open_ledger(
        path,
        client_id=client_id,
        accountant=privacy.accountant,
        delta=privacy.delta,
        budget_epsilon=privacy.effective_budget,
    )
    return ledger, path


@dataclass
class RoundPrivacy:
    """The ledger and the DP settings decided for one round (``dp`` is ``None`` when DP is off)."""

    ledger: Ledger | None
    path: Path | None
    dp: DPSettings | None
    epsilon_before: float


#: Non-empty once this process has warned that a client trains without DP.
_warned_no_dp: list[str] = []


def plan_round(
    *,
    privacy: PrivacyConfig,
    train: TrainConfig,
    num_examples: int,
    total_rounds: int,
    state_dir: Path,
    client_id: str,
    min_noise_multiplier: float | None = None,
) -> RoundPrivacy:
    """Open the ledger, fix the noise and check the budget for the next round.

    The noise multiplier is calibrated once, at the client's first round, so that taking part in
    all ``total_rounds`` rounds spends exactly ``privacy.target_epsilon``; it is stored in the
    ledger and reused, so a restarted client keeps the same mechanism. A deployed site's
    ``min_noise_multiplier`` (its policy) raises a calibrated noise below it to it: more noise
    than planned spends less than the target, never more.

    Raises
    ------
    BudgetExhaustedError
        When the round would take the cumulative epsilon past the budget (nothing is trained).
    PrivacyError
        When delta is too large for the data set, or the ledger cannot be trusted.

    """
    if not privacy.enabled:
        # Once per process (a site is one process; a simulation plays hundreds of clients in one):
        # the same warning for every client of every round buries everything else in the log.
        if not _warned_no_dp:
            _warned_no_dp.append(client_id)
            log.warning(
                "client %s trains WITHOUT sample-level differential privacy (privacy.enabled = "
                "false): the update it sends carries no privacy guarantee of its own (client-level "
                "DP, when on, protects the released models, not the update the server receives); "
                "said once per process",
                client_id,
            )
        return RoundPrivacy(ledger=None, path=None, dp=None, epsilon_before=0.0)
    ledger, path = _client_ledger(privacy, num_examples, state_dir, client_id)
    sampling = example_sampling(
        num_examples, batch_size=train.batch_size, local_epochs=train.local_epochs
    )
    # A noise multiplier stored in the ledger at the first round is reused as if it were fixed,
    # so a restarted client keeps the same mechanism.
    mechanism = round_mechanism(
        sampling,
        rounds=total_rounds,
        delta=privacy.delta,
        accountant=privacy.accountant,
        noise_multiplier=(
            privacy.noise_multiplier
            if privacy.noise_multiplier is not None
            else ledger.planned_noise_multiplier
        ),
        target_epsilon=privacy.target_epsilon,
        prior_history=ledger.history(),
    )
    q, steps, sigma = mechanism.sample_rate, mechanism.steps, mechanism.noise_multiplier
    if mechanism.calibrated:
        ledger.planned_noise_multiplier = sigma
        save_ledger(ledger, path)
    if min_noise_multiplier is not None and sigma < min_noise_multiplier:
        log.info(
            "client %s: calibrated noise multiplier %.4f raised to this site's floor %.4f",
            client_id,
            sigma,
            min_noise_multiplier,
        )
        sigma = min_noise_multiplier
    before = ledger.epsilon()
    ledger.check_round(noise_multiplier=sigma, sample_rate=q, steps=steps)
    dp = DPSettings(
        noise_multiplier=sigma,
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=q,
        steps=steps,
        clipping=privacy.clipping,
    )
    return RoundPrivacy(ledger=ledger, path=path, dp=dp, epsilon_before=before)


def record_round(
    plan: RoundPrivacy,
    *,
    server_round: int,
    result: TrainResult,
    run: str | None = None,
    release: str | None = None,
) -> float:
    """Write the round's steps to the ledger (atomically) and return the cumulative epsilon.

    Called after training and before the update is released: a crash in between loses an update,
    never the record of privacy spent. ``run`` and ``release`` label the entry (the coordinator's
    run, the fingerprint of the inputs of an update the site keeps for a resend).
    """
    if plan.ledger is None or plan.dp is None or plan.path is None:
        return 0.0
    plan.ledger.record_round(
        round=server_round,
        noise_multiplier=plan.dp.noise_multiplier,
        sample_rate=plan.dp.sample_rate,
        steps=result.steps,
        run=run,
        release=release,
    )
    save_ledger(plan.ledger, plan.path)
    return plan.ledger.epsilon()


def readout_direction(
    *,
    privacy: PrivacyConfig,
    num_examples: int,
    hidden: int,
    key: str,
    measure: Callable[[], torch.Tensor],
    state_dir: Path,
    client_id: str,
    server_round: int,
    run: str | None = None,
    seed: int | None = None,
    min_noise_multiplier: float | None = None,
) -> tuple[torch.Tensor, float] | None:
    """The unit direction and scale of a centered readout's basis (``adapter.readout_center``).

    With DP, the direction is released once per client and model: ``measure()`` (the sum of the
    examples' unit final states, sensitivity 1) plus Gaussian noise, charged to the ledger as one
    step at rate 1 and kept there *before* it is used, so later rounds, restarts and the noise
    calibration of the first round all see it. A later call returns the kept direction and
    charges nothing. The basis's scale (:func:`~privet.common.modeling.readout_scale`) comes from
    the same release: the norm of the noisy sum, less the noise's expected share, over the example
    count. Without DP the exact sum is used. ``None`` (with a warning) when the
    client has too few examples for a useful direction (:func:`readout_center_minimum`): it then
    trains the plain readout, and nothing is released.

    Parameters
    ----------
    privacy
        The client's privacy settings (``readout_center_noise``, delta, accountant, budget).
    num_examples
        The client's training examples.
    hidden
        The width of the final states.
    key
        What the direction belongs to: the fingerprint of the frozen model it is measured on.
    measure
        Computes the sum of the examples' unit final states (``CausalLM.state_directions``).
    state_dir
        Where the client's ledger is.
    client_id
        The client's name (its ledger's).
    server_round, run
        Label the ledger entry.
    seed
        Seed of the noise (a simulation's); ``None`` draws it from the OS's secure source.
    min_noise_multiplier
        A deployed site's noise floor: the release's noise is raised to it.

    """
    if not privacy.enabled:
        total = measure().to(torch.float64)
        exact: torch.Tensor = total / total.norm().clamp(min=1e-12)
        return exact, readout_scale(float(total.norm()) / num_examples)
    sigma = max(privacy.readout_center_noise, min_noise_multiplier or 0.0)
    least = readout_center_minimum(sigma, hidden)
    if num_examples < least:
        log.warning(
            "client %s: %d examples are too few for a private readout direction at noise %g "
            "(at least %d): it trains the readout uncentered (adapter.readout_center), and "
            "releases nothing for it",
            client_id,
            num_examples,
            sigma,
            least,
        )
        return None
    ledger, path = _client_ledger(privacy, num_examples, state_dir, client_id)
    kept = ledger.readout_directions.get(key)
    if kept is not None:
        return torch.tensor(kept.direction, dtype=torch.float64), kept.scale
    total = measure().to(torch.float64)
    if total.shape != (hidden,) or not bool(torch.isfinite(total).all()):
        raise PrivacyError(
            f"the readout direction's sum has shape {tuple(total.shape)} (expected ({hidden},)) "
            "or is not finite: nothing is released"
        )
    generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    noisy = total + sigma * torch.randn(hidden, generator=generator, dtype=torch.float64)
    direction: torch.Tensor = noisy / noisy.norm().clamp(min=1e-12)
    # |sum|^2 is about |signal|^2 + sigma^2 hidden: the noise's share is taken off (post-processing).
    signal = math.sqrt(max(float(noisy.norm()) ** 2 - sigma**2 * hidden, 0.0))
    scale = readout_scale(signal / num_examples)
    ledger.record_direction(
        key=key,
        direction=direction.tolist(),
        scale=scale,
        noise_multiplier=sigma,
        round=server_round,
        run=run,
    )
    save_ledger(ledger, path)  # kept before it is used: a crash now cannot release it twice
    log.info(
        "client %s: released its readout direction (noise %g, basis scale %.3g; eps=%.4f spent)",
        client_id,
        sigma,
        scale,
        ledger.epsilon(),
    )
    return direction, scale
