"""An AioContext driven by a running asyncio event loop: ``AsyncioSource``.

Theory of operation
-------------------
This is what ``mainloop.AioSource`` does for a glib-style MainContext (and
QEMU's AioContext GSource for glib's), for asyncio: the context does not
block in its own epoll; the asyncio loop's selector watches its fds, and one
*turn* of the context runs as a callback of the loop.

* **Fds.**  Every fd handler of the context is an asyncio reader or writer
  (``loop.add_reader``/``add_writer``), kept in step through the context's
  fd listener.  Handlers change from any thread: a change made outside the
  loop's thread reaches the loop through ``call_soon_threadsafe``.  The
  context's own notifier (its eventfd) is one of them.
* **Sleeping.**  After each turn, ``gsource_prepare`` sets bit 0 of the
  context's ``notify_me`` and gives the time to the next timer: from then
  on, a bottom half scheduled or a timer moved from any thread (or from an
  asyncio task of this thread) writes the eventfd, which wakes the loop.
  A deadline becomes a ``loop.call_later``.  This is the wake-up a bare
  ``loop.add_reader(ctx.notifier)`` misses: without ``notify_me`` raised,
  ``notify()`` only marks the context and writes nothing.
* **A turn** (``_turn``, scheduled once however many fds fired):
  ``gsource_check`` (bit 0 cleared, the notification accepted), then, if
  anything is ready, ``gsource_dispatch``: bottom halves, the handlers of
  the fds that fired, due timers, as ``aio_dispatch`` runs them; then the
  next ``prepare``.  Busy polling never happens in this mode.

One source per context at a time (the context keeps the fds that fired in
``gsource_ready_fds``, one list), and not together with a ``MainContext``'s
``AioSource``.  The loop must run in the context's home thread: callbacks
run there, as in any other mode.  The context may still be polled directly
(``ctx.poll``, ``AIO_WAIT_WHILE``) from a callback.
"""

from __future__ import annotations

import asyncio
import threading
import weakref

from protocol import StateError, ThreadContractError

from ._context import AioContext
from ._fdmon import EVENT_IN, EVENT_OUT, EVENT_READ_MASK, EVENT_WRITE_MASK

__all__ = ["AsyncioSource", "asyncio_source_of"]

_SOURCES: weakref.WeakKeyDictionary[AioContext, AsyncioSource] = weakref.WeakKeyDictionary()


def asyncio_source_of(ctx: AioContext) -> AsyncioSource | None:
    """The ``AsyncioSource`` driving ``ctx`` now, if any."""
    return _SOURCES.get(ctx)


class AsyncioSource:
    """Drive ``ctx`` from the running asyncio ``loop`` until ``close()``.

    Create it in the context's home thread, the loop's thread (by default
    the loop running there now).  Also a context manager.  Home thread only,
    but for the context's own calls from other threads (bottom halves,
    timers, fd handlers changed), which wake the loop.
    """

    def __init__(self, ctx: AioContext, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not ctx.in_home_thread:
            raise ThreadContractError(f"an AsyncioSource for AioContext {ctx.name!r} must be made in its home "
                                      "thread, where the asyncio loop runs")
        if ctx in _SOURCES:
            raise StateError(f"AioContext {ctx.name!r} is driven by an asyncio loop already")
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise StateError(f"an AsyncioSource for AioContext {ctx.name!r} needs an asyncio loop: make it "
                                 "while the loop runs (in a coroutine or callback of it), or pass loop=") from None
        self.ctx = ctx
        self.loop = loop
        self.turns = 0  # how many times the context was dispatched: a statistic
        self._thread = threading.get_ident()
        self._ready = ctx.gsource_ready_fds  # (the context's list, which its check reads)
        self._ready.clear()
        self._watched: dict[int, int] = {}  # fd -> the events the loop watches
        self._turn_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        _SOURCES[ctx] = self
        ctx.set_fd_listener(self._fd_changed)
        self._prepare()

    # -- fds -------------------------------------------------------------------

    def _fd_changed(self, fd: int, events: int, role: str) -> None:
        """The context's fd listener.  Any thread."""
        if threading.get_ident() == self._thread:
            self._watch(fd, events)
        else:
            try:
                self.loop.call_soon_threadsafe(self._watch, fd, events)
            except RuntimeError:  # the loop is closed: nothing to watch with any more
                pass

    def _watch(self, fd: int, events: int) -> None:
        if self._closed:
            return
        old = self._watched.pop(fd, 0)
        if old & EVENT_READ_MASK:
            self.loop.remove_reader(fd)
        if old & EVENT_WRITE_MASK:
            self.loop.remove_writer(fd)
        if events:
            self._watched[fd] = events
            if events & EVENT_READ_MASK:
                self.loop.add_reader(fd, self._fired, fd, EVENT_IN)
            if events & EVENT_WRITE_MASK:
                self.loop.add_writer(fd, self._fired, fd, EVENT_OUT)

    def _fired(self, fd: int, events: int) -> None:
        self._ready.append((fd, events))
        self._schedule_turn()

    # -- turns -----------------------------------------------------------------

    def _schedule_turn(self) -> None:
        if not self._turn_scheduled and not self._closed:
            self._turn_scheduled = True
            self.loop.call_soon(self._turn)

    def _turn(self) -> None:
        self._turn_scheduled = False
        if self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ctx = self.ctx
        try:
            if ctx.gsource_check():
                self.turns += 1
                # (merged per fd: a reader and a writer of one fd fired in the same turn)
                merged: dict[int, int] = {}
                for fd, events in self._ready:
                    merged[fd] = merged.get(fd, 0) | events
                self._ready.clear()
                ctx.gsource_dispatch(list(merged.items()))
        finally:
            self._ready.clear()
            if not self._closed:
                self._prepare()

    def _prepare(self) -> None:
        ready, timeout_ns = self.ctx.gsource_prepare()
        if ready:
            self._schedule_turn()
        elif timeout_ns >= 0:
            self._timer = self.loop.call_later(timeout_ns / 1e9, self._turn)

    # -- the end ---------------------------------------------------------------

    def close(self) -> None:
        """Stop driving the context (it can then be polled again, or driven
        by another loop).  Home thread; once is enough."""
        if self._closed:
            return
        if threading.get_ident() != self._thread:
            raise ThreadContractError("AsyncioSource.close must be called from the home thread of its AioContext")
        self._closed = True
        self.ctx.set_fd_listener(None)
        if not self.loop.is_closed():
            for fd, events in self._watched.items():
                if events & EVENT_READ_MASK:
                    self.loop.remove_reader(fd)
                if events & EVENT_WRITE_MASK:
                    self.loop.remove_writer(fd)
        self._watched.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ctx.gsource_check()  # notify_me's bit 0 down: the context's own poll() announces itself
        self._ready.clear()
        if _SOURCES.get(self.ctx) is self:
            del _SOURCES[self.ctx]

    def __enter__(self) -> AsyncioSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
