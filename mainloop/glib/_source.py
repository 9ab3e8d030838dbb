"""Sources: what a MainContext polls and dispatches (glib's ``GSource``).

A source is an object with up to four hooks, on glib's contract:

``prepare() -> (ready, timeout_ns)``
    Before the poll.  Report ready without polling, and/or bound the poll's
    timeout (-1: no bound).
``check() -> bool``
    After the poll: is it ready now?  (Time has passed since ``prepare``.)
``dispatch() -> bool``
    Run the callback.  Return ``SOURCE_CONTINUE`` (True) to stay attached,
    ``SOURCE_REMOVE`` (False) to be destroyed.
``finalize()``
    After the source is destroyed, once.

A subclass overrides only the hooks it needs.  Sources that override neither
``prepare`` nor ``check`` (fd watches, signals, child watches) cost nothing
per iteration: the context touches them only when one of their fds fires or
their ready time passes.

Besides the hooks, a source may have a *ready time* (monotonic ns: ready
once it passes) and *poll fds*.  An fd added with ``add_unix_fd`` makes the
source ready by itself when it polls ready; one added with ``add_poll`` only
records ``revents`` for the source's own ``check`` to read (glib's
``g_source_add_poll``, what an AioContext source uses).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol import StateError

if TYPE_CHECKING:
    from ._context import MainContext

__all__ = [
    "IO_ERR",
    "IO_HUP",
    "IO_IN",
    "IO_NVAL",
    "IO_OUT",
    "IO_PRI",
    "PRIORITY_DEFAULT",
    "PRIORITY_DEFAULT_IDLE",
    "PRIORITY_HIGH",
    "PRIORITY_HIGH_IDLE",
    "PRIORITY_LOW",
    "PollFD",
    "SOURCE_CONTINUE",
    "SOURCE_REMOVE",
    "Source",
]

# glib's priorities: lower numbers run first.
PRIORITY_HIGH = -100
PRIORITY_DEFAULT = 0
PRIORITY_HIGH_IDLE = 100
PRIORITY_DEFAULT_IDLE = 200
PRIORITY_LOW = 300

SOURCE_REMOVE = False
SOURCE_CONTINUE = True

# glib's GIOCondition bits (the same values as poll(2) and epoll).
IO_IN = 1
IO_PRI = 2
IO_OUT = 4
IO_ERR = 8
IO_HUP = 16
IO_NVAL = 32
IO_CONDITIONS = {"IN": IO_IN, "PRI": IO_PRI, "OUT": IO_OUT, "ERR": IO_ERR, "HUP": IO_HUP, "NVAL": IO_NVAL}


def condition_names(cond: int) -> str:
    """``IO_IN | IO_HUP`` -> ``"IN|HUP"``."""
    return "|".join(n for n, b in IO_CONDITIONS.items() if cond & b) or "0"


class PollFD:
    """One fd a source asks its context to poll (glib's ``GPollFD``)."""

    __slots__ = ("fd", "events", "revents", "source", "auto", "role")

    def __init__(self, fd: int, events: int, source: Source | None, auto: bool, role: str) -> None:
        self.fd = fd
        self.events = events
        self.revents = 0
        self.source = source
        self.auto = auto  # ready by itself when revents (g_source_add_unix_fd)
        self.role = role  # what the fd is, for the live view

    def __repr__(self) -> str:
        return f"<PollFD fd={self.fd} events={condition_names(self.events)} {self.role}>"


class Source:
    """Base class of every source; see the module docstring."""

    kind = "custom"

    def __init__(self, name: str | None = None, priority: int = PRIORITY_DEFAULT) -> None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise TypeError(f"priority must be an int, not {priority!r}")
        self.name = name or type(self).__name__
        self.priority = priority
        self.id = 0
        self.context: MainContext | None = None
        self.ready_time_ns = -1
        self.pollfds: list[PollFD] = []
        self.dispatch_count = 0
        self.dispatch_ns = 0
        self._destroyed = False
        self._finalize_token = [None]  # popped by whoever runs finalize: once
        self._outer_dispatch: Source | None = None  # the dispatch this one's runs inside, if nested
        self._blocked = False  # left out of a nested iteration of its own dispatch
        self.can_recurse = False  # glib's g_source_set_can_recurse: dispatched in nested iterations too
        self._ready = False  # set by prepare/check, cleared after dispatch
        self._watched = False  # in the context's per-iteration list
        cls = type(self)
        self._has_prepare = cls.prepare is not Source.prepare
        self._has_check = cls.check is not Source.check
        self._fired: list[PollFD] = []  # poll fds with revents in this iteration

    # -- hooks (override what you need) -----------------------------------

    def prepare(self) -> tuple[bool, int]:
        """Return ``(ready, timeout_ns)``; the default: not ready, no bound."""
        return False, -1

    def check(self) -> bool:
        """Return whether the source is ready after the poll; default False."""
        return False

    def dispatch(self) -> bool:
        """Run the callback; return whether the source stays attached."""
        raise NotImplementedError(f"{type(self).__name__} must implement dispatch()")

    def finalize(self) -> None:
        """Called once after the source is destroyed."""

    def _on_attach(self) -> None:
        """Called once after the source is attached (outside the context's lock)."""

    # -- state -----------------------------------------------------------

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    @property
    def has_prepare_or_check(self) -> bool:
        return self._has_prepare or self._has_check

    def pending_pollfds(self) -> list[PollFD]:
        """The poll fds that polled ready in this iteration (for ``check``/``dispatch``)."""
        return self._fired

    # -- poll fds and ready time (any thread) ----------------------------

    def add_poll(self, fd: int, events: int, role: str = "") -> PollFD:
        """Poll ``fd``; its ``revents`` are for ``check`` to read (not ready by itself)."""
        return self._add_pollfd(PollFD(fd, events, self, False, role))

    def add_unix_fd(self, fd: int, events: int, role: str = "") -> PollFD:
        """Poll ``fd``; the source is ready whenever it polls ready."""
        return self._add_pollfd(PollFD(fd, events, self, True, role))

    def _add_pollfd(self, pfd: PollFD) -> PollFD:
        if self._destroyed:
            raise StateError(f"source {self.name!r} is destroyed")
        self.pollfds.append(pfd)
        if self.context is not None:
            self.context._add_pollfd(pfd)
        return pfd

    def remove_poll(self, pfd: PollFD) -> None:
        """Stop polling ``pfd``.  Unknown records are ignored."""
        if pfd in self.pollfds:
            self.pollfds.remove(pfd)
            if self.context is not None:
                self.context._remove_pollfd(pfd)

    def set_ready_time(self, ready_time_ns: int) -> None:
        """Ready once ``time.monotonic_ns()`` reaches it; -1: never.  Any thread."""
        self.ready_time_ns = ready_time_ns
        if self.context is not None:
            self.context._ready_time_changed(self)

    # -- lifecycle --------------------------------------------------------

    def attach(self, context: MainContext) -> int:
        """Attach to ``context`` (any thread; wakes it); return the source id."""
        return context.attach(self)

    def destroy(self) -> None:
        """Detach and finalize.  Any thread; idempotent; allowed in ``dispatch``."""
        if self.context is not None:
            self.context._destroy(self)
        elif not self._destroyed:
            self._destroyed = True
            if self._claim_finalize():
                self.finalize()

    def _claim_finalize(self) -> bool:
        """True for the one caller that is to run ``finalize`` (any thread:
        popping the token is atomic)."""
        try:
            self._finalize_token.pop()
        except IndexError:
            return False
        return True

    def __repr__(self) -> str:
        state = "destroyed" if self._destroyed else f"id={self.id}"
        return f"<{type(self).__name__} {self.name!r} prio={self.priority} {state}>"
