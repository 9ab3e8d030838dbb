"""The architecture, as the imports must follow it.

Three packages, in one direction: ``protocol`` <- ``iothreads`` <- ``mainloop``
(the design's three processes' worth of code: what every peer shares, what an
iothread runs, what the main loop runs). Inside each, a few parts with one job
each, layered so that the pure code sits below the code that owns sockets,
threads and processes:

- ``protocol``: ``_errors`` (the one exception tree) <- ``wire`` (messages, their
  codec, the pending-request table), ``schema`` (every option type, declared once,
  QAPI's idea), ``qmp`` (QMP's wire format and its sans-I/O session), ``state``
  (the cluster's state file), ``nbd`` (the NBD protocol's codec and the server's
  sans-I/O handshake: pure, so the main loop's handshake and an iothread's
  transmission phase share it) <- ``channel`` (the ZeroMQ channel: the one part
  that owns sockets).
- ``iothreads``: ``aio`` (the AioContext and its companions) <- ``block`` (drivers,
  nodes, the client) <- ``nbd`` (NBD's transmission phase, served in an
  iothread's context) <- ``worker`` (the iothread process); ``testing`` helps
  tests of ``aio``.
- ``mainloop``: ``glib`` (MainContext, its sources, the live view) <- ``loop`` (the
  BQL and MainLoop) <- ``cluster`` (iothread processes) <- ``nbd`` (the NBD server:
  listener, handshakes, exports, the handoff of connections to iothreads) <- ``qmp``
  (the monitor) <- ``cli`` (``launch``, ``bench``, option parsing).

A part may import only the parts listed for it below (itself included), so the
graph has no circles; another top-level package is reached through its public
names only. The one exception is ``iothreads/__main__.py``: ``python -m
iothreads`` runs the ``iothreads`` command, which lives in ``mainloop``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ["protocol", "iothreads", "mainloop"]
# Which top-level packages each package may import.
ALLOWED = {
    "protocol": {"protocol"},
    "iothreads": {"protocol", "iothreads"},
    "mainloop": {"protocol", "iothreads", "mainloop"},
}
ENTRY_POINTS = {"iothreads/__main__.py": {"mainloop"}}
# Inside a package: which of its parts each part may import ("" is the package's __init__).
PARTS = {
    "protocol": {
        "_errors": set(),
        "wire": {"_errors"},
        "schema": {"_errors"},
        "qmp": {"_errors", "schema"},
        "state": {"_errors"},
        "nbd": {"_errors"},
        "channel": {"_errors", "wire"},
    },
    "iothreads": {
        "aio": set(),
        "block": {"aio"},
        "nbd": {"aio", "block"},
        "worker": {"aio", "block", "nbd"},
        "testing": {"aio"},
    },
    "mainloop": {
        "glib": set(),
        "loop": {"glib"},
        "cluster": {"glib", "loop"},
        "nbd": {"glib", "loop", "cluster"},
        "qmp": {"glib", "loop", "cluster", "nbd"},
        "cli": {"glib", "loop", "cluster", "nbd", "qmp"},
        "pytest_plugin": {"glib", "loop", "cluster", "nbd", "qmp", "cli"},
    },
}


def _imports(path: pathlib.Path) -> list[tuple[int, int, str]]:
    """(line, level, module) for every import in a file (level 0: absolute)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, 0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.append((node.lineno, 0, node.module))
            elif node.level:
                found += [(node.lineno, node.level, f"{node.module or ''}|{alias.name}") for alias in node.names]
    return found


