"""The launcher's option handling, in process: iothread names and counts."""

from __future__ import annotations

from mainloop.cli._main import MAX_IOTHREADS, _configs, build_parser


def _ids(*argv: str) -> list[str]:
    return [c.id for c in _configs(build_parser().parse_args(["launch", *argv]))]


def test_numbered_iothreads_skip_the_ids_of_objects() -> None:
    assert _ids() == ["io0", "io1"]
    assert _ids("--object", "iothread,id=io1", "--object", "iothread,id=io3", "--iothreads", "3") == [
        "io1", "io3", "io0", "io2", "io4"]
    taken = [arg for n in range(0, 2 * MAX_IOTHREADS, 2) for arg in ("--object", f"iothread,id=io{n}")]
    ids = _ids(*taken, "--iothreads", str(MAX_IOTHREADS))
    assert ids[MAX_IOTHREADS:] == [f"io{n}" for n in range(1, 2 * MAX_IOTHREADS, 2)]
