"""Clusters for the integration tests, in the two shapes the tests need, and
a bounded wait for processes to exit.

``Clusters`` (the ``clusters`` fixture of ``conftest.py``) starts them and
makes sure that none outlives its test:

* ``start``: a ``Cluster`` in the test's own process, on a ``MainLoop`` of
  its own, that the test drives under the BQL (``Cluster.wait_for``);
* ``launch``: ``iothreads launch`` as a user runs it, a process that prints
  its events on stdout; the test talks to it as a user would (QMP, the
  block client, signals).

``descendants`` and ``wait_gone`` find a process's tree and wait for it to
exit: a test that stops something checks that what it started is gone;
``iothreads_of`` and ``processes_in`` find what outlived a process that
exited (its iothreads are in sessions of their own, and reparented then);
``left_behind`` what a script left in its TMPDIR.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from iothreads.testing import poll_until
from mainloop import Cluster, IOThreadConfig, MainLoop, bql

COMMAND = [sys.executable, "-m", "mainloop"]
"""The ``iothreads`` command, as a user runs it."""

START_S = 30.0
"""Bound on a cluster's start (every iothread running)."""

STOP_S = 30.0
"""Bound on a launcher's exit once it is told to stop."""

GONE_S = 10.0
"""Bound on a stopped launcher's iothreads' exit."""


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc), whatever their session: its
    children first, then theirs."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        try:
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except FileNotFoundError:  # it (or one of its threads) exited meanwhile
            pass
        if parent != pid:
            found.append(parent)
    return found


def iothreads_of(launcher_pid: int) -> list[int]:
    """The iothread processes a launcher started that still exist, wherever
    they are now (in sessions of their own, reparented once it exited): found
    by the ``--parent-pid`` on their command lines."""
    def match(argv: list[str], cwd: str) -> bool:
        return "iothreads.worker" in argv and "--parent-pid" in argv and \
            argv[argv.index("--parent-pid") + 1:][:1] == [str(launcher_pid)]
    return _processes(match)


def janitor_of(launcher_pid: int) -> int | None:
    """The janitor a launcher started (``iothreads cleanup --when-gone PID``),
    wherever it is now; None if there is none (any more)."""
    def match(argv: list[str], cwd: str) -> bool:
        return "--when-gone" in argv and argv[argv.index("--when-gone") + 1:][:1] == [str(launcher_pid)]
    found = _processes(match)
    return found[0] if found else None


def processes_in(directory: str) -> list[int]:
    """The processes whose working directory is ``directory`` or below it."""
    root = os.path.realpath(directory)
    return _processes(lambda argv, cwd: cwd == root or cwd.startswith(root + os.sep))


def left_behind(scratch: str) -> list[str]:
    """What a script run with ``scratch`` as its TMPDIR left: files in it,
    file systems mounted under it, processes whose command line names it
    (launchers, iothreads, servers and clients given paths in it do)."""
    left = [f"file {name}" for name in os.listdir(scratch)]
    with open("/proc/mounts") as f:
        left += [f"mount {line.split()[1]}" for line in f if line.split()[1].startswith(scratch)]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if scratch in cmdline:
            left.append(f"process {pid}: {cmdline.replace(chr(0), ' ')}")
    return left


