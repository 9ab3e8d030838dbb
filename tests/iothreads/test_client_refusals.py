"""The block client and requests that cannot be served: arguments no node
could take are refused at once with EINVAL (as the docs promise), and a
completion the client cannot decode fails its request with EIO instead of
leaving the caller waiting; a flood of them logs a few lines."""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from iothreads import BlockClient, BlockIOError
from iothreads.testing import poll_until
from protocol import (
    PROTOCOL_VERSION,
    BlockCompletion,
    BlockRequest,
    ClusterState,
    IOThreadEntry,
    NodeEntry,
    cluster_state_path,
    decode,
    encode,
    ipc_endpoint,
)

WAIT_MS = 10_000
MAX_REQUEST_BYTES = 32 * 1024 * 1024


@pytest.fixture
def iothread(runtime_dir: str) -> Iterator[zmq.Socket[Any]]:
    """The data socket of an iothread played by the test (a ROUTER), published
    in the runtime directory with a node ``n0`` on it."""
    endpoint = ipc_endpoint(runtime_dir, "io0.data")
    zctx = zmq.Context()
    sock = zctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    with open(cluster_state_path(runtime_dir), "w", encoding="utf-8") as f:
        f.write(ClusterState(runtime_dir, "", (IOThreadEntry("io0", 1, "running", endpoint),),
                             {"n0": NodeEntry("io0", "null-co", 1 << 20)}).to_json())
    yield sock
    sock.close()
    zctx.term()


def _request(client: BlockClient, sock: zmq.Socket[Any]) -> tuple[bytes, BlockRequest]:
    """The next request the client sends (its loop turns until the socket has it)."""
    poll_until(lambda: client.ctx.poll(True, 10_000_000), lambda: sock.poll(0), "a request from the client",
               WAIT_MS / 1000)
    identity, *frames = sock.recv_multipart()
    msg = decode(frames)
    assert isinstance(msg, BlockRequest)
    return identity, msg


@pytest.mark.parametrize(
    ("op", "offset", "length", "message"),
    [
        ("read", -1, 512, "offset and length must be >= 0, not -1 and 512"),
        ("read", 0, -512, "offset and length must be >= 0"),
        ("discard", -4096, 4096, "offset and length must be >= 0"),
        ("write_zeroes", 0, -1, "offset and length must be >= 0"),
        ("read", 0, MAX_REQUEST_BYTES + 1, "exceeds the limit"),
        ("explode", 0, 0, "unknown operation 'explode'"),
    ],
)
def test_requests_no_node_could_take_are_einval_at_once(iothread: zmq.Socket[Any], runtime_dir: str, op: str,
                                                       offset: int, length: int, message: str) -> None:
    with BlockClient(runtime_dir, timeout_s=5) as client:
        calls = {"read": lambda: client.read("n0", offset, length),
                 "discard": lambda: client.discard("n0", offset, length),
                 "write_zeroes": lambda: client.write_zeroes("n0", offset, length),
                 "explode": lambda: client.submit("n0", op, offset, length)}
        with pytest.raises(BlockIOError) as info:
            calls[op]()
        assert info.value.errno == errno.EINVAL and message in str(info.value)
        assert client.in_flight == 0
        # Nothing was sent: the next request is the first the iothread sees.
        results: list[tuple[int, str, bytes]] = []
        client.submit("n0", "read", 0, 4, callback=lambda s, m, d: results.append((s, m, d)))
        identity, request = _request(client, iothread)
        assert (request.op, request.offset, request.length) == ("read", 0, 4)
        iothread.send_multipart([identity, *encode(BlockCompletion(request.request_id, 0, "", b"data"))])
        poll_until(lambda: client.ctx.poll(True, 100_000_000), lambda: bool(results), "the completion", 10)
        assert results == [(0, "", b"data")]


def test_a_completion_that_cannot_be_decoded_fails_its_request(iothread: zmq.Socket[Any], runtime_dir: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Its id can be read: that request fails with EIO at once (it used to wait
    for its deadline, or for ever for a callback); a flood of bad completions
    logs a few lines, not one each."""
    caplog.set_level(logging.WARNING, logger="iothreads.block")
    with BlockClient(runtime_dir, timeout_s=30) as client:
        results: list[tuple[int, str]] = []
        client.submit("n0", "read", 0, 512, callback=lambda s, m, d: results.append((s, m)))
        identity, request = _request(client, iothread)
        iothread.send_multipart([identity, msgpack.packb(
            [PROTOCOL_VERSION, "block-completion", [request.request_id, "zero", ""]])])
        poll_until(lambda: client.ctx.poll(True, 100_000_000), lambda: bool(results), "the failure", 10)
        status, message = results[0]
        assert status == -errno.EIO and "io0 sent a bad completion" in message and "'status'" in message
        assert client.in_flight == 0
        # A flood of them (ids of no request, and garbage), then a good one: served.
        for i in range(500):
            iothread.send_multipart([identity, msgpack.packb([PROTOCOL_VERSION, "block-completion",
                                                              [10_000 + i, "zero", ""]])])
            iothread.send_multipart([identity, b"\xc1garbage"])
        client.submit("n0", "read", 0, 512, callback=lambda s, m, d: results.append((s, m)))
        identity, request = _request(client, iothread)
        iothread.send_multipart([identity, *encode(BlockCompletion(request.request_id, 0, "", bytes(512)))])
        poll_until(lambda: client.ctx.poll(True, 100_000_000), lambda: len(results) == 2, "the completion", 10)
        assert results[1] == (0, "")
    lines = [r.getMessage() for r in caplog.records if r.name == "iothreads.block"]
    assert 2 <= len(lines) <= 20, lines
    assert any("suppressed" in line for line in lines)
