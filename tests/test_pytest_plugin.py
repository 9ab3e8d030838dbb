"""The installed pytest plugin (``mainloop.pytest_plugin``, entry point
``pytest11``), run the way a user's test suite runs it: test files of their
own in a session of their own (pytest's ``pytester``), with the plugin found
through its entry point, not through this repository's conftest."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import select
import shutil
import signal
import subprocess
import sys

import pytest

from mainloop import EmbeddedCluster
from mainloop.pytest_plugin import cluster_processes as _cluster_processes

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.integration  # (each test starts a pytest of its own)

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "pytest_plugin" / "test_with_the_plugin.py"


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_user=source)
    return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "--strict-markers", *args)


def test_the_plugin_is_found_through_its_entry_point(pytester: pytest.Pytester) -> None:
    result = run(pytester, "def test_nothing(): pass", "--fixtures")
    for name in ("aio_context", "aio_clock", "aio_autojump_clock", "aio_thread", "main_loop", "disk_image",
                 "iothreads_cluster"):
        result.stdout.fnmatch_lines([f"{name} -- *pytest_plugin/__init__.py*"])
    for name in ("iothreads_cluster_factory", "iothreads_shared_cluster"):
        result.stdout.fnmatch_lines([f"{name} [[]session scope[]] -- *pytest_plugin/__init__.py*"])


def test_aio_tests_run_as_coroutines_on_the_tests_context(pytester: pytest.Pytester) -> None:
    result = run(pytester, """
        import pytest
        from iothreads import ClockType, get_current_aio_context, sleep_ns

        def test_every_fixture(aio_context, aio_clock, aio_thread, disk_image):
            aio_clock.advance_ns(5_000)
            assert aio_context.clock_now_ns(ClockType.REALTIME) == aio_clock.now_ns() == 5_000  # its clock
            assert aio_thread.ctx is not aio_context and aio_thread.run_sync(lambda: "ran") == "ran"

        @pytest.mark.aio
        async def test_on_the_context(aio_context):
            assert get_current_aio_context() is aio_context
            data = await aio_context.thread_pool.submit(lambda: b"from the pool")
            await sleep_ns(1_000_000)
            assert data == b"from the pool"

        @pytest.mark.aio
        async def test_a_failure_fails(aio_context):
            await sleep_ns(1000)
            assert 1 == 2, "the test's own assertion"
    """)
    result.assert_outcomes(passed=2, failed=1)  # (--strict-markers: the aio marker is registered)
    result.stdout.fnmatch_lines(["*the test's own assertion*"])


def test_the_autojump_clock_makes_long_timeouts_take_no_time(pytester: pytest.Pytester) -> None:
    result = run(pytester, """
        import time
        import pytest
        from iothreads import sleep_ns

        @pytest.mark.aio(timeout_s=5)
        async def test_an_hour(aio_context, aio_autojump_clock):
            start_ns = aio_autojump_clock.now_ns()
            t0 = time.monotonic()
            await sleep_ns(3600 * 10**9)
            assert aio_autojump_clock.now_ns() - start_ns >= 3600 * 10**9
            assert time.monotonic() - t0 < 5

        def test_a_plain_fake_clock(aio_context, aio_clock):
            fired = []
            from iothreads import ClockType
            timer = aio_context.timer_new_ms(ClockType.REALTIME, lambda: fired.append(1), "t")
            timer.mod(timer.now() + 1000)
            assert not aio_context.poll(False) and not fired
            aio_clock.advance_ns(10**9)
            aio_context.poll(False)
            assert fired == [1]
            timer.delete()
    """)
    result.assert_outcomes(passed=2)


def test_an_aio_test_past_its_timeout_fails_naming_what_waits(pytester: pytest.Pytester) -> None:
    result = run(pytester, """
        import pytest
        from iothreads import Future

        @pytest.mark.aio(timeout_s=0.3)
        async def test_waits_for_ever(aio_context):
            await Future()  # nothing will complete it

        @pytest.mark.aio(timeout_s="soon")
        async def test_a_bad_timeout(aio_context):
            pass
    """)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*the aio test did not end in 0.3 s*test_waits_for_ever*still waits*"])
    result.stdout.fnmatch_lines(["*timeout_s (or the ini option aio_timeout) must be a number of seconds above 0,"
                                 " not 'soon'*"])


def test_leaks_fail_the_test_that_made_them(pytester: pytest.Pytester) -> None:
    result = run(pytester, """
        import socket
        import subprocess
        import threading

        def test_a_bottom_half_left(aio_context):
            aio_context.bh_new(lambda: None, "forgotten")

        def test_an_fd_handler_left(aio_context):
            a, b = socket.socketpair()
            aio_context.set_fd_handler(a.fileno(), lambda: None, None)
            test_an_fd_handler_left.socks = (a, b)

        def test_a_thread_left(aio_context):
            stop = threading.Event()
            threading.Thread(target=stop.wait, name="left-behind", daemon=True).start()
            test_a_thread_left.stop = stop

        def test_a_child_process_left(aio_context):
            # (cat ends when this pytest does: its stdin closes)
            test_a_child_process_left.child = subprocess.Popen(["cat"], stdin=subprocess.PIPE)

        def test_a_child_process_reaped(aio_context):
            child = subprocess.Popen(["cat"], stdin=subprocess.PIPE)
            child.stdin.close()
            assert child.wait(10) == 0

        def test_clean(aio_context, aio_thread, disk_image):
            bh = aio_context.bh_new(lambda: None, "deleted")
            bh.delete()
            assert aio_thread.run_sync(lambda: 6 * 7) == 42
            path = disk_image(1 << 20)
            import os
            assert os.path.getsize(path) == 1 << 20
    """, "-o", "aio_leak_wait=0.2")
    result.assert_outcomes(passed=6, errors=4)
    result.stdout.fnmatch_lines(["*leaked*forgotten*"])
    result.stdout.fnmatch_lines(["*leaked fd handlers: fd *"])
    result.stdout.fnmatch_lines(["*thread 'left-behind' outlived the test*"])
    result.stdout.fnmatch_lines(["*child process * (cat) outlived the test*"])


def test_main_loop_runs_the_test_under_the_bql_and_fails_on_a_source_left(pytester: pytest.Pytester) -> None:
    result = run(pytester, """
        from mainloop import IdleSource, bql_locked

        def test_under_the_bql(main_loop):
            assert bql_locked()
            ran = []
            main_loop.run_in_main_loop(lambda: ran.append("bh"), "work")
            while not ran:
                main_loop.main_loop_wait(False)
            assert ran == ["bh"]

        def test_the_bql_is_free_again():
            assert not bql_locked()

        def test_a_source_left(main_loop):
            main_loop.context.attach(IdleSource(lambda: True, name="forgotten-idle"))
    """)
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*the test's MainLoop kept source 'forgotten-idle' attached*"])


@pytest.mark.parametrize(("workers", "runs"), [("2", 1), ("4", 2)])
def test_the_example_test_file_passes_from_a_folder_of_its_own(tmp_path: pathlib.Path, workers: str,
                                                               runs: int) -> None:
    """examples/pytest_plugin: a user's test file, copied to a folder outside
    this repository (no conftest, no ini), run as its user would, in
    parallel, in random order (pytest-randomly, a new seed each run): with
    4 workers, twice in a row."""
    shutil.copy(EXAMPLE, tmp_path)
    seeds = set()
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-m", "pytest", "-n", workers, "-p", "no:cacheprovider", EXAMPLE.name],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert re.search(r"\b20 passed\b", done.stdout), done.stdout
        seed = re.search(r"--randomly-seed=(\d+)", done.stdout)
        assert seed is not None, done.stdout  # (in random order)
        seeds.add(seed.group(1))
    assert len(seeds) == runs


def test_the_cluster_leak_check_sees_a_clusters_processes() -> None:
    """What ``iothreads_cluster``'s teardown looks for: the launcher and
    what descends from it or shares its session while the cluster runs,
    nothing once it was closed."""
    with EmbeddedCluster(1 << 20, iothreads=2) as cluster:
        running = _cluster_processes(cluster.pid)
        assert cluster.pid in running and len(running) >= 3  # the launcher, and its two iothreads (at least)
    assert not _cluster_processes(cluster.pid) and not any(os.path.exists(f"/proc/{pid}") for pid in running)
    assert not os.path.exists(cluster.runtime_dir)
    with pytest.raises(ValueError, match="a size of 0 bytes or more, not -1"):
        EmbeddedCluster(-1)


SHARED_USER = """
    import json, os
    import pytest

    @pytest.mark.parametrize("i", range(8))
    def test_one_cluster_for_every_worker(iothreads_shared_cluster, i):
        cluster = iothreads_shared_cluster
        cluster.client.write("disk0", i * 4096, bytes([i + 1]) * 4096)
        assert cluster.client.read("disk0", i * 4096, 4096) == bytes([i + 1]) * 4096
        assert [t["id"] for t in cluster.qmp.cmd("query-iothreads")] == ["io0", "io1"]
        assert sorted(cluster.exports) == ["exp0", "exp1"]
        with open(os.environ["SEEN"], "a") as f:
            f.write(json.dumps({"pid": cluster.pid, "worker": os.environ.get("PYTEST_XDIST_WORKER"),
                                "runtime_dir": cluster.runtime_dir, "log": cluster.log_path}) + "\\n")
