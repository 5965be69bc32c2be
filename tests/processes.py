"""Which processes a piece of code started, and whether they are gone: hermetic on a shared machine.

Counting machine-wide Ray processes before and after a run failed whenever another job on the
machine started Ray meanwhile. A :class:`ProcessWatch` instead records every descendant of one
process while the code runs (Ray's workers are reparented to init once their raylet ends, so
they must be seen while they are still descendants), then checks exactly those.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import psutil


class ProcessWatch:
    """Record the descendants of ``root`` (default: this process) while the ``with`` block runs.

    Parameters
    ----------
    root
        The pid whose descendants are recorded.
    every
        Seconds between two looks at the process tree.

    """

    def __init__(self, root: int | None = None, *, every: float = 0.1) -> None:
        self.root = psutil.Process(root)
        self.every = every
        # (pid, create time) identifies a process even if its pid is reused later.
        self.seen: dict[tuple[int, float], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="process-watch", daemon=True)

    def _look(self) -> None:
        try:
            children = self.root.children(recursive=True)
        except psutil.Error:
            return
        for proc in children:
            try:
                key = (proc.pid, proc.create_time())
                now = " ".join(proc.cmdline())[:200] or proc.name()
            except psutil.Error:
                continue
            # Every name a process had is kept: a child seen between fork and exec still shows
            # its parent's command line (under load that window is long), and Ray's workers
            # rename themselves to `ray::...` only once they run.
            before = self.seen.get(key)
            if before is None:
                self.seen[key] = now
            elif now not in before.split(" | "):
                self.seen[key] = f"{before} | {now}"

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._look()
            self._stop.wait(self.every)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def matching(self, *words: str) -> dict[tuple[int, float], str]:
        """The recorded processes whose command line contains any of ``words`` (all: none given)."""
        return {k: c for k, c in self.seen.items() if not words or any(w in c for w in words)}

    def alive(self, *words: str) -> list[str]:
        """The recorded processes (matching ``words``) that still run: not exited, not zombies."""
        out = []
        for (pid, created), cmd in self.matching(*words).items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{pid} {cmd}")
            except psutil.Error:
                continue
        return out

    def wait_gone(self, *words: str, timeout: float) -> list[str]:
        """Wait (bounded) until no recorded process matching ``words`` runs; return those left."""
        deadline = time.monotonic() + timeout
        while (left := self.alive(*words)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left


def wait_for_descendant(root: int, *words: str, timeout: float) -> bool:
    """Whether a descendant of ``root`` whose command line holds one of ``words`` appears in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for proc in psutil.Process(root).children(recursive=True):
                try:
                    if any(w in " ".join(proc.cmdline()) for w in words):
                        return True
                except psutil.Error:
                    continue
        except psutil.Error:
            return False
        time.sleep(0.2)
    return False
