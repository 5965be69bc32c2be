"""The coordinator's side of issue 13, piece by piece (seconds; the network attacks are in
test_security_network.py): keys and names, the proxy's configuration, the guard, the defaults."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from privet.common.certs import (
    check_key_pair,
    check_node_key,
    check_private_files,
    init_certs,
    make_node_key,
)
from privet.common.config import DeploymentConfig
from privet.common.errors import DeploymentError
from privet.server.deploy import _bind_names
from privet.server.proxy import FLEET_ROUTES, nginx_config


def test_the_default_host_is_loopback() -> None:
    assert DeploymentConfig().host == "127.0.0.1"


def test_a_key_of_another_certificate_is_one_clear_error(tmp_path: Path) -> None:
    one = init_certs(tmp_path / "one", hosts=["127.0.0.1"])
    two = init_certs(tmp_path / "two", hosts=["127.0.0.1"])
    check_key_pair(one.cert, one.key)  # a matching pair passes
    with pytest.raises(DeploymentError, match="is not the private key of the certificate") as err:
        check_key_pair(one.cert, two.key)
    assert "KEY_VALUES_MISMATCH" not in str(err.value)


def test_an_unparseable_node_key_is_reported_as_unparseable(tmp_path: Path) -> None:
    certs = init_certs(tmp_path, hosts=["127.0.0.1"])
    _, pub = make_node_key("site-a", out=tmp_path)
    check_node_key(pub)
    bad = certs.nodes / "site-b.pub"
    bad.write_text("ecdsa-sha2-nistp384 not-base64!! privet-node-site-b\n")
    with pytest.raises(DeploymentError, match=r"site-b\.pub cannot be parsed"):
        check_node_key(bad)


def test_private_keys_others_can_write_are_refused_and_readable_ones_warned(
    tmp_path: Path,
) -> None:
    certs = init_certs(tmp_path, hosts=["127.0.0.1"])
    assert check_private_files([certs.ca_key, certs.key]) == []
    os.chmod(certs.key, 0o644)
    (warning,) = check_private_files([certs.ca_key, certs.key])
    assert "server.key can be read by other users" in warning and "chmod 600" in warning
    os.chmod(certs.ca_key, 0o666)
    with pytest.raises(DeploymentError, match="ca.key can be written by other users"):
        check_private_files([certs.ca_key, certs.key])


def test_a_second_key_for_a_bound_name_is_refused(tmp_path: Path) -> None:
    init_certs(tmp_path, hosts=["127.0.0.1"])
    _, pub = make_node_key("site-a", out=tmp_path)
    record = tmp_path / "run" / "node-names.json"
    _bind_names([pub], record)
    _bind_names([pub], record)  # the same key again (a resumed run) is fine
    make_node_key("site-a", out=tmp_path, overwrite=True)  # someone swaps the key file
    with pytest.raises(DeploymentError, match="'site-a' is already registered in this run"):
        _bind_names([pub], record)


def test_the_proxy_forwards_exactly_the_fleet_routes(tmp_path: Path) -> None:
    certs = init_certs(tmp_path / "c", hosts=["127.0.0.1"])
    conf = nginx_config(
        folder=tmp_path / "p",
        host="0.0.0.0",
        port=9092,
        upstream_port=40000,
        certs=certs,
        upstream_ca=certs.ca,
    )
    # one forwarding location, for the Fleet routes a SuperNode calls; everything else 404
    assert conf.count("proxy_pass ") == 1
    assert "proxy_pass https://127.0.0.1:40000;" in conf
    (pattern,) = re.findall(r"location ~ (\S+) \{", conf)
    fleet = re.compile(pattern)
    for route in FLEET_ROUTES:
        assert fleet.match(f"/v1/fleet/{route}")
    for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/get-nodes",
                 "/v1/fleet/", "/v1/fleet/pull-messages/x", "/health", "/docs"):  # fmt: skip
        assert not fleet.match(path), path
    assert "location / { return 404; }" in conf
    assert "limit_except POST" in conf
    assert "listen 0.0.0.0:9092 ssl;" in conf and str(certs.cert) in conf
    # Flower's 5 MiB chunks fit; nginx writes nothing outside its folder
    assert "client_max_body_size 32m;" in conf
    assert "daemon off;" in conf and f"pid {tmp_path / 'p' / 'nginx.pid'};" in conf


def test_the_guard_ends_a_grandchild_in_another_session(tmp_path: Path) -> None:
    """What SuperExec does: a process in its own session, left behind when its parent dies."""
    pidfile = tmp_path / "grandchild.pid"
    spawner = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
        "start_new_session=True)\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    guard = subprocess.Popen([sys.executable, "-m", "privet.common.guard", "--",
                              sys.executable, "-c", spawner])  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        grandchild = psutil.Process(int(pidfile.read_text()))
        guard.send_signal(signal.SIGTERM)
        assert guard.wait(timeout=10) == 128 + signal.SIGTERM
        grandchild.wait(timeout=5)  # gone, not orphaned to init
        assert not grandchild.is_running()
    finally:
        if guard.poll() is None:
            guard.kill()


def test_rejections_and_skipped_rounds_reach_the_coordinators_console(tmp_path: Path) -> None:
    from privet.server.deploy import _Notes

    log = tmp_path / "run.log"
    log.write_text(
        "INFO: something else\n"
        "12/04 WARNING privet: round 1: rejected the update of site-c: update norm 4183 exceeds\n"
        "12/04 WARNING privet: round 2: not aggregated: 1 valid train replies, fewer than 2\n"
    )
    seen: list[str] = []
    _Notes(log, seen.append, offset=0).poll()
    assert seen == [
        "round 1: rejected the update of site-c: update norm 4183 exceeds",
        "round 2: not aggregated: 1 valid train replies, fewer than 2",
    ]


def test_a_round_with_fewer_replies_than_min_train_clients_keeps_the_model(tmp_path: Path) -> None:
    """Seed 3: in round 1 one of the two clients drops out, in round 2 both reply."""
    import torch

    from privet.common.config import load_config
    from privet.server.rundir import checkpoint_path, load_checkpoint, read_metrics
    from privet.simulations.run import simulate

    cfg = load_config(
        None,
        [
            "model.num_hidden_layers=1",
            "model.max_length=32",
            "data.max_examples=200",
            "data.num_clients=2",
            "federation.rounds=2",
            "federation.min_train_clients=2",
            "federation.fraction_evaluate=0",
            "privacy.enabled=false",
            "train.local_epochs=0.5",
            "train.num_threads=1",
            "faults.dropout=0.5",
            "faults.seed=3",
            "simulation.engine='inprocess'",
            f"simulation.output_dir='{tmp_path}'",
        ],
    )
    run_dir = simulate(cfg)
    r0, r1, r2 = read_metrics(run_dir)
    assert r1["aggregated"] is False and len(r1["errors"]) == 1
    assert "fewer than the 2 needed (federation.min_train_clients)" in r1["skipped"]
    assert r2["aggregated"] is True and r2["skipped"] is None
    # round 1 left the global model as it was: the same server evaluation as round 0's
    assert (r1["server_loss"], r1["server_accuracy"]) == (r0["server_loss"], r0["server_accuracy"])
    one, two = (load_checkpoint(checkpoint_path(run_dir, n)) for n in (1, 2))
    assert any(not torch.equal(one[k], two[k]) for k in one)  # round 2 trained
