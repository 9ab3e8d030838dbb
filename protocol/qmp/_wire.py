"""QMP's wire format, sans I/O: a streaming JSON decoder and the reply shapes.

Clients write JSON objects with no delimiter (``qemu.qmp`` sends no newline),
several per read or split across reads.  ``QmpDecoder.feed(data)`` returns the
complete inputs found so far, each a ``dict`` or a ``QmpInputError`` saying what
was wrong with it (the reply QEMU would give).  It finds message boundaries by
tracking brackets outside strings, as QEMU's json-streamer does, then parses
each message with ``json``.  An ASCII control character outside a string
(other than whitespace) is a lexical error that resets the parser: clients
send one to resynchronise.  So is a control character or a byte 0xFE/0xFF
inside a string, as in QEMU's lexer: "JSON parse error, stray '...'" with
the string so far, and the parser starts afresh after it (the session is
never left waiting for a closing quote that will not come).  Input is bounded: a message larger than
``max_message_bytes`` is an error, and the session should be closed.

Replies are one JSON object per line, CRLF-terminated, ASCII only.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["QmpDecoder", "QmpInputError", "qmp_error", "qmp_event", "qmp_line", "qmp_return"]

_WS = b" \t\r\n"
MAX_NESTING = 1024


@dataclass(frozen=True)
class QmpInputError:
    """One bad input: the error reply's desc; ``fatal`` when the session should close."""

    desc: str
    fatal: bool = False


class QmpDecoder:
    def __init__(self, max_message_bytes: int = 1 << 20) -> None:
        self.max_message_bytes = max_message_bytes
        self._buf = bytearray()
        self._pos = 0  # scan position in _buf
        self._start = -1  # start of the current message, or -1
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._string_start = 0  # where the string being scanned began

    def feed(self, data: bytes) -> list[dict[str, Any] | QmpInputError]:
        out: list[dict[str, Any] | QmpInputError] = []
        self._buf += data
        buf = self._buf
        i = self._pos
        n = len(buf)
        while i < n:
            c = buf[i]
            if self._start < 0:  # between messages
                if c in _WS:
                    i += 1
                    continue
                if c in b"{[":
                    self._start, self._depth = i, 1
                    i += 1
                    continue
                if c < 0x20 or c >= 0xFE:
                    out.append(QmpInputError("JSON parse error, invalid character (parser reset)"))
                    i += 1
                    continue
                # A scalar at top level: read it whole (a string up to its
                # closing quote: a bracket inside it is no message), refuse it.
                j, bad = _string_end(buf, i + 1, n) if c == 0x22 else (_word_end(buf, i, n), False)
                if j - i > self.max_message_bytes:
                    return self._too_large(out)
                if bad:
                    out.append(_stray(buf[i:j]))
                    i = j
                    continue
                if j == n:
                    break  # it may go on in the next read (rescanned from its start: bounded above)
                out.append(QmpInputError("QMP input must be a JSON object"))
                i = j
                continue
            if self._in_string:
                if self._escape and not _bad_in_string(c):  # an escaped byte: any but those refused anywhere
                    self._escape = False
                elif c == 0x5C:  # backslash
                    self._escape = True
                elif c == 0x22:
                    self._in_string = False
                elif _bad_in_string(c):
                    out.append(_stray(buf[self._string_start:i + 1]))
                    self._reset()
                i += 1
                continue
            if c == 0x22:
                self._in_string = True
                self._string_start = i
            elif c in b"{[":
                self._depth += 1
                if self._depth > MAX_NESTING:
                    out.append(QmpInputError("JSON parse error, nesting too deep"))
                    self._reset()
                    i += 1
                    continue
            elif c in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    if i + 1 - self._start > self.max_message_bytes:  # complete, but too large all the same
                        return self._too_large(out)
                    out.append(self._parse(bytes(buf[self._start:i + 1])))
                    self._start = -1
            elif c < 0x20 and c not in _WS or c >= 0xFE:
                out.append(QmpInputError("JSON parse error, invalid character (parser reset)"))
                self._reset()
            i += 1
        if self._start >= 0 and i - self._start > self.max_message_bytes:
            return self._too_large(out)
        # Keep only what is still needed.
        keep = self._start if self._start >= 0 else i
        del buf[:keep]
        if self._start >= 0:
            self._start = 0
        self._pos = i - keep
        return out

    def _too_large(self, out: list[dict[str, Any] | QmpInputError]) -> list[dict[str, Any] | QmpInputError]:
        """A message past the size bound: a fatal error, and all input dropped."""
        out.append(QmpInputError(f"JSON parse error, input larger than {self.max_message_bytes} bytes", fatal=True))
        self._reset()
        del self._buf[:]
        self._pos = 0
        return out

    def _reset(self) -> None:
        self._start = -1
        self._depth = 0
        self._in_string = False
        self._escape = False

    @staticmethod
    def _parse(raw: bytes) -> dict[str, Any] | QmpInputError:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return QmpInputError("JSON parse error, invalid UTF-8 sequence in string")
        try:
            obj = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        except (ValueError, RecursionError) as exc:
            return QmpInputError(f"JSON parse error, {exc}")
        if not isinstance(obj, dict):
            return QmpInputError("QMP input must be a JSON object")
        return obj


