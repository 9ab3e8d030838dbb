"""The client's side of the NBD codec: the handshake against the server's
codec, byte for byte and split anywhere; the simple-reply decoder against the
reply builders (round trips, every truncation, every bad reply); URIs against
the ones the launcher writes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mainloop.nbd import nbd_uri
from protocol import LocalProtocolError, StateError
from protocol.nbd import (
    NBD_CMD_READ,
    NBD_EINVAL,
    NBD_EIO,
    NBD_EPERM,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_READ_ONLY,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_EXPORT,
    NBD_INIT_MAGIC,
    NBD_OPT_GO,
    NBD_OPT_LIST,
    NBD_OPTS_MAGIC,
    NBD_REP_ACK,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_NONE,
    NBD_SIMPLE_REPLY_MAGIC,
    NbdClientHandshake,
    NbdClientState,
    NbdExport,
    NbdHandshakeState,
    NbdReplyDecoder,
    NbdRequestDecoder,
    NbdServerHandshake,
    NbdSimpleReply,
    NbdUri,
    encode_request,
    parse_nbd_uri,
    simple_reply,
)

NAMES = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=40)
EXPORTS = st.builds(NbdExport, name=NAMES, size_bytes=st.integers(0, 2**63 - 1), read_only=st.booleans(),
                    description=st.none() | NAMES)


def option_reply(reply_type: int, payload: bytes = b"", option: int = NBD_OPT_GO) -> bytes:
    return struct.pack(">QIII", NBD_REP_MAGIC, option, reply_type, len(payload)) + payload


GREETING = struct.pack(">QQH", NBD_INIT_MAGIC, NBD_OPTS_MAGIC, NBD_FLAG_FIXED_NEWSTYLE)
INFO_EXPORT = option_reply(NBD_REP_INFO, struct.pack(">HQH", NBD_INFO_EXPORT, 1 << 20, 1))


def run(client: NbdClientHandshake, server: NbdServerHandshake, chunk: int) -> None:
    """Each side's output to the other, ``chunk`` bytes at a time, until neither has more to say."""
    while True:
        moved = False
        out = server.data_to_send()
        if out and client.state is NbdClientState.NEGOTIATING:
            for i in range(0, len(out), chunk):
                client.receive_data(out[i:i + chunk])
            server.data_sent(len(out))
            moved = True
        out = client.data_to_send()
        if out and server.state is NbdHandshakeState.NEGOTIATING:
            for i in range(0, len(out), chunk):
                server.receive_data(out[i:i + chunk])
            client.data_sent(len(out))
            moved = True
        if not moved:
            return


@given(export=EXPORTS, chunk=st.integers(1, 64))
def test_go_against_the_server_codec_split_anywhere(export: NbdExport, chunk: int) -> None:
    server = NbdServerHandshake({export.name: export})
    client = NbdClientHandshake(export.name)
    run(client, server, chunk)
    assert client.state is NbdClientState.TRANSMISSION, client.close_reason
    assert server.state is NbdHandshakeState.TRANSMISSION and server.negotiated is not None
    assert client.size_bytes == export.size_bytes
    assert client.transmission_flags == server.negotiated.transmission_flags
    assert bool(client.transmission_flags & NBD_FLAG_READ_ONLY) == export.read_only
    assert not server.negotiated.structured_replies  # every reply will be a simple one
    assert client.unused_data == b"" and client.data_to_send() == b""


def test_the_client_sends_its_flags_and_one_go_with_no_information_requests() -> None:
    client = NbdClientHandshake("disk0")
    assert client.data_to_send() == b""  # nothing before the greeting
    client.receive_data(struct.pack(">QQH", NBD_INIT_MAGIC, NBD_OPTS_MAGIC, NBD_FLAG_FIXED_NEWSTYLE | 2))
    data = b"disk0"
    assert client.data_to_send() == (struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
                                     + struct.pack(">QII", NBD_OPTS_MAGIC, NBD_OPT_GO, 4 + len(data) + 2)
                                     + struct.pack(">I", len(data)) + data + struct.pack(">H", 0))
    client.data_sent(4)
    assert client.data_to_send()[:8] == struct.pack(">Q", NBD_OPTS_MAGIC)
    with pytest.raises(LocalProtocolError):
        client.data_sent(1000)
    # Without NO_ZEROES offered, the client does not claim it.
    other = NbdClientHandshake("x")
    other.receive_data(GREETING)
    assert other.data_to_send()[:4] == struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE)


