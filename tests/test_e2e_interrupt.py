"""Ctrl-C during a simulation stops it promptly and leaves no Ray process behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Ray runs share one pytest-xdist worker: they start and count machine-wide Ray processes.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


def _ray_pids() -> set[int]:
    out = subprocess.run(
        ["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True
    ).stdout
    pids = set()
    for line in out.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        if (
            "ray::" in args or "raylet" in args or "gcs_server" in args
        ) and "<defunct>" not in args:
            pids.add(int(pid))
    return pids


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_stops_the_run_and_ray(tmp_path: Path, signum: int, status: int) -> None:
    """Ctrl-C, and SIGTERM (a scheduler, systemd, `kill`) the same way: no Ray dump, no traceback."""
    before = _ray_pids()
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
    deadline = time.monotonic() + 120
    seen = ""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if "round 0" in line or not line:
            break
    assert "round 0" in seen, seen
    time.sleep(3)  # round 1 is training in the Ray workers now
    proc.send_signal(signum)
    try:
        rc = proc.wait(timeout=60)
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == status, seen + rest
    assert "SIGTERM received" not in rest and "Traceback" not in rest, rest
    time.sleep(2)
    assert _ray_pids() - before == set()
