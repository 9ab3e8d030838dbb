"""An iothread restarted after it died (``restart``) reopens the nodes it
held: with their options, their latency histogram and their statistics (as
of the last heartbeat it answered); a node that cannot be reopened is
dropped.  A node moved to another iothread keeps its statistics exactly, as
QEMU's do across ``x-blockdev-set-iothread``."""

from __future__ import annotations

import errno
import json
import os
import signal
from typing import Any, cast

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from iothreads import BlockClient, BlockIOError
from iothreads.testing import poll_until
from mainloop import Cluster, IOThreadConfig, bql
from mainloop.qmp import Monitor
from mainloop.qmp._monitor import QmpFailure

from .support import START_S, Clusters

ANSWER_S = 20.0
"""Bound on one answer (a QMP command, a node reopened)."""

BS = 4096


class Qmp:
    """The monitor's commands, run as a session runs them (under the BQL,
    answered in the main loop, which runs until the answer)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        with bql():
            self.monitor = Monitor(cluster, on_quit=lambda: None)

    def __call__(self, name: str, args: dict[str, Any] | None = None) -> Any:
        answers: list[Any] = []
        with bql():
            self.monitor.execute(name, args or {}, answers.append)
            assert self.cluster.wait_for(lambda: bool(answers), ANSWER_S), f"{name} got no answer"
        assert len(answers) == 1 and not isinstance(answers[0], QmpFailure), (name, args, answers)
        return answers[0]

    def blockstats(self) -> dict[str, dict[str, Any]]:
        return {s["node-name"]: s["stats"] for s in self("query-blockstats", {"query-nodes": True})}

    def close(self) -> None:
        with bql():
            self.monitor.close()


def counts_at_least(stats: dict[str, Any], floor: dict[str, Any]) -> bool:
    """Every counter of ``stats`` (bins of histograms included) is at least ``floor``'s."""
    for key, value in floor.items():
        if isinstance(value, dict):  # a latency histogram
            if stats.get(key, {}).get("boundaries") != value["boundaries"]:
                return False
            if any(a < b for a, b in zip(stats[key]["bins"], value["bins"], strict=True)):
                return False
        elif stats.get(key, -1) < value:
            return False
    return True


def counters(stats: dict[str, Any]) -> dict[str, int]:
    """A node's counters in QMP's BlockDeviceStats, without the histograms."""
    return {k: v for k, v in stats.items() if not isinstance(v, dict)}


def read_when_back(client: BlockClient, node: str, offset: int, length: int) -> bytes:
    """A read through a client made before its node's iothread died: the
    requests fail until the client is connected to the restarted iothread
    (EIO: the connection dropped, ENOTCONN: not back yet), then it reads."""
    got: list[bytes] = []

    def attempt() -> None:
        try:
            got.append(client.read(node, offset, length))
        except BlockIOError as exc:
            assert exc.errno in (errno.EIO, errno.ENOTCONN), exc
            client.ctx.poll(True, 10_000_000)  # the connection's events (it comes back)

    poll_until(attempt, lambda: bool(got), f"a read of {node} through the restarted iothread", ANSWER_S)
    return got[0]


