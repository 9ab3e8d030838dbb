"""The source document's closing claim, measured: the main loop's global lock
makes vCPU threads and I/O completion handling contend; iothreads move the
I/O out from under it.

In this process: a main loop (holding the BQL except while it polls) and two
"vCPU" threads that repeatedly take the BQL to do a little work.  Block reads
run one at a time against a cluster, their completions handled

  (a) in the main loop, under the BQL (the client's AioContext is the main
      loop's ``qemu_aio_context``), then
  (b) in an iothread-like thread with its own AioContext, no BQL.

For each, it prints the I/O rate and latency and the vCPU threads' progress
(loops per second, each loop taking the BQL once).

Method: ``--repeats`` rounds (default 5), each running both cases for
``--seconds`` (default 2), (a) first in odd rounds and (b) first in even ones,
so that a drift of the machine (a neighbour's load, frequency scaling) hits
both alike.  Each round gives one ratio (b) / (a) of vCPU progress and of
reads/s; the summary is their median and range.  The figures vary with the
machine and its load: quote the median with its range.

    python examples/bql_contention.py [RUNTIME_DIR [NODE]] [--seconds S] [--repeats N]

Ctrl-C stops it: one line, exit status 130.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from iothreads import AioContext, BlockClient, ClockType
from iothreads.testing import LoopThread
from mainloop import EmbeddedCluster, MainLoop, bql

VCPUS = 2


@dataclass
class Case:
    """One case's measurements."""

    in_main_loop: bool
    reads_per_s: float
    p50_us: float
    p99_us: float
    vcpu_loops_per_s: float

    def line(self) -> str:
        where = "(a) completions in the main loop, under the BQL" if self.in_main_loop \
            else "(b) completions in an iothread, no BQL       "
        return (f"{where}: {self.reads_per_s:8,.0f} reads/s  p50 {self.p50_us:7.0f} us  "
                f"p99 {self.p99_us:7.0f} us  vCPU progress {self.vcpu_loops_per_s:10,.0f} loops/s")


def vcpu(stop: threading.Event, counts: list[int], i: int) -> None:
    while not stop.is_set():
        with bql():  # device emulation that needs the global lock
            sum(range(300))
        sum(range(300))  # guest work that does not
        counts[i] += 1


def reads(client: BlockClient, node: str, latencies: list[int], keep_going: Callable[[], bool]) -> None:
    """A chain of QD1 reads: each completion submits the next."""
    def submit() -> None:
        t0 = time.monotonic_ns()

        def done(status: int, message: str, data: bytes) -> None:
            latencies.append(time.monotonic_ns() - t0)
            if keep_going():
                submit()

        client.submit(node, "read", (len(latencies) % 1024) * 4096, 4096, callback=done)

    submit()


def run_case(loop: MainLoop, runtime_dir: str, node: str, seconds: float, in_main_loop: bool) -> Case:
    """One case, for ``seconds`` or until the loop is quit (Ctrl-C)."""
    stop = threading.Event()
    counts = [0] * VCPUS
    latencies: list[int] = []
    vcpus = [threading.Thread(target=vcpu, args=(stop, counts, i)) for i in range(VCPUS)]
    start = time.monotonic()
    end = start + seconds
    timer = loop.timer_new_ms(ClockType.REALTIME, loop.quit, "end of case")
    timer.mod(timer.now() + int(seconds * 1000))
    for t in vcpus:
        t.start()
    io_thread = None
    try:
        if in_main_loop:
            client = BlockClient(runtime_dir, loop.aio_context)  # completions under the BQL
            loop.run_in_main_loop(lambda: reads(client, node, latencies, lambda: time.monotonic() < end))
            loop.run()
            drain_ctx: AioContext = loop.aio_context
        else:
            io_thread = LoopThread("iothread")
            client = io_thread.run_sync(lambda: BlockClient(runtime_dir, io_thread.ctx))
            io_thread.run_sync(lambda: reads(client, node, latencies, lambda: time.monotonic() < end))
            loop.run()  # the main loop idles; the vCPUs still take the BQL
            drain_ctx = io_thread.ctx
        end = time.monotonic()  # the reads stop now, even when Ctrl-C ended the case early
    finally:
        timer.delete()
        stop.set()
        for t in vcpus:
            t.join()
    elapsed = end - start
    if io_thread is not None:
        while io_thread.run_sync(lambda: client.in_flight):
            pass
        io_thread.run_sync(client.close)
        io_thread.stop()
    else:
        while client.in_flight:
            drain_ctx.poll(True)
        client.close()
    latencies.sort()
    p50 = latencies[len(latencies) // 2] / 1000 if latencies else 0
    p99 = latencies[int(len(latencies) * 0.99)] / 1000 if latencies else 0
    return Case(in_main_loop, len(latencies) / elapsed, p50, p99, sum(counts) / elapsed)


def spread(what: str, ratios: list[float]) -> str:
    """A line with the median and range of per-round ratios (b) / (a), as gains."""
    gains = [r - 1 for r in ratios]
    return (f"{what}, (b) against (a): median {statistics.median(gains):+.0%}, "
            f"range {min(gains):+.0%} to {max(gains):+.0%} over {len(gains)} rounds")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runtime_dir", nargs="?")
    p.add_argument("node", nargs="?")
    p.add_argument("--seconds", type=float, default=2.0, help="per case and round (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="rounds of both cases (default 5)")
    args = p.parse_args()
    if args.repeats < 1 or not args.seconds > 0:
        p.error("--repeats must be 1 or more and --seconds above 0")
    interrupted = False
    with MainLoop(name="bql-contention") as loop:
        def on_sigint(signum: int) -> bool:
            nonlocal interrupted
            interrupted = True
            loop.quit()
            return True

        # Before any thread (ZeroMQ's, the vCPUs'): they all block SIGINT, and
        # Ctrl-C arrives as a dispatch of this loop, which ends the case under way.
        loop.context.signal_add([signal.SIGINT], on_sigint, name="ctrl-c")
        embedded = EmbeddedCluster(16 << 20) if args.runtime_dir is None else None
        runtime_dir = embedded.runtime_dir if embedded else args.runtime_dir
        rounds: list[dict[bool, Case]] = []
        try:
            with BlockClient(runtime_dir) as probe:
                node = args.node or sorted(probe.nodes())[0]
            print(f"{args.repeats} rounds of {args.seconds:g} s per case, the order alternating; "
                  f"{VCPUS} vCPU threads; QD1 4 KiB reads of node {node}", flush=True)
            for r in range(args.repeats):
                cases: dict[bool, Case] = {}
                for in_main_loop in ((True, False) if r % 2 == 0 else (False, True)):
                    case = run_case(loop, runtime_dir, node, args.seconds, in_main_loop)
                    if interrupted:
                        break
                    print(case.line(), flush=True)
                    cases[in_main_loop] = case
                if interrupted:
                    break
                rounds.append(cases)
        finally:
            if embedded:
                embedded.close()
    if interrupted:
        raise KeyboardInterrupt
    print(spread("vCPU progress", [c[False].vcpu_loops_per_s / c[True].vcpu_loops_per_s for c in rounds]))
    print(spread("reads/s", [c[False].reads_per_s / c[True].reads_per_s for c in rounds]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: what was started is stopped on the way out
        print("bql_contention.py: interrupted", file=sys.stderr)
        sys.exit(130)
