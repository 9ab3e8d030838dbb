"""The requests of one connection that still wait for their replies.

Theory of operation
-------------------
Both planes ask and are answered later: the main loop sends control requests
to an iothread, a block client sends block requests; each request carries an
id, and the reply names it.  ``PendingRequests`` is the bookkeeping both use,
one table per connection:

* ``next_id()`` gives the next request id (increasing, never reused, so a
  late reply can never be taken for a newer request);
* ``register(id, value, deadline_ns)`` records what to do with the reply
  (``value``: a callback, or whatever the owner needs), due by
  ``deadline_ns`` (None: no deadline);
* ``match(id)`` takes the request a reply answers (None for a reply to
  nothing pending: answered already, expired, or never sent);
* ``expire(now_ns)`` takes the requests due by ``now_ns``;
* ``take_all()`` takes everything (the connection is gone).

Whatever a method takes is removed before it is returned, so the owner can
run callbacks that send new requests on the same table meanwhile.  The table
keeps no clock: the owner passes ``now_ns`` from its own, which a test fakes.
It is not thread-safe: one thread uses it (the owner's home thread).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from .._errors import StateError

__all__ = ["PendingRequests"]

T = TypeVar("T")


class PendingRequests(Generic[T]):
    """Requests sent on one connection and not answered yet, by id."""

    def __init__(self, first_id: int = 1) -> None:
        self._next_id = first_id
        self._entries: dict[int, tuple[T, int | None]] = {}  # id: (value, deadline_ns), as registered

    def next_id(self) -> int:
        """A new request id."""
        request_id = self._next_id
        self._next_id += 1
        return request_id

    def register(self, request_id: int, value: T, deadline_ns: int | None = None) -> None:
        """Wait for the reply to ``request_id`` (from ``next_id``), due by
        ``deadline_ns`` if given.  ``StateError`` if that id is pending already."""
        if request_id in self._entries:
            raise StateError(f"request {request_id} is already pending")
        self._entries[request_id] = (value, deadline_ns)

    def match(self, request_id: int) -> T | None:
        """The request a reply to ``request_id`` answers, no longer pending;
        None if no such request is pending."""
        entry = self._entries.pop(request_id, None)
        return None if entry is None else entry[0]

    def expire(self, now_ns: int) -> list[tuple[int, T]]:
        """The requests due by ``now_ns`` (deadline reached), no longer pending, in the order registered."""
        late = [request_id for request_id, (_, deadline_ns) in self._entries.items()
                if deadline_ns is not None and deadline_ns <= now_ns]
        return [(request_id, self._entries.pop(request_id)[0]) for request_id in late]

    def take_all(self) -> list[tuple[int, T]]:
        """Every pending request, in the order registered; none is pending after."""
        entries, self._entries = self._entries, {}
        return [(request_id, value) for request_id, (value, _) in entries.items()]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries
