"""A kept release is resent only for the same inputs: the fingerprint covers every part of them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from privet.client.releases import release_fingerprint
from privet.common.data import Examples, GenerationExamples, Turn

CONTENT = SimpleNamespace(array_records={}, config_records={})


def _fp(data: Examples | GenerationExamples, **over: object) -> str:
    kw: dict[str, object] = {
        "run": "r1",
        "server_round": 2,
        "content": CONTENT,
        "config_json": "{}",
        "client_id": "site-a",
        "data": data,
    }
    kw.update(over)
    return release_fingerprint(**kw)  # type: ignore[arg-type]


def test_a_classification_fingerprint_covers_texts_and_labels() -> None:
    base = Examples(texts=["a", "b"], labels=np.array([0, 1]))
    same = Examples(texts=["a", "b"], labels=np.array([0, 1]))
    assert _fp(base) == _fp(same)
    assert _fp(base) != _fp(Examples(texts=["a", "c"], labels=np.array([0, 1])))
    assert _fp(base) != _fp(Examples(texts=["a", "b"], labels=np.array([1, 1])))
    assert _fp(base) != _fp(base, server_round=3)
    assert _fp(base) != _fp(base, client_id="site-b")


def test_a_generation_fingerprint_covers_prompts_and_targets() -> None:
    ask = (Turn("user", "Sentiment of: great film"),)
    base = GenerationExamples(targets=["positive", "text"], prompts=[ask, None])
    assert _fp(base) == _fp(GenerationExamples(targets=["positive", "text"], prompts=[ask, None]))
    other_prompt = (Turn("user", "Sentiment of: awful film"),)
    assert _fp(base) != _fp(
        GenerationExamples(targets=["positive", "text"], prompts=[other_prompt, None])
    )
    assert _fp(base) != _fp(GenerationExamples(targets=["negative", "text"], prompts=[ask, None]))
    # The same words as a prompt or as plain text are different examples.
    assert _fp(base) != _fp(GenerationExamples(targets=["positive", "text"], prompts=[None, None]))
