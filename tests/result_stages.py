"""Last stages and consumers that return what results.h5 cannot hold."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def numbers(ctx: Any) -> range:
    return range(int(ctx.params["n"]))


def none_for_two(value: int) -> float | None:
    return None if value == 2 else float(value)


def lock_for_two(value: int) -> object:
    import threading

    return threading.Lock() if value == 2 else float(value)


class _OutOfMemoryWhenPickled:
    def __reduce__(self) -> Any:
        raise MemoryError("no memory left to pickle this")


def out_of_memory_for_two(value: int) -> object:
    return _OutOfMemoryWhenPickled() if value == 2 else float(value)


class ArrayRaising:
    """A picklable value whose conversion to an array raises ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc


def total(values: Iterable[float]) -> float:
    return float(sum(values))


def summary(values: Iterable[float]) -> dict[str, float]:
    listed = list(values)
    return {"n": len(listed), "mean": sum(listed) / len(listed)}


def as_float(value: int) -> float:
    return float(value)


def log_only(values: Iterable[float]) -> None:
    for _ in values:
        pass


def complex_total(values: Iterable[float]) -> complex:
    return complex(sum(values), 1.0)


class _Unarrayable:
    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this value refuses to become an array")


def unarrayable(value: int) -> Any:
    return _Unarrayable() if value == 1 else float(value)


def numbers_zero_last(ctx: Any) -> Iterable[Any]:
    """Keys "0".."n-1"; with MPIPE_TEST_ZERO_LAST set, "0" comes last, a second later."""
    import os
    import time

    from mpipe import Task

    n = int(ctx.params["n"])
    if not os.environ.get("MPIPE_TEST_ZERO_LAST"):
        yield from (Task(key=str(v), value=v) for v in range(n))
        return
    yield from (Task(key=str(v), value=v) for v in range(1, n))
    time.sleep(1.0)
    yield Task(key="0", value=0)


def three_for_zero(value: int) -> list[float]:
    """A row of 3 for item 0, of 2 for the others: results.h5 takes one shape."""
    return [float(value)] * (3 if value == 0 else 2)


def vector_total(values: Iterable[list[float]]) -> float:
    return float(sum(sum(v) for v in values))


def wide_row(value: int) -> Any:
    """256 KiB of float64 per item: a few fill a small disk's ledger."""
    import numpy as np

    return np.full(32768, float(value))


def escapes_for_two(value: int, ctx: Any) -> float:
    """Item 2 asks for a path outside the workdir: every attempt would."""
    if value == 2:
        ctx.path("../elsewhere")
    return float(value)


def source_returning_none(ctx: Any) -> None:
    """A source written to fill a list it forgot to return."""


def source_with_a_repeated_key(ctx: Any) -> Iterable[Any]:
    from mpipe import Task

    yield Task(key="a", value=1)
    yield Task(key="a", value=2)


def numbers_replays_last(ctx: Any) -> Iterable[Any]:
    """Keys "0".."5"; with MPIPE_TEST_REPLAYS_LAST set, "3".."5" first, then
    "0".."2" 1.5 s later (the ones an earlier ``--limit 3`` run committed)."""
    import os
    import time

    from mpipe import Task

    if not os.environ.get("MPIPE_TEST_REPLAYS_LAST"):
        yield from (Task(key=str(v), value=v) for v in range(6))
        return
    yield from (Task(key=str(v), value=v) for v in (3, 4, 5))
    time.sleep(1.5)
    yield from (Task(key=str(v), value=v) for v in (0, 1, 2))
    mark = os.environ.get("MPIPE_TEST_MARK")
    if mark:
        open(mark, "w").close()  # the test waits for it
