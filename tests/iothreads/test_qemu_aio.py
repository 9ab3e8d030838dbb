"""Ports of QEMU's ``tests/unit/test-aio.c`` (reference §8.1) to ``AioContext``.

Each test names the QEMU test path it mirrors.  ``/aio/acquire`` and
``/aio/external-client`` are not ported: QEMU removed them with the
AioContext lock and ``is_external``.  The GSource variants belong with the
main loop.  Where QEMU sleeps on the real clock (``/aio/timer/schedule``) the
port uses the ``fake_ctx`` fixture and advances its ``FakeClock`` instead.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from types import FrameType

from iothreads import AioContext, BottomHalf, ClockType, Coroutine, EventNotifier, Future
from iothreads.testing import FakeClock, poll_until, run_until_idle

# ---------------------------------------------------------------------------
# Helpers: QEMU's BHTestData / EventNotifierTestData and their callbacks
# ---------------------------------------------------------------------------


@dataclass
class BHTestData:
    n: int = 0
    max: int = 0
    bh: BottomHalf | None = None


def bh_test_cb(data: BHTestData) -> None:
    """QEMU's bh_test_cb: count, and reschedule until ``max``."""
    data.n += 1
    if data.n < data.max:
        assert data.bh is not None
        data.bh.schedule()


def bh_delete_cb(data: BHTestData) -> None:
    """QEMU's bh_delete_cb: like bh_test_cb, but delete the BH at ``max``."""
    assert data.bh is not None
    data.n += 1
    if data.n < data.max:
        data.bh.schedule()
    else:
        data.bh.delete()
        data.bh = None


def new_bh(ctx: AioContext, data: BHTestData, cb: object = bh_test_cb) -> BottomHalf:
    assert callable(cb)
    data.bh = ctx.bh_new(lambda: cb(data), "bh_test_cb")
    return data.bh


@dataclass
class EventNotifierTestData:
    e: EventNotifier = field(default_factory=EventNotifier)
    n: int = 0
    active: int = 0
    auto_set: bool = False


def event_ready_cb(data: EventNotifierTestData) -> None:
    """QEMU's event_ready_cb: must be called only when the notifier is set."""
    assert data.e.test_and_clear()
    data.n += 1
    if data.active > 0:
        data.active -= 1
    if data.auto_set and data.active:
        data.e.set()


def set_event_notifier(ctx: AioContext, data: EventNotifierTestData, on: bool) -> None:
    ctx.set_event_notifier(data.e, (lambda _e: event_ready_cb(data)) if on else None)


def wait_until_inactive(ctx: AioContext, data: EventNotifierTestData) -> None:
    """QEMU's wait_until_inactive, bounded."""
    poll_until(lambda: ctx.poll(True), lambda: data.active <= 0, lambda: f"the notifier to go inactive: {data}",
               max_steps=1000)


# ---------------------------------------------------------------------------
# /aio/bh/*
# ---------------------------------------------------------------------------


def test_bh_schedule(ctx: AioContext) -> None:
    """/aio/bh/schedule: a scheduled BH runs once, at the next (blocking) poll."""
    data = BHTestData()
    bh = new_bh(ctx, data)

    bh.schedule()
    assert data.n == 0

    assert ctx.poll(True)
    assert data.n == 1

    assert not ctx.poll(False)
    assert data.n == 1
    bh.delete()


def test_bh_schedule10(ctx: AioContext) -> None:
    """/aio/bh/schedule10: a self-rescheduling BH runs exactly once per poll."""
    data = BHTestData(max=10)
    bh = new_bh(ctx, data)

    bh.schedule()
    assert data.n == 0

    assert ctx.poll(False)
    assert data.n == 1

    assert ctx.poll(True)
    assert data.n == 2

    polls = 0
    while data.n < 10:
        n = data.n
        assert ctx.poll(True)
        assert data.n == n + 1  # once per poll, never more
        polls += 1
    assert polls == 8
    assert data.n == 10

    assert not ctx.poll(False)
    assert data.n == 10
    bh.delete()


