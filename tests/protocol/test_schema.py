"""The option schema: its type system, the two input forms, QEMU's error
texts, and the declarations (BlockdevOptions, ObjectOptions, the commands)."""

from __future__ import annotations

import enum
from typing import Annotated, Any

import pytest

from protocol.schema import (
    COMMANDS,
    BlockExportInfo,
    BlockExportOptions,
    BlockExportOptionsNbd,
    BlockExportRemoveMode,
    BlockExportType,
    BlockdevCacheOptions,
    BlkdebugInjectErrorOptions,
    BlkdebugSetStateOptions,
    BlockdevDriver,
    BlockdevOptions,
    BlockdevOptionsFile,
    BlockdevOptionsBlkdebug,
    BlockdevOptionsNull,
    FlatUnion,
    IOThreadInfo,
    IothreadOptions,
    IothreadProperties,
    NbdServerOptions,
    NbdServerOptionsLegacy,
    ObjectOptions,
    SchemaError,
    SocketAddress,
    SocketAddressInet,
    SocketAddressType,
    SocketAddressUnix,
    blockdev_from_wire,
    blockdev_to_wire,
    dump,
    flatten,
    member,
    members,
    parse,
    parse_member,
    parse_size,
    socket_address_flatten,
    struct,
    type_name,
    unflatten,
)
from protocol.schema._types import Check, Range, Size, UInt64


class Color(enum.StrEnum):
    RED = "red"
    DARK_BLUE = "dark-blue"


@struct
class Inner:
    flag: bool = member(default=False, doc="a flag")
    count: Annotated[int, Range(1, 9)] = member(default=1, doc="a count")


@struct
class Sample:
    name: str = member(doc="required")
    color: Color = member(default=Color.RED, doc="an enum")
    size: Size = member(default=0, doc="a size")
    inner: Inner = member(default_factory=Inner, doc="nested")
    items: tuple[UInt64, ...] = member(default=(), doc="a list")
    tag: Annotated[str, Check(str.isupper, "Parameter '{name}' wants capitals, not '{value}'")] | None = member(
        default=None, doc="checked, optional")
    anything: Any = member(default=None, doc="any value")


def error(tp: Any, value: object, *, keyval: bool = False) -> str:
    with pytest.raises(SchemaError) as info:
        parse(tp, value, keyval=keyval)
    assert info.value.error_class == "GenericError"
    return info.value.desc


def test_json_input_is_typed_with_defaults_filled_in() -> None:
    v = parse(Sample, {"name": "x", "color": "dark-blue", "size": 4096, "inner": {"count": 9},
                       "items": [1, 2**64 - 1], "tag": "AB", "anything": [None, {"k": 1.5}]})
    assert v == Sample(name="x", color=Color.DARK_BLUE, size=4096, inner=Inner(flag=False, count=9),
                       items=(1, 2**64 - 1), tag="AB", anything=[None, {"k": 1.5}])
    assert parse(Sample, {"name": "y"}) == Sample(name="y")
    assert dump(parse(Sample, {"name": "y"})) == {  # absent optional members stay out
        "name": "y", "color": "red", "size": 0, "inner": {"flag": False, "count": 1}, "items": [],
        "anything": None}


def test_keyval_input_is_converted_per_declared_type() -> None:
    v = parse(Sample, {"name": "x", "color": "red", "size": "1.5k", "inner": {"flag": "on", "count": "0x9"},
                       "items": {"0": "010", "1": "7"}}, keyval=True)
    assert (v.size, v.inner, v.items) == (1536, Inner(flag=True, count=9), (8, 7))  # 010: octal, as C reads it
    # QEMU's qapi_bool_parse: its error names 'on' and 'off', but it takes these too.
    for text, flag in [("yes", True), ("true", True), ("y", True), ("no", False), ("false", False), ("n", False)]:
        assert parse(Inner, {"flag": text}, keyval=True).flag is flag


