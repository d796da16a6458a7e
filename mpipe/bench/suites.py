"""The measurements of issue 4, one function per suite; each returns a JSON-able dict.

* ``compute``: T=10, R=1 at each worker count, mpipe against the floor and peers;
* ``io``: T=40, R=0, W=2, against the IO floor and peers;
* ``durable``: the same with every output fsynced, against the disk's own time;
* ``overhead``: an empty pipeline's start-up and tear-down, the per-item cost
  of three trivial stages, and the process tree's peak memory at T=200 vs T=10;
* ``tail``: the notes' 4-vs-5-vs-10 puzzle on this machine's cores (T=5, R=1);
* ``dask``: issue 6's overhead: the same run on the Dask backend against the
  local one (T=10, R=1, W=2), with a LocalCluster started by each run and with
  a long-lived cluster.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mpipe.bench import pairs, runners
from mpipe.bench.measure import Sample
from mpipe.bench.runners import AT_CORES, WIDE, WIDE_FACTOR, WIDE_NOFSYNC, Env, Job, Runner
from mpipe.config import DEFAULT_KEEP_FREED_MB
from mpipe.workloads import notes

logger = logging.getLogger(__name__)

SUITES = ("compute", "io", "durable", "overhead", "tail", "dask")
PEERS = ("pool", "ppe", "joblib")


@dataclass
class Plan:
    """What to measure (the CLI's flags, resolved)."""

    pairs: int
    workers: list[int]
    compute_tasks: int
    compute_repeat: int
    io_tasks: int
    io_workers: int
    items: int
    trivial_workers: int
    memory_tasks: tuple[int, int]
    memory_pairs: int
    tail_tasks: int
    tail_workers: list[int]
    dask_workers: int
    disk_probe_mb: int
    peers: tuple[str, ...]
    # Reference runs beside the required ones (skipped by --quick to stay short).
    extras: bool = True


Progress = Callable[[str, Sample], None]


def _agree(rounds: pairs.Rounds) -> dict[str, bool]:
    """Did every runner produce the subject's total (rtol 1e-6)?"""
    ref = _first_total(rounds, rounds.subject)
    out: dict[str, bool] = {}
    for name in rounds.samples:
        total = _first_total(rounds, name)
        out[name] = (ref is not None and total is not None
                     and bool(np.allclose(total, ref, rtol=1e-6, atol=0)))
    return out


def _first_total(rounds: pairs.Rounds, name: str) -> list[float] | None:
    for s in rounds.samples.get(name, []):
        total = s.extra.get("total")
        if total is not None:
            return list(total)
    return None


def _run(e: Env, subject: tuple[str, Runner], others: list[tuple[str, Runner]], n: int,
         progress: Progress, label: str) -> pairs.Rounds:
    def on_sample(name: str, sample: Sample) -> None:
        progress(f"{label} {name}", sample)

    return pairs.interleave(subject, others, n, before_each=e.bench.clear_outputs,
                            on_sample=on_sample)


def compute(e: Env, plan: Plan, progress: Progress) -> dict[str, Any]:
    t, r = plan.compute_tasks, plan.compute_repeat
    e.bench.ensure_inputs(t)
    e.bench.warm_inputs(t)
    configs = []
    for w in plan.workers:
        job = Job(t, r, w, fsync=False)
        others = [("floor", runners.floor_runner(e, job))]
        if w > e.cores:
            others.append((AT_CORES, runners.mpipe_runner(e, replace(job, workers=e.cores),
                                                          label=AT_CORES)))
        if plan.extras:
            others.append(("floor-kept", _floor_kept(e, job)))
        others += [(p, runners.peer_runner(e, p, job)) for p in plan.peers]
        rounds = _run(e, ("mpipe", runners.mpipe_runner(e, job)), others, plan.pairs,
                      progress, f"compute W={w}")
        configs.append({"workers": w, "floor_processes": min(w, e.cores, t),
                        "agree": _agree(rounds), **rounds.as_json()})
    return {"tasks": t, "repeat": r, "fsync": False, "configs": configs}


def io(e: Env, plan: Plan, progress: Progress) -> dict[str, Any]:
    job = Job(plan.io_tasks, 0, plan.io_workers, fsync=False)
    e.bench.ensure_inputs(job.tasks)
    e.bench.warm_inputs(job.tasks)
    others = [("floor", runners.floor_runner(e, job)),
              ("serial", runners.peer_runner(e, "serial", job))]
    if plan.extras:
        others.append(("floor-kept", _floor_kept(e, job)))
    others += [(p, runners.peer_runner(e, p, job)) for p in plan.peers]
    rounds = _run(e, ("mpipe", runners.mpipe_runner(e, job)), others, plan.pairs, progress,
                  "io")
    return {"tasks": job.tasks, "repeat": 0, "workers": job.workers, "fsync": False,
            "agree": _agree(rounds), **rounds.as_json()}


def _floor_kept(e: Env, job: Job) -> Runner:
    """The floor with glibc's malloc set as mpipe's stage workers set it by default
    (mpipe.allocator): what part of mpipe's lead on the floor is those settings."""
    return runners.floor_runner(e, job, keep_freed_mb=DEFAULT_KEEP_FREED_MB)


def durable(e: Env, plan: Plan, progress: Progress) -> dict[str, Any]:
    job = Job(plan.io_tasks, 0, plan.io_workers, fsync=True)
    e.bench.ensure_inputs(job.tasks)
    e.bench.warm_inputs(job.tasks)
    probes = [disk_write_rate(e, plan.disk_probe_mb) for _ in range(3)]
    rate = statistics.median(probes)
    written = job.tasks * notes.CHANNELS * _npy_size()
    others = [("mpipe (no fsync)", runners.mpipe_runner(e, Job(job.tasks, 0, job.workers, False),
                                                        label="mpipe-nofsync")),
              ("floor", runners.floor_runner(e, job))]
    wide = replace(job, workers=WIDE_FACTOR * e.cores)
    if plan.extras:
        # The reference point: a serial loop fsyncing every file.
        others.append(("serial", runners.peer_runner(e, "serial", job)))
    if plan.extras and wide.workers > job.workers:
        # mpipe as its advice runs it when fsync waits are most of the IO:
        # more workers than cpu slots, so that some compute while others
        # wait; io_slots as many as workers, whatever --io-slots says.
        e_wide = replace(e, io_slots=None)
        others += [(WIDE, runners.mpipe_runner(e_wide, wide, label=WIDE)),
                   (WIDE_NOFSYNC, runners.mpipe_runner(e_wide, replace(wide, fsync=False),
                                                       label=WIDE_NOFSYNC))]
    others += [(p, runners.peer_runner(e, p, job)) for p in plan.peers]
    rounds = _run(e, ("mpipe", runners.mpipe_runner(e, job)), others, plan.pairs, progress,
                  "durable")
    disk_s = written / rate
    doc = {"tasks": job.tasks, "repeat": 0, "workers": job.workers, "fsync": True,
           "bytes_written": written, "disk_write_mb_s": [round(p / 1e6, 1) for p in probes],
           "disk_time_s": round(disk_s, 3),
           "ratio_to_disk_time": round(rounds.median_wall("mpipe") / disk_s, 4),
           "agree": _agree(rounds), **rounds.as_json()}
    if WIDE in rounds.samples:
        doc["wide"] = wide_summary(rounds, wide.workers, disk_s)
    return doc


def wide_summary(rounds: pairs.Rounds, workers: int, disk_s: float) -> dict[str, Any]:
    """The durable suite's mpipe at 3 workers per core, its ratios taken round by round."""
    def median_ratio(a: str, b: str) -> float:
        return round(statistics.median(rounds.ratios(b, of=a)), 4)

    return {"workers": workers, "io_slots": workers,
            "ratio_to_disk_time": round(rounds.median_wall(WIDE) / disk_s, 4),
            "over_subject": median_ratio(WIDE, "mpipe"),
            "over_subject_nofsync": median_ratio(WIDE, "mpipe (no fsync)"),
            "price_of_fsync": median_ratio(WIDE, WIDE_NOFSYNC)}


def _npy_size() -> int:
    # A version 1.0 .npy header pads to 128 bytes for a 1-d float32 array.
    return 128 + notes.SAMPLES * 4


def disk_write_rate(e: Env, megabytes: int) -> float:
    """Bytes/s of one sequential write of ``megabytes``, fdatasync'd, like the issue's figure."""
    path = e.bench.scratch / "disk-probe.bin"
    chunk = os.urandom(1 << 20) * 8
    e.bench.clear_outputs()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(max(1, megabytes // 8)):
            os.write(fd, chunk)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    size = path.stat().st_size
    path.unlink()
    return size / dt


def overhead(e: Env, plan: Plan, progress: Progress, *, env_no_cache: Env) -> dict[str, Any]:
    n_empty = max(plan.pairs, 5) if plan.pairs > 1 else 1
    empty = Job(0, 0, 2, fsync=True)
    others = [("python + numpy", runners.peer_runner(e, "serial", empty))]
    if plan.extras:
        # The same run validating its config, as the first run of an input
        # does (mpipe.validated); the subject runs a remembered input.
        validating = replace(e, env={**e.env, "MPIPE_NO_CONFIG_CACHE": "1"})
        others += [("mpipe (no bytecode cache)", runners.mpipe_runner(env_no_cache, empty,
                                                                      label="mpipe-nocache")),
                   ("mpipe (config validated)", runners.mpipe_runner(validating, empty,
                                                                     label="mpipe-validating")),
                   ("pool", runners.peer_runner(e, "pool", empty)),
                   ("python", runners.command_runner(e, [e.python, "-c", "pass"], "python"))]
    start = _run(e, ("mpipe", runners.mpipe_runner(e, empty, label="mpipe-empty")), others,
                 n_empty, progress, "empty")

    fsync_name = f"{plan.items} items, fsync"
    trivial_others = [("0 items", runners.trivial_runner(
        e, items=0, workers=plan.trivial_workers, fsync=False, label="trivial0"))]
    if plan.extras:
        trivial_others.append((fsync_name, runners.trivial_runner(
            e, items=plan.items, workers=plan.trivial_workers, fsync=True,
            label="trivial-fsync")))
    trivial = _run(
        e, (f"{plan.items} items", runners.trivial_runner(
            e, items=plan.items, workers=plan.trivial_workers, fsync=False, label="trivial")),
        trivial_others, plan.pairs, progress, "per-item")

    def per_item(name: str) -> list[float]:
        return [(a.wall_s - b.wall_s) / plan.items for a, b in zip(
            trivial.samples[name], trivial.samples["0 items"], strict=False)]

    per_item_plain = per_item(trivial.subject)
    per_item_fsync = per_item(fsync_name) if fsync_name in trivial.samples else []

    big, small = plan.memory_tasks
    e.bench.ensure_linked_inputs(big, distinct=min(big, plan.io_tasks))
    e.bench.warm_inputs(min(big, plan.io_tasks))
    mem = _run(e, (f"T={big}", runners.mpipe_runner(e, Job(big, 0, 2, False),
                                                     label=f"mem{big}", memory_interval_s=0.02)),
               [(f"T={small}", runners.mpipe_runner(e, Job(small, 0, 2, False),
                                                     label=f"mem{small}",
                                                     memory_interval_s=0.02))],
               plan.memory_pairs, progress, "memory")
    peaks_big = [s.peak_rss_bytes or 0 for s in mem.samples[f"T={big}"]]
    peaks_small = [s.peak_rss_bytes or 0 for s in mem.samples[f"T={small}"]]
    ratios = [a / b for a, b in zip(peaks_big, peaks_small, strict=False) if b]
    per_proc = {name: statistics.median(s.sum_process_peaks_bytes or 0 for s in mem.samples[name])
                for name in (f"T={big}", f"T={small}")}
    pss_big = [s.peak_pss_bytes for s in mem.samples[f"T={big}"]]
    pss_small = [s.peak_pss_bytes for s in mem.samples[f"T={small}"]]
    # Every pair or none: a ratio of some pairs would read as the whole run's.
    pss_ratios = [a / b for a, b in zip(pss_big, pss_small, strict=True) if a and b]
    if len(pss_ratios) < len(pss_big):
        pss_ratios = []
    return {
        "empty": {"tasks": 0, "workers": 2, **start.as_json()},
        "per_item": {"items": plan.items, "stages": 3, "workers_per_stage": plan.trivial_workers,
                     "per_item_ms": [round(1000 * v, 4) for v in per_item_plain],
                     "median_per_item_ms": round(1000 * statistics.median(per_item_plain), 4),
                     "median_per_item_fsync_ms": (
                         round(1000 * statistics.median(per_item_fsync), 4)
                         if per_item_fsync else None),
                     **trivial.as_json()},
        "memory": {"tasks": [big, small], "repeat": 0, "workers": 2,
                   "peak_rss_bytes": {f"T={big}": peaks_big, f"T={small}": peaks_small},
                   "median_peak_rss_bytes": {f"T={big}": int(statistics.median(peaks_big)),
                                             f"T={small}": int(statistics.median(peaks_small))},
                   "ratios": [round(r, 4) for r in ratios],
                   "median_ratio": round(statistics.median(ratios), 4) if ratios else None,
                   "median_sum_process_peaks_bytes": {k: int(v) for k, v in per_proc.items()},
                   "sum_process_peaks_ratio": (round(per_proc[f"T={big}"] / per_proc[f"T={small}"],
                                                     4) if per_proc[f"T={small}"] else None),
                   "median_peak_pss_bytes": {f"T={big}": _median_or_none(pss_big),
                                             f"T={small}": _median_or_none(pss_small)},
                   "pss_ratios": [round(r, 4) for r in pss_ratios],
                   "median_pss_ratio": (round(statistics.median(pss_ratios), 4)
                                        if pss_ratios else None),
                   **mem.as_json()},
    }


def _median_or_none(values: list[int | None]) -> int | None:
    """The median, or None if a value is missing (PSS not readable)."""
    present = [v for v in values if v is not None]
    return int(statistics.median(present)) if present and len(present) == len(values) else None


def tail(e: Env, plan: Plan, progress: Progress) -> dict[str, Any]:
    """Fewer tasks than a multiple of the cores: where the notes' W=4 lost to W=5."""
    t = plan.tail_tasks
    e.bench.ensure_inputs(t)
    e.bench.warm_inputs(t)
    configs = []
    for w in plan.tail_workers:
        job = Job(t, plan.compute_repeat, w, fsync=False)
        others = [("floor", runners.floor_runner(e, job)),
                  ("pool", runners.peer_runner(e, "pool", job))]
        rounds = _run(e, ("mpipe", runners.mpipe_runner(e, job)), others, plan.pairs, progress,
                      f"tail W={w}")
        configs.append({"workers": w, "agree": _agree(rounds), **rounds.as_json()})
    return {"tasks": t, "repeat": plan.compute_repeat, "fsync": False, "configs": configs}


def dask(e: Env, plan: Plan, progress: Progress) -> dict[str, Any]:
    """Issue 6: the Dask backend's whole run against the local backend's, same workload.

    Two Dask set-ups: ``local_workers: W`` (each run starts and stops its own
    LocalCluster, whose start-up is timed) and ``address:`` of a long-lived
    cluster of W single-thread workers started here, untimed, before the rounds
    (what a cluster that outlives the run amortises).  Ratios are Dask / local,
    pair by pair.
    """
    from mpipe.bench.dask_cluster import LongLivedCluster

    t, r, w = plan.compute_tasks, plan.compute_repeat, plan.dask_workers
    e.bench.ensure_inputs(t)
    e.bench.warm_inputs(t)
    job = Job(t, r, w, fsync=False)
    scratch = e.bench.scratch / "dask"
    scratch.mkdir(parents=True, exist_ok=True)
    cluster = LongLivedCluster(w, scratch)
    try:
        local_cluster = f"{{dask: {{local_workers: {w}}}}}"
        long_lived = f"{{dask: {{address: '{cluster.address}'}}}}"
        others = [
            ("dask-localcluster", runners.mpipe_runner(e, job, label="dask-localcluster",
                                                       backend=local_cluster)),
            ("dask-address", runners.mpipe_runner(e, job, label="dask-address",
                                                  backend=long_lived)),
        ]
        # Untimed: the long-lived workers' first task imports numpy and mpipe.
        e.bench.clear_outputs()
        others[1][1]()
        rounds = _run(e, ("local", runners.mpipe_runner(e, job, label="mpipe")), others,
                      plan.pairs, progress, f"dask W={w}")
    finally:
        cluster.stop()
    over_local = {}
    for name, _ in others:
        ratios = [1 / x for x in rounds.ratios(name)]
        over_local[name] = {"ratios": [round(x, 4) for x in ratios],
                            "median_ratio": round(statistics.median(ratios), 4)}
    return {"tasks": t, "repeat": r, "workers": w, "fsync": False, "over_local": over_local,
            "agree": _agree(rounds), **rounds.as_json()}
