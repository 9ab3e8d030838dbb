"""Block nodes: drivers file and null-co, data integrity, every op type,
bounds, read-only, short reads, counters, drain."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import random
from collections.abc import Iterator

import pytest

from iothreads import AioContext
from iothreads.block import _node
from iothreads.block._node import (
    HISTOGRAM_BUCKETS,
    BlockNode,
    Buffer,
    Completion,
    FileDriver,
    NullDriver,
    OpStats,
)
from iothreads.block._open import open_node
from protocol.schema import BlockdevOptions, parse
from iothreads.testing import poll_until

MiB = 1 << 20
Result = tuple[int, str, bytes]


@pytest.fixture
def image(tmp_path: object) -> Iterator[str]:
    path = os.path.join(str(tmp_path), "disk.img")
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    yield path


def run(ctx: AioContext, node: BlockNode, op: str, offset: int, length: int, data: bytes = b"") -> Result:
    results: list[Result] = []
    node.submit(op, offset, length, data, lambda s, m, d: results.append((s, m, d)))
    poll_until(lambda: ctx.poll(True), lambda: results, f"the {op} request to complete", 30)
    assert len(results) == 1
    return results[0]


def test_random_writes_then_reads_verify(ctx: AioContext, image: str) -> None:
    node = BlockNode(ctx, "disk0", FileDriver(image))
    rng = random.Random(7)
    expected = bytearray(4 * MiB)
    pending: list[Result] = []
    written = 0
    # Many in flight at once, so in disjoint slots: concurrent overlapping
    # writes have no defined order (on a real disk neither).
    slots = rng.sample(range(4 * MiB // 8192), 200)
    for slot in slots:
        off = slot * 8192 + rng.randrange(0, 4096)
        data = rng.randbytes(rng.randrange(1, 4096))
        expected[off:off + len(data)] = data
        written += len(data)
        node.submit("write", off, len(data), data, lambda s, m, d: pending.append((s, m, d)))
    poll_until(lambda: ctx.poll(True), lambda: len(pending) >= 200, "200 writes to complete", 60)
    assert all(s == 0 for s, _, _ in pending)
    assert run(ctx, node, "flush", 0, 0)[0] == 0
    for off in range(0, 4 * MiB, 256 * 1024):
        status, _, data = run(ctx, node, "read", off, 256 * 1024)
        assert status == 0 and data == expected[off:off + 256 * 1024]
    assert node.in_flight == 0
    st = node.stats["write"]
    assert st.ops == 200 and st.errors == 0 and st.bytes == written and st.mean_ns > 0
    assert sum(st.histogram) == 200 and len(st.histogram) == HISTOGRAM_BUCKETS
    node.close()


def test_discard_and_write_zeroes_read_back_zeroes(ctx: AioContext, image: str) -> None:
    node = BlockNode(ctx, "disk0", FileDriver(image))
    assert run(ctx, node, "write", 0, 65536, b"\xff" * 65536)[0] == 0
    assert run(ctx, node, "write_zeroes", 4096, 8192)[0] == 0
    assert run(ctx, node, "discard", 32768, 4096)[0] == 0
    status, _, data = run(ctx, node, "read", 0, 65536)
    assert status == 0
    assert data[:4096] == b"\xff" * 4096 and data[4096:12288] == bytes(8192)
    assert data[12288:32768] == b"\xff" * 20480
    assert data[32768:36864] in (bytes(4096), b"\xff" * 4096)  # discard may keep the data
    assert os.path.getsize(image) == 4 * MiB
    node.close()


@pytest.mark.parametrize(
    ("op", "offset", "length", "data"),
    [
        ("read", 4 * MiB - 10, 20, b""),
        ("read", -1, 10, b""),
        ("write", 4 * MiB, 1, b"x"),
        ("write", 0, 5, b"abc"),
        ("discard", 0, 4 * MiB + 1, b""),
        ("explode", 0, 1, b""),
    ],
)
def test_bad_requests_get_einval(ctx: AioContext, image: str, op: str, offset: int, length: int,
                                 data: bytes) -> None:
    node = BlockNode(ctx, "disk0", FileDriver(image))
    status, message, _ = node_result = run(ctx, node, op, offset, length, data)
    assert status == -errno.EINVAL and message, node_result
    node.close()


@pytest.mark.parametrize("driver", ["file", "null-co"])
def test_read_only_node(ctx: AioContext, image: str, driver: str) -> None:
    """read-only=on holds for every driver (null-co used to take writes): a
    write, discard or write-zeroes fails with EPERM, counted as failed."""
    options = parse(BlockdevOptions, {"driver": driver, "node-name": "ro", "read-only": True,
                                      **({"filename": image} if driver == "file" else {"size": MiB})})
    node = open_node(ctx, options)
    for op, data in (("write", b"abc"), ("discard", b""), ("write_zeroes", b"")):
        status, message, _ = run(ctx, node, op, 0, 3, data)
        assert (status, message) == (-errno.EPERM, "Block node is read-only")
        assert (node.stats[op].ops, node.stats[op].errors, node.stats[op].invalid) == (0, 1, 0)
    assert run(ctx, node, "read", 0, 3)[0] == 0
    assert run(ctx, node, "flush", 0, 0)[0] == 0
    node.close()


def test_a_read_only_file_node_opens_its_file_read_only(ctx: AioContext, image: str) -> None:
    options = parse(BlockdevOptions, {"driver": "file", "node-name": "ro", "filename": image, "read-only": True})
    node = open_node(ctx, options)
    assert isinstance(node.driver, FileDriver)
    assert fcntl.fcntl(node.driver.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    node.close()


def test_short_read_is_an_error_not_success(ctx: AioContext, image: str) -> None:
    node = BlockNode(ctx, "disk0", FileDriver(image))
    os.truncate(image, 1 * MiB)  # the image shrinks under the node
    status, message, data = run(ctx, node, "read", 1 * MiB - 100, 200)
    assert status == -errno.EIO and "short read" in message and data == b""
    node.close()


def test_null_co(ctx: AioContext) -> None:
    node = BlockNode(ctx, "null0", NullDriver(1 << 30))
    status, _, data = run(ctx, node, "read", 12345, 4096)
    assert status == 0 and data == bytes(4096)
    assert run(ctx, node, "write", 0, 4, b"abcd")[0] == 0
    assert run(ctx, node, "read", 0, 200_000)[2] == bytes(200_000)
    assert run(ctx, node, "read", 1 << 30, 1)[0] == -errno.EINVAL
    # As QEMU counts: the out-of-range read is invalid, neither an operation nor a failure.
    st = node.stats["read"]
    assert (st.ops, st.errors, st.invalid, st.bytes) == (2, 0, 1, 4096 + 200_000)
    assert sum(st.histogram) == 2


def test_direct_io_alignment(ctx: AioContext, tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "direct.img")
    with open(path, "wb") as f:
        f.truncate(MiB)
    try:
        driver = FileDriver(path, direct=True)
    except OSError as exc:
        assert "cache.direct=on is not supported" in str(exc)
        return  # this file system has no O_DIRECT: the error says so
    node = BlockNode(ctx, "d", driver)
    assert run(ctx, node, "write", 4096, 4096, b"\x5a" * 4096)[0] == 0
    assert run(ctx, node, "read", 4096, 4096)[2] == b"\x5a" * 4096
    status, message, _ = run(ctx, node, "read", 100, 4096)
    assert status == -errno.EINVAL and "multiples of 4096" in message
    # Zero bytes are aligned too: they succeed, as without O_DIRECT (no empty buffer to map).
    assert run(ctx, node, "read", 4096, 0) == (0, "", b"")
    assert run(ctx, node, "write", 4096, 0, b"")[0] == 0
    node.close()


def test_drain(ctx: AioContext, image: str) -> None:
    node = BlockNode(ctx, "disk0", FileDriver(image))
    drained: list[int] = []
    node.drain(lambda: drained.append(node.in_flight))
    assert drained == [0]  # nothing in flight: at once
    done: list[int] = []
    for i in range(16):
        node.submit("write", i * 4096, 4096, bytes(4096), lambda s, m, d: done.append(s))
    node.drain(lambda: drained.append(len(done)))
    poll_until(lambda: ctx.poll(True), lambda: len(drained) >= 2, "the drain to end", 30)
    assert drained == [0, 16]
    node.close()


def test_open_errors_are_clear(tmp_path: object) -> None:
    with pytest.raises(OSError, match="could not open"):
        FileDriver(os.path.join(str(tmp_path), "missing.img"))


def test_a_failed_file_open_closes_its_fd(tmp_path: object) -> None:
    """Regression: a file node's open that fails after the ``open`` (here: a
    directory, not a regular file or a block device) must close the fd it got."""
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(OSError, match="not a regular file"):
            FileDriver(str(tmp_path), read_only=True)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_request_over_the_size_limit_fails_at_once_with_einval() -> None:
    """Regression: a request larger than a request may be (16 GiB, far over
    the limit a message can carry) is refused with EINVAL through its
    callback, at once, and leaves nothing in flight."""
    with AioContext() as ctx:
        node = BlockNode(ctx, "null0", NullDriver(1 << 40))
        results: list[int] = []
        node.submit("read", 0, 1 << 34, b"", lambda s, m, d: results.append(s))
        assert results == [-errno.EINVAL] and node.in_flight == 0


def test_a_batch_of_operations_is_counted_each_with_their_mean_latency() -> None:
    """OpStats.record with a count: ops, bytes and the total time as given;
    each operation in the histograms (the log2 one and a user-set one) with
    the mean latency."""
    st = OpStats()
    st.set_histogram((4_000, 8_000))
    st.record(3 * 4096, 3 * 5_000, True, 3)  # 5 us each
    st.record(512, 20_000, False)
    assert (st.ops, st.bytes, st.errors, st.total_ns) == (3, 3 * 4096, 1, 35_000)
    assert st.histogram[2] == 3 and st.histogram[4] == 1 and sum(st.histogram) == 4  # [4, 8) us, [16, 32) us
    assert st.bins == [0, 3, 1]


def test_cached_reader_fills_buffers_with_what_the_page_cache_holds(ctx: AioContext, image: str) -> None:
    node = BlockNode(ctx, "disk0", FileDriver(image))
    reader = node.cached_reader()
    assert reader is not None
    with open(image, "r+b") as f:
        f.write(b"\x5a" * 8192)
    buf = bytearray(8192)
    assert reader(0, buf) and buf == b"\x5a" * 8192  # (just written: in the page cache)
    view = memoryview(bytearray(16384))[4096:12288]  # (a slice of a larger buffer, as a slab's)
    assert reader(0, view) and bytes(view) == b"\x5a" * 8192
    assert not reader(4 * MiB - 100, bytearray(200))  # past the end: short, left to submit
    assert node.stats["read"].ops == 0 and node.in_flight == 0  # not accounted: its caller does that
    node.account_cached_reads(2, 8192, 6_000)
    st = node.stats["read"]
    assert (st.ops, st.bytes, st.total_ns, st.histogram[1]) == (2, 8192, 6_000, 2)
    node.close()
    null = BlockNode(ctx, "null0", NullDriver(4 * MiB, read_zeroes=True))
    null_reader = null.cached_reader()
    assert null_reader is not None
    for length in (4096, 100_000):  # within its buffer of zeroes, and past it
        used = bytearray(b"\xff" * length)  # (a reused buffer: its old bytes must not show)
        assert null_reader(0, used) and used == bytes(length)
    null.close()


def test_write_cached_takes_whole_pages_into_the_page_cache_and_counts_them(ctx: AioContext, image: str) -> None:
    node = BlockNode(ctx, "disk0", FileDriver(image))
    page = mmap.PAGESIZE
    assert node.write_cached(page, b"\x11" * 2 * page)
    # Not here: a part of a page (it may have to be read first), past the end, nothing, a large one (the
    # pool's: the home thread receives the next meanwhile).
    assert not node.write_cached(page + 512, b"\x22" * page)
    assert not node.write_cached(4 * MiB, b"\x22" * page)
    assert not node.write_cached(0, b"")
    assert not node.write_cached(0, b"\x22" * (_node.INLINE_WRITE_MAX_BYTES + page))
    st = node.stats["write"]
    assert (st.ops, st.bytes, st.errors, sum(st.histogram)) == (1, 2 * page, 0, 1) and st.total_ns > 0
    with open(image, "rb") as f:
        assert f.read(4 * page) == bytes(page) + b"\x11" * 2 * page + bytes(page)
    node.close()
    read_only = BlockNode(ctx, "ro", FileDriver(image, read_only=True), read_only=True)
    assert not read_only.write_cached(0, bytes(page))  # (submit refuses it with EPERM)
    read_only.close()
    assert BlockNode(ctx, "null0", NullDriver(MiB)).write_cached(0, bytes(page))


def test_an_inline_write_that_slept_sends_the_next_ones_to_the_pool(ctx: AioContext,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that waited in the kernel (here: a driver during which the
    thread's count of voluntary context switches rises, as it does for a
    writer the kernel throttles) makes the node send the next writes to the
    thread pool, for a while."""
    switches = [0]
    monkeypatch.setattr(_node, "_sleeps", lambda: switches[0])
    monkeypatch.setattr(_node, "INLINE_WRITE_STALL_NS", 0)  # any time at all counts as long
    monkeypatch.setattr(_node, "INLINE_WRITE_BACKOFF_NS", 3600 * 10**9)  # (the test's own pace cannot end it)

    class Throttled(NullDriver):
        def write_nowait(self, offset: int, data: Buffer) -> bool:
            switches[0] += 1  # it slept in the kernel
            return True

    node = BlockNode(ctx, "slow0", Throttled(MiB))
    assert node.write_cached(0, bytes(4096))
    assert not node.write_cached(4096, bytes(4096))
    assert run(ctx, node, "write", 4096, 4096, bytes(4096))[0] == 0  # (the usual way, through the pool)
    assert node.stats["write"].ops == 2


