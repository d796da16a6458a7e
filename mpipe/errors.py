"""mpipe's errors: a small hierarchy, each class carrying its exit code.

One place, :func:`mpipe.cli.main`, turns an :class:`MpipeError` into a message on
stderr and ``sys.exit(error.exit_code)``.  Library code raises; it never prints
or exits.

Item-level failures (a stage function raised, a worker died holding the item)
are *not* exceptions that unwind the runner: they are recorded as
:class:`mpipe.messages.ItemFailure` and the other items go on.  Only when the
run is over does :class:`ItemsFailedError` summarise them.
"""

from __future__ import annotations

import signal

# How an error's hint follows its message when it is said (and parsed back, mpipe.retry).
HINT_SEP = "\n  hint: "
# What to do about results of differing shapes or number types (writer, runner).
ONE_ROW_SHAPE = ("make every item's result one shape and number type (editing the stage "
                 "redoes its items)")


class MpipeError(Exception):
    """Base of every error mpipe raises on purpose.

    Not raised for bugs in mpipe itself: those propagate as ordinary exceptions
    with their traceback.
    """

    exit_code = 3

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.logged = False  # the runner logged it as it happened (mpipe.cli says less)

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}{HINT_SEP}{self.hint}"
        return self.message


class ConfigError(MpipeError):
    """The configuration or the command line is wrong (exit 2).

    Raised before any process starts.  The message names the file, the dotted
    key and, when known, the YAML line.  Not raised for bad *input data*: a
    broken input file fails its item, not the run.
    """

    exit_code = 2


class ItemsFailedError(MpipeError):
    """The run finished, but some items failed for good (exit 1).

    Everything that succeeded was committed; the run report lists each failed
    item with its cause.  Not raised when the pipeline itself broke: that is
    :class:`PipelineBrokenError`.
    """

    exit_code = 1

    def __init__(self, failed: int, total: int, report_path: str | None) -> None:
        where = f"; details in {report_path}" if report_path else ""
        super().__init__(
            f"{failed} of {total} items failed{where}",
            hint="fix the cause and run the same command again: committed items are not redone, "
            "unless what made them changed (editing a stage's code redoes its items)",
        )
        self.failed = failed


class OutputError(MpipeError):
    """Outputs cannot be written: unwritable directory, full disk, failed fsync (exit 74).

    Nothing half-written is left where a finished output would be.  After an
    ``EIO`` from ``fsync`` the data may be lost even if a later fsync succeeds
    ("fsyncgate"), so mpipe treats it as fatal rather than retrying.
    """

    exit_code = 74  # EX_IOERR


class RunLockedError(MpipeError):
    """Another mpipe run holds this workdir's lock (exit 75, EX_TEMPFAIL).

    The lock is an ``flock`` that dies with its holder, so a lock left by a
    killed run never blocks the next one: this error always means a live run.
    """

    exit_code = 75


class PipelineBrokenError(MpipeError):
    """The pipeline itself cannot go on (exit 3).

    The source raised, the consumer or the writer died, a stage's workers keep
    dying before taking any item, or the end-of-run invariant
    ``produced == done + failed + skipped`` does not hold.  Everything already
    committed stays committed; the next run resumes from there.
    """

    exit_code = 3


class InternalError(MpipeError):
    """A bug in mpipe: an exception it did not expect (exit 70, EX_SOFTWARE).

    Not exit 1, which says "some items failed" to whoever reads exit codes;
    the traceback is printed for the bug report.  What was committed stays
    committed: the runner tears the run down on the way out.
    """

    exit_code = 70


class InterruptedRunError(MpipeError):
    """The run was stopped by SIGINT or SIGTERM (exit 128 + signal number).

    In-flight items were given ``shutdown_grace_s`` to finish and what finished
    was committed.
    """

    def __init__(self, signum: int, committed: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name}; {committed} items committed",
            hint="run the same command again to resume where this run stopped",
        )
        self.signum = signum
        self.exit_code = 128 + signum
