"""The pytest plugin of this project, installed with it (entry point ``pytest11``: ``iothreads``).

Fixtures, each with a teardown that runs even when the test failed and that
fails the test on a leak (it names what leaked):

* ``aio_context``: a fresh AioContext whose home thread is the test's; an
  exception in one of its callbacks fails the test (it leaves ``poll``).
  On a fake clock when the test also asks for ``aio_clock`` or
  ``aio_autojump_clock``.  Leaks: a bottom half not deleted, an fd handler
  still registered.
* ``aio_clock``: a ``FakeClock`` that moves only when the test advances it.
* ``aio_autojump_clock``: a fake clock that an ``aio`` test's runner moves to
  the next timer's deadline whenever the context has nothing else to do
  (trio's ``autojump_clock``): timeouts of minutes take no time.
* ``aio_thread``: a ``LoopThread``, an AioContext running in a thread of its
  own (stopped, and checked for leaks, at the end).
* ``disk_image``: a factory of raw images (``disk_image(size_bytes)``, a
  path in the test's ``tmp_path``).
* ``iothreads_cluster``: a factory of launched clusters
  (``iothreads_cluster(size_bytes, iothreads=2, nbd=False, args=())``, an
  ``EmbeddedCluster``), stopped at the end; a process of one still running,
  or its runtime directory, fails the test.

A test that uses ``aio_context`` is also checked for threads it started
and did not stop (given ``aio_leak_wait`` seconds, 10 by default, to end).

The marker ``@pytest.mark.aio`` runs an ``async def`` test as one of our
coroutines on ``aio_context`` (``ctx.spawn``), polling the context until it
ends; ``@pytest.mark.aio(timeout_s=S)`` bounds it (default: the ini option
``aio_timeout``, 30 s), and a test past it fails with what the context still
had registered.  The coroutine may ``await`` our futures, ``sleep_ns``,
``reschedule``, the block client's ``aread``...
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from iothreads import AioContext
from iothreads.testing import FakeClock, LoopThread

from .cli import EmbeddedCluster

__all__ = ["AutojumpClock"]

DEFAULT_AIO_TIMEOUT_S = 30.0
DEFAULT_LEAK_WAIT_S = 10.0


class AutojumpClock(FakeClock):
    """A fake clock that the ``aio`` marker's runner moves to the next
    timer's deadline when the context would otherwise sleep."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("aio_timeout", "the default bound, in seconds, on an @pytest.mark.aio test",
                  default=str(DEFAULT_AIO_TIMEOUT_S))
    parser.addini("aio_leak_wait", "how long, in seconds, a test's teardown waits for the threads it started "
                  "to end before it calls them leaked", default=str(DEFAULT_LEAK_WAIT_S))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "aio(timeout_s=None): run this async def test as a coroutine on "
                                       "aio_context (the iothreads plugin)")


# -- leaks ------------------------------------------------------------------------


def _threads_left(before: set[threading.Thread], join_s: float) -> list[str]:
    """The threads started since ``before`` that are still alive (each given
    ``join_s`` to end first: a thread on its way out is not a leak)."""
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    deadline = time.monotonic() + join_s
    for t in leaked:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in leaked if t.is_alive()]


def _context_leaks(ctx: AioContext) -> list[str]:
    """What ``ctx`` still holds that a test should have released: fd handlers
    (its own notifier aside)."""
    return [f"fd {h['fd']} (read: {h['io_read']}, write: {h['io_write']})"
            for h in ctx.describe_handlers() if h["what"] != "notifier"]


def _close_checked(ctx: AioContext, what: str) -> None:
    """Close ``ctx``; fail the test with what leaked (after closing it anyway)."""
    fds = _context_leaks(ctx) if not ctx.closed else []
    try:
        ctx.close()
    except Exception as exc:  # BottomHalfLeakError: it names the bottom halves
        pytest.fail(f"{what} leaked: {exc}" + (f"; and fd handlers: {', '.join(fds)}" if fds else ""),
                    pytrace=False)
    if fds:
        pytest.fail(f"{what} leaked fd handlers: {', '.join(fds)}", pytrace=False)


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture
def aio_clock() -> FakeClock:
    """A fake clock: ``aio_context`` runs on it; it moves only by ``advance_ns``."""
    return FakeClock()


@pytest.fixture
def aio_autojump_clock() -> AutojumpClock:
    """A fake clock that jumps to the next timer when an ``aio`` test's context is idle."""
    return AutojumpClock()


def _raise(ctx: AioContext, exc: Exception, where: str) -> None:
    raise exc


@pytest.fixture
def aio_context(request: pytest.FixtureRequest) -> Iterator[AioContext]:
    """A fresh AioContext for the test's thread (on a fake clock if the test
    asked for one); callbacks' exceptions fail the test; a leak at the end
    (a bottom half, an fd handler, a thread) fails it too."""
    clock: FakeClock | None = None
    for name in ("aio_autojump_clock", "aio_clock"):
        if name in request.fixturenames:
            clock = request.getfixturevalue(name)
            break
    threads = set(threading.enumerate())
    ctx = AioContext(clock=clock, name=f"test:{request.node.name}"[:64]) if clock is not None \
        else AioContext(name=f"test:{request.node.name}"[:64])
    ctx.set_exception_handler(_raise)
    yield ctx
    _close_checked(ctx, "the test's AioContext")
    left = _threads_left(threads, float(request.config.getini("aio_leak_wait")))
    if left:
        pytest.fail(f"threads outlived the test: {left}", pytrace=False)


