"""Opening a node from its options: the driver's, or a node over another one."""

from __future__ import annotations

from collections.abc import Mapping

from protocol.schema import BlockdevOnError, BlockdevOptionsBase, BlockdevOptionsBlkdebug

from ..aio._context import AioContext
from ._blkdebug import BlkdebugNode
from ._node import BlockNode, make_driver

__all__ = ["open_node"]


def open_node(ctx: AioContext, options: BlockdevOptionsBase,
              nodes: Mapping[str, BlockNode] | None = None) -> BlockNode:
    """A node of ``ctx`` as validated ``BlockdevOptions`` describe it; a node
    over another one (``blkdebug``) finds that one in ``nodes``.  ``OSError``
    if its file cannot be opened, ``ValueError`` for options that cannot
    be served.  Home thread."""
    if options.rerror is BlockdevOnError.ENOSPC:
        raise ValueError("'enospc' invalid read error action")  # QEMU's words
    if isinstance(options, BlockdevOptionsBlkdebug):
        image = (nodes or {}).get(options.image)
        if image is None:
            raise ValueError(f"Cannot find device={options.image} nor node-name={options.image}")
        if image.ctx is not ctx:
            raise ValueError(f"node '{options.image}' is in another AioContext")
        return BlkdebugNode(options, image)
    return BlockNode(ctx, options.node_name, make_driver(options), read_only=options.read_only,
                     werror=options.werror, rerror=options.rerror)
