"""The block client against a fake iothread (a ROUTER channel in a LoopThread)
that answers what a test needs: here ESTALE, as a node in the middle of a move
does, to the first attempt of a request."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest
import zmq

from iothreads import BlockClient
from iothreads.aio._channel_handler import ChannelHandler
from iothreads.testing import LoopThread, poll_until
from protocol import (
    BlockCompletion,
    BlockRequest,
    Channel,
    ClusterState,
    IOThreadEntry,
    Message,
    NodeEntry,
    cluster_state_path,
    ipc_endpoint,
    make_runtime_dir,
)

DEADLINE_S = 20.0


@pytest.fixture
def fake_iothread() -> Iterator[tuple[str, list[int]]]:
    """(runtime dir, offsets of the requests it received); node "n0" answers
    the first request at each offset with ESTALE, the next with zeros."""
    rt = make_runtime_dir()
    endpoint = ipc_endpoint(rt, "io0.data")
    with open(cluster_state_path(rt), "w", encoding="utf-8") as f:
        f.write(ClusterState(rt, "", (IOThreadEntry("io0", os.getpid(), "running", endpoint),),
                             {"n0": NodeEntry("io0", "null-co", 1 << 20)}).to_json())
    zctx = zmq.Context()
    arrivals: list[int] = []
    with LoopThread("fake-io0") as loop:

        def serve() -> ChannelHandler:
            sock = zctx.socket(zmq.ROUTER)
            sock.bind(endpoint)

            def on_message(identity: bytes, msg: Message) -> None:
                assert isinstance(msg, BlockRequest)
                arrivals.append(msg.offset)
                if arrivals.count(msg.offset) == 1:
                    channel.send(BlockCompletion(msg.request_id, -errno.ESTALE, "node moved"), identity)
                else:
                    channel.send(BlockCompletion(msg.request_id, 0, "", bytes(msg.length)), identity)

            channel = Channel(sock, on_message)
            return ChannelHandler(loop.ctx, channel, "fake")

        handler = loop.run_sync(serve)
        try:
            yield rt, arrivals
        finally:
            loop.run_sync(handler.close)
    zctx.term()
    os.unlink(endpoint.removeprefix("ipc://"))
    os.unlink(cluster_state_path(rt))
    os.rmdir(rt)


def test_a_blocking_call_in_a_completion_callback_survives_a_resend(fake_iothread: tuple[str, list[int]]) -> None:
    """The nested call's first attempt gets ESTALE; its resend must leave at
    once although the outer drain is still running (it used to wait for the
    drain's end, after the call's timeout)."""
    rt, arrivals = fake_iothread
    with BlockClient(rt, timeout_s=DEADLINE_S) as client:
        assert client.read("n0", 0, 512) == bytes(512)  # ESTALE, resent, done: at top level
        result: list[bytes] = []

        def on_done(status: int, message: str, data: bytes) -> None:
            assert status == 0, message
            result.append(client.read("n0", 4096, 512))  # ESTALE, then the resend

        client.submit("n0", "read", 0, 512, callback=on_done)
        poll_until(lambda: client.ctx.poll(True, 100_000_000), lambda: result, "the nested call", DEADLINE_S)
        assert result == [bytes(512)]
        assert arrivals == [0, 0, 0, 4096, 4096] and client.resends == 2
