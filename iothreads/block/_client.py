"""The data-plane client: block I/O straight to the iothread that owns a node.

Theory of operation
-------------------
A client attaches to a running cluster through its runtime directory, where
the main loop publishes ``cluster.json`` (a ``protocol.ClusterState``): each
iothread's data endpoint and which iothread owns which node.  For each
iothread it talks to, the client connects a DEALER socket (a ``Channel``)
served by the client's AioContext; the connection's ``PendingRequests``
gives each request its id, and each ``BlockCompletion`` finds its request by
id.  The main loop is not on this path.

Three ways to wait, over the same machinery:

* ``submit(node, op, ..., callback)``: ``callback(status, message, data)``
  runs in the client's AioContext (yours, if you passed one; attach it to a
  MainContext with ``mainloop.AioSource`` to get callbacks there);
* ``await client.aread(...)`` etc. in our coroutines, or in asyncio tasks
  (the client's context is then driven by the running asyncio loop, an
  ``AsyncioSource``: completions come through the loop, no thread in
  between);
* ``client.read(...)`` etc.: blocking calls that poll the client's context,
  up to ``timeout_s``; then the request is given up (its answer, if it
  comes, is dropped) and ``TimeoutError`` raised.

When a node moves to another iothread, the old home answers requests that
still reach it with ESTALE; the client re-reads the published state and sends
them to the new home, so the caller sees one completion per request.

When the connection to an iothread drops (it died), its requests in flight
fail with EIO, and new ones with ENOTCONN until it is back: restarted, it
listens on the same endpoint, where ZeroMQ connects again by itself, or on
the one the published state gives now (a tcp:// port), where the client
connects anew (``_reconnect``).

An iothread takes at most ``CLIENT_CREDIT`` from one client (requests and
bytes in flight; see ``protocol.InFlight``).  The client keeps to it: past
it, requests wait in the client, registered (their deadlines run), and leave
as completions come back; one that an iothread busy with other clients
refused (EAGAIN) is sent again a little later, as a moved one is.

A failed request raises (or reports) its errno and the iothread's message.
A request no node could take (an unknown op, a negative offset or length,
more than a request may carry) is refused at once: ``BlockIOError`` EINVAL,
nothing sent.  A completion the client cannot decode but whose request id it
can read fails that request with EIO.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import zmq
from zmq.utils.monitor import parse_monitor_message

from protocol.channel import HANDSHAKE_FAILURES, KeyPair, curve_client, load_key_pair, local_key_paths
from protocol import (
    CLIENT_CREDIT,
    CLUSTER_STATE_FILE,
    BadRequestError,
    BlockCompletion,
    BlockRequest,
    Channel,
    ClusterState,
    LocalProtocolError,
    Message,
    NodeEntry,
    PendingRequests,
    RemoteProtocolError,
    StateError,
    ThrottledLog,
    channel_socket,
    has_input,
    cluster_state_path,
    request_bytes,
)

from ..aio._asyncio import AsyncioSource, asyncio_source_of
from ..aio._context import AioContext
from ..aio._channel_handler import ChannelHandler
from ..aio._clock import ClockType
from ..aio._coroutine import Future, current_coroutine
from ._node import request_problem

__all__ = ["CLUSTER_STATE_FILE", "BlockClient", "BlockIOError"]

log = logging.getLogger("iothreads.block")
MAX_RESENDS = 1000  # a node in the middle of a move answers ESTALE for a little while
RESEND_DELAY_MS = 1
RESEND_DELAY_MAX_MS = 100
Completion = Callable[[int, str, bytes], object]


def _asyncio_task() -> asyncio.Task[Any] | None:
    """The asyncio task running in this thread, if any."""
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


def _completing(fut: Future[bytes] | asyncio.Future[bytes]) -> Callable[[int, str, bytes], None]:
    """A request's completion callback that completes ``fut`` (unless it is
    done already: an asyncio task cancelled while it waited)."""
    def done(status: int, message: str, out: bytes) -> None:
        if fut.done():
            return
        if status < 0:
            fut.set_exception(BlockIOError(-status, message))
        else:
            fut.set_result(out)
    return done


class BlockIOError(OSError):
    """A block request failed: ``errno`` and the iothread's message."""


