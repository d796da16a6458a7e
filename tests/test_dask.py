"""The Dask backend on real clusters on loopback.

Two kinds of cluster: a ``LocalCluster`` that mpipe starts itself
(``backend: {dask: {local_workers: N}}``), and a ``dask scheduler`` plus two
``dask worker`` processes that the test starts and stops, addressed by
``tcp://127.0.0.1:PORT``.  Every run is checked against the serial reference,
and the autouse fixture checks that no process (Dask's included) outlives it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest

from tests.conftest import (
    REPO,
    check_against_reference,
    make_inputs,
    mpipe,
    notes_config,
    reference,
    start_mpipe,
)
from tests.test_examples import serial_signal_stats

pytestmark = pytest.mark.timeout(90)

DASK = Path(sys.executable).parent / "dask"
LOCAL_CLUSTER = "backend: {dask: {local_workers: 2}}\n"
FAULT_FN = "tests.faults.stages:notes_with_fault"


def report(workdir: Path, pipeline: str = "notes") -> dict:  # type: ignore[type-arg]
    return json.loads((workdir / f".mpipe/{pipeline}/last-run.json").read_text())


def committed(workdir: Path) -> int:
    ledger = workdir / ".mpipe/notes/ledger.sqlite"
    if not ledger.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT count(*) FROM items").fetchone()[0])
    except sqlite3.Error:
        return 0  # the writer has not made the table yet


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def dask_workers_of(pid: int) -> list[psutil.Process]:
    """The LocalCluster worker processes a runner started (spawned by its nannies)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


# ------------------------------------------------------------ an external cluster


@dataclass
class ExternalCluster:
    address: str
    scheduler: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]

    def worker_process(self, i: int) -> psutil.Process:
        """The process running tasks under ``dask worker`` number ``i`` (its nanny's child)."""
        [child] = dask_workers_of(self.workers[i].pid)
        return child


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    tree = []
    for p in procs:
        try:
            tree += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        if p.poll() is None:
            p.terminate()  # dask's CLI closes its nanny and worker on SIGTERM
    _, alive = psutil.wait_procs(tree, timeout=15)
    for q in alive:
        q.kill()
    for p in procs:
        p.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ExternalCluster]:
    """``dask scheduler`` + two ``dask worker --nworkers 1 --nthreads 1`` on loopback.

    The scheduler is set up as docs/DISTRIBUTED.md recommends for mpipe:
    ``allowed-failures: 0`` (mpipe's ``retries`` decide) and
    ``worker-saturation: 1.0``.  Workers run from a directory without the
    pipeline's modules, as on another machine with a shared filesystem.
    """
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    cwd = tmp_path / "dask-cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
           "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0",
           # tests.faults.stages:sleepy reads this where it runs: on these workers.
           "MPIPE_TEST_SLEEP_S": "1.5"}
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        with open(logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([str(DASK), *args], cwd=cwd, env=env,
                                    stdout=subprocess.DEVNULL, stderr=log)
        started.append(proc)
        return proc

    try:
        scheduler = start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                          "--no-dashboard")
        workers = [start(f"worker{i}", "worker", address, "--nworkers", "1", "--nthreads", "1",
                         "--no-dashboard", "--name", f"w{i}") for i in range(2)]

        def registered() -> bool:
            for p in started:
                assert p.poll() is None, "a dask process exited:\n" + "\n".join(
                    f.read_text() for f in logs.iterdir())
            return all("Registered to" in (logs / f"worker{i}.log").read_text()
                       for i in range(2))

        wait_for(registered, 40, "two Dask workers to register")
        yield ExternalCluster(address, scheduler, workers)
    finally:
        _stop(started[1:])
        _stop(started[:1])


# ------------------------------------------------------------ LocalCluster


def test_local_cluster_gives_the_serial_results(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=1, workers=2, extra=LOCAL_CLUSTER)
    proc = mpipe("run", cfg, timeout=80)
    assert proc.returncode == 0, proc.stderr
    check_against_reference(tmp_path, 3, 1)
    doc = report(tmp_path)
    assert doc["counts"]["committed"] == 3
    # One row per Dask worker, named by its address.
    rows = doc["stages"]["compute"]["per_worker"]
    assert rows and all(re.fullmatch(r"tcp://127\.0\.0\.1:\d+", w) for w in rows), rows
    assert sum(r["items"] for r in rows.values()) == 3
    # The notes' outputs are fsynced inside ctx.io(): counted in io_s once.
    stats = doc["stages"]["compute"]
    assert 0 < stats["output_commit_s"] <= stats["io_s"] <= stats["busy_s"], stats


