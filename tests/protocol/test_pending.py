"""The pending-request table: ids, replies matched by id, deadlines on a fake
clock, everything failed at once when the connection goes."""

from __future__ import annotations

import pytest

from protocol import PendingRequests, StateError


def test_ids_increase_and_replies_find_their_request() -> None:
    table: PendingRequests[str] = PendingRequests()
    ids = [table.next_id() for _ in range(3)]
    assert ids == [1, 2, 3]
    for request_id, what in zip(ids, ["a", "b", "c"]):
        table.register(request_id, what)
    assert len(table) == 3 and 2 in table
    # Replies come in any order; each takes its own request, once.
    assert table.match(3) == "c"
    assert table.match(1) == "a"
    assert table.match(1) is None  # answered already
    assert table.match(99) is None  # never sent
    assert 2 in table and len(table) == 1
    assert PendingRequests[str](first_id=10).next_id() == 10


def test_an_id_pending_twice_is_refused() -> None:
    table: PendingRequests[str] = PendingRequests()
    request_id = table.next_id()
    table.register(request_id, "a")
    with pytest.raises(StateError, match="request 1 is already pending"):
        table.register(request_id, "b")
    assert table.match(request_id) == "a"


def test_expire_takes_the_overdue_only() -> None:
    now_ns = 1_000  # a fake clock: the table has none of its own
    table: PendingRequests[str] = PendingRequests()
    for what, deadline_ns in [("late", now_ns + 100), ("later", now_ns + 300), ("forever", None),
                              ("soon", now_ns + 50)]:
        table.register(table.next_id(), what, deadline_ns)
    assert table.expire(now_ns + 49) == []
    assert table.expire(now_ns + 100) == [(1, "late"), (4, "soon")]  # deadline reached: due; oldest first
    assert len(table) == 2
    assert table.match(1) is None  # an answer after the expiry finds nothing
    assert table.expire(now_ns + 10**12) == [(2, "later")]
    assert table.take_all() == [(3, "forever")]  # no deadline: never expires


def test_take_all_empties_the_table_and_callbacks_may_send_again() -> None:
    """What is taken is gone before the owner acts on it: a callback that
    sends a new request (on the same table) neither sees the old ones nor
    is lost."""
    table: PendingRequests[str] = PendingRequests()
    for what in "abc":
        table.register(table.next_id(), what, 5)
    taken = table.take_all()
    assert taken == [(1, "a"), (2, "b"), (3, "c")] and len(table) == 0
    for _ in taken:
        table.register(table.next_id(), "retry")
    assert table.expire(10) == [] and sorted(table.take_all()) == [(4, "retry"), (5, "retry"), (6, "retry")]
    assert table.next_id() == 7  # ids are never reused