"""


@pytest.mark.parametrize("workers", ["0", "4"])  # (-n 2: the example file's run, above, has a shared cluster too)
def test_a_shared_cluster_is_launched_once_for_every_worker_and_stopped_after_the_last(
        pytester: pytest.Pytester, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, workers: str) -> None:
    seen = tmp_path / "seen.jsonl"
    monkeypatch.setenv("SEEN", str(seen))
    result = run(pytester, SHARED_USER, "-n", workers)
    result.assert_outcomes(passed=8)
    rows = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(rows) == 8
    assert len({row["pid"] for row in rows}) == 1  # one launch: every test saw the same launcher
    if workers != "0":
        assert len({row["worker"] for row in rows}) >= 2  # (several workers attached to it)
    assert not _cluster_processes(rows[0]["pid"])  # stopped with its iothreads...
    assert not os.path.exists(rows[0]["runtime_dir"])  # ...its runtime directory removed
    assert not os.path.exists(os.path.dirname(rows[0]["log"]))  # and the run's shared directory too


def test_a_shared_cluster_has_one_shape_and_module_clusters_live_for_their_module(pytester: pytest.Pytester) -> None:
    result = run(pytester, """
        import pytest

        @pytest.fixture(scope="module")
        def cluster(iothreads_cluster_factory):
            with iothreads_cluster_factory.launch(1 << 20, iothreads=1,
                                                  blockdevs=["driver=null-co,node-name=null0,iothread=io0"],
                                                  exports=["type=nbd,id=nullexp,node-name=null0"]) as c:
                yield c

        def test_first(cluster):
            cluster.client.write("disk0", 0, b"m" * 512)
            test_first.pid = cluster.pid
            assert sorted(cluster.exports) == ["nullexp"]
            assert [e["id"] for e in cluster.qmp.cmd("query-block-exports")] == ["nullexp"]

        def test_second_sees_the_same_cluster(cluster):
            assert cluster.pid == test_first.pid and cluster.client.read("disk0", 0, 512) == b"m" * 512

        def test_one_name_one_shape(iothreads_cluster_factory):
            iothreads_cluster_factory.shared("small", 1 << 20, iothreads=1)
            with pytest.raises(ValueError, match="one name, one shape"):
                iothreads_cluster_factory.shared("small", 1 << 20, iothreads=2)
            with pytest.raises(ValueError, match="plain file name"):
                iothreads_cluster_factory.shared("../elsewhere")
            with pytest.raises(TypeError, match="sequences of strings"):
                iothreads_cluster_factory.launch(blockdevs="driver=null-co,node-name=x")
    """)
    result.assert_outcomes(passed=3)


def test_a_failed_tests_report_has_its_clusters_log_and_keep_failed_keeps_their_files(
        pytester: pytest.Pytester, tmp_path: pathlib.Path) -> None:
    base = tmp_path / "base"
    result = run(pytester, """
        def test_fails(iothreads_cluster):
            cluster = iothreads_cluster(1 << 20, iothreads=1)
            cluster.client.write("disk0", 8192, b"evidence" * 512)
            assert False, "the test failed"

        def test_passes(iothreads_cluster):
            iothreads_cluster(1 << 20, iothreads=1)
    """, "--iothreads-keep-failed", f"--basetemp={base}", "--iothreads-log-level=debug")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*- iothreads cluster 0, launcher * (kept in *cluster0) -*",
                                 "*iothread io0*"])  # (what the launcher said, at debug)
    kept = list((base / "iothreads-kept").iterdir())
    assert [k.name for k in kept] == ["test_user.py_test_fails"]  # (the passing test's cluster is not kept)
    cluster0 = kept[0] / "cluster0"
    assert (cluster0 / "launcher.log").read_text().strip()
    with open(cluster0 / "disk.img", "rb") as image:
        assert os.fstat(image.fileno()).st_size == 1 << 20
        image.seek(8192)
        assert image.read(4096) == b"evidence" * 512
    assert any((cluster0 / "runtime").iterdir())  # the runtime directory's files (its state file...)


def test_a_run_killed_outright_leaves_no_shared_cluster_running(tmp_path: pathlib.Path) -> None:
    """SIGKILL of the whole run (controller and workers) while a shared
    cluster serves: its launcher watches the controller, so it stops its
    iothreads and removes its runtime directory by itself."""
    fifo = tmp_path / "ready"
    os.mkfifo(fifo)
    (tmp_path / "test_hangs.py").write_text(
        "import json, threading\n"
        "def test_hangs(iothreads_shared_cluster):\n"
        f"    with open({str(fifo)!r}, 'w') as f:\n"
        "        f.write(json.dumps({'pid': iothreads_shared_cluster.pid,\n"
        "                            'runtime_dir': iothreads_shared_cluster.runtime_dir}))\n"
        "    threading.Event().wait(120)  # (a hung test: the run is killed meanwhile)\n")
    run_ = subprocess.Popen([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:randomly", "-p", "no:cacheprovider",
                             "test_hangs.py"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        with open(fifo) as f:  # (returns once the test has the cluster and writes)
            seen = json.loads(f.read())
        launcher = _cluster_processes(seen["pid"])
        assert seen["pid"] in launcher
    finally:
        os.killpg(run_.pid, signal.SIGKILL)
        run_.wait(30)
    pidfd = os.pidfd_open(seen["pid"])
    try:
        assert select.select([pidfd], [], [], 30)[0], "the launcher outlived its run"
    finally:
        os.close(pidfd)
    for pid in launcher:
        with contextlib.suppress(ProcessLookupError):
            waiting = os.pidfd_open(pid)
            try:
                assert select.select([waiting], [], [], 30)[0], f"process {pid} of the cluster outlived the run"
            finally:
                os.close(waiting)
    assert not os.path.exists(seen["runtime_dir"])
