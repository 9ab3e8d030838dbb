"""The main-loop process: glib-style sources, the BQL, the cluster, QMP.

Built on ``iothreads`` (its AioContexts) and ``protocol``.
"""

from __future__ import annotations

__all__: list[str] = []
