"""``python -m mpipe.bench.timeline CONFIG``: when each process of one run does what.

A start-up profile across processes, which no single-process profiler gives:
every Python process of an ``mpipe run`` (the runner, multiprocessing's
resource tracker and forkserver, and each child) appends to one file when its
interpreter is up, when it first imports a few heavy modules, when it forks,
starts a subprocess or renames a file, and when its atexit handlers run; the
run's exit is added last.  It works through an audit hook (PEP 578) installed
by a ``sitecustomize`` module put first on ``PYTHONPATH``, so mpipe itself
carries no tracing code.  Times are seconds since the command was started.
The hooks slow every process a little: read the order and the gaps, not the
total (``make bench`` times runs without them).

    .venv/bin/python -m mpipe.bench.timeline bench-results/configs/notes-T0-R0-W1-nofsync.yaml

See docs/BENCHMARKS.md, "Where mpipe's time goes now".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WATCHED = ("yaml", "pydantic", "mpipe.config", "mpipe.runner", "mpipe.state",
           "mpipe.forkserver_init", "mpipe.worker", "numpy", "h5py", "rich")

_SITECUSTOMIZE = '''\
import os, sys, time
_t0 = float(os.environ["MPIPE_TIMELINE_T0"])
_path = os.environ["MPIPE_TIMELINE_FILE"]
_watched = set(os.environ["MPIPE_TIMELINE_WATCH"].split(","))
_seen = set()

def _mark(what):
    # Opened each time: mpipe's forked helpers close what they inherit.
    fd = os.open(_path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, f"{time.time() - _t0:8.3f} {os.getpid():7d}  {what}\\n".encode())
    finally:
        os.close(fd)

def _hook(event, args):
    if event == "import" and args[0] in _watched and args[0] not in _seen:
        _seen.add(args[0])
        _mark("import " + args[0])
    elif event == "os.fork":
        _mark("fork")
    elif event == "subprocess.Popen":
        _mark("subprocess " + " ".join(map(str, args[1]))[:60])
    elif event in ("os.rename", "os.replace"):
        _mark("rename -> " + os.path.basename(str(args[1])))

_mark("interpreter up: " + " ".join(sys.argv)[:70])
sys.addaudithook(_hook)
import atexit
atexit.register(lambda: _mark("atexit handlers done"))
'''


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpipe.bench.timeline",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("config", type=Path)
    parser.add_argument("args", nargs="*", help="more `mpipe run` arguments")
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mpipe-timeline-") as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        log = Path(tmp) / "timeline.txt"
        log.touch()
        t0 = time.time()
        env = {**os.environ, "MPIPE_TIMELINE_T0": repr(t0), "MPIPE_TIMELINE_FILE": str(log),
               "MPIPE_TIMELINE_WATCH": ",".join(WATCHED),
               "PYTHONPATH": os.pathsep.join([tmp, *filter(None, [os.environ.get("PYTHONPATH")])])}
        mpipe = Path(sys.executable).with_name("mpipe")
        proc = subprocess.Popen([str(mpipe), "run", str(opts.config), "--fresh", "--quiet",
                                 *opts.args], env=env)
        proc.wait()
        ended = time.time() - t0
        lines = sorted(log.read_text().splitlines(), key=lambda ln: float(ln.split()[0]))
    lines.append(f"{ended:8.3f} {proc.pid:7d}  exited {proc.returncode}")
    role = _roles(lines, proc.pid)
    for line in lines:
        t, pid, what = line.split(None, 2)
        print(f"{t:>8} {pid:>7} {role[pid]:<10} {what}")
    return proc.returncode


def _roles(lines: list[str], runner: int) -> dict[str, str]:
    """runner; forkserver (another process that forks); a helper (another fresh
    interpreter: a resource tracker or forkserver started the usual way); a
    child (forked, no interpreter start)."""
    started = {ln.split()[1] for ln in lines if "interpreter up" in ln}
    forking = {ln.split()[1] for ln in lines if ln.split(None, 2)[2] == "fork"}
    role: dict[str, str] = {}
    for ln in lines:
        pid = ln.split()[1]
        role[pid] = ("runner" if pid == str(runner) else "forkserver" if pid in forking
                     else "helper" if pid in started else "child")
    return role


if __name__ == "__main__":
    sys.exit(main())
