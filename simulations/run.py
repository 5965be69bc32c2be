"""Run a whole federation on one machine with Flower's Simulation Engine (Ray).

The ServerApp and ClientApp are the same objects deployment runs; only the transport differs.
Ray is started with the resources the config asks for and is always shut down when the run ends,
on success, on error and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from privet.client import make_client_app
from privet.common.config import PrivetConfig
from privet.common.data import cached_federated_data
from privet.common.deployment import adopt_orphans, end_processes
from privet.common.model_pool import MODELS
from privet.common.modeling import check_model_loads
from privet.common.privacy.mechanism import flower_sample_size
from privet.server import RoundObserver, make_server_app
from privet.server.rundir import check_output_dir, create_run_dir, write_json
from privet.server.tracking import check_tracking
from privet.simulations.cluster import check_ray_address, ray_cluster_init_args
from privet.simulations.faults import FaultPlan
from privet.simulations.inprocess import engine_lanes, run_in_process
from privet.simulations.plan import check_plan, make_plan

__all__ = ["simulate"]

log = logging.getLogger("privet")


def _quiet_flower(verbose: bool) -> None:
    # run_simulation's deprecation notice is Flower talking to us, not to our users.
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    # Opacus installs a root handler at import; without this Flower's lines print twice.
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)


def _descendant_pids() -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def _ray_shutdown(spawned_before: set[int] | None = None) -> None:
    """Shut Ray down, then end the processes it started for this run, bounded in time.

    ``ray.shutdown()`` stops the GCS and the raylet, but the dashboard and runtime-env agents and
    the actor workers exit on their own once they notice, which took over 15 s on a loaded 2-core
    machine. This process adopts orphans while Ray runs (:func:`adopt_orphans`), so those workers
    stay its descendants: every descendant not present in ``spawned_before`` (listed before and
    after the shutdown) still alive a few seconds after it is terminated, then killed, and reaped.
    Processes this one had started for other reasons are left alone.
    """
    import psutil

    def ours() -> dict[int, psutil.Process]:
        if spawned_before is None:
            return {}
        with contextlib.suppress(psutil.Error):
            return {
                p.pid: p
                for p in psutil.Process().children(recursive=True)
                if p.pid not in spawned_before
            }
        return {}

    started = ours()
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        log.debug("ray shutdown failed", exc_info=True)
    started.update(ours())  # orphans adopted during the shutdown, and any worker started in it
    if started:
        _, alive = psutil.wait_procs(list(started.values()), timeout=5.0)
        _end(alive)
        # A worker that orphaned while the others were ended is ours now too.
        _end(list(ours().values()))


def _end(procs: list[Any], timeout: float = 5.0) -> None:
    """SIGTERM ``procs``, then SIGKILL the ones still alive after ``timeout`` seconds."""
    end_processes(procs, timeout=timeout)


def simulate(
    cfg: PrivetConfig,
    *,
    observer: RoundObserver | None = None,
    verbose: bool = False,
    preflight: bool = True,
) -> Path:
    """Run the federation described by ``cfg``; return its run directory.

    Parameters
    ----------
    cfg
        The validated configuration.
    observer
        Receives progress events (the CLI's live table); ``None`` for silence.
    verbose
        Show Flower's and Ray's own log lines.
    preflight
        Refuse a run whose privacy plan cannot hold (``privet plan``); budgets are enforced at
        run time either way.

    Returns
    -------
    Path
        The run directory holding ``config.toml``, ``metrics.jsonl``, checkpoints and the final
        adapter.

    """
    # Never let Flower phone home or reinstall dependencies; this machine may be offline.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray starts workers at nice 15; here the workers *are* the training, so they must not yield
    # the CPU to every other process on the machine.
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    # Preflight, before any worker starts: bad data or a model that cannot load fail here with one
    # clear error instead of inside a Ray worker.
    check_tracking(cfg.tracking)
    if cfg.simulation.ray_address is not None:
        check_ray_address(cfg.simulation.ray_address)
    fed = cached_federated_data(cfg.data)
    n_clients = len(fed.clients)
    check_model_loads(cfg.model)
    check_output_dir(cfg.simulation.output_dir)
    if preflight:
        preflight_plan = make_plan(cfg, with_model=False)
        check_plan(preflight_plan)
        for note in preflight_plan.notes:
            # A decision taken for the user (e.g. a batch larger than a client's data) is said.
            print(f"note: {note}", file=sys.stderr, flush=True)
    run_dir = create_run_dir(cfg)
    state_dir = cfg.simulation.state_dir or (run_dir / "clients")
    state_dir.mkdir(parents=True, exist_ok=True)
    # The clients' progress inside a round (client/app.py), for a reporter that shows it.
    shutil.rmtree(state_dir / "progress", ignore_errors=True)
    watch = getattr(observer, "watch_progress", None)
    if callable(watch):
        watch(state_dir / "progress")
    sim = cfg.simulation
    total_cpus = sim.num_cpus or os.cpu_count() or 1
    # Each client runs torch with as many threads as Ray gives it CPUs, so the cores are used
    # once, not oversubscribed.
    if cfg.train.num_threads is None:
        threads = max(1, int(sim.cpus_per_client))
        cfg = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"num_threads": threads})}
        )
    init_args: dict[str, Any] = {
        "num_cpus": total_cpus,
        "include_dashboard": False,
        "logging_level": "INFO" if verbose else "ERROR",
        "log_to_driver": verbose,
    }
    backend_config = {
        "client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": sim.gpus_per_client},
        "init_args": init_args,
    }
    if sim.ray_address is not None:
        backend_config["init_args"] = ray_cluster_init_args(sim.ray_address, verbose=verbose)
    _quiet_flower(verbose)
    nodes = simulated_nodes(cfg, n_clients)
    inprocess = sim.engine == "inprocess"
    server_app = make_server_app(
        cfg,
        run_dir=run_dir,
        observer=observer,
        simulated_nodes=nodes,
        # In process the server evaluates on the clients' base model: one per device, not two.
        models=MODELS if inprocess else None,
    )
    client_app = _client_app(
        cfg, state_dir=state_dir, num_clients=n_clients, num_labels=fed.num_labels
    )
    if inprocess:
        run_in_process(server_app, client_app, num_nodes=nodes, devices=engine_lanes(cfg))
        return run_dir
    # Imported only for the Ray engine: flwr.simulation pulls Flower's simulation extras (ray,
    # fastapi, ...), which the in-process engine must not need (GPU machines often lack them).
    from flwr.simulation import run_simulation

    previous = _install_interrupt_handler()
    spawned_before = _descendant_pids()
    adopted = adopt_orphans(True)
    try:
        # Ray is started here, timed, rather than inside round 1 (Flower reuses a running Ray).
        ray_seconds = _start_ray(backend_config["init_args"])  # type: ignore[arg-type]
        # ray.init put its own SIGTERM handler in (a "*** SIGTERM received ***" dump and Flower
        # tracebacks): SIGTERM ends the run as Ctrl-C does.
        _install_interrupt_handler()
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=nodes,
            backend_config=backend_config,  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _ray_shutdown(spawned_before)
        if adopted:
            adopt_orphans(False)
    _add_to_summary(run_dir, ray_start_seconds=ray_seconds)
    return run_dir


def simulated_nodes(cfg: PrivetConfig, num_clients: int) -> int:
    """Flower nodes the simulation engine runs for ``num_clients`` clients.

    With ``simulation.nodes = 'per_round'``, as many as train per round (Flower's sample size),
    never fewer than Ray runs at once, so no worker idles; each node plays whichever client a
    message names (``server/population.py``).  Otherwise one node per client.
    """
    if cfg.simulation.nodes == "population" or cfg.privacy.secure_aggregation:
        # SecAgg+ keeps each client's keys and shares in its node's state across the protocol's
        # four stages, so a node must play one client for the whole run.
        return num_clients
    fed = cfg.federation
    per_round = flower_sample_size(
        num_clients, fraction=fed.fraction_train, minimum=fed.min_train_clients
    )
    sim = cfg.simulation
    parallel = (
        1
        if sim.engine == "inprocess"
        else max(1, int((sim.num_cpus or os.cpu_count() or 1) // sim.cpus_per_client))
    )
    return max(1, min(num_clients, max(per_round, parallel)))


def _client_app(cfg: PrivetConfig, *, state_dir: Path, num_clients: int, num_labels: int) -> Any:
    """The ClientApp, with the fault plan of ``[faults]`` around its train function when one is set."""
    if not cfg.faults.active:
        return make_client_app(cfg, state_dir=state_dir)
    plan = FaultPlan(
        cfg.faults,
        num_clients=num_clients,
        round_timeout=cfg.federation.round_timeout,
        num_labels=num_labels,
    )
    log.warning(
        "simulated faults: attackers %s (%s), stragglers %s, dropout %.2f",
        sorted(plan.byzantine),
        cfg.faults.attack,
        sorted(plan.stragglers),
        cfg.faults.dropout,
    )
    return make_client_app(
        cfg, state_dir=state_dir, train_mods=[plan.mod()], data_hook=plan.flip_labels
    )


def _start_ray(init_args: dict[str, Any]) -> float:
    """Start Ray with Flower's init arguments; return the seconds it took."""
    import time

    import ray

    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init(**init_args)
    return time.perf_counter() - start


def _add_to_summary(run_dir: Path, **values: float) -> None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return
    summary = json.loads(path.read_text())
    summary.update({k: round(v, 3) for k, v in values.items()})
    write_json(path, summary)


def _kill_descendants(timeout: float = 5.0) -> None:
    """Terminate every process this one started (Ray's GCS, raylet, agents and workers), bounded in time."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    _end(children, timeout)


def _install_interrupt_handler() -> dict[int, Any]:
    """Make Ctrl-C and SIGTERM stop the run: end Ray's processes, exit with 130 (143 for SIGTERM).

    Flower's simulation loop waits on worker threads that only stop when the run ends, so a
    KeyboardInterrupt cannot unwind it; without this handler Ctrl-C would hang until the round
    timeout. Installed only in the main thread; returns the handlers it replaced, to restore.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def _stop(signum: int, frame: object) -> None:
        why = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
        sys.stderr.write(f"\n{why}: stopping the Ray workers\n")
        sys.stderr.flush()
        for name in ("privet", "flwr"):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # teardown noise is not news
        # ray.shutdown() here would race Flower's worker threads (tracebacks, exit status 1); end
        # every process Ray started for this run instead, then leave.
        _kill_descendants()
        os._exit(128 + signum)

    return {signum: signal.signal(signum, _stop) for signum in (signal.SIGINT, signal.SIGTERM)}
