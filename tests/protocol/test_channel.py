"""The ZeroMQ channel under stress: bursts and interleaved sends and receives
over real ``ipc://`` sockets, in both loops, lose nothing.

ZMQ_FD is edge-triggered (see ``protocol/_channel.py``): every ``send``,
``recv`` or read of ``ZMQ_EVENTS`` may consume the edge that announces input
(or room to send).  These tests drive the channel through the situations where
an edge can be lost and check that every message still arrives exactly once,
in order, within a generous deadline:

* a ROUTER served by a MainContext and DEALERs each served by an AioContext
  in its own thread, all bursting while the router answers from inside its
  ``on_message`` (a send during a drain, with more input queued);
* both ends in one thread (one MainContext, or one AioContext), pumped until
  everything was delivered;
* input that arrived while the receiver was sending (the send consumed the
  edge; ``flush`` must kick);
* garbage from a raw ZeroMQ peer (counted, reported, dropped; the channel
  keeps working);
* ``batch`` fairness: a drain delivers at most ``batch`` messages and kicks;
* room to send: ZMQ_FD also announces that a full pipe has room again, and
  a ZMQ_EVENTS read takes that edge too (a busy-poll probe, the read after a
  send, the read that ends a batch); a backlog must still drain, and a
  ROUTER's backlog for one full peer must neither spin nor hold up the others.

No test sleeps: waits are loop iterations or ``select`` on the ZMQ_FD, all
bounded by a deadline.
"""

from __future__ import annotations

import select
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any, cast

import msgpack
import pytest
import zmq

from iothreads import AioContext, BottomHalf, ChannelHandler
from iothreads.testing import LoopThread, poll_until, run_until_idle
from mainloop import ChannelSource, MainContext
from protocol import (
    BlockCompletion,
    BlockRequest,
    Channel,
    Heartbeat,
    Limits,
    LocalProtocolError,
    Message,
    Query,
    QueryReply,
    RemoteProtocolError,
    channel_socket,
    decode,
    decode_batch,
    encode,
    encode_batch,
    pack,
    ipc_endpoint,
    make_runtime_dir,
)

DEADLINE_S = 20.0
"""Generous bound on any wait: a stalled channel fails the test instead of hanging it."""

TICK_MS = 10
"""Period of the tick that keeps a blocking loop iteration from waiting forever."""

TICK_NS = TICK_MS * 1_000_000
"""The same as a blocking AioContext poll's timeout: ``ctx.poll(True, TICK_NS)``."""


def _raise(owner: object, exc: Exception, where: str) -> None:
    """Exception handler: a callback's exception leaves the loop and fails the test."""
    raise exc


# -- fixtures -------------------------------------------------------------------


@pytest.fixture
def runtime_dir() -> Iterator[str]:
    """A short private directory for the socket files, removed afterwards."""
    path = make_runtime_dir(prefix="evlch")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    """The test's own ZeroMQ context; every socket must be closed by the test."""
    c: zmq.Context[Any] = zmq.Context()
    yield c
    c.term()


@pytest.fixture
def main_context() -> Iterator[MainContext]:
    """A MainContext that re-raises its sources' exceptions."""
    c = MainContext("channel-test")
    c.set_exception_handler(_raise)
    yield c
    c.close()


# -- helpers --------------------------------------------------------------------


def router_channel(zctx: zmq.Context[Any], endpoint: str, on_message: Callable[[bytes, Message], object],
                   **kwargs: Any) -> Channel:
    """A ROUTER channel bound at ``endpoint``."""
    sock = zctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    return Channel(sock, on_message, **kwargs)


def dealer_channel(zctx: zmq.Context[Any], endpoint: str, identity: bytes,
                   on_message: Callable[[bytes, Message], object], **kwargs: Any) -> Channel:
    """A DEALER channel with ``identity``, connected to ``endpoint``."""
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return Channel(sock, on_message, **kwargs)


def wait_readable(fd: int, deadline: float) -> None:
    """Block until ``fd`` polls readable (the ZMQ_FD fired), at most until ``deadline``."""
    timeout_s = max(0.0, deadline - time.monotonic())
    assert select.select([fd], [], [], timeout_s)[0], f"fd {fd} never became readable"


def drain_until(channel: Channel, done: Callable[[], bool], what: str, deadline: float | None = None) -> None:
    """``drain()`` a channel served by no loop until ``done()``, waiting on its fd
    when a drain found nothing; at most until ``deadline`` (``DEADLINE_S`` from now)."""
    end = time.monotonic() + DEADLINE_S if deadline is None else deadline

    def step() -> None:
        if not channel.drain():
            wait_readable(channel.fileno(), end)

    poll_until(step, done, what, end - time.monotonic())


def zmq_events(channel: Channel) -> int:
    """The channel's socket's ZMQ_EVENTS (reading it processes libzmq's commands)."""
    return cast(int, channel.socket.getsockopt(zmq.EVENTS))


def fd_readable(fd: int) -> bool:
    """Whether ``fd`` polls readable right now (does not touch the socket's state)."""
    return bool(select.select([fd], [], [], 0)[0])


def iterate_until(context: MainContext, done: Callable[[], bool], what: str | Callable[[], str],
                  deadline_s: float = DEADLINE_S, progress: Callable[[], int] | None = None,
                  stall_s: float = 2.0) -> None:
    """Blocking iterations of ``context`` until ``done()``, with the bounds of
    ``poll_until`` (``progress``, a counter, must not stand still for ``stall_s``).

    A timeout source ticks every ``TICK_MS`` so that a stalled channel (an
    edge lost for good) shows up as a failed assertion, not a hang.
    """
    tick = context.timeout_add(TICK_MS, lambda: True, name="test tick")
    try:
        poll_until(lambda: context.iteration(True), done, what, deadline_s,
                   progress=progress, stall_s=stall_s if progress is not None else None)
    finally:
        context.source_remove(tick)


class Echo:
    """A ROUTER's ``on_message``: checks per-peer order, answers every Heartbeat
    at once (a send from inside the drain, while more input may be queued)."""

    def __init__(self) -> None:
        self.channel: Channel | None = None
        self.seen: dict[bytes, list[int]] = defaultdict(list)
        self.total = 0

    def __call__(self, identity: bytes, msg: Message) -> None:
        assert isinstance(msg, Heartbeat), msg
        seen = self.seen[identity]
        assert msg.seq == len(seen), f"from {identity!r}: got seq {msg.seq} after {len(seen)} messages"
        seen.append(msg.seq)
        self.total += 1
        assert self.channel is not None
        self.channel.send(Heartbeat(msg.seq, msg.sent_ns), identity)