class FailingAt(FileDriver):
    """A file whose writes at one offset fail with EIO."""

    bad_offset = 8192

    def write(self, offset: int, data: Buffer, rwf_flags: int = 0) -> None:
        if offset == self.bad_offset:
            raise OSError(errno.EIO, "Input/output error")
        super().write(offset, data, rwf_flags)


def test_submit_writes_runs_buffered_writes_as_one_job_each_with_its_own_status(ctx: AioContext,
                                                                                 image: str) -> None:
    node = BlockNode(ctx, "disk0", FailingAt(image))
    results: dict[int, tuple[int, str]] = {}

    def done(offset: int) -> Completion:
        return lambda status, message, data: results.__setitem__(offset, (status, message))

    jobs = ctx.thread_pool.stats()["completed_total"]
    node.submit_writes([(offset, bytes([offset // 4096]) * 4096, done(offset))
                        for offset in (0, 4096, 8192, 12288)]
                       + [(4 * MiB, bytes(4096), done(4 * MiB))])  # past the end: refused at once
    assert results == {4 * MiB: (-errno.EINVAL, results[4 * MiB][1])} and node.in_flight == 4
    poll_until(lambda: ctx.poll(True), lambda: len(results) == 5, "the writes to complete", 30)
    assert ctx.thread_pool.stats()["completed_total"] == jobs + 1  # one job for the four
    assert results[8192] == (-errno.EIO, "Input/output error")
    assert all(results[offset] == (0, "") for offset in (0, 4096, 12288))
    st = node.stats["write"]
    assert (st.ops, st.bytes, st.errors, st.invalid, sum(st.histogram)) == (3, 3 * 4096, 1, 1, 4)
    with open(image, "rb") as f:
        assert f.read(16384) == bytes(4096) + b"\x01" * 4096 + bytes(4096) + b"\x03" * 4096
    assert node.in_flight == 0
    node.close()


def test_submit_writes_to_a_read_only_node_fails_each_with_eperm(ctx: AioContext, image: str) -> None:
    node = BlockNode(ctx, "ro", FileDriver(image, read_only=True), read_only=True)
    results: list[int] = []
    node.submit_writes([(0, bytes(512), lambda s, m, d: results.append(s))] * 2)
    assert results == [-errno.EPERM] * 2 and node.stats["write"].errors == 2 and node.in_flight == 0
    node.close()
