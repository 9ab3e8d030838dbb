"""The cluster: iothread processes started, watched, restarted and driven from the main loop."""

from __future__ import annotations

from ._cluster import HEARTBEAT_INTERVAL_MS as HEARTBEAT_INTERVAL_MS
from ._cluster import Cluster as Cluster
from ._cluster import IOThread as IOThread
from ._cluster import IOThreadConfig as IOThreadConfig
from ._cluster import IOThreadState as IOThreadState
from ._cluster import MAX_IOTHREADS as MAX_IOTHREADS
from ._cluster import NodeInfo as NodeInfo

__all__ = [
    "Cluster",
    "HEARTBEAT_INTERVAL_MS",
    "IOThread",
    "IOThreadConfig",
    "IOThreadState",
    "MAX_IOTHREADS",
    "NodeInfo",
]
