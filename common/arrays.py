"""The bridge between adapter state (torch tensors by name) and Flower's ``ArrayRecord``.

This is one of the few modules of ``privet.common`` that imports ``flwr``: the client's training
function deals in plain tensors, and only the apps convert at the message boundary.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from privet.common.errors import UpdateError

__all__ = ["arrayrecord_to_state", "check_update", "state_to_arrayrecord"]


def state_to_arrayrecord(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack named tensors into an ``ArrayRecord`` (bfloat16 is cast to float32, which Flower needs)."""
    record = ArrayRecord()
    for name, tensor in state.items():
        t = tensor.detach().to("cpu")
        if t.dtype == torch.bfloat16:
            t = t.float()
        record[name] = ArrayRecord.from_torch_state_dict({name: t})[name]
    return record


def arrayrecord_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Unpack an ``ArrayRecord`` into named tensors (writable copies, same dtypes and values)."""
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def check_update(
    update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], *, who: str
) -> None:
    """Check an update against what was sent: same keys, shapes and dtypes, all values finite.

    Raises
    ------
    UpdateError
        Naming ``who`` and the first problem found.

    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateError(
            f"{who}: update keys differ from the global adapter (missing {missing[:3]}, extra {extra[:3]})"
        )
    for name, ref in reference.items():
        got = update[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise UpdateError(
                f"{who}: {name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
            )
        if got.dtype != ref.dtype:
            raise UpdateError(f"{who}: {name} has dtype {got.dtype}, expected {ref.dtype}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise UpdateError(f"{who}: {name} holds NaN or infinite values")
