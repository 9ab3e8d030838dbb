"""The transmission phase's request decoder: round trips, truncations, splits, and QEMU's refusals."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import NbdRequest, NbdRequestDecoder, RemoteProtocolError, StateError
from protocol.nbd import (
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
    NBD_REQUEST_SIZE,
    encode_request,
)

SIZE = 1 << 20
# The flags each command takes, with structured replies (DF for READ).
VALID_FLAGS = {
    NBD_CMD_READ: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
    NBD_CMD_WRITE: NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH: NBD_CMD_FLAG_FUA,
    NBD_CMD_TRIM: NBD_CMD_FLAG_FUA,
    NBD_CMD_CACHE: NBD_CMD_FLAG_FUA,
    NBD_CMD_WRITE_ZEROES: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_BLOCK_STATUS: NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
}


def decoder(**kwargs: object) -> NbdRequestDecoder:
    args: dict[str, object] = {"structured_replies": True, "meta_contexts": 1}
    args.update(kwargs)
    size = args.pop("size_bytes", SIZE)
    return NbdRequestDecoder(size, **args)  # type: ignore[arg-type]


def feed_all(dec: NbdRequestDecoder, *chunks: bytes) -> list[NbdRequest]:
    out: list[NbdRequest] = []
    for chunk in chunks:
        out += dec.feed(chunk)
    return out


@st.composite
def valid_requests(draw: st.DrawFn) -> NbdRequest:
    command = draw(st.sampled_from(sorted(VALID_FLAGS)))
    flags = draw(st.integers(0, 0x1F)) & VALID_FLAGS[command]
    least = 1 if command == NBD_CMD_BLOCK_STATUS else 0  # BLOCK_STATUS of length 0 is refused
    offset = draw(st.integers(0, SIZE - least))
    length = draw(st.integers(least, max(least, min(SIZE - offset, 3000))))
    cookie = draw(st.integers(0, 2**64 - 1))
    payload = memoryview(draw(st.binary(min_size=length, max_size=length))) if command == NBD_CMD_WRITE else None
    return NbdRequest(command, flags, cookie, offset, length, payload)


def wire(request: NbdRequest) -> bytes:
    return encode_request(request.command, request.cookie, request.offset, request.length, request.flags,
                          bytes(request.payload) if request.payload is not None else b"")


# -- round trips, truncations, splits -------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(valid_requests())
def test_every_request_form_round_trips(request: NbdRequest) -> None:
    assert decoder().feed(wire(request)) == [request]


@settings(max_examples=200, deadline=None)
@given(st.lists(valid_requests(), min_size=1, max_size=6))
def test_every_truncation_needs_more_and_never_fails(requests: list[NbdRequest]) -> None:
    stream = b"".join(wire(r) for r in requests)
    ends = []
    pos = 0
    for r in requests:
        pos += len(wire(r))
        ends.append(pos)
    for cut in range(len(stream) + 1):
        dec = decoder()
        got = dec.feed(stream[:cut])
        assert got == [r for r, end in zip(requests, ends) if end <= cut]
        assert dec.error is None and not dec.closed
        assert got + dec.feed(stream[cut:]) == requests


@settings(max_examples=300, deadline=None)
@given(st.lists(valid_requests(), max_size=8), st.data())
def test_any_split_into_reads_gives_the_same_requests(requests: list[NbdRequest], data: st.DataObject) -> None:
    stream = b"".join(wire(r) for r in requests)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert feed_all(decoder(), *pieces) == requests


def test_a_whole_write_payload_is_a_view_of_the_bytes_fed() -> None:
    data = encode_request(NBD_CMD_WRITE, 1, 0, 4096, payload=b"a" * 4096) * 3
    got = decoder().feed(data)
    assert len(got) == 3
    for r in got:
        assert isinstance(r.payload, memoryview) and r.payload.obj is data and r.payload == b"a" * 4096


def test_a_payload_read_straight_into_its_buffer() -> None:
    """recv_into the decoder's buffer: the payload is never copied."""
    dec = decoder()
    payload = bytes(range(256)) * 64
    data = encode_request(NBD_CMD_WRITE, 9, 512, len(payload), NBD_CMD_FLAG_FUA, payload)
    assert dec.payload_buffer() is None
    assert dec.feed(data[:NBD_REQUEST_SIZE + 100]) == []
    buf = dec.payload_buffer()
    assert buf is not None and len(buf) == len(payload) - 100
    buf[:1000] = payload[100:1100]
    assert dec.payload_received(1000) == []
    buf = dec.payload_buffer()
    assert buf is not None
    buf[:] = payload[1100:]
    (r,) = dec.payload_received(len(buf))
    assert (r.command, r.cookie, r.offset, r.flags, r.payload) == (NBD_CMD_WRITE, 9, 512, NBD_CMD_FLAG_FUA, payload)
    assert dec.payload_buffer() is None
    with pytest.raises(StateError):
        dec.payload_received(1)
    assert dec.feed(encode_request(NBD_CMD_FLUSH, 10, 0, 0)) == [NbdRequest(NBD_CMD_FLUSH, 0, 10, 0, 0)]


