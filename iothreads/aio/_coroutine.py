"""Coroutines on AioContexts, without asyncio (QEMU's ``aio_co_*``).

Theory of operation
-------------------
A ``Coroutine`` drives an ``async def`` coroutine object by hand: ``send`` a
value in, get back what it awaits.  Three things may be awaited:

* a ``Future`` (or anything built on it: a thread-pool request, another
  ``Coroutine``): the coroutine parks until it completes, which any thread may
  do;
* ``reschedule(ctx)``: move to another context (QEMU's
  ``aio_co_reschedule_self``);
* ``sleep_ns(ns)``: a timer of the current context.

A coroutine always runs in the home thread of the context it last ran in.
Waking it (QEMU's ``aio_co_wake`` / ``aio_co_enter``) picks the cheapest safe
way: from another thread or context, *schedule* it, which queues it on the
context and schedules a bottom half that enters the queue in FIFO order; from
inside another coroutine of the same context, *queue* it behind the current
one, to be entered when that one yields ("chained, not nested", so two
coroutines waking each other 25,000 times use no stack); otherwise enter it
at once.  Scheduling a coroutine that is already scheduled is a bug and raises
``CoroutineStateError``, as QEMU aborts.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine as _PyCoroutine, Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from protocol import CoroutineStateError, StateError

from ._context import get_current_aio_context
from ._clock import ClockType

if TYPE_CHECKING:
    from ._context import AioContext

__all__ = [
    "Coroutine",
    "Future",
    "current_coroutine",
    "reschedule",
    "sleep_ns",
]

T = TypeVar("T")
log = logging.getLogger("iothreads.coroutine")

_schedule_lock = threading.Lock()
_tls = threading.local()  # .co: the coroutine running in this thread
_PENDING, _DONE = 0, 1


def _report(exc: Exception, where: str) -> None:
    """To the exception handler of the context running in this thread, or the log."""
    ctx = get_current_aio_context()
    if ctx is not None:
        ctx.report_exception(exc, where)
    else:
        log.error("%s raised %r", where, exc, exc_info=exc)


class Future(Generic[T]):
    """A result that some thread will provide, awaitable by our coroutines.

    ``set_result`` / ``set_exception`` may be called from any thread, once.
    Coroutines waiting on it resume in their own context's home thread.
    """

    __slots__ = ("_state", "_result", "_exception", "_waiters", "_callbacks", "_lock")

    def __init__(self) -> None:
        self._state = _PENDING
        self._result: T | None = None
        self._exception: BaseException | None = None
        self._waiters: list[Coroutine[Any]] = []
        self._callbacks: list[Callable[[Future[T]], object]] = []
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self._state == _DONE

    def result(self) -> T:
        """The value, or raise the exception.  ``StateError`` if not done yet."""
        if self._state != _DONE:
            raise StateError("result is not ready yet")
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[return-value]

    def exception(self) -> BaseException | None:
        if self._state != _DONE:
            raise StateError("result is not ready yet")
        return self._exception

    def set_result(self, value: T) -> None:
        """Complete with ``value``.  Any thread; only once."""
        self._complete(value, None)

    def set_exception(self, exc: BaseException) -> None:
        """Complete with an exception.  Any thread; only once."""
        self._complete(None, exc)

    def add_done_callback(self, fn: Callable[[Future[T]], object]) -> None:
        """Call ``fn(self)`` on completion, in the completing thread (at once
        if already done)."""
        with self._lock:
            if self._state != _DONE:
                self._callbacks.append(fn)
                return
        fn(self)

    def _complete(self, value: T | None, exc: BaseException | None) -> None:
        with self._lock:
            if self._state == _DONE:
                raise StateError("result was already set")
            self._result = value
            self._exception = exc
            self._state = _DONE
            waiters, self._waiters = self._waiters, []
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception as exc:  # one observer's bug must not strand the waiters
                _report(exc, f"done callback {fn!r} of {self!r}")
        for co in waiters:
            co._wake()

    def _add_waiter(self, co: Coroutine[Any]) -> None:
        with self._lock:
            if self._state != _DONE:
                self._waiters.append(co)
                return
        co._wake()

    def __await__(self) -> Generator[Any, None, T]:
        if self._state != _DONE:
            yield self
        return self.result()


class _Reschedule:
    __slots__ = ("ctx",)

    def __init__(self, ctx: AioContext) -> None:
        self.ctx = ctx

    def __await__(self) -> Generator[Any, None, None]:
        yield self


def reschedule(ctx: AioContext) -> Awaitable[None]:
    """``await reschedule(ctx)``: continue the calling coroutine in ``ctx``."""
    return _Reschedule(ctx)


async def sleep_ns(delay_ns: int, clock_type: ClockType = ClockType.REALTIME) -> None:
    """Suspend the calling coroutine for ``delay_ns`` on its context's clock."""
    ctx = get_current_aio_context()
    if ctx is None:
        raise StateError("sleep_ns() must be awaited by a coroutine running on an AioContext")
    fut: Future[None] = Future()
    timer = ctx.timer_new_ns(clock_type, lambda: fut.set_result(None), "sleep_ns")
    timer.mod_ns(ctx.clock_now_ns(clock_type) + max(delay_ns, 0))
    await fut


