"""Fuzzing and faults against a launched cluster: what hostile input, dying or
stopped processes, a damaged image, a full disk and greedy clients do to it.

Usage: ``python examples/hardening.py [--seed N] [--full] [--json PATH] [--planes LIST]``

Each plane launches a cluster of its own (``iothreads launch``, as a user
runs it, in a session of its own) and runs a seeded, bounded series of inputs:

qmp
    Malformed and hostile input against the monitor, on a negotiated session:
    mutations of valid commands (truncated, bits flipped, control characters
    and bytes 0xFE/0xFF inside strings, invalid UTF-8, huge or deeply nested
    values, wrong types, odd numbers, unknown commands, bad envelopes,
    garbage, pipelined bursts), written at once, split across writes, or
    followed by a half-close.  After each input, a probe on that session (a
    byte 0xFF, which QEMU's JSON lexer refuses in every state so that its
    parser starts afresh, then ``query-status``) must be answered, else the
    session is *deaf*; a fresh session must be answered too, else the monitor
    *hangs*.
data
    Block-request frames built with the wire codec, then mutated (truncated,
    bits flipped, bad version or kind, other kinds of message, out-of-range
    offsets and lengths, unknown ops, over-long node names, wrong field
    types and counts, payloads that do not match, bad batches, msgpack
    bombs, garbage, and raw bytes on the socket instead of ZeroMQ), sent to
    an iothread's data endpoint from a DEALER, as the block client connects.
    After each, a read from the same socket must be answered (else *deaf*),
    and from a fresh socket (else the iothread *hangs*).
faults
    A verified write workload (a ``BlockClient`` writing 4 KiB blocks of a
    pattern that names the block and a generation, flushing as it goes)
    while an iothread is killed (SIGKILL, the cluster restarting it) or
    stopped (SIGSTOP, then SIGCONT), while the launcher is stopped, while
    its image is truncated or unlinked, and on a full file system (a small
    tmpfs; mounting one needs root, else the row is skipped and says so).
    Then every block that was written, acknowledged and covered by a
    successful flush is read back, through the cluster and from the image
    file: one holding anything else is an *acknowledged write lost*; a
    node the cluster no longer has is a *node lost*; a workload that makes
    no progress after the fault (or the launcher's stop) is a *hang*.
resources
    With the cluster's file-descriptor limit lowered (``RLIMIT_NOFILE``
    128, soft and hard): more QMP sessions at once than that (then
    ``object-add``, which needs fds, on a session opened before them), as
    many data connections (then a read from a new block client), a client
    that writes pipelined QMP input behind a command waiting on a stopped
    iothread and never reads, and a data client that sends large reads and
    never reads the replies.  A session or client left with neither an
    answer nor a refusal is *deaf*.  Memory (VmRSS) of the launcher and of
    the largest iothread before and after (peaks in the notes); every
    process must be alive and answer afterwards.

In every plane a process of the cluster that dies unasked is a *crash* (the
cluster is launched again and the plane goes on).  The table gives, per
plane and case: inputs tried, crashes, hangs, deaf sessions, acknowledged
writes lost, nodes lost, and RSS before -> after; the notes and the
findings (with each input's index, mutation and bytes) follow it.
``--json PATH`` writes the same as JSON.  Exit status 1 when any of those
counts is not zero.

The default counts finish in seconds; ``--full`` runs 10^4 QMP inputs,
10^6 data-plane frames, 10^5 NBD inputs and each fault five times.  The seed (printed) makes
a run reproducible: ``--seed N`` runs the same inputs again.  Ctrl-C stops
it: one line, exit status 130, nothing left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import errno
import hashlib
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgpack
import zmq

from iothreads import BlockClient, BlockIOError
from mainloop.cluster import HEARTBEAT_INTERVAL_MS
from protocol.nbd import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_SET_META_CONTEXT,
    NBD_SIMPLE_REPLY_MAGIC,
    NbdClientHandshake,
    NbdClientState,
    encode_request,
)
from protocol import (
    PROTOCOL_VERSION,
    BlockCompletion,
    BlockdevDel,
    BlockRequest,
    Heartbeat,
    Hello,
    Message,
    ProtocolError,
    Query,
    SetPollParams,
    StateError,
    Stop,
    Welcome,
    decode_batch,
    encode,
    encode_batch,
    pack,
)

NAME = os.path.basename(sys.argv[0]) if sys.argv[0] else "hardening.py"
BS = 4096
MiB = 1 << 20

PROBE_S = 5.0
"""Bound on the answer to a probe on the session or socket just fuzzed."""
FRESH_S = 10.0
"""Bound on a fresh session's or socket's answer."""
STOP_S = 30.0
"""Bound on a launcher's exit after SIGTERM, and on its iothreads' after it."""
PROGRESS_S = 30.0
"""Bound on the workload's next completion after a fault (a restart may wait up to 10 s)."""


# -- counts ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Counts:
    qmp_inputs: int
    max_burst: int
    """The largest pipelined burst, in commands; the second QMP input is one."""
    data_frames: int
    nbd_inputs: int
    fault_rounds: int
    pause_s: float
    """How long a process stays stopped."""
    blocks: int
    """The workload's region, in 4 KiB blocks."""
    warm_acks: int
    """Writes acknowledged before each fault, and after it."""
    nofile: int
    """The resources cluster's RLIMIT_NOFILE (soft and hard)."""
    over_limit: int
    """QMP sessions and data connections opened beyond ``nofile``."""
    unread_qmp_bytes: int
    unread_reads: int
    unread_read_bytes: int
    watch_s: float
    """How long a greedy client's effect on memory is watched."""


SMALL = Counts(qmp_inputs=100, max_burst=1000, data_frames=100, nbd_inputs=100, fault_rounds=1,
               pause_s=2 * HEARTBEAT_INTERVAL_MS / 1000, blocks=128, warm_acks=32, nofile=128,
               over_limit=64, unread_qmp_bytes=2 * MiB, unread_reads=8, unread_read_bytes=4 * MiB,
               watch_s=0.5)
FULL = Counts(qmp_inputs=10_000, max_burst=10_000, data_frames=1_000_000, nbd_inputs=100_000, fault_rounds=5,
              pause_s=8 * HEARTBEAT_INTERVAL_MS / 1000, blocks=1024, warm_acks=256, nofile=128,
              over_limit=256, unread_qmp_bytes=24 * MiB, unread_reads=48, unread_read_bytes=32 * MiB,
              watch_s=3.0)


