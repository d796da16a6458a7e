"""Where a run's time went, and which YAML value to change.

Plain functions over the run report (the dict :func:`mpipe.report.build`
makes, or the same document read back from JSON), so that ``mpipe run``,
``mpipe report`` and the tests all reach the same verdict from the same numbers.

The runner accounts, per stage (see :class:`mpipe.pool.StageStats`):

* ``busy_s``: worker-seconds spent on items, of which ``io_s`` inside
  ``ctx.io()`` (waiting for an io slot included) or committing a
  ``ctx.output_dir`` (``output_commit_s``: fsync if on, rename), counted once
  where they overlap, and ``cpu_wait_s`` waiting for a cpu slot; the rest is
  compute;
* ``starved_s``: worker-seconds idle because the stage's input queue was empty;
* ``blocked_s``: seconds during which the stage had input and idle workers but
  no room downstream for another result.

Every share below is of the *work window*, from the first item's start to the
last item's end (from the stages' timelines): the seconds before it (processes
starting, importing their modules) and after it (commit, shutdown) are the same
whatever the worker counts, and in a short run they would drown the shares.
Starved time is counted by the runner from the end of its start-up, so the
part of it before the first item (every worker idle then) is taken off.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from mpipe.cores import usable_cores

logger = logging.getLogger(__name__)

# A stage busier than this is doing real work; under it, nobody is the limit.
BUSY_ENOUGH_PCT = 50.0
# Blocked this share of the window: the limit is downstream of the stage.
BLOCKED_PCT = 20.0
# Waiting for input this share of its worker-time: the limit is upstream.
STARVED_PCT = 50.0
# IO this share of busy time: storage, not compute, sets the pace.
IO_BOUND_PCT = 50.0
# Waiting for a cpu slot this share of busy time: the cores are saturated.
CPU_WAIT_PCT = 25.0
# Of an IO-bound stage's IO, this share committing ctx.output_dir's files
# (fsync, rename): a wait for the disk's commits, which other workers can
# overlap with compute.  Up to 3 workers per core paid on the notes' workload
# (docs/BENCHMARKS.md, "Durable outputs").
OUTPUT_COMMIT_PCT = 50.0
WORKERS_PER_CPU_SLOT_FOR_COMMITS = 3
# Where a Dask stage's threads are set (docs/DISTRIBUTED.md).
DASK_THREADS = ("backend.dask.threads_per_worker for a LocalCluster mpipe starts, "
                "dask worker --nthreads for your own")


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


def run_s(report: dict[str, Any]) -> float:
    """The run after start-up: what the runner's loop accounted."""
    return max(float(report.get("wall_s", 0.0)) - float(report.get("startup_s", 0.0)), 1e-6)


def windows(report: dict[str, Any]) -> dict[str, float]:
    """``run_s``; ``work_s``, the work window; ``boot_s`` and ``tail_s``, before and after it."""
    run = run_s(report)
    span = timeline_span(report)
    if span is None or span[1] <= span[0] or "started_at_unix" not in report:
        return {"run_s": run, "work_s": run, "boot_s": 0.0, "tail_s": 0.0}
    loop_start = float(report.get("loop_started_at") or (
        float(report["started_at_unix"]) + float(report.get("prepare_s", 0.0))
        + float(report.get("startup_s", 0.0))))
    work = min(span[1] - span[0], run)
    boot = min(max(span[0] - loop_start, 0.0), run - work)
    return {"run_s": run, "work_s": work, "boot_s": boot, "tail_s": max(run - work - boot, 0.0)}


def cores(report: dict[str, Any]) -> int:
    return int(report.get("cores") or usable_cores())


def timeline_span(report: dict[str, Any]) -> tuple[float, float] | None:
    """(first item start, last item end), wall clock, over every stage."""
    starts, ends = [], []
    for stage in report.get("stages", {}).values():
        for entry in stage.get("timeline", []):
            starts.append(float(entry[2]))
            ends.append(float(entry[2]) + float(entry[3]))
    if not starts:
        return None
    return min(starts), max(ends)


