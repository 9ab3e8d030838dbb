"""Event-loop micro-benchmarks: our AioContext against asyncio (and uvloop).

Usage: ``python examples/bench/loop.py [--quick] [--json PATH]``

Each metric is the cost of one turn of a loop mechanism, measured as a rate
(higher is better), with the same Python callback on both sides so that only
the loop machinery differs:

bh schedule+dispatch
    Bottom-half schedule + dispatch: a BH whose callback schedules itself
    again; the home thread loops ``ctx.poll(True)`` until N callbacks ran.
    Baseline: a ``loop.call_soon`` chain.  The price of deferring work to
    "soon", which coroutines, the thread pool and completions all pay.
timer re-arm due now
    A REALTIME timer whose callback re-arms itself due now
    (``t.mod_ns(ctx.clock_now_ns(REALTIME))``).  Baseline: a
    ``loop.call_later(0, ...)`` chain.  The timer heap and deadline
    computation on every poll.
cross-thread wake-up
    Cross-thread round trip: the home thread sleeps in ``ctx.poll(True)``;
    another thread schedules a pre-created BH and blocks on a
    ``queue.SimpleQueue`` that the BH answers.  Baseline:
    ``loop.call_soon_threadsafe`` with the same answer.  The notify / eventfd
    wake-up path that every request from another thread takes.  Both threads
    may run on any CPU, on every side.
fd ping-pong
    fd readiness dispatch: one socketpair (a, b), a reader on each end that
    reads one byte and sends one back, ping-ponging inside one loop; counts
    round trips.  Ours with ``ctx.set_fd_handler(fd, io_read=...)``, baseline
    ``loop.add_reader``.  The epoll wait + handler dispatch path of all I/O.

Every measurement builds a fresh context or event loop and closes it.  Each
row is the median of several repeats, ours and each baseline interleaved (see
``_common.py``); the uvloop rows appear when uvloop is importable.
``--quick`` shortens and reduces the repeats (well under 30 s).
"""

from __future__ import annotations

import asyncio
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from _common import Row, cpu_note, measure, parse_args, print_table, rows_for, run, write_json  # noqa: E402

from iothreads import AioContext, ClockType  # noqa: E402

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _uvloop() -> LoopFactory | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# -- (a) bottom halves ----------------------------------------------------------

def bh_ours(n: int) -> float:
    ctx = AioContext()
    count = 0

    def cb() -> None:
        nonlocal count
        count += 1
        if count < n:
            bh.schedule()

    bh = ctx.bh_new(cb)
    t0 = time.perf_counter()
    bh.schedule()
    while count < n:
        ctx.poll(True)
    elapsed = time.perf_counter() - t0
    bh.delete()
    ctx.poll(False)
    ctx.close()
    return n / elapsed


def bh_loop(new_loop: LoopFactory, n: int) -> float:
    loop = new_loop()
    count = 0

    def cb() -> None:
        nonlocal count
        count += 1
        if count < n:
            loop.call_soon(cb)
        else:
            loop.stop()

    t0 = time.perf_counter()
    loop.call_soon(cb)
    loop.run_forever()
    elapsed = time.perf_counter() - t0
    loop.close()
    return n / elapsed


# -- (b) timers -----------------------------------------------------------------

def timer_ours(n: int) -> float:
    ctx = AioContext()
    count = 0

    def cb() -> None:
        nonlocal count
        count += 1
        if count < n:
            t.mod_ns(ctx.clock_now_ns(ClockType.REALTIME))

    t = ctx.timer_new_ns(ClockType.REALTIME, cb)
    t0 = time.perf_counter()
    t.mod_ns(ctx.clock_now_ns(ClockType.REALTIME))
    while count < n:
        ctx.poll(True)
    elapsed = time.perf_counter() - t0
    t.delete()
    ctx.close()
    return n / elapsed


def timer_loop(new_loop: LoopFactory, n: int) -> float:
    loop = new_loop()
    count = 0

    def cb() -> None:
        nonlocal count
        count += 1
        if count < n:
            loop.call_later(0, cb)
        else:
            loop.stop()

    t0 = time.perf_counter()
    loop.call_later(0, cb)
    loop.run_forever()
    elapsed = time.perf_counter() - t0
    loop.close()
    return n / elapsed


# -- (c) cross-thread wake-up -----------------------------------------------------

def _client(schedule: Callable[[], object], answers: queue.SimpleQueue[None], n: int,
            result: list[float]) -> None:
    """The other thread: n round trips, timed from its side."""
    t0 = time.perf_counter()
    for _ in range(n):
        schedule()
        answers.get()
    result.append(n / (time.perf_counter() - t0))


