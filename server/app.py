"""The ServerApp: Flower's Message-API FedAvg, plus what a run needs around it.

Around the strategy privet adds: per-client bookkeeping of every reply (metrics, errors, bytes),
server-side evaluation on the held-out test set, a checkpoint and one ``metrics.jsonl`` line per
round, and the final adapter saved with PEFT's ``save_pretrained``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from privet.common.arrays import arrayrecord_to_state, state_to_arrayrecord
from privet.common.config import PrivetConfig
from privet.common.data import TokenizedExamples, cached_federated_data
from privet.common.evaluation import evaluate
from privet.common.modeling import (
    MaskedMeanPooler,
    build_model,
    frozen_fingerprint,
    load_trainable_state,
    pick_device,
    trainable_state,
)
from privet.server.rundir import append_metrics, save_checkpoint, write_json

__all__ = ["RoundObserver", "RoundRecord", "TrackingFedAvg", "make_server_app"]

log = logging.getLogger("privet")


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
    errors: dict[str, str] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0

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


class TrackingFedAvg(FedAvg):
    """Flower's FedAvg, recording each reply per client before the usual aggregation.

    The aggregation itself is Flower's; this subclass only observes messages so the run can report
    per-client metrics, errors and bytes on the wire.
    """

    def __init__(
        self, *, client_names: list[str], observer: RoundObserver | None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.client_names = client_names
        self.observer = observer
        self.current = RoundRecord(round=0)
        self._round_start = time.perf_counter()

    def seconds_since_round_start(self) -> float:
        """Wall time since the current round's messages were built."""
        return time.perf_counter() - self._round_start

    def _name(self, metrics: MetricRecord | None, node_id: int) -> str:
        if metrics is not None and "partition-id" in metrics:
            pid = int(metrics["partition-id"])  # type: ignore[arg-type]
            if 0 <= pid < len(self.client_names):
                return self.client_names[pid]
        return f"node-{node_id}"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Start a round's record, then let FedAvg sample clients and build the messages."""
        self.current = RoundRecord(round=server_round)
        self._round_start = time.perf_counter()
        if self.observer is not None:
            self.observer.round_started(server_round)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.current.bytes_sent += arrays.count_bytes() * len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record each reply (or error) per client, then aggregate with FedAvg."""
        replies = list(replies)
        rec = self.current
        losses, weights = [], []
        for msg in replies:
            if msg.has_error():
                reason = msg.error.reason or f"error code {msg.error.code}"
                rec.errors[f"node-{msg.metadata.src_node_id}"] = reason
                log.warning("round %d: client replied with an error: %s", server_round, reason)
                continue
            metrics = msg.content.metric_records.get("metrics")
            name = self._name(metrics, msg.metadata.src_node_id)
            if "arrays" in msg.content.array_records:
                rec.bytes_received += msg.content.array_records["arrays"].count_bytes()
            if metrics is None:
                continue
            rec.clients_trained.append(name)
            loss = float(metrics.get("train-loss", float("nan")))  # type: ignore[arg-type]
            rec.train_loss_per_client[name] = loss
            rec.epsilon_per_client[name] = float(metrics.get("epsilon", 0.0))  # type: ignore[arg-type]
            losses.append(loss)
            weights.append(float(metrics.get("num-examples", 1)))  # type: ignore[arg-type]
        if losses:
            rec.train_loss = sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights)
        if rec.epsilon_per_client:
            rec.max_epsilon = max(rec.epsilon_per_client.values())
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Record each client's test accuracy, then aggregate with FedAvg."""
        replies = list(replies)
        rec = self.current
        correct, total = 0.0, 0.0
        for msg in replies:
            if msg.has_error():
                rec.errors[f"node-{msg.metadata.src_node_id}-eval"] = msg.error.reason or "error"
                continue
            metrics = msg.content.metric_records.get("metrics")
            if metrics is None:
                continue
            name = self._name(metrics, msg.metadata.src_node_id)
            acc = float(metrics.get("accuracy", 0.0))  # type: ignore[arg-type]
            n = float(metrics.get("num-examples", 0))  # type: ignore[arg-type]
            rec.accuracy_per_client[name] = acc
            correct += acc * n
            total += n
        if total > 0:
            rec.client_accuracy = correct / total
        return super().aggregate_evaluate(server_round, replies)