def stage_metrics(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per stage: counts, and each kind of time in seconds and as a share."""
    w = windows(report)
    window, boot = w["work_s"], w["boot_s"]
    out: dict[str, dict[str, Any]] = {}
    for name, s in report.get("stages", {}).items():
        workers = int(s.get("workers") or 1)
        capacity = workers * window
        busy = float(s.get("busy_s", 0.0))
        io = min(float(s.get("io_s", 0.0)), busy)
        commit = min(float(s.get("output_commit_s", 0.0)), io)
        cpu_wait = min(float(s.get("cpu_wait_s", 0.0)), busy - io)
        compute = max(busy - io - cpu_wait, 0.0)
        starved = max(float(s.get("starved_s", 0.0)) - workers * boot, 0.0)
        blocked = float(s.get("blocked_s", 0.0))
        out[name] = {
            "workers": workers,
            "io_slots": int(s.get("io_slots") or workers),
            "backend": str(s.get("backend") or "local"),
            "dask_threads": int(s.get("dask_threads") or 0),
            "items": int(s.get("done", 0)),
            "failed": int(s.get("failed", 0)),
            "retries": int(s.get("retries", 0)),
            "deaths": int(s.get("deaths", 0)),
            "timeouts": int(s.get("timeouts", 0)),
            "busy_s": round(busy, 4),
            "io_s": round(io, 4),
            "output_commit_s": round(commit, 4),
            "compute_s": round(compute, 4),
            "cpu_wait_s": round(cpu_wait, 4),
            "starved_s": round(starved, 4),
            "blocked_s": round(blocked, 4),
            "busy_pct": round(min(_pct(busy, capacity), 100.0), 1),
            "starved_pct": round(min(_pct(starved, capacity), 100.0), 1),
            "blocked_pct": round(min(_pct(blocked, window), 100.0), 1),
            "io_pct_of_busy": round(_pct(io, busy), 1),
            "output_commit_pct_of_io": round(_pct(commit, io), 1),
            "cpu_wait_pct_of_busy": round(_pct(cpu_wait, busy), 1),
            "items_per_s": round(int(s.get("done", 0)) / window, 3),
            # Seconds the input queue sat at its bound, when the runner reports them.
            "queue_full_pct": (round(min(_pct(float(s["queue_full_s"]), window), 100.0), 1)
                               if "queue_full_s" in s else None),
        }
    return out


def bottleneck(report: dict[str, Any],
               metrics: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Name what limited the run and what to try.

    Returns ``{"stage", "kind", "message", "advice", "notes"}``; ``stage`` is a
    stage name, ``"source"``, ``"writer"`` or None (nothing to say), ``kind``
    one of compute, cores, cpu_slots, io, writer, source, none.
    """
    m = stage_metrics(report) if metrics is None else metrics
    n_cores = cores(report)
    cpu_slots = int(report.get("cpu_slots") or n_cores)
    fsync = bool(report.get("fsync", True))  # older reports name none: the default
    notes = _notes(report, m)
    if not m or sum(s["items"] for s in m.values()) == 0:
        return {"stage": None, "kind": "none", "notes": notes,
                "message": "no item went through the stages: nothing to measure",
                "advice": ""}
    names = list(m)

    blocked = [n for n in names if m[n]["blocked_pct"] >= BLOCKED_PCT]
    if blocked:
        # The most downstream blocked stage points at what is really slow.
        held = blocked[-1]
        k = names.index(held)
        if k + 1 == len(names):
            return {
                "stage": "writer", "kind": "writer", "notes": notes,
                "message": f"{held} had input and idle workers but nowhere to put results "
                           f"{m[held]['blocked_pct']:.0f}% of the time: the consumer and writer "
                           "do not keep up",
                "advice": "raise writer.queue_size, make consumer.fn cheaper" + _or_no_fsync(fsync),
            }
        culprit = names[k + 1]
        verdict = _stage_verdict(culprit, m[culprit], n_cores, cpu_slots, fsync=fsync,
                                 others_busy=_others_busy(m, culprit))
        verdict["message"] = (f"{held} was blocked {m[held]['blocked_pct']:.0f}% of the time "
                              f"waiting for room in {culprit}'s queue; " + verdict["message"])
        verdict["notes"] = notes
        return verdict

    busiest = max(names, key=lambda n: m[n]["busy_pct"])
    if m[busiest]["busy_pct"] < BUSY_ENOUGH_PCT:
        first = names[0]
        if m[first]["starved_pct"] >= STARVED_PCT:
            return {
                "stage": "source", "kind": "source", "notes": notes,
                "message": f"every stage waited for input most of the run ({first} idle for "
                           f"lack of input {m[first]['starved_pct']:.0f}% of its worker-time; "
                           f"busiest stage {busiest} only {m[busiest]['busy_pct']:.0f}% busy): "
                           "the source, or start-up and drain in a short run, set the pace",
                "advice": "make source.fn faster (or raise source.queue_size if it produces "
                          "in bursts); to measure the stages, run more items",
            }
        return {"stage": None, "kind": "none", "notes": notes,
                "message": f"no stage was busy more than {BUSY_ENOUGH_PCT:.0f}% of the run "
                           f"(busiest: {busiest}, {m[busiest]['busy_pct']:.0f}%)",
                "advice": "run more items for a measurement"}
    verdict = _stage_verdict(busiest, m[busiest], n_cores, cpu_slots, fsync=fsync,
                             others_busy=_others_busy(m, busiest))
    verdict["notes"] = notes
    return verdict


def _stage_verdict(name: str, s: dict[str, Any], n_cores: int, cpu_slots: int, *,
                   fsync: bool, others_busy: int) -> dict[str, Any]:
    """``others_busy``: the other stages' workers busy on this machine's cores."""
    workers = s["workers"]
    if s.get("queue_full_pct") is not None:
        head = (f"{name} was {s['busy_pct']:.0f}% busy and its input queue was full "
                f"{s['queue_full_pct']:.0f}% of the time")
    else:
        head = (f"{name} was {s['busy_pct']:.0f}% busy and waited for input "
                f"{s['starved_pct']:.0f}% of its worker-time")
    if (fsync and s["io_pct_of_busy"] >= IO_BOUND_PCT
            and s.get("output_commit_pct_of_io", 0.0) >= OUTPUT_COMMIT_PCT):
        return _commit_verdict(name, s, head, cpu_slots, n_cores, others_busy=others_busy)
    if s["io_pct_of_busy"] >= IO_BOUND_PCT and s.get("backend") == "dask":
        return {
            "stage": name, "kind": "io",
            "message": f"{head}; IO is {s['io_pct_of_busy']:.0f}% of its busy time",
            "advice": (_more_dask_threads(name, workers)
                       + ", while their disks keep up, or use faster storage"),
        }
    if s["io_pct_of_busy"] >= IO_BOUND_PCT:
        return {
            "stage": name, "kind": "io",
            "message": f"{head}; IO is {s['io_pct_of_busy']:.0f}% of its busy time "
                       "(waiting for an io slot included)",
            "advice": (f"raise stages.{name}.io_slots (now {s['io_slots']} for {workers} "
                       "workers) if the disk has headroom, or use faster storage"
                       if s["io_slots"] < workers else
                       f"raise stages.{name}.workers (now {workers}) and its io_slots (now "
                       f"{s['io_slots']}) while the disk keeps up, or use faster storage; "
                       f"cores: {n_cores}"),
        }
    if s.get("backend") == "dask":
        # Its items run on the cluster's threads, not on this machine's cores
        # (and ctx.cpu() takes no slot there).
        return _dask_compute_verdict(name, s, head)
    if s["cpu_wait_pct_of_busy"] >= CPU_WAIT_PCT:
        return {
            "stage": name, "kind": "cpu_slots",
            "message": f"{head}; its workers waited for a cpu slot "
                       f"{s['cpu_wait_pct_of_busy']:.0f}% of their busy time",
            "advice": f"the cpu slots (cpu_slots: {cpu_slots}; cores: {n_cores}) are all in "
                      "use: more workers will not help; make the stage cheaper or run on "
                      "more cores" + (f", or raise cpu_slots toward {n_cores}"
                                      if cpu_slots < n_cores else ""),
        }
    # Extra workers pay while some of each item's time is IO they can overlap.
    overlap = s["io_pct_of_busy"] >= 20 and workers < 2 * n_cores
    if workers < n_cores or overlap:
        return {
            "stage": name, "kind": "compute",
            "message": head,
            "advice": f"raise stages.{name}.workers (now {workers}; cores: {n_cores})",
        }
    return {
        "stage": name, "kind": "cores",
        "message": f"{head}, with {workers} workers on {n_cores} cores",
        "advice": "the cores are the limit: more workers will not help; make the stage "
                  "faster or run on more cores",
    }


def _others_busy(m: dict[str, dict[str, Any]], name: str) -> int:
    """The other stages' workers on this machine, as many as were busy on average
    (all of them together, rounded up once).

    Dask stages are left out: their workers are the cluster's (a LocalCluster's
    share these cores too, but its threads are not mpipe's to count).
    """
    busy = sum(float(s["workers"]) * float(s["busy_pct"]) / 100.0
               for n, s in m.items() if n != name and s["backend"] == "local")
    return math.ceil(round(busy, 6))  # 1.0000000000000002 is one worker


def _commit_verdict(name: str, s: dict[str, Any], head: str, cpu_slots: int, n_cores: int,
                    *, others_busy: int) -> dict[str, Any]:
    """An IO-bound stage, fsync on, whose IO is mostly its ctx.output_dir commits.

    The target: WORKERS_PER_CPU_SLOT_FOR_COMMITS workers per cpu slot the cores
    can fill, the other stages' busy workers included.  On Dask neither
    cpu_slots nor io_slots applies: by default a stage has as many workers as
    the cluster has threads (DISTRIBUTED.md).
    """
    workers, io_slots = s["workers"], s["io_slots"]
    per_slot = WORKERS_PER_CPU_SLOT_FOR_COMMITS
    slots = min(cpu_slots, n_cores)
    enough = per_slot * slots
    unsafe = _or_no_fsync(True)
    plural = "s" if slots > 1 else ""
    others = f", less {others_busy} busy elsewhere in the pipeline" if others_busy else ""
    if s.get("backend") == "dask":
        advice = (_more_dask_threads(name, workers, " than cores")
                  + f": tasks waiting on the disk leave their threads idle{unsafe}")
    elif workers + others_busy < enough:
        io_with = (f", and its io_slots (now {io_slots}) with them if the commits are inside "
                   "ctx.io()" if io_slots < workers else ", and its io_slots as high if you "
                   "set it")
        advice = (f"raise stages.{name}.workers (now {workers}) toward {enough - others_busy}"
                  f" ({per_slot} x {slots} cpu slot{plural} = {enough} workers{others})"
                  f"{io_with}: while some workers wait on the disk, others compute{unsafe}")
    else:
        full = (f"with {others_busy} worker{'s' if others_busy > 1 else ''} busy elsewhere, "
                f"the pipeline has {per_slot} busy workers per cpu slot already"
                if workers < enough else "")
        if slots < n_cores:
            first = (f"raise cpu_slots (now {cpu_slots}) toward the cores ({n_cores}), and the "
                     f"workers with it ({per_slot} per cpu slot)")
        else:
            first = "the disk's commits are the limit: use faster storage"
        # Before the disk's limit it is an alternative; before cpu_slots, a first step.
        io_first = (f"raise stages.{name}.io_slots (now {io_slots}) to its {workers} workers "
                    f"if the commits are inside ctx.io(); {'then' if slots < n_cores else 'else'} "
                    if io_slots < workers else "")
        advice = (f"{full}; " if full else "") + io_first + first + unsafe
    return {
        "stage": name, "kind": "io",
        "message": f"{head}; IO is {s['io_pct_of_busy']:.0f}% of its busy time, "
                   f"{s['output_commit_pct_of_io']:.0f}% of that fsyncing its "
                   "ctx.output_dir files and moving them into place",
        "advice": advice,
    }


def _dask_compute_verdict(name: str, s: dict[str, Any], head: str) -> dict[str, Any]:
    """A Dask stage that is not IO-bound: are its items in flight fewer than the
    cluster's threads (0: a report from before mpipe recorded them)?"""
    workers, threads = s["workers"], s.get("dask_threads", 0)
    if threads and workers < threads:
        return {
            "stage": name, "kind": "compute",
            "message": f"{head}, with {workers} items in flight on the Dask cluster's "
                       f"{threads} threads",
            "advice": f"raise stages.{name}.workers (now {workers}) toward the cluster's "
                      f"{threads} threads (or set it to auto)",
        }
    where = f"the Dask cluster's {threads} threads" if threads else "the Dask cluster's threads"
    return {
        "stage": name, "kind": "cores",
        "message": f"{head}, with {workers} items in flight on {where}",
        "advice": f"{where} are the limit: add Dask workers (machines or threads) and raise "
                  f"stages.{name}.workers to match, or make the stage faster",
    }


def _more_dask_threads(name: str, workers: int, than: str = "") -> str:
    return (f"give the Dask workers more threads{than} ({DASK_THREADS}) and raise "
            f"stages.{name}.workers (now {workers}) to match")


def _or_no_fsync(fsync: bool) -> str:
    """The last resort against waiting for the disk, where there is one to offer."""
    return "; or set fsync: false if a crash may cost the last few items" if fsync else ""


def _notes(report: dict[str, Any], m: dict[str, dict[str, Any]]) -> list[str]:
    notes: list[str] = []
    names = list(m)
    if m:
        busiest = max(names, key=lambda n: m[n]["busy_pct"])
        b = names.index(busiest)
        for k, name in enumerate(names):
            s = m[name]
            if k > b and s["starved_pct"] >= STARVED_PCT:
                notes.append(f"{name} waited for input {s['starved_pct']:.0f}% of its "
                             f"worker-time: it is limited upstream ({busiest})")
            if s["deaths"] or s["timeouts"]:
                notes.append(f"{name}: {s['deaths']} worker death(s), {s['timeouts']} "
                             "timeout(s): see the failures")
    w = windows(report)
    if w["work_s"] < 0.8 * w["run_s"]:
        notes.append(f"items were in work for {w['work_s']:.1f}s of {w['run_s']:.1f}s "
                     f"({w['boot_s']:.1f}s before the first one started: processes starting "
                     f"and importing; {w['tail_s']:.1f}s after the last one: commit and "
                     "shutdown); the shares above are of those "
                     f"{w['work_s']:.1f}s")
    return notes


def analyse(report: dict[str, Any]) -> dict[str, Any]:
    """The analysis block of the JSON report."""
    metrics = stage_metrics(report)
    return {
        **{k: round(v, 4) for k, v in windows(report).items()},
        "cores": cores(report),
        "stages": metrics,
        "bottleneck": bottleneck(report, metrics),
    }
