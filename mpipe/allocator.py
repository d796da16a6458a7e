"""Stage workers keep the memory their items free, for the next items (glibc's malloc).

An item that allocates large arrays (numpy's are plain ``malloc``) and drops
them when it returns gives that memory back to the system under glibc's
defaults: the top of the heap is trimmed once more than a few MB is free there
(twice the largest block freed so far), and blocks above 128 KB (more, once
larger ones were freed) come from ``mmap`` and go back with ``munmap``.  The
next item's arrays are then faulted in again, a page at a time, each zeroed by
the kernel.  On the study notes' workload that was a third of a worker's CPU:
20 tasks took 173,000 page faults and 0.76-0.80 s of system time in one
process; 9,300 and 0.31-0.43 s with the settings here (docs/BENCHMARKS.md, "Freed memory
kept").

So each stage worker, as it starts, serves blocks up to 32 MiB (the most
glibc's own moving threshold reaches on 64 bits) from its heap, and glibc
trims the heap's top only once more than ``keep_freed_memory_mb`` is free
there (then it gives back nearly all of it, as before).  Between items a
worker then stays at its peak instead of falling back; the peak itself does
not change.  What else keeps the settings: a process the stage forks (a
``multiprocessing.Pool``), and the arenas of the stage's own threads, whose
heaps (64 MiB at most each) glibc then never trims at the top.

A LocalCluster that mpipe starts gets the same settings through the
environment its nanny gives each worker (:func:`nanny_environ`): glibc reads
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` as a process starts.

Left as they are when the user has chosen (either variable, or the trim or
mmap threshold tunable in ``GLIBC_TUNABLES``: the runner's C library read them
as it started and every child inherits them), and without glibc's ``mallopt``
(musl and macOS have none; a 32-bit glibc refuses 32 MiB).
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
# What else a process may start with that stops glibc's moving thresholds.
START_SETTINGS = (*USER_SETTINGS, "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


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
    # mallopt answers 1 when it took the value, 0 when not.
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
                   and mallopt(M_TRIM_THRESHOLD, keep_mb << 20) == 1)
    if not applied:
        logger.debug("this C library's malloc does not take mallopt's thresholds")
    return applied


def user_has_chosen() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return (any(var in os.environ for var in USER_SETTINGS)
            or any(name in tunables for name in USER_TUNABLES))


def environment(keep_mb: int) -> dict[str, str]:
    """The settings of :func:`keep_freed_memory` as glibc's variables, for a fresh process."""
    return {"MALLOC_TRIM_THRESHOLD_": str(keep_mb << 20),
            "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_MAX)}


def nanny_environ(keep_mb: int) -> dict[str, str | None]:
    """What a Dask nanny we start puts in its workers' environment (None: unset).

    Never the nanny's own ``MALLOC_TRIM_THRESHOLD_=65536``: set alone it pins
    glibc's mmap threshold at 128 KB, and every large array is mmapped and
    faulted in afresh (docs/DISTRIBUTED.md, "The MALLOC_TRIM pitfall").
    """
    if user_has_chosen():
        return {var: os.environ.get(var) for var in USER_SETTINGS}  # theirs, as exported
    if keep_mb <= 0:
        return dict.fromkeys(USER_SETTINGS)  # glibc's own settings
    return {**environment(keep_mb)}


def pins_mmap_threshold_low(environ: dict[str, str]) -> bool:
    """Whether a process started with these variables mmaps every block above 128 KB
    afresh: a trim threshold or top pad set (each stops glibc's moving thresholds),
    by variable or tunable, without an mmap threshold (the Dask nanny's default)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    stops = (any(var in environ for var in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"))
             or any(name in tunables for name in ("glibc.malloc.trim_threshold",
                                                   "glibc.malloc.top_pad")))
    mmap_set = ("MALLOC_MMAP_THRESHOLD_" in environ
                or "glibc.malloc.mmap_threshold" in tunables)
    return stops and not mmap_set
