"""What the transmission phase's two decoders share, sans I/O: frames of a
fixed-size header, some followed by a payload, found in bytes that come in
pieces (``FrameDecoder``).

A frame cut by the end of what was fed is kept: the start of its header
(``_tail``, fewer bytes than a header), or a frame whose payload is still
coming (``_pending``, with the payload collected into one buffer the size
of it, or only counted when the frame's owner drops it).  The next ``feed``
finishes it first (``_resume``); then the decoder's own loop parses whole
frames, and keeps what is left as the next tail.  Not thread-safe.
"""

from __future__ import annotations

from typing import ClassVar, Generic, TypeVar

T = TypeVar("T")

__all__ = ["FrameDecoder"]


class FrameDecoder(Generic[T]):
    """The framing of one direction of one connection.  A subclass says how
    long a header is (``HEADER_SIZE``), parses a frame (``_frame``), says
    when the stream has stopped (``_stopped``), and how a frame takes its
    collected payload (``_with_payload``)."""

    HEADER_SIZE: ClassVar[int]

    def __init__(self) -> None:
        self._tail = b""  # the start of a header
        self._pending: T | None = None  # a frame waiting for its payload
        self._payload = bytearray()  # its payload, being filled (empty when dropped)
        self._length = 0  # the payload's length
        self._filled = 0  # bytes of it received (or dropped)

    # -- the subclass's part ----------------------------------------------------

    def _stopped(self) -> bool:
        raise NotImplementedError

    def _frame(self, header: bytes | memoryview, at: int, view: memoryview, pos: int, out: list[T]) -> int:
        """The frame whose header is at ``header[at:]`` and whose payload, if
        any, starts at ``view[pos:]``: into ``out``, or pending (``_collect``);
        where the next one starts."""
        raise NotImplementedError

    def _with_payload(self, frame: T, payload: memoryview) -> T:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------

    @property
    def partial_bytes(self) -> int:
        """The bytes of the frame being received held so far (part of a
        header, or a header and the part of its payload that came)."""
        if self._pending is None:
            return len(self._tail)
        return self.HEADER_SIZE + self._filled

    @property
    def missing_bytes(self) -> int:
        """What the frame whose payload is being received still lacks (0 when
        none is: at a frame boundary, or within a header)."""
        return 0 if self._pending is None else self._length - self._filled

    def _resume(self, view: memoryview, out: list[T]) -> int:
        """Finish the frame the last ``feed`` cut: where the next one starts
        in ``view``, or -1 when ``view`` went to it whole (or the stream stopped)."""
        pos = 0
        if self._pending is not None:
            pos = self._fill(view, out)
            if self._pending is not None:
                return -1
        if self._tail:
            need = self.HEADER_SIZE - len(self._tail)
            if len(view) - pos < need:
                self._tail += bytes(view[pos:])
                return -1
            header = self._tail + bytes(view[pos:pos + need])
            self._tail = b""
            pos = self._frame(header, 0, view, pos + need, out)
        return -1 if self._stopped() else pos

    def _keep_tail(self, view: memoryview, pos: int) -> None:
        """What ``feed`` did not parse, from ``pos``: the start of the next header."""
        if pos < len(view) and self._pending is None and not self._stopped():
            self._tail = bytes(view[pos:])

    def _collect(self, frame: T, length: int, keep: bool, view: memoryview, out: list[T]) -> int:
        """``frame``'s payload of ``length`` bytes starts at ``view[0]`` and
        does not all fit: collect it (``keep``) or drop it; what was taken."""
        self._pending = frame
        self._length = length
        if keep:
            self._payload = bytearray(length)
        return self._fill(view, out)

    def _fill(self, view: memoryview, out: list[T]) -> int:
        """Take the pending frame's payload (or drop it) from ``view``; what was taken."""
        take = min(self._length - self._filled, len(view))
        if self._payload:
            self._payload[self._filled:self._filled + take] = view[:take]
        self._filled += take
        if self._filled == self._length:
            self._complete(out)
        return take

    def _complete(self, out: list[T]) -> None:
        frame = self._pending
        assert frame is not None
        if self._payload:
            frame = self._with_payload(frame, memoryview(self._payload))
            self._payload = bytearray()
        out.append(frame)
        self._pending = None
        self._length = self._filled = 0
