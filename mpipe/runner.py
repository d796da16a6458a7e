"""The runner: builds the process topology, supervises it, tears it down.

::

                      source queue                 per-worker pipes
  +----------+  (bounded mp.Queue, bytes)  +--------------------------------+
  | producer |---------------------------->|                                |
  +----------+                             |            RUNNER              |
        ^ stop_event                       |   (main process, one thread)   |
        |                                  |                                |
        |      +-----------------------+   |  stage queues: bounded deques, |
        |      | stage "a" workers x N |<->|  one per stage; an item moves  |
        |      +-----------------------+   |  to stage k+1 when stage k     |
        |      | stage "b" workers x M |<->|  returns it                    |
        |      +-----------------------+   |                                |
        |        io_slots: Semaphore       |  waits on: every pipe, every   |
        |        per stage; cpu_slots:     |  process.sentinel, the source  |
        |        one Semaphore for all     |  queue, a signal wake-up fd    |
        |                                  +--------------------------------+
        |                                     | sink queue       ^ Committed
        |                                     v (bounded)        | (pipe)
        |                               +----------+  queue  +--------+
        +-------------------------------| consumer |-------->| writer |--> results.h5.tmp
                                        +----------+         +--------+    + ledger
                                            | ConsumerDone (pipe)  ^ results lock
                                            v                      |
                                          runner --(after writer exits)--> seal: rename
                                                                   to results.h5
                                          (writer-seal waits from the start)

Who reads and writes what:

* **producer**: runs the source function; puts ``SourceBatch``es of
  ``SourceItem`` (``SkippedItem`` for an item committed by an earlier run) on
  the source queue, blocking when it is full; ends with one ``EndOfStream``.
  The runner moves them into the first stage's queue as it has room.
* **stage workers**: each says ``WorkerReady`` once its stage is imported,
  then reads ``WorkItem`` from its own pipe, calls the stage function,
  answers ``ItemDone`` or ``ItemFailure``.  One item at a time, so
  the runner always knows what a dead worker held.  Exit on ``Shutdown``.
* **runner**: moves items source -> stage 1 -> ... -> sink, never letting a
  stage's queue exceed ``queue_size`` (an item is dispatched only if the next
  queue has room for its result: backpressure up to the producer).  Retries
  failed attempts, kills items past ``timeout_s``, replaces dead workers,
  sends the sink one ``EndOfStream`` when every item is through.
* **consumer**: folds finished values (the consumer function), forwards each
  ``SinkBatch`` (the items that finished in one runner loop iteration) to the
  writer first, sends ``ConsumerDone`` with the fold's value, then one
  ``EndOfStream`` per writer.
* **writer** (``writer.workers``, default 1): the only processes that open
  HDF5; each takes a batch, and under the results lock (deadline
  ``lock_timeout_s``) opens the file, writes the rows, closes it and commits
  them to the ledger; acknowledges ``Committed``; ends on its own
  ``EndOfStream`` (the consumer sends one per writer).  A last writer-side
  process (seal) adds the total and metadata and renames the file into place.

Nothing here sleeps to find out what happened: the loop blocks in one epoll
set (:mod:`mpipe.waiter`, ``multiprocessing.connection.wait`` without the
per-call set-up) until a message, a process exit, a signal or the nearest item
deadline.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import signal
import socket
import sqlite3
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Protocol

from mpipe import forkserver, imports, outputs, procs
from mpipe.config import LoadedConfig
from mpipe.consumer import ConsumerSpec, consumer_main
from mpipe.context import StopFlag
from mpipe.errors import (
    ONE_ROW_SHAPE,
    InterruptedRunError,
    ItemsFailedError,
    MpipeError,
    OutputError,
    PipelineBrokenError,
)
from mpipe.ledger import Ledger
from mpipe.messages import (
    Committed,
    ConsumerDone,
    EndOfStream,
    ItemDone,
    ItemFailure,
    ProcessFailed,
    Sealed,
    SinkBatch,
    SinkItem,
    SkippedItem,
    SourceBatch,
    SourceFailed,
    SourceItem,
    WorkItem,
    dumps,
    loads,
)
from mpipe.pool import Pool, Shared, StagePool
from mpipe.producer import ProducerSpec, SourceContext, producer_main, source_queue_bounds
from mpipe.runlock import RunLock
from mpipe.sealer import Sealer
from mpipe.state import RunPaths, config_fingerprint, run_metadata
from mpipe.waiter import Waiter
from mpipe.worker import WorkerSpec
from mpipe.writer import SealSpec, WriterSpec, writer_main

logger = logging.getLogger(__name__)

# How long the consumer and writer get to finish after the last item is in.
SINK_DEADLINE_S = 120.0
# The workdir is walked whole for leftovers at least this often (_remove_leftovers).
FULL_WALK_EVERY_S = 86400.0
# The same signal again within this is the first one's echo, not a second
# request: coreutils' `timeout` signals the runner, then its whole process group.
SAME_STOP_REQUEST_S = 0.2


class ProgressReporter(Protocol):
    """Shows a run's progress; ``snapshot()`` returns :meth:`Runner.snapshot`."""

    def start(self, snapshot: Callable[[], dict[str, Any]]) -> None: ...
    def stop(self) -> None: ...


@dataclass
class RunResult:
    status: str  # "complete" | "items_failed" | "interrupted" | "broken"
    produced: int = 0
    committed: int = 0
    skipped: int = 0
    failed: int = 0
    not_started: int = 0
    failures: list[ItemFailure] = field(default_factory=list)
    stages: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    startup_s: float = 0.0
    error: MpipeError | None = None
    results_path: str | None = None
    # numpy's, h5py's and HDF5's, from the sealer (messages.Sealed)
    versions: dict[str, str] = field(default_factory=dict)
    loop_started_at: float = 0.0  # wall clock when the loop began, after start-up


