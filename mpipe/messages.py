"""The only things that cross a process boundary.

Every message is a small ``NamedTuple``: immutable, named, and cheap to
define (as frozen slots dataclasses, these types took 20 ms to create, in the
runner and again in the forkserver, on every run's start-up path) and to
pickle (as its fields).  Only :class:`Task`, which users build and may
``dataclasses.replace``, is a dataclass (it does not cross a process boundary
itself).  Readers dispatch with ``isinstance``, never ``==``: a named tuple
equals any tuple of the same values.  Item values travel *pickled* (``bytes``)
inside them: the sender pickles synchronously, so an unpicklable
value fails at the call site with the item named, instead of being dropped by a
``multiprocessing.Queue`` feeder thread (see docs/RELIABILITY.md).  The runner
forwards those bytes from one stage to the next without unpickling them.

Who sends what (see the diagram in :mod:`mpipe.runner`):

=================  =====================  ==============================
message            from -> to             meaning
=================  =====================  ==============================
``SourceBatch``    producer -> runner     what the source yielded, of:
``SourceItem``                            an item to run through the stages
``SkippedItem``                           committed by an earlier run: not redone
``ItemFailure``                           its value could not be pickled
``SourceFailed``   producer -> runner     the source function raised
``EndOfStream``    any -> its readers     one per reader; readers count them
``WorkerReady``    worker -> runner       its stage is imported: send it work
``WorkBatch``      runner -> worker       run the stage on these ``WorkItem``s
``ReplyBatch``     worker -> runner       their outcomes, in order:
``ItemDone``                              the stage returned
``ItemFailure``                           the stage raised / pickling failed
``SinkBatch``      runner -> consumer     finished ``SinkItem``s, -> writer
``Committed``      writer -> runner       these keys are durable
``ConsumerDone``   consumer -> runner     the consumer's final value
``ProcessFailed``  consumer/writer ->     a fatal error in that process
=================  =====================  ==============================
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, NamedTuple


def dumps(value: Any) -> bytes:
    """Pickle ``value`` now, so that failure is raised here and not lost."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    return pickle.loads(data)


@dataclass(frozen=True, slots=True)
class Task:
    """What a source function may yield for one item.

    ``key`` names the item in logs, reports and the resume ledger and must be
    unique; ``inputs`` are files whose size and mtime are part of the item's
    fingerprint (a task whose inputs changed is redone); ``outputs`` are paths,
    relative to the workdir, that must exist for a committed item to count as
    done on resume.  A source may also yield plain values: they are wrapped
    with ``key=str(index)``.
    """

    key: str
    value: Any
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()


class SourceItem(NamedTuple):
    seq: int  # the item's position in the source's output
    key: str
    fingerprint: str
    value: bytes


class SkippedItem(NamedTuple):
    """An item whose committed result is reused: it skips every stage."""

    seq: int
    key: str
    fingerprint: str
    value: bytes


class SourceBatch(NamedTuple):
    """Producer -> runner: the items the source yielded since the last batch."""

    items: tuple[SourceItem | SkippedItem | ItemFailure, ...]


class SourceFailed(NamedTuple):
    message: str
    traceback: str


class EndOfStream(NamedTuple):
    sender: str


class WorkItem(NamedTuple):
    seq: int
    key: str
    attempt: int
    value: bytes


class WorkerReady(NamedTuple):
    """Worker -> runner, once: its stage function is imported and it waits for work.

    Until then the runner sends it nothing: an item's ``timeout_s`` does not
    include a fresh worker's imports, and the runner never blocks sending to
    a worker that is not reading yet.
    """

    pid: int


class WorkBatch(NamedTuple):
    """Runner -> worker: items to run in order (one, or several for quick stages)."""

    items: tuple[WorkItem, ...]


class ItemDone(NamedTuple):
    seq: int
    key: str
    worker: str
    value: bytes
    busy_s: float
    io_s: float
    cpu_wait_s: float
    started_at: float = 0.0  # wall clock (time.time()), for the run's timeline
    # Of io_s, the stage's ctx.output_dir blocks committing their files (fsync if on,
    # rename), once its code was done with them.  Last, with a default: an
    # ItemDone from an older Dask worker unpickles without it.
    output_commit_s: float = 0.0


class ItemFailure(NamedTuple):
    """Why one attempt at one item failed.

    ``kind`` is ``"raised"`` (the stage function raised), ``"died"`` (the worker
    process died holding the item), ``"timeout"`` (it ran past ``timeout_s``),
    ``"pickle"`` (its value or result could not be pickled) or ``"result"``
    (the last stage returned something results.h5 cannot hold).  ``retryable``
    is False where another attempt would return the same: a result that cannot
    be pickled, or one results.h5 cannot hold (not for a MemoryError or an
    OSError on the way).
    """

    seq: int
    key: str
    stage: str
    worker: str
    kind: str
    message: str
    traceback: str = ""
    exception: bytes | None = None
    retryable: bool = True
    # The attempt's time in the stage: measured where the stage raised; the
    # timeout for a timeout; 0.0 for a death (its start is not known here).
    busy_s: float = 0.0
    started_at: float = 0.0  # time.time() as the attempt started, where known
    io_s: float = 0.0  # of busy_s, as in ItemDone (where the stage raised)
    cpu_wait_s: float = 0.0


class ReplyBatch(NamedTuple):
    """Worker -> runner: outcomes of items, in the order they were run."""

    replies: tuple[ItemDone | ItemFailure, ...]


class SinkItem(NamedTuple):
    """A finished item on its way to the consumer and the writer.

    ``replayed`` items come from the ledger: the writer writes their row but
    does not commit them again.
    """

    seq: int
    key: str
    fingerprint: str
    value: bytes
    replayed: bool


class SinkBatch(NamedTuple):
    """Runner -> consumer -> writer: the items finished since the last batch.

    One message per runner loop iteration rather than per item: each message
    costs a queue put, a feeder-thread wake-up and a get in three processes.
    The consumer forwards the same bytes to the writer.
    """

    items: tuple[SinkItem, ...]


class Committed(NamedTuple):
    """Writer -> runner: these keys are durable (``rejected`` ones are not)."""

    keys: tuple[str, ...]
    replayed: int = 0
    rejected: tuple[ItemFailure, ...] = ()
    # Of ``rejected``, the replayed ones: counted as skipped when produced (they
    # stay in the ledger).
    rejected_replayed: int = 0


class ConsumerDone(NamedTuple):
    value: bytes


class Sealed(NamedTuple):
    """Sealer -> runner: the results file is in place.

    With the versions of the libraries that wrote it (numpy, h5py, HDF5), as
    loaded there: the runner does not load them, and for the report, asking
    the installed packages would cost it ``importlib.metadata`` (some 20 ms).
    """

    versions: dict[str, str]


class ProcessFailed(NamedTuple):
    process: str
    message: str
    traceback: str = ""
    exit_code: int = 3


class Shutdown(NamedTuple):
    """Runner -> worker: finish nothing more, exit cleanly."""

    reason: str = "done"
