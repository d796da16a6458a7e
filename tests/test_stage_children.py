"""What a stage starts behaves as it would outside mpipe, and dies with its worker.

mpipe's children ignore SIGINT and SIGTERM (the runner decides what a signal
means), but a process a stage starts must not inherit that: a
``multiprocessing.Pool`` used inside a stage hung in ``terminate()`` on workers
deaf to its SIGTERM.  And a worker killed for ``timeout_s`` used to leave the
programs its stage had started running, re-parented to init.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

from tests.conftest import mpipe, start_mpipe


def _config(workdir: Path, fn: str, *, n: int, stage_extra: str = "") -> Path:
    cfg = workdir / "pipeline.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        pipeline: children
        workdir: .
        params: {{n: {n}}}
        source: {{fn: tests.child_stages:numbers}}
        stages:
          s: {{fn: tests.child_stages:{fn}, workers: 2{stage_extra}}}
        writer: {{path: results.h5}}
        allowed_modules: [tests.child_stages]
        fsync: false
        """))
    return cfg


def _results(workdir: Path) -> list[float]:
    with h5py.File(workdir / "results.h5") as f:
        return [float(v) for v in f["results"][:]]


def test_a_stage_can_use_a_multiprocessing_pool(tmp_path: Path) -> None:
    proc = mpipe("run", _config(tmp_path, "pooled", n=4), "--quiet", cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert _results(tmp_path) == [float(sum(v * v for v in range(i + 1))) for i in range(4)]


def test_what_a_stage_starts_ignores_sigint_and_has_sigterms_default(tmp_path: Path) -> None:
    proc = mpipe("run", _config(tmp_path, "signals_seen", n=2), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(_results(tmp_path), [1.0, 1.0])


def test_a_worker_killed_at_timeout_takes_what_its_stage_started(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "sleeps_in_a_subprocess", n=2,
                  stage_extra=", timeout_s: 1.5, retries: 0")
    proc = mpipe("run", cfg, "--quiet", cwd=tmp_path, timeout=60)
    assert proc.returncode == 1, proc.stderr
    # pytest is a child subreaper (conftest): an orphaned `sleep 60` would be ours.
    left = [p for p in psutil.Process().children(recursive=True)
            if p.name() == "sleep" and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left


def test_what_a_stage_left_running_does_not_outlive_the_run(tmp_path: Path) -> None:
    # A stage that starts a tool and returns without waiting: the tool outlived
    # the run (re-parented as its worker exited).
    proc = mpipe("run", _config(tmp_path, "leaves_a_tool_running", n=2), "--quiet",
                 cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    _assert_none_left("299.25")


def _sleeps(argument: str) -> list[psutil.Process]:
    # pytest is a child subreaper (conftest): an orphaned `sleep` would be ours.
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline() == ["sleep", argument] and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


def _assert_none_left(argument: str) -> None:
    left = _sleeps(argument)
    for p in left:
        p.kill()
    assert not left, left


def test_a_worker_that_exits_lets_a_pool_its_stage_kept_stop_first(tmp_path: Path) -> None:
    # Its stage's processes were killed before multiprocessing's finalizers ran:
    # the kept Pool's finalizer then waited for ever for a lock a killed pool
    # worker held, and the run with it.
    cfg = _config(tmp_path, "keeps_a_pool_then_exits", n=4)
    cfg.write_text(cfg.read_text().replace("workers: 2", "workers: 1"))
    start = time.monotonic()
    proc = mpipe("run", cfg, "--quiet", cwd=tmp_path, timeout=90)
    assert proc.returncode == 1, proc.stderr  # item 1 exits on every attempt
    assert time.monotonic() - start < 60
    doc = json.loads((tmp_path / ".mpipe/children/last-run.json").read_text())
    assert (doc["counts"]["committed"], doc["counts"]["failed"]) == (3, 1), doc["counts"]


def test_what_a_stage_started_in_a_session_of_its_own_ends_with_its_worker_too(
        tmp_path: Path) -> None:
    # As a worker killed at timeout_s, or one whose runner died, takes it:
    # start_new_session is as often there for the stage to killpg its tool.
    proc = mpipe("run", _config(tmp_path, "detaches_a_daemon", n=1), "--quiet",
                 cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    _assert_none_left("299.75")


def test_a_stage_thread_waiting_on_its_tool_does_not_hold_an_exiting_worker(
        tmp_path: Path) -> None:
    # The worker joined its stage's threads before ending its processes: a
    # thread waiting on a tool held the exiting worker (and the stage's queue)
    # for as long as the tool ran.
    cfg = _config(tmp_path, "waits_on_a_tool_in_a_thread_then_exits", n=3,
                  stage_extra=", retries: 0")
    cfg.write_text(cfg.read_text().replace("workers: 2", "workers: 1"))
    start = time.monotonic()
    proc = mpipe("run", cfg, "--quiet", cwd=tmp_path, timeout=90)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - start < 15, "the worker waited for its thread's tool"
    assert not _sleeps("20.5")


def test_ctrl_c_to_the_group_lets_a_stages_tool_finish_within_the_grace(
        tmp_path: Path) -> None:
    # Ctrl-C reaches every process of the foreground group, a stage's
    # `sleep` too: it must not end the tool (and fail the item) mid-item.
    cfg = _config(tmp_path, "runs_a_tool", n=2)
    cfg.write_text(cfg.read_text().replace("params: {n: 2}", "params: {n: 2, tool_s: 4}")
                   + "shutdown_grace_s: 20\n")
    proc = start_mpipe("run", cfg, "--quiet", cwd=tmp_path, start_new_session=True)
    runner = psutil.Process(proc.pid)
    deadline = time.monotonic() + 30
    # Both items in flight (a worker still importing holds none: its item would
    # not be started, and rightly not run, after the signal).
    while sum(p.name() == "sleep" for p in runner.children(recursive=True)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    doc = json.loads((tmp_path / ".mpipe/children/last-run.json").read_text())
    assert doc["counts"]["failed"] == 0 and doc["counts"]["committed"] == 2, doc["counts"]
