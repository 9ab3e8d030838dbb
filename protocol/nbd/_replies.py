"""The transmission phase's replies, sans I/O: simple replies and structured reply chunks as buffers.

Theory of operation
-------------------
Each builder returns the buffers of one reply (or one chunk of a structured
reply) as a list, ready to be appended to the list handed to one
``socket.sendmsg``: a small ``bytes`` header, then the caller's data object
itself where there is one (a READ's data, a message), never copied into a
bigger ``bytes``.  Several replies gathered into one list go out in one
system call.

- ``simple_reply``: magic, error, cookie, and a READ's data when the error
  is 0.  The only reply without structured replies; with them, for any
  command but READ.
- ``chunk_*``: one structured reply chunk (magic, flags, type, cookie,
  length, payload); ``done`` sets NBD_REPLY_FLAG_DONE, which the last chunk
  of a reply carries.  ``chunk_done`` (NBD_REPLY_TYPE_NONE) is the final
  chunk when nothing else is; ``chunk_read`` (OFFSET_DATA) and
  ``chunk_hole`` (OFFSET_HOLE) answer READ; ``chunk_block_status`` answers
  BLOCK_STATUS, once per metadata context; ``chunk_error`` and
  ``chunk_error_offset`` carry an error and a message.
- ``read_reply_header``: the header alone of a successful READ's reply
  (simple, or its one final OFFSET_DATA chunk), the data to follow it.
- ``generic_reply``: the answer to a request that has no data, or that
  failed, as QEMU's ``nbd_send_generic_reply`` gives it: with structured
  replies an error is a final ERROR chunk (with the message), anything else
  a simple reply.

Errors are NBD error values (``system_errno_to_nbd_errno`` maps an errno).
A builder refuses, with ``LocalProtocolError``, a reply the protocol does
not allow: an empty OFFSET_DATA chunk, a hole or an extent of length 0,
an ERROR chunk whose error is 0.  A message longer than 4096 bytes
(NBD_MAX_STRING_SIZE) is cut to that length.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .._errors import LocalProtocolError
from ._constants import (
    NBD_MAX_STRING_SIZE,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_ERROR_OFFSET,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
)

__all__ = [
    "ReplyBuffer",
    "chunk_block_status",
    "chunk_done",
    "chunk_error",
    "chunk_error_offset",
    "chunk_hole",
    "chunk_read",
    "generic_reply",
    "read_reply_header",
    "simple_reply",
]

#: What a reply is made of: the headers built here and the caller's data.
ReplyBuffer = bytes | bytearray | memoryview

_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_CHUNK_READ = struct.Struct(">IHHQIQ")  # ... offset
_CHUNK_HOLE = struct.Struct(">IHHQIQI")  # ... offset, hole size
_CHUNK_ERROR = struct.Struct(">IHHQIIH")  # ... error, message length
_CHUNK_BLOCK_STATUS = struct.Struct(">IHHQII")  # ... context id
_U64 = struct.Struct(">Q")
_MAX_U32 = (1 << 32) - 1


def _nbytes(data: ReplyBuffer) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


def _message(message: str | bytes) -> bytes:
    """A message as sent: UTF-8, cut to 4096 bytes (NBD_MAX_STRING_SIZE) on a character boundary."""
    if isinstance(message, bytes):
        return message[:NBD_MAX_STRING_SIZE]
    raw = message.encode("utf-8", "replace")
    if len(raw) > NBD_MAX_STRING_SIZE:
        raw = raw[:NBD_MAX_STRING_SIZE].decode("utf-8", "ignore").encode("utf-8")
    return raw


def simple_reply(cookie: int, error: int = 0, data: ReplyBuffer | None = None) -> list[ReplyBuffer]:
    """A simple reply: its header, then ``data`` (a READ's, only when ``error`` is 0)."""
    header = _SIMPLE.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)
    if data is None or not _nbytes(data):
        return [header]
    if error:
        raise LocalProtocolError("a simple reply carries data only when it reports no error")
    return [header, data]


