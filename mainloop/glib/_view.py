"""The live view of a main context: every source and every polled fd, with
what each fd is and why it is there."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ._source import condition_names

if TYPE_CHECKING:
    from ._context import MainContext

__all__ = ["FdView", "MainLoopView", "SourceView", "describe_fd"]


def describe_fd(fd: int) -> str:
    """What an fd is, from the kernel's point of view: "TCP socket listening
    on 127.0.0.1:5900", "eventfd", "signalfd", "pipe", ..."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "closed fd"
    if target.startswith("anon_inode:"):
        return target.removeprefix("anon_inode:").strip("[]")
    if not target.startswith("socket:"):
        return target.split(":")[0] if ":[" in target else "file"
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return "socket"
    with sock:
        family = {socket.AF_INET: "TCP", socket.AF_INET6: "TCP6", socket.AF_UNIX: "Unix"}.get(
            sock.family, str(sock.family))
        if sock.type == socket.SOCK_DGRAM:
            family = family.replace("TCP", "UDP") + " datagram"
        try:
            listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        except OSError:
            listening = False
        try:
            local = sock.getsockname()
        except OSError:
            local = ""
        where = f"{local[0]}:{local[1]}" if isinstance(local, tuple) else (local or "unnamed")
        if listening:
            return f"{family} socket listening on {where}"
        try:
            peer = sock.getpeername()
            peer_s = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else (peer or "unnamed")
            return f"{family} socket {where} <-> {peer_s}"
        except OSError:
            return f"{family} socket {where}"


@dataclass(frozen=True)
class SourceView:
    id: int
    name: str
    kind: str
    priority: int
    fds: list[int]
    dispatch_count: int
    dispatch_ns: int


@dataclass(frozen=True)
class FdView:
    fd: int
    events: str
    source: str
    """The owning source's name, or "" for the context's own wakeup fd."""
    role: str
    """Why the fd is polled."""
    kind: str
    """What the kernel says the fd is."""


@dataclass(frozen=True)
class MainLoopView:
    """A snapshot of a MainContext, as data and (``str()``) as a table."""

    context: str
    iterations: int
    sources: list[SourceView]
    fds: list[FdView]

    @classmethod
    def of(cls, ctx: MainContext) -> MainLoopView:
        sources = [
            SourceView(s.id, s.name, s.kind, s.priority, sorted({p.fd for p in s.pollfds}),
                       s.dispatch_count, s.dispatch_ns)
            for s in ctx.sources()
        ]
        fds = [
            FdView(p.fd, condition_names(p.events), p.source.name if p.source else "",
                   p.role or (f"watched by {p.source.kind} source" if p.source else ""),
                   describe_fd(p.fd))
            for p in ctx.pollfds()
        ]
        return cls(ctx.name, ctx.iterations, sources, fds)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"MainContext {self.context!r}: {len(self.sources)} sources, "
                 f"{len(self.fds)} polled fds, {self.iterations} iterations", "", "sources:"]
        lines.append(f"  {'id':>3}  {'priority':>8}  {'kind':<12} {'name':<24} {'fds':<10} "
                     f"{'dispatches':>10}  {'time':>10}")
        for s in self.sources:
            fds = ",".join(map(str, s.fds)) or "-"
            lines.append(f"  {s.id:>3}  {s.priority:>8}  {s.kind:<12} {s.name:<24} {fds:<10} "
                         f"{s.dispatch_count:>10}  {s.dispatch_ns / 1e6:>8.2f}ms")
        lines += ["", "polled fds:", f"  {'fd':>4}  {'events':<8} {'source':<20} why / what"]
        for f in self.fds:
            lines.append(f"  {f.fd:>4}  {f.events:<8} {f.source or '(context)':<20} {f.role} [{f.kind}]")
        return "\n".join(lines)
