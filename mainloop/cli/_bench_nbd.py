"""``iothreads bench --nbd``: the workload's requests through NBD, one connection per job.

Theory of operation
-------------------
``NbdTransport`` takes the place of the block client on the bench's data
path: each job gets a connection of its own to its node's export, made with
``protocol.nbd``'s client codec.  The handshake is done before the run, on
a blocking socket with a deadline (``NbdClientHandshake``: NBD_OPT_GO, no
structured replies, so that every reply is a simple one); then the socket is
made non-blocking and served by an fd handler of the bench's AioContext,
the same loop that runs the jobs.  No asyncio, no thread.

- Requests: ``submit`` queues the request's header (``encode_request``)
  and a WRITE's data, unjoined, announces its cookie to the connection's
  ``NbdReplyDecoder``, and schedules the connection's bottom half, which
  hands everything queued to one ``sendmsg``: the requests a job issues in
  one turn of the loop (up to ``--iodepth``) leave together.  What the socket
  does not take waits for POLLOUT.
- Replies: each time the socket is readable, one ``recv`` takes what is
  there and the decoder returns every reply it completed; each completes its
  request (``done(status, message, data)`` as the block client's callbacks:
  0 or minus the errno, which NBD's error values are).
- A connection the server closes, or whose replies make no sense, fails its
  requests in flight with EIO, and those that come later with ENOTCONN (in a
  bottom half: never inside ``submit``).
- ``flush`` (``--verify``, between writing and reading back) sends
  NBD_CMD_FLUSH on every connection and waits for the replies.

Home thread of the context only.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from collections.abc import Callable

from iothreads import AioContext, BottomHalf
from protocol import LocalProtocolError
from protocol.nbd import (
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_FLAG_READ_ONLY,
    NbdClientHandshake,
    NbdClientState,
    NbdReplyDecoder,
    encode_request,
    NbdUri,
    parse_nbd_uri,
)

from ._options import OptionError

__all__ = ["Completion", "NbdTransport"]

#: ``done(status, message, data)``: status 0 or minus an errno, as the block client's callbacks.
Completion = Callable[[int, str, bytes], object]

RECV_BYTES = 256 * 1024
HANDSHAKE_TIMEOUT_S = 30.0
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
_COMMANDS = {"read": NBD_CMD_READ, "write": NBD_CMD_WRITE, "flush": NBD_CMD_FLUSH}


class _Connection:
    """One NBD connection to one export, its socket served by ``ctx``."""

    def __init__(self, ctx: AioContext, export_id: str, uri: str) -> None:
        self.ctx = ctx
        self.export_id = export_id
        self.uri = uri
        self.failed = ""  # why the connection is unusable, once it is
        self._callbacks: dict[int, Completion] = {}
        self._cookies = itertools.count(1)
        self._out: list[bytes | memoryview] = []
        self._waiting_for_pollout = False
        try:
            where = parse_nbd_uri(uri)
            handshake = NbdClientHandshake(where.name)
        except (ValueError, LocalProtocolError) as exc:
            raise self._problem(str(exc)) from None
        self.sock = self._connect(where)
        try:
            self._negotiate(handshake)
        except BaseException:
            self.sock.close()
            raise
        self.read_only = bool(handshake.transmission_flags & NBD_FLAG_READ_ONLY)
        self.sock.setblocking(False)
        self._decoder = NbdReplyDecoder()
        self._send_bh: BottomHalf = ctx.bh_new(self._send, name=f"nbd-send-{export_id}")
        ctx.set_fd_handler(self.sock.fileno(), io_read=self._on_readable)

    def _problem(self, why: str) -> OptionError:
        return OptionError(f"--nbd: export {self.export_id} ({self.uri}): {why}")

    def _connect(self, where: NbdUri) -> socket.socket:
        try:
            if where.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(HANDSHAKE_TIMEOUT_S)
                    sock.connect(where.socket_path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((where.host, where.port), HANDSHAKE_TIMEOUT_S)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise self._problem(f"cannot connect: {exc.strerror or exc}") from None
        return sock

    def _negotiate(self, handshake: NbdClientHandshake) -> None:
        """The handshake on the blocking socket, within HANDSHAKE_TIMEOUT_S in all."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        try:
            while handshake.state is NbdClientState.NEGOTIATING:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                out = handshake.data_to_send()
                if out:
                    self.sock.sendall(out)
                    handshake.data_sent(len(out))
                handshake.receive_data(self.sock.recv(65536))
        except TimeoutError:
            raise self._problem(f"no answer to the handshake within {HANDSHAKE_TIMEOUT_S:.0f} s") from None
        except OSError as exc:
            raise self._problem(f"handshake: {exc.strerror or exc}") from None
        if handshake.state is NbdClientState.CLOSED:
            raise self._problem(str(handshake.close_reason))
        if handshake.unused_data:
            raise self._problem("the server sent data before any request")

    # -- requests ----------------------------------------------------------------

    def submit(self, op: str, offset: int, length: int, data: bytes, done: Completion) -> None:
        if self.failed:
            reason = self.failed
            self.ctx.bh_schedule_oneshot(lambda: done(-errno.ENOTCONN, reason, b""), name="nbd-refused")
            return
        command = _COMMANDS[op]
        cookie = next(self._cookies)
        self._decoder.expect(cookie, length if command == NBD_CMD_READ else 0)
        self._callbacks[cookie] = done
        self._out.append(encode_request(command, cookie, offset, 0 if command == NBD_CMD_FLUSH else length))
        if command == NBD_CMD_WRITE:
            self._out.append(data)
        if not self._waiting_for_pollout:
            self._send_bh.schedule()

    def _send(self) -> None:
        """Everything queued, in as few ``sendmsg`` calls as the socket takes."""
        while self._out and not self.failed:
            batch = self._out[:_IOV_MAX]
            try:
                sent = self.sock.sendmsg(batch)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._fail(f"send: {exc.strerror or exc}")
                return
            whole = 0
            for buf in batch:
                if sent < len(buf):
                    break
                sent -= len(buf)
                whole += 1
            del self._out[:whole]
            if sent:
                self._out[0] = memoryview(self._out[0])[sent:]
            if whole < len(batch):  # the socket is full: the rest once it takes more
                self._watch(pollout=True)
                return
        self._watch(pollout=False)

    def _watch(self, pollout: bool) -> None:
        if pollout != self._waiting_for_pollout and not self.failed:
            self._waiting_for_pollout = pollout
            self.ctx.set_fd_handler(self.sock.fileno(), io_read=self._on_readable,
                                    io_write=self._send if pollout else None)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(f"receive: {exc.strerror or exc}")
            return
        if not data:
            self._fail("the NBD server closed the connection")
            return
        for reply in self._decoder.feed(data):
            done = self._callbacks.pop(reply.cookie)
            if reply.error:
                done(-reply.error, f"from NBD export {self.export_id}", b"")
            else:
                done(0, "", b"" if reply.data is None else bytes(reply.data))
        if self._decoder.error is not None:
            self._fail(f"bad reply: {self._decoder.error}")

    def _fail(self, reason: str) -> None:
        """The connection is lost: its requests in flight fail with EIO."""
        if self.failed:
            return
        self.failed = f"NBD export {self.export_id}: {reason}"
        self.ctx.set_fd_handler(self.sock.fileno())
        self._out.clear()
        callbacks, self._callbacks = self._callbacks, {}
        for done in callbacks.values():
            done(-errno.EIO, self.failed, b"")

    def close(self) -> None:
        if self.ctx.has_fd_handler(self.sock.fileno()):
            self.ctx.set_fd_handler(self.sock.fileno())
        self._send_bh.delete()
        self.sock.close()