def make_server_app(
    cfg: PrivetConfig, *, run_dir: Path, observer: RoundObserver | None = None
) -> ServerApp:
    """Build the ServerApp of a federation configured by ``cfg`` that writes into ``run_dir``."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        fed = cached_federated_data(cfg.data)
        names = [c.name for c in fed.clients]
        built = build_model(cfg.model, cfg.adapter, num_labels=fed.num_labels, seed=cfg.train.seed)
        device = pick_device(cfg.model.device)
        model = built.model.to(device)
        test = TokenizedExamples(fed.server_test, built.tokenizer, max_length=cfg.model.max_length)
        pad = int(built.tokenizer.pad_token_id)
        if observer is not None:
            observer.run_started(rounds=cfg.federation.rounds, clients=len(names), run_dir=run_dir)

        fed_cfg = cfg.federation
        strategy = TrackingFedAvg(
            client_names=names,
            observer=observer,
            fraction_train=fed_cfg.fraction_train,
            fraction_evaluate=fed_cfg.fraction_evaluate,
            min_train_nodes=min(fed_cfg.min_train_clients, len(names)),
            min_evaluate_nodes=min(fed_cfg.min_train_clients, len(names))
            if fed_cfg.fraction_evaluate
            else 0,
            min_available_nodes=min(fed_cfg.min_available_clients, len(names)),
        )

        history: list[RoundRecord] = []
        # The global adapter as of the last round; Flower's Result holds no arrays when no round
        # produced an aggregate (every client refused), and the run must still end with one.
        latest: dict[str, dict[str, torch.Tensor]] = {}

        def _evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            state = arrayrecord_to_state(arrays)
            latest["state"] = state
            load_trainable_state(model, state)
            rec = strategy.current if server_round > 0 else RoundRecord(round=0)
            if fed_cfg.server_evaluation:
                res = evaluate(
                    model,
                    test,
                    batch_size=cfg.train.eval_batch_size,
                    pad_token_id=pad,
                    device=device,
                    mixed_precision=cfg.model.mixed_precision,
                )
                rec.server_accuracy, rec.server_loss = res.accuracy, res.loss
            if server_round > 0:
                save_checkpoint(run_dir, server_round, state)
                rec.seconds = strategy.seconds_since_round_start()
            append_metrics(run_dir, rec.as_json())
            history.append(rec)
            if observer is not None:
                observer.round_finished(rec)
            if rec.server_accuracy is None:
                return None
            return MetricRecord(
                {"accuracy": rec.server_accuracy, "loss": float(rec.server_loss or 0.0)}
            )

        train_config = ConfigRecord(
            {"total-rounds": fed_cfg.rounds, "fingerprint": frozen_fingerprint(model)}
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=state_to_arrayrecord(trainable_state(model)),
            num_rounds=fed_cfg.rounds,
            timeout=fed_cfg.round_timeout,
            train_config=train_config,
            evaluate_fn=_evaluate,
        )
        final = arrayrecord_to_state(result.arrays) if len(result.arrays) else latest["state"]
        load_trainable_state(model, final)
        _save_final(model, run_dir / "final_adapter", cfg)
        write_json(run_dir / "summary.json", _summary(history))

    return app


def _save_final(model: torch.nn.Module, out: Path, cfg: PrivetConfig) -> None:
    """PEFT's own format, so ``PeftModel.from_pretrained(base, out)`` loads it; full weights otherwise."""
    model = model.to("cpu")
    save_pretrained = getattr(model, "save_pretrained", None)
    if hasattr(model, "peft_config") and callable(save_pretrained):
        save_pretrained(str(out))
    else:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in trainable_state(model).items()},
            str(out / "trainable.safetensors"),
        )
    # What a reader needs to rebuild the base model the adapter was trained on.
    write_json(
        out / "privet.json",
        {
            "base_model": cfg.model.name,
            "num_hidden_layers": cfg.model.num_hidden_layers,
            "mean_pooling": any(isinstance(m, MaskedMeanPooler) for m in model.modules()),
            "max_length": cfg.model.max_length,
        },
    )


def _summary(history: list[RoundRecord]) -> dict[str, Any]:
    initial = history[0] if history and history[0].round == 0 else None
    last = history[-1] if history else None
    eps = [r.max_epsilon for r in history if r.max_epsilon is not None]
    return {
        "rounds": len([r for r in history if r.round > 0]),
        "initial_server_accuracy": initial.server_accuracy if initial else None,
        "final_server_accuracy": last.server_accuracy if last else None,
        "final_client_accuracy": last.client_accuracy if last else None,
        "max_epsilon": max(eps) if eps else None,
        "errors": {r.round: r.errors for r in history if r.errors},
        "seconds": sum(r.seconds for r in history),
    }
