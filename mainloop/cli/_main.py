"""The ``iothreads`` command (also ``python -m mainloop``).

``iothreads launch`` runs a cluster in the foreground: a main loop and its
iothread processes, configured with qemu-storage-daemon's options.  It
prints one JSON line per event on stdout, every one in QMP's event shape
``{"event": NAME, "data": {...}}``: ``IOTHREAD_READY`` as each iothread
answers, then, once every iothread has answered and every ``--blockdev`` is
added, ``READY``::

    {"event": "READY", "data": {"pid": ..., "qmp": [...], "runtime_dir": ..., "control": ...,
                                "iothreads": [...], "nodes": {...}, "exports": {...}}}

(``exports``: the NBD URI of each ``--export``, by id), and later one line
per event (``IOTHREAD_EXITED`` for an iothread that exits unexpectedly,
``BLOCK_EXPORT_DELETED``, ...).  SIGTERM or SIGINT stops every iothread,
reaps it, removes the socket files and exits 0.  A bad option or value prints
one line naming it and exits 1.  The runtime directory (``RUNTIME_DIR/lock``)
and the ``--pidfile`` are locked while it runs: a second launcher on either
refuses to start.  An existing runtime directory must be the user's and not
writable by others, and no symbolic link is followed there or at the
``--pidfile`` (see ``protocol.prepare_runtime_dir``).

``iothreads cleanup`` removes what killed launchers left behind (see
``_clean_runtime_dir``); a launcher that makes its runtime directory does the
same with those it finds beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import zmq

from protocol import (
    PAUSED_SUFFIX,
    ErrorReply,
    QueryReply,
    StateError,
    UnsafePathError,
    CLUSTER_STATE_FILE,
    check_runtime_dir,
    made_runtime_dirs,
    make_runtime_dir,
    open_own_file,
    remove_stale_socket,
    bound_heap_retention,
    raise_fd_limit,
    prepare_runtime_dir,
)

from protocol.channel import KeyPair, generate_key_pair, load_authorized_keys, load_key_pair
from protocol.schema import BlockExportOptionsBase, NbdServerOptions, SocketAddressUnix
from iothreads.worker import main as worker_main

from ._bench import EXIT_INTERRUPTED, add_bench_arguments, run_bench
from ._embedded import wait_pidfd
from ..loop._bql import bql
from ..cluster._spawn import spawn
from ..cluster._cluster import MAX_IOTHREADS, Cluster, IOThread, IOThreadConfig, IOThreadState, data_endpoint
from ..cluster._security import ClusterKeys
from ..loop._loop import MainLoop
from ..nbd._server import NbdServer
from ..qmp._monitor import Monitor, package_version
from ._options import (
    BlockdevSpec,
    ChardevSpec,
    OptionError,
    parse_blockdev,
    parse_chardev,
    parse_export,
    parse_monitor,
    parse_nbd_server,
    parse_object,
)
from ..glib._standard import SignalSource

__all__ = ["main"]

PROG = "iothreads"
EXIT_OK, EXIT_FAILURE = 0, 1
LOCK_FILE = "lock"  # in the runtime directory: the launcher's pid, locked while it runs
LOG_LEVELS = ("debug", "info", "warning", "error")
log = logging.getLogger("mainloop.cli")


class _Parser(argparse.ArgumentParser):
    """argparse, with qemu-storage-daemon's error style: one line, exit 1."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: {message}", file=sys.stderr)
        sys.exit(EXIT_FAILURE)


