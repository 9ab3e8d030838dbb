"""The cluster: iothread processes started, watched, restarted and driven from the main loop."""

from __future__ import annotations

from ._cluster import Cluster as Cluster
from ._cluster import IOThread as IOThread
from ._cluster import IOThreadConfig as IOThreadConfig
from ._cluster import IOThreadState as IOThreadState
from ._cluster import NodeInfo as NodeInfo

__all__ = [
    "Cluster",
    "IOThread",
    "IOThreadConfig",
    "IOThreadState",
    "NodeInfo",
]
