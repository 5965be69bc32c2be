"""Transport encodings of adapter weights: float32 (exact), float16 and int8 (smaller messages).

Flower sends arrays as they are; it has no lossy encoding, hence our own. The server sends the
global weights encoded; a client trains from exactly what it decoded and replies with its *update*
(new weights minus the weights it received) encoded the same way. The server adds the decoded
update to its own copy of what that client received, so the quantisation of the weights
themselves never shrinks an update below the encoding's resolution, and what reaches the strategy
(and the reply checks) is float32 with the keys, shapes and dtypes that were sent.

A message says how it is encoded in its ``transport`` ConfigRecord; a message without one is plain
float32 weights (every older peer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from privet.common.arrays import arrayrecord_to_state, state_to_arrayrecord
from privet.common.errors import UpdateError
from privet.common.protocol import ARRAYS

__all__ = [
    "SCALE_SUFFIX",
    "TRANSPORT_RECORD",
    "Encoding",
    "decode_state",
    "encode_state",
    "message_encoding",
    "read_arrays",
    "write_arrays",
]

Encoding = Literal["float32", "float16", "int8"]

#: Name of the ConfigRecord that describes a message's encoding.
TRANSPORT_RECORD = "transport"
#: int8 tensors travel with one float32 scale each, under the tensor's name plus this suffix.
SCALE_SUFFIX = "#scale"
_ENCODINGS = ("float32", "float16", "int8")


def encode_state(state: Mapping[str, torch.Tensor], encoding: Encoding) -> ArrayRecord:
    """Encode named float tensors as an ``ArrayRecord``.

    ``int8`` is symmetric per tensor: ``q = round(x / s)`` with ``s = max|x| / 127``, so the error
    of every value is at most ``s / 2``. A tensor whose scale would fall below float32's smallest
    normal number (``max|x|`` under about 1.5e-36) travels as zeros: such a scale cannot be
    represented, and the error is then at most ``max|x|``.
    """
    if encoding == "float32":
        return state_to_arrayrecord({k: v.detach().float() for k, v in state.items()})
    if encoding == "float16":
        return state_to_arrayrecord({k: v.detach().to(torch.float16) for k, v in state.items()})
    if encoding != "int8":
        raise ValueError(f"unknown transport encoding {encoding!r}; use one of {_ENCODINGS}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        x = tensor.detach().to("cpu", torch.float32)
        peak = float(x.abs().max()) if x.numel() else 0.0
        scale = peak / 127.0
        if scale < torch.finfo(torch.float32).tiny:  # zero, or not representable: send zeros
            scale = 1.0
        out[name] = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
        out[name + SCALE_SUFFIX] = torch.tensor([scale], dtype=torch.float32)
    return state_to_arrayrecord(out)


def decode_state(record: ArrayRecord, encoding: Encoding) -> dict[str, torch.Tensor]:
    """Decode an ``ArrayRecord`` written by :func:`encode_state` into float32 tensors.

    Raises
    ------
    UpdateError
        When the arrays do not have the dtypes ``encoding`` writes (a peer that encodes
        differently, or a tampered message).

    """
    raw = arrayrecord_to_state(record)
    want = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}.get(encoding)
    if want is None:
        raise UpdateError(f"unknown transport encoding {encoding!r}; expected one of {_ENCODINGS}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if tensor.dtype != want:
            raise UpdateError(
                f"{name} travels as {tensor.dtype}, the {encoding} encoding needs {want}"
            )
        if encoding == "int8":
            scale = raw.get(name + SCALE_SUFFIX)
            if scale is None or scale.numel() != 1 or not bool(torch.isfinite(scale).all()):
                raise UpdateError(f"{name} travels as int8 without a valid scale")
            out[name] = tensor.to(torch.float32) * scale.to(torch.float32)
        else:
            out[name] = tensor.to(torch.float32)
    return out


def write_arrays(
    content: RecordDict,
    state: Mapping[str, torch.Tensor],
    encoding: Encoding,
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Put ``state`` into ``content["arrays"]`` encoded, with its ``transport`` record.

    With ``reference`` (the weights this side received) the update ``state - reference`` travels
    instead of the weights; plain float32 always sends the weights themselves, as Flower does.
    """
    delta = reference is not None and encoding != "float32"
    if delta:
        assert reference is not None
        payload = {k: v.detach().float() - reference[k].float() for k, v in state.items()}
    else:
        payload = dict(state)
    content[ARRAYS] = encode_state(payload, encoding)
    content[TRANSPORT_RECORD] = ConfigRecord({"encoding": encoding, "delta": delta})


def read_arrays(
    content: RecordDict, *, reference: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The float32 weights a message carries (see :func:`write_arrays`).

    Raises
    ------
    UpdateError
        When the message carries an update but no ``reference`` is known, or cannot be decoded.

    """
    arrays = content.array_records[ARRAYS]
    meta = content.config_records.get(TRANSPORT_RECORD)
    if meta is None:
        return arrayrecord_to_state(arrays)
    encoding = str(meta.get("encoding", "float32"))
    if encoding not in _ENCODINGS:
        raise UpdateError(f"unknown transport encoding {encoding!r}; expected one of {_ENCODINGS}")
    state = decode_state(arrays, encoding)  # type: ignore[arg-type]
    if bool(meta.get("delta", False)):
        if reference is None:
            raise UpdateError(
                "the message carries an update, but the weights it updates are unknown"
            )
        missing = sorted(set(reference) - set(state))
        if missing:
            raise UpdateError(f"the update lacks {missing[:3]}")
        # Extra keys pass through unchanged: the server's reply checks name and reject them.
        state = {k: (reference[k].float() + v) if k in reference else v for k, v in state.items()}
    return state


def message_encoding(content: RecordDict) -> Encoding:
    """The encoding a message was sent with (a reply uses the same one)."""
    meta = content.config_records.get(TRANSPORT_RECORD)
    encoding = str(meta.get("encoding", "float32")) if meta is not None else "float32"
    if encoding not in _ENCODINGS:
        raise UpdateError(f"unknown transport encoding {encoding!r}; expected one of {_ENCODINGS}")
    return encoding  # type: ignore[return-value]
