"""MainContext: a glib-style main context (``GMainContext``).

Theory of operation
-------------------
One iteration has glib's steps, each a method so that a main loop can put
work between them (QEMU's ``main_loop_wait`` releases the BQL around the
wait for fds):

1. ``prepare()``: walk the sources that take part in every iteration (those
   with a ``prepare`` or ``check`` hook, or a ready time) in priority order;
   collect "ready now" and the smallest timeout.  Once a source is ready, no
   source of a numerically higher priority is asked.
2. ``query(max_priority)``: the timeout and the number of polled fds; clears
   the "fd set changed" flag.
3. ``wait_fds(timeout_ns)``: the only blocking call: epoll, whose interest set is
   kept up to date incrementally as sources add and remove fds, so idle fd
   watches cost nothing per iteration.  Ready fds get ``revents``.
4. ``check(max_priority)``: if the fd set changed since ``query``, dispatch
   nothing (the next iteration re-queries).  Otherwise find the ready
   sources: ready from ``prepare``, by their ``check`` hook, by an auto fd
   (``add_unix_fd``) that polled ready, or by their ready time.  Only the
   highest ready priority is kept.
5. ``dispatch()``: run them; a source whose ``dispatch`` returns False is
   destroyed.

``iteration`` (and ``MainLoop.main_loop_wait``) run the same five steps
through one internal call, ``_iterate``, which skips the per-step ownership
checks; each public step and ``_iterate`` share one implementation of every
step, so the two paths cannot drift apart.

Any thread may attach and destroy sources, add and remove their fds, and
change ready times; each such change from a thread that does not own the
context writes the context's wakeup eventfd, so a blocked ``wait_fds`` notices.
Iterating requires owning the context (``acquire``, recursive, one thread at a
time), as in glib.  The owner reads what other threads change (the watched
sources, the poll records, "fd set changed", a source's destroyed flag)
without the lock, relying on the GIL's ordering of plain loads and stores
(see "Memory ordering" in ``iothreads/aio/_context.py``); each such site says
"GIL ordering" and names its partner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeAlias, TypeVar

from iothreads import EpollMonitor, EventNotifier, timeout_ns_to_seconds
from protocol import StateError

from ._source import (
    IO_ERR,
    IO_HUP,
    IO_IN,
    IO_NVAL,
    IO_OUT,
    IO_PRI,
    PRIORITY_DEFAULT,
    PRIORITY_DEFAULT_IDLE,
    PollFD,
    Source,
)

if TYPE_CHECKING:
    from ._view import MainLoopView

__all__ = ["MainContext"]

log = logging.getLogger("mainloop")

ExceptionHandler: TypeAlias = Callable[["MainContext", Exception, str], None]

A = TypeVar("A")
B = TypeVar("B")
R = TypeVar("R")

MAX_PRIORITY = 2**31 - 1  # glib's G_MAXINT: "no source is ready"
_ALWAYS = IO_ERR | IO_HUP | IO_NVAL
_POLLABLE = IO_IN | IO_PRI | IO_OUT


_perf_counter_ns = time.perf_counter_ns
_get_ident = threading.get_ident


class UnlockedCaller(Protocol):
    """A lock held around an iteration and released around its blocking
    wait: the BQL (``mainloop._bql``)."""

    def call_unlocked(self, fn: Callable[[A, B], R], a: A, b: B) -> R: ...


# A source watched every iteration, with its prepare and check hooks (None:
# the source does not override it).
_Watched: TypeAlias = tuple[Source, Callable[[], tuple[bool, int]] | None, Callable[[], bool] | None]


def _source_order(source: Source) -> tuple[int, int]:
    return source.priority, source.id


class MainContext:
    """A set of sources to poll and dispatch; see the module docstring."""

    def __init__(self, name: str = "main") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._epoll = EpollMonitor()
        self._epoll_poll = self._epoll.poll_seconds
        self._wakeup = EventNotifier()
        self._records: dict[int, list[PollFD]] = {}  # fd -> poll records (copied on write)
        self._sources: dict[int, Source] = {}
        self._next_id = 1
        self._watched: list[_Watched] = []  # sorted (priority, id); copied on write
        self._poll_changed = False
        self._owner = 0
        self._owner_depth = 0
        self._touched: list[PollFD] = []
        self._pending: list[Source] = []
        # The source whose dispatch is running (a callback may iterate the
        # context again: each enclosing one was blocked when that happened in
        # it), and a count of nested iterations: one ends the outer
        # iteration's dispatch list, as it does glib's pending_dispatches.
        self._dispatching: Source | None = None
        self._nestings = 0
        self._timeout_ns = -1
        self._exception_handler: ExceptionHandler | None = None
        self._closed = False
        self.iterations = 0
        self._wakeup_pfd = PollFD(
            self._wakeup.fileno(), IO_IN, None, False, f"wakeup eventfd of MainContext {name!r}"
        )
        self._add_pollfd(self._wakeup_pfd)

    # ------------------------------------------------------------------
    # Ownership and wake-ups
    # ------------------------------------------------------------------

    def acquire(self) -> bool:
        """Become the owner (recursive); False if another thread owns it."""
        me = threading.get_ident()
        with self._lock:
            if self._owner not in (0, me):
                return False
            self._owner = me
            self._owner_depth += 1
        return True

    def release(self) -> None:
        """Undo one ``acquire``."""
        with self._lock:
            if self._owner != threading.get_ident():
                raise StateError(f"MainContext {self.name!r} is not owned by this thread")
            self._owner_depth -= 1
            if not self._owner_depth:
                self._owner = 0

    def is_owner(self) -> bool:
        return self._owner == threading.get_ident()

    def _assert_owner(self, what: str) -> None:
        if self._owner != threading.get_ident():
            raise StateError(f"{what}: acquire MainContext {self.name!r} first")

    def wakeup(self) -> None:
        """Make a ``wait_fds`` in progress return (any thread)."""
        self._wakeup.set()

    def _wake_if_foreign(self) -> None:
        # GIL ordering: the change was made (under the lock) before this
        # eventfd write, and the owner reads sources and poll records only
        # after its wait returns (partner: _check, which drains the wakeup
        # after _wait_fds).  _owner is read without the lock: a thread finds
        # its own ident there only if it stored it itself (acquire), so the
        # test is exact for the calling thread.
        if self._owner != threading.get_ident():
            self._wakeup.set()

    # ------------------------------------------------------------------
    # Sources (any thread)
    # ------------------------------------------------------------------

    def attach(self, source: Source) -> int:
        """Attach ``source``; return its id.  Any thread; wakes the context."""
        with self._lock:
            if self._closed:
                raise StateError(f"MainContext {self.name!r} is closed")
            if source.context is not None or source.destroyed:
                raise StateError(f"source {source.name!r} is already attached or destroyed")
            source.id = self._next_id
            self._next_id += 1
            source.context = self
            self._sources[source.id] = source
            try:
                for pfd in source.pollfds:
                    self._add_pollfd_locked(pfd)
            except BaseException:
                for pfd in source.pollfds:
                    self._remove_pollfd_locked(pfd)
                del self._sources[source.id]
                source.context = None
                raise
            self._update_watched_locked(source)
        source._on_attach()
        self._wake_if_foreign()
        return source.id

    def find_source_by_id(self, source_id: int) -> Source | None:
        return self._sources.get(source_id)

    def source_remove(self, source_id: int) -> bool:
        """Destroy the source with this id; False if there is none."""
        source = self._sources.get(source_id)
        if source is None:
            return False
        source.destroy()
        return True

    def sources(self) -> list[Source]:
        """The attached sources, by priority then id."""
        return sorted(self._sources.values(), key=lambda s: (s.priority, s.id))

    def _destroy(self, source: Source) -> None:
        with self._lock:
            if source._destroyed:
                return
            source._destroyed = True
            self._sources.pop(source.id, None)
            if source._watched:
                self._watched = [w for w in self._watched if w[0] is not source]
                source._watched = False
            for pfd in source.pollfds:
                self._remove_pollfd_locked(pfd)
        self._wake_if_foreign()
        # GIL ordering (a store, then a load, on each side, as around
        # smp_mb): _destroyed is stored above before _dispatching is read
        # here, and _dispatch stores _dispatching before it reads _destroyed
        # (partner).  At least one side sees the other's store, so finalize
        # is never skipped; _claim_finalize keeps it to one call.
        if not self._in_dispatch(source):
            self._finalize(source)
        # else: its dispatch is running (in the loop thread): finalize follows
        # when it returns, as glib's reference held by the dispatch does.

    def _in_dispatch(self, source: Source) -> bool:
        """Whether ``source``'s dispatch is running: the innermost, or one
        suspended in a nested iteration (the chain of enclosing dispatches)."""
        cur = self._dispatching
        while cur is not None:
            if cur is source:
                return True
            cur = cur._outer_dispatch
        return False

    def _finalize(self, source: Source) -> None:
        """``source.finalize()``, exactly once: whichever thread gets there first."""
        if not source._claim_finalize():
            return
        try:
            source.finalize()
        except Exception as exc:
            self.report_exception(exc, f"finalize of source {source.name!r}")

    def _update_watched_locked(self, source: Source) -> None:
        watch = not source._destroyed and not source._blocked and (
            source.has_prepare_or_check or source.ready_time_ns >= 0)
        if watch and not source._watched:
            # The hooks are looked up once, here (glib's GSourceFuncs are fixed too).
            hooks = (source, source.prepare if source._has_prepare else None,
                     source.check if source._has_check else None)
            # Copied on write, for the owner iterates it without the lock (GIL
            # ordering: the new list is whole before its reference is stored;
            # partners: _prepare, _check).
            self._watched = sorted([*self._watched, hooks], key=lambda w: (w[0].priority, w[0].id))
        elif source._watched and not watch:
            self._watched = [w for w in self._watched if w[0] is not source]
        source._watched = watch

    def _ready_time_changed(self, source: Source) -> None:
        with self._lock:
            if source.context is not self:
                return
            self._update_watched_locked(source)
        self._wake_if_foreign()

    # -- the standard sources, glib's way (any thread) ---------------------

    def io_add_watch(self, fd: int, conditions: int, callback: Callable[[int, int], bool],
                     priority: int = PRIORITY_DEFAULT, name: str | None = None) -> int:
        """``callback(fd, condition) -> bool`` when ``fd`` meets ``conditions``
        (``IO_IN | IO_OUT | IO_PRI | IO_HUP | IO_ERR``); return the source id."""
        from ._standard import FdWatchSource

        return self._attach_new(FdWatchSource(fd, conditions, callback, name, priority))

    def timeout_add(self, interval_ms: int, callback: Callable[[], bool],
                    priority: int = PRIORITY_DEFAULT, name: str | None = None) -> int:
        """``callback() -> bool`` every ``interval_ms`` while it returns True."""
        from ._standard import TimeoutSource

        return self._attach_new(TimeoutSource(interval_ms * 1_000_000, callback, name, priority))

    def timeout_add_seconds(self, interval_s: int, callback: Callable[[], bool],
                            priority: int = PRIORITY_DEFAULT, name: str | None = None) -> int:
        """``callback() -> bool`` every ``interval_s`` seconds while it returns True."""
        from ._standard import TimeoutSource

        return self._attach_new(TimeoutSource(interval_s * 1_000_000_000, callback, name, priority))

    def idle_add(self, callback: Callable[[], bool], priority: int = PRIORITY_DEFAULT_IDLE,
                 name: str | None = None) -> int:
        """``callback() -> bool`` whenever nothing of higher priority is ready."""
        from ._standard import IdleSource

        return self._attach_new(IdleSource(callback, name, priority))

    def _attach_new(self, src: Source) -> int:
        """``attach`` a source made for it; if that fails (a closed context), the
        source is finalized: its fds closed, its blocked signals unblocked."""
        try:
            return self.attach(src)
        except BaseException:
            src.destroy()
            raise

    def signal_add(self, signals: list[int], callback: Callable[[int], bool],
                   priority: int = PRIORITY_DEFAULT, name: str | None = None) -> int:
        """``callback(signum) -> bool`` for each of ``signals``, through a signalfd."""
        from ._standard import SignalSource

        return self._attach_new(SignalSource(signals, callback, name, priority))

    def child_watch_add(self, pid: int, callback: Callable[[int, int], object],
                        priority: int = PRIORITY_DEFAULT, name: str | None = None) -> int:
        """``callback(pid, wait_status)`` once child ``pid`` exits (it is reaped)."""
        from ._standard import ChildWatchSource

        return self._attach_new(ChildWatchSource(pid, callback, name, priority))

    # ------------------------------------------------------------------
    # Poll fds (any thread)
    # ------------------------------------------------------------------

    def _add_pollfd(self, pfd: PollFD) -> None:
        with self._lock:
            self._add_pollfd_locked(pfd)
        self._wake_if_foreign()

    def _remove_pollfd(self, pfd: PollFD) -> None:
        with self._lock:
            self._remove_pollfd_locked(pfd)
        self._wake_if_foreign()

    def _mask(self, records: list[PollFD]) -> int:
        mask = 0
        for r in records:
            mask |= r.events
        return mask & _POLLABLE

    def _add_pollfd_locked(self, pfd: PollFD) -> None:
        old = self._records.get(pfd.fd, [])
        new = [*old, pfd]
        old_mask, new_mask = self._mask(old), self._mask(new)
        if not old:
            self._epoll.register(pfd.fd, new_mask)
        elif new_mask != old_mask:
            self._epoll.modify(pfd.fd, new_mask)
        self._records[pfd.fd] = new
        self._poll_changed = True

    def _remove_pollfd_locked(self, pfd: PollFD) -> None:
        old = self._records.get(pfd.fd)
        if not old or pfd not in old:
            return
        new = [r for r in old if r is not pfd]
        if new:
            self._records[pfd.fd] = new
            if self._mask(new) != self._mask(old):
                self._epoll.modify(pfd.fd, self._mask(new))
        else:
            del self._records[pfd.fd]
            self._epoll.unregister(pfd.fd)
        pfd.revents = 0
        self._poll_changed = True

    # ------------------------------------------------------------------
    # One iteration, step by step (owner only)
    # ------------------------------------------------------------------
    # Each public step checks ownership and calls the step's one
    # implementation (``_prepare``, ``_wait_fds``, ``_check``, ``_dispatch``);
    # ``_iterate`` chains the same implementations for ``iteration`` and
    # ``MainLoop.main_loop_wait``, without the per-step checks.

    def prepare(self) -> tuple[bool, int]:
        """Step 1: return ``(any ready, max_priority)`` and compute the timeout."""
        if self._owner != _get_ident():
            self._assert_owner("MainContext.prepare")
        self._pending = []
        if self._dispatching is not None:
            self._block_dispatching()
        max_priority = self._prepare()
        return max_priority != MAX_PRIORITY, max_priority

    def query(self, max_priority: int) -> tuple[int, int]:
        """Step 2: ``(timeout_ns, number of polled fds)``; clears "fd set changed"."""
        if self._owner != _get_ident():
            self._assert_owner("MainContext.query")
        # GIL ordering: cleared without the lock; a writer stores True after
        # changing the poll set (partners: _add_pollfd_locked,
        # _remove_pollfd_locked), so _check sees any change made after this.
        self._poll_changed = False
        return self._timeout_ns, len(self._records)

    def wait_fds(self, timeout_ns: int) -> int:
        """Step 3 (glib's poll step): wait up to ``timeout_ns`` (-1: forever) for
        fds; return how many fds polled ready.  The only blocking call; needs no
        lock held.  (Not to be confused with ``AioContext.poll``, which is a whole
        iteration of an AioContext, QEMU's ``aio_poll``.)"""
        return self._wait_fds(timeout_ns, None)

    def check(self, max_priority: int) -> bool:
        """Step 4: choose the sources to dispatch; return whether there are any."""
        if self._owner != _get_ident():
            self._assert_owner("MainContext.check")
        self._pending = pending = self._check(max_priority)
        return bool(pending)

    def dispatch(self) -> bool:
        """Step 5: dispatch what ``check`` chose; return whether anything ran."""
        if self._owner != _get_ident():
            self._assert_owner("MainContext.dispatch")
        pending, self._pending = self._pending, []
        return self._dispatch(pending)

    def iteration(self, may_block: bool) -> bool:
        """One prepare/query/wait_fds/check/dispatch cycle; True if anything was dispatched."""
        acquired = self._owner != _get_ident()  # already owned: nothing to take
        if acquired and not self.acquire():
            raise StateError(f"MainContext {self.name!r} is owned by another thread")
        try:
            return self._iterate(-1 if may_block else 0, None)
        finally:
            if acquired:
                self.release()

    def _iterate(self, timeout_ns: int, lock: UnlockedCaller | None) -> bool:
        """The five steps in one call, as ``prepare``, ``query``, ``wait_fds``,
        ``check`` and ``dispatch`` do them: the wait lasts at most
        ``timeout_ns`` (-1: no bound of the caller's), less if a source's
        prepare asks for less, and not at all if one is ready.  ``lock`` (the
        BQL), if given, is released around the blocking wait alone.  The
        calling thread must own the context (the caller checks)."""
        self.iterations += 1
        if self._pending:
            self._pending = []  # as prepare(): a check that was never dispatched
        if self._dispatching is not None:  # nested in a callback
            self._block_dispatching()
        if self._watched:
            max_priority = self._prepare()
            if max_priority != MAX_PRIORITY:
                timeout_ns = 0
            else:
                sources_ns = self._timeout_ns
                if sources_ns >= 0 and (timeout_ns < 0 or sources_ns < timeout_ns):
                    timeout_ns = sources_ns
        else:
            max_priority = MAX_PRIORITY  # nothing to prepare: no ready source, no timeout
            self._timeout_ns = -1
        self._poll_changed = False  # query (GIL ordering: as in query())
        self._wait_fds(timeout_ns, lock)
        pending = self._check(max_priority)
        if pending:
            return self._dispatch(pending)
        return False

    def _prepare(self) -> int:
        """Step 1's work: mark the ready watched sources, set ``_timeout_ns``;
        return max_priority (``MAX_PRIORITY``: none is ready)."""
        now_ns = -1  # read the clock only for a source with a ready time
        timeout_ns = -1
        max_priority = MAX_PRIORITY
        # GIL ordering: _watched is read once, without the lock (partner:
        # _update_watched_locked, which replaces it whole).
        for src, prepare, _ in self._watched:
            if src._destroyed:
                continue
            if src.priority > max_priority:
                break  # a source of a higher priority is ready
            if not src._ready:
                if prepare is None:
                    ready, t = False, -1
                else:
                    try:
                        ready, t = prepare()
                    except Exception as exc:
                        self.report_exception(exc, f"prepare of source {src.name!r}")
                        ready, t = False, -1
                if not ready:
                    rt = src.ready_time_ns
                    if rt >= 0:
                        if now_ns < 0:
                            now_ns = time.monotonic_ns()
                        if rt <= now_ns:
                            ready = True
                        elif t < 0 or rt - now_ns < t:
                            t = rt - now_ns
                    if not ready:
                        if t >= 0 and (t < timeout_ns or timeout_ns < 0):
                            timeout_ns = t
                        continue
                src._ready = True
            if max_priority == MAX_PRIORITY:
                max_priority = src.priority
        self._timeout_ns = 0 if max_priority != MAX_PRIORITY else timeout_ns
        return max_priority

    def _wait_fds(self, timeout_ns: int, lock: UnlockedCaller | None) -> int:
        """Step 3's work; ``lock``, if given, is released around the wait."""
        for pfd in self._touched:
            pfd.revents = 0
            if pfd.source is not None:
                pfd.source._fired.clear()
        touched: list[PollFD] = []
        # GIL ordering: the poll records are read without the lock: each dict
        # operation is one step, and each fd's list is replaced, never changed
        # in place (partners: _add_pollfd_locked, _remove_pollfd_locked).
        records = self._records
        timeout_s = 0 if timeout_ns == 0 else -1 if timeout_ns < 0 else timeout_ns_to_seconds(timeout_ns)
        if lock is None:
            events = self._epoll_poll(timeout_s, len(records) or 1)
        else:
            events = lock.call_unlocked(self._epoll_poll, timeout_s, len(records) or 1)
        for fd, ev in events:
            for pfd in records.get(fd, ()):
                revents = ev & (pfd.events | _ALWAYS)
                if revents:
                    pfd.revents = revents
                    touched.append(pfd)
                    if pfd.source is not None:
                        pfd.source._fired.append(pfd)
        self._touched = touched
        return len(events)

    def _check(self, max_priority: int) -> list[Source]:
        """Step 4's work: the sources to dispatch."""
        if self._wakeup_pfd.revents:
            self._wakeup.test_and_clear()
        if self._poll_changed:
            return []  # the fd set changed since query: re-query first
        # Sources that are not watched every iteration (fd watches, signals,
        # child watches) are ready exactly when one of their auto fds fired.
        extra: list[Source] = []
        limit = MAX_PRIORITY  # the best (lowest) priority known to be ready
        for pfd in self._touched:
            src = pfd.source
            if pfd.auto and src is not None and not src._watched and not src._destroyed \
                    and src.priority <= max_priority and src not in extra:
                extra.append(src)
                if src.priority < limit:
                    limit = src.priority
        # The watched sources, in priority order, stop at the first priority
        # worse than one already known to be ready: glib asks no lower source.
        now_ns = -1
        watched_ready: list[Source] = []
        for src, _, check in self._watched:
            if src._destroyed:
                continue
            priority = src.priority
            if priority > limit or watched_ready and priority > max_priority:
                break
            if not src._ready:
                if check is None:
                    ready = False
                else:
                    try:
                        ready = check()
                    except Exception as exc:
                        self.report_exception(exc, f"check of source {src.name!r}")
                        ready = False
                if not ready:
                    if src._fired and any(p.auto for p in src._fired):
                        pass  # an auto fd polled ready
                    elif src.ready_time_ns < 0:
                        continue
                    else:
                        if now_ns < 0:
                            now_ns = time.monotonic_ns()
                        if src.ready_time_ns > now_ns:
                            continue
                src._ready = True
            watched_ready.append(src)
            limit = priority
        # Dispatch every ready source at the best ready priority, in source order.
        if watched_ready:
            pending = [s for s in watched_ready if s.priority == limit]
            if extra:
                pending += [s for s in extra if s.priority == limit]
                pending.sort(key=_source_order)
            return pending
        if len(extra) <= 1:
            return extra
        return sorted((s for s in extra if s.priority == limit), key=_source_order)

    def _dispatch(self, pending: list[Source]) -> bool:
        """Step 5's work: dispatch ``pending``; whether anything ran."""
        # One clock read per dispatch plus one: each dispatch ends where the
        # next one's time starts (re-read after a destroy, whose finalize is
        # no dispatch's).
        t0 = -1
        nestings = self._nestings
        outer = self._dispatching
        for src in pending:
            if self._nestings != nestings:
                break  # a callback iterated the context: that iteration took over the rest
            src._outer_dispatch = outer
            # First, and before src._destroyed is read (GIL ordering; partner:
            # _destroy): a destroy from another thread now leaves finalize to us.
            self._dispatching = src
            if src._destroyed:
                self._dispatching = outer
                if not self._in_dispatch(src):
                    self._finalize(src)  # (a no-op if it was finalized already)
                continue
            src._ready = False
            if t0 < 0:
                t0 = _perf_counter_ns()
            try:
                keep = src.dispatch()
            except Exception as exc:
                self.report_exception(exc, f"dispatch of source {src.name!r}")
                keep = True
            finally:
                self._dispatching = outer
                if src._blocked:
                    self._unblock(src)
                if src._destroyed and not self._in_dispatch(src):  # destroyed during its dispatch: now
                    self._finalize(src)
            t1 = _perf_counter_ns()
            src.dispatch_count += 1
            src.dispatch_ns += t1 - t0
            t0 = t1
            if not keep:
                src.destroy()
                t0 = _perf_counter_ns()
        return t0 >= 0  # the clock was read: something was dispatched

    def _block_dispatching(self) -> None:
        """A nested iteration: the source whose dispatch is running is left
        out of it, its fds out of the poll (glib blocks a source in its
        dispatch unless it may recurse)."""
        self._nestings += 1
        src = self._dispatching
        if src is None or src._blocked or src.can_recurse:
            return
        with self._lock:
            src._blocked = True
            self._update_watched_locked(src)  # out of prepare and check
            for pfd in src.pollfds:
                self._remove_pollfd_locked(pfd)

    def _unblock(self, src: Source) -> None:
        src._blocked = False
        if src._destroyed:
            return
        with self._lock:
            self._update_watched_locked(src)
            for pfd in src.pollfds:
                if pfd not in self._records.get(pfd.fd, ()):
                    self._add_pollfd_locked(pfd)

    def pending(self) -> bool:
        """Whether a source is ready right now (glib's g_main_context_pending)."""
        if not self.acquire():
            return False
        try:
            _, max_priority = self.prepare()
            self.query(max_priority)
            self.wait_fds(0)
            ready = self.check(max_priority)
            for src in self._pending:
                src._ready = True  # keep them ready for the next iteration
            self._pending = []
            return ready
        finally:
            self.release()

    # ------------------------------------------------------------------
    # Errors, introspection, teardown
    # ------------------------------------------------------------------

    def set_exception_handler(self, handler: ExceptionHandler | None) -> None:
        """``handler(context, exc, where)`` for exceptions raised by source hooks;
        ``None`` (the default) logs them on the ``mainloop`` logger."""
        self._exception_handler = handler

    def report_exception(self, exc: Exception, where: str) -> None:
        handler = self._exception_handler
        if handler is None:
            log.error("MainContext %s: %s raised %r", self.name, where, exc, exc_info=exc)
        else:
            handler(self, exc, where)

    def pollfds(self) -> list[PollFD]:
        """Every polled fd record, by fd."""
        records = self._records
        return [pfd for fd in sorted(records) for pfd in records[fd]]

    def describe(self) -> MainLoopView:
        """A snapshot of the sources and polled fds (the live view)."""
        from ._view import MainLoopView

        return MainLoopView.of(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Destroy every source and release the fds.  Idempotent."""
        if self._closed:
            return
        for src in self.sources():
            src.destroy()
        with self._lock:
            self._closed = True
            self._records.clear()
        self._epoll.close()
        self._wakeup.close()

    def __enter__(self) -> MainContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MainContext {self.name!r} {len(self._sources)} sources, {len(self._records)} fds>"

