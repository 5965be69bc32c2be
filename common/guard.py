"""``python -m privet.common.guard -- COMMAND...``: run COMMAND; end everything it started with it.

Flower's SuperLink starts ``flower-superexec`` in a session of its own, which starts the
``flwr-serverapp`` processes; when a coordinator is killed, ``PR_SET_PDEATHSIG`` ends the SuperLink,
but those grandchildren were seen running 15 s and more afterwards. This guard sits between privet
and the command: it makes itself the *subreaper* of everything below it (Linux
``PR_SET_CHILD_SUBREAPER``: orphans are re-parented to it, not to init, so it can still find them),
and when it is told to stop (SIGTERM/SIGINT, which privet's death sends it) or when the command
exits, it SIGKILLs every process left below it before it exits itself.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from types import FrameType

__all__ = ["main"]

PR_SET_CHILD_SUBREAPER = 36


def _subreaper() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1)


def _kill_below() -> None:
    """SIGKILL every descendant (orphans included: they are ours as the subreaper)."""
    import psutil

    for _ in range(5):  # a dying process may still start one; bounded
        try:
            below = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        if not below:
            return
        for proc in below:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(below, timeout=2.0)


def main(argv: list[str]) -> int:
    """Run ``argv`` under the guard; returns its exit status (128 + signal when stopped)."""
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -m privet.common.guard -- COMMAND...", file=sys.stderr)
        return 2
    _subreaper()
    stop: list[int] = []

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.append(signum)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    proc = subprocess.Popen(argv)
    code: int | None = None
    while not stop:
        code = proc.poll()
        if code is not None:
            break
        time.sleep(0.1)
    _kill_below()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=2.0)
    if stop:
        return 128 + stop[0]
    return code if code is not None and code >= 0 else 128 + (-(code or 0))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
