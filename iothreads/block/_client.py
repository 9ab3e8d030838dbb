"""The data-plane client: block I/O straight to the iothread that owns a node.

Theory of operation
-------------------
A client attaches to a running cluster through its runtime directory, where
the main loop publishes ``cluster.json``: each iothread's data endpoint and
which iothread owns which node.  For each iothread it talks to, the client
connects a DEALER socket (a ``Channel``) served by the client's AioContext;
requests carry increasing ids, and each ``BlockCompletion`` finds its
callback by id.  The main loop is not on this path.

Three ways to wait, over the same machinery:

* ``submit(node, op, ..., callback)``: ``callback(status, message, data)``
  runs in the client's AioContext (yours, if you passed one; attach it to a
  MainContext with ``mainloop.AioSource`` to get callbacks there);
* ``await client.aread(...)`` etc. in our coroutines;
* ``client.read(...)`` etc.: blocking calls that poll the client's context.

When a node moves to another iothread, the old home answers requests that
still reach it with ESTALE; the client re-reads the published state and sends
them to the new home, so the caller sees one completion per request.

A failed request raises (or reports) its errno and the iothread's message.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any, cast

import zmq
from zmq.utils.monitor import parse_monitor_message

from protocol import (
    BlockCompletion,
    BlockRequest,
    Channel,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    StateError,
    channel_socket,
)

from ..aio._context import AioContext
from ..aio._channel_handler import ChannelHandler
from ..aio._clock import ClockType
from ..aio._coroutine import Future

__all__ = ["CLUSTER_STATE_FILE", "BlockClient", "BlockIOError"]

CLUSTER_STATE_FILE = "cluster.json"  # in the runtime directory; written by the main loop
MAX_RESENDS = 1000  # a node in the middle of a move answers ESTALE for a little while
RESEND_DELAY_MS = 1
RESEND_DELAY_MAX_MS = 100
Completion = Callable[[int, str, bytes], object]
Request = tuple[str, str, int, int, bytes, int, str]


class BlockIOError(OSError):
    """A block request failed: ``errno`` and the iothread's message."""