@pytest.mark.parametrize(("value", "keyval", "message"), [
    ({}, False, "Parameter 'name' is missing"),
    ({"name": "x", "nmae": "y"}, False, "Parameter 'nmae' is unexpected"),
    ({"name": "x", "inner": {"flga": True}}, False, "Parameter 'inner.flga' is unexpected"),
    ({"name": 1}, False, "Invalid parameter type for 'name', expected: string"),
    ({"name": "x", "size": "4k"}, False, "Invalid parameter type for 'size', expected: integer"),
    ({"name": "x", "size": True}, False, "Invalid parameter type for 'size', expected: integer"),
    ({"name": "x", "size": 1.0}, False, "Invalid parameter type for 'size', expected: integer"),
    ({"name": "x", "size": -1}, False, "size value must be in range [0, 9223372036854775807]"),
    ({"name": "x", "inner": {"flag": "on"}}, False, "Invalid parameter type for 'inner.flag', expected: boolean"),
    ({"name": "x", "inner": {"count": 10}}, False, "inner.count value must be in range [1, 9]"),
    ({"name": "x", "inner": []}, False, "Invalid parameter type for 'inner', expected: object"),
    ({"name": "x", "color": "blue"}, False, "Parameter 'color' does not accept value 'blue'"),
    ({"name": "x", "color": 3}, False, "Invalid parameter type for 'color', expected: string"),
    ({"name": "x", "items": [1, -1]}, False, "items[1] value must be in range [0, 18446744073709551615]"),
    ({"name": "x", "items": 1}, False, "Invalid parameter type for 'items', expected: array"),
    ({"name": "x", "tag": "ab"}, False, "Parameter 'tag' wants capitals, not 'ab'"),
    ({"name": "x", "tag": None}, False, "Invalid parameter type for 'tag', expected: string"),  # no nulls
    ({"name": "x", "size": "lots"}, True, "Parameter 'size' expects size"),
    ({"name": "x", "inner": {"flag": "On"}}, True, "Parameter 'inner.flag' expects 'on' or 'off'"),
    ({"name": "x", "inner": {"flag": "1"}}, True, "Parameter 'inner.flag' expects 'on' or 'off'"),
    ({"name": "x", "inner": {"count": "08"}}, True, "Parameter 'inner.count' expects integer"),
    ({"name": "x", "inner": {"count": "99999999999999999999999"}}, True, "Parameter 'inner.count' expects integer"),
    ({"name": "x", "inner": "on"}, True, "Invalid parameter type for 'inner', expected: object"),
    ({"name": {"first": "x"}}, True, "Parameters 'name.*' are unexpected"),
    ({"name": "x", "items": {"0": "1", "2": "3"}}, True, "Invalid parameter type for 'items', expected: array"),
    ({"name": "x", "items": {"0": "-1"}}, True, "items.0 value must be in range [0, 18446744073709551615]"),
    (["name"], False, "Invalid parameter type for '<anonymous>', expected: object"),
])
def test_errors_are_qemus(value: object, keyval: bool, message: str) -> None:
    assert error(Sample, value, keyval=keyval) == message


def test_an_unknown_member_is_named_before_a_missing_one() -> None:
    """A typo names itself instead of passing for the member it misspells."""
    assert error(BlockdevOptions, {"driver": "file", "node-name": "d", "filenme": "/x"}) == \
        "Parameter 'filenme' is unexpected"


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0), ("4096", 4096), ("4k", 4096), ("4K", 4096), ("1.5M", 3 << 19), ("1G", 1 << 30), ("2t", 2 << 40),
    ("1p", 1 << 50), ("1E", 1 << 60), ("16E", None), ("0x10", 16), ("7b", 7), (".5k", 512), ("1.k", 1024),
    ("1.", None),
    ("1.5", None), ("1.5b", None), ("1e3", None), ("-1", None), ("k", None), ("", None), ("4 k", None),
    ("4kk", None), ("0x1k", None), (" 4k", 4096), ("18446744073709551615", 2**64 - 1),
    ("18446744073709551616", None), ("nan", None), ("inf", None),
])
def test_sizes(text: str, size: int | None) -> None:
    assert parse_size(text) == size


def test_flat_union_picks_the_branch_by_its_discriminator() -> None:
    f = parse(BlockdevOptions, {"driver": "file", "node-name": "d0", "filename": "/x.img"})
    assert isinstance(f, BlockdevOptionsFile) and f.cache == BlockdevCacheOptions(direct=False)
    n = parse(BlockdevOptions, {"driver": "null-co", "node-name": "n0"})
    assert n == BlockdevOptionsNull(driver=BlockdevDriver.NULL_CO, node_name="n0", read_only=False, iothread=None,
                                    size=1 << 30, read_zeroes=False)
    assert error(BlockdevOptions, {"node-name": "n"}) == "Parameter 'driver' is missing"
    assert error(BlockdevOptions, {"driver": "qcow2", "node-name": "n"}) == \
        "Parameter 'driver' does not accept value 'qcow2'"
    assert error(BlockdevOptions, {"driver": "null-co"}) == "Parameter 'node-name' is missing"
    assert error(BlockdevOptions, {"driver": "null-co", "node-name": "n", "filename": "/x"}) == \
        "Parameter 'filename' is unexpected"  # the other branch's member
    assert error(BlockdevOptions, {"driver": "file", "node-name": "9", "filename": "/x"}) == \
        "Invalid node-name: '9'"
    with pytest.raises(TypeError):
        FlatUnion("Bad", BlockdevOptionsFile, "driver", {"null-co": BlockdevOptionsNull}, doc="")


