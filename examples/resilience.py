"""Resilience, measured: SIGKILL of the launcher, again and again.

Usage: ``python examples/resilience.py [--repeats N] [--json PATH]``

Each repetition launches a cluster as a user would (``iothreads launch``:
two iothreads, a file node on each, an NBD server and an export, its
runtime directory made under a scratch ``$TMPDIR`` of this run), writes and
reads a block through the block client to see it serve, then kills the
launcher with SIGKILL, and waits, on pidfds (no polling), for its iothreads
and its janitor to exit.  Then it looks for what is left: processes whose
command line names the scratch directory, socket files and directories in
it (the image aside).  The table gives the counts (each must be 0) and how
long the iothreads and the janitor took to be gone after the kill (median
and worst).  ``--json PATH`` writes the same as JSON.  Exit status 1 if
anything was left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from iothreads import BlockClient

COMMAND = [sys.executable, "-m", "mainloop"]
READY_S = 30.0  # for a launcher to be ready
GONE_S = 10.0  # for a killed launcher's processes to be gone


def wait_exits(pids: list[int], timeout_s: float) -> list[int]:
    """Wait for every process of ``pids`` to exit (pidfds); those still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    alive = []
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                alive.append(pid)
        finally:
            os.close(pidfd)
    return alive


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def naming(scratch: str) -> list[int]:
    """Processes whose command line names ``scratch``."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if scratch.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def one_kill(scratch: str, image: str) -> dict[str, Any]:
    """One repetition; what it measured and found."""
    env = {**os.environ, "TMPDIR": scratch}
    argv = [*COMMAND, "launch", "--iothreads", "2", "--log-level", "warning",
            "--blockdev", f"driver=file,node-name=disk0,filename={image},iothread=io0",
            "--blockdev", f"driver=file,node-name=disk1,filename={image},iothread=io1",
            "--nbd-server", f"addr.type=unix,addr.path={os.path.join(scratch, 'nbd.sock')}",
            "--export", "type=nbd,id=exp0,node-name=disk0,writable=on"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        ready: dict[str, Any] = {}
        deadline = time.monotonic() + READY_S
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "READY":
                ready = event["data"]
                break
            if time.monotonic() > deadline:
                break
        if not ready:
            raise RuntimeError("the launcher did not become ready")
        with BlockClient(ready["runtime_dir"]) as client:
            client.write("disk0", 0, b"r" * 4096)
            assert client.read("disk1", 0, 4096) == b"r" * 4096  # (one image, two nodes)
        processes = children(proc.pid)  # its iothreads and its janitor
        killed_ns = time.monotonic_ns()
        proc.kill()
        proc.wait()
        alive = wait_exits(processes, GONE_S)
        gone_ms = (time.monotonic_ns() - killed_ns) / 1e6
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    left_processes = sorted(set(alive) | set(naming(scratch)))
    sockets, dirs = [], []
    for root, subdirs, files in os.walk(scratch):
        dirs += [os.path.join(root, d) for d in subdirs]
        sockets += [os.path.join(root, f) for f in files if stat.S_ISSOCK(os.lstat(os.path.join(root, f)).st_mode)]
    for pid in left_processes:  # (not to disturb the next repetitions)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return {"gone_ms": gone_ms, "processes": left_processes, "sockets": sockets, "dirs": dirs,
            "runtime_dir": ready["runtime_dir"], "processes_started": len(processes)}


def main() -> int:
    parser = argparse.ArgumentParser(description="SIGKILL of the launcher, repeated: what it leaves behind.")
    parser.add_argument("--repeats", type=int, default=100, help="repetitions (100)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    scratch = tempfile.mkdtemp(prefix="evres")  # short: socket paths live under it
    try:
        image = os.path.join(scratch, "disk.img")
        with open(image, "wb") as f:
            f.truncate(16 << 20)
        results = []
        interrupted: list[bool] = []
        progress = sys.stderr.isatty()
        # Ctrl-C ends the run after the repetition under way (its launchers are in sessions of their own).
        signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(True))
        print(f"SIGKILL launcher, {args.repeats} times", flush=True)
        for i in range(args.repeats):
            if interrupted:
                break
            try:
                results.append(one_kill(scratch, image))
            except RuntimeError as exc:
                if interrupted:  # (the Ctrl-C reached a launcher being started, before its setsid)
                    break
                print(f"resilience.py: {exc}", file=sys.stderr)
                return 1
            if progress:
                print(f"\r{i + 1}/{args.repeats}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if interrupted:
        print("resilience.py: interrupted", file=sys.stderr)
        return 130
    gone = [r["gone_ms"] for r in results]
    row = {
        "case": "SIGKILL launcher", "repetitions": len(results),
        "processes left": sum(len(r["processes"]) for r in results),
        "socket files left": sum(len(r["sockets"]) for r in results),
        "runtime dirs left": sum(1 for r in results if r["dirs"]),
        "all gone ms p50": round(statistics.median(gone), 1), "all gone ms max": round(max(gone), 1),
    }
    width = max(len(k) for k in row)
    for key, value in row.items():
        print(f"{key:<{width}}  {value}")
    bad = [r for r in results if r["processes"] or r["sockets"] or r["dirs"]]
    for r in bad[:5]:
        print(f"left behind: processes {r['processes']}, sockets {r['sockets']}, directories {r['dirs']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [row], "left_behind": bad}, f, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
