"""The sans-I/O NBD handshake: QEMU's replies option by option, hostile clients, bounds, any split of the input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from protocol import LocalProtocolError, StateError
from protocol.nbd import (
    NBD_CMD_READ,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_SEND_DF,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_MAX_BUFFER_SIZE,
    NBD_META_CONTEXT_ALLOCATION_DEPTH,
    NBD_META_CONTEXT_BASE_ALLOCATION,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_EXTENDED_HEADERS,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_PEEK_EXPORT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_BLOCK_SIZE_REQD,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    NbdExport,
    NbdHandshakeState,
    NbdMetaContext,
    NbdServerHandshake,
    encode_request,
)
from protocol.nbd._handshake import OUTPUT_PAUSE_BYTES
from tests.protocol.nbd_model import (
    CLIENT_FLAGS,
    ExportNameReply,
    OptionReply,
    client_flags,
    go,
    info_data,
    meta_data,
    option,
    read_handshake,
    string,
)

DISK = NbdExport("disk", 1 << 20, description="a disk", allocation_depth=True)
RO = NbdExport("ro", 64 * 1024, read_only=True, min_block_bytes=512, max_payload_bytes=1 << 20)
EXPORTS = {"disk": DISK, "ro": RO}
BASE = NbdMetaContext(0, NBD_META_CONTEXT_BASE_ALLOCATION)
DEPTH = NbdMetaContext(1, NBD_META_CONTEXT_ALLOCATION_DEPTH)


def take(hs: NbdServerHandshake) -> bytes:
    """All the output, as a socket that takes everything would."""
    data = hs.data_to_send()
    hs.data_sent(len(data))
    return data


def run(*chunks: bytes, exports: dict[str, NbdExport] | None = None) -> tuple[NbdServerHandshake, list[
        OptionReply | ExportNameReply]]:
    """A handshake fed ``chunks`` one after the other; its replies."""
    hs, replies, _ = run_as_owner(*chunks, exports=exports)
    return hs, replies


def run_as_owner(*chunks: bytes, exports: dict[str, NbdExport] | None = None) -> tuple[
        NbdServerHandshake, list[OptionReply | ExportNameReply], bytes]:
    """As ``run``, feeding only while negotiating, as an owner does; also the
    input that came after the transmission phase began (``unused_data`` and
    the chunks not fed)."""
    hs = NbdServerHandshake(EXPORTS if exports is None else exports)
    out = take(hs)
    later = b""
    for chunk in chunks:
        if hs.state is NbdHandshakeState.TRANSMISSION:
            later += chunk
        else:
            hs.receive_data(chunk)
            out += take(hs)
    parsed = read_handshake(out)
    assert parsed.rest == b""
    return hs, parsed.replies, hs.unused_data + later


def negotiate(*options: bytes, flags: int = CLIENT_FLAGS) -> tuple[NbdServerHandshake, list[
        OptionReply | ExportNameReply]]:
    return run(client_flags(flags) + b"".join(options))


def info(reply: OptionReply | ExportNameReply) -> tuple[int, bytes]:
    """An NBD_REP_INFO's information type and payload."""
    assert isinstance(reply, OptionReply) and reply.type == NBD_REP_INFO
    return struct.unpack_from(">H", reply.payload)[0], reply.payload[2:]


def rep(opt: int, rtype: int, payload: bytes = b"") -> OptionReply:
    return OptionReply(opt, rtype, payload)


def meta(opt: int, context_id: int, name: str) -> OptionReply:
    return rep(opt, NBD_REP_META_CONTEXT, struct.pack(">I", context_id) + name.encode())


# -- the greeting and the client's flags ----------------------------------------------------------


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    hs = NbdServerHandshake(EXPORTS)
    out = read_handshake(take(hs))
    assert out.handshake_flags == NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
    assert hs.state is NbdHandshakeState.NEGOTIATING and hs.wants_input
    assert hs.negotiated is None and hs.close_reason is None and hs.unused_data == b""


def test_unknown_client_flags_close() -> None:
    hs, replies = negotiate(flags=CLIENT_FLAGS | 4)
    assert hs.state is NbdHandshakeState.CLOSED and replies == []
    assert hs.close_reason == "Unknown client flags 0x4 received"
    assert not hs.wants_input


def test_without_fixed_newstyle_only_export_name_is_taken() -> None:
    hs, replies = negotiate(option(NBD_OPT_EXPORT_NAME, b"disk"), flags=0)
    assert hs.state is NbdHandshakeState.TRANSMISSION
    assert replies == [ExportNameReply(DISK.size_bytes, DISK.transmission_flags, bytes(124))]
    hs, replies = negotiate(option(NBD_OPT_LIST), flags=NBD_FLAG_C_NO_ZEROES)
    assert hs.state is NbdHandshakeState.CLOSED and replies == []
    assert hs.close_reason is not None and "Unsupported option 3 (list)" in hs.close_reason


