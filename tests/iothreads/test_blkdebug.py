"""blkdebug: QEMU's rules (events, states, iotype, sector, once) and ours
(after, length, delay-ns), a node over another one, and the error policies
(werror/rerror: report, ignore, stop, enospc) of every node."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

import pytest

from iothreads import AioContext
from iothreads.block import BlkdebugNode, BlkdebugRules, BlockNode
from iothreads.block._open import open_node
from iothreads.testing import poll_until
from protocol.schema import (
    BlkdebugInjectErrorOptions,
    BlkdebugSetStateOptions,
    BlockdevOptions,
    SchemaError,
    parse,
)

MiB = 1 << 20
Result = tuple[int, str, bytes]


def inject(**kw: Any) -> BlkdebugInjectErrorOptions:
    return parse(BlkdebugInjectErrorOptions, {k.replace("_", "-"): v for k, v in kw.items()})


def set_state(**kw: Any) -> BlkdebugSetStateOptions:
    return parse(BlkdebugSetStateOptions, kw)


# -- the rules, pure ---------------------------------------------------------------


def test_a_rule_applies_once_its_event_happened() -> None:
    rules = BlkdebugRules([inject(event="read_aio")], [])
    assert rules.check("read", 0, 512) is None  # not active yet
    rules.event("write_aio")
    assert rules.check("read", 0, 512) is None
    rules.event("read_aio")
    rule = rules.check("read", 0, 512)
    assert rule is not None and rule.errno == errno.EIO
    assert rules.check("write", 0, 512) is not None  # no iotype: every request


def test_iotype_sector_and_length_select_requests() -> None:
    rules = BlkdebugRules([inject(event="write_aio", iotype="write", sector=8, errno=28)], [])
    rules.event("write_aio")
    assert rules.check("read", 4096, 512) is None  # another type
    assert rules.check("write", 0, 4096) is None  # ends before sector 8's first byte
    assert rules.check("write", 4097, 512) is None  # starts after it
    assert rules.check("write", 4096, 1) is not None and rules.check("write", 0, 4097) is not None
    assert rules.check("flush", 0, 0) is None  # a flush covers no sector
    ranged = BlkdebugRules([inject(event="read_aio", sector=8, length=8192)], [])
    ranged.event("read_aio")
    assert ranged.check("read", 4096 + 8191, 1) is not None and ranged.check("read", 4096 + 8192, 1) is None
    anywhere = BlkdebugRules([inject(event="flush_to_disk")], [])
    anywhere.event("flush_to_disk")
    assert anywhere.check("flush", 0, 0) is not None


def test_once_after_and_the_active_set() -> None:
    rules = BlkdebugRules([inject(event="read_aio", once=True, after=2, errno=5),
                           inject(event="write_aio", errno=28)], [])
    rules.event("read_aio")
    assert [rules.check("read", 0, 1) is not None for _ in range(4)] == [False, False, True, False]
    rules.event("read_aio")  # once: removed for good, not made active again
    assert rules.check("read", 0, 1) is None
    rules.event("write_aio")  # another event's rules replace the active set
    rule = rules.check("read", 0, 1)
    assert rule is not None and rule.errno == 28
    rules.event("pwritev")  # an event without rules leaves it
    assert rules.check("read", 0, 1) is not None


def test_states_select_the_rules_an_event_runs() -> None:
    rules = BlkdebugRules([inject(event="read_aio", state=2, errno=61)],
                          [set_state(event="flush_to_disk", new_state=2),
                           set_state(event="flush_to_disk", state=2, new_state=3)])
    rules.event("read_aio")
    assert rules.state == 1 and rules.check("read", 0, 1) is None
    rules.event("flush_to_disk")  # 1 -> 2 (the second rule is for state 2: not yet)
    assert rules.state == 2
    rules.event("read_aio")
    rule = rules.check("read", 0, 1)
    assert rule is not None and rule.errno == 61
    rules.event("flush_to_disk")
    assert rules.state == 3


def test_bad_rules_are_refused_by_the_schema() -> None:
    base = {"driver": "blkdebug", "node-name": "dbg", "image": "disk0"}
    for bad, words in (({"inject-error": [{"event": "l1_update"}]}, "event"),
                       ({"inject-error": [{"event": "read_aio", "errno": -1}]}, "errno"),
                       ({"inject-error": [{"event": "read_aio", "length": 0}]}, "length"),
                       ({"inject-error": [{"event": "read_aio", "iotype": "trim"}]}, "iotype"),
                       ({"set-state": [{"event": "read_aio"}]}, "new_state"),
                       ({"image": "1bad"}, "node-name")):
        with pytest.raises(SchemaError) as info:
            parse(BlockdevOptions, {**base, **bad})
        assert words in str(info.value)
    keyval = parse(BlockdevOptions, {**base, "inject-error": {"0": {"event": "read_aio", "once": "on"}}},
                   keyval=True)
    assert keyval.inject_error[0].once is True  # type: ignore[attr-defined]


# -- nodes ---------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: object) -> Iterator[str]:
    path = os.path.join(str(tmp_path), "disk.img")
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * (MiB // 256))
    yield path


def node_over(ctx: AioContext, image: str, **options: Any) -> tuple[BlockNode, BlockNode]:
    disk = open_node(ctx, parse(BlockdevOptions, {"driver": "file", "node-name": "disk0", "filename": image}))
    dbg = open_node(ctx, parse(BlockdevOptions, {"driver": "blkdebug", "node-name": "dbg", "image": "disk0",
                                                 **options}), {"disk0": disk})
    return disk, dbg


def submit(node: BlockNode, op: str, offset: int, length: int, data: bytes = b"") -> list[Result]:
    results: list[Result] = []
    node.submit(op, offset, length, data, lambda s, m, d: results.append((s, m, bytes(d))))
    return results


def wait(ctx: AioContext, *results: list[Result]) -> None:
    poll_until(lambda: ctx.poll(True), lambda: all(results), "the requests to complete", 30)


def test_a_blkdebug_node_passes_requests_on_and_fails_those_its_rules_say(ctx: AioContext, image: str) -> None:
    disk, dbg = node_over(ctx, image, **{"inject-error": [{"event": "read_aio", "sector": 16, "errno": 61}]})
    assert isinstance(dbg, BlkdebugNode) and dbg.size == disk.size and disk.parents == {"dbg"}
    assert dbg.cached_reader() is None and dbg.write_cached(0, bytes(4096)) is False  # every request: submit
    ok, bad = submit(dbg, "read", 0, 512), submit(dbg, "read", 16 * 512, 512)
    assert not bad  # without 'immediately': a turn of the loop later
    wait(ctx, ok, bad)
    assert ok[0][0] == 0 and ok[0][2] == bytes(range(256)) * 2
    assert bad[0][0] == -61 and "injected by blkdebug node 'dbg'" in bad[0][1]
    assert dbg.stats["read"].ops == 1 and dbg.stats["read"].errors == 1
    assert disk.stats["read"].ops == 1 and disk.stats["read"].errors == 0  # the failed one never reached it
    wrote = submit(dbg, "write", 0, 4, b"abcd")
    wait(ctx, wrote)
    assert wrote[0][0] == 0 and os.pread(os.open(image, os.O_RDONLY), 4, 0) == b"abcd"
    dbg.close()
    assert disk.parents == set()
    disk.close()


def test_immediately_fails_inside_submit(ctx: AioContext, image: str) -> None:
    _disk, dbg = node_over(ctx, image, **{"inject-error": [{"event": "flush_to_disk", "immediately": True}]})
    assert submit(dbg, "flush", 0, 0)[0][0] == -errno.EIO


def test_a_delayed_request_does_not_hold_up_the_others(ctx: AioContext, image: str) -> None:
    _disk, dbg = node_over(ctx, image, **{"inject-error": [
        {"event": "read_aio", "sector": 0, "errno": 0, "delay-ns": 200_000_000}]})
    order: list[str] = []
    slow: list[Result] = []
    fast: list[Result] = []
    dbg.submit("read", 0, 512, b"", lambda s, m, d: (order.append("slow"), slow.append((s, m, bytes(d)))))
    for _ in range(20):
        dbg.submit("read", 4096, 512, b"", lambda s, m, d: (order.append("fast"), fast.append((s, m, bytes(d)))))
    wait(ctx, slow)
    assert order == ["fast"] * 20 + ["slow"]  # each of the others completed before the delayed one
    assert slow[0][0] == 0 and slow[0][2] == bytes(range(256)) * 2  # errno 0: a delay, then the read


def test_a_node_over_a_missing_or_foreign_node_is_refused(ctx: AioContext, image: str) -> None:
    options = parse(BlockdevOptions, {"driver": "blkdebug", "node-name": "dbg", "image": "nope"})
    with pytest.raises(ValueError, match="Cannot find device=nope nor node-name=nope"):
        open_node(ctx, options, {})
    with pytest.raises(ValueError, match="invalid read error action"):
        open_node(ctx, parse(BlockdevOptions, {"driver": "null-co", "node-name": "n", "rerror": "enospc"}))


# -- error policies --------------------------------------------------------------------


def test_werror_ignore_and_report(ctx: AioContext, image: str) -> None:
    seen: list[tuple[str, int, str]] = []
    for policy, status in (("ignore", 0), ("report", -errno.EIO)):
        disk, dbg = node_over(ctx, image, werror=policy, rerror=policy,
                              **{"inject-error": [{"event": "pwritev"}, {"event": "read_aio"}]})
        dbg.error_listener = lambda op, err, msg, action: seen.append((op, err, action))
        w, r = submit(dbg, "write", 0, 4, b"zzzz"), submit(dbg, "read", 0, 512)
        wait(ctx, w, r)
        assert (w[0][0], r[0][0]) == (status, status)
        if policy == "ignore":
            assert r[0][2] == bytes(512)  # a read that "succeeds": zeroes
        assert dbg.stats["write"].errors == 1 and dbg.stats["read"].errors == 1  # failed, either way
        dbg.close()
        disk.close()
    assert seen == [("write", errno.EIO, "ignore"), ("read", errno.EIO, "ignore"),
                    ("write", errno.EIO, "report"), ("read", errno.EIO, "report")]


def test_werror_stop_holds_requests_until_resume(ctx: AioContext, image: str) -> None:
    disk, dbg = node_over(ctx, image, werror="stop", **{"inject-error": [
        {"event": "pwritev", "errno": 28, "once": True}]})
    actions: list[str] = []
    dbg.error_listener = lambda op, err, msg, action: actions.append(action)
    held = submit(dbg, "write", 0, 4, b"wxyz")
    poll_until(lambda: ctx.poll(True), lambda: dbg.held, "the write to be held", 30)
    assert not held and actions == ["stop"] and dbg.in_flight == 0
    assert dbg.resume() == 1  # the rule was once: the retry goes through
    wait(ctx, held)
    assert held[0][0] == 0 and os.pread(os.open(image, os.O_RDONLY), 4, 0) == b"wxyz"
    # Held when the node closes: failed with its error.
    dbg.rules = BlkdebugRules([inject(event="pwritev", errno=28)], [])
    failed = submit(dbg, "write", 0, 4, b"0000")
    poll_until(lambda: ctx.poll(True), lambda: dbg.held, "the write to be held", 30)
    dbg.close()
    assert failed and failed[0][0] == -errno.ENOSPC
    disk.close()


def test_werror_enospc_stops_on_enospc_only(ctx: AioContext, image: str) -> None:
    _, dbg = node_over(ctx, image, werror="enospc", **{"inject-error": [
        {"event": "pwritev", "sector": 0, "errno": 28}, {"event": "pwritev", "sector": 8, "errno": 5}]})
    actions: list[str] = []
    dbg.error_listener = lambda op, err, msg, action: actions.append(action)
    eio = submit(dbg, "write", 4096, 4, b"abcd")
    enospc = submit(dbg, "write", 0, 4, b"abcd")
    poll_until(lambda: ctx.poll(True), lambda: eio and dbg.held, "an error and a held write", 30)
    assert eio[0][0] == -errno.EIO and not enospc and actions == ["report", "stop"]
    dbg.close()