class Runner:
    """Run one pipeline.  A context manager: no child outlives the ``with``."""

    def __init__(self, loaded: LoadedConfig, *, fresh: bool = False,
                 log_level: int = logging.WARNING,
                 prepare: Callable[..., Any] | None = None,
                 limit: int | None = None,
                 progress: ProgressReporter | None = None,
                 sealer: Sealer | None = None,
                 reports: Sequence[Path] = ()) -> None:
        self.loaded = loaded
        self._prepare = prepare
        self._limit = limit
        self._progress = progress
        self._dask: Any = None
        self._dask_connecting: Future[Any] | None = None
        self.config = loaded.config
        self.paths = RunPaths.for_config(loaded)
        self.fresh = fresh
        self.log_level = log_level
        self._lock = RunLock(self.paths.lock)
        self._mp = forkserver.context()
        self._children: list[BaseProcess] = []
        self._pools: list[Pool] = []
        self._signals: list[tuple[int, float]] = []  # (signum, time.monotonic())
        self._interruptible = False  # see _on_signal
        self._stopped_before_run: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._old_wakeup_fd = -1
        self._t0 = time.monotonic()
        self.prepare_s = 0.0
        self._startup_s = 0.0  # set once the processes are up
        self._loop_started_at = 0.0  # wall clock, set when the loop begins
        self._sealer = sealer
        self._reports = list(reports)  # written by the caller after the run (_mark_clean_exit)
        self._seal_reply: object = None  # what the sealer answered, read in teardown
        # When the workdir was last walked for leftovers, once this run has
        # removed them (_remove_leftovers); None before, and after teardown.
        self._walked_at: float | None = None

    # ------------------------------------------------------------------ set-up

    def __enter__(self) -> Runner:
        self._t0 = time.monotonic()
        self._lock.acquire()
        try:
            # Before the workdir's leftover walk (seconds on a large workdir)
            # and prepare: a SIGTERM there used to kill mpipe without a report
            # (and, as PID 1, to be lost); now it stops them where they are.
            self._install_signal_handlers()
            self._interruptible = True
            try:
                self._prepare_workdir()
            except _Stopped as stop:
                raise InterruptedRunError(stop.signum, 0) from None
            finally:
                self._interruptible = False
            if self._prepare is not None:
                # Under the run lock: no other run reads inputs while they are made.
                t = time.monotonic()
                ctx = SourceContext(dict(self.config.params), self.paths.workdir,
                                    self.config.allow_outside_workdir)
                try:
                    self._call_prepare(ctx)
                except _Stopped as stop:
                    raise InterruptedRunError(stop.signum, 0) from None
                except KeyboardInterrupt:  # raised by the prepare's own code
                    raise InterruptedRunError(signal.SIGINT, 0) from None
                except MpipeError:
                    raise  # a path outside the workdir, ...: its own message and code
                except SystemExit as exc:
                    # A prepare written as a script ends with sys.exit(0): left
                    # alone, the run would end "successfully" with nothing done.
                    raise PipelineBrokenError(
                        f"the prepare function {self._prepare_name} called "
                        f"sys.exit({exc.code!r})",
                        hint="a prepare returns to let the run go on and raises to "
                        "stop it; nothing was started") from None
                except Exception as exc:
                    name = self._prepare_name
                    raise PipelineBrokenError(
                        f"the prepare function {name} raised "
                        f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
                        hint="nothing was started; fix what it needs, then run the "
                        "same command again") from exc
                self.prepare_s = time.monotonic() - t
            if self._stopped_before_run is not None:
                # A prepare that caught everything (`except BaseException`)
                # went on: the stop still holds.
                raise InterruptedRunError(self._stopped_before_run, 0)
            # After prepare: a user's prepare may fork, which a process with a
            # thread starting a cluster should not do.
            self._start_dask_early()
            self._t0 = time.monotonic()
            try:
                self._start()
            except OSError as exc:  # EMFILE for a pipe, ENOSPC in /dev/shm for a lock
                if not procs.is_limit(exc):
                    raise  # a Dask timeout, a bug: not a limit of this machine
                raise procs.cannot_start("the pipeline's processes", exc) from None
        except BaseException:
            self._teardown(grace_s=0)
            raise
        return self

    def _call_prepare(self, ctx: SourceContext) -> None:
        """Run prepare; a stop signalled meanwhile wins over what it then raised."""
        assert self._prepare is not None
        self._interruptible = True  # a signal now raises _Stopped in it, once
        try:
            imports.call_with_optional_context(self._prepare, ctx=ctx)
        except (Exception, SystemExit):
            if self._stopped_before_run is not None:
                # The prepare's own code turned the stop into another error.
                raise _Stopped(self._stopped_before_run) from None
            raise
        finally:
            self._interruptible = False

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._teardown(grace_s=0 if exc is not None else self.config.shutdown_grace_s)

    @property
    def _prepare_name(self) -> str:
        return self.config.prepare.fn if self.config.prepare else "prepare"

    def _remove_leftovers(self) -> list[Path]:
        """Delete the temporary files and directories an earlier run left (mpipe.outputs).

        Walking the workdir takes time in proportion to its files (8 ms for the
        benchmarks' 6,000, seconds for millions of inputs), on every run.  So
        the walk is skipped when the last run to hold the lock marked that it
        left nothing behind (:meth:`_mark_clean_exit`), unless the last walk is
        a day old: what no process of mpipe's knows it left (a straggler of a
        run killed long before) is found within a day.  The mark is taken away
        first, so that a run that dies leaves none.  The state directory, where
        reports are written after the lock is released, is looked at always.
        """
        mark = self.paths.clean_exit
        try:
            walked_at = float(mark.read_text())
        except (OSError, ValueError):  # no mark (or a torn one): walk
            walked_at = 0.0
        now = time.time()
        # Gone for good before this run makes any temporary file.
        outputs.unlink_durably(mark, fsync=self.config.fsync)
        if 0 <= now - walked_at < FULL_WALK_EVERY_S:
            found = outputs.remove_leftovers(mark.parent)
        else:
            found = outputs.remove_leftovers(self.paths.workdir)
            walked_at = now
        left = {p for p in found if os.path.lexists(p)}
        if left:
            # An NFS .nfs* entry of a file still open, a read-only directory:
            # not marked clean, so the next run tries again.
            logger.warning("could not remove %d leftover(s), e.g. %s: the next run tries again",
                           len(left), min(left))
        self._walked_at = None if left else walked_at
        return [p for p in found if p not in left]

    def _mark_clean_exit(self) -> None:
        """Tell the next run that this one left no temporary file anywhere.

        Said only of a run that sealed its results and whose every process
        (workers, producer, consumer, writers, the sealer that sealed) exited
        by itself with 0: a process that died or was killed may have been
        writing one, and one that knows it left one exits with
        :data:`mpipe.outputs.TEMPORARIES_LEFT_EXIT`.  A stage on Dask never
        says it (its workers are not mpipe's to watch).
        Written under the run lock; if it cannot be, the next run walks.  It
        holds when the workdir was last walked whole.
        """
        for report in self._reports:
            if not self._in_state_dir_or_outside(report):
                # Written after the lock is released, its temporary is in no
                # directory the next run would look at.
                logger.debug("not marking a clean exit: the report %s is in the workdir",
                             report)
                return
        try:
            self.paths.clean_exit.write_text(repr(self._walked_at))
        except OSError as exc:
            logger.debug("cannot mark a clean exit (%s): the next run looks for leftovers", exc)

    def _in_state_dir_or_outside(self, report: Path) -> bool:
        """Whether ``report``'s temporary (made beside it) is looked for after a clean exit."""
        try:
            where = report.parent.resolve()
            workdir = self.paths.workdir.resolve()
            state = self.paths.clean_exit.parent.resolve()
        except (OSError, RuntimeError):  # a symlink loop: say no
            return False
        return where.is_relative_to(state) or not where.is_relative_to(workdir)

    def _prepare_workdir(self) -> None:
        try:
            removed = self._remove_leftovers()
            if self.fresh and self.paths.ledger.exists():
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self.paths.ledger}{suffix}").unlink(missing_ok=True)
        except OSError as exc:
            raise outputs.output_error(exc, Path(exc.filename or self.paths.workdir),
                                       "remove") from None
        if removed:
            logger.warning("removed %d temporary file(s) left by an interrupted run", len(removed))
        # Found now, before any compute starts, not after an hour of work.
        outputs.check_writable(self.paths.results.parent)
        outputs.check_writable(self.paths.ledger.parent)
        for extra in self.paths.output_dirs:
            outputs.check_writable(extra)
        # Create the ledger's schema before any child starts: the producer
        # reads it while the writer opens it, and must never see a half-made
        # database.  Closed at once: no connection crosses into a child.
        try:
            Ledger(self.paths.ledger, fsync=self.config.fsync).close()
        except sqlite3.Error as exc:  # not a database, locked, disk full
            raise OutputError(
                f"cannot open the resume ledger {self.paths.ledger}: {exc}",
                hint="if another program holds it, wait; if it is damaged, move it away "
                "(or run with --fresh): its items are then computed again") from None

    def _install_signal_handlers(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # The C-level handler writes the signal number to this socket, which the
        # main loop waits on: a signal wakes it at once (PEP 475 would otherwise
        # resume the wait after the Python handler ran).
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno())
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Explicit handlers: as PID 1 in a container the kernel applies no
            # default action to SIGTERM.
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._interruptible:
            # The leftover walk, prepare (the user's code): nothing started
            # yet, nothing to finish: stop them where they are.  Once: an
            # echo (`timeout` signals the group too) must not raise again
            # while the first is being handled.
            self._interruptible = False
            self._stopped_before_run = signum  # if prepare's own code swallows the raise
            raise _Stopped(signum)
        self._signals.append((signum, time.monotonic()))

    def _start(self) -> None:
        cfg = self.config
        forkserver.start()  # `mpipe run` started it already, overlapping its own imports
        self._lifeline_r, self._lifeline_w = self._mp.Pipe(duplex=False)
        self.stop_event = StopFlag(self._mp.RawArray("b", 1))
        self.results_lock = self._mp.Lock()
        n_slots = sum(self.loaded.worker_count(name) for name in cfg.stages)
        self._flags = self._mp.RawArray("b", 2 * n_slots)
        self._running = self._mp.RawArray("q", max(n_slots, 1))
        self._shared = Shared(
            lifeline=self._lifeline_r,
            # Not Bounded: the last wave lifts the bound (see _lift_cpu_bound).
            cpu_semaphore=self._mp.Semaphore(self.loaded.cpu_slot_count()),
            stop_event=self.stop_event,
            flags=self._flags,
            running=self._running,
        )
        params = dict(cfg.params)
        workdir = str(self.paths.workdir)
        pipeline_dir = str(self.loaded.base_dir.resolve())

        # The sealer first, if `mpipe run` has not started it already: it
        # imports h5py as it starts (some 50 ms), the longest start of any
        # child, and an empty or short run waits for it at the end.  Then the
        # sink, so the writer is up before results arrive; the producer last,
        # so that no source code runs for a run whose processes could not all
        # start.  Every queue and semaphore is kept referenced here for the
        # whole run: a child started by the forkserver opens named semaphores
        # by name after start() returns, and a collected one is unlinked under it.
        if self._sealer is None:
            self._sealer = Sealer(self._mp, self.log_level)
        # One message more than the batches that can be in it (each holds at
        # least one of writer.queue_size items in flight): the EndOfStream
        # always fits, so the runner never blocks on a consumer that died.
        self._sink_queue = self._mp.Queue(cfg.writer.queue_size + 1)
        self._writer_queue = writer_queue = self._mp.Queue(cfg.writer.queue_size)
        self._sink_batch_max = max(1, min(512, cfg.writer.queue_size // 2))
        writer_spec = WriterSpec(str(self.paths.results_tmp), str(self.paths.ledger), cfg.fsync,
                                 cfg.writer.lock_timeout_s, self.log_level,
                                 keep_open=cfg.writer.workers == 1,
                                 batch_max=self._sink_batch_max)
        self._writers: list[tuple[BaseProcess, Connection]] = []
        for i in range(cfg.writer.workers):
            conn, writer_end = self._mp.Pipe(duplex=False)
            name = "writer" if cfg.writer.workers == 1 else f"writer-{i + 1}"
            process = self._spawn(name, writer_main, (
                writer_spec, writer_queue, writer_end, self.results_lock, self._lifeline_r))
            writer_end.close()
            self._writers.append((process, conn))
        self._consumer_conn, consumer_end = self._mp.Pipe(duplex=False)
        self._consumer = self._spawn("consumer", consumer_main, (
            ConsumerSpec(cfg.consumer.fn if cfg.consumer else None, params, workdir,
                         cfg.allow_outside_workdir, self.log_level, pipeline_dir,
                         cfg.writer.workers),
            self._sink_queue, writer_queue, consumer_end, self._lifeline_r))
        consumer_end.close()

        first_slot = 0
        last_stage = list(cfg.stages)[-1]
        for name, stage_cfg in cfg.stages.items():
            workers = self.loaded.worker_count(name)

            def spec(worker_name: str, slot: int, stage: str = name, fn: str = stage_cfg.fn
                     ) -> WorkerSpec:
                return WorkerSpec(stage, worker_name, slot, fn, params, workdir, cfg.fsync,
                                  cfg.allow_outside_workdir, self.log_level, pipeline_dir,
                                  last_stage=stage == last_stage,
                                  keep_freed_memory_mb=cfg.keep_freed_memory_mb)

            pool: Pool
            if self.loaded.stage_backend(name) == "dask":
                pool = self._dask_pool(name, spec("dask", 0))
            else:
                pool = StagePool(name=name, config=stage_cfg, workers=workers,
                                 first_slot=first_slot, mp=self._mp, shared=self._shared,
                                 spec=spec, on_done=self._on_stage_done,
                                 on_failed=self._on_item_failed, on_fatal=self._stop_on_error)
            pool.start()
            self._pools.append(pool)
            first_slot += workers

        source_messages, source_batch_max = source_queue_bounds(cfg.source.queue_size)
        self._source_queue = self._mp.Queue(source_messages)
        ledger = None if self.fresh else str(self.paths.ledger)
        self._producer = self._spawn("producer", producer_main, (
            ProducerSpec(cfg.source.fn, params, workdir, cfg.allow_outside_workdir,
                         config_fingerprint(cfg, self.loaded.code), ledger, self.log_level,
                         pipeline_dir, self._limit, source_batch_max),
            self._source_queue, self._lifeline_r, self.stop_event))
        # The producer has its copy of the write end: with the runner's closed,
        # a producer killed halfway through a message is an EOF for the
        # runner, not a read that waits for the rest for ever.
        self._source_queue._writer.close()  # type: ignore[attr-defined]
        self._startup_s = time.monotonic() - self._t0
        logger.info("the pipeline's processes are up (%.3f s)", self._startup_s)

    def _send_seal(self, spec: SealSpec) -> None:
        """Hand the spec to the waiting sealer; start another if it died meanwhile."""
        assert self._sealer is not None
        if self._sealer.seal(spec):
            return
        # Nobody reads its pipe: it was killed (OOM killer, kill -9).
        logger.warning("the writer-seal process %s; starting another",
                       procs.describe_exit(self._sealer.stop(grace_s=1.0)))
        self._sealer = Sealer(self._mp, self.log_level)
        if not self._sealer.seal(spec):
            raise PipelineBrokenError("the writer-seal process died as it started",
                                      hint="see the log above; run the same command again: "
                                      "finished items are kept")

    def _start_dask_early(self) -> None:
        """Connect to Dask (or start a LocalCluster) in a thread, from the start.

        A LocalCluster takes a second or more to start its worker processes;
        meanwhile the run's own processes start.
        """
        backend = self.config.backend
        if isinstance(backend, str) or not any(
                self.loaded.stage_backend(name) == "dask" for name in self.config.stages):
            return
        from mpipe import dask_backend

        starter = ThreadPoolExecutor(1, thread_name_prefix="dask-connect")
        self._dask_connecting = starter.submit(dask_backend.connect, backend.dask,
                                               self.config.keep_freed_memory_mb)
        starter.shutdown(wait=False)

    def _dask_pool(self, name: str, spec: WorkerSpec) -> Pool:
        """A stage run on Dask: same callbacks, same retry and timeout policy."""
        from mpipe import dask_backend  # never imported by the local backend

        backend = self.config.backend
        assert not isinstance(backend, str)
        if self._dask is None:
            self._dask = (self._dask_connecting.result() if self._dask_connecting is not None
                          else dask_backend.connect(backend.dask,
                                                    self.config.keep_freed_memory_mb))
            self._dask_connecting = None
        workers = self.loaded.config.stages[name].workers
        return dask_backend.DaskStagePool(
            name=name, config=self.config.stages[name],
            workers=None if workers == "auto" else workers, session=self._dask, spec=spec,
            on_done=self._on_stage_done, on_failed=self._on_item_failed,
            on_fatal=self._stop_on_error, stop_requested=self.stop_event.is_set)

    def _spawn(self, name: str, target: Callable[..., None], args: tuple[Any, ...]
               ) -> BaseProcess:
        process = self._mp.Process(target=target, name=name, args=args)
        procs.start(process)
        logger.info("started %s (pid %s)", name, process.pid)
        self._children.append(process)
        return process

    # ------------------------------------------------------------------ the loop

    def run(self) -> RunResult:
        """Run to the end; return what happened (never raises item failures)."""
        self._state = _State(self.config.stages)
        self._loop_started_at = time.time()
        if self._progress is not None:
            self._progress.start(self.snapshot)
        self._waiter = Waiter()
        try:
            self._loop()
        finally:
            self._waiter.close()
            if self._progress is not None:
                self._progress.stop()
        return self._finish()

    def snapshot(self) -> dict[str, Any]:
        """Counters for a progress display (read from another thread: plain ints)."""
        s = self._state
        return {
            "elapsed_s": time.monotonic() - self._t0,
            "produced": s.produced,
            "producer_ended": s.producer_ended,
            "committed": s.committed,
            "skipped": s.skipped,
            "failed": len(s.failures),
            "stopping": s.stopping,
            "stages": [
                {"name": p.name, "workers": p.size, "busy": len(p.busy_workers()),
                 "in_flight": p.in_flight, "queue": len(p.queue),
                 "queue_size": p.config.queue_size, "done": p.stats.done,
                 "failed": p.stats.failed, "retries": p.stats.retries}
                for p in list(self._pools)
            ],
        }

    def _loop(self) -> None:
        s = self._state
        while not s.finished:
            self._dispatch()
            handlers = self._wait_objects()
            timeout = self._next_timeout()
            before = time.monotonic()
            states = [(p, p.idle(), not p.queue, self._blocked(k),
                       len(p.queue) >= p.config.queue_size)
                      for k, p in enumerate(self._pools)]
            ready = self._waiter.wait(handlers, timeout)
            # States change only at events, so this accounting is exact.
            dt = time.monotonic() - before
            for p, idle, empty, blocked, full in states:
                if full:
                    p.stats.queue_full_s += dt
                if idle and empty:
                    p.stats.starved_s += idle * dt
                elif blocked:
                    p.stats.blocked_s += dt
            for obj in ready:
                if obj in handlers:
                    try:
                        handlers[obj]()
                    except MpipeError as exc:
                        self._abort(exc)
            now = time.monotonic()
            for pool in self._pools:
                pool.expire(now)
            self._advance(now)

    def _wait_objects(self) -> dict[Any, Callable[[], object]]:
        s = self._state
        handlers: dict[Any, Callable[[], object]] = {self._wake_r: self._on_wakeup}
        # Read the source only while the first stage's queue has room: the
        # producer then blocks on the full source queue (backpressure).
        first = self._pools[0]
        if not s.producer_ended and not s.source_eof and (s.stopping or (
                not s.source_backlog and len(first.queue) < first.config.queue_size)):
            # Same trick as concurrent.futures: wait on the queue's reader end.
            handlers[self._source_queue._reader] = self._on_source  # type: ignore[attr-defined]
        if not s.producer_exited:
            handlers[self._producer.sentinel] = self._on_producer_exit
        for pool in self._pools:
            handlers.update(pool.wait_objects())
        if not s.consumer_exited:
            handlers[self._consumer_conn] = self._on_consumer_message
            handlers[self._consumer.sentinel] = self._on_consumer_exit
        for process, conn in self._writers:
            if process.sentinel not in s.writers_seen_exit:
                handlers[conn] = functools.partial(self._on_writer_message, conn)
                handlers[process.sentinel] = functools.partial(self._on_writer_exit, process,
                                                               conn)
        return handlers

    def _next_timeout(self) -> float | None:
        deadlines = [d for d in (p.next_deadline() for p in self._pools) if d is not None]
        s = self._state
        if s.grace_deadline is not None:
            deadlines.append(s.grace_deadline)
        if s.sink_deadline is not None:
            deadlines.append(s.sink_deadline)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    # ---------------------------------------------------------------- dispatching

    def _room_after(self, k: int) -> int:
        """How many more items stage ``k`` may start: its results need a place."""
        s = self._state
        pool = self._pools[k]
        if k + 1 < len(self._pools):
            nxt = self._pools[k + 1]
            return nxt.config.queue_size - len(nxt.queue) - pool.in_flight
        return (self.config.writer.queue_size - len(s.sink_pending) - s.sink_in_flight
                - pool.in_flight)

    def _blocked(self, k: int) -> bool:
        pool = self._pools[k]
        return bool(pool.queue) and pool.idle() > 0 and self._room_after(k) <= 0

    def _dispatch(self) -> None:
        s = self._state
        self._admit_source()
        # Downstream first, so finished work leaves before new work enters.
        for k in range(len(self._pools) - 1, -1, -1):
            pool = self._pools[k]
            if s.stopping and k == 0:
                continue  # stop taking new items
            room = self._room_after(k)
            if room > 0 and pool.queue:
                pool.dispatch(room)
            if k == 0 and s.source_backlog:
                # Prefetch may just have emptied the first queue into the
                # workers: refill it from the backlog now, not at the next event.
                self._admit_source()
                room = self._room_after(0)
                if room > 0 and pool.queue:
                    pool.dispatch(room)
        # What finished since the last iteration goes as one SinkBatch, at most
        # half the writer's window: the other half keeps arriving while the
        # writer commits.
        while s.sink_pending and s.sink_in_flight < self.config.writer.queue_size:
            take = min(len(s.sink_pending), self._sink_batch_max,
                       self.config.writer.queue_size - s.sink_in_flight)
            batch = tuple(s.sink_pending.popleft() for _ in range(take))
            self._sink_queue.put(dumps(SinkBatch(batch)))
            s.sink_in_flight += take
            s.replays_in_flight += sum(item.replayed for item in batch)

    def _on_stage_done(self, stage: str, done: ItemDone) -> None:
        s = self._state
        k = s.stage_index[stage]
        if k + 1 < len(self._pools):
            self._pools[k + 1].queue.append(WorkItem(done.seq, done.key, 1, done.value))
        else:
            s.sink_pending.append(SinkItem(done.seq, done.key, s.fingerprints.pop(done.key),
                                           done.value, replayed=False))

    def _on_item_failed(self, stage: str, failure: ItemFailure) -> None:
        s = self._state
        s.fingerprints.pop(failure.key, None)
        s.failures.append(failure)

    # ---------------------------------------------------------------- event handlers

    def _on_wakeup(self) -> None:
        try:
            self._wake_r.recv(64)
        except BlockingIOError:
            pass
        while self._signals:
            signum, at = self._signals.pop(0)
            s = self._state
            if s.signal is None:
                s.signal, s.signal_at = signum, at
                logger.warning("%s received: finishing in-flight items (up to %.0fs), "
                               "then stopping; send it again to stop at once",
                               signal.Signals(signum).name, self.config.shutdown_grace_s)
                self._request_stop(grace_s=self.config.shutdown_grace_s)
            elif signum == s.signal and at - s.signal_at < SAME_STOP_REQUEST_S:
                # `timeout` and `kill -- -PGID` send one request to the runner
                # and again to its process group, a few ms apart.
                logger.warning("%s again after %.3fs: taken as the same stop request; "
                               "send it again to stop at once",
                               signal.Signals(signum).name, at - s.signal_at)
            else:
                logger.warning("second signal: stopping at once")
                s.hard_stop = True
                self._request_stop(grace_s=0)

    def _on_source(self, *, everything: bool = False) -> None:
        s = self._state
        # Take what is there while the first stage has room (a queue of small
        # messages is cheaper to drain in one go than one wake-up per batch).
        while (not s.producer_ended and not s.source_eof
               and (everything or s.stopping or not s.source_backlog)
               and self._source_queue._reader.poll()):  # type: ignore[attr-defined]
            try:
                message = loads(self._source_queue.get())
            except (EOFError, OSError):
                # The producer is gone, maybe halfway through a message: its
                # sentinel says how (_on_producer_exit).
                s.source_eof = True
                return
            if isinstance(message, SourceBatch):
                s.source_backlog.extend(message.items)
            elif isinstance(message, EndOfStream):
                s.producer_ended = True
            elif isinstance(message, SourceFailed) and not s.stopping:
                # (While stopping, as before, the stop decides how the run ends.)
                s.errors.append(PipelineBrokenError(
                    f"the source function {message.message}"
                    + (f"\n{message.traceback}" if message.traceback else ""),
                    hint="items produced before the error are finished and committed"))
            self._admit_source()

    def _admit_source(self) -> None:
        """Move source items into the first stage's queue while it has room."""
        s = self._state
        first = self._pools[0]
        while s.source_backlog and (s.stopping or len(first.queue) < first.config.queue_size):
            message = s.source_backlog.popleft()
            if s.stopping:
                continue  # drained so the producer can exit; redone next run
            s.produced += 1
            if isinstance(message, SourceItem):
                s.fingerprints[message.key] = message.fingerprint
                first.queue.append(WorkItem(message.seq, message.key, 1, message.value))
            elif isinstance(message, SkippedItem):
                s.skipped += 1
                s.sink_pending.append(SinkItem(message.seq, message.key, message.fingerprint,
                                               message.value, replayed=True))
            else:
                s.failures.append(message)

    def _on_producer_exit(self) -> None:
        s = self._state
        s.producer_exited = True
        # What it put before exiting is still in the pipe; take all of it (at
        # most source.queue_size items) to find its EndOfStream.
        self._on_source(everything=True)
        if s.producer_ended:
            return
        if s.stopping:
            s.producer_ended = True
            return
        code = self._producer.exitcode
        raise PipelineBrokenError(f"the producer {procs.describe_exit(code)} before the end "
                                  "of its source")

    def _on_consumer_message(self) -> bool:
        try:
            message = self._consumer_conn.recv()
        except (EOFError, OSError):
            return False
        if isinstance(message, ConsumerDone):
            self._state.total = message.value
        elif isinstance(message, ProcessFailed):
            self._state.errors.append(PipelineBrokenError(
                f"the consumer function raised {message.message}\n{message.traceback}"
                if message.traceback else message.message))  # no traceback: mpipe's check
            self._request_stop(grace_s=self.config.shutdown_grace_s)
        return True

    def _on_consumer_exit(self) -> None:
        s = self._state
        while _poll(self._consumer_conn) and self._on_consumer_message():
            pass
        s.consumer_exited = True
        if s.total is None and not s.errors and not s.hard_stop:
            how = procs.describe_exit(self._consumer.exitcode)
            raise PipelineBrokenError(f"the consumer {how}")

    def _on_writer_message(self, conn: Connection) -> bool:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return False
        s = self._state
        if isinstance(message, Committed):
            s.sink_in_flight -= len(message.keys) + len(message.rejected)
            s.replays_in_flight -= message.replayed + message.rejected_replayed
            s.committed += len(message.keys) - message.replayed
            s.replayed += message.replayed
            s.skipped -= message.rejected_replayed  # a failure now, not a skip
            s.failures.extend(message.rejected)
            s.rejected_rows += len(message.rejected)
        elif isinstance(message, ProcessFailed):
            error: MpipeError
            if message.exit_code == OutputError.exit_code:
                error = OutputError(message.message)
            else:
                error = PipelineBrokenError(f"the writer failed: {message.message}\n"
                                            f"{message.traceback}")
            raise error
        return True

    def _on_writer_exit(self, process: BaseProcess, conn: Connection) -> None:
        s = self._state
        while _poll(conn) and self._on_writer_message(conn):
            pass
        s.writers_seen_exit.add(process.sentinel)
        s.writer_exited = len(s.writers_seen_exit) == len(self._writers)
        # A writer ends normally only after its EndOfStream, i.e. after the
        # sink was closed; the last one out must leave nothing uncommitted.
        if process.exitcode != 0 or not s.sink_closed or (s.writer_exited and s.sink_in_flight):
            raise PipelineBrokenError(f"the {process.name} {procs.describe_exit(process.exitcode)};"
                                      " committed items are kept")

    # ---------------------------------------------------------------- phases

    def _request_stop(self, grace_s: float) -> None:
        s = self._state
        self.stop_event.set()
        now = time.monotonic()
        deadline = now + grace_s
        s.grace_deadline = deadline if s.grace_deadline is None else min(s.grace_deadline,
                                                                          deadline)
        if not s.stopping:
            s.stopping = True
            self._drop_first_queue()

    def _stop_on_error(self, error: MpipeError) -> None:
        """The run cannot succeed, but what is in flight may still commit."""
        logger.error("%s", error)
        error.logged = True
        self._state.errors.append(error)
        self._request_stop(grace_s=self.config.shutdown_grace_s)

    def _abort(self, error: MpipeError) -> None:
        """Nothing more can be committed: stop now."""
        s = self._state
        logger.error("%s", error)
        error.logged = True
        s.errors.append(error)
        s.hard_stop = True
        self._request_stop(grace_s=0)

    def _lift_cpu_bound(self) -> None:
        """The last wave: let every worker still busy compute at once.

        ``cpu_slots`` keeps extra workers from fighting over the cores while
        there is work to overlap with.  Once nothing is left to hand out and
        fewer than two rounds of ``cpu_slots`` items remain (all of them in the
        last stage's workers), the bound can only leave slots idle: with 5
        equal items on 4 slots the fifth would start after the first four (2
        item-times) instead of all five sharing them (1.25).  This is the
        notes' 4-vs-5 processes puzzle (docs/BENCHMARKS.md).  Not sooner: 10
        items on 2 slots take 5 item-times either way, but all 10 computing at
        once thrash the caches and finish together, their writes no longer
        overlapping anyone's compute (run 5 measured W=10 9% slower than W=2).
        Extra permits are never taken back: a retry after this point also runs
        unbounded.
        """
        s = self._state
        s.cpu_bound_lifted = True
        last = self._pools[-1]
        extra = (last.size if isinstance(last, StagePool) else 0) - self.loaded.cpu_slot_count()
        for _ in range(max(0, extra)):
            self._shared.cpu_semaphore.release()
        if extra > 0:
            logger.info("last wave: cpu_slots lifted for %d more worker(s), %d item(s) left",
                        extra, last.in_flight)

    def _drop_first_queue(self) -> None:
        """Stopping: what waits for the first stage is never started, and counted so."""
        first = self._pools[0].queue
        self._state.not_started += len(first)
        first.clear()

    def _advance(self, now: float) -> None:
        s = self._state
        if s.stopping:
            # A worker that died or exited while stopping hands its unstarted
            # items (and a retry) back to the first queue, which takes nothing
            # more.
            self._drop_first_queue()
        busy = any(p.in_flight for p in self._pools)
        queued = any(p.queue for p in self._pools[1:]) or (
            not s.stopping and bool(self._pools[0].queue or s.source_backlog))
        if s.stopping and s.grace_deadline is not None and now >= s.grace_deadline:
            # Acted on once: a deadline left in the past would make every
            # later wait return at once (a busy loop until the run ends).
            s.grace_deadline = None
            # Also when nothing is busy: items may wait in a later stage's
            # queue for workers still importing their stage, which would
            # then run them all, with no limit.
            for pool in self._pools:
                for name in pool.busy_workers():
                    logger.warning("grace period over: abandoning the item held by %s", name)
                s.not_started += pool.in_flight + len(pool.queue)
                pool.queue.clear()
            procs.kill_now([p for pool in self._pools for p in pool.processes()])
            for pool in self._pools:
                pool.forget_items()
            busy = queued = False
            if not s.producer_exited:
                # A source waiting inside its own code (polling, sleeping)
                # would hold the run past its grace: it has nothing to commit.
                logger.warning("grace period over: stopping the source")
                procs.kill_now([self._producer])
        if s.hard_stop:
            # At once, also once the sink is closed: the consumer's and the
            # writer's work is in the ledger or lost with an unsealed file.
            s.finished = True
            return
        if (s.producer_ended and not queued and not s.stopping and not s.cpu_bound_lifted
                and not any(p.in_flight for p in self._pools[:-1])
                and self._pools[-1].in_flight < 2 * self.loaded.cpu_slot_count()):
            self._lift_cpu_bound()
        all_in = s.producer_ended and not busy and not queued
        if all_in and not s.sink_pending and not s.sink_closed:
            self._sink_queue.put(dumps(EndOfStream("runner")))
            s.sink_closed = True
            s.sink_deadline = now + SINK_DEADLINE_S
        if s.sink_closed and s.consumer_exited and s.writer_exited:
            s.finished = True
        elif s.sink_deadline is not None and now >= s.sink_deadline:
            s.errors.append(PipelineBrokenError(
                f"the consumer or writer did not finish within {SINK_DEADLINE_S:.0f}s"))
            s.finished = True

    # ---------------------------------------------------------------- the end

    def counts_so_far(self, error: MpipeError, status: str | None = None) -> RunResult:
        """What the run had counted when an error ended it (for its report); the status
        by default "not_started" before the loop began, "broken" after."""
        state = getattr(self, "_state", None)  # made when the loop begins
        if state is None:
            result = RunResult(status=status or "not_started", startup_s=self._startup_s)
        else:
            result = self._counted(state, status or "broken")
        result.error = error
        return result

    def _counted(self, s: _State, status: str) -> RunResult:
        return RunResult(status=status, produced=s.produced, committed=s.committed,
                         skipped=s.skipped, failed=len(s.failures), not_started=s.not_started,
                         failures=s.failures, startup_s=self._startup_s,
                         loop_started_at=self._loop_started_at)

    def _finish(self) -> RunResult:
        s = self._state
        if s.hard_stop:
            # Done by their stage, not known to be committed (the writer may
            # have, unacknowledged): not finished in this run, as the items a
            # stage held at the grace's end; the next run skips what the
            # ledger has.
            # Not the replayed ones: counted skipped as they were produced.
            s.not_started += (sum(not item.replayed for item in s.sink_pending)
                              + s.sink_in_flight - s.replays_in_flight)
            s.sink_pending.clear()
            s.sink_in_flight = s.replays_in_flight = 0
        result = self._counted(s, "complete")
        for pool in self._pools:
            pool.stats.workers = pool.size  # Dask's `workers: auto` is the cluster's threads
        result.stages = {p.name: p.stats for p in self._pools}
        accounted = s.committed + s.skipped + len(s.failures)
        if s.errors:
            result.status, result.error = "broken", s.errors[0]
        elif s.signal is not None:
            result.status = "interrupted"
            result.error = InterruptedRunError(s.signal, s.committed)
        elif s.produced != accounted:
            result.status = "broken"
            result.error = PipelineBrokenError(
                f"invariant broken: {s.produced} items produced but {s.committed} committed "
                f"+ {s.skipped} skipped + {len(s.failures)} failed = {accounted}")
        else:
            # Every writer has exited: the sealer may open the file now, while
            # the workers are being stopped.
            result.wall_s = time.monotonic() - self._t0
            self._send_seal(SealSpec(
                str(self.paths.results_tmp), str(self.paths.results), s.produced,
                self._total_to_store(),
                run_metadata(self.loaded, result), self.config.fsync))
        self._teardown(grace_s=0 if s.hard_stop else self.config.shutdown_grace_s)
        if self._sealer is not None and self._sealer.sealing:
            self._seal_outcome(result)
            if result.error is None and s.failures:
                result.status = "items_failed"
                # `mpipe run` writes this report whatever else it writes.
                result.error = ItemsFailedError(len(s.failures), s.produced,
                                                str(self.paths.default_report))
        result.wall_s = time.monotonic() - self._t0
        return result

    def _total_to_store(self) -> bytes:
        """The consumer's value, unless it folded values the writer then rejected.

        The consumer folds each value as it forwards it to the writer, which
        may still refuse the row (a shape or number type unlike the first
        row's): such a total would not be the total of the rows marked done.
        """
        s = self._state
        if s.total is None:
            return dumps(None)
        if s.rejected_rows:
            logger.warning(
                "the results file gets no total: the consumer's value includes %d item(s) "
                "whose result the results file could not take (see the failures); %s",
                s.rejected_rows, ONE_ROW_SHAPE)
            return dumps(None)
        return s.total

    def _seal_outcome(self, result: RunResult) -> None:
        """Judge what the sealer answered (teardown waited for it and read it)."""
        assert self._sealer is not None
        reply = self._seal_reply
        if isinstance(reply, ProcessFailed):
            error: MpipeError = (OutputError(reply.message) if reply.exit_code == 74
                                 else PipelineBrokenError(reply.message))
            result.status, result.error = "broken", error
        elif not isinstance(reply, Sealed) or self._sealer.exitcode != 0:
            result.status = "broken"
            how = procs.describe_exit(self._sealer.exitcode)
            result.error = PipelineBrokenError(f"sealing the results file failed: it {how}")
        else:
            result.results_path = str(self.paths.results)
            result.versions = reply.versions

    def _teardown(self, grace_s: float) -> None:
        """Stop every child, in order, with deadlines; release the lock."""
        if hasattr(self, "stop_event"):
            self.stop_event.set()
        # Whether this run leaves the next one nothing to clean (_mark_clean_exit).
        # prepare's own outputs, if any, were made in this process.
        clean = self._walked_at is not None and not outputs.temporaries_left()
        for pool in self._pools:
            pool.shutdown(grace_s=min(grace_s, 5.0))
            clean = clean and pool.exited_cleanly()
        # Drain the source queue before joining the producer: a process with
        # items still buffered for a queue cannot exit (multiprocessing docs,
        # "Joining processes that use queues").
        if hasattr(self, "_producer"):  # not if it could not start
            deadline = time.monotonic() + 5.0
            while self._producer.exitcode is None and time.monotonic() < deadline:
                ready = wait([self._source_queue._reader, self._producer.sentinel],  # type: ignore[attr-defined]
                             deadline - time.monotonic())
                if self._source_queue._reader in ready:  # type: ignore[attr-defined]
                    try:
                        self._source_queue.get()
                    except (EOFError, OSError):
                        break  # it is gone
        if hasattr(self, "_sink_queue") and hasattr(self, "_state") and not self._state.sink_closed:
            try:
                self._sink_queue.put(dumps(EndOfStream("runner")), block=False)
            except queue.Full:
                pass  # a consumer that stopped reading: stopped below
            self._state.sink_closed = True
        procs.stop_processes(self._children, grace_s=min(grace_s, 10.0))
        clean = clean and all(p.exitcode == 0 for p in self._children)
        if self._sealer is not None:  # a no-op the second time
            self._sealer.stop(grace_s=SINK_DEADLINE_S if self._sealer.sealing else 5.0)
            if self._sealer.sealing and self._seal_reply is None:
                self._seal_reply = self._sealer.answer()
            if clean and isinstance(self._seal_reply, Sealed) and self._sealer.exitcode == 0:
                self._mark_clean_exit()
        if not (self._sealer is not None and self._sealer.sealing):
            # Not sealed (stopped, broken): the writers' file, all of them
            # gone now, is of no use (the next run rebuilds it from the
            # ledger), and beside a writer.path outside the workdir no walk
            # would ever find it.
            try:
                self.paths.results_tmp.unlink(missing_ok=True)
            except OSError as exc:
                logger.debug("cannot remove %s (%s): the next run looks for it",
                             self.paths.results_tmp, exc)
        self._walked_at = None  # decided once, under the lock
        for q in ("_source_queue", "_sink_queue"):
            if hasattr(self, q):
                getattr(self, q).close()
                getattr(self, q).cancel_join_thread()
        self._children.clear()
        self._pools.clear()
        if self._dask_connecting is not None:
            # The run failed before its Dask stage started.  Not waited for
            # (an unreachable scheduler takes up to 80 s to give up): the
            # session is closed as soon as it is made, and the interpreter
            # waits for that thread at exit, so no cluster outlives the runner.
            self._dask_connecting.add_done_callback(_close_session)
            self._dask_connecting = None
        if self._dask is not None:
            self._dask.close()
            self._dask = None
        self._restore_signal_handlers()
        self._lock.release()

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()
        if self._old_wakeup_fd != -1 or signal.set_wakeup_fd(-1) != -1:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = -1


class _Stopped(BaseException):
    """SIGINT or SIGTERM while ``prepare`` runs, raised by the run's handler
    (not an Exception: a prepare's ``except Exception`` must not swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class _State:
    stages: dict[str, Any]
    produced: int = 0
    committed: int = 0
    skipped: int = 0
    replayed: int = 0
    rejected_rows: int = 0  # items the writer could not store (their values were folded)
    not_started: int = 0
    failures: list[ItemFailure] = field(default_factory=list)
    errors: list[MpipeError] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)
    # Items received from the producer, not yet in the first stage's queue.
    source_backlog: deque[SourceItem | SkippedItem | ItemFailure] = field(default_factory=deque)
    sink_pending: deque[SinkItem] = field(default_factory=deque)
    sink_in_flight: int = 0
    replays_in_flight: int = 0  # of sink_in_flight, replayed from the ledger
    total: bytes | None = None
    producer_ended: bool = False
    producer_exited: bool = False
    source_eof: bool = False  # the source queue's pipe ended without an EndOfStream
    consumer_exited: bool = False
    writer_exited: bool = False
    writers_seen_exit: set[int] = field(default_factory=set)
    sink_closed: bool = False
    stopping: bool = False
    cpu_bound_lifted: bool = False
    hard_stop: bool = False
    signal: int | None = None
    signal_at: float = 0.0  # time.monotonic() as the first signal arrived
    grace_deadline: float | None = None
    sink_deadline: float | None = None
    finished: bool = False
    stage_index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stage_index = {name: i for i, name in enumerate(self.stages)}


def _close_session(connecting: Future[Any]) -> None:
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result().close()


def _poll(conn: Any) -> bool:
    try:
        return bool(conn.poll())
    except (EOFError, OSError):
        return False

