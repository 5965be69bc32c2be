"""The coordinator on Flower's Deployment Engine: ``privet server``.

This is privet's only server module that knows how Flower deploys; it:

1. makes the run directory and a tiny Flower app folder in it (``flower/app/pyproject.toml``) whose
   components point at :data:`server_app` and ``privet.client.deploy:client_app`` (installed with
   privet on both sides, so the app bundle carries no code) and whose run config carries the run
   directory and the federation's configuration for the clients;
2. starts ``flower-superlink`` on a free loopback port (TLS with a per-start loopback certificate,
   node authentication, its database in the run directory) and waits for its gRPC health service;
3. registers the public keys in ``certs/nodes/`` (``flwr supernode register``, over loopback; a
   second key for a name already bound in this run is refused) and starts nginx on
   ``deployment.host:port`` with the federation's certificate, forwarding the Fleet API only
   (``server/proxy.py``): run control and registration are not reachable from the sites' network;
4. submits the run with ``flwr run --stream`` (runtime dependency installation off: privet is
   already installed), and follows ``metrics.jsonl`` so the terminal shows the same per-round
   table as a simulation;
5. ends every process it started when the run ends, fails or is interrupted.

Flower's SuperLink runs :data:`server_app` in a ``flwr-serverapp`` process of its own; that process
reads the configuration from the run directory and runs :func:`privet.server.make_server_app`.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from privet.common.certs import (
    CertPaths,
    check_certificate,
    check_key_pair,
    check_node_key,
    check_private_files,
    init_certs,
    node_public_keys,
)
from privet.common.config import PrivetConfig, dump_config, load_config
from privet.common.deployment import (
    Child,
    flower_env,
    flower_executable,
    free_port,
    wait_healthy,
)
from privet.common.errors import DeploymentError
from privet.common.protocol import CONFIG_KEY, RESUME_KEY, RUN_DIR_KEY
from privet.common.retry import attempts
from privet.server.flower_door import register_outcome
from privet.server.loop import WAITING
from privet.server.proxy import start_proxy
from privet.server.recording import NOTE_MARKS, RoundObserver, RoundRecord
from privet.server.rundir import read_metrics

__all__ = ["ServeResult", "serve", "server_app"]

log = logging.getLogger("privet")

# The run-config keys the coordinator sets for its ServerApp and the clients (RUN_DIR_KEY,
# CONFIG_KEY, RESUME_KEY) are privet.common.protocol's.

CONNECTION = "privet"

server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    """Run privet's ServerApp for the run directory named in the run config."""
    from privet.server.app import make_server_app

    run_dir = Path(str(context.run_config[RUN_DIR_KEY]))
    cfg = load_config(run_dir / "config.toml")
    resume = bool(context.run_config.get(RESUME_KEY, False))
    make_server_app(cfg, run_dir=run_dir, resume=resume, deployed=True)(grid, context)


def _write_app(folder: Path, cfg: PrivetConfig, *, run_dir: Path, resume: bool) -> Path:
    """A Flower app folder that names privet's apps and carries the run's settings."""
    folder.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "privet-federation",
            "version": "1.0.0",
            "description": "privet federation (the code is the installed privet package)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
            "flwr": {
                "app": {
                    "publisher": "privet",
                    "components": {
                        "serverapp": "privet.server.deploy:server_app",
                        "clientapp": "privet.client.deploy:client_app",
                    },
                    "config": {
                        RUN_DIR_KEY: str(run_dir.resolve()),
                        CONFIG_KEY: dump_config(cfg),
                        RESUME_KEY: resume,
                    },
                }
            },
        },
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    return folder


