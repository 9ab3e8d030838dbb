"""The fd handlers of an AioContext: registration, dispatch and busy polling.

Theory of operation
-------------------
Each registered fd has one live ``Handler`` node (QEMU's AioHandler).  A
change never mutates a node: ``set`` builds a new one and marks the old one
``deleted``, so a dispatch walking a ready list that still holds the old node
skips it.  That is what lets a handler add or remove any handler, its own
included, while it is being dispatched.  ``set`` may be called from any
thread; a short lock keeps the table and epoll in step.

Busy polling (QEMU's poll mode): a handler with ``io_poll`` joins the *poll
list* the first time it is dispatched ("activity is likely to continue").
Before blocking, when busy polling is enabled and no handler lacks ``io_poll``,
the loop calls every ``io_poll`` in the list until one reports work or the
largest window (``Handler.poll_ns``, adapted after each dispatch by the rule
in ``_polling.py``) runs out.  A handler found ready this way is dispatched
through ``io_poll_ready`` without any syscall.  Leaving poll mode calls
``io_poll_end`` and then ``io_poll`` once more, in case an event raced with
the end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from ._bh import callable_name
from ._fdmon import (
    EVENT_IN,
    EVENT_OUT,
    EVENT_READ_MASK,
    EVENT_WRITE_MASK,
    EpollMonitor,
    timeout_ns_to_seconds,
)
from ._polling import PollParams, adjust_poll_ns

if TYPE_CHECKING:
    from ._context import AioContext

__all__ = ["FdHandlers", "Handler", "soonest_timeout"]

IOHandler: TypeAlias = Callable[[], object]
PollFn: TypeAlias = Callable[[], bool]
Ready: TypeAlias = "list[Handler]"
"""Handlers to dispatch; what each is ready for is on the handler itself
(``revents``, ``poll_ready``), as QEMU keeps it in the AioHandler: a handler
found twice (by busy polling and by epoll), or dispatched meanwhile by a nested
poll (a BH or a handler waiting with ``poll``), has nothing left the second time."""


def soonest_timeout(a: int, b: int) -> int:
    """QEMU's qemu_soonest_timeout: the smaller timeout, where -1 means none."""
    if a < 0:
        return b
    if b < 0:
        return a
    return a if a < b else b


class Handler:
    """One registered fd.  Replaced, never mutated, when its callbacks change."""

    __slots__ = (
        "fd", "events", "io_read", "io_write", "io_poll", "io_poll_ready",
        "io_poll_begin", "io_poll_end", "deleted", "polling", "poll_ns", "is_notifier",
        "dispatch_count", "revents", "poll_ready",
    )

    def __init__(
        self, fd: int, io_read: IOHandler | None, io_write: IOHandler | None,
        io_poll: PollFn | None, io_poll_ready: IOHandler | None,
        io_poll_begin: IOHandler | None, io_poll_end: IOHandler | None, is_notifier: bool,
    ) -> None:
        self.fd = fd
        self.events = (EVENT_IN if io_read else 0) | (EVENT_OUT if io_write else 0)
        self.io_read = io_read
        self.io_write = io_write
        self.io_poll = io_poll
        self.io_poll_ready = io_poll_ready
        self.io_poll_begin = io_poll_begin
        self.io_poll_end = io_poll_end
        self.deleted = False
        self.polling = False  # in the poll list
        self.poll_ns = 0  # this handler's adaptive polling window
        self.is_notifier = is_notifier  # the context's own eventfd
        self.dispatch_count = 0
        self.revents = 0  # events epoll reported, not dispatched yet
        self.poll_ready = False  # io_poll found work, not dispatched yet


