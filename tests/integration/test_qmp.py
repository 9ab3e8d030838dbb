"""QMP with the tools QEMU users already have: qemu.qmp's async QMPClient and
legacy QEMUMonitorProtocol, qmp-shell, and raw sockets for bad input."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from iothreads.testing import poll_until

from .support import Clusters


@pytest.fixture
def cluster(clusters: Clusters) -> dict[str, Any]:
    """Two iothreads, null0 in io0: the READY event's data, with ``proc`` (the
    launcher, which must exit with status 0, whoever stops it) and ``image``
    (a 1 MiB file that no node uses yet)."""
    image = clusters.image(1 << 20)
    run = os.path.join(clusters.scratch_dir, "run")
    proc, ready = clusters.launch("--iothreads", "2", "--runtime-dir", run,
                                  "--blockdev", "driver=null-co,node-name=null0,size=1M,iothread=io0")
    return {**ready, "image": image, "proc": proc}


def test_async_client_commands_and_events(cluster: dict[str, Any]) -> None:
    async def scenario() -> None:
        qmp = QMPClient("test")
        await qmp.connect(cluster["qmp"][0])
        try:
            version = await qmp.execute("query-version")
            assert version["qemu"]["major"] == 10
            names = {c["name"] for c in await qmp.execute("query-commands")}
            assert {"query-iothreads", "object-add", "blockdev-add", "x-blockdev-set-iothread",
                    "x-query-main-loop", "quit"} <= names
            assert (await qmp.execute("query-status"))["running"] is True
            threads = await qmp.execute("query-iothreads")
            assert [t["id"] for t in threads] == ["io0", "io1"]
            assert set(threads[0]) == {"id", "thread-id", "poll-max-ns", "poll-grow", "poll-shrink",
                                       "aio-max-batch"}
            # iothreads come and go
            await qmp.execute("object-add", {"qom-type": "iothread", "id": "io7", "poll-max-ns": 1000})
            assert "io7" in [t["id"] for t in await qmp.execute("query-iothreads")]
            await qmp.execute("qom-set", {"path": "/objects/io7", "property": "poll-max-ns", "value": 5})
            assert await qmp.execute("qom-get", {"path": "/objects/io7", "property": "poll-max-ns"}) == 5
            await qmp.execute("object-del", {"id": "io7"})
            assert "io7" not in [t["id"] for t in await qmp.execute("query-iothreads")]
            # block nodes
            await qmp.execute("blockdev-add", {"driver": "file", "node-name": "disk0",
                                               "filename": cluster["image"], "iothread": "io1"})
            nodes = {n["node-name"]: n for n in await qmp.execute("query-named-block-nodes")}
            assert nodes["disk0"]["iothread"] == "io1" and nodes["null0"]["drv"] == "null-co"
            await qmp.execute("x-blockdev-set-iothread", {"node-name": "disk0", "iothread": "io0"})
            nodes = {n["node-name"]: n for n in await qmp.execute("query-named-block-nodes")}
            assert nodes["disk0"]["iothread"] == "io0"
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("object-del", {"id": "io0"})
            assert info.value.error_class == "GenericError" and "in use" in str(info.value)
            await qmp.execute("blockdev-del", {"node-name": "disk0"})
            # the live view of the main loop
            view = await qmp.execute("x-query-main-loop")
            roles = " ".join(f["role"] for f in view["fds"])
            assert "QMP session socket" in roles and "control channel" in roles
            # errors
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("no-such-command")
            assert info.value.error_class == "CommandNotFound"
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("object-add", {"qom-type": "iothread", "id": "x", "poll-max-ns": "lots"})
            assert "expected: integer" in str(info.value)
            with pytest.raises(ExecuteError) as info:
                await qmp.execute("blockdev-add", {"driver": "file", "node-name": "d", "bogus": 1})
            assert "Parameter 'bogus' is unexpected" in str(info.value)
            # an iothread dying is an event
            with qmp.listener("IOTHREAD_EXITED") as listener:
                os.kill(cluster["iothreads"][1]["pid"], signal.SIGKILL)
                event = await asyncio.wait_for(listener.get(), 10)
            assert event["data"]["id"] == "io1"
            with qmp.listener("SHUTDOWN") as listener:
                await qmp.execute("quit")
                event = await asyncio.wait_for(listener.get(), 10)
            assert event["data"]["reason"] == "host-qmp-quit"
            assert set(event["timestamp"]) == {"seconds", "microseconds"}
        finally:
            try:
                await qmp.disconnect()
            except EOFError:
                pass  # after quit the server hangs up, as QEMU does

    asyncio.run(scenario())
    cluster["proc"].wait(30)
    assert cluster["proc"].returncode == 0


def test_legacy_client_and_several_sessions(cluster: dict[str, Any]) -> None:
    a = QEMUMonitorProtocol(cluster["qmp"][0])
    b = QEMUMonitorProtocol(cluster["qmp"][0])
    greeting = a.connect()
    assert greeting["QMP"]["capabilities"] == []
    b.connect()
    assert a.cmd("query-status")["status"] == "running"
    assert b.cmd_obj({"execute": "query-iothreads"})["return"][0]["id"] == "io0"  # id-less
    a.close()
    assert b.cmd("query-version")["qemu"]["major"] == 10  # the other session is not disturbed
    b.close()


class Raw:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.buf = b""

    def line(self) -> dict[str, Any]:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        raw, self.buf = self.buf.split(b"\r\n", 1)
        raw.decode("ascii")
        return json.loads(raw)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def test_wire_protocol_details(cluster: dict[str, Any]) -> None:
    r = Raw(cluster["qmp"][0])
    try:
        assert "QMP" in r.line()
        r.send(b'{"execute": "query-status", "id": 1}')
        assert r.line() == {"error": {"class": "CommandNotFound",
                                      "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
                            "id": 1}
        r.send(b'{"execute": "qmp_capabilities"}')
        assert r.line() == {"return": {}}
        r.send(b'{"execute": "qmp_capabilities", "id": "again"}')
        assert r.line()["error"]["class"] == "CommandNotFound"
        # several commands in one write, ids of any JSON type echoed verbatim
        r.send(b'{"execute":"query-status","id":[1,{"a":null}]}{"execute":"query-version","id":2.5}')
        assert r.line()["id"] == [1, {"a": None}]
        assert r.line()["id"] == 2.5
        # a null id is echoed too; an absent one is not
        r.send(b'{"execute":"query-status","id":null}{"execute":"query-status"}')
        assert r.line() == {"return": {"status": "running", "running": True}, "id": None}
        assert r.line() == {"return": {"status": "running", "running": True}}
        # one command split over writes
        for part in (b'{"exec', b'ute": "query-st', b'atus", "id": "split"}'):
            r.send(part)
        assert r.line() == {"return": {"status": "running", "running": True}, "id": "split"}
        # malformed input: an error each, and the session goes on
        r.send(b'{"execute": }')
        assert "JSON parse error" in r.line()["error"]["desc"]
        r.send(b'[1, 2]')
        assert r.line()["error"]["desc"] == "QMP input must be a JSON object"
        r.send(b'{"execute": "query-status", "frobnicate": 1}')
        assert r.line()["error"]["desc"] == "QMP input member 'frobnicate' is unexpected"
        r.send(b'{"arguments": {}}')
        assert r.line()["error"]["desc"] == "QMP input lacks member 'execute'"
        r.send(b'{"execute": "query-status", "arguments": [1]}')
        assert r.line()["error"]["desc"] == "QMP input member 'arguments' must be an object"
        r.send(b'{"execute": "quer\xff')  # a byte no string may hold: an error, and the parser starts afresh
        assert r.line()["error"]["desc"] == "JSON parse error, stray '\"quer\\u00FF'"
        r.send(b'{"execute": "\xc3\x28"}')
        assert "UTF-8" in r.line()["error"]["desc"]
        r.send(b'{"execute": "query-status", "id": "\xc3\xa9t\xc3\xa9"}')
        reply = r.line()
        assert reply["id"] == "été"  # ASCII on the wire, escaped
        r.send(b'{"execute": "query-status", "id": "ok"}')
        assert r.line()["id"] == "ok"
    finally:
        r.close()


def test_huge_input_closes_only_that_session(cluster: dict[str, Any]) -> None:
    bad = Raw(cluster["qmp"][0])
    good = Raw(cluster["qmp"][0])
    try:
        bad.line()
        good.line()
        try:
            bad.send(b'{"execute": "qmp_capabilities", "id": "' + b"x" * (2 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may hang up before taking it all
        assert "larger than" in bad.line()["error"]["desc"]
        with pytest.raises((EOFError, ConnectionResetError)):
            bad.line()
        good.send(b'{"execute": "qmp_capabilities"}')
        assert good.line() == {"return": {}}
    finally:
        bad.close()
        good.close()


def test_qmp_shell_session(cluster: dict[str, Any]) -> None:
    shell = os.path.join(os.path.dirname(sys.executable), "qmp-shell")
    out = subprocess.run([shell, cluster["qmp"][0]], input="query-status\nquery-iothreads\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"running": true' in out.stdout and '"id": "io0"' in out.stdout


def test_tcp_monitor(clusters: Clusters, short_dir: str) -> None:
    _, ready = clusters.launch("--iothreads", "1", "--runtime-dir", short_dir,
                               "--chardev", "socket,id=m0,host=127.0.0.1,port=0,server=on,wait=off",
                               "--monitor", "chardev=m0")
    host, port = ready["qmp"][0].rsplit(":", 1)
    q = QEMUMonitorProtocol((host, int(port)))
    q.connect()
    assert q.cmd("query-status")["running"] is True
    q.close()


def test_blockstats_and_latency_histogram(cluster: dict[str, Any]) -> None:
    from iothreads import BlockClient, BlockIOError

    q = QEMUMonitorProtocol(cluster["qmp"][0])
    q.connect()
    try:
        q.cmd("blockdev-add", driver="file", **{"node-name": "disk0", "filename": cluster["image"]})
        assert q.cmd("query-blockstats") == []  # no device: only nodes, with query-nodes
        q.cmd("block-latency-histogram-set", id="disk0", boundaries=[10_000, 1_000_000])
        with BlockClient(cluster["runtime_dir"]) as c:
            for i in range(5):
                c.write("disk0", i * 4096, b"x" * 4096)
            for i in range(3):
                c.read("disk0", i * 4096, 4096)
            c.flush("disk0")
            with pytest.raises(BlockIOError):
                c.read("disk0", 1 << 40, 4096)  # out of range: invalid, as QEMU counts it
        stats = {s["node-name"]: s["stats"] for s in q.cmd("query-blockstats", **{"query-nodes": True})}
        d = stats["disk0"]
        assert (d["wr_operations"], d["wr_bytes"], d["rd_operations"], d["rd_bytes"]) == (5, 5 * 4096, 3, 3 * 4096)
        assert d["flush_operations"] == 1 and d["rd_total_time_ns"] > 0 and d["failed_rd_operations"] == 0
        assert d["invalid_rd_operations"] == 1 and d["rd_operations"] == 3
        hist = d["wr_latency_histogram"]
        assert hist["boundaries"] == [10_000, 1_000_000] and sum(hist["bins"]) == 5
        assert "null0" in stats
        err = q.cmd_obj({"execute": "block-latency-histogram-set", "arguments": {"id": "disk0",
                                                                                "boundaries": [5, 1]}})
        assert "sorted" in err["error"]["desc"]
        # More bins than a node's counters can carry: refused up front, not a query that never returns.
        err = q.cmd_obj({"execute": "block-latency-histogram-set",
                         "arguments": {"id": "disk0", "boundaries": list(range(1, 34))}})
        assert err["error"]["desc"] == "Parameter 'boundaries' takes at most 32 values"
        q.cmd("block-latency-histogram-set", id="disk0", boundaries=list(range(1, 33)))
        stats = {s["node-name"]: s["stats"] for s in q.cmd("query-blockstats", **{"query-nodes": True})}
        assert len(stats["disk0"]["rd_latency_histogram"]["bins"]) == 33
        # Regression: a boundary of 2**64 failed but was kept, and the next move never answered.
        err = q.cmd_obj({"execute": "block-latency-histogram-set",
                         "arguments": {"id": "disk0", "boundaries": [1, 2**64]}})
        assert "error" in err and "boundaries" in err["error"]["desc"], err
        q.cmd("x-blockdev-set-iothread", **{"node-name": "disk0", "iothread": "io1"})
        stats = {s["node-name"]: s["stats"] for s in q.cmd("query-blockstats", **{"query-nodes": True})}
        assert stats["disk0"]["rd_latency_histogram"]["boundaries"] == list(range(1, 33))  # unchanged
        # Arguments too large to pass on to an iothread: an error, and the monitor goes on.
        err = q.cmd_obj({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "long",
                                                                  "filename": "/" + "x" * 5000}})
        assert "would be refused by the peer" in err["error"]["desc"]
        assert "long" not in {n["node-name"] for n in q.cmd("query-named-block-nodes")}
    finally:
        q.close()


def test_command_error_paths_and_io_error_event(cluster: dict[str, Any]) -> None:
    from iothreads import BlockClient, BlockIOError

    q = QEMUMonitorProtocol(cluster["qmp"][0])
    q.connect()

    def error(name: str, **args: Any) -> dict[str, str]:
        reply = q.cmd_obj({"execute": name, "arguments": args})
        assert "error" in reply, reply
        return reply["error"]

    try:
        assert "duplicate" in error("object-add", **{"qom-type": "iothread", "id": "io0"})["desc"]
        assert "qom-type" in error("object-add", **{"qom-type": "memory-backend-ram", "id": "m"})["desc"]
        assert error("object-add", **{"qom-type": "iothread"})["desc"] == "Parameter 'id' is missing"
        assert "not found" in error("object-del", id="nope")["desc"]
        assert error("qom-get", path="/objects/nope", property="poll-max-ns")["class"] == "DeviceNotFound"
        assert "not found" in error("qom-get", path="/objects/io0", property="color")["desc"]
        assert "range [0, " in error("qom-set", path="/objects/io0", property="poll-grow", value=-1)["desc"]
        assert "node-name='ghost'" in error("blockdev-del", **{"node-name": "ghost"})["desc"]
        assert "Duplicate" in error("blockdev-add", driver="null-co", **{"node-name": "null0"})["desc"]
        assert "driver" in error("blockdev-add", driver="qcow2", **{"node-name": "q"})["desc"]
        assert "filename" in error("blockdev-add", driver="file", **{"node-name": "f"})["desc"]
        assert "could not open" in error("blockdev-add", driver="file",
                                         **{"node-name": "f", "filename": "/nonexistent/x.img"})["desc"]
        assert error("x-blockdev-set-iothread", **{"node-name": "null0", "iothread": "zz"})["desc"] == \
            "Cannot find iothread zz"
        # An I/O error in an iothread reaches the QMP session as BLOCK_IO_ERROR.
        q.cmd("blockdev-add", driver="file", **{"node-name": "disk0", "filename": cluster["image"]})
        os.truncate(cluster["image"], 4096)
        with BlockClient(cluster["runtime_dir"]) as c:
            with pytest.raises(BlockIOError):
                c.read("disk0", 2048, 4096)
        event = q.pull_event(wait=20.0)
        while event is not None and event["event"] != "BLOCK_IO_ERROR":
            event = q.pull_event(wait=20.0)
        assert event is not None
        assert event["data"]["node-name"] == "disk0" and event["data"]["operation"] == "read"
    finally:
        q.close()


def _session(path: str) -> Raw:
    """A raw QMP session past capabilities negotiation."""
    r = Raw(path)
    assert "QMP" in r.line()
    r.send(b'{"execute": "qmp_capabilities"}')
    assert r.line() == {"return": {}}
    return r


def _reply(r: Raw) -> dict[str, Any]:
    """The next reply on ``r``, events skipped."""
    while True:
        msg = r.line()
        if "event" not in msg:
            return msg


def _cmd(r: Raw, name: str, **args: Any) -> None:
    r.send(json.dumps({"execute": name, "arguments": args}).encode())


def test_commands_racing_on_two_sessions_all_get_answers(cluster: dict[str, Any]) -> None:
    """Regressions: each pair is sent on two sessions without waiting, so the
    second may be handled while the first waits for an iothread (whichever
    order the main loop sees them in, the assertions hold):
    object-add, then object-del of the iothread still starting: the add used to
    get no answer at all; two blockdev-add of one name: both used to succeed,
    leaving an orphan node; blockdev-add into an iothread, then object-del of
    it: both used to succeed and the node vanished."""
    a, b = _session(cluster["qmp"][0]), _session(cluster["qmp"][0])
    try:
        _cmd(a, "object-add", **{"qom-type": "iothread", "id": "io5"})
        _cmd(b, "object-del", id="io5")
        added, deleted = _reply(a), _reply(b)
        assert deleted == {"return": {}}
        assert added in ({"return": {}}, {"error": {"class": "GenericError", "desc": "iothread io5 failed to start"}})

        _cmd(a, "blockdev-add", driver="null-co", **{"node-name": "twice", "size": 4096, "iothread": "io0"})
        _cmd(b, "blockdev-add", driver="null-co", **{"node-name": "twice", "size": 4096, "iothread": "io1"})
        replies = [_reply(a), _reply(b)]
        assert replies.count({"return": {}}) == 1, replies
        assert {"error": {"class": "GenericError", "desc": "Duplicate nodes with node-name='twice'"}} in replies
        _cmd(a, "blockdev-del", **{"node-name": "twice"})
        assert _reply(a) == {"return": {}}
        for home in ("io0", "io1"):  # no orphan left in either iothread
            _cmd(a, "blockdev-add", driver="null-co", **{"node-name": "twice", "size": 4096, "iothread": home})
            assert _reply(a) == {"return": {}}
            _cmd(a, "blockdev-del", **{"node-name": "twice"})
            assert _reply(a) == {"return": {}}

        _cmd(a, "blockdev-add", driver="null-co", **{"node-name": "n1", "size": 4096, "iothread": "io1"})
        _cmd(b, "object-del", id="io1")
        assert _reply(a) == {"return": {}}
        assert _reply(b) == {"error": {"class": "GenericError",
                                       "desc": "iothread 'io1' is in use by block node(s) n1; move or delete them first"}}
        _cmd(a, "query-named-block-nodes")
        assert "n1" in {n["node-name"] for n in _reply(a)["return"]}
    finally:
        a.close()
        b.close()


def test_object_add_refuses_what_cannot_work(cluster: dict[str, Any]) -> None:
    """Regressions: an id too long for the runtime directory's socket paths
    left a half-made iothread whose deletion SIGKILLed the launcher's whole
    process group; a poll-max-ns of 2**64 was taken, and the iothread could not
    be reconfigured afterwards.  Both are refused; the monitor goes on."""
    r = _session(cluster["qmp"][0])
    try:
        long_id = "a" * 100
        _cmd(r, "object-add", **{"qom-type": "iothread", "id": long_id})
        err = _reply(r)["error"]
        assert err["class"] == "GenericError" and "cannot start" in err["desc"] and "107" in err["desc"]
        _cmd(r, "object-del", id=long_id)
        assert _reply(r)["error"]["desc"] == f"object '{long_id}' not found"
        _cmd(r, "object-add", **{"qom-type": "iothread", "id": "io9", "poll-max-ns": 1 << 64})
        assert "range [0, 9223372036854775807]" in _reply(r)["error"]["desc"]
        _cmd(r, "qom-set", path="/objects/io0", property="poll-grow", value=1 << 64)
        assert "range [0, 9223372036854775807]" in _reply(r)["error"]["desc"]
        _cmd(r, "query-iothreads")
        assert sorted(t["id"] for t in _reply(r)["return"]) == ["io0", "io1"]
    finally:
        r.close()
    assert cluster["proc"].poll() is None  # the launcher is alive (the fixture checks its clean exit)


def test_ten_thousand_pipelined_commands_in_one_write_all_get_answers(cluster: dict[str, Any]) -> None:
    """Regression: each command answered at once ran the next one from inside
    its answer, so a few hundred commands pipelined in one write ended in a
    RecursionError and most of them got no reply."""
    r = _session(cluster["qmp"][0])
    try:
        count = 10_000
        r.send(b"".join(b'{"execute": "query-status", "id": %d}' % i for i in range(count)))
        for i in range(count):
            assert r.line() == {"return": {"status": "running", "running": True}, "id": i}
        r.send(b'{"execute": "query-version", "id": "after"}')
        assert r.line()["id"] == "after"
    finally:
        r.close()


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def test_a_session_is_read_no_faster_than_it_is_answered(cluster: dict[str, Any]) -> None:
    """Regression: while one command waited for a stopped iothread, 24 MiB of
    pipelined commands took the launcher from 32 to 346 MiB, for good.  As
    QEMU stops reading a monitor once 8 commands are queued, the launcher
    stops reading the session: the rest waits in the peer's socket, the
    launcher's memory stays flat, and every command is answered in order once
    the iothread answers."""
    launcher = cluster["proc"].pid
    io0 = next(t["pid"] for t in cluster["iothreads"] if t["id"] == "io0")
    r = _session(cluster["qmp"][0])
    command = b'{"execute": "query-status"}'
    sent = 0
    try:
        rss_before = _rss_bytes(launcher)
        os.kill(io0, signal.SIGSTOP)
        try:
            _cmd(r, "query-blockstats", **{"query-nodes": True})  # null0's counters: io0 must answer
            r.sock.setblocking(False)
            burst = command * 4096
            while sent < 24 << 20:
                try:
                    sent += r.sock.send(burst[sent % len(command):])
                except BlockingIOError:
                    # Not taken now: the launcher may just be busy.  Not taken
                    # for 2 s while it sits idle: it stopped reading.
                    _, writable, _ = select.select([], [r.sock], [], 2.0)
                    if not writable:
                        break
            assert sent < 4 << 20, f"the launcher read {sent} bytes of a session whose first command waits"
            grown = _rss_bytes(launcher) - rss_before
            assert grown < 8 << 20, f"the launcher grew by {grown >> 20} MiB"
        finally:
            os.kill(io0, signal.SIGCONT)
        r.sock.setblocking(True)
        r.send(command[sent % len(command):] if sent % len(command) else b"")  # the last one whole
        commands = -(-sent // len(command))
        first = _reply(r)
        assert "return" in first and {s["node-name"] for s in first["return"]} == {"null0"}
        for _ in range(commands):
            assert _reply(r) == {"return": {"status": "running", "running": True}}
        _cmd(r, "query-version")
        assert _reply(r)["return"]["qemu"]["major"] == 10
    finally:
        r.close()


def test_a_peer_that_half_closes_gets_its_replies_and_is_read_no_more(cluster: dict[str, Any]) -> None:
    """Regression: at end of file the session's socket stayed watched for
    input while its replies waited for the peer to read them; end of file is
    always readable, so the main loop spun on it.  Now the monitor stops
    reading, the replies queued before still go out, then it closes."""
    a, b = _session(cluster["qmp"][0]), _session(cluster["qmp"][0])
    try:
        count = 5000  # replies of some MiB: more than socket buffers hold, under the session's output bound
        a.send(b"".join(b'{"execute": "query-commands", "id": %d}' % i for i in range(count)))
        a.sock.shutdown(socket.SHUT_WR)
        sources: list[str] = []

        def look() -> None:
            _cmd(b, "x-query-main-loop")
            sources[:] = [s["name"] for s in _reply(b)["return"]["sources"]]

        poll_until(look, lambda: sources.count("qmp session unix") == 1,
                   lambda: f"the half-closed session's input watch to go: {sources}", 30)
        assert "qmp output unix" in sources  # a's replies are still queued, a has read none
        for i in range(count):
            reply = a.line()
            assert reply["id"] == i and {"name": "quit"} in reply["return"]
        with pytest.raises(EOFError):
            a.line()
        _cmd(b, "query-status")
        assert _reply(b) == {"return": {"status": "running", "running": True}}
    finally:
        a.close()
        b.close()


def test_a_peer_that_half_closes_after_commands_that_wait_gets_every_answer(cluster: dict[str, Any]) -> None:
    """Regression: end of file right after a command that waits for an
    iothread (a script piping its commands, then shutting down its writing
    side) lost that command's answer and every command after it."""
    r = _session(cluster["qmp"][0])
    try:
        r.send(b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n9", '
               b'"iothread": "io0"}, "id": 1}{"execute": "query-blockstats", "arguments": {"query-nodes": true}, '
               b'"id": 2}{"execute": "blockdev-del", "arguments": {"node-name": "n9"}, "id": 3}')
        r.sock.shutdown(socket.SHUT_WR)
        assert _reply(r) == {"return": {}, "id": 1}
        stats = _reply(r)
        assert stats["id"] == 2 and {s["node-name"] for s in stats["return"]} == {"null0", "n9"}
        assert _reply(r) == {"return": {}, "id": 3}
        with pytest.raises(EOFError):
            r.line()
    finally:
        r.close()


def test_async_client_many_commands_in_flight(cluster: dict[str, Any]) -> None:
    """qemu.qmp sends every execute at once and matches the replies by id: each gets its own."""
    async def scenario() -> None:
        qmp = QMPClient("test")
        await qmp.connect(cluster["qmp"][0])
        try:
            names = ["query-status", "query-version", "query-iothreads"] * 700
            results = await asyncio.wait_for(asyncio.gather(*(qmp.execute(name) for name in names)), 60)
            for name, result in zip(names, results, strict=True):
                if name == "query-status":
                    assert result == {"status": "running", "running": True}
                elif name == "query-version":
                    assert result["qemu"]["major"] == 10
                else:
                    assert [t["id"] for t in result] == ["io0", "io1"]
        finally:
            await qmp.disconnect()

    asyncio.run(scenario())
