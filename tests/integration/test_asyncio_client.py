"""The block client in an asyncio program: requests awaited from asyncio
tasks, many in flight, completions through the event loop, no helper thread;
errors, cancellation, and a context the client does not own."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from iothreads import AioContext, AsyncioSource, BlockClient, BlockIOError
from iothreads.aio import asyncio_source_of
from protocol import StateError

T = TypeVar("T")

BLOCK = 4096
TASKS = 64
BOUND_S = 60.0  # the bound on each test's program (it normally takes well under a second)


def run_bounded(main: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(main, BOUND_S))


async def tasks_started() -> None:
    """Return once every task created before has run its first step (where
    it sends its request): the loop runs ready callbacks in order, and this
    one was queued after theirs."""
    loop = asyncio.get_running_loop()
    reached: asyncio.Future[None] = loop.create_future()
    loop.call_soon(reached.set_result, None)
    await reached


def block(i: int) -> bytes:
    return bytes([i % 251 + 1]) * BLOCK


def test_tasks_await_many_requests_at_once_through_the_loop(block_cluster: tuple[str, str]) -> None:
    run, image = block_cluster

    async def main() -> tuple[int, set[threading.Thread], set[threading.Thread]]:
        threads_before = set(threading.enumerate())
        with BlockClient(run) as c:
            writes = [asyncio.create_task(c.awrite("disk0", i * BLOCK, block(i))) for i in range(TASKS)]
            await tasks_started()
            in_flight = c.in_flight
            await asyncio.gather(*writes)
            await c.aflush("disk0")
            assert asyncio_source_of(c.ctx) is not None  # the client's context, driven by this loop
            reads = await asyncio.gather(*(c.aread("disk0", i * BLOCK, BLOCK) for i in range(TASKS)))
            assert reads == [block(i) for i in range(TASKS)]
            assert c.in_flight == 0
            threads_during = set(threading.enumerate())
        return in_flight, threads_before, threads_during

    in_flight, before, during = run_bounded(main())
    assert in_flight == TASKS  # all in flight together
    assert during == before  # no helper thread
    with open(image, "rb") as f:
        assert f.read(TASKS * BLOCK) == b"".join(block(i) for i in range(TASKS))


def test_errors_raise_in_the_awaiting_task(block_cluster: tuple[str, str]) -> None:
    run, _ = block_cluster

    async def main() -> None:
        with BlockClient(run) as c:
            with pytest.raises(BlockIOError) as info:
                await c.aread("disk0", 8 << 20, 1)  # past the end of the 8 MiB node
            assert info.value.errno == errno.EINVAL
            with pytest.raises(BlockIOError) as info:
                await c.aread("nosuch", 0, 1)
            assert info.value.errno == errno.ENODEV
            assert await c.aread("null0", 0, 8) == bytes(8)  # and the client still works

    run_bounded(main())


def test_a_cancelled_task_gives_its_request_up(block_cluster: tuple[str, str]) -> None:
    run, _ = block_cluster

    async def main() -> None:
        with BlockClient(run) as c:
            task = asyncio.create_task(c.aread("disk0", 0, BLOCK))
            await tasks_started()  # (its request is sent)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The completion, when it comes, is dropped; the next requests are answered.
            assert await c.aread("null0", 0, 4) == bytes(4)
            while c.in_flight:
                await c.aread("null0", 0, 1)
            assert c.in_flight == 0

    run_bounded(main())


def test_a_context_of_the_callers_must_be_driven_by_the_loop(block_cluster: tuple[str, str]) -> None:
    run, _ = block_cluster

    async def main() -> None:
        ctx = AioContext(name="mine")
        try:
            with BlockClient(run, ctx) as c:
                with pytest.raises(StateError, match="not driven by this asyncio loop"):
                    await c.aread("null0", 0, 1)
                with AsyncioSource(ctx):
                    assert await c.aread("null0", 0, 3) == bytes(3)
        finally:
            ctx.close()

    run_bounded(main())
