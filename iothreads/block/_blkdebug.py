"""``blkdebug``: QEMU's fault injection, a node layered over another node.

Theory of operation
-------------------
A ``BlkdebugNode`` passes every request to its ``image``, another node of
the same AioContext, unless a rule says otherwise.  The rules are QEMU's
(``BlkdebugRules``, pure: no I/O, no clock):

* each request raises the events a ``raw`` node over ``blkdebug`` raises in
  QEMU (``BlkdebugEvent`` lists them: ``read_aio`` for a read, ``write_aio``
  and ``pwritev`` for a write, ...);
* an event runs the rules declared for it whose ``state`` is the node's (or
  that have none): ``set-state`` rules give the node its next state,
  ``inject-error`` rules become the active ones (replacing those an earlier
  event made active, as QEMU's ``process_rule`` does);
* a request then fails (with the rule's ``errno``) if an active rule applies
  to it: its ``iotype`` (all if none), the range it must touch (QEMU's
  ``sector``: its first byte, or ``length`` bytes from there; any request if
  -1, a flush never otherwise).  A ``once`` rule is removed when it fires.

Three things are not in QEMU: ``after`` (the first N requests a rule
applies to go through), ``length`` (a range, not a byte) and ``delay_ns``
(the request waits on a timer of the AioContext, the others go on; then it
fails, or is passed on when ``errno`` is 0).  Without ``immediately`` (and
without a delay) an injected error completes in a bottom half, a turn of the
loop later, as QEMU's coroutine yields once first.

The node is never read or written the fast ways (``cached_reader``,
``write_cached``): every request takes ``submit``, where the rules are.
Its statistics count what it completed, the image's what reached it.
Home thread only, as every node.
"""

from __future__ import annotations

import errno as errno_
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from protocol import BlockOp
from protocol.schema import (
    BlkdebugEvent,
    BlkdebugInjectErrorOptions,
    BlkdebugIOType,
    BlkdebugSetStateOptions,
    BlockdevOptionsBlkdebug,
)

from ..aio._clock import ClockType
from ._node import BlockDriver, BlockNode, Buffer, Completion, Extents

__all__ = ["BlkdebugNode", "BlkdebugRules", "SECTOR_BYTES"]

SECTOR_BYTES = 512

# What each operation raises before it runs, and the I/O type rules know it by.
_EVENTS_BEFORE: dict[str, tuple[BlkdebugEvent, ...]] = {
    BlockOp.READ: (BlkdebugEvent.READ_AIO,),
    BlockOp.WRITE: (BlkdebugEvent.WRITE_AIO, BlkdebugEvent.PWRITEV),
    BlockOp.WRITE_ZEROES: (BlkdebugEvent.PWRITEV_ZERO,),
    BlockOp.DISCARD: (),
    BlockOp.FLUSH: (BlkdebugEvent.FLUSH_TO_OS, BlkdebugEvent.FLUSH_TO_DISK),
}
_IOTYPE: dict[str, BlkdebugIOType] = {
    BlockOp.READ: BlkdebugIOType.READ,
    BlockOp.WRITE: BlkdebugIOType.WRITE,
    BlockOp.WRITE_ZEROES: BlkdebugIOType.WRITE_ZEROES,
    BlockOp.DISCARD: BlkdebugIOType.DISCARD,
    BlockOp.FLUSH: BlkdebugIOType.FLUSH,
}
_WRITES = frozenset((BlockOp.WRITE, BlockOp.WRITE_ZEROES))


@dataclass(eq=False)
class _Rule:
    options: BlkdebugInjectErrorOptions
    passed: int = 0  # requests it applied to and let through (``after``)
    removed: bool = False


