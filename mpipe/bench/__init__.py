"""``mpipe bench``: the notes' table for this machine (see docs/BENCHMARKS.md).

The package, one concern per module:

* :mod:`~mpipe.bench.workload`: the bench workdir, inputs made once, configs;
* :mod:`~mpipe.bench.peers`: the compared approaches, a plain script;
* :mod:`~mpipe.bench.trivial`: do-nothing stages for the per-item overhead;
* :mod:`~mpipe.bench.measure`: one whole run in a subprocess, timed;
* :mod:`~mpipe.bench.runners`: mpipe, the floor and each peer as timed runs;
* :mod:`~mpipe.bench.pairs`: interleaved rounds, medians, per-pair ratios;
* :mod:`~mpipe.bench.suites`: issue 4's measurements;
* :mod:`~mpipe.bench.report`: the tables, the targets, JSON and the plot.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_WORKERS = "1,2,4,5,10"


def _default_out() -> Path:
    repo = Path(__file__).resolve().parents[2]
    base = repo if (repo / "pyproject.toml").exists() else Path.cwd()
    return base / "bench-results"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _suite_list(text: str) -> list[str]:
    from mpipe.bench.suites import SUITES

    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in SUITES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown suite {bad or text!r}; choose from "
                                         f"{', '.join(SUITES)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``mpipe bench``."""
    parser.description = ("Time mpipe on the notes workload against the floor (independent "
                          "processes) and its peers, in interleaved pairs; print the notes' "
                          "table and write results.json and speedup.png.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: T=2, one pair, W in {1,2}, small IO/overhead runs")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="bench directory (inputs, logs, results.json, speedup.png); "
                        "default bench-results/ at the repo root")
    parser.add_argument("--pairs", type=int, default=None, metavar="N",
                        help="interleaved pairs per configuration (default 5; quick 1)")
    parser.add_argument("--workers", type=_int_list, default=None, metavar="LIST",
                        help=f"compute-bound worker counts (default {DEFAULT_WORKERS})")
    parser.add_argument("--only", type=_suite_list, default=None, metavar="LIST",
                        help="comma-separated suites: compute,io,durable,overhead,tail,dask "
                        "(default all)")
    parser.add_argument("--tasks", type=int, default=None, metavar="T",
                        help="tasks of the compute-bound runs (default 10; quick 2)")
    parser.add_argument("--repeat", type=int, default=None, metavar="R",
                        help="FFT round trips per file in the compute-bound runs "
                        "(default 1; quick 0)")
    parser.add_argument("--io-tasks", type=int, default=None, metavar="T",
                        help="tasks of the IO-bound runs (default 40; quick 4)")
    parser.add_argument("--io-workers", type=int, default=2, metavar="W",
                        help="workers of the IO-bound runs (default 2)")
    parser.add_argument("--io-slots", type=int, default=None, metavar="N",
                        help="mpipe's io_slots (default: every worker; cpu_slots is the cores)")
    parser.add_argument("--items", type=int, default=None, metavar="N",
                        help="items through the trivial 3-stage pipeline (default 10000)")
    parser.add_argument("--peers", default="pool,ppe,joblib", metavar="LIST",
                        help="compared peers among pool,ppe,joblib (default all three)")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="keep the inherited PYTHONDONTWRITEBYTECODE instead of caching "
                        "compiled modules under DIR/pycache")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                        help="run nothing: recompute the targets of an earlier run's "
                        "results.json and write its tables.md and speedup.png again")


def _plan(args: argparse.Namespace) -> Any:
    from mpipe.bench.suites import PEERS, Plan

    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise SystemExit(f"mpipe bench: unknown peer(s) {bad}; choose from {', '.join(PEERS)}")
    q = args.quick
    pairs = args.pairs if args.pairs is not None else (1 if q else 5)
    return Plan(
        pairs=max(1, pairs),
        workers=args.workers or ([1, 2] if q else _int_list(DEFAULT_WORKERS)),
        compute_tasks=args.tasks or (2 if q else 10),
        # The smoke run checks that everything runs, not how fast: R=0 keeps it short.
        compute_repeat=args.repeat if args.repeat is not None else (0 if q else 1),
        io_tasks=args.io_tasks or (2 if q else 40),
        io_workers=args.io_workers,
        items=args.items or (100 if q else 10_000),
        trivial_workers=2,
        memory_tasks=(2, 1) if q else (200, 10),
        memory_pairs=1 if q else min(max(1, pairs), 3),
        tail_tasks=3 if q else 5,
        tail_workers=[2, 3] if q else [2, 5],
        dask_workers=2,  # issue 6's setting
        disk_probe_mb=64 if q else 512,
        peers=peers,
        extras=not q,
    )


def machine_info(cores: int) -> dict[str, Any]:
    import numpy

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": cores, "nproc": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(), "numpy": numpy.__version__,
            "platform": platform.platform(), "loadavg_start": list(os.getloadavg())}


