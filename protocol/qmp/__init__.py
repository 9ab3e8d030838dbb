"""QMP, pure: the JSON stream decoder, the shapes of returns, errors and events, and the session state machine."""

from __future__ import annotations

from ._session import QmpCommand as QmpCommand
from ._session import QmpSession as QmpSession
from ._session import QmpSessionState as QmpSessionState
from ._wire import QmpDecoder as QmpDecoder
from ._wire import QmpInputError as QmpInputError
from ._wire import qmp_error as qmp_error
from ._wire import qmp_event as qmp_event
from ._wire import qmp_line as qmp_line
from ._wire import qmp_return as qmp_return

__all__ = [
    "QmpCommand",
    "QmpDecoder",
    "QmpInputError",
    "QmpSession",
    "QmpSessionState",
    "qmp_error",
    "qmp_event",
    "qmp_line",
    "qmp_return",
]
