"""Rows of the results file: what the writer processes do inside HDF5.

Imported only inside the writer processes (``writer`` and ``writer-seal``),
never by the runner: numpy and h5py stay off the runner's start-up path, and
h5py is never loaded in a process that forks (h5py#934, #2584).

Layout: ``results`` (one row per item, by item index), ``keys`` (the item's
key), ``done`` (whether the row was written), then, at the seal, ``total``
(the consumer's value) and the run's metadata as attributes.
"""

from __future__ import annotations

import json
import math
from typing import Any

import h5py
import numpy as np

from mpipe.errors import ONE_ROW_SHAPE
from mpipe.messages import ItemFailure, SinkItem, loads
from mpipe.rows import as_row

# A chunk holds at most this many rows, and as many as fit in CHUNK_BYTES (at
# least one): a chunk is allocated whole at its first write, so 64 rows of 5 MB
# made a 325 MB file for 10 MB of rows.  The 26 float64 of the reference
# workload still get 64 rows (13 KB) a chunk.  h5py's guide: 10 KiB to 1 MiB.
CHUNK_ROWS = 64
CHUNK_BYTES = 1 << 20
# Rewriting ``results`` with a wider dtype goes through memory, in one piece,
# up to this size (the old dataset's space is then reused by the new one);
# beyond it, by blocks through a second dataset.
RETYPE_BYTES = 64 << 20


class RowWriter:
    """Writes batches of rows into one open results file.

    It holds the three datasets between batches: looking a dataset up by name
    builds a new h5py object each time, and a handful of lookups per batch
    were a third of the writer's time for quick items.

    The dtype of ``results`` is the common dtype of every row written
    (:func:`common_dtype`), so it does not depend on the order items finish:
    the first rows decide it, and a later row of a wider type (a float after
    integers) makes the writer rewrite the dataset with the wider dtype.  A
    row is never silently changed: a row whose values the dtype cannot hold
    exactly (an integer beyond 2**53 among floats) is rejected, as is a row
    that would need the dtype to widen when a row already written could not
    be held exactly by the wider one.
    """

    def __init__(self, f: h5py.File) -> None:
        self._f = f
        self._datasets: tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset] | None = None
        self._shape: tuple[int, ...] | None = None
        self._dtype: np.dtype[Any] | None = None
        self._size = 0
        if "results" in f:
            self._adopt()

    def _adopt(self) -> None:
        results, keys, done = self._f["results"], self._f["keys"], self._f["done"]
        self._datasets = (results, keys, done)
        self._shape = results.shape[1:]
        self._dtype = results.dtype
        self._size = results.shape[0]

    def write(self, batch: list[SinkItem]) -> list[ItemFailure]:
        """Write the batch's rows; return the items whose value cannot be a row."""
        rejected: list[ItemFailure] = []
        rows: list[tuple[int, str, np.ndarray[Any, Any]]] = []
        shape, dtype = self._shape, self._dtype
        mixed = False  # a row's dtype differs from the results' (or the first row's)
        for message in batch:
            try:
                row = as_row(loads(message.value), "the last stage's value")
                if shape is None:
                    shape, dtype = row.shape, row.dtype
                elif row.shape != shape:
                    raise ValueError(
                        f"shape {row.shape} differs from the first result's {shape}")
                elif row.dtype != dtype:
                    mixed = True
            except (TypeError, ValueError) as exc:
                rejected.append(_rejection(message, str(exc)))
                continue
            rows.append((message.seq, message.key, row))
        if not rows:
            return rejected
        assert shape is not None and dtype is not None
        if mixed:
            rows, dtype = self._settle(batch, rows, rejected)
            if not rows:
                return rejected
        rows.sort(key=lambda r: r[0])
        results, keys, done = self._ensure_datasets(shape, dtype, rows[-1][0] + 1)
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

    def _settle(self, batch: list[SinkItem], rows: list[tuple[int, str, np.ndarray[Any, Any]]],
                rejected: list[ItemFailure]
                ) -> tuple[list[tuple[int, str, np.ndarray[Any, Any]]], np.dtype[Any]]:
        """Rows of differing dtypes: widen the results' dtype, cast the rows to it.

        Returns the rows that can be stored exactly, cast, and their dtype; the
        others are added to ``rejected``.
        """
        messages = {m.seq: m for m in batch}
        current = self._dtype
        while True:
            dtypes = {r[2].dtype for r in rows}
            target = current if current is not None else dtypes.pop()
            for dtype in dtypes:
                target = common_dtype(target, dtype)
            # A row even the common dtype cannot hold exactly (a uint64 beyond
            # 2**53 among ints: float64) is rejected before it widens anything.
            unfit = [r for r in rows if r[2].dtype != target and _exactly(r[2], target) is None]
            if not unfit or (len(unfit) == len(rows) and current is None):
                break
            for seq, _, row in unfit:
                rejected.append(_rejection(messages[seq], (
                    f"it is {row.dtype} with values that {target} cannot hold exactly "
                    f"(the results mix number types, so they would be stored as {target})")))
            rows = [r for r in rows if all(r is not u for u in unfit)]
            if not rows:
                return rows, current if current is not None else target
        if current is not None and target != current and not self._retype(target):
            # A row already written would change: the rows that need the wider
            # dtype are the ones rejected.
            kept = []
            for seq, key, row in rows:
                if common_dtype(current, row.dtype) != current:
                    rejected.append(_rejection(messages[seq], (
                        f"it is {row.dtype}, so the results would have to become {target}, "
                        f"but earlier results are {current} with values that {target} "
                        "cannot hold exactly")))
                else:
                    kept.append((seq, key, row))
            rows, target = kept, current
        cast_rows = []
        for seq, key, row in rows:
            if row.dtype != target:
                cast = _exactly(row, target)
                if cast is None:
                    rejected.append(_rejection(messages[seq], (
                        f"it is {row.dtype} with values that {target} cannot hold exactly "
                        f"(the results mix number types, so they are stored as {target})")))
                    continue
                row = cast
            cast_rows.append((seq, key, row))
        return cast_rows, target

    def _retype(self, dtype: np.dtype[Any]) -> bool:
        """Rewrite ``results`` with the wider ``dtype``.

        False, and the file unchanged, if a value written would change.  The
        file is the run's temporary one and this writer holds the results lock:
        no other process reads it meanwhile, and a writer that dies half-way
        leaves a file the next run deletes (committed rows are replayed).
        """
        assert self._datasets is not None and self._shape is not None
        results, _, done = self._datasets
        size = results.shape[0]
        fill = _fill(dtype)
        step = max(1, RETYPE_BYTES // _row_bytes(self._shape, dtype))
        blocks: list[np.ndarray[Any, Any]] = []
        new: h5py.Dataset | None = None
        for start in range(0, size, step):
            block = _exactly(results[start:start + step], dtype)
            if block is None:
                if new is not None:
                    del new
                    del self._f["results~"]
                return False
            block[~done[start:start + step]] = fill  # rows never written
            if size <= step:
                blocks.append(block)  # the whole dataset, written after the old one is gone
            else:
                if new is None:
                    new = self._create("results~", self._shape, dtype, size)
                new[start:start + len(block)] = block
        # HDF5 frees a dataset's space only once no handle to it is left open.
        del results, new
        self._datasets = None
        del self._f["results"]
        if size <= step:
            new = self._create("results", self._shape, dtype, size)
            if blocks:
                new[:] = blocks[0]
            del new
        else:
            self._f.move("results~", "results")
        self._adopt()
        return True

    def _create(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any], size: int
                ) -> h5py.Dataset:
        return self._f.create_dataset(
            name, shape=(size, *shape), maxshape=(None, *shape), dtype=dtype,
            chunks=(chunk_rows(shape, dtype), *shape), fillvalue=_fill(dtype))

    def _ensure_datasets(self, shape: tuple[int, ...], dtype: np.dtype[Any], needed: int
                         ) -> tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset]:
        if self._datasets is None:
            self._create("results", shape, dtype.newbyteorder("="), 0)
            self._f.create_dataset("keys", shape=(0,), maxshape=(None,), chunks=(1024,),
                                   dtype=h5py.string_dtype())
            self._f.create_dataset("done", shape=(0,), maxshape=(None,), chunks=(1024,),
                                   dtype=bool)
            self._adopt()
        assert self._datasets is not None
        if self._size < needed:
            # Grow geometrically: resizing per row would cost O(n^2) over a run.
            self._size = max(needed, 2 * self._size)
            for dataset in self._datasets:
                dataset.resize(self._size, axis=0)
        return self._datasets


