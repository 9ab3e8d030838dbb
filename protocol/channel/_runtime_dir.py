"""The runtime directory: where a cluster keeps its socket files, its lock and its state file.

Theory of operation
-------------------
Whoever can write into the runtime directory can plant a symbolic link where
the launcher (often run as root) is about to create a file, and have it
truncate or write the file the link points to; whoever can connect to its
sockets drives the cluster (a QMP ``blockdev-add`` opens any file the
launcher can open).  So:

* The directory is the user's alone.  ``prepare_runtime_dir`` creates a
  missing one (and its missing parents) mode 0700, whatever the umask, and
  refuses an existing one that is a symbolic link, not a directory, owned by
  another user than the effective one, or writable by its group or others
  (as ssh refuses such a ``~/.ssh``).  Nobody else can then add, remove or
  rename anything in it.
* Files in it are still opened without following a symbolic link and must be
  regular files of this user with one link (``open_own_file``), a file
  replaced atomically is first written to a new file of a random name
  (``O_EXCL``, ``replace_file``), and a socket is bound only where nothing
  but a stale socket is (``remove_stale_socket``): what is left there,
  by the user or by an earlier run, is refused or left alone, never followed.
* Sockets give group and others no access (``owner_only_umask``,
  ``bind_owner_only``): a directory others may search (0755) is allowed, so a
  socket's own mode is what keeps them out.  ``bind`` creates an AF_UNIX
  socket file with mode ``0777 & ~umask``, and ZeroMQ listens as it binds,
  so a chmod afterwards would leave a window: the umask is tightened around
  the bind instead.

``make_runtime_dir`` makes the default one: a new private directory under
``$TMPDIR``, or /tmp (short, for AF_UNIX's path limit), named ``evl`` and
eight random characters; ``made_runtime_dirs`` finds such directories again
(a killed launcher leaves its own behind: see ``iothreads cleanup``), and
``check_runtime_dir`` says whether one is safe to use (or to remove).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import zmq

from .._errors import UnsafePathError

__all__ = [
    "PAUSED_SUFFIX",
    "bind_owner_only",
    "bind_unix_owner_only",
    "check_runtime_dir",
    "default_runtime_parent",
    "made_runtime_dirs",
    "make_runtime_dir",
    "open_own_file",
    "owner_only_umask",
    "prepare_runtime_dir",
    "remove_stale_socket",
    "replace_file",
]

PAUSED_SUFFIX = ".paused"  # added to a data socket's name while its iothread takes no new clients
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_UMASK_LOCK = threading.Lock()  # one tightening at a time: each restores what it found


RUNTIME_DIR_PREFIX = "evl"
_MADE_NAME = re.compile(RUNTIME_DIR_PREFIX + r"[a-z0-9_]{8}")  # tempfile.mkdtemp's random part


def default_runtime_parent() -> str:
    """Where ``make_runtime_dir`` makes directories by default: ``$TMPDIR``, or /tmp."""
    return os.environ.get("TMPDIR") or "/tmp"


def make_runtime_dir(parent: str | None = None, prefix: str = RUNTIME_DIR_PREFIX) -> str:
    """A new private directory (mode 0700) for socket files, short enough for
    ipc:// paths (AF_UNIX allows 107 bytes), under ``parent`` (default:
    ``default_runtime_parent()``)."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent or default_runtime_parent())
    _chmod_dir(path)
    return path


def made_runtime_dirs(parent: str | None = None) -> list[str]:
    """The names under ``parent`` (default: ``default_runtime_parent()``) that
    ``make_runtime_dir`` gives with its default prefix, sorted: candidates
    only, whatever they are (``check_runtime_dir`` says whether one is a
    runtime directory of this user's)."""
    parent = parent or default_runtime_parent()
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(parent, name) for name in names if _MADE_NAME.fullmatch(name))


def prepare_runtime_dir(path: str) -> None:
    """Make ``path`` a runtime directory: create it, and its missing parents,
    mode 0700 whatever the umask; or check the existing one.
    ``UnsafePathError`` if it is a symbolic link, not a directory, owned by
    another user or writable by its group or others; ``OSError`` if it cannot
    be created or examined."""
    missing: list[str] = []
    here = os.path.abspath(path)
    while not os.path.lexists(here):
        missing.append(here)
        here = os.path.dirname(here)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by another process: the checks below decide
        _chmod_dir(directory)
    check_runtime_dir(path)


