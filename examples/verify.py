"""Write a checksummed pattern to a node of a running cluster, read it back,
and check every block; exit 1 on any mismatch.

    python examples/verify.py RUNTIME_DIR [NODE] [BLOCKS]

Without RUNTIME_DIR it starts a cluster of its own.  Uses the blocking calls.
A null-co node is refused: it discards what is written.  Ctrl-C stops it:
one line, exit status 130.
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
            if node not in client.nodes():
                print(f"verify.py: no block node named {node!r}", file=sys.stderr)
                return 1
            if client.nodes()[node].driver == "null-co":
                print(f"verify.py: node {node} is null-co, which discards what is written: "
                      "there is nothing to read back", file=sys.stderr)
                return 1
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
    try:
        sys.exit(main(sys.argv))
    except KeyboardInterrupt:  # Ctrl-C: what was started is stopped on the way out
        print("verify.py: interrupted", file=sys.stderr)
        sys.exit(130)
