"""The ClientApp: a thin adapter from Flower messages to :func:`train` and :func:`evaluate`.

Per process it loads the base model and tokenizer once and tokenizes its data once (a SuperNode or a
Ray actor serves many rounds); per message it only swaps the adapter weights in.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from privet.client.client_level import client_level_mods
from privet.client.privacy import plan_round, record_round
from privet.client.training import evaluate, train
from privet.common.arrays import arrayrecord_to_state, state_to_arrayrecord
from privet.common.config import PrivetConfig
from privet.common.data import ClientData, TokenizedExamples, cached_federated_data
from privet.common.errors import BudgetExhaustedError, PrivetError
from privet.common.modeling import (
    BuiltModel,
    build_model,
    frozen_fingerprint,
    load_trainable_state,
    pick_device,
)

__all__ = ["ERROR_BUDGET", "ERROR_CLIENT", "make_client_app"]

log = logging.getLogger("privet")

# Error codes in replies (Flower reserves small numbers for its own).
ERROR_BUDGET = 1001
ERROR_CLIENT = 1002


@dataclass
class _Loaded:
    built: BuiltModel
    device: torch.device
    data: ClientData
    train: TokenizedExamples
    test: TokenizedExamples
    fingerprint: str


#: Changes a client's data after it is loaded (the simulation's label-flipping attackers).
DataHook = Callable[[int, ClientData], ClientData]

_cache: dict[tuple[str, int], _Loaded] = {}
# One model per configuration, shared by the partitions this process serves (a Ray worker serves
# many, one message at a time; every message loads its adapter first).
_models: dict[str, tuple[BuiltModel, torch.device, str]] = {}
_lock = threading.Lock()


def _load(cfg: PrivetConfig, partition_id: int, data_hook: DataHook | None = None) -> _Loaded:
    cfg_key = cfg.model_dump_json()
    key = (cfg_key, partition_id)
    with _lock:
        if key not in _cache:
            if cfg.train.num_threads is not None:
                torch.set_num_threads(cfg.train.num_threads)
            fed = cached_federated_data(cfg.data)
            if not 0 <= partition_id < len(fed.clients):
                raise PrivetError(
                    f"this node has partition-id {partition_id}, the data has {len(fed.clients)} clients"
                )
            data = fed.clients[partition_id]
            if data_hook is not None:
                data = data_hook(partition_id, data)
            if cfg_key not in _models:
                # one federation per process: drop models and data of older configs
                _models.clear()
                _cache.clear()
                built = build_model(
                    cfg.model, cfg.adapter, num_labels=fed.num_labels, seed=cfg.train.seed
                )
                device = pick_device(cfg.model.device)
                built.model.to(device)
                _models[cfg_key] = (built, device, frozen_fingerprint(built.model))
            built, device, fingerprint = _models[cfg_key]
            tok, ml = built.tokenizer, cfg.model.max_length
            _cache[key] = _Loaded(
                built=built,
                device=device,
                data=data,
                train=TokenizedExamples(data.train, tok, max_length=ml),
                test=TokenizedExamples(data.test, tok, max_length=ml),
                fingerprint=fingerprint,
            )
        return _cache[key]


def _error_reply(msg: Message, partition: int, exc: Exception) -> Message:
    """Reply with an error the server can log: the budget's own code, else a generic one."""
    if isinstance(exc, BudgetExhaustedError):
        code, reason = ERROR_BUDGET, str(exc)
    elif isinstance(exc, PrivetError):
        code, reason = ERROR_CLIENT, str(exc)
    else:  # a bug or an environment failure: keep the traceback in this process's log
        log.error("client %s failed:\n%s", partition, traceback.format_exc())
        code, reason = ERROR_CLIENT, f"{type(exc).__name__}: {exc}"
    return Message(Error(code=code, reason=f"[{partition}] {reason}"), reply_to=msg)


def make_client_app(
    cfg: PrivetConfig,
    *,
    state_dir: Path,
    train_mods: Sequence[Mod] = (),
    data_hook: DataHook | None = None,
) -> ClientApp:
    """Build the ClientApp for a federation configured by ``cfg``.

    Parameters
    ----------
    cfg
        The federation's configuration (the client uses model, adapter, privacy, train, data).
    state_dir
        Folder for the clients' privacy ledgers; it must outlive the process.
    train_mods
        Flower mods around the train function (the simulation's fault injection).
    data_hook
        Changes a client's data once, after loading (the simulation's label flipping).

    """
    app = ClientApp()

    @app.train(mods=[*train_mods, *client_level_mods(cfg)])
    def _train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config.get("partition-id", 0))
        try:
            loaded = _load(cfg, partition, data_hook)
            conf = msg.content.config_records["config"]
            expected = str(conf.get("fingerprint", loaded.fingerprint))
            if expected != loaded.fingerprint:
                raise PrivetError(
                    "this client's frozen weights differ from the server's (fingerprint "
                    f"{loaded.fingerprint} vs {expected}); averaging its update would be wrong",
                    fix="use the same model, adapter and train.seed on server and clients",
                )
            server_round = int(str(conf["server-round"]))
            total_rounds = int(str(conf.get("total-rounds", cfg.federation.rounds)))
            model = loaded.built.model
            load_trainable_state(model, arrayrecord_to_state(msg.content.array_records["arrays"]))
            plan = plan_round(
                privacy=cfg.privacy,
                train=cfg.train,
                num_examples=len(loaded.train),
                total_rounds=total_rounds,
                state_dir=state_dir,
                client_id=loaded.data.name,
            )
            result = train(
                model,
                loaded.train,
                cfg.train,
                dp=plan.dp,
                pad_token_id=int(loaded.built.tokenizer.pad_token_id),
                device=loaded.device,
                mixed_precision=cfg.model.mixed_precision,
                # A different sampling/noise stream for every client and round.
                seed=cfg.train.seed * 1_000_003 + partition * 10_007 + server_round,
                # Flower's FedProx sends its mu in the train config; other strategies send none.
                proximal_mu=float(conf.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
            )
            epsilon = record_round(plan, server_round=server_round, result=result)
        except Exception as exc:  # every failure becomes an error reply the server logs
            return _error_reply(msg, partition, exc)
        metrics = MetricRecord(
            {
                "num-examples": result.num_examples,
                "partition-id": partition,
                "train-loss": result.train_loss,
                "steps": result.steps,
                "examples-seen": result.examples_seen,
                "epsilon": epsilon,
                "noise-multiplier": plan.dp.noise_multiplier if plan.dp else 0.0,
                "train-seconds": result.seconds,
            }
        )
        arrays = state_to_arrayrecord(result.state)
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        partition = int(context.node_config.get("partition-id", 0))
        try:
            loaded = _load(cfg, partition, data_hook)
            model = loaded.built.model
            load_trainable_state(model, arrayrecord_to_state(msg.content.array_records["arrays"]))
            res = evaluate(
                model,
                loaded.test,
                batch_size=cfg.train.eval_batch_size,
                pad_token_id=int(loaded.built.tokenizer.pad_token_id),
                device=loaded.device,
                mixed_precision=cfg.model.mixed_precision,
            )
        except Exception as exc:  # every failure becomes an error reply the server logs
            return _error_reply(msg, partition, exc)
        metrics = MetricRecord(
            {
                "num-examples": max(res.num_examples, 1),
                "partition-id": partition,
                "accuracy": res.accuracy if res.num_examples else 0.0,
                "loss": res.loss if res.num_examples else 0.0,
            }
        )
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app
