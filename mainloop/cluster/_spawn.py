"""Child processes that start clean of the main loop's signal state: ``spawn``.

Theory of operation
-------------------
The main loop blocks SIGINT and SIGTERM in its thread to read them from a
signalfd, and a signal mask survives both fork and exec; so do ignored
dispositions.  A child started plainly would inherit them: an iothread that
``kill -TERM`` cannot reach, whose parent-death signal (a SIGTERM) stays
pending for ever.  Every process the main loop starts (its iothreads; the
bench's embedded launcher) therefore starts with an empty signal mask and
every signal at its default action.

This is done by the parent, through ``posix_spawn``'s own attributes
(``setsigmask``, ``setsigdef``), which the C library applies in the child
between its fork and its exec:

* the new program never runs one instruction with the inherited mask, so no
  signal sent to it early is held back, whatever the program is (a child
  that cleared its own mask would have to be ours, and would do it only once
  its interpreter has started);
* no Python code runs between fork and exec: ``subprocess.Popen``'s
  ``preexec_fn`` would, which is unsafe in a process with threads (ZeroMQ's
  always exist here), and Popen has no way to set the mask otherwise.

The iothread clears its own mask too, first thing, for whoever else starts
one.  What ``posix_spawn`` cannot do (a parent-death signal) the child asks
for itself after exec (``iothreads.die_with_parent``).
"""

from __future__ import annotations

import os
import signal

__all__ = ["spawn"]

# Every signal whose action can be set: SIGKILL's and SIGSTOP's cannot.
_EVERY_SIGNAL = tuple(sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}))


def spawn(argv: list[str], *, new_session: bool = False, stdout_fd: int | None = None,
          stderr_fd: int | None = None, pass_fds: dict[int, int] | None = None) -> int:
    """Start ``argv`` (``argv[0]``: the program's path) with this process's
    environment, an empty signal mask and every signal at its default
    action; its pid.  ``new_session``: in a session of its own (no
    controlling terminal: Ctrl-C, Ctrl-Z and a hang-up at the terminal reach
    the parent only, which then stops the child in order).  ``stdout_fd``,
    ``stderr_fd``: what the child gets as its stdout and stderr (default:
    this process's).  ``pass_fds``: more descriptors the child gets, as
    ``{its number in the child: this process's descriptor}`` (every other
    one is close-on-exec here).  ``OSError`` if it cannot be started."""
    wanted = {**(pass_fds or {}), **{target: fd for fd, target in ((stdout_fd, 1), (stderr_fd, 2))
                                     if fd is not None}}
    dups: list[int] = []
    try:
        actions = []
        for target, fd in sorted(wanted.items()):
            if fd == target or fd in wanted:
                # dup2 onto itself would keep close-on-exec, and a source that is
                # also a target could be overwritten first: go through a copy.
                fd = os.dup(fd)
                dups.append(fd)
            actions.append((os.POSIX_SPAWN_DUP2, fd, target))
        return os.posix_spawn(argv[0], argv, os.environ, file_actions=actions or None,
                              setsid=new_session, setsigmask=(), setsigdef=_EVERY_SIGNAL)
    finally:
        for fd in dups:
            os.close(fd)
