"""Seeing what a run does: progress, summary, bottleneck, report plot, plan, logs.

Every run is the CLI in a subprocess, as a user runs it.  The slow-stage
pipeline is tests/observe_stages.py: fast -> slow (sleeps) -> tail.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from mpipe import analysis
from tests.conftest import REPO, make_inputs, mpipe, notes_config

ESC = "\x1b"


def slow_config(workdir: Path, *, n: int = 6, slow_s: float = 0.25) -> Path:
    cfg = workdir / "slow.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        pipeline: obs
        workdir: .
        params: {{n: {n}, slow_s: {slow_s}}}
        source: {{fn: tests.observe_stages:numbers}}
        stages:
          fast: {{fn: tests.observe_stages:fast, workers: 1, queue_size: 2}}
          slow: {{fn: tests.observe_stages:slow, workers: 1, queue_size: 2}}
          tail: {{fn: tests.observe_stages:tail, workers: 1, queue_size: 2}}
        writer: {{path: results.h5}}
        allowed_modules: [tests.observe_stages]
        shutdown_grace_s: 5
        """))
    return cfg


def read_report(workdir: Path, pipeline: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        (workdir / ".mpipe" / pipeline / "last-run.json").read_text())
    return doc


def tty_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CI"}}
    env.update(TERM="xterm-256color", COLUMNS="120", LINES="40", PYTHONPATH=str(REPO))
    return env


# ------------------------------------------------------------------ progress


def test_progress_on_a_terminal_is_a_live_display(tmp_path: Path) -> None:
    cfg = slow_config(tmp_path)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mpipe", "run", str(cfg)], stdout=slave,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=tty_env(),
                            cwd=tmp_path)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the slave side is gone
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=30)
    out = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, stderr.decode()
    assert ESC + "[" in out, "no terminal control sequences: not a live display"
    assert "\x1b[1A" in out or "\x1b[2K" in out, "the display never redrew itself"
    for column in ("items/s", "ETA", "busy", "queue"):
        assert column in out
    for stage in ("fast", "slow", "tail"):
        assert stage in out
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)
    # The last frame shows every stage through, with its worker count.
    assert re.search(r"slow\b.*6/6", plain), plain[-3000:]
    assert "0/1" in plain  # busy workers / workers once the run is over
    assert "bottleneck:" in plain


