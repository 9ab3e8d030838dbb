"""Bottom halves beyond QEMU's test-aio cases: idle BHs, nested polls,
leak detection at close, use after delete."""

from __future__ import annotations

import pytest

from iothreads import AioContext
from iothreads.aio._bh import IDLE_BH_TIMEOUT_NS
from protocol import BottomHalfLeakError, StateError


def test_idle_bh_runs_but_is_not_progress(ctx: AioContext) -> None:
    ran = []
    bh = ctx.bh_new(lambda: ran.append(1), "idler")
    bh.schedule_idle()
    assert ctx._compute_timeout_ns() == IDLE_BH_TIMEOUT_NS
    assert ctx.poll(False) is False
    assert ran == [1]
    assert ctx._compute_timeout_ns() == -1
    bh.schedule_idle()
    bh.schedule()  # as in QEMU, the idle bit stays until the BH runs
    assert ctx._compute_timeout_ns() == IDLE_BH_TIMEOUT_NS
    bh.delete()
    ctx.poll(False)


def test_blocking_poll_with_only_an_idle_bh_returns(ctx: AioContext) -> None:
    ran = []
    bh = ctx.bh_new(lambda: ran.append(1))
    ctx.poll(False)
    bh.schedule_idle()
    ctx.poll(True)  # bounded by the 10 ms idle timeout at worst
    assert ran == [1]
    bh.delete()
    ctx.poll(False)


def test_bh_scheduled_during_bh_run_waits_for_next_poll(ctx: AioContext) -> None:
    order: list[str] = []
    late = ctx.bh_new(lambda: order.append("late"))
    early = ctx.bh_new(lambda: (order.append("early"), late.schedule()))
    early.schedule()
    assert ctx.poll(False)
    assert order == ["early"]
    assert ctx.poll(False)
    assert order == ["early", "late"]
    assert ctx.poll(False) is False
    early.delete()
    late.delete()
    ctx.poll(False)


def test_nested_poll_finishes_the_outer_slice_first(ctx: AioContext) -> None:
    """A BH calling poll() runs the outer slice's remaining BHs, each once."""
    runs: list[str] = []
    bhs: dict[str, object] = {}

    def nest() -> None:
        runs.append("nest")
        ctx.poll(False)

    for name in ("a", "b"):
        bhs[name] = ctx.bh_new(lambda name=name: runs.append(name), name)
    bhs["nest"] = ctx.bh_new(nest, "nest")
    for name in ("nest", "a", "b"):
        bhs[name].schedule()  # type: ignore[attr-defined]
    ctx.poll(False)
    assert sorted(runs) == ["a", "b", "nest"]
    assert ctx.poll(False) is False
    for bh in bhs.values():
        bh.delete()  # type: ignore[attr-defined]
    ctx.poll(False)


def test_close_names_leaked_bottom_halves() -> None:
    ctx = AioContext(name="leaky")
    ctx.bh_new(lambda: None, "forgotten")
    kept = ctx.bh_new(lambda: None, "scheduled-not-deleted")
    kept.schedule()
    done = ctx.bh_new(lambda: None, "properly-deleted")
    done.delete()
    ctx.bh_schedule_oneshot(lambda: None, "queued-oneshot")
    with pytest.raises(BottomHalfLeakError) as info:
        ctx.close()
    assert info.value.names == ["forgotten", "queued-oneshot", "scheduled-not-deleted"]
    assert "forgotten" in str(info.value)
    assert ctx.closed
    ctx.close()  # idempotent once closed


def test_deleted_bh_cannot_be_rescheduled(ctx: AioContext) -> None:
    bh = ctx.bh_new(lambda: None, "gone")
    bh.delete()
    bh.delete()  # deleting twice is harmless
    ctx.poll(False)
    with pytest.raises(StateError, match="gone"):
        bh.schedule()


def test_delete_after_schedule_never_runs(ctx: AioContext) -> None:
    ran = []
    bh = ctx.bh_new(lambda: ran.append(1))
    bh.schedule()
    bh.delete()
    assert ctx.poll(False) is False
    assert ran == [] and bh.deleted


def test_closed_context_refuses_work() -> None:
    ctx = AioContext()
    ctx.close()
    with pytest.raises(StateError):
        ctx.bh_new(lambda: None)
    with pytest.raises(StateError):
        ctx.poll(False)
    with pytest.raises(StateError):
        ctx.bh_schedule_oneshot(lambda: None)


def test_default_bh_name_is_the_callable(ctx: AioContext) -> None:
    def my_callback() -> None:
        pass

    bh = ctx.bh_new(my_callback)
    assert "my_callback" in bh.name
    assert "my_callback" in repr(bh)
    bh.delete()
    ctx.poll(False)
