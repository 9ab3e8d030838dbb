"""The integration tests: every test here is marked ``integration`` (they
start processes: ``pytest -m "not integration"`` leaves them out); the
clusters they start come from the ``clusters`` fixture (``block_cluster`` is
one shaped for the block client and the bench)."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from .support import Clusters

HERE = pathlib.Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A new directory with a short path (socket paths must stay under 108
    bytes, which pytest's ``tmp_path`` does not promise); removed afterwards."""
    path = tempfile.mkdtemp(prefix="evt", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def clusters(short_dir: str) -> Iterator[Clusters]:
    """Starts the test's clusters, in process or launched (see ``support.Clusters``),
    and ends them when the test ends, checking that they leave nothing behind."""
    c = Clusters(short_dir)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def block_cluster(clusters: Clusters) -> tuple[str, str]:
    """A launched cluster of two iothreads, with a file node ``disk0`` (an
    8 MiB image) in io0 and a 1 MiB null-co node ``null0`` in io1, for the
    block client and the bench: (its runtime directory, the image)."""
    image = clusters.image(8 << 20)
    run = os.path.join(clusters.scratch_dir, "run")
    clusters.launch("--iothreads", "2", "--runtime-dir", run,
                    "--blockdev", f"driver=file,node-name=disk0,filename={image},iothread=io0",
                    "--blockdev", "driver=null-co,node-name=null0,size=1M,iothread=io1")
    return run, image