class BlkdebugRules:
    """QEMU's blkdebug rules and state: ``event`` runs the rules of an event,
    ``check`` says which active rule (if any) a request meets.  Pure."""

    def __init__(self, inject_error: Sequence[BlkdebugInjectErrorOptions],
                 set_state: Sequence[BlkdebugSetStateOptions]) -> None:
        self.state = 1
        self._inject: dict[str, list[_Rule]] = {}
        for options in inject_error:
            self._inject.setdefault(options.event, []).append(_Rule(options))
        self._set_state: dict[str, list[BlkdebugSetStateOptions]] = {}
        for rule in set_state:
            self._set_state.setdefault(rule.event, []).append(rule)
        self.active: list[_Rule] = []

    def event(self, event: str) -> None:
        """The rules of ``event`` in the current state: the next state, and
        the active error rules (replaced if any of this event applies)."""
        new_state = self.state
        activated: list[_Rule] = []
        for rule in self._inject.get(event, ()):
            if not rule.removed and rule.options.state in (None, self.state):
                activated.append(rule)
        for set_rule in self._set_state.get(event, ()):
            if set_rule.state in (None, self.state):
                new_state = set_rule.new_state
        if activated:
            self.active = activated[::-1]  # (QEMU inserts each at the head)
        self.state = new_state

    def check(self, iotype: BlkdebugIOType, offset: int, length: int) -> BlkdebugInjectErrorOptions | None:
        """The active rule a request of ``iotype`` on ``[offset, offset +
        length)`` meets (a flush: length 0), counted; None if none does."""
        for rule in self.active:
            o = rule.options
            if o.iotype is not None and o.iotype != iotype:
                continue
            if o.sector != -1:
                start = o.sector * SECTOR_BYTES
                if not length or offset >= start + o.length or offset + length <= start:
                    continue
            if rule.passed < o.after:
                rule.passed += 1
                continue
            if o.once:
                rule.removed = True
                self.active.remove(rule)
            return o
        return None


class _Image(BlockDriver):
    """What the node's own checks (size, alignment) and block status see: its image's."""

    name = "blkdebug"

    def __init__(self, image: BlockNode) -> None:
        self.image = image

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.image.size

    @property
    def align(self) -> int:  # type: ignore[override]
        return self.image.driver.align

    def block_status(self, offset: int, length: int, max_extents: int) -> Extents:
        return self.image.driver.block_status(offset, length, max_extents)


class BlkdebugNode(BlockNode):
    """A ``blkdebug`` node over ``image``.  Home thread only."""

    def __init__(self, options: BlockdevOptionsBlkdebug, image: BlockNode) -> None:
        super().__init__(image.ctx, options.node_name, _Image(image), read_only=options.read_only,
                         werror=options.werror, rerror=options.rerror)
        self.image = image
        self.rules = BlkdebugRules(options.inject_error, options.set_state)
        image.parents.add(self.name)

    def cached_reader(self) -> Callable[[int, bytearray | memoryview], bool] | None:
        return None  # every read meets the rules

    def write_cached(self, offset: int, data: Buffer) -> bool:
        return False  # likewise every write

    def block_status(self, offset: int, length: int, max_extents: int) -> Extents:
        if offset < 0 or length <= 0 or offset + length > self.size or max_extents < 1:
            return super().block_status(offset, length, max_extents)  # (its ValueError)
        rule = self.rules.check(BlkdebugIOType.BLOCK_STATUS, offset, length)
        if rule is not None and rule.errno:
            raise OSError(rule.errno, self._injected(rule.errno))
        return super().block_status(offset, length, max_extents)

    def _injected(self, err: int) -> str:
        return f"{os.strerror(err)} (injected by blkdebug node '{self.name}')"

    def submit(self, op: str, offset: int, length: int, data: Buffer, callback: Completion,
               flags: int = 0, *, nowait: bool = True) -> None:
        start = time.monotonic_ns()
        if self._refused(op, start, offset, length, data, callback):
            return
        for event in _EVENTS_BEFORE[op]:
            self.rules.event(event)
        rule = self.rules.check(_IOTYPE[op], offset, 0 if op == BlockOp.FLUSH else length)
        self.in_flight += 1

        def finish(status: int, message: str, result: Buffer) -> None:
            self.in_flight -= 1
            if op in _WRITES:
                self.rules.event(BlkdebugEvent.PWRITEV_DONE)
            if status < 0 and -status not in (errno_.EINVAL, errno_.EPERM):
                self._failed(op, start, length, status, message, callback,
                             lambda: self.submit(op, offset, length, data, callback, flags))
            else:
                nbytes = length if status == 0 and op in (BlockOp.READ, BlockOp.WRITE) else 0
                self._complete(op, start, nbytes, status, message, result, callback)
            self._maybe_drained()

        def go() -> None:
            if rule is not None and rule.errno:
                finish(-rule.errno, self._injected(rule.errno), b"")
            else:
                self.image.submit(op, offset, length, data, finish, flags)

        if rule is None or (rule.immediately and not rule.delay_ns):
            go()
        elif rule.delay_ns:
            timer = self.ctx.timer_new_ns(ClockType.REALTIME, go, name=f"blkdebug {self.name}")
            timer.mod_ns(self.ctx.clock_now_ns(ClockType.REALTIME) + rule.delay_ns)
        else:
            self.ctx.bh_schedule_oneshot(go, name=f"blkdebug {self.name}")

    def close(self) -> None:
        """Fail what a policy holds; the image stays open (a node of its own)."""
        super().close()  # (its driver's close does nothing)
        self.image.parents.discard(self.name)
