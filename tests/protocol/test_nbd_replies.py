"""The transmission phase's reply builders: every form round trips, data is not copied, bad replies are refused."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import LocalProtocolError
from protocol.nbd import (
    NBD_EINVAL,
    NBD_EIO,
    NBD_MAX_STRING_SIZE,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_ERROR_OFFSET,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_SIMPLE_REPLY_SIZE,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    NBD_STRUCTURED_REPLY_SIZE,
    ReplyBuffer,
    chunk_block_status,
    chunk_done,
    chunk_error,
    chunk_error_offset,
    chunk_hole,
    chunk_read,
    generic_reply,
    read_reply_header,
    simple_reply,
)
from tests.protocol.nbd_model import Chunk, SimpleReply, read_replies

COOKIES = st.integers(0, 2**64 - 1)
OFFSETS = st.integers(0, 2**64 - 1)
ERRORS = st.integers(1, 2**32 - 1)
MESSAGES = st.binary(max_size=100)


def joined(buffers: list[ReplyBuffer]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def one(buffers: list[ReplyBuffer], read_lengths: dict[int, int] | None = None) -> SimpleReply | Chunk:
    replies, rest = read_replies(joined(buffers), read_lengths or {})
    assert rest == b"" and len(replies) == 1
    return replies[0]


@settings(max_examples=200, deadline=None)
@given(COOKIES, st.integers(0, 2**32 - 1))
def test_simple_reply_without_data(cookie: int, error: int) -> None:
    buffers = simple_reply(cookie, error)
    assert len(buffers) == 1 and len(buffers[0]) == NBD_SIMPLE_REPLY_SIZE
    assert one(buffers) == SimpleReply(error, cookie, b"")


@settings(max_examples=200, deadline=None)
@given(COOKIES, st.binary(min_size=1, max_size=5000))
def test_simple_reply_to_a_read_carries_its_data_uncopied(cookie: int, data: bytes) -> None:
    view = memoryview(bytearray(data))
    buffers = simple_reply(cookie, 0, view)
    assert buffers[1] is view
    assert one(buffers, {cookie: len(data)}) == SimpleReply(0, cookie, data)


def test_simple_reply_with_an_error_carries_no_data() -> None:
    with pytest.raises(LocalProtocolError):
        simple_reply(1, NBD_EIO, b"data")
    assert simple_reply(1, NBD_EIO, b"") == simple_reply(1, NBD_EIO)


@settings(max_examples=200, deadline=None)
@given(COOKIES)
def test_chunk_done(cookie: int) -> None:
    (header,) = chunk_done(cookie)
    assert len(header) == NBD_STRUCTURED_REPLY_SIZE
    assert one([header]) == Chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie)


@settings(max_examples=200, deadline=None)
@given(COOKIES, OFFSETS, st.binary(min_size=1, max_size=5000), st.booleans())
def test_chunk_read_round_trips_with_its_data_uncopied(cookie: int, offset: int, data: bytes, done: bool) -> None:
    view = memoryview(data)[0:]
    buffers = chunk_read(cookie, offset, view, done)
    assert buffers[-1] is view
    chunk = one(buffers)
    assert chunk == Chunk(NBD_REPLY_FLAG_DONE if done else 0, NBD_REPLY_TYPE_OFFSET_DATA, cookie, offset=offset,
                          data=data)


@settings(max_examples=200, deadline=None)
@given(COOKIES, OFFSETS, st.integers(1, 2**25), st.booleans())
def test_read_reply_header_is_the_header_of_a_reads_reply(cookie: int, offset: int, length: int,
                                                          structured: bool) -> None:
    """The fast path's header is what ``simple_reply`` and ``chunk_read`` put before the data."""
    data = memoryview(bytes(length))
    expected = chunk_read(cookie, offset, data) if structured else simple_reply(cookie, 0, data)
    assert [read_reply_header(cookie, offset, length, structured), data] == expected


def test_chunk_read_counts_bytes_of_any_view() -> None:
    data = memoryview(bytes(range(16))).cast("I")  # 4 items, 16 bytes
    chunk = one(chunk_read(1, 0, data))
    assert isinstance(chunk, Chunk) and chunk.data == bytes(range(16))


@settings(max_examples=200, deadline=None)
@given(COOKIES, OFFSETS, st.integers(1, 2**32 - 1), st.booleans())
def test_chunk_hole_round_trips(cookie: int, offset: int, hole: int, done: bool) -> None:
    assert one(chunk_hole(cookie, offset, hole, done)) == Chunk(
        NBD_REPLY_FLAG_DONE if done else 0, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, offset=offset, hole_bytes=hole)


