"""The usable core count: affinity mask and cgroup CPU quota (mpipe.cores).

The parsing is tested on file trees shaped like /proc and /sys/fs/cgroup (v1 and
v2, quotas on the process's own cgroup and on a parent); where the test may create
a real cgroup (root, cgroup v1's cpu controller writable), a real run under a
one-core quota must start one worker for ``workers: auto``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpipe.cores import cgroup_cpu_limit, usable_cores
from tests.conftest import REPO, check_against_reference, make_inputs, notes_config

V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = ("32 31 0:29 {root} /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
             "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")


def affinity() -> int:
    """What mpipe starts from: 3.13's process_cpu_count (PYTHON_CPU_COUNT), or the mask."""
    counted = getattr(os, "process_cpu_count", None)
    return counted() if counted is not None else len(os.sched_getaffinity(0))


def fake_root(tmp_path: Path, mountinfo: str, cgroup: str,
              files: dict[str, str]) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(
        "23 1 0:22 / /sys rw - sysfs sysfs rw\n" + mountinfo)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_v2_quota_on_the_services_own_cgroup(tmp_path: Path) -> None:
    root = fake_root(tmp_path, V2_MOUNT, "0::/system.slice/nightly.service\n", {
        "sys/fs/cgroup/cpu.max": "max 100000\n",
        "sys/fs/cgroup/system.slice/cpu.max": "max 100000\n",
        "sys/fs/cgroup/system.slice/nightly.service/cpu.max": "150000 100000\n",
    })
    assert cgroup_cpu_limit(root) == 1.5
    assert usable_cores(root) == min(affinity(), 2)


def test_v2_a_parents_quota_applies_when_tighter(tmp_path: Path) -> None:
    root = fake_root(tmp_path, V2_MOUNT, "0::/batch.slice/nightly.service\n", {
        "sys/fs/cgroup/batch.slice/cpu.max": "50000 100000\n",
        "sys/fs/cgroup/batch.slice/nightly.service/cpu.max": "300000 100000\n",
    })
    assert cgroup_cpu_limit(root) == 0.5
    assert usable_cores(root) == 1  # never 0: half a core still runs one worker


def test_v1_with_cpu_cpuacct_and_a_hybrid_line(tmp_path: Path) -> None:
    root = fake_root(tmp_path, V1_MOUNTS.format(root="/") + V2_MOUNT,
                     "5:memory:/job\n4:cpu,cpuacct:/job\n0::/job\n", {
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us": "100000\n",
        "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/job/cpu.max": "max 100000\n",
    })
    assert cgroup_cpu_limit(root) == 1.0
    assert usable_cores(root) == 1


