"""The coordinator's public address: nginx forwards Flower's Fleet API and nothing else.

Flower 1.41's ``flower-superlink`` serves one HTTP app on one address: the Fleet API the SuperNodes
use (``/v1/fleet/*``) and, beside it, the Control API (submit, stop and list runs, register and
unregister node keys) and the runtime routes of its own ServerApp processes. Whoever reaches that
address can run code on the coordinator (``flwr run``), stop the federation or register a key
under an existing site's name. Flower has no switch to serve those on different addresses, and its
Control API has no authentication without an enterprise plugin.

So the SuperLink listens on a free loopback port only (privet itself submits the run and registers
the node keys there), and nginx, a maintained reverse proxy, listens on the public address: it
terminates TLS with the federation's server certificate and forwards ``POST /v1/fleet/<route>``
for exactly the routes a SuperNode calls (``flwr/supernode/fleet_http_client.py``); everything
else is answered 404 (unknown path) or 403 (another method) by nginx itself. Node
authentication still holds end to end: a SuperNode signs a timestamp in its ``flwr-*`` headers,
which nginx passes unchanged to the SuperLink, which checks them.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from privet.common.certs import CertPaths
from privet.common.deployment import Child, probe_reachable
from privet.common.errors import DeploymentError
from privet.common.retry import attempts

__all__ = ["FLEET_ROUTES", "nginx_config", "nginx_executable", "start_proxy"]

#: The Fleet API routes a SuperNode calls (flwr 1.41, ``supernode/fleet_http_client.py``).
#: ``register-node`` is in the list because a SuperNode tries it, but with node authentication the
#: SuperLink refuses it: only the operator registers keys, on loopback.
FLEET_ROUTES = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)

#: Largest request body forwarded: Flower sends arrays in 5 MiB chunks (``push-object``) and an
#: app bundle is capped at 10 MB; the margin covers protobuf framing.
MAX_BODY = "32m"
#: Seconds a forwarded call may stay silent: a round's replies can take long to compute, but each
#: call is a short request; a generous bound still ends a dead connection.
PROXY_TIMEOUT = 600


def nginx_executable() -> str:
    """The path of ``nginx`` (Debian puts it in ``/usr/sbin``, often not on a user's PATH)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise DeploymentError(
            "nginx is not installed: `privet server` puts it in front of Flower's SuperLink so that "
            "only the federation protocol is reachable from the sites' network",
            fix="install it, e.g. `apt-get install nginx-light` (Debian/Ubuntu) or `dnf install nginx`",
        )
    return found


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def nginx_config(
    *,
    folder: Path,
    host: str,
    port: int,
    upstream_port: int,
    certs: CertPaths | None,
    upstream_ca: Path | None,
) -> str:
    """An nginx configuration: ``host:port`` (TLS with ``certs``) forwards the Fleet API only.

    Parameters
    ----------
    folder
        The proxy's own folder (pid file, logs, temporary files).
    host, port
        The sites' address.
    upstream_port
        The SuperLink's loopback port.
    certs
        The federation's certificates (``None``: plain HTTP, a local trial with ``--insecure``).
    upstream_ca
        The CA of the SuperLink's loopback certificate (verified by nginx); ``None``: plain HTTP.

    """
    folder = Path(folder).resolve()
    tmp = folder / "tmp"
    ssl = ""
    if certs is not None:
        ssl = (
            f"        ssl_certificate {certs.cert.resolve()};\n"
            f"        ssl_certificate_key {certs.key.resolve()};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
        )
    if upstream_ca is not None:
        upstream = f"https://127.0.0.1:{upstream_port}"
        upstream_tls = (
            f"            proxy_ssl_trusted_certificate {Path(upstream_ca).resolve()};\n"
            "            proxy_ssl_verify on;\n"
            "            proxy_ssl_name 127.0.0.1;\n"
            "            proxy_ssl_server_name on;\n"
        )
    else:
        upstream, upstream_tls = f"http://127.0.0.1:{upstream_port}", ""
    routes = "|".join(FLEET_ROUTES)
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
    return f"""# Written by privet server; regenerated at every start.
{user}daemon off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    access_log {folder / "access.log"};
    client_body_temp_path {tmp / "body"};
    proxy_temp_path {tmp / "proxy"};
    fastcgi_temp_path {tmp / "fastcgi"};
    uwsgi_temp_path {tmp / "uwsgi"};
    scgi_temp_path {tmp / "scgi"};
    server_tokens off;
    client_max_body_size {MAX_BODY};
    client_body_timeout {PROXY_TIMEOUT}s;
    large_client_header_buffers 4 16k;
    server {{
        listen {_listen(host, port)}{" ssl" if certs is not None else ""};
{ssl}        # Flower's Fleet API, route by route; nothing else of the SuperLink is reachable here.
        location ~ ^/v1/fleet/({routes})$ {{
            limit_except POST {{ deny all; }}
            proxy_pass {upstream};
{upstream_tls}            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout {PROXY_TIMEOUT}s;
            proxy_send_timeout {PROXY_TIMEOUT}s;
        }}
        location / {{ return 404; }}
    }}
}}
"""


def start_proxy(
    *,
    folder: Path,
    host: str,
    port: int,
    upstream_port: int,
    certs: CertPaths | None,
    upstream_ca: Path | None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Child:
    """Start nginx as a child (no daemon; it gets SIGTERM if privet dies) and wait for its port."""
    exe = nginx_executable()
    folder = Path(folder).resolve()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (folder / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # nginx's worker runs as nobody: it must be able to spill into its temporary folders.
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.chmod(folder / "tmp" / sub, 0o777)
    conf = folder / "nginx.conf"
    conf.write_text(
        nginx_config(
            folder=folder,
            host=host,
            port=port,
            upstream_port=upstream_port,
            certs=certs,
            upstream_ca=upstream_ca,
        ),
        encoding="utf-8",
    )
    child = Child(
        "nginx",
        # -e: the error log before the configuration is read (not /var/log/nginx).
        [exe, "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log")],
        log_file=folder / "nginx.log",
        env=env,
        cwd=folder,
        # SIGTERM is nginx's fast shutdown: the master ends its workers, then itself.
        death_signal=signal.SIGTERM,
    )
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    for _ in attempts(tries=100_000, timeout=timeout, pause=0.1):
        if not child.alive():
            err = (
                (folder / "error.log").read_text(errors="replace")
                if (folder / "error.log").exists()
                else ""
            )
            raise DeploymentError(
                f"nginx (the coordinator's public address {_listen(host, port)}) exited with status "
                f"{child.proc.returncode}: {(err.strip().splitlines() or [child.tail()])[-1]}",
                fix=f"see {folder / 'error.log'}; is deployment.port free and deployment.host an "
                "address of this machine?",
            )
        if probe_reachable(probe_host, port, timeout=0.5):
            return child
    child.stop()
    raise DeploymentError(f"nginx did not listen on {_listen(host, port)} within {timeout:.0f} s")
