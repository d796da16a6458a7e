"""Order-independent summation of float vectors.

Workers finish in any order, so a running ``total += vector`` in float64 gives
a total whose last bits depend on the schedule, and a resumed run (which replays
committed results first) would not reproduce an uninterrupted run's total bit
for bit.  Shewchuk's partials (the algorithm behind ``math.fsum``) keep the sum
exact; rounding happens once, at the end, so any order gives the same bits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class ExactSum:
    def __init__(self) -> None:
        self._partials: list[list[float]] | None = None
        self._shape: tuple[int, ...] = ()
        self.count = 0

    def add(self, vector: Any) -> None:
        values = np.asarray(vector, dtype=np.float64)
        if self._partials is None:
            self._shape = values.shape
            self._partials = [[] for _ in range(values.size)]
        elif values.shape != self._shape:
            raise ValueError(f"cannot add shape {values.shape} to a sum of shape {self._shape}")
        for partials, x in zip(self._partials, values.ravel().tolist(), strict=True):
            _add(partials, x)
        self.count += 1

    def value(self) -> np.ndarray[Any, np.dtype[np.float64]]:
        if self._partials is None:
            return np.zeros(0)
        flat = np.array([math.fsum(p) for p in self._partials], dtype=np.float64)
        return flat.reshape(self._shape)


def _add(partials: list[float], x: float) -> None:
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]
