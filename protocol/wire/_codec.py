"""The wire envelope: messages to ZeroMQ frames and back, under strict limits.

A message is a list of frames: first a msgpack header, then zero or one raw
payload frame::

    frame 0: msgpack([version, kind, [field value, ...]])
    frame 1: the payload (a block's data), only for kinds that carry one,
             and only when it is not empty (a read request sends one frame)

Several messages may share one ZeroMQ message (a *batch*: what a channel
sends when messages queued up together), one header for all and their
payloads end to end in one frame after it::

    frame 0: msgpack([version, [[kind, [...]], [kind, [...]], ...], [size, ...]])
    frame 1: the payloads of the items whose kind carries one, in order
             (sizes in the header); absent when no item's kind has one

A batch costs two frames and one msgpack call on each side instead of a few
per message: batching is the throughput lever of a channel.

Decoding trusts nothing.  Sizes are checked before msgpack sees a byte, the
unpacker runs with limits on every container and string, and the result is
checked against the message's dataclass: known kind, supported version,
every field (in the dataclass's order, the payload field apart) and nothing
more, exact field types.  Fields travel as a list rather than a map: no key
strings to pack, unpack and match, which is most of a small message's cost.  Anything wrong raises
``RemoteProtocolError`` saying what, and nothing else escapes: a loop that
reads peers' frames catches one exception class.

A refused message whose kind names its request (a first field
``request_id``) and whose id can still be read is a ``BadRequestError``
carrying that id, even when the rest of the header is garbage (an over-long
string, a truncated frame): its receiver answers it with an error instead of
leaving the sender waiting for ever.  A plain ``RemoteProtocolError`` means
no id could be read.
"""

from __future__ import annotations

import threading
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, Union, cast

import msgpack

from .._errors import BadRequestError, LocalProtocolError, RemoteProtocolError
from ._messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message

__all__ = [
    "BatchBudget",
    "Limits",
    "Packed",
    "batch_budget",
    "batch_length",
    "check_sendable",
    "decode",
    "decode_batch",
    "encode",
    "encode_batch",
    "max_frame_bytes",
    "pack",
]


@dataclass(frozen=True, slots=True)
class Limits:
    """What a peer may send.  The defaults suit the control and data planes."""

    max_header_bytes: int = 64 * 1024
    max_payload_bytes: int = 64 * 1024 * 1024
    max_str_len: int = 4096
    max_container_len: int = 256


DEFAULT_LIMITS = Limits()
Packed = tuple[bytes, bytes | None]  # a message as ``pack`` gives it: its batch item and its payload


def max_frame_bytes(limits: Limits) -> int:
    """The largest frame a sender keeping to ``limits`` ever sends: a batch's
    header or its payload frame.  A receiver may refuse larger ones outright."""
    return max(limits.max_header_bytes, limits.max_payload_bytes)


@dataclass(frozen=True, slots=True)
class BatchBudget:
    """What one batch may carry for a receiver with given limits (the
    sender's own, assumed to be the peer's): see ``batch_budget``."""

    max_items: int
    max_items_bytes: int
    """The packed items' bytes in all: the header less its envelope and the payload sizes."""
    max_payload_bytes: int
    """The payloads' bytes in all (one frame)."""
    unchecked_item_bytes: int
    """An item no longer than this cannot break a limit: no need to check it alone."""


def batch_budget(limits: Limits) -> BatchBudget:
    """The budget of a batch under ``limits``."""
    # The header holds the items, then one payload size per item at most:
    # 5 bytes each (a uint32), 9 if a payload may reach 4 GiB; 16 bytes of
    # envelope (the version, two array headers).
    size_bytes = 5 if limits.max_payload_bytes < 1 << 32 else 9
    # A string over max_str_len takes more bytes than that, and so does a
    # container of more than max_container_len elements, with the item's own
    # envelope around it.
    return BatchBudget(
        max_items=limits.max_container_len,
        max_items_bytes=limits.max_header_bytes - size_bytes * limits.max_container_len - 16,
        max_payload_bytes=limits.max_payload_bytes,
        unchecked_item_bytes=min(limits.max_str_len + 3, limits.max_container_len + 7,
                                 limits.max_header_bytes - 1),
    )


