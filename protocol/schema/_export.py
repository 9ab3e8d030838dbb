"""Block exports and the NBD server: QEMU's block-export.json for NBD.

``--nbd-server`` and QMP's ``nbd-server-start`` start the server
(``NbdServerOptions``, ``NbdServerOptionsLegacy``: the same members, the
address in the command line's flat form or in QMP's older one);
``--export`` and ``block-export-add`` add an export (``BlockExportOptions``,
a flat union on ``type``: ``nbd`` is the one type served here);
``block-export-del`` removes one, ``query-block-exports`` lists them, and
the ``BLOCK_EXPORT_DELETED`` event says one is gone.
"""

from __future__ import annotations

import enum
from typing import Annotated

from ._sockets import SocketAddress, SocketAddressBase, SocketAddressLegacy, SocketAddressLegacyBase
from ._types import Check, FlatUnion, UInt32, id_wellformed, member, struct

__all__ = [
    "BlockExportDelArguments",
    "BlockExportDeleted",
    "BlockExportInfo",
    "BlockExportOptions",
    "BlockExportOptionsBase",
    "BlockExportOptionsNbd",
    "BlockExportRemoveMode",
    "BlockExportType",
    "NbdServerOptions",
    "NbdServerOptionsBase",
    "NbdServerOptionsLegacy",
]

NBD_DEFAULT_HANDSHAKE_MAX_SECONDS = 10  # QEMU's NBD_DEFAULT_HANDSHAKE_MAX_SECS

ExportId = Annotated[str, Check(id_wellformed, "Invalid block export id")]


@struct
class NbdServerOptionsBase:
    """What an NBD server is given besides its address."""

    handshake_max_seconds: UInt32 = member(
        default=NBD_DEFAULT_HANDSHAKE_MAX_SECONDS,
        doc="a client that has not finished its handshake after this many seconds is disconnected (0: no limit)")
    max_connections: UInt32 = member(
        default=0, doc="the most connections at once (0: no limit); past it, clients wait to be accepted. "
                       "1 also stops advertising that several connections may share an export")


@struct
class NbdServerOptions(NbdServerOptionsBase):
    """``--nbd-server``: the address in its flat form."""

    addr: Annotated[SocketAddressBase, SocketAddress] = member(doc="where to listen")


@struct
class NbdServerOptionsLegacy(NbdServerOptionsBase):
    """``nbd-server-start``'s arguments: the address in QMP's older form."""

    addr: Annotated[SocketAddressLegacyBase, SocketAddressLegacy] = member(doc="where to listen")


class BlockExportType(enum.StrEnum):
    """The kinds of export (QEMU has vhost-user-blk, fuse and vduse-blk too)."""

    NBD = "nbd"


@struct
class BlockExportOptionsBase:
    """The members every export has."""

    type: BlockExportType = member(doc="the kind of export")
    id: ExportId = member(doc="the export's id: a letter, then letters, digits, '-', '.', '_'")
    node_name: str = member(doc="the block node to export")
    writable: bool = member(default=False, doc="clients may write (refused for a read-only node)")


@struct
class BlockExportOptionsNbd(BlockExportOptionsBase):
    """``type=nbd``: an export of the NBD server."""

    name: str | None = member(default=None, doc="the name clients ask for (default: the node's name)")
    description: str | None = member(default=None, doc="free text, sent to clients that ask for it")
    allocation_depth: bool = member(default=False, doc="offer the 'qemu:allocation-depth' metadata context")


BlockExportOptions = FlatUnion("BlockExportOptions", BlockExportOptionsBase, "type",
                               {BlockExportType.NBD: BlockExportOptionsNbd},
                               doc="an export to add (block-export-add, --export)")


class BlockExportRemoveMode(enum.StrEnum):
    """How ``block-export-del`` treats connected clients."""

    SAFE = "safe"
    HARD = "hard"


@struct
class BlockExportDelArguments:
    id: str = member(doc="the export to remove")
    mode: BlockExportRemoveMode = member(default=BlockExportRemoveMode.SAFE,
                                         doc="safe: refused while clients are connected; hard: they are "
                                             "disconnected")


@struct
class BlockExportInfo:
    """One export, as ``query-block-exports`` describes it."""

    id: str = member(doc="its id")
    type: BlockExportType = member(doc="its kind")
    node_name: str = member(doc="the node it exports")
    shutting_down: bool = member(doc="it is being removed: its clients are being disconnected")
    uri: str | None = member(default=None, doc="(not in QEMU) where NBD clients reach it: the NBD server's "
                                               "address, or its remote iothread's own")


@struct
class BlockExportDeleted:
    """The data of the ``BLOCK_EXPORT_DELETED`` event: an export is gone."""

    id: str = member(doc="the export's id")
