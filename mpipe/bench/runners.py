"""Each way of running the notes workload, as one timed whole run.

A runner is a callable returning a :class:`~mpipe.bench.measure.Sample`; the
harness clears the outputs before calling it, so every run starts alike.
After a run the runner reads back the summed vector it produced, so that the
harness can check all runners did the same work.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mpipe.analysis import WORKERS_PER_CPU_SLOT_FOR_COMMITS
from mpipe.bench import measure, workload
from mpipe.bench.workload import BenchDir

logger = logging.getLogger(__name__)

PEERS_SCRIPT = Path(__file__).with_name("peers.py")
# mpipe itself at W = cores, a runner in the rounds of each W > cores: "more
# workers than cores must never make a run slower" is read pair by pair
# against it, in the same minutes, instead of across columns run minutes apart.
AT_CORES = "mpipe-at-cores"
# In the durable suite, mpipe with WIDE_FACTOR x cores workers (cpu_slots the
# cores), with and without fsync: while some workers wait for their fsyncs,
# others compute, as mpipe's advice says to run an fsync-bound stage.
WIDE = "mpipe-wide"
WIDE_NOFSYNC = "mpipe-wide-nofsync"
WIDE_FACTOR = WORKERS_PER_CPU_SLOT_FOR_COMMITS

PEER_LABELS = {
    "floor": "floor (independent processes)",
    "floor-kept": "floor, freed memory kept as mpipe's workers do",
    AT_CORES: "mpipe at W = cores (beside W > cores)",
    WIDE: f"mpipe, {WIDE_FACTOR} workers per core",
    WIDE_NOFSYNC: f"mpipe, {WIDE_FACTOR} workers per core, no fsync",
    "serial": "serial loop",
    "pool": "multiprocessing.Pool + apply_async",
    "ppe": "ProcessPoolExecutor",
    "joblib": "joblib (loky)",
    "local": "mpipe, local backend",
    "dask-localcluster": "mpipe, Dask (LocalCluster per run)",
    "dask-address": "mpipe, Dask (long-lived cluster)",
}


@dataclass(frozen=True)
class Job:
    """The notes workload at one setting."""

    tasks: int
    repeat: int
    workers: int
    fsync: bool


@dataclass
class Env:
    bench: BenchDir
    cores: int
    python: str
    env: dict[str, str]
    io_slots: int | None = None
    counter: int = 0

    def log(self, name: str) -> Path:
        self.counter += 1
        return self.bench.logs / f"{self.counter:04d}-{name}.log"


Runner = Callable[[], measure.Sample]


def subprocess_env(bench: BenchDir, *, bytecode_cache: bool) -> dict[str, str]:
    """The environment of every timed process.

    With ``bytecode_cache``, compiled modules are cached under the bench
    directory (``PYTHONPYCACHEPREFIX``), as any normal install caches them;
    without it, nothing is written (``PYTHONDONTWRITEBYTECODE=1``, as this
    sandbox sets it), so each process compiles mpipe afresh, provided that
    no bytecode of mpipe lies in its source tree (:func:`forget_source_bytecode`).
    """
    env = dict(os.environ)
    # Validated configs are remembered here, not in the user's cache.
    env["MPIPE_CACHE_DIR"] = str(bench.root / "mpipe-cache")
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(bench.root / "pycache")
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def forget_source_bytecode() -> int:
    """Remove the bytecode cached beside mpipe's own sources; return how many directories.

    An editable install is never byte-compiled, but any process run without
    ``PYTHONDONTWRITEBYTECODE`` leaves ``__pycache__`` directories beside the
    sources, which the "no bytecode cache" runs would then read (run 10's row
    did).  The harness itself writes none (``sys.dont_write_bytecode``).
    """
    package = Path(__file__).resolve().parent.parent
    if not (package.parent / "pyproject.toml").is_file():
        return 0  # an installed mpipe: its bytecode is the install's, left alone
    caches = [p for p in package.rglob("__pycache__") if p.is_dir()]
    for cache in caches:
        shutil.rmtree(cache, ignore_errors=True)
    return len(caches)


def mpipe_runner(e: Env, job: Job, *, label: str = "mpipe",
                 memory_interval_s: float | None = None, backend: str | None = None) -> Runner:
    """``mpipe run`` on the notes workload; ``backend``: the YAML's ``backend:`` value."""
    cfg = workload.notes_config(
        e.bench, f"notes-T{job.tasks}-R{job.repeat}-W{job.workers}-"
        f"{'fsync' if job.fsync else 'nofsync'}{'-' + label if backend else ''}",
        tasks=job.tasks, repeat=job.repeat, workers=job.workers, cpu_slots=e.cores,
        io_slots=e.io_slots, fsync=job.fsync, backend=backend)
    cmd = [e.python, "-m", "mpipe", "run", str(cfg), "--fresh", "--quiet"]

    def run() -> measure.Sample:
        sample = measure.run_timed(cmd, cores=e.cores, log=e.log(label), env=e.env,
                                   memory_interval_s=memory_interval_s)
        sample.extra["total"] = workload.read_mpipe_total(e.bench)
        sample.extra.update(_mpipe_report(e.bench, "bench-notes"))
        return sample

    return run


