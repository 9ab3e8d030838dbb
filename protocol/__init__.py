"""Wire formats, message types and the project's error tree.

``encode(msg) -> frames`` and ``decode(frames) -> msg`` carry the messages of
``_messages.py`` between the main loop, the iothreads and clients;
``encode_batch`` / ``decode_batch`` carry several in one ZeroMQ message.
``nbd`` is the NBD protocol, sans I/O: the server's handshake
(``NbdServerHandshake``), the transmission phase's request decoder and reply
builders.

``protocol`` is the leaf package: it imports nothing from ``iothreads`` or
``mainloop``, and its core holds no sockets, threads or clocks.
"""

from __future__ import annotations

from .channel import Channel as Channel
from .channel import FD_RESERVE as FD_RESERVE
from .channel import handoff_pair as handoff_pair
from .channel import receive_connection as receive_connection
from .channel import send_connection as send_connection
from .channel import PAUSED_SUFFIX as PAUSED_SUFFIX
from .channel import FdBudget as FdBudget
from .channel import open_fd_count as open_fd_count
from .channel import raise_fd_limit as raise_fd_limit
from .channel import bound_heap_retention as bound_heap_retention
from .channel import channel_socket as channel_socket
from .channel import has_input as has_input
from .channel import ipc_endpoint as ipc_endpoint
from .channel import make_runtime_dir as make_runtime_dir
from .channel import bind_owner_only as bind_owner_only
from .channel import check_runtime_dir as check_runtime_dir
from .channel import default_runtime_parent as default_runtime_parent
from .channel import made_runtime_dirs as made_runtime_dirs
from .channel import open_own_file as open_own_file
from .channel import bind_unix_owner_only as bind_unix_owner_only
from .channel import owner_only_umask as owner_only_umask
from .channel import prepare_runtime_dir as prepare_runtime_dir
from .channel import remove_stale_socket as remove_stale_socket
from .channel import replace_file as replace_file
from .channel import ThrottledLog as ThrottledLog
from .wire import Limits as Limits
from .wire import decode as decode
from .wire import decode_batch as decode_batch
from .wire import encode as encode
from .wire import encode_batch as encode_batch
from .wire import pack as pack
from .wire import PendingRequests as PendingRequests
from .wire import CLIENT_CREDIT as CLIENT_CREDIT
from .wire import DATA_RCVHWM as DATA_RCVHWM
from .wire import DATA_SNDHWM as DATA_SNDHWM
from .wire import ClientCredit as ClientCredit
from .wire import InFlight as InFlight
from .wire import request_bytes as request_bytes
from .state import CLUSTER_STATE_FILE as CLUSTER_STATE_FILE
from .state import ClusterState as ClusterState
from .state import ExportEntry as ExportEntry
from .state import IOThreadEntry as IOThreadEntry
from .state import NodeEntry as NodeEntry
from .state import cluster_state_path as cluster_state_path
from ._errors import BadRequestError as BadRequestError
from ._errors import BottomHalfLeakError as BottomHalfLeakError
from ._errors import CoroutineStateError as CoroutineStateError
from ._errors import EvloopError as EvloopError
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import ProtocolError as ProtocolError
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._errors import StateError as StateError
from ._errors import ThreadContractError as ThreadContractError
from ._errors import UnsafePathError as UnsafePathError
from .wire import PROTOCOL_VERSION as PROTOCOL_VERSION
from .nbd import NbdExport as NbdExport
from .nbd import NbdHandshakeState as NbdHandshakeState
from .nbd import NbdMetaContext as NbdMetaContext
from .nbd import NbdNegotiated as NbdNegotiated
from .nbd import NbdRequest as NbdRequest
from .nbd import NbdRequestDecoder as NbdRequestDecoder
from .nbd import NbdServerHandshake as NbdServerHandshake
from .qmp import QmpCommand as QmpCommand
from .qmp import QmpDecoder as QmpDecoder
from .qmp import QmpInputError as QmpInputError
from .qmp import QmpSession as QmpSession
from .qmp import QmpSessionState as QmpSessionState
from .qmp import qmp_error as qmp_error
from .qmp import qmp_event as qmp_event
from .qmp import qmp_line as qmp_line
from .qmp import qmp_return as qmp_return
from .wire import BlockCompletion as BlockCompletion
from .wire import BlockOp as BlockOp
from .wire import BlockdevAdd as BlockdevAdd
from .wire import BlockdevDel as BlockdevDel
from .wire import BlockRequest as BlockRequest
from .wire import ErrorReply as ErrorReply
from .wire import Event as Event
from .wire import IOTHREAD_LEFT as IOTHREAD_LEFT
from .wire import NBD_CONNECTION_CLOSED as NBD_CONNECTION_CLOSED
from .wire import NBD_CONNECTION_OPENED as NBD_CONNECTION_OPENED
from .wire import PEER_REFUSED as PEER_REFUSED
from .wire import Heartbeat as Heartbeat
from .wire import NodeStats as NodeStats
from .wire import Hello as Hello
from .wire import Message as Message
from .wire import Query as Query
from .wire import QueryReply as QueryReply
from .wire import SetLatencyHistogram as SetLatencyHistogram
from .wire import SetPollParams as SetPollParams
from .wire import Resume as Resume
from .wire import Stop as Stop
from .wire import Welcome as Welcome
from .wire import NbdCloseExport as NbdCloseExport
from .wire import NbdConnection as NbdConnection
from .wire import NbdOffer as NbdOffer

