"""MainContext on glib's contract: priorities, prepare/check/dispatch,
ready times, poll fds, destroy during dispatch, cross-thread attach."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

from iothreads.testing import poll_until
from mainloop import (
    IO_HUP,
    IO_IN,
    IO_OUT,
    PRIORITY_DEFAULT,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    SOURCE_REMOVE,
    IdleSource,
    MainContext,
    Source,
)
from protocol import StateError

BOUND_S = 30.0


class Recorder(Source):
    """A source whose hooks are scripted and recorded."""

    def __init__(self, log: list[str], name: str, priority: int = PRIORITY_DEFAULT,
                 ready: bool = False, timeout_ns: int = -1, check_result: bool = False,
                 keep: bool = True) -> None:
        super().__init__(name, priority)
        self.log = log
        self.ready = ready
        self.timeout_ns = timeout_ns
        self.check_result = check_result
        self.keep = keep
        self.finalized = 0

    def prepare(self) -> tuple[bool, int]:
        self.log.append(f"prepare {self.name}")
        return self.ready, self.timeout_ns

    def check(self) -> bool:
        self.log.append(f"check {self.name}")
        return self.check_result

    def dispatch(self) -> bool:
        self.log.append(f"dispatch {self.name}")
        return self.keep

    def finalize(self) -> None:
        self.finalized += 1


def test_only_the_highest_ready_priority_is_dispatched(context: MainContext) -> None:
    log: list[str] = []
    low = Recorder(log, "low", PRIORITY_LOW, ready=True)
    high_a = Recorder(log, "high-a", PRIORITY_HIGH, ready=True)
    high_b = Recorder(log, "high-b", PRIORITY_HIGH, ready=True)
    for s in (low, high_a, high_b):
        context.attach(s)
    assert context.iteration(False)
    assert [e for e in log if e.startswith("dispatch")] == ["dispatch high-a", "dispatch high-b"]
    # Once a high-priority source is ready, lower ones are not even prepared.
    assert "prepare low" not in log
    high_a.destroy()
    high_b.destroy()
    log.clear()
    assert context.iteration(False)
    assert log[-1] == "dispatch low"


def test_prepare_timeout_bounds_the_poll_and_check_decides(context: MainContext) -> None:
    log: list[str] = []
    src = Recorder(log, "timed", timeout_ns=5_000_000, check_result=False)
    context.attach(src)
    assert context.acquire()
    try:
        ready, max_priority = context.prepare()
        assert not ready
        timeout_ns, n_fds = context.query(max_priority)
        assert timeout_ns == 5_000_000
        assert n_fds == 1  # the context's own wakeup fd
        context.wait_fds(0)
        assert context.check(max_priority) is False
    finally:
        context.release()
    src.check_result = True
    t0 = time.monotonic_ns()
    assert context.iteration(True)  # returns because the timeout bounds the poll
    assert time.monotonic_ns() - t0 >= 5_000_000
    assert log[-3:] == ["prepare timed", "check timed", "dispatch timed"]


def test_dispatch_returning_false_destroys_and_finalizes_once(context: MainContext) -> None:
    log: list[str] = []
    src = Recorder(log, "once", ready=True, keep=False)
    sid = context.attach(src)
    assert context.find_source_by_id(sid) is src
    assert context.iteration(False)
    assert src.destroyed and src.finalized == 1
    assert context.find_source_by_id(sid) is None
    assert context.iteration(False) is False
    src.destroy()
    assert src.finalized == 1
    with pytest.raises(StateError):
        context.attach(src)


def test_destroy_during_dispatch(context: MainContext) -> None:
    log: list[str] = []
    victim = Recorder(log, "victim", ready=True)

    class Killer(Recorder):
        def dispatch(self) -> bool:
            victim.destroy()
            self.destroy()  # destroying oneself inside dispatch is fine too
            return super().dispatch()

    killer = Killer(log, "killer", ready=True)
    context.attach(killer)
    context.attach(victim)
    assert context.iteration(False)
    assert "dispatch victim" not in log and "dispatch killer" in log
    assert victim.finalized == 1 and killer.finalized == 1
    assert context.sources() == []


def test_source_ids_and_source_remove(context: MainContext) -> None:
    ids = [context.idle_add(lambda: True) for _ in range(3)]
    assert len(set(ids)) == 3 and all(i > 0 for i in ids)
    assert context.source_remove(ids[1])
    assert not context.source_remove(ids[1])
    assert [s.id for s in context.sources()] == [ids[0], ids[2]]


def test_attach_from_another_thread_wakes_a_blocked_iteration(context: MainContext) -> None:
    ran = threading.Event()
    context.iteration(False)
    t = threading.Thread(target=context.idle_add, args=(lambda: (ran.set(), SOURCE_REMOVE)[1],))
    t.start()
    poll_until(lambda: context.iteration(True), ran.is_set, "the idle source added from another thread",
               BOUND_S)
    t.join()


def test_fd_set_change_after_query_makes_check_dispatch_nothing(context: MainContext) -> None:
    a, b = socket.socketpair()
    got: list[int] = []
    b.send(b"x")
    assert context.acquire()
    try:
        ready, max_priority = context.prepare()
        context.query(max_priority)
        # Between query and check, a source adds an fd (from any thread).
        t = threading.Thread(target=context.io_add_watch,
                             args=(a.fileno(), IO_IN, lambda fd, cond: bool(got.append(cond))))
        t.start()
        t.join()
        context.wait_fds(0)
        assert context.check(max_priority) is False  # re-query first
    finally:
        context.release()
    assert context.iteration(False)  # the next iteration sees the new fd
    assert got == [IO_IN]
    a.close()
    b.close()


def test_ready_time(context: MainContext) -> None:
    class Timed(Source):
        def __init__(self) -> None:
            super().__init__("timed")
            self.runs = 0

        def dispatch(self) -> bool:
            self.runs += 1
            self.set_ready_time(-1)
            return True

    src = Timed()
    context.attach(src)
    assert context.iteration(False) is False
    src.set_ready_time(time.monotonic_ns() + 2_000_000)
    assert context.acquire()
    try:
        _, maxp = context.prepare()
        timeout_ns, _ = context.query(maxp)
        assert 0 < timeout_ns <= 2_000_000
    finally:
        context.release()
    poll_until(lambda: context.iteration(True), lambda: src.runs == 1, "the source's ready time", BOUND_S)
    assert context.iteration(False) is False


def test_add_poll_is_for_check_to_read(context: MainContext) -> None:
    a, b = socket.socketpair()
    seen: list[int] = []

    class Watcher(Source):
        def check(self) -> bool:
            seen.extend(p.revents for p in self.pending_pollfds())
            return False  # never ready: the fd alone must not make it ready

        def dispatch(self) -> bool:
            raise AssertionError("must not be dispatched")

    w = Watcher("watcher")
    w.add_poll(a.fileno(), IO_IN, "test fd")
    context.attach(w)
    b.send(b"x")
    assert context.iteration(False) is False
    assert seen == [IO_IN]
    a.close()
    b.close()


def test_io_watch_conditions(context: MainContext) -> None:
    a, b = socket.socketpair()
    conds: list[tuple[str, int]] = []
    context.io_add_watch(a.fileno(), IO_OUT, lambda fd, c: bool(conds.append(("out", c))) or SOURCE_REMOVE)
    assert context.iteration(False)
    assert conds == [("out", IO_OUT)]
    context.io_add_watch(a.fileno(), IO_IN, lambda fd, c: bool(conds.append(("in", c))) or SOURCE_REMOVE)
    b.close()
    assert context.iteration(False)
    assert conds[1][0] == "in" and conds[1][1] & IO_HUP
    a.close()


def test_two_watches_on_one_fd(context: MainContext) -> None:
    a, b = socket.socketpair()
    hits: list[str] = []
    context.io_add_watch(a.fileno(), IO_IN, lambda fd, c: bool(hits.append("first")) or True)
    second = context.io_add_watch(a.fileno(), IO_IN, lambda fd, c: bool(hits.append("second")) or True)
    b.send(b"x")
    assert context.iteration(False)
    assert sorted(hits) == ["first", "second"]
    context.source_remove(second)
    hits.clear()
    assert context.iteration(False)
    assert hits == ["first"]  # the fd stays polled for the remaining watch
    context.close()
    a.close()
    b.close()


def test_a_raising_dispatch_is_reported_and_the_source_kept() -> None:
    errors: list[str] = []
    with MainContext("lenient") as ctx:
        ctx.set_exception_handler(lambda c, exc, where: errors.append(f"{where}: {exc}"))

        def boom() -> bool:
            raise ValueError("oops")

        sid = ctx.idle_add(boom, name="boomer")
        assert ctx.iteration(False)
        assert errors == ["dispatch of source 'boomer': oops"]
        assert ctx.find_source_by_id(sid) is not None


def test_iteration_needs_ownership(context: MainContext) -> None:
    assert context.acquire()
    result: list[object] = []

    def other() -> None:
        try:
            context.iteration(False)
        except StateError as exc:
            result.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    context.release()
    assert isinstance(result[0], StateError)


def test_idle_and_timeout_sources(context: MainContext) -> None:
    runs: list[str] = []
    context.attach(IdleSource(lambda: bool(runs.append("idle")) or runs.count("idle") < 2))
    context.timeout_add(1, lambda: bool(runs.append("timeout")) or SOURCE_REMOVE, priority=PRIORITY_HIGH)
    poll_until(lambda: context.iteration(True), lambda: runs.count("idle") == 2 and "timeout" in runs,
               "both sources", BOUND_S)
    assert runs.count("timeout") == 1
    assert context.sources() == []


def test_destroy_from_another_thread_wakes_the_context(context: MainContext) -> None:
    log: list[str] = []
    src = Recorder(log, "doomed")
    context.attach(src)
    context.iteration(False)
    t = threading.Thread(target=src.destroy)
    t.start()
    poll_until(lambda: context.iteration(True), lambda: src.destroyed, "the destroy from another thread",
               BOUND_S)
    t.join()
    assert src.finalized == 1 and context.sources() == []


def test_pending_keeps_ready_sources_for_the_next_iteration(context: MainContext) -> None:
    runs: list[int] = []
    context.idle_add(lambda: bool(runs.append(1)) or SOURCE_REMOVE)
    assert context.pending() is True
    assert runs == []
    assert context.iteration(False) is True
    assert runs == [1]
    assert context.pending() is False


def test_hook_errors_are_reported(context: MainContext) -> None:
    errors: list[str] = []
    context.set_exception_handler(lambda c, exc, where: errors.append(where))

    class Faulty(Source):
        def prepare(self) -> tuple[bool, int]:
            raise RuntimeError("prepare")

        def check(self) -> bool:
            raise RuntimeError("check")

        def dispatch(self) -> bool:
            return True

    context.attach(Faulty("faulty"))
    assert context.iteration(False) is False
    assert errors == ["prepare of source 'faulty'", "check of source 'faulty'"]


def test_timeout_seconds_source_arms_in_seconds(context: MainContext) -> None:
    sid = context.timeout_add_seconds(3, lambda: True)
    src = context.find_source_by_id(sid)
    assert src is not None
    assert 2_900_000_000 < src.ready_time_ns - time.monotonic_ns() <= 3_000_000_000
    assert context.iteration(False) is False


def test_aio_source_sets_notify_me_bit_0_between_prepare_and_check() -> None:
    from iothreads import AioContext
    from mainloop import AioSource

    with AioContext(name="gs") as aio, MainContext("m") as ctx:
        ctx.attach(AioSource(aio))
        assert ctx.acquire()
        try:
            _, maxp = ctx.prepare()
            assert aio._notify_me & 1
            ctx.query(maxp)
            ctx.wait_fds(0)
            ctx.check(maxp)
            assert not aio._notify_me & 1
        finally:
            ctx.release()
        # While the main context sleeps, a cross-thread BH must wake it via
        # the AioContext's eventfd.
        ran = threading.Event()
        ctx.iteration(False)
        t = threading.Thread(target=aio.bh_schedule_oneshot, args=(ran.set,))
        t.start()
        poll_until(lambda: ctx.iteration(True), ran.is_set, "the oneshot BH scheduled from another thread",
                   BOUND_S)
        t.join()


def test_dispatch_time_is_each_sources_own(context: MainContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sources dispatched in one iteration each get the time of their own
    dispatch (one clock read ends one dispatch and starts the next), and a
    finalize after a dispatch returned False counts for no source."""
    import mainloop.glib._context as context_module

    now = [1_000]
    monkeypatch.setattr(context_module, "_perf_counter_ns", lambda: now[0])

    def spend(ns: int, result: bool) -> bool:
        now[0] += ns
        return result

    class Once(IdleSource):
        def finalize(self) -> None:
            now[0] += 1_000_000  # a slow finalize

    once = Once(lambda: spend(300, SOURCE_REMOVE), "once")
    slow = IdleSource(lambda: spend(5_000, True), "slow")
    quick = IdleSource(lambda: True, "quick")
    for s in (once, slow, quick):
        context.attach(s)
    assert context.iteration(False)
    assert [(s.dispatch_count, s.dispatch_ns) for s in (once, slow, quick)] == [(1, 300), (1, 5_000), (1, 0)]


