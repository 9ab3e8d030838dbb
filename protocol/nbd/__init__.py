"""NBD, pure: the protocol's constants, the server's handshake, the transmission phase's codec.

No sockets here: ``NbdServerHandshake`` takes the client's bytes and gives
option replies and, at the end, an ``NbdNegotiated``; ``NbdRequestDecoder``
turns the transmission phase's bytes into checked ``NbdRequest`` objects;
the reply builders (``simple_reply``, ``chunk_*``, ``generic_reply``) give
lists of buffers for one ``sendmsg``.  The main loop owns the listener and
the handshake, the iothread that holds a node serves the transmission phase.
A client's side too: ``NbdClientHandshake`` (NBD_OPT_GO), ``encode_request``,
``NbdReplyDecoder`` (simple replies) and ``parse_nbd_uri``.
"""

from __future__ import annotations

from ._constants import NBD_INIT_MAGIC as NBD_INIT_MAGIC
from ._constants import NBD_OPTS_MAGIC as NBD_OPTS_MAGIC
from ._constants import NBD_REP_MAGIC as NBD_REP_MAGIC
from ._constants import NBD_REQUEST_MAGIC as NBD_REQUEST_MAGIC
from ._constants import NBD_SIMPLE_REPLY_MAGIC as NBD_SIMPLE_REPLY_MAGIC
from ._constants import NBD_STRUCTURED_REPLY_MAGIC as NBD_STRUCTURED_REPLY_MAGIC
from ._constants import NBD_FLAG_FIXED_NEWSTYLE as NBD_FLAG_FIXED_NEWSTYLE
from ._constants import NBD_FLAG_NO_ZEROES as NBD_FLAG_NO_ZEROES
from ._constants import NBD_FLAG_C_FIXED_NEWSTYLE as NBD_FLAG_C_FIXED_NEWSTYLE
from ._constants import NBD_FLAG_C_NO_ZEROES as NBD_FLAG_C_NO_ZEROES
from ._constants import NBD_FLAG_HAS_FLAGS as NBD_FLAG_HAS_FLAGS
from ._constants import NBD_FLAG_READ_ONLY as NBD_FLAG_READ_ONLY
from ._constants import NBD_FLAG_SEND_FLUSH as NBD_FLAG_SEND_FLUSH
from ._constants import NBD_FLAG_SEND_FUA as NBD_FLAG_SEND_FUA
from ._constants import NBD_FLAG_ROTATIONAL as NBD_FLAG_ROTATIONAL
from ._constants import NBD_FLAG_SEND_TRIM as NBD_FLAG_SEND_TRIM
from ._constants import NBD_FLAG_SEND_WRITE_ZEROES as NBD_FLAG_SEND_WRITE_ZEROES
from ._constants import NBD_FLAG_SEND_DF as NBD_FLAG_SEND_DF
from ._constants import NBD_FLAG_CAN_MULTI_CONN as NBD_FLAG_CAN_MULTI_CONN
from ._constants import NBD_FLAG_SEND_RESIZE as NBD_FLAG_SEND_RESIZE
from ._constants import NBD_FLAG_SEND_CACHE as NBD_FLAG_SEND_CACHE
from ._constants import NBD_FLAG_SEND_FAST_ZERO as NBD_FLAG_SEND_FAST_ZERO
from ._constants import NBD_FLAG_BLOCK_STAT_PAYLOAD as NBD_FLAG_BLOCK_STAT_PAYLOAD
from ._constants import NBD_OPT_EXPORT_NAME as NBD_OPT_EXPORT_NAME
from ._constants import NBD_OPT_ABORT as NBD_OPT_ABORT
from ._constants import NBD_OPT_LIST as NBD_OPT_LIST
from ._constants import NBD_OPT_PEEK_EXPORT as NBD_OPT_PEEK_EXPORT
from ._constants import NBD_OPT_STARTTLS as NBD_OPT_STARTTLS
from ._constants import NBD_OPT_INFO as NBD_OPT_INFO
from ._constants import NBD_OPT_GO as NBD_OPT_GO
from ._constants import NBD_OPT_STRUCTURED_REPLY as NBD_OPT_STRUCTURED_REPLY
from ._constants import NBD_OPT_LIST_META_CONTEXT as NBD_OPT_LIST_META_CONTEXT
from ._constants import NBD_OPT_SET_META_CONTEXT as NBD_OPT_SET_META_CONTEXT
from ._constants import NBD_OPT_EXTENDED_HEADERS as NBD_OPT_EXTENDED_HEADERS
from ._constants import NBD_REP_ACK as NBD_REP_ACK
from ._constants import NBD_REP_SERVER as NBD_REP_SERVER
from ._constants import NBD_REP_INFO as NBD_REP_INFO
from ._constants import NBD_REP_META_CONTEXT as NBD_REP_META_CONTEXT
from ._constants import NBD_REP_FLAG_ERROR as NBD_REP_FLAG_ERROR
from ._constants import NBD_REP_ERR_UNSUP as NBD_REP_ERR_UNSUP
from ._constants import NBD_REP_ERR_POLICY as NBD_REP_ERR_POLICY
from ._constants import NBD_REP_ERR_INVALID as NBD_REP_ERR_INVALID
from ._constants import NBD_REP_ERR_PLATFORM as NBD_REP_ERR_PLATFORM
from ._constants import NBD_REP_ERR_TLS_REQD as NBD_REP_ERR_TLS_REQD
from ._constants import NBD_REP_ERR_UNKNOWN as NBD_REP_ERR_UNKNOWN
from ._constants import NBD_REP_ERR_SHUTDOWN as NBD_REP_ERR_SHUTDOWN
from ._constants import NBD_REP_ERR_BLOCK_SIZE_REQD as NBD_REP_ERR_BLOCK_SIZE_REQD
from ._constants import NBD_REP_ERR_TOO_BIG as NBD_REP_ERR_TOO_BIG
from ._constants import NBD_REP_ERR_EXT_HEADER_REQD as NBD_REP_ERR_EXT_HEADER_REQD
from ._constants import NBD_INFO_EXPORT as NBD_INFO_EXPORT
from ._constants import NBD_INFO_NAME as NBD_INFO_NAME
from ._constants import NBD_INFO_DESCRIPTION as NBD_INFO_DESCRIPTION
from ._constants import NBD_INFO_BLOCK_SIZE as NBD_INFO_BLOCK_SIZE
from ._constants import NBD_CMD_READ as NBD_CMD_READ
from ._constants import NBD_CMD_WRITE as NBD_CMD_WRITE
from ._constants import NBD_CMD_DISC as NBD_CMD_DISC
from ._constants import NBD_CMD_FLUSH as NBD_CMD_FLUSH
from ._constants import NBD_CMD_TRIM as NBD_CMD_TRIM
from ._constants import NBD_CMD_CACHE as NBD_CMD_CACHE
from ._constants import NBD_CMD_WRITE_ZEROES as NBD_CMD_WRITE_ZEROES
from ._constants import NBD_CMD_BLOCK_STATUS as NBD_CMD_BLOCK_STATUS
from ._constants import NBD_CMD_FLAG_FUA as NBD_CMD_FLAG_FUA
from ._constants import NBD_CMD_FLAG_NO_HOLE as NBD_CMD_FLAG_NO_HOLE
from ._constants import NBD_CMD_FLAG_DF as NBD_CMD_FLAG_DF
from ._constants import NBD_CMD_FLAG_REQ_ONE as NBD_CMD_FLAG_REQ_ONE
from ._constants import NBD_CMD_FLAG_FAST_ZERO as NBD_CMD_FLAG_FAST_ZERO
from ._constants import NBD_REPLY_FLAG_DONE as NBD_REPLY_FLAG_DONE
from ._constants import NBD_REPLY_TYPE_NONE as NBD_REPLY_TYPE_NONE
from ._constants import NBD_REPLY_TYPE_OFFSET_DATA as NBD_REPLY_TYPE_OFFSET_DATA
from ._constants import NBD_REPLY_TYPE_OFFSET_HOLE as NBD_REPLY_TYPE_OFFSET_HOLE
from ._constants import NBD_REPLY_TYPE_BLOCK_STATUS as NBD_REPLY_TYPE_BLOCK_STATUS
from ._constants import NBD_REPLY_TYPE_ERROR as NBD_REPLY_TYPE_ERROR
from ._constants import NBD_REPLY_TYPE_ERROR_OFFSET as NBD_REPLY_TYPE_ERROR_OFFSET
from ._constants import NBD_SUCCESS as NBD_SUCCESS
from ._constants import NBD_EPERM as NBD_EPERM
from ._constants import NBD_EIO as NBD_EIO
from ._constants import NBD_ENOMEM as NBD_ENOMEM
from ._constants import NBD_EINVAL as NBD_EINVAL
from ._constants import NBD_ENOSPC as NBD_ENOSPC
from ._constants import NBD_EOVERFLOW as NBD_EOVERFLOW
from ._constants import NBD_ENOTSUP as NBD_ENOTSUP
from ._constants import NBD_ESHUTDOWN as NBD_ESHUTDOWN
from ._constants import NBD_META_CONTEXT_BASE_ALLOCATION as NBD_META_CONTEXT_BASE_ALLOCATION
from ._constants import NBD_META_CONTEXT_ALLOCATION_DEPTH as NBD_META_CONTEXT_ALLOCATION_DEPTH
from ._constants import NBD_META_ID_BASE_ALLOCATION as NBD_META_ID_BASE_ALLOCATION
from ._constants import NBD_META_ID_ALLOCATION_DEPTH as NBD_META_ID_ALLOCATION_DEPTH
from ._constants import NBD_STATE_HOLE as NBD_STATE_HOLE
from ._constants import NBD_STATE_ZERO as NBD_STATE_ZERO
from ._constants import NBD_MAX_BUFFER_SIZE as NBD_MAX_BUFFER_SIZE
from ._constants import NBD_MAX_STRING_SIZE as NBD_MAX_STRING_SIZE
from ._constants import NBD_MAX_BLOCK_STATUS_EXTENTS as NBD_MAX_BLOCK_STATUS_EXTENTS
from ._constants import NBD_REQUEST_SIZE as NBD_REQUEST_SIZE
from ._constants import NBD_SIMPLE_REPLY_SIZE as NBD_SIMPLE_REPLY_SIZE
from ._constants import NBD_STRUCTURED_REPLY_SIZE as NBD_STRUCTURED_REPLY_SIZE
from ._constants import NBD_EXPORT_NAME_ZEROES as NBD_EXPORT_NAME_ZEROES
from ._constants import nbd_cmd_lookup as nbd_cmd_lookup
from ._constants import nbd_opt_lookup as nbd_opt_lookup
from ._constants import system_errno_to_nbd_errno as system_errno_to_nbd_errno
from ._export import NbdExport as NbdExport
from ._export import NbdMetaContext as NbdMetaContext
from ._export import NbdNegotiated as NbdNegotiated
from ._handshake import NbdHandshakeState as NbdHandshakeState
from ._handshake import NbdServerHandshake as NbdServerHandshake
from ._client import NBD_DEFAULT_PORT as NBD_DEFAULT_PORT
from ._client import NbdClientHandshake as NbdClientHandshake
from ._client import NbdClientState as NbdClientState
from ._client import NbdReplyDecoder as NbdReplyDecoder
from ._client import NbdSimpleReply as NbdSimpleReply
from ._client import NbdUri as NbdUri
from ._client import parse_nbd_uri as parse_nbd_uri
from ._requests import NbdRequest as NbdRequest
from ._requests import NbdRequestDecoder as NbdRequestDecoder
from ._requests import encode_request as encode_request
from ._replies import ReplyBuffer as ReplyBuffer
from ._replies import chunk_block_status as chunk_block_status
from ._replies import chunk_done as chunk_done
from ._replies import chunk_error as chunk_error
from ._replies import chunk_error_offset as chunk_error_offset
from ._replies import chunk_hole as chunk_hole
from ._replies import chunk_read as chunk_read
from ._replies import generic_reply as generic_reply
from ._replies import read_reply_header as read_reply_header
from ._replies import simple_reply as simple_reply

