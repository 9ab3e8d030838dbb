"""A sans-I/O protocol's socket: its output written, its input watched only while wanted.

The QMP monitor's sessions and the NBD server's handshakes each drive a
protocol object that queues bytes (``data_to_send``) and is told how many
went out (``data_sent``).  ``SocketOutput`` writes them as far as the socket
takes them and, when it takes no more, watches it for room (an ``IO_OUT``
fd watch of the main context, made here and removed once all is out), so a
slow reader never blocks the loop.  ``SocketInput`` is the other way: a
read watch that exists only while the protocol wants input (a peer that
sends faster than it is answered is not read: its input waits in its own
socket buffers).  Main-loop thread.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from ._context import MainContext
from ._source import IO_ERR, IO_HUP, IO_IN, IO_OUT
from ._standard import FdWatchSource

__all__ = ["SocketInput", "SocketOutput"]


class SocketOutput:
    """Writes what a protocol object has to send to ``conn``; ``on_writable()``
    when a socket that was full takes more (call ``send`` again then)."""

    def __init__(self, context: MainContext, conn: socket.socket, on_writable: Callable[[], object], *,
                 name: str, chunk_bytes: int) -> None:
        self.context = context
        self.conn = conn
        self.on_writable = on_writable
        self.name = name
        self.chunk_bytes = chunk_bytes
        self._watch: FdWatchSource | None = None

    def send(self, take: Callable[[int], bytes], sent: Callable[[int], None]) -> bool | None:
        """Send ``take(chunk)`` until it is empty: True once all is out, False
        when the socket is full (it is watched for room), None when the
        connection failed (the caller closes it)."""
        while True:
            data = take(self.chunk_bytes)
            if not data:
                self._unwatch()
                return True
            try:
                n = self.conn.send(data)
            except BlockingIOError:
                if self._watch is None:
                    self._watch = FdWatchSource(self.conn.fileno(), IO_OUT, self._on_room, name=self.name)
                    self.context.attach(self._watch)
                return False
            except OSError:
                return None
            sent(n)

    def _on_room(self, _fd: int, _cond: int) -> bool:
        self._watch = None  # this source ends; send() makes another if need be
        self.on_writable()
        return False

    def _unwatch(self) -> None:
        if self._watch is not None:
            self._watch.destroy()
            self._watch = None

    def close(self) -> None:
        """Stop watching (the socket is the caller's to close)."""
        self._unwatch()


class SocketInput:
    """``on_readable()`` when ``conn`` has input (or hung up), while ``want(True)``."""

    def __init__(self, context: MainContext, conn: socket.socket, on_readable: Callable[[], object], *,
                 name: str, role: str) -> None:
        self.context = context
        self.conn = conn
        self.on_readable = on_readable
        self.name = name
        self.role = role
        self._watch: FdWatchSource | None = None

    def want(self, wanted: bool) -> None:
        """Watch for input, or stop (idempotent)."""
        if wanted and self._watch is None:
            self._watch = FdWatchSource(self.conn.fileno(), IO_IN | IO_HUP | IO_ERR, self._on_input,
                                        name=self.name, role=self.role)
            self.context.attach(self._watch)
        elif not wanted and self._watch is not None:
            self._watch.destroy()
            self._watch = None

    def _on_input(self, _fd: int, _cond: int) -> bool:
        watch = self._watch  # the source running this: kept only while it is still the watch
        self.on_readable()
        return self._watch is watch

    def close(self) -> None:
        """Stop watching (the socket is the caller's to close)."""
        self.want(False)
