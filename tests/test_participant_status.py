"""`Participant.status()` says when the site cannot run and when the federation is over.

A fake site stands in for Flower's SuperNode, so these run in milliseconds; tests/test_e2e_deploy.py
runs the real Participant against a real coordinator.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

import privet.client.deploy as deploy
import privet.common.deployment as deployment
from privet.client import Participant
from privet.common.errors import DeploymentError

ROWS = [{"text": f"row {i}", "label": i % 2} for i in range(10)]


class FakeSite:
    """Just enough of SiteClient: a scripted preflight and a serve that answers given messages."""

    preflight_error: Exception | None = None
    messages: ClassVar[list[tuple[str, int, int]]] = []  # (phase, round, total rounds)

    def __init__(self, settings: Any, *, server: str, **_: Any) -> None:
        self.server = server
        self.host, self.port = server.split(":")[0], int(server.split(":")[1])
        self.stopped = threading.Event()

    def preflight(self) -> None:
        if self.preflight_error is not None:
            raise self.preflight_error

    def start(self, **_: Any) -> None:
        pass

    def connected(self) -> bool:
        return not self.stopped.is_set()

    def serve(self, stop: threading.Event, *, on_done: Any, on_error: Any) -> None:
        for phase, rnd, total in self.messages:
            config = {"server-round": rnd, "total-rounds": total}
            message = SimpleNamespace(
                content=SimpleNamespace(config_records={"config": config}),
                metadata=SimpleNamespace(message_type=f"{phase}.default"),
            )
            on_done(message, SimpleNamespace(has_error=lambda: False))
        stop.wait(30)

    def stop(self) -> None:
        self.stopped.set()

    def exit_reason(self) -> str:
        return "gone"


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.fixture
def fake_site(monkeypatch: pytest.MonkeyPatch) -> type[FakeSite]:
    monkeypatch.setattr(deploy, "SiteClient", FakeSite)
    FakeSite.preflight_error = None
    FakeSite.messages = []
    return FakeSite


def test_missing_key_or_unreachable_coordinator_stops_running(
    fake_site: type[FakeSite], tmp_path: Path
) -> None:
    fake_site.preflight_error = DeploymentError(
        "node key site.key does not exist", fix="make it with `privet certs node SITE`"
    )
    p = Participant(server="127.0.0.1:9", data=ROWS, state_dir=tmp_path, insecure=True)
    p.start()
    try:
        _wait(lambda: not p.status().running)
        status = p.status()
        assert status.state == "failed" and not status.finished
        assert status.last_error is not None and "site.key does not exist" in status.last_error
    finally:
        p.stop()


def test_site_stops_when_the_federation_is_over(
    fake_site: type[FakeSite], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_site.messages = [("train", 1, 2), ("evaluate", 1, 2), ("train", 2, 2), ("evaluate", 2, 2)]
    reachable = {"up": True}
    monkeypatch.setattr(deployment, "probe_reachable", lambda *a, **k: reachable["up"])
    p = Participant(server="127.0.0.1:9", data=ROWS, state_dir=tmp_path, insecure=True)
    p._watch_interval = 0.05  # type: ignore[attr-defined]
    p.start()
    try:
        _wait(lambda: p.status().current_round == 2)
        assert p.status().running and not p.status().finished
        reachable["up"] = False  # the coordinator ends after the last round
        # `finished` is set before the site's thread has wound down: wait for both.
        _wait(lambda: p.status().finished and not p.status().running)
        status = p.status()
        assert status.state == "finished" and not status.running and status.last_error is None
    finally:
        p.stop()


def test_lost_coordinator_before_the_last_round_is_not_the_end(
    fake_site: type[FakeSite], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_site.messages = [("train", 1, 3), ("evaluate", 1, 3)]
    monkeypatch.setattr(deployment, "probe_reachable", lambda *a, **k: False)
    p = Participant(server="127.0.0.1:9", data=ROWS, state_dir=tmp_path, insecure=True)
    p._watch_interval = 0.05  # type: ignore[attr-defined]
    p.start()
    try:
        _wait(lambda: p.status().current_round == 1)
        time.sleep(0.3)  # several watcher periods: it must not call this the end
        assert p.status().running and not p.status().finished
    finally:
        p.stop()
