"""Rows of the results file (mpipe.hdf5rows), written into real HDF5 files.

The API is called as the writer process calls it: a ``RowWriter`` on an open
file, batches of ``SinkItem`` (pickled values), then ``seal``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from mpipe import hdf5rows
from mpipe.messages import ItemFailure, SinkItem, dumps


def item(seq: int, value: Any) -> SinkItem:
    return SinkItem(seq=seq, key=f"k{seq}", fingerprint="f", value=dumps(value), replayed=False)


@pytest.fixture
def h5(tmp_path: Path) -> Iterator[h5py.File]:
    with h5py.File(tmp_path / "results.h5.tmp", "a") as f:
        yield f


def write_batches(f: h5py.File, *batches: list[SinkItem]) -> list[ItemFailure]:
    rows = hdf5rows.RowWriter(f)
    rejected: list[ItemFailure] = []
    for batch in batches:
        rejected += rows.write(batch)
    return rejected


# --- 1. mixed number types: never silently changed ---------------------------


@pytest.mark.parametrize("same_batch", [False, True], ids=["later-batch", "same-batch"])
def test_int_first_then_floats_stores_the_floats_exactly(h5: h5py.File, same_batch: bool
                                                        ) -> None:
    batches = ([[item(0, 0), item(1, 2.5), item(2, 3.75)]] if same_batch
               else [[item(0, 0)], [item(1, 2.5), item(2, 3.75)]])
    assert write_batches(h5, *batches) == []
    assert h5["results"].dtype == np.float64
    np.testing.assert_array_equal(h5["results"][:3], [0.0, 2.5, 3.75])
    assert h5["done"][:3].all()


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_mixed_int_and_float_rows_give_the_same_file_in_any_finish_order(
        h5: h5py.File, order: tuple[int, ...]) -> None:
    values: list[Any] = [np.arange(4), np.array([0.5, 1.5, 2.5, 3.5]), np.array([7, 8, 9, 10])]
    assert write_batches(h5, *([item(seq, values[seq])] for seq in order)) == []
    hdf5rows.seal(h5, 3, None, {})
    assert h5["results"].dtype == np.float64
    np.testing.assert_array_equal(
        h5["results"][:], [[0, 1, 2, 3], [0.5, 1.5, 2.5, 3.5], [7, 8, 9, 10]])
    assert list(h5["keys"].asstr()[:]) == ["k0", "k1", "k2"]
    assert h5["done"][:].all()


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 2, 1)])
def test_a_row_the_common_dtype_cannot_hold_does_not_widen_the_results(
        h5: h5py.File, order: tuple[int, ...]) -> None:
    # uint64 2**64-1 with int64 makes float64, which holds neither it nor 2**62+1:
    # it is rejected without retyping the results, whatever the order.
    values = [np.int64(1), np.uint64(2**64 - 1), np.int64(2**62 + 1)]
    rejected = write_batches(h5, *([item(seq, values[seq])] for seq in order))
    assert [r.key for r in rejected] == ["k1"]
    assert h5["results"].dtype == np.int64
    assert h5["results"][0] == 1 and h5["results"][2] == 2**62 + 1


def test_float64_rows_are_written_as_they_are(h5: h5py.File) -> None:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((300, 26))
    batches = [[item(seq, data[seq]) for seq in range(start, start + 50)]
               for start in range(0, 300, 50)]
    assert write_batches(h5, *batches) == []
    hdf5rows.seal(h5, 300, float(data.sum()), {"pipeline": "p"})
    results = h5["results"]
    assert results.dtype == np.float64 and results.shape == (300, 26)
    assert results.chunks == (64, 26)
    np.testing.assert_array_equal(results[:], data)
    assert h5["done"][:].all()


def test_an_integer_that_floats_cannot_hold_is_rejected_not_rounded(h5: h5py.File) -> None:
    big = 2**53 + 1  # float64(big) == 2**53
    rejected = write_batches(h5, [item(0, 2.5)], [item(1, big), item(2, 7)])
    assert [(r.seq, r.key, r.stage, r.kind) for r in rejected] == [(1, "k1", "writer", "raised")]
    assert "cannot go into the results file" in rejected[0].message
    assert "int64" in rejected[0].message and "cannot hold exactly" in rejected[0].message
    hdf5rows.seal(h5, 3, None, {})
    assert h5["results"].dtype == np.float64
    np.testing.assert_array_equal(h5["results"][:], [2.5, np.nan, 7.0])
    assert list(h5["done"][:]) == [True, False, True]


def test_a_float_after_integers_that_floats_cannot_hold_is_rejected(h5: h5py.File) -> None:
    big = 2**60 + 1
    rejected = write_batches(h5, [item(0, big)], [item(1, 2.5), item(2, 3)])
    assert [r.seq for r in rejected] == [1]
    assert "earlier results are int64" in rejected[0].message
    assert h5["results"].dtype == np.int64
    assert h5["results"][0] == big and h5["results"][2] == 3
    assert list(h5["done"][:3]) == [True, False, True]


def test_widening_keeps_unwritten_rows_unwritten_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "results.h5.tmp"
    with h5py.File(path, "a") as f:  # one writer turn per batch (writer.workers > 1)
        assert hdf5rows.RowWriter(f).write([item(0, np.int32(5)), item(3, np.int32(6))]) == []
    with h5py.File(path, "a") as f:
        assert hdf5rows.RowWriter(f).write([item(1, True)]) == []
        assert f["results"].dtype == np.int32
    with h5py.File(path, "a") as f:
        assert hdf5rows.RowWriter(f).write([item(4, np.float32(0.25))]) == []
    with h5py.File(path, "a") as f:
        assert hdf5rows.RowWriter(f).write([item(5, np.int64(-2))]) == []
        hdf5rows.seal(f, 6, None, {})
    with h5py.File(path, "r") as f:
        assert set(f) == {"results", "keys", "done"}
        assert f["results"].dtype == np.float64
        np.testing.assert_array_equal(f["results"][:], [5, 1, np.nan, 6, 0.25, -2])
        assert list(f["done"][:]) == [True, True, False, True, True, True]


def test_widening_by_blocks(h5: h5py.File, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hdf5rows, "RETYPE_BYTES", 3 * 8 * 8)  # 3 rows a block
    ints = np.arange(80).reshape(10, 8)
    assert write_batches(h5, [item(seq, ints[seq]) for seq in range(9)]) == []
    assert write_batches(h5, [item(9, ints[9] + 0.5)]) == []
    assert set(h5) == {"results", "keys", "done"}
    assert h5["results"].dtype == np.float64
    np.testing.assert_array_equal(h5["results"][:9], ints[:9])
    np.testing.assert_array_equal(h5["results"][9], ints[9] + 0.5)


def test_widening_by_blocks_that_would_change_a_row_leaves_the_file(
        h5: h5py.File, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hdf5rows, "RETYPE_BYTES", 3 * 8)  # 3 rows a block
    values = [*range(7), 2**60 + 1, 8]
    assert write_batches(h5, [item(seq, v) for seq, v in enumerate(values)]) == []
    rejected = write_batches(h5, [item(9, 0.5)])
    assert [r.seq for r in rejected] == [9]
    assert set(h5) == {"results", "keys", "done"}
    assert h5["results"].dtype == np.int64
    assert list(h5["results"][:9]) == values


def test_widening_reuses_the_space_of_the_old_dataset(tmp_path: Path) -> None:
    path = tmp_path / "results.h5.tmp"
    ints = np.arange(100 * 10_000).reshape(100, 10_000)  # 8 MB of int64
    with h5py.File(path, "a") as f:
        assert write_batches(f, [item(seq, ints[seq]) for seq in range(100)],
                             [item(100, ints[0] + 0.5)]) == []
        hdf5rows.seal(f, 101, None, {})
        assert f["results"].dtype == np.float64
    assert path.stat().st_size < 1.2 * 101 * 10_000 * 8


def test_common_dtype_does_not_depend_on_order() -> None:
    dtypes = [np.dtype(t) for t in (
        "?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "g", ">f8")]
    common = hdf5rows.common_dtype
    for a, b in itertools.product(dtypes, repeat=2):
        assert common(a, b) == common(b, a), (a, b)
    for a, b, c in itertools.product(dtypes, repeat=3):
        assert common(common(a, b), c) == common(a, common(b, c)), (a, b, c)
    assert common(np.dtype("i8"), np.dtype("f8")) == np.float64
    assert common(np.dtype("i1"), np.dtype("f2")) == np.float64
    assert common(np.dtype("?"), np.dtype("f4")) == np.float64
    assert common(np.dtype("?"), np.dtype("i4")) == np.int32
    assert common(np.dtype("f4"), np.dtype("f4")) == np.float32


# --- 2. chunks bounded by bytes ----------------------------------------------


def test_large_rows_make_a_file_the_size_of_their_data(tmp_path: Path) -> None:
    path = tmp_path / "results.h5.tmp"
    n = 2_000_000  # 16 MB a row
    with h5py.File(path, "a") as f:
        assert write_batches(f, [item(0, np.full(n, 1.5))], [item(1, np.full(n, 2.5))]) == []
        hdf5rows.seal(f, 2, None, {})
    assert path.stat().st_size < 1.5 * 2 * n * 8
    with h5py.File(path, "r") as f:
        assert f["results"].chunks == (1, n)
        assert f["results"][0, 0] == 1.5 and f["results"][1, -1] == 2.5


@pytest.mark.parametrize(("shape", "dtype"), [
    ((26,), "f8"),  # the reference workload: 13 KB a chunk
    ((), "f8"),
    ((), "?"),
    ((2048,), "f8"),  # 1 MiB
    ((4096,), "f4"),
])
def test_small_rows_keep_64_row_chunks(h5: h5py.File, shape: tuple[int, ...], dtype: str
                                       ) -> None:
    assert write_batches(h5, [item(0, np.zeros(shape, dtype))]) == []
    assert h5["results"].chunks == (64, *shape)


@pytest.mark.parametrize(("shape", "dtype", "rows"), [
    ((4096,), "f8", 32),  # 32 KB a row
    ((200_000,), "i1", 5),
    ((300, 300), "f8", 1),  # 720 KB a row
    ((3, 100_000), "f8", 1),  # 2.4 MB a row: one row, however large
])
def test_chunks_of_larger_rows_hold_about_1_mib(
        h5: h5py.File, shape: tuple[int, ...], dtype: str, rows: int) -> None:
    assert write_batches(h5, [item(0, np.zeros(shape, dtype))]) == []
    assert h5["results"].chunks == (rows, *shape)


def test_an_int_beyond_64_bits_is_named_as_such(h5: h5py.File) -> None:
    [rejected] = write_batches(h5, [item(0, 1.5), item(1, 2**64)])
    assert rejected.key == "k1" and "an int beyond 64 bits" in rejected.message
