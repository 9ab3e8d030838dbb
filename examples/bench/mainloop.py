"""Main-loop benchmark: fd dispatch through the main loop, with idle fds around.

Usage: ``python examples/bench/mainloop.py [--quick] [--json PATH]``

A socketpair ping-pong (a reader on each end reads one byte and sends one
back) runs through the main loop while N other fds are watched and never
become ready (N = 1, 64, 1024), as a QEMU main loop watches many quiet
sockets.  Rate: round trips per second, higher is better.

ours, "via MainLoop"
    ``MainLoop.run()``, the real main-loop path: each iteration is a
    ``main_loop_wait``: prepare
    and query (with QEMU's two AioContexts attached as sources), release the
    BQL, poll, retake the BQL, check and dispatch, main-loop timers.  The
    ping-pong ends and the idle fds are ``io_add_watch`` sources.
ours, "via MainContext"
    ``MainContext.iteration`` in a loop: glib's steps alone, without the BQL
    and the two AioContext sources.
asyncio (and uvloop when importable)
    ``loop.add_reader`` for the same ping-pong and the same idle fds.

The idle watches must not cost a Python call each per iteration: the main
context keeps epoll's interest set up to date as sources come and go, so an
iteration touches only the fds that are ready.  Medians of interleaved
repeats, ours and baselines alternating in the same run.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from _common import Row, cpu_note, measure, parse_args, print_table, rows_for, run, write_json  # noqa: E402

from mainloop import IO_IN, MainContext, MainLoop, bql  # noqa: E402

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class Fixture:
    """A ping-pong socketpair and ``idle`` quiet socketpairs."""

    def __init__(self, rounds: int, idle: int) -> None:
        self.a, self.b = socket.socketpair()
        for s in (self.a, self.b):
            s.setblocking(False)
        self.idle = [socket.socketpair() for _ in range(idle)]
        self.rounds = rounds
        self.done = 0

    def on_a(self) -> bool:
        self.a.recv(1)
        self.done += 1
        if self.done < self.rounds:
            self.a.send(b"x")
        return True

    def on_b(self) -> bool:
        self.b.recv(1)
        self.b.send(b"x")
        return True

    def close(self) -> None:
        for x, y in [(self.a, self.b), *self.idle]:
            x.close()
            y.close()


def ours(rounds: int, idle: int) -> float:
    fx = Fixture(rounds, idle)
    with MainLoop(name="bench") as loop:
        ctx = loop.context

        def on_a(fd: int, cond: int) -> bool:
            fx.on_a()
            if fx.done >= rounds:
                loop.quit()
            return True

        ids = [ctx.io_add_watch(fx.a.fileno(), IO_IN, on_a),
               ctx.io_add_watch(fx.b.fileno(), IO_IN, lambda fd, c: fx.on_b())]
        ids += [ctx.io_add_watch(x.fileno(), IO_IN, lambda fd, c: True) for x, _ in fx.idle]
        with bql():
            loop.main_loop_wait(True)
        t0 = time.perf_counter()
        fx.b.send(b"x")
        loop.run()  # until the last round trip quits it
        elapsed = time.perf_counter() - t0
        for sid in ids:
            ctx.source_remove(sid)
    fx.close()
    return rounds / elapsed


def ours_context(rounds: int, idle: int) -> float:
    """The same through a bare MainContext: glib's steps without the BQL and
    without the two AioContext sources."""
    fx = Fixture(rounds, idle)
    with MainContext("bench") as ctx:
        ctx.io_add_watch(fx.a.fileno(), IO_IN, lambda fd, c: fx.on_a())
        ctx.io_add_watch(fx.b.fileno(), IO_IN, lambda fd, c: fx.on_b())
        for x, _ in fx.idle:
            ctx.io_add_watch(x.fileno(), IO_IN, lambda fd, c: True)
        ctx.acquire()
        t0 = time.perf_counter()
        fx.b.send(b"x")
        while fx.done < rounds:
            ctx.iteration(True)
        elapsed = time.perf_counter() - t0
        ctx.release()
    fx.close()
    return rounds / elapsed


def baseline(new_loop: LoopFactory, rounds: int, idle: int) -> float:
    fx = Fixture(rounds, idle)
    loop = new_loop()

    def on_a() -> None:
        fx.on_a()
        if fx.done >= rounds:
            loop.stop()

    loop.add_reader(fx.a.fileno(), on_a)
    loop.add_reader(fx.b.fileno(), fx.on_b)
    for x, _ in fx.idle:
        loop.add_reader(x.fileno(), lambda: None)
    t0 = time.perf_counter()
    fx.b.send(b"x")
    loop.run_forever()
    elapsed = time.perf_counter() - t0
    loop.close()
    fx.close()
    return rounds / elapsed


def raise_fd_limit(needed: int) -> None:
    """1024 idle socketpairs need more fds than the usual soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            sys.exit(f"this benchmark needs {needed} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def main() -> None:
    raise_fd_limit(2 * 1024 + 256)
    args = parse_args("Main-loop fd dispatch with idle fds: MainLoop against asyncio (and uvloop).")
    repeats, rounds = (5, 4_000) if args.quick else (9, 20_000)
    loops: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop

        loops["uvloop"] = uvloop.new_event_loop
    except ImportError:
        print("uvloop is not importable: its rows are skipped")
    print(cpu_note())
    print(f"median of {repeats} interleaved repeats, {rounds} round trips each, "
          f"{'--quick' if args.quick else 'full'} run\n", flush=True)
    rows: list[Row] = []
    for idle in (1, 64, 1024):
        sides: list[tuple[str, Callable[[], float]]] = [
            ("main loop", partial(ours, rounds, idle)),
            ("main context", partial(ours_context, rounds, idle)),
        ]
        sides += [(name, partial(baseline, f, rounds, idle)) for name, f in loops.items()]
        medians = measure(sides, repeats)
        context_only = medians.pop("main context")
        rows += rows_for(f"ping-pong via MainLoop, {idle} idle fds", "round trips/s", "higher",
                         medians, ours="main loop")
        medians["main context"] = context_only
        del medians["main loop"]
        rows += rows_for(f"ping-pong via MainContext, {idle} idle fds", "round trips/s", "higher",
                         medians, ours="main context")
    print_table(rows)
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    run(main)
