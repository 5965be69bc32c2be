"""A site's policy and a coordinator crash, played with real processes (issue 13, attacks 2, 3, 6).

Two federations of real ``privet server`` and ``privet client`` processes on 127.0.0.1, TLS and
node authentication on, run side by side in one module fixture (most of their time is Flower's
start-up and admission, which overlap):

**refused**: a malicious coordinator whose run asks for noise 0.05, a budget of 1e6 and a model
folder with its own Python code plus ``trust_remote_code``. The code is real: the coordinator,
which trusts it, runs it (its marker file is written). Site a keeps every default; site b agrees
to load that folder by name (``--model``) and holds a ledger from an earlier run. Both answer with
error 1007 naming every setting they refuse, before loading anything: their marker files are never
written, site a has no ledger, site b's ledger is byte for byte what it was; the coordinator's
console and ``metrics.jsonl`` name the refusals by site name, and no round is aggregated.

**crash**: an honest federation of two rounds whose coordinator stops for good once the train
replies of round 2 are in, before round 2 is recorded (``privet server
--test-pause-after-replies 2``, hidden, test-only); the test SIGKILLs it there and resumes it with
``privet server --resume``. Both sites are asked for round 2 again with the same inputs and send
the update they already released: each ledger holds round 2 once (attempt 1), each site says
"replayed", the ledgers did not change across the restart, and ``privacy.json`` agrees with them.

Every wait is a condition with a bound; every process ends in a ``finally`` block.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from privet.client.privacy import ledger_path
from privet.common.certs import init_certs, make_node_key
from privet.common.modeling import resolve_model_path
from privet.common.privacy.ledger import open_ledger
from privet.server.rundir import read_metrics
from tests.deploy_helpers import Procs, flower_pids, free_port, write_config, write_site_files

pytestmark = pytest.mark.slow

MARKER_ENV = "PRIVET_TEST_MARKER"
ERROR_POLICY = 1007
REFUSED_SETTINGS = (
    "model.name",
    "model.trust_remote_code",
    "privacy.budget_epsilon",
    "privacy.noise_multiplier",
)


def _evil_model(folder: Path) -> Path:
    """The embedded MiniLM plus model code of its own that writes a marker file when imported."""
    shutil.copytree(resolve_model_path("embedded:all-MiniLM-L6-v2"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForSequenceClassification": "evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        "import os\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        f"_marker = os.environ.get({MARKER_ENV!r})\n"
        "if _marker:\n"
        "    with open(_marker, 'a') as fh:\n"
        "        fh.write(f'{os.getpid()}\\n')\n"
        "class EvilConfig(BertConfig):\n"
        "    pass\n"
        "class EvilModel(BertForSequenceClassification):\n"
        "    config_class = EvilConfig\n"
    )
    return folder


def _client(procs: Procs, fed: str, site: str, port: int, root: Path, data: Path, *extra: str,
            env: dict[str, str] | None = None) -> None:  # fmt: skip
    """``privet client`` for ``site`` of the federation in ``root`` (its log: ``FED-SITE``)."""
    certs = root / "certs"
    procs.start(
        f"{fed}-{site}",
        "client", "--server", f"127.0.0.1:{port}", "--ca", str(certs / "ca.pem"),
        "--key", str(certs / f"{site}.key"), "--data", str(data), "--name", site,
        "--state-dir", str(root / f"state-{site}"), "--threads", "1", *extra,
        env=env,
    )  # fmt: skip


def _wait(what: str, check: Any, timeout: float, *, alive: list[Any]) -> None:
    """Wait until ``check()``; fail at ``timeout`` or when a process in ``alive`` ended."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        for proc, log in alive:
            assert proc.poll() is None, f"{what}: a process ended early:\n{log()[-3000:]}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def played(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("site-processes")
    procs = Procs(root / "logs")
    # Transformers copies remote code into a module cache: one of this test's own.
    hf = {"HF_MODULES_CACHE": str(root / "hf-modules")}
    out: dict[str, Any] = {"root": root}

    # -- the refused federation: a malicious coordinator --------------------------------------
    bad = root / "refused"
    bad_sites = write_site_files(bad, rows=60, sites=2, test_rows=60)
    bad_certs = bad / "certs"
    init_certs(bad_certs, hosts=["127.0.0.1"])
    for name in ("site-a", "site-b"):
        make_node_key(name, out=bad_certs)
    evil = _evil_model(bad / "evil-model")
    bad_port = free_port()
    cfg = write_config(bad, port=bad_port, health_port=free_port(), rounds=1)
    text = cfg.read_text().replace(
        "target_epsilon = 20.0",
        'target_epsilon = "none"\nnoise_multiplier = 0.05\nbudget_epsilon = 1000000.0',
    )
    cfg.write_text(
        text.replace("[model]\n", f'[model]\nname = "{evil}"\ntrust_remote_code = true\n')
    )
    # Site b trained in an earlier run: its ledger, with its own budget, must not change.
    ledger_b = ledger_path(bad / "state-site-b", "site-b")
    ledger_b.parent.mkdir(parents=True)
    open_ledger(ledger_b, client_id="site-b", accountant="rdp", delta=1e-5, budget_epsilon=10.0)
    out["ledger_b_before"] = ledger_b.read_bytes()
    out["refused_run"] = bad / "runs" / "fed"

    # -- the crash federation: an honest coordinator, killed after round 2's replies ----------
    crash = root / "crash"
    crash_sites = write_site_files(crash, rows=200, sites=2, test_rows=100)
    certs = crash / "certs"
    init_certs(certs, hosts=["127.0.0.1"])
    for name in ("site-a", "site-b"):
        make_node_key(name, out=certs)
    port = free_port()
    crash_cfg = write_config(crash, port=port, health_port=free_port(), rounds=2)
    crash_cfg.write_text(crash_cfg.read_text().replace("round_timeout = 60", "round_timeout = 120"))
    run_dir = crash / "runs" / "fed"
    paused = run_dir / "flower" / "test-paused-round-2"
    out["crash_run"] = run_dir
    start = time.monotonic()
    # Seconds from the first process start to each stage (printed by -s; a slow run shows where).
    stages: dict[str, float] = {}
    out["stages"] = stages
    try:
        procs.start(
            "refused-server", "server", "--config", str(cfg), "--certs", str(bad_certs),
            env={**hf, MARKER_ENV: str(bad / "marker-coordinator")},
        )  # fmt: skip
        procs.start(
            "server", "server", "--config", str(crash_cfg), "--certs", str(certs),
            "--test-pause-after-replies", "2",
        )  # fmt: skip
        procs.wait_for("refused-server", "waiting for", timeout=180)
        stages["coordinator ready"] = time.monotonic() - start
        for name, data, extra in (
            ("site-a", bad_sites[0], ()),
            ("site-b", bad_sites[1], ("--model", str(evil), "--budget", "10", "--epsilon", "10")),
        ):
            env = {**hf, MARKER_ENV: str(bad / f"marker-{name}")}
            _client(procs, "refused", name, bad_port, bad, data, *extra, env=env)
        procs.wait_for("server", "waiting for", timeout=180)
        for name, data in (("site-a", crash_sites[0]), ("site-b", crash_sites[1])):
            _client(procs, "crash", name, port, crash, data, "--epsilon", "20")
        server = procs.procs["server"]
        _wait(
            "round 2's replies",
            paused.exists,
            420,
            alive=[(server, lambda: procs.log("server"))],
        )
        stages["paused after round 2's replies"] = time.monotonic() - start
        out["recorded_at_pause"] = [r["round"] for r in read_metrics(run_dir)]
        out["ledgers_at_pause"] = {
            n: ledger_path(crash / f"state-{n}", n).read_bytes() for n in ("site-a", "site-b")
        }
        procs.stop("server", sig=signal.SIGKILL)
        _wait("the killed coordinator's processes", lambda: not flower_pids(str(run_dir)), 20,
              alive=[])  # fmt: skip
        stages["killed coordinator gone"] = time.monotonic() - start
        procs.start("server2", "server", "--resume", str(run_dir), "--certs", str(certs))
        out["resume_rc"] = procs.procs["server2"].wait(timeout=400)
        stages["resumed run done"] = time.monotonic() - start
        out["refused_rc"] = procs.procs["refused-server"].wait(timeout=300)
    finally:
        procs.close()
    stages["all processes ended"] = time.monotonic() - start
    print("stages (s):", {k: round(v, 1) for k, v in stages.items()})
    out["logs"] = {n: procs.log(n) for n in procs.procs}
    return out