def _chmod_dir(path: str) -> None:
    """A directory just made: mode 0700, whatever the umask took away (through
    the directory itself, never a link put in its place)."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fchmod(fd, PRIVATE_DIR_MODE)
    finally:
        os.close(fd)


def check_runtime_dir(path: str) -> None:
    """``UnsafePathError`` unless ``path`` is a directory (not a symbolic
    link) of this user that its group and others cannot write; ``OSError``
    if it cannot be examined (``FileNotFoundError``: there is none)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(path, "is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(path, os.strerror(errno.ENOTDIR))
    _check_owner(path, st)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "others" if st.st_mode & stat.S_IWOTH else "its group"
        raise UnsafePathError(path, f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})")


def _check_owner(path: str, st: os.stat_result) -> None:
    euid = os.geteuid()
    if st.st_uid != euid:
        raise UnsafePathError(path, f"is owned by uid {st.st_uid}, not by this user (uid {euid})")


def _refuse_special(path: str) -> None:
    """``UnsafePathError`` if ``path`` is a symbolic link or exists and is not
    a regular file (after an open that failed: a better reason than its errno)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if stat.S_ISLNK(mode):
        raise UnsafePathError(path, "is a symbolic link")
    if not stat.S_ISREG(mode):
        raise UnsafePathError(path, "is not a regular file")


def open_own_file(path: str, flags: int, mode: int = PRIVATE_FILE_MODE) -> int:
    """``os.open(path, flags, mode)`` that never follows a symbolic link at
    ``path`` and opens nothing but a regular file of this user with one link
    (a hard link to another file would make a write land there):
    ``UnsafePathError`` otherwise.  The fd is close-on-exec."""
    try:
        # O_NONBLOCK: a FIFO put there must not hang the open (it is refused below).
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError:
        _refuse_special(path)
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(path, "is not a regular file")
        _check_owner(path, st)
        if st.st_nlink != 1:
            raise UnsafePathError(path, f"has {st.st_nlink} hard links")
    except BaseException:
        os.close(fd)
        raise
    return fd


def replace_file(path: str, data: bytes) -> None:
    """Replace ``path`` atomically with a new file (mode 0600) holding
    ``data``: written first to a new file of a random name beside it (created
    exclusively, never through a link), then renamed over ``path`` (which
    replaces a link there, never what it points to)."""
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory or ".")
    try:
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def owner_only_umask() -> Iterator[None]:
    """While the block runs, files this process creates give group and others
    no access, whatever its umask: for ``bind``, which creates a socket file
    with ``0777 & ~umask``.  The umask belongs to the process: another thread
    creating files meanwhile gets the tighter one too, never a looser one."""
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old | 0o077)
        try:
            yield
        finally:
            os.umask(old)


def bind_owner_only(sock: zmq.Socket[Any], endpoint: str) -> None:
    """``sock.bind(endpoint)``; an ``ipc://`` socket file gives group and
    others no access from the start (ZeroMQ binds in the calling thread)."""
    with owner_only_umask():
        sock.bind(endpoint)


def remove_stale_socket(path: str) -> None:
    """Before binding an AF_UNIX socket at ``path``: remove a socket file left
    there by an earlier run, as QEMU does.  Anything else there is refused
    (``UnsafePathError``), neither removed nor followed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise UnsafePathError(path, "is a symbolic link")
    if not stat.S_ISSOCK(mode):
        raise UnsafePathError(path, "exists and is not a socket")
    os.unlink(path)


def bind_unix_owner_only(path: str) -> socket.socket:
    """A stream socket bound at ``path``, its file accessible to this user
    only from the start (no window before a chmod); a stale socket file there
    is replaced, anything else refused (``remove_stale_socket``)."""
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with owner_only_umask():
            sock.bind(path)
    except OSError:
        sock.close()
        raise
    return sock
