"""The core promise: any worker count gives the serial computation's results."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpipe import messages
from mpipe.forkserver import NATIVE_THREAD_VARS
from tests.conftest import REPO, check_against_reference, make_inputs, mpipe, notes_config


@pytest.mark.parametrize("workers", [1, 2, 4, 5, 10])
def test_results_equal_serial_reference(tmp_path: Path, workers: int) -> None:
    make_inputs(tmp_path, 5)
    cfg = notes_config(tmp_path, tasks=5, workers=workers)
    proc = mpipe("run", cfg)
    assert proc.returncode == 0, proc.stderr
    check_against_reference(tmp_path, 5, 1)
    report = json.loads((tmp_path / ".mpipe/notes/last-run.json").read_text())
    assert report["counts"] == {"produced": 5, "committed": 5, "skipped": 0, "failed": 0,
                                "not_started": 0}
    # The libraries' versions as the sealer loaded them: the runner never imports numpy.
    assert report["versions"]["numpy"] == np.__version__
    assert report["versions"]["h5py"] == h5py.__version__
    with h5py.File(tmp_path / "results.h5") as f:
        assert json.loads(f.attrs["config"])["stages"]["compute"]["workers"] == workers
        assert json.loads(f.attrs["versions"])["numpy"] == np.__version__
        assert "hdf5" in json.loads(f.attrs["versions"])
        timings = json.loads(f.attrs["timings"])
        assert timings["wall_s"] > 0 and timings["stages"]["compute"]["done"] == 5


def test_io_only_variant_and_more_workers_than_cores(tmp_path: Path) -> None:
    make_inputs(tmp_path, 4)
    cfg = notes_config(tmp_path, tasks=4, repeat=0, workers=6,
                       extra="cpu_slots: 1\n", stage_extra="io_slots: 1\n")
    proc = mpipe("run", cfg, "--log-level", "INFO")
    assert proc.returncode == 0, proc.stderr
    check_against_reference(tmp_path, 4, 0)
    # Nothing left to hand out once the 4 items are dispatched; the last round
    # (with cpu_slots 1: the last item) may use every worker.
    assert "last wave: cpu_slots lifted for 5 more worker(s)" in proc.stderr


def test_cpu_slots_lifted_only_for_the_last_round(tmp_path: Path) -> None:
    # 6 items on 6 workers and 2 cpu_slots: all are handed out at once, but
    # lifting the bound then would put 6 computations on 2 cores; it waits
    # until fewer than two rounds (< 4 items) are left.  repeat=1: each item
    # computes long enough, 2 at a time, that they finish a pair at a time and
    # the runner sees the count pass 3 (it logs the count when it lifts).
    make_inputs(tmp_path, 6)
    cfg = notes_config(tmp_path, tasks=6, repeat=1, workers=6, extra="cpu_slots: 2\n")
    proc = mpipe("run", cfg, "--log-level", "INFO")
    assert proc.returncode == 0, proc.stderr
    check_against_reference(tmp_path, 6, 1)
    [line] = [ln for ln in proc.stderr.splitlines() if "cpu_slots lifted" in ln]
    left = int(line.split("worker(s), ")[1].split()[0])
    assert 1 <= left <= 3, line


def test_two_writers_take_turns_under_the_lock(tmp_path: Path) -> None:
    make_inputs(tmp_path, 6)
    cfg = notes_config(tmp_path, tasks=6, repeat=0, workers=3)
    proc = mpipe("run", cfg, "--log-level", "INFO", "--set", "writer.workers=2",
                 "--set", "writer.queue_size=2")
    assert proc.returncode == 0, proc.stderr
    assert "started writer-1" in proc.stderr and "started writer-2" in proc.stderr
    check_against_reference(tmp_path, 6, 0)


@pytest.mark.parametrize("tasks", [0, 1])
def test_zero_and_one_task(tmp_path: Path, tasks: int) -> None:
    make_inputs(tmp_path, tasks)
    cfg = notes_config(tmp_path, tasks=tasks, workers=3)
    proc = mpipe("run", cfg)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "results.h5") as f:
        if tasks:
            check_against_reference(tmp_path, 1, 1)
        else:
            assert "results" not in f
            np.testing.assert_array_equal(f["total"][:], np.zeros(26))
            assert json.loads(f.attrs["counts"])["produced"] == 0


def test_set_overrides_any_value_by_dotted_path(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=1, workers=1)
    proc = mpipe("run", cfg, "--set", "params.tasks=3", "--set", "stages.compute.workers=2")
    assert proc.returncode == 0, proc.stderr
    check_against_reference(tmp_path, 3, 1)
    report = json.loads((tmp_path / ".mpipe/notes/last-run.json").read_text())
    assert report["stages"]["compute"]["workers"] == 2


def test_stage_error_names_stage_item_worker_and_others_go_on(tmp_path: Path) -> None:
    make_inputs(tmp_path, 4)
    cfg = notes_config(tmp_path, tasks=4, fn="tests.faults.stages:notes_with_fault")
    proc = mpipe("run", cfg, "--set", "params.fault=raise", "--set", "params.fault_key=t002")
    assert proc.returncode == 1, proc.stderr
    assert "t002" in proc.stdout and "compute" in proc.stdout
    report = json.loads((tmp_path / ".mpipe/notes/last-run.json").read_text())
    [failure] = report["failures"]
    assert failure["key"] == "t002" and failure["stage"] == "compute"
    assert failure["worker"].startswith("compute-")
    assert "InjectedFault" in failure["message"] and "Traceback" in failure["traceback"]
    # The log shows where in the user's code: the stage's first failure's traceback.
    assert 'faults/stages.py", line' in proc.stderr and "in inject" in proc.stderr, proc.stderr
    check_against_reference(tmp_path, 4, 1, expect_tasks=[0, 1, 3])


def test_every_message_type_pickles() -> None:
    failure = messages.ItemFailure(1, "k", "s", "w", "raised", "m", "tb", None)
    samples = [
        messages.Task("k", {"t": 1}, ("a",), ("b",)),
        messages.SourceItem(0, "k", "fp", b"v"),
        messages.SkippedItem(0, "k", "fp", b"v"),
        messages.SourceBatch((messages.SourceItem(0, "k", "fp", b"v"),
                              messages.SkippedItem(1, "j", "fp", b"v"))),
        messages.SourceFailed("m", "tb"),
        messages.EndOfStream("producer"),
        messages.WorkItem(0, "k", 1, b"v"),
        messages.WorkerReady(123),
        messages.WorkBatch((messages.WorkItem(0, "k", 1, b"v"),)),
        messages.ReplyBatch((failure,)),
        messages.ItemDone(0, "k", "w", b"v", 1.0, 0.5, 0.1),
        failure,
        messages.SinkItem(0, "k", "fp", b"v", False),
        messages.SinkBatch((messages.SinkItem(0, "k", "fp", b"v", True),)),
        messages.Committed(("k",), 0, (failure,)),
        messages.ConsumerDone(b"v"),
        messages.ProcessFailed("writer", "m", "tb", 74),
        messages.Sealed({"numpy": "2.4.6", "h5py": "3.16.0", "hdf5": "1.14.6"}),
        messages.Shutdown(),
    ]
    names = {type(m).__name__ for m in samples}
    public = {n for n, v in vars(messages).items()
              if isinstance(v, type) and v.__module__ == messages.__name__}
    assert names == public, f"untested message types: {public - names}"
    for m in samples:
        copy = pickle.loads(pickle.dumps(m))
        assert copy == m and type(copy) is type(m)


def _source_run(tmp_path: Path, params: str, extra: str = "") -> tuple[list[float], list[float]]:
    """Run tests.source_stages; return (yield times, stage start times) by item."""
    cfg = tmp_path / "source.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        pipeline: source-batches
        workdir: .
        params: {params}
        source: {{fn: tests.source_stages:logged, queue_size: 4}}
        stages:
          s: {{fn: tests.source_stages:started_at, workers: 1, queue_size: 2}}
        allowed_modules: [tests.source_stages]
        fsync: false
        {extra}"""))
    result = mpipe("run", cfg, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    yields = [float(line.split()[1])
              for line in (tmp_path / "yields.log").read_text().splitlines()]
    with h5py.File(tmp_path / "results.h5") as f:
        starts = [float(v) for v in f["results"][:]]
    assert len(starts) == len(yields)
    return yields, starts


def test_a_slow_sources_items_are_not_held_back_for_a_batch(tmp_path: Path) -> None:
    # Item 0, then the source takes 3 s for item 1: item 0 must not wait for it.
    yields, starts = _source_run(tmp_path, "{n: 3, pause_after: 0, pause_s: 3.0}")
    assert yields[1] - yields[0] >= 3.0  # the pause happened
    # Item 0 started well before item 1 existed (held back, it would start after).
    assert starts[0] < yields[1] - 1.0, (yields, starts)


def test_limit_never_asks_the_source_for_one_more_item(tmp_path: Path) -> None:
    # After its 2nd item this source waits 60 s (a source polling for work): a
    # --limit 2 run must not ask it for a 3rd.
    cfg = tmp_path / "source.yaml"
    cfg.write_text(textwrap.dedent("""\
        pipeline: source-limit
        workdir: .
        params: {n: 5, pause_after: 1, pause_s: 60}
        source: {fn: tests.source_stages:logged}
        stages:
          s: {fn: tests.source_stages:started_at, workers: 1}
        allowed_modules: [tests.source_stages]
        fsync: false
        """))
    proc = mpipe("run", cfg, "--quiet", "--limit", "2", cwd=tmp_path, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "yields.log").read_text().splitlines()) == 2


