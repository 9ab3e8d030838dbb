"""NBD's transmission phase served in an AioContext (iothreads.nbd), in process:
a socketpair's end adopted as a handed-over connection, the test speaking
NBD on the other end (requests from the codec, replies read by the test's
own reader), the context polled by the test."""

from __future__ import annotations

import errno
import gc
import os
import socket
import weakref
from collections.abc import Iterator
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iothreads import AioContext
from iothreads.block._node import (
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_ZERO,
    BlockDriver,
    BlockNode,
    Buffer,
    FileDriver,
    NullDriver,
)
from iothreads.nbd import (
    DRAIN_TIMEOUT_MS,
    LONE_READS_TO_POLL,
    MAX_POLLED,
    NbdClient,
    NbdServer,
    allocation_depth,
    base_allocation,
)
from iothreads.testing import FakeClock, poll_until
from protocol import CLIENT_CREDIT, NbdConnection, NbdRequestDecoder
from protocol.nbd import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_ENOTSUP,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_READ_ONLY,
    NBD_MAX_BUFFER_SIZE,
    NBD_META_CONTEXT_ALLOCATION_DEPTH,
    NBD_META_CONTEXT_BASE_ALLOCATION,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REQUEST_SIZE,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    encode_request,
)
from tests.protocol.nbd_model import Chunk, SimpleReply, read_replies

MiB = 1 << 20
IMAGE_BYTES = 4 * MiB
CONTEXTS = {NBD_META_CONTEXT_BASE_ALLOCATION: 0, NBD_META_CONTEXT_ALLOCATION_DEPTH: 1}


