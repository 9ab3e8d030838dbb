"""The client's side of NBD, sans I/O: a handshake into the transmission phase, simple replies, URIs.

Theory of operation
-------------------
What a plain client needs to do I/O on one export, with no socket, clock or
thread of its own (the server's side is ``NbdServerHandshake`` and
``NbdRequestDecoder``; requests are built with ``encode_request``):

- ``NbdClientHandshake(name)``: the fixed-newstyle handshake of a client that
  asks for nothing but the export.  It reads the greeting (NBDMAGIC,
  IHAVEOPT, the server's flags: FIXED_NEWSTYLE is required), answers with
  its client flags (C_FIXED_NEWSTYLE, and C_NO_ZEROES when the server offers
  NO_ZEROES) and one NBD_OPT_GO for ``name`` with no information requests,
  then reads the option's replies: NBD_REP_INFO (NBD_INFO_EXPORT gives the
  export's size and transmission flags; other information is skipped) until
  NBD_REP_ACK, which starts the transmission phase.  Structured replies are
  not asked for, so every reply to come is a simple one.  Its owner drives
  it as the server's: ``data_to_send()`` then ``data_sent(n)``, and
  ``receive_data`` with what the server wrote (``b""`` when it hung up),
  until ``state`` is ``TRANSMISSION`` (``size_bytes``, ``transmission_flags``
  set) or ``CLOSED`` (``close_reason`` says why: the server's error reply
  and message, a broken reply, a hang-up).
- ``NbdReplyDecoder``: the simple replies in the transmission phase's bytes,
  however they are split across reads.  A simple reply does not say how much
  data follows it: the client knows, since it knows what it asked.  So each
  request is announced with ``expect(cookie, read_bytes)`` as it is sent
  (``read_bytes``: a READ's length, 0 for any other command), and ``feed``
  returns the ``NbdSimpleReply`` objects it completed, in order; a READ that
  succeeded carries its data, a ``memoryview`` of what was fed when it came
  in one ``feed`` (no copy), else of one buffer that the reads fill.  A
  reply whose cookie was not announced (or was answered already), a
  structured reply chunk, a bad magic: the stream cannot be trusted past
  them, so the decoder stops (``error`` says why) and returns nothing more.
  Views alias what was fed: feed objects that are not written to again while
  their replies live (``socket.recv`` returns a new one each time).
- ``parse_nbd_uri``: an NBD URI (the NBD project's URI specification, as
  ``qemu-img``, ``nbdinfo`` and the launcher's READY line write them):
  ``nbd+unix:///NAME?socket=PATH`` or ``nbd://HOST[:PORT]/NAME``.

Every read is bounded: the handshake holds at most one option reply, and
refuses one longer than a name and its header (NBD_MAX_STRING_SIZE + 64
bytes); the decoder holds at most 15 bytes of a header and the data of one
READ, which is what its owner asked for.  Nothing the server sends makes a
method raise.  Not thread-safe: one thread drives each object.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import NamedTuple
from urllib.parse import SplitResult, unquote, urlsplit

from .._errors import LocalProtocolError, RemoteProtocolError, StateError
from . import _constants
from ._constants import (
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_INFO_EXPORT,
    NBD_INIT_MAGIC,
    NBD_MAX_STRING_SIZE,
    NBD_OPT_GO,
    NBD_OPTS_MAGIC,
    NBD_REP_ACK,
    NBD_REP_FLAG_ERROR,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_SIMPLE_REPLY_SIZE,
    NBD_STRUCTURED_REPLY_MAGIC,
)
from ._framing import FrameDecoder

__all__ = ["NBD_DEFAULT_PORT", "NbdClientHandshake", "NbdClientState", "NbdReplyDecoder", "NbdSimpleReply",
           "NbdUri", "parse_nbd_uri"]

#: The TCP port an ``nbd://`` URI without one means (IANA's for NBD).
NBD_DEFAULT_PORT = 10809
#: The longest option reply taken: a name or a message, and the fields around it.
MAX_OPTION_REPLY_BYTES = NBD_MAX_STRING_SIZE + 64

_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OLDSTYLE_MAGIC = 0x00420281861253
assert _SIMPLE_REPLY.size == NBD_SIMPLE_REPLY_SIZE


class NbdClientState(Enum):
    #: Waiting for the greeting or for the replies to NBD_OPT_GO.
    NEGOTIATING = "negotiating"
    #: NBD_OPT_GO was acknowledged: requests may be sent.
    TRANSMISSION = "transmission"
    #: The handshake failed (``close_reason``): close the connection.
    CLOSED = "closed"


class NbdClientHandshake:
    """The client's half of one handshake: NBD_OPT_GO for the export ``name``."""

    def __init__(self, name: str) -> None:
        raw = name.encode("utf-8", "surrogatepass")
        if len(raw) > NBD_MAX_STRING_SIZE or b"\0" in raw:
            raise LocalProtocolError(f"export name {name!r} is not a name NBD can carry "
                                     f"(at most {NBD_MAX_STRING_SIZE} bytes, no NUL)")
        self.name = name
        self.state = NbdClientState.NEGOTIATING
        #: Why the handshake failed, once it has.
        self.close_reason: str | None = None
        #: The export's size and transmission flags (NBD_FLAG_*), from NBD_INFO_EXPORT.
        self.size_bytes = -1
        self.transmission_flags = 0
        self._name = raw
        self._in = bytearray()
        self._out = bytearray()
        self._greeted = False

    # -- input -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Take bytes the server wrote; ``b""`` means it hung up."""
        if self.state is NbdClientState.TRANSMISSION:
            raise StateError("the NBD handshake is over: input belongs to the transmission phase")
        if self.state is NbdClientState.CLOSED:
            return
        if not data:
            self._close("the server closed the connection during the handshake")
            return
        self._in += data
        while self.state is NbdClientState.NEGOTIATING and self._step():
            pass

    @property
    def unused_data(self) -> bytes:
        """Input past the final NBD_REP_ACK (a server has no reason to send any)."""
        return bytes(self._in) if self.state is NbdClientState.TRANSMISSION else b""

    def _step(self) -> bool:
        """Parse one greeting or option reply if it is all here; whether one was."""
        if not self._greeted:
            if len(self._in) < _GREETING.size:
                if len(self._in) >= 8 and int.from_bytes(self._in[:8], "big") != NBD_INIT_MAGIC:
                    self._close("not an NBD server (bad greeting magic)")
                return False
            init, opts, flags = _GREETING.unpack_from(self._in)
            del self._in[:_GREETING.size]
            if init != NBD_INIT_MAGIC:
                self._close("not an NBD server (bad greeting magic)")
            elif opts == _OLDSTYLE_MAGIC:
                self._close("the server speaks the oldstyle handshake, which is not supported")
            elif opts != NBD_OPTS_MAGIC:
                self._close(f"bad greeting: 0x{opts:x} where the newstyle magic belongs")
            elif not flags & NBD_FLAG_FIXED_NEWSTYLE:
                self._close("the server does not speak the fixed newstyle handshake")
            else:
                self._greeted = True
                client_flags = NBD_FLAG_C_FIXED_NEWSTYLE
                if flags & NBD_FLAG_NO_ZEROES:
                    client_flags |= NBD_FLAG_C_NO_ZEROES
                go = _U32.pack(len(self._name)) + self._name + _U16.pack(0)  # no information requests
                self._out += _U32.pack(client_flags) + _OPTION.pack(NBD_OPTS_MAGIC, NBD_OPT_GO, len(go)) + go
            return True
        if len(self._in) < _OPTION_REPLY.size:
            return False
        magic, option, reply_type, length = _OPTION_REPLY.unpack_from(self._in)
        if magic != NBD_REP_MAGIC:
            self._close(f"bad option reply magic 0x{magic:x}")
            return False
        if option != NBD_OPT_GO:
            self._close(f"a reply to option {option}, where NBD_OPT_GO's was expected")
            return False
        if length > MAX_OPTION_REPLY_BYTES:
            self._close(f"an option reply of {length} bytes (at most {MAX_OPTION_REPLY_BYTES} are taken)")
            return False
        if len(self._in) < _OPTION_REPLY.size + length:
            return False
        payload = bytes(self._in[_OPTION_REPLY.size:_OPTION_REPLY.size + length])
        del self._in[:_OPTION_REPLY.size + length]
        if reply_type & NBD_REP_FLAG_ERROR:
            message = payload.decode("utf-8", "replace")
            self._close(f"export {self.name!r}: {_rep_error_name(reply_type)}"
                        + (f": {message}" if message else ""))
        elif reply_type == NBD_REP_INFO:
            if len(payload) < 2:
                self._close("an NBD_REP_INFO reply without its information type")
            elif _U16.unpack_from(payload)[0] == NBD_INFO_EXPORT:
                if len(payload) != _INFO_EXPORT.size:
                    self._close(f"an NBD_INFO_EXPORT of {len(payload)} bytes (12 expected)")
                else:
                    _, self.size_bytes, self.transmission_flags = _INFO_EXPORT.unpack(payload)
            # Other information (name, description, block sizes) is not needed here.
        elif reply_type == NBD_REP_ACK:
            if length:
                self._close("an NBD_REP_ACK with data")
            elif self.size_bytes < 0:
                self._close("NBD_OPT_GO was acknowledged without NBD_INFO_EXPORT")
            else:
                self.state = NbdClientState.TRANSMISSION
        else:
            self._close(f"reply type {reply_type} to NBD_OPT_GO")
        return True

    def _close(self, reason: str) -> None:
        self.state = NbdClientState.CLOSED
        self.close_reason = reason
        self._in.clear()

    # -- output ----------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Unsent output, kept until ``data_sent`` says it went out."""
        return bytes(self._out)

    def data_sent(self, nbytes: int) -> None:
        """The first ``nbytes`` of the unsent output went out."""
        if not 0 <= nbytes <= len(self._out):
            raise LocalProtocolError(f"{nbytes} bytes sent, but {len(self._out)} were waiting")
        del self._out[:nbytes]