def test_bh_cancel(ctx: AioContext) -> None:
    """/aio/bh/cancel: a BH cancelled after scheduling never runs."""
    data = BHTestData()
    bh = new_bh(ctx, data)

    bh.schedule()
    assert data.n == 0

    bh.cancel()
    assert data.n == 0

    assert not ctx.poll(False)
    assert data.n == 0
    bh.delete()


def test_bh_delete(ctx: AioContext) -> None:
    """/aio/bh/delete: a BH deleted after scheduling never runs."""
    data = BHTestData()
    bh = new_bh(ctx, data)

    bh.schedule()
    assert data.n == 0

    bh.delete()
    assert data.n == 0

    assert not ctx.poll(False)
    assert data.n == 0
    assert bh.deleted


def test_bh_delete_from_cb(ctx: AioContext) -> None:
    """/aio/bh/callback-delete/one: a BH that deletes itself from its callback is freed."""
    data1 = BHTestData(max=1)
    bh = new_bh(ctx, data1, bh_delete_cb)

    bh.schedule()
    assert data1.n == 0

    poll_until(lambda: ctx.poll(True), lambda: data1.n >= data1.max, "the BH's last run", max_steps=100)
    assert data1.n == data1.max
    assert data1.bh is None
    assert bh.deleted

    assert not ctx.poll(False)
    # ctx.close() (fixture) would raise BottomHalfLeakError had it not been freed.


def test_bh_delete_from_cb_many(ctx: AioContext) -> None:
    """/aio/bh/callback-delete/many: four BHs with different self-delete counts."""
    datas = [BHTestData(max=1), BHTestData(max=3), BHTestData(max=2), BHTestData(max=4)]
    bhs = [new_bh(ctx, d, bh_delete_cb) for d in datas]

    for bh in bhs:
        bh.schedule()
    assert [d.n for d in datas] == [0, 0, 0, 0]

    assert ctx.poll(False)
    assert [d.n for d in datas] == [1, 1, 1, 1]
    assert datas[0].bh is None

    poll_until(lambda: ctx.poll(True), lambda: all(d.n >= d.max for d in datas), "the BHs' last runs",
               max_steps=100)
    assert [d.n for d in datas] == [d.max for d in datas]
    assert all(d.bh is None for d in datas)
    assert all(bh.deleted for bh in bhs)
    assert not ctx.poll(False)


def test_bh_flush(ctx: AioContext) -> None:
    """/aio/bh/flush: one blocking poll runs the BH; nothing is pending afterwards."""
    data = BHTestData()
    bh = new_bh(ctx, data)

    bh.schedule()
    assert data.n == 0

    assert ctx.poll(True)
    assert data.n == 1

    assert not ctx.poll(False)
    assert data.n == 1
    bh.delete()


# ---------------------------------------------------------------------------
# /aio/event/*
# ---------------------------------------------------------------------------


def test_set_event_notifier(ctx: AioContext) -> None:
    """/aio/event/add-remove: adding and removing an unset notifier runs nothing."""
    data = EventNotifierTestData(active=0)
    try:
        set_event_notifier(ctx, data, True)
        assert ctx.has_fd_handler(data.e.fileno())
        assert not ctx.poll(False)
        assert data.n == 0

        set_event_notifier(ctx, data, False)
        assert not ctx.has_fd_handler(data.e.fileno())
        assert not ctx.poll(False)
        assert data.n == 0
    finally:
        data.e.close()


def test_wait_event_notifier(ctx: AioContext) -> None:
    """/aio/event/wait: one callback per set; removal stops the callbacks."""
    data = EventNotifierTestData(active=1)
    try:
        set_event_notifier(ctx, data, True)
        run_until_idle(ctx)
        assert data.n == 0
        assert data.active == 1

        data.e.set()
        assert ctx.poll(False)
        assert data.n == 1
        assert data.active == 0

        assert not ctx.poll(False)
        assert data.n == 1
        assert data.active == 0

        set_event_notifier(ctx, data, False)
        data.e.set()  # no handler any more: nothing may run
        assert not ctx.poll(False)
        assert data.n == 1
    finally:
        data.e.close()


