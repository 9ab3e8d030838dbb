"""Shared plumbing for the benchmarks in this folder: options, repeats, output.

Every benchmark compares *ours* (this project) with one or more *baselines*
(asyncio, uvloop...) in one process and one run.  A measurement is a function
returning one number; ``measure`` calls ours and each baseline in turn
(ours, baseline, ours, baseline...) so that drift of the machine (frequency
scaling, a noisy neighbour) hits every side alike, and keeps the median.

Rows go to a table on stdout and, with ``--json PATH``, to a JSON list of
``{"metric", "unit", "ours", "baseline", "baseline_value", "ratio", "better"}``
where ``ratio = ours / baseline_value`` and ``better`` says whether a higher or
a lower value is the better one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

__all__ = ["Row", "cpu_note", "measure", "parse_args", "print_table", "rows_for", "write_json"]

Better = Literal["higher", "lower"]


@dataclass(frozen=True)
class Row:
    metric: str
    unit: str
    ours: float
    baseline: str
    baseline_value: float
    ratio: float
    better: Better


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats (< 30 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    return parser.parse_args()


def cpu_note() -> str:
    """Which CPUs this process may run on."""
    cpus = sorted(os.sched_getaffinity(0))
    return f"CPUs available to this process: {cpus} ({len(cpus)} of {os.cpu_count()} online)"


def measure(sides: Sequence[tuple[str, Callable[[], float]]], repeats: int,
            warmup: int = 1) -> dict[str, float]:
    """Run each side ``warmup + repeats`` times, interleaved; return each side's median."""
    samples: dict[str, list[float]] = {name: [] for name, _ in sides}
    for i in range(warmup + repeats):
        for name, fn in sides:
            gc.collect()
            value = fn()
            if i >= warmup:
                samples[name].append(value)
    return {name: statistics.median(values) for name, values in samples.items()}


def rows_for(metric: str, unit: str, better: Better, medians: dict[str, float],
             ours: str = "ours") -> list[Row]:
    """One row per baseline in ``medians`` (every key but ``ours``)."""
    value = medians[ours]
    return [
        Row(metric, unit, value, name, base, value / base, better)
        for name, base in medians.items()
        if name != ours
    ]


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def print_table(rows: Sequence[Row]) -> None:
    header = ("metric", "unit", "ours", "baseline", "baseline value", "ratio", "better")
    cells = [header] + [
        (r.metric, r.unit, _fmt(r.ours), r.baseline, _fmt(r.baseline_value),
         f"{r.ratio:.2f}", r.better)
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    right = {2, 4, 5}  # numbers
    for n, line in enumerate(cells):
        print("  ".join(c.rjust(w) if i in right else c.ljust(w)
                        for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def write_json(rows: Sequence[Row], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([asdict(r) for r in rows], f, indent=2)
        f.write("\n")
