"""The QMP monitor: sockets, sessions and the commands."""

from __future__ import annotations

from ._monitor import Monitor as Monitor
from ._monitor import QmpFailure as QmpFailure

__all__ = [
    "Monitor",
    "QmpFailure",
]
