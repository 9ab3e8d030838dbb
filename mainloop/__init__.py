"""The main-loop process: glib-style sources, the BQL, ``main_loop_wait``.

Built on ``iothreads`` (its AioContexts) and ``protocol``.
"""

from __future__ import annotations

from ._bench import EmbeddedCluster as EmbeddedCluster
from ._bql import BQLStats as BQLStats
from ._bql import bql as bql
from ._bql import bql_lock as bql_lock
from ._bql import bql_locked as bql_locked
from ._bql import bql_stats as bql_stats
from ._bql import bql_unlock as bql_unlock
from ._channels import ChannelSource as ChannelSource
from ._cluster import Cluster as Cluster
from ._cluster import IOThread as IOThread
from ._cluster import IOThreadConfig as IOThreadConfig
from ._cluster import IOThreadState as IOThreadState
from ._context import MainContext as MainContext
from ._loop import MainLoop as MainLoop
from ._source import IO_ERR as IO_ERR
from ._source import IO_HUP as IO_HUP
from ._source import IO_IN as IO_IN
from ._source import IO_NVAL as IO_NVAL
from ._source import IO_OUT as IO_OUT
from ._source import IO_PRI as IO_PRI
from ._source import PRIORITY_DEFAULT as PRIORITY_DEFAULT
from ._source import PRIORITY_DEFAULT_IDLE as PRIORITY_DEFAULT_IDLE
from ._source import PRIORITY_HIGH as PRIORITY_HIGH
from ._source import PRIORITY_HIGH_IDLE as PRIORITY_HIGH_IDLE
from ._source import PRIORITY_LOW as PRIORITY_LOW
from ._source import SOURCE_CONTINUE as SOURCE_CONTINUE
from ._source import SOURCE_REMOVE as SOURCE_REMOVE
from ._source import PollFD as PollFD
from ._source import Source as Source
from ._sources import AioSource as AioSource
from ._sources import ChildWatchSource as ChildWatchSource
from ._sources import FdWatchSource as FdWatchSource
from ._sources import IdleSource as IdleSource
from ._sources import SignalSource as SignalSource
from ._sources import TimeoutSource as TimeoutSource
from ._view import FdView as FdView
from ._view import MainLoopView as MainLoopView
from ._view import SourceView as SourceView
from ._view import describe_fd as describe_fd

__all__ = [
    "AioSource",
    "BQLStats",
    "ChannelSource",
    "ChildWatchSource",
    "Cluster",
    "EmbeddedCluster",
    "FdView",
    "FdWatchSource",
    "IOThread",
    "IOThreadConfig",
    "IOThreadState",
    "IO_ERR",
    "IO_HUP",
    "IO_IN",
    "IO_NVAL",
    "IO_OUT",
    "IO_PRI",
    "IdleSource",
    "MainContext",
    "MainLoop",
    "MainLoopView",
    "PRIORITY_DEFAULT",
    "PRIORITY_DEFAULT_IDLE",
    "PRIORITY_HIGH",
    "PRIORITY_HIGH_IDLE",
    "PRIORITY_LOW",
    "PollFD",
    "SOURCE_CONTINUE",
    "SOURCE_REMOVE",
    "SignalSource",
    "Source",
    "SourceView",
    "TimeoutSource",
    "bql",
    "bql_lock",
    "bql_locked",
    "bql_stats",
    "bql_unlock",
    "describe_fd",
]