class BlockClient:
    """Block I/O to a running cluster.  Use from the client context's home thread."""

    def __init__(self, runtime_dir: str, ctx: AioContext | None = None, *, timeout_s: float = 30.0) -> None:
        self.runtime_dir = runtime_dir
        self.timeout_s = timeout_s
        self.state: dict[str, Any] = {}
        self.refresh()  # first: no cluster there, nothing created
        self._owns_ctx = ctx is None
        self.ctx = ctx or AioContext(name="block-client")
        self.zmq = zmq.Context()
        self._identity = f"client-{os.getpid()}-{id(self):x}".encode()
        self._channels: dict[str, tuple[Channel, ChannelHandler, zmq.Socket[Any]]] = {}  # and its monitor
        self._pending: dict[int, Completion] = {}
        # To resend after a move, or fail if the connection is lost: (node, op,
        # offset, length, data, tries, iothread).
        self._requests: dict[int, Request] = {}
        self._lost: set[str] = set()  # iothreads whose connection dropped (and has not come back)
        self._ids = itertools.count(1)
        self.resends = 0  # requests sent again because their node had moved

    # -- the cluster's shape ---------------------------------------------------

    def refresh(self) -> None:
        """Re-read the cluster's published state (nodes added or moved)."""
        path = os.path.join(self.runtime_dir, CLUSTER_STATE_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                self.state = json.load(f)
        except FileNotFoundError:
            raise StateError(f"no running cluster in {self.runtime_dir} (no {CLUSTER_STATE_FILE})") from None

    def nodes(self) -> dict[str, dict[str, Any]]:
        return dict(self.state.get("nodes", {}))

    def node_size(self, node: str) -> int:
        return int(self._node(node)["size"])

    def _node(self, node: str) -> dict[str, Any]:
        info = self.state.get("nodes", {}).get(node)
        if info is None:
            self.refresh()
            info = self.state.get("nodes", {}).get(node)
            if info is None:
                raise BlockIOError(19, f"no block node named {node!r}")  # ENODEV
        return info  # type: ignore[no-any-return]  # read only: no copy per request

    def _channel(self, iothread: str) -> Channel:
        entry = self._channels.get(iothread)
        if entry is None:
            endpoints = {t["id"]: t["data"] for t in self.state.get("iothreads", [])}
            endpoint = endpoints.get(iothread)
            if not endpoint:
                raise StateError(f"iothread {iothread!r} has no data endpoint")
            sock = channel_socket(self.zmq, zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, self._identity)
            # Requests wait in ZeroMQ only for a live connection: when it drops,
            # those not yet written out are dropped with it (they fail, below),
            # never delivered to an iothread restarted on the same endpoint.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            # Told when the connection drops (the iothread died): its requests
            # in flight will never complete, so they fail then.
            monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            sock.connect(endpoint)
            channel = Channel(sock, self._on_message, on_error=self._on_bad_message)
            self.ctx.set_fd_handler(cast(int, monitor.getsockopt(zmq.FD)),
                                    io_read=lambda: self._on_monitor(iothread, monitor),
                                    io_poll=lambda: bool(cast(int, monitor.getsockopt(zmq.EVENTS)) & zmq.POLLIN))
            entry = self._channels[iothread] = (channel, ChannelHandler(self.ctx, channel, f"data-{iothread}"),
                                                monitor)
            self._on_monitor(iothread, monitor)  # ZeroMQ signals its fd only once a read has found it empty
        return entry[0]

    def _on_monitor(self, iothread: str, monitor: zmq.Socket[Any]) -> None:
        """Connection events of a data channel (its monitor's fd is edge-triggered: read them all)."""
        while cast(int, monitor.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))["event"]
            if event == zmq.EVENT_CONNECTED:
                self._lost.discard(iothread)
            elif event == zmq.EVENT_DISCONNECTED:
                self._lost.add(iothread)
                lost = [rid for rid, r in self._requests.items() if r[6] == iothread]
                for rid in lost:
                    del self._requests[rid]
                    cb = self._pending.pop(rid, None)
                    if cb is None:
                        continue
                    try:  # one callback's bug must not strand the others (the fd's edge is spent)
                        cb(-errno.EIO, f"the connection to iothread {iothread} was lost", b"")
                    except Exception as exc:
                        self.ctx.report_exception(exc, f"completion callback of request {rid}")

    # -- completions ---------------------------------------------------------------

    def _on_message(self, identity: bytes, msg: Message) -> None:
        if isinstance(msg, BlockCompletion):
            cb = self._pending.pop(msg.request_id, None)
            if cb is None:
                return
            request = self._requests.pop(msg.request_id, None)
            if msg.status == -errno.ESTALE and request is not None and request[5] < MAX_RESENDS:
                self._resend_later(request, cb)  # the node moved: look it up again
                return
            cb(msg.status, msg.message, msg.data)

    def _resend_later(self, request: Request, cb: Completion) -> None:
        node, op, offset, length, data, tries, _ = request
        self.resends += 1

        def resend() -> None:
            self.refresh()
            try:
                # Not deferred: a blocking call may be waiting for it inside the
                # channel's drain (a call made from a completion callback).
                self._send(node, op, offset, length, data, cb, tries + 1, defer=False)
            except (BlockIOError, StateError) as exc:
                cb(-(getattr(exc, "errno", 0) or errno.ENODEV), str(exc), b"")

        # 1, 2, 4 ... 64, then 100 ms between tries: a move that takes long
        # (a node draining a slow flush) is waited for, up to about 100 s.
        delay_ms = min(RESEND_DELAY_MS << min(tries, 6), RESEND_DELAY_MAX_MS)
        self.ctx.timer_new_ms(ClockType.REALTIME, resend, "resend").mod(
            self.ctx.clock_now_ns(ClockType.REALTIME) // 1_000_000 + delay_ms)

    def _on_bad_message(self, identity: bytes, exc: RemoteProtocolError) -> None:
        self.ctx.report_exception(exc, "block client: bad completion")

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- submitting ----------------------------------------------------------------

    def submit(self, node: str, op: str, offset: int = 0, length: int = 0, data: bytes = b"",
               callback: Completion | None = None) -> int:
        """Send one request; ``callback(status, message, data)`` runs in the
        client's context when it completes.  Returns the request id."""
        if op == "write" and not length:
            length = len(data)
        return self._send(node, op, offset, length, data, callback or (lambda s, m, d: None), 0)

    def _send(self, node: str, op: str, offset: int, length: int, data: bytes, callback: Completion,
              tries: int, defer: bool = True) -> int:
        info = self._node(node)
        iothread = info["iothread"]
        if iothread in self._lost:
            self.refresh()  # the node may live elsewhere now
            iothread = self._node(node)["iothread"]
            if iothread in self._lost:
                raise BlockIOError(errno.ENOTCONN, f"iothread {iothread} is not connected (it exited?)")
        request_id = next(self._ids)
        msg = BlockRequest(request_id, node, op, offset, length, data=data)
        self._pending[request_id] = callback
        self._requests[request_id] = (node, op, offset, length, data, tries, iothread)
        try:
            # Deferred: a burst of submissions reaches the socket in one go.
            # A blocking call (not deferred) may come from a completion callback,
            # inside the channel's drain: it must leave at once all the same.
            self._channel(iothread).send(msg, defer=defer, immediately=not defer)
        except BaseException as exc:
            self._pending.pop(request_id, None)
            self._requests.pop(request_id, None)
            if isinstance(exc, LocalProtocolError):  # too large for one message
                raise BlockIOError(errno.EINVAL, str(exc)) from None
            raise
        return request_id

    def _wait(self, node: str, op: str, offset: int, length: int, data: bytes) -> bytes:
        result: list[tuple[int, str, bytes]] = []
        # Sent at once: nothing else can join it, so a deferred send would only cost a turn.
        self._send(node, op, offset, length, data, lambda s, m, d: result.append((s, m, d)), 0, defer=False)
        end_ns = time.monotonic_ns() + int(self.timeout_s * 1e9)
        while not result:
            left_ns = end_ns - time.monotonic_ns()
            if left_ns <= 0:
                raise TimeoutError(f"{op} on node {node!r} did not complete in {self.timeout_s} s")
            self.ctx.poll(True, left_ns)  # bounded: the answer may never come
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

    def _future(self, node: str, op: str, offset: int, length: int, data: bytes) -> Future[bytes]:
        fut: Future[bytes] = Future()

        def done(status: int, message: str, out: bytes) -> None:
            if status < 0:
                fut.set_exception(BlockIOError(-status, message))
            else:
                fut.set_result(out)

        self.submit(node, op, offset, length, data, done)
        return fut

    async def aread(self, node: str, offset: int, length: int) -> bytes:
        """``await client.aread(...)`` in a coroutine on the client's context."""
        return await self._future(node, "read", offset, length, b"")

    async def awrite(self, node: str, offset: int, data: bytes) -> None:
        await self._future(node, "write", offset, len(data), data)

    async def aflush(self, node: str) -> None:
        await self._future(node, "flush", 0, 0, b"")

    def close(self) -> None:
        """Disconnect (requests still in flight are abandoned; the iothread
        completes them and drops the completions)."""
        for channel, handler, monitor in self._channels.values():
            self.ctx.set_fd_handler(cast(int, monitor.getsockopt(zmq.FD)))
            channel.socket.disable_monitor()
            monitor.close(linger=0)
            handler.close()
        self._channels.clear()
        self._pending.clear()
        self._requests.clear()
        self.zmq.term()
        if self._owns_ctx:
            self.ctx.close()

    def __enter__(self) -> BlockClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
