"""User-creatable objects: QEMU's ObjectOptions for the one type this project
has, the iothread, and what ``query-iothreads`` says of one.

``object-add``'s arguments and ``--object``'s value are an ``ObjectOptions``;
``qom-get``/``qom-set`` read and write the ``IothreadProperties`` members.
"""

from __future__ import annotations

import enum
from typing import Annotated

from ._types import INT64_MAX, Check, FlatUnion, Range, id_wellformed, member, struct

__all__ = [
    "IOThreadInfo",
    "IothreadOptions",
    "IothreadProperties",
    "ObjectId",
    "ObjectOptions",
    "ObjectOptionsBase",
    "ObjectType",
]

ObjectId = Annotated[str, Check(id_wellformed, "Parameter '{name}' expects an identifier")]
_NonNegative = Annotated[int, Range(0, INT64_MAX)]  # QEMU's iothread properties: int64, not negative


class ObjectType(enum.StrEnum):
    """The types of user-creatable objects (QEMU has many more)."""

    IOTHREAD = "iothread"


@struct
class IothreadProperties:
    """An iothread's properties (its AioContext's polling and batching)."""

    poll_max_ns: _NonNegative = member(default=32768, doc="the longest busy-polling window, in ns (0: none)")
    poll_grow: _NonNegative = member(default=0, doc="the factor the window grows by (0: the default, 2)")
    poll_shrink: _NonNegative = member(default=0, doc="the divisor the window shrinks by (0: reset it to 0)")
    aio_max_batch: _NonNegative = member(default=0, doc="the most requests submitted in one batch "
                                                        "(0: the default)")


@struct
class ObjectOptionsBase:
    """The members every object has."""

    qom_type: ObjectType = member(doc="the object's type")
    id: ObjectId = member(doc="the object's id: a letter, then letters, digits, '-', '.', '_'")


@struct
class IothreadOptions(IothreadProperties, ObjectOptionsBase):
    """``qom-type=iothread``: an iothread process with its AioContext."""


ObjectOptions = FlatUnion("ObjectOptions", ObjectOptionsBase, "qom-type",
                          {ObjectType.IOTHREAD: IothreadOptions},
                          doc="an object to create (object-add, --object)")


@struct
class IOThreadInfo(IothreadProperties):
    """One running iothread, as ``query-iothreads`` describes it."""

    id: str = member(doc="its id")
    thread_id: int = member(doc="its process id (on its host, for a remote one)")
    host: str | None = member(default=None, doc="the host of a remote iothread (one that joined over "
                                                "tcp://), as it names itself; absent for the main loop's own")
