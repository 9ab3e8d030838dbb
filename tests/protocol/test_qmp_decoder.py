"""The streaming QMP decoder: any split of the input gives the same messages."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import QmpDecoder, QmpInputError, qmp_line

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
messages = st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), min_size=1, max_size=5)


def feed_all(decoder: QmpDecoder, chunks: list[bytes]) -> list[object]:
    out: list[object] = []
    for c in chunks:
        out += decoder.feed(c)
    return out


@given(messages, st.data())
def test_any_split_gives_the_same_messages(msgs: list[dict[str, object]], data: st.DataObject) -> None:
    stream = b"".join(json.dumps(m).encode() + (b" " if i % 2 else b"") for i, m in enumerate(msgs))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert feed_all(QmpDecoder(), chunks) == msgs


@given(st.binary(max_size=300))
def test_garbage_gives_errors_not_exceptions(data: bytes) -> None:
    for item in QmpDecoder(max_message_bytes=100).feed(data):
        assert isinstance(item, (dict, QmpInputError))


def test_control_character_resets_the_parser() -> None:
    d = QmpDecoder()
    out = d.feed(b'{"execute": "a", \x01 {"execute": "b"}')
    assert isinstance(out[0], QmpInputError) and "parser reset" in out[0].desc
    assert out[1:] == [{"execute": "b"}]


def test_replies_are_ascii_lines() -> None:
    line = qmp_line({"return": {"x": "é"}})
    assert line.endswith(b"\r\n") and line.count(b"\r\n") == 1
    line.decode("ascii")


# Regression tests for review findings: a top-level string holding a bracket
# put the decoder out of step (every later command swallowed); the size bound
# was checked only for a message unfinished at the end of a read; NaN and the
# infinities were taken (and echoed back in "id": not JSON).


@given(st.text(max_size=12), st.data())
def test_a_top_level_string_is_one_error_and_the_stream_stays_in_step(text: str, data: st.DataObject) -> None:
    stream = json.dumps(text).encode() + b" " + b'{"execute": "a"}{"execute": "b"}'
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    chunks = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    out = feed_all(QmpDecoder(), chunks)
    assert out == [QmpInputError("QMP input must be a JSON object"), {"execute": "a"}, {"execute": "b"}]


def test_the_size_bound_holds_for_a_message_complete_in_one_read() -> None:
    big = b'{"execute": "x", "arguments": {"a": "' + b"x" * 5000 + b'"}}'
    for chunks in ([big], [big[:990], big[990:]]):
        out = feed_all(QmpDecoder(max_message_bytes=1000), chunks)
        assert out == [QmpInputError("JSON parse error, input larger than 1000 bytes", fatal=True)]
    assert feed_all(QmpDecoder(max_message_bytes=1000), [b'"' + b"y" * 2000 + b'" ']) == [
        QmpInputError("JSON parse error, input larger than 1000 bytes", fatal=True)]


def test_nan_and_the_infinities_are_refused() -> None:
    for word in (b"NaN", b"Infinity", b"-Infinity"):
        out = QmpDecoder().feed(b'{"execute": "x", "id": ' + word + b"}")
        assert out == [QmpInputError(f"JSON parse error, invalid keyword '{word.decode()}'")]


def test_a_number_too_large_for_a_double_is_refused() -> None:
    """It would be an infinity, echoed back in "id" as no JSON at all."""
    for number in (b"1e400", b"-1e400", b"1" * 400 + b".0"):
        out = QmpDecoder().feed(b'{"execute": "x", "id": ' + number + b"}")
        assert out == [QmpInputError("JSON parse error, number out of range")]
    assert QmpDecoder().feed(b'{"id": 1e300, "n": ' + b"9" * 400 + b"}") == [{"id": 1e300, "n": int("9" * 400)}]


def test_a_top_level_scalar_past_max_message_bytes_is_fatal() -> None:
    """Regression: a top-level scalar (no braces around it: here a bare word
    that never ends) was buffered without bound; past ``max_message_bytes``
    it is a fatal error."""
    d = QmpDecoder(max_message_bytes=100_000)
    out: list[object] = []
    for _ in range(4):
        out += d.feed(b"a" * 65536)
    assert out and isinstance(out[-1], QmpInputError) and out[-1].fatal


@pytest.mark.parametrize("bad", [b"\x1b", b"\x00", b"\x1f", b"\xff", b"\xfe"])
@pytest.mark.parametrize("prefix", [b'{"execute": "query-version", "id": "abc', b'"abc',
                                    b'{"execute": "query-version", "id": "abc\\', b'"abc\\'],
                         ids=["message", "top-level", "message, escaped", "top-level, escaped"])
@pytest.mark.parametrize("split", [False, True], ids=["one read", "two reads"])
def test_a_byte_a_string_may_not_hold_resynchronises(prefix: bytes, bad: bytes, split: bool) -> None:
    """Regression: a control character or 0xFE/0xFF inside a string (of a
    message, or a top-level string) left the decoder waiting for a closing
    quote for ever, and the session deaf; so did one right after a backslash
    (taken as the escaped byte).  As QEMU's lexer: an error naming the stray
    token, then the next command is read."""
    d = QmpDecoder()
    rest = bad + b'{"execute": "query-status", "id": 2}'
    out = d.feed(prefix) + d.feed(rest) if split else d.feed(prefix + rest)
    assert isinstance(out[0], QmpInputError) and out[0].desc.startswith("JSON parse error, stray '\"abc")
    assert out[0].desc.endswith(f"\\u{bad[0]:04X}'")
    assert out[1:] == [{"execute": "query-status", "id": 2}]
