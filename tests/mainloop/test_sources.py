"""Signals through a signalfd, child watches through a pidfd, and the live view."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import pytest

from iothreads.testing import poll_until
from mainloop import IO_IN, MainContext, MainLoop, SignalSource, bql
from protocol import StateError

BOUND_S = 30.0


def test_signal_arrives_as_a_dispatch(context: MainContext) -> None:
    got: list[int] = []
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    src = SignalSource([signal.SIGUSR1, signal.SIGUSR2], lambda s: bool(got.append(s)) or True)
    context.attach(src)
    assert signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    # Thread-directed, so no other thread of the test process can take it.
    # Unblocked, SIGUSR1's default action would kill the process.
    me = threading.get_ident()
    signal.pthread_kill(me, signal.SIGUSR1)
    signal.pthread_kill(me, signal.SIGUSR2)
    poll_until(lambda: context.iteration(True), lambda: len(got) == 2, "both signals", BOUND_S)
    assert sorted(got) == [signal.SIGUSR1, signal.SIGUSR2]
    src.destroy()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_child_watch_reaps_and_reports_the_status(context: MainContext) -> None:
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "raise SystemExit(3)"], os.environ)
    statuses: list[tuple[int, int]] = []
    context.child_watch_add(pid, lambda p, status: statuses.append((p, os.waitstatus_to_exitcode(status))))
    poll_until(lambda: context.iteration(True), lambda: statuses, "the child's exit", BOUND_S)
    assert statuses == [(pid, 3)]
    assert context.sources() == []  # a child watch is done once the child is reaped


def test_child_killed_by_a_signal(context: MainContext) -> None:
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "import signal; signal.pause()"], os.environ)
    statuses: list[int] = []
    context.child_watch_add(pid, lambda p, status: statuses.append(os.waitstatus_to_exitcode(status)))
    os.kill(pid, signal.SIGKILL)
    poll_until(lambda: context.iteration(True), lambda: statuses, "the child's exit", BOUND_S)
    assert statuses == [-signal.SIGKILL]


def test_live_view_of_a_default_main_loop(loop: MainLoop) -> None:
    """The structure the source document analyses: the context's wakeup fd,
    the two AioContexts' eventfds, the signalfd, and a listening socket."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    loop.context.io_add_watch(srv.fileno(), IO_IN, lambda fd, c: True, name="listener")
    loop.context.attach(SignalSource([signal.SIGUSR1], lambda s: True))
    with bql():
        loop.main_loop_wait(True)
    view = loop.context.describe()
    kinds = {s.name: s.kind for s in view.sources}
    assert kinds == {"aio-context": "aio-context", "io-handler": "aio-context",
                     "listener": "fd-watch", "signals SIGUSR1": "signal"}
    roles = [f.role for f in view.fds]
    assert len(view.fds) == 5
    assert roles[0] == "wakeup eventfd of MainContext 'test'"
    assert "notifier eventfd of AioContext 'qemu_aio_context'" in roles
    assert "notifier eventfd of AioContext 'iohandler_ctx'" in roles
    assert "signalfd (SIGUSR1)" in roles
    port = srv.getsockname()[1]
    [listener] = [f for f in view.fds if f.source == "listener"]
    assert listener.kind == f"TCP socket listening on 127.0.0.1:{port}"
    text = str(view)
    assert "qemu_aio_context" in text and "signalfd" in text and f"127.0.0.1:{port}" in text
    assert view.as_dict()["context"] == "test"
    srv.close()


# Regression tests for review findings: after a callback raised (the context
# reports it and keeps the source), a periodic timeout fired at every
# iteration, the rest of a batch of signals was lost, and a child watch ran
# its callback a second time; sources made for a closed context leaked fds.


def test_a_raising_callback_leaves_its_source_sane(context: MainContext) -> None:
    reported: list[str] = []
    context.set_exception_handler(lambda c, exc, where: reported.append(where))

    fires: list[int] = []

    def tick() -> bool:
        fires.append(1)
        raise RuntimeError("timeout callback bug")

    sid = context.timeout_add(1, tick)
    poll_until(lambda: context.iteration(True), lambda: fires, "the timeout", BOUND_S)
    src = context.find_source_by_id(sid)
    assert src is not None and src.ready_time_ns > time.monotonic_ns()  # re-armed: due in an interval
    src.destroy()

    got: list[int] = []

    def on_signal(signo: int) -> bool:
        got.append(signo)
        if len(got) == 1:
            raise RuntimeError("signal callback bug")
        return True

    sig = SignalSource([signal.SIGUSR1, signal.SIGUSR2], on_signal)
    context.attach(sig)
    me = threading.get_ident()
    signal.pthread_kill(me, signal.SIGUSR1)
    signal.pthread_kill(me, signal.SIGUSR2)
    # The second, read in the same batch, comes too.
    poll_until(lambda: context.iteration(True), lambda: len(got) == 2, "both signals", BOUND_S)
    sig.destroy()

    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "raise SystemExit(7)"], os.environ)
    codes: list[int] = []

    def on_exit(p: int, status: int) -> None:
        codes.append(os.waitstatus_to_exitcode(status))
        raise RuntimeError("child watch callback bug")

    context.child_watch_add(pid, on_exit)
    poll_until(lambda: context.iteration(True), lambda: codes and not context.sources(), "the child's exit",
               BOUND_S)
    assert codes == [7]
    assert len(reported) == 3


def test_sources_made_for_a_closed_context_release_what_they_took() -> None:
    ctx = MainContext("closed")
    ctx.close()
    fds_before = len(os.listdir("/proc/self/fd"))
    mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], os.environ)
    try:
        for _ in range(5):
            with pytest.raises(StateError):
                ctx.signal_add([signal.SIGUSR2], lambda s: True)
            with pytest.raises(StateError):
                ctx.child_watch_add(pid, lambda p, s: None)
    finally:
        os.waitpid(pid, 0)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask_before


def test_two_sources_of_one_signal(context: MainContext) -> None:
    """Regression: destroying one of two sources of SIGUSR1 unblocked it while
    the other still watched it, and the next SIGUSR1 killed the process.  The
    last one to go restores the mask."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    got: list[str] = []
    a = SignalSource([signal.SIGUSR1], lambda s: bool(got.append("A")) or True)
    b = SignalSource([signal.SIGUSR1], lambda s: bool(got.append("B")) or True)
    context.attach(a)
    context.attach(b)
    a.destroy()
    assert signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
    poll_until(lambda: context.iteration(True), lambda: got, "the signal", BOUND_S)
    assert got == ["B"]
    b.destroy()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_signal_sources_in_two_threads_each_restore_their_own_mask(context: MainContext) -> None:
    """A mask is a thread's: sources of SIGUSR1 made in two threads, each
    destroyed in its own, leave SIGUSR1 unblocked in both (one used to stay
    blocked: the bookkeeping was process-wide)."""
    result: dict[str, bool] = {}
    b_made, a_done = threading.Event(), threading.Event()

    def in_b() -> None:
        src = SignalSource([signal.SIGUSR1], lambda s: True)
        b_made.set()
        assert a_done.wait(30)
        src.finalize()  # its own thread: restores its own mask
        result["b"] = signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])

    def in_a() -> None:
        src = SignalSource([signal.SIGUSR1], lambda s: True)
        assert b_made.wait(30)
        src.finalize()
        result["a"] = signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        a_done.set()

    threads = [threading.Thread(target=in_b), threading.Thread(target=in_a)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert result == {"a": False, "b": False}
