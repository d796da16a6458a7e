"""A worker's io/cpu slot shared by its threads: given back once, timed once.

Real semaphores and shared memory as a worker has them, driven by threads in
this process.  The bounds are loose: they tell a span counted once from one
lost (0.1 s) or summed over the threads (2 s).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
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
    assert 0.3 <= ctx.output_commit_s <= ctx.io_s < 2 * ctx.output_commit_s, ctx


def _commit_hook(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                 during: Callable[[], None]) -> None:
    """ctx.output_dir's commit runs ``during`` (it waits on the test's events)."""
    from mpipe import outputs

    @contextmanager
    def atomic_dir(final: Path, *, fsync: bool) -> Iterator[Path]:
        yield tmp_path
        during()

    monkeypatch.setattr(outputs, "atomic_dir", atomic_dir)


def _run_threads(*targets: Callable[[], None]) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)


def test_commits_in_threads_at_once_count_once(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    # Four threads commit together (a barrier inside the commit): the time is
    # the worker's, not four times it.
    together = threading.Barrier(4, timeout=10)
    _commit_hook(monkeypatch, tmp_path, lambda: (together.wait(), time.sleep(0.3)))
    ctx, _, _, _ = _context()

    def commit() -> None:
        with ctx.output_dir("a"):
            pass

    start = time.perf_counter()
    _run_threads(commit, commit, commit, commit)
    wall = time.perf_counter() - start
    assert 0.3 <= ctx.output_commit_s <= wall and _same(ctx.io_s, ctx.output_commit_s), ctx


def test_a_commit_and_an_io_block_in_two_threads_count_their_union(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ctx, _, _, _ = _context()
    committing, io_done, io_entered = threading.Event(), threading.Event(), threading.Event()

    def commit() -> None:
        with ctx.output_dir("a"):
            pass

    # An io() block of 0.05 s inside another thread's commit (outside io()):
    # the IO is the commit's span, not the commit plus the block.
    def hold_until_io_done() -> None:
        committing.set()
        io_done.wait(10)

    def short_io() -> None:
        committing.wait(10)
        with ctx.io():
            time.sleep(0.05)
        io_done.set()

    _commit_hook(monkeypatch, tmp_path, hold_until_io_done)
    _run_threads(commit, short_io)
    assert ctx.output_commit_s >= 0.05 and ctx.io_s == ctx.output_commit_s, ctx

    # A commit that goes on after another thread's io() block has ended: IO
    # from the block's start to the commit's end, not the block alone.
    ctx, _, _, _ = _context()
    committing.clear()
    io_left = threading.Event()
    _commit_hook(monkeypatch, tmp_path,
                 lambda: (committing.set(), io_left.wait(10), time.sleep(0.1)))
    io_start = commit_end = 0.0

    def io_then_leave() -> None:
        nonlocal io_start
        io_start = time.perf_counter()
        with ctx.io():
            io_entered.set()
            committing.wait(10)
        io_left.set()

    def commit_once_io_entered() -> None:
        nonlocal commit_end
        io_entered.wait(10)
        commit()
        commit_end = time.perf_counter()

    _run_threads(io_then_leave, commit_once_io_entered)
    assert ctx.output_commit_s >= 0.1, ctx
    assert ctx.output_commit_s < ctx.io_s <= commit_end - io_start, (ctx, io_start, commit_end)


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
    assert 0.3 <= ctx.output_commit_s <= ctx.io_s < 2 * ctx.output_commit_s, ctx
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


def test_an_io_slot_wait_that_raises_leaves_no_span_open() -> None:
    # A stage's own signal handler may raise while the worker waits for its
    # io slot: the worker's later items must still count their IO.
    ctx, _, real, _ = _context()

    class Interrupted(Exception):
        pass

    class RaisingOnce:
        def acquire(self) -> None:
            raise Interrupted

    ctx.io_semaphore = RaisingOnce()  # type: ignore[assignment]
    with pytest.raises(Interrupted), ctx.io():
        pass
    ctx.io_semaphore = real
    ctx.reset_times()
    with ctx.io():
        time.sleep(0.05)
    assert ctx.io_s >= 0.05 and real.get_value() == 1, ctx


def test_a_child_forked_while_a_span_is_locked_can_count(tmp_path: Path) -> None:
    # A stage that forks (its own multiprocessing.Pool) while another of its
    # threads holds a span's lock: the child gets the lock anew, or its first
    # ctx.io() would wait for ever.
    import os
    import select
    import signal

    ctx, _, _, _ = _context()
    ctx._io_spans._lock.acquire()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            with ctx.io():
                pass
            os.write(write_end, b"ok")
        finally:
            os._exit(0)
    ctx._io_spans._lock.release()
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], 10)
    answer = os.read(read_end, 2) if ready else b""
    os.close(read_end)
    if not answer:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert answer == b"ok"


@pytest.mark.usefixtures("slow_commit")
def test_a_commit_interrupted_between_its_spans_leaves_none_open() -> None:
    # Something raises (a stage's own signal handler) after the IO span has
    # opened and before the commit's: the IO span is closed all the same.
    ctx, _, _, _ = _context()

    class Interrupted(Exception):
        pass

    def interrupted(now: float | None = None) -> None:
        raise Interrupted

    ctx._commit_spans.enter = interrupted  # type: ignore[method-assign]
    with pytest.raises(Interrupted), ctx.output_dir("a"):
        pass
    ctx.reset_times()
    with ctx.io():
        time.sleep(0.05)
    assert ctx.io_s >= 0.05, ctx


@pytest.mark.usefixtures("slow_commit")
def test_a_span_whose_exit_raises_still_closes_the_other() -> None:
    ctx, _, _, _ = _context()

    class Interrupted(Exception):
        pass

    real_exit = ctx._commit_spans.exit

    def interrupted(now: float | None = None) -> None:
        real_exit(now)
        raise Interrupted

    ctx._commit_spans.exit = interrupted  # type: ignore[method-assign]
    with pytest.raises(Interrupted), ctx.output_dir("a"):
        pass
    assert ctx.io_s >= 0.3 and _same(ctx.io_s, ctx.output_commit_s), ctx
    ctx.reset_times()
    with ctx.io():
        time.sleep(0.05)
    assert ctx.io_s >= 0.05, ctx
