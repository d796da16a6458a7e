"""What a stage function may ask of mpipe while it runs: :class:`StageContext`.

A stage is a plain function ``fn(value)`` or ``fn(value, ctx)``.  The context
gives it the pipeline's ``params``, paths inside the workdir, crash-safe output
directories, and the two shared semaphores:

* ``ctx.io()``: at most ``io_slots`` workers of the stage in file IO at once
  (the notes' Semaphore), so many workers do not thrash one disk;
* ``ctx.cpu()``: at most ``cpu_slots`` workers computing at once across all
  stages (default: the cores), so extra workers overlap their IO with other
  workers' compute instead of fighting for the cores.  The runner lifts this
  bound for the last round, once nothing is left to hand out and fewer than
  2 x ``cpu_slots`` items remain (see ``Runner._lift_cpu_bound``).

A worker killed while holding a slot would leak it for good (a semaphore, like
a ``multiprocessing.Lock``, is not released by the death of its holder:
gh-88304).  So each worker marks the slots it holds in shared memory, and the
runner releases them on its behalf when it sees the worker die.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.synchronize import Semaphore
from pathlib import Path
from typing import Any

from mpipe import outputs

logger = logging.getLogger(__name__)

IO_FLAG = 0
CPU_FLAG = 1


class StopFlag:
    """The run's "stopping" flag, shared by every process: one byte of shared memory.

    Not a ``multiprocessing.Event``: its ``is_set()`` takes a lock, and a worker
    killed inside it (by ``timeout_s``, by the OOM killer) leaves that lock
    taken for good (gh-88304), so the next ``is_set()`` anywhere, the runner's
    included, never returns.  A byte that only ever goes from 0 to 1 needs no
    lock to be read.
    """

    def __init__(self, byte: Any) -> None:
        self._byte = byte  # a RawArray("b", 1)

    def set(self) -> None:
        self._byte[0] = 1

    def is_set(self) -> bool:
        return bool(self._byte[0])


class PathEscapeError(ValueError):
    """A path given to mpipe resolves outside the workdir (``../``, a symlink)."""


def resolve_inside(root: Path, relative: str | Path, *, allow_outside: bool) -> Path:
    """``root / relative`` with every symlink resolved; refused if it leaves ``root``."""
    # os.path.join("workdir", "/abs") drops workdir, and a symlink can point
    # anywhere: resolve first, then check containment.
    parent, name = os.path.split(os.path.join(root, relative))
    if name in ("", ".", ".."):
        path = os.path.realpath(os.path.join(parent, name))
    else:
        path = os.path.join(_real_dir(parent), name)
        if os.path.islink(path):
            path = os.path.realpath(path)
    real_root = _real_dir(str(root))
    if not allow_outside and path != real_root and not path.startswith(
            real_root.rstrip(os.sep) + os.sep):
        raise PathEscapeError(
            f"path {str(relative)!r} resolves to {path}, outside the workdir {root}; "
            "set allow_outside_workdir: true if that is intended"
        )
    return Path(path)


_REAL_DIRS: dict[str, str] = {}


def _real_dir(path: str) -> str:
    # Path.resolve() lstats every component of every path: 26 inputs of one
    # task share one directory, so an existing directory is resolved once per
    # process.  (One swapped for a symlink while a run goes is not noticed.)
    real = _REAL_DIRS.get(path)
    if real is None:
        real = os.path.realpath(path)
        if len(_REAL_DIRS) < 4096 and os.path.isdir(real):
            _REAL_DIRS[path] = real
    return real


@dataclass
class SlotFlags:
    """A view on the shared ``[io_held, cpu_held]`` pair of one worker."""

    array: Any  # multiprocessing RawArray('b'); typed Any: ctypes arrays are untyped
    slot: int

    def set(self, which: int, held: bool) -> None:
        self.array[self.slot * 2 + which] = 1 if held else 0

    def held(self, which: int) -> bool:
        return bool(self.array[self.slot * 2 + which])


class TimeSpans:
    """Seconds during which at least one block was open, in any thread.

    Blocks that overlap, nested or in other threads, count once: a worker's IO
    is the time it spent waiting for its files, however many of its threads
    waited together.  ``enter`` and ``exit`` take the time they are given, so
    that two spans of the same block read one clock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0
        self._since = 0.0
        self.total = 0.0
        _every_span.add(self)

    def enter(self, now: float | None = None) -> None:
        with self._lock:
            if self._open == 0:
                self._since = time.perf_counter() if now is None else now
            self._open += 1

    def exit(self, now: float | None = None) -> None:
        with self._lock:
            self._open -= 1
            if self._open == 0:
                self.total += (time.perf_counter() if now is None else now) - self._since

    def reset(self) -> None:
        """Start counting anew (a new item); blocks still open count from now."""
        with self._lock:
            self.total = 0.0
            if self._open:
                self._since = time.perf_counter()

    # A context handed to a pickling library keeps its times, not its lock.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._open = 0  # the copy's own blocks are all still to come
        _every_span.add(self)


# A stage may fork (its own multiprocessing.Pool) while another of its threads
# holds a span's lock: the child gets every lock anew, as outputs does its own.
_every_span: weakref.WeakSet[TimeSpans] = weakref.WeakSet()


def _new_locks_in_child() -> None:
    for span in list(_every_span):
        span._lock = threading.Lock()


os.register_at_fork(after_in_child=_new_locks_in_child)


