"""The transmission phase's requests, sans I/O: bytes in, complete and checked requests out.

Theory of operation
-------------------
An ``NbdRequestDecoder`` is fed whatever a socket read brought (``feed``) and
returns every request completed by it, in order: a request split across
reads is kept until its last byte comes, and one read may complete many.
Each is an ``NbdRequest``: command, flags, cookie (the spec's and QEMU's
name for what older texts call the handle), offset, length and, for
NBD_CMD_WRITE, its payload.  The payload is a ``memoryview``: of the bytes
fed when the whole payload came in one ``feed`` (no copy), else of one
buffer the size of the payload that the reads fill (one copy).  An owner that
wants no copy at all for large writes reads straight into that buffer:
``payload_buffer()`` is the part still missing, ``payload_received(n)`` says
how much of it a ``recv_into`` filled.  Views alias what was fed: feed objects
that are not written to again while their requests live (``socket.recv``
returns a new one each time).

Requests are checked as QEMU's ``nbd_co_receive_request`` and
``nbd_handle_request`` check them, in the same order, and a request that
fails a check is still returned, with ``error`` set (always NBD_EINVAL, as
QEMU answers them) and ``message`` QEMU's text (as of QEMU 8.2), for its
owner to answer (``generic_reply``) without losing step with the client:

1. READ, WRITE and CACHE longer than 32 MiB (NBD_MAX_BUFFER_SIZE);
2. WRITE, TRIM and WRITE_ZEROES on a read-only export;
3. offset + length past the end of the export (any command);
4. flags the command does not take: FUA for all, DF for READ with
   structured replies, NO_HOLE and FAST_ZERO for WRITE_ZEROES, REQ_ONE for
   BLOCK_STATUS;
5. a command this server does not know;
6. BLOCK_STATUS without a negotiated metadata context, or of length 0.

A refused WRITE's payload is read and dropped (never buffered), so the next
request is found where it starts, except after check 1: the payload is then
not read (QEMU does not), the decoder stops, and ``error`` says why; the
owner answers the requests returned, then disconnects.  A bad request magic
stops it the same way, its 28 bytes returned as a last, refused request:
QEMU answers them (with whatever cookie they hold) before it disconnects.
A header cut short by the end of the stream is never answered.  NBD_CMD_DISC is returned like any request and ends the
stream (``disconnected``): the client sends nothing after it.

What a decoder holds: at most 27 bytes of a header and one payload of at
most 32 MiB, allocated only once its header passed the checks.  Not
thread-safe: one thread feeds a decoder.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .._errors import RemoteProtocolError, StateError
from ._constants import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_MAX_BUFFER_SIZE,
    NBD_REQUEST_MAGIC,
    NBD_REQUEST_SIZE,
    nbd_cmd_lookup,
)
from ._framing import FrameDecoder

__all__ = ["NbdRequest", "NbdRequestDecoder", "encode_request"]

_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
assert _REQUEST.size == NBD_REQUEST_SIZE

# Per command: the flags it takes, whether its length is bounded by
# NBD_MAX_BUFFER_SIZE, whether a read-only export refuses it.
_Rule = tuple[int, bool, bool]
_RULES: dict[int, _Rule] = {
    NBD_CMD_READ: (NBD_CMD_FLAG_FUA, True, False),
    NBD_CMD_WRITE: (NBD_CMD_FLAG_FUA, True, True),
    NBD_CMD_FLUSH: (NBD_CMD_FLAG_FUA, False, False),
    NBD_CMD_TRIM: (NBD_CMD_FLAG_FUA, False, True),
    NBD_CMD_CACHE: (NBD_CMD_FLAG_FUA, True, False),
    NBD_CMD_WRITE_ZEROES: (NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO, False, True),
    NBD_CMD_BLOCK_STATUS: (NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE, False, False),
}
_UNKNOWN_RULE: _Rule = (NBD_CMD_FLAG_FUA, False, False)
_new = tuple.__new__  # makes a named tuple without a call to its Python-level __new__


class NbdRequest(NamedTuple):
    """One transmission request (a named tuple: the decoder makes one per request, and
    a tuple is the cheapest object to make).

    :ivar command: NBD_CMD_*.
    :ivar flags: NBD_CMD_FLAG_*.
    :ivar cookie: the client's opaque id, echoed in every reply to it.
    :ivar offset: where in the export.
    :ivar length: how many bytes.
    :ivar payload: NBD_CMD_WRITE's data (``length`` bytes), else None; None
        too for a refused WRITE, whose payload was dropped.
    :ivar error: 0 for a valid request, else the NBD error to answer it with.
    :ivar message: why it was refused (QEMU's text), for a structured error.
    """

    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    payload: memoryview | None = None
    error: int = 0
    message: str = ""


def encode_request(command: int, cookie: int, offset: int, length: int, flags: int = 0,
                   payload: bytes = b"") -> bytes:
    """A request as a client sends it (header, then the payload if any)."""
    return _REQUEST.pack(NBD_REQUEST_MAGIC, flags, command, cookie, offset, length) + payload


class NbdRequestDecoder(FrameDecoder[NbdRequest]):
    """Finds and checks the requests in the byte stream of one connection.

    :param size_bytes: the export's size (requests past it are refused).
    :param read_only: the export refuses WRITE, TRIM and WRITE_ZEROES.
    :param structured_replies: negotiated (READ then takes NBD_CMD_FLAG_DF).
    :param meta_contexts: how many metadata contexts were negotiated
        (BLOCK_STATUS is refused without one).
    """

    HEADER_SIZE = NBD_REQUEST_SIZE

    def __init__(self, size_bytes: int, *, read_only: bool = False, structured_replies: bool = False,
                 meta_contexts: int = 0) -> None:
        super().__init__()
        self._size_bytes = size_bytes
        self._read_only = read_only
        self._meta_contexts = meta_contexts
        #: Why the stream cannot go on (a bad magic, an oversized write), once it cannot.
        self.error: RemoteProtocolError | None = None
        #: NBD_CMD_DISC came: the client sends nothing more.
        self.disconnected = False
        self._rules = dict(_RULES)
        if structured_replies:
            self._rules[NBD_CMD_READ] = (NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF, True, False)
        # For the fast path: the commands that may pass every check on their header
        # alone, with the flags they take and their longest length.
        self._fast = {command: (valid_flags, NBD_MAX_BUFFER_SIZE if check_length else 1 << 64)
                      for command, (valid_flags, check_length, check_rofs) in self._rules.items()
                      if command != NBD_CMD_BLOCK_STATUS and not (check_rofs and read_only)}

    @property
    def closed(self) -> bool:
        """No more requests will come: NBD_CMD_DISC, or an error."""
        return self.disconnected or self.error is not None

    def valid_flags(self, command: int) -> int | None:
        """The flags a request of ``command`` may carry on this export, or None
        if the export refuses the command whatever its flags (a write on a
        read-only export, a command it does not know, BLOCK_STATUS without a
        metadata context).  For an owner's fast path that checks the common
        requests itself and feeds the others here."""
        rule = self._rules.get(command)
        if rule is None or (rule[2] and self._read_only) or (command == NBD_CMD_BLOCK_STATUS
                                                             and not self._meta_contexts):
            return None
        return rule[0]

    # -- input -----------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> list[NbdRequest]:
        """The requests completed by ``data``, in order (none once ``closed``)."""
        out: list[NbdRequest] = []
        if self.closed:
            return out
        view = memoryview(data).cast("B")
        end = len(view)
        pos = self._resume(view, out)
        if pos < 0:
            return out
        # The common case inline: a valid request whose payload, if any, is all here.  Anything
        # else (a refusal, NBD_CMD_DISC, BLOCK_STATUS, a payload cut by the read) takes _frame.
        unpack = _REQUEST.unpack_from
        fast = self._fast
        size = self._size_bytes
        append = out.append
        while end - pos >= NBD_REQUEST_SIZE:
            magic, flags, command, cookie, offset, length = unpack(view, pos)
            rule = fast.get(command)
            if (rule is not None and magic == NBD_REQUEST_MAGIC and not flags & ~rule[0] and length <= rule[1]
                    and offset <= size and length <= size - offset):
                start = pos + NBD_REQUEST_SIZE
                if command != NBD_CMD_WRITE:
                    append(_new(NbdRequest, (command, flags, cookie, offset, length, None, 0, "")))
                    pos = start
                    continue
                if end - start >= length:
                    append(_new(NbdRequest, (command, flags, cookie, offset, length, view[start:start + length],
                                             0, "")))
                    pos = start + length
                    continue
            pos = self._frame(view, pos, view, pos + NBD_REQUEST_SIZE, out)
            if self.closed:
                return out
        self._keep_tail(view, pos)
        return out

    def payload_buffer(self) -> memoryview | None:
        """The part of a WRITE payload still to come, to read into (``recv_into``)
        without a copy; None when no payload is being collected."""
        if self._pending is None or not self._payload:
            return None
        return memoryview(self._payload)[self._filled:]

    def payload_received(self, nbytes: int) -> list[NbdRequest]:
        """``nbytes`` were written into ``payload_buffer()``: the WRITE, once its payload is complete."""
        out: list[NbdRequest] = []
        if self._pending is None or not self._payload or not 0 <= nbytes <= len(self._payload) - self._filled:
            raise StateError(f"{nbytes} bytes received into a payload buffer that does not take them")
        self._filled += nbytes
        if self._filled == len(self._payload):
            self._complete(out)
        return out

    def _stopped(self) -> bool:
        return self.closed

    def _with_payload(self, frame: NbdRequest, payload: memoryview) -> NbdRequest:
        return frame._replace(payload=payload)

    def _frame(self, header: bytes | memoryview, at: int, view: memoryview, pos: int,
               out: list[NbdRequest]) -> int:
        """Check the request whose header is at ``header[at:]`` and whose payload, if
        any, starts at ``view[pos:]``; queue it; return where the next one starts."""
        fields: tuple[int, int, int, int, int, int] = _REQUEST.unpack_from(header, at)
        magic, flags, command, cookie, offset, length = fields
        if magic != NBD_REQUEST_MAGIC:  # answered, as QEMU does, with whatever cookie the bytes hold
            message = f"invalid magic (got 0x{magic:x}, expected 0x{NBD_REQUEST_MAGIC:x})"
            out.append(NbdRequest(command, flags, cookie, offset, length, None, NBD_EINVAL, message))
            self.error = RemoteProtocolError(message, bytes(header[at:at + NBD_REQUEST_SIZE]))
            return pos
        if command == NBD_CMD_DISC:  # no reply, whatever its fields
            out.append(NbdRequest(command, flags, cookie, offset, length))
            self.disconnected = True
            return pos
        rule = self._rules.get(command)
        valid_flags, check_length, check_rofs = _UNKNOWN_RULE if rule is None else rule
        message = ""
        if check_length and length > NBD_MAX_BUFFER_SIZE:
            message = f"len ({length}) is larger than max len ({NBD_MAX_BUFFER_SIZE})"
            if command == NBD_CMD_WRITE:  # its payload is not read: the stream is lost
                out.append(NbdRequest(command, flags, cookie, offset, length, None, NBD_EINVAL, message))
                self.error = RemoteProtocolError(f"write request refused unread: {message}")
                return pos
        elif check_rofs and self._read_only:
            message = "Export is read-only"
        elif offset > self._size_bytes or length > self._size_bytes - offset:
            message = f"operation past EOF; From: {offset}, Len: {length}, Size: {self._size_bytes}"
        elif flags & ~valid_flags:
            message = f"unsupported flags for command {nbd_cmd_lookup(command)} (got 0x{flags:x})"
        elif rule is None:
            message = f"invalid request type ({command}) received"
        elif command == NBD_CMD_BLOCK_STATUS:
            if not self._meta_contexts:
                message = "CMD_BLOCK_STATUS not negotiated"
            elif not length:
                message = "need non-zero length"
        request = NbdRequest(command, flags, cookie, offset, length, None, NBD_EINVAL if message else 0,
                             message)
        if command != NBD_CMD_WRITE:
            out.append(request)
            return pos
        end = len(view)
        if not message and end - pos >= length:  # the whole payload is here: no copy
            out.append(request._replace(payload=view[pos:pos + length]))
            return pos + length
        return pos + self._collect(request, length, not message, view[pos:], out)
