"""Block-I/O benchmark: 4 KiB random reads through one iothread.

Usage: ``python examples/bench/blockio.py [--quick] [--json PATH]``

A cluster with one iothread serves a page-cached raw image (1 GiB; 256 MiB
with ``--quick``) and a ``null-co`` node.  A ``BlockClient`` in this process
reads 4 KiB at random offsets:

QD1 latency (us, lower is better)
    one read at a time, against (a) raw pyzmq ping-pong of the same frames
    (a ROUTER here, a DEALER echo in a child process: the ZeroMQ hops alone,
    both sides blocked inside libzmq; the target is against this one) and the
    same ping-pong with both sides waiting as an event loop must, in epoll on
    ZMQ_FD ("pyzmq epoll loop": the floor of any Python loop over ZeroMQ;
    see ``_common.EchoPeer``).
QD32 IOPS (higher is better)
    32 reads in flight, against (b) asyncio with 32 ``run_in_executor(os.pread)``
    in flight, (c) a one-process ``os.pread`` loop (the ceiling, no hand-off
    at all), and (d) fio's psync engine when fio is installed.
null-co QD32 IOPS
    the same against the null driver: no I/O, the framework's own cost.

The image is re-read sequentially before every measured run, for ours and the
baselines alike, so that it sits in the page cache (fio runs with
``invalidate=0``: by default it drops the file from the page cache first, and
would measure the disk, not the cached file the other rows read).  Medians of interleaved
repeats.  Targets: QD1 latency <= 1.5x raw pyzmq's; QD32 IOPS >= 2x asyncio's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from _common import (  # noqa: E402
    EchoPeer, Row, cpu_note, launched, measure, parse_args, print_table, rows_for, run, scratch_dir, warm,
    write_image, write_json,
)

from iothreads import BlockClient  # noqa: E402
from protocol import BlockCompletion, BlockRequest, encode  # noqa: E402

BS = 4096
DEPTH = 32
RAW = "raw pyzmq ping-pong"
RAW_REQUEST = encode(BlockRequest(1, "disk0", "read", 0, BS))

class Setup:
    """The image, a launched cluster (one iothread) and a client; ``close``
    stops the cluster and removes the image (``_common.launched``,
    ``scratch_dir``)."""

    def __init__(self, size: int) -> None:
        self._stack = contextlib.ExitStack()
        try:
            self.dir = self._stack.enter_context(scratch_dir("evbio"))
            self.image = os.path.join(self.dir, "disk.img")
            self.size = size
            write_image(self.image, size)
            run = os.path.join(self.dir, "run")
            self._stack.enter_context(launched(
                "--iothreads", "1", "--runtime-dir", run,
                "--blockdev", f"driver=file,node-name=disk0,filename={self.image}",
                "--blockdev", "driver=null-co,node-name=null0,size=1G"))
            self.client = BlockClient(run)
            self._stack.callback(self.client.close)
        except BaseException:
            self._stack.close()
            raise
        self.blocks = size // BS
        self.rng = random.Random(1)

    def warm(self) -> None:
        """Re-read the image so it is in the page cache (same for every side)."""
        warm(self.image)

    def offset(self) -> int:
        return self.rng.randrange(self.blocks) * BS

    def close(self) -> None:
        """Close the client, stop the cluster, remove the image."""
        self._stack.close()


def ours_qd1(s: Setup, n: int) -> float:
    s.warm()
    t0 = time.perf_counter()
    for _ in range(n):
        s.client.read("disk0", s.offset(), BS)
    return (time.perf_counter() - t0) / n * 1e6


def ours_qd(s: Setup, node: str, n: int) -> float:
    s.warm()
    c = s.client
    done = 0
    sent = 0

    def completed(status: int, message: str, data: bytes) -> None:
        nonlocal done
        done += 1

    t0 = time.perf_counter()
    while done < n:
        while sent < n and c.in_flight < DEPTH:
            c.submit(node, "read", s.offset(), BS, callback=completed)
            sent += 1
        c.ctx.poll(True)
    return n / (time.perf_counter() - t0)


def raw_qd1(s: Setup, raw: EchoPeer, n: int, epoll: bool) -> float:
    """The same frames, ping-ponged by raw pyzmq between this process and a child."""
    s.warm()
    return 1e6 / raw.rtt(RAW_REQUEST, n, epoll)


def asyncio_executor(s: Setup, n: int) -> float:
    s.warm()
    fd = os.open(s.image, os.O_RDONLY)

    async def run() -> float:
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(DEPTH)

        async def one() -> None:
            async with sem:
                await loop.run_in_executor(None, os.pread, fd, BS, s.offset())

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - t0)

    try:
        return asyncio.run(run())
    finally:
        os.close(fd)


def pread_loop(s: Setup, n: int) -> float:
    s.warm()
    fd = os.open(s.image, os.O_RDONLY)
    t0 = time.perf_counter()
    for _ in range(n):
        os.pread(fd, BS, s.offset())
    rate = n / (time.perf_counter() - t0)
    os.close(fd)
    return rate


def fio_argv(image: str, size_bytes: int, seconds: float) -> list[str]:
    """fio's command line for its row: 4 KiB random reads of ``image`` with the
    psync engine for ``seconds``, the result as JSON.  ``--invalidate=0`` keeps
    the page cache that ``Setup.warm`` filled: by default fio drops the file
    from it first, and would measure the disk, not the cached file that every
    other row reads."""
    return ["fio", "--name=r", f"--filename={image}", "--rw=randread", f"--bs={BS}", "--ioengine=psync",
            "--invalidate=0", f"--runtime={seconds}", "--time_based", "--output-format=json",
            f"--size={size_bytes}"]


def fio_psync(s: Setup, seconds: float) -> float:
    s.warm()
    out = subprocess.run(fio_argv(s.image, s.size, seconds), capture_output=True, text=True, timeout=120)
    return float(json.loads(out.stdout)["jobs"][0]["read"]["iops"])


def main() -> None:
    args = parse_args("4 KiB random reads through one iothread, against raw pyzmq, asyncio, pread, fio.")
    size, repeats, n1, n32 = ((256 << 20), 5, 500, 2000) if args.quick else ((1 << 30), 7, 2000, 10000)
    print(cpu_note())
    print("the main loop, the iothread and this client are separate processes, not pinned\n", flush=True)
    s = Setup(size)
    try:
        rows: list[Row] = []
        raw = EchoPeer(f"ipc://{s.dir}/echo", {len(RAW_REQUEST): encode(BlockCompletion(1, 0, "", bytes(BS)))})
        try:
            qd1 = measure([("ours", lambda: ours_qd1(s, n1)),
                           (RAW, lambda: raw_qd1(s, raw, n1, False)),
                           ("pyzmq epoll loop", lambda: raw_qd1(s, raw, n1, True))], repeats)
        finally:
            raw.close()
        rows += rows_for("QD1 4K randread latency", "us", "lower", qd1)
        sides: list[tuple[str, Callable[[], float]]] = [
            ("ours", lambda: ours_qd(s, "disk0", n32)),
            ("asyncio 32x run_in_executor(pread)", lambda: asyncio_executor(s, n32)),
            ("os.pread loop (ceiling)", lambda: pread_loop(s, n32 * 5)),
        ]
        if shutil.which("fio"):
            sides.append(("fio psync", lambda: fio_psync(s, 1 if args.quick else 3)))
        else:
            print("fio is not installed: its row is skipped")
        rows += rows_for("QD32 4K randread", "IOPS", "higher", measure(sides, repeats))
        rows += rows_for("null-co QD32 4K read", "IOPS", "higher", measure(
            [("ours", lambda: ours_qd(s, "null0", n32)),
             ("asyncio 32x run_in_executor(pread)", lambda: asyncio_executor(s, n32))], repeats))
    finally:
        s.close()
    print_table(rows)
    by = {(r.metric, r.baseline): r.ratio for r in rows}
    qd1_ratio = by[("QD1 4K randread latency", RAW)]
    qd32_ratio = by[("QD32 4K randread", "asyncio 32x run_in_executor(pread)")]
    print(f"\ntarget QD1 latency <= 1.5x raw pyzmq: {qd1_ratio:.2f} {'met' if qd1_ratio <= 1.5 else 'MISSED'}")
    print(f"target QD32 IOPS >= 2x asyncio: {qd32_ratio:.2f} {'met' if qd32_ratio >= 2 else 'MISSED'}")
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    run(main)