# -- 1. a ROUTER in a MainContext, DEALERs in iothreads ----------------------------


class ThreadPeer:
    """A DEALER channel served by the AioContext of a LoopThread.

    Everything but ``done`` and the counters is touched only in the loop
    thread: the socket is created there (a ZeroMQ socket belongs to one thread).
    Sends go out in bursts of ``chunk`` from a bottom half that reschedules
    itself, so the peer receives replies between its bursts.
    """

    def __init__(self, thread: LoopThread, zctx: zmq.Context[Any], endpoint: str, identity: bytes,
                 count: int, chunk: int) -> None:
        self.thread = thread
        self.identity = identity
        self.count = count
        self.chunk = chunk
        self.next_seq = 0
        self.replies: list[int] = []
        self.done = threading.Event()
        self.errors: list[str] = []

        def setup() -> tuple[Channel, ChannelHandler, BottomHalf]:
            ctx = thread.ctx
            ctx.set_exception_handler(_raise)
            channel = dealer_channel(zctx, endpoint, identity, self.on_message)
            handler = ChannelHandler(ctx, channel, f"peer-{identity.decode()}")
            return channel, handler, ctx.bh_new(self.burst, "burst")

        self.channel, self.handler, self.burst_bh = thread.run_sync(setup)

    def start(self) -> None:
        """Begin bursting (any thread)."""
        self.burst_bh.schedule()

    def burst(self) -> None:
        end = min(self.next_seq + self.chunk, self.count)
        for seq in range(self.next_seq, end):
            self.channel.send(Heartbeat(seq, 0))
        self.next_seq = end
        if end < self.count:
            self.burst_bh.schedule()

    def on_message(self, identity: bytes, msg: Message) -> None:
        if not isinstance(msg, Heartbeat) or msg.seq != len(self.replies):
            self.errors.append(f"{self.identity!r}: unexpected {msg!r} after {len(self.replies)} replies")
            return
        self.replies.append(msg.seq)
        if len(self.replies) == self.count:
            self.done.set()

    def close(self) -> None:
        """Delete the bottom half and close the channel, in the loop thread."""

        def close() -> None:
            self.burst_bh.delete()
            self.handler.close()

        self.thread.run_sync(close)


@pytest.mark.parametrize("peers,count,chunk", [(4, 3000, 500), (2, 5000, 5000)])
def test_router_in_main_context_dealers_in_iothreads(
    runtime_dir: str, zctx: zmq.Context[Any], main_context: MainContext, peers: int, count: int, chunk: int,
) -> None:
    """N DEALERs, each in its own iothread, burst ``count`` messages; the ROUTER
    (a MainContext source in this thread) echoes each from its ``on_message``.
    Every message arrives once, in per-peer order, both ways."""
    endpoint = ipc_endpoint(runtime_dir, "router")
    echo = Echo()
    router = echo.channel = router_channel(zctx, endpoint, echo)
    source = ChannelSource(router, "router")
    main_context.attach(source)
    threads: list[LoopThread] = []
    clients: list[ThreadPeer] = []
    try:
        for i in range(peers):
            threads.append(LoopThread(f"peer{i}"))
            clients.append(ThreadPeer(threads[-1], zctx, endpoint, f"p{i}".encode(), count, chunk))
        for c in clients:
            c.start()
        iterate_until(main_context, lambda: all(c.done.is_set() or c.errors for c in clients),
                      "every peer's replies")
        assert [c.errors for c in clients] == [[]] * peers
        for c in clients:
            assert c.replies == list(range(count))
            assert echo.seen[c.identity] == list(range(count))
            assert c.channel.sent == c.channel.received == count
            assert c.channel.backlog == 0 and c.channel.bad_messages == 0
        assert echo.total == router.received == router.sent == peers * count
        assert router.backlog == router.bad_messages == router.unroutable == 0
    finally:
        for c in clients:
            c.close()
        for t in threads:
            t.stop()
        source.destroy()  # closes the router
    assert router.closed


# -- 2. both ends in one thread ------------------------------------------------------


class LocalPeer:
    """A DEALER in the same thread as the router: bursts ``count`` Heartbeats in
    chunks, sending the next chunk from inside its own ``on_message`` (a send
    during a drain) whenever a reply arrives and the window allows."""

    def __init__(self, count: int, window: int) -> None:
        self.count = count
        self.window = window
        self.next_seq = 0
        self.replies: list[int] = []
        self.channel: Channel | None = None

    def pump(self) -> None:
        assert self.channel is not None
        end = min(self.count, len(self.replies) + self.window)
        while self.next_seq < end:
            self.channel.send(Heartbeat(self.next_seq, 0))
            self.next_seq += 1

    def __call__(self, identity: bytes, msg: Message) -> None:
        assert isinstance(msg, Heartbeat) and msg.seq == len(self.replies), msg
        self.replies.append(msg.seq)
        self.pump()


def _attach_main(context: MainContext, channels: list[Channel]) -> Callable[[Callable[[], bool], str], object]:
    for i, ch in enumerate(channels):
        context.attach(ChannelSource(ch, f"ch{i}"))
    return lambda done, what: iterate_until(context, done, what)


def _attach_aio(ctx: AioContext, channels: list[Channel]) -> tuple[Callable[[Callable[[], bool], str], object],
                                                                  list[ChannelHandler]]:
    handlers = [ChannelHandler(ctx, ch, f"ch{i}") for i, ch in enumerate(channels)]
    return (lambda done, what: poll_until(lambda: ctx.poll(True, TICK_NS), done, what, DEADLINE_S)), handlers


