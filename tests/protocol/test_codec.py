"""The message codec: every message type round-trips; garbage, truncated,
oversized or ill-typed input gives RemoteProtocolError and nothing else."""

from __future__ import annotations

import dataclasses
import inspect

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    PROTOCOL_VERSION,
    BadRequestError,
    BlockCompletion,
    BlockOp,
    BlockdevAdd,
    BlockdevDel,
    BlockRequest,
    ErrorReply,
    Event,
    Heartbeat,
    Hello,
    Limits,
    LocalProtocolError,
    Message,
    NbdCloseExport,
    NbdConnection,
    NbdOffer,
    NodeStats,
    ProtocolError,
    Query,
    QueryReply,
    RemoteProtocolError,
    SetLatencyHistogram,
    SetPollParams,
    Resume,
    Stop,
    Welcome,
    decode,
    decode_batch,
    encode,
    encode_batch,
    pack,
)

ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
naturals = st.integers(min_value=0, max_value=2**63 - 1)
text = st.text(max_size=40)
names = st.lists(st.text(max_size=16), max_size=8).map(tuple)
scalars = st.one_of(text, ints, st.floats(allow_nan=False), st.booleans(), st.none())

MESSAGES: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, iothread_id=text, pid=ints, version=ints, capabilities=names, data_endpoint=text),
    st.builds(Welcome, version=ints, capabilities=names, heartbeat_interval_ms=ints),
    st.builds(SetPollParams, request_id=ints, poll_max_ns=ints, poll_grow=ints, poll_shrink=ints,
              aio_max_batch=ints),
    st.builds(Stop, reason=text),
    st.builds(Resume, request_id=ints),
    st.builds(NbdOffer, export_id=text, node_name=text, name=text, size_bytes=ints, description=text,
              has_description=st.booleans(), read_only=st.booleans(), multi_conn=st.booleans(),
              min_block_bytes=ints, allocation_depth=st.booleans(), withdraw=st.booleans()),
    st.builds(Query, request_id=ints, node=text),
    st.builds(SetLatencyHistogram, request_id=ints, node_name=text,
              boundaries_ns=st.lists(ints, max_size=6).map(tuple)),
    st.builds(QueryReply, request_id=ints, counters=st.dictionaries(text, ints, max_size=8)),
    st.builds(Heartbeat, seq=ints, sent_ns=ints),
    st.builds(NodeStats, node_name=text, counters=st.dictionaries(text, ints, max_size=8)),
    st.builds(Event, name=text, data=st.dictionaries(text, scalars, max_size=8)),
    st.builds(ErrorReply, request_id=ints, error_class=text, message=text, errno=ints),
    st.builds(BlockdevAdd, request_id=ints, node_name=text, driver=text,
              options=st.dictionaries(text, st.one_of(text, ints, st.booleans()), max_size=6),
              stats=st.dictionaries(text, ints, max_size=8), boundaries_ns=st.lists(ints, max_size=6).map(tuple)),
    st.builds(BlockdevDel, request_id=ints, node_name=text),
    st.builds(BlockRequest, request_id=ints, node=text, op=st.sampled_from([o.value for o in BlockOp]),
              offset=naturals, length=naturals, flags=ints, data=st.binary(max_size=4096)),
    st.builds(BlockCompletion, request_id=ints, status=ints, message=text, data=st.binary(max_size=4096)),
    st.builds(NbdConnection, connection_id=ints, export_id=text, node_name=text, transmission_flags=ints,
              structured_replies=st.booleans(), meta_contexts=st.dictionaries(text, ints, max_size=3),
              pending=st.binary(max_size=64)),
    st.builds(NbdCloseExport, request_id=ints, export_id=text),
)


@given(MESSAGES)
def test_every_message_round_trips(msg: Message) -> None:
    frames = encode(msg)
    assert decode(frames) == msg
    # The payload is a separate raw frame, never inside the msgpack header; an
    # empty one takes no frame at all.
    payload = type(msg).PAYLOAD
    assert len(frames) == (2 if payload is not None and getattr(msg, payload) else 1)
    if len(frames) == 2:
        assert frames[1] == getattr(msg, payload)
        assert getattr(msg, payload) not in msgpack.unpackb(frames[0])[2]


