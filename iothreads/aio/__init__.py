"""The AioContext and its companions: bottom halves, event notifiers, fd handlers, timers and clocks,
adaptive busy polling, the thread pool, coroutines, and a channel served by a context."""

from __future__ import annotations

from ._asyncio import AsyncioSource as AsyncioSource
from ._asyncio import asyncio_source_of as asyncio_source_of
from ._bh import BottomHalf as BottomHalf
from ._bh import BottomHalfQueue as BottomHalfQueue
from ._channel_handler import ChannelHandler as ChannelHandler
from ._clock import Clock as Clock
from ._clock import ClockType as ClockType
from ._clock import ManualClock as ManualClock
from ._clock import MonotonicClock as MonotonicClock
from ._clock import WallClock as WallClock
from ._context import AioContext as AioContext
from ._context import AioContextStats as AioContextStats
from ._context import get_current_aio_context as get_current_aio_context
from ._coroutine import Coroutine as Coroutine
from ._coroutine import Future as Future
from ._coroutine import current_coroutine as current_coroutine
from ._coroutine import reschedule as reschedule
from ._coroutine import sleep_ns as sleep_ns
from ._fdmon import EpollMonitor as EpollMonitor
from ._fdmon import EVENT_IN as EVENT_IN
from ._fdmon import EVENT_OUT as EVENT_OUT
from ._fdmon import EVENT_READ_MASK as EVENT_READ_MASK
from ._fdmon import EVENT_WRITE_MASK as EVENT_WRITE_MASK
from ._fdmon import timeout_ns_to_seconds as timeout_ns_to_seconds
from ._handlers import FdHandlers as FdHandlers
from ._handlers import Handler as Handler
from ._handlers import soonest_timeout as soonest_timeout
from ._notifier import EventNotifier as EventNotifier
from ._polling import PollParams as PollParams
from ._polling import never_ready as never_ready
from ._polling import adjust_poll_ns as adjust_poll_ns
from ._threadpool import RequestState as RequestState
from ._threadpool import ThreadPool as ThreadPool
from ._threadpool import ThreadPoolRequest as ThreadPoolRequest
from ._timers import Timer as Timer
from ._timers import TimerList as TimerList
from ._timers import TimerListGroup as TimerListGroup
from ._timers import ClockSpec as ClockSpec

__all__ = [
    "AioContext",
    "AioContextStats",
    "BottomHalf",
    "BottomHalfQueue",
    "ChannelHandler",
    "Clock",
    "ClockSpec",
    "ClockType",
    "Coroutine",
    "EVENT_IN",
    "EVENT_OUT",
    "EVENT_READ_MASK",
    "EVENT_WRITE_MASK",
    "EpollMonitor",
    "EventNotifier",
    "FdHandlers",
    "Future",
    "Handler",
    "ManualClock",
    "MonotonicClock",
    "PollParams",
    "RequestState",
    "ThreadPool",
    "ThreadPoolRequest",
    "Timer",
    "TimerList",
    "TimerListGroup",
    "WallClock",
    "adjust_poll_ns",
    "current_coroutine",
    "get_current_aio_context",
    "never_ready",
    "reschedule",
    "sleep_ns",
    "soonest_timeout",
    "timeout_ns_to_seconds",
]
