"""Tokenization, padding and micro-batching of examples for training and evaluation.

Texts are tokenized once, without padding; each (micro-)batch is padded only to its own longest
row.  With DP-SGD the logical batch is Poisson-sampled and put through the model in micro-batches,
so sorting a batch by length before cutting it into micro-batches saves most of the padding.

Classification examples become :class:`TokenizedExamples` (token ids and one label per row);
generation examples become :class:`TokenizedGeneration` (token ids and one label per *token*:
the token itself where the loss is taken, ``-100`` on the prompt).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch.utils.data import Dataset

from privet.common.data.examples import Examples, GenerationExamples, Turn
from privet.common.errors import ModelError

__all__ = [
    "IGNORE_INDEX",
    "TokenizedExamples",
    "TokenizedGeneration",
    "chat_prompt_ids",
    "collate",
    "collate_generation",
    "length_sorted_microbatches",
]

#: Label of a token that takes no loss (a prompt token, padding); torch's cross-entropy default.
IGNORE_INDEX = -100

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


class TokenizedGeneration(Dataset[tuple[list[int], list[int]]]):
    """Generation examples tokenized once: token ids and per-token labels, not padded.

    Row ``i`` is the chat prompt ``prompts[i]`` rendered with the tokenizer's chat template (with
    the assistant's generation prompt at its end), then ``targets[i]`` and the end-of-sequence
    token. The labels repeat the target's ids (the loss is taken on them) and are
    :data:`IGNORE_INDEX` on the prompt. A plain-text row (``prompts[i] is None``) is the text, as
    the tokenizer encodes it with its special tokens, then the end-of-sequence token; every token
    is a label (the first one only as context: nothing comes before it to predict it).

    Rows longer than ``max_length`` keep their target: the prompt loses tokens from its *start*
    (its end, the generation prompt, is what the answer follows); a target longer than
    ``max_length - 2`` keeps its first ``max_length - 2`` tokens and the end-of-sequence token,
    after the prompt's last token (plain text: its first ``max_length - 1`` tokens and the
    end-of-sequence token).

    Parameters
    ----------
    examples
        The prompts and targets.
    tokenizer
        A Hugging Face tokenizer with an end-of-sequence token, and a chat template when any row
        has a prompt.
    max_length
        Tokens per example, special tokens included.
    targets
        Score these target texts instead of ``examples.targets`` (one per row): the choices of an
        exact-match evaluation are tokenized after the same prompts this way.

    Attributes
    ----------
    input_ids, labels : list of list of int
        Per row: token ids, and the label of each position (``IGNORE_INDEX`` where no loss).
    lengths : numpy.ndarray
        ``int64`` token count per row.

    Raises
    ------
    ModelError
        When a row has a prompt and the tokenizer has no chat template, or the tokenizer has no
        end-of-sequence token.

    """

    def __init__(
        self,
        examples: GenerationExamples,
        tokenizer: Any,
        max_length: int,
        *,
        targets: Sequence[str] | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ModelError(
                "the tokenizer has no end-of-sequence token, which ends every generation target",
                fix="use a causal language model's own tokenizer (model.name)",
            )
        texts = list(examples.targets if targets is None else targets)
        if len(texts) != len(examples):
            raise ValueError(f"{len(examples)} examples but {len(texts)} targets")
        if any(p is not None for p in examples.prompts) and not getattr(
            tokenizer, "chat_template", None
        ):
            raise ModelError(
                "the data has chat prompts, but the tokenizer of model.name has no chat template "
                "to render them with",
                fix="use an instruction-tuned model whose tokenizer has a chat template (e.g. "
                "SmolLM2-135M-Instruct), or plain-text data",
            )
        self.eos, self.max_length = int(eos), max_length
        #: Each row's rendered chat prompt (``None``: plain text), kept to score answer choices.
        self.heads: list[list[int] | None] = [
            None if p is None else chat_prompt_ids(tokenizer, p) for p in examples.prompts
        ]
        self.input_ids: list[list[int]] = []
        self.labels: list[list[int]] = []
        for start in range(0, len(texts), _TOKENIZE_CHUNK):
            chunk = texts[start : start + _TOKENIZE_CHUNK]
            heads = self.heads[start : start + _TOKENIZE_CHUNK]
            plain = tokenizer(chunk, add_special_tokens=True)["input_ids"]
            bare = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            for head, with_special, without in zip(heads, plain, bare, strict=True):
                ids, labels = self.row(head, with_special if head is None else without)
                self.input_ids.append(ids)
                self.labels.append(labels)
        self.lengths: NDArray[np.int64] = np.array(
            [len(row) for row in self.input_ids], dtype=np.int64
        )

    def row(self, head: Sequence[int] | None, body: Sequence[int]) -> tuple[list[int], list[int]]:
        """Token ids and labels of one row: ``head`` (a rendered prompt, or ``None``), ``body``, EOS.

        ``body`` is the target's encoding: with the tokenizer's special tokens for plain text,
        without them after a prompt. Truncated as the class describes.
        """
        ids = [int(t) for t in body]
        if head is None:
            if ids and ids[-1] == self.eos:  # a tokenizer that ends texts itself
                ids.pop()
            ids = [*ids[: self.max_length - 1], self.eos]
            return ids, list(ids)
        target = [*ids[: self.max_length - 2], self.eos]
        keep = list(head)[len(head) - min(len(head), self.max_length - len(target)) :]
        return keep + target, [IGNORE_INDEX] * len(keep) + target

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.input_ids[index], self.labels[index]


def chat_prompt_ids(tokenizer: Any, turns: tuple[Turn, ...]) -> list[int]:
    """The chat template's rendering of ``turns``, ending with the assistant's generation prompt."""
    messages = [{"role": t.role, "content": t.content} for t in turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Rendered to text, then encoded without special tokens: the template writes its own.
    return [int(t) for t in tokenizer(str(text), add_special_tokens=False)["input_ids"]]


def collate_generation(
    batch_items: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Pad a batch of ``(input_ids, labels)`` generation rows on the right to the longest row.

    Returns
    -------
    dict of str to torch.Tensor
        ``input_ids``, ``attention_mask`` (1 on real tokens), ``position_ids`` (``0..L-1``) and
        ``labels`` (:data:`IGNORE_INDEX` on the prompt and the padding), all ``int64`` of shape
        ``[B, L]``, and ``logits_to_keep``: the positions ``start..L-1`` whose next-token logits
        the loss needs (``start`` is one before the batch's first labelled token), which
        transformers' causal LMs take to compute only those logits. Padding on the right leaves
        every real token's causal context as it was.

    """
    size = len(batch_items)
    width = max((len(ids) for ids, _ in batch_items), default=0)
    input_ids = torch.full((size, width), pad_token_id, dtype=torch.long)
    labels = torch.full((size, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((size, width), dtype=torch.long)
    start = max(width - 1, 0)
    for row, (ids, lab) in enumerate(batch_items):
        n = len(ids)
        input_ids[row, :n] = torch.as_tensor(list(ids), dtype=torch.long)
        labels[row, :n] = torch.as_tensor(list(lab), dtype=torch.long)
        attention_mask[row, :n] = 1
        first = next((t for t, v in enumerate(lab) if v != IGNORE_INDEX), None)
        if first is not None:
            start = min(start, max(first - 1, 0))
    # Per-sample rows, not a broadcast view (Opacus's hooks, see collate).
    position_ids = torch.arange(width, dtype=torch.long).repeat(size, 1).contiguous()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
        # An instruction's logits are needed on its completion only: for a short answer after a
        # long prompt this saves most of the [B, L, vocabulary] logits (50k wide for SmolLM2).
        # A tensor, not an int: its length is known here, so nothing waits for the GPU.
        "logits_to_keep": torch.arange(start, width, dtype=torch.long),
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
