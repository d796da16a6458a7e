"""The study notes' workload (``docs/WORKLOAD.md``), as mpipe stages.

Task ``t`` reads 26 float32 files, low-pass filters each ``repeat`` times with
an FFT, writes 26 files, and returns the RMS of each output channel; the
consumer sums the 26-vectors.

* ``prepare``: make missing or invalid input files (not part of a timed run).
* ``tasks``: the source; one :class:`Task` per ``t`` with its inputs and outputs.
* ``process_task``: the compute stage, IO under ``ctx.io()``, FFTs under
  ``ctx.cpu()``, outputs through ``ctx.output_dir()`` (all 26 files or none).
* ``accumulate``: the consumer, an exact (order-independent) sum.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mpipe.context import StageContext
from mpipe.exactsum import ExactSum
from mpipe.messages import Task

logger = logging.getLogger(__name__)

CHANNELS = 26
SAMPLES = 325_120
CUTOFF = 0.05
DTYPE = np.dtype(np.float32)


class InputFileError(ValueError):
    """An input file is missing, empty, truncated or of the wrong shape."""


def input_name(t: int, c: int) -> str:
    return f"input/t{t:03d}/ch{c:02d}.npy"


def output_dir_name(t: int) -> str:
    return f"output/t{t:03d}"


def _params(ctx: Any) -> tuple[int, int, int]:
    p = ctx.params
    return int(p.get("tasks", 10)), int(p.get("repeat", 1)), int(p.get("seed", 0))


# ------------------------------------------------------------------ prepare


def expected_input(seed: int, t: int, c: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng([seed, t, c]).standard_normal(SAMPLES, dtype=np.float32)


def prepare(ctx: Any) -> None:
    """Create the input files that are missing or invalid; keep valid ones."""
    tasks, _, seed = _params(ctx)
    made = 0
    for t in range(tasks):
        for c in range(CHANNELS):
            path = ctx.path(input_name(t, c))
            try:
                read_header(path)
                continue
            except InputFileError as exc:
                if path.exists():
                    logger.warning("regenerating invalid input: %s", exc)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".mpipe-tmp-prepare")
            with open(tmp, "wb") as f:
                np.save(f, expected_input(seed, t, c))
            os.replace(tmp, path)
            made += 1
    if made:
        logger.warning("generated %d input file(s) under %s", made, ctx.path("input"))


def read_header(path: Path) -> None:
    """Cheap validity check: the npy header says float32 (SAMPLES,) and the size fits."""
    _open_checked(path).close()


def load_input(path: Path) -> np.ndarray[Any, Any]:
    """Check and read one input through one open file (the check costs no extra open)."""
    f = _open_checked(path)
    with f:
        try:
            x = np.fromfile(f, dtype=DTYPE, count=SAMPLES)
        except (ValueError, OSError) as exc:
            raise InputFileError(f"input file {path} cannot be read: {exc}") from None
    if x.size != SAMPLES:
        raise InputFileError(f"input file {path} changed while it was read")
    return x


def _open_checked(path: Path) -> BinaryIO:
    """Open an input, check its header and size; return it positioned at the data."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (returned open, or closed below)
    except FileNotFoundError:
        raise InputFileError(f"input file {path} is missing") from None
    except OSError as exc:
        raise InputFileError(f"input file {path} cannot be opened: {exc}") from None
    try:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            data_offset = f.tell()
            size = os.fstat(f.fileno()).st_size
        except (ValueError, OSError, EOFError) as exc:
            raise InputFileError(f"input file {path} is not a valid .npy file: {exc}") from None
        if shape != (SAMPLES,) or dtype != DTYPE:
            raise InputFileError(
                f"input file {path} holds {dtype}{list(shape)}, expected float32[{SAMPLES}]"
            )
        if size != data_offset + SAMPLES * DTYPE.itemsize:
            raise InputFileError(
                f"input file {path} is truncated ({size} bytes, expected "
                f"{data_offset + SAMPLES * DTYPE.itemsize})"
            )
    except BaseException:
        f.close()
        raise
    return f


# ------------------------------------------------------------------ the stages


def tasks(ctx: Any) -> Iterator[Task]:
    n, _, _ = _params(ctx)
    for t in range(n):
        yield Task(
            key=f"t{t:03d}",
            value={"t": t},
            inputs=tuple(input_name(t, c) for c in range(CHANNELS)),
            outputs=(output_dir_name(t),),
        )


@lru_cache(maxsize=4)
def gain(n: int) -> np.ndarray[Any, Any]:
    f = np.fft.rfftfreq(n)
    g: np.ndarray[Any, Any] = np.exp(-((f / CUTOFF) ** 2))
    return g


def low_pass(x: np.ndarray[Any, Any], repeat: int) -> np.ndarray[Any, Any]:
    g = gain(len(x))
    for _ in range(repeat):
        x = np.fft.irfft(np.fft.rfft(x) * g, n=len(x)).astype(np.float32)
    return x


def rms(x: np.ndarray[Any, Any]) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def process_task(value: dict[str, int], ctx: StageContext) -> np.ndarray[Any, Any]:
    t = value["t"]
    _, repeat, _ = _params(ctx)
    with ctx.io():
        inputs = [load_input(ctx.path(input_name(t, c))) for c in range(CHANNELS)]
    with ctx.cpu():
        filtered = [low_pass(x, repeat) for x in inputs]
        result = np.array([rms(y) for y in filtered], dtype=np.float64)
    with ctx.io(), ctx.output_dir(output_dir_name(t)) as tmp:
        for c, y in enumerate(filtered):
            np.save(tmp / f"ch{c:02d}.npy", y)
    return result


def accumulate(results: Iterable[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    total = ExactSum()
    for vector in results:
        total.add(vector)
    return total.value() if total.count else np.zeros(CHANNELS)
