"""Per-round wall time of one small federation in simulation and in deployment on loopback.

The same configuration (VADER, 2 clients, 1-layer MiniLM, DP on, 2 rounds) runs once with
``privet simulate`` and once as ``privet server --insecure`` + two ``privet client`` processes whose
data files are the simulation's client shares. Prints the seconds of each round from each run's
``metrics.jsonl`` and, inside them, the clients' cold start (model load, tokenization:
``startup_seconds``), plus the whole wall time of each run (start-up and teardown included).

    .venv/bin/python benchmarks/deploy_vs_sim.py --out bench-out
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

PRIVET = str(Path(sys.executable).parent / "privet")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sets(out: Path, port: int, health: int, name: str) -> list[str]:
    return [
        "model.num_hidden_layers=1",
        "model.max_length=48",
        "data.max_examples=3000",
        "data.num_clients=2",
        "federation.rounds=2",
        "privacy.target_epsilon=20",
        "train.local_epochs=0.5",
        "train.num_threads=1",
        f"simulation.output_dir='{out}'",
        f"simulation.run_name='{name}'",
        "deployment.host='127.0.0.1'",
        f"deployment.port={port}",
        f"deployment.health_port={health}",
    ]


def _rounds(run_dir: Path) -> str:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ", ".join(
        f"round {r['round']}: {r['seconds']:.1f} s (client cold start {r['startup_seconds']:.1f} s)"
        for r in lines
        if r["round"] > 0
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sets = _sets(out, _port(), _port(), "sim")
    args = [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    subprocess.run([PRIVET, "simulate", *args], check=True, stdout=subprocess.DEVNULL)
    sim_wall = time.perf_counter() - t0

    from privet.common.config import load_config
    from privet.common.data import cached_federated_data, concat_examples
    from privet.common.deployment import wait_healthy

    port, health = _port(), _port()
    sets = _sets(out, port, health, "deploy")
    fed = cached_federated_data(load_config(None, sets).data)
    files = []
    for c in fed.clients:
        ex = concat_examples([c.train, c.test])
        path = out / f"{c.name}.csv"
        pd.DataFrame({"text": ex.texts, "label": ex.labels}).to_csv(path, index=False)
        files.append(path)
    args = [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    server = subprocess.Popen([PRIVET, "server", "--insecure", *args], stdout=subprocess.DEVNULL)
    clients = []
    try:
        # The coordinator is ready when its SuperLink's health service says SERVING.
        wait_healthy(f"127.0.0.1:{health}", timeout=300)
        for path in files:
            clients.append(
                subprocess.Popen(
                    [PRIVET, "client", "--server", f"127.0.0.1:{port}", "--insecure", "--data",
                     str(path), "--state-dir", str(out / f"state-{path.stem}"), "--threads", "1"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        server.wait(timeout=1800)
        dep_wall = time.perf_counter() - t0
    finally:
        for p in [*clients, server]:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGINT)
                p.wait(timeout=60)
    print(f"simulation: {_rounds(out / 'sim')}; wall {sim_wall:.0f} s")
    print(f"deployment: {_rounds(out / 'deploy')}; wall {dep_wall:.0f} s")


if __name__ == "__main__":
    main()
