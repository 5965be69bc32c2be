"""[federation], [aggregation] and [faults]: rounds, sampling, strategies, reply checks, injected faults."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from privet.common.config._base import _Section

__all__ = [
    "ROBUST_STRATEGIES",
    "STRATEGIES",
    "AggregationConfig",
    "FaultsConfig",
    "FederationConfig",
]


StrategyName = Literal[
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
]


#: Every value of ``federation.strategy``.
STRATEGIES: tuple[str, ...] = StrategyName.__args__  # type: ignore[attr-defined]


#: Strategies whose aggregate is not a (weighted) mean of the replies: an accountant or a proof
#: that assumes averaging (client-level DP, exact LoRA means) does not hold for them.
ROBUST_STRATEGIES = frozenset({"fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"})


# Which strategies read each [aggregation] parameter; setting one for another strategy is refused.
_PARAM_USERS: dict[str, frozenset[str]] = {
    "proximal_mu": frozenset({"fedprox"}),
    "server_learning_rate": frozenset({"fedavgm"}),
    "server_momentum": frozenset({"fedavgm"}),
    "eta": frozenset({"fedadam", "fedyogi", "fedadagrad"}),
    "tau": frozenset({"fedadam", "fedyogi", "fedadagrad"}),
    "beta_1": frozenset({"fedadam", "fedyogi"}),
    "beta_2": frozenset({"fedadam", "fedyogi"}),
    "trim_beta": frozenset({"fedtrimmedavg"}),
    "num_malicious": frozenset({"krum", "multikrum", "bulyan"}),
    "num_selected": frozenset({"multikrum"}),
}


class FederationConfig(_Section):
    """Rounds, sampling and evaluation of the federation."""

    rounds: int = Field(3, ge=1, le=100_000, description="Federated rounds.")
    strategy: StrategyName = Field(
        "fedavg",
        description=(
            "Aggregation strategy, Flower's Message-API class of the same name: 'fedavg', 'fedprox' "
            "(clients add (mu/2)||w - w_global||^2 to their loss), 'fedavgm' (server momentum), "
            "'fedadam' / 'fedyogi' / 'fedadagrad' (server optimizers), and the Byzantine-robust "
            "'fedmedian', 'fedtrimmedavg', 'krum', 'multikrum', 'bulyan'. Parameters: [aggregation]."
        ),
    )
    fraction_train: float = Field(
        1.0, gt=0, le=1, description="Share of connected clients sampled to train per round."
    )
    min_train_clients: int = Field(
        2, ge=1, description="Never train a round with fewer sampled clients."
    )
    fraction_evaluate: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of clients that evaluate the global model on their test split (0: none).",
    )
    min_available_clients: int = Field(
        2, ge=1, description="Wait until this many clients are connected."
    )
    server_evaluation: bool = Field(
        True, description="Evaluate the global adapter on the server test set each round."
    )
    round_timeout: float = Field(
        3600.0, gt=0, description="Seconds to wait for the replies of one round."
    )
    max_update_norm: float | None = Field(
        None,
        gt=0,
        description=(
            "Reject a train reply whose update (reply minus the global weights sent) has an L2 norm "
            "above this, over all trainable arrays (none: no bound). Replies are always checked for "
            "keys, shapes, dtypes, finite values and a plausible num-examples."
        ),
    )

    update_norm_factor: float | Literal["auto"] | None = Field(
        "auto",
        description=(
            "Reject a train reply whose update norm exceeds this multiple of the median update norm "
            "of the round's other valid replies (at least one other needed), so one site cannot "
            "outvote the rest by scaling its update. 'auto': 10 in a deployment (`privet server`), "
            "off in a simulation (whose [faults] studies measure attacks on the strategies); none: "
            "off. Not applied under secure aggregation (the server never sees single updates)."
        ),
    )
    max_examples_per_client: int | None = Field(
        100_000,
        ge=1,
        description=(
            "Reject a train reply that reports more num-examples than this: a reply's weight in the "
            "average is its num-examples, so an unbounded claim would outvote every other site. Set "
            "it to the largest honest site's training set (none: no bound, not advised in a "
            "deployment)."
        ),
    )

    transport: Literal["float32", "float16", "int8"] = Field(
        "float32",
        description=(
            "Encoding of the weights on the wire: float32 (exact), float16 (half the bytes) or int8 "
            "(a quarter; one scale per tensor). Replies carry the update, not the weights, so small "
            "updates survive the rounding."
        ),
    )

    @model_validator(mode="after")
    def _norm_factor(self) -> FederationConfig:
        f = self.update_norm_factor
        if isinstance(f, float) and not (math.isfinite(f) and f > 1):
            raise ValueError(
                f"federation.update_norm_factor = {f} must be a number above 1 (e.g. 10), 'auto' "
                "or none"
            )
        return self

    def norm_factor(self, *, deployed: bool) -> float | None:
        """The update-norm factor in force: ``'auto'`` is 10 in a deployment, off in a simulation."""
        if self.update_norm_factor == "auto":
            return AUTO_NORM_FACTOR if deployed else None
        return self.update_norm_factor


#: ``federation.update_norm_factor = 'auto'`` in a deployment: an honest site's update norm is
#: within a small multiple of its peers' (same model, data size and DP noise); a 10x outlier is not.
AUTO_NORM_FACTOR = 10.0


class AggregationConfig(_Section):
    """Parameters of the strategy chosen by federation.strategy, and how LoRA pairs are aggregated.

    A parameter set explicitly for a strategy that does not use it is refused (it would be ignored).
    """

    proximal_mu: float = Field(
        0.01,
        ge=0,
        le=1e4,
        description="fedprox: weight mu of the proximal term (mu/2)||w - w_global||^2 each client adds to its loss.",
    )
    server_learning_rate: float = Field(
        1.0, gt=0, le=100, description="fedavgm: server learning rate."
    )
    server_momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm: server momentum.")
    eta: float = Field(
        1e-2,
        gt=0,
        le=10,
        description=(
            "fedadam / fedyogi / fedadagrad: server step size, about the largest change of one weight "
            "per round. Flower's default (0.1) is for training from scratch; LoRA weights are small."
        ),
    )
    beta_1: float | None = Field(
        None, ge=0, lt=1, description="fedadam / fedyogi: first-moment decay (none: Flower's 0.9)."
    )
    beta_2: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="fedadam / fedyogi: second-moment decay (none: Flower's 0.99).",
    )
    tau: float = Field(
        1e-3,
        gt=0,
        le=1,
        description="fedadam / fedyogi / fedadagrad: adaptivity epsilon added to sqrt(v).",
    )
    trim_beta: float = Field(
        0.2,
        gt=0,
        lt=0.5,
        description="fedtrimmedavg: fraction of the replies cut from each end, per coordinate.",
    )
    num_malicious: int = Field(
        1,
        ge=0,
        le=100_000,
        description=(
            "krum / multikrum / bulyan: number f of Byzantine clients per round the rule must "
            "tolerate. Needs n >= 2f+3 (krum, multikrum) or n >= 4f+3 (bulyan) replies per round."
        ),
    )
    num_selected: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="multikrum: how many of the best-scored replies are averaged (none: n - f).",
    )
    lora: Literal["mean", "svd", "fedex"] = Field(
        "mean",
        description=(
            "How LoRA pairs (A, B) are combined. 'mean': the strategy's rule on each array; exact "
            "for FFA-LoRA (adapter.freeze_a = true, the default). 'svd' (trainable A, fedavg/fedprox "
            "only): the weighted mean of the products B_i A_i is formed exactly and re-factorized by a "
            "truncated SVD into rank r, the best rank-r approximation (exact when the mean product has "
            "rank <= r); the relative truncation error is logged each round. 'fedex' (trainable A, "
            "fedavg/fedprox only, FedEx-LoRA): A and B are averaged and the residual mean(B_i A_i) - "
            "mean(B) mean(A) is accumulated and folded into each adapted layer's frozen base weight by "
            "clients and server, so the global model is the exact mean; costs one full out x in matrix "
            "per adapted layer in every message."
        ),
    )
    require_exact_lora: bool = Field(
        False,
        description=(
            "Refuse configurations whose LoRA aggregation is not exactly the mean of the clients' "
            "products (trainable A with 'mean' or 'svd'); FFA-LoRA and 'fedex' pass."
        ),
    )


class FaultsConfig(_Section):
    """Simulated misbehaviour (privet simulate only; ignored by a deployed federation). Seeded."""

    seed: int = Field(0, ge=0, description="Seed choosing attackers, dropouts and delays.")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Probability that a sampled client does not reply in a round (each client and round drawn independently).",
    )
    straggler_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of clients that are slow (fixed by seed)."
    )
    straggler_delay: Literal["fixed", "uniform", "exponential"] = Field(
        "exponential",
        description=(
            "Distribution of a straggler's extra delay per round: 'fixed' = mean, 'uniform' on "
            "[0, 2 * mean], 'exponential' with that mean. A delay above federation.round_timeout "
            "means the reply misses the round (the server never sees it)."
        ),
    )
    straggler_delay_mean: float = Field(
        0.0, ge=0, le=1e6, description="Mean extra delay of a straggler, seconds."
    )
    sleep: bool = Field(
        False,
        description=(
            "Really wait a straggler's delay when it is within the round timeout (slow, realistic "
            "wall time); off: only the late ones are dropped."
        ),
    )
    byzantine_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of clients that attack every round they are sampled (fixed by seed).",
    )
    attack: Literal["sign_flip", "scale", "gaussian", "nan", "wrong_shape", "label_flip"] = Field(
        "sign_flip",
        description=(
            "What attackers do: 'sign_flip' sends w - s*(w_local - w), 'scale' sends w + s*(w_local - w) "
            "(s = attack_scale), 'gaussian' sends w + N(0, noise_std^2), 'nan' NaN weights, "
            "'wrong_shape' a truncated array, 'label_flip' trains honestly on flipped labels."
        ),
    )
    attack_scale: float = Field(4.0, gt=0, le=1e6, description="s of 'sign_flip' and 'scale'.")
    noise_std: float = Field(1.0, gt=0, le=1e6, description="Standard deviation of 'gaussian'.")

    @property
    def active(self) -> bool:
        """Whether any fault is configured."""
        return bool(
            self.dropout
            or (self.straggler_fraction and self.straggler_delay_mean)
            or self.byzantine_fraction
        )
