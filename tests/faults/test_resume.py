"""Kill the run at any moment; the same command resumes it to identical outputs."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import h5py
import numpy as np

from tests.conftest import check_against_reference, make_inputs, mpipe, notes_config, start_mpipe

TASKS = 6


def report(workdir: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((workdir / ".mpipe/notes/last-run.json").read_text())


def datasets(path: Path) -> dict[str, bytes]:
    with h5py.File(path, "r") as f:
        out = {}
        for name in f:
            data = np.asarray(f[name][:])
            # Variable-length strings come back as objects: compare their values.
            out[name] = repr(data.tolist()).encode() if data.dtype.kind == "O" else data.tobytes()
        return out


def test_sigkill_at_random_moments_then_resume_gives_identical_outputs(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    make_inputs(clean, TASKS)
    proc = mpipe("run", notes_config(clean, tasks=TASKS, repeat=1, workers=2))
    assert proc.returncode == 0, proc.stderr

    work = tmp_path / "killed"
    work.mkdir()
    make_inputs(work, TASKS)
    cfg = notes_config(work, tasks=TASKS, repeat=1, workers=2)
    rng = random.Random(20261127)
    kills, fresh = 0, False
    while kills < 10:
        run = start_mpipe("run", cfg, *(["--fresh"] if fresh else []))
        time.sleep(rng.uniform(0.05, 1.2))
        if run.poll() is not None:
            run.communicate()
            assert run.returncode == 0
            fresh = True  # it finished first: start over so there is work to kill
            continue
        os.kill(run.pid, signal.SIGKILL)
        run.communicate(timeout=10)
        kills, fresh = kills + 1, False
        # Whatever the moment, a results file, if there is one, is readable.
        if (work / "results.h5").exists():
            datasets(work / "results.h5")
    assert kills >= 10
    final = mpipe("run", cfg)
    assert final.returncode == 0, final.stderr
    check_against_reference(work, TASKS, 1)
    assert datasets(work / "results.h5") == datasets(clean / "results.h5")
    leftovers = [p for p in work.rglob("*") if ".mpipe-tmp-" in p.name or ".mpipe-old-" in p.name]
    assert not leftovers


def test_finished_items_are_not_redone_unless_fresh(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0)
    assert mpipe("run", cfg).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "output").rglob("*.npy")}
    again = mpipe("run", cfg)
    assert again.returncode == 0, again.stderr
    assert report(tmp_path)["counts"] == {"produced": 3, "committed": 0, "skipped": 3,
                                          "failed": 0, "not_started": 0}
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "output").rglob("*.npy")}
    check_against_reference(tmp_path, 3, 0)
    # Worker counts are not part of an item's identity; params are.
    assert mpipe("run", cfg, "--set", "stages.compute.workers=1").returncode == 0
    assert report(tmp_path)["counts"]["skipped"] == 3
    assert mpipe("run", cfg, "--fresh").returncode == 0
    assert report(tmp_path)["counts"]["committed"] == 3
    assert mpipe("run", cfg, "--set", "params.repeat=1").returncode == 0
    assert report(tmp_path)["counts"]["committed"] == 3
    check_against_reference(tmp_path, 3, 1)


def test_item_whose_input_changed_is_redone(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0)
    assert mpipe("run", cfg).returncode == 0
    changed = tmp_path / "input/t001/ch05.npy"
    data = changed.read_bytes()
    changed.unlink()  # a hard link to the shared cache: replace, never write into it
    changed.write_bytes(data)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert mpipe("run", cfg).returncode == 0
    counts = report(tmp_path)["counts"]
    assert counts["committed"] == 1 and counts["skipped"] == 2
    # A deleted output also makes its item redo.
    for f in (tmp_path / "output/t002").iterdir():
        f.unlink()
    (tmp_path / "output/t002").rmdir()
    assert mpipe("run", cfg).returncode == 0
    assert report(tmp_path)["counts"]["committed"] == 1
    check_against_reference(tmp_path, 3, 0)


def test_second_run_on_the_same_workdir_exits_75(tmp_path: Path) -> None:
    make_inputs(tmp_path, 4)
    cfg = notes_config(tmp_path, tasks=4, repeat=0, fn="tests.faults.stages:sleepy")
    first = start_mpipe("run", cfg, "--log-level", "INFO", env={"MPIPE_TEST_SLEEP_S": "1"})
    assert first.stderr is not None
    for line in first.stderr:
        if "processes are up" in line:
            break
    start = time.monotonic()
    second = mpipe("run", cfg, "--report", tmp_path / "second.json")
    assert second.returncode == 75, second.stderr
    assert "another mpipe run" in second.stderr and str(first.pid) in second.stderr
    assert time.monotonic() - start < 5
    doc = json.loads((tmp_path / "second.json").read_text())
    assert doc["status"] == "not_started" and doc["exit_code"] == 75
    first.communicate(timeout=60)
    assert first.returncode == 0


def test_lock_of_a_killed_run_does_not_block(tmp_path: Path) -> None:
    make_inputs(tmp_path, 4)
    cfg = notes_config(tmp_path, tasks=4, repeat=0, fn="tests.faults.stages:sleepy")
    first = start_mpipe("run", cfg, "--log-level", "INFO", env={"MPIPE_TEST_SLEEP_S": "5"})
    assert first.stderr is not None
    for line in first.stderr:
        if "processes are up" in line:
            break
    first.kill()
    first.communicate(timeout=10)
    assert (tmp_path / ".mpipe/lock").exists()
    again = mpipe("run", cfg, env={"MPIPE_TEST_SLEEP_S": "0"})
    assert again.returncode == 0, again.stderr
    check_against_reference(tmp_path, 4, 0)


STAGES_V1 = """\
def numbers(ctx):
    return [1.0, 2.0, 3.0]


