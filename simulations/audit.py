"""``privet audit``: an empirical lower bound on the sample-level epsilon, beside the accounted one.

The audit runs privet's own DP-SGD code path (``privet.client.training.train``: Poisson batches,
per-sample clipping, micro-batches, Opacus noise) with the configured noise multiplier, clipping
norm and optimizer on a *canary model*, and checks the accountant's claim with the one-run audit
of Steinke, Nasr and Jagielski (NeurIPS 2023, "Privacy auditing with one (1) training run"):

1. ``m`` canaries are drawn, each owning one row of an embedding (a "Dirac" gradient canary: its
   gradient touches only its own weights, the strongest canary white-box access allows).  Each is
   put into the training set with probability 1/2, secretly.
2. The client trains for the planned rounds (noise calibrated to ``privacy.target_epsilon`` over
   them, or the fixed noise multiplier), with the accountant counting as in a real run.
3. Each canary gets a score (how far its row moved toward its label); the top ``k`` are guessed
   "in".  If training is ``epsilon``-DP, the number of correct guesses is stochastically dominated
   by ``Binomial(k, e^eps / (1 + e^eps))``, so the largest ``eps`` under
   which the observed count is still a 1 - ``beta`` event is a lower bound on the true epsilon.

A lower bound above the accounted epsilon means the accounting (or the mechanism) is wrong: the
audit flags it.  The bound ignores delta (a ``delta``-sized slack per guess), so it is slightly
optimistic for a mechanism that only has ``(eps, delta)``-DP; with privet's deltas (1e-5) the
difference is far below the gap the audit looks for.  An honest mechanism is flagged with
probability at most ``beta`` (plus that slack).  One-run audits are not tight: at accounted
epsilons of 4-8 a correct DP-SGD usually shows a lower bound near 0-2.  With ``broken=True`` the
audit trains *without* noise or clipping while still claiming the configured epsilon (a deliberately
broken configuration, the audit's own self-test).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from scipy.stats import binom

from privet.client.training import DPSettings, train
from privet.common.config import PrivetConfig
from privet.common.data import Examples, TokenizedExamples
from privet.common.errors import ConfigError
from privet.common.privacy import epsilon_from_history, example_sampling, round_mechanism

__all__ = ["AuditResult", "epsilon_lower_bound", "run_audit"]


@dataclass
class AuditResult:
    """The audit's outcome."""

    canaries: int
    members: int
    guesses: int
    correct: int
    beta: float
    accounted_epsilon: float
    empirical_epsilon_lower_bound: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    broken: bool
    flagged: bool
    verdict: str

    def as_json(self) -> dict[str, Any]:
        """The result as a JSON-ready dictionary."""
        return asdict(self)


def epsilon_lower_bound(*, guesses: int, correct: int, beta: float = 0.05) -> float:
    """Largest epsilon for which ``correct`` of ``guesses`` right is still a ``beta``-tail event.

    Under ``eps``-DP each guess is right with probability at most ``p = e^eps / (1 + e^eps)``
    (Steinke et al. 2023, Theorem 3.1 with delta = 0); the bound is the ``eps`` at which
    ``P[Binomial(guesses, p) >= correct] = beta``, found by bisection (60 steps, bounded).

    Returns
    -------
    float
        ``0.0`` when the count is explainable at ``eps = 0``.

    """
    if guesses <= 0 or correct <= 0:
        return 0.0

    def tail(eps: float) -> float:
        p = 1.0 / (1.0 + math.exp(-eps))
        return float(binom.sf(correct - 1, guesses, p))

    if tail(0.0) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while tail(hi) <= beta and hi < 100:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if tail(mid) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