def _iothread_count(text: str) -> int:
    """An --iothreads value: 0 to MAX_IOTHREADS."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must not be negative")
    if value > MAX_IOTHREADS:
        raise argparse.ArgumentTypeError(f"'{text}' is more than {MAX_IOTHREADS}")
    return value


def _add_log_arguments(p: argparse.ArgumentParser) -> None:
    """-v / --log-level, for this process and the iothread processes it starts."""
    level = p.add_mutually_exclusive_group()
    level.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                       help="messages on stderr from this level up, here and in the iothreads (default info)")
    level.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="debug",
                       help="--log-level debug: also processes started and exiting, node moves, drains, "
                            "requests resent")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="QEMU's event-loop architecture: a main loop and iothread "
                                            "processes, managed like qemu-storage-daemon.")
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    launch = sub.add_parser("launch", help="run a cluster in the foreground",
                            description="Run a main loop and its iothread processes until SIGTERM or "
                                        "SIGINT. Without options: 2 iothreads.")
    launch.add_argument("--object", action="append", default=[], metavar="iothread,id=ID[,...]",
                        help="an iothread (keyval or JSON): id, poll-max-ns, poll-grow, "
                             "poll-shrink, aio-max-batch; repeatable")
    launch.add_argument("--blockdev", action="append", default=[],
                        metavar="driver=file,node-name=NAME,filename=PATH[,...]",
                        help="a block node (keyval or JSON): driver=file (filename, read-only, "
                             "cache.direct) or driver=null-co (size, read-zeroes); iothread=ID "
                             "picks its iothread; repeatable")
    launch.add_argument("--nbd-server", action="append", default=[],
                        metavar="addr.type=unix,addr.path=PATH|addr.type=inet,addr.host=H,addr.port=P[,...]",
                        help="serve NBD exports here (keyval or JSON): max-connections, handshake-max-seconds")
    launch.add_argument("--export", action="append", default=[],
                        metavar="[type=]nbd,id=ID,node-name=NODE[,...]",
                        help="export a node over NBD (keyval or JSON; needs --nbd-server): name (default: the "
                             "node's), description, writable, allocation-depth; repeatable")
    launch.add_argument("--iothreads", type=_iothread_count, metavar="N",
                        help=f"add N iothreads named io0, io1, ... (besides any --object; at most "
                             f"{MAX_IOTHREADS})")
    launch.add_argument("--pidfile", metavar="PATH",
                        help="write the main loop's pid here, locked while it runs (another launcher "
                             "with the same pidfile refuses to start)")
    launch.add_argument("--runtime-dir", metavar="DIR",
                        help="directory for the socket files, one launcher at a time: made mode 0700 "
                             "if missing; an existing one must be yours and not writable by others "
                             "(default: a new private one)")
    launch.add_argument("--chardev", action="append", default=[],
                        metavar="socket,id=ID,path=PATH|host=H,port=P,server=on,wait=off",
                        help="a socket for a QMP monitor (see --monitor); repeatable")
    launch.add_argument("--monitor", action="append", default=[], metavar="chardev=ID",
                        help="serve QMP on that chardev; repeatable. Without it, QMP is served on "
                             "RUNTIME_DIR/qmp.sock")
    launch.add_argument("--control", metavar="tcp://HOST:PORT",
                        help="serve the iothreads' control channel on TCP instead of ipc:// "
                             "in the runtime directory (port 0: any free port); CURVE-encrypted, and only "
                             "this cluster's own keys and --authorized-keys get in")
    launch.add_argument("--curve-keys", metavar="FILE",
                        help="with --control: the main loop's key pair (a .key_secret file of 'iothreads "
                             "keygen', mode 0600), whose public half remote iothreads are given "
                             "(default: a new pair for this run)")
    launch.add_argument("--authorized-keys", metavar="DIR",
                        help="with --control: let in the peers whose public keys (NAME.key files) are in DIR "
                             "(remote iothreads, clients on other hosts); DIR must be yours and not writable "
                             "by others")
    launch.add_argument("--restart", action="store_true",
                        help="restart iothreads that exit unexpectedly")
    _add_log_arguments(launch)
    bench = sub.add_parser("bench", help="run a block-I/O workload (fio-like)",
                           description="Run a block-I/O workload against an embedded cluster (2 iothreads, "
                                       "a temporary raw image) or, with --attach, a launched one.")
    add_bench_arguments(bench)
    _add_log_arguments(bench)
    cleanup = sub.add_parser(
        "cleanup", help="remove what killed launchers left behind",
        description="Remove the runtime directories of launchers that were killed (SIGKILL): those made by "
                    "default (under $TMPDIR, or /tmp), or the launcher's files in a --runtime-dir. Only a "
                    "directory whose lock is free and holds a pid (its launcher is gone) is touched; one that "
                    "is a symbolic link, not yours or writable by others is left alone.")
    cleanup.add_argument("--runtime-dir", action="append", default=[], metavar="DIR",
                         help="look at DIR (a launcher's --runtime-dir) instead of the default ones; repeatable")
    cleanup.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    cleanup.add_argument("--socket", action="append", default=[], metavar="PATH",
                         help="with --when-gone: also remove the socket file PATH (the launcher's NBD server's or "
                              "monitor's) if nothing listens there any more; repeatable")
    cleanup.add_argument("--when-gone", type=_pid, metavar="PID",
                         help="first wait for process PID to exit, then clean each --runtime-dir (one that is "
                              "gone already is no error): what a launcher starts, to clean up after itself "
                              "if it is killed")
    _add_log_arguments(cleanup)
    keygen = sub.add_parser(
        "keygen", help="make a CURVE key pair",
        description="Write a new CURVE key pair as DIR/NAME.key (the public key, for the peers that must let "
                    "its owner in: a cluster's --authorized-keys, a remote iothread's --server-key) and "
                    "DIR/NAME.key_secret (mode 0600, for its owner alone: --curve-keys). DIR is made mode "
                    "0700 if missing; existing key files are never overwritten.")
    keygen.add_argument("name", metavar="NAME", help="the key's name: letters, digits, '_', '.', '-'")
    keygen.add_argument("--dir", default=".", metavar="DIR", help="where to write the files (default: here)")
    _add_log_arguments(keygen)
    sub.add_parser(
        "worker", help="run an iothread that joins a cluster from this host", add_help=False,
        description="Run an iothread process that joins a launched cluster over tcp:// "
                    "(see 'iothreads worker --help').").add_argument("worker_args", nargs=argparse.REMAINDER)
    return parser


T = TypeVar("T")


def _parse_each(option: str, texts: list[str], parse: Callable[[str], T],
                check: Callable[[T, list[T]], str | None]) -> list[T]:
    """Parse every value of a repeatable option; errors name the option and value."""
    parsed: list[T] = []
    for text in texts:
        try:
            value = parse(text)
        except OptionError as exc:
            raise OptionError(f"{option} {text}: {exc}") from None
        problem = check(value, parsed)
        if problem is not None:
            raise OptionError(f"{option} {text}: {problem}")
        parsed.append(value)
    return parsed


def _numbered_names(count: int, taken: set[str]) -> list[str]:
    """The first ``count`` of io0, io1, ... that are not taken."""
    free = (name for name in (f"io{n}" for n in itertools.count()) if name not in taken)
    return list(itertools.islice(free, count))


def _configs(args: argparse.Namespace) -> list[IOThreadConfig]:
    configs = _parse_each("--object", args.object, parse_object, lambda c, seen: (
        f"duplicate iothread id '{c.id}'" if any(s.id == c.id for s in seen) else None))
    count = args.iothreads if args.iothreads is not None else (0 if configs else 2)
    configs += [IOThreadConfig(name) for name in _numbered_names(count, {c.id for c in configs})]
    for c in configs:
        c.restart = args.restart
    return configs


def _emit(name: str, data: dict[str, Any]) -> None:
    """One line on stdout, in QMP's event shape (without its timestamp)."""
    print(json.dumps({"event": name, "data": data}), flush=True)


