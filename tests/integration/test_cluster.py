"""The cluster with real iothread processes: start, query, change poll
parameters, stop; an iothread killed with SIGKILL is reported while the
others keep answering; restart when configured."""

from __future__ import annotations

import os
import signal

import pytest

from mainloop import Cluster, IOThreadConfig, IOThreadState, bql
from protocol import ErrorReply, QueryReply, StateError

from .support import START_S, Clusters


@pytest.fixture
def cluster(clusters: Clusters) -> Cluster:
    """A cluster with no iothread yet: the tests add theirs, after their listeners."""
    return clusters.start(heartbeat_interval_ms=200)


def query_all(c: Cluster, ids: list[str]) -> dict[str, QueryReply | ErrorReply]:
    replies: dict[str, QueryReply | ErrorReply] = {}
    for i in ids:
        c.query(i, lambda r, i=i: replies.__setitem__(i, r))
    assert c.wait_for(lambda: len(replies) == len(ids), 10)
    return replies


def test_four_iothreads_started_queried_and_stopped(cluster: Cluster) -> None:
    ids = [f"io{i}" for i in range(4)]
    events: list[tuple[str, dict[str, object]]] = []
    cluster.add_listener(lambda name, data: events.append((name, data)))
    with bql():
        for i in ids:
            cluster.add(IOThreadConfig(i, poll_max_ns=1000 * (int(i[2:]) + 1)))
        assert cluster.wait_for(cluster.all_running, START_S)
        replies = query_all(cluster, ids)
        for n, i in enumerate(ids):
            r = replies[i]
            assert isinstance(r, QueryReply)
            assert r.counters["pid"] == cluster.iothreads[i].pid
            assert r.counters["poll_max_ns"] == 1000 * (n + 1)
            assert r.counters["iterations"] > 0
        pids = {i: cluster.iothreads[i].pid for i in ids}
        assert len(set(pids.values())) == 4 and os.getpid() not in pids.values()
        assert sorted(d["id"] for name, d in events if name == "IOTHREAD_READY") == ids
        cluster.stop("io2")
        assert cluster.wait_for(lambda: cluster.iothreads["io2"].state is IOThreadState.EXITED, 10)
        assert cluster.iothreads["io2"].exit_status == 0
        assert not any(name == "IOTHREAD_EXITED" for name, _ in events)  # asked for: not an incident
        with pytest.raises(StateError):
            cluster.query("io2", lambda r: None)
        assert isinstance(query_all(cluster, ["io0", "io1", "io3"])["io3"], QueryReply)


def test_poll_parameters_change_while_running(cluster: Cluster) -> None:
    with bql():
        cluster.add(IOThreadConfig("io0"))
        assert cluster.wait_for(cluster.all_running, START_S)
        got: list[QueryReply | ErrorReply] = []
        cluster.set_poll_params("io0", got.append, poll_max_ns=4096, poll_grow=4, poll_shrink=2,
                                aio_max_batch=16)
        assert cluster.wait_for(lambda: bool(got), 10)
        reply = got[0]
        assert isinstance(reply, QueryReply)
        assert (reply.counters["poll_max_ns"], reply.counters["poll_grow"], reply.counters["poll_shrink"],
                reply.counters["aio_max_batch"]) == (4096, 4, 2, 16)
        assert cluster.iothreads["io0"].config.poll_grow == 4


def test_sigkill_is_reported_and_the_others_keep_answering(cluster: Cluster) -> None:
    """An iothread killed with SIGKILL (no goodbye on the channel) is reported
    as an unexpected exit, with its signal, by the watch on its pidfd."""
    events: list[tuple[str, dict[str, object]]] = []
    cluster.add_listener(lambda name, data: events.append((name, data)))
    with bql():
        for i in ("io0", "io1", "io2"):
            cluster.add(IOThreadConfig(i))
        assert cluster.wait_for(cluster.all_running, START_S)
        victim = cluster.iothreads["io1"]
        os.kill(victim.pid, signal.SIGKILL)
        assert cluster.wait_for(lambda: any(n == "IOTHREAD_EXITED" for n, _ in events), START_S)
        [(_, data)] = [e for e in events if e[0] == "IOTHREAD_EXITED"]
        assert data == {"id": "io1", "pid": victim.pid, "exit-code": -signal.SIGKILL, "expected": False}
        assert victim.state is IOThreadState.EXITED
        replies = query_all(cluster, ["io0", "io2"])
        assert all(isinstance(r, QueryReply) for r in replies.values())


