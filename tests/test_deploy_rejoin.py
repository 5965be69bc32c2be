"""A site whose host crashed and came back at once trains in the next round, within seconds.

Real processes on 127.0.0.1: a TLS coordinator with node authentication (``privet server``) and two
sites (``privet client``), three rounds. In round 2 site a's whole host "crashes": its SuperNode
and its ``privet client`` are SIGKILLed together, so nothing signs its node off and Flower keeps the
node ONLINE for 60 s, refusing the key meanwhile (issue 13: the restarted site waited out a 65 s
``ACTIVATION_WAIT``). Restarted at once with the same key and state folder, the site signs its old
node off itself (Flower's Fleet ``DeactivateNode``, signed with its key, ``client/flower_door.py``):

- it is admitted within seconds, without the 65 s wait;
- the coordinator answers the message the dead SuperNode held with Flower's "Node Unavailable"
  error at its next poll, so round 2 ends without waiting for ``round_timeout``;
- site a trains in round 3.

Every wait is a condition with a bound; every process ends with the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from privet.common.certs import init_certs, make_node_key
from privet.server.rundir import read_metrics
from tests.deploy_helpers import Procs, free_port, write_config, write_site_files

pytestmark = pytest.mark.slow

#: A stale message waits this long at most.
ROUND_TIMEOUT = 150


def _when(
    checks: dict[str, Callable[[], object]], timeout: float, *, procs: Procs, server: str
) -> dict[str, float]:
    """Poll every check until all are true; the monotonic time each first became true."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, check in checks.items():
            if name not in seen and check():
                seen[name] = time.monotonic()
        if len(seen) == len(checks):
            return seen
        assert procs.procs[server].poll() is None, procs.log(server)[-3000:]
        time.sleep(0.2)
    missing = sorted(set(checks) - set(seen))
    raise AssertionError(f"{missing} not within {timeout} s:\n{procs.log(server)[-3000:]}")


def _round(run_dir: Path, n: int) -> dict[str, object] | None:
    return next((r for r in read_metrics(run_dir) if r["round"] == n), None)


@pytest.fixture(scope="module")
def crash(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("rejoin")
    sites = write_site_files(root, rows=200, test_rows=100)
    certs = root / "certs"
    init_certs(certs, hosts=["127.0.0.1"])
    keys = [make_node_key(name, out=certs)[0] for name in ("site-a", "site-b")]
    port = free_port()
    cfg = write_config(root, port=port, health_port=free_port(), rounds=3)
    text = cfg.read_text().replace("round_timeout = 60", f"round_timeout = {ROUND_TIMEOUT}")
    cfg.write_text(text.replace("rounds = 3", "rounds = 3\nmin_train_clients = 1"))
    run_dir = root / "runs" / "fed"
    procs = Procs(root / "logs")

    def site(proc: str, name: str, key: Path, data: Path) -> None:
        procs.start(
            proc,
            "client", "--server", f"127.0.0.1:{port}", "--ca", str(certs / "ca.pem"),
            "--key", str(key), "--data", str(data), "--state-dir", str(root / f"state-{name}"),
            "--threads", "1", "--epsilon", "20",
        )  # fmt: skip

    out: dict[str, object] = {"run_dir": run_dir}
    try:
        procs.start("server", "server", "--config", str(cfg), "--certs", str(certs))
        procs.wait_for("server", "waiting for", timeout=120)
        site("client-a", "a", keys[0], sites[0])
        site("client-b", "b", keys[1], sites[1])
        _when({"round 1": lambda: _round(run_dir, 1)}, 300, procs=procs, server="server")
        # The host of site a crashes while it holds its round-2 train message.
        node_log = root / "state-a" / "flower" / "supernode.log"
        _when(
            {"round 2 at a": lambda: node_log.read_text().count("Receiving: train message") >= 2},
            120,
            procs=procs,
            server="server",
        )
        host = psutil.Process(procs.procs["client-a"].pid)
        tree = [*host.children(recursive=True), host]  # the SuperNode lives in its own session
        assert any("flower-supernode" in " ".join(p.cmdline()) for p in tree[:-1])
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        procs.procs["client-a"].wait(timeout=10)
        killed = time.monotonic()
        if os.environ.get("PRIVET_REJOIN_FORGET_NODE"):
            # Measuring the behaviour before the fix: a site that does not know its node.
            (root / "state-a" / "flower" / "node.json").unlink()
        site("client-a2", "a", keys[0], sites[0])  # back at once: same key, same state folder
        seen = _when(
            {
                "asking_s": lambda: "to admit this node" in procs.log("client-a2"),
                "joined_s": lambda: "joined" in procs.log("client-a2"),
                "round2_s": lambda: _round(run_dir, 2),
                "trained_s": lambda: "round 3: trained on" in procs.log("client-a2"),
            },
            300,
            procs=procs,
            server="server",
        )
        out.update({name: at - killed for name, at in seen.items()})
        out["server_rc"] = procs.procs["server"].wait(timeout=300)
    finally:
        procs.close()
    out["logs"] = {n: procs.log(n) for n in procs.procs}
    print(  # the numbers the issue asks for (pytest -s shows them)
        f"\nrejoin after SIGKILL: asked {out['asking_s']:.1f} s, joined {out['joined_s']:.1f} s, "
        f"round 2 ended "
        f"{out['round2_s']:.1f} s, trained again {out['trained_s']:.1f} s after the kill"
    )
    return out


def test_a_crashed_site_restarted_at_once_is_admitted_within_seconds(crash) -> None:
    logs = crash["logs"]
    # The coordinator's SuperLink took the old node offline at the site's own request.
    link = (crash["run_dir"] / "flower" / "superlink.log").read_text(errors="replace")
    assert "[Fleet.DeactivateNode] Deactivated node_id=" in link
    assert "trying again in" not in logs["client-a2"]  # no ACTIVATION_WAIT
    # Flower alone keeps the node for 60 s, and privet waited 65 s before it was admitted; here the
    # admission itself (SuperNode start, activation) takes seconds. (From the kill, the restarted
    # process also loads Python, torch and the data first: 12 to 31 s were seen on loaded machines.)
    assert crash["joined_s"] - crash["asking_s"] < 30


def test_the_round_it_crashed_in_ends_without_waiting_for_the_timeout(crash) -> None:
    # Answered "Node Unavailable" once the site signed its node off, not when Flower's heartbeat
    # patience ran out (60 s after the kill) nor at round_timeout.
    assert crash["round2_s"] - crash["asking_s"] < 30
    assert crash["round2_s"] < ROUND_TIMEOUT / 2
    r2 = _round(crash["run_dir"], 2)
    assert r2 is not None and r2["clients_trained"] == ["site-b"]


def test_the_restarted_site_trains_in_the_next_round(crash) -> None:
    assert crash["server_rc"] == 0, crash["logs"]["server"][-3000:]
    r3 = _round(crash["run_dir"], 3)
    assert r3 is not None and sorted(r3["clients_trained"]) == ["site-a", "site-b"]
    assert "Traceback" not in crash["logs"]["client-a2"]
