"""The ClientApp: a thin adapter from Flower messages to :func:`train` and :func:`evaluate`.

Per process it loads the base model and tokenizer once and tokenizes its data once (a SuperNode or a
Ray actor serves many rounds); per message it only swaps the adapter weights in.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privet.client.client_level import client_level_mods
from privet.client.flower_door import Mod
from privet.client.privacy import ledger_path, plan_round, readout_direction, record_round
from privet.client.releases import load_release, release_fingerprint, save_release
from privet.client.secagg import secagg_mod
from privet.client.training import train
from privet.common.arrays import state_to_arrayrecord
from privet.common.config import PrivetConfig
from privet.common.data import ClientData, cached_federated_data
from privet.common.errors import BudgetExhaustedError, PrivetError
from privet.common.lora_residual import fold_residuals, message_residuals
from privet.common.model_pool import MODELS, Placement, current_placement
from privet.common.modeling import (
    BuiltModel,
    centered_readout,
    load_trainable_state,
    pick_device,
    readout_width,
)
from privet.common.privacy import Ledger
from privet.common.protocol import (
    ACCURACY,
    ARRAYS,
    CLIPPING,
    CLIPPING_CODES,
    CONFIG,
    EPSILON,
    EXAMPLES_SEEN,
    FINGERPRINT,
    LOSS,
    METRICS,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    PARTITION_ID,
    PRIVACY_ATTEMPT,
    PROXIMAL_MU,
    REPLAYED,
    RUN_DIR_KEY,
    SERVER_ROUND,
    STARTUP_SECONDS,
    TOTAL_ROUNDS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    ErrorCode,
    error_reason,
)
from privet.common.tasks import CausalLM, Task, TaskData, task_for
from privet.common.transport import Encoding, message_encoding, read_arrays, write_arrays

__all__ = ["ERROR_BUDGET", "ERROR_CLIENT", "RUN_KEY", "make_client_app", "message_partition"]

log = logging.getLogger("privet")

# Error codes in replies (Flower reserves small numbers for its own).
ERROR_BUDGET = int(ErrorCode.BUDGET)
ERROR_CLIENT = int(ErrorCode.CLIENT)

#: Run-config key naming the coordinator's run (its run directory; the same after a resume).
RUN_KEY = RUN_DIR_KEY


@dataclass
class _Loaded:
    built: BuiltModel
    device: torch.device
    data: ClientData
    train: TaskData
    test: TaskData
    fingerprint: str
    task: Task
    #: Seconds this message spent loading (model, data, tokenization); 0 when all was cached.
    load_seconds: float = 0.0


# One base model per process and device (a Ray worker serves many clients: only their adapters are
# swapped in; the in-process engine's ServerApp evaluates on the same object), from the process's
# pool (common/model_pool.py), and each client's tokenized data once. The data cache is bounded so
# that a worker serving a large population keeps memory flat; a client's data is small and cheap to
# tokenize again.
_data_cache: OrderedDict[tuple[str, int | str], tuple[ClientData, TaskData, TaskData]] = (
    OrderedDict()
)
_DATA_CACHE_SIZE = 256
#: The configuration this process last loaded for (its data cache belongs to it).
_loaded_config: list[str] = []
# Held while a message loads its model and data, never while it trains: the in-process engine's
# lanes train in parallel.
_lock = threading.Lock()

#: Changes a client's data after it is loaded (the simulation's label-flipping attackers).
DataHook = Callable[[int, ClientData], ClientData]


def _readout_direction(
    cfg: PrivetConfig,
    loaded: _Loaded,
    *,
    server_round: int,
    run: str | None,
    state_dir: Path,
    seed: int | None,
    min_noise_multiplier: float | None,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, float] | None:
    """The client's readout basis (``adapter.readout_center``), released once; else ``None``."""
    if not cfg.adapter.readout_center or not isinstance(loaded.task, CausalLM):
        return None
    task, model = loaded.task, loaded.built.model
    hidden = readout_width(model)
    if hidden is None:
        return None
    precision = "off" if cfg.privacy.enabled else cfg.model.mixed_precision

    def measure() -> torch.Tensor:
        return task.state_directions(
            model,
            loaded.train,
            pad_token_id=int(loaded.built.tokenizer.pad_token_id),
            device=loaded.device,
            mixed_precision=precision,
            batch_size=cfg.train.eval_batch_size,
            on_batch=on_batch,
        )

    return readout_direction(
        privacy=cfg.privacy,
        num_examples=len(loaded.train),
        hidden=hidden,
        key=loaded.fingerprint,
        measure=measure,
        state_dir=state_dir,
        client_id=loaded.data.name,
        server_round=server_round,
        run=run,
        seed=seed,
        min_noise_multiplier=min_noise_multiplier,
    )


