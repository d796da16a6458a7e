"""A long-lived Dask cluster on loopback for the ``dask`` suite of ``mpipe bench``.

Started once before the timed runs and stopped after them: its start-up is
what a long-lived cluster amortises, so it is not part of any timed run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mpipe.bench import measure

DASK = Path(sys.executable).parent / "dask"


class LongLivedCluster:
    """A scheduler and ``workers`` single-thread workers on loopback."""

    def __init__(self, workers: int, scratch: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{port}"
        # As docs/DISTRIBUTED.md recommends: the malloc settings of mpipe's own
        # workers (mpipe.allocator), mpipe's retries decide, one task per thread.
        conf = scratch / "dask-config"
        # Fresh directories each time: the previous make bench left its own.
        shutil.rmtree(conf, ignore_errors=True)
        conf.mkdir(parents=True)
        (conf / "mpipe.yaml").write_text(textwrap.dedent("""\
            distributed:
              nanny:
                pre-spawn-environ:
                  MALLOC_TRIM_THRESHOLD_: 268435456
                  MALLOC_MMAP_THRESHOLD_: 33554432
              scheduler:
                allowed-failures: 0
                worker-saturation: 1.0
            """))
        env = {**os.environ, "DASK_CONFIG": str(conf)}
        self.logs = scratch / "dask-logs"
        shutil.rmtree(self.logs, ignore_errors=True)
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
        measure.KEEP.add(self.procs[-1].pid)

    def stop(self) -> None:
        for p in self.procs:
            measure.KEEP.discard(p.pid)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
