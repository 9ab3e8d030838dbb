"""Socket addresses: QEMU's SocketAddress (flat, the command line's) and
SocketAddressLegacy (QMP's ``nbd-server-start``), for the two families served here.

``--nbd-server addr.type=unix,addr.path=PATH`` writes a ``SocketAddress``: the
discriminator ``type`` and the branch's members side by side.  QMP's
``nbd-server-start`` takes QEMU's older form, ``{"type": "unix", "data":
{"path": PATH}}``, as QEMU does; ``socket_address_flatten`` turns it into the
flat one (QEMU's function of that name).  A port is a string, as in QEMU (a
number or a service name).
"""

from __future__ import annotations

import enum

from ._types import FlatUnion, member, struct

__all__ = [
    "InetSocketAddress",
    "InetSocketAddressWrapper",
    "SocketAddress",
    "SocketAddressBase",
    "SocketAddressInet",
    "SocketAddressLegacy",
    "SocketAddressLegacyBase",
    "SocketAddressType",
    "SocketAddressUnix",
    "UnixSocketAddress",
    "UnixSocketAddressWrapper",
    "socket_address_flatten",
]


class SocketAddressType(enum.StrEnum):
    """The address families (QEMU has vsock and fd too)."""

    INET = "inet"
    UNIX = "unix"


@struct
class InetSocketAddress:
    """A TCP address."""

    host: str = member(doc="a host name or an IP address ('' or '0.0.0.0': every IPv4 address)")
    port: str = member(doc="a port number or a service name ('0': any free port)")


@struct
class UnixSocketAddress:
    """An AF_UNIX socket's path."""

    path: str = member(doc="the socket's path (relative to the daemon's working directory)")


@struct
class SocketAddressBase:
    """The member every socket address has."""

    type: SocketAddressType = member(doc="the address family")


@struct
class SocketAddressInet(InetSocketAddress, SocketAddressBase):
    """``type=inet``: host and port."""


@struct
class SocketAddressUnix(UnixSocketAddress, SocketAddressBase):
    """``type=unix``: a path."""


SocketAddress = FlatUnion("SocketAddress", SocketAddressBase, "type",
                          {SocketAddressType.INET: SocketAddressInet, SocketAddressType.UNIX: SocketAddressUnix},
                          doc="a socket address (the command line's --nbd-server addr)")


@struct
class SocketAddressLegacyBase:
    """The member every legacy socket address has."""

    type: SocketAddressType = member(doc="the address family")


@struct
class InetSocketAddressWrapper(SocketAddressLegacyBase):
    """``type: inet`` in the legacy form."""

    data: InetSocketAddress = member(doc="host and port")


@struct
class UnixSocketAddressWrapper(SocketAddressLegacyBase):
    """``type: unix`` in the legacy form."""

    data: UnixSocketAddress = member(doc="the path")


SocketAddressLegacy = FlatUnion(
    "SocketAddressLegacy", SocketAddressLegacyBase, "type",
    {SocketAddressType.INET: InetSocketAddressWrapper, SocketAddressType.UNIX: UnixSocketAddressWrapper},
    doc="a socket address in QMP's older form: the family's members under 'data' (nbd-server-start)")


def socket_address_flatten(legacy: SocketAddressLegacyBase) -> SocketAddressBase:
    """The flat address a legacy one says (QEMU's ``socket_address_flatten``)."""
    if isinstance(legacy, InetSocketAddressWrapper):
        return SocketAddressInet(type=SocketAddressType.INET, host=legacy.data.host, port=legacy.data.port)
    if isinstance(legacy, UnixSocketAddressWrapper):
        return SocketAddressUnix(type=SocketAddressType.UNIX, path=legacy.data.path)
    raise TypeError(f"a socket address of type {legacy.type} has no branch")
