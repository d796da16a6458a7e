"""One stage's workers, its bounded input queue, and its retry policy.

The runner owns one :class:`StagePool` per stage.  The pool starts ``workers``
processes, hands each at most one item at a time over its own pipe, and turns
every way an attempt can end into one of two callbacks:

* ``on_done(stage, ItemDone)``: the stage returned;
* ``on_failed(stage, ItemFailure)``: the item failed for good, after
  ``retries`` further attempts on fresh or idle workers.

A worker's death is seen at once through its ``process.sentinel`` (the runner
waits on it), never by polling.  Its held item is retried, the semaphore slots
it held are released on its behalf, and a fresh worker takes its place.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event, Semaphore
from typing import Any, Protocol

from mpipe import procs
from mpipe.config import StageConfig
from mpipe.context import CPU_FLAG, IO_FLAG
from mpipe.errors import MpipeError, OutputError, PipelineBrokenError
from mpipe.messages import ItemDone, ItemFailure, Shutdown, WorkItem
from mpipe.worker import WorkerSpec, worker_main

logger = logging.getLogger(__name__)

# A stage whose fresh workers die this many times in a row without finishing
# an item is broken (an import error, a crash at start-up): stop, don't loop.
CRASH_LOOP_LIMIT = 5


@dataclass
class StageStats:
    done: int = 0
    failed: int = 0
    retries: int = 0
    deaths: int = 0
    timeouts: int = 0
    busy_s: float = 0.0
    io_s: float = 0.0
    cpu_wait_s: float = 0.0
    starved_s: float = 0.0  # worker-seconds idle because the input queue was empty
    blocked_s: float = 0.0  # seconds with input waiting but no room downstream
    per_worker: dict[str, dict[str, float]] = field(default_factory=dict)
    # (worker, key, started_at, busy_s, io_s, cpu_wait_s) per finished item,
    # for the timeline plot; capped so a million-item run stays small.
    timeline: list[tuple[str, str, float, float, float, float]] = field(default_factory=list)


TIMELINE_CAP = 50_000


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
    item: WorkItem | None = None
    deadline: float | None = None
    killed: bool = False  # by us, for a timeout: not a crash
    exiting: bool = False  # its stage raised SystemExit: it is on its way out


@dataclass
class Shared:
    """The synchronisation objects a stage's workers share."""

    lifeline: Connection
    cpu_semaphore: Semaphore
    stop_event: Event
    flags: Any  # RawArray('b', 2 * slots): [io_held, cpu_held] per worker slot


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
        self._serial = 0

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        for slot in self._slots:
            self._start_worker(slot)

    def _start_worker(self, slot: int) -> None:
        self._serial += 1
        name = f"{self.name}-{self._serial}"
        runner_end, worker_end = self._mp.Pipe(duplex=True)
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
            ),
        )
        process.start()
        logger.info("started %s (pid %s)", name, process.pid)
        worker_end.close()
        self._workers.append(_Worker(name=name, slot=slot, process=process, conn=runner_end))

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
        for w in self._workers:
            w.conn.close()
        self._workers.clear()

    # ---------------------------------------------------------------- scheduling

    @property
    def in_flight(self) -> int:
        return sum(1 for w in self._workers if w.item is not None)

    def idle(self) -> int:
        return sum(1 for w in self._workers
                   if w.item is None and not w.exiting and w.process.exitcode is None)

    def busy_workers(self) -> list[str]:
        return [w.name for w in self._workers if w.item is not None]

    def dispatch(self, limit: int) -> int:
        """Hand queued items to idle workers, at most ``limit``; return how many."""
        sent = 0
        for w in self._workers:
            if sent >= limit or not self.queue:
                break
            if w.item is not None or w.exiting or w.process.exitcode is not None:
                continue
            item = self.queue.popleft()
            w.item = item
            w.deadline = (
                time.monotonic() + self.config.timeout_s if self.config.timeout_s else None
            )
            try:
                w.conn.send(item)
            except OSError:
                # It died just now; its sentinel will fire and retry the item.
                pass
            sent += 1
        return sent

    def forget_items(self) -> None:
        """After the runner killed busy workers at the end of the grace period."""
        for w in self._workers:
            w.item, w.deadline, w.killed = None, None, True

    def next_deadline(self) -> float | None:
        deadlines = [w.deadline for w in self._workers if w.item is not None and w.deadline]
        return min(deadlines) if deadlines else None

    def expire(self, now: float) -> None:
        """Kill workers whose item ran past ``timeout_s``; fail or retry it."""
        for w in self._workers:
            if w.item is not None and w.deadline is not None and w.deadline <= now:
                item, w.item = w.item, None
                logger.warning("%s: item %s ran past timeout_s=%s; killing %s (pid %s)",
                               self.name, item.key, self.config.timeout_s, w.name, w.process.pid)
                w.process.kill()
                w.killed = True
                self.stats.timeouts += 1
                self._attempt_failed(item, ItemFailure(
                    index=item.index, key=item.key, stage=self.name, worker=w.name,
                    kind="timeout",
                    message=f"ran longer than timeout_s={self.config.timeout_s}s; worker killed",
                ))

    # ---------------------------------------------------------------- events

    def wait_objects(self) -> dict[Any, Callable[[], object]]:
        handlers: dict[Any, Callable[[], object]] = {}
        for w in self._workers:
            handlers[w.conn] = functools.partial(self._on_message, w)
            handlers[w.process.sentinel] = functools.partial(self._on_exit, w)
        return handlers

    def _on_message(self, w: _Worker) -> bool:
        try:
            message = w.conn.recv()
        except (EOFError, OSError):
            return False  # it died; the sentinel handles that
        item, w.item, w.deadline = w.item, None, None
        if item is None:
            # A late answer for an item already failed by timeout: ignore it.
            return True
        self._crash_streak = 0
        if isinstance(message, ItemDone):
            self.stats.done += 1
            self.stats.busy_s += message.busy_s
            self.stats.io_s += message.io_s
            self.stats.cpu_wait_s += message.cpu_wait_s
            mine = self.stats.per_worker.setdefault(message.worker, {"items": 0, "busy_s": 0.0})
            mine["items"] += 1
            mine["busy_s"] += message.busy_s
            if len(self.stats.timeline) < TIMELINE_CAP:
                self.stats.timeline.append((message.worker, message.key, message.started_at,
                                            message.busy_s, message.io_s, message.cpu_wait_s))
            self._on_done(self.name, message)
        elif isinstance(message, ItemFailure):
            w.exiting = message.kind == "exit"
            self._attempt_failed(item, message)
        return True

    def _on_exit(self, w: _Worker) -> None:
        while w.item is not None and _poll(w.conn) and self._on_message(w):
            pass  # an answer sent just before it exited
        w.process.join(0)
        self._workers.remove(w)
        w.conn.close()
        self._release_slots(w)
        exitcode = w.process.exitcode
        if w.item is not None:
            self.stats.deaths += 1
            item = w.item
            how = procs.describe_exit(exitcode)
            logger.warning("%s (pid %s) %s while holding item %s",
                           w.name, w.process.pid, how, item.key)
            self._attempt_failed(item, ItemFailure(
                index=item.index, key=item.key, stage=self.name, worker=w.name, kind="died",
                message=f"worker {w.name} {how}",
            ))
        elif not w.killed and not self._shared.stop_event.is_set():
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
        if failure.kind == "output":
            self.stats.failed += 1
            self._on_failed(self.name, failure)
            self._on_fatal(OutputError(f"stage {self.name!r}, item {item.key}: {failure.message}",
                                       hint="free space or fix the disk, then run the same "
                                       "command again: finished items are kept"))
            return
        if item.attempt <= self.config.retries and not self._shared.stop_event.is_set():
            self.stats.retries += 1
            logger.warning("%s: item %s failed (attempt %d of %d): %s; retrying",
                           self.name, item.key, item.attempt, self.config.retries + 1,
                           failure.message)
            self.queue.appendleft(replace(item, attempt=item.attempt + 1))
            return
        self.stats.failed += 1
        logger.error("%s: item %s failed for good after %d attempt(s): %s",
                     self.name, item.key, item.attempt, failure.message)
        self._on_failed(self.name, failure)


def _poll(conn: Connection) -> bool:
    try:
        return conn.poll()
    except (EOFError, OSError):
        return False
