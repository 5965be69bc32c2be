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

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from privet.common.errors import PrivacyError

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "AccountantName",
    "HistoryEntry",
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
    # Opacus's RDP conversion can return a value a hair below 0 when the noise is enormous and delta
    # large (e.g. -6e-05 at sigma 384, delta 0.05); epsilon is never negative, and 0 bounds the same
    # guarantee from above, so a ledger or report never shows a negative spend.
    return max(0.0, float(acc.get_epsilon(delta=delta)))


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


def _search_sigma(
    eps_of: Callable[[float], float],
    *,
    target: float,
    tolerance: float,
    start: float = 1.0,
    factor: float = 2.0,
    interpolate: bool = False,
) -> float:
    """Smallest sigma in [MIN, MAX] with ``eps_of(sigma) <= target``, to within ``tolerance``.

    The search walks from ``start`` by ``factor`` until the target is bracketed, then narrows the
    bracket: by bisection, or with ``interpolate`` by regula falsi aimed at the middle of the
    accepted window ``[target - tolerance, target]`` (epsilon is smooth and monotone in sigma
    under RDP, so this needs two or three evaluations instead of bisection's eight or more).
    Only sigmas whose epsilon was evaluated to be within the target are ever kept as the answer,
    so the result never overshoots, whatever the tolerance.  Every loop is bounded.
    """
    sigma = min(max(start, MIN_NOISE_MULTIPLIER), MAX_NOISE_MULTIPLIER)
    eps = eps_of(sigma)
    lo: float | None
    eps_lo = math.inf
    if eps <= target:
        # Walk down until the target is passed (or the floor is reached).
        hi, eps_hi, lo = sigma, eps, None
        while hi > MIN_NOISE_MULTIPLIER:
            if target - eps_hi <= tolerance:
                return hi  # already in the accepted window
            cand = max(hi / factor, MIN_NOISE_MULTIPLIER)
            eps = eps_of(cand)
            if eps <= target:
                hi, eps_hi = cand, eps
            else:
                lo, eps_lo = cand, eps
                break
        if lo is None:
            return hi  # even the floor is within the target
    else:
        # Walk up by doubling, to at most MAX_NOISE_MULTIPLIER (about 14 evaluations).
        lo, eps_lo = sigma, eps
        while True:
            cand = min(lo * factor, MAX_NOISE_MULTIPLIER)
            eps = eps_of(cand)
            if eps <= target:
                hi, eps_hi = cand, eps
                break
            if cand >= MAX_NOISE_MULTIPLIER:
                raise _absurd_sigma()
            lo, eps_lo = cand, eps
    aim = math.log(max(target - tolerance / 2, 1e-12))
    shrunk = True
    for _ in range(_MAX_BISECTION_STEPS):
        width = hi - lo
        if target - eps_hi <= tolerance or width <= 1e-9 * hi:
            break
        mid = (lo + hi) / 2
        if interpolate and shrunk and math.isfinite(eps_lo) and eps_lo > eps_hi > 0:
            # Interpolate log(eps) linearly in log(sigma) between the bracket's ends (nearly a
            # straight line for the Gaussian mechanism), kept off the ends; a step that failed
            # to halve the bracket is followed by a bisection step, so this never does worse
            # than plain bisection by more than a factor of two.
            a, b = math.log(lo), math.log(hi)
            fa, fb = math.log(eps_lo), math.log(eps_hi)
            guess = math.exp(a + (b - a) * (fa - aim) / (fa - fb))
            mid = min(max(guess, lo + 0.01 * width), hi - 0.01 * width)
        eps = eps_of(mid)
        if eps <= target:
            hi, eps_hi = mid, eps
        else:
            lo, eps_lo = mid, eps
        shrunk = (hi - lo) <= width / 2
    return hi


_RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)
_RDP_INTEGER_ORDERS: tuple[float, ...] = tuple(a for a in _RDP_ORDERS if a.is_integer())


