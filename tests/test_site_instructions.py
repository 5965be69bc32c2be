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
        message = "holds data for a causal language model (prompt/completion, chat or plain text "
    else:  # labelled texts at a causal-LM run
        data = _jsonl(tmp_path / "rows.jsonl", [{"text": "t", "label": i % 2} for i in range(6)])
        sets = LLM_RUN
        message = "holds labelled texts, but this run fine-tunes a causal language model"
    reply = _ask(make_site_app(_site(tmp_path, data, model)), *sets, f"model.name='{model}'")
    assert reply.has_error() and reply.error.code == ERROR_CLIENT
    assert message in reply.error.reason and "Fix: give this site" in reply.error.reason
    assert "\n" not in reply.error.reason
    assert built == []  # nothing built, nothing trained


# --- `privet sites` for a causal LM: each share is a file the site reads back ----------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("privet-data")


@pytest.mark.parametrize(
    ("preset", "sets", "shape"),
    [
        ("llm_sentiment.toml", ["data.max_examples=120", "data.num_clients=3"], "messages"),
        ("llm_shakespeare.toml", ["data.max_examples=60", "data.num_clients=2"], "text"),
    ],
)
def test_sites_writes_causal_lm_shares_that_sites_load_back(
    tmp_path: Path, data_cache: Path, preset: str, sets: list[str], shape: str
) -> None:
    from typer.testing import CliRunner

    from privet.common.data import cached_federated_data, load_instructions
    from privet.simulations.cli import app

    sets = [*sets, f"data.cache_dir='{data_cache}'"]
    out = tmp_path / "sites"
    args = ["sites", "--config", str(EXAMPLES / preset), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, *(x for s in sets for x in ("--set", s))])
    assert res.exit_code == 0, res.output
    fed = cached_federated_data(load_config(EXAMPLES / preset, sets).data)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{c.name}.jsonl" for c in fed.clients)
    for client in fed.clients:
        assert isinstance(client.train, GenerationExamples)
        assert isinstance(client.test, GenerationExamples)
        path = out / f"{client.name}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert all(list(row) == [shape] for row in rows)
        # Round trip through the site's own loaders: the same examples, in the same order.
        back = load_instructions([path])[0]
        assert back.targets == client.train.targets + client.test.targets
        assert back.prompts == client.train.prompts + client.test.prompts
        site = SiteSettings(
            name=client.name,
            data_file=path,
            state_dir=tmp_path / "state",
            test_fraction=0.2,
            policy=SitePolicy.from_privacy(PrivacyConfig(), name=tiny_llama_dir()),
        )
        local = load_site_data(site, num_labels=None)  # `privet client --data` checks this
        assert isinstance(local.train, GenerationExamples)
        assert isinstance(local.test, GenerationExamples)
        assert sorted(local.train.targets + local.test.targets) == sorted(back.targets)
        p = Participant(server="127.0.0.1:9092", data=path, state_dir=tmp_path / "p", insecure=True)
        assert p._site.examples.targets == back.targets  # type: ignore[union-attr]
        assert p._site.examples.prompts == back.prompts  # type: ignore[union-attr]


def test_a_sites_plain_text_file_feeds_a_causal_lm_run(
    tmp_path: Path, built: list[ClientData]
) -> None:
    model = tiny_llama_dir()
    texts = [f"Speech {i}: to be, or not to be." for i in range(10)]
    site = _site(tmp_path, _jsonl(tmp_path / "speeches.jsonl", [{"text": t} for t in texts]), model)
    reply = _ask(
        make_site_app(site),
        "model.task='causal_lm'",
        "data.source='shakespeare'",
        f"model.name='{model}'",
    )
    assert not reply.has_error()
    (got,) = built
    assert got.train.prompts == [None] * 8 and sorted(got.train.targets + got.test.targets) == texts
