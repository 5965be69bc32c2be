"""The aggregation strategy a federation config selects: Flower's Message-API classes."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Strategy

from privet.common.config import FederationConfig

__all__ = ["build_strategy"]


def build_strategy(fed: FederationConfig, *, num_clients: int) -> Strategy:
    """The Flower strategy for ``fed.strategy`` with the sampling settings of ``fed``.

    Minimums are capped at ``num_clients`` so a small simulated federation can still run.
    """
    min_train = min(fed.min_train_clients, num_clients)
    return FedAvg(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=min_train,
        min_evaluate_nodes=min_train if fed.fraction_evaluate else 0,
        min_available_nodes=min(fed.min_available_clients, num_clients),
    )
