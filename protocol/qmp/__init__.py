"""QMP's wire format: the JSON stream decoder and the shapes of returns, errors and events (pure)."""

from __future__ import annotations

from ._wire import QmpDecoder as QmpDecoder
from ._wire import QmpInputError as QmpInputError
from ._wire import qmp_error as qmp_error
from ._wire import qmp_event as qmp_event
from ._wire import qmp_line as qmp_line
from ._wire import qmp_return as qmp_return

__all__ = [
    "QmpDecoder",
    "QmpInputError",
    "qmp_error",
    "qmp_event",
    "qmp_line",
    "qmp_return",
]
