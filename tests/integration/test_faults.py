"""Faults around the processes of a cluster: an iothread takes signals as any
process does, ends once its main loop's process is gone, and outlives a main
loop that is merely stopped; a main loop back from a stop does not take its
own absence for its iothreads' silence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from iothreads import BlockClient
from iothreads.testing import wait_until
from mainloop import EmbeddedCluster, bql
from mainloop.cluster import HEARTBEAT_INTERVAL_MS
from protocol import ErrorReply, QueryReply

from .support import COMMAND, GONE_S, STOP_S, Clusters, descendants, janitor_of, wait_gone

PAUSE_S = 8 * HEARTBEAT_INTERVAL_MS / 1000
"""How long a launcher is stopped: eight heartbeat periods (the watchdog that
used to end its iothreads did after three)."""


def signal_masks(pid: int) -> tuple[int, int]:
    """(blocked, ignored): the signals a process's main thread blocks and ignores, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    return int(fields["SigBlk"], 16), int(fields["SigIgn"], 16)


def bits(*signals: signal.Signals) -> int:
    """The mask of ``signals``, as /proc shows masks."""
    return sum(1 << (s - 1) for s in signals)


def iothread_pids(ready: dict[str, Any]) -> list[int]:
    return [t["pid"] for t in ready["iothreads"]]


def events(out: str) -> list[dict[str, Any]]:
    """A launcher's stdout, one JSON event a line."""
    return [json.loads(line) for line in out.splitlines()]


def test_iothreads_start_with_a_clean_signal_state(clusters: Clusters) -> None:
    """Regression: iothreads inherited their launcher's blocked SIGINT and
    SIGTERM (``SigBlk: 0x4002``), which it blocks for its signalfd."""
    proc, ready = clusters.launch("--iothreads", "2")
    blocked, _ = signal_masks(proc.pid)
    assert blocked & bits(signal.SIGINT, signal.SIGTERM)  # the launcher's own: what they must not inherit
    for pid in iothread_pids(ready):
        blocked, ignored = signal_masks(pid)
        assert blocked == 0, f"iothread {pid} blocks {blocked:#x}"
        assert not ignored & bits(signal.SIGINT, signal.SIGTERM, signal.SIGHUP), f"iothread {pid} ignores {ignored:#x}"


def test_sigterm_stops_an_iothread(clusters: Clusters) -> None:
    """Regression: ``kill -TERM`` of an iothread did nothing (blocked).  It
    stops; its launcher sees an exit it did not ask for, and goes on."""
    proc, ready = clusters.launch("--iothreads", "2")
    pids = iothread_pids(ready)
    os.kill(pids[0], signal.SIGTERM)
    wait_gone(pids[:1], GONE_S, "an iothread sent SIGTERM")
    assert os.path.exists(f"/proc/{pids[1]}")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=STOP_S)
    assert proc.returncode == 0, err
    exited = [e["data"] for e in events(out) if e["event"] == "IOTHREAD_EXITED"]
    assert exited == [{"id": "io0", "pid": pids[0], "exit-code": 0, "expected": False}], exited


def test_iothreads_of_a_killed_launcher_stop_because_its_process_is_gone(clusters: Clusters,
                                                                         short_dir: str) -> None:
    """Regression: the parent-death signal never came (blocked), so the
    iothreads of a launcher killed with SIGKILL lived on until their
    heartbeat watchdog ended them.  Each one stops because its main loop's
    process is gone, and says so; no watchdog is involved (a local iothread
    has none)."""
    proc, ready = clusters.launch("--iothreads", "2", "--runtime-dir", short_dir, clean_exit=False)
    pids = iothread_pids(ready)
    proc.kill()
    wait_gone(pids, GONE_S, "the iothreads of a killed launcher")
    _, err = proc.communicate(timeout=STOP_S)  # the iothreads shared its stderr: all of it is here
    # A local iothread has no silence watchdog: ending within the bound, the iothreads ended by the
    # pidfd or the parent-death signal.  (Which one logs "main loop ... is gone" is not asserted: a
    # parent-death signal that comes while the dying launcher's threads still exist reads as a plain
    # SIGTERM, which stops the iothread as cleanly, without that line.)
    assert "silent" not in err and "no answer" not in err, err


def test_a_stopped_launcher_costs_no_iothread_and_no_block_io(clusters: Clusters) -> None:
    """Regression: a launcher stopped (SIGSTOP) for a few heartbeat periods
    lost every iothread (exit code 3, every block node lost, clients failed
    with ESHUTDOWN, EIO, ENOTCONN), although block I/O never passes through
    the main loop.  Block I/O goes on all along; once resumed, the launcher
    has the same iothreads, answers QMP, and reports no exit."""
    image = clusters.image(1 << 20)
    run = os.path.join(clusters.scratch_dir, "run")
    proc, ready = clusters.launch("--iothreads", "2", "--runtime-dir", run,
                                  "--blockdev", f"driver=file,node-name=disk0,filename={image},iothread=io0",
                                  "--blockdev", "driver=null-co,node-name=null0,size=1M,iothread=io1")
    pids = iothread_pids(ready)
    block = os.urandom(4096)
    with BlockClient(run) as client:
        client.write("disk0", 0, block)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: _state(proc.pid) == "T", "the launcher to stop")
            # The fault itself: the launcher stays stopped this long.  Block I/O all along.
            end = time.monotonic() + PAUSE_S
            writes = 0
            while time.monotonic() < end:
                offset = (writes % 256) * 4096
                client.write("disk0", offset, block)
                assert client.read("disk0", offset, 4096) == block
                client.read("null0", offset, 4096)
                writes += 1
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        qmp = QEMUMonitorProtocol(ready["qmp"][0])
        qmp.connect()
        try:
            assert [t["thread-id"] for t in qmp.cmd_raw("query-iothreads")["return"]] == pids
            blockstats = qmp.cmd_raw("query-blockstats", {"query-nodes": True})["return"]
            stats = {s["node-name"]: s["stats"] for s in blockstats}
            assert stats["disk0"]["wr_operations"] >= writes + 1  # asked of io0 itself
        finally:
            qmp.close()
        client.write("disk0", 4096, block)
        assert client.read("disk0", 4096, 4096) == block
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=STOP_S)
    assert proc.returncode == 0, err
    assert [e["event"] for e in events(out) if e["event"].startswith("IOTHREAD_")] == [], out
    assert "unexpectedly" not in err and "did not answer" not in err, err


