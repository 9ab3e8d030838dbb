"""examples/bench/nbd.py, run as a user runs it, at tiny counts: every row
measured against every server, its table, its targets and valid JSON, and
nothing left behind (no server, no client, no socket, no image), neither when
it ends nor when Ctrl-C stops it.  What it measures is not checked: figures
from a run of seconds on a shared machine say nothing."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from .support import interrupt_at, left_behind

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "examples" / "bench" / "nbd.py"
TINY = ["--size-mib", "16", "--repeats", "1", "--warmup", "0"]
RUN_S = 240
"""Bound on a run at the tiny counts (it takes seconds)."""
ROWS = 11
BASELINES = {"qsd aio=threads", "bare Python loop"}
TARGET = re.compile(r"  (.+) vs (qsd aio=threads|bare Python loop): \d+\.\d\d \(target ([<>]=) [\d.]+\) "
                    r"(met|MISSED)")


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("qemu-storage-daemon", "qemu-img", "fio", "nbdcopy"):
        if shutil.which(tool) is None:  # CI installs them (.ci/run)
            pytest.skip(f"{tool} is not installed")


def test_a_tiny_run_prints_its_table_and_json_and_leaves_nothing(tmp_path: pathlib.Path, short_dir: str) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--seconds", "0.1", "--json", "rows.json"],
                         cwd=tmp_path, env={**os.environ, "TMPDIR": short_dir}, capture_output=True, text=True,
                         timeout=RUN_S)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    metrics = list(dict.fromkeys(row["metric"] for row in rows))
    baselines = {row["baseline"] for row in rows}
    assert len(metrics) == ROWS and BASELINES <= baselines <= BASELINES | {"qsd aio=io_uring"}, (metrics, baselines)
    assert sorted((row["metric"], row["baseline"]) for row in rows) == sorted(
        (metric, baseline) for metric in metrics for baseline in baselines)
    for row in rows:
        assert set(row) == {"metric", "unit", "ours", "baseline", "baseline_value", "ratio", "better"}
        assert row["ours"] > 0 and row["baseline_value"] > 0, row
        assert row["ratio"] == pytest.approx(row["ours"] / row["baseline_value"]), row
        assert (row["unit"], row["better"]) in {("us", "lower"), ("IOPS", "higher"), ("MiB/s", "higher")}, row
        assert row["unit"] == "us" if row["metric"].endswith("QD1 latency") else row["unit"] != "us", row
    lines = out.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("metric ")))
    assert lines[header].split() == ["metric", "unit", "ours", "baseline", "baseline", "value", "ratio", "better"]
    table = lines[header + 2:header + 2 + len(rows)]
    assert [line.split("  ")[0] for line in table] == [row["metric"] for row in rows]
    targets = [TARGET.fullmatch(line) for line in lines[lines.index("targets (ours / baseline, same run):") + 1:]
               if line.startswith("  ")]
    assert targets and all(targets), lines
    assert {m.group(1) for m in targets if m is not None} <= set(metrics)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]
    assert left_behind(short_dir) == []


def test_ctrl_c_stops_it_with_one_line_and_leaves_nothing(tmp_path: pathlib.Path, short_dir: str) -> None:
    """Ctrl-C at a terminal (SIGINT to its process group) as its second row
    starts (qemu-img bench against the cluster, the bare loop running too):
    one line, status 130, and every process it started is gone, its
    directory with its images and sockets too."""
    started = interrupt_at([sys.executable, str(SCRIPT), *TINY, "--seconds", "1"],
                           "measuring: qemu-img bench 4K randread QD32", "nbd.py", cwd=tmp_path,
                           env={**os.environ, "TMPDIR": short_dir})
    assert started, "nothing was running when it was interrupted"
    assert left_behind(short_dir) == []
    assert list(tmp_path.iterdir()) == []
