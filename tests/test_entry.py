"""The `mpipe` command's own exit (cli.entry): quick after a run, never lossy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, check_against_reference, make_inputs, notes_config

CONSOLE_SCRIPT = Path(sys.executable).with_name("mpipe")


def _run(cmd: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=100, env=env)


def test_console_script_keeps_exit_code_output_and_log(tmp_path: Path) -> None:
    # The path cron and systemd take: the console script, whose children are
    # started with __main__ named mpipe.__main__, and the quick exit.
    make_inputs(tmp_path, 4)
    cfg = notes_config(tmp_path, tasks=4, repeat=0,
                       fn="tests.faults.stages:notes_with_fault")
    log = tmp_path / "run.log"
    proc = _run([CONSOLE_SCRIPT, "run", cfg, "--set", "params.fault=raise",
                 "--set", "params.fault_key=t001", "--log-file", log], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "report:" in proc.stdout  # the summary's last line, flushed
    assert "1 of 4 items failed" in proc.stderr  # printed last, flushed
    report = json.loads((tmp_path / ".mpipe/notes/last-run.json").read_text())
    assert report["exit_code"] == 1 and report["counts"]["committed"] == 3
    logged = log.read_text()
    assert "t001" in logged and logged.endswith("\n")
    check_against_reference(tmp_path, 4, 0, expect_tasks=[0, 2, 3])


def test_a_profiler_hosting_mpipe_still_gets_its_report(tmp_path: Path) -> None:
    # cProfile writes its output after the module's SystemExit: mpipe must not
    # end the process under it.
    make_inputs(tmp_path, 2)
    cfg = notes_config(tmp_path, tasks=2, repeat=0)
    out = tmp_path / "profile.out"
    proc = _run([sys.executable, "-m", "cProfile", "-o", out, "-m", "mpipe", "run", cfg,
                 "--quiet"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0
    check_against_reference(tmp_path, 2, 0)


def test_after_a_prepare_function_the_interpreter_exits_normally(tmp_path: Path) -> None:
    # The prepare function ran in this process: objects it left behind are
    # finalized at exit as CPython finalizes them (os._exit would skip that).
    make_inputs(tmp_path, 2)
    cfg = notes_config(tmp_path, tasks=2, repeat=0,
                       extra="prepare: {fn: tests.faults.stages:prepare_with_finalizer}\n")
    proc = _run([CONSOLE_SCRIPT, "run", cfg, "--quiet"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "finalized.txt").read_text() == "finalized\n"


def test_only_mpipe_bench_pays_for_the_bench_s_arguments(tmp_path: Path) -> None:
    # mpipe.bench (and platform) cost every other command 10-15 ms of start.
    code = ("import sys; from mpipe.cli import build_parser; build_parser(sys.argv[1]); "
            "print('mpipe.bench' in sys.modules)")
    seen = {command: _run([sys.executable, "-c", code, command], cwd=tmp_path).stdout.strip()
            for command in ("run", "validate", "bench")}
    assert seen == {"run": "False", "validate": "False", "bench": "True"}
    usage = _run([CONSOLE_SCRIPT, "bench", "--help"], cwd=tmp_path)
    assert usage.returncode == 0 and "--pairs" in usage.stdout


def test_a_bug_in_mpipe_exits_70_with_its_traceback_and_keeps_the_work(tmp_path: Path) -> None:
    # An exception mpipe does not expect (a bug) must not exit 1, which cron
    # wrappers read as "some items failed": it exits 70 (EX_SOFTWARE) with the
    # traceback to report, the report says so (not the last run's), and what the
    # run committed stays committed.
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0)
    assert _run([CONSOLE_SCRIPT, "run", cfg, "--quiet"], cwd=tmp_path).returncode == 0
    launcher = tmp_path / "mpipe_with_a_bug.py"
    launcher.write_text(
        "from mpipe.runner import Runner\n"
        "finish = Runner.run\n"
        "def run(self):\n"
        "    finish(self)\n"
        "    raise RuntimeError('a simulated bug after the run')\n"
        "Runner.run = run\n"
        "from mpipe.cli import entry\n"
        "entry()\n")
    proc = _run([sys.executable, launcher, "run", cfg, "--quiet", "--fresh"], cwd=tmp_path)
    assert proc.returncode == 70, proc.stderr
    assert "Traceback" in proc.stderr and "a simulated bug after the run" in proc.stderr
    assert "internal error" in proc.stderr, proc.stderr
    report = json.loads((tmp_path / ".mpipe/notes/last-run.json").read_text())
    assert report["status"] == "internal_error" and report["exit_code"] == 70
    assert "a simulated bug after the run" in report["error"]
    assert report["counts"]["committed"] == 3  # what the run had done, not zeros
    check_against_reference(tmp_path, 3, 0)


def _into_a_closed_pipe(command: str, cfg: Path, cwd: Path, *extra: str
                        ) -> subprocess.CompletedProcess[str]:
    """`mpipe COMMAND CFG | head` once head has left: stdout is a pipe without reader."""
    read, write = os.pipe()
    os.close(read)
    # Buffered, as stdout to a pipe is unless PYTHONUNBUFFERED is set: the
    # write then fails at a flush, not at the print.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        return subprocess.run([str(CONSOLE_SCRIPT), command, str(cfg), *extra], cwd=cwd,
                              stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=100,
                              env={**env, "PYTHONPATH": str(REPO)})
    finally:
        os.close(write)


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path: Path) -> None:
    # `mpipe plan CONFIG | head -1`: the pipe closes; no traceback, the shell's
    # code for a writer ended by SIGPIPE.
    proc = _into_a_closed_pipe("plan", notes_config(tmp_path, tasks=2, repeat=0), tmp_path)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == "", proc.stderr


def test_a_cron_line_that_closes_stdout_and_stderr_still_runs(tmp_path: Path) -> None:
    # `mpipe run x.yaml >&- 2>&-` (no --quiet): Python has no sys.stdout then, and
    # the progress display, the summary and every error message would raise.
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0)
    proc = subprocess.run(["sh", "-c", f'exec "{CONSOLE_SCRIPT}" run "{cfg}" >&- 2>&-'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=100,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0
    report = json.loads((tmp_path / ".mpipe/notes/last-run.json").read_text())
    assert report["status"] == "complete"
    check_against_reference(tmp_path, 3, 0)
    # And a failure is still told by its exit code.
    bad = subprocess.run(["sh", "-c", f'exec "{CONSOLE_SCRIPT}" run "{cfg}" '
                          '--set stages.compute.workers=0 >&- 2>&-'],
                         cwd=tmp_path, capture_output=True, text=True, timeout=100,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode == 2


def test_a_run_with_stdin_stdout_and_stderr_closed_gives_children_a_stderr(
        tmp_path: Path) -> None:
    # With 0, 1 and 2 all closed, the next files and pipes opened would take those
    # numbers: a stage (or a C library) writing to fd 2 would write into one of
    # mpipe's pipes. mpipe points 0-2 at /dev/null first.
    (tmp_path / "loud.py").write_text(
        "import os\n"
        "def numbers(ctx):\n"
        "    return [1.0, 2.0, 3.0]\n"
        "def scale(value):\n"
        "    os.write(2, b'a warning a C library prints\\n')\n"
        "    return value * 2.0\n")
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("pipeline: loud\nworkdir: .\nsource: {fn: loud:numbers}\n"
                   "stages:\n  scale: {fn: loud:scale, workers: 2, retries: 0}\n")
    proc = subprocess.run(["sh", "-c", f'exec "{CONSOLE_SCRIPT}" run "{cfg}" <&- >&- 2>&-'],
                          cwd=tmp_path, capture_output=True, text=True, timeout=100,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0
    report = json.loads((tmp_path / ".mpipe/loud/last-run.json").read_text())
    assert report["status"] == "complete" and report["counts"]["committed"] == 3


def test_stdout_that_cannot_be_written_is_an_output_error(tmp_path: Path) -> None:
    # `mpipe plan CONFIG > /dev/full` (or a full disk under `> log`): exit 74 and
    # a message, not a traceback and "a bug in mpipe".
    cfg = notes_config(tmp_path, tasks=2, repeat=0)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as usual
    with open("/dev/full", "w") as full:
        proc = subprocess.run([str(CONSOLE_SCRIPT), "plan", str(cfg)], cwd=tmp_path,
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=100,
                              env={**env, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 74, proc.stderr
    assert "cannot write to standard output" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_a_run_whose_summary_meets_a_closed_pipe_exits_141_not_1(tmp_path: Path) -> None:
    # rich's console exits 1 on a broken pipe ("some items failed" to a cron
    # wrapper); the run itself completed, and its report says so.
    make_inputs(tmp_path, 2)
    proc = _into_a_closed_pipe("run", notes_config(tmp_path, tasks=2, repeat=0), tmp_path)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads((tmp_path / ".mpipe/notes/last-run.json").read_text())
    assert report["status"] == "complete"
    check_against_reference(tmp_path, 2, 0)
    # A run with a failed item keeps its exit 1 and its error line.
    failing = notes_config(tmp_path, tasks=2, repeat=0, fn="tests.faults.stages:notes_with_fault")
    proc = _into_a_closed_pipe("run", failing, tmp_path, "--fresh", "--set", "params.fault=raise",
                               "--set", "params.fault_key=t001")
    assert proc.returncode == 1, proc.stderr
    assert "1 of 2 items failed" in proc.stderr
