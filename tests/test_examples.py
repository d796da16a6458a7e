"""The shipped user example runs and gives the answer of a plain serial loop."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np

from tests.conftest import REPO, mpipe


def serial_signal_stats(n: int, window: int) -> np.ndarray:
    rows = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        t = np.linspace(0, 20 * np.pi, 20_000)
        x = np.sin(t * (1 + seed % 7)) + rng.normal(0, 0.5, t.size)
        y = np.convolve(x, np.ones(window) / window, mode="valid")
        rows.append([y.mean(), y.std(), y.min(), y.max()])
    return np.array(rows)


def test_multistage_example(tmp_path: Path) -> None:
    example = tmp_path / "example"
    shutil.copytree(REPO / "examples" / "signal_stats", example)
    cfg = example / "pipeline.yaml"
    proc = mpipe("run", cfg, "--set", "workdir=out", "--set", "params.signals=25",
                 "--set", "params.window=7")
    assert proc.returncode == 0, proc.stderr
    expected = serial_signal_stats(25, 7)
    with h5py.File(example / "out" / "summaries.h5") as f:
        np.testing.assert_allclose(f["results"][:], expected, rtol=1e-12)
        np.testing.assert_allclose(f["total"][:], expected.sum(axis=0), rtol=1e-9)
        assert [k.decode() for k in f["keys"][:]] == [f"sig{i:04d}" for i in range(25)]