def test_other_information_is_skipped_and_the_export_comes_from_info_export() -> None:
    client = NbdClientHandshake("d")
    block_sizes = struct.pack(">HIII", NBD_INFO_BLOCK_SIZE, 1, 4096, 1 << 25)
    client.receive_data(GREETING + option_reply(NBD_REP_INFO, block_sizes)
                        + INFO_EXPORT + option_reply(NBD_REP_ACK) + b"extra")
    assert client.state is NbdClientState.TRANSMISSION
    assert (client.size_bytes, client.transmission_flags) == (1 << 20, 1)
    assert client.unused_data == b"extra"
    with pytest.raises(StateError):
        client.receive_data(b"more")


def test_an_unknown_export_closes_with_the_servers_words() -> None:
    server = NbdServerHandshake({"disk0": NbdExport("disk0", size_bytes=512)})
    client = NbdClientHandshake("nope")
    run(client, server, 7)
    assert client.state is NbdClientState.CLOSED
    assert client.close_reason == "export 'nope': NBD_REP_ERR_UNKNOWN: export 'nope' not present"


@pytest.mark.parametrize(("server_bytes", "reason"), [
    (b"NOTNBD!!", "not an NBD server (bad greeting magic)"),
    (struct.pack(">QQH", NBD_INIT_MAGIC, 0x00420281861253, 0), "oldstyle handshake"),
    (struct.pack(">QQH", NBD_INIT_MAGIC, 1, 0), "bad greeting: 0x1 where the newstyle magic belongs"),
    (struct.pack(">QQH", NBD_INIT_MAGIC, NBD_OPTS_MAGIC, 0), "does not speak the fixed newstyle handshake"),
    (GREETING + struct.pack(">QIII", 1, NBD_OPT_GO, NBD_REP_ACK, 0), "bad option reply magic 0x1"),
    (GREETING + option_reply(NBD_REP_ACK, option=NBD_OPT_LIST), "a reply to option 3"),
    (GREETING + struct.pack(">QIII", NBD_REP_MAGIC, NBD_OPT_GO, NBD_REP_INFO, 1 << 31),
     "an option reply of 2147483648"),
    (GREETING + option_reply(NBD_REP_ACK), "acknowledged without NBD_INFO_EXPORT"),
    (GREETING + INFO_EXPORT + option_reply(NBD_REP_ACK, b"x"), "an NBD_REP_ACK with data"),
    (GREETING + option_reply(NBD_REP_INFO, b"\0"), "without its information type"),
    (GREETING + option_reply(NBD_REP_INFO, struct.pack(">HQ", NBD_INFO_EXPORT, 1)),
     "an NBD_INFO_EXPORT of 10"),
    (GREETING + option_reply(99), "reply type 99 to NBD_OPT_GO"),
    (GREETING + option_reply(NBD_REP_ERR_UNKNOWN), "export 'd': NBD_REP_ERR_UNKNOWN"),
    (GREETING + option_reply(0x8000_0063, b"why"), "export 'd': error reply 0x80000063: why"),
])
def test_a_broken_server_closes_the_handshake_with_a_reason(server_bytes: bytes, reason: str) -> None:
    client = NbdClientHandshake("d")
    client.receive_data(server_bytes)
    assert client.state is NbdClientState.CLOSED and reason in str(client.close_reason)
    client.receive_data(b"ignored")  # closed: input is dropped, nothing raises
    assert client.state is NbdClientState.CLOSED


