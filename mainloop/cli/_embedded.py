"""A cluster run by a program or a test: ``EmbeddedCluster`` (``iothreads
launch`` in a child process) and ``ClusterHandle``, what code needs of any
running cluster (its runtime directory, a QMP client, a block client, the NBD
URIs of its exports).

An embedded cluster lives as long as the process that made it (the default),
or, given an ``owner_pid``, as long as that process: then it outlives its
maker, and whoever stops it calls ``stop_launcher`` with the launcher's pid
and start time (the pytest plugin's cluster shared by the workers of a run).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING

from iothreads import BlockClient, die_with_parent
from protocol import make_runtime_dir

from ..cluster._spawn import spawn

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol

__all__ = ["ClusterHandle", "EmbeddedCluster", "launcher_main", "proc_stat", "process_start_time",
           "stop_launcher", "wait_pidfd"]

log = logging.getLogger("mainloop.cli")

EXIT_ORPHANED = 3  # the launcher's status when its parent or owner was gone before it could watch it
STOP_TIMEOUT_S = 30.0  # from SIGTERM to SIGKILL

# What the child runs: ``launcher_main`` below, in a fresh interpreter.
_LAUNCHER = "import sys\nfrom mainloop.cli._embedded import launcher_main\nsys.exit(launcher_main(sys.argv[1:]))\n"


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command's name (the first is
    the state, field 3), or None if no such process, or only its zombie, is left."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, /proc's field 22): with
    the pid, it names one process even after the pid is reused.  None if no
    such process (or only its zombie) is left."""
    fields = proc_stat(pid)
    return None if fields is None else int(fields[19])


def wait_pidfd(pidfd: int, timeout_s: float | None) -> bool:
    """Whether the process of ``pidfd`` has exited, waiting up to ``timeout_s`` (None: for ever)."""
    waiter = select.poll()
    waiter.register(pidfd, select.POLLIN)
    return bool(waiter.poll(None if timeout_s is None else int(timeout_s * 1000)))


