"""A strategy wrapper that records every reply per client before the wrapped strategy aggregates.

Composition, not inheritance: privet wraps whatever Flower strategy the config selects (and any
Flower DP wrapper around it), so per-client bookkeeping and reply validation work the same for all
of them. Flower has no such observer, hence our own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privet.common.protocol import (
    ACCURACY,
    ARRAYS,
    CLIPPING,
    CLIPPING_CODES,
    EPSILON,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    PRIVACY_ATTEMPT,
    STARTUP_SECONDS,
    TRAIN_LOSS,
)
from privet.server.wrapping import WrappedStrategy

__all__ = [
    "NOTE_MARKS",
    "RecordingStrategy",
    "ReplyCheck",
    "RoundCheck",
    "RoundObserver",
    "RoundRecord",
]

log = logging.getLogger("privet")

_CLIPPING_NAMES = {code: name for name, code in CLIPPING_CODES.items()}

#: Inspects one successful train reply against the arrays that were sent; returns the reason to
#: reject it, or None to accept it.
ReplyCheck = Callable[[Message, ArrayRecord], "str | None"]
#: Inspects the round's replies that passed every :data:`ReplyCheck` together (e.g. a norm far
#: above the others'); returns one reason to reject, or None, per reply.
RoundCheck = Callable[[Sequence[Message], ArrayRecord], "list[str | None]"]

#: Evaluation metrics only some tasks report (``privet.common.tasks``), averaged over the clients.
_TASK_METRICS = ("perplexity", "token-accuracy", "exact-match")

#: What marks the log lines a deployed coordinator shows on its console (``privet server`` reads
#: them from the ServerApp's log): a dropped reply, a round that was not aggregated, a site that
#: answered with an error (a refused run, a spent budget), named by the site.
REJECTED, NOT_AGGREGATED, ERRORED = (
    "rejected the update of",
    "not aggregated",
    "replied with an error",
)
NOTE_MARKS = (REJECTED, NOT_AGGREGATED, ERRORED)


@dataclass
class RoundRecord:
    """Everything measured in one round; one line of ``metrics.jsonl``."""

    round: int
    clients_trained: list[str] = field(default_factory=list)
    train_loss: float | None = None
    train_loss_per_client: dict[str, float] = field(default_factory=dict)
    epsilon_per_client: dict[str, float] = field(default_factory=dict)
    max_epsilon: float | None = None
    accuracy_per_client: dict[str, float] = field(default_factory=dict)
    client_accuracy: float | None = None
    server_accuracy: float | None = None
    server_loss: float | None = None
    #: The task's own metrics on the server's test set (a causal LM's ``perplexity``,
    #: ``token-accuracy``, ``exact-match``); empty for classification.
    server_metrics: dict[str, float] = field(default_factory=dict)
    #: The same metrics on the clients' tests, weighted by their test examples.
    client_metrics: dict[str, float] = field(default_factory=dict)
    #: A causal LM's greedy answers to the first few server test prompts (``prompt``, ``target``,
    #: ``generated``), for the report; empty for classification.
    server_samples: list[dict[str, str]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    #: The code of each error reply in ``errors`` (:class:`privet.common.protocol.ErrorCode`):
    #: how the server tells a budget refusal from a failure, whatever the reason says.
    error_codes: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    #: False when the round kept the previous global model (too few valid replies, or the
    #: strategy declined to aggregate, e.g. Krum with fewer than 2f+3 replies).
    aggregated: bool = True
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    federation_epsilon: float | None = None
    #: Largest cold start among this round's clients (a worker loading the model, a client
    #: tokenizing its data): part of ``seconds``, shown apart so round 1 is not misread.
    startup_seconds: float = 0.0
    #: Clients whose privacy ledger charged this round more than once (it was redone after a
    #: crash and resume): client -> how many times.
    charged_again: dict[str, int] = field(default_factory=dict)
    #: Training examples each client reported (``num-examples``): its sampling rate is the
    #: batch size over this count, as its own ledger has it (a site's data is not the server's).
    examples_per_client: dict[str, int] = field(default_factory=dict)
    #: The per-example clipping each DP client ran (``flat``, ``ghost``, ``bookkeeping``): what
    #: ``privacy.clipping = 'auto'`` resolved to on its device.
    clipping_per_client: dict[str, str] = field(default_factory=dict)
    #: Why the round kept the previous global model, when it did (``aggregated`` is False).
    skipped: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dictionary."""
        return dict(self.__dict__)


