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

from mpipe import allocator
from tests.conftest import mpipe
from tests.memory_stages import pages

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                                reason="mallopt's thresholds are glibc's")


def _huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


# With transparent huge pages always on, the heap is faulted in 2 MiB at a time
# under glibc's own settings too: the tests that count faults "again" cannot tell.
faults_again = pytest.mark.skipif(_huge_pages_always(),
                                  reason="transparent huge pages: always")


@pytest.fixture(autouse=True)
def _no_malloc_settings_of_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    # The settings of whoever runs the tests would win over the config's.
    for var in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(var, raising=False)


def _faults_per_item(workdir: Path, keep_mb: int | None, env: dict[str, str] | None = None,
                     arrays: int = 26) -> float:
    """The median page faults of items 2..8 of one worker (the first grows its heap)."""
    keep = "" if keep_mb is None else f"keep_freed_memory_mb: {keep_mb}\n"
    cfg = workdir / "pipeline.yaml"
    cfg.write_text(textwrap.dedent("""\
        pipeline: memory
        params: {n: 8, arrays: ARRAYS}
        source: {fn: tests.memory_stages:numbers}
        stages:
          churn: {fn: tests.memory_stages:churn, workers: 1, queue_size: 1}
        allowed_modules: [tests.memory_stages]
        fsync: false
        """).replace("ARRAYS", str(arrays)) + keep)
    proc = mpipe("run", cfg, "--quiet", cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(workdir / "results.h5") as f:
        faults = dict(zip(f["keys"].asstr()[:], f["results"][:], strict=True))
    assert sorted(faults, key=int) == [str(i) for i in range(8)]
    return float(statistics.median(faults[str(i)] for i in range(1, 8)))


def _plan(workdir: Path, env: dict[str, str] | None = None) -> str:
    plan = mpipe("plan", workdir / "pipeline.yaml", cwd=workdir, env=env)
    assert plan.returncode == 0, plan.stderr
    [line] = [line for line in plan.stdout.splitlines() if line.startswith("  memory ")]
    return line


def test_a_worker_reuses_what_its_items_freed(tmp_path: Path) -> None:
    faults = _faults_per_item(tmp_path, None)  # the default: 256 MiB
    assert faults < pages(26) / 10, (faults, pages(26))
    assert "until 256 MiB is free" in _plan(tmp_path)


@faults_again
def test_zero_leaves_the_c_library_settings_and_every_item_faults_again(tmp_path: Path) -> None:
    faults = _faults_per_item(tmp_path, 0)
    assert faults > pages(26) / 2, (faults, pages(26))
    assert "the C library's malloc settings (keep_freed_memory_mb: 0)" in _plan(tmp_path)


@faults_again
def test_less_than_the_arrays_an_item_frees_is_mostly_returned(tmp_path: Path) -> None:
    # 80 x 1.25 MiB freed at once: glibc trims whenever 32 MiB is free at the top,
    # so at most about 32 MiB of the 100 stays.
    faults = _faults_per_item(tmp_path, 32, arrays=80)
    assert faults > pages(80) / 2, (faults, pages(80))


@faults_again
@pytest.mark.parametrize("env", [
    {"MALLOC_MMAP_THRESHOLD_": "131072"},  # glibc's first mmap threshold, pinned
    {"MALLOC_TRIM_THRESHOLD_": "65536"},  # the Dask nanny's: pins the mmap threshold too
    {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"},
], ids=["mmap-variable", "trim-variable", "tunable"])
def test_the_users_own_malloc_settings_win(tmp_path: Path, env: dict[str, str]) -> None:
    faults = _faults_per_item(tmp_path, 256, env=env)
    assert faults > pages(26) / 2, (faults, pages(26))
    assert "keep_freed_memory_mb is not applied" in _plan(tmp_path, env)


def test_a_dask_nanny_we_start_gives_its_workers_the_same_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(var, raising=False)
    assert allocator.nanny_environ(256) == {"MALLOC_TRIM_THRESHOLD_": str(256 << 20),
                                            "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
    assert allocator.nanny_environ(64) == {"MALLOC_TRIM_THRESHOLD_": str(64 << 20),
                                           "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
    # 0: glibc's own settings, so not the nanny's MALLOC_TRIM_THRESHOLD_=65536 either.
    assert allocator.nanny_environ(0) == {"MALLOC_TRIM_THRESHOLD_": None,
                                          "MALLOC_MMAP_THRESHOLD_": None}
    # The user's own, passed through as exported.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert allocator.nanny_environ(256) == {"MALLOC_TRIM_THRESHOLD_": "1048576",
                                            "MALLOC_MMAP_THRESHOLD_": None}
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    assert allocator.nanny_environ(256) == {"MALLOC_TRIM_THRESHOLD_": None,
                                            "MALLOC_MMAP_THRESHOLD_": None}


def test_the_nanny_default_is_told_apart_from_settings_that_keep_memory() -> None:
    assert allocator.pins_mmap_threshold_low({"MALLOC_TRIM_THRESHOLD_": "65536"})
    assert allocator.pins_mmap_threshold_low({"MALLOC_TOP_PAD_": "131072"})
    assert allocator.pins_mmap_threshold_low(
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536"})
    assert not allocator.pins_mmap_threshold_low(allocator.environment(256))
    assert not allocator.pins_mmap_threshold_low(
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536:glibc.malloc.mmap_threshold=1"})
    assert not allocator.pins_mmap_threshold_low({})
