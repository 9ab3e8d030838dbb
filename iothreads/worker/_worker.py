"""The iothread process: ``python -m iothreads.worker --id io0 --connect ENDPOINT``.

Theory of operation
-------------------
A process of its own (so it runs in parallel with the main loop, past the
GIL), running one AioContext the way QEMU's ``iothread_run`` does::

    while running:
        ctx.poll(blocking=True)

Its ZeroMQ context is created here, after the process started: nothing of
ZeroMQ is ever inherited.  A DEALER socket, with the iothread's id as its
identity, connects to the main loop's ROUTER; the channel is an fd handler of
the context.  The first message is ``Hello`` (id, pid, protocol version,
capabilities); the main loop answers ``Welcome`` with the heartbeat period.

Control messages: ``SetPollParams`` applies poll-max-ns / poll-grow /
poll-shrink / aio-max-batch at once; ``Query`` is answered with the
context's counters; ``Stop`` schedules a oneshot bottom half that clears
``running`` (as QEMU stops an iothread), after which the loop ends and the
process exits 0.  A ``Heartbeat`` is answered with a ``NodeStats`` for each
node whose statistics changed since they were last sent (a few at a time):
the main loop's copy, which a restart of this iothread reopens its nodes
with.  A node's ``BlockdevAdd`` may carry the statistics and the latency
histogram it starts from (moved here, or reopened after a restart); the
answer to a ``BlockdevDel`` of a node moving away carries them.

NBD connections
---------------
With ``--handoff-fd N`` (the main loop passes its end of a handoff socket
pair as fd 3), the main loop hands over NBD connections past their
handshake: an ``NbdConnection`` with the socket (``protocol``'s
``receive_connection``, from an fd handler).  Each is served by this
context (``iothreads.nbd``): adopted if its node is here and the descriptors
left allow it (as data-plane clients, connections leave ``FD_RESERVE`` free;
at most ``MAX_CONNECTIONS``), else closed at once.  Every connection that
closes is reported with an ``NBD_CONNECTION_CLOSED`` event
(``{"connection": id, "export": id}``): the main loop counts an export's
connections from the handoffs minus these.  ``NbdCloseExport`` closes an
export's connections (their requests in flight complete first) and is
answered ``{"closed": n}``.  A ``BlockdevDel`` of a node moving away hands
its connections back, quiesced (requests in flight completed and answered;
``pending``: the part of a request read and not handled), over the same
socket before it is answered; one of a node deleted closes them first.  A
connection handed over for a node that is moving away goes straight back.

Liveness: a process, not a silence
----------------------------------
Block I/O never passes through the main loop, so a main loop that is slow,
busy or stopped (Ctrl-Z, SIGSTOP, a frozen cgroup) is no reason for an
iothread to drop its block nodes: QEMU's iothreads do not die because the
main loop is slow.  The rule:

* A *local* iothread, started by its main loop (``--parent-pid``: the main
  loop is its parent; the launcher's iothreads all are, over ipc:// or
  tcp://), stops when its main loop's *process* is gone, and only then:
  through the parent's pidfd, an fd handler of its AioContext (readable once
  the process has exited), and the parent-death signal (the kernel sends
  SIGTERM, ``PR_SET_PDEATHSIG``).  No timer ends it: not the main loop's
  silence, however long, nor a missing ``Welcome`` (the main loop kills an
  iothread whose handshake it did not get in time).  It sends no heartbeats.
* An iothread with no main-loop process to watch (no ``--parent-pid``: a
  remote one, reached over tcp://) has only the main loop's silence to go by:
  it sends a heartbeat every period the ``Welcome`` gave, and when nothing
  came for ``3 x`` that period it *detaches*: its nodes are quiesced (their
  NBD connections closed, requests in flight completed, each node flushed
  and closed: no I/O reaches them), and it says ``Hello`` again, of a new
  session (queued on the control socket, which ZeroMQ reconnects by itself,
  and sent again on each new connection); once the main loop answers, it has
  joined again and the main loop reopens its nodes there.  With ``rejoin=False``
  (``--no-rejoin``: for a supervisor that restarts it) it stops instead
  (exit 3).  It stops (exit 3) too when the first ``Welcome`` did not come
  within the handshake timeout.  Time this process itself was stopped is
  not counted as the main loop's silence.

Whoever started it, it starts with an empty signal mask (``main`` clears the
one it inherited: a main loop blocks SIGINT and SIGTERM for its signalfd,
and a mask survives fork and exec).  SIGTERM and SIGINT stop it cleanly: no
new requests, those in flight complete.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import errno
import functools
import logging
import os
import signal
import socket
import sys
import time
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import zmq
from zmq.utils.monitor import parse_monitor_message

from protocol import (
    BlockOp,
    DATA_RCVHWM,
    DATA_SNDHWM,
    BadRequestError,
    BlockCompletion,
    BlockRequest,
    BlockdevAdd,
    BlockdevDel,
    Channel,
    ErrorReply,
    Event,
    FdBudget,
    Heartbeat,
    Hello,
    IOTHREAD_LEFT,
    InFlight,
    PEER_REFUSED,
    LocalProtocolError,
    Message,
    NbdCloseExport,
    NBD_CONNECTION_CLOSED,
    NBD_CONNECTION_OPENED,
    NbdConnection,
    NbdExport,
    NbdNegotiated,
    NbdOffer,
    NodeStats,
    PROTOCOL_VERSION,
    Query,
    Resume,
    QueryReply,
    RemoteProtocolError,
    SetLatencyHistogram,
    SetPollParams,
    Stop,
    ThrottledLog,
    Welcome,
    bind_owner_only,
    bound_heap_retention,
    channel_socket,
    has_input,
    raise_fd_limit,
    receive_connection,
    request_bytes,
    send_connection,
)
from protocol.channel import (
    HANDSHAKE_FAILURES,
    KeyPair,
    Refusal,
    ZapHandler,
    ZapPolicy,
    curve_client,
    curve_server,
    load_key_pair,
    load_public_key,
)
from protocol.schema import IothreadProperties, SchemaError, blockdev_from_wire, members

from ..aio._context import AioContext
from ..block._node import BlockNode, Buffer
from ..block._open import open_node
from ..nbd._server import MAX_CONNECTIONS as MAX_NBD_CONNECTIONS
from ..nbd._listener import NbdListener, parse_listen_address
from ..nbd._server import HandedBack, NbdServer
from ..aio._channel_handler import ChannelHandler
from ..aio._clock import ClockType
from ..aio._notifier import EventNotifier
from ..aio._polling import never_ready
from ._listener import BACKLOG as LISTEN_BACKLOG
from ._listener import MAX_CLIENTS, DataListener

__all__ = ["IOThreadWorker", "die_with_parent", "main", "set_parent_death_signal"]

log = logging.getLogger("iothreads.worker")

CAPABILITIES = ("poll-params", "query", "heartbeat", "node-stats")
NODE_STATS_PER_HEARTBEAT = 16
"""Nodes whose statistics go with one heartbeat's answer at the most (a
``NodeStats`` each, those sent longest ago first): what it costs stays bounded."""
_MAX_MESSAGE_CHARS = 1024  # an error message in a completion
MAX_NODES = 1024  # block nodes in one iothread
HANDOFFS_PER_WAKEUP = 64  # connections taken from the handoff socket at one go (it says again if more wait)
SHUTDOWN_DRAIN_MS = 5_000  # the longest an orderly exit waits for requests in flight
LEAVE_LINGER_MS = 1_000  # the longest a remote iothread's exit waits for its last word to leave
EXIT_OK, EXIT_ERROR, EXIT_ORPHANED = 0, 1, 3
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal() -> None:
    """Ask the kernel for SIGTERM when this process's parent dies (Linux's
    PR_SET_PDEATHSIG; safe between fork and exec).  Where it is not to be had,
    nothing happens: callers keep their own deadline."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM when this process's parent, ``parent_pid``, dies; exit at once
    (status 3) if it already has.  For a process started by ``posix_spawn``,
    which runs nothing of its parent's between fork and exec: the child asks
    for its parent-death signal itself, first thing, and then checks that the
    parent did not die before it asked."""
    set_parent_death_signal()
    if os.getppid() != parent_pid:
        sys.exit(EXIT_ORPHANED)


class IOThreadWorker:
    """The loop of one iothread process.  Everything runs in its main thread."""

    def __init__(self, iothread_id: str, endpoint: str, *, poll_max_ns: int = 32768,
                 poll_grow: int = 0, poll_shrink: int = 0, aio_max_batch: int = 0,
                 handshake_timeout_ms: int = 10_000, data_endpoint: str | None = None,
                 handoff_fd: int | None = None, keys: KeyPair | None = None, server_key: bytes = b"",
                 host: str = "", nbd_listen: tuple[str, int] | None = None, rejoin: bool = True) -> None:
        self.id = iothread_id
        self.pid = os.getpid()
        self.ctx = AioContext(name=iothread_id)
        self.ctx.set_poll_params(poll_max_ns, poll_grow, poll_shrink)
        self.ctx.set_aio_params(aio_max_batch)
        self.running = True
        self.shutting_down = False  # no new requests: those in flight are completing
        self.exit_code = EXIT_OK
        self.heartbeat_interval_ms = 0
        self.last_heard_ns = time.monotonic_ns()
        self.welcomed = False
        self.rejoin = rejoin
        self.detached = False  # a remote one that lost its main loop, waiting to join again
        self._bad_input = ThrottledLog(log)  # what peers send wrong: a few lines each, then counts
        # The control messages, by type: one lookup instead of a chain of isinstance tests.
        self._handlers: dict[type[Message], Callable[[bytes, Any], None]] = {
            Welcome: self._on_welcome, Heartbeat: self._on_heartbeat, Query: self._on_query,
            SetLatencyHistogram: self._on_set_latency_histogram, SetPollParams: self._on_set_poll_params,
            Stop: self._on_stop, Resume: self._on_resume, BlockRequest: self._on_control_block_request,
            BlockdevAdd: self._on_blockdev_add, BlockdevDel: self._on_blockdev_del,
            NbdCloseExport: self._on_nbd_close_export, NbdOffer: self._on_nbd_offer,
        }
        self.zmq = zmq.Context()
        # CURVE on tcp://: the ZAP handler first (its data socket lets in the
        # keys the Welcome gives, none before), a client of the main loop's key.
        self.keys = keys
        self._refusals = ThrottledLog(log)
        self.zap: ZapHandler | None = None
        self.zap_handler: ChannelHandler | None = None
        if keys is not None:
            self.zap = ZapHandler(self.zmq, ZapPolicy(), self._on_refused)
            self.zap_handler = ChannelHandler(self.ctx, self.zap, "zap")
        sock = channel_socket(self.zmq, zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, iothread_id.encode())
        self._control_monitor: zmq.Socket[Any] | None = None
        self._key_accepted = False  # a CURVE handshake with the main loop succeeded
        if keys is not None:
            curve_client(sock, keys, server_key)
            # Told at once when the main loop refuses this key, or this is not its server key.
            self._control_monitor = sock.get_monitor_socket(
                HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
            monitor = self._control_monitor
            # With an io_poll: without one, busy polling would be off in every remote iothread.
            self.ctx.set_fd_handler(cast(int, monitor.getsockopt(zmq.FD)), io_read=self._on_control_monitor,
                                    io_poll=lambda: has_input(monitor))
            self._on_control_monitor()  # its fd is signalled only once a read has found the queue empty
        sock.connect(endpoint)
        self.channel = Channel(sock, self._on_message, on_error=self._on_bad_message)
        self.handler = ChannelHandler(self.ctx, self.channel, "control")
        self.nodes: dict[str, BlockNode] = {}
        self.moved: set[str] = set()  # nodes handed over to another iothread
        # Each node's statistics as last sent to the main loop (their mark) and the heartbeat they went with.
        self._stats_sent: dict[str, tuple[tuple[object, ...], int]] = {}
        self._heartbeats_heard = 0
        self.deleting: set[BlockNode] = set()  # blockdev-del'd, draining
        self.data_endpoint = data_endpoint
        self.data: Channel | None = None
        self.data_handler: ChannelHandler | None = None
        self.in_flight = InFlight()  # the data-plane clients' requests, within their credit
        if data_endpoint is not None:
            # Few batches queued to or read ahead from one client: what a client
            # that never reads costs this process stays bounded (see InFlight).
            dsock = channel_socket(self.zmq, zmq.ROUTER, sndhwm=DATA_SNDHWM, rcvhwm=DATA_RCVHWM)
            dsock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)  # what libzmq may accept past a pause (DataListener)
            if keys is not None:
                curve_server(dsock, keys, "data")
            bind_owner_only(dsock, data_endpoint)  # an ipc socket file: the user's alone, whatever the umask
            self.data = Channel(dsock, self._on_data, on_error=self._on_bad_data)
            self.data_handler = ChannelHandler(self.ctx, self.data, "data")
        self.main_loop_pid = 0  # the main loop's process, once watched (watch_main_loop)
        self._main_loop_pidfd = -1
        self.nbd = NbdServer(self.ctx, self._on_nbd_closed)
        self.handoff: socket.socket | None = None
        # Connections on their way back to the main loop (and, between them,
        # what to do once those before have gone: answer a BlockdevDel).
        self._handoffs_out: collections.deque[tuple[socket.socket, NbdConnection] | Callable[[], object]] = \
            collections.deque()
        self._handoff_blocked = False
        if handoff_fd is not None:
            self.handoff = socket.socket(fileno=handoff_fd)
            self.handoff.setblocking(False)
            self.handoff.set_inheritable(False)
            self._watch_handoff()
        self._heartbeat_seq = 0
        self._watchdog_due_ns = 0
        self._watchdog = self.ctx.timer_new_ms(ClockType.REALTIME, self._on_watchdog, "watchdog")
        self._watchdog.mod(self._watchdog.now() + handshake_timeout_ms)
        bound = ""
        self.fds = FdBudget()
        self.listener: DataListener | None = None
        if self.data is not None:
            bound = self.data.socket.getsockopt_string(zmq.LAST_ENDPOINT)
            # Listening only while clients can be afforded (libzmq accepts them on its own).
            self.listener = DataListener(self.ctx, self.data.socket, bound, on_limit=self._on_listener_limit,
                                         on_refused=self._on_refused if keys is not None else None)
        curve_key = keys.public.decode() if keys is not None and bound else ""
        # A remote iothread's own NBD listener, for the exports the main loop offers it.
        self.offers: dict[str, NbdOffer] = {}  # by export name
        self._nbd_ids = itertools.count(1)
        self.nbd_listener: NbdListener | None = None
        if nbd_listen is not None:
            self.nbd_listener = NbdListener(self.ctx, nbd_listen, _OfferTable(self), self._on_nbd_negotiated)
        self._hello = Hello(iothread_id, os.getpid(), PROTOCOL_VERSION, CAPABILITIES, bound, curve_key, host,
                            self.nbd_listener.address if self.nbd_listener is not None else "")
        self.channel.send(self._hello)

    # -- messages ---------------------------------------------------------

    def _on_message(self, identity: bytes, msg: Message) -> None:
        self.last_heard_ns = time.monotonic_ns()
        handler = self._handlers.get(type(msg))
        if handler is None:
            log.warning("unexpected %s from the main loop", type(msg).KIND)
            return
        try:
            handler(identity, msg)
        except LocalProtocolError as exc:
            # Its answer cannot travel (too large for the main loop's limits):
            # an error instead, so that the requester is not left waiting.
            log.error("cannot answer %s: %s", type(msg).KIND, exc)
            request_id = getattr(msg, "request_id", None)
            if request_id is not None:
                self.channel.send(ErrorReply(request_id, "GenericError", _bounded(f"the answer cannot be sent: {exc}")))

    def _on_control_monitor(self) -> None:
        """The control connection's failed handshakes: before the Welcome,
        a reason to give up at once, said plainly."""
        monitor = self._control_monitor
        while monitor is not None and has_input(monitor):
            event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._key_accepted = True
                if self.detached:  # a new connection: the Hello again (one queued on a dead one is lost)
                    self.channel.send(self._hello)
                continue
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                problem = f"the main loop refused this iothread's key (not among its authorised keys; ZAP {event['value']})"
            elif event["event"] & HANDSHAKE_FAILURES:
                problem = "the CURVE handshake with the main loop failed (is --server-key the main loop's public key?)"
            else:
                continue
            if self._bad_input.log(("control-handshake", event["event"]), logging.ERROR, "%s", problem) \
                    and not self.welcomed and not self.shutting_down:
                self.shutdown(EXIT_ERROR)

    def _on_refused(self, refusal: Refusal) -> None:
        """A client kept out of the data socket: said (a few lines per kind), and told to the main loop."""
        if self._refusals.log((refusal.address, refusal.key, refusal.reason), logging.WARNING,
                              "data channel refused a peer%s%s: %s",
                              f" from {refusal.address}" if refusal.address else "",
                              f" with key {refusal.key}" if refusal.key else "", refusal.reason):
            self.channel.send(Event(PEER_REFUSED, dict(refusal.as_event())))

    def _on_listener_limit(self, problem: str) -> None:
        self.channel.send(Event("RESOURCE_LIMIT_REACHED", {
            "resource": "data-connections", "limit": MAX_CLIENTS, "reason": problem}))

    def _on_heartbeat(self, identity: bytes, msg: Heartbeat) -> None:
        if self.listener is not None:
            self.listener.check()  # descriptors freed since (a node closed) may let it listen again
        # Being heard is what it says; the answer: the statistics that changed.
        self._send_node_stats()

    def _send_node_stats(self) -> None:
        """A ``NodeStats`` for each node whose statistics changed since they
        were last sent (``NODE_STATS_PER_HEARTBEAT`` at the most, those sent
        longest ago first): the main loop's copy, which the node starts from
        again if this process dies and is restarted.  What changed is told by
        a mark of a few counters read here, at the heartbeat's pace: nothing
        is added to the requests' path."""
        self._heartbeats_heard += 1
        changed: list[tuple[int, str, tuple[object, ...]]] = []
        for name, node in self.nodes.items():
            if name in self.moved:
                continue  # going away: its statistics go with the move's answer
            mark = _stats_mark(node)
            sent = self._stats_sent.get(name)
            if sent is None or sent[0] != mark:
                changed.append((sent[1] if sent is not None else 0, name, mark))
        changed.sort(key=lambda c: c[0])
        for _, name, mark in changed[:NODE_STATS_PER_HEARTBEAT]:
            try:
                self.channel.send(NodeStats(name, node_statistics(self.nodes[name])))
            except LocalProtocolError as exc:  # a histogram of too many boundaries (QMP allows 32)
                self._bad_input.log(("node-stats", name), logging.ERROR,
                                    "the statistics of node %s cannot be sent: %s", name, exc)
            self._stats_sent[name] = (mark, self._heartbeats_heard)

    def _on_query(self, identity: bytes, msg: Query) -> None:
        if not msg.node:
            self.channel.send(QueryReply(msg.request_id, self.counters()))
        elif msg.node in self.nodes and msg.node not in self.moved:
            node = self.nodes[msg.node]
            self.channel.send(QueryReply(msg.request_id, {"size": node.size, "in_flight": node.in_flight,
                                                          **node_statistics(node)}))
        else:
            self.channel.send(ErrorReply(msg.request_id, "GenericError",
                                         f"Cannot find device={msg.node} nor node-name={msg.node}"))

    def _on_set_latency_histogram(self, identity: bytes, msg: SetLatencyHistogram) -> None:
        node = self.nodes.get(msg.node_name)
        if node is None or _histogram_problem(msg.boundaries_ns):
            self.channel.send(ErrorReply(msg.request_id, "GenericError", "unknown node or unsorted boundaries"))
            return
        for st in node.stats.values():
            st.set_histogram(msg.boundaries_ns)
        self.channel.send(QueryReply(msg.request_id, {}))

    def _on_stop(self, identity: bytes, msg: Stop) -> None:
        if not self.welcomed and not self.detached:  # its Hello was refused (a remote one that cannot join)
            log.error("the main loop refused this iothread: %s", msg.reason)
            self.shutdown(EXIT_ERROR)
            return
        self.shutdown(EXIT_OK)

    def _on_control_block_request(self, identity: bytes, msg: BlockRequest) -> None:
        self._submit(self.channel, identity, msg)

    def _on_bad_message(self, identity: bytes, exc: RemoteProtocolError) -> None:
        self._bad_input.log(("control", type(exc)), logging.ERROR,
                            "bad message from the main loop: %s", exc)
        self._answer_refused(self.channel, identity, exc)

    def _answer_refused(self, channel: Channel, identity: bytes, exc: RemoteProtocolError) -> None:
        """A refused request whose id could be read is answered with EINVAL:
        its sender must not wait for ever (as QEMU fails a malformed request)."""
        if not isinstance(exc, BadRequestError):
            return
        if exc.kind == BlockRequest.KIND:
            channel.send(_completion(exc.request_id, -errno.EINVAL, str(exc)),
                         identity if channel.router else None)
        elif channel is self.channel and exc.kind in {
                cls.KIND for cls in self._handlers if "request_id" in cls.__dataclass_fields__}:
            channel.send(ErrorReply(exc.request_id, "GenericError", _bounded(str(exc)), errno.EINVAL))

    # -- the data plane ------------------------------------------------------

    def _on_data(self, identity: bytes, msg: Message) -> None:
        if isinstance(msg, BlockRequest):
            assert self.data is not None
            self._submit(self.data, identity, msg)
        else:
            self._bad_input.log(("data", identity, "unexpected"), logging.WARNING,
                                "%s on the data channel ignored", type(msg).KIND)

    def _on_bad_data(self, identity: bytes, exc: RemoteProtocolError) -> None:
        self._bad_input.log(("data", identity, type(exc)), logging.WARNING,
                            "bad request from client %r: %s%s", identity, exc,
                            " (answered EINVAL)" if isinstance(exc, BadRequestError) else "")
        assert self.data is not None
        self._answer_refused(self.data, identity, exc)

    def _submit(self, channel: Channel, identity: bytes, msg: BlockRequest) -> None:
        """Run a block request; its completion goes back to whoever sent it."""
        node = self.nodes.get(msg.node)
        to = identity if channel.router else None
        if self.shutting_down:
            channel.send(_completion(msg.request_id, -errno.ESHUTDOWN, f"iothread {self.id} is shutting down"), to)
            return
        if node is None or msg.node in self.moved:
            # Every request gets its completion, with an errno if need be.
            if msg.node in self.moved:
                reply = _completion(msg.request_id, -errno.ESTALE, f"node {msg.node!r} moved to another iothread")
            else:
                reply = _completion(msg.request_id, -errno.ENODEV, f"no block node named {msg.node!r}")
            channel.send(reply, to)
            return
        request_id = msg.request_id
        client = b""
        nbytes = 0
        if channel is self.data:
            # Within the client's credit, or refused at once (see protocol's InFlight).
            client, nbytes = identity, request_bytes(msg.op, msg.length, msg.data)
            backlog = channel.peer_backlog(client)
            problem = self.in_flight.admit(client, nbytes, backlog)
            if problem is not None:
                self._bad_input.log(("data", identity, "credit"), logging.WARNING,
                                    "request from client %r refused: %s", identity, problem)
                if backlog[0] < 2 * self.in_flight.credit.max_requests:
                    channel.send(_completion(request_id, -errno.EAGAIN, problem), to)
                # else: a client that reads nothing gets no more refusals either
                return

        def done(status: int, message: str, data: Buffer) -> None:
            if client:
                self.in_flight.release(client, nbytes)
            if not channel.closed:  # a client gone meanwhile: ROUTER drops it
                # Deferred: completions that finish together leave in one batch.
                channel.send(_completion(request_id, status, message, data), to, defer=True)

        node.submit(msg.op, msg.offset, msg.length, msg.data, done)

    def _on_blockdev_add(self, identity: bytes, msg: BlockdevAdd) -> None:
        """Open the node the message's options describe, checked again by the
        schema (a peer's input, and the one place that says what a driver takes)."""
        try:
            if msg.node_name in self.nodes:
                raise ValueError(f"duplicate node name '{msg.node_name}'")
            if len(self.nodes) >= MAX_NODES:
                raise OSError(errno.EMFILE, f"iothread {self.id} holds {MAX_NODES} block nodes, the most it takes")
            problem = self.fds.problem(f"block node '{msg.node_name}'", own=True)  # a file node's descriptor
            if problem:
                raise OSError(errno.EMFILE, problem)
            problem = _histogram_problem(msg.boundaries_ns)
            if problem:
                raise ValueError(problem)
            node = open_node(self.ctx, blockdev_from_wire(msg.node_name, msg.driver, msg.options), self.nodes)
        except SchemaError as exc:
            self.channel.send(ErrorReply(msg.request_id, exc.error_class, _bounded(exc.desc)))
            return
        except (ValueError, OSError) as exc:
            # An OSError of this process's own making says its words alone, not "[Errno N] ...".
            text = exc.strerror if isinstance(exc, OSError) and exc.filename is None and exc.strerror else str(exc)
            self.channel.send(ErrorReply(msg.request_id, "GenericError", _bounded(text),
                                         getattr(exc, "errno", 0) or 0))
            return
        restore_statistics(node, msg.stats, msg.boundaries_ns)  # moved, or reopened after a restart
        node.error_listener = functools.partial(self._on_io_error, msg.node_name)
        self.nodes[msg.node_name] = node
        self.moved.discard(msg.node_name)  # it may come back
        self.channel.send(QueryReply(msg.request_id, {"size": node.size}))

    def _on_io_error(self, node_name: str, op: str, err: int, message: str, action: str) -> None:
        """A request failed with an I/O error (not a refusal: invalid, read-only,
        moved, no node): the main loop must know, and handle it under its BQL,
        as QEMU's BLOCK_IO_ERROR event (``operation``: read, or write for any
        other request; ``errno`` and ``request`` are this project's)."""
        self.channel.send(Event("BLOCK_IO_ERROR", {
            "device": "", "node-name": node_name, "operation": "read" if op == BlockOp.READ else "write",
            "request": op, "action": action, "errno": err, "nospace": err == errno.ENOSPC, "reason": message,
        }))

    def _on_resume(self, identity: bytes, msg: Resume) -> None:
        resumed = sum(node.resume() for name, node in self.nodes.items() if name not in self.moved)
        self.channel.send(QueryReply(msg.request_id, {"resumed": resumed}))

    def _on_blockdev_del(self, identity: bytes, msg: BlockdevDel) -> None:
        node = self.nodes.get(msg.node_name)
        if node is None:
            self.channel.send(ErrorReply(msg.request_id, "GenericError",
                                         f"Failed to find node with node-name='{msg.node_name}'"))
            return
        if node.parents:  # (the main loop refuses first: this is its peer's word)
            self.channel.send(ErrorReply(msg.request_id, "GenericError",
                                         f"Block device {msg.node_name} is in use"))
            return

        # From now on, new requests for it are answered at once ("ask
        # elsewhere" for a move, "no such node" otherwise): as QEMU's drain
        # holds new requests off, so that a node under constant load drains.
        if msg.moving:
            self.moved.add(msg.node_name)
        else:
            del self.nodes[msg.node_name]
        self.deleting.add(node)  # still drained (and closed) by an orderly exit
        log.debug("node %s: draining %d request(s) in flight (%s)", msg.node_name, node.in_flight,
                  "moving away" if msg.moving else "blockdev-del")

        def drained() -> None:
            log.debug("node %s: drained and closed", msg.node_name)
            self.deleting.discard(node)
            node.close()
            if self.nodes.get(msg.node_name) is node:
                del self.nodes[msg.node_name]
            if msg.node_name not in self.nodes:
                self._stats_sent.pop(msg.node_name, None)
            # A node moving away takes its statistics to its new home (QEMU keeps them),
            # if they can travel (a histogram of too many boundaries cannot: QMP allows 32).
            try:
                self.channel.send(QueryReply(msg.request_id, node_statistics(node) if msg.moving else {}))
            except LocalProtocolError:
                self.channel.send(QueryReply(msg.request_id, {}))

        # Its NBD connections first: handed back to the main loop (to follow
        # the node) once quiesced, or closed; the answer comes after them.
        if msg.moving:
            self.nbd.hand_back(msg.node_name, lambda handed: self._hand_back(handed, lambda: node.drain(drained)))
        else:
            self.nbd.close_node(msg.node_name, lambda closed: node.drain(drained))

    # -- NBD connections -----------------------------------------------------

    def _watch_handoff(self) -> None:
        assert self.handoff is not None
        # With an io_poll that never finds it (the fd does, at the next real poll):
        # a handler without one would turn busy polling off for the whole context.
        self.ctx.set_fd_handler(self.handoff.fileno(), self._on_handoff,
                                self._send_handoffs if self._handoff_blocked else None, io_poll=never_ready)

    def _on_handoff(self, limit: int = HANDOFFS_PER_WAKEUP) -> None:
        """Take the connections the main loop handed over (``limit`` at the most)."""
        if self.handoff is None:
            return
        for _ in range(limit):
            try:
                received = receive_connection(self.handoff)
            except RemoteProtocolError as exc:
                self._bad_input.log(("handoff", type(exc)), logging.ERROR, "bad handoff from the main loop: %s", exc)
                continue
            except EOFError:
                log.debug("the main loop closed the handoff socket")
                self.ctx.set_fd_handler(self.handoff.fileno())
                return
            except OSError as exc:
                self._bad_input.log(("handoff", "error"), logging.ERROR, "reading the handoff socket: %s", exc)
                return
            if received is None:
                return
            self._adopt(*received)

    def _adopt(self, fd: int, conn: NbdConnection) -> None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            self._bad_input.log(("handoff", "socket"), logging.ERROR, "NBD connection %d: not a socket: %s",
                                conn.connection_id, exc)
            self._on_nbd_closed(conn)
            return
        if conn.node_name in self.moved:  # on its way elsewhere: the connection follows it
            self._hand_back([(sock, conn)])
            return
        node = self.nodes.get(conn.node_name)
        limited = False
        if self.shutting_down:
            problem: str | None = f"iothread {self.id} is shutting down"
        elif node is None:
            problem = f"no block node named '{conn.node_name}'"
        elif len(self.nbd.clients) >= MAX_NBD_CONNECTIONS:
            problem, limited = f"{MAX_NBD_CONNECTIONS} NBD connections are served, the most it takes", True
        else:
            problem = self.fds.problem("NBD connections", 0)  # (its descriptor is open already)
            limited = problem is not None
        if problem is not None or node is None:
            log.error("NBD connection %d to export %s refused: %s", conn.connection_id, conn.export_id, problem)
            sock.close()
            self._on_nbd_closed(conn)
            if limited:
                self.channel.send(Event("RESOURCE_LIMIT_REACHED", {
                    "resource": "nbd-connections", "limit": MAX_NBD_CONNECTIONS, "reason": problem}))
            return
        self.nbd.adopt(sock, conn, node)

    def _on_nbd_closed(self, conn: NbdConnection) -> None:
        self.channel.send(Event(NBD_CONNECTION_CLOSED, {"connection": conn.connection_id,
                                                          "export": conn.export_id}))

    def _on_nbd_offer(self, identity: bytes, msg: NbdOffer) -> None:
        if msg.withdraw:
            if self.offers.get(msg.name, msg).export_id == msg.export_id:
                self.offers.pop(msg.name, None)
        else:
            self.offers[msg.name] = msg

    def _on_nbd_negotiated(self, sock: socket.socket, negotiated: NbdNegotiated, pending: bytes) -> None:
        """A client of this iothread's own listener past its handshake: served
        as a connection the main loop handed over, which is told of it."""
        offer = self.offers.get(negotiated.export.name)
        if offer is None or offer.node_name not in self.nodes or self.shutting_down:
            sock.close()  # withdrawn, or its node left, meanwhile
            return
        conn = NbdConnection(next(self._nbd_ids), offer.export_id, offer.node_name, negotiated.transmission_flags,
                             negotiated.structured_replies,
                             {c.name: c.context_id for c in negotiated.meta_contexts}, pending)
        self.channel.send(Event(NBD_CONNECTION_OPENED, {"connection": conn.connection_id,
                                                        "export": conn.export_id}))
        self._adopt(sock.detach(), conn)

    def _on_nbd_close_export(self, identity: bytes, msg: NbdCloseExport) -> None:
        # The main loop handed over every connection of the export before it
        # asked this: they wait in the handoff socket (no order holds between
        # it and this channel), and are taken first, to be closed with the rest.
        self._on_handoff(limit=1 << 30)
        self.nbd.close_export(msg.export_id, lambda closed: self.channel.send(
            QueryReply(msg.request_id, {"closed": closed})))

    def _hand_back(self, handed: HandedBack, then: Callable[[], object] | None = None) -> None:
        """Send connections back to the main loop, in order; ``then()`` once they have gone."""
        self._handoffs_out.extend(handed)
        if then is not None:
            self._handoffs_out.append(then)
        if not self._handoff_blocked:
            self._send_handoffs()

    def _send_handoffs(self) -> None:
        out = self._handoffs_out
        while out:
            entry = out[0]
            if callable(entry):
                out.popleft()
                entry()
                continue
            sock, conn = entry
            try:
                if self.handoff is None:  # (a remote iothread: its connections cannot follow a node across hosts)
                    raise BrokenPipeError(errno.EPIPE, "no handoff socket to the main loop (a remote iothread)")
                send_connection(self.handoff, sock.fileno(), conn)
            except BlockingIOError:
                if not self._handoff_blocked:
                    self._handoff_blocked = True
                    self._watch_handoff()
                return
            except OSError as exc:  # the main loop is gone: the connection ends here
                log.error("NBD connection %d cannot be handed back: %s", conn.connection_id, exc)
                self._on_nbd_closed(conn)
            out.popleft()
            sock.close()
        if self._handoff_blocked:
            self._handoff_blocked = False
            self._watch_handoff()

    def _on_welcome(self, identity: bytes, msg: Welcome) -> None:
        if msg.version != PROTOCOL_VERSION:
            log.error("main loop speaks protocol %d, we speak %d",
                      msg.version, PROTOCOL_VERSION)
            self.stop(EXIT_ERROR)
            return
        if self.detached:
            log.warning("joined the main loop again")
            self.detached = False
        self.welcomed = True
        self.heartbeat_interval_ms = max(msg.heartbeat_interval_ms, 0)
        if self.zap is not None:
            self.zap.policy.set_authorized(k.encode() for k in msg.authorized_keys)
        self._arm_watchdog()

    def _on_set_poll_params(self, identity: bytes, msg: SetPollParams) -> None:
        try:
            self.ctx.set_poll_params(msg.poll_max_ns, msg.poll_grow, msg.poll_shrink)
            self.ctx.set_aio_params(msg.aio_max_batch)
        except ValueError as exc:
            self.channel.send(ErrorReply(msg.request_id, "GenericError", str(exc)))
            return
        self.channel.send(QueryReply(msg.request_id, self.counters()))

    def counters(self) -> dict[str, int]:
        ctx = self.ctx
        pool = ctx._thread_pool
        c = ctx.counters()
        del c["notifies"], c["handlers"]
        c["pid"] = self.pid
        c["thread_pool_threads"] = pool.threads if pool is not None else 0
        c["poll_max_ns"] = ctx.poll_max_ns
        c["poll_grow"] = ctx.poll_grow
        c["poll_shrink"] = ctx.poll_shrink
        c["aio_max_batch"] = ctx.aio_max_batch
        c["data_bytes_in_flight"] = self.in_flight.total_bytes
        c["data_refused"] = self.in_flight.refused  # requests past a client's credit or the total
        c["nbd_connections"] = len(self.nbd.clients)
        c["nbd_bytes_in_flight"] = self.nbd.credit.in_flight.total_bytes  # read or written by requests started
        c["nbd_reply_backlog_bytes"] = sum(client.backlog_bytes for client in self.nbd.clients.values())
        return c

    # -- liveness -----------------------------------------------------------

    def watch_main_loop(self, pid: int) -> bool:
        """Stop when process ``pid``, this iothread's main loop and parent, is
        gone (its pidfd, an fd handler of the context), and never because
        the main loop is silent: no watchdog from now on (see the module's
        docstring).  False if ``pid`` is not this process's parent (any more)."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        if os.getppid() != pid:  # it died before the pidfd was had: the pid may be another's now
            os.close(pidfd)
            return False
        self.main_loop_pid, self._main_loop_pidfd = pid, pidfd
        self._watchdog.delete()
        # With an io_poll that never finds it (the fd does, at the next real
        # poll): a handler without one would turn busy polling off.
        self.ctx.set_fd_handler(pidfd, self._on_main_loop_exit, io_poll=never_ready)
        return True

    def _on_main_loop_exit(self) -> None:
        self.ctx.set_fd_handler(self._main_loop_pidfd)  # readable for good: once is enough
        self._lost_main_loop()

    def main_loop_gone(self) -> bool:
        """Whether the watched main loop's process is gone or going (this
        process has another parent now, or the parent's main thread, the
        main loop's, has exited); if so, stop (exit 3).  What tells the
        parent-death signal, a SIGTERM like any other, from the others.  It
        comes when the parent's *thread* exits: a process killed may lose its
        main thread before the others, its children then going to one of
        those, whose process id is the same."""
        pid = self.main_loop_pid
        if not pid or (os.getppid() == pid and not _exited(pid)):
            return False
        self._lost_main_loop()
        return True

    def _lost_main_loop(self) -> None:
        if not self.shutting_down:
            log.warning("main loop (pid %d) is gone: stopping", self.main_loop_pid)
            self.shutdown(EXIT_ORPHANED)

    def _arm_watchdog(self) -> None:
        if self.heartbeat_interval_ms and not self.main_loop_pid:
            self._watchdog_due_ns = time.monotonic_ns() + self.heartbeat_interval_ms * 1_000_000
            self._watchdog.mod(self._watchdog.now() + self.heartbeat_interval_ms)

    def _on_watchdog(self) -> None:
        if self.detached:
            return  # waiting for the Welcome, however long: the main loop's restart, the link's repair
        if not self.welcomed:
            if self._key_accepted:  # (its ROUTER drops the Hello of a second peer with a joined id)
                log.error("no answer from the main loop, though it accepted this iothread's key: is an iothread "
                          "with id %r joined already? giving up", self.id)
            else:
                log.error("no answer from the main loop: giving up")
            self.shutdown(EXIT_ORPHANED)
            return
        now = time.monotonic_ns()
        late_ns = now - self._watchdog_due_ns
        if late_ns > self.heartbeat_interval_ms * 1_000_000:
            # This process was not running (stopped: Ctrl-Z, SIGSTOP, a frozen
            # cgroup, most likely with the main loop): that time is not the
            # main loop's silence.
            self.last_heard_ns += late_ns
        silent_ms = (now - self.last_heard_ns) // 1_000_000
        if silent_ms > 3 * self.heartbeat_interval_ms:
            if self.rejoin:
                self._detach(silent_ms)
                return
            log.error("main loop silent for %d ms: exiting", silent_ms)
            self.shutdown(EXIT_ORPHANED)
            return
        self._heartbeat_seq += 1
        self.channel.send(Heartbeat(self._heartbeat_seq, time.monotonic_ns()))
        self._arm_watchdog()

    def _detach(self, silent_ms: int) -> None:
        """The main loop is silent: quiesce and close every node (as a
        blockdev-del would: NBD connections closed, requests in flight
        completed, the node flushed), then leave and say Hello again, both
        queued until the control connection is back.  The main loop reopens
        the nodes once it has taken the Hello."""
        log.warning("main loop silent for %d ms: %d node(s) quiesced and closed; joining again once it answers",
                    silent_ms, len(self.nodes))
        self.welcomed = False
        self.detached = True
        self.offers.clear()
        # A new session: the main loop takes its Hello for a join even if it did
        # not notice the silence (it drops repeats of one session's Hello).
        self._hello = dataclasses.replace(self._hello, session=self._hello.session + 1)
        for name, node in list(self.nodes.items()):
            del self.nodes[name]
            self.moved.discard(name)
            self._stats_sent.pop(name, None)
            self.deleting.add(node)

            def drained(node: BlockNode = node) -> None:
                self.deleting.discard(node)
                node.close()

            def closed(_count: int, node: BlockNode = node, drained: Callable[[], None] = drained) -> None:
                node.drain(drained)

            self.nbd.close_node(name, closed)
        self.channel.send(self._hello)

    # -- running ------------------------------------------------------------

    def shutdown(self, exit_code: int = EXIT_OK) -> None:
        """Stop taking requests, let those in flight complete (their
        completions sent), then stop: what QEMU's drain of every node does
        before it closes them (and closing flushes them).  A request still
        running after ``SHUTDOWN_DRAIN_MS`` does not hold the exit up.  Home thread."""
        if self.shutting_down:
            return
        self.shutting_down = True
        if self.nbd_listener is not None:
            self.nbd_listener.close()  # no new NBD clients
        self.nbd.close_all()  # once their requests in flight are answered
        nodes = {*self.nodes.values(), *self.deleting}
        log.debug("exit requested: draining %d node(s)", len(nodes))
        waiting = set(nodes)

        def drained(node: BlockNode) -> None:
            waiting.discard(node)
            if not waiting:
                deadline.delete()
                self.stop(exit_code)

        deadline = self.ctx.timer_new_ms(ClockType.REALTIME, lambda: self.stop(exit_code), "shutdown-deadline")
        deadline.mod(self.ctx.clock_now_ns(ClockType.REALTIME) // 1_000_000 + SHUTDOWN_DRAIN_MS)
        for node in nodes:
            node.drain(lambda node=node: drained(node))  # type: ignore[misc]
        if not nodes:
            deadline.delete()
            self.stop(exit_code)

    def stop(self, exit_code: int = EXIT_OK) -> None:
        """End the loop after this iteration (a oneshot BH, as QEMU does).  Any thread."""

        def clear_running() -> None:
            self.exit_code = exit_code
            self.running = False

        self.ctx.bh_schedule_oneshot(clear_running, "iothread_stop")

    def run(self) -> int:
        ctx = self.ctx
        while self.running:
            ctx.poll(True)
        return self.exit_code

    def close(self) -> None:
        self._bad_input.flush()
        self._refusals.flush()
        self._watchdog.delete()
        linger_ms = 0
        if self.welcomed and not self.main_loop_pid and not self.channel.closed:
            # Remote: no pidfd tells the main loop that this process is gone; its last word does.
            self.channel.send(Event(IOTHREAD_LEFT, {"exit-code": self.exit_code}))
            self.channel.flush()
            linger_ms = LEAVE_LINGER_MS
        if self._main_loop_pidfd >= 0:
            self.ctx.set_fd_handler(self._main_loop_pidfd)
            os.close(self._main_loop_pidfd)
            self._main_loop_pidfd = -1
        self.handler.close(linger_ms)
        if self._control_monitor is not None:
            self.ctx.set_fd_handler(cast(int, self._control_monitor.getsockopt(zmq.FD)))
            self._control_monitor.close(linger=0)
        if self.zap_handler is not None:
            self.zap_handler.close()
        if self.listener is not None:
            self.listener.close()
        if self.nbd_listener is not None:
            self.nbd_listener.close()
        if self.data_handler is not None:
            self.data_handler.close()
            if self.data_endpoint and self.data_endpoint.startswith("ipc://"):
                try:
                    os.unlink(self.data_endpoint.removeprefix("ipc://"))
                except FileNotFoundError:
                    pass
        self.nbd.close()
        if self.handoff is not None:
            self.ctx.set_fd_handler(self.handoff.fileno())
            for entry in self._handoffs_out:
                if not callable(entry):
                    entry[0].close()
            self._handoffs_out.clear()
            self.handoff.close()
        for node in {*self.nodes.values(), *self.deleting}:
            node.close()
        self.zmq.term()
        self.ctx.close()


def _exited(pid: int) -> bool:
    """Whether process ``pid``'s main thread has exited (a zombie, or gone),
    from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in (b"Z", b"X")