def test_progress_into_a_pipe_is_plain_periodic_lines(tmp_path: Path) -> None:
    cfg = slow_config(tmp_path)
    proc = mpipe("run", cfg, "--progress-interval", "0.3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert ESC not in out and "\r" not in out
    assert all(ch == "\n" or " " <= ch <= "~" for ch in out), "non-ASCII or control characters"
    lines = out.splitlines()
    progress = [line for line in lines
                if re.match(r"\[\s*\d+\.\ds\] obs (running|finished):", line)]
    running = [line for line in progress if " running: " in line]
    finished = [line for line in progress if " finished: " in line]
    assert len(running) >= 2, out
    assert len(finished) == 1, out
    assert progress[-1] == finished[0], "the final line comes last"
    assert "fast 6/6" in finished[0] and "slow 6/6" in finished[0] and "tail 6/6" in finished[0]
    assert "busy 0/1" in finished[0] and "queue 0/2" in finished[0]
    assert "committed 6" in finished[0]
    # Times go up, one line per interval.
    times = [float(re.match(r"\[\s*([\d.]+)s\]", line).group(1))  # type: ignore[union-attr]
             for line in running]
    assert times == sorted(times)
    # Then the summary.
    assert lines.index(finished[0]) < next(i for i, line in enumerate(lines)
                                           if line.startswith("pipeline obs:"))


def _snap(*, ended: bool, produced: int = 10, skipped: int = 2, failed: int = 1,
          elapsed: float = 5.0) -> dict[str, Any]:
    return {"elapsed_s": elapsed, "produced": produced, "producer_ended": ended,
            "committed": 3, "skipped": skipped, "failed": failed, "stopping": False,
            "stages": [
                {"name": "a", "workers": 2, "busy": 2, "queue": 3, "queue_size": 4,
                 "done": 5, "failed": 1, "retries": 0},
                {"name": "b", "workers": 1, "busy": 1, "queue": 4, "queue_size": 4,
                 "done": 3, "failed": 0, "retries": 1}]}


def test_stage_lines_know_the_total_once_the_source_ended() -> None:
    from mpipe.progress import RateMeter, format_line, stage_lines

    meter = RateMeter()
    before = stage_lines(_snap(ended=False, elapsed=1.0), meter)
    # 10 produced, 2 skipped (never reach a stage): 8 so far; b loses a's failure.
    assert [line.count_text for line in before] == ["5/8+", "3/7+"]
    # No trailing window yet: the average so far; no total, so no ETA.
    assert before[0].rate == pytest.approx(6.0) and before[0].eta_s is None
    snap = _snap(ended=True, elapsed=3.0)
    snap["stages"][0]["done"], snap["stages"][1]["done"] = 7, 5
    after = stage_lines(snap, meter)
    assert [line.count_text for line in after] == ["7/8", "5/7"]
    assert after[0].rate == pytest.approx(1.0)  # (7+1 - 5+1) items in 2 s
    assert after[1].eta_s == pytest.approx(2.0)  # 2 left at 1 item/s
    line = format_line("p", snap, after)
    assert line.startswith("[    3.0s] p running: a 7/8 1.00/s ETA 0s busy 2/2 queue 3/4 failed 1 "
                           "| b 5/7 1.00/s ETA 2s busy 1/1 queue 4/4 | ")
    assert line.endswith("committed 3, skipped 2, failed 1")
    assert line.isascii() and line.isprintable()


def test_line_progress_writes_one_line_per_interval_and_a_final_one() -> None:
    import io
    import threading

    from mpipe.progress import LineProgress

    out = io.StringIO()
    calls = threading.Semaphore(0)

    def snapshot() -> dict[str, Any]:
        calls.release()
        return _snap(ended=True)

    reporter = LineProgress("p", out, interval_s=0.05)
    reporter.start(snapshot)
    for _ in range(3):
        assert calls.acquire(timeout=10)
    reporter.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 4 and all(" p running: " in line for line in lines[:-1])
    assert " p finished: " in lines[-1]


def test_no_progress_and_quiet(tmp_path: Path) -> None:
    make_inputs(tmp_path, 2)
    cfg = notes_config(tmp_path, tasks=2, repeat=0)
    proc = mpipe("run", cfg, "--no-progress", "--progress-interval", "0.1")
    assert proc.returncode == 0, proc.stderr
    assert "running:" not in proc.stdout and "finished:" not in proc.stdout
    assert "pipeline notes: complete" in proc.stdout
    proc = mpipe("run", cfg, "--quiet", "--fresh", "--progress-interval", "0.1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


# ------------------------------------------------------------------ summary and bottleneck


def test_a_slow_stage_is_named_the_bottleneck(tmp_path: Path) -> None:
    cfg = slow_config(tmp_path, n=8, slow_s=0.25)
    proc = mpipe("run", cfg, "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for column in ("workers", "items", "failed", "retries", "busy", "waiting for input",
                   "blocked on output", "IO", "compute"):
        assert column in out
    assert re.search(r"^bottleneck: slow\b", out, re.M), out
    assert "raise stages.slow.workers (now 1; cores:" in out
    # Into a pipe (cron, a journal), each sentence stays on one line: folded
    # at 120 columns they were split mid-sentence.
    [line] = [x for x in out.splitlines() if x.startswith("bottleneck: slow")]
    assert line.endswith(("of the time", "of its worker-time")), out
    assert len(line) > 120, line
    report = read_report(tmp_path, "obs")
    verdict = report["analysis"]["bottleneck"]
    assert verdict["stage"] == "slow" and verdict["kind"] == "compute"
    shares = report["analysis"]["stages"]
    assert shares["slow"]["busy_pct"] > 80
    assert shares["fast"]["busy_pct"] < 20 and shares["tail"]["busy_pct"] < 20
    assert shares["tail"]["starved_pct"] > 50
    # The same numbers as the run's accounting, and the timeline, in the report.
    for name in ("fast", "slow", "tail"):
        stage = report["stages"][name]
        assert stage["done"] == 8 and len(stage["timeline"]) == 8
        worker, key, started, busy, io, cpu_wait = stage["timeline"][0]
        assert worker == f"{name}-1" and key == "0" and started > 1e9
        assert busy >= io + cpu_wait and io >= 0
        assert {"starved_s", "blocked_s", "io_s", "busy_s", "per_worker"} <= set(stage)
    assert report["cores"] >= 1 and report["started_at_unix"] > 1e9
    # mpipe report prints the same verdict from the JSON alone.
    again = mpipe("report", tmp_path / ".mpipe/obs/last-run.json")
    assert again.returncode == 0, again.stderr
    assert re.search(r"^bottleneck: slow\b", again.stdout, re.M)


def test_failed_attempts_count_as_busy_time(tmp_path: Path) -> None:
    # Half the items fail slowly, twice each: their time was counted nowhere,
    # the stage looked half idle and the summary said "run more items", its
    # note calling the failing tail "commit and shutdown".
    cfg = tmp_path / "fails.yaml"
    cfg.write_text(textwrap.dedent("""\
        pipeline: fails
        workdir: .
        params: {n: 8, slow_s: 0.3}
        source: {fn: tests.observe_stages:numbers}
        stages:
          a: {fn: tests.observe_stages:slow_odd_fails, workers: 2, retries: 1}
        writer: {path: results.h5}
        allowed_modules: [tests.observe_stages]
        fsync: false
        """))
    proc = mpipe("run", cfg, "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    report = read_report(tmp_path, "fails")
    stage = report["stages"]["a"]
    assert (stage["done"], stage["failed"], stage["retries"]) == (4, 4, 4), stage
    # 8 failed attempts of 0.3 s each, and 4 good ones.
    assert 8 * 0.3 <= stage["failed_busy_s"] < stage["busy_s"], stage
    assert stage["busy_s"] >= 12 * 0.3, stage
    assert len(stage["timeline"]) == 12  # every attempt, failed ones too
    # Their IO too, or an IO-bound stage failing often would drift to "compute".
    assert stage["io_s"] >= 12 * 0.3 * 0.95, stage
    assert set(stage["per_worker"]) == {"a-1", "a-2"}, stage["per_worker"]
    assert report["analysis"]["stages"]["a"]["busy_pct"] > 70, report["analysis"]
    assert report["analysis"]["bottleneck"]["stage"] == "a", report["analysis"]
    assert "commit and shutdown" not in proc.stdout, proc.stdout


def test_a_death_adds_no_time_and_no_worker_row() -> None:
    # Its start is not known (nor, on Dask, always its worker): a row named
    # "dask" with nothing in it was drawn in the timeline plot.
    from mpipe.messages import ItemFailure
    from mpipe.pool import StageStats

    stats = StageStats()
    stats.record_failed_attempt(ItemFailure(seq=0, key="0", stage="a", worker="dask",
                                            kind="died", message="gone"))
    assert (stats.busy_s, stats.per_worker, stats.timeline) == (0.0, {}, [])


def test_output_commits_reach_the_report_as_io(tmp_path: Path) -> None:
    # The stage writes its outputs without ctx.io(): the time its
    # ctx.output_dir blocks took to fsync and rename is still IO, all of it.
    cfg = tmp_path / "write.yaml"
    cfg.write_text(textwrap.dedent("""\
        pipeline: obs
        workdir: .
        params: {n: 4}
        source: {fn: tests.observe_stages:numbers}
        stages:
          write: {fn: tests.observe_stages:write_outputs, workers: 1}
        writer: {path: results.h5}
        output_dirs: [out]
        fsync: true
        allowed_modules: [tests.observe_stages]
        """))
    proc = mpipe("run", cfg, "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = read_report(tmp_path, "obs")
    stage = report["stages"]["write"]
    assert report["fsync"] is True and stage["backend"] == "local"
    assert stage["done"] == 4 and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "0", "1", "2", "3"]
    assert stage["output_commit_s"] > 0 and stage["io_s"] == pytest.approx(
        stage["output_commit_s"], abs=5e-3), stage
    assert stage["io_s"] <= stage["busy_s"]


def _report(stages: dict[str, dict[str, Any]], *, wall: float = 10.0,
            cores: int = 2, cpu_slots: int = 2) -> dict[str, Any]:
    full = {}
    for name, s in stages.items():
        full[name] = {"done": 10, "failed": 0, "retries": 0, "deaths": 0, "timeouts": 0,
                      "busy_s": 0.0, "io_s": 0.0, "cpu_wait_s": 0.0, "starved_s": 0.0,
                      "blocked_s": 0.0, "per_worker": {}, "timeline": [], "workers": 1, **s}
    return {"wall_s": wall, "startup_s": 0.0, "cores": cores, "cpu_slots": cpu_slots,
            "stages": full, "counts": {}}


@pytest.mark.parametrize(("stages", "stage", "kind", "advice"), [
    ({"load": {"busy_s": 1.0, "starved_s": 8.0}, "compute": {"busy_s": 9.8, "workers": 1}},
     "compute", "compute", "raise stages.compute.workers (now 1; cores: 2)"),
    ({"compute": {"busy_s": 19.6, "workers": 2}}, "compute", "cores", "the cores are the limit"),
    ({"compute": {"busy_s": 19.0, "io_s": 15.0, "workers": 2, "io_slots": 1}}, "compute", "io",
     "raise stages.compute.io_slots (now 1 for 2 workers)"),
    ({"compute": {"busy_s": 38.0, "cpu_wait_s": 20.0, "workers": 4}}, "compute", "cpu_slots",
     "more workers will not help"),
    ({"a": {"busy_s": 2.0, "blocked_s": 7.0}}, "writer", "writer", "writer.queue_size"),
    ({"a": {"busy_s": 1.0, "blocked_s": 6.0}, "b": {"busy_s": 9.5}}, "b", "compute",
     "raise stages.b.workers"),
    ({"a": {"busy_s": 1.0, "starved_s": 9.0}}, "source", "source", "source.fn"),
    # IO mostly the outputs' commits: other workers can compute meanwhile.
    ({"compute": {"busy_s": 19.0, "io_s": 15.0, "output_commit_s": 9.0, "workers": 2,
                  "io_slots": 2}}, "compute", "io",
     "raise stages.compute.workers (now 2) toward 6 (3 x 2 cpu slots = 6 workers), and its "
     "io_slots as high if you set it"),
    ({"compute": {"busy_s": 19.0, "io_s": 15.0, "output_commit_s": 9.0, "workers": 2,
                  "io_slots": 1}}, "compute", "io",
     "toward 6 (3 x 2 cpu slots = 6 workers), and its io_slots (now 1) with them if the "
     "commits are inside ctx.io()"),
    ({"compute": {"busy_s": 57.0, "io_s": 45.0, "output_commit_s": 27.0, "workers": 6,
                  "io_slots": 6}}, "compute", "io", "the disk's commits are the limit"),
    ({"compute": {"busy_s": 57.0, "io_s": 45.0, "output_commit_s": 27.0, "workers": 6,
                  "io_slots": 1}}, "compute", "io",
     "raise stages.compute.io_slots (now 1) to its 6 workers if the commits are inside "
     "ctx.io(); else the disk's commits are the limit"),
    # The other stages' workers count as busy as they were, all together:
    # read's 2 at 10% and tail's 1 at 10% are 0.3, so 1; read's 4 at 90% are 4.
    ({"read": {"busy_s": 2.0, "workers": 2}, "tail": {"busy_s": 1.0},
      "compute": {"busy_s": 19.0, "io_s": 15.0, "output_commit_s": 9.0, "workers": 2}},
     "compute", "io", "raise stages.compute.workers (now 2) toward 5 (3 x 2 cpu slots = 6 "
     "workers, less 1 busy elsewhere in the pipeline)"),
    ({"read": {"busy_s": 36.0, "workers": 4},
      "compute": {"busy_s": 19.0, "io_s": 15.0, "output_commit_s": 9.0, "workers": 2}},
     "compute", "io", "with 4 workers busy elsewhere, the pipeline has 3 busy workers per "
     "cpu slot already; the disk's commits are the limit"),
    ({"compute": {"busy_s": 19.0, "io_s": 15.0, "output_commit_s": 9.0, "workers": 2,
                  "backend": "dask"}}, "compute", "io",
     "give the Dask workers more threads than cores (backend.dask.threads_per_worker"),
    ({"compute": {"busy_s": 19.0, "io_s": 15.0, "workers": 2, "backend": "dask"}},
     "compute", "io", "give the Dask workers more threads (backend.dask.threads_per_worker "
     "for a LocalCluster mpipe starts, dask worker --nthreads for your own) and raise "
     "stages.compute.workers (now 2) to match, while their disks keep up"),
    # A Dask stage's workers are not this machine's to count.
    ({"remote": {"busy_s": 36.0, "workers": 4, "backend": "dask"},
      "compute": {"busy_s": 19.0, "io_s": 15.0, "output_commit_s": 9.0, "workers": 2}},
     "compute", "io", "raise stages.compute.workers (now 2) toward 6 (3 x 2 cpu slots"),
    # One other busy worker, the pipeline full: said in the singular.
    ({"read": {"busy_s": 5.0, "workers": 1},
      "compute": {"busy_s": 47.5, "io_s": 37.5, "output_commit_s": 22.5, "workers": 5}},
     "compute", "io", "with 1 worker busy elsewhere, the pipeline has 3 busy workers per cpu "
     "slot already; the disk's commits are the limit"),
    # A compute-bound Dask stage is measured against the cluster's threads, not
    # this machine's cores (nor its cpu slots: ctx.cpu() takes none there).
    ({"compute": {"busy_s": 19.6, "workers": 2, "backend": "dask", "dask_threads": 8}},
     "compute", "compute", "raise stages.compute.workers (now 2) toward the cluster's 8 "
     "threads (or set it to auto)"),
    ({"compute": {"busy_s": 78.4, "workers": 8, "backend": "dask", "dask_threads": 8}},
     "compute", "cores", "the Dask cluster's 8 threads are the limit: add Dask workers"),
    ({"compute": {"busy_s": 9.8, "workers": 1, "backend": "dask"}},
     "compute", "cores", "the Dask cluster's threads are the limit"),
    # Under half of the IO: the plain IO advice.
    ({"compute": {"busy_s": 19.0, "io_s": 15.0, "output_commit_s": 7.0, "workers": 2,
                  "io_slots": 2}}, "compute", "io",
     "raise stages.compute.workers (now 2) and its io_slots (now 2) while the disk keeps up"),
])
def test_verdicts(stages: dict[str, dict[str, Any]], stage: str, kind: str, advice: str) -> None:
    verdict = analysis.bottleneck(_report(stages))
    assert (verdict["stage"], verdict["kind"]) == (stage, kind), verdict
    assert advice in verdict["advice"], verdict


def test_the_commit_verdict_follows_fsync_and_the_cpu_slots_the_cores_can_fill() -> None:
    stage = {"busy_s": 19.0, "io_s": 15.0, "output_commit_s": 9.0, "workers": 2}
    report = _report({"compute": stage}, cores=2, cpu_slots=8)
    verdict = analysis.bottleneck(report)
    assert "fsyncing its ctx.output_dir files" in verdict["message"]
    assert "toward 6 (3 x 2 cpu slots = 6 workers)" in verdict["advice"], verdict
    assert "fsync: false" in verdict["advice"], verdict
    # With fsync off more workers gained nothing that held (BENCHMARKS.md,
    # "Durable outputs"): the plain IO advice, and nothing about fsync.
    report["fsync"] = False
    verdict = analysis.bottleneck(report)
    assert "ctx.output_dir" not in verdict["message"], verdict
    assert "and its io_slots (now 2) while the disk keeps up" in verdict["advice"], verdict
    assert "fsync" not in verdict["message"] + verdict["advice"], verdict
    # Workers enough for the cpu slots, but fewer slots than cores; with io_slots
    # below the workers, raising them is a first step, not an alternative.
    stage = {**stage, "workers": 4, "io_slots": 4, "busy_s": 38.0, "io_s": 30.0,
             "output_commit_s": 18.0}
    verdict = analysis.bottleneck(_report({"compute": stage}, cores=4, cpu_slots=1))
    assert verdict["advice"] == (
        "raise cpu_slots (now 1) toward the cores (4), and the workers with it (3 per cpu "
        "slot); or set fsync: false if a crash may cost the last few items"), verdict
    verdict = analysis.bottleneck(_report({"compute": {**stage, "io_slots": 1}}, cores=4,
                                          cpu_slots=1))
    assert "inside ctx.io(); then raise cpu_slots (now 1)" in verdict["advice"], verdict
    # One cpu slot: singular.
    verdict = analysis.bottleneck(_report({"compute": {**stage, "workers": 2}}, cores=1,
                                          cpu_slots=1))
    assert "toward 3 (3 x 1 cpu slot = 3 workers)" in verdict["advice"], verdict
    # A Dask stage's IO verdict names no io slot.
    verdict = analysis.bottleneck(_report({"compute": {**stage, "backend": "dask"}}))
    assert "io slot" not in verdict["message"] and "io_slots" not in verdict["advice"], verdict
    # Nor to the writer's verdict.
    report = _report({"a": {"busy_s": 2.0, "blocked_s": 7.0}})
    assert "fsync: false" in analysis.bottleneck(report)["advice"]
    report["fsync"] = False
    assert "fsync" not in analysis.bottleneck(report)["advice"]


def test_verdict_uses_queue_fullness_when_the_runner_reports_it() -> None:
    report = _report({"compute": {"busy_s": 9.8, "queue_full_s": 9.5}})
    verdict = analysis.bottleneck(report)
    assert verdict["message"].startswith(
        "compute was 98% busy and its input queue was full 95% of the time")
    assert verdict["advice"] == "raise stages.compute.workers (now 1; cores: 2)"


def test_no_items_no_verdict() -> None:
    report = _report({"a": {"done": 0}})
    assert analysis.bottleneck(report)["stage"] is None


# ------------------------------------------------------------------ report --plot


def test_report_plot_has_one_row_per_worker(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0, workers=2)
    proc = mpipe("run", cfg, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "plots" / "timeline.png"
    proc = mpipe("report", tmp_path / ".mpipe/notes/last-run.json", "--plot", out)
    assert proc.returncode == 0, proc.stderr
    assert "bottleneck:" in proc.stdout and "timeline:" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000

    from mpipe.plot import build_figure, plot_timeline

    report = read_report(tmp_path, "notes")
    fig, info = build_figure(report)
    [ax] = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["compute-1", "compute-2"] == info.rows
    assert info.bars == 3
    # A replacement worker (after a death) gets its own row, in number order.
    report["stages"]["compute"]["timeline"].append(
        ["compute-3", "t009", report["started_at_unix"] + 3, 0.1, 0.05, 0.0])
    info = plot_timeline(report, tmp_path / "more.png")
    assert info.rows == ["compute-1", "compute-2", "compute-3"] and info.bars == 4
    import matplotlib.image

    height, width = matplotlib.image.imread(str(tmp_path / "more.png")).shape[:2]
    assert width > 600 and height > 150


def test_report_of_a_bad_file_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = mpipe("report", bad)
    assert proc.returncode == 2 and "not a run report" in proc.stderr
    proc = mpipe("report", tmp_path / "missing.json")
    assert proc.returncode == 2 and "cannot read report" in proc.stderr


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpipe.errors import ConfigError
    from mpipe.plot import build_figure

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ConfigError) as info:
        build_figure(_report({"a": {}}))
    assert "pip install 'mpipe[plot]'" in str(info.value)


# ------------------------------------------------------------------ plan and validate


def test_plan_shows_outputs_and_what_resume_skips(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0)
    assert mpipe("validate", cfg).returncode == 0
    plan = mpipe("plan", cfg)
    assert plan.returncode == 0, plan.stderr
    assert "workers=2 queue_size=4" in plan.stdout
    assert f"outputs   {tmp_path / 'output'}" in plan.stdout
    assert f"results   {tmp_path / 'results.h5'}" in plan.stdout
    assert "nothing committed yet" in plan.stdout
    assert not (tmp_path / ".mpipe").exists(), "plan must not create run state"

    assert mpipe("run", cfg, "--quiet").returncode == 0
    plan = mpipe("plan", cfg, "--items")
    assert plan.returncode == 0, plan.stderr
    assert "the ledger holds 3 committed item(s)" in plan.stdout
    assert "--fresh would forget them and redo all 3" in plan.stdout
    assert "a run would skip 3 and do 0" in plan.stdout
    # An input changed (a new file, so a new mtime): that item is redone.  Replaced,
    # not touched: the input is a hard link into the session's cache.
    changed = tmp_path / "input/t001/ch00.npy"
    fresh = changed.with_suffix(".new")
    fresh.write_bytes(changed.read_bytes())
    os.replace(fresh, changed)
    plan = mpipe("plan", cfg, "--items", "--set", "params.tasks=4")
    # params are part of the fingerprint: a different params mapping redoes everything.
    assert "a run would skip 0 and do 4" in plan.stdout, plan.stdout
    plan = mpipe("plan", cfg, "--items")
    assert "a run would skip 2 and do 1" in plan.stdout, plan.stdout


def test_validate_and_plan_refuse_a_bad_config(tmp_path: Path) -> None:
    cfg = notes_config(tmp_path, tasks=2, extra="wokers: 3\n")
    for command in ("validate", "plan"):
        proc = mpipe(command, cfg)
        assert proc.returncode == 2, proc.stdout
        assert "wokers: unknown key" in proc.stderr and "pipeline.yaml line" in proc.stderr
    proc = mpipe("plan", notes_config(tmp_path, tasks=2), "--set", "stages.compute.workers=0")
    assert proc.returncode == 2 and "stages.compute.workers" in proc.stderr


# ------------------------------------------------------------------ scheduled-job ergonomics


def test_env_interpolation_end_to_end(tmp_path: Path) -> None:
    make_inputs(tmp_path, 2)
    cfg = notes_config(tmp_path, tasks=2, repeat=0)
    text = cfg.read_text()
    text = text.replace("tasks: 2", "tasks: '${MPIPE_TEST_TASKS}'")
    text = text.replace("writer: {path: results.h5}",
                        "writer: {path: 'results-${MPIPE_TEST_DATE:-latest}.h5'}")
    cfg.write_text(text)
    proc = mpipe("run", cfg, "--quiet", env={"MPIPE_TEST_TASKS": "2",
                                             "MPIPE_TEST_DATE": "2031-01-02"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "results-2031-01-02.h5").exists()
    report = read_report(tmp_path, "notes")
    assert report["counts"]["committed"] == 2
    env = {k: v for k, v in os.environ.items() if k != "MPIPE_TEST_TASKS"}
    proc = subprocess.run([sys.executable, "-m", "mpipe", "run", str(cfg)], capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 2
    assert "params.tasks: environment variable ${MPIPE_TEST_TASKS} is not set" in proc.stderr


def test_log_file_in_json(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0, fn="tests.faults.stages:notes_with_fault")
    log = tmp_path / "logs" / "run.jsonl"
    proc = mpipe("run", cfg, "--quiet", "--log-file", log, "--log-format", "json",
                 "--set", "params.fault=raise", "--set", "params.fault_key=t001",
                 "--set", "params.fault_times=1")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records, "nothing logged"
    retry = [r for r in records if "t001" in r["message"] and "retrying" in r["message"]]
    assert retry, records
    assert retry[0]["level"] == "WARNING" and retry[0]["process"] == "runner"
    assert {"ts", "level", "process", "pid", "logger", "message"} <= set(retry[0])
    assert "retrying" not in proc.stderr, "the runner's records belong in the log file"


def test_the_closing_error_follows_the_log_format_and_file(tmp_path: Path) -> None:
    # With --log-format json the last lines on stderr were text ("mpipe: error:
    # ...", "  hint: ..."), which a collector reading JSON lines chokes on; with
    # --log-file the file never said how the run ended.
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0, fn="tests.faults.stages:notes_with_fault")
    fault = ("--set", "params.fault=raise", "--set", "params.fault_key=t001",
             "--set", "params.fault_times=9")
    proc = mpipe("run", cfg, "--quiet", "--log-format", "json", *fault)
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]  # every line
    last = records[-1]
    assert last["level"] == "ERROR" and last["exit_code"] == 1, last
    assert "1 of 3 items failed" in last["message"] and "hint:" in last["message"], last
    # Fixing the stage redoes its items (their fingerprint holds its code): the
    # hint said "finished items are not redone".
    assert "editing a stage's code redoes its items" in last["message"], last

    log = tmp_path / "run.log"
    proc = mpipe("run", cfg, "--quiet", "--fresh", "--log-file", log, *fault)
    assert proc.returncode == 1, proc.stderr
    assert "mpipe: error: 1 of 3 items failed" in proc.stderr, proc.stderr
    assert [line for line in log.read_text().splitlines()
            if "ERROR" in line and "1 of 3 items failed" in line], log.read_text()


def test_an_error_the_runner_logged_is_not_logged_again_as_the_run_closes(
        tmp_path: Path) -> None:
    # The consumer dies: the runner logs the error as it happens; the closing
    # record says how the run ended instead of repeating it.
    make_inputs(tmp_path, 4)
    cfg = notes_config(tmp_path, tasks=4, repeat=0, workers=2)
    proc = mpipe("run", cfg, "--quiet", "--log-format", "json",
                 "--set", "consumer.fn=tests.faults.stages:consumer_killed_after",
                 "--set", "params.consumer_dies_after=1")
    assert proc.returncode == 3, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]  # every line
    errors = [r for r in records if r["level"] == "ERROR"]
    # The closing record says why in a line, not the whole error again.
    assert errors[-1]["exit_code"] == 3, errors
    assert errors[-1]["message"].startswith("exit 3: the consumer "), errors
    assert errors[-1]["message"].endswith("(logged above)"), errors
    assert sum(r["message"].startswith("the consumer") for r in errors) == 1, errors


def test_a_report_path_that_is_a_directory_is_refused_before_the_run(tmp_path: Path) -> None:
    # Was found after every item was done: exit 74, "cannot write ...".
    make_inputs(tmp_path, 2)
    cfg = notes_config(tmp_path, tasks=2, repeat=0)
    proc = mpipe("run", cfg, "--report", tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"--report {tmp_path}: is a directory" in proc.stderr, proc.stderr
    assert not (tmp_path / "output").exists()  # nothing ran


def test_every_flag_is_in_the_help() -> None:
    top = mpipe("--help")
    assert top.returncode == 0
    for word in ("run", "validate", "plan", "report", "tune", "bench", "exit codes"):
        assert word in top.stdout, word
    run = mpipe("run", "--help")
    for flag in ("--set", "--fresh", "--report", "--quiet", "--progress", "--no-progress",
                 "--progress-interval", "--limit", "--log-level", "--log-file", "--log-format"):
        assert flag in run.stdout, flag
        assert flag in top.stdout, flag
    for command, flags in {"plan": ["--items"], "report": ["--plot"],
                           "tune": ["--workers", "--limit", "--write", "--keep"]}.items():
        proc = mpipe(command, "--help")
        for flag in flags:
            assert flag in proc.stdout and flag in top.stdout, (command, flag)


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_a_duration_flag_must_be_a_finite_positive_number(tmp_path: Path, value: str) -> None:
    # nan passed the `<= 0` check and printed the progress line in a loop;
    # inf killed the progress thread with an OverflowError.
    for command in (["run", "--progress-interval", value], ["tune", "--trial-timeout", value]):
        proc = mpipe(command[0], tmp_path / "pipeline.yaml", *command[1:])
        assert proc.returncode == 2, proc.stderr
        assert f"must be > 0 and < 864000 (got {value})" in proc.stderr, proc.stderr
    # The tune help's description is not %-formatted: one % sign.
    assert "CPU % per count" in " ".join(mpipe("tune", "--help").stdout.split())


def test_make_run_passes_flags_through(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0)
    # A stamp newer than pyproject.toml: make must not reinstall the venv.
    stamp = tmp_path / "installed"
    stamp.touch()
    report = tmp_path / "from-make.json"
    proc = subprocess.run(
        ["make", "-s", "-C", str(REPO), "run", f"STAMP={stamp}", f"CONFIG={cfg}",
         f"ARGS=--set params.tasks=2 --no-progress --report {report}"],
        capture_output=True, text=True, timeout=90,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(report.read_text())
    assert doc["counts"]["produced"] == 2
    assert "pipeline notes: complete" in proc.stdout and "running:" not in proc.stdout
