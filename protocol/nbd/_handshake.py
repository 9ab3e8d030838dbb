"""The server's side of the NBD handshake, sans I/O: bytes in, option replies and an outcome out.

Theory of operation
-------------------
An ``NbdServerHandshake`` is the negotiation phase of one connection with no
socket, clock or thread of its own.  Its owner (the main loop's NBD server)
writes out what it says (``data_to_send``, then ``data_sent`` with how much
the socket took), feeds it what the client wrote (``receive_data``; ``b""``
when the client hung up) while ``wants_input`` is true, and watches
``state``::

    NEGOTIATING --NBD_OPT_GO acked, or NBD_OPT_EXPORT_NAME answered--> TRANSMISSION
        |
        +-- NBD_OPT_ABORT, a fatal error, the client hung up, close() --> CLOSED

- The greeting (NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE | NO_ZEROES) is queued at
  creation, as QEMU's ``nbd_negotiate`` sends it.
- ``TRANSMISSION``: ``negotiated`` holds what was agreed (an
  ``NbdNegotiated``); the bytes the client sent after its final option
  (requests it pipelined) are ``unused_data``.  The owner sends the rest of
  the output (the final NBD_REP_ACK), then hands the socket, ``negotiated``
  and ``unused_data`` to the transmission phase.
- ``CLOSED``: ``close_reason`` says how the client broke the protocol (None
  when it aborted, when it hung up without writing a byte, a port probe, or
  when the owner closed).  What was queued before (NBD_OPT_ABORT's ack) is
  still handed out: the owner sends it, then closes the socket.

How input is read: the negotiation is one generator, shaped like QEMU's
negotiation coroutine, that asks either for exactly N bytes or for N bytes to
be discarded; the driver resumes it only when that many bytes are there.
Every read is bounded: the largest is a name or a query of 4096 bytes
(NBD_MAX_STRING_SIZE) or 4096 bytes of information requests; option data the
server does not parse (an unknown option, the rest of a refused one, a query
longer than 4096 bytes) is discarded as it arrives, never buffered, and an
option longer than 32 MiB (NBD_MAX_BUFFER_SIZE) closes the connection, as
QEMU.  Input is taken only as fast as output leaves: while more than
``OUTPUT_PAUSE_BYTES`` wait to go out (a client that pipelines options
without reading the replies), parsing stops and ``wants_input`` is false;
``data_sent`` resumes it.  What one handshake holds is thus bounded by what
one read of its owner brings, plus 4 KiB, plus ``OUTPUT_PAUSE_BYTES`` and
one option's replies.  Time is not bounded here: the owner bounds the
handshake's duration (QEMU's ``handshake-max-seconds``).

What each option gets, as QEMU's ``nbd_negotiate_options``:

- client flags other than C_FIXED_NEWSTYLE and C_NO_ZEROES: closed.  Without
  C_FIXED_NEWSTYLE only NBD_OPT_EXPORT_NAME is taken; any other option closes.
- a bad IHAVEOPT magic, or an option longer than 32 MiB: closed.
- NBD_OPT_EXPORT_NAME: the export's size, flags and 124 zero bytes (none
  with NO_ZEROES), then transmission; an unknown export, or a name longer
  than 4096 bytes, closes (the option has no error reply).
- NBD_OPT_ABORT: NBD_REP_ACK, then closed.
- NBD_OPT_LIST: one NBD_REP_SERVER (name, then description) per export, then
  NBD_REP_ACK; with data: ERR_INVALID.
- NBD_OPT_INFO / NBD_OPT_GO: ERR_UNKNOWN for an unknown export; else
  NBD_INFO_NAME if asked for (the name as the client sent it),
  NBD_INFO_DESCRIPTION if the export has one, NBD_INFO_BLOCK_SIZE always
  (minimum 1 for a GO that did not ask for it, QEMU's compatibility),
  NBD_INFO_EXPORT always, then NBD_REP_ACK (GO: transmission) or, for an
  INFO that did not ask for block sizes on an export that needs alignment,
  ERR_BLOCK_SIZE_REQD.
- NBD_OPT_STARTTLS: ERR_POLICY "TLS not configured" (no TLS here).
- NBD_OPT_STRUCTURED_REPLY: NBD_REP_ACK; a second one gets ERR_INVALID.
- NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: ``base:allocation``
  (id 0) and, where the export offers it, ``qemu:allocation-depth`` (id 1);
  LIST with no query lists all, the queries ``base:`` and ``qemu:`` list
  their namespace, and LIST is answered before structured replies too (QEMU
  8.2 and later; 7.2 refused it); SET needs them (else ERR_INVALID), replaces
  the selection even when it fails, and the selection is dropped if GO
  chooses another export.  Unknown namespaces and leaves are ignored.
- any other option (NBD_OPT_EXTENDED_HEADERS included): ERR_UNSUP.
- a length that does not match the option's content, a name over 4096
  bytes, an embedded NUL: ERR_INVALID, with the rest of the option
  discarded so that the stream stays in step.

Where this differs from QEMU, on purpose: data left after the queries of a
META_CONTEXT option gets ERR_INVALID, as the specification says (QEMU leaves
it in the stream, where it is read as the next option's header); a name that
is not UTF-8 or holds a NUL names no export (QEMU's C string would stop at
the NUL); NBD_OPT_EXTENDED_HEADERS is unsupported (QEMU 8.2 and later take
it), so clients fall back to compact requests.  The tests check the rest
byte for byte against ``qemu-nbd``.

Nothing the client sends makes a method raise.  Misuse by the owner (feeding
input after the transmission phase began, acknowledging bytes never handed
out) raises.  Not thread-safe: one thread drives a handshake.
"""

