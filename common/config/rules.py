"""PrivetConfig: every section together, and the rules that span sections."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from privet.common.config._base import _Section
from privet.common.config.data import DataConfig
from privet.common.config.federation import (
    _PARAM_USERS,
    ROBUST_STRATEGIES,
    AggregationConfig,
    FaultsConfig,
    FederationConfig,
)
from privet.common.config.model import AdapterConfig, ModelConfig
from privet.common.config.privacy import PrivacyConfig
from privet.common.config.runtime import DeploymentConfig, SimulationConfig, TrackingConfig
from privet.common.config.training import TrainConfig

__all__ = ["PrivetConfig", "require_plain_averaging", "sampled_per_round"]


class PrivetConfig(_Section):
    """The whole configuration of a privet run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> PrivetConfig:
        if (
            self.model.base_dtype != "float32"
            and self.privacy.enabled
            and self.privacy.clipping == "ghost"
        ):
            raise ValueError(
                f"privacy.clipping = 'ghost' with model.base_dtype = {self.model.base_dtype!r}: "
                "ghost clipping's two backward passes would round apart in low precision; use "
                "privacy.clipping = 'bookkeeping' or 'flat'"
            )
        if self.model.base_quantization != "none" and self.adapter.method != "lora":
            raise ValueError(
                f"model.base_quantization = {self.model.base_quantization!r} stores the frozen base "
                f"quantized, and quantized weights cannot train, but adapter.method = "
                f"{self.adapter.method!r} trains the base; use adapter.method = 'lora' or "
                "model.base_quantization = 'none'"
            )
        if self.model.base_dtype != "float32" and self.adapter.method != "lora":
            raise ValueError(
                f"model.base_dtype = {self.model.base_dtype!r} holds a frozen base in low precision, "
                f"but adapter.method = {self.adapter.method!r} trains the base; use "
                "adapter.method = 'lora' or model.base_dtype = 'float32'"
            )
        if self.adapter.layers is not None and self.model.num_hidden_layers is not None:
            bad = [i for i in self.adapter.layers if i >= self.model.num_hidden_layers]
            if bad:
                raise ValueError(
                    f"adapter.layers {bad} do not exist in a model cut to model.num_hidden_layers = "
                    f"{self.model.num_hidden_layers}"
                )
        if self.data.partition in ("iid", "dirichlet") or self.data.source == "shakespeare":
            if self.federation.min_train_clients > self.data.num_clients:
                raise ValueError(
                    f"federation.min_train_clients ({self.federation.min_train_clients}) exceeds "
                    f"data.num_clients ({self.data.num_clients}); the first round would wait forever"
                )
            if self.federation.min_available_clients > self.data.num_clients:
                raise ValueError(
                    f"federation.min_available_clients ({self.federation.min_available_clients}) exceeds "
                    f"data.num_clients ({self.data.num_clients}); the run would wait forever"
                )
        _check_task(self)
        check_aggregation(self)
        if self.federation.transport != "float32":
            # The client encodes its reply inside the train function, so Flower mods around it see
            # an encoded update, not weights: the client-side clipping mod and the simulated
            # attackers would act on the wrong numbers.
            if self.privacy.client_level.enabled and self.privacy.client_level.side == "client":
                raise ValueError(
                    f"federation.transport = {self.federation.transport!r} cannot be combined with "
                    "privacy.client_level.side = 'client': Flower's clipping mod would clip the "
                    "encoded update instead of the weights; use side = 'server' or transport = 'float32'"
                )
            if self.faults.active:
                raise ValueError(
                    f"federation.transport = {self.federation.transport!r} cannot be combined with "
                    "[faults]: the simulated attackers rewrite weights, and the reply carries an "
                    "encoded update; use transport = 'float32' for robustness studies"
                )
        if self.privacy.client_level.enabled:
            require_plain_averaging(
                self,
                feature="privacy.client_level",
                why="its accountant bounds the sensitivity of an average of clipped updates, and a "
                "median or a Krum selection has no such bound, so the printed epsilon would be false",
            )
            if self.aggregation.lora == "svd":
                raise ValueError(
                    "aggregation.lora = 'svd' cannot be combined with privacy.client_level: the noise "
                    "is calibrated to a mean of clipped updates, not to an SVD re-factorization of "
                    "their products; use adapter.freeze_a = true (FFA-LoRA) with aggregation.lora = 'mean'"
                )
            if self.aggregation.lora == "fedex":
                raise ValueError(
                    "aggregation.lora = 'fedex' cannot be combined with privacy.client_level: the noise "
                    "is added to the mean of the clipped A and B updates, and the residual "
                    "mean(B_i A_i) - mean(B) mean(A) is a second, un-noised function of the clients' "
                    "updates that the accountant does not cover; use adapter.freeze_a = true (FFA-LoRA) "
                    "with aggregation.lora = 'mean'"
                )
        if self.aggregation.lora == "fedex" and self.federation.transport != "float32":
            raise ValueError(
                f"aggregation.lora = 'fedex' cannot be combined with federation.transport = "
                f"{self.federation.transport!r}: the residuals travel beside the encoded adapter and "
                "must stay exact; use transport = 'float32'"
            )
        if self.privacy.secure_aggregation:
            _check_secure_aggregation(self)
        return self