class RoundObserver(Protocol):
    """Receives progress events from the server loop (the CLI renders them)."""

    def run_started(self, *, rounds: int, clients: int, run_dir: Path) -> None:
        """Called once, before round 0's evaluation."""

    def round_started(self, server_round: int) -> None:
        """Called when a round's messages go out."""

    def round_finished(self, record: RoundRecord) -> None:
        """Called after a round was aggregated, evaluated and saved."""


class RecordingStrategy(WrappedStrategy):
    """Wrap ``inner``: record each reply per client, drop invalid replies, then let ``inner`` aggregate.

    Parameters
    ----------
    inner
        Any Flower Message-API strategy (FedAvg, FedAdam, a DP wrapper, ...).
    client_names
        Names indexed by the ``partition-id`` metric the ClientApp reports.
    observer
        Receives ``round_started``; the server loop reports ``round_finished``.
    checks
        Reply checks run on every successful train reply before aggregation; a reply any check
        rejects is dropped, logged and recorded in ``RoundRecord.rejected``.
    round_checks
        Run on the replies that passed ``checks``, together (a norm far above the others');
        rejections are handled the same way.
    min_replies
        Fewest valid replies a round aggregates (``federation.min_train_clients``); with fewer
        the global model stays as it was, ``RoundRecord.aggregated`` is False and
        ``RoundRecord.skipped`` says why.
    deployed
        Sites are real (``privet server``): a reply is named only by the name its node key was
        registered under, never by the ``partition-id`` it reports (a site could claim another's).

    """

    def __init__(
        self,
        inner: Strategy,
        *,
        client_names: list[str],
        observer: RoundObserver | None = None,
        checks: Iterable[ReplyCheck] = (),
        round_checks: Iterable[RoundCheck] = (),
        min_replies: int = 1,
        deployed: bool = False,
    ) -> None:
        super().__init__(inner)
        self.round_checks = list(round_checks)
        self.deployed = deployed
        self._grid: Grid | None = None
        self.min_replies = min_replies
        self.client_names = client_names
        self.observer = observer
        self.checks = list(checks)
        self.current = RoundRecord(round=0)
        self._round_start = time.perf_counter()
        self._sent = ArrayRecord()
        #: Deployed sites by node id: the names their keys were registered under.
        self.node_names: dict[int, str] = {}
        self._seen: dict[int, str] = {}  # simulated nodes by the client they reported playing

    def seconds_since_round_start(self) -> float:
        """Wall time since the current round's messages were built."""
        return time.perf_counter() - self._round_start

    def name_of(self, metrics: MetricRecord | None, node_id: int) -> str:
        """The client's name.

        In a deployment, the name its node key was registered under (``certs/nodes/NAME.pub``,
        authenticated by the SuperLink); in a simulation, the name of the ``partition-id`` its
        reply reports, remembered for the node (a simulated node keeps its client); else
        ``node-<id>``.
        """
        if self.deployed and node_id not in self.node_names and self._grid is not None:
            # A node that joined (or failed) after the round's list was read: ask again.
            self.learn_node_names(self._grid)
        if node_id in self.node_names:
            return self.node_names[node_id]
        if self.deployed:
            return f"node-{node_id}"
        if metrics is not None and PARTITION_ID in metrics:
            pid = int(metrics[PARTITION_ID])  # type: ignore[arg-type]
            if 0 <= pid < len(self.client_names):
                self._seen[node_id] = self.client_names[pid]
                return self.client_names[pid]
        return self._seen.get(node_id, f"node-{node_id}")

    def learn_node_names(self, grid: Grid) -> None:
        """Read the registered names of the grid's nodes (a deployed SuperLink knows them)."""
        try:
            nodes = list(grid.get_nodes())
        except Exception as exc:  # only the display name depends on it: never fail a round here
            log.debug("node names unavailable: %s", exc)
            return
        for node in nodes:
            name = getattr(node, "name", "")
            if name:
                self.node_names[int(node.node_id)] = str(name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Start a round's record, then let the wrapped strategy sample clients and build messages."""
        self.current = RoundRecord(round=server_round)
        self._round_start = time.perf_counter()
        self._sent = arrays
        self._grid = grid
        self.learn_node_names(grid)
        if self.observer is not None:
            self.observer.round_started(server_round)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        for msg in messages:
            # Every array record travels (FedEx-LoRA's residuals ride beside "arrays").
            self.current.bytes_sent += sum(
                r.count_bytes() for r in msg.content.array_records.values()
            )
        # Replies are checked against the adapter the clients received, which is not the whole
        # global state when a wrapper sends part of it apart (FedEx-LoRA's residuals).
        self._sent = next(
            (
                m.content.array_records[ARRAYS]
                for m in messages
                if ARRAYS in m.content.array_records
            ),
            arrays,
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record each reply (or error) per client, drop rejected ones, aggregate the rest."""
        rec = self.current
        kept: list[Message] = []
        candidates: list[tuple[str, Message]] = []
        for msg in replies:
            if msg.has_error():
                reason = msg.error.reason or f"error code {msg.error.code}"
                who = self.name_of(None, msg.metadata.src_node_id)
                rec.errors[who] = reason
                rec.error_codes[who] = int(msg.error.code)
                log.warning(
                    "round %d: %s %s (code %d): %s",
                    server_round,
                    who,
                    ERRORED,
                    msg.error.code,
                    reason,
                )
                # Flower's strategies skip error replies themselves; keep them so a DP wrapper sees
                # the true count of replies.
                kept.append(msg)
                continue
            metrics = msg.content.metric_records.get(METRICS)
            name = self.name_of(metrics, msg.metadata.src_node_id)
            if ARRAYS in msg.content.array_records:
                rec.bytes_received += msg.content.array_records[ARRAYS].count_bytes()
            rejection = self._first_rejection(msg)
            if rejection is None and any(name == other for other, _ in candidates):
                # One name, one vote: a second reply under a name already heard this round.
                rejection = f"a second reply under the name {name!r} in this round"
            if rejection is not None:
                self._reject(server_round, name, rejection)
                continue
            candidates.append((name, msg))
        for check in self.round_checks:
            try:
                reasons = check([m for _, m in candidates], self._sent)
            except Exception as exc:  # a malformed reply must not end the round
                reasons = [
                    f"the replies could not be compared ({type(exc).__name__}: {exc})"
                ] * len(candidates)
            for (name, _), why in zip(candidates, reasons, strict=True):
                if why:
                    self._reject(server_round, name, why)
            candidates = [c for c, r in zip(candidates, reasons, strict=True) if not r]
        losses: list[float] = []
        weights: list[float] = []
        for name, msg in candidates:
            kept.append(msg)
            metrics = msg.content.metric_records.get(METRICS)
            if metrics is None:
                continue
            rec.clients_trained.append(name)
            loss = float(metrics.get(TRAIN_LOSS, float("nan")))  # type: ignore[arg-type]
            rec.train_loss_per_client[name] = loss
            rec.epsilon_per_client[name] = float(metrics.get(EPSILON, 0.0))  # type: ignore[arg-type]
            rec.examples_per_client[name] = int(metrics.get(NUM_EXAMPLES, 0))  # type: ignore[arg-type]
            code = metrics.get(CLIPPING)
            if code:  # 0: trained without DP
                rec.clipping_per_client[name] = _CLIPPING_NAMES.get(int(code), f"code {code}")  # type: ignore[arg-type]
            attempt = int(metrics.get(PRIVACY_ATTEMPT, 1))  # type: ignore[arg-type]
            if attempt > 1:
                rec.charged_again[name] = attempt
            startup = float(metrics.get(STARTUP_SECONDS, 0.0))  # type: ignore[arg-type]
            rec.startup_seconds = max(rec.startup_seconds, startup)
            losses.append(loss)
            weights.append(float(metrics.get(NUM_EXAMPLES, 1)))  # type: ignore[arg-type]
        if losses:
            rec.train_loss = sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights)
        if rec.epsilon_per_client:
            rec.max_epsilon = max(rec.epsilon_per_client.values())
        valid = sum(1 for m in kept if not m.has_error())
        if valid < self.min_replies:
            rec.aggregated = False
            rec.skipped = (
                f"{valid} valid train replies, fewer than the {self.min_replies} needed "
                "(federation.min_train_clients)"
            )
            log.warning(
                "round %d: %s: %s; the global model stays",
                server_round,
                NOT_AGGREGATED,
                rec.skipped,
            )
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        rec.aggregated = arrays is not None
        return _same_dtypes(arrays, self._sent), metrics

    def _reject(self, server_round: int, name: str, reason: str) -> None:
        """Record and log (on the coordinator's console too) one dropped reply."""
        self.current.rejected[name] = reason
        log.warning("round %d: %s %s: %s", server_round, REJECTED, name, reason)

    def _first_rejection(self, msg: Message) -> str | None:
        """The first check's reason to reject ``msg``; a check that fails counts as a rejection."""
        for check in self.checks:
            try:
                reason = check(msg, self._sent)
            except Exception as exc:  # a malformed reply must not end the round
                reason = f"the reply could not be checked ({type(exc).__name__}: {exc})"
            if reason:
                return reason
        return None

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record each client's test accuracy, then let the wrapped strategy aggregate."""
        replies = list(replies)
        rec = self.current
        correct, total = 0.0, 0.0
        sums: dict[str, float] = {}
        for msg in replies:
            if msg.has_error():
                who = self.name_of(None, msg.metadata.src_node_id)
                rec.errors[f"{who}-eval"] = msg.error.reason or "error"
                continue
            metrics = msg.content.metric_records.get(METRICS)
            if metrics is None:
                continue
            name = self.name_of(metrics, msg.metadata.src_node_id)
            acc = float(metrics.get(ACCURACY, 0.0))  # type: ignore[arg-type]
            n = float(metrics.get(NUM_EXAMPLES, 0))  # type: ignore[arg-type]
            rec.accuracy_per_client[name] = acc
            correct += acc * n
            total += n
            for key in _TASK_METRICS:
                if key in metrics:
                    sums[key] = sums.get(key, 0.0) + float(metrics[key]) * n  # type: ignore[arg-type]
        if total > 0:
            rec.client_accuracy = correct / total
            rec.client_metrics = {k: v / total for k, v in sums.items()}
        return self.inner.aggregate_evaluate(server_round, replies)


def _same_dtypes(arrays: ArrayRecord | None, sent: ArrayRecord) -> ArrayRecord | None:
    """Cast aggregated arrays back to the dtypes that were sent.

    Flower's server optimizers (FedAdam, FedYogi, FedAdagrad) multiply float32 arrays by NumPy
    float64 scalars, which NumPy 2 promotes to float64; the next round would then send float64 and
    every client's float32 reply would fail the dtype check.
    """
    if arrays is None:
        return None
    out = ArrayRecord()
    for key, array in arrays.items():
        ref = sent.get(key)
        value = array.numpy()
        if ref is not None and value.dtype != ref.numpy().dtype:
            array = Array(np.ascontiguousarray(value.astype(ref.numpy().dtype)))
        out[key] = array
    return out
