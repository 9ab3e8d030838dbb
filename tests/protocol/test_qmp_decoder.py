"""The streaming QMP decoder: any split of the input gives the same messages."""

from __future__ import annotations

import json

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