def _exit_all(entered: list[TimeSpans], now: float) -> None:
    """Close each span, last entered first, every one even if another raises."""
    if entered:
        try:
            entered[-1].exit(now)
        finally:
            _exit_all(entered[:-1], now)


class WorkdirPaths:
    """``path()`` and ``output_dir()``, and the item's times: the same for a local
    worker and a Dask task."""

    workdir: Path
    allow_outside_workdir: bool
    fsync: bool
    cpu_wait_s: float
    # The worker's IO: its io() blocks and its output_dir commits.  A commit
    # is the time an output_dir block takes, once the stage's code is done
    # with it, to fsync the files (if fsync), rename the directory into place
    # and remove an older one: waiting for the disk, counted as IO even
    # outside ctx.io(), so that a stage writing its outputs there is not taken
    # for compute-bound (mpipe.analysis).
    _io_spans: TimeSpans
    _commit_spans: TimeSpans

    @property
    def io_s(self) -> float:
        return self._io_spans.total

    @property
    def output_commit_s(self) -> float:
        """Of io_s, the output_dir commits'."""
        return self._commit_spans.total

    def reset_times(self) -> None:
        """Zero the times, for the next item."""
        self._io_spans.reset()
        self._commit_spans.reset()
        self.cpu_wait_s = 0.0

    def path(self, relative: str | Path) -> Path:
        """``relative`` resolved inside the workdir (escapes are refused)."""
        return resolve_inside(self.workdir, relative, allow_outside=self.allow_outside_workdir)

    @contextmanager
    def output_dir(self, relative: str | Path) -> Iterator[Path]:
        """A directory whose files appear all together, or not at all.

        Write the item's files into the yielded temporary directory; when the
        block ends without an exception they are fsynced (if ``fsync``) and
        the directory is renamed to ``relative``.
        """
        final = self.path(relative)
        # Each span entered is closed, even if something raises in between (a
        # stage's own signal handler), save in the instant between an enter
        # and its append: one left open would count no IO for the rest of the
        # worker's items.  A failed commit counts its time.
        entered: list[TimeSpans] = []
        try:
            with outputs.atomic_dir(final, fsync=self.fsync) as tmp:
                yield tmp
                now = time.perf_counter()
                for spans in (self._io_spans, self._commit_spans):
                    spans.enter(now)
                    entered.append(spans)
        finally:
            _exit_all(entered, time.perf_counter())


@dataclass
class StageContext(WorkdirPaths):
    stage: str
    worker: str
    params: dict[str, Any]
    workdir: Path
    fsync: bool
    allow_outside_workdir: bool
    io_semaphore: Semaphore
    cpu_semaphore: Semaphore
    stop_event: StopFlag
    flags: SlotFlags
    key: str = ""
    attempt: int = 1
    cpu_wait_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    _io_spans: TimeSpans = field(default_factory=TimeSpans, repr=False)
    _commit_spans: TimeSpans = field(default_factory=TimeSpans, repr=False)
    # A slot is the worker's (io_slots and cpu_slots count workers): its
    # first block takes it, blocks inside it, nested or in other threads of
    # the worker, share it, the last one out gives it back.  Per kind: how
    # many blocks are in, and a lock so that a second thread waits while the
    # first one waits for it.
    _inside: list[int] = field(default_factory=lambda: [0, 0], repr=False)
    _gates: tuple[threading.Lock, threading.Lock] = field(
        default_factory=lambda: (threading.Lock(), threading.Lock()), repr=False)

    @contextmanager
    def io(self) -> Iterator[None]:
        """Hold the worker's one of the stage's ``io_slots`` for a block of file IO."""
        with self._slot(self.io_semaphore, IO_FLAG):
            yield

    @contextmanager
    def cpu(self) -> Iterator[None]:
        """Hold the worker's one of the pipeline's ``cpu_slots`` for a block of compute."""
        with self._slot(self.cpu_semaphore, CPU_FLAG):
            yield

    @contextmanager
    def _slot(self, semaphore: Semaphore, which: int) -> Iterator[None]:
        # Nested blocks (a helper that takes ctx.cpu() inside another ctx.cpu()
        # block, or a thread pool's threads inside one) take nothing: taking a
        # second slot would wait for ever once every slot is held that way.
        # The shared flag says "this worker holds one" while any block is in:
        # the runner gives back exactly one if the worker dies.  The times are
        # the worker's, counted once however many threads: io_s from the
        # first block's start (its wait included) to the last one's end
        # (TimeSpans, which output_dir's commits join), cpu_wait_s the first
        # block's wait for the slot.
        with self._gates[which]:
            if self._inside[which] == 0:
                # Timed from here: a wait at the gate overlaps another span.
                start = time.perf_counter()
                if which == IO_FLAG:
                    self._io_spans.enter(start)
                try:
                    semaphore.acquire()
                except BaseException:  # a stage's own signal handler raising
                    if which == IO_FLAG:
                        self._io_spans.exit()
                    raise
                self.flags.set(which, True)
                if which == CPU_FLAG:
                    self.cpu_wait_s += time.perf_counter() - start
            self._inside[which] += 1
        try:
            yield
        finally:
            with self._gates[which]:
                self._inside[which] -= 1
                if self._inside[which] == 0:
                    self.flags.set(which, False)
                    try:
                        semaphore.release()
                    finally:
                        if which == IO_FLAG:
                            self._io_spans.exit()

    def stop_requested(self) -> bool:
        """True once the run is stopping: long stages may return early."""
        return self.stop_event.is_set()
