"""Aggregating LoRA pairs: the mean of the products is not the product of the means.

A client's LoRA update of a weight ``W`` is ``B_i A_i`` (scaled by alpha / r, the same for every
client). Averaging ``A`` and ``B`` separately, as every Flower strategy does with arrays, gives
``mean(B) mean(A)``, which differs from the update the clients agree on, ``mean(B_i A_i)``, by a
cross term. Two ways out:

* FFA-LoRA (privet's default, ``adapter.freeze_a = true``): every client keeps the same frozen ``A``,
  so ``mean(B_i A) = mean(B_i) A`` exactly and plain averaging is right.
* ``aggregation.lora = "fedex"`` for trainable ``A`` and ``B``: exact, see below.
* ``aggregation.lora = "svd"`` for trainable ``A`` and ``B``: the server forms the weighted mean of
  the products exactly and re-factorizes it with a truncated SVD into rank ``r``: the best rank-r
  approximation of the exact mean (Eckart-Young), exact when the mean product has rank <= r. The
  relative truncation error is logged and reported as the metric ``lora-svd-rel-error``.

:func:`fedex_residual` gives the other exact form (FedEx-LoRA), and ``aggregation.lora = "fedex"``
runs it (:class:`FedExLoraAggregation`): the means of ``A`` and ``B`` plus the residual
``mean(B_i A_i) - mean(B) mean(A)``, accumulated over rounds and folded by every holder of the
global model into the frozen base weight (``privet.common.lora_residual``), so the global model is
the exact mean with no rank limit, at the cost of a full matrix per adapted layer in every message.
Flower has none of this; hence our own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privet.common.lora_residual import RESIDUAL_RECORD, is_residual_key, residual_key
from privet.common.protocol import ARRAYS, METRICS, NUM_EXAMPLES
from privet.server.wrapping import WrappedStrategy

__all__ = [
    "FedExLoraAggregation",
    "LoraSvdAggregation",
    "fedex_residual",
    "lora_pairs",
    "mean_product",
    "svd_refactor",
]

log = logging.getLogger("privet")

NDArray = np.ndarray


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Map each LoRA module to its ``(A key, B key)``, pairing PEFT's ``lora_A`` with ``lora_B``.

    Parameters
    ----------
    keys
        Names of the trainable arrays (PEFT state-dict keys).

    Returns
    -------
    dict
        ``{A key with 'lora_A' cut out: (A key, B key)}`` for every A whose B is present.

    """
    keys = set(keys)
    out: dict[str, tuple[str, str]] = {}
    for k in sorted(keys):
        if ".lora_A." in k:
            b = k.replace(".lora_A.", ".lora_B.")
            if b in keys:
                out[k.replace(".lora_A.", ".")] = (k, b)
    return out


def _weights(weights: Sequence[float], n: int) -> NDArray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"need {n} finite non-negative weights with a positive sum, got {weights}")
    return np.asarray(w / w.sum())


def mean_product(
    a_mats: Sequence[NDArray], b_mats: Sequence[NDArray], *, weights: Sequence[float]
) -> NDArray:
    """The weighted mean of the clients' products, ``sum_i w_i B_i A_i / sum_i w_i`` (float64)."""
    w = _weights(weights, len(a_mats))
    if len(a_mats) != len(b_mats) or not a_mats:
        raise ValueError("need as many A as B matrices, at least one")
    return np.asarray(
        sum(
            wi * (np.asarray(b, np.float64) @ np.asarray(a, np.float64))
            for wi, a, b in zip(w, a_mats, b_mats, strict=True)
        )
    )


def fedex_residual(
    a_mats: Sequence[NDArray], b_mats: Sequence[NDArray], *, weights: Sequence[float]
) -> tuple[NDArray, NDArray, NDArray]:
    """FedEx-LoRA: mean A, mean B and the residual that makes them exact.

    Returns
    -------
    tuple
        ``(A_mean, B_mean, R)`` with ``B_mean @ A_mean + R == mean_product(a_mats, b_mats, weights=weights)``; ``R`` is
        what a client would add to its frozen base weight (times the LoRA scaling).

    """
    w = _weights(weights, len(a_mats))
    a_mean = sum(wi * np.asarray(a, np.float64) for wi, a in zip(w, a_mats, strict=True))
    b_mean = sum(wi * np.asarray(b, np.float64) for wi, b in zip(w, b_mats, strict=True))
    assert isinstance(a_mean, np.ndarray) and isinstance(b_mean, np.ndarray)
    return a_mean, b_mean, mean_product(a_mats, b_mats, weights=weights) - b_mean @ a_mean


