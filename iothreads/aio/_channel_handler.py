"""Plugging a ``protocol.Channel`` into an AioContext.

The channel's ZMQ_FD becomes an fd handler (read only: the fd is a hint),
``io_poll`` reads ZMQ_EVENTS so busy polling sees messages without a
syscall, and the channel's ``kick`` (input pending that the fd will not
announce) schedules a bottom half that drains it.
"""

from __future__ import annotations

from protocol.channel import Drainable

from ._context import AioContext
from ._bh import BottomHalf

__all__ = ["ChannelHandler"]


class ChannelHandler:
    """``channel`` served by ``ctx``: create in, and use from, the home thread."""

    def __init__(self, ctx: AioContext, channel: Drainable, name: str = "channel") -> None:
        self.ctx = ctx
        self.channel = channel
        bh = ctx.bh_new(channel.drain, f"{name}-drain")
        try:  # (an exception here, a Ctrl-C too, leaves nothing registered behind)
            self._bh: BottomHalf = bh
            channel.kick = bh.schedule
            ctx.set_fd_handler(channel.fileno(), io_read=channel.drain, io_poll=channel.pending_input)
            bh.schedule()  # messages may have arrived before the handler existed
        except BaseException:
            channel.kick = lambda: None
            ctx.set_fd_handler(channel.fileno())
            bh.delete()
            raise

    def close(self, linger_ms: int = 0) -> None:
        """Remove the handler, delete the BH, close the channel (giving what
        it has not sent ``linger_ms`` to leave).  Idempotent."""
        if not self._bh.deleted:
            self.ctx.set_fd_handler(self.channel.fileno())
            self._bh.delete()
        self.channel.kick = lambda: None
        self.channel.close(linger_ms)
