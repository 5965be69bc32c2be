"""FedEx-LoRA residuals: the part of the exact mean update that LoRA factors cannot carry.

With trainable ``A`` and ``B`` (``aggregation.lora = "fedex"``) the server averages ``A`` and ``B`` and
also sends, per adapted layer, the accumulated residual ``R = sum over rounds of mean(B_i A_i) -
mean(B) mean(A)``. Every holder of the global model (clients, the server's evaluation, an export)
folds ``scaling * R`` into that layer's frozen base weight, so that ``W0 + scaling * (R + B A)``
equals the exact mean of the clients' products round after round (Singhal et al. 2024,
"FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models").

The residuals travel and are stored as extra entries of the global state, under the LoRA ``A`` key
with ``lora_A`` replaced by ``fedex_residual`` (so checkpoints, resume and the final adapter keep
them); in a message they travel in their own ``ArrayRecord`` (:data:`RESIDUAL_RECORD`) beside the
adapter, so a client's reply and its validation concern the adapter only. PEFT has no notion of a
residual folded into the base weight, hence our own.

Folding is idempotent: the original base weight is kept, and each fold sets ``W = W0 + scaling * R``
(a layer absent from the residuals gets ``W0`` back), so a model cached across rounds never
accumulates a residual twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, RecordDict

from privet.common.arrays import arrayrecord_to_state
from privet.common.errors import ModelError
from privet.common.modeling import load_trainable_state, trainable_state

__all__ = [
    "RESIDUAL_FILE",
    "RESIDUAL_RECORD",
    "fold_residuals",
    "folded_residuals",
    "global_state",
    "is_residual_key",
    "load_global_state",
    "load_residual_file",
    "message_residuals",
    "residual_key",
    "residual_record",
    "save_residual_file",
    "split_residuals",
]

#: The message record that carries the residuals next to ``arrays``.
RESIDUAL_RECORD = "fedex-residual"
#: The file in ``final_adapter/`` (and a merged export's source) holding the residuals.
RESIDUAL_FILE = "fedex_residual.safetensors"

_TAG = ".fedex_residual."
_ORIGINAL = "_privet_fedex_w0"
_FOLDED = "_privet_fedex_folded"


def residual_key(a_key: str) -> str:
    """The residual's key for the LoRA ``A`` weight ``a_key`` (``...lora_A.default.weight``)."""
    if ".lora_A." not in a_key:
        raise ValueError(f"{a_key!r} is not a LoRA A weight")
    return a_key.replace(".lora_A.", _TAG)


def is_residual_key(key: str) -> bool:
    """Whether ``key`` names a FedEx residual."""
    return _TAG in key


def split_residuals(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(adapter weights, residuals)`` of a global state."""
    adapter = {k: v for k, v in state.items() if not is_residual_key(k)}
    residuals = {k: v for k, v in state.items() if is_residual_key(k)}
    return adapter, residuals


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    # Opacus's GradSampleModule prefixes names with "_module."; look through it.
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _layer(model: torch.nn.Module, key: str) -> tuple[torch.nn.Module, torch.nn.Parameter, float]:
    """The LoRA layer a residual key names, its base weight and its scaling (alpha / r)."""
    module_name, rest = key.split(_TAG, 1)
    adapter = rest.split(".", 1)[0]
    try:
        layer = model.get_submodule(module_name)
    except AttributeError:
        layer = None
    scaling = getattr(layer, "scaling", None)
    base = getattr(layer, "get_base_layer", None)
    if layer is None or not isinstance(scaling, dict) or adapter not in scaling or base is None:
        raise ModelError(
            f"FedEx residual {key!r} names no LoRA layer of this model",
            fix="server and clients must use the same model and adapter configuration",
        )
    weight = base().weight
    assert isinstance(weight, torch.nn.Parameter)
    return layer, weight, float(scaling[adapter])


def fold_residuals(model: torch.nn.Module, residuals: Mapping[str, torch.Tensor]) -> None:
    """Set each adapted layer's base weight to ``W0 + scaling * R`` (``W0`` for layers not in ``residuals``).

    Parameters
    ----------
    model
        A PEFT LoRA model (optionally inside Opacus's wrapper).
    residuals
        Residuals by key (:func:`residual_key`), each of the layer's ``(out, in)`` shape, in the
        units of ``B @ A`` (the layer's scaling is applied here).

    Raises
    ------
    ModelError
        When a key names no LoRA layer or a shape differs from the layer's weight.

    """
    model = _unwrapped(model)
    folded: dict[str, torch.Tensor] = getattr(model, _FOLDED, {})
    with torch.no_grad():
        # Restore every layer first: the new residuals replace the old ones, never add to them.
        for key in list(folded):
            layer, weight, _ = _layer(model, key)
            weight.copy_(getattr(layer, _ORIGINAL))
        folded = {}
        for key, value in residuals.items():
            layer, weight, scaling = _layer(model, key)
            r = value.detach().to(device=weight.device, dtype=torch.float32)
            if getattr(layer, "fan_in_fan_out", False):  # GPT-2's Conv1D stores (in, out)
                r = r.T
            if tuple(r.shape) != tuple(weight.shape):
                raise ModelError(
                    f"FedEx residual {key} has shape {tuple(value.shape)}, the layer's weight "
                    f"{tuple(weight.shape)}",
                    fix="server and clients must use the same model and adapter configuration",
                )
            if not hasattr(layer, _ORIGINAL):
                setattr(layer, _ORIGINAL, weight.detach().clone())
            w0 = getattr(layer, _ORIGINAL)
            weight.copy_((w0.float() + scaling * r).to(weight.dtype))
            folded[key] = value.detach().to("cpu", torch.float32).clone()
    setattr(model, _FOLDED, folded)


def folded_residuals(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The residuals currently folded into ``model`` (empty when none)."""
    return dict(getattr(_unwrapped(model), _FOLDED, {}))


def global_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights plus the folded residuals: everything the global model is made of."""
    return {**trainable_state(model), **folded_residuals(model)}


def load_global_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a global state: the adapter into the trainable weights, the residuals folded (or cleared)."""
    adapter, residuals = split_residuals(state)
    load_trainable_state(model, adapter)
    fold_residuals(model, residuals)


def message_residuals(content: RecordDict) -> dict[str, torch.Tensor]:
    """The residuals a message carries (empty when it has no :data:`RESIDUAL_RECORD`)."""
    record = content.array_records.get(RESIDUAL_RECORD)
    if record is None:
        return {}
    state = arrayrecord_to_state(record)
    bad = [k for k in state if not is_residual_key(k)]
    if bad:
        raise ModelError(
            f"the {RESIDUAL_RECORD!r} record holds non-residual arrays {bad[:3]}",
            fix="server and clients must run the same privet version",
        )
    return state


def save_residual_file(model: torch.nn.Module, folder: Path) -> Path | None:
    """Write the folded residuals to ``folder/RESIDUAL_FILE``; nothing (None) when there are none."""
    residuals = folded_residuals(model)
    if not residuals:
        return None
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RESIDUAL_FILE
    save_file({k: v.contiguous() for k, v in residuals.items()}, str(path))
    return path


def load_residual_file(folder: Path) -> dict[str, torch.Tensor]:
    """The residuals saved by :func:`save_residual_file` (empty when ``folder`` has none)."""
    path = folder / RESIDUAL_FILE
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


def residual_record(residuals: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The residuals as the message record (float32)."""
    from privet.common.arrays import state_to_arrayrecord

    return state_to_arrayrecord({k: v.float() for k, v in residuals.items()})
