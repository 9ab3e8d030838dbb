"""The BQL: the "Big QEMU Lock" of the main-loop process.

One process-wide, non-recursive lock.  The main loop holds it for its whole
iteration except around the single blocking poll, so every main-loop
callback (sources, the two AioContexts' bottom halves, fd handlers and
timers, main-loop timers) runs with it held.  Other threads (QEMU's vCPU
threads) take it to touch global state; the iothreads never do: that is their
point.

Counters show what the lock costs: acquisitions, how many had to wait, the
total time spent waiting, and the total and longest hold.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from protocol import StateError

__all__ = ["BQLStats", "bql", "bql_lock", "bql_locked", "bql_stats", "bql_unlock"]

A = TypeVar("A")
B = TypeVar("B")
R = TypeVar("R")

_get_ident = threading.get_ident
_monotonic_ns = time.monotonic_ns


@dataclass(frozen=True, slots=True)
class BQLStats:
    acquisitions: int
    contended: int
    """Acquisitions that found the lock held and had to wait."""
    wait_ns: int
    """Total time spent waiting for the lock."""
    hold_ns: int
    """Total time the lock was held (completed holds)."""
    longest_hold_ns: int


class _BigLock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner = 0
        self._acquired_at = 0
        self.acquisitions = 0
        self.contended = 0
        self.wait_ns = 0
        self.hold_ns = 0
        self.longest_hold_ns = 0

    def lock(self) -> None:
        me = threading.get_ident()
        if self._owner == me:
            raise StateError("bql_lock(): the BQL is already held by this thread (it is not recursive)")
        if self._lock.acquire(blocking=False):
            self._owner = me
            self._acquired_at = _monotonic_ns()
            self.acquisitions += 1
        else:
            self._lock_contended(me)

    def _lock_contended(self, me: int) -> None:
        t0 = _monotonic_ns()
        self._lock.acquire()
        now = _monotonic_ns()
        self.contended += 1
        self.wait_ns += now - t0
        self._owner = me
        self._acquired_at = now
        self.acquisitions += 1

    def unlock(self) -> None:
        if self._owner != threading.get_ident():
            raise StateError("bql_unlock(): the BQL is not held by this thread")
        held = _monotonic_ns() - self._acquired_at
        self.hold_ns += held
        if held > self.longest_hold_ns:
            self.longest_hold_ns = held
        self._owner = 0
        self._lock.release()

    def call_unlocked(self, fn: Callable[[A, B], R], a: A, b: B) -> R:
        """``fn(a, b)`` with the BQL released, retaken before returning (or
        raising): ``unlock(); fn(a, b); lock()`` in one call, for the main
        loop's blocking poll, with the same counters.  BQL held."""
        me = self._owner
        if me != _get_ident():
            raise StateError("BQL.call_unlocked(): the BQL is not held by this thread")
        lock = self._lock
        held = _monotonic_ns() - self._acquired_at
        self.hold_ns += held
        if held > self.longest_hold_ns:
            self.longest_hold_ns = held
        self._owner = 0
        lock.release()
        try:
            return fn(a, b)
        finally:
            if lock.acquire(False):
                self._owner = me
                self._acquired_at = _monotonic_ns()
                self.acquisitions += 1
            else:
                self._lock_contended(me)

    def locked(self) -> bool:
        return self._owner == threading.get_ident()

    def stats(self) -> BQLStats:
        return BQLStats(self.acquisitions, self.contended, self.wait_ns, self.hold_ns, self.longest_hold_ns)


BQL = _BigLock()  # the process's one BQL


def bql_lock() -> None:
    """Take the BQL; waits while another thread holds it.  Raises
    ``StateError`` if the calling thread already holds it."""
    BQL.lock()


def bql_unlock() -> None:
    """Release the BQL.  Raises ``StateError`` unless the calling thread holds it."""
    BQL.unlock()


def bql_locked() -> bool:
    """Whether the calling thread holds the BQL."""
    return BQL.locked()


@contextmanager
def bql() -> Iterator[None]:
    """``with bql():`` holds the BQL for the block (QEMU's ``BQL_LOCK_GUARD``)."""
    BQL.lock()
    try:
        yield
    finally:
        BQL.unlock()


def bql_stats() -> BQLStats:
    """A snapshot of the BQL's counters since the process started."""
    return BQL.stats()
