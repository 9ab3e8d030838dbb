"""Test helpers, public like ``trio.testing``: a fake clock and an idle loop runner."""

from __future__ import annotations

from ._aio import AioContext
from ._clock import ManualClock

__all__ = ["FakeClock", "run_until_idle"]


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
