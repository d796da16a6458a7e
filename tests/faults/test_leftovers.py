"""What a run leaves half-written is removed by the next one; a clean run says
it left nothing, so the next one need not walk the whole workdir
(Runner._remove_leftovers, docs/RELIABILITY.md)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import check_against_reference, make_inputs, mpipe, notes_config, start_mpipe

MARK = ".mpipe/clean-exit"
FAULT_FN = "tests.faults.stages:notes_with_fault"


def _plant(path: Path) -> Path:
    """A temporary file as a killed worker leaves one (mpipe.outputs.tmp_sibling)."""
    leftover = path.with_name(f"{path.name}.mpipe-tmp-4242-0badcafe")
    leftover.write_bytes(b"half")
    return leftover


def test_a_clean_run_marks_the_workdir_and_the_next_run_skips_the_walk(
        tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0)
    assert mpipe("run", cfg).returncode == 0
    assert (tmp_path / MARK).exists()
    deep = _plant(tmp_path / "input/t001/ch03.npy")
    # Reports are written after the lock is released: the state directory is
    # always looked at.
    report_tmp = _plant(tmp_path / ".mpipe/notes/last-run.json")
    again = mpipe("run", cfg, "--fresh")
    assert again.returncode == 0, again.stderr
    assert not report_tmp.exists()
    assert deep.exists()  # not looked for: the last run left nothing behind
    assert (tmp_path / MARK).exists()
    check_against_reference(tmp_path, 3, 0)


@pytest.mark.parametrize("fault", ["sigkill", "hang"])
def test_a_run_with_a_dead_or_killed_worker_leaves_no_mark(tmp_path: Path,
                                                            fault: str) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0, fn=FAULT_FN,
                       stage_extra="retries: 2\ntimeout_s: 2\n")
    (tmp_path / ".mpipe").mkdir()
    (tmp_path / MARK).write_text(repr(time.time()))  # as a clean run before this one left it
    args = ("--set", f"params.fault={fault}", "--set", "params.fault_key=t001",
            "--set", "params.fault_times=1")
    proc = mpipe("run", cfg, *args)
    assert proc.returncode == 0, proc.stderr  # the item was redone on a fresh worker
    assert not (tmp_path / MARK).exists()
    deep = _plant(tmp_path / "output/t001/ch03.npy")
    again = mpipe("run", cfg, *args)  # the fault has fired: it does not again
    assert again.returncode == 0, again.stderr
    assert not deep.exists()
    assert "removed 1 temporary file(s) left by an interrupted run" in again.stderr
    assert (tmp_path / MARK).exists()
    check_against_reference(tmp_path, 3, 0)


def test_an_interrupted_run_leaves_no_mark(tmp_path: Path) -> None:
    make_inputs(tmp_path, 4)
    cfg = notes_config(tmp_path, tasks=4, repeat=0, workers=2,
                       fn="tests.faults.stages:sleepy")
    (tmp_path / ".mpipe").mkdir()
    (tmp_path / MARK).write_text(repr(time.time()))
    proc = start_mpipe("run", cfg, env={"MPIPE_TEST_SLEEP_S": "0.5"})
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("results.h5.mpipe-tmp-*")):  # the first rows are in
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert not (tmp_path / MARK).exists()
    # Not sealed: the run removed its results file itself, once its writer was gone.
    assert not list(tmp_path.glob("results.h5.mpipe-tmp-*"))
    again = mpipe("run", cfg, env={"MPIPE_TEST_SLEEP_S": "0"})
    assert again.returncode == 0, again.stderr
    assert not list(tmp_path.glob("results.h5.mpipe-tmp-*"))
    assert (tmp_path / MARK).exists()
    check_against_reference(tmp_path, 4, 0)


def test_a_worker_exiting_with_an_output_unfinished_leaves_no_mark(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0,
                       fn="tests.faults.stages:leaves_a_writing_thread")
    proc = mpipe("run", cfg)
    assert proc.returncode == 0, proc.stderr
    [straggler] = (tmp_path / "output").glob("straggler.mpipe-tmp-*")
    assert not (tmp_path / MARK).exists()
    again = mpipe("run", notes_config(tmp_path, tasks=3, repeat=0))
    assert again.returncode == 0, again.stderr
    assert not straggler.exists()
    assert (tmp_path / MARK).exists()


def test_a_temporary_that_could_not_be_removed_is_said_and_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # As on NFS, where a file still open leaves a .nfs* entry rmtree cannot remove.
    from mpipe import outputs

    monkeypatch.setattr(outputs, "_unremoved", False)
    monkeypatch.setattr(outputs, "_closing", False)
    # Not this process's (pytest's) threads: what a worker's exit would end.
    monkeypatch.setattr(outputs, "_end_other_threads", lambda: None)
    monkeypatch.setattr(outputs.shutil, "rmtree", lambda *a, **k: None)
    assert not outputs.temporaries_left()
    with pytest.raises(RuntimeError), outputs.atomic_dir(tmp_path / "out", fsync=False):
        raise RuntimeError("the stage failed")
    assert outputs.temporaries_left()
    [left] = tmp_path.glob("out.mpipe-tmp-*")
    assert f"could not remove {left}: the next run looks for it" in caplog.text
    with pytest.raises(SystemExit) as exited:
        outputs.exit_if_temporaries_left()
    assert exited.value.code == outputs.TEMPORARIES_LEFT_EXIT


def test_the_workdir_is_walked_whole_at_least_daily(tmp_path: Path) -> None:
    make_inputs(tmp_path, 2)
    cfg = notes_config(tmp_path, tasks=2, repeat=0)
    (tmp_path / ".mpipe").mkdir()
    (tmp_path / MARK).write_text(repr(time.time() - 2 * 86400))  # walked two days ago
    deep = _plant(tmp_path / "input/t001/ch03.npy")
    proc = mpipe("run", cfg)
    assert proc.returncode == 0, proc.stderr
    assert not deep.exists()
    assert time.time() - float((tmp_path / MARK).read_text()) < 600


def test_a_report_written_into_the_workdir_takes_the_mark_away(tmp_path: Path) -> None:
    # It is written after the lock is released; its temporary is in no
    # directory a run after a clean exit looks at.
    make_inputs(tmp_path, 2)
    cfg = notes_config(tmp_path, tasks=2, repeat=0)
    (tmp_path / "reports").mkdir()
    proc = mpipe("run", cfg, "--report", tmp_path / "reports/run.json")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "reports/run.json").exists()
    assert not (tmp_path / MARK).exists()
    outside = tmp_path.parent / f"{tmp_path.name}-report.json"
    proc = mpipe("run", cfg, "--report", outside)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / MARK).exists()
    outside.unlink()


def test_the_mark_is_never_written_with_a_temporary_left(tmp_path: Path) -> None:
    # A stage's daemon thread keeps opening output directories: as its worker
    # exits it is inside one (no mark) or between two, and then opens no more.
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0,
                       fn="tests.faults.stages:keeps_writing_in_a_thread")
    for _ in range(3):
        proc = mpipe("run", cfg, "--fresh")
        assert proc.returncode == 0, proc.stderr
        left = list((tmp_path / "output/late").glob("*.mpipe-tmp-*"))
        assert not ((tmp_path / MARK).exists() and left), left


def test_a_report_linked_into_the_workdir_keeps_the_mark_away(tmp_path: Path) -> None:
    # Its temporary is made beside the link, in the workdir.
    make_inputs(tmp_path, 2)
    cfg = notes_config(tmp_path, tasks=2, repeat=0)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere.json"
    (tmp_path / "latest.json").symlink_to(elsewhere)
    proc = mpipe("run", cfg, "--report", tmp_path / "latest.json")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / MARK).exists()
    elsewhere.unlink(missing_ok=True)  # the report replaced the link (tmp + rename)


def test_no_output_is_opened_once_the_process_has_decided_its_exit_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stage's daemon thread opening one between the decision and the
    # process's end would be killed in it, under an exit code that says clean.
    from mpipe import outputs

    monkeypatch.setattr(outputs, "_unremoved", False)
    monkeypatch.setattr(outputs, "_closing", False)
    # Not this process's (pytest's) threads: what a worker's exit would end.
    monkeypatch.setattr(outputs, "_end_other_threads", lambda: None)
    outputs.exit_if_temporaries_left()  # nothing open: returns, the exit code is 0
    with pytest.raises(RuntimeError, match="exiting"), \
            outputs.atomic_dir(tmp_path / "late", fsync=False):
        pass
    assert not list(tmp_path.iterdir())
    assert not outputs.temporaries_left()


def test_a_stage_with_a_thread_pool_of_its_own_exits_at_once_and_clean(tmp_path: Path) -> None:
    # Its idle executor threads end at the worker's exit, as at any exit;
    # joining them by hand instead waited for ever (then SIGKILL, no mark).
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0,
                       fn="tests.faults.stages:uses_a_thread_pool")
    proc = mpipe("run", cfg, "--log-level", "INFO", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "SIGKILL" not in proc.stderr and "did not exit" not in proc.stderr, proc.stderr
    assert (tmp_path / MARK).exists()
    check_against_reference(tmp_path, 3, 0)