__all__ = [
    "NBD_CMD_BLOCK_STATUS",
    "NBD_CMD_CACHE",
    "NBD_CMD_DISC",
    "NBD_CMD_FLAG_DF",
    "NBD_CMD_FLAG_FAST_ZERO",
    "NBD_CMD_FLAG_FUA",
    "NBD_CMD_FLAG_NO_HOLE",
    "NBD_CMD_FLAG_REQ_ONE",
    "NBD_CMD_FLUSH",
    "NBD_CMD_READ",
    "NBD_CMD_TRIM",
    "NBD_CMD_WRITE",
    "NBD_CMD_WRITE_ZEROES",
    "NBD_DEFAULT_PORT",
    "NBD_EINVAL",
    "NBD_EIO",
    "NBD_ENOMEM",
    "NBD_ENOSPC",
    "NBD_ENOTSUP",
    "NBD_EOVERFLOW",
    "NBD_EPERM",
    "NBD_ESHUTDOWN",
    "NBD_EXPORT_NAME_ZEROES",
    "NBD_FLAG_BLOCK_STAT_PAYLOAD",
    "NBD_FLAG_CAN_MULTI_CONN",
    "NBD_FLAG_C_FIXED_NEWSTYLE",
    "NBD_FLAG_C_NO_ZEROES",
    "NBD_FLAG_FIXED_NEWSTYLE",
    "NBD_FLAG_HAS_FLAGS",
    "NBD_FLAG_NO_ZEROES",
    "NBD_FLAG_READ_ONLY",
    "NBD_FLAG_ROTATIONAL",
    "NBD_FLAG_SEND_CACHE",
    "NBD_FLAG_SEND_DF",
    "NBD_FLAG_SEND_FAST_ZERO",
    "NBD_FLAG_SEND_FLUSH",
    "NBD_FLAG_SEND_FUA",
    "NBD_FLAG_SEND_RESIZE",
    "NBD_FLAG_SEND_TRIM",
    "NBD_FLAG_SEND_WRITE_ZEROES",
    "NBD_INFO_BLOCK_SIZE",
    "NBD_INFO_DESCRIPTION",
    "NBD_INFO_EXPORT",
    "NBD_INFO_NAME",
    "NBD_INIT_MAGIC",
    "NBD_MAX_BLOCK_STATUS_EXTENTS",
    "NBD_MAX_BUFFER_SIZE",
    "NBD_MAX_STRING_SIZE",
    "NBD_META_CONTEXT_ALLOCATION_DEPTH",
    "NBD_META_CONTEXT_BASE_ALLOCATION",
    "NBD_META_ID_ALLOCATION_DEPTH",
    "NBD_META_ID_BASE_ALLOCATION",
    "NBD_OPTS_MAGIC",
    "NBD_OPT_ABORT",
    "NBD_OPT_EXPORT_NAME",
    "NBD_OPT_EXTENDED_HEADERS",
    "NBD_OPT_GO",
    "NBD_OPT_INFO",
    "NBD_OPT_LIST",
    "NBD_OPT_LIST_META_CONTEXT",
    "NBD_OPT_PEEK_EXPORT",
    "NBD_OPT_SET_META_CONTEXT",
    "NBD_OPT_STARTTLS",
    "NBD_OPT_STRUCTURED_REPLY",
    "NBD_REPLY_FLAG_DONE",
    "NBD_REPLY_TYPE_BLOCK_STATUS",
    "NBD_REPLY_TYPE_ERROR",
    "NBD_REPLY_TYPE_ERROR_OFFSET",
    "NBD_REPLY_TYPE_NONE",
    "NBD_REPLY_TYPE_OFFSET_DATA",
    "NBD_REPLY_TYPE_OFFSET_HOLE",
    "NBD_REP_ACK",
    "NBD_REP_ERR_BLOCK_SIZE_REQD",
    "NBD_REP_ERR_EXT_HEADER_REQD",
    "NBD_REP_ERR_INVALID",
    "NBD_REP_ERR_PLATFORM",
    "NBD_REP_ERR_POLICY",
    "NBD_REP_ERR_SHUTDOWN",
    "NBD_REP_ERR_TLS_REQD",
    "NBD_REP_ERR_TOO_BIG",
    "NBD_REP_ERR_UNKNOWN",
    "NBD_REP_ERR_UNSUP",
    "NBD_REP_FLAG_ERROR",
    "NBD_REP_INFO",
    "NBD_REP_MAGIC",
    "NBD_REP_META_CONTEXT",
    "NBD_REP_SERVER",
    "NBD_REQUEST_MAGIC",
    "NBD_REQUEST_SIZE",
    "NBD_SIMPLE_REPLY_MAGIC",
    "NBD_SIMPLE_REPLY_SIZE",
    "NBD_STATE_HOLE",
    "NBD_STATE_ZERO",
    "NBD_STRUCTURED_REPLY_MAGIC",
    "NBD_STRUCTURED_REPLY_SIZE",
    "NBD_SUCCESS",
    "NbdClientHandshake",
    "NbdClientState",
    "NbdExport",
    "NbdHandshakeState",
    "NbdMetaContext",
    "NbdNegotiated",
    "NbdReplyDecoder",
    "NbdRequest",
    "NbdRequestDecoder",
    "NbdServerHandshake",
    "NbdSimpleReply",
    "NbdUri",
    "ReplyBuffer",
    "chunk_block_status",
    "chunk_done",
    "chunk_error",
    "chunk_error_offset",
    "chunk_hole",
    "chunk_read",
    "encode_request",
    "generic_reply",
    "nbd_cmd_lookup",
    "nbd_opt_lookup",
    "parse_nbd_uri",
    "read_reply_header",
    "simple_reply",
    "system_errno_to_nbd_errno",
]
