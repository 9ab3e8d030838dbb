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
        path = [ln.split()[0] for ln in out.split("dispatch path:")[1].strip().splitlines()[:6]]
        assert path == ["run", "main_loop_wait", "_iterate", "_dispatch", "dispatch", "vnc_listen_io"]
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


def _run_example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_random_read_example() -> None:
    out = _run_example(str(EXAMPLES / "random_read.py"))
    assert out.returncode == 0, out.stderr
    assert "reads in 2 s" in out.stdout and "errors 0" in out.stdout


def test_verify_example() -> None:
    out = _run_example(str(EXAMPLES / "verify.py"))
    assert out.returncode == 0, out.stderr
    assert "256 blocks written and read back, 0 mismatches" in out.stdout


def test_bql_contention_example() -> None:
    out = _run_example(str(EXAMPLES / "bql_contention.py"), "--seconds", "0.5")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("(a) completions in the main loop") and lines[1].startswith("(b)")
    for line in lines:
        reads = float(line.split(":")[1].split("reads/s")[0].replace(",", ""))
        progress = float(line.split("vCPU progress")[1].split("loops/s")[0].replace(",", ""))
        assert reads > 0 and progress > 0
