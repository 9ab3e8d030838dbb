"""fd handlers and event notifiers: level-triggered dispatch, changes during
dispatch, cross-thread registration, large fd numbers, errors."""

from __future__ import annotations

import logging
import os
import resource
import socket
import threading
from collections.abc import Iterator

import pytest

from iothreads import AioContext, EventNotifier
from iothreads.testing import poll_until, run_until_idle
from protocol import StateError


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_read_handler_runs_when_readable(ctx: AioContext, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    got: list[bytes] = []
    ctx.set_fd_handler(a.fileno(), io_read=lambda: got.append(a.recv(100)))
    run_until_idle(ctx)
    assert got == [] and ctx.poll(False) is False
    b.send(b"hello")
    assert ctx.poll(True) is True
    assert got == [b"hello"]
    ctx.set_fd_handler(a.fileno())
    b.send(b"again")
    assert ctx.poll(False) is False
    assert got == [b"hello"]
    assert not ctx.has_fd_handler(a.fileno())


def test_handlers_are_level_triggered(ctx: AioContext, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    calls = []
    ctx.set_fd_handler(a.fileno(), io_read=lambda: calls.append(a.recv(1)))
    b.send(b"abc")
    for _ in range(3):
        assert ctx.poll(True)
    assert calls == [b"a", b"b", b"c"]
    assert ctx.poll(False) is False
    ctx.set_fd_handler(a.fileno())


def test_write_handler(ctx: AioContext, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    wrote = []

    def on_writable() -> None:
        wrote.append(a.send(b"x"))
        ctx.set_fd_handler(a.fileno())  # one write is enough: remove ourselves

    ctx.set_fd_handler(a.fileno(), io_write=on_writable)
    assert ctx.poll(True)
    assert wrote == [1] and b.recv(10) == b"x"
    assert ctx.poll(False) is False


def test_hangup_calls_io_read(ctx: AioContext, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    seen = []

    def on_read() -> None:
        seen.append(a.recv(10))
        ctx.set_fd_handler(a.fileno())

    ctx.set_fd_handler(a.fileno(), io_read=on_read)
    b.close()
    assert ctx.poll(True)
    assert seen == [b""]


def test_handler_removes_a_ready_sibling_during_dispatch(ctx: AioContext) -> None:
    """Both fds are ready in the same poll; whichever runs first removes the
    other, which must then not be called."""
    p1, p2 = socket.socketpair(), socket.socketpair()
    calls: list[str] = []
    fds = {"one": p1[0].fileno(), "two": p2[0].fileno()}

    def make(me: str, other: str) -> object:
        def handler() -> None:
            calls.append(me)
            ctx.set_fd_handler(fds[other])
            ctx.set_fd_handler(fds[me])
        return handler

    ctx.set_fd_handler(fds["one"], io_read=make("one", "two"))  # type: ignore[arg-type]
    ctx.set_fd_handler(fds["two"], io_read=make("two", "one"))  # type: ignore[arg-type]
    p1[1].send(b"x")
    p2[1].send(b"y")
    assert ctx.poll(True)
    assert len(calls) == 1
    assert ctx.poll(False) is False
    for s in (*p1, *p2):
        s.close()


def test_handler_replaces_itself_and_adds_another_during_dispatch(
    ctx: AioContext, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    log: list[str] = []
    note = EventNotifier()

    def first() -> None:
        log.append("first:" + a.recv(1).decode())
        ctx.set_fd_handler(a.fileno(), io_read=second)
        ctx.set_event_notifier(note, lambda n: (n.test_and_clear(), log.append("note")))
        note.set()

    def second() -> None:
        log.append("second:" + a.recv(1).decode())

    ctx.set_fd_handler(a.fileno(), io_read=first)
    b.send(b"12")
    run_until_idle(ctx)
    assert log[0] == "first:1"
    assert sorted(log[1:]) == ["note", "second:2"]
    ctx.set_fd_handler(a.fileno())
    ctx.set_event_notifier(note, None)
    note.close()


def test_set_fd_handler_from_another_thread_wakes_the_loop(
    ctx: AioContext, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    got = threading.Event()
    b.send(b"z")
    ctx.poll(False)

    def register() -> None:
        ctx.set_fd_handler(a.fileno(), io_read=lambda: (a.recv(1), got.set()))

    t = threading.Thread(target=register)
    t.start()
    # One poll may return for the notify alone.
    poll_until(lambda: ctx.poll(True), got.is_set, "the handler registered from another thread", max_steps=5)
    t.join()
    ctx.set_fd_handler(a.fileno())


def test_fd_numbers_above_1024(ctx: AioContext, pair: tuple[socket.socket, socket.socket]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1500
    if soft <= target:
        if hard != resource.RLIM_INFINITY and hard <= target:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} does not allow fd {target}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (target + 10, hard))
    a, b = pair
    high = os.dup2(a.fileno(), target)
    try:
        got = []
        ctx.set_fd_handler(high, io_read=lambda: got.append(os.read(high, 10)))
        b.send(b"high")
        assert ctx.poll(True)
        assert got == [b"high"]
        ctx.set_fd_handler(high)
    finally:
        os.close(high)


def test_bad_fds_are_refused_without_damage(ctx: AioContext) -> None:
    with pytest.raises(ValueError):
        ctx.set_fd_handler(-1, io_read=lambda: None)
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(OSError):
        ctx.set_fd_handler(r, io_read=lambda: None)
    os.close(w)
    assert not ctx.has_fd_handler(r)
    assert ctx.poll(False) is False
    with pytest.raises(ValueError):
        ctx.set_fd_handler(ctx.notifier.fileno(), io_read=lambda: None)


def test_removing_an_unknown_fd_is_a_no_op(ctx: AioContext) -> None:
    before = ctx.stats().notifies
    ctx.set_fd_handler(12345)
    assert ctx.stats().notifies == before


def test_event_notifier_semantics() -> None:
    n = EventNotifier()
    assert n.test_and_clear() is False
    n.set()
    n.set()
    assert n.test_and_clear() is True
    assert n.test_and_clear() is False
    with EventNotifier(active=True) as m:
        assert m.test_and_clear() is True
    assert m.closed
    n.close()
    n.close()  # idempotent
    with pytest.raises(StateError):
        n.set()
    with pytest.raises(StateError):
        n.fileno()


def test_event_notifier_handler_runs_once_per_set(ctx: AioContext) -> None:
    n = EventNotifier()
    calls = []
    ctx.set_event_notifier(n, lambda e: calls.append(e.test_and_clear()))
    assert ctx.poll(False) is False
    n.set()
    assert ctx.poll(False) is True
    assert calls == [True]
    assert ctx.poll(False) is False
    ctx.set_event_notifier(n, None)
    n.set()
    assert ctx.poll(False) is False
    assert calls == [True]
    n.close()


def test_a_raising_handler_is_logged_and_the_loop_goes_on(
    pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair
    ran_after = []
    with AioContext(name="lenient") as c:
        def boom() -> None:
            a.recv(10)
            raise RuntimeError("handler failed")

        c.set_fd_handler(a.fileno(), io_read=boom)
        b.send(b"x")
        c.bh_schedule_oneshot(lambda: ran_after.append(1))
        with caplog.at_level(logging.ERROR, logger="iothreads"):
            assert c.poll(True)
        assert ran_after == [1]
        assert "handler failed" in caplog.text and "io_read of fd" in caplog.text
        c.set_fd_handler(a.fileno())


def test_with_a_raising_exception_handler_the_error_leaves_poll(
    ctx: AioContext, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair

    def boom() -> None:
        a.recv(10)
        raise KeyError("k")

    ctx.set_fd_handler(a.fileno(), io_read=boom)
    b.send(b"x")
    with pytest.raises(KeyError):
        ctx.poll(True)
    ctx.set_fd_handler(a.fileno())
    assert ctx.poll(False) is False
