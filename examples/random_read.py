"""Random 4 KiB reads against a running cluster, 32 in flight, for two seconds.

    iothreads launch --blockdev driver=null-co,node-name=null0,size=1G &
    python examples/random_read.py RUNTIME_DIR [NODE]

Without RUNTIME_DIR it starts a cluster of its own (a temporary raw image).
Completions run in this program's own AioContext: the main loop of the
cluster is not on the path.  Ctrl-C stops it: one line, exit status 130.
"""

from __future__ import annotations

import random
import sys
import time

from iothreads import BlockClient
from mainloop import EmbeddedCluster

BS, DEPTH, SECONDS = 4096, 32, 2.0


def main(argv: list[str]) -> int:
    embedded = EmbeddedCluster(64 << 20) if len(argv) < 2 else None
    runtime_dir = embedded.runtime_dir if embedded else argv[1]
    try:
        with BlockClient(runtime_dir) as client:
            node = argv[2] if len(argv) > 2 else sorted(client.nodes())[0]
            blocks = client.node_size(node) // BS
            rng = random.Random(1)
            done = errors = 0
            latencies: list[int] = []

            def submit() -> None:
                t0 = time.monotonic_ns()

                def completed(status: int, message: str, data: bytes) -> None:
                    nonlocal done, errors
                    done += 1
                    errors += status < 0
                    latencies.append(time.monotonic_ns() - t0)

                client.submit(node, "read", rng.randrange(blocks) * BS, BS, callback=completed)

            print(f"{node}: random {BS // 1024} KiB reads, {DEPTH} in flight, for {SECONDS:.0f} s", flush=True)
            end = time.monotonic() + SECONDS
            while time.monotonic() < end or client.in_flight:
                while time.monotonic() < end and client.in_flight < DEPTH:
                    submit()
                client.ctx.poll(True)
            latencies.sort()
            print(f"{node}: {done} reads in {SECONDS:.0f} s: {done / SECONDS:,.0f} IOPS, "
                  f"p50 {latencies[len(latencies) // 2] / 1000:.0f} us, errors {errors}")
            return 1 if errors else 0
    finally:
        if embedded:
            embedded.close()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except KeyboardInterrupt:  # Ctrl-C: what was started is stopped on the way out
        print("random_read.py: interrupted", file=sys.stderr)
        sys.exit(130)