def sources_digest() -> str:
    """A digest of mpipe's own sources (not the harness): others edit them while a
    long benchmark runs, and a changed digest between suites says so."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "bench" not in path.relative_to(root).parts:
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from mpipe.bench import measure, report, runners, suites
    from mpipe.bench.workload import BenchDir
    from mpipe.cores import usable_cores

    # Wide enough for the tables when piped to a file (rich assumes 80 columns).
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    if args.render is not None:
        return _render(args.render, console)
    # SIGTERM (a CI timeout, `kill`) ends the bench through its `finally`
    # blocks, as Ctrl-C does: the timed run is killed and a long-lived Dask
    # cluster the harness started is stopped, not left running.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    plan = _plan(args)
    # The tail puzzle is an explanation, not a check: not part of the smoke run.
    only = args.only or [n for n in suites.SUITES if not (args.quick and n == "tail")]
    bench = BenchDir((args.out or _default_out()).resolve())
    bench.create()
    cores = usable_cores()  # as mpipe counts them: workers: auto, cpu_slots
    if not measure.become_subreaper():
        logger.warning("cannot become a child subreaper: CPU time of orphaned helpers "
                       "will be missed")
    env = runners.Env(bench=bench, cores=cores, python=runners.python_executable(),
                      env=runners.subprocess_env(bench, bytecode_cache=not args.no_bytecode_cache),
                      io_slots=args.io_slots)
    env_no_cache = replace(env, env=runners.subprocess_env(bench, bytecode_cache=False))
    # Nothing of mpipe's is cached beside its sources, or the no-cache runs would read it.
    sys.dont_write_bytecode = True
    runners.forget_source_bytecode()
    command = "mpipe bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"]
                                          else sys.argv[1:])
    doc: dict[str, Any] = {"command": command, "plan": vars(plan) | {"suites": only},
                           "machine": machine_info(cores), "suites": {}}
    started = time.monotonic()
    failures: list[str] = []

    def progress(label: str, sample: measure.Sample) -> None:
        mark = "" if sample.returncode == 0 else f"  [red]exit {sample.returncode}[/red]"
        if sample.returncode != 0:
            failures.append(label)
        console.print(f"  {label:<40} {sample.wall_s:8.3f} s  CPU {sample.cpu_pct:4.0f}%{mark}")

    _warm_up(env, plan)
    console.print(f"[bold]mpipe bench[/bold]: {', '.join(only)}; {plan.pairs} pair(s); "
                  f"{cores} cores; out {bench.root}")
    digests: dict[str, dict[str, str]] = {}
    doc["mpipe_sources"] = digests
    for name in only:
        console.print(f"[bold]{name}[/bold]")
        digests[name] = {"start": sources_digest()}
        if name == "overhead":
            doc["suites"][name] = suites.overhead(env, plan, progress, env_no_cache=env_no_cache)
        else:
            doc["suites"][name] = getattr(suites, name)(env, plan, progress)
        digests[name]["end"] = sources_digest()
        doc["elapsed_s"] = round(time.monotonic() - started, 1)
        report.write_json(doc, bench.root / "results.json")  # partial results survive a crash
    bench.clear_outputs()
    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    doc["targets"] = report.targets(doc)
    doc["failed_runs"] = failures
    disagree = _disagreements(doc)
    doc["totals_disagree"] = disagree
    report.write_json(doc, bench.root / "results.json")
    (bench.root / "tables.md").write_text(report.markdown(doc))
    plotted = report.plot(doc, bench.root / "speedup.png")
    report.print_tables(doc, console)
    console.print(f"results: {bench.root / 'results.json'}"
                  + (f"; plot: {bench.root / 'speedup.png'}" if plotted else "")
                  + f"; {doc['elapsed_s']:.0f} s")
    if failures or disagree:
        console.print(f"[red]failed runs: {failures}; totals that disagree: {disagree}[/red]")
        return 1
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _render(results: Path, console: Any) -> int:
    """The tables, targets and plot of an earlier run, from its measurements alone."""
    import json

    from mpipe.bench import report

    doc = json.loads(results.read_text())
    doc["targets"] = report.targets(doc)
    report.write_json(doc, results)
    (results.parent / "tables.md").write_text(report.markdown(doc))
    report.plot(doc, results.parent / "speedup.png")
    report.print_tables(doc, console)
    return 0


def _warm_up(env: Any, plan: Any) -> None:
    """Untimed: fill the bytecode cache and the page cache before the first timed run."""
    from mpipe.bench import runners
    from mpipe.bench.runners import Job

    env.bench.clear_outputs()
    for run in (runners.mpipe_runner(env, Job(0, 0, 1, False), label="warmup"),
                runners.peer_runner(env, "serial", Job(0, 0, 1, False))):
        run()


def _disagreements(doc: dict[str, Any]) -> list[str]:
    out = []
    for suite, s in doc["suites"].items():
        for entry in s.get("configs", [s]):
            for name, ok in entry.get("agree", {}).items():
                if not ok:
                    out.append(f"{suite} W={entry.get('workers')} {name}")
    return out
