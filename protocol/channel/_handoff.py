"""Handing an NBD connection's socket from one process to another.

Theory of operation
-------------------
ZeroMQ carries bytes, never file descriptors, so a connected NBD socket
travels beside the control channel: over a ``socketpair`` of AF_UNIX
``SOCK_SEQPACKET`` sockets that the main loop makes when it spawns an
iothread (the iothread's end is an inherited descriptor).  One datagram is
one ``NbdConnection`` message (``protocol.wire``'s frames, length-prefixed)
with the socket attached as SCM_RIGHTS; the receiver owns the socket from
then on, the sender closes its own copy.

What was read from the socket and not handled yet (``pending``) goes with
it.  A datagram is bounded by the socket's buffer, so pending bytes past
``INLINE_PENDING_BYTES`` (a write's payload that had not all arrived when
a node moved) travel in a memfd, a second descriptor of the same datagram.

Everything received is checked: a datagram that is truncated, carries no
descriptor or more than two, or whose message is not an ``NbdConnection``,
is refused (``RemoteProtocolError``) and every descriptor it carried is
closed.  Sockets are non-blocking: ``send_connection`` raises
``BlockingIOError`` when the peer's queue is full (the caller keeps the
connection and tries again when writable), ``receive_connection`` returns
None when nothing waits.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from dataclasses import replace

from .._errors import RemoteProtocolError
from ..wire._codec import decode, encode
from ..wire._messages import NbdConnection

__all__ = ["INLINE_PENDING_BYTES", "handoff_pair", "receive_connection", "send_connection"]

INLINE_PENDING_BYTES = 64 * 1024  # pending bytes sent in the datagram itself; more go in a memfd
MAX_DATAGRAM_BYTES = INLINE_PENDING_BYTES + 8 * 1024  # a message header is small: names, flags, a few ids
MAX_PENDING_BYTES = 33 << 20  # a request header and the largest write's payload
_HEADER = struct.Struct("!II")  # the message's header frame length, its payload length
_FDS = 2  # the connection's socket, and a memfd of pending bytes


def handoff_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected, non-blocking handoff sockets (close-on-exec: the
    spawner makes the child's end inheritable where it passes it on)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def send_connection(sock: socket.socket, fd: int, msg: NbdConnection) -> None:
    """Send ``msg`` with the connection's socket ``fd`` (which stays open
    here: close it once this returned).  ``BlockingIOError`` when the peer's
    queue is full; nothing was sent then."""
    pending = msg.pending
    fds = [fd]
    memfd = -1
    if len(pending) > INLINE_PENDING_BYTES:
        memfd = os.memfd_create("nbd-pending", os.MFD_CLOEXEC)
        with memoryview(pending) as view:
            written = 0
            while written < len(view):
                written += os.write(memfd, view[written:])
        fds.append(memfd)
    try:
        frames = encode(msg if memfd < 0 else _without_pending(msg))
        header, payload = frames[0], (frames[1] if len(frames) > 1 else b"")
        sock.sendmsg([_HEADER.pack(len(header), len(payload)), header, payload],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    finally:
        if memfd >= 0:
            os.close(memfd)


def receive_connection(sock: socket.socket) -> tuple[int, NbdConnection] | None:
    """The next connection and its socket (the caller owns it now), or None
    if nothing waits; ``RemoteProtocolError`` for a bad datagram (whatever it
    carried is closed); ``EOFError`` when the peer closed its end."""
    try:
        data, ancdata, flags, _ = sock.recvmsg(MAX_DATAGRAM_BYTES, socket.CMSG_SPACE(_FDS * 4))
    except BlockingIOError:
        return None
    fds = _received_fds(ancdata)
    try:
        if not data and not fds:
            raise EOFError("the handoff socket's peer closed it")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise RemoteProtocolError("a handoff datagram was truncated")
        if not fds or len(fds) > _FDS:
            raise RemoteProtocolError(f"a handoff datagram carried {len(fds)} descriptors")
        msg = _message(data)
        if len(fds) == 2:
            if msg.pending:
                raise RemoteProtocolError("a handoff datagram has pending bytes both inline and in a memfd")
            msg = _with_pending(msg, _read_memfd(fds.pop()))
        return fds[0], msg
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


def _message(data: bytes) -> NbdConnection:
    if len(data) < _HEADER.size:
        raise RemoteProtocolError("a handoff datagram is too short")
    header_len, payload_len = _HEADER.unpack_from(data)
    if _HEADER.size + header_len + payload_len != len(data):
        raise RemoteProtocolError("a handoff datagram's lengths do not add up")
    header = data[_HEADER.size:_HEADER.size + header_len]
    frames = [header] + ([data[_HEADER.size + header_len:]] if payload_len else [])
    msg = decode(frames)
    if not isinstance(msg, NbdConnection):
        raise RemoteProtocolError(f"a handoff datagram carried a {type(msg).KIND}, not an nbd-connection")
    return msg


def _read_memfd(fd: int) -> bytes:
    try:
        size = os.fstat(fd).st_size
        if size > MAX_PENDING_BYTES:
            raise RemoteProtocolError(f"{size} pending bytes in a handoff: more than a request can be")
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def _without_pending(msg: NbdConnection) -> NbdConnection:
    return replace(msg, pending=b"")


def _with_pending(msg: NbdConnection, pending: bytes) -> NbdConnection:
    return replace(msg, pending=pending)
