"""Block nodes: the drivers (``file``, ``null-co``) and a node's request path.

Theory of operation
-------------------
A ``BlockNode`` lives in one AioContext (its iothread's) and is used from that
context's home thread only.  ``open_node`` makes one from validated
``BlockdevOptions`` (the schema's).  ``submit`` checks a request (bounds,
alignment) and runs it; on a read-only node, whatever its driver, a write,
discard or write-zeroes fails with EPERM ("Block node is read-only", as
QEMU says), counted as a failed operation:

* a read first tries ``preadv(..., RWF_NOWAIT)`` inline: data already in the
  page cache is returned without a thread hand-off (how io_uring avoids one);
  if the kernel would block (EAGAIN), the read goes to the thread pool;
* everything else runs in the context's thread pool, whose completion bottom
  half calls back in the home thread.

A caller with many requests at once (the NBD server) has a faster way for
the common ones, with the same checks, results and counters:
``cached_reader`` (reads served from the page cache, inline, no callback),
``write_cached`` (a small write of whole pages taken into the page cache, inline:
``RWF_NOWAIT`` where the file system has it for buffered writes, else a plain
``pwritev`` watched for a write that slept, after which the next ones go to
the pool for a while), and ``submit_writes`` (buffered writes run as one
thread-pool job, one hand-off for all of them).  ``cache.direct=on`` keeps
the pool for every write, one job each.

Every request completes exactly once, through its callback, with a status
(0 or a negative errno), a message on error, and a read's data (the buffer the
driver read into, not a copy of it).  A short read or write is never passed
off as success: the driver loops until the whole range is done and reports
EIO if the file ends first.

A request that fails with an I/O error (not a refusal: invalid, read-only)
goes through the node's error policy, QEMU's ``werror`` (writes, write-zeroes,
discards, flushes) and ``rerror`` (reads): ``report`` completes it with the
error, ``ignore`` with success, ``stop`` (and ``enospc`` for ENOSPC) holds it
until ``resume`` submits it again (or ``close`` fails it); the error
listener hears of each (the worker's BLOCK_IO_ERROR event).

Request flags, QEMU's ``BDRV_REQ_*``: ``BDRV_REQ_FUA`` makes a write durable
before it completes (the driver's own way, ``RWF_DSYNC`` for a file, or a
flush after it); ``BDRV_REQ_MAY_UNMAP`` lets write-zeroes punch a hole and
``BDRV_REQ_NO_FALLBACK`` refuses it (ENOTSUP) where zeroes would have to be
written out (NBD's NO_HOLE, which clears the first, and FAST_ZERO).

``block_status`` says, for a range, which extents hold data and which read
as zeroes (QEMU's ``bdrv_block_status``: ``BDRV_BLOCK_DATA``,
``BDRV_BLOCK_ZERO``): a file from ``SEEK_DATA``/``SEEK_HOLE``, null-co
neither data nor, unless it reads zeroes, zero.  It runs inline in the home
thread, as QEMU's file driver runs its ``lseek``.

Per node: counters per operation (ops, bytes, errors, total latency, and a
log2 latency histogram), the number of requests in flight, and ``drain``,
which calls back once nothing is in flight.  A request's latency is from
its submission to its completion, as QEMU's block accounting measures it;
reads served by a ``cached_reader`` one after the other are accounted by their
caller as a run (``account_cached_reads``): the run's total time exactly,
each read in the histograms with the run's mean.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import functools
import logging
import mmap
import os
import resource
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from protocol import BlockOp
from protocol.schema import BlockdevOnError, BlockdevOptionsBase, BlockdevOptionsFile, BlockdevOptionsNull

from ..aio._context import AioContext
from ..aio._threadpool import ThreadPoolRequest

log = logging.getLogger("iothreads.block")

__all__ = ["BDRV_BLOCK_DATA", "BDRV_BLOCK_ZERO", "BDRV_REQ_FUA", "BDRV_REQ_MAY_UNMAP", "BDRV_REQ_NO_FALLBACK",
           "BlockDriver", "BlockNode", "Buffer", "FileDriver", "NullDriver", "OpStats", "make_driver",
           "merge_extents", "request_problem"]

Buffer = bytes | bytearray | memoryview  # a write's data, a read's (a memoryview: of bytes, format "B")
Completion = Callable[[int, str, Buffer], object]  # (status, message, data)
# (operation, errno, message, action): a request failed with an I/O error, and its policy said what it does
ErrorListener = Callable[[str, int, str, str], object]
Extents = list[tuple[int, int]]  # (length, BDRV_BLOCK_* flags), consecutive

# Request flags (QEMU's BdrvRequestFlags, same values).
BDRV_REQ_MAY_UNMAP = 0x4
BDRV_REQ_FUA = 0x10
BDRV_REQ_NO_FALLBACK = 0x100
# Block status (QEMU's BDRV_BLOCK_*): the extent holds data / reads as zeroes.
BDRV_BLOCK_DATA = 0x1
BDRV_BLOCK_ZERO = 0x2

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1 << 20
HISTOGRAM_BUCKETS = 32  # bucket i: latency in [2**i, 2**(i+1)) microseconds (0: < 2 us)
MAX_REQUEST_BYTES = 32 * 1024 * 1024  # one request's data: well under the channel's frame limit
INLINE_WRITE_MAX_BYTES = 64 * 1024  # larger writes are done by the pool, while the home thread receives more
INLINE_WRITE_STALL_NS = 1_000_000  # an inline write that slept this long: the pool takes the next ones...
INLINE_WRITE_BACKOFF_NS = 1_000_000_000  # ...for this long, twice as long each time it happens again...
INLINE_WRITE_BACKOFF_MAX_NS = 64_000_000_000  # ...up to this (and after this long without, from the start)
_WRITING_OPS = frozenset((BlockOp.WRITE, BlockOp.DISCARD, BlockOp.WRITE_ZEROES))
_BLOCK_OPS = frozenset(op.value for op in BlockOp)
_READ, _WRITE = BlockOp.READ.value, BlockOp.WRITE.value  # (plain strings: the cheapest keys)


def merge_extents(extents: Extents) -> Extents:
    """Consecutive extents with the same flags made one."""
    merged: Extents = []
    for extent_bytes, flags in extents:
        if merged and merged[-1][1] == flags:
            merged[-1] = (merged[-1][0] + extent_bytes, flags)
        else:
            merged.append((extent_bytes, flags))
    return merged


def request_problem(op: str, offset: int, length: int, data: Buffer = b"") -> str | None:
    """Why a request is invalid on any node (QEMU's EINVAL), or None: an
    unknown operation, a write whose data is not its length, more than
    ``MAX_REQUEST_BYTES``, a negative offset or length.  A node checks the
    rest (its size, its alignment); a client checks this before sending."""
    if op not in _BLOCK_OPS:
        return f"unknown operation {op!r}"
    if op == BlockOp.FLUSH:
        return None
    if op == BlockOp.WRITE and length != len(data):
        return f"write of {len(data)} bytes declared as {length}"
    if length > MAX_REQUEST_BYTES:
        return f"a request of {length} bytes exceeds the limit of {MAX_REQUEST_BYTES}"
    if offset < 0 or length < 0:
        return f"offset and length must be >= 0, not {offset} and {length}"
    return None


class BlockDriver:
    """What a node needs from its driver.  The I/O methods block; they run in
    worker threads (or inline for ``read_nowait``)."""

    name = "driver"
    size = 0
    align = 1  # offsets and lengths must be multiples of this
    reads_nowait = False  # whether ``read_nowait`` may return data
    buffered_writes = False  # writes land in memory (the page cache) and seldom wait for the device

    def read(self, offset: int, length: int) -> Buffer:
        raise NotImplementedError

    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        """The data if it can be had without blocking, else None."""
        buf = bytearray(length)
        return buf if self.read_into_nowait(offset, buf) else None

    def read_into_nowait(self, offset: int, buf: bytearray | memoryview) -> bool:
        """Fill ``buf`` with the data at ``offset`` if that can be done
        without blocking, and say so; False if not (``buf`` then holds
        anything).  Errors other than "would block" raise ``OSError``."""
        return False

    def write(self, offset: int, data: Buffer) -> None:
        raise NotImplementedError

    def write_nowait(self, offset: int, data: Buffer) -> bool:
        """Write ``data`` at once if that is not expected to wait for the
        device, and say so; False if not (nothing written, or a part of it:
        the whole write is to be done the usual way)."""
        return False

    def write_fua(self, offset: int, data: Buffer) -> None:
        """A write that is durable once this returns: a flush after it,
        unless the driver has a way of its own."""
        self.write(offset, data)
        self.flush()

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False,
                     no_fallback: bool = False) -> None:
        """Zeroes; ``may_unmap``: a hole will do; ``no_fallback``: ENOTSUP
        rather than writing zeroes out (BDRV_REQ_NO_FALLBACK)."""
        raise NotImplementedError

    def block_status(self, offset: int, length: int, max_extents: int) -> Extents:
        """The extents of ``[offset, offset + length)`` (at most ``max_extents``
        of them, covering the start of the range at least): all data, by default."""
        return [(length, BDRV_BLOCK_DATA)]

    def close(self) -> None:
        pass


class NullDriver(BlockDriver):
    """``null-co``: no I/O at all.  Reads return zeroes when ``read_zeroes``
    (and unspecified data otherwise: here, zeroes too, without the cost of
    clearing a fresh buffer)."""

    name = "null-co"
    reads_nowait = True
    buffered_writes = True

    def __init__(self, size: int, read_zeroes: bool = False) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self.size = size
        self.read_zeroes = read_zeroes
        self._zeroes = bytes(65536)

    def read(self, offset: int, length: int) -> Buffer:
        return memoryview(self._zeroes)[:length] if length <= len(self._zeroes) else bytes(length)

    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        return self.read(offset, length)

    def read_into_nowait(self, offset: int, buf: bytearray | memoryview) -> bool:
        buf[:] = bytes(len(buf)) if len(buf) > len(self._zeroes) else memoryview(self._zeroes)[:len(buf)]
        return True

    def write(self, offset: int, data: Buffer) -> None:
        pass

    def write_nowait(self, offset: int, data: Buffer) -> bool:
        return True

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False,
                     no_fallback: bool = False) -> None:
        pass

    def block_status(self, offset: int, length: int, max_extents: int) -> Extents:
        # QEMU's null_co_block_status: never data; zeroes if it reads zeroes.
        return [(length, BDRV_BLOCK_ZERO if self.read_zeroes else 0)]


class FileDriver(BlockDriver):
    """``file``: a raw image (or block device)."""

    name = "file"

    def __init__(self, filename: str, *, read_only: bool = False, direct: bool = False) -> None:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(filename, flags)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise OSError(errno.EINVAL, f"{filename}: cache.direct=on is not supported by its "
                                            "file system") from None
            raise OSError(exc.errno, f"could not open '{filename}': {exc.strerror}") from None
        try:
            mode = os.fstat(self.fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise OSError(errno.EINVAL, f"'{filename}' is not a regular file or a block device")
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self.fd)
            raise
        self.filename = filename
        self.read_only = read_only
        self.direct = direct
        self.align = 4096 if direct else 1
        self.reads_nowait = hasattr(os, "RWF_NOWAIT") and not direct
        self.buffered_writes = not direct
        self._write_nowait = self.reads_nowait  # RWF_NOWAIT for buffered writes (until refused)
        self._dsync = hasattr(os, "RWF_DSYNC")  # a write's own FUA
        self._seek_data = True  # SEEK_DATA/SEEK_HOLE work here (until they fail with EINVAL)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

    def _buffer(self, length: int) -> bytearray | mmap.mmap:
        # O_DIRECT needs aligned memory: anonymous mmaps are page-aligned.
        return mmap.mmap(-1, length) if self.direct else bytearray(length)

    def read(self, offset: int, length: int) -> Buffer:
        if not length:
            return b""  # (an O_DIRECT buffer cannot be empty)
        buf = self._buffer(length)
        view = memoryview(buf)
        done = 0
        while done < length:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"short read: {done} of {length} bytes at offset {offset}")
            done += n
        return view  # the buffer itself: no copy

    def read_into_nowait(self, offset: int, buf: bytearray | memoryview) -> bool:
        if not self.reads_nowait:
            return False
        try:
            # Short: partly cached or at EOF (the blocking path decides).
            return os.preadv(self.fd, (buf,), offset, os.RWF_NOWAIT) == len(buf)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.reads_nowait = False  # not for this file system: always use the pool
                return False
            raise

    def write(self, offset: int, data: Buffer, rwf_flags: int = 0) -> None:
        if not len(data):
            return
        if self.direct:
            buf = self._buffer(len(data))
            buf[:] = data
            view = memoryview(buf)
        else:
            view = memoryview(data)
        done = 0
        length = len(view)
        while done < length:
            n = os.pwritev(self.fd, [view[done:]], offset + done, rwf_flags)
            if n == 0:
                raise OSError(errno.EIO, f"short write: {done} of {length} bytes at offset {offset}")
            done += n

    def write_nowait(self, offset: int, data: Buffer) -> bool:
        """Whole pages into the page cache: with ``RWF_NOWAIT`` where the file
        system takes it for buffered writes (False if the kernel would block),
        else a plain ``pwritev`` (which waits only when the kernel throttles
        writers or the file system is busy: ``BlockNode.write_cached`` watches
        for that).  A partial page is not written here: it may need a read
        of the page first."""
        length = len(data)
        if not self.buffered_writes or not length or offset % mmap.PAGESIZE or length % mmap.PAGESIZE:
            return False
        if self._write_nowait:
            try:
                self.write(offset, data, os.RWF_NOWAIT)
                return True
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._write_nowait = False  # not for this file system's buffered writes
        n = os.pwrite(self.fd, data, offset)  # (``write``'s loop, for the rare short write)
        if n < length:
            self.write(offset + n, memoryview(data)[n:])
        return True

    def write_fua(self, offset: int, data: Buffer) -> None:
        if self._dsync:
            try:
                self.write(offset, data, os.RWF_DSYNC)  # each pwritev durable as it returns
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._dsync = False  # not here: a flush after the write
        super().write_fua(offset, data)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if self._libc.fallocate(self.fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def discard(self, offset: int, length: int) -> None:
        try:
            self._fallocate(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # discard is advisory: doing nothing is allowed (QEMU too)

    def write_zeroes(self, offset: int, length: int, *, may_unmap: bool = False,
                     no_fallback: bool = False) -> None:
        # As QEMU's file-posix: a hole if one will do, else ZERO_RANGE, else
        # (unless refused) zeroes written out.
        modes = [_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE]
        if may_unmap:
            modes.insert(0, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                self._fallocate(mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        if no_fallback:
            raise OSError(errno.ENOTSUP, "zeroes cannot be written fast here")
        zeroes = bytes(min(length, _ZERO_CHUNK))  # the fallback: write them
        done = 0
        while done < length:
            n = min(len(zeroes), length - done)
            self.write(offset + done, zeroes[:n])
            done += n

    def block_status(self, offset: int, length: int, max_extents: int) -> Extents:
        """From ``SEEK_DATA``/``SEEK_HOLE`` (QEMU's find_allocation): data, or
        a hole that reads as zeroes; all data where the file system cannot say."""
        end = offset + length
        extents: Extents = []
        while offset < end and len(extents) < max_extents:
            try:
                data_bytes, hole_bytes = self._allocation(offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._seek_data:
                    raise
                self._seek_data = False
                continue
            if data_bytes:
                extents.append((min(data_bytes, end - offset), BDRV_BLOCK_DATA))
            else:
                extents.append((min(hole_bytes, end - offset), BDRV_BLOCK_ZERO))
            offset += extents[-1][0]
        return extents

    def _allocation(self, offset: int) -> tuple[int, int]:
        """(bytes of data, 0) or (0, bytes of hole) from ``offset`` on."""
        if not self._seek_data:
            return self.size - offset, 0
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            return 0, self.size - offset  # nothing but a hole up to the end
        if data > offset:
            return 0, data - offset
        hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        return max(hole - offset, 1), 0  # (at least a byte: a file changed meanwhile cannot stall the walk)

    def close(self) -> None:
        """Flush (as QEMU's bdrv_close does) and close; idempotent."""
        if self.fd >= 0:
            try:
                if not self.read_only:
                    os.fdatasync(self.fd)
            except OSError as exc:
                log.error("flushing %s at close failed: %s", self.filename, exc)
            finally:
                os.close(self.fd)
                self.fd = -1


@dataclass
class OpStats:
    """Counters of one operation type on one node, as QEMU's block accounting
    keeps them: ``ops`` that succeeded (and their ``bytes``), ``errors`` (failed
    ones), ``invalid`` requests (refused before any I/O: bounds, alignment);
    latency (total and histograms) over the succeeded and the failed ones."""

    ops: int = 0
    bytes: int = 0
    errors: int = 0
    invalid: int = 0
    total_ns: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BUCKETS)
    boundaries_ns: tuple[int, ...] = ()  # a user-set histogram (QMP's), if any
    bins: list[int] = field(default_factory=list)

    @property
    def mean_ns(self) -> float:
        done = self.ops + self.errors
        return self.total_ns / done if done else 0.0

    def record(self, nbytes: int, latency_ns: int, ok: bool, count: int = 1) -> None:
        """One operation (``count``: as many, done together, ``nbytes`` and
        ``latency_ns`` their sums: each is in the histograms with their mean)."""
        self.total_ns += latency_ns
        if ok:
            self.ops += count
            self.bytes += nbytes
        else:
            self.errors += count
        if count != 1:
            latency_ns //= count
        self.histogram[min(max(latency_ns // 1000, 1).bit_length() - 1, HISTOGRAM_BUCKETS - 1)] += count
        if self.boundaries_ns:
            self.bins[bisect.bisect_right(self.boundaries_ns, latency_ns)] += count

    def set_histogram(self, boundaries_ns: tuple[int, ...]) -> None:
        """Count latencies in the intervals these (sorted) boundaries delimit."""
        self.boundaries_ns = boundaries_ns
        self.bins = [0] * (len(boundaries_ns) + 1) if boundaries_ns else []


class BlockNode:
    """A named block node served by one AioContext.  Home thread only."""

    def __init__(self, ctx: AioContext, name: str, driver: BlockDriver, *, read_only: bool = False,
                 werror: BlockdevOnError = BlockdevOnError.REPORT,
                 rerror: BlockdevOnError = BlockdevOnError.REPORT) -> None:
        self.ctx = ctx
        self.name = name
        self.driver = driver
        self.read_only = read_only
        self.werror = werror
        self.rerror = rerror
        self.error_listener: ErrorListener | None = None
        # Requests a 'stop' policy holds, each as (retry, fail): ``resume`` runs
        # the first of each, ``close`` the second.
        self.held: list[tuple[Callable[[], None], Callable[[], None]]] = []
        self.parents: set[str] = set()  # the nodes layered over this one (blkdebug's image)
        self.in_flight = 0
        self.stats: dict[str, OpStats] = {op.value: OpStats() for op in BlockOp}
        self._drain_waiters: list[Callable[[], object]] = []
        # Inline writes (``write_cached``): not before this time, after one that waited.
        self._inline_writes_after_ns = 0
        self._inline_write_backoff_ns = INLINE_WRITE_BACKOFF_NS
        self._inline_write_stalled_ns = -INLINE_WRITE_BACKOFF_MAX_NS  # when one last waited
        # The home thread's voluntary context switches (``_sleeps``), read at the
        # first inline write of a turn of the context (``_sleeps_turn``) and when
        # one took long: one system call per turn, not one per write.
        self._sleeps_turn = -1
        self._sleeps_mark = 0

    @property
    def size(self) -> int:
        return self.driver.size

    def _check(self, op: str, offset: int, length: int, data: Buffer) -> str | None:
        """The reason a request is invalid, or None."""
        problem = request_problem(op, offset, length, data)
        if problem is not None or op == BlockOp.FLUSH:
            return problem
        if offset + length > self.driver.size:
            return (f"request [{offset}, {offset + length}) is out of range: node "
                    f"'{self.name}' has {self.driver.size} bytes")
        align = self.driver.align
        if align > 1 and (offset % align or length % align):
            return f"offset and length must be multiples of {align} (cache.direct=on)"
        return None

    def _refused(self, op: str, start: int, offset: int, length: int, data: Buffer, callback: Completion) -> bool:
        """Whether a request is refused before any I/O (invalid: EINVAL; a
        write to a read-only node: EPERM), completed so."""
        problem = self._check(op, offset, length, data)
        if problem is not None:
            self._complete(op, start, 0, -errno.EINVAL, problem, b"", callback, invalid=True)
            return True
        if self.read_only and op in _WRITING_OPS:
            self._complete(op, start, 0, -errno.EPERM, "Block node is read-only", b"", callback)
            return True
        return False

    def submit(self, op: str, offset: int, length: int, data: Buffer, callback: Completion,
               flags: int = 0, *, nowait: bool = True) -> None:
        """Run one request; ``callback(status, message, data)`` exactly once.
        ``flags``: ``BDRV_REQ_FUA`` for a write, ``BDRV_REQ_MAY_UNMAP`` and
        ``BDRV_REQ_NO_FALLBACK`` for write-zeroes (others are ignored).
        ``nowait=False``: a read goes to the thread pool without trying
        ``read_nowait`` first (its caller's ``cached_reader`` just did)."""
        start = time.monotonic_ns()
        if self._refused(op, start, offset, length, data, callback):
            return
        self.in_flight += 1
        if op == BlockOp.READ:
            try:
                cached = self.driver.read_nowait(offset, length) if nowait else None
            except Exception as exc:
                self.in_flight -= 1
                err = exc.errno if isinstance(exc, OSError) and exc.errno else (
                    errno.ENOMEM if isinstance(exc, MemoryError) else errno.EIO)
                self._failed(op, start, length, -err, str(exc) or type(exc).__name__, callback,
                             lambda: self.submit(op, offset, length, data, callback, flags))
                self._maybe_drained()
                return
            if cached is not None:
                self.in_flight -= 1
                self._complete(op, start, length, 0, "", cached, callback)
                self._maybe_drained()
                return
            fn: Callable[..., object] = self.driver.read
            args: tuple[object, ...] = (offset, length)
        elif op == BlockOp.WRITE:
            fn, args = (self.driver.write_fua if flags & BDRV_REQ_FUA else self.driver.write), (offset, data)
        elif op == BlockOp.FLUSH:
            fn, args = self.driver.flush, ()
        elif op == BlockOp.DISCARD:
            fn, args = self.driver.discard, (offset, length)
        elif flags & (BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK):
            fn = functools.partial(self.driver.write_zeroes, may_unmap=bool(flags & BDRV_REQ_MAY_UNMAP),
                                   no_fallback=bool(flags & BDRV_REQ_NO_FALLBACK))
            args = (offset, length)
        else:
            fn, args = self.driver.write_zeroes, (offset, length)

        def done(req: object) -> None:
            self.in_flight -= 1
            try:
                value = req.result()  # type: ignore[attr-defined]
            except Exception as exc:
                status, message = _failure(exc)
                if status == -errno.ENOTSUP and flags & BDRV_REQ_NO_FALLBACK:  # a refusal asked for
                    self._complete(op, start, 0, status, message, b"", callback)
                else:
                    self._failed(op, start, length, status, message, callback,
                                 lambda: self.submit(op, offset, length, data, callback, flags))
            else:
                nbytes = length if op in (BlockOp.READ, BlockOp.WRITE) else 0
                self._complete(op, start, nbytes, 0, "", value if op == BlockOp.READ else b"", callback)
            self._maybe_drained()

        self.ctx.thread_pool.submit(fn, *args, callback=done)

    def submit_writes(self, writes: Sequence[tuple[int, Buffer, Completion]]) -> None:
        """Writes without flags, each ``(offset, data, callback)``, run as
        ``submit`` runs them, but together where the driver's writes are
        buffered (a file in the page cache, not ``cache.direct``): the valid
        ones go to the thread pool as one job, which does them one after the
        other, and complete when it ends (each with its own status): one
        hand-off to a worker and one completion for all of them.  Elsewhere
        (where writes wait for the device, and are best run side by side)
        each is ``submit``ted."""
        if not self.driver.buffered_writes or len(writes) == 1 or self.werror is not BlockdevOnError.REPORT:
            for offset, data, callback in writes:
                self.submit(_WRITE, offset, len(data), data, callback)
            return
        start = time.monotonic_ns()
        batch: list[tuple[int, Buffer, Completion]] = []
        for offset, data, callback in writes:
            problem = self._check(_WRITE, offset, len(data), data)
            if problem is not None:
                self._complete(_WRITE, start, 0, -errno.EINVAL, problem, b"", callback, invalid=True)
            elif self.read_only:
                self._complete(_WRITE, start, 0, -errno.EPERM, "Block node is read-only", b"", callback)
            else:
                batch.append((offset, data, callback))
        if not batch:
            return
        self.in_flight += len(batch)
        write = self.driver.write

        def run() -> list[Exception | None]:
            errors: list[Exception | None] = []
            for offset, data, _ in batch:
                try:
                    write(offset, data)
                    errors.append(None)
                except Exception as exc:  # (this write's status, not the others')
                    errors.append(exc)
            return errors

        def done(req: ThreadPoolRequest[list[Exception | None]]) -> None:
            self.in_flight -= len(batch)
            try:
                errors = req.result()
            except Exception as exc:  # (the job itself: cancelled)
                errors = [exc] * len(batch)
            for (offset, data, callback), error in zip(batch, errors):
                if error is None:
                    self._complete(_WRITE, start, len(data), 0, "", b"", callback)
                else:  # (werror=report here: see above)
                    self._failed(_WRITE, start, len(data), *_failure(error), callback, lambda: None)
            self._maybe_drained()

        self.ctx.thread_pool.submit(run, callback=done)

    def cached_reader(self) -> Callable[[int, bytearray | memoryview], bool] | None:
        """A way to read data the driver has at once (the page cache:
        ``read_into_nowait``), into the caller's buffers; None if this node
        never has any.  ``reader(offset, buf)`` fills ``buf`` and returns
        True, or returns False (or raises ``OSError``) and the caller then
        ``submit``s the read, which takes the usual way (and fails as it
        must).  For a caller's fast path that checked the range already
        (within the node, not empty, at most ``MAX_REQUEST_BYTES``: the
        reader does not, and a file's reads at offset -1 would read at its
        position), and that accounts the reads it got this way
        itself (``account_cached_reads``): they are not accounted here, and
        never in flight."""
        driver = self.driver
        return driver.read_into_nowait if driver.reads_nowait else None

    def write_cached(self, offset: int, data: Buffer) -> bool:
        """A write (without flags, of at most ``INLINE_WRITE_MAX_BYTES``) done
        at once, inline, if the driver can take it into memory without waiting
        for the device (whole pages of a file without ``cache.direct``:
        ``write_nowait``), accounted as
        ``submit`` accounts it; False if not (nothing is accounted): the
        caller then ``submit``s it.  A write that waited anyway (longer than
        ``INLINE_WRITE_STALL_NS``: the kernel throttled a writer of too many
        dirty pages, or the file system was busy) sends the next ones to the
        thread pool for a while (``INLINE_WRITE_BACKOFF_NS``, doubled each
        time it happens again), as QEMU runs them all there: the home thread
        is not held up twice in a row.  Waited: slept in the kernel (a
        voluntary context switch), not only preempted by a busy machine."""
        length = len(data)
        driver = self.driver
        if not driver.buffered_writes or self.read_only or not (
                0 <= offset and 0 < length <= INLINE_WRITE_MAX_BYTES and offset + length <= driver.size):
            return False  # (``submit`` says what is wrong, or writes in the pool)
        start = time.monotonic_ns()
        if start < self._inline_writes_after_ns:
            return False
        turn = self.ctx.iterations
        if turn != self._sleeps_turn:  # the first inline write of this turn
            self._sleeps_turn = turn
            self._sleeps_mark = _sleeps()
        try:
            if not driver.write_nowait(offset, data):
                return False
        except Exception:
            return False  # (``submit`` does it again, and reports the error)
        end = time.monotonic_ns()
        self.stats[_WRITE].record(length, end - start, True)
        if end - start >= INLINE_WRITE_STALL_NS and self._slept():  # (not just a thread preempted)
            if end - self._inline_write_stalled_ns > INLINE_WRITE_BACKOFF_MAX_NS:
                self._inline_write_backoff_ns = INLINE_WRITE_BACKOFF_NS
            else:
                self._inline_write_backoff_ns = min(2 * self._inline_write_backoff_ns,
                                                    INLINE_WRITE_BACKOFF_MAX_NS)
            self._inline_write_stalled_ns = end
            self._inline_writes_after_ns = end + self._inline_write_backoff_ns
            log.debug("node %s: an inline write took %d us: writes go to the thread pool for %d s", self.name,
                      (end - start) // 1000, self._inline_write_backoff_ns // 1_000_000_000)
        return True

    def _slept(self) -> bool:
        """Whether the home thread slept in the kernel since the last time this
        was asked, or since the first inline write of this turn: what it does
        between inline writes in a turn does not sleep (non-blocking sockets,
        reads with RWF_NOWAIT), so a sleep there was a write's."""
        sleeps = _sleeps()
        slept = sleeps != self._sleeps_mark
        self._sleeps_mark = sleeps
        return slept

    def account_cached_reads(self, count: int, nbytes: int, elapsed_ns: int) -> None:
        """Account ``count`` reads done by a ``cached_reader`` one after the other
        (``nbytes`` in all) in ``elapsed_ns``: the total time as it was, and
        each read with the mean latency in the histograms."""
        self.stats[_READ].record(nbytes, elapsed_ns, True, count)

    def block_status(self, offset: int, length: int, max_extents: int) -> Extents:
        """The extents of ``[offset, offset + length)``, as (length, ``BDRV_BLOCK_*``
        flags), consecutive from ``offset``: at most ``max_extents`` (at least
        one), each merged with the one before when their flags are the same;
        they cover the whole range unless ``max_extents`` stopped them first.
        Inline (QEMU's file driver runs its ``lseek`` in the iothread too).
        ``OSError`` if the driver cannot tell; ``ValueError`` for a range
        outside the node."""
        if offset < 0 or length <= 0 or offset + length > self.driver.size or max_extents < 1:
            raise ValueError(f"block status of [{offset}, {offset + length}) on node '{self.name}' of "
                             f"{self.driver.size} bytes")
        return merge_extents(self.driver.block_status(offset, length, max_extents))

    def _complete(self, op: str, start: int, nbytes: int, status: int, message: str, data: Buffer,
                  callback: Completion, invalid: bool = False) -> None:
        stats = self.stats.get(op)
        if stats is not None:
            if invalid:
                stats.invalid += 1  # QEMU's block_acct_invalid: no latency to account
            else:
                stats.record(nbytes, time.monotonic_ns() - start, status == 0)
        try:
            callback(status, message, data)
        except Exception as exc:
            self.ctx.report_exception(exc, f"completion callback of node {self.name!r}")

    def _failed(self, op: str, start: int, length: int, status: int, message: str, callback: Completion,
                retry: Callable[[], None]) -> None:
        """A request failed with an I/O error: what ``werror`` (``rerror`` for
        a read) says it does, and the error listener told.  ``report``: it
        completes with the error; ``ignore``: it succeeds (a read with zeroes),
        counted as failed; ``stop`` (``enospc``, for ENOSPC): it is held, not
        completed, until ``resume`` runs ``retry`` (submits it again) or
        ``close`` fails it."""
        policy = self.rerror if op == _READ else self.werror
        if policy is BlockdevOnError.ENOSPC:
            policy = BlockdevOnError.STOP if status == -errno.ENOSPC else BlockdevOnError.REPORT
        if self.error_listener is not None:
            try:
                self.error_listener(op, -status, message, policy.value)
            except Exception as exc:
                self.ctx.report_exception(exc, f"error listener of node {self.name!r}")
        if policy is BlockdevOnError.STOP:
            self.held.append((retry, lambda: self._complete(op, start, 0, status, message, b"", callback)))
        elif policy is BlockdevOnError.IGNORE:
            self.stats[op].record(0, time.monotonic_ns() - start, False)
            try:
                callback(0, "", bytes(length) if op == _READ else b"")
            except Exception as exc:
                self.ctx.report_exception(exc, f"completion callback of node {self.name!r}")
        else:
            self._complete(op, start, 0, status, message, b"", callback)

    def resume(self) -> int:
        """Submit again the requests a 'stop' policy holds (QMP's ``cont``);
        how many."""
        held, self.held = self.held, []
        for retry, _fail in held:
            retry()
        return len(held)

    def drain(self, callback: Callable[[], object]) -> None:
        """``callback()`` once no request is in flight (at once if none is)."""
        if self.in_flight == 0:
            callback()
        else:
            self._drain_waiters.append(callback)

    def _maybe_drained(self) -> None:
        if self.in_flight == 0 and self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for cb in waiters:
                cb()

    def close(self) -> None:
        """Fail the requests a 'stop' policy holds, with their errors, and close the driver."""
        held, self.held = self.held, []
        for _retry, fail in held:
            fail()
        self.driver.close()


def _sleeps() -> int:
    """The voluntary context switches of the calling thread so far: each time it slept in the kernel."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


def _failure(exc: Exception) -> tuple[int, str]:
    """A failed request's status and message."""
    if isinstance(exc, OSError):
        return -(exc.errno or errno.EIO), exc.strerror or str(exc)
    return -errno.EIO, f"{type(exc).__name__}: {exc}"


def make_driver(options: BlockdevOptionsBase) -> BlockDriver:
    """The driver validated ``BlockdevOptions`` describe (``OSError`` if it cannot open)."""
    if isinstance(options, BlockdevOptionsFile):
        return FileDriver(options.filename, read_only=options.read_only, direct=options.cache.direct)
    if isinstance(options, BlockdevOptionsNull):
        return NullDriver(options.size, read_zeroes=options.read_zeroes)
    raise ValueError(f"the driver '{options.driver}' is not served here")