# -- attacks 2 and 3: the site's policy is the site's -----------------------------------------


def test_every_site_refuses_the_malicious_run_with_every_setting_named(played) -> None:
    logs = played["logs"]
    assert played["refused_rc"] == 0, logs["refused-server"][-3000:]
    r1 = read_metrics(played["refused_run"])[1]
    assert sorted(r1["errors"]) == ["site-a", "site-a-eval", "site-b", "site-b-eval"], r1
    assert r1["clients_trained"] == [] and r1["aggregated"] is False
    own = {"site-a": REFUSED_SETTINGS, "site-b": REFUSED_SETTINGS[1:]}
    for site, settings in own.items():
        reason = r1["errors"][site]
        assert reason.startswith("the coordinator's run asks for "), reason
        for setting in REFUSED_SETTINGS:
            assert (f"{setting} = " in reason) == (setting in settings), (setting, reason)
        assert "this site trains nothing for this run" in reason and "\n" not in reason
        # the site's console says so once, and trained nothing
        assert logs[f"refused-{site}"].count("refusing this run") == 1, logs[f"refused-{site}"]
        assert "trained on" not in logs[f"refused-{site}"]
    # The coordinator's console names each refusing site, with the policy's error code.
    console = logs["refused-server"]
    for site in ("site-a", "site-b"):
        assert f"round 1: {site} replied with an error (code {ERROR_POLICY})" in console, console
    assert "not aggregated" in console


