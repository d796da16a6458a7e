"""``python -m mpipe.bench.processes -- COMMAND...``: the CPU and memory of each process of one run.

Runs the command and reads ``/proc`` every few milliseconds for it and every
descendant: CPU time (user, system), minor page faults, context switches
(waits: the process blocked; preempted: another took its core), its peak RSS
(``VmHWM``), and the name each
process gives itself (``mpipe-forksrv``, ``mpipe-compute-1``, ... : see
:func:`mpipe.procs.set_process_name`).  A total for the whole tree needs no
such tool (``make bench`` reports one); this says *which* process spent it,
e.g. whether an IO-bound run's extra CPU is in its workers or beside them.  The
last line also gives the tree's peak RSS: the largest sum over one sample.

    .venv/bin/python -m mpipe.bench.processes -- \
        .venv/bin/mpipe run bench-results/configs/notes-T40-R0-W2-nofsync.yaml --fresh --quiet

The last few milliseconds of each process fall between two samples and are
missed (``--interval``, default 3 ms); the tool makes itself a child
subreaper, so that helpers re-parented when their parent exits stay visible.
Linux only.  See docs/BENCHMARKS.md, "Where mpipe's time goes now".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from mpipe.bench import measure

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Seen:
    pid: int
    parent: int
    started: int  # clock ticks since boot
    name: str = ""
    user_s: float = 0.0
    system_s: float = 0.0
    minor_faults: int = 0
    waits: int = 0  # voluntary context switches: blocked (IO, a pipe, a lock)
    preempted: int = 0  # involuntary ones: another process took the core
    peak_rss_kib: int = 0  # VmHWM
    rss_kib: int = 0  # VmRSS at the last sample


def _read(pid: int) -> tuple[int, int, int, int, int, str, int, int, int, int] | None:
    """parent, minor faults, user ticks, system ticks, start ticks, name, voluntary and
    involuntary context switches, peak and current RSS (KiB); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # After the name: state, ppid, ..., minflt (8th), ..., utime, stime, ..., starttime.
    return (int(fields[1]), int(fields[7]), int(fields[11]), int(fields[12]), int(fields[19]),
            status["Name"].strip(), int(status["voluntary_ctxt_switches"]),
            int(status["nonvoluntary_ctxt_switches"]), _kib(status.get("VmHWM")),
            _kib(status.get("VmRSS")))


def _kib(field: str | None) -> int:
    return int(field.split()[0]) if field else 0  # "  1234 kB"; absent for a zombie


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(child) for child in f.read().split()]
    except OSError:
        pass
    return found


def sample_tree(root: int, seen: dict[int, Seen]) -> int:
    """Update ``seen`` from /proc; return the RSS (KiB) of the tree at this sample."""
    tree_rss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        read = _read(pid)
        if read is None:
            continue
        parent, faults, user, system, started, name, waits, preempted, peak, rss = read
        entry = seen.get(pid)
        if entry is None or entry.started != started:  # a reused pid is another process
            entry = seen[pid] = Seen(pid, parent, started)
        entry.name, entry.minor_faults = name, faults
        entry.waits, entry.preempted = waits, preempted
        entry.user_s, entry.system_s = user / TICKS, system / TICKS
        entry.peak_rss_kib, entry.rss_kib = max(entry.peak_rss_kib, peak), rss
        tree_rss += rss
        todo += _children(pid)
    return tree_rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpipe.bench.processes",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--interval", type=float, default=0.003, metavar="SECONDS")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    opts = parser.parse_args(argv)
    command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    if not command:
        parser.error("give the command to run after --")
    measure.become_subreaper()
    seen: dict[int, Seen] = {}
    started = time.perf_counter()
    proc = subprocess.Popen(command)
    tree_peak_kib = 0
    while proc.poll() is None:
        tree_peak_kib = max(tree_peak_kib, sample_tree(proc.pid, seen))
        time.sleep(opts.interval)
    wall = time.perf_counter() - started
    while True:  # reap what was re-parented to us
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    total = 0.0
    print(f"{'process':<16} {'pid':>7} {'parent':>7} {'CPU s':>6} {'user':>6} {'system':>6} "
          f"{'minor faults':>12} {'waits':>7} {'preempted':>9} {'peak MiB':>8}")
    for entry in sorted(seen.values(), key=lambda e: (e.started, e.pid)):
        cpu = entry.user_s + entry.system_s
        total += cpu
        print(f"{entry.name:<16} {entry.pid:>7} {entry.parent:>7} {cpu:6.2f} "
              f"{entry.user_s:6.2f} {entry.system_s:6.2f} {entry.minor_faults:>12} "
              f"{entry.waits:>7} {entry.preempted:>9} {entry.peak_rss_kib / 1024:8.0f}")
    print(f"{len(seen)} processes, CPU {total:.2f} s, wall {wall:.2f} s, tree peak RSS "
          f"{tree_peak_kib / 1024:.0f} MiB, exit {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
