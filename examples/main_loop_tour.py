"""A tour of the main loop, after the source document's VNC example.

A main loop with a listening TCP socket (the document's VNC listener on
127.0.0.1, any free port), a signal source for SIGINT/SIGTERM and a one-second
timer.  When a client connects, the accept callback prints how it was reached
(the Python stack from the loop down to the callback, as the document shows a
debugger backtrace in ``vnc_listen_io``) and the live view of the loop: every
source and every polled fd.  Ctrl-C (SIGINT) ends it cleanly: one line,
exit status 130 (SIGTERM: 143).

    python examples/main_loop_tour.py        # then: nc 127.0.0.1 PORT
"""

from __future__ import annotations

import signal
import socket
import sys
import traceback

from iothreads import ClockType
from mainloop import IO_IN, MainLoop


def dispatch_path() -> str:
    """The stack from ``MainLoop.run`` down to the caller, innermost last."""
    frames = traceback.extract_stack()[:-1]
    start = next((i for i, f in enumerate(frames) if f.name == "run"), 0)
    return "\n".join(f"  {f.name:<22} {f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                     for f in frames[start:])


def main() -> int:
    loop = MainLoop(name="tour")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    clients: list[socket.socket] = []

    def vnc_listen_io(fd: int, condition: int) -> bool:
        conn, peer = listener.accept()
        clients.append(conn)
        print(f"client {peer[0]}:{peer[1]} connected; dispatch path:")
        print(dispatch_path())
        print()
        print(loop.context.describe())
        sys.stdout.flush()
        return True

    quit_by = 0

    def on_signal(signum: int) -> bool:
        nonlocal quit_by
        quit_by = signum
        loop.quit()
        return True

    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        timer.mod(timer.now() + 1000)

    loop.context.io_add_watch(listener.fileno(), IO_IN, vnc_listen_io, name="vnc-listen")
    loop.context.signal_add([signal.SIGINT, signal.SIGTERM], on_signal, name="signals")
    timer = loop.timer_new_ms(ClockType.REALTIME, tick, name="tick")
    timer.mod(timer.now() + 1000)
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    try:
        loop.run()
    finally:
        timer.delete()
        for c in clients:
            c.close()
        listener.close()
        loop.close()
    how = "interrupted" if quit_by == signal.SIGINT else signal.Signals(quit_by).name
    print(f"main_loop_tour.py: {how} after {ticks} ticks", file=sys.stderr)
    return 128 + quit_by


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the loop watches for it
        print("main_loop_tour.py: interrupted", file=sys.stderr)
        sys.exit(130)
