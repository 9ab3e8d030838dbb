"""Coroutines on AioContexts: spawn, await futures, thread-pool work and
timers, hop between contexts in different threads, error paths.  The
multi-context cases mirror QEMU's tests/unit/test-aio-multithread.c."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest

from iothreads import (
    AioContext,
    ClockType,
    Future,
    current_coroutine,
    get_current_aio_context,
    reschedule,
    sleep_ns,
)
from iothreads.testing import FakeClock, LoopThread, poll_until, run_until_idle
from protocol import CoroutineStateError, StateError

BOUND_S = 30.0


def test_spawn_runs_at_next_poll_and_returns_a_value(ctx: AioContext) -> None:
    async def work() -> int:
        assert get_current_aio_context() is ctx
        assert current_coroutine() is co
        return 42

    co = ctx.spawn(work())
    assert not co.done()
    assert ctx.poll(False)
    assert co.result() == 42
    assert current_coroutine() is None


def test_await_thread_pool_work_and_timers(fake_ctx: AioContext, fake_clock: FakeClock) -> None:
    steps: list[str] = []

    async def work() -> int:
        value = await fake_ctx.thread_pool.submit(sum, [1, 2, 3])
        steps.append("pool")
        await sleep_ns(5_000, ClockType.REALTIME)
        steps.append("slept")
        return value

    co = fake_ctx.spawn(work())
    poll_until(lambda: fake_ctx.poll(True), lambda: "pool" in steps, "the thread-pool work", BOUND_S)
    run_until_idle(fake_ctx)
    assert steps == ["pool"] and not co.done()
    fake_clock.advance_ns(5_000)
    poll_until(lambda: fake_ctx.poll(True), co.done, "the coroutine", BOUND_S)
    assert co.result() == 6 and steps == ["pool", "slept"]


def test_future_completed_from_another_thread(ctx: AioContext) -> None:
    fut: Future[str] = Future()
    where: list[int] = []

    async def waiter() -> str:
        value = await fut
        where.append(threading.get_ident())
        return value

    co = ctx.spawn(waiter())
    run_until_idle(ctx)
    t = threading.Thread(target=fut.set_result, args=("hi",))
    t.start()
    poll_until(lambda: ctx.poll(True), co.done, "the coroutine", BOUND_S)
    t.join()
    assert co.result() == "hi"
    assert where == [threading.get_ident()]


def test_exceptions_propagate_to_awaiters(ctx: AioContext) -> None:
    async def failing() -> None:
        raise ValueError("bad")

    async def parent() -> str:
        child = ctx.spawn(failing())
        try:
            await child
        except ValueError as exc:
            return f"caught {exc}"
        return "not raised"

    co = ctx.spawn(parent())
    run_until_idle(ctx)
    assert co.result() == "caught bad"


def test_unobserved_failure_is_reported(ctx: AioContext) -> None:
    reported: list[str] = []
    ctx.set_exception_handler(lambda c, exc, where: reported.append(f"{where}: {exc}"))

    async def failing() -> None:
        raise ValueError("nobody listens")

    co = ctx.spawn(failing(), name="lonely")
    run_until_idle(ctx)
    assert reported == ["coroutine 'lonely': nobody listens"]
    with pytest.raises(ValueError):
        co.result()


def test_awaiting_something_foreign_raises_inside_the_coroutine(ctx: AioContext) -> None:
    class Foreign:
        def __await__(self) -> Any:
            yield "not ours"

    async def bad() -> str:
        try:
            await Foreign()
        except TypeError as exc:
            return str(exc)
        return "no error"

    co = ctx.spawn(bad())
    run_until_idle(ctx)
    assert "only iothreads futures" in co.result()


def test_double_schedule_is_refused(ctx: AioContext) -> None:
    fut: Future[None] = Future()

    async def parked() -> None:
        await fut

    co = ctx.spawn(parked())
    with pytest.raises(CoroutineStateError, match="already scheduled"):
        co.schedule(ctx)
    run_until_idle(ctx)
    fut.set_result(None)  # outside the loop: the wake-up is scheduled...
    assert not co.done()
    run_until_idle(ctx)  # ...and entered by the next poll
    assert co.done()


def test_future_rules() -> None:
    fut: Future[int] = Future()
    with pytest.raises(StateError):
        fut.result()
    seen: list[int] = []
    fut.add_done_callback(lambda f: seen.append(f.result()))
    fut.set_result(3)
    with pytest.raises(StateError):
        fut.set_result(4)
    fut.add_done_callback(lambda f: seen.append(f.result() * 10))
    assert seen == [3, 30]
    assert fut.exception() is None


def test_spawn_needs_a_coroutine_object(ctx: AioContext) -> None:
    async def f() -> None:
        pass

    with pytest.raises(TypeError, match="coroutine object"):
        ctx.spawn(f)


def test_reschedule_moves_a_coroutine_between_threads() -> None:
    with LoopThread("io0") as io0, LoopThread("io1") as io1:
        seen: list[tuple[str, int | None]] = []

        async def hop() -> None:
            for target in (io1, io0, io1):
                await reschedule(target.ctx)
                ctx = get_current_aio_context()
                assert ctx is target.ctx
                seen.append((target.name, threading.get_ident()))

        co = io0.run_sync(lambda: io0.ctx.spawn(hop()))
        done = threading.Event()
        co.add_done_callback(lambda f: done.set())
        assert done.wait(30)
        co.result()
        assert seen == [("io1", io1.ident), ("io0", io0.ident), ("io1", io1.ident)]


def test_multi_lifecycle() -> None:
    """/aio/multi/lifecycle: run a BH synchronously on each of 5 contexts."""
    threads = [LoopThread(f"io{i}") for i in range(5)]
    try:
        idents = [t.run_sync(threading.get_ident) for t in threads]
        assert idents == [t.ident for t in threads]
        assert len(set(idents)) == 5
    finally:
        for t in threads:
            t.stop()


def test_multi_schedule_coroutines_hop_randomly() -> None:
    """/aio/multi/schedule: coroutines hop between 5 contexts; never double
    scheduled (that would raise), all finish, every hop lands where asked."""
    threads = [LoopThread(f"io{i}") for i in range(5)]
    try:
        n_coroutines, hops = 20, 200
        wrong: list[str] = []
        finished = threading.Semaphore(0)

        async def hopper(seed: int) -> int:
            rng = random.Random(seed)
            for _ in range(hops):
                target = rng.choice(threads)
                await reschedule(target.ctx)
                if get_current_aio_context() is not target.ctx:
                    wrong.append(target.name)
            return seed

        cos = [
            threads[i % 5].run_sync(lambda i=i: threads[i % 5].ctx.spawn(hopper(i)))
            for i in range(n_coroutines)
        ]
        for co in cos:
            co.add_done_callback(lambda f: finished.release())
        for _ in cos:
            assert finished.acquire(timeout=60)
        assert sorted(co.result() for co in cos) == list(range(n_coroutines))
        assert wrong == []
    finally:
        for t in threads:
            t.stop()


def test_loop_thread_reports_leaks_on_stop() -> None:
    t = LoopThread("leaky")
    t.run_sync(lambda: t.ctx.bh_new(lambda: None, "left-behind"))
    with pytest.raises(StateError, match="left-behind"):
        t.stop()


def test_a_raising_done_callback_strands_nobody(ctx: AioContext) -> None:
    """Regression: a done-callback that raised skipped the rest: a coroutine
    awaiting the same future was never resumed, and a thread-pool request's own
    callback never ran.  The exception now goes to the context's handler."""
    reported: list[str] = []
    ctx.set_exception_handler(lambda c, exc, where: reported.append(where))

    def bad(f: Future[Any]) -> None:
        raise RuntimeError("observer bug")

    fut: Future[int] = Future()
    resumed: list[int] = []

    async def waiter() -> None:
        resumed.append(await fut)

    co = ctx.spawn(waiter())
    run_until_idle(ctx)
    fut.add_done_callback(bad)
    ctx.bh_schedule_oneshot(lambda: fut.set_result(42))  # completed inside the loop
    run_until_idle(ctx)
    assert resumed == [42] and co.done()
    ran: list[int] = []
    req = ctx.thread_pool.submit(lambda: 7, callback=lambda r: ran.append(r.result()))
    req.add_done_callback(bad)
    poll_until(lambda: ctx.poll(True, 100_000_000), lambda: ran, "the request's callback", 20)
    assert ran == [7]
    assert len(reported) == 2 and all("done callback" in where for where in reported)