def test_wait_event_notifier_noflush(ctx: AioContext) -> None:
    """/aio/event/wait/no-flush-cb: one callback per set, and a blocking poll
    with only a set notifier does not block."""
    data = EventNotifierTestData()
    dummy = EventNotifierTestData(active=1)
    try:
        set_event_notifier(ctx, data, True)

        assert not ctx.poll(False)
        assert data.n == 0

        # Until there is an active descriptor, poll may or may not call
        # event_ready_cb.  Still, it must not block.
        data.e.set()
        assert ctx.poll(True)
        data.n = 0

        # An active event notifier forces poll to look at event notifiers.
        set_event_notifier(ctx, dummy, True)

        data.e.set()
        assert ctx.poll(False)
        assert data.n == 1
        assert not ctx.poll(False)
        assert data.n == 1

        data.e.set()
        assert ctx.poll(False)
        assert data.n == 2
        assert not ctx.poll(False)
        assert data.n == 2

        dummy.e.set()
        wait_until_inactive(ctx, dummy)
        assert data.n == 2
        assert dummy.n == 1
        assert dummy.active == 0

        set_event_notifier(ctx, dummy, False)

        set_event_notifier(ctx, data, False)
        assert not ctx.poll(False)
        assert data.n == 2
    finally:
        data.e.close()
        dummy.e.close()


def test_flush_event_notifier(ctx: AioContext) -> None:
    """/aio/event/flush: a notifier that re-sets itself (active=10) runs 10 times, then stops."""
    data = EventNotifierTestData(active=10, auto_set=True)
    try:
        set_event_notifier(ctx, data, True)
        run_until_idle(ctx)
        assert data.n == 0
        assert data.active == 10

        data.e.set()
        assert ctx.poll(False)
        assert data.n == 1
        assert data.active == 9
        assert ctx.poll(False)

        wait_until_inactive(ctx, data)
        assert data.n == 10
        assert data.active == 0
        assert not ctx.poll(False)

        set_event_notifier(ctx, data, False)
        assert not ctx.poll(False)
        assert data.n == 10
    finally:
        data.e.close()


# ---------------------------------------------------------------------------
# /aio/timer/schedule
# ---------------------------------------------------------------------------


def test_timer_schedule(fake_ctx: AioContext, fake_clock: FakeClock) -> None:
    """/aio/timer/schedule: a 750 ms timer (re-armed by its callback, max 2) on
    the fake clock: not before expiry, then on a non-blocking poll, then on a
    blocking poll woken by the clock advancing in another thread."""
    ctx = fake_ctx
    ns = 750_000_000
    n = 0

    def timer_test_cb() -> None:
        nonlocal n
        n += 1
        if n < 2:
            timer.mod_ns(ctx.clock_now_ns(ClockType.REALTIME) + ns)

    # QEMU registers a dummy fd so that aio_poll can block; kept for fidelity.
    e = EventNotifier()
    try:
        ctx.set_event_notifier(e, lambda _e: None)
        ctx.poll(False)

        timer = ctx.timer_new_ns(ClockType.REALTIME, timer_test_cb)
        timer.mod_ns(ctx.clock_now_ns(ClockType.REALTIME) + ns)
        assert n == 0

        # timer_mod may well have notified the context, so clear that.
        run_until_idle(ctx)
        assert not ctx.poll(False)
        assert n == 0

        fake_clock.advance_ns(749_999_999)  # 1 ns short of the deadline
        assert not ctx.poll(False)
        assert n == 0

        fake_clock.advance_ns(250_000_001)  # one second in total, as QEMU's test waits
        assert n == 0  # timers fire only from poll

        assert ctx.poll(False)
        assert n == 1
        assert timer.pending  # re-armed by its callback
        assert timer.expire_time_ns == 1_000_000_000 + ns

        run_until_idle(ctx)
        assert not ctx.poll(False)
        assert n == 1

        # The blocking poll sleeps until time passes (another thread advances it).
        advancer = threading.Thread(target=fake_clock.advance_ns, args=(1_000_000_000,))
        advancer.start()
        try:
            assert ctx.poll(True)
        finally:
            advancer.join(10)
        assert not advancer.is_alive()
        assert n == 2

        # max is now 2: the callback did not re-arm, nothing else fires.
        assert not timer.pending
        assert not ctx.poll(False)
        assert n == 2

        ctx.set_event_notifier(e, None)
        timer.delete()
    finally:
        e.close()


