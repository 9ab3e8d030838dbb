"""The import direction protocol <- iothreads <- mainloop, and private modules stay private."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ["protocol", "iothreads", "mainloop"]
# Which of our packages each package may import.
ALLOWED = {
    "protocol": {"protocol"},
    "iothreads": {"protocol", "iothreads"},
    "mainloop": {"protocol", "iothreads", "mainloop"},
}


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, top-level module) for every absolute import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _sources(package: str) -> list[pathlib.Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package: str) -> None:
    bad = []
    for path in _sources(package):
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top in PACKAGES and top not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "import direction is protocol <- iothreads <- mainloop:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", PACKAGES)
def test_other_packages_use_public_names_only(package: str) -> None:
    bad = []
    for path in _sources(package):
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] in PACKAGES and parts[0] != package and any(p.startswith("_") for p in parts[1:]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports private {module}")
    assert not bad, "\n".join(bad)


def test_checker_catches_a_violation(tmp_path: pathlib.Path) -> None:
    """The check itself works: an upward import is found."""
    f = tmp_path / "x.py"
    f.write_text("import mainloop\nfrom iothreads._aio import AioContext\n")
    assert [m for _, m in _imports(f)] == ["mainloop", "iothreads._aio"]


@pytest.mark.parametrize("package", PACKAGES)
def test_exports(package: str) -> None:
    """Each package's __all__ is sorted, importable, and has py.typed."""
    mod = __import__(package)
    names = list(mod.__all__)
    assert names == sorted(names)
    for name in names:
        assert hasattr(mod, name), f"{package}.{name} is in __all__ but missing"
    assert (ROOT / package / "py.typed").exists()