@dataclass(slots=True)
class _Request:
    """A request on its way: what it takes to send it again after its node
    moved, or to fail it."""

    node: str
    op: str
    offset: int
    length: int
    data: bytes
    callback: Completion
    deadline_ns: int | None = None  # a blocking call's (monotonic clock)
    tries: int = 0
    conn: _Connection | None = None  # where it was sent, while it counts against that credit


@dataclass(eq=False)
class _Connection:
    """The client's connection to one iothread: its channel, the monitor that
    says when the connection drops, and the requests waiting for completions."""

    channel: Channel
    handler: ChannelHandler
    monitor: zmq.Socket[Any]
    pending: PendingRequests[_Request]
    # Registered, held back by the iothread's credit, in order.
    waiting: deque[tuple[int, BlockRequest, _Request]] = field(default_factory=deque)
    requests: int = 0  # sent and not completed, and their bytes
    nbytes: int = 0
    endpoint: str = ""  # the iothread's data endpoint it connected to
    curve: bool = False  # a tcp:// connection with CURVE
    refused: str = ""  # why the iothread keeps this client out (CURVE), while it does

    def fits(self, nbytes: int) -> bool:
        """Whether a request of ``nbytes`` may be sent now (one may always be)."""
        return not self.requests or (self.requests < CLIENT_CREDIT.max_requests
                                     and self.nbytes + nbytes <= CLIENT_CREDIT.max_bytes)


def _ignore(status: int, message: str, data: bytes) -> None:
    pass


