"""Imported once by the multiprocessing forkserver (it is first in its preload list).

The runner learns a child's exit status *from the forkserver*: if the
forkserver dies, every child looks dead (exit code 255) while still running.
systemd's ``KillMode=control-group`` and ``kill -TERM -PGID`` send SIGTERM to
the whole group, forkserver included, and the forkserver installs no handler
for it.  So it ignores SIGTERM from here on; it still exits when the runner does
(it watches its own pipe from the runner), and SIGKILL still ends it.

Children inherit the ignored SIGTERM, which is what they want anyway (see
:mod:`mpipe.procs`).
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
