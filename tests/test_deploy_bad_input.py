"""Bad input to a deployed client gives one clear error line, never a traceback."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from privet.common.certs import check_certificate, init_certs, make_node_key
from privet.common.deployment import parse_address, probe_server
from privet.common.errors import DeploymentError

PRIVET = str(Path(sys.executable).parent / "privet")


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A bare TLS listener on 127.0.0.1 with a certificate from `init_certs` (no Flower needed)."""
    paths = init_certs(tmp_path / "certs", hosts=["127.0.0.1"])
    yield from _serve(paths.cert, paths.key, paths.ca)


def _serve(cert: Path, key: Path, ca: Path) -> Iterator[tuple[int, Path]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1], ca
    finally:
        done.set()
        t.join(5)
        sock.close()


def test_right_ca_passes(tls_server) -> None:
    port, ca = tls_server
    probe_server("127.0.0.1", port, ca=ca)


def test_wrong_ca_is_refused(tls_server, tmp_path: Path) -> None:
    port, _ = tls_server
    other = init_certs(tmp_path / "other", hosts=["127.0.0.1"])
    with pytest.raises(
        DeploymentError, match="not trusted: self-signed certificate in certificate chain"
    ):
        probe_server("127.0.0.1", port, ca=other.ca)


def test_insecure_client_against_tls_is_refused(tls_server) -> None:
    port, _ = tls_server
    with pytest.raises(DeploymentError, match="requires TLS"):
        probe_server("127.0.0.1", port, ca=None)


def test_mismatched_certificate_is_refused(tmp_path: Path) -> None:
    paths = init_certs(tmp_path / "c", hosts=["coordinator.example.org"])
    for port, ca in _serve(paths.cert, paths.key, paths.ca):
        with pytest.raises(DeploymentError, match="mismatch"):
            probe_server("127.0.0.1", port, ca=ca)


def test_expired_certificate_is_refused(tmp_path: Path) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    paths = init_certs(tmp_path / "c", hosts=["127.0.0.1"], days=1, now=past)
    with pytest.raises(DeploymentError, match="expired on"):
        check_certificate(paths.cert)
    for port, ca in _serve(paths.cert, paths.key, paths.ca):
        with pytest.raises(DeploymentError, match="expired"):
            probe_server("127.0.0.1", port, ca=ca)


def test_unreachable_address(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    with pytest.raises(DeploymentError, match="cannot reach the coordinator"):
        probe_server("127.0.0.1", port, ca=None)
    with pytest.raises(DeploymentError, match="not host:port"):
        parse_address("coordinator.example.org")


def test_keys_are_private_and_node_names_checked(tmp_path: Path) -> None:
    paths = init_certs(tmp_path / "c", hosts=["127.0.0.1", "localhost"])
    for key in (paths.key, paths.ca_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    private, public = make_node_key("site-a", out=tmp_path / "c")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    with pytest.raises(DeploymentError, match="exists"):
        make_node_key("site-a", out=tmp_path / "c")
    with pytest.raises(DeploymentError, match="not allowed"):
        make_node_key("../evil", out=tmp_path / "c")
    with pytest.raises(DeploymentError, match="lock out"):
        init_certs(tmp_path / "c", hosts=["127.0.0.1"])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PRIVET, *args], capture_output=True, text=True, timeout=120)


def test_cli_wrong_column_and_wrong_ca_one_line(tls_server, tmp_path: Path) -> None:
    port, _ = tls_server
    bad = tmp_path / "bad.csv"
    bad.write_text("review,label\ngreat film,1\n")
    good = tmp_path / "good.csv"
    good.write_text("text,label\ngreat film,1\nawful,0\nfine,1\n")
    other = init_certs(tmp_path / "other", hosts=["127.0.0.1"])
    common = ["client", "--server", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "s")]
    for args, expected in (
        (["--data", str(bad), "--ca", str(other.ca)], "text"),
        (["--data", str(good), "--ca", str(other.ca)], "not trusted"),
        (["--data", str(good)], "--ca"),
    ):
        res = _cli(*common, *args)
        assert res.returncode == 2, res.stderr
        lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], res.stderr
        assert "Traceback" not in res.stderr + res.stdout


def test_sites_writes_each_clients_share_once(tmp_path: Path) -> None:
    import pandas as pd
    from typer.testing import CliRunner

    from privet.simulations.cli import app

    rows = pd.DataFrame({"text": [f"review number {i}" for i in range(60)], "label": [0, 1] * 30})
    rows.to_csv(tmp_path / "all.csv", index=False)
    sets = [
        "data.source='files'",
        f"data.train_files=['{tmp_path / 'all.csv'}']",
        "data.num_clients=3",
        "data.server_test_fraction=0.2",
    ]
    res = CliRunner().invoke(
        app, ["sites", "--out", str(tmp_path / "sites"), *(x for s in sets for x in ("--set", s))]
    )
    assert res.exit_code == 0, res.output
    parts = [pd.read_csv(tmp_path / "sites" / f"client-{i}.csv") for i in range(3)]
    texts = [t for p in parts for t in p["text"]]
    # Every client row once, none of the coordinator's held-out test rows.
    assert len(texts) == len(set(texts)) == 48
    assert set(texts) < set(rows["text"])
    assert all(list(p.columns) == ["text", "label"] and len(p) == 16 for p in parts)
    # Byte for byte the CSV it always wrote: a header, then each client's train and test rows.
    from privet.common.config import load_config
    from privet.common.data import cached_federated_data

    fed = cached_federated_data(load_config(None, sets).data)
    for i, client in enumerate(fed.clients):
        lines = ["text,label"] + [
            f"{t},{y}"
            for part in (client.train, client.test)
            for t, y in zip(part.texts, part.labels.tolist(), strict=True)
        ]
        written = (tmp_path / "sites" / f"client-{i}.csv").read_bytes()
        assert written == ("\r\n".join(lines) + "\r\n").encode()
