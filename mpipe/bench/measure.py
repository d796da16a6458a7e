"""Timing one whole run in a fresh subprocess: wall time, CPU time, peak memory.

CPU time comes from ``getrusage(RUSAGE_CHILDREN)`` deltas, which count a
process only once it has been reaped, and count its descendants only if they
were reaped in turn.  A pool's helpers (multiprocessing's forkserver and
resource tracker, loky's workers) may outlive the process that started them and
be re-parented away, taking their CPU time with them.  So the harness makes
itself a *child subreaper*: orphans come back to it, and :func:`run_timed`
reaps every descendant after each run, so nothing from one run is still
running (or unaccounted) when the next starts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
# How long a run's leftover helpers get to notice their parent is gone.
REAP_DEADLINE_S = 15.0


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


@dataclass
class Sample:
    """One timed run."""

    wall_s: float
    cpu_s: float  # user + sys of the run's whole process tree
    returncode: int
    cores: int
    peak_rss_bytes: int | None = None
    peak_processes: int | None = None
    sum_process_peaks_bytes: int | None = None
    # The tree's proportional set size (see _TreeMemory); None where it could
    # not be read for every process.
    peak_pss_bytes: int | None = None
    stragglers: int = 0  # descendants still alive after the deadline (killed)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_pct(self) -> float:
        """CPU utilisation of the machine: CPU seconds / (wall * cores)."""
        return 100.0 * self.cpu_s / (self.wall_s * self.cores) if self.wall_s > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "wall_s": round(self.wall_s, 4), "cpu_s": round(self.cpu_s, 4),
            "cpu_pct": round(self.cpu_pct, 1), "returncode": self.returncode,
        }
        if self.peak_rss_bytes is not None:
            doc["peak_rss_bytes"] = self.peak_rss_bytes
            doc["peak_processes"] = self.peak_processes
            doc["sum_process_peaks_bytes"] = self.sum_process_peaks_bytes
            doc["peak_pss_bytes"] = self.peak_pss_bytes
        if self.stragglers:
            doc["stragglers"] = self.stragglers
        doc.update(self.extra)
        return doc


class _TreeMemory(threading.Thread):
    """Samples the summed RSS, and PSS, of a process and all its descendants.

    Every process that mpipe forks from its forkserver shares the
    forkserver's pages (numpy's code and objects) until it writes them: RSS
    counts them whole in each, so the summed RSS grows with the number of
    processes alive at once, even with nothing new in memory.  PSS counts a
    page shared by k processes as 1/k in each (``/proc/PID/smaps_rollup``,
    read by psutil); k counts every process on the machine that maps it, the
    harness's own included, so the tree's sum understates it a little and
    the ratio of two runs is what to read.  PSS is read every
    ``PSS_EVERY``-th sample only: it walks each process's page tables, some
    24x the cost of RSS (0.43 against 0.018 ms for a 400 MB process).
    """

    PSS_EVERY = 5

    def __init__(self, pid: int, interval_s: float) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid = pid
        self.interval_s = interval_s
        self.peak = 0
        self.peak_pss: int | None = 0  # None once a process's PSS could not be read
        self.pss_reads = 0
        self.peak_processes = 0
        # Per process: the tree's peak depends on whether the workers' own peaks
        # happen to coincide, which gets likelier the more tasks a run has.
        self.per_process: dict[int, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        # PSS from the 5th sample on (not at once: the run has not started
        # up yet), and None if it was read fewer than twice (a run too short
        # for its sampling to mean anything).
        tick = 1
        while not self._halt.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    continue
                total += rss
                self.per_process[p.pid] = max(self.per_process.get(p.pid, 0), rss)
            self.peak = max(self.peak, total)
            if tick % self.PSS_EVERY == 0 and self.peak_pss is not None:
                self.peak_pss = self._pss_sum(procs, self.peak_pss)
                self.pss_reads += 1
            tick += 1
            self.peak_processes = max(self.peak_processes, len(procs))
            self._halt.wait(self.interval_s)

    @staticmethod
    def _pss_sum(procs: list[Any], peak: int) -> int | None:
        """max(peak, the processes' summed PSS); None if one could not be read."""
        import psutil

        total = 0
        for p in procs:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue  # gone since the RSS pass
            except (psutil.Error, OSError, AttributeError):
                # Denied, or no smaps on this kernel (psutil's full info is
                # then plain memory_info, without .pss): no partial sums.
                return None
        return max(peak, total)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# Processes the harness started to outlive runs (a long-lived Dask cluster):
# they and their descendants are neither waited for nor killed after a run.
KEEP: set[int] = set()


def _reap_all(deadline_s: float) -> int:
    """Wait for every descendant (orphans come back to us); kill the slow ones."""
    end = time.monotonic() + deadline_s
    while True:
        _reap_exited()
        left = _descendants_not_kept()
        if not left:
            # Those that exited since the last reap are zombies, not listed:
            # reap them too, or their CPU time lands on the next run.
            _reap_exited()
            return 0
        if time.monotonic() >= end:
            break
        time.sleep(0.005)
    for p in left:
        logger.warning("killing a leftover process: pid %d %s", p.pid, p.name())
    _kill_and_reap(left)
    return len(left)


def _kill_and_reap(procs: list[Any]) -> None:
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
    _reap_exited()


def _reap_exited() -> None:
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def _descendants_not_kept() -> list[Any]:
    import psutil

    everyone = psutil.Process().children(recursive=True)
    kept = set(KEEP)
    for p in everyone:
        if p.pid in KEEP:
            try:
                kept.update(c.pid for c in p.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    left = []
    for p in everyone:
        try:
            if p.pid not in kept and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def run_timed(cmd: list[str], *, cores: int, log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None, timeout_s: float = 1800.0,
              memory_interval_s: float | None = None) -> Sample:
    """Run ``cmd`` to its end; wall time from just before start to its exit."""
    with open(log, "wb") as out:
        cpu0 = _cpu_children()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        sampler = None
        if memory_interval_s is not None:
            sampler = _TreeMemory(proc.pid, memory_interval_s)
            sampler.start()
        rc = _wait_exactly(proc, timeout_s)
        wall = time.perf_counter() - t0
        if sampler is not None:
            sampler.stop()
        stragglers = _reap_all(REAP_DEADLINE_S)
        cpu = _cpu_children() - cpu0
    sample = Sample(wall_s=wall, cpu_s=cpu, returncode=rc, cores=cores, stragglers=stragglers)
    if sampler is not None:
        sample.peak_rss_bytes = sampler.peak
        sample.peak_processes = sampler.peak_processes
        sample.sum_process_peaks_bytes = sum(sampler.per_process.values())
        sample.peak_pss_bytes = (sampler.peak_pss or None) if sampler.pss_reads >= 2 else None
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        logger.error("%s exited %d; log %s:\n%s", " ".join(cmd), rc, log, tail)
    return sample


def _wait_exactly(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """``proc.wait()``, killing it after ``timeout_s``, timed to its exit.

    Not ``proc.wait(timeout)``: with a timeout, Popen polls with sleeps that
    grow to 50 ms, so every wall time came out rounded up to the next poll
    (python + numpy measured 0.168 or 0.218 s, nothing between).  A blocking
    waitpid returns at the exit; a timer kills the process if it hangs.
    """
    timer = threading.Timer(timeout_s, proc.kill)
    timer.daemon = True
    timer.start()
    try:
        return proc.wait()
    except BaseException:
        # Interrupted (Ctrl-C, or SIGTERM, which `mpipe bench` turns into
        # SystemExit): the run being timed must not outlive the harness.
        _kill_tree(proc.pid)
        raise
    finally:
        timer.cancel()


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    _kill_and_reap(tree)


def run_group(cmds: list[list[str]], *, cores: int, logs: list[Path],
              env: dict[str, str] | None = None, timeout_s: float = 1800.0) -> Sample:
    """Start several commands together; the wall time ends when the last exits."""
    handles = [open(log, "wb") for log in logs]  # noqa: SIM115 (closed below)
    try:
        cpu0 = _cpu_children()
        t0 = time.perf_counter()
        procs = [subprocess.Popen(c, stdout=h, stderr=subprocess.STDOUT, env=env)
                 for c, h in zip(cmds, handles, strict=True)]
        deadline = time.monotonic() + timeout_s
        try:
            codes = [_wait_exactly(p, max(0.0, deadline - time.monotonic())) for p in procs]
        except BaseException:
            # _wait_exactly killed the one it waited for; the others go too.
            for p in procs:
                _kill_tree(p.pid)
            raise
        wall = time.perf_counter() - t0
        stragglers = _reap_all(REAP_DEADLINE_S)
        cpu = _cpu_children() - cpu0
    finally:
        for h in handles:
            h.close()
    rc = next((c for c in codes if c != 0), 0)
    if rc != 0:
        logger.error("a floor process exited %d; logs %s", rc, ", ".join(map(str, logs)))
    return Sample(wall_s=wall, cpu_s=cpu, returncode=rc, cores=cores, stragglers=stragglers)