class BlockClient:
    """Block I/O to a running cluster.  Use from the client context's home thread."""

    def __init__(self, runtime_dir: str, ctx: AioContext | None = None, *, timeout_s: float = 30.0,
                 curve_keys: KeyPair | None = None) -> None:
        self.runtime_dir = runtime_dir
        self._curve_keys = curve_keys  # (None: the cluster's local pair, read when a tcp:// iothread needs it)
        self.timeout_s = timeout_s
        self.state = self._read_state()  # first: no cluster there, nothing created
        self._owns_ctx = ctx is None
        self.ctx = ctx or AioContext(name="block-client")
        self.zmq = zmq.Context()
        self._identity = f"client-{os.getpid()}-{id(self):x}".encode()
        self._connections: dict[str, _Connection] = {}  # by iothread id
        self._lost: set[str] = set()  # iothreads whose connection dropped (and has not come back)
        self.resends = 0  # requests sent again because their node had moved
        self._bad_input = ThrottledLog(log)  # what iothreads send wrong: a few lines each, then counts
        self._asyncio_source: AsyncioSource | None = None  # the client's own context, driven by asyncio

    # -- the cluster's shape ---------------------------------------------------

    def _read_state(self) -> ClusterState:
        path = cluster_state_path(self.runtime_dir)
        try:
            with open(path, "rb") as f:
                text = f.read()
        except FileNotFoundError:
            raise StateError(f"no running cluster in {self.runtime_dir} (no {CLUSTER_STATE_FILE})") from None
        try:
            return ClusterState.from_json(text)
        except RemoteProtocolError as exc:
            raise StateError(f"{path}: {exc}") from None

    def refresh(self) -> None:
        """Re-read the cluster's published state (nodes added or moved);
        ``StateError`` if there is no cluster, or the file is not its state."""
        self.state = self._read_state()

    def nodes(self) -> dict[str, NodeEntry]:
        """The nodes as last read, by name."""
        return dict(self.state.nodes)

    def node_size(self, node: str) -> int:
        return self._node(node).size

    def _node(self, node: str) -> NodeEntry:
        info = self.state.nodes.get(node)
        if info is None:
            self.refresh()
            info = self.state.nodes.get(node)
            if info is None:
                raise BlockIOError(errno.ENODEV, f"no block node named {node!r}")
        return info

    def _connection(self, iothread: str) -> _Connection:
        conn = self._connections.get(iothread)
        if conn is None:
            entry = self.state.iothread(iothread)
            if entry is None or not entry.data:
                raise StateError(f"iothread {iothread!r} has no data endpoint")
            if entry.data.startswith("ipc://") and not os.path.exists(entry.data.removeprefix("ipc://")):
                # An iothread at its limit of clients stops listening (its socket
                # file goes) until some leave: ZeroMQ would wait for it in silence.
                raise BlockIOError(errno.ECONNREFUSED, f"iothread {iothread} takes no new clients now "
                                                       "(it is at its limit of connections or descriptors)")
            sock = channel_socket(self.zmq, zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, self._identity)
            if entry.curve:
                try:
                    curve_client(sock, self._keys(), entry.curve.encode())
                except BaseException:
                    sock.close(linger=0)
                    raise
            # Requests wait in ZeroMQ only for a live connection: when it drops,
            # those not yet written out are dropped with it (they fail, below),
            # never delivered to an iothread restarted on the same endpoint.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            # Told when the connection drops (the iothread died): its requests
            # in flight will never complete, so they fail then.
            monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
                                              | (HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                 | zmq.EVENT_HANDSHAKE_SUCCEEDED if entry.curve else 0))
            sock.connect(entry.data)
            pending: PendingRequests[_Request] = PendingRequests()
            channel = Channel(sock, lambda _identity, msg: self._on_message(iothread, pending, msg),
                              on_error=lambda _identity, exc: self._on_bad_message(iothread, pending, exc))
            handler = ChannelHandler(self.ctx, channel, f"data-{iothread}")
            try:  # (interrupted, a Ctrl-C too: what is registered goes; close() destroys the sockets)
                conn = _Connection(channel, handler, monitor, pending, endpoint=entry.data, curve=bool(entry.curve))
                self.ctx.set_fd_handler(cast(int, monitor.getsockopt(zmq.FD)),
                                        io_read=lambda: self._on_monitor(iothread, conn),
                                        io_poll=lambda: has_input(monitor))
                self._connections[iothread] = conn
            except BaseException:
                self.ctx.set_fd_handler(cast(int, monitor.getsockopt(zmq.FD)))
                handler.close()
                raise
            self._on_monitor(iothread, conn)  # ZeroMQ signals its fd only once a read has found it empty
        return conn

    def _keys(self) -> KeyPair:
        """This client's CURVE key pair: the one given, or the cluster's local
        one from its runtime directory (``StateError`` if it cannot be read)."""
        if self._curve_keys is None:
            path = local_key_paths(self.runtime_dir)[0]
            try:
                self._curve_keys = load_key_pair(path)
            except (ValueError, OSError) as exc:
                raise StateError(f"the cluster serves CURVE on tcp://, and this client has no key pair: {exc} "
                                 "(give curve_keys=)") from None
        return self._curve_keys

    def _reconnect(self, node: str, iothread: str) -> str:
        """Where a request for ``node`` goes now that the connection to its
        iothread dropped: there again once it is back (a restarted iothread:
        ZeroMQ connects again by itself to the same endpoint, and to the new
        one the published state gives if it listens elsewhere now, a tcp://
        port chosen at its start), or to the node's new home; ENOTCONN while
        it is down."""
        conn = self._connections[iothread]
        self._on_monitor(iothread, conn)  # back meanwhile? (a blocking caller may not have polled since)
        if iothread not in self._lost:
            return iothread
        self.refresh()  # the node may live elsewhere now
        iothread = self._node(node).iothread
        dropped = self._connections[iothread] if iothread in self._lost else None
        entry = self.state.iothread(iothread)
        if dropped is not None and entry is not None and entry.data and entry.data != dropped.endpoint:
            del self._connections[iothread]
            self._lost.discard(iothread)
            self._close_connection(dropped)  # a new one to where it listens now
        elif iothread in self._lost:
            refused = self._connections[iothread].refused
            if refused:
                raise BlockIOError(errno.EACCES, refused)
            raise BlockIOError(errno.ENOTCONN, f"iothread {iothread} is not connected (it exited?)")
        return iothread

    def _on_monitor(self, iothread: str, conn: _Connection) -> None:
        """Connection events of a data channel (its monitor's fd is edge-triggered: read them all)."""
        while has_input(conn.monitor):
            event = parse_monitor_message(conn.monitor.recv_multipart(zmq.NOBLOCK))["event"]
            if event == (zmq.EVENT_HANDSHAKE_SUCCEEDED if conn.curve else zmq.EVENT_CONNECTED):
                self._lost.discard(iothread)  # (over CURVE: once let in, not at the TCP connect)
                conn.refused = ""
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH or event & HANDSHAKE_FAILURES:
                # Kept out (ZeroMQ tries again: still out): what waits fails now, not at its deadline.
                self._lost.add(iothread)
                why = ("refused this client's key" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                       else "failed the CURVE handshake with this client (the wrong server key?)")
                conn.refused = f"iothread {iothread} {why}"
                self._fail(conn.pending.take_all(), -errno.EACCES, conn.refused)
                conn.waiting.clear()
            elif event == zmq.EVENT_DISCONNECTED:
                self._lost.add(iothread)
                self._fail(conn.pending.take_all(), -errno.EIO,
                           f"the connection to iothread {iothread} was lost")

    def _fail(self, requests: list[tuple[int, _Request]], status: int, message: str) -> None:
        """Complete ``requests`` with an error.  One callback's bug must not
        strand the others (a monitor's edge is spent): it is reported."""
        for request_id, request in requests:
            self._settle(request)
            try:
                request.callback(status, message, b"")
            except Exception as exc:
                self.ctx.report_exception(exc, f"completion callback of request {request_id}")

    def _expire(self, now_ns: int) -> None:
        """Fail the requests whose deadline has passed with ETIMEDOUT: their
        answers, if they come later, find nothing."""
        for iothread, conn in list(self._connections.items()):
            self._fail(conn.pending.expire(now_ns), -errno.ETIMEDOUT,
                       f"iothread {iothread} did not answer in time")

    # -- completions ---------------------------------------------------------------

    def _on_message(self, iothread: str, pending: PendingRequests[_Request], msg: Message) -> None:
        if isinstance(msg, BlockCompletion):
            request = pending.match(msg.request_id)
            if request is None:
                return  # abandoned: timed out, or failed with its connection
            self._settle(request)
            if msg.status in (-errno.ESTALE, -errno.EAGAIN) and request.tries < MAX_RESENDS:
                # The node moved (look it up again), or the iothread is busy with others.
                self._resend_later(iothread, request, msg.status)
                return
            request.callback(msg.status, msg.message, msg.data)

    def _settle(self, request: _Request) -> None:
        """``request`` left its connection's table: its credit is free for
        the requests held back there."""
        conn, request.conn = request.conn, None
        if conn is None:
            return
        conn.requests -= 1
        conn.nbytes -= request_bytes(request.op, request.length, request.data)
        waiting = conn.waiting
        while waiting and conn.fits(request_bytes(waiting[0][2].op, waiting[0][2].length, waiting[0][2].data)):
            request_id, msg, held = waiting.popleft()
            if request_id not in conn.pending:  # failed or expired meanwhile
                continue
            try:
                self._transmit(conn, request_id, msg, held, defer=True)
            except LocalProtocolError as exc:  # too large for one message
                conn.pending.match(request_id)
                held.callback(-errno.EINVAL, str(exc), b"")

    def _resend_later(self, iothread: str, request: _Request, status: int) -> None:
        self.resends += 1
        log.debug("%s at %d on node %s: %s from iothread %s: resent (try %d)", request.op, request.offset,
                  request.node, errno.errorcode.get(-status, status), iothread, request.tries + 1)

        def resend() -> None:
            try:
                self.refresh()
                request.tries += 1
                # Not deferred: a blocking call may be waiting for it inside the
                # channel's drain (a call made from a completion callback).
                self._send(request, defer=False)
            except (BlockIOError, StateError) as exc:
                request.callback(-(getattr(exc, "errno", 0) or errno.ENODEV), str(exc), b"")

        # 1, 2, 4 ... 64, then 100 ms between tries: a move that takes long
        # (a node draining a slow flush) is waited for, up to about 100 s.
        delay_ms = min(RESEND_DELAY_MS << min(request.tries, 6), RESEND_DELAY_MAX_MS)
        self.ctx.timer_new_ms(ClockType.REALTIME, resend, "resend").mod(
            self.ctx.clock_now_ns(ClockType.REALTIME) // 1_000_000 + delay_ms)

    def _on_bad_message(self, iothread: str, pending: PendingRequests[_Request],
                        exc: RemoteProtocolError) -> None:
        self._bad_input.log((iothread, type(exc)), logging.ERROR,
                            "block client: bad message from iothread %s: %s", iothread, exc)
        if isinstance(exc, BadRequestError) and exc.kind == BlockCompletion.KIND:
            request = pending.match(exc.request_id)
            if request is not None:  # its answer came, unreadable: it failed
                self._settle(request)
                request.callback(-errno.EIO, f"iothread {iothread} sent a bad completion: {exc}", b"")

    @property
    def in_flight(self) -> int:
        return sum(len(conn.pending) for conn in self._connections.values())

    # -- submitting ----------------------------------------------------------------

    def submit(self, node: str, op: str, offset: int = 0, length: int = 0, data: bytes = b"",
               callback: Completion | None = None) -> int:
        """Send one request; ``callback(status, message, data)`` runs in the
        client's context when it completes.  Returns the request id (on its
        iothread's connection).  ``BlockIOError`` at once, nothing sent: EINVAL
        for a request no node could take (an unknown op, a negative offset or
        length, a length over the limit), ENODEV for an unknown node."""
        if op == "write" and not length:
            length = len(data)
        return self._send(_Request(node, op, offset, length, data, callback or _ignore))

    def _send(self, request: _Request, defer: bool = True) -> int:
        problem = request_problem(request.op, request.offset, request.length, request.data)
        if problem is not None:
            raise BlockIOError(errno.EINVAL, problem)
        iothread = self._node(request.node).iothread
        if iothread in self._lost:
            iothread = self._reconnect(request.node, iothread)
        conn = self._connection(iothread)
        request_id = conn.pending.next_id()
        msg = BlockRequest(request_id, request.node, request.op, request.offset, request.length,
                           data=request.data)
        conn.pending.register(request_id, request, request.deadline_ns)
        if conn.waiting or not conn.fits(request_bytes(request.op, request.length, request.data)):
            conn.waiting.append((request_id, msg, request))  # sent when completions free the credit
            return request_id
        try:
            self._transmit(conn, request_id, msg, request, defer)
        except BaseException as exc:
            conn.pending.match(request_id)
            if isinstance(exc, LocalProtocolError):  # too large for one message
                raise BlockIOError(errno.EINVAL, str(exc)) from None
            raise
        return request_id

    def _transmit(self, conn: _Connection, request_id: int, msg: BlockRequest, request: _Request,
                  defer: bool) -> None:
        """Send a registered request, counting it against the iothread's credit."""
        # Deferred: a burst of submissions reaches the socket in one go.
        # A blocking call (not deferred) may come from a completion callback,
        # inside the channel's drain: it must leave at once all the same.
        conn.channel.send(msg, defer=defer, immediately=not defer)
        conn.requests += 1
        conn.nbytes += request_bytes(request.op, request.length, request.data)
        request.conn = conn

    def _wait(self, node: str, op: str, offset: int, length: int, data: bytes) -> bytes:
        result: list[tuple[int, str, bytes]] = []
        end_ns = time.monotonic_ns() + int(self.timeout_s * 1e9)
        # Sent at once: nothing else can join it, so a deferred send would only cost a turn.
        self._send(_Request(node, op, offset, length, data, lambda s, m, d: result.append((s, m, d)), end_ns),
                   defer=False)
        while not result:
            now_ns = time.monotonic_ns()
            if now_ns >= end_ns:
                self._expire(now_ns)  # this request too: its answer, if it comes, finds nothing
                raise TimeoutError(f"{op} on node {node!r} did not complete in {self.timeout_s} s")
            self.ctx.poll(True, end_ns - now_ns)  # bounded: the answer may never come
        status, message, out = result[0]
        if status < 0:
            raise BlockIOError(-status, message)
        return out

    def read(self, node: str, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``; blocks; raises BlockIOError."""
        return self._wait(node, "read", offset, length, b"")

    def write(self, node: str, offset: int, data: bytes) -> None:
        self._wait(node, "write", offset, len(data), data)

    def flush(self, node: str) -> None:
        self._wait(node, "flush", 0, 0, b"")

    def discard(self, node: str, offset: int, length: int) -> None:
        self._wait(node, "discard", offset, length, b"")

    def write_zeroes(self, node: str, offset: int, length: int) -> None:
        self._wait(node, "write_zeroes", offset, length, b"")

    def _future(self, node: str, op: str, offset: int, length: int, data: bytes) -> Awaitable[bytes]:
        """What the ``a*`` methods await: one of our ``Future``s in our
        coroutines, an asyncio future in an asyncio task."""
        if current_coroutine() is None and _asyncio_task() is not None:
            return self._asyncio_future(node, op, offset, length, data)
        fut: Future[bytes] = Future()
        self.submit(node, op, offset, length, data, _completing(fut))
        return fut

    def _asyncio_future(self, node: str, op: str, offset: int, length: int, data: bytes) -> asyncio.Future[bytes]:
        """The request, completed through the running asyncio loop: the
        client's context must be driven by it (an ``AsyncioSource``; made
        here for a context of the client's own).  A task cancelled while it
        waits gives the request up: its completion is dropped."""
        loop = asyncio.get_running_loop()
        source = asyncio_source_of(self.ctx)
        if source is None and self._owns_ctx:
            source = self._asyncio_source = AsyncioSource(self.ctx, loop)
        if source is None or source.loop is not loop:
            raise StateError(f"the block client's AioContext {self.ctx.name!r} is not driven by this asyncio loop: "
                             "attach it with iothreads.aio.AsyncioSource(ctx) in the loop's thread")
        fut: asyncio.Future[bytes] = loop.create_future()
        self.submit(node, op, offset, length, data, _completing(fut))
        return fut

    async def aread(self, node: str, offset: int, length: int) -> bytes:
        """``await client.aread(...)``: in a coroutine on the client's
        context, or in an asyncio task of the loop that drives it (the
        client's own context is attached to the running loop at the first
        such call: create the client in the loop's thread)."""
        return await self._future(node, "read", offset, length, b"")

    async def awrite(self, node: str, offset: int, data: bytes) -> None:
        await self._future(node, "write", offset, len(data), data)

    async def aflush(self, node: str) -> None:
        await self._future(node, "flush", 0, 0, b"")

    def close(self) -> None:
        """Disconnect (requests still in flight are abandoned; the iothread
        completes them and drops the completions)."""
        self._bad_input.flush()
        for conn in self._connections.values():
            self._close_connection(conn)
        self._connections.clear()
        # destroy, not term: term waits for every socket to be closed, and a
        # connection interrupted while it was being set up (Ctrl-C) leaves
        # sockets that no _Connection holds; destroy closes them all.
        self.zmq.destroy(linger=0)
        if self._asyncio_source is not None:
            self._asyncio_source.close()
            self._asyncio_source = None
        if self._owns_ctx:
            self.ctx.close()

    def _close_connection(self, conn: _Connection) -> None:
        """Close one connection; its requests still in flight are abandoned."""
        self.ctx.set_fd_handler(cast(int, conn.monitor.getsockopt(zmq.FD)))
        conn.channel.socket.disable_monitor()
        conn.monitor.close(linger=0)
        conn.handler.close()
        conn.pending.take_all()

    def __enter__(self) -> BlockClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
