"""The throttled log of what peers send wrong: a few lines per peer and kind
of fault, a notice that the rest are suppressed, and their count later."""

from __future__ import annotations

import logging

import pytest

from protocol import ThrottledLog

PERIOD_NS = 10_000_000_000


class _Clock:
    def __init__(self) -> None:
        self.now_ns = 0

    def __call__(self) -> int:
        return self.now_ns


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records]
    caplog.clear()
    return lines


def test_a_flood_logs_a_few_lines_then_how_many_were_suppressed(caplog: pytest.LogCaptureFixture,
                                                                 clock: _Clock) -> None:
    caplog.set_level(logging.WARNING)
    throttle = ThrottledLog(logging.getLogger("test.throttle"), burst=3, period_ns=PERIOD_NS, clock_ns=clock)
    logged = [throttle.log("peer-a", logging.WARNING, "bad frame %d from %s", i, "peer-a") for i in range(1000)]
    assert logged == [True] * 3 + [False] * 997 and throttle.suppressed == 997
    assert _lines(caplog) == ["bad frame 0 from peer-a", "bad frame 1 from peer-a",
                              "bad frame 2 from peer-a (further ones suppressed for 10 s)"]
    # Another key has lines of its own.
    assert throttle.log("peer-b", logging.WARNING, "bad frame from %s", "peer-b")
    assert _lines(caplog) == ["bad frame from peer-b"]
    # After the period: the count first, then lines again.
    clock.now_ns += PERIOD_NS
    assert throttle.log("peer-a", logging.WARNING, "bad frame %d from %s", 1000, "peer-a")
    assert _lines(caplog) == ["997 more like it suppressed; the last: bad frame 999 from peer-a",
                              "bad frame 1000 from peer-a"]
    # flush (at exit) says what was not said yet, once.
    for i in range(5):
        throttle.log("peer-a", logging.ERROR, "bad frame %d", i)
    _lines(caplog)
    throttle.flush()
    records = caplog.records
    assert [r.getMessage() for r in records] == ["3 more like it suppressed; the last: bad frame 4"]
    assert records[0].levelno == logging.ERROR
    caplog.clear()
    throttle.flush()
    assert _lines(caplog) == []


def test_many_peers_share_a_bounded_number_of_keys(caplog: pytest.LogCaptureFixture, clock: _Clock) -> None:
    """A peer that changes identity at every frame still cannot flood the log."""
    caplog.set_level(logging.WARNING)
    throttle = ThrottledLog(logging.getLogger("test.throttle"), burst=2, max_keys=4, clock_ns=clock)
    for i in range(1000):
        throttle.log(f"peer-{i}", logging.WARNING, "bad frame from peer-%d", i)
    # Four keys of their own (a line each: one frame per peer), then one for all the others.
    assert len(_lines(caplog)) == 4 + 2
    assert throttle.suppressed == 1000 - 6
    clock.now_ns += PERIOD_NS  # their periods are over: the table makes room, saying their counts
    throttle.log("peer-new", logging.WARNING, "bad frame from peer-new")
    lines = _lines(caplog)
    assert lines[-1] == "bad frame from peer-new"
    assert lines[:-1] == ["994 more like it suppressed; the last: bad frame from peer-999"]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        ThrottledLog(logging.getLogger("test.throttle"), burst=0)
