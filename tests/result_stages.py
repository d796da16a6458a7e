"""Last stages and consumers that return what results.h5 cannot hold."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def numbers(ctx: Any) -> range:
    return range(int(ctx.params["n"]))


def none_for_two(value: int) -> float | None:
    return None if value == 2 else float(value)


def total(values: Iterable[float]) -> float:
    return float(sum(values))


def summary(values: Iterable[float]) -> dict[str, float]:
    listed = list(values)
    return {"n": len(listed), "mean": sum(listed) / len(listed)}
