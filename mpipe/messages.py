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
``SourceBatch``    producer -> runner     what the source yielded, of:
``SourceItem``                            an item to run through the stages
``SkippedItem``                           committed by an earlier run: not redone
``ItemFailure``                           its value could not be pickled
``SourceFailed``   producer -> runner     the source function raised
``EndOfStream``    any -> its readers     one per reader; readers count them
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

import operator
import pickle
from dataclasses import dataclass, fields
from typing import Any, TypeVar

_M = TypeVar("_M")


def dumps(value: Any) -> bytes:
    """Pickle ``value`` now, so that failure is raised here and not lost."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    return pickle.loads(data)


def _pickled_as_fields(cls: type[_M]) -> type[_M]:
    """Pickle a frozen slots dataclass as ``cls(*fields)``.

    The ``__getstate__``/``__setstate__`` that ``dataclass(slots=True)`` adds
    call ``dataclasses.fields()`` and set each field from Python for every
    object: a batch of 8 work items took 40 us each way, a third of a trivial
    item's whole cost.  Reducing to the constructor's arguments takes 10 us.
    """
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    if len(names) == 1:
        (name,) = names

        def __reduce__(self: Any) -> tuple[type[_M], tuple[Any, ...]]:
            return cls, (getattr(self, name),)
    else:
        values = operator.attrgetter(*names)

        def __reduce__(self: Any) -> tuple[type[_M], tuple[Any, ...]]:
            return cls, values(self)

    setattr(cls, "__reduce__", __reduce__)  # noqa: B010 (mypy: no method assignment)
    return cls


@_pickled_as_fields
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


@_pickled_as_fields
@dataclass(frozen=True, slots=True)
class SourceItem:
    index: int
    key: str
    fingerprint: str
    value: bytes


@_pickled_as_fields
@dataclass(frozen=True, slots=True)
class SkippedItem:
    """An item whose committed result is reused: it skips every stage."""

    index: int
    key: str
    fingerprint: str
    value: bytes


@_pickled_as_fields
@dataclass(frozen=True, slots=True)
class SourceBatch:
    """Producer -> runner: the items the source yielded since the last batch."""

    items: tuple[SourceItem | SkippedItem | ItemFailure, ...]


@_pickled_as_fields
@dataclass(frozen=True, slots=True)
class SourceFailed:
    message: str
    traceback: str


@_pickled_as_fields
@dataclass(frozen=True, slots=True)
class EndOfStream:
    sender: str


@_pickled_as_fields
@dataclass(frozen=True, slots=True)
class WorkItem:
    index: int
    key: str
    attempt: int
    value: bytes


@_pickled_as_fields
@dataclass(frozen=True, slots=True)
class WorkBatch:
    """Runner -> worker: items to run in order (one, or several for quick stages)."""

    items: tuple[WorkItem, ...]


@_pickled_as_fields
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


@_pickled_as_fields
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


@_pickled_as_fields
@dataclass(frozen=True, slots=True)
class ReplyBatch:
    """Worker -> runner: outcomes of items, in the order they were run."""

    replies: tuple[ItemDone | ItemFailure, ...]


@_pickled_as_fields
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


@_pickled_as_fields
@dataclass(frozen=True, slots=True)
class SinkBatch:
    """Runner -> consumer -> writer: the items finished since the last batch.

    One message per runner loop iteration rather than per item: each message
    costs a queue put, a feeder-thread wake-up and a get in three processes.
    The consumer forwards the same bytes to the writer.
    """

    items: tuple[SinkItem, ...]


@_pickled_as_fields
@dataclass(frozen=True, slots=True)
class Committed:
    """Writer -> runner: these keys are durable (``rejected`` ones are not)."""

    keys: tuple[str, ...]
    replayed: int = 0
    rejected: tuple[ItemFailure, ...] = ()


@_pickled_as_fields
@dataclass(frozen=True, slots=True)
class ConsumerDone:
    value: bytes


@_pickled_as_fields
@dataclass(frozen=True, slots=True)
class ProcessFailed:
    process: str
    message: str
    traceback: str = ""
    exit_code: int = 3


@_pickled_as_fields
@dataclass(frozen=True, slots=True)
class Shutdown:
    """Runner -> worker: finish nothing more, exit cleanly."""

    reason: str = "done"