from __future__ import annotations

import struct
from collections.abc import Generator, Mapping
from enum import Enum

from .._errors import LocalProtocolError, StateError
from ._constants import (
    NBD_EXPORT_NAME_ZEROES,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_SEND_DF,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_INIT_MAGIC,
    NBD_MAX_BUFFER_SIZE,
    NBD_MAX_STRING_SIZE,
    NBD_META_CONTEXT_ALLOCATION_DEPTH,
    NBD_META_CONTEXT_BASE_ALLOCATION,
    NBD_META_ID_ALLOCATION_DEPTH,
    NBD_META_ID_BASE_ALLOCATION,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_OPTS_MAGIC,
    NBD_REP_ACK,
    NBD_REP_ERR_BLOCK_SIZE_REQD,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    nbd_opt_lookup,
)
from ._export import NbdExport, NbdMetaContext, NbdNegotiated

__all__ = ["NbdHandshakeState", "NbdServerHandshake"]

#: No more input is parsed while this much output waits to go out.
OUTPUT_PAUSE_BYTES = 256 * 1024
#: How much of a client's name an error message echoes (QEMU's nbd_sanitize_name).
SANITIZED_NAME_BYTES = 80

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPTION = struct.Struct(">QII")  # magic, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_GREETING = struct.pack(">QQH", NBD_INIT_MAGIC, NBD_OPTS_MAGIC, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, flags
_INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, flags
_INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
_KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES

# The negotiation generator yields N > 0 to read exactly N bytes (sent back to
# it), -N to discard N bytes (b"" sent back once they are gone).
_Steps = Generator[int, bytes, None]


class NbdHandshakeState(Enum):
    #: Options are being negotiated.
    NEGOTIATING = "negotiating"
    #: The handshake ended in the transmission phase: ``negotiated`` is set.
    TRANSMISSION = "transmission"
    #: The connection is to be closed once the output is sent.
    CLOSED = "closed"


def _sanitize(name: bytes) -> bytes:
    """A client's name as an error message echoes it: its first 80 bytes and "..." past them."""
    return name if len(name) < SANITIZED_NAME_BYTES else name[:SANITIZED_NAME_BYTES] + b"..."


