"""Crash-safe output files.

A task with several output files is not atomic if each file is renamed on its
own (Luigi's docs say so), so :func:`atomic_dir` builds the whole directory
under a temporary name beside the final one, makes every file durable, and
renames the directory into place.  A reader, or a resumed run, sees all of a
task's files or none of them.

Durability needs ``fsync`` of each file, then of the directory that holds the
rename.  An ``EIO`` from ``fsync`` is fatal (:class:`OutputError`): after a
failed fsync a later one may succeed although the data is gone ("fsyncgate").
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mpipe.errors import OutputError

logger = logging.getLogger(__name__)

TMP_MARK = ".mpipe-tmp-"
OLD_MARK = ".mpipe-old-"

# What this process may leave behind (see temporaries_left).  Threads of one
# stage may write outputs at once: counted under a lock, which a child forked
# by a stage (its own multiprocessing.Pool) gets anew, with nothing open.
_lock = threading.Lock()
_open_temporaries = 0
_unremoved = False
_closing = False
# The exit code of a child that may have left a temporary behind: the runner
# then does not mark a clean exit, and the next run looks for leftovers.
TEMPORARIES_LEFT_EXIT = 17


def _forget_in_child() -> None:
    global _lock, _open_temporaries, _unremoved, _closing
    _lock = threading.Lock()
    _open_temporaries, _unremoved, _closing = 0, False, False


os.register_at_fork(after_in_child=_forget_in_child)


def temporaries_left() -> bool:
    """Whether this process made a temporary it did not rename or remove.

    True while an ``atomic_dir`` block is open (a thread still writing when the
    process ends) and, for good, once a removal failed (an NFS ``.nfs*`` file
    of a handle still open, a read-only subdirectory, a mount point).
    """
    return _unremoved or _open_temporaries > 0


def exit_if_temporaries_left() -> None:
    """A worker's last call: exit with TEMPORARIES_LEFT_EXIT if need be.

    The stage's other non-daemon threads end first, as they would at the
    process's exit (:func:`_end_other_threads`); a daemon thread that tries to
    open an output after this fails instead, as the process is about to end
    under it.
    """
    global _closing
    _end_other_threads()
    with _lock:
        _closing = True
        left = temporaries_left()
    if left:
        logger.info("exiting with a temporary output still open or not removed: "
                    "the next run looks for leftovers")
        raise SystemExit(TEMPORARIES_LEFT_EXIT)


def _end_other_threads() -> None:
    """What a multiprocessing child does as it ends, done now and in the same order.

    Before Python 3.13 multiprocessing's exit function comes first (its
    finalizers, its daemonic children terminated, the others joined), then
    threading's: the exit hooks (which let a ThreadPoolExecutor's idle threads
    end after their queued work), then a join of every non-daemon thread, those
    started meanwhile included; from 3.13 threading's comes first.  A stage's
    thread that ends only through one of them (a join of a daemonic child, an
    event a finalizer sets) ends here as it would at exit; joining the threads
    by hand would wait for ever on an idle executor's.  Both functions do
    nothing the second time, when the process ends.
    """
    from multiprocessing import util

    shutdown = getattr(threading, "_shutdown", None)
    if sys.version_info < (3, 13):
        util._exit_function()  # type: ignore[attr-defined]
    if shutdown is not None:
        shutdown()


def _opened() -> None:
    global _open_temporaries
    with _lock:
        if _closing:
            raise RuntimeError("this process is exiting: no new output directory")
        _open_temporaries += 1


def _settled(*removed: Path) -> None:
    """An atomic_dir block is over; ``removed`` should be gone now."""
    global _open_temporaries, _unremoved
    left = [p for p in removed if os.path.lexists(p)]
    with _lock:
        _open_temporaries -= 1
        if left:
            _unremoved = True
    if left:
        logger.warning("could not remove %s: the next run looks for it",
                       ", ".join(map(str, left)))


def _random_tag() -> str:
    # Not uuid: importing it (and platform, which it imports) cost the
    # runner's start 3-4 ms, for 32 random bits.
    return os.urandom(4).hex()


def tmp_sibling(final: Path) -> Path:
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}-{_random_tag()}")


def unlink_durably(path: Path, *, fsync: bool) -> None:
    """Remove ``path`` if it exists; with ``fsync``, make the removal survive a crash."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    if fsync:
        fsync_path(path.parent, directory=True)


def fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise output_error(exc, path, "fsync") from exc
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path, *, fsync: bool) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``final`` whole.

    On an exception the temporary directory is removed and ``final`` (an older
    complete version, or nothing) is left as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(final)
    _opened()  # before it exists: counted from the moment it might
    try:
        tmp.mkdir()
    except BaseException:
        _settled()
        raise
    # Where _replace_dir moves an existing ``final`` aside (if there is one).
    old = final.with_name(f"{final.name}{OLD_MARK}{_random_tag()}")
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        _replace_dir(tmp, final, old)
        if fsync:
            fsync_path(final.parent, directory=True)
    except OSError as exc:
        full = exc.errno is None and _nearly_full(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            # numpy's tofile()/save() report a short fwrite as a bare
            # "N requested and M written" OSError, without errno: name the
            # real cause, so the run stops instead of retrying on a full disk.
            raise output_error(OSError(errno.ENOSPC, str(exc)), final, "write") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _settled(tmp, old)


def _fsync_tree(directory: Path) -> None:
    # Every regular file at any depth, and each directory after its contents:
    # a nested file left unsynced could be empty after a power loss although
    # the item is committed.  Symlinks are not followed (their targets are not
    # the item's output); fifos and sockets are skipped.
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                _fsync_tree(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                fsync_path(Path(entry.path))
    fsync_path(directory, directory=True)


def _nearly_full(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def _replace_dir(tmp: Path, final: Path, old: Path) -> None:
    # rename(2) cannot replace a non-empty directory, so an existing one is
    # first moved aside to ``old``.  A crash between the two renames leaves no
    # final directory at all, never a mixed one; the item is then not
    # committed and the next run redoes it.
    moved = final.exists()
    if moved:
        os.rename(final, old)
    os.rename(tmp, final)
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(root: Path) -> list[Path]:
    """Delete temporary files and directories a killed run left under ``root``;
    return those found (check whether each is gone: a removal may fail).

    Only called while holding the workdir's run lock, so no live run owns them.
    """
    removed: list[Path] = []
    if not root.exists():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + filenames:
            if TMP_MARK in name or OLD_MARK in name:
                path = Path(dirpath) / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                    dirnames[:] = [d for d in dirnames if d != name]
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def check_writable(directory: Path) -> None:
    """Fail before any compute starts if ``directory`` cannot take files."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f"probe{TMP_MARK}{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise output_error(exc, directory, "write to") from exc


def output_error(exc: OSError, path: Path, action: str) -> OutputError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = None
    if exc.errno == errno.ENOSPC:
        hint = "free disk space, then run the same command again: finished items are kept"
    elif exc.errno == errno.EIO:
        hint = "the disk reported an IO error; check it (dmesg) before trusting any output"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the directory writable, or point workdir elsewhere"
    elif exc.errno in (errno.EEXIST, errno.ENOTDIR):
        hint = "a file is where a directory is needed: move it away"
    return OutputError(f"cannot {action} {path}: {reason}", hint=hint)
