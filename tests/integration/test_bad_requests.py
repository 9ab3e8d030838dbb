"""Bad data-plane requests against a real iothread's data socket: every one
whose request id can be read gets an error completion with that id (EINVAL,
as QEMU fails a malformed request), the rest are dropped, the iothread keeps
serving, and a burst of them logs a few lines and their count, not a line each."""

from __future__ import annotations

import errno
import os
import re
import signal
from collections import deque
from collections.abc import Iterator

import msgpack
import pytest
import zmq

from iothreads import BlockClient, BlockIOError
from mainloop import Cluster, bql
from protocol import (
    PROTOCOL_VERSION,
    BlockCompletion,
    BlockRequest,
    ErrorReply,
    Hello,
    QueryReply,
    Stop,
    Welcome,
    decode_batch,
    encode,
)

from .support import STOP_S, Clusters
from .test_worker import FakeMainLoop, spawn

WAIT_MS = 20_000


class DataSocket:
    """A client's DEALER on an iothread's data endpoint, sending raw frames."""

    def __init__(self, endpoint: str) -> None:
        self.zmq = zmq.Context()
        self.sock = self.zmq.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self._received: deque[BlockCompletion] = deque()

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self) -> BlockCompletion:
        """The next completion (several may come in one batch)."""
        while not self._received:
            assert self.sock.poll(WAIT_MS), "no completion from the iothread"
            for msg in decode_batch(self.sock.recv_multipart()):
                assert isinstance(msg, BlockCompletion), msg
                self._received.append(msg)
        return self._received.popleft()

    def close(self) -> None:
        self.sock.close()
        self.zmq.term()


@pytest.fixture
def cluster(clusters: Clusters) -> tuple[Cluster, str]:
    """io0 with a null-co node ``null0`` (1 MiB), in process: (the cluster, io0's
    data endpoint).  Heartbeats far apart: the test talks to the data socket
    without turning the main loop."""
    c = clusters.start("io0", heartbeat_interval_ms=60_000)
    with bql():
        replies: list[QueryReply | ErrorReply] = []
        c.blockdev_add("null0", "null-co", {"size": 1 << 20}, replies.append, "io0")
        assert c.wait_for(lambda: len(replies) == 1, 10)
        assert isinstance(replies[0], QueryReply), replies
    return c, c.iothreads["io0"].data_endpoint


@pytest.fixture
def data(cluster: tuple[Cluster, str]) -> Iterator[DataSocket]:
    sock = DataSocket(cluster[1])
    yield sock
    sock.close()


def _header(body: list[object], kind: str = "block-request") -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, kind, body])


def test_every_bad_request_whose_id_can_be_read_gets_an_error_completion(cluster: tuple[Cluster, str],
                                                                         data: DataSocket) -> None:
    c, _ = cluster
    read = _header([15, "null0", "read", 0, 512, 0])
    id_ends = len(_header([], "block-request")) + 1  # 15 is one byte
    cases: list[tuple[list[bytes], list[int], int]] = [
        ([_header([11, "null0", "read", -1, 512, 0])], [11], errno.EINVAL),  # a negative offset
        ([_header([12, "null0", "read", 0, -512, 0])], [12], errno.EINVAL),  # a negative length
        ([_header([13, "null0", "explode", 0, 512, 0])], [13], errno.EINVAL),  # an unknown op
        ([_header([14, "n" * 5000, "read", 0, 512, 0])], [14], errno.EINVAL),  # a node name over the limit
        ([read[:id_ends + 2]], [15], errno.EINVAL),  # a truncated frame, cut after the id
        ([_header([16, "null0", "read", "zero", 512, 0])], [16], errno.EINVAL),  # a field of the wrong type
        ([_header([17, "null0", "read", 0, 512, 0]), b"", b""], [17], errno.EINVAL),  # a frame too many
        ([msgpack.packb([PROTOCOL_VERSION, [["block-request", [18, "null0", "read", 0, 512, 0]],
                                            ["block-request", [19, "null0", "read", 0, 512, 0]]], [7]]),
          b"abc"], [18, 19], errno.EINVAL),  # a batch whose payload sizes are wrong
        ([_header([20, "nosuch", "read", 0, 512, 0])], [20], errno.ENODEV),  # well formed, no such node
    ]
    for frames, ids, err in cases:
        data.send(*frames)
        for request_id in ids:
            done = data.recv()
            assert (done.request_id, done.status) == (request_id, -err), (frames[0][:40], done)
            assert done.message
    # No id to answer: dropped.  The next completion is the good request's.
    for frames in ([b"\xc1 not msgpack at all"], [read[:id_ends - 1]], [_header([True, "null0", "read", 0, 0, 0])],
                   [_header([21], "nonsense")]):
        data.send(*frames)
    data.send(*encode(BlockRequest(22, "null0", "read", 0, 512)))
    assert data.recv() == BlockCompletion(22, 0, "", bytes(512))
    # Another client is served as well; the block client's own checks are EINVAL too, as documented.
    with BlockClient(c.runtime_dir, timeout_s=20) as client:
        assert client.read("null0", 4096, 8) == bytes(8)
        for offset, length in ((-1, 512), (0, -1)):
            with pytest.raises(BlockIOError) as info:
                client.read("null0", offset, length)
            assert info.value.errno == errno.EINVAL


