"""A user's test file: it uses only what the installed plugin gives (no
conftest).  Run it from any folder, in parallel if you like:

    pytest -n 2 test_with_the_plugin.py
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from iothreads import AioContext, ClockType, Future, sleep_ns
from iothreads.testing import FakeClock, LoopThread


def test_a_timer_on_a_fake_clock(aio_context: AioContext, aio_clock: FakeClock) -> None:
    fired: list[int] = []
    timer = aio_context.timer_new_ms(ClockType.REALTIME, lambda: fired.append(aio_clock.now_ns()), "t")
    timer.mod(timer.now() + 250)
    aio_clock.advance_ns(249_000_000)
    aio_context.poll(False)
    assert not fired
    aio_clock.advance_ns(1_000_000)
    aio_context.poll(False)
    assert fired == [250_000_000]
    timer.delete()


@pytest.mark.aio
async def test_a_coroutine_uses_the_pool_and_another_thread(aio_context: AioContext,
                                                             aio_thread: LoopThread) -> None:
    data = await aio_context.thread_pool.submit(lambda: b"read in a worker")
    done: Future[str] = Future()
    aio_thread.ctx.bh_schedule_oneshot(lambda: done.set_result("ran in the other thread"), "hop")
    assert data == b"read in a worker" and await done == "ran in the other thread"


@pytest.mark.aio(timeout_s=10)
async def test_a_day_of_timeouts_takes_no_time(aio_context: AioContext, aio_autojump_clock: FakeClock) -> None:
    for _ in range(24):
        await sleep_ns(3600 * 10**9)  # an hour, 24 times: the clock jumps
    assert aio_autojump_clock.now_ns() == 24 * 3600 * 10**9


@pytest.mark.parametrize("size", [0, 4096, 1 << 30])
def test_disk_images(disk_image: Callable[[int], str], size: int) -> None:
    path = disk_image(size)
    assert os.path.getsize(path) == size
