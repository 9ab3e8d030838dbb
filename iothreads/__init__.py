"""QEMU's AioContext and its companions, and (later) the iothread process.

The building blocks a loop thread needs: ``AioContext`` (fd handlers, event
notifiers, bottom halves, timers, ``poll(blocking)``, adaptive busy polling),
its thread pool, and coroutines that run on it without asyncio.
"""

from __future__ import annotations

from .aio import AioContext as AioContext
from .aio import AioContextStats as AioContextStats
from .aio import AsyncioSource as AsyncioSource
from .aio import get_current_aio_context as get_current_aio_context
from .aio import BottomHalf as BottomHalf
from .aio import ChannelHandler as ChannelHandler
from .block import CLUSTER_STATE_FILE as CLUSTER_STATE_FILE
from .block import BlockClient as BlockClient
from .block import BlockIOError as BlockIOError
from .aio import Clock as Clock
from .aio import ClockType as ClockType
from .aio import ManualClock as ManualClock
from .aio import MonotonicClock as MonotonicClock
from .aio import WallClock as WallClock
from .aio import Coroutine as Coroutine
from .aio import Future as Future
from .aio import current_coroutine as current_coroutine
from .aio import reschedule as reschedule
from .aio import sleep_ns as sleep_ns
from .aio import EpollMonitor as EpollMonitor
from .aio import timeout_ns_to_seconds as timeout_ns_to_seconds
from .aio import soonest_timeout as soonest_timeout
from .aio import EventNotifier as EventNotifier
from .aio import PollParams as PollParams
from .aio import RequestState as RequestState
from .aio import ThreadPool as ThreadPool
from .aio import ThreadPoolRequest as ThreadPoolRequest
from .aio import ClockSpec as ClockSpec
from .aio import Timer as Timer
from .aio import TimerListGroup as TimerListGroup
from .worker import die_with_parent as die_with_parent
from .worker import set_parent_death_signal as set_parent_death_signal

__all__ = [
    "AioContext",
    "AioContextStats",
    "AsyncioSource",
    "BlockClient",
    "BlockIOError",
    "BottomHalf",
    "CLUSTER_STATE_FILE",
    "ChannelHandler",
    "Clock",
    "ClockSpec",
    "ClockType",
    "Coroutine",
    "EpollMonitor",
    "EventNotifier",
    "Future",
    "ManualClock",
    "MonotonicClock",
    "PollParams",
    "RequestState",
    "ThreadPool",
    "ThreadPoolRequest",
    "Timer",
    "TimerListGroup",
    "WallClock",
    "current_coroutine",
    "die_with_parent",
    "get_current_aio_context",
    "reschedule",
    "set_parent_death_signal",
    "sleep_ns",
    "soonest_timeout",
    "timeout_ns_to_seconds",
]
