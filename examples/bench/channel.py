"""Channel benchmark: requests from the main loop to an iothread process and back,
against raw pyzmq doing the same ping-pong.

Usage: ``python examples/bench/channel.py [--quick] [--json PATH]``

ours
    A ``MainLoop`` and a ``Cluster`` with one iothread process
    (``IOThreadConfig("io0")``, its defaults: busy polling up to 32 us).  The
    main side runs under the BQL and waits with ``loop.main_loop_wait()``
    (the real main-loop iteration: prepare, release the BQL, epoll, retake it,
    dispatch the channel's source); the iothread is ``python -m iothreads.worker``:
    an AioContext serving a DEALER channel.  Every message is encoded and
    decoded by ``protocol``'s codec on both sides.
raw pyzmq
    A bare ROUTER in this process and a DEALER in a child process (an echo
    script run with ``python -c``, see ``_common.EchoPeer``), blocking
    ``recv_multipart`` / ``send_multipart`` on both sides, carrying the very
    frames ours carries (``encode(Query(..))`` and ``encode(QueryReply(..,
    counters))`` with the iothread's real counters; ``encode(BlockRequest(..,
    4 KiB))`` and the worker's ``BlockCompletion``), without decoding them.
    It is the floor of ZeroMQ: ``ipc://`` with no loop and no codec.  The
    targets are against this one.
pyzmq epoll loop
    The same two processes and frames, but both sides wait as any event loop
    over ZeroMQ must: in epoll on the socket's ZMQ_FD (edge-triggered), reading
    ZMQ_EVENTS before each non-blocking recv, and nothing else: no framework,
    no codec.  It is the floor of a Python event loop over ZeroMQ; ``ours``
    against it is the cost of the framework itself (loops, channel, codec,
    handlers).

Metrics (higher is better):

round trip, empty
    ``Cluster.query`` one at a time: send a ``Query``, iterate the main loop
    until its ``QueryReply`` callback ran; round trips/s.
round trip, 4 KiB write
    ``BlockRequest(write, 4 KiB)`` via ``cluster.channel.send`` and wait for
    its ``BlockCompletion`` (status ``-ENODEV``: there is no block layer yet;
    the worker answers every request).  The cluster ignores completions, so
    the bench wraps ``cluster.channel.on_message`` to catch them.
pipelined x32, empty / 4 KiB write
    The same requests, 32 in flight: each reply sends the next request (from
    inside the channel's drain); replies/s.

Targets (from the issue): round-trip rate >= 1/1.3 of raw pyzmq's (ratio
>= 0.77, i.e. latency <= 1.3x) and pipelined rate >= 0.7x raw pyzmq's.

The cluster and the raw echo process are started once and reused by every
repeat; the two sides alternate (see ``_common.py``).  The cluster runs with
a long heartbeat period so that the iothread, not heard from while the
baseline runs, does not give up on the main loop.  Everything is torn down at
the end: ``cluster.shutdown()`` under the BQL, ``loop.close()``, the echo
process reaped, both runtime directories (and their socket files) removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from _common import (  # noqa: E402
    EchoPeer, Row, cpu_note, measure, parse_args, print_table, rows_for, run, write_json,
)

from mainloop import Cluster, IOThreadConfig, IOThreadState, MainLoop, bql  # noqa: E402
from protocol import (  # noqa: E402
    BlockCompletion,
    BlockRequest,
    ErrorReply,
    Message,
    Query,
    QueryReply,
    encode,
    ipc_endpoint,
    make_runtime_dir,
)

DEPTH = 32
BLOCK = 4096
NODE = "null0"
PAYLOAD = os.urandom(BLOCK)


# -- ours: the main loop and an iothread process ------------------------------------------


class Ours:
    """A MainLoop, a Cluster with one iothread, and the completion hook."""

    def __init__(self) -> None:
        self.loop = MainLoop(name="bench")
        self.cluster: Cluster | None = None
        self.on_completion: Callable[[BlockCompletion], object] | None = None
        self.next_id = 1 << 40  # block request ids, apart from the cluster's query ids
        self.counters: dict[str, int] = {}
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        with bql():
            self.cluster = Cluster(self.loop, heartbeat_interval_ms=10_000)
            self.cluster.add(IOThreadConfig("io0"))
            if not self.cluster.wait_for(self.cluster.all_running, 30):
                raise RuntimeError("the iothread did not start")
            channel = self.cluster.channel
            original = channel.on_message

            def on_message(identity: bytes, msg: Message) -> None:
                if isinstance(msg, BlockCompletion) and self.on_completion is not None:
                    self.on_completion(msg)
                else:
                    original(identity, msg)

            channel.on_message = on_message
            replies: list[QueryReply | ErrorReply] = []
            self.cluster.query("io0", replies.append)
            if not self.cluster.wait_for(lambda: bool(replies), 30):
                raise RuntimeError("the iothread did not answer a query")
            reply = replies[0]
            if not isinstance(reply, QueryReply):
                raise RuntimeError(f"query failed: {reply}")
            self.counters = reply.counters

    def wait(self) -> None:
        """One main-loop iteration (BQL held); fails if the iothread is gone
        (its completions would never come)."""
        assert self.cluster is not None
        self.loop.main_loop_wait(False)
        if self.cluster.iothreads["io0"].state is not IOThreadState.RUNNING:
            raise RuntimeError("the iothread is not running any more")

    def block_request(self) -> BlockRequest:
        self.next_id += 1
        return BlockRequest(self.next_id, NODE, "write", 0, BLOCK, data=PAYLOAD)

    def rtt_query(self, n: int) -> float:
        """n queries one at a time; round trips/s."""
        cluster, wait = self.cluster, self.wait
        assert cluster is not None
        got: list[QueryReply | ErrorReply] = []
        with bql():
            t0 = time.perf_counter()
            for i in range(n):
                cluster.query("io0", got.append)
                while len(got) <= i:
                    wait()
            elapsed = time.perf_counter() - t0
        assert all(isinstance(r, QueryReply) for r in got)
        return n / elapsed

    def rtt_block(self, n: int) -> float:
        """n 4 KiB writes one at a time; round trips/s."""
        cluster, wait = self.cluster, self.wait
        assert cluster is not None
        send = cluster.channel.send
        got: list[BlockCompletion] = []
        self.on_completion = got.append
        with bql():
            t0 = time.perf_counter()
            for i in range(n):
                send(self.block_request(), b"io0")
                while len(got) <= i:
                    wait()
            elapsed = time.perf_counter() - t0
        self.on_completion = None
        assert all(c.status == -errno.ENODEV for c in got)
        return n / elapsed

    def pipelined_query(self, n: int) -> float:
        """n queries, DEPTH in flight; replies/s."""
        cluster, wait = self.cluster, self.wait
        assert cluster is not None
        issued = done = 0

        def on_reply(reply: QueryReply | ErrorReply) -> None:
            nonlocal issued, done
            assert isinstance(reply, QueryReply)
            done += 1
            if issued < n:
                issued += 1
                cluster.query("io0", on_reply)

        with bql():
            t0 = time.perf_counter()
            for _ in range(min(DEPTH, n)):
                issued += 1
                cluster.query("io0", on_reply)
            while done < n:
                wait()
            elapsed = time.perf_counter() - t0
        return n / elapsed

    def pipelined_block(self, n: int) -> float:
        """n 4 KiB writes, DEPTH in flight; replies/s."""
        cluster, wait = self.cluster, self.wait
        assert cluster is not None
        send = cluster.channel.send
        issued = done = 0

        def on_completion(c: BlockCompletion) -> None:
            nonlocal issued, done
            assert c.status == -errno.ENODEV
            done += 1
            if issued < n:
                issued += 1
                send(self.block_request(), b"io0")

        self.on_completion = on_completion
        with bql():
            t0 = time.perf_counter()
            for _ in range(min(DEPTH, n)):
                issued += 1
                send(self.block_request(), b"io0")
            while done < n:
                wait()
            elapsed = time.perf_counter() - t0
        self.on_completion = None
        return n / elapsed

    def close(self) -> None:
        try:
            if self.cluster is not None:
                with bql():
                    self.cluster.shutdown()
        finally:
            self.loop.close()


# -- driver ---------------------------------------------------------------------------------


TARGETS = {"round trips/s": 1 / 1.3, "replies/s": 0.7}  # against RAW
RAW = "raw pyzmq"
FLOOR = "pyzmq epoll loop"


def main() -> None:
    args = parse_args("Channel round trips and pipelining, main loop <-> iothread process, "
                      "against raw pyzmq.")
    repeats, n_rtt, n_pipe = (5, 1_500, 3_000) if args.quick else (11, 6_000, 15_000)
    print(cpu_note())
    print("two processes on each side (main loop + iothread; raw ROUTER + raw DEALER echo), "
          "not pinned: the scheduler places them, for ours and the baseline alike")
    print(f"median of {repeats} interleaved repeats (after 1 warm-up), {n_rtt} round trips / "
          f"{n_pipe} pipelined replies each, {'--quick' if args.quick else 'full'} run\n", flush=True)

    ours: Ours | None = None
    raw: EchoPeer | None = None
    raw_dir = make_runtime_dir(prefix="evlraw")
    rows: list[Row] = []
    try:
        ours = Ours()
        query = encode(Query(1))
        block = encode(BlockRequest(1, NODE, "write", 0, BLOCK, data=PAYLOAD))
        assert (len(query), len(block)) == (1, 2)  # the echo tells them apart by their frames
        raw = EchoPeer(ipc_endpoint(raw_dir, "raw"), {
            1: encode(QueryReply(1, ours.counters)),
            2: encode(BlockCompletion(1, -errno.ENODEV, f"no block node named {NODE!r}")),
        })
        cases: list[tuple[str, str, Callable[[], float], Callable[[bool], float]]] = [
            ("round trip, empty", "round trips/s",
             partial(ours.rtt_query, n_rtt), partial(raw.rtt, query, n_rtt)),
            ("round trip, 4 KiB write", "round trips/s",
             partial(ours.rtt_block, n_rtt), partial(raw.rtt, block, n_rtt)),
            (f"pipelined x{DEPTH}, empty", "replies/s",
             partial(ours.pipelined_query, n_pipe), partial(raw.pipelined, query, n_pipe, DEPTH)),
            (f"pipelined x{DEPTH}, 4 KiB write", "replies/s",
             partial(ours.pipelined_block, n_pipe), partial(raw.pipelined, block, n_pipe, DEPTH)),
        ]
        for metric, unit, ours_fn, raw_fn in cases:
            medians = measure([("ours", ours_fn), (RAW, partial(raw_fn, False)), (FLOOR, partial(raw_fn, True))],
                              repeats)
            rows += rows_for(metric, unit, "higher", medians)
    finally:
        try:
            if raw is not None:
                raw.close()
        finally:
            shutil.rmtree(raw_dir, ignore_errors=True)
            if ours is not None:
                ours.close()
    print_table(rows)
    print()
    for r in rows:
        if r.baseline != RAW:
            continue
        target = TARGETS[r.unit]
        verdict = "met" if r.ratio >= target else "MISSED"
        print(f"target {r.metric}: ratio >= {target:.2f}: {r.ratio:.2f} {verdict}")
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    run(main)
