"""Bounded retries: every retry loop in privet is bounded in count and in time, in one place.

privet's loops that wait for something outside it (pip downloading a pinned asset, a SuperLink's
health service, nginx's port, a registration the SuperLink is not ready for) differ in what they
try and in what ends them early; they share the bounds. :func:`attempts` owns those: the loop body
keeps its own ``continue``, ``break`` and ``return``, and no loop can run without a limit. A retry
library (tenacity) would wrap each body in a function and turn its early exits into exceptions,
which reads worse for these short loops than a bounded ``for``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

__all__ = ["attempts"]


def attempts(
    *,
    tries: int,
    timeout: float | None = None,
    pause: float | Callable[[int], float] = 0.0,
) -> Iterator[int]:
    """Attempt numbers ``1, 2, ...``: at most ``tries`` of them, none after ``timeout`` seconds.

    Parameters
    ----------
    tries
        Most attempts (>= 1).
    timeout
        Seconds from the first attempt after which no new attempt starts (``None``: no limit
        besides ``tries``).
    pause
        Seconds to sleep before every attempt but the first: a number, or a function of the
        attempt number about to start (e.g. ``lambda n: 2.0 * (n - 1)`` for a growing back-off).

    Yields
    ------
    int
        The attempt number, starting at 1.

    """
    if tries < 1:
        raise ValueError(f"tries must be at least 1, got {tries}")
    deadline = None if timeout is None else time.monotonic() + timeout
    for attempt in range(1, tries + 1):
        if attempt > 1:
            wait = pause(attempt) if callable(pause) else pause
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            if wait > 0:
                time.sleep(wait)
            if deadline is not None and time.monotonic() >= deadline:
                return
        yield attempt
