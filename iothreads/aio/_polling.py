"""Adaptive busy polling: the grow/shrink rule (QEMU's ``adjust_polling_time``).

Busy polling trades CPU for latency: before blocking in epoll, the loop calls
each handler's ``io_poll`` in a tight loop for up to ``poll_ns``.  If an event
tends to arrive within that window, the thread never sleeps and never pays a
wake-up (tens of microseconds across CPUs on a VM).  The window adapts per
handler, after each dispatch, from ``block_ns``, the time the poll spent
polling plus waiting before that handler became ready:

* ``block_ns <= poll_ns``: the window caught it; keep it.
* ``block_ns > poll_max_ns``: the event came too late to ever be caught;
  shrink (divide by ``poll_shrink``, or reset to 0 when it is 0).
* otherwise, if there is room under ``poll_max_ns``, grow: start at 4 us,
  then multiply by ``poll_grow`` (2 when 0), capped at ``poll_max_ns``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PollParams", "adjust_poll_ns", "never_ready"]

POLL_START_NS = 4_000


@dataclass(frozen=True, slots=True)
class PollParams:
    """An AioContext's busy-polling parameters (QEMU's iothread properties).

    ``max_ns == 0`` disables busy polling.
    """

    max_ns: int = 0
    grow: int = 0
    shrink: int = 0

    def __post_init__(self) -> None:
        for name in ("max_ns", "grow", "shrink"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"poll parameter {name} must be an integer >= 0, not {value!r}")


def never_ready() -> bool:
    """The ``io_poll`` of a handler whose fd busy polling need not see at
    once: it never reports work, so polling stays on for the others, and
    the fd is seen at the next wait in epoll (up to a window later)."""
    return False


def adjust_poll_ns(poll_ns: int, block_ns: int, params: PollParams) -> int:
    """Return the new polling window after a dispatch that blocked ``block_ns``."""
    if block_ns <= poll_ns:
        return poll_ns
    if block_ns > params.max_ns:
        return poll_ns // params.shrink if params.shrink else 0
    if poll_ns < params.max_ns and block_ns < params.max_ns:
        poll_ns = poll_ns * (params.grow or 2) if poll_ns else POLL_START_NS
        return min(poll_ns, params.max_ns)
    return poll_ns