def test_a_member_may_be_a_flat_union() -> None:
    """``Annotated[Base, union]``: the NBD server's address, in the command
    line's flat form and in QMP's older one, each with the other's messages
    under its own paths."""
    flat = parse(NbdServerOptions, unflatten({"addr.type": "unix", "addr.path": "/s", "max-connections": "2"}),
                 keyval=True)
    assert flat == NbdServerOptions(addr=SocketAddressUnix(type=SocketAddressType.UNIX, path="/s"), max_connections=2,
                                    handshake_max_seconds=10)
    assert dump(flat) == {"handshake-max-seconds": 10, "max-connections": 2, "addr": {"type": "unix", "path": "/s"}}
    legacy = parse(NbdServerOptionsLegacy, {"addr": {"type": "inet", "data": {"host": "::1", "port": "nbd"}}})
    assert socket_address_flatten(legacy.addr) == SocketAddressInet(type=SocketAddressType.INET, host="::1",
                                                                    port="nbd")
    assert error(NbdServerOptions, {"addr": {"type": "inet", "host": "h"}}) == "Parameter 'addr.port' is missing"
    assert error(NbdServerOptions, {"addr": {"type": "vsock"}}) == "Parameter 'addr.type' does not accept value 'vsock'"
    assert error(NbdServerOptions, {"addr": {"path": "/s"}}) == "Parameter 'addr.type' is missing"
    assert error(NbdServerOptions, {"addr": "/s"}) == "Invalid parameter type for 'addr', expected: object"
    assert error(NbdServerOptionsLegacy, {"addr": {"type": "unix", "path": "/s"}}) == \
        "Parameter 'addr.path' is unexpected"
    assert error(NbdServerOptionsLegacy, {"addr": {"type": "unix", "data": {}}}) == \
        "Parameter 'addr.data.path' is missing"
    assert error(NbdServerOptions, {"addr": {"type": "unix", "path": "/s"}, "max-connections": 1 << 32}) == \
        "max-connections value must be in range [0, 4294967295]"
    assert type_name(SocketAddress) == "SocketAddress"


def test_block_export_options() -> None:
    e = parse(BlockExportOptions, unflatten({"type": "nbd", "id": "e0", "node-name": "n0", "writable": "on"}),
              keyval=True)
    assert e == BlockExportOptionsNbd(type=BlockExportType.NBD, id="e0", node_name="n0", writable=True, name=None,
                                      description=None, allocation_depth=False)
    assert error(BlockExportOptions, {"type": "nbd", "id": "0", "node-name": "n0"}) == "Invalid block export id"
    assert error(BlockExportOptions, {"type": "fuse", "id": "e0", "node-name": "n0"}) == \
        "Parameter 'type' does not accept value 'fuse'"
    assert COMMANDS["block-export-del"].parse_arguments({"id": "e0"}).mode is BlockExportRemoveMode.SAFE
    assert COMMANDS["query-block-exports"].dump_result([BlockExportInfo(
        id="e0", type=BlockExportType.NBD, node_name="n0", shutting_down=True)]) == [
        {"id": "e0", "type": "nbd", "node-name": "n0", "shutting-down": True}]


def test_object_options() -> None:
    o = parse(ObjectOptions, {"qom-type": "iothread", "id": "io0", "poll-max-ns": "0", "aio-max-batch": "32"},
              keyval=True)
    assert o == IothreadOptions(qom_type="iothread", id="io0", poll_max_ns=0, aio_max_batch=32)  # type: ignore[arg-type]
    assert error(ObjectOptions, {"qom-type": "iothread", "id": "0io"}) == "Parameter 'id' expects an identifier"
    assert error(ObjectOptions, {"qom-type": "iothread"}) == "Parameter 'id' is missing"
    assert error(ObjectOptions, {"qom-type": "iothread", "id": "a", "poll-grow": 2**63}) == \
        "poll-grow value must be in range [0, 9223372036854775807]"
    assert parse_member(IothreadProperties, "poll-shrink", 4) == 4
    with pytest.raises(SchemaError, match="^poll-shrink value must be in range"):
        parse_member(IothreadProperties, "poll-shrink", -4)
    info = IOThreadInfo(id="io0", thread_id=42)
    assert dump(info) == {"poll-max-ns": 32768, "poll-grow": 0, "poll-shrink": 0, "aio-max-batch": 0,
                          "id": "io0", "thread-id": 42}


