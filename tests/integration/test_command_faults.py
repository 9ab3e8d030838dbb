"""A command that fails changes nothing, and no exception in one of its
continuations leaves it unanswered.

Faults are injected into every continuation of every QMP command, one at a
time: the k-th continuation (its first step is the 0th: running the command;
then replies from iothreads, an iothread's exit, a cluster event) raises,
for k = 0, 1, ... until the command completes without reaching the k-th.
Each time the command must get exactly one answer, an error; the session must
answer the next command; the cluster's registry must be what it was before
(or what the iothreads really hold, where the command got that far: a node
in the home a move took it to, an iothread that exited), and agree with the
iothreads, asked directly; and the iothreads must still run.

One cluster (io0, io1, and a node ``base0`` in io1 with a latency histogram)
and one monitor, in this process, serve the whole module; a real QMP client
(qemu.qmp's QMPClient) talks to the monitor from a thread of its own while
the main loop runs here.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from qemu.qmp import ExecuteError, QMPClient

from iothreads.testing import poll_until
from mainloop import Cluster, IOThreadState, bql
from mainloop.cluster import _cluster
from mainloop.cluster._guard import Guard, GuardState
from mainloop.qmp import Monitor
from protocol import ErrorReply, QueryReply, replace_file
from protocol.schema import COMMANDS

from .support import Clusters

ANSWER_S = 20.0
"""Bound on any one answer (a QMP command, an iothread's query)."""

T = TypeVar("T")


class InjectedFault(Exception):
    """What an injected continuation raises."""


class Client:
    """A QMP client (qemu.qmp's QMPClient) on an asyncio loop in a thread of
    its own; while it waits for the monitor, the main loop runs here, under
    the BQL, until the answer (the client's thread wakes it)."""

    def __init__(self, cluster: Cluster, path: str, *, negotiate: bool = True) -> None:
        self.cluster = cluster
        self._aloop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._aloop.run_forever, name="qmp-client", daemon=True)
        self._thread.start()
        self.qmp = QMPClient("faults")
        self.qmp.negotiate = negotiate
        self.run(self.qmp.connect(path))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, ANSWER_S), self._aloop)
        future.add_done_callback(lambda _f: self.cluster.loop.notify_event())
        with bql():
            self.cluster.wait_for(future.done, ANSWER_S + 5)
        assert future.done(), "the QMP client got no answer in time"
        return future.result()

    def execute(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """The command's reply: ``{"return": ...}`` or ``{"error": ...}``."""
        async def call() -> dict[str, Any]:
            try:
                return {"return": await self.qmp.execute(name, args)}
            except ExecuteError as exc:
                return {"error": {"class": exc.error_class, "desc": str(exc)}}
        return self.run(call())

    def ok(self, name: str, args: dict[str, Any] | None = None) -> Any:
        reply = self.execute(name, args)
        assert "return" in reply, (name, args, reply)
        return reply["return"]

    def close(self) -> None:
        try:
            self.run(self.qmp.disconnect())
        finally:
            self._aloop.call_soon_threadsafe(self._aloop.stop)
            self._thread.join(ANSWER_S)
            self._aloop.close()


@dataclass
class Harness:
    """The module's cluster and what the tests read of it."""

    cluster: Cluster
    monitor: Monitor
    path: str
    client: Client
    pids: dict[str, int]  # io0's and io1's, which must never change
    quits: list[int] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)  # the commands the monitor ran, in order
    answers: list[int] = field(default_factory=list)  # their answers, by index in ``issued``
    baseline: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def module_cluster() -> Iterator[Harness]:
    """io0 and io1, base0 in io1 with a histogram, the monitor and its client:
    the module's, left at the baseline by each test (``reset``)."""
    scratch = tempfile.mkdtemp(prefix="evt", dir="/tmp")  # short: socket paths
    clusters = Clusters(scratch)
    try:
        cluster = clusters.start("io0", "io1")
        quits: list[int] = []
        issued: list[str] = []
        answers: list[int] = []
        with bql():
            monitor = Monitor(cluster, on_quit=lambda: quits.append(1))
            path = monitor.listen_unix(os.path.join(scratch, "qmp.sock"))
        execute = monitor.execute

        def counted(name: str, args: dict[str, Any], done: Callable[[Any], None]) -> None:
            def answer(result: Any, index: int = len(issued)) -> None:
                answers.append(index)
                done(result)
            issued.append(name)
            execute(name, args, answer)

        monitor.execute = counted  # type: ignore[method-assign]
        client = Client(cluster, path)
        try:
            s = Harness(cluster, monitor, path, client, {i: cluster.iothreads[i].pid for i in ("io0", "io1")},
                      quits, issued, answers)
            client.ok("blockdev-add", {"driver": "null-co", "node-name": "base0", "size": 1 << 20,
                                       "iothread": "io1"})
            client.ok("block-latency-histogram-set", {"id": "base0", "boundaries": [7]})
            s.baseline = registry(s)
            yield s
        finally:
            client.close()
            with bql():
                monitor.close()
    finally:
        clusters.close()
        shutil.rmtree(scratch, ignore_errors=True)


