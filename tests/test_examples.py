"""The examples run: each is started as a user would start it (these tests
start processes: marked ``integration``); and the parts of the benchmarks
that can be checked without running them."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
from types import ModuleType

import pytest

from .integration.support import interrupt_at

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _load_benchmark(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A benchmark of examples/bench imported (not run), as its folder sees it."""
    path = EXAMPLES / "bench" / f"{name}.py"
    monkeypatch.syspath_prepend(str(path.parent))  # its ``_common``
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fio_row_reads_the_cached_file_like_the_other_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: fio dropped the image from the page cache before its run
    (its default ``invalidate=1``), so its row measured the disk while every
    other row read the cached file.  Its command line keeps the cache, and
    reads the benchmark's image, 4 KiB at random offsets, for the time given."""
    blockio = _load_benchmark("blockio", monkeypatch)
    argv = blockio.fio_argv("/images/disk.img", 256 << 20, 3)
    assert argv[0] == "fio"
    options = {name: value for name, _, value in (arg.removeprefix("--").partition("=") for arg in argv[1:])}
    assert [a for a in argv if a.startswith("--invalidate")] == ["--invalidate=0"]
    assert options["filename"] == "/images/disk.img" and options["size"] == str(256 << 20)
    assert (options["rw"], options["bs"], options["ioengine"]) == ("randread", "4096", "psync")
    assert options["runtime"] == "3" and "time_based" in options and options["output-format"] == "json"


@pytest.mark.integration
def test_main_loop_tour() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "main_loop_tour.py")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("listening on 127.0.0.1:"), first
        port = int(first.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30):
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "signalfd" in line:
                    break
        out = "".join(lines)
        assert "dispatch path:" in out
        # The path from the loop down to the accept callback, as a backtrace.
        path = [ln.split()[0] for ln in out.split("dispatch path:")[1].strip().splitlines()[:6]]
        assert path == ["run", "main_loop_wait", "_iterate", "_dispatch", "dispatch", "vnc_listen_io"]
        assert f"TCP socket listening on 127.0.0.1:{port}" in out
        assert "notifier eventfd of AioContext 'qemu_aio_context'" in out
        assert "wakeup eventfd of MainContext" in out
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert re.fullmatch(r"main_loop_tour\.py: interrupted after \d+ ticks\n", err), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run_example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.integration
def test_random_read_example() -> None:
    out = _run_example(str(EXAMPLES / "random_read.py"))
    assert out.returncode == 0, out.stderr
    assert "reads in 2 s" in out.stdout and "errors 0" in out.stdout


