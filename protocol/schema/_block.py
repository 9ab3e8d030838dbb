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
    Check,
    FlatUnion,
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
    "BlockdevCacheOptions",
    "BlockdevDriver",
    "BlockdevOptions",
    "BlockdevOptionsBase",
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

    FILE = "file"
    NULL_CO = "null-co"


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
                                                    "running iothread with the fewest nodes)")


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


BlockdevOptions = FlatUnion(
    "BlockdevOptions", BlockdevOptionsBase, "driver",
    {BlockdevDriver.FILE: BlockdevOptionsFile, BlockdevDriver.NULL_CO: BlockdevOptionsNull},
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
    nested = unflatten(options)
    for key in _WIRE_FIELDS[:2]:
        if key in nested:  # the message's own fields say it
            raise SchemaError(f"Parameter '{key}' is unexpected")
    return parse(BlockdevOptions, {"driver": driver, "node-name": node_name, **nested})