@pytest.mark.parametrize("loop", ["main", "aio"])
@pytest.mark.parametrize("window", [64, 4000])
def test_one_thread_burst_and_echo(runtime_dir: str, zctx: zmq.Context[Any], main_context: MainContext,
                                   ctx: AioContext, loop: str, window: int) -> None:
    """A ROUTER and 3 DEALERs served by one loop in one thread: the dealers keep
    ``window`` messages in flight (``4000`` overflows the high-water marks, so
    sends queue in the channels and wait for room), the router echoes from
    ``on_message``, the dealers send more from theirs.  Pumped until done,
    every message went through exactly once, in order."""
    count = 4000
    endpoint = ipc_endpoint(runtime_dir, "router")
    echo = Echo()
    router = echo.channel = router_channel(zctx, endpoint, echo)
    peers = [LocalPeer(count, window) for _ in range(3)]
    dealers = []
    for i, p in enumerate(peers):
        p.channel = dealer_channel(zctx, endpoint, f"d{i}".encode(), p)
        dealers.append(p.channel)
    handlers: list[ChannelHandler] = []
    try:
        if loop == "main":
            run = _attach_main(main_context, [router, *dealers])
        else:
            run, handlers = _attach_aio(ctx, [router, *dealers])
        for p in peers:
            p.pump()
        run(lambda: all(len(p.replies) == count for p in peers), "every reply")
        for i, p in enumerate(peers):
            assert p.replies == list(range(count))
            assert echo.seen[f"d{i}".encode()] == list(range(count))
        assert router.received == router.sent == 3 * count
        assert all(d.sent == d.received == count and d.backlog == 0 for d in dealers)
    finally:
        for h in handlers:
            h.close()
        for ch in [router, *dealers]:
            ch.close()  # idempotent; the MainContext's sources close theirs too


# -- 3. input that arrives while the receiver sends ------------------------------------


@pytest.mark.parametrize("loop", ["main", "aio"])
def test_input_announced_during_a_send_is_not_lost(runtime_dir: str, zctx: zmq.Context[Any],
                                                     main_context: MainContext, ctx: AioContext,
                                                     loop: str) -> None:
    """A message arrives (the ZMQ_FD fires) while the receiver is busy sending:
    its ``send`` processes libzmq's commands and consumes the fd's edge, so
    the fd will not announce that message again.  ``flush`` sees the pending
    input and kicks: the very next non-blocking iteration delivers it, with
    no new fd event."""
    endpoint = ipc_endpoint(runtime_dir, "router")
    got: list[int] = []
    router = router_channel(zctx, endpoint, lambda ident, msg: got.append(msg.seq))  # type: ignore[attr-defined]
    dealer = dealer_channel(zctx, endpoint, b"d", lambda ident, msg: None)
    handlers: list[ChannelHandler] = []
    try:
        if loop == "main":
            main_context.attach(ChannelSource(router, "router"))

            def step() -> None:
                main_context.iteration(False)
        else:
            handlers.append(ChannelHandler(ctx, router, "router"))

            def step() -> None:
                ctx.poll(False)
        kicks = 0
        adapter_kick = router.kick

        def kick() -> None:
            nonlocal kicks
            kicks += 1
            adapter_kick()

        router.kick = kick
        deadline = time.monotonic() + DEADLINE_S
        # The dealer must be known to the router before the router can send to it.
        dealer.send(Heartbeat(0, 0))

        def wait_and_step() -> None:
            wait_readable(router.fileno(), deadline)
            step()

        poll_until(wait_and_step, lambda: got, "the first message", deadline - time.monotonic())
        edge_consumed = 0
        rounds = 50
        for seq in range(1, rounds + 1):
            dealer.send(Heartbeat(seq, 0))
            wait_readable(router.fileno(), deadline)  # the message is announced...
            before = kicks
            for _ in range(3):  # ... and the router is busy sending meanwhile
                router.send(Query(seq), b"d")
            if not fd_readable(router.fileno()):
                edge_consumed += 1  # no fd event will ever announce `seq` now
                assert kicks > before, "the send consumed the edge and nobody kicked"
            step()  # one non-blocking iteration, no new fd event
            assert got[-1] == seq, f"message {seq} was not delivered by the kicked iteration"
        assert got == list(range(rounds + 1))
        # The scenario did happen (a send processed the mailbox), in most rounds.
        assert edge_consumed > 0
    finally:
        for h in handlers:
            h.close()
        router.close()
        dealer.close()


# -- 4. garbage from a raw peer ----------------------------------------------------------


_VALID = encode(Heartbeat(1, 2))

GARBAGE: dict[str, list[bytes]] = {
    "not msgpack": [b"garbage"],
    "truncated header": [_VALID[0][:-3]],
    "empty frame": [b""],
    "unknown kind": [msgpack.packb([1, "no-such-kind", {}])],
    "extra frame": [_VALID[0], b"payload for a kind without one"],
    "wrong field type": [msgpack.packb([1, "heartbeat", {"seq": "one", "sent_ns": 2}])],
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_from_a_raw_dealer(runtime_dir: str, zctx: zmq.Context[Any], main_context: MainContext,
                                   name: str) -> None:
    """A plain zmq.DEALER sends garbage to a ROUTER channel: ``on_error`` gets
    the peer's identity and a RemoteProtocolError, ``bad_messages`` counts it,
    nothing raises into the loop, and the next valid message is delivered."""
    endpoint = ipc_endpoint(runtime_dir, "router")
    got: list[tuple[bytes, Message]] = []
    errors: list[tuple[bytes, RemoteProtocolError]] = []
    router = router_channel(zctx, endpoint, lambda i, m: got.append((i, m)),
                            on_error=lambda i, e: errors.append((i, e)))
    main_context.attach(ChannelSource(router, "router"))
    raw = zctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.IDENTITY, b"raw")
    try:
        raw.connect(endpoint)
        raw.send_multipart(GARBAGE[name])
        raw.send_multipart(_VALID)
        iterate_until(main_context, lambda: bool(got), "the valid message")
        assert len(errors) == 1 and errors[0][0] == b"raw"
        assert isinstance(errors[0][1], RemoteProtocolError)
        assert router.bad_messages == 1 and router.received == 1
        assert got == [(b"raw", Heartbeat(1, 2))]
        # The channel still answers the peer that sent garbage.
        router.send(Heartbeat(3, 4), b"raw")
        assert raw.poll(int(DEADLINE_S * 1000)) and raw.recv_multipart() == encode(Heartbeat(3, 4))
    finally:
        raw.close()


def test_garbage_from_a_raw_router(runtime_dir: str, zctx: zmq.Context[Any], ctx: AioContext) -> None:
    """The other way round: a raw zmq.ROUTER sends a truncated header, then a
    valid message, to a DEALER channel served by an AioContext."""
    endpoint = ipc_endpoint(runtime_dir, "raw")
    raw = raw_router(zctx, endpoint)
    got: list[Message] = []
    errors: list[tuple[bytes, RemoteProtocolError]] = []
    dealer = dealer_channel(zctx, endpoint, b"d", lambda i, m: got.append(m),
                            on_error=lambda i, e: errors.append((i, e)))
    handler = ChannelHandler(ctx, dealer, "dealer")
    try:
        dealer.send(Heartbeat(0, 0))  # introduce ourselves
        assert raw.poll(int(DEADLINE_S * 1000))
        assert raw.recv_multipart() == [b"d", *encode(Heartbeat(0, 0))]
        raw.send_multipart([b"d", _VALID[0][:-1]])
        raw.send_multipart([b"d", b"\xc1"])  # msgpack's "never used" byte
        raw.send_multipart([b"d", *_VALID])
        poll_until(lambda: ctx.poll(True, TICK_NS), lambda: bool(got), "the valid message", DEADLINE_S)
        assert [i for i, _ in errors] == [b"", b""]
        assert all(isinstance(e, RemoteProtocolError) for _, e in errors)
        assert dealer.bad_messages == 2 and dealer.received == 1 and got == [Heartbeat(1, 2)]
    finally:
        handler.close()
        raw.close()


