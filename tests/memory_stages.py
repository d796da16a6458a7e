"""A stage that allocates and drops arrays as the notes' tasks do, and counts its page faults."""

from __future__ import annotations

import resource
from typing import Any

import numpy as np

SAMPLES = 327_680  # 1.25 MiB of float32, as the notes' inputs


def pages(arrays: int) -> int:
    return arrays * SAMPLES * 4 // resource.getpagesize()


def numbers(ctx: Any) -> range:
    return range(int(ctx.params["n"]))


def churn(value: int, ctx: Any) -> float:
    """The minor page faults it took to fill ``arrays`` fresh arrays (all freed on return)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.full(SAMPLES, value, dtype=np.float32) for _ in range(ctx.params["arrays"])]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert all(a[-1] == value for a in arrays)
    return float(faults)
