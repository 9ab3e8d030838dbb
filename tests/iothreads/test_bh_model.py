"""Model-based test of bottom halves and timers (QEMU ``util/async.c`` and
``util/qemu-timer.c``; reference §2.5, §2.8 and §5).

A Hypothesis state machine drives one ``AioContext`` on a ``FakeClock`` with
random BH and timer operations and checks every ``poll(False)`` (and, when
progress is certain, ``poll(True)``) against a plain Python model:

* a BH runs at a poll iff it was scheduled since the previous poll and is
  neither cancelled nor deleted; once per poll however often it was scheduled;
  a BH scheduled from its own callback waits for the next poll;
* deleting a BH never runs it and frees it at the next poll; scheduling a
  freed BH is an error; a oneshot runs once;
* BHs run before timers (aio_poll phases 6 and 8);
* due timers fire in deadline order, equal deadlines in arming order, the
  clock types one after the other in enum order; ``mod_anticipate`` only
  moves a deadline earlier;
* ``poll`` returns progress iff a non-idle BH or a timer ran;
* ``close()`` raises ``BottomHalfLeakError`` naming exactly the BHs never
  deleted (and the oneshots never run).

There is no single QEMU test for this; it generalises ``/aio/bh/*`` and
``/aio/timer/schedule`` of ``tests/unit/test-aio.c``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)
from hypothesis.strategies import SearchStrategy

from iothreads import AioContext, BottomHalf, ClockType, Timer
from iothreads.testing import FakeClock
from protocol import BottomHalfLeakError, StateError

LogEntry = tuple[str, str]  # ("bh" | "timer", name)


@dataclass
class ModelBH:
    name: str
    resched: int  # how many more times the callback reschedules its own BH
    pending: bool = False  # enqueued since the last poll (QEMU's BH_PENDING)
    scheduled: bool = False
    idle: bool = False
    deleted: bool = False
    freed: bool = False


@dataclass
class ModelTimer:
    name: str
    clock_type: ClockType
    deadline: int | None = None  # ns; None when not pending
    seq: int = 0  # arming order


RESCHED: SearchStrategy[int] = st.integers(0, 2)  # times a BH reschedules itself
CLOCK_TYPES: SearchStrategy[ClockType] = st.sampled_from(list(ClockType))
DELTA: SearchStrategy[int] = st.integers(-2, 6)  # timer expiry relative to now, ns
ADVANCE: SearchStrategy[int] = st.integers(0, 5)  # clock steps, ns


def _raise(ctx: AioContext, exc: Exception, where: str) -> None:
    raise exc


class BottomHalfTimerMachine(RuleBasedStateMachine):
    """Random BH / timer operations on one context, checked against a model."""

    bhs = Bundle("bhs")
    timers = Bundle("timers")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.ctx = AioContext(clock=self.clock, name="bh-model")
        self.ctx.set_exception_handler(_raise)
        self.log: list[LogEntry] = []
        # the real objects, and the counters their callbacks use
        self.real_bhs: dict[str, BottomHalf] = {}
        self.real_resched: dict[str, int] = {}
        self.real_timers: dict[str, Timer] = {}
        # the model
        self.m_bhs: dict[str, ModelBH] = {}
        self.m_oneshots: list[str] = []  # queued, not run yet
        self.m_timers: dict[str, ModelTimer] = {}
        self.m_now = 0
        self.m_seq = 0
        self.counter = 0

    def _name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    # -- bottom halves ---------------------------------------------------

    def _bh_cb(self, name: str) -> None:
        self.log.append(("bh", name))
        if self.real_resched[name] > 0:
            self.real_resched[name] -= 1
            self.real_bhs[name].schedule()

    def _bh_new(self, resched: int) -> str:
        name = self._name("bh")
        self.real_resched[name] = resched
        self.real_bhs[name] = self.ctx.bh_new(lambda: self._bh_cb(name), name)
        self.m_bhs[name] = ModelBH(name, resched)
        return name

    @initialize(target=bhs, rescheds=st.lists(RESCHED, min_size=2, max_size=2))
    def init_bhs(self, rescheds: list[int]) -> object:
        """Start with two BHs, so that every rule is enabled from the first step."""
        return multiple(*(self._bh_new(r) for r in rescheds))

    @rule(target=bhs, resched=RESCHED)
    def bh_new(self, resched: int) -> str:
        return self._bh_new(resched)

    def _schedule(self, name: str, idle: bool) -> None:
        m = self.m_bhs[name]
        bh = self.real_bhs[name]
        if m.freed:
            with pytest.raises(StateError):
                bh.schedule_idle() if idle else bh.schedule()
            return
        bh.schedule_idle() if idle else bh.schedule()
        m.pending = m.scheduled = True
        m.idle = m.idle or idle  # the IDLE bit stays until the BH is dequeued

    @rule(name=bhs)
    def schedule(self, name: str) -> None:
        self._schedule(name, idle=False)

    @rule(name=bhs)
    def schedule_twice(self, name: str) -> None:
        self._schedule(name, idle=False)
        self._schedule(name, idle=False)

    @rule(name=bhs)
    def schedule_idle(self, name: str) -> None:
        self._schedule(name, idle=True)

    @rule(name=bhs)
    def cancel(self, name: str) -> None:
        self.real_bhs[name].cancel()
        self.m_bhs[name].scheduled = False

    @rule(name=bhs)
    def delete(self, name: str) -> None:
        self.real_bhs[name].delete()
        m = self.m_bhs[name]
        if not (m.deleted or m.freed):
            m.pending = m.deleted = True

    @rule()
    def oneshot(self) -> None:
        name = self._name("oneshot")
        self.ctx.bh_schedule_oneshot(lambda: self.log.append(("bh", name)), name)
        self.m_oneshots.append(name)

    # -- timers ----------------------------------------------------------

    def _timer_new(self, clock_type: ClockType) -> str:
        name = self._name("timer")
        self.real_timers[name] = self.ctx.timer_new_ns(
            clock_type, lambda: self.log.append(("timer", name)), name
        )
        self.m_timers[name] = ModelTimer(name, clock_type)
        return name

    @initialize(target=timers, clock_type=CLOCK_TYPES)
    def init_timers(self, clock_type: ClockType) -> object:
        """Start with two REALTIME timers (ties likely) and one of any type."""
        types = (ClockType.REALTIME, ClockType.REALTIME, clock_type)
        return multiple(*(self._timer_new(ct) for ct in types))

    @rule(target=timers, clock_type=CLOCK_TYPES)
    def timer_new(self, clock_type: ClockType) -> str:
        return self._timer_new(clock_type)

    def _arm(self, m: ModelTimer, expire: int) -> None:
        self.m_seq += 1
        m.deadline = expire
        m.seq = self.m_seq

    @rule(name=timers, delta=DELTA)
    def timer_mod(self, name: str, delta: int) -> None:
        expire = self.clock.now_ns() + delta
        self.real_timers[name].mod_ns(expire)
        self._arm(self.m_timers[name], max(expire, 0))

    @rule(name=timers, delta=DELTA)
    def timer_mod_anticipate(self, name: str, delta: int) -> None:
        expire = self.clock.now_ns() + delta
        self.real_timers[name].mod_anticipate(expire)
        m = self.m_timers[name]
        expire = max(expire, 0)
        if m.deadline is None or m.deadline > expire:
            self._arm(m, expire)

    @rule(name=timers)
    def timer_delete(self, name: str) -> None:
        self.real_timers[name].delete()
        self.m_timers[name].deadline = None

    @rule(delta=ADVANCE)
    def advance(self, delta: int) -> None:
        self.clock.advance_ns(delta)
        self.m_now += delta

    # -- polling ---------------------------------------------------------

    def _expected_poll(self) -> tuple[list[LogEntry], list[LogEntry], bool]:
        """Run the model's poll: (BH calls, timer firings in order, progress)."""
        bh_calls: list[LogEntry] = []
        progress = False
        for m in self.m_bhs.values():
            if not m.pending:
                continue
            runs = m.scheduled and not m.deleted
            idle = m.idle
            m.pending = m.scheduled = m.idle = False
            if m.deleted:
                m.freed = True
            if runs:
                bh_calls.append(("bh", m.name))
                progress = progress or not idle
                if m.resched > 0:  # rescheduled from its callback: next poll
                    m.resched -= 1
                    m.pending = m.scheduled = True
        for name in self.m_oneshots:
            bh_calls.append(("bh", name))
            progress = True
        self.m_oneshots = []

        fired: list[LogEntry] = []
        for ct in ClockType:  # timer lists run in enum order
            due = sorted(
                (t for t in self.m_timers.values()
                 if t.clock_type is ct and t.deadline is not None and t.deadline <= self.m_now),
                key=lambda t: (t.deadline, t.seq),
            )
            for t in due:
                t.deadline = None
                fired.append(("timer", t.name))
        return bh_calls, fired, progress or bool(fired)

    def _check_poll(self, blocking: bool) -> None:
        self.log.clear()
        progress = self.ctx.poll(blocking)
        bh_calls, fired, expected_progress = self._expected_poll()
        n = len(bh_calls)
        assert Counter(self.log[:n]) == Counter(bh_calls), (self.log, bh_calls, fired)
        assert self.log[n:] == fired, (self.log, bh_calls, fired)
        assert progress == expected_progress

    @rule()
    def poll(self) -> None:
        self._check_poll(blocking=False)

    @rule(delta=ADVANCE)
    def advance_and_poll(self, delta: int) -> None:
        self.advance(delta)
        self._check_poll(blocking=False)

    def _progress_certain(self) -> bool:
        return (
            bool(self.m_oneshots)
            or any(m.pending and m.scheduled and not m.deleted and not m.idle
                   for m in self.m_bhs.values())
            or any(m.deadline is not None and m.deadline <= self.m_now
                   for m in self.m_timers.values())
        )

    @precondition(lambda self: self._progress_certain())
    @rule()
    def poll_blocking(self) -> None:
        """With a runnable BH or a due timer, a blocking poll must not block."""
        self._check_poll(blocking=True)

    # -- invariants and teardown ----------------------------------------------

    @invariant()
    def states_match(self) -> None:
        assert self.clock.now_ns() == self.m_now
        for name, m in self.m_bhs.items():
            bh = self.real_bhs[name]
            assert bh.scheduled == (m.scheduled and not m.deleted), (bh, m)
            assert bh.deleted == (m.deleted or m.freed), (bh, m)
        for name, t in self.m_timers.items():
            timer = self.real_timers[name]
            assert timer.pending == (t.deadline is not None), (timer, t)
            assert timer.expire_time_ns == (-1 if t.deadline is None else t.deadline)

    def teardown(self) -> None:
        leaked = sorted([m.name for m in self.m_bhs.values() if not m.deleted] + self.m_oneshots)
        if leaked:
            with pytest.raises(BottomHalfLeakError) as excinfo:
                self.ctx.close()
            assert excinfo.value.names == leaked
        else:
            self.ctx.close()
        assert self.ctx.closed


BottomHalfTimerMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None
)
TestBottomHalfTimerModel = BottomHalfTimerMachine.TestCase
