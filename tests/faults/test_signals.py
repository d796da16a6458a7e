"""SIGINT / SIGTERM: stop taking items, let in-flight ones finish, commit, exit 130/143."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import (
    REPO,
    check_against_reference,
    make_inputs,
    mpipe,
    notes_config,
    start_mpipe,
)

SLEEPY = "tests.faults.stages:sleepy"


def wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def first_output(workdir: Path) -> bool:
    out = workdir / "output"
    return out.exists() and any(".mpipe-" not in p.name for p in out.iterdir())


def report(workdir: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((workdir / ".mpipe/notes/last-run.json").read_text())


@pytest.mark.parametrize(("signum", "code", "group"), [
    (signal.SIGINT, 130, False),
    (signal.SIGTERM, 143, False),
    (signal.SIGINT, 130, True),   # Ctrl-C: the whole foreground process group
    (signal.SIGTERM, 143, True),  # systemd's KillMode=control-group
])
def test_signal_commits_what_finished_then_resume_completes(
    tmp_path: Path, signum: int, code: int, group: bool
) -> None:
    make_inputs(tmp_path, 8)
    cfg = notes_config(tmp_path, tasks=8, repeat=0, workers=2, fn=SLEEPY)
    proc = start_mpipe("run", cfg, env={"MPIPE_TEST_SLEEP_S": "0.6"}, start_new_session=True)
    wait_for(lambda: first_output(tmp_path))
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    doc = report(tmp_path)
    assert doc["status"] == "interrupted"
    committed = doc["counts"]["committed"]
    assert 1 <= committed < 8
    # In-flight items were allowed to finish: nothing finished was lost.
    done = sorted(p.name for p in (tmp_path / "output").iterdir())
    assert len(done) == committed, (done, doc["counts"])
    assert not list(tmp_path.glob("results.h5.mpipe-tmp-*")), list(tmp_path.iterdir())

    again = subprocess.run([sys.executable, "-m", "mpipe", "run", str(cfg)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO),
                                "MPIPE_TEST_SLEEP_S": "0"})
    assert again.returncode == 0, again.stderr
    assert report(tmp_path)["counts"]["skipped"] == committed
    check_against_reference(tmp_path, 8, 0)


def _wait_until_up(proc: subprocess.Popen[str]) -> None:
    """Read the run's log (started with --log-level INFO) until its processes are up."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if "processes are up" in line:
            return


def test_second_sigint_stops_at_once(tmp_path: Path) -> None:
    make_inputs(tmp_path, 4)
    cfg = notes_config(tmp_path, tasks=4, repeat=0, workers=2, fn=SLEEPY)
    proc = start_mpipe("run", cfg, "--log-level", "INFO", "--set", "shutdown_grace_s=120",
                       env={"MPIPE_TEST_SLEEP_S": "60"})
    _wait_until_up(proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)  # well past the echo window (runner.SAME_STOP_REQUEST_S)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_sent_to_the_runner_and_then_its_group_is_one_stop_request(
        tmp_path: Path, signum: int) -> None:
    # What coreutils' `timeout` does (and `kill PID; kill -- -PGID`): the runner
    # got it twice, milliseconds apart, and took the echo for a second signal,
    # killing the items in flight instead of giving them the grace period.
    make_inputs(tmp_path, 6)
    cfg = notes_config(tmp_path, tasks=6, repeat=0, workers=2, fn=SLEEPY)
    proc = start_mpipe("run", cfg, "--log-level", "INFO", "--set", "shutdown_grace_s=60",
                       env={"MPIPE_TEST_SLEEP_S": "1.5"}, start_new_session=True)
    wait_for(lambda: first_output(tmp_path))
    proc.send_signal(signum)
    # `timeout`'s two kills came 2 ms apart; sent at once, the two are one
    # delivery (Python runs the handler once for both).
    time.sleep(0.02)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "stopping at once" not in err and "abandoning" not in err, err
    doc = report(tmp_path)
    # The items in flight as the signal came finished and were committed.
    assert doc["counts"]["failed"] == 0 and doc["counts"]["committed"] >= 2, doc["counts"]
    done = sorted(p.name for p in (tmp_path / "output").iterdir())
    assert len(done) == doc["counts"]["committed"], (done, doc["counts"])


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_prepare_ends_the_run_with_its_code_and_a_report(
        tmp_path: Path, signum: int, code: int) -> None:
    # The run's handlers come after prepare: SIGTERM killed mpipe with no report
    # (and was lost as PID 1), SIGINT gave 130 with no report.
    make_inputs(tmp_path, 2)
    cfg = notes_config(tmp_path, tasks=2, repeat=0,
                       extra="prepare: {fn: tests.faults.stages:prepare_that_waits}\n")
    proc = start_mpipe("run", cfg)
    wait_for(lambda: (tmp_path / "preparing").exists())
    _stops_before_any_item(proc, tmp_path, signum, code)


