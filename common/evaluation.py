"""Evaluation of a model on tokenized examples; shared by clients and the server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from privet.common.data import TokenizedExamples, collate, length_sorted_microbatches

__all__ = ["EvalResult", "autocast_for", "eval_mode", "evaluate"]


@dataclass
class EvalResult:
    """Loss and accuracy of a model on a data set, and the task's own metrics.

    ``metrics`` holds what only some tasks measure, by the name it is reported under (a causal
    LM's ``perplexity``, ``token-accuracy`` and ``exact-match``); classification has none.
    """

    loss: float
    accuracy: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def autocast_for(
    device: torch.device, mixed_precision: str
) -> contextlib.AbstractContextManager[object]:
    """Autocast context for the forward pass: bf16/fp16 on GPU, nothing on CPU."""
    # Mixed precision only on GPU: CPU autocast is slower on most CPUs and changes nothing for DP.
    if device.type != "cuda" or mixed_precision == "off":
        return contextlib.nullcontext()
    if mixed_precision == "fp16":
        dtype = torch.float16
    else:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then the mode it had (a client trains on after evaluating)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: TokenizedExamples,
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device | None = None,
    mixed_precision: str = "auto",
) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (length-sorted batches, no grad)."""
    n = len(data)
    if n == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    device = device or next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    with eval_mode(model):
        for mb in length_sorted_microbatches(np.arange(n), data.lengths, batch_size):
            batch = _move(collate([data[int(i)] for i in mb], pad_token_id), device)
            labels = batch.pop("labels")
            with autocast_for(device, mixed_precision):
                logits = model(**batch).logits.float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
    return EvalResult(loss=loss_sum / n, accuracy=correct / n, num_examples=n)


def _move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