def batch_length(queue: Iterable[Packed], budget: BatchBudget) -> int:
    """How many of the first packed messages of ``queue`` go in one batch
    (at least one, if there is one: a message alone was checked when it was
    queued)."""
    n = items_bytes = payload_bytes = 0
    for item, payload in queue:
        items_bytes += len(item)
        if payload is not None:
            payload_bytes += len(payload)
        if n and (n == budget.max_items or items_bytes > budget.max_items_bytes
                  or payload_bytes > budget.max_payload_bytes):
            break
        n += 1
    return n


def check_sendable(kind: str, item: bytes, payload: bytes | None, limits: Limits) -> None:
    """``LocalProtocolError`` if a receiver with ``limits`` would refuse this
    packed message (it could not even say which request to fail: the
    requester would wait for ever)."""
    if payload is not None and len(payload) > limits.max_payload_bytes:
        raise LocalProtocolError(f"{kind}: a payload of {len(payload)} bytes exceeds the limit "
                                 f"of {limits.max_payload_bytes}")
    try:
        decode(encode_batch([(item, None)])[:1], limits)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"{kind} would be refused by the peer: {exc}") from None


def pack(msg: Message) -> Packed:
    """``msg`` as a packed batch item, msgpack ``[kind, [fields]]``, and its
    payload (None for kinds without one).  Raises ``LocalProtocolError`` for a
    message the other side could not decode (e.g. a non-encodable value)."""
    cls = type(msg)
    plan = _PLANS.get(cls) or _plan(cls)
    try:
        item = _packer().pack((plan.kind, plan.values(msg)))
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {plan.kind}: {exc}") from exc
    return item, None if plan.payload is None else bytes(getattr(msg, plan.payload))


_local = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's Packer (reused: a Packer per call costs more than packing a small message)."""
    try:
        return _local.packer
    except AttributeError:
        _local.packer = msgpack.Packer(use_bin_type=True)
        return _local.packer


_VERSION = msgpack.packb(PROTOCOL_VERSION)


def encode(msg: Message) -> list[bytes]:
    """The frames for ``msg`` alone: ``[version, kind, [fields]]`` and its payload."""
    return encode_batch([pack(msg)])


def encode_batch(items: Sequence[Packed]) -> list[bytes]:
    """The frames of one ZeroMQ message carrying the packed ``items``
    (at least one; at most ``max_container_len`` for the receiver to accept).

    One item: ``[version, kind, [fields]]``, then its payload frame if its kind
    has one and it is not empty (no frame means an empty payload).  Several: ``[version, [[kind, [fields]], ...], [payload sizes]]``
    (a size for each item whose kind has a payload), then one frame with those
    payloads end to end, if there are any: a frame costs more than copying a
    few kilobytes."""
    if len(items) == 1:
        item, payload = items[0]
        header = b"\x93" + _VERSION + item[1:]  # an item starts with fixarray(2): make it 3
        return [header, payload] if payload else [header]  # an empty payload needs no frame
    payloads = [p for _, p in items if p is not None]
    header = b"\x93" + _VERSION + _array_header(len(items)) + b"".join([i for i, _ in items])
    header += _packer().pack([len(p) for p in payloads])
    return [header, b"".join(payloads)] if payloads else [header]


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    return b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big")


def decode(frames: Sequence[bytes | memoryview], limits: Limits = DEFAULT_LIMITS) -> Message:
    """The one message in ``frames``; ``RemoteProtocolError`` if anything is
    off (the first, if several messages were refused)."""
    results = decode_batch(frames, limits)
    for result in results:
        if isinstance(result, RemoteProtocolError):
            raise result
    if len(results) != 1:
        raise RemoteProtocolError(f"expected one message, got a batch of {len(results)}")
    return cast(Message, results[0])


