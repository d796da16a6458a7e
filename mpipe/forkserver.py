"""Start the forkserver that every mpipe child is forked from, as early as possible.

The forkserver is a fresh interpreter that imports numpy and mpipe's worker
code once; each child is then a cheap ``fork`` of it (no inherited locks,
threads or open HDF5 handles, unlike ``fork`` from the runner).  Its start-up
(about 0.15 s, mostly numpy) used to follow the runner's own imports (pydantic,
yaml, rich); ``mpipe run`` now calls :func:`start` before those, so the two
overlap.

What a forkserver inherits is fixed when it starts: the environment (the log
settings of :mod:`mpipe.logsetup` travel that way, so :func:`start` comes after
:func:`mpipe.logsetup.configure`) and ``sys.path``.  The pipeline's own
modules are therefore not preloaded here; each child imports its function by
name (:func:`mpipe.imports.import_checked`), with the pipeline's directory on
its path.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import ForkServerContext

# forkserver_init first: it makes the forkserver ignore SIGTERM (see there).
PRELOAD = ["mpipe.forkserver_init", "mpipe.worker", "numpy"]


def context() -> ForkServerContext:
    return multiprocessing.get_context("forkserver")


def start() -> ForkServerContext:
    """Start the forkserver now (a no-op if it runs); return its context."""
    ctx = context()
    ctx.set_forkserver_preload(PRELOAD)
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return ctx