def _load(
    cfg: PrivetConfig,
    partition_id: int,
    *,
    local: ClientData | None = None,
    data_hook: DataHook | None = None,
) -> _Loaded:
    start = time.perf_counter()
    task = task_for(cfg.model)
    key = cfg.model_dump_json()
    with _lock:
        if _loaded_config != [key]:
            # one federation per process: a new configuration starts with its own data and threads
            if cfg.train.num_threads is not None:
                torch.set_num_threads(cfg.train.num_threads)
            _data_cache.clear()
            _loaded_config[:] = [key]
        # a deployed client has its own data; the coordinator fixed the label count
        num_labels = (
            cached_federated_data(cfg.data).num_labels
            if local is None
            else cfg.data.num_labels or 2
        )
        # A lane of the in-process engine runs its clients on its own device; else the configured one.
        where = current_placement() or Placement(pick_device(cfg.model.device))
        model = MODELS.get(cfg, num_labels=num_labels, device=where.device, replica=where.replica)
        data_key: tuple[str, int | str] = (
            key,
            partition_id if local is None else f"local:{local.name}",
        )
        cached = _data_cache.get(data_key)
        if cached is None:
            if local is None:
                fed = cached_federated_data(cfg.data)
                if not 0 <= partition_id < len(fed.clients):
                    raise PrivetError(
                        f"this node has partition-id {partition_id}, the data has {len(fed.clients)} clients"
                    )
                data = fed.clients[partition_id]
            else:
                data = local
            if data_hook is not None:
                data = data_hook(partition_id, data)
            tok, ml = model.built.tokenizer, cfg.model.max_length
            cached = (
                data,
                task.tokenize(data.train, tok, max_length=ml),
                task.tokenize(data.test, tok, max_length=ml),
            )
            _data_cache[data_key] = cached
            while len(_data_cache) > _DATA_CACHE_SIZE:
                _data_cache.popitem(last=False)
        else:
            _data_cache.move_to_end(data_key)
        data, train_set, test_set = cached
        return _Loaded(
            built=model.built,
            device=model.device,
            data=data,
            train=train_set,
            test=test_set,
            fingerprint=model.fingerprint,
            task=task,
            load_seconds=time.perf_counter() - start,
        )


_clipping_logged: set[str] = set()


def _log_clipping(asked: str, ran: str, client: str, device: torch.device) -> None:
    """Say once per client which clipping ``privacy.clipping = 'auto'`` resolved to, and why."""
    if asked != "auto" or client in _clipping_logged:
        return
    _clipping_logged.add(client)
    why = (
        "CUDA, every trainable layer covered"
        if ran == "bookkeeping"
        else f"{device.type}: book-keeping runs on CUDA only when it covers every trainable layer"
    )
    log.info("client %s: privacy.clipping = 'auto' runs %s clipping (%s)", client, ran, why)


def message_partition(msg: Message, context: Context) -> int:
    """The partition (simulated client) a message is for.

    A simulation whose population is larger than its Flower nodes (``server/population.py``)
    names the client in the message's ``config`` record; otherwise it is the node's own.
    """
    conf = msg.content.config_records.get(CONFIG)
    if conf is not None and PARTITION_ID in conf:
        return int(str(conf[PARTITION_ID]))
    return int(context.node_config.get(PARTITION_ID, 0))