def test_the_remote_code_ran_only_where_it_was_trusted(played) -> None:
    bad = played["root"] / "refused"
    # the code is live: the coordinator, whose own config trusts it, imported it
    assert (bad / "marker-coordinator").read_text().strip()
    # no site ever imported it, not even site b, which would load that folder by name
    assert not (bad / "marker-site-a").exists()
    assert not (bad / "marker-site-b").exists()


def test_no_ledger_was_opened_or_changed(played) -> None:
    bad = played["root"] / "refused"
    assert not ledger_path(bad / "state-site-a", "site-a").exists()
    after = ledger_path(bad / "state-site-b", "site-b").read_bytes()
    assert after == played["ledger_b_before"]
    ledger = json.loads(after)
    assert ledger["budget_epsilon"] == 10.0 and ledger["entries"] == []  # the site's own budget
    for site in ("site-a", "site-b"):
        assert not (bad / f"state-{site}" / "releases").exists()


# -- attack 6: a coordinator crash after a round's replies costs no privacy -------------------


def test_the_crash_landed_between_the_replies_and_the_record(played) -> None:
    # Killed with round 2 released by both sites and charged in their ledgers, not recorded.
    assert played["recorded_at_pause"] == [0, 1]
    for raw in played["ledgers_at_pause"].values():
        assert [e["round"] for e in json.loads(raw)["entries"]] == [1, 2]
    assert (
        "TESTING: this coordinator stops after the replies of round 2" in played["logs"]["server"]
    )


def test_the_resumed_round_is_answered_with_the_kept_updates(played) -> None:
    logs = played["logs"]
    assert played["resume_rc"] == 0, logs["server2"][-3000:]
    assert "resuming after round 1 of 2" in logs["server2"]
    records = read_metrics(played["crash_run"])
    assert [r["round"] for r in records] == [0, 1, 2]
    r2 = records[2]
    assert sorted(r2["clients_trained"]) == ["site-a", "site-b"] and r2["aggregated"] is True
    assert not r2["charged_again"] and not r2["errors"]
    for site in ("site-a", "site-b"):
        out = logs[f"crash-{site}"]
        # trained round 2 once, before the crash; asked again after the resume, it replayed
        assert out.count("round 2: trained on") == 1, out[-3000:]
        assert out.count("round 2: asked again; sent the update already released") == 1, out
        assert "Traceback" not in out


def test_each_ledger_charges_round_two_once_and_privacy_json_agrees(played) -> None:
    crash = played["root"] / "crash"
    report = json.loads((played["crash_run"] / "privacy.json").read_text())
    final = read_metrics(played["crash_run"])[-1]
    for site in ("site-a", "site-b"):
        raw = ledger_path(crash / f"state-{site}", site).read_bytes()
        assert raw == played["ledgers_at_pause"][site]  # nothing charged after the restart
        entries = json.loads(raw)["entries"]
        assert [(e["round"], e["attempt"]) for e in entries] == [(1, 1), (2, 1)]
        eps = entries[-1]["epsilon_after"]
        assert final["epsilon_per_client"][site] == pytest.approx(eps, rel=1e-9)
        info = report["sample_level"]["clients"][site]
        assert info["final_epsilon"] == pytest.approx(eps, rel=1e-9)
        assert info["sample_rate"] == pytest.approx(entries[-1]["sample_rate"])


def test_no_process_left(played) -> None:
    root = played["root"]
    assert flower_pids(str(root)) == set()