class _CanaryModel(torch.nn.Module):
    """Logits = sum of the embedding rows of the tokens: canary ``i`` is token ``i`` alone."""

    def __init__(self, canaries: int, labels: int = 2) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(canaries, labels)
        torch.nn.init.zeros_(self.emb.weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> Any:
        logits = (self.emb(input_ids) * attention_mask.unsqueeze(-1)).sum(dim=1)
        return SimpleNamespace(logits=logits)


class _IdTokenizer:
    """A 'tokenizer' for texts that are already token ids (``"17"``).

    The canaries then go through privet's own :class:`TokenizedExamples` and ``collate`` unchanged.
    """

    def __call__(self, texts: list[str], **_: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": [[int(t) for t in text.split()] for text in texts]}


def run_audit(
    cfg: PrivetConfig,
    *,
    canaries: int = 100_000,
    beta: float = 0.05,
    broken: bool = False,
    seed: int = 0,
) -> AuditResult:
    """Audit the sample-level DP-SGD of ``cfg`` with planted canaries (see the module docstring).

    Parameters
    ----------
    cfg
        The configuration whose privacy settings (target or noise, clip, delta, accountant,
        optimizer, lr, batch size, local epochs, rounds) are audited.
    canaries
        Number of canaries; half (in expectation) are trained on and a fifth are guessed on. The
        largest lower bound the audit can show grows like ``log(canaries / 15)`` (``beta = 0.05``):
        about 7.2 at 20,000 and 8.8 at 100,000, so auditing an accounted epsilon of 8 needs the
        default 100,000.
    beta
        Significance: an honest mechanism is flagged with probability at most this.
    broken
        Train with no noise and no clipping while claiming the configured epsilon (self-test).
    seed
        Seed of canary labels, membership and training.

    Raises
    ------
    ConfigError
        When sample-level DP is off (there is no claim to audit).

    """
    p = cfg.privacy
    if not p.enabled:
        raise ConfigError(
            "privacy.enabled = false: there is no epsilon claim to audit",
            fix="audit a configuration with privacy.enabled = true",
        )
    if canaries < 100:
        raise ConfigError(f"the audit needs at least 100 canaries, got {canaries}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=canaries)
    member = rng.random(canaries) < 0.5
    idx = np.flatnonzero(member)
    examples = Examples(texts=[str(int(i)) for i in idx], labels=labels[idx].astype(np.int64))
    data = TokenizedExamples(examples, _IdTokenizer(), max_length=4)
    n = len(data)
    # The audit trains all planned rounds in one go: the same mechanism, rounds x steps long.
    mechanism = round_mechanism(
        example_sampling(n, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs),
        rounds=cfg.federation.rounds,
        delta=p.delta,
        accountant=p.accountant,
        noise_multiplier=p.noise_multiplier,
        target_epsilon=p.target_epsilon,
    )
    q, sigma = mechanism.sample_rate, mechanism.noise_multiplier
    steps = mechanism.steps * cfg.federation.rounds
    accounted = epsilon_from_history([(sigma, q, steps)], delta=p.delta, accountant=p.accountant)
    dp = DPSettings(
        noise_multiplier=0.0 if broken else sigma,
        max_grad_norm=math.inf if broken else p.max_grad_norm,
        sample_rate=q,
        steps=steps,
    )
    model = _CanaryModel(canaries)
    train(model, data, cfg.train, dp=dp, pad_token_id=0, device=torch.device("cpu"), seed=seed)
    weights = model.emb.weight.detach().double().numpy()
    # How far each canary's row moved toward its own label (members: signal + noise; others: noise).
    scores = weights[np.arange(canaries), labels] - weights[np.arange(canaries), 1 - labels]
    order = np.argsort(scores, kind="stable")
    # Guess "in" for the top fifth and abstain on the rest (a rule fixed before looking, as the
    # theorem requires). "Out" guesses would add little: a member that was never sampled (likely
    # when local_epochs x rounds is below 1) looks exactly like a non-member.
    k = canaries // 5
    guessed_in = order[-k:]
    correct = int(member[guessed_in].sum())
    lower = epsilon_lower_bound(guesses=k, correct=correct, beta=beta)
    flagged = lower > accounted
    verdict = (
        f"FLAGGED: the empirical lower bound eps >= {lower:.2f} exceeds the accounted eps = "
        f"{accounted:.2f}; the mechanism leaks more than its accounting claims"
        if flagged
        else f"consistent: the empirical lower bound eps >= {lower:.2f} does not exceed the "
        f"accounted eps = {accounted:.2f}"
    )
    return AuditResult(
        canaries=canaries,
        members=n,
        guesses=k,
        correct=correct,
        beta=beta,
        accounted_epsilon=accounted,
        empirical_epsilon_lower_bound=lower,
        delta=p.delta,
        noise_multiplier=sigma,
        max_grad_norm=p.max_grad_norm,
        sample_rate=q,
        steps=steps,
        broken=broken,
        flagged=flagged,
        verdict=verdict,
    )
