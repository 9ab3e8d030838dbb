"""Every option type, declared once (QEMU's QAPI idea).

Theory of operation
-------------------
The options a user or a peer gives (a block node, an iothread object, a QMP
command's arguments) are declared here, once, as struct types (``@struct``
dataclasses whose fields are the members: name, type, default, whether
required, documentation) and flat unions (``FlatUnion``: a base whose enum
member picks a branch).  Everything else derives from these declarations:

* the command line's ``--blockdev`` / ``--object`` in keyval form (strings,
  converted per the member's type: ``on``/``off``, ``4k``) and in JSON form;
* QMP: a command's arguments are checked against ``COMMANDS`` before it runs,
  its result is written in the declared form, ``query-commands`` lists it;
* the ``BlockdevAdd`` message carries the validated options, and the iothread
  builds its driver from them, checked again by the same declaration.

``parse`` turns input into typed values (defaults filled in) or raises
``SchemaError`` with QEMU's error class and text.  Pure code: no I/O, any
thread.  Modules: ``_types`` (the type system and the validator), ``_block``
(block nodes), ``_qom`` (objects),
``_sockets`` (socket addresses), ``_export`` (block exports and the NBD
server), ``_commands`` (QMP commands).
"""

from __future__ import annotations

from ._block import BlkdebugEvent as BlkdebugEvent
from ._block import BlkdebugInjectErrorOptions as BlkdebugInjectErrorOptions
from ._block import BlkdebugIOType as BlkdebugIOType
from ._block import BlkdebugSetStateOptions as BlkdebugSetStateOptions
from ._block import BlockDeviceInfo as BlockDeviceInfo
from ._block import BlockdevCacheOptions as BlockdevCacheOptions
from ._block import BlockdevDriver as BlockdevDriver
from ._block import BlockdevOptions as BlockdevOptions
from ._block import BlockdevOnError as BlockdevOnError
from ._block import BlockdevOptionsBase as BlockdevOptionsBase
from ._block import BlockdevOptionsBlkdebug as BlockdevOptionsBlkdebug
from ._block import BlockdevOptionsFile as BlockdevOptionsFile
from ._block import BlockdevOptionsNull as BlockdevOptionsNull
from ._block import ImageInfo as ImageInfo
from ._block import blockdev_from_wire as blockdev_from_wire
from ._block import blockdev_to_wire as blockdev_to_wire
from ._export import BlockExportDelArguments as BlockExportDelArguments
from ._export import BlockExportDeleted as BlockExportDeleted
from ._export import BlockExportInfo as BlockExportInfo
from ._export import BlockExportOptions as BlockExportOptions
from ._export import BlockExportOptionsBase as BlockExportOptionsBase
from ._export import BlockExportOptionsNbd as BlockExportOptionsNbd
from ._export import BlockExportRemoveMode as BlockExportRemoveMode
from ._export import BlockExportType as BlockExportType
from ._export import NbdServerOptions as NbdServerOptions
from ._export import NbdServerOptionsBase as NbdServerOptionsBase
from ._export import NbdServerOptionsLegacy as NbdServerOptionsLegacy
from ._sockets import InetSocketAddress as InetSocketAddress
from ._sockets import SocketAddress as SocketAddress
from ._sockets import SocketAddressBase as SocketAddressBase
from ._sockets import SocketAddressInet as SocketAddressInet
from ._sockets import SocketAddressLegacy as SocketAddressLegacy
from ._sockets import SocketAddressType as SocketAddressType
from ._sockets import SocketAddressUnix as SocketAddressUnix
from ._sockets import UnixSocketAddress as UnixSocketAddress
from ._sockets import socket_address_flatten as socket_address_flatten
from ._commands import COMMANDS as COMMANDS
from ._commands import BlockLatencyHistogramSetArguments as BlockLatencyHistogramSetArguments
from ._commands import BlockdevDelArguments as BlockdevDelArguments
from ._commands import NoArguments as NoArguments
from ._commands import ObjectDelArguments as ObjectDelArguments
from ._commands import QmpCapabilitiesArguments as QmpCapabilitiesArguments
from ._commands import QomGetArguments as QomGetArguments
from ._commands import QomSetArguments as QomSetArguments
from ._commands import QueryBlockstatsArguments as QueryBlockstatsArguments
from ._commands import QueryNamedBlockNodesArguments as QueryNamedBlockNodesArguments
from ._commands import XBlockdevSetIothreadArguments as XBlockdevSetIothreadArguments
from ._commands import Command as Command
from ._commands import CommandInfo as CommandInfo
from ._commands import StatusInfo as StatusInfo
from ._commands import VersionInfo as VersionInfo
from ._commands import VersionTriple as VersionTriple
from ._qom import IOThreadInfo as IOThreadInfo
from ._qom import IothreadOptions as IothreadOptions
from ._qom import IothreadProperties as IothreadProperties
from ._qom import ObjectOptions as ObjectOptions
from ._qom import ObjectOptionsBase as ObjectOptionsBase
from ._qom import ObjectType as ObjectType
from ._types import INT64_MAX as INT64_MAX
from ._types import FlatUnion as FlatUnion
from ._types import Member as Member
from ._types import SchemaError as SchemaError
from ._types import dump as dump
from ._types import flatten as flatten
from ._types import id_wellformed as id_wellformed
from ._types import members as members
from ._types import parse as parse
from ._types import parse_bool as parse_bool
from ._types import parse_member as parse_member
from ._types import parse_size as parse_size
from ._types import member as member
from ._types import struct as struct
from ._types import type_name as type_name
from ._types import unflatten as unflatten

