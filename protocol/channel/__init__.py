"""The ZeroMQ channel: batched, non-blocking message exchange over one socket (owns sockets),
the throttled log of what peers send wrong, and the private runtime directory its sockets live in."""

from __future__ import annotations

from ._channel import Channel as Channel
from ._channel import channel_socket as channel_socket
from ._channel import ipc_endpoint as ipc_endpoint
from ._log import ThrottledLog as ThrottledLog
from ._runtime_dir import bind_owner_only as bind_owner_only
from ._runtime_dir import make_runtime_dir as make_runtime_dir
from ._runtime_dir import open_own_file as open_own_file
from ._runtime_dir import owner_only_umask as owner_only_umask
from ._runtime_dir import prepare_runtime_dir as prepare_runtime_dir
from ._runtime_dir import remove_stale_socket as remove_stale_socket
from ._runtime_dir import replace_file as replace_file

__all__ = [
    "Channel",
    "ThrottledLog",
    "bind_owner_only",
    "channel_socket",
    "ipc_endpoint",
    "make_runtime_dir",
    "open_own_file",
    "owner_only_umask",
    "prepare_runtime_dir",
    "remove_stale_socket",
    "replace_file",
]
