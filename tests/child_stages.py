"""Stages that start processes of their own, as users' stages do.

``pooled`` maps over a ``multiprocessing.Pool`` with Python's default start
method; ``sleeps_in_a_subprocess`` waits on ``sleep 60`` (a stuck external
tool), for ``timeout_s`` to kill its worker; ``signals_seen`` checks the
dispositions of SIGINT and SIGTERM in a process the stage forks and in one it
execs; ``runs_a_tool`` runs ``sleep`` for ``params.tool_s``.
"""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
from typing import Any


def _square(v: int) -> int:
    return v * v


def pooled(value: int) -> float:
    with multiprocessing.Pool(2) as pool:
        return float(sum(pool.map(_square, range(value + 1))))


def sleeps_in_a_subprocess(value: int) -> float:
    subprocess.run(["sleep", "60"], check=True)
    return float(value)


def _defaults() -> bool:
    return (signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)


def _send_defaults(conn: Any) -> None:
    conn.send(_defaults())


def signals_seen(value: int) -> float:
    """1.0 if a forked and an exec'd child both ignore SIGINT (a Ctrl-C to the
    group must not end them mid-item) and have SIGTERM's default (their own
    parent, a Pool, stops them with it)."""
    fork = multiprocessing.get_context("fork")
    parent, child = fork.Pipe()
    forked = fork.Process(target=_send_defaults, args=(child,))
    forked.start()
    forked_fine = parent.recv()
    forked.join()
    code = ("import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN"
            " and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)")
    exec_fine = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout.strip() == "True"
    return float(forked_fine and exec_fine)

def numbers(ctx: Any) -> range:
    return range(int(ctx.params["n"]))


def runs_a_tool(value: int, ctx: Any) -> float:
    subprocess.run(["sleep", str(ctx.params.get("tool_s", 2))], check=True)
    return float(value)


def leaves_a_tool_running(value: int) -> float:
    """Starts ``sleep 299.25`` and returns without waiting for it."""
    subprocess.Popen(["sleep", "299.25"])
    return float(value)


_kept_pool: Any = None


def keeps_a_pool_then_exits(value: int) -> float:
    """Keeps a Pool across items (a module global); item 1 raises SystemExit."""
    global _kept_pool
    if _kept_pool is None:
        _kept_pool = multiprocessing.Pool(2)
    _kept_pool.map(_square, range(3))
    if value == 1:
        raise SystemExit(0)
    return float(value)


def _tool_a_little_later() -> None:
    import time

    time.sleep(0.3)  # after the stage has raised: the worker is on its way out
    subprocess.run(["sleep", "20.5"])


def waits_on_a_tool_in_a_thread_then_exits(value: int) -> float:
    """Item 0 starts a (non-daemon) thread that runs ``sleep 20.5`` 0.3 s later,
    and raises SystemExit at once."""
    import threading

    if value == 0:
        threading.Thread(target=_tool_a_little_later).start()
        raise SystemExit(3)
    return float(value)


def detaches_a_daemon(value: int) -> float:
    """Starts ``sleep 299.75`` in a session of its own (as a stage does to killpg it)."""
    subprocess.Popen(["sleep", "299.75"], start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return float(value)