def svd_refactor(product: NDArray, *, rank: int) -> tuple[NDArray, NDArray, float]:
    """Factor ``product`` (out x in) into ``B`` (out x rank) and ``A`` (rank x in), best in Frobenius norm.

    The singular values are split evenly (``B = U sqrt(S)``, ``A = sqrt(S) V^T``) so neither factor
    dwarfs the other when training continues from them.

    Returns
    -------
    tuple
        ``(A, B, relative_error)`` where ``relative_error = ||product - B A||_F / ||product||_F``
        (0 when the product is 0 or has rank <= ``rank``).

    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    m = np.asarray(product, np.float64)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    k = min(rank, s.size)
    root = np.sqrt(s[:k])
    b = np.zeros((m.shape[0], rank))
    a = np.zeros((rank, m.shape[1]))
    b[:, :k] = u[:, :k] * root
    a[:k, :] = root[:, None] * vt[:k, :]
    total = float(np.sqrt(np.sum(s * s)))
    err = float(np.sqrt(np.sum(s[k:] ** 2))) / total if total > 0 else 0.0
    return a, b, err


def _reply_states(
    replies: list[Message], weighted_by_key: str
) -> tuple[list[dict[str, NDArray]], list[float]]:
    """Each successful reply's arrays (copied) and its aggregation weight, before the inner mean.

    Copies first: some strategies consume the reply arrays while aggregating.
    """
    good = [m for m in replies if not m.has_error() and ARRAYS in m.content.array_records]
    states = [
        {k: v.numpy().copy() for k, v in m.content.array_records[ARRAYS].items()} for m in good
    ]
    weights = [
        float(m.content.metric_records[METRICS][weighted_by_key])  # type: ignore[arg-type]
        for m in good
    ]
    return states, weights


class _PairWrapper(Protocol):
    inner: Strategy
    weighted_by_key: str


def _means_and_products(
    wrapper: _PairWrapper, server_round: int, replies: Iterable[Message]
) -> tuple[
    ArrayRecord | None, MetricRecord | None, Iterator[tuple[str, str, NDArray, NDArray]] | None
]:
    """The wrapped strategy's means, and each LoRA pair's weighted mean product, one at a time.

    Returns the wrapped strategy's arrays and metrics as they are, with ``None`` for the pairs,
    when it aggregated nothing or no reply carried weights. Otherwise the arrays are a copy (the
    caller replaces pairs in it) and the pairs come lazily as ``(a_key, b_key, first reply's A,
    mean of B_i A_i)``, so that only one layer's float64 product is held at a time.
    """
    replies = list(replies)
    states, weights = _reply_states(replies, wrapper.weighted_by_key)
    arrays, metrics = wrapper.inner.aggregate_train(server_round, replies)
    if arrays is None or not states:
        return arrays, metrics, None

    def pairs() -> Iterator[tuple[str, str, NDArray, NDArray]]:
        for a_key, b_key in lora_pairs(states[0]).values():
            product = mean_product(
                [s[a_key] for s in states], [s[b_key] for s in states], weights=weights
            )
            yield a_key, b_key, states[0][a_key], product

    return ArrayRecord({k: v for k, v in arrays.items()}), metrics, pairs()


class LoraSvdAggregation(WrappedStrategy):
    """Wrap a mean-based strategy (FedAvg, FedProx): LoRA pairs become the SVD of the mean product.

    Everything but the LoRA pairs (the head, biases) keeps the wrapped strategy's weighted mean.
    The weights are the replies' ``num-examples``, as in FedAvg.
    """

    def __init__(self, inner: Strategy, *, weighted_by_key: str = NUM_EXAMPLES) -> None:
        super().__init__(inner)
        self.weighted_by_key = weighted_by_key

    def summary(self) -> None:
        """Delegate to the wrapped strategy."""
        log.info("LoRA pairs: SVD re-factorization of the weighted mean product")
        self.inner.summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Let the wrapped strategy average, then replace each LoRA pair by the SVD of the mean product."""
        out, metrics, pairs = _means_and_products(self, server_round, replies)
        if out is None or pairs is None:
            return out, metrics
        worst = 0.0
        for a_key, b_key, a_first, product in pairs:
            a, b, err = svd_refactor(product, rank=a_first.shape[0])
            dtype = a_first.dtype
            out[a_key] = Array(a.astype(dtype))
            out[b_key] = Array(b.astype(dtype))
            worst = max(worst, err)
        log.info("round %d: LoRA SVD aggregation, worst relative error %.3g", server_round, worst)
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["lora-svd-rel-error"] = worst
        return out, metrics


