"""The NBD constants carry the specification's values, and errors map as QEMU's server maps them."""

from __future__ import annotations

import errno

import pytest

from protocol import nbd

# The values as doc/proto.md (the NBD protocol) and QEMU's include/block/nbd.h give them.
SPEC = {
    "NBD_INIT_MAGIC": int.from_bytes(b"NBDMAGIC", "big"),
    "NBD_OPTS_MAGIC": int.from_bytes(b"IHAVEOPT", "big"),
    "NBD_REP_MAGIC": 0x3E889045565A9,
    "NBD_REQUEST_MAGIC": 0x25609513,
    "NBD_SIMPLE_REPLY_MAGIC": 0x67446698,
    "NBD_STRUCTURED_REPLY_MAGIC": 0x668E33EF,
    "NBD_FLAG_FIXED_NEWSTYLE": 1, "NBD_FLAG_NO_ZEROES": 2,
    "NBD_FLAG_C_FIXED_NEWSTYLE": 1, "NBD_FLAG_C_NO_ZEROES": 2,
    "NBD_FLAG_HAS_FLAGS": 1 << 0, "NBD_FLAG_READ_ONLY": 1 << 1, "NBD_FLAG_SEND_FLUSH": 1 << 2,
    "NBD_FLAG_SEND_FUA": 1 << 3, "NBD_FLAG_ROTATIONAL": 1 << 4, "NBD_FLAG_SEND_TRIM": 1 << 5,
    "NBD_FLAG_SEND_WRITE_ZEROES": 1 << 6, "NBD_FLAG_SEND_DF": 1 << 7, "NBD_FLAG_CAN_MULTI_CONN": 1 << 8,
    "NBD_FLAG_SEND_RESIZE": 1 << 9, "NBD_FLAG_SEND_CACHE": 1 << 10, "NBD_FLAG_SEND_FAST_ZERO": 1 << 11,
    "NBD_FLAG_BLOCK_STAT_PAYLOAD": 1 << 12,
    "NBD_OPT_EXPORT_NAME": 1, "NBD_OPT_ABORT": 2, "NBD_OPT_LIST": 3, "NBD_OPT_PEEK_EXPORT": 4,
    "NBD_OPT_STARTTLS": 5, "NBD_OPT_INFO": 6, "NBD_OPT_GO": 7, "NBD_OPT_STRUCTURED_REPLY": 8,
    "NBD_OPT_LIST_META_CONTEXT": 9, "NBD_OPT_SET_META_CONTEXT": 10, "NBD_OPT_EXTENDED_HEADERS": 11,
    "NBD_REP_ACK": 1, "NBD_REP_SERVER": 2, "NBD_REP_INFO": 3, "NBD_REP_META_CONTEXT": 4,
    "NBD_REP_FLAG_ERROR": 1 << 31,
    "NBD_REP_ERR_UNSUP": 2**31 + 1, "NBD_REP_ERR_POLICY": 2**31 + 2, "NBD_REP_ERR_INVALID": 2**31 + 3,
    "NBD_REP_ERR_PLATFORM": 2**31 + 4, "NBD_REP_ERR_TLS_REQD": 2**31 + 5, "NBD_REP_ERR_UNKNOWN": 2**31 + 6,
    "NBD_REP_ERR_SHUTDOWN": 2**31 + 7, "NBD_REP_ERR_BLOCK_SIZE_REQD": 2**31 + 8,
    "NBD_REP_ERR_TOO_BIG": 2**31 + 9, "NBD_REP_ERR_EXT_HEADER_REQD": 2**31 + 10,
    "NBD_INFO_EXPORT": 0, "NBD_INFO_NAME": 1, "NBD_INFO_DESCRIPTION": 2, "NBD_INFO_BLOCK_SIZE": 3,
    "NBD_CMD_READ": 0, "NBD_CMD_WRITE": 1, "NBD_CMD_DISC": 2, "NBD_CMD_FLUSH": 3, "NBD_CMD_TRIM": 4,
    "NBD_CMD_CACHE": 5, "NBD_CMD_WRITE_ZEROES": 6, "NBD_CMD_BLOCK_STATUS": 7,
    "NBD_CMD_FLAG_FUA": 1 << 0, "NBD_CMD_FLAG_NO_HOLE": 1 << 1, "NBD_CMD_FLAG_DF": 1 << 2,
    "NBD_CMD_FLAG_REQ_ONE": 1 << 3, "NBD_CMD_FLAG_FAST_ZERO": 1 << 4,
    "NBD_REPLY_FLAG_DONE": 1,
    "NBD_REPLY_TYPE_NONE": 0, "NBD_REPLY_TYPE_OFFSET_DATA": 1, "NBD_REPLY_TYPE_OFFSET_HOLE": 2,
    "NBD_REPLY_TYPE_BLOCK_STATUS": 5, "NBD_REPLY_TYPE_ERROR": 2**15 + 1,
    "NBD_REPLY_TYPE_ERROR_OFFSET": 2**15 + 2,
    "NBD_SUCCESS": 0, "NBD_EPERM": 1, "NBD_EIO": 5, "NBD_ENOMEM": 12, "NBD_EINVAL": 22, "NBD_ENOSPC": 28,
    "NBD_EOVERFLOW": 75, "NBD_ENOTSUP": 95, "NBD_ESHUTDOWN": 108,
    "NBD_META_CONTEXT_BASE_ALLOCATION": "base:allocation",
    "NBD_META_CONTEXT_ALLOCATION_DEPTH": "qemu:allocation-depth",
    "NBD_META_ID_BASE_ALLOCATION": 0, "NBD_META_ID_ALLOCATION_DEPTH": 1,
    "NBD_STATE_HOLE": 1, "NBD_STATE_ZERO": 2,
    "NBD_MAX_BUFFER_SIZE": 32 * 1024 * 1024, "NBD_MAX_STRING_SIZE": 4096,
    "NBD_MAX_BLOCK_STATUS_EXTENTS": 131072,
    "NBD_REQUEST_SIZE": 28, "NBD_SIMPLE_REPLY_SIZE": 16, "NBD_STRUCTURED_REPLY_SIZE": 20,
    "NBD_EXPORT_NAME_ZEROES": 124,
    "NBD_DEFAULT_PORT": 10809,  # the URI specification's (doc/uri.md), IANA's port for NBD
}