def decode_batch(frames: Sequence[bytes | memoryview],
                 limits: Limits = DEFAULT_LIMITS) -> list[Message | RemoteProtocolError]:
    """The messages of one ZeroMQ message, in order, each decoded or the
    ``RemoteProtocolError`` saying what is wrong with it.  An item after which
    the payloads cannot be told apart (an unknown kind, a malformed item, a
    payload size missing or left over) ends the list with its error, followed
    by a ``BadRequestError`` for each later item whose request id can be read.
    A header that is not an envelope at all, or payload sizes that do not
    match the payload frame, refuse the whole message: a ``BadRequestError``
    for each message whose request id can still be read (and one more
    ``RemoteProtocolError`` for those whose id cannot), or, if there is none,
    ``RemoteProtocolError`` raised."""
    if not frames:
        raise RemoteProtocolError("empty message: no header frame")
    header = frames[0]
    if len(header) > limits.max_header_bytes:
        raise RemoteProtocolError(
            f"header frame of {len(header)} bytes exceeds the limit of {limits.max_header_bytes}"
        )
    try:
        obj = msgpack.unpackb(header, **_unpack_options(limits))
    except Exception as exc:  # msgpack raises many kinds: all mean "garbage"
        message = str(exc) if isinstance(exc, RemoteProtocolError) else \
            f"undecodable header: {type(exc).__name__}: {exc or 'not msgpack'}"
        refused = _salvage(header, limits, message)
        if refused:
            return refused
        raise RemoteProtocolError(message, raw=bytes(header[:64])) from None
    if not isinstance(obj, list) or len(obj) != 3:
        raise RemoteProtocolError("header must be [version, kind, fields] or [version, [[kind, fields], ...], sizes]",
                                  raw=bytes(header[:64]))
    version, kind, body = obj
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise RemoteProtocolError(f"unsupported protocol version {version!r} (we speak {PROTOCOL_VERSION})")
    if type(kind) is list:
        return _decode_items(kind, body, frames, limits, header)
    cls = _kind_class(kind)
    if cls is None:
        raise RemoteProtocolError(f"unknown message kind {kind!r}")
    if cls.PAYLOAD is None:
        if len(frames) != 1:
            return [_refusal(kind, body, f"{kind}: expected 1 frame, got {len(frames)}")]
        return [_decode_one(cls, body, None, limits)]
    if len(frames) > 2:
        return [_refusal(kind, body, f"{kind}: expected 1 or 2 frames, got {len(frames)}")]
    return [_decode_one(cls, body, frames[1] if len(frames) == 2 else b"", limits)]


def _unpack_options(limits: Limits) -> dict[str, Any]:
    """msgpack's unpacking options under ``limits``: nothing unbounded, no extension types."""
    return {
        "raw": False, "strict_map_key": True, "use_list": True,
        "max_str_len": limits.max_str_len, "max_bin_len": limits.max_str_len,
        "max_array_len": limits.max_container_len, "max_map_len": limits.max_container_len,
        "max_ext_len": 0, "ext_hook": _reject_ext,
    }


def _refusal(kind: object, body: object, message: str, raw: bytes = b"") -> RemoteProtocolError:
    """The error refusing a message of ``kind`` with fields ``body``: a
    ``BadRequestError`` when the kind's first field is its ``request_id`` and
    that can be read from ``body``."""
    cls = _kind_class(kind)
    if cls is not None and type(body) is list and body and type(body[0]) is int:
        plan = _PLANS.get(cls) or _plan(cls)
        if plan.names_request:
            return BadRequestError(message, body[0], plan.kind, raw)
    return RemoteProtocolError(message, raw)


