"""The producer process: runs the source function, decides what to skip.

It iterates the source, fingerprints each item, and puts one message per item
on the bounded source queue (blocking when it is full: backpressure, so memory
stays flat however many items the source yields).  An item already committed
with the same fingerprint, and whose outputs exist, goes out as a
:class:`SkippedItem` carrying its stored result.  The last message is one
:class:`EndOfStream`.

Messages are pickled here, before ``put``: a ``multiprocessing.Queue`` pickles
in a feeder thread and silently drops what it cannot pickle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from mpipe import imports, ledger, procs
from mpipe.context import PathEscapeError, resolve_inside
from mpipe.messages import (
    EndOfStream,
    ItemFailure,
    SkippedItem,
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


def producer_main(
    spec: ProducerSpec, out: Queue[bytes], lifeline: Connection, stop_event: Event
) -> None:
    procs.child_setup("producer", lifeline, spec.log_level)
    ctx = SourceContext(spec.params, Path(spec.workdir), spec.allow_outside_workdir)
    committed = ledger.open_for_reading(Path(spec.ledger_path)) if spec.ledger_path else None
    try:
        fn = imports.import_checked(spec.fn, spec.pipeline_dir)
        seen: set[str] = set()
        items = imports.call_with_optional_context(fn, ctx=ctx)
        for index, raw in enumerate(items):
            if stop_event.is_set() or (spec.limit is not None and index >= spec.limit):
                break
            task = raw if isinstance(raw, Task) else Task(key=str(index), value=raw)
            if task.key in seen:
                raise ValueError(f"the source yielded the key {task.key!r} twice")
            seen.add(task.key)
            out.put(dumps(_message(index, task, ctx, spec, committed)))
    except Exception as exc:
        out.put(dumps(SourceFailed(f"{type(exc).__name__}: {exc}", traceback.format_exc())))
    finally:
        if committed is not None:
            committed.close()
    out.put(dumps(EndOfStream("producer")))


def _message(
    index: int, task: Task, ctx: SourceContext, spec: ProducerSpec, committed: ledger.Ledger | None
) -> SourceItem | SkippedItem | ItemFailure:
    try:
        value = dumps(task.value)
    except Exception as exc:
        return ItemFailure(
            index=index, key=task.key, stage="source", worker="producer", kind="pickle",
            message=f"the source yielded a value that cannot be pickled: {exc}",
        )
    try:
        fingerprint = item_fingerprint(spec.config_fingerprint, task, value, ctx)
        outputs_exist = all(ctx.path(p).exists() for p in task.outputs)
    except PathEscapeError as exc:
        return ItemFailure(
            index=index, key=task.key, stage="source", worker="producer", kind="raised",
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
