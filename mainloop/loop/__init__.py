"""The BQL and ``MainLoop`` (QEMU's ``main_loop_wait``)."""

from __future__ import annotations

from ._bql import BQLStats as BQLStats
from ._bql import bql as bql
from ._bql import bql_lock as bql_lock
from ._bql import bql_locked as bql_locked
from ._bql import bql_stats as bql_stats
from ._bql import bql_unlock as bql_unlock
from ._loop import MainLoop as MainLoop

__all__ = [
    "BQLStats",
    "MainLoop",
    "bql",
    "bql_lock",
    "bql_locked",
    "bql_stats",
    "bql_unlock",
]
