"""The installed pytest plugin (``mainloop.pytest_plugin``, entry point
``pytest11``), run the way a user's test suite runs it: test files of their
own in a session of their own (pytest's ``pytester``), with the plugin found
through its entry point, not through this repository's conftest."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from mainloop import EmbeddedCluster
from mainloop.pytest_plugin import _cluster_processes

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.integration  # (each test starts a pytest of its own)

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "pytest_plugin" / "test_with_the_plugin.py"


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_user=source)
    return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "--strict-markers", *args)


def test_the_plugin_is_found_through_its_entry_point(pytester: pytest.Pytester) -> None:
    result = run(pytester, "def test_nothing(): pass", "--fixtures")
    for name in ("aio_context", "aio_clock", "aio_autojump_clock", "aio_thread", "disk_image", "iothreads_cluster"):
        result.stdout.fnmatch_lines([f"{name} -- *pytest_plugin.py*"])


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

        def test_clean(aio_context, aio_thread, disk_image):
            bh = aio_context.bh_new(lambda: None, "deleted")
            bh.delete()
            assert aio_thread.run_sync(lambda: 6 * 7) == 42
            path = disk_image(1 << 20)
            import os
            assert os.path.getsize(path) == 1 << 20
    """, "-o", "aio_leak_wait=0.2")
    result.assert_outcomes(passed=4, errors=3)
    result.stdout.fnmatch_lines(["*leaked*forgotten*"])
    result.stdout.fnmatch_lines(["*leaked fd handlers: fd *"])
    result.stdout.fnmatch_lines(["*threads outlived the test: ?'left-behind'?*"])


@pytest.mark.parametrize(("workers", "runs"), [("2", 2), ("4", 1)])
def test_the_example_test_file_passes_from_a_folder_of_its_own(tmp_path: pathlib.Path, workers: str,
                                                               runs: int) -> None:
    """examples/pytest_plugin: a user's test file, copied to a folder outside
    this repository (no conftest, no ini), run as its user would, in
    parallel, in random order (pytest-randomly, a new seed each run)."""
    shutil.copy(EXAMPLE, tmp_path)
    seeds = set()
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-m", "pytest", "-n", workers, "-p", "no:cacheprovider", EXAMPLE.name],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert re.search(r"\b7 passed\b", done.stdout), done.stdout
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