# -- the cluster's state, as QMP and the registry say, and as the iothreads do -----

NODE_NAMES = ("base0", "n0")
"""Every node the tests make."""


def registry(s: Harness) -> dict[str, Any]:
    """What the monitor and the cluster's registry say: nodes and their homes,
    running iothreads and their parameters, histogram settings, the NBD
    server and its exports."""
    nodes = {n["node-name"]: n["iothread"] for n in s.client.ok("query-named-block-nodes")}
    threads = {t["id"]: (t["poll-max-ns"], t["poll-grow"], t["poll-shrink"], t["aio-max-batch"])
               for t in s.client.ok("query-iothreads")}
    exports = [(e["id"], e["node-name"], e["shutting-down"]) for e in s.client.ok("query-block-exports")]
    with bql():
        histograms = {name: info.histogram for name, info in s.cluster.nodes.items()}
        nbd = s.monitor.nbd.running
    return {"nodes": nodes, "iothreads": threads, "histograms": histograms, "nbd": nbd, "exports": exports}


def ask(cluster: Cluster, iothread_id: str, node: str = "") -> QueryReply | ErrorReply:
    """An iothread's own answer: its counters, or a node's (an error if it does not hold it)."""
    replies: list[QueryReply | ErrorReply] = []
    with bql():
        cluster.query(iothread_id, replies.append, node)
        assert cluster.wait_for(lambda: bool(replies), ANSWER_S), f"{iothread_id} did not answer"
    return replies[0]


def check_consistent(s: Harness) -> None:
    """The registry says what the iothreads hold, nothing is left half-done,
    and io0 and io1 are the processes they were, answering."""
    c = s.cluster
    with bql():
        assert c._adding == {}
        assert all(n.moving_to is None and not n.detached for n in c.nodes.values()), c.nodes
        running = [t for t in c.iothreads.values() if t.state is IOThreadState.RUNNING]
        nodes = {name: (n.iothread, n.histogram) for name, n in c.nodes.items()}
    assert {t.id: t.pid for t in running if t.id in s.pids} == s.pids
    for t in running:
        counters = ask(c, t.id)
        assert isinstance(counters, QueryReply), counters
        cfg = t.config
        assert [counters.counters[k] for k in ("poll_max_ns", "poll_grow", "poll_shrink", "aio_max_batch")] == \
            [cfg.poll_max_ns, cfg.poll_grow, cfg.poll_shrink, cfg.aio_max_batch], t.id
        for name in NODE_NAMES:
            reply = ask(c, t.id, name)
            here = name in nodes and nodes[name][0] == t.id
            assert isinstance(reply, QueryReply) == here, (t.id, name, nodes, reply)
            if here and isinstance(reply, QueryReply):
                histogram = nodes[name][1]
                bins = sum(1 for k in reply.counters if k.startswith("rd_histogram_"))
                assert bins == (len(histogram) + 1 if histogram else 0), (name, histogram, reply.counters)


def reset(s: Harness) -> None:
    """Back to the baseline: no node but base0, no iothread but io0 and io1,
    their first parameters."""
    q = s.client
    now = registry(s)
    for export_id, _, _ in now["exports"]:
        q.ok("block-export-del", {"id": export_id})
    if now["nbd"]:
        q.ok("nbd-server-stop")
    for name in now["nodes"]:
        if name != "base0":
            q.ok("blockdev-del", {"node-name": name})
    for iothread_id, params in now["iothreads"].items():
        if iothread_id not in s.pids:
            q.ok("object-del", {"id": iothread_id})
        elif params != s.baseline["iothreads"][iothread_id]:
            for prop, value in zip(("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"),
                                   s.baseline["iothreads"][iothread_id]):
                q.ok("qom-set", {"path": f"/objects/{iothread_id}", "property": prop, "value": value})
    assert registry(s) == s.baseline


# -- the commands: how each is run to completion, and what a failure may leave ------

