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
from typing import Any

import h5py
import numpy as np

from mpipe.messages import ItemFailure, SinkItem, loads


class RowWriter:
    """Writes batches of rows into one open results file.

    It holds the three datasets between batches: looking a dataset up by name
    builds a new h5py object each time, and a handful of lookups per batch
    were a third of the writer's time for quick items.
    """

    def __init__(self, f: h5py.File) -> None:
        self._f = f
        self._datasets: tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset] | None = None
        self._shape: tuple[int, ...] | None = None
        self._size = 0
        if "results" in f:
            self._adopt()

    def _adopt(self) -> None:
        results, keys, done = self._f["results"], self._f["keys"], self._f["done"]
        self._datasets = (results, keys, done)
        self._shape = results.shape[1:]
        self._size = results.shape[0]

    def write(self, batch: list[SinkItem]) -> list[ItemFailure]:
        """Write the batch's rows; return the items whose value cannot be a row."""
        rejected: list[ItemFailure] = []
        rows: list[tuple[int, str, np.ndarray[Any, Any]]] = []
        shape = self._shape
        for message in batch:
            try:
                row = _as_row(loads(message.value))
                if shape is None:
                    shape = row.shape
                elif row.shape != shape:
                    raise ValueError(
                        f"shape {row.shape} differs from the first result's {shape}")
            except (TypeError, ValueError) as exc:
                rejected.append(ItemFailure(
                    seq=message.seq, key=message.key, stage="writer", worker="writer",
                    kind="raised", message=f"its result cannot go into the results file: {exc}",
                ))
                continue
            rows.append((message.seq, message.key, row))
        if not rows:
            return rejected
        rows.sort(key=lambda r: r[0])
        results, keys, done = self._ensure_datasets(rows[0][2], rows[-1][0] + 1)
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

    def _ensure_datasets(self, row: np.ndarray[Any, Any], needed: int
                         ) -> tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset]:
        if self._datasets is None:
            fill = np.nan if row.dtype.kind == "f" else 0
            self._f.create_dataset("results", shape=(0, *row.shape),
                                   maxshape=(None, *row.shape), dtype=row.dtype,
                                   chunks=(64, *row.shape), fillvalue=fill)
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


def _as_row(value: Any) -> np.ndarray[Any, Any]:
    row = np.asarray(value)
    if row.dtype.kind not in "biuf":
        raise TypeError(
            f"the last stage must return a number or a numeric array, got {type(value).__name__}"
        )
    return row
