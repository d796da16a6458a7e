"""What happens to an item whose attempt failed: one policy for both backends.

Used by :class:`mpipe.pool.StagePool` and :class:`mpipe.dask_backend.DaskStagePool`,
so that retries, failures and output errors mean the same thing wherever a
stage runs.  It imports nothing heavier than the messages: Dask workers import
the Dask backend, and must not pay for the config (yaml and its types).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

from mpipe.errors import HINT_SEP, MpipeError, OutputError
from mpipe.messages import ItemFailure, WorkItem

logger = logging.getLogger(__name__)


class Counts(Protocol):
    failed: int
    retries: int

    def record_failed_attempt(self, failure: ItemFailure) -> None: ...


def settle_failed_attempt(
    *,
    stage: str,
    item: WorkItem,
    failure: ItemFailure,
    retries: int,
    may_retry: bool,
    stats: Counts,
    queue: deque[WorkItem],
    on_failed: Callable[[str, ItemFailure], None],
    on_fatal: Callable[[MpipeError], None],
) -> None:
    """Retry ``item`` (at the front of ``queue``) or fail it for good.

    An output error (disk full, EIO) fails the item and stops the run: every
    other item would meet it too.  ``may_retry`` is False while the run stops.
    """
    stats.record_failed_attempt(failure)  # its time was the stage's too
    if failure.kind == "output":
        stats.failed += 1
        on_failed(stage, failure)
        # The failure's own message may end in the OutputError's hint: one hint.
        what, _, hint = failure.message.partition(HINT_SEP)
        on_fatal(OutputError(f"stage {stage!r}, item {item.key}: {what}",
                             hint=hint or "free space or fix the disk, then run the same "
                             "command again: finished items are kept"))
        return
    # A result that cannot be pickled or stored is the stage's code, not the
    # moment (README: retries follow an exception, a death, a timeout): the
    # item fails at once instead of running its retries.
    if item.attempt <= retries and may_retry and failure.retryable:
        stats.retries += 1
        logger.warning("%s: item %s failed (attempt %d of %d): %s; retrying",
                       stage, item.key, item.attempt, retries + 1, failure.message)
        queue.appendleft(item._replace(attempt=item.attempt + 1))
        return
    stats.failed += 1
    # The stage's first failure shows where in the user's code it happened;
    # the others only say what, not to bury the log (every one is in the report).
    where = (f"\n{failure.traceback.rstrip()}" if stats.failed == 1 and failure.traceback
             else " (its traceback is in the run report)" if failure.traceback else "")
    why = (" (not retried: another attempt would fail the same way)"
           if not failure.retryable and item.attempt <= retries else "")
    logger.error("%s: item %s failed for good after %d attempt(s)%s: %s%s",
                 stage, item.key, item.attempt, why, failure.message, where)
    on_failed(stage, failure)
