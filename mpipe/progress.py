"""Live progress of a run: a rich display on a terminal, plain lines elsewhere.

Both reporters implement :class:`mpipe.runner.ProgressReporter`.  The runner
only keeps counters; a reporter reads them through ``snapshot()`` from its own
thread (rich's refresh thread, or a timer thread for plain lines), a few times a
second at most, so the run's loop never waits on the display.  A snapshot is a
handful of plain ints; if one is taken while the loop rewires its workers
(a dict changing size under us), the reporter shows the previous one.

* :class:`LiveProgress` (stdout is a terminal): one line per stage with items
  done / total, items/s, ETA, busy workers / workers and the depth of the
  stage's input queue.  The total is known once the source has ended; before
  that the line shows what has been produced so far, with a ``+``.
* :class:`LineProgress` (cron, CI, ``| tee``): one line of plain ASCII per
  interval (default 10 s), no control characters, and a final line.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    # rich is imported where a display is drawn: a --quiet or cron run never
    # pays for it (0.04 s at start-up).
    from rich.console import Console, RenderableType

logger = logging.getLogger(__name__)

Snapshot = dict[str, Any]
DEFAULT_INTERVAL_S = 10.0
# Items/s over this trailing window: recent enough to follow a change of
# pace, long enough not to jump with every item.
RATE_WINDOW_S = 15.0


@dataclass(frozen=True)
class StageLine:
    name: str
    done: int
    failed: int
    total: int | None  # None until the source has ended
    seen: int  # items that reached (or will reach) this stage so far
    rate: float | None  # items/s
    eta_s: float | None
    busy: int
    workers: int
    queue: int
    queue_size: int

    @property
    def count_text(self) -> str:
        if self.total is not None:
            return f"{self.done}/{self.total}"
        return f"{self.done}/{self.seen}+"


class RateMeter:
    """Trailing items/s per stage, from the snapshots it is shown."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def rate(self, stage: str, now: float, finished: int) -> float | None:
        samples = self._samples.setdefault(stage, deque())
        samples.append((now, finished))
        while len(samples) > 2 and now - samples[1][0] >= self.window_s:
            samples.popleft()
        t0, n0 = samples[0]
        if now - t0 < 0.5:
            return None
        return max(finished - n0, 0) / (now - t0)


def stage_lines(snap: Snapshot, meter: RateMeter) -> list[StageLine]:
    """What each stage's line says, from one snapshot."""
    stages = snap.get("stages", [])
    stage_failed = sum(int(s["failed"]) for s in stages)
    # Items the source itself failed never reach a stage; writer rejections
    # are counted here too, which only ever lowers the estimate of the total.
    source_failed = max(int(snap.get("failed", 0)) - stage_failed, 0)
    base = int(snap.get("produced", 0)) - int(snap.get("skipped", 0)) - source_failed
    ended = bool(snap.get("producer_ended"))
    now = float(snap.get("elapsed_s", 0.0))
    lines = []
    lost_upstream = 0
    for s in stages:
        reach = max(base - lost_upstream, 0)
        done, failed = int(s["done"]), int(s["failed"])
        rate = meter.rate(s["name"], now, done + failed)
        if rate is None and done + failed and now > 0:
            rate = (done + failed) / now  # no trailing window yet: the average so far
        total = reach if ended else None
        eta = None
        if total is not None and rate:
            eta = max(total - done - failed, 0) / rate
        elif total is not None and done + failed >= total:
            eta = 0.0
        lines.append(StageLine(
            name=s["name"], done=done, failed=failed, total=total, seen=reach, rate=rate,
            # "busy" counts items held, and a quick stage's workers hold a few
            # prefetched ones each: no more workers than there are can be busy.
            eta_s=eta, busy=min(int(s["busy"]), int(s["workers"])), workers=int(s["workers"]),
            queue=int(s["queue"]),
            queue_size=int(s["queue_size"])))
        lost_upstream += failed
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _rate(rate: float | None) -> str:
    if rate is None:
        return "?/s"
    return f"{rate:.2f}/s" if rate < 100 else f"{rate:.0f}/s"


