"""blkdebug end to end, on a launched cluster: an injected error reaches the
NBD client (qemu-io, with its errno), the block client and QMP's statistics
and BLOCK_IO_ERROR events; werror=stop holds a write until 'cont'; a node
with a blkdebug node over it can be neither deleted nor moved."""

from __future__ import annotations

import errno
import os
import subprocess
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from iothreads.block import BlockClient, BlockIOError
from iothreads.testing import LoopThread, wait_until
from tests.clients import need

from .support import Clusters

BOUND_S = 60.0
MiB = 1 << 20


def qemu_io(uri: str, *commands: str) -> str:
    """qemu-io's output for ``commands`` on ``uri`` (it reports a failed command in its output)."""
    argv = [need("qemu-io"), "-f", "raw", *(a for c in commands for a in ("-c", c)), uri]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=BOUND_S)
    return done.stdout + done.stderr


def cmd(qmp: QEMUMonitorProtocol, name: str, **args: Any) -> dict[str, Any]:
    """The raw answer: ``{"return": ...}`` or ``{"error": ...}``."""
    return qmp.cmd_raw(name, args)


def events_named(qmp: QEMUMonitorProtocol, name: str, count: int = 1) -> list[dict[str, Any]]:
    """The next ``count`` events called ``name`` (others are passed over), each within the bound."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        event = qmp.pull_event(wait=BOUND_S)
        assert event is not None, f"no {name} event within {BOUND_S} s"
        if event["event"] == name:
            found.append(event["data"])
    return found


@pytest.fixture
def cluster(clusters: Clusters) -> tuple[dict[str, Any], str, str]:
    """One iothread; file node disk0; blkdebug node dbg over it, failing reads
    of sector 2048 (1 MiB) with EIO and writes at 2 MiB with ENOSPC, given in
    the CLI's keyval form; both exported.  The READY data, the image, the
    runtime directory."""
    image = clusters.image(4 * MiB)
    run_dir = os.path.join(clusters.scratch_dir, "run")
    _, ready = clusters.launch(
        "--iothreads", "1", "--runtime-dir", run_dir,
        "--blockdev", f"driver=file,node-name=disk0,filename={image}",
        "--blockdev", "driver=blkdebug,node-name=dbg,image=disk0,"
                      "inject-error.0.event=read_aio,inject-error.0.sector=2048,"
                      "inject-error.1.event=pwritev,inject-error.1.iotype=write,inject-error.1.sector=4096,"
                      "inject-error.1.errno=28",
        "--nbd-server", f"addr.type=unix,addr.path={os.path.join(run_dir, 'nbd.sock')}",
        "--export", "nbd,id=e0,node-name=dbg,writable=on")
    return ready, image, run_dir


def test_injected_errors_reach_the_nbd_client_the_block_client_and_qmp(
        cluster: tuple[dict[str, Any], str, str]) -> None:
    ready, image, run_dir = cluster
    qmp = QEMUMonitorProtocol(ready["qmp"][0])
    qmp.connect()
    try:
        out = qemu_io(ready["exports"]["e0"], "write -P 0x5a 0 64k", "read -P 0x5a 0 64k", "read 1M 4k",
                      "write -P 0x11 2M 4k", "read 3M 4k")
        assert out.count("read 65536/65536") == 1 and out.count("read 4096/4096") == 1, out
        assert "read failed: Input/output error" in out, out
        assert "write failed: No space left on device" in out, out  # NBD_ENOSPC, mapped back
        with open(image, "rb") as f:
            assert f.read(65536) == b"\x5a" * 65536  # what passed reached the image
            f.seek(2 * MiB)
            assert f.read(4096) == bytes(4096)  # what failed did not
        with BlockClient(run_dir, timeout_s=BOUND_S) as client:
            with pytest.raises(BlockIOError) as info:
                client.read("dbg", MiB - 512, 1024)  # covers sector 2048's first byte
            assert info.value.errno == errno.EIO and "blkdebug" in str(info.value)
            assert client.read("dbg", MiB + 512, 512) == bytes(512)  # does not
            assert client.read("disk0", MiB, 512) == bytes(512)  # the image itself: no rules
        errors = events_named(qmp, "BLOCK_IO_ERROR", 3)
        assert [(e["node-name"], e["operation"], e["action"], e["nospace"]) for e in errors] == [
            ("dbg", "read", "report", False), ("dbg", "write", "report", True), ("dbg", "read", "report", False)]
        stats = {s["node-name"]: s["stats"] for s in cmd(qmp, "query-blockstats", **{"query-nodes": True})["return"]}
        assert stats["dbg"]["failed_rd_operations"] == 2 and stats["dbg"]["failed_wr_operations"] == 1
        assert stats["disk0"]["failed_rd_operations"] == 0 and stats["disk0"]["failed_wr_operations"] == 0
        # A node under another one: neither deleted nor moved; the node over it can go.
        err = cmd(qmp, "blockdev-del", **{"node-name": "disk0"})["error"]
        assert err["desc"] == "Block device disk0 is in use"
        err = cmd(qmp, "x-blockdev-set-iothread", **{"node-name": "disk0", "iothread": "io0"})
        assert "error" not in err  # already there: nothing to do
        cmd(qmp, "object-add", **{"qom-type": "iothread", "id": "io1"})
        err = cmd(qmp, "x-blockdev-set-iothread", **{"node-name": "disk0", "iothread": "io1"})["error"]
        assert err["desc"] == "Node disk0 is not a root node"
        err = cmd(qmp, "blockdev-add", driver="blkdebug", **{"node-name": "d2", "image": "disk0",
                                                             "iothread": "io1"})["error"]
        assert "iothread io0" in err["desc"]
        err = cmd(qmp, "blockdev-add", driver="blkdebug", **{"node-name": "d3", "image": "ghost"})["error"]
        assert err["desc"] == "Cannot find device=ghost nor node-name=ghost"
    finally:
        qmp.close()


def test_werror_stop_holds_a_write_until_cont(cluster: tuple[dict[str, Any], str, str]) -> None:
    ready, image, run_dir = cluster
    qmp = QEMUMonitorProtocol(ready["qmp"][0])
    qmp.connect()
    loop = LoopThread("client")
    try:
        reply = cmd(qmp, "blockdev-add", driver="blkdebug", werror="stop", **{
            "node-name": "stopper", "image": "disk0",
            "inject-error": [{"event": "pwritev", "errno": 28, "once": True}]})
        assert reply == {"return": {}}, reply
        assert cmd(qmp, "query-status")["return"] == {"running": True, "status": "running"}
        client = loop.run_sync(lambda: BlockClient(run_dir, loop.ctx, timeout_s=BOUND_S))
        results: list[tuple[int, str]] = []
        loop.run_sync(lambda: client.submit("stopper", "write", 3 * MiB, 4, b"held",
                                            lambda s, m, d: results.append((s, m))))
        [error] = events_named(qmp, "BLOCK_IO_ERROR")
        assert (error["node-name"], error["action"], error["nospace"]) == ("stopper", "stop", True)
        events_named(qmp, "STOP")
        assert cmd(qmp, "query-status")["return"] == {"running": False, "status": "io-error"}
        assert results == []  # held, not failed
        # Other requests go on meanwhile (there is no guest to pause here).
        with BlockClient(run_dir, timeout_s=BOUND_S) as other:
            assert other.read("disk0", 0, 4) == bytes(4)
        assert cmd(qmp, "cont") == {"return": {}}
        events_named(qmp, "RESUME")
        wait_until(lambda: results, "the held write to complete after cont", BOUND_S)
        assert results == [(0, "")]  # the rule was 'once': the retry went through
        assert cmd(qmp, "query-status")["return"] == {"running": True, "status": "running"}
        with open(image, "rb") as f:
            f.seek(3 * MiB)
            assert f.read(4) == b"held"
        loop.run_sync(client.close)
    finally:
        loop.stop()
        qmp.close()



def test_a_delayed_request_does_not_hold_up_the_others(cluster: tuple[dict[str, Any], str, str]) -> None:
    """A read delayed by a rule (2 s, then served) and reads behind it: those
    complete first, each on its own; the delayed one then reads its data."""
    ready, image, run_dir = cluster
    qmp = QEMUMonitorProtocol(ready["qmp"][0])
    qmp.connect()
    loop = LoopThread("client")
    try:
        reply = cmd(qmp, "blockdev-add", driver="blkdebug", **{
            "node-name": "slow", "image": "disk0",
            "inject-error": [{"event": "read_aio", "sector": 0, "errno": 0, "delay-ns": 2_000_000_000}]})
        assert reply == {"return": {}}, reply
        client = loop.run_sync(lambda: BlockClient(run_dir, loop.ctx, timeout_s=BOUND_S))
        order: list[str] = []

        def submit() -> None:
            client.submit("slow", "read", 0, 512, callback=lambda s, m, d: order.append(f"delayed {s}"))
            for i in range(8):
                client.submit("slow", "read", (i + 1) * 4096, 512, callback=lambda s, m, d: order.append(f"other {s}"))

        loop.run_sync(submit)
        wait_until(lambda: len(order) == 9, "the nine reads to complete", BOUND_S)
        assert order == ["other 0"] * 8 + ["delayed 0"]
        stats = {s["node-name"]: s["stats"] for s in cmd(qmp, "query-blockstats", **{"query-nodes": True})["return"]}
        assert stats["slow"]["rd_operations"] == 9 and stats["slow"]["failed_rd_operations"] == 0
        loop.run_sync(client.close)
    finally:
        loop.stop()
        qmp.close()
