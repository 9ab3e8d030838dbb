"""The README's quickstart works as printed, and CI runs exactly its test command."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```sh\n(python3 -m venv .*?)\n```", README)
    assert len(commands) == 2, "the quickstart has two commands: the main job and the tests"
    main_job, command = commands
    assert main_job.endswith("iothreads bench")
    ci_lines = [
        line for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines[-1] == command
    assert "pytest -n auto" in command


def test_readme_aiocontext_example_runs() -> None:
    example = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    out = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert sorted(eval(out.stdout)) == ["bottom half", "pool: 6", "timer"]
