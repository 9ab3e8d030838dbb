"""Timers: one sorted timer list per clock type (QEMU's ``QEMUTimerList``).

Theory of operation
-------------------
Each list is a binary heap of ``[expire_ns, seq, timer]`` entries with lazy
deletion: re-arming or deleting a timer blanks its old entry (``timer`` set to
``None``) instead of searching the heap, and blank entries are dropped when
they reach the top.  ``seq`` grows with every arming, so timers with equal
deadlines fire in the order they were armed (QEMU inserts after every timer
with ``expire_time <= new``: the same stable order).

``mod`` and ``delete`` may be called from any thread; a short lock guards the
heap.  When an arming makes a timer the new head of its list, the owning
context is notified so that a blocked poll recomputes its timeout.

``run`` reads the clock once and fires every timer due at that instant, in
order, each with the lock released.  A callback that re-arms its timer for a
time ``<=`` that instant runs again in the same pass, as in QEMU.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from ._bh import callable_name
from ._clock import SCALE_MS, SCALE_NS, SCALE_US, Clock, ClockType, ManualClock, MonotonicClock, WallClock

__all__ = ["Timer", "TimerList", "TimerListGroup", "ClockSpec"]


class Timer:
    """A timer of one AioContext and one clock type.

    Created with ``ctx.timer_new_ns/us/ms(clock_type, cb)``.  Expiry times given
    to ``mod`` are absolute, in the timer's scale, on its clock.  The callback
    runs in the context's home thread with no arguments.
    """

    __slots__ = ("_list", "_cb", "scale", "_entry", "name")

    def __init__(self, timer_list: TimerList, scale: int, cb: Callable[[], object], name: str) -> None:
        self._list = timer_list
        self._cb = cb
        self.scale = scale
        self._entry: list[object] | None = None
        self.name = name

    @property
    def clock_type(self) -> ClockType:
        return self._list.clock_type

    @property
    def pending(self) -> bool:
        """Whether the timer is armed and has not fired yet."""
        return self._entry is not None

    @property
    def expire_time_ns(self) -> int:
        """The armed expiry in nanoseconds, or -1 when not pending."""
        entry = self._entry
        return -1 if entry is None else entry[0]  # type: ignore[return-value]

    def now(self) -> int:
        """The timer's clock, read in the timer's scale."""
        return self._list.now_ns() // self.scale

    def mod(self, expire: int) -> None:
        """Arm (or re-arm) the timer to fire at ``expire`` (timer scale).  Any thread."""
        self._list.mod_ns(self, max(expire * self.scale, 0))

    def mod_ns(self, expire_ns: int) -> None:
        """Arm the timer at an absolute time in nanoseconds.  Any thread."""
        self._list.mod_ns(self, max(expire_ns, 0))

    def mod_anticipate(self, expire: int) -> None:
        """Like ``mod``, but only ever moves an armed deadline earlier.  Any thread."""
        self._list.mod_ns(self, max(expire * self.scale, 0), anticipate=True)

    def delete(self) -> None:
        """Disarm the timer.  Idempotent; allowed from its own callback.  Any thread."""
        self._list.delete(self)

    def __repr__(self) -> str:
        state = f"expire_ns={self.expire_time_ns}" if self.pending else "idle"
        return f"<Timer {self.name!r} {self.clock_type.name} {state}>"


class TimerList:
    """The timers of one clock type in one context."""

    def __init__(self, clock_type: ClockType, clock: Clock, notify: Callable[[], None]) -> None:
        self.clock_type = clock_type
        # The built-in clocks are read through the C function itself: one
        # Python call less on every poll that has a timer armed.
        self.now_ns: Callable[[], int] = (
            time.monotonic_ns if type(clock) is MonotonicClock
            else time.time_ns if type(clock) is WallClock
            else clock.now_ns
        )
        self.manual = isinstance(clock, ManualClock)
        self._notify = notify
        self._heap: list[list[object]] = []
        self._lock = threading.Lock()
        self._seq = itertools.count()

    def new_timer(self, scale: int, cb: Callable[[], object], name: str | None) -> Timer:
        if scale <= 0:
            raise ValueError(f"invalid timer scale {scale}")
        return Timer(self, scale, cb, name or callable_name(cb))

    def _prune(self) -> None:
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)

    def mod_ns(self, timer: Timer, expire_ns: int, anticipate: bool = False) -> None:
        heap = self._heap
        lock = self._lock
        lock.acquire()  # not ``with``: half the cost, and nothing below raises
        old = timer._entry
        if old is not None:
            if anticipate and old[0] <= expire_ns:  # type: ignore[operator]
                lock.release()
                return
            old[2] = None
        entry: list[object] = [expire_ns, next(self._seq), timer]
        timer._entry = entry
        heapq.heappush(heap, entry)
        while heap[0][2] is None:  # prune; stops at the latest at entry
            heapq.heappop(heap)
        became_head = heap[0] is entry
        lock.release()
        if became_head:
            self._notify()

    def delete(self, timer: Timer) -> None:
        with self._lock:
            entry = timer._entry
            if entry is not None:
                entry[2] = None
                timer._entry = None
                self._prune()

    def deadline_ns(self) -> int:
        """Nanoseconds until the earliest timer is due; -1 if none; 0 if due.

        On a manual clock a future deadline reads as -1: nothing will move the
        clock while the loop sleeps, and advancing it notifies the context.
        """
        delta = self.until_next_ns()
        return -1 if delta > 0 and self.manual else delta

    def until_next_ns(self) -> int:
        """Nanoseconds until the earliest timer is due on this list's clock,
        a manual one too; -1 if none; 0 if due."""
        heap = self._heap
        try:
            head = heap[0]  # lock-free peek: an entry never changes its expiry
        except IndexError:
            return -1
        if head[2] is not None:
            expire_ns: int = head[0]  # type: ignore[assignment]
        else:
            with self._lock:
                self._prune()
                if not heap:
                    return -1
                expire_ns = heap[0][0]  # type: ignore[assignment]
        return max(expire_ns - self.now_ns(), 0)

    def run(self, report: Callable[[Exception, str], None]) -> int:
        """Fire every timer due now.  Home thread only.  Returns how many fired."""
        heap = self._heap
        if not heap:
            return 0
        now_ns = self.now_ns()
        lock = self._lock
        heappop = heapq.heappop
        fired = 0
        while True:
            try:
                head = heap[0]  # lock-free peek: usually the head is live and not due
            except IndexError:
                return fired
            if head[0] > now_ns and head[2] is not None:  # type: ignore[operator]
                return fired
            lock.acquire()  # not ``with``: half the cost, and nothing below raises
            while heap and heap[0][2] is None:
                heappop(heap)
            if not heap or heap[0][0] > now_ns:  # type: ignore[operator]
                lock.release()
                return fired
            entry = heappop(heap)
            timer: Timer = entry[2]  # type: ignore[assignment]
            timer._entry = None
            lock.release()
            fired += 1
            try:
                timer._cb()
            except Exception as exc:  # reported; the loop goes on
                report(exc, f"timer {timer.name!r}")


ClockSpec = Clock | Mapping[ClockType, Clock] | None


def resolve_clocks(clock: ClockSpec) -> dict[ClockType, Clock]:
    """One clock per type: the defaults, overridden by ``clock``."""
    clocks: dict[ClockType, Clock] = {
        ClockType.REALTIME: MonotonicClock(),
        ClockType.HOST: WallClock(),
        ClockType.VIRTUAL: ManualClock(),
    }
    if isinstance(clock, Mapping):
        for ct, c in clock.items():
            clocks[ClockType(ct)] = c
    elif clock is not None:
        if not isinstance(clock, Clock):
            raise TypeError(f"clock must have now_ns(), not {type(clock).__name__}")
        clocks = {ct: clock for ct in ClockType}
    return clocks


class TimerListGroup:
    """One timer list per clock type (QEMU's ``QEMUTimerListGroup``).

    Every AioContext owns one; the main loop owns another (QEMU's
    ``main_loop_tlg``).  ``notify()`` is called (from whichever thread armed
    the timer) when a timer becomes the earliest of its list, and whenever a
    manual clock of the group is advanced.

    :param clock: as for ``AioContext``: one clock for every type, a mapping
        for some types, or ``None`` for the defaults (REALTIME monotonic,
        HOST wall clock, VIRTUAL a ``ManualClock`` of the group's own).
    """

    def __init__(self, notify: Callable[[], None], clock: ClockSpec = None) -> None:
        clocks = resolve_clocks(clock)
        self.clocks = clocks
        self._notify = notify
        # What a loop may skip, re-read by every ``deadline_ns``: no timer is due before
        # ``time.monotonic_ns()`` reaches ``quiet_until_ns`` (0: unknown), unless ``changed``
        # (set, from any thread, when a timer became the earliest of its list or a manual
        # clock moved: only then can a timer become due sooner).
        self.quiet_until_ns = 0
        self.changed = True
        self._manual = {id(c): c for c in clocks.values() if isinstance(c, ManualClock)}
        for manual in self._manual.values():
            manual.subscribe(self._head_changed)
        self.lists = [TimerList(ct, clocks[ct], self._head_changed) for ct in ClockType]
        self.heaps = [tl._heap for tl in self.lists]  # for a cheap "any timer armed?"
        # By ClockType; plain ints hash alike.  ClockType(x) costs more than
        # reading the clock, and now_ns runs on every timer re-arm.
        self._list_of = {tl.clock_type: tl for tl in self.lists}
        self.fired = 0

    def timer_new(self, clock_type: ClockType, scale: int, cb: Callable[[], object],
                  name: str | None = None) -> Timer:
        return self._list(clock_type).new_timer(scale, cb, name)

    def timer_new_ns(self, clock_type: ClockType, cb: Callable[[], object], name: str | None = None) -> Timer:
        return self.timer_new(clock_type, SCALE_NS, cb, name)

    def timer_new_us(self, clock_type: ClockType, cb: Callable[[], object], name: str | None = None) -> Timer:
        return self.timer_new(clock_type, SCALE_US, cb, name)

    def timer_new_ms(self, clock_type: ClockType, cb: Callable[[], object], name: str | None = None) -> Timer:
        return self.timer_new(clock_type, SCALE_MS, cb, name)

    def now_ns(self, clock_type: ClockType) -> int:
        return self._list(clock_type).now_ns()

    def _list(self, clock_type: ClockType) -> TimerList:
        try:
            return self._list_of[clock_type]
        except (KeyError, TypeError):
            return self.lists[ClockType(clock_type)]  # raises ValueError

    def _head_changed(self) -> None:
        """A timer may be due sooner than the group last said.  Any thread."""
        # GIL ordering: stored after the heap changed (partner: deadline_ns,
        # which clears it before it reads the heaps): a change is seen by
        # that read, or leaves this set for the next one.
        self.changed = True
        self._notify()

    def deadline_ns(self) -> int:
        """Nanoseconds until the earliest timer is due (0: due now; -1: none).

        Also sets what a loop may skip until then (``quiet_until_ns``) when
        every armed timer is on the monotonic clock or a manual one (a wall
        clock can jump: no promise is made then).
        """
        self.changed = False
        self.quiet_until_ns = 0
        if not any(self.heaps):
            return -1
        deadline = -1
        quiet_until_ns = -1  # the earliest monotonic expiry, while every list allows one
        for tl in self.lists:
            heap = tl._heap
            if not heap:  # most lists are empty
                continue
            head = heap[0]  # (the common case here, in one frame: a live head on a clock that runs)
            if head[2] is None or tl.manual:
                d = tl.deadline_ns()
                if d < 0:
                    continue  # (a manual clock's future: its advance sets ``changed``)
                expire_ns = tl.now_ns() + d
            else:
                expire_ns = head[0]  # type: ignore[assignment]
                d = expire_ns - tl.now_ns()
            if d <= 0:
                return 0
            if deadline < 0 or d < deadline:
                deadline = d
            if tl.now_ns is not time.monotonic_ns:
                quiet_until_ns = 0
            elif quiet_until_ns and (quiet_until_ns < 0 or expire_ns < quiet_until_ns):
                quiet_until_ns = expire_ns
        self.quiet_until_ns = max(quiet_until_ns, 0)
        return deadline

    def run(self, report: Callable[[Exception, str], None]) -> bool:
        """Fire every due timer, clock types in QEMU's order.  Returns progress."""
        fired = 0
        for tl in self.lists:
            heap = tl._heap
            if heap:
                head = heap[0]
                if head[0] > tl.now_ns() and head[2] is not None:  # type: ignore[operator]
                    continue  # nothing due: the common case, without a call
                fired += tl.run(report)
        if fired:
            self.fired += fired
            self.changed = True  # (the heads moved: the next deadline_ns looks again)
        return fired > 0

    def close(self) -> None:
        """Stop listening to manual clocks."""
        for manual in self._manual.values():
            manual.unsubscribe(self._head_changed)
