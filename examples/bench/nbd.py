"""NBD exports against qemu-storage-daemon: the same clients on the same page-cached raw file.

Usage: ``python examples/bench/nbd.py [--repeats N] [--warmup N] [--seconds S] [--size-mib M] [--json PATH]``

Four servers export a raw image (``--size-mib``, 1 GiB by default; data
all through, no holes) over a Unix socket, in one run:

ours
    ``iothreads launch --iothreads 1`` with the image as a ``file`` node,
    ``--nbd-server`` and ``--export type=nbd,...,writable=on``: the main
    loop negotiates, the iothread serves every request.
qsd aio=threads
    qemu-storage-daemon with one iothread: ``--object iothread,id=io0``,
    ``--blockdev driver=file,aio=threads,cache.direct=off``, ``--export
    type=nbd,...,writable=on,iothread=io0``.  The ratios are against it.
qsd aio=io_uring
    the same with ``aio=io_uring`` (left out, with a note, where the daemon
    cannot have io_uring).
bare Python loop
    ``bare_loop`` below, about 100 lines: protocol.nbd's handshake
    (``NbdServerHandshake``), then a loop of its own, written bare: epoll,
    one ``recv``, every complete request in it parsed with ``struct``,
    ``os.pread``/``os.pwrite``, all the replies in one ``sendmsg``.  No
    framework: the floor of what Python does here.

The same clients drive each, one run after the other (ours, qsd, qsd
io_uring, bare loop, then again: the medians of interleaved repeats):

* ``qemu-img bench`` 4 KiB reads and writes (``-w``) at depth 1 and 32
  (``-d``), its offsets a stride of 100,003 blocks (``-S``: a prime, so
  that every block comes in turn, scattered); a number of requests taking
  about ``--seconds``;
* fio's nbd engine: ``randread`` and ``randwrite``, 4 KiB, ``iodepth`` 1
  and 32, for ``--seconds``;
* ``nbdcopy`` of the whole image to ``null:`` with 1 and 4 connections,
  from a read-only export (qemu-storage-daemon 7.2 offers multi-conn, which
  nbdcopy needs for more than one connection, on read-only exports only);
* two exports on two iothreads driven at once: a second image, in a
  second iothread (ours: a cluster of two; qsd: ``io1``; the bare loop: a
  second process), ``qemu-img bench -d 32`` reads through a ``quorum`` of
  both exports (each read goes to both, 32 in flight on each; a client
  that closes both connections only at the end, see below).

Depth-1 rows give the latency (the time per request as the client sees it:
1/IOPS); depth-32 rows the IOPS; nbdcopy its throughput (image size over
the run's wall time).  The images are read through before each run so that
every side reads the page cache.

qemu-storage-daemon 7.2 (Debian 12's) aborts when a client leaves an export
bound to an iothread (an assertion in ``nbd_blockdev_client_closed``).  So
each run against qsd gets a daemon of its own, started for it; the qsd rows
of fio come from a daemon whose export has no iothread (in its main loop,
which survives the probe: fio's nbd engine connects once to learn the size
before its real connection); nbdcopy with 4 connections takes the daemon
down when it closes its first connection, after the copy, and the others'
``nbd_shutdown`` then fails: taken as the end of a complete copy.  Ours and
the bare loop survive their clients: one of each serves a whole run.

Targets (ratios in the same run, against qsd aio=threads): QD32 random read
IOPS >= 2.0x with fio and >= 1.3x with qemu-img bench; QD32 random write
IOPS >= 1.0x; QD1 latency <= 1.0x; nbdcopy throughput >= 0.7x.  Against the
bare loop: >= 0.6x of its QD32 IOPS with fio, <= 1.3x its QD1 latency.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from _common import (  # noqa: E402
    Better, Row, cpu_note, launched, measure, print_table, rows_for, run, scratch_dir, warm, write_image,
    write_json,
)

from iothreads import set_parent_death_signal  # noqa: E402
from iothreads.testing import wait_until  # noqa: E402
from protocol.nbd import (  # noqa: E402
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_EINVAL,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NbdExport,
    NbdHandshakeState,
    NbdServerHandshake,
    generic_reply,
)

BS = 4096
DEPTH = 32
STRIDE_BLOCKS = 100_003  # qemu-img bench's step, in blocks: a prime, coprime with the block counts here
START_S = 30.0  # bound on a server's start
STOP_S = 30.0  # bound on a server's exit once told to stop
CLIENT_SLACK_S = 120.0  # bound on a client's run beyond the time it is asked for
MiB = 1 << 20

OURS = "ours"
QSD = "qsd aio=threads"
QSD_URING = "qsd aio=io_uring"
BARE = "bare Python loop"

# Server kinds: what a run needs exported.
RW = "rw"  # one writable export (qsd: bound to its iothread)
FIO = "fio"  # one writable export (qsd: in its main loop, which survives fio's probe)
RO = "ro"  # one read-only export (qsd: bound to its iothread, offers multi-conn)
PAIR = "pair"  # two writable exports of two images, in two iothreads


class BenchError(Exception):
    """A server or a client failed: the run cannot go on."""


def uri(sock: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


# -- processes ------------------------------------------------------------------------------

def _child_setup() -> None:
    """In a child, before exec: no core file (qemu-storage-daemon 7.2 aborts
    when a client leaves; a core would land in the scratch directory), and
    SIGTERM when this process dies."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    set_parent_death_signal()


