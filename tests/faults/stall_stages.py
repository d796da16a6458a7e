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


def threads_take_turns(value: int, ctx: Any) -> float:
    """Three threads each hold ctx.io() for 0.3 s; returns the seconds it took."""
    import threading

    def use_the_disk() -> None:
        with ctx.io():
            time.sleep(0.3)

    start = time.monotonic()
    threads = [threading.Thread(target=use_the_disk) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - start
