"""A user's test file: it uses only what the installed plugin gives (no
conftest), and ``qemu.qmp`` for QMP.  Run it from any folder, in parallel if
you like:

    pytest -n 4 test_with_the_plugin.py

Under xdist, the tests that take ``iothreads_shared_cluster`` share one
cluster across every worker (the first worker launches it, the last one to
finish stops it); ``module_cluster`` is one cluster per module, per worker.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from qemu.qmp import QMPClient

from iothreads import AioContext, BlockClient, ClockType, Future, sleep_ns
from iothreads.testing import FakeClock, LoopThread
from mainloop import EmbeddedCluster, MainLoop, bql_locked
from mainloop.pytest_plugin import ClusterFactory, SharedCluster


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


def test_a_cluster_serves_block_io_qmp_and_nbd(iothreads_cluster: Callable[..., EmbeddedCluster]) -> None:
    cluster = iothreads_cluster(8 << 20, iothreads=1, nbd=True)
    with BlockClient(cluster.runtime_dir) as client:
        client.write("disk0", 4096, b"\x42" * 4096)
        assert client.read("disk0", 4096, 4096) == b"\x42" * 4096

    async def exports() -> Any:
        qmp = QMPClient("a-test")
        await qmp.connect(cluster.qmp_path)
        try:
            return await qmp.execute("query-block-exports")
        finally:
            await qmp.disconnect()

    assert [e["id"] for e in asyncio.run(exports())] == ["exp0"]
    assert cluster.exports["exp0"].startswith("nbd+unix:///")


def test_the_main_loop_runs_under_the_bql(main_loop: MainLoop) -> None:
    ran: list[bool] = []
    main_loop.run_in_main_loop(lambda: ran.append(bql_locked()), "work")
    while not ran:
        main_loop.main_loop_wait(False)
    assert ran == [True]


@pytest.fixture(scope="module")
def module_cluster(iothreads_cluster_factory: ClusterFactory) -> Iterator[EmbeddedCluster]:
    with iothreads_cluster_factory.launch(16 << 20, iothreads=1,
                                          blockdevs=["driver=null-co,node-name=null0,iothread=io0"]) as cluster:
        yield cluster


@pytest.mark.parametrize("block", range(4))
def test_a_module_cluster(module_cluster: EmbeddedCluster, block: int) -> None:
    data = bytes([block]) * 4096
    module_cluster.client.write("disk0", block * 4096, data)
    assert module_cluster.client.read("disk0", block * 4096, 4096) == data
    nodes = {n["node-name"] for n in module_cluster.qmp.cmd("query-named-block-nodes")}
    assert {"disk0", "null0"} <= nodes


@pytest.mark.parametrize("block", range(8))
def test_the_shared_cluster(iothreads_shared_cluster: SharedCluster, block: int) -> None:
    """Eight tests, spread over the workers, on one cluster: each writes and
    reads its own block of disk1, and sees what the cluster serves."""
    client = iothreads_shared_cluster.client
    data = os.urandom(4096)
    client.write("disk1", block * 4096, data)
    assert client.read("disk1", block * 4096, 4096) == data
    assert {t["id"] for t in iothreads_shared_cluster.qmp.cmd("query-iothreads")} == {"io0", "io1"}
    assert iothreads_shared_cluster.exports["exp1"].startswith("nbd+unix:///disk1?socket=")  # (named as its node)
