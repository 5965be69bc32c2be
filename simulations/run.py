"""Run a whole federation on one machine with Flower's Simulation Engine (Ray).

The ServerApp and ClientApp are the same objects deployment runs; only the transport differs.
Ray is started with the resources the config asks for and is always shut down when the run ends,
on success, on error and on Ctrl-C.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from privet.client import make_client_app
from privet.common.config import PrivetConfig
from privet.common.data import cached_federated_data
from privet.common.modeling import check_model_loads
from privet.server import RoundObserver, make_server_app
from privet.server.rundir import create_run_dir

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


def _ray_shutdown() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        log.debug("ray shutdown failed", exc_info=True)


def simulate(
    cfg: PrivetConfig, *, observer: RoundObserver | None = None, verbose: bool = False
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
    from flwr.simulation import run_simulation

    # Preflight, before any worker starts: bad data or a model that cannot load fail here with one
    # clear error instead of inside a Ray worker.
    fed = cached_federated_data(cfg.data)
    n_clients = len(fed.clients)
    check_model_loads(cfg.model)
    run_dir = create_run_dir(cfg)
    state_dir = cfg.simulation.state_dir or (run_dir / "clients")
    state_dir.mkdir(parents=True, exist_ok=True)
    sim = cfg.simulation
    total_cpus = sim.num_cpus or os.cpu_count() or 1
    # Each client runs torch with as many threads as Ray gives it CPUs, so the cores are used
    # once, not oversubscribed.
    if cfg.train.num_threads is None:
        threads = max(1, int(sim.cpus_per_client))
        cfg = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"num_threads": threads})}
        )
    backend_config = {
        "client_resources": {"num_cpus": sim.cpus_per_client, "num_gpus": sim.gpus_per_client},
        "init_args": {
            "num_cpus": total_cpus,
            "include_dashboard": False,
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
        },
    }
    _quiet_flower(verbose)
    server_app = make_server_app(cfg, run_dir=run_dir, observer=observer)
    client_app = make_client_app(cfg, state_dir=state_dir)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=n_clients,
            backend_config=backend_config,  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    finally:
        _ray_shutdown()
    return run_dir