# -- NBD_OPT_EXPORT_NAME --------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "zeroes"), [(NBD_FLAG_C_FIXED_NEWSTYLE, bytes(124)), (CLIENT_FLAGS, b"")])
def test_export_name_answers_size_and_flags(flags: int, zeroes: bytes) -> None:
    request = encode_request(NBD_CMD_READ, 7, 0, 512)
    hs, replies = negotiate(option(NBD_OPT_STRUCTURED_REPLY), option(NBD_OPT_EXPORT_NAME, b"ro") + request,
                            flags=flags)
    assert replies[-1] == ExportNameReply(RO.size_bytes, RO.transmission_flags | NBD_FLAG_SEND_DF, zeroes)
    assert hs.state is NbdHandshakeState.TRANSMISSION and not hs.wants_input
    assert hs.unused_data == request
    n = hs.negotiated
    assert n is not None and n.export is RO and n.structured_replies
    assert n.no_zeroes == (zeroes == b"") and n.check_align_bytes == 0 and n.meta_contexts == ()


@pytest.mark.parametrize("name", [b"nope", b"\xff\xfe", b"disk\x00", b""])
def test_export_name_of_no_export_closes(name: bytes) -> None:
    hs, replies = negotiate(option(NBD_OPT_EXPORT_NAME, name))
    assert hs.state is NbdHandshakeState.CLOSED and replies == []
    assert hs.close_reason is not None and "not found" in hs.close_reason


def test_export_name_longer_than_4096_bytes_closes_unread() -> None:
    hs, _ = run(client_flags() + option(NBD_OPT_EXPORT_NAME, length=4097))
    assert hs.state is NbdHandshakeState.CLOSED
    assert hs.close_reason == "Bad length received: an export name of 4097 bytes"


# -- NBD_OPT_ABORT, NBD_OPT_LIST, NBD_OPT_STARTTLS, unknown options -------------------------------


def test_abort_is_acked_then_closes() -> None:
    hs, replies = negotiate(option(NBD_OPT_ABORT, b"ignored"), option(NBD_OPT_LIST))
    assert replies == [rep(NBD_OPT_ABORT, NBD_REP_ACK)]
    assert hs.state is NbdHandshakeState.CLOSED and hs.close_reason is None
    hs.receive_data(option(NBD_OPT_LIST))  # ignored once closed
    assert hs.data_to_send() == b""


def test_list_names_every_export_with_its_description() -> None:
    _, replies = negotiate(option(NBD_OPT_LIST))
    assert replies == [rep(NBD_OPT_LIST, NBD_REP_SERVER, string(b"disk") + b"a disk"),
                       rep(NBD_OPT_LIST, NBD_REP_SERVER, string(b"ro")),
                       rep(NBD_OPT_LIST, NBD_REP_ACK)]


def test_exports_are_read_at_each_option() -> None:
    exports: dict[str, NbdExport] = {}
    hs = NbdServerHandshake(exports)
    take(hs)
    hs.receive_data(client_flags() + go(b"disk"))
    assert read_handshake(take(hs), greeting=False).replies == [
        rep(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, b"export 'disk' not present")]
    exports["disk"] = DISK
    hs.receive_data(go(b"disk"))
    assert hs.state is NbdHandshakeState.TRANSMISSION and hs.negotiated is not None
    assert hs.negotiated.export is DISK


@pytest.mark.parametrize("opt", [NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_OPT_STRUCTURED_REPLY])
def test_options_without_data_refuse_data_and_skip_it(opt: int) -> None:
    hs, replies = negotiate(option(opt, b"x" * 100), option(NBD_OPT_STRUCTURED_REPLY))
    name = {NBD_OPT_LIST: "list", NBD_OPT_STARTTLS: "starttls", NBD_OPT_STRUCTURED_REPLY: "structured reply"}
    assert replies == [rep(opt, NBD_REP_ERR_INVALID, f"option '{name[opt]}' has unexpected length".encode()),
                       rep(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK)]
    assert hs.state is NbdHandshakeState.NEGOTIATING


def test_starttls_is_refused_by_policy() -> None:
    hs, replies = negotiate(option(NBD_OPT_STARTTLS), go(b"disk"))
    assert replies[0] == rep(NBD_OPT_STARTTLS, NBD_REP_ERR_POLICY, b"TLS not configured")
    assert hs.state is NbdHandshakeState.TRANSMISSION


@pytest.mark.parametrize(("opt", "name"), [(NBD_OPT_PEEK_EXPORT, "<unknown>"),
                                           (NBD_OPT_EXTENDED_HEADERS, "extended headers"),
                                           (0, "<unknown>"), (0xDEADBEEF, "<unknown>")])
def test_unknown_options_are_unsupported_and_skipped(opt: int, name: str) -> None:
    hs, replies = negotiate(option(opt, b"\x00" * 5000), go(b"disk"))
    assert replies[0] == rep(opt, NBD_REP_ERR_UNSUP, f"Unsupported option {opt} ({name})".encode())
    assert hs.state is NbdHandshakeState.TRANSMISSION


