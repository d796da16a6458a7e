"""Sources, stages and consumers that die or wait at the worst moment.

For tests/faults/test_stalls.py: each makes the runner wait on something (a
half-written message, a full queue, a source asleep in its own code, a
consumer finishing slowly) that must never hold the run for ever.  Durations
come from params.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Iterator
from typing import Any


def big_then_killed(ctx: Any) -> Iterator[bytes]:
    """4 MB values (larger than a pipe holds); SIGKILLed before item ``die_at``,
    while its queue's feeder thread is likely still writing an earlier one."""
    for i in range(50):
        if i == int(ctx.params["die_at"]):
            os.kill(os.getpid(), signal.SIGKILL)
        yield bytes([i]) * 4_000_000


def numbers(ctx: Any) -> Iterator[int]:
    """``n`` numbers, sleeping ``gap_s`` after each (a source polling for work)."""
    for i in range(int(ctx.params["n"])):
        yield i
        time.sleep(float(ctx.params.get("gap_s", 0)))


def length(value: bytes) -> int:
    return len(value)


def slowly(value: int, ctx: Any) -> float:
    time.sleep(float(ctx.params.get("item_s", 0)))
    return float(value)


def slow_total(values: Iterable[float], ctx: Any) -> float:
    """Sleeps ``per_item_s`` per value, then ``end_s`` before returning."""
    total = 0.0
    for v in values:
        total += v
        time.sleep(float(ctx.params.get("per_item_s", 0)))
    time.sleep(float(ctx.params.get("end_s", 0)))
    return total


def _helper_that_computes(value: int, ctx: Any) -> float:
    with ctx.cpu():  # also called on its own elsewhere
        return float(value * 2)


def nested_cpu(value: int, ctx: Any) -> float:
    """Takes a cpu slot, then calls a helper that takes one too."""
    with ctx.cpu():
        time.sleep(0.1)
        with ctx.io(), ctx.io():
            pass
        return _helper_that_computes(value, ctx)



def threads_inside_a_block(value: int, ctx: Any) -> float:
    """Inside ctx.io(), a thread pool whose tasks take ctx.io() too (a helper
    used alone elsewhere); returns how many of them ran."""
    from concurrent.futures import ThreadPoolExecutor

    def helper(i: int) -> int:
        with ctx.io():
            time.sleep(0.05)
            return 1

    with ctx.io(), ThreadPoolExecutor(3) as pool:
        return float(sum(pool.map(helper, range(3))))
