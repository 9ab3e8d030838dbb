"""The QMP monitor: QEMU's management protocol, served by the main loop.

Theory of operation
-------------------
A listening socket (Unix or TCP) is an fd-watch source of the main context;
each accepted connection is a ``Session`` with its own sources.  Everything
runs in the main loop, under the BQL.

The protocol is the sans-I/O ``QmpSession``'s (``protocol.qmp``): greeting,
negotiation, one command at a time in input order (no OOB), ids echoed, bad
input answered, input and output bounded.  ``Session`` holds only the socket
and the dispatch: it feeds the session what it reads, writes out what the
session queued as far as the socket takes it (the rest when it is writable:
a slow client never blocks the loop), and runs the commands the session hands
out, in a loop until one waits for an answer from an iothread, so any number
of pipelined commands answered at once costs no stack.  An answer given later
starts that loop again.  At end of file it stops reading, runs and answers
the commands received before it, lets the answers go out, and closes.

The commands, their arguments and their results are declared in
``protocol.schema`` (``COMMANDS``): ``Monitor.execute`` checks the arguments
against the declaration before any side effect, runs the command with them
typed, and answers with its result in the declared form.  A command and each
of its continuations run under its ``Guard`` (``cluster._guard``): whatever
one raises, the command gets one answer, and what it changed is undone.
Events go to every session; the ones not negotiated yet drop them.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any

from protocol import (
    PEER_REFUSED,
    ErrorReply,
    FdBudget,
    QmpCommand,
    QmpSession,
    QueryReply,
    StateError,
    ThrottledLog,
    bind_unix_owner_only,
    qmp_error,
    qmp_event,
    qmp_line,
)

from protocol.schema import (
    COMMANDS,
    BlockDeviceInfo,
    BlockExportDelArguments,
    BlockExportOptionsBase,
    BlockdevDelArguments,
    BlockdevOptionsBase,
    BlockdevOptionsFile,
    BlockLatencyHistogramSetArguments,
    CommandInfo,
    ImageInfo,
    IOThreadInfo,
    IothreadOptions,
    IothreadProperties,
    NbdServerOptionsLegacy,
    NoArguments,
    ObjectDelArguments,
    ObjectOptionsBase,
    QomGetArguments,
    QomSetArguments,
    QueryBlockstatsArguments,
    SchemaError,
    StatusInfo,
    VersionInfo,
    XBlockdevSetIothreadArguments,
    blockdev_from_wire,
    blockdev_to_wire,
    dump,
    members,
    parse,
    parse_member,
    socket_address_flatten,
)
from protocol.schema import Command as CommandDeclaration

from ..cluster._cluster import RUN_STATE_RUNNING, Cluster, IOThread, IOThreadConfig, IOThreadState, NodeInfo
from ..cluster._guard import Guard, on_failure
from ..glib._source import IO_IN
from ..glib._output import SocketInput, SocketOutput
from ..glib._standard import FdWatchSource
from ..nbd._server import BLOCK_EXPORT_DELETED, NbdServer

__all__ = ["Monitor", "QmpFailure", "iothread_config"]

log = logging.getLogger("mainloop.qmp")

DISTRIBUTION = "iothreads"  # the project's name on PyPI, as its command's


def package_version() -> str:
    """The installed version of this project ("unknown" in a tree never installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


VERSION = {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": f"{DISTRIBUTION} {package_version()}"}
SEND_CHUNK_BYTES = 256 * 1024  # output handed to the socket per send
MAX_SESSIONS = 128  # QMP sessions at once; past it (or past the fds kept in reserve) one is refused
MAX_HISTOGRAM_BOUNDARIES = 32  # a node's counters, bins included, must fit one message (256 entries)


@dataclass(frozen=True)
class QmpFailure:
    error_class: str
    desc: str


Done = Callable[[Any], None]  # a result, or a QmpFailure


@dataclass(frozen=True)
class Command:
    """A QMP command: its declaration (arguments, result) and what runs it."""

    declaration: CommandDeclaration
    impl: Callable[[Any, Done], None]  # (the typed arguments, done with a typed result or a QmpFailure)

    @property
    def name(self) -> str:
        return self.declaration.name

    def run(self, args: dict[str, Any], done: Done) -> None:
        """Check the arguments against the declaration (QEMU's error texts),
        before anything else happens; then run with them typed.  ``done``
        gets the result in its declared JSON form, or a ``QmpFailure``."""
        declaration = self.declaration
        try:
            typed = declaration.parse_arguments(args)
        except SchemaError as exc:
            done(QmpFailure(exc.error_class, exc.desc))
            return

        def finish(result: Any) -> None:
            done(result if isinstance(result, QmpFailure) else declaration.dump_result(result))

        self.impl(typed, finish)


class Session:
    """One QMP connection: its socket, and the dispatch of its commands to the
    monitor's.  The protocol (greeting, negotiation, order of replies, input
    errors, the output bound) is its ``QmpSession``'s.  Main-loop thread, BQL held.
    """

    def __init__(self, monitor: Monitor, conn: socket.socket, peer: str) -> None:
        self.monitor = monitor
        self.conn = conn
        self.peer = peer
        self.qmp = QmpSession(VERSION, max_message_bytes=monitor.max_message_bytes)
        self.closed = False
        self._dispatching = False  # in _dispatch's loop: an answer given meanwhile does not start it again
        self._in = SocketInput(monitor.loop.context, conn, self._on_readable, name=f"qmp session {peer}",
                               role=f"QMP session socket ({peer})")  # watched while the session wants input
        self._at_eof = False
        self._out = SocketOutput(monitor.loop.context, conn, self._flush, name=f"qmp output {peer}",
                                 chunk_bytes=SEND_CHUNK_BYTES)
        self._flush()  # the greeting (and the input watch)

    def send_event(self, event: dict[str, Any]) -> None:
        """Send an event (once the session is negotiated)."""
        self.qmp.send_event(event)
        self._flush()

    # -- output ------------------------------------------------------------

    def _flush(self) -> None:
        """Write what the session has to send, as far as the socket takes it."""
        if self.closed:
            return
        done = self._out.send(self.qmp.data_to_send, self.qmp.data_sent)
        if done is None:
            self.close()
            return
        if not done:
            self._watch_input()
            return
        if self.qmp.closed and not self.closed:  # the protocol ended it: its last words are out, or lost
            if self.qmp.close_reason is not None:
                log.error("QMP session %s closed: %s", self.peer, self.qmp.close_reason)
            self.close()
        self._watch_input()

    def _watch_input(self) -> None:
        """Watch for input while the session wants it, and only then: a peer
        that sends faster than it is answered, or does not read its replies,
        is not read either (QEMU suspends such a monitor), so its input waits
        in its own socket buffers, not in this process."""
        self._in.want(self.qmp.wants_input and not self.closed and not self._at_eof)

    # -- input ---------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = self.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # The peer hung up (or shut down its writing side): nothing more is
            # read (end of file stays readable: watching it would spin); the
            # commands it sent are still run and answered (a peer that
            # half-closed reads the answers), then the socket is closed.
            self._at_eof = True
            self.qmp.receive_data(b"")
            self._dispatch()
            return
        self.qmp.receive_data(data)
        self._dispatch()

    def _dispatch(self) -> None:
        """Run the session's commands, one after the other, until one waits or none is left."""
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while (command := self.qmp.next_command()) is not None:
                self._run(command)
        finally:
            self._dispatching = False
        self._flush()

    def _run(self, request: QmpCommand) -> None:
        """Run one command: look it up, check its arguments, run it; its answer goes to the session."""
        answered = False

        def done(result: Any) -> None:
            nonlocal answered
            if answered:
                log.error("QMP command %s answered twice: the second answer is dropped", request.name)
                return
            answered = True
            if isinstance(result, QmpFailure):
                self.qmp.fail(result.error_class, result.desc)
            else:
                self.qmp.reply(result)
            self._dispatch()

        self.monitor.execute(request.name, request.arguments, done)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.qmp.close()
        self._in.close()
        self._out.close()
        self.conn.close()
        self.monitor.sessions.discard(self)


def iothread_config(options: ObjectOptionsBase) -> IOThreadConfig:
    """The cluster's configuration of an iothread from its validated ObjectOptions."""
    if not isinstance(options, IothreadOptions):
        raise TypeError(f"objects of type '{options.qom_type}' are not served here")
    return IOThreadConfig(options.id, **{m.attr: getattr(options, m.attr) for m in members(IothreadProperties)})


def _iothread_properties(config: IOThreadConfig) -> IothreadProperties:
    """An iothread's properties (the configuration's fields of the same names)."""
    return IothreadProperties(**{m.attr: getattr(config, m.attr) for m in members(IothreadProperties)})


def _block_device_info(node: NodeInfo) -> BlockDeviceInfo:
    """QMP's description of a node, from the validated options it was made with."""
    options = blockdev_from_wire(node.name, node.driver, node.options)
    return BlockDeviceInfo(node_name=node.name, drv=options.driver,
                           file=options.filename if isinstance(options, BlockdevOptionsFile) else "",
                           ro=options.read_only, image=ImageInfo(virtual_size=node.size), iothread=node.iothread,
                           active=node.active)


class Monitor:
    """QMP server(s) of a main loop and its cluster.  Main-loop thread, BQL held."""

    def __init__(self, cluster: Cluster, *, on_quit: Callable[[], object], nbd: NbdServer | None = None,
                 max_message_bytes: int = 1 << 20, max_sessions: int = MAX_SESSIONS) -> None:
        self.cluster = cluster
        self.nbd = nbd if nbd is not None else NbdServer(cluster)
        """The cluster's NBD server (the monitor closes it with its own sockets)."""
        self.loop = cluster.loop
        self.on_quit = on_quit
        self.max_message_bytes = max_message_bytes
        self.max_sessions = max_sessions
        self.fds = FdBudget()
        self.sessions: set[Session] = set()
        self._refusing = False  # sessions are being refused (one event and log line when it starts)
        self._refusals = ThrottledLog(log)
        self._listeners: list[tuple[socket.socket, FdWatchSource, str | None]] = []
        self.commands: dict[str, Command] = {}
        self._register_commands()
        cluster.add_listener(self._on_cluster_event)
        self.nbd.add_listener(self._on_nbd_event)

    # -- listening -----------------------------------------------------------------

    def listen_unix(self, path: str) -> str:
        """Serve QMP on an AF_UNIX socket at ``path``, accessible to this user
        only: a stale socket there is replaced, anything else refused
        (``UnsafePathError``)."""
        sock = bind_unix_owner_only(path)  # mode 0700 from the start: no window before a chmod
        self._listen(sock, path, f"QMP listening socket {path}")
        return path

    def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        addr = sock.getsockname()
        self._listen(sock, None, f"QMP listening socket {addr[0]}:{addr[1]}")
        return addr[0], addr[1]

    def _listen(self, sock: socket.socket, path: str | None, role: str) -> None:
        sock.listen(16)
        sock.setblocking(False)
        src = FdWatchSource(sock.fileno(), IO_IN, lambda fd, c: self._accept(sock), name="qmp listener",
                            role=role)
        self.loop.context.attach(src)
        self._listeners.append((sock, src, path))

    def _accept(self, sock: socket.socket) -> bool:
        try:
            conn, addr = sock.accept()
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                return True  # the peer went away before accept: nothing to do
            # Out of fds: the listener stays readable, so stop watching it for
            # a while instead of spinning, then try again.
            log.error("QMP: cannot accept a connection: %s; retrying in 200 ms", exc)
            for i, (lsock, src, path) in enumerate(self._listeners):
                if lsock is sock:
                    src.destroy()

                    def rearm(i: int = i, lsock: socket.socket = sock, path: str | None = path) -> bool:
                        if lsock.fileno() >= 0:
                            new = FdWatchSource(lsock.fileno(), IO_IN, lambda fd, c: self._accept(lsock),
                                                name="qmp listener", role=src.pollfds[0].role)
                            self.loop.context.attach(new)
                            self._listeners[i] = (lsock, new, path)
                        return False

                    self.loop.context.timeout_add(200, rearm, name="qmp listener back-off")
            return False
        conn.setblocking(False)
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix"
        if len(self.sessions) >= self.max_sessions:
            problem: str | None = f"too many QMP sessions: at most {self.max_sessions} at once"
        else:
            problem = self.fds.problem("a new QMP session")
        if problem is not None:
            self._refuse(conn, peer, problem)
            return True
        self._refusing = False
        self.sessions.add(Session(self, conn, peer))
        return True

    def _refuse(self, conn: socket.socket, peer: str, problem: str) -> None:
        """Turn a session away: an error in place of the greeting, then the
        connection closed; a QMP event to the sessions kept, when refusing starts."""
        try:
            conn.send(qmp_line(qmp_error("GenericError", f"QMP session refused: {problem}")))
        except OSError:
            pass  # its socket buffer is all it gets: the close says the rest
        conn.close()
        self._refusals.log("sessions", logging.ERROR, "QMP session %s refused: %s", peer, problem)
        if not self._refusing:
            self._refusing = True
            self.broadcast("RESOURCE_LIMIT_REACHED", {"resource": "qmp-sessions", "limit": self.max_sessions,
                                                      "reason": problem})

    def broadcast(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every negotiated session."""
        event = qmp_event(name, data)
        for s in list(self.sessions):
            s.send_event(event)

    def _on_cluster_event(self, name: str, data: dict[str, Any]) -> None:
        if name in ("IOTHREAD_EXITED", "BLOCK_IO_ERROR", "IOTHREAD_RESTARTED", "RESOURCE_LIMIT_REACHED",
                    PEER_REFUSED, "STOP", "RESUME"):
            self.broadcast(name, data)

    def _on_nbd_event(self, name: str, data: dict[str, Any]) -> None:
        if name == BLOCK_EXPORT_DELETED:
            self.broadcast(name, data)

    def close(self) -> None:
        self.nbd.close()
        for s in list(self.sessions):
            s.close()
        for sock, src, path in self._listeners:
            src.destroy()
            sock.close()
            if path is not None:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        self._listeners.clear()

    # -- commands -------------------------------------------------------------------

    def execute(self, name: str, args: dict[str, Any], done: Done) -> None:
        """Run command ``name`` with a session's ``args``: look it up, check the
        arguments against its declaration before any side effect, run it.
        ``done`` gets its result (in the declared JSON form) or a ``QmpFailure``,
        at once or later; exactly once, whatever the command or one of its
        continuations raises: it runs under a ``Guard``, which answers with a
        GenericError and undoes what the command changed (a ``StateError`` or
        a ``LocalProtocolError``, arguments too large to pass on, is a refusal
        in its own words)."""
        command = self.commands.get(name)
        if command is None:
            done(QmpFailure("CommandNotFound", f"The command {name} has not been found"))
            return
        guard = Guard(name, lambda desc: done(QmpFailure("GenericError", desc)))

        def answer(result: Any) -> None:
            if guard.answer():
                done(result)

        guard.start(lambda: command.run(args, answer))

    def _register_commands(self) -> None:
        """Every command ``COMMANDS`` declares, with what runs it."""
        impls: dict[str, Callable[[Any, Done], None]] = {
            "qmp_capabilities": lambda a, d: d(None),  # the session itself negotiates
            "query-version": lambda a, d: d(parse(VersionInfo, VERSION)),
            "query-commands": lambda a, d: d([CommandInfo(name=n) for n in sorted(COMMANDS)]),
            "query-status": lambda a, d: d(StatusInfo(running=self.cluster.run_state == RUN_STATE_RUNNING,
                                                      status=self.cluster.run_state)),
            "quit": self._quit,
            "cont": lambda a, d: self.cluster.resume(lambda: d(None)),
            "query-iothreads": self._query_iothreads,
            "object-add": self._object_add,
            "object-del": self._object_del,
            "qom-get": self._qom_get,
            "qom-set": self._qom_set,
            "blockdev-add": self._blockdev_add,
            "blockdev-del": self._blockdev_del,
            "query-named-block-nodes": lambda a, d: d([_block_device_info(n) for n in self.cluster.nodes.values()]),
            "x-blockdev-set-iothread": self._set_iothread,
            "x-query-main-loop": lambda a, d: d(self.loop.context.describe().as_dict()),
            "query-blockstats": self._query_blockstats,
            "block-latency-histogram-set": self._histogram_set,
            "nbd-server-start": self._nbd_server_start,
            "nbd-server-stop": lambda a, d: self.nbd.stop(lambda: d(None)),
            "block-export-add": self._block_export_add,
            "block-export-del": self._block_export_del,
            "query-block-exports": lambda a, d: d(self.nbd.query()),
        }
        if set(impls) != set(COMMANDS):
            raise AssertionError(f"commands declared but not implemented, or the reverse: "
                                 f"{sorted(set(impls) ^ set(COMMANDS))}")
        self.commands = {name: Command(COMMANDS[name], impls[name]) for name in COMMANDS}

    @staticmethod
    def _reply(done: Done, ok: Callable[[QueryReply], Any] = lambda r: {}) -> Callable[
            [QueryReply | ErrorReply], None]:
        def on_reply(reply: QueryReply | ErrorReply) -> None:
            if isinstance(reply, ErrorReply):
                done(QmpFailure(reply.error_class or "GenericError", reply.message))
            else:
                done(ok(reply))
        return on_reply

    def _quit(self, args: NoArguments, done: Done) -> None:
        done(None)
        self.broadcast("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self.on_quit()

    def _query_iothreads(self, args: NoArguments, done: Done) -> None:
        done([IOThreadInfo(id=t.id, thread_id=t.pid, host=t.host if t.remote else None,
                           **vars(_iothread_properties(t.config)))
              for t in self.cluster.iothreads.values() if t.state is IOThreadState.RUNNING])

    def _object_add(self, args: IothreadOptions, done: Done) -> None:
        try:
            t = self.cluster.add(iothread_config(args))
        except StateError:
            done(QmpFailure("GenericError", f"attempt to add duplicate property '{args.id}' to object "
                                            "(type 'container')"))
            return
        except (ValueError, OSError) as exc:  # e.g. an id too long for the runtime directory's socket paths
            done(QmpFailure("GenericError", f"iothread '{args.id}' cannot start: {exc}"))
            return
        on_failure(lambda then: self.cluster.stop(t.id, on_exit=then))  # a failed object-add leaves none
        answered = False

        def answer(result: Any) -> None:
            nonlocal answered
            if not answered:
                answered = True
                self.cluster.remove_listener(ready)
                done(result)

        def ready(name: str, data: dict[str, Any]) -> None:
            if name == "IOTHREAD_READY" and data.get("id") == t.id:
                answer(None)

        self.cluster.add_listener(ready)
        # Whatever ends it before it is ready (a crash, the handshake deadline,
        # an object-del meanwhile) answers too.
        self.cluster.on_exit(t.id, lambda: answer(QmpFailure("GenericError", f"iothread {t.id} failed to start")))

    def _object_del(self, args: ObjectDelArguments, done: Done) -> None:
        t = self.cluster.iothreads.get(args.id)
        if t is None or t.state is IOThreadState.EXITED:
            done(QmpFailure("GenericError", f"object '{args.id}' not found"))
            return
        owned = self.cluster.nodes_of(t.id)
        if owned:
            done(QmpFailure("GenericError", f"iothread '{t.id}' is in use by block node(s) "
                                            f"{', '.join(owned)}; move or delete them first"))
            return
        self.cluster.stop(t.id, on_exit=lambda: done(None))

    def _iothread_of_path(self, path: str, done: Done) -> IOThread | None:
        """The running iothread at ``/objects/ID``; else None, and ``done`` has the error."""
        t = self.cluster.iothreads.get(path.removeprefix("/objects/"))
        if not path.startswith("/objects/") or t is None or t.state is not IOThreadState.RUNNING:
            done(QmpFailure("DeviceNotFound", f"Device '{path}' not found"))
            return None
        return t

    @staticmethod
    def _known_property(name: str, done: Done) -> bool:
        if any(m.name == name for m in members(IothreadProperties)):
            return True
        done(QmpFailure("GenericError", f"Property 'iothread.{name}' not found"))
        return False

    def _qom_get(self, args: QomGetArguments, done: Done) -> None:
        t = self._iothread_of_path(args.path, done)
        if t is not None and self._known_property(args.property, done):
            done(dump(_iothread_properties(t.config))[args.property])

    def _qom_set(self, args: QomSetArguments, done: Done) -> None:
        t = self._iothread_of_path(args.path, done)
        if t is None or not self._known_property(args.property, done):
            return
        try:
            value = parse_member(IothreadProperties, args.property, args.value)
        except SchemaError as exc:
            done(QmpFailure(exc.error_class, exc.desc))
            return
        current = _iothread_properties(t.config)
        attr = next(m.attr for m in members(IothreadProperties) if m.name == args.property)
        self.cluster.set_poll_params(t.id, self._reply(done), **vars(replace(current, **{attr: value})))

    def _blockdev_add(self, args: BlockdevOptionsBase, done: Done) -> None:
        self.cluster.blockdev_add(args.node_name, args.driver.value, blockdev_to_wire(args), self._reply(done),
                                  args.iothread)

    def _blockdev_del(self, args: BlockdevDelArguments, done: Done) -> None:
        if self.nbd.exports_of_node(args.node_name):  # QEMU's words for a node with a user (bdrv_has_blk)
            done(QmpFailure("GenericError", f"Node {args.node_name} is in use"))
            return
        self.cluster.blockdev_del(args.node_name, self._reply(done))

    def _nbd_server_start(self, args: NbdServerOptionsLegacy, done: Done) -> None:
        self.nbd.start(socket_address_flatten(args.addr), max_connections=args.max_connections,
                       handshake_max_seconds=args.handshake_max_seconds)
        done(None)

    def _block_export_add(self, args: BlockExportOptionsBase, done: Done) -> None:
        self.nbd.add_export(args)
        done(None)

    def _block_export_del(self, args: BlockExportDelArguments, done: Done) -> None:
        self.nbd.del_export(args.id, args.mode)
        done(None)

    def _query_blockstats(self, args: QueryBlockstatsArguments, done: Done) -> None:
        if not args.query_nodes:
            done([])  # no device (frontend) is attached to any node here
            return
        names = sorted(self.cluster.nodes)
        results: dict[str, Any] = {}

        def one(name: str) -> Callable[[QueryReply | ErrorReply], None]:
            def on_reply(reply: QueryReply | ErrorReply) -> None:
                results[name] = reply
                if len(results) == len(names):
                    done([_blockstats(n, results[n], self.cluster.nodes.get(n)) for n in names
                          if isinstance(results[n], QueryReply)])
            return on_reply

        if not names:
            done([])
            return
        for name in names:
            self.cluster.node_stats(name, one(name))

    def _histogram_set(self, args: BlockLatencyHistogramSetArguments, done: Done) -> None:
        boundaries = args.boundaries
        if 0 in boundaries or list(boundaries) != sorted(set(boundaries)):
            done(QmpFailure("GenericError", "Parameter 'boundaries' expects a sorted list of positive integers"))
            return
        if len(boundaries) > MAX_HISTOGRAM_BOUNDARIES:
            # A node's statistics travel as one flat map of counters, bins included.
            done(QmpFailure("GenericError", f"Parameter 'boundaries' takes at most {MAX_HISTOGRAM_BOUNDARIES} "
                                            "values"))
            return
        if args.id not in self.cluster.nodes:
            done(QmpFailure("GenericError", f"Device '{args.id}' not found"))
            return
        self.cluster.set_latency_histogram(args.id, boundaries, self._reply(done))

    def _set_iothread(self, args: XBlockdevSetIothreadArguments, done: Done) -> None:
        self.cluster.move_node(args.node_name, args.iothread, self._reply(done))


_STAT_PREFIXES = ("rd", "wr", "flush", "unmap", "zero")


def _blockstats(name: str, reply: Any, info: Any) -> dict[str, Any]:
    """QMP's BlockStats for one node, from its iothread's flat counters."""
    c = reply.counters
    stats: dict[str, Any] = {}
    for p in _STAT_PREFIXES:
        for key in (f"{p}_operations", f"{p}_bytes", f"{p}_total_time_ns", f"failed_{p}_operations",
                    f"invalid_{p}_operations"):
            if key in c and not (p in ("flush",) and key == "flush_bytes"):
                stats[key] = c[key]
    boundaries = list(info.histogram) if info is not None else []
    if boundaries:
        for p, label in (("rd", "rd"), ("wr", "wr"), ("flush", "flush"), ("unmap", "zap")):
            bins = [c.get(f"{p}_histogram_{i}", 0) for i in range(len(boundaries) + 1)]
            stats[f"{label}_latency_histogram"] = {"boundaries": boundaries, "bins": bins}
    return {"node-name": name, "device": "", "stats": stats}
