"""The NBD server: its listener, the handshakes, the exports, and the handoff
of each connection to the iothread that serves its node."""

from __future__ import annotations

from ._server import BLOCK_EXPORT_DELETED as BLOCK_EXPORT_DELETED
from ._server import NbdServer as NbdServer
from ._server import nbd_uri as nbd_uri

__all__ = [
    "BLOCK_EXPORT_DELETED",
    "NbdServer",
    "nbd_uri",
]
