"""Logging what peers send wrong, without letting a peer flood the log.

A peer that sends bad frames in a loop would otherwise cost a log line each:
a thousand lines for a thousand frames, the useful ones lost among them.
``ThrottledLog`` keeps the first few lines of each *key* (a peer and the kind
of fault) in each period, says once that the rest are being suppressed, and
later says how many were: when the key logs again after its period, or at
``flush()`` (its owner's exit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["ThrottledLog"]

BURST = 5
PERIOD_NS = 10_000_000_000
MAX_KEYS = 32


@dataclass(slots=True)
class _Key:
    """One key's period: when it started, lines logged, lines suppressed (and the last of them)."""

    start_ns: int
    logged: int = 0
    suppressed: int = 0
    level: int = logging.WARNING
    last: tuple[str, tuple[object, ...]] = ("", ())


class ThrottledLog:
    """Lines of ``logger`` under keys, at most ``burst`` per key per
    ``period_ns`` (then one line saying the rest are suppressed, and later
    one saying how many were).  At most ``max_keys`` keys are followed; the
    keys beyond share one.  Not thread-safe: one loop's."""

    def __init__(self, logger: logging.Logger, *, burst: int = BURST, period_ns: int = PERIOD_NS,
                 max_keys: int = MAX_KEYS, clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        if burst < 1 or period_ns < 1 or max_keys < 1:
            raise ValueError("burst, period_ns and max_keys must be >= 1")
        self.logger = logger
        self.burst = burst
        self.period_ns = period_ns
        self.max_keys = max_keys
        self._clock_ns = clock_ns
        self._keys: dict[Hashable, _Key] = {}
        self.suppressed = 0
        """Lines suppressed so far, in all."""

    def log(self, key: Hashable, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` used up its lines
        for this period.  Whether it was logged."""
        now = self._clock_ns()
        state = self._keys.get(key)
        if state is None:
            key, state = self._new_key(key, now)
        elif now - state.start_ns >= self.period_ns:
            self._summarize(state)
            state.start_ns, state.logged = now, 0
        if state.logged < self.burst:
            state.logged += 1
            if state.logged == self.burst:
                msg += f" (further ones suppressed for {self.period_ns / 1e9:g} s)"
            self.logger.log(level, msg, *args)
            return True
        state.suppressed += 1
        state.level = level
        state.last = (msg, args)  # formatted only if it is said
        self.suppressed += 1
        return False

    def flush(self) -> None:
        """Say how many lines each key suppressed and has not said yet (at its owner's exit)."""
        for state in self._keys.values():
            self._summarize(state)

    def _new_key(self, key: Hashable, now: int) -> tuple[Hashable, _Key]:
        if len(self._keys) >= self.max_keys:
            # Keys whose period is over are done with (their counts said); if
            # none is, the newcomer shares the last slot with the others.
            for old in [k for k, s in self._keys.items() if now - s.start_ns >= self.period_ns]:
                self._summarize(self._keys.pop(old))
            if len(self._keys) >= self.max_keys:
                key = _OTHERS
                state = self._keys.get(key)
                if state is not None:
                    return key, state
        state = self._keys[key] = _Key(now)
        return key, state

    def _summarize(self, state: _Key) -> None:
        if state.suppressed:
            msg, args = state.last
            self.logger.log(state.level, "%d more like it suppressed; the last: " + msg,
                            state.suppressed, *args)
            state.suppressed = 0


_OTHERS = object()  # the key of keys beyond max_keys
