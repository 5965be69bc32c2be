"""Rows handed to a Participant may name their classes, as a site's data file may (issue 17).

Names map by the rules files follow: the federation's ``data.label_names`` (sent by the
coordinator with the run) in its order, else the sorted distinct names; a name the federation
lacks is one clear error, for the site's console and the coordinator alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from privet.client import Participant, to_examples
from privet.client.app import ERROR_CLIENT
from privet.client.deploy import CONFIG_KEY, SiteSettings, make_site_app
from privet.common.config import dump_config, load_config
from privet.common.data import ClientData, LabelledRows
from privet.common.errors import DataError
from tests.flower_fakes import run_identity

ROWS = [
    {"text": "free money, click now", "label": "spam"},
    {"text": "lunch at noon?", "label": "ham"},
    {"text": "you won a prize", "label": "spam"},
    {"text": "the minutes of today's meeting", "label": "ham"},
    {"text": "cheap pills", "label": "spam"},
]


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with run_identity():
        yield


def test_names_map_sorted_or_by_the_given_names() -> None:
    sorted_ = to_examples(ROWS)
    assert sorted_.labels.tolist() == [1, 0, 1, 0, 1]  # ham = 0, spam = 1
    given = to_examples(ROWS, label_names=["spam", "ham", "eggs"])
    assert given.labels.tolist() == [0, 1, 0, 1, 0]
    # pairs and a DataSource too; integers are kept as they are
    pairs = [(r["text"], r["label"]) for r in ROWS]
    assert to_examples(pairs).labels.tolist() == [1, 0, 1, 0, 1]
    assert to_examples([("a", 1), ("b", np.int64(0))]).labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("rows", "names", "message"),
    [
        (ROWS, ["ham", "eggs"], r"rows \[0, 2, 4\] \(e\.g\. 'spam'\); the names are 'ham', 'eggs'"),
        ([("a", "spam"), ("b", 1)], None, r"not both; row 0 holds 'spam' \(a string\)"),
        ([("a", True), ("b", False)], None, "not booleans"),
        ([("a", 1), ("b", -1)], None, r"negative labels in rows \[1\]"),
        ([("a", "spam"), ("b", " ")], None, r"empty label names in rows \[1\]"),
        ([("a", 0.5), ("b", 1)], None, "fractions"),
    ],
)
def test_bad_labels_get_one_line(rows: list[Any], names: list[str] | None, message: str) -> None:
    with pytest.raises(DataError, match=message) as info:
        to_examples(rows, label_names=names)
    assert str(info.value).startswith("the rows' 'label' field ")
    assert "\n" not in str(info.value)


def _ask(app: Any, *sets: str) -> tuple[Message, Context]:
    cfg = load_config(None, ["model.num_hidden_layers=1", *sets])
    content = RecordDict({"config": ConfigRecord({"server-round": 1, "total-rounds": 1})})
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={},
        state=RecordDict(),
        run_config={CONFIG_KEY: dump_config(cfg), "privet-run-dir": "/coordinator/runs/fed"},
    )
    return app(Message(content, dst_node_id=1, message_type="train"), ctx), ctx


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[ClientData]:
    """The data each site app would train on (the real trainer replaced: no model loads)."""
    seen: list[ClientData] = []

    def fake_client_app(cfg: Any, *, local: ClientData, **_: Any) -> Any:
        seen.append(local)
        return lambda msg, ctx: Message(RecordDict(), reply_to=msg)

    monkeypatch.setattr("privet.client.app.make_client_app", fake_client_app)
    return seen


def test_a_participants_named_rows_take_the_federations_mapping(
    tmp_path: Path, built: list[ClientData]
) -> None:
    p = Participant(server="127.0.0.1:9092", data=ROWS * 4, state_dir=tmp_path, insecure=True)
    rows = p._site.examples
    assert isinstance(rows, LabelledRows) and rows.names[:2] == ["spam", "ham"]
    settings = SiteSettings(name="site-a", state_dir=tmp_path / "state", test_fraction=0.0)
    # The coordinator's names, not in sorted order: spam is class 0 in this federation.
    reply, _ = _ask(
        make_site_app(settings, rows),
        "data.num_labels=2",
        "data.label_names=['spam', 'ham']",
    )
    assert not reply.has_error()
    texts, labels = built[0].train.texts, built[0].train.labels.tolist()
    assert {t: y for t, y in zip(texts, labels, strict=True)} == {
        r["text"]: {"spam": 0, "ham": 1}[r["label"]] for r in ROWS
    }
    # Without names from the coordinator: the sorted order, as for a file.
    _ask(make_site_app(settings, rows), "data.num_labels=2")
    assert dict(zip(built[1].train.texts, built[1].train.labels.tolist(), strict=True)) == {
        r["text"]: {"ham": 0, "spam": 1}[r["label"]] for r in ROWS
    }


def test_a_name_the_federation_lacks_is_one_clear_error(
    tmp_path: Path, built: list[ClientData]
) -> None:
    rows = LabelledRows.from_labels(
        ["a", "b", "c"], ["ham", "eggs", "spam"], where="the rows' 'label' field"
    )
    settings = SiteSettings(name="site-a", state_dir=tmp_path / "state")
    reply, _ = _ask(
        make_site_app(settings, rows), "data.num_labels=2", "data.label_names=['ham', 'spam']"
    )
    assert reply.has_error() and reply.error.code == ERROR_CLIENT
    assert reply.error.reason == (
        "the rows' 'label' field has labels not in data.label_names in rows [1] (e.g. 'eggs'); "
        "the names are 'ham', 'spam'. Fix: add the name to data.label_names or correct the row"
    )
    assert built == []  # nothing built, nothing trained
    assert not (tmp_path / "state").exists()
