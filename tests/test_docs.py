"""The README and docs/ work as printed.

Every ```sh and ```python block of README.md and docs/*.md runs, from a copy
of the clone whose ``.venv`` is the venv running the tests, as a user who
follows the page would run it: a page's shell blocks in order in one shell
(``set -euo pipefail``), each Python block on its own.  A line
``<!-- doc-test: ... -->`` just before a block changes how it runs:

- ``skip: REASON``: not run; the reason is required.
- ``foreground until="TEXT" [exit=N]`` (or ``until='TEXT'``): a command that runs until stopped
  (one command, no comments): it runs in the background until its output
  shows TEXT (within a bound), then gets SIGTERM and must exit with status N
  (default 0).
- ``exit=N``: the block must exit with status N.

Also: every fenced block says its language, and only ``sh`` and ``python``
blocks are code; none uses a fixed path under /tmp; local links and the
repository paths named in backquotes exist; the README starts with the
quickstart's two commands and CI runs its test command exactly.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.integration.support import processes_in

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_LANGUAGES = {"sh", "python"}
OTHER_LANGUAGES = {"text", "json"}
BLOCK_TIMEOUT_S = 150
FOREGROUND_BOUND_S = 60  # for a foreground command's TEXT, between two lines of output

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
MARK = re.compile(r"<!-- doc-test: (.*?) -->[ \t]*\n\Z")
FOREGROUND = re.compile(r"""foreground until=(?:"([^"]+)"|'([^']+)')(?: exit=(\d+))?""")
EXIT = re.compile(r"exit=(\d+)")


@dataclass(frozen=True)
class Block:
    page: pathlib.Path
    line: int
    language: str
    text: str
    mark: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        if self.mark is None or not self.mark.startswith("skip"):
            return None
        return self.mark.partition(":")[2].strip()


def blocks(page: pathlib.Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        mark = MARK.search(text, 0, m.start())
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2),
                           mark.group(1) if mark else None))
    return found


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.language == "python" and b.mark is None]
SHELL_PAGES = [page for page in PAGES
               if any(b.language == "sh" and b.skip_reason is None for b in blocks(page))]


# -- the pages' shape ---------------------------------------------------------------------------


def test_every_block_says_its_language_and_code_is_run_or_says_why() -> None:
    assert ALL_BLOCKS, "no fenced blocks found: the pattern is wrong"
    for b in ALL_BLOCKS:
        assert b.language in CODE_LANGUAGES | OTHER_LANGUAGES, (
            f"{b.where}: a block in '{b.language}': use sh or python (run), or text or json (not run)")
        if b.mark is None:
            continue
        assert b.language in CODE_LANGUAGES, f"{b.where}: a doc-test mark on a {b.language} block"
        if b.mark.startswith("skip"):
            assert b.skip_reason, f"{b.where}: a skipped block must say why (skip: REASON)"
        elif FOREGROUND.fullmatch(b.mark):
            assert b.language == "sh", f"{b.where}: only shell commands run in the foreground"
            command = b.text.replace("\\\n", " ").strip()
            assert "\n" not in command and "#" not in command, (
                f"{b.where}: a foreground block is one command, without comments")
        else:
            assert EXIT.fullmatch(b.mark) and b.language == "sh", f"{b.where}: unknown mark {b.mark!r}"


def test_no_example_uses_a_fixed_path_under_tmp() -> None:
    """A fixed name in a shared directory is anyone's to take first (a link
    planted there, a directory made for the launcher to use): the examples
    make their scratch directory with ``mktemp -d`` or use the launcher's
    private default."""
    fixed = [b.where for b in ALL_BLOCKS if re.search(r"(?<![\w.$])/tmp\b", b.text)]
    assert fixed == [], f"blocks with a fixed path under /tmp: {fixed}"


