"""Nothing a child does at the worst moment holds the runner for ever.

Each of these hung the run (SIGINT and SIGTERM could not end it) before the
fixes named in docs/RELIABILITY.md, "Dead and stuck workers" and "Signals".
"""

from __future__ import annotations

import json
import signal
import textwrap
import time
from pathlib import Path

import h5py
import psutil

from tests.conftest import mpipe, start_mpipe


def _config(workdir: Path, *, params: str, source: str, stage: str, consumer: str = "",
            extra: str = "") -> Path:
    cfg = workdir / "pipeline.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        pipeline: stalls
        workdir: .
        params: {params}
        source: {{fn: tests.faults.stall_stages:{source}}}
        stages:
          s: {{fn: tests.faults.stall_stages:{stage}, workers: 1}}
        writer: {{path: results.h5, queue_size: 4}}
        allowed_modules: [tests.faults]
        fsync: false
        """) + (f"consumer: {{fn: tests.faults.stall_stages:{consumer}}}\n" if consumer else "")
        + extra)
    return cfg


def _child_named(runner: psutil.Process, name: str) -> psutil.Process:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in runner.children(recursive=True):
            try:
                if child.name() == name:
                    return child
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no process named {name}")


def test_a_producer_killed_halfway_through_a_message_ends_the_run(tmp_path: Path) -> None:
    # The runner read the source queue with a blocking get() and held a copy
    # of its write end: a message cut short never ended (3 runs in 4 hung).
    cfg = _config(tmp_path, params="{die_at: 6}", source="big_then_killed", stage="length")
    for _ in range(3):
        proc = mpipe("run", cfg, "--quiet", "--fresh", cwd=tmp_path, timeout=30)
        assert proc.returncode == 3, proc.stderr
        assert "the producer was killed by SIGKILL" in proc.stderr, proc.stderr


def test_a_consumer_killed_while_the_sink_queue_is_full_ends_the_run(tmp_path: Path) -> None:
    # The runner's put of the EndOfStream waited on a full sink queue that
    # nobody would read again.
    cfg = _config(tmp_path, params="{n: 200, item_s: 0.01, per_item_s: 30}",
                  source="numbers", stage="slowly", consumer="slow_total")
    proc = start_mpipe("run", cfg, "--quiet", cwd=tmp_path)
    consumer = _child_named(psutil.Process(proc.pid), "mpipe-consumer")
    time.sleep(2)  # 4 items' room, 100 items a second: full
    consumer.kill()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert "the consumer was killed by SIGKILL" in err, err


def test_sigint_stops_a_source_asleep_in_its_own_code_within_the_grace(
        tmp_path: Path) -> None:
    # Only workers were stopped at the end of the grace; the producer, asleep
    # between items, held the run until its source woke up.
    cfg = _config(tmp_path, params="{n: 5, gap_s: 60}", source="numbers", stage="slowly",
                  extra="shutdown_grace_s: 1\n")
    proc = start_mpipe("run", cfg, "--quiet", cwd=tmp_path)
    _child_named(psutil.Process(proc.pid), "mpipe-producer")
    time.sleep(1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 10, err
    assert "grace period over: stopping the source" in err, err


def test_past_the_grace_the_runner_waits_without_spinning_and_a_second_signal_ends_it(
        tmp_path: Path) -> None:
    # The consumer takes 60 s to finish after the last item.  After a SIGINT's
    # grace the runner kept a deadline in the past (every wait returned at
    # once: a core at 100%), and a second signal did not end a run whose sink
    # was already closed: it waited for the consumer.
    cfg = _config(tmp_path, params="{n: 3, end_s: 60}", source="numbers", stage="slowly",
                  consumer="slow_total", extra="shutdown_grace_s: 0.5\n")
    proc = start_mpipe("run", cfg, "--quiet", cwd=tmp_path)
    runner = psutil.Process(proc.pid)
    _child_named(runner, "mpipe-consumer")
    time.sleep(2)  # three items done: the consumer is in its 60 s
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)  # past the grace
    before = runner.cpu_times()
    time.sleep(2)
    after = runner.cpu_times()
    spent = (after.user + after.system) - (before.user + before.system)
    assert spent < 0.5, f"the runner used {spent:.2f} s of CPU in 2 s while waiting"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 10, err


def test_a_stage_that_takes_a_cpu_slot_inside_another_does_not_wait_for_itself(
        tmp_path: Path) -> None:
    # Two workers, one cpu slot: each held one slot and waited for a second.
    cfg = _config(tmp_path, params="{n: 6}", source="numbers", stage="nested_cpu",
                  extra="cpu_slots: 1\n")
    cfg.write_text(cfg.read_text().replace("workers: 1", "workers: 2"))
    proc = mpipe("run", cfg, "--quiet", cwd=tmp_path, timeout=30)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "results.h5") as f:
        assert sorted(f["results"][:].tolist()) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]



def test_threads_inside_a_slot_share_it(tmp_path: Path) -> None:
    # io_slots counts workers: a worker's threads use the slot it holds.  Taking
    # one each, they waited for the slot their own worker held, for ever.
    cfg = _config(tmp_path, params="{n: 4}", source="numbers", stage="threads_inside_a_block")
    cfg.write_text(cfg.read_text().replace("workers: 1}", "workers: 2, io_slots: 1}"))
    proc = mpipe("run", cfg, "--quiet", cwd=tmp_path, timeout=30)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "results.h5") as f:
        assert f["results"][:].tolist() == [3.0] * 4


def _import_stall_config(workdir: Path, extra: str) -> Path:
    cfg = workdir / "pipeline.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        pipeline: stalls
        workdir: .
        params: {{n: 6}}
        source: {{fn: tests.faults.import_stall:numbers}}
        stages:
          fast: {{fn: tests.faults.import_stall:same, workers: 2}}
          slow: {{fn: tests.faults.import_stall:as_float, workers: 1{extra}}}
        writer: {{path: results.h5}}
        allowed_modules: [tests.faults]
        fsync: false
        """))
    return cfg


def test_the_grace_ends_in_time_while_items_wait_for_a_worker_still_importing(
        tmp_path: Path) -> None:
    # Nothing was busy at the grace's end, so nothing was abandoned: once its
    # import ended, the worker ran every queued item, however long.
    cfg = _import_stall_config(tmp_path, "")
    cfg.write_text(cfg.read_text() + "shutdown_grace_s: 1\n")
    proc = start_mpipe("run", cfg, "--quiet", cwd=tmp_path, env={"MPIPE_TEST_IMPORT_S": "30"})
    _child_named(psutil.Process(proc.pid), "mpipe-slow-1")
    time.sleep(1.5)  # the fast stage is done; the items wait for slow
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 10, err
    doc = json.loads((tmp_path / ".mpipe/stalls/last-run.json").read_text())
    assert doc["counts"]["not_started"] == 6 and doc["counts"]["committed"] == 0, doc["counts"]


def test_a_hung_import_is_bounded_by_startup_timeout_s(tmp_path: Path) -> None:
    cfg = _import_stall_config(tmp_path, ", startup_timeout_s: 0.5")
    sent = time.monotonic()
    proc = mpipe("run", cfg, "--quiet", cwd=tmp_path, timeout=60,
                 env={"MPIPE_TEST_IMPORT_S": "60"})
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - sent < 30, proc.stderr
    assert "did not import its stage within" in proc.stderr, proc.stderr
    assert "5 workers in a row" in proc.stderr, proc.stderr