def _bounded(message: str) -> str:
    """An error message that stays well within the peer's string limit."""
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[:_MAX_MESSAGE_CHARS - 3] + "..."


def _completion(request_id: int, status: int, message: str, data: Buffer = b"") -> BlockCompletion:
    return BlockCompletion(request_id, status, _bounded(message), bytes(data))


_QMP_OPS = {"read": "rd", "write": "wr", "flush": "flush", "discard": "unmap", "write_zeroes": "zero"}


def node_statistics(node: BlockNode) -> dict[str, int]:
    """A node's statistics, flat, with QMP's BlockDeviceStats names
    (``rd_operations``, ``wr_bytes``, ``flush_total_time_ns``, ...), and the
    bins of a user-set latency histogram as ``rd_histogram_0``, ...: what a
    ``Query`` of the node, a ``NodeStats`` and a ``BlockdevAdd``'s ``stats`` carry."""
    out: dict[str, int] = {}
    for op, prefix in _QMP_OPS.items():
        st = node.stats[op]
        out[f"{prefix}_operations"] = st.ops
        out[f"{prefix}_bytes"] = st.bytes
        out[f"{prefix}_total_time_ns"] = st.total_ns
        out[f"failed_{prefix}_operations"] = st.errors
        out[f"invalid_{prefix}_operations"] = st.invalid
        for i, n in enumerate(st.bins):
            out[f"{prefix}_histogram_{i}"] = n
    return out