def _write_connection(home: Path, *, address: str, certs: CertPaths | None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    conn: dict[str, object] = {"address": address}
    if certs is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(certs.ca.resolve())
    doc = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
    (home / "config.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")


@dataclass
class ServeResult:
    """What :func:`serve` leaves behind."""

    run_dir: Path
    rounds: int


def serve(
    cfg: PrivetConfig,
    *,
    run_dir: Path,
    certs: CertPaths | None,
    observer: RoundObserver | None = None,
    resume: bool = False,
    run_timeout: float | None = None,
    on_ready: Callable[[], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> ServeResult:
    """Run the federation ``cfg`` as a coordinator until its last round, then stop every process.

    Parameters
    ----------
    cfg
        The validated configuration (``deployment`` gives host and ports).
    run_dir
        The run directory (made by the caller, ``config.toml`` written); a resumed run's folder.
    certs
        The certificate folder's paths: TLS and node authentication on; ``None``: insecure.
    observer
        Receives each finished round (read from ``metrics.jsonl``).
    resume
        Continue the run in ``run_dir`` after its last completed round.
    run_timeout
        Give up after this many seconds (default: rounds x federation.round_timeout + 10 min).
    on_ready
        Called once the SuperLink answers its health check and the node keys are registered:
        from then on sites can join.
    on_note
        Receives the ServerApp's "still waiting for ..." lines (every 30 s of a long wait for
        clients or replies: who is missing and when the round gives up), so a slow or lost site
        does not look like a hang.

    """
    dep = cfg.deployment
    # Flower's processes run in other working directories: hand them absolute paths only.
    run_dir = Path(run_dir).resolve()
    work = run_dir / "flower"
    home = work / "home"
    env = flower_env(home)
    # The SuperLink serves run control and node registration beside the Fleet API on one port:
    # it listens on loopback only, and nginx forwards the Fleet API from the public address.
    upstream = free_port("127.0.0.1")
    address = f"127.0.0.1:{upstream}"
    health = f"127.0.0.1:{dep.health_port}"
    loopback: CertPaths | None = None
    if certs is not None:
        check_key_pair(certs.cert, certs.key)
        check_certificate(certs.ca)
        for line in check_private_files([certs.ca_key, certs.key]):
            log.warning("%s", line)
        keys = node_public_keys(certs.ca.parent)
        if not keys:
            raise DeploymentError(
                f"no node keys in {certs.nodes}: with node authentication no client could join",
                fix=f"make one per site with `privet certs node SITE --out {certs.ca.parent}`",
            )
        for key in keys:
            check_node_key(key)
        _bind_names(keys, work / "node-names.json")
        # The loopback hop has its own certificate for 127.0.0.1, made per start: the federation's
        # may name only the public host, and nothing outside this machine needs to trust it.
        loopback = init_certs(work / "loopback-certs", hosts=["127.0.0.1"], overwrite=True)
        tls = [
            "--ssl-ca-certfile",
            str(loopback.ca),
            "--ssl-certfile",
            str(loopback.cert),
            "--ssl-keyfile",
            str(loopback.key),
            "--enable-supernode-auth",
        ]
    else:
        tls = ["--insecure"]
    app_dir = _write_app(work / "app", cfg, run_dir=run_dir, resume=resume)
    _write_connection(home, address=address, certs=loopback)
    _wait_for_previous_superlink(work / "superlink.db")
    children: list[Child] = []
    try:
        link = Child(
            "flower-superlink",
            [
                # The guard ends the SuperExec and ServerApp processes the SuperLink starts in
                # sessions of their own, which outlived a killed coordinator (common/guard.py).
                sys.executable,
                "-m",
                "privet.common.guard",
                "--",
                flower_executable("flower-superlink"),
                *tls,
                "--host",
                "127.0.0.1",
                "--port",
                str(upstream),
                "--health-server-address",
                health,
                "--database",
                str(work / "superlink.db"),
                "--disable-runtime-dependency-installation",
            ],
            log_file=work / "superlink.log",
            env=env,
            cwd=work,
            # If privet dies, its SuperLink dies at once (the guard SIGKILLs its whole tree): its
            # state is in SQLite (durable at each commit), while a graceful stop waits for the
            # sites' open connections (a minute was seen), holding the port and the database a
            # resumed coordinator needs.
            death_signal=signal.SIGTERM,
        )
        children.append(link)
        wait_healthy(health, child=link, timeout=dep.startup_timeout)
        if certs is not None:
            for key in node_public_keys(certs.ca.parent):
                _register(key, env=env, cwd=work)
        children.append(
            start_proxy(
                folder=work / "proxy",
                host=dep.host,
                port=dep.port,
                upstream_port=upstream,
                certs=certs,
                upstream_ca=None if loopback is None else loopback.ca,
            )
        )
        if on_ready is not None:
            on_ready()
        # A resumed run appends to the same log: only this run's lines are notes.
        run_log = work / "run.log"
        notes_from = run_log.stat().st_size if run_log.exists() else 0
        runner = Child(
            "flwr run",
            [flower_executable("flwr"), "run", str(app_dir), CONNECTION, "--stream"],
            log_file=run_log,
            env=env,
            cwd=work,
        )
        children.append(runner)
        return _follow(
            cfg,
            run_dir=run_dir,
            link=link,
            runner=runner,
            observer=observer,
            timeout=run_timeout or cfg.federation.rounds * cfg.federation.round_timeout + 600,
            on_note=on_note,
            notes_from=notes_from,
        )
    finally:
        for child in reversed(children):
            child.stop()


#: Seconds a coordinator waits for an earlier SuperLink on the same run to finish exiting.
PREVIOUS_LINK_WAIT = 30.0


def _superlinks_on(database: Path) -> list[int]:
    """Process ids of running ``flower-superlink`` processes that use ``database``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any("flower-superlink" in part for part in cmd[:2]) and str(database) in cmd:
            found.append(int(proc.info["pid"]))
    return found


def _wait_for_previous_superlink(database: Path) -> None:
    """Refuse to start a second SuperLink on one run's state while an earlier one still runs.

    Two SuperLinks on one database would each answer the sites (and the health check) for the
    same run; a crashed coordinator's SuperLink can also take a while to exit. Flower has no
    lock for this, so we look for the process.
    """
    deadline = time.monotonic() + PREVIOUS_LINK_WAIT
    while pids := _superlinks_on(database):
        if time.monotonic() >= deadline:
            raise DeploymentError(
                f"a SuperLink (pid {', '.join(map(str, pids))}) still serves this run's state "
                f"{database}: another `privet server` for this run directory is running or "
                "did not finish exiting",
                fix="stop that coordinator (or that process) first, then start this one again",
            )
        log.info("waiting for the previous SuperLink (pid %s) of this run to exit", pids)
        time.sleep(1.0)


def _bind_names(keys: list[Path], record: Path) -> None:
    """Bind each site name to its key for the life of the run: another key for a name is refused.

    The SuperLink would accept a second key under an existing name (names are labels to Flower),
    and the records name sites by it; so the first key registered for a name in this run directory
    stays that name's key (``node-names.json``), whatever later appears in ``certs/nodes/``.
    """
    import hashlib
    import json

    known: dict[str, str] = {}
    if record.exists():
        known = json.loads(record.read_text(encoding="utf-8"))
    for key in keys:
        digest = hashlib.sha256(key.read_bytes().split()[1]).hexdigest()
        if known.setdefault(key.stem, digest) != digest:
            raise DeploymentError(
                f"site {key.stem!r} is already registered in this run with another key; {key} is a "
                "second key for that name and is refused",
                fix=f"restore the site's original key in {key}, or give the new key another name",
            )
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(known, indent=1, sort_keys=True), encoding="utf-8")


#: Tries to register one node key while the SuperLink's Control API is still coming up, and the
#: pause between them (its health service can answer SERVING a moment before that API accepts).
REGISTER_TRIES = 6
REGISTER_PAUSE = 2.0


def _register(key: Path, *, env: dict[str, str], cwd: Path) -> None:
    """Register one node public key with the SuperLink (an already registered key is fine)."""
    for attempt in attempts(tries=REGISTER_TRIES, pause=REGISTER_PAUSE):
        res = subprocess.run(
            [
                flower_executable("flwr"),
                "supernode",
                "register",
                str(key),
                CONNECTION,
                # The key's file name (certs/nodes/NAME.pub) names the site in the records.
                "--name",
                key.stem,
            ],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        out = res.stdout + res.stderr
        outcome = register_outcome(res.returncode, out)
        if outcome == "registered":
            log.info("node key %s registered", key.name)
            return
        if outcome != "not yet" or attempt == REGISTER_TRIES:
            break
        log.info("the SuperLink is not taking registrations yet (try %d); again soon", attempt)
    raise DeploymentError(f"registering node key {key.name} failed: {out.strip()[-500:]}")


def _follow(
    cfg: PrivetConfig,
    *,
    run_dir: Path,
    link: Child,
    runner: Child,
    observer: RoundObserver | None,
    timeout: float,
    on_note: Callable[[str], None] | None = None,
    notes_from: int = 0,
) -> ServeResult:
    """Report each new ``metrics.jsonl`` line until the run ends; raise if it failed."""
    seen = 0
    notes = _Notes(runner.log_file, on_note, offset=notes_from)
    if observer is not None:
        observer.run_started(
            rounds=cfg.federation.rounds,
            clients=cfg.federation.min_available_clients,
            run_dir=run_dir,
        )
    deadline = time.monotonic() + timeout
    finished = False
    while time.monotonic() < deadline:
        records = read_metrics(run_dir)
        for rec in records[seen:]:
            if observer is not None:
                observer.round_finished(_record(rec))
                if rec["round"] < cfg.federation.rounds:
                    observer.round_started(int(rec["round"]) + 1)
        seen = max(seen, len(records))
        notes.poll()
        if (run_dir / "summary.json").exists():
            finished = True
        if not runner.alive() or not link.alive():
            break
        time.sleep(0.5)
    else:
        raise DeploymentError(f"the run did not finish within {timeout:.0f} s")
    records = read_metrics(run_dir)
    for rec in records[seen:]:
        if observer is not None:
            observer.round_finished(_record(rec))
    if not link.alive():
        raise DeploymentError(
            f"the SuperLink exited with status {link.proc.returncode}:\n{link.tail()}",
            fix=f"see {link.log_file}",
        )
    if not finished and not (run_dir / "summary.json").exists():
        raise DeploymentError(
            f"the run ended before its last round:\n{runner.tail(25)}",
            fix=f"see {runner.log_file} and {link.log_file}; `privet server --resume {run_dir}` "
            "continues it",
        )
    return ServeResult(
        run_dir=run_dir, rounds=len([r for r in read_metrics(run_dir) if r["round"]])
    )


class _Notes:
    """Hands the ServerApp's "still waiting" log lines (from ``flwr run --stream``) to a callback."""

    def __init__(
        self, log_file: Path, on_note: Callable[[str], None] | None, *, offset: int
    ) -> None:
        self.log_file, self.on_note, self.offset = log_file, on_note, offset

    def poll(self) -> None:
        if self.on_note is None:
            return
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:
            return
        # Only whole lines; a half-written one is read again next time.
        chunk = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(chunk)
        for line in chunk.decode("utf-8", errors="replace").splitlines():
            if WAITING in line:
                self.on_note(line[line.index(WAITING) :])
            elif mark := next((m for m in NOTE_MARKS if m in line), None):
                # A dropped reply or a skipped round: the operator must see it, not only the file.
                at = line.find("round ")
                self.on_note(line[at:] if 0 <= at < line.index(mark) else line[line.index(mark) :])


def _record(rec: dict[str, object]) -> RoundRecord:
    """A ``metrics.jsonl`` line as a record; fields another privet version wrote are left out."""
    known = RoundRecord.__dataclass_fields__
    return RoundRecord(**{k: v for k, v in rec.items() if k in known})  # type: ignore[arg-type]