def read_reply_header(cookie: int, offset: int, length: int, structured_replies: bool) -> bytes:
    """The header that goes before a successful READ's ``length`` bytes (one
    or more) read at ``offset``: a simple reply's, or with structured replies
    a final OFFSET_DATA chunk's (what ``simple_reply`` and ``chunk_read`` put
    first).  For a server's fast path, which sends the data after it."""
    if structured_replies:
        return _CHUNK_READ.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA,
                                cookie, 8 + length, offset)
    return _SIMPLE.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie)


def chunk_done(cookie: int) -> list[ReplyBuffer]:
    """The final chunk that says nothing more (NBD_REPLY_TYPE_NONE)."""
    return [_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0)]


def chunk_read(cookie: int, offset: int, data: ReplyBuffer, done: bool = True) -> list[ReplyBuffer]:
    """An OFFSET_DATA chunk: ``data`` read at ``offset`` (at least one byte)."""
    length = _nbytes(data)
    if not length:
        raise LocalProtocolError("an OFFSET_DATA chunk carries at least one byte")
    header = _CHUNK_READ.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0,
                              NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset)
    return [header, data]


def chunk_hole(cookie: int, offset: int, hole_bytes: int, done: bool = True) -> list[ReplyBuffer]:
    """An OFFSET_HOLE chunk: ``hole_bytes`` (1 to 2^32 - 1) of zeroes at ``offset``."""
    if not 0 < hole_bytes <= _MAX_U32:
        raise LocalProtocolError(f"a hole of {hole_bytes} bytes does not fit an OFFSET_HOLE chunk")
    return [_CHUNK_HOLE.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0,
                             NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12, offset, hole_bytes)]


def chunk_error(cookie: int, error: int, message: str | bytes = b"", done: bool = True) -> list[ReplyBuffer]:
    """An ERROR chunk: a nonzero NBD error and a message for humans."""
    if not error:
        raise LocalProtocolError("an ERROR chunk carries a nonzero error")
    raw = _message(message)
    header = _CHUNK_ERROR.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0,
                               NBD_REPLY_TYPE_ERROR, cookie, 6 + len(raw), error, len(raw))
    return [header, raw] if raw else [header]


def chunk_error_offset(cookie: int, error: int, offset: int, message: str | bytes = b"",
                       done: bool = True) -> list[ReplyBuffer]:
    """An ERROR_OFFSET chunk: a nonzero NBD error at ``offset``, and a message."""
    if not error:
        raise LocalProtocolError("an ERROR_OFFSET chunk carries a nonzero error")
    raw = _message(message)
    header = _CHUNK_ERROR.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0,
                               NBD_REPLY_TYPE_ERROR_OFFSET, cookie, 14 + len(raw), error, len(raw))
    return [header, raw + _U64.pack(offset)]


def chunk_block_status(cookie: int, context_id: int, extents: Sequence[tuple[int, int]],
                       done: bool = True) -> list[ReplyBuffer]:
    """A BLOCK_STATUS chunk for one metadata context: ``extents`` as (length, flags)
    pairs, consecutive from the request's offset, each of nonzero length."""
    if not extents:
        raise LocalProtocolError("a BLOCK_STATUS chunk carries at least one extent")
    flat: list[int] = []
    for length, flags in extents:
        if not 0 < length <= _MAX_U32:
            raise LocalProtocolError(f"an extent of {length} bytes does not fit a BLOCK_STATUS chunk")
        flat += (length, flags)
    body = struct.pack(f">{len(flat)}I", *flat)
    header = _CHUNK_BLOCK_STATUS.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE if done else 0,
                                      NBD_REPLY_TYPE_BLOCK_STATUS, cookie, 4 + len(body), context_id)
    return [header, body]


def generic_reply(cookie: int, error: int, message: str | bytes, structured_replies: bool) -> list[ReplyBuffer]:
    """The reply to a request without data, or that failed (QEMU's nbd_send_generic_reply):
    a final ERROR chunk with ``message`` for an error under structured replies,
    else a simple reply."""
    if error and structured_replies:
        return chunk_error(cookie, error, message)
    return simple_reply(cookie, error)