def restore_statistics(node: BlockNode, stats: dict[str, int], boundaries_ns: tuple[int, ...]) -> None:
    """The inverse of ``node_statistics``: a node opened in a new home starts
    from the statistics it had (names it does not know are ignored, a
    negative count is taken for 0), its latency histogram set to
    ``boundaries_ns`` (checked by ``_histogram_problem``) with its bins."""
    for op, prefix in _QMP_OPS.items():
        st = node.stats[op]
        st.ops = max(stats.get(f"{prefix}_operations", 0), 0)
        st.bytes = max(stats.get(f"{prefix}_bytes", 0), 0)
        st.total_ns = max(stats.get(f"{prefix}_total_time_ns", 0), 0)
        st.errors = max(stats.get(f"failed_{prefix}_operations", 0), 0)
        st.invalid = max(stats.get(f"invalid_{prefix}_operations", 0), 0)
        st.set_histogram(boundaries_ns)
        st.bins = [max(stats.get(f"{prefix}_histogram_{i}", 0), 0) for i in range(len(st.bins))]


def _stats_mark(node: BlockNode) -> tuple[object, ...]:
    """What tells that a node's statistics changed: every request completed
    adds one to an operation's ``ops``, ``errors`` or ``invalid``, and a new
    histogram setting changes its boundaries."""
    return tuple((st.ops, st.errors, st.invalid, st.boundaries_ns) for st in node.stats.values())