def test_at_most_workers_items_are_in_flight_on_the_cluster(tmp_path: Path) -> None:
    # Backpressure on Dask: workers: 1 on a cluster with 2 threads must never
    # run two items at once (a whole-source client.map would run two).
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=1, workers=1, extra=LOCAL_CLUSTER)
    proc = mpipe("run", cfg, timeout=80)
    assert proc.returncode == 0, proc.stderr
    check_against_reference(tmp_path, 3, 1)
    timeline = sorted(report(tmp_path)["stages"]["compute"]["timeline"], key=lambda r: r[2])
    assert len(timeline) == 3
    for before, after in itertools.pairwise(timeline):
        # (worker, key, started_at, busy_s, ...): each starts after the one before ended.
        assert after[2] >= before[2] + before[3] - 0.01, timeline


def test_killed_worker_is_reported_with_the_item(tmp_path: Path) -> None:
    """The Dask worker running t001 SIGKILLs itself: KilledWorker, named with the item."""
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0, workers=2, fn=FAULT_FN,
                       stage_extra="retries: 0\n", extra=LOCAL_CLUSTER)
    proc = mpipe("run", cfg, "--set", "params.fault=sigkill", "--set", "params.fault_key=t001",
                 timeout=80)
    assert proc.returncode == 1, proc.stderr
    doc = report(tmp_path)
    [failure] = doc["failures"]
    assert failure["key"] == "t001" and failure["stage"] == "compute"
    assert failure["kind"] == "died" and "KilledWorker" in failure["message"]
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", failure["worker"]), failure
    assert doc["stages"]["compute"]["deaths"] == 1
    check_against_reference(tmp_path, 3, 0, expect_tasks=[0, 2])


