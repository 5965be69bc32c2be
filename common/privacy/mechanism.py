"""A round's DP mechanism, computed in one place: sampling rate, steps, sample size, noise.

Both of privet's mechanisms are subsampled Gaussian mechanisms that run the same arithmetic on
different units:

- **example-level** DP-SGD (a client's ledger): the unit is a training example; each step
  Poisson-samples examples at ``q = batch_size / n`` and a round takes ``local_epochs / q`` steps;
- **client-level** DP-FedAvg (the federation's ledger): the unit is a client; each round Flower
  asks ``m`` of the ``N`` clients (:func:`flower_sample_size`) and releases one noisy mean, one step
  accounted at ``q = m / N`` with sampling amplification, else at ``q = 1``.

:func:`example_sampling` and :func:`client_sampling` give a :class:`Sampling` (rate, steps per
round, units per round); :func:`round_mechanism` turns it into a :class:`Mechanism` by taking the
fixed noise multiplier or calibrating one to a target epsilon over the planned rounds.  The client
(``client/training.py``, ``client/privacy.py``), the server (``server/privacy.py``, its strategies
and ``privacy.json``), the plan, the audit, the simulation and the federation planner all call these
functions, so what a ledger records and what a report or a plan prints are the same numbers by
construction.

This module is imported lazily by ``privet.common.config`` (for :func:`flower_sample_size`), so it
must never import the configuration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from privet.common.errors import PrivacyError
from privet.common.privacy.accounting import AccountantName, HistoryEntry, calibrate_noise

__all__ = [
    "Mechanism",
    "Sampling",
    "accountant_steps",
    "client_sampling",
    "example_sampling",
    "flower_sample_size",
    "readout_center_minimum",
    "round_mechanism",
]


@dataclass(frozen=True)
class Sampling:
    """How a round samples its units (examples or clients).

    Parameters
    ----------
    sample_rate
        ``q``, the Poisson sampling rate the accountant is told, in (0, 1].
    steps
        Accounted steps per round (DP-SGD steps; 1 for a client-level round).
    per_round
        Units a round draws: the expected batch size for DP-SGD, the clients asked (the fixed
        denominator of the mean) for client-level DP.
    population
        Units there are to sample from (examples of a client, clients of a federation).

    """

    sample_rate: float
    steps: int
    per_round: int
    population: int


@dataclass(frozen=True)
class Mechanism:
    """A round's Gaussian mechanism: the sampling and the noise, as the ledger records them.

    Parameters
    ----------
    noise_multiplier
        Noise std over the sensitivity (the clipping norm).
    sample_rate
        As in :class:`Sampling`.
    steps
        Accounted steps per round.
    calibrated
        ``True`` when the noise was calibrated to a target epsilon (the caller may store it, as a
        client's ledger does, so that later rounds reuse it); ``False`` when it was given.

    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    calibrated: bool

    def history_entry(self, rounds: int = 1) -> HistoryEntry:
        """The accountant history entry of ``rounds`` rounds of this mechanism."""
        return (self.noise_multiplier, self.sample_rate, self.steps * rounds)


def flower_sample_size(population: int, *, fraction: float, minimum: int) -> int:
    """How many clients Flower's FedAvg asks per round when ``population`` are connected.

    Flower's ``configure_train`` takes ``max(int(N * fraction), min_nodes)``; privet caps the minimum
    at ``N`` (``build_strategy`` passes ``min(min_train_clients, N)``), so the answer is never above
    ``N``.

    Parameters
    ----------
    population
        Clients available, ``N >= 1``.
    fraction
        ``federation.fraction_train``.
    minimum
        ``federation.min_train_clients``.

    Raises
    ------
    PrivacyError
        When ``population`` is below 1.

    """
    if population < 1:
        raise PrivacyError(f"a federation needs at least one client, got {population}")
    return min(population, max(int(population * fraction), min(minimum, population)))


def accountant_steps(*, sample_rate: float, epochs: float) -> int:
    """Number of DP-SGD steps in ``epochs`` passes over the data at Poisson sample rate ``q``.

    Parameters
    ----------
    sample_rate
        Poisson sampling rate q (expected batch size / number of examples), in (0, 1].
    epochs
        Passes over the data; may be fractional.

    Returns
    -------
    int
        ``max(1, round(epochs / q))``: a pass takes ``1 / q`` steps in expectation, and a round
        always takes at least one step.

    """
    if not math.isfinite(sample_rate) or not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not math.isfinite(epochs) or epochs <= 0:
        raise PrivacyError(f"epochs must be a finite number > 0, got {epochs!r}")
    return max(1, round(epochs / sample_rate))


def example_sampling(num_examples: int, *, batch_size: int, local_epochs: float) -> Sampling:
    """DP-SGD's sampling for one client round of ``local_epochs`` over ``num_examples`` examples.

    ``q = min(1, batch_size / n)`` and ``max(1, round(local_epochs / q))`` steps.  Training without
    DP uses the same step count, so both modes see as many examples.

    Raises
    ------
    ValueError
        When ``num_examples`` is not positive (a client with no data cannot train).

    """
    if num_examples <= 0:
        raise ValueError("no training examples")
    q = min(1.0, batch_size / num_examples)
    return Sampling(
        sample_rate=q,
        steps=accountant_steps(sample_rate=q, epochs=local_epochs),
        per_round=max(1, round(q * num_examples)),
        population=num_examples,
    )


def client_sampling(
    population: int, *, fraction: float, minimum: int, amplification: bool
) -> Sampling:
    """Client-level DP's sampling: ``m`` clients of ``N`` per round, one released mean.

    With ``amplification`` the round is accounted as Poisson-subsampled at ``q = m / N`` (the
    DP-FedAvg paper's analysis); otherwise at ``q = 1``, which holds for any way of picking clients.
    """
    m = flower_sample_size(population, fraction=fraction, minimum=minimum)
    q = m / population if amplification else 1.0
    return Sampling(sample_rate=q, steps=1, per_round=m, population=population)


def round_mechanism(
    sampling: Sampling,
    *,
    rounds: int,
    delta: float,
    accountant: AccountantName,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    prior_history: Sequence[HistoryEntry] = (),
) -> Mechanism:
    """The mechanism of each round: the fixed noise, or the noise that spends ``target_epsilon``.

    Exactly one of ``noise_multiplier`` and ``target_epsilon`` is used: a given noise multiplier
    wins (the configuration refuses both at once; a client passes the noise stored in its ledger
    here too).  A target is met over ``rounds`` rounds of ``sampling`` after ``prior_history``,
    never overshot (:func:`~privet.common.privacy.accounting.calibrate_noise`).

    Parameters
    ----------
    sampling
        From :func:`example_sampling` or :func:`client_sampling`.
    rounds
        Rounds the target must cover.
    delta
        The guarantee's delta.
    accountant
        ``"rdp"`` or ``"prv"``.
    noise_multiplier
        The fixed noise multiplier, when there is one.
    target_epsilon
        The epsilon all ``rounds`` rounds (plus the prior) may spend, when the noise is calibrated.
    prior_history
        Steps already taken (a client's ledger).

    Raises
    ------
    PrivacyError
        When neither is given, the noise is not a positive finite number, or no noise level reaches
        the target.

    """
    if noise_multiplier is not None:
        sigma, calibrated = noise_multiplier, False
    elif target_epsilon is not None:
        sigma = calibrate_noise(
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sampling.sample_rate,
            steps=sampling.steps * rounds,
            accountant=accountant,
            prior_history=prior_history,
        )
        calibrated = True
    else:
        raise PrivacyError(
            "a DP mechanism needs a noise multiplier or a target epsilon, got neither",
            fix="set privacy.target_epsilon (or privacy.noise_multiplier)",
        )
    if not math.isfinite(sigma) or sigma <= 0:
        raise PrivacyError(f"the noise multiplier must be a finite number > 0, got {sigma!r}")
    return Mechanism(
        noise_multiplier=sigma,
        sample_rate=sampling.sample_rate,
        steps=sampling.steps,
        calibrated=calibrated,
    )


def readout_center_minimum(noise_multiplier: float, hidden: int) -> int:
    """The fewest examples whose readout direction is worth releasing at this noise.

    The noise on the sum of ``n`` unit states has norm about ``noise * sqrt(hidden)`` and the sum
    about ``n`` (the states share one direction), so the direction is off by about
    ``noise * sqrt(hidden) / n`` radians: at most a quarter radian from ``4 x`` that many examples.
    A client decides on its example count (which its sampling rate already discloses), before
    anything is released.
    """
    return math.ceil(4 * noise_multiplier * math.sqrt(hidden))
