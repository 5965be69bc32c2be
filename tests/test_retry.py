"""`attempts`: every retry loop is bounded in count and in time."""

from __future__ import annotations

import pytest

import privet.common.retry as retry
from privet.common.retry import attempts


class Clock:
    """A fake monotonic clock that sleeping advances."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(retry.time, "monotonic", c.monotonic)
    monkeypatch.setattr(retry.time, "sleep", c.sleep)
    return c


def test_at_most_tries_attempts_with_the_pause_between_them(clock: Clock) -> None:
    assert list(attempts(tries=4, pause=0.5)) == [1, 2, 3, 4]
    assert clock.slept == [0.5, 0.5, 0.5]  # none before the first attempt


def test_a_growing_pause_is_a_function_of_the_attempt_number(clock: Clock) -> None:
    assert list(attempts(tries=3, pause=lambda n: 2.0 * (n - 1))) == [1, 2, 3]
    assert clock.slept == [2.0, 4.0]


def test_no_attempt_starts_after_the_timeout(clock: Clock) -> None:
    # 1 s pauses and a 2.5 s limit: attempts at 0, 1, 2 s; the wait for a fourth is cut to 0.5 s.
    assert list(attempts(tries=100, timeout=2.5, pause=1.0)) == [1, 2, 3]
    assert clock.slept == [1.0, 1.0, 0.5]


def test_breaking_out_early_stops_the_attempts(clock: Clock) -> None:
    seen = []
    for n in attempts(tries=10, pause=1.0):
        seen.append(n)
        if n == 2:
            break
    assert seen == [1, 2] and clock.slept == [1.0]


def test_tries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        list(attempts(tries=0))
