"""The partner-app example starts, joins, reports status and stops with no process left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy_helpers import Procs, flower_pids, free_port, write_config, write_site_files

pytestmark = pytest.mark.slow

APP = Path(__file__).resolve().parents[1] / "examples" / "partner_app" / "app.py"


def test_partner_app_joins_reports_and_stops(tmp_path: Path) -> None:
    sites = write_site_files(tmp_path, rows=200, sites=1)
    port = free_port()
    cfg = write_config(tmp_path, port=port, health_port=free_port(), rounds=1)
    text = cfg.read_text().replace(
        "rounds = 1", "rounds = 1\nmin_train_clients = 1\nmin_available_clients = 1"
    )
    cfg.write_text(text)
    procs = Procs(tmp_path / "logs")
    try:
        procs.start("server", "server", "--config", str(cfg), "--insecure")
        procs.wait_for("server", "waiting for", timeout=120)
        app = subprocess.run(
            [
                sys.executable, str(APP), "--server", f"127.0.0.1:{port}", "--insecure",
                "--data", str(sites[0]), "--state-dir", str(tmp_path / "partner-state"),
                "--rounds", "1", "--timeout", "300",
            ],
            capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        server_rc = procs.procs["server"].wait(timeout=120)
    finally:
        procs.close()
    out = app.stdout + app.stderr
    assert app.returncode == 0, out[-3000:]
    assert "status: connected=True" in out
    assert "done: trained 1 round(s)" in out and app.stdout.rstrip().endswith("stopped")
    assert "Traceback" not in out
    ledger = json.loads((tmp_path / "partner-state" / "ledger-partner.json").read_text())
    assert [e["round"] for e in ledger["entries"]] == [1]
    assert ledger["budget_epsilon"] == 20.0  # the partner's own budget
    assert server_rc == 0, procs.log("server")[-3000:]
    assert flower_pids(str(tmp_path)) == set()
