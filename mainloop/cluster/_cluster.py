"""The cluster: iothread processes spawned, supervised and stopped by the main loop.

Theory of operation
-------------------
The main loop binds one ROUTER socket (the control channel, a source of its
MainContext); every iothread process connects a DEALER whose identity is its
id.  An ``IOThread`` handle follows one process through its states::

    STARTING --Hello--> RUNNING --stop()--> STOPPING --exit--> EXITED
        \\____________________ unexpected exit ____________________/

Spawning is ``posix_spawn`` of ``python -m iothreads.worker``: a fresh interpreter,
never a fork of this process and its ZeroMQ state, started clean of this
process's signal state (``_spawn.spawn``: an empty mask, default actions) in a
session of its own (Ctrl-C or Ctrl-Z at the terminal reaches the launcher,
which stops its iothreads in order; a stopped launcher stops no iothread).
Each process is watched
by a child-watch source (a pidfd), so an exit is seen at once and the child
is reaped; an exit that nobody asked for is logged and reported as an
``IOTHREAD_EXITED`` event, and the iothread is restarted if configured so.
A handshake that does not come within its deadline kills the process.

Restarts.  The nodes of an iothread that will be restarted are not lost:
they stay in the cluster, inactive (``NodeInfo.active``, QMP's ``active``),
until the restarted process has said ``Hello``; then each one is opened there
again (``BlockdevAdd``) with its options, its latency histogram and its
statistics, and is active once that is answered.  One that cannot be
reopened (its file was removed ...) is logged and dropped.  The dead process
cannot be asked for its statistics: the main loop keeps a copy, which each
iothread refreshes with its answer to a heartbeat (a ``NodeStats`` for each
node whose statistics changed since the last one), so a restarted node starts
from its statistics as of the last heartbeat its iothread answered.  A node
moved to another iothread takes its statistics along exactly: the old home
sends them with its answer to the ``BlockdevDel``, once the node is drained.

A heartbeat goes to every iothread each ``heartbeat_interval_ms``: for an
iothread with no main-loop process to watch (a remote one), the sign that the
main loop lives.  The iothreads started here watch this process instead (a
pidfd, the parent-death signal) and never stop because it is silent: block
I/O does not pass through the main loop.  Any message from an iothread is a
sign of life.

Beside its control connection, each iothread process gets a handoff socket
(an AF_UNIX socketpair made at its spawn, its end passed as its fd 3): NBD
connections, past their handshake, travel over it as descriptors
(``protocol``'s handoff) to the iothread that serves their node, and back
from it when the node moves away.  The cluster carries them (``hand_over``,
queued while the socket is full) and gives what comes back, and what the
iothreads say of the connections they served, to its ``connection_owner``
(the NBD server of ``mainloop.nbd``), which it also tells when a node gets a
running home again (a move ends, a restarted iothread reopened it) and when
an iothread exits (its connections are gone with it).  The owner's exports
are part of the published state (``published_exports``).

The deadlines here (a handshake, a stop, a request's answer) run on the
main loop's own time: monotonic time less the time this process was away
(stopped: SIGSTOP, Ctrl-Z, a frozen cgroup; or its loop held up), measured by
the heartbeat timer, which looks at least once a period while the loop runs.
Nothing can be heard while nobody listens: a main loop resumed after a stop
does not take its own absence for an iothread's silence.

Requests to an iothread (a query, a blockdev-add ...) wait in its
``PendingRequests`` table until the reply that names them: one left
unanswered fails after ``request_timeout_ms`` of loop time (checked at each heartbeat),
and all of them fail when the iothread exits.  The cluster's shape is
published for clients as a ``ClusterState`` (``write_state``).

Everything here runs in the main-loop thread with the BQL held.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from iothreads import ClockType, Timer
from iothreads.nbd import parse_listen_address
from protocol import (
    BadRequestError,
    BlockdevAdd,
    BlockdevDel,
    Channel,
    ClusterState,
    ErrorReply,
    ExportEntry,
    Event,
    FdBudget,
    Heartbeat,
    Hello,
    IOTHREAD_LEFT,
    IOThreadEntry,
    Message,
    NbdCloseExport,
    NbdConnection,
    NodeEntry,
    PAUSED_SUFFIX,
    NodeStats,
    PROTOCOL_VERSION,
    PendingRequests,
    Query,
    Resume,
    NBD_CONNECTION_CLOSED,
    NBD_CONNECTION_OPENED,
    NbdOffer,
    QueryReply,
    RemoteProtocolError,
    SetLatencyHistogram,
    SetPollParams,
    StateError,
    Stop,
    ThrottledLog,
    Welcome,
    bind_owner_only,
    channel_socket,
    cluster_state_path,
    handoff_pair,
    ipc_endpoint,
    make_runtime_dir,
    prepare_runtime_dir,
    receive_connection,
    replace_file,
    send_connection,
)
from protocol.schema import IothreadProperties, id_wellformed, members

from ..loop._bql import bql_locked
from ..glib._channel_source import ChannelSource
from ..loop._loop import MainLoop
from ..glib._source import IO_IN, IO_OUT
from ..glib._standard import ChildWatchSource, FdWatchSource
from ._guard import Continuation, bind, on_failure
from ._security import ClusterKeys, Gatekeeper
from ._spawn import spawn

__all__ = ["Cluster", "ConnectionOwner", "IOThread", "IOThreadConfig", "IOThreadState", "NodeInfo"]

log = logging.getLogger("mainloop.cluster")


def data_endpoint(runtime_dir: str, iothread_id: str) -> str:
    """Where an iothread serves its clients: ``ipc://RUNTIME_DIR/ID.data``
    (``ValueError`` if the path is too long for AF_UNIX)."""
    return ipc_endpoint(runtime_dir, f"{iothread_id}.data")

RUN_STATE_RUNNING = "running"  # QEMU's RunState values that happen here
RUN_STATE_IO_ERROR = "io-error"


def _image_of(options: Mapping[str, object]) -> str | None:
    """The node a node's (wire) options layer it over (blkdebug's ``image``), if any."""
    image = options.get("image")
    return image if isinstance(image, str) else None


HEARTBEAT_INTERVAL_MS = 500  # the default period of the heartbeats (and of the checks of request deadlines)
SPAWN_FDS = 5  # what an iothread costs the main loop: its pidfd, its connection, its handoff socket, some slack
HANDOFF_FD = 3  # the iothread's end of its handoff socket, in the iothread
HANDOFF_BATCH = 64  # connections taken from one handoff socket per wake-up
MAX_REMOTE_ID = 64  # characters of a remote iothread's id (a local one's is bounded by its socket paths)
RESTART_STABLE_NS = 10_000_000_000  # an iothread that ran this long before dying is restarted at once
RESTART_DELAY_MAX_MS = 10_000
REMOTE_SILENCE_PERIODS = 3  # heartbeat periods without a word from a remote iothread: it is gone
EXIT_SILENT = 3  # the exit code reported for a remote iothread taken for gone (what it exits with, silent)

EventCallback = Callable[[str, dict[str, Any]], object]
ReplyCallback = Callable[[QueryReply | ErrorReply], object]


_PROPERTY_DEFAULTS: dict[str, int] = {m.attr: m.default() for m in members(IothreadProperties)}


@dataclass
class IOThreadConfig:
    """An iothread as ``--object iothread,...`` describes it (its properties'
    defaults are the schema's)."""

    id: str
    poll_max_ns: int = _PROPERTY_DEFAULTS["poll_max_ns"]
    poll_grow: int = _PROPERTY_DEFAULTS["poll_grow"]
    poll_shrink: int = _PROPERTY_DEFAULTS["poll_shrink"]
    aio_max_batch: int = _PROPERTY_DEFAULTS["aio_max_batch"]
    restart: bool = False


class IOThreadState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"


@dataclass(eq=False)
class IOThread:
    """The main loop's handle of one iothread process."""

    config: IOThreadConfig
    pid: int = 0
    state: IOThreadState = IOThreadState.STARTING
    exit_status: int | None = None
    """``os.waitstatus_to_exitcode`` of the last exit (minus the signal number)."""
    restarts: int = 0
    started_ns: int = 0
    quick_exits: int = 0  # unexpected exits in a row, each soon after its start: restarts back off
    capabilities: tuple[str, ...] = ()
    data_endpoint: str = ""
    curve_key: str = ""
    """The CURVE public key its data endpoint serves with (on tcp://)."""
    remote: bool = False
    """Joined over tcp:// from elsewhere (``iothreads worker``): not started,
    watched or killed here; silence is its end (see ``_on_heartbeat_timer``)."""
    host: str = ""
    nbd_address: str = ""
    """Where a remote one serves the NBD exports of its nodes itself (HOST:PORT), if it does."""
    session: int = 0  # a remote one's join (its Hello's ``session``)
    heard_ns: int = 0  # a remote one's last message, on the cluster's loop time
    _pending: PendingRequests[ReplyCallback] = field(default_factory=PendingRequests)  # deadlines: loop time
    _watch: ChildWatchSource | None = None
    _exit_callbacks: list[Callable[[], object]] = field(default_factory=list)
    _deadline: Timer | None = None
    _deadline_ns: int = 0  # when the deadline is due, on the cluster's loop time (Cluster._loop_time_ns)
    _restart: Timer | None = None  # a restart to come
    handoff: socket.socket | None = None
    """The main loop's end of its handoff socket (NBD connections), while the process lives."""
    _handoff_in: FdWatchSource | None = None
    _handoff_out: FdWatchSource | None = None  # waiting for room to send what is queued
    _handoff_queue: deque[tuple[socket.socket, NbdConnection]] = field(default_factory=deque)

    @property
    def id(self) -> str:
        return self.config.id


class ConnectionOwner(Protocol):
    """What the cluster tells the owner of NBD connections (``mainloop.nbd``'s
    server).  Each is called in the main loop, under the BQL; one that
    raises is logged and changes nothing here."""

    def connection_returned(self, iothread_id: str, fd: int, msg: NbdConnection) -> None:
        """An iothread handed a connection back (its node moves away): the owner owns ``fd`` now."""

    def connection_closed(self, iothread_id: str, connection_id: int, export_id: str) -> None:
        """An iothread says a connection it served has ended."""

    def connection_opened(self, iothread_id: str, connection_id: int, export_id: str) -> None:
        """A remote iothread's own NBD listener took a client of an export (its own connection id)."""

    def node_placed(self, node_name: str) -> None:
        """A node's move ended (in its new home, or back in its old one), or a
        restarted iothread reopened it: where it is now may take connections."""

    def iothread_exited(self, iothread_id: str) -> None:
        """An iothread's process exited: the connections it served are gone."""

    def published_exports(self) -> Mapping[str, ExportEntry]:
        """The exports offered, by id, for the state file (``write_state``,
        which the owner calls when they change)."""


@dataclass
class NodeInfo:
    """A block node of the cluster: where it lives and what it is."""

    name: str
    driver: str
    iothread: str
    options: dict[str, str | int | bool]
    size: int = 0
    histogram: tuple[int, ...] = ()
    moving_to: str | None = None  # the target of a move in progress
    detached: bool = False  # during a move: the old home has let it go
    active: bool = True
    """False while its iothread is down, to be restarted, and until the node
    is reopened there (QMP's ``active``: no I/O can reach it meanwhile)."""
    stats: dict[str, int] = field(default_factory=dict)
    """Its statistics as its iothread last reported them (``NodeStats``: as
    of the last heartbeat), or as the old home gave them at a move."""


MAX_IOTHREADS = 256
"""Iothreads of one cluster at the most, however they are added (the command
line's ``--iothreads``, ``--object``, QMP's ``object-add``): each one is a process."""


class Cluster:
    """Iothread processes of one main loop.  Main-loop thread, BQL held."""

    def __init__(self, loop: MainLoop, *, runtime_dir: str | None = None, tcp: str | None = None,
                 heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS, handshake_timeout_ms: int = 15_000,
                 stop_timeout_ms: int = 5_000, request_timeout_ms: int = 60_000,
                 max_iothreads: int = MAX_IOTHREADS, clock_ns: Callable[[], int] = time.monotonic_ns,
                 keys: ClusterKeys | None = None) -> None:
        self.loop = loop
        self._clock_ns = clock_ns  # the monotonic clock of the deadlines (see _loop_time_ns)
        self.max_iothreads = max_iothreads
        self._own_runtime_dir = runtime_dir is None
        self.runtime_dir = runtime_dir or make_runtime_dir()
        if not self._own_runtime_dir:
            # Made private, or refused (UnsafePathError) if others own it or may write it.
            prepare_runtime_dir(self.runtime_dir)
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.handshake_timeout_ms = handshake_timeout_ms
        self.stop_timeout_ms = stop_timeout_ms
        self.request_timeout_ms = request_timeout_ms
        self.iothreads: dict[str, IOThread] = {}
        self.nodes: dict[str, NodeInfo] = {}
        # QEMU's run state, as far as it goes here: 'io-error' once a node's
        # 'stop' error policy held a request, 'running' again after 'cont'.
        self.run_state = RUN_STATE_RUNNING
        self._adding: dict[str, str] = {}  # node name: iothread, for a blockdev-add not answered yet
        self._tcp_host = tcp.removeprefix("tcp://").rsplit(":", 1)[0] if tcp else None
        self._listeners: list[Continuation[[str, dict[str, Any]]]] = []
        self._socket_files: list[str] = []
        self.zmq = zmq.Context()
        # On tcp://, CURVE only: the ZAP handler first (unbound, libzmq lets everyone in), then the socket.
        self.keys = (keys or ClusterKeys()) if tcp else None
        self.gatekeeper: Gatekeeper | None = None
        self._local_keys: tuple[str, str] | None = None  # the files this host's iothreads and clients read
        sock = channel_socket(self.zmq, zmq.ROUTER)
        try:
            if self.keys is not None:
                self._local_keys = self.keys.write_local(self.runtime_dir)
                self._socket_files.extend(self._local_keys)
                self.gatekeeper = Gatekeeper(loop, self.zmq, self.keys, self._emit)
                self.gatekeeper.secure(sock)
            if tcp:
                sock.bind(tcp)
                self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self.endpoint = ipc_endpoint(self.runtime_dir, "control")
                bind_owner_only(sock, self.endpoint)
                self._socket_files.append(self.endpoint.removeprefix("ipc://"))
        except BaseException:
            if self.gatekeeper is not None:
                self.gatekeeper.close(sock)
            sock.close(linger=0)
            self.zmq.term()
            for path in self._socket_files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self._remove_runtime_dir()
            raise
        self._bad_input = ThrottledLog(log)  # what iothreads send wrong: a few lines each, then counts
        self.fds = FdBudget()  # what is left once its peers (QMP sessions) have theirs
        self._state_errors = ThrottledLog(log)  # cluster.json that cannot be written (ENOSPC, EMFILE ...)
        self._state_stale = False  # it could not: written again at the next heartbeat
        self.channel = Channel(sock, self._on_message, on_error=self._on_bad_message)
        self._source = ChannelSource(self.channel, "iothread-control",
                                     role=f"ZMQ_FD of the iothreads' control channel ({self.endpoint})")
        loop.context.attach(self._source)
        self._looked_ns = clock_ns()  # the main loop's last look (see _loop_time_ns)
        self._away_ns = 0  # the time it was seen away, in all
        self._heartbeat = loop.timer_new_ms(ClockType.REALTIME, self._on_heartbeat_timer, "heartbeat")
        self._heartbeat.mod(self._heartbeat.now() + heartbeat_interval_ms)
        self._closed = False
        self.connection_owner: ConnectionOwner | None = None
        """Whom NBD connections handed back and news of them go to (None: they are closed)."""

    # -- events -------------------------------------------------------------

    def add_listener(self, callback: EventCallback) -> None:
        """``callback(name, data)`` for every cluster event (IOTHREAD_READY,
        IOTHREAD_EXITED, IOTHREAD_RESTARTED); added by a QMP command, a
        continuation of it (see ``_guard``), gone once the command is over."""
        self._listeners.append(bind(callback))

    def remove_listener(self, callback: EventCallback) -> None:
        """Undo ``add_listener``; unknown callbacks are ignored."""
        self._listeners = [cb for cb in self._listeners if cb.fn != callback]

    @staticmethod
    def _call(cb: Callable[..., object], *args: Any) -> None:
        """Run a reply or exit callback, or an event listener; one that raises
        cannot stop the others.  Those of a QMP command are continuations,
        which answer the command whatever they raise (``_guard``)."""
        try:
            cb(*args)
        except Exception:
            log.exception("cluster callback %r failed", cb)

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        self._listeners = [cb for cb in self._listeners if not cb.over]
        for cb in list(self._listeners):
            self._call(cb, name, data)

    # -- lifecycle of iothreads --------------------------------------------

    def add(self, config: IOThreadConfig) -> IOThread:
        """Start an iothread process (it is RUNNING once its Hello arrives)."""
        self._check_open()
        if config.id in self.iothreads and self.iothreads[config.id].state is not IOThreadState.EXITED:
            raise StateError(f"an iothread with id {config.id!r} already exists")
        live = sum(1 for t in self.iothreads.values() if t.state is not IOThreadState.EXITED)
        if live >= self.max_iothreads:
            raise ValueError(f"a cluster has at most {self.max_iothreads} iothreads (each one is a process)")
        t = IOThread(config)
        self._spawn(t)  # first: one that cannot start leaves no handle behind (ValueError, OSError)
        self.iothreads[config.id] = t
        return t

    def _spawn(self, t: IOThread) -> None:
        c = t.config
        if self._tcp_host is not None:
            data = f"tcp://{self._tcp_host}:*"
        else:
            data = data_endpoint(self.runtime_dir, c.id)
            for path in (data.removeprefix("ipc://"), data.removeprefix("ipc://") + PAUSED_SUFFIX):
                if path not in self._socket_files:
                    self._socket_files.append(path)  # even if it gets killed (paused: see DataListener)
        argv = [sys.executable, "-m", "iothreads.worker", "--id", c.id, "--connect", self.endpoint,
                "--data-endpoint", data,
                "--handoff-fd", str(HANDOFF_FD),
                "--parent-pid", str(os.getpid()),
                *(("--curve-keys", self._local_keys[0], "--server-key", self._local_keys[1])
                  if self._local_keys is not None else ()),
                *(arg for m in members(IothreadProperties) for arg in (f"--{m.name}", str(getattr(c, m.attr)))),
                "--handshake-timeout-ms", str(self.handshake_timeout_ms),
                "--log-level", str(log.getEffectiveLevel())]  # the iothreads log as this process does
        # Its pidfd and its control connection (which libzmq accepts on its
        # own, and aborts the process if it cannot) come out of the reserve:
        # there must be room for them, whatever QMP sessions and files hold.
        problem = self.fds.problem(f"iothread {c.id}", SPAWN_FDS, own=True)
        if problem is not None:
            raise OSError(errno.EMFILE, problem)

        def on_exit(pid: int, status: int, t: IOThread = t) -> None:
            self._on_exit(t, pid, status)

        def on_deadline(t: IOThread = t) -> None:
            self._on_deadline(t)

        ours, theirs = handoff_pair()
        try:
            pid = spawn(argv, new_session=True, pass_fds={HANDOFF_FD: theirs.fileno()})
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the child has its copy
        try:
            t._watch = ChildWatchSource(pid, on_exit, name=f"iothread {c.id} (pid {pid})")
            self.loop.context.attach(t._watch)
        except BaseException:
            # A child that cannot be watched must not outlive this attempt.
            ours.close()
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        t.pid = pid
        t.handoff = ours
        t._handoff_in = FdWatchSource(ours.fileno(), IO_IN, functools.partial(self._on_handoff, t),
                                      name=f"handoff {c.id}",
                                      role=f"handoff socket of iothread {c.id} (NBD connections handed back)")
        self.loop.context.attach(t._handoff_in)
        log.debug("iothread %s started (pid %d): %s", c.id, t.pid, " ".join(argv[1:]))
        t.started_ns = time.monotonic_ns()
        t.state = IOThreadState.STARTING
        t.exit_status = None
        t._deadline = self.loop.timer_new_ms(ClockType.REALTIME, on_deadline, f"deadline {c.id}")
        self._arm_deadline(t, self.handshake_timeout_ms)

    def loop_time_ns(self) -> int:
        """The clock of deadlines that should not count the main loop's own
        absences (see ``_loop_time_ns``), in ns."""
        return self._loop_time_ns()

    def _loop_time_ns(self) -> int:
        """The clock of the cluster's deadlines: monotonic time less the time
        the main loop was away (its process stopped, its loop held up).  The
        heartbeat timer looks every period while the loop runs: a longer gap
        between two looks (the timer's or any caller's) was time away.  An
        absence shorter than a period is not seen."""
        now = self._clock_ns()
        away_ns = now - self._looked_ns - self.heartbeat_interval_ms * 1_000_000
        if away_ns > 0:
            self._away_ns += away_ns
        self._looked_ns = now
        return now - self._away_ns

    def _arm_deadline(self, t: IOThread, timeout_ms: int) -> None:
        """``t``'s handshake or stop must come within ``timeout_ms`` of loop time."""
        assert t._deadline is not None
        t._deadline_ns = self._loop_time_ns() + timeout_ms * 1_000_000
        t._deadline.mod(t._deadline.now() + timeout_ms)

    def _on_deadline(self, t: IOThread) -> None:
        left_ms = -(-(t._deadline_ns - self._loop_time_ns()) // 1_000_000)
        if left_ms > 0 and t._deadline is not None:  # the main loop was away meanwhile: not the iothread's time
            t._deadline.mod(t._deadline.now() + left_ms)
            return
        if t.state is IOThreadState.STARTING:
            log.error("iothread %s (pid %d) did not complete its handshake in %d ms: killing it",
                      t.id, t.pid, self.handshake_timeout_ms)
        elif t.state is IOThreadState.STOPPING:
            log.error("iothread %s (pid %d) did not stop in %d ms: killing it",
                      t.id, t.pid, self.stop_timeout_ms)
        else:
            return
        self._kill(t)

    def _kill(self, t: IOThread) -> None:
        if t.remote:  # not ours to kill: it is gone as far as this cluster is concerned
            if t.state is not IOThreadState.EXITED:
                self._exited(t, -signal.SIGKILL)
            return
        if t.pid <= 0:
            return  # never started: kill(0) would be this whole process group
        try:
            os.kill(t.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _on_exit(self, t: IOThread, pid: int, status: int) -> None:
        if pid == t.pid:
            self._exited(t, os.waitstatus_to_exitcode(status))

    def _exited(self, t: IOThread, code: int) -> None:
        """``t``'s process is gone: reaped (a local one), or a remote one that
        left (its last word) or fell silent.  The nodes of one that will come
        back (restarted here, or a remote one that may rejoin) stay, inactive."""
        pid = t.pid
        expected = t.state is IOThreadState.STOPPING
        t.state = IOThreadState.EXITED
        t.exit_status = code
        t._watch = None
        if t._deadline is not None:
            t._deadline.delete()
        dropped = self.channel.discard_backlog(t.id.encode())  # not for a restarted successor
        if dropped:
            log.info("iothread %s: %d message(s) it never took were dropped", t.id, dropped)
        for rid, cb in t._pending.take_all():
            self._call(cb, ErrorReply(rid, "GenericError", f"iothread {t.id} exited"))
        callbacks, t._exit_callbacks = t._exit_callbacks, []
        for on_exit in callbacks:
            self._call(on_exit)
        held = [n for n in self.nodes.values() if n.iothread == t.id and not n.detached]
        restarting = (t.config.restart or t.remote) and not expected and not self._closed
        for n in held:
            if restarting:
                n.active = False  # reopened once it is back (_reopen_nodes)
            else:
                del self.nodes[n.name]
        # Its NBD connections: those it served are gone, those queued for it go back (its nodes as they are now).
        self._close_handoff(t)
        if self.connection_owner is not None:
            self._call(self.connection_owner.iothread_exited, t.id)
        if not self._closed:
            self.write_state()
        if expected:
            log.info("iothread %s (pid %d) stopped", t.id, pid)
            return
        if held and restarting:
            log.warning("block nodes of iothread %s, reopened when it %s: %s", t.id,
                        "joins again" if t.remote else "restarts", ", ".join(n.name for n in held))
        elif held:
            log.error("block nodes lost with iothread %s: %s", t.id, ", ".join(n.name for n in held))
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        log.error("iothread %s (pid %d) exited unexpectedly (%s)", t.id, pid, how)
        self._emit("IOTHREAD_EXITED", {"id": t.id, "pid": pid, "exit-code": code, "expected": False})
        if t.config.restart and not t.remote and not self._closed:
            # One that keeps dying at once is restarted less and less often:
            # at once, then after 0.1 s, 0.2 s ... up to 10 s.
            quick = time.monotonic_ns() - t.started_ns < RESTART_STABLE_NS
            t.quick_exits = t.quick_exits + 1 if quick else 0
            delay_ms = 0 if t.quick_exits <= 1 else min(100 << (t.quick_exits - 2), RESTART_DELAY_MAX_MS)
            if delay_ms:
                log.error("iothread %s exits soon after each start: restarting it in %d ms", t.id, delay_ms)
            timer = self.loop.timer_new_ms(ClockType.REALTIME, lambda: self._restart(t), f"restart {t.id}")
            timer.mod(timer.now() + delay_ms)
            t._restart = timer

    def _restart(self, t: IOThread) -> None:
        t._restart = None
        if self._closed or self.iothreads.get(t.id) is not t or t.state is not IOThreadState.EXITED:
            return
        t.restarts += 1
        try:
            self._spawn(t)
        except OSError as exc:
            log.error("iothread %s could not be restarted: %s", t.id, exc)
            self._drop_inactive(t, "not restarted")
            return
        log.info("iothread %s restarted (pid %d)", t.id, t.pid)
        self.write_state()
        self._emit("IOTHREAD_RESTARTED", {"id": t.id, "pid": t.pid, "restarts": t.restarts})

    def _drop_inactive(self, t: IOThread, why: str) -> None:
        """The nodes that waited for ``t``'s restart to be reopened are lost."""
        lost = [n.name for n in self.nodes.values() if n.iothread == t.id and not n.active]
        for name in lost:
            del self.nodes[name]
        if lost:
            log.error("block nodes lost with iothread %s (%s): %s", t.id, why, ", ".join(lost))
            self.write_state()

    def _reopen_nodes(self, t: IOThread, then: Callable[[], object]) -> None:
        """Open again in ``t``, restarted, the nodes it held when it died:
        with their options, their latency histogram and their statistics as
        last reported.  A node is active again once ``t`` has answered; one
        that cannot be reopened (its file was removed ...) is dropped.
        ``then()`` once every one was answered (not if ``t`` dies meanwhile)."""
        nodes = [n for n in self.nodes.values() if n.iothread == t.id and not n.active]
        nodes.sort(key=lambda n: _image_of(n.options) is not None)  # images before the nodes over them
        left = len(nodes)

        def one_done() -> None:
            nonlocal left
            left -= 1
            if not left:
                then()

        if not nodes:
            then()
        for info in nodes:
            self._reopen(t, info, one_done)

    def _reopen(self, t: IOThread, info: NodeInfo, then: Callable[[], object]) -> None:
        def done(reply: QueryReply | ErrorReply) -> None:
            if self.nodes.get(info.name) is not info:
                then()  # deleted meanwhile
                return
            if isinstance(reply, ErrorReply) and t.state is not IOThreadState.RUNNING:
                return  # t died again: the node waits for its next start (or is dropped with it)
            if isinstance(reply, QueryReply):
                info.active = True
                info.size = reply.counters.get("size", info.size)
                log.info("node %s reopened in iothread %s", info.name, t.id)
                self.write_state()
                self._node_placed(info.name)
            else:
                log.error("node %s could not be reopened in iothread %s, dropped: %s", info.name, t.id,
                          reply.message)
                del self.nodes[info.name]
                self.write_state()
            then()

        self._ask(t.id, lambda rid: self._blockdev_add_message(rid, info), done)

    @staticmethod
    def _blockdev_add_message(request_id: int, info: NodeInfo) -> BlockdevAdd:
        """What opens ``info`` in a new home (it moved, or its iothread was
        restarted): its options, its statistics and its latency histogram."""
        return BlockdevAdd(request_id, info.name, info.driver, info.options, info.stats, info.histogram)

    def on_exit(self, iothread_id: str, callback: Callable[[], object]) -> None:
        """``callback()`` once the iothread has exited and been reaped, for
        whatever reason (at once if it has); its next exit only, when it restarts."""
        t = self.iothreads[iothread_id]
        if t.state is IOThreadState.EXITED:
            callback()
        else:
            t._exit_callbacks.append(bind(callback))

    def stop(self, iothread_id: str, on_exit: Callable[[], object] | None = None) -> None:
        """Ask one iothread to stop (it exits and is reaped; killed after the
        stop timeout); ``on_exit()`` once it has been reaped."""
        t = self.iothreads[iothread_id]
        if on_exit is not None:
            self.on_exit(iothread_id, on_exit)
        if t._restart is not None:  # it died and was to be restarted: not any more
            t._restart.delete()
            t._restart = None
            self._drop_inactive(t, "stopped before its restart")
        if t.state in (IOThreadState.EXITED, IOThreadState.STOPPING):
            return
        if t.state is IOThreadState.STARTING:
            t.state = IOThreadState.STOPPING
            self._kill(t)  # no channel to it yet
            return
        t.state = IOThreadState.STOPPING
        self.channel.send(Stop("requested"), t.id.encode())
        if t._deadline is None and t.remote:
            t._deadline = self.loop.timer_new_ms(ClockType.REALTIME, lambda: self._on_deadline(t), f"deadline {t.id}")
        if t._deadline is not None:
            self._arm_deadline(t, self.stop_timeout_ms)

    # -- messages -------------------------------------------------------------

    def _on_message(self, identity: bytes, msg: Message) -> None:
        t = self.iothreads.get(identity.decode(errors="replace"))
        if t is None or t.state is IOThreadState.EXITED:
            if isinstance(msg, Hello) and self.keys is not None:
                self._join(identity, msg, t)
            else:
                log.warning("control message %s from unknown peer %r dropped", type(msg).KIND, identity)
            return
        if t.remote:
            t.heard_ns = self._loop_time_ns()
        if isinstance(msg, (QueryReply, ErrorReply)):  # the common case first
            cb = t._pending.match(msg.request_id)
            if cb is not None:
                self._call(cb, msg)
        elif isinstance(msg, Hello):
            if t.remote and t.state is IOThreadState.RUNNING and msg.session > t.session:
                # It lost this main loop (which did not notice) and closed its nodes: a new join.
                log.warning("iothread %s joins again (session %d): it had lost this main loop", t.id, msg.session)
                self._exited(t, EXIT_SILENT)
                self._join(identity, msg, self.iothreads.get(t.id))
            else:
                self._on_hello(t, msg)  # (a repeat of its session's: ignored)
        elif isinstance(msg, NodeStats):
            info = self.nodes.get(msg.node_name)
            if info is not None and info.iothread == t.id and info.active and not info.detached:
                info.stats = msg.counters  # the copy a restart reopens the node with
        elif isinstance(msg, Heartbeat):
            pass
        elif isinstance(msg, Event):
            # Raised in an iothread, handled here, in the main loop, under the BQL.
            if msg.name in (NBD_CONNECTION_CLOSED, NBD_CONNECTION_OPENED):
                self._connection_event(t, msg.name, msg.data)
            elif msg.name == IOTHREAD_LEFT and t.remote:
                code = msg.data.get("exit-code")
                self._exited(t, code if isinstance(code, int) and not isinstance(code, bool) else 1)
            else:
                self._emit(msg.name, {**msg.data, "iothread": t.id})
                if msg.name == "BLOCK_IO_ERROR" and msg.data.get("action") == "stop":
                    self._stopped(RUN_STATE_IO_ERROR)
        else:
            log.warning("iothread %s sent an unexpected %s", t.id, type(msg).KIND)

    def _stopped(self, state: str) -> None:
        if self.run_state == RUN_STATE_RUNNING:
            self.run_state = state
            log.warning("the cluster is stopped (%s): 'cont' resumes it", state)
            self._emit("STOP", {})

    def resume(self, callback: Callable[[], object]) -> None:
        """QMP's ``cont``: running again, and every iothread submits again the
        requests its nodes' 'stop' policies hold (a request that fails again
        stops the cluster again).  ``callback()`` once every running iothread
        answered (or failed to)."""
        if self.run_state != RUN_STATE_RUNNING:
            self.run_state = RUN_STATE_RUNNING
            self._emit("RESUME", {})
        running = [t.id for t in self.iothreads.values() if t.state is IOThreadState.RUNNING]
        left = len(running)

        def answered(reply: QueryReply | ErrorReply) -> None:
            nonlocal left
            if isinstance(reply, QueryReply) and reply.counters.get("resumed"):
                log.info("%d held request(s) submitted again", reply.counters["resumed"])
            left -= 1
            if not left:
                callback()

        if not running:
            callback()
        for iothread_id in running:
            self._ask(iothread_id, Resume, answered)

    def _connection_event(self, t: IOThread, name: str, data: dict[str, Any]) -> None:
        connection, export = data.get("connection"), data.get("export")
        if not isinstance(connection, int) or isinstance(connection, bool) or not isinstance(export, str) or (
                name == NBD_CONNECTION_OPENED and not t.remote):
            self._bad_input.log((t.id, name), logging.ERROR, "iothread %s: a bad %s event: %r", t.id, name, data)
            return
        if self.connection_owner is not None:
            handler = (self.connection_owner.connection_closed if name == NBD_CONNECTION_CLOSED
                       else self.connection_owner.connection_opened)
            self._call(handler, t.id, connection, export)

    def offer_nbd_export(self, iothread_id: str, offer: NbdOffer) -> None:
        """Tell a remote iothread with an NBD listener of its own what to offer
        (or withdraw); nothing if it is not running (it is told again when its
        nodes are placed there)."""
        t = self.iothreads.get(iothread_id)
        if t is not None and t.remote and t.state is IOThreadState.RUNNING:
            self.channel.send(offer, t.id.encode())

    def _on_bad_message(self, identity: bytes, exc: RemoteProtocolError) -> None:
        self._bad_input.log((identity, type(exc)), logging.ERROR,
                            "bad control message from %r: %s", identity, exc)
        t = self.iothreads.get(identity.decode(errors="replace"))
        if t is not None and isinstance(exc, BadRequestError) and exc.kind in (QueryReply.KIND,
                                                                                ErrorReply.KIND):
            cb = t._pending.match(exc.request_id)  # its answer came, unreadable: the request failed
            if cb is not None:
                self._call(cb, ErrorReply(exc.request_id, "GenericError",
                                          f"iothread {t.id} sent an unreadable reply: {exc}"))

    def _join(self, identity: bytes, msg: Hello, before: IOThread | None) -> None:
        """An iothread from elsewhere (``iothreads worker``) says ``Hello``
        over tcp://, past the CURVE gate: it joins, under the id it chose, if
        that is free (or was a remote one's that left: its nodes, kept
        inactive, are reopened there), and the count allows."""
        iothread_id = identity.decode(errors="replace")
        problem = ""
        if msg.iothread_id != iothread_id or msg.version != PROTOCOL_VERSION:
            problem = f"a bad handshake (version {msg.version}, id {msg.iothread_id!r})"
        elif before is not None and not before.remote:
            problem = f"the id {iothread_id!r} is one of this cluster's own iothreads"
        elif sum(1 for t in self.iothreads.values() if t.state is not IOThreadState.EXITED) >= self.max_iothreads:
            problem = f"a cluster has at most {self.max_iothreads} iothreads"
        elif not id_wellformed(iothread_id) or len(iothread_id) > MAX_REMOTE_ID:
            problem = f"{iothread_id[:MAX_REMOTE_ID]!r} is not an id (a letter, then letters, digits, '-', '.', '_')"
        if problem:
            self._bad_input.log(("join", identity), logging.ERROR, "iothread %r from %s cannot join: %s",
                                iothread_id, msg.host or "elsewhere", problem)
            self.channel.send(Stop(problem[:200]), identity)
            return
        t = before or IOThread(IOThreadConfig(iothread_id))
        t.remote, t.host, t.pid, t.session = True, msg.host, msg.pid, msg.session
        t.state, t.exit_status, t.started_ns = IOThreadState.STARTING, None, time.monotonic_ns()
        t.heard_ns = self._loop_time_ns()
        t._deadline = None  # (a stop's, deleted when it left: made again by the next stop)
        self.iothreads[iothread_id] = t
        log.info("iothread %s joins from %s (pid %d there)", iothread_id, msg.host or "elsewhere", msg.pid)
        self._on_hello(t, msg)

    def _on_hello(self, t: IOThread, msg: Hello) -> None:
        if msg.version != PROTOCOL_VERSION or msg.iothread_id != t.id or (msg.pid != t.pid and not t.remote):
            log.error("iothread %s: bad handshake (version %d, id %r, pid %d): killing it",
                      t.id, msg.version, msg.iothread_id, msg.pid)
            self._kill(t)
            return
        if t.state is not IOThreadState.STARTING:
            return
        t.state = IOThreadState.RUNNING
        t.capabilities = msg.capabilities
        t.data_endpoint = msg.data_endpoint
        t.curve_key = msg.curve_key
        t.nbd_address = ""
        if t.remote and msg.nbd_address:
            try:
                parse_listen_address(msg.nbd_address)
                t.nbd_address = msg.nbd_address
            except ValueError:
                log.error("iothread %s: a bad NBD address %r: its nodes' exports are not served", t.id,
                          msg.nbd_address)
        if t._deadline is not None:
            t._deadline.delete()
        allowed = tuple(k.decode() for k in self.keys.allowed()) if self.keys is not None else ()
        self.channel.send(Welcome(PROTOCOL_VERSION, msg.capabilities, self.heartbeat_interval_ms, allowed),
                          t.id.encode())
        self.write_state()
        pid = t.pid

        def ready() -> None:
            if t.state is IOThreadState.RUNNING and t.pid == pid:
                self._emit("IOTHREAD_READY", {"id": t.id, "pid": pid})

        # Ready once it serves again what it held before a restart (at once for a new one).
        self._reopen_nodes(t, ready)

    def _request(self, iothread_id: str, make: Callable[[int], Message], callback: ReplyCallback) -> None:
        t = self.iothreads.get(iothread_id)
        if t is None or t.state is not IOThreadState.RUNNING:
            raise StateError(f"iothread {iothread_id!r} is not running")
        request_id = t._pending.next_id()
        # Sent first: a request the channel refuses (LocalProtocolError) leaves nothing pending.
        self.channel.send(make(request_id), t.id.encode())
        # An iothread that leaves it unanswered (it hangs, or is stopped) fails
        # it after the request timeout: a QMP command must get an answer.  The
        # callback is a continuation of the command that asks (``_guard``).
        t._pending.register(request_id, bind(callback),
                            self._loop_time_ns() + self.request_timeout_ms * 1_000_000)

    def _ask(self, iothread_id: str, make: Callable[[int], Message], callback: ReplyCallback) -> None:
        """``_request``; an iothread that is not running answers at once, with an error."""
        try:
            self._request(iothread_id, make, callback)
        except StateError as exc:
            callback(ErrorReply(0, "GenericError", str(exc)))

    def query(self, iothread_id: str, callback: ReplyCallback, node: str = "") -> None:
        """Ask an iothread for its counters, or for those of its ``node`` (an
        error if it does not hold it); ``callback(reply)`` in the main loop."""
        self._request(iothread_id, lambda rid: Query(rid, node), callback)

    def set_poll_params(self, iothread_id: str, callback: ReplyCallback, *, poll_max_ns: int,
                        poll_grow: int, poll_shrink: int, aio_max_batch: int) -> None:
        """Change an iothread's polling parameters while it runs."""
        c = self.iothreads[iothread_id].config
        old = (c.poll_max_ns, c.poll_grow, c.poll_shrink, c.aio_max_batch)

        def done(reply: QueryReply | ErrorReply) -> None:
            if isinstance(reply, QueryReply):
                c.poll_max_ns, c.poll_grow, c.poll_shrink, c.aio_max_batch = (poll_max_ns, poll_grow,
                                                                              poll_shrink, aio_max_batch)
            callback(reply)

        def undo(then: Callable[[], None]) -> None:  # the iothread may have taken the new ones
            c.poll_max_ns, c.poll_grow, c.poll_shrink, c.aio_max_batch = old
            self._ask(iothread_id, lambda rid: SetPollParams(rid, *old), lambda _r: then())

        self._request(iothread_id, lambda rid: SetPollParams(rid, poll_max_ns, poll_grow, poll_shrink,
                                                             aio_max_batch), done)
        on_failure(undo)

    # -- NBD connections ---------------------------------------------------------

    def hand_over(self, iothread_id: str, conn: socket.socket, msg: NbdConnection) -> None:
        """Send an NBD connection past its handshake to an iothread, over its
        handoff socket (queued while that is full); the cluster owns ``conn``
        from now on and closes its copy once sent.  One still queued when the
        iothread exits goes back to the connection owner, as one handed back.
        ``StateError`` if the iothread is not running (``conn`` is the caller's
        still)."""
        t = self.iothreads.get(iothread_id)
        if t is not None and t.remote:
            raise StateError(f"iothread {iothread_id!r} is on another host ({t.host or '?'}): "
                             "a connection cannot be handed to it")
        if t is None or t.state is not IOThreadState.RUNNING or t.handoff is None:
            raise StateError(f"iothread {iothread_id!r} is not running")
        t._handoff_queue.append((conn, msg))
        self._flush_handoff(t)

    def _flush_handoff(self, t: IOThread) -> None:
        """Send what is queued for ``t``, as far as its handoff socket takes it;
        the rest once it is writable."""
        while t._handoff_queue and t.handoff is not None:
            conn, msg = t._handoff_queue[0]
            try:
                send_connection(t.handoff, conn.fileno(), msg)
            except BlockingIOError:
                if t._handoff_out is None:
                    t._handoff_out = FdWatchSource(t.handoff.fileno(), IO_OUT, self._handoff_writable(t),
                                                   name=f"handoff {t.id} output")
                    self.loop.context.attach(t._handoff_out)
                return
            except OSError as exc:  # the iothread is going away: at its exit, the queue goes back
                self._bad_input.log((t.id, "handoff send"), logging.WARNING,
                                    "iothread %s: NBD connections cannot be handed over: %s", t.id, exc)
                return
            t._handoff_queue.popleft()
            conn.close()
        if t._handoff_out is not None:
            t._handoff_out.destroy()
            t._handoff_out = None

    def _handoff_writable(self, t: IOThread) -> Callable[[int, int], bool]:
        def writable(fd: int, cond: int) -> bool:
            t._handoff_out = None  # this source ends; _flush_handoff makes another if needed
            self._flush_handoff(t)
            return False
        return writable

    def _on_handoff(self, t: IOThread, fd: int, cond: int) -> bool:
        """Connections an iothread handed back: to the connection owner (closed if there is none)."""
        for _ in range(HANDOFF_BATCH):
            if t.handoff is None:
                return False
            try:
                received = receive_connection(t.handoff)
            except EOFError:  # the process is exiting; its exit closes the socket
                t._handoff_in = None
                return False
            except RemoteProtocolError as exc:
                self._bad_input.log((t.id, "handoff"), logging.ERROR,
                                    "iothread %s: bad handoff datagram: %s", t.id, exc)
                continue
            except OSError as exc:
                log.error("iothread %s: its handoff socket failed: %s", t.id, exc)
                t._handoff_in = None
                return False
            if received is None:
                return True
            fd, msg = received
            if self.connection_owner is None:
                os.close(fd)
                continue
            self._call(self.connection_owner.connection_returned, t.id, fd, msg)
        return True

    def _close_handoff(self, t: IOThread) -> None:
        """``t``'s process is gone: its handoff socket is closed; the connections
        still queued for it go back to the connection owner (or are closed)."""
        for src in (t._handoff_in, t._handoff_out):
            if src is not None:
                src.destroy()
        t._handoff_in = t._handoff_out = None
        while t._handoff_queue:
            conn, msg = t._handoff_queue.popleft()
            if self.connection_owner is None or self._closed:
                conn.close()
            else:
                self._call(self.connection_owner.connection_returned, t.id, conn.detach(), msg)
        if t.handoff is not None:
            t.handoff.close()
            t.handoff = None

    def close_nbd_export(self, iothread_id: str, export_id: str, callback: ReplyCallback) -> None:
        """Ask an iothread to close the NBD connections of export ``export_id``
        it serves; ``callback(reply)``: a ``QueryReply`` counting them
        (``closed``), or an error (an iothread not running answers at once).
        Connections of the export still queued for its handoff socket are not
        sent: they are closed here, and told to the owner as closed."""
        t = self.iothreads.get(iothread_id)
        if t is not None:
            kept = deque(entry for entry in t._handoff_queue if entry[1].export_id != export_id)
            dropped = [entry for entry in t._handoff_queue if entry[1].export_id == export_id]
            t._handoff_queue = kept
            for conn, msg in dropped:
                conn.close()
                if self.connection_owner is not None:
                    self._call(self.connection_owner.connection_closed, iothread_id, msg.connection_id, export_id)
        self._ask(iothread_id, lambda rid: NbdCloseExport(rid, export_id), callback)

    def _node_placed(self, node_name: str) -> None:
        if self.connection_owner is not None:
            self._call(self.connection_owner.node_placed, node_name)

    # -- block nodes -------------------------------------------------------------

    def blockdev_add(self, node_name: str, driver: str, options: dict[str, str | int | bool],
                     callback: ReplyCallback, iothread: str | None = None) -> None:
        """Create a node in ``iothread`` (or the running iothread with the fewest
        nodes, counting those still being added or moved to it: several adds
        in a row are spread); ``callback(reply)`` once it exists or failed."""
        if node_name in self.nodes or node_name in self._adding:
            raise StateError(f"Duplicate nodes with node-name='{node_name}'")
        image = _image_of(options)
        if image is not None:  # a node over another one: in that one's iothread (after it, on one channel)
            child = self.nodes.get(image)
            if child is None and image not in self._adding:
                raise StateError(f"Cannot find device={image} nor node-name={image}")
            if child is not None and child.moving_to is not None:
                raise StateError(f"node '{image}' is moving to {child.moving_to}")
            child_home = child.iothread if child is not None else self._adding[image]
            if iothread not in (None, child_home):
                raise StateError(f"node '{image}' is in iothread {child_home}: a node over it must be there too")
            iothread = child_home
        if iothread is None:
            running = [t for t in self.iothreads.values() if t.state is IOThreadState.RUNNING]
            if not running:
                raise StateError("no iothread is running")
            iothread = min(running, key=lambda t: len(self.nodes_of(t.id))).id
        home = iothread

        def done(reply: QueryReply | ErrorReply) -> None:
            self._adding.pop(node_name, None)
            if isinstance(reply, QueryReply):
                self.nodes[node_name] = NodeInfo(node_name, driver, home, dict(options),
                                                 reply.counters.get("size", 0))
                self.write_state()
            callback(reply)

        self._request(home, lambda rid: BlockdevAdd(rid, node_name, driver, options), done)
        self._adding[node_name] = home  # the name is taken until the answer comes
        on_failure(lambda then: self._undo_add(node_name, home, then))

    def _undo_add(self, node_name: str, home: str, then: Callable[[], None]) -> None:
        """A blockdev-add failed half-way: the node is forgotten, and deleted
        in its home if it was opened there (asked after the add: one channel,
        in order).  The name stays taken until then."""
        self.nodes.pop(node_name, None)
        self._adding[node_name] = home

        def deleted(_reply: QueryReply | ErrorReply) -> None:  # an error: it was not opened
            self._adding.pop(node_name, None)
            self.write_state()
            then()

        self._ask(home, lambda rid: BlockdevDel(rid, node_name), deleted)

    def blockdev_del(self, node_name: str, callback: ReplyCallback) -> None:
        """Drain and remove a node."""
        info = self.nodes.get(node_name)
        if info is None:
            raise StateError(f"Failed to find node with node-name='{node_name}'")
        if self.parents_of(node_name):
            raise StateError(f"Block device {node_name} is in use")  # QEMU's words (a child's refcnt)
        t = self.iothreads.get(info.iothread)
        if not info.active and (t is None or t.state is not IOThreadState.RUNNING):
            # Its iothread is down, to be restarted: the node is open nowhere.
            del self.nodes[node_name]
            self.write_state()
            callback(QueryReply(0, {}))
            return

        def done(reply: QueryReply | ErrorReply) -> None:
            if isinstance(reply, QueryReply):
                self.nodes.pop(node_name, None)
                self.write_state()
            callback(reply)

        home = info.iothread
        self._request(home, lambda rid: BlockdevDel(rid, node_name), done)
        on_failure(lambda then: self._restore_node(info, home, None, then))

    def _restore_node(self, info: NodeInfo, home: str, target: str | None, then: Callable[[], None]) -> None:
        """A command on node ``info`` failed half-way (it was in iothread
        ``home``; ``target``: where a move was taking it): the node is
        recorded where it is held now (each is asked, after what the command
        asked it: one channel, in order), in ``home`` if it is still there; it
        is reopened in ``home`` if it is held nowhere, and lost if that
        fails.  ``then()`` once the registry says what the iothreads hold."""
        places = [home] if target is None else [home, target]
        held: dict[str, bool] = {}
        self.nodes.setdefault(info.name, info)  # its name is not free meanwhile

        def settle(where: str | None) -> None:
            info.moving_to, info.detached = None, False
            if where is None:
                self.nodes.pop(info.name, None)
            else:
                if where != home:
                    log.info("node %s stays in %s, where the failed command took it", info.name, where)
                info.iothread = where  # (its histogram setting came with its BlockdevAdd there)
                self.nodes[info.name] = info
            self.write_state()
            if where is not None:
                self._node_placed(info.name)
            then()

        def reopened(reply: QueryReply | ErrorReply) -> None:
            if isinstance(reply, ErrorReply):
                log.error("node %s is lost: it could not be reopened in %s: %s", info.name, home, reply.message)
                settle(None)
            else:
                info.size = reply.counters.get("size", info.size)
                settle(home)

        def answered(place: str, reply: QueryReply | ErrorReply) -> None:
            held[place] = isinstance(reply, QueryReply)
            if len(held) < len(places):
                return
            holders = [p for p in places if held[p]]
            if not holders:
                self._ask(home, lambda rid: self._blockdev_add_message(rid, info), reopened)
                return
            for extra in holders[1:]:  # never two copies
                self._ask(extra, lambda rid: BlockdevDel(rid, info.name), lambda _r: None)
            settle(holders[0])

        for place in places:
            self._ask(place, lambda rid: Query(rid, info.name), functools.partial(answered, place))

    def move_node(self, node_name: str, iothread: str, callback: ReplyCallback) -> None:
        """Move a node to another iothread while I/O runs (QEMU's
        ``x-blockdev-set-iothread``): the old home stops taking requests for
        it (they are answered ESTALE, and clients resend them to the new
        home), drains what is in flight, and closes it; the new home opens
        it; the published state then points there.  Every request completes
        once.  ``callback(reply)`` at the end."""
        info = self.nodes.get(node_name)
        if info is None:
            raise StateError(f"Failed to find node with node-name='{node_name}'")
        target = self.iothreads.get(iothread)
        if target is None or target.state is IOThreadState.EXITED:
            raise StateError(f"Cannot find iothread {iothread}")  # QEMU's words
        if target.state is not IOThreadState.RUNNING:
            raise StateError(f"iothread {iothread!r} is not running")
        if info.iothread == iothread:
            callback(QueryReply(0, {"size": info.size}))
            return
        if info.moving_to is not None:
            raise StateError(f"node '{node_name}' is already moving to {info.moving_to}")
        if self.parents_of(node_name):
            raise StateError(f"Node {node_name} is not a root node")  # QEMU's words
        if _image_of(info.options) is not None:
            raise StateError(f"node '{node_name}' is layered over node '{_image_of(info.options)}': a graph "
                             f"of nodes does not move here (blockdev-del it, move its image, add it again)")
        old = info.iothread
        info.moving_to = iothread
        log.debug("moving node %s from %s to %s: draining it in %s", node_name, old, iothread, old)

        def complete(reply: QueryReply | ErrorReply) -> None:
            info.moving_to = None
            info.detached = False
            self._node_placed(node_name)
            callback(reply)

        def added(reply: QueryReply | ErrorReply) -> None:
            if isinstance(reply, QueryReply):  # its statistics and histogram setting came with it
                info.iothread = iothread
                self.write_state()
                log.info("node %s moved from %s to %s", node_name, old, iothread)
                complete(reply)
                return
            # The new home refused: put the node back where it was.
            log.error("moving node %s to %s failed: %s", node_name, iothread, reply.message)

            def restored(back: QueryReply | ErrorReply) -> None:
                info.detached = False
                if isinstance(back, ErrorReply):
                    log.error("node %s is lost: it could not be reopened in %s either: %s",
                              node_name, old, back.message)
                    self.nodes.pop(node_name, None)
                    self.write_state()
                complete(reply)

            self._ask(old, lambda rid: self._blockdev_add_message(rid, info), restored)

        def detached(reply: QueryReply | ErrorReply) -> None:
            if isinstance(reply, ErrorReply):
                complete(reply)
                return
            info.detached = True  # no longer in the old home: not lost if that one exits now
            info.stats = reply.counters  # as they were once it was drained: QEMU keeps them across a move
            # (an error at once if the target went away meanwhile)
            self._ask(iothread, lambda rid: self._blockdev_add_message(rid, info), added)

        try:
            self._request(old, lambda rid: BlockdevDel(rid, node_name, moving=True), detached)
        except BaseException:
            info.moving_to = None
            raise
        on_failure(lambda then: self._restore_node(info, old, iothread, then))

    def parents_of(self, node_name: str) -> list[str]:
        """The nodes layered over ``node_name`` (blkdebug nodes whose image it is)."""
        return [n.name for n in self.nodes.values() if _image_of(n.options) == node_name]

    def nodes_of(self, iothread_id: str) -> list[str]:
        """The nodes an iothread holds or is about to: its own, those moving
        to it, those being added to it."""
        names = {n.name for n in self.nodes.values() if iothread_id in (n.iothread, n.moving_to)}
        names.update(name for name, home in self._adding.items() if home == iothread_id)
        return sorted(names)

    def node_stats(self, node_name: str, callback: ReplyCallback) -> None:
        """A node's statistics (QMP's BlockDeviceStats names), from its iothread."""
        info = self.nodes.get(node_name)
        if info is None:
            raise StateError(f"Cannot find device={node_name} nor node-name={node_name}")
        if not info.active:  # its iothread is down: the statistics it last reported
            callback(QueryReply(0, {"size": info.size, "in_flight": 0, **info.stats}))
            return
        self._request(info.iothread, lambda rid: Query(rid, node_name), callback)

    def set_latency_histogram(self, node_name: str, boundaries_ns: tuple[int, ...],
                              callback: ReplyCallback) -> None:
        """Count a node's latencies in these intervals (empty: stop)."""
        info = self.nodes.get(node_name)
        if info is None:
            raise StateError(f"Cannot find device={node_name} nor node-name={node_name}")

        old = info.histogram

        def done(reply: QueryReply | ErrorReply) -> None:
            if isinstance(reply, QueryReply):  # a setting that failed changes nothing
                info.histogram = boundaries_ns
            callback(reply)

        def undo(then: Callable[[], None]) -> None:  # the iothread may have taken the new one
            info.histogram = old
            self._ask(info.iothread, lambda rid: SetLatencyHistogram(rid, node_name, old), lambda _r: then())

        self._request(info.iothread, lambda rid: SetLatencyHistogram(rid, node_name, boundaries_ns), done)
        on_failure(undo)

    def write_state(self) -> None:
        """Publish the cluster's shape for clients: ``RUNTIME_DIR/cluster.json``
        (replaced atomically, by a new file of mode 0600).  A file that cannot
        be written (ENOSPC, EMFILE ...) is logged, rate-limited, and written
        again at each heartbeat until it can: the registry in memory is the
        truth, and a command's answer never depends on its publication."""
        if self._closed:
            return
        path = cluster_state_path(self.runtime_dir)
        try:
            replace_file(path, self.cluster_state().to_json().encode())
        except OSError as exc:
            self._state_stale = True
            self._state_errors.log(exc.errno, logging.ERROR, "cannot write %s (retrying at each heartbeat): %s",
                                   path, exc)
            return
        if self._state_stale:
            self._state_stale = False
            log.info("%s is written again", path)
        if path not in self._socket_files:
            self._socket_files.append(path)

    def _on_heartbeat_timer(self) -> None:
        now = time.monotonic_ns()
        loop_now_ns = self._loop_time_ns()  # a late timer (this process was away) counts the time away out
        self._heartbeat.mod(self._heartbeat.now() + self.heartbeat_interval_ms)  # first: whatever follows
        if self._state_stale:
            self.write_state()
        for t in list(self.iothreads.values()):
            # Not queued behind one it has not taken yet (a stopped iothread):
            # one waiting says all a heartbeat says, and the backlog stays bounded.
            if t.remote and t.state is IOThreadState.RUNNING \
                    and loop_now_ns - t.heard_ns > REMOTE_SILENCE_PERIODS * self.heartbeat_interval_ms * 1_000_000:
                log.error("remote iothread %s (%s) silent for %d ms: taken for gone", t.id, t.host or "?",
                          (loop_now_ns - t.heard_ns) // 1_000_000)
                self._exited(t, EXIT_SILENT)
                continue
            if t.state is IOThreadState.RUNNING and not self.channel.peer_backlog(t.id.encode())[0]:
                self.channel.send(Heartbeat(0, now), t.id.encode())
            for rid, cb in t._pending.expire(loop_now_ns):
                log.error("iothread %s did not answer request %d in %d ms", t.id, rid, self.request_timeout_ms)
                self._call(cb, ErrorReply(rid, "GenericError",
                                          f"iothread {t.id} did not answer in {self.request_timeout_ms} ms"))

    # -- waiting (for synchronous callers: the CLI, tests) ---------------------

    def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Run the main loop until ``condition()`` or the timeout; BQL held."""
        if not bql_locked():
            raise StateError("Cluster.wait_for() requires the BQL")
        expired = False

        def on_deadline() -> None:
            nonlocal expired
            expired = True

        deadline = self.loop.timer_new_ms(ClockType.REALTIME, on_deadline, "wait_for")
        deadline.mod(deadline.now() + int(timeout_s * 1000))  # bounds the polls below
        try:
            while not condition():
                if expired:
                    return False
                self.loop.main_loop_wait(False)
            return True
        finally:
            deadline.delete()

    def all_running(self) -> bool:
        return all(t.state is IOThreadState.RUNNING for t in self.iothreads.values())

    # -- teardown -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StateError("the cluster is shut down")

    def shutdown(self) -> None:
        """Stop every iothread, reap it (killing what does not stop in time),
        close the channel and remove the socket files.  Idempotent; BQL held."""
        if self._closed:
            return
        for t in self.iothreads.values():
            self.stop(t.id)
        done = self.wait_for(
            lambda: all(t.state is IOThreadState.EXITED for t in self.iothreads.values()),
            self.stop_timeout_ms / 1000 + 1,
        )
        if not done:
            for t in self.iothreads.values():
                if t.state is not IOThreadState.EXITED:
                    self._kill(t)
            self.wait_for(lambda: all(t.state is IOThreadState.EXITED for t in self.iothreads.values()), 5)
        self._closed = True
        self._heartbeat.delete()
        for t in self.iothreads.values():
            if t._watch is not None:  # still not reaped: do it now, blocking
                t._watch.destroy()
                try:
                    os.waitpid(t.pid, 0)
                except ChildProcessError:
                    pass
            if t._deadline is not None:
                t._deadline.delete()
            self._close_handoff(t)
        self._bad_input.flush()
        self._state_errors.flush()
        if self.gatekeeper is not None:
            self.gatekeeper.close(self.channel.socket)
        self._source.destroy()  # closes the channel (LINGER 0)
        self.zmq.term()
        for path in self._socket_files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._remove_runtime_dir()

    def _remove_runtime_dir(self) -> None:
        if self._own_runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def cluster_state(self) -> ClusterState:
        """The cluster's shape as clients see it (what ``write_state`` publishes)."""
        return ClusterState(
            self.runtime_dir, self.endpoint,
            tuple(IOThreadEntry(t.id, t.pid, t.state.value, t.data_endpoint, t.curve_key, t.host)
                  for t in self.iothreads.values()),
            {n.name: NodeEntry(n.iothread, n.driver, n.size) for n in self.nodes.values()},
            self.connection_owner.published_exports() if self.connection_owner is not None else {})

    def describe(self) -> dict[str, Any]:
        """The machine-readable summary printed in the launcher's ready line:
        the state file's content."""
        return self.cluster_state().as_dict()