class NbdTransport:
    """The bench's requests through NBD: ``targets[j]`` is job j's export,
    as (id, URI); one connection each, all served by ``ctx``.  Refuses (an
    ``OptionError`` naming the export) what cannot connect or negotiate."""

    name = "nbd"

    def __init__(self, ctx: AioContext, targets: list[tuple[str, str]]) -> None:
        self.ctx = ctx
        self._connections: list[_Connection] = []
        try:
            for export_id, uri in targets:
                self._connections.append(_Connection(ctx, export_id, uri))
        except BaseException:
            self.close()
            raise

    @property
    def read_only(self) -> list[str]:
        """The exports that refuse writes (NBD_FLAG_READ_ONLY), by id."""
        return sorted({c.export_id for c in self._connections if c.read_only})

    def submit(self, job: int, op: str, offset: int, length: int, data: bytes, done: Completion) -> None:
        self._connections[job].submit(op, offset, length, data, done)

    def flush(self, timeout_s: float = 60.0) -> None:
        """NBD_CMD_FLUSH on every connection; returns once all are answered,
        ``OSError`` if one fails or none comes within ``timeout_s``."""
        results: list[tuple[int, str]] = []
        for conn in self._connections:
            conn.submit("flush", 0, 0, b"", lambda status, message, _data: results.append((status, message)))
        deadline = time.monotonic_ns() + int(timeout_s * 1e9)
        while len(results) < len(self._connections):
            left_ns = deadline - time.monotonic_ns()
            if left_ns <= 0:
                raise OSError(errno.ETIMEDOUT, f"NBD flush: no answer within {timeout_s:.0f} s")
            self.ctx.poll(True, left_ns)
        for status, message in results:
            if status < 0:
                raise OSError(-status, f"NBD flush failed: {os.strerror(-status)}: {message}")

    def close(self) -> None:
        for conn in self._connections:
            conn.close()
        self._connections.clear()
