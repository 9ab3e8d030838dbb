"""NBD connections served by an iothread process, against a main loop played
by the test: the test hands a connected socket over the handoff socket (as
the main loop does once a handshake is done) and speaks NBD's transmission
phase on the other end; the worker hands connections back when their node
moves, and reports the ones that close."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import termios
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest

from protocol import (
    PROTOCOL_VERSION,
    BlockdevAdd,
    BlockdevDel,
    ErrorReply,
    Event,
    Message,
    NbdCloseExport,
    NbdConnection,
    Query,
    QueryReply,
    Stop,
    Welcome,
    decode_batch,
    handoff_pair,
    receive_connection,
    send_connection,
)
from protocol.nbd import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_MAX_BUFFER_SIZE,
    NBD_META_CONTEXT_ALLOCATION_DEPTH,
    NBD_META_CONTEXT_BASE_ALLOCATION,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    encode_request,
)
from iothreads.testing import wait_until
from tests.protocol.nbd_model import Chunk, SimpleReply, read_replies

from .test_worker import WAIT_MS, FakeMainLoop, fake, spawn

__all__ = ["fake"]  # the fixture, used by the tests here

MiB = 1 << 20
IMAGE_BYTES = 8 * MiB
FLAGS = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA
CONTEXTS = {NBD_META_CONTEXT_BASE_ALLOCATION: 0, NBD_META_CONTEXT_ALLOCATION_DEPTH: 1}


def pattern(seed: int, length: int) -> bytes:
    return bytes((seed * 31 + i) & 0xFF for i in range(256)) * (length // 256) + bytes(length % 256)


class Client:
    """An NBD client in its transmission phase (blocking, with a bound on every wait)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(WAIT_MS / 1000)
        self.buffer = b""
        self.read_lengths: dict[int, int] = {}
        self.replies: list[SimpleReply | Chunk] = []
        self.keep_data = True

    def request(self, command: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"") -> None:
        if command == NBD_CMD_READ:
            self.read_lengths[cookie] = length
        self.sock.sendall(encode_request(command, cookie, offset, length, flags, payload))

    def receive(self) -> bool:
        """Read what comes (False at the end of the stream)."""
        data = self.sock.recv(1 << 20)
        replies, self.buffer = read_replies(self.buffer + data, self.read_lengths)
        self.replies += replies if self.keep_data else [replace(r, data=b"") for r in replies]
        return bool(data)

    def unread_bytes(self) -> int:
        """What this end sent that the other has not read yet (SIOCOUTQ)."""
        return int(struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])

    def final(self) -> list[SimpleReply | Chunk]:
        return [r for r in self.replies if isinstance(r, SimpleReply) or r.done]

    def wait(self, n: int) -> list[SimpleReply | Chunk]:
        """Until ``n`` replies are complete."""
        while len(self.final()) < n:
            assert self.receive(), f"the connection closed after {len(self.final())} of {n} replies"
        return self.final()

    def of(self, cookie: int) -> list[SimpleReply | Chunk]:
        return [r for r in self.replies if r.cookie == cookie]

    def read(self, cookie: int, offset: int, length: int) -> bytes:
        self.request(NBD_CMD_READ, cookie, offset, length)
        while not any(isinstance(r, SimpleReply) or r.done for r in self.of(cookie)):
            assert self.receive(), "the connection closed"
        parts = self.of(cookie)
        if isinstance(parts[0], SimpleReply):
            assert parts[0].error == 0
            return parts[0].data
        data = bytearray(length)
        for chunk in parts:
            assert isinstance(chunk, Chunk) and chunk.error is None
            if chunk.offset is not None:
                data[chunk.offset - offset:chunk.offset - offset + len(chunk.data)] = chunk.data
        return bytes(data)

    def wait_eof(self) -> None:
        while self.receive():
            pass


