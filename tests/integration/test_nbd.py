"""NBD exports of a launched cluster, as QEMU's users reach them: ``--nbd-server``
and ``--export`` on the command line, the QMP commands (``nbd-server-start``,
``block-export-add`` ...), ``nbdinfo``, ``qemu-img`` and ``qemu-io`` as
clients, and hostile clients that must not harm the others.

The handshake is the main loop's: everything up to NBD_OPT_GO is tested
here with the real tools and with a client written from the specification
(``tests/protocol/nbd_model.py``).  Past it a connection is served by the
iothread that holds its node."""

from __future__ import annotations

import functools
import json
import os
import resource
import select
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from iothreads.testing import poll_until
from mainloop import bql
from mainloop.nbd import NbdServer
from protocol import ErrorReply, QueryReply, cluster_state_path
from protocol.nbd import (
    NBD_CMD_DISC,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_FLAG_READ_ONLY,
    NBD_INFO_EXPORT,
    NBD_OPT_ABORT,
    NBD_OPT_LIST,
    NBD_REP_ACK,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_SERVER,
    encode_request,
)
from protocol.schema import (
    BlockdevOptions,
    BlockExportOptions,
    SocketAddressType,
    SocketAddressUnix,
    blockdev_to_wire,
    parse,
)
from tests import clients
from tests.clients import need
from tests.protocol.nbd_model import GREETING_SIZE, client_flags, go, option, read_handshake, read_replies

from .support import Clusters

BOUND_S = 30.0
"""Bound on any one wait here (a reply, a tool's run, a connection's end)."""


run_tool = functools.partial(clients.run_tool, timeout_s=BOUND_S)


# -- a client of the handshake, from the specification -----------------------------------


class RawClient:
    """An NBD connection spoken by hand (blocking, with the bound as timeout)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(BOUND_S)
        self.sock.connect(path)
        self.buf = b""

    def recv_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"closed after {len(self.buf)} of {n} bytes")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def greeting(self) -> None:
        read_handshake(self.recv_exactly(GREETING_SIZE))

    def option_reply(self) -> tuple[int, int, bytes]:
        """(option, reply type, payload) of the next option reply."""
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exactly(20))
        return opt, rtype, self.recv_exactly(length)

    def go(self, name: bytes) -> int:
        """Greeting, flags, NBD_OPT_GO: the transmission flags the server sent."""
        self.greeting()
        self.sock.sendall(client_flags() + go(name))
        flags = -1
        while True:
            _, rtype, payload = self.option_reply()
            if rtype == NBD_REP_INFO:
                if struct.unpack_from(">H", payload)[0] == NBD_INFO_EXPORT:
                    flags = struct.unpack_from(">QH", payload, 2)[1]
            elif rtype == NBD_REP_ACK:
                return flags
            else:
                raise AssertionError(f"NBD_OPT_GO answered {rtype:#x}: {payload!r}")

    def closed(self) -> bool:
        """Whether the server closed the connection (waits for its end, within the bound)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


# -- launching and driving ------------------------------------------------------------------


def launch(clusters: Clusters, *options: str, nbd: str | None = None) -> tuple[dict[str, Any], str]:
    """A cluster of two iothreads: ``disk0`` (a 4 MiB image) in io0, ``null0``
    (read-only, 1 MiB) in io1; an NBD server on RUNTIME_DIR/nbd.sock unless
    ``nbd`` says otherwise ("" for none); the READY data and the NBD socket."""
    image = clusters.image(4 << 20)
    run = os.path.join(clusters.scratch_dir, "run")
    path = os.path.join(run, "nbd.sock")
    server = [] if nbd == "" else ["--nbd-server", nbd or f"addr.type=unix,addr.path={path}"]
    proc, ready = clusters.launch(
        "--iothreads", "2", "--runtime-dir", run,
        "--blockdev", f"driver=file,node-name=disk0,filename={image},iothread=io0",
        "--blockdev", "driver=null-co,node-name=null0,size=1M,read-only=on,iothread=io1",
        *server, *options)
    return {**ready, "proc": proc}, path


