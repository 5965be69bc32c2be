"""Load a labelled text table from CSV, JSON lines or Parquet; refuse bad data in one clear line.

Every problem a user's file can have is reported as a :class:`~privet.common.errors.DataError` that
names the file, the column and the fix; a pandas or pyarrow traceback never reaches the user.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from privet.common.data.examples import Examples
from privet.common.errors import DataError

__all__ = ["MAX_LABELS", "SUPPORTED_SUFFIXES", "LabelledRows", "load_table", "load_tables"]

SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
# Same bound as DataConfig.num_labels: an inferred label count must be a valid config value.
MAX_LABELS = 100_000
_SHOWN = 5  # offending rows listed in a message


def _rows(positions: NDArray[np.intp] | list[int]) -> str:
    shown = [int(p) for p in list(positions)[:_SHOWN]]
    more = len(positions) - len(shown)
    return f"{shown}" + (f" and {more} more" if more > 0 else "")


def _read(path: Path, suffix: str, text_column: str) -> pd.DataFrame:
    if suffix == ".csv":
        # keep_default_na=False: a review that reads "NA" or "null" is text, not a missing value;
        # only a truly empty cell counts as missing.  The text column stays a string even when it
        # looks numeric ("42").
        return pd.read_csv(
            path, keep_default_na=False, na_values=[""], dtype={text_column: "string"}
        )
    if suffix == ".parquet":
        return pd.read_parquet(path)
    # .jsonl and .json hold JSON lines; a .json file that is one JSON array is read as records.
    # dtype=False: pandas must not turn "1" into 1, because a string label is an error here.
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip()
    if suffix == ".json" and head.startswith(b"["):
        return pd.read_json(path, orient="records", dtype=False, convert_dates=False)
    return pd.read_json(path, lines=True, dtype=False, convert_dates=False)


def _integers(series: pd.Series[Any], where: str) -> NDArray[np.int64] | None:
    """The labels as integers, or None when the column holds names (strings only)."""
    dtype = series.dtype
    not_integer = (
        f"{where} must hold integer labels (integer-valued numbers such as 0, 1, 2) or class "
        "names (strings such as 'spam', 'ham'), not both"
    )
    if pd.api.types.is_bool_dtype(dtype):
        raise DataError(
            f"{where} must hold integer labels or class names, not booleans.",
            fix="write the labels as 0 and 1 (or as names)",
        )
    if pd.api.types.is_integer_dtype(dtype):
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(dtype):
        floats = series.to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(floats) | (floats != np.round(floats)))
        if bad.size:
            raise DataError(
                f"{where} must hold integer labels or class names; rows {_rows(bad)} hold "
                f"fractions (e.g. {float(floats[bad[0]])!r}).",
                fix="round or map the labels to integers 0..num_labels-1, or write class names",
            )
        if np.abs(floats).max(initial=0.0) > 2**62:
            raise DataError(f"{where} holds labels too large to be class indices.")
        return floats.astype(np.int64)
    values = series.tolist()
    if all(isinstance(v, str) for v in values):
        return None  # class names, mapped to indices by the caller
    # Object columns: real integers only, row by row, so that the message points at a value.
    out = np.empty(len(values), dtype=np.int64)
    for pos, value in enumerate(values):
        is_int = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
        is_whole_float = isinstance(value, float | np.floating) and float(value).is_integer()
        if not (is_int or is_whole_float) or abs(value) > 2**62:
            kind = "a string" if isinstance(value, str) else type(value).__name__
            raise DataError(
                f"{not_integer}; row {pos} holds {value!r} ({kind}).",
                fix="write every label as a number 0..num_labels-1, or every label as a name",
            )
        out[pos] = int(value)
    return out


def _check_range(values: NDArray[np.int64], where: str, num_labels: int | None) -> None:
    negative = np.flatnonzero(values < 0)
    if negative.size:
        raise DataError(
            f"{where} has negative labels in rows {_rows(negative)} (e.g. {values[negative[0]]}).",
            fix="labels are class indices 0..num_labels-1 (or class names)",
        )
    if num_labels is not None:
        too_big = np.flatnonzero(values >= num_labels)
        if too_big.size:
            raise DataError(
                f"{where} has labels >= num_labels = {num_labels} in rows {_rows(too_big)} "
                f"(e.g. {values[too_big[0]]}).",
                fix=f"labels must lie in 0..{num_labels - 1}, or raise data.num_labels",
            )
    elif values.size and values.max() >= MAX_LABELS:
        raise DataError(
            f"{where} has label {values.max()}, more classes than the {MAX_LABELS} supported.",
            fix="labels are class indices 0..num_labels-1; map them to a dense range",
        )


@dataclass
class _Raw:
    """One file read and checked, its labels not yet mapped to class indices."""

    path: Path
    texts: list[str]
    integers: NDArray[np.int64] | None  # None: the labels are names
    names: list[str]
    keys: dict[str, list[str]]
    where: str


def _map_labels(
    raws: Sequence[_Raw], *, num_labels: int | None, label_names: Sequence[str] | None
) -> tuple[list[Examples], tuple[str, ...] | None]:
    """Class indices for every file, with one mapping for all of them.

    Integer labels are kept as they are; names map to their position in ``label_names`` when it
    is given, else to their position among the sorted distinct names of all files (the same
    files always give the same mapping).
    """
    named = [r for r in raws if r.integers is None]
    numbered = [r for r in raws if r.integers is not None]
    if named and numbered:
        raise DataError(
            f"{named[0].path} labels its rows with names but {numbered[0].path} with numbers.",
            fix="use one kind of label in every file",
        )
    bound = len(label_names) if label_names is not None else num_labels
    if not named:
        out = []
        for raw in raws:
            assert raw.integers is not None
            _check_range(raw.integers, raw.where, bound)
            out.append(Examples(texts=raw.texts, labels=raw.integers, keys=raw.keys))
        return out, tuple(label_names) if label_names is not None else None
    if label_names is None:
        names = tuple(sorted({n for raw in raws for n in raw.names}))
    else:
        names = tuple(label_names)
    if num_labels is not None and len(names) > num_labels:
        raise DataError(
            f"the data names {len(names)} classes ({_names(names)}) but data.num_labels = "
            f"{num_labels}.",
            fix=f"set data.num_labels = {len(names)} or leave it out",
        )
    index = {name: i for i, name in enumerate(names)}
    out = []
    for raw in raws:
        unknown = [i for i, n in enumerate(raw.names) if n not in index]
        if unknown:
            raise DataError(
                f"{raw.where} has labels not in data.label_names in rows {_rows(unknown)} "
                f"(e.g. {raw.names[unknown[0]]!r}); the names are {_names(names)}.",
                fix="add the name to data.label_names or correct the row",
            )
        labels = np.array([index[n] for n in raw.names], dtype=np.int64)
        out.append(Examples(texts=raw.texts, labels=labels, keys=raw.keys))
    return out, names


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _label_values(series: pd.Series[Any], where: str) -> tuple[NDArray[np.int64] | None, list[str]]:
    """One column's labels: integers (``names`` empty), or class names (``integers`` None)."""
    missing = np.flatnonzero(series.isna().to_numpy())
    if missing.size:
        raise DataError(
            f"{where} has missing labels in rows {_rows(missing)} (counting from 0).",
            fix="give every row a label",
        )
    integers = _integers(series, where)
    names: list[str] = []
    if integers is None:
        names = [str(n) for n in series.tolist()]
        blank = [i for i, n in enumerate(names) if not n.strip()]
        if blank:
            raise DataError(
                f"{where} has empty label names in rows {_rows(blank)} (counting from 0).",
                fix="give every row a label",
            )
        names = [n.strip() for n in names]
    return integers, names


