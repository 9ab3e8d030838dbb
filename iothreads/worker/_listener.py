"""An iothread's data endpoint: listening only while it can afford clients.

Theory of operation
-------------------
Data-plane clients connect to the iothread's ROUTER socket, and libzmq
accepts them on its own, in its I/O thread: this process never sees an
``accept`` to refuse.  Each accepted client costs a descriptor, and libzmq
*aborts the process* when an ipc listener's ``accept`` fails with EMFILE.
Unbinding is no way out either: libzmq closes every connection a listener
accepted when it is unbound.  So the ``DataListener`` makes the endpoint
impossible to find instead: it counts the connections from the socket's
monitor (accepted, disconnected) and moves the ipc socket file aside
(``ID.data`` becomes ``ID.data.paused``, in the private runtime directory:
a connect finds nothing, the listening socket and its clients are untouched)
once

* ``max_clients`` are connected, or
* fewer than ``FD_RESERVE + MARGIN_FDS`` descriptors are left (``FdBudget``):
  the margin covers what libzmq may still accept after that (its listen
  backlog is ``BACKLOG``) and between the monitor's events and this process
  acting on them;

and moves it back once clients have left and twice the margin is free
(checked at each monitor event and whenever ``check`` is called: the worker
calls it at each heartbeat, so descriptors freed in other ways, a node
closed, are noticed too).  A client that comes meanwhile finds no endpoint
(the block client says so); pausing and resuming are logged, and pausing is
reported to the main loop as a ``RESOURCE_LIMIT_REACHED`` event.  A tcp
endpoint has no file to move: there libzmq survives EMFILE by itself (it
retries the accept later), so only the count is kept.

Home thread only (the iothread's), like the AioContext it runs in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, cast

import zmq
from zmq.utils.monitor import parse_monitor_message

from protocol import PAUSED_SUFFIX, FdBudget, has_input
from protocol.channel import HANDSHAKE_FAILURES, Refusal, handshake_refusal

from ..aio._context import AioContext

__all__ = ["BACKLOG", "DataListener", "MARGIN_FDS", "MAX_CLIENTS"]

log = logging.getLogger("iothreads.worker")

MAX_CLIENTS = 1024  # data-plane connections to one iothread at once
MARGIN_FDS = 32  # free descriptors, on top of the reserve, below which it stops listening
BACKLOG = 16  # connections the kernel queues for libzmq to accept (ZMQ_BACKLOG; set before the bind)


class DataListener:
    """Whether an iothread's data endpoint listens, from its connection count
    and the descriptors left."""

    def __init__(self, ctx: AioContext, sock: zmq.Socket[Any], endpoint: str, *,
                 on_limit: Callable[[str], object], max_clients: int = MAX_CLIENTS,
                 budget: FdBudget | None = None, on_refused: Callable[[Refusal], object] | None = None) -> None:
        self.ctx = ctx
        self.sock = sock
        self.endpoint = endpoint
        self._path = endpoint.removeprefix("ipc://") if endpoint.startswith("ipc://") else ""
        self.max_clients = max_clients
        self.budget = budget or FdBudget()
        self.on_limit = on_limit
        self.on_refused = on_refused  # (a CURVE socket: clients that failed the handshake)
        self.clients = 0
        self.listening = True
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
                                                | (HANDSHAKE_FAILURES if on_refused is not None else 0))
        self._monitor_fd = cast(int, self._monitor.getsockopt(zmq.FD))
        # With a real io_poll (a ZMQ_EVENTS read), though it costs every
        # busy-polling turn: connections must be counted at once, while
        # busy polling too, or libzmq accepts past the margin and aborts the
        # process (an io_poll that never found them let a flood of clients do it).
        ctx.set_fd_handler(self._monitor_fd, io_read=self._on_events,
                           io_poll=lambda: has_input(self._monitor))
        self._on_events()  # its fd is signalled only once a read has found the queue empty

    def _on_events(self) -> None:
        """Count the connections (the monitor's fd is edge-triggered: read every event)."""
        monitor = self._monitor
        while has_input(monitor):
            message = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            event = message["event"]
            if event == zmq.EVENT_ACCEPTED:
                self.clients += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self.clients = max(0, self.clients - 1)
            elif self.on_refused is not None:
                refusal = handshake_refusal(event, message["value"], "data")
                if refusal is not None:
                    self.on_refused(refusal)
        self.check()

    def check(self) -> None:
        """Stop or start listening, as the count and the descriptors left say."""
        if self.listening:
            problem = (f"{self.clients} data-plane clients are connected, the most it takes"
                       if self.clients >= self.max_clients else
                       self.budget.problem("data-plane clients", MARGIN_FDS))
            if problem is not None:
                self._stop(problem)
        elif self.clients < self.max_clients and self.budget.problem("data-plane clients", 2 * MARGIN_FDS) is None:
            self._start()

    def _stop(self, problem: str) -> None:
        if self._path:
            try:
                os.rename(self._path, self._path + PAUSED_SUFFIX)
            except OSError as exc:
                log.error("cannot pause %s: %s", self.endpoint, exc)
                return
        self.listening = False  # over the limit (and, for ipc, not to be found)
        log.error("no new data-plane clients taken for now: %s", problem)
        self.on_limit(problem)

    def _start(self) -> None:
        if self._path:
            try:
                os.rename(self._path + PAUSED_SUFFIX, self._path)
            except OSError as exc:  # tried again at the next check
                log.error("cannot resume %s: %s", self.endpoint, exc)
                return
        self.listening = True
        log.info("new data-plane clients taken again (%d connected)", self.clients)

    def close(self) -> None:
        """Stop counting; the socket file, moved aside or not, is removed."""
        self.ctx.set_fd_handler(self._monitor_fd)
        self.sock.disable_monitor()
        self._monitor.close(linger=0)
        if self._path and not self.listening:
            try:
                os.unlink(self._path + PAUSED_SUFFIX)
            except FileNotFoundError:
                pass
