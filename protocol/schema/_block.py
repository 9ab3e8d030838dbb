"""Block nodes: QEMU's BlockdevOptions for the drivers this project has, and
what ``query-named-block-nodes`` says of a node.

``blockdev-add``'s arguments, ``--blockdev``'s value and the ``BlockdevAdd``
message all are a ``BlockdevOptions``: the base members, then the members of
the branch that ``driver`` picks.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Annotated

from ._types import (
    INT64_MAX,
    Check,
    FlatUnion,
    Range,
    SchemaError,
    Size,
    dump,
    flatten,
    id_wellformed,
    member,
    parse,
    struct,
    unflatten,
)

__all__ = [
    "BlockDeviceInfo",
    "BlkdebugEvent",
    "BlkdebugInjectErrorOptions",
    "BlkdebugIOType",
    "BlkdebugSetStateOptions",
    "BlockdevCacheOptions",
    "BlockdevDriver",
    "BlockdevOptions",
    "BlockdevOnError",
    "BlockdevOptionsBase",
    "BlockdevOptionsBlkdebug",
    "BlockdevOptionsFile",
    "BlockdevOptionsNull",
    "ImageInfo",
    "NodeName",
    "blockdev_from_wire",
    "blockdev_to_wire",
]

NodeName = Annotated[str, Check(id_wellformed, "Invalid node-name: '{value}'")]


class BlockdevDriver(enum.StrEnum):
    """The block drivers (QEMU has many more; these are the ones served here)."""

    BLKDEBUG = "blkdebug"
    FILE = "file"
    NULL_CO = "null-co"


class BlockdevOnError(enum.StrEnum):
    """What a failed request does (QEMU's BlockdevOnError, ``werror``/``rerror``)."""

    REPORT = "report"  # the request fails with its errno
    IGNORE = "ignore"  # the request succeeds anyway (a read's data: zeroes)
    ENOSPC = "enospc"  # stop on ENOSPC, report the others
    STOP = "stop"  # the request is held, the cluster stops (io-error) until 'cont' retries it


@struct
class BlockdevCacheOptions:
    """How a node uses the host's page cache."""

    direct: bool = member(default=False, doc="bypass the host page cache (O_DIRECT): offsets and lengths "
                                             "must then be multiples of 4096")


@struct
class BlockdevOptionsBase:
    """The members every driver has."""

    driver: BlockdevDriver = member(doc="the block driver")
    node_name: NodeName = member(doc="the node's name: a letter, then letters, digits, '-', '.', '_'")
    read_only: bool = member(default=False, doc="refuse writes, discards and write-zeroes (EPERM); a file "
                                                "is opened read-only")
    iothread: str | None = member(default=None, doc="the iothread that serves the node (default: the "
                                                    "running iothread with the fewest nodes; a node over "
                                                    "another one: that one's)")
    werror: BlockdevOnError = member(default=BlockdevOnError.REPORT,
                                     doc="what a failed write, write-zeroes, discard or flush does")
    rerror: BlockdevOnError = member(default=BlockdevOnError.REPORT, doc="what a failed read does")


@struct
class BlockdevOptionsFile(BlockdevOptionsBase):
    """``driver=file``: a raw image file or block device."""

    filename: str = member(doc="the file or block device (relative to the daemon's working directory)")
    cache: BlockdevCacheOptions = member(default_factory=BlockdevCacheOptions, doc="cache modes")


@struct
class BlockdevOptionsNull(BlockdevOptionsBase):
    """``driver=null-co``: a node without storage; writes are dropped."""

    size: Size = member(default=1 << 30, doc="the node's size in bytes")
    read_zeroes: bool = member(default=False, doc="reads return zeroes (they return zeroes here either way)")


class BlkdebugEvent(enum.StrEnum):
    """The events of QEMU's BlkdebugEvent that requests raise here, as a
    ``raw`` node over ``blkdebug`` raises them in QEMU: a read raises
    ``read_aio``; a write ``write_aio``, then ``pwritev`` and, once it
    completed, ``pwritev_done``; write-zeroes ``pwritev_zero`` (and
    ``pwritev_done``); a flush ``flush_to_os``, then ``flush_to_disk``.
    Discard and block status raise none."""

    READ_AIO = "read_aio"
    WRITE_AIO = "write_aio"
    PWRITEV = "pwritev"
    PWRITEV_ZERO = "pwritev_zero"
    PWRITEV_DONE = "pwritev_done"
    FLUSH_TO_OS = "flush_to_os"
    FLUSH_TO_DISK = "flush_to_disk"


class BlkdebugIOType(enum.StrEnum):
    """The requests a rule applies to (QEMU's BlkdebugIOType)."""

    READ = "read"
    WRITE = "write"
    WRITE_ZEROES = "write-zeroes"
    DISCARD = "discard"
    FLUSH = "flush"
    BLOCK_STATUS = "block-status"


@struct
class BlkdebugInjectErrorOptions:
    """A rule that fails (or delays) requests: made active by its ``event``
    (in its ``state``), it then applies to the requests of its ``iotype``
    that cover its ``sector``, until another event activates other rules."""

    event: BlkdebugEvent = member(doc="the event that activates the rule")
    state: Annotated[int, Range(0, INT64_MAX)] | None = member(
        default=None, doc="the state in which the event activates it (default: any)")
    iotype: BlkdebugIOType | None = member(default=None, doc="the requests it applies to (default: all)")
    errno: Annotated[int, Range(0, 4095)] = member(
        default=5, doc="the errno the request fails with (EIO); 0: none (a delay only)")
    sector: int = member(default=-1, doc="a request applies only if it covers this 512-byte sector's first "
                                         "byte (-1: any request; a flush covers none)")
    length: Annotated[int, Range(1, INT64_MAX)] = member(
        default=1, doc="(not in QEMU) the bytes from the sector's first on that a request must touch "
                       "one of: a range, where QEMU has a byte")
    once: bool = member(default=False, doc="the rule is removed after its first failure")
    immediately: bool = member(default=False, doc="fail at once, not after a turn of the event loop")
    after: Annotated[int, Range(0, INT64_MAX)] = member(
        default=0, doc="(not in QEMU) the first N requests it applies to go through")
    delay_ns: Annotated[int, Range(0, 3_600_000_000_000)] = member(
        default=0, doc="(not in QEMU) the request waits this long (other requests do not) before it "
                       "fails, or goes on if errno is 0")


@struct
class BlkdebugSetStateOptions:
    """A rule that changes the node's state (which selects the rules an event activates)."""

    event: BlkdebugEvent = member(doc="the event that triggers it")
    state: Annotated[int, Range(0, INT64_MAX)] | None = member(
        default=None, doc="the state in which it triggers (default: any)")
    new_state: Annotated[int, Range(1, INT64_MAX)] = member(doc="the state after it (the first is 1)",
                                                            name="new_state")


@struct
class BlockdevOptionsBlkdebug(BlockdevOptionsBase):
    """``driver=blkdebug``: QEMU's fault injection, over another node of the same iothread."""

    image: NodeName = member(doc="the node it passes requests to (by name; it must exist)")
    inject_error: tuple[BlkdebugInjectErrorOptions, ...] = member(default=(), doc="the error rules")
    set_state: tuple[BlkdebugSetStateOptions, ...] = member(default=(), doc="the state rules")


BlockdevOptions = FlatUnion(
    "BlockdevOptions", BlockdevOptionsBase, "driver",
    {BlockdevDriver.BLKDEBUG: BlockdevOptionsBlkdebug, BlockdevDriver.FILE: BlockdevOptionsFile,
     BlockdevDriver.NULL_CO: BlockdevOptionsNull},
    doc="a block node to create (blockdev-add, --blockdev)")


@struct
class ImageInfo:
    """The image a node presents."""

    virtual_size: int = member(doc="its size in bytes")


@struct
class BlockDeviceInfo:
    """One node, as ``query-named-block-nodes`` describes it."""

    node_name: str = member(doc="the node's name")
    drv: BlockdevDriver = member(doc="its driver")
    file: str = member(doc="its file name ('' for a driver without a file)")
    ro: bool = member(doc="whether it is read-only")
    image: ImageInfo = member(doc="its image")
    iothread: str = member(doc="the iothread serving it")
    active: bool = member(doc="whether it is open: false while its iothread is down, to be restarted, "
                              "until it is reopened there (QEMU's inactive node: no I/O reaches it)")


# The placement (iothread) is the cluster's business, and node-name and driver
# are fields of the message itself: the rest travels as ``options``.
_WIRE_FIELDS = ("driver", "node-name", "iothread")


def blockdev_to_wire(options: BlockdevOptionsBase) -> dict[str, str | int | bool]:
    """The ``options`` a ``BlockdevAdd`` message carries for validated
    ``options``: every member but driver, node-name and iothread, defaults
    filled in, nested objects flattened (``cache.direct``)."""
    flat = flatten(dump(options))
    for key in _WIRE_FIELDS:
        flat.pop(key, None)
    return flat


def blockdev_from_wire(node_name: str, driver: str, options: Mapping[str, object]) -> BlockdevOptionsBase:
    """A ``BlockdevAdd`` message's node back as ``BlockdevOptions``, checked as
    strictly as QMP's arguments are (``SchemaError``)."""
    nested = unflatten(options, lists=True)
    for key in _WIRE_FIELDS[:2]:
        if key in nested:  # the message's own fields say it
            raise SchemaError(f"Parameter '{key}' is unexpected")
    return parse(BlockdevOptions, {"driver": driver, "node-name": node_name, **nested})

