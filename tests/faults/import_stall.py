"""A stage module whose import, in a stage's worker, takes ``$MPIPE_TEST_IMPORT_S``.

Only in workers (their process name starts with ``mpipe-slow-``): the child
that checks the config's names imports it at once, so a run starts as usual
and its items wait in the stage's queue for a worker still importing.
"""

from __future__ import annotations

import os
import time
from typing import Any

with open("/proc/self/comm") as _comm:
    if _comm.read().startswith("mpipe-slow-"):
        time.sleep(float(os.environ.get("MPIPE_TEST_IMPORT_S", "0")))


def numbers(ctx: Any) -> range:
    return range(int(ctx.params["n"]))


def same(value: int) -> int:
    return value


def as_float(value: int) -> float:
    return float(value)