def common_dtype(a: np.dtype[Any], b: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype that rows of dtypes ``a`` and ``b`` are stored as, together.

    numpy's promotion, except that floats mixed with integers or booleans
    give float64 at least (numpy gives float16 for int8 with float16): what
    ``0`` among ``2.5``s is expected to give.  Commutative and associative
    (tests check every triple), so the results' dtype does not depend on the
    order items finish.  Native byte order.
    """
    if (a.kind == "f") != (b.kind == "f"):
        return np.result_type(np.float64, a if a.kind == "f" else b).newbyteorder("=")
    return np.result_type(a, b).newbyteorder("=")


def chunk_rows(shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    """Rows per chunk of ``results``: up to CHUNK_ROWS, within CHUNK_BYTES, at least one."""
    return max(1, min(CHUNK_ROWS, CHUNK_BYTES // _row_bytes(shape, dtype)))


def _row_bytes(shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    return max(1, math.prod(shape) * dtype.itemsize)


def _fill(dtype: np.dtype[Any]) -> float:
    return np.nan if dtype.kind == "f" else 0


def _exactly(a: np.ndarray[Any, Any], dtype: np.dtype[Any]) -> np.ndarray[Any, Any] | None:
    """``a`` cast to ``dtype``, or None if that would change a value."""
    with np.errstate(all="ignore"):  # the way back of a value out of range warns
        cast = a.astype(dtype)
        back = cast.astype(a.dtype)
    return cast if np.array_equal(back, a, equal_nan=a.dtype.kind == "f") else None


def _rejection(message: SinkItem, reason: str) -> ItemFailure:
    # A replayed item was committed by an earlier run whose first row differed
    # from this run's: it stays committed in the ledger.
    again = (f"; it was committed by an earlier run, and stays so: {ONE_ROW_SHAPE}"
             if message.replayed else "")
    return ItemFailure(
        seq=message.seq, key=message.key, stage="writer", worker="writer",
        kind="raised", message=f"its result cannot go into the results file: {reason}{again}",
    )


def seal(f: h5py.File, items: int, total: Any, metadata: dict[str, Any]) -> None:
    """Trim the datasets to the run's items; add the total and the metadata."""
    if "results" in f:
        for name in ("results", "keys", "done"):
            f[name].resize(items, axis=0)
    if total is not None:
        f.create_dataset("total", data=np.asarray(total))
    metadata = dict(metadata)
    metadata["versions"] = {**metadata.get("versions", {}), **library_versions()}
    for key, value in metadata.items():
        f.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)


def library_versions() -> dict[str, str]:
    return {"numpy": np.__version__, "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version}