class Harness:
    """A welcomed iothread serving file node "disk0" on ``image``, with its handoff socket."""

    def __init__(self, fake: FakeMainLoop, identity: bytes, handoff: socket.socket, pid: int, image: str) -> None:
        self.fake = fake
        self.identity = identity
        self.handoff = handoff
        self.pid = pid
        self.image = image
        self.next_id = 1
        self.request_id = 100
        self.kept: list[Message] = []

    def connect(self, *, export: str = "e0", node: str = "disk0", flags: int = FLAGS, structured: bool = False,
                contexts: dict[str, int] | None = None, pending: bytes = b"") -> tuple[Client, NbdConnection]:
        """A connection handed over, as the main loop hands one after its handshake."""
        ours, served = socket.socketpair()
        conn = NbdConnection(self.next_id, export, node, flags, structured, contexts or {}, pending)
        self.next_id += 1
        send_connection(self.handoff, served.fileno(), conn)
        served.close()
        return Client(ours), conn

    def _take(self, wanted: Callable[[Message], bool]) -> Message:
        """The first message ``wanted``; the others are kept for later."""
        while True:
            for i, msg in enumerate(self.kept):
                if wanted(msg):
                    return self.kept.pop(i)
            assert self.fake.sock.poll(WAIT_MS), "no message from the worker"
            for got in decode_batch(self.fake.sock.recv_multipart()[1:]):  # (messages may come in batches)
                assert isinstance(got, Message), got
                self.kept.append(got)

    def ask(self, msg_of_id: Callable[[int], Message]) -> QueryReply:
        self.request_id += 1
        rid = self.request_id
        self.fake.send(self.identity, msg_of_id(rid))
        reply = self._take(lambda m: isinstance(m, (QueryReply, ErrorReply)) and m.request_id == rid)
        assert isinstance(reply, QueryReply), reply
        return reply

    def closed_event(self) -> dict[str, object]:
        event = self._take(lambda m: isinstance(m, Event) and m.name == "NBD_CONNECTION_CLOSED")
        assert isinstance(event, Event)
        return dict(event.data)

    def counters(self) -> dict[str, int]:
        return self.ask(Query).counters


@contextmanager
def worker(fake: FakeMainLoop, tmp_path: object) -> Iterator[Harness]:
    image = os.path.join(str(tmp_path), "disk.img")
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    main_end, child_end = handoff_pair()
    try:
        with spawn(fake, "--handoff-fd", str(child_end.fileno()), pass_fds=(child_end.fileno(),)) as proc:
            child_end.close()
            identity, _ = fake.recv()
            fake.send(identity, Welcome(PROTOCOL_VERSION, (), 10_000))
            harness = Harness(fake, identity, main_end, proc.pid, image)
            harness.ask(lambda rid: BlockdevAdd(rid, "disk0", "file", {"filename": image}))
            yield harness
            fake.send(identity, Stop("test"))
            assert proc.wait(WAIT_MS / 1000) == 0
    finally:
        main_end.close()
        if child_end.fileno() >= 0:
            child_end.close()


def test_io_over_a_handed_over_connection(fake: FakeMainLoop, tmp_path: object) -> None:
    """Writes with patterns (FUA among them), flush, reads that verify, trim
    and write-zeroes; then NBD_CMD_DISC: closed, and reported."""
    with worker(fake, str(tmp_path)) as w:
        client, conn = w.connect()
        writes = [(i * 1_000_003 % (IMAGE_BYTES - 65536), 512 * (i + 1)) for i in range(12)]
        for i, (offset, length) in enumerate(writes):
            client.request(NBD_CMD_WRITE, 10 + i, offset, length, NBD_CMD_FLAG_FUA if i % 3 == 0 else 0,
                           pattern(i, length))
        client.request(NBD_CMD_FLUSH, 99)
        assert all(isinstance(r, SimpleReply) and r.error == 0 for r in client.wait(13))
        for i, (offset, length) in enumerate(writes):
            assert client.read(100 + i, offset, length) == pattern(i, length)
        with open(w.image, "rb") as f:
            for i, (offset, length) in enumerate(writes):
                f.seek(offset)
                assert f.read(length) == pattern(i, length)
        client.request(NBD_CMD_WRITE, 200, 0, 65536, 0, b"\xee" * 65536)
        client.request(NBD_CMD_TRIM, 201, 0, 4096)
        client.request(NBD_CMD_WRITE_ZEROES, 202, 4096, 4096, NBD_CMD_FLAG_NO_HOLE)
        client.request(NBD_CMD_WRITE_ZEROES, 203, 8192, 4096, NBD_CMD_FLAG_FUA)
        n = len(client.final())
        assert all(r.error == 0 for r in client.wait(n + 4)[n:] if isinstance(r, SimpleReply))
        assert client.read(300, 0, 16384) == bytes(12288) + b"\xee" * 4096
        client.request(NBD_CMD_DISC, 400)
        client.wait_eof()
        assert w.closed_event() == {"connection": conn.connection_id, "export": "e0"}
        assert w.counters()["nbd_connections"] == 0