_REP_ERROR_NAMES = {value: name for name, value in vars(_constants).items()
                    if name.startswith("NBD_REP_ERR_")}


def _rep_error_name(reply_type: int) -> str:
    """An error reply's name, as the constants give it."""
    return _REP_ERROR_NAMES.get(reply_type, f"error reply 0x{reply_type:x}")


# -- transmission replies -----------------------------------------------------------------------


class NbdSimpleReply(NamedTuple):
    """A simple reply: the request's cookie, its NBD error (0: success; the values
    are Linux's errno numbers), and a successful READ's data (else None)."""

    cookie: int
    error: int
    data: memoryview | None = None


class NbdReplyDecoder(FrameDecoder[NbdSimpleReply]):
    """Finds the simple replies in the transmission phase's bytes of one connection."""

    HEADER_SIZE = NBD_SIMPLE_REPLY_SIZE

    def __init__(self) -> None:
        super().__init__()
        #: Why the stream cannot go on (a reply nobody asked for, a bad magic), once it cannot.
        self.error: RemoteProtocolError | None = None
        self._expected: dict[int, int] = {}  # cookie -> data bytes its successful reply carries

    def expect(self, cookie: int, read_bytes: int = 0) -> None:
        """A request with ``cookie`` was sent; its reply carries ``read_bytes``
        of data when it succeeds (a READ's length; 0 for other commands)."""
        if cookie in self._expected:
            raise StateError(f"cookie {cookie} is in flight already")
        if read_bytes < 0:
            raise LocalProtocolError(f"a read of {read_bytes} bytes")
        self._expected[cookie] = read_bytes

    @property
    def in_flight(self) -> int:
        """Requests announced and not answered yet."""
        return len(self._expected)

    def feed(self, data: bytes | bytearray | memoryview) -> list[NbdSimpleReply]:
        """The replies completed by ``data``, in order (none once ``error`` is set)."""
        out: list[NbdSimpleReply] = []
        if self.error is not None:
            return out
        view = memoryview(data).cast("B")
        end = len(view)
        pos = self._resume(view, out)
        if pos < 0:
            return out
        while self.error is None and self._pending is None and end - pos >= NBD_SIMPLE_REPLY_SIZE:
            pos = self._frame(view, pos, view, pos + NBD_SIMPLE_REPLY_SIZE, out)
        self._keep_tail(view, pos)
        return out

    def _stopped(self) -> bool:
        return self.error is not None

    def _with_payload(self, frame: NbdSimpleReply, payload: memoryview) -> NbdSimpleReply:
        return frame._replace(data=payload)

    def _frame(self, header: bytes | memoryview, at: int, view: memoryview, pos: int,
               out: list[NbdSimpleReply]) -> int:
        """The reply whose header is at ``header[at:]`` and whose data, if any,
        starts at ``view[pos:]``; where the next one starts."""
        magic, error, cookie = _SIMPLE_REPLY.unpack_from(header, at)
        if magic != NBD_SIMPLE_REPLY_MAGIC:
            if magic == NBD_STRUCTURED_REPLY_MAGIC:
                self.error = RemoteProtocolError("a structured reply chunk, but structured replies were "
                                                 "not negotiated")
            else:
                self.error = RemoteProtocolError(f"bad reply magic 0x{magic:x}")
            return pos
        read_bytes = self._expected.pop(cookie, None)
        if read_bytes is None:
            self.error = RemoteProtocolError(f"a reply to cookie {cookie}, which no request in flight has")
            return pos
        if error or not read_bytes:
            out.append(NbdSimpleReply(cookie, error))
            return pos
        if len(view) - pos >= read_bytes:  # all its data is here: no copy
            out.append(NbdSimpleReply(cookie, 0, view[pos:pos + read_bytes]))
            return pos + read_bytes
        return pos + self._collect(NbdSimpleReply(cookie, 0), read_bytes, True, view[pos:], out)


