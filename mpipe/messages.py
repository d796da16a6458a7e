"""The only things that cross a process boundary.

Every message is a small frozen dataclass.  Item values travel *pickled*
(``bytes``) inside them: the sender pickles synchronously, so an unpicklable
value fails at the call site with the item named, instead of being dropped by a
``multiprocessing.Queue`` feeder thread (see docs/RELIABILITY.md).  The runner
forwards those bytes from one stage to the next without unpickling them.

Who sends what (see the diagram in :mod:`mpipe.runner`):

=================  =====================  ==============================
message            from -> to             meaning
=================  =====================  ==============================
``SourceItem``     producer -> runner     an item to run through the stages
``SkippedItem``    producer -> runner     committed by an earlier run: not redone
``SourceFailed``   producer -> runner     the source function raised
``EndOfStream``    any -> its readers     one per reader; readers count them
``WorkBatch``      runner -> worker       run the stage on these ``WorkItem``s
``ReplyBatch``     worker -> runner       their outcomes, in order:
``ItemDone``                              the stage returned
``ItemFailure``                           the stage raised / pickling failed
``SinkItem``       runner -> consumer     a finished item, -> writer
``Committed``      writer -> runner       these keys are durable
``ConsumerDone``   consumer -> runner     the consumer's final value
``ProcessFailed``  consumer/writer ->     a fatal error in that process
=================  =====================  ==============================
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any


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


@dataclass(frozen=True, slots=True)
class SourceItem:
    index: int
    key: str
    fingerprint: str
    value: bytes


@dataclass(frozen=True, slots=True)
class SkippedItem:
    """An item whose committed result is reused: it skips every stage."""

    index: int
    key: str
    fingerprint: str
    value: bytes


@dataclass(frozen=True, slots=True)
class SourceFailed:
    message: str
    traceback: str


@dataclass(frozen=True, slots=True)
class EndOfStream:
    sender: str


@dataclass(frozen=True, slots=True)
class WorkItem:
    index: int
    key: str
    attempt: int
    value: bytes


@dataclass(frozen=True, slots=True)
class WorkBatch:
    """Runner -> worker: items to run in order (one, or several for quick stages)."""

    items: tuple[WorkItem, ...]


@dataclass(frozen=True, slots=True)
class ItemDone:
    index: int
    key: str
    worker: str
    value: bytes
    busy_s: float
    io_s: float
    cpu_wait_s: float
    started_at: float = 0.0  # wall clock (time.time()), for the run's timeline


@dataclass(frozen=True, slots=True)
class ItemFailure:
    """Why one attempt at one item failed.

    ``kind`` is ``"raised"`` (the stage function raised), ``"died"`` (the worker
    process died holding the item), ``"timeout"`` (it ran past ``timeout_s``) or
    ``"pickle"`` (its value or result could not be pickled).
    """

    index: int
    key: str
    stage: str
    worker: str
    kind: str
    message: str
    traceback: str = ""
    exception: bytes | None = None


@dataclass(frozen=True, slots=True)
class ReplyBatch:
    """Worker -> runner: outcomes of items, in the order they were run."""

    replies: tuple[ItemDone | ItemFailure, ...]


@dataclass(frozen=True, slots=True)
class SinkItem:
    """A finished item on its way to the consumer and the writer.

    ``replayed`` items come from the ledger: the writer writes their row but
    does not commit them again.
    """

    index: int
    key: str
    fingerprint: str
    value: bytes
    replayed: bool


@dataclass(frozen=True, slots=True)
class Committed:
    """Writer -> runner: these keys are durable (``rejected`` ones are not)."""

    keys: tuple[str, ...]
    replayed: int = 0
    rejected: tuple[ItemFailure, ...] = ()


@dataclass(frozen=True, slots=True)
class ConsumerDone:
    value: bytes


@dataclass(frozen=True, slots=True)
class ProcessFailed:
    process: str
    message: str
    traceback: str = ""
    exit_code: int = 3


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Runner -> worker: finish nothing more, exit cleanly."""

    reason: str = "done"
