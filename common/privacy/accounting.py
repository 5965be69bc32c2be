"""Privacy accounting on top of Opacus's accountants.

Everything here is a pure function of an accountant *history*: the list of
``(noise_multiplier, sample_rate, steps)`` triples that Opacus accountants keep in ``.history``.
Keeping the history (rather than an accountant object) as the unit of state is what lets a client's
ledger be written to disk and its epsilon recomputed after a restart, with Opacus doing the maths.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

from opacus.accountants import PRVAccountant, RDPAccountant

from privet.common.errors import PrivacyError

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "AccountantName",
    "HistoryEntry",
    "accountant_steps",
    "calibrate_noise",
    "epsilon_from_history",
]

HistoryEntry = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``, the shape Opacus accountants keep in ``.history``."""

AccountantName = Literal["rdp", "prv"]
"""The Opacus accountants privet supports."""

MAX_NOISE_MULTIPLIER = 1e4
"""Calibration refuses a target that needs more noise than this: the update would be pure noise."""

MIN_NOISE_MULTIPLIER = 0.3
"""Calibration never searches below this noise multiplier.

Below it a single round already costs an epsilon in the tens, and the PRV accountant slows from
about a second to minutes per evaluation (its discretisation domain grows with the privacy loss).
When even this much noise is within the target, calibration returns it: epsilon then lands below
the target, which is safe.
"""

# Bounds on the calibration search, so that a pathological accountant (for example a PRV estimate
# that is not monotone in sigma at the scale of its own error) can never loop forever.
_MAX_BISECTION_STEPS = 60
_MAX_VERIFY_BUMPS = 50


def _validate_entry(entry: HistoryEntry, *, where: str) -> HistoryEntry:
    """Check one history triple and return it with plain Python types."""
    if len(entry) != 3:
        raise PrivacyError(
            f"{where}: a history entry must be (noise_multiplier, sample_rate, steps), "
            f"got {entry!r}"
        )
    sigma, q, steps = entry
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrivacyError(f"{where}: steps must be an integer >= 1, got {steps!r}")
    if not math.isfinite(sigma) or sigma <= 0:
        raise PrivacyError(
            f"{where}: noise_multiplier must be a finite number > 0, got {sigma!r}; without noise "
            "DP-SGD gives no privacy guarantee at all",
            fix="set privacy.enabled = false for a deliberately non-private baseline",
        )
    if not math.isfinite(q) or not 0 < q <= 1:
        raise PrivacyError(
            f"{where}: sample_rate must be in (0, 1], got {q!r}; the accountants assume each "
            "example is in a batch independently with this probability (Poisson sampling)",
            fix="use sample_rate = expected batch size / number of examples",
        )
    return float(sigma), float(q), int(steps)


def _validate_delta(delta: float) -> None:
    if not math.isfinite(delta) or not 0 < delta < 1:
        raise PrivacyError(
            f"delta must be in (0, 1), got {delta!r}", fix="use e.g. privacy.delta = 1e-5"
        )


def _compact(history: Sequence[HistoryEntry]) -> tuple[HistoryEntry, ...]:
    """Merge entries that share a noise multiplier and sample rate, summing their steps.

    Both accountants compose the rounds of a history commutatively (RDP adds the per-step Rényi
    divergences; PRV convolves the privacy loss distributions), so merging equal mechanisms changes
    nothing but the work: a client that runs every round with the same sigma and q keeps a one-entry
    history, and the PRV cost stays flat instead of growing with the number of rounds.
    """
    steps_of: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        steps_of[(sigma, q)] = steps_of.get((sigma, q), 0) + steps
    return tuple((sigma, q, steps) for (sigma, q), steps in steps_of.items())


@functools.lru_cache(maxsize=512)
def _epsilon_cached(
    history: tuple[HistoryEntry, ...], delta: float, accountant: AccountantName
) -> float:
    # A pure function of hashable inputs: the ledger asks the same question several times per round
    # (spent so far, projected, recorded), and PRV answers take up to seconds each.
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(history)
    # PRV returns a numpy float, RDP a Python float: normalise so the result is JSON-serialisable.
    return float(acc.get_epsilon(delta=delta))