def _state(pid: int) -> str:
    """A process's state letter (R, S, T for stopped ...), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


class JumpingClock:
    """A monotonic clock that can jump ahead, as a process that was stopped
    sees it once resumed; it counts its reads."""

    def __init__(self) -> None:
        self.offset_ns = 0
        self.reads = 0

    def __call__(self) -> int:
        self.reads += 1
        return time.monotonic_ns() + self.offset_ns


def test_a_main_loop_back_from_a_stop_does_not_fail_what_it_could_not_hear(clusters: Clusters) -> None:
    """A main loop and its iothread stopped together (a frozen cgroup, a
    suspended job) for longer than the request timeout: once both run again,
    a request sent before the stop is answered, not failed as unanswered.
    The main loop's deadlines count only the time it was there to listen."""
    request_timeout_ms = 500
    clock = JumpingClock()
    cluster = clusters.start("io0", heartbeat_interval_ms=50, request_timeout_ms=request_timeout_ms,
                             clock_ns=clock)
    pid = cluster.iothreads["io0"].pid
    replies: list[QueryReply | ErrorReply] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: _state(pid) == "T", "the iothread to stop")
        with bql():
            cluster.query("io0", replies.append)
            # The fault itself: for twice the request timeout, this main loop
            # did not run (its clock jumps), while its iothread is stopped too.
            clock.offset_ns += 2 * request_timeout_ms * 1_000_000
            looks = clock.reads
            # Heartbeats look at the deadlines again: the request still waits.
            assert cluster.wait_for(lambda: clock.reads >= looks + 3, STOP_S)
            assert replies == []
    finally:
        os.kill(pid, signal.SIGCONT)
    with bql():
        assert cluster.wait_for(lambda: bool(replies), STOP_S)
    assert isinstance(replies[0], QueryReply), replies[0]
    assert replies[0].counters["pid"] == pid


def test_signals_to_the_launcher_s_process_group_reach_the_launcher_only(short_dir: str) -> None:
    """The iothreads sit in sessions of their own: what a terminal or a job
    control sends to the launcher's process group reaches the launcher only.
    Stopped as a job (SIGSTOP to the group), the launcher stops, its
    iothreads serve block I/O all along; Ctrl-C (SIGINT to the group) then
    stops it, and it stops its iothreads in order, none of them stopping
    first on its own (an exit nobody asked for)."""
    proc = subprocess.Popen([*COMMAND, "launch", "--iothreads", "2", "--runtime-dir", short_dir,
                             "--blockdev", "driver=null-co,node-name=null0,size=1M,iothread=io0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded by the launcher's own handshake deadline
            event = json.loads(line)
            if event["event"] == "READY":
                pids = iothread_pids(event["data"])
                break
        assert len(pids) == 2
        with BlockClient(short_dir, timeout_s=GONE_S) as client:
            os.killpg(proc.pid, signal.SIGSTOP)
            try:
                wait_until(lambda: _state(proc.pid) == "T", "the launcher to stop")
                assert len(client.read("null0", 0, 4096)) == 4096
                assert [_state(pid) for pid in pids].count("T") == 0
            finally:
                os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=STOP_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err
    assert "unexpectedly" not in err and "IOTHREAD_EXITED" not in out, err
    wait_gone(pids, GONE_S, "the iothreads of a launcher stopped by Ctrl-C")


def test_the_bench_s_embedded_cluster_starts_clean_of_its_signal_state() -> None:
    """The bench's embedded launcher, and its iothreads, start with no signal
    blocked or ignored, whatever the bench's own state (here SIGUSR1 blocked
    and SIGHUP ignored, as under nohup)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        embedded = EmbeddedCluster(1 << 20)
    finally:
        signal.signal(signal.SIGHUP, hup)
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    iothreads: list[int] = []
    try:
        blocked, ignored = signal_masks(embedded.pid)
        assert blocked == bits(signal.SIGINT, signal.SIGTERM), f"{blocked:#x}"  # its signalfd's, no more
        assert not ignored & bits(signal.SIGHUP, signal.SIGINT, signal.SIGTERM), f"{ignored:#x}"
        iothreads = descendants(embedded.pid)
        janitor = janitor_of(embedded.pid)
        assert janitor in iothreads
        iothreads.remove(janitor)
        assert len(iothreads) == 2
        for pid in iothreads + [janitor]:  # (the launcher's janitor too)
            blocked, ignored = signal_masks(pid)
            assert blocked == 0, f"iothread {pid} blocks {blocked:#x}"
            assert not ignored & bits(signal.SIGHUP, signal.SIGINT, signal.SIGTERM), f"{ignored:#x}"
    finally:
        embedded.close()
    assert embedded.returncode == 0
    wait_gone(iothreads, GONE_S, "the iothreads of the embedded cluster")
