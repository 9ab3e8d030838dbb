"""Handing a connection's socket to another process: the socket and what the
handshake agreed arrive together, pending bytes whatever their size, and a
bad datagram is refused with every descriptor it carried closed."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterator

import pytest

from protocol import (
    NbdConnection,
    RemoteProtocolError,
    Stop,
    encode,
    handoff_pair,
    receive_connection,
    send_connection,
)
from protocol.channel._handoff import INLINE_PENDING_BYTES


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = handoff_pair()
    yield a, b
    a.close()
    b.close()


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize("pending", [b"", b"\x25\x60\x95\x13" + bytes(24), os.urandom(INLINE_PENDING_BYTES + 1),
                                     os.urandom(4 << 20)], ids=["none", "a header", "just too much", "4 MiB"])
def test_a_connection_arrives_with_its_socket_and_pending_bytes(pair: tuple[socket.socket, socket.socket],
                                                                pending: bytes) -> None:
    a, b = pair
    client, server = socket.socketpair()
    msg = NbdConnection(7, "exp", "disk0", 0x4d, True, {"base:allocation": 1}, pending)
    before = _open_fds()
    send_connection(a, server.fileno(), msg)
    server.close()  # the sender's copy: the receiver has its own
    assert receive_connection(a) is None
    fd, got = receive_connection(b) or (-1, None)
    try:
        assert got == msg
        client.sendall(b"ping")  # the very connection
        assert os.read(fd, 4) == b"ping"
    finally:
        os.close(fd)
        client.close()
    assert receive_connection(b) is None  # nothing else waits
    assert _open_fds() <= before  # no memfd or copy left behind


def test_a_bad_datagram_is_refused_and_its_descriptors_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        before = _open_fds()
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())]
        cases: list[tuple[list[bytes], list[tuple[int, int, bytes]], str]] = [  # data, rights, the error
            ([b"short"], rights, "too short"),
            ([b"\x00\x00\x00\x05\x00\x00\x00\x00abc"], rights, "do not add up"),
            ([b"\x00\x00\x00\x02\x00\x00\x00\x00\xc1\xc1"], rights, "msgpack|garbage|decode|header"),
            ([len(encode(Stop())[0]).to_bytes(4, "big") + bytes(4) + encode(Stop())[0]], rights, "not an nbd-connection"),
            ([b"\x00" * 8], [], "0 descriptors"),
            ([b"\x00" * 8], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, r, r]).tobytes())],
             "truncated"),  # room for two: the kernel closes the rest
        ]
        for data, anc, words in cases:
            a.sendmsg(data, anc)
            with pytest.raises(RemoteProtocolError, match=words):
                receive_connection(b)
            assert _open_fds() == before, (data, words)
    finally:
        os.close(r)
        os.close(w)


def test_the_peer_closing_its_end_is_end_of_file(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.close()
    with pytest.raises(EOFError):
        receive_connection(b)