def _stops_before_any_item(proc: subprocess.Popen[str], workdir: Path, signum: int,
                           code: int) -> None:
    """Send ``signum``: the run ends at once with ``code`` and a not_started report."""
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert time.monotonic() - sent < 10
    assert f"interrupted by {signal.Signals(signum).name}" in err, err
    doc = report(workdir)
    assert doc["exit_code"] == code and doc["status"] == "not_started"


@pytest.mark.parametrize("prepare", ["prepare_that_swallows_everything",
                                     "prepare_that_rewraps_everything"])
def test_a_signal_a_prepare_swallowed_still_stops_the_run(tmp_path: Path,
                                                          prepare: str) -> None:
    # The handler raises into prepare once; a prepare that catches everything
    # went on, and so did the run, as if no signal had come; one that turned
    # it into its own error broke the run (exit 3) instead of stopping it.
    make_inputs(tmp_path, 2)
    cfg = notes_config(tmp_path, tasks=2, repeat=0, extra=(
        f"prepare: {{fn: tests.faults.stages:{prepare}}}\n"))
    proc = start_mpipe("run", cfg)
    wait_for(lambda: (tmp_path / "preparing").exists())
    _stops_before_any_item(proc, tmp_path, signal.SIGTERM, 143)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_the_leftover_walk_ends_the_run_with_its_code_and_a_report(
        tmp_path: Path, signum: int, code: int) -> None:
    # The handlers came after the workdir's leftover walk (seconds on a large
    # workdir): SIGTERM killed mpipe with no report (and was lost as PID 1).
    # The clean-exit mark as a FIFO holds the runner there: reading it blocks.
    make_inputs(tmp_path, 2)
    cfg = notes_config(tmp_path, tasks=2, repeat=0)
    (tmp_path / ".mpipe").mkdir()
    os.mkfifo(tmp_path / ".mpipe" / "clean-exit")
    proc = start_mpipe("run", cfg)
    wait_for(lambda: (tmp_path / ".mpipe" / "lock").exists() and proc.poll() is None)
    time.sleep(1.0)  # into the open() of the FIFO
    assert proc.poll() is None
    _stops_before_any_item(proc, tmp_path, signum, code)


def test_runner_killed_leaves_no_worker(tmp_path: Path) -> None:
    make_inputs(tmp_path, 4)
    cfg = notes_config(tmp_path, tasks=4, repeat=0, workers=3, fn=SLEEPY)
    proc = start_mpipe("run", cfg, "--log-level", "INFO", env={"MPIPE_TEST_SLEEP_S": "60"})
    _wait_until_up(proc)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 5  # 3 workers, consumer, writer, producer, forkserver...
    proc.kill()
    proc.communicate(timeout=10)
    # They notice their lifeline break and exit on their own, promptly.
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.pid for p in alive]