def test_block_status_of_a_sparse_file(fake: FakeMainLoop, tmp_path: object) -> None:
    with worker(fake, str(tmp_path)) as w:
        with open(w.image, "r+b") as f:
            f.seek(2 * MiB)
            f.write(b"\x01" * MiB)
        client, _ = w.connect(structured=True, contexts=CONTEXTS)
        client.request(NBD_CMD_BLOCK_STATUS, 1, 0, IMAGE_BYTES)
        client.wait(1)
        base, depth = client.of(1)
        assert isinstance(base, Chunk) and isinstance(depth, Chunk)
        assert (base.context_id, depth.context_id, base.done, depth.done) == (0, 1, False, True)
        hole = NBD_STATE_HOLE | NBD_STATE_ZERO
        if base.extents == ((IMAGE_BYTES, 0),):
            pytest.skip("this file system does not report holes (SEEK_HOLE)")
        assert base.extents == ((2 * MiB, hole), (MiB, 0), (IMAGE_BYTES - 3 * MiB, hole))
        assert depth.extents == ((IMAGE_BYTES, 1),)


@pytest.mark.parametrize("structured", [False, True])
def test_a_read_only_export_refuses_writes_and_stays_in_step(fake: FakeMainLoop, tmp_path: object,
                                                            structured: bool) -> None:
    """The error is QEMU's (EINVAL: its nbd_trip answers every refused request
    so; qemu-nbd -r does), the payload is read and dropped."""
    with worker(fake, str(tmp_path)) as w:
        client, _ = w.connect(flags=FLAGS | NBD_FLAG_READ_ONLY, structured=structured)
        client.request(NBD_CMD_WRITE, 1, 0, 100_000, 0, b"\xff" * 100_000)
        client.request(NBD_CMD_WRITE_ZEROES, 2, 0, 4096)
        client.request(NBD_CMD_TRIM, 3, 0, 4096)
        assert client.read(4, 0, 4096) == bytes(4096)
        replies = {r.cookie: r for r in client.wait(4)}
        assert all(replies[c].error == NBD_EINVAL for c in (1, 2, 3))
        with open(w.image, "rb") as f:
            assert f.read(100_000) == bytes(100_000)


def test_an_over_long_read_is_refused_and_a_bad_magic_ends_the_connection(fake: FakeMainLoop,
                                                                          tmp_path: object) -> None:
    with worker(fake, str(tmp_path)) as w:
        client, conn = w.connect()
        client.request(NBD_CMD_READ, 1, 0, NBD_MAX_BUFFER_SIZE + 1)
        client.request(NBD_CMD_READ, 2, IMAGE_BYTES - 100, 200)
        assert [(r.cookie, r.error) for r in client.wait(2)] == [(1, NBD_EINVAL), (2, NBD_EINVAL)]
        assert client.read(3, 0, 512) == bytes(512)
        client.sock.sendall(struct.pack(">IHHQQI", 0x12345678, 0, NBD_CMD_READ, 77, 0, 512))
        client.wait_eof()
        assert (client.final()[-1].cookie, client.final()[-1].error) == (77, NBD_EINVAL)
        assert w.closed_event() == {"connection": conn.connection_id, "export": "e0"}
        other, _ = w.connect()  # the iothread goes on
        assert other.read(1, 0, 512) == bytes(512)


def test_many_requests_pipelined_in_one_write(fake: FakeMainLoop, tmp_path: object) -> None:
    with worker(fake, str(tmp_path)) as w:
        client, _ = w.connect(structured=True)
        burst = b"".join(encode_request(NBD_CMD_WRITE, i, i * 4096, 4096, 0, pattern(i, 4096)) for i in range(500))
        client.sock.sendall(burst)
        assert sorted(r.cookie for r in client.wait(500)) == list(range(500))
        for i in range(500):
            client.read_lengths[1000 + i] = 4096
        client.sock.sendall(b"".join(encode_request(NBD_CMD_READ, 1000 + i, i * 4096, 4096) for i in range(500)))
        client.wait(1000)
        data = {r.cookie: r.data for r in client.replies if isinstance(r, Chunk) and r.cookie >= 1000}
        assert all(data[1000 + i] == pattern(i, 4096) for i in range(500))


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_never_reads_costs_the_iothread_a_bounded_amount(fake: FakeMainLoop,
                                                                       tmp_path: object) -> None:
    """It sends read requests and reads nothing: the iothread stops reading
    it (what it holds for it stays within the connection's credit) rather
    than grow; once it reads, every request is answered."""
    with worker(fake, str(tmp_path)) as w:
        client, _ = w.connect()
        client.keep_data = False
        length = 16 * 1024
        total = 20_000  # 560 KB of requests (more than the socket holds), 320 MiB of replies asked for
        for i in range(total):
            client.read_lengths[i] = length
        requests = b"".join(encode_request(NBD_CMD_READ, i, (i % 400) * length, length) for i in range(total))
        before = _rss_bytes(w.pid)
        client.sock.setblocking(False)
        sent = 0
        held: list[int] = []
        while sent < len(requests) and len(held) < 20:
            try:
                sent += client.sock.send(requests[sent:])
            except BlockingIOError:
                counters = w.counters()
                held.append(counters["nbd_bytes_in_flight"] + counters["nbd_reply_backlog_bytes"])
        assert sent < len(requests)  # the client's sends blocked: the iothread stopped reading it
        grown = _rss_bytes(w.pid) - before
        assert max(held) <= 1024 * length + 64 * 1024  # its credit: 1024 requests (and the replies' headers)
        assert grown < 160 * MiB, f"the iothread grew by {grown >> 20} MiB"
        while len(client.final()) < total:
            readable, writable, _ = select.select([client.sock], [client.sock] if sent < len(requests) else [], [],
                                                  WAIT_MS / 1000)
            assert readable or writable, f"no progress after {len(client.final())} replies"
            if writable:
                sent += client.sock.send(requests[sent:sent + 65536])
            if readable:
                assert client.receive()
        assert sorted(r.cookie for r in client.final()) == list(range(total))