@settings(max_examples=200, deadline=None)
@given(COOKIES, ERRORS, MESSAGES, st.booleans())
def test_chunk_error_round_trips(cookie: int, error: int, message: bytes, done: bool) -> None:
    assert one(chunk_error(cookie, error, message, done)) == Chunk(
        NBD_REPLY_FLAG_DONE if done else 0, NBD_REPLY_TYPE_ERROR, cookie, error=error, message=message)


@settings(max_examples=200, deadline=None)
@given(COOKIES, ERRORS, OFFSETS, MESSAGES, st.booleans())
def test_chunk_error_offset_round_trips(cookie: int, error: int, offset: int, message: bytes, done: bool) -> None:
    assert one(chunk_error_offset(cookie, error, offset, message, done)) == Chunk(
        NBD_REPLY_FLAG_DONE if done else 0, NBD_REPLY_TYPE_ERROR_OFFSET, cookie, offset=offset, error=error,
        message=message)


@settings(max_examples=200, deadline=None)
@given(COOKIES, st.integers(0, 2**32 - 1),
       st.lists(st.tuples(st.integers(1, 2**32 - 1), st.integers(0, 2**32 - 1)), min_size=1, max_size=50),
       st.booleans())
def test_chunk_block_status_round_trips(cookie: int, context_id: int, extents: list[tuple[int, int]],
                                        done: bool) -> None:
    assert one(chunk_block_status(cookie, context_id, extents, done)) == Chunk(
        NBD_REPLY_FLAG_DONE if done else 0, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, context_id=context_id,
        extents=tuple(extents))


def test_messages_are_utf8_and_cut_to_4096_bytes() -> None:
    chunk = one(chunk_error(1, NBD_EIO, "é" * 3000))
    assert isinstance(chunk, Chunk)
    assert len(chunk.message) == NBD_MAX_STRING_SIZE and chunk.message.decode() == "é" * 2048
    chunk = one(chunk_error(1, NBD_EIO, "x" + "é" * 3000))
    assert isinstance(chunk, Chunk) and chunk.message.decode() == "x" + "é" * 2047  # no half character
    chunk = one(chunk_error_offset(1, NBD_EIO, 7, b"m" * 5000))
    assert isinstance(chunk, Chunk) and len(chunk.message) == NBD_MAX_STRING_SIZE and chunk.offset == 7


@pytest.mark.parametrize("build", [
    lambda: chunk_read(1, 0, b""),
    lambda: chunk_hole(1, 0, 0),
    lambda: chunk_hole(1, 0, 2**32),
    lambda: chunk_error(1, 0, "no error"),
    lambda: chunk_error_offset(1, 0, 0),
    lambda: chunk_block_status(1, 0, []),
    lambda: chunk_block_status(1, 0, [(0, NBD_STATE_HOLE)]),
    lambda: chunk_block_status(1, 0, [(2**32, NBD_STATE_ZERO)]),
])
def test_replies_the_protocol_does_not_allow_are_refused(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        build()  # type: ignore[operator]


@pytest.mark.parametrize(("error", "structured", "expected"), [
    (0, False, SimpleReply(0, 5, b"")),
    (0, True, SimpleReply(0, 5, b"")),
    (NBD_EINVAL, False, SimpleReply(NBD_EINVAL, 5, b"")),
    (NBD_EINVAL, True, Chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 5, error=NBD_EINVAL, message=b"why")),
])
def test_generic_reply_as_qemu(error: int, structured: bool, expected: SimpleReply | Chunk) -> None:
    assert one(generic_reply(5, error, "why", structured)) == expected


def test_replies_go_out_in_one_sendmsg() -> None:
    data = memoryview(bytearray(b"d" * 100_000))
    buffers: list[ReplyBuffer] = []
    buffers += chunk_read(1, 4096, data[:60_000], done=False)
    buffers += chunk_hole(1, 64_096, 4096, done=False)
    buffers += chunk_read(1, 68_192, data[60_000:], done=True)
    buffers += simple_reply(2, NBD_EIO)
    buffers += chunk_block_status(3, 0, [(4096, NBD_STATE_HOLE | NBD_STATE_ZERO), (8192, 0)])
    total = sum(memoryview(b).nbytes for b in buffers)
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(10)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sent = a.sendmsg(buffers)
        assert sent == total
        received = b""
        while len(received) < total:
            received += b.recv(total)
    replies, rest = read_replies(received, {})
    assert rest == b""
    assert [(r.cookie, type(r).__name__) for r in replies] == [(1, "Chunk")] * 3 + [(2, "SimpleReply"),
                                                                                    (3, "Chunk")]
    assert isinstance(replies[0], Chunk) and isinstance(replies[2], Chunk)
    assert replies[0].data + replies[2].data == bytes(data)