def test_the_blockdev_message_carries_the_validated_options_and_back() -> None:
    for value in ({"driver": "file", "node-name": "d", "filename": "/x", "cache": {"direct": True},
                   "read-only": True, "iothread": "io1"},
                  {"driver": "null-co", "node-name": "n", "read-only": True, "size": 4096}):
        options = parse(BlockdevOptions, value)
        wire = blockdev_to_wire(options)
        assert "driver" not in wire and "node-name" not in wire and "iothread" not in wire
        assert wire["read-only"] is True
        back = blockdev_from_wire(options.node_name, options.driver.value, wire)
        assert back == parse(BlockdevOptions, {k: v for k, v in value.items() if k != "iothread"})
    assert blockdev_to_wire(parse(BlockdevOptions, {"driver": "file", "node-name": "d", "filename": "/x"})) == {
        "read-only": False, "werror": "report", "rerror": "report", "filename": "/x",
        "cache.direct": False}  # defaults filled in, flattened
    # A peer's message is checked as strictly as QMP's arguments.
    for driver, options, message in [
        ("qcow2", {}, "Parameter 'driver' does not accept value 'qcow2'"),
        ("null-co", {"read-only": "on"}, "Invalid parameter type for 'read-only', expected: boolean"),
        ("null-co", {"driver": "file"}, "Parameter 'driver' is unexpected"),
        ("file", {"filename": "/x", "cache.direct": True, "cache": 1}, "Parameter 'cache' used inconsistently"),
    ]:
        with pytest.raises(SchemaError) as info:
            blockdev_from_wire("n", driver, options)
        assert info.value.desc == message


def test_flatten_and_unflatten() -> None:
    nested = {"a": 1, "b": {"c": True, "d": {"e": "x"}}}
    assert flatten(nested) == {"a": 1, "b.c": True, "b.d.e": "x"}
    assert unflatten(flatten(nested)) == nested
    for flat, message in [({"a": 1, "a.b": 2}, "Parameter 'a' used inconsistently"),
                          ({"a.b": 2, "a": 1}, "Parameter 'a' used inconsistently"),
                          ({"a..b": 1}, "Invalid parameter 'a..b'"), ({".a": 1}, "Invalid parameter '.a'")]:
        with pytest.raises(SchemaError) as info:
            unflatten(flat)
        assert info.value.desc == message
    # Lists: their items keyed by index, and back (``lists=True``, for JSON-typed values).
    listed = {"a": [{"b": 1}, {"b": 2, "c": [True]}], "d": []}
    assert flatten(listed) == {"a.0.b": 1, "a.1.b": 2, "a.1.c.0": True}
    assert unflatten(flatten(listed), lists=True) == {"a": [{"b": 1}, {"b": 2, "c": [True]}]}  # ([]: no keys)
    assert unflatten(flatten(listed)) == {"a": {"0": {"b": 1}, "1": {"b": 2, "c": {"0": True}}}}  # keyval's way
    assert unflatten({"a.1": 1, "a.0": 2}, lists=True) == {"a": {"1": 1, "0": 2}}  # out of order: not a list
    with pytest.raises(TypeError):
        flatten({"a": {1.5}})


def test_every_member_is_documented_and_named_for_the_wire() -> None:
    declared: list[Any] = [BlockdevOptionsFile, BlockdevOptionsNull, BlockdevOptionsBlkdebug,
                           BlkdebugInjectErrorOptions, BlkdebugSetStateOptions, IothreadOptions, IOThreadInfo,
                           BlockExportOptionsNbd, BlockExportInfo, NbdServerOptions, SocketAddressInet,
                           SocketAddressUnix]
    declared += [c.arguments for c in COMMANDS.values()]
    for tp in declared:
        for m in members(tp):
            assert m.doc, f"{tp}: {m.name}"
            assert "_" not in m.name or m.name == "new_state", m.name  # (QEMU spells that one so)
    assert [m.name for m in members(BlockdevOptions)] == ["driver", "node-name", "read-only", "iothread",
                                                          "werror", "rerror"]
    assert type_name(BlockdevOptions) == "BlockdevOptions" and type_name(tuple[UInt64, ...]) == "[uint64]"
    assert type_name(Size) == "size"


def test_commands_check_arguments_and_write_results_as_declared() -> None:
    assert {"blockdev-add", "object-add", "query-commands", "qom-set"} <= set(COMMANDS)
    add = COMMANDS["blockdev-add"]
    assert add.parse_arguments({"driver": "null-co", "node-name": "n"}).size == 1 << 30
    with pytest.raises(SchemaError, match="^Parameter 'x' is unexpected$"):
        COMMANDS["query-status"].parse_arguments({"x": 1})
    with pytest.raises(SchemaError, match="^Parameter 'enable\\[0\\]' does not accept value 'x'$"):
        COMMANDS["qmp_capabilities"].parse_arguments({"enable": ["x"]})
    assert COMMANDS["query-iothreads"].dump_result([IOThreadInfo(id="a", thread_id=1)])[0]["thread-id"] == 1
    assert COMMANDS["quit"].dump_result(None) == {}
    assert COMMANDS["qom-get"].dump_result(7) == 7
