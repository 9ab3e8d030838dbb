"""One NBD connection in its transmission phase, served in an iothread's AioContext: ``NbdClient``.

Theory of operation
-------------------
The main loop ran the handshake and handed the connected socket over with
what it agreed (``protocol.NbdConnection``); from then on an ``NbdClient``
(QEMU's ``NBDClient``) serves it from an fd handler of the node's
AioContext, with no main loop in the way:

* **Input.**  When the socket is readable, one ``recv_into`` takes what is
  there (up to ``RECV_BYTES``) into the thread's receive buffer, and
  ``_input`` goes through it in order, as a bare NBD loop would: the
  common requests are parsed and checked there and served inline, their
  replies queued at once: a READ from the page cache
  (``BlockNode.cached_reader``: into a buffer of the connection, reused
  once its replies are sent), a small WRITE of whole pages taken into it
  (``write_cached``).  Any other request is given, alone, to the
  ``NbdRequestDecoder``, which checks it as QEMU's ``nbd_co_receive_request``
  does; the writes without FUA among them go to the node together
  (``submit_writes``: one thread-pool job), anything else through
  ``BlockNode.submit``.  A request cut by the end of a read is kept for the
  next one, except a large write, whose payload is read straight into the
  decoder's buffer (``recv_into``, without a copy).
* **Output.**  Each completion appends its reply's buffers (a small header,
  then the data read itself: a view, not a copy) to the connection's queue
  and schedules a bottom half; the bottom half, and the end of the input
  handler, hand everything queued to one ``sendmsg``.  What the socket does
  not take stays queued and the handler waits for POLLOUT.  Simple replies,
  or structured ones when negotiated, as QEMU's ``nbd_co_send_*`` build
  them; errors are QEMU's errno mapping (``system_errno_to_nbd_errno``)
  with its messages.
* **Busy polling.**  A client that sends one request at a time (each
  read of the socket held one request, ``LONE_READS_TO_POLL`` reads in a
  row: ``qemu-img bench`` or fio at depth 1) gets an ``io_poll``, a
  ``poll(2)`` of its socket with no timeout (about 0.7 us): with it, the
  context busy-polls before it sleeps (QEMU's poll-max-ns window,
  adaptive), and the next request finds the iothread awake instead of
  paying a wake-up.  A client that pipelines gets none (which turns busy
  polling off, as QEMU's NBD sockets, which have no poll handler, always
  do): while the iothread sleeps its requests gather, and one read takes
  many; spinning instead cost such clients 5-10% of their IOPS.  Nor does a
  connection waiting for POLLOUT, which the check does not see.  Every
  check is a system call, so an iothread polls ``MAX_POLLED`` connections at
  most (``NbdCredit.may_poll``): many idle ones must not make each of its
  turns spin through them.
* **Back-pressure.**  What a connection has in flight (requests started
  and not answered, and replies not yet taken by the socket) is admitted
  within a credit, ``protocol``'s ``InFlight`` (as the data plane's
  clients are bounded): a request past it waits, and the socket is not
  read while one waits, so a client that sends without reading its replies
  stops being read instead of growing this process.  (QEMU's server reads
  no more than 16 requests ahead of its replies, MAX_NBD_REQUESTS.)
* **Ending.**  ``close`` (NBD_CMD_DISC, end of stream, a protocol error, an
  export or node that goes away) stops reading, lets the requests in
  flight complete, sends their replies unless told to drop them, then
  closes the socket.  ``quiesce`` (the node moves to another iothread)
  stops reading at a request boundary (a write whose payload is arriving
  is read to its end first), lets what is in flight complete and its
  replies go out, then hands the socket back with the bytes read and not
  handled (at most part of a request header) as the connection's
  ``pending``.  Either way ``on_end(client, handed_back)`` is called once:
  with the ``NbdConnection`` to pass on, or None when the connection
  closed.  A connection that does not finish within ``DRAIN_TIMEOUT_MS``
  (a client that never reads its replies) is closed.

Home thread only.
"""

from __future__ import annotations

import collections
import errno
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from protocol import InFlight, NbdConnection, NbdRequest, NbdRequestDecoder, ThrottledLog
from protocol.nbd import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_READ_ONLY,
    NBD_MAX_BLOCK_STATUS_EXTENTS,
    NBD_MAX_BUFFER_SIZE,
    NBD_META_CONTEXT_ALLOCATION_DEPTH,
    NBD_META_CONTEXT_BASE_ALLOCATION,
    NBD_REQUEST_MAGIC,
    NBD_REQUEST_SIZE,
    NBD_SIMPLE_REPLY_SIZE,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    ReplyBuffer,
    chunk_block_status,
    chunk_done,
    chunk_error,
    chunk_read,
    generic_reply,
    read_reply_header,
    simple_reply,
    system_errno_to_nbd_errno,
)

