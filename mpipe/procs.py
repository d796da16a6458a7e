"""Process plumbing shared by every child: start-up, the lifeline, shutdown.

* Children ignore SIGINT and SIGTERM.  Ctrl-C and systemd signal the whole
  process group; the runner alone decides what a signal means (stop feeding,
  give in-flight items ``shutdown_grace_s``, commit, exit 130/143), and stops
  its children itself.  SIGINT with ``SIG_IGN``, which what a stage starts
  inherits too: a Ctrl-C does not kill a stage's tool mid-item.  SIGTERM with
  a handler that does nothing, which exec and fork give back as the default:
  a ``multiprocessing.Pool`` in a stage stops its workers with SIGTERM, and
  with ``SIG_IGN`` inherited its ``terminate()`` waited for ever.  The price:
  a SIGTERM sent to the whole group (``kill -TERM -PGID``, systemd's
  ``KillMode=control-group``) ends a stage's own processes at once, and those
  items fail; mpipe's processes still commit what finished.
* A child killed by the runner (``timeout_s``, the end of the grace, a stuck
  shutdown) takes the processes its stage started with it
  (:func:`kill_tree`); so does one whose runner died, and a worker as it
  exits (:func:`end_what_this_process_left`).  One that dies by itself (a
  segfault, the OOM killer) leaves them: they are re-parented out of reach.
* The kernel does not kill a process whose parent dies.  Every child gets the
  read end of a *lifeline* pipe whose only write end the runner holds; a
  daemon thread blocks on it and exits the child when it reads EOF, i.e. when
  the runner is gone, however it died (SIGKILL included).  This only works
  because children are started by the forkserver and inherit no other copy of
  the write end, as they would with ``fork``.
* Shutdown escalates: ask, wait, SIGTERM, wait, SIGKILL, each step logged with
  the pid (trio's ``_subprocess``).
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from mpipe import logsetup
from mpipe.errors import PipelineBrokenError
from mpipe.outputs import TEMPORARIES_LEFT_EXIT

logger = logging.getLogger(__name__)

LIFELINE_EXIT = 70


def child_setup(name: str, lifeline: Connection, log_level: int) -> None:
    """First thing every child runs."""
    ignore_stop_signals()
    _multiprocessing_as_new()
    # `ps -o comm` and `top` show mpipe-compute-1, mpipe-writer, ... rather
    # than the forkserver's name (mpipe.forkstart).
    set_process_name(f"mpipe-{name}")
    # The runner's --log-file / --log-format reach every child through the
    # environment, which the forkserver inherited (see mpipe.logsetup).
    logsetup.configure_child(name, log_level)
    threading.Thread(target=_watch_lifeline, args=(lifeline,), name="lifeline", daemon=True).start()


def ignore_stop_signals() -> None:
    """SIGINT and SIGTERM do nothing here; what this process starts ignores
    SIGINT too and has SIGTERM's default (see the module docstring).  Main
    thread only."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _ignore_signal)
    # SA_RESTART: reads and writes resume after a SIGTERM; poll, select and
    # sleeps still return EINTR, which Python retries (PEP 475).
    signal.siginterrupt(signal.SIGTERM, False)
    # A process forked from here (multiprocessing's fork start) gets the
    # default; exec resets a handled signal by itself.
    os.register_at_fork(after_in_child=_default_sigterm)


def _multiprocessing_as_new() -> None:
    """A stage's own ``multiprocessing.Pool`` gets Python's defaults, not mpipe's.

    A child inherits the runner's multiprocessing settings: the start method
    its children were made with (forkserver) and mpipe's forkserver preload
    list, whose first module makes a forkserver ignore SIGTERM, and with it
    every process it starts: the pool's workers, deaf to ``terminate()``.
    """
    multiprocessing.set_start_method(None, force=True)  # back to the platform's default
    multiprocessing.get_context("forkserver").set_forkserver_preload(["__main__"])


def _ignore_signal(signum: int, frame: object) -> None:
    pass