def _refuse_all(items: list[Any], message: str, raw: bytes) -> list[Message | RemoteProtocolError]:
    """A whole batch refused: the ``BadRequestError`` of each item whose
    request id can be read, and one ``RemoteProtocolError`` for the rest (if any)."""
    refused: list[Message | RemoteProtocolError] = []
    for item in items:
        error = _refusal(item[0], item[1], message, raw) if type(item) is list and len(item) == 2 else None
        if isinstance(error, BadRequestError):
            refused.append(error)
    if len(refused) < len(items):
        refused.append(RemoteProtocolError(message, raw))
    return refused


_ARRAY_MARKERS = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])


def _salvage(header: bytes | memoryview, limits: Limits, message: str) -> list[Message | RemoteProtocolError]:
    """The refusals of a header msgpack could not read as a whole (a string
    too long, a truncated frame, trailing bytes): read again a value at a
    time, with the same limits, a ``BadRequestError`` for each message whose
    request id comes before the point where it stops being readable, and one
    ``RemoteProtocolError`` for the other messages; nothing if no id could be read."""
    raw = bytes(header[:64])
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(header), 1), **_unpack_options(limits))
    unpacker.feed(header)
    found: list[Message | RemoteProtocolError] = []

    def read_item() -> None:
        """``kind, [field, ...]``: a refusal if the first field is its request id."""
        kind = unpacker.unpack()
        n = unpacker.read_array_header()
        if n:
            error = _refusal(kind, [unpacker.unpack()], message, raw)
            if isinstance(error, BadRequestError):
                found.append(error)
            for _ in range(n - 1):
                unpacker.skip()

    items = 1
    try:
        if unpacker.read_array_header() != 3:
            return []
        version = unpacker.unpack()
        if version != PROTOCOL_VERSION or type(version) is not int:
            return []
        if header[unpacker.tell()] not in _ARRAY_MARKERS:  # one message: [version, kind, fields]
            read_item()
        else:  # a batch: [version, [[kind, fields], ...], sizes]
            items = unpacker.read_array_header()
            for _ in range(items):
                if unpacker.read_array_header() != 2:
                    break
                read_item()
    except Exception:  # noqa: S110 -- where it stops being readable, the salvage ends
        pass
    if found and len(found) < items:
        found.append(RemoteProtocolError(message, raw))
    return found


def _kind_class(kind: object) -> type[Message] | None:
    return MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None


def _decode_items(items: list[Any], sizes: object, frames: Sequence[bytes | memoryview], limits: Limits,
                  header: bytes | memoryview) -> list[Message | RemoteProtocolError]:
    """A batch's messages; the payload sizes must match the items and the payload frame."""
    if not items:
        raise RemoteProtocolError("a batch must be a non-empty list of [kind, fields]", raw=bytes(header[:64]))
    if type(sizes) is not list or not {*map(type, sizes)} <= {int} or min(sizes, default=0) < 0:
        return _refuse_batch(items, "a batch's payload sizes must be a list of sizes", header)
    if len(frames) != (2 if sizes else 1) or sizes and sum(sizes) != len(frames[1]):
        return _refuse_batch(items, f"a batch with payloads of {sum(sizes)} bytes in all came with "
                                    f"{len(frames) - 1} payload frame(s) of "
                                    f"{sum(len(f) for f in frames[1:])} bytes", header)
    view = memoryview(frames[1]) if sizes else memoryview(b"")
    results: list[Message | RemoteProtocolError] = []
    at = 0  # the next payload size
    pos = 0  # where its payload starts
    for item in items:
        if type(item) is not list or len(item) != 2:
            error = RemoteProtocolError(f"batch item {len(results)} is not [kind, fields]")
            return _framing_lost(results, error, items)
        kind, body = item
        cls = _kind_class(kind)
        if cls is None:
            return _framing_lost(results, RemoteProtocolError(f"unknown message kind {kind!r}"), items)
        payload = None
        if cls.PAYLOAD is not None:
            if at == len(sizes):
                error = _refusal(kind, body, f"{kind}: no payload size for it")
                return _framing_lost(results, error, items)
            payload = view[pos:pos + sizes[at]]
            pos += sizes[at]
            at += 1
        results.append(_decode_one(cls, body, payload, limits))
    if at != len(sizes):
        results.append(RemoteProtocolError(f"{len(sizes) - at} payload size(s) left over after the batch"))
    return results


