"""Fixtures shared by the iothreads tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from protocol import make_runtime_dir


@pytest.fixture
def runtime_dir() -> Iterator[str]:
    """A private runtime directory, emptied and removed after the test."""
    path = make_runtime_dir()
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)
