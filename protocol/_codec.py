"""The wire envelope: messages to ZeroMQ frames and back, under strict limits.

A message is a list of frames: first a msgpack header, then zero or one raw
payload frame::

    frame 0: msgpack([version, kind, {field: value, ...}])
    frame 1: the payload (a block's data), only for kinds that carry one

Several messages may share one ZeroMQ message (a *batch*: what a channel
sends when messages queued up together), one header for all and the
payloads after it, in order::

    frame 0: msgpack([version, [[kind, {...}], [kind, {...}], ...]])
    frames 1..: the payloads of the items that carry one

A batch costs one header frame and one msgpack call on each side instead of
one per message: batching is the throughput lever of a channel.

Decoding trusts nothing.  Sizes are checked before msgpack sees a byte, the
unpacker runs with limits on every container and string, and the result is
checked against the message's dataclass: known kind, supported version, no
unknown or missing fields, exact field types.  Anything wrong raises
``RemoteProtocolError`` saying what, and nothing else escapes: a loop that
reads peers' frames catches one exception class.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, Union

import msgpack

from ._errors import LocalProtocolError, RemoteProtocolError
from ._messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message

__all__ = ["Limits", "decode", "decode_batch", "encode", "encode_batch", "pack"]


@dataclass(frozen=True, slots=True)
class Limits:
    """What a peer may send.  The defaults suit the control and data planes."""

    max_header_bytes: int = 64 * 1024
    max_payload_bytes: int = 64 * 1024 * 1024
    max_str_len: int = 4096
    max_container_len: int = 256


DEFAULT_LIMITS = Limits()


def pack(msg: Message) -> tuple[bytes, bytes | None]:
    """``msg`` as a packed batch item, msgpack ``[kind, fields]``, and its
    payload (None for kinds without one).  Raises ``LocalProtocolError`` for a
    message the other side could not decode (e.g. a non-encodable value)."""
    cls = type(msg)
    kind = cls.KIND
    if MESSAGE_TYPES.get(kind) is not cls:
        raise LocalProtocolError(f"{cls.__name__} is not a registered message type")
    payload_name = cls.PAYLOAD
    names = _ENCODE_NAMES.get(cls)
    if names is None:
        names = _ENCODE_NAMES[cls] = tuple(f.name for f in fields(msg) if f.name != payload_name)
    body = {name: getattr(msg, name) for name in names}
    try:
        item = _packb([kind, body], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {kind}: {exc}") from exc
    return item, None if payload_name is None else bytes(getattr(msg, payload_name))


_ENCODE_NAMES: dict[type, tuple[str, ...]] = {}
_packb = msgpack.packb
_VERSION = msgpack.packb(PROTOCOL_VERSION)
_ITEM = 0x92  # a packed item starts with msgpack's fixarray(2) byte


def encode(msg: Message) -> list[bytes]:
    """The frames for ``msg`` alone: ``[version, kind, fields]`` and its payload."""
    return encode_batch([pack(msg)])


def encode_batch(items: Sequence[tuple[bytes, bytes | None]]) -> list[bytes]:
    """The frames of one ZeroMQ message carrying the packed ``items``
    (at least one; at most ``max_container_len`` for the receiver to accept):
    ``[version, kind, fields]`` for one, ``[version, [[kind, fields], ...]]``
    for several, then their payloads in order."""
    if len(items) == 1:
        item, payload = items[0]
        header = b"\x93" + _VERSION + item[1:]  # [version, kind, fields]
        return [header] if payload is None else [header, payload]
    n = len(items)
    count = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    frames = [b"\x92" + _VERSION + count + b"".join([i for i, _ in items])]
    frames += [p for _, p in items if p is not None]
    return frames


def decode(frames: Sequence[bytes | memoryview], limits: Limits = DEFAULT_LIMITS) -> Message:
    """The one message in ``frames``; ``RemoteProtocolError`` if anything is off."""
    results = decode_batch(frames, limits)
    if len(results) != 1:
        raise RemoteProtocolError(f"expected one message, got a batch of {len(results)}")
    result = results[0]
    if isinstance(result, RemoteProtocolError):
        raise result
    return result


def decode_batch(frames: Sequence[bytes | memoryview],
                 limits: Limits = DEFAULT_LIMITS) -> list[Message | RemoteProtocolError]:
    """The messages of one ZeroMQ message, in order, each decoded or the
    ``RemoteProtocolError`` saying what is wrong with it.  An item whose frames
    cannot be told apart (an unknown kind, a malformed item, payload frames
    missing or left over) ends the list with its error.  A header that is not
    an envelope at all raises ``RemoteProtocolError``."""
    if not frames:
        raise RemoteProtocolError("empty message: no header frame")
    header = frames[0]
    if len(header) > limits.max_header_bytes:
        raise RemoteProtocolError(
            f"header frame of {len(header)} bytes exceeds the limit of {limits.max_header_bytes}"
        )
    try:
        obj = msgpack.unpackb(
            header, raw=False, strict_map_key=True, use_list=True,
            max_str_len=limits.max_str_len, max_bin_len=limits.max_str_len,
            max_array_len=limits.max_container_len, max_map_len=limits.max_container_len,
            max_ext_len=0, ext_hook=_reject_ext,
        )
    except RemoteProtocolError:
        raise
    except Exception as exc:  # msgpack raises many kinds: all mean "garbage"
        raise RemoteProtocolError(f"undecodable header: {type(exc).__name__}: {exc}",
                                  raw=bytes(header[:64])) from None
    if not isinstance(obj, list) or len(obj) not in (2, 3):
        raise RemoteProtocolError("header must be [version, kind, fields] or [version, [[kind, fields], ...]]",
                                  raw=bytes(header[:64]))
    version = obj[0]
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise RemoteProtocolError(f"unsupported protocol version {version!r} (we speak {PROTOCOL_VERSION})")
    if len(obj) == 3:
        return [_decode_one(obj[1], obj[2], frames, limits)]
    items = obj[1]
    if not isinstance(items, list) or not items:
        raise RemoteProtocolError("a batch must be a non-empty list of [kind, fields]", raw=bytes(header[:64]))
    results: list[Message | RemoteProtocolError] = []
    at = 1  # the next payload frame
    for item in items:
        if not isinstance(item, list) or len(item) != 2:
            results.append(RemoteProtocolError(f"batch item {len(results)} is not [kind, fields]"))
            return results
        kind, body = item
        cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
        if cls is None:
            results.append(RemoteProtocolError(f"unknown message kind {kind!r}"))
            return results
        if cls.PAYLOAD is None:
            own: Sequence[bytes | memoryview] = frames[:1]
        elif at < len(frames):
            own, at = (frames[0], frames[at]), at + 1
        else:
            results.append(RemoteProtocolError(f"{kind}: its payload frame is missing"))
            return results
        results.append(_decode_one(kind, body, own, limits))
    if at != len(frames):
        results.append(RemoteProtocolError(f"{len(frames) - at} frame(s) left over after the batch"))
    return results


def _decode_one(kind: object, body: object, frames: Sequence[bytes | memoryview],
                limits: Limits) -> Message | RemoteProtocolError:
    """One message from its ``[kind, fields]`` and its frames (header first)."""
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None or not isinstance(kind, str):
        return RemoteProtocolError(f"unknown message kind {kind!r}")
    if not isinstance(body, dict):
        return RemoteProtocolError(f"{kind}: fields must be a map, not {type(body).__name__}")
    payload_name = cls.PAYLOAD
    expected_frames = 1 if payload_name is None else 2
    if len(frames) != expected_frames:
        return RemoteProtocolError(f"{kind}: expected {expected_frames} frame(s), got {len(frames)}")
    try:
        kwargs = _check_fields(cls, kind, body, payload_name)
    except RemoteProtocolError as exc:
        return exc
    if payload_name is not None:
        payload = frames[1]
        if len(payload) > limits.max_payload_bytes:
            return RemoteProtocolError(
                f"{kind}: payload of {len(payload)} bytes exceeds the limit of {limits.max_payload_bytes}"
            )
        kwargs[payload_name] = bytes(payload)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        return RemoteProtocolError(f"{kind}: {exc}")


def _reject_ext(code: int, data: bytes) -> object:
    raise RemoteProtocolError(f"msgpack extension type {code} is not allowed")


def _check_fields(cls: type[Message], kind: str, body: dict[str, Any],
                  payload_name: str | None) -> dict[str, Any]:
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = _make_plan(cls, payload_name)
    known, required, checks = plan
    if not known.issuperset(body):
        unknown = sorted(set(body) - known)
        raise RemoteProtocolError(f"{kind}: unknown field(s) {', '.join(map(repr, unknown))}")
    for name in required:
        if name not in body:
            raise RemoteProtocolError(f"{kind}: missing field {name!r}")
    kwargs: dict[str, Any] = {}
    for name, value in body.items():
        check, to_tuple = checks[name]
        if not check(value):
            raise RemoteProtocolError(
                f"{kind}: field {name!r} has type {type(value).__name__}, "
                f"expected {_type_name(_hints(cls)[name])}"
            )
        kwargs[name] = tuple(value) if to_tuple else value
    return kwargs


_PLANS: dict[type, tuple[frozenset[str], tuple[str, ...], dict[str, tuple[Any, bool]]]] = {}


def _make_plan(cls: type[Message], payload_name: str | None) -> tuple[
        frozenset[str], tuple[str, ...], dict[str, tuple[Any, bool]]]:
    hints = _hints(cls)
    known = {f.name: f for f in fields(cls) if f.name != payload_name}
    required = tuple(n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING)
    checks = {n: (_checker(hints[n]), typing.get_origin(hints[n]) is tuple) for n in known}
    return frozenset(known), required, checks


def _checker(tp: Any) -> Any:
    """A function value -> bool equivalent to ``_matches(value, tp)``, built once."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        subs = [_checker(a) for a in typing.get_args(tp)]
        exact = [a for a in typing.get_args(tp) if a in (int, str, bool, bytes, type(None))]
        if len(exact) == len(subs):
            allowed = frozenset(exact)
            return lambda v: type(v) in allowed
        return lambda v: any(c(v) for c in subs)
    if tp is type(None):
        return lambda v: v is None
    if tp is float:
        return lambda v: type(v) is float or type(v) is int
    if tp in (int, str, bool, bytes):
        return lambda v: type(v) is tp
    if origin is tuple:
        item = _checker(typing.get_args(tp)[0])
        return lambda v: isinstance(v, list) and all(map(item, v))
    if origin is dict:
        key_t, val_t = typing.get_args(tp)
        if key_t is str and val_t is int:
            return lambda v: isinstance(v, dict) and all(
                type(k) is str and type(x) is int for k, x in v.items())
        kc, vc = _checker(key_t), _checker(val_t)
        return lambda v: isinstance(v, dict) and all(kc(k) and vc(x) for k, x in v.items())
    return lambda v: False


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type[Message]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _matches(value: object, tp: Any) -> bool:
    """Whether a decoded msgpack value fits the annotation ``tp`` exactly."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is int:
        return type(value) is int
    if tp is float:
        return type(value) in (float, int)
    if tp in (str, bool, bytes):
        return type(value) is tp
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key_t, val_t = typing.get_args(tp)
        return isinstance(value, dict) and all(
            _matches(k, key_t) and _matches(v, val_t) for k, v in value.items()
        )
    return False


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