@dataclass(frozen=True, eq=False)
class LabelledRows:
    """Texts with their labels as a user has them: class indices, or class names not yet mapped.

    A deployed site holds its data like this until the federation's class names arrive with the
    run (``data.label_names``); :meth:`examples` then maps the names by the rules files follow
    (the given names' order, else the sorted distinct names), so rows and files agree.

    Parameters
    ----------
    texts
        One string per row.
    integers
        The labels when they are class indices (``None``: they are names).
    names
        The labels when they are class names (empty: they are integers).
    where
        What the rows are, for messages (e.g. ``"the rows' 'label' field"``).

    """

    texts: list[str]
    integers: NDArray[np.int64] | None
    names: list[str]
    where: str

    @classmethod
    def from_labels(cls, texts: list[str], labels: Sequence[Any], *, where: str) -> LabelledRows:
        """Rows from a list of labels (integers or names, not both; checked as a file's column)."""
        integers, names = _label_values(pd.Series(list(labels)), where)
        return cls(texts=texts, integers=integers, names=names, where=where)

    @classmethod
    def read(cls, path: Path, *, text_column: str, label_column: str) -> LabelledRows:
        """The rows of a CSV, JSON lines or Parquet file (see :func:`load_table`), labels unmapped."""
        raw = _read_checked(
            path, text_column=text_column, label_column=label_column, client_column=None
        )
        return cls(texts=raw.texts, integers=raw.integers, names=raw.names, where=raw.where)

    def __len__(self) -> int:
        return len(self.texts)

    def examples(
        self, *, num_labels: int | None = None, label_names: Sequence[str] | None = None
    ) -> Examples:
        """The rows with class indices: names map to their place in ``label_names``, else sorted.

        Raises
        ------
        DataError
            For a name not in ``label_names`` (one line naming the rows and the known names),
            more names than ``num_labels``, or an integer label outside the classes.

        """
        raw = _Raw(
            path=Path(self.where),
            texts=self.texts,
            integers=self.integers,
            names=self.names,
            keys={},
            where=self.where,
        )
        (examples,), _ = _map_labels([raw], num_labels=num_labels, label_names=label_names)
        return examples