def test_every_constant_has_the_specifications_value() -> None:
    exported = {name for name in nbd.__all__ if name.startswith("NBD_")}
    assert exported == set(SPEC), "a constant is missing from the table, or the table names one not exported"
    wrong = {name: getattr(nbd, name) for name, value in SPEC.items() if getattr(nbd, name) != value}
    assert not wrong


def test_the_magics_spell_their_names() -> None:
    assert nbd.NBD_INIT_MAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert nbd.NBD_OPTS_MAGIC.to_bytes(8, "big") == b"IHAVEOPT"


# QEMU's nbd/server.c system_errno_to_nbd_errno, case by case.
ERRNO_MAP = [
    (0, nbd.NBD_SUCCESS),
    (errno.EPERM, nbd.NBD_EPERM), (errno.EROFS, nbd.NBD_EPERM),
    (errno.EIO, nbd.NBD_EIO),
    (errno.ENOMEM, nbd.NBD_ENOMEM),
    (errno.EDQUOT, nbd.NBD_ENOSPC), (errno.EFBIG, nbd.NBD_ENOSPC), (errno.ENOSPC, nbd.NBD_ENOSPC),
    (errno.EOVERFLOW, nbd.NBD_EOVERFLOW),
    (errno.ENOTSUP, nbd.NBD_ENOTSUP), (errno.EOPNOTSUPP, nbd.NBD_ENOTSUP),
    (errno.ESHUTDOWN, nbd.NBD_ESHUTDOWN),
    (errno.EINVAL, nbd.NBD_EINVAL),
    # Everything else is EINVAL.
    (errno.ENOENT, nbd.NBD_EINVAL), (errno.EAGAIN, nbd.NBD_EINVAL), (errno.EBADF, nbd.NBD_EINVAL),
    (errno.ENXIO, nbd.NBD_EINVAL), (errno.EACCES, nbd.NBD_EINVAL), (12345, nbd.NBD_EINVAL),
]


@pytest.mark.parametrize(("err", "expected"), ERRNO_MAP)
def test_system_errno_to_nbd_errno_as_qemu(err: int, expected: int) -> None:
    assert nbd.system_errno_to_nbd_errno(err) == expected


def test_every_errno_maps_to_an_error_the_protocol_allows() -> None:
    allowed = {nbd.NBD_SUCCESS, nbd.NBD_EPERM, nbd.NBD_EIO, nbd.NBD_ENOMEM, nbd.NBD_EINVAL, nbd.NBD_ENOSPC,
               nbd.NBD_EOVERFLOW, nbd.NBD_ENOTSUP, nbd.NBD_ESHUTDOWN}
    assert {nbd.system_errno_to_nbd_errno(e) for e in range(0, 200)} == allowed


def test_names_are_qemus() -> None:
    assert nbd.nbd_opt_lookup(nbd.NBD_OPT_EXPORT_NAME) == "export name"
    assert nbd.nbd_opt_lookup(nbd.NBD_OPT_SET_META_CONTEXT) == "set meta context"
    assert nbd.nbd_opt_lookup(nbd.NBD_OPT_PEEK_EXPORT) == "<unknown>"
    assert nbd.nbd_cmd_lookup(nbd.NBD_CMD_WRITE_ZEROES) == "write zeroes"
    assert nbd.nbd_cmd_lookup(nbd.NBD_CMD_DISC) == "disconnect"
    assert nbd.nbd_cmd_lookup(99) == "<unknown>"
