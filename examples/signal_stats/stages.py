"""A three-stage user pipeline: generate -> smooth -> summarise.

Plain functions.  mpipe imports this module because it sits next to the
pipeline file (see ``allowed_modules`` in the README).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from mpipe import Task
from mpipe.exactsum import ExactSum


def signals(ctx: Any) -> Iterator[Task]:
    """The source: one item per signal, its value the seed."""
    for i in range(int(ctx.params["signals"])):
        yield Task(key=f"sig{i:04d}", value=i)


def generate(seed: int) -> np.ndarray:
    """Stage 1: a noisy sine, 20,000 samples (passed on to stage 2 by value)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 20 * np.pi, 20_000)
    return np.sin(t * (1 + seed % 7)) + rng.normal(0, 0.5, t.size)


def smooth(x: np.ndarray, ctx: Any) -> np.ndarray:
    """Stage 2: moving average over ``params.window`` samples."""
    window = int(ctx.params.get("window", 5))
    with ctx.cpu():
        return np.convolve(x, np.ones(window) / window, mode="valid")


def summarise(x: np.ndarray) -> np.ndarray:
    """Stage 3: four numbers per signal."""
    return np.array([x.mean(), x.std(), x.min(), x.max()])


def add_up(summaries: Iterable[np.ndarray]) -> np.ndarray:
    """The consumer: element-wise sum, exact and order-independent."""
    total = ExactSum()
    for s in summaries:
        total.add(s)
    return total.value() if total.count else np.zeros(4)
