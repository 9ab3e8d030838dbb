"""Timers: clock types, scales, stable order, deadlines bounding a blocking
poll, manual clocks waking a blocked poll."""

from __future__ import annotations

import threading
import time

import pytest

from iothreads import AioContext, ClockType, ManualClock
from iothreads.testing import FakeClock, poll_until


class StoppedClock:
    """A clock that moves by itself as far as the loop knows (not a
    ManualClock), but stands still, so timeouts can be computed exactly."""

    def __init__(self, now_ns: int) -> None:
        self.now = now_ns

    def now_ns(self) -> int:
        return self.now


def test_equal_deadlines_fire_in_arming_order(fake_ctx: AioContext, fake_clock: FakeClock) -> None:
    order: list[str] = []
    timers = {n: fake_ctx.timer_new_ns(ClockType.REALTIME, lambda n=n: order.append(n)) for n in "abcde"}
    for n in "cabed":
        timers[n].mod_ns(1000)
    timers["z"] = fake_ctx.timer_new_ns(ClockType.REALTIME, lambda: order.append("z"))
    timers["z"].mod_ns(999)
    fake_clock.advance_ns(1000)
    assert fake_ctx.poll(False)
    assert order == ["z", "c", "a", "b", "e", "d"]
    assert not any(t.pending for t in timers.values())


def test_rearming_moves_a_timer_to_the_back_of_its_deadline(fake_ctx: AioContext, fake_clock: FakeClock) -> None:
    order: list[str] = []
    a = fake_ctx.timer_new_ns(ClockType.REALTIME, lambda: order.append("a"))
    b = fake_ctx.timer_new_ns(ClockType.REALTIME, lambda: order.append("b"))
    a.mod_ns(10)
    b.mod_ns(10)
    a.mod_ns(10)
    fake_clock.advance_ns(10)
    fake_ctx.poll(False)
    assert order == ["b", "a"]


def test_scales(fake_ctx: AioContext, fake_clock: FakeClock) -> None:
    fired: list[str] = []
    ms = fake_ctx.timer_new_ms(ClockType.REALTIME, lambda: fired.append("ms"))
    us = fake_ctx.timer_new_us(ClockType.REALTIME, lambda: fired.append("us"))
    ms.mod(2)
    us.mod(1500)
    assert ms.expire_time_ns == 2_000_000 and us.expire_time_ns == 1_500_000
    fake_clock.advance_ns(1_499_999)
    assert not fake_ctx.poll(False) and fired == []
    fake_clock.advance_ns(1)
    assert fake_ctx.poll(False) and fired == ["us"]
    fake_clock.advance_ns(500_000)
    assert fake_ctx.poll(False) and fired == ["us", "ms"]
    assert ms.now() == 2 and us.now() == 2000


def test_mod_anticipate_only_moves_earlier(fake_ctx: AioContext) -> None:
    t = fake_ctx.timer_new_ns(ClockType.REALTIME, lambda: None)
    t.mod_anticipate(100)
    assert t.expire_time_ns == 100
    t.mod_anticipate(200)
    assert t.expire_time_ns == 100
    t.mod_anticipate(50)
    assert t.expire_time_ns == 50
    t.delete()
    t.delete()  # idempotent
    assert not t.pending and t.expire_time_ns == -1


def test_negative_expiry_clamps_to_zero(fake_ctx: AioContext) -> None:
    fired = []
    t = fake_ctx.timer_new_ms(ClockType.REALTIME, lambda: fired.append(1))
    t.mod(-5)
    assert t.expire_time_ns == 0
    assert fake_ctx.poll(False) and fired == [1]


def test_callback_rearming_into_the_past_runs_again_in_the_same_pass(
    fake_ctx: AioContext, fake_clock: FakeClock
) -> None:
    """QEMU reads the clock once per pass; a re-arm <= that instant fires again."""
    fake_clock.advance_ns(100)
    runs = []

    def cb() -> None:
        runs.append(fake_clock.now_ns())
        if len(runs) < 3:
            t.mod_ns(50)

    t = fake_ctx.timer_new_ns(ClockType.REALTIME, cb)
    t.mod_ns(100)
    assert fake_ctx.poll(False)
    assert runs == [100, 100, 100]


def test_delete_from_own_callback(fake_ctx: AioContext, fake_clock: FakeClock) -> None:
    calls = []

    def cb() -> None:
        calls.append(1)
        t.mod_ns(10**9)
        t.delete()

    t = fake_ctx.timer_new_ns(ClockType.REALTIME, cb)
    t.mod_ns(0)
    assert fake_ctx.poll(False)
    fake_clock.advance_ns(10**10)
    assert not fake_ctx.poll(False)
    assert calls == [1]


def test_timeout_is_the_earliest_deadline_across_clock_types() -> None:
    rt, host = StoppedClock(1_000), StoppedClock(50_000)
    with AioContext(clock={ClockType.REALTIME: rt, ClockType.HOST: host}) as ctx:
        assert ctx._compute_timeout_ns() == -1
        a = ctx.timer_new_ns(ClockType.REALTIME, lambda: None)
        a.mod_ns(1_000 + 7_000_000)
        assert ctx._compute_timeout_ns() == 7_000_000
        b = ctx.timer_new_ns(ClockType.HOST, lambda: None)
        b.mod_ns(50_000 + 3_000)
        assert ctx._compute_timeout_ns() == 3_000
        b.delete()
        assert ctx._compute_timeout_ns() == 7_000_000
        rt.now += 7_000_000
        assert ctx._compute_timeout_ns() == 0
        # A virtual timer never bounds a sleep: its clock does not move by itself.
        a.delete()
        v = ctx.timer_new_ns(ClockType.VIRTUAL, lambda: None)
        v.mod_ns(10)
        assert ctx._compute_timeout_ns() == -1
        ctx.virtual_clock.advance_ns(10)  # type: ignore[attr-defined]
        assert ctx._compute_timeout_ns() == 0
        v.delete()