def _error_reply(msg: Message, partition: int, exc: Exception) -> Message:
    """Reply with an error the server can log: the budget's own code, else a generic one."""
    if isinstance(exc, BudgetExhaustedError):
        code, reason = ERROR_BUDGET, str(exc)
    elif isinstance(exc, PrivetError):
        code, reason = ERROR_CLIENT, str(exc)
    else:  # a bug or an environment failure: keep the traceback in this process's log
        log.error("client %s failed:\n%s", partition, traceback.format_exc())
        code, reason = ERROR_CLIENT, f"{type(exc).__name__}: {exc}"
    return Message(Error(code=code, reason=error_reason(partition, reason)), reply_to=msg)


def _kept_release(
    state_dir: Path, client_id: str, release: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The kept update for ``release`` when the ledger holds its charge, else ``None``."""
    path = ledger_path(state_dir, client_id)
    try:
        ledger = Ledger.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None  # no (readable) ledger: train as usual; plan_round fails closed if it must
    entry = ledger.released(release)
    if entry is None:
        return None
    kept = load_release(state_dir, client_id, release)
    if kept is None:
        return None
    metrics = dict(kept.metrics)
    metrics.update({EPSILON: ledger.epsilon(), REPLAYED: 1, STARTUP_SECONDS: 0.0})
    metrics.setdefault(CLIPPING, 0)  # kept before the key existed: the same keys as a trained reply
    return kept.state, metrics


def _train_reply(
    msg: Message,
    state: dict[str, torch.Tensor],
    metrics: dict[str, Any],
    encoding: Encoding,
    received: dict[str, torch.Tensor],
) -> Message:
    """A train reply holding ``state`` (encoded as the message was) and ``metrics``."""
    record = MetricRecord(metrics)
    if encoding == "float32":
        return Message(
            RecordDict({ARRAYS: state_to_arrayrecord(state), METRICS: record}), reply_to=msg
        )
    content = RecordDict({METRICS: record})
    write_arrays(content, state, encoding, reference=received)
    return Message(content, reply_to=msg)


class _Progress:
    """A simulated client's progress inside a round, as a small JSON file the console polls.

    ``progress/<client>.json`` under the state folder holds ``{"round", "step", "steps",
    "done", "unit"}`` (``unit``: what is counted, DP steps or, before training, the examples a
    centered readout has measured); written atomically at most twice a second, so the training
    loop barely notices.
    """

    def __init__(self, folder: Path, client: str, server_round: int) -> None:
        self.path = folder / f"{client}.json"
        self.round = server_round
        self.last = 0.0
        folder.mkdir(parents=True, exist_ok=True)
        self.write(0, 0, done=False)

    def write(self, step: int, steps: int, *, done: bool, unit: str = "steps") -> None:
        record = {"round": self.round, "step": step, "steps": steps, "done": done, "unit": unit}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            pass  # a progress display must never fail a round

    def step(self, step: int, steps: int, unit: str = "steps") -> None:
        now = time.monotonic()
        if step == steps or now - self.last >= 0.5:
            self.last = now
            self.write(step, steps, done=False, unit=unit)

    def measured(self, done: int, total: int) -> None:
        """Before training: the examples whose readout state is measured so far."""
        self.step(done, total, unit="examples measured")


def make_client_app(
    cfg: PrivetConfig,
    *,
    state_dir: Path,
    local: ClientData | None = None,
    train_mods: Sequence[Mod] = (),
    data_hook: DataHook | None = None,
    min_noise_multiplier: float | None = None,
    keep_releases: bool = False,
) -> ClientApp:
    """Build the ClientApp for a federation configured by ``cfg``.

    Parameters
    ----------
    cfg
        The federation's configuration (the client uses model, adapter, privacy, train, data).
    state_dir
        Folder for the clients' privacy ledgers; it must outlive the process.
    local
        A deployed client's own data (``privet client``): used instead of the ``partition-id``
        share of ``cfg.data``, and the DP sampling and noise are then seeded from the OS's secure
        random source, so no one who knows the configuration can predict (and subtract) the noise.
    train_mods
        Flower mods around the train function (the simulation's fault injection).
    data_hook
        Changes a client's data once, after loading (the simulation's label flipping).
    min_noise_multiplier
        The least noise a deployed site trains with (its policy; ``None``: no floor).
    keep_releases
        Keep each released update in ``state_dir`` and send it again, uncharged, when the same
        round comes again with the same inputs (``client/releases.py``). On for deployed sites;
        a simulation's redone round is charged again instead (its state folder belongs to one run,
        and keeping every simulated client's update would cost disk for a whole population).

    """
    app = ClientApp()

    # SecAgg+ outermost: the simulated faults, the clipping and the training all happen inside it.
    secagg = secagg_mod(required=cfg.privacy.secure_aggregation, sa=cfg.privacy.secagg)

    @app.train(mods=[secagg, *train_mods, *client_level_mods(cfg)])
    def _train(msg: Message, context: Context) -> Message:
        partition = message_partition(msg, context)
        progress: _Progress | None = None
        try:
            loaded = _load(cfg, partition, local=local, data_hook=data_hook)
            conf = msg.content.config_records[CONFIG]
            expected = str(conf.get(FINGERPRINT, loaded.fingerprint))
            if expected != loaded.fingerprint:
                raise PrivetError(
                    "this client's frozen weights differ from the server's (fingerprint "
                    f"{loaded.fingerprint} vs {expected}); averaging its update would be wrong",
                    fix="use the same model, adapter and train.seed on server and clients",
                )
            server_round = int(str(conf[SERVER_ROUND]))
            total_rounds = int(str(conf.get(TOTAL_ROUNDS, cfg.federation.rounds)))
            run = str(context.run_config[RUN_KEY]) if RUN_KEY in context.run_config else None
            if local is None:  # a simulation: the console shows steps inside the round
                progress = _Progress(state_dir / "progress", loaded.data.name, server_round)
            model = loaded.built.model
            # The weights exactly as this client decoded them: its update is relative to these.
            received = read_arrays(msg.content)
            encoding = message_encoding(msg.content)  # the reply travels as the message did
            release: str | None = None
            if keep_releases and cfg.privacy.enabled:
                release = release_fingerprint(
                    run=run,
                    server_round=server_round,
                    content=msg.content,
                    # What the update is computed from; not where the run is served or logged.
                    config_json=cfg.model_dump_json(
                        include={"model", "adapter", "privacy", "train"}
                    ),
                    client_id=loaded.data.name,
                    data=loaded.data.train,
                )
                again = _kept_release(state_dir, loaded.data.name, release)
                if again is not None:
                    state, kept_metrics = again
                    log.info(
                        "client %s: round %d asked again with the same inputs: sending the "
                        "update already released (no privacy charged)",
                        loaded.data.name,
                        server_round,
                    )
                    return _train_reply(msg, state, kept_metrics, encoding, received)
            load_trainable_state(model, received)
            # FedEx-LoRA's residuals into the frozen base weights (none: the base as built).
            fold_residuals(model, message_residuals(msg.content))
            plan_start = time.perf_counter()
            basis = _readout_direction(
                cfg,
                loaded,
                server_round=server_round,
                run=run,
                state_dir=state_dir,
                seed=None if local is not None else cfg.train.seed * 1_000_003 + partition * 10_007,
                min_noise_multiplier=min_noise_multiplier,
                on_batch=progress.measured if progress is not None else None,
            )
            plan = plan_round(
                privacy=cfg.privacy,
                train=cfg.train,
                num_examples=len(loaded.train),
                total_rounds=total_rounds,
                state_dir=state_dir,
                client_id=loaded.data.name,
                min_noise_multiplier=min_noise_multiplier,
            )
            # A client's first round calibrates its noise (seconds with the RDP accountant): a
            # one-time cost like the model load, reported with it.
            startup = loaded.load_seconds + (time.perf_counter() - plan_start)
            direction, scale = basis if basis is not None else (None, 1.0)
            with centered_readout(model, direction, scale):
                result = train(
                    model,
                    loaded.train,
                    cfg.train,
                    dp=plan.dp,
                    pad_token_id=int(loaded.built.tokenizer.pad_token_id),
                    device=loaded.device,
                    mixed_precision=cfg.model.mixed_precision,
                    # A different sampling/noise stream for every client and round.
                    seed=cfg.train.seed * 1_000_003 + partition * 10_007 + server_round
                    if local is None
                    else secrets.randbits(62),
                    # Flower's FedProx sends its mu in the train config; other strategies send none.
                    proximal_mu=float(conf.get(PROXIMAL_MU, 0.0)),  # type: ignore[arg-type]
                    on_step=progress.step if progress is not None else None,
                    task=loaded.task,
                )
            epsilon = record_round(
                plan, server_round=server_round, result=result, run=run, release=release
            )
        except Exception as exc:  # every failure becomes an error reply the server logs
            if progress is not None:
                progress.write(0, 0, done=True)
            return _error_reply(msg, partition, exc)
        if progress is not None:
            progress.write(result.steps, result.steps, done=True)
        metrics: dict[str, Any] = {
            NUM_EXAMPLES: result.num_examples,
            # deployed clients are named by node id on the server, not by a data share
            **({PARTITION_ID: partition} if local is None else {}),
            TRAIN_LOSS: result.train_loss,
            "steps": result.steps,
            EXAMPLES_SEEN: result.examples_seen,
            EPSILON: epsilon,
            # 2, 3, ...: this round was redone after a resume and charged again.
            PRIVACY_ATTEMPT: plan.ledger.entries[-1].attempt
            if plan.ledger is not None and plan.ledger.entries
            else 1,
            NOISE_MULTIPLIER: plan.dp.noise_multiplier if plan.dp else 0.0,
            TRAIN_SECONDS: result.seconds,
            # Cold start of this worker (model load) or of this client (tokenization, noise
            # calibration), reported apart so that start-up does not hide in round 1's time.
            STARTUP_SECONDS: startup,
        }
        # Every reply carries the key (Flower aggregates only metrics whose keys agree).
        metrics[CLIPPING] = CLIPPING_CODES.get(result.clipping or "", 0)
        if result.clipping is not None:
            _log_clipping(cfg.privacy.clipping, result.clipping, loaded.data.name, loaded.device)
        if release is not None:
            # After the ledger holds the charge: a kept update is always one that was paid for.
            try:
                save_release(
                    state_dir, loaded.data.name, release, state=result.state, metrics=metrics
                )
            except OSError as exc:  # not kept: a redo of this round is charged again, no more
                log.warning("could not keep the released update of round %d: %s", server_round, exc)
        return _train_reply(msg, result.state, metrics, encoding, received)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        partition = message_partition(msg, context)
        try:
            loaded = _load(cfg, partition, local=local, data_hook=data_hook)
            model = loaded.built.model
            load_trainable_state(model, read_arrays(msg.content))
            fold_residuals(model, message_residuals(msg.content))
            res = loaded.task.evaluate(
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
                NUM_EXAMPLES: max(res.num_examples, 1),
                # deployed clients are named by node id on the server, not by a data share
                **({PARTITION_ID: partition} if local is None else {}),
                ACCURACY: res.accuracy if res.num_examples else 0.0,
                LOSS: res.loss if res.num_examples else 0.0,
                # the task's own metrics (a causal LM's perplexity, token accuracy, exact match)
                **(res.metrics if res.num_examples else {}),
            }
        )
        return Message(RecordDict({METRICS: metrics}), reply_to=msg)

    return app
