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