def test_structured_reply_twice_is_invalid() -> None:
    hs, replies = negotiate(option(NBD_OPT_STRUCTURED_REPLY), option(NBD_OPT_STRUCTURED_REPLY), go(b"disk"))
    assert replies[:2] == [rep(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK),
                           rep(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID,
                               b"structured reply already negotiated")]
    assert hs.negotiated is not None and hs.negotiated.structured_replies
    assert hs.negotiated.transmission_flags == DISK.transmission_flags | NBD_FLAG_SEND_DF


# -- NBD_OPT_INFO and NBD_OPT_GO ------------------------------------------------------------------


def test_go_sends_description_block_sizes_and_export_then_ack() -> None:
    request = encode_request(NBD_CMD_READ, 1, 0, 4096)
    hs, replies = negotiate(go(b"disk") + request + request[:5])
    assert [info(r) for r in replies[:3]] == [
        (NBD_INFO_DESCRIPTION, b"a disk"),
        (NBD_INFO_BLOCK_SIZE, struct.pack(">III", 1, 4096, NBD_MAX_BUFFER_SIZE)),
        (NBD_INFO_EXPORT, struct.pack(">QH", DISK.size_bytes, DISK.transmission_flags))]
    assert replies[3:] == [rep(NBD_OPT_GO, NBD_REP_ACK)]
    assert hs.state is NbdHandshakeState.TRANSMISSION and hs.unused_data == request + request[:5]
    with pytest.raises(StateError):
        hs.receive_data(request)


def test_go_with_requests_sends_the_name_as_asked_and_the_true_minimum() -> None:
    hs, replies = negotiate(go(b"ro", (NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE, 77, NBD_INFO_NAME)))
    assert [info(r) for r in replies[:3]] == [
        (NBD_INFO_NAME, b"ro"),
        (NBD_INFO_BLOCK_SIZE, struct.pack(">III", 512, 4096, 1 << 20)),
        (NBD_INFO_EXPORT, struct.pack(">QH", RO.size_bytes, RO.transmission_flags))]
    assert hs.negotiated is not None and hs.negotiated.check_align_bytes == 512


def test_go_without_block_size_request_advertises_minimum_one() -> None:
    hs, replies = negotiate(go(b"ro"))
    assert info(replies[0]) == (NBD_INFO_BLOCK_SIZE, struct.pack(">III", 1, 4096, 1 << 20))
    assert hs.negotiated is not None and hs.negotiated.check_align_bytes == 0


def test_info_needs_block_size_request_when_the_export_needs_alignment() -> None:
    hs, replies = negotiate(option(NBD_OPT_INFO, info_data(b"ro")),
                            option(NBD_OPT_INFO, info_data(b"ro", (NBD_INFO_BLOCK_SIZE,))),
                            option(NBD_OPT_INFO, info_data(b"disk")))
    assert [info(r)[0] for r in replies[:2]] == [NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT]
    assert info(replies[0])[1][:4] == struct.pack(">I", 512)  # INFO tells the truth
    assert replies[2] == rep(NBD_OPT_INFO, NBD_REP_ERR_BLOCK_SIZE_REQD,
                             b"request NBD_INFO_BLOCK_SIZE to use this export")
    assert replies[5] == rep(NBD_OPT_INFO, NBD_REP_ACK)
    assert replies[-1] == rep(NBD_OPT_INFO, NBD_REP_ACK)
    assert hs.state is NbdHandshakeState.NEGOTIATING


@pytest.mark.parametrize("name", [b"nope", b"\xc3\x28", b"x" * 79, b"y" * 300])
def test_info_of_no_export_is_unknown(name: bytes) -> None:
    hs, replies = negotiate(option(NBD_OPT_INFO, info_data(name)), go(name))
    shown = name if len(name) < 80 else name[:80] + b"..."
    assert replies == [rep(opt, NBD_REP_ERR_UNKNOWN, b"export '" + shown + b"' not present")
                       for opt in (NBD_OPT_INFO, NBD_OPT_GO)]
    assert hs.state is NbdHandshakeState.NEGOTIATING


def test_info_refuses_bad_lengths_and_stays_in_step() -> None:
    data = info_data(b"disk", (NBD_INFO_NAME,))
    cases = [
        (option(NBD_OPT_GO, data + b"junk"), "option 'go' has unexpected length"),
        (option(NBD_OPT_GO, data[:6], length=6), "Inconsistent lengths in option go"),
        (option(NBD_OPT_GO, data[:-2]), "Inconsistent lengths in option go"),  # a request short
        (option(NBD_OPT_GO, string(b"di\x00k") + b"\x00\x00"), "Unexpected embedded NUL in option go"),
        (option(NBD_OPT_GO, struct.pack(">I", 4097) + b"n" * 4097 + b"\x00\x00"), "Invalid name length: 4097"),
        (option(NBD_OPT_INFO, struct.pack(">I", 0xFFFFFFFF)), "Invalid name length: 4294967295"),
        (option(NBD_OPT_INFO, b"\x00\x00"), "Inconsistent lengths in option info"),
    ]
    for bad, message in cases:
        hs, replies = negotiate(bad, go(b"disk"))
        assert replies[0] == OptionReply(replies[0].option, NBD_REP_ERR_INVALID, message.encode()), message
        assert hs.state is NbdHandshakeState.TRANSMISSION, message  # the next option was found