def wakeup_ours(n: int) -> float:
    ctx = AioContext()
    answers: queue.SimpleQueue[None] = queue.SimpleQueue()
    count = 0

    def cb() -> None:
        nonlocal count
        count += 1
        answers.put(None)

    bh = ctx.bh_new(cb)
    result: list[float] = []
    client = threading.Thread(target=_client, args=(bh.schedule, answers, n, result))
    client.start()
    while count < n:
        ctx.poll(True)
    client.join()
    bh.delete()
    ctx.poll(False)
    ctx.close()
    return result[0]


def wakeup_loop(new_loop: LoopFactory, n: int) -> float:
    loop = new_loop()
    answers: queue.SimpleQueue[None] = queue.SimpleQueue()
    count = 0

    def cb() -> None:
        nonlocal count
        count += 1
        answers.put(None)
        if count == n:
            loop.stop()

    result: list[float] = []
    client = threading.Thread(
        target=_client, args=(partial(loop.call_soon_threadsafe, cb), answers, n, result))
    client.start()
    loop.run_forever()
    client.join()
    loop.close()
    return result[0]


# -- (d) fd readiness -------------------------------------------------------------

class _PingPong:
    """A socketpair (a, b) whose readers bounce one byte back and forth."""

    def __init__(self, n: int, done: Callable[[], object]) -> None:
        self.a, self.b = socket.socketpair()
        self.a.setblocking(False)
        self.b.setblocking(False)
        self.n = n
        self.done = done
        self.rounds = 0

    def on_a(self) -> None:
        self.a.recv(1)
        self.rounds += 1
        if self.rounds < self.n:
            self.a.send(b"x")
        else:
            self.done()

    def on_b(self) -> None:
        self.b.recv(1)
        self.b.send(b"x")

    def close(self) -> None:
        self.a.close()
        self.b.close()


def fd_ours(n: int) -> float:
    ctx = AioContext()
    pp = _PingPong(n, lambda: None)
    ctx.set_fd_handler(pp.a.fileno(), io_read=pp.on_a)
    ctx.set_fd_handler(pp.b.fileno(), io_read=pp.on_b)
    t0 = time.perf_counter()
    pp.b.send(b"x")
    while pp.rounds < n:
        ctx.poll(True)
    elapsed = time.perf_counter() - t0
    ctx.set_fd_handler(pp.a.fileno())
    ctx.set_fd_handler(pp.b.fileno())
    ctx.close()
    pp.close()
    return n / elapsed


def fd_loop(new_loop: LoopFactory, n: int) -> float:
    loop = new_loop()
    pp = _PingPong(n, loop.stop)
    loop.add_reader(pp.a.fileno(), pp.on_a)
    loop.add_reader(pp.b.fileno(), pp.on_b)
    t0 = time.perf_counter()
    pp.b.send(b"x")
    loop.run_forever()
    elapsed = time.perf_counter() - t0
    loop.remove_reader(pp.a.fileno())
    loop.remove_reader(pp.b.fileno())
    loop.close()
    pp.close()
    return n / elapsed


# -- driver -------------------------------------------------------------------------

# metric, unit, ours, baseline on a loop, iterations of a full run
METRICS: list[tuple[str, str, Callable[[int], float], Callable[[LoopFactory, int], float], int]] = [
    ("bh schedule+dispatch", "callbacks/s", bh_ours, bh_loop, 200_000),
    ("timer re-arm due now", "timers/s", timer_ours, timer_loop, 100_000),
    ("cross-thread wake-up", "round trips/s", wakeup_ours, wakeup_loop, 10_000),
    ("fd ping-pong", "round trips/s", fd_ours, fd_loop, 50_000),
]


def main() -> None:
    args = parse_args("Event-loop micro-benchmarks: AioContext against asyncio (and uvloop).")
    repeats, scale = (7, 5) if args.quick else (11, 1)
    loops: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
    print(cpu_note())
    print("cross-thread wake-up: home and client threads are not pinned; both may "
          "run on any of those CPUs, for ours and every baseline alike")
    uvloop = _uvloop()
    if uvloop is not None:
        loops["uvloop"] = uvloop
    else:
        print("uvloop is not importable: its rows are skipped")
    print(f"median of {repeats} interleaved repeats (after 1 warm-up), "
          f"{'--quick' if args.quick else 'full'} run\n", flush=True)

    rows: list[Row] = []
    for metric, unit, ours, baseline, n in METRICS:
        sides: list[tuple[str, Callable[[], float]]] = [("ours", partial(ours, n // scale))]
        sides += [(name, partial(baseline, new_loop, n // scale)) for name, new_loop in loops.items()]
        rows += rows_for(metric, unit, "higher", measure(sides, repeats))
    print_table(rows)
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    run(main)