from ..aio._clock import ClockType
from ..aio._context import AioContext
from ..aio._timers import Timer
from ..block._node import (
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_ZERO,
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    BlockNode,
    Buffer,
    Completion,
    Extents,
    merge_extents,
)

__all__ = [
    "DRAIN_TIMEOUT_MS",
    "LONE_READS_TO_POLL",
    "MAX_POLLED",
    "NbdClient",
    "NbdCredit",
    "RECV_BYTES",
    "allocation_depth",
    "base_allocation",
]

log = logging.getLogger("iothreads.nbd")

RECV_BYTES = 256 * 1024  # one read of the socket at most: what one turn parses
RECV_INTO_MIN_BYTES = 64 * 1024  # a payload still missing this much is read into its buffer
CARRY_MAX_BYTES = RECV_INTO_MIN_BYTES  # a cut request up to this long is kept whole for the next read
DRAIN_TIMEOUT_MS = 10_000  # the longest a closing or quiescing connection waits for its client
IOV_MAX = 1024  # buffers in one sendmsg (Linux's UIO_MAXIOV)
READ_SLAB_BYTES = 128 * 1024  # a connection's buffer that the reads served inline read into
LONE_READS_TO_POLL = 16  # reads in a row of one request each before the socket is busy-polled
MAX_POLLED = 8  # connections busy-polled at once in one iothread (each check is a system call)
SECTOR_BYTES = 512  # an export's size: its node's, rounded down to this (QEMU's nbd_export_create; the main loop's)
_HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length

# Each thread's buffer that sockets are read into, RECV_BYTES long.  Not ``recv(RECV_BYTES)``:
# that allocates RECV_BYTES and shrinks them to what came, which glibc's malloc serves with
# mmap, mremap and munmap (and a page fault) for every read; copying out what is kept is cheaper.
_receiving = threading.local()

Reply = list[ReplyBuffer]
OnEnd = Callable[["NbdClient", "NbdConnection | None"], object]


def base_allocation(extents: Extents) -> Extents:
    """The ``base:allocation`` context's extents (NBD_STATE_HOLE, NBD_STATE_ZERO)
    for a node's block status, as QEMU's ``blockstatus_to_extents``."""
    return merge_extents([(length, (0 if flags & BDRV_BLOCK_DATA else NBD_STATE_HOLE)
                           | (NBD_STATE_ZERO if flags & BDRV_BLOCK_ZERO else 0)) for length, flags in extents])


def allocation_depth(extents: Extents) -> Extents:
    """The ``qemu:allocation-depth`` context's extents: 1 where the node
    itself holds the range (data or zeroes), 0 where nothing does (no node
    here has a backing file: nothing is deeper)."""
    return merge_extents([(length, 1 if flags & (BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO) else 0)
                          for length, flags in extents])


class NbdCredit:
    """What an iothread's NBD connections may have in flight, each one and
    all together (``protocol``'s ``InFlight``).  A connection that waits for
    credit with nothing of its own in flight (the others hold the total) is
    woken, by a bottom half, when some is released.  Which of them busy
    polling checks (``may_poll``) is kept here too.  Home thread only."""

    def __init__(self, ctx: AioContext, in_flight: InFlight | None = None) -> None:
        self.in_flight = in_flight if in_flight is not None else InFlight()
        self.waiting: set[NbdClient] = set()
        self.polled: set[NbdClient] = set()  # the connections busy polling checks (MAX_POLLED at most)
        self._wake_bh = ctx.bh_new(self._wake, "nbd-credit")

    def admit(self, key: bytes, nbytes: int, backlog: tuple[int, int]) -> bool:
        return self.in_flight.admit(key, nbytes, backlog) is None

    def may_poll(self, client: NbdClient) -> bool:
        """Whether ``client`` may be busy-polled (and is, from now on): each
        polled socket costs every polling pass a system call, so only a few
        are, the first that asked (idle ones as long as they stay open)."""
        if client in self.polled:
            return True
        if len(self.polled) >= MAX_POLLED:
            return False
        self.polled.add(client)
        return True

    def release(self, key: bytes, nbytes: int) -> None:
        self.in_flight.release(key, nbytes)
        if self.waiting:
            self._wake_bh.schedule()

    def _wake(self) -> None:
        waiting, self.waiting = self.waiting, set()
        for client in waiting:
            client.kick()

    def close(self) -> None:
        self._wake_bh.delete()


