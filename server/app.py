"""The ServerApp: the configured Flower strategy, plus what a run needs around it.

Around the strategy (``server/strategies.py``) privet adds: per-client bookkeeping and validation of
every reply (``server/recording.py``), its own round loop (``server/loop.py``), server-side
evaluation on the held-out test set, a checkpoint and one ``metrics.jsonl`` line per round, and the
final adapter saved with PEFT's ``save_pretrained``.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from privet.common.arrays import arrayrecord_to_state, state_to_arrayrecord
from privet.common.config import PrivetConfig
from privet.common.data import cached_federated_data
from privet.common.lora_residual import global_state, load_global_state, save_residual_file
from privet.common.model_pool import ModelPool
from privet.common.modeling import (
    MaskedMeanPooler,
    frozen_fingerprint,
    pick_device,
    trainable_state,
)
from privet.common.protocol import FINGERPRINT, TOTAL_ROUNDS
from privet.common.tasks import task_for
from privet.server.loop import run_rounds
from privet.server.population import PopulationGrid
from privet.server.privacy import (
    FederationBudgetExhausted,
    client_level_of,
    wrap_client_level_dp,
)
from privet.server.recording import RecordingStrategy, RoundObserver, RoundRecord
from privet.server.resume import restore_server_state, save_server_state
from privet.server.rundir import (
    LABELS_FILE,
    append_metrics,
    checkpoint_path,
    load_checkpoint,
    resume_point,
    save_checkpoint,
    write_json,
)
from privet.server.rundir.privacy_report import privacy_report
from privet.server.secagg import SecAggGrid
from privet.server.strategies import build_strategy
from privet.server.tracking import Tracking, check_tracking, with_tracking
from privet.server.transport import TransportGrid
from privet.server.validation import make_reply_checks, make_round_checks

__all__ = ["make_server_app"]

log = logging.getLogger("privet")

#: TESTING ONLY. ``privet server --test-pause-after-replies R`` (a hidden option) sets this
#: variable; the deployed ServerApp then stops for good once the train replies of round R are in,
#: before round R is aggregated or recorded, and writes ``flower/test-paused-round-R`` so that a
#: test can kill the coordinator exactly there: the sites released (and were charged for) round R,
#: the run directory does not know it. That is the window a coordinator crash must not turn into
#: a second charge (``client/releases.py``), and a kill by timing alone hits it only by chance.
TEST_PAUSE_ENV = "PRIVET_TEST_PAUSE_AFTER_REPLIES"


def _test_pause(run_dir: Path) -> Callable[[int], None] | None:
    """The test-only pause of :data:`TEST_PAUSE_ENV`, or None (the variable is not set)."""
    raw = os.environ.get(TEST_PAUSE_ENV, "").strip()
    if not raw:
        return None
    pause_round = int(raw)

    def pause(server_round: int) -> None:
        if server_round != pause_round:
            return
        log.warning("TESTING: paused after the train replies of round %d", server_round)
        marker = run_dir / "flower" / f"test-paused-round-{server_round}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()), encoding="utf-8")
        threading.Event().wait()  # until the test kills the coordinator

    return pause


def make_server_app(
    cfg: PrivetConfig,
    *,
    run_dir: Path,
    observer: RoundObserver | None = None,
    resume: bool = False,
    simulated_nodes: int | None = None,
    deployed: bool = False,
    models: ModelPool | None = None,
) -> ServerApp:
    """Build the ServerApp of a federation configured by ``cfg`` that writes into ``run_dir``.

    With ``resume`` it continues a run that stopped: from the round after the last one with both a
    checkpoint and a metrics line, with that round's global adapter (``server/rundir.py``).
    ``simulated_nodes`` (a simulation with fewer Flower nodes than clients) makes the strategy see
    the whole population while those nodes play the sampled clients (``server/population.py``).
    ``deployed`` (``privet server``) turns ``federation.update_norm_factor = 'auto'`` on.
    ``models`` (the in-process engine, whose clients run in this process): evaluate on the base
    model the clients use, from this pool, instead of building a second one.
    """
    check_tracking(cfg.tracking)  # a missing tracker package stops here, before any round
    observer = with_tracking(cfg, run_dir=run_dir, observer=observer)
    app = ServerApp()

    def _run(grid: Grid, context: Context) -> None:
        fed = cached_federated_data(cfg.data)
        names = [c.name for c in fed.clients]
        # The class names the labels were mapped from, for people and for `privet export`.
        write_json(
            run_dir / LABELS_FILE,
            {"num_labels": fed.num_labels, "label_names": list(fed.label_names or [])},
        )
        task = task_for(cfg.model)
        device = pick_device(cfg.model.device)
        if models is None:
            built = task.build_model(
                cfg.model, cfg.adapter, num_labels=fed.num_labels, seed=cfg.train.seed
            )
        else:
            # The clients' own base model (the in-process engine). Sharing it is exact: whoever uses
            # it loads its global state first. The server loads the adapter and folds FedEx-LoRA's
            # residuals (load_global_state) before each evaluation; a client loads the adapter and
            # folds the residuals its message carries before it trains or evaluates, and a fold
            # first restores the base weights as built (lora_residual.py), so neither ever sees
            # what the other left. The frozen LoRA weights and head, which the fingerprint covers,
            # are never written. fresh: the run starts from the model as built, not from the
            # adapter an earlier run in this process left in it.
            pooled = models.get(cfg, num_labels=fed.num_labels, device=device, fresh=True)
            built, device = pooled.built, pooled.device
        model = built.model.to(device)
        test = task.tokenize(fed.server_test, built.tokenizer, max_length=cfg.model.max_length)
        pad = int(built.tokenizer.pad_token_id)
        if observer is not None:
            observer.run_started(rounds=cfg.federation.rounds, clients=len(names), run_dir=run_dir)

        fed_cfg = cfg.federation
        inner = build_strategy(fed_cfg, num_clients=len(names), aggregation=cfg.aggregation)
        inner = wrap_client_level_dp(inner, cfg, num_clients=len(names), run_dir=run_dir)
        strategy = RecordingStrategy(
            inner,
            client_names=names,
            observer=observer,
            checks=make_reply_checks(
                max_update_norm=fed_cfg.max_update_norm,
                max_examples={i: len(c.train) for i, c in enumerate(fed.clients)},
                max_per_client=fed_cfg.max_examples_per_client,
            ),
            # Under SecAgg+ every reply carries the same unmasked mean: nothing to compare.
            round_checks=make_round_checks(
                norm_factor=None
                if cfg.privacy.secure_aggregation
                else fed_cfg.norm_factor(deployed=deployed)
            ),
            min_replies=fed_cfg.min_train_clients,
            deployed=deployed,
        )
        client_level = client_level_of(inner)

        history: list[RoundRecord] = []
        first_round = 1
        if resume:
            done, kept = resume_point(run_dir)
            known = set(RoundRecord.__dataclass_fields__)
            history = [RoundRecord(**{k: v for k, v in rec.items() if k in known}) for rec in kept]
            if done > 0:
                # The checkpoint's global state: adapter plus any FedEx-LoRA residuals.
                load_global_state(model, load_checkpoint(checkpoint_path(run_dir, done)))
                # Server optimizer moments, adaptive clip, client-sampling RNG (fail-closed).
                restore_server_state(run_dir, done, strategy)
                first_round = done + 1
                log.info("resuming after round %d of %d", done, fed_cfg.rounds)
        if simulated_nodes is not None and simulated_nodes < len(names):
            # Innermost, on Flower's own grid: it pushes and pulls itself to track busy nodes.
            grid = PopulationGrid(grid, population=len(names), nodes=simulated_nodes)
        wire = TransportGrid(grid, fed_cfg.transport) if fed_cfg.transport != "float32" else None
        if wire is not None:
            grid = wire
        secagg: SecAggGrid | None = None
        if cfg.privacy.secure_aggregation:
            sa = cfg.privacy.secagg
            grid = secagg = SecAggGrid(
                grid,
                sa,
                uniform_weights=cfg.privacy.client_level.enabled,
                max_weight=sa.max_weight or max(1000, *(len(c.train) for c in fed.clients)),
                timeout=fed_cfg.round_timeout,
                client_clipping=cfg.privacy.client_level.enabled,
            )
        counter = wire or secagg

        def _round_end(server_round: int, arrays: ArrayRecord) -> None:
            if server_round == first_round - 1 and first_round > 1:
                return  # resumed: this round is already evaluated and recorded
            state = arrayrecord_to_state(arrays)
            load_global_state(model, state)
            rec = strategy.current if server_round > 0 else RoundRecord(round=0)
            if fed_cfg.server_evaluation:
                res = task.evaluate(
                    model,
                    test,
                    batch_size=cfg.train.eval_batch_size,
                    pad_token_id=pad,
                    device=device,
                    mixed_precision=cfg.model.mixed_precision,
                )
                rec.server_accuracy, rec.server_loss = res.accuracy, res.loss
                rec.server_metrics = dict(res.metrics)
                rec.server_samples = task.samples(
                    model,
                    fed.server_test,
                    built.tokenizer,
                    max_length=cfg.model.max_length,
                    device=device,
                )
            if counter is not None and server_round > 0:
                # What travelled encoded (or masked), not the float32 arrays the strategy handled.
                rec.bytes_sent, rec.bytes_received = counter.take_byte_counts()
            if server_round > 0:
                # Before the adapter: a round whose checkpoint exists has its server state too.
                save_server_state(run_dir, server_round, strategy)
                save_checkpoint(run_dir, server_round, state)
                rec.seconds = strategy.seconds_since_round_start()
                if client_level is not None:
                    rec.federation_epsilon = client_level.epsilon()
            append_metrics(run_dir, rec.as_json())
            history.append(rec)
            if observer is not None:
                observer.round_finished(rec)

        train_config = ConfigRecord(
            {TOTAL_ROUNDS: fed_cfg.rounds, FINGERPRINT: frozen_fingerprint(model)}
        )
        stopped: str | None = None
        try:
            final = run_rounds(
                strategy,
                grid,
                arrays=state_to_arrayrecord(global_state(model)),
                first_round=first_round,
                min_nodes=fed_cfg.min_available_clients,
                last_round=fed_cfg.rounds,
                timeout=fed_cfg.round_timeout,
                train_config=train_config,
                on_round_end=_round_end,
                after_replies=_test_pause(run_dir) if deployed else None,
            )
        except FederationBudgetExhausted as exc:
            # Refused before any client was asked: the model after the last round is the result.
            stopped = str(exc)
            log.warning("stopping: %s", stopped)
            final = state_to_arrayrecord(global_state(model))
            append_metrics(run_dir, {"round": strategy.current.round, "stopped": stopped})
        load_global_state(model, arrayrecord_to_state(final))
        _save_final(model, run_dir / "final_adapter", cfg)
        if models is not None:
            model.to(device)  # saving moved it to the CPU; the pool's model stays where it lives
        report = privacy_report(
            cfg,
            history=history,
            client_names=names,
            examples_per_client={c.name: len(c.train) for c in fed.clients},
            client_level=client_level,
            stopped=stopped,
        )
        write_json(run_dir / "privacy.json", report)
        summary = _summary(history)
        summary["stopped"] = stopped
        summary["federation_epsilon"] = report["client_level"].get("final_epsilon")
        write_json(run_dir / "summary.json", summary)
        if isinstance(observer, Tracking):
            observer.close(final_adapter=run_dir / "final_adapter")

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        if simulated_nodes is None:
            # A deployment: Flower samples clients with Python's `random`, seeded by the OS, so
            # no one who knows the configuration can predict which sites a round asks.
            _run(grid, context)
            return
        # A simulation repeats: its clients' batches and noise are seeded from train.seed, and so
        # is the client sampling here; the caller's RNG is given back afterwards.
        caller = random.getstate()
        random.seed(cfg.train.seed)
        try:
            _run(grid, context)
        finally:
            random.setstate(caller)

    return app


def _save_final(model: torch.nn.Module, out: Path, cfg: PrivetConfig) -> None:
    """PEFT's own format, so ``PeftModel.from_pretrained(base, out)`` loads it; full weights otherwise."""
    model = model.to("cpu")
    save_pretrained = getattr(model, "save_pretrained", None)
    if hasattr(model, "peft_config") and callable(save_pretrained):
        # The readout (adapter.readout_tokens) is a LoRA on lm_head, which PEFT takes for an
        # embedding layer and would save whole (49k x 576 for SmolLM2); the base has it unchanged.
        save_pretrained(str(out), save_embedding_layers=False)
        # FedEx-LoRA: the residuals folded into the base weights are part of the model.
        save_residual_file(model, out)
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
            "task": cfg.model.task,
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
        # Client cold starts (model loads, tokenization), included in "seconds"; the simulation adds
        # Ray's own start-up as ray_start_seconds.
        "startup_seconds": sum(r.startup_seconds for r in history),
    }