class _OfferTable(Mapping[str, NbdExport]):
    """The exports this iothread's listener offers, by name, as a handshake
    sees them at each option: those offered whose node is here (not moving away)."""

    def __init__(self, worker: IOThreadWorker) -> None:
        self._worker = worker

    def _here(self, offer: NbdOffer) -> bool:
        return offer.node_name in self._worker.nodes and offer.node_name not in self._worker.moved

    def __getitem__(self, name: str) -> NbdExport:
        offer = self._worker.offers[name]
        if not self._here(offer):
            raise KeyError(name)
        return NbdExport(offer.name, offer.size_bytes, offer.description if offer.has_description else None,
                         read_only=offer.read_only, multi_conn=offer.multi_conn,
                         min_block_bytes=offer.min_block_bytes, allocation_depth=offer.allocation_depth)

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, offer in self._worker.offers.items() if self._here(offer)])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _histogram_problem(boundaries_ns: tuple[int, ...]) -> str:
    """Why these cannot be a latency histogram's boundaries ('' if they can)."""
    return "" if list(boundaries_ns) == sorted(set(boundaries_ns)) else "unsorted boundaries"


def parse_args(argv: list[str] | None, prog: str = "python -m iothreads.worker") -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog, description="Run one iothread process: started by its main loop, or joining a running "
                               "cluster from another host (--connect tcp://HOST:PORT with its CURVE keys).")
    p.add_argument("--id", required=True, help="the iothread's id (QEMU's object id)")
    p.add_argument("--connect", required=True, metavar="ENDPOINT",
                   help="the main loop's control endpoint (a launcher's --control tcp://HOST:PORT)")
    p.add_argument("--curve-keys", metavar="FILE",
                   help="this iothread's key pair (a .key_secret file of 'iothreads keygen', mode 0600); "
                        "required with tcp://")
    p.add_argument("--server-key", metavar="FILE",
                   help="the main loop's public key (its .key file); required with tcp://")
    p.add_argument("--host", default="", help="how the cluster names this host (default: the data endpoint's "
                                              "address)")
    p.add_argument("--parent-pid", type=int, default=0, help="exit if this process is not our parent")
    for m in members(IothreadProperties):  # the iothread object's properties, as the schema declares them
        p.add_argument(f"--{m.name}", type=int, default=m.default(), help=m.doc)
    p.add_argument("--handshake-timeout-ms", type=int, default=10_000)
    p.add_argument("--data-endpoint", metavar="ENDPOINT",
                   help="bind the data plane (clients) here (default with tcp:// and no --parent-pid: "
                        "tcp://ADDRESS:* on the address this host reaches the main loop from)")
    p.add_argument("--nbd-listen", metavar="HOST:PORT", type=_nbd_listen,
                   help="serve the NBD exports of this iothread's nodes here, from this host (a remote "
                        "iothread: NBD has no authentication here; bind to an address only your clients reach)")
    p.add_argument("--no-rejoin", dest="rejoin", action="store_false",
                   help="exit (status 3) when the main loop is silent, instead of closing the nodes and joining "
                        "again once it answers (for a supervisor that restarts it)")
    p.add_argument("--handoff-fd", type=int, metavar="FD",
                   help="the handoff socket: NBD connections from and back to the main loop")
    p.add_argument("--log-level", type=_log_level, default=logging.INFO, metavar="LEVEL",
                   help="messages from this logging level up (a name or a number; default INFO)")
    args = p.parse_args(argv)
    if args.connect.startswith("tcp://"):
        if not args.curve_keys or not args.server_key:
            p.error("--connect tcp://... needs --curve-keys and --server-key (CURVE is mandatory on tcp://)")
        if args.data_endpoint is None and not args.parent_pid:
            args.data_endpoint = f"tcp://{_address_toward(args.connect)}:*"
    if not args.host and args.data_endpoint and args.data_endpoint.startswith("tcp://") and not args.parent_pid:
        args.host = args.data_endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    return args


