from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from privet.common.data import Examples, load_table, load_tables
from privet.common.errors import DataError


def load(path: Path, client_column: str | None = None, num_labels: int | None = None) -> Examples:
    return load_table(
        path,
        text_column="text",
        label_column="label",
        client_column=client_column,
        num_labels=num_labels,
    )


def write(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


# --- good files --------------------------------------------------------------------------------


def test_csv_ok(tmp_path: Path) -> None:
    f = write(tmp_path / "d.csv", "text,label,user\nhello,1,u1\nNA,0,u2\n42,2.0,3\n")
    ex = load_table(f, text_column="text", label_column="label", client_column="user", num_labels=3)
    # "NA" is a text, not a missing value; "42" stays a string; 2.0 is an integer-valued label.
    assert ex.texts == ["hello", "NA", "42"]
    assert ex.labels.tolist() == [1, 0, 2]
    assert ex.labels.dtype == np.int64
    assert ex.keys == {"client": ["u1", "u2", "3"]}


def test_jsonl_and_json_ok(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    lines = "\n".join(json.dumps(r) for r in rows) + "\n"
    for name in ("d.jsonl", "d.json"):
        ex = load(write(tmp_path / name, lines))
        assert ex.texts == ["a", "b"] and ex.labels.tolist() == [0, 1]
    # A .json file holding one array of records is accepted too.
    ex = load(write(tmp_path / "arr.json", json.dumps(rows)))
    assert ex.labels.tolist() == [0, 1]


def test_parquet_ok(tmp_path: Path) -> None:
    f = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["x", "y"], "label": np.array([1, 0], dtype=np.int32)}).to_parquet(f)
    ex = load(f)
    assert ex.texts == ["x", "y"] and ex.labels.tolist() == [1, 0]
    assert ex.keys == {}


# --- every DataError ---------------------------------------------------------------------------


def expect(
    path: Path, *patterns: str, client_column: str | None = None, num_labels: int | None = None
) -> str:
    with pytest.raises(DataError) as info:
        load(path, client_column=client_column, num_labels=num_labels)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, message
    assert "Traceback" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    expect(tmp_path / "nope.csv", "nope.csv", "does not exist", "Fix:")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.csv").mkdir()
    expect(tmp_path / "dir.csv", "is not a file")


def test_unknown_extension(tmp_path: Path) -> None:
    expect(write(tmp_path / "d.xlsx", "x"), "d.xlsx", "unknown extension '.xlsx'", ".parquet")


def test_empty_file(tmp_path: Path) -> None:
    expect(write(tmp_path / "d.csv", ""), "d.csv", "is empty")


def test_header_only(tmp_path: Path) -> None:
    expect(write(tmp_path / "d.csv", "text,label\n"), "has no rows")


def test_corrupt_parquet(tmp_path: Path) -> None:
    f = tmp_path / "d.parquet"
    f.write_bytes(b"PAR1 this is not parquet at all")
    expect(f, "cannot read data file", "d.parquet", "PARQUET")


def test_corrupt_jsonl(tmp_path: Path) -> None:
    expect(write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n{"text": \n'), "cannot read")


def test_corrupt_csv(tmp_path: Path) -> None:
    # A quote that never closes: the CSV parser gives up.
    expect(write(tmp_path / "d.csv", 'text,label\n"abc,1\n'), "cannot read", "CSV")


def test_missing_column_lists_columns(tmp_path: Path) -> None:
    f = write(tmp_path / "d.csv", "sentence,label\nhi,1\n")
    expect(f, "no column 'text'", "['sentence', 'label']", "data.text_column")
    f = write(tmp_path / "e.csv", "text,label\nhi,1\n")
    expect(f, "no column 'user'", client_column="user")


def test_empty_and_nan_texts(tmp_path: Path) -> None:
    expect(write(tmp_path / "a.csv", "text,label\nhi,1\n,0\n"), "missing texts in rows [1]")
    expect(write(tmp_path / "b.csv", "text,label\nhi,1\n   ,0\n"), "empty texts in rows [1]")
    expect(
        write(tmp_path / "c.jsonl", '{"text": null, "label": 1}\n{"text": "x", "label": 0}\n'),
        "missing texts in rows [0]",
    )
    expect(write(tmp_path / "d.jsonl", '{"text": 5, "label": 1}\n'), "must hold strings", "int")


def test_labels_not_integers(tmp_path: Path) -> None:
    expect(write(tmp_path / "b.csv", "text,label\nhi,0.5\nyo,1\n"), "integer labels", "0.5")
    expect(
        write(tmp_path / "c.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": 1}\n'),
        "integer labels",
        "row 0 holds 'pos' (a string)",
    )
    expect(write(tmp_path / "d.jsonl", '{"text": "a", "label": true}\n'), "integer labels", "bool")
    expect(write(tmp_path / "e.csv", "text,label\nhi,1\nyo,\n"), "missing labels in rows [1]")
    expect(
        write(tmp_path / "f.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1.5}\n'),
        "integer labels",
        "1.5",
    )


def test_label_names_sorted_or_given(tmp_path: Path) -> None:
    f = write(tmp_path / "a.csv", "text,label\nbuy now,spam\nhello,ham\nwin,spam\n")
    # Default: sorted distinct names, so 'ham' = 0 and 'spam' = 1 whatever the row order.
    assert load(f).labels.tolist() == [1, 0, 1]
    given = load_table(f, text_column="text", label_column="label", label_names=["spam", "ham"])
    assert given.labels.tolist() == [0, 1, 0]
    with pytest.raises(DataError, match=r"not in data.label_names in rows \[1\].*'ham'"):
        load_table(f, text_column="text", label_column="label", label_names=["spam", "eggs"])


def test_label_names_shared_across_files(tmp_path: Path) -> None:
    a = write(tmp_path / "a.csv", "text,label\nx,spam\n")
    b = write(tmp_path / "b.csv", "text,label\ny,ham\nz,eggs\n")
    parts, names = load_tables([a, b], text_column="text", label_column="label")
    assert names == ("eggs", "ham", "spam")
    assert [p.labels.tolist() for p in parts] == [[2], [1, 0]]
    c = write(tmp_path / "c.csv", "text,label\nz,1\n")
    with pytest.raises(DataError, match="names but .*c.csv with numbers"):
        load_tables([a, c], text_column="text", label_column="label")


def test_latin1_file_says_save_as_utf8(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_bytes("text,label\ncaf\u00e9 cr\u00e8me,1\nok,0\n".encode("latin-1"))
    message = expect(f, "is not UTF-8", "save it as UTF-8")
    assert message.count("\n") == 0


def test_labels_out_of_range(tmp_path: Path) -> None:
    expect(write(tmp_path / "a.csv", "text,label\nhi,-1\n"), "negative labels", "rows [0]")
    f = write(tmp_path / "b.csv", "text,label\nhi,0\nyo,2\n")
    expect(f, "labels >= num_labels = 2", "rows [1]", "0..1", num_labels=2)
    expect(write(tmp_path / "c.csv", "text,label\nhi,100000\n"), "more classes")


def test_missing_client(tmp_path: Path) -> None:
    f = write(tmp_path / "a.csv", "text,label,user\nhi,1,\nyo,0,u\n")
    expect(f, "no client in rows [0]", client_column="user")


def test_many_bad_rows_are_summarised(tmp_path: Path) -> None:
    body = "".join(f"t{i},-1\n" for i in range(9))
    message = expect(write(tmp_path / "a.csv", "text,label\n" + body), "negative labels")
    assert "[0, 1, 2, 3, 4] and 4 more" in message
