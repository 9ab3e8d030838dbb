"""The block client against a launched cluster, as a user's program uses it:
every operation and its errors, blocking calls (from a completion callback,
timing out), callbacks and awaitables many in flight, requests to an
iothread that dies, a client that goes away mid-flight."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from iothreads import AioContext, BlockClient, BlockIOError, reschedule
from iothreads.block import _client
from iothreads.testing import poll_until


def test_client_every_op_type_and_errors(block_cluster: tuple[str, str]) -> None:
    run, image = block_cluster
    with BlockClient(run) as c:
        assert c.nodes()["disk0"].iothread == "io0" and c.node_size("null0") == 1 << 20
        c.write("disk0", 8192, b"\x11" * 8192)
        c.flush("disk0")
        assert c.read("disk0", 8192, 8192) == b"\x11" * 8192
        c.write_zeroes("disk0", 8192, 4096)
        c.discard("disk0", 12288, 4096)
        data = c.read("disk0", 8192, 8192)
        assert data[:4096] == bytes(4096)
        assert c.read("null0", 100, 10) == bytes(10)
        with pytest.raises(BlockIOError) as info:
            c.read("disk0", 8 << 20, 1)
        assert info.value.errno == errno.EINVAL and "out of range" in str(info.value)
        with pytest.raises(BlockIOError) as info:
            c.read("nosuch", 0, 1)
        assert info.value.errno == errno.ENODEV
        # Larger than a message may carry: refused at once, not sent to be dropped (no answer, ever).
        with pytest.raises(BlockIOError) as info:
            c.write("null0", 0, bytes((64 << 20) + 1))
        assert info.value.errno == errno.EINVAL and "exceeds the limit" in str(info.value)
        assert c.in_flight == 0
        c.write("disk0", 65536, b"on disk")
        c.flush("disk0")
    with open(image, "rb") as f:  # the data really is in the image
        f.seek(65536)
        assert f.read(7) == b"on disk"


def test_client_blocking_call_from_a_completion_callback(block_cluster: tuple[str, str]) -> None:
    """A completion callback (run inside the client channel's drain) makes a
    blocking call: its request leaves at once and its answer comes (it used to
    wait for the drain's end, that is for ever)."""
    run, _ = block_cluster
    with BlockClient(run, timeout_s=20) as c:
        c.write("disk0", 0, b"nested")
        got: list[bytes] = []

        def completed(status: int, message: str, data: bytes) -> None:
            assert status == 0, message
            got.append(data + c.read("disk0", 0, 6))

        c.submit("disk0", "read", 0, 3, callback=completed)  # the same node: the same channel
        poll_until(lambda: c.ctx.poll(True), lambda: got, "the completion", 20)
        assert got == [b"nes" + b"nested"]


def test_client_blocking_call_times_out(block_cluster: tuple[str, str]) -> None:
    """An iothread that does not answer (stopped): the blocking call raises
    TimeoutError after ``timeout_s``, instead of a poll that never returns."""
    run, _ = block_cluster
    with BlockClient(run, timeout_s=0.3) as c:
        pid = next(t.pid for t in c.state.iothreads if t.id == c.nodes()["null0"].iothread)
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError, match="did not complete in 0.3 s"):
                c.read("null0", 0, 4)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert c.read("null0", 0, 4) == bytes(4)  # and it goes on once the iothread does


def test_client_requests_to_an_iothread_that_dies_fail(block_cluster: tuple[str, str]) -> None:
    """Regression: requests in flight to an iothread that died waited for ever
    (callbacks) or for the timeout (blocking calls).  The client watches the
    connection: when it drops, they fail with EIO, and new ones fail at once."""
    run, _ = block_cluster
    with BlockClient(run, timeout_s=20) as c:
        assert c.read("null0", 0, 4) == bytes(4)  # connected
        pid = next(t.pid for t in c.state.iothreads if t.id == "io1")
        os.kill(pid, signal.SIGSTOP)  # they queue up, unanswered
        statuses: list[tuple[int, str]] = []
        reported: list[str] = []
        c.ctx.set_exception_handler(lambda ctx, exc, where: reported.append(where))

        def done(st: int, msg: str, d: bytes) -> None:
            statuses.append((st, msg))
            if len(statuses) == 1:
                raise RuntimeError("a buggy callback")  # must not strand the others

        for i in range(8):
            c.submit("null0", "read", i * 4096, 4096, callback=done)
        os.kill(pid, signal.SIGKILL)
        poll_until(lambda: c.ctx.poll(True, 100_000_000), lambda: len(statuses) >= 8,
                   lambda: f"8 failures, got {len(statuses)}", 20)
        assert statuses == [(-errno.EIO, "the connection to iothread io1 was lost")] * 8
        assert c.in_flight == 0 and len(reported) == 1
        with pytest.raises(BlockIOError) as info:
            c.read("null0", 0, 4)  # its node went with it
        assert info.value.errno in (errno.ENOTCONN, errno.ENODEV)
        assert c.read("disk0", 0, 4) == bytes(4)  # the other iothread still serves


def test_client_callbacks_and_awaitables_many_in_flight(block_cluster: tuple[str, str]) -> None:
    run, _ = block_cluster
    with AioContext(name="mine") as ctx, BlockClient(run, ctx) as c:
        statuses: list[int] = []
        for i in range(64):
            c.submit("disk0", "write", i * 4096, 4096, bytes([i]) * 4096,
                     lambda s, m, d: statuses.append(s))
        assert c.in_flight == 64
        poll_until(lambda: ctx.poll(True), lambda: len(statuses) >= 64, "64 completions")
        assert statuses == [0] * 64

        async def check() -> list[bytes]:
            await reschedule(ctx)
            return [await c.aread("disk0", i * 4096, 1) for i in range(0, 64, 9)]

        co = ctx.spawn(check())
        poll_until(lambda: ctx.poll(True), co.done, "the reads")
        assert co.result() == [bytes([i]) for i in range(0, 64, 9)]


def test_a_client_that_disconnects_mid_flight_leaks_nothing(block_cluster: tuple[str, str]) -> None:
    run, _ = block_cluster
    c = BlockClient(run)
    for i in range(200):
        c.submit("disk0", "write", (1 << 20) + (i % 64) * 4096, 4096, bytes(4096))
    c.close()  # gone with requests in flight
    with BlockClient(run) as other:  # the iothread still serves everyone else
        other.write("disk0", 0, b"still here")
        assert other.read("disk0", 0, 10) == b"still here"


@pytest.mark.parametrize("where", ["the channel's handler", "the connection's record", "the monitor's handler"])
def test_an_interrupt_while_a_connection_is_set_up_leaves_nothing_behind(block_cluster: tuple[str, str],
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           where: str) -> None:
    """Regression: Ctrl-C while the first request set up its connection (the
    example random_read.py, interrupted at its first submit) left a bottom half
    behind, and closing the client raised BottomHalfLeakError in place of the
    KeyboardInterrupt.  Now the interrupt comes out of the ``with`` as it came in."""
    run, _ = block_cluster
    client = BlockClient(run)
    real = client.ctx.set_fd_handler
    registrations = [0]

    def set_fd_handler(fd: int, *args: object, **kwargs: object) -> None:
        if args or kwargs:  # (a registration, not a removal)
            registrations[0] += 1
            if registrations[0] == {"the channel's handler": 1, "the monitor's handler": 2}.get(where):
                raise KeyboardInterrupt
        real(fd, *args, **kwargs)  # type: ignore[arg-type]

    def connection(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(client.ctx, "set_fd_handler", set_fd_handler)
    if where == "the connection's record":
        monkeypatch.setattr(_client, "_Connection", connection)
    with pytest.raises(KeyboardInterrupt), client:  # (its context closes on the way out: a leak raises there)
        client.read("disk0", 0, 10)
    assert client.ctx.closed
