"""A stage that allocates and drops arrays as the notes' tasks do, and counts its page faults."""

from __future__ import annotations

import resource
from typing import Any

import numpy as np

ARRAYS = 26
SAMPLES = 327_680  # 1.25 MiB of float32 each, as the notes' inputs
PAGES_PER_ITEM = ARRAYS * SAMPLES * 4 // 4096


def numbers(ctx: Any) -> range:
    return range(int(ctx.params["n"]))


def churn(value: int) -> float:
    """The minor page faults it took to fill 26 fresh arrays (all freed on return)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.full(SAMPLES, value, dtype=np.float32) for _ in range(ARRAYS)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert all(a[-1] == value for a in arrays)
    return float(faults)
