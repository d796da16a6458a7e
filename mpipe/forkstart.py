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

The fork is taken only where it is known to match multiprocessing: Linux,
the ``main`` signatures of Python 3.10-3.13, one thread, no h5py imported,
neither helper running yet.  Anything else starts them the usual way.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from multiprocessing import connection, forkserver, resource_tracker, util
from typing import Any

# What multiprocessing passes its helpers' `main` on Python 3.10-3.13 (3.14
# adds an authentication key, gh-97514: there, the usual start).
_FORKSERVER_MAIN = ("listener_fd", "alive_r", "preload", "main_path", "sys_path")
_TRACKER_MAIN = ("fd",)
# Blocked across each fork until the helper has set its own handlers, as
# multiprocessing does for the tracker (bpo-33613): a Ctrl-C in that window
# would kill it.
_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def why_not_fork() -> str | None:
    """Why this process should not fork the helpers, or None if it may."""
    if not sys.platform.startswith("linux"):
        return f"not on {sys.platform}"
    if threading.active_count() > 1:
        return "threads are running"
    if "h5py" in sys.modules:
        return "h5py is loaded (HDF5's state must not cross a fork)"
    server, tracker = forkserver._forkserver, resource_tracker._resource_tracker
    if (getattr(server, "_forkserver_pid", 0) is not None
            or getattr(tracker, "_fd", 0) is not None
            or not hasattr(server, "_forkserver_address")
            or not hasattr(server, "_forkserver_alive_fd")
            or not hasattr(tracker, "_pid")):
        return "a helper runs already, or multiprocessing keeps other records"
    if (tuple(inspect.signature(forkserver.main).parameters) != _FORKSERVER_MAIN
            or tuple(inspect.signature(resource_tracker.main).parameters) != _TRACKER_MAIN):
        return "multiprocessing's helpers take other arguments on this Python"
    return None


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
            pass  # a closed or broken stream: nothing buffered to print twice
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        _fork_tracker()
        _fork_forkserver(preload, environ)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return True


def _fork_tracker() -> None:
    # Private records, the ones ensure_running keeps (checked in why_not_fork).
    tracker: Any = resource_tracker._resource_tracker
    read_end, write_end = os.pipe()
    try:
        # main unblocks the signals after ignoring them.
        pid = _fork(lambda: resource_tracker.main(read_end), keep=(read_end,))
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
            os.environ.update(environ)
            # Children restore these two as the forkserver found them: ignored,
            # until mpipe.procs.child_setup ignores them anyway.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            forkserver.main(listener_fd, alive_r, list(preload))

        try:
            pid = _fork(serve, keep=(listener_fd, alive_r))
        except BaseException:
            os.close(alive_w)
            raise
        finally:
            os.close(alive_r)
    server._forkserver_address = address
    server._forkserver_alive_fd = alive_w
    server._forkserver_pid = pid


def _fork(serve: Callable[[], object], keep: Collection[int]) -> int:
    """Fork; the child runs ``serve`` and exits, never returning into the runner's stack."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _drop_inherited(keep)
        serve()
        code = 0
    except SystemExit as exc:  # the forkserver's way out once every client is gone
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _drop_inherited(keep: Collection[int]) -> None:
    """Close what the runner had open, except stdin, stdout, stderr and ``keep``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        # Closed through the handler, which owns the file: its descriptor
        # closed behind its back could be reused, and then closed again when
        # the handler is collected.
        root.removeHandler(handler)
        handler.close()
    try:
        open_fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        open_fds = list(range(3, os.sysconf("SC_OPEN_MAX")))
    for fd in open_fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory listing's own descriptor, closed already