def _processes(match: Callable[[list[str], str], bool]) -> list[int]:
    """The processes (zombies aside) whose command line and working directory match."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:  # gone meanwhile, or a zombie (no cwd)
            continue
        if match(argv, cwd):
            found.append(int(entry))
    return found


def _as_at_a_terminal() -> None:
    """In the child, before it runs: SIGINT's default action, as a command
    started at a terminal has it.  A test run started in the background
    (``cmd &`` in a script, ``nohup``) passes SIGINT on ignored, and Python
    then leaves it ignored: Ctrl-C would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_at(argv: list[str], point: str, name: str, *, cwd: str | os.PathLike[str],
                 env: dict[str, str] | None = None, timeout_s: float = 60) -> list[int]:
    """Run ``argv`` in a session of its own until it prints a line starting
    with ``point``, then Ctrl-C it as a terminal does (SIGINT to its process
    group): it must end with one line, ``NAME: interrupted``, and status
    130, and every process it had started must be gone.  Those processes."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_as_at_a_terminal)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded: it ends by itself
            if line.startswith(point):
                break
        else:
            raise AssertionError(f"{name} ended before {point!r}")
        started = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130 and err == f"{name}: interrupted\n", f"status {proc.returncode}, stderr {err!r}"
    wait_gone(started, 30, f"what {name} started")
    return started


def wait_gone(pids: list[int], timeout_s: float, what: str = "the processes") -> None:
    """Wait until every process of ``pids`` has exited, on pidfds (woken by the
    exits, no polling); fail naming those still alive after ``timeout_s``.

    For processes that are not the caller's children (a launcher's iothreads);
    an exited child that was not reaped yet counts as gone.
    """
    fds: dict[int, int] = {}  # pidfd: pid
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    alive = set(fds)

    def step() -> None:
        for fd, _ in p.poll(int(timeout_s * 1000)):
            alive.discard(fd)
            p.unregister(fd)

    try:
        poll_until(step, lambda: not alive,
                   lambda: f"{what} to exit (still alive: {sorted(fds[fd] for fd in alive)})", timeout_s)
    finally:
        for fd in fds:
            os.close(fd)


@dataclass
class _Launcher:
    proc: subprocess.Popen[str]
    clean_exit: bool
    ready: dict[str, Any] = field(default_factory=dict)  # the READY event's data, once it came


class Clusters:
    """The clusters of one test; ``close`` ends them and checks they left nothing.

    At the end of the test, in the reverse order of their start:

    * an in-process cluster is shut down; its runtime directory must be gone;
    * a launcher still running gets SIGTERM.  Unless it was started with
      ``clean_exit=False`` (a test that kills it checks what it expects
      itself), it must exit with status 0, however it was stopped, and
      leave its runtime directory empty or removed.  The iothreads of its
      READY line, and its janitor, must be gone.
    """

    def __init__(self, scratch_dir: str) -> None:
        self.scratch_dir = scratch_dir
        self._exit = contextlib.ExitStack()

    def image(self, size_bytes: int, name: str = "disk.img") -> str:
        """A sparse file of ``size_bytes`` in the scratch directory, for a file node."""
        path = os.path.join(self.scratch_dir, name)
        with open(path, "wb") as f:
            f.truncate(size_bytes)
        return path

    # -- in process ----------------------------------------------------------------

    def start(self, *iothreads: str | IOThreadConfig, **options: Any) -> Cluster:
        """A ``Cluster`` on a ``MainLoop`` of its own, with ``iothreads`` (ids or
        configs) added and running; ``options`` go to ``Cluster`` (say
        ``heartbeat_interval_ms``).  Home thread: the test's."""
        loop = MainLoop(name="test")
        self._exit.callback(loop.close)
        with bql():
            cluster = Cluster(loop, **options)
        self._exit.callback(self._shut_down, cluster)
        with bql():
            for t in iothreads:
                cluster.add(t if isinstance(t, IOThreadConfig) else IOThreadConfig(t))
            assert cluster.wait_for(cluster.all_running, START_S), f"not all running: {cluster.iothreads}"
        return cluster

    @staticmethod
    def _shut_down(cluster: Cluster) -> None:
        with bql():
            cluster.shutdown()
        assert not os.path.exists(cluster.runtime_dir), f"{cluster.runtime_dir} outlived the cluster"

    # -- launched ------------------------------------------------------------------

    def spawn(self, *args: str, clean_exit: bool = True, umask: int = -1) -> subprocess.Popen[str]:
        """``iothreads launch ARGS``, stdout and stderr piped, at once (the test
        reads its events itself); with ``umask`` if not -1."""
        return self._spawn(args, clean_exit, umask).proc

    def launch(self, *args: str, clean_exit: bool = True, umask: int = -1,
               fd_limit: int = 0) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        """``iothreads launch ARGS`` once it is ready: the process and the data
        of its READY event; with ``umask`` if not -1, and started from a shell
        after ``ulimit -n FD_LIMIT`` (soft and hard) if given."""
        launcher = self._spawn(args, clean_exit, umask, fd_limit)
        proc = launcher.proc
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded by the launcher's own handshake deadline
            event = json.loads(line)
            if event["event"] == "READY":
                launcher.ready = event["data"]
                return proc, launcher.ready
        _, err = proc.communicate(timeout=STOP_S)
        raise AssertionError(f"no READY line; exit status {proc.returncode}; stderr: {err}")

    def _spawn(self, args: tuple[str, ...], clean_exit: bool, umask: int, fd_limit: int = 0) -> _Launcher:
        argv = [*COMMAND, "launch", *args]
        if fd_limit:
            argv = ["sh", "-c", 'ulimit -n "$0" && exec "$@"', str(fd_limit), *argv]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, umask=umask)
        launcher = _Launcher(proc, clean_exit)
        self._exit.callback(self._stop, launcher)
        return launcher

    @staticmethod
    def _stop(launcher: _Launcher) -> None:
        proc = launcher.proc
        janitor = janitor_of(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=STOP_S)  # again, if the test did: it returns what it read
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"the launcher did not exit in {STOP_S:g} s after SIGTERM") from None
        ready = launcher.ready
        if launcher.clean_exit:
            assert proc.returncode == 0, f"the launcher exited with status {proc.returncode}: {err}"
            runtime_dir = ready.get("runtime_dir")
            left = os.listdir(runtime_dir) if runtime_dir is not None and os.path.exists(runtime_dir) else []
            assert left == [], f"left in the runtime directory {runtime_dir}: {left}"
        wait_gone([t["pid"] for t in ready.get("iothreads", ())] + ([janitor] if janitor else []), GONE_S,
                  "the iothreads and the janitor of a stopped launcher")

    def close(self) -> None:
        """End every cluster (any order of failures: each is ended, the first
        failure is raised)."""
        self._exit.close()
