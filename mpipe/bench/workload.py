"""The bench workdir: input files made once, outputs cleared between runs, configs.

Layout under ``--out`` (default ``bench-results/``)::

    work/input/t###/ch##.npy     the notes' inputs (made once, kept)
    work/output/                 written by whichever runner ran last; cleared
    work/results.h5, .mpipe/     mpipe's results and run state
    configs/*.yaml               the generated mpipe configs
    logs/                        each run's stdout and stderr
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpipe.workloads import notes

logger = logging.getLogger(__name__)


@dataclass
class _PrepareContext:
    """The part of a stage context ``notes.prepare`` uses."""

    params: dict[str, Any]
    workdir: Path

    def path(self, relative: str | Path) -> Path:
        return self.workdir / relative


@dataclass
class BenchDir:
    root: Path

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def scratch(self) -> Path:
        return self.root / "scratch"

    def create(self) -> None:
        for d in (self.work, self.configs, self.logs, self.scratch):
            d.mkdir(parents=True, exist_ok=True)

    def ensure_inputs(self, tasks: int, *, seed: int = 0) -> None:
        """The notes' inputs for tasks 0..tasks-1, generated only where missing."""
        notes.prepare(_PrepareContext({"tasks": tasks, "repeat": 0, "seed": seed}, self.work))

    def ensure_linked_inputs(self, tasks: int, distinct: int) -> None:
        """Inputs for ``tasks`` tasks, beyond ``distinct`` hard-linked to earlier ones.

        Only the memory measure uses these: it needs many tasks of the right
        shape and size, not distinct content, and linking keeps the page cache
        (and the disk) from holding gigabytes of extra random data.
        """
        self.ensure_inputs(distinct)
        for t in range(distinct, tasks):
            for c in range(notes.CHANNELS):
                dst = self.work / notes.input_name(t, c)
                if dst.exists():
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(self.work / notes.input_name(t % distinct, c), dst)

    def warm_inputs(self, tasks: int) -> None:
        """Read every input once so that no timed run pays for a cold page cache."""
        for t in range(tasks):
            for c in range(notes.CHANNELS):
                with open(self.work / notes.input_name(t, c), "rb") as f:
                    while f.read(1 << 22):
                        pass

    def clear_outputs(self) -> None:
        """Remove the previous run's outputs, then flush what is dirty.

        Outside any timed region: each run writes into an empty directory
        (mpipe would otherwise pay for moving the old directories aside), and
        no run pays for the writeback of an earlier run's files.
        """
        shutil.rmtree(self.work / "output", ignore_errors=True)
        for name in ("results.h5",):
            (self.work / name).unlink(missing_ok=True)
        os.sync()


def notes_config(bench: BenchDir, name: str, *, tasks: int, repeat: int, workers: int,
                 cpu_slots: int, io_slots: int | None, fsync: bool,
                 backend: str | None = None) -> Path:
    """An mpipe config for the notes workload, as issue 4's design sets it up.

    ``cpu_slots`` bounds the FFT blocks to the cores; ``io_slots`` (default:
    every worker) lets the workers beyond the cores do their file IO meanwhile.
    No ``prepare``: the inputs are made by the harness, outside the timed run.
    """
    path = bench.configs / f"{name}.yaml"
    path.write_text(
        f"pipeline: bench-notes\n"
        f"workdir: {bench.work}\n"
        f"params: {{tasks: {tasks}, repeat: {repeat}, seed: 0}}\n"
        f"source: {{fn: mpipe.workloads.notes:tasks, queue_size: 16}}\n"
        f"stages:\n"
        f"  compute:\n"
        f"    fn: mpipe.workloads.notes:process_task\n"
        f"    workers: {workers}\n"
        f"    io_slots: {io_slots if io_slots else workers}\n"
        f"cpu_slots: {cpu_slots}\n"
        f"consumer: {{fn: mpipe.workloads.notes:accumulate}}\n"
        f"writer: {{path: results.h5}}\n"
        f"fsync: {'true' if fsync else 'false'}\n"
        f"output_dirs: [output]\n"
        + (f"backend: {backend}\n" if backend else "")
    )
    return path


def trivial_config(bench: BenchDir, name: str, *, items: int, workers: int | str,
                   fsync: bool) -> Path:
    """Three trivial stages (:mod:`mpipe.bench.trivial`) over ``items`` integers."""
    path = bench.configs / f"{name}.yaml"
    stages = "".join(
        f"  {stage}: {{fn: 'mpipe.bench.trivial:{fn}', workers: {workers}}}\n"
        for stage, fn in (("a", "add_one"), ("b", "double"), ("c", "as_float")))
    path.write_text(
        f"pipeline: bench-trivial\n"
        f"workdir: {bench.work}\n"
        f"params: {{items: {items}}}\n"
        f"source: {{fn: 'mpipe.bench.trivial:source'}}\n"
        f"stages:\n{stages}"
        f"consumer: {{fn: 'mpipe.bench.trivial:total'}}\n"
        f"writer: {{path: trivial.h5}}\n"
        f"fsync: {'true' if fsync else 'false'}\n"
        f"allowed_modules: [mpipe.bench.trivial]\n"
    )
    return path


def read_mpipe_total(bench: BenchDir, results: str = "results.h5") -> list[float] | None:
    """The ``total`` mpipe wrote, to check it against the peers'."""
    import h5py

    path = bench.work / results
    if not path.exists():
        return None
    with h5py.File(path, "r") as f:
        if "total" not in f:
            return None
        return [float(v) for v in np.atleast_1d(f["total"][()])]