def test_a_burst_of_bad_frames_logs_a_few_lines_and_counts_the_rest(clusters: Clusters) -> None:
    """Launched as a user does, the iothreads' stderr is the launcher's."""
    run = os.path.join(clusters.scratch_dir, "run")
    proc, _ = clusters.launch("--iothreads", "1", "--runtime-dir", run,
                              "--blockdev", "driver=null-co,node-name=null0,size=1M,iothread=io0")
    with BlockClient(run) as client:
        entry = client.state.iothread("io0")
    assert entry is not None
    data = DataSocket(entry.data)
    try:
        n = 1000
        for i in range(n):
            data.send(_header([i, "null0", "read", -4096, 512, 0]))
        assert sorted((d.request_id, d.status) for d in (data.recv() for _ in range(n))) == \
            [(i, -errno.EINVAL) for i in range(n)]
        for _ in range(n):
            data.send(b"\xc1 not msgpack at all")
        data.send(*encode(BlockRequest(n, "null0", "read", 0, 512)))
        assert data.recv() == BlockCompletion(n, 0, "", bytes(512))  # read after the garbage: it was all seen
    finally:
        data.close()
    proc.send_signal(signal.SIGTERM)  # the iothread exits, saying what it has not said yet
    _, err = proc.communicate(timeout=STOP_S)
    assert proc.returncode == 0, err
    logged = [line for line in err.splitlines()
              if "bad request from client" in line and "more like it suppressed" not in line]
    counts = [int(m.group(1)) for m in re.finditer(r"(\d+) more like it suppressed", err)]
    assert len(logged) + len(counts) < 30, err[-4000:]
    assert any("further ones suppressed" in line for line in logged), err[-4000:]
    # Every bad frame is accounted for: a line of its own, or in a count.
    assert len(logged) + sum(counts) == 2 * n, err[-4000:]


def test_bad_control_requests_are_answered_by_id_too() -> None:
    """The control channel, with the main loop played by the test: a request
    with a bad field is answered by its id as well (a block request with a
    completion, a control request with an error reply)."""
    fake = FakeMainLoop()
    try:
        with spawn(fake) as proc:
            identity, hello = fake.recv()
            assert isinstance(hello, Hello)
            fake.send(identity, Welcome(PROTOCOL_VERSION, hello.capabilities, 10_000))
            fake.sock.send_multipart([identity, _header([99, "null0", "read", -1, 512, 0])])
            done = fake.recv_kind(BlockCompletion)
            assert isinstance(done, BlockCompletion) and (done.request_id, done.status) == (99, -errno.EINVAL)
            fake.sock.send_multipart([identity, _header([100, 5], "query")])  # a node name that is a number
            err = fake.recv_kind(ErrorReply)
            assert isinstance(err, ErrorReply) and (err.request_id, err.errno) == (100, errno.EINVAL)
            assert "field 'node' has type int" in err.message
            fake.send(identity, Stop("test"))
            assert proc.wait(WAIT_MS / 1000) == 0
    finally:
        fake.close()