__all__ = [
    "BlkdebugEvent",
    "BlkdebugIOType",
    "BlkdebugInjectErrorOptions",
    "BlkdebugSetStateOptions",
    "BlockDeviceInfo",
    "BlockExportDelArguments",
    "BlockExportDeleted",
    "BlockExportInfo",
    "BlockExportOptions",
    "BlockExportOptionsBase",
    "BlockExportOptionsNbd",
    "BlockExportRemoveMode",
    "BlockExportType",
    "BlockLatencyHistogramSetArguments",
    "BlockdevCacheOptions",
    "BlockdevDelArguments",
    "BlockdevDriver",
    "BlockdevOptions",
    "BlockdevOnError",
    "BlockdevOptionsBase",
    "BlockdevOptionsBlkdebug",
    "BlockdevOptionsFile",
    "BlockdevOptionsNull",
    "COMMANDS",
    "Command",
    "CommandInfo",
    "FlatUnion",
    "INT64_MAX",
    "IOThreadInfo",
    "ImageInfo",
    "InetSocketAddress",
    "IothreadOptions",
    "IothreadProperties",
    "Member",
    "NbdServerOptions",
    "NbdServerOptionsBase",
    "NbdServerOptionsLegacy",
    "NoArguments",
    "ObjectDelArguments",
    "ObjectOptions",
    "ObjectOptionsBase",
    "ObjectType",
    "QmpCapabilitiesArguments",
    "QomGetArguments",
    "QomSetArguments",
    "QueryBlockstatsArguments",
    "QueryNamedBlockNodesArguments",
    "SchemaError",
    "SocketAddress",
    "SocketAddressBase",
    "SocketAddressInet",
    "SocketAddressLegacy",
    "SocketAddressType",
    "SocketAddressUnix",
    "StatusInfo",
    "UnixSocketAddress",
    "VersionInfo",
    "VersionTriple",
    "XBlockdevSetIothreadArguments",
    "blockdev_from_wire",
    "blockdev_to_wire",
    "dump",
    "flatten",
    "id_wellformed",
    "member",
    "members",
    "parse",
    "parse_bool",
    "parse_member",
    "parse_size",
    "socket_address_flatten",
    "struct",
    "type_name",
    "unflatten",
]
