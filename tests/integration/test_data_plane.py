"""The data plane with an in-process cluster: many clients at once, and I/O
errors reported to the main loop as BLOCK_IO_ERROR events."""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

import pytest

from iothreads import BlockClient, BlockIOError
from iothreads.testing import LoopThread, poll_until
from mainloop import Cluster, bql
from protocol import ErrorReply, QueryReply

from .support import Clusters

BS = 4096


@pytest.fixture
def cluster(clusters: Clusters) -> tuple[Cluster, str]:
    """io0 and io1, disk0 (a file) in io0 and null0 in io1: (the cluster, disk0's image)."""
    image = clusters.image(4 << 20)
    c = clusters.start("io0", "io1")
    with bql():
        replies: list[QueryReply | ErrorReply] = []
        c.blockdev_add("disk0", "file", {"filename": image}, replies.append, "io0")
        c.blockdev_add("null0", "null-co", {"size": 1 << 30}, replies.append, "io1")
        assert c.wait_for(lambda: len(replies) == 2, 10)
        assert all(isinstance(r, QueryReply) for r in replies)
    return c, image


def test_many_clients_at_once(cluster: tuple[Cluster, str]) -> None:
    c, _ = cluster
    n_clients, per_client = 6, 200
    errors: list[str] = []

    def client_main(k: int) -> None:
        try:
            with BlockClient(c.runtime_dir) as client:
                base = k * per_client * BS // 2  # disjoint regions of disk0
                results: list[int] = []
                for i in range(per_client // 2):
                    client.submit("disk0", "write", base + i * BS, BS, bytes([k]) * BS,
                                  lambda s, m, d: results.append(s))
                    client.submit("null0", "read", i * BS, BS, callback=lambda s, m, d: results.append(s))
                poll_until(lambda: client.ctx.poll(True), lambda: len(results) >= per_client,
                           f"client {k}'s {per_client} completions", 60)
                if results != [0] * per_client:
                    errors.append(f"client {k}: {results}")
                if client.read("disk0", base, BS) != bytes([k]) * BS:
                    errors.append(f"client {k}: data")
        except Exception as exc:
            errors.append(f"client {k}: {exc!r}")

    threads = [threading.Thread(target=client_main, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    with bql():  # the main loop keeps running (its heartbeats wake it) while the clients work
        assert c.wait_for(lambda: not any(t.is_alive() for t in threads), 60)
    for t in threads:
        t.join()
    assert errors == []


def test_io_errors_reach_the_main_loop_as_events(cluster: tuple[Cluster, str]) -> None:
    c, image = cluster
    events: list[tuple[str, dict[str, Any]]] = []
    c.add_listener(lambda name, data: events.append((name, data)))
    os.truncate(image, 1 << 20)  # the image shrinks under the node
    reader = LoopThread("reader")
    try:
        client = reader.run_sync(lambda: BlockClient(c.runtime_dir, reader.ctx))
        with pytest.raises(BlockIOError) as info:
            reader.run_sync(lambda: client.read("disk0", (1 << 20) - BS // 2, BS))
        assert info.value.errno == errno.EIO
        with bql():
            assert c.wait_for(lambda: any(n == "BLOCK_IO_ERROR" for n, _ in events), 10)
        [(_, data)] = [e for e in events if e[0] == "BLOCK_IO_ERROR"]
        assert data["node-name"] == "disk0" and data["operation"] == "read" and data["iothread"] == "io0"
        assert data["errno"] == errno.EIO and data["nospace"] is False and "short read" in data["reason"]
        # Bad requests are the caller's mistake, not an I/O error: no event.
        with pytest.raises(BlockIOError):
            reader.run_sync(lambda: client.read("disk0", 1 << 40, BS))
        reader.run_sync(client.close)
    finally:
        reader.stop()
    assert sum(n == "BLOCK_IO_ERROR" for n, _ in events) == 1
