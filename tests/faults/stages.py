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
import itertools
import os
import signal
import sys
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


def polls_stop(value: Any, ctx: StageContext) -> Any:
    """A long stage that checks ``ctx.stop_requested()`` as fast as it can, as
    the README suggests long stages do; here the run never stops on its own."""
    while not ctx.stop_requested():
        pass
    return notes.process_task(value, ctx)


def sleepy(value: Any, ctx: StageContext) -> Any:
    """Sleep ``$MPIPE_TEST_SLEEP_S`` (default 0.5) then do the notes work.

    From the environment, not params: params are part of the items'
    fingerprint, and a resumed run must see the same config.
    """
    time.sleep(float(os.environ.get("MPIPE_TEST_SLEEP_S", "0.5")))
    return notes.process_task(value, ctx)


def source_with_unpicklable(ctx: Any) -> Any:
    """The notes source, except that item 1's value cannot be pickled."""
    from mpipe import Task

    for i, task in enumerate(notes.tasks(ctx)):
        yield Task(task.key, (lambda: None) if i == 1 else task.value, task.inputs, task.outputs)


def raising_source(ctx: Any) -> Any:
    """Yields two notes tasks, then raises."""
    for i, task in enumerate(notes.tasks(ctx)):
        if i == 2:
            raise InjectedFault("the source broke")
        yield task


def consumer_killed_after(results: Any, ctx: Any) -> Any:
    """Folds ``params.consumer_dies_after`` values, then SIGKILLs itself."""
    total = notes.ExactSum()
    for i, vector in enumerate(results):
        if i == int(ctx.params["consumer_dies_after"]):
            os.kill(os.getpid(), signal.SIGKILL)
        total.add(vector)
    return total.value()


def consumer_raising(results: Any) -> Any:
    for _ in results:
        raise InjectedFault("the consumer broke")
    return None


def notes_with_eio_on_fsync(value: dict[str, int], ctx: StageContext) -> Any:
    """The notes stage on a disk whose fsync fails with EIO for ``fault_key``."""
    import errno

    if ctx.key == ctx.params.get("fault_key"):
        def failing_fsync(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        os.fsync = failing_fsync
    return notes.process_task(value, ctx)


class _WritesWhenFinalized:
    def __init__(self, path: str) -> None:
        self.path = path

    def __del__(self, _open: Any = open) -> None:  # `open` bound now: exit clears builtins late
        with _open(self.path, "w") as f:
            f.write("finalized\n")


_kept: list[_WritesWhenFinalized] = []


def prepare_with_finalizer(ctx: StageContext) -> None:
    """A prepare whose object is only finalized when the interpreter exits."""
    _kept.append(_WritesWhenFinalized(str(ctx.path("finalized.txt"))))


def prepare_that_raises(ctx: StageContext) -> None:
    """A prepare that fails, as one whose download or database is down does."""
    raise ConnectionError("the archive server refused the connection")


def prepare_that_waits(ctx: StageContext) -> None:
    """A long prepare (a download): marks that it began, then waits 60 s, and
    catches Exception as careless code does."""
    ctx.path("preparing").touch()
    try:
        time.sleep(60)
    except Exception:
        pass


def prepare_that_swallows_everything(ctx: StageContext) -> None:
    """Marks that it began, then works 2 s catching BaseException as careless
    code does (a retry loop around a download)."""
    ctx.path("preparing").touch()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except BaseException:  # the point of this stage
            pass


def prepare_that_rewraps_everything(ctx: StageContext) -> None:
    """Marks that it began, waits, and turns whatever interrupts it into its own error."""
    ctx.path("preparing").touch()
    try:
        time.sleep(30)
    except BaseException as exc:  # the point of this stage
        raise RuntimeError("download interrupted") from exc


def prepare_that_exits(ctx: StageContext) -> None:
    """A prepare written as a script is: it ends with ``sys.exit(0)``."""
    sys.exit(0)


def kill_the_sealer(value: dict[str, int], ctx: StageContext) -> Any:
    """The notes stage, which first SIGKILLs the run's waiting sealer (once a
    run: a marker file in the workdir), as the OOM killer might."""
    marker = ctx.path("sealer-killed")
    if not marker.exists():
        marker.touch()
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    # "pid (comm) state ppid ...": comm keeps 15 bytes; this
                    # run's sealer is a child of the forkserver, as this worker is.
                    comm, rest = f.read().split(" (", 1)[1].rsplit(") ", 1)
                if comm == "mpipe-writer-se" and int(rest.split()[1]) == os.getppid():
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass  # not a process, or gone
    return notes.process_task(value, ctx)


def leaves_a_writing_thread(value: dict[str, int], ctx: StageContext) -> Any:
    """The notes stage, which on item t001 also starts a daemon thread that is
    still inside ``ctx.output_dir`` when its worker exits at the end of the run."""
    if ctx.key == "t001":
        import threading

        started = threading.Event()

        def write_for_ever() -> None:
            with ctx.output_dir("output/straggler") as tmp:
                (tmp / "part").write_bytes(b"half")
                started.set()
                time.sleep(3600)

        threading.Thread(target=write_for_ever, daemon=True).start()
        if not started.wait(60):
            raise RuntimeError("the writing thread did not start")
    return notes.process_task(value, ctx)


def keeps_writing_in_a_thread(value: dict[str, int], ctx: StageContext) -> Any:
    """The notes stage, which on item t001 also starts a daemon thread that
    writes one small output directory after another, for ever: it is between
    two, or in one, when its worker exits."""
    if ctx.key == "t001":
        import threading

        def write_for_ever() -> None:
            for i in itertools.count():
                with ctx.output_dir(f"output/late/{i % 50}") as tmp:
                    (tmp / "part").write_bytes(b"x")

        threading.Thread(target=write_for_ever, daemon=True).start()
    return notes.process_task(value, ctx)


_pool: Any = None


def uses_a_thread_pool(value: dict[str, int], ctx: StageContext) -> Any:
    """The notes stage through a module-level ThreadPoolExecutor (its threads
    are not daemons, and wait idle between items)."""
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(2)
    return _pool.submit(notes.process_task, value, ctx).result()


def quick_but_300_dies_late(value: int) -> float:
    """Quick items (so workers prefetch many); item 300 touches $MPIPE_TEST_MARK,
    sleeps 4 s, then its worker dies."""
    if value == 300:
        open(os.environ["MPIPE_TEST_MARK"], "w").close()
        time.sleep(4.0)
        os.kill(os.getpid(), signal.SIGKILL)
    return float(value)


def consumer_slow(results: Any) -> Any:
    """Folds one value every 2 s: finished items wait for the sink meanwhile."""
    count = 0
    for _ in results:
        time.sleep(2.0)
        count += 1
    return float(count)
