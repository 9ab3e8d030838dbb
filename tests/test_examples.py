"""The examples run: each is started as a user would start it."""

from __future__ import annotations

import pathlib
import signal
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def test_main_loop_tour() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "main_loop_tour.py")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("listening on 127.0.0.1:"), first
        port = int(first.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30):
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "signalfd" in line:
                    break
        out = "".join(lines)
        assert "dispatch path:" in out
        # The path from the loop down to the accept callback, as a backtrace.
        path = [ln.split()[0] for ln in out.split("dispatch path:")[1].strip().splitlines()[:5]]
        assert path == ["run", "main_loop_wait", "dispatch", "dispatch", "vnc_listen_io"]
        assert f"TCP socket listening on 127.0.0.1:{port}" in out
        assert "notifier eventfd of AioContext 'qemu_aio_context'" in out
        assert "wakeup eventfd of MainContext" in out
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "SIGINT: quitting" in rest and "bye after" in rest
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
