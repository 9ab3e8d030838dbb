"""examples/hardening.py, run as a user runs it (a copy of the script, the
installed packages, a temporary directory of its own): at its small counts
every count that must be zero is zero, and nothing is left behind, neither
when it ends nor when Ctrl-C stops it."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from .support import interrupt_at, left_behind

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "examples" / "hardening.py"
PLANES = {"qmp", "data", "nbd", "faults", "resources"}
MUST_BE_ZERO = ("crashes", "hangs", "deaf", "writes_lost", "nodes_lost")
RUN_S = 120
"""Bound on a run at the small counts (it takes seconds)."""


def _copy(tmp_path: pathlib.Path, short_dir: str) -> tuple[pathlib.Path, dict[str, str]]:
    """The script copied to a directory of its own, and an environment whose
    TMPDIR (where it makes its scratch directory: runtime directories, whose
    socket paths must be short, included) is ``short_dir``, empty."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(SCRIPT, work / "hardening.py")
    return work, {**os.environ, "TMPDIR": short_dir}


def test_a_small_run_reads_zero_where_it_must_and_leaves_nothing(tmp_path: pathlib.Path, short_dir: str) -> None:
    work, env = _copy(tmp_path, short_dir)
    out = subprocess.run([sys.executable, "hardening.py", "--seed", "1", "--json", "result.json"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=RUN_S)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    report = json.loads((work / "result.json").read_text())
    assert report["seed"] == 1 and report["ok"] is True and report["left_behind"] == 0
    assert {row["plane"] for row in report["rows"]} == PLANES
    for row in report["rows"]:
        assert {name: row[name] for name in MUST_BE_ZERO} == dict.fromkeys(MUST_BE_ZERO, 0), row
        skipped = any(note.startswith("skipped:") for note in row["notes"])
        assert row["inputs"] > 0 or skipped, row
    assert "every count that must be zero is zero" in out.stdout
    header = next(line for line in out.stdout.splitlines() if line.startswith("plane "))
    assert header.split()[:4] == ["plane", "case", "inputs", "crashes"]
    assert sorted(p.name for p in work.iterdir()) == ["hardening.py", "result.json"]
    assert left_behind(short_dir) == []


@pytest.mark.parametrize(("plane", "point"), [
    ("qmp", "qmp: running"),  # its cluster being launched
    ("nbd", "nbd: running"),  # hostile NBD clients
    ("faults", "faults: ENOSPC"),  # a workload running, a small file system being mounted
])
def test_ctrl_c_stops_it_with_one_line_and_leaves_nothing(tmp_path: pathlib.Path, short_dir: str, plane: str,
                                                          point: str) -> None:
    """Ctrl-C at a terminal (SIGINT to its process group) once it printed
    ``point``: one line, status 130, and what it started is gone."""
    work, env = _copy(tmp_path, short_dir)
    interrupt_at([sys.executable, "hardening.py", "--seed", "1", "--planes", plane], point, "hardening.py",
                 cwd=work, env=env, timeout_s=RUN_S)
    assert left_behind(short_dir) == []


def test_a_bad_option_is_one_clear_error() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--planes", "qmp,sideways"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.splitlines()[-1].endswith(
        "argument --planes: unknown plane(s) sideways; choose from qmp, data, nbd, faults, resources"), out.stderr
    assert "Traceback" not in out.stderr