class Qmp:
    """A QMP session (qemu.qmp's legacy client): raw answers, and events."""

    def __init__(self, path: str) -> None:
        self.qmp = QEMUMonitorProtocol(path)
        self.qmp.connect()

    def __call__(self, command: str, **args: Any) -> Any:
        reply = self.qmp.cmd_raw(command, args)
        if "error" in reply:
            return ("error", reply["error"]["desc"])
        return reply["return"]

    def event(self, name: str) -> dict[str, Any]:
        """The data of the next event called ``name`` (others are dropped)."""
        while True:
            event = self.qmp.pull_event(wait=BOUND_S)
            assert event is not None, f"no {name} event"
            if event["event"] == name:
                data: dict[str, Any] = event["data"]
                return data

    def roles(self) -> str:
        return " ".join(f["role"] for f in self("x-query-main-loop")["fds"])

    def close(self) -> None:
        self.qmp.close()


@pytest.fixture
def qmp_of() -> Iterator[Any]:
    sessions: list[Qmp] = []

    def connect(ready: dict[str, Any]) -> Qmp:
        sessions.append(Qmp(ready["qmp"][0]))
        return sessions[-1]

    yield connect
    for s in sessions:
        s.close()


# -- configuration -------------------------------------------------------------------------------


def test_the_ready_line_names_every_export_and_nbdinfo_lists_them(clusters: Clusters) -> None:
    ready, path = launch(clusters, "--export", "nbd,id=e0,node-name=disk0,writable=on,allocation-depth=on",
                         "--export", '{"type": "nbd", "id": "e1", "node-name": "null0", "name": "zero", '
                                     '"description": "a null node, read-only"}')
    assert ready["exports"] == {"e0": f"nbd+unix:///disk0?socket={path}",
                                "e1": f"nbd+unix:///zero?socket={path}"}
    assert os.stat(path).st_mode & 0o077 == 0  # the socket is its owner's only, as the other sockets
    listed = json.loads(run_tool("nbdinfo", "--list", "--json", ready["exports"]["e0"]))
    exports = {e["export-name"]: e for e in listed["exports"]}
    assert set(exports) == {"disk0", "zero"}
    disk, zero = exports["disk0"], exports["zero"]
    assert (disk["export-size"], disk["is_read_only"], disk["can_trim"]) == (4 << 20, False, True)
    assert disk["contexts"] == ["base:allocation", "qemu:allocation-depth"] and "description" not in disk
    assert (zero["export-size"], zero["is_read_only"], zero["can_zero"]) == (1 << 20, True, False)
    assert zero["description"] == "a null node, read-only" and zero["contexts"] == ["base:allocation"]
    # NBD_OPT_GO then NBD_CMD_DISC: what the handshake agreed, through a real client.
    assert run_tool("nbdinfo", "--size", ready["exports"]["e1"]).strip() == str(1 << 20)
    assert subprocess.run(["nbdinfo", "--is", "read-only", ready["exports"]["e1"]], timeout=BOUND_S).returncode == 0
    assert subprocess.run(["nbdinfo", "--is", "read-only", ready["exports"]["e0"]], timeout=BOUND_S).returncode == 2


def test_the_state_file_publishes_the_exports_offered(clusters: Clusters, qmp_of: Any) -> None:
    """``RUNTIME_DIR/cluster.json`` lists each export offered with its node and
    URI (the READY line's URI), as exports come and go."""
    ready, path = launch(clusters, "--export", "nbd,id=e0,node-name=disk0,writable=on")

    def published() -> dict[str, Any]:
        with open(cluster_state_path(ready["runtime_dir"]), encoding="utf-8") as f:
            exports: dict[str, Any] = json.load(f)["exports"]
        return exports

    assert published() == {"e0": {"node": "disk0", "uri": ready["exports"]["e0"]}}
    q = qmp_of(ready)
    assert q("block-export-add", type="nbd", id="e1", **{"node-name": "null0", "name": "zero"}) == {}
    assert published() == {"e0": {"node": "disk0", "uri": f"nbd+unix:///disk0?socket={path}"},
                           "e1": {"node": "null0", "uri": f"nbd+unix:///zero?socket={path}"}}
    assert q("block-export-del", id="e0") == {}  # no client: gone at once
    assert published() == {"e1": {"node": "null0", "uri": f"nbd+unix:///zero?socket={path}"}}
    assert q("nbd-server-stop") == {}
    assert published() == {}


