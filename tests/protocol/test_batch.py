"""The codec's batch arithmetic: how much one batch may carry for a receiver
with given limits, and where a queue of messages is cut into batches.  Every
batch cut this way is accepted whole by a receiver with the same limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    BlockCompletion,
    Heartbeat,
    Limits,
    LocalProtocolError,
    QueryReply,
    decode_batch,
    encode_batch,
    pack,
)
from protocol.wire._codec import BatchBudget, batch_budget, batch_length, check_sendable, max_frame_bytes

SMALL = Limits(max_header_bytes=2048, max_payload_bytes=4096, max_str_len=300, max_container_len=16)


def test_the_default_budget() -> None:
    assert max_frame_bytes(Limits()) == 64 << 20
    assert max_frame_bytes(Limits(max_payload_bytes=1024)) == 64 << 10  # then the header is the larger
    # 256 payload sizes of 5 bytes and 16 bytes of envelope come off the header.
    assert batch_budget(Limits()) == BatchBudget(max_items=256, max_items_bytes=65536 - 5 * 256 - 16,
                                                 max_payload_bytes=64 << 20, unchecked_item_bytes=256 + 7)
    # Payloads of 4 GiB or more: each size may take 9 bytes.
    assert batch_budget(Limits(max_payload_bytes=1 << 32)).max_items_bytes == 65536 - 9 * 256 - 16


def test_where_batches_are_cut() -> None:
    budget = BatchBudget(max_items=4, max_items_bytes=100, max_payload_bytes=10, unchecked_item_bytes=0)
    assert batch_length([], budget) == 0
    assert batch_length([(b"x", None)] * 9, budget) == 4  # the item count
    assert batch_length([(b"x" * 40, None)] * 3, budget) == 2  # the items' bytes: 80 fit, 120 do not
    assert batch_length([(b"x", b"p" * 6)] * 3, budget) == 1  # the payloads' bytes
    assert batch_length([(b"x", b"p" * 5), (b"y", b"q" * 5), (b"z", None)], budget) == 3
    # A message too large for any batch still leaves, alone: it was checked on its own when queued.
    assert batch_length([(b"x" * 500, b"p" * 50), (b"y", None)], budget) == 1


def test_a_message_the_peer_would_refuse_is_named() -> None:
    item, payload = pack(BlockCompletion(1, -5, "x" * 301, b""))
    with pytest.raises(LocalProtocolError, match="BlockCompletion would be refused by the peer"):
        check_sendable("BlockCompletion", item, payload, SMALL)
    item, payload = pack(BlockCompletion(1, 0, "", bytes(4097)))
    with pytest.raises(LocalProtocolError, match="a payload of 4097 bytes exceeds the limit of 4096"):
        check_sendable("BlockCompletion", item, payload, SMALL)
    check_sendable("BlockCompletion", *pack(BlockCompletion(1, -5, "x" * 300, bytes(4096))), SMALL)


messages = st.one_of(
    st.builds(BlockCompletion, request_id=st.integers(0, 2**40), status=st.integers(-200, 0),
              message=st.text(max_size=320), data=st.binary(max_size=4200)),
    st.builds(Heartbeat, seq=st.integers(0, 2**63 - 1), sent_ns=st.integers(0, 2**63 - 1)),
    st.builds(QueryReply, request_id=st.integers(0, 2**31),
              counters=st.dictionaries(st.text(max_size=20), st.integers(0, 2**63 - 1), max_size=20)),
)


@given(st.lists(messages, min_size=1, max_size=80))
def test_every_batch_cut_is_accepted_whole(msgs: list[BlockCompletion | Heartbeat | QueryReply]) -> None:
    """Messages that pass ``check_sendable`` alone, cut into batches by
    ``batch_length``: each batch decodes under the same limits, and together
    they give back every message in order."""
    sendable = []
    for m in msgs:
        try:
            check_sendable(m.KIND, *pack(m), SMALL)
        except LocalProtocolError:
            continue
        sendable.append(m)
    queue = [pack(m) for m in sendable]
    budget = batch_budget(SMALL)
    got = []
    while queue:
        n = batch_length(queue, budget)
        assert 1 <= n <= len(queue)
        frames = encode_batch(queue[:n])
        assert all(len(f) <= max_frame_bytes(SMALL) for f in frames)
        got += decode_batch(frames, SMALL)
        del queue[:n]
    assert got == sendable


WIDE = Limits(max_header_bytes=2048, max_payload_bytes=16 * 65536, max_str_len=300, max_container_len=16)


@pytest.mark.parametrize("text_len", range(80, 140, 3))
def test_full_batches_with_the_widest_payload_sizes_fit_the_header(text_len: int) -> None:
    """Payloads of 64 KiB (each size takes 5 bytes in the header) and items
    around the budget's edge: every batch is still within the header limit."""
    msgs = [BlockCompletion(i, -5, "x" * text_len, bytes(65536)) for i in range(20)]
    queue = [pack(m) for m in msgs]
    budget = batch_budget(WIDE)
    got = []
    while queue:
        n = batch_length(queue, budget)
        got += decode_batch(encode_batch(queue[:n]), WIDE)
        del queue[:n]
    assert got == msgs
