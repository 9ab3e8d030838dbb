"""MainLoop: the main-loop process's loop (QEMU's ``util/main-loop.c``).

Theory of operation
-------------------
A MainContext with QEMU's two AioContexts attached as sources:

``aio_context`` (QEMU's ``qemu_aio_context``)
    Bottom halves from ``run_in_main_loop``, block-layer completions.  Code may
    run a nested ``aio_context.poll(True)`` on it (to wait for something);
``iohandler_context`` (QEMU's ``iohandler_ctx``)
    fd handlers registered with ``set_fd_handler`` (QEMU's
    ``qemu_set_fd_handler``).  It is dispatched only by the top-level loop,
    never by a nested poll of ``aio_context``: that is the firewall that
    keeps, say, a monitor command from running inside a block-layer wait.

plus the main-loop timers (QEMU's ``main_loop_tlg``).

``main_loop_wait`` is the source document's three steps, with the BQL held
throughout except around the one blocking call:

1. fill: ``prepare`` and ``query`` the context; the timeout is the soonest of
   the sources' and the main-loop timers' (0 when not blocking);
2. release the BQL, poll (nanosecond timeout, rounded up to what epoll
   takes), retake the BQL;
3. ``check`` and ``dispatch``; then run the due main-loop timers.

Steps 1 to 3 run as one call into the context (``MainContext._iterate``,
the same code as ``MainContext.iteration``, which shares each step's
implementation with the public ``prepare``/``query``/``wait_fds``/``check``/
``dispatch``), with the BQL handed over as the lock to release around the
epoll wait alone (``call_unlocked``: one call that unlocks, waits and
relocks, keeping the BQL's counters).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from iothreads import AioContext, BottomHalf, ClockSpec, ClockType, Timer, TimerListGroup
from protocol import StateError

from ._bql import BQL
from ..glib._context import MainContext
from ..glib._standard import AioSource

__all__ = ["MainLoop"]

_get_ident = threading.get_ident


class MainLoop:
    """The loop of a main-loop process; see the module docstring.

    Create it, and call ``run()``, in the thread that will run it (the
    AioContexts' home thread).  ``quit()`` and ``run_in_main_loop()`` may be
    called from any thread.
    """

    def __init__(self, *, name: str = "main", clock: ClockSpec = None) -> None:
        self.context = MainContext(name)
        self.aio_context = AioContext(clock, name="qemu_aio_context")
        self.iohandler_context = AioContext(clock, name="iohandler_ctx")
        self.context.attach(AioSource(self.aio_context, "aio-context"))
        self.context.attach(AioSource(self.iohandler_context, "io-handler"))
        self.timers = TimerListGroup(self.notify_event, clock)
        self._notify_bh: BottomHalf = self.aio_context.bh_new(lambda: None, "notify_event")
        self._running = False
        self._home = threading.get_ident()

    # -- any thread -------------------------------------------------------

    def notify_event(self) -> None:
        """Wake the loop to re-evaluate its state (QEMU's ``qemu_notify_event``).  Any thread."""
        self._notify_bh.schedule()

    def quit(self) -> None:
        """Make ``run()`` return after the current iteration.  Any thread."""
        self._running = False
        self.notify_event()

    def run_in_main_loop(self, cb: Callable[[], object], name: str | None = None) -> None:
        """Run ``cb()`` in the main loop, under the BQL: a oneshot bottom half on
        the main AioContext, as QEMU bounces work that needs the BQL.  Any thread."""
        self.aio_context.bh_schedule_oneshot(cb, name)

    def set_fd_handler(self, fd: int, io_read: Callable[[], object] | None = None,
                       io_write: Callable[[], object] | None = None) -> None:
        """QEMU's ``qemu_set_fd_handler``: a handler in the iohandler context.  Any thread."""
        self.iohandler_context.set_fd_handler(fd, io_read, io_write)

    def timer_new_ns(self, clock_type: ClockType, cb: Callable[[], object], name: str | None = None) -> Timer:
        """A main-loop timer (QEMU's ``timer_new_ns``), run at the end of an iteration."""
        return self.timers.timer_new_ns(clock_type, cb, name)

    def timer_new_ms(self, clock_type: ClockType, cb: Callable[[], object], name: str | None = None) -> Timer:
        """A main-loop timer in milliseconds (QEMU's ``timer_new_ms``)."""
        return self.timers.timer_new_ms(clock_type, cb, name)

    # -- the loop (home thread, BQL held) ----------------------------------

    def main_loop_wait(self, nonblocking: bool = False) -> bool:
        """One iteration.  Requires the BQL; returns whether anything ran."""
        me = _get_ident()
        bql = BQL
        if bql._owner != me:
            raise StateError("main_loop_wait() requires the BQL")
        ctx = self.context
        acquired = ctx._owner != me  # run() owns the context for its whole run
        if acquired and not ctx.acquire():
            raise StateError("the main context is owned by another thread")
        timers = self.timers
        try:
            # 1. fill: the main-loop timers bound the sources' timeout;
            # 2. poll with the BQL released;  3. check and dispatch.
            timeout_ns = 0 if nonblocking else (timers.deadline_ns() if any(timers.heaps) else -1)
            ran = ctx._iterate(timeout_ns, bql)
        finally:
            if acquired:
                ctx.release()
        # -- then the main-loop timers -----------------------------------------
        if any(timers.heaps) and timers.run(self.aio_context.report_exception):
            ran = True
        return ran

    def run(self) -> None:
        """Iterate until ``quit()``.  Takes the BQL if the caller does not hold it."""
        if threading.get_ident() != self._home:
            raise StateError("MainLoop.run() must be called in the thread that created the loop")
        took = not BQL.locked()
        if took:
            BQL.lock()
        if not self.context.acquire():
            if took:
                BQL.unlock()
            raise StateError("the main context is owned by another thread")
        self._running = True
        try:
            while self._running:
                self.main_loop_wait(False)
        finally:
            self._running = False
            self.context.release()
            if took:
                BQL.unlock()

    @property
    def running(self) -> bool:
        return self._running

    def close(self) -> None:
        """Destroy the sources and close both AioContexts (raising, as they do,
        if a bottom half was leaked).  Home thread."""
        self._notify_bh.delete()
        self.timers.close()
        self.context.close()
        try:
            self.aio_context.close()
        finally:
            self.iohandler_context.close()

    def __enter__(self) -> MainLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
