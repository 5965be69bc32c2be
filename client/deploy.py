"""A site's client on Flower's Deployment Engine: ``privet client`` and the deployed ClientApp.

This is privet's only client module that knows how Flower deploys. :class:`SiteClient` checks the
coordinator (reachable, certificate trusted, TLS as asked), writes the site's own settings
(``client.json``: data file, columns, privacy budget, state folder) into its state folder, and runs
``flower-supernode`` as a child with node authentication. The SuperNode runs :data:`client_app`
for each message; it reads the federation's configuration from the run config the coordinator
sent, the site's settings from ``client.json``, and trains on the site's own data file only.

Privacy and code are the site's: its :class:`~privet.client.policy.SitePolicy` (its own settings,
or safe defaults: DP on, epsilon 8, the embedded model, no remote code) decides the privacy it
grants and the model it loads; a run that asks for less privacy, another model or remote code is
refused before anything is loaded or trained (error code :data:`ERROR_POLICY`), and the site's
ledger, budget and kept updates live in its state folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from privet.client import flower_door as door
from privet.client.policy import SitePolicy, apply_policy, check_model_files
from privet.common.config import PrivetConfig, format_validation_error
from privet.common.data import (
    ClientData,
    Examples,
    GenerationExamples,
    LabelledRows,
    load_instructions,
    load_table,
    train_test_split,
)
from privet.common.data.instructions import file_shape
from privet.common.deployment import (
    Child,
    flower_env,
    flower_executable,
    free_port,
    health_status,
    parse_address,
    probe_server,
    wait_healthy,
)
from privet.common.errors import (
    ConfigError,
    DataError,
    DeploymentError,
    ModelError,
    PrivacyError,
    PrivetError,
)
from privet.common.protocol import CONFIG_KEY, ErrorCode

__all__ = [
    "ERROR_POLICY",
    "SiteClient",
    "SiteSettings",
    "client_app",
    "load_site_data",
    "make_site_app",
    "split_site_data",
]

log = logging.getLogger("privet")

#: Seconds a just-handed-over reply gets to leave the SuperNode before it is stopped.
DRAIN_SECONDS = 3.0

#: Seconds a restarted site waits when the coordinator still counts its node as online and signing
#: it off (:func:`~privet.client.flower_door.deactivate_node`) did not work.
#: Flower 1.41 keeps a node ONLINE until it misses HEARTBEAT_PATIENCE heartbeats (2 x 30 s) and
#: refuses to activate the same key meanwhile (ApiError 2004, SuperNode exit 305); a SuperNode
#: that was SIGKILLed never deactivates its node. The 5 s on top make sure the node was seen
#: offline first: the coordinator then answers the message the dead SuperNode held with Flower's
#: "Node Unavailable" error instead of waiting for it until federation.round_timeout.
ACTIVATION_WAIT = door.HEARTBEAT_PATIENCE * door.HEARTBEAT_DEFAULT_INTERVAL + 5.0

#: Seconds a starting SuperNode gets to be admitted by the coordinator (it was reachable a moment
#: before, in the preflight).
ADMISSION_TIMEOUT = 120.0

#: The file in the state folder that says which coordinator admitted this site's key before.
ADMITTED_FILE = "admitted.json"

#: The file in the state folder naming the node the coordinator admitted this site as last time
#: (the SuperLink binds one node id to a registered key; a restart signs that node off first).
NODE_FILE = "node.json"

#: Node-config key naming the site's settings file, and the run-config key of the federation config.
SETTINGS_KEY = "privet-client"

#: Error code of a reply refusing a run that asks for more than the site's policy grants.
ERROR_POLICY = int(ErrorCode.POLICY)


class SiteSettings(BaseModel):
    """What a site decides for itself: its data, its policy (privacy, model), where its state lives."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[A-Za-z0-9._-]+$", description="The site's name (its ledger's client id)."
    )
    data_file: Path | None = Field(
        None, description="The site's own CSV/JSONL/Parquet file (None: data given in memory)."
    )
    text_column: str = Field("text", min_length=1, description="Column holding the text.")
    label_column: str = Field("label", min_length=1, description="Column holding the label.")
    test_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of the site's rows kept for evaluation."
    )
    state_dir: Path = Field(description="Folder of the site's privacy ledger; must persist.")
    policy: SitePolicy = Field(
        default_factory=SitePolicy,
        description="The privacy this site grants and the model it loads (never the "
        "coordinator's); default: DP on at epsilon 8, the embedded model, no remote code.",
    )
    num_threads: int | None = Field(None, ge=1, description="torch threads for training.")
    reconnect_timeout: float | None = Field(
        600.0,
        gt=0,
        description="Seconds the SuperNode keeps trying to reach a coordinator that went away "
        "(restart, network) before it gives up (Flower's --max-wait-time); None: forever.",
    )

    def save(self) -> Path:
        """Write the settings as ``client.json`` in the state folder; return its path."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / "client.json"
        path.write_text(self.model_dump_json(indent=2), encoding="utf-8")
        return path


def split_site_data(
    examples: Examples | GenerationExamples, *, name: str, test_fraction: float, where: str
) -> ClientData:
    """A site's train/test split of its examples (seeded by the site's name: stable across runs)."""
    seed = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")
    train, test = train_test_split(np.arange(len(examples)), test_fraction, seed)
    if train.size == 0:
        raise DataError(
            f"{where} has {len(examples)} rows: none left to train on",
            fix="use more rows or a smaller test fraction",
        )
    return ClientData(name=name, train=examples.subset(train), test=examples.subset(test))


def load_site_data(
    settings: SiteSettings, *, num_labels: int | None, label_names: list[str] | None = None
) -> ClientData:
    """The site's train/test split of its own data file (columns and labels checked).

    A JSON lines file of ``prompt``/``completion``, chat ``messages`` or plain ``text`` rows is
    data for a causal LM (:class:`GenerationExamples`); any other file is a table of labelled
    texts.
    """
    if settings.data_file is None:
        raise DataError("this site names no data file", fix="pass --data FILE")
    shape = file_shape(
        settings.data_file, text_column=settings.text_column, label_column=settings.label_column
    )
    examples: Examples | GenerationExamples
    if shape == "instructions":
        examples = load_instructions([settings.data_file])[0]
    else:
        examples = load_table(
            settings.data_file,
            text_column=settings.text_column,
            label_column=settings.label_column,
            num_labels=num_labels,
            label_names=label_names,
        )
    return split_site_data(
        examples,
        name=settings.name,
        test_fraction=settings.test_fraction,
        where=str(settings.data_file),
    )


def _check_task(cfg: PrivetConfig, local: ClientData, where: str) -> None:
    """Refuse a site whose data is of the other task than the run's (one line, not a traceback)."""
    generative = isinstance(local.train, GenerationExamples)
    if cfg.model.task == "causal_lm" and not generative:
        raise DataError(
            f"{where} holds labelled texts, but this run fine-tunes a causal language model "
            "(model.task = 'causal_lm')",
            fix="give this site a JSON lines file of {'prompt': ..., 'completion': ...}, "
            "{'messages': [...]} or {'text': ...} rows",
        )
    if cfg.model.task != "causal_lm" and generative:
        raise DataError(
            f"{where} holds data for a causal language model (prompt/completion, chat or plain "
            f"text rows), but this run trains a classifier (model.task = {cfg.model.task!r})",
            fix="give this site a file of labelled texts (text and label columns)",
        )


