"""A labelled text dataset held in memory: texts, integer labels and per-row natural keys."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["Examples", "concat_examples"]


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