@pytest.fixture
def aio_thread(request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    """An AioContext running in a thread of its own (``.ctx``, ``.run_sync``);
    stopped at the end, its leaks failing the test."""
    loop = LoopThread(f"aio-thread:{request.node.name}"[:32])
    yield loop
    leaks = loop.run_sync(lambda: _context_leaks(loop.ctx)) if loop.ident is not None else []
    loop.stop()
    if leaks:
        pytest.fail(f"the aio_thread's context leaked fd handlers: {', '.join(leaks)}", pytrace=False)


@pytest.fixture
def disk_image(tmp_path: Any) -> Callable[[int], str]:
    """``disk_image(size_bytes, name=None)``: a sparse raw image in the
    test's temporary directory (``disk0.img``, ``disk1.img``... unless
    named); its path."""
    made: list[str] = []

    def make(size_bytes: int, name: str | None = None) -> str:
        if size_bytes < 0:
            raise ValueError("an image's size is >= 0")
        path = os.path.join(str(tmp_path), name or f"disk{len(made)}.img")
        with open(path, "xb") as f:
            f.truncate(size_bytes)
        made.append(path)
        return path

    return make


def _process_table() -> dict[int, tuple[int, int]]:
    """Every live process: pid -> (parent pid, session id); zombies left out."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # (gone meanwhile)
        if fields[0] != "Z":
            table[int(entry)] = (int(fields[1]), int(fields[3]))
    return table


def _cluster_processes(launcher_pid: int) -> set[int]:
    """A cluster's processes: its launcher, what descends from it, and what
    is in its session (the launcher leads one)."""
    table = _process_table()
    found = {pid for pid, (_, sid) in table.items() if sid == launcher_pid}
    if launcher_pid in table:
        found.add(launcher_pid)
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


@pytest.fixture
def iothreads_cluster() -> Iterator[Callable[..., EmbeddedCluster]]:
    """``iothreads_cluster(size_bytes=64 MiB, *, iothreads=2, nbd=False,
    args=())``: a launched cluster (an ``EmbeddedCluster``: ``runtime_dir``
    for a ``BlockClient``, ``qmp_path`` for QMP, ``exports`` with ``nbd``),
    stopped at the test's end; a process of it still running then, or its
    runtime directory still there, fails the test."""
    made: list[EmbeddedCluster] = []
    processes: list[set[int]] = []  # each one's, once it was ready

    def make(size_bytes: int = 64 << 20, *, iothreads: int = 2, nbd: bool = False,
             args: Sequence[str] = ()) -> EmbeddedCluster:
        cluster = EmbeddedCluster(size_bytes, iothreads=iothreads, nbd=nbd, args=args)
        made.append(cluster)
        processes.append(_cluster_processes(cluster.pid))
        return cluster

    yield make
    left: list[str] = []
    for cluster, started in zip(made, processes):
        cluster.close()
        alive = (started | _cluster_processes(cluster.pid)) & set(_process_table())
        if alive:
            left.append(f"processes {sorted(alive)} of the cluster of launcher {cluster.pid}")
        if os.path.exists(cluster.runtime_dir):
            left.append(f"its runtime directory {cluster.runtime_dir}")
    if left:
        pytest.fail(f"the test's clusters left: {'; '.join(left)}", pytrace=False)


# -- the aio marker ---------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    marker = pyfuncitem.get_closest_marker("aio")
    if marker is None:
        return None
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        pytest.fail("@pytest.mark.aio is for async def tests", pytrace=False)
    funcargs = pyfuncitem.funcargs
    ctx = funcargs.get("aio_context")
    if not isinstance(ctx, AioContext):
        pytest.fail("an @pytest.mark.aio test runs on aio_context: ask for it", pytrace=False)
    timeout_s = marker.kwargs.get("timeout_s")
    if timeout_s is None:
        timeout_s = pyfuncitem.config.getini("aio_timeout")
    try:
        timeout_s = float(timeout_s)
    except (TypeError, ValueError):
        timeout_s = -1.0
    if not timeout_s > 0:  # (NaN too)
        pytest.fail(f"@pytest.mark.aio: timeout_s (or the ini option aio_timeout) must be a number of seconds "
                    f"above 0, not {marker.kwargs.get('timeout_s', pyfuncitem.config.getini('aio_timeout'))!r}",
                    pytrace=False)
    names = pyfuncitem._fixtureinfo.argnames
    coro = pyfuncitem.obj(**{name: funcargs[name] for name in names})
    co = ctx.spawn(coro, pyfuncitem.name)
    clock = funcargs.get("aio_autojump_clock")
    deadline = time.monotonic() + timeout_s
    while not co.done():
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            co_state = repr(co)
            pending = _context_leaks(ctx)
            pytest.fail(f"the aio test did not end in {timeout_s} s: {co_state} still waits"
                        + (f"; registered: {', '.join(pending)}" if pending else "")
                        + f"; next timer in {ctx.until_next_timer_ns()} ns", pytrace=False)
        if ctx.poll(False):
            continue
        if isinstance(clock, AutojumpClock):
            until_ns = ctx.until_next_timer_ns()
            if until_ns > 0:
                clock.advance_ns(until_ns)  # nothing else to do: the next timer is due now
                continue
        ctx.poll(True, int(min(left_s, 0.1) * 1e9))
    co.result()  # (its exception, if it raised)
    return True