def _generation_source(data: DataConfig) -> bool | None:
    """Whether ``data`` gives generation examples; ``None`` when files not readable yet must tell.

    The data loaders own the answer. A train file that does not exist (yet) is not judged here:
    loading it later gives the one clear error about the file itself.
    """
    # Imported here: common/data imports this module.
    from privet.common.data import is_generation_source

    if data.source == "files" and data.train_files and not Path(data.train_files[0]).is_file():
        return None
    return is_generation_source(data)


def _check_task(cfg: PrivetConfig) -> None:
    """Refuse a task the data or the adapter cannot serve (a model validator calls it)."""
    task = cfg.model.task
    generation = _generation_source(cfg.data)
    if task == "causal_lm" and generation is False:
        raise ValueError(
            f"model.task = 'causal_lm' needs a generation data source, but data.source = "
            f"{cfg.data.source!r} holds labelled texts for classification; use a generation source "
            "(plain text, or JSONL files with prompt/completion or messages rows) or "
            "model.task = 'classification'"
        )
    if task == "classification" and generation is True:
        raise ValueError(
            f"model.task = 'classification' needs labelled texts, but data.source = "
            f"{cfg.data.source!r} holds generation examples; set model.task = 'causal_lm'"
        )
    if (
        task == "causal_lm"
        and cfg.faults.byzantine_fraction > 0
        and cfg.faults.attack == "label_flip"
    ):
        raise ValueError(
            "faults.attack = 'label_flip' flips class labels, and model.task = 'causal_lm' has none; "
            "use another faults.attack (e.g. 'sign_flip')"
        )
    if cfg.adapter.readout_tokens is not None and (
        task != "causal_lm" or cfg.adapter.method != "lora"
    ):
        raise ValueError(
            "adapter.readout_tokens trains rows of a language model's head, so it needs "
            "model.task = 'causal_lm' and adapter.method = 'lora'; a classifier trains its own head "
            "(adapter.train_head): remove adapter.readout_tokens"
        )
    if task == "causal_lm" and cfg.adapter.method != "lora":
        # Full fine-tuning of a decoder trains its RMSNorms and the (tied) embeddings, which no
        # clipping mode can clip per example here: refused, never trained unclipped.
        raise ValueError(
            "model.task = 'causal_lm' trains a LoRA adapter only; set adapter.method = 'lora'"
        )


def sampled_per_round(cfg: PrivetConfig) -> int | None:
    """How many clients Flower samples to train each round, or ``None`` when the count is unknown.

    Flower's rule: ``max(int(available * fraction_train), min_train_nodes)``, with the minimum capped
    at the number of clients (as ``build_strategy`` does). Unknown for a natural partition of your own
    files (the clients are only known once the data is read).
    """
    d = cfg.data
    if d.partition in ("iid", "dirichlet"):
        total = d.num_clients
    elif d.source in ("vader", "vader_instructions") and d.natural_key == "domain":
        total = len(set(d.vader_domains))
    elif d.source == "shakespeare":
        total = d.num_clients
    else:
        return None
    # Imported here: the privacy package pulls in Opacus and torch, which a configuration that is
    # only being read or validated should not wait for.
    from privet.common.privacy.mechanism import flower_sample_size

    fed = cfg.federation
    return flower_sample_size(total, fraction=fed.fraction_train, minimum=fed.min_train_clients)