def _slug(heading: str) -> str:
    """A heading's anchor, as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _outside_blocks(text: str) -> str:
    return FENCE.sub("", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_exist(page: pathlib.Path) -> None:
    prose = _outside_blocks(page.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", _outside_blocks(dest.read_text()), re.M)
            assert anchor in {_slug(h) for h in headings}, f"{page.name}: link to {target}: no such heading"
    for name in re.findall(r"`([^`\s]+)`", prose):
        if re.fullmatch(r"(protocol|iothreads|mainloop|examples|tests|docs|\.ci)/[a-z0-9_/.-]*", name) and (
                name.endswith((".py", ".md", "/")) or name == ".ci/run"):
            assert (ROOT / name).exists(), f"{page.name} names `{name}`, which does not exist"


def test_the_qmp_page_lists_every_command_the_monitor_has() -> None:
    from protocol.schema import COMMANDS

    table = (ROOT / "docs" / "qmp.md").read_text().split("\n## Commands\n", 1)[1]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    listed = {name for row in rows for name in re.findall(r"`([a-z_-]+)`", row)}
    assert listed == set(COMMANDS)


def test_readme_starts_with_the_quickstart_and_ci_runs_its_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    first_section = readme.split("\n## ", 2)[1]
    assert first_section.startswith("Quickstart"), "the README's first section is the quickstart"
    commands = [b.text.strip() for b in blocks(ROOT / "README.md")[:2]]
    assert all(c.startswith("python3 -m venv .venv && ") for c in commands), (
        "two commands do all the set-up on a fresh machine")
    main_job, test_command = commands
    assert main_job.endswith("iothreads bench")
    assert "pytest -n auto" in test_command
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines[-1] == test_command, ".ci/run runs exactly the README's test command"
    before = "\n".join(ci_lines[:-1])  # and before it, only the real clients' install, when missing
    assert "apt-get install" in before and "pytest" not in before and "pip" not in before, before
    for package in ("qemu-utils", "libnbd-bin", "fio", "qemu-system-common"):
        assert package in before, f".ci/run does not install {package}"


# -- running the blocks -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A copy of the working tree whose ``.venv`` is the venv running the tests."""
    venv = pathlib.Path(sys.prefix)
    assert (venv / "bin" / "iothreads").exists() and (venv / "bin" / "qmp-shell").exists(), (
        "run the tests from the venv the README's test command makes (its iothreads and qmp-shell)")
    path = tmp_path_factory.mktemp("docs") / "clone"
    shutil.copytree(ROOT, path, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", ".mypy_cache", ".pytest_cache", ".hypothesis"))
    (path / ".venv").symlink_to(venv)
    return path


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    return env


FOREGROUND_HELPER = f"""
__doc_foreground() {{  # PID FD TEXT STATUS: show the output until TEXT, then SIGTERM; it must exit STATUS
  local pid=$1 fd=$2 text=$3 status=$4 line found= rc=0
  while IFS= read -r -t {FOREGROUND_BOUND_S} -u "$fd" line; do
    printf '%s\\n' "$line"
    if [[ $line == *"$text"* ]]; then found=1; break; fi
  done
  if [ -z "$found" ]; then
    echo "doc-test: the command did not print '$text'" >&2
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" || true
    return 1
  fi
  kill -TERM "$pid"
  cat <&"$fd"
  exec {{fd}}<&-
  wait "$pid" || rc=$?
  [ "$rc" -eq "$status" ] || {{ echo "doc-test: status $rc after SIGTERM, not $status" >&2; return 1; }}
}}
"""


def _shell_step(b: Block) -> str:
    text = b.text.rstrip("\n")
    header = f"echo {shlex.quote('--- ' + b.where)}"
    if b.mark is not None and (fg := FOREGROUND.fullmatch(b.mark)):
        return "\n".join([
            header,
            "__fifo=$(mktemp -u) && mkfifo \"$__fifo\"",
            f'{text} > "$__fifo" 2>&1 &',
            "__pid=$!",
            'exec {__fd}<"$__fifo"; rm -f "$__fifo"',
            f'__doc_foreground "$__pid" "$__fd" {shlex.quote(fg.group(1) or fg.group(2))} {fg.group(3) or 0}',
        ])
    if b.mark is not None and (ex := EXIT.fullmatch(b.mark)):
        return "\n".join([
            header,
            f"__rc=0; ( {text}\n) || __rc=$?",
            f'[ "$__rc" -eq {ex.group(1)} ] || {{ echo "doc-test: exit status $__rc, not {ex.group(1)}" >&2; exit 1; }}',
        ])
    return f"{header}\n{text}"


def _run(argv: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a session of its own; no process of it may outlive it."""
    proc = subprocess.Popen(argv, cwd=cwd, env=_environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"still running after {BLOCK_TIMEOUT_S} s:\n{out}")
    left = processes_in(str(cwd))  # the iothreads of a launcher have sessions of their own
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    else:
        pytest.fail(f"processes outlived the blocks:\n{out}")
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"processes outlived the blocks: {left}\n{out}"
    return subprocess.CompletedProcess(argv, proc.returncode, out, "")


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    assert result.returncode == 0, f"{what} failed (status {result.returncode}):\n{result.stdout}"
    assert "Traceback" not in result.stdout, f"{what} printed a traceback:\n{result.stdout}"
    assert '{"error": {"class"' not in result.stdout, f"{what} got a QMP error:\n{result.stdout}"


@pytest.mark.timeout(BLOCK_TIMEOUT_S + 30)
@pytest.mark.parametrize("page", SHELL_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_blocks_run(page: pathlib.Path, clone: pathlib.Path) -> None:
    steps = [_shell_step(b) for b in blocks(page) if b.language == "sh" and b.skip_reason is None]
    script = "\n".join(["set -euo pipefail", FOREGROUND_HELPER, *steps])
    _check(_run(["bash", "-c", script], clone), f"the shell blocks of {page.relative_to(ROOT)}")


@pytest.mark.timeout(BLOCK_TIMEOUT_S + 30)
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.where)
def test_python_block_runs(block: Block, clone: pathlib.Path) -> None:
    _check(_run([str(clone / ".venv" / "bin" / "python"), "-c", block.text], clone), block.where)
