"""Sources that log when they yield, and stages that return when they start.

The producer's batching must never hold an item back (a slow source's items go
at once) and never let the source run further ahead than the queues' bounds.
``yields.log`` in the workdir gets ``index wall-clock-time`` per item, written
just before it is yielded; each stage returns the wall clock at which it began.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any


def logged(ctx: Any) -> Iterator[int]:
    """``params.n`` items; after item ``params.pause_after`` sleep ``params.pause_s``."""
    pause_after = int(ctx.params.get("pause_after", -1))
    with open(ctx.path("yields.log"), "a", encoding="utf-8") as log:
        for i in range(int(ctx.params["n"])):
            log.write(f"{i} {time.time()!r}\n")
            log.flush()
            yield i
            if i == pause_after:
                time.sleep(float(ctx.params["pause_s"]))


def started_at(x: int, ctx: Any) -> float:
    began = time.time()
    time.sleep(float(ctx.params.get("stage_s", 0.0)))
    return began