def test_a_new_aio_source_does_not_see_what_an_old_one_polled() -> None:
    """The ready poll fds live in the AioContext (its check reads them there):
    a destroyed source leaves none behind for the next one."""
    from iothreads import AioContext
    from mainloop import AioSource

    a, b = socket.socketpair()
    b.send(b"x")
    with AioContext(name="gs") as aio, MainContext("old") as old, MainContext("new") as new:
        aio.set_fd_handler(a.fileno(), lambda: None)
        first = AioSource(aio)
        old.attach(first)
        assert old.acquire()
        try:
            _, maxp = old.prepare()
            old.query(maxp)
            old.wait_fds(0)  # a's handler fd polled ready: recorded for check
            assert [p.fd for p in first.pending_pollfds()] == [a.fileno()]
        finally:
            old.release()
        first.destroy()  # never checked nor dispatched
        assert aio.gsource_ready_fds == []
        aio.set_fd_handler(a.fileno(), None)
        second = AioSource(aio)
        new.attach(second)
        new.iteration(False)
        assert a.fileno() not in [p.fd for p in second.pending_pollfds()]
    a.close()
    b.close()


def test_a_callback_that_iterates_the_context_again(context: MainContext) -> None:
    """As glib: a source is left out of iterations nested in its own dispatch
    (unless ``can_recurse``), and a nested iteration takes over the rest of
    the outer one's dispatch list, so each ready source runs once (A used to
    recurse into itself, and B ran twice, the second time on an empty fd)."""
    import os

    ra, wa = os.pipe()
    rb, wb = os.pipe()
    for fd in (ra, rb):
        os.set_blocking(fd, False)
    os.write(wa, b"x")
    os.write(wb, b"y")
    log: list[tuple[str, int, bytes]] = []
    depth = [0]

    def read(fd: int) -> bytes:
        try:
            return os.read(fd, 1)
        except BlockingIOError:
            return b"EAGAIN"

    def cb_a(fd: int, cond: int) -> bool:
        log.append(("A", depth[0], b""))
        if depth[0] == 0:
            depth[0] += 1
            context.iteration(False)  # nested, inside A's dispatch: A is blocked, B runs here
            depth[0] -= 1
            assert read(fd) == b"x"
        return True

    def cb_b(fd: int, cond: int) -> bool:
        log.append(("B", depth[0], read(fd)))
        return True

    context.io_add_watch(ra, IO_IN, cb_a, name="A")
    context.io_add_watch(rb, IO_IN, cb_b, name="B")
    try:
        assert context.iteration(False)
        assert log == [("A", 0, b""), ("B", 1, b"y")]
        os.write(wa, b"x")
        context.iteration(False)  # A is polled again once its dispatch returned
        assert log[-1] == ("A", 0, b"")
    finally:
        for fd in (ra, wa, rb, wb):
            os.close(fd)


