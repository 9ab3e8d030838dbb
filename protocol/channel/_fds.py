"""File descriptors: the resource a peer can exhaust by connecting.

Theory of operation
-------------------
Every connection a process accepts costs it a descriptor, and so does every
file it opens.  Running out is not an error that can be reported there and
then: libzmq aborts the whole process when ``accept`` fails with EMFILE on
an ipc listener, and a process that cannot open a pidfd or a file any more
cannot supervise or serve.  So no process here lets its peers take its last
descriptors:

* at start, the soft ``RLIMIT_NOFILE`` is raised to the hard limit
  (``raise_fd_limit``): the headroom the system grants is used;
* an ``FdBudget`` keeps ``FD_RESERVE`` descriptors free for the process's own
  work (a new iothread's pidfd and connection, a state file, a block node):
  what peers ask for (a QMP session, a data-plane connection) is refused,
  with a message that says so, once granting it would eat into the reserve;
  the process's own work is refused only at the limit (less a little slack).  The count is the kernel's (``/proc/self/fd``), read when asked:
  descriptors libzmq opens on its own are counted too.

Refusing is each owner's business (the monitor answers a session it cannot
keep with an error and closes it; an iothread stops listening for data
clients until some leave); this module only counts.
"""

from __future__ import annotations

import os
import resource

__all__ = ["FD_RESERVE", "FdBudget", "open_fd_count", "raise_fd_limit"]

FD_RESERVE = 32  # descriptors a process keeps for its own work, whatever its peers ask
OWN_SLACK = 4  # and the few its own work leaves free (a log file, a listdir of /proc/self/fd)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; the soft limit
    now (unchanged where it cannot be raised)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def open_fd_count() -> int:
    """How many descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir opened
    except OSError:  # no /proc, or not even one descriptor left for listdir
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class FdBudget:
    """The descriptors a process may still grant its peers."""

    def __init__(self, reserve: int = FD_RESERVE) -> None:
        self.reserve = reserve

    @property
    def limit(self) -> int:
        """The soft limit on open files."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return soft if soft != resource.RLIM_INFINITY else 1 << 20

    def problem(self, what: str, count: int = 1, *, own: bool = False) -> str | None:
        """Why ``count`` more descriptors for ``what`` cannot be granted now,
        or None if they can.  What peers ask for must leave the reserve free;
        the process's ``own`` work (a new iothread, a block node the
        management asked for) may use it, all but ``OWN_SLACK``."""
        limit, used = self.limit, open_fd_count()
        keep = OWN_SLACK if own else self.reserve
        if used + count + keep <= limit:
            return None
        return (f"too many open files for {what}: {used} of this process's {limit} are open and "
                f"{keep} are kept for its own work")