# -- 5. batch fairness ---------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["main", "aio"])
def test_a_drain_delivers_at_most_batch_and_kicks(runtime_dir: str, zctx: zmq.Context[Any],
                                                 main_context: MainContext, ctx: AioContext,
                                                 loop: str) -> None:
    """With ``batch=4`` and 100 messages queued, one ``drain()`` delivers 4 and
    kicks (more input remains, and the fd will not say so); the loop then
    delivers the rest, 4 per drain, in order."""
    endpoint = ipc_endpoint(runtime_dir, "router")
    got: list[int] = []
    # The dealer connects first and queues all 100 before the router exists:
    # once connected, they cross in one write, so all are queued at the
    # router when its fd first fires.
    raw = zctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RECONNECT_IVL, 10)
    raw.setsockopt(zmq.IDENTITY, b"raw")
    raw.connect(endpoint)
    for seq in range(100):
        raw.send_multipart(encode(Heartbeat(seq, 0)))
    router = router_channel(zctx, endpoint, lambda i, m: got.append(m.seq), batch=4)  # type: ignore[attr-defined]
    handler: ChannelHandler | None = None
    try:
        kicks: list[int] = []
        router.kick = lambda: kicks.append(len(got))
        deadline = time.monotonic() + DEADLINE_S
        # The first events are the connection's; wait for the messages.
        poll_until(lambda: wait_readable(router.fileno(), deadline), router.pending_input, "the messages",
                   DEADLINE_S)
        assert router.drain() == 4
        assert got == [0, 1, 2, 3]
        assert kicks == [4], "a drain that stopped at its batch with input left must kick"

        # Served by a loop, the kick brings the drain back until all is delivered.
        drains: list[int] = []
        drain = router.drain

        def counted() -> int:
            n = drain()
            drains.append(n)
            return n

        router.drain = counted  # type: ignore[method-assign]
        if loop == "main":
            main_context.attach(ChannelSource(router, "router"))
            iterate_until(main_context, lambda: len(got) == 100, "all 100 messages")
        else:
            handler = ChannelHandler(ctx, router, "router")
            poll_until(lambda: ctx.poll(True, TICK_NS), lambda: len(got) == 100, "all 100 messages",
                       DEADLINE_S)
        assert got == list(range(100))
        assert max(drains) == 4
        assert sum(drains) == 96 and len([n for n in drains if n]) == 24
    finally:
        if handler is not None:
            handler.close()
        router.close()
        raw.close()


# -- 6. room to send: the writable edge ----------------------------------------------------
#
# ZMQ_FD also fires when a full pipe gets room again (libzmq's "activate_write"
# command), and reading ZMQ_EVENTS consumes that edge just like an input edge:
# whoever reads ZMQ_EVENTS must act on POLLOUT with a backlog as on POLLIN.


def test_busy_poll_probe_does_not_swallow_room_to_send(runtime_dir: str, zctx: zmq.Context[Any],
                                                       ctx: AioContext) -> None:
    """Deterministic: a DEALER's backlog waits for room; the peer reads
    everything and libzmq announces room (the fd fires); then busy polling
    probes the channel (``pending_input``, the ``io_poll`` that
    ChannelHandler registers) before the fd is dispatched.  The probe reads
    ZMQ_EVENTS, which takes the edge; the backlog must still move."""
    endpoint = ipc_endpoint(runtime_dir, "router")
    got: list[int] = []
    router = router_channel(zctx, endpoint, lambda i, m: got.append(m.seq))  # type: ignore[attr-defined]
    dealer = dealer_channel(zctx, endpoint, b"d", lambda i, m: None)
    handler = ChannelHandler(ctx, dealer, "dealer")
    try:
        run_until_idle(ctx)  # the handler's first drain
        # Far past the high-water marks, with the router reading nothing: the
        # channel sends what the socket takes, the rest waits in its backlog.
        for seq in range(20_000):
            dealer.send(Heartbeat(seq, 0))
        assert dealer.backlog > 0
        deadline = time.monotonic() + DEADLINE_S
        # The router (served by no loop: batches of 256, nobody to kick) reads all that went out.
        drain_until(router, lambda: len(got) >= dealer.sent, "the router to read everything", deadline)
        wait_readable(dealer.fileno(), deadline)  # libzmq announces room to send
        sent = dealer.sent
        if dealer.pending_input():  # busy polling: the probe (io_poll) ...
            dealer.drain()  # ... and, when it finds work, io_poll_ready
        run_until_idle(ctx)  # then the loop runs whatever is due: nothing is
        assert dealer.sent > sent, (
            f"room to send was announced, then consumed by the probe: {dealer.backlog} messages "
            f"wait for ever, with ZMQ_EVENTS={zmq_events(dealer)} (POLLOUT=2)")
    finally:
        handler.close()
        router.close()


