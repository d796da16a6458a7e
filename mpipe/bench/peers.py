"""The peers mpipe is measured against, as one plain script (no mpipe imports).

Run by path, ``python mpipe/bench/peers.py RUNNER ...``, so a peer's process
imports numpy and the standard library only: its start-up cost is what a user
of that approach pays, not mpipe's.  Every runner does the same work per task
as ``mpipe.workloads.notes.process_task`` (docs/WORKLOAD.md): load the 26
inputs, low-pass each ``repeat`` times, take the RMS of each, save the 26
outputs (fsynced, then the directory, when ``--fsync``), return the 26-vector;
the parent sums the vectors (the notes' ``res += result``).

Runners:

* ``serial``: the plain loop in this process.  The harness's *floor* starts
  ``min(W, cores)`` of these at once, each over its share (``--share i/k``).
  With ``--keep-freed-mb N`` it first makes glibc's malloc keep freed memory
  as mpipe's stage workers do (:mod:`mpipe.allocator`): the floor with the
  same settings, which the benchmark reports beside the plain one.
* ``pool``: the notes' ``multiprocessing.Pool`` + ``apply_async``.
* ``ppe``: ``concurrent.futures.ProcessPoolExecutor``.
* ``joblib``: ``joblib.Parallel`` with its default (loky) backend.

The summed vector goes to ``--result`` as JSON, so the harness can check that
every runner computed the same total as mpipe.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# The constants of mpipe.workloads.notes, copied rather than imported: importing
# them would pull mpipe into every peer's start-up.
CHANNELS = 26
SAMPLES = 325_120
CUTOFF = 0.05

_GAIN: dict[int, Any] = {}


def gain(n: int) -> Any:
    if n not in _GAIN:
        f = np.fft.rfftfreq(n)
        _GAIN[n] = np.exp(-((f / CUTOFF) ** 2))
    return _GAIN[n]


def low_pass(x: Any, repeat: int) -> Any:
    g = gain(len(x))
    for _ in range(repeat):
        x = np.fft.irfft(np.fft.rfft(x) * g, n=len(x)).astype(np.float32)
    return x


def rms(x: Any) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def fsync_path(path: str, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_task(workdir: str, t: int, repeat: int, fsync: bool) -> Any:
    """One task, in the same order as mpipe's stage: all reads, all compute, all writes."""
    inputs = [np.load(f"{workdir}/input/t{t:03d}/ch{c:02d}.npy", allow_pickle=False)
              for c in range(CHANNELS)]
    filtered = [low_pass(x, repeat) for x in inputs]
    result = np.array([rms(y) for y in filtered], dtype=np.float64)
    out = f"{workdir}/output/t{t:03d}"
    os.makedirs(out, exist_ok=True)
    names = [f"{out}/ch{c:02d}.npy" for c in range(CHANNELS)]
    for name, y in zip(names, filtered, strict=True):
        np.save(name, y)
    if fsync:
        # As mpipe's atomic_dir does: every file, then the directory holding them.
        for name in names:
            fsync_path(name)
        fsync_path(out, directory=True)
        fsync_path(f"{workdir}/output", directory=True)
    return result


def keep_freed_memory(keep_mb: int) -> None:
    """mpipe.allocator.keep_freed_memory's two mallopt calls, copied (see CHANNELS)."""
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (mallopt(-3, 32 << 20) == 1  # M_MMAP_THRESHOLD
            and mallopt(-1, keep_mb << 20) == 1):  # M_TRIM_THRESHOLD
        raise OSError("mallopt did not take the thresholds")


def run_serial(tasks: list[int], a: argparse.Namespace) -> Any:
    if a.keep_freed_mb:
        keep_freed_memory(a.keep_freed_mb)
    total = np.zeros(CHANNELS)
    for t in tasks:
        total += process_task(a.workdir, t, a.repeat, a.fsync)
    return total


def run_pool(tasks: list[int], a: argparse.Namespace) -> Any:
    import multiprocessing

    total = np.zeros(CHANNELS)
    pool = multiprocessing.Pool(a.workers)
    pending = [pool.apply_async(process_task, (a.workdir, t, a.repeat, a.fsync)) for t in tasks]
    for p in pending:
        total += p.get()
    pool.close()
    pool.join()
    return total


def run_ppe(tasks: list[int], a: argparse.Namespace) -> Any:
    from concurrent.futures import ProcessPoolExecutor

    total = np.zeros(CHANNELS)
    with ProcessPoolExecutor(max_workers=a.workers) as ex:
        futures = [ex.submit(process_task, a.workdir, t, a.repeat, a.fsync) for t in tasks]
        for f in futures:
            total += f.result()
    return total


def run_joblib(tasks: list[int], a: argparse.Namespace) -> Any:
    from joblib import Parallel, delayed

    total = np.zeros(CHANNELS)
    with Parallel(n_jobs=a.workers) as parallel:
        for vector in parallel(delayed(process_task)(a.workdir, t, a.repeat, a.fsync)
                               for t in tasks):
            total += vector
    return total


RUNNERS = {"serial": run_serial, "pool": run_pool, "ppe": run_ppe, "joblib": run_joblib}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("runner", choices=sorted(RUNNERS))
    p.add_argument("--workdir", required=True)
    p.add_argument("--tasks", type=int, required=True, help="T: tasks 0..T-1")
    p.add_argument("--share", default="0/1", help="i/k: only tasks t with t %% k == i")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--fsync", action="store_true")
    p.add_argument("--result", help="write the summed vector here (JSON)")
    p.add_argument("--keep-freed-mb", type=int, default=0,
                   help="serial only: keep this much freed memory, as mpipe's workers do")
    a = p.parse_args(argv)
    i, k = (int(v) for v in a.share.split("/"))
    tasks = [t for t in range(a.tasks) if t % k == i]
    total = RUNNERS[a.runner](tasks, a)
    if a.result:
        with open(a.result, "w") as f:
            json.dump({"runner": a.runner, "tasks": len(tasks), "total": list(map(float, total))},
                      f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
