"""`mpipe run` forks multiprocessing's forkserver and resource tracker from itself.

Real runs, read through /proc: the helpers are forked (no fresh interpreter),
and keep nothing the runner, or whoever started it, had open.  Where a fork
would copy a thread or the HDF5 library, they start the usual way.
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

from tests.conftest import REPO

FRESH_FORKSERVER = "from multiprocessing.forkserver import main"
FRESH_TRACKER = "from multiprocessing.resource_tracker import main"


def test_helpers_are_forked_and_keep_nothing_of_the_runners(tmp_path: Path) -> None:
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(textwrap.dedent("""\
        pipeline: helpers
        workdir: .
        params: {n: 2}
        source: {fn: tests.observe_stages:numbers}
        stages:
          look: {fn: tests.observe_stages:helpers_view, workers: 2}
        writer: {path: results.h5}
        allowed_modules: [tests.observe_stages]
        """))
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


@pytest.mark.parametrize("unfit", ["thread", "h5py"])
def test_helpers_start_the_usual_way_where_a_fork_would_copy_too_much(unfit: str) -> None:
    code = textwrap.dedent(f"""\
        import threading
        import time
        from multiprocessing import forkserver as mp_forkserver
        from mpipe import forkserver, forkstart
        stop = threading.Event()
        if {unfit!r} == "thread":
            threading.Thread(target=stop.wait).start()
        else:
            import h5py
        print(forkstart.why_not_fork())
        forkserver.start(fork=True)
        pid = mp_forkserver._forkserver._forkserver_pid
        # Empty while the fresh interpreter is still being exec'd.
        deadline = time.monotonic() + 10
        while not (cmdline := open(f"/proc/{{pid}}/cmdline").read()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        print(cmdline.replace("\\0", " "))
        stop.set()
        """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    reason, cmdline = proc.stdout.splitlines()
    assert reason == {"thread": "threads are running",
                      "h5py": "h5py is loaded (HDF5's state must not cross a fork)"}[unfit]
    assert FRESH_FORKSERVER in cmdline


def test_what_the_runner_had_buffered_is_printed_once() -> None:
    # Into a pipe, print() is buffered: forked with the buffer full, every
    # child would print it again when it exits.
    code = textwrap.dedent("""\
        from mpipe import forkserver
        print("printed once", end="")
        ctx = forkserver.start(fork=True)
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