def require_plain_averaging(cfg: PrivetConfig, *, feature: str, why: str) -> None:
    """Refuse a robust aggregator when ``feature`` needs the aggregate to be a mean of the replies.

    For example client-level DP: its accountant bounds the sensitivity of an average of clipped
    updates; a median or Krum's selection is a different function with no such bound. Call it from a
    model validator.

    Parameters
    ----------
    cfg
        The configuration being validated.
    feature
        The setting that needs averaging, e.g. ``"privacy.client_level"``.
    why
        Why it needs it, shown to the user.

    Raises
    ------
    ValueError
        When ``federation.strategy`` is one of :data:`ROBUST_STRATEGIES`.

    """
    strategy = cfg.federation.strategy
    if strategy in ROBUST_STRATEGIES:
        raise ValueError(
            f"federation.strategy = {strategy!r} cannot be combined with {feature}: {why}; "
            "use fedavg, fedprox, fedavgm, fedadam, fedyogi or fedadagrad"
        )


def _check_secure_aggregation(cfg: PrivetConfig) -> None:
    """Refuse what cannot hold when the server sees only the sum of the updates (a model validator calls it)."""
    only_sum = "with privacy.secure_aggregation the server sees only the sum of the updates"
    cl = cfg.privacy.client_level
    if cl.enabled and cl.side != "client":
        raise ValueError(
            f"privacy.client_level.side = 'server' cannot be combined with secure aggregation: {only_sum}, "
            "so it cannot clip each one; set privacy.client_level.side = 'client' (the clients clip)"
        )
    if cl.enabled and cl.clipping != "fixed":
        raise ValueError(
            "privacy.client_level.clipping = 'adaptive' cannot be combined with secure aggregation: "
            "each client would report in the clear whether its update was clipped; use clipping = 'fixed'"
        )
    require_plain_averaging(
        cfg,
        feature="privacy.secure_aggregation",
        why=f"{only_sum}, and a median or a Krum selection needs every update",
    )
    if cfg.aggregation.lora in ("svd", "fedex"):
        raise ValueError(
            f"aggregation.lora = {cfg.aggregation.lora!r} cannot be combined with secure "
            f"aggregation: {only_sum}, not the clients' factors that the products B_i A_i need; "
            "use aggregation.lora = 'mean'"
        )
    if cfg.federation.max_update_norm is not None:
        raise ValueError(
            f"federation.max_update_norm cannot be combined with secure aggregation: {only_sum}, so "
            "no single update can be checked; unset it (client-level DP with side = 'client' bounds "
            "every update instead)"
        )
    if cfg.federation.transport != "float32":
        raise ValueError(
            f"federation.transport = {cfg.federation.transport!r} cannot be combined with secure "
            "aggregation: SecAgg+ sends its own quantized, masked integers; use transport = 'float32'"
        )
    if cfg.faults.byzantine_fraction:
        raise ValueError(
            f"faults.byzantine_fraction cannot be combined with secure aggregation: {only_sum}, so "
            "attacks could not be observed or rejected; set it to 0 (dropouts and stragglers work)"
        )
    sa = cfg.privacy.secagg
    m = sampled_per_round(cfg)
    if m is None:
        return
    if m < 3:
        raise ValueError(
            f"secure aggregation needs at least 3 clients per round, the federation samples {m}: "
            "with 2, each client could subtract its own update from the sum; raise "
            "federation.min_train_clients (or fraction_train)"
        )
    if sa.num_shares is not None and sa.num_shares > m:
        raise ValueError(
            f"privacy.secagg.num_shares ({sa.num_shares}) exceeds the {m} clients per round; lower "
            "it or unset it (every client of the round)"
        )
    k, t = sa.shares_and_threshold(m)
    if t >= k or 2 * t <= k:
        raise ValueError(
            f"privacy.secagg.reconstruction_threshold = {t} with {k} shares per client: it must be "
            f"above {k / 2:g} and below {k}; unset it (default {k // 2 + 1})"
        )
    if m * sa.quantization_range > sa.modulus_range:
        raise ValueError(
            f"{m} clients per round x privacy.secagg.quantization_range ({sa.quantization_range}) "
            f"exceeds modulus_range ({sa.modulus_range}): the masked sum would wrap around; lower "
            "quantization_range"
        )


