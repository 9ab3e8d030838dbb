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


def test_call_unlocked_releases_around_the_call_and_keeps_the_counters() -> None:
    """The main loop's poll: one call that unlocks, calls and relocks, counted
    as ``bql_unlock(); fn(); bql_lock()`` would be."""
    from mainloop.loop._bql import BQL

    with pytest.raises(StateError, match="not held"):
        BQL.call_unlocked(lambda a, b: a + b, 1, 2)
    seen: list[object] = []

    def vcpu() -> None:
        with bql():  # free while the main thread is inside call_unlocked
            seen.append(bql_locked())

    def wait(a: int, b: int) -> int:
        seen.append(bql_locked())
        t = threading.Thread(target=vcpu)
        t.start()
        t.join()
        return a + b

    with bql():
        before = bql_stats()
        assert BQL.call_unlocked(wait, 1, 2) == 3
        assert bql_locked()
        after = bql_stats()

        def boom(a: int, b: int) -> None:
            raise OSError("poll failed")

        with pytest.raises(OSError):
            BQL.call_unlocked(boom, 0, 0)
        assert bql_locked()  # retaken on the way out
    assert seen == [False, True]
    assert after.acquisitions == before.acquisitions + 2  # the vCPU's and the retake
    assert after.hold_ns > before.hold_ns  # the hold that ended at the release
