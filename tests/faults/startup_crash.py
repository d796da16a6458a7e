"""A stage module whose workers cannot start: its function exists only in the
runner (which imports it to check the config), not in the forkserver's
children, where ``sys.argv[0]`` is ``-c``."""

from __future__ import annotations

import sys
from typing import Any

if sys.argv and sys.argv[0] != "-c":

    def process(value: Any) -> Any:
        return value
