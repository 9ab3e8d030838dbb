"""The thread pool of an AioContext (QEMU's ``util/thread-pool.c``).

Theory of operation
-------------------
Blocking work (a ``preadv``, an ``fdatasync``) must not run in the loop, so a
context hands it to worker threads and gets the completion back as a bottom
half.  The flow of one request:

1. ``submit(fn, *args, callback=cb)`` in the home thread: the request goes to
   the tail of a FIFO queue; a worker is started if none is idle and there
   are fewer than ``max_threads``.
2. A worker pops it (state QUEUED -> ACTIVE), runs ``fn(*args)`` without any
   lock held, stores the value or the exception (ACTIVE -> DONE), and
   schedules the pool's completion BH, which notifies the context.
3. The completion BH, in the home thread, walks the submitted requests in
   order and, for each DONE one, completes it: its callback runs, and any
   coroutine awaiting it resumes.  The BH re-schedules itself before each
   callback so that a callback that polls the context (waiting for a sibling
   request) still sees the others complete.

``cancel()`` succeeds only while the request is still QUEUED: it leaves the
queue, is marked DONE with ``OSError(ECANCELED)`` and completes through the
same BH, so every request's callback runs exactly once, cancelled or not.

Workers above ``min_threads`` exit after 10 s without work.  ``close()`` (from
``AioContext.close``) stops and joins every worker, so no thread outlives its
context.
"""

from __future__ import annotations

import enum
import errno
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from protocol import StateError

from ._bh import callable_name
from ._coroutine import Future

if TYPE_CHECKING:
    from ._context import AioContext

__all__ = ["RequestState", "ThreadPool", "ThreadPoolRequest"]

T = TypeVar("T")

IDLE_TIMEOUT_S = 10.0
_JOIN_TIMEOUT_S = 30.0


class RequestState(enum.Enum):
    QUEUED = "queued"
    ACTIVE = "active"
    DONE = "done"


class ThreadPoolRequest(Future[T]):
    """One unit of work submitted to a thread pool.

    A ``Future``: ``result()`` returns what ``fn`` returned or raises what it
    raised (``OSError(ECANCELED)`` after a successful ``cancel``), and our
    coroutines can ``await`` it.  The result is available once the completion
    has run in the home thread (``done()``).
    """

    __slots__ = ("fn", "args", "callback", "state", "_value", "_error", "_pool")

    def __init__(self, pool: ThreadPool, fn: Callable[..., T], args: tuple[Any, ...],
                 callback: Callable[[ThreadPoolRequest[T]], object] | None) -> None:
        super().__init__()
        self._pool = pool
        self.fn = fn
        self.args = args
        self.callback = callback
        self.state = RequestState.QUEUED
        self._value: T | None = None
        self._error: BaseException | None = None

    def cancel(self) -> bool:
        """Cancel if still queued; return whether it was.  Home thread only.

        A cancelled request still completes (with ``OSError(ECANCELED)``) and
        its callback still runs, once.
        """
        return self._pool._cancel(self)

    @property
    def cancelled(self) -> bool:
        err = self._error
        return isinstance(err, OSError) and err.errno == errno.ECANCELED and self.state is RequestState.DONE

    def __repr__(self) -> str:
        return f"<ThreadPoolRequest {callable_name(self.fn)} {self.state.value}>"


