"""MainLoop: main_loop_wait's three steps, the BQL around the poll, the two
AioContexts as sources, the nested-poll firewall, main-loop timers, run/quit."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from iothreads import ClockType
from iothreads.testing import poll_until
from mainloop import IO_IN, MainLoop, bql, bql_locked
from protocol import StateError

BOUND_S = 30.0


def test_another_thread_takes_the_bql_while_the_loop_polls(loop: MainLoop) -> None:
    """The vCPU thread can only get the BQL while the loop sits in its poll;
    what it schedules then runs in the loop, under the BQL."""
    took_it = threading.Event()
    held: list[bool] = []

    def vcpu() -> None:
        with bql():
            took_it.set()
            loop.run_in_main_loop(lambda: held.append(bql_locked()))
        loop.run_in_main_loop(loop.quit)

    t = threading.Thread(target=vcpu)
    t.start()
    loop.run()  # returns only once the vCPU thread got the lock and asked to quit
    t.join()
    assert took_it.is_set()
    assert held == [True]
    assert not bql_locked()


def test_every_kind_of_callback_runs_under_the_bql(loop: MainLoop) -> None:
    held_in: dict[str, bool] = {}
    a, b = socket.socketpair()
    c, d = socket.socketpair()

    def record(name: str) -> None:
        held_in[name] = bql_locked()

    def fd_watch(fd: int, cond: int) -> bool:
        record("fd watch")
        a.recv(10)
        return False

    def iohandler() -> None:
        record("iohandler fd")
        c.recv(10)
        loop.set_fd_handler(c.fileno())

    loop.context.io_add_watch(a.fileno(), IO_IN, fd_watch)
    loop.set_fd_handler(c.fileno(), io_read=iohandler)
    loop.context.idle_add(lambda: bool(record("idle")) or False)
    loop.context.timeout_add(0, lambda: bool(record("timeout")) or False)
    loop.aio_context.timer_new_ns(ClockType.REALTIME, lambda: record("aio timer")).mod_ns(0)
    loop.timer_new_ns(ClockType.REALTIME, lambda: record("main-loop timer")).mod_ns(0)
    loop.run_in_main_loop(lambda: record("bottom half"))
    b.send(b"x")
    d.send(b"y")
    with bql():
        poll_until(loop.main_loop_wait, lambda: len(held_in) == 7, "every kind of callback", BOUND_S)
    assert held_in == dict.fromkeys(
        ["fd watch", "iohandler fd", "idle", "timeout", "aio timer", "main-loop timer", "bottom half"], True
    )
    for s in (a, b, c, d):
        s.close()


def test_bottom_half_from_another_thread_wakes_the_main_loop(loop: MainLoop) -> None:
    with bql():
        loop.main_loop_wait(True)  # settle the set-up notifications
    t = threading.Thread(target=loop.aio_context.bh_schedule_oneshot, args=(loop.quit,))
    t.start()
    loop.run()
    t.join()
    assert not loop.running


def test_quit_from_another_thread(loop: MainLoop) -> None:
    t = threading.Thread(target=loop.quit)
    loop.context.idle_add(lambda: bool(t.start()) or False)
    loop.run()
    t.join()
    assert not loop.running


def test_nested_poll_of_the_main_aio_context_never_dispatches_iohandler_work(loop: MainLoop) -> None:
    a, b = socket.socketpair()
    order: list[str] = []

    def iohandler() -> None:
        order.append("iohandler")
        a.recv(10)
        loop.set_fd_handler(a.fileno())

    def block_layer_wait() -> None:
        # A BH of the main AioContext waiting with nested polls, as AIO_WAIT_WHILE does.
        order.append("nested start")
        loop.aio_context.bh_schedule_oneshot(lambda: order.append("inner bh"))
        while loop.aio_context.poll(False):
            pass
        order.append("nested end")

    loop.set_fd_handler(a.fileno(), io_read=iohandler)
    b.send(b"x")
    loop.run_in_main_loop(block_layer_wait)
    with bql():
        poll_until(loop.main_loop_wait, lambda: "iohandler" in order, "the iohandler", BOUND_S)
    assert order.index("nested end") < order.index("iohandler")
    assert order[:3] == ["nested start", "inner bh", "nested end"]
    a.close()
    b.close()


def test_main_loop_timer_bounds_the_poll(loop: MainLoop) -> None:
    fired: list[int] = []
    t = loop.timer_new_ms(ClockType.REALTIME, lambda: (fired.append(time.monotonic_ns()), loop.quit()))
    t.mod(t.now() + 10)
    expire = t.expire_time_ns
    loop.run()  # nothing else would ever wake it
    assert fired and fired[0] >= expire


def test_main_loop_wait_requires_the_bql(loop: MainLoop) -> None:
    with pytest.raises(StateError, match="BQL"):
        loop.main_loop_wait(True)


def test_close_reports_leaked_bottom_halves() -> None:
    ml = MainLoop(name="leaky")
    ml.aio_context.bh_new(lambda: None, "never-deleted")
    with pytest.raises(StateError, match="never-deleted"):
        ml.close()


def test_a_bottom_half_waiting_with_a_nested_poll_does_not_run_a_handler_twice(loop: MainLoop) -> None:
    """Regression (QEMU's AIO_WAIT_WHILE pattern): in one dispatch of the main
    AioContext as a source, a BH polls the context; the nested poll runs an fd
    handler that the main loop had found ready, and the outer dispatch ran it
    again from its stale list (a read on an empty fd).  QEMU clears a handler's
    revents when it dispatches it: one call."""
    import os

    r, w = os.pipe()
    os.set_blocking(r, False)
    calls: list[bytes] = []
    ctx = loop.aio_context

    def on_read() -> None:
        try:
            calls.append(os.read(r, 1))
        except BlockingIOError:
            calls.append(b"EAGAIN")

    ctx.set_fd_handler(r, on_read)
    try:
        os.write(w, b"x")
        ctx.bh_schedule_oneshot(lambda: ctx.poll(False))  # a nested poll of the main AioContext
        with bql():
            loop.main_loop_wait(True)
        assert calls == [b"x"]
    finally:
        ctx.set_fd_handler(r)
        os.close(r)
        os.close(w)
