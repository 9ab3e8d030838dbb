"""The ZeroMQ channel: batched, non-blocking message exchange over one socket (owns sockets),
the throttled log of what peers send wrong, the private runtime directory its sockets live in,
and CURVE security for its tcp:// sockets (key files, the ZAP handler)."""

from __future__ import annotations

from ._channel import Channel as Channel
from ._channel import Drainable as Drainable
from ._channel import channel_socket as channel_socket
from ._channel import has_input as has_input
from ._channel import ipc_endpoint as ipc_endpoint
from ._curve import HANDSHAKE_FAILURES as HANDSHAKE_FAILURES
from ._curve import KeyPair as KeyPair
from ._curve import Refusal as Refusal
from ._curve import ZapHandler as ZapHandler
from ._curve import ZapPolicy as ZapPolicy
from ._curve import ZapRequest as ZapRequest
from ._curve import curve_client as curve_client
from ._curve import curve_server as curve_server
from ._curve import generate_key_pair as generate_key_pair
from ._curve import handshake_refusal as handshake_refusal
from ._curve import load_authorized_keys as load_authorized_keys
from ._curve import load_key_pair as load_key_pair
from ._curve import load_public_key as load_public_key
from ._curve import local_key_paths as local_key_paths
from ._curve import tcp_heartbeats as tcp_heartbeats
from ._curve import write_key_file as write_key_file
from ._fds import FD_RESERVE as FD_RESERVE
from ._fds import FdBudget as FdBudget
from ._fds import open_fd_count as open_fd_count
from ._fds import raise_fd_limit as raise_fd_limit
from ._memory import bound_heap_retention as bound_heap_retention
from ._handoff import handoff_pair as handoff_pair
from ._handoff import receive_connection as receive_connection
from ._handoff import send_connection as send_connection
from ._log import ThrottledLog as ThrottledLog
from ._runtime_dir import PAUSED_SUFFIX as PAUSED_SUFFIX
from ._runtime_dir import bind_owner_only as bind_owner_only
from ._runtime_dir import check_runtime_dir as check_runtime_dir
from ._runtime_dir import default_runtime_parent as default_runtime_parent
from ._runtime_dir import made_runtime_dirs as made_runtime_dirs
from ._runtime_dir import make_runtime_dir as make_runtime_dir
from ._runtime_dir import open_own_file as open_own_file
from ._runtime_dir import bind_unix_owner_only as bind_unix_owner_only
from ._runtime_dir import owner_only_umask as owner_only_umask
from ._runtime_dir import prepare_runtime_dir as prepare_runtime_dir
from ._runtime_dir import remove_stale_socket as remove_stale_socket
from ._runtime_dir import replace_file as replace_file

__all__ = [
    "Channel",
    "Drainable",
    "FD_RESERVE",
    "FdBudget",
    "HANDSHAKE_FAILURES",
    "KeyPair",
    "PAUSED_SUFFIX",
    "Refusal",
    "ThrottledLog",
    "ZapHandler",
    "ZapPolicy",
    "ZapRequest",
    "bind_owner_only",
    "bind_unix_owner_only",
    "bound_heap_retention",
    "channel_socket",
    "check_runtime_dir",
    "curve_client",
    "curve_server",
    "default_runtime_parent",
    "generate_key_pair",
    "handoff_pair",
    "has_input",
    "handshake_refusal",
    "ipc_endpoint",
    "load_authorized_keys",
    "load_key_pair",
    "load_public_key",
    "local_key_paths",
    "made_runtime_dirs",
    "make_runtime_dir",
    "open_fd_count",
    "open_own_file",
    "owner_only_umask",
    "prepare_runtime_dir",
    "raise_fd_limit",
    "receive_connection",
    "remove_stale_socket",
    "replace_file",
    "send_connection",
    "tcp_heartbeats",
    "write_key_file",
]
