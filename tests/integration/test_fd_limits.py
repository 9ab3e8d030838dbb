"""No peer can kill a process by opening connections: under ``ulimit -n 200``
(soft and hard: nothing to raise), QMP sessions and data-plane clients past
what a process can afford are refused, clearly, with a QMP event, and every
process lives on, serving what it had and taking new work once some leave.

Regressions: at its descriptor limit libzmq aborted the launcher (180 QMP
sessions, then ``object-add``: its new iothread's connection) and an
iothread (~185 idle data-plane clients); the whole cluster went down."""

from __future__ import annotations

import errno
import json
import os
import socket
from typing import Any

import pytest
import zmq

from iothreads import BlockClient, BlockIOError
from iothreads.testing import poll_until

from .support import Clusters
from .test_qmp import Raw, _cmd, _reply, _session

FD_LIMIT = 200


@pytest.fixture
def cluster(clusters: Clusters, request: pytest.FixtureRequest) -> dict[str, Any]:
    """A launcher and two iothreads under ``ulimit -n 200`` (or the test's
    parameter); null0 in io0."""
    run = os.path.join(clusters.scratch_dir, "run")
    proc, ready = clusters.launch("--iothreads", "2", "--runtime-dir", run,
                                  "--blockdev", "driver=null-co,node-name=null0,size=1M,iothread=io0",
                                  fd_limit=getattr(request, "param", FD_LIMIT))
    return {**ready, "proc": proc}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _event(r: Raw, name: str) -> dict[str, Any]:
    """The next event ``name`` on ``r`` (replies and other events skipped)."""
    while True:
        msg = r.line()
        if msg.get("event") == name:
            return msg


@pytest.mark.parametrize("cluster", [150], indirect=True)  # under the cap of 128 sessions: the descriptors run out first
def test_qmp_sessions_past_the_launchers_descriptors_are_refused(cluster: dict[str, Any]) -> None:
    path = cluster["qmp"][0]
    watcher = _session(path)  # negotiated first: it gets the event
    sessions: list[socket.socket] = []
    refusal: dict[str, Any] | None = None
    try:
        for _ in range(FD_LIMIT + 50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(20)
            s.connect(path)
            sessions.append(s)
            first = json.loads(s.makefile("rb").readline())
            if "error" in first:
                refusal = first
                break
            assert "QMP" in first
        assert refusal is not None, f"{len(sessions)} sessions all taken under ulimit -n {FD_LIMIT}"
        desc = refusal["error"]["desc"]
        assert desc.startswith("QMP session refused: too many open files") and "kept for its own work" in desc
        assert sessions[-1].recv(100) == b""  # then closed
        event = _event(watcher, "RESOURCE_LIMIT_REACHED")["data"]
        assert event["resource"] == "qmp-sessions" and "too many open files" in event["reason"]
        # The launcher keeps descriptors for its own work: a new iothread starts and serves.
        _cmd(watcher, "object-add", **{"qom-type": "iothread", "id": "io7"})
        assert _reply(watcher) == {"return": {}}
        _cmd(watcher, "query-iothreads")
        assert [t["id"] for t in _reply(watcher)["return"]] == ["io0", "io1", "io7"]
        _cmd(watcher, "object-del", id="io7")
        assert _reply(watcher) == {"return": {}}
        # Sessions left (once the launcher has seen them go): new ones are taken again.
        for s in sessions:
            s.close()
        sessions.clear()
        greeting: list[dict[str, Any]] = []

        def connect() -> None:
            r = Raw(path)
            greeting[:] = [r.line()]
            r.close()

        poll_until(connect, lambda: bool(greeting) and "QMP" in greeting[0], "a new session to be taken", 20)
        again = _session(path)
        _cmd(again, "query-status")
        assert _reply(again)["return"]["running"] is True
        again.close()
    finally:
        for s in sessions:
            s.close()
        watcher.close()
    assert cluster["proc"].poll() is None and all(_alive(t["pid"]) for t in cluster["iothreads"])


def test_data_clients_past_an_iothreads_descriptors_are_refused(cluster: dict[str, Any]) -> None:
    run = cluster["runtime_dir"]
    io0 = next(t for t in cluster["iothreads"] if t["id"] == "io0")
    watcher = _session(cluster["qmp"][0])
    zctx = zmq.Context()
    hogs: list[zmq.Socket[Any]] = []
    try:
        with BlockClient(run, timeout_s=20) as first:
            assert first.read("null0", 0, 512) == bytes(512)  # connected before the flood
            for _ in range(FD_LIMIT + 50):  # more than io0 has descriptors, all at once
                d = zctx.socket(zmq.DEALER)
                d.setsockopt(zmq.LINGER, 0)
                d.connect(io0["data"])
                hogs.append(d)
            event = _event(watcher, "RESOURCE_LIMIT_REACHED")["data"]
            assert event["resource"] == "data-connections" and event["iothread"] == "io0"
            assert "too many open files for data-plane clients" in event["reason"]
            with pytest.raises(BlockIOError) as info:
                with BlockClient(run, timeout_s=5) as late:
                    late.read("null0", 0, 512)
            assert info.value.errno == errno.ECONNREFUSED and "takes no new clients now" in str(info.value)
            assert first.read("null0", 512, 512) == bytes(512)  # those connected are served
            # The clients leave: io0 listens again (checked at its next heartbeat at the latest).
            for d in hogs:
                d.close()
            hogs.clear()

            def read_anew() -> bool:
                try:
                    with BlockClient(run, timeout_s=5) as anew:
                        return anew.read("null0", 0, 512) == bytes(512)
                except BlockIOError:
                    return False

            poll_until(lambda: None, read_anew, "io0 to take new clients again", 30)
    finally:
        for d in hogs:
            d.close()
        zctx.term()
        watcher.close()
    assert _alive(io0["pid"]) and cluster["proc"].poll() is None


def test_block_nodes_past_an_iothreads_descriptors_are_refused(cluster: dict[str, Any], clusters: Clusters) -> None:
    image = clusters.image(1 << 20)
    r = _session(cluster["qmp"][0])
    try:
        added = 0
        for i in range(FD_LIMIT + 10):
            _cmd(r, "blockdev-add", driver="file", filename=image, iothread="io1", **{"node-name": f"f{i}"})
            reply = _reply(r)
            if "error" in reply:
                assert reply["error"]["desc"].startswith("too many open files for block node 'f%d'" % i), reply
                break
            added += 1
        else:
            raise AssertionError(f"{added} file nodes all opened under ulimit -n {FD_LIMIT}")
        assert added > 100  # what the limit leaves, less what the process itself has open
        _cmd(r, "query-named-block-nodes")
        assert len(_reply(r)["return"]) == added + 1  # null0 too
        for i in range(added):
            _cmd(r, "blockdev-del", **{"node-name": f"f{i}"})
            assert _reply(r) == {"return": {}}
    finally:
        r.close()
    assert all(_alive(t["pid"]) for t in cluster["iothreads"])