def scale(value):
    return value * 2.0
"""


def test_items_are_redone_when_their_stage_code_changed(tmp_path: Path) -> None:
    # The fix of a bug in a stage must not be skipped as "done" on the next run
    # (joblib's Memory, Snakemake and DVC rerun on changed code too).
    module = tmp_path / "scaling.py"
    module.write_text(STAGES_V1)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("pipeline: scaled\nworkdir: .\nsource: {fn: scaling:numbers}\n"
                   "stages:\n  scale: {fn: scaling:scale, workers: 2}\n")

    def results() -> list[float]:
        with h5py.File(tmp_path / "results.h5", "r") as f:
            return [float(v) for v in f["results"][:]]

    def counts() -> dict[str, int]:
        doc = json.loads((tmp_path / ".mpipe/scaled/last-run.json").read_text())
        return {k: doc["counts"][k] for k in ("committed", "skipped")}

    first = mpipe("run", cfg, "--quiet")
    assert first.returncode == 0, first.stderr
    assert results() == [v * 2.0 for v in (1.0, 2.0, 3.0)]
    # A different size too: a rewrite within the same second at the same size
    # would run from the stale .pyc (Python checks mtime in seconds and size).
    module.write_text(STAGES_V1.replace("value * 2.0", "value * 3.25"))
    plan = mpipe("plan", cfg, "--items")
    assert "a run would skip 0" in plan.stdout, plan.stdout
    second = mpipe("run", cfg, "--quiet")
    assert second.returncode == 0, second.stderr
    assert counts() == {"committed": 3, "skipped": 0}
    assert results() == [v * 3.25 for v in (1.0, 2.0, 3.0)]
    third = mpipe("run", cfg, "--quiet")  # unchanged since: nothing to redo
    assert third.returncode == 0, third.stderr
    assert counts() == {"committed": 0, "skipped": 3}
    assert results() == [v * 3.25 for v in (1.0, 2.0, 3.0)]
    plan = mpipe("plan", cfg, "--items")  # plan agrees with run
    assert "a run would skip 3" in plan.stdout, plan.stdout