@given(st.binary(max_size=200), st.integers(1, 50))
def test_no_server_output_makes_the_handshake_raise(data: bytes, chunk: int) -> None:
    client = NbdClientHandshake("d")
    for i in range(0, len(data), chunk):
        client.receive_data(data[i:i + chunk])
    if client.state is NbdClientState.NEGOTIATING:
        client.receive_data(b"")
    assert client.state is NbdClientState.CLOSED  # random bytes never make a server's acknowledgement


def test_every_truncation_of_the_servers_output_is_waited_for_then_a_hang_up_closes() -> None:
    stream = GREETING + INFO_EXPORT + option_reply(NBD_REP_ACK)
    for cut in range(len(stream)):
        client = NbdClientHandshake("d")
        if cut:
            client.receive_data(stream[:cut])
        assert client.state is NbdClientState.NEGOTIATING, cut
        client.receive_data(b"")
        assert client.close_reason == "the server closed the connection during the handshake"


def test_a_name_nbd_cannot_carry_is_refused_up_front() -> None:
    for name in ("a\0b", "x" * 4097):
        with pytest.raises(LocalProtocolError):
            NbdClientHandshake(name)


# -- replies -------------------------------------------------------------------------------------

ERRORS = st.sampled_from([0, 0, NBD_EIO, NBD_EINVAL, NBD_EPERM])
REPLIES = st.lists(st.tuples(st.integers(0, 2**64 - 1), ERRORS, st.binary(max_size=300)),
                   unique_by=lambda r: r[0], max_size=12)


def announced(replies: list[tuple[int, int, bytes]]) -> tuple[NbdReplyDecoder, bytes]:
    """A decoder told of each request, and the server's replies to them, end to end
    (a request with data was a READ of that length; one without, anything else)."""
    decoder = NbdReplyDecoder()
    stream = b""
    for cookie, error, data in replies:
        decoder.expect(cookie, len(data))
        stream += b"".join(simple_reply(cookie, error, None if error else data))
    return decoder, stream


def expected(replies: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes | None]]:
    return [(cookie, error, None if error or not data else data) for cookie, error, data in replies]


def seen(got: list[NbdSimpleReply]) -> list[tuple[int, int, bytes | None]]:
    return [(r.cookie, r.error, None if r.data is None else bytes(r.data)) for r in got]


@given(replies=REPLIES, cuts=st.lists(st.integers(0, 5000), max_size=8))
def test_replies_round_trip_however_the_stream_is_split(replies: list[tuple[int, int, bytes]],
                                                        cuts: list[int]) -> None:
    decoder, stream = announced(replies)
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    got: list[NbdSimpleReply] = []
    for a, b in zip(points, points[1:]):
        got += decoder.feed(stream[a:b])
    assert seen(got) == expected(replies)
    assert decoder.error is None and decoder.in_flight == 0


@given(replies=REPLIES)
def test_every_truncation_gives_the_replies_completed_so_far(replies: list[tuple[int, int, bytes]]) -> None:
    _, stream = announced(replies)
    ends = [0]
    for _, error, data in replies:
        ends.append(ends[-1] + 16 + (0 if error else len(data)))
    for cut in range(0, len(stream) + 1, 7):
        decoder, _ = announced(replies)
        got = decoder.feed(stream[:cut])
        assert seen(got) == expected(replies)[:sum(1 for e in ends[1:] if e <= cut)]
        assert decoder.error is None


def test_a_read_whole_in_one_feed_is_a_view_of_it() -> None:
    decoder = NbdReplyDecoder()
    decoder.expect(7, 4)
    data = b"".join(simple_reply(7, 0, b"abcd"))
    (reply,) = decoder.feed(data)
    assert reply.data is not None and reply.data.obj is data and bytes(reply.data) == b"abcd"


