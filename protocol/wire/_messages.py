"""The messages the main loop and the iothreads exchange.

Every message is a frozen, slotted dataclass with a wire ``KIND``.  Two
planes share the same envelope (see ``_codec.py``):

control plane (main loop <-> iothread, over the control channel)
    ``Hello`` / ``Welcome`` (handshake: ids, pid, protocol version,
    capabilities), ``SetPollParams``, ``Stop``, ``Query`` / ``QueryReply``,
    ``Heartbeat``, ``NodeStats``, ``Event``, ``ErrorReply``.
NBD connections (main loop <-> iothread)
    ``NbdConnection``, with the connection's socket, over the handoff socket
    beside the control channel (``protocol.channel``'s handoff: SCM_RIGHTS);
    ``NbdCloseExport`` over the control channel.
data plane (client <-> iothread)
    ``BlockRequest`` and ``BlockCompletion``.  Their block payload (the data
    of a write, the data a read returns) never goes into msgpack: it travels
    as a separate raw frame after the header.

Field types are checked on decode, exactly: an ``int`` field takes an int
(not a bool), a ``tuple[str, ...]`` takes a list of str, and so on.  Fields
are plain data: str, int, float, bool, None, tuples and str-keyed dicts of
those.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

__all__ = [
    "PROTOCOL_VERSION",
    "BlockCompletion",
    "BlockOp",
    "BlockRequest",
    "BlockdevAdd",
    "BlockdevDel",
    "ErrorReply",
    "Event",
    "Heartbeat",
    "Hello",
    "Message",
    "NbdCloseExport",
    "NbdConnection",
    "NodeStats",
    "Query",
    "QueryReply",
    "SetLatencyHistogram",
    "SetPollParams",
    "Stop",
    "Welcome",
]

PROTOCOL_VERSION = 6  # 2: fields as a list, batches; 3: node statistics (NodeStats, BlockdevAdd.stats); 4: NBD; 5: CURVE, remote iothreads; 6: Resume, NbdOffer


class BlockOp(enum.StrEnum):
    """Block operations (QEMU's names where it has them)."""

    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    DISCARD = "discard"
    WRITE_ZEROES = "write_zeroes"


_BLOCK_OPS = frozenset(op.value for op in BlockOp)


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message.  ``KIND`` is the name on the wire;
    ``PAYLOAD`` names the field that travels as a raw frame, if any."""

    KIND: ClassVar[str] = ""
    PAYLOAD: ClassVar[str | None] = None


# -- control plane --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message of an iothread: who it is and what it speaks."""

    KIND: ClassVar[str] = "hello"
    iothread_id: str
    pid: int
    version: int = PROTOCOL_VERSION
    capabilities: tuple[str, ...] = ()
    data_endpoint: str = ""
    """Where clients send block requests ("" if the iothread serves none)."""
    curve_key: str = ""
    """The CURVE public key (Z85) its data endpoint serves with ("" off tcp://)."""
    host: str = ""
    """A remote iothread's host, as it names itself ("" for one the main loop started)."""
    nbd_address: str = ""
    """Where a remote iothread listens for NBD clients itself, HOST:PORT ("" if it does not)."""
    session: int = 1
    """A remote iothread's join: one more each time it lost its main loop and joins again."""


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """The main loop's answer to ``Hello``: the agreed version and capabilities."""

    KIND: ClassVar[str] = "welcome"
    version: int = PROTOCOL_VERSION
    capabilities: tuple[str, ...] = ()
    heartbeat_interval_ms: int = 1000
    authorized_keys: tuple[str, ...] = ()
    """The CURVE public keys (Z85) its data endpoint lets in, on tcp://."""


@dataclass(frozen=True, slots=True)
class SetPollParams(Message):
    """Apply an iothread's poll-max-ns / poll-grow / poll-shrink / aio-max-batch."""

    KIND: ClassVar[str] = "set-poll-params"
    request_id: int
    poll_max_ns: int
    poll_grow: int
    poll_shrink: int
    aio_max_batch: int = 0


@dataclass(frozen=True, slots=True)
class Stop(Message):
    """Ask an iothread to stop its loop and exit."""

    KIND: ClassVar[str] = "stop"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Resume(Message):
    """Submit again the requests a 'stop' error policy holds, in every node
    (QMP's ``cont``); answered with a ``QueryReply`` counting them ("resumed")."""

    KIND: ClassVar[str] = "resume"
    request_id: int


@dataclass(frozen=True, slots=True)
class Query(Message):
    """Ask an iothread for its counters."""

    KIND: ClassVar[str] = "query"
    request_id: int
    node: str = ""
    """Empty: the iothread's counters; a node name: that node's statistics."""


@dataclass(frozen=True, slots=True)
class QueryReply(Message):
    """An iothread's counters (loop iterations, dispatches, busy-poll hits, ...)."""

    KIND: ClassVar[str] = "query-reply"
    request_id: int
    counters: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Liveness, both ways; ``sent_ns`` is the sender's monotonic clock."""

    KIND: ClassVar[str] = "heartbeat"
    seq: int
    sent_ns: int


@dataclass(frozen=True, slots=True)
class NodeStats(Message):
    """A node's statistics, from its iothread to the main loop: sent with the
    answer to a heartbeat when they changed since they were last sent, so
    that the main loop holds a recent copy (what a restarted iothread gets
    back in its ``BlockdevAdd``).  ``counters`` are QMP's BlockDeviceStats
    names, flat (``rd_operations``, ``wr_total_time_ns``, ...) with the bins
    of a latency histogram (``rd_histogram_0``, ...): one node's, under 200
    entries (histograms of up to 32 boundaries), within a map's limit of 256."""

    KIND: ClassVar[str] = "node-stats"
    node_name: str
    counters: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Event(Message):
    """Something happened that the other side should know (QMP-style event)."""

    KIND: ClassVar[str] = "event"
    name: str
    data: dict[str, str | int | float | bool | None] = field(default_factory=dict)


# The events an iothread sends its main loop that are not QMP's.
IOTHREAD_LEFT = "IOTHREAD_LEFT"
"""A remote iothread's last word before it exits: ``{"exit-code": N}``."""
PEER_REFUSED = "PEER_REFUSED"
"""A peer kept out of a CURVE socket (a QMP event too): ``Refusal.as_event()``."""
NBD_CONNECTION_OPENED = "NBD_CONNECTION_OPENED"
"""A remote iothread's own NBD listener took a client: ``{"connection": ID, "export": EXPORT_ID}``."""
NBD_CONNECTION_CLOSED = "NBD_CONNECTION_CLOSED"
"""An NBD connection an iothread served ended: ``{"connection": ID, "export": EXPORT_ID}``."""


@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """A request failed: ``errno`` (0 if none applies), ``error_class`` (QMP's
    classes: ``GenericError``, ...) and a message for humans."""

    KIND: ClassVar[str] = "error"
    request_id: int
    error_class: str
    message: str
    errno: int = 0


@dataclass(frozen=True, slots=True)
class BlockdevAdd(Message):
    """Create block node ``node_name`` in the receiving iothread (QMP's
    ``blockdev-add``).  ``driver`` and ``options`` are the schema's validated
    ``BlockdevOptions``: the rest of its members (``read-only``, the driver's
    own), defaults filled in, nested ones flattened (``cache.direct``); see
    ``protocol.schema.blockdev_to_wire``.  The iothread checks them again
    with the same declaration."""

    KIND: ClassVar[str] = "blockdev-add"
    request_id: int
    node_name: str
    driver: str
    options: dict[str, str | int | bool] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    """The statistics the node starts from (``NodeStats.counters``): those it
    had in its old home, for a node moved or reopened by a restarted iothread
    (QEMU keeps a node's statistics across a move); empty for a new node."""
    boundaries_ns: tuple[int, ...] = ()
    """Its latency histogram's boundaries (``SetLatencyHistogram``), if one
    is set: the bins of ``stats`` count in these intervals."""


@dataclass(frozen=True, slots=True)
class BlockdevDel(Message):
    """Drain and remove block node ``node_name`` (QMP's ``blockdev-del``)."""

    KIND: ClassVar[str] = "blockdev-del"
    request_id: int
    node_name: str
    moving: bool = False
    """The node moves to another iothread: requests that still come here are
    answered ESTALE (the client looks the node up again and resends), and the
    answer, once the node is drained, carries its statistics (as
    ``NodeStats.counters``) for the new home's ``BlockdevAdd``."""


@dataclass(frozen=True, slots=True)
class SetLatencyHistogram(Message):
    """Count a node's request latencies in the intervals ``boundaries_ns``
    delimits (QMP's ``block-latency-histogram-set``); empty turns it off."""

    KIND: ClassVar[str] = "set-latency-histogram"
    request_id: int
    node_name: str
    boundaries_ns: tuple[int, ...] = ()


# -- data plane -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockRequest(Message):
    """A block I/O request for node ``node``.  A write's data is ``data``,
    sent as a raw frame."""

    KIND: ClassVar[str] = "block-request"
    PAYLOAD: ClassVar[str | None] = "data"
    request_id: int
    node: str
    op: str
    offset: int = 0
    length: int = 0
    flags: int = 0
    data: bytes = b""

    def __post_init__(self) -> None:
        if self.op not in _BLOCK_OPS:
            raise ValueError(f"unknown block op {self.op!r} (one of {', '.join(sorted(_BLOCK_OPS))})")
        if self.offset < 0 or self.length < 0:
            raise ValueError("offset and length must be >= 0")


@dataclass(frozen=True, slots=True)
class BlockCompletion(Message):
    """The result of a ``BlockRequest``: ``status`` 0 or a negative errno, a
    message on error, and a read's data as a raw frame."""

    KIND: ClassVar[str] = "block-completion"
    PAYLOAD: ClassVar[str | None] = "data"
    request_id: int
    status: int = 0
    message: str = ""
    data: bytes = b""


# -- NBD connections -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NbdConnection(Message):
    """An NBD client's connection past its handshake, handed over with its
    socket: by the main loop to the iothread that holds the export's node,
    and back by that iothread when the node moves away (then on to its new
    home).  What the handshake agreed travels with it; ``pending`` is what
    was read from the socket and not handled yet (bytes past the handshake,
    or a request not complete when the connection was handed back)."""

    KIND: ClassVar[str] = "nbd-connection"
    PAYLOAD: ClassVar[str | None] = "pending"
    connection_id: int
    export_id: str
    node_name: str
    transmission_flags: int
    """NBD_FLAG_* as sent to the client (read-only, flush, FUA, trim ...)."""
    structured_replies: bool = False
    meta_contexts: dict[str, int] = field(default_factory=dict)
    """The metadata contexts selected with NBD_OPT_SET_META_CONTEXT: name to id."""
    pending: bytes = b""


@dataclass(frozen=True, slots=True)
class NbdCloseExport(Message):
    """Close the NBD connections of export ``export_id`` now (block-export-del
    in hard mode, nbd-server-stop): requests in flight complete first, their
    replies are not sent.  Answered with a ``QueryReply`` counting them."""

    KIND: ClassVar[str] = "nbd-close-export"
    request_id: int
    export_id: str


@dataclass(frozen=True, slots=True)
class NbdOffer(Message):
    """To a remote iothread that listens for NBD itself: offer (or, with
    ``withdraw``, no longer offer) an export of one of its nodes, as its
    handshake shows it (``protocol.nbd.NbdExport``'s fields)."""

    KIND: ClassVar[str] = "nbd-offer"
    export_id: str
    node_name: str
    name: str
    size_bytes: int = 0
    description: str = ""
    has_description: bool = False
    read_only: bool = True
    multi_conn: bool = True
    min_block_bytes: int = 1
    allocation_depth: bool = False
    withdraw: bool = False


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (Hello, Welcome, SetPollParams, Stop, Resume, Query, QueryReply, Heartbeat, NodeStats, Event,
                ErrorReply, BlockdevAdd, BlockdevDel, SetLatencyHistogram, BlockRequest, BlockCompletion,
                NbdConnection, NbdCloseExport, NbdOffer)
}


