"""A simulation on an existing Ray cluster (`simulation.ray_address`), with tracking on.

The cluster is this test's own: `ray start --head --block` in a new session with its own temp dir
and port, ended by signalling exactly the processes it started. `ray stop` is never used: it stops
every Ray process on the machine, including other users' runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from privet.common.config import load_config
from privet.common.errors import ConfigError
from privet.server.rundir import read_metrics
from privet.simulations import simulate

# Ray runs share one pytest-xdist worker: they start and count machine-wide Ray processes.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the cluster's process group and every descendant, then SIGKILL what is left."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        family = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(family, timeout=20)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, Path, list[psutil.Process]]]:
    port = _free_port()
    # Ray's socket paths must stay short (AF_UNIX limit), hence /tmp and a short prefix.
    temp = Path(tempfile.mkdtemp(prefix="pvray-", dir="/tmp"))
    ray_bin = Path(sys.executable).parent / "ray"
    proc = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--temp-dir={temp}",
            "--include-dashboard=false",
            "--num-cpus=2",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env={**os.environ, "RAY_worker_niceness": "0"},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head did not come up on port {port}")
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp, [psutil.Process(proc.pid)]
    finally:
        _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def test_simulation_runs_on_an_existing_cluster(ray_cluster, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    address, temp, (head,) = ray_cluster
    cfg = load_config(
        None,
        [
            "model.num_hidden_layers=1",
            "model.max_length=32",
            "data.max_examples=400",
            "data.num_clients=2",
            "federation.rounds=1",
            "train.local_epochs=0.5",
            "train.batch_size=32",
            f"simulation.ray_address='{address}'",
            "tracking.tensorboard=true",
            f"simulation.output_dir='{tmp_path}'",
            "simulation.run_name='cluster'",
        ],
    )
    run_dir = simulate(cfg)
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1]
    assert len(records[1]["clients_trained"]) == 2
    assert records[1]["max_epsilon"] > 0
    assert (run_dir / "final_adapter" / "adapter_config.json").is_file()
    # The clients ran in the cluster's workers: their logs are in the cluster's temp dir.
    logs = list((temp / "session_latest" / "logs").glob("worker-*.out"))
    assert any("ClientAppActor" in p.read_text(errors="replace") for p in logs), logs
    # The cluster outlives the run (the driver only disconnected).
    assert head.is_running()
    # Tracking worked inside the ServerApp: the events hold round 0 and round 1.
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("accuracy/server")]
    assert steps == [0, 1]
    assert [e.value for e in acc.Scalars("epsilon/max")] == pytest.approx(
        [records[1]["max_epsilon"]], rel=1e-6
    )


def test_a_wrong_address_is_one_clear_error(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            f"simulation.ray_address='127.0.0.1:{_free_port()}'",
            f"simulation.output_dir='{tmp_path}'",
            "simulation.run_name='x'",
        ],
    )
    with pytest.raises(ConfigError, match="no Ray cluster answers there"):
        simulate(cfg)
    assert not (tmp_path / "x").exists()