class _RdpEpsilon:
    """Epsilon of ``prior + (sigma, q, steps)`` under RDP restricted to a subset of Opacus's orders.

    RDP's epsilon is a minimum over the Rényi orders, so any subset of
    ``RDPAccountant.DEFAULT_ALPHAS`` gives an epsilon at least as large as Opacus's own: a noise
    level within the target on a subset is within it on the full list too.  Integer orders have a
    closed form; the fractional ones need Opacus's slow series (``_compute_log_a_for_frac_alpha``),
    which is where a calibration's seconds went.  The prior's RDP curve is computed once.
    """

    def __init__(
        self,
        orders: Sequence[float],
        *,
        prior: Sequence[HistoryEntry],
        sample_rate: float,
        steps: int,
        delta: float,
    ) -> None:
        self.orders = list(orders)
        self.sample_rate = sample_rate
        self.steps = steps
        self.delta = delta
        self.prior = np.zeros(len(self.orders))
        for sigma, q, n in _compact(prior):
            self.prior = self.prior + rdp_analysis.compute_rdp(
                q=q, noise_multiplier=sigma, steps=n, orders=self.orders
            )
        self.best_order = math.nan

    def __call__(self, sigma: float) -> float:
        rdp = self.prior + rdp_analysis.compute_rdp(
            q=self.sample_rate, noise_multiplier=sigma, steps=self.steps, orders=self.orders
        )
        eps, best = rdp_analysis.get_privacy_spent(orders=self.orders, rdp=rdp, delta=self.delta)
        self.best_order = float(best)
        return float(eps)


def _search_sigma_rdp(
    *,
    prior: Sequence[HistoryEntry],
    sample_rate: float,
    steps: int,
    delta: float,
    target: float,
    tolerance: float,
) -> float | None:
    """The RDP calibration in two cheap passes; ``None`` sends the caller to the full search.

    Pass 1 searches on the integer orders only (closed form, milliseconds).  Their epsilon is an
    upper bound on the full list's, so its sigma is within the target and at most slightly too
    noisy.  Pass 2 refines it on the orders within one of pass 1's best order, fractional ones
    included (a fifth of Opacus's list), starting from pass 1's sigma and walking down in small
    steps.  Where the full list's best order lies in that window, pass 2's epsilon *is* Opacus's;
    the caller verifies the answer once with the full accountant either way.  This is our own
    code because Opacus's ``get_noise_multiplier`` bisects with the full order list every time.
    """
    common = {"prior": prior, "sample_rate": sample_rate, "steps": steps, "delta": delta}
    coarse = _RdpEpsilon(_RDP_INTEGER_ORDERS, **common)  # type: ignore[arg-type]
    try:
        sigma1 = _search_sigma(coarse, target=target, tolerance=tolerance, interpolate=True)
    except PrivacyError:
        return None  # let the full search decide (and word the refusal)
    if sigma1 <= MIN_NOISE_MULTIPLIER:
        return sigma1
    coarse(sigma1)
    best = coarse.best_order
    window = [a for a in _RDP_ORDERS if best - 1.0 <= a <= best + 1.0]
    fine = _RdpEpsilon(window, **common)  # type: ignore[arg-type]
    return _search_sigma(
        fine, target=target, tolerance=tolerance, start=sigma1, factor=1.1, interpolate=True
    )


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
        found = None
        if accountant == "rdp":
            found = _search_sigma_rdp(
                prior=[_validate_entry(e, where="prior_history") for e in prior],
                sample_rate=sample_rate,
                steps=steps,
                delta=delta,
                target=target_epsilon,
                tolerance=epsilon_tolerance,
            )
            # The coarse search's answer is kept only when the full accountant confirms it is in
            # the accepted window (it is never above the target: see _search_sigma_rdp).
            if found is not None:
                eps_found = eps_of(found)
                if not (
                    eps_found <= target_epsilon
                    and (
                        found <= MIN_NOISE_MULTIPLIER
                        or target_epsilon - eps_found <= epsilon_tolerance
                    )
                ):
                    found = None
        sigma = (
            found
            if found is not None
            else _search_sigma(eps_of, target=target_epsilon, tolerance=epsilon_tolerance)
        )
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
