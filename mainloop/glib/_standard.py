"""The standard sources: fd watches, timeouts, idles, signals, child watches,
and an AioContext as a source (QEMU's ``aio_ctx_prepare/check/dispatch``)."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from iothreads import AioContext

from ._source import (
    IO_IN,
    PRIORITY_DEFAULT,
    PRIORITY_DEFAULT_IDLE,
    SOURCE_CONTINUE,
    SOURCE_REMOVE,
    PollFD,
    Source,
)

__all__ = [
    "AioSource",
    "ChildWatchSource",
    "FdWatchSource",
    "IdleSource",
    "SignalSource",
    "TimeoutSource",
]

_NS_PER_MS = 1_000_000


class FdWatchSource(Source):
    """``callback(fd, condition) -> bool`` when ``fd`` meets ``conditions``
    (glib's ``g_io_add_watch``; QEMU's ``qio_channel_add_watch``)."""

    kind = "fd-watch"

    def __init__(self, fd: int, conditions: int, callback: Callable[[int, int], bool],
                 name: str | None = None, priority: int = PRIORITY_DEFAULT, role: str = "") -> None:
        super().__init__(name or f"fd-watch {fd}", priority)
        self.fd = fd
        self.callback = callback
        self._pfd = self.add_unix_fd(fd, conditions, role)

    def dispatch(self) -> bool:
        return self.callback(self.fd, self._pfd.revents)


class TimeoutSource(Source):
    """``callback() -> bool`` every ``interval_ns`` (glib's ``g_timeout_add``);
    the next expiry is counted from the end of the dispatch."""

    kind = "timeout"

    def __init__(self, interval_ns: int, callback: Callable[[], bool], name: str | None = None,
                 priority: int = PRIORITY_DEFAULT) -> None:
        if interval_ns < 0:
            raise ValueError("a timeout interval cannot be negative")
        super().__init__(name or f"timeout {interval_ns / _NS_PER_MS:g} ms", priority)
        self.interval_ns = interval_ns
        self.callback = callback
        self.ready_time_ns = time.monotonic_ns() + interval_ns

    def dispatch(self) -> bool:
        keep = True  # if the callback raises, the source stays (see MainContext): due again in an interval
        try:
            keep = bool(self.callback())
        finally:
            if keep:
                self.set_ready_time(time.monotonic_ns() + self.interval_ns)
        return keep


class IdleSource(Source):
    """``callback() -> bool`` whenever nothing of higher priority is ready
    (glib's ``g_idle_add``; default priority ``PRIORITY_DEFAULT_IDLE``)."""

    kind = "idle"

    def __init__(self, callback: Callable[[], bool], name: str | None = None,
                 priority: int = PRIORITY_DEFAULT_IDLE) -> None:
        super().__init__(name or "idle", priority)
        self.callback = callback

    def prepare(self) -> tuple[bool, int]:
        return True, 0

    def dispatch(self) -> bool:
        return bool(self.callback())


# -- signals through a signalfd -------------------------------------------

_SIGINFO_SIZE = 128  # sizeof(struct signalfd_siginfo)


class _SigSet(ctypes.Structure):
    _fields_ = [("val", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))]


def _signalfd(signals: Iterable[int]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    mask = _SigSet()
    libc.sigemptyset(ctypes.byref(mask))
    for signo in signals:
        if libc.sigaddset(ctypes.byref(mask), int(signo)) != 0:
            raise ValueError(f"invalid signal number {signo}")
    fd: int = libc.signalfd(-1, ctypes.byref(mask), os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"signalfd: {os.strerror(err)}")
    return fd


# Per thread (a signal mask is a thread's): how many signal sources created in
# it use each signal, and the signals they blocked there (that were not blocked
# before the first of them): the last one to go unblocks them.
_signal_users: dict[tuple[int, int], int] = {}
_signals_we_blocked: set[tuple[int, int]] = set()
_signal_lock = threading.Lock()


class SignalSource(Source):
    """``callback(signum) -> bool`` for each arrival of one of ``signals``.

    The signals are blocked in the creating thread and read from a signalfd,
    so they arrive as dispatches, never as asynchronous handlers.  Create it
    before starting other threads (they inherit the blocked mask); a thread
    that does not block a signal may still receive it the classic way.
    When the last source of a signal is destroyed, the signal is unblocked
    again if it was not blocked before (in the creating thread: destroy it
    from there; destroyed from another thread, it stays blocked).
    """

    kind = "signal"

    def __init__(self, signals: Iterable[int], callback: Callable[[int], bool],
                 name: str | None = None, priority: int = PRIORITY_DEFAULT) -> None:
        sigs = sorted({signal.Signals(s) for s in signals})
        if not sigs:
            raise ValueError("SignalSource needs at least one signal")
        names = ", ".join(s.name for s in sigs)
        super().__init__(name or f"signals {names}", priority)
        self.signals = sigs
        self.callback = callback
        self._unread: deque[int] = deque()  # read from the signalfd, not yet handed over
        self._thread = me = threading.get_ident()
        with _signal_lock:
            before = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
            for s in sigs:
                if not _signal_users.get((me, s)) and s not in before:
                    _signals_we_blocked.add((me, s))
                _signal_users[me, s] = _signal_users.get((me, s), 0) + 1
        try:
            self._fd = _signalfd(sigs)
        except BaseException:
            self._restore_mask()
            raise
        self.add_unix_fd(self._fd, IO_IN, f"signalfd ({names})")

    def _restore_mask(self) -> None:
        me = self._thread
        with _signal_lock:
            unblock = []
            for s in self.signals:
                _signal_users[me, s] -= 1
                if not _signal_users[me, s]:
                    del _signal_users[me, s]
                    if (me, s) in _signals_we_blocked:
                        _signals_we_blocked.discard((me, s))
                        unblock.append(s)
            if unblock and threading.get_ident() == me:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, unblock)

    def read_signals(self) -> list[int]:
        """Drain the signalfd; the signal numbers read, in order."""
        got: list[int] = []
        while True:
            try:
                data = os.read(self._fd, _SIGINFO_SIZE * 16)
            except BlockingIOError:
                return got
            if not data:
                return got
            for off in range(0, len(data) - _SIGINFO_SIZE + 1, _SIGINFO_SIZE):
                got.append(int.from_bytes(data[off:off + 4], "little"))

    def dispatch(self) -> bool:
        if self.ready_time_ns >= 0:
            self.set_ready_time(-1)
        unread = self._unread
        unread.extend(self.read_signals())
        try:
            while unread:
                if not self.callback(unread.popleft()):
                    unread.clear()
                    return SOURCE_REMOVE
        except BaseException:
            if unread:  # the rest of the batch: at the next iteration (the signalfd will not say it again)
                self.set_ready_time(0)
            raise
        return SOURCE_CONTINUE

    def finalize(self) -> None:
        os.close(self._fd)
        self._restore_mask()


class ChildWatchSource(Source):
    """``callback(pid, wait_status)`` once child ``pid`` exits (glib's
    ``g_child_watch_add``), through a pidfd; the child is reaped.
    ``os.waitstatus_to_exitcode(wait_status)`` gives the exit code (or
    minus the signal number)."""

    kind = "child-watch"

    def __init__(self, pid: int, callback: Callable[[int, int], object],
                 name: str | None = None, priority: int = PRIORITY_DEFAULT) -> None:
        super().__init__(name or f"child {pid}", priority)
        self.pid = pid
        self.callback = callback
        self._reaped = False
        self._pidfd = os.pidfd_open(pid)
        self.add_unix_fd(self._pidfd, IO_IN, f"pidfd of child {pid}")

    def dispatch(self) -> bool:
        if self._reaped:
            return SOURCE_REMOVE  # its callback raised last time: it ran, once, and that is all
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0  # reaped elsewhere; nothing more to learn
        if pid == 0:
            return True  # not yet (spurious readiness)
        self._reaped = True
        self.callback(self.pid, status)
        return SOURCE_REMOVE

    def finalize(self) -> None:
        os.close(self._pidfd)


class AioSource(Source):
    """An AioContext attached to a MainContext (QEMU's AioContext GSource).

    Every fd handler of the context is a poll fd of this source (kept in
    step as handlers change, from any thread).  ``prepare`` sets bit 0 of
    the context's ``notify_me`` so that ``notify()`` writes its eventfd while
    the main loop may sleep; ``check`` clears it; ``dispatch`` runs the
    context's bottom halves, ready fd handlers and due timers, like
    ``aio_dispatch``.  Busy polling never happens in this mode.

    One source per AioContext at a time (in QEMU the AioContext is itself
    the GSource): the source records its ready poll fds in the context's
    ``gsource_ready_fds``, which ``check`` reads.
    """

    kind = "aio-context"

    def __init__(self, ctx: AioContext, name: str | None = None,
                 priority: int = PRIORITY_DEFAULT) -> None:
        super().__init__(name or ctx.name, priority)
        self.aio_context = ctx
        self._by_fd: dict[int, PollFD] = {}
        # The context's own methods serve as the hooks: no extra call per
        # iteration.  The poll fds that polled ready are recorded in the
        # context's own list, which its check reads.
        self._fired = ctx.gsource_ready_fds
        self.prepare = ctx.gsource_prepare  # type: ignore[method-assign]
        self.check = ctx.gsource_check  # type: ignore[method-assign]

    def _on_attach(self) -> None:
        self._fired.clear()  # the context's list: nothing left by an earlier source
        self.aio_context.set_fd_listener(self._fd_changed)

    def _fd_changed(self, fd: int, events: int, role: str) -> None:
        old = self._by_fd.pop(fd, None)
        if old is not None:
            self.remove_poll(old)
        if events and not self.destroyed:
            self._by_fd[fd] = self.add_poll(fd, events, role)

    def prepare(self) -> tuple[bool, int]:
        return self.aio_context.gsource_prepare()

    def check(self) -> bool:
        return self.aio_context.gsource_check()

    def dispatch(self) -> bool:
        self.aio_context.gsource_dispatch([(p.fd, p.revents) for p in self._fired])
        return True

    def finalize(self) -> None:
        self.aio_context.set_fd_listener(None)
        self._by_fd.clear()
        self._fired.clear()

