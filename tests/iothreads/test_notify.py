"""notify() and the notify_me / notified protocol: wake-ups are never lost and
cost an eventfd write only when the home thread may be asleep."""

from __future__ import annotations

import threading
import time

from iothreads import AioContext, ClockType
from iothreads.testing import poll_until, wait_until

DEADLINE_S = 60.0


def test_many_threads_scheduling_oneshots_while_home_blocks(ctx: AioContext) -> None:
    """>= 100,000 cross-thread schedules: every one runs exactly once."""
    n_threads, per_thread = 4, 25_000
    counts = [0] * n_threads
    go = threading.Barrier(n_threads)

    def producer(i: int) -> None:
        go.wait()

        def bump() -> None:
            counts[i] += 1

        for _ in range(per_thread):
            ctx.bh_schedule_oneshot(bump)

    threads = [threading.Thread(target=producer, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    poll_until(lambda: ctx.poll(True), lambda: sum(counts) >= n_threads * per_thread, "all oneshots",
               DEADLINE_S)
    for t in threads:
        t.join()
    assert not ctx.poll(False)
    assert counts == [per_thread] * n_threads


def test_coalesced_schedules_never_lose_the_last_one(ctx: AioContext) -> None:
    """A shared BH scheduled by many threads: after each thread's final
    schedule the BH runs again, so it always sees every thread's last value."""
    n_threads, per_thread = 4, 20_000
    published = [0] * n_threads
    seen = [0] * n_threads
    bh = ctx.bh_new(lambda: seen.__setitem__(slice(None), published), "collector")

    def producer(i: int) -> None:
        for k in range(1, per_thread + 1):
            published[i] = k
            bh.schedule()

    threads = [threading.Thread(target=producer, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    poll_until(lambda: ctx.poll(True), lambda: seen == [per_thread] * n_threads, "the final values",
               DEADLINE_S)
    for t in threads:
        t.join()
    bh.delete()
    ctx.poll(False)


def test_home_thread_activity_never_writes_the_eventfd(ctx: AioContext) -> None:
    ran = []
    bh = ctx.bh_new(lambda: ran.append(1))
    for _ in range(1000):
        bh.schedule()
        assert ctx.poll(False)
    ctx.notify()
    bh.delete()
    ctx.poll(False)
    assert len(ran) == 1000
    assert ctx.stats().notifier_writes == 0
    assert not ctx.notifier.test_and_clear()


def test_cross_thread_schedule_wakes_a_blocked_poll(ctx: AioContext) -> None:
    ran = threading.Event()
    blocked = threading.Event()

    def other() -> None:
        # Wait until the home thread has announced it will block: then the
        # schedule must go through the eventfd.
        wait_until(lambda: ctx._notify_me, "the home thread to block", DEADLINE_S)
        blocked.set()
        ctx.bh_schedule_oneshot(ran.set)

    ctx.poll(False)  # consume the notification left by the context's set-up
    t = threading.Thread(target=other)
    t.start()
    try:
        assert ctx.poll(True)
    finally:
        ctx.notify()  # never leave the other thread spinning if the poll failed
        t.join()
    assert ran.is_set() and blocked.is_set()
    assert ctx.stats().notifier_writes >= 1


def test_notify_alone_is_not_progress(ctx: AioContext) -> None:
    t = threading.Thread(target=ctx.notify)
    t.start()
    assert ctx.poll(True) is False
    t.join()
    # The eventfd may still hold the wake-up; draining it is not progress either.
    assert ctx.poll(False) is False


def test_notified_before_blocking_makes_the_poll_return(ctx: AioContext) -> None:
    ctx.notify()
    assert ctx.poll(True) is False  # returns at once instead of sleeping forever


def test_a_blocking_poll_with_a_timeout_returns_when_it_passes(ctx: AioContext) -> None:
    """``poll(True, timeout_ns)``: nothing to do, so it sleeps until the
    timeout, and returns no progress; a timer due sooner still wakes it."""
    t0 = time.monotonic_ns()
    assert ctx.poll(True, 20_000_000) is False
    assert time.monotonic_ns() - t0 >= 20_000_000
    fired: list[int] = []
    timer = ctx.timer_new_ns(ClockType.REALTIME, lambda: fired.append(1))
    timer.mod_ns(ctx.clock_now_ns(ClockType.REALTIME) + 1_000_000)
    # The timer, not the poll's 60 s timeout, ends the sleep.
    poll_until(lambda: ctx.poll(True, int(DEADLINE_S * 1e9)), lambda: fired, "the timer to fire", DEADLINE_S)
    timer.delete()