def _mpipe_report(bench: BenchDir, pipeline: str) -> dict[str, float]:
    """mpipe's own view of the run: its start-up and in-pipeline wall time."""
    path = bench.work / ".mpipe" / pipeline / "last-run.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {"mpipe_wall_s": float(doc.get("wall_s", 0.0)),
            "mpipe_startup_s": float(doc.get("startup_s", 0.0))}


def _peer_cmd(e: Env, runner: str, job: Job, result: Path, share: str = "0/1") -> list[str]:
    cmd = [e.python, str(PEERS_SCRIPT), runner, "--workdir", str(e.bench.work),
           "--tasks", str(job.tasks), "--repeat", str(job.repeat),
           "--workers", str(job.workers), "--share", share, "--result", str(result)]
    return [*cmd, "--fsync"] if job.fsync else cmd


def _read_totals(paths: list[Path]) -> list[float] | None:
    total: list[float] | None = None
    for path in paths:
        try:
            vector = json.loads(path.read_text())["total"]
        except (OSError, ValueError, KeyError):
            return None
        total = vector if total is None else [a + b for a, b in zip(total, vector, strict=True)]
    return total


def peer_runner(e: Env, name: str, job: Job) -> Runner:
    """``serial``, ``pool``, ``ppe`` or ``joblib`` from :mod:`mpipe.bench.peers`."""
    result = e.bench.scratch / f"{name}.json"

    def run() -> measure.Sample:
        result.unlink(missing_ok=True)
        sample = measure.run_timed(_peer_cmd(e, name, job, result), cores=e.cores,
                                   log=e.log(name), env=e.env)
        sample.extra["total"] = _read_totals([result])
        return sample

    return run


def floor_runner(e: Env, job: Job, *, keep_freed_mb: int = 0) -> Runner:
    """min(W, cores) plain serial loops over disjoint shares, started together;
    with ``keep_freed_mb``, each with glibc's malloc set as mpipe's workers set it."""
    k = max(1, min(job.workers, e.cores, job.tasks))
    name = "floor-kept" if keep_freed_mb else "floor"
    results = [e.bench.scratch / f"{name}-{i}.json" for i in range(k)]
    extra = ["--keep-freed-mb", str(keep_freed_mb)] if keep_freed_mb else []

    def run() -> measure.Sample:
        for r in results:
            r.unlink(missing_ok=True)
        cmds = [[*_peer_cmd(e, "serial", job, results[i], share=f"{i}/{k}"), *extra]
                for i in range(k)]
        sample = measure.run_group(cmds, cores=e.cores, env=e.env,
                                   logs=[e.log(f"{name}{i}") for i in range(k)])
        sample.extra["total"] = _read_totals(results)
        sample.extra["processes"] = k
        return sample

    return run


def trivial_runner(e: Env, *, items: int, workers: int | str, fsync: bool,
                   label: str) -> Runner:
    cfg = workload.trivial_config(e.bench, f"trivial-{items}-{'fsync' if fsync else 'nofsync'}",
                                  items=items, workers=workers, fsync=fsync)
    cmd = [e.python, "-m", "mpipe", "run", str(cfg), "--fresh", "--quiet"]

    def run() -> measure.Sample:
        sample = measure.run_timed(cmd, cores=e.cores, log=e.log(label), env=e.env)
        sample.extra.update(_mpipe_report(e.bench, "bench-trivial"))
        return sample

    return run


def command_runner(e: Env, cmd: list[str], label: str) -> Runner:
    """Any command (a bare interpreter start, for reference)."""

    def run() -> measure.Sample:
        return measure.run_timed(cmd, cores=e.cores, log=e.log(label), env=e.env)

    return run


def python_executable() -> str:
    return sys.executable
