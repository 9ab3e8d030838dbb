"""The messages of the control and data planes, their msgpack codec (pure: bytes in, bytes out)
and the table of requests waiting for their replies."""

from __future__ import annotations

from ._codec import Limits as Limits
from ._codec import decode as decode
from ._codec import decode_batch as decode_batch
from ._codec import encode as encode
from ._codec import encode_batch as encode_batch
from ._codec import pack as pack
from ._messages import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._messages import BlockCompletion as BlockCompletion
from ._messages import BlockOp as BlockOp
from ._messages import BlockRequest as BlockRequest
from ._messages import BlockdevAdd as BlockdevAdd
from ._messages import BlockdevDel as BlockdevDel
from ._messages import ErrorReply as ErrorReply
from ._messages import Event as Event
from ._messages import IOTHREAD_LEFT as IOTHREAD_LEFT
from ._messages import NBD_CONNECTION_CLOSED as NBD_CONNECTION_CLOSED
from ._messages import NBD_CONNECTION_OPENED as NBD_CONNECTION_OPENED
from ._messages import PEER_REFUSED as PEER_REFUSED
from ._messages import Heartbeat as Heartbeat
from ._messages import NodeStats as NodeStats
from ._messages import Hello as Hello
from ._messages import Message as Message
from ._messages import NbdCloseExport as NbdCloseExport
from ._messages import NbdConnection as NbdConnection
from ._messages import NbdOffer as NbdOffer
from ._messages import Query as Query
from ._messages import QueryReply as QueryReply
from ._messages import SetLatencyHistogram as SetLatencyHistogram
from ._messages import SetPollParams as SetPollParams
from ._messages import Resume as Resume
from ._messages import Stop as Stop
from ._messages import Welcome as Welcome
from ._pending import PendingRequests as PendingRequests
from ._flow import CLIENT_CREDIT as CLIENT_CREDIT
from ._flow import DATA_RCVHWM as DATA_RCVHWM
from ._flow import DATA_SNDHWM as DATA_SNDHWM
from ._flow import ClientCredit as ClientCredit
from ._flow import InFlight as InFlight
from ._flow import request_bytes as request_bytes

__all__ = [
    "BlockCompletion",
    "BlockOp",
    "BlockRequest",
    "BlockdevAdd",
    "BlockdevDel",
    "CLIENT_CREDIT",
    "ClientCredit",
    "DATA_RCVHWM",
    "DATA_SNDHWM",
    "ErrorReply",
    "Event",
    "Heartbeat",
    "Hello",
    "IOTHREAD_LEFT",
    "InFlight",
    "Limits",
    "Message",
    "NBD_CONNECTION_CLOSED",
    "NBD_CONNECTION_OPENED",
    "NbdCloseExport",
    "NbdConnection",
    "NbdOffer",
    "NodeStats",
    "PEER_REFUSED",
    "PROTOCOL_VERSION",
    "PendingRequests",
    "Query",
    "QueryReply",
    "Resume",
    "SetLatencyHistogram",
    "SetPollParams",
    "Stop",
    "Welcome",
    "decode",
    "decode_batch",
    "encode",
    "encode_batch",
    "pack",
    "request_bytes",
]
