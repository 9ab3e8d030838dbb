"""QEMU's AioContext and its companions, and (later) the iothread process.

The building blocks a loop thread needs: ``AioContext`` (fd handlers, event
notifiers, bottom halves, timers, ``poll(blocking)``, adaptive busy polling),
its thread pool, and coroutines that run on it without asyncio.
"""

from __future__ import annotations

from ._aio import AioContext as AioContext
from ._aio import AioContextStats as AioContextStats
from ._aio import get_current_aio_context as get_current_aio_context
from ._bh import BottomHalf as BottomHalf
from ._channels import ChannelHandler as ChannelHandler
from ._client import CLUSTER_STATE_FILE as CLUSTER_STATE_FILE
from ._client import BlockClient as BlockClient
from ._client import BlockIOError as BlockIOError
from ._clock import Clock as Clock
from ._clock import ClockType as ClockType
from ._clock import ManualClock as ManualClock
from ._clock import MonotonicClock as MonotonicClock
from ._clock import WallClock as WallClock
from ._coroutine import Coroutine as Coroutine
from ._coroutine import Future as Future
from ._coroutine import current_coroutine as current_coroutine
from ._coroutine import reschedule as reschedule
from ._coroutine import sleep_ns as sleep_ns
from ._fdmon import EpollMonitor as EpollMonitor
from ._fdmon import timeout_ns_to_seconds as timeout_ns_to_seconds
from ._handlers import soonest_timeout as soonest_timeout
from ._notifier import EventNotifier as EventNotifier
from ._polling import PollParams as PollParams
from ._threadpool import RequestState as RequestState
from ._threadpool import ThreadPool as ThreadPool
from ._threadpool import ThreadPoolRequest as ThreadPoolRequest
from ._timers import ClockSpec as ClockSpec
from ._timers import Timer as Timer
from ._timers import TimerListGroup as TimerListGroup
from ._worker import set_parent_death_signal as set_parent_death_signal

__all__ = [
    "AioContext",
    "AioContextStats",
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
    "get_current_aio_context",
    "reschedule",
    "set_parent_death_signal",
    "sleep_ns",
    "soonest_timeout",
    "timeout_ns_to_seconds",
]