class NbdServerHandshake:
    """The server's half of one NBD handshake.

    :param exports: the exports offered, by name.  It is read at each option,
        so a mapping its owner updates (exports added or deleted while a
        client negotiates) is seen as it is then.
    """

    def __init__(self, exports: Mapping[str, NbdExport]) -> None:
        self.state = NbdHandshakeState.NEGOTIATING
        #: How the client broke the protocol, when it did (None otherwise).
        self.close_reason: str | None = None
        #: What was agreed, once in the transmission phase.
        self.negotiated: NbdNegotiated | None = None
        self._exports = exports
        self._in = bytearray()
        self._heard = False  # the client wrote something
        self._out = bytearray(_GREETING)
        self._opt = 0  # the option being handled
        self._optlen = 0  # how much of its data is not read yet
        self._no_zeroes = False
        self._structured = False
        self._contexts: tuple[NbdMetaContext, ...] = ()
        self._contexts_export: str | None = None  # the export the contexts were selected for
        self._steps = self._negotiate()
        self._want = next(self._steps)

    # -- input -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Take bytes the client wrote; ``b""`` means it hung up (the handshake closes)."""
        if self.state is NbdHandshakeState.TRANSMISSION:
            raise StateError("the NBD handshake is over: input belongs to the transmission phase")
        if self.state is NbdHandshakeState.CLOSED:
            return
        if not data:
            # A client that never wrote is a port probe (QEMU stays silent about those too).
            self._close("the client hung up during the handshake" if self._heard else None)
            return
        self._heard = True
        self._in += data
        self._pump()

    @property
    def wants_input(self) -> bool:
        """Whether the owner should read more of the client's input now: not
        once negotiation is over, nor while more than ``OUTPUT_PAUSE_BYTES``
        wait to go out (checked again after ``data_sent``)."""
        return self.state is NbdHandshakeState.NEGOTIATING and len(self._out) <= OUTPUT_PAUSE_BYTES

    @property
    def buffered_bytes(self) -> int:
        """Input held while negotiating: the start of a field (at most 4 KiB), plus
        whatever one ``receive_data`` brought while parsing was paused."""
        return len(self._in) if self.state is NbdHandshakeState.NEGOTIATING else 0

    @property
    def unused_data(self) -> bytes:
        """Input past the final option: the first transmission-phase bytes."""
        return bytes(self._in) if self.state is NbdHandshakeState.TRANSMISSION else b""

    def _pump(self) -> None:
        """Run the negotiation while the input it waits for is there and the output is not piling up."""
        while self.state is NbdHandshakeState.NEGOTIATING and len(self._out) <= OUTPUT_PAUSE_BYTES:
            want = self._want
            if want > 0:
                if len(self._in) < want:
                    return
                chunk = bytes(self._in[:want])
                del self._in[:want]
            else:
                dropped = min(-want, len(self._in))
                del self._in[:dropped]
                if dropped < -want:
                    self._want = want + dropped
                    return
                chunk = b""
            try:
                self._want = self._steps.send(chunk)
            except StopIteration:
                return

    # -- output ----------------------------------------------------------------

    def data_to_send(self, max_bytes: int | None = None) -> bytes:
        """Unsent output (at most ``max_bytes``), kept until ``data_sent`` says it went out."""
        return bytes(self._out if max_bytes is None else self._out[:max_bytes])

    def data_sent(self, nbytes: int) -> None:
        """The first ``nbytes`` of the unsent output went out; parsing resumes if it had paused."""
        if not 0 <= nbytes <= len(self._out):
            raise LocalProtocolError(f"{nbytes} bytes sent, but {len(self._out)} were waiting")
        del self._out[:nbytes]
        self._pump()

    def _reply(self, reply_type: int, payload: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(NBD_REP_MAGIC, self._opt, reply_type, len(payload))
        self._out += payload

    # -- closing ---------------------------------------------------------------

    def close(self) -> None:
        """Close the handshake (the owner's choice: a timeout, a shutdown)."""
        self._close(None)

    def _close(self, reason: str | None) -> None:
        if self.state is NbdHandshakeState.NEGOTIATING:
            self.state = NbdHandshakeState.CLOSED
            self.close_reason = reason
            self._in.clear()

    def _finish(self, export: NbdExport, check_align_bytes: int) -> None:
        self.negotiated = NbdNegotiated(
            export=export, transmission_flags=self._flags(export), structured_replies=self._structured,
            meta_contexts=self._contexts, no_zeroes=self._no_zeroes, check_align_bytes=check_align_bytes)
        self.state = NbdHandshakeState.TRANSMISSION

    # -- reading an option's data ----------------------------------------------

    def _read(self, nbytes: int) -> Generator[int, bytes, bytes]:
        if not nbytes:
            return b""
        return (yield nbytes)

    def _skip(self, nbytes: int) -> Generator[int, bytes, None]:
        if nbytes:
            yield -nbytes

    def _opt_read(self, nbytes: int, check_nul: bool = False) -> Generator[int, bytes, bytes | None]:
        """The next ``nbytes`` of the option's data, or None when the option was
        refused instead (its length is too short, or the bytes hold a NUL)."""
        if nbytes > self._optlen:
            yield from self._opt_invalid(f"Inconsistent lengths in option {nbd_opt_lookup(self._opt)}")
            return None
        self._optlen -= nbytes
        data = yield from self._read(nbytes)
        if check_nul and b"\0" in data:
            yield from self._opt_invalid(f"Unexpected embedded NUL in option {nbd_opt_lookup(self._opt)}")
            return None
        return data

    def _opt_read_name(self) -> Generator[int, bytes, bytes | None]:
        """A 32-bit length and that many bytes of name (at most 4096), or None when refused."""
        raw = yield from self._opt_read(4)
        if raw is None:
            return None
        (length,) = _U32.unpack(raw)
        if length > NBD_MAX_STRING_SIZE:
            yield from self._opt_invalid(f"Invalid name length: {length}")
            return None
        return (yield from self._opt_read(length, check_nul=True))

    def _opt_drop(self, reply_type: int, message: bytes) -> Generator[int, bytes, None]:
        """Discard the rest of the option's data, then answer it with an error."""
        yield from self._skip(self._optlen)
        self._optlen = 0
        self._reply(reply_type, message)

    def _opt_invalid(self, message: str) -> Generator[int, bytes, None]:
        yield from self._opt_drop(NBD_REP_ERR_INVALID, message.encode())

    def _reject_length(self) -> Generator[int, bytes, None]:
        yield from self._opt_invalid(f"option '{nbd_opt_lookup(self._opt)}' has unexpected length")

    # -- the negotiation -------------------------------------------------------

    def _lookup(self, name: bytes) -> NbdExport | None:
        if b"\0" in name:
            return None
        try:
            return self._exports.get(name.decode("utf-8"))
        except UnicodeDecodeError:
            return None

    def _flags(self, export: NbdExport) -> int:
        return export.transmission_flags | (NBD_FLAG_SEND_DF if self._structured else 0)

    def _negotiate(self) -> _Steps:
        (flags,) = _U32.unpack((yield 4))
        unknown = flags & ~_KNOWN_CLIENT_FLAGS
        if unknown:
            self._close(f"Unknown client flags 0x{unknown:x} received")
            return
        fixed_newstyle = bool(flags & NBD_FLAG_C_FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = _OPTION.unpack((yield _OPTION.size))
            if magic != NBD_OPTS_MAGIC:
                self._close(f"Bad magic received: 0x{magic:016x}")
                return
            self._opt, self._optlen = option, length
            if length > NBD_MAX_BUFFER_SIZE:
                self._close(f"len ({length}) is larger than max len ({NBD_MAX_BUFFER_SIZE})")
                return
            if option == NBD_OPT_EXPORT_NAME:
                yield from self._export_name()
                return
            if not fixed_newstyle:
                self._close(f"Unsupported option {option} ({nbd_opt_lookup(option)}) without fixed newstyle")
                return
            if option == NBD_OPT_ABORT:
                self._reply(NBD_REP_ACK)
                self._close(None)
                return
            if option in (NBD_OPT_INFO, NBD_OPT_GO):
                if (yield from self._info()):
                    return
            elif option == NBD_OPT_LIST:
                if length:
                    yield from self._reject_length()
                else:
                    self._list()
            elif option == NBD_OPT_STARTTLS:
                if length:
                    yield from self._reject_length()
                else:
                    self._reply(NBD_REP_ERR_POLICY, b"TLS not configured")
            elif option == NBD_OPT_STRUCTURED_REPLY:
                if length:
                    yield from self._reject_length()
                elif self._structured:
                    self._reply(NBD_REP_ERR_INVALID, b"structured reply already negotiated")
                else:
                    self._reply(NBD_REP_ACK)
                    self._structured = True
            elif option in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
                yield from self._meta_contexts()
            else:
                yield from self._opt_drop(
                    NBD_REP_ERR_UNSUP, f"Unsupported option {option} ({nbd_opt_lookup(option)})".encode())

    def _export_name(self) -> _Steps:
        if self._optlen > NBD_MAX_STRING_SIZE:
            self._close(f"Bad length received: an export name of {self._optlen} bytes")
            return
        name = yield from self._read(self._optlen)
        self._optlen = 0
        export = self._lookup(name)
        if export is None:
            self._close("export '" + _sanitize(name).decode("utf-8", "replace") + "' not found")
            return
        self._check_meta_export(export)
        self._out += _EXPORT_NAME_REPLY.pack(export.size_bytes, self._flags(export))
        if not self._no_zeroes:
            self._out += bytes(NBD_EXPORT_NAME_ZEROES)
        self._finish(export, 0)

    def _list(self) -> None:
        for export in list(self._exports.values()):
            name = export.name.encode()
            self._reply(NBD_REP_SERVER, _U32.pack(len(name)) + name + (export.description or "").encode())
        self._reply(NBD_REP_ACK)

    def _check_meta_export(self, export: NbdExport) -> None:
        """Contexts selected for another export are dropped (QEMU's nbd_check_meta_export)."""
        if export.name != self._contexts_export:
            self._contexts = ()

    def _info(self) -> Generator[int, bytes, bool]:
        """NBD_OPT_INFO or NBD_OPT_GO; True when GO succeeded (transmission begins)."""
        name = yield from self._opt_read_name()
        if name is None:
            return False
        raw = yield from self._opt_read(2)
        if raw is None:
            return False
        (left,) = _U16.unpack(raw)
        send_name = block_size = False
        while left:
            batch = min(left, NBD_MAX_STRING_SIZE // 2)  # bounded reads, not one per request
            raw = yield from self._opt_read(2 * batch)
            if raw is None:
                return False
            left -= batch
            requests = struct.unpack(f">{batch}H", raw)
            send_name = send_name or NBD_INFO_NAME in requests
            block_size = block_size or NBD_INFO_BLOCK_SIZE in requests
        if self._optlen:
            yield from self._reject_length()
            return False
        export = self._lookup(name)
        if export is None:
            self._reply(NBD_REP_ERR_UNKNOWN, b"export '" + _sanitize(name) + b"' not present")
            return False
        go = self._opt == NBD_OPT_GO
        if go:
            self._check_meta_export(export)
        if send_name:
            self._reply(NBD_REP_INFO, _U16.pack(NBD_INFO_NAME) + name)
        if export.description is not None:
            self._reply(NBD_REP_INFO, _U16.pack(NBD_INFO_DESCRIPTION) + export.description.encode())
        # The minimum is 1 for a GO that did not promise alignment: any client may use the export.
        minimum = export.min_block_bytes if block_size or not go else 1
        self._reply(NBD_REP_INFO, _INFO_BLOCK_SIZE.pack(NBD_INFO_BLOCK_SIZE, minimum,
                                                         export.preferred_block_bytes,
                                                         export.max_payload_bytes))
        self._reply(NBD_REP_INFO, _INFO_EXPORT.pack(NBD_INFO_EXPORT, export.size_bytes, self._flags(export)))
        if not go and not block_size and export.min_block_bytes > 1:
            self._reply(NBD_REP_ERR_BLOCK_SIZE_REQD, b"request NBD_INFO_BLOCK_SIZE to use this export")
            return False
        self._reply(NBD_REP_ACK)
        if go:
            self._finish(export, export.min_block_bytes if block_size else 0)
        return go

    def _meta_contexts(self) -> _Steps:
        """NBD_OPT_LIST_META_CONTEXT or NBD_OPT_SET_META_CONTEXT."""
        listing = self._opt == NBD_OPT_LIST_META_CONTEXT
        if not listing:
            if not self._structured:
                yield from self._opt_invalid(f"request option '{nbd_opt_lookup(self._opt)}' when "
                                             "structured reply is not negotiated")
                return
            self._contexts, self._contexts_export = (), None  # replaced even if this one fails
        name = yield from self._opt_read_name()
        if name is None:
            return
        export = self._lookup(name)
        if export is None:
            yield from self._opt_drop(NBD_REP_ERR_UNKNOWN, b"export '" + _sanitize(name) + b"' not present")
            return
        raw = yield from self._opt_read(4)
        if raw is None:
            return
        (queries,) = _U32.unpack(raw)
        base = depth = False
        if listing and not queries:  # all of them
            base, depth = True, export.allocation_depth
        for _ in range(queries):
            raw = yield from self._opt_read(4)
            if raw is None:
                return
            (length,) = _U32.unpack(raw)
            if length > NBD_MAX_STRING_SIZE:  # names no context: skipped unread
                if length > self._optlen:
                    yield from self._opt_invalid(
                        f"Inconsistent lengths in option {nbd_opt_lookup(self._opt)}")
                    return
                self._optlen -= length
                yield from self._skip(length)
                continue
            query = yield from self._opt_read(length, check_nul=True)
            if query is None:
                return
            namespace, colon, leaf = query.partition(b":")
            if not colon:
                continue
            if namespace == b"base":
                base = base or leaf == b"allocation" or (listing and not leaf)
            elif namespace == b"qemu":
                # "qemu:dirty-bitmap:NAME" names no bitmap: this server exports none.
                wanted = leaf == b"allocation-depth" or (listing and not leaf)
                depth = depth or (wanted and export.allocation_depth)
        if self._optlen:
            yield from self._reject_length()
            return
        selected = []
        if base:
            selected.append(NbdMetaContext(NBD_META_ID_BASE_ALLOCATION, NBD_META_CONTEXT_BASE_ALLOCATION))
        if depth:
            selected.append(NbdMetaContext(NBD_META_ID_ALLOCATION_DEPTH, NBD_META_CONTEXT_ALLOCATION_DEPTH))
        for context in selected:
            # LIST's ids are reserved: 0.
            self._reply(NBD_REP_META_CONTEXT,
                        _U32.pack(0 if listing else context.context_id) + context.name.encode())
        self._reply(NBD_REP_ACK)
        if not listing:
            self._contexts, self._contexts_export = tuple(selected), export.name
