"""Overhead of the Dask backend against the local one, on the notes workload.

    .venv/bin/python -m mpipe.bench.dask_overhead --pairs 5

Runs the same pipeline (notes workload, T tasks, R repeats, W workers) with
three setups, interleaved so that machine load drifts hit each alike:

* ``local``:         the local backend (``backend: local``, W worker processes);
* ``localcluster``:  ``backend: {dask: {local_workers: W}}``: mpipe starts and
                     stops a Dask LocalCluster in every run (its start-up counts);
* ``address``:       ``backend: {dask: {address: ...}}`` against a long-lived
                     cluster (a scheduler and W single-thread workers) that this
                     script starts once before the timed runs and stops after;
                     its start-up is not counted: that is what a long-lived
                     cluster amortises.

The time of a run is the wall-clock time of the whole ``mpipe run`` process
(interpreter start to exit).  One untimed warm-up run per setup comes first
(page cache, and the long-lived workers' first imports).  Inputs are made once,
untimed.  The order alternates between rounds (local first, then Dask first)
so neither setup always runs right after the other.  Prints every run, the
medians, and the median of the per-round ratios.

On a machine shared with other work, a round is kept only if, during each of
its runs, processes other than ours used less than ``--max-foreign`` of the
cores (Linux: total busy time from /proc/stat minus the CPU time of this
script's process tree, which it adopts as a child subreaper so that nothing
it starts escapes the count); otherwise the round is run again, and the
rejected rounds are reported.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

PYTHON = sys.executable
DASK = Path(sys.executable).parent / "dask"
PR_SET_CHILD_SUBREAPER = 36
TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def config(workdir: Path, tasks: int, repeat: int, workers: int) -> Path:
    cfg = workdir / "pipeline.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        pipeline: notes
        workdir: .
        params: {{tasks: {tasks}, repeat: {repeat}, seed: 0}}
        prepare: {{fn: mpipe.workloads.notes:prepare}}
        source: {{fn: mpipe.workloads.notes:tasks}}
        stages:
          compute: {{fn: mpipe.workloads.notes:process_task, workers: {workers}}}
        consumer: {{fn: mpipe.workloads.notes:accumulate}}
        writer: {{path: results.h5}}
        output_dirs: [output]
        """))
    return cfg


def busy_s() -> float:
    """CPU seconds spent busy on the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / TICK


def own_cpu_s(keep: set[int]) -> float:
    """CPU seconds of our reaped descendants plus our live ones in ``keep``."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    for pid in keep:
        try:
            for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def reap_orphans(keep: set[int], timeout: float = 15.0) -> None:
    """Wait for what a run left to us as subreaper (forkserver, resource tracker)."""
    deadline = time.monotonic() + timeout
    for child in psutil.Process().children():
        if child.pid in keep:
            continue
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except psutil.TimeoutExpired:
            raise SystemExit(f"pid {child.pid} outlived its run: {child.cmdline()}") from None


def run(cfg: Path, backend: str, keep: set[int]) -> tuple[float, float, float]:
    """(process wall-clock s, the report's wall_s, share of the cores used by
    others meanwhile) of one fresh run."""
    cmd = [PYTHON, "-m", "mpipe", "run", str(cfg), "--fresh", "--quiet",
           "--set", f"backend={backend}"]
    busy0, own0 = busy_s(), own_cpu_s(keep)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    busy1 = busy_s()
    reap_orphans(keep)
    own1 = own_cpu_s(keep)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    report = json.loads((cfg.parent / ".mpipe/notes/last-run.json").read_text())
    # Signed: a few negative percent is the granularity of the two clocks.
    foreign = ((busy1 - busy0) - (own1 - own0)) / (elapsed * CORES)
    return elapsed, float(report["wall_s"]), foreign


