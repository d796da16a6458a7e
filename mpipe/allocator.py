"""Stage workers keep the memory their items free, for the next items (glibc's malloc).

An item that allocates large arrays (numpy's are plain ``malloc``) and drops
them when it returns gives that memory back to the system under glibc's
defaults: the top of the heap is trimmed once more than a few MB is free there
(the threshold follows the largest block freed so far), and blocks above
128 KB may come from ``mmap`` and go back with ``munmap``.  The next item's
arrays are then faulted in again, 4 KB at a time, each page zeroed by the
kernel.  On the study notes' workload that was a third of a worker's CPU: 20
tasks took 173,000 page faults and 0.83 s of system time in one process; 9,300
and 0.45 s with the settings here (docs/BENCHMARKS.md, "Freed memory kept").

So each stage worker, as it starts, serves blocks up to 32 MiB (the most
glibc's own moving threshold reaches on 64 bits) from its heap and keeps up to
``keep_freed_memory_mb`` of freed memory there.  Between items a worker then
stays at its peak instead of falling back; the peak itself does not change.

Left as they are when the user has chosen (``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_MMAP_THRESHOLD_`` or malloc tunables in ``GLIBC_TUNABLES``, which the
runner's C library read as it started and every child inherits), and on a C
library without glibc's ``mallopt`` (musl's does nothing, macOS has none).
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

# mallopt's parameters (glibc's malloc.h).  Setting either one also stops
# glibc from moving both thresholds by itself.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX, 64-bit

USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
USER_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold")


def keep_freed_memory(keep_mb: int) -> bool:
    """Apply the settings above in this process; whether they were applied."""
    if keep_mb <= 0 or user_has_chosen():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt answers 1 when it took the value, 0 when not (musl: never).
    applied = bool(mallopt(M_MMAP_THRESHOLD, min(MMAP_THRESHOLD_MAX, keep_mb << 20)) == 1
                   and mallopt(M_TRIM_THRESHOLD, keep_mb << 20) == 1)
    if not applied:
        logger.debug("this C library's malloc does not take mallopt's thresholds")
    return applied


def user_has_chosen() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return (any(var in os.environ for var in USER_SETTINGS)
            or any(name in tunables for name in USER_TUNABLES))
