"""The sealer `mpipe run` starts during the name check (mpipe.sealer).

It is started before the run knows whether it will start at all (unless the
config has a prepare): whatever stops the run before it gets going must stop
the sealer too, before mpipe exits (not moments later, through its lifeline),
and a run must still be sealed by it, or by a replacement if it was killed
while waiting.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, check_against_reference, make_inputs, mpipe, notes_config


def _sealers_alive() -> list[int]:
    # pytest is a child subreaper (conftest): a sealer outliving mpipe would be
    # re-parented here.  Only sealers: the forkserver and the resource tracker
    # exit moments after mpipe, by design.
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name() == "mpipe-writer-se" and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
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
    # Output to files, not pipes: a pipe's reader would wait for every process
    # that holds it (the sealer too), and so could not see one outlive mpipe.
    log = tmp_path / "stderr.txt"
    try:
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "mpipe", "run", str(cfg),
                                     "--log-level", "INFO"],
                                    stdout=subprocess.DEVNULL, stderr=err,
                                    env={**os.environ, "PYTHONPATH": str(REPO)})
            code = proc.wait(timeout=100)
        left = _sealers_alive()  # at once: not after a lifeline had time to work
    finally:
        if held is not None:
            os.close(held)
    stderr = log.read_text()
    expected = {"a misspelt stage": 2, "a locked workdir": 75, "a raising prepare": 3}[case]
    assert code == expected, stderr
    assert not left, left
    if case == "a raising prepare":
        # With a prepare the sealer starts with the run, after it (mpipe.sealer).
        assert "started writer-seal" not in stderr, stderr
    else:
        assert "started writer-seal" in stderr, stderr
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

