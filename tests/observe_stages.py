"""A tiny three-stage pipeline with one deliberately slow stage (named from YAML).

source ``numbers`` -> ``fast`` -> ``slow`` (sleeps ``params.slow_s``) -> ``tail``.
The tests expect the summary and the report to name ``slow`` as the bottleneck.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any


def numbers(ctx: Any) -> Iterator[int]:
    yield from range(int(ctx.params.get("n", 8)))


def fast(x: int) -> int:
    return x + 1


def slow(x: int, ctx: Any) -> int:
    time.sleep(float(ctx.params.get("slow_s", 0.3)))
    return x * 2


def tail(x: int) -> float:
    return float(x)


def native_threads(x: int) -> list[float]:
    """The native thread limits this worker runs with (0: not set)."""
    from mpipe.forkserver import NATIVE_THREAD_VARS

    return [float(os.environ.get(var, 0)) for var in NATIVE_THREAD_VARS]


def record_native_threads(ctx: Any) -> None:
    """A prepare: write down the native thread limits the runner runs it with."""
    import json

    from mpipe.forkserver import NATIVE_THREAD_VARS

    seen = {var: os.environ[var] for var in NATIVE_THREAD_VARS if var in os.environ}
    ctx.path("prepare-env.json").write_text(json.dumps(seen))


def helpers_view(x: int, ctx: Any) -> float:
    """What a worker sees of the processes above it, written to ``helpers-X.json``.

    Its parent is the forkserver; the forkserver's parent is the runner.
    """
    import json

    def comm(pid: int) -> str:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()

    def cmdline(pid: int) -> str:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()

    def parent(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])

    def open_files(pid: int) -> list[str]:
        names = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                names.append(f"{fd} {os.readlink(f'/proc/{pid}/fd/{fd}')}")
            except OSError:
                pass
        return names

    server = os.getppid()
    runner = parent(server)
    with open(f"/proc/{runner}/task/{runner}/children") as f:
        runner_children = [int(pid) for pid in f.read().split()]
    view = {
        "forkserver": server, "runner": runner, "worker_comm": comm(os.getpid()),
        "forkserver_cmdline": cmdline(server), "runner_cmdline": cmdline(runner),
        "helpers": {str(pid): {"cmdline": cmdline(pid), "comm": comm(pid),
                               "files": open_files(pid)}
                    for pid in runner_children},
    }
    ctx.path(f"helpers-{x}.json").write_text(json.dumps(view))
    return float(x)


def write_outputs(x: int, ctx: Any) -> int:
    """Four 1 MiB files through ``ctx.output_dir``, outside any ``ctx.io()`` block."""
    with ctx.output_dir(f"out/{x}") as d:
        for i in range(4):
            (d / f"{i}.bin").write_bytes(os.urandom(1 << 20))
    return x


def slow_odd_fails(x: int, ctx: Any) -> float:
    """``params.slow_s`` per attempt; odd items raise every time."""
    with ctx.io():  # as if reading its input
        time.sleep(float(ctx.params.get("slow_s", 0.3)))
    if x % 2:
        raise ValueError(f"odd {x}")
    return float(x)
