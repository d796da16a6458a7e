"""Fork multiprocessing's forkserver and resource tracker from ``mpipe run`` itself.

multiprocessing starts both helpers as fresh interpreters (``python -c
"from multiprocessing.forkserver import main; main(...)"``): each pays
Python's start-up and imports multiprocessing again before it serves, on the
same cores where the runner is still importing.  On 2 cores that CPU is the
empty pipeline's start-up (docs/BENCHMARKS.md, "Where mpipe's time goes
now").  ``mpipe run`` instead forks the two from itself, early: it then runs
one thread, has imported little (argparse, logging, multiprocessing), has run
no user code and has no HDF5 library loaded.  Each forked helper calls the
very ``main`` function multiprocessing would have run in the fresh
interpreter, and the runner records each in multiprocessing's own fields, as
``ensure_running`` does.  From there on it is multiprocessing's forkserver:
children are still forked from a process that holds no lock, thread or file
of the runner's.

A forked helper keeps what its fresh twin is given: stdin, stdout, stderr and
its own socket or pipe.  Every other descriptor is closed, the runner's log
file through its handler first, so that no child holds a copy of anything the
runner (or whoever started it) had open.  Python's output buffers are flushed
before the fork, or every child would print them again.

Each names itself (``mpipe-forksrv``, ``mpipe-tracker`` in ``ps -o comm``
and ``top``; each child then takes its own, :func:`mpipe.procs.child_setup`):
forked, they would otherwise show the runner's name and command line.

The fork is taken only where it is known to match multiprocessing: Linux,
the ``main`` signatures of Python 3.11-3.13, one thread (native ones
counted), no profiler, tracer or debugger (they would follow the fork into
every child), no h5py imported, neither helper running yet.  Anything else
starts them the usual way.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from multiprocessing import connection, forkserver, resource_tracker, util
from typing import Any

from mpipe import procs

logger = logging.getLogger(__name__)

# What multiprocessing passes its helpers' `main` on Python 3.11-3.13 (3.14
# adds an authentication key, gh-97514: there, the usual start).
_FORKSERVER_MAIN = ("listener_fd", "alive_r", "preload", "main_path", "sys_path")
_TRACKER_MAIN = ("fd",)
# The records ensure_running keeps, which fork_helpers fills in its place.
_FORKSERVER_RECORDS = ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid")
_TRACKER_RECORDS = ("_fd", "_pid")
# Blocked across each fork until the helper has set its own handlers, as
# multiprocessing does for the tracker (bpo-33613): a Ctrl-C in that window
# would kill it.
_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def unsupported() -> str | None:
    """Why this platform or Python rules the fork out, or None."""
    if not sys.platform.startswith("linux"):
        return f"not on {sys.platform}"
    server, tracker = forkserver._forkserver, resource_tracker._resource_tracker
    if (not all(hasattr(server, name) for name in _FORKSERVER_RECORDS)
            or not all(hasattr(tracker, name) for name in _TRACKER_RECORDS)
            or _parameters(forkserver.main) != _FORKSERVER_MAIN
            or _parameters(resource_tracker.main) != _TRACKER_MAIN):
        return "multiprocessing's helpers take other arguments or keep other records here"
    return None


def _parameters(function: Callable[..., object]) -> tuple[str, ...]:
    code = function.__code__  # not inspect.signature: importing inspect costs the runner 6-10 ms
    return code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]


def why_not_fork() -> str | None:
    """Why this process should not fork the helpers now, or None if it may."""
    reason = unsupported()
    if reason is not None:
        return reason
    if "h5py" in sys.modules:
        return "h5py is loaded (HDF5's state must not cross a fork)"
    if threading.active_count() > 1 or _threads() > 1:
        return "threads are running"  # numpy's OpenBLAS starts its pool on import
    if hosted():
        return "a profiler, tracer or debugger watches this process"
    if (forkserver._forkserver._forkserver_pid is not None  # type: ignore[attr-defined]
            or resource_tracker._resource_tracker._fd is not None):  # type: ignore[attr-defined]
        return "a helper runs already"
    return None


def hosted() -> bool:
    """Whether a profiler, tracer, coverage tool or debugger watches this process."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return True
    # Python 3.12+: cProfile, coverage and debuggers may use sys.monitoring
    # instead, and then the two calls above return None.
    monitoring = getattr(sys, "monitoring", None)
    return monitoring is not None and any(monitoring.get_tool(tool) is not None
                                          for tool in range(6))