def test_one_way_burst_through_small_high_water_marks(runtime_dir: str, zctx: zmq.Context[Any],
                                                      main_context: MainContext) -> None:
    """A DEALER in an iothread bursts 3 x 2000 messages, one way, through
    high-water marks of 10 to a ROUTER in a MainContext that only reads.
    The sender's backlog drains only as ZMQ_FD announces room, and the
    ZMQ_EVENTS read after each send may be the one that takes the
    announcement; with no replies coming back, nothing else wakes the
    sender.  Every message must arrive."""
    endpoint = ipc_endpoint(runtime_dir, "router")
    got: list[int] = []
    rsock = zctx.socket(zmq.ROUTER)
    rsock.setsockopt(zmq.RCVHWM, 10)
    rsock.bind(endpoint)
    router = Channel(rsock, lambda i, m: got.append(m.seq))  # type: ignore[attr-defined]
    source = ChannelSource(router, "router")
    main_context.attach(source)
    count = 2000
    thread = LoopThread("sender")

    def setup() -> tuple[Channel, ChannelHandler]:
        thread.ctx.set_exception_handler(_raise)
        sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 10)
        sock.setsockopt(zmq.IDENTITY, b"d")
        sock.connect(endpoint)
        channel = Channel(sock, lambda i, m: None)
        return channel, ChannelHandler(thread.ctx, channel, "sender")

    try:
        dealer, handler = thread.run_sync(setup)
        for burst in range(3):
            base = burst * count

            def send_burst() -> None:
                for seq in range(base, base + count):
                    dealer.send(Heartbeat(seq, 0))

            thread.run_sync(send_burst)
            iterate_until(main_context, lambda: len(got) == base + count,
                          lambda: (f"burst {burst}: {base + count} messages; the router got {len(got)}, "
                                   f"the sender sent {dealer.sent} and has {dealer.backlog} waiting"),
                          progress=lambda: len(got), stall_s=1.0)
        assert got == list(range(3 * count))
    finally:
        thread.run_sync(handler.close)
        thread.stop()
        source.destroy()


# Regression test for a fixed bug: protocol/_channel.py: drain() that stops at its batch re-reads ZMQ_EVENTS but kicks on
#   POLLIN only; when that read takes the edge announcing room for the backlog, nothing sends
#   it again


def test_room_announced_during_the_last_message_of_a_batch(runtime_dir: str, zctx: zmq.Context[Any],
                                                           ctx: AioContext) -> None:
    """Deterministic: a DEALER with a backlog (``batch=1``) drains its one
    message; while that message is being handled, the peer reads everything
    and libzmq announces room.  The ZMQ_EVENTS read that ends the batch takes
    the announcement: it must lead to a flush (a kick), since the fd will
    not fire for it again."""
    endpoint = ipc_endpoint(runtime_dir, "router")
    got: list[int] = []
    router = router_channel(zctx, endpoint, lambda i, m: got.append(m.seq))  # type: ignore[attr-defined]
    deadline = time.monotonic() + DEADLINE_S

    def on_message(identity: bytes, msg: Message) -> None:
        # Meanwhile the peer reads all that was sent, and room is announced.
        drain_until(router, lambda: len(got) >= dealer.sent, "the router to read everything", deadline)
        wait_readable(dealer.fileno(), deadline)

    dealer = dealer_channel(zctx, endpoint, b"d", on_message, batch=1)
    handler = ChannelHandler(ctx, dealer, "dealer")
    try:
        run_until_idle(ctx)
        for seq in range(20_000):  # far past the high-water marks: a backlog
            dealer.send(Heartbeat(seq, 0))
        assert dealer.backlog > 0
        router.send(Query(1), b"d")  # exactly one message for the dealer
        poll_until(lambda: wait_readable(dealer.fileno(), deadline), lambda: zmq_events(dealer) & zmq.POLLIN,
                   "the message for the dealer", deadline - time.monotonic())
        sent = dealer.sent
        assert dealer.drain() == 1  # as the loop would, for the fd
        run_until_idle(ctx)
        assert dealer.sent > sent, (
            f"room announced during the batch was taken by drain()'s last ZMQ_EVENTS read: "
            f"{dealer.backlog} messages wait for ever (ZMQ_EVENTS={zmq_events(dealer)})")
    finally:
        handler.close()
        router.close()


class CountingSocket:
    """A ZeroMQ socket behind a proxy that counts ZMQ_EVENTS reads and raises
    past ``limit``: a channel spinning on the socket fails the test instead
    of hanging it."""

    def __init__(self, sock: zmq.Socket[Any], limit: int) -> None:
        self._sock = sock
        self.limit = limit
        self.events_reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def getsockopt(self, option: int) -> Any:
        if option == zmq.EVENTS:
            self.events_reads += 1
            if self.events_reads > self.limit:
                raise RuntimeError(f"ZMQ_EVENTS read {self.events_reads} times: the channel is spinning")
        return self._sock.getsockopt(option)


# Regression test for a fixed bug: protocol/_channel.py: flush() retries while ZMQ_EVENTS shows POLLOUT with a backlog, but a
#   ROUTER (ROUTER_MANDATORY) shows POLLOUT when *any* peer has room: with one peer full and
#   another idle, send() never returns (the main loop hangs, BQL held)


def _router_with_a_full_and_an_idle_peer(
    zctx: zmq.Context[Any], endpoint: str,
) -> tuple[Channel, CountingSocket, zmq.Socket[Any], zmq.Socket[Any]]:
    """A ROUTER channel (behind a CountingSocket) that knows two raw DEALERs,
    ``a`` (never reads; small high-water marks) and ``b`` (idle)."""
    rsock = zctx.socket(zmq.ROUTER)
    rsock.setsockopt(zmq.SNDHWM, 10)
    rsock.bind(endpoint)
    proxy = CountingSocket(rsock, limit=1_000_000)
    router = Channel(proxy, lambda i, m: None)  # type: ignore[arg-type]
    peers = []
    for name in (b"a", b"b"):
        raw = zctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.setsockopt(zmq.RCVHWM, 10)
        raw.setsockopt(zmq.IDENTITY, name)
        raw.connect(endpoint)
        raw.send_multipart(encode(Heartbeat(0, 0)))
        peers.append(raw)
    drain_until(router, lambda: router.received >= 2, "both peers to be known to the router")
    proxy.limit = proxy.events_reads + 100_000
    return router, proxy, peers[0], peers[1]


def test_router_send_to_a_full_peer_returns(runtime_dir: str, zctx: zmq.Context[Any]) -> None:
    """A ROUTER channel sends 4 MiB to a peer that never reads while another
    peer has room: ``send`` must queue what the socket refuses and return."""
    router, proxy, a, b = _router_with_a_full_and_an_idle_peer(zctx, ipc_endpoint(runtime_dir, "router"))
    try:
        block = bytes(4096)
        for i in range(1024):
            router.send(BlockCompletion(i, 0, "", block), b"a")
        assert router.backlog > 0
    finally:
        router.close()
        a.close()
        b.close()


def test_a_backlog_for_a_peer_gone_for_good_can_be_dropped(runtime_dir: str, zctx: zmq.Context[Any]) -> None:
    """What waits for a peer that died must not go to its successor under the
    same identity (a restarted iothread): ``discard_backlog`` drops it."""
    router, proxy, a, b = _router_with_a_full_and_an_idle_peer(zctx, ipc_endpoint(runtime_dir, "router"))
    try:
        for i in range(1024):
            router.send(BlockCompletion(i, 0, "", bytes(4096)), b"a")
        backlog = router.backlog
        assert backlog > 0 and router.discard_backlog(b"b") == 0
        assert router.discard_backlog(b"a") == backlog and router.backlog == 0
        assert router.unroutable == backlog and router.discard_backlog(b"a") == 0
    finally:
        router.close()
        a.close()
        b.close()


