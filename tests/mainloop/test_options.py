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
