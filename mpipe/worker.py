"""A stage worker process: runs items the runner sends, in order.

Each worker has its own duplex pipe to the runner, which knows every item the
worker holds (one, or a few for quick stages: see "Prefetch" in mpipe.pool),
and the worker marks the item it is running in shared memory, so that the
runner can retry exactly that item on a fresh worker if this one dies.  (A
worker that pulled from a shared queue could die between ``get()`` and saying
what it took, or die holding the queue's read lock and wedge every other
reader: the docs' "Avoid terminating processes".)

It reads :class:`WorkBatch` messages, calls the stage function on each item,
and answers with :class:`ReplyBatch` messages of :class:`ItemDone` or
:class:`ItemFailure`.  It pickles the result itself, so an
unpicklable result is reported with its item instead of being lost.  It exits
on :class:`Shutdown`, on EOF from the runner, or when its lifeline breaks.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Semaphore
from pathlib import Path
from typing import Any, Protocol

from mpipe import allocator, imports, outputs, procs
from mpipe.context import PathEscapeError, SlotFlags, StageContext, StopFlag
from mpipe.errors import OutputError
from mpipe.messages import (
    ItemDone,
    ItemFailure,
    ReplyBatch,
    Shutdown,
    WorkBatch,
    WorkerReady,
    WorkItem,
    dumps,
    loads,
)
from mpipe.outputs import output_error

logger = logging.getLogger(__name__)

# Errors no retry can fix and that every other item would meet too: the run
# stops (exit 74) instead of failing item after item.
FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker needs to know, picklable."""

    stage: str
    name: str
    slot: int
    fn: str
    params: dict[str, Any]
    workdir: str
    fsync: bool
    allow_outside_workdir: bool
    log_level: int
    pipeline_dir: str
    last_stage: bool = False  # its values go to results.h5: they must be numbers
    keep_freed_memory_mb: int = 0  # mpipe.allocator; 0: the C library's settings


def worker_main(
    spec: WorkerSpec,
    conn: Connection,
    lifeline: Connection,
    io_semaphore: Semaphore,
    cpu_semaphore: Semaphore,
    stop_event: StopFlag,
    flags: Any,
    running: Any,
) -> None:
    procs.child_setup(spec.name, lifeline, spec.log_level)
    # Before the stage's module is imported: what it allocates counts too.
    allocator.keep_freed_memory(spec.keep_freed_memory_mb)
    fn = imports.import_checked(spec.fn, spec.pipeline_dir)
    with_ctx = imports.takes_context(fn, 1)
    ctx = StageContext(
        stage=spec.stage,
        worker=spec.name,
        params=spec.params,
        workdir=Path(spec.workdir),
        fsync=spec.fsync,
        allow_outside_workdir=spec.allow_outside_workdir,
        io_semaphore=io_semaphore,
        cpu_semaphore=cpu_semaphore,
        stop_event=stop_event,
        flags=SlotFlags(flags, spec.slot),
    )
    conn.send(WorkerReady(os.getpid()))
    try:
        _serve(conn, fn, with_ctx, ctx, running, spec.slot, spec.last_stage)
        outputs.exit_if_temporaries_left()  # the stage's threads end first
    finally:
        # Also when the stage raised SystemExit.  Multiprocessing's finalizers
        # first, as at any exit (a Pool the stage kept stops its own workers;
        # a no-op the second time), then what the stage's processes left, and
        # only then its threads: one waiting on a child returns once the child
        # is gone.
        try:
            _multiprocessing_exit()
        finally:
            _end_stage_processes_then_threads()


def _end_stage_processes_then_threads() -> None:
    """End what the stage's processes left, then wait for its threads.

    Again while a thread is alive: one that was about to start a tool as the
    stage raised starts it after the first pass (a race a loaded machine
    shows), and waits on it until the next pass ends it.
    """
    me = threading.current_thread()
    while True:
        procs.end_what_this_process_left()
        alive = [t for t in threading.enumerate()
                 if t is not me and not t.daemon and t.is_alive()]
        if not alive:
            return
        alive[0].join(0.1)


def _multiprocessing_exit() -> None:
    from multiprocessing import util

    util._exit_function()  # type: ignore[attr-defined]


# Replies of quick items are sent together; a reply never waits longer than this.
REPLY_BATCH_S = 0.005
REPLY_BATCH_MAX = 64


