"""The writer process: the only process that opens the HDF5 results file.

It takes batches of finished items from the consumer, and for each batch,
holding the results lock (acquired with a deadline: a ``multiprocessing.Lock``
whose holder was killed is never released, gh-88304):

1. opens the run's temporary results file, writes one row per item, closes it;
2. commits the items to the resume ledger (SQLite, synchronous);
3. tells the runner which keys are now committed.

h5py is imported here, inside the process, and the file is opened only after
the process has started: an HDF5 file opened before a fork and used in the
child can hang or read garbage (h5py#934, #2584).  The file is opened for each
batch and closed before the lock is released, so at no time do two processes
hold it open for writing, and the temporary file is complete after every batch.

:func:`seal_main` runs last, in its own writer process, once the writer has
exited: it adds the consumer's total and the run's metadata, fsyncs, and
renames the temporary file over the final one, so ``results.h5`` is always
either the previous complete file or the new complete one, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Lock
from pathlib import Path
from typing import Any

import numpy as np

from mpipe import ledger, procs
from mpipe.messages import (
    Committed,
    EndOfStream,
    ItemFailure,
    ProcessFailed,
    SinkItem,
    loads,
)
from mpipe.outputs import fsync_path, output_error

logger = logging.getLogger(__name__)

BATCH_MAX = 512


@dataclass(frozen=True, slots=True)
class WriterSpec:
    tmp_path: str
    ledger_path: str
    fsync: bool
    lock_timeout_s: float
    log_level: int


def writer_main(
    spec: WriterSpec,
    inbox: Queue[bytes],
    conn: Connection,
    lock: Lock,
    lifeline: Connection,
) -> None:
    procs.child_setup("writer", lifeline, spec.log_level)
    import h5py  # only here: see the module docstring

    store = ledger.Ledger(Path(spec.ledger_path), fsync=spec.fsync)
    try:
        ended = False
        while not ended:
            batch, ended = _next_batch(inbox)
            if not batch:
                continue
            if not lock.acquire(timeout=spec.lock_timeout_s):
                raise TimeoutError(
                    f"could not take the results lock in {spec.lock_timeout_s}s: "
                    "its holder died or is stuck"
                )
            try:
                with h5py.File(spec.tmp_path, "a") as f:
                    rejected = _write_rows(f, batch)
                good = [m for m in batch if m.key not in {r.key for r in rejected}]
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
                )
            )
    except OSError as exc:
        conn.send(ProcessFailed("writer", str(output_error(exc, Path(spec.tmp_path), "write")),
                                traceback.format_exc(), exit_code=74))
    except Exception as exc:
        conn.send(ProcessFailed("writer", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        store.close()


def _next_batch(inbox: Queue[bytes]) -> tuple[list[SinkItem], bool]:
    """Block for one message, then take what else is already there."""
    batch: list[SinkItem] = []
    raw = inbox.get()
    while True:
        message = loads(raw)
        if isinstance(message, EndOfStream):
            return batch, True
        assert isinstance(message, SinkItem), message
        batch.append(message)
        if len(batch) >= BATCH_MAX:
            return batch, False
        try:
            raw = inbox.get_nowait()
        except queue.Empty:
            return batch, False


def _write_rows(f: Any, batch: list[SinkItem]) -> list[ItemFailure]:
    rejected: list[ItemFailure] = []
    rows: list[tuple[int, str, np.ndarray[Any, Any]]] = []
    shape: tuple[int, ...] | None = f["results"].shape[1:] if "results" in f else None
    for message in batch:
        try:
            row = _as_row(loads(message.value))
            if shape is None:
                shape = row.shape
            elif row.shape != shape:
                raise ValueError(f"shape {row.shape} differs from the first result's {shape}")
        except (TypeError, ValueError) as exc:
            rejected.append(ItemFailure(
                index=message.index, key=message.key, stage="writer", worker="writer",
                kind="raised", message=f"its result cannot go into the results file: {exc}",
            ))
            continue
        rows.append((message.index, message.key, row))
    if not rows:
        return rejected
    rows.sort(key=lambda r: r[0])
    _ensure_datasets(f, rows[0][2], rows[-1][0] + 1)
    results, keys, done = f["results"], f["keys"], f["done"]
    # One write per run of consecutive rows: h5py costs tens of microseconds
    # per call, which a row at a time would pay for every item.
    start = 0
    for end in range(1, len(rows) + 1):
        if end == len(rows) or rows[end][0] != rows[end - 1][0] + 1:
            first, last = rows[start][0], rows[end - 1][0] + 1
            results[first:last] = np.stack([r[2] for r in rows[start:end]])
            keys[first:last] = [r[1] for r in rows[start:end]]
            done[first:last] = True
            start = end
    return rejected


def _as_row(value: Any) -> np.ndarray[Any, Any]:
    row = np.asarray(value)
    if row.dtype.kind not in "biuf":
        raise TypeError(
            f"the last stage must return a number or a numeric array, got {type(value).__name__}"
        )
    return row


def _ensure_datasets(f: Any, row: np.ndarray[Any, Any], needed: int) -> None:
    import h5py

    if "results" not in f:
        fill = np.nan if row.dtype.kind == "f" else 0
        f.create_dataset("results", shape=(0, *row.shape), maxshape=(None, *row.shape),
                         dtype=row.dtype, chunks=(64, *row.shape), fillvalue=fill)
        f.create_dataset("keys", shape=(0,), maxshape=(None,), chunks=(1024,),
                         dtype=h5py.string_dtype())
        f.create_dataset("done", shape=(0,), maxshape=(None,), chunks=(1024,), dtype=bool)
    results = f["results"]
    if results.shape[0] < needed:
        # Grow geometrically: resizing per row would cost O(n^2) over a run.
        size = max(needed, 2 * results.shape[0])
        for name in ("results", "keys", "done"):
            f[name].resize(size, axis=0)


@dataclass(frozen=True, slots=True)
class SealSpec:
    tmp_path: str
    final_path: str
    items: int
    total: bytes
    metadata: dict[str, Any]
    fsync: bool
    log_level: int


def seal_main(spec: SealSpec, conn: Connection, lifeline: Connection) -> None:
    """Finish the temporary results file and move it into place."""
    procs.child_setup("writer-seal", lifeline, spec.log_level)
    import h5py

    tmp, final = Path(spec.tmp_path), Path(spec.final_path)
    try:
        with h5py.File(tmp, "a") as f:
            if "results" in f:
                for name in ("results", "keys", "done"):
                    f[name].resize(spec.items, axis=0)
            total = loads(spec.total)
            if total is not None:
                f.create_dataset("total", data=np.asarray(total))
            metadata = dict(spec.metadata)
            # h5py is imported only here, in the writer: its versions too.
            metadata["versions"] = {**metadata.get("versions", {}), "h5py": h5py.__version__,
                                    "hdf5": h5py.version.hdf5_version}
            for key, value in metadata.items():
                f.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
        if spec.fsync:
            fsync_path(tmp)
        os.replace(tmp, final)
        if spec.fsync:
            fsync_path(final.parent, directory=True)
        conn.send(None)
    except OSError as exc:
        conn.send(ProcessFailed("writer", str(output_error(exc, final, "write")),
                                traceback.format_exc(), exit_code=74))
    except Exception as exc:
        conn.send(ProcessFailed("writer", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
