"""Ctrl-C during a simulation stops it promptly and leaves no Ray process behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .processes import ProcessWatch, wait_for_descendant

# Ray runs share one pytest-xdist worker (two Ray heads at once would halve each one's CPUs).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_stops_the_run_and_ray(tmp_path: Path, signum: int, status: int) -> None:
    """Ctrl-C, and SIGTERM (a scheduler, systemd, `kill`) the same way: no Ray dump, no traceback."""
    privet = Path(sys.executable).parent / "privet"
    cmd = [
        str(privet),
        "simulate",
        "--set",
        "model.num_hidden_layers=1",
        "--set",
        "data.max_examples=3000",
        "--set",
        "data.num_clients=2",
        "--set",
        "federation.rounds=50",
        "--set",
        "train.local_epochs=5",
        "--set",
        f"simulation.output_dir='{tmp_path}'",
        "--set",
        "simulation.run_name='int'",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    # Only the processes this run started are checked: another job on the machine may run Ray too.
    with ProcessWatch(proc.pid) as watch:
        try:
            deadline = time.monotonic() + 120
            seen = ""
            assert proc.stdout is not None
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                seen += line
                if "round 0" in line or not line:
                    break
            assert "round 0" in seen, seen
            # Interrupt while round 1 trains: once a Ray worker plays a client.
            assert wait_for_descendant(proc.pid, "ray::ClientAppActor.run", timeout=90), seen
            proc.send_signal(signum)
            rc = proc.wait(timeout=60)
            rest = proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == status, seen + rest
    assert "SIGTERM received" not in rest and "Traceback" not in rest, rest
    assert watch.matching("ray::", "raylet", "gcs_server"), "the watch saw no Ray process"
    assert watch.wait_gone("ray::", "raylet", "gcs_server", timeout=10.0) == []
