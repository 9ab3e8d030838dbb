"""The pytest plugin of this project, installed with it (entry point ``pytest11``: ``iothreads``).

Fixtures, each with a teardown that runs even when the test failed and that
fails the test on a leak (it names what leaked):

* ``aio_context``: a fresh AioContext whose home thread is the test's; an
  exception in one of its callbacks fails the test (it leaves ``poll``).
  On a fake clock when the test also asks for ``aio_clock`` or
  ``aio_autojump_clock``.  Leaks: a bottom half not deleted, an fd handler
  still registered, a thread or a child process the test started and left
  running.
* ``aio_clock``: a ``FakeClock`` that moves only when the test advances it.
* ``aio_autojump_clock``: a fake clock that an ``aio`` test's runner moves to
  the next timer's deadline whenever the context has nothing else to do
  (trio's ``autojump_clock``): timeouts of minutes take no time.
* ``aio_thread``: a ``LoopThread``, an AioContext running in a thread of its
  own (stopped, and checked for leaks, at the end).
* ``main_loop``: a ``MainLoop`` for the test's thread, which holds the BQL
  for the test (as a main-loop process's main thread does); leaks as
  ``aio_context``'s, and a source left attached.
* ``disk_image``: a factory of raw images (``disk_image(size_bytes)``, a
  path in the test's ``tmp_path``).
* ``iothreads_cluster``: a factory of launched clusters for the test
  (``iothreads_cluster(size_bytes, iothreads=2, nbd=False, blockdevs=(),
  exports=(), args=())``, an ``EmbeddedCluster``: ``qmp``, ``client``,
  ``exports``), stopped at its end; a process of one still running then,
  or its runtime directory, fails the test.  A failed test's report has
  their logs; ``--iothreads-keep-failed`` keeps their files.
* ``iothreads_cluster_factory``: the same for any scope (session-scoped, as
  pytest's ``tmp_path_factory``): ``.launch(...)`` in a module- or
  session-scoped fixture of one's own, and ``.shared(name, ...)``, a cluster
  shared by every worker of an xdist run (``_shared``).
* ``iothreads_shared_cluster``: ``.shared("default", nbd=True)``.

The marker ``@pytest.mark.aio`` runs an ``async def`` test as one of our
coroutines on ``aio_context`` (``ctx.spawn``), polling the context until it
ends; ``@pytest.mark.aio(timeout_s=S)`` bounds it (default: the ini option
``aio_timeout``, 30 s), and a test past it fails with what the context still
had registered.  The coroutine may ``await`` our futures, ``sleep_ns``,
``reschedule``, the block client's ``aread``...

What the plugin needs of pytest-xdist (tested in this repository's
``tests/test_pytest_plugin.py``): ``workerinput`` and the
``pytest_configure_node`` hook to hand the shared clusters' directory to the
workers, and the controller's ``pytest_sessionfinish`` running after every
worker's.  It does not rely on ``--dist loadgroup``.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from iothreads import AioContext
from iothreads.testing import FakeClock, LoopThread

from ..cli._embedded import EmbeddedCluster
from ..loop import MainLoop, bql_lock, bql_locked, bql_unlock
from ._factory import ClusterFactory, keep, kept_path, launched_pids
from ._processes import Snapshot, cluster_processes
from ._shared import SharedCluster, SharedClusters

__all__ = ["AutojumpClock", "ClusterFactory", "SharedCluster", "cluster_processes"]

DEFAULT_AIO_TIMEOUT_S = 30.0
DEFAULT_LEAK_WAIT_S = 10.0

_SHARED = pytest.StashKey[SharedClusters]()
_CONTROLLER = pytest.StashKey[bool]()  # whether this process is the run's controller
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()  # a test's reports by phase
_FACTORY = pytest.StashKey[ClusterFactory]()  # a test's function-scoped clusters


class AutojumpClock(FakeClock):
    """A fake clock that the ``aio`` marker's runner moves to the next
    timer's deadline when the context would otherwise sleep."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("aio_timeout", "the default bound, in seconds, on an @pytest.mark.aio test",
                  default=str(DEFAULT_AIO_TIMEOUT_S))
    parser.addini("aio_leak_wait", "how long, in seconds, a test's teardown waits for the threads and child "
                  "processes it started to end before it calls them leaked", default=str(DEFAULT_LEAK_WAIT_S))
    group = parser.getgroup("iothreads", "the iothreads plugin's clusters")
    group.addoption("--iothreads-keep-failed", action="store_true",
                    help="keep the files of a failed test's clusters (its log, its runtime directory's files, "
                         "its image) under the run's base temporary directory, in iothreads-kept/")
    group.addoption("--iothreads-log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="the launcher's --log-level for the fixtures' clusters (default info); what they "
                         "say is in a failed test's report")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "aio(timeout_s=None): run this async def test as a coroutine on "
                                       "aio_context (the iothreads plugin)")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "iothreads_shared" in workerinput:
        given = workerinput["iothreads_shared"]
        config.stash[_SHARED] = SharedClusters(given["directory"], given["owner_pid"], workerinput["workerid"],
                                               int(workerinput["workercount"]),
                                               config.getoption("iothreads_log_level"))
    config.stash[_CONTROLLER] = workerinput is None


