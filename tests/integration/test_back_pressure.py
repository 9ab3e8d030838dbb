"""Back-pressure on the data plane: a client costs an iothread no more than
its credit (``protocol.CLIENT_CREDIT``) and a few queued batches, whatever it
sends and however little it reads; a client that keeps to its credit (the
block client) is never refused."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from iothreads import BlockClient
from mainloop import Cluster, bql
from protocol import CLIENT_CREDIT, DATA_SNDHWM, BlockCompletion, BlockRequest, ErrorReply, QueryReply, decode_batch, encode

from .support import Clusters

READ_BYTES = 32 << 20  # the largest request
WAIT_S = 60


@pytest.fixture
def cluster(clusters: Clusters) -> Iterator[Cluster]:
    """io0 with a 4 GiB null-co node ``null0`` (reads cost only their buffers), in process."""
    c = clusters.start("io0")
    with bql():
        replies: list[QueryReply | ErrorReply] = []
        c.blockdev_add("null0", "null-co", {"size": 4 << 30}, replies.append, "io0")
        assert c.wait_for(lambda: len(replies) == 1, 10)
        assert isinstance(replies[0], QueryReply), replies
    yield c


def _counters(c: Cluster, node: str = "") -> dict[str, int]:
    """io0's counters (or a node's), asked through the main loop."""
    replies: list[Any] = []
    with bql():
        if node:
            c.node_stats(node, replies.append)
        else:
            c.query("io0", replies.append)
        assert c.wait_for(lambda: bool(replies), 10), "io0 did not answer a query"
    assert isinstance(replies[0], QueryReply), replies
    return dict(replies[0].counters)


def _handled(c: Cluster) -> int:
    """Data-plane requests io0 has run or refused."""
    return _counters(c, "null0")["rd_operations"] + _counters(c)["data_refused"]


def _wait_handled(c: Cluster, count: int) -> None:
    with bql():
        assert c.wait_for(lambda: _handled_nested(c) >= count, WAIT_S), f"io0 did not handle {count} requests"


def _handled_nested(c: Cluster) -> int:
    replies: list[Any] = []
    c.node_stats("null0", replies.append)
    c.query("io0", replies.append)
    c.wait_for(lambda: len(replies) == 2, 10)
    ops = [r.counters for r in replies if isinstance(r, QueryReply)]
    return sum(r.get("rd_operations", 0) + r.get("data_refused", 0) for r in ops) if len(ops) == 2 else 0


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_a_client_that_never_reads_costs_an_iothread_a_bounded_amount(cluster: Cluster) -> None:
    """Regression: a client that sent 48 reads of 32 MiB and read none of
    their completions took an iothread to 1.5 GiB.  Now io0 runs what fits
    the client's credit, refuses the rest at once with EAGAIN, and holds at
    most a few batches for it: twice as many requests cost no more."""
    c = cluster
    pid = c.iothreads["io0"].pid
    zctx = zmq.Context()
    hog = zctx.socket(zmq.DEALER)
    hog.setsockopt(zmq.LINGER, 0)
    hog.setsockopt(zmq.RCVHWM, 1)  # its own ZeroMQ reads almost nothing for it either
    hog.connect(c.iothreads["io0"].data_endpoint)
    try:
        rss_before = _rss_bytes(pid)
        for i in range(48):
            hog.send_multipart(encode(BlockRequest(i, "null0", "read", i * READ_BYTES, READ_BYTES)))
        _wait_handled(c, 48)
        # The bound: the credit (64 MiB), the batches queued to the client
        # (DATA_SNDHWM, of up to 64 MiB each) and one being written out.
        bound = CLIENT_CREDIT.max_bytes + (DATA_SNDHWM + 1) * 2 * READ_BYTES
        grown = _rss_bytes(pid) - rss_before
        assert grown < bound, f"io0 grew by {grown >> 20} MiB for a client that reads nothing"
        for i in range(48, 96):
            hog.send_multipart(encode(BlockRequest(i, "null0", "read", (i % 64) * READ_BYTES, READ_BYTES)))
        _wait_handled(c, 96)
        grown = _rss_bytes(pid) - rss_before
        assert grown < bound, f"io0 grew by {grown >> 20} MiB after 48 more requests"
        # Others are served meanwhile.
        with BlockClient(c.runtime_dir, timeout_s=20) as client:
            assert client.read("null0", 0, 4096) == bytes(4096)
        # Every request gets exactly one completion: a read, or EAGAIN at once.
        statuses: dict[int, int] = {}
        while len(statuses) < 96:
            assert hog.poll(WAIT_S * 1000), f"completions missing: {sorted(set(range(96)) - set(statuses))}"
            for msg in decode_batch(hog.recv_multipart()):
                assert isinstance(msg, BlockCompletion) and msg.request_id not in statuses, msg
                statuses[msg.request_id] = msg.status
                if msg.status == 0:
                    assert len(msg.data) == READ_BYTES
                else:
                    assert msg.status == -errno.EAGAIN and "in flight" in msg.message, msg
        done = sum(1 for s in statuses.values() if s == 0)
        assert 2 <= done < 96 and _counters(c)["data_refused"] == 96 - done
    finally:
        hog.close()
        zctx.term()


def test_the_block_client_keeps_to_its_credit_and_is_never_refused(cluster: Cluster) -> None:
    """Far more submitted at once than an iothread takes from one client:
    the block client holds the rest back and sends them as completions come,
    so every request succeeds and io0 refuses none."""
    c = cluster
    count, size = 64, 4 << 20  # 256 MiB submitted at once: four times the credit's bytes
    assert count * size > 2 * CLIENT_CREDIT.max_bytes
    results: dict[int, tuple[int, int]] = {}
    with BlockClient(c.runtime_dir, timeout_s=WAIT_S) as client:
        for i in range(count):
            client.submit("null0", "read", i * size, size,
                          callback=lambda s, m, d, i=i: results.__setitem__(i, (s, len(d))))
        deadline_polls = 0
        while len(results) < count:
            client.ctx.poll(True, 1_000_000_000)
            deadline_polls += 1
            assert deadline_polls < WAIT_S, f"{count - len(results)} reads never completed"
        assert client.in_flight == 0
    assert results == {i: (0, size) for i in range(count)}
    assert _counters(c)["data_refused"] == 0
