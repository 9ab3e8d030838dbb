"""A message channel over a ZeroMQ socket, pollable by any event loop.

Theory of operation
-------------------
ZeroMQ hands out one fd per socket (``ZMQ_FD``, an eventfd inside libzmq).
It is *edge-triggered* and only a hint: it becomes readable when the socket's
state may have changed, and every ``send``, ``recv`` or read of
``ZMQ_EVENTS`` may consume the edge.  A loop that waits for the fd again
while a message is already queued waits forever.  The rules followed here:

* when the fd is readable, ``drain()`` receives until ``EAGAIN`` (checking
  ``ZMQ_EVENTS`` first), decoding and delivering each message;
* after every ``send``, ``ZMQ_EVENTS`` is read again; if input is pending, the
  loop is asked to call ``drain()`` soon through ``kick`` (the adapter
  schedules a bottom half, or marks its source ready), because the fd will
  not fire for it;
* ``drain()`` delivers at most ``batch`` messages per call and then kicks
  itself, so one busy peer cannot starve the rest of the loop.

Messages queued together leave together: ``flush()`` packs everything a
peer's queue holds (up to the codec's limits) into one ZeroMQ message, a
batch, so a burst of replies costs one send and one msgpack header on each
side.  Replies produced while ``drain()`` delivers are queued and flushed at
its end; ``send(defer=True)`` queues until the loop's next turn.  One
exception keeps both ends busy: when the first half of a large received batch
took a while to handle, its replies leave before the second half is started,
so the peer works on them meanwhile instead of the two sides taking turns.

Peers' frames are decoded with ``decode_batch``: a bad message is counted,
handed to ``on_error`` with the peer's identity, and dropped; it never raises
into the loop.  A ``BadRequestError`` (its request id could be read) is the
handler's to answer, so that its sender does not wait for ever; a handler
that logs bad input does it through a ``ThrottledLog``.  If a handler
raises, the rest of its batch is kept and delivered by the next
``drain()``.  Sends never block: a message the socket cannot take now waits
in an outgoing queue, flushed when ``ZMQ_EVENTS`` shows ``POLLOUT``.

This module holds the socket logic only; ``iothreads`` and ``mainloop`` plug
a channel into an AioContext (an fd handler) or a MainContext (a source).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any, Protocol, cast

import zmq

from ..wire._codec import (
    DEFAULT_LIMITS,
    Limits,
    Packed,
    batch_budget,
    batch_length,
    check_sendable,
    decode_batch,
    encode_batch,
    max_frame_bytes,
    pack,
)
from .._errors import LocalProtocolError, RemoteProtocolError
from ..wire._messages import Message

__all__ = ["Channel", "Drainable", "channel_socket", "has_input", "ipc_endpoint"]

# Plain ints: zmq's constants are IntFlag/IntEnum members, and ``int & IntFlag``
# goes through the enum machinery (about 1.5 us a time on a small VM).
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_EVENTS = int(zmq.EVENTS)
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_SNDMORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)

class Drainable(Protocol):
    """What an event loop serves as it serves a ``Channel``: an edge-triggered
    ``fileno()`` (ZMQ_FD), ``drain()`` when it may have input, ``pending_input()``
    for busy polling, ``kick`` (set by the loop: input the fd will not
    announce), ``close``.  Channels, and the ZAP handler."""

    kick: Callable[[], None]

    def fileno(self) -> int: ...

    def drain(self) -> int: ...

    def pending_input(self) -> bool: ...

    def close(self, linger_ms: int = ...) -> None: ...


MAX_IPC_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1
LINGER_MS = 0
HWM = 1000  # ZeroMQ messages (batches) queued per peer and direction: libzmq's default, said once
SPLIT_BATCH_MIN = 8
SPLIT_AFTER_NS = 100_000
"""A received batch of at least SPLIT_BATCH_MIN messages whose first half took
more than SPLIT_AFTER_NS to handle sends the replies to that half at once."""

Handler = Callable[[bytes, Message], object]
ErrorHandler = Callable[[bytes, RemoteProtocolError], object]


def ipc_endpoint(runtime_dir: str, name: str) -> str:
    """``ipc://DIR/NAME``; ValueError if the path is too long for AF_UNIX."""
    path = os.path.join(runtime_dir, name)
    if len(path.encode()) > MAX_IPC_PATH:
        raise ValueError(
            f"socket path {path!r} is {len(path.encode())} bytes; the limit is {MAX_IPC_PATH}"
            " (choose a shorter runtime directory)"
        )
    return "ipc://" + path


