"""The packages type-check under mypy --strict (configured in pyproject.toml)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # runs mypy: a tool, in a process of its own

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_mypy_strict() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary"],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
