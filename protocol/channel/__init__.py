"""The ZeroMQ channel: batched, non-blocking message exchange over one socket (owns sockets)."""

from __future__ import annotations

from ._channel import Channel as Channel
from ._channel import channel_socket as channel_socket
from ._channel import make_runtime_dir as make_runtime_dir
from ._channel import ipc_endpoint as ipc_endpoint

__all__ = [
    "Channel",
    "channel_socket",
    "ipc_endpoint",
    "make_runtime_dir",
]
