"""AioContext: the event loop every iothread (and the main loop) runs.

Theory of operation
-------------------
An AioContext owns fd handlers, bottom halves (BHs), timers, a thread pool and
an eventfd (its *notifier*).  One thread, its *home thread*, runs it by calling
``poll(blocking)`` in a loop; every callback runs there.  Other threads talk to
it only through calls documented "any thread": scheduling or deleting a BH,
``notify()``, ``set_fd_handler``, arming timers, scheduling coroutines.  Each of
those publishes its change and then calls ``notify()``.

One ``poll`` runs QEMU 10.0's ``aio_poll`` phases, in this order:

1. timeout: 0 when not blocking or when a BH is runnable; else the earliest
   timer deadline (10 ms when only idle BHs wait); -1 means forever.
2. busy polling: when enabled and every handler can be polled in user space,
   call the ``io_poll`` functions in a loop for up to the adaptive window.
3. announce the intent to block (``notify_me``) and re-check ``notified``.
4. wait in epoll (skipped when the timeout is 0 and nothing could be missed).
5. accept the notification (``notified = False``).
6. run the BHs carved off so far.
7. dispatch the ready fd handlers (and adapt each one's polling window).
8. fire due timers.

Steps 1 and 8 do not walk the timer lists while no timer can be due: the
group remembers the earliest expiry on the monotonic clock it last computed
(``quiet_until_ns``), which holds until a timer becomes the earliest of its
list or a manual clock moves (``changed``, set from any thread before the
``notify()`` that follows).  An armed watchdog timer cost a turn 14k
instructions before.

``poll`` returns whether progress was made: a BH, a handler or a timer ran.
Waking up for a ``notify()`` alone, draining the context's own notifier and
running idle BHs are not progress.

The notify_me / notified protocol (QEMU ``aio_notify``), which makes a wake-up
cost a syscall only when the home thread may be asleep::

    notify():   notified = True;  if notify_me: notifier.set()
    poll():     notify_me += 2;   if notified: timeout = 0;  wait(timeout)
                notify_me -= 2;   notified = False;  run BHs, handlers, timers

For an event E published before ``notify()``: either the home thread had not
yet raised ``notify_me`` when ``notify()`` read it, and then it sees
``notified`` afterwards and does not sleep; or it had, and the eventfd write
ends its sleep.  Either way E is seen before the next sleep.  The eventfd may
stay readable after the accept; its handler drains it like any other fd.

Memory ordering
---------------
QEMU puts a memory barrier on each side of every cross-thread handshake, and
its comments name each barrier's partner.  Here CPython's GIL does the
barriers' work: one thread at a time runs bytecode, and a plain load or store
of an attribute (an int, a bool, a reference to a list or a dict) is one
indivisible step, so every thread sees all such loads and stores in one
order that keeps each thread's program order (sequential consistency).  A
store followed by a load on each side (``notified``, then ``notify_me`` in
``notify``; ``notify_me``, then ``notified`` in ``poll``) therefore behaves
as with QEMU's ``smp_mb``: at least one side sees the other's store.  Each
site that relies on this says "GIL ordering" and names its partner.  What the
GIL does not give: a read-modify-write (``notify_me += 2``) is a load and a
store, not one step, so every such field has a single writing thread.  (A
free-threaded CPython build would need atomics at these sites.)

Handlers are level-triggered and replaced copy-on-write: changing an fd's
handler makes a new node and marks the old one deleted, so a dispatch in
progress skips it.  A handler may thus add or remove any handler, its own
included, while being dispatched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from protocol import BottomHalfLeakError, StateError, ThreadContractError

from ._bh import BH_DELETED, BH_IDLE, BH_SCHEDULED, BottomHalf, BottomHalfQueue
from ._clock import SCALE_MS, SCALE_NS, SCALE_US, Clock, ClockType
from ._handlers import FdHandlers, IOHandler, PollFn, Ready, soonest_timeout
from ._notifier import EventNotifier
from ._polling import PollParams
from ._timers import Timer, TimerListGroup

if TYPE_CHECKING:
    from ._coroutine import Coroutine
    from ._threadpool import ThreadPool

__all__ = ["AioContext", "AioContextStats", "get_current_aio_context"]

log = logging.getLogger("iothreads")

ExceptionHandler: TypeAlias = Callable[["AioContext", Exception, str], None]

# thread ident -> the context whose poll runs in that thread.  A dict item
# costs less than a threading.local attribute, on every poll; an entry leaves
# with the outermost poll of its thread.
_running: dict[int, AioContext] = {}


_BH_RUNNABLE_MASK = BH_SCHEDULED | BH_DELETED | BH_IDLE


def get_current_aio_context() -> AioContext | None:
    """The context whose ``poll`` is running in the calling thread, if any."""
    return _running.get(threading.get_ident())


@dataclass(frozen=True, slots=True)
class AioContextStats:
    """Counters of one AioContext since it was created."""

    iterations: int
    """Calls to ``poll``."""
    waits: int
    """Calls into epoll (blocking or not)."""
    bh_calls: int
    """Bottom-half callbacks run."""
    fd_dispatches: int
    """fd handler callbacks run (the context's own notifier excluded)."""
    timers_fired: int
    busy_poll_runs: int
    """Times the loop busy-polled before (maybe) sleeping."""
    busy_poll_hits: int
    """Of those, times an ``io_poll`` found work, so the loop did not sleep."""
    notifier_writes: int
    """``notify()`` calls that had to write the eventfd (the home thread might be asleep)."""
    notifies: int
    """All ``notify()`` calls."""
    handlers: int
    """fd handlers registered now (the context's own notifier included)."""


class AioContext:
    """An event loop of QEMU's kind; see the module docstring.

    :param clock: one clock for every clock type (``iothreads.testing.FakeClock``
        makes timers deterministic), or a mapping from ``ClockType`` to clock
        for some of them.  By default REALTIME is ``time.monotonic_ns``, HOST is
        ``time.time_ns`` and VIRTUAL is a ``ManualClock`` of this context
        (``ctx.virtual_clock``) that moves only when advanced.
    :param name: shown in reprs, logs and leak errors.

    The creating thread is the home thread until ``set_home_thread`` moves it.
    """

    def __init__(
        self,
        clock: Clock | Mapping[ClockType, Clock] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self.name = name or f"aio-{id(self):x}"
        self._home = threading.get_ident()
        self._closed = False
        self._exception_handler: ExceptionHandler | None = None

        # notify_me / notified (module docstring).  notify_me bit 0 belongs to
        # a GSource adapter (the main loop); bits 1.. count blocking polls.
        # Only the home thread writes notify_me (its += and |= are not atomic);
        # any thread reads it (notify).  Any thread sets notified; the home
        # thread clears it (the accept).
        self._notify_me = 0
        self._notified = False
        self._notifier = EventNotifier()
        self._notifies = 0
        self._notifier_writes = 0

        # fd handlers
        self._fds = FdHandlers(self)
        # The main-loop source's record of this context's fds that polled
        # ready in the current iteration: the source fills this very list,
        # and gsource_check reads it, as QEMU's aio_ctx_check reads the
        # revents of its handlers' GPollFDs.
        self.gsource_ready_fds: list[Any] = []
        self._poll_params = PollParams()
        self.aio_max_batch = 0

        self._bhs = BottomHalfQueue(self)

        # timers
        self._timers = TimerListGroup(self.notify, clock)
        self._timer_heaps = self._timers.heaps
        self.virtual_clock = self._timers.clocks[ClockType.VIRTUAL]

        # thread pool (created on first use) and coroutines
        self._thread_pool: ThreadPool | None = None
        self._thread_pool_min = 0
        self._thread_pool_max = 64
        self._co_queue: list[Coroutine[Any]] = []
        self._co_lock = threading.Lock()
        self._co_schedule_bh = self._bhs.new(self._co_schedule_bh_cb, "co_schedule_bh")

        # counters
        self._iterations = 0
        self._waits = 0

        self._fds.set(
            self._notifier.fileno(), self._notifier_read, None, self._notifier_poll,
            self._notifier_poll_ready, None, None, is_notifier=True,
        )

    # ------------------------------------------------------------------
    # Threads
    # ------------------------------------------------------------------

    def set_home_thread(self) -> None:
        """Make the calling thread the home thread (QEMU's
        ``qemu_set_current_aio_context``), e.g. in a thread that will run
        this context.  Not while another thread is inside ``poll``."""
        self._check_open()
        self._home = threading.get_ident()

    @property
    def in_home_thread(self) -> bool:
        return threading.get_ident() == self._home

    def _assert_home(self, what: str) -> None:
        if threading.get_ident() != self._home:
            raise ThreadContractError(
                f"{what} must be called from the home thread of AioContext {self.name!r}"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise StateError(f"AioContext {self.name!r} is closed")

    # ------------------------------------------------------------------
    # Errors raised by callbacks
    # ------------------------------------------------------------------

    def set_exception_handler(self, handler: ExceptionHandler | None) -> None:
        """Choose what happens when a callback raises.

        ``handler(ctx, exc, where)`` is called in the home thread; ``where``
        names the callback.  If it raises, the exception leaves ``poll``.  The
        default (``None``) logs the error with its traceback on the
        ``iothreads`` logger and carries on, so one faulty callback does not
        stop the loop.
        """
        self._exception_handler = handler

    def report_exception(self, exc: Exception, where: str) -> None:
        """Hand a callback's exception to the exception handler.  Home thread."""
        handler = self._exception_handler
        if handler is None:
            log.error("AioContext %s: %s raised %r", self.name, where, exc, exc_info=exc)
        else:
            handler(self, exc, where)

    # ------------------------------------------------------------------
    # notify (any thread)
    # ------------------------------------------------------------------

    def notify(self) -> None:
        """Make the home thread look at the context's state soon.  Any thread.

        Writes the eventfd only when the home thread is, or may be about to
        be, blocked (``notify_me != 0``); otherwise setting ``notified`` is
        enough, because the home thread checks it before it sleeps.
        """
        self._notifies += 1  # a statistic: racing notifiers may lose an increment
        # GIL ordering (QEMU's smp_wmb, then smp_mb, in aio_notify): the
        # caller's event is stored before ``notified``, and ``notified`` before
        # ``notify_me`` is read.  Partners: poll() step 3 (stores notify_me,
        # then reads notified), gsource_prepare() (stores bit 0, then reads the
        # BHs and timers), and the accept in poll() step 5 / gsource_check().
        # BottomHalfQueue.enqueue inlines this same sequence.
        self._notified = True
        if self._notify_me:
            self._notifier_writes += 1
            self._notifier.set()

    def _notifier_read(self) -> None:
        self._notifier.test_and_clear()

    def _notifier_poll(self) -> bool:
        # GIL ordering: a plain read of the flag that notify() stores (partner:
        # notify), so busy polling sees a notify without a syscall.
        return self._notified

    def _notifier_poll_ready(self) -> None:
        pass

    @property
    def notifier(self) -> EventNotifier:
        """The context's own eventfd (readable after a ``notify()`` that had to wake it)."""
        return self._notifier

    # ------------------------------------------------------------------
    # fd handlers (any thread)
    # ------------------------------------------------------------------

    def set_fd_handler(
        self,
        fd: int,
        io_read: IOHandler | None = None,
        io_write: IOHandler | None = None,
        io_poll: PollFn | None = None,
        *,
        io_poll_ready: IOHandler | None = None,
        io_poll_begin: IOHandler | None = None,
        io_poll_end: IOHandler | None = None,
    ) -> None:
        """Register, replace or (with every handler ``None``) remove ``fd``'s handlers.

        Any thread.  ``io_read()`` runs when the fd is readable (or hung up or in
        error), ``io_write()`` when writable; both are level-triggered.
        ``io_poll()`` is the user-space readiness check used by busy polling:
        it must be cheap and return True when there is work, which
        ``io_poll_ready()`` (default: ``io_read``) then handles.  A handler
        without ``io_poll`` turns busy polling off for the whole context.
        ``io_poll_begin``/``io_poll_end`` bracket a busy-polling phase (e.g. to
        suppress and re-enable notifications); ``end`` is not guaranteed to
        follow ``begin`` if the handler is removed meanwhile.
        """
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise ValueError(f"fd must be a non-negative integer, not {fd!r}")
        self._check_open()
        if fd == self._notifier.fileno():
            raise ValueError("the context's own notifier fd cannot be replaced")
        if io_poll is not None and io_poll_ready is None:
            io_poll_ready = io_read
        if io_poll_ready is None:
            io_poll = None  # polling only makes sense with something to run
        if self._fds.set(fd, io_read, io_write, io_poll, io_poll_ready, io_poll_begin,
                         io_poll_end, is_notifier=False):
            self.notify()  # a blocked poll must see the new fd set

    def set_event_notifier(
        self,
        notifier: EventNotifier,
        handler: Callable[[EventNotifier], object] | None,
        io_poll: PollFn | None = None,
    ) -> None:
        """Call ``handler(notifier)`` whenever ``notifier`` is set; ``None`` removes.

        Any thread.  The handler is expected to ``test_and_clear()`` the
        notifier (level-triggered, like every fd handler).
        """
        if handler is None:
            self.set_fd_handler(notifier.fileno())
        else:
            self.set_fd_handler(notifier.fileno(), lambda: handler(notifier), io_poll=io_poll)

    def has_fd_handler(self, fd: int) -> bool:
        """Whether ``fd`` has a handler in this context.  Any thread."""
        return fd in self._fds.nodes

    # ------------------------------------------------------------------
    # Bottom halves
    # ------------------------------------------------------------------

    def bh_new(self, cb: Callable[[], object], name: str | None = None) -> BottomHalf:
        """A new, unscheduled bottom half running ``cb()``.  Any thread.

        Delete it with ``bh.delete()`` when done: ``close()`` raises
        ``BottomHalfLeakError`` naming every BH still alive.
        """
        self._check_open()
        return self._bhs.new(cb, name)

    def bh_schedule_oneshot(self, cb: Callable[[], object], name: str | None = None) -> None:
        """Run ``cb()`` once at the next ``poll``.  Any thread.

        QEMU's recommended way to run a function in another thread's loop.
        """
        self._check_open()
        self._bhs.schedule_oneshot(cb, name)

    # ------------------------------------------------------------------
    # Timers
    # ------------------------------------------------------------------

    def timer_new(self, clock_type: ClockType, scale: int, cb: Callable[[], object],
                  name: str | None = None) -> Timer:
        """A new, unarmed timer on ``clock_type`` counting in ``scale`` ns units."""
        self._check_open()
        return self._timers.timer_new(clock_type, scale, cb, name)

    def timer_new_ns(self, clock_type: ClockType, cb: Callable[[], object],
                     name: str | None = None) -> Timer:
        """A timer whose ``mod`` takes absolute nanoseconds.  Any thread."""
        return self.timer_new(clock_type, SCALE_NS, cb, name)

    def timer_new_us(self, clock_type: ClockType, cb: Callable[[], object],
                     name: str | None = None) -> Timer:
        """A timer whose ``mod`` takes absolute microseconds.  Any thread."""
        return self.timer_new(clock_type, SCALE_US, cb, name)

    def timer_new_ms(self, clock_type: ClockType, cb: Callable[[], object],
                     name: str | None = None) -> Timer:
        """A timer whose ``mod`` takes absolute milliseconds.  Any thread."""
        return self.timer_new(clock_type, SCALE_MS, cb, name)

    def clock_now_ns(self, clock_type: ClockType) -> int:
        """Read the context's clock of ``clock_type``.  Any thread."""
        return self._timers.now_ns(clock_type)

    # ------------------------------------------------------------------
    # Busy polling parameters (any thread)
    # ------------------------------------------------------------------

    def set_poll_params(self, max_ns: int, grow: int, shrink: int) -> None:
        """Set ``poll_max_ns``, ``poll_grow`` and ``poll_shrink`` at once.  Any thread.

        ``max_ns == 0`` disables busy polling.  Every handler's window
        restarts from 0, and a sleeping home thread is woken to apply them.
        """
        params = PollParams(max_ns, grow, shrink)
        self._poll_params = params
        self._fds.reset_poll_windows()
        self.notify()

    @property
    def poll_params(self) -> PollParams:
        return self._poll_params

    @property
    def poll_max_ns(self) -> int:
        return self._poll_params.max_ns

    @poll_max_ns.setter
    def poll_max_ns(self, value: int) -> None:
        p = self._poll_params
        self.set_poll_params(value, p.grow, p.shrink)

    @property
    def poll_grow(self) -> int:
        return self._poll_params.grow

    @poll_grow.setter
    def poll_grow(self, value: int) -> None:
        p = self._poll_params
        self.set_poll_params(p.max_ns, value, p.shrink)

    @property
    def poll_shrink(self) -> int:
        return self._poll_params.shrink

    @poll_shrink.setter
    def poll_shrink(self, value: int) -> None:
        p = self._poll_params
        self.set_poll_params(p.max_ns, p.grow, value)

    def set_aio_params(self, max_batch: int) -> None:
        """Set ``aio_max_batch`` (0: the engine's default).  Any thread."""
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 0:
            raise ValueError(f"aio-max-batch must be an integer >= 0, not {max_batch!r}")
        self.aio_max_batch = max_batch
        self.notify()

    # ------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------

    def poll(self, blocking: bool, timeout_ns: int = -1) -> bool:
        """Run one iteration; return whether progress was made.  Home thread only.

        With ``blocking``, sleep until a BH, an fd handler, a timer or a
        ``notify()`` gives it something to do; such a call returns False only
        when woken by ``notify()`` alone, or when ``timeout_ns`` (if >= 0)
        passed first: a bound on the sleep for a caller waiting for something
        with a deadline (an extension: QEMU's ``aio_poll`` has none).  Polls
        may nest: a callback may call ``poll`` again.
        """
        limit_ns = timeout_ns
        ident = threading.get_ident()
        if ident != self._home:
            self._assert_home("AioContext.poll")
        if self._closed:
            self._check_open()
        self._iterations += 1
        running = _running
        outer_ctx = running.get(ident)
        running[ident] = self
        ready: Ready = []
        fds = self._fds
        params = self._poll_params
        try:
            # -- 1. timeout -------------------------------------------------
            # GIL ordering: the BH queue, its flags and the timer heaps are read
            # without their locks (each read is one step).  A read that misses
            # a change made meanwhile is harmless: the notify() that follows
            # each change that could shorten the wait (partners:
            # BottomHalfQueue.enqueue, TimerList.mod_ns) is caught at step 3.
            start_ns = time.monotonic_ns() if params.max_ns else 0
            bhs = self._bhs
            queue = bhs._queue
            if not blocking:
                timeout_ns = 0
            elif queue and queue[0]._flags & _BH_RUNNABLE_MASK == BH_SCHEDULED:
                timeout_ns = 0  # the first queued BH is runnable: no need to look further
            elif queue or bhs._slices or any(self._timer_heaps):
                timeout_ns = self._compute_timeout_ns()
            else:
                timeout_ns = -1  # the common idle case, without a call
            if limit_ns >= 0 and (timeout_ns < 0 or timeout_ns > limit_ns):
                timeout_ns = limit_ns

            # -- 2. busy polling in user space -----------------------------
            progress = False
            polled_all = False
            if fds.poll_list:
                progress, timeout_ns, polled_all = fds.try_poll_mode(ready, timeout_ns, params)

            # -- 3. announce the intent to block ---------------------------
            use_notify_me = timeout_ns != 0
            if use_notify_me:
                # GIL ordering (QEMU's smp_mb after notify_me += 2): notify_me
                # is stored before notified is read.  Partner: notify() (and
                # BottomHalfQueue.enqueue), which stores notified before it
                # reads notify_me: either we see notified here and do not
                # sleep, or it sees notify_me raised and writes the eventfd.
                self._notify_me += 2
                if self._notified:
                    timeout_ns = 0

            # -- 4. wait ---------------------------------------------------
            # With a zero timeout, epoll is skipped when no fd can be missed:
            # the notifier is the only fd (its state is `notified`), or busy
            # polling just checked every handler.  (QEMU skips it whenever no
            # handler lacks io_poll, which can leave an unpolled fd unseen.)
            try:
                if timeout_ns or fds.poll_disable_cnt or (len(fds.nodes) > 1 and not polled_all):
                    if fds.poll_started and fds.set_poll_started(ready, False):
                        timeout_ns = 0
                        progress = True
                    self._waits += 1
                    fds.wait(ready, timeout_ns)
            finally:
                if use_notify_me:  # even if the wait raised: or every notify() writes the eventfd
                    # GIL ordering (QEMU: a store-release): after the wait.  A
                    # notify() that read the raised value a moment ago only
                    # writes the eventfd once too often (drained by _notifier_read).
                    self._notify_me -= 2

            # -- 5. accept the notification --------------------------------
            # GIL ordering (QEMU's smp_mb in aio_notify_accept): notified is
            # cleared before step 6 reads the BH queue.  Partner:
            # BottomHalfQueue.enqueue (queues the BH, then sets notified): a BH
            # queued after step 6's read leaves notified set for the next poll.
            self._notified = False
            block_ns = time.monotonic_ns() - start_ns if params.max_ns else 0

            # -- 6. bottom halves ------------------------------------------
            if (bhs._queue or bhs._slices) and bhs.poll():  # skip the call when idle
                progress = True

            # -- 7. fd handlers --------------------------------------------
            if ready and fds.dispatch(ready, block_ns, params):
                progress = True

            # -- 8. timers -------------------------------------------------
            # Without a call while none can be due: not before the group's
            # quiet_until_ns, unless a timer became the earliest since.
            timers = self._timers
            if any(self._timer_heaps) and (timers.changed or time.monotonic_ns() >= timers.quiet_until_ns) \
                    and timers.run(self.report_exception):
                progress = True
        finally:
            if outer_ctx is None:
                del running[ident]
            else:
                running[ident] = outer_ctx
        return progress

    def until_next_timer_ns(self) -> int:
        """Nanoseconds until the earliest armed timer is due, whatever its
        clock (a fake one too: what a test advances it by to fire it); -1 if
        none.  Home thread."""
        deltas = [d for d in (tl.until_next_ns() for tl in self._timers.lists) if d >= 0]
        return min(deltas) if deltas else -1

    def _compute_timeout_ns(self) -> int:
        """QEMU's aio_compute_timeout: 0 if a BH is runnable, else the timer deadline."""
        bhs = self._bhs
        timeout = bhs.compute_timeout_ns() if bhs._queue or bhs._slices else -1
        if timeout == 0:
            return 0
        timers = self._timers
        quiet_until_ns = timers.quiet_until_ns
        deadline = quiet_until_ns - time.monotonic_ns() if quiet_until_ns and not timers.changed else 0
        if deadline <= 0:  # (nothing known: ask the lists)
            deadline = timers.deadline_ns()
        if deadline < 0:
            return timeout
        return deadline if timeout < 0 or deadline < timeout else timeout  # (soonest_timeout)

    # ------------------------------------------------------------------
    # The context as a glib-style source (QEMU's aio_ctx_prepare/check/dispatch)
    # ------------------------------------------------------------------

    def set_fd_listener(self, listener: Callable[[int, int, str], None] | None) -> None:
        """Call ``listener(fd, events, role)`` for every fd handler now and on
        every change (``events == 0``: removed).  Any thread.

        This is how a main-loop source keeps the fds of this context in its
        own poll set (QEMU's ``g_source_add_poll`` in ``aio_set_fd_handler``).
        ``role`` says what the fd is, for live views.
        """
        self._fds.set_listener(listener)

    def gsource_prepare(self) -> tuple[bool, int]:
        """Before the main loop polls: announce it (``notify_me`` bit 0) and
        return ``(ready, timeout_ns)`` (-1: no timeout).  Home thread."""
        # GIL ordering (QEMU's smp_mb in aio_ctx_prepare): bit 0 is stored
        # before the BHs and timers are read below.  Partner: notify() (and
        # BottomHalfQueue.enqueue): a notify that read notify_me before this
        # store followed an event that the reads below see; one after it
        # writes the eventfd, which the main loop polls.
        self._notify_me |= 1
        if self._fds.poll_started:
            self._fds.set_poll_started([], False)  # no busy polling under a glib-style loop
        bhs = self._bhs
        if not bhs._queue and not bhs._slices and not any(self._timer_heaps):
            return False, -1  # the idle case, without a call
        timeout_ns = self._compute_timeout_ns()
        return timeout_ns == 0, timeout_ns

    def gsource_check(self) -> bool:
        """After the poll: whether to dispatch: one of the context's fds
        polled ready (``gsource_ready_fds`` is not empty), a bottom half is
        scheduled or a timer is due.  Home thread."""
        # GIL ordering (QEMU: a store-release of bit 0, then aio_notify_accept):
        # as poll() steps 3-5, notified is cleared before the BHs are read.
        # Partner: notify() / BottomHalfQueue.enqueue.
        self._notify_me &= ~1
        self._notified = False
        if self.gsource_ready_fds:
            return True
        bhs = self._bhs
        if (bhs._queue or bhs._slices) and bhs.any_scheduled():
            return True
        return any(self._timer_heaps) and self._timers.deadline_ns() == 0

    def gsource_dispatch(self, ready_fds: list[tuple[int, int]]) -> bool:
        """Run BHs, the handlers of ``ready_fds`` (fd, events) and due timers,
        as ``aio_dispatch`` does.  Home thread.  Returns progress."""
        ident = threading.get_ident()
        if ident != self._home:
            self._assert_home("AioContext.gsource_dispatch")
        running = _running
        outer_ctx = running.get(ident)
        running[ident] = self
        try:
            # What the main loop polled is marked on the handlers first: a BH
            # that polls the context (AIO_WAIT_WHILE) dispatches and clears them.
            ready: Ready = []
            if ready_fds:
                nodes = self._fds.nodes
                for fd, ev in ready_fds:
                    node = nodes.get(fd)
                    if node is not None:
                        node.revents |= ev
                        ready.append(node)
            progress = self._bhs.poll()
            if ready:
                if self._fds.dispatch(ready, 0, self._poll_params):
                    progress = True
            if any(self._timer_heaps) and self._timers.run(self.report_exception):
                progress = True
        finally:
            if outer_ctx is None:
                del running[ident]
            else:
                running[ident] = outer_ctx
        return progress

    # ------------------------------------------------------------------
    # Coroutine scheduling (details in _coroutine.py)
    # ------------------------------------------------------------------

    def _co_schedule(self, co: Coroutine[Any]) -> None:
        with self._co_lock:
            self._co_queue.append(co)
        self._co_schedule_bh.schedule()

    def _co_schedule_bh_cb(self) -> None:
        with self._co_lock:
            queue, self._co_queue = self._co_queue, []
        for co in queue:  # FIFO, as QEMU's co_schedule_bh_cb
            co._enter_scheduled(self)

    def spawn(self, coro: Any, name: str | None = None) -> Coroutine[Any]:
        """Run the ``async def`` coroutine object ``coro`` on this context.  Any thread.

        It starts at the next ``poll``; the returned handle can be awaited by
        other coroutines, queried, or given done-callbacks.
        """
        from ._coroutine import Coroutine

        self._check_open()
        co: Coroutine[Any] = Coroutine(coro, name)
        co._ctx = self
        co._mark_scheduled(self)
        self._co_schedule(co)
        return co

    # ------------------------------------------------------------------
    # Thread pool
    # ------------------------------------------------------------------

    @property
    def thread_pool(self) -> ThreadPool:
        """The context's thread pool, created on first use."""
        pool = self._thread_pool
        if pool is None:
            self._check_open()
            from ._threadpool import ThreadPool

            pool = self._thread_pool = ThreadPool(self, self._thread_pool_min, self._thread_pool_max)
        return pool

    def set_thread_pool_params(self, min_threads: int, max_threads: int) -> None:
        """Set ``thread_pool_min`` / ``thread_pool_max`` (QEMU defaults 0 and 64)."""
        for label, value in (("thread-pool-min", min_threads), ("thread-pool-max", max_threads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{label} must be an integer >= 0, not {value!r}")
        if max_threads < 1 or min_threads > max_threads:
            raise ValueError(
                f"need 0 <= thread-pool-min <= thread-pool-max and thread-pool-max >= 1, "
                f"got {min_threads} and {max_threads}"
            )
        self._thread_pool_min = min_threads
        self._thread_pool_max = max_threads
        if self._thread_pool is not None:
            self._thread_pool.update_params(min_threads, max_threads)

    @property
    def thread_pool_min(self) -> int:
        return self._thread_pool_min

    @property
    def thread_pool_max(self) -> int:
        return self._thread_pool_max

    # ------------------------------------------------------------------
    # Introspection and teardown
    # ------------------------------------------------------------------

    @property
    def iterations(self) -> int:
        """How many iterations (``poll`` calls, nested ones included) began so
        far: a number that tells one turn of the loop from the next.  Any thread."""
        return self._iterations

    def stats(self) -> AioContextStats:
        """A snapshot of the context's counters.  Any thread."""
        return AioContextStats(**self.counters())

    def counters(self) -> dict[str, int]:
        """``stats()`` as a plain dict (cheaper: an iothread sends it for
        every query).  Any thread."""
        return {
            "iterations": self._iterations,
            "waits": self._waits,
            "bh_calls": self._bhs.calls,
            "fd_dispatches": self._fds.dispatches,
            "timers_fired": self._timers.fired,
            "busy_poll_runs": self._fds.busy_poll_runs,
            "busy_poll_hits": self._fds.busy_poll_hits,
            "notifier_writes": self._notifier_writes,
            "notifies": self._notifies,
            "handlers": len(self._fds.nodes),
        }

    def describe_handlers(self) -> list[dict[str, object]]:
        """Each registered fd: its callbacks, polling window and dispatch counts."""
        return self._fds.describe()

    def fileno(self) -> int:
        """The epoll fd: readable when any of the context's fds is ready."""
        return self._fds.fdmon.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the context: thread pool workers, fds, clock subscriptions.

        Home thread only; idempotent.  Raises ``BottomHalfLeakError`` naming
        every bottom half that was never deleted (and every oneshot still
        queued), after releasing everything else.
        """
        if self._closed:
            return
        self._assert_home("AioContext.close")
        if self._thread_pool is not None:
            self._thread_pool.close()
            self._thread_pool = None
        self._co_schedule_bh.delete()
        with self._co_lock:
            abandoned, self._co_queue = self._co_queue, []
        for co in abandoned:
            co._abandon()
        leaked = self._bhs.leaked()
        self._closed = True
        self._bhs.free_all()
        self._timers.close()
        self._fds.close()
        self._notifier.close()
        if leaked:
            raise BottomHalfLeakError([bh.name for bh in leaked])

    def __enter__(self) -> AioContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._fds.nodes)} fds"
        return f"<AioContext {self.name!r} {state}>"
