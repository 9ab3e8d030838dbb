"""fd monitoring: an epoll instance behind a small interface (QEMU's fdmon).

QEMU starts with ``poll()`` and upgrades to epoll past 64 fds; we use epoll
from the start: it has no fd-number limit (``select`` stops at 1024), its cost
does not grow with the number of idle fds, and Python's ``select.epoll`` is a
thin wrapper.  Registration is level-triggered, so a handler that does not
consume all input is called again on the next poll, as QEMU documents for
``qemu_set_fd_handler``.

Waiting on the epoll fd is the only blocking call of an AioContext.
Timeouts are integer nanoseconds until then, when ``timeout_ns_to_seconds``
turns them into what epoll takes: whole milliseconds, rounded up so that we
wait *at least* as long as asked, and capped at a day.
"""

from __future__ import annotations

import select
from collections.abc import Callable

__all__ = ["EpollMonitor", "EVENT_IN", "EVENT_OUT", "EVENT_READ_MASK", "EVENT_WRITE_MASK", "timeout_ns_to_seconds"]

EVENT_IN = select.EPOLLIN
EVENT_OUT = select.EPOLLOUT
EVENT_ERR = select.EPOLLERR
EVENT_HUP = select.EPOLLHUP
# What makes io_read / io_write run (QEMU: G_IO_IN|G_IO_HUP|G_IO_ERR and G_IO_OUT|G_IO_ERR).
EVENT_READ_MASK = EVENT_IN | EVENT_HUP | EVENT_ERR
EVENT_WRITE_MASK = EVENT_OUT | EVENT_ERR

MAX_TIMEOUT_NS = 24 * 3600 * 1_000_000_000
_NS_PER_MS = 1_000_000


def timeout_ns_to_seconds(timeout_ns: int) -> float:
    """-1 stays -1 (forever); anything else is rounded up to whole ms."""
    if timeout_ns < 0:
        return -1.0
    timeout_ns = min(timeout_ns, MAX_TIMEOUT_NS)
    return -(-timeout_ns // _NS_PER_MS) / 1000.0


class EpollMonitor:
    """One epoll instance.  ``update`` is safe from any thread; the wait
    (``poll_seconds``) is the owning context's home thread's."""

    __slots__ = ("_epoll",)

    def __init__(self) -> None:
        self._epoll = select.epoll()

    def fileno(self) -> int:
        """The epoll fd: readable when any registered fd is ready."""
        return self._epoll.fileno()

    def register(self, fd: int, events: int) -> None:
        """Start watching ``fd`` (``events`` may be 0: errors and hang-ups only)."""
        self._epoll.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        """Change the events watched on a registered ``fd``."""
        try:
            self._epoll.modify(fd, events)
        except FileNotFoundError:
            self._epoll.register(fd, events)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; an fd closed meanwhile is not an error."""
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def update(self, fd: int, old_events: int, new_events: int) -> None:
        """Register, modify or remove ``fd`` (``new_events == 0`` removes)."""
        ep = self._epoll
        if not new_events:
            if old_events:
                try:
                    ep.unregister(fd)
                except (OSError, ValueError):
                    pass  # the fd was closed before its handler was removed
        elif old_events:
            try:
                ep.modify(fd, new_events)
            except FileNotFoundError:
                ep.register(fd, new_events)
        else:
            try:
                ep.register(fd, new_events)
            except FileExistsError:
                ep.modify(fd, new_events)

    @property
    def poll_seconds(self) -> Callable[[float, int], list[tuple[int, int]]]:
        """The raw ``epoll.poll(timeout_s, max_events)``: the wait itself, a
        timeout in ns converted once by the caller (``timeout_ns_to_seconds``)."""
        return self._epoll.poll

    def close(self) -> None:
        self._epoll.close()
