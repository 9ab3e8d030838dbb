"""Test helpers, public like ``trio.testing``: a fake clock, an idle-loop
runner, and a thread running its own AioContext."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from protocol import StateError

from .aio._context import AioContext
from .aio._clock import Clock, ManualClock

__all__ = ["FakeClock", "LoopThread", "run_until_idle"]

T = TypeVar("T")


class FakeClock(ManualClock):
    """A clock that moves only when a test says so.

    Inject it with ``AioContext(clock=FakeClock())``: every clock type of the
    context then reads it, timers fire exactly when ``advance_ns`` makes them
    due (on the next ``poll``), and a context blocked in ``poll`` is woken by
    the advance.  Any thread may advance it.
    """


def run_until_idle(ctx: AioContext, max_iterations: int = 1000) -> int:
    """Call ``ctx.poll(blocking=False)`` until it makes no progress.

    Returns the number of iterations that made progress.  Raises
    ``AssertionError`` if the context is still busy after ``max_iterations``
    (a callback that keeps rescheduling itself, say).
    """
    for i in range(max_iterations):
        if not ctx.poll(False):
            return i
    raise AssertionError(f"{ctx!r} still busy after {max_iterations} iterations")


class LoopThread:
    """A thread running its own AioContext, as QEMU's ``tests/unit/iothread.c``.

    The context is created in the new thread (its home thread) and polled
    with ``while not stopping: ctx.poll(True)``; ``stop()`` schedules a
    oneshot BH that sets ``stopping``, joins the thread, and the thread closes
    the context on its way out (re-raising a ``BottomHalfLeakError`` in
    ``stop()``).  Use as a context manager.
    """

    def __init__(self, name: str = "iothread", clock: Clock | None = None) -> None:
        self.name = name
        self._clock = clock
        self._ready = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._ctx: AioContext | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"LoopThread {name!r} did not start")
        if self._error is not None:
            raise self._error

    @property
    def ctx(self) -> AioContext:
        assert self._ctx is not None
        return self._ctx

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def _run(self) -> None:
        try:
            self._ctx = ctx = AioContext(clock=self._clock, name=self.name)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stopping:
                ctx.poll(True)
        except BaseException as exc:
            self._error = exc
        finally:
            try:
                ctx.close()
            except BaseException as exc:
                self._error = self._error or exc

    def run_sync(self, fn: Callable[[], T], timeout_s: float = 30.0) -> T:
        """Run ``fn()`` in the loop thread and return its result (any other thread)."""
        done = threading.Event()
        box: list[Any] = []

        def call() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:
                box.append((False, exc))
            done.set()

        self.ctx.bh_schedule_oneshot(call)
        if not done.wait(timeout_s):
            raise TimeoutError(f"LoopThread {self.name!r} did not run the call in {timeout_s} s")
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the loop, join the thread, close the context.  Idempotent."""
        if self._thread.is_alive():
            def set_stopping() -> None:
                self._stopping = True

            try:
                self.ctx.bh_schedule_oneshot(set_stopping)
            except StateError:
                pass  # already closed
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"LoopThread {self.name!r} did not stop in {timeout_s} s")
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
