"""A battery of bad inputs a new user meets: each gets one clear line naming the field or file and
the fix, exit status 2, and no traceback.

The ``privet`` command runs in this process (its ``main``, the console entry point, so the error
formatting is the user's), mostly through ``privet plan``: it reads the configuration and the data
exactly as ``simulate`` does and stops before any training.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from privet.simulations.cli import main

GOOD_ROWS = "".join(f"text number {i},{i % 2}\n" for i in range(40))


def privet(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``privet ARGS`` in this process; return (exit status, stdout, stderr)."""
    argv = sys.argv
    sys.argv = ["privet", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, *needles: str) -> str:
    """The single line ``err`` holds; it contains every needle and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert "Traceback" not in err and 'File "' not in err, err
    for needle in needles:
        assert needle in line, line
    return line


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def files_config(tmp_path: Path, *files: Path, extra: str = "") -> Path:
    listed = ", ".join(f'"{f}"' for f in files)
    return write(
        tmp_path / "f.toml",
        f'[data]\nsource = "files"\ntrain_files = [{listed}]\n{extra}\n'
        f'[simulation]\noutput_dir = "{tmp_path / "runs"}"\n'
        "[model]\nnum_hidden_layers = 1\n",
    )


def refused(capsys: pytest.CaptureFixture[str], *args: str, needles: tuple[str, ...]) -> str:
    code, _, err = privet(capsys, *args)
    assert code == 2, err
    return one_line(err, *needles)


# --- configuration ------------------------------------------------------------------------------

CONFIG_CASES: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("unknown field", ["--set", "train.lrr=0.1"], ("train.lrr", "unknown field", "spelling")),
    ("wrong type", ["--set", 'train.lr="fast"'], ("train.lr", "'fast'")),
    ("out of range", ["--set", "train.lr=-1"], ("train.lr", "greater than 0")),
    ("unknown section", ["--set", "trian.lr=0.1"], ("trian", "unknown field")),
    ("bad partition", ["--set", 'data.partition="random"'], ("data.partition", "'by_file'")),
    ("zero rounds", ["--set", "federation.rounds=0"], ("federation.rounds", "greater than")),
    ("zero clients", ["--set", "data.num_clients=0"], ("data.num_clients",)),
    (
        "no epsilon nor noise",
        ["--set", "privacy.target_epsilon=none"],
        ("give target_epsilon or noise_multiplier",),
    ),
    (
        "epsilon and noise",
        ["--set", "privacy.noise_multiplier=1.0"],
        ("not both", "target_epsilon = none"),
    ),
    (
        "zero noise",
        ["--set", "privacy.target_epsilon=none", "--set", "privacy.noise_multiplier=0"],
        ("privacy.noise_multiplier = 0", "privacy.enabled = false"),
    ),
    ("files without files", ["--set", 'data.source="files"'], ("data.train_files", "at least one")),
    (
        "natural without column",
        [
            "--set",
            'data.source="files"',
            "--set",
            'data.train_files=["a.csv"]',
            "--set",
            'data.partition="natural"',
        ],
        ("data.client_column", "natural"),
    ),
    ("by_file on vader", ["--set", 'data.partition="by_file"'], ("by_file", "data.source")),
    (
        "duplicate label names",
        ["--set", 'data.label_names=["spam", "spam"]'],
        ("data.label_names", "'spam' twice"),
    ),
    (
        "label names vs num_labels",
        ["--set", 'data.label_names=["a", "b"]', "--set", "data.num_labels=3"],
        ("data.num_labels = 3", "2 classes"),
    ),
    (
        "file listed twice",
        ["--set", 'data.source="files"', "--set", 'data.train_files=["a.csv", "a.csv"]'],
        ("data.train_files", "'a.csv' twice"),
    ),
    (
        "causal lm on classification data",
        ["--set", 'model.task="causal_lm"'],
        ("model.task = 'causal_lm'", "generation data source", "data.source = 'vader'"),
    ),
    (
        "causal lm with full fine-tuning",
        [
            "--set",
            'model.task="causal_lm"',
            "--set",
            'data.source="files"',
            "--set",
            'data.train_files=["chats.jsonl"]',
            "--set",
            'adapter.method="full"',
        ],
        ("model.task = 'causal_lm'", "adapter.method = 'lora'"),
    ),
    ("unknown task", ["--set", 'model.task="translation"'], ("model.task", "'causal_lm'")),
    ("override without =", ["--set", "train.lr"], ("train.lr",)),
    ("missing config file", ["--config", "no-such.toml"], ("no-such.toml",)),
]


@pytest.mark.parametrize(
    ("args", "needles"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_bad_config(
    capsys: pytest.CaptureFixture[str], args: list[str], needles: tuple[str, ...]
) -> None:
    line = refused(capsys, "plan", *args, needles=needles)
    # A model-level check names its field once: never "privacy: privacy: ..." or "data: data. ...".
    head = line.removeprefix("error: ").split(" ", 1)[0].rstrip(":")
    assert not line.removeprefix("error: ").startswith(f"{head}: {head}"), line


def test_bad_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path / "bad.toml", "[train\nlr = 0.1\n")
    refused(capsys, "plan", "--config", str(cfg), needles=("bad.toml", "not valid TOML"))


# --- the output folder --------------------------------------------------------------------------


def test_output_dir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = write(tmp_path / "runs", "not a folder")
    args = ["--set", f'simulation.output_dir="{target}"']
    needles = ("simulation.output_dir", "is a file", "Fix:", "a folder you can write")
    refused(capsys, "plan", *args, needles=needles)
    refused(capsys, "simulate", *args, "--set", 'simulation.engine="inprocess"', needles=needles)


def test_output_dir_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = write(tmp_path / "file", "x") / "runs"
    refused(
        capsys,
        "plan",
        "--set",
        f'simulation.output_dir="{target}"',
        needles=("simulation.output_dir", "which is a file", "Fix:"),
    )


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_output_dir_not_writable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        refused(
            capsys,
            "simulate",
            "--set",
            f'simulation.output_dir="{locked / "runs"}"',
            "--set",
            'simulation.engine="inprocess"',
            needles=("simulation.output_dir", "may not write", "Fix:"),
        )
    finally:
        locked.chmod(0o700)


# --- data files ---------------------------------------------------------------------------------

DataCase = tuple[str, Callable[[Path], list[Path]], str, tuple[str, ...]]


def _csv(name: str, text: str) -> Callable[[Path], list[Path]]:
    return lambda d: [write(d / name, text)]


def _latin1(d: Path) -> list[Path]:
    path = d / "latin.csv"
    path.write_bytes(("text,label\n" + "caf\u00e9 cr\u00e8me,1\nok,0\n" * 20).encode("latin-1"))
    return [path]


DATA_CASES: list[DataCase] = [
    ("missing file", lambda d: [d / "nope.csv"], "", ("nope.csv", "does not exist.", "Fix:")),
    ("folder", lambda d: [d], "", ("is not a file", "Fix:")),
    ("unknown extension", _csv("a.txt", GOOD_ROWS), "", ("a.txt", "'.txt'", "Fix: use one of")),
    ("empty file", _csv("a.csv", ""), "", ("a.csv", "is empty", "Fix:")),
    ("header only", _csv("a.csv", "text,label\n"), "", ("a.csv", "no rows", "Fix:")),
    (
        "no text column",
        _csv("a.csv", "sentence,label\n" + GOOD_ROWS),
        "",
        ("a.csv", "no column 'text'", "data.text_column"),
    ),
    (
        "no label column",
        _csv("a.csv", "text,y\n" + GOOD_ROWS),
        "",
        ("a.csv", "no column 'label'", "data.label_column"),
    ),
    (
        "missing text",
        _csv("a.csv", "text,label\n" + GOOD_ROWS + ",1\n"),
        "",
        ("a.csv", "missing texts in rows [40]", "Fix:"),
    ),
    (
        "blank text",
        _csv("a.csv", "text,label\n" + GOOD_ROWS + "   ,1\n"),
        "",
        ("a.csv", "empty texts in rows [40]", "Fix:"),
    ),
    (
        "missing label",
        _csv("a.csv", "text,label\n" + GOOD_ROWS + "x,\n"),
        "",
        ("a.csv", "missing labels in rows [40]", "Fix:"),
    ),
    (
        "boolean labels",
        _csv("a.jsonl", '{"text": "a", "label": true}\n{"text": "b", "label": false}\n'),
        "",
        ("a.jsonl", "not booleans", "Fix: write the labels as 0 and 1"),
    ),
    (
        "fraction labels",
        _csv("a.csv", "text,label\n" + GOOD_ROWS + "x,0.5\n"),
        "",
        ("a.csv", "fractions", "0.5", "Fix:"),
    ),
    (
        "names and numbers in one file",
        _csv("a.jsonl", '{"text": "a", "label": "spam"}\n{"text": "b", "label": 1}\n'),
        "",
        ("a.jsonl", "'spam'", "Fix:"),
    ),
    (
        "names and numbers across files",
        lambda d: [
            write(d / "a.csv", "text,label\nx,spam\ny,ham\n"),
            write(d / "b.csv", "text,label\n" + GOOD_ROWS),
        ],
        "",
        ("names but", "b.csv with numbers", "Fix: use one kind of label"),
    ),
    (
        "negative labels",
        _csv("a.csv", "text,label\n" + GOOD_ROWS + "x,-1\n"),
        "",
        ("a.csv", "negative labels", "Fix:"),
    ),
    (
        "label above num_labels",
        _csv("a.csv", "text,label\n" + GOOD_ROWS + "x,5\n"),
        "num_labels = 2",
        ("a.csv", "labels >= num_labels = 2", "raise data.num_labels"),
    ),
    (
        "one class",
        _csv("a.csv", "text,label\n" + "".join(f"t{i},spam\n" for i in range(40))),
        "",
        ("only one class (label spam)", "Fix: add examples of the other classes"),
    ),
    (
        "label gaps",
        _csv("a.csv", "text,label\n" + "".join(f"t{i},{[0, 1, 7][i % 3]}\n" for i in range(60))),
        "",
        ("classes 2, 3, 4, 5, 6 never occur", "8 outputs", "data.num_labels = 8"),
    ),
    ("latin-1", _latin1, "", ("latin.csv", "not UTF-8", "save it as UTF-8")),
    (
        "name not in label_names",
        _csv(
            "a.csv", "text,label\n" + "".join(f"t{i},{['spam', 'ham'][i % 2]}\n" for i in range(40))
        ),
        'label_names = ["spam", "eggs"]',
        ("a.csv", "not in data.label_names", "'ham'", "Fix: add the name"),
    ),
    (
        "broken JSON lines",
        _csv("a.jsonl", '{"text": "a", "label": 0}\n{"text": \n'),
        "",
        ("a.jsonl", "cannot read", "Fix: check that the file is valid JSONL"),
    ),
    (
        "unclosed quote",
        _csv("a.csv", 'text,label\n"abc,1\n'),
        "",
        ("a.csv", "cannot read", "valid CSV"),
    ),
    (
        "texts not strings",
        _csv("a.jsonl", '{"text": 5, "label": 1}\n{"text": "b", "label": 0}\n'),
        "",
        ("a.jsonl", "must hold strings", "Fix:"),
    ),
    (
        "too few rows for a server test set",
        _csv("a.csv", "text,label\nx,0\n"),
        "",
        ("too few to hold out a server test set", "Fix:"),
    ),
    (
        "natural partition without client values",
        _csv("a.csv", "text,label,site\n" + "".join(f"t{i},{i % 2},\n" for i in range(20))),
        'partition = "natural"\nclient_column = "site"',
        ("column 'site' has no client", "Fix: name a client in every row"),
    ),
]


@pytest.mark.parametrize(
    ("make", "extra", "needles"), [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES]
)
def test_bad_data(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], list[Path]],
    extra: str,
    needles: tuple[str, ...],
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    cfg = files_config(tmp_path, *make(data), extra=extra)
    line = refused(capsys, "plan", "--config", str(cfg), needles=needles)
    assert ". Fix: " in line or "Fix:" not in line, line  # error and fix are two sentences


def test_batch_larger_than_a_client_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = files_config(tmp_path, write(tmp_path / "a.csv", "text,label\n" + GOOD_ROWS))
    code, out, err = privet(capsys, "plan", "--config", str(cfg), "--set", "train.batch_size=10000")
    assert code == 0, err
    text = " ".join(out.split())
    assert "note: train.batch_size = 10000 is more than the 9 training examples" in text, out
    assert "sampling rate 1" in text and "lower train.batch_size" in text


# --- command-line usage -------------------------------------------------------------------------


def test_mistyped_command_suggests_once(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = privet(capsys, "simulat")
    assert code == 2
    assert err.count("simulate") == 1, err
    assert "Traceback" not in err


def test_unknown_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = privet(capsys, "plan", "--confg", "x.toml")
    assert code == 2 and "--confg" in err and "Traceback" not in err, err


def test_export_of_a_folder_that_is_no_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refused(
        capsys,
        "export",
        str(tmp_path),
        "--out",
        str(tmp_path / "m"),
        needles=(str(tmp_path), "final_adapter", "Fix:"),
    )


def test_missing_local_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = files_config(tmp_path, write(tmp_path / "a.csv", "text,label\n" + GOOD_ROWS))
    refused(
        capsys,
        "plan",
        "--config",
        str(cfg),
        "--set",
        f'model.name="{tmp_path / "no-such-model"}"',
        needles=("no-such-model", "Fix:"),
    )


def test_certs_node_prints_the_key_path_it_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = privet(capsys, "certs", "node", "site-a", "--out", str(tmp_path / "certs"))
    assert code == 0, err
    key = tmp_path / "certs" / "site-a.key"
    assert key.is_file()
    # on one line, whatever the terminal's width: the command is meant to be copied
    assert any(f"--key {key} " in line for line in out.splitlines()), out


def test_uncached_hub_model_offline_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = files_config(tmp_path, write(tmp_path / "a.csv", "text,label\n" + GOOD_ROWS))
    refused(
        capsys,
        "plan",
        "--config",
        str(cfg),
        "--set",
        'model.name="someorg/not-cached"',
        needles=("model.name 'someorg/not-cached'", "not in the Hugging Face cache", "Fix:"),
    )