def _blockdevs(args: argparse.Namespace, configs: list[IOThreadConfig]) -> list[BlockdevSpec]:
    ids = {c.id for c in configs}

    def check(spec: BlockdevSpec, seen: list[BlockdevSpec]) -> str | None:
        if any(s.node_name == spec.node_name for s in seen):
            return f"Duplicate nodes with node-name='{spec.node_name}'"
        if spec.iothread is not None and spec.iothread not in ids:
            return f"Cannot find iothread {spec.iothread}"
        return None  # (a node over another one, given before it, is the cluster's to check: as QMP's)

    return _parse_each("--blockdev", args.blockdev, parse_blockdev, check)


def _add_blockdevs(cluster: Cluster, specs: list[BlockdevSpec]) -> str | None:
    """Create the nodes, all at once (several iothreads open theirs in
    parallel); the first error in the options' order, naming its node, or None."""
    replies: dict[str, QueryReply | ErrorReply] = {}  # by node name: the answers come in any order
    for spec in specs:
        try:
            cluster.blockdev_add(spec.node_name, spec.driver, spec.options,
                                 functools.partial(replies.__setitem__, spec.node_name), spec.iothread)
        except StateError as exc:  # a node over one not given before it, or in another iothread
            replies[spec.node_name] = ErrorReply(0, "GenericError", str(exc))
    if not cluster.wait_for(lambda: len(replies) == len(specs), 30):
        return "block nodes were not created in time"
    for spec in specs:
        reply = replies[spec.node_name]
        if isinstance(reply, ErrorReply):
            return f"--blockdev node-name={spec.node_name}: {reply.message}"
    return None


def _nbd_server(args: argparse.Namespace) -> NbdServerOptions | None:
    """The --nbd-server (one at most, as qemu-storage-daemon: a second finds one running)."""
    servers = _parse_each("--nbd-server", args.nbd_server, parse_nbd_server, lambda options, seen: (
        "NBD server already running" if seen else None))
    return servers[0] if servers else None


