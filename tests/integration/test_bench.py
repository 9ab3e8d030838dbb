"""``iothreads bench`` end to end: its embedded cluster or an attached one,
its output (table, JSON, plot, ``-v``), Ctrl-C and SIGKILL, bad options, and
``--verify`` (refusing a null-co node, catching corruption)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from mainloop.cli import _bench

from .support import COMMAND, Clusters, descendants, janitor_of, wait_gone

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
    assert data["verify"] is True and data["errors"] == [] and data["transport"] == "block"
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
    its embedded cluster: launcher first, then iothreads, then the launcher's
    janitor)."""
    proc = subprocess.Popen([*COMMAND, "bench", "--runtime", "60", "--size", "8M", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "IOPS" in line:
            break
    pids = descendants(proc.pid)
    janitor = janitor_of(pids[0])
    assert janitor in pids, pids
    pids.remove(janitor)
    assert len(pids) == 3, pids  # the launcher and two iothreads
    return proc, pids + [janitor]


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
    wait_gone(pids, 30, "the embedded cluster")


@pytest.mark.parametrize("args", [[], ["--nbd"]])
def test_a_killed_bench_leaves_nothing_behind(args: list[str]) -> None:
    """Regression: a bench killed with SIGKILL left its temporary image behind.
    The image never has a name (the iothreads open it through the bench's
    /proc/PID/fd); the embedded launcher gets SIGTERM from the kernel
    (parent-death signal), stops its iothreads and removes its runtime
    directory (with ``--nbd``, the NBD server's socket in it too)."""
    proc, pids = _running_bench(*args)
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
    assert ("nbd.sock" in os.listdir(run_dir)) == bool(args)
    proc.kill()
    proc.communicate(timeout=60)
    wait_gone(pids, 30, "the embedded cluster")
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


def test_verify_refuses_a_null_co_node(block_cluster: tuple[str, str]) -> None:
    """Regression: null-co discards what is written, so ``bench --verify`` and
    examples/verify.py reported every block of it as a mismatch.  Both refuse
    it, in one line, before any I/O."""
    run, _ = block_cluster
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
def test_verbose_shows_processes_moves_drains_and_resends(clusters: Clusters, verbose: bool) -> None:
    """``-v`` (on launch, passed on to the iothreads, and on bench) shows what
    debugging a cluster needs: iothread processes started and exiting, a
    node's move and its drain, the requests a client resent after it; by
    default none of it.  The node moves under a running bench."""
    flags = ["-v"] if verbose else []
    launcher, ready = clusters.launch(*flags, "--iothreads", "2",
                                      "--blockdev", "driver=null-co,node-name=null0,size=64M,iothread=io0")
    bench: subprocess.Popen[str] | None = None
    try:
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
        "client": ["iothreads: read at ", " on node null0: ESTALE from iothread io0: resent (try 1)"],
    }
    text = launcher_err + "".join(bench_err)
    for where, lines in debug.items():
        for line in lines:
            assert (line in text) == verbose, f"{where}: {line!r} in:\n{text}"


def test_verify_catches_corruption(block_cluster: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = block_cluster
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
                              size="8M", node=["disk0"], verify=True, json=None, plot=None, nbd=False)
    assert _bench.run_bench(args) == 1


# -- through NBD ---------------------------------------------------------------------------------


def nbd_cluster(clusters: Clusters, *exports: str) -> tuple[str, str]:
    """A launched cluster like ``block_cluster``'s (``disk0``: an 8 MiB image in
    io0, ``null0``: 1 MiB of null-co in io1), serving NBD with ``exports``:
    (its runtime directory, the image)."""
    image = clusters.image(8 << 20)
    run = os.path.join(clusters.scratch_dir, "run")
    clusters.launch("--iothreads", "2", "--runtime-dir", run,
                    "--blockdev", f"driver=file,node-name=disk0,filename={image},iothread=io0",
                    "--blockdev", "driver=null-co,node-name=null0,size=1M,iothread=io1",
                    "--nbd-server", f"addr.type=unix,addr.path={run}/nbd.sock",
                    *(arg for export in exports for arg in ("--export", export)))
    return run, image


def test_bench_nbd_verify_end_to_end_with_its_embedded_cluster(tmp_path: pathlib.Path) -> None:
    """``--nbd``: the embedded cluster exports its two nodes, and every job
    writes and reads back its pattern over a connection of its own."""
    result = tmp_path / "result.json"
    out = subprocess.run([*COMMAND, "bench", "--nbd", "--verify", "--ops", "600", "--size", "8M", "--bs", "512",
                          "--numjobs", "3", "--iodepth", "4", "--json", str(result)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "verify: bs=512 iodepth=4 jobs=3 on disk0, disk1 through NBD (exp0, exp1)" in out.stderr
    data = json.loads(result.read_text())
    assert data["transport"] == "nbd" and data["verify"] is True and data["errors"] == []
    assert data["ops"]["write"]["ops"] == data["ops"]["read"]["ops"] == 600
    assert data["ops"]["write"]["errors"] == data["ops"]["read"]["errors"] == 0


def test_bench_nbd_verify_catches_data_changed_behind_its_back(
        clusters: Clusters, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Between the writes and the reads through NBD, a block of the image is
    overwritten in the file itself: the reads come back through the export
    with the bytes that are there now, and verify names the block."""
    run, image = nbd_cluster(clusters, "type=nbd,id=e0,node-name=disk0,writable=on")
    real_flush = _bench.NbdTransport.flush

    def flush_then_corrupt(self: _bench.NbdTransport, timeout_s: float = 60.0) -> None:
        real_flush(self, timeout_s)
        fd = os.open(image, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xff" * 16, 8192 + 100)  # inside the third 4 KiB block
        finally:
            os.close(fd)

    monkeypatch.setattr(_bench.NbdTransport, "flush", flush_then_corrupt)
    args = argparse.Namespace(attach=run, rw="randrw", bs="4k", iodepth=4, numjobs=1, runtime=3.0, ops=16,
                              size="8M", node=[], verify=True, json=None, plot=None, nbd=True)
    assert _bench.run_bench(args) == 1
    err = capsys.readouterr().err
    assert "iothreads: verify: disk0@8192: data differs from what was written" in err, err
    assert err.count("data differs") == 1, err


def test_bench_nbd_attached_to_a_cluster_with_exports(clusters: Clusters) -> None:
    """``--attach DIR --nbd``: the exports come from the cluster's state file;
    a node with several exports gets its first (by id)."""
    run, _ = nbd_cluster(clusters, "type=nbd,id=e1,node-name=disk0,writable=on",
                         "type=nbd,id=e2,node-name=disk0,name=again", "type=nbd,id=n0,node-name=null0")
    out = subprocess.run([*COMMAND, "bench", "--attach", run, "--nbd", "--rw", "randread", "--ops", "300",
                          "--iodepth", "8", "--json", "-"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "randread: bs=4096 iodepth=8 jobs=2 on disk0, null0 through NBD (e1, n0)" in out.stderr
    data = json.loads(out.stdout)
    assert data["transport"] == "nbd" and data["ops"]["read"]["ops"] == 300 and data["errors"] == []
    assert data["ops"]["read"]["errors"] == 0


@pytest.mark.parametrize(("exports", "args", "message"), [
    ((), [], "--nbd: the cluster in RUN exports no node over NBD (launch it with --nbd-server and --export, "
             "or add them with QMP's nbd-server-start and block-export-add)"),
    (("type=nbd,id=e0,node-name=disk0,writable=on",), ["--node", "null0"],
     "--nbd: node null0 has no NBD export in the cluster in RUN"),
    (("type=nbd,id=e0,node-name=disk0",), ["--rw", "randwrite"],
     "--nbd: export e0 is read-only, and --rw randwrite writes (choose --rw randread or read, or other nodes "
     "with --node)"),
    (("type=nbd,id=e0,node-name=disk0",), ["--verify"], "--nbd: export e0 is read-only, and --verify writes"),
])
def test_bench_nbd_refuses_what_it_cannot_run_in_one_line(clusters: Clusters, exports: tuple[str, ...],
                                                          args: list[str], message: str) -> None:
    run, _ = nbd_cluster(clusters, *exports)
    out = subprocess.run([*COMMAND, "bench", "--attach", run, "--nbd", "--ops", "16", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"iothreads: {message.replace('RUN', run)}"), out.stderr


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
