"""End to end across processes, in ONE federation (a SuperLink start costs tens of seconds).

A TLS coordinator with node authentication and two sites, DP on, three rounds:

- site a is ``privet client``; site b is the partner-app example (examples/partner_app), which
  embeds ``privet.client.Participant``, prints its status and leaves after the last round;
- a node with an unregistered key and a client without TLS try to join and are refused;
- site a is SIGKILLed during round 2 and restarted at once, with the same key and state folder,
  before the coordinator goes down (the order in which a restarted site once never heard from the
  resumed coordinator): it rejoins as soon as the coordinator lets its old node go, and round 2
  completes with site b alone (the dead SuperNode's message is answered "Node Unavailable");
- the coordinator is SIGKILLed after round 2 and restarted with ``privet server --resume``; the
  restarted site a and the Participant of site b reconnect by themselves (the Participant sees the
  coordinator go, ``connected=False`` with ``last_error``, and come back, ``reconnects=1``); round 3
  trains on the round-2 adapter with both sites and metrics.jsonl holds each round once; a site
  asked for round 3 again (it may have gone out before the kill) resends the update it kept, so
  every ledger charges each round once.

Everything listens on 127.0.0.1 (free ports); every wait is bounded; every process is ended in a
finally block, and the last tests check that none is left.
"""

from __future__ import annotations

import json
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
import torch

from privet.common.certs import init_certs, make_node_key
from privet.server.resume import server_state_path
from privet.server.rundir import checkpoint_path, load_checkpoint, read_metrics
from tests.deploy_helpers import Procs, flower_pids, free_port, write_config, write_site_files

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[1] / "examples" / "partner_app" / "app.py"