def add_n0(s: Harness) -> None:
    s.client.ok("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 4096, "iothread": "io0"})


def add_n0_with_histogram(s: Harness) -> None:
    add_n0(s)
    s.client.ok("block-latency-histogram-set", {"id": "n0", "boundaries": [5, 50]})


NBD_SERVER = {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}}


def start_nbd(s: Harness) -> None:
    s.client.ok("nbd-server-start", NBD_SERVER)


def export_base0(s: Harness) -> None:
    start_nbd(s)
    s.client.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "base0"})


def add_io9(s: Harness) -> None:
    s.client.ok("object-add", {"qom-type": "iothread", "id": "io9"})


@dataclass(frozen=True)
class Scenario:
    args: dict[str, Any]
    continuations: int  # how many the command runs, its first step included
    prepare: Callable[[Harness], None] = lambda s: None  # from the baseline
    also_consistent: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """The registry a failure may leave instead of the one before: where the
    command got that far in reality (from the one before)."""
    fresh_session: bool = False  # run in a session not negotiated yet


def moved_to_io1(before: dict[str, Any]) -> dict[str, Any]:
    return {**before, "nodes": {**before["nodes"], "n0": "io1"}}


def without_io9(before: dict[str, Any]) -> dict[str, Any]:
    return {**before, "iothreads": {k: v for k, v in before["iothreads"].items() if k != "io9"}}


SCENARIOS: dict[str, Scenario] = {
    "qmp_capabilities": Scenario({}, 1, fresh_session=True),
    "query-version": Scenario({}, 1),
    "query-commands": Scenario({}, 1),
    "query-status": Scenario({}, 1),
    "quit": Scenario({}, 1),
    "cont": Scenario({}, 3),  # then each iothread's answer (nothing held: nothing to undo)
    "query-iothreads": Scenario({}, 1),
    "object-add": Scenario({"qom-type": "iothread", "id": "io9"}, 2),  # then its IOTHREAD_READY
    "object-del": Scenario({"id": "io9"}, 2, add_io9, without_io9),  # then its exit
    "qom-get": Scenario({"path": "/objects/io0", "property": "poll-grow"}, 1),
    "qom-set": Scenario({"path": "/objects/io0", "property": "poll-grow", "value": 3}, 2),
    "blockdev-add": Scenario({"driver": "null-co", "node-name": "n0", "size": 4096, "iothread": "io0"}, 2),
    "blockdev-del": Scenario({"node-name": "n0"}, 2, add_n0),
    "query-named-block-nodes": Scenario({}, 1),
    # The old home lets it go, then the new home opens it:
    "x-blockdev-set-iothread": Scenario({"node-name": "n0", "iothread": "io1"}, 3, add_n0_with_histogram,
                                        moved_to_io1),
    "x-query-main-loop": Scenario({}, 1),
    "query-blockstats": Scenario({"query-nodes": True}, 3, add_n0),  # one reply per node
    "block-latency-histogram-set": Scenario({"id": "n0", "boundaries": [10, 100]}, 2, add_n0_with_histogram),
    "nbd-server-start": Scenario(NBD_SERVER, 1),
    "nbd-server-stop": Scenario({}, 1, export_base0),  # no client connected: nothing to wait for
    "block-export-add": Scenario({"type": "nbd", "id": "e0", "node-name": "base0"}, 1, start_nbd),
    "block-export-del": Scenario({"id": "e0"}, 1, export_base0),
    "query-block-exports": Scenario({}, 1, export_base0),
}


def test_every_command_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(COMMANDS)


@dataclass
class Injector:
    """Makes the k-th continuation of one command raise (``Guard.step``, the
    path of every continuation, patched), and counts them."""

    command: str = ""
    k: int = -1
    seen: int = 0
    fault: InjectedFault | None = None

    def arm(self, command: str, k: int) -> None:
        self.command, self.k, self.seen, self.fault = command, k, 0, None

    def disarm(self) -> None:
        self.command = ""


@pytest.fixture
def injector(monkeypatch: pytest.MonkeyPatch) -> Injector:
    injector = Injector()
    step = Guard.step

    def injected(guard: Guard, fn: Callable[[], object]) -> None:
        if guard.name == injector.command and guard.state is GuardState.RUNNING:
            injector.seen += 1
            if injector.seen - 1 == injector.k:
                injector.fault = InjectedFault(f"continuation {injector.k} of {guard.name}")
                raise injector.fault
        step(guard, fn)

    monkeypatch.setattr(Guard, "step", injected)
    return injector


