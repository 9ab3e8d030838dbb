"""A soak: a million block requests through one cluster, its memory and
descriptors watched.

Usage: ``python examples/soak.py [--requests N] [--depth D] [--json PATH]``

An embedded cluster (``iothreads launch``: two iothreads, a 64 MiB image, a
node on each) serves ``--requests`` 4 KiB requests (1,000,000 by default)
from the block client, ``--depth`` (32) in flight, over both nodes: writes of
a pattern that names the block and its generation, reads that check what
they get, a flush every 1,000 requests.  After the first 5% (warm-up: the
page cache, the allocator, the pools), and at the end, it reads each
process's resident memory (VmRSS) and its open descriptors (/proc/PID/fd):
the launcher and each iothread.  The table gives both, their growth, the
requests per second and the mismatches and errors.  Exit status 1 if a
process's memory grew by 5% or more, a descriptor count changed, or a
request failed or read back wrong data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import time
from typing import Any

from mainloop import EmbeddedCluster

BS = 4096
IMAGE_BYTES = 64 << 20
BLOCKS_PER_NODE = IMAGE_BYTES // BS // 2  # each node its half of the one image
NODES = ("disk0", "disk1")
FLUSH_EVERY = 1000
WARMUP_SHARE = 0.05
RSS_GROWTH_MAX = 0.05


def pattern(node: int, block: int, generation: int) -> bytes:
    """4 KiB that name their node, block and generation."""
    seed = hashlib.sha256(f"{node}:{block}:{generation}".encode()).digest()
    return (seed * (BS // len(seed)))[:BS]


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cluster_pids(cluster: EmbeddedCluster) -> dict[str, int]:
    """The launcher and its iothreads (its janitor, which only waits, aside), by name."""
    found = {"launcher": cluster.pid}
    with open(f"/proc/{cluster.pid}/task/{cluster.pid}/children") as f:
        for pid in map(int, f.read().split()):
            with open(f"/proc/{pid}/cmdline", "rb") as c:
                argv = c.read().split(b"\0")
            if b"iothreads.worker" in argv:
                found[argv[argv.index(b"--id") + 1].decode()] = pid
    return found


def sample(pids: dict[str, int]) -> dict[str, tuple[int, int]]:
    return {name: (vm_rss_kib(pid), fds(pid)) for name, pid in pids.items()}


class Soak:
    """The workload: ``depth`` requests in flight, never two on one block."""

    def __init__(self, cluster: EmbeddedCluster, total: int, depth: int, seed: int,
                 interrupted: list[bool]) -> None:
        self.client = cluster.client
        self.total = total
        self.depth = depth
        self.rng = random.Random(seed)
        self.generation = [[0] * BLOCKS_PER_NODE for _ in NODES]  # the last one acknowledged
        self.busy: set[tuple[int, int]] = set()
        self.sent = self.done = self.errors = self.mismatches = 0
        self.since_flush = 0
        self.flushing = False
        self._interrupted = interrupted  # (appended to by the SIGINT handler)

    @property
    def interrupted(self) -> bool:
        """Ctrl-C came: no new requests; ``run_until`` returns once those in flight are done."""
        return bool(self._interrupted)

    def _complete(self, status: int) -> None:
        self.done += 1
        if status < 0:
            self.errors += 1

    def _submit(self) -> None:
        node = self.rng.randrange(len(NODES))
        block = self.rng.randrange(BLOCKS_PER_NODE)
        while (node, block) in self.busy:
            block = self.rng.randrange(BLOCKS_PER_NODE)
        self.busy.add((node, block))
        offset = (node * BLOCKS_PER_NODE + block) * BS  # (both nodes are of the one image)
        generation = self.generation[node][block]
        if generation and self.rng.random() < 0.5:
            def read_done(status: int, message: str, data: bytes) -> None:
                self.busy.discard((node, block))
                if status >= 0 and bytes(data) != pattern(node, block, generation):
                    self.mismatches += 1
                self._complete(status)
            self.client.submit(NODES[node], "read", offset, BS, callback=read_done)
        else:
            def write_done(status: int, message: str, data: bytes) -> None:
                self.busy.discard((node, block))
                if status >= 0:
                    self.generation[node][block] = generation + 1
                self._complete(status)
            self.client.submit(NODES[node], "write", offset, BS, pattern(node, block, generation + 1),
                               callback=write_done)
        self.sent += 1
        self.since_flush += 1

    def _flush(self) -> None:
        self.flushing = True
        self.since_flush = 0
        left = len(NODES)

        def flushed(status: int, message: str, data: bytes) -> None:
            nonlocal left
            left -= 1
            if status < 0:
                self.errors += 1
            if not left:
                self.flushing = False
        for name in NODES:
            self.client.submit(name, "flush", callback=flushed)

    def run_until(self, done: int) -> None:
        """Keep ``depth`` in flight until ``done`` requests have completed."""
        ctx = self.client.ctx
        while self.done < (self.sent if self.interrupted else done) or self.flushing:
            if not self.interrupted:
                if self.since_flush >= FLUSH_EVERY and not self.flushing:
                    self._flush()
                while self.sent < min(done, self.total) and self.sent - self.done < self.depth:
                    self._submit()
            ctx.poll(True, 100_000_000)


def main() -> int:
    parser = argparse.ArgumentParser(description="A million block requests through one cluster: memory and "
                                     "descriptors before and after.")
    parser.add_argument("--requests", type=int, default=1_000_000, help="requests in all (1,000,000)")
    parser.add_argument("--depth", type=int, default=32, help="requests in flight (32)")
    parser.add_argument("--seed", type=int, default=1, help="the workload's seed (1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args()
    if args.requests < 100 or not 1 <= args.depth <= 1024:
        parser.error("--requests must be >= 100 and --depth between 1 and 1024")
    return soak_run(args)


def soak_run(args: argparse.Namespace) -> int:
    # Ctrl-C: no new requests; those in flight complete, the cluster stops in order.
    interrupted: list[bool] = []
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(True))
    with EmbeddedCluster(IMAGE_BYTES, iothreads=2) as cluster:
        pids = cluster_pids(cluster)
        soak = Soak(cluster, args.requests, args.depth, args.seed, interrupted)
        warm = int(args.requests * WARMUP_SHARE)
        print(f"soak: {args.requests:,} requests, depth {args.depth}; warming up", flush=True)
        soak.run_until(warm)
        before = sample(pids)
        t0 = time.monotonic()
        soak.run_until(args.requests)
        elapsed_s = time.monotonic() - t0
        after = sample(pids)
    if soak.interrupted:
        print("soak.py: interrupted", file=sys.stderr)
        return 130
    rows: list[dict[str, Any]] = []
    failed = soak.errors > 0 or soak.mismatches > 0
    for name in pids:
        (rss0, fd0), (rss1, fd1) = before[name], after[name]
        growth = (rss1 - rss0) / rss0 if rss0 else 0.0
        failed |= growth >= RSS_GROWTH_MAX or fd1 != fd0
        rows.append({"process": name, "rss_kib_before": rss0, "rss_kib_after": rss1,
                     "rss_growth_pct": round(100 * growth, 2), "fds_before": fd0, "fds_after": fd1})
    print(f"{args.requests:,} requests ({warm:,} of warm-up), depth {args.depth}: "
          f"{(args.requests - warm) / elapsed_s:,.0f} requests/s after the warm-up; "
          f"errors {soak.errors}, mismatches {soak.mismatches}")
    print(f"{'process':<10} {'RSS KiB before':>14} {'after':>10} {'growth':>8} {'fds before':>10} {'after':>6}")
    for r in rows:
        print(f"{r['process']:<10} {r['rss_kib_before']:>14,} {r['rss_kib_after']:>10,} "
              f"{r['rss_growth_pct']:>7.2f}% {r['fds_before']:>10} {r['fds_after']:>6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "warmup": warm, "depth": args.depth,
                       "requests_per_s": (args.requests - warm) / elapsed_s, "errors": soak.errors,
                       "mismatches": soak.mismatches, "processes": rows}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
