"""Attacks on a deployed coordinator, played against real processes in ONE federation (issue 13).

A TLS coordinator with node authentication and three registered sites on 127.0.0.1; site c is
malicious (it scales its update 1000x, `privet client --test-attack`). While the sites train:

- an outsider holding only the CA (readable from the TLS handshake) tries Flower's Control API
  through the sites' port: `flwr run`, `flwr ls`, `flwr stop`, `flwr supernode register` of a
  rogue key under an existing site's name, and raw HTTPS POSTs to /v1/control/* and the runtime
  routes: every one fails (nginx answers 404/403; the SuperLink listens on loopback only);
- a site with a rogue key under site a's name tries to join and is refused;
- round 1 aggregates the honest sites only; site c's update is dropped with the reason, on the
  coordinator's console and in metrics.jsonl;
- the coordinator is then SIGKILLed: every process it started (nginx, the SuperLink, SuperExec,
  the ServerApp, `flwr run`) is gone within a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from privet.common.certs import init_certs, make_node_key
from privet.server.rundir import read_metrics
from tests.deploy_helpers import Procs, free_port, write_config, write_site_files

pytestmark = pytest.mark.slow

FLWR = str(Path(sys.executable).parent / "flwr")


def _post(port: int, path: str, ca: Path, method: str = "POST") -> int:
    """The HTTP status the sites' port answers ``method path`` with."""
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(
        f"https://127.0.0.1:{port}{path}",
        data=b"" if method == "POST" else None,
        method=method,
        headers={"Content-Type": "application/protobuf"},
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as res:
            return int(res.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0")
    return subprocess.run(
        [FLWR, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("security")
    sites = write_site_files(root, rows=300, sites=3)
    certs = root / "certs"
    init_certs(certs, hosts=["127.0.0.1"])
    keys = [make_node_key(name, out=certs)[0] for name in ("site-a", "site-b", "site-c")]
    # An outsider's key under site a's name, made elsewhere.
    rogue_key, rogue_pub = make_node_key("site-a", out=root / "elsewhere")
    port = free_port()
    # Three rounds: the kill comes after round 1, and the run must still be going then.
    cfg = write_config(root, port=port, health_port=free_port(), rounds=3)
    text = cfg.read_text().replace("num_clients = 2", "num_clients = 3")
    cfg.write_text(
        text.replace("round_timeout = 60", "round_timeout = 120\nmin_available_clients = 3")
    )
    run_dir = root / "runs" / "fed"
    tls = ["--ca", str(certs / "ca.pem")]
    procs = Procs(root / "logs")
    # The outsider's Flower CLI: the sites' address and the CA, nothing else.
    home = root / "outsider"
    home.mkdir()
    (home / "config.toml").write_text(
        "[superlink]\ndefault = 'target'\n[superlink.target]\n"
        f"address = '127.0.0.1:{port}'\nroot-certificates = '{certs / 'ca.pem'}'\n"
    )
    out: dict[str, object] = {"root": root, "run_dir": run_dir, "port": port}
    try:
        procs.start("server", "server", "--config", str(cfg), "--certs", str(certs))
        procs.wait_for("server", "waiting for", timeout=180)
        for i, name in enumerate(("a", "b", "c")):
            attack = (
                ["--test-attack", "scale", "--test-attack-scale", "1000"] if name == "c" else []
            )
            procs.start(
                f"site-{name}",
                "client", "--server", f"127.0.0.1:{port}", *tls, "--key", str(keys[i]),
                "--data", str(sites[i]), "--state-dir", str(root / f"state-{name}"),
                "--threads", "1", "--epsilon", "20", *attack,
            )  # fmt: skip
        procs.start(
            "rogue",
            "client", "--server", f"127.0.0.1:{port}", *tls, "--key", str(rogue_key),
            "--name", "site-a", "--data", str(sites[0]), "--state-dir", str(root / "state-r"),
        )  # fmt: skip
        # The outsider's attempts, while the federation runs.
        statuses = {
            path: _post(port, path, certs / "ca.pem")
            for path in (
                "/v1/control/start-run",
                "/v1/control/stop-run",
                "/v1/control/list-runs",
                "/v1/control/register-node",
                "/v1/control/unregister-node",
                "/v1/control/list-nodes",
                "/v1/runtime/get-nodes",
                "/health",
                "/docs",
                "/v1/fleet/../control/list-runs",
            )
        }
        statuses["GET /v1/fleet/pull-messages"] = _post(
            port, "/v1/fleet/pull-messages", certs / "ca.pem", method="GET"
        )
        out["statuses"] = statuses
        out["cli"] = {
            "run": _flwr(home, "run", str(run_dir / "flower" / "app"), "target"),
            "ls": _flwr(home, "ls", "target"),
            "stop": _flwr(home, "stop", "1", "target"),
            "register": _flwr(home, "supernode", "register", str(rogue_pub), "target", "--name", "site-a"),
        }  # fmt: skip
        # The rogue is refused at admission; wait for it first, so that nothing stands between
        # round 1's end and the kill below (under load, waiting for it after round 1 let the
        # two-round run finish and the coordinator end its SuperLink and nginx on its own).
        out["rogue_rc"] = procs.procs["rogue"].wait(timeout=120)
        deadline = time.monotonic() + 420
        while not any(r["round"] == 1 for r in read_metrics(run_dir)):
            assert time.monotonic() < deadline, procs.log("server")[-3000:]
            assert procs.procs["server"].poll() is None, procs.log("server")[-3000:]
            time.sleep(0.2)
        # Now kill the coordinator: nothing it started may outlive it by more than a few seconds.
        tree = _tree(procs.procs["server"].pid)
        out["tree_names"] = sorted({p.name() for p in tree if p.is_running()})
        procs.stop("server", sig=signal.SIGKILL)
        killed = time.monotonic()
        alive = tree
        while alive and time.monotonic() - killed < 10:
            alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            time.sleep(0.2)
        out["left_after_kill"] = [(p.pid, p.name()) for p in alive]
        out["seconds_to_clear"] = time.monotonic() - killed
        out["port_free"] = _port_free(port)
    finally:
        procs.close()
    out["logs"] = {n: procs.log(n) for n in procs.procs}
    return out


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        # as a restarted coordinator's nginx binds: the sites' closed connections may linger in
        # TIME_WAIT, but nothing may still listen there
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_only_the_fleet_api_is_reachable_on_the_sites_port(attacked) -> None:
    statuses = attacked["statuses"]
    for path, status in statuses.items():
        expected = 403 if path.startswith("GET") else 404
        assert status == expected, (path, status)


def test_the_flower_cli_cannot_control_the_coordinator_from_outside(attacked) -> None:
    for what, res in attacked["cli"].items():
        assert res.returncode != 0, (what, res.stdout[-2000:], res.stderr[-2000:])
    # The run the coordinator submitted over loopback is the only one, and it trained.
    assert read_metrics(attacked["run_dir"])[1]["aggregated"] is True


def test_a_rogue_key_under_an_existing_name_is_refused(attacked) -> None:
    assert attacked["rogue_rc"] not in (0, None)
    rogue = attacked["logs"]["rogue"]
    assert "register this site's public key" in rogue, rogue[-2000:]
    assert not (attacked["root"] / "state-r" / "ledger-site-a.json").exists()
    r1 = read_metrics(attacked["run_dir"])[1]
    assert r1["clients_trained"].count("site-a") == 1


def test_the_scaled_update_is_dropped_with_its_reason(attacked) -> None:
    r1 = read_metrics(attacked["run_dir"])[1]
    assert sorted(r1["clients_trained"]) == ["site-a", "site-b"]
    assert list(r1["rejected"]) == ["site-c"]
    assert "update_norm_factor" in r1["rejected"]["site-c"]
    assert r1["aggregated"] is True
    # on the coordinator's console too, not only in metrics.jsonl
    assert "rejected the update of site-c" in attacked["logs"]["server"]
    assert "TESTING: this site attacks" in attacked["logs"]["site-c"]
    json.dumps(r1)  # the record stays plain JSON


def test_nothing_outlives_a_killed_coordinator(attacked) -> None:
    names = attacked["tree_names"]
    assert "nginx" in names and any("flower-superlink" in n or "python" in n for n in names)
    assert attacked["left_after_kill"] == [], attacked["left_after_kill"]
    assert attacked["seconds_to_clear"] < 5.0
    assert attacked["port_free"]
