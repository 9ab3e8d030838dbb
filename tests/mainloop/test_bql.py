"""The BQL: non-recursive, per-thread ownership, counters."""

from __future__ import annotations

import threading

import pytest

from mainloop import bql, bql_lock, bql_locked, bql_stats, bql_unlock
from protocol import StateError


def test_lock_unlock_and_ownership() -> None:
    assert not bql_locked()
    bql_lock()
    try:
        assert bql_locked()
        with pytest.raises(StateError, match="not recursive"):
            bql_lock()
        other: list[bool] = []
        t = threading.Thread(target=lambda: other.append(bql_locked()))
        t.start()
        t.join()
        assert other == [False]  # held by this thread, not "held" for that one
    finally:
        bql_unlock()
    assert not bql_locked()
    with pytest.raises(StateError, match="not held"):
        bql_unlock()


def test_context_manager_and_counters() -> None:
    before = bql_stats()
    with bql():
        assert bql_locked()
    after = bql_stats()
    assert after.acquisitions == before.acquisitions + 1
    assert after.hold_ns >= before.hold_ns
    assert after.longest_hold_ns >= before.longest_hold_ns


def test_contended_acquisition_is_counted() -> None:
    holding = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with bql():
            holding.set()
            assert release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert holding.wait(30)
    before = bql_stats()
    waiter_done = threading.Event()

    def waiter() -> None:
        with bql():
            waiter_done.set()

    w = threading.Thread(target=waiter)
    w.start()
    # The waiter is blocked on the lock: it cannot finish until we release.
    assert not waiter_done.wait(0.05)
    release.set()
    t.join()
    w.join()
    after = bql_stats()
    assert waiter_done.is_set()
    assert after.contended >= before.contended + 1
    assert after.wait_ns > before.wait_ns
