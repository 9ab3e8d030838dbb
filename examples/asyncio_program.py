"""One asyncio program: a cluster managed over QMP and block I/O, on one event loop.

    python examples/asyncio_program.py

It starts a cluster of its own (two iothreads, nodes disk0 on io0 and disk1
on io1, a temporary raw image), then, all from asyncio tasks:

* QMP with ``qemu.qmp``'s ``QMPClient`` (asyncio itself): the iothreads, a
  null-co node added on io1 with ``blockdev-add``;
* block I/O with ``BlockClient``, its requests awaited (``awrite``,
  ``aread``, ``aflush``): 256 blocks written by 32 tasks at once, then read
  back and compared, while disk0 moves to io1 (``x-blockdev-set-iothread``)
  in the middle of the reads: the client follows the node, no request fails;
* the node's statistics from ``query-blockstats``.

The block client's completions arrive through the asyncio loop (its
AioContext is driven by it: an ``AsyncioSource``), with no thread of its own.
Needs ``qemu.qmp`` (in the project's ``test`` extra).  Ctrl-C stops it: one
line, exit status 130.
"""

from __future__ import annotations

import asyncio
import os
import sys

from qemu.qmp import QMPClient

from iothreads import BlockClient
from mainloop import EmbeddedCluster

BS, BLOCKS, TASKS = 4096, 256, 32


def block(i: int) -> bytes:
    return i.to_bytes(4, "big") * (BS // 4)


async def copy_in(client: BlockClient, task: int) -> None:
    for i in range(task, BLOCKS, TASKS):
        await client.awrite("disk0", i * BS, block(i))


async def check(client: BlockClient, task: int) -> int:
    """Read back this task's blocks; the number that differ."""
    return sum([await client.aread("disk0", i * BS, BS) != block(i) for i in range(task, BLOCKS, TASKS)])


async def main() -> int:
    embedded = EmbeddedCluster(BLOCKS * BS)
    qmp = QMPClient("asyncio-program")
    try:
        await qmp.connect(os.path.join(embedded.runtime_dir, "qmp.sock"))
        iothreads = await qmp.execute("query-iothreads")
        print("iothreads:", ", ".join(f"{t['id']} (pid {t['thread-id']})" for t in iothreads), flush=True)
        await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "scratch", "size": 1 << 20,
                                           "iothread": "io1"})
        with BlockClient(embedded.runtime_dir) as client:
            await asyncio.gather(*(copy_in(client, t) for t in range(TASKS)))
            await client.aflush("disk0")
            print(f"disk0: {BLOCKS} blocks written by {TASKS} tasks at once", flush=True)
            checks = [asyncio.create_task(check(client, t)) for t in range(TASKS)]
            await asyncio.sleep(0)  # (the reads are on their way) ...
            await qmp.execute("x-blockdev-set-iothread", {"node-name": "disk0", "iothread": "io1"})
            mismatches = sum(await asyncio.gather(*checks))  # ... and the node moved under them
            print(f"disk0: read back while it moved to io1, {mismatches} mismatches, "
                  f"{client.resends} requests followed it", flush=True)
            assert await client.aread("scratch", 0, 8) == bytes(8)
        stats = {s["node-name"]: s["stats"] for s in await qmp.execute("query-blockstats", {"query-nodes": True})}
        print(f"disk0 (query-blockstats): {stats['disk0']['rd_operations']} reads, "
              f"{stats['disk0']['wr_operations']} writes", flush=True)
        await qmp.execute("blockdev-del", {"node-name": "scratch"})
        return 1 if mismatches else 0
    finally:
        await qmp.disconnect()
        embedded.close()


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:  # Ctrl-C: what was started is stopped on the way out
        print("asyncio_program.py: interrupted", file=sys.stderr)
        sys.exit(130)
