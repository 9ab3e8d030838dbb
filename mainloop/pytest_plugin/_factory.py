"""The plugin's clusters: ``ClusterFactory`` launches them for a fixture's
scope and stops them at its end, checking that nothing of them is left; the
shared ones are ``_shared``'s."""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Sequence

from ..cli._embedded import EmbeddedCluster
from ._processes import STOP_WAIT_S, cluster_processes, still_running
from ._shared import SharedCluster, SharedClusters

__all__ = ["DEFAULT_SIZE_BYTES", "ClusterFactory", "launched_pids"]

DEFAULT_SIZE_BYTES = 64 << 20

launched_pids: set[int] = set()
"""Every launcher the plugin started in this process: a test's leak check
does not count them as its own child processes."""


def launch_arguments(blockdevs: Sequence[str], exports: Sequence[str], args: Sequence[str]) -> list[str]:
    """The launcher's options for the factories' keyword arguments."""
    if isinstance(blockdevs, str) or isinstance(exports, str) or isinstance(args, str):
        raise TypeError("blockdevs, exports and args are sequences of strings, not one string")
    argv = [a for spec in blockdevs for a in ("--blockdev", spec)]
    return argv + [a for spec in exports for a in ("--export", spec)] + list(args)


def _copy_sparse(src_fd: int, path: str) -> None:
    """Copy the file open as ``src_fd`` to ``path``, holes kept as holes."""
    size = os.fstat(src_fd).st_size
    with open(path, "wb") as out:
        out.truncate(size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src_fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(src_fd, start, os.SEEK_HOLE)
            out.seek(start)
            while start < end:
                chunk = os.pread(src_fd, min(end - start, 1 << 20), start)
                if not chunk:
                    break
                out.write(chunk)
                start += len(chunk)
            offset = end


def keep(cluster: EmbeddedCluster, directory: str) -> None:
    """Copy what there is to see of a running cluster into ``directory``:
    ``launcher.log``, the runtime directory's regular files, ``disk.img``."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "launcher.log"), "w") as f:
        f.write(cluster.messages() + "\n")
    kept = os.path.join(directory, "runtime")
    os.makedirs(kept, exist_ok=True)
    for entry in os.scandir(cluster.runtime_dir):
        if stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
            shutil.copyfile(entry.path, os.path.join(kept, entry.name), follow_symlinks=False)
    _copy_sparse(cluster.image.fileno(), os.path.join(directory, "disk.img"))


def kept_path(base: str, nodeid: str, index: int) -> str:
    """Where ``--iothreads-keep-failed`` keeps the ``index``-th cluster of test ``nodeid``."""
    return os.path.join(base, re.sub(r"[^\w.-]+", "_", nodeid)[-120:], f"cluster{index}")


class ClusterFactory:
    """Clusters launched for one fixture's scope: ``launch`` starts one
    (an ``EmbeddedCluster``), ``shared`` attaches to the run's shared one of
    that name (a ``SharedCluster``, launched by the first worker that asks),
    ``close_all`` stops what this factory launched and says what is left."""

    def __init__(self, shared: SharedClusters | None, log_level: str = "info") -> None:
        self._shared = shared
        self.log_level = log_level
        self.clusters: list[EmbeddedCluster] = []
        self._processes: list[set[int]] = []  # each cluster's, once it was ready

    def launch(self, size_bytes: int = DEFAULT_SIZE_BYTES, *, iothreads: int = 2, nbd: bool = False,
               blockdevs: Sequence[str] = (), exports: Sequence[str] = (),
               args: Sequence[str] = ()) -> EmbeddedCluster:
        """A cluster of ``iothreads`` iothreads ``io0``..., a node ``diskN``
        of one ``size_bytes`` image on each, ``blockdevs`` and ``exports``
        more ``--blockdev`` and ``--export`` options (QEMU's keyval or JSON;
        the cluster serves NBD on a socket of its runtime directory for
        them), ``args`` any other options of ``iothreads launch``; ``nbd``:
        also export each ``diskN``, writable, as ``expN``."""
        argv = launch_arguments(blockdevs, exports, args)
        cluster = EmbeddedCluster(size_bytes, self.log_level, nbd=nbd, iothreads=iothreads, args=argv,
                                  log_to_stderr=False)
        launched_pids.add(cluster.pid)
        self.clusters.append(cluster)
        self._processes.append(cluster_processes(cluster.pid))
        return cluster

    def shared(self, name: str = "default", size_bytes: int = DEFAULT_SIZE_BYTES, *, iothreads: int = 2,
               nbd: bool = False, blockdevs: Sequence[str] = (), exports: Sequence[str] = (),
               args: Sequence[str] = ()) -> SharedCluster:
        """The run's shared cluster ``name``: the first worker to ask
        launches it (options as ``launch``'s), the others attach to it;
        every worker must ask with the same options.  It is stopped when
        the last worker finishes; do not stop it, or change its shape,
        from a test."""
        if self._shared is None:
            raise RuntimeError("shared clusters are not available in this process (the plugin was not configured)")
        handle = self._shared.get(name, size_bytes, iothreads, nbd, launch_arguments(blockdevs, exports, args))
        launched_pids.add(handle.pid)
        return handle

    def close_all(self) -> list[str]:
        """Stop every cluster this factory launched (those closed already
        too are checked); what is left of them, each a sentence."""
        left = []
        for cluster, started in zip(self.clusters, self._processes):
            cluster.close()
            alive = still_running(started | cluster_processes(cluster.pid), STOP_WAIT_S)
            if alive:
                left.append(f"processes {sorted(alive)} of the cluster of launcher {cluster.pid}")
            if os.path.exists(cluster.runtime_dir):
                left.append(f"its runtime directory {cluster.runtime_dir}")
        self.clusters.clear()
        self._processes.clear()
        return left