def check_aggregation(cfg: PrivetConfig) -> None:
    """Refuse strategy settings that cannot hold, each with the reason (a model validator calls it)."""
    strategy = cfg.federation.strategy
    agg = cfg.aggregation
    defaults = AggregationConfig()
    for name, users in _PARAM_USERS.items():
        value = getattr(agg, name)
        # Differs from the default: the user set it (a dumped-and-reloaded config passes).
        if value != getattr(defaults, name) and strategy not in users:
            raise ValueError(
                f"aggregation.{name} = {value!r} is only used by {', '.join(sorted(users))}, and "
                f"federation.strategy is {strategy!r}; remove it or change the strategy"
            )
    n = sampled_per_round(cfg)
    f = agg.num_malicious
    if n is not None:
        if strategy in ROBUST_STRATEGIES and n < 3:
            raise ValueError(
                f"federation.strategy = {strategy!r} with {n} clients per round: a robust rule needs "
                "at least 3 replies to outvote one bad one; add clients or use fedavg"
            )
        need = {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(strategy)
        if need is not None and n < need:
            rule = "4f+3" if strategy == "bulyan" else "2f+3"
            raise ValueError(
                f"federation.strategy = {strategy!r} tolerates f = aggregation.num_malicious = {f} "
                f"attackers only with n >= {rule} = {need} replies per round, and {n} clients are "
                "sampled; lower aggregation.num_malicious or sample more clients"
            )
        if strategy == "multikrum" and agg.num_selected is not None and agg.num_selected > n - f:
            raise ValueError(
                f"aggregation.num_selected = {agg.num_selected} exceeds n - f = {n - f} (n = {n} "
                f"clients per round, f = {f}): multikrum would have to average suspected attackers"
            )
        if strategy == "fedtrimmedavg" and int(agg.trim_beta * n) < 1:
            raise ValueError(
                f"aggregation.trim_beta = {agg.trim_beta} with {n} clients per round trims "
                f"int({agg.trim_beta} * {n}) = 0 replies from each end, which is plain averaging; "
                f"raise it to at least {1 / n:.3g} or sample more clients"
            )
    lora_trainable_a = cfg.adapter.method == "lora" and not cfg.adapter.freeze_a
    if agg.lora in ("svd", "fedex"):
        if cfg.adapter.readout_tokens is not None:
            raise ValueError(
                f"aggregation.lora = {agg.lora!r} re-factorizes LoRA products, but the readout of "
                "adapter.readout_tokens has a fixed B (its rows of the LM head), so its plain mean is "
                "already exact; use aggregation.lora = 'mean'"
            )
        if cfg.adapter.method != "lora" or cfg.adapter.freeze_a:
            raise ValueError(
                f"aggregation.lora = {agg.lora!r} corrects the mean of trainable A and B; with "
                f"adapter.method = {cfg.adapter.method!r} and adapter.freeze_a = {cfg.adapter.freeze_a} "
                "there is nothing to correct (FFA-LoRA's mean is already exact); use 'mean'"
            )
        if strategy not in ("fedavg", "fedprox"):
            raise ValueError(
                f"aggregation.lora = {agg.lora!r} forms the weighted mean of the clients' products, so "
                f"it needs a mean-based rule, not federation.strategy = {strategy!r}; use fedavg or fedprox"
            )
    if agg.require_exact_lora and lora_trainable_a and agg.lora != "fedex":
        raise ValueError(
            "aggregation.require_exact_lora = true, but with trainable A (adapter.freeze_a = false) "
            "the mean of A times the mean of B is not the mean of the products B_i A_i, and 'svd' is "
            "exact only when that mean has rank <= r; set adapter.freeze_a = true (FFA-LoRA, exact) "
            "or aggregation.lora = 'fedex' (exact, a full matrix per layer in every message)"
        )
