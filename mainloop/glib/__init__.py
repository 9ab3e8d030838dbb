"""glib's GMainContext and its sources: fd watches, timeouts, idles, signals, child watches, an
AioContext and a channel as sources, and the live view of a context."""

from __future__ import annotations

from ._channel_source import ChannelSource as ChannelSource
from ._context import MainContext as MainContext
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
from ._source import PollFD as PollFD
from ._source import SOURCE_CONTINUE as SOURCE_CONTINUE
from ._source import SOURCE_REMOVE as SOURCE_REMOVE
from ._source import Source as Source
from ._standard import AioSource as AioSource
from ._standard import ChildWatchSource as ChildWatchSource
from ._standard import FdWatchSource as FdWatchSource
from ._standard import IdleSource as IdleSource
from ._standard import SignalSource as SignalSource
from ._standard import TimeoutSource as TimeoutSource
from ._view import FdView as FdView
from ._view import MainLoopView as MainLoopView
from ._view import SourceView as SourceView
from ._view import describe_fd as describe_fd

__all__ = [
    "AioSource",
    "ChannelSource",
    "ChildWatchSource",
    "FdView",
    "FdWatchSource",
    "IO_ERR",
    "IO_HUP",
    "IO_IN",
    "IO_NVAL",
    "IO_OUT",
    "IO_PRI",
    "IdleSource",
    "MainContext",
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
    "describe_fd",
]
