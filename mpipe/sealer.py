"""The runner's handle on the sealer, the process that moves results.h5 into place.

The sealer (:func:`mpipe.writer.seal_main`) imports h5py as it starts, the
longest start of any child (50-70 ms here), and every run waits for it at the
end.  So it is started as early as a run can start a process: ``mpipe run``
starts it right after the child that checks the config's names (unless the
config has a ``prepare``, which runs in mpipe's own process and may leave
processes it forked holding the sealer's pipes), and its import runs while that
check and the run's set-up do (docs/BENCHMARKS.md, "What
changed since run 12").  Started that early it opens nothing: it waits for the
runner's :class:`~mpipe.writer.SealSpec`, or for the end of its pipe, which
means the run is not to be sealed (a config error, a run that could not start,
failed or was interrupted).

A run started without one (``Runner`` used as a library) starts its own.
Whoever started it stops it; :meth:`Sealer.stop` may be called again, by the
runner's teardown and by ``mpipe run`` on its way out, and does nothing then.
"""

from __future__ import annotations

import logging
from multiprocessing.context import ForkServerContext

from mpipe import procs
from mpipe.writer import SealSpec, seal_main

logger = logging.getLogger(__name__)

# How long a killed sealer may take to be gone before it is left to the kernel.
KILLED_JOIN_S = 10.0


class Sealer:
    """A started sealer process, its pipe, and the end of its lifeline."""

    def __init__(self, mp: ForkServerContext, log_level: int) -> None:
        self.conn, seal_end = mp.Pipe()
        # Its own lifeline (it may start before the run's): closed by stop(),
        # or by the kernel when mpipe dies, it makes the sealer exit.
        lifeline_r, self._lifeline = mp.Pipe(duplex=False)
        self.process = mp.Process(target=seal_main, name="writer-seal",
                                  args=(seal_end, lifeline_r, log_level))
        try:
            procs.start(self.process)  # a machine limit: exit 3 with the limit named
        except BaseException:
            self.conn.close()
            self._lifeline.close()
            raise
        finally:
            seal_end.close()
            lifeline_r.close()
        logger.info("started writer-seal (pid %s)", self.process.pid)
        self.sealing = False
        self.exitcode: int | None = None
        self._stopped = False

    def seal(self, spec: SealSpec) -> bool:
        """Hand it the spec; False if nobody reads the pipe (it was killed)."""
        try:
            self.conn.send(spec)
        except OSError:
            return False
        self.sealing = True
        return True

    def stop(self, grace_s: float) -> int | None:
        """Let it finish sealing, or kill it if it was never asked to; its exit code.

        ``grace_s`` is how long sealing may take before it is killed.  Its
        answer, if it sealed, stays readable on :attr:`conn` (:meth:`answer`).
        """
        if not self._stopped:
            self._stopped = True
            if self.sealing:
                procs.stop_processes([self.process], grace_s=grace_s)
            else:
                # It has opened nothing: no need to wait for its h5py import
                # to end.
                self.conn.close()
                if self.process.exitcode is None:  # not a pid the kernel may reuse
                    self.process.kill()
                self.process.join(KILLED_JOIN_S)
                if self.process.exitcode is None:  # in D state: a hung mount
                    logger.error("writer-seal (pid %s) survived SIGKILL", self.process.pid)
            self._lifeline.close()
            self.exitcode = self.process.exitcode
        return self.exitcode

    def answer(self) -> object:
        """What it sent after sealing (it has exited), or ``"no answer"``."""
        reply: object = "no answer"
        try:
            if not self.conn.closed and self.conn.poll():
                reply = self.conn.recv()
        except (EOFError, OSError):
            pass  # it exited without answering (a crash in HDF5, a kill)
        self.conn.close()
        return reply
