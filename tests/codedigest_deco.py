"""A decorator from another module than the stage's, without functools.wraps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def inner(value: Any) -> Any:
        return fn(value)
    return inner
