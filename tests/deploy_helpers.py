"""Helpers for deployment tests: data files, configs and child processes that are always ended."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

PRIVET = str(Path(sys.executable).parent / "privet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_site_files(
    folder: Path, *, rows: int, sites: int = 2, test_rows: int = 300
) -> list[Path]:
    """VADER sentences split into one CSV per site plus ``test.csv`` and ``server.csv``."""
    from privet.common.data import load_vader

    ex = load_vader(None, ["tweets", "movie", "amazon", "nyt"], 0.0)
    idx = np.random.default_rng(0).permutation(len(ex))
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, ids: np.ndarray) -> Path:
        path = folder / name
        frame = pd.DataFrame({"text": [ex.texts[i] for i in ids], "label": ex.labels[ids]})
        frame.to_csv(path, index=False)
        return path

    paths = [write(f"site-{chr(97 + i)}.csv", idx[i * rows : (i + 1) * rows]) for i in range(sites)]
    start = sites * rows
    write("test.csv", idx[start : start + test_rows])
    write("server.csv", idx[start + test_rows : start + test_rows + 100])
    return paths


def write_config(
    folder: Path, *, port: int, health_port: int, rounds: int = 2, extra: str = ""
) -> Path:
    cfg = folder / "fed.toml"
    cfg.write_text(
        f"""
[model]
num_hidden_layers = 1
max_length = 32
[adapter]
r = 4
[privacy]
target_epsilon = 20.0
[train]
lr = 0.02
batch_size = 32
local_epochs = 1.0
eval_batch_size = 256
num_threads = 1
[data]
source = "files"
train_files = ["{folder / "server.csv"}"]
test_file = "{folder / "test.csv"}"
num_clients = 2
[federation]
rounds = {rounds}
round_timeout = 60
[simulation]
output_dir = "{folder / "runs"}"
run_name = "fed"
[deployment]
host = "127.0.0.1"
port = {port}
health_port = {health_port}
{extra}
""",
        encoding="utf-8",
    )
    return cfg


class Procs:
    """Child processes of a test, each in its own group; :meth:`close` ends them all."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self,
        name: str,
        *args: str,
        argv: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``privet ARGS`` (or ``argv``) with its output in ``logs/NAME.log``.

        ``env`` adds variables to this process's environment for the child.
        """
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", **(env or {}))
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (owned by the process)
        proc = subprocess.Popen(
            argv or [PRIVET, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def wait_for(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(name):
                return
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited early:\n{self.log(name)[-3000:]}")
            time.sleep(0.5)
        raise AssertionError(f"{name}: no {text!r} within {timeout} s:\n{self.log(name)[-3000:]}")

    def stop(self, name: str, sig: int = signal.SIGINT, timeout: float = 20) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
        return self._reap(name, timeout)

    def _reap(self, name: str, timeout: float) -> int:
        """Wait for ``name`` to end; SIGKILL its group after ``timeout`` seconds."""
        proc = self.procs[name]
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        return int(proc.returncode)

    def close(self) -> None:
        # SIGINT to every process first, then wait: they wind down side by side, not in turn.
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)
        for name in list(self.procs):
            self._reap(name, timeout=20)
            # whatever the group still holds (a SuperLink whose parent was SIGKILLed)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.procs[name].pid, signal.SIGKILL)


def flower_pids(marker: str) -> set[int]:
    """Live Flower processes whose command line mentions ``marker`` (a port or a folder)."""
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    pids = set()
    for line in out.splitlines()[1:]:
        pid, stat, args = ([*line.strip().split(None, 2), "", ""])[:3]
        if marker in args and ("flower-" in args or "flwr" in args) and not stat.startswith("Z"):
            pids.add(int(pid))
    return pids