class _Factory:
    """The default of a field whose default comes from a factory (shown as dataclasses shows it)."""

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY: Any = _Factory()


def _slot_init(cls: type[Message]) -> Callable[..., None]:
    """An ``__init__`` for ``cls`` equivalent to the one ``dataclass`` made
    (the same parameters and defaults, a fresh default from each factory, then
    ``__post_init__``) that stores each field through its slot's descriptor.
    A frozen dataclass's own goes through ``object.__setattr__`` by name for
    each field, twice the cost, and messages are built at every request, on
    both sides.  Instances stay frozen: ``__setattr__`` still refuses."""
    env: dict[str, Any] = {"_FACTORY": _FACTORY}
    params: list[str] = []
    body: list[str] = []
    for f in fields(cls):
        if not f.init or f.kw_only:
            raise TypeError(f"{cls.__name__}.{f.name}: only plain positional fields are supported")
        slot = next(k.__dict__[f.name] for k in cls.__mro__ if f.name in k.__dict__)
        env[f"_set_{f.name}"] = slot.__set__
        if f.default is not MISSING:
            env[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        elif f.default_factory is not MISSING:
            env[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_FACTORY")
            body.append(f"    if {f.name} is _FACTORY:\n        {f.name} = _factory_{f.name}()")
        else:
            params.append(f.name)
        body.append(f"    _set_{f.name}(self, {f.name})")
    if hasattr(cls, "__post_init__"):
        body.append("    self.__post_init__()")
    src = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body or ["    pass"]) + "\n"
    exec(src, env)  # noqa: S102 -- generated from the dataclass's own fields, as dataclasses does
    init: Callable[..., None] = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


for _cls in MESSAGE_TYPES.values():
    _cls.__init__ = _slot_init(_cls)  # type: ignore[method-assign]