def test_a_restarted_iothread_reopens_its_nodes_with_their_statistics(clusters: Clusters) -> None:
    image = clusters.image(1 << 20)
    cluster = clusters.start(IOThreadConfig("io0", restart=True), "io1", heartbeat_interval_ms=100)
    events: list[tuple[str, dict[str, Any]]] = []
    qmp = Qmp(cluster)
    while_down: dict[str, Any] = {}

    def on_event(name: str, data: dict[str, Any]) -> None:
        events.append((name, data))
        if name == "IOTHREAD_EXITED":  # down: what QMP says meanwhile (answered at once, from the main loop)
            qmp.monitor.execute("query-named-block-nodes", {}, lambda answer: while_down.setdefault("nodes", answer))
            qmp.monitor.execute("query-blockstats", {"query-nodes": True},
                                lambda answer: while_down.setdefault("stats", answer))

    cluster.add_listener(on_event)
    client = BlockClient(cluster.runtime_dir)
    try:
        qmp("blockdev-add", {"driver": "file", "node-name": "disk0", "filename": image, "iothread": "io0"})
        qmp("blockdev-add", {"driver": "null-co", "node-name": "null0", "size": 1 << 20, "read-only": True,
                             "iothread": "io0"})
        qmp("block-latency-histogram-set", {"id": "disk0", "boundaries": [1_000, 1_000_000]})
        nodes_before = qmp("query-named-block-nodes")
        assert [n["active"] for n in nodes_before] == [True, True]
        blocks = [os.urandom(BS) for _ in range(8)]
        for i, block in enumerate(blocks):
            client.write("disk0", i * BS, block)
        assert client.read("disk0", 0, BS) == blocks[0]
        client.read("null0", 0, BS)
        seen = qmp.blockstats()
        assert seen["disk0"]["wr_operations"] == 8 and seen["null0"]["rd_operations"] == 1
        assert sum(seen["disk0"]["wr_latency_histogram"]["bins"]) == 8
        with bql():  # the main loop's copy catches up with them at a heartbeat
            assert cluster.wait_for(lambda: all(counts_at_least(cluster.nodes[n].stats, counters(seen[n]))
                                                for n in seen), ANSWER_S)
            old_pid = cluster.iothreads["io0"].pid
            os.kill(old_pid, signal.SIGKILL)
            assert cluster.wait_for(lambda: any(name == "IOTHREAD_READY" and data["pid"] != old_pid
                                                for name, data in events), START_S), events
        names = [name for name, _ in events]
        assert names == ["IOTHREAD_EXITED", "IOTHREAD_RESTARTED", "IOTHREAD_READY"], events
        # While it was down: the nodes listed, inactive; their statistics as last reported.
        assert while_down["nodes"] == [{**n, "active": False} for n in nodes_before]
        down_stats = {s["node-name"]: s["stats"] for s in while_down["stats"]}
        assert all(counts_at_least(down_stats[n], seen[n]) for n in seen), (down_stats, seen)
        # Back: the same nodes, options and histogram setting; the statistics go on from there.
        assert qmp("query-named-block-nodes") == nodes_before
        after = qmp.blockstats()
        assert all(counts_at_least(after[n], seen[n]) for n in seen), (after, seen)
        with open(os.path.join(cluster.runtime_dir, "cluster.json"), encoding="utf-8") as f:
            state = json.load(f)
        assert {n: e["iothread"] for n, e in state["nodes"].items()} == {"disk0": "io0", "null0": "io0"}
        assert [(t["id"], t["state"]) for t in state["iothreads"]] == [("io0", "running"), ("io1", "running")]
        assert state["iothreads"][0]["pid"] == cluster.iothreads["io0"].pid != old_pid
        # The client made before the exit reaches the restarted iothread: the data is there.
        assert [read_when_back(client, "disk0", i * BS, BS) for i in range(len(blocks))] == blocks
        client.write("disk0", 0, blocks[1])
        wr = qmp.blockstats()["disk0"]["wr_operations"]
        assert wr == seen["disk0"]["wr_operations"] + 1  # counted on from where it was
    finally:
        client.close()
        qmp.close()


def test_a_node_that_cannot_be_reopened_is_dropped(clusters: Clusters, caplog: pytest.LogCaptureFixture) -> None:
    images = [clusters.image(1 << 20, f"disk{i}.img") for i in range(2)]
    cluster = clusters.start(IOThreadConfig("io0", restart=True))
    events: list[str] = []
    cluster.add_listener(lambda name, data: events.append(name))
    qmp = Qmp(cluster)
    try:
        for i, image in enumerate(images):
            qmp("blockdev-add", {"driver": "file", "node-name": f"disk{i}", "filename": image})
        os.unlink(images[1])  # the node's file is gone: it cannot be opened again
        with bql():
            os.kill(cluster.iothreads["io0"].pid, signal.SIGKILL)
            assert cluster.wait_for(lambda: "IOTHREAD_READY" in events, START_S), events
        assert [n["node-name"] for n in qmp("query-named-block-nodes")] == ["disk0"]
        assert "node disk1 could not be reopened in iothread io0, dropped" in caplog.text
        with open(os.path.join(cluster.runtime_dir, "cluster.json"), encoding="utf-8") as f:
            assert list(json.load(f)["nodes"]) == ["disk0"]
        qmp("blockdev-add", {"driver": "null-co", "node-name": "disk1"})  # its name is free again
    finally:
        qmp.close()