def _wait_round(run_dir: Path, n: int, procs: Procs, server: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["round"] == n for r in read_metrics(run_dir)):
            return
        assert procs.procs[server].poll() is None, procs.log(server)[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"round {n} not reached in {timeout} s:\n{procs.log(server)[-3000:]}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("deploy")
    sites = write_site_files(root, rows=500)
    certs = root / "certs"
    init_certs(certs, hosts=["127.0.0.1", "localhost"])
    keys = [make_node_key(name, out=certs)[0] for name in ("site-a", "site-b")]
    # A key the coordinator never saw: made elsewhere, its public half not in certs/nodes/.
    rogue_key, _ = make_node_key("rogue", out=root / "elsewhere")
    port = free_port()
    cfg = write_config(root, port=port, health_port=free_port(), rounds=3)
    # A killed site's SuperNode deactivates itself (it gets SIGTERM when its parent dies), so the
    # round does not wait for this timeout; it only bounds a real straggler.
    text = cfg.read_text().replace("round_timeout = 60", "round_timeout = 120")
    cfg.write_text(text.replace("rounds = 3", "rounds = 3\nmin_train_clients = 1"))
    run_dir = root / "runs" / "fed"
    tls = ["--ca", str(certs / "ca.pem")]
    procs = Procs(root / "logs")

    def site_a(proc: str) -> None:
        procs.start(
            proc,
            "client", "--server", f"127.0.0.1:{port}", *tls, "--key", str(keys[0]),
            "--data", str(sites[0]), "--state-dir", str(root / "state-a"), "--threads", "1",
            "--epsilon", "20",  # the site grants the coordinator's epsilon (its default is 8)
        )  # fmt: skip

    out: dict[str, object] = {"root": root, "run_dir": run_dir, "port": port}
    try:
        procs.start("server", "server", "--config", str(cfg), "--certs", str(certs))
        procs.wait_for("server", "waiting for", timeout=120)
        site_a("client-a")
        procs.start(
            "partner",
            argv=[
                sys.executable, str(APP), "--server", f"127.0.0.1:{port}", *tls,
                "--key", str(keys[1]), "--name", "site-b", "--data", str(sites[1]),
                "--state-dir", str(root / "state-b"), "--rounds", "3", "--budget", "20",
                "--timeout", "900",
            ],
        )  # fmt: skip
        procs.start(
            "rogue",
            "client", "--server", f"127.0.0.1:{port}", *tls, "--key", str(rogue_key),
            "--data", str(sites[0]), "--state-dir", str(root / "state-r"),
        )  # fmt: skip
        procs.start(
            "plain",
            "client", "--server", f"127.0.0.1:{port}", "--insecure",
            "--data", str(sites[0]), "--state-dir", str(root / "state-p"),
        )  # fmt: skip
        _wait_round(run_dir, 1, procs, "server", timeout=300)
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
        site_a("client-a2")  # back at once, same key and state folder, coordinator still up
        # Within ACTIVATION_WAIT (65 s) even if the coordinator still counts the old node online.
        procs.wait_for("client-a2", "joined", timeout=180)
        _wait_round(run_dir, 2, procs, "server", timeout=300)
        procs.stop("server", sig=signal.SIGKILL)
        # The SuperLink dies with its parent; SuperExec and the ServerApp watch their parent's pid.
        deadline = time.monotonic() + 20
        while flower_pids(str(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        out["orphans_after_server_kill"] = flower_pids(str(run_dir))
        out["checkpoint2"] = load_checkpoint(checkpoint_path(run_dir, 2))
        # Let the partner's status loop (every 2 s) see the coordinator gone.
        procs.wait_for("partner", "lost the coordinator", timeout=30)
        procs.start("server2", "server", "--resume", str(run_dir), "--certs", str(certs))
        procs.wait_for("server2", "waiting for", timeout=120)
        out["resume_rc"] = procs.procs["server2"].wait(timeout=400)
        out["partner_rc"] = procs.procs["partner"].wait(timeout=60)
        out["plain_rc"] = procs.procs["plain"].wait(timeout=60)
    finally:
        procs.close()
    out["logs"] = {n: procs.log(n) for n in procs.procs}
    return out


def test_run_completes_and_learns(federation) -> None:
    assert federation["resume_rc"] == 0, federation["logs"]["server2"][-3000:]
    records = read_metrics(federation["run_dir"])
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert records[3]["server_accuracy"] > records[0]["server_accuracy"]
    out = federation["logs"]["server2"]
    assert "round 3:" in out and "final server test accuracy" in out
    assert "round 1: trained on" in federation["logs"]["client-a"]
    assert "round 3: trained on" in federation["logs"]["client-a2"]
    # The site restarted before the coordinator went down rejoined the resumed one by itself.
    assert federation["logs"]["client-a2"].count("joined") == 1
    assert "Traceback" not in federation["logs"]["client-a2"]
    summary = json.loads((federation["run_dir"] / "summary.json").read_text())
    assert summary["rounds"] == 3
    for name in (
        "final_adapter/adapter_config.json",
        "checkpoints/round-0003.safetensors",
        "checkpoints/round-0003.server.safetensors",
    ):
        assert (federation["run_dir"] / name).exists(), name


def test_round_two_completed_without_the_killed_client(federation) -> None:
    # Deployed sites are named by their registered keys (certs/nodes/NAME.pub) in the records.
    r1, r2, r3 = read_metrics(federation["run_dir"])[1:]
    assert sorted(r1["clients_trained"]) == ["site-a", "site-b"] and not r1["errors"]
    assert r2["clients_trained"] == ["site-b"]
    assert sorted(r3["clients_trained"]) == ["site-a", "site-b"]  # site a rejoined


def test_resume_starts_from_the_round_two_adapter(federation) -> None:
    run_dir = federation["run_dir"]
    # The checkpoint of round 2 is untouched by the resumed run, and round 3 trained on top of it.
    again = load_checkpoint(checkpoint_path(run_dir, 2))
    for k, v in federation["checkpoint2"].items():
        torch.testing.assert_close(again[k], v)
    r3 = load_checkpoint(checkpoint_path(run_dir, 3))
    assert any(not torch.equal(r3[k], v) for k, v in again.items())
    assert server_state_path(run_dir, 2).exists()
    assert "resuming after round 2 of 3" in federation["logs"]["server2"]


def test_each_site_ledger_holds_cumulative_epsilon(federation) -> None:
    root = federation["root"]
    before = federation["ledger_a_after_kill"]
    after = json.loads((root / "state-a" / "ledger-site-a.json").read_text())
    # Round 2 is in site a's ledger if it finished training before the kill (the ledger is
    # written before the update leaves): privacy spent on a lost update still counts.
    rounds_before = [e["round"] for e in before["entries"]]
    assert rounds_before in ([1], [1, 2])
    assert [e["round"] for e in after["entries"]] == [*rounds_before, 3]
    assert after["entries"][: len(rounds_before)] == before["entries"]
    ledger_b = json.loads((root / "state-b" / "ledger-site-b.json").read_text())
    assert ledger_b["budget_epsilon"] == 20.0  # the partner's own budget
    assert [e["round"] for e in ledger_b["entries"]] == [1, 2, 3]
    for ledger, log in ((after, "client-a2"), (ledger_b, "partner")):
        # Each round charged once: a round 3 redone after the coordinator's resume was answered
        # with the update already released (kept in the state folder), not trained again.
        assert all(e["attempt"] == 1 for e in ledger["entries"]), ledger["entries"]
        eps = [e["epsilon_after"] for e in ledger["entries"]]
        assert eps[0] > 0 and eps == sorted(eps) and eps[-1] <= 20.0 + 1e-6
        assert f"{eps[-1]:.3f}" in federation["logs"][log]
    final = read_metrics(federation["run_dir"])[-1]
    assert final["epsilon_per_client"]["site-a"] == pytest.approx(
        after["entries"][-1]["epsilon_after"], rel=1e-9
    )
    assert final["epsilon_per_client"]["site-b"] == pytest.approx(
        ledger_b["entries"][-1]["epsilon_after"], rel=1e-9
    )
    assert not final["charged_again"]
    # privacy.json takes each site's own example count (its train split), as its ledger does.
    report = json.loads((federation["run_dir"] / "privacy.json").read_text())
    for name, ledger in (("site-a", after), ("site-b", ledger_b)):
        info = report["sample_level"]["clients"][name]
        assert info["sample_rate"] == pytest.approx(ledger["entries"][-1]["sample_rate"])
        assert info["final_epsilon"] == pytest.approx(ledger["entries"][-1]["epsilon_after"])


def test_unregistered_node_and_plain_client_are_refused(federation) -> None:
    assert not (federation["root"] / "state-r" / "ledger-site-a.json").exists()
    rogue = federation["logs"]["rogue"]
    errors = [line for line in rogue.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "register this site's public key" in errors[0], rogue
    assert "Traceback" not in rogue
    assert federation["plain_rc"] == 2
    plain = federation["logs"]["plain"]
    assert "requires TLS" in plain and "Traceback" not in plain


def test_private_keys_are_0600_and_never_printed(federation) -> None:
    certs = federation["root"] / "certs"
    for key in (certs / "ca.key", certs / "server.key", certs / "site-a.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        secret = key.read_text().splitlines()[1]
        assert all(secret not in log for log in federation["logs"].values())


def test_insecure_warns_on_start(federation) -> None:
    assert "--insecure" in federation["logs"]["plain"]
    assert "INSECURE" not in federation["logs"]["server"]


def test_partner_app_rode_out_the_coordinator_restart(federation) -> None:
    out = federation["logs"]["partner"]
    assert federation["partner_rc"] == 0, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("status:")]
    first_up = next(i for i, line in enumerate(lines) if "connected=True" in line)
    lost = next(i for i, line in enumerate(lines) if "connected=False" in line and i > first_up)
    assert "lost the coordinator at 127.0.0.1" in lines[lost] and "reconnects=0" in lines[lost]
    back = next(i for i, line in enumerate(lines) if "connected=True" in line and i > lost)
    assert "reconnects=1" in lines[back]
    assert "done: reached round 3" in out and "\nstopped" in out
    assert "Traceback" not in out


def test_no_process_left(federation) -> None:
    assert federation["orphans_after_server_kill"] == set()
    assert flower_pids(str(federation["root"])) == set()
    assert flower_pids(f"127.0.0.1:{federation['port']}") == set()
