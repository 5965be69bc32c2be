"""Datasets held in memory.

:class:`Examples` are labelled texts for classification: texts, integer labels and per-row natural
keys. :class:`GenerationExamples` are what a causal language model learns from: an optional chat
prompt and the target text the loss is taken on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["Examples", "GenerationExamples", "Turn", "concat_examples", "concat_generation"]


@dataclass(frozen=True, eq=False)
class Examples:
    """Texts with one integer label each, plus optional natural keys per row.

    Instances are treated as read-only: ``labels`` is stored as a read-only copy, so a cached
    dataset cannot be changed by a caller by accident.  ``eq=False`` because element-wise array
    comparison has no single truth value; compare fields explicitly instead.

    Parameters
    ----------
    texts
        One string per example.
    labels
        One label per example, converted to a read-only ``int64`` array.
    keys
        Natural keys per row, e.g. ``{"domain": [...], "document": [...]}``; every list has one
        entry per example. May be empty.

    Raises
    ------
    ValueError
        When the lengths of ``texts``, ``labels`` and the key lists differ, or ``labels`` is not
        one-dimensional.

    """

    texts: list[str]
    labels: NDArray[np.int64]
    keys: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64, copy=True)
        if labels.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
        labels.flags.writeable = False
        # Frozen dataclass: the normalised array has to be set through object.__setattr__.
        object.__setattr__(self, "labels", labels)
        n = len(self.texts)
        if labels.shape[0] != n:
            raise ValueError(f"{n} texts but {labels.shape[0]} labels")
        for name, values in self.keys.items():
            if len(values) != n:
                raise ValueError(f"{n} texts but {len(values)} values of key {name!r}")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: ArrayLike) -> Examples:
        """The examples at ``indices``, in that order.

        Parameters
        ----------
        indices
            Integer positions (a list or an integer array); may repeat or be empty.

        Returns
        -------
        examples : Examples
            A new dataset; the original is unchanged.

        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for {len(self)} examples")
        picked = idx.tolist()
        return Examples(
            texts=[self.texts[i] for i in picked],
            labels=self.labels[idx],
            keys={name: [values[i] for i in picked] for name, values in self.keys.items()},
        )


def concat_examples(parts: Sequence[Examples]) -> Examples:
    """Join datasets end to end.

    Parameters
    ----------
    parts
        The datasets to join; all must carry the same key names.

    Returns
    -------
    examples : Examples
        The rows of ``parts[0]``, then ``parts[1]``, and so on.

    Raises
    ------
    ValueError
        When ``parts`` is empty or the parts carry different key names.

    """
    if not parts:
        raise ValueError("concat_examples needs at least one dataset")
    names = set(parts[0].keys)
    for part in parts[1:]:
        if set(part.keys) != names:
            raise ValueError(
                f"cannot join datasets with different keys: {sorted(names)} vs {sorted(part.keys)}"
            )
    return Examples(
        texts=[t for part in parts for t in part.texts],
        labels=np.concatenate([part.labels for part in parts]).astype(np.int64),
        keys={name: [v for part in parts for v in part.keys[name]] for name in parts[0].keys},
    )


@dataclass(frozen=True)
class Turn:
    """One message of a chat: who speaks and what they say.

    Parameters
    ----------
    role
        ``system``, ``user`` or ``assistant``, the roles every chat template knows.
    content
        The message text.

    """

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True, eq=False)
class GenerationExamples:
    """Examples for a causal language model; the privacy unit is one row.

    Row ``i`` is ``prompts[i]`` (the chat turns before the answer, or ``None`` for plain text)
    followed by ``targets[i]``, the text the loss is taken on: for plain text the whole text, for
    an instruction the completion (the assistant's answer) only.

    Parameters
    ----------
    targets
        One target text per example.
    prompts
        One entry per example: a tuple of turns rendered with the tokenizer's chat template before
        the target, or ``None`` when the example is plain text.
    keys
        Natural keys per row (e.g. ``{"role": [...], "play": [...]}``), as in :class:`Examples`.
    answer_choices
        For instruction data that is a classification in disguise (a sentence in, ``positive`` or
        ``negative`` out): the allowed answers, scored by exact match. ``None`` otherwise.

    Raises
    ------
    ValueError
        When ``targets``, ``prompts`` and the key lists differ in length.

    """

    targets: list[str]
    prompts: list[tuple[Turn, ...] | None]
    keys: dict[str, list[str]] = field(default_factory=dict)
    answer_choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.targets)
        if len(self.prompts) != n:
            raise ValueError(f"{n} targets but {len(self.prompts)} prompts")
        for name, values in self.keys.items():
            if len(values) != n:
                raise ValueError(f"{n} targets but {len(values)} values of key {name!r}")

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, indices: ArrayLike) -> GenerationExamples:
        """The examples at ``indices``, in that order (see :meth:`Examples.subset`)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for {len(self)} examples")
        picked = idx.tolist()
        return GenerationExamples(
            targets=[self.targets[i] for i in picked],
            prompts=[self.prompts[i] for i in picked],
            keys={name: [values[i] for i in picked] for name, values in self.keys.items()},
            answer_choices=self.answer_choices,
        )


def concat_generation(parts: Sequence[GenerationExamples]) -> GenerationExamples:
    """Join generation datasets end to end; they must share key names and answer choices.

    Raises
    ------
    ValueError
        When ``parts`` is empty or the parts differ in key names or answer choices.

    """
    if not parts:
        raise ValueError("concat_generation needs at least one dataset")
    names = set(parts[0].keys)
    for part in parts[1:]:
        if set(part.keys) != names or part.answer_choices != parts[0].answer_choices:
            raise ValueError(
                "cannot join generation datasets with different keys or answer choices"
            )
    return GenerationExamples(
        targets=[t for part in parts for t in part.targets],
        prompts=[p for part in parts for p in part.prompts],
        keys={name: [v for part in parts for v in part.keys[name]] for name in parts[0].keys},
        answer_choices=parts[0].answer_choices,
    )