def test_a_zero_length_write_has_an_empty_payload() -> None:
    (r,) = decoder().feed(encode_request(NBD_CMD_WRITE, 1, SIZE, 0))
    assert r.error == 0 and r.payload == b""


# -- refusals: QEMU's checks, in QEMU's order -------------------------------------------------------


def refused(message: str, request: NbdRequest) -> None:
    assert (request.error, request.message) == (NBD_EINVAL, message)


def test_bad_magic_is_answered_then_the_stream_stops() -> None:
    """As QEMU: the 28 bytes are answered EINVAL with the cookie they hold, then nothing more."""
    good = encode_request(NBD_CMD_FLUSH, 1, 0, 0)
    bad = struct.pack(">IHHQQI", 0x12560953, 0, NBD_CMD_READ, 2, 0, 512)
    dec = decoder()
    got = dec.feed(good + bad + good)
    message = "invalid magic (got 0x12560953, expected 0x25609513)"
    assert got == [NbdRequest(NBD_CMD_FLUSH, 0, 1, 0, 0),
                   NbdRequest(NBD_CMD_READ, 0, 2, 0, 512, None, NBD_EINVAL, message)]
    assert isinstance(dec.error, RemoteProtocolError) and dec.closed
    assert str(dec.error) == message and dec.error.raw == bad
    assert dec.feed(good) == []


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1).filter(lambda m: m != 0x25609513), st.integers(0, NBD_REQUEST_SIZE - 1))
def test_every_bad_magic_is_refused_however_it_is_split(magic: int, cut: int) -> None:
    bad = struct.pack(">IHHQQI", magic, 0, NBD_CMD_READ, 2, 0, 512)
    dec = decoder()
    assert dec.feed(bad[:cut]) == []  # a torn header is never answered
    (r,) = dec.feed(bad[cut:])
    assert (r.cookie, r.error) == (2, NBD_EINVAL) and dec.error is not None


@pytest.mark.parametrize("command", [8, 9, 100, 0xFFFF])
def test_unknown_commands_are_answered_einval_and_the_stream_goes_on(command: int) -> None:
    dec = decoder()
    got = dec.feed(encode_request(command, 5, 0, 100) + encode_request(NBD_CMD_FLUSH, 6, 0, 0))
    refused(f"invalid request type ({command}) received", got[0])
    assert got[1] == NbdRequest(NBD_CMD_FLUSH, 0, 6, 0, 0) and dec.error is None


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(VALID_FLAGS)), st.integers(0, 0xFFFF), st.booleans())
def test_flags_a_command_does_not_take_are_refused(command: int, flags: int, structured: bool) -> None:
    valid = VALID_FLAGS[command] & ~(0 if structured else NBD_CMD_FLAG_DF)
    payload = b"x" * 8 if command == NBD_CMD_WRITE else b""
    length = 8 if command in (NBD_CMD_WRITE, NBD_CMD_BLOCK_STATUS) else 0
    dec = decoder(structured_replies=structured)
    got = dec.feed(encode_request(command, 3, 0, length, flags, payload) + encode_request(NBD_CMD_FLUSH, 4, 0, 0))
    assert [r.cookie for r in got] == [3, 4]
    if flags & ~valid:
        names = {NBD_CMD_READ: "read", NBD_CMD_WRITE: "write", NBD_CMD_FLUSH: "flush", NBD_CMD_TRIM: "trim",
                 NBD_CMD_CACHE: "cache", NBD_CMD_WRITE_ZEROES: "write zeroes",
                 NBD_CMD_BLOCK_STATUS: "block status"}
        refused(f"unsupported flags for command {names[command]} (got 0x{flags:x})", got[0])
        assert got[0].payload is None
    else:
        assert got[0].error == 0


