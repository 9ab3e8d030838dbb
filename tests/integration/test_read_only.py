"""``read-only=on`` end to end, as a user meets it: null-co and file nodes
made by ``--blockdev`` and by QMP's ``blockdev-add`` refuse writes, discards
and write-zeroes with EPERM ("Block node is read-only", QEMU's words), which
``query-blockstats`` counts as failed operations; reads still work; the
iothread holds a read-only file open O_RDONLY; a node stays read-only when
it moves to another iothread."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from iothreads import BlockClient, BlockIOError

from .support import Clusters

PATTERN = bytes(range(256)) * 16  # what the images hold at offset 0


def access_modes(pid: int, path: str) -> list[int]:
    """The access mode (``O_RDONLY``, ``O_RDWR``, ...) of each fd process ``pid``
    holds open on ``path``, from /proc/PID/fdinfo."""
    target = os.path.realpath(path)
    modes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != target:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        except FileNotFoundError:
            continue  # closed meanwhile: not held
        modes.append(flags & os.O_ACCMODE)
    return modes


def _image(clusters: Clusters, name: str) -> str:
    path = clusters.image(1 << 20, name)
    with open(path, "r+b") as f:
        f.write(PATTERN)
    return path


def _refused_writes(client: BlockClient, node: str) -> None:
    ops: list[Callable[[], None]] = [lambda: client.write(node, 0, b"x" * 512),
                                     lambda: client.discard(node, 0, 512),
                                     lambda: client.write_zeroes(node, 0, 512)]
    for op in ops:
        with pytest.raises(BlockIOError) as info:
            op()
        assert (info.value.errno, info.value.strerror) == (errno.EPERM, "Block node is read-only"), node


def test_read_only_nodes_of_every_driver_and_form_refuse_writes(clusters: Clusters) -> None:
    cli_image, qmp_image, rw_image = (_image(clusters, name) for name in ("cli.img", "qmp.img", "rw.img"))
    run = os.path.join(clusters.scratch_dir, "run")
    _, ready = clusters.launch(
        "--iothreads", "2", "--runtime-dir", run,
        "--blockdev", "driver=null-co,node-name=null-cli,size=1M,read-only=on,iothread=io0",
        "--blockdev", f'{{"driver": "file", "node-name": "file-cli", "filename": "{cli_image}", '
                      '"read-only": true, "iothread": "io0"}')
    pids = {t["id"]: t["pid"] for t in ready["iothreads"]}
    q = QEMUMonitorProtocol(ready["qmp"][0])
    q.connect()
    try:
        q.cmd("blockdev-add", driver="null-co", **{"node-name": "null-qmp", "size": 1 << 20, "read-only": True,
                                                   "iothread": "io1"})
        q.cmd("blockdev-add", driver="file", **{"node-name": "file-qmp", "filename": qmp_image, "read-only": True,
                                                "iothread": "io1"})
        q.cmd("blockdev-add", driver="file", **{"node-name": "file-rw", "filename": rw_image, "iothread": "io1"})
        read_only = ["null-cli", "file-cli", "null-qmp", "file-qmp"]
        ro = {n["node-name"]: n["ro"] for n in q.cmd("query-named-block-nodes")}
        assert ro == {**dict.fromkeys(read_only, True), "file-rw": False}

        with BlockClient(run) as client:
            for node in read_only:
                _refused_writes(client, node)
                assert client.read(node, 0, 512) == (PATTERN[:512] if node.startswith("file") else bytes(512))
            client.write("file-rw", 0, b"y" * 512)  # without read-only=on, the same writes go through
            client.discard("file-rw", 4096, 4096)
            client.write_zeroes("file-rw", 8192, 4096)

        stats = {s["node-name"]: s["stats"] for s in q.cmd("query-blockstats", **{"query-nodes": True})}
        for node in read_only:
            s = stats[node]
            failed = (s["failed_wr_operations"], s["failed_unmap_operations"], s["failed_zero_operations"])
            done = (s["wr_operations"], s["unmap_operations"], s["zero_operations"], s["wr_bytes"])
            invalid = (s["invalid_wr_operations"], s["invalid_unmap_operations"], s["invalid_zero_operations"])
            assert (failed, done, invalid) == ((1, 1, 1), (0, 0, 0, 0), (0, 0, 0)), node
            assert (s["rd_operations"], s["failed_rd_operations"]) == (1, 0), node
        rw = stats["file-rw"]
        assert (rw["wr_operations"], rw["unmap_operations"], rw["zero_operations"]) == (1, 1, 1)
        assert (rw["failed_wr_operations"], rw["failed_unmap_operations"], rw["failed_zero_operations"]) == (0, 0, 0)

        # The iothreads hold the read-only files open read-only (and the other one read-write).
        assert access_modes(pids["io0"], cli_image) == [os.O_RDONLY]
        assert access_modes(pids["io1"], qmp_image) == [os.O_RDONLY]
        assert access_modes(pids["io1"], rw_image) == [os.O_RDWR]

        # Moved to another iothread, a node keeps its options: still read-only.
        q.cmd("x-blockdev-set-iothread", **{"node-name": "file-qmp", "iothread": "io0"})
        assert (access_modes(pids["io0"], qmp_image), access_modes(pids["io1"], qmp_image)) == ([os.O_RDONLY], [])
        with BlockClient(run) as client:
            _refused_writes(client, "file-qmp")
        ro = {n["node-name"]: n["ro"] for n in q.cmd("query-named-block-nodes")}
        assert ro["file-qmp"] is True
    finally:
        q.close()
    for image in (cli_image, qmp_image):
        with open(image, "rb") as f:
            assert f.read(len(PATTERN)) == PATTERN  # untouched