def has_input(sock: zmq.Socket[Any]) -> bool:
    """Whether a ZeroMQ socket has a message to receive (ZMQ_EVENTS, no system
    call): a monitor socket's io_poll, and the loop that drains one."""
    return bool(cast(int, sock.getsockopt(_EVENTS)) & _POLLIN)


def channel_socket(zctx: zmq.Context[Any], socket_type: int, limits: Limits = DEFAULT_LIMITS, *,
                   sndhwm: int = HWM, rcvhwm: int = HWM) -> zmq.Socket[Any]:
    """A new socket for a ``Channel``, with the options that only take effect
    if set before ``bind`` or ``connect`` (libzmq copies them into each
    listener and connection then): the largest frame a peer may send (libzmq
    disconnects a peer that sends a larger one, instead of buffering it whole
    for the codec to refuse), and the high-water marks: how many messages
    (batches) ZeroMQ queues for each peer, each way, before it takes no more
    (a sender's backlog then waits in its ``Channel``, which its owner bounds)."""
    sock: zmq.Socket[Any] = zctx.socket(socket_type)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes(limits))
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    return sock


def _backend_send() -> Callable[..., Any] | None:
    """pyzmq's own ``Socket.send``, under the Python wrapper of its
    ``zmq.Socket`` (which only adds routing-id and group options, unused
    here, for about half a microsecond a call)."""
    for klass in zmq.Socket.__mro__[1:]:
        send = klass.__dict__.get("send")
        if send is not None:
            return cast(Callable[..., Any], send)
    return None


_BACKEND_SEND = _backend_send()


def _frame_sender(sock: zmq.Socket[Any]) -> Callable[[bytes, int, bool], Any]:
    """``sock.send(frame, flags, copy)``, bound once, without the wrapper when it can."""
    if _BACKEND_SEND is not None and isinstance(sock, zmq.Socket):
        return cast(Callable[[bytes, int, bool], Any], _BACKEND_SEND.__get__(sock, type(sock)))
    return sock.send


