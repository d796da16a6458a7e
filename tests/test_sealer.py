"""The sealer `mpipe run` starts during the name check (mpipe.sealer).

It is started before the run knows whether it will start at all: whatever
stops the run before it gets going must stop the sealer too, before mpipe
exits (not moments later, through its lifeline), and a run must still be
sealed by it, or by a replacement if it was killed while waiting.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import psutil
import pytest

from tests.conftest import check_against_reference, make_inputs, mpipe, notes_config


def _descendants_alive() -> list[str]:
    # pytest is a child subreaper (conftest): a sealer outliving mpipe would be
    # re-parented here.
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"pid {p.pid}: {' '.join(p.cmdline())[:100]}")
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("case", ["a misspelt stage", "a locked workdir", "a raising prepare"])
def test_a_run_that_never_starts_stops_its_sealer_before_it_exits(tmp_path: Path,
                                                                     case: str) -> None:
    make_inputs(tmp_path, 2)
    fn = "mpipe.workloads.notes:process_task"
    extra = ""
    if case == "a misspelt stage":
        fn = "mpipe.workloads.notes:process_tsak"
    elif case == "a raising prepare":
        extra = "prepare: {fn: tests.faults.stages:prepare_that_raises}\n"
    cfg = notes_config(tmp_path, tasks=2, repeat=0, fn=fn, extra=extra)
    held = None
    if case == "a locked workdir":
        (tmp_path / ".mpipe").mkdir()
        held = os.open(tmp_path / ".mpipe/lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(held, fcntl.LOCK_EX)
    try:
        proc = mpipe("run", cfg, "--log-level", "INFO")
        left = _descendants_alive()  # at once: no grace for a lifeline to work
    finally:
        if held is not None:
            os.close(held)
    expected = {"a misspelt stage": 2, "a locked workdir": 75, "a raising prepare": 3}[case]
    assert proc.returncode == expected, proc.stderr
    assert not left, left
    # It was started, and told to exit: it never touched the results.
    if case != "a misspelt stage" or "started writer-seal" in proc.stderr:
        assert "started writer-seal" in proc.stderr, proc.stderr
    assert not (tmp_path / "results.h5").exists()
    assert not list(tmp_path.glob("results.h5.mpipe-tmp-*"))


def test_a_sealer_killed_while_it_waits_is_replaced(tmp_path: Path) -> None:
    make_inputs(tmp_path, 4)
    cfg = notes_config(tmp_path, tasks=4, repeat=0, fn="tests.faults.stages:kill_the_sealer")
    proc = mpipe("run", cfg, "--log-level", "INFO")
    assert proc.returncode == 0, proc.stderr
    assert "the writer-seal process was killed by SIGKILL" in proc.stderr, proc.stderr
    assert "starting another" in proc.stderr, proc.stderr
    assert proc.stderr.count("started writer-seal") == 2, proc.stderr
    check_against_reference(tmp_path, 4, 0)