class FdHandlers:
    """The handler table, the epoll instance and the poll list of one context."""

    def __init__(self, ctx: AioContext) -> None:
        self._ctx = ctx
        self._lock = threading.Lock()
        self.fdmon = EpollMonitor()
        self._epoll_poll = self.fdmon.poll_seconds
        self.nodes: dict[int, Handler] = {}
        self.poll_disable_cnt = 0  # handlers without io_poll
        self.poll_list: list[Handler] = []  # copied on write: safe to iterate
        self.poll_started = False
        self.dispatches = 0
        self.busy_poll_runs = 0
        self.busy_poll_hits = 0
        self._listener: Callable[[int, int, str], None] | None = None

    # -- registration (any thread) ----------------------------------------

    def set(
        self, fd: int, io_read: IOHandler | None, io_write: IOHandler | None,
        io_poll: PollFn | None, io_poll_ready: IOHandler | None,
        io_poll_begin: IOHandler | None, io_poll_end: IOHandler | None, is_notifier: bool,
    ) -> bool:
        """Register, replace or remove; return whether anything changed."""
        removing = io_read is None and io_write is None and io_poll is None
        with self._lock:
            old = self.nodes.get(fd)
            if removing and old is None:
                return False
            new = None if removing else Handler(
                fd, io_read, io_write, io_poll, io_poll_ready, io_poll_begin, io_poll_end,
                is_notifier,
            )
            # Publish the node before epoll can report the fd, so a poll
            # running in the home thread never sees an fd it cannot map (GIL
            # ordering: the dict store precedes the epoll syscall; partner:
            # wait, which maps each reported fd through ``nodes``).
            if new is None:
                del self.nodes[fd]
            else:
                if old is not None:
                    new.dispatch_count = old.dispatch_count
                self.nodes[fd] = new
            try:
                self.fdmon.update(fd, old.events if old else 0, new.events if new else 0)
            except BaseException:
                # epoll refused the fd (closed, not pollable): nothing changed.
                if old is None:
                    self.nodes.pop(fd, None)
                else:
                    self.nodes[fd] = old
                raise
            listener = self._listener
            if listener is not None:
                listener(fd, new.events if new else 0, self._role(new) if new else "")
            self.poll_disable_cnt += (new is not None and new.io_poll is None) - (
                old is not None and old.io_poll is None
            )
            if old is not None:
                # GIL ordering: a plain store, read without the lock by the
                # home thread (partner: dispatch, which skips a deleted node):
                # a dispatch that reads it after this store skips the old handler.
                old.deleted = True
                if old.polling:
                    old.polling = False
                    self.poll_list = [h for h in self.poll_list if h is not old]
        return True

    def _role(self, node: Handler) -> str:
        if node.is_notifier:
            return f"notifier eventfd of AioContext {self._ctx.name!r}"
        cbs = [f"{k}={callable_name(cb)}" for k, cb in (("io_read", node.io_read),
               ("io_write", node.io_write)) if cb is not None]
        return f"fd handler of AioContext {self._ctx.name!r} ({', '.join(cbs)})"

    def set_listener(self, listener: Callable[[int, int, str], None] | None) -> None:
        with self._lock:
            old = self._listener
            self._listener = listener
            current = [(fd, n.events, self._role(n)) for fd, n in self.nodes.items()]
            if old is not None:
                for fd, _, _ in current:
                    old(fd, 0, "")
            if listener is not None:
                for fd, events, role in current:
                    listener(fd, events, role)

    def reset_poll_windows(self) -> None:
        for node in list(self.nodes.values()):
            node.poll_ns = 0

    # -- waiting (home thread) -------------------------------------------

    def wait(self, ready: Ready, timeout_ns: int) -> None:
        """Block in epoll; append the ready handlers to ``ready``."""
        nodes = self.nodes
        seconds = -1.0 if timeout_ns < 0 else (0 if timeout_ns == 0 else timeout_ns_to_seconds(timeout_ns))
        for fd, revents in self._epoll_poll(seconds, 128):
            node = nodes.get(fd)
            if node is not None:
                node.revents |= revents
                ready.append(node)

    # -- dispatch (home thread) --------------------------------------------

    def dispatch(self, ready: Ready, block_ns: int, params: PollParams) -> bool:
        """Run the handlers of the ready fds, each once; return progress."""
        progress = False
        for node in ready:
            revents = node.revents
            poll_ready = node.poll_ready
            if not (revents or poll_ready):
                continue  # dispatched already: earlier in this list, or by a nested poll
            node.revents = 0
            node.poll_ready = False
            if node.deleted:
                continue
            if node.io_poll is not None and not node.polling:
                self._poll_add(node, begin=True)
            notifier = node.is_notifier
            if poll_ready and not revents and node.io_poll_ready is not None:
                # Out of the poll list while it runs, in case it polls the
                # context again before clearing its condition.
                self._poll_remove(node)
                try:
                    node.io_poll_ready()
                except Exception as exc:
                    self._ctx.report_exception(exc, f"io_poll_ready of fd {node.fd}")
                if not node.deleted:
                    self._poll_add(node, begin=False)
                if not notifier:
                    progress = True
            else:
                if revents & EVENT_READ_MASK and node.io_read is not None:
                    try:
                        node.io_read()
                    except Exception as exc:
                        self._ctx.report_exception(exc, f"io_read of fd {node.fd}")
                    if not notifier:
                        progress = True
                if revents & EVENT_WRITE_MASK and node.io_write is not None and not node.deleted:
                    try:
                        node.io_write()
                    except Exception as exc:
                        self._ctx.report_exception(exc, f"io_write of fd {node.fd}")
                    progress = True
            if not notifier:
                node.dispatch_count += 1
                self.dispatches += 1
            if params.max_ns and node.polling:
                node.poll_ns = adjust_poll_ns(node.poll_ns, block_ns, params)
        return progress

    # -- busy polling (home thread) ----------------------------------------

    def _poll_add(self, node: Handler, begin: bool) -> None:
        with self._lock:
            if node.deleted or node.polling:
                return
            node.polling = True
            self.poll_list = [*self.poll_list, node]
        if begin and self.poll_started and node.io_poll_begin is not None:
            node.io_poll_begin()

    def _poll_remove(self, node: Handler) -> None:
        with self._lock:
            if node.polling:
                node.polling = False
                self.poll_list = [h for h in self.poll_list if h is not node]

    def set_poll_started(self, ready: Ready, started: bool) -> bool:
        """Enter or leave poll mode; on leaving, poll once more in case an
        event raced with ``io_poll_end``.  Returns progress."""
        if started == self.poll_started:
            return False
        self.poll_started = started
        progress = False
        for node in self.poll_list:
            if node.deleted:
                continue
            hook = node.io_poll_begin if started else node.io_poll_end
            if hook is not None:
                try:
                    hook()
                except Exception as exc:
                    self._ctx.report_exception(exc, f"io_poll_{'begin' if started else 'end'} of fd {node.fd}")
            if not started and node.io_poll is not None and self._io_poll(node):
                node.poll_ready = True
                ready.append(node)
                if not node.is_notifier:
                    progress = True
        return progress

    def _io_poll(self, node: Handler) -> bool:
        """``node.io_poll()``; an exception goes to the context's handler and counts as no work."""
        try:
            return bool(node.io_poll())  # type: ignore[misc]
        except Exception as exc:
            self._ctx.report_exception(exc, f"io_poll of fd {node.fd}")
            return False

    def try_poll_mode(self, ready: Ready, timeout_ns: int, params: PollParams) -> tuple[bool, int, bool]:
        """Busy-poll for up to the largest window.

        Returns ``(progress, timeout_ns, polled_all)``: the timeout becomes 0
        when work was found, and shrinks by the time spent otherwise, so the
        poll still ends at the same absolute time.
        """
        handlers = self.poll_list
        if not params.max_ns or self.poll_disable_cnt or not handlers:
            return False, timeout_ns, False
        max_ns = soonest_timeout(timeout_ns, max(h.poll_ns for h in handlers))
        if not max_ns:
            return False, timeout_ns, False
        self.set_poll_started(ready, True)
        self.busy_poll_runs += 1
        progress = False
        start_ns = time.monotonic_ns()
        while True:
            for node in handlers:
                if not node.deleted and node.io_poll is not None and self._io_poll(node):
                    node.poll_ready = True
                    ready.append(node)
                    timeout_ns = 0
                    if not node.is_notifier:
                        progress = True
            elapsed_ns = time.monotonic_ns() - start_ns
            max_ns = soonest_timeout(timeout_ns, max_ns)
            if elapsed_ns >= max_ns or self.poll_disable_cnt:
                break
            handlers = self.poll_list
        if progress:
            self.busy_poll_hits += 1
        if timeout_ns > 0:
            timeout_ns -= min(timeout_ns, elapsed_ns)
        polled = sum(1 for h in handlers if not h.is_notifier)
        return progress, timeout_ns, polled >= len(self.nodes) - 1

    # -- introspection and teardown ----------------------------------------

    def describe(self) -> list[dict[str, object]]:
        return [
            {
                "fd": h.fd,
                "what": "notifier" if h.is_notifier else "handler",
                "io_read": callable_name(h.io_read) if h.io_read else None,
                "io_write": callable_name(h.io_write) if h.io_write else None,
                "io_poll": callable_name(h.io_poll) if h.io_poll else None,
                "poll_ns": h.poll_ns,
                "dispatch_count": h.dispatch_count,
            }
            for h in list(self.nodes.values())
        ]

    def close(self) -> None:
        with self._lock:
            for node in self.nodes.values():
                node.deleted = True
            self.nodes.clear()
            self.poll_list = []
        self.fdmon.close()