def test_all_message_types_are_covered() -> None:
    from protocol.wire._messages import MESSAGE_TYPES

    assert set(MESSAGE_TYPES.values()) == {
        Hello, Welcome, SetPollParams, Stop, Resume, Query, QueryReply, Heartbeat, NodeStats, Event, ErrorReply,
        BlockdevAdd, BlockdevDel, SetLatencyHistogram, BlockRequest, BlockCompletion, NbdConnection,
        NbdCloseExport, NbdOffer,
    }


@given(st.lists(st.binary(max_size=200), max_size=3))
@settings(max_examples=300)
def test_garbage_frames_raise_only_protocol_errors(frames: list[bytes]) -> None:
    try:
        decode(frames)
    except RemoteProtocolError:
        pass


@given(MESSAGES, st.data())
def test_truncated_or_mutated_headers_raise_only_protocol_errors(msg: Message, data: st.DataObject) -> None:
    frames = encode(msg)
    header = frames[0]
    cut = data.draw(st.integers(min_value=0, max_value=len(header) - 1))
    with pytest.raises(RemoteProtocolError):
        decode([header[:cut], *frames[1:]])
    pos = data.draw(st.integers(min_value=0, max_value=len(header) - 1))
    byte = data.draw(st.integers(min_value=0, max_value=255))
    mutated = header[:pos] + bytes([byte]) + header[pos + 1:]
    try:
        decode([mutated, *frames[1:]])  # may still be a valid message: never anything else
    except RemoteProtocolError:
        pass