def _send_frames(send: Callable[[bytes, int, bool], Any], frames: list[bytes]) -> None:
    """``send_multipart`` without pyzmq's flag enums (costly per frame): once
    the first frame is taken, ZeroMQ takes the rest of the message too."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        # copy=True: ZeroMQ gets its own copy.  Zero-copy would make pyzmq track
        # large frames with a garbage-collector thread of its own.
        send(frame, _NOBLOCK if i == last else _NOBLOCK_SNDMORE, True)


def _recv_frames(sock: zmq.Socket[Any]) -> list[bytes]:
    """``recv_multipart``, reading "more" from each frame instead of a
    getsockopt(RCVMORE) per frame."""
    frame = sock.recv(_NOBLOCK, copy=False)
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(_NOBLOCK, copy=False)
        frames.append(frame.bytes)
    return frames


class Channel:
    """Messages over one ZeroMQ socket (ROUTER: peers addressed by identity;
    DEALER: one peer).  All methods run in the loop thread that owns it."""

    def __init__(
        self,
        socket: zmq.Socket[Any],
        on_message: Handler,
        *,
        on_error: ErrorHandler | None = None,
        limits: Limits = DEFAULT_LIMITS,
        batch: int = 256,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.socket = socket
        self.router = socket.type == zmq.ROUTER
        socket.setsockopt(zmq.LINGER, LINGER_MS)
        if self.router:
            socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown peer: an error, not a silent drop
        socket.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes(limits))  # for later binds and connects
        self.on_message = on_message
        self.on_error = on_error
        self.limits = limits
        self.batch = batch
        self._clock_ns = clock_ns
        self.kick: Callable[[], None] = lambda: None  # set by the loop adapter
        self._outq: deque[Packed] = deque()  # a DEALER's backlog
        self._peerq: dict[bytes, deque[Packed]] = {}  # a ROUTER's, per peer (non-empty only)
        self._peerq_bytes: dict[bytes, int] = {}  # and their bytes
        self._budget = batch_budget(limits)  # a batch must pass the peer's limits (assumed to be ours)
        self._queued = 0
        # Received, not yet handed over: the rest of a batch (see _deliver_unread).
        self._unread: deque[tuple[bytes, Message | RemoteProtocolError]] = deque()
        self._draining = False
        self._fd = cast(int, socket.getsockopt(zmq.FD))
        self._send_frame = _frame_sender(socket)
        self.received = 0
        self.sent = 0
        self.bad_messages = 0
        self.unroutable = 0
        self._closed = False

    def fileno(self) -> int:
        """The socket's ZMQ_FD (edge-triggered; poll it for reading only)."""
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    def _events(self) -> int:
        return cast(int, self.socket.getsockopt(_EVENTS))

    def pending_input(self) -> bool:
        """Whether ``drain()`` has work now: a message to receive, or room to
        send the backlog (reads ZMQ_EVENTS, which may consume the fd's edge)."""
        if self._closed:
            return False
        if self._unread:
            return True
        events = self._events()
        if events & _POLLIN:
            return True
        if not (self._queued and events & _POLLOUT):
            return False
        if not self.router:
            return True
        # A ROUTER shows room when *any* peer has some, so a backlog for a full
        # peer would look like work at every probe (and busy polling would
        # spin).  Send what goes now instead (a full peer costs one refused
        # frame): this read may have consumed the edge that says room
        # appeared, and nothing else would act on it.
        sent = self.sent
        self.flush()
        return self.sent != sent

    # -- sending ------------------------------------------------------------

    def send(self, msg: Message, identity: bytes | None = None, *, defer: bool = False,
             immediately: bool = False) -> None:
        """Queue ``msg`` (to ``identity`` on a ROUTER) and send what the socket takes.

        With ``defer``, only queue it and kick the loop: messages sent in a
        burst then go to the socket together, at the loop's next turn.
        Messages sent by handlers during a ``drain()`` leave together at its
        end, unless ``immediately``: a handler about to wait for the answer
        (a blocking call in a completion callback) needs it sent now."""
        packed = pack(msg)
        budget = self._budget
        if len(packed[0]) > budget.unchecked_item_bytes or (
                packed[1] is not None and len(packed[1]) > budget.max_payload_bytes):
            check_sendable(msg.KIND, *packed, self.limits)
        if self.router:
            if identity is None:
                raise LocalProtocolError("a ROUTER channel needs the peer's identity to send")
            q = self._peerq.get(identity)
            if q is None:
                q = self._peerq[identity] = deque()
                self._peerq_bytes[identity] = 0
            self._peerq_bytes[identity] += len(packed[0]) + (len(packed[1]) if packed[1] is not None else 0)
        else:
            q = self._outq
        q.append(packed)
        self._queued += 1
        if self._draining and not immediately:
            return  # replies go out together, in one batch, at the end of drain()
        if not defer:
            self.flush()
        elif len(q) == 1:
            # Deferred: drain() flushes at its end.  Kicked for the first
            # message of *this* queue: another peer's backlog (a full peer
            # waiting for room) must not hold this one back.
            self.kick()

    def _send_queue(self, q: deque[Packed], identity: bytes | None) -> None:
        """Send ``q`` as batches (one ZeroMQ message each) until the socket refuses."""
        send = self._send_frame
        while q:
            if identity is not None:
                # The peer's identity first: a full peer refuses it at once,
                # before a batch is encoded for nothing (a ROUTER retries a
                # full peer's backlog whenever it looks for room); once it is
                # taken, ZeroMQ takes the rest of the message too.
                try:
                    send(identity, _NOBLOCK_SNDMORE, True)
                except zmq.Again:
                    return
                except zmq.ZMQError as exc:
                    if exc.errno != zmq.EHOSTUNREACH:
                        raise
                    self.unroutable += len(q)  # the peer is gone: drop its messages
                    self._queued -= len(q)
                    q.clear()
                    self._peerq_bytes[identity] = 0
                    return
            if len(q) == 1:
                n, batch = 1, [q[0]]
            else:
                n = batch_length(q, self._budget)
                batch = list(islice(q, n))
            try:
                _send_frames(send, encode_batch(batch))
            except zmq.Again:  # a DEALER's (a ROUTER's peer took the identity: the rest goes)
                return
            for _ in range(n):
                item, payload = q.popleft()
                if identity is not None:
                    self._peerq_bytes[identity] -= len(item) + (len(payload) if payload is not None else 0)
            self._queued -= n
            self.sent += n

    def flush(self) -> None:
        """Send queued messages until the socket refuses; then re-check input."""
        first = True
        while not self._closed:
            before = self.sent
            if self.router:
                for identity, q in list(self._peerq.items()):
                    self._send_queue(q, identity)
                    if not q:
                        del self._peerq[identity]
                        del self._peerq_bytes[identity]
            else:
                self._send_queue(self._outq, None)
            # This read may consume the fd's edge, for input as for room to
            # send: act on both now, since the fd will not say it again.
            events = self._events()
            if self._queued and events & _POLLOUT and (first or self.sent != before):
                # Room appeared meanwhile: send more.  Only while that works:
                # a ROUTER shows POLLOUT when *any* peer has room.
                first = False
                continue
            if events & _POLLIN:
                self.kick()
            return

    def discard_backlog(self, identity: bytes) -> int:
        """Drop what waits to be sent to ``identity`` (ROUTER): a peer gone for
        good, whose successor under the same identity must not get it.  How
        many messages that was (counted as unroutable)."""
        q = self._peerq.pop(identity, None)
        self._peerq_bytes.pop(identity, None)
        if not q:
            return 0
        self._queued -= len(q)
        self.unroutable += len(q)
        return len(q)

    @property
    def backlog(self) -> int:
        """Messages waiting for the socket to accept them."""
        return self._queued

    def peer_backlog(self, identity: bytes) -> tuple[int, int]:
        """The messages waiting to be sent to ``identity`` (ROUTER), and their bytes."""
        q = self._peerq.get(identity)
        if not q:
            return 0, 0
        return len(q), self._peerq_bytes[identity]

    # -- receiving -----------------------------------------------------------

    def drain(self) -> int:
        """Receive and deliver up to ``batch`` messages; kick if more remain.
        Returns how many were delivered.  Call when the fd is readable.

        Messages sent by the handlers meanwhile are flushed together at the
        end: one burst to the socket and one ZMQ_EVENTS read, not one per reply.
        A handler may run a nested loop that drains this channel again: the
        messages still come in order (the rest of a batch waits in ``_unread``,
        which every drain empties first).
        """
        if self._closed:
            return 0
        outer = self._draining
        self._draining = True
        try:
            delivered = self._drain_batch()
        except BaseException:
            # A handler raised: the edge was consumed, so come back for the
            # rest, and send what the batch produced; then let it propagate.
            self._draining = outer
            if not self._closed:
                self.kick()
                if self._queued:
                    self.flush()
            raise
        self._draining = outer
        if self._queued and not self._closed:
            self.flush()
        return delivered

    def _drain_batch(self) -> int:
        sock = self.socket
        delivered = self._deliver_unread() if self._unread else 0
        if self._closed:  # by a handler
            return delivered
        while delivered < self.batch:
            events = self._events()
            if not events & _POLLIN:
                return delivered
            try:
                frames = _recv_frames(sock)
            except zmq.Again:
                return delivered
            delivered += self._deliver(frames)
            if self._closed:
                return delivered
        events = self._events()
        if events & _POLLIN or (self._queued and events & _POLLOUT):
            self.kick()  # more to do: come back after the rest of the loop had a turn
        return delivered

    def _deliver(self, frames: list[bytes]) -> int:
        """Decode one ZeroMQ message and hand over what it carries; how many
        messages that was (good or bad)."""
        identity = b""
        if self.router:
            if not frames:
                return 0
            identity, frames = frames[0], frames[1:]
        try:
            results = decode_batch(frames, self.limits)
        except RemoteProtocolError as exc:
            results = [exc]
        if len(results) == 1 and not self._unread:
            self._hand_over(identity, results[0])
            return 1
        self._unread.extend([(identity, r) for r in results])
        return self._deliver_unread()

    def _deliver_unread(self) -> int:
        """Hand over the messages waiting in ``_unread``, in order; how many.
        A handler that raises leaves the rest there for the next drain."""
        unread = self._unread
        half = t0 = -1
        if len(unread) >= SPLIT_BATCH_MIN:
            half, t0 = len(unread) // 2, self._clock_ns()
        n = 0
        while unread and not self._closed:
            if n == half and self._queued and self._clock_ns() - t0 > SPLIT_AFTER_NS:
                # The first half took long enough that the peer should not wait
                # for the second: its replies leave now, and the two sides work
                # in parallel instead of taking turns.
                self.flush()
            identity, result = unread.popleft()
            n += 1
            self._hand_over(identity, result)
        return n

    def _hand_over(self, identity: bytes, result: Message | RemoteProtocolError) -> None:
        if isinstance(result, RemoteProtocolError):
            self.bad_messages += 1
            if self.on_error is not None:
                self.on_error(identity, result)
        else:
            self.received += 1
            self.on_message(identity, result)

    def close(self, linger_ms: int = LINGER_MS) -> None:
        """Close the socket; what it has not sent is dropped (LINGER 0: nothing
        waits) unless ``linger_ms`` gives it that long, in ``zmq_ctx_term``,
        to leave.  Idempotent."""
        if not self._closed:
            self._closed = True
            self._outq.clear()
            self._peerq.clear()
            self._peerq_bytes.clear()
            self._queued = 0
            self._unread.clear()
            self.socket.close(linger=linger_ms)
