"""The consumer process: folds finished items, forwards them to the writer.

The consumer function is ``fn(results)`` or ``fn(results, ctx)``: it receives an
iterator over every finished item's value (the notes' ``res += que.get()``) and
returns one final value, which the runner hands to the writer to seal into the
results file.  On a resumed run the iterator also yields the committed results
replayed from the ledger, so the final value covers the whole run.

Each batch of items is forwarded to the writer *before* the fold sees it: committing a
finished item never depends on the consumer function succeeding.  If the
function raises, the failure is reported and forwarding goes on until the end
of the stream, so that every finished item is still committed.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

from mpipe import imports, procs
from mpipe.messages import (
    ConsumerDone,
    EndOfStream,
    ProcessFailed,
    SinkBatch,
    dumps,
    loads,
)
from mpipe.producer import SourceContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    fn: str | None
    params: dict[str, Any]
    workdir: str
    allow_outside_workdir: bool
    log_level: int
    pipeline_dir: str
    writers: int = 1


def consumer_main(
    spec: ConsumerSpec,
    inbox: Queue[bytes],
    to_writer: Queue[bytes],
    conn: Connection,
    lifeline: Connection,
) -> None:
    procs.child_setup("consumer", lifeline, spec.log_level)
    stream = _Stream(inbox, to_writer)
    total: Any = None
    try:
        if spec.fn is not None:
            fn = imports.import_checked(spec.fn, spec.pipeline_dir)
            ctx = SourceContext(spec.params, Path(spec.workdir), spec.allow_outside_workdir)
            total = imports.call_with_optional_context(fn, iter(stream), ctx=ctx)
            _check_total(total, spec.fn)
        stream.drain()
        conn.send(ConsumerDone(dumps(total)))
    except _BadTotal as exc:
        conn.send(ProcessFailed("consumer", str(exc), ""))
        stream.drain()
    except Exception as exc:
        conn.send(ProcessFailed("consumer", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        stream.drain()
    finally:
        # One end marker per writer: each counts its own, and they share the queue.
        for _ in range(spec.writers):
            to_writer.put(dumps(EndOfStream("consumer")))
        # Wait until the feeder thread has handed everything to the pipe:
        # exiting earlier would lose the writer's last items.
        to_writer.close()
        to_writer.join_thread()


class _BadTotal(Exception):
    """The consumer returned what results.h5 cannot store as ``total``."""


def _check_total(total: Any, fn: str) -> None:
    # Here, not when the file is sealed: the error names the consumer.  None
    # (a consumer that only logs) stores no total; complex numbers are stored.
    if total is None:
        return
    from mpipe.rows import as_row

    try:
        as_row(total, f"the value consumer.fn {fn} returns (stored as `total`)", "biufc")
    except TypeError as exc:
        raise _BadTotal(str(exc)) from None


class _Stream:
    """Iterate finished values; forward each to the writer first."""

    def __init__(self, inbox: Queue[bytes], to_writer: Queue[bytes]) -> None:
        self._inbox = inbox
        self._to_writer = to_writer
        self._ended = False

    def __iter__(self) -> Iterator[Any]:
        while not self._ended:
            raw = self._inbox.get()
            message = loads(raw)
            if isinstance(message, EndOfStream):
                self._ended = True
                return
            assert isinstance(message, SinkBatch), message
            self._to_writer.put(raw)
            for item in message.items:
                yield loads(item.value)

    def drain(self) -> None:
        for _ in self:
            pass
