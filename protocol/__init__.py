"""Wire formats, message types and the project's error tree.

``protocol`` is the leaf package: it imports nothing from ``iothreads`` or
``mainloop``, and its core holds no sockets, threads or clocks.
"""

from __future__ import annotations

from ._errors import BottomHalfLeakError as BottomHalfLeakError
from ._errors import CoroutineStateError as CoroutineStateError
from ._errors import EvloopError as EvloopError
from ._errors import StateError as StateError
from ._errors import ThreadContractError as ThreadContractError

__all__ = [
    "BottomHalfLeakError",
    "CoroutineStateError",
    "EvloopError",
    "StateError",
    "ThreadContractError",
]
