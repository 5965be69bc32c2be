"""Restarts in a deployment without a federation: a site's rejoin wait, the coordinator's wait notes."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from privet.client import deploy
from privet.client.deploy import SiteClient, SiteSettings
from privet.common.errors import DeploymentError
from privet.server import loop
from privet.server.deploy import _Notes
from tests.flower_fakes import NodesGrid, instruction, run_identity

REFUSED = "ERROR: Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n" + (
    "[code: 2004] Failed to activate SuperNode.\n"
)


class _DeadChild:
    """A SuperNode that ended: alive() is False, its log tail says why."""

    def __init__(self, tail: str) -> None:
        self._tail = tail

    def alive(self) -> bool:
        return False

    def tail(self, lines: int = 15) -> str:
        return self._tail

    def stop(self) -> None:
        pass


def _site(tmp_path: Path, outcomes: list[str | None]) -> tuple[SiteClient, list[str]]:
    """A SiteClient whose SuperNode starts give ``outcomes`` in turn (None: admitted)."""
    key = tmp_path / "site-a.key"
    key.write_bytes(b"private key bytes")
    settings = SiteSettings(name="site-a", state_dir=tmp_path / "state")
    site = SiteClient(settings, server="127.0.0.1:9092", ca=tmp_path / "ca.pem", key=key)
    starts: list[str] = []

    def start_once(log_file: Path | None) -> None:
        outcome = outcomes[len(starts)]
        starts.append("refused" if outcome else "admitted")
        site.child = _DeadChild(outcome or "")  # type: ignore[assignment]
        if outcome:
            raise DeploymentError("flower-supernode exited with status 1 while starting")

    site._start_once = start_once  # type: ignore[method-assign]
    return site, starts


def _admitted_before(site: SiteClient, *, key: bytes = b"private key bytes") -> None:
    path = site.settings.state_dir / "flower" / deploy.ADMITTED_FILE
    path.parent.mkdir(parents=True)
    record = {"server": site.server, "key_sha256": hashlib.sha256(key).hexdigest()}
    path.write_text(json.dumps(record))


def test_activation_wait_outlasts_flowers_heartbeat_patience() -> None:
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    # The old node must have been seen offline before the new SuperNode takes its id over.
    assert deploy.ACTIVATION_WAIT == HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 5.0 == 65.0


def test_restarted_site_waits_out_its_still_online_node_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deploy, "ACTIVATION_WAIT", 0.01)
    site, starts = _site(tmp_path, [REFUSED, None])
    _admitted_before(site)
    notes: list[str] = []
    site.start(on_wait=notes.append)
    assert starts == ["refused", "admitted"]
    assert len(notes) == 1 and "still counts this site's node as connected" in notes[0]


def test_first_start_records_the_admission(tmp_path: Path) -> None:
    site, starts = _site(tmp_path, [None])
    site.start()
    assert starts == ["admitted"]
    record = json.loads((site.settings.state_dir / "flower" / deploy.ADMITTED_FILE).read_text())
    assert record == {
        "server": "127.0.0.1:9092",
        "key_sha256": hashlib.sha256(b"private key bytes").hexdigest(),
    }


@pytest.mark.parametrize(
    ("admitted", "outcomes", "starts"),
    [
        (None, [REFUSED], ["refused"]),  # never admitted: an unregistered key fails at once
        (b"another key", [REFUSED], ["refused"]),  # admitted with another key
        (b"private key bytes", [REFUSED, REFUSED], ["refused", "refused"]),  # still refused
        (b"private key bytes", ["Exit Code: 1\nboom"], ["refused"]),  # another failure
    ],
)
def test_other_refusals_are_not_waited_out(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    admitted: bytes | None,
    outcomes: list[str | None],
    starts: list[str],
) -> None:
    monkeypatch.setattr(deploy, "ACTIVATION_WAIT", 0.01)
    site, seen = _site(tmp_path, outcomes)
    if admitted is not None:
        _admitted_before(site, key=admitted)
    with pytest.raises(DeploymentError):
        site.start()
    assert seen == starts


def test_stop_cuts_the_wait_short(tmp_path: Path) -> None:
    site, starts = _site(tmp_path, [REFUSED, None])
    _admitted_before(site)
    stop = threading.Event()
    stop.set()
    with pytest.raises(DeploymentError, match="stopped while waiting"):
        site.start(stop=stop)  # ACTIVATION_WAIT is 65 s: returning at once shows the cut
    assert starts == ["refused"]


def _admitting_site(tmp_path: Path, *, key: bytes = b"private key bytes") -> SiteClient:
    """A SiteClient whose SuperNode is admitted as node 77 (Flower's admission line in its log)."""
    site, _ = _site(tmp_path, [None])
    site.key.write_bytes(key)  # type: ignore[union-attr]

    def start_once(log_file: Path | None) -> None:
        site._log_path = tmp_path / "supernode.log"
        site._log_path.write_text("INFO :      Starting\nINFO :      SuperNode ID: 77\n")
        site.child = _DeadChild("")  # type: ignore[assignment]

    site._start_once = start_once  # type: ignore[method-assign]
    return site


def test_a_restarted_site_signs_off_the_node_it_was_admitted_as(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signed: list[tuple[str, int, Path | None]] = []

    def deactivate(server: str, *, node_id: int, key: Path | None, ca: Path | None) -> bool:
        signed.append((server, node_id, key))
        return True

    monkeypatch.setattr(deploy.door, "deactivate_node", deactivate)
    first = _admitting_site(tmp_path)
    first.start()
    assert signed == []  # nothing known yet: a first start signs nothing off
    node = json.loads((first.settings.state_dir / "flower" / deploy.NODE_FILE).read_text())
    assert node == {"node_id": 77}
    _admitting_site(tmp_path).start()  # the same site restarted (its SuperNode was killed)
    assert signed == [("127.0.0.1:9092", 77, tmp_path / "site-a.key")]
    # With another key (or against another coordinator) the record is not this node's.
    _admitting_site(tmp_path, key=b"another key").start()
    assert len(signed) == 1


def test_a_node_whose_supernode_still_runs_here_is_not_signed_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signed: list[int] = []
    monkeypatch.setattr(deploy.door, "deactivate_node", lambda *_a, **k: signed.append(1) or True)
    _admitting_site(tmp_path).start()
    # A second `privet client` of the same site while the first one's SuperNode runs here.
    settings = (tmp_path / "state" / "client.json").resolve()
    fake = tmp_path / "bin" / "flower-supernode"
    fake.parent.mkdir()
    fake.write_text("import time\ntime.sleep(60)\n")
    live = subprocess.Popen(
        [sys.executable, str(fake), "--node-config", f'privet-client="{settings}"']
    )
    try:
        deadline = time.monotonic() + 10
        while not deploy._live_supernodes(settings) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert deploy._live_supernodes(settings) == [live.pid]
        assert not _admitting_site(tmp_path).release_previous_node()
        assert signed == []
    finally:
        live.kill()
        live.wait()
    assert deploy._live_supernodes(settings) == []
    assert _admitting_site(tmp_path).release_previous_node() and signed == [1]


class _SilentGrid(NodesGrid):
    """Takes messages and never answers."""

    def push_messages(self, messages: Any) -> list[str]:
        return [f"m{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, message_ids: Any) -> list[Any]:
        return []


def _reply_wait_notes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, **kwargs: Any
) -> list[str]:
    """The "still waiting" lines of a wait for two replies (nodes 7 and 9) that never come."""
    monkeypatch.setattr(loop, "WAIT_NOTE_SECONDS", 0.05)
    caplog.set_level(logging.WARNING, logger="privet")
    with run_identity():
        messages = [instruction(7), instruction(9)]
    replies = loop.send_and_receive(_SilentGrid([7, 9]), messages, timeout=0.3, poll=0.02, **kwargs)
    assert replies == []
    return [r.getMessage() for r in caplog.records if loop.WAITING in r.getMessage()]


def test_a_long_wait_for_replies_names_the_missing_nodes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    notes = _reply_wait_notes(monkeypatch, caplog)
    assert notes, caplog.text
    assert notes[0].startswith(
        "still waiting for 2 of 2 replies (node-7, node-9); giving up on them at "
    )
    assert notes[0].endswith("(federation.round_timeout)")


def test_the_wait_names_missing_sites_as_the_records_do(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    names = {7: "site-a"}
    notes = _reply_wait_notes(
        monkeypatch, caplog, label=lambda node: names.get(node, f"node-{node}")
    )
    assert notes and "2 of 2 replies (node-9, site-a);" in notes[0]


def test_a_long_wait_for_clients_says_how_many_are_connected(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(loop, "WAIT_NOTE_SECONDS", 0.0)
    monkeypatch.setattr("privet.server.loop.time.sleep", lambda _s: None)
    caplog.set_level(logging.WARNING, logger="privet")
    with pytest.raises(TimeoutError, match="round 3: only 1 of the 2 clients"):
        loop._wait_for_nodes(NodesGrid([5]), 2, timeout=0.05, server_round=3)
    assert "still waiting for clients before round 3: 1 of 2 connected" in caplog.text


def test_notes_follow_only_new_whole_lines(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_text("12:00:00:WARNING:still waiting for an old run\n")
    got: list[str] = []
    notes = _Notes(log, got.append, offset=log.stat().st_size)
    with open(log, "a") as fh:
        fh.write("INFO: round 1 sent\n11/23 12:01:00:WARNING:still waiting for 1 of 2 replies")
    notes.poll()
    assert got == []  # the note line is not complete yet
    with open(log, "a") as fh:
        fh.write(" (node-7); giving up at 13:00:00\n")
    notes.poll()
    notes.poll()
    assert got == ["still waiting for 1 of 2 replies (node-7); giving up at 13:00:00"]


class _RuntimeWithMissingObjects:
    """A SuperNode runtime API holding one task whose message content never arrives."""

    def __init__(self) -> None:
        from flwr.app import Context, RecordDict
        from flwr.common.serde import context_to_proto, message_to_proto
        from flwr.proto.message_pb2 import ObjectTree
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PullTaskInputResponse

        context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
        self.task = PullTaskInputResponse(context=context_to_proto(context), task_id=3)
        with run_identity():
            msg = instruction(5)
        self.messages = PullAppMessagesResponse(
            messages_list=[message_to_proto(msg)],
            message_object_trees=[ObjectTree(object_id="a" * 64)],
        )
        self.pulls = 0

    def PullTaskInput(self, _req: object) -> object:  # noqa: N802 (Flower's RPC names)
        return self.task

    def PullMessages(self, _req: object) -> object:  # noqa: N802
        return self.messages

    def PullObject(self, _req: object) -> object:  # noqa: N802
        from flwr.proto.message_pb2 import PullObjectResponse

        self.pulls += 1
        return PullObjectResponse(object_found=True, object_available=False)

    def ConfirmMessageReceived(self, _req: object) -> object:  # noqa: N802
        raise AssertionError("nothing was received")


def test_a_message_the_supernode_dropped_is_given_up_at_once() -> None:
    from privet.client.worker import TaskAbandonedError, _pull_task_input

    runtime = _RuntimeWithMissingObjects()
    asked: list[str] = []

    def dropped(message_id: str) -> bool:
        asked.append(message_id)
        return True

    with pytest.raises(TaskAbandonedError, match="dropped message aaaaaaaaaaaa"):
        _pull_task_input(runtime, dropped)
    assert runtime.pulls == 1 and asked == ["a" * 64]


def test_a_message_whose_content_never_comes_is_given_up_after_bounded_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

    from privet.client import worker

    monkeypatch.setattr(worker, "OBJECT_TRIES", 2)
    runtime = _RuntimeWithMissingObjects()
    with pytest.raises(ObjectPullError, match="retry limit"):
        worker._pull_task_input(runtime, lambda _id: False)
    assert runtime.pulls == 2


def test_the_site_reads_a_dropped_message_from_the_supernode_log(tmp_path: Path) -> None:
    site, _ = _site(tmp_path, [None])
    site.start()
    log = (
        "INFO :      Receiving: train message (ID: abc123)\n"
        "INFO :      Run ID 42 is not in `RUNNING` status. Ignoring message abc123.\n"
    )
    site.child = _DeadChild(log)  # type: ignore[assignment]
    assert site.dropped("abc123")
    assert not site.dropped("def456")
    site.child = _DeadChild("ERROR :     Failed to receive message def456: boom\n")  # type: ignore[assignment]
    assert site.dropped("def456")


def _fake_flwr(monkeypatch: pytest.MonkeyPatch, answers: list[tuple[int, str]]) -> list[list[str]]:
    """``flwr supernode register`` answering ``answers`` in turn; returns the argv of each call."""
    import subprocess

    from privet.server import deploy as server_deploy

    calls: list[list[str]] = []

    def run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        code, text = answers[len(calls) - 1]
        return subprocess.CompletedProcess(argv, code, stdout=text, stderr="")

    monkeypatch.setattr(server_deploy.subprocess, "run", run)
    monkeypatch.setattr(server_deploy, "REGISTER_PAUSE", 0.0)
    return calls


UNAVAILABLE = (1, "Connection to the SuperLink is unavailable. Please check your network")


def test_node_keys_are_registered_under_their_file_names_once_the_link_takes_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from privet.server.deploy import _register

    calls = _fake_flwr(monkeypatch, [UNAVAILABLE, UNAVAILABLE, (0, "registered")])
    _register(tmp_path / "client-0.pub", env={}, cwd=tmp_path)
    assert len(calls) == 3  # a restarted SuperLink's Control API came up after its health check
    assert calls[-1][-2:] == ["--name", "client-0"]


def test_node_key_registration_gives_up_bounded_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from privet.server import deploy as server_deploy
    from privet.server.deploy import _register

    calls = _fake_flwr(monkeypatch, [UNAVAILABLE] * server_deploy.REGISTER_TRIES)
    with pytest.raises(DeploymentError, match="registering node key site-a.pub failed"):
        _register(tmp_path / "site-a.pub", env={}, cwd=tmp_path)
    assert len(calls) == server_deploy.REGISTER_TRIES
    # any other failure stops at once; an already registered key (a resumed run) is fine
    calls = _fake_flwr(monkeypatch, [(1, "invalid public key")])
    with pytest.raises(DeploymentError, match="invalid public key"):
        _register(tmp_path / "site-a.pub", env={}, cwd=tmp_path)
    assert len(calls) == 1
    _fake_flwr(monkeypatch, [(1, "Node already registered")])
    _register(tmp_path / "site-a.pub", env={}, cwd=tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_child_gets_its_death_signal_when_its_starting_thread_ends(
    tmp_path: Path, sig: signal.Signals
) -> None:
    from privet.common.deployment import Child

    started: list[Child] = []

    def start() -> None:
        started.append(
            Child(
                "sleeper",
                [sys.executable, "-c", "import time; time.sleep(60)"],
                log_file=tmp_path / "sleeper.log",
                death_signal=sig,
            )
        )

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    # The thread that started it is gone: Linux signals the child (the SuperLink gets SIGKILL).
    assert started[0].proc.wait(timeout=20) == -sig


def test_a_second_coordinator_waits_for_the_first_superlink_then_refuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import subprocess

    from privet.server import deploy as server_deploy

    db = tmp_path / "run" / "flower" / "superlink.db"
    script = tmp_path / "flower-superlink"  # looks like Flower's SuperLink on this run's state
    script.write_text("import time\ntime.sleep(float(__import__('sys').argv[1]))\n")
    monkeypatch.setattr(server_deploy, "PREVIOUS_LINK_WAIT", 1.0)
    stuck = subprocess.Popen([sys.executable, str(script), "60", "--database", str(db)])
    try:
        deadline = time.monotonic() + 10
        while not server_deploy._superlinks_on(db) and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(DeploymentError, match=f"SuperLink \\(pid {stuck.pid}\\) still serves"):
            server_deploy._wait_for_previous_superlink(db)
    finally:
        stuck.kill()
        stuck.wait()
    # one that exits within the wait is waited for; another run's SuperLink is not in the way
    other = tmp_path / "other" / "superlink.db"
    monkeypatch.setattr(server_deploy, "PREVIOUS_LINK_WAIT", 20.0)
    leaving = subprocess.Popen([sys.executable, str(script), "1.5", "--database", str(db)])
    elsewhere = subprocess.Popen([sys.executable, str(script), "60", "--database", str(other)])
    try:
        deadline = time.monotonic() + 10
        while not (server_deploy._superlinks_on(db) and server_deploy._superlinks_on(other)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        start = time.monotonic()
        server_deploy._wait_for_previous_superlink(db)
        assert leaving.poll() is not None and time.monotonic() - start < 15
    finally:
        for p in (leaving, elsewhere):
            p.kill()
            p.wait()
