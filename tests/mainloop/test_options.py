"""QEMU's keyval syntax, and the --object / --blockdev / --chardev / --monitor parsers."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from mainloop.cli._options import (
    OptionError,
    parse_blockdev,
    parse_chardev,
    parse_keyval,
    parse_monitor,
    parse_object,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a=1,b=2", {"a": "1", "b": "2"}),
        ("iothread,id=io0", {"qom-type": "iothread", "id": "io0"}),
        ("x,path=a,,b,,,c=d", {"qom-type": "x", "path": "a,b,", "c": "d"}),
        ("x,empty=", {"qom-type": "x", "empty": ""}),
        ("x,v=a=b", {"qom-type": "x", "v": "a=b"}),
    ],
)
def test_keyval(text: str, expected: dict[str, str]) -> None:
    assert parse_keyval(text, implied_key="qom-type") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a=1,b", "Expected '=' after parameter 'b'"),
        ("a", "Expected '=' after parameter 'a'"),
        ("a=1,=2", "Invalid parameter ''"),
        ("a=1,a=2", "Parameter 'a' is given twice"),
        ("a=1,", "Expected parameter before ','"),
    ],
)
def test_keyval_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        parse_keyval(text, implied_key=None)


def test_parse_object_values() -> None:
    c = parse_object("iothread,id=io0,poll-max-ns=0x100,poll-grow=2,poll-shrink=3,aio-max-batch=32")
    assert (c.id, c.poll_max_ns, c.poll_grow, c.poll_shrink, c.aio_max_batch) == ("io0", 256, 2, 3, 32)
    j = parse_object('{"qom-type": "iothread", "id": "io1", "poll-max-ns": 0}')
    assert (j.id, j.poll_max_ns) == ("io1", 0)
    with pytest.raises(OptionError, match="Invalid parameter type for 'poll-max-ns', expected: integer"):
        parse_object('{"qom-type": "iothread", "id": "io1", "poll-max-ns": true}')
    assert parse_object("iothread,id=io2,poll-grow=010").poll_grow == 8  # C's syntax, as QEMU's keyval
    for text, message in [
        ("iothread,id=io0,poll-max-ns=lots", "Parameter 'poll-max-ns' expects integer"),
        ("iothread,id=io0,poll-grow=-1", "poll-grow value must be in range [0, 9223372036854775807]"),
        ("iothread,id=io0,bogus=1", "Parameter 'bogus' is unexpected"),
        ("iothread,id=0io", "Parameter 'id' expects an identifier"),
        ("iothread", "Parameter 'id' is missing"),
        ("memory-backend-ram,id=m0", "Parameter 'qom-type' does not accept value 'memory-backend-ram'"),
        ('{"qom-type": "iothread", "id": 5}', "Invalid parameter type for 'id', expected: string"),
    ]:
        with pytest.raises(OptionError) as info:
            parse_object(text)
        assert str(info.value) == message
    assert parse_keyval("a=1,,", implied_key=None) == {"a": "1,"}


def test_parse_blockdev_forms_and_errors() -> None:
    from mainloop.cli._options import parse_blockdev, parse_size

    spec = parse_blockdev("driver=file,node-name=disk0,filename=/x.img,cache.direct=on,read-only=off,iothread=io1")
    assert (spec.node_name, spec.driver, spec.iothread) == ("disk0", "file", "io1")
    assert spec.options == {"filename": "/x.img", "cache.direct": True, "read-only": False, "werror": "report",
                            "rerror": "report"}
    j = parse_blockdev('{"driver": "file", "node-name": "d", "filename": "/y", "cache": {"direct": true}}')
    assert j.options["cache.direct"] is True
    n = parse_blockdev("driver=null-co,node-name=null0,size=1G,read-zeroes=off,read-only=on")
    assert n.options == {"size": 1 << 30, "read-zeroes": False, "read-only": True,  # read-only kept for null-co
                         "werror": "report", "rerror": "report"}
    assert parse_blockdev("driver=null-co,node-name=n").options == {"size": 1 << 30, "read-zeroes": False,
                                                                    "read-only": False, "werror": "report",
                                                                    "rerror": "report"}  # the defaults
    assert parse_size("s", "512K") == 512 * 1024 and parse_size("s", "4096") == 4096
    for text, message in [
        ("driver=file,node-name=d", "Parameter 'filename' is missing"),
        ("driver=qcow2,node-name=d", "Parameter 'driver' does not accept value 'qcow2'"),
        ('{"driver": "qcow2", "node-name": "d"}', "Parameter 'driver' does not accept value 'qcow2'"),
        ("node-name=d", "Parameter 'driver' is missing"),
        ("driver=file,filename=/x", "Parameter 'node-name' is missing"),
        ("driver=file,node-name=0bad,filename=/x", "Invalid node-name: '0bad'"),
        ("driver=file,node-name=d,filename=/x,cache=x", "Invalid parameter type for 'cache', expected: object"),
        ("driver=file,node-name=d,filename=/x,read-only=maybe", "Parameter 'read-only' expects 'on' or 'off'"),
        ("driver=file,node-name=d,filename=/x,read-only=ON", "Parameter 'read-only' expects 'on' or 'off'"),
        ("driver=file,node-name=d,filename.x=/x", "Parameters 'filename.*' are unexpected"),
        ("driver=file,node-name=d,filename=/x,cache=x,cache.direct=on", "Parameter 'cache' used inconsistently"),
        ("driver=null-co,node-name=n,size=lots", "Parameter 'size' expects size"),
        ("driver=null-co,node-name=n,size=1.5", "Parameter 'size' expects size"),  # no fraction of a byte
        ("driver=null-co,node-name=n,size=8E", "size value must be in range [0, 9223372036854775807]"),
        ("driver=null-co,node-name=n,cache.direct=on", "Parameter 'cache' is unexpected"),  # file only
        ('{"driver": "null-co", "node-name": "n", "size": "4k"}',
         "Invalid parameter type for 'size', expected: integer"),
        ('{"driver": "file", "node-name": "d", "filename": "/y", "cache": {"no-flush": true}}',
         "Parameter 'cache.no-flush' is unexpected"),
        ('{"driver": "file", "node-name": "d", "filename": "/y", "cache.direct": true}',
         "Parameter 'cache.direct' is unexpected"),  # dotted keys are the keyval form's
    ]:
        with pytest.raises(OptionError) as info:
            parse_blockdev(text)
        assert str(info.value) == message, text


# Every kind of JSON value, for every key an option knows: the parsers answer
# with a value or an OptionError, never another exception (a traceback).
_JSON_VALUES: list[object] = [None, True, 0, -1, 2**70, 1.5, 1e400, "", "x", "1.e400", [1], {"a": 1}]
_OBJECT = {"qom-type": "iothread", "id": "io0", "poll-max-ns": 0, "poll-grow": 0, "poll-shrink": 0,
           "aio-max-batch": 0}
_NULL_CO = {"driver": "null-co", "node-name": "n0", "size": 1 << 20, "read-zeroes": True, "read-only": False,
            "iothread": "io0"}
_FILE = {"driver": "file", "node-name": "d0", "filename": "/x.img", "cache": {"direct": True}, "read-only": False}
_TCP = {"backend": "socket", "id": "c0", "host": "127.0.0.1", "port": 0, "server": True, "wait": False}
_UNIX = {"backend": "socket", "id": "c0", "path": "/tmp/c0.sock", "server": True, "wait": False}
_MONITOR = {"chardev": "c0", "mode": "control", "pretty": False}
_VALID: list[tuple[Callable[[str], object], dict[str, object]]] = [
    (parse_object, _OBJECT), (parse_blockdev, _NULL_CO), (parse_blockdev, _FILE), (parse_chardev, _TCP),
    (parse_chardev, _UNIX), (parse_monitor, _MONITOR),
]


def _outcome(parse: Callable[[str], object], text: str) -> str:
    try:
        parse(text)
    except OptionError:
        return "OptionError"
    except Exception as exc:
        return repr(exc)
    return "ok"


@pytest.mark.parametrize(("parse", "valid"), _VALID, ids=lambda v: getattr(v, "__name__", ""))
def test_json_values_of_any_type_give_option_errors(parse: Callable[[str], object],
                                                    valid: dict[str, object]) -> None:
    assert _outcome(parse, json.dumps(valid)) == "ok"
    outcomes = {(key, repr(value)): _outcome(parse, json.dumps({**valid, key: value}))
                for key in [*valid, "unknown"] for value in _JSON_VALUES}
    assert {k: v for k, v in outcomes.items() if v not in ("ok", "OptionError")} == {}


@pytest.mark.parametrize(
    ("parse", "props", "message"),
    [
        (parse_chardev, {**_TCP, "port": [1]}, "Parameter 'port' expects a port number"),
        (parse_chardev, {**_TCP, "port": {"a": 1}}, "Parameter 'port' expects a port number"),
        (parse_chardev, {**_TCP, "port": True}, "Parameter 'port' expects a port number"),
        (parse_chardev, {**_TCP, "port": 1.5}, "Parameter 'port' expects a port number"),
        (parse_chardev, {**_TCP, "port": "65536"}, "Parameter 'port' expects a port number"),
        (parse_chardev, {**_TCP, "host": ["h"]}, "Parameter 'host' expects a string"),
        (parse_chardev, {**_UNIX, "path": {"p": 1}}, "Parameter 'path' expects a string"),
        (parse_blockdev, {**_NULL_CO, "size": "1M"}, "Invalid parameter type for 'size', expected: integer"),
        (parse_blockdev, {**_NULL_CO, "size": 2**70}, "size value must be in range"),
    ],
)
def test_wrong_json_types_are_named(parse: Callable[[str], object], props: dict[str, object],
                                    message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse(json.dumps(props))


def test_deeply_nested_json_is_a_parse_error() -> None:
    with pytest.raises(OptionError, match="JSON parse error"):
        parse_object('{"qom-type": ' + "[" * 100_000 + "]" * 100_000 + "}")


def test_sizes() -> None:
    """QEMU's sizes: powers of 1024, a fraction only with a unit, no exponents."""
    assert [parse_size("s", t) for t in ("1.5k", "0x1000", "1K", "2m", ".5G", "7b")] == [
        1536, 4096, 1024, 2 << 20, 1 << 29, 7]
    for text in ("1.e3", "1.e400", "1.e400k", "-1.5", "-1", "nan", "inf", "1.5", "1.5b", "4 k", "8E", "0x1.8k", ""):
        with pytest.raises(OptionError, match="Parameter 's' expects a size"):
            parse_size("s", text)
