"""The NBD server: its listener, the handshakes, the exports, and where each connection is.

Theory of operation
-------------------
QEMU's ``blockdev-nbd.c`` and ``block/export/export.c``, split the way this
project splits QEMU: the main loop owns the server and the negotiation, the
iothread that holds a node serves the I/O of its connections.

* **The listener** (``start``: a Unix socket, accessible to this user only,
  or TCP) is an fd-watch source of the main context.  Accepting follows the
  monitor's discipline: a connection that would eat into the descriptors the
  process keeps for its own work (``protocol.FdBudget``) is closed at once;
  at ``max-connections`` (handshakes and served connections together) the
  listener is not watched, as QEMU's is not, and new clients wait in its
  backlog until one leaves.
* **The handshake** of each connection is a ``Negotiation`` (bounded reads,
  a deadline).  The handshake sees the exports by name as they are at each
  option (``_ExportTable``): an export's size and flags come from its node.
* **The handoff.**  Past its handshake, a connection goes to the iothread
  that holds the export's node (``Cluster.hand_over``: the socket over that
  iothread's handoff socket, with an ``NbdConnection`` saying what was
  agreed and the bytes read past the handshake); this process keeps no copy.
  While the node has no running home (its iothread restarts, it is being
  moved) the connection is *parked* here, unread, and handed over once the
  cluster says the node is placed (``node_placed``).  A node that moves takes
  its connections along: its old home hands them back (``connection_returned``)
  and they are parked until the new home holds the node, then handed there.
* **Counting.**  A connection counts for its export from its handoff until
  its iothread says it ended (``NBD_CONNECTION_CLOSED``: ``connection_closed``)
  or exits (``iothread_exited``): ``block-export-del`` in safe mode, and
  ``max-connections``, go by that count.
* **Publication.**  The exports offered, each with its node and NBD URI, are
  part of the cluster's state file (``published_exports``; written again as
  one is added or starts its removal): a client finds them in the runtime
  directory, as it finds the nodes.
* **Removal.**  An export being removed is no longer offered; its parked
  connections are closed, its iothreads are asked to close the others
  (``NbdCloseExport``), and once they all answered it is gone
  (``BLOCK_EXPORT_DELETED``).  Meanwhile ``query-block-exports`` shows it
  with ``shutting-down``.  As in QEMU, ``block-export-del`` answers at once
  and ``nbd-server-stop`` answers once every export is gone.

Main-loop thread, BQL held.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from protocol import (
    ErrorReply,
    ExportEntry,
    FdBudget,
    LocalProtocolError,
    NbdConnection,
    NbdExport,
    NbdNegotiated,
    NbdOffer,
    QueryReply,
    StateError,
    ThrottledLog,
    UnsafePathError,
    bind_unix_owner_only,
)
from protocol.nbd import NBD_MAX_STRING_SIZE
from protocol.schema import (
    BlockExportInfo,
    BlockExportOptionsBase,
    BlockExportOptionsNbd,
    BlockExportRemoveMode,
    BlockExportType,
    SocketAddressBase,
    SocketAddressInet,
    SocketAddressUnix,
)

from ..cluster._cluster import Cluster, IOThread, IOThreadState
from ..cluster._guard import detached
from ..glib._source import IO_IN
from ..glib._standard import FdWatchSource
from ._negotiation import Negotiation

__all__ = ["BLOCK_EXPORT_DELETED", "NbdServer"]

log = logging.getLogger("mainloop.nbd")

BLOCK_EXPORT_DELETED = "BLOCK_EXPORT_DELETED"
ACCEPT_BATCH = 16  # connections accepted per wake-up of the listener
ACCEPT_RETRY_MS = 200  # out of descriptors: the listener is watched again after this
SECTOR_BYTES = 512  # an export's size is a multiple of it, as QEMU's (QEMU_ALIGN_DOWN)
DIRECT_IO_BLOCK_BYTES = 4096  # a node with cache.direct=on takes multiples of this

EventCallback = Callable[[str, dict[str, Any]], object]


@dataclass(eq=False)
class Export:
    """An NBD export: what ``block-export-add`` was given."""

    id: str
    node_name: str
    name: str
    description: str | None
    writable: bool
    allocation_depth: bool
    shutting_down: bool = False
    closing: frozenset[str] = frozenset()  # while shutting down: the iothreads not done closing its connections


@dataclass(eq=False)
class _Client:
    """A connection past its handshake: where it is (handed to an iothread,
    or parked here with its socket)."""

    msg: NbdConnection
    iothread: str | None = None  # the iothread it was handed to; None while parked here
    sock: socket.socket | None = None  # held while parked

    @property
    def export_id(self) -> str:
        return self.msg.export_id


class _ExportTable(Mapping[str, NbdExport]):
    """The exports by name, as a handshake here sees them: made at each look
    from the registry and the node as they are then (an export whose node is
    gone is not offered, nor one a remote iothread serves from its host)."""

    def __init__(self, server: NbdServer) -> None:
        self._server = server

    def __getitem__(self, name: str) -> NbdExport:
        e = self._server.by_name[name]
        found = None if self._server.remote_home(e) is not None else self._server.nbd_export(e)
        if found is None:
            raise KeyError(name)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, e in self._server.by_name.items()
                     if self._server.remote_home(e) is None and self._server.nbd_export(e) is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)


Address = tuple[str, str, int]
"""Where a server listens: ``("unix", PATH, 0)`` or ``("inet", HOST, PORT)``."""


def nbd_uri(name: str, address: Address) -> str:
    """The NBD URI of export ``name`` on a server at ``address`` (the NBD
    project's URI specification, as libnbd, qemu-img and nbdinfo take it)."""
    path = "/" + quote(name, safe="")
    if address[0] == "unix":
        return f"nbd+unix://{path}?socket={quote(address[1], safe='/')}"
    return f"nbd://{_where(address)}{path}"


def _where(address: Address) -> str:
    """A server's address for people: its socket's path, or HOST:PORT ([HOST] for IPv6)."""
    family, where, port = address
    return where if family == "unix" else f"{f'[{where}]' if ':' in where else where}:{port}"


class NbdServer:
    """The cluster's NBD server and its exports.  ``cluster.connection_owner``
    is this server from its creation on.  Main-loop thread, BQL held."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.exports: dict[str, Export] = {}  # by id, in the order added
        self.by_name: dict[str, Export] = {}  # the exports offered (not shutting down), by name
        self.max_connections = 0
        self.handshake_max_seconds = 0
        self.address: Address | None = None  # where it listens, while running
        self.fds = FdBudget()
        self._table = _ExportTable(self)
        self._state = "stopped"  # "running", "stopping" (exports shutting down), "stopped"
        self._listener: socket.socket | None = None
        self._listen_src: FdWatchSource | None = None
        self._unix_path: str | None = None
        self._negotiations: set[Negotiation] = set()
        self._clients: dict[int, _Client] = {}
        # The connections remote iothreads' own listeners took: (iothread, its id) -> export id.
        self._remote_clients: dict[tuple[str, int], str] = {}
        self._ids = itertools.count(1)
        self._listeners: list[EventCallback] = []
        self._stopped: list[Callable[[], None]] = []  # waiting for the exports to be gone (nbd-server-stop)
        self._complaints = ThrottledLog(log)  # what clients do wrong, rate-limited
        cluster.connection_owner = self

    # -- events ------------------------------------------------------------------

    def add_listener(self, callback: EventCallback) -> None:
        """``callback(name, data)`` for each event (``BLOCK_EXPORT_DELETED``)."""
        self._listeners.append(callback)

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        for callback in list(self._listeners):
            try:
                callback(name, data)
            except Exception:
                log.exception("NBD event listener %r failed", callback)

    # -- the server ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._state != "stopped"

    def start(self, addr: SocketAddressBase, *, max_connections: int = 0, handshake_max_seconds: int = 10) -> None:
        """Listen at ``addr`` (QEMU's ``nbd-server-start``); ``StateError`` with
        QEMU's words if the server runs already or the address cannot be bound."""
        if self._state != "stopped":
            raise StateError("NBD server already running")
        if isinstance(addr, SocketAddressUnix):
            path = os.path.abspath(addr.path)
            try:
                sock = bind_unix_owner_only(path)
            except UnsafePathError as exc:
                raise StateError(f"Failed to bind socket to {path}: {exc.reason}") from None
            except OSError as exc:
                raise StateError(f"Failed to bind socket to {path}: {exc.strerror or exc}") from None
            except ValueError as exc:  # a NUL in the path
                raise StateError(f"Failed to bind socket to {path!r}: {exc}") from None
            self._unix_path = path
            address: Address = ("unix", path, 0)
        elif isinstance(addr, SocketAddressInet):
            sock = self._bind_inet(addr.host, addr.port)
            bound = sock.getsockname()
            address = ("inet", bound[0], bound[1])
        else:
            raise StateError(f"socket addresses of type '{addr.type}' are not served")
        try:
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self._unlink()
            raise StateError(f"Failed to listen on socket: {exc.strerror or exc}") from None
        self._listener = sock
        self.address = address
        self.max_connections = max_connections
        self.handshake_max_seconds = handshake_max_seconds
        self._state = "running"
        self._update_listener()
        log.info("NBD server listening on %s", _where(address))

    @staticmethod
    def _bind_inet(host: str, port: str) -> socket.socket:
        if port.isascii() and port.isdigit() and int(port) > 65535:  # getaddrinfo would wrap it around
            raise StateError(f"address resolution failed for {host}:{port}: port out of range")
        try:
            found = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
        except (socket.gaierror, ValueError) as exc:  # ValueError: a NUL, a name IDNA refuses
            reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
            raise StateError(f"address resolution failed for {host}:{port}: {reason}") from None
        family, kind, proto, _, sockaddr = found[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
        except OSError as exc:
            sock.close()
            raise StateError(f"Failed to bind socket: {exc.strerror or exc}") from None
        return sock

    def stop(self, done: Callable[[], None]) -> None:
        """QEMU's ``nbd-server-stop``: stop listening, end the handshakes, remove
        every export (disconnecting its clients); ``done()`` once they are all
        gone.  ``StateError`` if the server does not run."""
        if self._state != "running":
            raise StateError("NBD server not running")
        self._state = "stopping"
        self._stopped.append(done)
        self._close_listener()
        for negotiation in list(self._negotiations):
            negotiation.close()
        for e in list(self.exports.values()):
            if not e.shutting_down:
                self._shut_down(e)
        self._check_stopped()

    def _check_stopped(self) -> None:
        if self._state == "stopping" and not self.exports:
            self._state = "stopped"
            self.address = None
            log.info("NBD server stopped")
            callbacks, self._stopped = self._stopped, []
            for callback in callbacks:
                callback()

    def _close_listener(self) -> None:
        if self._listen_src is not None:
            self._listen_src.destroy()
            self._listen_src = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._unlink()

    def _unlink(self) -> None:
        if self._unix_path is not None:
            try:
                os.unlink(self._unix_path)
            except FileNotFoundError:
                pass
            self._unix_path = None

    def close(self) -> None:
        """The process ends: close the listener, the handshakes and the parked
        connections, and forget the exports (the iothreads, stopped next, close
        what they serve).  Idempotent."""
        self._close_listener()
        for negotiation in list(self._negotiations):
            negotiation.close()
        for client in list(self._clients.values()):
            self._forget(client)
        self.exports.clear()
        self.by_name.clear()
        self._state = "stopped"
        self.address = None
        self._stopped.clear()
        self._complaints.flush()
        if self.cluster.connection_owner is self:
            self.cluster.connection_owner = None

    # -- accepting -------------------------------------------------------------------

    def connection_count(self) -> int:
        """Connections of the server: in their handshake, parked or handed over."""
        return len(self._negotiations) + len(self._clients)

    def _update_listener(self) -> None:
        """Watch the listener while connections may be accepted (below
        ``max-connections``), and only then, as QEMU's ``nbd_update_server_watch``."""
        wanted = self._listener is not None and (
            not self.max_connections or self.connection_count() < self.max_connections)
        if wanted and self._listen_src is None:
            assert self._listener is not None and self.address is not None
            self._listen_src = FdWatchSource(self._listener.fileno(), IO_IN, self._on_listener, name="nbd listener",
                                             role=f"NBD listening socket {_where(self.address)}")
            self.cluster.loop.context.attach(self._listen_src)
        elif not wanted and self._listen_src is not None:
            self._listen_src.destroy()
            self._listen_src = None

    def _on_listener(self, fd: int, cond: int) -> bool:
        watch = self._listen_src
        for _ in range(ACCEPT_BATCH):
            if self._listener is None or self._listen_src is not watch:
                return False
            if self.max_connections and self.connection_count() >= self.max_connections:
                self._update_listener()
                return False
            try:
                conn, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    continue  # the peer went away before accept
                self._back_off(exc)
                return False
            self._accepted(conn, addr)
        return self._listen_src is watch

    def _back_off(self, exc: OSError) -> None:
        """Out of descriptors: the listener stays readable, so it is not watched
        for a while (no spinning), then watched again."""
        self._complaints.log("accept", logging.ERROR, "NBD: cannot accept a connection: %s; retrying in %d ms",
                             exc, ACCEPT_RETRY_MS)
        if self._listen_src is not None:
            self._listen_src.destroy()
            self._listen_src = None

        def rearm() -> bool:
            self._update_listener()
            return False

        self.cluster.loop.context.timeout_add(ACCEPT_RETRY_MS, rearm, name="nbd listener back-off")

    def _accepted(self, conn: socket.socket, addr: Any) -> None:
        conn.setblocking(False)
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix"
        problem = self.fds.problem("a new NBD connection")
        if problem is not None:
            conn.close()  # its handshake is all it could have had: closing says it
            self._complaints.log("refused", logging.ERROR, "NBD client %s refused: %s", peer, problem)
            return
        negotiation = Negotiation(self.cluster, conn, peer, self._table, self.handshake_max_seconds,
                                  self._complaints, self._negotiated, self._negotiation_ended)
        if not negotiation.closed:  # (its greeting could not even be sent: it is over already)
            self._negotiations.add(negotiation)

    def _negotiation_ended(self, negotiation: Negotiation) -> None:
        self._negotiations.discard(negotiation)
        self._update_listener()

    # -- exports -------------------------------------------------------------------------

    def nbd_export(self, e: Export) -> NbdExport | None:
        """What a handshake offers of ``e``, from its node as it is now; None
        if its node is gone."""
        info = self.cluster.nodes.get(e.node_name)
        if info is None:
            return None
        direct = info.options.get("cache.direct") is True
        return NbdExport(e.name, info.size // SECTOR_BYTES * SECTOR_BYTES, e.description, read_only=not e.writable,
                         multi_conn=self.max_connections != 1,
                         min_block_bytes=DIRECT_IO_BLOCK_BYTES if direct else 1,
                         allocation_depth=e.allocation_depth)

    def add_export(self, options: BlockExportOptionsBase) -> Export:
        """QEMU's ``block-export-add`` (``blk_exp_add`` and ``nbd_export_create``):
        its checks in QEMU's order and words (``StateError``)."""
        if options.id in self.exports:
            raise StateError(f"Block export id '{options.id}' is already in use")
        if not isinstance(options, BlockExportOptionsNbd):
            raise StateError("No driver found for the requested export type")
        info = self.cluster.nodes.get(options.node_name)
        if info is None:
            raise StateError(f"Cannot find device='' nor node-name='{options.node_name}'")
        if options.writable and info.options.get("read-only") is True:
            raise StateError("Cannot export read-only node as writable")
        if self._state != "running":
            raise StateError("NBD server not running")
        name = options.name if options.name is not None else options.node_name
        if len(name.encode("utf-8", "surrogatepass")) > NBD_MAX_STRING_SIZE:
            raise StateError(f"export name '{name}' too long")
        if options.description is not None and len(
                options.description.encode("utf-8", "surrogatepass")) > NBD_MAX_STRING_SIZE:
            raise StateError(f"description '{options.description}' too long")
        if name in self.by_name:
            raise StateError(f"NBD server already has export named '{name}'")
        home = self.cluster.iothreads.get(info.iothread)
        if home is not None and home.remote and not home.nbd_address:
            raise StateError(f"node '{options.node_name}' is in remote iothread {home.id}, which serves no NBD "
                             f"clients (start it with --nbd-listen HOST:PORT)")
        e = Export(options.id, options.node_name, name, options.description, options.writable,
                   options.allocation_depth)
        try:
            self.nbd_export(e)  # what the protocol cannot carry (a NUL, a lone surrogate)
        except LocalProtocolError as exc:
            raise StateError(str(exc)) from None
        self.exports[e.id] = e
        self.by_name[e.name] = e
        self._offer(e)
        self.cluster.write_state()
        log.info("NBD export %s: node %s as '%s'%s", e.id, e.node_name, e.name, "" if e.writable else " (read-only)")
        return e

    def del_export(self, export_id: str, mode: BlockExportRemoveMode) -> None:
        """QEMU's ``block-export-del``: the export is no longer offered, and is
        gone once its clients are (at once if it has none); ``safe`` refuses
        while clients are connected, ``hard`` disconnects them."""
        e = self.exports.get(export_id)
        if e is None:
            raise StateError(f"Export '{export_id}' is not found")
        if e.shutting_down:
            raise StateError(f"Export '{export_id}' is already shutting down")
        if mode is BlockExportRemoveMode.SAFE and self.clients_of(e.id):
            raise StateError(f"export '{export_id}' still in use")
        self._shut_down(e)

    def clients_of(self, export_id: str) -> int:
        """The connections of an export past their handshake (handed over or
        parked, or taken by a remote iothread's own listener)."""
        return (sum(1 for c in self._clients.values() if c.export_id == export_id)
                + sum(1 for e in self._remote_clients.values() if e == export_id))

    def remote_home(self, e: Export) -> IOThread | None:
        """The remote iothread that holds ``e``'s node (and serves it from its host), if one does."""
        info = self.cluster.nodes.get(e.node_name)
        home = self.cluster.iothreads.get(info.iothread) if info is not None else None
        return home if home is not None and home.remote else None

    def _offer(self, e: Export, withdraw: bool = False) -> None:
        """Tell ``e``'s remote home, if it has one, to offer it (or no longer)."""
        home = self.remote_home(e)
        found = self.nbd_export(e) if home is not None else None
        if home is None or found is None:
            return
        self.cluster.offer_nbd_export(home.id, NbdOffer(
            e.id, e.node_name, e.name, found.size_bytes, e.description or "", e.description is not None,
            found.read_only, found.multi_conn, found.min_block_bytes, found.allocation_depth, withdraw))

    def exports_of_node(self, node_name: str) -> list[str]:
        """The ids of the exports of a node (shutting down or not)."""
        return [e.id for e in self.exports.values() if e.node_name == node_name]

    def query(self) -> list[BlockExportInfo]:
        """QEMU's ``query-block-exports``."""
        uris = self.uris()
        return [BlockExportInfo(id=e.id, type=BlockExportType.NBD, node_name=e.node_name,
                                shutting_down=e.shutting_down, uri=uris.get(e.id)) for e in self.exports.values()]

    def uris(self) -> dict[str, str]:
        """Each export's NBD URI, by id (those not shutting down)."""
        return {export_id: entry.uri for export_id, entry in self.published_exports().items()}

    def published_exports(self) -> dict[str, ExportEntry]:
        """Each export offered (not shutting down), by id: its node and NBD URI,
        as the cluster's state file publishes them."""
        if self.address is None:
            return {}
        entries = {}
        for e in self.exports.values():
            if e.shutting_down:
                continue
            home = self.remote_home(e)
            if home is None:
                entries[e.id] = ExportEntry(e.node_name, nbd_uri(e.name, self.address))
            elif home.nbd_address:  # served from its host
                host, _, port = home.nbd_address.rpartition(":")
                entries[e.id] = ExportEntry(e.node_name, nbd_uri(e.name, ("inet", host.strip("[]"), int(port))))
        return entries

    def _shut_down(self, e: Export) -> None:
        """No longer offered; its parked connections closed, its iothreads asked
        to close the others; gone once they all answered."""
        e.shutting_down = True
        if self.by_name.get(e.name) is e:
            del self.by_name[e.name]
        self._offer(e, withdraw=True)
        self.cluster.write_state()
        holders = {iothread for (iothread, _), export_id in self._remote_clients.items() if export_id == e.id}
        for client in [c for c in self._clients.values() if c.export_id == e.id]:
            if client.iothread is None:
                self._forget(client)
            else:
                holders.add(client.iothread)
        e.closing = frozenset(holders)
        if not holders:
            self._deleted(e)
            return
        for iothread_id in sorted(holders):
            # Not a continuation of the command that asked: its answer does not wait for this.
            detached(functools.partial(self._ask_close, e, iothread_id))

    def _ask_close(self, e: Export, iothread_id: str) -> None:
        self.cluster.close_nbd_export(iothread_id, e.id, functools.partial(self._closed_at, e, iothread_id))

    def _closed_at(self, e: Export, iothread_id: str, reply: QueryReply | ErrorReply) -> None:
        """``iothread_id`` closed the connections of ``e`` it served (or cannot:
        it is gone, or did not answer in time)."""
        if isinstance(reply, ErrorReply):
            log.warning("NBD export %s: iothread %s did not close its connections: %s", e.id, iothread_id,
                        reply.message)
        for client in [c for c in self._clients.values() if c.export_id == e.id and c.iothread == iothread_id]:
            self._forget(client)
        for key in [k for k, export_id in self._remote_clients.items() if k[0] == iothread_id and export_id == e.id]:
            del self._remote_clients[key]
        e.closing = e.closing - {iothread_id}
        if not e.closing and self.exports.get(e.id) is e:
            self._deleted(e)

    def _deleted(self, e: Export) -> None:
        del self.exports[e.id]
        log.info("NBD export %s deleted", e.id)
        self._emit(BLOCK_EXPORT_DELETED, {"id": e.id})
        self._check_stopped()

    # -- connections past their handshake --------------------------------------------

    def _negotiated(self, conn: socket.socket, negotiated: NbdNegotiated, pending: bytes, peer: str) -> None:
        e = self.by_name.get(negotiated.export.name)
        if e is None:  # removed since the handshake looked it up
            conn.close()
            return
        msg = NbdConnection(next(self._ids), e.id, e.node_name, negotiated.transmission_flags,
                            negotiated.structured_replies,
                            {c.name: c.context_id for c in negotiated.meta_contexts}, pending)
        client = _Client(msg, sock=conn)
        self._clients[msg.connection_id] = client
        log.debug("NBD client %s: connection %d to export %s", peer, msg.connection_id, e.id)
        self._route(client)

    def _route(self, client: _Client) -> None:
        """Hand a parked connection to its node's home, if the node has a running
        one; else it stays parked (closed if its export or node is gone)."""
        e = self.exports.get(client.export_id)
        info = self.cluster.nodes.get(client.msg.node_name)
        if e is None or e.shutting_down or info is None:
            if info is None and e is not None:
                self._complaints.log(("node gone", e.id), logging.WARNING,
                                     "NBD export %s: node %s is gone; a connection to it is closed", e.id,
                                     e.node_name)
            self._forget(client)
            return
        home = self.cluster.iothreads.get(info.iothread)
        if home is not None and home.remote and info.moving_to is None:
            # Its node went to a remote iothread, which serves its exports from its host: a socket
            # does not cross hosts, so the connection ends (its client reconnects there).
            self._complaints.log(("remote", e.id), logging.INFO, "NBD export %s: node %s is served from %s now; "
                                 "a connection made here is closed", e.id, e.node_name, home.host or home.id)
            self._forget(client)
            return
        if (info.moving_to is not None or not info.active or home is None
                or home.state is not IOThreadState.RUNNING or client.sock is None):
            return  # parked: handed over once the node is placed
        sock, client.sock = client.sock, None
        try:
            self.cluster.hand_over(home.id, sock, client.msg)
        except StateError:
            client.sock = sock
            return
        client.iothread = home.id

    def _forget(self, client: _Client) -> None:
        """A connection is over: closed here if it was parked, no longer counted."""
        if client.sock is not None:
            client.sock.close()
            client.sock = None
        if self._clients.get(client.msg.connection_id) is client:
            del self._clients[client.msg.connection_id]
            self._update_listener()

    # -- what the cluster says (ConnectionOwner) ---------------------------------------

    def connection_returned(self, iothread_id: str, fd: int, msg: NbdConnection) -> None:
        sock = socket.socket(fileno=fd)
        client = self._clients.get(msg.connection_id)
        if client is None or client.iothread != iothread_id or client.export_id != msg.export_id:
            sock.close()  # its export was removed meanwhile, or it is no connection of ours
            return
        client.msg, client.sock, client.iothread = msg, sock, None
        self._route(client)

    def connection_closed(self, iothread_id: str, connection_id: int, export_id: str) -> None:
        client = self._clients.get(connection_id)
        t = self.cluster.iothreads.get(iothread_id)
        if t is not None and t.remote:
            self._remote_clients.pop((iothread_id, connection_id), None)
        elif client is not None and client.iothread == iothread_id:
            self._forget(client)

    def connection_opened(self, iothread_id: str, connection_id: int, export_id: str) -> None:
        e = self.exports.get(export_id)
        if e is not None and len(self._remote_clients) < 1 << 20:  # (bounded, whatever a peer says)
            self._remote_clients[(iothread_id, connection_id)] = export_id

    def node_placed(self, node_name: str) -> None:
        for e in self.exports.values():
            if e.node_name == node_name and not e.shutting_down:
                self._offer(e)  # its home is remote now (moved there, or it joined again)
        for client in [c for c in self._clients.values() if c.iothread is None and c.msg.node_name == node_name]:
            self._route(client)

    def iothread_exited(self, iothread_id: str) -> None:
        for key in [k for k in self._remote_clients if k[0] == iothread_id]:
            del self._remote_clients[key]
        gone = [c for c in self._clients.values() if c.iothread == iothread_id]
        for client in gone:
            self._forget(client)
        if gone:
            log.info("iothread %s exited: its %d NBD connection(s) are gone", iothread_id, len(gone))
        for client in [c for c in self._clients.values() if c.iothread is None]:
            self._route(client)  # those of a node lost with it are closed; the others wait
        for e in [e for e in self.exports.values() if iothread_id in e.closing]:
            self._closed_at(e, iothread_id, ErrorReply(0, "GenericError", f"iothread {iothread_id} exited"))