@pytest.mark.parametrize(("stream", "message"), [
    (struct.pack(">IIQ", 0x12345678, 0, 1), "bad reply magic 0x12345678"),
    (struct.pack(">IHHQI", 0x668E33EF, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 1, 0),
     "structured replies were not negotiated"),
    (struct.pack(">IIQ", NBD_SIMPLE_REPLY_MAGIC, 0, 99), "a reply to cookie 99, which no request in flight"),
    (struct.pack(">IIQ", NBD_SIMPLE_REPLY_MAGIC, 0, 1) * 2, "a reply to cookie 1, which no request in"),
])
def test_a_reply_nobody_can_place_stops_the_decoder(stream: bytes, message: str) -> None:
    decoder = NbdReplyDecoder()
    decoder.expect(1)
    got = decoder.feed(stream)
    assert decoder.error is not None and message in str(decoder.error)
    assert decoder.feed(b"".join(simple_reply(1))) == []  # nothing more once stopped
    assert len(got) == (1 if stream.count(struct.pack(">I", NBD_SIMPLE_REPLY_MAGIC)) == 2 else 0)


def test_a_cookie_announced_twice_or_a_negative_read_is_the_callers_mistake() -> None:
    decoder = NbdReplyDecoder()
    decoder.expect(1, 512)
    with pytest.raises(StateError):
        decoder.expect(1)
    with pytest.raises(LocalProtocolError):
        decoder.expect(2, -1)


@given(st.binary(max_size=300), st.integers(1, 40))
def test_no_stream_makes_the_decoder_raise(data: bytes, chunk: int) -> None:
    decoder = NbdReplyDecoder()
    for cookie in range(4):
        decoder.expect(cookie, 8 * cookie)
    for i in range(0, len(data), chunk):
        decoder.feed(data[i:i + chunk])


def test_requests_encoded_for_the_server_are_what_its_decoder_reads() -> None:
    (request,) = NbdRequestDecoder(1 << 20).feed(encode_request(NBD_CMD_READ, 5, 4096, 512))
    assert (request.command, request.cookie, request.offset, request.length, request.error) == (
        NBD_CMD_READ, 5, 4096, 512, 0)


# -- URIs -----------------------------------------------------------------------------------------

PATHS = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=60)


@given(name=NAMES, path=PATHS)
def test_unix_uris_the_launcher_writes_parse_back(name: str, path: str) -> None:
    assert parse_nbd_uri(nbd_uri(name, ("unix", path, 0))) == NbdUri(name, socket_path=path)


@given(name=NAMES, host=st.sampled_from(["127.0.0.1", "::1", "localhost", "fe80::1"]),
       port=st.integers(1, 65535))
def test_inet_uris_the_launcher_writes_parse_back(name: str, host: str, port: int) -> None:
    assert parse_nbd_uri(nbd_uri(name, ("inet", host, port))) == NbdUri(name, host=host, port=port)


def test_uris_as_people_write_them() -> None:
    assert parse_nbd_uri("nbd://example.org") == NbdUri("", host="example.org", port=10809)
    assert parse_nbd_uri("nbd://h:99/a%2Fb") == NbdUri("a/b", host="h", port=99)
    assert parse_nbd_uri("nbd+unix:///?socket=/s+t") == NbdUri("", socket_path="/s+t")


@pytest.mark.parametrize(("uri", "message"), [
    ("/tmp/disk.img", "is not an NBD URI"),
    ("http://h/x", "is not an NBD URI"),
    ("nbds://h/x", "NBD over TLS is not supported"),
    ("nbd+unix:///x", "takes one query parameter, socket=PATH"),
    ("nbd+unix:///x?socket=/a&tls=on", "takes one query parameter"),
    ("nbd+unix:///x?socket=/a&socket=/b", "query parameter socket given twice"),
    ("nbd+unix:///x?socket", "query parameter 'socket' has no value"),
    ("nbd+unix://h/x?socket=/a", "names no host"),
    ("nbd:///x", "names its host"),
    ("nbd://h:99999/x", "is not an NBD URI: Port out of range"),
    ("nbd://h/x?tls=on", "query parameters tls are not supported"),
    ("nbd://h/x#frag", "has no fragment"),
    ("nbd://h/%ff", "a percent-encoded part is not UTF-8"),
])
def test_bad_uris_are_refused_saying_why(uri: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_nbd_uri(uri)
    assert message in str(info.value)