def _exports(args: argparse.Namespace) -> list[BlockExportOptionsBase]:
    """The --export options (checked against their nodes once those exist)."""
    return _parse_each("--export", args.export, parse_export, lambda options, seen: (
        f"Block export id '{options.id}' is already in use" if any(s.id == options.id for s in seen) else None))


def _start_nbd(nbd: NbdServer, args: argparse.Namespace, server: NbdServerOptions | None,
               exports: list[BlockExportOptionsBase]) -> str | None:
    """Start the NBD server and add the exports; the first error, naming its option, or None."""
    if server is not None:
        try:
            nbd.start(server.addr, max_connections=server.max_connections,
                      handshake_max_seconds=server.handshake_max_seconds)
        except StateError as exc:
            return f"--nbd-server {args.nbd_server[0]}: {exc}"
    for text, options in zip(args.export, exports):
        try:
            nbd.add_export(options)
        except StateError as exc:
            return f"--export {text}: {exc}"
    return None


def _monitors(args: argparse.Namespace) -> list[ChardevSpec]:
    chardevs = {c.id: c for c in _parse_each("--chardev", args.chardev, parse_chardev, lambda c, seen: (
        f"duplicate chardev id '{c.id}'" if any(s.id == c.id for s in seen) else None))}
    names = _parse_each("--monitor", args.monitor, parse_monitor, lambda name, seen: (
        None if name in chardevs else f"chardev '{name}' not found"))
    return [chardevs[n] for n in names]


def _check_socket_paths(runtime_dir: str, configs: list[IOThreadConfig]) -> None:
    """Every iothread's data socket fits in AF_UNIX's path limit."""
    for c in configs:
        try:
            data_endpoint(runtime_dir, c.id)
        except ValueError as exc:
            raise OptionError(f"--object id={c.id}: {exc}") from None


def _dir_option(args: argparse.Namespace, runtime_dir: str) -> str:
    """How errors name the runtime directory."""
    if args.runtime_dir is not None:
        return f"--runtime-dir {args.runtime_dir}"
    return f"runtime directory {runtime_dir}"


def _make_dir(args: argparse.Namespace, path: str) -> None:
    """The runtime directory made private, or refused: someone else's, or one
    others may write, would let them plant links or reach the sockets."""
    try:
        prepare_runtime_dir(path)
    except UnsafePathError as exc:
        raise OptionError(f"{_dir_option(args, path)}: {exc.reason}") from None
    except OSError as exc:
        raise OptionError(f"{_dir_option(args, path)}: {exc.strerror}") from None


def _runtime_dir(args: argparse.Namespace, configs: list[IOThreadConfig], held: contextlib.ExitStack) -> str:
    """--runtime-dir, or a new private directory that ``held`` removes; its
    socket paths are checked before anything is made in it."""
    if args.runtime_dir is None:
        path = make_runtime_dir()
        held.callback(shutil.rmtree, path, ignore_errors=True)
    else:
        path = os.path.abspath(args.runtime_dir)
    if args.control is None:
        _check_socket_paths(path, configs)
    return path