def test_an_inet_server_names_its_port(clusters: Clusters) -> None:
    ready, _ = launch(clusters, "--export", "nbd,id=e0,node-name=disk0",
                      nbd="addr.type=inet,addr.host=127.0.0.1,addr.port=0,max-connections=4")
    uri = ready["exports"]["e0"]
    assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/disk0") and not uri.startswith("nbd://127.0.0.1:0/")
    assert [e["export-name"] for e in json.loads(run_tool("nbdinfo", "--list", "--json", uri))["exports"]] == [
        "disk0"]


@pytest.mark.parametrize("options, message", [
    (["--export", "nbd,id=e0,node-name=disk0"], "--export nbd,id=e0,node-name=disk0: NBD server not running"),
    (["--nbd-server", "addr.type=unix", "--export", "nbd,id=e0,node-name=disk0"],
     "--nbd-server addr.type=unix: Parameter 'addr.path' is missing"),
    (["--nbd-server", "addr.type=inet,addr.host=h,addr.port=1", "--nbd-server", "addr.type=unix,addr.path=x"],
     "--nbd-server addr.type=unix,addr.path=x: NBD server already running"),
    (["--nbd-server", "addr.type=unix,addr.path=x", "--export", "nbd,id=e0,node-name=disk0",
      "--export", "nbd,id=e0,node-name=null0"],
     "--export nbd,id=e0,node-name=null0: Block export id 'e0' is already in use"),
    (["--nbd-server", "addr.type=unix,addr.path=x", "--export", "nbd,id=9,node-name=disk0"],
     "--export nbd,id=9,node-name=disk0: Invalid block export id"),
])
def test_bad_options_are_refused_before_anything_starts(clusters: Clusters, options: list[str], message: str) -> None:
    proc = clusters.spawn("--runtime-dir", os.path.join(clusters.scratch_dir, "run"), *options, clean_exit=False)
    _, err = proc.communicate(timeout=BOUND_S)
    assert proc.returncode == 1 and err == f"iothreads: {message}\n"


@pytest.mark.parametrize("export, message", [
    ("nbd,id=e0,node-name=nope", "Cannot find device='' nor node-name='nope'"),
    ("nbd,id=e0,node-name=null0,writable=on", "Cannot export read-only node as writable"),
])
def test_an_export_its_node_refuses_stops_the_launch(clusters: Clusters, export: str, message: str) -> None:
    image = clusters.image(1 << 20)
    run = os.path.join(clusters.scratch_dir, "run")
    proc = clusters.spawn("--runtime-dir", run, "--blockdev", f"driver=file,node-name=disk0,filename={image}",
                          "--blockdev", "driver=null-co,node-name=null0,read-only=on",
                          "--nbd-server", f"addr.type=unix,addr.path={run}/nbd.sock", "--export", export,
                          clean_exit=False)
    out, err = proc.communicate(timeout=BOUND_S)
    assert proc.returncode == 1 and f"iothreads: --export {export}: {message}\n" in err
    assert '"READY"' not in out and os.listdir(run) == []  # the NBD socket too is gone


