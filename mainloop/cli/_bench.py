"""``iothreads bench``: a fio-like block-I/O workload against a cluster.

With no options it launches an embedded cluster (``iothreads launch`` with 2
iothreads and a temporary 256 MiB raw image, one node per iothread), runs
4 KiB random reads and writes for a few seconds with a live progress line,
prints a table (IOPS, MB/s, latency p50 / p99 / p99.9 per op type), and cleans
everything up.  ``--attach DIR`` uses an already launched cluster instead.

Jobs (``--numjobs``) are spread over the nodes, and so over the iothreads;
each job owns a disjoint region of the device and keeps ``--iodepth``
requests in flight.  All jobs run in this process on one AioContext: the
client's completions arrive through its channels, never through the main
loop.  ``--nbd`` sends the same workload through NBD instead (``_bench_nbd``:
one connection per job, to its node's export, found in the cluster's state
file; the embedded cluster then serves NBD on a socket in its runtime
directory and exports its nodes).  ``--verify`` writes a checksummed pattern
and reads it back; any mismatch fails the run with exit 1 (it refuses
null-co nodes, which discard what is written).  ``--json PATH`` writes the results as JSON (``-``: on
stdout, the table then going to stderr).

Ctrl-C (SIGINT) ends a run early: no new requests, those in flight complete,
and what was measured is printed and written, marked interrupted; exit 130.
A second Ctrl-C gives up at once.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from iothreads import AioContext, BlockClient, EventNotifier
from protocol import ClusterState

from ._bench_nbd import Completion, NbdTransport
from ._embedded import EmbeddedCluster
from ._options import OptionError, parse_size

__all__ = ["EXIT_INTERRUPTED", "add_bench_arguments", "run_bench"]

EXIT_INTERRUPTED = 128 + signal.SIGINT  # the shell's status for a command ended by Ctrl-C
log = logging.getLogger("mainloop.cli")

PATTERNS = ("randread", "randwrite", "randrw", "read", "write")
PROGRESS_INTERVAL_S = 0.5
# --bs: from a sector (room for the verify pattern's offset seed and checksum) to 16 MiB.
MIN_BS, MAX_BS = 512, 16 << 20


def _seconds(text: str) -> float:
    """A --runtime value: a finite number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds > 0")
    return value


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attach", metavar="DIR", help="the runtime directory of a launched cluster")
    p.add_argument("--rw", choices=PATTERNS, default="randrw", help="access pattern (default randrw)")
    p.add_argument("--bs", default="4k", help="block size, 512 to 16M (default 4k)")
    p.add_argument("--iodepth", type=int, default=16, help="requests in flight per job (default 16)")
    p.add_argument("--numjobs", type=int, default=0, help="jobs, spread over the nodes (default: one per node)")
    p.add_argument("--runtime", type=_seconds, default=3.0, help="seconds to run (default 3)")
    p.add_argument("--ops", type=int, default=0, help="stop after this many requests instead")
    p.add_argument("--size", default="256M", help="embedded image size (default 256M)")
    p.add_argument("--node", action="append", default=[], help="with --attach: nodes to use (default all)")
    p.add_argument("--nbd", action="store_true",
                   help="through NBD: one connection per job to its node's export (the embedded cluster "
                        "exports its nodes; with --attach, the cluster's exports)")
    p.add_argument("--verify", action="store_true", help="write a checksummed pattern, read it back")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': on stdout)")
    p.add_argument("--plot", metavar="PATH", help="a latency histogram PNG (needs matplotlib)")


@dataclass
class OpResult:
    ops: int = 0
    bytes: int = 0
    errors: int = 0
    latencies_ns: list[int] = field(default_factory=list)


