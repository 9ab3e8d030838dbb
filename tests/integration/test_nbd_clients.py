"""The real NBD clients, unmodified, against a launched cluster's exports:
qemu-io (patterns, aio batches, discard, write-zeroes), qemu-img (convert in
and out, compare), nbdinfo (maps of both metadata contexts), nbdcopy (one
and four connections), fio's nbd engine (random reads and writes, verified),
a node moved while fio runs, and a client that breaks off mid-request
leaving the others unharmed.  Past the handshake (the main loop's) every
byte here is served by the iothread that holds the node."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import socket
import struct
import subprocess
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from iothreads.testing import wait_until
from protocol.nbd import (
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_OPT_EXPORT_NAME,
    encode_request,
)
from tests import clients
from tests.clients import need
from tests.protocol.nbd_model import GREETING_SIZE, client_flags, option, read_replies

from .support import Clusters

BOUND_S = 120.0
"""Bound on one tool's run (nbdcopy of 256 MiB on a loaded machine included)."""

MiB = 1 << 20


run = functools.partial(clients.run_tool, timeout_s=BOUND_S)


def launch(clusters: Clusters, image_bytes: int, *exports: str) -> tuple[dict[str, Any], str]:
    """Two iothreads, file node ``disk0`` (a sparse image of ``image_bytes``)
    in io0, an NBD server in the runtime directory, ``exports``: the READY
    data and the image."""
    image = clusters.image(image_bytes)
    run_dir = os.path.join(clusters.scratch_dir, "run")
    _, ready = clusters.launch(
        "--iothreads", "2", "--runtime-dir", run_dir,
        "--blockdev", f"driver=file,node-name=disk0,filename={image},iothread=io0",
        "--nbd-server", f"addr.type=unix,addr.path={os.path.join(run_dir, 'nbd.sock')}",
        *(a for e in exports for a in ("--export", e)))
    return ready, image


def random_file(path: str, size_bytes: int, seed: int) -> str:
    """A file of ``size_bytes`` of random data, but for a MiB of zeroes in the middle; its SHA-256."""
    digest = hashlib.sha256()
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(size_bytes // MiB):
            data = bytes(MiB) if i == size_bytes // MiB // 2 else rng.randbytes(MiB)
            f.write(data)
            digest.update(data)
    return digest.hexdigest()


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def test_qemu_io_patterns_aio_batches_discard_and_write_zeroes(clusters: Clusters) -> None:
    ready, image = launch(clusters, 32 * MiB, "nbd,id=e0,node-name=disk0,writable=on")
    uri = ready["exports"]["e0"]
    out = run("qemu-io", "-f", "raw",
              "-c", "write -P 0x11 0 64k",
              "-c", "write -f -P 0x12 64k 64k",  # FUA
              *(a for i in range(16) for a in ("-c", f"aio_write -P {0x20 + i} {1 + i}M 256k")),
              "-c", "aio_flush",
              "-c", "flush",
              "-c", "read -P 0x11 0 64k",
              "-c", "read -P 0x12 64k 64k",
              *(a for i in range(16) for a in ("-c", f"aio_read -P {0x20 + i} {1 + i}M 256k")),
              "-c", "aio_flush",
              "-c", "discard 0 64k",
              "-c", "write -z 64k 32k",
              "-c", "write -z -u 96k 32k",
              "-c", "read -P 0 64k 64k",
              "-c", "read -P 0x20 1M 256k",
              uri)
    assert "failed" not in out.lower() and "error" not in out.lower(), out
    assert out.count("wrote ") == 4 + 16 and out.count("read ") == 2 + 16 + 2
    with open(image, "rb") as f:
        f.seek(64 * 1024)
        assert f.read(64 * 1024) == bytes(64 * 1024)
        for i in range(16):
            f.seek((1 + i) * MiB)
            assert f.read(256 * 1024) == bytes([0x20 + i]) * (256 * 1024)


def test_qemu_img_converts_in_and_out_and_compares_identical(clusters: Clusters) -> None:
    ready, image = launch(clusters, 32 * MiB, "nbd,id=e0,node-name=disk0,writable=on")
    uri = ready["exports"]["e0"]
    source = os.path.join(clusters.scratch_dir, "source.raw")
    digest = random_file(source, 32 * MiB, 1)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, uri)
    assert "Images are identical" in run("qemu-img", "compare", "-f", "raw", "-F", "raw", source, uri)
    out = os.path.join(clusters.scratch_dir, "out.raw")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out)
    assert sha256_of(out) == digest == sha256_of(image)
    assert json.loads(run("qemu-img", "info", "--output=json", uri))["virtual-size"] == 32 * MiB


def test_nbdinfo_maps_both_contexts_of_a_sparse_image(clusters: Clusters) -> None:
    ready, image = launch(clusters, 8 * MiB, "nbd,id=e0,node-name=disk0,allocation-depth=on")
    with open(image, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"\x01" * MiB)
    uri = ready["exports"]["e0"]
    base = run("nbdinfo", "--map", uri)
    rows = [line.split()[:3] for line in base.splitlines() if line.strip()]
    if rows == [["0", str(8 * MiB), "0"]]:
        pytest.skip("this file system does not report holes (SEEK_HOLE)")
    assert rows == [["0", str(2 * MiB), "3"], [str(2 * MiB), str(MiB), "0"], [str(3 * MiB), str(5 * MiB), "3"]]
    depth = run("nbdinfo", "--map=qemu:allocation-depth", uri)
    assert [line.split()[:3] for line in depth.splitlines() if line.strip()] == [["0", str(8 * MiB), "1"]]


