"""The source document's closing claim, measured: the main loop's global lock
makes vCPU threads and I/O completion handling contend; iothreads move the
I/O out from under it.

In this process: a main loop (holding the BQL except while it polls) and two
"vCPU" threads that repeatedly take the BQL to do a little work.  Block reads
run one at a time against a cluster, their completions handled

  (a) in the main loop, under the BQL (the client's AioContext is the main
      loop's ``qemu_aio_context``), then
  (b) in an iothread-like thread with its own AioContext, no BQL.

For each, it prints the I/O rate and latency and the vCPU threads' progress.

    python examples/bql_contention.py [RUNTIME_DIR [NODE]] [--seconds S]
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable

from iothreads import AioContext, BlockClient, ClockType
from iothreads.testing import LoopThread
from mainloop import EmbeddedCluster, MainLoop, bql

VCPUS = 2


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


def run_case(loop: MainLoop, runtime_dir: str, node: str, seconds: float, in_main_loop: bool) -> str:
    stop = threading.Event()
    counts = [0] * VCPUS
    latencies: list[int] = []
    vcpus = [threading.Thread(target=vcpu, args=(stop, counts, i)) for i in range(VCPUS)]
    end = time.monotonic() + seconds
    timer = loop.timer_new_ms(ClockType.REALTIME, loop.quit, "end of case")
    timer.mod(timer.now() + int(seconds * 1000))
    for t in vcpus:
        t.start()
    io_thread = None
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
    stop.set()
    for t in vcpus:
        t.join()
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
    where = "(a) completions in the main loop, under the BQL" if in_main_loop \
        else "(b) completions in an iothread, no BQL       "
    return (f"{where}: {len(latencies) / seconds:8,.0f} reads/s  p50 {p50:7.0f} us  p99 {p99:7.0f} us  "
            f"vCPU progress {sum(counts) / seconds:10,.0f} loops/s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runtime_dir", nargs="?")
    p.add_argument("node", nargs="?")
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args()
    embedded = EmbeddedCluster(16 << 20) if args.runtime_dir is None else None
    runtime_dir = embedded.runtime_dir if embedded else args.runtime_dir
    try:
        with BlockClient(runtime_dir) as probe:
            node = args.node or sorted(probe.nodes())[0]
        with MainLoop(name="bql-contention") as loop:
            print(run_case(loop, runtime_dir, node, args.seconds, in_main_loop=True), flush=True)
            print(run_case(loop, runtime_dir, node, args.seconds, in_main_loop=False), flush=True)
    finally:
        if embedded:
            embedded.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