def _read_checked(
    path: Path, *, text_column: str, label_column: str, client_column: str | None
) -> _Raw:
    """Read one file and check everything but the label mapping."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"data file {path} does not exist.", fix="check data.train_files / data.test_file"
        )
    if not path.is_file():
        raise DataError(f"data file {path} is not a file.", fix="name a CSV, JSONL or Parquet file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"data file {path} has the unknown extension {path.suffix!r}.",
            fix=f"use one of {', '.join(SUPPORTED_SUFFIXES)} (.json/.jsonl hold JSON lines)",
        )
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty.", fix="write a header and at least one row")
    kind = suffix[1:].upper()
    try:
        frame = _read(path, suffix, text_column)
    except UnicodeDecodeError as exc:
        # The usual cause: a spreadsheet saved as Latin-1 / Windows-1252.
        raise DataError(
            f"data file {path} is not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} "
            f"at offset {exc.start}).",
            fix="save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet, or iconv -f latin1 -t utf-8)",
        ) from None
    except Exception as exc:
        # pandas, pyarrow and the json parser raise a zoo of exception types; to the user they
        # all mean "this file cannot be read", so each becomes one DataError line.
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        if isinstance(exc.__cause__ or exc.__context__, UnicodeDecodeError):
            raise DataError(
                f"data file {path} is not UTF-8 text.", fix="save it as UTF-8"
            ) from None
        raise DataError(
            f"cannot read data file {path} as {kind}: {type(exc).__name__}: {detail}.",
            fix=f"check that the file is valid {kind} (and not truncated)",
        ) from None
    if len(frame) == 0:
        raise DataError(f"data file {path} has no rows.", fix="add at least one example")

    columns = [str(c) for c in frame.columns]
    wanted = [text_column, label_column] + ([client_column] if client_column else [])
    for column in wanted:
        if column not in frame.columns:
            raise DataError(
                f"data file {path} has no column {column!r}; its columns are {columns}.",
                fix="set data.text_column / data.label_column / data.client_column to one of them",
            )

    text_series = frame[text_column]
    missing = np.flatnonzero(text_series.isna().to_numpy())
    if missing.size:
        raise DataError(
            f"{path}: column {text_column!r} has missing texts in rows {_rows(missing)} "
            "(counting from 0).",
            fix="drop those rows or fill in their text",
        )
    raw_texts = text_series.tolist()
    not_str = [i for i, t in enumerate(raw_texts) if not isinstance(t, str)]
    if not_str:
        raise DataError(
            f"{path}: column {text_column!r} must hold strings; rows {_rows(not_str)} hold "
            f"{type(raw_texts[not_str[0]]).__name__} values.",
            fix="store the texts as strings",
        )
    texts: list[str] = raw_texts
    blank = [i for i, t in enumerate(texts) if not t.strip()]
    if blank:
        raise DataError(
            f"{path}: column {text_column!r} has empty texts in rows {_rows(blank)} "
            "(counting from 0).",
            fix="drop those rows or fill in their text",
        )

    where = f"{path}: column {label_column!r}"
    integers, names = _label_values(frame[label_column], where)

    keys: dict[str, list[str]] = {}
    if client_column:
        clients = frame[client_column]
        missing = np.flatnonzero(clients.isna().to_numpy())
        if missing.size:
            raise DataError(
                f"{path}: column {client_column!r} has no client in rows {_rows(missing)} "
                "(counting from 0).",
                fix="name a client in every row",
            )
        keys["client"] = [str(c) for c in clients.tolist()]
    return _Raw(path=path, texts=texts, integers=integers, names=names, keys=keys, where=where)


def load_tables(
    paths: Sequence[Path],
    *,
    text_column: str,
    label_column: str,
    client_columns: Sequence[str | None] | None = None,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
) -> tuple[list[Examples], tuple[str, ...] | None]:
    """Load several files whose labels share one mapping to class indices.

    Parameters
    ----------
    paths
        CSV, JSON lines or Parquet files (see :func:`load_table`).
    text_column, label_column
        Columns holding the texts and the labels.
    client_columns
        Per file, the column naming each row's client, or None (default: none for any file).
    num_labels
        When given, integer labels must be below it and names may not be more.
    label_names
        The class names in label order.  Names in the files map to their position here (a name
        not listed is an error); integer labels must be below its length.  Default for names:
        the sorted distinct names of all files.

    Returns
    -------
    tuple
        The examples of each file, in order, and the class names (None for integer labels
        without ``label_names``).

    Raises
    ------
    DataError
        When a file is missing, unreadable, empty, lacks a column, holds empty texts or invalid
        labels, or when files mix names and numbers.

    """
    columns = list(client_columns) if client_columns is not None else [None] * len(paths)
    raws = [
        _read_checked(
            path, text_column=text_column, label_column=label_column, client_column=column
        )
        for path, column in zip(paths, columns, strict=True)
    ]
    return _map_labels(raws, num_labels=num_labels, label_names=label_names)


def load_table(
    path: Path,
    *,
    text_column: str,
    label_column: str,
    client_column: str | None = None,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
) -> Examples:
    """Load texts and labels from a CSV, JSON lines or Parquet file.

    Parameters
    ----------
    path
        A ``.csv``, ``.jsonl``/``.json`` (JSON lines; a ``.json`` holding one array of records is
        accepted too) or ``.parquet`` file, in UTF-8.
    text_column
        Column holding the texts; every row needs a non-empty string.
    label_column
        Column holding the labels: integer-valued numbers in ``0..num_labels-1``, or class names
        (strings).  Booleans, fractions and a mix of names and numbers are refused.
    client_column
        Optional column naming each row's client (for the natural partition); stored as the key
        ``"client"``.
    num_labels
        When given, labels must be below it.
    label_names
        The class names in label order (see :func:`load_tables`); without it, names map to
        their position among this file's sorted names, so files loaded one by one should give
        it.

    Returns
    -------
    examples : Examples
        Rows in file order; keys ``{"client": [...]}`` when ``client_column`` is given, else none.

    Raises
    ------
    DataError
        When the file is missing, of an unknown type, unreadable, empty, lacks a column, or holds
        empty texts or invalid labels.

    """
    parts, _ = load_tables(
        [path],
        text_column=text_column,
        label_column=label_column,
        client_columns=[client_column],
        num_labels=num_labels,
        label_names=label_names,
    )
    return parts[0]
