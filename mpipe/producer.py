"""The producer process: runs the source function, decides what to skip.

It iterates the source, fingerprints each item, and sends the items in
:class:`SourceBatch` messages on the bounded source queue (blocking when it is
full: backpressure, so memory stays flat however many items the source yields).
An item already committed with the same fingerprint, and whose outputs exist,
goes out as a :class:`SkippedItem` carrying its stored result.  The last
message is one :class:`EndOfStream`.

Batches form by themselves, never by waiting (:class:`_Sender`): a thread sends
whatever the source yielded since its last send.  A slow source's items go one
by one as they come; a fast one's go up to ``batch_max`` at a time, so that a
run of quick items pays one queue message per batch instead of per item.

Messages are pickled here, before ``put``: a ``multiprocessing.Queue`` pickles
in a feeder thread and silently drops what it cannot pickle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

from mpipe import imports, ledger, procs
from mpipe.context import PathEscapeError, StopFlag, resolve_inside
from mpipe.messages import (
    EndOfStream,
    ItemFailure,
    SkippedItem,
    SourceBatch,
    SourceFailed,
    SourceItem,
    Task,
    dumps,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What a source function ``fn(ctx)`` may use."""

    params: dict[str, Any]
    workdir: Path
    allow_outside_workdir: bool

    def path(self, relative: str | Path) -> Path:
        return resolve_inside(self.workdir, relative, allow_outside=self.allow_outside_workdir)


@dataclass(frozen=True, slots=True)
class ProducerSpec:
    fn: str
    params: dict[str, Any]
    workdir: str
    allow_outside_workdir: bool
    config_fingerprint: str
    ledger_path: str | None  # None: --fresh, or nothing committed yet
    log_level: int
    pipeline_dir: str
    limit: int | None = None  # --limit: stop after this many items
    batch_max: int = 1  # items per SourceBatch at most (see source_queue_bounds)


# The source queue holds this many batches: with batches of at most
# queue_size / SOURCE_BATCHES items it holds at most source.queue_size items.
SOURCE_BATCHES = 2


def source_queue_bounds(queue_size: int) -> tuple[int, int]:
    """(messages the source queue holds, items per batch) for ``source.queue_size``."""
    messages = min(SOURCE_BATCHES, queue_size)
    return messages, max(1, queue_size // messages)


def producer_main(
    spec: ProducerSpec, out: Queue[bytes], lifeline: Connection, stop_event: StopFlag
) -> None:
    procs.child_setup("producer", lifeline, spec.log_level)
    ctx = SourceContext(spec.params, Path(spec.workdir), spec.allow_outside_workdir)
    committed = ledger.open_for_reading(Path(spec.ledger_path)) if spec.ledger_path else None
    sender = _Sender(out, spec.batch_max)
    failed: SourceFailed | None = None
    try:
        fn = imports.import_checked(spec.fn, spec.pipeline_dir)
        seen: set[str] = set()
        returned = imports.call_with_optional_context(fn, ctx=ctx)
        try:
            items = iter(returned)
        except TypeError:
            raise _Misuse(f"returned {type(returned).__name__}, not an iterable of items: "
                          "return a list (or any iterable) or yield the items") from None
        for index, raw in enumerate(items):
            if stop_event.is_set():
                break
            task = raw if isinstance(raw, Task) else Task(key=str(index), value=raw)
            if task.key in seen:
                raise _Misuse(f"yielded the key {task.key!r} twice: keys name items in the "
                              "ledger and must be unique")
            seen.add(task.key)
            sender.add(_message(index, task, ctx, spec, committed))
            if spec.limit is not None and index + 1 >= spec.limit:
                break  # before asking the source for one more (it may wait or cost)
    except _Misuse as exc:
        # What the source gave, not where mpipe found it: no traceback into mpipe.
        failed = SourceFailed(str(exc), "")
    except Exception as exc:
        failed = SourceFailed(f"raised {type(exc).__name__}: {exc}", traceback.format_exc())
    finally:
        if committed is not None:
            committed.close()
    sender.close()  # every item yielded before the end (or the error) goes first
    if failed is not None:
        out.put(dumps(failed))
    out.put(dumps(EndOfStream("producer")))


class _Misuse(Exception):
    """The source function gave what mpipe cannot take (said without a traceback)."""


class _Sender:
    """Sends what the source yielded, batched by a thread, never delayed.

    The thread takes everything added since its last send as one
    :class:`SourceBatch`.  While the source computes (holding the GIL) items
    accumulate, up to ``max_items``; when the source blocks, or the queue is
    full, the thread sends at once.  ``add`` blocks while ``max_items`` wait:
    beyond the queue's two batches the producer holds at most two more (the
    one being put and the next one gathering) and the item the source yielded.
    """

    def __init__(self, out: Queue[bytes], max_items: int) -> None:
        self._out = out
        self._max_items = max_items
        self._pending: list[SourceItem | SkippedItem | ItemFailure] = []
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mpipe-source-sender",
                                        daemon=True)
        self._thread.start()

    def add(self, message: SourceItem | SkippedItem | ItemFailure) -> None:
        with self._cond:
            while len(self._pending) >= self._max_items and self._error is None:
                self._cond.wait()
            self._raise_if_failed()
            self._pending.append(message)
            self._cond.notify_all()

    def close(self) -> None:
        """Return once everything added is on the queue (raise if it cannot be)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        # Items that were never sent must not be followed by an EndOfStream:
        # the process fails instead, and the runner reports the producer broken.
        if self._error is not None:
            raise RuntimeError("could not send items to the runner") from self._error

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._pending and not self._closed:
                        self._cond.wait()
                    if not self._pending:
                        return
                    batch, self._pending = tuple(self._pending), []
                    self._cond.notify_all()
                self._out.put(dumps(SourceBatch(batch)))  # blocks while the queue is full
        except BaseException as exc:
            with self._cond:
                self._error = exc
                self._cond.notify_all()


def _message(
    index: int, task: Task, ctx: SourceContext, spec: ProducerSpec, committed: ledger.Ledger | None
) -> SourceItem | SkippedItem | ItemFailure:
    try:
        value = dumps(task.value)
    except Exception as exc:
        return ItemFailure(
            seq=index, key=task.key, stage="source", worker="producer", kind="pickle",
            message=f"the source yielded a value that cannot be pickled: {exc}",
        )
    try:
        fingerprint = item_fingerprint(spec.config_fingerprint, task, value, ctx)
        outputs_exist = all(ctx.path(p).exists() for p in task.outputs)
    except PathEscapeError as exc:
        return ItemFailure(
            seq=index, key=task.key, stage="source", worker="producer", kind="raised",
            message=str(exc),
        )
    entry = committed.lookup(task.key) if committed else None
    if entry is not None and entry.fingerprint == fingerprint and outputs_exist:
        return SkippedItem(index, task.key, fingerprint, entry.value)
    return SourceItem(index, task.key, fingerprint, value)


def item_fingerprint(config_fp: str, task: Task, value: bytes, ctx: SourceContext) -> str:
    """Identify an item's work: the config, its value, its inputs' size and mtime.

    Size and mtime (as make and Snakemake do), not a content hash: hashing
    every input again on every run would cost as much as reading it.
    """
    h = hashlib.sha256()
    h.update(config_fp.encode())
    h.update(task.key.encode())
    h.update(value)
    for name in task.inputs:
        try:
            st = os.stat(ctx.path(name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"{name}:missing".encode())
    return h.hexdigest()
