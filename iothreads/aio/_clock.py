"""Clocks and clock types.

QEMU keeps one timer list per clock type in every AioContext.  Three of its
types matter here:

``ClockType.REALTIME``
    The monotonic clock (``time.monotonic_ns()``).  Runs whether or not
    anything else does; what the block layer and the loops use.
``ClockType.VIRTUAL``
    Guest time.  Here it moves only when told to (``ManualClock.advance_ns``);
    nothing advances it by itself, as in qemu-storage-daemon where no vCPU runs.
``ClockType.HOST``
    The wall clock (``time.time_ns()``); follows NTP steps.

Two kinds of clock exist for the loop's purposes.  A clock that moves by
itself bounds a blocking poll: the loop sleeps until its earliest timer is
due.  A ``ManualClock`` never moves while the loop sleeps, so sleeping on its
deadline would mean sleeping for nothing: instead, advancing it notifies every
context that keeps timers on it, and a due timer then fires on the next poll.
``iothreads.testing.FakeClock`` is a ``ManualClock``; injected into a context
it drives all three clock types, which makes timer tests deterministic.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "ClockType", "ManualClock", "MonotonicClock", "WallClock"]

SCALE_NS = 1
SCALE_US = 1_000
SCALE_MS = 1_000_000


class ClockType(enum.IntEnum):
    """QEMU's ``QEMUClockType`` values (the numbers match QEMU's)."""

    REALTIME = 0
    VIRTUAL = 1
    HOST = 2


@runtime_checkable
class Clock(Protocol):
    """Anything with ``now_ns()``: integer nanoseconds, never going backwards
    (except a wall clock, which may step)."""

    def now_ns(self) -> int: ...


class MonotonicClock:
    """``time.monotonic_ns()``: the REALTIME clock."""

    __slots__ = ()

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def __repr__(self) -> str:
        return "MonotonicClock()"


class WallClock:
    """``time.time_ns()``: the HOST clock."""

    __slots__ = ()

    def now_ns(self) -> int:
        return time.time_ns()

    def __repr__(self) -> str:
        return "WallClock()"


class ManualClock:
    """A clock that moves only when told to.  Safe to use from any thread.

    Contexts that keep timers on it subscribe to it, so advancing it wakes a
    context blocked in ``poll``; its deadlines never bound a blocking poll.
    """

    def __init__(self, start_ns: int = 0) -> None:
        if start_ns < 0:
            raise ValueError("start_ns must be >= 0")
        self._now_ns = start_ns
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    def now_ns(self) -> int:
        return self._now_ns

    def advance_ns(self, delta_ns: int) -> None:
        """Move the clock forward by ``delta_ns`` (any thread)."""
        if delta_ns < 0:
            raise ValueError("time can't go backwards: delta_ns must be >= 0")
        with self._lock:
            self._now_ns += delta_ns
            listeners = list(self._listeners)
        for notify in listeners:
            notify()

    def subscribe(self, notify: Callable[[], None]) -> None:
        """Call ``notify()`` after every advance (any thread)."""
        with self._lock:
            self._listeners.append(notify)

    def unsubscribe(self, notify: Callable[[], None]) -> None:
        """Undo ``subscribe``; unknown callables are ignored (any thread)."""
        with self._lock:
            try:
                self._listeners.remove(notify)
            except ValueError:
                pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(now_ns={self._now_ns})"
