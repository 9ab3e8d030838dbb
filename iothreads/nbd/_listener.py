"""An iothread's own NBD listener: a remote iothread's exports, served from its host.

Theory of operation
-------------------
A local iothread never listens: the main loop negotiates and hands the
socket over.  A remote one cannot be handed a socket across hosts, so it
listens itself (``iothreads worker --nbd-listen HOST:PORT``) and does the
main loop's part for the exports of its own nodes, which the main loop
offers it (``NbdOffer`` messages: the export as a handshake shows it, by
name).  Each accepted connection gets a ``_Handshake``: the sans-I/O
``NbdServerHandshake`` (``protocol.nbd``) driven by fd handlers of the
AioContext, with reads bounded (``READ_BYTES``), reads only while the
handshake wants input, and a deadline (``HANDSHAKE_DEADLINE_NS``: QEMU's
``handshake-max-seconds``).  Past it, ``on_negotiated`` gets the socket and
what was agreed, and the iothread serves it as a connection handed over.
At most ``MAX_HANDSHAKES`` run at once; the listener is not watched
meanwhile (clients wait in its backlog), as the main loop's is not at its
``max-connections``.

NBD has no authentication here (QEMU's is TLS, which this project does
not do): bind it to an address only the clients you mean can reach.
Home thread only.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Mapping

from protocol import NbdExport, NbdHandshakeState, NbdNegotiated, NbdServerHandshake, ThrottledLog

from ..aio._clock import ClockType
from ..aio._polling import never_ready
from ..aio._context import AioContext

__all__ = ["HANDSHAKE_DEADLINE_NS", "MAX_HANDSHAKES", "NbdListener", "parse_listen_address"]

log = logging.getLogger("iothreads.nbd")

READ_BYTES = 16 * 1024
SEND_BYTES = 256 * 1024
MAX_HANDSHAKES = 64
HANDSHAKE_DEADLINE_NS = 10_000_000_000
ACCEPT_RETRY_MS = 200  # out of descriptors: the listener is watched again after this

Negotiated = Callable[[socket.socket, NbdNegotiated, bytes], None]  # socket, agreement, bytes read past it


def parse_listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[HOST]:PORT`` for IPv6) as a socket address; ``ValueError`` if it is none."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--nbd-listen {text!r}: expected HOST:PORT")
    return host, int(port)


class _Handshake:
    """One accepted connection's handshake, driven by the context's fd handlers."""

    def __init__(self, listener: NbdListener, sock: socket.socket, peer: str) -> None:
        self.listener = listener
        self.sock = sock
        self.peer = peer
        self.hs = NbdServerHandshake(listener.exports)
        self.closed = False
        ctx = listener.ctx
        self.deadline = ctx.timer_new_ns(ClockType.REALTIME, self._on_deadline, f"NBD handshake {peer}")
        self.deadline.mod_ns(ctx.clock_now_ns(ClockType.REALTIME) + listener.deadline_ns)
        self._flush()

    def _watch(self, writing: bool) -> None:
        reading = self.hs.wants_input and not writing
        self.listener.ctx.set_fd_handler(self.sock.fileno(), self._on_readable if reading else None,
                                         self._flush if writing else None)

    def _flush(self) -> None:
        if self.closed:
            return
        out = self.hs.data_to_send(SEND_BYTES)
        while out:
            try:
                sent = self.sock.send(out)
            except BlockingIOError:
                self._watch(writing=True)
                return
            except OSError:
                self.close()
                return
            self.hs.data_sent(sent)
            out = self.hs.data_to_send(SEND_BYTES)
        state = self.hs.state
        if state is NbdHandshakeState.CLOSED:
            if self.hs.close_reason is not None:
                self.listener.complaints.log("handshake", logging.WARNING, "NBD client %s: %s; disconnected",
                                             self.peer, self.hs.close_reason)
            self.close()
        elif state is NbdHandshakeState.TRANSMISSION:
            negotiated = self.hs.negotiated
            assert negotiated is not None
            pending = self.hs.unused_data
            self._stop()
            self.listener.on_negotiated(self.sock, negotiated, pending)
        else:
            self._watch(writing=False)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.hs.receive_data(data)  # b"": the client hung up
        self._flush()

    def _on_deadline(self) -> None:
        if not self.closed:
            self.listener.complaints.log("deadline", logging.WARNING,
                                         "NBD client %s: handshake not finished in time; disconnected", self.peer)
            self.close()

    def _stop(self) -> None:
        self.closed = True
        self.deadline.delete()
        self.listener.ctx.set_fd_handler(self.sock.fileno())
        self.listener.ended(self)

    def close(self) -> None:
        if not self.closed:
            self.hs.close()
            self._stop()
            self.sock.close()


class NbdListener:
    """A TCP listener that negotiates NBD for the exports in ``exports``
    (a mapping its owner keeps: it is read at each option) and passes each
    connection past its handshake to ``on_negotiated``.  ``OSError`` if the
    address cannot be bound."""

    def __init__(self, ctx: AioContext, address: tuple[str, int], exports: Mapping[str, NbdExport],
                 on_negotiated: Negotiated, *, deadline_ns: int = HANDSHAKE_DEADLINE_NS,
                 max_handshakes: int = MAX_HANDSHAKES) -> None:
        self.ctx = ctx
        self.exports = exports
        self.deadline_ns = deadline_ns
        self.max_handshakes = max_handshakes
        self.complaints = ThrottledLog(log)
        self.on_negotiated = on_negotiated
        self._handshakes: set[_Handshake] = set()
        self._retry = ctx.timer_new_ms(ClockType.REALTIME, self._update, "NBD listener back-off")
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(address)
            self.sock.listen(128)
            self.sock.setblocking(False)
        except OSError as exc:
            self._retry.delete()
            self.sock.close()
            raise OSError(exc.errno, f"cannot listen for NBD clients on {address[0]}:{address[1]}: "
                                     f"{exc.strerror or exc}") from None
        host, port = self.sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        self._update()

    def _update(self) -> None:
        if self.sock.fileno() >= 0:
            watching = len(self._handshakes) < self.max_handshakes
            self.ctx.set_fd_handler(self.sock.fileno(), self._on_accept if watching else None,
                                    io_poll=never_ready if watching else None)

    def _on_accept(self) -> None:
        while len(self._handshakes) < self.max_handshakes:
            try:
                conn, addr = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The listener stays readable: not watched for a while (no spinning), then again.
                    self.complaints.log("accept", logging.ERROR, "NBD listener: %s; retrying in %d ms",
                                        exc.strerror, ACCEPT_RETRY_MS)
                    self.ctx.set_fd_handler(self.sock.fileno())
                    self._retry.mod(self._retry.now() + ACCEPT_RETRY_MS)
                    return
                continue  # (ECONNABORTED and the like: that client is gone)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._handshakes.add(_Handshake(self, conn, f"{addr[0]}:{addr[1]}"))
        self._update()

    def ended(self, handshake: _Handshake) -> None:
        self._handshakes.discard(handshake)
        self._update()

    def close(self) -> None:
        self._retry.delete()
        for handshake in list(self._handshakes):
            handshake.close()
        if self.sock.fileno() >= 0:
            self.ctx.set_fd_handler(self.sock.fileno())
            self.sock.close()