# ---------------------------------------------------------------------------
# /aio/coroutine/*
# ---------------------------------------------------------------------------


def _stack_depth() -> int:
    frame: FrameType | None = sys._getframe(1)
    depth = 0
    while frame is not None:
        depth += 1
        frame = frame.f_back
    return depth


@dataclass
class ChainData:
    """QEMU's ChainData: ``wakeup`` is the Future the coroutine is parked on;
    completing it is QEMU's ``aio_co_enter`` of that coroutine."""

    max: int
    i: int = 0
    other: ChainData | None = None
    wakeup: Future[None] = field(default_factory=Future)
    resumes: int = 0  # times the coroutine was entered
    nested: int = 0  # times waking the other one ran it at once instead of queueing it
    depths: list[int] = field(default_factory=list)


async def chain(data: ChainData) -> None:
    """QEMU's chain(): enter the other coroutine, then yield to it, ``max`` times."""
    await data.wakeup  # created but not entered yet
    data.resumes += 1
    other = data.other
    assert other is not None
    data.i = 0
    while data.i < data.max:
        if data.i in (0, data.max - 1):
            data.depths.append(_stack_depth())
        parked = data.wakeup = Future()
        # Queue up the other coroutine...
        before = other.resumes
        other.wakeup.set_result(None)
        if other.resumes != before:
            data.nested += 1
        # ...and give control to it.
        await parked
        data.resumes += 1
        data.i += 1


def test_queue_chaining(ctx: AioContext) -> None:
    """/aio/coroutine/queue-chaining: two coroutines wake each other 25000
    times; the wake-ups are chained, not nested, so the stack does not grow."""
    data_a = ChainData(max=25000)
    data_b = ChainData(max=25000)
    data_a.other = data_b
    data_b.other = data_a

    co_a: Coroutine[None] = ctx.spawn(chain(data_a), "chain-a")
    co_b: Coroutine[None] = ctx.spawn(chain(data_b), "chain-b")
    assert ctx.poll(False)  # both start and park on their wake-up Future
    assert not co_a.done() and not co_b.done()
    assert data_a.i == data_b.i == 0

    data_a.wakeup.set_result(None)  # qemu_coroutine_enter(co_a)
    assert ctx.poll(False)

    assert co_a.done()
    co_a.result()  # re-raises anything the coroutine raised (RecursionError...)
    assert data_a.i == data_a.max
    assert data_b.i == data_b.max - 1
    assert not co_b.done()
    # Each wake-up was queued behind the running coroutine, entered only once
    # it yielded: both yielded and were re-entered every time.
    assert data_a.nested == data_b.nested == 0
    assert data_a.resumes == data_a.max + 1
    assert data_b.resumes == data_b.max
    # The 25000th iteration runs at the same depth as the first one.
    assert len(data_a.depths) == 2
    assert data_a.depths[0] == data_a.depths[1]
    assert data_a.depths[1] < sys.getrecursionlimit() // 4

    # Allow the second coroutine to terminate.
    data_b.wakeup.set_result(None)
    assert ctx.poll(False)
    assert co_b.done()
    co_b.result()
    assert data_b.i == data_b.max
    assert data_b.resumes == data_b.max + 1
    assert not ctx.poll(False)


def test_worker_thread_co_enter(ctx: AioContext) -> None:
    """/aio/coroutine/worker-thread-co-enter: waking a coroutine from another
    thread schedules it; it runs in the home thread on the next blocking poll."""
    home = threading.get_ident()
    woken: Future[None] = Future()
    ran_in: list[int] = []

    async def co_check_current_thread() -> None:
        await woken
        ran_in.append(threading.get_ident())

    co = ctx.spawn(co_check_current_thread())
    assert ctx.poll(False)  # started, parked on ``woken``
    assert not co.done()
    assert not ctx.poll(False)

    worker = threading.Thread(target=woken.set_result, args=(None,), name="test_aio_co_enter")
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    assert ran_in == []  # not entered in the worker thread

    assert ctx.poll(True)
    assert ran_in == [home]
    assert co.done()
    assert not ctx.poll(False)