def _threads() -> int:
    """This process's threads, native ones included (a C library's, faulthandler's)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def fork_helpers(preload: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Fork the resource tracker and the forkserver; False if this process should not.

    ``environ`` is added to the forkserver's environment (every child
    inherits it) and to no one else's.
    """
    if why_not_fork() is not None:
        return False
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass  # closed, or full (EAGAIN): nothing is printed this early anyway
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        _fork_tracker()
        _fork_forkserver(preload, environ)
    except OSError as exc:  # fork (EAGAIN, ENOMEM), pipe, socket: try the usual way
        logger.info("forking multiprocessing's helpers failed (%s): starting them anew", exc)
        return False
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return True


def _fork_tracker() -> None:
    # Private records, the ones ensure_running keeps (checked in why_not_fork).
    tracker: Any = resource_tracker._resource_tracker
    read_end, write_end = os.pipe()
    try:
        # main unblocks the signals after ignoring them.
        pid = _fork("mpipe-tracker", lambda: resource_tracker.main(read_end), keep=(read_end,))
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    tracker._fd, tracker._pid = write_end, pid


def _fork_forkserver(preload: Sequence[str], environ: Mapping[str, str]) -> None:
    server: Any = forkserver._forkserver
    address = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(address)
        if not util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        # Every client holds the write end; EOF tells the forkserver to exit.
        alive_r, alive_w = os.pipe()
        listener_fd = listener.fileno()

        def serve() -> None:
            # The runner's records of the tracker, its descriptor closed by now:
            # each child gets the tracker's pipe with its request instead.
            tracker: Any = resource_tracker._resource_tracker
            tracker._fd = tracker._pid = None
            os.environ.update(environ)
            # As mpipe.forkserver_init does, before the signals are unblocked.
            # SIGINT stays as the runner had it: main() ignores it for itself
            # and gives each child back the handler it found.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            forkserver.main(listener_fd, alive_r, list(preload))

        try:
            pid = _fork("mpipe-forksrv", serve, keep=(listener_fd, alive_r))
        except BaseException:
            os.close(alive_w)
            raise
        finally:
            os.close(alive_r)
    server._forkserver_address = address
    server._forkserver_alive_fd = alive_w
    server._forkserver_pid = pid


def _fork(name: str, serve: Callable[[], object], keep: Collection[int]) -> int:
    """Fork; the child runs ``serve`` and exits, never returning into the runner's stack."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        procs.set_process_name(name)
        _drop_inherited(keep)
        serve()
        code = 0
    except SystemExit as exc:  # the forkserver's way out once every client is gone
        code = exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:  # Ctrl-C before main() ignores it: the run is interrupted too
        code = 130
    except EOFError:  # a client hung up in the middle of a request (the runner says why)
        print(f"{name}: a client hung up in the middle of a request; stopping",
              file=sys.stderr)
        code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _drop_inherited(keep: Collection[int]) -> None:
    """Close what the runner had open but stdin, stdout, stderr and ``keep``.

    What ``exec`` would: 0-2 go too if they are not inheritable, i.e. the
    runner's own pipes in a process started with them closed (``>&-``).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        # Closed through the handler, which owns the file: its descriptor
        # closed behind its back could be reused, and then closed again when
        # the handler is collected.
        root.removeHandler(handler)
        handler.close()
    for fd in (0, 1, 2):
        try:
            if fd not in keep and not os.get_inheritable(fd):
                os.close(fd)
        except OSError:
            pass  # not open
    try:
        open_fds = sorted(int(name) for name in os.listdir("/proc/self/fd"))
    except OSError:
        # No /proc: close the ranges between the kept ones (close_range(2)).
        low = 3
        for fd in sorted(k for k in keep if k >= 3):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, os.sysconf("SC_OPEN_MAX"))
        return
    for fd in open_fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory listing's own descriptor, closed already
