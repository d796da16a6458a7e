"""One run per workdir at a time.

An ``flock`` on ``<workdir>/.mpipe/lock``: the kernel drops it when the holding
process dies, however it dies, so a lock left by a SIGKILLed run never blocks
the next one (unlike a PID file: DVC's "Unable to acquire lock", Snakemake's
``--unlock``).  Children never inherit the descriptor: they are started by the
forkserver, not forked from the runner.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mpipe.errors import RunLockedError
from mpipe.outputs import output_error


class RunLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # the workdir is not writable: the first write of a run
            raise output_error(exc, Path(exc.filename or self.path), "write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if not isinstance(exc, BlockingIOError):  # ENOLCK: an NFS without locks
                os.close(fd)
                raise output_error(exc, self.path, "lock") from None
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"another mpipe run (pid {holder}) is using {self.path.parent.parent}",
                hint="wait for it to finish; a lock left by a killed run is released by the kernel",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