class NbdClient:
    """One handed-over NBD connection, served by ``node``'s AioContext.

    :param sock: the connected socket (owned from now on; non-blocking).
    :param conn: what the handshake agreed; its ``pending`` bytes are
        handled first.
    :param credit: the in-flight bookkeeping this connection's requests are
        admitted by (an iothread's connections share one).
    :param on_end: called once, when the connection closed (None) or was
        quiesced and can be handed on (its ``NbdConnection``, whose socket
        is ``sock``, no longer watched here).
    :param bad_input: where what clients do wrong is logged (a few lines,
        then counts: many hostile clients must not flood the log).
    """

    def __init__(self, ctx: AioContext, sock: socket.socket, conn: NbdConnection, node: BlockNode,
                 credit: NbdCredit, on_end: OnEnd, bad_input: ThrottledLog | None = None) -> None:
        self.ctx = ctx
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.node = node
        self.credit = credit
        self.on_end = on_end
        self.bad_input = bad_input or ThrottledLog(log)
        self.key = f"nbd-{conn.connection_id}".encode()  # its name in ``credit``
        self.structured = conn.structured_replies
        # The metadata contexts BLOCK_STATUS answers for, in id order (those this server knows).
        self.contexts = sorted((context_id, name) for name, context_id in conn.meta_contexts.items()
                               if name in (NBD_META_CONTEXT_BASE_ALLOCATION, NBD_META_CONTEXT_ALLOCATION_DEPTH))
        self.size_bytes = node.size // SECTOR_BYTES * SECTOR_BYTES  # as the client was told
        self.decoder = NbdRequestDecoder(self.size_bytes,
                                         read_only=bool(conn.transmission_flags & NBD_FLAG_READ_ONLY),
                                         structured_replies=self.structured, meta_contexts=len(self.contexts))
        self.in_flight = 0  # requests started and not completed
        self.closed = False  # ended: closed or handed back
        self.closing = ""  # why it is closing, once it is
        self.quiescing = False
        self._drop_replies = False
        self._deferred: collections.deque[NbdRequest] = collections.deque()  # parsed, waiting for credit
        # Replies queued for the socket: their buffers, and where each reply
        # ends in the stream of bytes queued (to count the replies left).
        self._out: list[ReplyBuffer] = []
        self._ends: collections.deque[int] = collections.deque()
        self._queued_bytes = 0  # in all, since the start
        self._sent_bytes = 0
        self._blocked = False  # the socket took less than was queued: waiting for POLLOUT
        # The start of a request cut by the end of a read (part of a header, or a
        # small WRITE and part of its payload), kept for the next; a large WRITE's
        # payload is collected by the decoder instead, in a buffer of its own.
        self._carry = b""
        self._collecting = False  # the decoder collects a WRITE's payload
        # The reads served inline read into slices of one buffer, reused once
        # the socket took every reply queued (a fresh, zeroed buffer for each
        # read cost more than the read's own copy).
        self._slab: memoryview | None = None
        self._slab_used = 0
        self._read_flags = ~(self.decoder.valid_flags(NBD_CMD_READ) or 0) | NBD_CMD_FLAG_FUA  # not inline
        self._writes_plain = self.decoder.valid_flags(NBD_CMD_WRITE) is not None
        self._nest = 0  # > 0 while requests are being started (completions then only queue)
        self._reading = False
        self._writing = False
        self._deadline: Timer | None = None
        self._poller: select.poll | None = None  # busy polling's (``_readable_now``)
        self._lone_reads = 0  # reads in a row that held one request at most: busy polling pays
        self._polled = False  # the handler has its io_poll
        self._send_bh = ctx.bh_new(self._send, "nbd-send")
        self._send_scheduled = False  # _send_bh is (cheaper to ask here than the bottom half)
        if conn.pending:
            self._input(conn.pending, len(conn.pending))
        self._send()

    @property
    def reading(self) -> bool:
        """Whether the socket is read (not while requests wait for credit, nor once ending)."""
        return self._reading

    @property
    def send_blocked(self) -> bool:
        """Whether replies wait for the socket to take them (POLLOUT)."""
        return self._blocked

    @property
    def backlog_bytes(self) -> int:
        """The bytes of replies queued and not yet taken by the socket."""
        return self._queued_bytes - self._sent_bytes

    @property
    def partial_request_bytes(self) -> int:
        """The bytes read of a request not yet complete."""
        return len(self._carry) + self.decoder.partial_bytes

    # -- input ---------------------------------------------------------------

    def _on_readable(self) -> None:
        decoder = self.decoder
        try:
            if self._collecting:  # a large write's payload: straight into its buffer
                payload = decoder.payload_buffer()
                if payload is not None and (len(payload) >= RECV_INTO_MIN_BYTES or self.quiescing):
                    n = self.sock.recv_into(payload)
                    if not n:
                        self._eof()
                        return
                    requests = decoder.payload_received(n)
                    if requests:
                        self._collecting = False
                        self._begin_all(requests)
                    self._send()
                    return
            limit = self._missing_bytes() if self.quiescing else RECV_BYTES - len(self._carry)
            if limit <= 0:
                return
            try:
                buf = _receiving.buffer
            except AttributeError:
                buf = _receiving.buffer = bytearray(RECV_BYTES)
            carry = self._carry
            start = len(carry)
            if start:
                buf[:start] = carry
                n = self.sock.recv_into(memoryview(buf)[start:], limit)
            else:
                n = self.sock.recv_into(buf, limit)
            if not n:
                self._eof()
                return
            self._carry = b""
            self._input(buf, start + n)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(f"reading failed: {exc.strerror or exc}", drop_replies=True)
            return
        self._send()

    def _input(self, buf: bytes | bytearray, end: int) -> None:
        """Serve or start the requests in ``buf[:end]``, in order.

        The common ones are parsed here and served inline, their replies
        queued without a callback, as a bare NBD loop would (the fast path):
        a READ whose data the node has at once (``cached_reader``: the page
        cache), a WRITE the node takes at once (``write_cached``: a few whole
        pages into the page cache), neither with FUA, each checked as the
        decoder would and found valid (``NbdRequestDecoder.valid_flags``).
        The same as ``_begin`` then ``_finish`` would do, credit included (a
        request done inline is admitted and released at once: only its
        reply's bytes count, while queued).  The reads done inline one after
        the other are accounted together (``account_cached_reads``: two clock
        reads for a run of them, each with their mean latency).  Any other
        request goes through the decoder, alone, and to ``_begin``; the
        WRITEs without FUA among them go to the node together
        (``submit_writes``).  A request cut by the end of ``buf`` is kept
        (``_carry``) for the next read, or, a large WRITE, given to the
        decoder, whose buffer its payload is read into (``_collecting``).
        ``buf`` may be the thread's receive buffer: nothing here keeps a
        view of it (what the decoder keeps, it is given a copy of).  The
        reads done inline read into the connection's slab, from its start
        again once every reply queued before was sent (then nothing refers
        to it), else after what the queued ones use; a read that does not
        fit gets a buffer of its own."""
        self._nest += 1
        before = len(self._ends) + self.in_flight + len(self._deferred)
        slab = self._slab
        if slab is None:
            slab = self._slab = memoryview(bytearray(READ_SLAB_BYTES))
        slab_used = 0 if not self._out else self._slab_used  # (the socket took all it held)
        try:
            decoder = self.decoder
            writes: list[tuple[int, Buffer, Completion]] = []  # admitted, to submit together
            pos = 0
            if self._collecting:  # the end of a write's payload, read with what follows
                pos = min(decoder.missing_bytes, end)
                requests = decoder.feed(buf[:pos])
                if decoder.missing_bytes:
                    return
                self._collecting = False
                for request in requests:
                    self._begin(request, writes)
            node = self.node
            read_into = node.cached_reader()  # (None when the node cannot: then the pool)
            write_cached = node.write_cached if self._writes_plain else None
            read_flags = self._read_flags
            structured = self.structured
            size = self.size_bytes
            unpack = _HEADER.unpack_from
            out = self._out
            ends = self._ends
            room = False  # the room left for requests done inline is known
            requests_left = bytes_left = total_left = 0
            run = run_bytes = run_start_ns = 0  # reads done inline since the last clock read
            cut = False  # the loop stopped at a request cut by the end of buf
            while end - pos >= NBD_REQUEST_SIZE:
                magic, flags, command, cookie, offset, length = unpack(buf, pos)
                if magic == NBD_REQUEST_MAGIC and 0 < length <= NBD_MAX_BUFFER_SIZE and offset + length <= size:
                    if not room:
                        room = True
                        if self._deferred:  # (nothing overtakes a request waiting for credit)
                            requests_left = 0
                        else:
                            requests_left, bytes_left, total_left = self.credit.in_flight.headroom(
                                self.key, (len(ends), self._queued_bytes - self._sent_bytes))
                    if command == NBD_CMD_READ and not flags & read_flags:
                        if requests_left > 0 and length <= bytes_left and length <= total_left:
                            if not run:
                                run_start_ns = time.monotonic_ns()
                            got = in_slab = False
                            if read_into is not None:
                                in_slab = slab_used + length <= READ_SLAB_BYTES
                                data = slab[slab_used:slab_used + length] if in_slab else bytearray(length)
                                try:
                                    got = read_into(offset, data)
                                except OSError:
                                    pass  # (the pool's read reports it)
                            if got:
                                if in_slab:
                                    slab_used += length
                                header = read_reply_header(cookie, offset, length, structured)
                                out.append(header)
                                out.append(data)
                                reply_bytes = len(header) + length
                                self._queued_bytes += reply_bytes
                                ends.append(self._queued_bytes)
                                requests_left -= 1
                                bytes_left -= reply_bytes
                                run += 1
                                run_bytes += length
                                pos += NBD_REQUEST_SIZE
                                continue
                            # Not cached: to the pool, where the node need not try again.
                            if run:
                                node.account_cached_reads(run, run_bytes, time.monotonic_ns() - run_start_ns)
                                run = run_bytes = 0
                            room = False
                            pos += NBD_REQUEST_SIZE
                            self._begin(NbdRequest(command, flags, cookie, offset, length), writes, False)
                            continue
                    elif command == NBD_CMD_WRITE and not flags and write_cached is not None:
                        stop = pos + NBD_REQUEST_SIZE + length
                        if stop > end:
                            cut = True
                            break
                        if requests_left > 0 and length <= bytes_left and length <= total_left and write_cached(
                                offset, memoryview(buf)[pos + NBD_REQUEST_SIZE:stop]):
                            if run:  # (the run's time is its reads' only)
                                node.account_cached_reads(run, run_bytes, time.monotonic_ns() - run_start_ns)
                                run = run_bytes = 0
                            out += simple_reply(cookie)
                            self._queued_bytes += NBD_SIMPLE_REPLY_SIZE
                            ends.append(self._queued_bytes)
                            requests_left -= 1
                            bytes_left -= NBD_SIMPLE_REPLY_SIZE
                            pos = stop
                            continue
                # Any other request: through the decoder, alone.
                stop = pos + NBD_REQUEST_SIZE + (length if command == NBD_CMD_WRITE else 0)
                if stop > end:
                    cut = True
                    break
                if run:
                    node.account_cached_reads(run, run_bytes, time.monotonic_ns() - run_start_ns)
                    run = run_bytes = 0
                room = False  # (what it does may change the room, or end the connection)
                for request in decoder.feed(buf[pos:stop]):
                    self._begin(request, writes)
                pos = stop
                if decoder.closed:
                    break
            if run:
                node.account_cached_reads(run, run_bytes, time.monotonic_ns() - run_start_ns)
            if pos < end and not decoder.closed:
                if not cut or stop - pos <= CARRY_MAX_BYTES:
                    self._carry = bytes(buf[pos:end])
                else:  # a large WRITE's start: the decoder collects the rest in a buffer of its own
                    for request in decoder.feed(buf[pos:end]):
                        self._begin(request, writes)
                    self._collecting = decoder.missing_bytes > 0
            if writes:
                node.submit_writes(writes)
            if decoder.error is not None:
                self._check_stream()
        finally:
            self._slab_used = slab_used
            self._nest -= 1
        # How many requests this read held (answered, started or waiting: a
        # completion meanwhile only moves one from started to answered).
        was_lone = self._lone_reads >= LONE_READS_TO_POLL
        lone = len(self._ends) + self.in_flight + len(self._deferred) - before <= 1
        self._lone_reads = self._lone_reads + 1 if lone else 0
        if (self._lone_reads >= LONE_READS_TO_POLL) != was_lone and not self.closed:
            self._watch(self._reading, self._writing)

    def _begin_all(self, requests: list[NbdRequest]) -> None:
        """Start the requests the decoder completed, in order (``_begin``)."""
        self._nest += 1
        try:
            writes: list[tuple[int, Buffer, Completion]] = []
            for request in requests:
                self._begin(request, writes)
            if writes:
                self.node.submit_writes(writes)
            self._check_stream()
        finally:
            self._nest -= 1

    def _check_stream(self) -> None:
        """Disconnect once the decoder found the stream lost (after answering what it returned)."""
        stream_error = self.decoder.error
        if stream_error is not None and not self.closing:
            self.bad_input.log(("nbd", "protocol"), logging.WARNING,
                               "NBD connection %d (export %s): %s: disconnecting",
                               self.conn.connection_id, self.conn.export_id, stream_error)
            self.close(f"protocol error: {stream_error}")

    def _missing_bytes(self) -> int:
        """What the request being received still lacks, once its header is in
        (a write's payload); 0 at a request boundary or within a header."""
        carry = self._carry
        if len(carry) >= NBD_REQUEST_SIZE:  # (only a WRITE is kept past its header)
            length: int = _HEADER.unpack_from(carry)[5]
            return NBD_REQUEST_SIZE + length - len(carry)
        return self.decoder.missing_bytes

    def _eof(self) -> None:
        self.close("the client closed the connection" if not self.partial_request_bytes
                   else "the client closed the connection within a request")

    def _begin(self, request: NbdRequest, writes: list[tuple[int, Buffer, Completion]],
               nowait: bool = True) -> None:
        """Answer a refused request, or start a valid one (or defer it until
        there is credit); a WRITE without FUA joins ``writes``, which go to
        the node together (and before any other request is started: in the
        order they came).  ``nowait=False``: a READ not in the page cache."""
        if self.closed:
            return
        command, flags, cookie, offset, length, payload, error, _ = request
        if error:
            self._queue(generic_reply(cookie, error, request.message, self.structured))
        elif command == NBD_CMD_DISC:
            self.close("the client disconnected")
        elif self._deferred or not self._admit(request):
            self._deferred.append(request)
        elif command == NBD_CMD_WRITE and not flags & NBD_CMD_FLAG_FUA:
            assert payload is not None
            self.in_flight += 1
            writes.append((offset, payload, self._generic_completion(request, "writing to file failed")))
        else:
            if writes:
                self.node.submit_writes(writes)
                writes.clear()
            self._start(request, nowait)

    # -- requests ------------------------------------------------------------

    @staticmethod
    def _data_bytes(request: NbdRequest) -> int:
        return request.length if request.command in (NBD_CMD_READ, NBD_CMD_WRITE) else 0

    def _admit(self, request: NbdRequest) -> bool:
        return self.credit.admit(self.key, self._data_bytes(request), (len(self._ends), self.backlog_bytes))

    def _start(self, request: NbdRequest, nowait: bool = True) -> None:
        """Start an admitted request (``nowait=False``: a read not in the page
        cache, which the node need not try inline again)."""
        self.in_flight += 1
        command = request.command
        node = self.node
        if command == NBD_CMD_READ:
            if request.flags & NBD_CMD_FLAG_FUA:  # QEMU flushes first (the spec has FUA for writes only)
                def flushed(status: int, message: str, data: Buffer) -> None:
                    if status:
                        self._generic_done(request, "flush failed", status)
                    else:
                        self._read(request)
                node.submit("flush", 0, 0, b"", flushed)
            else:
                self._read(request, nowait)
        elif command == NBD_CMD_WRITE:
            assert request.payload is not None
            node.submit("write", request.offset, request.length, request.payload,
                        self._generic_completion(request, "writing to file failed"),
                        BDRV_REQ_FUA if request.flags & NBD_CMD_FLAG_FUA else 0)
        elif command == NBD_CMD_FLUSH:
            node.submit("flush", 0, 0, b"", self._generic_completion(request, "flush failed"))
        elif command == NBD_CMD_TRIM:
            node.submit("discard", request.offset, request.length, b"", self._then_fua(request, "discard failed"))
        elif command == NBD_CMD_WRITE_ZEROES:
            flags = 0 if request.flags & NBD_CMD_FLAG_NO_HOLE else BDRV_REQ_MAY_UNMAP
            if request.flags & NBD_CMD_FLAG_FAST_ZERO:
                flags |= BDRV_REQ_NO_FALLBACK
            node.submit("write_zeroes", request.offset, request.length, b"",
                        self._then_fua(request, "writing to file failed"), flags)
        elif command == NBD_CMD_BLOCK_STATUS:
            self._finish(request, self._block_status(request))
        else:  # NBD_CMD_CACHE: a prefetch, which QEMU's nodes without a backing file complete at once
            assert command == NBD_CMD_CACHE
            self._finish(request, generic_reply(request.cookie, 0, "", self.structured))

    def _read(self, request: NbdRequest, nowait: bool = True) -> None:
        def done(status: int, message: str, data: Buffer) -> None:
            if status:
                self._generic_done(request, "reading from file failed", status)
            elif not self.structured:
                self._finish(request, simple_reply(request.cookie, 0, data))
            elif request.length:
                self._finish(request, chunk_read(request.cookie, request.offset, data))
            else:
                self._finish(request, chunk_done(request.cookie))

        self.node.submit("read", request.offset, request.length, b"", done, nowait=nowait)

    def _then_fua(self, request: NbdRequest, what: str) -> Callable[[int, str, Buffer], None]:
        """The completion of a trim or write-zeroes: with FUA, a flush follows
        (as QEMU's block layer does for a driver without FUA of its own)."""
        def done(status: int, message: str, data: Buffer) -> None:
            if status == 0 and request.flags & NBD_CMD_FLAG_FUA:
                self.node.submit("flush", 0, 0, b"", self._generic_completion(request, what))
            else:
                self._generic_done(request, what, status)
        return done

    def _generic_completion(self, request: NbdRequest, what: str) -> Completion:
        """The completion of a request that returns no data (``_generic_done``)."""
        return lambda status, message, data: self._generic_done(request, what, status)

    def _generic_done(self, request: NbdRequest, what: str, status: int) -> None:
        """Answer a request that returns no data (or failed), as QEMU's
        ``nbd_send_generic_reply``; ``what``: QEMU's message for a failure."""
        error = system_errno_to_nbd_errno(-status) if status else 0
        self._finish(request, generic_reply(request.cookie, error, what, self.structured))

    def _block_status(self, request: NbdRequest) -> Reply:
        """One chunk per metadata context, the last one final (QEMU's order: base:allocation first)."""
        max_extents = 1 if request.flags & NBD_CMD_FLAG_REQ_ONE else NBD_MAX_BLOCK_STATUS_EXTENTS
        try:
            extents = self.node.block_status(request.offset, request.length, max_extents)
        except (OSError, ValueError) as exc:
            err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
            return chunk_error(request.cookie, system_errno_to_nbd_errno(err), "can't get block status")
        reply: Reply = []
        for i, (context_id, name) in enumerate(self.contexts):
            to_context = base_allocation if name == NBD_META_CONTEXT_BASE_ALLOCATION else allocation_depth
            mapped = to_context(extents)
            reply += chunk_block_status(request.cookie, context_id, mapped[:max_extents],
                                        done=i == len(self.contexts) - 1)
        return reply

    def _finish(self, request: NbdRequest, reply: Reply) -> None:
        """A started request completed: its reply is queued (unless replies are dropped)."""
        self.in_flight -= 1
        self.credit.release(self.key, self._data_bytes(request))
        if self.closed:
            return
        if not self._drop_replies:
            self._queue(reply)
        if not self._nest:
            self._progress()

    # -- output --------------------------------------------------------------

    def _queue(self, reply: Reply) -> None:
        self._out += reply
        self._queued_bytes += sum(map(len, reply))
        self._ends.append(self._queued_bytes)
        if not self._blocked:
            self._schedule_send()  # with whatever else completes in this turn

    def _send(self) -> None:
        """Hand the queued replies to the socket: one ``sendmsg`` (per
        IOV_MAX buffers); what it does not take waits for POLLOUT."""
        if self._send_scheduled:
            self._send_scheduled = False
            self._send_bh.cancel()
        out = self._out
        while out and not self.closed:
            batch = out if len(out) <= IOV_MAX else out[:IOV_MAX]
            batch_bytes = self._queued_bytes - self._sent_bytes if batch is out else sum(len(b) for b in batch)
            try:
                sent = self.sock.sendmsg(batch, (), socket.MSG_NOSIGNAL)
            except BlockingIOError:
                sent = 0
            except OSError as exc:  # the client cannot take them any more
                self.close(f"sending failed: {exc.strerror or exc}", drop_replies=True)
                break
            if sent == batch_bytes and batch is out:  # all of it: the common case
                self._sent_bytes += sent
                out.clear()
                self._ends.clear()
                self._blocked = False
                break
            self._consume(sent)
            if sent < batch_bytes:
                self._blocked = True
                break
        else:
            self._blocked = False
        if self._blocked or self._writing or not self._reading or self._deferred or self.closing or self.quiescing:
            self._progress()  # (else nothing changes: the common case)

    def _schedule_send(self) -> None:
        self._send_scheduled = True
        self._send_bh.schedule()

    def _consume(self, sent: int) -> None:
        """Drop the ``sent`` bytes from the front of the queue."""
        self._sent_bytes += sent
        out = self._out
        i = 0
        while i < len(out) and (sent or not len(out[i])):
            size = len(out[i])
            if size <= sent:
                sent -= size
                i += 1
            else:
                out[i] = memoryview(out[i])[sent:]
                sent = 0
        del out[:i]
        ends = self._ends
        while ends and ends[0] <= self._sent_bytes:
            ends.popleft()

    # -- state ---------------------------------------------------------------

    def kick(self) -> None:
        """Credit was released elsewhere: start what waited for it."""
        self._progress()

    def _progress(self) -> None:
        """After anything changed: start what waited for credit, end the
        connection if it is done, watch the socket for what is wanted now."""
        if self.closed:
            return
        if self._deferred and not self._nest and not self._drop_replies:
            self._nest += 1
            try:
                while self._deferred and self._admit(self._deferred[0]):
                    self._start(self._deferred.popleft())
            finally:
                self._nest -= 1
            if self._out and not self._blocked:
                self._schedule_send()
            if self._deferred and not self.in_flight and not self._out:
                # Nothing of its own will free credit: the others' completions will.
                self.credit.waiting.add(self)
        idle = not self.in_flight and not self._deferred
        if self.closing:
            if idle and (self._drop_replies or not self._out):
                self._end(None)
                return
        elif self.quiescing and idle and not self._out and not self._missing_bytes():
            self._end(replace(self.conn, pending=self._carry))
            return
        self._watch(not self.closing and not self._deferred and (not self.quiescing or self._missing_bytes() > 0),
                    self._blocked)

    def _watch(self, read: bool, write: bool) -> None:
        polled = read and not write and self._lone_reads >= LONE_READS_TO_POLL and self.credit.may_poll(self)
        if (read, write, polled) != (self._reading, self._writing, self._polled):
            self._reading, self._writing, self._polled = read, write, polled
            if not polled:
                self.credit.polled.discard(self)
            # Busy polling (see the module's docstring): while reading, not
            # waiting for POLLOUT, and the client sends one request at a time.
            self.ctx.set_fd_handler(self.fd, self._on_readable if read else None, self._send if write else None,
                                    self._readable_now if polled else None)

    def _readable_now(self) -> bool:
        """Busy polling's check (``io_poll``): input (or its end) is waiting."""
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(0))

    def close(self, reason: str, *, drop_replies: bool = False) -> None:
        """Stop reading; once the requests in flight completed (and, unless
        ``drop_replies``, their replies went out), close the socket."""
        if self.closed:
            return
        if not self.closing:
            log.debug("NBD connection %d (export %s): closing: %s", self.conn.connection_id,
                      self.conn.export_id, reason)
            self.closing = reason
            self._arm_deadline()
        if drop_replies and not self._drop_replies:
            self._drop_replies = True
            self._deferred.clear()
            self._out.clear()
            self._blocked = False
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # the client sees the end now, not after the requests
            except OSError:
                pass
        self._progress()

    def quiesce(self) -> None:
        """Stop reading at the next request boundary; once nothing is in
        flight and every reply went out, end with the connection to hand on."""
        if self.closed or self.closing or self.quiescing:
            return
        self.quiescing = True
        self._arm_deadline()
        self._progress()

    def _arm_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = self.ctx.timer_new_ms(ClockType.REALTIME, self._on_deadline, "nbd-drain-deadline")
            self._deadline.mod(self._deadline.now() + DRAIN_TIMEOUT_MS)

    def _on_deadline(self) -> None:
        self.bad_input.log(("nbd", "deadline"), logging.WARNING,
                           "NBD connection %d (export %s): not drained within %d ms (its client takes no "
                           "replies): closing it", self.conn.connection_id, self.conn.export_id, DRAIN_TIMEOUT_MS)
        self.quiescing = False
        self.close(self.closing or "quiescing took too long", drop_replies=True)

    def _end(self, handed_back: NbdConnection | None) -> None:
        self.abort(close_socket=handed_back is None)
        self.on_end(self, handed_back)

    def abort(self, *, close_socket: bool = True) -> None:
        """Stop serving at once: no more callbacks from the context, the
        socket closed (unless ``close_socket`` is false: it is passed on).
        ``on_end`` is not called (``close`` and ``quiesce`` end with it)."""
        self.closed = True
        self.credit.waiting.discard(self)
        self.credit.polled.discard(self)
        if self._reading or self._writing:
            self.ctx.set_fd_handler(self.fd)
            self._reading = self._writing = False
        self._send_bh.delete()
        if self._deadline is not None:
            self._deadline.delete()
            self._deadline = None  # (its callback refers to this connection: no cycle left)
        self._out.clear()
        self._deferred.clear()
        self._poller = None
        self._slab = None
        if close_socket:
            self.sock.close()
