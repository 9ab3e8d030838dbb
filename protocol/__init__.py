"""Wire formats, message types and the project's error tree.

``encode(msg) -> frames`` and ``decode(frames) -> msg`` carry the messages of
``_messages.py`` between the main loop, the iothreads and clients;
``encode_batch`` / ``decode_batch`` carry several in one ZeroMQ message.

``protocol`` is the leaf package: it imports nothing from ``iothreads`` or
``mainloop``, and its core holds no sockets, threads or clocks.
"""

from __future__ import annotations

from ._channel import Channel as Channel
from ._channel import channel_socket as channel_socket
from ._channel import ipc_endpoint as ipc_endpoint
from ._channel import make_runtime_dir as make_runtime_dir
from ._codec import Limits as Limits
from ._codec import decode as decode
from ._codec import decode_batch as decode_batch
from ._codec import encode as encode
from ._codec import encode_batch as encode_batch
from ._codec import pack as pack
from ._errors import BottomHalfLeakError as BottomHalfLeakError
from ._errors import CoroutineStateError as CoroutineStateError
from ._errors import EvloopError as EvloopError
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import ProtocolError as ProtocolError
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._errors import StateError as StateError
from ._errors import ThreadContractError as ThreadContractError
from ._messages import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._qmp import QmpDecoder as QmpDecoder
from ._qmp import QmpInputError as QmpInputError
from ._qmp import qmp_error as qmp_error
from ._qmp import qmp_event as qmp_event
from ._qmp import qmp_line as qmp_line
from ._qmp import qmp_return as qmp_return
from ._messages import BlockCompletion as BlockCompletion
from ._messages import BlockOp as BlockOp
from ._messages import BlockdevAdd as BlockdevAdd
from ._messages import BlockdevDel as BlockdevDel
from ._messages import BlockRequest as BlockRequest
from ._messages import ErrorReply as ErrorReply
from ._messages import Event as Event
from ._messages import Heartbeat as Heartbeat
from ._messages import Hello as Hello
from ._messages import Message as Message
from ._messages import Query as Query
from ._messages import QueryReply as QueryReply
from ._messages import SetLatencyHistogram as SetLatencyHistogram
from ._messages import SetPollParams as SetPollParams
from ._messages import Stop as Stop
from ._messages import Welcome as Welcome

__all__ = [
    "BlockCompletion",
    "BlockOp",
    "BlockRequest",
    "BlockdevAdd",
    "BlockdevDel",
    "BottomHalfLeakError",
    "Channel",
    "CoroutineStateError",
    "ErrorReply",
    "Event",
    "EvloopError",
    "Heartbeat",
    "Hello",
    "Limits",
    "LocalProtocolError",
    "Message",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "QmpDecoder",
    "QmpInputError",
    "Query",
    "QueryReply",
    "RemoteProtocolError",
    "SetLatencyHistogram",
    "SetPollParams",
    "StateError",
    "Stop",
    "ThreadContractError",
    "Welcome",
    "channel_socket",
    "decode",
    "decode_batch",
    "encode",
    "encode_batch",
    "ipc_endpoint",
    "make_runtime_dir",
    "pack",
    "qmp_error",
    "qmp_event",
    "qmp_line",
    "qmp_return",
]
