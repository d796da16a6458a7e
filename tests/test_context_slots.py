"""A worker's io/cpu slot shared by its threads: given back once, timed once.

Real semaphores and shared memory as a worker has them, driven by threads in
this process.  The bounds are loose: they tell a span counted once from one
lost (0.1 s) or summed over the threads (2 s).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mpipe.context import SlotFlags, StageContext, StopFlag


def _context() -> tuple[StageContext, Any, Any, Any]:
    flags = multiprocessing.RawArray("b", 2)
    io, cpu = multiprocessing.BoundedSemaphore(1), multiprocessing.BoundedSemaphore(1)
    ctx = StageContext(stage="s", worker="w", params={}, workdir=Path("."), fsync=False,
                       allow_outside_workdir=False, io_semaphore=io, cpu_semaphore=cpu,
                       stop_event=StopFlag(multiprocessing.RawArray("b", 1)),
                       flags=SlotFlags(flags, 0))
    return ctx, flags, io, cpu


def _in_threads(target: Any, args_list: list[tuple[Any, ...]]) -> None:
    threads = [threading.Thread(target=target, args=args) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_threads_share_the_io_slot_and_its_time_is_the_span_it_was_held() -> None:
    ctx, flags, io, _ = _context()

    def use(seconds: float) -> None:
        with ctx.io():
            time.sleep(seconds)

    # The first thread leaves after 0.1 s; the others hold the slot to 0.5 s.
    _in_threads(use, [(0.1,), (0.5,), (0.5,), (0.5,)])
    assert 0.45 <= ctx.io_s <= 1.5, ctx.io_s
    assert list(flags) == [0, 0] and io.get_value() == 1


def test_threads_waiting_for_the_cpu_slot_count_the_wait_once() -> None:
    ctx, flags, _, cpu = _context()
    cpu.acquire()  # another worker holds the only slot

    def use() -> None:
        with ctx.cpu():
            pass

    releaser = threading.Timer(0.5, cpu.release)
    releaser.start()
    _in_threads(use, [(), (), (), ()])
    assert 0.45 <= ctx.cpu_wait_s <= 1.5, ctx.cpu_wait_s
    assert list(flags) == [0, 0] and cpu.get_value() == 1


def test_a_nested_block_in_one_thread_takes_nothing_more() -> None:
    ctx, flags, io, _ = _context()
    with ctx.io(), ctx.io():
        assert io.get_value() == 0 and flags[0] == 1
    assert io.get_value() == 1 and flags[0] == 0


def _same(a: float, b: float) -> bool:
    """Two spans of the same block, timed by two clock reads each."""
    return abs(a - b) < 1e-3


@pytest.fixture
def slow_commit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ctx.output_dir's commit (fsync, rename) takes 0.3 s."""
    from mpipe import outputs

    @contextmanager
    def atomic_dir(final: Path, *, fsync: bool) -> Iterator[Path]:
        yield tmp_path
        time.sleep(0.3)

    monkeypatch.setattr(outputs, "atomic_dir", atomic_dir)


@pytest.mark.usefixtures("slow_commit")
def test_output_commit_time_is_io_counted_once() -> None:
    # Outside any io() block the commit is IO the stage did not mark: io_s is
    # the commit's time; inside one, the block's span holds it, counted once
    # (twice would be at least 2 x the commit).
    ctx, _, _, _ = _context()
    with ctx.output_dir("a"):
        pass
    assert ctx.output_commit_s >= 0.3 and _same(ctx.io_s, ctx.output_commit_s), ctx
    ctx, _, _, _ = _context()
    with ctx.io(), ctx.output_dir("a"):
        pass
    assert 0.3 <= ctx.output_commit_s <= ctx.io_s < 1.5 * ctx.output_commit_s, ctx


@pytest.mark.usefixtures("slow_commit")
def test_commits_and_io_in_threads_count_the_time_spent_once() -> None:
    # Four threads commit at once: 0.3 s of the worker's time, not 1.2.
    ctx, _, _, _ = _context()

    def commit() -> None:
        with ctx.output_dir("a"):
            pass

    _in_threads(commit, [(), (), (), ()])
    assert 0.3 <= ctx.output_commit_s < 0.9 and _same(ctx.io_s, ctx.output_commit_s), ctx
    # One thread in io() for 0.6 s, another committing inside that time
    # (outside io()): 0.6 s of IO, of it 0.3 s of commit; not 0.9 s.
    ctx, _, _, _ = _context()

    def read() -> None:
        with ctx.io():
            time.sleep(0.6)

    def late_commit() -> None:
        time.sleep(0.1)
        commit()

    threads = [threading.Thread(target=read), threading.Thread(target=late_commit)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ctx.output_commit_s >= 0.3 and 0.6 <= ctx.io_s < 0.85, ctx


@pytest.mark.usefixtures("slow_commit")
def test_a_dask_task_counts_commits_and_nested_io_once() -> None:
    from mpipe.dask_backend import DaskStageContext

    def context() -> DaskStageContext:
        return DaskStageContext(stage="s", worker="w", params={}, workdir=Path("."),
                                fsync=True, allow_outside_workdir=False)

    ctx = context()
    with ctx.output_dir("a"):
        pass
    assert ctx.output_commit_s >= 0.3 and _same(ctx.io_s, ctx.output_commit_s), ctx
    ctx = context()
    with ctx.io(), ctx.io(), ctx.output_dir("a"):
        pass
    assert 0.3 <= ctx.output_commit_s <= ctx.io_s < 1.5 * ctx.output_commit_s, ctx
    ctx.reset_times()
    assert ctx.io_s == pytest.approx(ctx.output_commit_s, abs=1e-3) == 0.0


def test_a_failed_commit_still_counts_its_time(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    # A stage may catch the OSError of a commit (a full disk) and go on: the
    # time the commit took is still IO, not compute.
    from mpipe import outputs

    @contextmanager
    def failing(final: Path, *, fsync: bool) -> Iterator[Path]:
        yield tmp_path
        time.sleep(0.3)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "atomic_dir", failing)
    ctx, _, _, _ = _context()
    with pytest.raises(OSError), ctx.output_dir("a"):
        pass
    assert ctx.output_commit_s >= 0.3 and _same(ctx.io_s, ctx.output_commit_s), ctx