def _sources(package: str) -> list[pathlib.Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _part(package: str, path: pathlib.Path) -> str:
    """The part of ``package`` that ``path`` belongs to ("" for its top-level __init__/__main__)."""
    rel = path.relative_to(ROOT / package).parts
    if len(rel) == 1:
        stem = rel[0][:-3]
        return "" if stem in ("__init__", "__main__") else stem
    return rel[0]


def _target_part(package: str, path: pathlib.Path, level: int, spec: str) -> str:
    """The part a relative import in ``path`` reaches."""
    module, _, name = spec.partition("|")
    here = list(path.relative_to(ROOT / package).parts[:-1])
    base = here[: len(here) - (level - 1)] if level > 1 else here
    parts = base + [p for p in module.split(".") if p] + ([name] if not module else [])
    return parts[0] if parts else ""


def _all_edges(package: str) -> list[tuple[str, str, str]]:
    """(from part, to part, where) for every import between parts of ``package``."""
    edges = []
    for path in _sources(package):
        src = _part(package, path)
        for line, level, module in _imports(path):
            if level:
                dst = _target_part(package, path, level, module)
            elif module.split(".")[0] == package:
                dst = module.split(".")[1] if "." in module else ""
            else:
                continue
            if dst != src:
                edges.append((src, dst, f"{path.relative_to(ROOT)}:{line}"))
    return edges


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package: str) -> None:
    bad = []
    for path in _sources(package):
        allowed = ALLOWED[package] | ENTRY_POINTS.get(str(path.relative_to(ROOT)), set())
        for line, level, module in _imports(path):
            top = module.split(".")[0]
            if not level and top in PACKAGES and top not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "import direction is protocol <- iothreads <- mainloop:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", PACKAGES)
def test_other_packages_use_public_names_only(package: str) -> None:
    bad = []
    for path in _sources(package):
        for line, level, module in _imports(path):
            parts = module.split(".")
            if not level and parts[0] in PACKAGES and parts[0] != package \
                    and any(p.startswith("_") for p in parts[1:]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports private {module}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", PACKAGES)
def test_parts_follow_their_layers(package: str) -> None:
    """Each part imports only the parts below it; nothing but the package's
    own ``__init__``/``__main__`` imports the package's ``__init__``."""
    layers = PARTS[package]
    on_disk = {_part(package, p) for p in _sources(package)} - {""}
    assert on_disk == set(layers), "a part is missing from, or unknown to, the layering test"
    bad = [f"{where}: {src or '__init__'} imports {dst or '__init__'}"
           for src, dst, where in _all_edges(package)
           if src and dst not in layers[src]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", PACKAGES)
def test_layers_have_no_circles(package: str) -> None:
    layers = PARTS[package]
    state: dict[str, int] = {}

    def visit(part: str, trail: list[str]) -> None:
        if state.get(part) == 2:
            return
        assert state.get(part) != 1, "circle: " + " -> ".join(trail + [part])
        state[part] = 1
        for dep in layers[part]:
            visit(dep, trail + [part])
        state[part] = 2

    for part in layers:
        visit(part, [])


def test_checker_catches_violations(tmp_path: pathlib.Path) -> None:
    """The checks themselves work: an upward import and a relative one are found."""
    f = tmp_path / "x.py"
    f.write_text("import mainloop\nfrom iothreads.aio._context import AioContext\nfrom ..cli import main\n")
    assert [(lvl, m) for _, lvl, m in _imports(f)] == [
        (0, "mainloop"), (0, "iothreads.aio._context"), (2, "cli|main")]
    path = ROOT / "mainloop" / "glib" / "_context.py"
    assert _target_part("mainloop", path, 2, "cli|main") == "cli"
    assert _target_part("mainloop", path, 1, "_source|Source") == "glib"
    assert "cli" not in PARTS["mainloop"]["glib"]


@pytest.mark.parametrize("package", PACKAGES)
def test_exports(package: str) -> None:
    """Each package's __all__ is sorted, importable, and has py.typed."""
    mod = __import__(package)
    names = list(mod.__all__)
    assert names == sorted(names)
    for name in names:
        assert hasattr(mod, name), f"{package}.{name} is in __all__ but missing"
    assert (ROOT / package / "py.typed").exists()
