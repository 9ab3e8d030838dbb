"""No dead code: vulture finds no unused name in the packages.

The packages are scanned together with the tests and the examples, so that
public API exercised only by them counts as used.  What vulture still reports
and is used all the same is listed below, each with its reason: names read
by introspection (the schema's declarations are dataclass fields turned into
JSON members; the counters are ``TypedDict`` keys filled by a dict literal)
and public API kept on purpose.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # runs vulture: a tool, in a process of its own

ROOT = pathlib.Path(__file__).resolve().parent.parent

USED_ALL_THE_SAME: dict[str, str] = {
    # TypedDict keys of AioContext.counters(), filled by one dict literal.
    "waits": "counter key", "fd_dispatches": "counter key", "timers_fired": "counter key",
    # Schema declarations: dataclass fields read by the schema's introspection.
    "virtual_size": "schema member", "drv": "schema member", "file": "schema member",
    "ro": "schema member", "OOB": "schema enum member", "force": "schema member",
    "major": "schema member", "minor": "schema member", "micro": "schema member",
    "qemu": "schema member", "thread_id": "schema member", "HARD": "schema enum member",
    # Public API: the AioContext's thread handover and its thread-pool parameters, read back.
    "set_home_thread": "public API", "thread_pool_min": "public API",
    # Public API: the block client's awaitable forms, one per operation (aread is used).
    "awrite": "public API", "aflush": "public API",
    # The pytest plugin's hooks: pytest calls them by name.
    "pytest_addoption": "pytest hook", "pytest_configure": "pytest hook", "pytest_pyfunc_call": "pytest hook",
    "pytest_configure_node": "pytest-xdist hook", "pytest_sessionfinish": "pytest hook",
    "pytest_runtest_makereport": "pytest hook", "exitstatus": "pytest hook argument, and the session's status",
}


def test_vulture_finds_no_unused_code() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vulture", "protocol", "iothreads", "mainloop", "tests", "examples",
         "--min-confidence", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode in (0, 3), result.stderr  # 3: unused code found
    unused = []
    for line in result.stdout.splitlines():
        path = line.split(":", 1)[0]
        if path.startswith(("tests/", "examples/")):
            continue  # test helpers and example scripts are not the packages' API
        name = line.split("'")[1] if "'" in line else line
        if name not in USED_ALL_THE_SAME:
            unused.append(line)
    assert not unused, "unused code (remove it, or list it in USED_ALL_THE_SAME with the reason):\n" + "\n".join(unused)