def test_router_message_to_an_idle_peer_does_not_wait_behind_a_full_one(
    runtime_dir: str, zctx: zmq.Context[Any],
) -> None:
    """With a backlog for a peer that never reads, a message to another peer
    still goes out at once."""
    router, proxy, a, b = _router_with_a_full_and_an_idle_peer(zctx, ipc_endpoint(runtime_dir, "router"))
    try:
        block = bytes(4096)
        for i in range(1024):
            router.send(BlockCompletion(i, 0, "", block), b"a")
        router.send(Heartbeat(7, 7), b"b")
        assert b.poll(2000), "the message to the idle peer is stuck behind the full peer's backlog"
        assert b.recv_multipart() == encode(Heartbeat(7, 7))
    finally:
        router.close()
        a.close()
        b.close()


# -- 8. batches on the wire ------------------------------------------------------------------


def raw_router(zctx: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    """A plain zmq.ROUTER bound to ``endpoint`` (the test closes it)."""
    raw = zctx.socket(zmq.ROUTER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.bind(endpoint)
    return raw


def raw_dealer(zctx: zmq.Context[Any], endpoint: str, identity: bytes | None = None,
               rcvhwm: int = 0) -> zmq.Socket[Any]:
    """A plain zmq.DEALER connected to ``endpoint`` (the test closes it)."""
    raw = zctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        raw.setsockopt(zmq.IDENTITY, identity)
    if rcvhwm:
        raw.setsockopt(zmq.RCVHWM, rcvhwm)
    raw.connect(endpoint)
    return raw


def test_messages_queued_together_leave_as_one_batch(runtime_dir: str, zctx: zmq.Context[Any]) -> None:
    """50 deferred sends reach the peer as one ZeroMQ message: one header for
    all, the payloads after it in order; the ``batch`` limits of the codec cut
    longer queues into several messages."""
    endpoint = ipc_endpoint(runtime_dir, "raw")
    raw = raw_router(zctx, endpoint)
    dealer = dealer_channel(zctx, endpoint, b"d", lambda i, m: None, limits=Limits(max_container_len=16))
    try:
        kicks: list[int] = []
        dealer.kick = lambda: kicks.append(dealer.backlog)
        msgs = [BlockCompletion(i, 0, "", bytes([i]) * i) for i in range(50)]
        for m in msgs:
            dealer.send(m, defer=True)
        assert kicks == [1] and dealer.backlog == 50  # one kick; nothing sent yet
        dealer.flush()
        assert dealer.backlog == 0 and dealer.sent == 50
        got: list[Message] = []
        sizes = []
        while len(got) < 50:
            assert raw.poll(int(DEADLINE_S * 1000)), f"only {len(got)} arrived"
            frames = raw.recv_multipart()
            assert frames[0] == b"d"
            batch = decode_batch(frames[1:])
            sizes.append(len(batch))
            got += cast(list[Message], batch)
        assert got == msgs
        assert sizes == [16, 16, 16, 2]
    finally:
        dealer.close()
        raw.close()


def test_a_raising_handler_keeps_the_rest_of_its_batch(runtime_dir: str, zctx: zmq.Context[Any]) -> None:
    """A batch of 5; the handler raises on the 2nd: ``drain`` propagates it,
    and the next ``drain`` delivers the 3 left, in order, before new input."""
    endpoint = ipc_endpoint(runtime_dir, "router")
    got: list[int] = []

    def on_message(identity: bytes, msg: Message) -> None:
        got.append(cast(Heartbeat, msg).seq)
        if len(got) == 2:
            raise RuntimeError("handler failed")

    router = router_channel(zctx, endpoint, on_message)
    raw = raw_dealer(zctx, endpoint)
    try:
        raw.send_multipart(encode_batch([pack(Heartbeat(i, 0)) for i in range(5)]))
        raw.send_multipart(encode(Heartbeat(5, 0)))
        deadline = time.monotonic() + DEADLINE_S
        poll_until(lambda: wait_readable(router.fileno(), deadline), router.pending_input, "the batch",
                   DEADLINE_S)
        with pytest.raises(RuntimeError, match="handler failed"):
            router.drain()
        assert got == [0, 1]
        assert router.pending_input()  # the rest counts as input (a busy-poll probe sees it)

        def drain_and_wait() -> None:
            router.drain()
            if len(got) < 6:
                wait_readable(router.fileno(), deadline)

        poll_until(drain_and_wait, lambda: len(got) >= 6, lambda: f"all 6 messages: stranded after {got}",
                   deadline - time.monotonic())
        assert got == [0, 1, 2, 3, 4, 5]
    finally:
        router.close()
        raw.close()


def test_a_channel_handler_delivers_the_messages_queued_behind_a_raising_one(
        runtime_dir: str, zctx: zmq.Context[Any], ctx: AioContext) -> None:
    """Regression: served by an AioContext, a handler that raised left the
    messages queued behind its one stranded (the drain had taken the fd's
    edge, and nothing came back for them).  They are delivered, in order,
    and the exception goes to the context's exception handler."""
    endpoint = ipc_endpoint(runtime_dir, "r")
    got: list[int] = []
    errors: list[str] = []
    ctx.set_exception_handler(lambda c, exc, where: errors.append(str(exc)))

    def on_message(identity: bytes, msg: Message) -> None:
        got.append(cast(Heartbeat, msg).seq)
        if len(got) == 1:
            raise RuntimeError("handler failed")

    handler = ChannelHandler(ctx, router_channel(zctx, endpoint, on_message), "router")
    dealer = raw_dealer(zctx, endpoint)
    try:
        for i in range(3):
            dealer.send_multipart(encode(Heartbeat(i, 0)))
        poll_until(lambda: ctx.poll(True), lambda: len(got) >= 3, lambda: f"3 messages: stranded after {got}", 20)
        assert got == [0, 1, 2] and errors == ["handler failed"]
    finally:
        handler.close()
        dealer.close()


@pytest.mark.parametrize(("half_took_ns", "batches"), [(50_000, [16]), (150_000, [8, 8])])
def test_replies_to_a_slow_first_half_leave_early(runtime_dir: str, zctx: zmq.Context[Any],
                                                  half_took_ns: int, batches: list[int]) -> None:
    """A batch of 16 requests, each answered at once: the 16 replies leave as
    one batch, unless handling the first 8 took more than SPLIT_AFTER_NS (a
    fake clock says how long); then the first 8 leave before the second half."""
    endpoint = ipc_endpoint(runtime_dir, "router")
    readings = iter([0, half_took_ns])
    router: Channel

    def on_message(identity: bytes, msg: Message) -> None:
        router.send(Heartbeat(cast(Heartbeat, msg).seq, 1), identity)

    router = router_channel(zctx, endpoint, on_message, clock_ns=lambda: next(readings))
    raw = raw_dealer(zctx, endpoint)
    try:
        raw.send_multipart(encode_batch([pack(Heartbeat(i, 0)) for i in range(16)]))
        drain_until(router, lambda: router.received == 16, "16 requests")
        sizes: list[int] = []
        got: list[int] = []
        while len(got) < 16:
            assert raw.poll(int(DEADLINE_S * 1000)), f"only {got} came back"
            replies = decode_batch(raw.recv_multipart())
            sizes.append(len(replies))
            got += [cast(Heartbeat, r).seq for r in replies]
        assert got == list(range(16)) and sizes == batches
    finally:
        router.close()
        raw.close()


def test_batches_stay_within_the_receivers_default_limits(runtime_dir: str, zctx: zmq.Context[Any]) -> None:
    """Headers near the 64 KiB limit with 5-byte payload sizes: every batch the
    channel cuts is still accepted whole by a receiver with the same limits."""
    endpoint = ipc_endpoint(runtime_dir, "raw")
    raw = raw_router(zctx, endpoint)
    dealer = dealer_channel(zctx, endpoint, b"d", lambda i, m: None)
    try:
        msgs = [BlockCompletion(i, -5, "x" * 250, bytes(70_000)) for i in range(256)]
        for m in msgs:
            dealer.send(m, defer=True)
        dealer.flush()
        got: list[Message | RemoteProtocolError] = []
        batches = 0
        while len(got) < 256:
            assert raw.poll(int(DEADLINE_S * 1000)), f"only {len(got)} arrived"
            got += decode_batch(raw.recv_multipart()[1:])
            batches += 1
        assert got == msgs and batches > 1
    finally:
        dealer.close()
        raw.close()


def test_a_full_batch_of_large_payloads_fits_the_receivers_header_limit(runtime_dir: str,
                                                                       zctx: zmq.Context[Any]) -> None:
    """256 items of 252 bytes fill the header budget exactly, and each has a
    payload of more than 64 KiB (a 5-byte size): the sizes take 1283 bytes.
    The batch header must still be within the receiver's 64 KiB."""
    endpoint = ipc_endpoint(runtime_dir, "raw")
    raw = raw_router(zctx, endpoint)
    dealer = dealer_channel(zctx, endpoint, b"d", lambda i, m: None)
    try:
        msgs = [BlockCompletion(1000 + i, -5, "x" * 227, bytes(70_000)) for i in range(256)]
        assert {len(pack(m)[0]) for m in msgs} == {252}
        for m in msgs:
            dealer.send(m, defer=True)
        dealer.flush()
        got: list[Message | RemoteProtocolError] = []
        while len(got) < 256:
            assert raw.poll(int(DEADLINE_S * 1000)), f"only {len(got)} arrived"
            frames = raw.recv_multipart()[1:]
            assert len(frames[0]) <= Limits().max_header_bytes
            got += decode_batch(frames)
        assert got == msgs
    finally:
        dealer.close()
        raw.close()


def test_a_nested_drain_keeps_the_order(runtime_dir: str, zctx: zmq.Context[Any]) -> None:
    """A handler that drains its own channel again (a nested loop waiting for
    something) gets the rest of the current batch first, then newer input:
    every message once, in order."""
    endpoint = ipc_endpoint(runtime_dir, "router")
    got: list[int] = []
    router: Channel

    def on_message(identity: bytes, msg: Message) -> None:
        seq = cast(Heartbeat, msg).seq
        got.append(seq)
        if seq == 0:  # wait, nested, for the second batch
            drain_until(router, lambda: len(got) == 8, "the second batch (nested)")

    router = router_channel(zctx, endpoint, on_message)
    raw = raw_dealer(zctx, endpoint)
    try:
        raw.send_multipart(encode_batch([pack(Heartbeat(i, 0)) for i in range(4)]))
        raw.send_multipart(encode_batch([pack(Heartbeat(i, 0)) for i in range(4, 8)]))
        drain_until(router, lambda: len(got) == 8, "8 messages")
        assert got == list(range(8)) and router.received == 8
    finally:
        router.close()
        raw.close()


@pytest.mark.parametrize(("msg", "why"), [
    (BlockCompletion(1, -5, "x" * 4097), "max_str_len"),
    (QueryReply(1, {f"k{i}": i for i in range(257)}), "max_map_len"),
    (BlockCompletion(1, 0, "", bytes(1025)), "payload of 1025 bytes exceeds the limit of 1024"),
])
def test_a_message_the_peer_would_refuse_is_refused_at_send(runtime_dir: str, zctx: zmq.Context[Any],
                                                           msg: Message, why: str) -> None:
    """Sent, it would be dropped by the peer as a bad message, and whoever
    waits for its answer would wait for ever: ``send`` raises instead, queues
    nothing, and the channel goes on.  What fits exactly gets through."""
    endpoint = ipc_endpoint(runtime_dir, "raw")
    raw = raw_router(zctx, endpoint)
    dealer = dealer_channel(zctx, endpoint, b"d", lambda i, m: None, limits=Limits(max_payload_bytes=1024))
    try:
        with pytest.raises(LocalProtocolError, match=why):
            dealer.send(msg)
        assert dealer.backlog == 0 and dealer.sent == 0
        fits = [BlockCompletion(1, -5, "x" * 4096, bytes(1024)), QueryReply(2, {f"k{i}": i for i in range(256)})]
        for m in fits:
            dealer.send(m)
        got: list[Message | RemoteProtocolError] = []
        while len(got) < 2:
            assert raw.poll(int(DEADLINE_S * 1000)), f"only {len(got)} arrived"
            got += decode_batch(raw.recv_multipart()[1:], Limits(max_payload_bytes=1024))
        assert got == fits
    finally:
        dealer.close()
        raw.close()


# -- 9. found in review: a full peer, closing mid-drain, oversized frames ---------------------


def _aio_router_with_a_full_and_an_idle_peer(
    zctx: zmq.Context[Any], endpoint: str, ctx: AioContext,
) -> tuple[Channel, ChannelHandler, zmq.Socket[Any], zmq.Socket[Any], list[int]]:
    """A ROUTER channel served by ``ctx`` (as an iothread's data channel)
    with a backlog for peer ``a`` (never reads) while ``b`` is idle; the last
    item counts ``pending_input`` probes."""
    rsock = channel_socket(zctx, zmq.ROUTER)
    rsock.setsockopt(zmq.SNDHWM, 10)
    rsock.bind(endpoint)
    router = Channel(rsock, lambda i, m: None)
    probes = [0]
    probe = router.pending_input

    def counted_probe() -> bool:
        probes[0] += 1
        return probe()

    router.pending_input = counted_probe  # type: ignore[method-assign]
    handler = ChannelHandler(ctx, router, "data")
    peers = []
    for name in (b"a", b"b"):
        raw = raw_dealer(zctx, endpoint, identity=name, rcvhwm=10)
        raw.send_multipart(encode(Heartbeat(0, 0)))
        peers.append(raw)
    poll_until(lambda: ctx.poll(True, TICK_NS), lambda: router.received == 2, "both peers", DEADLINE_S)
    for i in range(1024):
        router.send(BlockCompletion(i, 0, "", bytes(4096)), b"a")
    assert router.backlog > 0
    run_until_idle(ctx)
    return router, handler, peers[0], peers[1], probes


def test_a_deferred_send_does_not_wait_behind_a_full_peer(runtime_dir: str, zctx: zmq.Context[Any],
                                                          ctx: AioContext) -> None:
    """Regression: the kick of a deferred send came only when the channel's
    whole backlog was empty, so a completion for an idle client waited behind a
    stalled client's backlog until something else woke the loop."""
    router, handler, a, b = _aio_router_with_a_full_and_an_idle_peer(
        zctx, ipc_endpoint(runtime_dir, "r"), ctx)[:4]
    try:
        router.send(BlockCompletion(7, 0, "", b"x"), b"b", defer=True)
        poll_until(lambda: ctx.poll(True, TICK_NS), lambda: bool(b.poll(0)), "the completion for the idle peer",
                   DEADLINE_S)
        assert decode(b.recv_multipart()) == BlockCompletion(7, 0, "", b"x")
    finally:
        handler.close()
        a.close()
        b.close()


def test_busy_polling_sleeps_on_a_full_peers_backlog(runtime_dir: str, zctx: zmq.Context[Any],
                                                     ctx: AioContext) -> None:
    """Regression: a ROUTER shows room when *any* peer has some, so the probe
    reported work at every turn and the loop never slept (100% CPU while a
    client did not read).  Now the probe tries the send itself."""
    ctx.set_poll_params(1_000_000, 0, 0)
    router, handler, a, b, probes = _aio_router_with_a_full_and_an_idle_peer(
        zctx, ipc_endpoint(runtime_dir, "r"), ctx)
    try:
        for node in ctx._fds.nodes.values():
            node.poll_ns = 1_000_000  # as after a burst of requests
        before = probes[0]
        assert [ctx.poll(True, 20_000_000) for _ in range(5)] == [False] * 5  # each one slept
        assert probes[0] > before  # busy polling did probe the channel
        received = 0

        def a_reads_and_the_backlog_is_gone() -> bool:
            nonlocal received
            while a.poll(0):  # the full peer reads now: its backlog goes out
                received += len(decode_batch(a.recv_multipart()))
            return router.backlog == 0 and received == 1024

        poll_until(lambda: ctx.poll(True, TICK_NS), a_reads_and_the_backlog_is_gone, "the backlog to go out",
                   DEADLINE_S)
    finally:
        handler.close()
        a.close()
        b.close()


@pytest.mark.parametrize("nested", [False, True])
def test_closing_the_channel_while_the_rest_of_a_batch_is_delivered(runtime_dir: str, zctx: zmq.Context[Any],
                                                                    nested: bool) -> None:
    """Regression: a handler that closed the channel while drain() delivered
    the rest of a batch (left by a raising handler, or by a nested drain) made
    drain() read ZMQ_EVENTS of the closed socket: ZMQError into the loop."""
    endpoint = ipc_endpoint(runtime_dir, "r")
    got: list[int] = []

    def on_message(identity: bytes, msg: Message) -> None:
        assert isinstance(msg, Heartbeat)
        got.append(msg.seq)
        if msg.seq == 0:
            if nested:
                ch.drain()
            else:
                raise RuntimeError("handler failed")
        if msg.seq == 2:
            ch.close()

    ch = Channel(channel_socket(zctx, zmq.ROUTER), on_message)
    ch.socket.bind(endpoint)
    raw = raw_dealer(zctx, endpoint)
    try:
        raw.send_multipart(encode_batch([pack(Heartbeat(i, 0)) for i in range(4)]))
        if nested:
            drain_until(ch, lambda: bool(got), "the batch")
        else:
            with pytest.raises(RuntimeError, match="handler failed"):
                drain_until(ch, lambda: bool(got), "the batch")
            assert ch.drain() == 2
        assert got == [0, 1, 2] and ch.closed
    finally:
        ch.close()
        raw.close()


def test_a_frame_over_the_limits_never_reaches_the_channel(runtime_dir: str, zctx: zmq.Context[Any]) -> None:
    """channel_socket sets ZMQ_MAXMSGSIZE before the bind: libzmq drops a peer
    that sends a frame larger than any the limits allow, instead of buffering
    it whole (a peer could make us hold gigabytes); the channel goes on."""
    endpoint = ipc_endpoint(runtime_dir, "r")
    limits = Limits(max_payload_bytes=1 << 20)
    got: list[Message | RemoteProtocolError] = []
    ch = Channel(channel_socket(zctx, zmq.ROUTER, limits), lambda i, m: got.append(m),
                 on_error=lambda i, e: got.append(e), limits=limits)
    ch.socket.bind(endpoint)
    big, small = raw_dealer(zctx, endpoint), raw_dealer(zctx, endpoint)
    try:
        big.send_multipart(encode(BlockRequest(1, "n", "write", 0, 2 << 20, data=bytes(2 << 20))))
        small.send_multipart(encode(Heartbeat(5, 0)))
        drain_until(ch, lambda: bool(got), "the small message")
        assert got == [Heartbeat(5, 0)]
    finally:
        ch.close()
        big.close()
        small.close()
