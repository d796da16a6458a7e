"""`mpipe run` forks multiprocessing's forkserver and resource tracker from itself.

Real runs, read through /proc: the helpers are forked (no fresh interpreter),
and keep nothing the runner, or whoever started it, had open.  Where a fork
would copy a thread, a profiler or the HDF5 library, they start the usual way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import pytest

from mpipe import forkstart
from tests.conftest import REPO

FRESH_FORKSERVER = "from multiprocessing.forkserver import main"
FRESH_TRACKER = "from multiprocessing.resource_tracker import main"
forked_here = pytest.mark.skipif(forkstart.unsupported() is not None,
                                 reason=f"no forked helpers here: {forkstart.unsupported()}")


def _observe_config(workdir: Path, *, items: int, stage: str, fn: str) -> Path:
    """One stage of tests.observe_stages, two workers, over ``items`` numbers."""
    cfg = workdir / "pipeline.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        pipeline: forkstart
        workdir: .
        params: {{n: {items}}}
        source: {{fn: tests.observe_stages:numbers}}
        stages:
          {stage}: {{fn: tests.observe_stages:{fn}, workers: 2}}
        writer: {{path: results.h5}}
        allowed_modules: [tests.observe_stages]
        """))
    return cfg


@forked_here
def test_helpers_are_forked_and_keep_nothing_of_the_runners(tmp_path: Path) -> None:
    cfg = _observe_config(tmp_path, items=2, stage="look", fn="helpers_view")
    log = tmp_path / "run.log"
    # A descriptor the caller leaves open to `mpipe run` (a shell's 3>file, a
    # supervisor's socket): a fresh interpreter never sees it; neither may a forked helper.
    stray_r, stray_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mpipe", "run", str(cfg), "--quiet", "--log-file", str(log)],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, pass_fds=(stray_w,),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, stderr = proc.communicate(timeout=100)
        stray = f"pipe:[{os.fstat(stray_w).st_ino}]"
    finally:
        os.close(stray_r)
        os.close(stray_w)
    assert proc.returncode == 0, stderr
    with h5py.File(tmp_path / "results.h5") as f:
        assert sorted(f["results"][:].ravel().tolist()) == [0.0, 1.0]

    for x in (0, 1):
        view = json.loads((tmp_path / f"helpers-{x}.json").read_text())
        assert view["runner"] == proc.pid
        # Forked from the runner: the same command line, not `python -c ...`.
        assert view["forkserver_cmdline"] == view["runner_cmdline"]
        helpers = view["helpers"]
        assert str(view["forkserver"]) in helpers
        assert len(helpers) == 2, helpers  # the forkserver and the resource tracker
        # Named for ps and top, each child too: forked, all would show the runner's name.
        assert sorted(h["comm"] for h in helpers.values()) == ["mpipe-forksrv", "mpipe-tracker"]
        assert helpers[str(view["forkserver"])]["comm"] == "mpipe-forksrv"
        assert view["worker_comm"] in ("mpipe-look-1", "mpipe-look-2")
        for pid, helper in helpers.items():
            assert helper["cmdline"] == view["runner_cmdline"], (pid, helper)
            assert FRESH_FORKSERVER not in helper["cmdline"]
            assert FRESH_TRACKER not in helper["cmdline"]
            targets = [entry.split(" ", 1)[1] for entry in helper["files"]]
            assert str(log) not in targets, (pid, helper["files"])
            assert stray not in targets, (pid, helper["files"])
            # Beyond stdin, stdout and stderr, each keeps only its own socket
            # and pipe (the forkserver also its signal pipe, epoll, client sockets,
            # and /dev/null for stdin, as multiprocessing gives it).
            extra = [entry for entry in helper["files"] if int(entry.split()[0]) > 2]
            assert all(t.startswith(("pipe:", "socket:", "anon_inode:", "/dev/null"))
                       for t in (e.split(" ", 1)[1] for e in extra)), (pid, extra)


UNFIT = {
    "thread": ("threading.Thread(target=stop.wait, daemon=True).start()", "threads are running"),
    # faulthandler's watchdog is a C thread, which threading does not list.
    "native thread": ("import faulthandler; faulthandler.dump_traceback_later(60)",
                      "threads are running"),
    "profiler": ("sys.setprofile(lambda *args: None)",
                 "a profiler, tracer or debugger watches this process"),
    "h5py": ("import h5py", "h5py is loaded (HDF5's state must not cross a fork)"),
}


@pytest.mark.parametrize("unfit", sorted(UNFIT))
def test_helpers_start_the_usual_way_where_a_fork_would_copy_too_much(unfit: str) -> None:
    make_unfit, reason = UNFIT[unfit]
    code = textwrap.dedent(f"""\
        import sys
        import threading
        import time
        from multiprocessing import forkserver as mp_forkserver
        from mpipe import forkserver, forkstart
        stop = threading.Event()
        {make_unfit}
        print(forkstart.why_not_fork())
        forkserver.start(fork=True)
        sys.setprofile(None)
        pid = mp_forkserver._forkserver._forkserver_pid
        # Empty until the exec'd interpreter's memory is in place.
        deadline = time.monotonic() + 10
        while not (cmdline := open(f"/proc/{{pid}}/cmdline").read()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        print(cmdline.replace("\\0", " "))
        """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    said, cmdline = proc.stdout.splitlines()
    assert said == reason
    assert FRESH_FORKSERVER in cmdline


@forked_here
def test_a_run_started_with_stdout_and_stderr_closed_leaves_no_helper_behind(
        tmp_path: Path) -> None:
    # Started with 1 and 2 closed (cron lines end in `>&- 2>&-`), the runner's
    # own pipes land on them; a helper that kept them would never see its
    # pipe's EOF and outlive the run (the autouse fixture fails the test).
    cfg = _observe_config(tmp_path, items=3, stage="last", fn="tail")
    proc = subprocess.run(
        ["sh", "-c", f'exec "{sys.executable}" -m mpipe run "{cfg}" --quiet >&- 2>&-'],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
        timeout=100)
    assert proc.returncode == 0
    with h5py.File(tmp_path / "results.h5") as f:
        assert sorted(f["results"][:].ravel().tolist()) == [0.0, 1.0, 2.0]


@forked_here
def test_what_the_runner_had_buffered_is_printed_once() -> None:
    # Into a pipe, print() is buffered: forked with the buffer full, every
    # child would print it again when it exits.
    code = textwrap.dedent("""\
        import os, sys
        from multiprocessing import forkserver as mp_forkserver
        from mpipe import forkserver
        print("printed once", end="")
        ctx = forkserver.start(fork=True)
        pid = mp_forkserver._forkserver._forkserver_pid
        with open(f"/proc/{pid}/cmdline") as theirs, open("/proc/self/cmdline") as mine:
            assert theirs.read() == mine.read(), "the forkserver was not forked"
        for _ in range(2):
            p = ctx.Process(target=int)
            p.start()
            p.join()
        print(" exitcode", p.exitcode, end="")
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "printed once exitcode 0"
