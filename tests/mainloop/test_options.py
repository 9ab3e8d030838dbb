"""QEMU's keyval syntax and the --object parser."""

from __future__ import annotations

import pytest

from mainloop._options import OptionError, parse_keyval, parse_object


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
    with pytest.raises(OptionError, match="expects an integer"):
        parse_object('{"qom-type": "iothread", "id": "io1", "poll-max-ns": true}')
    assert parse_keyval("a=1,,", implied_key=None) == {"a": "1,"}


def test_parse_blockdev_forms_and_errors() -> None:
    from mainloop._options import parse_blockdev, parse_size

    spec = parse_blockdev("driver=file,node-name=disk0,filename=/x.img,cache.direct=on,read-only=off,iothread=io1")
    assert (spec.node_name, spec.driver, spec.iothread) == ("disk0", "file", "io1")
    assert spec.options == {"filename": "/x.img", "cache.direct": True, "read-only": False}
    j = parse_blockdev('{"driver": "file", "node-name": "d", "filename": "/y", "cache": {"direct": true}}')
    assert j.options["cache.direct"] is True
    n = parse_blockdev("driver=null-co,node-name=null0,size=1G,read-zeroes=off")
    assert n.options == {"size": 1 << 30, "read-zeroes": False}
    assert parse_size("s", "512K") == 512 * 1024 and parse_size("s", 4096) == 4096
    for text, message in [
        ("driver=file,node-name=d", "Parameter 'filename' is missing"),
        ("driver=qcow2,node-name=d", "Invalid parameter value for 'driver'"),
        ("driver=file,filename=/x", "Parameter 'node-name' is missing"),
        ("driver=file,node-name=0bad,filename=/x", "Invalid node-name"),
        ("driver=file,node-name=d,filename=/x,cache=x", "Invalid parameter 'cache'"),
        ("driver=file,node-name=d,filename=/x,read-only=maybe", "expects 'on' or 'off'"),
        ("driver=null-co,node-name=n,size=lots", "expects a size"),
        ('{"driver": "file", "node-name": "d", "filename": "/y", "cache": {"no-flush": true}}',
         "Invalid parameter 'cache.no-flush'"),
    ]:
        with pytest.raises(OptionError, match=message):
            parse_blockdev(text)
