"""A node moves between iothreads while a client keeps I/O in flight: every
request completes exactly once, successfully, and the data is all there."""

from __future__ import annotations

import json
import os
import threading

from iothreads import BlockClient
from iothreads.testing import LoopThread
from mainloop import bql
from protocol import ErrorReply, QueryReply

from .support import Clusters

BS = 4096
N = 2000  # distinct blocks: concurrent writes never overlap


def block(i: int) -> bytes:
    return i.to_bytes(4, "little") * (BS // 4)


def test_move_node_under_load(clusters: Clusters) -> None:
    image = clusters.image(N * BS)
    cluster = clusters.start("io0", "io1")
    client_thread: LoopThread | None = None
    try:
        with bql():
            added: list[QueryReply | ErrorReply] = []
            cluster.blockdev_add("disk0", "file", {"filename": image}, added.append, "io0")
            assert cluster.wait_for(lambda: bool(added), 10) and isinstance(added[0], QueryReply)

        client_thread = LoopThread("client")
        ct = client_thread
        client = ct.run_sync(lambda: BlockClient(cluster.runtime_dir, ct.ctx))
        counts = [0] * N
        statuses: list[int] = []
        finished = threading.Event()
        next_block = 0

        def submit_one() -> None:
            nonlocal next_block
            i = next_block
            next_block += 1

            def done(status: int, message: str, data: bytes) -> None:
                counts[i] += 1
                statuses.append(status)
                if next_block < N:
                    submit_one()
                elif len(statuses) == N:
                    finished.set()

            client.submit("disk0", "write", i * BS, BS, block(i), done)

        def start() -> None:
            for _ in range(16):
                submit_one()

        ct.run_sync(start)
        homes = ["io1", "io0"]
        moves = 0
        with bql():
            while not finished.is_set() or moves < 2:
                replies: list[QueryReply | ErrorReply] = []
                cluster.move_node("disk0", homes[moves % 2], replies.append)
                assert cluster.wait_for(lambda: bool(replies), 30)
                assert isinstance(replies[0], QueryReply), replies[0]
                moves += 1
                assert cluster.wait_for(lambda: finished.is_set() or len(statuses) > moves * 100, 30)
            assert cluster.wait_for(finished.is_set, 60)
        assert counts == [1] * N  # exactly once each
        assert ct.run_sync(lambda: client.resends) > 0  # the moves did happen under load
        assert statuses == [0] * N
        with open(os.path.join(cluster.runtime_dir, "cluster.json")) as f:
            home = json.load(f)["nodes"]["disk0"]["iothread"]
        assert home == homes[(moves - 1) % 2]
        # The data is all there, read back through the node's new home.
        for i in range(0, N, 97):
            assert ct.run_sync(lambda i=i: client.read("disk0", i * BS, BS)) == block(i)
        ct.run_sync(client.close)
    finally:
        if client_thread is not None:
            client_thread.stop()


def test_a_move_survives_its_old_home_dying_after_letting_the_node_go(clusters: Clusters) -> None:
    """Regression: the old home detached the node, then died before the new
    home answered: the move reported success but the registry had dropped the
    node (lost with the dead iothread).  The new home is held (SIGSTOP) so that
    the old home's exit is surely seen first."""
    import signal

    from protocol import BlockdevAdd

    cluster = clusters.start("io0", "io1")
    with bql():
        added: list[QueryReply | ErrorReply] = []
        cluster.blockdev_add("n0", "null-co", {"size": 1 << 20}, added.append, "io0")
        assert cluster.wait_for(lambda: bool(added), 10) and isinstance(added[0], QueryReply)
        old, new = cluster.iothreads["io0"], cluster.iothreads["io1"]
        request = cluster._request

        def request_holding_the_new_home(iothread_id: str, make: object, callback: object) -> None:
            if iothread_id == "io1" and isinstance(make(0), BlockdevAdd):  # type: ignore[operator]
                os.kill(new.pid, signal.SIGSTOP)  # its answer waits
                os.kill(old.pid, signal.SIGKILL)  # and the old home dies, node let go
            request(iothread_id, make, callback)  # type: ignore[arg-type]

        cluster._request = request_holding_the_new_home  # type: ignore[method-assign]
        moved: list[QueryReply | ErrorReply] = []
        cluster.move_node("n0", "io1", moved.append)
        assert cluster.wait_for(lambda: old.exit_status is not None, 10)
        os.kill(new.pid, signal.SIGCONT)
        assert cluster.wait_for(lambda: bool(moved), 10)
        assert isinstance(moved[0], QueryReply), moved
        assert cluster.nodes["n0"].iothread == "io1"
        with open(os.path.join(cluster.runtime_dir, "cluster.json"), encoding="utf-8") as f:
            assert json.load(f)["nodes"]["n0"]["iothread"] == "io1"


def test_a_request_an_iothread_leaves_unanswered_fails_after_the_timeout(clusters: Clusters) -> None:
    """Regression: a stopped (hung) iothread left QMP commands waiting for
    ever.  Its requests now fail after ``request_timeout_ms``; a late answer
    is dropped, and the iothread goes on once resumed."""
    import signal

    cluster = clusters.start("io0", heartbeat_interval_ms=100, request_timeout_ms=300)
    t = cluster.iothreads["io0"]
    with bql():
        os.kill(t.pid, signal.SIGSTOP)
        try:
            replies: list[QueryReply | ErrorReply] = []
            cluster.query("io0", replies.append)
            assert cluster.wait_for(lambda: bool(replies), 10)
            assert isinstance(replies[0], ErrorReply) and "did not answer in 300 ms" in replies[0].message
        finally:
            os.kill(t.pid, signal.SIGCONT)
        again: list[QueryReply | ErrorReply] = []
        cluster.query("io0", again.append)
        assert cluster.wait_for(lambda: bool(again), 10) and isinstance(again[0], QueryReply)
        assert len(replies) == 1  # the late answer to the first query was dropped