__all__ = [
    "BadRequestError",
    "BlockCompletion",
    "BlockOp",
    "BlockRequest",
    "BlockdevAdd",
    "BlockdevDel",
    "BottomHalfLeakError",
    "CLIENT_CREDIT",
    "CLUSTER_STATE_FILE",
    "Channel",
    "ClientCredit",
    "ClusterState",
    "CoroutineStateError",
    "DATA_RCVHWM",
    "DATA_SNDHWM",
    "ErrorReply",
    "Event",
    "EvloopError",
    "ExportEntry",
    "FD_RESERVE",
    "FdBudget",
    "Heartbeat",
    "Hello",
    "IOTHREAD_LEFT",
    "IOThreadEntry",
    "InFlight",
    "Limits",
    "LocalProtocolError",
    "Message",
    "NBD_CONNECTION_CLOSED",
    "NBD_CONNECTION_OPENED",
    "NbdCloseExport",
    "NbdConnection",
    "NbdExport",
    "NbdHandshakeState",
    "NbdMetaContext",
    "NbdNegotiated",
    "NbdOffer",
    "NbdRequest",
    "NbdRequestDecoder",
    "NbdServerHandshake",
    "NodeEntry",
    "NodeStats",
    "PAUSED_SUFFIX",
    "PEER_REFUSED",
    "PROTOCOL_VERSION",
    "PendingRequests",
    "ProtocolError",
    "QmpCommand",
    "QmpDecoder",
    "QmpInputError",
    "QmpSession",
    "QmpSessionState",
    "Query",
    "QueryReply",
    "RemoteProtocolError",
    "Resume",
    "SetLatencyHistogram",
    "SetPollParams",
    "StateError",
    "Stop",
    "ThreadContractError",
    "ThrottledLog",
    "UnsafePathError",
    "Welcome",
    "bind_owner_only",
    "bind_unix_owner_only",
    "bound_heap_retention",
    "channel_socket",
    "check_runtime_dir",
    "cluster_state_path",
    "decode",
    "decode_batch",
    "default_runtime_parent",
    "encode",
    "encode_batch",
    "handoff_pair",
    "has_input",
    "ipc_endpoint",
    "made_runtime_dirs",
    "make_runtime_dir",
    "open_fd_count",
    "open_own_file",
    "owner_only_umask",
    "pack",
    "prepare_runtime_dir",
    "qmp_error",
    "qmp_event",
    "qmp_line",
    "qmp_return",
    "raise_fd_limit",
    "receive_connection",
    "remove_stale_socket",
    "replace_file",
    "request_bytes",
    "send_connection",
]
