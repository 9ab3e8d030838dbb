"""Shared fixtures: contexts that are always closed, a fake clock, a strict error policy."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from iothreads import AioContext
from iothreads.testing import FakeClock


def _raise(ctx: AioContext, exc: Exception, where: str) -> None:
    raise exc


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ctx() -> Iterator[AioContext]:
    """An AioContext whose callbacks' exceptions fail the test (they leave ``poll``)."""
    c = AioContext(name="test")
    c.set_exception_handler(_raise)
    yield c
    c.close()


@pytest.fixture
def fake_ctx(fake_clock: FakeClock) -> Iterator[AioContext]:
    """An AioContext on a fake clock."""
    c = AioContext(clock=fake_clock, name="fake")
    c.set_exception_handler(_raise)
    yield c
    c.close()


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """No thread started by a test may outlive it."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in leaked:
        t.join(10)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads outlived the test: {still}"