def test_qmp_commands_and_their_errors(clusters: Clusters, qmp_of: Any) -> None:
    ready, _ = launch(clusters, nbd="")
    q = qmp_of(ready)
    path = os.path.join(clusters.scratch_dir, "nbd.sock")
    assert q("query-block-exports") == []
    assert q("nbd-server-stop") == ("error", "NBD server not running")
    assert q("block-export-add", type="nbd", id="e0", **{"node-name": "disk0"}) == ("error", "NBD server not running")
    # QMP takes QEMU's older address form, the command line the flat one.
    assert q("nbd-server-start", addr={"type": "unix", "path": path}) == ("error", "Parameter 'addr.path' is unexpected")
    assert q("nbd-server-start", addr={"type": "unix"}) == ("error", "Parameter 'addr.data' is missing")
    taken = clusters.image(1, "taken")  # a file, not a stale socket: never replaced
    assert q("nbd-server-start", addr={"type": "unix", "data": {"path": taken}}) == (
        "error", f"Failed to bind socket to {taken}: exists and is not a socket")
    assert q("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": "99999"}}) == (
        "error", "address resolution failed for 127.0.0.1:99999: port out of range")
    assert q("nbd-server-start", addr={"type": "unix", "data": {"path": path}}) == {}
    assert q("nbd-server-start", addr={"type": "unix", "data": {"path": path}}) == ("error",
                                                                                    "NBD server already running")
    assert "NBD listening socket " + path in q.roles()
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"id": "e0", "node-name": "nope"}, "Cannot find device='' nor node-name='nope'"),
        ({"id": "0e", "node-name": "disk0"}, "Invalid block export id"),
        ({"id": "e0", "node-name": "null0", "writable": True}, "Cannot export read-only node as writable"),
        ({"id": "e0", "node-name": "disk0", "name": "x" * 4097}, f"export name '{'x' * 4097}' too long"),
        ({"id": "e0", "node-name": "disk0", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ]
    for args, message in refusals:
        assert q("block-export-add", type="nbd", **args) == ("error", message)
    assert q("block-export-add", type="fuse", id="e0", **{"node-name": "disk0"}) == (
        "error", "Parameter 'type' does not accept value 'fuse'")
    assert q("block-export-add", type="nbd", id="e0", writable=True, **{"node-name": "disk0"}) == {}
    assert q("block-export-add", type="nbd", id="e0", **{"node-name": "null0"}) == (
        "error", "Block export id 'e0' is already in use")
    assert q("block-export-add", type="nbd", id="e1", **{"node-name": "null0", "name": "disk0"}) == (
        "error", "NBD server already has export named 'disk0'")
    assert q("block-export-add", type="nbd", id="e1", **{"node-name": "disk0", "name": "again"}) == {}
    exports = q("query-block-exports")
    assert [e.pop("uri").partition("?")[0] for e in exports] == ["nbd+unix:///disk0", "nbd+unix:///again"]
    assert exports == [
        {"id": "e0", "type": "nbd", "node-name": "disk0", "shutting-down": False},
        {"id": "e1", "type": "nbd", "node-name": "disk0", "shutting-down": False}]
    assert {e["export-name"] for e in json.loads(run_tool(
        "nbdinfo", "--list", "--json", f"nbd+unix:///?socket={path}"))["exports"]} == {"disk0", "again"}
    # A node with an export is in use (QEMU's words); the export goes first.
    assert q("blockdev-del", **{"node-name": "disk0"}) == ("error", "Node disk0 is in use")
    assert q("block-export-del", id="e9") == ("error", "Export 'e9' is not found")
    assert q("block-export-del", id="e1") == {}
    assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e1"}
    assert q("block-export-del", id="e1") == ("error", "Export 'e1' is not found")
    # Stopping the server removes its exports, then answers.
    assert q("nbd-server-stop") == {}
    assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e0"}
    assert q("query-block-exports") == [] and not os.path.exists(path)
    assert "NBD listening socket" not in q.roles()
    assert q("blockdev-del", **{"node-name": "disk0"}) == {}
    # And it starts again, on TCP.
    assert q("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}},
             **{"max-connections": 1}) == {}
    assert q("block-export-add", type="nbd", id="z", **{"node-name": "null0"}) == {}
    listening = [f["role"] for f in q("x-query-main-loop")["fds"] if f["role"].startswith("NBD listening")]
    assert len(listening) == 1 and listening[0].startswith("NBD listening socket 127.0.0.1:"), listening
    port = listening[0].rsplit(":", 1)[1]
    listed = json.loads(run_tool("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}/"))["exports"]
    assert [(e["export-name"], e["can_multi_conn"]) for e in listed] == [("null0", False)]  # max-connections=1
    assert q("nbd-server-stop") == {}
    assert q.event("BLOCK_EXPORT_DELETED") == {"id": "z"}
    assert ready["proc"].poll() is None


# -- hostile clients -----------------------------------------------------------------------------


def test_hostile_handshakes_leave_other_clients_and_the_launcher_unharmed(clusters: Clusters) -> None:
    ready, path = launch(clusters, "--export", "nbd,id=e0,node-name=disk0")
    # A bad magic in an option's header: the connection is closed.
    bad = RawClient(path)
    bad.greeting()
    bad.sock.sendall(client_flags() + option(NBD_OPT_LIST, magic=0x1234567890ABCDEF))
    assert bad.closed()
    # An option of 4 GiB - 1 bytes: closed at once, nothing of it read or kept.
    huge = RawClient(path)
    huge.greeting()
    huge.sock.sendall(client_flags() + struct.pack(">QII", 0x49484156454F5054, 0x4242, 0xFFFFFFFF) + b"x" * 4096)
    assert huge.closed()
    # Unknown client flags: closed.
    flags = RawClient(path)
    flags.greeting()
    flags.sock.sendall(struct.pack(">I", 0x80000000))
    assert flags.closed()
    # An unknown option is refused (its data skipped), and the client goes on.
    odd = RawClient(path)
    odd.greeting()
    odd.sock.sendall(client_flags() + option(0x4242, b"y" * 100_000) + option(NBD_OPT_LIST))
    assert odd.option_reply()[1] == NBD_REP_ERR_UNSUP
    opt, rtype, payload = odd.option_reply()
    assert (opt, rtype) == (NBD_OPT_LIST, NBD_REP_SERVER) and payload[4:] == b"disk0"
    assert odd.option_reply()[:2] == (NBD_OPT_LIST, NBD_REP_ACK)
    odd.sock.sendall(option(NBD_OPT_ABORT))
    assert odd.option_reply()[:2] == (NBD_OPT_ABORT, NBD_REP_ACK) and odd.closed()
    # A client that hangs up mid-option.
    torn = RawClient(path)
    torn.greeting()
    torn.sock.sendall(client_flags() + option(NBD_OPT_LIST)[:7])
    torn.close()
    for c in (bad, huge, flags, odd):
        c.close()
    assert [e["export-name"] for e in json.loads(run_tool("nbdinfo", "--list", "--json",
                                                          ready["exports"]["e0"]))["exports"]] == ["disk0"]
    assert ready["proc"].poll() is None


def test_a_stalled_handshake_is_dropped_at_its_deadline(clusters: Clusters, qmp_of: Any) -> None:
    ready, path = launch(clusters, "--export", "nbd,id=e0,node-name=disk0",
                         nbd=f"addr.type=unix,addr.path={clusters.scratch_dir}/run/nbd.sock,handshake-max-seconds=1")
    stalled = RawClient(path)
    stalled.greeting()
    stalled.sock.sendall(client_flags() + option(NBD_OPT_LIST)[:5])  # and nothing more
    silent = RawClient(path)  # not even its flags
    assert stalled.closed() and silent.closed()  # bounded: the deadline, well within BOUND_S
    # Meanwhile and afterwards, others are served.
    assert run_tool("nbdinfo", "--size", ready["exports"]["e0"]).strip() == str(4 << 20)
    q = qmp_of(ready)
    poll_until(lambda: None, lambda: "NBD handshake" not in q.roles(), "the handshakes to end", BOUND_S)


def test_a_thousand_connections_at_once(clusters: Clusters, qmp_of: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    try:
        ready, path = launch(clusters, "--export", "nbd,id=e0,node-name=disk0")
        socks = []
        try:
            for _ in range(1000):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                socks.append(s)
                s.connect(path)  # into the listener's backlog (SOMAXCONN): accepted in batches
            # Every one is accepted and greeted.
            poller = select.poll()
            for s in socks:
                poller.register(s, select.POLLIN)
            greeted: set[int] = set()

            def step() -> None:
                for fd, _ in poller.poll(1000):
                    greeted.add(fd)
                    poller.unregister(fd)

            poll_until(step, lambda: len(greeted) == len(socks), lambda: f"greetings ({len(greeted)} of 1000)",
                       BOUND_S * 2)
            # Others are served meanwhile, and the launcher lives.
            assert run_tool("nbdinfo", "--size", ready["exports"]["e0"]).strip() == str(4 << 20)
            assert ready["proc"].poll() is None
        finally:
            for s in socks:
                s.close()
        q = qmp_of(ready)
        poll_until(lambda: None, lambda: "NBD handshake" not in q.roles(), "the handshakes to end", BOUND_S)
        assert run_tool("nbdinfo", "--size", ready["exports"]["e0"]).strip() == str(4 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_past_max_connections_clients_wait_to_be_accepted(clusters: Clusters, qmp_of: Any) -> None:
    ready, path = launch(clusters, "--export", "nbd,id=e0,node-name=disk0",
                         nbd=f"addr.type=unix,addr.path={clusters.scratch_dir}/run/nbd.sock,max-connections=2")
    q = qmp_of(ready)
    first, second = RawClient(path), RawClient(path)
    first.greeting()
    second.greeting()
    # At the limit, the listener is not watched (QEMU's way): the third waits in its backlog.
    poll_until(lambda: None, lambda: "NBD listening socket" not in q.roles(), "the listener to be left alone",
               BOUND_S)
    third = RawClient(path)
    first.close()
    third.greeting()  # accepted once the first left
    for c in (second, third):
        c.close()
    poll_until(lambda: None, lambda: "NBD listening socket" in q.roles(), "the listener to be watched again",
               BOUND_S)


# -- past the handshake: served by the node's iothread ---------------------------------------------


def test_safe_delete_is_refused_while_a_client_is_connected_and_hard_delete_disconnects(
        clusters: Clusters, qmp_of: Any) -> None:
    ready, path = launch(clusters, "--export", "nbd,id=e0,node-name=disk0,writable=on")
    q = qmp_of(ready)
    client = RawClient(path)
    assert client.go(b"disk0") & NBD_FLAG_READ_ONLY == 0
    assert q("block-export-del", id="e0") == ("error", "export 'e0' still in use")
    assert q("block-export-del", id="e0", mode="hard") == {}  # answered at once, as QEMU
    assert q("query-block-exports") in ([{"id": "e0", "type": "nbd", "node-name": "disk0", "shutting-down": True}],
                                        [])
    assert q("block-export-del", id="e0") in (("error", "Export 'e0' is already shutting down"),
                                              ("error", "Export 'e0' is not found"))
    assert q.event("BLOCK_EXPORT_DELETED") == {"id": "e0"}  # once its iothread closed the connection
    assert client.closed()
    assert q("query-block-exports") == [] and q("blockdev-del", **{"node-name": "disk0"}) == {}


def test_nbd_server_stop_disconnects_every_client_then_answers(clusters: Clusters, qmp_of: Any) -> None:
    ready, path = launch(clusters, "--export", "nbd,id=e0,node-name=disk0", "--export", "nbd,id=e1,node-name=null0")
    q = qmp_of(ready)
    clients = [RawClient(path), RawClient(path), RawClient(path)]
    clients[0].go(b"disk0")
    clients[1].go(b"null0")
    clients[2].greeting()  # still in its handshake
    assert q("nbd-server-stop") == {}
    assert q("query-block-exports") == [] and not os.path.exists(path)  # gone before the answer, as QEMU
    assert sorted(q.event("BLOCK_EXPORT_DELETED")["id"] for _ in range(2)) == ["e0", "e1"]
    assert all(c.closed() for c in clients)
    assert q("blockdev-del", **{"node-name": "disk0"}) == {}


def test_qemu_img_and_qemu_io_through_an_export(clusters: Clusters) -> None:
    ready, _ = launch(clusters, "--export", "nbd,id=e0,node-name=disk0,writable=on",
                      "--export", "nbd,id=e1,node-name=null0")
    uri, ro = ready["exports"]["e0"], ready["exports"]["e1"]
    info = json.loads(run_tool("qemu-img", "info", "--output=json", uri))
    assert info["virtual-size"] == 4 << 20 and info["format"] == "raw"
    run_tool("qemu-io", "-f", "raw", "-c", "write -P 0xab 4096 8192", uri)
    out = run_tool("qemu-io", "-f", "raw", "-c", "read -P 0xab 4096 8192", "-c", "read -P 0 0 4096", uri)
    assert "Pattern verification failed" not in out
    refused = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4096", ro], capture_output=True, text=True,
                             timeout=BOUND_S)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr  # read-only: qemu-io will not write
    assert "content:" in run_tool("nbdinfo", uri)


def test_requests_pipelined_right_after_the_handshake_are_served(clusters: Clusters) -> None:
    """The bytes a client sends right behind NBD_OPT_GO reach the iothread with the socket."""
    _, path = launch(clusters, "--export", "nbd,id=e0,node-name=disk0,writable=on")
    client = RawClient(path)
    client.greeting()
    payload = b"\x5a" * 4096
    # Both in flight at once, on regions apart (replies may come in any order).
    client.sock.sendall(client_flags() + go(b"disk0") + encode_request(NBD_CMD_WRITE, 1, 8192, 4096, payload=payload)
                        + encode_request(NBD_CMD_READ, 2, 0, 4096))
    while client.option_reply()[1] != NBD_REP_ACK:
        pass
    replies, rest = read_replies(client.recv_exactly(16 + 16 + 4096), {2: 4096})
    assert sorted((r.cookie, r.error) for r in replies) == [(1, 0), (2, 0)] and rest == b""
    assert [r.data for r in replies if r.cookie == 2] == [bytes(4096)]
    client.sock.sendall(encode_request(NBD_CMD_READ, 3, 8192, 4096))
    replies, rest = read_replies(client.recv_exactly(16 + 4096), {3: 4096})
    assert [(r.cookie, r.error, r.data) for r in replies] == [(3, 0, payload)] and rest == b""
    client.sock.sendall(encode_request(NBD_CMD_DISC, 4, 0, 0))
    assert client.closed()


def test_a_moved_node_takes_its_connections_along(clusters: Clusters, qmp_of: Any) -> None:
    """x-blockdev-set-iothread under a connected client: its connection is
    handed back by the old home, quiesced, and on to the new one; the client
    sees no error, even for a request it had only half sent."""
    ready, path = launch(clusters, "--export", "nbd,id=e0,node-name=disk0,writable=on")
    q = qmp_of(ready)
    client = RawClient(path)
    client.go(b"disk0")
    payload = b"\xa5" * 4096
    client.sock.sendall(encode_request(NBD_CMD_WRITE, 1, 0, 4096, payload=payload))
    replies, _ = read_replies(client.recv_exactly(16), {})
    assert [(r.cookie, r.error) for r in replies] == [(1, 0)]
    half = encode_request(NBD_CMD_WRITE, 2, 4096, 4096, payload=payload)
    client.sock.sendall(half[:20])  # a request cut in the middle of its header
    assert q("x-blockdev-set-iothread", **{"node-name": "disk0", "iothread": "io1"}) == {}
    assert {n["node-name"]: n["iothread"] for n in q("query-named-block-nodes")}["disk0"] == "io1"
    client.sock.sendall(half[20:] + encode_request(NBD_CMD_READ, 3, 0, 8192))
    replies, rest = read_replies(client.recv_exactly(16 + 16 + 8192), {3: 8192})
    assert sorted((r.cookie, r.error) for r in replies) == [(2, 0), (3, 0)] and rest == b""
    # And back: the connection follows each move.
    assert q("x-blockdev-set-iothread", **{"node-name": "disk0", "iothread": "io0"}) == {}
    client.sock.sendall(encode_request(NBD_CMD_READ, 4, 0, 8192))
    replies, _ = read_replies(client.recv_exactly(16 + 8192), {4: 8192})
    assert [(r.cookie, r.error, r.data) for r in replies] == [(4, 0, payload * 2)]
    assert q("block-export-del", id="e0") == ("error", "export 'e0' still in use")  # counted where it went
    client.sock.sendall(encode_request(NBD_CMD_DISC, 5, 0, 0))
    assert client.closed()
    poll_until(lambda: None, lambda: q("block-export-del", id="e0") == {}, "the export to be free", BOUND_S)


def test_an_iothread_that_dies_takes_its_connections_and_the_export_stays(clusters: Clusters, qmp_of: Any) -> None:
    ready, path = launch(clusters, "--restart", "--export", "nbd,id=e0,node-name=disk0")
    q = qmp_of(ready)
    old = RawClient(path)
    old.go(b"disk0")
    old.sock.sendall(encode_request(NBD_CMD_READ, 1, 0, 512))  # answered: io0 serves it now
    replies, _ = read_replies(old.recv_exactly(16 + 512), {1: 512})
    assert [(r.cookie, r.error) for r in replies] == [(1, 0)]
    io0 = next(t["pid"] for t in ready["iothreads"] if t["id"] == "io0")
    os.kill(io0, 9)
    assert old.closed()  # its socket went with the process
    assert q.event("IOTHREAD_EXITED")["id"] == "io0"
    # A client of the export meanwhile waits (parked) until the node is open again, then is served.
    new = RawClient(path)
    new.go(b"disk0")
    new.sock.sendall(encode_request(NBD_CMD_READ, 1, 0, 4096))
    replies, _ = read_replies(new.recv_exactly(16 + 4096), {1: 4096})
    assert [(r.cookie, r.error) for r in replies] == [(1, 0)]
    assert q("query-block-exports") == [{"id": "e0", "type": "nbd", "node-name": "disk0", "shutting-down": False,
                                         "uri": ready["exports"]["e0"]}]
    new.sock.sendall(encode_request(NBD_CMD_DISC, 2, 0, 0))
    assert new.closed()
    # The dead connection is not counted: once the live one is closed, the export is free.
    poll_until(lambda: None, lambda: q("block-export-del", id="e0") == {}, "the export to be free", BOUND_S)


def test_a_connection_to_a_node_without_a_running_home_is_parked_until_it_has_one(clusters: Clusters) -> None:
    """In process, the node made homeless by hand: a client that negotiated
    meanwhile waits in the main loop, unread, and is handed over once the
    cluster says the node is placed."""
    cluster = clusters.start("io0")
    replies: list[QueryReply | ErrorReply] = []
    path = os.path.join(clusters.scratch_dir, "nbd.sock")
    with bql():
        options = parse(BlockdevOptions, {"driver": "null-co", "node-name": "n0", "size": 1 << 20})
        cluster.blockdev_add("n0", "null-co", blockdev_to_wire(options), replies.append, "io0")
        assert cluster.wait_for(lambda: bool(replies), BOUND_S) and isinstance(replies[0], QueryReply)
        nbd = NbdServer(cluster)
        nbd.start(SocketAddressUnix(type=SocketAddressType.UNIX, path=path))
        nbd.add_export(parse(BlockExportOptions, {"type": "nbd", "id": "e0", "node-name": "n0"}))
        cluster.nodes["n0"].active = False  # as while its iothread restarts
    got: list[bytes] = []

    def client() -> None:
        c = RawClient(path)
        c.go(b"n0")
        c.sock.sendall(encode_request(NBD_CMD_READ, 1, 0, 512))
        got.append(c.recv_exactly(16 + 512))
        c.close()

    thread = threading.Thread(target=client)
    thread.start()
    try:
        with bql():
            assert cluster.wait_for(lambda: nbd.clients_of("e0") == 1, BOUND_S)
            assert nbd.connection_count() == 1 and not got  # parked: negotiated, not served
            cluster.nodes["n0"].active = True
            nbd.node_placed("n0")
            assert cluster.wait_for(lambda: bool(got), BOUND_S)
    finally:
        thread.join(BOUND_S)
        with bql():
            nbd.close()
    replies_read, _ = read_replies(got[0], {1: 512})
    assert [(r.cookie, r.error, r.data) for r in replies_read] == [(1, 0, bytes(512))]
    assert not os.path.exists(path)


def test_nbdcopy_with_several_connections_and_qemu_img_compare(clusters: Clusters) -> None:
    """Several connections to one export at once (nbdcopy's), each handed to the node's iothread."""
    ready, _ = launch(clusters, "--export", "nbd,id=e0,node-name=disk0,writable=on")
    source = os.path.join(clusters.scratch_dir, "source.img")
    with open(source, "wb") as f:
        f.write(os.urandom(1 << 20) * 4)  # the 4 MiB of disk0
    uri = ready["exports"]["e0"]
    run_tool("nbdcopy", "--connections=4", "--requests=8", source, uri)
    back = os.path.join(clusters.scratch_dir, "back.img")
    run_tool("nbdcopy", "--connections=4", uri, back)
    with open(source, "rb") as a, open(back, "rb") as b:
        assert a.read() == b.read()
    run_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", source, uri)