# -- metadata contexts ----------------------------------------------------------------------------


def test_list_meta_context_lists_all_without_queries_ids_zero() -> None:
    l_ = NBD_OPT_LIST_META_CONTEXT
    _, replies = negotiate(option(l_, meta_data(b"disk")), option(l_, meta_data(b"ro")))
    assert replies == [meta(l_, 0, NBD_META_CONTEXT_BASE_ALLOCATION), meta(l_, 0, NBD_META_CONTEXT_ALLOCATION_DEPTH),
                       rep(l_, NBD_REP_ACK), meta(l_, 0, NBD_META_CONTEXT_BASE_ALLOCATION), rep(l_, NBD_REP_ACK)]


@pytest.mark.parametrize(("queries", "listed"), [
    ((b"base:",), ["base"]),
    ((b"qemu:",), ["depth"]),
    ((b"base:allocation",), ["base"]),
    ((b"qemu:allocation-depth", b"base:allocation"), ["base", "depth"]),
    ((b"base:allocationx", b"base", b"qemu:dirty-bitmap:", b"qemu:dirty-bitmap:b0", b"x-foo:", b":"), []),
    ((b"", b"nbd-server:"), []),
])
def test_list_meta_context_queries(queries: tuple[bytes, ...], listed: list[str]) -> None:
    l_ = NBD_OPT_LIST_META_CONTEXT
    _, replies = negotiate(option(l_, meta_data(b"disk", queries)))
    names = {"base": NBD_META_CONTEXT_BASE_ALLOCATION, "depth": NBD_META_CONTEXT_ALLOCATION_DEPTH}
    assert replies == [meta(l_, 0, names[n]) for n in listed] + [rep(l_, NBD_REP_ACK)]


def test_set_meta_context_selects_with_ids_and_go_keeps_them() -> None:
    s = NBD_OPT_SET_META_CONTEXT
    hs, replies = negotiate(option(NBD_OPT_STRUCTURED_REPLY),
                            option(s, meta_data(b"disk", (b"qemu:allocation-depth", b"base:allocation", b"base:"))),
                            go(b"disk"))
    assert replies[1:4] == [meta(s, 0, NBD_META_CONTEXT_BASE_ALLOCATION),
                            meta(s, 1, NBD_META_CONTEXT_ALLOCATION_DEPTH), rep(s, NBD_REP_ACK)]
    assert hs.negotiated is not None and hs.negotiated.meta_contexts == (BASE, DEPTH)


def test_set_meta_context_with_wildcards_selects_nothing() -> None:
    s = NBD_OPT_SET_META_CONTEXT
    hs, replies = negotiate(option(NBD_OPT_STRUCTURED_REPLY), option(s, meta_data(b"disk", (b"base:", b"qemu:"))),
                            go(b"disk"))
    assert replies[1] == rep(s, NBD_REP_ACK)
    assert hs.negotiated is not None and hs.negotiated.meta_contexts == ()


def test_allocation_depth_only_where_offered() -> None:
    s = NBD_OPT_SET_META_CONTEXT
    hs, replies = negotiate(option(NBD_OPT_STRUCTURED_REPLY), option(s, meta_data(b"ro", (b"qemu:allocation-depth",))),
                            go(b"ro"))
    assert replies[1] == rep(s, NBD_REP_ACK)
    assert hs.negotiated is not None and hs.negotiated.meta_contexts == ()


def test_set_meta_context_needs_structured_replies_list_does_not() -> None:
    hs, replies = negotiate(option(NBD_OPT_SET_META_CONTEXT, meta_data(b"disk", (b"base:allocation",))),
                            option(NBD_OPT_LIST_META_CONTEXT, meta_data(b"disk", (b"base:allocation",))), go(b"disk"))
    assert replies[0] == rep(NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_INVALID,
                             b"request option 'set meta context' when structured reply is not negotiated")
    assert replies[1:3] == [meta(NBD_OPT_LIST_META_CONTEXT, 0, NBD_META_CONTEXT_BASE_ALLOCATION),
                            rep(NBD_OPT_LIST_META_CONTEXT, NBD_REP_ACK)]
    assert hs.negotiated is not None and hs.negotiated.meta_contexts == ()