@pytest.mark.parametrize("command", [NBD_CMD_READ, NBD_CMD_CACHE])
def test_reads_and_caches_over_32_mib_are_refused(command: int) -> None:
    dec = decoder(size_bytes=1 << 40)
    got = dec.feed(encode_request(command, 1, 0, NBD_MAX_BUFFER_SIZE + 1)
                   + encode_request(command, 2, 0, NBD_MAX_BUFFER_SIZE))
    refused(f"len ({NBD_MAX_BUFFER_SIZE + 1}) is larger than max len ({NBD_MAX_BUFFER_SIZE})", got[0])
    assert got[1].error == 0 and dec.error is None


@pytest.mark.parametrize("command", [NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES, NBD_CMD_BLOCK_STATUS])
def test_commands_without_payload_may_be_longer_than_32_mib(command: int) -> None:
    (r,) = decoder(size_bytes=1 << 40).feed(encode_request(command, 1, 0, 2**32 - 1))
    assert r.error == 0


def test_a_write_over_32_mib_is_answered_then_the_stream_stops() -> None:
    dec = decoder(size_bytes=1 << 40)
    got = dec.feed(encode_request(NBD_CMD_FLUSH, 1, 0, 0) + encode_request(NBD_CMD_WRITE, 2, 0, NBD_MAX_BUFFER_SIZE + 1)
                   + b"payload...")
    assert got[0].error == 0
    refused(f"len ({NBD_MAX_BUFFER_SIZE + 1}) is larger than max len ({NBD_MAX_BUFFER_SIZE})", got[1])
    assert got[1].payload is None and len(got) == 2
    assert dec.error is not None and dec.closed and dec.payload_buffer() is None
    assert dec.feed(encode_request(NBD_CMD_FLUSH, 3, 0, 0)) == []


def test_a_read_only_export_refuses_writes_trims_and_zeroes_and_stays_in_step() -> None:
    dec = decoder(read_only=True)
    payload = b"w" * 10_000
    write = encode_request(NBD_CMD_WRITE, 1, 0, len(payload), 0, payload)
    stream = (write + encode_request(NBD_CMD_TRIM, 2, 0, 512) + encode_request(NBD_CMD_WRITE_ZEROES, 3, 0, 512)
              + encode_request(NBD_CMD_READ, 4, 0, 512))
    got = feed_all(dec, stream[:100], stream[100:5000], stream[5000:])
    for r in got[:3]:
        refused("Export is read-only", r)
    assert got[0].payload is None
    assert got[3] == NbdRequest(NBD_CMD_READ, 0, 4, 0, 512)


