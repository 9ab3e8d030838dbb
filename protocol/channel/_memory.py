"""Memory a process keeps after its peers' large requests are done.

glibc serves an allocation from the heap below its *mmap threshold* and with
``mmap`` above it, and by default it raises that threshold to the size of the
largest mmapped block freed so far (up to 32 MiB).  After one 32 MiB read,
every later buffer of that size comes from the heap, and freed heap memory
in the middle of it stays with the process: an iothread that served a
hostile client's large reads and writes for a while grew from 33 to 169 MiB
(examples/hardening.py, 10^6 data-plane frames), with nothing leaked.  A
fixed threshold (``bound_heap_retention``) turns that off: buffers of a MiB
and more are mapped and given back when freed; those below come from the
heap as before (the data path's buffers are reused: see iothreads.nbd).
"""

from __future__ import annotations

import ctypes

__all__ = ["MMAP_THRESHOLD_BYTES", "bound_heap_retention"]

MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def bound_heap_retention(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold_bytes`` for this process;
    whether it was (False where the C library has no ``mallopt``)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
