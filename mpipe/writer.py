"""The writer processes: the only processes that open the HDF5 results file.

The writer takes batches of finished items (``SinkBatch``) from the consumer, and for each
batch, holding the results lock (acquired with a deadline: a
``multiprocessing.Lock`` whose holder was killed is never released, gh-88304):

1. writes one row per item into the run's temporary results file;
2. commits the items to the resume ledger (SQLite, synchronous);
3. tells the runner which keys are now committed.

h5py is imported here, inside the process, and the file is opened only after
the process has started: an HDF5 file opened before a fork and used in the
child can hang or read garbage (h5py#934, #2584).  A single writer (the
default) keeps the file open from its first batch to its end: opening and
closing it per batch cost two thirds of the writer's time.  With
``writer.workers`` > 1 each writer opens it under the lock and closes it before
releasing the lock, so two processes never hold it open for writing.  The
temporary file need not be complete between batches: a run that dies leaves it
behind, the next run deletes it, and committed rows are replayed from the
ledger.

:func:`seal_main` is the last writer-side process.  It starts before the others
(:mod:`mpipe.sealer`: its h5py import is paid while the run starts), waits, and once every
writer has exited the runner sends it a :class:`SealSpec`: it adds the
consumer's total and the run's metadata, fsyncs, and renames the temporary
file over the final one, so ``results.h5`` is always either the previous
complete file or the new complete one, never a torn one.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Lock
from pathlib import Path
from typing import Any

from mpipe import ledger, procs
from mpipe.messages import (
    Committed,
    EndOfStream,
    ProcessFailed,
    Sealed,
    SinkBatch,
    SinkItem,
    loads,
)
from mpipe.outputs import fsync_path, output_error

logger = logging.getLogger(__name__)


def _import_h5py() -> None:
    """Import h5py (and hdf5rows) without the ``uname -p`` subprocess it costs.

    h5py's import indexes ``platform.uname()``; on Python 3.11-3.13 (checked),
    indexing the result fills its lazy ``processor`` field, which on Linux
    forks and execs ``uname -p`` (about 11 ms here, in the writer and in the
    sealer) for a field h5py never reads.  Filled in advance with "": what
    ``platform.processor()`` returns when the value cannot be determined, and
    what it returns on this machine, whose ``uname -p`` says "unknown".  A
    Python whose result has no instance dict pays the subprocess.
    """
    import platform

    try:
        vars(platform.uname()).setdefault("processor", "")
    except TypeError:
        pass
    import h5py  # noqa: F401

    from mpipe import hdf5rows  # noqa: F401


# A batch waits at most this long for more items (see _next_batch).
GROUP_WAIT_S = 0.002
# SQLite's primary result codes of a disk that cannot take the ledger's
# writes: SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN.
LEDGER_DISK_ERRORS = frozenset({8, 10, 13, 14})


@dataclass(frozen=True, slots=True)
class WriterSpec:
    tmp_path: str
    ledger_path: str
    fsync: bool
    lock_timeout_s: float
    log_level: int
    keep_open: bool  # the only writer: keep the file open between batches
    batch_max: int  # items per batch at most: half the in-flight window


def writer_main(
    spec: WriterSpec,
    inbox: Queue[bytes],
    conn: Connection,
    lock: Lock,
    lifeline: Connection,
) -> None:
    procs.child_setup("writer", lifeline, spec.log_level)
    store = ledger.Ledger(Path(spec.ledger_path), fsync=spec.fsync)
    f: Any = None
    rows: Any = None  # hdf5rows.RowWriter of the open file
    try:
        batches = _Batches(inbox, spec.batch_max)
        while batch := batches.take():
            if not lock.acquire(timeout=spec.lock_timeout_s):
                raise TimeoutError(
                    f"could not take the results lock in {spec.lock_timeout_s}s: "
                    "its holder died or is stuck"
                )
            try:
                if f is None:
                    # h5py (and hdf5rows, which imports it) only here, at the
                    # first batch (see the module docstring): a run with nothing
                    # to write never waits for it.  The names stay bound for
                    # the later batches.
                    _import_h5py()
                    import h5py

                    from mpipe import hdf5rows

                    f = h5py.File(spec.tmp_path, "a")
                    rows = hdf5rows.RowWriter(f)
                rejected = rows.write(batch)
                if not spec.keep_open:
                    f.close()
                    f = None
                rejected_keys = {r.key for r in rejected}
                good = [m for m in batch if m.key not in rejected_keys]
                # A replayed row refused here stays in the ledger: committed
                # work is never dropped for a conflict with this run's rows.
                refused_replays = sum(m.replayed and m.key in rejected_keys for m in batch)
                store.commit(
                    ledger.Entry(m.key, m.fingerprint, m.value) for m in good if not m.replayed
                )
            finally:
                lock.release()
            conn.send(
                Committed(
                    keys=tuple(m.key for m in good),
                    replayed=sum(m.replayed for m in good),
                    rejected=tuple(rejected),
                    rejected_replayed=refused_replays,
                )
            )
        if f is not None:
            f.close()
            f = None
    except OSError as exc:
        conn.send(ProcessFailed("writer", str(output_error(exc, Path(spec.tmp_path), "write")),
                                traceback.format_exc(), exit_code=74))
    except sqlite3.Error as exc:
        # The ledger's disk full, failing or read-only is the disk's (74, as
        # for results.h5); anything else SQLite raises stays a broken run.
        code = getattr(exc, "sqlite_errorcode", None)
        disk = code is not None and code & 0xFF in LEDGER_DISK_ERRORS
        conn.send(ProcessFailed(
            "writer", f"cannot write the resume ledger {spec.ledger_path}: {exc}"
            + ("; free disk space (or make it writable), then run the same command again: "
               "finished items are kept" if disk else ""),
            traceback.format_exc(), exit_code=74 if disk else 3))
    except Exception as exc:
        conn.send(ProcessFailed("writer", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        if f is not None:
            f.close()
        store.close()


class _Batches:
    """The writer's inbox, taken a batch at a time (group commit).

    Each batch costs a few HDF5 calls, an SQLite commit and an acknowledgement
    whatever its size, and quick items arrive a few at a time: so a batch
    blocks for one message, then gathers more for up to ``GROUP_WAIT_S``.
    ``max_items`` is half the writer's in-flight window, so that the runner
    always has room to send the next items while this batch is gathered;
    items of a message beyond it wait in the backlog for the next batch.
    """

    def __init__(self, inbox: Queue[bytes], max_items: int) -> None:
        self._inbox = inbox
        self._max_items = max_items
        self._backlog: deque[SinkItem] = deque()
        self._ended = False

    def take(self) -> list[SinkItem]:
        """The next batch; empty only once this writer's stream has ended."""
        batch: list[SinkItem] = []
        deadline: float | None = None
        while True:
            while self._backlog and len(batch) < self._max_items:
                batch.append(self._backlog.popleft())
            if len(batch) >= self._max_items or self._ended:
                return batch
            try:
                raw = self._inbox.get_nowait() if batch else self._inbox.get()
            except queue.Empty:
                now = time.monotonic()
                deadline = now + GROUP_WAIT_S if deadline is None else deadline
                if now >= deadline:
                    return batch
                try:
                    raw = self._inbox.get(timeout=deadline - now)
                except queue.Empty:
                    return batch
            message = loads(raw)
            if isinstance(message, EndOfStream):
                self._ended = True
            else:
                assert isinstance(message, SinkBatch), message
                self._backlog.extend(message.items)


