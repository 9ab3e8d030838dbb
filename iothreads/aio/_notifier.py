"""EventNotifier: QEMU's eventfd wrapper (``util/event_notifier-posix.c``).

An eventfd is an 8-byte counter the kernel keeps for us: a write adds to it and
makes the fd readable; a read returns the sum and resets it.  That makes it the
cheapest "wake up" primitive Linux has, and the one every AioContext owns.
"""

from __future__ import annotations

import os

from protocol import StateError

__all__ = ["EventNotifier"]


class EventNotifier:
    """A non-blocking, close-on-exec eventfd.

    ``set()`` and ``test_and_clear()`` are safe from any thread.  ``set()`` on
    a notifier that is already set is cheap and never blocks (a full counter is
    as good as a set one).
    """

    __slots__ = ("_fd",)

    def __init__(self, active: bool = False) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        if active:
            self.set()

    def fileno(self) -> int:
        """The fd to poll for readability."""
        if self._fd < 0:
            raise StateError("EventNotifier is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def set(self) -> None:
        """Make the notifier readable (any thread)."""
        # The wake-up half of AioContext.notify(): what the caller stored
        # before (``notified``, GIL ordering) precedes this write, and the
        # write is a syscall, which orders it like a full barrier.  Partner:
        # the home thread's epoll wait (AioContext.poll step 4), then
        # test_and_clear (AioContext._notifier_read).  ``_fd`` is read once:
        # one plain load (GIL), so a concurrent close() leaves either the fd or
        # -1 here, never a mix; set() after close() is the caller's bug.
        fd = self._fd
        if fd < 0:
            raise StateError("EventNotifier is closed")
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:
            pass  # the counter is saturated: a read is pending anyway

    def test_and_clear(self) -> bool:
        """Reset the notifier; return whether it was set (any thread)."""
        fd = self._fd
        if fd < 0:
            raise StateError("EventNotifier is closed")
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        """Close the eventfd.  Idempotent."""
        # A load and a store, not one atomic swap: close() is the owner's, and
        # is not to race with another close() (partner: set, which reads _fd once).
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> EventNotifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventNotifier(fd={self._fd})"
