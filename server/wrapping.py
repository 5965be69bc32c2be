"""A strategy around another strategy: the one base every privet strategy wrapper extends.

privet adds behaviour to any Flower Message-API strategy by wrapping it (recording and checking
replies, LoRA-aware aggregation, client-level DP), as Flower's own DP wrappers do. Each wrapper
changes one or two steps of a round; the rest must reach the wrapped strategy unchanged, and
writing that delegation out in every wrapper copied the same five methods four times.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["ByteCounts", "WrappedStrategy"]


class WrappedStrategy(Strategy):
    """Send every step of a round to ``inner``; subclasses override the steps they change.

    Parameters
    ----------
    inner
        The wrapped Flower strategy (FedAvg, FedAdam, another wrapper, ...).

    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def summary(self) -> None:
        """The wrapped strategy's summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's train messages."""
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's aggregate of the train replies."""
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The wrapped strategy's aggregate of the evaluation replies."""
        return self.inner.aggregate_evaluate(server_round, replies)


class ByteCounts:
    """Bytes a grid wrapper sent and received since the last :meth:`take_byte_counts`.

    The wrappers that own delivery (transport encodings, SecAgg+) count what really travelled; the
    server loop takes the counts once a round for ``metrics.jsonl``.
    """

    bytes_sent: int = 0
    bytes_received: int = 0

    def take_byte_counts(self) -> tuple[int, int]:
        """Bytes sent and received since the last call; resets the counters."""
        out = (self.bytes_sent, self.bytes_received)
        self.bytes_sent = self.bytes_received = 0
        return out
