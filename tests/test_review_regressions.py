"""Regression tests for bugs found in review: unbounded QMP scalars, a raising
channel handler stranding input, huge block requests, fd leaks on open
errors, a raising cluster callback stopping exit handling."""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest
import zmq

from iothreads import AioContext, ChannelHandler
from iothreads.block._node import BlockNode, FileDriver, NullDriver
from mainloop import Cluster, IOThreadConfig, MainLoop, bql
from protocol import Channel, Heartbeat, QmpDecoder, QmpInputError, encode, ipc_endpoint, make_runtime_dir


def test_qmp_top_level_scalar_is_bounded() -> None:
    d = QmpDecoder(max_message_bytes=100_000)
    out: list[object] = []
    for _ in range(4):
        out += d.feed(b"a" * 65536)
    assert out and isinstance(out[-1], QmpInputError) and out[-1].fatal


def test_a_raising_handler_does_not_strand_queued_messages() -> None:
    rd = make_runtime_dir()
    z = zmq.Context()
    got: list[int] = []
    errors: list[str] = []
    with AioContext(name="strand") as ctx:
        ctx.set_exception_handler(lambda c, exc, where: errors.append(str(exc)))

        def on_message(identity: bytes, msg: object) -> None:
            got.append(msg.seq)  # type: ignore[attr-defined]
            if len(got) == 1:
                raise RuntimeError("handler failed")

        router = Channel(z.socket(zmq.ROUTER), on_message)
        ep = ipc_endpoint(rd, "r")
        router.socket.bind(ep)
        handler = ChannelHandler(ctx, router, "router")
        dealer = z.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(ep)
        for i in range(3):
            dealer.send_multipart(encode(Heartbeat(i, 0)))
        end = time.monotonic() + 20
        while len(got) < 3:
            assert time.monotonic() < end, f"stranded after {got}"
            ctx.poll(True)
        assert got == [0, 1, 2] and errors == ["handler failed"]
        handler.close()
        dealer.close()
    z.term()
    os.unlink(ep.removeprefix("ipc://"))
    os.rmdir(rd)


def test_huge_requests_are_refused_and_complete() -> None:
    with AioContext() as ctx:
        node = BlockNode(ctx, "null0", NullDriver(1 << 40))
        results: list[int] = []
        node.submit("read", 0, 1 << 34, b"", lambda s, m, d: results.append(s))
        assert results == [-errno.EINVAL] and node.in_flight == 0


def test_open_errors_leak_no_fd(tmp_path: object) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(OSError, match="not a regular file"):
            FileDriver(str(tmp_path), read_only=True)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_raising_reply_callback_does_not_stop_exit_handling() -> None:
    loop = MainLoop(name="robust")
    with bql():
        c = Cluster(loop)
    events: list[str] = []
    try:
        with bql():
            c.add_listener(lambda name, data: events.append(name))
            t = c.add(IOThreadConfig("io0"))
            assert c.wait_for(c.all_running, 30)

            def bad(reply: object) -> None:
                raise RuntimeError("callback failed")

            c.query("io0", bad)  # may be answered before or after the kill: either way it raises
            os.kill(t.pid, signal.SIGKILL)
            assert c.wait_for(lambda: "IOTHREAD_EXITED" in events, 10)
    finally:
        with bql():
            c.shutdown()
        loop.close()
