"""Resilience, measured: SIGKILL of the launcher, and of an iothread under load.

Usage: ``python examples/resilience.py [--launcher-repeats N] [--iothread-repeats M] [--json PATH]``

**SIGKILL launcher** (``--launcher-repeats``, 100): each repetition launches
a cluster as a user would (``iothreads launch``: two iothreads, a file node
on each, an NBD server and an export, its runtime directory made under a
scratch ``$TMPDIR`` of this run), writes and reads a block through the
block client to see it serve, then kills the launcher with SIGKILL, and
waits, on pidfds (no polling), for its iothreads and its janitor to exit.
Then it looks for what is left: processes whose command line names the
scratch directory, socket files and directories in it (the image aside).
Counts (each must be 0), and how long until all was gone.

**SIGKILL iothread** (``--iothread-repeats``, 20): one cluster with
``--restart``, a node on io0; the block client keeps 32 verified 4 KiB
writes in flight (each block's content names its generation; never two on
one block; a flush after every 64 acknowledgements).  Each repetition kills
io0 with SIGKILL mid-workload and measures how long until every request in
flight at the kill has completed (with success or an errno) and how long
until the node is served again (the first write sent after the kill that
succeeds); the workload then drains and flushes, and every block whose
write was acknowledged before a flush that succeeded is read back: a block
holding an older generation is a lost write.  Targets: no lost write, every
request settled within 2 s, served again within 1 s.

The table gives both rows, then whether the targets were met (times of
this machine: they do not make the exit status); ``--json PATH`` writes the
rows as JSON.  Exit status 1 if anything was left behind or a write was lost.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import select
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from iothreads import BlockClient

COMMAND = [sys.executable, "-m", "mainloop"]
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


def launch(scratch: str, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """``iothreads launch ARGS`` with its runtime directory under ``scratch``,
    in a session of its own: (the process, its READY event's data)."""
    env = {**os.environ, "TMPDIR": scratch}
    proc = subprocess.Popen([*COMMAND, "launch", "--log-level", "warning", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # (bounded: a launcher that cannot start exits)
        event = json.loads(line)
        if event["event"] == "READY":
            return proc, event["data"]
    proc.wait()
    raise RuntimeError(f"the launcher exited with status {proc.returncode} before it was ready")


def one_kill(scratch: str, image: str) -> dict[str, Any]:
    """One repetition; what it measured and found."""
    proc, ready = launch(scratch, "--iothreads", "2",
                         "--blockdev", f"driver=file,node-name=disk0,filename={image},iothread=io0",
                         "--blockdev", f"driver=file,node-name=disk1,filename={image},iothread=io1",
                         "--nbd-server", f"addr.type=unix,addr.path={os.path.join(scratch, 'nbd.sock')}",
                         "--export", "type=nbd,id=exp0,node-name=disk0,writable=on")
    try:
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


# -- SIGKILL of an iothread under a verified write workload --------------------------------------

BS = 4096
DEPTH = 32
BLOCKS = 1024
FLUSH_EVERY = 64
SETTLE_TARGET_MS = 2000.0
SERVED_TARGET_MS = 1000.0
STEP_S = 30.0  # bound on any wait of the workload (a request's errno comes much sooner)
BACKOFF_NS = 10_000_000  # after a failed request, before the next ones (no busy loop while the node is away)


def pattern(seed: int, block: int, generation: int) -> bytes:
    head = f"{block}:{generation}:{seed}:".encode()
    return (head * (BS // len(head) + 1))[:BS]


class Writes:
    """``DEPTH`` writes in flight to random blocks of ``node``, never two on
    one block; per block, the generation last acknowledged and the one a
    successful flush covered (what must be read back)."""

    def __init__(self, client: BlockClient, node: str, seed: int) -> None:
        self.client, self.node, self.seed = client, node, seed
        self.rng = random.Random(seed)
        self.sent = [0] * BLOCKS
        self.acked = [0] * BLOCKS
        self.durable = [0] * BLOCKS
        self.in_flight: dict[int, int] = {}  # block: the request's number
        self.number = 0  # requests sent so far
        self.since_flush = 0
        self.flushing = False
        self.errors: Counter[str] = Counter()
        self.completed: dict[int, int] = {}  # request number: when it completed (ns), for those watched
        self.first_ok_after: tuple[int, int] | None = None  # (number, ns): watched for a success at or after it

    def _write(self) -> None:
        free = [b for b in range(BLOCKS) if b not in self.in_flight]
        block = self.rng.choice(free)
        generation = self.sent[block] + 1
        number = self.number
        self.number += 1

        def done(status: int, message: str, data: bytes) -> None:
            del self.in_flight[block]
            now = time.monotonic_ns()
            if number in self.completed:
                self.completed[number] = now
            if status < 0:
                self.errors[errno.errorcode.get(-status, str(-status))] += 1
                return
            self.acked[block] = max(self.acked[block], generation)
            self.since_flush += 1
            if self.first_ok_after is not None and number >= self.first_ok_after[0] and not self.first_ok_after[1]:
                self.first_ok_after = (self.first_ok_after[0], now)
        try:
            self.client.submit(self.node, "write", block * BS, BS, pattern(self.seed, block, generation),
                               callback=done)
        except OSError as exc:  # (BlockIOError: refused at once, nothing sent)
            self.errors[errno.errorcode.get(exc.errno or 0, type(exc).__name__)] += 1
            return
        self.sent[block] = generation
        self.in_flight[block] = number

    def _flush(self) -> None:
        covered = list(self.acked)
        self.flushing = True
        self.since_flush = 0

        def done(status: int, message: str, data: bytes) -> None:
            self.flushing = False
            if status < 0:
                self.errors[f"flush {errno.errorcode.get(-status, str(-status))}"] += 1
                return
            for block, generation in enumerate(covered):
                self.durable[block] = max(self.durable[block], generation)
        try:
            self.client.submit(self.node, "flush", callback=done)
        except OSError:
            self.flushing = False

    def run(self, until: Callable[[], bool], more: bool = True) -> bool:
        """Keep the workload going (``more``: new requests) until ``until()``; False after STEP_S."""
        deadline = time.monotonic() + STEP_S
        while not until():
            if time.monotonic() > deadline:
                return False
            failed = sum(self.errors.values())
            if more:
                if self.since_flush >= FLUSH_EVERY and not self.flushing:
                    self._flush()
                while len(self.in_flight) < DEPTH and sum(self.errors.values()) == failed:
                    self._write()
            self.client.ctx.poll(True, 50_000_000)
            if sum(self.errors.values()) != failed:  # (the node is away: a client backs off a little)
                self.client.ctx.poll(True, BACKOFF_NS)
        return True

    def lost(self) -> list[int]:
        """The blocks that do not hold their durable generation, or a later one sent."""
        lost = []
        for block, durable in enumerate(self.durable):
            if durable:
                data = self.client.read(self.node, block * BS, BS)
                head = data.split(b":", 2)
                generation = int(head[1]) if len(head) == 3 and head[0] == str(block).encode() else -1
                if not durable <= generation <= self.sent[block] or data != pattern(self.seed, block, generation):
                    lost.append(block)
        return lost


def io0_pid(runtime_dir: str) -> int:
    with open(os.path.join(runtime_dir, "cluster.json")) as f:
        state = json.load(f)
    return int(next(t["pid"] for t in state["iothreads"] if t["id"] == "io0"))


def iothread_kills(scratch: str, image: str, repeats: int, interrupted: list[bool]) -> dict[str, Any]:
    """The SIGKILL iothread case: its row.  A cluster of its own for each
    repetition: an iothread that dies again within 10 s of its start is
    restarted later and later (the launcher's crash-loop back-off), which a
    faster series of kills on one cluster would measure instead."""
    settle_ms: list[float] = []
    served_ms: list[float] = []
    lost = acknowledged = 0
    errors: Counter[str] = Counter()
    for rep in range(repeats):
        if interrupted:
            break
        proc, ready = launch(scratch, "--iothreads", "1", "--restart",
                             "--blockdev", f"driver=file,node-name=disk0,filename={image},iothread=io0")
        try:
            with BlockClient(ready["runtime_dir"], timeout_s=STEP_S) as client:
                writes = Writes(client, "disk0", rep)
                writes.run(lambda: sum(1 for g in writes.acked if g) >= 4 * DEPTH)  # a workload under way
                watched = set(writes.in_flight.values())
                writes.completed = dict.fromkeys(watched, 0)
                os.kill(io0_pid(ready["runtime_dir"]), signal.SIGKILL)
                killed_ns = time.monotonic_ns()
                writes.first_ok_after = (writes.number, 0)
                settled = writes.run(lambda: all(writes.completed[n] for n in watched))
                served = writes.run(lambda: writes.first_ok_after is not None and writes.first_ok_after[1] > 0)
                settle_ms.append(max([writes.completed[n] - killed_ns for n in watched] or [0]) / 1e6
                                 if settled else STEP_S * 1000)
                assert writes.first_ok_after is not None
                served_ms.append((writes.first_ok_after[1] - killed_ns) / 1e6 if served else STEP_S * 1000)
                writes.run(lambda: not writes.in_flight and not writes.flushing, more=False)
                if writes.since_flush:
                    writes._flush()
                    writes.run(lambda: not writes.flushing, more=False)
                lost += len(writes.lost())
                acknowledged += sum(1 for g in writes.acked if g)
                errors += writes.errors
        finally:
            proc.terminate()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    return {"case": "SIGKILL iothread", "repetitions": len(settle_ms), "writes lost": lost,
            "in flight settled ms max": round(max(settle_ms, default=0), 1),
            "served again ms p50": round(statistics.median(served_ms), 1) if served_ms else 0,
            "served again ms max": round(max(served_ms, default=0), 1),
            "blocks acknowledged": acknowledged, "errors": dict(errors)}


def print_row(row: dict[str, Any]) -> None:
    width = max(len(k) for k in row)
    for key, value in row.items():
        print(f"{key:<{width}}  {value}")
    print()


def main() -> int:
    parser = argparse.ArgumentParser(description="SIGKILL of the launcher and of an iothread, repeated: what is "
                                     "left behind, what is lost, how long the way back takes.")
    parser.add_argument("--launcher-repeats", type=int, default=100, help="launchers killed (100)")
    parser.add_argument("--iothread-repeats", type=int, default=20, help="iothreads killed under load (20)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args()
    if args.launcher_repeats < 0 or args.iothread_repeats < 0:
        parser.error("repeats must be >= 0")
    scratch = tempfile.mkdtemp(prefix="evres")  # short: socket paths live under it
    interrupted: list[bool] = []
    try:
        image, load_image = os.path.join(scratch, "disk.img"), os.path.join(scratch, "load.img")
        for path in (image, load_image):
            with open(path, "wb") as f:
                f.truncate(16 << 20)
        results = []
        progress = sys.stderr.isatty()
        # Ctrl-C ends the run after the repetition under way (its launchers are in sessions of their own).
        signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(True))
        print(f"SIGKILL launcher, {args.launcher_repeats} times; SIGKILL iothread, {args.iothread_repeats} times",
              flush=True)
        for i in range(args.launcher_repeats):
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
                print(f"\r{i + 1}/{args.launcher_repeats}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        iothread_row = None
        if args.iothread_repeats and not interrupted:
            try:
                iothread_row = iothread_kills(scratch, load_image, args.iothread_repeats, interrupted)
            except RuntimeError as exc:
                if not interrupted:
                    print(f"resilience.py: {exc}", file=sys.stderr)
                    return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if interrupted:
        print("resilience.py: interrupted", file=sys.stderr)
        return 130
    rows = []
    bad = [r for r in results if r["processes"] or r["sockets"] or r["dirs"]]
    if results:
        gone = [r["gone_ms"] for r in results]
        rows.append({
            "case": "SIGKILL launcher", "repetitions": len(results),
            "processes left": sum(len(r["processes"]) for r in results),
            "socket files left": sum(len(r["sockets"]) for r in results),
            "runtime dirs left": sum(1 for r in results if r["dirs"]),
            "all gone ms p50": round(statistics.median(gone), 1), "all gone ms max": round(max(gone), 1),
        })
    lost = False
    if iothread_row is not None:
        rows.append(iothread_row)
        lost = iothread_row["writes lost"] > 0
    for row in rows:
        print_row(row)
    for r in bad[:5]:
        print(f"left behind: processes {r['processes']}, sockets {r['sockets']}, directories {r['dirs']}")
    if iothread_row is not None:  # (the times are this machine's: printed, not the exit status)
        for what, key, bound in (("requests in flight settled", "in flight settled ms max", SETTLE_TARGET_MS),
                                 ("node served again", "served again ms max", SERVED_TARGET_MS)):
            met = iothread_row[key] <= bound
            print(f"target: {what} within {bound:.0f} ms: {iothread_row[key]} ms, {'met' if met else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "left_behind": bad}, f, indent=2)
    return 1 if bad or lost else 0


if __name__ == "__main__":
    sys.exit(main())
