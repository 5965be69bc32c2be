"""[privacy], [privacy.client_level] and [privacy.secure_aggregation]: how each release is protected."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from privet.common.config._base import _Section

__all__ = ["ClientLevelConfig", "PrivacyConfig", "SecureAggregationConfig"]


def _effective_budget(enabled: bool, budget: float | None, target: float | None) -> float | None:
    """A level's budget: ``budget_epsilon``, else the target itself (``None``: off or unbounded)."""
    if not enabled:
        return None
    return budget if budget is not None else target


def _target_within_budget(prefix: str, target: float | None, budget: float | None) -> None:
    """Refuse a target epsilon above the budget of the same level (sample or client level)."""
    if budget is not None and target is not None and target > budget:
        raise ValueError(
            f"{prefix}target_epsilon ({target}) is above {prefix}budget_epsilon ({budget}): "
            "the planned rounds could never finish"
        )


class ClientLevelConfig(_Section):
    """Client-level (user-level) DP of the federation: DP-FedAvg on Flower's DP strategy wrappers.

    Each client's update (new weights minus the global weights) is clipped to an L2 norm, the
    server averages the clipped updates with a fixed denominator (the number of clients asked) and
    adds Gaussian noise to the average, so the released global model hides whether any one
    client took part.  The federation's epsilon is accounted every round.
    """

    enabled: bool = Field(
        False, description="Clip every client's update and noise the aggregate (DP-FedAvg)."
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        le=1000,
        description=(
            "Federation epsilon after all planned rounds; the noise multiplier is calibrated to it. "
            "Give this or noise_multiplier."
        ),
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        description=(
            "Fixed noise multiplier z: the noise std on the sum of clipped updates is z times the "
            "clipping norm (instead of target_epsilon)."
        ),
    )
    delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "Client-level delta; must be below 1 / number of clients. Default: 1 / (10 x number of "
            "clients)."
        ),
    )
    clipping: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description=(
            "'fixed': clip every update to clipping_norm. 'adaptive': the clip follows a noised "
            "quantile of the update norms (Andrew et al. 2021); part of the noise budget goes to the "
            "quantile estimate."
        ),
    )
    side: Literal["server", "client"] = Field(
        "server",
        description=(
            "'server': the server clips the updates it receives (it sees them unclipped). 'client': "
            "each client clips its own update before sending (Flower's clipping mods), so the server "
            "never sees an unclipped update; the server still checks the norm."
        ),
    )
    clipping_norm: float = Field(
        0.5,
        gt=0,
        description="L2 clipping norm of a client's update (the initial norm with adaptive clipping).",
    )
    target_quantile: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Adaptive clipping: share of updates that should be left unclipped.",
    )
    clip_learning_rate: float = Field(
        0.2, gt=0, le=10, description="Adaptive clipping: geometric step of the clip per round."
    )
    clipped_count_stddev: float | None = Field(
        None,
        gt=0,
        description=(
            "Adaptive clipping: noise std of the count of unclipped updates. Must exceed "
            "noise_multiplier / 2. Default: the number of clients per round / 20 (Flower's), raised "
            "to noise_multiplier when that is too small."
        ),
    )
    budget_epsilon: float | None = Field(
        None,
        gt=0,
        description=(
            "Hard cap on the federation's epsilon (default: target_epsilon). The run stops before a "
            "round that would pass it."
        ),
    )
    sampling_amplification: bool = Field(
        False,
        description=(
            "Account with sampling rate q = clients per round / population (privacy amplification "
            "by subsampling, the DP-FedAvg paper's analysis). Flower samples a fixed number of "
            "clients without replacement, for which this Poisson-sampling bound is an approximation, "
            "not a proof; off: q = 1, valid whatever the sampling."
        ),
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Opacus accountant for the federation's epsilon."
    )

    @model_validator(mode="after")
    def _noise_or_target(self) -> ClientLevelConfig:
        if not self.enabled:
            return self
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "privacy.client_level: give exactly one of target_epsilon and noise_multiplier "
                "when privacy.client_level.enabled = true"
            )
        _target_within_budget("privacy.client_level.", self.target_epsilon, self.effective_budget)
        return self

    @property
    def effective_budget(self) -> float | None:
        """The federation epsilon the run will not exceed (``None``: off or unbounded)."""
        return _effective_budget(self.enabled, self.budget_epsilon, self.target_epsilon)


