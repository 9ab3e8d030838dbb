"""The NBD codec against the real world: QEMU's own server byte for byte, and real clients
(nbdinfo, qemu-io, qemu-img) against a tiny server built on the codec.

The tiny server is the codec and a ``bytearray``: the handshake on a Unix
socket, then the transmission phase with the request decoder and the reply
builders (sparse structured reads, block status for both contexts).  Each
test skips only when its tool is not installed (Debian: libnbd-bin,
qemu-utils).
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from iothreads.testing import wait_until
from protocol.nbd import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_READ_ONLY,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_META_ID_BASE_ALLOCATION,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_INFO,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    NbdExport,
    NbdHandshakeState,
    NbdNegotiated,
    NbdServerHandshake,
    NbdRequestDecoder,
    ReplyBuffer,
    chunk_block_status,
    chunk_done,
    chunk_hole,
    chunk_read,
    encode_request,
    generic_reply,
    simple_reply,
)
from tests.clients import need
from tests.protocol.nbd_model import (
    CLIENT_FLAGS,
    Chunk,
    OptionReply,
    client_flags,
    info_data,
    meta_data,
    option,
    read_handshake,
    read_replies,
)

pytestmark = pytest.mark.integration  # runs the real clients and qemu-nbd

BLOCK = 4096
TOOL_TIMEOUT_S = 60


# -- a tiny server: the codec over a bytearray ------------------------------------------------------


class MemoryServer:
    """NBD exports of ``bytearray`` disks on a Unix socket, a thread per connection."""

    def __init__(self, path: Path, exports: dict[str, NbdExport]) -> None:
        self.path = path
        self.exports = exports
        self.disks = {name: bytearray(e.size_bytes) for name, e in exports.items()}
        self.outcomes: list[NbdHandshakeState] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        self._wake_r, self._wake_w = os.pipe()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name="nbd-accept")
        self._acceptor.start()

    def uri(self, name: str = "") -> str:
        return f"nbd+unix:///{name}?socket={self.path}"

    def close(self) -> None:
        """Stop accepting and wait for the connections to end (the clients' doing)."""
        if self._listener.fileno() < 0:
            return
        os.write(self._wake_w, b"x")
        self._acceptor.join(10)
        for t in self._threads:
            t.join(10)
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _accept(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                if any(key.fileobj == self._wake_r for key, _ in sel.select()):
                    return
                conn, _ = self._listener.accept()
                t = threading.Thread(target=self._serve, args=(conn,), name="nbd-conn")
                self._threads.append(t)
                t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                hs = NbdServerHandshake(self.exports)
                while hs.state is NbdHandshakeState.NEGOTIATING:
                    conn.sendall(hs.data_to_send())
                    hs.data_sent(len(hs.data_to_send()))
                    if hs.wants_input:
                        hs.receive_data(conn.recv(65536))
                self.outcomes.append(hs.state)
                conn.sendall(hs.data_to_send())
                if hs.negotiated is not None:
                    self._transmission(conn, hs.negotiated, hs.unused_data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # a client that leaves without waiting (nbdinfo after NBD_OPT_ABORT)

    def _transmission(self, conn: socket.socket, n: NbdNegotiated, data: bytes) -> None:
        disk = self.disks[n.export.name]
        decoder = NbdRequestDecoder(n.export.size_bytes, read_only=n.export.read_only,
                                    structured_replies=n.structured_replies, meta_contexts=len(n.meta_contexts))
        while True:
            out: list[ReplyBuffer] = []
            for r in decoder.feed(data):
                if r.command == NBD_CMD_DISC:
                    break
                if r.error:
                    out += generic_reply(r.cookie, r.error, r.message, n.structured_replies)
                elif r.command == NBD_CMD_READ:
                    out += read_reply(disk, r.cookie, r.offset, r.length, r.flags, n.structured_replies)
                elif r.command == NBD_CMD_WRITE:
                    assert r.payload is not None
                    disk[r.offset:r.offset + r.length] = r.payload
                    out += simple_reply(r.cookie)
                elif r.command in (NBD_CMD_WRITE_ZEROES, NBD_CMD_TRIM):
                    disk[r.offset:r.offset + r.length] = bytes(r.length)
                    out += simple_reply(r.cookie)
                elif r.command == NBD_CMD_BLOCK_STATUS:
                    for i, context in enumerate(n.meta_contexts):
                        extents = block_status(disk, r.offset, r.length, context.context_id,
                                               bool(r.flags & NBD_CMD_FLAG_REQ_ONE))
                        out += chunk_block_status(r.cookie, context.context_id, extents,
                                                  done=i == len(n.meta_contexts) - 1)
                else:  # FLUSH, CACHE
                    out += simple_reply(r.cookie)
            while out:  # one sendmsg, or a few when the socket takes part of it
                sent = conn.sendmsg(out)
                while out and sent >= memoryview(out[0]).nbytes:
                    sent -= memoryview(out.pop(0)).nbytes
                if out and sent:
                    out[0] = memoryview(out[0])[sent:]
            if decoder.closed:
                return
            data = conn.recv(1 << 20)
            if not data:
                return


def runs(disk: bytearray, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, all zero) runs of ``disk[offset:offset + length]``, split at block boundaries."""
    end = offset + length
    while offset < end:
        stop = min(end, (offset // BLOCK + 1) * BLOCK)
        zero = not any(disk[offset:stop])
        while stop < end:
            nxt = min(end, stop + BLOCK)
            if (not any(disk[stop:nxt])) != zero:
                break
            stop = nxt
        yield offset, stop - offset, zero
        offset = stop


def read_reply(disk: bytearray, cookie: int, offset: int, length: int, flags: int,
               structured: bool) -> list[ReplyBuffer]:
    data = memoryview(disk)[offset:offset + length]
    if not structured:
        return simple_reply(cookie, 0, data)
    if not length:
        return chunk_done(cookie)
    if flags & NBD_CMD_FLAG_DF:
        return chunk_read(cookie, offset, data)
    out: list[ReplyBuffer] = []
    pieces = list(runs(disk, offset, length))
    for i, (start, size, zero) in enumerate(pieces):
        last = i == len(pieces) - 1
        out += (chunk_hole(cookie, start, size, last) if zero
                else chunk_read(cookie, start, memoryview(disk)[start:start + size], last))
    return out


def block_status(disk: bytearray, offset: int, length: int, context_id: int, one: bool) -> list[tuple[int, int]]:
    extents = []
    for _, size, zero in runs(disk, offset, min(length, len(disk) - offset)):
        if context_id == NBD_META_ID_BASE_ALLOCATION:
            extents.append((size, NBD_STATE_HOLE | NBD_STATE_ZERO if zero else 0))
        else:  # qemu:allocation-depth: 1 where the node holds data
            extents.append((size, 0 if zero else 1))
        if one:
            break
    return extents


EXPORTS = {
    "disk": NbdExport("disk", 1 << 20, description="a disk", allocation_depth=True),
    "ro": NbdExport("ro", 64 * 1024, read_only=True, multi_conn=False, min_block_bytes=512),
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MemoryServer]:
    srv = MemoryServer(tmp_path / "nbd.sock", EXPORTS)
    yield srv
    srv.close()


def tool(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result.stdout


# -- real clients against the codec ----------------------------------------------------------------


def test_nbdinfo_lists_the_exports(server: MemoryServer) -> None:
    info = json.loads(tool(need("nbdinfo"), "--list", "--json", server.uri()))
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    exports = {e["export-name"]: e for e in info["exports"]}
    assert set(exports) == {"disk", "ro"}
    disk, ro = exports["disk"], exports["ro"]
    assert disk["description"] == "a disk" and "description" not in ro
    assert (disk["export-size"], ro["export-size"]) == (1 << 20, 64 * 1024)
    assert disk["contexts"] == ["base:allocation", "qemu:allocation-depth"] and ro["contexts"] == ["base:allocation"]
    assert (disk["is_read_only"], disk["can_trim"], disk["can_zero"], disk["can_fast_zero"], disk["can_multi_conn"],
            disk["can_df"], disk["can_flush"], disk["can_fua"], disk["can_cache"]) == (False,) + (True,) * 8
    assert (ro["is_read_only"], ro["can_trim"], ro["can_zero"], ro["can_multi_conn"]) == (True, False, False, False)
    assert (ro["block_size_minimum"], ro["block_size_preferred"], ro["block_size_maximum"]) == (512, 4096, 1 << 25)
    server.close()
    assert server.outcomes == [NbdHandshakeState.CLOSED]  # nbdinfo --list ends with NBD_OPT_ABORT


def test_qemu_io_writes_reads_zeroes_and_discards(server: MemoryServer) -> None:
    commands = ["write -P 0xa5 0 64k", "read -P 0xa5 0 64k", "write -z 16k 8k", "read -P 0 16k 8k",
                "read -P 0xa5 24k 40k", "discard 32k 4k", "read -P 0 32k 4k",
                "aio_write -P 0x11 128k 4k", "aio_write -P 0x22 132k 4k", "aio_flush",
                "read -P 0x11 128k 4k", "read -P 0x22 132k 4k", "read -P 0 512k 4k", "flush"]
    out = tool(need("qemu-io"), "-f", "raw", *[a for c in commands for a in ("-c", c)], server.uri("disk"))
    assert "Pattern verification failed" not in out and "error" not in out.lower()
    disk = server.disks["disk"]
    assert disk[:16 * 1024] == b"\xa5" * 16 * 1024 and disk[16 * 1024:24 * 1024] == bytes(8 * 1024)
    assert disk[128 * 1024:132 * 1024] == b"\x11" * 4096


def test_nbdinfo_maps_both_contexts(server: MemoryServer) -> None:
    server.disks["disk"][8192:16384] = b"x" * 8192
    out = tool(need("nbdinfo"), "--map", "--json", server.uri("disk"))
    assert [(e["offset"], e["length"], e["type"]) for e in json.loads(out)] == [
        (0, 8192, 3), (8192, 8192, 0), (16384, (1 << 20) - 16384, 3)]
    out = tool(need("nbdinfo"), "--map=qemu:allocation-depth", "--json", server.uri("disk"))
    assert [(e["offset"], e["length"], e["type"]) for e in json.loads(out)] == [
        (0, 8192, 0), (8192, 8192, 1), (16384, (1 << 20) - 16384, 0)]


def test_qemu_img_copies_an_export_out_and_in(server: MemoryServer, tmp_path: Path) -> None:
    disk = server.disks["disk"]
    disk[4096:12288] = os.urandom(8192)
    disk[700_000:700_100] = b"z" * 100
    image = tmp_path / "out.img"
    tool(need("qemu-img"), "convert", "-f", "raw", "-O", "raw", server.uri("disk"), str(image))
    assert image.read_bytes() == bytes(disk)
    info = json.loads(tool("qemu-img", "info", "--output=json", server.uri("ro")))
    assert info["virtual-size"] == 64 * 1024
    image.write_bytes(os.urandom(1 << 20))
    tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), server.uri("disk"))
    assert bytes(disk) == image.read_bytes()
    tool("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), server.uri("disk"))


# -- QEMU's server, byte for byte -------------------------------------------------------------------


@pytest.fixture(scope="module")
def qemu_nbd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, NbdExport]]]:
    """qemu-nbd serving one export, and the same export described for the codec."""
    binary = need("qemu-nbd")
    work = tmp_path_factory.mktemp("qemu-nbd")
    image, sock = work / "disk.img", work / "nbd.sock"
    image.write_bytes(bytes(1 << 20))
    # In the foreground, as this test's child: reaped here, not left a zombie for an init that
    # does not reap (as --fork would); ready once its socket exists.
    proc = subprocess.Popen([binary, "-k", str(sock), "-f", "raw", "-x", "disk", "-D", "a disk", "-A", "-e", "0",
                             "-t", str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, "qemu-nbd to listen", TOOL_TIMEOUT_S)
        assert proc.poll() is None, f"qemu-nbd exited: {proc.communicate()[1]!r}"
        replies = read_handshake(qemu_output(sock, client_flags() + option(
            NBD_OPT_INFO, info_data(b"disk", (NBD_INFO_BLOCK_SIZE,))) + option(NBD_OPT_ABORT))).replies
        infos = {struct.unpack_from(">H", r.payload)[0]: r.payload[2:] for r in replies
                 if isinstance(r, OptionReply) and r.type == NBD_REP_INFO}
        size, flags = struct.unpack(">QH", infos[NBD_INFO_EXPORT])
        minimum, preferred, maximum = struct.unpack(">III", infos[NBD_INFO_BLOCK_SIZE])
        export = NbdExport("disk", size, description="a disk", read_only=bool(flags & NBD_FLAG_READ_ONLY),
                           multi_conn=bool(flags & NBD_FLAG_CAN_MULTI_CONN), min_block_bytes=minimum,
                           preferred_block_bytes=preferred, max_payload_bytes=maximum, allocation_depth=True)
        assert export.transmission_flags == flags, "the export's flags are not QEMU's"
        yield sock, {"disk": export}
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def qemu_output(sock: Path, stream: bytes) -> bytes:
    """All qemu-nbd says to a client that sends ``stream`` and then stops writing."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TOOL_TIMEOUT_S)  # a bound, not a pace: qemu-nbd closes at the end of our input
        s.connect(str(sock))
        try:
            s.sendall(stream)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it closed early: what it said is still there to read
        out = b""
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:  # it closed with some of our input unread
                break
            if not chunk:
                break
            out += chunk
    return out


def codec_output(exports: dict[str, NbdExport], stream: bytes) -> tuple[bytes, bytes]:
    """What the codec says to that client: in the handshake, then in the transmission phase."""
    hs = NbdServerHandshake(exports)
    hs.receive_data(stream)
    if hs.state is NbdHandshakeState.NEGOTIATING:
        hs.receive_data(b"")  # the client stopped writing
    if hs.negotiated is None:
        return hs.data_to_send(), b""
    n = hs.negotiated
    decoder = NbdRequestDecoder(n.export.size_bytes, read_only=n.export.read_only,
                                structured_replies=n.structured_replies, meta_contexts=len(n.meta_contexts))
    replies: list[ReplyBuffer] = []
    for r in decoder.feed(hs.unused_data):
        assert r.error, "options after the handshake made a valid request"
        replies += generic_reply(r.cookie, r.error, r.message, n.structured_replies)
    return hs.data_to_send(), b"".join(bytes(b) for b in replies)


def without_messages(data: bytes) -> list[object]:
    """Transmission replies, their messages left out: QEMU's texts changed between versions."""
    replies, rest = read_replies(data, {})
    assert rest == b""
    return [dataclasses.replace(r, message=b"") if isinstance(r, Chunk) else r for r in replies]


# Option streams with the cases where this codec chose to differ from qemu-nbd 7.2 left out:
# LIST_META_CONTEXT before STRUCTURED_REPLY (QEMU 8.2 and later answer it, as the codec),
# META_CONTEXT options with data past their queries (QEMU leaves it in the stream),
# NUL in NBD_OPT_EXPORT_NAME (QEMU's C string stops there) and NBD_OPT_EXTENDED_HEADERS
# (QEMU 8.2 and later take it).
DIFF_NAMES = st.sampled_from([b"disk", b"", b"nope", b"\xff\xfe", b"d" * 200])
DIFF_QUERIES = st.lists(st.sampled_from([b"base:", b"base:allocation", b"qemu:", b"qemu:allocation-depth",
                                         b"qemu:dirty-bitmap:x", b"x-y:z", b"", b"base:\x00", b"q" * 5000]),
                        max_size=4)
SAFE_OPTS = st.sampled_from([0, 2, 3, 4, 5, 6, 7, 8, 12, 0xFFFFFFFF])
DIFF_OPTIONS = st.one_of(
    st.builds(lambda o, n, r: option(o, info_data(n, r)), st.sampled_from([NBD_OPT_INFO, NBD_OPT_GO]), DIFF_NAMES,
              st.lists(st.integers(0, 4), max_size=3).map(tuple)),
    st.builds(lambda o, n, r: option(o, info_data(n, r)[:-1]), st.sampled_from([NBD_OPT_INFO, NBD_OPT_GO]),
              DIFF_NAMES, st.lists(st.sampled_from([NBD_INFO_NAME]), min_size=1, max_size=2).map(tuple)),
    st.builds(lambda n, q: option(NBD_OPT_SET_META_CONTEXT, meta_data(n, q)), DIFF_NAMES, DIFF_QUERIES),
    st.builds(lambda n, q: option(NBD_OPT_LIST_META_CONTEXT, meta_data(n, q)), DIFF_NAMES, DIFF_QUERIES),
    st.sampled_from([option(NBD_OPT_STRUCTURED_REPLY), option(NBD_OPT_STRUCTURED_REPLY, b"x"), option(NBD_OPT_LIST),
                     option(NBD_OPT_LIST, b"xy"), option(NBD_OPT_STARTTLS), option(NBD_OPT_ABORT),
                     option(NBD_OPT_EXPORT_NAME, b"disk"), option(NBD_OPT_EXPORT_NAME, b"nope"),
                     option(NBD_OPT_LIST, magic=0x1122334455667788), option(77, length=(1 << 25) + 1)]),
    st.builds(option, SAFE_OPTS, st.binary(max_size=40)),
    st.builds(lambda o, d, delta: option(o, d, length=max(0, len(d) + delta)), SAFE_OPTS, st.binary(max_size=30),
              st.integers(-6, 6)),
)


def lists_meta_before_structured(options: list[bytes]) -> bool:
    structured = False
    for opt in options:
        if len(opt) >= 16:
            code, length = struct.unpack_from(">II", opt, 8)
            if code == NBD_OPT_STRUCTURED_REPLY and length == 0:
                structured = True
            if code == NBD_OPT_LIST_META_CONTEXT and not structured:
                return True
    return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([CLIENT_FLAGS, NBD_FLAG_C_FIXED_NEWSTYLE, 0, 0x10]), st.lists(DIFF_OPTIONS, max_size=7))
def test_the_handshake_answers_as_qemu_nbd_byte_for_byte(qemu_nbd: tuple[Path, dict[str, NbdExport]], flags: int,
                                                         options: list[bytes]) -> None:
    assume(not lists_meta_before_structured(options))
    sock, exports = qemu_nbd
    stream = client_flags(flags) + b"".join(options)
    (handshake, transmission), theirs = codec_output(exports, stream), qemu_output(sock, stream)
    assert read_handshake(handshake).rest == b""
    assert theirs[:len(handshake)] == handshake
    # After the handshake: the options that followed are bad requests, each answered EINVAL.
    assert without_messages(theirs[len(handshake):]) == without_messages(transmission)


SIZE = 1 << 20
REQUESTS = st.tuples(
    st.sampled_from([NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH, NBD_CMD_TRIM, NBD_CMD_CACHE, NBD_CMD_WRITE_ZEROES,
                     NBD_CMD_BLOCK_STATUS, 8, 200]),
    st.sampled_from([0, 1, 2, 4, 8, 16, 32, 0x8000]) | st.integers(0, 0xFFFF),
    st.sampled_from([0, 4096, SIZE - 512, SIZE, SIZE + 1, 2**63]),
    st.sampled_from([0, 1, 512, 4096, 1 << 25, (1 << 25) + 1]),
)


def final_errors(data: bytes, read_lengths: dict[int, int]) -> dict[int, int]:
    """Each answered cookie's error (0: success), once its reply is complete."""
    replies, rest = read_replies(data, read_lengths)
    assert rest == b""
    errors: dict[int, int] = {}
    for r in replies:
        if isinstance(r, Chunk):
            errors[r.cookie] = r.error or errors.get(r.cookie, 0)
        else:
            errors[r.cookie] = r.error
    done = {r.cookie for r in replies if not isinstance(r, Chunk) or r.done}
    return {cookie: error for cookie, error in errors.items() if cookie in done}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.booleans(), st.lists(REQUESTS, min_size=1, max_size=12))
def test_requests_are_refused_as_qemu_nbd_refuses_them(qemu_nbd: tuple[Path, dict[str, NbdExport]],
                                                        structured: bool,
                                                        requests: list[tuple[int, int, int, int]]) -> None:
    """The same requests to qemu-nbd and to the decoder: the same ones refused (NBD_EINVAL), the
    others answered; a write's payload, refused or not, never loses the stream."""
    assume(not any(c == NBD_CMD_WRITE and n > 1 << 25 for c, _, _, n in requests))  # that one disconnects
    sock, exports = qemu_nbd
    export = exports["disk"]
    handshake = client_flags()
    if structured:
        handshake += option(NBD_OPT_STRUCTURED_REPLY) + option(
            NBD_OPT_SET_META_CONTEXT, meta_data(b"disk", (b"base:allocation",)))
    handshake += option(NBD_OPT_GO, info_data(b"disk"))
    stream = b""
    for cookie, (command, flags, offset, length) in enumerate(requests, start=1):
        payload = bytes([cookie]) * length if command == NBD_CMD_WRITE else b""
        stream += encode_request(command, cookie, offset, length, flags, payload)
    decoder = NbdRequestDecoder(export.size_bytes, structured_replies=structured, meta_contexts=int(structured))
    ours = {r.cookie: r.error for r in decoder.feed(stream)}
    assert set(ours) == set(range(1, len(requests) + 1)) and decoder.error is None
    read_lengths = {cookie: requests[cookie - 1][3] for cookie, error in ours.items()
                    if not error and requests[cookie - 1][0] == NBD_CMD_READ}

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TOOL_TIMEOUT_S)  # a bound, not a pace
        s.connect(str(sock))
        s.sendall(handshake)
        out = b""
        while len(out) < 18 or OptionReply(NBD_OPT_GO, NBD_REP_ACK, b"") not in read_handshake(out).replies:
            chunk = s.recv(1 << 16)
            assert chunk, "qemu-nbd closed in the handshake"
            out += chunk
        tail = read_handshake(out).rest
        s.sendall(stream)
        theirs: dict[int, int] = {}
        while len(theirs) < len(requests):
            chunk = s.recv(1 << 20)
            assert chunk, f"qemu-nbd closed with {len(theirs)} of {len(requests)} replies"
            tail += chunk
            if not read_replies(tail, read_lengths)[1]:  # no reply torn at the end
                theirs = final_errors(tail, read_lengths)
    for cookie, error in ours.items():
        if error:
            assert theirs[cookie] == NBD_EINVAL, (requests[cookie - 1], theirs[cookie])
        else:  # accepted: its outcome is the block layer's (a fast zero may be ENOTSUP), never a refusal
            assert theirs[cookie] != NBD_EINVAL, (requests[cookie - 1], theirs[cookie])
