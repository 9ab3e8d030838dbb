"""The NBD connections one iothread serves: ``NbdServer``.

Theory of operation
-------------------
The main loop owns the NBD server proper (listening, the handshake, the
exports); an iothread serves the transmission phase of the connections to
the nodes it holds.  ``NbdServer`` is that iothread's side: it adopts each
connection handed over (``adopt``: an ``NbdClient`` in the context), and
ends them by the group when the main loop asks:

* ``hand_back(node)``: the node moves to another iothread: each of its
  connections is quiesced (see ``NbdClient``) and the ones that did not
  close meanwhile are given back, sockets and ``NbdConnection``, to be handed
  on;
* ``close_export(export)`` and ``close_node(node)``: the connections close
  (requests in flight complete, their replies are dropped);
* ``close_all()``: the iothread stops: every connection closes after its
  requests in flight, their replies sent.

Every connection that closes, for whatever reason (the client's
NBD_CMD_DISC or end of stream, a protocol error, the groups above), is
reported once through ``on_closed`` (the worker turns it into an
``NBD_CONNECTION_CLOSED`` event for the main loop, which counts an export's
connections from the handoffs minus these); one handed back is not.

What all the connections have in flight is bounded by one ``NbdCredit``.
Home thread only.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol import NbdConnection, ThrottledLog

from ..aio._context import AioContext
from ..block._node import BlockNode
from ._client import NbdClient, NbdCredit, log

__all__ = ["HandedBack", "MAX_CONNECTIONS", "NbdServer"]

MAX_CONNECTIONS = 1024  # NBD connections served by one iothread at once

HandedBack = list[tuple[socket.socket, NbdConnection]]


@dataclass(eq=False)
class _Group:
    """Connections ended together, and what to do once the last one has."""

    left: set[NbdClient]
    done: Callable[[_Group], object]
    closed: int = 0
    handed_back: HandedBack = field(default_factory=list)


class NbdServer:
    """The NBD connections of one AioContext, by node and by export.

    :param on_closed: called with each connection that closed (not one
        handed back), once.
    """

    def __init__(self, ctx: AioContext, on_closed: Callable[[NbdConnection], object]) -> None:
        self.ctx = ctx
        self.on_closed = on_closed
        self.credit = NbdCredit(ctx)
        self.clients: dict[int, NbdClient] = {}  # by connection id
        self.bad_input = ThrottledLog(log)  # what clients do wrong, for all of them: a few lines, then counts
        self._groups: list[_Group] = []

    def adopt(self, sock: socket.socket, conn: NbdConnection, node: BlockNode) -> None:
        """Serve ``conn`` on ``sock`` (owned from now on) with ``node``."""
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies leave as they are sent (QEMU too)
        client = NbdClient(self.ctx, sock, conn, node, self.credit, self._ended, self.bad_input)
        if not client.closed:  # (its pending bytes may have ended it already)
            self.clients[conn.connection_id] = client

    def of_node(self, node_name: str) -> list[NbdClient]:
        return [c for c in self.clients.values() if c.conn.node_name == node_name]

    def hand_back(self, node_name: str, done: Callable[[HandedBack], object]) -> None:
        """Quiesce ``node_name``'s connections; ``done(handed_back)`` once each
        was quiesced (its socket and connection in the list) or closed."""
        self._end_group(self.of_node(node_name), NbdClient.quiesce, lambda g: done(g.handed_back))

    def close_export(self, export_id: str, done: Callable[[int], object]) -> None:
        """Close ``export_id``'s connections; ``done(how many)`` once they are."""
        clients = [c for c in self.clients.values() if c.conn.export_id == export_id]
        self._end_group(clients, lambda c: c.close("its export was closed", drop_replies=True),
                        lambda g: done(g.closed))

    def close_node(self, node_name: str, done: Callable[[int], object]) -> None:
        """Close ``node_name``'s connections (the node is being deleted); ``done(how many)``."""
        self._end_group(self.of_node(node_name), lambda c: c.close("its node was deleted", drop_replies=True),
                        lambda g: done(g.closed))

    def close_all(self) -> None:
        """Close every connection once its requests in flight are answered (the iothread stops)."""
        for client in list(self.clients.values()):
            client.close("the iothread is stopping")

    def _end_group(self, clients: list[NbdClient], end: Callable[[NbdClient], object],
                   done: Callable[[_Group], object]) -> None:
        group = _Group(set(clients), done)
        if not clients:
            done(group)
            return
        self._groups.append(group)
        for client in clients:
            end(client)  # (which may end it at once)

    def _ended(self, client: NbdClient, handed_back: NbdConnection | None) -> None:
        if self.clients.get(client.conn.connection_id) is client:
            del self.clients[client.conn.connection_id]
        if handed_back is None:
            self.on_closed(client.conn)
        for group in list(self._groups):
            if client in group.left:
                group.left.discard(client)
                if handed_back is None:
                    group.closed += 1
                else:
                    group.handed_back.append((client.sock, handed_back))
                if not group.left:
                    self._groups.remove(group)
                    group.done(group)

    def close(self) -> None:
        """Stop at once (the process is exiting): every socket closed, no event."""
        for client in list(self.clients.values()):
            client.abort()
        self.clients.clear()
        self._groups.clear()
        self.credit.close()
        self.bad_input.flush()