def _refuse_batch(items: list[Any], problem: str,
                  header: bytes | memoryview) -> list[Message | RemoteProtocolError]:
    """A batch refused whole: its requests by id, or ``RemoteProtocolError`` raised if no id can be read."""
    refused = _refuse_all(items, problem, bytes(header[:64]))
    if not any(isinstance(r, BadRequestError) for r in refused):
        raise RemoteProtocolError(problem, raw=bytes(header[:64]))
    return refused


def _framing_lost(results: list[Message | RemoteProtocolError], error: RemoteProtocolError,
                  items: list[Any]) -> list[Message | RemoteProtocolError]:
    """``results`` (one for each item before it) end with ``error``, the
    error of the next item: the later items are not read, but those whose
    request id can be are refused by id."""
    i = len(results)
    results.append(error)
    later = _refuse_all(items[i + 1:], f"not read: item {i} of its batch was malformed", b"")
    results.extend(r for r in later if isinstance(r, BadRequestError))
    return results


def _decode_one(cls: type[Message], body: object, payload: bytes | memoryview | None,
                limits: Limits) -> Message | RemoteProtocolError:
    """One message of class ``cls`` from its field list and its payload frame."""
    plan = _PLANS.get(cls) or _plan(cls)
    if payload is not None:
        if len(payload) > limits.max_payload_bytes:
            return _refusal(plan.kind, body, f"{plan.kind}: payload of {len(payload)} bytes exceeds "
                                             f"the limit of {limits.max_payload_bytes}")
        payload = bytes(payload)
    try:
        msg = plan.build(body, payload)
    except (TypeError, ValueError) as exc:  # the dataclass's own checks (__post_init__)
        return _refusal(plan.kind, body, f"{plan.kind}: {exc}")
    return msg if msg is not None else _refusal(plan.kind, body, plan.explain(body))


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one message class is packed and checked, built once per class."""

    kind: str
    payload: str | None
    names: tuple[str, ...]  # the fields on the wire, in order
    hints: dict[str, Any]
    values: Callable[[Message], tuple[Any, ...]]
    build: Callable[[object, bytes | None], Message | None]
    """The message, or None when the fields are not exactly right (then ``explain`` says why)."""
    names_request: bool
    """Whether the first field is the ``request_id`` of the request it is or answers."""

    def explain(self, body: object) -> str:
        if not isinstance(body, list):
            return f"{self.kind}: fields must be a list, not {type(body).__name__}"
        if len(body) != len(self.names):
            return (f"{self.kind}: expected {len(self.names)} field(s) ({', '.join(self.names)}), "
                    f"got {len(body)}")
        for name, value in zip(self.names, body, strict=True):
            if not _checker(self.hints[name])(value):
                return (f"{self.kind}: field {name!r} has type {type(value).__name__}, "
                        f"expected {_type_name(self.hints[name])}")
        return f"{self.kind}: malformed fields"  # not reached: build() took them


_PLANS: dict[type, _Plan] = {}


def _plan(cls: type[Message]) -> _Plan:
    """Build (and keep) ``cls``'s plan.  ``LocalProtocolError`` for a class that is not a registered message."""
    kind = cls.KIND
    if MESSAGE_TYPES.get(kind) is not cls:
        raise LocalProtocolError(f"{cls.__name__} is not a registered message type")
    payload = cls.PAYLOAD
    hints = typing.get_type_hints(cls)
    names = tuple(f.name for f in fields(cls) if f.name != payload)
    names_request = names[:1] == ("request_id",) and hints["request_id"] is int
    plan = _PLANS[cls] = _Plan(kind, payload, names, hints, _values_getter(names), _builder(cls, names, hints),
                               names_request)
    return plan


