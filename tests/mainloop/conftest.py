from __future__ import annotations

from collections.abc import Iterator

import pytest

from mainloop import MainContext, MainLoop

from .stepwise import make_stepwise


def _raise(owner: object, exc: Exception, where: str) -> None:
    raise exc


# Every scenario runs twice: through the fused iteration the loops use, and
# through the public steps one by one (tests/mainloop/stepwise.py).
PATHS = ["fused", "stepwise"]


@pytest.fixture(params=PATHS)
def context(request: pytest.FixtureRequest) -> Iterator[MainContext]:
    c = MainContext("test")
    c.set_exception_handler(_raise)
    if request.param == "stepwise":
        make_stepwise(c)
    yield c
    c.close()


@pytest.fixture(params=PATHS)
def loop(request: pytest.FixtureRequest) -> Iterator[MainLoop]:
    ml = MainLoop(name="test")
    ml.context.set_exception_handler(_raise)
    ml.aio_context.set_exception_handler(_raise)
    ml.iohandler_context.set_exception_handler(_raise)
    if request.param == "stepwise":
        make_stepwise(ml)
    yield ml
    ml.close()