def epsilon_from_history(
    history: Sequence[HistoryEntry], *, delta: float, accountant: AccountantName
) -> float:
    """Epsilon that a history of DP-SGD steps has spent, computed by a fresh Opacus accountant.

    Parameters
    ----------
    history
        ``(noise_multiplier, sample_rate, steps)`` triples, as in an Opacus accountant's
        ``.history``.
    delta
        The delta at which epsilon is reported.
    accountant
        ``"rdp"`` (:class:`opacus.accountants.RDPAccountant`) or ``"prv"``
        (:class:`opacus.accountants.PRVAccountant`, which returns its upper bound).

    Returns
    -------
    float
        The epsilon spent; ``0.0`` for an empty history, ``inf`` when no finite guarantee holds.

    Raises
    ------
    PrivacyError
        When an entry or delta is out of range, or the accountant name is unknown.

    """
    if accountant not in ("rdp", "prv"):
        raise PrivacyError(
            f"unknown accountant {accountant!r}", fix="use privacy.accountant = 'rdp' or 'prv'"
        )
    _validate_delta(delta)
    checked = [_validate_entry(e, where=f"history[{i}]") for i, e in enumerate(history)]
    if not checked:
        # Opacus's PRV accountant fails on an empty history (it divides by zero steps), and RDP
        # returns the int 0: answer the trivial case ourselves.
        return 0.0
    return _epsilon_cached(_compact(checked), float(delta), accountant)


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
        ``max(1, round(epochs / q))``: a round always takes at least one step.

    """
    if not math.isfinite(sample_rate) or not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not math.isfinite(epochs) or epochs <= 0:
        raise PrivacyError(f"epochs must be a finite number > 0, got {epochs!r}")
    return max(1, round(epochs / sample_rate))


def _search_sigma(eps_of: Callable[[float], float], *, target: float, tolerance: float) -> float:
    """Smallest sigma in [MIN, MAX] with ``eps_of(sigma) <= target``, to within ``tolerance``.

    Only sigmas whose epsilon was evaluated to be within the target are ever kept as the answer, so
    the result never overshoots, whatever the tolerance.  Every loop is bounded.
    """
    sigma = 1.0
    eps = eps_of(sigma)
    lo: float | None
    if eps <= target:
        # Walk down until the target is passed (or the floor is reached).
        hi, eps_hi, lo = sigma, eps, None
        while hi > MIN_NOISE_MULTIPLIER:
            cand = max(hi / 2, MIN_NOISE_MULTIPLIER)
            eps = eps_of(cand)
            if eps <= target:
                hi, eps_hi = cand, eps
            else:
                lo = cand
                break
        if lo is None:
            return hi  # even the floor is within the target
    else:
        # Walk up by doubling, to at most MAX_NOISE_MULTIPLIER (about 14 evaluations).
        lo = sigma
        while True:
            cand = min(lo * 2, MAX_NOISE_MULTIPLIER)
            eps = eps_of(cand)
            if eps <= target:
                hi, eps_hi = cand, eps
                break
            if cand >= MAX_NOISE_MULTIPLIER:
                raise _absurd_sigma()
            lo = cand
    for _ in range(_MAX_BISECTION_STEPS):
        if target - eps_hi <= tolerance or hi - lo <= 1e-9 * hi:
            break
        mid = (lo + hi) / 2
        eps = eps_of(mid)
        if eps <= target:
            hi, eps_hi = mid, eps
        else:
            lo = mid
    return hi


def _absurd_sigma() -> PrivacyError:
    return PrivacyError(
        "reaching the target epsilon would need a noise multiplier above "
        f"{MAX_NOISE_MULTIPLIER:g}: the update would be pure noise. Either the target is below "
        "what the accountant can certify for this many steps (RDP and PRV both have a floor), or "
        "earlier rounds have spent almost all of it",
        fix="raise privacy.target_epsilon, or take fewer steps (fewer rounds or local_epochs)",
    )


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName,
    prior_history: Sequence[HistoryEntry] = (),
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier that keeps the total epsilon within ``target_epsilon``.

    The total is that of ``prior_history`` followed by ``steps`` steps at ``sample_rate`` with the
    returned noise multiplier.  The search is a bounded doubling-then-bisection over
    [:data:`MIN_NOISE_MULTIPLIER`, :data:`MAX_NOISE_MULTIPLIER`] that only ever keeps noise levels
    whose epsilon was checked, and the answer is verified once more at the end, so the target is
    never overshot; epsilon lands within ``epsilon_tolerance`` below it unless the floor is reached.

    Parameters
    ----------
    target_epsilon
        Epsilon the whole history (prior plus new steps) may reach.
    delta
        The delta of the guarantee.
    sample_rate
        Poisson sampling rate q of the new steps, in (0, 1].
    steps
        Number of new DP-SGD steps.
    accountant
        ``"rdp"`` or ``"prv"``.
    prior_history
        Steps already taken (for example by earlier rounds, from the client's ledger).
    epsilon_tolerance
        How far below the target the search may stop.

    Returns
    -------
    float
        The noise multiplier.

    Raises
    ------
    PrivacyError
        When the prior history already spent the target, when the target needs a noise multiplier
        above :data:`MAX_NOISE_MULTIPLIER`, or when an argument is out of range.

    """
    if not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise PrivacyError(
            f"target_epsilon must be a finite number > 0, got {target_epsilon!r}",
            fix="set privacy.target_epsilon to e.g. 8",
        )
    if not math.isfinite(epsilon_tolerance) or epsilon_tolerance <= 0:
        raise PrivacyError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance!r}")
    # Validate the new steps with a placeholder sigma (sigma itself is what we search for).
    _validate_entry((1.0, sample_rate, steps), where="calibrate_noise")
    prior = list(prior_history)
    spent = epsilon_from_history(prior, delta=delta, accountant=accountant)
    if spent >= target_epsilon:
        raise PrivacyError(
            f"the steps already taken have spent eps={spent:.4g}, which is not below the target "
            f"epsilon {target_epsilon:g}: no amount of noise lets further steps stay within it",
            fix="raise privacy.target_epsilon (knowingly spending more privacy), or stop training",
        )

    def eps_of(sigma: float) -> float:
        return epsilon_from_history(
            [*prior, (sigma, sample_rate, steps)], delta=delta, accountant=accountant
        )

    # Opacus warns when the optimal RDP order is at the edge of its grid, and numpy overflows
    # inside PRV at extreme sigmas; both are expected while probing and the bounds stay valid.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        sigma = _search_sigma(eps_of, target=target_epsilon, tolerance=epsilon_tolerance)
        # Verify the answer as the ledger will see it; should an accountant ever disagree with its
        # own earlier answer, add noise rather than overshoot.
        for _ in range(_MAX_VERIFY_BUMPS):
            if eps_of(sigma) <= target_epsilon:
                break
            sigma *= 1.01
        else:
            raise PrivacyError(
                f"calibration found no noise multiplier that verifiably keeps epsilon within "
                f"{target_epsilon:g} ({accountant} accountant)",
                fix="raise privacy.target_epsilon or try the other accountant",
            )
    if sigma > MAX_NOISE_MULTIPLIER:
        raise _absurd_sigma()
    return sigma