def _address_toward(endpoint: str) -> str:
    """This host's address on the route to ``tcp://HOST:PORT`` (a UDP
    socket's connect picks it; nothing is sent); 127.0.0.1 if there is none."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, int(port) if port.isdigit() else 9))
            return str(probe.getsockname()[0])
    except (OSError, ValueError):
        return "127.0.0.1"


def _nbd_listen(text: str) -> tuple[str, int]:
    try:
        return parse_listen_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _log_level(text: str) -> int:
    level = int(text) if text.isdigit() else logging.getLevelName(text.upper())
    if not isinstance(level, int):
        raise argparse.ArgumentTypeError(f"'{text}' is not a logging level")
    return level


def main(argv: list[str] | None = None, prog: str = "python -m iothreads.worker") -> int:
    # First of all: no signal blocked, whatever the mask inherited (a main
    # loop blocks SIGINT and SIGTERM for its signalfd; a mask survives fork
    # and exec).  The main loop spawns its iothreads clean already; this is
    # for whoever else starts one.  Before ZeroMQ's threads exist: they
    # inherit this thread's mask.
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    args = parse_args(argv, prog)
    logging.basicConfig(level=args.log_level, format=f"iothread {args.id}: %(message)s")
    bound_heap_retention()  # large buffers given back when freed (see protocol/channel/_memory.py)
    raise_fd_limit()  # the headroom the system grants; clients get what the reserve leaves (FdBudget)
    if args.parent_pid:
        die_with_parent(args.parent_pid)

    # A signal handler may run while this thread holds a loop lock: it only
    # sets an eventfd, whose handler (an ordinary fd handler) stops the loop.
    # Installed before the worker says Hello: a SIGTERM sent as soon as the
    # main loop reports it ready stops it cleanly (the eventfd keeps it until
    # the handler below is registered), instead of killing it.
    stop_request = EventNotifier()
    closing = stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        if not closing:  # once the worker shuts down, there is nothing left to stop
            stopping = True
            stop_request.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        keys = load_key_pair(args.curve_keys) if args.curve_keys else None
        server_key = load_public_key(args.server_key) if args.server_key else b""
        worker = IOThreadWorker(
            args.id, args.connect, poll_max_ns=args.poll_max_ns, poll_grow=args.poll_grow,
            poll_shrink=args.poll_shrink, aio_max_batch=args.aio_max_batch,
            handshake_timeout_ms=args.handshake_timeout_ms, data_endpoint=args.data_endpoint,
            handoff_fd=args.handoff_fd, keys=keys, server_key=server_key, host=args.host,
            nbd_listen=args.nbd_listen, rejoin=args.rejoin,
        )
    except (ValueError, OSError, zmq.ZMQError) as exc:  # (OSError: a --handoff-fd that is no socket)
        # An OSError of our own words says them alone, not "[Errno N] ...".
        text = exc.strerror if isinstance(exc, OSError) and exc.filename is None and exc.strerror else str(exc)
        print(f"iothread {args.id}: {text}", file=sys.stderr)
        stop_request.close()
        return EXIT_ERROR
    if args.parent_pid and not worker.watch_main_loop(args.parent_pid):
        worker.close()
        stop_request.close()
        return EXIT_ORPHANED

    def on_stop_request(notifier: EventNotifier) -> None:
        nonlocal stopping
        stopping = False  # handled: busy polling must not find it again (it would spin)
        notifier.test_and_clear()
        if not worker.main_loop_gone():  # else it was the parent-death signal: stopping already
            worker.shutdown(EXIT_OK)

    # With an io_poll (a flag, as QEMU's notifiers read theirs in memory), so
    # that this handler does not turn busy polling off for the whole context.
    worker.ctx.set_event_notifier(stop_request, on_stop_request, io_poll=lambda: stopping)

    log.debug("pid %d: control %s, data %s", worker.pid, args.connect, args.data_endpoint)
    exit_code = EXIT_ERROR
    try:
        exit_code = worker.run()
        return exit_code
    finally:
        log.debug("exiting (code %d)", exit_code)
        closing = True
        # A late stop request has nothing left to stop, and must not kill the
        # exiting interpreter either (the parent-death signal comes once for
        # each thread of a dying main loop): ignored, which the interpreter's
        # finalization keeps (it puts back the default action of handlers only).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        worker.ctx.set_event_notifier(stop_request, None)
        stop_request.close()
        worker.close()
