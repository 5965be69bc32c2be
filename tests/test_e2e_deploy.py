"""End to end across processes: a coordinator and two sites with TLS and node authentication, DP on.

Site a is ``privet client``; site b is the partner-app example (examples/partner_app), which embeds
``privet.client.Participant``, reports its status and leaves after the last round.

Everything listens on 127.0.0.1 (free ports); every wait is bounded; every process is ended in a
finally block, and the last test checks that none is left.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from privet.common.certs import init_certs, make_node_key
from privet.server.rundir import read_metrics
from tests.deploy_helpers import Procs, flower_pids, free_port, write_config, write_site_files

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[1] / "examples" / "partner_app" / "app.py"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("deploy")
    sites = write_site_files(root, rows=800)
    certs = root / "certs"
    init_certs(certs, hosts=["127.0.0.1", "localhost"])
    keys = [make_node_key(name, out=certs)[0] for name in ("site-a", "site-b")]
    # A key the coordinator never saw: made elsewhere, its public half not in certs/nodes/.
    rogue_key, _ = make_node_key("rogue", out=root / "elsewhere")
    port = free_port()
    cfg = write_config(root, port=port, health_port=free_port())
    procs = Procs(root / "logs")
    try:
        procs.start("server", "server", "--config", str(cfg), "--certs", str(certs))
        procs.wait_for("server", "waiting for", timeout=120)
        procs.start(
            "client-a",
            "client", "--server", f"127.0.0.1:{port}", "--ca", str(certs / "ca.pem"),
            "--key", str(keys[0]), "--data", str(sites[0]), "--state-dir", str(root / "state-a"),
            "--threads", "1",
        )  # fmt: skip
        procs.start(
            "partner",
            argv=[
                sys.executable, str(APP), "--server", f"127.0.0.1:{port}",
                "--ca", str(certs / "ca.pem"), "--key", str(keys[1]), "--name", "site-b",
                "--data", str(sites[1]), "--state-dir", str(root / "state-b"), "--rounds", "2",
                "--budget", "20", "--timeout", "400",
            ],
        )  # fmt: skip
        procs.start(
            "rogue",
            "client", "--server", f"127.0.0.1:{port}", "--ca", str(certs / "ca.pem"),
            "--key", str(rogue_key), "--data", str(sites[0]), "--state-dir", str(root / "state-r"),
        )  # fmt: skip
        procs.start(
            "plain",
            "client", "--server", f"127.0.0.1:{port}", "--insecure",
            "--data", str(sites[0]), "--state-dir", str(root / "state-p"),
        )  # fmt: skip
        server_rc = procs.procs["server"].wait(timeout=400)
        partner_rc = procs.procs["partner"].wait(timeout=60)
        result = {
            "root": root,
            "run_dir": root / "runs" / "fed",
            "server_rc": server_rc,
            "partner_rc": partner_rc,
            "port": port,
            "plain_rc": procs.procs["plain"].wait(timeout=60),
            "logs": {n: procs.log(n) for n in procs.procs},
        }
    finally:
        procs.close()
    result["logs"].update({n: procs.log(n) for n in procs.procs})
    return result


def test_run_completes_and_learns(federation) -> None:
    assert federation["server_rc"] == 0, federation["logs"]["server"][-3000:]
    records = read_metrics(federation["run_dir"])
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(len(r["clients_trained"]) == 2 for r in records[1:])
    assert records[2]["server_accuracy"] > records[0]["server_accuracy"]
    out = federation["logs"]["server"]
    assert "round 2:" in out and "final server test accuracy" in out
    assert "round 2: trained on" in federation["logs"]["client-a"]
    for name in (
        "summary.json",
        "final_adapter/adapter_config.json",
        "checkpoints/round-0002.safetensors",
    ):
        assert (federation["run_dir"] / name).exists(), name


def test_each_site_ledger_holds_cumulative_epsilon(federation) -> None:
    final = read_metrics(federation["run_dir"])[-1]["epsilon_per_client"]
    eps = []
    for name in ("a", "b"):
        ledger = json.loads(
            (federation["root"] / f"state-{name}" / f"ledger-site-{name}.json").read_text()
        )
        entries = ledger["entries"]
        assert [e["round"] for e in entries] == [1, 2]
        assert 0 < entries[0]["epsilon_after"] < entries[1]["epsilon_after"] <= 20.0 + 1e-6
        eps.append(entries[1]["epsilon_after"])
        log = federation["logs"]["client-a" if name == "a" else "partner"]
        assert f"{entries[1]['epsilon_after']:.3f}" in log
    assert sorted(eps) == pytest.approx(sorted(final.values()), rel=1e-9)


def test_unregistered_node_and_plain_client_are_refused(federation) -> None:
    # the run above finished with exactly the two registered sites in every round
    for rec in read_metrics(federation["run_dir"])[1:]:
        assert len(rec["clients_trained"]) == 2 and not rec["errors"]
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


def test_no_flower_process_left(federation) -> None:
    root = str(federation["root"])
    assert flower_pids(root) == set()
    assert flower_pids(f"127.0.0.1:{federation['port']}") == set()


def test_partner_app_joined_reported_and_left_cleanly(federation) -> None:
    out = federation["logs"]["partner"]
    assert federation["partner_rc"] == 0, out[-3000:]
    assert "status: connected=True" in out
    assert "done: trained 2 round(s)" in out and "\nstopped" in out
    assert "Traceback" not in out
    ledger = json.loads((federation["root"] / "state-b" / "ledger-site-b.json").read_text())
    assert ledger["budget_epsilon"] == 20.0  # the partner's own budget
