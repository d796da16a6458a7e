"""A stage module that takes 1.5 s to import, as one importing torch does.

Item 0's first attempt kills its worker: its retry, and the items after it,
go to a fresh worker that is still importing this module.
"""

from __future__ import annotations

import os
import time
from typing import Any

time.sleep(1.5)


def numbers(ctx: Any) -> range:
    return range(4)


def quick_but_crashes_once(value: int, ctx: Any) -> float:
    if value == 0 and ctx.attempt == 1:
        os._exit(1)
    return float(value)
