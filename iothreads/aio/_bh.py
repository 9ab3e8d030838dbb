"""Bottom halves (QEMU's ``QEMUBH``, ``util/async.c``).

Theory of operation
-------------------
A bottom half is a callback that a context runs "soon", in its home thread.
Anyone may schedule one from any thread; scheduling is cheap and never runs
the callback directly.

State lives in flag bits, changed under the queue's lock (QEMU uses atomic
fetch-or / fetch-and; a short lock is the Python equivalent).  The home
thread also reads the flags and the queue without the lock, relying on the
GIL's ordering of plain loads and stores (see "Memory ordering" in
``_context.py``); each such site says so and names its partner:

``PENDING``    the BH sits in the queue, waiting for the next ``poll``
``SCHEDULED``  its callback should run when dequeued
``DELETED``    free it when dequeued, without running it
``ONESHOT``    free it after running it once
``IDLE``       scheduled "when idle": runs, but is not progress, and lets a
               blocking poll sleep up to 10 ms
``FREED``      gone; using it again is an error (QEMU: use after free)

Enqueueing sets ``PENDING`` plus the new bits and appends the BH to the queue
only if it was not already pending, so scheduling twice before it runs runs it
once.  Every enqueue notifies the context (``ctx.notify()``), which wakes a
blocked poll only when one may be sleeping (see ``_context.py``).

``poll`` carves off everything enqueued so far into a *slice* and runs it.  A
BH scheduled while a slice runs, including from its own callback, lands in the
queue, not in the slice: it waits for the next ``poll``.  Slices are chained,
so a callback that itself calls ``ctx.poll()`` (nesting) first finishes the
outer slices: every BH scheduled before the outer call still runs once.  Within
a slice the order is FIFO; QEMU promises no order at all, so do not rely on it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from protocol import StateError

if TYPE_CHECKING:
    from ._context import AioContext

__all__ = ["BottomHalf", "BottomHalfQueue"]

BH_PENDING = 1 << 0
BH_SCHEDULED = 1 << 1
BH_DELETED = 1 << 2
BH_ONESHOT = 1 << 3
BH_IDLE = 1 << 4
BH_FREED = 1 << 5

# An idle BH lets a blocking poll sleep at most this long (QEMU: 10 ms).
IDLE_BH_TIMEOUT_NS = 10_000_000

_RUNNABLE = BH_SCHEDULED | BH_DELETED
_CLEAR_ON_DEQUEUE = ~(BH_PENDING | BH_SCHEDULED | BH_IDLE)


def callable_name(cb: object) -> str:
    """A readable name for a callback: QEMU stringifies the C function name."""
    name = getattr(cb, "__qualname__", None) or getattr(cb, "__name__", None)
    return name if isinstance(name, str) else repr(cb)


def _freed() -> None:
    """The callback of a freed BH (never run)."""


class BottomHalf:
    """A callback run by its context's home thread when scheduled.

    Create with ``ctx.bh_new(cb, name=None)``; delete with ``delete()`` when
    done (a context refuses to close over a live BH).  ``schedule``,
    ``schedule_idle`` and ``delete`` are safe from any thread; ``cancel`` is
    race-free only in the home thread (as in QEMU).
    """

    __slots__ = ("_queue", "name", "_cb", "_flags", "__weakref__")

    def __init__(self, queue: BottomHalfQueue, cb: Callable[[], object], name: str) -> None:
        self._queue = queue
        self.name = name
        self._cb = cb
        self._flags = 0

    @property
    def context(self) -> AioContext:
        return self._queue.ctx

    @property
    def scheduled(self) -> bool:
        """Whether the callback will run at the next ``poll``."""
        # GIL ordering: one plain read of the flags, a snapshot (partner:
        # BottomHalfQueue.enqueue and .poll, which change them under the lock).
        return self._flags & (BH_SCHEDULED | BH_DELETED) == BH_SCHEDULED

    @property
    def deleted(self) -> bool:
        return bool(self._flags & (BH_DELETED | BH_FREED))

    def schedule(self) -> None:
        """Run the callback at the next ``poll`` of the context.  Any thread."""
        self._queue.enqueue(self, BH_SCHEDULED)

    def schedule_idle(self) -> None:
        """Like ``schedule``, but the run is not progress and a blocking poll
        may wait up to 10 ms for it.  Any thread."""
        self._queue.enqueue(self, BH_SCHEDULED | BH_IDLE)

    def cancel(self) -> None:
        """Unschedule: the callback will not run (until scheduled again)."""
        with self._queue.lock:
            self._flags &= ~BH_SCHEDULED

    def delete(self) -> None:
        """Free the BH at the next ``poll`` without running it.  Any thread.

        Deleting an already deleted BH does nothing.
        """
        # GIL ordering: a lock-free read for the common repeat; one that
        # misses a concurrent delete only enqueues again, and enqueue decides
        # under the lock (partner: BottomHalfQueue.enqueue).
        if self._flags & (BH_DELETED | BH_FREED):
            return
        self._queue.enqueue(self, BH_DELETED)

    def __repr__(self) -> str:
        bits = [n for b, n in ((BH_SCHEDULED, "scheduled"), (BH_IDLE, "idle"),
                               (BH_ONESHOT, "oneshot"), (BH_DELETED, "deleted"),
                               (BH_FREED, "freed")) if self._flags & b]
        return f"<BottomHalf {self.name!r} {' '.join(bits) or 'idle'}>"


class BottomHalfQueue:
    """The bottom halves of one context: the queue, the slices, the registry."""

    def __init__(self, ctx: AioContext) -> None:
        self.ctx = ctx
        self.lock = threading.Lock()
        self._queue: list[BottomHalf] = []
        self._slices: deque[list[BottomHalf]] = deque()  # each reversed: FIFO by pop()
        self._live: dict[int, BottomHalf] = {}  # bh_new'd and not yet freed
        self.calls = 0  # callbacks run, for the context's counters

    # -- creation -------------------------------------------------------

    def new(self, cb: Callable[[], object], name: str | None) -> BottomHalf:
        bh = BottomHalf(self, cb, name or callable_name(cb))
        with self.lock:
            self._live[id(bh)] = bh
        return bh

    def schedule_oneshot(self, cb: Callable[[], object], name: str | None) -> None:
        bh = BottomHalf(self, cb, name or callable_name(cb))
        self.enqueue(bh, BH_SCHEDULED | BH_ONESHOT)

    # -- any thread ------------------------------------------------------

    def enqueue(self, bh: BottomHalf, new_flags: int) -> None:
        lock = self.lock
        lock.acquire()
        old = bh._flags
        if not old & (BH_PENDING | BH_FREED):
            bh._flags = old | BH_PENDING | new_flags
            self._queue.append(bh)
        elif old & BH_FREED:
            lock.release()
            raise StateError(f"bottom half {bh.name!r} was already deleted")
        else:
            bh._flags = old | new_flags
        lock.release()
        # ctx.notify(), inlined: this is the hottest path of the loop.
        # GIL ordering (QEMU's smp_wmb, then smp_mb, in aio_notify): the BH is
        # queued (published by the lock's release) before ``notified`` is
        # stored, and ``notified`` is stored before ``notify_me`` is read.
        # Partners: AioContext.poll step 3 (stores notify_me, then reads
        # notified) and step 5 (clears notified, then BottomHalfQueue.poll
        # takes the queue); AioContext.gsource_prepare / gsource_check.
        ctx = self.ctx
        ctx._notifies += 1
        ctx._notified = True
        if ctx._notify_me:
            ctx._notifier_writes += 1
            ctx._notifier.set()

    # -- home thread -------------------------------------------------------

    def compute_timeout_ns(self) -> int:
        """0 if a BH is runnable, 10 ms if only idle ones are, else -1."""
        # GIL ordering: the queue and the flags are read without the lock, as
        # in any_scheduled.  A BH enqueued meanwhile is not missed: its
        # enqueue notifies after queueing it (partner: enqueue; the notify is
        # caught at AioContext.poll step 3 or by gsource_check).
        if not self._queue and not self._slices:
            return -1
        timeout = -1
        for bh in self._queue:
            flags = bh._flags
            if flags & _RUNNABLE == BH_SCHEDULED:
                if not flags & BH_IDLE:
                    return 0
                timeout = IDLE_BH_TIMEOUT_NS
        for chunk in self._slices:
            for bh in chunk:
                flags = bh._flags
                if flags & _RUNNABLE == BH_SCHEDULED:
                    if not flags & BH_IDLE:
                        return 0
                    timeout = IDLE_BH_TIMEOUT_NS
        return timeout

    def any_scheduled(self) -> bool:
        """Whether any BH, idle ones included, is scheduled (GSource check)."""
        # GIL ordering: lock-free reads, as in compute_timeout_ns (partner: enqueue).
        if not self._queue and not self._slices:
            return False
        return any(
            bh._flags & _RUNNABLE == BH_SCHEDULED
            for chunk in (self._queue, *self._slices)
            for bh in chunk
        )

    def poll(self) -> bool:
        """Run the BHs enqueued so far.  Home thread only.  Returns progress."""
        lock = self.lock
        slices = self._slices
        lock.acquire()
        carved = self._queue
        if carved:
            self._queue = []
        lock.release()
        if carved:
            carved.reverse()  # a slice is consumed from its end: pop() is cheap
            slices.append(carved)
        elif not slices:
            return False

        progress = False
        calls = 0
        try:
            while slices:
                chunk = slices[0]
                if not chunk:
                    slices.popleft()
                    continue
                bh = chunk.pop()
                lock.acquire()
                flags = bh._flags
                bh._flags = flags & _CLEAR_ON_DEQUEUE
                lock.release()
                if flags & _RUNNABLE == BH_SCHEDULED:
                    if not flags & BH_IDLE:
                        progress = True
                    calls += 1
                    try:
                        bh._cb()
                    except Exception as exc:  # reported; the loop goes on
                        self.ctx.report_exception(exc, f"bottom half {bh.name!r}")
                    if flags & BH_ONESHOT:
                        bh._flags = BH_FREED  # private: nobody else holds it
                elif flags & (BH_DELETED | BH_ONESHOT):
                    self._free(bh)
        finally:
            self.calls += calls
        return progress

    def _free(self, bh: BottomHalf) -> None:
        with self.lock:
            bh._flags |= BH_FREED
            self._live.pop(id(bh), None)
        # A freed BH holds nothing: an owner that keeps it (and that its
        # callback refers to) is then freed by reference counting, not left to
        # the cyclic collector with whatever buffers it holds.
        bh._cb = _freed

    def leaked(self) -> list[BottomHalf]:
        """BHs never deleted, and oneshots still queued: what close refuses."""
        with self.lock:
            queued = [bh for chunk in (self._queue, *self._slices) for bh in chunk]
            live = list(self._live.values())
        found = {id(bh): bh for bh in live if not bh._flags & (BH_DELETED | BH_FREED)}
        for bh in queued:
            if not bh._flags & (BH_DELETED | BH_FREED):
                found[id(bh)] = bh
        return list(found.values())

    def free_all(self) -> None:
        """Forget every BH (after the leak check at close)."""
        with self.lock:
            for bh in [*self._queue, *(b for c in self._slices for b in c), *self._live.values()]:
                bh._flags = BH_FREED
            self._queue = []
            self._slices.clear()
            self._live.clear()