def _serve(conn: Connection, fn: Any, with_ctx: bool, ctx: StageContext, running: Any,
           slot: int, last_stage: bool) -> None:
    inbox: deque[WorkItem] = deque()
    replies: list[ItemDone | ItemFailure] = []
    row_check: Callable[[Any, str], Any] | None = None
    if last_stage:
        from mpipe.rows import as_row

        row_check = as_row
    oldest_reply = 0.0

    def flush() -> None:
        if replies:
            conn.send(ReplyBatch(tuple(replies)))
            replies.clear()

    def take(message: object) -> bool:
        if isinstance(message, Shutdown):
            return False
        assert isinstance(message, WorkBatch), message
        inbox.extend(message.items)
        return True

    while True:
        try:
            if not inbox:
                flush()  # nothing else to do: send what is pending, then wait
                if not take(conn.recv()):
                    return
            while conn.poll():
                if not take(conn.recv()):
                    flush()
                    return
        except EOFError:
            return
        item = inbox.popleft()
        # Written before the item starts, so that if this process dies the
        # runner charges the death to this item and no other (see mpipe.pool).
        running[slot] = item.seq
        reply, exit_code = _run_one(fn, with_ctx, ctx, item, row_check=row_check)
        running[slot] = -1
        if not replies:
            oldest_reply = time.perf_counter()
        replies.append(reply)
        if exit_code is not None:
            # The stage raised SystemExit or KeyboardInterrupt: end this
            # process as it asked; the runner starts a fresh worker.
            flush()
            raise SystemExit(exit_code)
        quick = isinstance(reply, ItemDone) and reply.busy_s < REPLY_BATCH_S
        if (not quick or len(replies) >= REPLY_BATCH_MAX
                or time.perf_counter() - oldest_reply >= REPLY_BATCH_S):
            flush()


class RunContext(Protocol):
    """What :func:`_run_one` needs of a context: a local worker's or a Dask task's."""

    stage: str
    worker: str
    key: str
    attempt: int
    cpu_wait_s: float

    @property
    def io_s(self) -> float: ...

    @property
    def output_commit_s(self) -> float: ...

    def reset_times(self) -> None: ...


def _run_one(
    fn: Any, with_ctx: bool, ctx: RunContext, item: WorkItem, *,
    row_check: Callable[[Any, str], Any] | None = None,
) -> tuple[ItemDone | ItemFailure, int | None]:
    """Run one item; ``row_check`` (mpipe.rows.as_row) for the last stage's values."""
    ctx.key, ctx.attempt = item.key, item.attempt
    ctx.reset_times()
    started_at = time.time()
    start = time.perf_counter()

    def failure(kind: str, message: str, exc: BaseException | None = None, *,
                retryable: bool = True) -> ItemFailure:
        return ItemFailure(
            seq=item.seq,
            key=item.key,
            stage=ctx.stage,
            worker=ctx.worker,
            kind=kind,
            message=message,
            traceback=traceback.format_exc() if exc is not None else "",
            exception=_pickle_or_none(exc),
            retryable=retryable,
            busy_s=time.perf_counter() - start,
            started_at=started_at,
            io_s=ctx.io_s,
            cpu_wait_s=ctx.cpu_wait_s,
        )

    try:
        value = loads(item.value)
    except Exception as exc:
        return failure("pickle", f"the item's value could not be unpickled: {exc!r}", exc), None
    try:
        result = fn(value, ctx) if with_ctx else fn(value)
    except OutputError as exc:
        return failure("output", str(exc), exc), None
    except PathEscapeError as exc:
        # The stage asked for a path outside the workdir: so would every attempt.
        return failure("raised", f"{type(exc).__name__}: {exc}", exc, retryable=False), None
    except OSError as exc:
        if exc.errno in FATAL_ERRNOS:
            return failure("output", str(output_error(exc, Path(exc.filename or "?"), "write")),
                           exc), None
        return failure("raised", f"{type(exc).__name__}: {exc}", exc), None
    except Exception as exc:
        return failure("raised", f"{type(exc).__name__}: {exc}", exc), None
    except BaseException as exc:
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1
        message = f"the stage raised {type(exc).__name__}{exc.args!r}; its worker exits"
        return failure("exit", message, exc), code
    try:
        payload = dumps(result)
    except Exception as exc:
        message = f"the stage returned a {type(result).__name__} that cannot be pickled: {exc}"
        return failure("pickle", message, exc, retryable=_transient(exc)), None
    if row_check is not None:
        # Here, not in the writer: the consumer folds the value first, and
        # a None there would break the whole run, blamed on the consumer.
        try:
            row_check(result, "the last stage's value")
        except TypeError as exc:
            # as_row turns whatever np.asarray raised into a TypeError; the
            # original is its __context__.
            return failure("result", str(exc),
                           retryable=_transient(exc.__context__)), None
    done = ItemDone(
        seq=item.seq,
        key=item.key,
        worker=ctx.worker,
        value=payload,
        busy_s=time.perf_counter() - start,
        io_s=ctx.io_s,
        cpu_wait_s=ctx.cpu_wait_s,
        started_at=started_at,
        output_commit_s=ctx.output_commit_s,
    )
    return done, None


def _transient(exc: BaseException | None) -> bool:
    """An error of the moment, not of the value: another attempt may pass."""
    return isinstance(exc, MemoryError | OSError)


def _pickle_or_none(exc: BaseException | None) -> bytes | None:
    if exc is None:
        return None
    try:
        return dumps(exc)
    except Exception:
        return None
