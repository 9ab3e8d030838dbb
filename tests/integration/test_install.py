"""The project as a user installs it: ``pip install`` of the distribution
``iothreads`` (every package, the command, the version it reports), and an
editable install (``pip install -e .``) whose packages a user's own
``mypy --strict`` can see.

Each test makes a fresh virtual environment in a temporary directory and
installs a copy of this tree into it (so the working tree gets no build
output), with the dependencies from the package index.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
PACKAGES = ("protocol", "iothreads", "mainloop")
INSTALL_TIMEOUT_S = 600  # a cold package index may be slow; pytest-timeout is raised to match
# What a checkout holds besides the project: environments, caches, build output.
NOT_PROJECT = shutil.ignore_patterns(
    ".venv", ".git", "*.egg-info", "build", "dist", "__pycache__", ".mypy_cache", ".hypothesis",
    ".pytest_cache",
)

USER_CODE = '''\
from iothreads import AioContext, ClockType, Timer
from mainloop import MainContext
from protocol import StateError


def iterate(ctx: AioContext, main: MainContext) -> bool:
    timer: Timer = ctx.timer_new_ms(ClockType.REALTIME, lambda: None)
    timer.mod(timer.now() + 1)
    try:
        return ctx.poll(blocking=False) or main.iteration(False)
    except StateError:
        return False
'''
# One line that is wrong only if mypy knows what AioContext.poll returns.
USER_TYPE_ERROR = '''

def wrong(ctx: AioContext) -> str:
    return ctx.poll(blocking=False)
'''


def _clean_env() -> dict[str, str]:
    """The environment without anything that would point Python or mypy at this tree."""
    env = dict(os.environ)
    for var in ("PYTHONPATH", "MYPYPATH", "VIRTUAL_ENV"):
        env.pop(var, None)
    return env


def _run(args: list[str], cwd: pathlib.Path, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout_s)


def _venv_with_project(tmp_path: pathlib.Path, *pip_args: str) -> pathlib.Path:
    """A fresh venv under ``tmp_path`` with a copy of this tree installed by
    ``pip install [pip_args] <copy>``; returns the venv's directory."""
    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=NOT_PROJECT)
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    assert made.returncode == 0, made.stderr
    installed = _run([str(venv / "bin" / "pip"), "install", "-q", *pip_args, str(project)], tmp_path,
                     INSTALL_TIMEOUT_S)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


def _mypy_strict(venv: pathlib.Path, user_dir: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """``mypy --strict user.py`` against the venv's site-packages, from outside the tree."""
    return _run([sys.executable, "-m", "mypy", "--strict", "--python-executable", str(venv / "bin" / "python"),
                 "--cache-dir", str(user_dir / ".mypy_cache"), "--no-error-summary", "user.py"], user_dir, 240)


@pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)
def test_editable_install_is_seen_by_a_users_type_checker(tmp_path: pathlib.Path) -> None:
    venv = _venv_with_project(tmp_path, "-e")
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "user.py").write_text(USER_CODE)
    clean = _mypy_strict(venv, user_dir)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    (user_dir / "user.py").write_text(USER_CODE + USER_TYPE_ERROR)
    wrong = _mypy_strict(venv, user_dir)
    assert wrong.returncode == 1
    line = USER_CODE.count("\n") + USER_TYPE_ERROR.count("\n")
    assert wrong.stdout.splitlines() == [
        f'user.py:{line}: error: Incompatible return value type (got "bool", expected "str")  [return-value]'
    ]


@pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)
def test_pip_install_gives_every_package_and_the_iothreads_command(tmp_path: pathlib.Path) -> None:
    venv = _venv_with_project(tmp_path)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    out = _run([str(venv / "bin" / "iothreads"), "--version"], elsewhere)
    assert (out.returncode, out.stdout, out.stderr) == (0, f"iothreads {version}\n", "")

    # Every package of the tree is installed (not just the top three), with its py.typed; the
    # pytest plugin is imported by pytest only (which this environment lacks): its entry point is there.
    modules = sorted(
        ".".join(init.parent.relative_to(ROOT).parts)
        for package in PACKAGES for init in (ROOT / package).rglob("__init__.py")
        if init.parent.name != "pytest_plugin"
    )
    assert len(modules) > len(PACKAGES)
    script = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    print(name, importlib.import_module(name).__file__)\n"
        "from importlib.metadata import entry_points\n"
        "plugin, = entry_points(group='pytest11', name='iothreads')\n"
        "assert plugin.value == 'mainloop.pytest_plugin', plugin\n"
        "from mainloop.qmp._monitor import VERSION\n"
        "print(VERSION['package'])\n"
    )
    out = _run([str(venv / "bin" / "python"), "-c", script, *modules], elsewhere)
    assert out.returncode == 0, out.stderr
    *imported, package = out.stdout.splitlines()
    site_packages = next((venv / "lib").glob("python3*/site-packages"))
    for name, line in zip(modules, imported, strict=True):
        mod_name, _, where = line.partition(" ")
        assert mod_name == name and pathlib.Path(where).is_relative_to(site_packages), line
    assert package == f"iothreads {version}"
    for top in PACKAGES:
        assert (site_packages / top / "py.typed").is_file()
    assert (site_packages / "mainloop" / "pytest_plugin" / "__init__.py").is_file()
