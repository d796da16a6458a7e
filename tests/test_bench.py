"""``mpipe bench --quick``: the harness runs end to end and writes what it promises.

A smoke test of the harness, never a timing test: the numbers of a quick run on
a shared machine mean nothing, so only their presence and sign are checked.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import mpipe

RUNNERS = {"mpipe", "floor", "pool", "ppe", "joblib"}


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_bench_quick_writes_results_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = mpipe("bench", "--quick", "--out", out, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Issue 4 targets" in proc.stdout

    doc = json.loads((out / "results.json").read_text())
    assert {"command", "machine", "plan", "suites", "targets", "elapsed_s"} <= doc.keys()
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["python"]
    assert set(doc["suites"]) == {"compute", "io", "durable", "overhead", "dask"}
    assert not doc["failed_runs"] and not doc["totals_disagree"]

    compute = doc["suites"]["compute"]
    assert compute["tasks"] == 2 and [c["workers"] for c in compute["configs"]] == [1, 2]
    for cfg in compute["configs"]:
        assert set(cfg["summary"]) == RUNNERS
        for name, s in cfg["summary"].items():
            assert _positive(s["median_wall_s"]) and _positive(s["median_cpu_pct"]), name
            if name != "mpipe":
                assert _positive(s["median_ratio"]), name
        for runs in cfg["runs"].values():
            assert all(r["returncode"] == 0 and _positive(r["cpu_s"]) for r in runs)
        assert all(cfg["agree"].values())

    for key in ("io", "durable"):
        s = doc["suites"][key]
        assert {"mpipe", "floor", "pool", "ppe", "joblib"} <= s["summary"].keys()
        assert all(_positive(v["median_wall_s"]) for v in s["summary"].values())
    assert _positive(doc["suites"]["durable"]["disk_time_s"])
    assert "mpipe (no fsync)" in doc["suites"]["durable"]["summary"]

    overhead = doc["suites"]["overhead"]
    assert _positive(overhead["empty"]["summary"]["mpipe"]["median_wall_s"])
    assert math.isfinite(overhead["per_item"]["median_per_item_ms"])
    peaks = overhead["memory"]["median_peak_rss_bytes"]
    assert len(peaks) == 2 and all(_positive(v) for v in peaks.values())
    sums = overhead["memory"]["median_sum_process_peaks_bytes"]
    assert all(sums[k] >= peaks[k] for k in peaks)
    # Shared pages counted once; None where a quick run is too short for two reads.
    pss = overhead["memory"]["median_peak_pss_bytes"]
    assert pss.keys() == peaks.keys()
    assert all(pss[k] is None or 0 < pss[k] < peaks[k] for k in peaks), (pss, peaks)

    assert doc["targets"] and all({"target", "measured", "bound", "met"} <= t.keys()
                                  for t in doc["targets"])
    tables = (out / "tables.md").read_text()
    assert "| tasks | workers | wall s |" in tables
    (out / "tables.md").unlink()
    rendered = mpipe("bench", "--render", out / "results.json", timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    assert (out / "tables.md").read_text() == tables  # the same runs, the same tables
    png = out / "speedup.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Issue 6: the Dask backend (LocalCluster per run, long-lived cluster) vs local.
    dask = doc["suites"]["dask"]
    assert set(dask["summary"]) == {"local", "dask-localcluster", "dask-address"}
    assert all(dask["agree"].values())
    for name in ("dask-localcluster", "dask-address"):
        assert all(_positive(r) for r in dask["over_local"][name]["ratios"]), name
    dask_targets = [t for t in doc["targets"] if "Dask backend / local backend" in t["target"]]
    assert [_positive(t["measured"]) for t in dask_targets] == [True, True]


def test_the_memory_sampler_reads_a_tree_s_rss_and_pss(tmp_path: Path) -> None:
    # A parent that forks a child, both holding 64 MiB of their own for 0.6 s,
    # and sharing the parent's interpreter: both are counted in both sums, and
    # the shared pages only once in PSS.
    import sys

    from mpipe.bench.measure import run_timed

    script = ("import os, time; a = bytearray(64 << 20)\n"
              "pid = os.fork()\n"
              "b = bytearray(64 << 20) if pid == 0 else None\n"
              "time.sleep(0.6)\n"
              "os._exit(0) if pid == 0 else os.waitpid(pid, 0)\n")
    sample = run_timed([sys.executable, "-c", script], cores=1, log=tmp_path / "log",
                       memory_interval_s=0.02)
    assert sample.returncode == 0
    rss, pss = sample.peak_rss_bytes, sample.peak_pss_bytes
    assert rss is not None and rss > 190 << 20  # 64 MiB x 2 in the child, 64 in the parent
    assert pss is not None, "PSS not read (smaps_rollup unreadable?)"
    assert 120 << 20 < pss < rss  # the child's copy of `a` is shared until written


def test_more_workers_than_cores_is_read_against_mpipe_at_the_cores() -> None:
    # The W=10 column ran minutes after the W=2 one and everything slowed by
    # 20%.  The target is mpipe at W=10 against mpipe at W=2 run in the same
    # rounds; the floor-corrected ratio and the plain ratio of the two columns'
    # medians are only reported.
    from mpipe.bench.report import targets

    def column(workers: int, mpipe_s: float, to_floor: float,
               to_at_cores: float | None = None) -> dict[str, object]:
        summary: dict[str, object] = {"mpipe": {"median_wall_s": mpipe_s},
                                      "floor": {"median_ratio": to_floor}}
        if to_at_cores is not None:
            summary["mpipe-at-cores"] = {"median_ratio": to_at_cores}
        return {"workers": workers, "floor_processes": 2, "summary": summary}

    def rows(*columns: dict[str, object]) -> dict[str, dict[str, object]]:
        doc = {"machine": {"cores": 2}, "suites": {"compute": {"configs": list(columns)}}}
        return {t["target"]: t for t in targets(doc)}

    name = "compute W=10 vs W=2: more workers than cores"
    got = rows(column(2, 5.0, 1.05), column(10, 6.0, 1.20, to_at_cores=1.02))
    assert got[f"{name} (mpipe / mpipe at W=2, same rounds)"]["measured"] == 1.02
    assert got[f"{name} (mpipe / mpipe at W=2, same rounds)"]["met"] is True
    assert got[f"{name} (x floor / x floor)"]["measured"] == 1.20 / 1.05
    assert got[f"{name} (x floor / x floor)"]["met"] is None
    plain = got["compute W=10 vs W=2: mpipe medians, uncorrected"]
    assert plain["measured"] == 6.0 / 5.0 and plain["met"] is None
    got = rows(column(2, 5.0, 1.05), column(10, 5.0, 1.0, to_at_cores=1.07))
    assert got[f"{name} (mpipe / mpipe at W=2, same rounds)"]["met"] is False
    # Results of run 16 and earlier have no such runner: their target was the
    # floor-corrected ratio, and --render shows them as they were.
    got = rows(column(2, 5.0, 1.05), column(10, 6.0, 1.06))
    assert got[f"{name} (x floor / x floor)"]["measured"] == 1.06 / 1.05
    assert got[f"{name} (x floor / x floor)"]["met"] is True
    assert rows(column(2, 5.0, 1.05), column(10, 6.0, 1.20))[
        f"{name} (x floor / x floor)"]["met"] is False


def test_durable_wide_ratios_pair_runs_of_the_same_round() -> None:
    # The machine drifts between rounds; ratios within a round see none of it.
    # These walls give the right answers (0.8, 1.2, 0.6) only when each ratio
    # pairs runs of the same round: by medians, sorted, rotated, reversed or
    # swapped, each comes out otherwise.
    from mpipe.bench.measure import Sample
    from mpipe.bench.pairs import Rounds
    from mpipe.bench.report import targets
    from mpipe.bench.suites import wide_summary

    rounds = Rounds("mpipe")
    walls = {"mpipe": [3.0, 6.0, 4.0], "mpipe (no fsync)": [4.0, 5.0, 6.0],
             "mpipe-wide": [2.4, 3.0, 3.6], "mpipe-wide-nofsync": [2.0, 1.5, 4.0]}
    for name, ws in walls.items():
        rounds.samples[name] = [Sample(wall_s=w, cpu_s=1.0, returncode=0, cores=2)
                                for w in ws]
    wide = wide_summary(rounds, 6, disk_s=1.0)
    assert wide["over_subject"] == 0.8
    assert wide["price_of_fsync"] == 1.2
    assert wide["over_subject_nofsync"] == 0.6
    assert wide["ratio_to_disk_time"] == 3.0  # the median wall / the disk's time
    d = {"workers": 2, "disk_time_s": 1.0, "ratio_to_disk_time": 4.0, "wide": wide,
         "summary": {"mpipe (no fsync)": {"median_ratio": 0.8}, "floor": {"median_ratio": 0.95}}}
    got = {t["target"]: t for t in targets({"machine": {"cores": 2}, "suites": {"durable": d}})}
    w = "durable, W=6 (cpu_slots 2)"
    assert got[f"{w}: mpipe / mpipe at W=2, same rounds"]["measured"] == 0.8
    assert got[f"{w}: mpipe / mpipe at W=2 without fsync, same rounds"]["measured"] == 0.6
    assert got[f"{w}: price of fsync (fsync / no fsync at W=6, same rounds)"]["measured"] == 1.2
    assert all(t["met"] is None for n, t in got.items() if n.startswith(w))


def test_durable_suite_runs_the_wide_mpipe_with_as_many_io_slots_as_workers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --io-slots 2 sets mpipe's io_slots for the suite's own runs; the wide
    # runs measure the advice (io_slots as high as workers) and keep theirs.
    from mpipe.bench import runners, suites
    from mpipe.bench.measure import Sample
    from mpipe.bench.workload import BenchDir

    seen: list[tuple[str, int, bool, int | None]] = []

    def fake_mpipe(e: runners.Env, job: runners.Job, *, label: str = "mpipe",
                   **_: object) -> runners.Runner:
        seen.append((label, job.workers, job.fsync, e.io_slots))
        return lambda: Sample(wall_s=job.workers * (2.0 if job.fsync else 1.0), cpu_s=1.0,
                              returncode=0, cores=2, extra={"total": [1.0]})

    def fake_other(*_: object, **__: object) -> runners.Runner:
        return lambda: Sample(wall_s=1.0, cpu_s=1.0, returncode=0, cores=2,
                              extra={"total": [1.0]})

    monkeypatch.setattr(runners, "mpipe_runner", fake_mpipe)
    monkeypatch.setattr(runners, "floor_runner", fake_other)
    monkeypatch.setattr(runners, "peer_runner", fake_other)
    monkeypatch.setattr(suites, "disk_write_rate", lambda e, mb: 1e9)
    bench = BenchDir(tmp_path)
    monkeypatch.setattr(BenchDir, "ensure_inputs", lambda self, tasks: None)
    monkeypatch.setattr(BenchDir, "warm_inputs", lambda self, tasks: None)
    monkeypatch.setattr(BenchDir, "clear_outputs", lambda self: None)
    e = runners.Env(bench, cores=2, python="python", env={}, io_slots=2)
    plan = suites.Plan(pairs=3, workers=[2], compute_tasks=2, compute_repeat=0, io_tasks=4,
                       io_workers=2, items=10, trivial_workers=1, memory_tasks=(2, 4),
                       memory_pairs=1, tail_tasks=2, tail_workers=[1], dask_workers=2,
                       disk_probe_mb=8, peers=())
    doc = suites.durable(e, plan, lambda name, sample: None)
    assert ("mpipe-wide", 6, True, None) in seen and ("mpipe-wide-nofsync", 6, False, None) in seen
    assert ("mpipe", 2, True, 2) in seen
    assert doc["wide"]["workers"] == doc["wide"]["io_slots"] == 6
    assert doc["wide"]["over_subject"] == 3.0  # 12 s / 4 s, the fakes' walls
    # Where the suite's own W is already 3 per core, there is nothing wider to run.
    seen.clear()
    doc = suites.durable(e, replace(plan, io_workers=6), lambda name, sample: None)
    assert "wide" not in doc and [s[0] for s in seen] == ["mpipe-nofsync", "mpipe"]


def test_tables_take_columns_in_any_order_and_without_w_at_the_cores() -> None:
    # --workers 4,2 puts a column with mpipe-at-cores first; --workers 5 has no
    # W = cores column at all: the target is still there, and no table takes
    # mpipe at the cores for a peer.
    from io import StringIO

    from rich.console import Console

    from mpipe.bench.report import markdown, print_tables, targets

    def column(workers: int, at_cores: bool) -> dict[str, object]:
        names = ["mpipe", "floor", *(["mpipe-at-cores"] if at_cores else []), "pool"]
        summary = {n: {"median_wall_s": 3.0, "median_cpu_pct": 90.0, "n": 5,
                       **({} if n == "mpipe" else {"median_ratio": 1.02, "ratios": [1.02]})}
                   for n in names}
        return {"workers": workers, "floor_processes": 2, "summary": summary,
                "agree": dict.fromkeys(names, True)}

    for workers in ([4, 2], [5]):
        doc: dict[str, object] = {
            "machine": {"cores": 2},
            "suites": {"compute": {"tasks": 10, "repeat": 1,
                                   "configs": [column(w, w > 2) for w in workers]}}}
        doc["targets"] = targets(doc)
        names = [t["target"] for t in doc["targets"]]
        assert "compute W=5 vs W=2: more workers than cores (mpipe / mpipe at W=2, same " \
               "rounds)" in names or workers != [5], names
        assert not any("fastest peer (mpipe-at-cores)" in n for n in names), names
        text = markdown(doc)
        assert "x mpipe-at-cores" not in text and text.count("x mpipe W=2") == 1, text
        out = StringIO()
        print_tables(doc, Console(file=out, width=300))
        assert "x mpipe-at-cores" not in out.getvalue()


def test_bench_runs_mpipe_at_the_cores_beside_more_workers(tmp_path: Path) -> None:
    from mpipe.cores import usable_cores

    cores = usable_cores()
    out = tmp_path / "bench"
    proc = mpipe("bench", "--quick", "--only", "compute", "--peers", "pool",
                 "--workers", f"{cores},{cores + 1}", "--out", out, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    at, above = doc["suites"]["compute"]["configs"]
    assert set(at["summary"]) == {"mpipe", "floor", "pool"}
    assert set(above["summary"]) == {"mpipe", "floor", "mpipe-at-cores", "pool"}
    assert all(above["agree"].values())
    assert _positive(above["summary"]["mpipe-at-cores"]["median_ratio"])
    target = f"compute W={cores + 1} vs W={cores}: more workers than cores " \
             f"(mpipe / mpipe at W={cores}, same rounds)"
    row = next(t for t in doc["targets"] if t["target"] == target)
    assert row["measured"] == above["summary"]["mpipe-at-cores"]["median_ratio"]
    assert f"x mpipe W={cores}" in (out / "tables.md").read_text()


def test_sigterm_stops_the_bench_and_everything_it_started(tmp_path: Path) -> None:
    # SIGTERM while the Dask suite runs: its long-lived cluster (scheduler and
    # workers the harness started) and the run being timed must go with it.
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.conftest import REPO

    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "mpipe", "bench", "--quick", "--only", "dask",
                             "--out", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the first timed run is over: the next one is running
            if "dask W=" in line and " s  CPU" in line:
                break
        else:
            raise AssertionError("the bench ended before its first timed run")
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, rest[-2000:]

    # pytest is a child subreaper (conftest): whatever the bench left running
    # is still our descendant.  A forkserver notices its parent's exit in moments.
    def running(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10
    while left := [p for p in psutil.Process().children(recursive=True) if running(p)]:
        assert time.monotonic() < deadline, [p.pid for p in left]
        time.sleep(0.2)


def test_ab_alternates_an_earlier_commit_with_this_tree(tmp_path: Path) -> None:
    # HEAD against this tree: the tool exports the commit with git archive and
    # runs both (a smoke test: an A/A comparison, no timing is asserted).
    import subprocess
    import sys

    from tests.conftest import REPO, make_inputs, notes_config

    make_inputs(tmp_path, 1)
    cfg = notes_config(tmp_path, tasks=1, repeat=0)
    proc = subprocess.run([sys.executable, "-m", "mpipe.bench.ab", "HEAD", str(cfg),
                           "--pairs", "2"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [line] = proc.stdout.splitlines()
    assert line.startswith("pipeline.yaml: HEAD ") and "(medians of 2)" in line, line
    assert float(line.rsplit(": ", 1)[1]) > 0


def test_the_no_bytecode_cache_runs_find_no_bytecode_of_mpipe(tmp_path: Path) -> None:
    # A __pycache__ beside mpipe's sources (left by any process run without
    # PYTHONDONTWRITEBYTECODE) would make the "no bytecode cache" row a cached one.
    import mpipe.bench
    from mpipe.bench import runners
    from mpipe.bench.workload import BenchDir

    planted = Path(mpipe.bench.__file__).parent / "__pycache__"
    planted.mkdir(exist_ok=True)
    (planted / "planted.cpython-311.pyc").write_bytes(b"")
    assert runners.forget_source_bytecode() >= 1
    assert not planted.exists()
    env = runners.subprocess_env(BenchDir(tmp_path), bytecode_cache=False)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and "PYTHONPYCACHEPREFIX" not in env
    cached = runners.subprocess_env(BenchDir(tmp_path), bytecode_cache=True)
    assert "PYTHONDONTWRITEBYTECODE" not in cached
    assert cached["PYTHONPYCACHEPREFIX"] == str(tmp_path / "pycache")


def test_processes_names_each_process_of_a_run_and_its_cpu(tmp_path: Path) -> None:
    # A smoke test of the profiling tool on a real run: every process is
    # listed under the name it gives itself; no timing is asserted.
    import subprocess
    import sys

    from tests.conftest import REPO, make_inputs, notes_config

    make_inputs(tmp_path, 2)
    cfg = notes_config(tmp_path, tasks=2, repeat=0)
    proc = subprocess.run([sys.executable, "-m", "mpipe.bench.processes", "--",
                           sys.executable, "-m", "mpipe", "run", str(cfg), "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    names = {line.split()[0] for line in lines[1:-1]}
    assert {"mpipe-forksrv", "mpipe-tracker", "mpipe-writer", "mpipe-producer",
            "mpipe-consumer", "mpipe-compute-1", "mpipe-compute-2"} <= names, lines
    assert lines[-1].endswith("exit 0") and " processes, CPU " in lines[-1]
    # Peak RSS: a worker has numpy loaded (tens of MiB); the tree holds more than it.
    worker_peak = max(float(line.split()[-1]) for line in lines[1:-1]
                      if line.startswith("mpipe-compute-"))
    tree_peak = float(lines[-1].split("tree peak RSS ")[1].split()[0])
    assert 20 <= worker_peak < tree_peak, lines
