"""Stage workers keep the memory their items free (mpipe.allocator).

Counted, not timed: the page faults a stage takes to fill 26 fresh 1.25 MiB
arrays per item, as the notes' tasks read their inputs.  Under glibc's own
settings the freed arrays go back to the system and every item faults them in
again; with keep_freed_memory_mb the next item reuses them.
"""

from __future__ import annotations

import platform
import statistics
import textwrap
from pathlib import Path

import h5py
import pytest

from tests.conftest import mpipe
from tests.memory_stages import PAGES_PER_ITEM

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="mallopt's thresholds are glibc's")


def _faults_per_item(workdir: Path, keep_mb: int | None, env: dict[str, str] | None = None
                     ) -> float:
    """The median page faults of items 2..8 of one worker (the first grows its heap)."""
    keep = "" if keep_mb is None else f"keep_freed_memory_mb: {keep_mb}\n"
    cfg = workdir / "pipeline.yaml"
    cfg.write_text(textwrap.dedent("""\
        pipeline: memory
        params: {n: 8}
        source: {fn: tests.memory_stages:numbers}
        stages:
          churn: {fn: tests.memory_stages:churn, workers: 1, queue_size: 1}
        allowed_modules: [tests.memory_stages]
        fsync: false
        """) + keep)
    proc = mpipe("run", cfg, "--quiet", cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(workdir / "results.h5") as f:
        faults = dict(zip(f["keys"].asstr()[:], f["results"][:], strict=True))
    assert sorted(faults, key=int) == [str(i) for i in range(8)]
    return float(statistics.median(faults[str(i)] for i in range(1, 8)))


def test_a_worker_reuses_what_its_items_freed(tmp_path: Path) -> None:
    faults = _faults_per_item(tmp_path, None)  # the default: 256 MiB
    assert faults < PAGES_PER_ITEM / 10, (faults, PAGES_PER_ITEM)


def test_zero_leaves_the_c_library_settings_and_every_item_faults_again(tmp_path: Path) -> None:
    faults = _faults_per_item(tmp_path, 0)
    assert faults > PAGES_PER_ITEM / 2, (faults, PAGES_PER_ITEM)


def test_the_users_own_malloc_settings_win(tmp_path: Path) -> None:
    # 128 KiB: glibc's default mmap threshold, pinned: each array is mmapped.
    faults = _faults_per_item(tmp_path, 256, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert faults > PAGES_PER_ITEM / 2, (faults, PAGES_PER_ITEM)
    plan = mpipe("plan", tmp_path / "pipeline.yaml", cwd=tmp_path,
                 env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert "keep_freed_memory_mb is not applied" in plan.stdout, plan.stdout
