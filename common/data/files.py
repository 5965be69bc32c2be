"""Load a labelled text table from CSV, JSON lines or Parquet; refuse bad data in one clear line.

Every problem a user's file can have is reported as a :class:`~privet.common.errors.DataError` that
names the file, the column and the fix; a pandas or pyarrow traceback never reaches the user.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from privet.common.data.examples import Examples
from privet.common.errors import DataError

__all__ = ["MAX_LABELS", "SUPPORTED_SUFFIXES", "load_table"]

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


def _labels(
    series: pd.Series[Any], path: Path, column: str, num_labels: int | None
) -> NDArray[np.int64]:
    where = f"{path}: column {column!r}"
    missing = np.flatnonzero(series.isna().to_numpy())
    if missing.size:
        raise DataError(
            f"{where} has missing labels in rows {_rows(missing)} (counting from 0)",
            fix="give every row an integer label",
        )
    dtype = series.dtype
    not_integer = (
        f"{where} must hold integer labels (integer-valued numbers such as 0, 1, 2; not strings "
        "or booleans)"
    )
    if pd.api.types.is_bool_dtype(dtype):
        raise DataError(f"{not_integer}, got booleans", fix="write the labels as 0 and 1")
    if pd.api.types.is_integer_dtype(dtype):
        values = series.to_numpy(dtype=np.int64)
    elif pd.api.types.is_float_dtype(dtype):
        floats = series.to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(floats) | (floats != np.round(floats)))
        if bad.size:
            raise DataError(
                f"{not_integer}; rows {_rows(bad)} hold other values "
                f"(e.g. {float(floats[bad[0]])!r})",
                fix="round or map the labels to integers 0..num_labels-1",
            )
        if np.abs(floats).max(initial=0.0) > 2**62:
            raise DataError(f"{where} holds labels too large to be class indices")
        values = floats.astype(np.int64)
    else:
        # Object or string columns: accept real integers only, row by row, so that the message
        # can point at the first offending value.
        out = np.empty(len(series), dtype=np.int64)
        for pos, value in enumerate(series.tolist()):
            is_int = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
            is_whole_float = isinstance(value, float | np.floating) and float(value).is_integer()
            if not (is_int or is_whole_float) or abs(value) > 2**62:
                kind = "a string" if isinstance(value, str) else type(value).__name__
                raise DataError(
                    f"{not_integer}; row {pos} holds {value!r} ({kind})",
                    fix='store the labels as numbers 0..num_labels-1 (e.g. 1, not "1" or "pos")',
                )
            out[pos] = int(value)
        values = out
    negative = np.flatnonzero(values < 0)
    if negative.size:
        raise DataError(
            f"{where} has negative labels in rows {_rows(negative)} (e.g. {values[negative[0]]})",
            fix="labels are class indices 0..num_labels-1",
        )
    if num_labels is not None:
        too_big = np.flatnonzero(values >= num_labels)
        if too_big.size:
            raise DataError(
                f"{where} has labels >= num_labels = {num_labels} in rows {_rows(too_big)} "
                f"(e.g. {values[too_big[0]]})",
                fix=f"labels must lie in 0..{num_labels - 1}, or raise data.num_labels",
            )
    elif values.size and values.max() >= MAX_LABELS:
        raise DataError(
            f"{where} has label {values.max()}, more classes than the {MAX_LABELS} supported",
            fix="labels are class indices 0..num_labels-1; map them to a dense range",
        )
    return values


def load_table(
    path: Path,
    *,
    text_column: str,
    label_column: str,
    client_column: str | None = None,
    num_labels: int | None = None,
) -> Examples:
    """Load texts and integer labels from a CSV, JSON lines or Parquet file.

    Parameters
    ----------
    path
        A ``.csv``, ``.jsonl``/``.json`` (JSON lines; a ``.json`` holding one array of records is
        accepted too) or ``.parquet`` file.
    text_column
        Column holding the texts; every row needs a non-empty string.
    label_column
        Column holding the labels: integer-valued numbers in ``0..num_labels-1``.  Strings
        (``"1"``), booleans and fractions are refused.
    client_column
        Optional column naming each row's client (for the natural partition); stored as the key
        ``"client"``.
    num_labels
        When given, labels must be below it.

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
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"data file {path} does not exist", fix="check data.train_files / data.test_file"
        )
    if not path.is_file():
        raise DataError(f"data file {path} is not a file", fix="name a CSV, JSONL or Parquet file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"data file {path} has the unknown extension {path.suffix!r}",
            fix=f"use one of {', '.join(SUPPORTED_SUFFIXES)} (.json/.jsonl hold JSON lines)",
        )
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty", fix="write a header and at least one row")
    try:
        frame = _read(path, suffix, text_column)
    except Exception as exc:
        # pandas, pyarrow and the json parser raise a zoo of exception types; to the user they
        # all mean "this file cannot be read", so each becomes one DataError line.
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise DataError(
            f"cannot read data file {path} as {suffix[1:].upper()}: {type(exc).__name__}: {detail}",
            fix=f"check that the file is valid {suffix[1:].upper()} (and not truncated)",
        ) from None
    if len(frame) == 0:
        raise DataError(f"data file {path} has no rows", fix="add at least one example")

    columns = [str(c) for c in frame.columns]
    wanted = [text_column, label_column] + ([client_column] if client_column else [])
    for column in wanted:
        if column not in frame.columns:
            raise DataError(
                f"data file {path} has no column {column!r}; its columns are {columns}",
                fix="set data.text_column / data.label_column / data.client_column to one of them",
            )

    text_series = frame[text_column]
    missing = np.flatnonzero(text_series.isna().to_numpy())
    if missing.size:
        raise DataError(
            f"{path}: column {text_column!r} has missing texts in rows {_rows(missing)} "
            "(counting from 0)",
            fix="drop those rows or fill in their text",
        )
    raw_texts = text_series.tolist()
    not_str = [i for i, t in enumerate(raw_texts) if not isinstance(t, str)]
    if not_str:
        raise DataError(
            f"{path}: column {text_column!r} must hold strings; rows {_rows(not_str)} hold "
            f"{type(raw_texts[not_str[0]]).__name__} values",
            fix="store the texts as strings",
        )
    texts: list[str] = raw_texts
    blank = [i for i, t in enumerate(texts) if not t.strip()]
    if blank:
        raise DataError(
            f"{path}: column {text_column!r} has empty texts in rows {_rows(blank)} "
            "(counting from 0)",
            fix="drop those rows or fill in their text",
        )

    labels = _labels(frame[label_column], path, label_column, num_labels)

    keys: dict[str, list[str]] = {}
    if client_column:
        clients = frame[client_column]
        missing = np.flatnonzero(clients.isna().to_numpy())
        if missing.size:
            raise DataError(
                f"{path}: column {client_column!r} has no client in rows {_rows(missing)} "
                "(counting from 0)",
                fix="name a client in every row",
            )
        keys["client"] = [str(c) for c in clients.tolist()]
    return Examples(texts=texts, labels=labels, keys=keys)
