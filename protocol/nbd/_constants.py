"""The NBD protocol's numbers: magics, flags, options, replies, commands, errors and limits.

Theory of operation
-------------------
Every value the protocol puts on the wire is declared here once, under the
name QEMU's ``include/block/nbd.h`` gives it (which is the specification's
name with an ``NBD_`` prefix): the rest of the codec and its users refer to
these names and never to a literal.  They are plain ``int`` constants, not
enums, because the transmission phase compares them once per request and a
plain ``int`` is the cheapest thing to compare; the ``*_lookup`` functions
give the short names QEMU uses in its messages ("export name", "write
zeroes"), so that the texts a peer receives are QEMU's.

``system_errno_to_nbd_errno`` maps a POSIX errno, as the block layer raises
it, to the handful of error values the protocol allows, exactly as QEMU's
server does (anything it does not know becomes ``NBD_EINVAL``).

The limits are QEMU's: ``NBD_MAX_BUFFER_SIZE`` (32 MiB) bounds an option's
data and a request's payload, ``NBD_MAX_STRING_SIZE`` (4096) bounds a name, a
description, a query or a message.
"""

from __future__ import annotations

import errno

# ---------------------------------------------------------------------------
# Magics

#: ``NBDMAGIC``: the first 8 bytes the server sends (the spec's INIT_PASSWD).
NBD_INIT_MAGIC = 0x4E42444D41474943
#: ``IHAVEOPT``: after NBDMAGIC in the newstyle greeting, and before each option.
NBD_OPTS_MAGIC = 0x49484156454F5054
#: Starts every option reply.
NBD_REP_MAGIC = 0x0003E889045565A9
#: Starts every transmission request.
NBD_REQUEST_MAGIC = 0x25609513
#: Starts a simple reply.
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
#: Starts a structured reply chunk.
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# ---------------------------------------------------------------------------
# Handshake flags (16 bits, server) and client flags (32 bits)

NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# ---------------------------------------------------------------------------
# Transmission flags (16 bits, per export)

NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11
NBD_FLAG_BLOCK_STAT_PAYLOAD = 1 << 12

# ---------------------------------------------------------------------------
# Options

NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# ---------------------------------------------------------------------------
# Option replies (bit 31 set: an error)

NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9
NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR | 10

# ---------------------------------------------------------------------------
# Information types (NBD_OPT_INFO / NBD_OPT_GO)

NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# ---------------------------------------------------------------------------
# Commands and their flags

NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# ---------------------------------------------------------------------------
# Structured replies

NBD_REPLY_FLAG_DONE = 1 << 0

NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) | 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# ---------------------------------------------------------------------------
# Error values (the only ones the protocol allows)

NBD_SUCCESS = 0
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# ---------------------------------------------------------------------------
# Metadata contexts

#: The spec's one context: extent flags HOLE and ZERO.
NBD_META_CONTEXT_BASE_ALLOCATION = "base:allocation"
#: QEMU's: an extent's flags are the depth of the backing chain that holds it
#: (0: unallocated, 1: the node itself, 2: its backing file, ...).
NBD_META_CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"
#: The ids QEMU's server gives them in NBD_OPT_SET_META_CONTEXT's replies.
NBD_META_ID_BASE_ALLOCATION = 0
NBD_META_ID_ALLOCATION_DEPTH = 1

#: base:allocation extent flags.
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1

# ---------------------------------------------------------------------------
# Sizes and limits

#: The largest option data, READ/WRITE/CACHE length and write payload (32 MiB).
NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024
#: The longest name, description, query or message (bytes).
NBD_MAX_STRING_SIZE = 4096
#: The most extents QEMU puts in one block-status chunk (1 MiB of them).
NBD_MAX_BLOCK_STATUS_EXTENTS = 1024 * 1024 // 8
#: A transmission request's header (bytes): magic, flags, type, cookie, offset, length.
NBD_REQUEST_SIZE = 28
#: A simple reply's header (bytes): magic, error, cookie.
NBD_SIMPLE_REPLY_SIZE = 16
#: A structured reply chunk's header (bytes): magic, flags, type, cookie, length.
NBD_STRUCTURED_REPLY_SIZE = 20
#: The reserved zeroes after NBD_OPT_EXPORT_NAME's reply, unless NO_ZEROES was agreed.
NBD_EXPORT_NAME_ZEROES = 124


# ---------------------------------------------------------------------------
# Names, as QEMU's nbd/common.c gives them in its messages

_OPT_NAMES = {
    NBD_OPT_EXPORT_NAME: "export name",
    NBD_OPT_ABORT: "abort",
    NBD_OPT_LIST: "list",
    NBD_OPT_STARTTLS: "starttls",
    NBD_OPT_INFO: "info",
    NBD_OPT_GO: "go",
    NBD_OPT_STRUCTURED_REPLY: "structured reply",
    NBD_OPT_LIST_META_CONTEXT: "list meta context",
    NBD_OPT_SET_META_CONTEXT: "set meta context",
    NBD_OPT_EXTENDED_HEADERS: "extended headers",
}

_CMD_NAMES = {
    NBD_CMD_READ: "read",
    NBD_CMD_WRITE: "write",
    NBD_CMD_DISC: "disconnect",
    NBD_CMD_FLUSH: "flush",
    NBD_CMD_TRIM: "trim",
    NBD_CMD_CACHE: "cache",
    NBD_CMD_WRITE_ZEROES: "write zeroes",
    NBD_CMD_BLOCK_STATUS: "block status",
}


def nbd_opt_lookup(option: int) -> str:
    """An option's name in QEMU's messages (``"<unknown>"`` for one it does not know)."""
    return _OPT_NAMES.get(option, "<unknown>")


def nbd_cmd_lookup(command: int) -> str:
    """A command's name in QEMU's messages (``"<unknown>"`` for one it does not know)."""
    return _CMD_NAMES.get(command, "<unknown>")


_ERRNO_TO_NBD = {
    0: NBD_SUCCESS,
    errno.EPERM: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def system_errno_to_nbd_errno(err: int) -> int:
    """The NBD error value for a POSIX errno, as QEMU's server maps it.

    EROFS counts as EPERM, EDQUOT and EFBIG as ENOSPC, EOPNOTSUPP as ENOTSUP;
    0 is success, and every other errno (EINVAL included) is ``NBD_EINVAL``.
    """
    return _ERRNO_TO_NBD.get(err, NBD_EINVAL)
