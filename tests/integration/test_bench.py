"""``iothreads bench`` end to end, the client against a launched cluster, and
a verify run that catches corruption."""

from __future__ import annotations

import argparse
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from iothreads import AioContext, BlockClient, BlockIOError, reschedule
from iothreads.testing import poll_until
from mainloop.cli import _bench

from .support import COMMAND, Clusters, wait_gone
EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def test_bench_verify_end_to_end(tmp_path: object) -> None:
    out_json = os.path.join(str(tmp_path), "result.json")
    # The smallest block size: the pattern's offset seed and checksum fit, every block verifies.
    out = subprocess.run([*COMMAND, "bench", "--verify", "--ops", "2000", "--size", "16M", "--bs", "512",
                          "--json", out_json], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "read" in out.stdout and "write" in out.stdout and "p99.9 us" in out.stdout
    with open(out_json) as f:
        data = json.load(f)
    assert data["verify"] is True and data["errors"] == []
    assert data["ops"]["write"]["ops"] == data["ops"]["read"]["ops"] == 2000
    assert data["ops"]["read"]["errors"] == 0


def test_bench_default_pattern_short_run() -> None:
    out = subprocess.run([*COMMAND, "bench", "--ops", "500", "--size", "8M", "--rw", "randread"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].startswith("read ")
    assert "IOPS" in out.stderr  # the progress line
    assert "started (pid" not in out.stderr  # no debug messages by default


def test_bench_verbose_shows_its_embedded_cluster_starting_and_stopping() -> None:
    out = subprocess.run([*COMMAND, "bench", "-v", "--ops", "200", "--size", "4M"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for line in ("iothreads: embedded cluster started (launcher pid", "iothreads: iothread io0 started (pid",
                 "iothread io1: pid", "iothread io1: exiting (code 0)", "iothreads: iothread io1 (pid"):
        assert line in out.stderr, out.stderr


def test_bench_json_dash_goes_to_stdout(tmp_path: pathlib.Path) -> None:
    """Regression: ``--json -`` wrote a file named ``-``.  Now the JSON is all
    of stdout (the table goes to stderr)."""
    out = subprocess.run([*COMMAND, "bench", "--ops", "300", "--size", "4M", "--json", "-"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert sum(op["ops"] for op in data["ops"].values()) == 300 and data["interrupted"] is False
    assert "p99.9 us" in out.stderr
    assert list(tmp_path.iterdir()) == []


def _running_bench(*args: str) -> tuple[subprocess.Popen[str], list[int]]:
    """``iothreads bench`` with its embedded cluster, in a session of its own
    (as at a terminal), once it reports progress: (the process, the pids of
    its embedded cluster: launcher first, then iothreads)."""
    proc = subprocess.Popen([*COMMAND, "bench", "--runtime", "60", "--size", "8M", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "IOPS" in line:
            break
    pids: list[int] = []
    todo = [proc.pid]
    while todo:  # the process tree below it
        pid = todo.pop()
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                todo += [int(c) for c in f.read().split()]
        if pid != proc.pid:
            pids.append(pid)
    assert len(pids) == 3, pids  # the launcher and two iothreads
    return proc, pids


def test_bench_interrupted_reports_what_it_measured_and_cleans_up(tmp_path: pathlib.Path) -> None:
    """Regression: Ctrl-C threw the measurements away.  Now (Ctrl-C at a
    terminal: SIGINT to the bench's process group) the run stops, the table
    and the JSON come out marked interrupted, exit 130, no traceback; the
    embedded cluster (a session of its own) served to the end, then is gone."""
    result = tmp_path / "result.json"
    proc, pids = _running_bench("--json", str(result))
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1].startswith("iothreads: interrupted after ")
    assert [line.split()[0] for line in out.splitlines()] == ["op", "read", "write"]
    data = json.loads(result.read_text())
    assert data["interrupted"] is True and data["ops"]["read"]["ops"] > 0
    assert data["ops"]["read"]["errors"] == data["ops"]["write"]["errors"] == 0
    assert wait_gone(pids, 30) == []


def test_a_killed_bench_leaves_nothing_behind() -> None:
    """Regression: a bench killed with SIGKILL left its temporary image behind.
    The image never has a name (the iothreads open it through the bench's
    /proc/PID/fd); the embedded launcher gets SIGTERM from the kernel
    (parent-death signal), stops its iothreads and removes its runtime directory."""
    proc, pids = _running_bench()
    with open(f"/proc/{pids[0]}/cmdline") as f:
        launcher = f.read().split("\0")
    images = {arg.split("filename=")[1].split(",")[0] for arg in launcher if "filename=" in arg}
    assert len(images) == 1, launcher
    assert os.stat(images.pop()).st_nlink == 0  # in no directory: the kernel frees it with its last user
    with open(f"/proc/{pids[1]}/cmdline") as f:
        iothread = f.read().split("\0")
    control = iothread[iothread.index("--connect") + 1]
    run_dir = os.path.dirname(control.removeprefix("ipc://"))
    assert os.path.isdir(run_dir)
    proc.kill()
    proc.communicate(timeout=60)
    assert wait_gone(pids, 30) == []
    assert not os.path.exists(run_dir)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bs", "lots"], "Parameter '--bs' expects a size"),
        (["--bs", "1.e400"], "Parameter '--bs' expects a size"),
        (["--size", "1M", "--verify", "--bs", "8"], "--bs 8: must be between 512 bytes and 16M"),
        (["--size", "1M", "--runtime", "nan"], "argument --runtime: 'nan' is not a number of seconds > 0"),
        (["--size", "1M", "--runtime", "inf"], "argument --runtime: 'inf' is not a number of seconds > 0"),
        (["--iodepth", "0"], "--iodepth must be >= 1"),
        (["--rw", "sideways"], "invalid choice: 'sideways'"),
        (["--attach", "/nonexistent-dir"], "no running cluster in /nonexistent-dir"),
    ],
)
def test_bench_bad_options(args: list[str], message: str) -> None:
    out = subprocess.run([*COMMAND, "bench", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.fixture
def cluster(clusters: Clusters) -> tuple[str, str]:
    """A launched cluster with a file node and a null-co node; (runtime_dir, image)."""
    image = clusters.image(8 << 20)
    run = os.path.join(clusters.scratch_dir, "run")
    clusters.launch("--iothreads", "2", "--runtime-dir", run,
                    "--blockdev", f"driver=file,node-name=disk0,filename={image},iothread=io0",
                    "--blockdev", "driver=null-co,node-name=null0,size=1M,iothread=io1")
    return run, image


def test_verify_refuses_a_null_co_node(cluster: tuple[str, str]) -> None:
    """Regression: null-co discards what is written, so ``bench --verify`` and
    examples/verify.py reported every block of it as a mismatch.  Both refuse
    it, in one line, before any I/O."""
    run, _ = cluster
    out = subprocess.run([*COMMAND, "bench", "--attach", run, "--verify", "--ops", "64"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines() == [
        "iothreads: --verify: node null0 is null-co, which discards what is written: there is nothing to "
        "read back (choose other nodes with --node)"]
    example = subprocess.run([sys.executable, str(EXAMPLES / "verify.py"), run, "null0"],
                             capture_output=True, text=True, timeout=60)
    assert example.returncode == 1 and example.stdout == "", example.stdout
    assert example.stderr.strip().splitlines() == [
        "verify.py: node null0 is null-co, which discards what is written: there is nothing to read back"]
    assert subprocess.run([*COMMAND, "bench", "--attach", run, "--verify", "--ops", "64", "--node", "disk0"],
                          capture_output=True, timeout=60).returncode == 0


@pytest.mark.parametrize("verbose", [True, False])
def test_verbose_shows_processes_moves_drains_and_resends(verbose: bool) -> None:
    """``-v`` (on launch, passed on to the iothreads, and on bench) shows what
    debugging a cluster needs: iothread processes started and exiting, a
    node's move and its drain, the requests a client resent after it; by
    default none of it.  The node moves under a running bench."""
    flags = ["-v"] if verbose else []
    launcher = subprocess.Popen([*COMMAND, "launch", *flags, "--iothreads", "2",
                                 "--blockdev", "driver=null-co,node-name=null0,size=64M,iothread=io0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bench: subprocess.Popen[str] | None = None
    assert launcher.stdout is not None
    try:
        ready = next(e for e in map(json.loads, launcher.stdout) if e["event"] == "READY")["data"]
        bench = subprocess.Popen([*COMMAND, "bench", *flags, "--attach", ready["runtime_dir"], "--rw", "randread",
                                  "--runtime", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert bench.stderr is not None
        bench_err = [next(line for line in bench.stderr if "IOPS" in line)]  # running
        qmp = QEMUMonitorProtocol(ready["qmp"][0])
        qmp.connect()
        try:
            assert qmp.cmd("x-blockdev-set-iothread", **{"node-name": "null0", "iothread": "io1"}) == {}
        finally:
            qmp.close()
        # The bench's next requests go to io0, which answers ESTALE: resent to io1.
        for line in bench.stderr:  # bounded by the bench's --runtime
            bench_err.append(line)
            if (" resent " in line) if verbose else sum("IOPS" in x for x in bench_err) > 3:
                break
        bench.send_signal(signal.SIGINT)
        bench_err.append(bench.communicate(timeout=60)[1])
        assert bench.returncode == 130, bench_err
    finally:
        if bench is not None and bench.poll() is None:
            bench.kill()
            bench.communicate()
        launcher.send_signal(signal.SIGTERM)
        launcher_err = launcher.communicate(timeout=30)[1]
    assert launcher.returncode == 0, launcher_err
    assert "iothreads: node null0 moved from io0 to io1" in launcher_err  # info: shown by default
    debug = {
        "launcher": ["iothreads: iothread io0 started (pid", "iothreads: iothread io1 started (pid",
                     "iothreads: moving node null0 from io0 to io1: draining it in io0"],
        "iothreads": ["iothread io0: pid ", "iothread io0: node null0: draining ",
                      "iothread io0: node null0: drained and closed", "iothread io0: exit requested: draining",
                      "iothread io0: exiting (code 0)", "iothread io1: exiting (code 0)"],
        "client": ["iothreads: node null0 moved away from iothread io0: read at "],
    }
    text = launcher_err + "".join(bench_err)
    for where, lines in debug.items():
        for line in lines:
            assert (line in text) == verbose, f"{where}: {line!r} in:\n{text}"


def test_client_every_op_type_and_errors(cluster: tuple[str, str]) -> None:
    run, image = cluster
    with BlockClient(run) as c:
        assert c.nodes()["disk0"].iothread == "io0" and c.node_size("null0") == 1 << 20
        c.write("disk0", 8192, b"\x11" * 8192)
        c.flush("disk0")
        assert c.read("disk0", 8192, 8192) == b"\x11" * 8192
        c.write_zeroes("disk0", 8192, 4096)
        c.discard("disk0", 12288, 4096)
        data = c.read("disk0", 8192, 8192)
        assert data[:4096] == bytes(4096)
        assert c.read("null0", 100, 10) == bytes(10)
        with pytest.raises(BlockIOError) as info:
            c.read("disk0", 8 << 20, 1)
        assert info.value.errno == errno.EINVAL and "out of range" in str(info.value)
        with pytest.raises(BlockIOError) as info:
            c.read("nosuch", 0, 1)
        assert info.value.errno == errno.ENODEV
        # Larger than a message may carry: refused at once, not sent to be dropped (no answer, ever).
        with pytest.raises(BlockIOError) as info:
            c.write("null0", 0, bytes((64 << 20) + 1))
        assert info.value.errno == errno.EINVAL and "exceeds the limit" in str(info.value)
        assert c.in_flight == 0
        c.write("disk0", 65536, b"on disk")
        c.flush("disk0")
    with open(image, "rb") as f:  # the data really is in the image
        f.seek(65536)
        assert f.read(7) == b"on disk"


def test_client_blocking_call_from_a_completion_callback(cluster: tuple[str, str]) -> None:
    """A completion callback (run inside the client channel's drain) makes a
    blocking call: its request leaves at once and its answer comes (it used to
    wait for the drain's end, that is for ever)."""
    run, _ = cluster
    with BlockClient(run, timeout_s=20) as c:
        c.write("disk0", 0, b"nested")
        got: list[bytes] = []

        def completed(status: int, message: str, data: bytes) -> None:
            assert status == 0, message
            got.append(data + c.read("disk0", 0, 6))

        c.submit("disk0", "read", 0, 3, callback=completed)  # the same node: the same channel
        poll_until(lambda: c.ctx.poll(True), lambda: got, "the completion", 20)
        assert got == [b"nes" + b"nested"]


def test_client_blocking_call_times_out(cluster: tuple[str, str]) -> None:
    """An iothread that does not answer (stopped): the blocking call raises
    TimeoutError after ``timeout_s``, instead of a poll that never returns."""
    run, _ = cluster
    with BlockClient(run, timeout_s=0.3) as c:
        pid = next(t.pid for t in c.state.iothreads if t.id == c.nodes()["null0"].iothread)
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError, match="did not complete in 0.3 s"):
                c.read("null0", 0, 4)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert c.read("null0", 0, 4) == bytes(4)  # and it goes on once the iothread does


def test_client_requests_to_an_iothread_that_dies_fail(cluster: tuple[str, str]) -> None:
    """Regression: requests in flight to an iothread that died waited for ever
    (callbacks) or for the timeout (blocking calls).  The client watches the
    connection: when it drops, they fail with EIO, and new ones fail at once."""
    run, _ = cluster
    with BlockClient(run, timeout_s=20) as c:
        assert c.read("null0", 0, 4) == bytes(4)  # connected
        pid = next(t.pid for t in c.state.iothreads if t.id == "io1")
        os.kill(pid, signal.SIGSTOP)  # they queue up, unanswered
        statuses: list[tuple[int, str]] = []
        reported: list[str] = []
        c.ctx.set_exception_handler(lambda ctx, exc, where: reported.append(where))

        def done(st: int, msg: str, d: bytes) -> None:
            statuses.append((st, msg))
            if len(statuses) == 1:
                raise RuntimeError("a buggy callback")  # must not strand the others

        for i in range(8):
            c.submit("null0", "read", i * 4096, 4096, callback=done)
        os.kill(pid, signal.SIGKILL)
        poll_until(lambda: c.ctx.poll(True, 100_000_000), lambda: len(statuses) >= 8,
                   lambda: f"8 failures, got {len(statuses)}", 20)
        assert statuses == [(-errno.EIO, "the connection to iothread io1 was lost")] * 8
        assert c.in_flight == 0 and len(reported) == 1
        with pytest.raises(BlockIOError) as info:
            c.read("null0", 0, 4)  # its node went with it
        assert info.value.errno in (errno.ENOTCONN, errno.ENODEV)
        assert c.read("disk0", 0, 4) == bytes(4)  # the other iothread still serves


def test_client_callbacks_and_awaitables_many_in_flight(cluster: tuple[str, str]) -> None:
    run, _ = cluster
    with AioContext(name="mine") as ctx, BlockClient(run, ctx) as c:
        statuses: list[int] = []
        for i in range(64):
            c.submit("disk0", "write", i * 4096, 4096, bytes([i]) * 4096,
                     lambda s, m, d: statuses.append(s))
        assert c.in_flight == 64
        poll_until(lambda: ctx.poll(True), lambda: len(statuses) >= 64, "64 completions")
        assert statuses == [0] * 64

        async def check() -> list[bytes]:
            await reschedule(ctx)
            return [await c.aread("disk0", i * 4096, 1) for i in range(0, 64, 9)]

        co = ctx.spawn(check())
        poll_until(lambda: ctx.poll(True), co.done, "the reads")
        assert co.result() == [bytes([i]) for i in range(0, 64, 9)]


def test_a_client_that_disconnects_mid_flight_leaks_nothing(cluster: tuple[str, str]) -> None:
    run, _ = cluster
    c = BlockClient(run)
    for i in range(200):
        c.submit("disk0", "write", (1 << 20) + (i % 64) * 4096, 4096, bytes(4096))
    c.close()  # gone with requests in flight
    with BlockClient(run) as other:  # the iothread still serves everyone else
        other.write("disk0", 0, b"still here")
        assert other.read("disk0", 0, 10) == b"still here"


def test_verify_catches_corruption(cluster: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = cluster
    real = _bench._pattern
    seen: set[int] = set()

    def drifting(offset: int, bs: int) -> bytes:
        # The second use (the check) of one block expects other data: as if the
        # device had returned something else than what was written.
        if offset == 4096 and offset in seen:
            return b"\x00" + real(offset, bs)[1:]
        seen.add(offset)
        return real(offset, bs)

    monkeypatch.setattr(_bench, "_pattern", drifting)
    args = argparse.Namespace(attach=run, rw="randrw", bs="4k", iodepth=4, numjobs=1, runtime=3.0, ops=16,
                              size="8M", node=["disk0"], verify=True, json=None, plot=None)
    assert _bench.run_bench(args) == 1


def test_bench_plot_needs_matplotlib_or_writes_a_png(tmp_path: object) -> None:
    png = os.path.join(str(tmp_path), "lat.png")
    out = subprocess.run([*COMMAND, "bench", "--ops", "200", "--size", "4M", "--plot", png],
                         capture_output=True, text=True, timeout=120)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert out.returncode == 1 and "--plot needs matplotlib" in out.stderr
        assert "IOPS" not in out.stderr  # refused before running anything
    else:
        assert out.returncode == 0, out.stderr
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