def test_sigterm_as_pid_1_in_a_container(tmp_path: Path) -> None:
    probe = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    make_inputs(tmp_path, 6)
    cfg = notes_config(tmp_path, tasks=6, repeat=0, workers=2, fn=SLEEPY)
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "mpipe", "run",
         str(cfg)],
        env={**os.environ, "PYTHONPATH": str(REPO), "MPIPE_TEST_SLEEP_S": "0.6"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    wait_for(lambda: first_output(tmp_path))
    [runner] = psutil.Process(proc.pid).children()  # PID 1 inside the namespace
    with open(f"/proc/{runner.pid}/status") as f:
        nspid = [line.split()[-1] for line in f if line.startswith("NSpid:")]
    assert nspid == ["1"], nspid
    os.kill(runner.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert report(tmp_path)["status"] == "interrupted"


def test_items_a_worker_held_when_it_died_during_the_grace_are_counted_not_started(
        tmp_path: Path) -> None:
    # Quick items: each worker holds many (prefetch).  One dies during the
    # grace; its unstarted items, and the retry of the one it ran, went back
    # to the first queue, which takes nothing once stopping: never run, and
    # missing from every count (31 of 2000 in a reviewer's run).
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(
        "pipeline: notes\nworkdir: .\nparams: {n: 2000}\n"
        "source: {fn: tests.result_stages:numbers}\n"
        "stages:\n  quick: {fn: tests.faults.stages:quick_but_300_dies_late, workers: 2}\n"
        "consumer: {fn: tests.result_stages:total}\nwriter: {path: results.h5}\n"
        "allowed_modules: [tests.result_stages, tests.faults.stages]\nfsync: false\n")
    mark = tmp_path / "300-started"
    proc = start_mpipe("run", cfg, "--log-level", "INFO", cwd=tmp_path,
                       env={"MPIPE_TEST_MARK": str(mark)})
    wait_for(mark.exists)  # item 300 is asleep, its worker holding prefetched items
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "while running item 300" in err, err
    counts = report(tmp_path)["counts"]
    assert counts["not_started"] > 0, counts
    assert counts["produced"] == (counts["committed"] + counts["skipped"] + counts["failed"]
                                  + counts["not_started"]), counts


def test_a_hard_stop_counts_the_items_still_on_their_way_to_the_writer(
        tmp_path: Path) -> None:
    # Items done by their stage but not yet committed (the consumer is slow)
    # were counted nowhere when a second signal stopped the run at once.
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(
        "pipeline: notes\nworkdir: .\nparams: {n: 6}\n"
        "source: {fn: tests.result_stages:numbers_replays_last}\n"
        "stages:\n  quick: {fn: tests.result_stages:as_float, workers: 2}\n"
        "consumer: {fn: tests.faults.stages:consumer_slow}\nwriter: {path: results.h5}\n"
        "allowed_modules: [tests.result_stages, tests.faults.stages]\nfsync: false\n")
    # Three items committed first: the next run replays them too (skipped).
    first = mpipe("run", cfg, "--limit", "3", "--set", "consumer.fn=tests.result_stages:total",
                  cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # Now the new items first; the replays 1.5 s later, to a consumer still
    # folding the first value (2 s each): they wait on their way to the writer.
    mark = tmp_path / "replays-yielded"
    proc = start_mpipe("run", cfg, "--log-level", "INFO", cwd=tmp_path,
                       env={"MPIPE_TEST_REPLAYS_LAST": "1", "MPIPE_TEST_MARK": str(mark)})
    wait_for(mark.exists)
    time.sleep(0.3)  # the runner moves them to the sink: the consumer is still folding
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "second signal: stopping at once" in err, err
    counts = report(tmp_path)["counts"]
    assert (counts["produced"], counts["skipped"]) == (6, 3), counts
    # The replayed ones count as skipped only, not also as not started.
    assert counts["produced"] == (counts["committed"] + counts["skipped"] + counts["failed"]
                                  + counts["not_started"]), counts
