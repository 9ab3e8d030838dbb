"""The QMP commands: each one's name, arguments and return value.

The monitor checks a command's arguments against ``arguments`` before it runs
anything, and writes its result out in the form ``returns`` declares;
``query-commands`` lists this table.  A command's ``arguments`` are a struct
(its members are the arguments) or, for ``blockdev-add`` and ``object-add``,
a union taken whole (QAPI's ``boxed``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._block import BlockDeviceInfo, BlockdevOptions
from ._export import BlockExportDelArguments, BlockExportInfo, BlockExportOptions, NbdServerOptionsLegacy
from ._qom import IOThreadInfo, ObjectOptions
from ._types import FlatUnion, UInt64, dump, member, parse, struct

__all__ = [
    "BlockLatencyHistogramSetArguments",
    "BlockdevDelArguments",
    "COMMANDS",
    "Command",
    "CommandInfo",
    "NoArguments",
    "ObjectDelArguments",
    "QMPCapability",
    "QmpCapabilitiesArguments",
    "QomGetArguments",
    "QomSetArguments",
    "QueryBlockstatsArguments",
    "QueryNamedBlockNodesArguments",
    "StatusInfo",
    "VersionInfo",
    "VersionTriple",
    "XBlockdevSetIothreadArguments",
]


@struct
class NoArguments:
    """A command that takes no arguments."""


class QMPCapability(enum.StrEnum):
    """Capabilities a client may ask for in ``qmp_capabilities`` (none is offered here)."""

    OOB = "oob"


@struct
class QmpCapabilitiesArguments:
    enable: tuple[QMPCapability, ...] = member(default=(), doc="capabilities to turn on")


@struct
class ObjectDelArguments:
    id: str = member(doc="the object's id")


@struct
class QomGetArguments:
    path: str = member(doc="the object's path (/objects/ID)")
    property: str = member(doc="the property's name")


@struct
class QomSetArguments:
    path: str = member(doc="the object's path (/objects/ID)")
    property: str = member(doc="the property's name")
    value: Any = member(doc="the new value, of the property's type")


@struct
class BlockdevDelArguments:
    node_name: str = member(doc="the node to delete")


@struct
class QueryNamedBlockNodesArguments:
    flat: bool = member(default=False, doc="accepted for QEMU's clients: nodes have no children here")


@struct
class XBlockdevSetIothreadArguments:
    node_name: str = member(doc="the node to move")
    iothread: str = member(doc="the iothread to move it to")
    force: bool = member(default=False, doc="accepted for QEMU's clients: nodes have no users to check here")


@struct
class QueryBlockstatsArguments:
    query_nodes: bool = member(default=False, doc="list every node (no device is attached to any)")


@struct
class BlockLatencyHistogramSetArguments:
    id: str = member(doc="the node")
    boundaries: tuple[UInt64, ...] = member(default=(), doc="the intervals' boundaries in ns, "
                                                            "ascending (none: no histogram)")


@struct
class VersionTriple:
    """A version number."""

    major: int = member(doc="major")
    minor: int = member(doc="minor")
    micro: int = member(doc="micro")


@struct
class VersionInfo:
    """Which QEMU this answers as, and this package."""

    qemu: VersionTriple = member(doc="the QEMU version whose QMP this follows")
    package: str = member(doc="this package and its version")


@struct
class StatusInfo:
    """The run state."""

    running: bool = member(doc="false while the cluster is stopped")
    status: str = member(doc="'running', or 'io-error' once a node's 'stop' error policy held a request "
                             "(until 'cont')")


@struct
class CommandInfo:
    """A command ``query-commands`` lists."""

    name: str = member(doc="its name")


@dataclass(frozen=True)
class Command:
    """A QMP command's declaration.

    ``returns`` is the result's declared type (an annotation: a struct, a
    tuple of one, ``Any`` for a result not declared member by member), or
    None for the empty object."""

    name: str
    doc: str
    arguments: type | FlatUnion[Any] = NoArguments
    returns: Any = None

    def parse_arguments(self, args: object) -> Any:
        """The arguments checked and typed (``SchemaError``)."""
        return parse(self.arguments, args)

    def dump_result(self, result: Any) -> Any:
        """A result in its JSON form."""
        return {} if self.returns is None else dump(result, self.returns)


COMMANDS: Mapping[str, Command] = {c.name: c for c in (
    Command("qmp_capabilities", "leave capabilities negotiation", QmpCapabilitiesArguments),
    Command("query-version", "the version", returns=VersionInfo),
    Command("query-commands", "the commands", returns=tuple[CommandInfo, ...]),
    Command("query-status", "the run state", returns=StatusInfo),
    Command("quit", "stop every iothread and exit"),
    Command("cont", "resume: requests held by a 'stop' error policy are submitted again"),
    Command("query-iothreads", "the running iothreads", returns=tuple[IOThreadInfo, ...]),
    Command("object-add", "start an iothread", ObjectOptions),
    Command("object-del", "stop an iothread that serves no node", ObjectDelArguments),
    Command("qom-get", "an iothread's property", QomGetArguments, returns=Any),
    Command("qom-set", "change an iothread's property", QomSetArguments),
    Command("blockdev-add", "create a block node", BlockdevOptions),
    Command("blockdev-del", "drain and delete a block node", BlockdevDelArguments),
    Command("query-named-block-nodes", "the block nodes", QueryNamedBlockNodesArguments,
            returns=tuple[BlockDeviceInfo, ...]),
    Command("x-blockdev-set-iothread", "move a node to another iothread while I/O runs",
            XBlockdevSetIothreadArguments),
    Command("x-query-main-loop", "the main loop's sources and fds", returns=Any),
    Command("query-blockstats", "each node's I/O statistics (QEMU's BlockStats)", QueryBlockstatsArguments,
            returns=Any),
    Command("block-latency-histogram-set", "count a node's latencies in intervals",
            BlockLatencyHistogramSetArguments),
    Command("nbd-server-start", "start the NBD server", NbdServerOptionsLegacy),
    Command("nbd-server-stop", "remove every NBD export, disconnecting their clients, and stop the NBD server"),
    Command("block-export-add", "export a block node", BlockExportOptions),
    Command("block-export-del", "remove an export", BlockExportDelArguments),
    Command("query-block-exports", "the exports", returns=tuple[BlockExportInfo, ...]),
)}