def test_a_refused_payload_is_dropped_not_buffered() -> None:
    dec = decoder(read_only=True)
    header = encode_request(NBD_CMD_WRITE, 1, 0, NBD_MAX_BUFFER_SIZE)
    assert dec.feed(header) == []
    assert dec.payload_buffer() is None  # nothing was allocated for it
    chunk = bytes(1 << 20)
    got: list[NbdRequest] = []
    for _ in range(NBD_MAX_BUFFER_SIZE // len(chunk)):
        got += dec.feed(chunk)
    refused("Export is read-only", got[0])


@pytest.mark.parametrize(("command", "offset", "length"), [
    (NBD_CMD_READ, SIZE, 1), (NBD_CMD_READ, SIZE + 1, 0), (NBD_CMD_TRIM, 2**64 - 1, 2**32 - 1),
    (NBD_CMD_WRITE, SIZE - 1, 2), (NBD_CMD_TRIM, 0, SIZE + 1), (NBD_CMD_WRITE_ZEROES, SIZE, 1),
    (NBD_CMD_FLUSH, SIZE + 1, 0), (NBD_CMD_CACHE, 512, SIZE), (NBD_CMD_BLOCK_STATUS, SIZE, 1),
    (77, SIZE, 1),
])
def test_requests_past_the_end_are_refused(command: int, offset: int, length: int) -> None:
    payload = b"p" * length if command == NBD_CMD_WRITE else b""
    dec = decoder()
    got = dec.feed(encode_request(command, 1, offset, length, 0, payload) + encode_request(NBD_CMD_FLUSH, 2, 0, 0))
    refused(f"operation past EOF; From: {offset}, Len: {length}, Size: {SIZE}", got[0])
    assert got[1].error == 0


def test_requests_at_the_end_are_taken() -> None:
    got = decoder().feed(encode_request(NBD_CMD_READ, 1, SIZE, 0) + encode_request(NBD_CMD_TRIM, 2, 0, SIZE))
    assert [r.error for r in got] == [0, 0]


def test_block_status_needs_a_context_and_a_length() -> None:
    got = decoder(meta_contexts=0).feed(encode_request(NBD_CMD_BLOCK_STATUS, 1, 0, 0))
    refused("CMD_BLOCK_STATUS not negotiated", got[0])
    got = decoder(meta_contexts=2).feed(encode_request(NBD_CMD_BLOCK_STATUS, 1, 0, 0)
                                        + encode_request(NBD_CMD_BLOCK_STATUS, 2, 0, 4096, NBD_CMD_FLAG_REQ_ONE))
    refused("need non-zero length", got[0])
    assert got[1].error == 0


def test_checks_come_in_qemus_order() -> None:
    """Length before read-only before bounds before flags before the command's own checks."""
    ro = decoder(read_only=True, size_bytes=1 << 40, meta_contexts=0)
    cases = [
        (encode_request(NBD_CMD_READ, 1, 1 << 41, NBD_MAX_BUFFER_SIZE + 1, 0xFF), "len ("),
        (encode_request(NBD_CMD_TRIM, 1, 1 << 41, 1, 0xFF), "Export is read-only"),
        (encode_request(NBD_CMD_FLUSH, 1, 1 << 41, 1, 0xFF), "operation past EOF"),
        (encode_request(55, 1, 0, 1, 0xFF), "unsupported flags for command <unknown> (got 0xff)"),
        (encode_request(NBD_CMD_BLOCK_STATUS, 1, 0, 0, 0xFF), "unsupported flags"),
        (encode_request(NBD_CMD_BLOCK_STATUS, 1, 0, 0), "CMD_BLOCK_STATUS not negotiated"),
    ]
    for data, start in cases:
        (r,) = ro.feed(data)
        assert r.error == NBD_EINVAL and r.message.startswith(start), (start, r.message)


def test_disconnect_ends_the_stream() -> None:
    dec = decoder()
    got = dec.feed(encode_request(NBD_CMD_FLUSH, 1, 0, 0) + encode_request(NBD_CMD_DISC, 2, 99, 99, 0xFF)
                   + encode_request(NBD_CMD_FLUSH, 3, 0, 0))
    assert [(r.command, r.error) for r in got] == [(NBD_CMD_FLUSH, 0), (NBD_CMD_DISC, 0)]
    assert dec.disconnected and dec.closed and dec.error is None
    assert dec.feed(encode_request(NBD_CMD_FLUSH, 4, 0, 0)) == []


MAGIC = struct.pack(">I", 0x25609513)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200) | st.binary(max_size=200).map(lambda d: MAGIC + d)
       | st.lists(st.binary(min_size=24, max_size=24).map(lambda d: MAGIC + d), max_size=6).map(b"".join),
       st.booleans(), st.booleans())
def test_any_bytes_never_raise(data: bytes, read_only: bool, structured: bool) -> None:
    dec = decoder(read_only=read_only, structured_replies=structured)
    for r in dec.feed(data):
        assert r.error in (0, NBD_EINVAL) and (r.error == 0 or r.message)
        assert r.payload is None or (r.error == 0 and len(r.payload) == r.length)