def _header(kind: str, body: object, version: object = PROTOCOL_VERSION) -> bytes:
    return msgpack.packb([version, kind, body])


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([], "no header frame"),
        ([_header("nonsense", [])], "unknown message kind 'nonsense'"),
        ([_header("stop", [""], version=99)], "unsupported protocol version 99"),
        ([_header("stop", [""], version=True)], "unsupported protocol version True"),
        ([msgpack.packb({"a": 1})], "header must be [version, kind, fields]"),
        ([_header("stop", {"reason": ""})], "fields must be a list, not dict"),
        ([_header("stop", ["", 1])], "stop: expected 1 field(s) (reason), got 2"),
        ([_header("query", [])], "query: expected 2 field(s) (request_id, node), got 0"),
        ([_header("query", ["7", ""])], "field 'request_id' has type str, expected int"),
        ([_header("query", [True, ""])], "field 'request_id' has type bool"),
        ([_header("hello", ["io0", 1, PROTOCOL_VERSION, [1], "", "", "", "", 1])], "'capabilities'"),
        ([_header("query-reply", [1, {"a": "x"}])], "'counters'"),
        ([_header("stop", [""]), b"extra"], "expected 1 frame, got 2"),
        ([_header("block-request", [1, "d", "read", 0, 0, 0]), b"", b""], "expected 1 or 2 frames, got 3"),
        ([_header("block-request", [1, "d", "explode", 0, 0, 0]), b""], "unknown block op 'explode'"),
        ([_header("block-request", [1, "d", "read", -1, 0, 0]), b""], "offset and length must be >= 0"),
        ([msgpack.packb([PROTOCOL_VERSION, "stop", [""]], use_bin_type=True) + b"\x00"], "undecodable header"),
        ([msgpack.packb([PROTOCOL_VERSION, "stop", [msgpack.ExtType(5, b"x")]])], "max_ext_len"),
    ],
)
def test_bad_messages_say_what_is_wrong(frames: list[bytes], message: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(frames)
    assert message in str(info.value)


def test_size_limits() -> None:
    small = Limits(max_header_bytes=80, max_payload_bytes=8, max_str_len=20, max_container_len=4)
    with pytest.raises(RemoteProtocolError, match="header frame of .* exceeds"):
        decode(encode(Stop("x" * 200)), small)
    with pytest.raises(RemoteProtocolError, match="undecodable"):
        decode(encode(Stop("x" * 30)), small)  # a string over max_str_len
    with pytest.raises(RemoteProtocolError, match="undecodable"):
        decode(encode(Hello("io0", 1, capabilities=tuple("abcdef"))), small)  # 6 > 4 items
    with pytest.raises(RemoteProtocolError, match="payload of 9 bytes exceeds"):
        decode(encode(BlockCompletion(1, data=b"x" * 9)), small)
    assert decode(encode(BlockCompletion(1, data=b"x" * 8)), small).data == b"x" * 8


def test_a_declared_huge_container_does_not_allocate() -> None:
    # array32 header claiming 2**32-1 items, in a few bytes.
    with pytest.raises(RemoteProtocolError):
        decode([b"\xdd\xff\xff\xff\xff"])


def test_deep_nesting_is_refused() -> None:
    deep = b"\x91" * 5000 + b"\xc0"
    with pytest.raises(RemoteProtocolError):
        decode([deep])


def test_encoding_refuses_what_cannot_be_sent() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Unregistered(Message):
        KIND = "stop"

    with pytest.raises(LocalProtocolError, match="not a registered message type"):
        encode(Unregistered())
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        encode(Event("e", {"x": object()}))  # type: ignore[dict-item]
    assert issubclass(LocalProtocolError, ProtocolError) and issubclass(RemoteProtocolError, ProtocolError)
    with pytest.raises(ValueError):
        BlockRequest(1, "d", "write", offset=-5)


# -- batches: several messages in one ZeroMQ message ----------------------------------------


@given(st.lists(MESSAGES, min_size=1, max_size=20))
def test_batches_round_trip_in_order(msgs: list[Message]) -> None:
    frames = encode_batch([pack(m) for m in msgs])
    assert decode_batch(frames) == msgs
    if len(msgs) == 1:
        assert frames == encode(msgs[0])  # a batch of one is the plain envelope
        return
    # One header for all; the payloads end to end in one raw frame, none inside msgpack.
    payloads = [getattr(m, type(m).PAYLOAD) for m in msgs if type(m).PAYLOAD is not None]
    version, items, sizes = msgpack.unpackb(frames[0])
    assert version == PROTOCOL_VERSION and [k for k, _ in items] == [type(m).KIND for m in msgs]
    assert sizes == [len(p) for p in payloads]
    assert frames[1:] == ([b"".join(payloads)] if payloads else [])


def test_batches_hold_up_to_the_container_limit() -> None:
    msgs = [Heartbeat(i, 0) for i in range(300)]
    assert decode_batch(encode_batch([pack(m) for m in msgs[:256]])) == msgs[:256]
    with pytest.raises(RemoteProtocolError, match="undecodable"):
        decode_batch(encode_batch([pack(m) for m in msgs]))  # 300 > 256 items
    small = Limits(max_container_len=4)
    assert decode_batch(encode_batch([pack(m) for m in msgs[:4]]), small) == msgs[:4]


def _batch(*items: object, sizes: tuple[int, ...] = (), version: object = PROTOCOL_VERSION) -> bytes:
    return msgpack.packb([version, list(items), list(sizes)])


def test_a_bad_item_with_a_known_kind_spoils_only_itself() -> None:
    frames = [_batch(["heartbeat", [1, 0]],
                     ["block-completion", ["x", 0, ""]],
                     ["block-completion", [3, 0, ""]], sizes=(3, 4)), b"badgood"]
    first, bad, last = decode_batch(frames)
    assert first == Heartbeat(1, 0)
    assert isinstance(bad, RemoteProtocolError) and "'request_id' has type str" in str(bad)
    assert last == BlockCompletion(3, data=b"good")  # its payload is still the right one


@pytest.mark.parametrize(
    ("frames", "decoded", "message"),
    [
        ([_batch(["heartbeat", [1, 0]], ["nonsense", []], ["stop", [""]])], 1,
         "unknown message kind 'nonsense'"),
        ([_batch(["stop", [""]], "stop", ["stop", [""]])], 1, "batch item 1 is not [kind, fields]"),
        ([_batch(["stop", [""]], ["block-completion", [1, 0, ""]])], 1, "no payload size for it"),
        ([_batch(["stop", [""]], ["block-completion", [1, 0, ""]], sizes=(1, 1)), b"ab"], 2,
         "1 payload size(s) left over"),
    ],
)
def test_a_batch_that_loses_its_framing_ends_with_the_error(frames: list[bytes], decoded: int,
                                                           message: str) -> None:
    results = decode_batch(frames)
    assert len(results) == decoded + 1
    assert not any(isinstance(r, RemoteProtocolError) for r in results[:-1])
    assert isinstance(results[-1], RemoteProtocolError) and message in str(results[-1])


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([_batch()], "non-empty list"),
        ([_batch(["stop", [""]], version=7)], "unsupported protocol version 7"),
        ([msgpack.packb([PROTOCOL_VERSION, [["stop", [""]]]])], "header must be"),
        ([_batch(["stop", [""]], sizes=(-1,)), b""], "payload sizes must be a list of sizes"),
        ([_batch(["stop", [""]], sizes=(True,)), b"x"], "payload sizes must be a list of sizes"),
        ([msgpack.packb([PROTOCOL_VERSION, [["stop", [""]]], {}])], "payload sizes must be a list"),
        ([_batch(["block-completion", [1, 0, ""]], sizes=(4,)), b"abc"], "payloads of 4 bytes in all"),
        ([_batch(["block-completion", [1, 0, ""]], sizes=(4,))], "0 payload frame(s)"),
        ([_batch(["stop", [""]]), b"stray"], "1 payload frame(s) of 5 bytes"),
        (encode_batch([pack(Stop()), pack(Stop())]), "expected one message, got a batch of 2"),
    ],
)
def test_bad_batch_envelopes(frames: list[bytes], message: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(frames)
    assert message in str(info.value)


def test_payload_limit_applies_to_each_message_of_a_batch() -> None:
    small = Limits(max_payload_bytes=8)
    frames = encode_batch([pack(BlockCompletion(1, data=b"x" * 8)), pack(BlockCompletion(2, data=b"y" * 9))])
    ok, too_big = decode_batch(frames, small)
    assert ok == BlockCompletion(1, data=b"x" * 8)
    assert isinstance(too_big, RemoteProtocolError) and "payload of 9 bytes exceeds" in str(too_big)


@given(st.lists(MESSAGES, min_size=2, max_size=6), st.data())
@settings(max_examples=200)
def test_mutated_batches_give_only_messages_or_protocol_errors(msgs: list[Message], data: st.DataObject) -> None:
    frames = encode_batch([pack(m) for m in msgs])
    header = frames[0]
    pos = data.draw(st.integers(min_value=0, max_value=len(header) - 1))
    byte = data.draw(st.integers(min_value=0, max_value=255))
    drop = data.draw(st.booleans())
    mutated = [header[:pos] + bytes([byte]) + header[pos + 1:], *frames[1:]]
    if drop and len(mutated) > 1:
        mutated.pop()
    try:
        results = decode_batch(mutated)
    except RemoteProtocolError:
        return
    assert all(isinstance(r, Message | RemoteProtocolError) for r in results)


def test_batches_of_65536_items_and_more() -> None:
    msgs = [Heartbeat(i, 0) for i in range(70_000)]
    big = Limits(max_container_len=70_000, max_header_bytes=1 << 22)
    assert decode_batch(encode_batch([pack(m) for m in msgs]), big) == msgs


@dataclasses.dataclass(frozen=True, slots=True)
class _PayloadFirst(Message):
    KIND = "test-payload-first"
    PAYLOAD = "data"
    data: bytes
    seq: int


@dataclasses.dataclass(frozen=True, slots=True)
class _NoFields(Message):
    KIND = "test-no-fields"


@pytest.mark.parametrize("msg", [_PayloadFirst(b"abc", 7), _NoFields()])
def test_unusual_message_shapes_round_trip(msg: Message, monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload field that is not the last one, and a message with no fields
    on the wire: alone and in a batch."""
    from protocol.wire import _messages

    monkeypatch.setitem(_messages.MESSAGE_TYPES, type(msg).KIND, type(msg))
    assert decode(encode(msg)) == msg
    assert decode_batch(encode_batch([pack(msg), pack(Heartbeat(1, 2)), pack(msg)])) == [msg, Heartbeat(1, 2), msg]


def test_an_empty_payload_travels_without_a_frame() -> None:
    read = BlockRequest(1, "d", "read", 0, 4096)
    assert len(encode(read)) == 1 and decode(encode(read)) == read
    header = encode(read)[0]
    assert decode([header, b""]) == read  # an explicit empty frame is accepted too


def _message_classes() -> list[type[Message]]:
    from protocol.wire._messages import MESSAGE_TYPES

    return sorted(MESSAGE_TYPES.values(), key=lambda c: c.KIND)


@pytest.mark.parametrize("cls", _message_classes(), ids=lambda c: c.KIND)
def test_messages_keep_the_dataclass_constructor(cls: type[Message]) -> None:
    """Messages get a faster ``__init__`` (stores through the slots); it takes
    exactly the parameters and defaults dataclass's did, and instances stay frozen."""
    fields = dataclasses.fields(cls)
    params = inspect.signature(cls).parameters
    assert list(params) == [f.name for f in fields]
    for f in fields:
        p = params[f.name]
        assert p.kind is p.POSITIONAL_OR_KEYWORD
        if f.default is not dataclasses.MISSING:
            assert p.default == f.default
        elif f.default_factory is not dataclasses.MISSING:
            assert repr(p.default) == "<factory>"
        else:
            assert p.default is p.empty
    sample = {f.name: getattr(_SAMPLES[cls], f.name) for f in fields}
    by_position = cls(*sample.values())
    assert by_position == cls(**sample) == _SAMPLES[cls]
    with pytest.raises(dataclasses.FrozenInstanceError):
        by_position.__setattr__(fields[0].name, sample[fields[0].name])


_SAMPLES: dict[type[Message], Message] = {type(m): m for m in [
    Hello("io0", 1, 2, ("a",), "ipc://x"), Welcome(2, ("a",), 5), SetPollParams(1, 2, 3, 4, 5), Stop("bye"), Resume(7),
    Query(1, "n"), QueryReply(1, {"a": 1}), Heartbeat(1, 2), NodeStats("n", {"rd_operations": 3}),
    Event("E", {"k": 1}), ErrorReply(1, "C", "m", 5),
    BlockdevAdd(1, "n", "file", {"filename": "f"}, {"wr_bytes": 4}, (10, 20)), BlockdevDel(1, "n", True),
    SetLatencyHistogram(1, "n", (1, 2)),
    BlockRequest(1, "n", "write", 512, 3, 0, b"abc"), BlockCompletion(1, -5, "m", b"x"),
    NbdConnection(3, "e", "n", 0x4d, True, {"base:allocation": 0}, b"\x25"), NbdCloseExport(1, "e"),
    NbdOffer("e", "n", "name", 4096, "d", True, False, True, 512, True, False),
]}


def test_message_defaults_from_a_factory_are_fresh_and_post_init_still_checks() -> None:
    assert QueryReply(1).counters == {} and QueryReply(1).counters is not QueryReply(2).counters
    assert Event("E").data is not Event("E").data
    with pytest.raises(ValueError, match="unknown block op"):
        BlockRequest(1, "n", "bogus")
    with pytest.raises(ValueError, match="must be >= 0"):
        BlockRequest(1, "n", "read", offset=-1)
    assert set(_SAMPLES) == set(_message_classes())


# -- refusals that name their request: the receiver can answer them ---------------------------

_BAD = st.one_of(st.text(max_size=8), st.none(), st.booleans(), st.floats(allow_nan=False),
                 st.binary(max_size=8), st.lists(st.integers(0, 9), max_size=3),
                 st.integers(min_value=-(2**63), max_value=-1))
_LONG = st.text(alphabet="ab", min_size=4097, max_size=4200)  # over the string limit: msgpack refuses the header
_OPS = [o.value for o in BlockOp]


@st.composite
def _bad_block_request_bodies(draw: st.DrawFn) -> list[object]:
    """A block request's fields with at least one out of range: a negative
    offset or length, an unknown op, a node name over the limit, a field of
    the wrong type, a field too many or too few."""
    body: list[object] = [draw(st.text(max_size=12)), draw(st.sampled_from(_OPS)),
                          draw(naturals), draw(naturals), draw(ints)]
    for i in draw(st.sets(st.integers(0, 4), min_size=1)):
        body[i] = draw(st.one_of(_BAD, _LONG, st.text(max_size=12).filter(lambda s: s not in _OPS)))
    if draw(st.booleans()):
        body = body[:draw(st.integers(0, 4))] + draw(st.lists(_BAD, max_size=2))
    return body


@given(ints, _bad_block_request_bodies(), st.data())
@settings(max_examples=300)
def test_a_refused_request_names_its_id_whenever_it_can_be_read(request_id: int, body: list[object],
                                                                  data: st.DataObject) -> None:
    """For any request with fields out of range, whole or cut short, the
    decoder either refuses it by its id (``BadRequestError``, the id it
    carried) or says it could not read the id (a plain
    ``RemoteProtocolError``), and it says the latter only when the frame ends
    before the id does."""
    header = msgpack.packb([PROTOCOL_VERSION, "block-request", [request_id, *body]])
    id_ends = len(msgpack.packb([PROTOCOL_VERSION, "block-request", []])) + len(msgpack.packb(request_id))
    cut = data.draw(st.one_of(st.just(len(header)), st.integers(0, len(header))))
    try:
        msg = decode([header[:cut]])
    except BadRequestError as exc:
        assert (exc.request_id, exc.kind) == (request_id, "block-request")
        assert cut >= id_ends
    except RemoteProtocolError:
        assert cut < id_ends, "the id could be read but the error does not carry it"
    else:  # the fields were in range after all (a cut that still makes a request is not possible)
        assert isinstance(msg, BlockRequest) and msg.request_id == request_id and cut == len(header)


@given(_BAD.filter(lambda v: type(v) is not int), _bad_block_request_bodies())
def test_an_unreadable_id_is_said_to_be_unreadable(request_id: object, body: list[object]) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode([msgpack.packb([PROTOCOL_VERSION, "block-request", [request_id, *body]])])
    assert not isinstance(info.value, BadRequestError)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([7, "d", "read", -1, 512, 0], "offset and length must be >= 0"),
        ([7, "d", "read", 0, -512, 0], "offset and length must be >= 0"),
        ([7, "d", "explode", 0, 0, 0], "unknown block op 'explode'"),
        ([7, "d" * 5000, "read", 0, 512, 0], "exceeds max_str_len"),
        ([7, "d", "read", "0", 512, 0], "field 'offset' has type str"),
        ([7, "d", "read", 0, 512], "expected 6 field(s)"),
        ([7], "expected 6 field(s)"),
    ],
)
def test_bad_requests_are_refused_by_id(body: list[object], message: str) -> None:
    with pytest.raises(BadRequestError) as info:
        decode([_header("block-request", body)])
    assert info.value.request_id == 7 and info.value.kind == "block-request" and message in str(info.value)
    with pytest.raises(BadRequestError, match="expected 1 or 2 frames"):  # a frame too many
        decode([_header("block-request", [7, "d", "read", 0, 0, 0]), b"", b""])


