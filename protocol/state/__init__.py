"""The cluster's state file, typed: what the main loop writes and clients read (pure)."""

from __future__ import annotations

from ._state import CLUSTER_STATE_FILE as CLUSTER_STATE_FILE
from ._state import ClusterState as ClusterState
from ._state import ExportEntry as ExportEntry
from ._state import IOThreadEntry as IOThreadEntry
from ._state import NodeEntry as NodeEntry
from ._state import cluster_state_path as cluster_state_path

__all__ = [
    "CLUSTER_STATE_FILE",
    "ClusterState",
    "ExportEntry",
    "IOThreadEntry",
    "NodeEntry",
    "cluster_state_path",
]