def test_a_source_destroyed_from_another_thread_during_its_dispatch_is_finalized_after(
        context: MainContext) -> None:
    """Regression: finalize ran at once in the destroying thread while the
    dispatch was still running in the loop thread (say, a channel closed
    under its own drain).  As glib's dispatch holds a reference: after it."""
    log: list[str] = []
    destroyed = threading.Event()

    class Slow(Source):
        def prepare(self) -> tuple[bool, int]:
            return True, 0

        def dispatch(self) -> bool:
            log.append("dispatch start")
            threading.Thread(target=lambda: (self.destroy(), destroyed.set())).start()
            assert destroyed.wait(30), "the other thread did not destroy the source"
            log.append("dispatch end")
            return True

        def finalize(self) -> None:
            log.append("finalize")

    src = Slow("slow")
    context.attach(src)
    context.iteration(False)
    assert log == ["dispatch start", "dispatch end", "finalize"]
    src.destroy()
    assert log.count("finalize") == 1


def test_a_source_destroyed_while_its_dispatch_waits_in_a_nested_iteration(context: MainContext) -> None:
    """S1's callback iterates the context; S2, dispatched there, destroys S1:
    S1 is finalized after its own dispatch returns, not under it."""
    log: list[str] = []

    class S(Source):
        def __init__(self, name: str, body: Callable[[], object]) -> None:
            super().__init__(name)
            self.body = body

        def prepare(self) -> tuple[bool, int]:
            return True, 0

        def dispatch(self) -> bool:
            log.append(f"{self.name} start")
            self.body()
            log.append(f"{self.name} end")
            return True

        def finalize(self) -> None:
            log.append(f"{self.name} finalize")

    s1 = S("S1", lambda: context.iteration(False))
    s2 = S("S2", lambda: s1.destroy())
    context.attach(s1)
    context.attach(s2)
    context.iteration(False)
    assert log == ["S1 start", "S2 start", "S2 end", "S1 end", "S1 finalize"]