def _owns(fd: int, path: str) -> bool:
    """Whether ``path`` still is the file open as ``fd`` (not a link to it)."""
    try:
        return os.path.samestat(os.lstat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


def _lock_pid(fd: int) -> int:
    """The pid a lock or pid file holds (0: none)."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else 0


def _holder(fd: int) -> str:
    """' (pid N)' when a locked pid file holds a pid."""
    pid = _lock_pid(fd)
    return f" (pid {pid})" if pid else ""


def _lock_pid_file(path: str, name: str) -> int:
    """Open ``path`` and lock it (fcntl), as qemu_write_pidfile does: a file
    removed or replaced between the open and the lock is opened again.  A
    symbolic link there is refused, never followed, and so is anything but a
    regular file of this user with one link (what ``open_own_file`` opens)."""
    while True:
        try:
            fd = open_own_file(path, os.O_RDWR | os.O_CREAT, 0o644)
        except UnsafePathError as exc:
            raise OptionError(f"{name}: {exc}") from None
        except OSError as exc:
            raise OptionError(f"{name}: {exc.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise OptionError(f"{name}: locked by another process{holder}") from None
            raise OptionError(f"{name}: cannot lock {path}: {exc.strerror}") from None
        if _owns(fd, path):
            return fd
        os.close(fd)


@contextlib.contextmanager
def _pid_file(path: str, name: str) -> Iterator[None]:
    """``path`` holds our pid and stays locked until the block ends; then it is
    removed if it still is ours.  Errors begin with ``name`` (the option)."""
    fd = _lock_pid_file(path, name)
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            raise OptionError(f"{name}: {exc.strerror}") from None
        yield
    finally:
        try:
            if _owns(fd, path):
                os.unlink(path)
        finally:
            os.close(fd)  # releases the lock


def _hold_files(args: argparse.Namespace, configs: list[IOThreadConfig], held: contextlib.ExitStack) -> str:
    """Before anything starts: the runtime directory, made and locked for the
    launcher's life (RUNTIME_DIR/lock), then the --pidfile, locked too;
    ``held`` releases them.  Returns the runtime directory."""
    runtime_dir = _runtime_dir(args, configs, held)
    _make_dir(args, runtime_dir)
    held.enter_context(_pid_file(os.path.join(runtime_dir, LOCK_FILE), _dir_option(args, runtime_dir)))
    _remove_stale_sockets(runtime_dir)
    if args.runtime_dir is None:
        _remove_stale_runtime_dirs(runtime_dir)
    if args.pidfile:
        held.enter_context(_pid_file(args.pidfile, f"--pidfile {args.pidfile}"))
    return runtime_dir


def _remove_stale_sockets(runtime_dir: str) -> None:
    """The control and data sockets a killed launcher left behind (its
    iothreads' too): with the directory's lock held, no live cluster owns
    any socket there.  Sockets only: nothing else is touched or followed."""
    for name in os.listdir(runtime_dir):
        if name == "control" or name.endswith((".data", ".data" + PAUSED_SUFFIX)):
            path = os.path.join(runtime_dir, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass


# -- what killed launchers leave behind (iothreads cleanup) ------------------------------


@dataclass(frozen=True)
class _Examined:
    """A runtime directory, as ``_clean_runtime_dir`` found it."""

    path: str
    pid: int = 0
    """Its launcher's, as its lock file says (0: none found)."""
    problem: str = ""
    """Why it is left alone, said of the directory ("is a symbolic link"); "" if a killed launcher's."""
    quiet: bool = False
    """Nothing of a launcher's at all (no lock file, gone): a look at the default directories says nothing of it."""


def _clean_runtime_dir(path: str, *, made: bool, dry_run: bool = False) -> _Examined:
    """Remove ``path`` if it is the runtime directory of a launcher that is
    gone, as that launcher's exit would have: all of it if ``made`` by
    ``make_runtime_dir`` (the default), else the files a launcher makes there.

    A launcher holds its directory's lock while it runs (``LOCK_FILE``: its
    pid, locked with fcntl), and the kernel releases it when the process
    dies, however it dies; its iothreads then exit by themselves.  So a lock
    file that holds a pid and is free is a dead launcher's.  It is locked
    here before anything is removed: a launcher starting there meanwhile
    finds it locked.  Left alone: a directory that is a symbolic link, not
    the user's or writable by others (``check_runtime_dir``: never followed
    or entered), a lock file that is not a regular file of the user's (a
    link), without a pid (a launcher starting) or locked (one running)."""
    try:
        check_runtime_dir(path)
    except FileNotFoundError:
        return _Examined(path, problem="does not exist", quiet=True)
    except UnsafePathError as exc:
        return _Examined(path, problem=exc.reason)
    except OSError as exc:
        return _Examined(path, problem=f"cannot be examined: {exc.strerror}")
    lock = os.path.join(path, LOCK_FILE)
    try:
        fd = open_own_file(lock, os.O_RDWR)
    except FileNotFoundError:
        return _Examined(path, problem="has no lock file: no launcher's runtime directory", quiet=True)
    except UnsafePathError as exc:
        return _Examined(path, problem=f"has a lock file that {exc.reason}")
    except OSError as exc:
        return _Examined(path, problem=f"has a lock file that cannot be opened: {exc.strerror}")
    try:
        pid = _lock_pid(fd)
        if not pid:
            return _Examined(path, problem="has a lock file without a pid: a launcher starting?", quiet=True)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return _Examined(path, pid, f"is in use by a running launcher (pid {pid})")
            return _Examined(path, pid, f"has a lock file that cannot be locked: {exc.strerror}")
        if not _owns(fd, lock):
            return _Examined(path, pid, "had its lock file replaced meanwhile")
        if not dry_run:
            try:
                _remove_launcher_files(path, made)
            except OSError as exc:
                return _Examined(path, pid, f"could not be removed: {exc.strerror or exc}")
        return _Examined(path, pid)
    finally:
        os.close(fd)  # its lock goes with it


def _vanished_is_fine(*failed: Any) -> None:
    """``shutil.rmtree``'s error handler (its function, path, exc_info): an
    entry that is gone already is fine."""
    exc = failed[2][1]
    if not isinstance(exc, FileNotFoundError):
        raise exc


def _remove_launcher_files(path: str, made: bool) -> None:
    """What a launcher's exit removes: a ``made`` runtime directory whole
    (``shutil.rmtree`` follows no link), else its sockets, its state file
    (and a temporary one left while replacing it) and its lock."""
    if made:
        # Its iothreads may still be removing their own sockets as they exit
        # (a janitor wakes as soon as the launcher is gone): what vanished
        # meanwhile is no error.
        shutil.rmtree(path, onerror=_vanished_is_fine)
        return
    _remove_stale_sockets(path)
    with contextlib.suppress(FileNotFoundError, UnsafePathError):
        remove_stale_socket(os.path.join(path, "qmp.sock"))  # a socket only
    for name in os.listdir(path):
        if name == CLUSTER_STATE_FILE or name.startswith(f".{CLUSTER_STATE_FILE}."):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(path, name))  # a link itself, never what it points to
    os.unlink(os.path.join(path, LOCK_FILE))


def _remove_stale_runtime_dirs(own: str) -> None:
    """A launcher that made its runtime directory removes those of killed
    launchers beside it (each one logged)."""
    for path in made_runtime_dirs(os.path.dirname(own)):
        if path != own:
            found = _clean_runtime_dir(path, made=True)
            if not found.problem:
                log.info("removed %s, left behind by a killed launcher (pid %d)", path, found.pid)
            elif not found.quiet:
                log.debug("left alone: %s %s", path, found.problem)


def _pid(text: str) -> int:
    """A --when-gone value: a process id, a whole number above 0."""
    try:
        pid = int(text)
    except ValueError:
        pid = 0
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a process id (a whole number above 0)")
    return pid


def _wait_gone(pid: int) -> None:
    """Return once process ``pid`` has exited (at once if there is none)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        wait_pidfd(pidfd, None)
    finally:
        os.close(pidfd)


# The janitor: ``iothreads cleanup --when-gone PID ...``, which imports the
# command (and ZeroMQ with it) only once PID is gone: a janitor that is
# stopped in order, the usual end, costs a bare interpreter's start.
_JANITOR = """\
import os, select, sys
pid = int(sys.argv[sys.argv.index("--when-gone") + 1])
try:
    pidfd = os.pidfd_open(pid)
except ProcessLookupError:
    pass
else:
    select.select([pidfd], [], [])
from mainloop.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start_janitor(runtime_dir: str, sockets: list[str]) -> tuple[int, int] | None:
    """The launcher's janitor: ``iothreads cleanup --when-gone PID`` for its
    runtime directory, in a session of its own (a Ctrl-C or a signal to the
    launcher's group does not reach it), its output to /dev/null.  Killed
    with SIGKILL, the launcher cannot remove its directory; the janitor,
    woken by its exit, does it as ``iothreads cleanup`` would (the lock, free
    then, tells a dead launcher's directory from a live one's).  A launcher
    that exits in order stops it first (``_stop_janitor``).  ``sockets``:
    the socket files the launcher binds outside its runtime directory (its
    NBD server's, its monitors'), which the janitor removes too once nothing
    listens there.  Its pid and a pidfd of it, or None (and a warning) if it
    could not be started."""
    argv = [sys.executable, "-c", _JANITOR, "cleanup", "--when-gone", str(os.getpid()),
            "--runtime-dir", runtime_dir, "--log-level", "error"]
    argv += [arg for path in sockets for arg in ("--socket", os.path.abspath(path))]
    try:
        with open(os.devnull, "r+b") as null:
            pid = spawn(argv, new_session=True, stdout_fd=null.fileno(), stderr_fd=null.fileno(),
                        pass_fds={0: null.fileno()})
        return pid, os.pidfd_open(pid)
    except OSError as exc:
        log.warning("no janitor for %s (it stays behind if this launcher is killed): %s", runtime_dir, exc)
        return None


def _remove_if_unheard(path: str) -> None:
    """Remove the socket file ``path`` if nothing listens there (a connection
    is refused): a killed launcher's.  Anything else is left alone: not a
    socket (or a link), or a socket another process listens on now."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except OSError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError, UnsafePathError):
            remove_stale_socket(path)
    except OSError:
        pass
    finally:
        probe.close()


def _stop_janitor(janitor: tuple[int, int]) -> None:
    """Stop and reap the janitor of a launcher exiting in order."""
    pid, pidfd = janitor
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    finally:
        os.close(pidfd)


def cleanup(args: argparse.Namespace) -> int:
    """``iothreads cleanup``: what it removed on stdout, what it left alone
    and why on stderr; exit 1 if a ``--runtime-dir`` was left alone.  With
    ``--when-gone PID``, after PID has exited (a launcher's janitor)."""
    if args.when_gone is not None:
        if not args.runtime_dir:
            raise OptionError("--when-gone: which --runtime-dir?")
        _wait_gone(args.when_gone)
        for path in args.socket:
            _remove_if_unheard(path)
    elif args.socket:
        raise OptionError("--socket: only with --when-gone")
    made = made_runtime_dirs()
    status = EXIT_OK
    for path in [os.path.abspath(p) for p in args.runtime_dir] or made:
        found = _clean_runtime_dir(path, made=path in made, dry_run=args.dry_run)
        if not found.problem:
            what = path if path in made else f"the files of a launcher from {path}"
            print(f"{'would remove' if args.dry_run else 'removed'} {what} (launcher pid {found.pid}, gone)")
        elif args.when_gone is not None and found.quiet:
            pass  # (the launcher removed it, or it never had one)
        elif args.runtime_dir or not found.quiet:
            print(f"{PROG}: left alone: {path} {found.problem}", file=sys.stderr)
            if args.runtime_dir:
                status = EXIT_FAILURE
    return status


def keygen(args: argparse.Namespace) -> int:
    try:
        public, secret = generate_key_pair(args.dir, args.name)
    except FileExistsError as exc:
        raise OptionError(str(exc)) from None
    print(f"{public}\n{secret}")
    return EXIT_OK


def _cluster_keys(args: argparse.Namespace) -> ClusterKeys | None:
    """The CURVE keys of a --control tcp:// cluster (errors name the option)."""
    if args.control is None:
        for option, value in (("--curve-keys", args.curve_keys), ("--authorized-keys", args.authorized_keys)):
            if value is not None:
                raise OptionError(f"{option} {value}: only with --control tcp://HOST:PORT")
        return None
    try:
        server = load_key_pair(args.curve_keys) if args.curve_keys else KeyPair.generate()
    except (ValueError, OSError) as exc:  # (UnsafePathError is a ValueError)
        raise OptionError(f"--curve-keys {args.curve_keys}: {exc}") from None
    try:
        authorized = load_authorized_keys(args.authorized_keys) if args.authorized_keys else {}
    except (ValueError, OSError) as exc:
        raise OptionError(f"--authorized-keys {args.authorized_keys}: {exc}") from None
    return ClusterKeys(server=server, authorized=authorized)


def _new_cluster(loop: MainLoop, args: argparse.Namespace, runtime_dir: str,
                 keys: ClusterKeys | None) -> Cluster:
    """A cluster whose control socket is bound; an error names --control or
    the runtime directory (the socket path is in ZeroMQ's message)."""
    try:
        return Cluster(loop, runtime_dir=runtime_dir, tcp=args.control, keys=keys)
    except zmq.ZMQError as exc:
        where = f"--control {args.control}" if args.control is not None else _dir_option(args, runtime_dir)
        raise OptionError(f"{where}: {exc}") from None


def launch(args: argparse.Namespace) -> int:
    configs = _configs(args)
    specs = _blockdevs(args, configs)
    monitors = _monitors(args)
    nbd_server = _nbd_server(args)
    exports = _exports(args)
    if exports and nbd_server is None:
        raise OptionError(f"--export {args.export[0]}: NBD server not running")
    if args.control is not None and not args.control.startswith("tcp://"):
        raise OptionError(f"--control {args.control}: expected tcp://HOST:PORT")
    keys = _cluster_keys(args)
    if args.runtime_dir is not None and len(os.path.abspath(args.runtime_dir)) > 90:
        raise OptionError(f"--runtime-dir {args.runtime_dir}: path too long for socket files (max 90 bytes)")
    bound_heap_retention()  # large buffers given back when freed (see protocol/channel/_memory.py)
    raise_fd_limit()  # the headroom the system grants; peers get what the reserve leaves (FdBudget)
    loop = MainLoop(name=PROG)
    stop = {"requested": False}

    def on_signal(signum: int, why: str = "") -> bool:
        log.info("%s: stopping", why or f"{signal.Signals(signum).name} received")
        stop["requested"] = True
        loop.quit()
        return True

    # Before any thread exists (ZeroMQ's included), so that all inherit the blocked mask.
    signals = SignalSource([signal.SIGINT, signal.SIGTERM], on_signal, name="signals")
    loop.context.attach(signals)
    monitor: Monitor | None = None
    nbd: NbdServer | None = None
    with contextlib.ExitStack() as held:
        held.callback(loop.close)
        runtime_dir = _hold_files(args, configs, held)
        sockets = [m.path for m in monitors if m.path is not None]
        if nbd_server is not None and isinstance(nbd_server.addr, SocketAddressUnix):
            sockets.append(nbd_server.addr.path)
        janitor = _start_janitor(runtime_dir, sockets)
        if janitor is not None:
            held.callback(_stop_janitor, janitor)
        with bql():
            cluster = _new_cluster(loop, args, runtime_dir, keys)
            try:
                cluster.add_listener(_emit)
                for config in configs:
                    cluster.add(config)
                def failed() -> list[IOThread]:
                    return [t for t in cluster.iothreads.values() if t.state is IOThreadState.EXITED]

                if not cluster.wait_for(lambda: cluster.all_running() or stop["requested"] or bool(failed()),
                                        cluster.handshake_timeout_ms / 1000 + 5):
                    log.error("not every iothread answered in time")
                    cluster.shutdown()
                    return EXIT_FAILURE
                if failed():
                    t = failed()[0]
                    log.error("iothread %s exited during start-up (exit code %s)", t.id, t.exit_status)
                    cluster.shutdown()
                    return EXIT_FAILURE
                if not stop["requested"] and specs:
                    problem = _add_blockdevs(cluster, specs)
                    if problem is not None:
                        print(f"{PROG}: {problem}", file=sys.stderr)
                        cluster.shutdown()
                        return EXIT_FAILURE
                if not stop["requested"]:
                    nbd = NbdServer(cluster)
                    nbd.add_listener(_emit)
                    problem = _start_nbd(nbd, args, nbd_server, exports)
                    if problem is not None:
                        print(f"{PROG}: {problem}", file=sys.stderr)
                        nbd.close()
                        cluster.shutdown()
                        return EXIT_FAILURE
                    monitor = Monitor(cluster, nbd=nbd, on_quit=lambda: on_signal(signal.SIGTERM, "quit"))
                    qmp: list[str] = []
                    for m in monitors or [ChardevSpec("default", path=os.path.join(cluster.runtime_dir,
                                                                                    "qmp.sock"))]:
                        try:
                            if m.path is not None:
                                qmp.append(monitor.listen_unix(m.path))
                            else:
                                assert m.host is not None and m.port is not None
                                host, port = monitor.listen_tcp(m.host, m.port)
                                qmp.append(f"{host}:{port}")
                        except (OSError, UnsafePathError) as exc:
                            where = f"--chardev id={m.id}" if monitors else _dir_option(args, runtime_dir)
                            print(f"{PROG}: {where}: {exc}", file=sys.stderr)
                            monitor.close()
                            cluster.shutdown()
                            return EXIT_FAILURE
                    _emit("READY", {"pid": os.getpid(), "qmp": qmp, **cluster.describe(), "exports": nbd.uris()})
            except BaseException:
                if monitor is not None:
                    monitor.close()
                if nbd is not None:
                    nbd.close()
                cluster.shutdown()
                raise
        if not stop["requested"]:
            loop.run()
        with bql():
            if monitor is not None:
                monitor.close()
            cluster.shutdown()
        return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:  # its options are the iothread process's own (one declaration of them)
        return worker_main(argv[1:], prog=f"{PROG} worker")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: a command is required (try '{PROG} launch')", file=sys.stderr)
        return EXIT_FAILURE
    # The iothreads started from here log from the same level (Cluster passes it on).
    logging.basicConfig(level=args.log_level.upper(), format=f"{PROG}: %(message)s", stream=sys.stderr)
    try:
        if args.command == "bench":
            return run_bench(args)
        if args.command == "cleanup":
            return cleanup(args)
        if args.command == "keygen":
            return keygen(args)
        return launch(args)
    except (ValueError, OSError, StateError, RuntimeError) as exc:  # OptionError is a ValueError
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:  # Ctrl-C in bench outside its run (launch takes SIGINT through its loop)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