def test_the_source_runs_ahead_of_the_stages_only_by_the_queue_bounds(tmp_path: Path) -> None:
    # 60 items, a stage of 20 ms with 1 worker: the source could yield all of them
    # at once.  Yielded but not started, with source.queue_size 4 (batches of 2):
    # at most the stage queue (2), the runner's backlog (a batch: 2), the source
    # queue (2 batches: 4), the batch the producer's sender is putting (2), the
    # next one gathering (2) and the item the source holds (1): 13.
    yields, starts = _source_run(tmp_path, "{n: 60, stage_s: 0.02}")
    ahead = [sum(1 for t in yields if t <= began) - (i + 1) for i, began in enumerate(starts)]
    assert max(ahead) <= 13, ahead
    assert max(ahead) >= 6, ahead  # the buffers did fill: the bound was what held it


@pytest.mark.parametrize(("user_env", "expected"), [
    ({}, [1.0] * 5),
    ({"OMP_NUM_THREADS": "3"}, [3.0, 0.0, 0.0, 0.0, 0.0]),
], ids=["default", "user-set"])
def test_workers_run_native_libraries_on_one_thread_unless_told(
    tmp_path: Path, user_env: dict[str, str], expected: list[float]
) -> None:
    # W workers each running OpenBLAS/MKL/OpenMP with one thread per core
    # would oversubscribe the cores W times over; the user who sets any of the
    # variables takes over all of them.  `prepare` runs in the runner, alone,
    # with the user's environment as it is.
    cfg = tmp_path / "threads.yaml"
    cfg.write_text(textwrap.dedent("""\
        pipeline: threads
        workdir: .
        params: {n: 2}
        prepare: {fn: tests.observe_stages:record_native_threads}
        source: {fn: tests.observe_stages:numbers}
        stages:
          probe: {fn: tests.observe_stages:native_threads, workers: 2}
        writer: {path: results.h5}
        allowed_modules: [tests.observe_stages]
        """))
    env = {k: v for k, v in os.environ.items() if k not in NATIVE_THREAD_VARS}
    env.update(user_env, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "mpipe", "run", str(cfg), "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "results.h5") as f:
        rows = f["results"][:]
    assert rows.shape == (2, 5)
    for row in rows:
        assert row.tolist() == expected
    assert json.loads((tmp_path / "prepare-env.json").read_text()) == user_env


def test_the_config_in_the_metadata_is_strict_json() -> None:
    # YAML holds what JSON cannot; the results file's metadata must still
    # parse with a strict reader (jq, json.loads without NaN).
    import datetime
    import math

    from mpipe.state import _as_json

    params = {"day": datetime.date(2026, 11, 28), "at": datetime.datetime(2026, 11, 28, 6, 0),
              "tags": {"b", "a"}, "blob": b"\x00ab", "nan": math.nan, "inf": -math.inf,
              "nested": [{"x": 1.5, 2: None}]}
    text = json.dumps(_as_json(params), allow_nan=False)
    assert json.loads(text) == {"day": "2026-11-28", "at": "2026-11-28T06:00:00",
                                "tags": ["a", "b"], "blob": "\x00ab", "nan": None, "inf": None,
                                "nested": [{"x": 1.5, "2": None}]}
