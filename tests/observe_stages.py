"""A tiny three-stage pipeline with one deliberately slow stage (named from YAML).

source ``numbers`` -> ``fast`` -> ``slow`` (sleeps ``params.slow_s``) -> ``tail``.
The tests expect the summary and the report to name ``slow`` as the bottleneck.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any


def numbers(ctx: Any) -> Iterator[int]:
    yield from range(int(ctx.params.get("n", 8)))


def fast(x: int) -> int:
    return x + 1


def slow(x: int, ctx: Any) -> int:
    time.sleep(float(ctx.params.get("slow_s", 0.3)))
    return x * 2


def tail(x: int) -> float:
    return float(x)


def native_threads(x: int) -> list[float]:
    """The native thread limits this worker runs with (0: not set)."""
    from mpipe.forkserver import NATIVE_THREAD_VARS

    return [float(os.environ.get(var, 0)) for var in NATIVE_THREAD_VARS]


def record_native_threads(ctx: Any) -> None:
    """A prepare: write down the native thread limits the runner runs it with."""
    import json

    from mpipe.forkserver import NATIVE_THREAD_VARS

    seen = {var: os.environ[var] for var in NATIVE_THREAD_VARS if var in os.environ}
    ctx.path("prepare-env.json").write_text(json.dumps(seen))
