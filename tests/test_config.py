"""Bad config: exit 2, the key and the YAML line named, before any process starts."""

from __future__ import annotations

import signal
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import mpipe, start_mpipe

GOOD = """\
pipeline: notes
workdir: .
params: {tasks: 2, repeat: 0, seed: 0}
source: {fn: mpipe.workloads.notes:tasks}
stages:
  compute:
    fn: mpipe.workloads.notes:process_task
    workers: 2
consumer: {fn: mpipe.workloads.notes:accumulate}
"""


def write(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(textwrap.dedent(text))
    return cfg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD.replace("workers: 2", "workers: [2"), ["invalid YAML", "line 9"]),
        (GOOD.replace("workers: 2", "wokers: 2"),
         ["stages.compute.wokers", "unknown key", "pipeline.yaml line 8"]),
        (GOOD.replace("workers: 2", "workers: 2\n    queue_size: lots"),
         ["stages.compute.queue_size", "integer", "line 9"]),
        (GOOD.replace("workers: 2", "workers: 0"),
         ["stages.compute.workers: must be >= 1 or 'auto' (got 0), pipeline.yaml line 8"]),
        # Said as what is expected, not as pydantic's regular expression.
        (GOOD.replace("mpipe.workloads.notes:process_task", "mpipe.workloads.notes.process_task"),
         ["stages.compute.fn: expected module:function, e.g. my_stages:process (got "
          "'mpipe.workloads.notes.process_task'), pipeline.yaml line 7"]),
        (GOOD.replace("process_task", "no_such_function"),
         ["stages.compute.fn", "no attribute 'no_such_function'", "line 7"]),
        (GOOD.replace("mpipe.workloads.notes:process_task", "nosuchmodule:fn"),
         ["stages.compute.fn", "no module named 'nosuchmodule'", "line 7"]),
        (GOOD.replace("mpipe.workloads.notes:process_task", "json:dumps"),
         ["stages.compute.fn", "'json' is not allowed", "allowed_modules"]),
        (GOOD.replace("params: {tasks: 2, repeat: 0, seed: 0}",
                      "params: !!python/object/apply:os.system ['echo pwned']"),
         ["safe loader"]),
        (GOOD.replace("source:", "sauce:"), ["sauce", "unknown key", "source", "required"]),
        (GOOD + "writer: {path: ../escaped.h5}\n",
         ["writer.path", "outside the workdir", "line 10"]),
        # Was found only after every item was done, as the results were renamed
        # there (exit 74), leaving a temporary file beside it, outside the workdir.
        (GOOD + "writer: {path: .}\n",
         ["writer.path", "is a directory", "line 10", "e.g. writer.path: results.h5"]),
        (GOOD + "writer: {path: .mpipe/results.h5}\n",
         ["writer.path", "inside mpipe's state directory", "line 10"]),
        ("", ["the file is empty"]),
        (GOOD.replace("workers: 2", "workers: 2\n    workers: 3"),
         ["stages.compute.workers: duplicate key", "line 9", "first at line 8"]),
        # Longer than the runner's wait can take: was exit 70 (OverflowError) at start.
        (GOOD.replace("workers: 2", "workers: 2\n    startup_timeout_s: 1.0e+9"),
         ["stages.compute.startup_timeout_s", "less than or equal to 864000", "line 9"]),
        (GOOD + "shutdown_grace_s: 3000000\n",
         ["shutdown_grace_s", "less than or equal to 864000"]),
        # mallopt takes a C int: more would have been cut to another value.
        (GOOD + "keep_freed_memory_mb: 4096\n",
         ["keep_freed_memory_mb", "less than or equal to 2047", "line 10"]),
        # Below 32 MiB, blocks glibc keeps on its heap would be mmapped afresh.
        (GOOD + "keep_freed_memory_mb: 8\n",
         ["keep_freed_memory_mb", "must be 0 (glibc's own settings) or 32 to 2047 (got 8)",
          "line 10"]),
    ],
    ids=["syntax", "unknown-key", "wrong-type", "workers-0", "fn-without-colon", "no-attr",
         "no-module",
         "not-allowed", "python-tag", "missing", "path-escape", "results-a-directory",
         "results-in-state", "empty-file",
         "duplicate-key",
         "timeout-too-long", "grace-too-long", "keep-freed-too-much", "keep-freed-too-little"],
)
def test_bad_config_exits_2_naming_key_and_line(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    cfg = write(tmp_path, text)
    proc = mpipe("run", cfg)
    assert proc.returncode == 2, proc.stderr
    for fragment in expected:
        assert fragment in proc.stderr, f"{fragment!r} not in:\n{proc.stderr}"
    assert "command line" not in proc.stderr, proc.stderr  # nothing was set there
    # Before any process started: no run state, no outputs.
    assert not (tmp_path / ".mpipe").exists()
    assert not (tmp_path / "output").exists()
    assert not (tmp_path / "pwned").exists()
    validate = mpipe("validate", cfg)
    assert validate.returncode == 2


def test_a_stage_file_named_like_a_standard_module_is_told_to_be_renamed(
        tmp_path: Path) -> None:
    # It is next to the pipeline file: "put it next to the pipeline file" misled.
    (tmp_path / "signal.py").write_text("def f(x):\n    return x\n")
    cfg = write(tmp_path, GOOD.replace("mpipe.workloads.notes:process_task", "signal:f"))
    proc = mpipe("run", cfg)  # not from tmp_path: `python -m` would import it as signal
    assert proc.returncode == 2, proc.stderr
    assert f"{tmp_path / 'signal.py'} has the name of another module" in proc.stderr
    assert "rename your file" in proc.stderr and "next to" not in proc.stderr, proc.stderr


def test_a_module_that_raises_or_crashes_on_import_is_a_config_error(tmp_path: Path) -> None:
    # `mpipe run` imports the named modules in a child of its forkserver: an
    # exception there, or the child's death, is still exit 2 before any state.
    (tmp_path / "raising_stage.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "crashing_stage.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    cases = [("raising_stage", ["stages.compute.fn", "importing 'raising_stage' raised",
                                "boom at import", "line 7",
                                # the user's traceback, to the line that raised
                                'raising_stage.py", line 1, in <module>']),
             ("crashing_stage", ["killed the process that checked them", "SIGSEGV"])]
    for module, expected in cases:
        cfg = write(tmp_path, GOOD.replace("mpipe.workloads.notes:process_task", f"{module}:f"))
        proc = mpipe("run", cfg, cwd=tmp_path)  # a core dump, if any, lands here
        assert proc.returncode == 2, proc.stderr
        for fragment in expected:
            assert fragment in proc.stderr, f"{fragment!r} not in:\n{proc.stderr}"
        assert not (tmp_path / ".mpipe").exists()


def test_a_hanging_import_does_not_outlive_a_terminated_run(tmp_path: Path) -> None:
    # The name check's child imports the module and hangs in it; SIGTERM kills
    # mpipe run before it has set up its handlers.  The child must go too (its
    # lifeline), within the fixture's 10 s, although it ignores SIGTERM.
    (tmp_path / "hanging_stage.py").write_text(
        "import pathlib, time\npathlib.Path('importing').touch()\ntime.sleep(60)\n")
    cfg = write(tmp_path, GOOD.replace("mpipe.workloads.notes:process_task", "hanging_stage:f"))
    proc = start_mpipe("run", cfg, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while not (tmp_path / "importing").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode != 0
    # no_child_left_behind (conftest) checks that the checker has exited.


def test_validate_and_plan_accept_a_good_config(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD)
    assert mpipe("validate", cfg).returncode == 0
    plan = mpipe("plan", cfg, "--set", "stages.compute.workers=3")
    assert plan.returncode == 0, plan.stderr
    assert "workers=3" in plan.stdout and "compute" in plan.stdout
    # A Dask stage has no local workers or slots: plan says where it runs.
    plan = mpipe("plan", cfg, "--set", 'backend={dask: {address: "tcp://sched:8786"}}',
                 "--set", "stages.compute.workers=auto")
    assert plan.returncode == 0, plan.stderr
    assert "on Dask, items at once=the cluster's threads" in plan.stdout, plan.stdout
    assert "io_slots" not in plan.stdout, plan.stdout


def test_env_interpolation(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD.replace("workers: 2", "workers: ${MPIPE_W:-1}"))
    plan = mpipe("plan", cfg, env={"MPIPE_W": "3"})
    assert "workers=3" in plan.stdout, plan.stderr
    plan = mpipe("plan", cfg)
    assert "workers=1" in plan.stdout, plan.stderr
    cfg = write(tmp_path, GOOD.replace("workers: 2", "workers: ${MPIPE_UNSET_VAR}"))
    proc = mpipe("plan", cfg)
    assert proc.returncode == 2 and "MPIPE_UNSET_VAR" in proc.stderr


def test_cpu_slots_takes_auto_as_workers_does(tmp_path: Path) -> None:
    from mpipe.cores import usable_cores

    cfg = write(tmp_path, GOOD + "cpu_slots: auto\n")
    for _ in range(2):  # validated, then remembered (mpipe.validated)
        plan = mpipe("plan", cfg)
        assert plan.returncode == 0, plan.stderr
        assert f"cpu_slots {usable_cores()} (shared by all stages)" in plan.stdout, plan.stdout
    plan = mpipe("plan", cfg, "--set", "cpu_slots=3")
    assert "cpu_slots 3 (shared by all stages)" in plan.stdout, plan.stdout
    proc = mpipe("plan", cfg, "--set", "cpu_slots=0")
    assert proc.returncode == 2 and "cpu_slots: must be >= 1 or 'auto' (got 0)" in proc.stderr


def test_bad_set_override(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD)
    proc = mpipe("run", cfg, "--set", "stages.compute.workers=-1")
    assert proc.returncode == 2 and "stages.compute.workers" in proc.stderr
    assert "(from --set)" in proc.stderr
    proc = mpipe("run", cfg, "--set", "nonsense")
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr
    # A mistyped stage name makes a new stage without fn: that was blamed on
    # the file's `stages:` line, which the user never wrote so.
    proc = mpipe("validate", cfg, "--set", "stages.comput.workers=2")
    assert proc.returncode == 2, proc.stderr
    assert "stages.comput.fn: required key is missing (from --set)" in proc.stderr, proc.stderr