def wait_until_quiet(limit: float, keep: set[int], timeout: float = 3600.0) -> None:
    """Block until others leave the machine nearly idle for two seconds.

    Our own idle long-lived cluster (five processes heartbeating) must not
    count: it alone can use a good part of a 5 % threshold.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy0, own0 = busy_s(), own_cpu_s(keep)
        time.sleep(2.0)
        if ((busy_s() - busy0) - (own_cpu_s(keep) - own0)) / (2.0 * CORES) < limit:
            return
    raise SystemExit("the machine never became quiet enough to measure")


class LongLivedCluster:
    """A scheduler and ``workers`` single-thread workers on loopback."""

    def __init__(self, workers: int, scratch: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{port}"
        # As docs/DISTRIBUTED.md recommends: no MALLOC_TRIM_THRESHOLD_ in the
        # workers, mpipe's retries decide, one task per thread.
        conf = scratch / "dask-config"
        conf.mkdir()
        (conf / "mpipe.yaml").write_text(textwrap.dedent("""\
            distributed:
              nanny:
                pre-spawn-environ:
                  MALLOC_TRIM_THRESHOLD_: null
              scheduler:
                allowed-failures: 0
                worker-saturation: 1.0
            """))
        env = {**os.environ, "DASK_CONFIG": str(conf)}
        self.logs = scratch / "dask-logs"
        self.logs.mkdir()
        self.procs: list[subprocess.Popen[bytes]] = []
        self._start(env, "scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                    "--no-dashboard")
        for i in range(workers):
            self._start(env, f"worker{i}", "worker", self.address, "--nworkers", "1",
                        "--nthreads", "1", "--no-dashboard")
        deadline = time.monotonic() + 60
        while not all("Registered to" in (self.logs / f"worker{i}.log").read_text()
                      for i in range(workers)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise SystemExit(f"the Dask cluster did not come up; logs in {self.logs}")
            time.sleep(0.2)

    def _start(self, env: dict[str, str], name: str, *args: str) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.procs.append(subprocess.Popen([str(DASK), *args], env=env,
                                               stdout=subprocess.DEVNULL, stderr=log))

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--setups", default="local,localcluster,address",
                        help="comma-separated, from: local, localcluster, address")
    parser.add_argument("--max-foreign", type=float, default=0.05,
                        help="reject a round if other processes used more than this "
                        "share of the cores during any of its runs (default 0.05)")
    args = parser.parse_args()
    setups = args.setups.split(",")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit("prctl(PR_SET_CHILD_SUBREAPER) failed")

    with tempfile.TemporaryDirectory(prefix="mpipe-dask-bench-") as tmp:
        scratch = Path(tmp)
        workdir = scratch / "work"
        workdir.mkdir()
        cfg = config(workdir, args.tasks, args.repeat, args.workers)
        cluster = LongLivedCluster(args.workers, scratch) if "address" in setups else None
        backends = {
            "local": "local",
            "localcluster": f"{{dask: {{local_workers: {args.workers}}}}}",
            "address": f"{{dask: {{address: '{cluster.address}'}}}}" if cluster else "",
        }
        keep = {p.pid for p in cluster.procs} if cluster else set()
        times: dict[str, list[tuple[float, float]]] = {s: [] for s in setups}
        rejected = 0
        try:
            for setup in setups:  # warm-up (also makes the inputs): untimed
                run(cfg, backends[setup], keep)
            i = 0
            while i < args.pairs:
                order = setups if i % 2 == 0 else setups[::-1]
                wait_until_quiet(args.max_foreign, keep)
                results = {setup: run(cfg, backends[setup], keep) for setup in order}
                worst = max(foreign for _, _, foreign in results.values())
                verdict = "kept" if worst <= args.max_foreign else "REJECTED, run again"
                for setup in order:
                    elapsed, wall, foreign = results[setup]
                    print(f"round {i + 1} {setup:13s} process {elapsed:6.2f}s  report wall_s "
                          f"{wall:6.2f}s  others used {foreign:+4.0%} of the cores", flush=True)
                print(f"round {i + 1}: {verdict}", flush=True)
                if worst > args.max_foreign:
                    rejected += 1
                    continue
                for setup in order:
                    times[setup].append(results[setup][:2])
                i += 1
        finally:
            if cluster is not None:
                cluster.stop()

    print(f"\nnotes workload T={args.tasks} R={args.repeat}, {args.workers} workers, "
          f"{args.pairs} interleaved rounds kept ({rejected} rejected: other load above "
          f"{args.max_foreign:.0%} of the cores); process wall-clock, median:")
    base = [t for t, _ in times[setups[0]]]
    for setup in setups:
        mine = [t for t, _ in times[setup]]
        ratios = [m / b for m, b in zip(mine, base, strict=True)]
        print(f"  {setup:13s} {statistics.median(mine):6.2f}s  "
              f"(min {min(mine):.2f}, max {max(mine):.2f})  "
              f"median ratio to {setups[0]}: {statistics.median(ratios):.3f}  "
              f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