class ThreadPool:
    """Worker threads for one AioContext.  Obtain it as ``ctx.thread_pool``."""

    def __init__(self, ctx: AioContext, min_threads: int, max_threads: int) -> None:
        self._ctx = ctx
        self._lock = threading.Lock()
        self._request_cond = threading.Condition(self._lock)
        self._queue: deque[ThreadPoolRequest[Any]] = deque()
        self._finished: deque[ThreadPoolRequest[Any]] = deque()  # DONE, to complete
        self._in_flight = 0  # submitted and not yet completed (home thread)
        self._min = min_threads
        self._max = max_threads
        self._cur_threads = 0
        self._idle_threads = 0
        self._threads: set[threading.Thread] = set()
        self._closing = False
        self._completion_bh = ctx.bh_new(self._completion_bh_cb, "thread_pool_completion")
        self._spawned_total = 0
        self._completed_total = 0
        with self._lock:
            self._spawn_to_min()

    # -- home thread ----------------------------------------------------

    def submit(self, fn: Callable[..., T], *args: Any,
               callback: Callable[[ThreadPoolRequest[T]], object] | None = None) -> ThreadPoolRequest[T]:
        """Run ``fn(*args)`` in a worker.  Home thread only.

        ``callback(request)`` runs in the home thread once the request is
        done (or cancelled).
        """
        ctx = self._ctx
        if not ctx.in_home_thread:
            ctx._assert_home("ThreadPool.submit")
        if self._closing:
            raise StateError(f"the thread pool of AioContext {ctx.name!r} is closed")
        req: ThreadPoolRequest[T] = ThreadPoolRequest(self, fn, args, callback)
        self._in_flight += 1
        with self._lock:
            if self._idle_threads == 0 and self._cur_threads < self._max:
                self._spawn_locked()
            self._queue.append(req)
            self._request_cond.notify()
        return req

    def _cancel(self, req: ThreadPoolRequest[Any]) -> bool:
        self._ctx._assert_home("ThreadPoolRequest.cancel")
        with self._lock:
            # A request leaves QUEUED only under this lock (_worker), so the
            # check is exact; the worker's later store of DONE, outside the
            # lock, is one plain store (GIL) that never makes it QUEUED again.
            if req.state is not RequestState.QUEUED:
                return False
            self._queue.remove(req)
            req._error = OSError(errno.ECANCELED, os.strerror(errno.ECANCELED))
            req.state = RequestState.DONE
            self._finished.append(req)
        self._completion_bh.schedule()
        return True

    def _completion_bh_cb(self) -> None:
        finished = self._finished
        while finished:
            # GIL ordering (QEMU's smp_rmb in the completion BH): the request
            # is taken from _finished (popleft is one step) before its result
            # is read.  Partner: _worker, which stores the result and the DONE
            # state before it appends the request.
            req = finished.popleft()
            self._in_flight -= 1
            self._completed_total += 1
            # In case the callback polls the context waiting for another
            # request that completed at the same time.
            self._completion_bh.schedule()
            req._complete(req._value, req._error)
            if req.callback is not None:
                try:
                    req.callback(req)
                except Exception as exc:
                    self._ctx.report_exception(exc, f"thread-pool callback {callable_name(req.callback)}")
            self._completion_bh.cancel()

    def update_params(self, min_threads: int, max_threads: int) -> None:
        """Apply new limits: start workers up to the minimum, let extra ones exit."""
        with self._lock:
            self._min = min_threads
            self._max = max_threads
            self._spawn_to_min()
            for _ in range(max(self._cur_threads - max_threads, 0)):
                self._request_cond.notify()

    @property
    def threads(self) -> int:
        """Worker threads now (``stats()["threads"]`` without the rest).  Any thread."""
        return self._cur_threads  # GIL: one plain read, a snapshot (written under the lock)

    def stats(self) -> dict[str, int]:
        """Thread and request counts.  Any thread."""
        with self._lock:
            return {
                "threads": self._cur_threads,
                "idle_threads": self._idle_threads,
                "queued": len(self._queue),
                "in_flight": self._in_flight,
                "min_threads": self._min,
                "max_threads": self._max,
                "spawned_total": self._spawned_total,
                "completed_total": self._completed_total,
            }

    def close(self) -> None:
        """Stop and join every worker.  Home thread.

        Requests still queued are cancelled; their completions (callbacks
        included) do not run, as the context is going away.
        """
        with self._lock:
            self._closing = True
            self._max = 0
            self._queue.clear()
            self._request_cond.notify_all()
            threads = list(self._threads)
        for t in threads:
            t.join(_JOIN_TIMEOUT_S)
        self._completion_bh.delete()

    # -- workers --------------------------------------------------------

    def _spawn_to_min(self) -> None:
        while self._cur_threads < self._min:
            self._spawn_locked()

    def _spawn_locked(self) -> None:
        self._cur_threads += 1
        self._spawned_total += 1
        t = threading.Thread(target=self._worker, name=f"{self._ctx.name}-worker", daemon=True)
        self._threads.add(t)
        t.start()

    def _worker(self) -> None:
        lock = self._lock
        cond = self._request_cond
        queue = self._queue
        me = threading.current_thread()
        lock.acquire()
        try:
            while self._cur_threads <= self._max:
                if not queue:
                    self._idle_threads += 1
                    woken = cond.wait(IDLE_TIMEOUT_S)
                    self._idle_threads -= 1
                    if not woken and not queue and self._cur_threads > self._min:
                        break
                    continue
                req = queue.popleft()
                req.state = RequestState.ACTIVE
                lock.release()
                try:
                    req._value = req.fn(*req.args)
                except BaseException as exc:  # delivered to the submitter
                    req._error = exc
                # GIL ordering (QEMU's smp_wmb between ret and state = DONE):
                # the result, then DONE, are stored before the request is
                # published in _finished (append is one step) and before the
                # BH is scheduled.  Partner: _completion_bh_cb, which pops it
                # and only then reads the result.
                req.state = RequestState.DONE
                self._finished.append(req)
                try:
                    self._completion_bh.schedule()
                except StateError:
                    pass  # the pool was closed while fn ran past the join timeout
                lock.acquire()
        finally:
            self._cur_threads -= 1
            self._threads.discard(me)
            cond.notify()  # pass on a wake-up this thread may have taken
            lock.release()
