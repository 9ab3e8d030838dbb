"""What an NBD server offers and what one handshake agreed: ``NbdExport``, ``NbdNegotiated``.

Theory of operation
-------------------
An ``NbdExport`` is the description of one export as the handshake needs it:
its name (what clients ask for), size, description, whether it is read-only,
whether several connections may share it, its block sizes and the metadata
contexts it offers.  Its transmission flags are computed the way QEMU's
``nbd_export_create`` computes them, so two servers offering the same export
answer NBD_OPT_INFO with the same bytes.  The values are checked when the
export is made (the limits of the specification's "Size constraints" and of
strings), so a handshake never has to refuse its own export.

An ``NbdNegotiated`` is what a handshake that reached the transmission phase
agreed: the export, the flags sent for it (with NBD_FLAG_SEND_DF when
structured replies are on, as QEMU), whether structured replies are on, the
metadata contexts selected (with their ids), whether NO_ZEROES was agreed and
the alignment the client promised to honour.  It is plain data: the main loop
hands it, with the socket, to the iothread that serves the transmission
phase.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._errors import LocalProtocolError
from ._constants import (
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_MAX_BUFFER_SIZE,
    NBD_MAX_STRING_SIZE,
)

__all__ = ["NbdExport", "NbdMetaContext", "NbdNegotiated"]

#: The largest minimum block size the specification allows.
MAX_MIN_BLOCK_BYTES = 64 * 1024


def _check_string(what: str, value: str) -> None:
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{what} {value[:80]!r} cannot be encoded in UTF-8") from None
    if len(raw) > NBD_MAX_STRING_SIZE:
        raise LocalProtocolError(f"{what} {value[:80]!r}... too long: {len(raw)} bytes, "
                                 f"at most {NBD_MAX_STRING_SIZE}")
    if "\0" in value:
        raise LocalProtocolError(f"{what} {value[:80]!r} contains a NUL character")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class NbdExport:
    """One export, as a client sees it in the handshake.

    :param name: the name clients ask for (UTF-8, at most 4096 bytes, no NUL).
    :param size_bytes: the export's size.
    :param description: sent as NBD_INFO_DESCRIPTION and in NBD_OPT_LIST; None
        sends none (QEMU's export without ``description``).
    :param read_only: writes, trims and zeroes are refused.
    :param multi_conn: NBD_FLAG_CAN_MULTI_CONN: several connections see each
        other's flushed writes (QEMU sets it unless ``max-connections=1``).
    :param min_block_bytes: the request alignment (a power of two, at most 64 KiB).
    :param preferred_block_bytes: a power of two, at least 512 and the minimum.
    :param max_payload_bytes: the largest request payload, at least the
        preferred size, at most 32 MiB (NBD_MAX_BUFFER_SIZE).
    :param allocation_depth: offers the ``qemu:allocation-depth`` context.
    """

    name: str
    size_bytes: int
    description: str | None = None
    read_only: bool = False
    multi_conn: bool = True
    min_block_bytes: int = 1
    preferred_block_bytes: int = 4096
    max_payload_bytes: int = NBD_MAX_BUFFER_SIZE
    allocation_depth: bool = False

    def __post_init__(self) -> None:
        _check_string("export name", self.name)
        if self.description is not None:
            _check_string("description", self.description)
        if not 0 <= self.size_bytes < 1 << 63:
            raise LocalProtocolError(f"export size {self.size_bytes} is not in [0, 2^63)")
        if not _is_power_of_two(self.min_block_bytes) or self.min_block_bytes > MAX_MIN_BLOCK_BYTES:
            raise LocalProtocolError(f"minimum block size {self.min_block_bytes} is not a power of two "
                                     f"of at most {MAX_MIN_BLOCK_BYTES}")
        if (not _is_power_of_two(self.preferred_block_bytes)
                or self.preferred_block_bytes < max(self.min_block_bytes, 512)):
            raise LocalProtocolError(f"preferred block size {self.preferred_block_bytes} is not a power "
                                     f"of two of at least {max(self.min_block_bytes, 512)}")
        if not self.preferred_block_bytes <= self.max_payload_bytes <= NBD_MAX_BUFFER_SIZE:
            raise LocalProtocolError(f"maximum payload {self.max_payload_bytes} is not between the "
                                     f"preferred block size {self.preferred_block_bytes} and "
                                     f"{NBD_MAX_BUFFER_SIZE}")

    @property
    def transmission_flags(self) -> int:
        """The export's flags, as QEMU's ``nbd_export_create`` sets them (before SEND_DF)."""
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE
        if self.multi_conn:
            flags |= NBD_FLAG_CAN_MULTI_CONN
        if self.read_only:
            flags |= NBD_FLAG_READ_ONLY
        else:
            flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO
        return flags


@dataclass(frozen=True)
class NbdMetaContext:
    """A metadata context selected by NBD_OPT_SET_META_CONTEXT: its id and its name."""

    context_id: int
    name: str


@dataclass(frozen=True)
class NbdNegotiated:
    """The outcome of a handshake that reached the transmission phase.

    :ivar export: the export the client chose.
    :ivar transmission_flags: the flags the client was sent for it.
    :ivar structured_replies: NBD_OPT_STRUCTURED_REPLY was agreed.
    :ivar meta_contexts: the contexts BLOCK_STATUS answers for, in id order
        (empty: BLOCK_STATUS is refused).
    :ivar no_zeroes: the client set NBD_FLAG_C_NO_ZEROES.
    :ivar check_align_bytes: the alignment the client promised to honour
        (NBD_OPT_GO with NBD_INFO_BLOCK_SIZE), 0 when it promised none.
    """

    export: NbdExport
    transmission_flags: int
    structured_replies: bool
    meta_contexts: tuple[NbdMetaContext, ...]
    no_zeroes: bool
    check_align_bytes: int