@contextlib.contextmanager
def process(argv: list[str], what: str, **popen: Any) -> Iterator[subprocess.Popen[str]]:
    """A server process, in a session of its own (Ctrl-C at the terminal
    reaches this process only, which stops it); stopped (SIGTERM, SIGKILL
    after ``STOP_S``) and reaped on the way out."""
    try:
        proc = subprocess.Popen(argv, text=True, start_new_session=True, preexec_fn=_child_setup, **popen)
    except OSError as exc:
        raise BenchError(f"{what} could not be started: {exc}") from None
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.communicate(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def client(argv: list[str], timeout_s: float, cwd: str) -> subprocess.CompletedProcess[str]:
    """A client's run, in a session of its own; killed and reaped if this
    process is interrupted (``subprocess.run`` does that)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=cwd,
                              start_new_session=True, preexec_fn=_child_setup)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} did not finish within {timeout_s:.0f} s") from None


def _failure(argv: list[str], done: subprocess.CompletedProcess[str]) -> BenchError:
    said = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return BenchError(f"{' '.join(argv[:2])}: status {done.returncode}: {' / '.join(said)}")


# -- the servers ----------------------------------------------------------------------------

@dataclass
class Work:
    """The scratch directory and the images (the second for the pair row)."""

    dir: str
    images: list[str]
    size_bytes: int

    def for_kind(self, kind: str) -> list[str]:
        return self.images if kind == PAIR else self.images[:1]


class Ours:
    """A launched cluster, one iothread, for the rows of one export (a
    writable and a read-only export of the image), and one of two iothreads
    for the pair row: each launched once, at its first run, and kept (it
    survives its clients); the other is stopped then."""

    name = OURS

    def __init__(self, work: Work) -> None:
        self.work = work
        self._running: tuple[str, contextlib.ExitStack, dict[str, str]] | None = None

    def close(self) -> None:
        if self._running is not None:
            self._running[1].close()
            self._running = None

    def serve(self, kind: str) -> contextlib.AbstractContextManager[list[str]]:
        shape = PAIR if kind == PAIR else RW
        if self._running is None or self._running[0] != shape:
            self.close()
            stack = contextlib.ExitStack()
            try:
                ready = stack.enter_context(launched(*self._args(shape)))
            except RuntimeError as exc:
                stack.close()
                raise BenchError(str(exc)) from None
            self._running = (shape, stack, ready["exports"])
        exports = self._running[2]
        uris = [exports["e0"], exports["e1"]] if kind == PAIR else [exports["e0-ro" if kind == RO else "e0"]]
        return contextlib.nullcontext(uris)

    def _args(self, shape: str) -> list[str]:
        run_dir = os.path.join(self.work.dir, f"run-{shape}")
        images = self.work.for_kind(shape)
        args = ["--iothreads", str(len(images)), "--runtime-dir", run_dir,
                "--nbd-server", f"addr.type=unix,addr.path={os.path.join(run_dir, 'nbd.sock')}"]
        for i, image in enumerate(images):
            args += ["--blockdev", f"driver=file,node-name=disk{i},filename={image},iothread=io{i}",
                     "--export", f"type=nbd,id=e{i},node-name=disk{i},writable=on"]
        if shape != PAIR:
            args += ["--export", "type=nbd,id=e0-ro,node-name=disk0,name=disk0-ro"]
        return args


class Qsd:
    """qemu-storage-daemon: a daemon of its own for every run (see the module's
    docstring), ready once it wrote its pid file (which it does, as
    documented, after it made its exports and before it accepts clients)."""

    def __init__(self, work: Work, aio: str) -> None:
        self.work = work
        self.aio = aio
        self.name = QSD if aio == "threads" else QSD_URING

    def close(self) -> None:
        pass  # each run stops its own daemon

    def argv(self, kind: str, sock: str, pidfile: str) -> list[str]:
        images = self.work.for_kind(kind)
        argv = ["qemu-storage-daemon"]
        for i, image in enumerate(images):
            argv += ["--object", f"iothread,id=io{i}", "--blockdev",
                     f"driver=file,node-name=disk{i},filename={image},aio={self.aio},cache.direct=off"]
        argv += ["--nbd-server", f"addr.type=unix,addr.path={sock}"]
        for i in range(len(images)):
            export = f"type=nbd,id=e{i},node-name=disk{i}"
            export += ",name=disk0-ro" if kind == RO else ",writable=on"
            if kind != FIO:
                export += f",iothread=io{i}"
            argv += ["--export", export]
        return argv + ["--pidfile", pidfile]

    @contextlib.contextmanager
    def serve(self, kind: str) -> Iterator[list[str]]:
        sock = os.path.join(self.work.dir, "qsd.sock")
        pidfile = os.path.join(self.work.dir, "qsd.pid")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
        with tempfile.TemporaryFile("w+") as errors, \
                process(self.argv(kind, sock, pidfile), "qemu-storage-daemon", stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=errors, cwd=self.work.dir) as proc:
            try:
                wait_until(lambda: proc.poll() is not None or _pid_written(pidfile),
                           "qemu-storage-daemon to start", START_S, interval_s=0.002)
            except AssertionError:
                raise BenchError(f"qemu-storage-daemon did not start within {START_S:.0f} s") from None
            if proc.poll() is not None:
                errors.seek(0)
                raise BenchError(f"qemu-storage-daemon ({self.aio}) exited, status {proc.returncode}: "
                                 + " / ".join(errors.read().strip().splitlines()[-3:]))
            names = ["disk0", "disk1"] if kind == PAIR else ["disk0-ro" if kind == RO else "disk0"]
            yield [uri(sock, name) for name in names]


def _pid_written(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except FileNotFoundError:
        return False


class Bare:
    """The bare loop: one process per image (the first serves the rows of
    one export, both the pair row: a process per export, as ours has an
    iothread process per node), started at its first run and kept."""

    name = BARE

    def __init__(self, work: Work) -> None:
        self.work = work
        self._stack = contextlib.ExitStack()
        self._socks: list[str] = []

    def close(self) -> None:
        self._stack.close()
        self._socks = []

    def serve(self, kind: str) -> contextlib.AbstractContextManager[list[str]]:
        images = self.work.for_kind(kind)
        while len(self._socks) < len(images):
            i = len(self._socks)
            sock = os.path.join(self.work.dir, f"bare{i}.sock")
            proc = self._stack.enter_context(process(
                [sys.executable, __file__, "--bare-loop", sock, images[i], f"disk{i}"], "the bare loop",
                stdout=subprocess.PIPE))
            assert proc.stdout is not None
            if proc.stdout.readline() != "ready\n":
                raise BenchError(f"the bare loop exited, status {proc.wait()}")
            self._socks.append(sock)
        if kind == PAIR:
            return contextlib.nullcontext([uri(self._socks[0], "disk0"), uri(self._socks[1], "disk1")])
        return contextlib.nullcontext([uri(self._socks[0], "disk0-ro" if kind == RO else "disk0")])


Side = Ours | Qsd | Bare


# -- the bare loop --------------------------------------------------------------------------

_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, command, cookie, offset, length
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK_READ = struct.Struct(">IHHQIQ")  # magic, flags, type, cookie, length, offset
_CHUNK_EXTENT = struct.Struct(">IHHQIIII")  # ... context id, one extent: length, flags
RECV_BYTES = 256 * 1024


@dataclass
class _BareConn:
    sock: socket.socket
    structured: bool
    contexts: list[int]  # the metadata contexts' ids
    rest: bytes  # the start of a request not complete yet


def bare_loop(path: str, image: str, name: str) -> None:
    """Serve ``image`` as ``name`` (and ``NAME-ro``, read-only) on the Unix socket ``path``, for ever."""
    fd = os.open(image, os.O_RDWR)
    size = os.fstat(fd).st_size
    exports = {name: NbdExport(name, size), f"{name}-ro": NbdExport(f"{name}-ro", size, read_only=True)}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    epoll = select.epoll()
    epoll.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, _BareConn] = {}
    print("ready", flush=True)
    while True:
        for fileno, _ in epoll.poll():
            if fileno == listener.fileno():
                conn = _bare_handshake(listener.accept()[0], exports)
                if conn is not None:
                    conns[conn.sock.fileno()] = conn
                    epoll.register(conn.sock.fileno(), select.EPOLLIN)
                continue
            conn = conns[fileno]
            if not _bare_serve(conn, fd):
                epoll.unregister(fileno)
                conn.sock.close()
                del conns[fileno]


def _bare_handshake(sock: socket.socket, exports: dict[str, NbdExport]) -> _BareConn | None:
    """The handshake, blocking (10 s at most): protocol.nbd's, with what the client asks."""
    sock.settimeout(10)
    hs = NbdServerHandshake(exports)
    try:
        while True:
            out = hs.data_to_send()
            if out:
                sock.sendall(out)
                hs.data_sent(len(out))
            if hs.state is not NbdHandshakeState.NEGOTIATING:
                break
            if hs.wants_input:
                hs.receive_data(sock.recv(65536))
    except OSError:
        pass
    if hs.negotiated is None:
        sock.close()
        return None
    sock.settimeout(None)
    return _BareConn(sock, hs.negotiated.structured_replies,
                     [c.context_id for c in hs.negotiated.meta_contexts], hs.unused_data)


def _bare_serve(conn: _BareConn, fd: int) -> bool:
    """One read: every complete request in it done, all the replies in one
    ``sendmsg``.  False once the client is gone."""
    try:
        data = conn.sock.recv(RECV_BYTES)
    except OSError:
        return False
    if not data:
        return False
    if conn.rest:
        data = conn.rest + data
    view = memoryview(data)
    end, pos = len(data), 0
    out: list[bytes | bytearray | memoryview] = []
    while end - pos >= 28:
        _, _, command, cookie, offset, length = _REQUEST.unpack_from(data, pos)
        start = pos + 28
        if command == NBD_CMD_READ:
            if conn.structured:
                out.append(_CHUNK_READ.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                                            NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset))
            else:
                out.append(_SIMPLE.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
            out.append(os.pread(fd, length, offset))
        elif command == NBD_CMD_WRITE:
            if end - start < length:
                break
            os.pwrite(fd, view[start:start + length], offset)
            start += length
            out.append(_SIMPLE.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
        elif command == NBD_CMD_FLUSH:
            os.fdatasync(fd)
            out.append(_SIMPLE.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
        elif command == NBD_CMD_BLOCK_STATUS and conn.contexts:  # one extent: all data
            for i, context_id in enumerate(conn.contexts):
                out.append(_CHUNK_EXTENT.pack(NBD_STRUCTURED_REPLY_MAGIC,
                                              NBD_REPLY_FLAG_DONE if i == len(conn.contexts) - 1 else 0,
                                              NBD_REPLY_TYPE_BLOCK_STATUS, cookie, 12, context_id, length, 0))
        elif command == NBD_CMD_DISC:
            return False
        else:  # what the clients here do not send
            out += generic_reply(cookie, NBD_EINVAL, "not in the bare loop", conn.structured)
        pos = start
    conn.rest = data[pos:]
    try:
        while out:
            sent = conn.sock.sendmsg(out[:1024])
            done = 0
            while done < len(out) and sent >= len(out[done]):
                sent -= len(out[done])
                done += 1
            del out[:done]
            if sent:
                out[0] = memoryview(out[0])[sent:]
    except OSError:
        return False
    return True


# -- the clients ----------------------------------------------------------------------------

class Counts:
    """How many requests a ``qemu-img bench`` run sends, per side and row:
    from a first guess, then what the side's last run did in ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._counts: dict[tuple[str, str], int] = {}

    def get(self, key: tuple[str, str], guess_per_s: int) -> int:
        return self._counts.get(key, max(100, int(guess_per_s * self.seconds)))

    def update(self, key: tuple[str, str], count: int, elapsed_s: float) -> None:
        self._counts[key] = max(100, int(count / max(elapsed_s, 1e-3) * self.seconds))


def nbd_blockdev(nbd_uri: str) -> dict[str, Any]:
    """QEMU's ``nbd`` driver options for an ``nbd+unix`` URI (a child in JSON takes no URI)."""
    parts = urllib.parse.urlsplit(nbd_uri)
    return {"driver": "nbd", "export": urllib.parse.unquote(parts.path[1:]),
            "server": {"type": "unix", "path": urllib.parse.parse_qs(parts.query)["socket"][0]}}


_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def qemu_img_bench(uris: list[str], depth: int, write: bool, count: int, cwd: str) -> float:
    """``qemu-img bench``: the seconds its ``count`` requests took (its own
    timing: from the first request to the last completion).  Two URIs:
    reads through a ``quorum`` of both, each read going to both exports."""
    if len(uris) == 1:
        image = ["-f", "raw", uris[0]]
    else:
        children = [nbd_blockdev(u) for u in uris]
        image = ["json:" + json.dumps({"driver": "quorum", "vote-threshold": 1, "read-pattern": "quorum",
                                       "children": children})]
    argv = ["qemu-img", "bench", "-c", str(count), "-d", str(depth), "-s", str(BS),
            "-S", str(BS * STRIDE_BLOCKS)]
    if write:
        argv += ["-w", "--pattern=90"]
    done = client(argv + image, CLIENT_SLACK_S + count / 1000, cwd)
    found = _COMPLETED.search(done.stdout)
    if done.returncode or found is None:
        raise _failure(argv, done)
    return max(float(found.group(1)), 1e-3)


def fio_iops(uri: str, rw: str, depth: int, seconds: float, cwd: str) -> float:
    """fio's nbd engine, 4 KiB ``rw`` at ``depth`` for ``seconds``: its IOPS."""
    argv = ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={BS}",
            f"--iodepth={depth}", "--time_based", f"--runtime={max(1, round(seconds * 1000))}ms",
            "--output-format=json"]
    done = client(argv, CLIENT_SLACK_S + seconds, cwd)
    if done.returncode or "{" not in done.stdout:
        raise _failure(argv, done)
    job = json.loads(done.stdout[done.stdout.index("{"):])["jobs"][0]  # after "fio: connected to ..."
    if job["error"]:
        raise BenchError(f"fio: error {job['error']}")
    return float(job["read" if rw == "randread" else "write"]["iops"])


def nbdcopy_mib_s(uri: str, connections: int, size_bytes: int, cwd: str, shutdown_may_fail: bool) -> float:
    """``nbdcopy`` of the whole export to ``null:``: MiB/s over its wall time.
    ``shutdown_may_fail``: a failed ``nbd_shutdown`` once the copy is done
    is not an error (qemu-storage-daemon 7.2 is gone by then)."""
    argv = ["nbdcopy", f"--connections={connections}", uri, "null:"]
    t0 = time.perf_counter()
    done = client(argv, CLIENT_SLACK_S + size_bytes / MiB, cwd)
    elapsed = time.perf_counter() - t0
    errors = done.stderr.strip().splitlines()
    if done.returncode and not (shutdown_may_fail and errors and all("nbd_shutdown" in e for e in errors)):
        raise _failure(argv, done)
    return size_bytes / MiB / elapsed


# -- the rows -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    metric: str
    unit: str
    better: Better
    kind: str  # what the servers export for it
    tool: str  # the client, which must be installed
    run: Callable[[Side, list[str]], float]


def qemu_img_case(work: Work, counts: Counts, depth: int, write: bool, pair: bool = False) -> Case:
    rw = "randwrite" if write else "randread"
    metric = (f"two exports, 2 iothreads: qemu-img bench 4K {rw} QD{depth} each" if pair
              else f"qemu-img bench 4K {rw} QD{depth}" + (" latency" if depth == 1 else ""))
    guess = 20_000 if depth == 1 else 60_000

    def one(side: Side, uris: list[str]) -> float:
        key = (side.name, metric)
        count = counts.get(key, guess)
        elapsed = qemu_img_bench(uris, depth, write, count, work.dir)
        counts.update(key, count, elapsed)
        if depth == 1:
            return elapsed / count * 1e6
        return count * len(uris) / elapsed

    if depth == 1:
        return Case(metric, "us", "lower", RW, "qemu-img", one)
    return Case(metric, "IOPS", "higher", PAIR if pair else RW, "qemu-img", one)


def fio_case(work: Work, seconds: float, depth: int, rw: str) -> Case:
    def one(side: Side, uris: list[str]) -> float:
        iops = fio_iops(uris[0], rw, depth, seconds, work.dir)
        return 1e6 / iops if depth == 1 else iops

    if depth == 1:
        return Case(f"fio nbd 4K {rw} QD1 latency", "us", "lower", FIO, "fio", one)
    return Case(f"fio nbd 4K {rw} QD{depth}", "IOPS", "higher", FIO, "fio", one)


def nbdcopy_case(work: Work, connections: int) -> Case:
    size = work.size_bytes
    label = f"{size // (1 << 30)} GiB" if size % (1 << 30) == 0 else f"{size // MiB} MiB"

    def one(side: Side, uris: list[str]) -> float:
        return nbdcopy_mib_s(uris[0], connections, size, work.dir, shutdown_may_fail=isinstance(side, Qsd))

    return Case(f"nbdcopy {label} to null:, {connections} connection{'s' if connections > 1 else ''}",
                "MiB/s", "higher", RO, "nbdcopy", one)


def cases(work: Work, seconds: float) -> list[Case]:
    counts = Counts(seconds)
    return [
        qemu_img_case(work, counts, 1, False), qemu_img_case(work, counts, DEPTH, False),
        qemu_img_case(work, counts, 1, True), qemu_img_case(work, counts, DEPTH, True),
        fio_case(work, seconds, 1, "randread"), fio_case(work, seconds, DEPTH, "randread"),
        fio_case(work, seconds, 1, "randwrite"), fio_case(work, seconds, DEPTH, "randwrite"),
        nbdcopy_case(work, 1), nbdcopy_case(work, 4),
        qemu_img_case(work, counts, DEPTH, False, pair=True),
    ]


# The targets: (row, baseline, at least (>=) or at most (<=), bound).
TARGETS: list[tuple[Callable[[str], bool], str, str, float]] = [
    (lambda m: m == f"fio nbd 4K randread QD{DEPTH}", QSD, ">=", 2.0),
    (lambda m: m == f"qemu-img bench 4K randread QD{DEPTH}", QSD, ">=", 1.3),
    (lambda m: m.endswith(f" 4K randwrite QD{DEPTH}") and not m.startswith("two"), QSD, ">=", 1.0),
    (lambda m: m.endswith("QD1 latency"), QSD, "<=", 1.0),
    (lambda m: m.startswith("nbdcopy"), QSD, ">=", 0.7),
    (lambda m: m.startswith("fio") and m.endswith(f"QD{DEPTH}"), BARE, ">=", 0.6),
    (lambda m: m.endswith("QD1 latency"), BARE, "<=", 1.3),
]


def print_targets(rows: list[Row]) -> None:
    print("\ntargets (ours / baseline, same run):")
    for matches, baseline, op, bound in TARGETS:
        for row in rows:
            if row.baseline == baseline and matches(row.metric):
                met = row.ratio >= bound if op == ">=" else row.ratio <= bound
                print(f"  {row.metric} vs {baseline}: {row.ratio:.2f} (target {op} {bound}) "
                      f"{'met' if met else 'MISSED'}")


# -- the run --------------------------------------------------------------------------------

def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value
    return parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="NBD exports of a cluster against qemu-storage-daemon, with "
                                     "qemu-img bench, fio's nbd engine and nbdcopy.")
    parser.add_argument("--repeats", type=positive(int), default=3, help="measured runs per side and row (3)")
    parser.add_argument("--warmup", type=int, default=1, choices=range(0, 10), metavar="N",
                        help="runs per side and row before the measured ones (1)")
    parser.add_argument("--seconds", type=positive(float), default=0.5,
                        help="length of a qemu-img bench or fio run (0.5)")
    parser.add_argument("--size-mib", type=positive(int), default=1024,
                        help="the image's size; nbdcopy copies all of it (1024)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--only", metavar="TEXT", action="append", default=[],
                        help="measure only the rows whose name contains TEXT (may be repeated)")
    parser.add_argument("--bare-loop", nargs=3, metavar=("SOCKET", "IMAGE", "NAME"), help=argparse.SUPPRESS)
    return parser.parse_args()


def runner(work: Work, side: Side, case: Case) -> Callable[[], float]:
    """One run of ``case`` against ``side``: the images read through, a server, the client."""
    def one_run() -> float:
        warm(*work.for_kind(case.kind))
        with side.serve(case.kind) as uris:
            return case.run(side, uris)
    return one_run


def main() -> None:
    args = parse_args()
    if args.bare_loop:
        bare_loop(*args.bare_loop)
        return
    if shutil.which("qemu-storage-daemon") is None:
        sys.exit("nbd.py: qemu-storage-daemon, the baseline, is not installed (Debian: qemu-system-common)")
    print(cpu_note())
    print(f"{args.repeats} runs per side and row after {args.warmup} warm-up, interleaved; medians\n",
          flush=True)
    rows: list[Row] = []
    try:
        with scratch_dir("evnbd") as directory, contextlib.ExitStack() as stack:
            size = args.size_mib * MiB
            work = Work(directory, [os.path.join(directory, f"disk{i}.img") for i in range(2)], size)
            for image in work.images:
                write_image(image, size)
            sides: list[Side] = [Ours(work), Qsd(work, "threads"), Qsd(work, "io_uring"), Bare(work)]
            for side in sides:
                stack.callback(side.close)
            try:
                with sides[2].serve(RW):
                    pass
            except BenchError as exc:
                print(f"{QSD_URING}: left out: {exc}")
                del sides[2]
            chosen = [c for c in cases(work, args.seconds)
                      if not args.only or any(text in c.metric for text in args.only)]
            if not chosen:
                raise BenchError(f"no row's name contains {' or '.join(map(repr, args.only))}")
            for case in chosen:
                if shutil.which(case.tool) is None:
                    print(f"{case.tool} is not installed: row left out: {case.metric}")
                    continue
                print(f"measuring: {case.metric}", flush=True)
                medians = measure([(side.name, runner(work, side, case)) for side in sides],
                                  args.repeats, args.warmup)
                rows += rows_for(case.metric, case.unit, case.better, medians)
    except BenchError as exc:
        sys.exit(f"nbd.py: {exc}")
    print()
    print_table(rows)
    print_targets(rows)
    print("\nqsd's fio rows: its export in its main loop (an export bound to an iothread does not survive "
          "fio's probe connection)")
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    run(main)
