"""LoRA aggregation algebra on hand-made matrices, and the SVD strategy wrapper on hand-made replies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from privet.common.config import load_config
from privet.server.lora import (
    LoraSvdAggregation,
    fedex_residual,
    lora_pairs,
    mean_product,
    svd_refactor,
)
from privet.server.strategies import build_strategy

from .flower_fakes import NodesGrid, arrays, reply, run_identity

# Two clients, rank 1, a 2x2 weight.
A1, B1 = np.array([[1.0, 2.0]]), np.array([[1.0], [0.0]])
A2, B2 = np.array([[3.0, 4.0]]), np.array([[0.0], [1.0]])


def test_mean_of_products_is_not_product_of_means() -> None:
    m = mean_product([A1, A2], [B1, B2], weights=[1, 1])
    # (B1 A1 + B2 A2) / 2 = ([[1, 2], [0, 0]] + [[0, 0], [3, 4]]) / 2
    assert m.tolist() == [[0.5, 1.0], [1.5, 2.0]]
    naive = ((B1 + B2) / 2) @ ((A1 + A2) / 2)  # [[.5], [.5]] @ [[2, 3]]
    assert naive.tolist() == [[1.0, 1.5], [1.0, 1.5]]


def test_weights_follow_examples() -> None:
    m = mean_product([A1, A2], [B1, B2], weights=[3, 1])
    assert m.tolist() == [[0.75, 1.5], [0.75, 1.0]]


def test_fedex_residual_makes_the_means_exact() -> None:
    a, b, r = fedex_residual([A1, A2], [B1, B2], weights=[1, 1])
    assert a.tolist() == [[2.0, 3.0]]
    assert b.tolist() == [[0.5], [0.5]]
    assert r.tolist() == [[-0.5, -0.5], [0.5, 0.5]]
    assert (b @ a + r).tolist() == [[0.5, 1.0], [1.5, 2.0]]


def test_svd_refactor_is_exact_when_the_rank_fits() -> None:
    m = mean_product([A1, A2], [B1, B2], weights=[1, 1])  # full rank 2
    a, b, err = svd_refactor(m, rank=2)
    assert a.shape == (2, 2) and b.shape == (2, 2)
    np.testing.assert_allclose(b @ a, m, atol=1e-12)
    assert err < 1e-12


def test_svd_refactor_truncates_to_the_best_rank() -> None:
    # client 1 updates W[0, 0] by 2, client 2 updates W[1, 1] by 1: mean = diag(1, 0.5)
    m = mean_product(
        [np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])],
        [np.array([[2.0], [0.0]]), np.array([[0.0], [1.0]])],
        weights=[1, 1],
    )
    assert m.tolist() == [[1.0, 0.0], [0.0, 0.5]]
    a, b, err = svd_refactor(m, rank=1)
    np.testing.assert_allclose(b @ a, [[1.0, 0.0], [0.0, 0.0]], atol=1e-12)
    assert math.isclose(err, 0.5 / math.sqrt(1.25), rel_tol=1e-12)
    # balanced split: both factors carry sqrt(1)
    np.testing.assert_allclose(np.abs(a), [[1.0, 0.0]], atol=1e-12)


def test_svd_of_zero_is_zero() -> None:
    a, b, err = svd_refactor(np.zeros((3, 2)), rank=2)
    assert not a.any() and not b.any() and err == 0.0


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 5),
    r=st.integers(1, 3),
)
def test_a_shared_a_needs_no_correction(seed: int, n: int, r: int) -> None:
    """FFA-LoRA: with the same A on every client, averaging B is exact (zero residual)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(r, 5))
    bs = [rng.normal(size=(4, r)) for _ in range(n)]
    w = rng.integers(1, 10, size=n).tolist()
    _, _, res = fedex_residual([a] * n, bs, weights=w)
    np.testing.assert_allclose(res, 0.0, atol=1e-10)


def test_lora_pairs_match_peft_keys() -> None:
    keys = [
        "m.layer.0.query.lora_A.default.weight",
        "m.layer.0.query.lora_B.default.weight",
        "m.layer.0.value.lora_A.default.weight",  # B missing: not a pair
        "classifier.weight",
    ]
    assert lora_pairs(keys) == {
        "m.layer.0.query.default.weight": (
            "m.layer.0.query.lora_A.default.weight",
            "m.layer.0.query.lora_B.default.weight",
        )
    }


def test_the_svd_strategy_aggregates_pairs_by_product_and_the_rest_by_mean() -> None:
    cfg = load_config(None, ["adapter.freeze_a=false", "aggregation.lora='svd'"])
    s = build_strategy(cfg.federation, num_clients=2, aggregation=cfg.aggregation)
    assert isinstance(s, LoraSvdAggregation)
    ka, kb = "q.lora_A.default.weight", "q.lora_B.default.weight"
    start = {ka: np.zeros((2, 2)), kb: np.zeros((2, 2)), "head": [0.0]}
    with run_identity():
        list(s.configure_train(1, arrays(start), ConfigRecord({}), NodesGrid([1, 2])))
        # rank-2 adapters carrying the rank-1 updates of the diag test above
        r1 = {ka: [[1.0, 0.0], [0.0, 0.0]], kb: [[2.0, 0.0], [0.0, 0.0]], "head": [1.0]}
        r2 = {ka: [[0.0, 1.0], [0.0, 0.0]], kb: [[0.0, 0.0], [1.0, 0.0]], "head": [3.0]}
        out, metrics = s.aggregate_train(1, [reply(1, r1, n=1), reply(2, r2, n=1)])
    assert out is not None and metrics is not None
    a, b = out[ka].numpy(), out[kb].numpy()
    np.testing.assert_allclose(b @ a, [[1.0, 0.0], [0.0, 0.5]], atol=1e-6)  # exact mean product
    assert out["head"].numpy().tolist() == [2.0]
    assert metrics["lora-svd-rel-error"] == pytest.approx(0.0, abs=1e-9)
    assert a.dtype == np.float32
