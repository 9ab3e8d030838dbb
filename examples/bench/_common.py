"""Shared plumbing for the benchmarks in this folder: options, repeats, output.

Every benchmark compares *ours* (this project) with one or more *baselines*
(asyncio, uvloop...) in one process and one run.  A measurement is a function
returning one number; ``measure`` calls ours and each baseline in turn
(ours, baseline, ours, baseline...) so that drift of the machine (frequency
scaling, a noisy neighbour) hits every side alike, and keeps the median.

Rows go to a table on stdout and, with ``--json PATH``, to a JSON list of
``{"metric", "unit", "ours", "baseline", "baseline_value", "ratio", "better"}``
where ``ratio = ours / baseline_value`` and ``better`` says whether a higher or
a lower value is the better one.

``run(main)`` runs a benchmark: Ctrl-C ends it with one line and exit status
130, what it started being stopped on the way out.  ``scratch_dir``,
``write_image``, ``warm`` and ``launched`` are what the benchmarks that drive
a cluster share: a directory that goes with the run, a page-cached image, a
launched cluster that is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import msgpack
import zmq

from iothreads import set_parent_death_signal

__all__ = ["Row", "cpu_note", "launched", "measure", "parse_args", "print_table", "rows_for", "run", "scratch_dir",
           "warm", "write_image", "write_json"]

Better = Literal["higher", "lower"]


@dataclass(frozen=True)
class Row:
    metric: str
    unit: str
    ours: float
    baseline: str
    baseline_value: float
    ratio: float
    better: Better


def run(main: Callable[[], None]) -> None:
    """Run a benchmark's ``main``; Ctrl-C: one line, exit status 130 (its
    ``finally`` blocks have stopped what it started)."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr)
        sys.exit(130)


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats (< 30 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    return parser.parse_args()


def cpu_note() -> str:
    """Which CPUs this process may run on."""
    cpus = sorted(os.sched_getaffinity(0))
    return f"CPUs available to this process: {cpus} ({len(cpus)} of {os.cpu_count()} online)"


def measure(sides: Sequence[tuple[str, Callable[[], float]]], repeats: int,
            warmup: int = 1) -> dict[str, float]:
    """Run each side ``warmup + repeats`` times, interleaved; return each side's median."""
    samples: dict[str, list[float]] = {name: [] for name, _ in sides}
    for i in range(warmup + repeats):
        for name, fn in sides:
            gc.collect()
            value = fn()
            if i >= warmup:
                samples[name].append(value)
    return {name: statistics.median(values) for name, values in samples.items()}


def rows_for(metric: str, unit: str, better: Better, medians: dict[str, float],
             ours: str = "ours") -> list[Row]:
    """One row per baseline in ``medians`` (every key but ``ours``)."""
    value = medians[ours]
    return [
        Row(metric, unit, value, name, base, value / base, better)
        for name, base in medians.items()
        if name != ours
    ]


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def print_table(rows: Sequence[Row]) -> None:
    header = ("metric", "unit", "ours", "baseline", "baseline value", "ratio", "better")
    cells = [header] + [
        (r.metric, r.unit, _fmt(r.ours), r.baseline, _fmt(r.baseline_value),
         f"{r.ratio:.2f}", r.better)
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    right = {2, 4, 5}  # numbers
    for n, line in enumerate(cells):
        print("  ".join(c.rjust(w) if i in right else c.ljust(w)
                        for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def write_json(rows: Sequence[Row], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([asdict(r) for r in rows], f, indent=2)
        f.write("\n")


# -- what the benchmarks that drive a cluster share ---------------------------------------

STOP_S = 30.0
"""Bound on a launched cluster's exit once it is told to stop."""


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[str]:
    """A new directory under $TMPDIR, else /tmp (a short path: a Unix
    socket's must stay under 108 bytes), removed with what is in it on the
    way out.  Ctrl-C is held off until it is made and covered by the
    removal: an interrupt in between would leave a directory nobody removes."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        path = tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("TMPDIR") or "/tmp")
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a Ctrl-C that came meanwhile lands here
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_image(path: str, size_bytes: int) -> None:
    """A raw image of ``size_bytes`` (whole MiB), data all through (no holes):
    one MiB of random bytes, repeated."""
    chunk = random.Random(0).randbytes(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size_bytes >> 20):
            f.write(chunk)


def warm(*paths: str) -> None:
    """Read files through, so that they sit in the page cache (done before
    each measured run, for every side alike)."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass


@contextlib.contextmanager
def launched(*args: str) -> Iterator[dict[str, Any]]:
    """``iothreads launch ARGS``: yields the data of its READY event; on the
    way out it is stopped (SIGTERM) and reaped.  The launcher runs in a
    session of its own (Ctrl-C at the terminal reaches this process only,
    which stops it) and goes when this process does.  One that exits before
    it is ready raises ``RuntimeError`` with the end of what it printed."""
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen([sys.executable, "-m", "mainloop", "launch", *args], stdout=subprocess.PIPE,
                                stderr=errors, text=True, start_new_session=True,
                                preexec_fn=set_parent_death_signal)
        try:
            assert proc.stdout is not None
            ready: dict[str, Any] | None = None
            for line in proc.stdout:
                event = json.loads(line)
                if event["event"] == "READY":
                    ready = event["data"]
                    break
            if ready is None:
                proc.wait(STOP_S)
                errors.seek(0)
                said = errors.read().decode(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"the cluster exited (status {proc.returncode}) before it was ready: "
                                   + " / ".join(said))
            yield ready
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


# -- the raw pyzmq baseline's peer --------------------------------------------------------

# A DEALER in a child process that answers each request with fixed frames, the
# reply chosen by the request's number of frames (the replies come in the first
# message, msgpack {frames: [reply frames]}).  It waits for a request blocked
# inside libzmq (``recv``), or, after a b"epoll" message, as any event loop
# over ZeroMQ must: epoll on the socket's ZMQ_FD (edge-triggered), ZMQ_EVENTS,
# then a non-blocking recv.  b"block" switches back; b"stop" ends it.
_ECHO = """
import select, sys, msgpack, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.setsockopt(zmq.LINGER, 0)
s.connect(sys.argv[1])
s.send(b"ready")
replies = {int(k): v for k, v in msgpack.unpackb(s.recv(), strict_map_key=False).items()}
ep = select.epoll()
ep.register(s.getsockopt(zmq.FD), select.EPOLLIN | select.EPOLLET)
EVENTS, POLLIN, NOBLOCK = zmq.EVENTS, zmq.POLLIN, zmq.NOBLOCK
recv, send, getsockopt, wait = s.recv_multipart, s.send_multipart, s.getsockopt, ep.poll
looped = False
while True:
    if looped:
        while not getsockopt(EVENTS) & POLLIN:
            wait()
        frames = recv(NOBLOCK)
    else:
        frames = recv()
    if len(frames) == 1 and frames[0] in (b"stop", b"epoll", b"block"):
        if frames[0] == b"stop":
            break
        looped = frames[0] == b"epoll"
        send([b"ok"])
        continue
    send(replies[len(frames)], NOBLOCK if looped else 0)
s.close()
ctx.term()
"""


class EchoPeer:
    """The raw pyzmq baseline: a ROUTER in this process, a DEALER echo child
    answering a request of k frames with ``replies[k]``.

    ``epoll=False``: both sides block inside libzmq (the floor of ZeroMQ).
    ``epoll=True``: both sides wait as an event loop does, in epoll on ZMQ_FD,
    with ZMQ_EVENTS reads and non-blocking calls, and nothing else: the floor
    of any Python event loop over ZeroMQ, framework-free."""

    def __init__(self, endpoint: str, replies: dict[int, list[bytes]]) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.proc: subprocess.Popen[bytes] | None = None
        self.identity = b""  # the child's, assigned by the ROUTER
        self._epoll = select.epoll()
        try:
            self.router.bind(endpoint)
            self._epoll.register(cast(int, self.router.getsockopt(zmq.FD)), select.EPOLLIN | select.EPOLLET)
            # In a session of its own (Ctrl-C at the terminal reaches this
            # process only, which stops it) and gone with this process.
            self.proc = subprocess.Popen([sys.executable, "-c", _ECHO, endpoint], start_new_session=True,
                                         preexec_fn=set_parent_death_signal)
            if not self.router.poll(30_000):
                raise RuntimeError("the raw echo process did not connect")
            self.identity, ready = self.router.recv_multipart()
            assert ready == b"ready", ready
            self.router.send_multipart([self.identity, msgpack.packb(replies)])
        except BaseException:
            self.close()
            raise
        self._looped = False

    def _mode(self, epoll: bool) -> None:
        if epoll != self._looped:
            self.router.send_multipart([self.identity, b"epoll" if epoll else b"block"])
            assert self.router.recv_multipart()[1:] == [b"ok"]
            self._looped = epoll

    def _io(self, epoll: bool) -> tuple[Callable[[list[bytes]], object], Callable[[], list[bytes]]]:
        """(send, recv) for one side of the ping-pong, the mode already set."""
        self._mode(epoll)
        router = self.router
        if not epoll:
            return router.send_multipart, router.recv_multipart
        getsockopt, wait, recv, send = router.getsockopt, self._epoll.poll, router.recv_multipart, router.send_multipart
        EVENTS, POLLIN, NOBLOCK = zmq.EVENTS, zmq.POLLIN, zmq.NOBLOCK  # noqa: N806

        def recv_looped() -> list[bytes]:
            while not cast(int, getsockopt(EVENTS)) & POLLIN:
                wait()
            return recv(NOBLOCK)

        return (lambda frames: send(frames, NOBLOCK)), recv_looped

    def rtt(self, request: list[bytes], n: int, epoll: bool = False) -> float:
        """``n`` requests one at a time; round trips/s."""
        send, recv = self._io(epoll)
        request = [self.identity, *request]
        t0 = time.perf_counter()
        for _ in range(n):
            send(request)
            recv()
        return n / (time.perf_counter() - t0)

    def pipelined(self, request: list[bytes], n: int, depth: int, epoll: bool = False) -> float:
        """``n`` requests, ``depth`` in flight; replies/s."""
        send, recv = self._io(epoll)
        request = [self.identity, *request]
        t0 = time.perf_counter()
        issued = min(depth, n)
        for _ in range(issued):
            send(request)
        for _ in range(n):
            recv()
            if issued < n:
                issued += 1
                send(request)
        return n / (time.perf_counter() - t0)

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self.router.send_multipart([self.identity, b"stop"], zmq.NOBLOCK)
                    self.proc.wait(10)
                except Exception:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            self._epoll.close()
            self.router.close(linger=0)
            self.ctx.term()
