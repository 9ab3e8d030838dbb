"""Differential tests: the fused iteration (``MainContext.iteration``,
``MainLoop.main_loop_wait``) against the same iteration through the public
steps (``tests/mainloop/stepwise.py``), on generated glib-semantics scenarios:
priorities, prepare/check results, poll fds, sources removing themselves, an
AioContext source with bottom halves.  Both must make the same calls in the
same order and return the same results."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from iothreads import AioContext, ClockType
from mainloop import IO_IN, AioSource, MainContext, MainLoop, Source, bql, bql_stats

from .stepwise import stepwise_iteration, stepwise_main_loop_wait

ITERATIONS = 6
FAR = 2**62


@dataclass(frozen=True)
class Spec:
    kind: str  # "hooks", "fd", "poll-only", "idle"
    priority: int
    prepare: tuple[tuple[bool, int], ...]  # per iteration
    check: tuple[bool, ...]
    keep: tuple[bool, ...]
    fd_ready: bool
    ready_time_ns: int  # -1: none; 0: long past; FAR: far future (bounds the timeout)


def specs() -> st.SearchStrategy[Spec]:
    return st.builds(
        Spec,
        kind=st.sampled_from(["hooks", "fd", "poll-only", "idle"]),
        priority=st.sampled_from([-100, 0, 100]),
        prepare=st.tuples(*[st.tuples(st.booleans(), st.sampled_from([-1, 0, 1_000_000]))] * ITERATIONS),
        check=st.tuples(*[st.booleans()] * ITERATIONS),
        keep=st.tuples(*[st.booleans()] * ITERATIONS),
        fd_ready=st.booleans(),
        ready_time_ns=st.sampled_from([-1, -1, 0, FAR]),
    )


class Scripted(Source):
    def __init__(self, spec: Spec, name: str, log: list[str], turn: list[int], fd: int | None) -> None:
        super().__init__(name, spec.priority)
        self.spec, self.log, self.turn = spec, log, turn
        if fd is not None:
            if spec.kind == "fd":
                self.add_unix_fd(fd, IO_IN, "scripted fd")
            else:
                self.add_poll(fd, IO_IN, "scripted poll fd")

    def dispatch(self) -> bool:
        self.log.append(f"dispatch {self.name} {[p.revents for p in self.pending_pollfds()]}")
        return self.spec.keep[self.turn[0]]


class WithHooks(Scripted):
    def prepare(self) -> tuple[bool, int]:
        self.log.append(f"prepare {self.name}")
        return self.spec.prepare[self.turn[0]]

    def check(self) -> bool:
        self.log.append(f"check {self.name} {[p.revents for p in self.pending_pollfds()]}")
        return self.spec.check[self.turn[0]]


class Idle(Scripted):
    def prepare(self) -> tuple[bool, int]:
        return True, 0


def run_scenario(scenario: list[Spec], bh_turns: list[int],
                 iterate: Callable[[MainContext], bool]) -> list[str]:
    log: list[str] = []
    turn = [0]
    pairs: list[tuple[socket.socket, socket.socket]] = []
    with AioContext(name="aio") as aio, MainContext("diff") as ctx:
        ctx.set_exception_handler(lambda c, exc, where: log.append(f"error {where}"))
        ctx.attach(AioSource(aio, "aio"))
        for i, spec in enumerate(scenario):
            fd = None
            if spec.kind in ("fd", "poll-only", "hooks"):
                a, b = socket.socketpair()
                pairs.append((a, b))
                if spec.fd_ready:
                    b.send(b"x")
                fd = a.fileno()
            cls = {"hooks": WithHooks, "idle": Idle}.get(spec.kind, Scripted)
            src = cls(spec, f"s{i}", log, turn, fd)
            ctx.attach(src)
            if spec.ready_time_ns >= 0:
                src.set_ready_time(spec.ready_time_ns)
        for it in range(ITERATIONS):
            turn[0] = it
            if it in bh_turns:
                aio.bh_schedule_oneshot(lambda it=it: log.append(f"bh {it}"))
            log.append(f"iteration {it} -> {iterate(ctx)}, notify_me {aio._notify_me}")
            if ctx.acquire():  # the timeout the next poll would get, through the steps
                try:
                    _, max_priority = ctx.prepare()
                    timeout_ns, n_fds = ctx.query(max_priority)
                    bound = "none" if timeout_ns < 0 else "now" if timeout_ns == 0 else \
                        "far" if timeout_ns > FAR // 2 else "soon"
                    log.append(f"timeout {bound}, {n_fds} fds")
                    ctx.wait_fds(0)
                    ctx.check(max_priority)
                    log.append(f"pending {[s.name for s in ctx._pending]}")
                    for pending in ctx._pending:
                        pending._ready = True  # as MainContext.pending() keeps them
                    ctx._pending = []
                finally:
                    ctx.release()
        log.append("left: " + " ".join(s.name for s in ctx.sources()))
        for src in ctx.sources():
            if not isinstance(src, AioSource):
                src.destroy()
        while ctx.iteration(False):  # run what a higher priority starved
            pass
    for a, b in pairs:
        a.close()
        b.close()
    return log


@settings(max_examples=60, deadline=None)
@given(st.lists(specs(), max_size=5), st.lists(st.integers(0, ITERATIONS - 1), max_size=3))
def test_fused_iteration_matches_the_steps(scenario: list[Spec], bh_turns: list[int]) -> None:
    fused = run_scenario(scenario, bh_turns, lambda ctx: ctx.iteration(False))
    steps = run_scenario(scenario, bh_turns, lambda ctx: stepwise_iteration(ctx, False))
    assert fused == steps


def loop_scenario(fd_ready: bool, bh_turns: list[int], timer_turns: list[int],
                  wait: Callable[[MainLoop], bool]) -> tuple[list[str], int]:
    log: list[str] = []
    a, b = socket.socketpair()
    if fd_ready:
        b.send(b"x")
    with MainLoop(name="diff") as loop:
        loop.context.io_add_watch(a.fileno(), IO_IN, lambda fd, c: bool(log.append(f"watch {c}")) or True)
        loop.set_fd_handler(b.fileno(), lambda: log.append("iohandler"))
        before = bql_stats().acquisitions
        with bql():
            for it in range(ITERATIONS):
                if it in bh_turns:
                    loop.run_in_main_loop(lambda it=it: log.append(f"bh {it}"))
                if it in timer_turns:
                    t = loop.timer_new_ns(ClockType.REALTIME, lambda it=it: log.append(f"timer {it}"))
                    t.mod_ns(0)
                log.append(f"wait {it} -> {wait(loop)}")
        acquisitions = bql_stats().acquisitions - before
        loop.set_fd_handler(b.fileno(), None)
    a.close()
    b.close()
    return log, acquisitions


@settings(max_examples=30, deadline=None)
@given(st.booleans(), st.lists(st.integers(0, ITERATIONS - 1), max_size=3),
       st.lists(st.integers(0, ITERATIONS - 1), max_size=2))
def test_fused_main_loop_wait_matches_the_steps(fd_ready: bool, bh_turns: list[int],
                                                timer_turns: list[int]) -> None:
    fused = loop_scenario(fd_ready, bh_turns, timer_turns, lambda loop: loop.main_loop_wait(True))
    steps = loop_scenario(fd_ready, bh_turns, timer_turns, lambda loop: stepwise_main_loop_wait(loop, True))
    assert fused == steps
    assert fused[1] == ITERATIONS + 1  # one retake per poll, plus the outer bql()
