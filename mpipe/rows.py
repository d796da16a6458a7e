"""What a value must be to be stored in results.h5: a number or a numeric array.

Checked where the value is made, so that a bad one is named where it comes
from: the last stage's worker fails the item (before the consumer folds it),
the consumer process refuses its own total (before the results file is
sealed), and the writer checks every row again.  Imported only where numpy
already is (workers, the consumer, the writers), never by the runner.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def as_row(value: Any, what: str, kinds: str = "biuf") -> np.ndarray[Any, Any]:
    """``value`` as a numeric array of one of numpy's ``kinds``; TypeError naming
    ``what`` otherwise, whatever went wrong (callers catch that alone)."""
    try:
        row = np.asarray(value)
    except Exception as exc:  # a ragged list; an __array__ that raises (a torch tensor)
        raise TypeError(f"{what} must be a number or a numeric array: "
                        f"{type(exc).__name__}: {exc}") from None
    if row.dtype.kind not in kinds:
        if row.dtype.kind == "O" and any(
                isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2**63
                for v in np.ravel(row)):
            raise TypeError(f"{what} holds an int beyond 64 bits, which results.h5 cannot "
                            "store: return a float, or the number as a string elsewhere")
        raise TypeError(
            f"{what} must be a number or a numeric array, got {type(value).__name__}")
    return row
