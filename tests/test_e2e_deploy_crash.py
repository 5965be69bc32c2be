"""Nothing is lost when a process dies: a SIGKILLed client, then a SIGKILLed and resumed coordinator.

Three rounds, two sites, insecure loopback (TLS is covered in test_e2e_deploy.py):

- site a is SIGKILLed during round 2: round 2 completes with site b alone after the straggler
  timeout (federation.round_timeout); its SuperNode dies with it (no ghost node holds the round);
- the coordinator is SIGKILLed after round 2; site a rejoins with its ledger; ``privet server
  --resume`` finishes round 3 from the round-2 adapter, and metrics.jsonl holds each round once.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from privet.server.rundir import checkpoint_path, load_checkpoint, read_metrics
from tests.deploy_helpers import Procs, flower_pids, free_port, write_config, write_site_files

pytestmark = pytest.mark.slow


def _wait_round(run_dir, n: int, procs: Procs, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["round"] == n for r in read_metrics(run_dir)):
            return
        assert procs.procs["server"].poll() is None, procs.log("server")[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"round {n} not reached in {timeout} s:\n{procs.log('server')[-3000:]}")


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("crash")
    sites = write_site_files(root, rows=300)
    port = free_port()
    cfg = write_config(root, port=port, health_port=free_port(), rounds=3)
    # A killed site's SuperNode deactivates itself (it gets SIGTERM when its parent dies), so the
    # round does not wait for this timeout; it only bounds a real straggler.
    text = cfg.read_text().replace("round_timeout = 60", "round_timeout = 120")
    text = text.replace("rounds = 3", "rounds = 3\nmin_train_clients = 1")
    cfg.write_text(text)
    run_dir = root / "runs" / "fed"
    procs = Procs(root / "logs")

    def client(proc: str, site: str, data) -> None:
        procs.start(
            proc,
            "client", "--server", f"127.0.0.1:{port}", "--insecure", "--name", f"site-{site}",
            "--data", str(data), "--state-dir", str(root / f"state-{site}"), "--threads", "1",
        )  # fmt: skip

    out: dict[str, object] = {"root": root, "run_dir": run_dir, "port": port}
    try:
        procs.start("server", "server", "--config", str(cfg), "--insecure")
        procs.wait_for("server", "waiting for", timeout=120)
        client("client-a", "a", sites[0])
        client("client-b", "b", sites[1])
        _wait_round(run_dir, 1, procs, timeout=240)
        # Kill site a once it holds its round-2 train message: in the middle of round 2.
        node_log = root / "state-a" / "flower" / "supernode.log"
        deadline = time.monotonic() + 120
        while node_log.read_text().count("Receiving: train message") < 2:
            assert time.monotonic() < deadline, "site a never received round 2"
            time.sleep(0.2)
        procs.stop("client-a", sig=signal.SIGKILL)
        out["ledger_a_after_kill"] = json.loads(
            (root / "state-a" / "ledger-site-a.json").read_text()
        )
        _wait_round(run_dir, 2, procs, timeout=240)
        out["round2_seen_at"] = time.monotonic()
        procs.stop("server", sig=signal.SIGKILL)
        # The SuperLink dies with its parent; SuperExec and the ServerApp watch their parent's pid.
        deadline = time.monotonic() + 20
        while flower_pids(str(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        out["orphans_after_server_kill"] = flower_pids(str(run_dir))
        out["checkpoint2"] = load_checkpoint(checkpoint_path(run_dir, 2))
        procs.procs["server-old"] = procs.procs.pop("server")
        procs.start("server2", "server", "--resume", str(run_dir), "--insecure")
        procs.wait_for("server2", "waiting for", timeout=120)
        client("client-a2", "a", sites[0])  # site a comes back: same name, same state folder
        out["resume_rc"] = procs.procs["server2"].wait(timeout=300)
        out["logs"] = {
            n: procs.log(n) for n in procs.procs if (root / "logs" / f"{n}.log").exists()
        }
    finally:
        procs.close()
    return out


def test_resumed_run_has_every_round_once(crashed) -> None:
    assert crashed["resume_rc"] == 0, crashed["logs"]["server2"][-3000:]
    records = read_metrics(crashed["run_dir"])
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    summary = json.loads((crashed["run_dir"] / "summary.json").read_text())
    assert summary["rounds"] == 3
    assert "round 3:" in crashed["logs"]["server2"]


def test_round_two_completed_without_the_killed_client(crashed) -> None:
    r1, r2, r3 = read_metrics(crashed["run_dir"])[1:]
    assert len(r1["clients_trained"]) == 2
    assert len(r2["clients_trained"]) == 1
    assert len(r3["clients_trained"]) == 2  # site a rejoined


def test_resume_starts_from_the_round_two_adapter(crashed) -> None:
    # The checkpoint of round 2 is untouched by the resumed run, and round 3 trained on top of it.
    again = load_checkpoint(checkpoint_path(crashed["run_dir"], 2))
    for k, v in crashed["checkpoint2"].items():
        torch.testing.assert_close(again[k], v)
    r3 = load_checkpoint(checkpoint_path(crashed["run_dir"], 3))
    assert any(not torch.equal(r3[k], v) for k, v in again.items())


def test_killed_client_keeps_its_ledger(crashed) -> None:
    before = crashed["ledger_a_after_kill"]
    after = json.loads((crashed["root"] / "state-a" / "ledger-site-a.json").read_text())
    # Round 2 is in the ledger if site a finished training before the kill (the ledger is written
    # before the update leaves): privacy spent on a lost update still counts.
    rounds_before = [e["round"] for e in before["entries"]]
    assert rounds_before in ([1], [1, 2])
    assert [e["round"] for e in after["entries"]] == [*rounds_before, 3]
    assert after["entries"][: len(rounds_before)] == before["entries"]
    assert after["entries"][-1]["epsilon_after"] > before["entries"][-1]["epsilon_after"]
    ledger_b = json.loads((crashed["root"] / "state-b" / "ledger-site-b.json").read_text())
    assert [e["round"] for e in ledger_b["entries"]] == [1, 2, 3]


def test_no_process_left(crashed) -> None:
    assert crashed["orphans_after_server_kill"] == set()
    assert flower_pids(str(crashed["root"])) == set()
    assert flower_pids(f"127.0.0.1:{crashed['port']}") == set()