# -- results --------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One line of the table: a plane, or one case of it."""

    plane: str
    case: str
    inputs: int = 0
    crashes: int = 0
    hangs: int = 0
    deaf: int = 0
    writes_lost: int = 0
    nodes_lost: int = 0
    launcher_rss_mib: list[float | None] = dataclasses.field(default_factory=lambda: [None, None])
    iothread_rss_mib: list[float | None] = dataclasses.field(default_factory=lambda: [None, None])
    rss_trace: list[tuple[int, float | None, float | None]] = dataclasses.field(default_factory=list)
    """(inputs so far, the launcher's VmRSS, the largest iothread's, in MiB), RSS_SAMPLES times along a plane."""
    notes: list[str] = dataclasses.field(default_factory=list)

    def failures(self) -> int:
        return sum(getattr(self, name) for name in MUST_BE_ZERO)

    def rss_before(self, rss: tuple[float | None, float | None]) -> None:
        self.launcher_rss_mib[0], self.iothread_rss_mib[0] = rss

    def rss_after(self, rss: tuple[float | None, float | None]) -> None:
        self.launcher_rss_mib[1], self.iothread_rss_mib[1] = rss

    def rss_along(self, total: int, cluster: LaunchedCluster) -> None:
        """After each input: every ``total / RSS_SAMPLES`` inputs, note the
        launcher's and the iothread's RSS, to tell memory that levels off
        from memory that grows."""
        if self.inputs % max(1, total // RSS_SAMPLES) == 0:
            self.rss_trace.append((self.inputs, *cluster.rss()))


RSS_SAMPLES = 10
MUST_BE_ZERO = ("crashes", "hangs", "deaf", "writes_lost", "nodes_lost")
MAX_FINDINGS = 200


class Findings:
    """What went wrong, input by input, to reproduce it (bounded)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.dropped = 0

    def add(self, plane: str, what: str, detail: str, data: bytes | None = None, **where: Any) -> None:
        if len(self.items) >= MAX_FINDINGS:
            self.dropped += 1
            return
        item: dict[str, Any] = {"plane": plane, "what": what, "detail": detail, **where}
        if data is not None:
            item["input"] = _shown(data)
        self.items.append(item)


def _shown(data: bytes, limit: int = 300) -> str:
    """Bytes as Python shows them, bounded."""
    text = repr(data[:limit])
    return text + (f" ... ({len(data)} bytes)" if len(data) > limit else "")


# -- processes ------------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """A process's resident memory (VmRSS) in MiB; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def wait_gone(pids: Sequence[int], timeout_s: float) -> list[int]:
    """Wait for ``pids`` to exit (on pidfds); those still alive after ``timeout_s``."""
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        alive = set(fds)
        end = time.monotonic() + timeout_s
        while alive and (left := end - time.monotonic()) > 0:
            for fd, _ in poller.poll(int(left * 1000) + 1):
                alive.discard(fd)
                poller.unregister(fd)
        return sorted(fds[fd] for fd in alive)
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Ctrl-C held off for a step whose result the clean-up must know of
    (a directory made, a file system mounted): it lands once the step is
    done.  A handler that takes note, not a blocked signal: a SIGINT that came
    just before would still raise in the middle of the step."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


@contextlib.contextmanager
def scratch_directory() -> Iterator[str]:
    """A private directory for images, runtime directories and logs; removed at the end."""
    with sigint_held():
        path = tempfile.mkdtemp(prefix="hardening-")
    try:
        yield path
    finally:
        with sigint_held():
            shutil.rmtree(path, ignore_errors=True)


def raise_own_fd_limit() -> None:
    """This process's soft RLIMIT_NOFILE raised to its hard one: the
    resources plane opens hundreds of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16),
                                                    hard))


# The launcher: ``iothreads launch`` through the library's own entry point, as
# ``mainloop.EmbeddedCluster`` starts it.  It asks for SIGTERM when this
# process dies (so a killed run leaves no cluster), and takes the file
# descriptor limit it is given (0: this process's).
_LAUNCHER = """\
import resource, sys
from iothreads import die_with_parent
die_with_parent(int(sys.argv[1]))
if int(sys.argv[2]):
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), int(sys.argv[2])))
from mainloop.cli import main
sys.exit(main(sys.argv[3:]))
"""


class ClusterDied(Exception):
    """The launcher exited before it was ready."""


class LaunchedCluster:
    """``iothreads launch ARGS`` in a session of its own (Ctrl-C at the
    terminal reaches this process only, which stops it in order), its
    runtime directory and its log in the scratch directory, its events read
    as they come (a thread: a launcher whose stdout nobody reads would block)."""

    def __init__(self, scratch: str, name: str, args: Sequence[str], nofile: int = 0,
                 started: list[LaunchedCluster] | None = None) -> None:
        self.name = name
        self.runtime_dir = os.path.join(scratch, f"{name}.run")
        self.log_path = os.path.join(scratch, f"{name}.log")
        self.events: list[dict[str, Any]] = []
        self.ready: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._seen_pids: set[int] = set()
        self._closed = False
        try:
            # Ctrl-C held off while the launcher is started: one that landed
            # inside Popen (after the fork) would leave a launcher nobody stops.
            with open(self.log_path, "ab") as log, sigint_held():
                self.proc: subprocess.Popen[str] = subprocess.Popen(
                    [sys.executable, "-c", _LAUNCHER, str(os.getpid()), str(nofile), "launch",
                     "--runtime-dir", self.runtime_dir, *args],
                    stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
                if started is not None:
                    started.append(self)  # (where whoever stops everything finds it, from its first moment)
            self._read_until_ready()
        except BaseException:
            if "proc" in vars(self):  # (started: the Ctrl-C held off lands here, or later)
                self.close()
            raise
        self._thread = threading.Thread(target=self._read_events, name=f"{name}-events", daemon=True)
        self._thread.start()

    def _read_until_ready(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # bounded by the launcher's own handshake deadline
            event = self._record(line)
            if event is not None and event["event"] == "READY":
                self.ready = event["data"]
                self._seen_pids.update(t["pid"] for t in self.ready["iothreads"])
                return
        raise ClusterDied(f"cluster {self.name} did not start (status {self.proc.wait()}): {self.log_tail(1)}")

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._record(line)

    def _record(self, line: str) -> dict[str, Any] | None:
        try:
            event = json.loads(line)
        except ValueError:
            return None
        with self._lock:
            self.events.append(event)
            if event.get("event") == "IOTHREAD_READY":
                self._seen_pids.add(event["data"]["pid"])
        return dict(event)

    def log_tail(self, lines: int = 20) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()

    def tracebacks(self) -> int:
        """Tracebacks in the cluster's log (the launcher's and its iothreads')."""
        with open(self.log_path, errors="replace") as f:
            return sum(line.startswith("Traceback") for line in f)

    # -- what it is made of ------------------------------------------------------------

    @property
    def qmp_path(self) -> str:
        return str(self.ready["qmp"][0])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def data_endpoint(self, iothread: str) -> str:
        return next(str(t["data"]) for t in self.ready["iothreads"] if t["id"] == iothread)

    def iothread_pids(self) -> dict[str, int]:
        """Each iothread's current pid: from READY, then its IOTHREAD_READY events (restarts)."""
        pids = {t["id"]: int(t["pid"]) for t in self.ready["iothreads"]}
        with self._lock:
            for event in self.events:
                if event.get("event") == "IOTHREAD_READY":
                    pids[event["data"]["id"]] = int(event["data"]["pid"])
        return pids

    def mark(self) -> int:
        """A point in its events, for ``events_since`` and ``crashes``."""
        with self._lock:
            return len(self.events)

    def events_since(self, mark: int, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e["data"] for e in self.events[mark:] if e.get("event") == name]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def crashes(self, mark: int, killed: set[int] | frozenset[int] = frozenset()) -> int:
        """Processes of the cluster that died unasked since ``mark``: iothreads
        that exited (but those in ``killed``), and the launcher."""
        exits = [e for e in self.events_since(mark, "IOTHREAD_EXITED") if e["pid"] not in killed]
        return len(exits) + (not self.alive())

    def rss(self) -> tuple[float | None, float | None]:
        """(the launcher's VmRSS, the largest iothread's) in MiB."""
        iothreads = [m for m in map(rss_mib, self.iothread_pids().values()) if m is not None]
        return rss_mib(self.pid), max(iothreads, default=None)

    # -- stopping ------------------------------------------------------------------------

    def close(self) -> list[int]:
        """Stop it (SIGTERM; SIGKILL after ``STOP_S``) and wait for its iothreads;
        the pids of those that outlived it (killed then).  Idempotent."""
        if self._closed:
            return []
        self._closed = True
        for pid in [self.pid, *self._seen_pids]:  # a stopped process cannot take SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        left = wait_gone(sorted(self._seen_pids), STOP_S)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._thread is not None:
            self._thread.join(STOP_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return left


class Clusters:
    """The clusters of a run, each launched again when it dies; all stopped at the end."""

    def __init__(self, scratch: str, findings: Findings) -> None:
        self.scratch = scratch
        self.findings = findings
        self._open: list[LaunchedCluster] = []
        self.left_behind = 0

    def launch(self, name: str, args: Sequence[str], nofile: int = 0) -> LaunchedCluster:
        return LaunchedCluster(self.scratch, name, args, nofile, started=self._open)

    def close(self, cluster: LaunchedCluster) -> None:
        self._open.remove(cluster)
        left = cluster.close()
        if left:
            self.left_behind += len(left)
            self.findings.add(cluster.name, "left behind", f"iothreads still running after the launcher: {left}")

    def close_all(self) -> None:
        while self._open:
            self.close(self._open[-1])


Liveness = Callable[[LaunchedCluster], "str | None"]
"""Whether a cluster answers as a new client expects: None, or why not."""


class Target:
    """The cluster a plane works on, checked after each input and launched
    again when a process of it died unasked (a crash) or it does not answer
    a new client (a hang)."""

    def __init__(self, clusters: Clusters, name: str, args: Sequence[str], nofile: int = 0) -> None:
        self.clusters = clusters
        self.name = name
        self.args = list(args)
        self.nofile = nofile
        self.cluster = clusters.launch(name, args, nofile)
        self.mark = self.cluster.mark()

    def check(self, row: Row, answers: Liveness, killed: frozenset[int] = frozenset()) -> tuple[str, str] | None:
        """Count a crash or a hang since the last check in ``row`` (not the
        exits of ``killed``), launch the cluster again if so; (what, why) or None."""
        cluster = self.cluster
        exits = [e for e in cluster.events_since(self.mark, "IOTHREAD_EXITED") if e["pid"] not in killed]
        problem: tuple[str, str] | None = None
        if exits or not cluster.alive():
            row.crashes += len(exits) + (not cluster.alive())
            launcher = "" if cluster.alive() else f"the launcher exited with status {cluster.proc.returncode}; "
            problem = "crash", f"{launcher}iothreads that exited: {exits}"
        elif (why := answers(cluster)) is not None:
            row.hangs += 1
            problem = "hang", why
        if problem is not None:
            self.clusters.findings.add(self.name, "log", cluster.log_tail(8))
            self.clusters.close(cluster)
            self.cluster = self.clusters.launch(self.name, self.args, self.nofile)
        self.mark = self.cluster.mark()
        return problem


# -- a raw QMP client -----------------------------------------------------------------------


class Outcome(enum.Enum):
    ANSWERED = "answered"
    REFUSED = "closed with an error"
    DROPPED = "closed without a reply"
    DEAF = "no answer"


CONNECT_RETRY_S = 0.005


class QmpConnection:
    """A QMP client that writes bytes as given and reads reply lines, never
    blocking: it reads while it writes, so that a monitor which stops reading
    until its replies are taken cannot deadlock it."""

    def __init__(self, path: str, connect_timeout_s: float = FRESH_S, tally: Counter[str] | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._in = bytearray()
        self.eof = False
        self.last_error = ""  # the desc of the last error reply
        self.tally: Counter[str] = Counter() if tally is None else tally
        """Lines read that were not JSON objects: "garbled lines"."""
        self.sock.setblocking(False)
        try:
            self._connect(path, connect_timeout_s)
        except BaseException:
            self.sock.close()
            raise

    def _connect(self, path: str, timeout_s: float) -> None:
        """Connect as a blocking client does: while the listener's backlog is
        full (EAGAIN on a Unix socket), wait for room, up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sock.connect(path)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"not accepted in {timeout_s:g} s (the listen backlog stayed full)") from None
                time.sleep(CONNECT_RETRY_S)  # the kernel does not say when room is made

    def close(self) -> None:
        self.sock.close()

    def _wait(self, events: int, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        poller = select.poll()
        poller.register(self.sock, events)
        return bool(poller.poll(int(left * 1000) + 1))

    def _read_available(self) -> None:
        while not self.eof:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except ConnectionError:
                data = b""
            if not data:
                self.eof = True
            self._in += data

    def write(self, data: bytes, deadline: float) -> bool:
        """Write all of ``data`` (reading meanwhile); False if the deadline
        passed or the peer closed first."""
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
                view = view[sent:]
                continue
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                return False  # closed by the peer: what it said before is still to be read
            self._read_available()
            if not self._wait(select.POLLOUT | select.POLLIN, deadline):
                return False
        return True

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def reply(self, deadline: float) -> dict[str, Any] | None:
        """The next reply (or event), None at end of file or at the deadline."""
        while True:
            end = self._in.find(b"\n")
            if end >= 0:
                line = bytes(self._in[:end]).strip()
                del self._in[:end + 1]
                try:
                    msg = json.loads(line)
                except ValueError:
                    msg = None
                if not isinstance(msg, dict):
                    self.tally["garbled lines"] += 1
                    continue
                if "error" in msg:
                    self.last_error = str(msg["error"].get("desc", ""))
                return msg
            if self.eof:
                return None
            self._read_available()
            if self.eof or b"\n" in self._in:
                continue
            if not self._wait(select.POLLIN, deadline):
                return None

    def wait_for(self, reply_id: str, deadline: float) -> Outcome:
        """Read until the reply with ``reply_id``."""
        self.last_error = ""
        while (msg := self.reply(deadline)) is not None:
            if msg.get("id") == reply_id:
                return Outcome.ANSWERED
        if not self.eof:
            return Outcome.DEAF
        return Outcome.REFUSED if self.last_error else Outcome.DROPPED

    def execute(self, command: str, arguments: dict[str, Any] | None, deadline: float) -> dict[str, Any] | None:
        """Run one command; its reply (``return`` or ``error``), None if none came."""
        request: dict[str, Any] = {"execute": command, "id": f"run-{command}"}
        if arguments is not None:
            request["arguments"] = arguments
        if not self.write(json.dumps(request).encode(), deadline):
            return None
        while (msg := self.reply(deadline)) is not None:
            if msg.get("id") == request["id"]:
                return msg
        return None


class NoSession(Exception):
    """A QMP session could not be opened and negotiated in time; ``refused``:
    the monitor said no (an error, then the connection closed)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def open_session(path: str, timeout_s: float = FRESH_S, tally: Counter[str] | None = None) -> QmpConnection:
    """A negotiated QMP session (greeting read, ``qmp_capabilities`` answered)."""
    deadline = time.monotonic() + timeout_s
    try:
        conn = QmpConnection(path, tally=tally)
    except OSError as exc:
        raise NoSession(f"connect: {exc}") from None
    try:
        greeting = conn.reply(deadline)
        if greeting is None or "QMP" not in greeting:
            refused = bool(greeting and "error" in greeting)
            raise NoSession(f"no greeting ({'refused' if refused else 'no answer'}: {greeting})", refused)
        answer = conn.execute("qmp_capabilities", None, deadline)
        if answer is None or "return" not in answer:
            raise NoSession(f"qmp_capabilities: {answer or ('closed' if conn.eof else 'no answer')}")
    except BaseException:
        conn.close()
        raise
    return conn


def qmp(cluster: LaunchedCluster, command: str, arguments: dict[str, Any] | None = None,
        timeout_s: float = FRESH_S) -> dict[str, Any]:
    """Run one command on a fresh session; its reply.  ``NoSession`` if none came."""
    conn = open_session(cluster.qmp_path, timeout_s)
    try:
        reply = conn.execute(command, arguments, time.monotonic() + timeout_s)
    finally:
        conn.close()
    if reply is None:
        raise NoSession(f"{command}: no answer")
    return reply


def fresh_session_answers(cluster: LaunchedCluster) -> str | None:
    """None if a fresh session is greeted and negotiated in time, else why
    not.  A session refused (at the monitor's limit, while sessions just
    closed are still counted) is tried again within the bound."""
    deadline = time.monotonic() + FRESH_S
    while True:
        try:
            open_session(cluster.qmp_path, max(deadline - time.monotonic(), 0.1)).close()
            return None
        except NoSession as exc:
            if not exc.refused or time.monotonic() >= deadline:
                return f"a new session: {exc}"
        time.sleep(CONNECT_RETRY_S)  # the monitor does not say when a session ends


# -- a raw data-plane client ----------------------------------------------------------------

PROBE_READ_BYTES = 512
PROBE_NODE = "null0"


class DataSocket:
    """A DEALER on an iothread's data endpoint, as the block client connects
    one, sending frames as given."""

    def __init__(self, zctx: zmq.Context[Any], endpoint: str, rcvhwm: int = 0,
                 tally: Counter[str] | None = None) -> None:
        self.sock: zmq.Socket[Any] = zctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if rcvhwm:
            self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self.sock.connect(endpoint)
        self.tally: Counter[str] = Counter() if tally is None else tally
        """Replies read past: "error completions" (of other requests), "bad replies" (the codec refused)."""

    def send(self, frames: Sequence[bytes]) -> bool:
        """Queue one message; False if ZeroMQ would not take it (no room)."""
        try:
            self.sock.send_multipart(list(frames), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def completion(self, request_id: int, timeout_s: float) -> BlockCompletion | None:
        """The completion of ``request_id`` (others are read past), None if it did not come in time."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            try:
                messages = decode_batch(self.sock.recv_multipart())
            except ProtocolError:
                self.tally["bad replies"] += 1
                continue
            for msg in messages:
                if isinstance(msg, BlockCompletion) and msg.request_id == request_id:
                    return msg
                self.tally["error completions"] += isinstance(msg, BlockCompletion) and msg.status < 0
        return None

    def probe(self, request_id: int, timeout_s: float = PROBE_S) -> str | None:
        """A read of ``PROBE_NODE``: None if it is answered with its data, else what came."""
        if not self.send(encode(BlockRequest(request_id, PROBE_NODE, "read", 0, PROBE_READ_BYTES))):
            return "the request could not be queued"
        done = self.completion(request_id, timeout_s)
        if done is None:
            return "no answer"
        if done.status != 0 or len(done.data) != PROBE_READ_BYTES:
            return f"answered status {done.status} ({done.message}), {len(done.data)} bytes"
        return None

    def close(self) -> None:
        self.sock.close(linger=0)


class Probes:
    """Request ids for probes, apart from any a fuzzed frame carries."""

    def __init__(self) -> None:
        self._next = 1 << 40

    def next(self) -> int:
        self._next += 1
        return self._next


def fresh_socket_answers(zctx: zmq.Context[Any], endpoint: str, probes: Probes) -> str | None:
    """None if a read from a new DEALER is answered in time, else why not."""
    sock = DataSocket(zctx, endpoint)
    try:
        why = sock.probe(probes.next(), FRESH_S)
    finally:
        sock.close()
    return None if why is None else f"a read from a new socket: {why}"


# -- the QMP plane --------------------------------------------------------------------------

QMP_CLUSTER = ["--iothreads", "2", "--blockdev", f"driver=null-co,node-name={PROBE_NODE},size=64M,iothread=io0"]


def base_commands() -> list[dict[str, Any]]:
    """Valid commands, of every shape of argument the monitor takes, that
    leave the cluster as it was (queries, settings, a node added and deleted)."""
    return [
        {"execute": "query-version"},
        {"execute": "query-status"},
        {"execute": "query-iothreads"},
        {"execute": "query-named-block-nodes"},
        {"execute": "query-commands"},
        {"execute": "query-blockstats", "arguments": {"query-nodes": True}},
        {"execute": "x-query-main-loop"},
        {"execute": "qom-get", "arguments": {"path": "/objects/io1", "property": "poll-max-ns"}},
        {"execute": "qom-set", "arguments": {"path": "/objects/io1", "property": "poll-grow", "value": 2}},
        {"execute": "block-latency-histogram-set", "arguments": {"id": PROBE_NODE, "boundaries": [1000, 100000]}},
        {"execute": "x-blockdev-set-iothread", "arguments": {"node-name": PROBE_NODE, "iothread": "io1"}},
        {"execute": "x-blockdev-set-iothread", "arguments": {"node-name": PROBE_NODE, "iothread": "io0"}},
        {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "fuzz0", "size": MiB,
                                                  "iothread": "io1"}},
        {"execute": "blockdev-del", "arguments": {"node-name": "fuzz0"}},
        {"execute": "qmp_capabilities"},
    ]


QUICK_COMMANDS = ("query-version", "query-status", "query-iothreads", "query-named-block-nodes")
IDS: list[Any] = [1, -7, 0, "abc", "a\"b\\c\u00e9\n\u2603", None, 1.5, {"n": [1, {"m": None}]}, [True], 2**53]
ODD_VALUES: list[Any] = [None, True, False, 0, -1, 2**63, 2**64, -2**63 - 1, 1e308, 0.5, "", "x" * 300,
                         "\u0000", [], {}, [1, "a"], {"a": 1}, [[[[]]]]]
NUMBERS = [b"1e400", b"-1e400", b"-0", b"1" + b"0" * 400, b"18446744073709551616", b"-9223372036854775809",
           b"1e-400", b"NaN", b"Infinity", b"-Infinity", b"01", b"1.", b"-", b".5", b"0x10", b"1e", b"+1"]
STRAY_BYTES = [*range(0x20), 0x7F, 0xFE, 0xFF]
BAD_UTF8 = [b"\xc0\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xc3", b"\xf4\x90\x80\x80",
            b"\\ud800", b"\\udc00\\ud800", b"\\u0000", b"\\uZZZZ", b"\\x41", b"\\"]
MARK = "\u2603\u2603"  # a placeholder string: its bytes are replaced after encoding
MARK_BYTES = MARK.encode()


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def _string_paths(command: dict[str, Any]) -> list[tuple[str, ...]]:
    """Where a command has strings: ("execute",), ("id",), ("arguments", NAME)."""
    paths: list[tuple[str, ...]] = [("execute",), ("id",)]
    for name, value in command.get("arguments", {}).items():
        if isinstance(value, str):
            paths.append(("arguments", name))
    return paths


def _set(command: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of ``command`` with ``value`` at ``path``."""
    out = json.loads(json.dumps(command))
    target = out
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    return dict(out)


def _raw_in_string(rng: random.Random, command: dict[str, Any], raw: bytes) -> bytes:
    """The command with ``raw`` bytes inside one of its strings."""
    path = rng.choice(_string_paths(command))
    original = command.get(path[0], "") if len(path) == 1 else command["arguments"][path[1]]
    text = str(original) if isinstance(original, str) else "abc"
    cut = rng.randrange(len(text) + 1)
    return _json(_set(command, path, text[:cut] + MARK + text[cut:])).replace(MARK_BYTES, raw, 1)


def _raw_value(rng: random.Random, command: dict[str, Any], raw: bytes) -> bytes:
    """The command with ``raw`` as the JSON text of one of its values."""
    names = [("id",), *(("arguments", n) for n in command.get("arguments", {}))]
    return _json(_set(command, rng.choice(names), MARK)).replace(b'"' + MARK_BYTES + b'"', raw, 1)


def mutate_truncated(rng: random.Random, command: dict[str, Any]) -> bytes:
    text = _json(command)
    return text[:rng.randrange(1, len(text))]


def mutate_bit_flips(rng: random.Random, command: dict[str, Any]) -> bytes:
    text = bytearray(_json(command))
    for _ in range(rng.randint(1, 4)):
        text[rng.randrange(len(text))] ^= 1 << rng.randrange(8)
    return bytes(text)


def mutate_stray_in_string(rng: random.Random, command: dict[str, Any]) -> bytes:
    return _raw_in_string(rng, command, bytes([rng.choice(STRAY_BYTES)]))


def mutate_stray_anywhere(rng: random.Random, command: dict[str, Any]) -> bytes:
    text = _json(command)
    cut = rng.randrange(len(text) + 1)
    return text[:cut] + bytes([rng.choice(STRAY_BYTES)]) + text[cut:]


def mutate_bad_utf8(rng: random.Random, command: dict[str, Any]) -> bytes:
    return _raw_in_string(rng, command, rng.choice(BAD_UTF8))


def mutate_huge(rng: random.Random, command: dict[str, Any]) -> bytes:
    """A value of up to 2 MiB (a message over 1 MiB is refused and its session closed)."""
    size = rng.choice([4096, 65536, 600_000, 1_000_000, 1_100_000, 2 * MiB])
    value: Any = rng.choice(["x" * size, [0] * (size // 2), {f"k{i}": i for i in range(size // 12)}])
    names = [("id",), *(("arguments", n) for n in command.get("arguments", {})), ("arguments", "extra")]
    return _json(_set(command, rng.choice(names), value))


def mutate_deep(rng: random.Random, command: dict[str, Any]) -> bytes:
    """Nesting of up to 100,000 levels (the parser's bound is 1,024), closed or not."""
    depth = rng.choice([64, 1000, 1024, 1025, 5000, 100_000])
    opening, closing = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    nested = opening * depth + b"0" + (closing * depth if rng.random() < 0.8 else b"")
    return _raw_value(rng, command, nested)


def mutate_wrong_type(rng: random.Random, command: dict[str, Any]) -> bytes:
    names = [("execute",), ("id",), ("arguments",), *(("arguments", n) for n in command.get("arguments", {}))]
    return _json(_set(command, rng.choice(names), rng.choice(ODD_VALUES)))


def mutate_number(rng: random.Random, command: dict[str, Any]) -> bytes:
    return _raw_value(rng, command, rng.choice(NUMBERS))


def mutate_unknown_command(rng: random.Random, command: dict[str, Any]) -> bytes:
    alphabet = "abcdefghijklmnopqrstuvwxyz-_ \u00e9\u2603\t"
    name = rng.choice(["x-fuzz-", "QUERY-", "query-", "", "quit-not-"]) + "".join(
        rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    return _json({**command, "execute": name})


def mutate_envelope(rng: random.Random, command: dict[str, Any]) -> bytes:
    """A message QMP refuses as a whole: no ``execute``, extra members, not an object."""
    variants: list[Any] = [
        {k: v for k, v in command.items() if k != "execute"},
        {**command, "exec-oob": command["execute"]},
        {**command, "control": {"run-oob": True}},
        {**command, "unknown-member": 1},
        [command], command["execute"], 42, None, True, [], {},
    ]
    return _json(rng.choice(variants))


def mutate_garbage(rng: random.Random, command: dict[str, Any]) -> bytes:
    return rng.randbytes(rng.randint(1, 2048))


Mutation = Callable[[random.Random, dict[str, Any]], bytes]
QMP_MUTATIONS: list[tuple[str, Mutation, int]] = [  # (name, how, weight)
    ("valid", lambda rng, command: _json(command), 4),
    ("truncated", mutate_truncated, 12),
    ("bit flips", mutate_bit_flips, 12),
    ("stray byte in a string", mutate_stray_in_string, 12),
    ("stray byte anywhere", mutate_stray_anywhere, 8),
    ("invalid UTF-8 or escape", mutate_bad_utf8, 8),
    ("huge value", mutate_huge, 3),
    ("deep nesting", mutate_deep, 5),
    ("wrong type", mutate_wrong_type, 10),
    ("odd number", mutate_number, 6),
    ("unknown command", mutate_unknown_command, 6),
    ("bad envelope", mutate_envelope, 5),
    ("garbage", mutate_garbage, 4),
]


BURST_SHARE, SPLIT_SHARE, HALF_CLOSE_SHARE = 0.04, 0.2, 0.1
"""The shares of inputs that are bursts, that are written in pieces, that are followed by a half-close."""


@dataclasses.dataclass
class QmpInput:
    mutation: str
    chunks: list[bytes]
    """What is written, one ``write`` each."""
    half_close: bool
    commands: int = 1

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def delivery(self) -> str:
        if self.half_close:
            return "then half-closed"
        return "split across writes" if len(self.chunks) > 1 else "one write"


def burst(rng: random.Random, n: int) -> bytes:
    """``n`` quick commands, pipelined in one write."""
    return b"".join(_json({"execute": rng.choice(QUICK_COMMANDS), "id": k}) for k in range(n))


def mutated_command(rng: random.Random) -> tuple[str, bytes]:
    """A base command, its id picked, under one of the mutations: (its name, the bytes)."""
    names, mutations, weights = zip(*QMP_MUTATIONS)
    pick = rng.choices(range(len(names)), weights)[0]
    command = rng.choice(base_commands())
    if rng.random() < 0.7:
        command["id"] = rng.choice(IDS)
    return names[pick], mutations[pick](rng, command)


def split(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut in up to nine pieces, at random places."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def qmp_input(rng: random.Random, index: int, counts: Counts) -> QmpInput:
    """The ``index``-th input: a mutated command or a burst (the second
    input is the largest burst), written at once, in pieces, or then half-closed."""
    if index == 1 or rng.random() < BURST_SHARE:
        n = counts.max_burst if index == 1 else rng.randint(2, 300)
        mutation, data, commands = f"burst of {n}", burst(rng, n), n
    else:
        (mutation, data), commands = mutated_command(rng), 1
    delivery = rng.random()
    chunks = split(rng, data) if delivery < SPLIT_SHARE and len(data) > 1 else [data]
    return QmpInput(mutation, chunks, SPLIT_SHARE <= delivery < SPLIT_SHARE + HALF_CLOSE_SHARE, commands)


def probe_bytes(probe_id: str) -> bytes:
    """A byte 0xFF (QEMU's JSON lexer refuses it in any state and starts afresh), then a command."""
    return b"\xff" + _json({"execute": "query-status", "id": probe_id})


def deliver(conn: QmpConnection, qinput: QmpInput, probe_id: str) -> Outcome:
    """Write the input and the probe; the probe's outcome."""
    deadline = time.monotonic() + PROBE_S + qinput.commands * 0.002
    for chunk in [*qinput.chunks, probe_bytes(probe_id)]:
        if not conn.write(chunk, deadline):
            break
    if qinput.half_close:
        conn.shutdown_write()
    return conn.wait_for(probe_id, deadline)


def fuzz_session(cluster: LaunchedCluster, conn: QmpConnection | None, qinput: QmpInput, probe_id: str,
                 tally: Counter[str]) -> tuple[QmpConnection | None, Outcome, str]:
    """One input and its probe on ``conn`` (a new session if None): (the
    session to go on with, None once it is closed; the probe's outcome; why)."""
    if conn is None:
        try:
            conn = open_session(cluster.qmp_path, tally=tally)
        except NoSession as exc:
            return None, Outcome.DEAF, f"no session to send it on: {exc}"
    outcome = deliver(conn, qinput, probe_id)
    why = conn.last_error if outcome is Outcome.REFUSED else outcome.value
    if outcome is not Outcome.ANSWERED or qinput.half_close:
        conn.close()
        return None, outcome, why
    return conn, outcome, why


def qmp_plane(clusters: Clusters, counts: Counts, seed: int, findings: Findings) -> list[Row]:
    rng = random.Random(f"{seed}:qmp")
    target = Target(clusters, "qmp", QMP_CLUSTER)
    row = Row("qmp", "malformed input")
    row.rss_before(target.cluster.rss())
    tally: Counter[str] = Counter()
    conn: QmpConnection | None = None
    try:
        for index in range(counts.qmp_inputs):
            qinput = qmp_input(rng, index, counts)
            row.inputs += 1
            where: dict[str, Any] = {"index": index, "mutation": qinput.mutation, "delivery": qinput.delivery}
            conn, outcome, why = fuzz_session(target.cluster, conn, qinput, f"probe-{index}", tally)
            if outcome is Outcome.REFUSED:
                tally[f"sessions closed by the monitor with an error ({why})"] += 1
            elif outcome is not Outcome.ANSWERED:
                row.deaf += 1
                findings.add("qmp", "deaf session", why, qinput.data, **where)
            row.rss_along(counts.qmp_inputs, target.cluster)
            problem = target.check(row, fresh_session_answers)
            if problem is not None:
                findings.add("qmp", *problem, qinput.data, **where)
                if conn is not None:
                    conn.close()
                    conn = None
    finally:
        if conn is not None:
            conn.close()
    row.rss_after(target.cluster.rss())
    row.notes += [f"{n} {what}" for what, n in sorted(tally.items())]
    row.notes += log_notes(target.cluster)
    return [row]


def log_notes(cluster: LaunchedCluster) -> list[str]:
    n = cluster.tracebacks()
    return [f"{n} traceback(s) in the cluster's log"] if n else []


# -- the data plane -------------------------------------------------------------------------

DATA_IMAGE_BYTES = 16 * MiB
REQUEST_FIELDS = [f.name for f in dataclasses.fields(BlockRequest) if f.name != BlockRequest.PAYLOAD]
EDGE_NUMBERS = [-1, -BS, -2**63, 2**63 - 1, 2**64 - 1, 2**31, 2**32, DATA_IMAGE_BYTES, DATA_IMAGE_BYTES + 1,
                DATA_IMAGE_BYTES - 1, 64 * MiB, 64 * MiB + 1, 32 * MiB + 1, 1]
ODD_FIELDS: list[Any] = [None, True, "0", 1.5, [], {}, b"\x00", -1, 2**64 - 1, "x" * 5000]


def data_cluster_args(image: str) -> list[str]:
    return ["--iothreads", "1",
            "--blockdev", f"driver=null-co,node-name={PROBE_NODE},size=64M,iothread=io0",
            "--blockdev", f"driver=file,node-name=disk0,filename={image},iothread=io0"]


def valid_request(rng: random.Random, request_id: int) -> BlockRequest:
    op = rng.choice(["read", "write", "flush", "discard", "write_zeroes"])
    node = rng.choice([PROBE_NODE, "disk0"])
    offset = rng.randrange(DATA_IMAGE_BYTES // BS) * BS
    length = rng.choice([512, BS, 16 * BS])
    data = rng.randbytes(length) if op == "write" else b""
    return BlockRequest(request_id, node, op, offset, 0 if op == "flush" else length, data=data)


def _with_fields(frames: list[bytes], changes: dict[str, Any]) -> list[bytes]:
    """A request's frames with some of its header's fields changed."""
    version, kind, body = msgpack.unpackb(frames[0])
    for name, value in changes.items():
        body[REQUEST_FIELDS.index(name)] = value
    return [msgpack.packb([version, kind, body]), *frames[1:]]


def _with_envelope(frames: list[bytes], version: Any = None, kind: Any = None, body: Any = None) -> list[bytes]:
    old_version, old_kind, old_body = msgpack.unpackb(frames[0])
    header = [old_version if version is None else version, old_kind if kind is None else kind,
              old_body if body is None else body]
    return [msgpack.packb(header), *frames[1:]]


def frames_truncated(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    return [frames[0][:rng.randrange(len(frames[0]))], *frames[1:]]


def frames_bit_flips(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    header = bytearray(frames[0])
    for _ in range(rng.randint(1, 4)):
        header[rng.randrange(len(header))] ^= 1 << rng.randrange(8)
    return [bytes(header), *frames[1:]]


def frames_bad_version(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    return _with_envelope(frames, version=rng.choice([0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, -1, 255,
                                                      str(PROTOCOL_VERSION), 1.0, [PROTOCOL_VERSION]]))


def frames_bad_kind(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    kind = rng.choice(["", "nonsense", "BLOCK-REQUEST", "block-request\x00", 7, False, ["block-request"],
                       "x" * 5000])
    return _with_envelope(frames, kind=kind)


def frames_other_kind(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """A well-formed message of another kind, control ones included, on the data channel."""
    request_id = msgpack.unpackb(frames[0])[2][0]
    message: Message = rng.choice([
        Stop("fuzz"), Query(request_id), Query(request_id, PROBE_NODE), Hello("io0", os.getpid()),
        Heartbeat(1, time.monotonic_ns()), Welcome(), SetPollParams(request_id, 0, 0, 0),
        BlockCompletion(request_id, 0, "", b"x" * 16), BlockdevDel(request_id, PROBE_NODE),
    ])
    return encode(message)


def frames_bad_range(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    changes = {name: rng.choice(EDGE_NUMBERS) for name in rng.sample(["offset", "length"], rng.randint(1, 2))}
    return _with_fields(frames, changes)


def frames_unknown_op(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    op = rng.choice(["", "READ", "readx", "trim", "zone_append", "x" * 5000, 5, None, "write\x00"])
    return _with_fields(frames, {"op": op})


def frames_long_node(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    return _with_fields(frames, {"node": "n" * rng.choice([128, 255, 256, 4096, 4097, 60_000])})


def frames_wrong_type(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    return _with_fields(frames, {rng.choice(REQUEST_FIELDS): rng.choice(ODD_FIELDS)})


def frames_field_count(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    body = msgpack.unpackb(frames[0])[2]
    body = body[:rng.randrange(len(body))] if rng.random() < 0.5 else [*body, *([0] * rng.randint(1, 300))]
    return _with_envelope(frames, body=body if rng.random() < 0.9 else dict(enumerate(body)))


def frames_payload_mismatch(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    variants = [
        [frames[0], rng.randbytes(rng.choice([1, 511, 4097]))],  # a payload the header does not announce
        [frames[0], b"", b""],  # frames too many
        [_with_fields(frames, {"op": "write", "length": BS})[0]],  # a write without its data
        [_with_fields(frames, {"op": "write", "length": BS})[0], b"x" * (BS - 1)],
    ]
    return list(rng.choice(variants))


def frames_bad_batch(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """Several requests in one message, the batch's sizes or count wrong."""
    request_id = msgpack.unpackb(frames[0])[2][0]
    items = [pack(BlockRequest(request_id + k, PROBE_NODE, "write", 0, 16, data=b"y" * 16))
             for k in range(rng.randint(2, 5))]
    good = encode_batch(items)
    header = msgpack.unpackb(good[0])
    variants = [
        [good[0], good[1][:-1]],  # the payloads a byte short
        [msgpack.packb([header[0], header[1], [*header[2], 16]]), good[1]],  # a size too many
        [msgpack.packb([header[0], header[1], [2**40] * len(header[2])]), good[1]],  # sizes past the frame
        [msgpack.packb([header[0], header[1] * 100, header[2] * 100]), good[1] * 100],  # past 256 items
        [msgpack.packb([header[0], [], []])],  # an empty batch
    ]
    return list(rng.choice(variants))


def frames_msgpack_bomb(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """Headers that claim more than they hold, or nest without end."""
    envelope = b"\x93" + msgpack.packb(PROTOCOL_VERSION) + msgpack.packb(BlockRequest.KIND)
    bombs = [b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\x91" * 100_000,
             envelope + b"\xdd\x7f\xff\xff\xff", envelope + b"\xc7\xff\x01", b"\xc1", b""]
    return [rng.choice(bombs)]


def frames_garbage(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    return [rng.randbytes(rng.randint(0, 4096)) for _ in range(rng.randint(1, 4))]


FrameMutation = Callable[[random.Random, list[bytes]], list[bytes]]
DATA_MUTATIONS: list[tuple[str, FrameMutation, int]] = [  # (name, how, weight)
    ("valid", lambda rng, frames: frames, 4),
    ("truncated", frames_truncated, 10),
    ("bit flips", frames_bit_flips, 12),
    ("bad version", frames_bad_version, 5),
    ("bad kind", frames_bad_kind, 6),
    ("another kind of message", frames_other_kind, 8),
    ("out-of-range offset or length", frames_bad_range, 10),
    ("unknown op", frames_unknown_op, 6),
    ("over-long node name", frames_long_node, 5),
    ("wrong field type", frames_wrong_type, 8),
    ("fields missing or extra", frames_field_count, 5),
    ("payload not as announced", frames_payload_mismatch, 6),
    ("bad batch", frames_bad_batch, 5),
    ("msgpack bomb", frames_msgpack_bomb, 4),
    ("garbage", frames_garbage, 4),
]
RAW_SOCKET_WEIGHT = 0.03
"""The share of inputs that are raw bytes on the endpoint's socket, not ZeroMQ messages."""


def data_input(rng: random.Random, request_id: int) -> tuple[str, list[bytes]]:
    """A mutation of a valid request's frames: (its name, the frames)."""
    names, mutations, weights = zip(*DATA_MUTATIONS)
    pick = rng.choices(range(len(names)), weights)[0]
    return names[pick], mutations[pick](rng, encode(valid_request(rng, request_id)))


def raw_socket_garbage(rng: random.Random, endpoint: str) -> bytes:
    """Bytes written straight to an ipc endpoint's socket (a mangled ZMTP
    greeting or garbage), then the connection closed; what was written."""
    greeting = bytearray(b"\xff" + bytes(8) + b"\x7f\x03\x00NULL" + bytes(16) + b"\x00" + bytes(31))
    for _ in range(rng.randint(0, 6)):
        greeting[rng.randrange(len(greeting))] = rng.randrange(256)
    data = bytes(greeting[:rng.randrange(1, len(greeting) + 1)]) + rng.randbytes(rng.randint(0, 512))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROBE_S)
        with contextlib.suppress(OSError):
            sock.connect(endpoint.removeprefix("ipc://"))
            sock.sendall(data)
    return data


def data_plane(clusters: Clusters, counts: Counts, seed: int, findings: Findings) -> list[Row]:
    rng = random.Random(f"{seed}:data")
    image = os.path.join(clusters.scratch, "data.img")
    with open(image, "wb") as f:
        f.truncate(DATA_IMAGE_BYTES)
    target = Target(clusters, "data", data_cluster_args(image))
    row = Row("data", "malformed frames")
    row.rss_before(target.cluster.rss())
    zctx: zmq.Context[Any] = zmq.Context()
    probes = Probes()
    tally: Counter[str] = Counter()
    sock = DataSocket(zctx, target.cluster.data_endpoint("io0"), tally=tally)
    try:
        for index in range(counts.data_frames):
            row.inputs += 1
            mutation, frames = send_data_input(rng, sock, target.cluster.data_endpoint("io0"))
            where: dict[str, Any] = {"index": index, "mutation": mutation}
            why = sock.probe(probes.next())
            if why is not None:
                row.deaf += 1
                findings.add("data", "deaf socket", why, b"|".join(frames), **where)
            row.rss_along(counts.data_frames, target.cluster)
            problem = target.check(row, lambda cluster: fresh_socket_answers(zctx, cluster.data_endpoint("io0"),
                                                                             probes))
            if problem is not None:
                findings.add("data", *problem, b"|".join(frames), **where)
            if why is not None or problem is not None:
                sock.close()
                sock = DataSocket(zctx, target.cluster.data_endpoint("io0"), tally=tally)
    finally:
        sock.close()
        zctx.destroy(linger=0)
    row.rss_after(target.cluster.rss())
    row.notes.append(f"{tally['error completions']} bad requests answered with an error completion")
    if tally["bad replies"]:
        row.notes.append(f"{tally['bad replies']} replies from the iothread the codec refused")
    row.notes += log_notes(target.cluster)
    return [row]


def send_data_input(rng: random.Random, sock: DataSocket, endpoint: str) -> tuple[str, list[bytes]]:
    """Send the next input, on ``sock`` or as raw bytes on the endpoint's socket: (its mutation, its frames)."""
    if rng.random() < RAW_SOCKET_WEIGHT:
        return "raw bytes on the socket", [raw_socket_garbage(rng, endpoint)]
    mutation, frames = data_input(rng, rng.randrange(1, 1 << 31))
    sock.send(frames)
    return mutation, frames


# -- the NBD plane --------------------------------------------------------------------------

NBD_EXPORT = "e0"
NBD_PROBE_EXPORT = "probe"
"""A read-only export of another node of the same iothread: what the other peers read (the fuzzing
client may write anywhere in ``NBD_EXPORT``, validly too)."""
NBD_GREETING_BYTES = 18  # NBDMAGIC, IHAVEOPT, the handshake flags
NBD_READ_S = 0.01
"""How long a fuzzing connection waits for what the server says back before it hangs up."""
NBD_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length


def nbd_socket(cluster: LaunchedCluster) -> str:
    return os.path.join(cluster.runtime_dir, "nbd.sock")


def nbd_cluster_args(image: str, probe_image: str, runtime_dir: str) -> list[str]:
    return data_cluster_args(image) + [
        "--blockdev", f"driver=file,node-name=nbdprobe,filename={probe_image},read-only=on,iothread=io0",
        "--nbd-server", f"addr.type=unix,addr.path={os.path.join(runtime_dir, 'nbd.sock')}",
        "--export", f"type=nbd,id={NBD_EXPORT},name={NBD_EXPORT},node-name=disk0,writable=on",
        "--export", f"type=nbd,id={NBD_PROBE_EXPORT},name={NBD_PROBE_EXPORT},node-name=nbdprobe"]


class NbdConnection:
    """A well-behaved client: NBD_OPT_GO on the export, then requests one at a time."""

    def __init__(self, path: str, timeout_s: float, export: str = NBD_EXPORT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.cookie = 0
        try:
            self.sock.settimeout(timeout_s)
            self.sock.connect(path)
            handshake = NbdClientHandshake(export)
            while handshake.state is NbdClientState.NEGOTIATING:
                out = handshake.data_to_send()
                if out:
                    self.sock.sendall(out)
                    handshake.data_sent(len(out))
                handshake.receive_data(self.sock.recv(65536))
            if handshake.state is not NbdClientState.TRANSMISSION:
                raise OSError(errno.ECONNRESET, f"handshake refused: {handshake.close_reason}")
        except BaseException:
            self.sock.close()
            raise

    def request(self, command: int, offset: int, length: int, payload: bytes = b"") -> tuple[int, bytes]:
        """One request; (its error, the data of a READ)."""
        self.cookie += 1
        self.sock.sendall(encode_request(command, self.cookie, offset, length, payload=payload))
        header = self._exactly(16)
        magic, error, cookie = struct.unpack(">IIQ", header)
        if magic != NBD_SIMPLE_REPLY_MAGIC or cookie != self.cookie:
            raise OSError(errno.EPROTO, f"a reply out of place: {header!r}")
        data = self._exactly(length) if command == NBD_CMD_READ and not error else b""
        return error, data

    def _exactly(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = self.sock.recv(left)
            if not chunk:
                raise OSError(errno.ECONNRESET, "the server closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


def nbd_answers(cluster: LaunchedCluster, expected: bytes, timeout_s: float) -> str | None:
    """None if a new connection to the probe export reads block 0 back as ``expected``, else why not."""
    try:
        conn = NbdConnection(nbd_socket(cluster), timeout_s, NBD_PROBE_EXPORT)
    except OSError as exc:
        return f"a new NBD client could not connect or negotiate: {exc}"
    try:
        error, data = conn.request(NBD_CMD_READ, 0, BS)
        return None if (error, data) == (0, expected) else f"a new NBD client read error {error} / other data"
    except OSError as exc:
        return f"a new NBD client got no answer: {exc}"
    finally:
        conn.close()


def nbd_input(rng: random.Random) -> tuple[str, bool, bytes]:
    """The next hostile input: (its mutation, whether it follows a valid
    handshake, the bytes sent after the greeting or after the handshake)."""
    flags = struct.pack(">I", NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
    kind = rng.randrange(8)
    if kind == 0:
        return "negotiation: random bytes", False, rng.randbytes(rng.randrange(1, 300))
    if kind == 1:
        return "negotiation: bad client flags", False, rng.randbytes(4)
    if kind == 2:
        option = NBD_OPTION.pack(rng.getrandbits(64), NBD_OPT_GO, 0)
        return "negotiation: bad option magic", False, flags + option
    if kind == 3:
        length = rng.choice([1 << 31, (1 << 32) - 1, 65536 + 1, rng.getrandbits(32)])
        body = rng.randbytes(rng.randrange(0, 64))
        return "negotiation: option length past its data", False, flags + NBD_OPTION.pack(
            0x49484156454F5054, rng.choice([NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_SET_META_CONTEXT]),
            length) + body
    if kind == 4:
        code = rng.choice([0, 11, 99, rng.getrandbits(32)])
        body = rng.randbytes(rng.randrange(0, 64))
        return "negotiation: unknown or malformed option", False, flags + NBD_OPTION.pack(
            0x49484156454F5054, code, len(body)) + body
    # After a valid NBD_OPT_GO: transmission requests.
    size = DATA_IMAGE_BYTES
    if kind == 5:
        header = bytearray(encode_request(NBD_CMD_READ, rng.getrandbits(64), 0, BS))
        for _ in range(rng.randrange(1, 4)):
            header[rng.randrange(len(header))] = rng.randrange(256)
        return "request: a mutated header", True, bytes(header)
    if kind == 6:
        command = rng.choice([NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES,
                              NBD_CMD_BLOCK_STATUS, NBD_CMD_CACHE, 99, rng.randrange(1 << 16)])
        offset = rng.choice([0, size - BS, size, size + BS, (1 << 63) - 1, rng.getrandbits(64)])
        length = rng.choice([0, 1, BS, 33 << 20, (1 << 32) - 1])
        flags_ = rng.choice([0, NBD_CMD_FLAG_FUA, rng.randrange(1 << 16)])
        payload = rng.randbytes(min(length, 256)) if command == NBD_CMD_WRITE else b""
        return "request: bad command, flags, offset or length", True, encode_request(
            command, rng.getrandbits(64), offset, length, flags_, payload)
    cut = encode_request(NBD_CMD_WRITE, rng.getrandbits(64), 0, BS, payload=rng.randbytes(BS))
    return "request: cut off mid-request", True, cut[:rng.randrange(1, len(cut))]


def send_nbd_input(path: str, after_handshake: bool, data: bytes) -> None:
    """Connect, (negotiate,) send ``data``, read what comes back for a moment, hang up."""
    if after_handshake:
        conn = NbdConnection(path, FRESH_S)
        sock = conn.sock
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(FRESH_S)
        sock.connect(path)
        try:
            greeting = b""
            while len(greeting) < NBD_GREETING_BYTES:
                chunk = sock.recv(NBD_GREETING_BYTES - len(greeting))
                if not chunk:
                    raise OSError(errno.ECONNRESET, "the server closed the connection before its greeting")
                greeting += chunk
        except BaseException:
            sock.close()
            raise
    try:
        sock.sendall(data)
        sock.settimeout(NBD_READ_S)
        while sock.recv(65536):
            pass
    except OSError:
        pass  # (refused, reset, or nothing more said in NBD_READ_S: what a hostile client sees)
    finally:
        sock.close()


def nbd_plane(clusters: Clusters, counts: Counts, seed: int, findings: Findings) -> list[Row]:
    rng = random.Random(f"{seed}:nbd")
    image, probe_image = os.path.join(clusters.scratch, "nbd.img"), os.path.join(clusters.scratch, "probe.img")
    expected = rng.randbytes(BS)
    with open(image, "wb") as f:
        f.truncate(DATA_IMAGE_BYTES)
    with open(probe_image, "wb") as f:
        f.write(expected)  # block 0 of the probe export: what every probe reads back
    target = Target(clusters, "nbd", nbd_cluster_args(image, probe_image, os.path.join(clusters.scratch, "nbd.run")))
    row = Row("nbd", "malformed negotiation and requests")
    row.rss_before(target.cluster.rss())
    mutations: Counter[str] = Counter()
    probe = NbdConnection(nbd_socket(target.cluster), FRESH_S, NBD_PROBE_EXPORT)  # another peer, connected throughout
    try:
        for index in range(counts.nbd_inputs):
            row.inputs += 1
            mutation, after_handshake, data = nbd_input(rng)
            mutations[mutation] += 1
            where: dict[str, Any] = {"index": index, "mutation": mutation}
            try:
                send_nbd_input(nbd_socket(target.cluster), after_handshake, data)
            except OSError as exc:
                findings.add("nbd", "refused", f"the fuzzing client could not connect or negotiate: {exc}", data,
                             **where)
            why: str | None = None
            try:
                error, got = probe.request(NBD_CMD_READ, 0, BS)
                if (error, got) != (0, expected):
                    why = f"the connected client read error {error} / other data"
            except OSError as exc:
                why = f"the connected client got no answer: {exc}"
            if why is not None:
                row.deaf += 1
                findings.add("nbd", "other peer harmed", why, data, **where)
            row.rss_along(counts.nbd_inputs, target.cluster)
            problem = target.check(row, lambda cluster: nbd_answers(cluster, expected, FRESH_S))
            if problem is not None:
                findings.add("nbd", *problem, data, **where)
            if why is not None or problem is not None:
                probe.close()
                probe = NbdConnection(nbd_socket(target.cluster), FRESH_S, NBD_PROBE_EXPORT)
    finally:
        probe.close()
    row.rss_after(target.cluster.rss())
    row.notes.append(", ".join(f"{m} {n}" for m, n in sorted(mutations.items())))
    row.notes += log_notes(target.cluster)
    return [row]


# -- the faults plane -----------------------------------------------------------------------

WORKLOAD_DEPTH = 8
FLUSH_EVERY = 16
HEADER = struct.Struct("<QQ")


def pattern(seed: int, block: int, generation: int) -> bytes:
    """Block ``block``'s content at ``generation``: both named in its first
    16 bytes, the rest derived from them and the seed."""
    head = HEADER.pack(block, generation)
    digest = hashlib.sha256(head + seed.to_bytes(8, "little")).digest()
    return head + (digest * (BS // len(digest)))[:BS - HEADER.size]


def generation_of(seed: int, block: int, data: bytes) -> int | None:
    """The generation of the pattern ``data`` holds for ``block``, None if it holds none."""
    if len(data) != BS:
        return None
    named_block, generation = HEADER.unpack_from(data)
    if named_block != block or pattern(seed, block, generation) != data:
        return None
    return int(generation)


class Workload:
    """4 KiB writes of ``pattern`` to random blocks of a node, a few in
    flight (never two on one block), a flush after every few
    acknowledgements.  What it must read back: per block, the generation
    last acknowledged before a flush that succeeded was sent (a flush makes
    the writes completed before it durable), or one written after it."""

    def __init__(self, client: BlockClient, node: str, blocks: int, seed: int, rng: random.Random) -> None:
        self.client = client
        self.node = node
        self.seed = seed
        self.rng = rng
        self.issued = [0] * blocks  # the last generation sent, per block
        self.acked = [0] * blocks  # the last generation acknowledged
        self.durable = [0] * blocks  # the generation a flush covered (0: nothing to check)
        self.floor = [0] * blocks  # generations up to this one a fault may have destroyed
        self.in_flight: set[int] = set()
        self.flushing = False
        self.acked_since_flush = 0
        self.acks = 0
        self.errors: Counter[str] = Counter()
        self.stopping = False

    # -- running -------------------------------------------------------------------------

    def _submit_write(self) -> bool:
        free = [b for b in range(len(self.issued)) if b not in self.in_flight]
        if not free:
            return False
        block = self.rng.choice(free)
        generation = self.issued[block] + 1
        try:
            self.client.submit(self.node, "write", block * BS, BS, pattern(self.seed, block, generation),
                               callback=lambda status, message, data: self._written(block, generation, status))
        except (BlockIOError, StateError) as exc:
            self._error(exc)
            return False
        self.issued[block] = generation
        self.in_flight.add(block)
        return True

    def _written(self, block: int, generation: int, status: int) -> None:
        self.in_flight.discard(block)
        if status < 0:
            self.errors[errno.errorcode.get(-status, str(-status))] += 1
            return
        self.acks += 1
        if generation > self.floor[block]:
            self.acked[block] = max(self.acked[block], generation)
            self.acked_since_flush += 1

    def _submit_flush(self) -> bool:
        covered = list(self.acked)
        try:
            self.client.submit(self.node, "flush", callback=lambda status, message, data: self._flushed(covered,
                                                                                                         status))
        except (BlockIOError, StateError) as exc:
            self._error(exc)
            return False
        self.flushing = True
        self.acked_since_flush = 0
        return True

    def _flushed(self, covered: list[int], status: int) -> None:
        self.flushing = False
        if status < 0:
            self.errors[f"flush {errno.errorcode.get(-status, str(-status))}"] += 1
            return
        for block, generation in enumerate(covered):
            if generation > self.floor[block]:
                self.durable[block] = max(self.durable[block], generation)

    def _error(self, exc: Exception) -> None:
        code = getattr(exc, "errno", None)
        self.errors[errno.errorcode.get(code, type(exc).__name__) if code else type(exc).__name__] += 1

    def step(self, timeout_s: float) -> None:
        """Submit what is due, then wait up to ``timeout_s`` for completions."""
        refused = False
        if not self.stopping:
            if self.acked_since_flush >= FLUSH_EVERY and not self.flushing:
                refused = not self._submit_flush()
            while not refused and len(self.in_flight) < WORKLOAD_DEPTH:
                refused = not self._submit_write()
        # A refused submission (the iothread is away): wait a little before the next try.
        waiting = bool(self.in_flight or self.flushing or refused)
        self.client.ctx.poll(waiting, int(timeout_s * 1e9) if waiting else -1)

    def run(self, until: Callable[[], bool], timeout_s: float) -> bool:
        """Run until ``until()`` is true (True) or ``timeout_s`` passed (False)."""
        end = time.monotonic() + timeout_s
        while not until():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.step(min(left, 0.05))
        return True

    def run_acks(self, n: int, timeout_s: float = PROGRESS_S) -> bool:
        """Run until ``n`` more writes were acknowledged."""
        target = self.acks + n
        return self.run(lambda: self.acks >= target, timeout_s)

    def finish(self, timeout_s: float = PROGRESS_S) -> bool:
        """No new writes; those in flight complete, then one last flush; whether all was answered."""
        self.stopping = True
        if not self.run(lambda: not self.in_flight and not self.flushing, timeout_s):
            return False
        if self.acked_since_flush:
            self.stopping = False
            self._submit_flush()
            self.stopping = True
        return self.run(lambda: not self.flushing, timeout_s)

    def outcomes(self) -> Counter[str]:
        """Writes acknowledged ("acknowledged") and requests failed (by errno name)."""
        return Counter({"acknowledged": self.acks, **self.errors})

    # -- faults and the check ----------------------------------------------------------------

    def forget_from(self, first_block: int) -> None:
        """Blocks from ``first_block`` on were destroyed (the image was
        truncated): what was sent to them so far need not be there."""
        for block in range(first_block, len(self.issued)):
            self.floor[block] = self.issued[block]
            self.acked[block] = self.durable[block] = 0

    def lost(self, read: Callable[[int], bytes | None], where: str) -> dict[int, str]:
        """The blocks whose durable generation ``read(block)`` does not find
        (``read`` returns None where it cannot read: not counted), each with
        what ``where`` held instead."""
        lost = {}
        for block, durable in enumerate(self.durable):
            if not durable:
                continue
            data = read(block)
            if data is None:
                continue
            generation = generation_of(self.seed, block, data)
            if generation is None or not durable <= generation <= self.issued[block]:
                held = "no generation" if generation is None else f"generation {generation}"
                lost[block] = (f"block {block}: {where} holds {held}, flushed {durable}, "
                               f"acknowledged {self.acked[block]}, sent {self.issued[block]}")
        return lost


FAULTS_CLUSTER = ["--iothreads", "2", "--restart"]
ENOSPC_FS_SHARE = 2
"""The small file system holds 1/ENOSPC_FS_SHARE of the workload's region."""


class Stuck(Exception):
    """A fault's own way back did not come (an iothread not restarted, no I/O while the launcher is stopped)."""


@dataclasses.dataclass
class FaultTarget:
    """What a fault acts on: the cluster, its workload, the node's image."""

    cluster: LaunchedCluster
    workload: Workload
    image: str
    pause_s: float


class FaultCase:
    """One fault, injected while the workload runs.  ``inject`` runs the
    workload through it; it returns the pids it killed, or raises ``Stuck``."""

    name = ""
    image_dir = ""

    @contextlib.contextmanager
    def prepared(self, scratch: str, counts: Counts) -> Iterator[str | None]:
        """Around its rounds: what they need set up, undone afterwards; gives
        why the case cannot run, or None."""
        self.image_dir = scratch
        yield None

    def inject(self, target: FaultTarget) -> set[int]:
        raise NotImplementedError


class KillIothread(FaultCase):
    name = "SIGKILL iothread"

    def inject(self, target: FaultTarget) -> set[int]:
        pid = target.cluster.iothread_pids()["io0"]
        os.kill(pid, signal.SIGKILL)
        if not target.workload.run(lambda: target.cluster.iothread_pids()["io0"] != pid, PROGRESS_S):
            raise Stuck(f"io0 was not restarted in {PROGRESS_S:g} s")
        return {pid}


class StopIothread(FaultCase):
    name = "SIGSTOP iothread"

    def inject(self, target: FaultTarget) -> set[int]:
        stopped_for(target.cluster.iothread_pids()["io0"], target.pause_s, target.workload)
        return set()


class StopLauncher(FaultCase):
    """Block I/O does not pass through the main loop: it goes on while the launcher is stopped."""

    name = "SIGSTOP launcher"

    def inject(self, target: FaultTarget) -> set[int]:
        before = target.workload.acks
        stopped_for(target.cluster.pid, target.pause_s, target.workload)
        if target.workload.acks == before:
            raise Stuck("no write was acknowledged while the launcher was stopped")
        return set()


class TruncateImage(FaultCase):
    name = "truncated image"

    def inject(self, target: FaultTarget) -> set[int]:
        half = len(target.workload.issued) // 2
        os.truncate(target.image, half * BS)
        target.workload.forget_from(half)
        return set()


class UnlinkImage(FaultCase):
    name = "unlinked image"

    def inject(self, target: FaultTarget) -> set[int]:
        os.unlink(target.image)  # the iothread and the check hold it open
        return set()


class FullFileSystem(FaultCase):
    """The image on a tmpfs smaller than the workload's region: writes to
    blocks not yet allocated fail with ENOSPC once it is full."""

    name = "ENOSPC"

    @contextlib.contextmanager
    def prepared(self, scratch: str, counts: Counts) -> Iterator[str | None]:
        self.image_dir = os.path.join(scratch, "small-fs")
        made = mounted = False
        try:
            with sigint_held():  # a Ctrl-C lands once what was done is recorded for the clean-up
                os.mkdir(self.image_dir, mode=0o700)
                made = True
                why = mount_tmpfs(self.image_dir, counts.blocks * BS // ENOSPC_FS_SHARE)
                mounted = why is None
            yield None if mounted else f"skipped: a small tmpfs could not be mounted (it takes root): {why}"
        finally:
            with sigint_held():
                if mounted or (made and os.path.ismount(self.image_dir)):  # (mounted whatever mount said)
                    unmount(self.image_dir)
                if made:
                    os.rmdir(self.image_dir)

    def inject(self, target: FaultTarget) -> set[int]:
        if not target.workload.run(lambda: target.workload.errors["ENOSPC"] > 0, PROGRESS_S):
            raise Stuck("no write failed with ENOSPC: the file system did not fill up")
        return set()



def mount_tmpfs(path: str, size_bytes: int) -> str | None:
    """Mount a tmpfs of ``size_bytes`` at ``path``; why it could not be, or None."""
    try:
        # In a session of its own: a Ctrl-C at the terminal is this script's to
        # handle, and must not end a mount half-way (mounted, but reported failed).
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k,mode=0700", "tmpfs", path],
                             capture_output=True, text=True, start_new_session=True)
    except OSError as exc:
        return str(exc)
    return (out.stderr.strip() or f"status {out.returncode}") if out.returncode else None


def unmount(path: str) -> None:
    """Unmount ``path``; lazily if it is still busy."""
    if subprocess.run(["umount", path], capture_output=True, start_new_session=True).returncode != 0:
        subprocess.run(["umount", "-l", path], capture_output=True, start_new_session=True)


FAULT_CASES: list[type[FaultCase]] = [KillIothread, StopIothread, StopLauncher, TruncateImage, UnlinkImage,
                                      FullFileSystem]


def stopped_for(pid: int, pause_s: float, workload: Workload) -> None:
    """SIGSTOP ``pid`` for ``pause_s`` while the workload runs, then SIGCONT."""
    os.kill(pid, signal.SIGSTOP)
    try:
        end = time.monotonic() + pause_s
        workload.run(lambda: time.monotonic() >= end, pause_s + 1)
    finally:
        os.kill(pid, signal.SIGCONT)


def add_node(cluster: LaunchedCluster, node: str, image: str) -> None:
    reply = qmp(cluster, "blockdev-add", {"driver": "file", "node-name": node, "filename": image, "iothread": "io0"})
    if "return" not in reply:
        raise RuntimeError(f"blockdev-add {node}: {reply}")


def node_names(cluster: LaunchedCluster) -> set[str]:
    try:
        return {n["node-name"] for n in qmp(cluster, "query-named-block-nodes").get("return", [])}
    except NoSession:
        return set()


def lost_writes(workload: Workload, client: BlockClient, node_served: bool, fd: int) -> dict[int, str]:
    """Blocks whose durable write is not there: read through the cluster
    (when it serves the node) and from the image file."""

    def through_cluster(block: int) -> bytes | None:
        try:
            return client.read(workload.node, block * BS, BS)
        except (BlockIOError, StateError, TimeoutError):
            return None

    def from_file(block: int) -> bytes:
        return os.pread(fd, BS, block * BS).ljust(BS, b"\0")

    lost = workload.lost(from_file, "the file")
    if node_served:
        for block, what in workload.lost(through_cluster, "the cluster").items():
            lost[block] = f"{lost[block]}; {what.split(': ', 1)[1]}" if block in lost else what
    return lost


@dataclasses.dataclass
class RoundResult:
    killed: set[int]
    stuck: str | None
    """Why the workload or the fault's way back stopped, None if neither did."""
    served: bool
    """Whether the cluster still had the node at the end."""
    lost: dict[int, str]
    """The blocks whose flushed write was not read back, each with what was read instead."""
    outcomes: Counter[str]


def fault_round(case: FaultCase, cluster: LaunchedCluster, counts: Counts, seed: int, index: int) -> RoundResult:
    """One round of a case: a node on a new image, the workload, the fault,
    the workload again, the last writes flushed, and the check."""
    node = f"w{index}{type(case).__name__.lower()}"
    image = os.path.join(case.image_dir, f"{node}.img")
    with open(image, "wb") as f:
        f.truncate(counts.blocks * BS)
    fd = os.open(image, os.O_RDONLY)  # for the check, whatever happens to its name
    try:
        add_node(cluster, node, image)
        with BlockClient(cluster.runtime_dir, timeout_s=PROGRESS_S) as client:
            workload = Workload(client, node, counts.blocks, seed, random.Random(f"{seed}:{case.name}:{index}"))
            killed: set[int] = set()
            stuck = None if workload.run_acks(counts.warm_acks) else "no progress before the fault"
            try:
                killed = case.inject(FaultTarget(cluster, workload, image, counts.pause_s))
            except Stuck as exc:
                stuck = stuck or str(exc)
            if stuck is None and not (workload.run_acks(counts.warm_acks) and workload.finish()):
                stuck = "no progress after the fault"
            served = cluster.alive() and node in node_names(cluster)
            lost = lost_writes(workload, client, served, fd)
        if served:
            qmp(cluster, "blockdev-del", {"node-name": node})
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
    return RoundResult(killed, stuck, served, lost, workload.outcomes())


def count_round(row: Row, case: FaultCase, result: RoundResult, findings: Findings, index: int) -> None:
    """A round's result in its row: a node lost, else a hang; writes lost.
    (Its workload's outcomes are the caller's to add up.)"""
    if not result.served:
        row.nodes_lost += 1
        findings.add("faults", "node lost", f"{case.name}: the cluster no longer has the node ({result.stuck})",
                     round=index)
    elif result.stuck is not None:
        row.hangs += 1
        findings.add("faults", "hang", f"{case.name}: {result.stuck}", round=index)
    if result.lost:
        row.writes_lost += len(result.lost)
        findings.add("faults", "writes lost", f"{case.name}: blocks {sorted(result.lost)[:20]} "
                                              f"({'; '.join(result.lost[b] for b in sorted(result.lost)[:3])})",
                     round=index)


def outcomes_note(outcomes: Counter[str]) -> str:
    failed = ", ".join(f"{name} {n}" for name, n in sorted(outcomes.items()) if name != "acknowledged")
    return f"{outcomes['acknowledged']:,} writes acknowledged" + (f"; failed: {failed}" if failed else "")


def fault_rows(clusters: Clusters, counts: Counts, seed: int, findings: Findings) -> list[Row]:
    target = Target(clusters, "faults", FAULTS_CLUSTER)
    rows = []
    for case_type in FAULT_CASES:
        print(f"faults: {case_type.name}", flush=True)
        row = Row("faults", case_type.name)
        rows.append(row)
        case = case_type()
        with case.prepared(clusters.scratch, counts) as skipped:
            if skipped is not None:
                row.notes.append(skipped)
                continue
            row.rss_before(target.cluster.rss())
            mark = target.mark
            outcomes: Counter[str] = Counter()
            for index in range(counts.fault_rounds):
                row.inputs += 1
                result = fault_round(case, target.cluster, counts, seed, index)
                count_round(row, case, result, findings, index)
                outcomes += result.outcomes
                problem = target.check(row, fresh_session_answers, frozenset(result.killed))
                if problem is not None:
                    findings.add("faults", problem[0], f"{case.name}: {problem[1]}", round=index)
                    mark = 0
            row.rss_after(target.cluster.rss())
            row.notes.append(outcomes_note(outcomes))
        if case_type is FullFileSystem:
            row.notes.append(f"{len(target.cluster.events_since(mark, 'BLOCK_IO_ERROR'))} BLOCK_IO_ERROR events")
    rows[-1].notes += log_notes(target.cluster)
    return rows


# -- the resources plane --------------------------------------------------------------------

RESOURCES_NULL_BYTES = 2 << 30
RESOURCES_CLUSTER = ["--iothreads", "2",
                     "--blockdev", f"driver=null-co,node-name={PROBE_NODE},size={RESOURCES_NULL_BYTES},iothread=io0"]
STALL_S = 0.5
"""A writer that could not write for this long has met back-pressure."""
RSS_SAMPLE_S = 0.05
QUIET_S = 0.5
"""Connections that got no answer while none came for this long are taken as not served."""


class PeakRss:
    """The largest VmRSS seen of some processes, sampled while waiting."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.peak_mib = 0.0

    def sample(self) -> None:
        for pid in self.pids:
            self.peak_mib = max(self.peak_mib, rss_mib(pid) or 0.0)

    def watch(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.sample()
            time.sleep(RSS_SAMPLE_S)  # sampling, not synchronising


def many_sessions(cluster: LaunchedCluster, counts: Counts, row: Row) -> None:
    """More QMP sessions at once than the launcher has fds for; then
    ``object-add`` (a new process: fds) on a session opened before them.
    A session accepted but neither greeted nor closed leaves its client
    waiting: deaf."""
    control = open_session(cluster.qmp_path)
    conns: list[QmpConnection] = []
    try:
        not_accepted = open_many(cluster.qmp_path, counts.nofile + counts.over_limit, conns)
        greeted, closed, silent, errors = greetings(conns)
        row.deaf += silent
        row.notes.append(f"{len(conns)} sessions at once: {greeted} greeted, {closed} refused "
                         f"({'; '.join(sorted(errors)) or 'no error given'}), {silent} neither"
                         + (f"; {not_accepted}" if not_accepted else ""))
        reply = control.execute("object-add", {"qom-type": "iothread", "id": "extra"}, time.monotonic() + FRESH_S)
        if reply is None:
            row.deaf += 1
        row.notes.append(f"object-add with them open: {'no answer' if reply is None else describe(reply)}")
        if reply is not None and "return" in reply:
            control.execute("object-del", {"id": "extra"}, time.monotonic() + FRESH_S)
    finally:
        for conn in conns:
            conn.close()
        control.close()


def open_many(path: str, n: int, conns: list[QmpConnection]) -> str:
    """Connect up to ``n`` times, as blocking clients do, into ``conns``;
    why it stopped short ("" if it did not)."""
    for _ in range(n):
        try:
            conns.append(QmpConnection(path, connect_timeout_s=PROBE_S))
        except OSError as exc:  # the listener no longer accepts: a client would wait in connect
            return f"connection {len(conns) + 1} not accepted ({exc or type(exc).__name__})"
    return ""


def greetings(conns: Sequence[QmpConnection]) -> tuple[int, int, int, set[str]]:
    """Wait (bounded) for each connection's first line: (greeted, refused,
    neither, the errors the refused ones were given)."""
    deadline = time.monotonic() + PROBE_S
    greeted = closed = silent = 0
    errors: set[str] = set()
    for conn in conns:
        first = conn.reply(deadline)
        if first is not None and "QMP" in first:
            greeted += 1
        elif first is not None or conn.eof:
            closed += 1
            if conn.last_error:
                errors.add(conn.last_error)
        else:
            silent += 1
    return greeted, closed, silent, errors


def describe(reply: dict[str, Any]) -> str:
    if "return" in reply:
        return "done"
    return f"refused ({reply.get('error', {}).get('desc', reply)})"


def many_connections(cluster: LaunchedCluster, counts: Counts, row: Row) -> None:
    """More data connections at once than an iothread has fds for, a read
    on each; then, with them open, a read from a new block client, which
    must be answered or refused (else it is deaf)."""
    n = counts.nofile + counts.over_limit
    zctx: zmq.Context[Any] = zmq.Context()
    zctx.set(zmq.MAX_SOCKETS, n + 64)
    socks: list[DataSocket] = []
    try:
        endpoint = cluster.data_endpoint("io0")
        for k in range(n):
            socks.append(DataSocket(zctx, endpoint))
            socks[-1].send(encode(BlockRequest(k + 1, PROBE_NODE, "read", 0, PROBE_READ_BYTES)))
        answered = answered_reads(socks, PROBE_S)
        while_open = block_client_read(cluster)
        row.deaf += while_open == "no answer"
        row.notes.append(f"{n} connections at once, a read on each: {answered} answered; "
                         f"a new block client's read with them open: {while_open}")
    finally:
        for sock in socks:
            sock.close()
        zctx.destroy(linger=0)


def answered_reads(socks: Sequence[DataSocket], timeout_s: float) -> int:
    """How many of ``socks`` got a completion (one read each): until all
    did, none did for ``QUIET_S`` (those left are not served), or ``timeout_s``."""
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock.sock, zmq.POLLIN)
    answered = 0
    deadline = time.monotonic() + timeout_s
    while answered < len(socks) and (left := deadline - time.monotonic()) > 0:
        ready = poller.poll(int(min(left, QUIET_S) * 1000) + 1)
        if not ready:
            break
        for sock, _ in ready:
            sock.recv_multipart()
            poller.unregister(sock)
            answered += 1
    return answered


def block_client_read(cluster: LaunchedCluster) -> str:
    """A read through a new ``BlockClient``, as a user's: "answered", the error it got, or "no answer"."""
    try:
        with BlockClient(cluster.runtime_dir, timeout_s=PROBE_S) as client:
            client.read(PROBE_NODE, 0, PROBE_READ_BYTES)
    except TimeoutError:
        return "no answer"
    except (BlockIOError, StateError) as exc:
        return f"refused ({exc})"
    return "answered"


def unread_qmp_input(cluster: LaunchedCluster, counts: Counts, row: Row) -> None:
    """Pipelined commands written, their replies never read, behind a
    command that waits on a stopped iothread (``query-blockstats`` asks io0)."""
    conn = open_session(cluster.qmp_path)
    io0 = cluster.iothread_pids()["io0"]
    peak = PeakRss([cluster.pid])
    os.kill(io0, signal.SIGSTOP)
    try:
        conn.sock.send(_json({"execute": "query-blockstats", "arguments": {"query-nodes": True}}))
        written = write_until_stalled(conn.sock, counts.unread_qmp_bytes, peak.sample)
        peak.watch(counts.watch_s)
    finally:
        os.kill(io0, signal.SIGCONT)
        conn.close()
    how = "all written" if written >= counts.unread_qmp_bytes else "written, then the monitor stopped reading"
    row.notes.append(f"{written / MiB:.1f} of {counts.unread_qmp_bytes / MiB:.1f} MiB {how} "
                     f"(the sockets' buffers included); launcher peak {peak.peak_mib:.0f} MiB")


def write_until_stalled(sock: socket.socket, total_bytes: int, between: Callable[[], None]) -> int:
    """Write pipelined ``query-status`` commands to the non-blocking ``sock``
    until ``total_bytes`` or until it took nothing for ``STALL_S``; the bytes
    written.  ``between()`` runs after each write."""
    chunk = b"".join(_json({"execute": "query-status", "id": k}) for k in range(2048))
    written = 0
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while written < total_bytes:
        if not poller.poll(int(STALL_S * 1000)):
            break  # back-pressure
        try:
            written += sock.send(chunk[:total_bytes - written])
        except BlockingIOError:
            continue
        except OSError:
            break  # closed by the monitor
        between()
    return written


def unread_reads(cluster: LaunchedCluster, counts: Counts, row: Row) -> None:
    """Large reads sent, their replies never read."""
    io0 = cluster.iothread_pids()["io0"]
    peak = PeakRss([io0])
    zctx: zmq.Context[Any] = zmq.Context()
    sock = DataSocket(zctx, cluster.data_endpoint("io0"), rcvhwm=1)
    queued = 0
    try:
        for k in range(counts.unread_reads):
            queued += sock.send(encode(BlockRequest(k + 1, PROBE_NODE, "read", 0, counts.unread_read_bytes)))
            peak.sample()
        peak.watch(counts.watch_s)
    finally:
        sock.close()
        zctx.destroy(linger=0)
    row.notes.append(f"{queued} reads of {counts.unread_read_bytes // MiB} MiB unread; "
                     f"iothread peak {peak.peak_mib:.0f} MiB")


ResourceCase = Callable[[LaunchedCluster, Counts, Row], None]
RESOURCE_CASES: list[tuple[str, ResourceCase]] = [
    ("QMP sessions over the fd limit", many_sessions),
    ("data connections over the fd limit", many_connections),
    ("QMP input never read", unread_qmp_input),
    ("data replies never read", unread_reads),
]


def resource_rows(clusters: Clusters, counts: Counts, seed: int, findings: Findings) -> list[Row]:
    target = Target(clusters, "resources", RESOURCES_CLUSTER, counts.nofile)
    rows = []
    for name, case in RESOURCE_CASES:
        print(f"resources: {name}", flush=True)
        row = Row("resources", name, inputs=1)
        rows.append(row)
        row.rss_before(target.cluster.rss())
        try:
            case(target.cluster, counts, row)
        except NoSession as exc:
            row.notes.append(f"no session: {exc}")
        problem = target.check(row, answers_qmp_and_data)
        if problem is not None:
            findings.add("resources", problem[0], f"{name}: {problem[1]}")
        else:
            row.rss_after(target.cluster.rss())
    rows[0].notes.append(f"the cluster's RLIMIT_NOFILE: {counts.nofile}")
    rows[-1].notes += log_notes(target.cluster)
    return rows


def answers_qmp_and_data(cluster: LaunchedCluster) -> str | None:
    """A new QMP session is answered, and a read from a new socket to io0 (the node's iothread)."""
    why = fresh_session_answers(cluster)
    if why is not None:
        return why
    zctx: zmq.Context[Any] = zmq.Context()
    try:
        return fresh_socket_answers(zctx, cluster.data_endpoint("io0"), Probes())
    finally:
        zctx.destroy(linger=0)


# -- output -------------------------------------------------------------------------------------

COLUMNS = ("plane", "case", "inputs", "crashes", "hangs", "deaf", "writes lost", "nodes lost",
           "launcher MiB", "iothread MiB")


def _rss_cell(pair: Sequence[float | None], between: str = " -> ") -> str:
    return between.join("-" if v is None else f"{v:.0f}" for v in pair)


def table_cells(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    return [COLUMNS, *(
        (r.plane, r.case, f"{r.inputs:,}", str(r.crashes), str(r.hangs), str(r.deaf), str(r.writes_lost),
         str(r.nodes_lost), _rss_cell(r.launcher_rss_mib), _rss_cell(r.iothread_rss_mib))
        for r in rows
    )]


def print_table(rows: Sequence[Row]) -> None:
    cells = table_cells(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for n, line in enumerate(cells):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    notes = [(r, note) for r in rows for note in r.notes]
    notes += [(r, "launcher / iothread MiB along the run: " + ", ".join(
        f"{_rss_cell(mib, ' / ')} after {n:,}" for n, *mib in r.rss_trace)) for r in rows if r.rss_trace]
    if notes:
        print()
    for r, note in notes:
        print(f"{r.plane} / {r.case}: {note}")


def print_findings(findings: Findings, limit: int = 10) -> None:
    if not findings.items:
        return
    print(f"\nfindings ({len(findings.items) + findings.dropped}; the first {min(limit, len(findings.items))}):")
    for item in findings.items[:limit]:
        where = ", ".join(f"{k} {v}" for k, v in item.items() if k not in ("plane", "what", "detail", "input"))
        print(f"  {item['plane']}: {item['what']}: {item['detail']}" + (f" [{where}]" if where else ""))
        if "input" in item:
            print(f"    input: {item['input']}")


def machine_note(load_start: float, load_end: float) -> str:
    cpus = len(os.sched_getaffinity(0))
    return f"{cpus} CPUs, load average {load_start:.2f} at the start, {load_end:.2f} at the end"


def write_json(path: str, report: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


# -- main -----------------------------------------------------------------------------------

Plane = Callable[[Clusters, Counts, int, Findings], list[Row]]
PLANES: dict[str, Plane] = {"qmp": qmp_plane, "data": data_plane, "nbd": nbd_plane, "faults": fault_rows,
                            "resources": resource_rows}


def _planes(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in PLANES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown plane(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(PLANES)}")
    return names


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count >= 0")
    return value


def _json_path(text: str) -> str:
    """A path whose directory exists and can be written (checked before the run, not after it)."""
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {directory} is not a writable directory")
    return text


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=NAME, description="Fuzz and fault a launched cluster; a table of "
                                     "crashes, hangs, deaf sessions and lost writes.")
    parser.add_argument("--seed", type=_count, help="the seed of the inputs (default: a new one, printed)")
    parser.add_argument("--full", action="store_true",
                        help="the full counts: 10,000 QMP inputs, 1,000,000 data-plane frames, 100,000 NBD "
                             "inputs, each fault 5 times")
    parser.add_argument("--planes", type=_planes, default=list(PLANES),
                        help=f"which planes, comma-separated (default: {','.join(PLANES)})")
    parser.add_argument("--qmp-inputs", type=_count, help="QMP inputs (instead of the default's or --full's)")
    parser.add_argument("--data-frames", type=_count, help="data-plane frames")
    parser.add_argument("--nbd-inputs", type=_count, help="malformed NBD negotiations and requests")
    parser.add_argument("--fault-rounds", type=_count, help="rounds of each fault")
    parser.add_argument("--json", metavar="PATH", type=_json_path, help="also write the results as JSON to PATH")
    return parser.parse_args(argv)


def counts_for(args: argparse.Namespace) -> Counts:
    counts = FULL if args.full else SMALL
    overrides = {"qmp_inputs": args.qmp_inputs, "data_frames": args.data_frames, "nbd_inputs": args.nbd_inputs,
                 "fault_rounds": args.fault_rounds}
    return dataclasses.replace(counts, **{k: v for k, v in overrides.items() if v is not None})


def run_planes(planes: Sequence[str], counts: Counts, seed: int, findings: Findings) -> tuple[list[Row], int]:
    """Each plane on clusters of its own; (the rows, processes left behind)."""
    rows: list[Row] = []
    with scratch_directory() as scratch:
        clusters = Clusters(scratch, findings)
        try:
            for name in planes:
                print(f"{name}: running", flush=True)
                started = time.monotonic()
                rows += PLANES[name](clusters, counts, seed, findings)
                clusters.close_all()
                print(f"{name}: done in {time.monotonic() - started:.1f} s", flush=True)
        finally:
            with sigint_held():  # a Ctrl-C meanwhile lands once they are stopped
                clusters.close_all()
    return rows, clusters.left_behind


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    counts = counts_for(args)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    raise_own_fd_limit()
    load_start = os.getloadavg()[0]
    print(f"seed {seed}{' (--full)' if args.full else ''}: {counts.qmp_inputs:,} QMP inputs, "
          f"{counts.data_frames:,} data-plane frames, {counts.nbd_inputs:,} NBD inputs, "
          f"each fault {counts.fault_rounds} time(s)", flush=True)
    started = time.monotonic()
    findings = Findings()
    rows, left_behind = run_planes(args.planes, counts, seed, findings)
    elapsed_s = time.monotonic() - started
    machine = machine_note(load_start, os.getloadavg()[0])
    print(f"\nseed {seed}, {elapsed_s:.0f} s, {machine}\n")
    print_table(rows)
    if left_behind:
        print(f"\n{left_behind} iothread(s) outlived their launcher (killed)")
    print_findings(findings)
    failed = [f"{r.plane} / {r.case}" for r in rows if r.failures()]
    if args.json:
        write_json(args.json, {
            "seed": seed, "full": args.full, "counts": dataclasses.asdict(counts), "elapsed_s": round(elapsed_s, 1),
            "machine": machine, "rows": [dataclasses.asdict(r) for r in rows], "must_be_zero": list(MUST_BE_ZERO),
            "left_behind": left_behind, "findings": findings.items, "findings_dropped": findings.dropped,
            "ok": not failed and not left_behind,
        })
    print(f"\n{'non-zero: ' + ', '.join(failed) if failed else 'every count that must be zero is zero'}")
    return 1 if failed or left_behind else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ClusterDied as exc:  # what it said is all there is to say
        print(f"{NAME}: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: what was started is stopped on the way out
        print(f"{NAME}: interrupted", file=sys.stderr)
        sys.exit(130)
