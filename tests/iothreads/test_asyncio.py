"""An AioContext driven by a running asyncio loop (``AsyncioSource``): each
way it is woken (a bottom half from another thread or from a task, a timer
armed or moved earlier from another thread, an fd handler, an fd handler
registered from another thread), our coroutines on it, and its end."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from iothreads import AioContext
from iothreads.aio import AsyncioSource, ClockType, asyncio_source_of
from protocol import StateError, ThreadContractError

BOUND_S = 10.0  # the bound on any wait here (each normally takes milliseconds)


@pytest.fixture
def actx() -> Iterator[AioContext]:
    """A context whose home thread is the test's, where asyncio.run runs the loop."""
    ctx = AioContext(name="asyncio-test")
    yield ctx
    ctx.close()


def run(ctx: AioContext, body: Callable[[asyncio.Event], object], what: str) -> int:
    """Run the loop, driving ``ctx``, until ``body(done)`` (called in the
    loop) leads to ``done`` being set; the number of the source's turns."""
    async def main() -> int:
        done = asyncio.Event()
        with AsyncioSource(ctx) as source:
            body(done)
            try:
                await asyncio.wait_for(done.wait(), BOUND_S)
            except TimeoutError:
                pytest.fail(f"the asyncio loop was not woken: {what}")
            return source.turns
    return asyncio.run(main())


def in_thread(fn: Callable[[], object]) -> None:
    """Call ``fn`` from another thread, now (joined: it only schedules)."""
    t = threading.Thread(target=fn)
    t.start()
    t.join(BOUND_S)
    assert not t.is_alive()


def test_a_bottom_half_scheduled_from_another_thread_wakes_the_loop(actx: AioContext) -> None:
    ran_in: list[int] = []

    def body(done: asyncio.Event) -> None:
        def cb() -> None:
            ran_in.append(threading.get_ident())
            done.set()
        in_thread(lambda: actx.bh_schedule_oneshot(cb, "from-elsewhere"))  # the loop sleeps in its selector

    run(actx, body, "a BH scheduled from another thread")
    assert ran_in == [threading.get_ident()]  # in the home thread, as always


def test_a_bottom_half_scheduled_from_a_task_runs(actx: AioContext) -> None:
    def body(done: asyncio.Event) -> None:
        actx.bh_schedule_oneshot(done.set, "from-a-task")  # (outside any turn: the eventfd wakes the loop)

    assert run(actx, body, "a BH scheduled from an asyncio task") >= 1


def test_a_timer_fires_at_its_deadline(actx: AioContext) -> None:
    fired: list[int] = []

    timer = actx.timer_new_ms(ClockType.REALTIME, lambda: (fired.append(timer.now()), done[0].set()), "t")
    done: list[asyncio.Event] = []

    def body(event: asyncio.Event) -> None:
        done.append(event)
        deadline_ms = timer.now() + 20
        fired.append(deadline_ms)
        timer.mod(deadline_ms)

    run(actx, body, "a timer due in 20 ms")
    timer.delete()
    deadline_ms, fired_ms = fired
    assert fired_ms >= deadline_ms  # never early


def test_a_timer_moved_earlier_from_another_thread_wakes_the_loop(actx: AioContext) -> None:
    done: list[asyncio.Event] = []
    timer = actx.timer_new_ms(ClockType.REALTIME, lambda: done[0].set(), "t")

    def body(event: asyncio.Event) -> None:
        done.append(event)
        timer.mod(timer.now() + 3_600_000)  # an hour: the loop would sleep that long
        in_thread(lambda: timer.mod(timer.now() + 1))

    run(actx, body, "a timer moved from an hour to 1 ms, from another thread")
    timer.delete()


def test_an_fd_handler_runs_when_its_fd_is_ready(actx: AioContext) -> None:
    a, b = socket.socketpair()
    try:
        def body(done: asyncio.Event) -> None:
            def readable() -> None:
                assert a.recv(10) == b"x"
                actx.set_fd_handler(a.fileno(), None, None)
                done.set()
            actx.set_fd_handler(a.fileno(), readable, None)
            in_thread(lambda: b.send(b"x"))

        run(actx, body, "a readable fd")
    finally:
        a.close()
        b.close()


def test_an_fd_handler_registered_from_another_thread_is_watched(actx: AioContext) -> None:
    a, b = socket.socketpair()
    b.send(b"y")  # readable already: only the registration is missing
    try:
        def body(done: asyncio.Event) -> None:
            def readable() -> None:
                a.recv(10)
                actx.set_fd_handler(a.fileno(), None, None)
                done.set()
            in_thread(lambda: actx.set_fd_handler(a.fileno(), readable, None))

        run(actx, body, "an fd handler set from another thread")
    finally:
        a.close()
        b.close()


def test_our_coroutines_run_under_the_asyncio_loop(actx: AioContext) -> None:
    from iothreads import sleep_ns

    steps: list[str] = []

    async def ours() -> int:
        steps.append("start")
        await sleep_ns(1_000_000)  # a timer of the context
        steps.append("end")
        return 7

    def body(done: asyncio.Event) -> None:
        co = actx.spawn(ours(), "ours")
        co.add_done_callback(lambda _: done.set())

    run(actx, body, "a coroutine of the context")
    assert steps == ["start", "end"]


def test_close_hands_the_context_back(actx: AioContext) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        selector = loop._selector  # type: ignore[attr-defined]  # (the fds the loop watches)
        watched_before = set(selector.get_map())
        source = AsyncioSource(actx)
        assert asyncio_source_of(actx) is source
        assert actx.notifier.fileno() in selector.get_map()  # (the context's eventfd, watched)
        with pytest.raises(StateError):
            AsyncioSource(actx)  # one at a time
        source.close()
        source.close()  # (once is enough; twice is harmless)
        assert asyncio_source_of(actx) is None
        assert set(selector.get_map()) == watched_before  # no fd of the context is watched any more
    asyncio.run(main())
    ran: list[bool] = []
    actx.bh_schedule_oneshot(lambda: ran.append(True), "after")
    assert actx.poll(True, 1_000_000_000) and ran  # polled directly again


def test_without_a_running_loop_it_says_what_it_needs(actx: AioContext) -> None:
    with pytest.raises(StateError, match="needs an asyncio loop"):
        AsyncioSource(actx)
    assert asyncio_source_of(actx) is None


def test_only_the_home_thread_may_attach_it(actx: AioContext) -> None:
    errors: list[BaseException] = []

    def elsewhere() -> None:
        async def main() -> None:
            AsyncioSource(actx)
        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    in_thread(elsewhere)
    assert len(errors) == 1 and isinstance(errors[0], ThreadContractError)
