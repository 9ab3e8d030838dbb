"""A client's side of NBD, written from the specification for the tests: what
clients send in the handshake, and a reader of what servers answer (option
replies, simple replies and structured chunks).  Independent of the codec it
tests: it shares only the constants with it."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from protocol.nbd import (
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_INIT_MAGIC,
    NBD_OPT_GO,
    NBD_OPTS_MAGIC,
    NBD_REP_MAGIC,
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

GREETING_SIZE = 18
CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES


def client_flags(flags: int = CLIENT_FLAGS) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"", *, length: int | None = None, magic: int = NBD_OPTS_MAGIC) -> bytes:
    """An option as a client sends it; ``length`` overrides the true data length."""
    return struct.pack(">QII", magic, opt, len(data) if length is None else length) + data


def string(value: bytes) -> bytes:
    """A 32-bit length and the bytes."""
    return struct.pack(">I", len(value)) + value


def info_data(name: bytes, requests: list[int] | tuple[int, ...] = ()) -> bytes:
    """NBD_OPT_INFO's and NBD_OPT_GO's data."""
    return string(name) + struct.pack(f">H{len(requests)}H", len(requests), *requests)


def meta_data(name: bytes, queries: list[bytes] | tuple[bytes, ...] = ()) -> bytes:
    """NBD_OPT_LIST_META_CONTEXT's and NBD_OPT_SET_META_CONTEXT's data."""
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def go(name: bytes, requests: tuple[int, ...] = ()) -> bytes:
    return option(NBD_OPT_GO, info_data(name, requests))


@dataclass(frozen=True)
class OptionReply:
    option: int
    type: int
    payload: bytes


@dataclass(frozen=True)
class ExportNameReply:
    size: int
    flags: int
    zeroes: bytes


@dataclass
class HandshakeOutput:
    """What a server said in a handshake: the greeting, its replies in order, and
    ``rest`` (bytes that are neither: a torn reply)."""

    handshake_flags: int
    replies: list[OptionReply | ExportNameReply] = field(default_factory=list)
    rest: bytes = b""


def read_handshake(data: bytes, greeting: bool = True) -> HandshakeOutput:
    """Split a server's handshake output into the greeting (unless ``greeting``
    is false: output that follows it) and its replies."""
    pos = 0
    hflags = -1
    if greeting:
        init, opts, hflags = struct.unpack_from(">QQH", data)
        assert (init, opts) == (NBD_INIT_MAGIC, NBD_OPTS_MAGIC), data[:18]
        pos = GREETING_SIZE
    out = HandshakeOutput(hflags)
    while pos < len(data):
        if len(data) - pos >= 20 and struct.unpack_from(">Q", data, pos)[0] == NBD_REP_MAGIC:
            _, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
            if len(data) - pos - 20 < length:
                break
            out.replies.append(OptionReply(opt, rtype, data[pos + 20:pos + 20 + length]))
            pos += 20 + length
        elif len(data) - pos in (10, 134):  # NBD_OPT_EXPORT_NAME's answer ends the handshake
            size, flags = struct.unpack_from(">QH", data, pos)
            out.replies.append(ExportNameReply(size, flags, data[pos + 10:]))
            pos = len(data)
        else:
            break
    out.rest = data[pos:]
    return out


# -- transmission replies -----------------------------------------------------------------------


@dataclass(frozen=True)
class SimpleReply:
    error: int
    cookie: int
    data: bytes


@dataclass(frozen=True)
class Chunk:
    """A structured reply chunk, its payload decoded by type."""

    flags: int
    type: int
    cookie: int
    offset: int | None = None
    data: bytes = b""
    hole_bytes: int | None = None
    error: int | None = None
    message: bytes = b""
    context_id: int | None = None
    extents: tuple[tuple[int, int], ...] = ()

    @property
    def done(self) -> bool:
        return bool(self.flags & NBD_REPLY_FLAG_DONE)


def read_replies(data: bytes, read_lengths: dict[int, int]) -> tuple[list[SimpleReply | Chunk], bytes]:
    """The replies in ``data``, and the bytes of a torn one at its end.  A simple
    reply to a READ carries data: ``read_lengths`` maps the cookies of READs to
    their lengths (the client remembers what it asked)."""
    out: list[SimpleReply | Chunk] = []
    pos = 0
    while len(data) - pos >= 4:
        (magic,) = struct.unpack_from(">I", data, pos)
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            if len(data) - pos < 16:
                break
            _, error, cookie = struct.unpack_from(">IIQ", data, pos)
            length = read_lengths.get(cookie, 0) if not error else 0
            if len(data) - pos - 16 < length:
                break
            out.append(SimpleReply(error, cookie, data[pos + 16:pos + 16 + length]))
            pos += 16 + length
        elif magic == NBD_STRUCTURED_REPLY_MAGIC:
            if len(data) - pos < 20:
                break
            _, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", data, pos)
            if len(data) - pos - 20 < length:
                break
            out.append(_chunk(flags, rtype, cookie, data[pos + 20:pos + 20 + length]))
            pos += 20 + length
        else:
            raise AssertionError(f"bad reply magic 0x{magic:x} at {pos}")
    return out, data[pos:]


def _chunk(flags: int, rtype: int, cookie: int, payload: bytes) -> Chunk:
    if rtype == NBD_REPLY_TYPE_NONE:
        assert payload == b""
        return Chunk(flags, rtype, cookie)
    if rtype == NBD_REPLY_TYPE_OFFSET_DATA:
        assert len(payload) >= 9
        return Chunk(flags, rtype, cookie, offset=struct.unpack_from(">Q", payload)[0], data=payload[8:])
    if rtype == NBD_REPLY_TYPE_OFFSET_HOLE:
        assert len(payload) == 12
        offset, hole = struct.unpack(">QI", payload)
        return Chunk(flags, rtype, cookie, offset=offset, hole_bytes=hole)
    if rtype in (NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET):
        error, mlen = struct.unpack_from(">IH", payload)
        tail = 8 if rtype == NBD_REPLY_TYPE_ERROR_OFFSET else 0
        assert len(payload) == 6 + mlen + tail
        offset = struct.unpack_from(">Q", payload, 6 + mlen)[0] if tail else None
        return Chunk(flags, rtype, cookie, offset=offset, error=error, message=payload[6:6 + mlen])
    if rtype == NBD_REPLY_TYPE_BLOCK_STATUS:
        assert len(payload) >= 12 and (len(payload) - 4) % 8 == 0
        (context_id,) = struct.unpack_from(">I", payload)
        flat = struct.unpack_from(f">{(len(payload) - 4) // 4}I", payload, 4)
        return Chunk(flags, rtype, cookie, context_id=context_id,
                     extents=tuple(zip(flat[::2], flat[1::2])))
    raise AssertionError(f"unknown chunk type {rtype}")
