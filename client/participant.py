"""Embed a privet client in an application of your own: :class:`Participant`.

A partner's app keeps control of its process: ``start()`` returns at once (the work runs in a
background thread and one ``flower-supernode`` child process), ``status()`` is cheap, ``stop()``
ends everything it started. No signal handler is installed, ``sys.exit`` is never called, and no
logging configuration is touched. If the coordinator goes away (restart, network), the SuperNode
reconnects by itself; if the SuperNode gives up, the participant starts a new one, with a bounded
number of attempts and a growing pause between them.

The data stays in the app: pass rows (mappings with a text and a label), a torch ``Dataset`` of
``(text, label)`` pairs or mappings, a CSV/JSONL/Parquet path, or any object with an
``examples()`` method (:class:`DataSource`). Labels are class indices or class names, as in a
site's data file: names take the federation's mapping (``data.label_names``, which the
coordinator sends with the run), else their sorted order.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from privet.client.policy import SitePolicy
from privet.common.config import PrivacyConfig
from privet.common.data import Examples, GenerationExamples, LabelledRows, load_instructions
from privet.common.data.instructions import file_shape
from privet.common.errors import ConfigError, DataError, DeploymentError, PrivetError
from privet.common.protocol import CONFIG, SERVER_ROUND, TOTAL_ROUNDS

if TYPE_CHECKING:
    from flwr.app import Message

__all__ = ["DataSource", "Participant", "ParticipantStatus", "to_examples"]

log = logging.getLogger("privet")


@runtime_checkable
class DataSource(Protocol):
    """Anything that can hand over its labelled texts."""

    def examples(self) -> Iterable[tuple[str, int]]:
        """Yield ``(text, label)`` pairs; labels are class indices ``0..K-1`` or class names."""
        ...


def to_examples(
    data: Any,
    *,
    text_key: str = "text",
    label_key: str = "label",
    label_names: Sequence[str] | None = None,
) -> Examples:
    """Turn a partner's data into privet's :class:`~privet.common.data.Examples`, checking every row.

    Accepts a :class:`DataSource`, a path to a CSV/JSONL/Parquet file, or a sequence (a list, a
    torch ``Dataset``) whose items are ``(text, label)`` pairs or mappings with ``text_key`` and
    ``label_key``. Labels are class indices or class names (not both), as in a file: names map to
    their place in ``label_names``, else to their place among the sorted distinct names.
    """
    return to_rows(data, text_key=text_key, label_key=label_key).examples(label_names=label_names)


def _generation_data(data: Any, *, text_key: str, label_key: str) -> GenerationExamples | None:
    """The data as prompts and completions for a causal LM, or None when it is labelled texts."""
    if isinstance(data, GenerationExamples):
        return data
    if isinstance(data, str | Path) and (
        file_shape(Path(data), text_column=text_key, label_column=label_key) == "instructions"
    ):
        return load_instructions([Path(data)])[0]
    return None


def to_rows(data: Any, *, text_key: str = "text", label_key: str = "label") -> LabelledRows:
    """A partner's data as rows whose labels (indices or names) are checked but not yet mapped.

    A :class:`Participant` keeps its data so until the federation's class names arrive with the
    run: the coordinator's ``data.label_names`` decide the indices, as for a site's data file.
    """
    if isinstance(data, str | Path):
        return LabelledRows.read(Path(data), text_column=text_key, label_column=label_key)
    if isinstance(data, DataSource):
        items: Iterable[Any] = data.examples()
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        items = (data[i] for i in range(len(data)))  # a torch Dataset has no __iter__ contract
    elif isinstance(data, Iterable):
        items = data
    else:
        raise DataError(
            f"cannot read data of type {type(data).__name__}",
            fix="pass rows, a torch Dataset, a file path or an object with examples()",
        )
    texts: list[str] = []
    labels: list[Any] = []
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            if text_key not in item or label_key not in item:
                raise DataError(
                    f"row {i} has no {text_key!r} or no {label_key!r} (keys: {sorted(item)})",
                    fix="pass text_key= and label_key= naming your fields",
                )
            text, label = item[text_key], item[label_key]
        elif isinstance(item, tuple | list) and len(item) == 2:
            text, label = item
        else:
            raise DataError(f"row {i} is neither a (text, label) pair nor a mapping")
        if hasattr(label, "item"):  # a 0-d tensor or numpy scalar
            label = label.item()
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"row {i}: the text is empty or not a string")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise DataError("the data has no rows")
    # Checked as a file's label column is: integers or names, no booleans, fractions or blanks.
    return LabelledRows.from_labels(texts, labels, where=f"the rows' {label_key!r} field")


@dataclass(frozen=True)
class ParticipantStatus:
    """A snapshot of a :class:`Participant`.

    Parameters
    ----------
    running
        ``start()`` was called and ``stop()`` not yet.
    connected
        The SuperNode runs, is healthy, and the coordinator answers.
    current_round
        The round of the last message this participant answered (``None``: none yet).
    phase
        What that message asked: ``"train"`` or ``"evaluate"`` (``None``: none yet).
    epsilon
        Cumulative epsilon spent, from the ledger (``None``: nothing spent yet).
    last_error
        The most recent problem, one line (``None``: none). While the coordinator is gone it says
        since when; it stays after the connection is back (``reconnects`` counts those).
    reconnects
        How many times the connection came back after it was lost (a coordinator restart).
    finished
        The federation ended: this site trained its final round and the coordinator then went
        away. The site stopped itself (``running`` is false).

    """

    running: bool
    connected: bool
    current_round: int | None
    phase: str | None
    epsilon: float | None
    last_error: str | None
    reconnects: int = 0
    finished: bool = False

    @property
    def state(self) -> str:
        """Where the site stands, in one word.

        ``finished``, ``failed`` (stopped by an error, see ``last_error``), ``stopped``,
        ``connected`` or ``waiting`` (running, the coordinator not answering).
        """
        if self.finished:
            return "finished"
        if not self.running:
            return "failed" if self.last_error else "stopped"
        return "connected" if self.connected else "waiting"


class Participant:
    """One site of a federation, embedded in the caller's process.

    Parameters
    ----------
    server
        The coordinator's ``host:port``.
    data
        The site's data (see :func:`to_examples`), or, for a causal-LM federation
        (``model.task = 'causal_lm'``), :class:`~privet.common.data.GenerationExamples` or a JSON
        lines file of ``prompt``/``completion`` or chat ``messages`` rows.
    state_dir
        Folder for the privacy ledger and Flower's files; keep it across restarts.
    privacy
        This site's DP settings and budget (a shorthand for ``policy``); ``None``: ``policy``.
    policy
        What this site grants (privacy, least noise, clipping kinds, the model it loads);
        ``None``: the safe defaults of :class:`~privet.client.policy.SitePolicy` (DP on at
        epsilon 8, the embedded model, no remote code). Never taken from the coordinator: a run
        asking for more is refused.
    name
        The site's name (its ledger's client id).
    ca, key
        The federation's CA certificate and this node's private key (``privet certs node``).
    insecure
        Connect without TLS (local trials only); exactly one of ``ca`` and ``insecure``.
    text_key, label_key
        Field names in mapping rows.
    test_fraction
        Share of the rows kept for evaluating the global model.
    num_threads
        torch threads for training (``None``: torch's default).
    max_restarts
        How many times a SuperNode that gave up is replaced before the participant stops trying.
    reconnect_timeout
        Seconds a SuperNode keeps trying to reach a coordinator that went away before it gives up
        (and is replaced, at most ``max_restarts`` times); ``None``: forever.

    """

    def __init__(
        self,
        *,
        server: str,
        data: Any,
        state_dir: Path | str,
        privacy: PrivacyConfig | None = None,
        policy: SitePolicy | None = None,
        name: str = "participant",
        ca: Path | str | None = None,
        key: Path | str | None = None,
        insecure: bool = False,
        text_key: str = "text",
        label_key: str = "label",
        test_fraction: float = 0.1,
        num_threads: int | None = None,
        max_restarts: int = 20,
        reconnect_timeout: float | None = 600.0,
    ) -> None:
        from privet.client.deploy import SiteClient, SiteSettings

        if privacy is not None and policy is not None:
            raise ConfigError(
                "give privacy= or policy=, not both", fix="put the privacy into the policy"
            )
        if privacy is not None:
            policy = SitePolicy.from_privacy(privacy)
        # Instructions (a JSON lines file of prompt/completion or chat rows, or
        # GenerationExamples) serve a causal-LM federation as they are.
        own: LabelledRows | GenerationExamples | None = _generation_data(
            data, text_key=text_key, label_key=label_key
        )
        if own is None:
            # Labels stay as given until the run brings the federation's class names (a name
            # this site has that the federation lacks is refused then); checked here, mapped there.
            own = to_rows(data, text_key=text_key, label_key=label_key)
            own.examples()  # integers below 0, a mix of names and numbers: refused now
        self._settings = SiteSettings(
            name=name,
            state_dir=Path(state_dir).resolve(),
            policy=policy or SitePolicy(),
            test_fraction=test_fraction,
            num_threads=num_threads,
            reconnect_timeout=reconnect_timeout,
        )
        self._site = SiteClient(
            self._settings,
            server=server,
            ca=Path(ca) if ca is not None else None,
            key=Path(key) if key is not None else None,
            insecure=insecure,
            examples=own,
        )
        self._max_restarts = max_restarts
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._round: int | None = None
        self._phase: str | None = None
        self._error: str | None = None
        self._lock = threading.Lock()
        self._was_connected = False
        self._lost = False
        self._reconnects = 0
        self._total_rounds: int | None = None
        self._final_round_done = False  # the last planned round was trained here
        self._finished = False
        self._served = False  # a SuperNode of this participant was admitted once
        self._watch_interval = 2.0  # seconds between checks for the federation's end

    # -- the public surface -------------------------------------------------------------------

    def start(self) -> None:
        """Join the federation in the background; returns at once (call :meth:`stop` to leave)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="privet-participant", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watch_end, name="privet-participant-end", daemon=True).start()

    def status(self) -> ParticipantStatus:
        """Where the participant stands (cheap; safe to call from any thread)."""
        running = self._thread is not None and self._thread.is_alive()
        connected = False
        if running:
            from privet.common.deployment import probe_reachable

            connected = self._site.connected() and probe_reachable(self._site.host, self._site.port)
        with self._lock:
            self._track_connection(running, connected)
            return ParticipantStatus(
                running=running,
                connected=connected,
                current_round=self._round,
                phase=self._phase,
                epsilon=self._epsilon(),
                last_error=self._error,
                reconnects=self._reconnects,
                finished=self._finished,
            )

    def _track_connection(self, running: bool, connected: bool) -> None:
        """Note a lost coordinator (as ``last_error``) and count reconnections; holds the lock."""
        if connected:
            if self._lost:
                self._reconnects += 1
                self._lost = False
            self._was_connected = True
        elif running and self._was_connected and not self._lost:
            self._lost = True
            since = time.strftime("%H:%M:%S", time.localtime())
            self._error = (
                f"lost the coordinator at {self._site.server} at {since}; reconnecting "
                f"(for up to {self._settings.reconnect_timeout} s per SuperNode)"
            )

    def stop(self, timeout: float = 30.0) -> None:
        """Leave the federation and end every process this participant started."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._site.stop()

    def __enter__(self) -> Participant:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside the background thread -----------------------------------------------------------

    def _epsilon(self) -> float | None:
        path = self._settings.state_dir / f"ledger-{self._settings.name}.json"
        try:
            entries = json.loads(path.read_text(encoding="utf-8")).get("entries", [])
        except (OSError, ValueError):
            return None
        return float(entries[-1]["epsilon_after"]) if entries else None

    def _note(self, message: Message, reply: Message) -> None:
        conf = message.content.config_records.get(CONFIG)
        with self._lock:
            if reply.has_error():
                self._error = reply.error.reason
            elif conf is not None and SERVER_ROUND in conf:
                self._round = int(str(conf[SERVER_ROUND]))
                self._phase = message.metadata.message_type.split(".")[0]
                if TOTAL_ROUNDS in conf:
                    self._total_rounds = int(str(conf[TOTAL_ROUNDS]))
                if self._total_rounds is not None and self._round >= self._total_rounds:
                    self._final_round_done = self._final_round_done or self._phase == "train"

    def _wait_note(self, why: str) -> None:
        with self._lock:
            self._error = why

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._error = (
                str(exc) if isinstance(exc, PrivetError) else f"{type(exc).__name__}: {exc}"
            )

    def _watch_end(self) -> None:
        """Stop the site once the federation is over: final round trained, coordinator gone."""
        from privet.common import deployment

        while not self._stop.wait(self._watch_interval):
            with self._lock:
                done = self._final_round_done
            if done and not deployment.probe_reachable(self._site.host, self._site.port):
                with self._lock:
                    self._finished = True
                    self._error = None
                self._stop.set()
                self._site.stop()
                return

    def _run(self) -> None:
        """Start a SuperNode, serve rounds, and start a new one (bounded) if it gives up.

        A first start that fails its preflight (a missing key file, bad data, a coordinator that
        cannot be reached or verified) ends the participant: retrying cannot fix it, and
        ``status().running`` must say so.  After a SuperNode was admitted once, failures are
        retried: the coordinator may be restarting.
        """
        pause = 1.0
        for _attempt in range(self._max_restarts + 1):
            if self._stop.is_set():
                break
            try:
                try:
                    self._site.preflight()
                except PrivetError as exc:
                    if not self._served:
                        self._fail(exc)
                        self._stop.set()  # also ends the end watcher
                        return
                    raise
                # Started from this thread: the SuperNode gets SIGTERM if this thread dies.
                self._site.start(on_wait=self._wait_note, stop=self._stop)
                self._served = True
                pause = 1.0
                self._site.serve(self._stop, on_done=self._note, on_error=self._fail)
                if not self._stop.is_set():
                    raise DeploymentError(self._site.exit_reason())
            except Exception as exc:  # every failure is reported through status(), then retried
                self._fail(exc)
            finally:
                self._site.stop()
            self._stop.wait(pause)
            pause = min(pause * 2, 30.0)
        else:
            self._fail(DeploymentError(f"gave up after {self._max_restarts} restarts"))
            self._stop.set()
