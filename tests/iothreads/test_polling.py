"""Adaptive busy polling: the grow/shrink rule, io_poll before blocking, the
handlers that turn it off, parameters changed while running, counters."""

from __future__ import annotations

import select
import socket
import threading

import pytest

from iothreads import AioContext, EventNotifier, PollParams
from iothreads.aio._polling import POLL_START_NS, adjust_poll_ns


@pytest.mark.parametrize(
    ("poll_ns", "block_ns", "params", "expected"),
    [
        (0, 1_000, PollParams(32_768, 0, 0), POLL_START_NS),  # start at 4 us
        (4_000, 3_000, PollParams(32_768, 0, 0), 4_000),  # sweet spot: keep
        (4_000, 4_001, PollParams(32_768, 0, 0), 8_000),  # grow x2 by default
        (4_000, 5_000, PollParams(32_768, 3, 0), 12_000),  # poll-grow
        (16_000, 20_000, PollParams(20_000, 0, 0), 16_000),  # block == max: no room, keep
        (16_000, 19_000, PollParams(20_000, 0, 0), 20_000),  # grow, clamped
        (16_000, 40_000, PollParams(32_768, 0, 0), 0),  # too late: reset
        (16_000, 40_000, PollParams(32_768, 0, 4), 4_000),  # poll-shrink divides
        (32_768, 32_768, PollParams(32_768, 0, 0), 32_768),  # at max, in the window
    ],
)
def test_adjust_poll_ns(poll_ns: int, block_ns: int, params: PollParams, expected: int) -> None:
    assert adjust_poll_ns(poll_ns, block_ns, params) == expected


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_poll_params_are_validated(ctx: AioContext, bad: object) -> None:
    with pytest.raises(ValueError):
        ctx.set_poll_params(bad, 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ctx.poll_grow = bad  # type: ignore[assignment]
    assert ctx.poll_params == PollParams()


class PolledSource:
    """An eventfd-backed source whose pending work is also visible in user
    space, as a virtqueue is: ``io_poll`` sees it without a syscall."""

    def __init__(self, ctx: AioContext, with_poll: bool = True) -> None:
        self.ctx = ctx
        self.notifier = EventNotifier()
        self.work = 0
        self.handled = 0
        self.io_poll_calls = 0
        self.begins = 0
        self.ends = 0
        ctx.set_fd_handler(
            self.notifier.fileno(),
            io_read=self.on_read,
            io_poll=self.io_poll if with_poll else None,
            io_poll_ready=self.on_poll_ready if with_poll else None,
            io_poll_begin=self.on_begin,
            io_poll_end=self.on_end,
        )

    def io_poll(self) -> bool:
        self.io_poll_calls += 1
        return self.work > 0

    def on_read(self) -> None:
        self.notifier.test_and_clear()
        self.handled += self.work
        self.work = 0

    def on_poll_ready(self) -> None:
        self.handled += self.work
        self.work = 0

    def on_begin(self) -> None:
        self.begins += 1

    def on_end(self) -> None:
        self.ends += 1

    def kick(self) -> None:
        self.work += 1
        self.notifier.set()

    def close(self) -> None:
        self.ctx.set_fd_handler(self.notifier.fileno())
        self.notifier.close()


def test_busy_polling_finds_work_without_the_fd(ctx: AioContext) -> None:
    ctx.set_poll_params(1_000_000_000, 0, 0)  # a window large enough never to shrink here
    src = PolledSource(ctx)
    src.kick()  # first event through the fd: the handler joins the poll list
    assert ctx.poll(True)
    assert src.handled == 1
    [info] = [h for h in ctx.describe_handlers() if h["what"] == "handler"]
    assert info["poll_ns"] == POLL_START_NS
    # Work published in user space only, no eventfd write: a blocking poll
    # must find it by busy polling, or it would sleep forever.
    src.work = 1
    before = ctx.stats()
    assert ctx.poll(True)
    after = ctx.stats()
    assert src.handled == 2
    assert not src.notifier.test_and_clear()
    assert after.busy_poll_runs == before.busy_poll_runs + 1
    assert after.busy_poll_hits == before.busy_poll_hits + 1
    assert src.begins >= 1
    src.close()


def test_a_handler_without_io_poll_turns_busy_polling_off(ctx: AioContext) -> None:
    ctx.set_poll_params(1_000_000_000, 0, 0)
    src = PolledSource(ctx)
    src.kick()
    assert ctx.poll(True)
    plain = PolledSource(ctx, with_poll=False)
    runs = ctx.stats().busy_poll_runs
    src.kick()
    assert ctx.poll(True)
    assert ctx.stats().busy_poll_runs == runs
    plain.close()
    src.kick()
    ctx.poll(True)
    src.work = 1
    assert ctx.poll(True)  # polling is back once the handler is gone
    assert ctx.stats().busy_poll_runs > runs
    src.close()


def test_poll_max_ns_zero_disables_polling(ctx: AioContext) -> None:
    src = PolledSource(ctx)
    for _ in range(3):
        src.kick()
        assert ctx.poll(True)
    assert ctx.stats().busy_poll_runs == 0
    assert src.io_poll_calls == 0
    src.close()


def test_leaving_poll_mode_polls_once_more_and_calls_io_poll_end(ctx: AioContext) -> None:
    ctx.set_poll_params(1_000_000_000, 0, 0)
    src = PolledSource(ctx)
    src.kick()
    ctx.poll(True)
    src.work = 1
    ctx.poll(True)  # busy polls: poll mode started
    assert src.begins == 1 and src.ends == 0
    # Leaving poll mode happens before a wait with a non-zero timeout: make
    # one with a handler lacking io_poll (polling off) and a ready fd.
    plain = PolledSource(ctx, with_poll=False)
    plain.kick()
    ctx.poll(True)
    assert src.ends == 1
    plain.close()
    src.close()


def test_set_poll_params_resets_windows_and_wakes_the_loop(ctx: AioContext) -> None:
    ctx.set_poll_params(1_000_000_000, 0, 0)
    src = PolledSource(ctx)
    src.kick()
    ctx.poll(True)
    [info] = [h for h in ctx.describe_handlers() if h["what"] == "handler"]
    assert info["poll_ns"] > 0
    ctx.poll(False)

    t = threading.Thread(target=setattr, args=(ctx, "poll_max_ns", 64_000))
    t.start()
    ctx.poll(True)  # returns: the change notified the context
    t.join()
    assert ctx.poll_max_ns == 64_000 and ctx.poll_grow == 0
    [info] = [h for h in ctx.describe_handlers() if h["what"] == "handler"]
    assert info["poll_ns"] == 0
    ctx.poll_grow = 4
    ctx.poll_shrink = 2
    assert ctx.poll_params == PollParams(64_000, 4, 2)
    src.close()


def test_nested_poll_from_io_poll_ready_does_not_reenter(ctx: AioContext) -> None:
    """QEMU's test-nested-aio-poll: the handler leaves the poll list while its
    io_poll_ready runs, so a nested blocking poll cannot call it again."""
    ctx.set_poll_params(1_000_000, 2, 2)
    src = PolledSource(ctx)
    depth = []

    def ready_then_nest() -> None:
        depth.append(len(depth))
        if len(depth) == 1:
            ctx.bh_schedule_oneshot(lambda: None)
            ctx.poll(True)  # would recurse forever if io_poll still saw work
        src.handled += src.work
        src.work = 0

    src.on_poll_ready = ready_then_nest  # type: ignore[method-assign]
    ctx.set_fd_handler(
        src.notifier.fileno(), io_read=src.on_read, io_poll=src.io_poll, io_poll_ready=ready_then_nest
    )
    src.kick()
    ctx.poll(True)
    src.work = 1
    ctx.poll(True)
    assert depth == [0]
    assert src.handled == 2
    src.close()


def test_aio_max_batch(ctx: AioContext) -> None:
    ctx.set_aio_params(32)
    assert ctx.aio_max_batch == 32
    with pytest.raises(ValueError):
        ctx.set_aio_params(-1)


# Regression tests for fixed bugs: a handler found ready by busy polling and
# again by epoll (or by the last io_poll when leaving poll mode) was dispatched
# once per finding; QEMU's ready list holds each handler once.


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_a_handler_found_by_polling_and_by_epoll_runs_once(ctx: AioContext) -> None:
    """A is busy-polled; B (never dispatched, so not polled) makes the loop
    call epoll(0) too, which reports A again: one byte, one io_read."""
    ctx.set_poll_params(1_000_000, 0, 0)
    a_r, a_w = socket.socketpair()
    b_r, b_w = socket.socketpair()
    a_r.setblocking(False)
    reads: list[bytes] = []

    def a_read() -> None:
        try:
            reads.append(a_r.recv(1))
        except BlockingIOError:
            reads.append(b"EAGAIN")  # run with nothing to read

    ctx.set_fd_handler(a_r.fileno(), io_read=a_read, io_poll=lambda: _readable(a_r))
    ctx.set_fd_handler(b_r.fileno(), io_read=lambda: b_r.recv(1), io_poll=lambda: _readable(b_r))
    try:
        a_w.send(b"x")
        ctx.poll(True)  # dispatched through epoll: A joins the poll list
        assert reads == [b"x"]
        a_w.send(b"y")
        ctx.poll(True)
        assert reads == [b"x", b"y"]
    finally:
        ctx.set_fd_handler(a_r.fileno())
        ctx.set_fd_handler(b_r.fileno())
        for s in (a_r, a_w, b_r, b_w):
            s.close()


def test_an_event_racing_poll_end_is_dispatched_once(ctx: AioContext) -> None:
    """The event arrives in io_poll_end: the last io_poll finds it and epoll
    reports it too; the handler runs once, through io_read (epoll saw events)."""
    ctx.set_poll_params(1_000_000, 0, 0)
    r, w = socket.socketpair()
    r.setblocking(False)
    log: list[tuple[str, bytes]] = []
    inject = [False]

    def on_read() -> None:
        try:
            log.append(("io_read", r.recv(100)))
        except BlockingIOError:
            log.append(("io_read", b"EAGAIN"))

    def on_end() -> None:
        if inject[0]:
            inject[0] = False
            w.send(b"m")

    ctx.set_fd_handler(r.fileno(), io_read=on_read, io_poll=lambda: _readable(r),
                       io_poll_ready=lambda: log.append(("io_poll_ready", r.recv(100))), io_poll_end=on_end)
    try:
        w.send(b"1")
        ctx.poll(True)  # joins the poll list
        log.clear()
        inject[0] = True
        ctx.poll(True)  # busy-polls, finds nothing, leaves poll mode: the event races
        assert log == [("io_read", b"m")]
    finally:
        ctx.set_fd_handler(r.fileno())
        r.close()
        w.close()


@pytest.mark.parametrize("hook", ["io_poll", "io_poll_end"])
def test_a_raising_poll_hook_goes_to_the_exception_handler(ctx: AioContext, hook: str) -> None:
    """Like every callback's, its exception is reported and the loop goes on
    (it used to escape poll(), and from io_poll_end left notify_me raised)."""
    ctx.set_poll_params(1_000_000, 0, 0)
    reported: list[str] = []
    ctx.set_exception_handler(lambda c, exc, where: reported.append(where))
    n = EventNotifier()
    armed = [False]

    def bug() -> bool:
        if armed[0]:
            raise RuntimeError(f"{hook} bug")
        return False

    hooks = {"io_poll": bug} if hook == "io_poll" else {"io_poll": lambda: False, "io_poll_end": bug}
    ctx.set_fd_handler(n.fileno(), io_read=n.test_and_clear, **hooks)  # type: ignore[arg-type]
    try:
        n.set()
        ctx.poll(True)  # joins the poll list
        armed[0] = True
        n.set()
        assert ctx.poll(True) is True
        assert reported and all(where == f"{hook} of fd {n.fileno()}" for where in reported)
        assert ctx._notify_me == 0
    finally:
        ctx.set_fd_handler(n.fileno())
        n.close()
