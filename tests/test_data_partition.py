from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privet.common.data import (
    Examples,
    concat_examples,
    derive_seed,
    dirichlet_partition,
    iid_partition,
    natural_partition,
    train_test_split,
)
from privet.common.errors import DataError

FAST = settings(max_examples=60, deadline=None)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts) if parts else np.array([], dtype=np.int64)
    assert joined.dtype == np.int64
    assert np.array_equal(np.sort(joined), np.arange(n))
    for part in parts:
        assert np.array_equal(part, np.sort(part))


# --- Examples ----------------------------------------------------------------------------------


def test_examples_subset_and_readonly() -> None:
    ex = Examples(["a", "b", "c"], np.array([0, 1, 0]), {"k": ["x", "y", "z"]})
    sub = ex.subset([2, 0])
    assert sub.texts == ["c", "a"]
    assert sub.labels.tolist() == [0, 0]
    assert sub.keys == {"k": ["z", "x"]}
    assert len(sub) == 2 and len(ex) == 3
    assert len(ex.subset(np.array([], dtype=np.int64))) == 0
    with pytest.raises(ValueError):
        ex.labels[0] = 5
    with pytest.raises(IndexError):
        ex.subset([3])


def test_examples_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        Examples(["a", "b"], np.array([0]))
    with pytest.raises(ValueError, match="key 'k'"):
        Examples(["a"], np.array([0]), {"k": []})


def test_concat_examples() -> None:
    a = Examples(["a"], np.array([1]), {"client": ["u"]})
    b = Examples(["b", "c"], np.array([0, 2]), {"client": ["v", "w"]})
    ab = concat_examples([a, b])
    assert ab.texts == ["a", "b", "c"]
    assert ab.labels.tolist() == [1, 0, 2]
    assert ab.keys == {"client": ["u", "v", "w"]}
    with pytest.raises(ValueError):
        concat_examples([a, Examples(["x"], np.array([0]))])


# --- iid ---------------------------------------------------------------------------------------


def test_iid_exact_small() -> None:
    parts = iid_partition(10, 3, seed=0)
    assert [p.size for p in parts] == [4, 3, 3]
    assert_exact_cover(parts, 10)


@FAST
@given(n=st.integers(1, 300), clients=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_iid_properties(n: int, clients: int, seed: int) -> None:
    if n < clients:
        with pytest.raises(DataError, match="fewer examples than clients"):
            iid_partition(n, clients, seed)
        return
    parts = iid_partition(n, clients, seed)
    assert len(parts) == clients
    assert_exact_cover(parts, n)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    again = iid_partition(n, clients, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_iid_seed_changes_split() -> None:
    a = iid_partition(100, 4, seed=1)
    b = iid_partition(100, 4, seed=2)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_iid_zero_clients() -> None:
    with pytest.raises(DataError):
        iid_partition(5, 0, seed=0)


# --- dirichlet ---------------------------------------------------------------------------------


@FAST
@given(
    n=st.integers(1, 300),
    clients=st.integers(1, 10),
    classes=st.integers(1, 5),
    alpha=st.sampled_from([0.1, 1.0, 10.0, 1000.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_properties(n: int, clients: int, classes: int, alpha: float, seed: int) -> None:
    labels = np.random.default_rng(seed).integers(0, classes, size=n)
    try:
        parts = dirichlet_partition(labels, clients, alpha, seed)
    except DataError as exc:
        # Refusing is allowed only for too little data or when no draw reached min_size.
        assert n < clients or "raise data.alpha" in str(exc)
        return
    assert len(parts) == clients
    assert_exact_cover(parts, n)
    assert min(p.size for p in parts) >= 1
    again = dirichlet_partition(labels, clients, alpha, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def _label_shares(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    return np.array([labels[p].mean() for p in parts])


def test_dirichlet_skew_small_alpha_vs_large() -> None:
    labels = np.array([0] * 500 + [1] * 500)
    skewed = _label_shares(labels, dirichlet_partition(labels, 4, alpha=0.05, seed=0))
    even = _label_shares(labels, dirichlet_partition(labels, 4, alpha=1000.0, seed=0))
    # Global share of label 1 is 0.5.  alpha = 0.05 gives clients dominated by one class...
    assert np.abs(skewed - 0.5).max() > 0.3
    # ...alpha = 1000 gives nearly the global mix everywhere.
    assert np.abs(even - 0.5).max() < 0.1


def test_dirichlet_min_size_unreachable() -> None:
    labels = np.zeros(20, dtype=np.int64)
    with pytest.raises(DataError, match=r"raise data\.alpha or lower data\.num_clients"):
        dirichlet_partition(labels, 10, alpha=0.001, seed=0, min_size=2)


def test_dirichlet_bad_args() -> None:
    with pytest.raises(DataError, match="fewer examples than clients"):
        dirichlet_partition(np.zeros(3), 4, 1.0, 0)
    with pytest.raises(DataError, match="alpha"):
        dirichlet_partition(np.zeros(10), 2, 0.0, 0)
    with pytest.raises(DataError):
        dirichlet_partition(np.zeros(10), 4, 1.0, 0, min_size=3)


# --- natural -----------------------------------------------------------------------------------


def test_natural_exact() -> None:
    names, parts = natural_partition(["b", "a", "b", "c", "a"])
    assert names == ["a", "b", "c"]
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]
    with pytest.raises(DataError):
        natural_partition([])


@FAST
@given(st.lists(st.sampled_from(["x", "y", "z", "amazon-1", "tweets-7"]), min_size=1, max_size=80))
def test_natural_properties(keys: list[str]) -> None:
    names, parts = natural_partition(keys)
    assert names == sorted(set(keys))
    assert_exact_cover(parts, len(keys))
    for name, part in zip(names, parts, strict=True):
        assert {keys[i] for i in part} == {name}


# --- train/test split --------------------------------------------------------------------------


def test_train_test_split_exact() -> None:
    train, test = train_test_split(np.arange(100, 110), 0.2, seed=0)
    assert train.size == 8 and test.size == 2
    assert sorted([*train, *test]) == list(range(100, 110))
    # Half rounds up, and at least one example always stays in train.
    assert train_test_split(np.arange(5), 0.1, 0)[1].size == 1
    assert train_test_split(np.arange(1), 0.9, 0)[1].size == 0
    assert train_test_split(np.arange(0), 0.5, 0)[0].size == 0
    with pytest.raises(DataError):
        train_test_split(np.arange(5), 1.0, 0)


@FAST
@given(n=st.integers(0, 200), frac=st.floats(0, 0.99), seed=st.integers(0, 2**32 - 1))
def test_train_test_split_properties(n: int, frac: float, seed: int) -> None:
    idx = np.arange(n) * 3 + 7
    train, test = train_test_split(idx, frac, seed)
    assert np.array_equal(np.sort(np.concatenate([train, test])), idx)
    assert n == 0 or train.size >= 1
    again = train_test_split(idx, frac, seed)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


def test_derive_seed_distinct_and_stable() -> None:
    seeds = {derive_seed(0, stage) for stage in range(5)} | {derive_seed(1, 0)}
    assert len(seeds) == 6
    assert derive_seed(3, 4, 5) == derive_seed(3, 4, 5)
    assert 0 <= derive_seed(2**40, 1) < 2**63