@pytest.mark.parametrize("command", sorted(SCENARIOS))
def test_a_fault_in_any_continuation_answers_and_changes_nothing(
        module_cluster: Harness, injector: Injector, command: str, caplog: pytest.LogCaptureFixture) -> None:
    s, scenario = module_cluster, SCENARIOS[command]
    k = 0
    while True:
        reset(s)
        scenario.prepare(s)
        before = registry(s)
        quits = len(s.quits)
        client = Client(s.cluster, s.path, negotiate=False) if scenario.fresh_session else s.client
        try:
            caplog.clear()
            injector.arm(command, k)
            reply = client.execute(command, scenario.args)
            injector.disarm()
            if injector.fault is None:  # it completed without reaching the k-th
                assert "return" in reply, reply
                assert k == scenario.continuations, f"{command} ran {k} continuations"
                break
            assert reply == {"error": {"class": "GenericError",
                                       "desc": f"Internal error in '{command}': InjectedFault: {injector.fault}"}}
            # The session goes on.
            if scenario.fresh_session:
                assert client.execute(command) == {"return": {}}
            assert client.execute("query-status") == {"return": {"status": "running", "running": True}}
        finally:
            injector.disarm()
            if client is not s.client:
                client.close()
        # Logged once, with its traceback.
        logged = [r for r in caplog.records if r.exc_info is not None and r.exc_info[1] is injector.fault]
        assert len(logged) == 1, [r.getMessage() for r in caplog.records]
        # Nothing changed, or what changed is what the iothreads hold.
        after = registry(s)
        allowed = [before] + ([scenario.also_consistent(before)] if scenario.also_consistent else [])
        assert after in allowed, (command, k, before, after)
        check_consistent(s)
        assert len(s.quits) == quits
        # Every command the monitor ran got exactly one answer.
        assert sorted(s.answers) == list(range(len(s.issued))), (s.issued, s.answers)
        k += 1
    reset(s)
    check_consistent(s)


def test_a_continuation_that_raises_after_a_partial_change_is_answered_and_undone(
        module_cluster: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state a continuation changed before it raised is undone too: the
    publication of the new state is made to raise once, after the registry
    took the change (a node recorded, forgotten, moved home)."""
    s = module_cluster
    write_state = s.cluster.write_state
    raised: list[str] = []

    def once(command: str) -> Callable[[], None]:
        def write() -> None:
            if not raised:
                raised.append(command)
                raise RuntimeError("the state cannot be published")
            write_state()
        return write

    cases: list[tuple[str, dict[str, Any], Callable[[Harness], None], dict[str, str]]] = [
        ("blockdev-add", SCENARIOS["blockdev-add"].args, lambda s: None, {"base0": "io1"}),
        ("blockdev-del", {"node-name": "n0"}, add_n0, {"base0": "io1", "n0": "io0"}),
        # The new home holds it when the registry's update fails: recorded there.
        ("x-blockdev-set-iothread", {"node-name": "n0", "iothread": "io1"}, add_n0_with_histogram,
         {"base0": "io1", "n0": "io1"}),
    ]
    for command, args, prepare, nodes in cases:
        reset(s)
        prepare(s)
        raised.clear()
        monkeypatch.setattr(s.cluster, "write_state", once(command))
        reply = s.client.execute(command, args)
        monkeypatch.setattr(s.cluster, "write_state", write_state)
        assert raised == [command]
        assert reply == {"error": {"class": "GenericError", "desc": f"Internal error in '{command}': "
                                                                    "RuntimeError: the state cannot be published"}}
        assert registry(s)["nodes"] == nodes
        check_consistent(s)
    reset(s)


def test_the_state_file_cannot_be_written_and_the_command_succeeds_all_the_same(
        module_cluster: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """ENOSPC on cluster.json does not fail a command that the iothreads
    carried out: the file is logged, rate-limited, and written again at a
    heartbeat once it can be."""
    s = module_cluster
    reset(s)
    refusals: list[str] = []

    def full(path: str, data: bytes) -> None:
        refusals.append(path)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_cluster, "replace_file", full)
    add_n0(s)  # succeeds
    assert refusals and registry(s)["nodes"] == {"base0": "io1", "n0": "io0"}
    assert any("No space left on device" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(_cluster, "replace_file", replace_file)
    state = os.path.join(s.cluster.runtime_dir, "cluster.json")

    def published() -> bool:
        with open(state, encoding="utf-8") as f:
            return "n0" in json.load(f)["nodes"]

    with bql():
        poll_until(lambda: s.cluster.loop.main_loop_wait(), published, "cluster.json written again", ANSWER_S)
    reset(s)
    check_consistent(s)