def _shared_clusters(config: pytest.Config) -> SharedClusters | None:
    """This process's view of the run's shared clusters; the controller makes
    its directory at the first call (once pytest's base temporary directory
    is set up)."""
    shared = config.stash.get(_SHARED, None)
    if shared is None and config.stash.get(_CONTROLLER, False):
        shared = config.stash[_SHARED] = SharedClusters.create(_basetemp(config), 1,
                                                               config.getoption("iothreads_log_level"))
    return shared


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """(pytest-xdist's hook, in the controller, for each worker it starts.)"""
    shared = _shared_clusters(node.config)
    if shared is not None:
        node.workerinput["iothreads_shared"] = {"directory": shared.directory, "owner_pid": shared.owner_pid}


def _distributing(config: pytest.Config) -> bool:
    """Whether this controller hands its tests to xdist's workers."""
    return config.pluginmanager.has_plugin("dsession")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    shared = config.stash.get(_SHARED, None)
    if shared is None:
        return
    controller = config.stash.get(_CONTROLLER, False)
    if not (controller and _distributing(config)):
        shared.finish()  # (a worker, or a run without workers)
    if controller:
        problems = shared.stop_all()
        if problems:
            reporter = config.pluginmanager.get_plugin("terminalreporter")
            for problem in problems:
                if reporter is not None:
                    reporter.write_line(f"iothreads plugin: {problem}", red=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    factory = item.stash.get(_FACTORY, None)
    if report.failed and factory is not None:
        base = _kept_base(item.config)
        for i, cluster in enumerate(factory.clusters):
            if cluster.returncode is None and not cluster.log.closed:
                kept = f" (kept in {kept_path(base, item.nodeid, i)})" if base else ""
                report.sections.append((f"iothreads cluster {i}, launcher {cluster.pid}{kept}",
                                        cluster.messages() or "(nothing said)"))
    return report


def _basetemp(config: pytest.Config) -> str | None:
    """The run's base temporary directory (what the ``tmp_path_factory`` fixture gives), if set up."""
    factory = getattr(config, "_tmp_path_factory", None)
    return str(factory.getbasetemp()) if factory is not None else None


def _kept_base(config: pytest.Config) -> str | None:
    if not config.getoption("iothreads_keep_failed"):
        return None
    return os.path.join(_basetemp(config) or os.getcwd(), "iothreads-kept")


def _failed(item: pytest.Item) -> bool:
    return any(r.failed for r in item.stash.get(_REPORTS, {}).values())


# -- leaks ------------------------------------------------------------------------


def _outlived(before: Snapshot, config: pytest.Config) -> list[str]:
    """The threads and child processes started since ``before`` still alive
    after ``aio_leak_wait`` (the plugin's own launchers aside), each a sentence."""
    return [f"{what} outlived the test" for what in before.leaks(float(config.getini("aio_leak_wait")),
                                                                 launched_pids)]


def _context_leaks(ctx: AioContext) -> list[str]:
    """What ``ctx`` still holds that a test should have released: fd handlers
    (its own notifier aside)."""
    return [f"fd {h['fd']} (read: {h['io_read']}, write: {h['io_write']})"
            for h in ctx.describe_handlers() if h["what"] != "notifier"]


def _close_checked(ctx: AioContext | MainLoop, what: str, contexts: list[AioContext]) -> list[str]:
    """Close ``ctx``; what leaked (after closing it anyway), each a sentence."""
    fds = [fd for c in contexts if not c.closed for fd in _context_leaks(c)]
    found = []
    try:
        ctx.close()
    except Exception as exc:  # BottomHalfLeakError: it names the bottom halves
        found.append(f"{what} leaked: {exc}")
    if fds:
        found.append(f"{what} leaked fd handlers: {', '.join(fds)}")
    return found


def _fail_on(leaks: list[str]) -> None:
    if leaks:
        pytest.fail("; ".join(leaks), pytrace=False)


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture
def aio_clock() -> FakeClock:
    """A fake clock: ``aio_context`` runs on it; it moves only by ``advance_ns``."""
    return FakeClock()


@pytest.fixture
def aio_autojump_clock() -> AutojumpClock:
    """A fake clock that jumps to the next timer when an ``aio`` test's context is idle."""
    return AutojumpClock()


def _raise(ctx: object, exc: Exception, where: str) -> None:
    raise exc


@pytest.fixture
def aio_context(request: pytest.FixtureRequest) -> Iterator[AioContext]:
    """A fresh AioContext for the test's thread (on a fake clock if the test
    asked for one); callbacks' exceptions fail the test; a leak at the end
    (a bottom half, an fd handler, a thread, a child process) fails it too."""
    clock: FakeClock | None = None
    for name in ("aio_autojump_clock", "aio_clock"):
        if name in request.fixturenames:
            clock = request.getfixturevalue(name)
            break
    before = Snapshot()
    name = f"test:{request.node.name}"[:64]
    ctx = AioContext(clock=clock, name=name) if clock is not None else AioContext(name=name)
    ctx.set_exception_handler(_raise)
    yield ctx
    _fail_on(_close_checked(ctx, "the test's AioContext", [ctx]) + _outlived(before, request.config))


@pytest.fixture
def main_loop(request: pytest.FixtureRequest) -> Iterator[MainLoop]:
    """A MainLoop for the test's thread, whose callbacks' exceptions fail the
    test; the test holds the BQL throughout (``main_loop_wait`` needs it),
    and it is released at the end.  Leaks as ``aio_context``'s, and a
    source left attached to its MainContext."""
    if bql_locked():
        pytest.fail("main_loop: this thread already holds the BQL", pytrace=False)
    before = Snapshot()
    loop = MainLoop(name=f"test:{request.node.name}"[:64])
    for handled in (loop.context, loop.aio_context, loop.iohandler_context):
        handled.set_exception_handler(_raise)
    own_sources = set(loop.context.sources())
    bql_lock()
    try:
        yield loop
    finally:
        if bql_locked():
            bql_unlock()
    sources = [f"source {src.name!r}" for src in loop.context.sources() if src not in own_sources]
    leaks = [f"the test's MainLoop kept {', '.join(sources)} attached"] if sources else []
    leaks += _close_checked(loop, "the test's MainLoop", [loop.aio_context, loop.iohandler_context])
    _fail_on(leaks + _outlived(before, request.config))


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


def _factory(config: pytest.Config) -> ClusterFactory:
    return ClusterFactory(_shared_clusters(config), config.getoption("iothreads_log_level"))


@pytest.fixture
def iothreads_cluster(request: pytest.FixtureRequest) -> Iterator[Callable[..., EmbeddedCluster]]:
    """``iothreads_cluster(size_bytes=64 MiB, *, iothreads=2, nbd=False,
    blockdevs=(), exports=(), args=())``: a launched cluster (an
    ``EmbeddedCluster``: ``qmp`` a QMP client, ``client`` a block client,
    ``exports`` the NBD URIs, ``runtime_dir``, ``qmp_path``), stopped at the
    test's end; a process of it still running then, or its runtime
    directory still there, fails the test.  A failed test's report shows
    what its clusters said; with ``--iothreads-keep-failed`` their files are
    kept (the report says where)."""
    factory = _factory(request.config)
    request.node.stash[_FACTORY] = factory
    yield factory.launch
    base = _kept_base(request.config)
    problems = []
    if base is not None and _failed(request.node):
        for i, cluster in enumerate(factory.clusters):
            if cluster.returncode is None and not cluster.log.closed:
                try:
                    keep(cluster, kept_path(base, request.node.nodeid, i))
                except OSError as exc:
                    problems.append(f"--iothreads-keep-failed could not keep cluster {i}: {exc}")
    _fail_on(problems + [f"the test's clusters left {what}" for what in factory.close_all()])


@pytest.fixture(scope="session")
def iothreads_cluster_factory(request: pytest.FixtureRequest) -> Iterator[ClusterFactory]:
    """Clusters for any scope (as pytest's ``tmp_path_factory``):
    ``.launch(...)`` (``iothreads_cluster``'s options) in a module- or
    session-scoped fixture, closed by it or at the end of the session;
    ``.shared(name="default", ...)``, the cluster ``name`` shared by every
    worker of the run (the first to ask launches it, the last to finish
    stops it).  At the end, a cluster that left processes or its runtime
    directory fails the session's last test."""
    factory = _factory(request.config)
    yield factory
    _fail_on([f"the session's clusters left {what}" for what in factory.close_all()])


@pytest.fixture(scope="session")
def iothreads_shared_cluster(iothreads_cluster_factory: ClusterFactory) -> SharedCluster:
    """The run's shared cluster ``default``: two iothreads, a 64 MiB image,
    ``disk0`` on io0 and ``disk1`` on io1, exported over NBD as ``exp0`` and
    ``exp1``; the same one in every worker of an xdist run."""
    return iothreads_cluster_factory.shared("default", nbd=True)


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