@dataclass(frozen=True, slots=True)
class SealSpec:
    tmp_path: str
    final_path: str
    items: int
    total: bytes
    metadata: dict[str, Any]
    fsync: bool


def seal_main(conn: Connection, lifeline: Connection, log_level: int) -> None:
    """Wait for the runner's :class:`SealSpec`; finish the file and move it into place.

    ``None`` instead of a spec, or the runner closing the pipe, means the run
    is not to be sealed (it failed or was interrupted): exit without touching
    anything.
    """
    procs.child_setup("writer-seal", lifeline, log_level)
    _import_h5py()
    import h5py

    from mpipe import hdf5rows

    try:
        spec = conn.recv()
    except EOFError:
        return
    if spec is None:
        return
    assert isinstance(spec, SealSpec), spec
    tmp, final = Path(spec.tmp_path), Path(spec.final_path)
    try:
        with h5py.File(tmp, "a") as f:
            hdf5rows.seal(f, spec.items, loads(spec.total), spec.metadata)
        if spec.fsync:
            fsync_path(tmp)
        os.replace(tmp, final)
        if spec.fsync:
            fsync_path(final.parent, directory=True)
        conn.send(Sealed(hdf5rows.library_versions()))
    except OSError as exc:
        conn.send(ProcessFailed("writer", str(output_error(exc, final, "write")),
                                traceback.format_exc(), exit_code=74))
    except Exception as exc:
        conn.send(ProcessFailed("writer", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
