"""Stages that do (almost) nothing, to measure what mpipe costs per item.

A three-stage pipeline of these over ``params.items`` integers spends its time
in mpipe itself (pickling, pipes, the runner's loop, the writer's commits):
``(wall(N items) - wall(0 items)) / N`` is mpipe's per-item overhead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

logger = logging.getLogger(__name__)


def source(ctx: Any) -> Iterator[int]:
    yield from range(int(ctx.params.get("items", 0)))


def add_one(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return 2 * x


def as_float(x: int) -> float:
    # The last stage must return a number: the writer stores it as a row.
    return float(x)


def total(values: Iterable[float]) -> float:
    return float(sum(values))