def format_line(pipeline: str, snap: Snapshot, lines: list[StageLine], *,
                final: bool = False) -> str:
    """One plain ASCII line for logs: every stage, then the commit counts."""
    parts = []
    for line in lines:
        text = (f"{line.name} {line.count_text} {_rate(line.rate)} ETA {_duration(line.eta_s)} "
                f"busy {line.busy}/{line.workers} queue {line.queue}/{line.queue_size}")
        if line.failed:
            text += f" failed {line.failed}"
        parts.append(text)
    counts = (f"committed {snap.get('committed', 0)}, skipped {snap.get('skipped', 0)}, "
              f"failed {snap.get('failed', 0)}")
    state = "finished" if final else ("stopping" if snap.get("stopping") else "running")
    elapsed = float(snap.get("elapsed_s", 0.0))
    return f"[{elapsed:7.1f}s] {pipeline} {state}: " + " | ".join([*parts, counts])


def render_table(pipeline: str, snap: Snapshot, lines: list[StageLine]) -> RenderableType:
    from rich import box
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    """The live display: one row per stage."""
    table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False, expand=False)
    table.add_column("stage", style="bold")
    table.add_column("", width=24)
    table.add_column("items", justify="right")
    table.add_column("items/s", justify="right")
    table.add_column("ETA", justify="right")
    table.add_column("busy", justify="right")
    table.add_column("queue", justify="right")
    for line in lines:
        total = line.total if line.total is not None else max(line.seen, 1)
        bar = ProgressBar(total=max(total, 1), completed=line.done + line.failed, width=24,
                          pulse=line.total is None)
        table.add_row(line.name, bar, line.count_text, _rate(line.rate), _duration(line.eta_s),
                      f"{line.busy}/{line.workers}", f"{line.queue}/{line.queue_size}")
    state = "stopping" if snap.get("stopping") else "running"
    head = Text.assemble((f"{pipeline} ", "bold"), f"{state} {_duration(snap.get('elapsed_s'))}  ",
                         f"committed {snap.get('committed', 0)}  skipped "
                         f"{snap.get('skipped', 0)}  failed {snap.get('failed', 0)}")
    return Group(head, table)


class _Reporter:
    def __init__(self, pipeline: str) -> None:
        self.pipeline = pipeline
        self.meter = RateMeter()
        self._snapshot: Callable[[], Snapshot] | None = None
        self._last: Snapshot = {}

    def _read(self) -> Snapshot:
        if self._snapshot is not None:
            try:
                self._last = self._snapshot()
            except (RuntimeError, AttributeError, KeyError, IndexError) as exc:
                # The loop changed a container while we read it: show the last one.
                logger.debug("progress snapshot skipped: %r", exc)
        return self._last


class LiveProgress(_Reporter):
    """A rich Live display, refreshed by rich's own thread."""

    def __init__(self, pipeline: str, console: Console, refresh_per_second: float = 4.0) -> None:
        super().__init__(pipeline)
        self.console = console
        self.refresh_per_second = refresh_per_second
        self._live: Any = None

    def _render(self) -> RenderableType:
        snap = self._read()
        return render_table(self.pipeline, snap, stage_lines(snap, self.meter))

    def start(self, snapshot: Callable[[], Snapshot]) -> None:
        from rich.live import Live

        self._snapshot = snapshot
        self._live = Live(console=self.console, get_renderable=self._render,
                          refresh_per_second=self.refresh_per_second, transient=False,
                          redirect_stdout=True, redirect_stderr=True)
        self._live.start()

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()  # one last refresh: the display ends on the final counts
            self._live = None


class LineProgress(_Reporter):
    """One plain line every ``interval_s`` seconds, and a final one."""

    def __init__(self, pipeline: str, stream: TextIO,
                 interval_s: float = DEFAULT_INTERVAL_S) -> None:
        super().__init__(pipeline)
        self.stream = stream
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _emit(self, final: bool = False) -> None:
        snap = self._read()
        if not snap:
            return
        line = format_line(self.pipeline, snap, stage_lines(snap, self.meter), final=final)
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError) as exc:
            # A closed pipe (| head) must not break the run.
            logger.debug("progress line not written: %r", exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._emit()

    def start(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mpipe-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self._emit(final=True)


def choose(pipeline: str, stream: TextIO, *, enabled: bool | None, quiet: bool,
           interval_s: float = DEFAULT_INTERVAL_S,
           ) -> LiveProgress | LineProgress | None:
    """The reporter for this command line and this stdout.

    ``enabled`` is ``--progress`` (True), ``--no-progress`` (False) or neither
    (None): a live display on a terminal, plain lines otherwise.
    """
    if quiet or enabled is False:
        return None
    if stream.isatty():
        from rich.console import Console

        return LiveProgress(pipeline, Console(file=stream))
    return LineProgress(pipeline, stream, interval_s)
