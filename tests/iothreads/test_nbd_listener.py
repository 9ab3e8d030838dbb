"""A remote iothread's own NBD listener: a client negotiates an export it
offers; out of descriptors, it stops watching the socket for a while
instead of spinning, then watches it again."""

from __future__ import annotations

import errno
import socket
import threading
from typing import Any

import pytest

from iothreads import AioContext
from iothreads.nbd import NbdListener
from iothreads.testing import poll_until
from protocol import NbdExport, NbdNegotiated
from protocol.nbd import NbdClientHandshake, NbdClientState


def test_a_client_negotiates_an_offered_export(ctx: AioContext) -> None:
    got: list[tuple[NbdNegotiated, bytes]] = []

    def negotiated(sock: socket.socket, agreed: NbdNegotiated, pending: bytes) -> None:
        sock.close()
        got.append((agreed, pending))

    listener = NbdListener(ctx, ("127.0.0.1", 0), {"disk": NbdExport("disk", 1 << 20)}, negotiated)
    host, port = listener.address.rsplit(":", 1)
    result: list[Any] = []

    def client() -> None:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            hs = NbdClientHandshake("disk")
            while hs.state is NbdClientState.NEGOTIATING:
                out = hs.data_to_send()
                if out:
                    sock.sendall(out)
                    hs.data_sent(len(out))
                hs.receive_data(sock.recv(65536))
            result.append(hs.state)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        poll_until(lambda: ctx.poll(True, 100_000_000), lambda: got, "the handshake to end", 10)
    finally:
        thread.join(10)
        listener.close()
    assert result == [NbdClientState.TRANSMISSION]
    assert got[0][0].export.name == "disk" and got[0][1] == b""


def test_out_of_descriptors_it_backs_off(ctx: AioContext, monkeypatch: pytest.MonkeyPatch) -> None:
    listener = NbdListener(ctx, ("127.0.0.1", 0), {}, lambda sock, agreed, pending: sock.close())
    fd = listener.sock.fileno()
    try:
        host, port = listener.address.rsplit(":", 1)
        waiting = socket.create_connection((host, int(port)))  # the listener is readable from now on

        def emfile(self: socket.socket) -> tuple[socket.socket, Any]:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(socket.socket, "accept", emfile)  # (only the listener accepts here)
        poll_until(lambda: ctx.poll(True, 100_000_000), lambda: not ctx.has_fd_handler(fd),
                   "the listener to stop being watched", 10)
        assert listener._retry.pending
        monkeypatch.undo()
        poll_until(lambda: ctx.poll(True, 100_000_000), lambda: listener._handshakes,
                   "the waiting client to be accepted after the back-off", 10)
        waiting.close()
    finally:
        listener.close()
