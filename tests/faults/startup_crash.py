"""A stage module whose workers cannot start: its function exists only in the
runner (which imports it to check the config), not in the runner's children,
which import it again by name when they start."""

from __future__ import annotations

import multiprocessing
from typing import Any

if multiprocessing.parent_process() is None:

    def process(value: Any) -> Any:
        return value
