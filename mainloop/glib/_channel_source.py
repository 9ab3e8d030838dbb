"""Plugging a ``protocol.Channel`` into a MainContext as a source.

The channel's ZMQ_FD is an auto fd of the source (ready when it fires); the
channel's ``kick`` (input pending that the fd will not announce) makes the
source ready at once through its ready time.
"""

from __future__ import annotations

from protocol.channel import Drainable

from ._source import IO_IN, PRIORITY_DEFAULT, Source

__all__ = ["ChannelSource"]


class ChannelSource(Source):
    """Dispatches ``channel.drain()`` whenever the channel may have input."""

    kind = "zmq-channel"

    def __init__(self, channel: Drainable, name: str = "channel", priority: int = PRIORITY_DEFAULT,
                 role: str = "") -> None:
        super().__init__(name, priority)
        self.channel = channel
        self.add_unix_fd(channel.fileno(), IO_IN, role or f"ZMQ_FD of {name} (libzmq's eventfd)")
        channel.kick = self._kick
        self.ready_time_ns = 0  # drain once at the start: input may predate the source

    def _kick(self) -> None:
        if self.ready_time_ns != 0:
            self.set_ready_time(0)

    def dispatch(self) -> bool:
        if self.ready_time_ns != -1:
            self.set_ready_time(-1)
        self.channel.drain()
        return True

    def finalize(self) -> None:
        self.channel.kick = lambda: None
        self.channel.close()
