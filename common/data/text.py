"""Tokenization, padding and micro-batching of examples for training and evaluation.

Texts are tokenized once, without padding; each (micro-)batch is padded only to its own longest
row.  With DP-SGD the logical batch is Poisson-sampled and put through the model in micro-batches,
so sorting a batch by length before cutting it into micro-batches saves most of the padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch.utils.data import Dataset

from privet.common.data.examples import Examples

__all__ = ["TokenizedExamples", "collate", "length_sorted_microbatches"]

_TOKENIZE_CHUNK = 2048  # texts per tokenizer call: bounds the peak memory of the encoding


class TokenizedExamples(Dataset[tuple[list[int], int]]):
    """Examples tokenized once (truncated, not padded), ready for :func:`collate`.

    Parameters
    ----------
    examples
        The texts and labels.
    tokenizer
        A Hugging Face tokenizer (called as ``tokenizer(texts, truncation=True,
        max_length=max_length)``).
    max_length
        Tokens per example, special tokens included.

    Attributes
    ----------
    input_ids : list of list of int
        Token ids per example.
    labels : numpy.ndarray
        ``int64`` label per example.
    lengths : numpy.ndarray
        ``int64`` token count per example (for :func:`length_sorted_microbatches`).

    """

    def __init__(self, examples: Examples, tokenizer: Any, max_length: int) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        ids: list[list[int]] = []
        for start in range(0, len(examples), _TOKENIZE_CHUNK):
            chunk = examples.texts[start : start + _TOKENIZE_CHUNK]
            encoded = tokenizer(chunk, truncation=True, max_length=max_length)
            ids.extend([int(t) for t in row] for row in encoded["input_ids"])
        self.input_ids: list[list[int]] = ids
        self.labels: NDArray[np.int64] = np.array(examples.labels, dtype=np.int64)
        self.lengths: NDArray[np.int64] = np.array([len(row) for row in ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.input_ids[index], int(self.labels[index])


def collate(
    batch_items: Sequence[tuple[Sequence[int], int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Pad a batch of ``(input_ids, label)`` items to its longest row.

    Parameters
    ----------
    batch_items
        Items as returned by :meth:`TokenizedExamples.__getitem__`.
    pad_token_id
        Id written into the padded positions.

    Returns
    -------
    dict of str to torch.Tensor
        ``input_ids``, ``attention_mask`` (1 on real tokens), ``token_type_ids`` (zeros) and
        ``position_ids`` (``0..L-1`` on every row), all ``int64`` of shape ``[B, L]``, and
        ``labels`` of shape ``[B]``.  An empty batch gives shape ``[0, 0]`` (callers skip it).

    """
    size = len(batch_items)
    width = max((len(ids) for ids, _ in batch_items), default=0)
    input_ids = torch.full((size, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((size, width), dtype=torch.long)
    for row, (ids, _) in enumerate(batch_items):
        n = len(ids)
        input_ids[row, :n] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, :n] = 1
    # Materialised, contiguous per sample (repeat, not expand): Opacus' per-sample hooks on the
    # embeddings fail on a stride-0 position_ids buffer broadcast over the batch.
    position_ids = torch.arange(width, dtype=torch.long).repeat(size, 1).contiguous()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros((size, width), dtype=torch.long),
        "position_ids": position_ids,
        "labels": torch.tensor([int(label) for _, label in batch_items], dtype=torch.long),
    }


def length_sorted_microbatches(
    indices: ArrayLike, lengths: ArrayLike, max_size: int
) -> list[NDArray[np.int64]]:
    """Sort a batch's indices by token length and cut them into micro-batches.

    Neighbours in length share a micro-batch, so little padding is wasted.  The number of
    micro-batches is the least that respects ``max_size``, and their sizes differ by at most one.
    The split only changes how the batch is put through the model, not the DP-SGD step.

    Parameters
    ----------
    indices
        Dataset indices of one (e.g. Poisson-sampled) batch; may be empty.
    lengths
        Token length of every dataset example (indexed by dataset index).
    max_size
        Largest micro-batch.

    Returns
    -------
    list of numpy.ndarray
        ``int64`` micro-batches, longest first; together they hold every index of ``indices``
        exactly once.  An empty batch gives an empty list.

    Raises
    ------
    ValueError
        When ``max_size < 1`` or an index is outside ``lengths``.

    """
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        return []
    if idx.min() < 0 or idx.max() >= lens.size:
        raise ValueError(f"batch indices must lie in 0..{lens.size - 1}")
    # Stable sort on the negated length: longest first (an out-of-memory shows at once), ties in
    # the batch's own order, so the result is deterministic.
    ordered = idx[np.argsort(-lens[idx], kind="stable")]
    chunks = math.ceil(idx.size / max_size)
    return [np.ascontiguousarray(c) for c in np.array_split(ordered, chunks)]
