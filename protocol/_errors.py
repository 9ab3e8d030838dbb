"""The project's exception tree.

Every error this project raises on purpose derives from one root, so a caller
can catch "anything the framework refused" with a single ``except``::

    EvloopError
     +-- StateError              an operation is not valid in the object's state
     |    +-- BottomHalfLeakError   a context closed with bottom halves not deleted
     |    +-- CoroutineStateError   a coroutine scheduled twice, or awaited wrongly
     +-- ThreadContractError     a "home thread only" call made from another thread
     +-- UnsafePathError         a file or directory that is not safe to use (its owner, mode, a symlink)
     +-- ProtocolError           a message broke the wire protocol
          +-- LocalProtocolError    we were about to send something invalid
          +-- RemoteProtocolError   a peer sent something invalid
               +-- BadRequestError     ... but which request it was can be read

Errors that have a builtin category also derive from it (``StateError`` is a
``RuntimeError``), so code written against the builtins keeps working.

This module lives in ``protocol``, the leaf package, so that ``iothreads`` and
``mainloop`` can both raise and catch the same classes.
"""

from __future__ import annotations

__all__ = [
    "BadRequestError",
    "BottomHalfLeakError",
    "CoroutineStateError",
    "EvloopError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "StateError",
    "ThreadContractError",
    "UnsafePathError",
]


class EvloopError(Exception):
    """Root of every error raised on purpose by this project."""


class StateError(EvloopError, RuntimeError):
    """The object is not in a state that allows the operation.

    Examples: scheduling a bottom half that was already deleted, asking a
    thread-pool request for its result before it finished, using a closed
    context.
    """


class BottomHalfLeakError(StateError):
    """An AioContext was closed while bottom halves it owns were still live.

    QEMU aborts in this case ("BH 'name' leaked, aborting..."); we raise, after
    releasing the context's file descriptors and threads.

    :ivar names: the names of the leaked bottom halves, sorted.
    """

    def __init__(self, names: list[str]) -> None:
        self.names = sorted(names)
        super().__init__(
            f"{len(self.names)} bottom half(s) leaked at close: " + ", ".join(self.names)
        )


class CoroutineStateError(StateError):
    """A coroutine was scheduled while already scheduled, or resumed wrongly.

    QEMU aborts with "Co-routine was already scheduled in '...'".
    """


class ThreadContractError(EvloopError, RuntimeError):
    """A function documented as "home thread only" was called from another thread."""


class UnsafePathError(EvloopError, ValueError):
    """A path this project was to create files in, or a file it was to open
    there, is not safe to use: a symbolic link, not a directory or regular
    file, owned by another user, writable by others.  The text names the path
    and the reason.

    :ivar path: the path refused.
    :ivar reason: why, as a phrase ("is a symbolic link", ...).
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ProtocolError(EvloopError):
    """A message broke the wire protocol.  The text says what was wrong."""


class LocalProtocolError(ProtocolError, ValueError):
    """We were about to send a message the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """A peer sent bytes that are not a valid message.

    :ivar raw: the first bytes of the offending frame, for logs (may be empty).
    """

    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(message)
        self.raw = raw


class BadRequestError(RemoteProtocolError):
    """A peer's message was refused, but it names its request and that id
    could be read: the receiver can answer that request with an error (a
    request) or fail it (a reply to one) rather than leave someone waiting
    for ever.  A plain ``RemoteProtocolError`` means no id could be read.

    :ivar request_id: the id the message carried.
    :ivar kind: the wire kind it claimed (``"block-request"``, ...).
    """

    def __init__(self, message: str, request_id: int, kind: str, raw: bytes = b"") -> None:
        super().__init__(message, raw)
        self.request_id = request_id
        self.kind = kind