def test_contexts_of_another_export_are_dropped_by_go() -> None:
    s = NBD_OPT_SET_META_CONTEXT
    hs, _ = negotiate(option(NBD_OPT_STRUCTURED_REPLY), option(s, meta_data(b"ro", (b"base:allocation",))),
                      go(b"disk"))
    assert hs.negotiated is not None and hs.negotiated.meta_contexts == ()
    hs, _ = negotiate(option(NBD_OPT_STRUCTURED_REPLY), option(s, meta_data(b"ro", (b"base:allocation",))),
                      option(NBD_OPT_INFO, info_data(b"disk")), go(b"ro"))
    assert hs.negotiated is not None and hs.negotiated.meta_contexts == (BASE,)  # INFO drops nothing


@pytest.mark.parametrize("failing", [
    option(NBD_OPT_SET_META_CONTEXT, meta_data(b"nope", (b"base:allocation",))),
    option(NBD_OPT_SET_META_CONTEXT, meta_data(b"disk", (b"base:allocation",)) + b"junk"),
    option(NBD_OPT_SET_META_CONTEXT, meta_data(b"disk", (b"base:alloc\x00tion",))),
    option(NBD_OPT_SET_META_CONTEXT, meta_data(b"disk", (b"base:allocation",))[:-3],
           length=len(meta_data(b"disk", (b"base:allocation",))) - 3),
])
def test_a_failed_set_meta_context_clears_the_selection(failing: bytes) -> None:
    s = NBD_OPT_SET_META_CONTEXT
    hs, replies = negotiate(option(NBD_OPT_STRUCTURED_REPLY), option(s, meta_data(b"disk", (b"base:allocation",))),
                            failing, go(b"disk"))
    assert isinstance(replies[3], OptionReply) and replies[3].type in (NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_INVALID)
    assert hs.negotiated is not None and hs.negotiated.meta_contexts == ()


def test_meta_queries_longer_than_4096_bytes_are_skipped_unread() -> None:
    s = NBD_OPT_SET_META_CONTEXT
    long_query = b"base:allocation" + b"x" * 5000
    hs, replies = negotiate(option(NBD_OPT_STRUCTURED_REPLY),
                            option(s, meta_data(b"disk", (long_query, b"base:allocation"))), go(b"disk"))
    assert replies[1:3] == [meta(s, 0, NBD_META_CONTEXT_BASE_ALLOCATION), rep(s, NBD_REP_ACK)]
    hs, replies = negotiate(option(NBD_OPT_LIST_META_CONTEXT, string(b"disk") + struct.pack(">II", 1, 5000)),
                            go(b"disk"))
    assert replies[0] == rep(NBD_OPT_LIST_META_CONTEXT, NBD_REP_ERR_INVALID,
                             b"Inconsistent lengths in option list meta context")
    assert hs.state is NbdHandshakeState.TRANSMISSION


# -- the stream: bad magic, oversized options, hang-ups, bounds -----------------------------------


def test_bad_option_magic_closes() -> None:
    hs, replies = negotiate(option(NBD_OPT_LIST), option(NBD_OPT_LIST, magic=0x1234), option(NBD_OPT_LIST))
    assert [r.type for r in replies if isinstance(r, OptionReply)] == [NBD_REP_SERVER, NBD_REP_SERVER, NBD_REP_ACK]
    assert hs.state is NbdHandshakeState.CLOSED and hs.close_reason == "Bad magic received: 0x0000000000001234"


def test_option_longer_than_32_mib_closes_without_reading_it() -> None:
    hs, _ = run(client_flags() + option(99, length=NBD_MAX_BUFFER_SIZE + 1))
    assert hs.state is NbdHandshakeState.CLOSED
    assert hs.close_reason == f"len ({NBD_MAX_BUFFER_SIZE + 1}) is larger than max len ({NBD_MAX_BUFFER_SIZE})"


def test_hanging_up_mid_handshake_closes_with_a_reason() -> None:
    hs, _ = run(client_flags() + option(NBD_OPT_GO, length=50)[:20], b"")
    assert hs.state is NbdHandshakeState.CLOSED
    assert hs.close_reason == "the client hung up during the handshake"


def test_a_port_probe_closes_without_reason() -> None:
    hs, _ = run(b"")
    assert hs.state is NbdHandshakeState.CLOSED and hs.close_reason is None


def test_owner_close() -> None:
    hs = NbdServerHandshake(EXPORTS)
    hs.close()
    assert hs.state is NbdHandshakeState.CLOSED and not hs.wants_input
    hs.receive_data(client_flags() + go(b"disk"))
    assert hs.negotiated is None


def test_data_sent_checks_its_count() -> None:
    hs = NbdServerHandshake(EXPORTS)
    with pytest.raises(LocalProtocolError):
        hs.data_sent(19)
    assert len(hs.data_to_send(5)) == 5


