"""The iothread process: one AioContext serving block nodes, driven by the main loop over a channel."""

from __future__ import annotations

from ._worker import IOThreadWorker as IOThreadWorker
from ._worker import die_with_parent as die_with_parent
from ._worker import main as main
from ._worker import set_parent_death_signal as set_parent_death_signal

__all__ = [
    "IOThreadWorker",
    "die_with_parent",
    "main",
    "set_parent_death_signal",
]
