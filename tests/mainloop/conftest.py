from __future__ import annotations

from collections.abc import Iterator

import pytest

from mainloop import MainContext, MainLoop


def _raise(owner: object, exc: Exception, where: str) -> None:
    raise exc


@pytest.fixture
def context() -> Iterator[MainContext]:
    c = MainContext("test")
    c.set_exception_handler(_raise)
    yield c
    c.close()


@pytest.fixture
def loop() -> Iterator[MainLoop]:
    ml = MainLoop(name="test")
    ml.context.set_exception_handler(_raise)
    ml.aio_context.set_exception_handler(_raise)
    ml.iohandler_context.set_exception_handler(_raise)
    yield ml
    ml.close()
