"""A command's continuations, guarded: whatever one of them raises, the
command gets its one answer, and what it changed is undone.

Theory of operation
-------------------
A QMP command that waits for iothreads goes on in continuations: the replies
to its requests, an iothread's exit, a cluster event.  Each is registered
while the command runs, and ``bind`` ties it to the command's ``Guard`` (the
one whose continuation runs now); it runs later under that guard, and so does
whatever it registers in turn.  Every continuation of a command, its first
step included (``Guard.start``), passes through one call, ``Guard.step``.

A continuation that raises before the command is answered fails the command:

1. the exception is logged once, with its traceback (a refusal, ``StateError``
   or ``LocalProtocolError``, is the command's error text, and no traceback);
2. the continuations registered so far are dropped (a reply that comes
   later is not run);
3. the undo steps the command registered on its way (``on_failure``) run,
   the newest first, each calling its ``then()`` once done (a step may wait
   for iothreads: a query, a request that restores what they hold); one
   that raises is logged and counts as done;
4. the command is answered with a ``GenericError``.

Once answered, a command's undo steps are forgotten and its continuations
are not run any more; one that raises after the answer is logged.  Every
continuation runs with the BQL held, in the main-loop thread.
"""

from __future__ import annotations

import contextvars
import enum
import functools
import logging
from collections.abc import Callable
from typing import Generic, ParamSpec, TypeVar

from protocol import LocalProtocolError, StateError

__all__ = ["Continuation", "Guard", "GuardState", "bind", "detached", "on_failure"]

log = logging.getLogger("mainloop.qmp")

P = ParamSpec("P")
T = TypeVar("T")

REFUSALS = (StateError, LocalProtocolError)
"""What a command raises on purpose: its message is the command's error."""

UndoStep = Callable[[Callable[[], None]], object]  # called with ``then``


class GuardState(enum.Enum):
    RUNNING = "running"
    ANSWERED = "answered"
    FAILING = "failing"  # undoing, after a continuation raised
    FAILED = "failed"  # undone and answered with an error


_current: contextvars.ContextVar[Guard | None] = contextvars.ContextVar("guard", default=None)


class Guard:
    """The continuations of one command.  ``fail(desc)`` answers it with a
    ``GenericError`` of that text; its successful answer goes through
    ``answer()`` first."""

    def __init__(self, name: str, fail: Callable[[str], object]) -> None:
        self.name = name
        self.state = GuardState.RUNNING
        self._fail_with = fail
        self._epoch = 0  # continuations bound before a failure carry an older one
        self._undo: list[UndoStep] = []
        self._undoing = 0  # the undo step being waited for
        self._desc = ""

    def start(self, fn: Callable[[], object]) -> None:
        """Run the command's first step under this guard."""
        self._resume(self._epoch, fn)

    def answer(self) -> bool:
        """The command answers now: whether the answer goes out (not after a
        failure, not twice).  Its undo steps are forgotten."""
        if self.state is not GuardState.RUNNING:
            log.debug("QMP command %s: a late answer dropped (%s)", self.name, self.state.value)
            return False
        self.state = GuardState.ANSWERED
        self._undo.clear()
        return True

    def on_failure(self, step: UndoStep) -> None:
        """``step(then)`` if a continuation raises before the answer: it
        restores what the command changed, then calls ``then()``."""
        if self.state is GuardState.RUNNING:
            self._undo.append(step)

    @property
    def over(self) -> bool:
        return self.state in (GuardState.ANSWERED, GuardState.FAILED)

    # -- running continuations ---------------------------------------------

    def step(self, fn: Callable[[], object]) -> None:
        """Every continuation of the command passes here (under the guard)."""
        fn()

    def _resume(self, epoch: int, fn: Callable[[], object]) -> None:
        if epoch != self._epoch or self.over:
            return  # the command is over, or failed since this was registered
        token = _current.set(self)
        try:
            self.step(fn)
        except Exception as exc:
            self._failed(exc)
        finally:
            _current.reset(token)

    def _failed(self, exc: Exception) -> None:
        if self.over:
            log.error("QMP command %s: a continuation failed after the answer", self.name, exc_info=exc)
            return
        if self.state is GuardState.FAILING:
            log.error("QMP command %s: undoing it failed", self.name, exc_info=exc)
            self._undo_next()
            return
        if isinstance(exc, REFUSALS):
            self._desc = str(exc)
        else:
            log.error("QMP command %s failed: an internal error; undoing what it changed", self.name,
                      exc_info=exc)
            self._desc = f"Internal error in '{self.name}': {type(exc).__name__}: {exc}"
        self.state = GuardState.FAILING
        self._epoch += 1
        self._undo_next()

    def _undo_next(self) -> None:
        while self._undo:
            step = self._undo.pop()
            self._undoing += 1
            mine = self._undoing

            def then(mine: int = mine) -> None:
                if self._undoing == mine and self.state is GuardState.FAILING:
                    self._undo_next()

            try:
                step(then)
            except Exception:
                log.exception("QMP command %s: an undo step failed", self.name)
                if self._undoing == mine and self.state is GuardState.FAILING:
                    continue
            return
        if self.state is GuardState.FAILING:
            self.state = GuardState.FAILED
            self._fail_with(self._desc)


class Continuation(Generic[P]):
    """``fn``, to run later under the guard that was current when it was made
    (``bind``); as is if none was."""

    __slots__ = ("fn", "_guard", "_epoch")

    def __init__(self, fn: Callable[P, object], guard: Guard | None) -> None:
        self.fn = fn
        self._guard = guard
        self._epoch = guard._epoch if guard is not None else 0

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> None:
        if self._guard is None:
            self.fn(*args, **kwargs)
        else:
            self._guard._resume(self._epoch, functools.partial(self.fn, *args, **kwargs))

    def __repr__(self) -> str:
        return f"<continuation of {self._guard.name if self._guard else 'no command'}: {self.fn!r}>"

    @property
    def over(self) -> bool:
        """Whether it would not run any more (its command is over, or failed since)."""
        g = self._guard
        return g is not None and (g.over or g._epoch != self._epoch)


def bind(fn: Callable[P, object]) -> Continuation[P]:
    """``fn`` as a continuation of the command running now (see the module's docstring)."""
    return Continuation(fn, _current.get())


def detached(fn: Callable[[], T]) -> T:
    """Run ``fn`` as no command's: what it registers (the replies to its
    requests ...) runs whenever it comes, whatever becomes of the command
    running now.  For work a command starts and does not wait for (an NBD
    export's clients being disconnected after ``block-export-del``)."""
    return contextvars.Context().run(fn)


def on_failure(step: UndoStep) -> None:
    """``Guard.on_failure`` of the command running now, if any."""
    guard = _current.get()
    if guard is not None:
        guard.on_failure(step)