def current_coroutine() -> Coroutine[Any] | None:
    """The coroutine running in the calling thread, if any."""
    return getattr(_tls, "co", None)


class Coroutine(Future[T]):
    """A running ``async def`` coroutine, bound to an AioContext.

    Created by ``ctx.spawn(coro)``.  It is itself a ``Future`` of the
    coroutine's return value: other coroutines may ``await`` it.
    """

    __slots__ = ("_coro", "name", "_ctx", "_scheduled_in", "_send", "_throw", "_wakeup_queue")

    def __init__(self, coro: _PyCoroutine[Any, Any, T], name: str | None = None) -> None:
        super().__init__()
        if not hasattr(coro, "send") or not hasattr(coro, "throw"):
            raise TypeError(f"spawn() needs a coroutine object (call the async def), not {coro!r}")
        self._coro = coro
        self.name = name or getattr(coro, "__qualname__", "coroutine")
        self._ctx: AioContext | None = None  # the context it last ran in
        self._scheduled_in: str | None = None
        self._send: Any = None
        self._throw: BaseException | None = None
        self._wakeup_queue: list[Coroutine[Any]] = []

    @property
    def context(self) -> AioContext | None:
        return self._ctx

    # -- scheduling -----------------------------------------------------

    def _mark_scheduled(self, ctx: AioContext) -> None:
        with _schedule_lock:
            if self._scheduled_in is not None:
                raise CoroutineStateError(
                    f"coroutine {self.name!r} was already scheduled in {self._scheduled_in!r}"
                )
            self._scheduled_in = ctx.name

    def schedule(self, ctx: AioContext) -> None:
        """Enter the (suspended) coroutine from ``ctx``'s next poll.  Any thread."""
        self._mark_scheduled(ctx)
        ctx._co_schedule(self)

    def _enter_scheduled(self, ctx: AioContext) -> None:
        with _schedule_lock:
            self._scheduled_in = None
        _enter(ctx, self)

    def _wake(self) -> None:
        """QEMU's aio_co_wake: resume where it last ran."""
        ctx = self._ctx
        assert ctx is not None
        if get_current_aio_context() is not ctx:
            self.schedule(ctx)
            return
        current = getattr(_tls, "co", None)
        if current is not None:
            current._wakeup_queue.append(self)
        else:
            _enter(ctx, self)

    def _abandon(self) -> None:
        """The context closed with this coroutine still scheduled."""
        self._coro.close()
        if not self.done():
            self._complete(None, StateError(f"coroutine {self.name!r} abandoned: its context closed"))

    # -- running ---------------------------------------------------------

    def _step(self, ctx: AioContext) -> None:
        self._ctx = ctx
        value, exc = self._send, self._throw
        self._send = self._throw = None
        try:
            if exc is not None:
                awaited = self._coro.throw(exc)
            else:
                awaited = self._coro.send(value)
        except StopIteration as stop:
            self._complete(stop.value, None)
            return
        except Exception as err:
            unobserved = not self._waiters and not self._callbacks
            self._complete(None, err)
            if unobserved:
                ctx.report_exception(err, f"coroutine {self.name!r}")
            return
        except BaseException as err:
            self._complete(None, err)
            raise
        if isinstance(awaited, Future):
            if awaited is self:
                self._throw = CoroutineStateError(f"coroutine {self.name!r} awaited itself")
                self._wake()
            else:
                awaited._add_waiter(self)
        elif isinstance(awaited, _Reschedule):
            target = awaited.ctx
            if target is ctx:
                self._wake()
            else:
                # Schedule from a BH of the old context: scheduling straight
                # away could let the other thread enter us before we are off
                # this thread's stack.
                ctx.bh_schedule_oneshot(lambda: self.schedule(target), "co_reschedule")
        else:
            self._throw = TypeError(
                f"coroutine {self.name!r} awaited {awaited!r}: only iothreads futures, "
                "thread-pool requests, coroutines, reschedule() and sleep_ns() can be awaited"
            )
            self._wake()

    def __repr__(self) -> str:
        state = "done" if self.done() else ("scheduled" if self._scheduled_in else "suspended")
        return f"<Coroutine {self.name!r} {state}>"


def _enter(ctx: AioContext, co: Coroutine[Any]) -> None:
    """Enter ``co`` and then, one after the other, whatever it woke."""
    outer = getattr(_tls, "co", None)
    pending: deque[Coroutine[Any]] = deque([co])
    try:
        while pending:
            current = pending.popleft()
            if current.done():
                continue
            _tls.co = current
            current._step(ctx)
            if current._wakeup_queue:
                pending.extend(current._wakeup_queue)
                current._wakeup_queue.clear()
    finally:
        _tls.co = outer
