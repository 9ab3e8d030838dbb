"""Test helpers, public like ``trio.testing``: a fake clock, an idle-loop
runner, bounded waits for a condition, and a thread running its own AioContext."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from protocol import StateError

from .aio._context import AioContext
from .aio._clock import Clock, ManualClock

__all__ = ["DEFAULT_TIMEOUT_S", "FakeClock", "LoopThread", "poll_until", "run_until_idle", "wait_until"]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0
"""Default bound of ``poll_until`` and ``wait_until``: generous, so that only a
condition that never comes reaches it, even on a loaded machine."""


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


def poll_until(step: Callable[[], object], condition: Callable[[], object], what: str | Callable[[], str],
               timeout_s: float = DEFAULT_TIMEOUT_S, *, max_steps: int | None = None,
               progress: Callable[[], object] | None = None, stall_s: float | None = None) -> int:
    """Call ``step()`` until ``condition()`` is true; fail if it does not come in time.

    ``step`` is one turn of whatever brings the condition about, usually a
    blocking loop iteration: ``lambda: ctx.poll(True)``,
    ``lambda: context.iteration(True)``, ``lambda: loop.main_loop_wait()``.
    The condition is checked before every step, so one that already holds
    costs no step.  Returns the number of steps taken.

    The bounds are assertions, not pacing; each one raises
    ``AssertionError`` naming ``what`` was awaited (a string, or a function
    returning one, called only on failure, to describe the state then):

    * ``timeout_s``: the condition still false that many seconds after the
      call;
    * ``max_steps``: the condition still false after that many steps (a
      loop that must make progress on every step);
    * ``progress`` and ``stall_s`` (together): the value ``progress()``
      returns (a counter, say) has not changed for ``stall_s`` seconds.

    The bounds are checked between steps: a step that blocks for ever is
    not interrupted.  Give it a timeout of its own where nothing else is
    sure to wake it (``lambda: ctx.poll(True, 10_000_000)``, or a timer that
    ticks).  Runs in the caller's thread: the home thread of what ``step``
    iterates.
    """
    if (progress is None) != (stall_s is None):
        raise ValueError("progress and stall_s go together")

    def fail(why: str) -> AssertionError:
        return AssertionError(f"{why} waiting for {what if isinstance(what, str) else what()}")

    now = time.monotonic()
    deadline = now + timeout_s
    last, last_change = (progress() if progress is not None else None), now
    steps = 0
    while not condition():
        now = time.monotonic()
        if now >= deadline:
            raise fail(f"timed out after {timeout_s:g} s")
        if max_steps is not None and steps >= max_steps:
            raise fail(f"still false after {max_steps} steps")
        if progress is not None and stall_s is not None:
            current = progress()
            if current != last:
                last, last_change = current, now
            elif now - last_change >= stall_s:
                raise fail(f"no progress for {stall_s:g} s")
        step()
        steps += 1
    return steps


def wait_until(condition: Callable[[], object], what: str | Callable[[], str],
               timeout_s: float = DEFAULT_TIMEOUT_S, *, interval_s: float = 0.01) -> None:
    """Wait until ``condition()`` is true, checking it every ``interval_s``.

    For a condition that another thread or process brings about, where the
    caller has no loop to iterate and nothing to block on; where it has
    one, ``poll_until`` wakes as soon as the event comes.  Fails like
    ``poll_until`` after ``timeout_s``.  Any thread.
    """
    poll_until(lambda: time.sleep(interval_s), condition, what, timeout_s)


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
