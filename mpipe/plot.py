"""``mpipe report REPORT.json --plot out.png``: the run as a timeline.

One row per worker (stage order, then worker number), one bar per finished
item from its start for its busy time.  Within a bar the IO part and the time
spent waiting for a cpu slot are shaded differently; a worker measures how
long each part took, not when, so both are drawn from the start of the bar.
White space between bars is idle time: waiting for input, or for room
downstream.  The start-up before the first item is shaded grey.

matplotlib is an optional dependency (``pip install 'mpipe[plot]'``), imported
only here and only when a plot is asked for.  The figure is drawn on the Agg
canvas directly, never through pyplot, so no GUI backend is ever touched.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpipe.errors import ConfigError, OutputError

logger = logging.getLogger(__name__)

COLORS = {"compute": "#4C72B0", "io": "#DD8452", "cpu_wait": "#C44E52", "startup": "#DDDDDD"}


@dataclass(frozen=True)
class PlotInfo:
    """What was drawn: for the caller, and for tests."""

    path: Path | None
    rows: list[str]  # y labels, top to bottom
    bars: int


def _serial(worker: str) -> tuple[str, int]:
    match = re.fullmatch(r"(.*)-(\d+)", worker)
    return (match.group(1), int(match.group(2))) if match else (worker, 0)


def worker_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(stage, worker) per row: every worker that finished an item, plus the
    configured ones that never did (an idle row says as much as a busy one)."""
    rows: list[tuple[str, str]] = []
    for stage, s in report.get("stages", {}).items():
        names = set(s.get("per_worker", {}))
        names.update(entry[0] for entry in s.get("timeline", []))
        names.update(f"{stage}-{i}" for i in range(1, int(s.get("workers") or 0) + 1))
        rows.extend((stage, n) for n in sorted(names, key=_serial))
    return rows


def _origin(report: dict[str, Any]) -> float:
    """Wall-clock time of the run's start (after prepare), else the first item's."""
    starts = [float(e[2]) for s in report.get("stages", {}).values()
              for e in s.get("timeline", [])]
    if "started_at_unix" in report:
        return float(report["started_at_unix"]) + float(report.get("prepare_s", 0.0))
    return min(starts) if starts else 0.0


def build_figure(report: dict[str, Any]) -> tuple[Any, PlotInfo]:
    """The timeline figure (a matplotlib ``Figure``) and what it shows."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise ConfigError("plotting needs matplotlib",
                          hint="pip install 'mpipe[plot]'") from None
    rows = worker_rows(report)
    origin = _origin(report)
    height = min(1.6 + 0.35 * max(len(rows), 1), 40.0)
    fig = Figure(figsize=(11, height), layout="constrained")
    ax = fig.add_subplot()
    index = {row: i for i, row in enumerate(rows)}
    bars = 0
    end = float(report.get("wall_s", 0.0))
    # A bar of a few microseconds would vanish: draw it at least this wide.
    least = 0.002 * max(end, 1e-3)
    for stage, s in report.get("stages", {}).items():
        per_row: dict[int, dict[str, list[tuple[float, float]]]] = {}
        for worker, _key, started, busy, io, cpu_wait in s.get("timeline", []):
            y = index[(stage, worker)]
            x = float(started) - origin
            io = min(float(io), float(busy))
            cpu_wait = min(float(cpu_wait), float(busy) - io)
            parts = per_row.setdefault(y, {"compute": [], "io": [], "cpu_wait": []})
            parts["compute"].append((x, max(float(busy), least)))
            if io > 0:
                parts["io"].append((x, io))
            if cpu_wait > 0:
                parts["cpu_wait"].append((x + io, cpu_wait))
            end = max(end, x + float(busy))
            bars += 1
        for y, parts in per_row.items():
            for kind, spans in parts.items():
                if spans:
                    ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=COLORS[kind],
                                   edgecolor="white", linewidth=0.3)
    startup = float(report.get("startup_s", 0.0))
    if startup > 0:
        ax.axvspan(0, startup, color=COLORS["startup"], zorder=0)
    for y in range(1, len(rows)):
        if rows[y][0] != rows[y - 1][0]:
            ax.axhline(y - 0.5, color="black", linewidth=0.6)
    labels = [worker for _stage, worker in rows]
    ax.set_yticks(range(len(rows)), labels)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first stage on top
    ax.set_xlim(0, max(end, 1e-3) * 1.02)
    ax.set_xlabel("seconds since the run started")
    ax.grid(axis="x", alpha=0.3)
    verdict = report.get("analysis", {}).get("bottleneck", {})
    done = report.get("counts", {}).get("committed", 0)
    title = (f"{report.get('pipeline', '?')}: {report.get('status', '?')} in "
             f"{float(report.get('wall_s', 0.0)):.1f}s, {done} items done")
    if verdict.get("stage"):
        title += f"; bottleneck: {verdict['stage']}"
    ax.set_title(title)
    fig.legend(handles=[Patch(color=COLORS["compute"], label="busy (compute)"),
                        Patch(color=COLORS["io"], label="IO"),
                        Patch(color=COLORS["cpu_wait"], label="waiting for a cpu slot"),
                        Patch(color=COLORS["startup"], label="start-up")],
               loc="outside lower center", ncols=4, fontsize="small", frameon=False)
    return fig, PlotInfo(path=None, rows=labels, bars=bars)


def plot_timeline(report: dict[str, Any], out: Path) -> PlotInfo:
    """Draw the timeline to ``out`` (the format follows the suffix: .png, .svg, .pdf)."""
    fig, info = build_figure(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise OutputError(f"cannot write the plot to {out}: {exc}") from None
    except ValueError as exc:  # an unknown format, from the suffix
        raise ConfigError(f"cannot write the plot to {out}: {exc}") from None
    logger.info("timeline of %d attempts on %d rows written to %s", info.bars, len(info.rows),
                out)
    return PlotInfo(path=out, rows=info.rows, bars=info.bars)