def test_starting_a_local_cluster_leaves_the_runners_malloc_variables_as_they_were(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Dask's nanny writes its workers' pre-spawn environment into its own
    # process's: a later run in the same process took them for the user's.
    for var in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(var, raising=False)
    script = textwrap.dedent("""\
        import json, os
        from mpipe import dask_backend
        from mpipe.config import DaskConfig
        session = dask_backend.connect(DaskConfig(local_workers=1), 256)
        try:
            [workers] = session.client.run(dask_backend._malloc_settings).values()
            here = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
            print(json.dumps({"here": here, "workers": workers}))
        finally:
            session.close()
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=90, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen["here"] == {}, seen
    assert seen["workers"] == {"MALLOC_TRIM_THRESHOLD_": str(256 << 20),
                               "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}, seen


def test_resume_after_sigkill_of_the_runner(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(var, raising=False)  # the tester's own would win
    make_inputs(tmp_path, 6)
    cfg = notes_config(tmp_path, tasks=6, repeat=0, workers=2, fn="tests.faults.stages:sleepy",
                       extra=LOCAL_CLUSTER)
    env = {"MPIPE_TEST_SLEEP_S": "0.7"}
    run = start_mpipe("run", cfg, env=env)
    try:
        wait_for(lambda: committed(tmp_path) >= 2 or run.poll() is not None, 60,
                 "two committed items")
        assert run.poll() is None, "the run finished before it could be killed"
        workers = dask_workers_of(run.pid)
        assert len(workers) == 2, workers
        # With mpipe's malloc settings, not the nanny's default (docs/DISTRIBUTED.md,
        # "The MALLOC_TRIM pitfall"; mpipe.allocator).
        for w in workers:
            environ = w.environ()
            assert environ.get("MALLOC_TRIM_THRESHOLD_") == str(256 << 20), environ
            assert environ.get("MALLOC_MMAP_THRESHOLD_") == str(32 << 20), environ
        os.kill(run.pid, signal.SIGKILL)
        run.communicate(timeout=10)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    # Dask's workers watch a pipe from their parent: they go with the runner.
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"Dask workers outlived the runner: {alive}"

    again = mpipe("run", cfg, env=env, timeout=80)
    assert again.returncode == 0, again.stderr
    counts = report(tmp_path)["counts"]
    assert counts["skipped"] >= 2 and counts["skipped"] + counts["committed"] == 6, counts
    check_against_reference(tmp_path, 6, 0)


def test_ctrl_c_to_the_group_lets_in_flight_dask_items_finish(tmp_path: Path) -> None:
    """Dask's workers are in the runner's process group too; like mpipe's own
    children they leave the signal to the runner, which lets in-flight items
    finish within shutdown_grace_s and commits them (exit 130)."""
    make_inputs(tmp_path, 6)
    cfg = notes_config(tmp_path, tasks=6, repeat=0, workers=2, fn="tests.faults.stages:sleepy",
                       extra=LOCAL_CLUSTER)
    run = start_mpipe("run", cfg, env={"MPIPE_TEST_SLEEP_S": "1.0"}, start_new_session=True)
    try:
        wait_for(lambda: committed(tmp_path) >= 1 or run.poll() is not None, 60,
                 "the first committed item")
        time.sleep(0.3)  # both workers mid-item (see the external kill test)
        assert run.poll() is None, "the run finished before it could be interrupted"
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 130, err
    doc = report(tmp_path)
    assert doc["failures"] == [] and doc["stages"]["compute"]["retries"] == 0, doc["failures"]
    assert doc["counts"]["committed"] == committed(tmp_path) >= 3
    assert "KeyboardInterrupt" not in err
    ref = reference(6, 0)
    for name, data in ref.files.items():
        if (tmp_path / name).exists():
            assert (tmp_path / name).read_bytes() == data, name


def test_item_past_timeout_is_cancelled_its_worker_restarted_and_retried(tmp_path: Path
                                                                         ) -> None:
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0, workers=2, fn=FAULT_FN,
                       stage_extra="timeout_s: 2\n", extra=LOCAL_CLUSTER)
    start = time.monotonic()
    proc = mpipe("run", cfg, "--log-level", "INFO", "--set", "params.fault=hang",
                 "--set", "params.fault_key=t001", "--set", "params.fault_times=1", timeout=80)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 60
    stats = report(tmp_path)["stages"]["compute"]
    assert stats["timeouts"] == 1 and stats["retries"] == 1, proc.stderr
    check_against_reference(tmp_path, 3, 0)


# ------------------------------------------------------------ an external cluster


def test_external_cluster_gives_the_serial_results(tmp_path: Path,
                                                   cluster: ExternalCluster) -> None:
    make_inputs(tmp_path, 3)
    # workers: auto on Dask means one item in flight per cluster thread (2 here).
    cfg = notes_config(tmp_path, tasks=3, repeat=1, workers="auto",
                       extra=f"backend: {{dask: {{address: '{cluster.address}'}}}}\n")
    proc = mpipe("run", cfg, timeout=80)
    assert proc.returncode == 0, proc.stderr
    check_against_reference(tmp_path, 3, 1)
    # The fixture's workers keep the nanny's MALLOC_TRIM_THRESHOLD_=65536 alone.
    assert "started with a malloc trim threshold (or top pad) and no mmap" in proc.stderr
    assert report(tmp_path)["stages"]["compute"]["workers"] == 2
    # What the summary's advice for a Dask stage is measured against.
    assert report(tmp_path)["stages"]["compute"]["dask_threads"] == 2
    rows = report(tmp_path)["stages"]["compute"]["per_worker"]
    assert sum(r["items"] for r in rows.values()) == 3
    assert set(rows) <= {f"tcp://127.0.0.1:{p.laddr.port}" for i in range(2)
                         for p in cluster.worker_process(i).net_connections("tcp")
                         if p.status == psutil.CONN_LISTEN}


def test_worker_killed_from_outside_mid_item_is_retried(tmp_path: Path,
                                                       cluster: ExternalCluster) -> None:
    make_inputs(tmp_path, 6)
    cfg = notes_config(tmp_path, tasks=6, repeat=0, workers=2, fn="tests.faults.stages:sleepy",
                       extra=f"backend: {{dask: {{address: '{cluster.address}'}}}}\n")
    victim = cluster.worker_process(0)
    run = start_mpipe("run", cfg, "--log-level", "INFO")
    try:
        # Both workers start together and items take 1.5 s, so both finish
        # together too.  Right after the first commit the other worker may hold
        # a finished result not yet fetched (lost with it, Dask recomputes it
        # without a KilledWorker); 0.5 s later both are mid-item.
        wait_for(lambda: committed(tmp_path) >= 1 or run.poll() is not None, 60,
                 "the first committed item")
        time.sleep(0.5)
        assert run.poll() is None, "the run finished before a worker could be killed"
        victim.kill()
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, err
    doc = report(tmp_path)
    stats = doc["stages"]["compute"]
    assert stats["deaths"] >= 1 and stats["retries"] == stats["deaths"], (stats, err)
    assert doc["failures"] == []
    check_against_reference(tmp_path, 6, 0)


def test_one_stage_on_dask_the_others_local(tmp_path: Path, cluster: ExternalCluster) -> None:
    """Per-stage choice; the stage module sits next to the pipeline file, not on the
    workers' path: mpipe makes it importable there (shared filesystem)."""
    example = tmp_path / "example"
    shutil.copytree(REPO / "examples" / "signal_stats", example)
    proc = mpipe("run", example / "pipeline.yaml", "--set", "workdir=out",
                 "--set", "params.signals=12", "--set", "params.window=7",
                 "--set", f"backend={{dask: {{address: '{cluster.address}'}}}}",
                 "--set", "stages.generate.backend=local", "--set", "stages.smooth.backend=dask",
                 "--set", "stages.summarise.backend=local", timeout=80)
    assert proc.returncode == 0, proc.stderr
    expected = serial_signal_stats(12, 7)
    with h5py.File(example / "out" / "summaries.h5") as f:
        np.testing.assert_allclose(f["results"][:], expected, rtol=1e-12)
        np.testing.assert_allclose(f["total"][:], expected.sum(axis=0), rtol=1e-9)
    stages = report(example / "out", "signal-stats")["stages"]
    assert all(w.startswith("tcp://127.0.0.1:") for w in stages["smooth"]["per_worker"])
    for local in ("generate", "summarise"):
        assert not any(w.startswith("tcp://") for w in stages[local]["per_worker"]), stages[local]
        assert stages[local]["done"] == 12


# ------------------------------------------------------------ without a cluster


def _run_cli_with(prelude: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``mpipe ARGS`` in a fresh interpreter, after ``prelude`` has run in it."""
    code = textwrap.dedent(prelude) + textwrap.dedent(f"""
        sys.argv = ["mpipe", *{[str(a) for a in args]!r}]
        from mpipe.cli import main
        main()
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=env)


def test_missing_distributed_names_the_install_command(tmp_path: Path) -> None:
    make_inputs(tmp_path, 1)
    cfg = notes_config(tmp_path, tasks=1, repeat=0, extra=LOCAL_CLUSTER)
    proc = _run_cli_with("import sys\nsys.modules['distributed'] = None\n", "run", cfg,
                         cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'mpipe[dask]'" in proc.stderr
    # Found while checking the config: no run state, no results.
    assert not (tmp_path / ".mpipe").exists()
    assert not (tmp_path / "results.h5").exists()
    proc = _run_cli_with("import sys\nsys.modules['distributed'] = None\n", "validate", cfg,
                         cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'mpipe[dask]'" in proc.stderr


def test_the_local_backend_never_imports_dask(tmp_path: Path) -> None:
    make_inputs(tmp_path, 1)
    cfg = notes_config(tmp_path, tasks=1, repeat=0)
    proc = _run_cli_with("""\
        import atexit, os, sys
        atexit.register(lambda: os._exit(99) if {"dask", "distributed"} & set(sys.modules)
                        else None)
        """, "run", cfg, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    check_against_reference(tmp_path, 1, 0)


def test_run_item_classifies_failures_as_the_local_backend_does(tmp_path: Path) -> None:
    from mpipe.dask_backend import TaskSpec, run_item
    from mpipe.messages import ItemDone, ItemFailure, WorkItem, dumps, loads

    def run(fn: str, fault: str) -> ItemDone | ItemFailure:
        spec = TaskSpec(stage="compute", fn=fn, params={"fault": fault, "fault_key": "t000",
                                                        "repeat": 0},
                        workdir=str(tmp_path), fsync=False, allow_outside_workdir=False)
        return run_item(spec, WorkItem(0, "t000", 1, dumps({"t": 0})))

    make_inputs(tmp_path, 1)
    unpicklable = run(FAULT_FN, "unpicklable")
    assert isinstance(unpicklable, ItemFailure) and unpicklable.kind == "pickle"
    assert "cannot be pickled" in unpicklable.message
    assert unpicklable.retryable is False  # not retried, as on the local backend
    raised = run(FAULT_FN, "raise")
    assert isinstance(raised, ItemFailure) and raised.kind == "raised"
    assert "InjectedFault" in raised.message and raised.traceback
    exiting = run(FAULT_FN, "systemexit")
    assert isinstance(exiting, ItemFailure) and exiting.kind == "exit"
    assert exiting.message.endswith("the Dask worker is kept")
    missing = run("tests.faults.no_such_module:fn", "raise")
    assert isinstance(missing, ItemFailure) and "cannot import" in missing.message
    done = run("mpipe.workloads.notes:process_task", "")
    assert isinstance(done, ItemDone)
    ref = reference(1, 0)
    np.testing.assert_allclose(loads(done.value), ref.vectors[0], rtol=1e-6)
    for name, data in ref.files.items():
        assert (tmp_path / name).read_bytes() == data, name
