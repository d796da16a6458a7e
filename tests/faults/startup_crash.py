"""A stage module whose workers cannot start.

``mpipe run`` checks the config's names by importing them in one child before
the run; the stage's workers import the module again when they start.  Here
the first import (the check) succeeds and records itself in the file named by
``STARTUP_CRASH_MARK``; every later one (each worker) raises, as a module that
fails only in the workers (a resource held by the first importer, a flaky
start-up) would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_mark = Path(os.environ["STARTUP_CRASH_MARK"])
if _mark.exists():
    raise RuntimeError("this stage's workers cannot start")
_mark.touch()


def process(value: Any) -> Any:
    return value
