"""The cluster's state file: what the main loop publishes for data-plane clients.

Theory of operation
-------------------
The main loop owns the cluster's shape (its iothreads, their data endpoints,
which iothread holds which node, the NBD exports offered) and publishes it in
the runtime directory as ``cluster.json``, replaced atomically whenever it
changes.  Clients read it to find a node's iothread and that iothread's data
endpoint, or a node's NBD export and its URI.  Both sides go through
``ClusterState``: the main loop builds one and writes ``to_json()``; a client
reads ``ClusterState.from_json(text)``.  The same shape is the body of the
launcher's READY line (``as_dict()``), where ``exports`` gives each export's
URI alone.

``from_json`` trusts nothing: the file may be torn by a crash, written by
another program, or left over by another version.  Anything that is not
exactly this shape raises ``RemoteProtocolError`` saying what is wrong and
where; a ``KeyError`` or ``TypeError`` never escapes.

This module is pure: text in, text out.  Opening, replacing and reading the
file is the writer's and the reader's business.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._errors import RemoteProtocolError

__all__ = ["CLUSTER_STATE_FILE", "ClusterState", "ExportEntry", "IOThreadEntry", "NodeEntry",
           "cluster_state_path"]

CLUSTER_STATE_FILE = "cluster.json"
"""The state file's name, in the cluster's runtime directory."""

IOTHREAD_STATES = ("starting", "running", "stopping", "exited")


def cluster_state_path(runtime_dir: str) -> str:
    """Where the cluster that runs in ``runtime_dir`` publishes its state."""
    return os.path.join(runtime_dir, CLUSTER_STATE_FILE)


@dataclass(frozen=True, slots=True)
class IOThreadEntry:
    """One iothread process: its id, pid, state and data endpoint (empty
    until its handshake has told it); on tcp://, the CURVE public key (Z85)
    its data endpoint serves with; for a remote iothread, its host ("" for
    one the main loop started, whose pid is of this host)."""

    id: str
    pid: int
    state: str
    data: str = ""
    curve: str = ""
    host: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "pid": self.pid, "state": self.state, "data": self.data, "curve": self.curve,
                "host": self.host}

    @classmethod
    def from_dict(cls, value: object, where: str) -> IOThreadEntry:
        fields = _object(value, where, ("id", "pid", "state", "data", "curve", "host"))
        state = _str(fields, "state", where)
        if state not in IOTHREAD_STATES:
            raise RemoteProtocolError(f"{where}: 'state' is {state!r}, "
                                      f"not one of {', '.join(IOTHREAD_STATES)}")
        return cls(_str(fields, "id", where), _int(fields, "pid", where), state, _str(fields, "data", where),
                   _str(fields, "curve", where), _str(fields, "host", where))


@dataclass(frozen=True, slots=True)
class NodeEntry:
    """One block node: the iothread that holds it, its driver and its size in bytes."""

    iothread: str
    driver: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"iothread": self.iothread, "driver": self.driver, "size": self.size}

    @classmethod
    def from_dict(cls, value: object, where: str) -> NodeEntry:
        fields = _object(value, where, ("iothread", "driver", "size"))
        return cls(_str(fields, "iothread", where), _str(fields, "driver", where),
                   _int(fields, "size", where))


@dataclass(frozen=True, slots=True)
class ExportEntry:
    """One NBD export offered: the node it exports and its NBD URI (where an
    NBD client finds it)."""

    node: str
    uri: str

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "uri": self.uri}

    @classmethod
    def from_dict(cls, value: object, where: str) -> ExportEntry:
        fields = _object(value, where, ("node", "uri"))
        return cls(_str(fields, "node", where), _str(fields, "uri", where))


@dataclass(frozen=True, slots=True)
class ClusterState:
    """The cluster's shape as clients see it."""

    runtime_dir: str
    control: str
    """The control channel's endpoint (the iothreads connect there)."""
    iothreads: tuple[IOThreadEntry, ...] = ()
    nodes: Mapping[str, NodeEntry] = field(default_factory=dict)
    exports: Mapping[str, ExportEntry] = field(default_factory=dict)
    """The NBD exports offered (not shutting down), by id; none while no NBD server runs."""

    def iothread(self, iothread_id: str) -> IOThreadEntry | None:
        """The iothread with this id, or None."""
        return next((t for t in self.iothreads if t.id == iothread_id), None)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values, in the file's shape."""
        return {
            "runtime_dir": self.runtime_dir,
            "control": self.control,
            "iothreads": [t.as_dict() for t in self.iothreads],
            "nodes": {name: n.as_dict() for name, n in self.nodes.items()},
            "exports": {export_id: e.as_dict() for export_id, e in self.exports.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def from_json(cls, text: str | bytes) -> ClusterState:
        """Parse a state file's text; ``RemoteProtocolError`` if it is not one."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise RemoteProtocolError(f"not a cluster state file: {exc}") from None
        fields = _object(value, "cluster state", ("runtime_dir", "control", "iothreads", "nodes", "exports"))
        iothreads = fields["iothreads"]
        if type(iothreads) is not list:
            raise RemoteProtocolError(f"cluster state: 'iothreads' must be a list, not {_kind(iothreads)}")
        entries = tuple(IOThreadEntry.from_dict(t, f"cluster state: iothreads[{i}]")
                        for i, t in enumerate(iothreads))
        ids = [t.id for t in entries]
        if len(set(ids)) != len(ids):
            raise RemoteProtocolError("cluster state: an iothread id appears twice")
        nodes = fields["nodes"]
        if type(nodes) is not dict:
            raise RemoteProtocolError(f"cluster state: 'nodes' must be an object, not {_kind(nodes)}")
        exports = fields["exports"]
        if type(exports) is not dict:
            raise RemoteProtocolError(f"cluster state: 'exports' must be an object, not {_kind(exports)}")
        return cls(_str(fields, "runtime_dir", "cluster state"), _str(fields, "control", "cluster state"),
                   entries, {name: NodeEntry.from_dict(n, f"cluster state: node {name!r}")
                             for name, n in nodes.items()},
                   {export_id: ExportEntry.from_dict(e, f"cluster state: export {export_id!r}")
                    for export_id, e in exports.items()})


def _kind(value: object) -> str:
    """A JSON value's kind, for messages."""
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _object(value: object, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """``value`` as a JSON object with exactly ``keys``."""
    if type(value) is not dict:
        raise RemoteProtocolError(f"{where}: expected an object, not {_kind(value)}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise RemoteProtocolError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise RemoteProtocolError(f"{where}: unexpected {', '.join(repr(k) for k in unknown)}")
    return value


def _str(fields: dict[str, Any], key: str, where: str) -> str:
    value = fields[key]
    if type(value) is not str:
        raise RemoteProtocolError(f"{where}: {key!r} must be a string, not {_kind(value)}")
    return value


def _int(fields: dict[str, Any], key: str, where: str) -> int:
    value = fields[key]
    if type(value) is not int or value < 0:
        raise RemoteProtocolError(f"{where}: {key!r} must be a non-negative integer, not {_kind(value)}"
                                  + (f" {value}" if type(value) is int else ""))
    return value
