"""What a test leaves running: threads, child processes, a cluster's processes.

Read from /proc (the plugin's leak checks), never from a process's own
bookkeeping: a process that a test started by any means counts.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from ..cli._embedded import proc_stat, wait_pidfd

__all__ = ["STOP_WAIT_S", "Snapshot", "cluster_processes", "process_table", "still_running"]

STOP_WAIT_S = 5.0  # for a cluster's processes to be gone once its launcher has exited


def process_table() -> dict[int, tuple[int, int]]:
    """Every live process: pid -> (parent pid, session id); zombies left out."""
    table = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        fields = proc_stat(pid)  # (None: gone meanwhile)
        if fields is not None:
            table[pid] = (int(fields[1]), int(fields[3]))
    return table


def cluster_processes(launcher_pid: int) -> set[int]:
    """A cluster's processes: its launcher, what descends from it, and what
    is in its session (the launcher leads one)."""
    table = process_table()
    found = {pid for pid, (_, sid) in table.items() if sid == launcher_pid}
    if launcher_pid in table:
        found.add(launcher_pid)
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


def still_running(pids: set[int], wait_s: float) -> set[int]:
    """Which of ``pids`` are still running after up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    left = set()
    for pid in sorted(pids):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not wait_pidfd(pidfd, max(0.0, deadline - time.monotonic())):
                left.add(pid)
        finally:
            os.close(pidfd)
    return left & set(process_table())  # (an exited one is a zombie until reaped: not running)


def _children() -> set[int]:
    me = os.getpid()
    return {pid for pid, (ppid, _) in process_table().items() if ppid == me}


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80] or "?"
    except OSError:
        return "?"


@dataclass
class Snapshot:
    """The threads and child processes of this process when a fixture
    started; ``leaks(wait_s)`` names those started since that are still
    alive after ``wait_s`` seconds (a thread or a child on its way out is
    not a leak), but for the child processes in ``ignore``."""

    threads: set[threading.Thread] = field(default_factory=lambda: set(threading.enumerate()))
    children: set[int] = field(default_factory=_children)

    def leaks(self, wait_s: float, ignore: AbstractSet[int] = frozenset()) -> list[str]:
        deadline = time.monotonic() + wait_s
        threads = [t for t in threading.enumerate() if t not in self.threads and t.is_alive()]
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        found = [f"thread {t.name!r}" for t in threads if t.is_alive()]
        found += [f"child process {pid} ({_command(pid)})"
                  for pid in sorted(still_running(_children() - self.children - ignore, deadline - time.monotonic()))]
        return found
