"""The main-loop process: glib-style sources, the BQL, ``main_loop_wait``.

Built on ``iothreads`` (its AioContexts) and ``protocol``.
"""

from __future__ import annotations

from .cli import EmbeddedCluster as EmbeddedCluster
from .loop import BQLStats as BQLStats
from .loop import bql as bql
from .loop import bql_lock as bql_lock
from .loop import bql_locked as bql_locked
from .loop import bql_stats as bql_stats
from .loop import bql_unlock as bql_unlock
from .glib import ChannelSource as ChannelSource
from .cluster import Cluster as Cluster
from .cluster import IOThread as IOThread
from .cluster import IOThreadConfig as IOThreadConfig
from .cluster import IOThreadState as IOThreadState
from .glib import MainContext as MainContext
from .loop import MainLoop as MainLoop
from .glib import IO_ERR as IO_ERR
from .glib import IO_HUP as IO_HUP
from .glib import IO_IN as IO_IN
from .glib import IO_NVAL as IO_NVAL
from .glib import IO_OUT as IO_OUT
from .glib import IO_PRI as IO_PRI
from .glib import PRIORITY_DEFAULT as PRIORITY_DEFAULT
from .glib import PRIORITY_DEFAULT_IDLE as PRIORITY_DEFAULT_IDLE
from .glib import PRIORITY_HIGH as PRIORITY_HIGH
from .glib import PRIORITY_HIGH_IDLE as PRIORITY_HIGH_IDLE
from .glib import PRIORITY_LOW as PRIORITY_LOW
from .glib import SOURCE_CONTINUE as SOURCE_CONTINUE
from .glib import SOURCE_REMOVE as SOURCE_REMOVE
from .glib import PollFD as PollFD
from .glib import Source as Source
from .glib import AioSource as AioSource
from .glib import ChildWatchSource as ChildWatchSource
from .glib import FdWatchSource as FdWatchSource
from .glib import IdleSource as IdleSource
from .glib import SignalSource as SignalSource
from .glib import TimeoutSource as TimeoutSource
from .glib import FdView as FdView
from .glib import MainLoopView as MainLoopView
from .glib import SourceView as SourceView
from .glib import describe_fd as describe_fd

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