# -- URIs ------------------------------------------------------------------------------------


class NbdUri(NamedTuple):
    """Where an export is: its name, and a Unix socket's path or a TCP host and port."""

    name: str
    socket_path: str | None = None
    host: str = ""
    port: int = NBD_DEFAULT_PORT


def parse_nbd_uri(uri: str) -> NbdUri:
    """An NBD URI: ``nbd+unix:///NAME?socket=PATH`` or ``nbd://HOST[:PORT]/NAME``
    (the name percent-encoded; ``[HOST]`` for an IPv6 address).  ``ValueError``
    saying what is wrong for anything else (TLS, vsock, a missing socket ...)."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{uri!r} is not an NBD URI: {exc}") from None
    if parts.fragment:
        raise ValueError(f"{uri!r}: an NBD URI has no fragment")
    if parts.path and not parts.path.startswith("/"):
        raise ValueError(f"{uri!r}: the export name must follow a '/'")
    try:
        name = unquote(parts.path[1:], errors="strict") if parts.path else ""
        query = _query(uri, parts)
    except UnicodeDecodeError:
        raise ValueError(f"{uri!r}: a percent-encoded part is not UTF-8") from None
    if parts.scheme == "nbd+unix":
        if parts.netloc:
            raise ValueError(f"{uri!r}: an nbd+unix URI names no host (nbd+unix:///NAME?socket=PATH)")
        if set(query) != {"socket"}:
            raise ValueError(f"{uri!r}: an nbd+unix URI takes one query parameter, socket=PATH")
        return NbdUri(name, socket_path=query["socket"])
    if parts.scheme in ("nbd", "nbd+tcp"):
        if query:
            raise ValueError(f"{uri!r}: query parameters {', '.join(sorted(query))} are not supported")
        if not parts.hostname:
            raise ValueError(f"{uri!r}: an nbd URI names its host (nbd://HOST[:PORT]/NAME)")
        return NbdUri(name, host=parts.hostname, port=NBD_DEFAULT_PORT if port is None else port)
    if parts.scheme.startswith("nbds"):
        raise ValueError(f"{uri!r}: NBD over TLS is not supported")
    raise ValueError(f"{uri!r} is not an NBD URI (nbd+unix:///NAME?socket=PATH or nbd://HOST[:PORT]/NAME)")


def _query(uri: str, parts: SplitResult) -> dict[str, str]:
    """The URI's query parameters (KEY=VALUE joined by '&', percent-encoded; a
    '+' is a '+'), each given once."""
    values: dict[str, str] = {}
    for item in parts.query.split("&") if parts.query else ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{uri!r}: query parameter {key!r} has no value")
        key, value = unquote(key, errors="strict"), unquote(value, errors="strict")
        if key in values:
            raise ValueError(f"{uri!r}: query parameter {key} given twice")
        values[key] = value
    return values
