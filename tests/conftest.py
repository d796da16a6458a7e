"""Shared fixtures: real processes, real files, and no child left behind.

The pytest process makes itself a *child subreaper* (prctl PR_SET_CHILD_SUBREAPER),
so that a process orphaned by a run (its parent, the mpipe runner, exited or was
killed) is re-parented to pytest rather than to init, where it could hide.
After every test, every descendant must have exited.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.reference import CHANNELS, Reference, reference_input, serial_reference

REPO = Path(__file__).resolve().parent.parent
# Inputs are generated once per session and hard-linked into each test's workdir.
CACHE = Path(tempfile.gettempdir()) / f"mpipe-test-inputs-{os.getpid()}"
PR_SET_CHILD_SUBREAPER = 36


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(CACHE, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    # Validated configs are remembered per session (mpipe.validated), never in
    # the user's own cache.
    os.environ["MPIPE_CACHE_DIR"] = str(CACHE / "mpipe-cache")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


@pytest.fixture(autouse=True)
def no_child_left_behind() -> Iterator[None]:
    yield
    me = psutil.Process()
    # Helpers such as multiprocessing's forkserver notice their parent's exit
    # on their own within moments; give them that, no more.
    _, alive = psutil.wait_procs(me.children(recursive=True), timeout=10)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    described = []
    for p in alive:
        try:
            described.append(f"pid {p.pid}: {' '.join(p.cmdline())[:120]}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    assert not described, "child processes left behind:\n" + "\n".join(described)


@functools.cache
def _input_cache(tasks: int, seed: int) -> Path:
    root = CACHE / f"s{seed}"
    for t in range(tasks):
        d = root / "input" / f"t{t:03d}"
        d.mkdir(parents=True, exist_ok=True)
        for c in range(CHANNELS):
            p = d / f"ch{c:02d}.npy"
            if not p.exists():
                with open(p, "wb") as f:
                    np.save(f, reference_input(seed, t, c))
    return root


@functools.cache
def reference(tasks: int, repeat: int, seed: int = 0) -> Reference:
    return serial_reference(tasks, repeat, seed)


def make_inputs(workdir: Path, tasks: int, seed: int = 0) -> None:
    """Hard-link cached inputs into ``workdir/input`` (tests that corrupt a
    file must replace it, not write into it: the cache shares the inode)."""
    cache = _input_cache(tasks, seed)
    for t in range(tasks):
        src = cache / "input" / f"t{t:03d}"
        dst = workdir / "input" / f"t{t:03d}"
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            os.link(f, dst / f.name)


def notes_config(workdir: Path, *, tasks: int, repeat: int = 1, workers: int | str = 2,
                 extra: str = "", stage_extra: str = "",
                 fn: str = "mpipe.workloads.notes:process_task") -> Path:
    cfg = workdir / "pipeline.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        pipeline: notes
        workdir: .
        params: {{tasks: {tasks}, repeat: {repeat}, seed: 0}}
        source: {{fn: mpipe.workloads.notes:tasks}}
        stages:
          compute:
            fn: {fn}
            workers: {workers}
            queue_size: 4
        """) + textwrap.indent(textwrap.dedent(stage_extra), "    ") + textwrap.dedent("""\
        consumer: {fn: mpipe.workloads.notes:accumulate}
        writer: {path: results.h5}
        output_dirs: [output]
        shutdown_grace_s: 5
        allowed_modules: [mpipe.workloads, tests.faults]
        """) + textwrap.dedent(extra))
    return cfg


def mpipe(*args: str | Path, cwd: Path | None = None, timeout: float = 100,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user does: a real subprocess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mpipe", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def start_mpipe(*args: str | Path, cwd: Path | None = None,
                env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "mpipe", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, **kw)  # type: ignore[call-overload]


def check_against_reference(workdir: Path, tasks: int, repeat: int, *,
                            expect_tasks: list[int] | None = None) -> None:
    import h5py
    import numpy as np

    ref = reference(tasks, repeat)
    expect = list(range(tasks)) if expect_tasks is None else expect_tasks
    with h5py.File(workdir / "results.h5", "r") as f:
        results = f["results"][:] if "results" in f else np.zeros((0, CHANNELS))
        done = f["done"][:] if "done" in f else np.zeros(0, bool)
        total = f["total"][:]
    assert results.shape == (tasks, CHANNELS) or not expect
    assert sorted(np.flatnonzero(done).tolist()) == expect
    for t in expect:
        np.testing.assert_allclose(results[t], ref.vectors[t], rtol=1e-6)
    if expect == list(range(tasks)):
        np.testing.assert_allclose(total, ref.total, rtol=1e-6)
    for t in expect:
        for c in range(CHANNELS):
            name = f"output/t{t:03d}/ch{c:02d}.npy"
            assert (workdir / name).read_bytes() == ref.files[name], f"{name} differs"


