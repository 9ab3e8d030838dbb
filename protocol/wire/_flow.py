"""How much one data-plane client may have in flight at an iothread.

Theory of operation
-------------------
An iothread serves many clients from one ROUTER socket; it cannot stop
reading one of them (ZeroMQ queues every peer's messages fairly), so it
bounds what each one costs it instead.  A client's request is *in flight*
from the moment the iothread reads it until its completion has been handed to
the socket: while the node works on it, and while its completion waits in the
iothread's backlog for a client that does not read.  ``CLIENT_CREDIT`` says
how much of that a client may have: ``max_requests`` requests and
``max_bytes`` bytes of data (a write's data, a read's length).  A request
past its client's credit, or past the iothread's ``MAX_TOTAL_BYTES`` for all
its clients together, is not run: it is completed at once with ``EAGAIN``.

A client that keeps to the credit itself (``BlockClient`` counts from
sending to the completion, which covers the iothread's count) is never
refused for its own sake; ``EAGAIN`` then only means that the iothread is
busy with others, and the request may be sent again a little later.  What
ZeroMQ holds on top (``DATA_SNDHWM`` completions and ``DATA_RCVHWM`` requests
per client) is bounded too, so what a client that never reads its
completions costs an iothread does not grow with what it sends.

``InFlight`` is the iothread's bookkeeping, with no socket of its own.
"""

from __future__ import annotations

import sys

from dataclasses import dataclass

__all__ = ["CLIENT_CREDIT", "ClientCredit", "DATA_RCVHWM", "DATA_SNDHWM", "InFlight", "MAX_TOTAL_BYTES",
           "request_bytes"]


@dataclass(frozen=True, slots=True)
class ClientCredit:
    """What one client may have in flight at one iothread."""

    max_requests: int = 1024
    max_bytes: int = 64 << 20  # two of the largest requests (32 MiB)


CLIENT_CREDIT = ClientCredit()
MAX_TOTAL_BYTES = 256 << 20  # an iothread's data in flight, all clients together
DATA_SNDHWM = 4  # ZeroMQ messages (batches of completions) queued to one client
DATA_RCVHWM = 16  # ZeroMQ messages (batches of requests) read ahead from one client


def request_bytes(op: str, length: int, data: bytes) -> int:
    """The data a request moves: a write's, or a read's length; 0 for the rest."""
    if op == "read":
        return length
    return len(data)


class InFlight:
    """Requests in flight per client and their bytes, admitted up to the
    client's credit and the iothread's total.  One thread (the iothread's)."""

    def __init__(self, credit: ClientCredit = CLIENT_CREDIT, max_total_bytes: int = MAX_TOTAL_BYTES) -> None:
        self.credit = credit
        self.max_total_bytes = max_total_bytes
        self._clients: dict[bytes, list[int]] = {}  # identity: [requests, bytes]; only clients with some
        self.total_bytes = 0
        self.refused = 0

    def admit(self, client: bytes, nbytes: int, backlog: tuple[int, int] = (0, 0)) -> str | None:
        """Count a request of ``nbytes`` in ``client``'s flight, or say why
        not (``backlog``: the completions, and their bytes, that still wait
        to be handed to the socket for this client)."""
        used = self._clients.get(client)
        requests, used_bytes = (used[0], used[1]) if used is not None else (0, 0)
        credit = self.credit
        if requests + backlog[0] >= credit.max_requests:
            problem = f"the client has {credit.max_requests} requests in flight, its limit"
        elif used_bytes + backlog[1] + nbytes > credit.max_bytes:
            problem = f"the client has {(used_bytes + backlog[1]) >> 20} MiB in flight; its limit is " \
                      f"{credit.max_bytes >> 20} MiB"
        elif self.total_bytes + nbytes > self.max_total_bytes and self.total_bytes:
            problem = f"the iothread has {self.total_bytes >> 20} MiB in flight; its limit is " \
                      f"{self.max_total_bytes >> 20} MiB"
        else:
            if used is None:
                self._clients[client] = [1, nbytes]
            else:
                used[0] += 1
                used[1] += nbytes
            self.total_bytes += nbytes
            return None
        self.refused += 1
        return problem

    def release(self, client: bytes, nbytes: int) -> None:
        """An admitted request completed (its completion is on its way)."""
        used = self._clients[client]
        used[0] -= 1
        used[1] -= nbytes
        self.total_bytes -= nbytes
        if not used[0]:
            del self._clients[client]

    def headroom(self, client: bytes, backlog: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
        """What ``admit`` would still take from ``client`` (with this
        ``backlog``): a request of ``nbytes`` is admitted while the first
        number is above 0 and ``nbytes`` is at most the other two (the
        client's room, and the iothread's).  For an owner that serves many
        requests at once, each admitted and released at once: it counts them
        down itself instead of asking ``admit`` for each."""
        used = self._clients.get(client)
        requests, used_bytes = (used[0], used[1]) if used is not None else (0, 0)
        credit = self.credit
        total_bytes = self.total_bytes
        return (credit.max_requests - requests - backlog[0], credit.max_bytes - used_bytes - backlog[1],
                self.max_total_bytes - total_bytes if total_bytes else sys.maxsize)

    def of(self, client: bytes) -> tuple[int, int]:
        """``client``'s requests in flight and their bytes."""
        used = self._clients.get(client)
        return (used[0], used[1]) if used is not None else (0, 0)

    @property
    def clients(self) -> int:
        """How many clients have requests in flight."""
        return len(self._clients)