def pattern(seed: int, length: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(256)) * (length // 256) + bytes(length % 256)


def assert_written(image: str, writes: list[tuple[int, int, int]]) -> None:
    """The file holds each write's ``pattern(seed, length)`` at its offset: (offset, length, seed)."""
    with open(image, "rb") as f:
        for offset, length, seed in writes:
            f.seek(offset)
            assert f.read(length) == pattern(seed, length), offset


_SERVERS: list[NbdServer] = []  # closed before their context (a context refuses to close over their BHs)
_SOCKETS: list[socket.socket] = []


@pytest.fixture
def ctx(ctx: AioContext) -> Iterator[AioContext]:
    yield ctx
    _close_all()


@pytest.fixture
def fake_ctx(fake_ctx: AioContext) -> Iterator[AioContext]:
    yield fake_ctx
    _close_all()


def _close_all() -> None:
    while _SERVERS:
        _SERVERS.pop().close()
    while _SOCKETS:
        _SOCKETS.pop().close()


def server_of(ctx: AioContext, closed: list[NbdConnection]) -> NbdServer:
    server = NbdServer(ctx, closed.append)
    _SERVERS.append(server)
    return server


class Peer:
    """The client's end: requests out, replies in, the served context polled meanwhile."""

    def __init__(self, ctx: AioContext, node: BlockNode, *, structured: bool = False, read_only: bool = False,
                 contexts: dict[str, int] | None = None, pending: bytes = b"", sock_class: type = socket.socket,
                 server: NbdServer | None = None, connection_id: int = 1) -> None:
        self.ctx = ctx
        ours, theirs = socket.socketpair()
        served = sock_class(fileno=ours.detach())
        self.sock = theirs
        self.sock.setblocking(False)
        _SOCKETS.append(theirs)
        self.closed: list[NbdConnection] = []
        self.server = server or server_of(ctx, self.closed)
        flags = NBD_FLAG_HAS_FLAGS | (NBD_FLAG_READ_ONLY if read_only else 0)
        self.conn = NbdConnection(connection_id, "e0", node.name, flags, structured, contexts or {}, pending)
        self.server.adopt(served, self.conn, node)
        self.received = b""
        self.eof = False
        self.read_lengths: dict[int, int] = {}
        self.replies: list[SimpleReply | Chunk] = []
        self.outgoing = b""

    @property
    def client(self) -> NbdClient:
        return self.server.clients[self.conn.connection_id]

    def request(self, command: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"") -> None:
        if command == NBD_CMD_READ:
            self.read_lengths[cookie] = length
        self.send(encode_request(command, cookie, offset, length, flags, payload))

    def send(self, data: bytes) -> None:
        self.outgoing += data
        self.pump()

    def pump(self) -> None:
        try:
            while self.outgoing:
                self.outgoing = self.outgoing[self.sock.send(self.outgoing):]
        except BlockingIOError:
            pass
        while not self.eof:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
            self.received += data
        replies, self.received = read_replies(self.received, self.read_lengths)
        self.replies += replies

    def step(self) -> None:
        self.ctx.poll(True, 10_000_000)
        self.pump()

    def wait(self, condition: object, what: str) -> None:
        poll_until(self.step, condition, what)  # type: ignore[arg-type]

    def wait_replies(self, n: int) -> list[SimpleReply | Chunk]:
        """The first ``n`` replies that are final (a simple one, or a chunk with DONE)."""
        self.wait(lambda: len(self.final()) >= n, f"{n} replies")
        return self.final()[:n]

    def final(self) -> list[SimpleReply | Chunk]:
        return [r for r in self.replies if isinstance(r, SimpleReply) or r.done]

    def by_cookie(self) -> dict[int, list[SimpleReply | Chunk]]:
        out: dict[int, list[SimpleReply | Chunk]] = {}
        for r in self.replies:
            out.setdefault(r.cookie, []).append(r)
        return out


@pytest.fixture
def image(tmp_path: object) -> Iterator[str]:
    path = os.path.join(str(tmp_path), "disk.img")
    with open(path, "wb") as f:
        f.truncate(IMAGE_BYTES)
    yield path


@pytest.fixture
def file_node(ctx: AioContext, image: str) -> Iterator[BlockNode]:
    node = BlockNode(ctx, "disk0", FileDriver(image))
    yield node
    node.close()


def read_data(peer: Peer, cookie: int, offset: int, length: int) -> bytes:
    peer.request(NBD_CMD_READ, cookie, offset, length)
    peer.wait(lambda: any(r.cookie == cookie and (isinstance(r, SimpleReply) or r.done) for r in peer.replies),
              f"the reply to read {cookie}")
    parts = peer.by_cookie()[cookie]
    if isinstance(parts[0], SimpleReply):
        assert parts[0].error == 0
        return parts[0].data
    data = bytearray(length)
    for chunk in parts:
        assert isinstance(chunk, Chunk) and chunk.type in (NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_NONE)
        if chunk.offset is not None:
            data[chunk.offset - offset:chunk.offset - offset + len(chunk.data)] = chunk.data
    return bytes(data)


@pytest.mark.parametrize("structured", [False, True])
def test_writes_then_reads_verify_with_both_kinds_of_replies(ctx: AioContext, file_node: BlockNode, image: str,
                                                             structured: bool) -> None:
    peer = Peer(ctx, file_node, structured=structured)
    writes = [(i * 300_000 + i, 4096 + 1000 * i) for i in range(8)]
    for i, (offset, length) in enumerate(writes):
        peer.request(NBD_CMD_WRITE, 100 + i, offset, length, NBD_CMD_FLAG_FUA if i % 2 else 0,
                     pattern(i, length))
    replies = peer.wait_replies(len(writes))
    assert sorted(r.cookie for r in replies) == [100 + i for i in range(len(writes))]
    assert all(isinstance(r, SimpleReply) and r.error == 0 for r in replies)  # success: always simple (QEMU)
    peer.request(NBD_CMD_FLUSH, 200)
    peer.wait_replies(len(writes) + 1)
    for i, (offset, length) in enumerate(writes):
        assert read_data(peer, 300 + i, offset, length) == pattern(i, length)
    assert_written(image, [(offset, length, i) for i, (offset, length) in enumerate(writes)])
    assert read_data(peer, 400, 0, 0) == b""  # a read of nothing: an empty reply (NONE chunk when structured)
    assert not peer.closed


def test_many_requests_pipelined_in_one_write_are_answered_in_one_sendmsg(ctx: AioContext) -> None:
    """Reads that complete inline (null-co's) all go out in one sendmsg (which
    the socket takes whole: 50 KiB)."""
    calls: list[int] = []

    class CountingSocket(socket.socket):
        def sendmsg(self, buffers: object, *args: object) -> int:
            calls.append(1)
            return super().sendmsg(buffers, *args)  # type: ignore[arg-type]

    node = BlockNode(ctx, "null0", NullDriver(MiB))
    peer = Peer(ctx, node, sock_class=CountingSocket)
    burst = b"".join(encode_request(NBD_CMD_READ, 1000 + i, i * 512, 512) for i in range(100))
    for i in range(100):
        peer.read_lengths[1000 + i] = 512
    peer.send(burst)
    replies = peer.wait_replies(100)
    assert [r.cookie for r in replies] == [1000 + i for i in range(100)]
    assert all(isinstance(r, SimpleReply) and r.error == 0 and r.data == bytes(512) for r in replies)
    assert len(calls) == 1


@pytest.mark.parametrize("structured", [False, True])
def test_a_read_only_export_refuses_writes_as_qemu_does_and_stays_in_sync(
        ctx: AioContext, file_node: BlockNode, image: str, structured: bool) -> None:
    """QEMU answers a write to a read-only export with EINVAL (its nbd_trip
    sends every refused request's error as EINVAL; checked against qemu-nbd
    7.2), reading and dropping the write's payload so that the next request
    is found."""
    with open(image, "r+b") as f:
        f.write(b"\x5a" * 4096)
    peer = Peer(ctx, file_node, structured=structured, read_only=True)
    peer.request(NBD_CMD_WRITE, 1, 0, 65536, 0, b"\xff" * 65536)
    peer.request(NBD_CMD_TRIM, 2, 0, 4096)
    peer.request(NBD_CMD_WRITE_ZEROES, 3, 0, 4096)
    assert read_data(peer, 4, 0, 4096) == b"\x5a" * 4096
    replies = {r.cookie: r for r in peer.final()}
    for cookie in (1, 2, 3):
        reply = replies[cookie]
        if structured:
            assert isinstance(reply, Chunk) and reply.type == NBD_REPLY_TYPE_ERROR
            assert reply.error == NBD_EINVAL and reply.message == b"Export is read-only"
        else:
            assert isinstance(reply, SimpleReply) and reply.error == NBD_EINVAL
    with open(image, "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096
    assert not peer.closed


def test_requests_past_the_end_and_over_long_reads_are_refused(ctx: AioContext, file_node: BlockNode) -> None:
    peer = Peer(ctx, file_node, structured=True)
    peer.request(NBD_CMD_READ, 1, IMAGE_BYTES - 512, 1024)
    peer.request(NBD_CMD_WRITE, 2, IMAGE_BYTES, 1, 0, b"x")
    peer.request(NBD_CMD_READ, 3, 0, NBD_MAX_BUFFER_SIZE + 1)
    peer.request(NBD_CMD_FLUSH, 4, 0, 0, NBD_CMD_FLAG_NO_HOLE)  # a flag the command does not take
    peer.request(99, 5)  # an unknown command
    peer.request(NBD_CMD_BLOCK_STATUS, 6, 0, 4096)  # no context negotiated
    replies = {r.cookie: r for r in peer.wait_replies(6)}
    messages = {c: r.message for c, r in replies.items() if isinstance(r, Chunk)}
    assert all(isinstance(r, Chunk) and r.error == NBD_EINVAL for r in replies.values())
    assert messages[1].startswith(b"operation past EOF") and messages[2].startswith(b"operation past EOF")
    assert b"larger than max len" in messages[3] and b"unsupported flags" in messages[4]
    assert b"invalid request type" in messages[5] and messages[6] == b"CMD_BLOCK_STATUS not negotiated"
    assert read_data(peer, 7, 0, 512) == bytes(512)  # still in step
    assert not peer.closed


def test_an_over_long_write_is_answered_then_the_connection_closes(ctx: AioContext, file_node: BlockNode) -> None:
    """Its payload is not read (QEMU does not): the stream is lost, so after the
    error the connection closes, and is reported closed once."""
    peer = Peer(ctx, file_node)
    peer.request(NBD_CMD_WRITE, 1, 0, NBD_MAX_BUFFER_SIZE + 1)
    peer.wait(lambda: peer.eof and peer.closed, "the connection to close")
    assert [(r.cookie, r.error) for r in peer.final() if isinstance(r, SimpleReply)] == [(1, NBD_EINVAL)]
    assert peer.closed == [peer.conn] and not peer.server.clients


def test_a_bad_magic_closes_the_connection_after_the_replies_in_flight(ctx: AioContext,
                                                                        file_node: BlockNode) -> None:
    peer = Peer(ctx, file_node)
    peer.request(NBD_CMD_WRITE, 1, 0, 4096, 0, b"w" * 4096)  # in the thread pool when the garbage comes
    peer.send(b"\xde\xad\xbe\xef" + bytes(24) + encode_request(NBD_CMD_READ, 3, 0, 512))
    peer.wait(lambda: peer.eof, "the connection to close")
    assert sorted((r.cookie, r.error) for r in peer.final() if isinstance(r, SimpleReply)) == [
        (0, NBD_EINVAL), (1, 0)]  # the garbage answered (its cookie: zeroes), the read after it never read
    assert peer.closed == [peer.conn]


def test_disc_answers_the_requests_in_flight_then_closes(ctx: AioContext, file_node: BlockNode,
                                                         image: str) -> None:
    peer = Peer(ctx, file_node)
    peer.send(b"".join(encode_request(NBD_CMD_WRITE, 10 + i, i * 8192, 8192, 0, pattern(i, 8192))
                       for i in range(16)) + encode_request(NBD_CMD_DISC, 99, 0, 0))
    peer.wait(lambda: peer.eof, "the connection to close")
    assert sorted(r.cookie for r in peer.final()) == [10 + i for i in range(16)]
    assert peer.closed == [peer.conn] and not peer.server.clients
    with open(image, "rb") as f:
        assert all(f.read(8192) == pattern(i, 8192) for i in range(16))


def test_a_closed_connection_is_freed_at_once_not_left_to_the_cyclic_collector(ctx: AioContext,
                                                                              file_node: BlockNode) -> None:
    """Each connection holds buffers (a 128 KiB slab for its reads): one that
    lingered until the cyclic collector ran grew the iothread's memory by
    tens of MiB under many short connections (the NBD fuzz plane)."""
    gc.collect()
    gc.disable()
    try:
        peer = Peer(ctx, file_node)
        assert read_data(peer, 1, 0, 4096) == bytes(4096)  # (the slab in use)
        client = weakref.ref(peer.client)
        peer.send(encode_request(NBD_CMD_DISC, 2, 0, 0))
        peer.wait(lambda: peer.eof and client() is None, "the connection to close and be freed")
    finally:
        gc.enable()


def test_a_client_that_sends_one_request_at_a_time_is_busy_polled_one_that_pipelines_is_not(
        ctx: AioContext, file_node: BlockNode) -> None:
    ctx.set_poll_params(32_768, 0, 0)
    peer = Peer(ctx, file_node)

    def io_poll() -> object:
        [handler] = [h for h in ctx.describe_handlers() if h["fd"] == peer.client.fd]
        return handler["io_poll"]

    for cookie in range(LONE_READS_TO_POLL):
        assert io_poll() is None, cookie
        assert read_data(peer, cookie, cookie * 4096, 4096) == bytes(4096)
    assert io_poll() == "NbdClient._readable_now"
    before = ctx.stats().busy_poll_runs
    for cookie in (100, 101):  # (the first one opens the handler's polling window)
        assert read_data(peer, cookie, 0, 4096) == bytes(4096)
    assert ctx.stats().busy_poll_runs > before
    # Pipelined: four reads sent before the context polls, read at once: no more polling.
    for i in range(4):
        peer.request(NBD_CMD_READ, 200 + i, i * 4096, 4096)
    peer.wait(lambda: len(peer.final()) == LONE_READS_TO_POLL + 6, "the four replies")
    assert io_poll() is None


def test_an_iothread_busy_polls_a_few_connections_at_most(ctx: AioContext, file_node: BlockNode) -> None:
    """Each polled socket costs every polling pass a system call: many idle
    clients that once sent one request at a time must not multiply it."""
    first = Peer(ctx, file_node)
    peers = [first] + [Peer(ctx, file_node, server=first.server, connection_id=2 + i) for i in range(MAX_POLLED + 2)]
    for cookie in range(LONE_READS_TO_POLL):
        for peer in peers:
            assert read_data(peer, cookie, cookie * 4096, 4096) == bytes(4096)
    polled_fds = {h["fd"] for h in ctx.describe_handlers() if h["io_poll"] == "NbdClient._readable_now"}
    assert polled_fds == {p.client.fd for p in peers[:MAX_POLLED]}
    first.send(encode_request(NBD_CMD_DISC, 99, 0, 0))  # one polled closes: its place is free
    first.wait(lambda: first.eof, "the first connection to close")
    late = Peer(ctx, file_node, server=first.server, connection_id=100)
    for cookie in range(LONE_READS_TO_POLL):
        assert read_data(late, cookie, 0, 4096) == bytes(4096)
    polled_fds = {h["fd"] for h in ctx.describe_handlers() if h["io_poll"] == "NbdClient._readable_now"}
    assert len(polled_fds) == MAX_POLLED and late.client.fd in polled_fds


def test_trim_write_zeroes_and_block_status_of_a_sparse_file(ctx: AioContext, file_node: BlockNode,
                                                             image: str) -> None:
    with open(image, "r+b") as f:
        f.seek(MiB)
        f.write(b"\x11" * (256 * 1024))
    driver = file_node.driver
    assert isinstance(driver, FileDriver)
    if file_node.block_status(0, IMAGE_BYTES, 1024) == [(IMAGE_BYTES, BDRV_BLOCK_DATA)]:
        pytest.skip("this file system does not report holes (SEEK_HOLE)")
    peer = Peer(ctx, file_node, structured=True, contexts=CONTEXTS)
    peer.request(NBD_CMD_BLOCK_STATUS, 1, 0, IMAGE_BYTES)
    peer.wait_replies(1)
    base, depth = peer.by_cookie()[1]
    assert isinstance(base, Chunk) and isinstance(depth, Chunk)
    assert (base.type, base.context_id, base.done) == (NBD_REPLY_TYPE_BLOCK_STATUS, 0, False)
    assert (depth.context_id, depth.done) == (1, True)
    hole = NBD_STATE_HOLE | NBD_STATE_ZERO
    assert base.extents == ((MiB, hole), (256 * 1024, 0), (IMAGE_BYTES - MiB - 256 * 1024, hole))
    assert depth.extents == ((IMAGE_BYTES, 1),)  # a file holds every byte (QEMU: "local")
    # REQ_ONE: one extent, of the first context's kind.
    peer.request(NBD_CMD_BLOCK_STATUS, 2, MiB, 2 * MiB, NBD_CMD_FLAG_REQ_ONE)
    peer.wait_replies(2)
    assert [c.extents for c in peer.by_cookie()[2] if isinstance(c, Chunk)] == [((256 * 1024, 0),),
                                                                                ((256 * 1024, 1),)]
    # Trim and write-zeroes (may punch) make holes; with NO_HOLE, zeroes all the same.
    peer.request(NBD_CMD_TRIM, 3, MiB, 64 * 1024, NBD_CMD_FLAG_FUA)
    peer.request(NBD_CMD_WRITE_ZEROES, 4, MiB + 64 * 1024, 64 * 1024)
    peer.request(NBD_CMD_WRITE_ZEROES, 5, MiB + 128 * 1024, 64 * 1024, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA)
    peer.request(NBD_CMD_CACHE, 6, 0, 4096)
    replies = peer.wait_replies(6)
    assert all(isinstance(r, SimpleReply) and r.error == 0 for r in replies[2:])
    assert read_data(peer, 7, MiB, 256 * 1024) == bytes(192 * 1024) + b"\x11" * (64 * 1024)
    peer.request(NBD_CMD_BLOCK_STATUS, 8, MiB, 128 * 1024)
    peer.wait(lambda: len(peer.by_cookie().get(8, [])) == 2, "block status")
    assert peer.by_cookie()[8][0].extents == ((128 * 1024, hole),)  # type: ignore[union-attr]


class NoFastZeroes(BlockDriver):
    """A driver that cannot zero fast (as a file system without fallocate)."""

    name = "no-fast-zeroes"
    size = MiB

    def __init__(self) -> None:
        self.zeroed: list[tuple[int, int, bool]] = []

    def read(self, offset: int, length: int) -> Buffer:
        return bytes(length)

    def write(self, offset: int, data: Buffer) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False, no_fallback: bool = False) -> None:
        if no_fallback:
            raise OSError(errno.ENOTSUP, "no fast zeroes")
        self.zeroed.append((offset, length, may_unmap))


def test_write_zeroes_flags_reach_the_driver_and_fast_zero_fails_with_enotsup(ctx: AioContext) -> None:
    driver = NoFastZeroes()
    node = BlockNode(ctx, "slow0", driver)
    peer = Peer(ctx, node, structured=True)
    peer.request(NBD_CMD_WRITE_ZEROES, 1, 0, 4096, NBD_CMD_FLAG_FAST_ZERO)
    peer.request(NBD_CMD_WRITE_ZEROES, 2, 4096, 4096)
    peer.request(NBD_CMD_WRITE_ZEROES, 3, 8192, 4096, NBD_CMD_FLAG_NO_HOLE)
    replies = {r.cookie: r for r in peer.wait_replies(3)}
    assert isinstance(replies[1], Chunk) and replies[1].error == NBD_ENOTSUP
    assert replies[1].message == b"writing to file failed"
    assert isinstance(replies[2], SimpleReply) and replies[2].error == 0
    assert sorted(driver.zeroed) == [(4096, 4096, True), (8192, 4096, False)]  # NO_HOLE: no unmapping


def test_errors_of_the_node_are_mapped_as_qemu_maps_them(ctx: AioContext) -> None:
    class Full(NoFastZeroes):
        def write(self, offset: int, data: Buffer) -> None:
            raise OSError(errno.EDQUOT, "quota")

    node = BlockNode(ctx, "full0", Full())
    peer = Peer(ctx, node)
    peer.request(NBD_CMD_WRITE, 1, 0, 512, 0, bytes(512))
    assert [(r.cookie, r.error) for r in peer.wait_replies(1) if isinstance(r, SimpleReply)] == [(1, NBD_ENOSPC)]


def test_pending_bytes_are_handled_first(ctx: AioContext, file_node: BlockNode) -> None:
    """Bytes the main loop read past the handshake (a request and a half) come with the connection."""
    first = encode_request(NBD_CMD_WRITE, 1, 0, 4096, 0, b"p" * 4096)
    second = encode_request(NBD_CMD_READ, 2, 0, 4096)
    peer = Peer(ctx, file_node, pending=first + second[:11])
    peer.read_lengths[2] = 4096
    peer.wait_replies(1)
    peer.send(second[11:])
    replies = {r.cookie: r for r in peer.wait_replies(2)}
    assert isinstance(replies[2], SimpleReply) and replies[2].data in (b"p" * 4096, bytes(4096))
    assert read_data(peer, 3, 0, 4096) == b"p" * 4096


def test_a_client_that_never_reads_stops_being_read(ctx: AioContext) -> None:
    """Back-pressure: what a connection holds (requests started, replies
    unsent) stays within its credit, and the socket is left unread instead,
    until the client's own sends block; once the client reads, every request
    is answered, in step."""
    node = BlockNode(ctx, "null0", NullDriver(64 * MiB))
    peer = Peer(ctx, node)
    length = 4096
    total = 40_000  # 1.1 MB of requests (more than a socket buffer), 160 MiB of replies asked for
    for i in range(total):
        peer.read_lengths[i] = length
    peer.outgoing = b"".join(encode_request(NBD_CMD_READ, i, (i % 10_000) * length, length) for i in range(total))
    held: list[int] = []
    blocked: list[bool] = []

    def push() -> None:  # send what the socket takes; read nothing
        try:
            while peer.outgoing:
                peer.outgoing = peer.outgoing[peer.sock.send(peer.outgoing):]
            blocked.append(False)
        except BlockingIOError:
            blocked.append(True)
        ctx.poll(True, 10_000_000)
        held.append(peer.client.backlog_bytes + peer.server.credit.in_flight.total_bytes)

    poll_until(push, lambda: not peer.client.reading and blocked[-1:] == [True],
               "the connection to stop being read, and the client's sends to block")
    for _ in range(20):  # it stays stopped, and holds no more
        push()
    assert not peer.client.reading and all(blocked[-20:])
    credit = min(CLIENT_CREDIT.max_bytes, CLIENT_CREDIT.max_requests * length)
    assert max(held) <= credit + CLIENT_CREDIT.max_requests * 32 + length  # (and the replies' headers)
    peer.wait(lambda: len(peer.final()) == total and not peer.outgoing, "every reply")
    assert [r.cookie for r in peer.final()] == list(range(total))


@pytest.mark.parametrize("structured", [False, True])
def test_replies_waiting_for_a_slow_client_keep_their_data(ctx: AioContext, file_node: BlockNode, image: str,
                                                           structured: bool) -> None:
    """The reads served inline read into one buffer of the connection, used
    again only once every reply queued was sent: a client that reads its
    replies slowly (the socket takes part of them, the rest waits) gets each
    page's own data, however the reads and the sends interleave."""
    page = 4096
    pages = IMAGE_BYTES // page
    with open(image, "r+b") as f:
        for i in range(pages):
            f.write(pattern(i, page))
    peer = Peer(ctx, file_node, structured=structured)
    peer.client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # (each send takes a few replies)
    total = 2000  # 8 MiB of replies: many times what the sockets hold
    order = [(i * 37) % pages for i in range(total)]
    for cookie in range(total):
        peer.read_lengths[cookie] = page
    peer.outgoing = b"".join(encode_request(NBD_CMD_READ, cookie, order[cookie] * page, page)
                             for cookie in range(total))
    waited: list[bool] = []

    def trickle() -> None:  # the client sends a few requests, and takes a little of what came
        try:
            peer.outgoing = peer.outgoing[peer.sock.send(peer.outgoing[:8 * NBD_REQUEST_SIZE]):]
        except BlockingIOError:
            pass
        ctx.poll(True, 10_000_000)
        waited.append(peer.client.send_blocked)
        try:
            peer.received += peer.sock.recv(64_000)
        except BlockingIOError:
            pass
        replies, peer.received = read_replies(peer.received, peer.read_lengths)
        peer.replies += replies

    poll_until(trickle, lambda: len(peer.final()) == total, "every reply, read slowly")
    assert sum(waited) > 10  # (replies did wait for the socket: the case under test)
    for cookie, parts in peer.by_cookie().items():
        data = parts[0].data if isinstance(parts[0], SimpleReply) else b"".join(
            c.data for c in parts if isinstance(c, Chunk) and c.type == NBD_REPLY_TYPE_OFFSET_DATA)
        assert data == pattern(order[cookie], page), cookie


def test_quiesce_hands_back_at_a_request_boundary_with_the_bytes_not_handled(ctx: AioContext,
                                                                             file_node: BlockNode) -> None:
    """A write whose payload is arriving is read to its end and answered; the
    bytes after it stay in the socket; a part of a header already read goes
    back as ``pending``."""
    peer = Peer(ctx, file_node)
    write = encode_request(NBD_CMD_WRITE, 1, 0, 100_000, 0, b"q" * 100_000)
    read = encode_request(NBD_CMD_READ, 2, 0, 512)
    peer.send(write[:50_000])
    peer.wait(lambda: peer.client.partial_request_bytes == 50_000, "half the write to be read")
    handed: list[tuple[socket.socket, NbdConnection]] = []
    peer.server.hand_back("disk0", handed.extend)
    for _ in range(5):
        peer.step()
    assert not handed  # it waits for the rest of the write...
    peer.send(write[50_000:] + read[:20])
    peer.wait(lambda: handed, "the connection to be handed back")
    assert [r.cookie for r in peer.final()] == [1]  # ...answers it...
    sock, conn = handed[0]
    _SOCKETS.append(sock)
    assert conn == NbdConnection(1, "e0", "disk0", NBD_FLAG_HAS_FLAGS, False, {}, b"")
    assert sock.recv(100) == read[:20]  # ...and leaves the next request where its next home reads it
    assert not peer.closed and not peer.server.clients
    # There: a header read in part goes back as pending.
    peer.send(read[20:])
    again = server_of(ctx, peer.closed)
    again.adopt(sock, replace(conn, pending=read[:20]), file_node)
    peer.read_lengths[2] = 512
    peer.wait(lambda: len(peer.final()) == 2, "the read to be answered in its new home")
    assert peer.final()[1].cookie == 2
    peer.send(read[:10])
    poll_until(peer.step, lambda: again.clients[1].partial_request_bytes == 10, "a part of a header to be read")
    handed.clear()
    again.hand_back("disk0", handed.extend)
    assert handed and handed[0][1].pending == read[:10]
    handed[0][0].close()


def test_close_export_drops_the_replies_and_reports_the_connections(ctx: AioContext, file_node: BlockNode) -> None:
    closed: list[NbdConnection] = []
    server = server_of(ctx, closed)
    peers = [Peer(ctx, file_node, server=server, connection_id=i) for i in (1, 2)]
    peers[0].request(NBD_CMD_WRITE, 1, 0, 4096, 0, bytes(4096))
    answers: list[int] = []
    server.close_export("e0", answers.append)
    def step() -> None:
        ctx.poll(True, 10_000_000)
        for p in peers:
            p.pump()

    poll_until(step, lambda: answers and all(p.eof for p in peers), "the export's connections to close")
    assert answers == [2] and sorted(c.connection_id for c in closed) == [1, 2]
    assert not server.clients


def test_a_client_that_takes_no_replies_is_closed_after_the_drain_deadline(fake_ctx: AioContext,
                                                                           fake_clock: FakeClock) -> None:
    node = BlockNode(fake_ctx, "null0", NullDriver(64 * MiB))
    peer = Peer(fake_ctx, node)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.sock.send(b"".join(encode_request(NBD_CMD_READ, i, 0, MiB) for i in range(8)))
    poll_until(lambda: fake_ctx.poll(True, 10_000_000), lambda: peer.client.send_blocked, "replies to back up")
    handed: list[object] = []
    peer.server.hand_back("null0", handed.append)
    fake_ctx.poll(False)
    assert not handed and peer.server.clients  # waiting for the client to read
    fake_clock.advance_ns(DRAIN_TIMEOUT_MS * 1_000_000)
    poll_until(lambda: fake_ctx.poll(True, 10_000_000), lambda: handed, "the deadline")
    assert handed == [[]] and peer.closed == [peer.conn]


def test_block_status_contexts_from_a_nodes_extents() -> None:
    extents = [(4096, BDRV_BLOCK_DATA), (8192, BDRV_BLOCK_ZERO), (512, 0), (512, BDRV_BLOCK_ZERO)]
    assert base_allocation(extents) == [(4096, 0), (8192, NBD_STATE_HOLE | NBD_STATE_ZERO), (512, NBD_STATE_HOLE),
                                        (512, NBD_STATE_HOLE | NBD_STATE_ZERO)]
    assert allocation_depth(extents) == [(12288, 1), (512, 0), (512, 1)]


@pytest.mark.parametrize("read_zeroes", [False, True])
def test_null_co_block_status_is_qemus(ctx: AioContext, read_zeroes: bool) -> None:
    """QEMU's null-co: no data; zeroes with read-zeroes=on (nbdinfo --map of
    qemu-nbd: 'hole' without, 'hole,zero' with; allocation depth 0 and 1)."""
    node = BlockNode(ctx, "null0", NullDriver(MiB, read_zeroes=read_zeroes))
    extents = node.block_status(0, MiB, 16)
    assert base_allocation(extents) == [(MiB, NBD_STATE_HOLE | (NBD_STATE_ZERO if read_zeroes else 0))]
    assert allocation_depth(extents) == [(MiB, 1 if read_zeroes else 0)]


def test_a_file_nodes_block_status_stops_at_max_extents(ctx: AioContext, file_node: BlockNode,
                                                         image: str) -> None:
    with open(image, "r+b") as f:
        for i in range(8):
            f.seek(i * 256 * 1024)
            f.write(b"d" * 4096)
    if file_node.block_status(0, IMAGE_BYTES, 1024) == [(IMAGE_BYTES, BDRV_BLOCK_DATA)]:
        pytest.skip("this file system does not report holes (SEEK_HOLE)")
    few = file_node.block_status(0, IMAGE_BYTES, 3)
    assert len(few) == 3 and few[0][1] == BDRV_BLOCK_DATA and few[1][1] == BDRV_BLOCK_ZERO
    full = file_node.block_status(0, IMAGE_BYTES, 1024)
    assert sum(n for n, _ in full) == IMAGE_BYTES and len(full) == 16
    with pytest.raises(ValueError):
        file_node.block_status(IMAGE_BYTES - 512, 1024, 1)


@pytest.mark.parametrize("structured", [False, True])
def test_reads_and_writes_served_inline_are_counted_as_qemu_counts_them(ctx: AioContext, file_node: BlockNode,
                                                                        image: str, structured: bool) -> None:
    """Whole-page writes and reads from the page cache are served inline, the
    others through the thread pool: the replies are the same, and the node's
    counters hold every one of them (operations, bytes, time, histogram)."""
    peer = Peer(ctx, file_node, structured=structured)
    writes = [(0, 4096), (8192, 8192), (20_000, 3000), (65536, 4096)]  # the third: part of two pages
    burst = b"".join(encode_request(NBD_CMD_WRITE, 10 + i, offset, length, 0, pattern(i, length))
                     for i, (offset, length) in enumerate(writes))
    peer.send(burst)
    assert sorted((r.cookie, r.error) for r in peer.wait_replies(len(writes))
                  if isinstance(r, SimpleReply)) == [(10 + i, 0) for i in range(len(writes))]
    for i, (offset, length) in enumerate(writes):
        assert read_data(peer, 20 + i, offset, length) == pattern(i, length)
    assert_written(image, [(offset, length, i) for i, (offset, length) in enumerate(writes)])
    for op in ("write", "read"):
        st = file_node.stats[op]
        assert (st.ops, st.bytes, st.errors, st.invalid) == (len(writes), sum(n for _, n in writes), 0, 0), op
        assert sum(st.histogram) == len(writes) and st.total_ns > 0, op
    assert file_node.in_flight == 0 and peer.client.in_flight == 0
    assert peer.server.credit.in_flight.of(peer.client.key) == (0, 0)


def test_writes_received_together_go_to_the_pool_as_one_job(ctx: AioContext, file_node: BlockNode,
                                                            image: str) -> None:
    """Writes that cannot be done inline (here: parts of pages), received in
    one read, are one thread-pool job; each is answered."""
    peer = Peer(ctx, file_node)
    jobs = ctx.thread_pool.stats()["completed_total"]
    peer.send(b"".join(encode_request(NBD_CMD_WRITE, i, i * 10_000 + 1, 512, 0, pattern(i, 512))
                       for i in range(20)))
    assert sorted(r.cookie for r in peer.wait_replies(20)) == list(range(20))
    assert ctx.thread_pool.stats()["completed_total"] == jobs + 1
    assert_written(image, [(i * 10_000 + 1, 512, i) for i in range(20)])


@pytest.mark.parametrize("cut", [1, 5, 27, 28, 29, 100, 4124, 5000, 1 << 20])
def test_a_stream_cut_anywhere_is_served_the_same(ctx: AioContext, file_node: BlockNode, image: str,
                                                  cut: int) -> None:
    """Requests of every way the input takes (reads and whole-page writes
    served inline, a write of part of a page and FUA writes that go to the
    pool, a flush, a read with FUA, a large write), sent in pieces of ``cut``
    bytes, each read by the server on its own: every piece boundary falls
    somewhere else (within a header, within a payload, between requests).
    Each is answered, the reads with the data that was in the image, the
    writes land whole: a payload that waits for the pool is not the
    thread's receive buffer, which the next piece is read into."""
    with open(image, "r+b") as f:
        f.write(pattern(99, 256 * 1024))  # what the reads read (no write in the stream overlaps them)
    big = 300_000  # a large write (more than a read takes): its payload is collected in a buffer of its own
    stream = [  # (command, offset, length, flags, payload seed)
        (NBD_CMD_WRITE, 512 * 1024, 4096, 0, 1),
        (NBD_CMD_READ, 0, 4096, 0, 0),
        (NBD_CMD_WRITE, 600 * 1024 + 1, 512, 0, 2),
        (NBD_CMD_FLUSH, 0, 0, 0, 0),
        (NBD_CMD_WRITE, 700 * 1024, 4096, NBD_CMD_FLAG_FUA, 3),
        (NBD_CMD_READ, 8192, 8192, 0, 0),
        (NBD_CMD_READ, 100_000, 1000, NBD_CMD_FLAG_FUA, 0),
        (NBD_CMD_WRITE, 800 * 1024, 8192, 0, 4),
        (NBD_CMD_WRITE, 1024 * 1024, big, 0, 5),
        (NBD_CMD_READ, 200_000, 4096, 0, 0),
        (NBD_CMD_WRITE, 900 * 1024 + 7, 3000, 0, 6),
    ]
    if cut < 28:
        stream = [r for r in stream if r[2] != big]  # (a step per byte of it: too long)
    peer = Peer(ctx, file_node)
    data = b""
    for cookie, (command, offset, length, flags, seed) in enumerate(stream):
        if command == NBD_CMD_READ:
            peer.read_lengths[cookie] = length
        data += encode_request(command, cookie, offset, length, flags,
                               pattern(seed, length) if command == NBD_CMD_WRITE else b"")
    for start in range(0, len(data), cut):
        peer.send(data[start:start + cut])
        peer.step()
    replies = {r.cookie: r for r in peer.wait_replies(len(stream))}
    assert sorted(replies) == list(range(len(stream)))
    expected = pattern(99, 256 * 1024)
    for cookie, (command, offset, length, flags, seed) in enumerate(stream):
        reply = replies[cookie]
        assert isinstance(reply, SimpleReply) and reply.error == 0, cookie
        if command == NBD_CMD_READ:
            assert reply.data == expected[offset:offset + length], cookie
    assert_written(image, [(offset, length, seed) for command, offset, length, _, seed in stream
                           if command == NBD_CMD_WRITE])
    assert not peer.closed and peer.client.partial_request_bytes == 0


_COMMANDS = [NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH, NBD_CMD_DISC, 77]
_FLAGS = [0, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_DF, NBD_CMD_FLAG_NO_HOLE, 0x8000]
_SIZE = 64 * 1024


@st.composite
def _streams(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, int, bool]], list[int], bool]:
    """Requests, the read sizes of the stream's cuts, and whether the export is read-only."""
    in_range = st.tuples(st.sampled_from([0, 4096, _SIZE - 8192]), st.sampled_from([1, 4096, 8192]))
    out_of_range = st.tuples(st.sampled_from([0, _SIZE - 100, _SIZE, 1 << 40]),
                             st.sampled_from([0, 4096, _SIZE + 1, NBD_MAX_BUFFER_SIZE + 1]))
    drawn = draw(st.lists(st.tuples(
        st.sampled_from(_COMMANDS), st.sampled_from(_FLAGS), st.one_of(in_range, in_range, out_of_range),
        st.integers(0, 15).map(lambda n: n == 0)), max_size=12))  # (the last: a bad magic, now and then)
    requests = [(command, flags, offset, length, bad) for command, flags, (offset, length), bad in drawn]
    return requests, draw(st.lists(st.integers(1, 5000), min_size=1, max_size=6)), draw(st.booleans())