def _refuse_constant(name: str) -> Any:
    """NaN and the infinities are not JSON (Python's parser takes them; QEMU's does not)."""
    raise ValueError(f"invalid keyword '{name}'")


def _finite_float(text: str) -> float:
    """A number too large for a double would be an infinity, not JSON once echoed back."""
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def _bad_in_string(c: int) -> bool:
    """A byte QEMU's lexer refuses inside a string: a control character, 0xFE or 0xFF."""
    return c < 0x20 or c >= 0xFE


def _string_end(buf: bytearray, i: int, n: int) -> tuple[int, bool]:
    """Scan the string whose body starts at ``i``: ``(end, bad)``, with ``end``
    just past its closing quote, or past a byte it may not hold (``bad``), or ``n``."""
    while i < n:
        c = buf[i]
        if c == 0x5C and i + 1 < n and not _bad_in_string(buf[i + 1]):  # backslash: the next byte is escaped
            i += 2
            continue
        if c == 0x5C and i + 1 == n:
            return n, False  # what follows it comes in the next read
        i += 1
        if c == 0x22:
            return i, False
        if _bad_in_string(c):
            return i, True
    return min(i, n), False


STRAY_SHOWN_CHARS = 64


def _stray(token: bytes | bytearray) -> QmpInputError:
    """QEMU's error for a token its lexer refuses, the token shown as QEMU shows it (bounded)."""
    shown = "".join(chr(b) if 0x20 <= b < 0x7F else f"\\u{b:04X}" for b in token[-STRAY_SHOWN_CHARS:])
    return QmpInputError(f"JSON parse error, stray '{'...' if len(token) > STRAY_SHOWN_CHARS else ''}{shown}'")


def _word_end(buf: bytearray, i: int, n: int) -> int:
    """The end of a bare token (a number, a keyword) at ``i``."""
    while i < n and buf[i] not in _WS and buf[i] not in b'{["':
        i += 1
    return i


def qmp_line(obj: dict[str, Any]) -> bytes:
    """One reply or event on the wire: ASCII JSON and CRLF."""
    return json.dumps(obj, ensure_ascii=True, separators=(", ", ": ")).encode() + b"\r\n"


def _with_id(obj: dict[str, Any], has_id: bool, ident: Any) -> dict[str, Any]:
    if has_id:
        obj["id"] = ident
    return obj


def qmp_return(value: Any, has_id: bool = False, ident: Any = None) -> dict[str, Any]:
    return _with_id({"return": value}, has_id, ident)


def qmp_error(error_class: str, desc: str, has_id: bool = False, ident: Any = None) -> dict[str, Any]:
    return _with_id({"error": {"class": error_class, "desc": desc}}, has_id, ident)


def qmp_event(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    now = time.time_ns()
    event: dict[str, Any] = {"event": name,
                             "timestamp": {"seconds": now // 10**9, "microseconds": now // 1000 % 10**6}}
    if data is not None:
        event["data"] = data
    return event