def stop_launcher(pid: int, start_time: int, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop the launcher ``pid`` (SIGTERM, then SIGKILL after ``timeout_s``)
    from any process, its parent or not; nothing if ``pid`` is no longer
    the process that started at ``start_time``.  Whether it had to be killed."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if process_start_time(pid) != start_time:
            return False  # gone, and its pid given to another process
        return _terminate(pidfd, timeout_s)
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def _terminate(pidfd: int, timeout_s: float) -> bool:
    """SIGTERM to the process of ``pidfd``, SIGKILL if it has not exited
    ``timeout_s`` later; return once it has exited: whether it was killed."""
    signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    if wait_pidfd(pidfd, timeout_s):
        return False
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    wait_pidfd(pidfd, None)
    return True


class _EventsOut(io.TextIOBase):
    """The stdout of a launcher that outlives the process reading it: lines
    go to the pipe while someone reads it, then to stderr (the log)."""

    def __init__(self, pipe: IO[str], fallback: IO[str]) -> None:
        self._pipe: IO[str] | None = pipe
        self._fallback = fallback

    def write(self, text: str) -> int:
        if self._pipe is not None:
            try:
                n = self._pipe.write(text)
                self._pipe.flush()
                return n
            except BrokenPipeError:
                self._pipe = None
                with open(os.devnull, "w") as null:  # what is left in its buffer goes nowhere at exit
                    os.dup2(null.fileno(), 1)
        return self._fallback.write(text)

    def flush(self) -> None:
        self._fallback.flush()


def _exit_with(owner_pid: int) -> None:
    """SIGTERM to this process (the launcher stops in order) when ``owner_pid``
    exits; exit at once if it already has."""
    try:
        pidfd = os.pidfd_open(owner_pid)
    except ProcessLookupError:
        sys.exit(EXIT_ORPHANED)

    def watch() -> None:
        wait_pidfd(pidfd, None)
        os.kill(os.getpid(), signal.SIGTERM)

    # The watcher starts with SIGTERM and SIGINT blocked, so that they reach
    # the launcher's signal source, never this thread.
    stopping = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    try:
        threading.Thread(target=watch, name="owner-watch", daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping)


def launcher_main(argv: list[str]) -> int:
    """The embedded launcher: ``parent:PID`` or ``owner:PID``, ``nbd`` or
    ``-``, then ``iothreads launch``'s arguments."""
    how, _, pid = argv[0].partition(":")
    if how == "parent":
        die_with_parent(int(pid))
    else:
        _exit_with(int(pid))
        sys.stdout = _EventsOut(sys.stdout, sys.stderr)
    from ._main import main  # (here: _main imports this module)

    args = argv[2:]
    if argv[1] != "nbd":
        return main(args)
    run = make_runtime_dir()
    server = {"addr": {"type": "unix", "path": run + "/nbd.sock"}}
    try:
        return main(args + ["--runtime-dir", run, "--nbd-server", json.dumps(server)])
    finally:
        shutil.rmtree(run, ignore_errors=True)


class ClusterHandle:
    """What code needs of a running cluster: ``runtime_dir`` (a
    ``BlockClient`` attaches there), ``qmp_path``, ``exports`` (NBD URIs by
    export id), ``pid`` (the launcher's); ``qmp`` and ``client`` are a QMP
    client and a block client, made at first use and closed by ``release()``.
    """

    runtime_dir: str
    exports: dict[str, str]
    pid: int

    def __init__(self) -> None:
        self._qmp: QEMUMonitorProtocol | None = None
        self._client: BlockClient | None = None

    @property
    def qmp_path(self) -> str:
        """The QMP monitor's socket (``qemu.qmp``'s ``QMPClient.connect`` takes it)."""
        return os.path.join(self.runtime_dir, "qmp.sock")

    @property
    def qmp(self) -> QEMUMonitorProtocol:
        """A connected synchronous QMP client (``qemu.qmp.legacy``'s
        ``QEMUMonitorProtocol``: ``qmp.cmd("query-iothreads")``), made at
        first use; it needs the ``qemu.qmp`` package."""
        if self._qmp is None:
            try:
                from qemu.qmp.legacy import QEMUMonitorProtocol
            except ImportError as exc:
                raise RuntimeError("ClusterHandle.qmp needs the qemu.qmp package (pip install qemu.qmp)") from exc
            qmp = QEMUMonitorProtocol(self.qmp_path)
            qmp.connect()
            self._qmp = qmp
        return self._qmp

    @property
    def client(self) -> BlockClient:
        """A ``BlockClient`` of the cluster, made at first use; its home
        thread is the one that first asked for it."""
        if self._client is None:
            self._client = BlockClient(self.runtime_dir)
        return self._client

    def release(self) -> None:
        """Close the QMP client and the block client, if made.  Idempotent."""
        qmp, self._qmp = self._qmp, None
        client, self._client = self._client, None
        try:
            if qmp is not None:
                qmp.close()
        finally:
            if client is not None:
                client.close()


class EmbeddedCluster(ClusterHandle):
    """``iothreads launch`` in a child process: ``iothreads`` iothreads (2),
    a raw image of ``size`` bytes, a node of it on each, ``disk0`` on io0,
    ``disk1`` on io1...; ``args``: more of the launcher's options
    (``--blockdev``, ``--export``, ``--object``...).  ``close()`` (or the
    end of a ``with`` block) stops the cluster and removes everything.

    Nothing outlives this process, even killed (SIGKILL): the image never
    has a name (a temporary file the iothreads open as ``/proc/PID/fd/N``;
    the kernel frees it once the last of them has closed it), and the
    launcher gets SIGTERM from the kernel when this process dies (a
    parent-death signal, which it asks for itself, first thing): it stops
    its iothreads and removes its private runtime directory.  It runs in a
    session of its own, so that Ctrl-C at the terminal reaches this process
    only, which then stops it in order; and it starts clean of this
    process's signal state (``spawn``: no signal blocked or ignored).

    With ``owner_pid``, the launcher lives as long as that process instead
    (it watches it: SIGTERM to itself when it exits), so it may outlive this
    one: the image is then ``image_path`` (made here, ``size`` bytes; it
    must not exist), which whoever stops the cluster removes, and
    ``detach()`` lets it go on without this process (``stop_launcher``
    stops it from anywhere).

    ``log_level`` is the launcher's ``--log-level``; its messages go to
    ``log_path`` if given, else to this process's stderr with
    ``log_to_stderr`` (by default: at ``debug``), else to a temporary file
    (``messages()``) shown only if something goes wrong.

    With ``nbd``, the cluster also serves NBD (on a socket in its runtime
    directory) and exports each node, writable, as ``exp0``, ``exp1``...:
    ``exports`` holds their URIs by id, as the launcher's READY line gives
    them.  An ``--export`` in ``args`` starts that server too."""

    def __init__(self, size: int, log_level: str = "info", *, nbd: bool = False, iothreads: int = 2,
                 args: Sequence[str] = (), owner_pid: int | None = None, image_path: str | None = None,
                 log_path: str | None = None, log_to_stderr: bool | None = None) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"an embedded cluster's image has a size of 0 bytes or more, not {size}")
        self._closed = False
        self.pid = 0
        """The launcher's process id."""
        self.start_time = 0
        """Its start time (``process_start_time``): with ``pid``, what ``stop_launcher`` takes."""
        self.returncode: int | None = None
        """Its exit code once it has exited and was reaped (minus a signal's number)."""
        self._pidfd = -1
        self._events: IO[str] | None = None  # its stdout: one JSON event a line; open while it runs
        self.log: IO[str] = open(log_path, "a+") if log_path is not None else tempfile.TemporaryFile("w+")
        self._image_path = image_path
        try:
            self.image: IO[bytes] = open(image_path, "xb+") if image_path is not None else tempfile.TemporaryFile()
        except BaseException:
            self.log.close()
            raise
        try:
            if iothreads < 1:
                raise ValueError("an embedded cluster has at least one iothread")
            if (owner_pid is None) != (image_path is None):
                raise ValueError("a cluster with an owner_pid has an image_path, and only such a cluster")
            self.image.truncate(size)
            filename = image_path or f"/proc/{os.getpid()}/fd/{self.image.fileno()}"
            watch = f"owner:{owner_pid}" if owner_pid is not None else f"parent:{os.getpid()}"
            serve_nbd = nbd or "--export" in args  # (an NBD server on a socket of the runtime directory)
            argv = [sys.executable, "-c", _LAUNCHER, watch, "nbd" if serve_nbd else "-",
                    "launch", "--iothreads", str(iothreads), "--log-level", log_level]
            for i in range(iothreads):
                argv += ["--blockdev", f"driver=file,node-name=disk{i},filename={filename},iothread=io{i}"]
                if nbd:
                    argv += ["--export", f"type=nbd,id=exp{i},node-name=disk{i},writable=on"]
            argv += args
            read_fd, write_fd = os.pipe()
            self._events = open(read_fd, encoding="utf-8")
            to_stderr = (log_level == "debug" if log_to_stderr is None else log_to_stderr) and log_path is None
            try:
                self.pid = spawn(argv, new_session=True, stdout_fd=write_fd,
                                 stderr_fd=None if to_stderr else self.log.fileno())
            finally:
                os.close(write_fd)
            self._pidfd = os.pidfd_open(self.pid)
            self.start_time = process_start_time(self.pid) or 0
            for line in self._events:
                event = json.loads(line)
                if event["event"] == "READY":
                    self.runtime_dir = event["data"]["runtime_dir"]
                    self.exports = event["data"]["exports"]
                    log.debug("embedded cluster started (launcher pid %d) in %s", self.pid, self.runtime_dir)
                    return
            self._wait(30)
            raise RuntimeError(f"the embedded cluster did not start:\n{self.messages()}")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> EmbeddedCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def messages(self) -> str:
        """What the cluster said on stderr (so far)."""
        self.log.seek(0)
        return self.log.read().rstrip()

    def _wait(self, timeout_s: float | None) -> bool:
        """Wait up to ``timeout_s`` (None: for ever) for the launcher to exit,
        then reap it; whether it has exited."""
        if self.returncode is None:
            if not wait_pidfd(self._pidfd, timeout_s):
                return False
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return True

    def detach(self) -> None:
        """Let the cluster run on without this process (one with an
        ``owner_pid`` only): the handle's clients and files are closed; the
        cluster is stopped by ``stop_launcher(pid, start_time)`` or when its
        owner exits.  Idempotent, and ``close()`` does nothing after it."""
        if self._closed:
            return
        self._closed = True
        self._close_files()

    def close(self) -> None:
        """Stop the cluster (SIGTERM, then SIGKILL after 30 s).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.release()
        finally:
            try:
                if self._pidfd >= 0 and self.returncode is None:
                    with contextlib.suppress(ProcessLookupError):  # (exited and reaped meanwhile: not here)
                        _terminate(self._pidfd, STOP_TIMEOUT_S)
                    self._wait(None)
                if self._pidfd >= 0 and self.returncode != 0:
                    print(f"the embedded cluster exited with status {self.returncode}:\n{self.messages()}",
                          file=sys.stderr)
            finally:
                self._close_files()
                if self._image_path is not None:  # (made here, and the cluster that used it is gone)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._image_path)

    def _close_files(self) -> None:
        try:
            self.release()
        finally:
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
            if self._events is not None:
                self._events.close()
            self.log.close()
            self.image.close()

