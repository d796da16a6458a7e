"""Fault stages for the tests, named from YAML (the package carries no test switches).

``notes_with_fault`` is the notes workload's compute stage, except for the item
whose key is ``params.fault_key``, where it injects ``params.fault``:

raise       raise InjectedFault
sigkill     SIGKILL itself (as the OOM killer does)
segfault    crash in native code (ctypes.string_at(0))
exit        os._exit(3)
systemexit  raise SystemExit(4)
keyboard    raise KeyboardInterrupt
hang        sleep forever
unpicklable return a lambda

With ``params.fault_times: N`` the fault fires only on the first N attempts
(counted with marker files in the workdir), so a retry can succeed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any

from mpipe.context import StageContext
from mpipe.workloads import notes


class InjectedFault(RuntimeError):
    pass


def inject(kind: str) -> Any:
    if kind == "raise":
        raise InjectedFault("injected failure")
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "segfault":
        ctypes.string_at(0)
    if kind == "exit":
        os._exit(3)
    if kind == "systemexit":
        raise SystemExit(4)
    if kind == "keyboard":
        raise KeyboardInterrupt
    if kind == "hang":
        while True:
            time.sleep(3600)
    if kind == "unpicklable":
        return lambda: None
    raise ValueError(f"unknown fault {kind!r}")


def _should_fire(ctx: StageContext) -> bool:
    p = ctx.params
    if ctx.key != p.get("fault_key"):
        return False
    times = p.get("fault_times")
    if times is None:
        return True
    marks = ctx.workdir / ".fault-marks"
    marks.mkdir(exist_ok=True)
    fired = len(list(marks.iterdir()))
    if fired >= int(times):
        return False
    (marks / f"{fired}").touch()
    return True


def notes_with_fault(value: dict[str, int], ctx: StageContext) -> Any:
    if _should_fire(ctx):
        injected = inject(ctx.params["fault"])
        if injected is not None:
            return injected
    return notes.process_task(value, ctx)


def sleepy(value: Any, ctx: StageContext) -> Any:
    """Sleep ``params.sleep_s`` then do the notes work: for signal tests."""
    time.sleep(float(ctx.params.get("sleep_s", 0.5)))
    return notes.process_task(value, ctx)
