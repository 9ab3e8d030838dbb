"""Write a checksummed pattern to a node of a running cluster, read it back,
and check every block; exit 1 on any mismatch.

    python examples/verify.py RUNTIME_DIR [NODE] [BLOCKS]

Without RUNTIME_DIR it starts a cluster of its own.  Uses the blocking calls.
"""

from __future__ import annotations

import hashlib
import sys

from iothreads import BlockClient
from mainloop import EmbeddedCluster

BS = 4096


def pattern(offset: int) -> bytes:
    seed = hashlib.sha256(offset.to_bytes(8, "little")).digest()
    return (seed * (BS // len(seed)))[:BS]


def main(argv: list[str]) -> int:
    embedded = EmbeddedCluster(16 << 20) if len(argv) < 2 else None
    runtime_dir = embedded.runtime_dir if embedded else argv[1]
    try:
        with BlockClient(runtime_dir) as client:
            node = argv[2] if len(argv) > 2 else sorted(client.nodes())[0]
            blocks = min(int(argv[3]) if len(argv) > 3 else 256, client.node_size(node) // BS)
            for b in range(blocks):
                client.write(node, b * BS, pattern(b * BS))
            client.flush(node)
            bad = [b for b in range(blocks) if client.read(node, b * BS, BS) != pattern(b * BS)]
            print(f"{node}: {blocks} blocks written and read back, {len(bad)} mismatches")
            return 1 if bad else 0
    finally:
        if embedded:
            embedded.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