class FedExLoraAggregation(WrappedStrategy):
    """FedEx-LoRA around a mean-based strategy (FedAvg, FedProx): exact aggregation of trainable A and B.

    The wrapped strategy averages ``A``, ``B`` and the head as usual; this wrapper adds, per LoRA
    pair, the round's residual ``mean(B_i A_i) - B_avg A_avg`` (float64, with the weights FedAvg
    uses, ``num-examples``) to the accumulated residual that travels with the global state
    (``privet.common.lora_residual``). Clients and the server fold ``scaling * R`` into the frozen
    base weight, so the global model is the exact weighted mean of the clients' models. The
    residuals go to clients in their own record (:data:`RESIDUAL_RECORD`) beside ``arrays``, so a
    client's reply, and its validation, concern the adapter only.

    The residual is a full ``out x in`` matrix per adapted layer: it is sent every round (the whole
    accumulated value, so a client that missed rounds needs no history) and dominates the payload;
    the metric ``fedex-residual-bytes`` reports its size per client message.
    """

    def __init__(self, inner: Strategy, *, weighted_by_key: str = NUM_EXAMPLES) -> None:
        super().__init__(inner)
        self.weighted_by_key = weighted_by_key
        self._residuals: dict[str, NDArray] = {}

    def summary(self) -> None:
        """Delegate to the wrapped strategy."""
        log.info("LoRA pairs: FedEx-LoRA (means plus a residual folded into the base weight)")
        self.inner.summary()

    def _split(self, arrays: ArrayRecord) -> tuple[ArrayRecord, ArrayRecord | None]:
        adapter = ArrayRecord({k: v for k, v in arrays.items() if not is_residual_key(k)})
        residuals = {k: v for k, v in arrays.items() if is_residual_key(k)}
        # Remembered in float64: the next round adds to exactly what was sent.
        self._residuals = {k: v.numpy().astype(np.float64) for k, v in residuals.items()}
        return adapter, ArrayRecord(residuals) if residuals else None

    def _attach(self, messages: Iterable[Message], residuals: ArrayRecord | None) -> list[Message]:
        out = list(messages)
        if residuals is not None:
            for msg in out:
                msg.content[RESIDUAL_RECORD] = residuals
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages for the adapter, each with the residuals beside it."""
        adapter, residuals = self._split(arrays)
        return self._attach(
            self.inner.configure_train(server_round, adapter, config, grid), residuals
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's means, plus the accumulated residual of every LoRA pair."""
        out, metrics, pairs = _means_and_products(self, server_round, replies)
        if out is None or pairs is None:
            return out, metrics
        added, size = 0.0, 0
        for a_key, b_key, _, product in pairs:
            # Against the means the wrapped strategy actually returned (float32), so that
            # R + B_avg A_avg is the exact mean product, whatever rounding the mean went through.
            b_avg = out[b_key].numpy().astype(np.float64)
            a_avg = out[a_key].numpy().astype(np.float64)
            step = product - b_avg @ a_avg
            key = residual_key(a_key)
            total = self._residuals.get(key, 0.0) + step
            out[key] = Array(np.ascontiguousarray(total.astype(np.float32)))
            added = max(added, float(np.linalg.norm(step)))
            size += out[key].numpy().nbytes
        log.info(
            "round %d: FedEx-LoRA residual, largest new part %.3g (Frobenius), %d bytes per client",
            server_round,
            added,
            size,
        )
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["fedex-residual-norm"] = added
        metrics["fedex-residual-bytes"] = size
        return out, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages, each with the residuals beside the adapter."""
        adapter, residuals = self._split(arrays)
        return self._attach(
            self.inner.configure_evaluate(server_round, adapter, config, grid), residuals
        )
