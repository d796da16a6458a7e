"""How many cores this process may use: the default of ``workers: auto`` and ``cpu_slots``.

``os.cpu_count()`` is the machine's count.  Two things give a process fewer:

* its **affinity mask** (``taskset``, a cpuset, ``docker --cpuset-cpus``):
  ``os.sched_getaffinity`` (on Python 3.13+, ``os.process_cpu_count()``, which
  a user may also set with ``PYTHON_CPU_COUNT`` or ``-X cpu_count``; a quota
  still caps it);
* a **CPU quota** of its cgroup (``docker --cpus=2``, Kubernetes' CPU limits, a
  systemd unit's ``CPUQuota=``): the kernel lets the group run ``quota`` us per
  ``period`` us, however many cores it sees.  Ten workers under a two-core quota
  are throttled in turn, each holding whatever it had locked while it waits.

So the count is the smaller of the two, the quota rounded up (1.5 cores -> 2),
as loky (joblib's executor) counts.  Unlike loky, which reads only the cgroup
root, the quota is looked for along the process's own cgroup path and every
parent's, since a limit anywhere above applies (a systemd service lives in
``/system.slice/x.service``, not at the root).  Linux only; elsewhere, and
when nothing can be read, the affinity (or the machine's count) alone.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path


@functools.cache  # read once per process: a run's worker counts and slots must agree
def usable_cores(root: Path = Path("/")) -> int:
    """The cores this process may use: the affinity mask, less if a cgroup quota says so."""
    # Python 3.13's os.process_cpu_count() is the affinity mask, or what the user
    # set with PYTHON_CPU_COUNT / -X cpu_count; before 3.13, the mask.
    counted = getattr(os, "process_cpu_count", None)
    if counted is not None:
        cores = counted() or 1
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, math.ceil(limit))  # a quota is > 0: at least 1
    return cores


def cgroup_cpu_limit(root: Path = Path("/")) -> float | None:
    """The tightest CPU quota (in cores) on this process's cgroup or its parents; None
    if none is set or none can be read.  ``root`` stands for ``/`` in tests."""
    try:
        # Paths may hold any byte: decoded as Python decodes file names.
        mounts = _cpu_mounts(os.fsdecode((root / "proc/self/mountinfo").read_bytes()))
        memberships = os.fsdecode((root / "proc/self/cgroup").read_bytes())
    except OSError:
        return None
    limits = []
    for line in memberships.splitlines():
        hierarchy, _, path = line.partition(":")[2].partition(":")
        controllers = set(hierarchy.split(","))
        for mounted_root, mount_point, version in mounts:
            if (version == 2 and hierarchy == "") or (version == 1 and "cpu" in controllers):
                limit = _limit_along(root, mounted_root, mount_point, path, version)
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


def _cpu_mounts(mountinfo: str) -> list[tuple[str, str, int]]:
    """(cgroup mounted there, mount point, 1 or 2) of each cgroup v2 mount and each v1
    mount with the cpu controller (proc(5), /proc/pid/mountinfo)."""
    found = []
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        fields, rest = before.split(), after.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        mounted_root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        if rest[0] == "cgroup2":
            found.append((mounted_root, mount_point, 2))
        elif rest[0] == "cgroup" and "cpu" in rest[2].split(","):
            found.append((mounted_root, mount_point, 1))
    return found


def _limit_along(root: Path, mounted_root: str, mount_point: str, path: str,
                 version: int) -> float | None:
    """The tightest quota from the process's cgroup directory up to the mount point."""
    if mounted_root != "/" and not (path + "/").startswith(mounted_root.rstrip("/") + "/"):
        return None  # the process's cgroup is not under what is mounted here
    relative = path[len(mounted_root.rstrip("/")):].strip("/")
    top = root / mount_point.lstrip("/")
    # Where the named path is not there (a container on cgroup v1 without a cgroup
    # namespace names its host's path, its own cgroup is what is mounted), the walk
    # up reaches the mount point's own files.
    directory = top / relative
    limits = []
    while True:
        limit = _read_limit(directory, version)
        if limit is not None:
            limits.append(limit)
        if directory == top:
            break
        directory = directory.parent
    return min(limits) if limits else None


def _read_limit(directory: Path, version: int) -> float | None:
    try:
        if version == 2:
            quota, _, period = (directory / "cpu.max").read_text().partition(" ")
        else:
            quota = (directory / "cpu.cfs_quota_us").read_text()
            period = (directory / "cpu.cfs_period_us").read_text()
        quota, period = quota.strip(), period.strip()
        if quota == "max" or int(quota) <= 0 or int(period) <= 0:
            return None  # "max" (v2) and -1 (v1) mean no quota
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, char)
    return field