@pytest.mark.parametrize("connections", [1, 4])
def test_nbdcopy_of_256_mib_in_and_out(clusters: Clusters, connections: int) -> None:
    size = 256 * MiB
    ready, image = launch(clusters, size, "nbd,id=e0,node-name=disk0,writable=on")
    uri = ready["exports"]["e0"]
    source = os.path.join(clusters.scratch_dir, "source.raw")
    digest = random_file(source, size, connections)
    run("nbdcopy", f"--connections={connections}", source, uri)
    out = os.path.join(clusters.scratch_dir, "out.raw")
    run("nbdcopy", f"--connections={connections}", uri, out)
    assert sha256_of(out) == digest == sha256_of(image)


def fio(uri: str, *options: str, cwd: str) -> subprocess.Popen[str]:
    """fio's nbd engine on ``uri``, started in ``cwd`` (where it would leave files), saving no verify state."""
    need("fio")
    return subprocess.Popen(["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
                             "--verify_state_save=0", *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd)


def fio_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=BOUND_S)
    assert proc.returncode == 0, f"fio: status {proc.returncode}: {out}{err}"
    job: dict[str, Any] = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    return job


def test_fio_random_reads_and_writes_verified(clusters: Clusters) -> None:
    ready, _ = launch(clusters, 64 * MiB, "nbd,id=e0,node-name=disk0,writable=on")
    job = fio_result(fio(ready["exports"]["e0"], "--rw=randrw", "--bs=4k", "--iodepth=16", "--size=32M",
                         "--verify=crc32c", "--verify_fatal=1", cwd=clusters.scratch_dir))
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0


def test_a_node_moved_under_a_running_fio_job(clusters: Clusters) -> None:
    """x-blockdev-set-iothread while fio writes and verifies: its connection
    follows the node (quiesced, handed back, handed to the new home) and fio
    sees no error and verifies every block."""
    ready, image = launch(clusters, 64 * MiB, "nbd,id=e0,node-name=disk0,writable=on")
    qmp = QEMUMonitorProtocol(ready["qmp"][0])
    qmp.connect()
    try:
        job = fio(ready["exports"]["e0"], "--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=48M",
                  "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", cwd=clusters.scratch_dir)
        wait_until(lambda: os.stat(image).st_blocks > 0 or job.poll() is not None, "fio's first writes")
        moves = 0
        while job.poll() is None and moves < 40:
            home = "io1" if moves % 2 == 0 else "io0"
            reply = qmp.cmd_raw("x-blockdev-set-iothread", {"node-name": "disk0", "iothread": home})
            assert reply.get("return") == {}, reply
            moves += 1
        result = fio_result(job)
        assert moves >= 1 and result["write"]["io_bytes"] == 48 * MiB
    finally:
        qmp.close()


def handshake(path: str, name: bytes) -> socket.socket:
    """A connection past NBD_OPT_EXPORT_NAME (fixed newstyle, no zeroes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(BOUND_S)
    sock.connect(path)
    greeting = b""
    while len(greeting) < GREETING_SIZE:
        greeting += sock.recv(GREETING_SIZE - len(greeting))
    sock.sendall(client_flags(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) + option(NBD_OPT_EXPORT_NAME, name))
    answer = b""
    while len(answer) < 10:
        answer += sock.recv(10 - len(answer))
    return sock


def test_clients_that_break_off_mid_request_leave_the_others_unharmed(clusters: Clusters) -> None:
    ready, _ = launch(clusters, 16 * MiB, "nbd,id=e0,node-name=disk0,writable=on")
    path = os.path.join(clusters.scratch_dir, "run", "nbd.sock")
    survivor = fio(ready["exports"]["e0"], "--rw=randrw", "--bs=4k", "--iodepth=4", "--size=8M",
                   "--verify=crc32c", "--verify_fatal=1", cwd=clusters.scratch_dir)
    for i in range(20):
        sock = handshake(path, b"disk0")
        if i % 4 == 0:  # half a write's payload
            sock.sendall(encode_request(NBD_CMD_WRITE, 1, 0, 65536) + b"x" * 30_000)
        elif i % 4 == 1:  # half a header
            sock.sendall(encode_request(NBD_CMD_READ, 1, 0, 4096)[:15])
        elif i % 4 == 2:  # a bad magic: answered, then closed by the server
            sock.sendall(struct.pack(">IHHQQI", 0xBAD, 0, 0, 5, 0, 512))
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            replies, _ = read_replies(data, {})
            assert [(r.cookie, r.error) for r in replies] == [(5, 22)]
        else:  # a read asked, its reply never read
            sock.sendall(encode_request(NBD_CMD_READ, 1, 0, 4 * MiB))
        sock.close()
    fio_result(survivor)
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 4k", "-c", "read -P 0x42 0 4k", ready["exports"]["e0"])
    assert "failed" not in out.lower()