def test_a_move_keeps_the_statistics(clusters: Clusters) -> None:
    """Regression: a node moved to another iothread started its statistics
    (and its histogram's bins) from zero there."""
    cluster = clusters.start("io0", "io1")
    qmp = Qmp(cluster)
    try:
        qmp("blockdev-add", {"driver": "null-co", "node-name": "null0", "size": 1 << 20, "iothread": "io0"})
        qmp("block-latency-histogram-set", {"id": "null0", "boundaries": [1_000, 1_000_000]})
        with BlockClient(cluster.runtime_dir) as client:
            for i in range(5):
                client.read("null0", i * BS, BS)
            client.write("null0", 0, bytes(BS))
            with pytest.raises(BlockIOError):
                client.read("null0", 1 << 20, BS)  # out of range: an invalid one
            before = qmp.blockstats()["null0"]
            assert (before["rd_operations"], before["wr_operations"], before["invalid_rd_operations"]) == (5, 1, 1)
            qmp("x-blockdev-set-iothread", {"node-name": "null0", "iothread": "io1"})
            assert [n["iothread"] for n in qmp("query-named-block-nodes")] == ["io1"]
            assert qmp.blockstats()["null0"] == before  # exactly: nothing ran meanwhile
            client.read("null0", 0, BS)  # and they count on in the new home
            after = qmp.blockstats()["null0"]
            assert after["rd_operations"] == 6 and sum(after["rd_latency_histogram"]["bins"]) == 6
            qmp("x-blockdev-set-iothread", {"node-name": "null0", "iothread": "io0"})
            assert qmp.blockstats()["null0"] == after
    finally:
        qmp.close()


def test_launch_restart_brings_the_nodes_back(clusters: Clusters) -> None:
    """``iothreads launch --restart``, as a user runs it: an iothread killed
    comes back with its nodes (IOTHREAD_READY once they are reopened), and
    QMP lists them as before; a client reads the data written before."""
    image = clusters.image(1 << 20)
    run = os.path.join(clusters.scratch_dir, "run")
    proc, ready = clusters.launch("--iothreads", "1", "--restart", "--runtime-dir", run,
                                  "--blockdev", f"driver=file,node-name=disk0,filename={image}",
                                  "--blockdev", "driver=null-co,node-name=null0,size=1M,read-only=on")
    qmp = QEMUMonitorProtocol(ready["qmp"][0])
    qmp.connect()
    try:
        nodes_before = cast(list[dict[str, Any]], qmp.cmd("query-named-block-nodes"))
        block = os.urandom(BS)
        with BlockClient(run) as client:
            client.write("disk0", BS, block)
            old_pid = ready["iothreads"][0]["pid"]
            os.kill(old_pid, signal.SIGKILL)
            assert proc.stdout is not None
            lines = []
            for line in proc.stdout:  # bounded by the launcher's handshake deadline (it kills, then backs off)
                lines.append(json.loads(line))
                if lines[-1]["event"] == "IOTHREAD_READY":
                    break
            assert [e["event"] for e in lines] == ["IOTHREAD_EXITED", "IOTHREAD_RESTARTED", "IOTHREAD_READY"]
            assert lines[-1]["data"]["pid"] not in (old_pid, None)
            assert qmp.cmd("query-named-block-nodes") == nodes_before
            assert all(n["active"] for n in nodes_before)
            assert read_when_back(client, "disk0", BS, BS) == block
    finally:
        qmp.close()


def test_a_client_follows_an_iothread_restarted_on_another_endpoint(clusters: Clusters) -> None:
    """Over tcp:// a restarted iothread listens on a new port: a client made
    before reads from it there (the published state says where)."""
    cluster = clusters.start(IOThreadConfig("io0", restart=True), tcp="tcp://127.0.0.1:0")
    events: list[str] = []
    cluster.add_listener(lambda name, data: events.append(name))
    qmp = Qmp(cluster)
    try:
        qmp("blockdev-add", {"driver": "null-co", "node-name": "null0", "size": 1 << 20, "read-zeroes": True})
        old_endpoint = cluster.iothreads["io0"].data_endpoint
        with BlockClient(cluster.runtime_dir) as client:
            assert client.read("null0", 0, BS) == bytes(BS)
            with bql():
                os.kill(cluster.iothreads["io0"].pid, signal.SIGKILL)
                assert cluster.wait_for(lambda: "IOTHREAD_READY" in events, START_S), events
            assert cluster.iothreads["io0"].data_endpoint != old_endpoint
            assert read_when_back(client, "null0", 0, BS) == bytes(BS)
    finally:
        qmp.close()