def _percentile(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    k = min(len(sorted_ns) - 1, max(0, int(round(q * (len(sorted_ns) - 1)))))
    return sorted_ns[k] / 1000.0


def _pattern(offset: int, bs: int) -> bytes:
    """The verify pattern of the block at ``offset``: a stream of the offset's
    16-byte digest whose last 16 bytes are its own checksum (``bs`` bytes;
    ``bs >= MIN_BS`` leaves room for both)."""
    seed = hashlib.blake2b(offset.to_bytes(8, "little"), digest_size=16).digest()
    body = (seed * (bs // 16 + 1))[: bs - 16]
    return body + hashlib.blake2b(body, digest_size=16).digest()


Job = tuple[str, int, int]  # (node, start, blocks)


def plan_jobs(sizes: dict[str, int], numjobs: int, bs: int) -> list[Job]:
    """``numjobs`` jobs (0: one per node) spread over the nodes (``sizes``:
    their sizes, by name, in order), each with its own region of its node."""
    nodes = list(sizes)
    numjobs = numjobs or len(nodes)
    jobs: list[Job] = []
    per_node = {n: [j for j in range(numjobs) if j % len(nodes) == nodes.index(n)] for n in nodes}
    for node, node_jobs in per_node.items():
        size = sizes[node]
        region = (size // max(len(node_jobs), 1)) // bs * bs
        if region < bs:
            raise OptionError(f"node {node} ({size} bytes) is too small for {len(node_jobs)} jobs "
                              f"of --bs {bs}")
        for i, _ in enumerate(node_jobs):
            jobs.append((node, i * region, region // bs))
    return jobs


class Transport(Protocol):
    """What carries the jobs' requests: the block client, or NBD (``NbdTransport``)."""

    name: str
    ctx: AioContext

    def submit(self, job: int, op: str, offset: int, length: int, data: bytes, done: Completion) -> None:
        """Send job ``job``'s request; ``done(status, message, data)`` runs in ``ctx``."""

    def flush(self) -> None:
        """Make everything written so far stable (blocking)."""

    def close(self) -> None:
        """Release what the transport holds (not the block client, which its owner closes)."""


class BlockTransport:
    """The jobs' requests through the block client, straight to the iothreads."""

    name = "block"

    def __init__(self, client: BlockClient, jobs: list[Job]) -> None:
        self.client = client
        self.ctx = client.ctx
        self._nodes = [node for node, _, _ in jobs]

    def submit(self, job: int, op: str, offset: int, length: int, data: bytes, done: Completion) -> None:
        self.client.submit(self._nodes[job], op, offset, length, data, done)

    def flush(self) -> None:
        for node in sorted(set(self._nodes)):
            self.client.flush(node)

    def close(self) -> None:
        pass  # the client is its owner's


class Workload:
    """Jobs over nodes, their requests carried by ``io``; runs in its context."""

    def __init__(self, io: Transport, jobs: list[Job], args: argparse.Namespace, bs: int) -> None:
        self.io = io
        self.args = args
        self.bs = bs
        self.jobs = jobs
        self.results: dict[str, OpResult] = {}
        self.rng = random.Random(12345)
        self.cursor = [0] * len(self.jobs)
        self.in_flight = [0] * len(self.jobs)
        self.submitted = 0
        self.completed = 0
        self.mismatches: list[str] = []
        self.interrupted = False  # Ctrl-C: no new requests
        self._payload = random.Random(1).randbytes(bs)

    def _op(self) -> str:
        rw = self.args.rw
        if rw in ("randread", "read"):
            return "read"
        if rw in ("randwrite", "write"):
            return "write"
        return "read" if self.rng.random() < 0.5 else "write"

    def _offset(self, j: int) -> int:
        node, start, blocks = self.jobs[j]
        if self.args.rw.startswith("rand"):
            block = self.rng.randrange(blocks)
        else:
            block = self.cursor[j] % blocks
            self.cursor[j] += 1
        return start + block * self.bs

    def _submit(self, j: int, op: str, offset: int, data: bytes, check: bool = False) -> None:
        node = self.jobs[j][0]
        t0 = time.monotonic_ns()
        self.in_flight[j] += 1
        self.submitted += 1

        def done(status: int, message: str, out: bytes) -> None:
            self.in_flight[j] -= 1
            self.completed += 1
            r = self.results.setdefault(op, OpResult())
            r.ops += 1
            r.latencies_ns.append(time.monotonic_ns() - t0)
            if status < 0:
                r.errors += 1
                if len(self.mismatches) < 10:
                    self.mismatches.append(f"{op} {node}@{offset}: {os.strerror(-status)}: {message}")
                return
            r.bytes += self.bs if op in ("read", "write") else 0
            if check and out != _pattern(offset, self.bs) and len(self.mismatches) < 10:
                self.mismatches.append(f"verify: {node}@{offset}: data differs from what was written")

        self.io.submit(j, op, offset, self.bs if op != "flush" else 0, data, done)

    def _pump(self, make: Callable[[int], bool], total: int, progress: Progress | None) -> None:
        """Keep every job at --iodepth until ``total`` requests were made
        (or the runtime ran out, when total is 0).  ``make(j)`` submits one
        request for job j, or returns False when that job has nothing left."""
        ctx = self.io.ctx
        deadline = time.monotonic() + (self.args.runtime if not total else 1e9)
        depth = self.args.iodepth
        start_submitted = self.submitted
        while True:
            more = not self.interrupted and (
                (self.submitted - start_submitted < total) if total else time.monotonic() < deadline)
            if more:
                for j in range(len(self.jobs)):
                    while self.in_flight[j] < depth and (
                            not total or self.submitted - start_submitted < total):
                        if not make(j):
                            break
            if not any(self.in_flight) and not more:
                return
            ctx.poll(True)
            if progress is not None:
                progress.update(self)

    def run(self, progress: Progress | None) -> None:
        if self.args.verify:
            # Every job writes its blocks once, each with its pattern; then all
            # are read back and checked.
            per_job = max(1, (self.args.ops or 4096 * len(self.jobs)) // len(self.jobs))
            blocks = [[start + b * self.bs for b in range(min(n, per_job))] for _, start, n in self.jobs]
            total = sum(map(len, blocks))
            for op in ("write", "read"):
                queues = [list(reversed(b)) for b in blocks]

                def next_block(j: int, op: str = op, queues: list[list[int]] = queues) -> bool:
                    if not queues[j]:
                        return False
                    off = queues[j].pop()
                    if op == "write":
                        self._submit(j, "write", off, _pattern(off, self.bs))
                    else:
                        self._submit(j, "read", off, b"", check=True)
                    return True

                self._pump(next_block, total, progress)
                if self.interrupted:
                    return
                if op == "write":
                    self.io.flush()
            return

        def make(j: int) -> bool:
            op = self._op()
            self._submit(j, op, self._offset(j), self._payload if op == "write" else b"")
            return True

        self._pump(make, self.args.ops, progress)


class Progress:
    """A live line on stderr: IOPS, MB/s, elapsed."""

    def __init__(self, bs: int) -> None:
        self.bs = bs
        self.start = time.monotonic()
        self.last = self.start
        self.last_done = 0
        self.tty = sys.stderr.isatty()

    def update(self, w: Workload, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < PROGRESS_INTERVAL_S:
            return
        if final:  # the whole run's average, not its last fraction of an interval
            rate = w.completed / max(now - self.start, 1e-9)
        else:
            rate = (w.completed - self.last_done) / max(now - self.last, 1e-9)
        self.last, self.last_done = now, w.completed
        line = (f"[{now - self.start:6.1f}s] {rate:10,.0f} IOPS {rate * self.bs / 1e6:8.1f} MB/s "
                f"{w.completed:>10,} done")
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def _table(results: dict[str, OpResult], elapsed: float, bs: int) -> tuple[str, dict[str, Any]]:
    rows = [f"{'op':<6} {'ops':>9} {'errors':>6} {'IOPS':>10} {'MB/s':>8} "
            f"{'p50 us':>9} {'p99 us':>9} {'p99.9 us':>9}"]
    data: dict[str, Any] = {"elapsed_s": elapsed, "bs": bs, "ops": {}}
    for op, r in sorted(results.items()):
        lat = sorted(r.latencies_ns)
        iops = r.ops / elapsed if elapsed else 0.0
        p50, p99, p999 = (_percentile(lat, q) for q in (0.5, 0.99, 0.999))
        rows.append(f"{op:<6} {r.ops:>9,} {r.errors:>6} {iops:>10,.0f} {r.bytes / elapsed / 1e6:>8.1f} "
                    f"{p50:>9.1f} {p99:>9.1f} {p999:>9.1f}")
        data["ops"][op] = {"ops": r.ops, "errors": r.errors, "iops": iops, "mb_s": r.bytes / elapsed / 1e6,
                           "lat_p50_us": p50, "lat_p99_us": p99, "lat_p999_us": p999}
    return "\n".join(rows), data


def _plot(results: dict[str, OpResult], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise OptionError("--plot needs matplotlib (pip install 'iothreads[plot]')") from None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for op, r in sorted(results.items()):
        ax.hist([ns / 1000 for ns in r.latencies_ns], bins=100, alpha=0.6, label=op, log=True)
    ax.set_xlabel("latency (us)")
    ax.set_ylabel("requests")
    ax.legend()
    ax.set_title("iothreads bench: latency histogram")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@contextlib.contextmanager
def _ended_by_sigint(workload: Workload) -> Iterator[None]:
    """While the block runs, a first SIGINT (Ctrl-C) ends the workload early
    (``workload.interrupted``: no new requests, those in flight complete); a
    second one raises KeyboardInterrupt.  Main thread, the client's home."""
    ctx = workload.io.ctx
    wakeup = EventNotifier()
    woken = False  # read by busy polling, as QEMU's notifiers read theirs in memory

    def on_wakeup(notifier: EventNotifier) -> None:
        nonlocal woken
        woken = False
        notifier.test_and_clear()

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal woken
        if workload.interrupted:
            raise KeyboardInterrupt
        workload.interrupted = woken = True
        wakeup.set()  # a poll waiting for completions returns now

    ctx.set_event_notifier(wakeup, on_wakeup, io_poll=lambda: woken)
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        ctx.set_event_notifier(wakeup, None)
        wakeup.close()


def _block_size(text: str) -> int:
    bs = parse_size("--bs", text)
    if not MIN_BS <= bs <= MAX_BS:
        raise OptionError(f"--bs {text}: must be between {MIN_BS} bytes and 16M")
    return bs


def run_bench(args: argparse.Namespace) -> int:
    bs = _block_size(args.bs)
    if args.iodepth < 1 or args.numjobs < 0 or args.ops < 0:
        raise OptionError("--iodepth must be >= 1; --numjobs and --ops >= 0")
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before the run, used after it)
        except ImportError:
            raise OptionError("--plot needs matplotlib (pip install -e '.[plot]')") from None
    embedded = None
    if args.attach is None:
        embedded = EmbeddedCluster(parse_size("--size", args.size), args.log_level, nbd=args.nbd)
        runtime_dir = embedded.runtime_dir
    else:
        runtime_dir = args.attach
    try:
        with BlockClient(runtime_dir) as client:
            exports = _exports_by_node(client.state) if args.nbd else {}
            nodes = args.node or sorted(exports if args.nbd else client.nodes())
            if not nodes:
                raise OptionError(f"the cluster in {runtime_dir} has no block nodes" if not args.nbd else
                                  f"--nbd: the cluster in {runtime_dir} exports no node over NBD (launch it "
                                  "with --nbd-server and --export, or add them with QMP's nbd-server-start "
                                  "and block-export-add)")
            sizes = {n: client.node_size(n) for n in nodes}  # unknown names fail here, clearly
            discarding = [n for n in nodes if client.nodes()[n].driver == "null-co"]
            if args.verify and discarding:
                raise OptionError(f"--verify: node {', '.join(discarding)} is null-co, which discards what is "
                                  "written: there is nothing to read back (choose other nodes with --node)")
            unexported = [n for n in nodes if args.nbd and n not in exports]
            if unexported:
                raise OptionError(f"--nbd: node {', '.join(unexported)} has no NBD export in the cluster in "
                                  f"{runtime_dir}")
            jobs = plan_jobs(sizes, args.numjobs, bs)
            io: Transport = (NbdTransport(client.ctx, [exports[node] for node, _, _ in jobs]) if args.nbd
                             else BlockTransport(client, jobs))
            try:
                read_only = io.read_only if isinstance(io, NbdTransport) else []
                if read_only and (args.verify or args.rw not in ("randread", "read")):
                    raise OptionError(f"--nbd: export {', '.join(read_only)} is read-only, and "
                                      f"{'--verify' if args.verify else f'--rw {args.rw}'} writes (choose "
                                      "--rw randread or read, or other nodes with --node)")
                workload = Workload(io, jobs, args, bs)
                what = "verify" if args.verify else args.rw
                through = (f" through NBD ({', '.join(exports[n][0] for n in nodes)})" if args.nbd else "")
                print(f"{what}: bs={bs} iodepth={args.iodepth} jobs={len(jobs)} on "
                      f"{', '.join(nodes)}{through}", file=sys.stderr)
                progress = Progress(bs)
                t0 = time.monotonic()
                with _ended_by_sigint(workload):
                    workload.run(progress)
                elapsed = time.monotonic() - t0
                progress.update(workload, final=True)
            finally:
                io.close()
    finally:
        if embedded is not None:
            embedded.close()
    return _report(workload, args, elapsed)


def _exports_by_node(state: ClusterState) -> dict[str, tuple[str, str]]:
    """The NBD export of each exported node, as (id, URI): its first by id."""
    found: dict[str, tuple[str, str]] = {}
    for export_id, entry in sorted(state.exports.items()):
        found.setdefault(entry.node, (export_id, entry.uri))
    return found


def _report(workload: Workload, args: argparse.Namespace, elapsed: float) -> int:
    """The table (stdout; stderr when the JSON goes there), the JSON and the
    plot; the exit status."""
    text, data = _table(workload.results, elapsed, workload.bs)
    print(text, file=sys.stderr if args.json == "-" else sys.stdout)
    data.update({"rw": args.rw, "iodepth": args.iodepth, "jobs": len(workload.jobs), "verify": args.verify,
                 "transport": workload.io.name, "errors": workload.mismatches,
                 "interrupted": workload.interrupted})
    if args.json == "-":
        json.dump(data, sys.stdout, indent=2)
        print()
    elif args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    if args.plot:
        _plot(workload.results, args.plot)
    for m in workload.mismatches:
        print(f"iothreads: {m}", file=sys.stderr)
    if workload.interrupted:
        print(f"iothreads: interrupted after {elapsed:.1f} s: the results are partial", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 1 if workload.mismatches else 0
