"""NBD's transmission phase, served in an iothread: the connections the main loop hands over
(and, in a remote iothread, those its own listener negotiated)."""

from __future__ import annotations

from ._client import DRAIN_TIMEOUT_MS as DRAIN_TIMEOUT_MS
from ._client import LONE_READS_TO_POLL as LONE_READS_TO_POLL
from ._client import MAX_POLLED as MAX_POLLED
from ._client import NbdClient as NbdClient
from ._client import NbdCredit as NbdCredit
from ._client import allocation_depth as allocation_depth
from ._client import base_allocation as base_allocation
from ._listener import NbdListener as NbdListener
from ._listener import parse_listen_address as parse_listen_address
from ._server import MAX_CONNECTIONS as MAX_CONNECTIONS
from ._server import HandedBack as HandedBack
from ._server import NbdServer as NbdServer

__all__ = [
    "DRAIN_TIMEOUT_MS",
    "HandedBack",
    "LONE_READS_TO_POLL",
    "MAX_CONNECTIONS",
    "MAX_POLLED",
    "NbdClient",
    "NbdCredit",
    "NbdListener",
    "NbdServer",
    "allocation_depth",
    "base_allocation",
    "parse_listen_address",
]