def test_v1_container_seeing_its_hosts_path(tmp_path: Path) -> None:
    # Docker on cgroup v1 without a cgroup namespace: /proc/self/cgroup names the
    # host's path, and the container's own cgroup is what is mounted.
    # (A cgroup of the container's own that happens to be named docker/abc is
    # someone else's: its tighter quota must not be read.)
    root = fake_root(tmp_path / "namespaced", V1_MOUNTS.format(root="/docker/abc"),
                     "4:cpu,cpuacct:/docker/abc\n", {
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
        "sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_cpu_limit(root) == 2.0
    # A process whose cgroup is not under what is mounted (a sibling whose name
    # merely starts the same) reads nothing there.
    sibling = fake_root(tmp_path / "sibling", V1_MOUNTS.format(root="/docker/abc"),
                        "4:cpu,cpuacct:/docker/abcdef\n", {
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_cpu_limit(sibling) is None
    # The same, where mountinfo shows "/" mounted: the named path is not there,
    # and the mount point's own files are read.
    other = fake_root(tmp_path / "other", V1_MOUNTS.format(root="/"),
                      "4:cpu,cpuacct:/docker/abc\n", {
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "300000\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_cpu_limit(other) == 3.0


def test_no_quota_or_nothing_readable_means_the_affinity(tmp_path: Path) -> None:
    unlimited = fake_root(tmp_path / "a", V2_MOUNT, "0::/user.slice\n", {
        "sys/fs/cgroup/cpu.max": "max 100000\n",
        "sys/fs/cgroup/user.slice/cpu.max": "max 100000\n",
    })
    assert cgroup_cpu_limit(unlimited) is None
    assert usable_cores(unlimited) == affinity()
    garbled = fake_root(tmp_path / "b", V2_MOUNT, "0::/\n",
                        {"sys/fs/cgroup/cpu.max": "lots\n"})
    assert cgroup_cpu_limit(garbled) is None
    (tmp_path / "c").mkdir()
    assert cgroup_cpu_limit(tmp_path / "c") is None  # no /proc at all
    assert usable_cores(tmp_path / "c") == affinity()


def test_optional_fields_escapes_and_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    # mountinfo's optional fields ("shared:4") sit before " - "; a space in a path
    # is written \040; a name may hold any byte but "/" (here 0xe9, not UTF-8).
    mountinfo = ("30 23 0:26 / /sys/fs/cgroup\\040v2 rw,nosuid shared:4 master:1 - "
                 "cgroup2 cgroup2 rw\n"
                 "31 23 0:27 / /mnt/caf\xe9 rw shared:5 - tmpfs x rw\n")
    root = fake_root(tmp_path, "", "", {
        "sys/fs/cgroup v2/job.slice/cpu.max": "250000 100000\n",
    })
    (root / "proc/self/mountinfo").write_bytes(mountinfo.encode("latin-1"))
    (root / "proc/self/cgroup").write_bytes(b"0::/job.slice\n")
    assert cgroup_cpu_limit(root) == 2.5
    (root / "proc/self/cgroup").write_bytes(b"0::/caf\xe9.slice\n")
    not_utf8 = root / "sys/fs/cgroup v2" / os.fsdecode(b"caf\xe9.slice")
    not_utf8.mkdir()
    (not_utf8 / "cpu.max").write_text("100000 100000\n")
    assert cgroup_cpu_limit(root) == 1.0


V1_CPU = Path("/sys/fs/cgroup/cpu")



@pytest.fixture
def one_core_cgroup() -> Iterator[Path]:
    """A real cgroup v1 child with a one-core quota; skipped where none can be made."""
    if not (V1_CPU / "cpu.cfs_quota_us").exists() or not os.access(V1_CPU, os.W_OK):
        pytest.skip("needs a writable cgroup v1 cpu controller (root in this sandbox)")
    group = V1_CPU / f"mpipe-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup here: {exc}")
    try:
        try:
            (group / "cpu.cfs_quota_us").write_text("100000")
        except OSError as exc:
            pytest.skip(f"cannot set a CPU quota here: {exc}")
        yield group
    finally:
        # A process left in the group (a failed run's: no_child_left_behind,
        # which runs after this, reports it) goes back to the parent group
        # first, or removing the group would fail and hide that report.
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                (V1_CPU / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # exited meanwhile
        group.rmdir()


def test_workers_auto_under_a_real_one_core_quota(tmp_path: Path,
                                                  one_core_cgroup: Path) -> None:
    import subprocess
    import sys

    if affinity() < 2:
        pytest.skip("one core already: a one-core quota would change nothing to see")
    make_inputs(tmp_path, 3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0, workers="auto")
    # The shell joins the cgroup, then becomes mpipe: every process of the run is in it.
    command = (f'echo $$ > {one_core_cgroup}/cgroup.procs && '
               f'exec "{sys.executable}" -m mpipe run "{cfg}" --quiet')
    proc = subprocess.run(["sh", "-c", command], cwd=tmp_path, capture_output=True,
                          text=True, timeout=100, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / ".mpipe/notes/last-run.json").read_text())
    assert report["cores"] == 1
    assert report["stages"]["compute"]["workers"] == 1
    check_against_reference(tmp_path, 3, 0)
