"""Dead, stuck and misbehaving workers: detected, retried, reported; others go on."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import check_against_reference, make_inputs, mpipe, notes_config, start_mpipe

FAULT_FN = "tests.faults.stages:notes_with_fault"


def _started_pid(proc: subprocess.Popen[str], name: str) -> int:
    """The pid of child ``name``, read from the runner's INFO log as it starts."""
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(rf"started {re.escape(name)} \(pid (\d+)\)", line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"the run ended before it started {name}")


def report(workdir: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((workdir / ".mpipe/notes/last-run.json").read_text())


def fault_run(tmp_path: Path, fault: str, *, times: int | None = None, retries: int = 2,
              timeout_s: float | None = None, tasks: int = 3,
              extra: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    make_inputs(tmp_path, tasks)
    stage_extra = f"retries: {retries}\n" + (f"timeout_s: {timeout_s}\n" if timeout_s else "")
    cfg = notes_config(tmp_path, tasks=tasks, repeat=0, workers=2, fn=FAULT_FN,
                       stage_extra=stage_extra)
    args = ["--set", f"params.fault={fault}", "--set", "params.fault_key=t001"]
    if times is not None:
        args += ["--set", f"params.fault_times={times}"]
    return mpipe("run", cfg, *args, *extra)


DEATHS = {
    "sigkill": r"killed by SIGKILL.*out of memory",
    "segfault": r"SIGSEGV",
    "exit": r"exited with code 3",
    "systemexit": r"SystemExit",
    "keyboard": r"KeyboardInterrupt",
}


@pytest.mark.parametrize("fault", list(DEATHS))
def test_worker_death_is_retried_on_a_fresh_worker(tmp_path: Path, fault: str) -> None:
    proc = fault_run(tmp_path, fault, times=1)
    assert proc.returncode == 0, proc.stderr
    check_against_reference(tmp_path, 3, 0)
    stats = report(tmp_path)["stages"]["compute"]
    assert stats["retries"] == 1


@pytest.mark.parametrize("fault", list(DEATHS))
def test_worker_death_fails_the_item_with_its_cause(tmp_path: Path, fault: str) -> None:
    proc = fault_run(tmp_path, fault, retries=1)
    assert proc.returncode == 1, proc.stderr
    doc = report(tmp_path)
    [failure] = doc["failures"]
    assert failure["key"] == "t001" and failure["stage"] == "compute"
    assert re.search(DEATHS[fault], failure["message"]), failure["message"]
    assert doc["stages"]["compute"]["retries"] == 1
    assert doc["counts"]["committed"] == 2
    check_against_reference(tmp_path, 3, 0, expect_tasks=[0, 2])


def test_a_failed_run_whose_extra_report_cannot_be_written_says_so_after_its_error(
        tmp_path: Path) -> None:
    in_the_way = tmp_path / "reports"
    in_the_way.write_text("a file where --report needs a directory\n")
    proc = fault_run(tmp_path, "raise", retries=0,
                     extra=("--report", str(in_the_way / "run.json")))
    assert proc.returncode == 1, proc.stderr  # the items' failure, not the report's (74)
    lines = proc.stderr.splitlines()
    assert [line for line in lines if line.startswith("mpipe: error:")] == [
        f"mpipe: error: 1 of 3 items failed; details in {tmp_path / '.mpipe/notes/last-run.json'}"
    ], proc.stderr
    assert lines[-1].startswith(f"  also: cannot write the report {in_the_way / 'run.json'}: ")
    assert report(tmp_path)["exit_code"] == 1  # the default report was written


def test_hung_item_is_killed_at_timeout_and_retried(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = fault_run(tmp_path, "hang", times=1, timeout_s=2)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 30
    check_against_reference(tmp_path, 3, 0)
    assert report(tmp_path)["stages"]["compute"]["timeouts"] == 1


def test_timeout_s_counts_from_the_item_not_from_a_fresh_workers_imports(
        tmp_path: Path) -> None:
    # The stage module takes 1.5 s to import, timeout_s is 1 s, items take no
    # time.  Item 0 kills its first worker: before, its retry and every item
    # after it were sent to the fresh worker while it imported, timed out
    # there, and so on until every item had failed "past timeout_s".
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(textwrap.dedent("""\
        pipeline: slow-import
        workdir: .
        source: {fn: tests.faults.slow_import:numbers}
        stages:
          s: {fn: tests.faults.slow_import:quick_but_crashes_once, workers: 1,
              timeout_s: 1.0, retries: 2}
        writer: {path: results.h5}
        allowed_modules: [tests.faults]
        fsync: false
        """))
    proc = mpipe("run", cfg, "--quiet", cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / ".mpipe/slow-import/last-run.json").read_text())
    assert doc["counts"]["committed"] == 4
    assert doc["stages"]["s"]["timeouts"] == 0 and doc["stages"]["s"]["deaths"] == 1


def test_hung_item_fails_for_good_after_retries(tmp_path: Path) -> None:
    proc = fault_run(tmp_path, "hang", retries=1, timeout_s=1.5)
    assert proc.returncode == 1, proc.stderr
    [failure] = report(tmp_path)["failures"]
    assert failure["kind"] == "timeout" and "timeout_s=1.5" in failure["message"]
    check_against_reference(tmp_path, 3, 0, expect_tasks=[0, 2])


def test_a_worker_killed_while_it_checks_for_a_stop_never_wedges_the_run(
        tmp_path: Path) -> None:
    # With a multiprocessing.Event, a worker killed inside is_set() kept its
    # lock for good, and the runner's own next is_set() never returned.
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0, workers=1,
                       fn="tests.faults.stages:polls_stop",
                       stage_extra="timeout_s: 0.5\nretries: 1\n")
    proc = mpipe("run", cfg, timeout=60)
    assert proc.returncode == 1, proc.stderr
    doc = report(tmp_path)
    assert doc["counts"]["failed"] == 3 and doc["stages"]["compute"]["timeouts"] == 6


def test_unpicklable_result_is_an_item_failure(tmp_path: Path) -> None:
    proc = fault_run(tmp_path, "unpicklable", retries=0)
    assert proc.returncode == 1, proc.stderr
    [failure] = report(tmp_path)["failures"]
    assert failure["kind"] == "pickle" and "cannot be pickled" in failure["message"]
    check_against_reference(tmp_path, 3, 0, expect_tasks=[0, 2])


def test_unpicklable_source_value_is_an_item_failure(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0)
    proc = mpipe("run", cfg, "--set", "source.fn=tests.faults.stages:source_with_unpicklable")
    assert proc.returncode == 1, proc.stderr
    [failure] = report(tmp_path)["failures"]
    assert failure["key"] == "t001" and failure["stage"] == "source"
    assert "cannot be pickled" in failure["message"]
    check_against_reference(tmp_path, 3, 0, expect_tasks=[0, 2])


def test_source_that_raises_breaks_the_run_but_keeps_its_items(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0)
    proc = mpipe("run", cfg, "--set", "source.fn=tests.faults.stages:raising_source")
    assert proc.returncode == 3, proc.stderr
    assert "the source broke" in proc.stderr
    assert report(tmp_path)["counts"]["committed"] == 2
    # Not sealed: the writer's temporary results file is removed, not left
    # for the next run to find (or, beside a writer.path outside the workdir,
    # for no run to find).
    assert not list(tmp_path.glob("results.h5.mpipe-tmp-*")), list(tmp_path.iterdir())


def test_consumer_killed_ends_the_run_promptly(tmp_path: Path) -> None:
    make_inputs(tmp_path, 4)
    cfg = notes_config(tmp_path, tasks=4, repeat=0, workers=2)
    start = time.monotonic()
    proc = mpipe("run", cfg, "--set", "consumer.fn=tests.faults.stages:consumer_killed_after",
                 "--set", "params.consumer_dies_after=1")
    assert proc.returncode == 3, proc.stderr
    assert "consumer" in proc.stderr and "SIGKILL" in proc.stderr
    assert time.monotonic() - start < 30
    assert report(tmp_path)["status"] == "broken"


def test_consumer_that_raises_is_reported_and_finished_items_commit(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0)
    proc = mpipe("run", cfg, "--set", "consumer.fn=tests.faults.stages:consumer_raising")
    assert proc.returncode == 3, proc.stderr
    assert "the consumer broke" in proc.stderr
    # Items are forwarded to the writer before the fold sees them.
    again = mpipe("run", cfg)
    assert again.returncode == 0, again.stderr
    assert report(tmp_path)["counts"]["skipped"] >= 1
    check_against_reference(tmp_path, 3, 0)


def test_writer_killed_ends_the_run_promptly(tmp_path: Path) -> None:
    make_inputs(tmp_path, 6)
    cfg = notes_config(tmp_path, tasks=6, repeat=0, workers=2, fn="tests.faults.stages:sleepy")
    proc = start_mpipe("run", cfg, "--log-level", "INFO", env={"MPIPE_TEST_SLEEP_S": "1"})
    os.kill(_started_pid(proc, "writer"), signal.SIGKILL)
    start = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "writer" in err and "SIGKILL" in err
    assert time.monotonic() - start < 30


def test_seal_process_killed_mid_run_is_replaced_and_the_run_completes(tmp_path: Path) -> None:
    # writer-seal waits from the start of the run; if something kills it (the
    # OOM killer), the results file must still be sealed at the end.
    make_inputs(tmp_path, 4)
    cfg = notes_config(tmp_path, tasks=4, repeat=0, workers=2, fn="tests.faults.stages:sleepy")
    proc = start_mpipe("run", cfg, "--log-level", "INFO", env={"MPIPE_TEST_SLEEP_S": "1"})
    os.kill(_started_pid(proc, "writer-seal"), signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "the writer-seal process was killed by SIGKILL" in err, err
    assert "starting another" in err
    check_against_reference(tmp_path, 4, 0)


def test_workers_that_die_at_start_stop_the_run(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0, fn="tests.faults.startup_crash:process")
    start = time.monotonic()
    mark = tmp_path / "startup-crash-imported"
    proc = mpipe("run", cfg, env={"STARTUP_CRASH_MARK": str(mark)})
    assert mark.exists()  # the name check imported it
    assert proc.returncode == 3, proc.stderr
    assert "5 workers in a row died without finishing an item" in proc.stderr
    assert time.monotonic() - start < 60