@settings(max_examples=200, deadline=None)
@given(_streams())
def test_the_fast_path_answers_what_the_decoder_decides(stream: tuple[list[tuple[int, int, int, int, bool]],
                                                                       list[int], bool]) -> None:
    """Any stream of requests, good and bad (flags a command does not take,
    past the end, too long, an unknown command, a bad magic, DISC, writes to
    a read-only export), cut anywhere: the connection answers each request
    the decoder returns for that stream, with the error the decoder decides,
    and nothing after a DISC or a bad magic, whichever way it served it."""
    requests, cuts, read_only = stream
    data = b""
    for cookie, (command, flags, offset, length, bad_magic) in enumerate(requests):
        payload = b"w" * length if command == NBD_CMD_WRITE and length <= 2 * _SIZE else b""
        encoded = encode_request(command, cookie, offset, length, flags, payload)
        data += (b"\x00" * 4 + encoded[4:]) if bad_magic else encoded
    decoder = NbdRequestDecoder(_SIZE, read_only=read_only, structured_replies=True)
    expected = {r.cookie: r.error for r in decoder.feed(data) if r.command != NBD_CMD_DISC or r.error}  # (DISC: none)
    with AioContext() as ctx:
        node = BlockNode(ctx, "null0", NullDriver(_SIZE))
        try:
            peer = Peer(ctx, node, structured=True, read_only=read_only)
            for cookie, (command, _, _, length, _) in enumerate(requests):
                if command == NBD_CMD_READ and expected.get(cookie) == 0:
                    peer.read_lengths[cookie] = length
            pos = i = 0
            while pos < len(data) and not peer.eof:
                try:
                    peer.send(data[pos:pos + cuts[i % len(cuts)]])
                except (BrokenPipeError, ConnectionResetError):
                    break  # (the server closed: after a bad magic, an over-long write, DISC)
                peer.step()
                pos += cuts[i % len(cuts)]
                i += 1
            peer.wait(lambda: len(peer.final()) >= len(expected) or peer.eof, "the replies")
            got = {r.cookie: (r.error if isinstance(r, SimpleReply) or r.error is not None else 0)
                   for r in peer.final()}
            assert got == expected
        finally:
            _close_all()
            node.close()