def test_restart_when_configured(cluster: Cluster) -> None:
    events: list[str] = []
    cluster.add_listener(lambda name, data: events.append(name))
    with bql():
        t = cluster.add(IOThreadConfig("io0", restart=True))
        assert cluster.wait_for(cluster.all_running, START_S)
        first_pid = t.pid
        os.kill(first_pid, signal.SIGKILL)
        assert cluster.wait_for(lambda: t.restarts == 1 and t.state is IOThreadState.RUNNING, START_S)
        assert t.pid != first_pid
        assert events.count("IOTHREAD_EXITED") == 1 and "IOTHREAD_RESTARTED" in events
        assert isinstance(query_all(cluster, ["io0"])["io0"], QueryReply)


def test_restarts_back_off_and_stop_cancels_a_pending_one(cluster: Cluster) -> None:
    """An iothread that keeps dying soon after it starts is restarted at once
    the first time, then after a growing delay (no respawning in a tight loop);
    stopping it meanwhile cancels the restart to come."""
    with bql():
        t = cluster.add(IOThreadConfig("io0", restart=True))
        assert cluster.wait_for(cluster.all_running, START_S)
        for n in (1, 2):
            os.kill(t.pid, signal.SIGKILL)
            assert cluster.wait_for(lambda n=n: t.restarts == n and t.state is IOThreadState.RUNNING, START_S)
        assert t.quick_exits == 2
        os.kill(t.pid, signal.SIGKILL)
        assert cluster.wait_for(lambda: t.state is IOThreadState.EXITED, START_S)
        assert t._restart is not None and t._restart.pending  # delayed: 200 ms
        cluster.stop("io0")
        assert t._restart is None
        assert not cluster.wait_for(lambda: t.state is not IOThreadState.EXITED, 0.5)
        assert t.restarts == 2


def test_duplicate_ids_are_refused(cluster: Cluster) -> None:
    with bql():
        cluster.add(IOThreadConfig("io0"))
        with pytest.raises(StateError, match="already exists"):
            cluster.add(IOThreadConfig("io0"))


def test_an_iothread_exit_is_handled_even_if_a_pending_reply_callback_raises(clusters: Clusters) -> None:
    """Regression: a reply callback that raised, called for a request pending
    when its iothread exited, stopped the handling of that exit (the other
    callbacks, the exit callbacks, the IOTHREAD_EXITED event)."""
    c = clusters.start()
    events: list[str] = []
    with bql():
        c.add_listener(lambda name, data: events.append(name))
        t = c.add(IOThreadConfig("io0"))
        assert c.wait_for(c.all_running, START_S)

        def bad(reply: object) -> None:
            raise RuntimeError("callback failed")

        c.query("io0", bad)  # may be answered before or after the kill: either way it raises
        os.kill(t.pid, signal.SIGKILL)
        assert c.wait_for(lambda: "IOTHREAD_EXITED" in events, 10)


def test_iothreads_are_capped_however_they_are_added(clusters: Clusters) -> None:
    """Regression: the command line capped iothreads at 256, QMP's object-add
    at nothing.  The cap is the cluster's: an iothread past it is refused
    before any process starts, and an exited one makes room again."""
    cluster = clusters.start("io0", max_iothreads=1)
    with bql():
        with pytest.raises(ValueError, match="at most 1 iothreads"):
            cluster.add(IOThreadConfig("io1"))
        assert set(cluster.iothreads) == {"io0"}
        os.kill(cluster.iothreads["io0"].pid, signal.SIGKILL)
        assert cluster.wait_for(lambda: cluster.iothreads["io0"].state is IOThreadState.EXITED, START_S)
        cluster.add(IOThreadConfig("io1"))
        assert cluster.wait_for(lambda: cluster.iothreads["io1"].state is IOThreadState.RUNNING, START_S)