@pytest.mark.integration
def test_asyncio_program_example() -> None:
    """One asyncio loop: QMP (qemu.qmp), block I/O awaited from tasks, a node moved under its reads."""
    out = _run_example(str(EXAMPLES / "asyncio_program.py"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("iothreads: io0 (pid ") and ", io1 (pid " in lines[0]
    assert lines[1] == "disk0: 256 blocks written by 32 tasks at once"
    assert lines[2].startswith("disk0: read back while it moved to io1, 0 mismatches")
    assert re.fullmatch(r"disk0 \(query-blockstats\): (\d+) reads, (\d+) writes", lines[3])
    reads, writes = map(int, re.findall(r"\d+", lines[3].split(":")[1]))
    assert reads >= 256 and writes == 256


@pytest.mark.integration
def test_resilience_example_kills_launchers_and_finds_nothing_left(tmp_path: pathlib.Path) -> None:
    """examples/resilience.py at a small count: each launcher killed with
    SIGKILL leaves no process, socket file (its NBD server's included) or
    runtime directory: its janitor cleans up after it; an iothread killed
    under a verified write workload loses no flushed write, and its node is
    served again."""
    result = tmp_path / "result.json"
    out = _run_example(str(EXAMPLES / "resilience.py"), "--launcher-repeats", "3", "--iothread-repeats", "2",
                       "--json", str(result))
    assert out.returncode == 0, out.stdout + out.stderr
    launcher, iothread = json.loads(result.read_text())["rows"]
    assert (launcher["case"], launcher["repetitions"]) == ("SIGKILL launcher", 3)
    assert (launcher["processes left"], launcher["socket files left"], launcher["runtime dirs left"]) == (0, 0, 0)
    assert (iothread["case"], iothread["repetitions"], iothread["writes lost"]) == ("SIGKILL iothread", 2, 0)
    assert iothread["blocks acknowledged"] > 0 and iothread["served again ms max"] > 0


@pytest.mark.integration
def test_soak_example_checks_memory_descriptors_and_data(tmp_path: pathlib.Path) -> None:
    """examples/soak.py at a small count: every request answered and read back
    right, each process's memory and descriptors sampled before and after."""
    result = tmp_path / "soak.json"
    out = _run_example(str(EXAMPLES / "soak.py"), "--requests", "5000", "--json", str(result))
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(result.read_text())
    assert (data["requests"], data["errors"], data["mismatches"]) == (5000, 0, 0)
    assert [p["process"] for p in data["processes"]] == ["launcher", "io0", "io1"]
    assert all(p["fds_before"] == p["fds_after"] and p["rss_kib_before"] > 0 for p in data["processes"])


@pytest.mark.integration
def test_verify_example() -> None:
    out = _run_example(str(EXAMPLES / "verify.py"))
    assert out.returncode == 0, out.stderr
    assert "256 blocks written and read back, 0 mismatches" in out.stdout


@pytest.mark.integration
def test_bql_contention_example_gives_the_median_and_range_of_several_rounds() -> None:
    """Regression: one round, one figure, which did not reproduce.  Now
    several rounds, the order of the cases alternating, and the median and
    range of the rounds' ratios."""
    out = _run_example(str(EXAMPLES / "bql_contention.py"), "--seconds", "0.3", "--repeats", "3")
    assert out.returncode == 0, out.stderr
    method, *cases, progress, reads = out.stdout.strip().splitlines()
    assert method.startswith("3 rounds of 0.3 s per case, the order alternating")
    assert [c[:3] for c in cases] == ["(a)", "(b)", "(b)", "(a)", "(a)", "(b)"]
    for line in cases:
        rate = float(line.split(":")[1].split("reads/s")[0].replace(",", ""))
        loops = float(line.split("vCPU progress")[1].split("loops/s")[0].replace(",", ""))
        assert rate > 0 and loops > 0
    pattern = r"{}, \(b\) against \(a\): median [+-]\d+%, range [+-]\d+% to [+-]\d+% over 3 rounds"
    assert re.fullmatch(pattern.format("vCPU progress"), progress), progress
    assert re.fullmatch(pattern.format("reads/s"), reads), reads


@pytest.mark.integration
@pytest.mark.parametrize(("example", "point"), [
    (["bql_contention.py", "--seconds", "5"], "(a) completions in the main loop"),  # a case measured
    (["random_read.py"], "disk0: random 4 KiB reads"),  # reading
    (["asyncio_program.py"], "iothreads: io0"),  # an asyncio program, QMP connected
    (["bench/loop.py", "--quick"], "median of"),  # measuring
    (["bench/blockio.py", "--quick"], "the main loop, the iothread"),  # setting up
    (["soak.py"], "soak: "),  # warming up
    (["resilience.py"], "SIGKILL launcher, "),  # launching and killing
])
def test_ctrl_c_ends_an_example_with_one_line_and_status_130(example: list[str], point: str) -> None:
    """Regression: Ctrl-C in an example printed a traceback.  Ctrl-C at a
    terminal (SIGINT to the example's process group) once it reached a
    concrete point: one line, status 130, and what it started is gone."""
    script, *args = example
    interrupt_at([sys.executable, str(EXAMPLES / script), *args], point, os.path.basename(script), cwd=ROOT)