def test_only_kinds_that_name_a_request_are_refused_by_id() -> None:
    with pytest.raises(BadRequestError) as info:
        decode([_header("query", [9, 5])])
    assert (info.value.request_id, info.value.kind) == (9, "query")
    with pytest.raises(BadRequestError) as info:
        decode([_header("block-completion", [9, "ok", ""])])  # a reply: its request can be failed
    assert info.value.kind == "block-completion"
    for header in (_header("heartbeat", [9, "x"]), _header("nonsense", [9]), b"\xc1garbage",
                   _header("block-request", [9, "d", "read", 0, 0, 0], version=99)):
        with pytest.raises(RemoteProtocolError) as plain:
            decode([header])
        assert not isinstance(plain.value, BadRequestError)


def test_a_refused_batch_names_every_id_it_can_read() -> None:
    good, long_name, after = ([i, n, "read", 0, 0, 0] for i, n in ((1, "d"), (2, "d" * 5000), (3, "d")))
    # An over-long string spoils the whole header; the ids around it can still be read.
    results = decode_batch([_batch(["block-request", good], ["heartbeat", [1, 0]], ["block-request", long_name],
                                   ["block-request", after], sizes=(0, 0, 0))])
    assert [r.request_id for r in results if isinstance(r, BadRequestError)] == [1, 2, 3]
    assert sum(type(r) is RemoteProtocolError for r in results) == 1  # the heartbeat, unread
    # Payload sizes that do not match the payload frame: every request refused by id.
    results = decode_batch([_batch(["block-request", good], ["block-request", after], sizes=(4, 0)), b"abc"])
    assert all(isinstance(r, BadRequestError) and "payloads of 4 bytes" in str(r) for r in results)
    assert [r.request_id for r in results if isinstance(r, BadRequestError)] == [1, 3]
    # An unknown kind ends the batch: the requests after it are still refused by id.
    results = decode_batch([_batch(["block-request", good], ["nonsense", []], ["block-request", after],
                                   sizes=(0, 0)), b""])
    assert results[0] == BlockRequest(1, "d", "read")
    assert type(results[1]) is RemoteProtocolError and "unknown message kind" in str(results[1])
    assert isinstance(results[2], BadRequestError) and results[2].request_id == 3 and len(results) == 3
