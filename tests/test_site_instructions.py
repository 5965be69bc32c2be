"""A deployed site trains a causal LM on its own instruction file (``privet client --data x.jsonl``).

In process, no SuperNode: the site app is asked as Flower would ask it, with the trainer replaced
by a recorder of the data it would train on (the causal-LM training itself is tested in
tests/test_llm_task.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from privet.client import Participant
from privet.client.app import ERROR_CLIENT
from privet.client.deploy import CONFIG_KEY, SiteSettings, load_site_data, make_site_app
from privet.client.policy import SitePolicy
from privet.common.config import PrivacyConfig, dump_config, load_config
from privet.common.data import ClientData, GenerationExamples, Turn
from privet.common.tasks import task_for
from tests.flower_fakes import run_identity
from tests.llm_fixtures import tiny_llama_dir

ROWS = [{"prompt": f"Review {i}: a lovely film", "completion": "positive"} for i in range(10)]


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with run_identity():
        yield


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[ClientData]:
    """The data each site app would train on (the real trainer replaced: no model loads)."""
    seen: list[ClientData] = []

    def fake_client_app(cfg: Any, *, local: ClientData, **_: Any) -> Any:
        seen.append(local)
        return lambda msg, ctx: Message(RecordDict(), reply_to=msg)

    monkeypatch.setattr("privet.client.app.make_client_app", fake_client_app)
    return seen


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _ask(app: Any, *sets: str) -> Message:
    cfg = load_config(None, ["model.num_hidden_layers=1", *sets])
    content = RecordDict({"config": ConfigRecord({"server-round": 1, "total-rounds": 1})})
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={},
        state=RecordDict(),
        run_config={CONFIG_KEY: dump_config(cfg), "privet-run-dir": "/coordinator/runs/fed"},
    )
    return app(Message(content, dst_node_id=1, message_type="train"), ctx)


def _site(tmp_path: Path, data: Path | None, model: str) -> SiteSettings:
    return SiteSettings(
        name="site-a",
        data_file=data,
        state_dir=tmp_path / "state",
        test_fraction=0.2,
        policy=SitePolicy.from_privacy(PrivacyConfig(), name=model),
    )


LLM_RUN = ("model.task='causal_lm'", "data.source='vader_instructions'")


def test_a_sites_instruction_file_feeds_a_causal_lm_run(
    tmp_path: Path, built: list[ClientData]
) -> None:
    model = tiny_llama_dir()
    site = _site(tmp_path, _jsonl(tmp_path / "chats.jsonl", ROWS), model)
    local = load_site_data(site, num_labels=None)  # what `privet client` checks before it starts
    assert isinstance(local.train, GenerationExamples)
    assert (len(local.train), len(local.test)) == (8, 2)
    reply = _ask(make_site_app(site), *LLM_RUN, f"model.name='{model}'")
    assert not reply.has_error()
    (got,) = built
    assert isinstance(got.train, GenerationExamples) and got.train.targets == ["positive"] * 8
    assert {p[0].content for p in got.train.prompts + got.test.prompts if p} == {
        r["prompt"] for r in ROWS
    }
    # ... and the causal-LM task tokenizes the site's rows: the loss is on the answer only.
    from transformers import AutoTokenizer

    data = task_for("causal_lm").tokenize(
        got.train, AutoTokenizer.from_pretrained(model), max_length=32
    )
    assert len(data) == 8 and all(y != -100 for y in data[0][1][-2:])


def test_a_participants_instructions_serve_a_causal_lm_run(
    tmp_path: Path, built: list[ClientData]
) -> None:
    model = tiny_llama_dir()
    path = _jsonl(tmp_path / "chats.jsonl", ROWS)
    p = Participant(server="127.0.0.1:9092", data=path, state_dir=tmp_path / "p", insecure=True)
    assert isinstance(p._site.examples, GenerationExamples) and len(p._site.examples) == 10
    own = GenerationExamples(targets=["yes"] * 5, prompts=[(Turn("user", "ok?"),)] * 5)
    site = _site(tmp_path, None, model)
    assert not _ask(make_site_app(site, own), *LLM_RUN, f"model.name='{model}'").has_error()
    assert built[0].train.targets == ["yes"] * 4


@pytest.mark.parametrize("instructions", [True, False])
def test_data_of_the_other_task_is_one_clear_error(
    tmp_path: Path, built: list[ClientData], instructions: bool
) -> None:
    model = tiny_llama_dir()
    if instructions:  # instructions at a classification run
        data = _jsonl(tmp_path / "chats.jsonl", ROWS)
        sets: tuple[str, ...] = ("data.num_labels=2",)
        message = "holds instructions (prompt/completion or chat rows), but this run trains a "
    else:  # labelled texts at a causal-LM run
        data = _jsonl(tmp_path / "rows.jsonl", [{"text": "t", "label": i % 2} for i in range(6)])
        sets = LLM_RUN
        message = "holds labelled texts, but this run fine-tunes a causal language model"
    reply = _ask(make_site_app(_site(tmp_path, data, model)), *sets, f"model.name='{model}'")
    assert reply.has_error() and reply.error.code == ERROR_CLIENT
    assert message in reply.error.reason and "Fix: give this site" in reply.error.reason
    assert "\n" not in reply.error.reason
    assert built == []  # nothing built, nothing trained
