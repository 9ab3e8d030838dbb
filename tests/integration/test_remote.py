"""Remote iothreads: an ``iothreads worker`` on another host joins a launched
cluster over tcp:// with CURVE.  The other host is a network namespace made
for each test (a veth pair, addresses of 192.0.2.0/24, the documentation
range, never routed), as root; the launcher listens on the host's side."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

from iothreads import BlockClient, BlockIOError
from iothreads.testing import poll_until
from protocol.channel import generate_key_pair, load_key_pair, load_public_key

from .support import Clusters

BS = 4096
WAIT_S = 20.0
NETNS_LOCK = "/tmp/iothreads-test-netns.lock"
WORKER = [sys.executable, "-m", "mainloop", "worker"]


@dataclass
class Host:
    """The other host: a network namespace joined to this one by a veth pair."""

    name: str
    veth: str  # this side's end
    address: str  # its address
    gateway: str  # this side's address

    def run(self, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], text=True, **kw)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _remove_namespace(name: str) -> list[str]:
    """Kill what runs in namespace ``name``, delete it (its veth pair goes
    with it); return the pids that were left in it."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 9)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return pids


def _sweep_stale_namespaces() -> None:
    """The namespaces of a test run killed before its clean-up (the pytest
    process that made each, named in it, is gone): removed, their addresses
    free again.  Under NETNS_LOCK."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        found = re.match(r"(evt(\d+)s\d+)\b", line)
        if found is None:
            continue
        try:
            os.kill(int(found.group(2)), 0)
        except ProcessLookupError:
            _remove_namespace(found.group(1))
        except PermissionError:
            pass  # alive


@pytest.fixture
def host() -> Iterator[Host]:
    """A namespace with its own /30 of 192.0.2.0/24; several tests (xdist
    workers) at once take different ones, under a lock."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (CI runs as root)")
    with open(NETNS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _sweep_stale_namespaces()
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
        slot = next(n for n in range(1, 63) if f" 192.0.2.{4 * n + 1}/30 " not in used)
        name = f"evt{os.getpid()}s{slot}"
        h = Host(name, f"evh{os.getpid() % 100000}s{slot}"[:15], f"192.0.2.{4 * slot + 2}", f"192.0.2.{4 * slot + 1}")
        _ip("netns", "add", name)
        try:
            _ip("link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("addr", "add", f"{h.gateway}/30", "dev", h.veth)
            _ip("link", "set", h.veth, "up")
            for args in (("addr", "add", f"{h.address}/30", "dev", "eth0"), ("link", "set", "eth0", "up"),
                         ("link", "set", "lo", "up")):
                _ip("netns", "exec", name, "ip", *args)
        except BaseException:
            _ip("netns", "del", name)
            raise
    try:
        yield h
    finally:
        pids = _remove_namespace(name)
        subprocess.run(["ip", "link", "del", h.veth], capture_output=True)  # (gone with the namespace, as a rule)
        assert not pids, f"processes left in the namespace: {pids}"


@dataclass
class Keys:
    dir: str
    auth: str

    def secret(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.key_secret")

    def public(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.key")


@pytest.fixture
def keys(clusters: Clusters) -> Keys:
    """Key pairs for the cluster, a remote iothread r0 and a stranger; r0's
    public key authorised."""
    k = Keys(os.path.join(clusters.scratch_dir, "keys"), os.path.join(clusters.scratch_dir, "auth"))
    for name in ("cluster", "r0", "stranger"):
        generate_key_pair(k.dir, name)
    os.mkdir(k.auth, 0o700)
    shutil.copy(k.public("r0"), os.path.join(k.auth, "r0.key"))
    return k


class Events:
    """The launcher's event lines, read with a bound."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.seen: list[dict[str, Any]] = []

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout_s: float = WAIT_S) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.seen:
                if match(event):
                    self.seen.remove(event)
                    return event
            left = deadline - time.monotonic()
            assert left > 0, f"no such event in {timeout_s:g} s; seen: {self.seen}"
            if select.select([self.proc.stdout], [], [], left)[0]:
                line = self.proc.stdout.readline()
                assert line, "the launcher exited"
                self.seen.append(json.loads(line))


def _launch(clusters: Clusters, keys: Keys, address: str, *extra: str) -> tuple[dict[str, Any], Events]:
    proc, ready = clusters.launch("--iothreads", "1", "--control", f"tcp://{address}:0",
                                  "--curve-keys", keys.secret("cluster"), "--authorized-keys", keys.auth,
                                  "--runtime-dir", os.path.join(clusters.scratch_dir, "run"), *extra)
    return ready, Events(proc)


def _worker(host: Host, control: str, keys: Keys, name: str, *extra: str) -> subprocess.Popen[str]:
    return host.run([*WORKER, "--connect", control, "--id", "r0", "--curve-keys", keys.secret(name),
                     "--server-key", keys.public("cluster"), *extra], stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)


def _qmp(ready: dict[str, Any]) -> QEMUMonitorProtocol:
    qmp = QEMUMonitorProtocol(ready["qmp"][0])
    qmp.connect()
    return qmp


def _deleted(qmp: QEMUMonitorProtocol, export_id: str) -> bool:
    """``block-export-del`` (safe mode): True once it succeeded, False while the export is in use."""
    try:
        assert qmp.cmd("block-export-del", id=export_id) == {}
    except ExecuteError as exc:
        assert f"export '{export_id}' still in use" in str(exc), exc
        return False
    return True


def _event(qmp: QEMUMonitorProtocol, name: str, timeout_s: float = WAIT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        event = qmp.pull_event(wait=left)
        if event is not None and event["event"] == name:
            return event
    raise AssertionError(f"no {name} event in {timeout_s:g} s")


def test_a_remote_iothread_serves_a_node_over_curve(clusters: Clusters, keys: Keys, host: Host) -> None:
    """r0, in the other namespace, joins; QMP sees it with its host, places a
    node on it; the block client writes and reads it over tcp:// with CURVE
    (CURVE-encrypted)."""
    ready, events = _launch(clusters, keys, host.gateway)
    image = clusters.image(1 << 20, "remote.img")
    worker = _worker(host, ready["control"], keys, "r0")
    qmp = _qmp(ready)
    try:
        joined = events.wait(lambda e: e["event"] == "IOTHREAD_READY" and e["data"]["id"] == "r0")
        assert joined["data"]["pid"] > 0
        remote = [t for t in qmp.cmd("query-iothreads") if t["id"] == "r0"]
        assert remote and remote[0]["host"] == host.address
        assert "host" not in next(t for t in qmp.cmd("query-iothreads") if t["id"] == "io0")
        assert qmp.cmd("blockdev-add", driver="file", **{"node-name": "far"}, filename=image,
                       iothread="r0") == {}
        with open(os.path.join(ready["runtime_dir"], "cluster.json")) as f:
            entry = next(t for t in json.load(f)["iothreads"] if t["id"] == "r0")
        assert entry["data"].startswith(f"tcp://{host.address}:")
        assert entry["curve"] == load_public_key(keys.public("r0")).decode() and entry["host"] == host.address
        block = os.urandom(BS)
        with BlockClient(ready["runtime_dir"], timeout_s=WAIT_S) as client:
            client.write("far", BS, block)
            client.flush("far")
            assert client.read("far", BS, BS) == block
        with open(image, "rb") as f:
            f.seek(BS)
            assert f.read(BS) == block  # it is the remote iothread that wrote the file
        stats = {s["node-name"]: s for s in qmp.cmd("query-blockstats", **{"query-nodes": True})}
        assert stats["far"]["stats"]["wr_operations"] >= 1
        # It leaves in order when the cluster stops: no process of it is left (the fixture checks the namespace).
    finally:
        qmp.close()
    _stop_in_order(events, worker)


def test_unauthorised_peers_are_refused_and_reported(clusters: Clusters, keys: Keys, host: Host) -> None:
    """A worker with a key the cluster was not given exits at once with a
    clear error; one with the wrong server key too; QMP gets PEER_REFUSED
    with the stranger's address and key.  A client with a key r0 was not
    told of fails with EACCES, and r0 reports it."""
    ready, events = _launch(clusters, keys, host.gateway)
    qmp = _qmp(ready)
    try:
        stranger = _worker(host, ready["control"], keys, "stranger")
        _, err = stranger.communicate(timeout=WAIT_S)
        assert stranger.returncode == 1 and "refused this iothread's key" in err, err
        event = _event(qmp, "PEER_REFUSED")["data"]
        assert event == {"channel": "control", "address": host.address,
                         "key": load_public_key(keys.public("stranger")).decode(),
                         "reason": "its key is not authorised"}
        wrong_server = host.run([*WORKER, "--connect", ready["control"], "--id", "r0", "--curve-keys",
                                 keys.secret("r0"), "--server-key", keys.public("r0")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = wrong_server.communicate(timeout=WAIT_S)
        assert wrong_server.returncode == 1 and "is --server-key the main loop's public key?" in err, err
        assert "wrong server key" in _event(qmp, "PEER_REFUSED")["data"]["reason"]
        no_keys = host.run([*WORKER, "--connect", ready["control"], "--id", "r0"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        _, err = no_keys.communicate(timeout=WAIT_S)
        assert no_keys.returncode == 2 and "CURVE is mandatory" in err
        # The good one joins; a client whose key is not the cluster's is kept out of its data socket.
        worker = _worker(host, ready["control"], keys, "r0")
        events.wait(lambda e: e["event"] == "IOTHREAD_READY" and e["data"]["id"] == "r0")
        qmp.cmd("blockdev-add", driver="null-co", **{"node-name": "n0"}, size=1 << 20, iothread="r0")
        with BlockClient(ready["runtime_dir"], timeout_s=WAIT_S,
                         curve_keys=load_key_pair(keys.secret("stranger"))) as client:
            started = time.monotonic()
            with pytest.raises(BlockIOError) as info:
                client.read("n0", 0, BS)
            assert info.value.errno == 13 and "refused this client's key" in str(info.value)
            assert time.monotonic() - started < WAIT_S / 2
        refused = _event(qmp, "PEER_REFUSED")["data"]
        assert (refused["channel"], refused["iothread"], refused["address"]) == ("data", "r0", host.gateway)
    finally:
        qmp.close()
    _stop_in_order(events, worker)


@pytest.mark.parametrize("rejoin", [True, False], ids=["rejoins", "no-rejoin"])
def test_a_link_that_drops_fails_requests_and_the_iothread_rejoins(clusters: Clusters, keys: Keys,
                                                                    host: Host, rejoin: bool) -> None:
    """The link goes down in the middle of I/O: requests in flight fail with
    EIO within seconds (ZMTP heartbeats), the main loop takes r0 for gone
    (IOTHREAD_EXITED; its node stays, inactive), r0 quiesces and closes its
    node and waits (with --no-rejoin: exits 3).  Link up: r0 joins again by
    itself (started again, with --no-rejoin), its node is reopened there and
    served, with the data written before."""
    ready, events = _launch(clusters, keys, host.gateway)
    image = clusters.image(1 << 20, "remote.img")
    options = () if rejoin else ("--no-rejoin",)
    worker = _worker(host, ready["control"], keys, "r0", *options)
    qmp = _qmp(ready)
    try:
        events.wait(lambda e: e["event"] == "IOTHREAD_READY" and e["data"]["id"] == "r0")
        qmp.cmd("blockdev-add", driver="file", **{"node-name": "far"}, filename=image, iothread="r0")
        block = os.urandom(BS)
        with BlockClient(ready["runtime_dir"], timeout_s=WAIT_S) as client:
            client.write("far", 0, block)
            client.flush("far")
            results: list[int] = []
            _ip("link", "set", host.veth, "down")
            started = time.monotonic()
            for i in range(32):
                client.submit("far", "read", i * BS % (1 << 20), BS,
                              callback=lambda status, message, data: results.append(status))
            while len(results) < 32 and time.monotonic() - started < WAIT_S:
                client.ctx.poll(True, timeout_ns=100_000_000)
            assert len(results) == 32 and set(results) <= {0, -5}, results  # completed before, or EIO
            assert -5 in results
            assert time.monotonic() - started < 10
            gone = events.wait(lambda e: e["event"] == "IOTHREAD_EXITED" and e["data"]["id"] == "r0")
            assert gone["data"]["expected"] is False
            if rejoin:
                assert worker.poll() is None  # waiting for its main loop
            else:
                assert worker.wait(timeout=WAIT_S) == 3
            assert [n["active"] for n in qmp.cmd("query-named-block-nodes")
                    if n["node-name"] == "far"] == [False]
            _ip("link", "set", host.veth, "up")
            if not rejoin:
                worker = _worker(host, ready["control"], keys, "r0", *options)
            events.wait(lambda e: e["event"] == "IOTHREAD_READY" and e["data"]["id"] == "r0")
            assert [n["active"] for n in qmp.cmd("query-named-block-nodes")
                    if n["node-name"] == "far"] == [True]
            assert _read_again(client, "far", 0) == block
    finally:
        qmp.close()
    _stop_in_order(events, worker)


def _stop_in_order(events: Events, worker: subprocess.Popen[str]) -> None:
    """Stop the launcher; the remote iothread leaves with it, in order (status 0)."""
    events.proc.terminate()
    events.proc.communicate(timeout=WAIT_S)
    assert worker.wait(timeout=WAIT_S) == 0, worker.stderr.read() if worker.stderr else ""


def _read_again(client: BlockClient, node: str, offset: int) -> bytes:
    """A block read once the client has reached the node's iothread anew
    (it joined again: ENOTCONN or EIO until the client connects there)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return client.read(node, offset, BS)
        except BlockIOError as exc:
            assert exc.errno in (107, 5) and time.monotonic() < deadline, exc  # ENOTCONN, EIO
            client.ctx.poll(True, timeout_ns=100_000_000)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mainloop", *argv], capture_output=True, text=True, timeout=60)


def test_bad_keys_and_key_options_get_one_clear_line(keys: Keys) -> None:
    """Keys that are not safe or not there, options that do not go together:
    one line naming the file or option, status 1, no traceback."""
    out = _run("keygen", "r0", "--dir", keys.dir)
    assert out.returncode == 1 and out.stderr == f"iothreads: {keys.public('r0')} exists: remove it first, " \
                                                 "or choose another name\n"
    out = _run("keygen", "../up", "--dir", keys.dir)
    assert out.returncode == 1 and "is not a key name" in out.stderr
    out = _run("launch", "--curve-keys", keys.secret("cluster"))
    assert out.returncode == 1 and "--curve-keys" in out.stderr and "only with --control" in out.stderr
    os.chmod(keys.secret("cluster"), 0o644)
    out = _run("launch", "--control", "tcp://127.0.0.1:0", "--curve-keys", keys.secret("cluster"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "chmod 600" in out.stderr
    os.chmod(keys.auth, 0o777)
    out = _run("launch", "--control", "tcp://127.0.0.1:0", "--authorized-keys", keys.auth)
    assert out.returncode == 1 and f"--authorized-keys {keys.auth}" in out.stderr and "writable by others" in out.stderr
    os.chmod(keys.auth, 0o700)
    os.symlink(keys.public("stranger"), os.path.join(keys.auth, "planted.key"))
    out = _run("launch", "--control", "tcp://127.0.0.1:0", "--authorized-keys", keys.auth)
    assert out.returncode == 1 and "planted.key: is a symbolic link" in out.stderr
    out = _run("worker", "--connect", "tcp://127.0.0.1:1", "--id", "r0", "--curve-keys", keys.secret("cluster"),
               "--server-key", keys.public("cluster"))
    assert out.returncode == 1 and "chmod 600" in out.stderr and "Traceback" not in out.stderr
    out = _run("worker", "--connect", "tcp://127.0.0.1:1", "--id", "r0", "--curve-keys",
               os.path.join(keys.dir, "missing.key_secret"), "--server-key", keys.public("cluster"))
    assert out.returncode == 1 and "missing.key_secret" in out.stderr and "Traceback" not in out.stderr
    os.chmod(keys.secret("cluster"), 0o600)
    with socket.socket() as busy:  # --nbd-listen on a port taken, or no address at all
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _run("worker", "--connect", "tcp://127.0.0.1:1", "--id", "r0", "--curve-keys", keys.secret("cluster"),
                   "--server-key", keys.public("cluster"), "--nbd-listen", f"127.0.0.1:{port}")
    assert out.returncode == 1 and out.stderr == (
        f"iothread r0: cannot listen for NBD clients on 127.0.0.1:{port}: Address already in use\n"), out.stderr
    out = _run("worker", "--connect", "tcp://127.0.0.1:1", "--id", "r0", "--nbd-listen", "10809")
    assert out.returncode == 2 and "expected HOST:PORT" in out.stderr and "Traceback" not in out.stderr


def test_a_remote_iothread_serves_an_nbd_export_from_its_host(clusters: Clusters, keys: Keys, host: Host) -> None:
    """r0 listens for NBD clients itself (``--nbd-listen``): an export of its
    node is served from its host, at the URI QMP gives; qemu-io writes and
    reads it there; the main loop's own NBD server does not offer it; removed,
    it is offered nowhere."""
    qemu_io = shutil.which("qemu-io")
    if qemu_io is None:
        pytest.skip("qemu-io is not installed (CI installs it)")
    nbd_sock = os.path.join(clusters.scratch_dir, "nbd.sock")
    ready, events = _launch(clusters, keys, host.gateway, "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}")
    image = clusters.image(4 << 20, "remote.img")
    worker = _worker(host, ready["control"], keys, "r0", "--nbd-listen", f"{host.address}:10809")
    qmp = _qmp(ready)
    try:
        events.wait(lambda e: e["event"] == "IOTHREAD_READY" and e["data"]["id"] == "r0")
        assert qmp.cmd("blockdev-add", driver="file", **{"node-name": "far"}, filename=image, iothread="r0") == {}
        assert qmp.cmd("block-export-add", type="nbd", id="e1", writable=True, **{"node-name": "far"}) == {}
        [export] = qmp.cmd("query-block-exports")
        uri = f"nbd://{host.address}:10809/far"
        assert export["uri"] == uri
        with open(os.path.join(ready["runtime_dir"], "cluster.json")) as f:
            assert json.load(f)["exports"]["e1"]["uri"] == uri
        # A hostile client of its listener: the protocol's error, a closed connection, the others unharmed.
        with socket.create_connection((host.address, 10809), timeout=WAIT_S) as bad:
            assert len(bad.recv(18)) == 18  # the greeting (NBDMAGIC, IHAVEOPT, flags)
            bad.sendall(b"\xff" * 4096)  # client flags with unknown bits, then garbage
            while bad.recv(4096):
                pass  # until it closes
        io = subprocess.run([qemu_io, "-f", "raw", "-c", "write -P 0x3c 64k 64k", "-c", "flush",
                             "-c", "read -P 0x3c 64k 64k", "-c", "read -P 0 0 64k", uri],
                            capture_output=True, text=True, timeout=WAIT_S)
        assert io.returncode == 0 and "failed" not in io.stdout + io.stderr, io.stdout + io.stderr
        with open(image, "rb") as f:
            f.seek(64 << 10)
            assert f.read(64 << 10) == b"\x3c" * (64 << 10)  # written by the remote iothread, from its host
        here = subprocess.run([qemu_io, "-f", "raw", "-c", "read 0 4k", f"nbd+unix:///far?socket={nbd_sock}"],
                              capture_output=True, text=True, timeout=WAIT_S)
        assert "far" in here.stdout + here.stderr and "read 4096/4096" not in here.stdout  # not offered here
        # Moved home, it is served by the main loop's server; moved back, from r0's host again.
        assert qmp.cmd("x-blockdev-set-iothread", **{"node-name": "far", "iothread": "io0"}) == {}
        [export] = qmp.cmd("query-block-exports")
        assert export["uri"] == f"nbd+unix:///far?socket={nbd_sock}"
        io = subprocess.run([qemu_io, "-f", "raw", "-c", "read -P 0x3c 64k 64k", export["uri"]],
                            capture_output=True, text=True, timeout=WAIT_S)
        assert io.returncode == 0 and "read 65536/65536" in io.stdout, io.stdout + io.stderr
        assert qmp.cmd("x-blockdev-set-iothread", **{"node-name": "far", "iothread": "r0"}) == {}
        assert qmp.cmd("query-block-exports")[0]["uri"] == uri
        io = subprocess.run([qemu_io, "-f", "raw", "-c", "read -P 0x3c 64k 64k", uri],
                            capture_output=True, text=True, timeout=WAIT_S)
        assert io.returncode == 0 and "read 65536/65536" in io.stdout, io.stdout + io.stderr
        # qemu-io has gone; its connection is counted out when r0's NBD_CONNECTION_CLOSED comes (as
        # QEMU counts a client out when its server notices the close): until then the export is in use.
        poll_until(lambda: qmp.pull_event(wait=0.05), lambda: _deleted(qmp, "e1"), "block-export-del of e1",
                   WAIT_S)
        _event(qmp, "BLOCK_EXPORT_DELETED")
        gone = subprocess.run([qemu_io, "-f", "raw", "-c", "read 0 4k", uri], capture_output=True, text=True,
                              timeout=WAIT_S)
        assert "read 4096/4096" not in gone.stdout  # withdrawn there too
    finally:
        qmp.close()
    _stop_in_order(events, worker)


def test_a_remote_iothread_killed_mid_io(clusters: Clusters, keys: Keys, host: Host) -> None:
    """SIGKILL of r0 under 32 writes in flight: every one completes (written
    or EIO) within seconds, the main loop takes r0 for gone (its node stays,
    inactive); a new r0 joins, the node is reopened there, and what was
    flushed before the kill reads back."""
    ready, events = _launch(clusters, keys, host.gateway)
    image = clusters.image(1 << 20, "remote.img")
    worker = _worker(host, ready["control"], keys, "r0")
    qmp = _qmp(ready)
    try:
        events.wait(lambda e: e["event"] == "IOTHREAD_READY" and e["data"]["id"] == "r0")
        assert qmp.cmd("blockdev-add", driver="file", **{"node-name": "far"}, filename=image, iothread="r0") == {}
        flushed = os.urandom(BS)
        with BlockClient(ready["runtime_dir"], timeout_s=WAIT_S) as client:
            client.write("far", 0, flushed)
            client.flush("far")
            results: list[int] = []
            for i in range(1, 33):
                client.submit("far", "write", i * BS, BS, os.urandom(BS),
                              callback=lambda status, message, data: results.append(status))
            worker.kill()
            started = time.monotonic()
            while len(results) < 32 and time.monotonic() - started < WAIT_S:
                client.ctx.poll(True, timeout_ns=100_000_000)
            assert len(results) == 32 and set(results) <= {0, -5}, results  # written, or EIO
            assert time.monotonic() - started < 10
            gone = events.wait(lambda e: e["event"] == "IOTHREAD_EXITED" and e["data"]["id"] == "r0")
            assert gone["data"]["expected"] is False
            assert [n["active"] for n in qmp.cmd("query-named-block-nodes") if n["node-name"] == "far"] == [False]
            worker.wait(timeout=WAIT_S)
            worker = _worker(host, ready["control"], keys, "r0")
            events.wait(lambda e: e["event"] == "IOTHREAD_READY" and e["data"]["id"] == "r0")
            assert _read_again(client, "far", 0) == flushed
    finally:
        qmp.close()
    _stop_in_order(events, worker)


def test_a_second_worker_with_a_joined_id_is_refused_and_the_first_serves_on(clusters: Clusters, keys: Keys,
                                                                              host: Host) -> None:
    """Its Hello is dropped by the main loop's socket (an identity in use):
    it gives up after its watchdog period, saying the likely cause; r0 is not
    disturbed."""
    ready, events = _launch(clusters, keys, host.gateway)
    worker = _worker(host, ready["control"], keys, "r0")
    qmp = _qmp(ready)
    try:
        events.wait(lambda e: e["event"] == "IOTHREAD_READY" and e["data"]["id"] == "r0")
        qmp.cmd("blockdev-add", driver="null-co", **{"node-name": "n0"}, size=1 << 20, iothread="r0")
        second = _worker(host, ready["control"], keys, "r0")
        _, err = second.communicate(timeout=WAIT_S)
        assert second.returncode == 3 and "is an iothread with id 'r0' joined already?" in err, err
        assert "Traceback" not in err
        with BlockClient(ready["runtime_dir"], timeout_s=WAIT_S) as client:
            assert client.read("n0", 0, BS) == bytes(BS)
        assert [t["id"] for t in qmp.cmd("query-iothreads")].count("r0") == 1
    finally:
        qmp.close()
    _stop_in_order(events, worker)
