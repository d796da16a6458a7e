"""One stage's workers, its bounded input queue, and its retry policy.

The runner owns one :class:`StagePool` per stage.  The pool starts ``workers``
processes, hands items to each over its own pipe, and turns every way an
attempt can end into one of two callbacks:

* ``on_done(stage, ItemDone)``: the stage returned;
* ``on_failed(stage, ItemFailure)``: the item failed for good, after
  ``retries`` further attempts on fresh or idle workers.

A worker's death is seen at once through its ``process.sentinel`` (the runner
waits on it), never by polling.  The item it was running is retried, the
semaphore slots it held are released on its behalf, and a fresh worker takes
its place.

**Prefetch.**  A worker that must ask for each item waits a round trip through
the runner between items: nothing for an item of a second, most of the time for
an item of 50 microseconds.  So the pool measures how long the stage's items
take and lets each worker hold up to ``depth`` items (1 for slow items, up to 64
for trivial ones), and workers batch their replies likewise.  The runner still
knows every item a worker holds, and each worker writes the index of the item
it is running into shared memory, so a death is charged to that item alone;
the others it held are handed out again without losing an attempt.  A stage
with ``timeout_s`` keeps depth 1, so that an item's deadline starts when the
item does.

**Never two blocked senders.**  The runner and a worker both send on their
pipe, and a send larger than the socket's buffer blocks until the other side
reads.  A worker blocked sending replies reads nothing, so a runner blocked
sending it more work would wait for ever, and the whole pipeline with it.  So
the runner sends a worker that is busy only what fits in the buffer beside
what it may not have read yet (:meth:`StagePool._fitting`); a large batch goes
only to a worker that holds nothing, which is reading.  And a fresh worker
gets nothing before it says :class:`WorkerReady` (its stage imported).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Semaphore
from typing import Any, Protocol

from mpipe import procs
from mpipe.config import StageConfig
from mpipe.context import CPU_FLAG, IO_FLAG, StopFlag
from mpipe.errors import MpipeError, PipelineBrokenError
from mpipe.messages import (
    ItemDone,
    ItemFailure,
    ReplyBatch,
    Shutdown,
    WorkBatch,
    WorkerReady,
    WorkItem,
)
from mpipe.retry import settle_failed_attempt
from mpipe.worker import WorkerSpec, worker_main

logger = logging.getLogger(__name__)

# A stage whose fresh workers die this many times in a row without finishing
# an item is broken (an import error, a crash at start-up): stop, don't loop.
CRASH_LOOP_LIMIT = 5
# With timeout_s, a fresh worker that has not imported its stage in
# max(this, timeout_s) seconds is killed, as a start-up crash (a hung import),
# unless the stage's startup_timeout_s says otherwise.
STARTUP_LIMIT_S = 30.0


@dataclass
class StageStats:
    workers: int = 0  # the pool's size (items in flight at most, on Dask)
    done: int = 0
    failed: int = 0
    retries: int = 0
    deaths: int = 0
    timeouts: int = 0
    busy_s: float = 0.0
    io_s: float = 0.0
    cpu_wait_s: float = 0.0
    output_commit_s: float = 0.0  # of io_s: ctx.output_dir commits (fsync if on, rename)
    failed_busy_s: float = 0.0  # of busy_s: attempts that failed (ItemFailure.busy_s)
    starved_s: float = 0.0  # worker-seconds idle because the input queue was empty
    blocked_s: float = 0.0  # seconds with input waiting but no room downstream
    queue_full_s: float = 0.0  # seconds the input queue was at its queue_size
    dask_threads: int = 0  # a Dask stage: the cluster's threads as it started (0: local)
    per_worker: dict[str, dict[str, float]] = field(default_factory=dict)
    # (worker, key, started_at, busy_s, io_s, cpu_wait_s) per finished item and
    # per failed attempt whose start is known, for the timeline plot and the
    # run's work window; capped so a million-item run stays small.
    timeline: list[tuple[str, str, float, float, float, float]] = field(default_factory=list)

    def record(self, reply: ItemDone) -> None:
        """Count a finished attempt (both backends)."""
        self.done += 1
        self.busy_s += reply.busy_s
        self.io_s += reply.io_s
        self.cpu_wait_s += reply.cpu_wait_s
        self.output_commit_s += reply.output_commit_s
        mine = self.per_worker.setdefault(reply.worker, {"items": 0, "busy_s": 0.0})
        mine["items"] += 1
        mine["busy_s"] += reply.busy_s
        if len(self.timeline) < TIMELINE_CAP:
            self.timeline.append((reply.worker, reply.key, reply.started_at,
                                  reply.busy_s, reply.io_s, reply.cpu_wait_s))

    def record_failed_attempt(self, failure: ItemFailure) -> None:
        """Count a failed attempt's time as busy: else a stage failing slowly
        looks idle, and the summary blames its input (both backends)."""
        if not failure.busy_s:
            return  # a death: no time known, and no worker row to make for it
        self.busy_s += failure.busy_s
        self.failed_busy_s += failure.busy_s
        self.io_s += failure.io_s
        self.cpu_wait_s += failure.cpu_wait_s
        mine = self.per_worker.setdefault(failure.worker, {"items": 0, "busy_s": 0.0})
        mine["busy_s"] += failure.busy_s
        if failure.started_at and len(self.timeline) < TIMELINE_CAP:
            self.timeline.append((failure.worker, failure.key, failure.started_at,
                                  failure.busy_s, failure.io_s, failure.cpu_wait_s))

    def as_json(self) -> dict[str, Any]:
        """The fields as JSON-ready values.  Not ``dataclasses.asdict``: it deep-copies
        every timeline tuple, which took longer than running 10,000 trivial items."""
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["per_worker"] = {name: dict(row) for name, row in self.per_worker.items()}
        return doc


TIMELINE_CAP = 50_000
MAX_PREFETCH = 64


class Pool(Protocol):
    """What the runner needs of a stage's executor (local processes or Dask)."""

    name: str
    config: StageConfig
    size: int
    queue: deque[WorkItem]
    stats: StageStats

    def start(self) -> None: ...
    def processes(self) -> list[BaseProcess]: ...
    def shutdown(self, grace_s: float) -> None: ...
    def exited_cleanly(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    def idle(self) -> int: ...
    def busy_workers(self) -> list[str]: ...
    def dispatch(self, limit: int) -> int: ...
    def next_deadline(self) -> float | None: ...
    def expire(self, now: float) -> None: ...
    def forget_items(self) -> None: ...
    def wait_objects(self) -> dict[Any, Callable[[], object]]: ...


@dataclass
class _Worker:
    name: str
    slot: int
    process: BaseProcess
    conn: Connection
    held: deque[WorkItem] = field(default_factory=deque)
    deadline: float | None = None  # of held[0]; only with timeout_s (depth 1)
    killed: bool = False  # by us, for a timeout: not a crash
    exiting: bool = False  # its stage raised SystemExit: it is on its way out
    ready: bool = False  # it said WorkerReady: its stage is imported
    started: float = 0.0  # time.monotonic() at start, for the start-up limit
    stuck_at_start: bool = False  # killed for not getting ready in time
    # Per batch sent and not fully answered: [items not answered, bytes it may
    # not have read (0 once an answer shows it read the batch)]; their sum:
    batches: deque[list[int]] = field(default_factory=deque)
    unread: int = 0


@dataclass
class Shared:
    """The synchronisation objects a stage's workers share."""

    lifeline: Connection
    cpu_semaphore: Semaphore
    stop_event: StopFlag
    flags: Any  # RawArray('b', 2 * slots): [io_held, cpu_held] per worker slot
    running: Any  # RawArray('q', slots): index of the item the worker runs, -1 if none


class StagePool:
    def __init__(
        self,
        *,
        name: str,
        config: StageConfig,
        workers: int,
        first_slot: int,
        mp: ForkServerContext,
        shared: Shared,
        spec: Callable[[str, int], WorkerSpec],
        on_done: Callable[[str, ItemDone], None],
        on_failed: Callable[[str, ItemFailure], None],
        on_fatal: Callable[[MpipeError], None],
    ) -> None:
        self.name = name
        self.config = config
        self.size = workers
        self.queue: deque[WorkItem] = deque()
        self.stats = StageStats()
        self._mp = mp
        self._shared = shared
        self._io_semaphore = mp.BoundedSemaphore(config.io_slots or workers)
        self._spec = spec
        self._on_done = on_done
        self._on_failed = on_failed
        self._on_fatal = on_fatal
        self._workers: list[_Worker] = []
        self._slots = list(range(first_slot, first_slot + workers))
        self._crash_streak = 0
        self._unclean_exit = False  # see exited_cleanly
        self._handlers: dict[Any, Callable[[], object]] | None = None
        self._serial = 0
        self._depth = 1
        self._mean_busy_s: float | None = None
        self._send_budget: int | None = None  # bytes; see _fitting

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        for slot in self._slots:
            self._start_worker(slot)

    def _start_worker(self, slot: int) -> None:
        self._shared.running[slot] = -1
        self._serial += 1
        name = f"{self.name}-{self._serial}"
        try:
            runner_end, worker_end = self._mp.Pipe(duplex=True)
        except OSError as exc:  # EMFILE
            raise procs.cannot_start(f"the process {name}", exc) from None
        process = self._mp.Process(
            target=worker_main,
            name=name,
            args=(
                self._spec(name, slot),
                worker_end,
                self._shared.lifeline,
                self._io_semaphore,
                self._shared.cpu_semaphore,
                self._shared.stop_event,
                self._shared.flags,
                self._shared.running,
            ),
        )
        procs.start(process)
        logger.info("started %s (pid %s)", name, process.pid)
        worker_end.close()
        if self._send_budget is None:
            self._send_budget = _send_budget(runner_end)
        self._workers.append(_Worker(name=name, slot=slot, process=process, conn=runner_end,
                                     started=time.monotonic()))
        self._handlers = None

    def processes(self) -> list[BaseProcess]:
        return [w.process for w in self._workers]

    def shutdown(self, grace_s: float) -> None:
        """Ask idle workers to exit; stop the rest with escalation."""
        for w in self._workers:
            try:
                w.conn.send(Shutdown())
            except OSError:
                pass
        procs.stop_processes(self.processes(), grace_s=grace_s)
        if any(p.exitcode != 0 for p in self.processes()):
            self._unclean_exit = True
        for w in self._workers:
            w.conn.close()
        self._workers.clear()
        self._handlers = None

    def exited_cleanly(self) -> bool:
        """Whether every worker it started exited by itself, with 0, at shutdown.

        A worker that died, was killed (timeout_s, start-up limit, the end of
        the grace) or exited in the middle of the run may have left a
        temporary output behind (mpipe.outputs).
        """
        return not self._unclean_exit

    # ---------------------------------------------------------------- scheduling

    @property
    def in_flight(self) -> int:
        return sum(len(w.held) for w in self._workers)

    def _available(self, w: _Worker) -> bool:
        # Not process.exitcode: for a forkserver child each read is a poll()
        # system call, and this runs for every worker on every loop iteration.
        # A worker that died unnoticed gets its sentinel handled next.
        return w.ready and not w.exiting and not w.killed

    def idle(self) -> int:
        return sum(1 for w in self._workers if not w.held and self._available(w))

    def busy_workers(self) -> list[str]:
        return [w.name for w in self._workers if w.held]

    def dispatch(self, limit: int) -> int:
        """Hand queued items to workers with room, at most ``limit``; return how many."""
        sent = 0
        # Least loaded first: an idle worker gets work before a busy one queues more.
        for w in sorted(self._workers, key=lambda w: len(w.held)):
            take = min(self._depth - len(w.held), limit - sent, len(self.queue))
            if take <= 0 or not self._available(w):
                continue
            take, cost = self._fitting(w, take)
            if take == 0:
                continue
            batch = tuple(self.queue.popleft() for _ in range(take))
            w.held.extend(batch)
            w.batches.append([take, cost])
            w.unread += cost
            if self.config.timeout_s:
                w.deadline = time.monotonic() + self.config.timeout_s
            try:
                w.conn.send(WorkBatch(batch))
            except OSError:
                # It died just now; its sentinel will fire and hand the items out again.
                pass
            sent += take
        return sent

    def _fitting(self, w: _Worker, most: int) -> tuple[int, int]:
        """How many of the queue's first ``most`` items ``w`` can be sent now, and their cost.

        A busy worker may be blocked sending its replies, reading nothing:
        it gets only what fits in the socket's buffer beside what it may
        not have read.  A worker that holds nothing is reading (or about to):
        it gets at least one item, whatever its size.
        """
        room = (self._send_budget or 0) - w.unread
        n, cost = 0, MESSAGE_OVERHEAD
        for item in itertools.islice(self.queue, most):
            more = _cost(item)
            if cost + more > room and (n or w.held):
                break
            n, cost = n + 1, cost + more
        return n, cost

    def _adapt_depth(self, busy_s: float) -> None:
        mean = busy_s if self._mean_busy_s is None else 0.8 * self._mean_busy_s + 0.2 * busy_s
        self._mean_busy_s = mean
        if self.config.timeout_s:
            return
        # Enough items per worker to cover ~2 ms of round trips through the runner.
        self._depth = 1 + min(MAX_PREFETCH - 1, int(0.002 / max(mean, 1e-6)))

    def forget_items(self) -> None:
        """After the runner killed busy workers at the end of the grace period."""
        for w in self._workers:
            w.held.clear()
            w.deadline, w.killed = None, True

    def _startup_limit_s(self) -> float | None:
        # startup_timeout_s, or for a stage with timeout_s max(STARTUP_LIMIT_S,
        # timeout_s) (a fresh worker may import torch); else none: without
        # them nothing in mpipe has a time limit.
        if self.config.startup_timeout_s is not None:
            return self.config.startup_timeout_s
        timeout = self.config.timeout_s
        return max(STARTUP_LIMIT_S, timeout) if timeout else None

    def next_deadline(self) -> float | None:
        deadlines = [w.deadline for w in self._workers if w.held and w.deadline]
        limit = self._startup_limit_s()
        if limit is not None:
            deadlines += [w.started + limit for w in self._workers
                          if not w.ready and not w.killed]
        return min(deadlines) if deadlines else None

    def expire(self, now: float) -> None:
        """Kill workers whose item ran past ``timeout_s``; fail or retry it.  Kill
        workers that did not import their stage within the start-up limit."""
        limit = self._startup_limit_s()
        for w in self._workers:
            if (limit is not None and not w.ready and not w.killed and w.started + limit <= now
                    and not _poll(w.conn)):  # its WorkerReady may be there, unread
                logger.warning("%s (pid %s) did not import its stage within %.0fs; killing it",
                               w.name, w.process.pid, limit)
                procs.kill_tree(w.process)
                w.killed = w.stuck_at_start = True
                continue
            if (w.held and w.deadline is not None and w.deadline <= now
                    and not _poll(w.conn)):  # its answer may be there, unread
                item = w.held.popleft()
                self._requeue_untouched(w)
                logger.warning("%s: item %s ran past timeout_s=%s; killing %s (pid %s)",
                               self.name, item.key, self.config.timeout_s, w.name, w.process.pid)
                procs.kill_tree(w.process)
                w.killed = True
                w.deadline = None
                self.stats.timeouts += 1
                self._attempt_failed(item, ItemFailure(
                    seq=item.seq, key=item.key, stage=self.name, worker=w.name,
                    kind="timeout",
                    message=f"ran longer than timeout_s={self.config.timeout_s}s; worker killed",
                    busy_s=float(self.config.timeout_s or 0.0),
                    started_at=time.time() - float(self.config.timeout_s or 0.0),
                ))

    def _requeue_untouched(self, w: _Worker) -> None:
        # Items a worker held but never started go back to the front, in
        # order, with their attempt count unchanged.  The worker gets nothing
        # more (it is dying or was killed).
        while w.held:
            self.queue.appendleft(w.held.pop())
        w.batches.clear()
        w.unread = 0

    # ---------------------------------------------------------------- events

    def wait_objects(self) -> dict[Any, Callable[[], object]]:
        # Rebuilt only when a worker starts or exits, not on every loop iteration.
        if self._handlers is None:
            self._handlers = {}
            for w in self._workers:
                self._handlers[w.conn] = functools.partial(self._on_message, w)
                self._handlers[w.process.sentinel] = functools.partial(self._on_exit, w)
        return self._handlers

    def _on_message(self, w: _Worker) -> bool:
        try:
            message = w.conn.recv()
        except (EOFError, OSError):
            return False  # it died; the sentinel handles that
        if isinstance(message, WorkerReady):
            w.ready = True
            return True
        assert isinstance(message, ReplyBatch), message
        for reply in message.replies:
            self._on_reply(w, reply)
        return True

    def _on_reply(self, w: _Worker, reply: ItemDone | ItemFailure) -> None:
        if not w.held or w.held[0].seq != reply.seq:
            # A late answer for an item already failed by timeout: ignore it.
            return
        item = w.held.popleft()
        # An answer for an item of the oldest batch: the worker read that batch.
        oldest = w.batches[0]
        w.unread -= oldest[1]
        oldest[0], oldest[1] = oldest[0] - 1, 0
        if oldest[0] == 0:
            w.batches.popleft()
        w.deadline = (time.monotonic() + self.config.timeout_s
                      if w.held and self.config.timeout_s else None)
        self._crash_streak = 0
        if isinstance(reply, ItemDone):
            self.stats.record(reply)
            self._adapt_depth(reply.busy_s)
            self._on_done(self.name, reply)
        else:
            if reply.kind == "exit":
                w.exiting = True
                self._requeue_untouched(w)
            self._attempt_failed(item, reply)

    def _on_exit(self, w: _Worker) -> None:
        self._unclean_exit = True  # workers exit on Shutdown only, at the end
        while w.held and _poll(w.conn) and self._on_message(w):
            pass  # answers sent just before it exited
        w.process.join(0)
        self._workers.remove(w)
        self._handlers = None
        w.conn.close()
        self._release_slots(w)
        exitcode = w.process.exitcode
        running = self._shared.running[w.slot]
        culprit = next((item for item in w.held if item.seq == running), None)
        if culprit is not None:
            w.held.remove(culprit)
        self._requeue_untouched(w)
        if culprit is not None:
            self.stats.deaths += 1
            how = procs.describe_exit(exitcode)
            logger.warning("%s (pid %s) %s while running item %s",
                           w.name, w.process.pid, how, culprit.key)
            self._attempt_failed(culprit, ItemFailure(
                seq=culprit.seq, key=culprit.key, stage=self.name, worker=w.name,
                kind="died", message=f"worker {w.name} {how}",
            ))
        elif (not w.killed or w.stuck_at_start) and not self._shared.stop_event.is_set():
            self._crash_streak += 1
            if self._crash_streak >= CRASH_LOOP_LIMIT:
                raise PipelineBrokenError(
                    f"stage {self.name!r}: {CRASH_LOOP_LIMIT} workers in a row died without "
                    f"finishing an item (last one {procs.describe_exit(exitcode)})",
                    hint="run one item by hand to see the crash (mpipe run --set "
                    f"stages.{self.name}.workers=1 --log-level DEBUG)",
                )
        if not self._shared.stop_event.is_set():
            self._start_worker(w.slot)

    def _release_slots(self, w: _Worker) -> None:
        # The dead worker cannot release what it held: do it for it (see
        # mpipe.context).  Flags are cleared first so a slot is never
        # released twice.
        flags = self._shared.flags
        for which, semaphore in ((IO_FLAG, self._io_semaphore),
                                 (CPU_FLAG, self._shared.cpu_semaphore)):
            if flags[w.slot * 2 + which]:
                flags[w.slot * 2 + which] = 0
                semaphore.release()

    def _attempt_failed(self, item: WorkItem, failure: ItemFailure) -> None:
        settle_failed_attempt(
            stage=self.name, item=item, failure=failure, retries=self.config.retries,
            may_retry=not self._shared.stop_event.is_set(), stats=self.stats, queue=self.queue,
            on_failed=self._on_failed, on_fatal=self._on_fatal)


# A WorkItem's pickled size beyond its value and key, with room to spare.
ITEM_OVERHEAD = 128
# What Linux may charge a message against the buffer beyond its bytes: a
# buffer head of up to a page, a page of rounding, its own bookkeeping.
MESSAGE_OVERHEAD = 8192


def _cost(item: WorkItem) -> int:
    return len(item.value) + len(item.key) + ITEM_OVERHEAD


def _send_budget(conn: Connection) -> int:
    """Bytes a worker that is not reading can be sent without the send blocking.

    Half the socket's send buffer, which on Linux bounds what a Unix socket
    holds unread, counted with the kernel's own overhead (MESSAGE_OVERHEAD
    per message estimates it; the other half is the margin).
    """
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)) // 2


def _poll(conn: Connection) -> bool:
    try:
        return conn.poll()
    except (EOFError, OSError):
        return False