def test_a_blocking_poll_wakes_for_a_realtime_timer(ctx: AioContext) -> None:
    """Nothing else can wake these polls: they return only because their sleep
    is bounded by the timer's deadline; and the timer never fires early."""
    fired_at = []
    t = ctx.timer_new_ms(ClockType.REALTIME, lambda: fired_at.append(time.monotonic_ns()))
    ctx.poll(False)  # consume the set-up notification
    t.mod(t.now() + 20)
    expire_ns = t.expire_time_ns
    polls = poll_until(lambda: ctx.poll(True), lambda: fired_at, "the timer")
    assert fired_at[0] >= expire_ns
    assert polls <= 3  # a ms-rounded sleep may end a hair early once; never many times


def test_host_clock_is_the_wall_clock(ctx: AioContext) -> None:
    before = time.time_ns()
    now = ctx.clock_now_ns(ClockType.HOST)
    assert before <= now <= time.time_ns()
    assert abs(ctx.clock_now_ns(ClockType.REALTIME) - time.monotonic_ns()) < 10**9


def test_virtual_clock_moves_only_when_told(ctx: AioContext) -> None:
    fired = []
    v = ctx.timer_new_ms(ClockType.VIRTUAL, lambda: fired.append(1))
    v.mod(5)
    assert ctx.clock_now_ns(ClockType.VIRTUAL) == 0
    assert not ctx.poll(False) and fired == []
    clock = ctx.virtual_clock
    assert isinstance(clock, ManualClock)
    t = threading.Thread(target=clock.advance_ns, args=(5_000_000,))
    ctx.poll(False)
    t.start()
    # The advance from another thread wakes the blocked poll.
    poll_until(lambda: ctx.poll(True), lambda: fired, "the timer")
    t.join()
    assert fired == [1]


def test_fake_clock_advanced_from_another_thread_wakes_a_blocked_poll(
    fake_ctx: AioContext, fake_clock: FakeClock
) -> None:
    fired = []
    t = fake_ctx.timer_new_ns(ClockType.REALTIME, lambda: fired.append(fake_clock.now_ns()))
    t.mod_ns(10**12)  # a thousand seconds of fake time
    fake_ctx.poll(False)
    th = threading.Thread(target=fake_clock.advance_ns, args=(10**12,))
    th.start()
    poll_until(lambda: fake_ctx.poll(True), lambda: fired, "the timer")
    th.join()
    assert fired == [10**12]


def test_clocks_reject_bad_input() -> None:
    c = FakeClock()
    with pytest.raises(ValueError):
        c.advance_ns(-1)
    with pytest.raises(ValueError):
        FakeClock(-5)
    with pytest.raises(TypeError):
        AioContext(clock=42)  # type: ignore[arg-type]


def test_timer_mod_from_another_thread_wakes_the_loop(fake_ctx: AioContext) -> None:
    fired = []
    t = fake_ctx.timer_new_ns(ClockType.REALTIME, lambda: fired.append(1))
    fake_ctx.poll(False)
    th = threading.Thread(target=t.mod_ns, args=(0,))
    th.start()
    poll_until(lambda: fake_ctx.poll(True), lambda: fired, "the timer")
    th.join()
    assert fired == [1]


def test_a_timer_that_becomes_the_earliest_fires_though_the_loop_knew_a_later_one(ctx: AioContext) -> None:
    """The loop skips the timer lists while none can be due (before the
    earliest monotonic expiry it last computed): a timer armed sooner than
    that, from a callback or from outside, still fires on the next poll, and
    deleting the earliest one does not stop the others."""
    fired: list[str] = []
    far = ctx.timer_new_ms(ClockType.REALTIME, lambda: fired.append("far"))
    far.mod(far.now() + 3_600_000)
    assert not ctx.poll(True, 1_000_000)  # (computes the deadline: an hour away)
    assert ctx._timers.quiet_until_ns == far.expire_time_ns  # what lets the next polls skip the lists
    now = ctx.timer_new_ns(ClockType.REALTIME, lambda: fired.append("now"))
    now.mod_ns(time.monotonic_ns())  # due at once: the earliest now
    assert ctx.poll(False) and fired == ["now"]

    def arm_from_a_bh() -> None:
        now.mod_ns(time.monotonic_ns())

    ctx.bh_schedule_oneshot(arm_from_a_bh)
    assert ctx.poll(False) and fired == ["now", "now"]  # (the BH, then the timers, in one iteration)
    soon = ctx.timer_new_ms(ClockType.REALTIME, lambda: fired.append("soon"))
    soon.mod(soon.now() + 1)
    far.delete()
    poll_until(lambda: ctx.poll(True), lambda: "soon" in fired, "the timer armed after the far one was deleted")
    host = ctx.timer_new_ns(ClockType.HOST, lambda: fired.append("host"))
    host.mod_ns(time.time_ns() + 3_600_000_000_000)
    assert not ctx.poll(True, 1_000_000)
    assert ctx._timers.quiet_until_ns == 0  # a wall-clock timer: the lists are looked at every time
    host.delete()
