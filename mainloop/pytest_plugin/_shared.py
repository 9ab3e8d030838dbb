"""Clusters shared by every worker of one pytest run (pytest-xdist's or not).

Theory of operation
-------------------
The run's controller (the process that started pytest: xdist's controller,
or pytest itself without xdist) makes a private directory in pytest's base
temporary directory and hands it, with its own pid, to each worker
(``workerinput``).  In that directory, a cluster
named NAME is:

``NAME.lock``
    a file locked (``flock``) by whoever reads or changes the others: the
    first worker to ask launches the cluster while holding it, so the
    others wait and then attach to that one;
``NAME.json``
    its state (``SharedState``): the launcher's pid and start time, the
    runtime directory, the NBD URIs, the options it was launched with (a
    worker asking for other options is refused: one name, one shape), the
    processes it had once ready;
``NAME.log``, ``NAME.img``
    the launcher's messages and the image of its nodes;

and ``finished/WORKER`` says a worker's session is over.  The launcher does
not die with the worker that started it: it watches the controller's pid
instead (``EmbeddedCluster(owner_pid=...)``), so a run killed outright
leaves nothing.  The last worker to finish stops every cluster (it sees as
many ``finished`` marks as the run has workers); the controller, at the end
of the run, stops what is left (a worker that crashed never finishes),
reports what any stop found still running, and removes the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ..cli._embedded import ClusterHandle, EmbeddedCluster, process_start_time, stop_launcher
from ._processes import STOP_WAIT_S, cluster_processes, still_running

__all__ = ["SharedCluster", "SharedClusters", "SharedState"]


@dataclass
class SharedState:
    """``NAME.json``: what a worker needs to attach to a shared cluster, and
    to stop it.  The one declaration of that file's shape."""

    options: dict[str, Any]
    pid: int
    start_time: int
    runtime_dir: str
    exports: dict[str, str]
    processes: list[int]


class SharedCluster(ClusterHandle):
    """A handle of a shared cluster: what ``ClusterHandle`` gives, and its
    ``name`` and ``log_path``.  Closing it (``release``) closes its clients
    only: the cluster is the run's."""

    def __init__(self, name: str, state: SharedState, log_path: str) -> None:
        super().__init__()
        self.name = name
        self.pid = state.pid
        self.runtime_dir = state.runtime_dir
        self.exports = state.exports
        self.log_path = log_path

    def messages(self) -> str:
        """What the cluster said on stderr (so far)."""
        with open(self.log_path, errors="replace") as f:
            return f.read().rstrip()


class SharedClusters:
    """This process's view of the run's shared clusters: ``get`` one (the
    first caller launches it), ``finish`` this worker's part, and, in the
    controller, ``stop_all``."""

    def __init__(self, directory: str, owner_pid: int, worker: str, workers: int,
                 log_level: str = "info") -> None:
        self.directory = directory
        self.owner_pid = owner_pid
        self.worker = worker
        self.workers = workers
        self.log_level = log_level
        self._handles: list[SharedCluster] = []

    @classmethod
    def create(cls, parent: str | None, workers: int, log_level: str) -> SharedClusters:
        """The controller's: a new private directory in ``parent`` (pytest's
        base temporary directory, which later runs rotate away, so that even
        a run killed outright leaves nothing for long), this process the owner."""
        directory = tempfile.mkdtemp(prefix="iothreads-shared-", dir=parent)
        os.mkdir(os.path.join(directory, "finished"))
        return cls(directory, os.getpid(), "controller", workers, log_level)

    def _path(self, name: str, suffix: str) -> str:
        return os.path.join(self.directory, f"{name}.{suffix}")

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[SharedState | None]:
        fd = os.open(self._path(name, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                with open(self._path(name, "json")) as f:
                    state: SharedState | None = SharedState(**json.load(f))
            except FileNotFoundError:
                state = None
            yield state
        finally:
            os.close(fd)  # (the lock goes with it)

    def _write(self, name: str, state: SharedState) -> None:
        tmp = self._path(name, "json.tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(state), f)
        os.replace(tmp, self._path(name, "json"))

    def get(self, name: str, size_bytes: int, iothreads: int, nbd: bool, args: list[str]) -> SharedCluster:
        """The shared cluster ``name``, launched now if no worker did yet.
        ``ValueError`` if it was launched with other options."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"a shared cluster's name is a plain file name, not {name!r}")
        options = {"size_bytes": size_bytes, "iothreads": iothreads, "nbd": nbd, "args": args}
        with self._locked(name) as state:
            if state is not None and process_start_time(state.pid) == state.start_time:
                if state.options != options:
                    raise ValueError(f"the shared cluster {name!r} was launched with {state.options}; "
                                     f"this test asks for {options} (one name, one shape: use another name)")
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(name, "img"))  # (a cluster stopped, or gone, before)
                cluster = EmbeddedCluster(size_bytes, self.log_level, nbd=nbd, iothreads=iothreads, args=args,
                                          owner_pid=self.owner_pid, image_path=self._path(name, "img"),
                                          log_path=self._path(name, "log"))
                try:
                    state = SharedState(options, cluster.pid, cluster.start_time, cluster.runtime_dir,
                                        cluster.exports, sorted(cluster_processes(cluster.pid)))
                    self._write(name, state)
                except BaseException:
                    cluster.close()
                    raise
                cluster.detach()
        handle = SharedCluster(name, state, self._path(name, "log"))
        self._handles.append(handle)
        return handle

    def _names(self) -> list[str]:
        return sorted(entry[:-5] for entry in os.listdir(self.directory) if entry.endswith(".json"))

    def _stop(self, name: str) -> list[str]:
        """Stop ``name`` if it runs; what it left running (each a sentence)."""
        with self._locked(name) as state:
            if state is None:
                return []
            killed = stop_launcher(state.pid, state.start_time)
            problems = [f"the shared cluster {name!r} did not stop on SIGTERM (killed)"] if killed else []
            alive = still_running(set(state.processes), STOP_WAIT_S)
            if alive:
                problems.append(f"the shared cluster {name!r} left processes {sorted(alive)}")
            if os.path.exists(state.runtime_dir):
                problems.append(f"the shared cluster {name!r} left its runtime directory {state.runtime_dir}")
            os.unlink(self._path(name, "json"))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(name, "img"))
            return problems

    def _report(self, problems: list[str]) -> None:
        if problems:
            with open(os.path.join(self.directory, "problems"), "a") as f:
                f.writelines(p + "\n" for p in problems)

    def finish(self) -> None:
        """This worker's session is over: its handles are released; the last
        worker to finish stops every cluster.  What a stop found goes to the
        controller (``stop_all`` reports it)."""
        for handle in self._handles:
            handle.release()
        self._handles.clear()
        finished = os.path.join(self.directory, "finished")
        open(os.path.join(finished, self.worker), "w").close()
        if len(os.listdir(finished)) >= self.workers:
            for name in self._names():
                self._report(self._stop(name))

    def stop_all(self) -> list[str]:
        """The controller's, at the end of the run: stop what is left, remove
        the directory; what any stop found (each a sentence)."""
        for name in self._names():
            self._report(self._stop(name))
        try:
            with open(os.path.join(self.directory, "problems")) as f:
                problems = f.read().splitlines()
        except FileNotFoundError:
            problems = []
        shutil.rmtree(self.directory, ignore_errors=True)
        return problems