def test_unparsed_option_data_is_dropped_as_it_comes() -> None:
    hs = NbdServerHandshake(EXPORTS)
    take(hs)
    hs.receive_data(client_flags() + option(99, length=NBD_MAX_BUFFER_SIZE))
    chunk = b"\x00" * 65536
    for _ in range(NBD_MAX_BUFFER_SIZE // len(chunk)):
        hs.receive_data(chunk)
        assert hs.buffered_bytes == 0
    hs.receive_data(go(b"disk"))
    assert hs.state is NbdHandshakeState.TRANSMISSION


def test_parsed_option_data_is_read_a_field_at_a_time() -> None:
    """65535 information requests and 100000 queries, fed a byte and a chunk at a time: never more than a field held."""
    hs = NbdServerHandshake(EXPORTS)
    take(hs)
    stream = (client_flags() + go(b"nope", tuple(range(65535)))
              + option(NBD_OPT_LIST_META_CONTEXT, meta_data(b"disk", (b"x:y",) * 100000)))
    most = 0
    for i in range(0, len(stream), 3000):
        hs.receive_data(stream[i:i + 3000])
        most = max(most, hs.buffered_bytes)
        take(hs)
    assert most <= 4096 + 16
    assert hs.state is NbdHandshakeState.NEGOTIATING


def test_input_is_parsed_no_faster_than_output_leaves() -> None:
    """A client that pipelines options without reading: parsing pauses, then resumes."""
    exports = {f"export-{i}": NbdExport(f"export-{i}", 512, description="d" * 4000) for i in range(20)}
    hs = NbdServerHandshake(exports)
    lists = option(NBD_OPT_LIST) * 10
    hs.receive_data(client_flags() + lists + go(b"export-3"))
    assert not hs.wants_input and hs.state is NbdHandshakeState.NEGOTIATING
    assert len(hs.data_to_send()) < OUTPUT_PAUSE_BYTES + 100_000
    assert hs.buffered_bytes > 0  # the rest waits, unparsed
    out = b""
    while hs.state is NbdHandshakeState.NEGOTIATING:
        out += take(hs)
    out += take(hs)
    replies = read_handshake(out).replies
    assert sum(1 for r in replies if isinstance(r, OptionReply) and r.type == NBD_REP_SERVER) == 200
    assert hs.state is NbdHandshakeState.TRANSMISSION


# -- properties: any split, any garbage ------------------------------------------------------------

NAMES = st.sampled_from([b"disk", b"ro", b"", b"nope", b"\xff\xfe", b"di\x00sk", b"x" * 100])
QUERIES = st.lists(st.sampled_from([b"base:", b"base:allocation", b"qemu:", b"qemu:allocation-depth",
                                    b"qemu:dirty-bitmap:a", b"x-y:z", b"", b"base:\x00"]), max_size=4)
INFO_REQUESTS = st.lists(st.integers(0, 5), max_size=4).map(tuple)
OPTIONS = st.one_of(
    st.builds(lambda o, n, r: option(o, info_data(n, r)), st.sampled_from([NBD_OPT_INFO, NBD_OPT_GO]), NAMES,
              INFO_REQUESTS),
    st.builds(lambda o, n, q: option(o, meta_data(n, q)),
              st.sampled_from([NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT]), NAMES, QUERIES),
    st.sampled_from([option(NBD_OPT_STRUCTURED_REPLY), option(NBD_OPT_LIST), option(NBD_OPT_STARTTLS),
                     option(NBD_OPT_ABORT)]),
    st.builds(lambda n: option(NBD_OPT_EXPORT_NAME, n), NAMES),
    st.builds(option, st.integers(0, 12) | st.integers(0, 2**32 - 1), st.binary(max_size=40)),
    # Lengths that do not match the content.
    st.builds(lambda o, d, delta: option(o, d, length=max(0, len(d) + delta)),
              st.integers(1, 12), st.binary(max_size=30), st.integers(-8, 8)),
    st.binary(max_size=30),  # garbage
)
STREAMS = st.builds(lambda f, opts: client_flags(f) + b"".join(opts),
                    st.sampled_from([CLIENT_FLAGS, NBD_FLAG_C_FIXED_NEWSTYLE, 0, 8]),
                    st.lists(OPTIONS, max_size=8))


def outcome(hs: NbdServerHandshake) -> tuple[object, ...]:
    return hs.state, hs.close_reason, hs.negotiated


@settings(max_examples=300, deadline=None)
@given(STREAMS, st.data())
def test_any_split_of_the_input_gives_the_same_output(stream: bytes, data: st.DataObject) -> None:
    whole, whole_replies, whole_later = run_as_owner(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    split, split_replies, split_later = run_as_owner(*(p for p in pieces if p))
    assert split_replies == whole_replies
    assert outcome(split) == outcome(whole)
    assert split_later == whole_later


@settings(max_examples=300, deadline=None)
@given(STREAMS)
def test_any_input_gives_well_formed_replies(stream: bytes) -> None:
    hs, replies = run(stream)  # read_handshake checks the framing
    if hs.state is NbdHandshakeState.TRANSMISSION:
        assert hs.negotiated is not None
    for r in replies:
        if isinstance(r, OptionReply) and r.type & (1 << 31):
            assert r.payload  # every error says why
    if hs.state is NbdHandshakeState.NEGOTIATING:
        assert hs.buffered_bytes <= 4096 + 16
        hs.receive_data(b"")
    assert hs.state is not NbdHandshakeState.NEGOTIATING


# -- a client model through every option --------------------------------------------------------


class ClientModel(RuleBasedStateMachine):
    """A well-behaved but unpredictable client: each option's replies are what
    QEMU's server gives, given what was negotiated before."""

    def __init__(self) -> None:
        super().__init__()
        self.hs = NbdServerHandshake(EXPORTS)
        assert read_handshake(take(self.hs)).handshake_flags == NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
        self.hs.receive_data(client_flags())
        self.structured = False
        self.contexts: tuple[NbdMetaContext, ...] = ()
        self.contexts_export: str | None = None

    def send(self, data: bytes) -> list[OptionReply | ExportNameReply]:
        self.hs.receive_data(data)
        parsed = read_handshake(take(self.hs), greeting=False)
        assert parsed.rest == b""
        return parsed.replies

    @property
    def negotiating(self) -> bool:
        return self.hs.state is NbdHandshakeState.NEGOTIATING

    @precondition(lambda self: self.negotiating)
    @rule()
    def structured_reply(self) -> None:
        replies = self.send(option(NBD_OPT_STRUCTURED_REPLY))
        if self.structured:
            assert [r.type for r in replies if isinstance(r, OptionReply)] == [NBD_REP_ERR_INVALID]
        else:
            assert replies == [rep(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK)]
        self.structured = True

    @precondition(lambda self: self.negotiating)
    @rule(name=st.sampled_from(["disk", "ro", "nope"]), queries=QUERIES, listing=st.booleans())
    def meta_context(self, name: str, queries: list[bytes], listing: bool) -> None:
        opt = NBD_OPT_LIST_META_CONTEXT if listing else NBD_OPT_SET_META_CONTEXT
        replies = self.send(option(opt, meta_data(name.encode(), queries)))
        if not listing and not self.structured:
            assert [r.type for r in replies if isinstance(r, OptionReply)] == [NBD_REP_ERR_INVALID]
            return
        if not listing:
            self.contexts, self.contexts_export = (), None
        export = EXPORTS.get(name)
        if export is None:
            assert [r.type for r in replies if isinstance(r, OptionReply)] == [NBD_REP_ERR_UNKNOWN]
            return
        if any(b"\x00" in q for q in queries):
            assert [r.type for r in replies if isinstance(r, OptionReply)] == [NBD_REP_ERR_INVALID]
            return
        selected = expected_contexts(export, queries, listing)
        assert replies == [meta(opt, 0 if listing else c.context_id, c.name) for c in selected] + [
            rep(opt, NBD_REP_ACK)]
        if not listing:
            self.contexts, self.contexts_export = selected, name

    @precondition(lambda self: self.negotiating)
    @rule(name=st.sampled_from(["disk", "ro", "nope"]), requests=INFO_REQUESTS)
    def info(self, name: str, requests: tuple[int, ...]) -> None:
        replies = self.send(option(NBD_OPT_INFO, info_data(name.encode(), requests)))
        export = EXPORTS.get(name)
        if export is None:
            assert [r.type for r in replies if isinstance(r, OptionReply)] == [NBD_REP_ERR_UNKNOWN]
            return
        flags = export.transmission_flags | (NBD_FLAG_SEND_DF if self.structured else 0)
        assert (NBD_INFO_EXPORT, struct.pack(">QH", export.size_bytes, flags)) in [info(r) for r in replies[:-1]]
        final = replies[-1]
        assert isinstance(final, OptionReply)
        asked = NBD_INFO_BLOCK_SIZE in requests
        assert final.type == (NBD_REP_ERR_BLOCK_SIZE_REQD if export.min_block_bytes > 1 and not asked
                              else NBD_REP_ACK)

    @precondition(lambda self: self.negotiating)
    @rule(opt=st.sampled_from([NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_OPT_PEEK_EXPORT, NBD_OPT_EXTENDED_HEADERS]))
    def harmless(self, opt: int) -> None:
        replies = self.send(option(opt))
        assert isinstance(replies[-1], OptionReply)
        assert replies[-1].type == {NBD_OPT_LIST: NBD_REP_ACK, NBD_OPT_STARTTLS: NBD_REP_ERR_POLICY}.get(
            opt, NBD_REP_ERR_UNSUP)

    @precondition(lambda self: self.negotiating)
    @rule(name=st.sampled_from(["disk", "ro"]), by_export_name=st.booleans())
    def go(self, name: str, by_export_name: bool) -> None:
        self.send(option(NBD_OPT_EXPORT_NAME, name.encode()) if by_export_name else go(name.encode()))
        n = self.hs.negotiated
        assert self.hs.state is NbdHandshakeState.TRANSMISSION and n is not None
        assert n.export is EXPORTS[name] and n.structured_replies == self.structured
        assert n.meta_contexts == (self.contexts if self.contexts_export == name else ())

    @precondition(lambda self: self.negotiating)
    @rule()
    def abort(self) -> None:
        assert self.send(option(NBD_OPT_ABORT)) == [rep(NBD_OPT_ABORT, NBD_REP_ACK)]
        assert self.hs.state is NbdHandshakeState.CLOSED and self.hs.close_reason is None

    @precondition(lambda self: not self.negotiating)
    @rule()
    def after_the_end(self) -> None:
        """Once over, the handshake takes no more options."""
        if self.hs.state is NbdHandshakeState.CLOSED:
            assert self.send(option(NBD_OPT_LIST)) == []
        else:
            with pytest.raises(StateError):
                self.hs.receive_data(option(NBD_OPT_LIST))
            assert self.hs.unused_data == b"" and self.hs.data_to_send() == b""

    @invariant()
    def bounded(self) -> None:
        assert self.hs.buffered_bytes == 0


def expected_contexts(export: NbdExport, queries: list[bytes], listing: bool) -> tuple[NbdMetaContext, ...]:
    """The contexts a query list selects, from the specification and QEMU's namespaces."""
    if listing and not queries:
        return (BASE, DEPTH) if export.allocation_depth else (BASE,)
    base = any(q == b"base:allocation" or (listing and q == b"base:") for q in queries)
    depth = export.allocation_depth and any(
        q == b"qemu:allocation-depth" or (listing and q == b"qemu:") for q in queries)
    return tuple(c for c, on in ((BASE, base), (DEPTH, depth)) if on)


TestClientModel = ClientModel.TestCase
TestClientModel.settings = settings(max_examples=150, stateful_step_count=12, deadline=None)


# -- the exports offered --------------------------------------------------------------------------


@pytest.mark.parametrize(("read_only", "multi_conn", "flags"), [
    # QEMU's nbd_export_create: HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_CACHE, CAN_MULTI_CONN unless
    # max-connections=1, then READ_ONLY or SEND_TRIM | SEND_WRITE_ZEROES | SEND_FAST_ZERO.
    (False, True, 0x1 | 0x4 | 0x8 | 0x400 | 0x100 | 0x20 | 0x40 | 0x800),
    (False, False, 0x1 | 0x4 | 0x8 | 0x400 | 0x20 | 0x40 | 0x800),
    (True, True, 0x1 | 0x4 | 0x8 | 0x400 | 0x100 | 0x2),
    (True, False, 0x1 | 0x4 | 0x8 | 0x400 | 0x2),
])
def test_export_flags_are_qemus(read_only: bool, multi_conn: bool, flags: int) -> None:
    assert NbdExport("e", 0, read_only=read_only, multi_conn=multi_conn).transmission_flags == flags


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "n" * 4097}, "too long"),
    ({"name": "a\0b"}, "NUL"),
    ({"name": "\udcff"}, "UTF-8"),
    ({"description": "d" * 4097}, "too long"),
    ({"size_bytes": -1}, "export size"),
    ({"size_bytes": 1 << 63}, "export size"),
    ({"min_block_bytes": 3}, "minimum block size"),
    ({"min_block_bytes": 1 << 17, "preferred_block_bytes": 1 << 17}, "minimum block size"),
    ({"preferred_block_bytes": 256}, "preferred block size"),
    ({"min_block_bytes": 8192}, "preferred block size"),
    ({"max_payload_bytes": 2048}, "maximum payload"),
    ({"max_payload_bytes": NBD_MAX_BUFFER_SIZE + 1}, "maximum payload"),
])
def test_exports_the_protocol_cannot_describe_are_refused(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"name": "e", "size_bytes": 0}
    args.update(kwargs)
    with pytest.raises(LocalProtocolError, match=message):
        NbdExport(**args)  # type: ignore[arg-type]


def test_the_largest_export_the_protocol_can_describe() -> None:
    export = NbdExport("é" * 2048, (1 << 63) - 1, description="d" * 4096, min_block_bytes=65536,
                       preferred_block_bytes=65536, max_payload_bytes=65536)
    hs, replies = run(client_flags() + go(export.name.encode(), (NBD_INFO_BLOCK_SIZE,)),
                      exports={export.name: export})
    assert hs.state is NbdHandshakeState.TRANSMISSION
    assert info(replies[1]) == (NBD_INFO_BLOCK_SIZE, struct.pack(">III", 65536, 65536, 65536))
    assert info(replies[2]) == (NBD_INFO_EXPORT, struct.pack(">QH", (1 << 63) - 1, export.transmission_flags))