def test_a_moving_node_hands_its_connection_back_with_the_bytes_not_handled(fake: FakeMainLoop,
                                                                            tmp_path: object) -> None:
    """BlockdevDel(moving): the requests in flight complete and are answered,
    the connection comes back over the handoff socket (before the answer)
    with the part of a request read so far; handed over again once the node
    is back, the request completes."""
    with worker(fake, str(tmp_path)) as w:
        client, conn = w.connect()
        for i in range(20):
            client.request(NBD_CMD_WRITE, i, i * 65536, 65536, 0, pattern(i, 65536))
        read = encode_request(NBD_CMD_READ, 99, 0, 65536)
        client.sock.sendall(read[:13])
        client.read_lengths[99] = 65536
        client.wait(20)
        wait_until(lambda: client.unread_bytes() == 0, "the iothread to read the start of the next request")
        w.ask(lambda rid: BlockdevDel(rid, "disk0", moving=True))
        received = receive_connection(w.handoff)  # there before the answer
        assert received is not None
        fd, back = received
        assert back == replace(conn, pending=read[:13])
        assert w.counters()["nbd_connections"] == 0
        w.ask(lambda rid: BlockdevAdd(rid, "disk0", "file", {"filename": w.image}))  # its new home: here again
        send_connection(w.handoff, fd, back)
        os.close(fd)
        client.sock.sendall(read[13:])
        client.wait(21)
        data = client.of(99)[0]
        assert isinstance(data, SimpleReply) and data.error == 0 and data.data == pattern(0, 65536)
        assert w.counters()["nbd_connections"] == 1


def test_a_connection_handed_over_for_a_node_moving_away_goes_straight_back(fake: FakeMainLoop,
                                                                           tmp_path: object) -> None:
    with worker(fake, str(tmp_path)) as w:
        w.ask(lambda rid: BlockdevDel(rid, "disk0", moving=True))
        _, conn = w.connect(pending=b"\x25\x60")
        w.handoff.setblocking(True)
        w.handoff.settimeout(WAIT_MS / 1000)
        received = receive_connection(w.handoff)
        assert received is not None and received[1] == conn
        os.close(received[0])


def test_nbd_close_export_closes_its_connections_and_counts_them(fake: FakeMainLoop, tmp_path: object) -> None:
    with worker(fake, str(tmp_path)) as w:
        clients = [w.connect(export="e0") for _ in range(2)]
        other, _ = w.connect(export="e1")
        for client, _ in clients:
            assert client.read(1, 0, 512) == bytes(512)  # served, now
        reply = w.ask(lambda rid: NbdCloseExport(rid, "e0"))
        assert reply.counters == {"closed": 2}
        events = [w.closed_event(), w.closed_event()]
        assert sorted(int(str(e["connection"])) for e in events) == sorted(c.connection_id for _, c in clients)
        for client, _ in clients:
            client.wait_eof()
        assert other.read(1, 0, 512) == bytes(512)
        assert w.counters()["nbd_connections"] == 1


def test_a_connection_for_a_node_not_here_is_closed_and_reported(fake: FakeMainLoop, tmp_path: object) -> None:
    with worker(fake, str(tmp_path)) as w:
        client, conn = w.connect(node="nowhere")
        assert w.closed_event() == {"connection": conn.connection_id, "export": "e0"}
        client.wait_eof()
