"""An independent serial computation of the notes workload (docs/WORKLOAD.md).

Written from the workload's definition, not from mpipe's code: inputs are
regenerated from the seed (not read back), and nothing here imports mpipe.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

N = 325_120
CHANNELS = 26


def reference_input(seed: int, t: int, c: int) -> np.ndarray:
    return np.random.default_rng([seed, t, c]).standard_normal(N, dtype=np.float32)


def reference_filter(x: np.ndarray, repeat: int) -> np.ndarray:
    f = np.fft.rfftfreq(len(x))
    g = np.exp(-((f / 0.05) ** 2))
    for _ in range(repeat):
        x = np.fft.irfft(np.fft.rfft(x) * g, n=len(x)).astype(np.float32)
    return x


@dataclass
class Reference:
    vectors: np.ndarray  # (T, 26)
    total: np.ndarray  # (26,)
    files: dict[str, bytes]  # "output/t000/ch00.npy" -> npy bytes


def serial_reference(tasks: int, repeat: int, seed: int = 0) -> Reference:
    vectors = np.zeros((tasks, CHANNELS))
    files: dict[str, bytes] = {}
    for t in range(tasks):
        for c in range(CHANNELS):
            y = reference_filter(reference_input(seed, t, c), repeat)
            vectors[t, c] = np.sqrt(np.mean(y.astype(np.float64) ** 2))
            buf = io.BytesIO()
            np.save(buf, y)
            files[f"output/t{t:03d}/ch{c:02d}.npy"] = buf.getvalue()
    total = np.zeros(CHANNELS)
    for t in range(tasks):
        total = total + vectors[t]
    return Reference(vectors, total, files)