class SecureAggregationConfig(_Section):
    """SecAgg+ parameters, used when ``privacy.secure_aggregation = true``.

    Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod`` run the protocol.

    Each client masks its quantized weights with pairwise masks shared with its neighbours and a
    private mask; the server can remove the masks only from the sum. A client's secrets are split
    into ``num_shares`` Shamir shares held by its neighbours; ``reconstruction_threshold`` of them
    recover the masks of a client that dropped out, so up to ``num_shares - threshold`` dropouts per
    neighbourhood do not stop a round.
    """

    num_shares: int | None = Field(
        None,
        ge=3,
        description=(
            "Neighbours each client shares its secrets with (itself included). None: every client "
            "of the round (SecAgg); an odd k < clients per round: SecAgg+'s k-regular graph, cheaper "
            "for large rounds."
        ),
    )
    reconstruction_threshold: int | None = Field(
        None,
        ge=2,
        description=(
            "Shares needed to recover a client's secret; must be above num_shares / 2 (else a server "
            "that lies about who dropped could unmask a single client) and below num_shares. None: "
            "num_shares // 2 + 1, which tolerates the most dropouts, num_shares - threshold."
        ),
    )
    clipping_range: float = Field(
        8.0,
        gt=0,
        le=1e6,
        description=(
            "Every weight a client sends must lie in [-r, r] to be quantized; a client whose weights "
            "leave it refuses the round (raise r). Larger r means coarser quantization."
        ),
    )
    quantization_range: int = Field(
        2**22,
        ge=2**8,
        description=(
            "Integer levels of the quantization: the rounding error per weight is below "
            "2 * clipping_range / quantization_range."
        ),
    )
    modulus_range: int = Field(
        2**32,
        ge=2**9,
        le=2**32,
        description=(
            "Masks are drawn modulo this power of two; clients per round x quantization_range must "
            "not exceed it (the sum would wrap around)."
        ),
    )
    max_weight: int | None = Field(
        None,
        ge=1,
        description=(
            "Largest FedAvg weight (a client's number of training examples) the masked sum carries; "
            "a client with more is weighted max_weight (and says so). Larger values cost precision. "
            "None: the largest client training set the server knows of, at least 1000. Ignored "
            "with client-level DP (equal weights)."
        ),
    )
    timeout: float | None = Field(
        None,
        gt=0,
        description=(
            "Seconds to wait for the replies of each of the four SecAgg+ stages (None: "
            "federation.round_timeout). A client that misses a stage counts as dropped."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> SecureAggregationConfig:
        m, q = self.modulus_range, self.quantization_range
        if m & (m - 1):
            raise ValueError(f"privacy.secagg.modulus_range = {m} must be a power of two")
        if m <= q:
            raise ValueError(
                f"privacy.secagg.modulus_range ({m}) must exceed quantization_range ({q})"
            )
        k, t = self.num_shares, self.reconstruction_threshold
        if k is not None and t is not None:
            if t >= k:
                raise ValueError(
                    f"privacy.secagg.reconstruction_threshold ({t}) must be below num_shares ({k}), "
                    "else a single dropout stops the round"
                )
            if 2 * t <= k:
                raise ValueError(
                    f"privacy.secagg.reconstruction_threshold ({t}) must exceed num_shares / 2 "
                    f"({k / 2:g}): with fewer, a server claiming that a client dropped out could "
                    "collect both of its secrets and read its update"
                )
        return self

    def shares_and_threshold(self, clients: int) -> tuple[int, int]:
        """The number of shares and the threshold for a round with ``clients`` clients."""
        k = clients if self.num_shares is None else min(self.num_shares, clients)
        if k < clients and k % 2 == 0:
            k += 1  # SecAgg+ builds a ring of k // 2 neighbours on each side: k must be odd
        t = (
            self.reconstruction_threshold
            if self.reconstruction_threshold is not None
            else k // 2 + 1
        )
        return k, t


class PrivacyConfig(_Section):
    """Sample-level differential privacy with Opacus DP-SGD, per client."""

    enabled: bool = Field(
        True, description="DP-SGD on. Off is for baselines only and is announced loudly."
    )
    target_epsilon: float | None = Field(
        8.0,
        gt=0,
        le=1000,
        description=(
            "Epsilon each client may spend over all planned rounds; the noise multiplier is calibrated "
            "to reach it exactly at the last round. Set to none and give noise_multiplier to fix the noise."
        ),
    )
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="Fixed noise multiplier (instead of target_epsilon). 0 with enabled=true is refused.",
    )
    delta: float = Field(
        1e-5, gt=0, lt=1, description="DP delta; keep it well below 1 / client dataset size."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Per-sample gradient clipping norm C.")
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Opacus accountant for the epsilon."
    )
    budget_epsilon: float | None = Field(
        None,
        gt=0,
        description=(
            "Hard cap on a client's cumulative epsilon (default: target_epsilon). A round that would "
            "pass it is refused before any training step."
        ),
    )
    clipping: Literal["auto", "flat", "ghost", "bookkeeping"] = Field(
        "auto",
        description=(
            "How each example's gradient is clipped (all release the same clipped sum). 'flat': "
            "Opacus's per-sample gradients; 'ghost': Opacus's two-pass ghost clipping (less memory "
            "for full fine-tuning); 'bookkeeping': privet's one-backward-pass ghost clipping "
            "(Linear, Embedding and LayerNorm layers only; the fastest DP path measured on a GPU). "
            "'auto': each client picks when it trains: 'bookkeeping' on a CUDA device when it covers "
            "every trainable layer, else 'flat'; always 'flat' on a CPU, as before 'auto' existed "
            "(LoRA costs about the same either way there; full fine-tuning on a CPU is faster with "
            "an explicit 'bookkeeping'). The client logs its choice and reports it in the round's "
            "metrics."
        ),
    )
    readout_center_noise: float = Field(
        10.0,
        ge=1.0,
        le=1000.0,
        description=(
            "Noise multiplier of the one release adapter.readout_center makes per client: the sum "
            "of its examples' unit-norm final states (sensitivity 1: one example adds or removes "
            "one unit vector) plus Gaussian noise of this std per coordinate. A deployed site's "
            "privacy.min_noise_multiplier raises it like the DP-SGD noise."
        ),
    )
    client_level: ClientLevelConfig = Field(
        default_factory=ClientLevelConfig,
        description="Client-level DP of the federation (DP-FedAvg), on top of the sample-level DP above.",
    )
    secure_aggregation: bool = Field(
        False,
        description=(
            "SecAgg+ (Flower's implementation): clients mask their weights so that the server sees "
            "only the sum of the round's updates, never one client's. Parameters: [privacy.secagg]. "
            "Needs 3+ clients per round and linear aggregation; combines with sample-level DP and "
            "with client-level DP with side = 'client' and fixed clipping."
        ),
    )
    secagg: SecureAggregationConfig = Field(
        default_factory=SecureAggregationConfig,
        description="SecAgg+ parameters (used when secure_aggregation = true).",
    )

    @model_validator(mode="after")
    def _noise_or_target(self) -> PrivacyConfig:
        if not self.enabled:
            return self
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                "privacy: give target_epsilon or noise_multiplier when privacy.enabled = true"
            )
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ValueError(
                "privacy: give target_epsilon or noise_multiplier, not both (set target_epsilon = none "
                "to fix the noise)"
            )
        if self.noise_multiplier == 0:
            raise ValueError(
                "privacy.noise_multiplier = 0 gives no privacy at all; set privacy.enabled = false for a "
                "non-private baseline instead"
            )
        _target_within_budget("privacy.", self.target_epsilon, self.effective_budget)
        return self

    @property
    def effective_budget(self) -> float | None:
        """The cumulative epsilon a client will not exceed (``None`` when DP is off or unbounded)."""
        return _effective_budget(self.enabled, self.budget_epsilon, self.target_epsilon)