def _default_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def set_process_name(name: str) -> None:
    """The name ``ps -o comm``, ``top`` and ``pgrep`` show (15 bytes at most)."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name[:15])
    except OSError:
        pass  # not Linux, or no /proc: the name is only for people reading ps


def _watch_lifeline(lifeline: Connection) -> None:
    try:
        lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    # The runner is gone: nobody will read our results or stop us, nor what
    # our stage started.
    _kill_pids(descendants(os.getpid()))
    os._exit(LIFELINE_EXIT)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (its children, theirs, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return []  # no /proc: not Linux
    for name in entries:
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass  # exited meanwhile


def end_what_this_process_left() -> None:
    """SIGKILL this process's descendants, as it exits: what a stage started and
    left running would otherwise outlive the run, re-parented out of reach.

    Call it after multiprocessing's finalizers (a Pool the stage kept stops
    its own workers; killed under it, its finalizer would wait for ever for
    the lock a dead worker held).  Everything below, as :func:`kill_tree` and
    the lifeline take it: also what the stage started in a session of its
    own.  Costs one ``waitid`` that reaps nothing when there is no child
    (most stages start none).
    """
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return  # no child at all
    except OSError:
        pass
    _kill_pids(descendants(os.getpid()))


def kill_tree(process: BaseProcess) -> None:
    """SIGKILL ``process`` and every process below it (what its stage started)."""
    if process.pid is None or process.exitcode is not None:
        return
    below = descendants(process.pid)  # before the kill: then they are re-parented
    process.kill()
    _kill_pids(below)


def describe_exit(exitcode: int | None) -> str:
    """Say how a process ended, and what that usually means."""
    if exitcode is None:
        return "is still running"
    if exitcode == 0:
        return "exited normally"
    if exitcode < 0:
        sig = -exitcode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGKILL:
            return (
                f"was killed by {name}: this usually means the OS killed it for running "
                "out of memory (check dmesg), or someone ran kill -9"
            )
        if sig == signal.SIGSEGV:
            return f"crashed with {name} (segmentation fault in native code)"
        if sig in (signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL):
            return f"crashed with {name}"
        return f"was killed by {name}"
    if exitcode == LIFELINE_EXIT:
        return "exited because it lost its lifeline to the runner"
    if exitcode == TEMPORARIES_LEFT_EXIT:
        return "exited leaving a temporary output behind (removed by the next run)"
    return f"exited with code {exitcode} (sys.exit or os._exit in the stage?)"


def stop_processes(
    procs: Iterable[BaseProcess], *, grace_s: float, term_s: float = 2.0
) -> None:
    """Wait up to ``grace_s`` for ``procs`` to exit, then SIGTERM, then SIGKILL.

    Children ignore SIGTERM (see above), so SIGTERM is only a courtesy for
    foreign code that re-enabled it; SIGKILL is what ends a stuck child.
    """
    alive = [p for p in procs if p.pid is not None]
    alive = _wait_for_exit(alive, grace_s)
    for p in alive:
        logger.warning("process %s (pid %s) did not exit in %.1fs: SIGTERM", p.name, p.pid, grace_s)
        p.terminate()
    alive = _wait_for_exit(alive, term_s)
    for p in alive:
        logger.warning("process %s (pid %s) ignored SIGTERM: SIGKILL", p.name, p.pid)
        kill_tree(p)
    for p in _wait_for_exit(alive, 10.0):
        logger.error("process %s (pid %s) survived SIGKILL", p.name, p.pid)


def _wait_for_exit(procs: list[BaseProcess], timeout: float) -> list[BaseProcess]:
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if p.exitcode is None]
    while alive:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        wait([p.sentinel for p in alive], remaining)
        alive = [p for p in alive if p.exitcode is None]
    for p in procs:
        if p.exitcode is not None:
            p.join(0)
    return alive


def kill_now(procs: Iterable[BaseProcess]) -> None:
    for p in procs:
        if p.pid is not None and p.exitcode is None:
            logger.warning("killing %s (pid %s)", p.name, p.pid)
            kill_tree(p)
    for p in procs:
        if p.pid is not None:
            p.join(10.0)


def start(process: BaseProcess) -> None:
    """``process.start()``; a limit of the machine's is a :class:`PipelineBrokenError`
    (exit 3) that says so, not a traceback taken for a bug."""
    try:
        process.start()
    except (OSError, EOFError) as exc:  # EAGAIN, EMFILE, ENOMEM; EOF: the forkserver died
        raise cannot_start(f"the process {process.name}", exc) from None


def cannot_start(what: str, exc: OSError | EOFError) -> PipelineBrokenError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
    if is_limit(exc):
        hint = ("a limit of this machine was reached (processes: ulimit -u; open files: "
                "ulimit -n; memory, or /dev/shm for semaphores): lower the workers, or "
                "raise the limit")
    else:  # ECONNREFUSED, EOF: the forkserver that starts every child is gone
        hint = ("the process that starts mpipe's children stopped (see the log above); "
                "run the same command again: finished items are kept")
    return PipelineBrokenError(f"cannot start {what}: {reason}", hint=hint)


# What a machine's limits raise when a process, a pipe or a semaphore is made.
LIMIT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM,
                          errno.ENOSPC})


def is_limit(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in LIMIT_ERRNOS
