"""Block nodes and their drivers (served in an iothread), and the ``BlockClient`` that reaches them."""

from __future__ import annotations

from ._client import CLUSTER_STATE_FILE as CLUSTER_STATE_FILE
from ._client import BlockClient as BlockClient
from ._blkdebug import BlkdebugNode as BlkdebugNode
from ._blkdebug import BlkdebugRules as BlkdebugRules
from ._client import BlockIOError as BlockIOError
from ._node import BlockDriver as BlockDriver
from ._node import BlockNode as BlockNode
from ._node import FileDriver as FileDriver
from ._node import NullDriver as NullDriver
from ._node import OpStats as OpStats
from ._node import make_driver as make_driver
from ._open import open_node as open_node

__all__ = [
    "BlkdebugNode",
    "BlkdebugRules",
    "BlockClient",
    "BlockDriver",
    "BlockIOError",
    "BlockNode",
    "CLUSTER_STATE_FILE",
    "FileDriver",
    "NullDriver",
    "OpStats",
    "make_driver",
    "open_node",
]
