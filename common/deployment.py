"""Child processes, readiness and reachability for deployed federations (no Flower imports).

``privet server`` and ``privet client`` start Flower's ``flower-superlink`` / ``flower-supernode``
executables as children. Every child gets its own process group and is ended with its whole tree
(SuperLink starts a SuperExec, which starts ServerApp processes) when the command ends, on error and
on Ctrl-C too. Readiness is the gRPC health service those executables offer
(``--health-server-address``), polled with a bounded number of tries; reachability and the
coordinator's certificate are checked before a SuperNode starts, so a wrong CA, an expired or
mismatched certificate or an unreachable address give one clear line instead of endless retries.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from privet.common.errors import DeploymentError
from privet.common.retry import attempts

__all__ = [
    "Child",
    "adopt_orphans",
    "end_processes",
    "flower_env",
    "flower_executable",
    "free_port",
    "health_status",
    "parse_address",
    "probe_reachable",
    "probe_server",
    "wait_healthy",
]

log = logging.getLogger("privet")


def flower_executable(name: str) -> str:
    """The path of a Flower console script installed beside this Python (a venv's ``bin/``)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    import shutil

    found = shutil.which(name)
    if found is None:
        raise DeploymentError(
            f"Flower's {name!r} executable is not installed", fix="pip install 'flwr==1.41.*'"
        )
    return found


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower's executables: their own ``FLWR_HOME``, no telemetry, no installs."""
    env = dict(os.environ)
    # Flower's processes start each other by name (flower-superexec, flwr-serverapp): find ours.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # privet is installed on both sides; a per-run `uv sync` would download torch again.
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    Path(home).mkdir(parents=True, exist_ok=True)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too), refusing anything else with one clear line."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeploymentError(
            f"server address {address!r} is not host:port", fix="e.g. --server 10.0.0.5:9092"
        )
    return host, int(port)


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Resolved once in the parent: between fork and exec the child may only call it, not import.
_PRCTL = _load_prctl()


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In the child, before exec: ask Linux to send it ``sig`` when its parent dies.

    A ``privet client`` that is SIGKILLed cannot stop its SuperNode; without this the SuperNode
    would stay registered and hold the federation's rounds until they time out. With SIGTERM the
    SuperNode shuts down cleanly and deactivates itself at the SuperLink, which then answers the
    node's pending messages with errors at once (Linux only; a no-op elsewhere).
    """
    if _PRCTL is not None:
        _PRCTL(1, int(sig))  # 1 = PR_SET_PDEATHSIG


def adopt_orphans(enabled: bool) -> bool:
    """Make this process adopt its descendants' orphans (Linux ``PR_SET_CHILD_SUBREAPER``).

    Ray's workers are children of its raylet; when ``ray.shutdown()`` ends the raylet, a worker
    still exiting (or one the raylet started during the shutdown) is handed to init, where no one
    ends it: it was seen alive 15 s later on a loaded machine. As a subreaper this process gets
    those orphans instead, so it can end and reap every process a run started. Returns whether
    the setting took (``False`` off Linux).
    """
    if _PRCTL is None:
        return False
    return bool(_PRCTL(36, int(enabled)) == 0)  # 36 = PR_SET_CHILD_SUBREAPER


class Child:
    """A child process in its own process group, logging to a file; :meth:`stop` ends its tree.

    It gets ``death_signal`` (SIGTERM unless told otherwise) when the thread that started it ends
    (Linux ``PR_SET_PDEATHSIG``), so start it from a thread that lives as long as the child should.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_file: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        death_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.log_file = Path(log_file)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(self.log_file, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,  # own group: Ctrl-C in the terminal reaches us, not it
            preexec_fn=functools.partial(_die_with_parent, death_signal),
        )

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the child is still running."""
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        """The last lines of the child's log."""
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """End the child and every process it started: SIGTERM, then SIGKILL after ``timeout``."""
        import psutil

        try:
            tree = [psutil.Process(self.proc.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.Error:
            tree = []

        def group(sig: int) -> None:
            # The child's own process group first: members that left the tree are in it too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

        end_processes(tree, timeout=timeout, also=group)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        self._log.close()


def end_processes(
    procs: Sequence[Any], *, timeout: float = 5.0, also: Callable[[int], None] | None = None
) -> list[Any]:
    """End ``procs`` (psutil processes): SIGTERM, then SIGKILL those alive after ``timeout`` s.

    The one "terminate, then kill" of privet: a coordinator's and a site's child processes, and
    the Ray workers a simulation started. ``also(sig)`` runs before each signal is sent (e.g. to
    signal a process group). Returns the processes still alive at the end (normally none).
    """
    import psutil

    alive = list(procs)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if also is not None:
            also(sig)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        _, alive = psutil.wait_procs(alive, timeout=timeout)
        if not alive:
            break
    return list(alive)


def health_status(address: str, *, timeout: float = 1.0) -> str:
    """The gRPC health status (``SERVING``, ``NOT_SERVING``, ...) at ``address``, or ``UNREACHABLE``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            res = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(res.status))


def wait_healthy(address: str, *, child: Child | None = None, timeout: float = 60.0) -> None:
    """Poll the gRPC health service at ``address`` until it says SERVING (at most ``timeout`` s)."""
    for _ in attempts(tries=10_000, timeout=timeout, pause=0.2):
        if health_status(address, timeout=1.0) == "SERVING":
            return
        if child is not None and not child.alive():
            raise DeploymentError(
                f"{child.name} exited with status {child.proc.returncode} while starting:\n"
                f"{child.tail()}",
                fix=f"see {child.log_file}",
            )
    where = f"; see {child.log_file}" if child is not None else ""
    raise DeploymentError(f"no healthy service at {address} after {timeout:.0f} s{where}")


def probe_reachable(host: str, port: int, *, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def probe_server(host: str, port: int, *, ca: Path | None, timeout: float = 10.0) -> None:
    """Check that ``host:port`` answers and, with ``ca``, that its certificate verifies.

    Raises one :class:`DeploymentError` line for: an unreachable address, a certificate that is
    expired, names another host or was not signed by ``ca``, and (without ``ca``) a coordinator
    that requires TLS.
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise DeploymentError(
            f"cannot reach the coordinator at {host}:{port} ({exc.strerror or exc})",
            fix="check --server and that `privet server` is running and reachable",
        ) from None
    with sock:
        if ca is None:
            # An insecure client against a TLS coordinator would retry forever: say so now.
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            try:
                with ctx.wrap_socket(sock, server_hostname=host):
                    pass
            except (ssl.SSLError, OSError):
                return  # not a TLS server: an insecure coordinator, as asked
            raise DeploymentError(
                f"the coordinator at {host}:{port} requires TLS",
                fix="pass --ca with the federation's ca.pem instead of --insecure",
            )
        try:
            ctx = ssl.create_default_context(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise DeploymentError(f"cannot read the CA file {ca} ({exc})") from None
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as exc:
            raise DeploymentError(
                f"the coordinator's certificate at {host}:{port} is not trusted: {exc.verify_message}",
                fix="pass the federation's ca.pem with --ca and connect by a name in the certificate "
                "(`privet certs init --host ...`); renew an expired certificate",
            ) from None
        except (ssl.SSLError, OSError) as exc:
            raise DeploymentError(
                f"TLS handshake with {host}:{port} failed ({exc})",
                fix="the coordinator may run with --insecure; ask its operator",
            ) from None
