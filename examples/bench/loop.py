"""Event-loop micro-benchmarks: our AioContext against asyncio (and uvloop).

Usage: ``python examples/bench/loop.py [--quick] [--json PATH]``

Each metric is the cost of one turn of a loop mechanism, measured as a rate
(higher is better), with the same Python callback on both sides so that only
the loop machinery differs:

bh
    Bottom-half schedule + dispatch: a BH whose callback schedules itself
    again; the home thread loops ``ctx.poll(True)`` until N callbacks ran.
    Baseline: a ``loop.call_soon`` chain.  The price of deferring work to
    "soon", which coroutines, the thread pool and completions all pay.
timer
    A REALTIME timer whose callback re-arms itself due now
    (``t.mod_ns(ctx.clock_now_ns(REALTIME))``).  Baseline: a
    ``loop.call_later(0, ...)`` chain.  The timer heap and deadline
    computation on every poll.
wakeup
    Cross-thread round trip: the home thread sleeps in ``ctx.poll(True)``;
    another thread schedules a pre-created BH and blocks on a
    ``queue.SimpleQueue`` that the BH answers.  Baseline:
    ``loop.call_soon_threadsafe`` with the same answer.  The notify / eventfd
    wake-up path that every request from another thread takes.  Both threads
    may run on any CPU, on every side.
fd
    fd readiness dispatch: one socketpair (a, b), a reader on each end that
    reads one byte and sends one back, ping-ponging inside one loop; counts
    round trips.  Ours with ``ctx.set_fd_handler(fd, io_read=...)``, baseline
    ``loop.add_reader``.  The epoll wait + handler dispatch path of all I/O.

Every measurement builds a fresh context or event loop and closes it.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from _common import Row, cpu_note, measure, parse_args, print_table, rows_for, write_json  # noqa: E402

from iothreads import AioContext, ClockType  # noqa: E402

try:
    import uvloop
except ImportError:
    uvloop = None

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


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
        target=_client, args=(lambda: loop.call_soon_threadsafe(cb), answers, n, result))
    client.start()
    loop.run_forever()
    client.join()
    loop.close()
    return result[0]


# -- (d) fd readiness -------------------------------------------------------------

def _ping_pong(n: int, stop: Callable[[], object]) -> tuple[socket.socket, socket.socket,
                                                           Callable[[], None], Callable[[], None],
                                                           Callable[[], int]]:
    """A socketpair and its two readers; ``rounds()`` counts completed round trips."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    count = 0

    def on_a() -> None:
        nonlocal count
        a.recv(1)
        count += 1
        if count < n:
            a.send(b"x")
        else:
            stop()

    def on_b() -> None:
        b.recv(1)
        b.send(b"x")

    return a, b, on_a, on_b, lambda: count


def fd_ours(n: int) -> float:
    ctx = AioContext()
    a, b, on_a, on_b, rounds = _ping_pong(n, lambda: None)
    ctx.set_fd_handler(a.fileno(), io_read=on_a)
    ctx.set_fd_handler(b.fileno(), io_read=on_b)
    t0 = time.perf_counter()
    b.send(b"x")
    while rounds() < n:
        ctx.poll(True)
    elapsed = time.perf_counter() - t0
    ctx.set_fd_handler(a.fileno())
    ctx.set_fd_handler(b.fileno())
    ctx.close()
    a.close()
    b.close()
    return n / elapsed


def fd_loop(new_loop: LoopFactory, n: int) -> float:
    loop = new_loop()
    a, b, on_a, on_b, _ = _ping_pong(n, loop.stop)
    loop.add_reader(a.fileno(), on_a)
    loop.add_reader(b.fileno(), on_b)
    t0 = time.perf_counter()
    b.send(b"x")
    loop.run_forever()
    elapsed = time.perf_counter() - t0
    loop.remove_reader(a.fileno())
    loop.remove_reader(b.fileno())
    loop.close()
    a.close()
    b.close()
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
    args = parse_args(__doc__.splitlines()[0])
    repeats, scale = (7, 5) if args.quick else (11, 1)
    loops: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
    print(cpu_note())
    print("cross-thread wake-up: home and client threads are not pinned; both may "
          "run on any of those CPUs, for ours and every baseline alike")
    if uvloop is not None:
        loops["uvloop"] = uvloop.new_event_loop
    else:
        print("uvloop is not importable: its rows are skipped")
    print(f"median of {repeats} interleaved repeats (after 1 warm-up), "
          f"{'--quick' if args.quick else 'full'} run\n", flush=True)

    rows: list[Row] = []
    for metric, unit, ours, baseline, n in METRICS:
        n //= scale
        sides: list[tuple[str, Callable[[], float]]] = [("ours", lambda ours=ours, n=n: ours(n))]
        sides += [(name, lambda f=f, b=baseline, n=n: b(f, n)) for name, f in loops.items()]
        rows += rows_for(metric, unit, "higher", measure(sides, repeats))
    print_table(rows)
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
