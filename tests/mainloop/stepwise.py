"""The reference iteration paths through MainContext's public steps.

``MainContext.iteration`` and ``MainLoop.main_loop_wait`` run the five steps
through one fused internal call.  These functions do the same iteration the
long way, step by step through ``prepare``, ``query``, ``wait_fds``, ``check``
and ``dispatch`` (and ``bql_unlock``/``bql_lock`` around the wait), as glib's
``g_main_context_iteration`` and QEMU's ``main_loop_wait`` spell it out.  The
fixtures run every scenario through both paths, so the fused one must behave
exactly like the steps.
"""

from __future__ import annotations

from mainloop import MainContext, MainLoop, bql_lock, bql_locked, bql_unlock
from protocol import StateError


def stepwise_iteration(ctx: MainContext, may_block: bool) -> bool:
    """``ctx.iteration(may_block)`` through the public steps."""
    acquired = not ctx.is_owner()
    if acquired and not ctx.acquire():
        raise StateError(f"MainContext {ctx.name!r} is owned by another thread")
    try:
        ctx.iterations += 1
        ready, max_priority = ctx.prepare()
        timeout_ns, _ = ctx.query(max_priority)
        if ready or not may_block:
            timeout_ns = 0
        ctx.wait_fds(timeout_ns)
        return ctx.check(max_priority) and ctx.dispatch()
    finally:
        if acquired:
            ctx.release()


def stepwise_main_loop_wait(loop: MainLoop, nonblocking: bool = False) -> bool:
    """``loop.main_loop_wait(nonblocking)`` through the public steps."""
    if not bql_locked():
        raise StateError("main_loop_wait() requires the BQL")
    ctx = loop.context
    acquired = not ctx.is_owner()
    if acquired and not ctx.acquire():
        raise StateError("the main context is owned by another thread")
    try:
        ctx.iterations += 1
        timers = loop.timers
        timeout_ns = 0 if nonblocking else (timers.deadline_ns() if any(timers.heaps) else -1)
        ready, max_priority = ctx.prepare()
        sources_timeout_ns, _ = ctx.query(max_priority)
        if ready:
            timeout_ns = 0
        elif sources_timeout_ns >= 0 and (timeout_ns < 0 or sources_timeout_ns < timeout_ns):
            timeout_ns = sources_timeout_ns
        bql_unlock()
        try:
            ctx.wait_fds(timeout_ns)
        finally:
            bql_lock()
        ran = ctx.check(max_priority) and ctx.dispatch()
    finally:
        if acquired:
            ctx.release()
    if any(loop.timers.heaps) and loop.timers.run(loop.aio_context.report_exception):
        ran = True
    return ran


def make_stepwise(obj: MainContext | MainLoop) -> None:
    """Route ``obj``'s iterations through the public steps from now on."""
    if isinstance(obj, MainLoop):
        obj.main_loop_wait = lambda nonblocking=False: stepwise_main_loop_wait(obj, nonblocking)  # type: ignore[method-assign]
        make_stepwise(obj.context)
    else:
        obj.iteration = lambda may_block: stepwise_iteration(obj, may_block)  # type: ignore[method-assign]
