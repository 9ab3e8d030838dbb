"""The cluster's CURVE keys, and its gatekeeper on tcp://.

Theory of operation
-------------------
A cluster whose control channel is on tcp:// is CURVE-only (see
``protocol.channel``'s ``_curve``).  Its ``ClusterKeys``:

* ``server``: the main loop's key pair, which its control ROUTER serves
  with: given (``--curve-keys FILE``, so that remote iothreads can be told
  its public key ahead), or made for this run;
* ``local``: a key pair made for this run, which the iothreads the main
  loop spawns and the clients on this host use (both as clients, and the
  iothreads as servers of their data sockets).  It is written, with the
  server's public key, in the private runtime directory (``local.key_secret``,
  mode 0600; ``server.key``), where they and the block client find it;
* ``authorized``: the public keys of the peers from elsewhere (remote
  iothreads, clients on other hosts), from ``--authorized-keys DIR``.

The main loop lets in ``local`` and ``authorized`` (its ZAP handler, a source
of its main context, bound before the control socket), and tells every
iothread the same set in its ``Welcome``, for its data socket's handler.
Refusals, its own and those its iothreads report, are logged (throttled) and
raised as ``PEER_REFUSED`` events; a handshake that fails before the ZAP
handler is asked (no CURVE, a wrong server key) is seen by a monitor of the
control socket.

Main-loop thread, BQL held.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import zmq
from zmq.utils.monitor import parse_monitor_message

from protocol import PEER_REFUSED, ThrottledLog
from protocol.channel import (
    HANDSHAKE_FAILURES,
    KeyPair,
    Refusal,
    ZapHandler,
    ZapPolicy,
    curve_server,
    handshake_refusal,
    has_input,
    local_key_paths,
    write_key_file,
)

from ..glib._channel_source import ChannelSource
from ..glib._source import IO_IN
from ..glib._standard import FdWatchSource
from ..loop._loop import MainLoop

__all__ = ["ClusterKeys", "Gatekeeper"]

log = logging.getLogger("mainloop.cluster")

CONTROL_CHANNEL = "control"


@dataclass
class ClusterKeys:
    """The key pairs of a CURVE cluster, and the public keys let in from elsewhere."""

    server: KeyPair = field(default_factory=KeyPair.generate)
    local: KeyPair = field(default_factory=KeyPair.generate)
    authorized: dict[bytes, str] = field(default_factory=dict)

    def allowed(self) -> dict[bytes, str]:
        """Every key let in: the local one and the authorised ones, by name."""
        return {**self.authorized, self.local.public: "local"}

    def write_local(self, runtime_dir: str) -> tuple[str, str]:
        """Write the local pair and the server's public key for this host's
        iothreads and clients; their paths (secret file, server key file)."""
        secret_path, server_path = local_key_paths(runtime_dir)
        write_key_file(secret_path, self.local.public, self.local.secret)
        write_key_file(server_path, self.server.public)
        return secret_path, server_path


class Gatekeeper:
    """Who gets through a cluster's control socket: its ZAP handler and a
    monitor of the socket's failed handshakes, both sources of the main
    context; ``report`` for refusals (its own, and its iothreads')."""

    def __init__(self, loop: MainLoop, zctx: zmq.Context[Any], keys: ClusterKeys,
                 emit: Callable[[str, dict[str, Any]], None]) -> None:
        self.keys = keys
        self._emit = emit
        self._log = ThrottledLog(log)
        self.refused = 0
        self.zap = ZapHandler(zctx, ZapPolicy(keys.allowed()), self.report)
        self._zap_source = ChannelSource(self.zap, "zap", role="ZMQ_FD of the ZAP handler (CURVE keys)")
        loop.context.attach(self._zap_source)
        self._monitor: zmq.Socket[Any] | None = None
        self._monitor_source: FdWatchSource | None = None
        self._loop = loop

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Make the control socket a CURVE server watched for failed
        handshakes (before it binds)."""
        curve_server(sock, self.keys.server, CONTROL_CHANNEL)
        monitor = self._monitor = sock.get_monitor_socket(HANDSHAKE_FAILURES)
        fd = cast(int, monitor.getsockopt(zmq.FD))
        self._monitor_source = FdWatchSource(fd, IO_IN, self._on_monitor, "control-handshakes",
                                             role="ZMQ_FD of the control socket's monitor (failed handshakes)")
        self._loop.context.attach(self._monitor_source)
        self._on_monitor(fd, IO_IN)  # its fd is signalled only once a read has found the queue empty

    def _on_monitor(self, fd: int, cond: int) -> bool:
        monitor = self._monitor
        while monitor is not None and has_input(monitor):
            event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            refusal = handshake_refusal(event["event"], event["value"], CONTROL_CHANNEL)
            if refusal is not None:
                self.report(refusal)
        return True

    def report(self, refusal: Refusal, iothread: str | None = None) -> None:
        """Log a refused peer (a few lines per kind, then counts) and raise
        ``PEER_REFUSED`` with each line logged."""
        self.refused += 1
        where = f"iothread {iothread}'s {refusal.channel}" if iothread else refusal.channel
        if self._log.log((iothread, refusal.channel, refusal.address, refusal.key, refusal.reason), logging.WARNING,
                         "%s channel refused a peer%s%s: %s", where,
                         f" from {refusal.address}" if refusal.address else "",
                         f" with key {refusal.key}" if refusal.key else "", refusal.reason):
            data = refusal.as_event()
            if iothread:
                data["iothread"] = iothread
            self._emit(PEER_REFUSED, data)

    def close(self, sock: zmq.Socket[Any] | None = None) -> None:
        """Detach both sources (``sock``: the control socket, whose monitor stops)."""
        if self._monitor_source is not None:
            self._monitor_source.destroy()
            self._monitor_source = None
        if self._monitor is not None:
            if sock is not None and not sock.closed:
                sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        self._zap_source.destroy()  # (its finalize closes the handler's socket)
        self._log.flush()
