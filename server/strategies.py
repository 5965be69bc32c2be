"""The aggregation strategy a federation config selects: Flower's Message-API classes.

Every strategy of ``federation.strategy`` is Flower's own class; privet only maps the validated
``[aggregation]`` parameters onto it (the checks that refuse impossible combinations live in
``privet.common.config``). FedProx's proximal term is applied by our client (``client/training.py``):
Flower's FedProx only sends ``proximal-mu`` in the train config.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from privet.common.config import AggregationConfig, FederationConfig
from privet.common.privacy.mechanism import flower_sample_size
from privet.server.lora import FedExLoraAggregation, LoraSvdAggregation

__all__ = ["build_strategy"]


def build_strategy(
    fed: FederationConfig, *, num_clients: int, aggregation: AggregationConfig | None = None
) -> Strategy:
    """The Flower strategy for ``fed.strategy`` with the sampling settings of ``fed``.

    Parameters
    ----------
    fed
        Strategy name, sampling fractions and minimums.
    num_clients
        Clients in the federation; minimums are capped at it so a small simulated federation can
        still run.
    aggregation
        The strategy's parameters (default: the defaults of :class:`AggregationConfig`).

    Returns
    -------
    Strategy
        A fresh Flower strategy object (server optimizers keep state across rounds in it).

    """
    agg = aggregation or AggregationConfig()
    min_train = min(fed.min_train_clients, num_clients)
    common: dict[str, Any] = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": min_train,
        "min_evaluate_nodes": min_train if fed.fraction_evaluate else 0,
        "min_available_nodes": min(fed.min_available_clients, num_clients),
    }
    # Adam/Yogi moment decays: None keeps Flower's defaults.
    betas: dict[str, Any] = {
        k: v for k, v in (("beta_1", agg.beta_1), ("beta_2", agg.beta_2)) if v is not None
    }
    name = fed.strategy
    if name in ("fedavg", "fedprox"):
        mean: Strategy = (
            FedAvg(**common) if name == "fedavg" else FedProx(**common, proximal_mu=agg.proximal_mu)
        )
        # The config allows 'svd' and 'fedex' only with these two mean-based strategies.
        if agg.lora == "svd":
            return LoraSvdAggregation(mean)
        return FedExLoraAggregation(mean) if agg.lora == "fedex" else mean
    if name == "fedavgm":
        return FedAvgM(
            **common,
            server_learning_rate=agg.server_learning_rate,
            server_momentum=agg.server_momentum,
        )
    if name == "fedadam":
        return FedAdam(**common, eta=agg.eta, tau=agg.tau, **betas)
    if name == "fedyogi":
        return FedYogi(**common, eta=agg.eta, tau=agg.tau, **betas)
    if name == "fedadagrad":
        return FedAdagrad(**common, eta=agg.eta, tau=agg.tau)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=agg.trim_beta)
    if name == "krum":
        return Krum(**common, num_malicious_nodes=agg.num_malicious)
    if name == "multikrum":
        return MultiKrum(
            **common,
            num_malicious_nodes=agg.num_malicious,
            # Flower's default selects 1 (= Krum); the textbook Multi-Krum averages n - f.
            num_nodes_to_select=agg.num_selected
            or max(1, _expected_replies(fed, num_clients) - agg.num_malicious),
        )
    if name == "bulyan":
        return Bulyan(**common, num_malicious_nodes=agg.num_malicious)
    raise AssertionError(f"unhandled strategy {name!r}")  # the config's Literal forbids this


def _expected_replies(fed: FederationConfig, num_clients: int) -> int:
    """Flower's sample size per round (the number of replies when nobody fails)."""
    return flower_sample_size(
        num_clients, fraction=fed.fraction_train, minimum=fed.min_train_clients
    )
