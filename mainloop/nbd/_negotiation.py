"""One NBD client's handshake, driven in the main loop.

Theory of operation
-------------------
A ``Negotiation`` holds an accepted socket and the sans-I/O
``NbdServerHandshake`` (``protocol.nbd``) and moves bytes between them, the
way the monitor's ``Session`` drives its ``QmpSession``: it writes out what
the handshake says as far as the socket takes it (the rest when the socket
is writable: a client that does not read never blocks the loop), reads only
while the handshake wants input (a client that pipelines options without
reading their replies is not read either), at most ``READ_BYTES`` at a time,
and feeds it what it read.  What one handshake holds is thus bounded (see
``protocol.nbd``'s handshake).  Time is bounded here: a handshake that is
not over ``deadline_s`` seconds after the accept is closed (QEMU's
``handshake-max-seconds``), on the main loop's own time (``Cluster.loop_time_ns``:
a main loop that was stopped does not blame its clients for its absence).

It ends in one of two ways:

* the client reached the transmission phase (NBD_OPT_GO acknowledged, or
  NBD_OPT_EXPORT_NAME answered) and every byte of the answer went out: the
  socket, what was agreed and the bytes read past the last option go to
  ``on_negotiated``, which hands them on (no byte of the transmission phase
  is read here);
* the client aborted, hung up, broke the protocol, or ran out of time: what
  the handshake still had to say (NBD_OPT_ABORT's acknowledgement) is sent if
  the socket takes it, and the socket is closed.

Either way ``on_ended`` is told once.  Main-loop thread, BQL held.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping

from iothreads import ClockType, Timer
from protocol import NbdExport, NbdHandshakeState, NbdNegotiated, NbdServerHandshake, ThrottledLog

from ..cluster._cluster import Cluster
from ..glib._output import SocketInput, SocketOutput

__all__ = ["Negotiation"]

log = logging.getLogger("mainloop.nbd")

READ_BYTES = 16 * 1024  # one read of a client's handshake; also the most read past its last option
SEND_BYTES = 256 * 1024  # output handed to the socket per send

Negotiated = Callable[[socket.socket, NbdNegotiated, bytes, str], None]  # socket, agreement, pending, peer


class Negotiation:
    """The handshake of one accepted connection."""

    def __init__(self, cluster: Cluster, conn: socket.socket, peer: str, exports: Mapping[str, NbdExport],
                 deadline_s: int, complaints: ThrottledLog, on_negotiated: Negotiated,
                 on_ended: Callable[[Negotiation], None]) -> None:
        self.cluster = cluster
        self.conn = conn
        self.peer = peer
        self.handshake = NbdServerHandshake(exports)
        self.closed = False
        self._complaints = complaints
        self._on_negotiated = on_negotiated
        self._on_ended = on_ended
        self._in = SocketInput(cluster.loop.context, conn, self._on_readable, name=f"nbd handshake {peer}",
                               role=f"NBD handshake ({peer})")
        self._out = SocketOutput(cluster.loop.context, conn, self._flush, name=f"nbd handshake output {peer}",
                                 chunk_bytes=SEND_BYTES)
        self._deadline: Timer | None = None
        self._deadline_s = deadline_s
        self._deadline_ns = 0
        if deadline_s:
            self._deadline = cluster.loop.timer_new_ms(ClockType.REALTIME, self._on_deadline,
                                                       f"NBD handshake deadline {peer}")
            self._deadline_ns = cluster.loop_time_ns() + deadline_s * 1_000_000_000
            self._deadline.mod(self._deadline.now() + deadline_s * 1000)
        self._flush()  # the greeting (and the input watch)

    # -- output ------------------------------------------------------------------

    def _flush(self) -> None:
        """Send what the handshake has to say, as far as the socket takes it; then
        go on as its state says."""
        hs = self.handshake
        if self.closed:
            return
        done = self._out.send(hs.data_to_send, hs.data_sent)
        if done is None:
            self.close()
            return
        if not done:
            self._watch_input()
            return
        if hs.state is NbdHandshakeState.CLOSED:
            if hs.close_reason is not None:
                self._complaints.log("handshake", logging.WARNING, "NBD client %s: %s; disconnected",
                                     self.peer, hs.close_reason)
            self.close()
        elif hs.state is NbdHandshakeState.TRANSMISSION:
            self._finish()
        else:
            self._watch_input()

    # -- input -------------------------------------------------------------------

    def _watch_input(self) -> None:
        """Watch for input while the handshake wants it, and only then."""
        self._in.want(self.handshake.wants_input and not self.closed)

    def _on_readable(self) -> None:
        try:
            data = self.conn.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.handshake.receive_data(data)  # b"": the client hung up, the handshake closes
        self._flush()

    # -- the end -------------------------------------------------------------------

    def _on_deadline(self) -> None:
        if self.closed:
            return
        left_ms = -(-(self._deadline_ns - self.cluster.loop_time_ns()) // 1_000_000)
        if left_ms > 0 and self._deadline is not None:  # the main loop was away meanwhile: not the client's time
            self._deadline.mod(self._deadline.now() + left_ms)
            return
        self._complaints.log("deadline", logging.WARNING,
                             "NBD client %s: handshake not finished in %d s; disconnected", self.peer,
                             self._deadline_s)
        self.close()

    def _finish(self) -> None:
        """The transmission phase begins and the answer is out: the socket goes on."""
        negotiated = self.handshake.negotiated
        assert negotiated is not None
        pending = self.handshake.unused_data
        self._stop()
        self._on_ended(self)
        self._on_negotiated(self.conn, negotiated, pending, self.peer)

    def _stop(self) -> None:
        self.closed = True
        self._in.close()
        self._out.close()
        if self._deadline is not None:
            self._deadline.delete()
            self._deadline = None

    def close(self) -> None:
        """Close the connection (the client's fault, its choice, or the server's)."""
        if self.closed:
            return
        self.handshake.close()
        self._stop()
        self.conn.close()
        self._on_ended(self)
