"""Export a run's final adapter: a standalone transformers folder (adapter merged) or the PEFT folder.

The merged folder is what the Hugging Face ecosystem expects: ``config.json`` with ``id2label``,
``model.safetensors`` and the tokenizer, so ``pipeline("text-classification", model=DIR)`` classifies
text without privet installed; a causal LM's folder (``model.task = 'causal_lm'``) generates with
``pipeline("text-generation", model=DIR)``, its chat template included. Merging is PEFT's ``merge_and_unload``. A run that pooled by masked
mean (the sentence-transformers default) is saved with a small model class of its own
(``modeling_privet_bert.py``, copied into the folder) and loads with ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
import shutil
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privet.common.errors import ModelError, PrivetError
from privet.common.lora_residual import RESIDUAL_FILE, fold_residuals, load_residual_file
from privet.common.modeling import (
    MaskedMeanPooler,
    quiet_transformers,
    resolve_model_path,
    use_mean_pooling,
)
from privet.common.tasks import task_for

__all__ = ["ExportError", "ExportResult", "export_run", "load_run_model"]

# Label names of the data sources privet knows; files-based data keeps transformers' LABEL_i.
_KNOWN_LABELS = {"vader": ["negative", "positive"]}


class ExportError(PrivetError):
    """A run cannot be exported as asked."""


@dataclass
class ExportResult:
    """What ``export_run`` wrote."""

    out: Path
    merged: bool
    needs_trust_remote_code: bool
    id2label: dict[int, str]
    #: The transformers pipeline the merged folder serves (``text-classification``, ``text-generation``).
    pipeline: str = "text-classification"


def _final_dir(run_dir: Path) -> Path:
    final = Path(run_dir) / "final_adapter"
    if not (final / "privet.json").is_file():
        raise ExportError(
            f"{run_dir} holds no final_adapter/privet.json (the run did not finish)",
            fix="export a run that completed, or rerun it",
        )
    return final


def _num_labels(final: Path) -> int:
    from safetensors import safe_open

    files = sorted(final.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118  # safe_open is not a Mapping
                if key.endswith(("classifier.weight", "score.weight")) or key.endswith(
                    (
                        "classifier.modules_to_save.default.weight",
                        "score.modules_to_save.default.weight",
                    )
                ):
                    return int(fh.get_slice(key).get_shape()[0])
    raise ExportError(
        f"cannot tell the number of labels: no classifier weight in {final}",
        fix="the run must train the head (adapter.train_head = true)",
    )


def _run_settings(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.toml`` as plain TOML.

    Only two fields are needed here; reading them raw keeps an export working for a config that
    the current models would not validate (another privet version, or a field left out as none).
    """
    try:
        return tomllib.loads((Path(run_dir) / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ExportError(
            f"cannot read {Path(run_dir) / 'config.toml'}: {exc}", fix="give a run directory"
        ) from None


def _label_names(
    run_dir: Path, settings: dict[str, Any], num_labels: int, labels: list[str] | None
) -> dict[int, str]:
    """``id2label``: ``--labels``, else the run's own class names, else known or generic names."""
    if labels is not None:
        if len(labels) != num_labels:
            raise ExportError(
                f"--labels names {len(labels)} labels but the model has {num_labels}.",
                fix=f"give {num_labels} comma-separated names, in label order",
            )
        return dict(enumerate(labels))
    # labels.json: the mapping the run used (names in the data or data.label_names).
    try:
        recorded = json.loads((Path(run_dir) / "labels.json").read_text(encoding="utf-8"))
        names = [str(n) for n in recorded.get("label_names") or []]
    except (OSError, ValueError, AttributeError):
        names = []
    if not names:
        names = [str(n) for n in (settings.get("data") or {}).get("label_names") or []]
    if len(names) == num_labels:
        return dict(enumerate(names))
    known = _KNOWN_LABELS.get(str((settings.get("data") or {}).get("source", "vader")))
    if known is not None and len(known) == num_labels:
        return dict(enumerate(known))
    return {i: f"LABEL_{i}" for i in range(num_labels)}


def load_run_model(run_dir: Path) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The model a run trained, as privet uses it: base model, privet's pooling, final adapter (not merged).

    Parameters
    ----------
    run_dir
        A finished run directory (``final_adapter/`` present).

    Returns
    -------
    tuple
        ``(model in eval mode, tokenizer, privet.json contents)``.

    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    final = _final_dir(run_dir)
    info = json.loads((final / "privet.json").read_text(encoding="utf-8"))
    settings = _run_settings(run_dir)
    task = task_for(str(info.get("task", "classification")))
    source = resolve_model_path(str(info["base_model"]))
    # A classifier's head is sized by its labels; a causal LM keeps its pretrained LM head.
    overrides: dict[str, Any] = (
        {} if task.name == "causal_lm" else {"num_labels": _num_labels(final)}
    )
    if info.get("num_hidden_layers") is not None:
        overrides["num_hidden_layers"] = int(info["num_hidden_layers"])
    trust = bool((settings.get("model") or {}).get("trust_remote_code", False))
    # Quiet: the base model's new head is reported "MISSING ... newly initialized", which reads
    # as if the trained head were lost; the adapter loaded below brings the trained one.
    with quiet_transformers():
        hf_config = AutoConfig.from_pretrained(source, trust_remote_code=trust, **overrides)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
        base = getattr(transformers, task.auto_model).from_pretrained(
            source, config=hf_config, trust_remote_code=trust
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    base.config.pad_token_id = tokenizer.pad_token_id
    if info.get("mean_pooling"):
        use_mean_pooling(base)
    model: torch.nn.Module
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        with quiet_transformers(), warnings.catch_warnings():
            # PEFT reads a deprecated transformers attribute, and warns that a LoRA on a tied LM
            # head (the readout, adapter.readout_tokens) complicates merging: the merge below
            # unties it first (_untie_adapted_head).
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
            model = PeftModel.from_pretrained(base, str(final))
        # FedEx-LoRA: the residuals the federation folded into the base weights.
        fold_residuals(model, load_residual_file(final))
    else:
        # adapter.method = "full": the trainable weights by parameter name.
        from safetensors.torch import load_file

        state = load_file(str(final / "trainable.safetensors"))
        missing = sorted(set(state) - {n for n, _ in base.named_parameters()})
        if missing:
            raise ExportError(
                f"weights {missing[:3]} of {final} do not exist in {info['base_model']!r}",
                fix="export with the privet version that wrote the run",
            )
        base.load_state_dict(state, strict=False)
        model = base
    return model.eval(), tokenizer, info


def _untie_adapted_head(model: torch.nn.Module) -> None:
    """Give an adapted, tied LM head its own weight before merging (``adapter.readout_tokens``).

    The readout is a LoRA on ``lm_head``; in SmolLM2 the head shares its weight with the input
    embeddings, so merging into the shared weight would also move the embeddings of the readout's
    tokens, and the exported model would not be the one that was trained. Untied, the merged
    head carries the readout and the embeddings stay the base model's.
    """
    get_base = getattr(model, "get_base_model", None)
    if not callable(get_base):
        return
    base = get_base()
    head = getattr(base, "lm_head", None)
    layer = getattr(head, "base_layer", None)  # PEFT's LoRA wrapper around the Linear head
    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if layer is None or embeddings is None or layer.weight is not embeddings.weight:
        return
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    base.config.tie_word_embeddings = False
    text_config = getattr(base.config, "get_text_config", None)
    if callable(text_config):
        text_config().tie_word_embeddings = False


def _mean_pooled_copy(merged: Any) -> Any:
    """The merged BERT model as a :class:`PrivetBertForSequenceClassification` (same weights)."""
    from privet.server.rundir.modeling_privet_bert import (
        PrivetBertConfig,
        PrivetBertForSequenceClassification,
    )

    config = merged.config
    if config.model_type != "bert" or not hasattr(merged, "bert"):
        raise ExportError(
            f"a merged export of a mean-pooled {config.model_type!r} model is not supported "
            "(privet's exported mean-pooling class is BERT-only)",
            fix="use --adapter-only, or train with model.pooling = 'model'",
        )
    data = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        data.pop(key, None)
    new_config = PrivetBertConfig(**data)
    PrivetBertConfig.register_for_auto_class()  # type: ignore[no-untyped-call]
    PrivetBertForSequenceClassification.register_for_auto_class(  # type: ignore[no-untyped-call]
        "AutoModelForSequenceClassification"
    )
    model = PrivetBertForSequenceClassification(new_config)
    state = {k: v for k, v in merged.state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"the merged weights do not fit the mean-pooling class: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}",
            fix="use --adapter-only",
        )
    model.eval()  # type: ignore[no-untyped-call]
    return model


def export_run(
    run_dir: Path,
    *,
    out: Path,
    merge: bool = True,
    labels: list[str] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write a run's final model to ``out``.

    Parameters
    ----------
    run_dir
        A finished run directory.
    out
        The folder to write; it must not exist or be empty unless ``overwrite``.
    merge
        True: a standalone transformers folder with the adapter merged into the base weights.
        False: the PEFT adapter folder (``PeftModel.from_pretrained(base, out)``) plus the tokenizer.
    labels
        Label names in label order (default: the data source's names, else ``LABEL_i``).
    overwrite
        Replace the contents of a non-empty ``out``.

    Returns
    -------
    ExportResult
        Where it went and how to load it.

    Raises
    ------
    ExportError
        When the run is unfinished, ``out`` is in the way, or the labels do not fit.

    """
    run_dir = Path(run_dir)
    out = Path(out)
    final = _final_dir(run_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(
                f"{out} exists and is not empty", fix="choose another --out or pass --force"
            )
        shutil.rmtree(out)
    if not merge and (final / RESIDUAL_FILE).is_file():
        # PEFT's loader would ignore the residuals and give a different model without a word.
        raise ExportError(
            f"{run_dir} was trained with aggregation.lora = 'fedex': its base weights carry "
            f"residuals ({RESIDUAL_FILE}) that a PEFT adapter folder cannot express",
            fix="export it merged: leave out --adapter-only",
        )
    model, tokenizer, info = load_run_model(run_dir)
    task = task_for(str(info.get("task", "classification")))
    generative = task.name == "causal_lm"
    if generative and labels is not None:
        raise ExportError(
            "--labels names classes, but this run trained a causal LM (model.task = 'causal_lm')",
            fix="leave out --labels",
        )
    id2label = (
        {}
        if generative
        else _label_names(run_dir, _run_settings(run_dir), _num_labels(final), labels)
    )
    out.mkdir(parents=True, exist_ok=True)
    if not merge:
        for item in final.iterdir():
            if item.is_file():
                shutil.copy2(item, out / item.name)
        tokenizer.save_pretrained(str(out))
        return ExportResult(
            out=out,
            merged=False,
            needs_trust_remote_code=False,
            id2label=id2label,
            pipeline=task.pipeline,
        )

    _untie_adapted_head(model)
    unload = getattr(model, "merge_and_unload", None)
    merged: Any = unload() if callable(unload) else model
    mean = any(isinstance(m, MaskedMeanPooler) for m in merged.modules())
    final_model: Any = _mean_pooled_copy(merged) if mean else merged
    if not generative:
        final_model.config.id2label = dict(id2label)
        final_model.config.label2id = {v: k for k, v in id2label.items()}
    final_model.config.privet = {
        "run": run_dir.name,
        "task": task.name,
        "base_model": info.get("base_model"),
        "pooling": "mean" if mean else "model",
        "max_length": info.get("max_length"),
    }
    final_model.save_pretrained(str(out))
    tokenizer.model_max_length = int(info.get("max_length") or tokenizer.model_max_length)
    tokenizer.save_pretrained(str(out))
    return ExportResult(
        out=out,
        merged=True,
        needs_trust_remote_code=mean,
        id2label=id2label,
        pipeline=task.pipeline,
    )
