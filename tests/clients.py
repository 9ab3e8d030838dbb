"""The real client tools the tests drive (qemu-img, qemu-io, nbdinfo, nbdcopy,
fio): found, or the test skipped; run, and their output returned."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def need(tool: str) -> str:
    """The path of ``tool``; the test is skipped without it."""
    path = shutil.which(tool)
    if path is None:  # CI installs them (.ci/run); a bare machine may lack them
        pytest.skip(f"{tool} is not installed")
    return path


def run_tool(*argv: str, timeout_s: float) -> str:
    """A client tool's output; it must succeed within ``timeout_s``."""
    need(argv[0])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{argv}: status {done.returncode}: {done.stdout}{done.stderr}"
    return done.stdout