def _site_config(server_cfg: PrivetConfig, site: SiteSettings) -> tuple[PrivetConfig, float | None]:
    """The configuration this site trains with, and its noise floor (its policy applied).

    Raises
    ------
    PrivacyError, ModelError
        When the coordinator's run asks for more than the site's policy grants.

    """
    cfg, floor = apply_policy(server_cfg, site.policy)
    check_model_files(site.policy.model)  # before the model is loaded
    if site.num_threads is not None:
        cfg = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"num_threads": site.num_threads})}
        )
    return cfg, floor


def make_site_app(
    site: SiteSettings | None = None,
    examples: Examples | LabelledRows | GenerationExamples | None = None,
) -> ClientApp:
    """The ClientApp a site runs: the coordinator's recipe, the site's policy and data.

    The coordinator's configuration comes with the run (its run config); the site's policy checks
    it (a run asking for less privacy, another model or remote code is answered with an
    :data:`ERROR_POLICY` error reply, nothing loaded, trained or charged), and the site trains
    only on its own data. Released updates are kept in the state folder, so a round asked again
    after a coordinator's crash is answered with the same update at no privacy cost.

    Parameters
    ----------
    site
        The site's settings; ``None``: read ``client.json`` named by the node config (the app
        Flower loads from the run's bundle when a SuperNode runs ClientApps itself).
    examples
        The site's examples in memory (the embedding API); ``None``: ``site.data_file``. Rows
        whose labels are class names are mapped with the run's ``data.label_names``;
        :class:`GenerationExamples` (prompts and completions) serve a ``causal_lm`` run.

    """
    from privet.client.app import make_client_app

    built: dict[str, ClientApp] = {}
    refused: dict[str, PrivetError] = {}

    def app_for(context: Context) -> ClientApp:
        raw = str(context.run_config[CONFIG_KEY])
        try:
            s = site or SiteSettings.model_validate_json(
                Path(str(context.node_config[SETTINGS_KEY])).read_text(encoding="utf-8")
            )
            key = raw + "\0" + s.model_dump_json()
            if key in built:
                return built[key]
            if key in refused:
                raise refused[key]
            server_cfg = PrivetConfig.model_validate(tomllib.loads(raw))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from None
        try:
            cfg, floor = _site_config(server_cfg, s)
        except PrivetError as exc:
            # Said once per run on the site's console; every message of the run is refused.
            log.error("refusing this run: %s", exc)
            refused.clear()
            refused[key] = exc
            raise
        if examples is None:
            local = load_site_data(
                s, num_labels=cfg.data.num_labels, label_names=cfg.data.label_names
            )
            where = str(s.data_file)
        elif isinstance(examples, GenerationExamples):
            local = split_site_data(
                examples, name=s.name, test_fraction=s.test_fraction, where="the site's data"
            )
            where = "this site's data"
        else:
            n = cfg.data.num_labels or 2
            if isinstance(examples, LabelledRows):  # a Participant's rows: names take the run's
                own = examples.examples(num_labels=n, label_names=cfg.data.label_names)
            else:
                own = examples
            if len(own) and int(own.labels.max()) >= n:
                raise DataError(
                    f"this site's labels go up to {int(own.labels.max())}; the federation has "
                    f"{n} classes",
                    fix=f"labels are class indices 0..{n - 1}",
                )
            local = split_site_data(
                own, name=s.name, test_fraction=s.test_fraction, where="the site's data"
            )
            where = "this site's data"
        _check_task(cfg, local, where)
        built.clear()  # one federation at a time: drop the model of an older run
        built[key] = make_client_app(
            cfg,
            state_dir=s.state_dir,
            local=local,
            min_noise_multiplier=floor,
            keep_releases=True,
        )
        return built[key]

    def handle(msg: Message, context: Context) -> Message:
        try:
            inner = app_for(context)
        except (PrivacyError, ModelError) as exc:
            # Before anything is loaded or trained: the coordinator learns why, nothing is spent.
            return Message(Error(code=ERROR_POLICY, reason=str(exc)), reply_to=msg)
        except DataError as exc:
            # The site's data does not fit the run (e.g. a class name the federation lacks): one
            # line for both sides, not a traceback.
            from privet.client.app import ERROR_CLIENT

            log.error("this site's data does not fit this run: %s", exc)
            return Message(Error(code=ERROR_CLIENT, reason=str(exc)), reply_to=msg)
        return inner(msg, context)

    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return handle(msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return handle(msg, context)

    return app


#: What Flower loads from the run's bundle when a SuperNode runs ClientApps in its own processes.
client_app = make_site_app()


def _read_log(log_path: Path) -> str:
    try:
        return log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _admissions(log_path: Path) -> int:
    """How many times a SuperNode logging to ``log_path`` was admitted (the log is appended)."""
    return door.admissions(_read_log(log_path))


def _live_supernodes(settings_path: Path) -> list[int]:
    """Process ids of running ``flower-supernode`` processes started for this site's settings."""
    import psutil

    marker = str(settings_path.resolve())
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any("flower-supernode" in part for part in cmd[:2]) and any(marker in a for a in cmd):
            found.append(int(proc.info["pid"]))
    return found


class SiteClient:
    """A ``flower-supernode`` child that joins the coordinator at ``server`` for this site.

    Parameters
    ----------
    settings
        The site's settings (data, privacy, state folder).
    server
        The coordinator's ``host:port``.
    ca
        The federation's CA certificate (TLS); ``None`` with ``insecure``.
    key
        The node's private key (``privet certs node``) for node authentication.
    insecure
        Connect without TLS (local trials only).

    """

    def __init__(
        self,
        settings: SiteSettings,
        *,
        server: str,
        ca: Path | None,
        key: Path | None,
        insecure: bool = False,
        examples: Examples | LabelledRows | GenerationExamples | None = None,
    ) -> None:
        if (ca is None) != insecure:
            raise DeploymentError(
                "say how to connect: --ca CA.pem (TLS) or --insecure (local trials only)",
                fix="pass exactly one of --ca and --insecure",
            )
        self.settings = settings
        self.server = server
        self.host, self.port = parse_address(server)
        # Absolute: the SuperNode runs in the state folder, not in the caller's directory.
        self.ca = Path(ca).resolve() if ca is not None else None
        self.key = Path(key).resolve() if key is not None else None
        self.examples = examples
        self.app = make_site_app(settings, examples)
        self.child: Child | None = None
        self.health = self.runtime = ""
        self._last_reply = float("-inf")
        self._log_path: Path | None = None

    def preflight(self) -> None:
        """Check the data file and the coordinator before anything starts (one clear error)."""
        if self.examples is None:
            load_site_data(self.settings, num_labels=None)
        if self.key is not None and not Path(self.key).is_file():
            raise DeploymentError(
                f"node key {self.key} does not exist", fix="make it with `privet certs node SITE`"
            )
        probe_server(self.host, self.port, ca=self.ca)

    def start(
        self,
        *,
        log_file: Path | None = None,
        on_wait: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """Start the SuperNode; returns once the coordinator admitted it (health SERVING).

        A site restarted soon after its SuperNode was killed finds its node still counted as
        online by the coordinator, which refuses the same key until the old node's heartbeat
        expires. When this site was admitted by this coordinator with this key before, the refusal
        is waited out once (:data:`ACTIVATION_WAIT`, ``on_wait`` says so; ``stop`` cuts it short)
        and the start is tried again; a second refusal, or a first one for a key never admitted
        here, raises. Before that, a site that knows the node it was admitted as signs that node
        off itself (:meth:`release_previous_node`), so a restart right after a crash rejoins at
        once and the refusal does not come.
        """
        self.release_previous_node()
        try:
            self._start_once(log_file)
        except DeploymentError:
            if not self._refused_after_restart():
                raise
            self._stop_child()
            why = (
                f"the coordinator still counts this site's node as connected (its previous "
                f"SuperNode ended without signing off); Flower releases it within 60 s: trying "
                f"again in {ACTIVATION_WAIT:.0f} s"
            )
            if on_wait is None:
                log.warning("%s", why)
            else:
                on_wait(why)
            if (stop or threading.Event()).wait(ACTIVATION_WAIT):
                raise DeploymentError("stopped while waiting to rejoin") from None
            self._start_once(log_file)
        self._admitted_path().parent.mkdir(parents=True, exist_ok=True)
        self._admitted_path().write_text(json.dumps(self._admission()), encoding="utf-8")
        node = door.admitted_node_id(_read_log(self._log_path)) if self._log_path else None
        if node is not None:
            (self._admitted_path().parent / NODE_FILE).write_text(
                json.dumps({"node_id": node}), encoding="utf-8"
            )

    def _admitted_path(self) -> Path:
        return self.settings.state_dir / "flower" / ADMITTED_FILE

    def _previous_node(self) -> int | None:
        """The node this site was admitted as by this coordinator with this key, if known."""
        try:
            known = json.loads(self._admitted_path().read_text(encoding="utf-8"))
            node = json.loads((self._admitted_path().parent / NODE_FILE).read_text("utf-8"))
        except (OSError, ValueError):
            return None
        if known != self._admission() or not isinstance(node.get("node_id"), int):
            return None
        return int(node["node_id"])

    def release_previous_node(self) -> bool:
        """Sign off the node a killed SuperNode of this site left online; whether it was online.

        Flower keeps the node of a SuperNode that could not sign off (SIGKILL, a host crash)
        ONLINE for 60 s and refuses the site's key meanwhile. The site knows its node id (the
        SuperLink binds one to its registered key) and holds the key, so it sends the
        ``DeactivateNode`` the dead SuperNode would have sent; the coordinator then answers the
        message that SuperNode held with Flower's "Node Unavailable" error at its next poll, and
        the new SuperNode is admitted at once. Only with node authentication (a key): the
        request is signed with it, so no one else can sign this node off.
        """
        node = self._previous_node() if self.key is not None else None
        if node is None:
            return False
        if pids := _live_supernodes(self.settings.state_dir / "client.json"):
            # That node is not orphaned: another `privet client` of this site runs here. Leave it
            # be; this start is then refused as before, with the reason.
            log.warning("a SuperNode of this site still runs (pid %s)", ", ".join(map(str, pids)))
            return False
        released = door.deactivate_node(self.server, node_id=node, key=self.key, ca=self.ca)
        if released:
            log.info("signed off node %d, left online by this site's previous SuperNode", node)
        return released

    def _admission(self) -> dict[str, str]:
        """Which coordinator and which key: a refusal is only waited out for a known pair."""
        key = hashlib.sha256(self.key.read_bytes()).hexdigest() if self.key is not None else ""
        return {"server": self.server, "key_sha256": key}

    def _refused_after_restart(self) -> bool:
        """Whether the SuperNode ended because an admitted node of this site is still online."""
        if self.child is None or self.child.alive():
            return False
        if not door.refused_as_still_online(self.child.tail(40)):
            return False
        try:
            known = json.loads(self._admitted_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return bool(known == self._admission())

    def _stop_child(self) -> None:
        if self.child is not None:
            self.child.stop()
            self.child = None

    def _start_once(self, log_file: Path | None) -> None:
        settings_path = self.settings.save()
        runtime_port, health_port = free_port(), free_port()
        self.health = f"127.0.0.1:{health_port}"
        self.runtime = f"127.0.0.1:{runtime_port}"
        argv = [
            flower_executable("flower-supernode"),
            "--superlink",
            self.server,
            *(["--insecure"] if self.ca is None else ["--root-certificates", str(self.ca)]),
            *(["--auth-supernode-private-key", str(self.key)] if self.key is not None else []),
            "--node-config",
            f'{SETTINGS_KEY}="{settings_path.resolve()}"',
            # privet runs the ClientApp itself (client/worker.py): model loaded once per process,
            # and only privet's installed code runs on the site.
            "--isolation",
            "process",
            "--port",
            str(runtime_port),
            "--health-server-address",
            self.health,
            # Flower retries without limit by default; a site must stop trying at some point.
            *(
                ["--max-wait-time", str(self.settings.reconnect_timeout)]
                if self.settings.reconnect_timeout is not None
                else []
            ),
        ]
        work = self.settings.state_dir / "flower"
        log_path = log_file or work / "supernode.log"
        self._log_path = log_path
        before = _admissions(log_path)
        self.child = Child(
            "flower-supernode",
            argv,
            log_file=log_path,
            env=flower_env(work / "home"),
            cwd=work,
        )
        wait_healthy(self.health, child=self.child, timeout=60)
        # The health service can say SERVING before the coordinator activated the node; Flower
        # 1.41 logs "SuperNode ID: ..." once it did, and exits (305) when it refused.
        deadline = time.monotonic() + ADMISSION_TIMEOUT
        while _admissions(log_path) <= before:
            if not self.child.alive():
                raise DeploymentError(
                    f"flower-supernode exited with status {self.child.proc.returncode} while "
                    f"joining:\n{self.child.tail()}",
                    fix=f"see {log_path}",
                )
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"the coordinator did not admit this node within {ADMISSION_TIMEOUT:.0f} s",
                    fix=f"see {log_path}",
                )
            time.sleep(0.2)

    def connected(self) -> bool:
        """Whether the SuperNode runs and reports SERVING (it registered with the coordinator)."""
        return (
            self.child is not None
            and self.child.alive()
            and health_status(self.health, timeout=1.0) == "SERVING"
        )

    def alive(self) -> bool:
        """Whether the SuperNode process is still running."""
        return self.child is not None and self.child.alive()

    def stop(self) -> None:
        """End the SuperNode and every ClientApp process it started.

        The SuperNode forwards a reply to the coordinator asynchronously (it polls every 0.5 s);
        a reply handed over less than ``DRAIN_SECONDS`` ago gets that long to leave first.
        """
        if self.child is not None:
            wait = self._last_reply + DRAIN_SECONDS - time.monotonic()
            if wait > 0 and self.child.alive():
                time.sleep(wait)
            self.child.stop()
            self.child = None

    def serve(
        self,
        stop: threading.Event,
        *,
        on_done: Callable[[Message, Message], None] = lambda _m, _r: None,
        on_error: Callable[[BaseException], None] = lambda _e: None,
    ) -> None:
        """Run the federation's rounds in this process until ``stop`` is set or the SuperNode dies."""
        from privet.client.worker import serve_tasks

        def done(message: Message, reply: Message) -> None:
            self._last_reply = time.monotonic()
            on_done(message, reply)

        serve_tasks(
            self.runtime,
            self.app,
            stop=stop,
            alive=self.alive,
            on_done=done,
            on_error=on_error,
            abandoned=self.dropped,
        )

    def dropped(self, message_id: str) -> bool:
        """Whether the SuperNode said it dropped the message ``message_id`` (its log: no API)."""
        if self.child is None:
            return True
        return door.dropped_message(self.child.tail(200), message_id)

    def exit_reason(self) -> str:
        """Why the SuperNode ended, in one line (from its exit status)."""
        if self.child is None:
            return "the SuperNode was not started"
        code = self.child.proc.returncode
        # Flower's exit code 305: the SuperNode could not connect to / be activated by the
        # SuperLink (it logs the code; the process itself may exit with status 1).
        if code == 305 or door.refused_activation(self.child.tail(40)):
            return (
                "the coordinator did not admit this node (Flower exit 305): its key is not "
                "registered there, another SuperNode with this key is connected, or the "
                "coordinator is not reachable"
            )
        return f"the SuperNode exited with status {code}"
