"""Start the forkserver that every mpipe child is forked from, as early as possible.

The forkserver imports numpy and mpipe's worker code once; each child is then
a cheap ``fork`` of it (no inherited locks, threads or open HDF5 handles,
unlike ``fork`` from the runner).  ``mpipe run`` calls :func:`start` before
its own imports (yaml, the config, rich) so that the two overlap, and forks
the forkserver and multiprocessing's resource tracker from itself
(:mod:`mpipe.forkstart`) rather than starting each as a fresh interpreter;
elsewhere (mpipe as a library, ``mpipe tune``) they start the usual way.

The runner never imports the pipeline's own modules: :func:`check_names`
imports them in a child of the forkserver, whose numpy is already loaded, and
reports the first bad name as the same :class:`ConfigError` (exit 2, key and
YAML line) before any run state exists.  Importing them in the runner cost
its start-up the 0.1 s of importing numpy a second time.

What a forkserver inherits is fixed when it starts: the environment (the log
settings of :mod:`mpipe.logsetup` travel that way, so :func:`start` comes after
:func:`mpipe.logsetup.configure`; the limit on native threads,
:func:`native_thread_limits`, is set in the forkserver only) and ``sys.path``.  The pipeline's own
modules are therefore not preloaded here; each child imports its function by
name (:func:`mpipe.imports.import_checked`), with the pipeline's directory on
its path.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Imported where used: this module is imported before the forkserver starts.
    from mpipe.imports import Named

# forkserver_init first: it makes the forkserver ignore SIGTERM (see there).
# Then every child's own module, so that no child imports it after its fork,
# while the run waits for that child.  The runner imports those too
# (mpipe.runner names their entry points): `mpipe run` imports them before it
# forks the forkserver, which then has only numpy left.  numpy (its OpenBLAS
# starts threads) and forkserver_init (it ignores SIGTERM) stay out of the runner.
SHARED_WITH_RUNNER = ["mpipe.worker", "mpipe.producer", "mpipe.consumer", "mpipe.writer"]
PRELOAD = ["mpipe.forkserver_init", *SHARED_WITH_RUNNER, "numpy"]


# The thread pools of native libraries (OpenBLAS, MKL, OpenMP, Accelerate,
# numexpr) that numpy and user stages load.  Each defaults to one thread per
# core in every process: W workers on N cores would run W x N threads of a
# BLAS-heavy stage (and OpenBLAS's idle threads spin: `import numpy` alone
# takes 0.23 s of CPU here instead of 0.12).  mpipe's parallelism is its
# processes, bounded by cpu_slots, so each child gets one thread, as Dask's
# and Ray's workers do, unless the user has set any of these variables.  The
# runner itself keeps the user's environment: `prepare` runs in it, alone.
NATIVE_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                      "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def native_thread_limits() -> dict[str, str]:
    """The variables that give a child one native thread; none if the user set any."""
    if any(var in os.environ for var in NATIVE_THREAD_VARS):
        return {}
    return dict.fromkeys(NATIVE_THREAD_VARS, "1")


@contextmanager
def native_threads_limited() -> Iterator[None]:
    """One native thread for what starts inside, unless the user set any of the variables."""
    limits = native_thread_limits()
    os.environ.update(limits)
    try:
        yield
    finally:
        for var in limits:
            os.environ.pop(var, None)


def context() -> ForkServerContext:
    return multiprocessing.get_context("forkserver")


def start(*, fork: bool = False) -> ForkServerContext:
    """Start the forkserver now (a no-op if it runs); return its context.

    With ``fork``, the forkserver and the resource tracker are forked from
    this process (:mod:`mpipe.forkstart`) if it is fit to fork: ``mpipe run``
    asks so before it has imported or run anything a fork should not copy.
    """
    ctx = context()
    ctx.set_forkserver_preload(PRELOAD)
    if fork:
        import importlib

        from mpipe import forkstart

        # Imported once, before the fork, rather than by both processes after
        # it: the forkserver then has only numpy left to import.
        for name in SHARED_WITH_RUNNER:
            importlib.import_module(name)
        if forkstart.fork_helpers(PRELOAD, native_thread_limits()):
            return ctx
    from multiprocessing import forkserver

    # Every child is forked from the forkserver and inherits its environment.
    with native_threads_limited():
        forkserver.ensure_running()
    return ctx


def check_names(named: Sequence[Named], allowed: Sequence[str], base_dir: Path,
                log_level: int, meanwhile: Callable[[], object] | None = None
                ) -> dict[str, str]:
    """:func:`mpipe.imports.check_names` in a child of the forkserver (see above):
    each function's code digest by key, or the first :class:`ConfigError`.

    ``meanwhile`` is called once the child has started, before its answer is
    awaited: ``mpipe run`` starts its sealer there (:mod:`mpipe.sealer`).

    The child is a child like the others (:func:`mpipe.procs.child_setup`): it
    ignores SIGINT and SIGTERM and exits when it loses its lifeline, so an
    import that hangs (a network filesystem) never outlives ``mpipe run``.
    """
    from mpipe import procs
    from mpipe.errors import ConfigError

    ctx = start()
    result, child_end = ctx.Pipe(duplex=False)
    lifeline_r, lifeline_w = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_check_names_child, name="mpipe-check-names",
                          args=(child_end, lifeline_r, log_level, list(named), list(allowed),
                                str(base_dir)))
    procs.start(process)  # a machine limit: exit 3 with the limit named
    child_end.close()
    lifeline_r.close()
    try:
        if meanwhile is not None:
            meanwhile()
        answer = result.recv()
    except EOFError:
        process.join()
        raise ConfigError(
            "importing the pipeline's functions killed the process that checked them: it "
            f"{procs.describe_exit(process.exitcode)}",
            hint="import the modules named by the config by hand to see why "
            "(python -c 'import MODULE')") from None
    except BaseException:  # Ctrl-C while a module imports, `meanwhile` failed: no orphan
        process.kill()
        process.join()
        raise
    finally:
        result.close()
        lifeline_w.close()  # the child exits at once if it has not already
    # It has answered.  A non-daemon thread started by an imported module
    # would keep it from exiting; it has nothing more to do.
    process.join(CHECK_EXIT_GRACE_S)
    if process.exitcode is None:
        process.kill()
        process.join()
    error, digests = answer
    assert isinstance(digests, dict), answer
    if error is not None:
        message, hint = error
        raise ConfigError(message, hint=hint)
    return digests


CHECK_EXIT_GRACE_S = 5.0


def _check_names_child(result: Connection, lifeline: Connection, log_level: int,
                       named: list[Named], allowed: list[str], base_dir: str) -> None:
    from mpipe import imports, procs
    from mpipe.errors import ConfigError

    procs.child_setup("check-names", lifeline, log_level)
    answer: tuple[tuple[str, str | None] | None, dict[str, str]]
    try:
        answer = (None, imports.check_names(named, allowed, Path(base_dir)))
    except ConfigError as exc:
        answer = ((exc.message, exc.hint), {})
    try:
        result.send(answer)
    except BrokenPipeError:
        pass  # mpipe run is gone (Ctrl-C): nobody is waiting for the answer