def _values_getter(names: tuple[str, ...]) -> Callable[[Message], tuple[Any, ...]]:
    if not names:
        return lambda msg: ()
    if len(names) == 1:
        name = names[0]
        return lambda msg: (getattr(msg, name),)
    return attrgetter(*names)


def _builder(cls: type[Message], names: tuple[str, ...],
             hints: dict[str, Any]) -> Callable[[object, bytes | None], Message | None]:
    """A function ``(fields, payload) -> message or None``, generated for
    ``cls``: one length check, then each field's type checked inline (exact
    types; a ``tuple[...]`` field arrives as a list and becomes a tuple)."""
    env: dict[str, Any] = {"cls": cls, "list": list, "len": len, "type": type, "tuple": tuple,
                           "int": int, "str": str, "bool": bool, "float": float, "NoneType": type(None)}
    local = [f"f{i}" for i in range(len(names))]
    tests, args = [], []
    for i, (name, var) in enumerate(zip(names, local, strict=True)):
        tp = hints[name]
        exact = _exact_types(tp)
        if exact is not None:
            tests.append(" or ".join(f"type({var}) is {t}" for t in exact) if len(exact) > 1
                         else f"type({var}) is {exact[0]}")
        else:
            env[f"check{i}"] = _checker(tp)
            tests.append(f"check{i}({var})")
        args.append(f"tuple({var})" if typing.get_origin(tp) is tuple else var)
    if cls.PAYLOAD is not None:
        if fields(cls)[-1].name != cls.PAYLOAD:  # positions would shift: name every argument
            args = [f"{name}={arg}" for name, arg in zip(names, args, strict=True)]
        args.append(f"{cls.PAYLOAD}=payload")
    unpack = f"        {', '.join(local)}, = body\n" if names else ""
    checks = " and ".join(f"({t})" for t in tests) or "True"
    src = (
        "def build(body, payload):\n"
        f"    if type(body) is list and len(body) == {len(names)}:\n"
        f"{unpack}"
        f"        if {checks}:\n"
        f"            return cls({', '.join(args)})\n"
        "    return None\n"
    )
    exec(src, env)  # noqa: S102 -- generated from the dataclass's own field list, as dataclasses does
    return env["build"]  # type: ignore[no-any-return]


_EXACT_NAMES = {int: "int", str: "str", bool: "bool", type(None): "NoneType"}


def _exact_types(tp: Any) -> list[str] | None:
    """The names for ``type(v) is X`` tests when ``tp`` is such a type or a union of them."""
    if tp is float:
        return ["float", "int"]
    if tp in _EXACT_NAMES:
        return [_EXACT_NAMES[tp]]
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        if all(a in _EXACT_NAMES for a in args):
            return [_EXACT_NAMES[a] for a in args]
    return None


def _reject_ext(code: int, data: bytes) -> object:
    raise RemoteProtocolError(f"msgpack extension type {code} is not allowed")


def _checker(tp: Any) -> Callable[[object], bool]:
    """A function ``value -> bool``: whether a decoded msgpack value fits the
    annotation ``tp`` exactly (an int is not a bool; a tuple arrives as a list)."""
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
        item_t = typing.get_args(tp)[0]
        if item_t in (int, str):  # the common case, with the loop in C
            return lambda v: type(v) is list and {*map(type, v)} <= {item_t}
        item = _checker(item_t)
        return lambda v: isinstance(v, list) and all(map(item, v))
    if origin is dict:
        key_t, val_t = typing.get_args(tp)
        if key_t is str and val_t in (int, str):  # the common case, with the loops in C
            return lambda v: type(v) is dict and {*map(type, v)} <= {str} and {*map(type, v.values())} <= {val_t}
        kc, vc = _checker(key_t), _checker(val_t)
        return lambda v: isinstance(v, dict) and all(kc(k) and vc(x) for k, x in v.items())
    return lambda v: False


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
