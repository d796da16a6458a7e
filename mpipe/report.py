"""The run report: one JSON document per run, for people and for cron.

Written atomically (temporary file, then rename) to ``--report PATH`` if given
and always to ``<workdir>/.mpipe/<pipeline>/last-run.json``.  It holds the
counts, every failure with its traceback, each stage's accounting (busy, IO,
cpu wait, output commits, starved, blocked, per worker) with its timeline of finished items
(``[worker, key, started_at, busy_s, io_s, cpu_wait_s]``, wall clock), and
under ``analysis`` the shares and the bottleneck verdict of
:mod:`mpipe.analysis`.  ``mpipe report REPORT.json`` prints its summary again,
``--plot out.png`` draws the timeline (:mod:`mpipe.plot`).
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpipe import analysis
from mpipe.config import LoadedConfig
from mpipe.cores import usable_cores
from mpipe.errors import ConfigError
from mpipe.outputs import output_error
from mpipe.runner import RunResult
from mpipe.state import installed_version, versions

if TYPE_CHECKING:
    from rich.console import Group


def build(loaded: LoadedConfig, result: RunResult, exit_code: int, started_at: float,
          prepare_s: float = 0.0) -> dict[str, Any]:
    """The report of one run; ``started_at`` is the wall clock when the command began."""
    stages = {}
    for name, stats in result.stages.items():
        entry = stats.as_json()
        entry["workers"] = stats.workers or loaded.worker_count(name)
        entry["io_slots"] = loaded.config.stages[name].io_slots or entry["workers"]
        entry["queue_size"] = loaded.config.stages[name].queue_size
        entry["backend"] = loaded.stage_backend(name)
        stages[name] = entry
    doc: dict[str, Any] = {
        "pipeline": loaded.config.pipeline,
        "config_path": str(loaded.path),
        "status": result.status,
        "exit_code": exit_code,
        "error": str(result.error) if result.error else None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
        "started_at_unix": started_at,
        "prepare_s": round(prepare_s, 4),
        "wall_s": round(result.wall_s, 4),
        "startup_s": round(result.startup_s, 4),
        "counts": {
            "produced": result.produced,
            "committed": result.committed,
            "skipped": result.skipped,
            "failed": result.failed,
            "not_started": result.not_started,
        },
        "failures": [
            {
                "key": f.key,
                "index": f.seq,
                "stage": f.stage,
                "worker": f.worker,
                "kind": f.kind,
                "message": f.message,
                "traceback": f.traceback,
            }
            for f in result.failures
        ],
        "cores": usable_cores(),
        "cpu_slots": loaded.cpu_slot_count(),
        "fsync": loaded.config.fsync,
        "stages": stages,
        "results_path": result.results_path,
        "versions": {**versions(),
                     **(result.versions or {"numpy": installed_version("numpy")})},
    }
    loop_started_at = getattr(result, "loop_started_at", None)
    if loop_started_at:
        doc["loop_started_at"] = loop_started_at
    # The same verdict the summary prints, for cron jobs and dashboards.
    doc["analysis"] = analysis.analyse(doc)
    return doc


def write(report: dict[str, Any], path: Path) -> None:
    """Write the report whole (a temporary file renamed), or raise :class:`OutputError`."""
    tmp = path.with_name(f"{path.name}.mpipe-tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not indented: json's C encoder runs only without indent, and a
        # 10,000-item timeline took 0.35 s with it (`jq .` pretty-prints).
        tmp.write_text(json.dumps(report) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise output_error(exc, path, "write the report") from None


def read(path: Path) -> dict[str, Any]:
    """A run report written by :func:`write` (``mpipe report``)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read report {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not a run report (invalid JSON: {exc})") from None
    if not isinstance(doc, dict) or "stages" not in doc or "counts" not in doc:
        raise ConfigError(f"{path} is not an mpipe run report (no stages or counts)",
                          hint="mpipe writes one to <workdir>/.mpipe/<pipeline>/last-run.json")
    return doc


def _seconds(value: float, share: float | None = None) -> str:
    text = f"{value:.2f}s"
    return f"{text} ({share:.0f}%)" if share is not None else text


# rich's SIMPLE_HEAD drawn with '-': logs and mail stay plain ASCII.
ASCII_HEAD = "    \n    \n -- \n    \n    \n    \n    \n    \n"


def render_summary(report: dict[str, Any], *, ascii_only: bool = False) -> Group:
    # rich only here: a --quiet run writes its report without it.
    from rich import box
    from rich.console import Group, RenderableType
    from rich.table import Table
    from rich.text import Text

    """The end-of-run summary: counts, a table per stage, the bottleneck, failures."""
    c = report["counts"]
    head = Text.assemble(
        (f"pipeline {report['pipeline']}: ", "bold"),
        (str(report["status"]), "bold green" if report["status"] == "complete" else "bold red"),
        f" in {report['wall_s']:.2f}s (start-up {report['startup_s']:.2f}s)",
    )
    items = (f"items: {c['produced']} produced, {c['committed']} done, {c['skipped']} skipped "
             f"(already done), {c['failed']} failed"
             + (f", {c['not_started']} not finished" if c["not_started"] else ""))
    metrics = analysis.stage_metrics(report)
    head_box = box.Box(ASCII_HEAD, ascii=True) if ascii_only else box.SIMPLE_HEAD
    table = Table(box=head_box, pad_edge=False, show_edge=False)
    table.add_column("stage", style="bold")
    for column in ("workers", "items", "failed", "retries", "busy"):
        table.add_column(column, justify="right")
    table.add_column("waiting for input", justify="right")
    table.add_column("blocked on output", justify="right")
    table.add_column("IO", justify="right")
    table.add_column("compute", justify="right")
    for name, m in metrics.items():
        compute = m["compute_s"]
        if m["cpu_wait_s"] >= 0.005:
            compute_text = f"{compute:.2f}s (+{m['cpu_wait_s']:.2f}s cpu wait)"
        else:
            compute_text = f"{compute:.2f}s"
        table.add_row(
            name, str(m["workers"]), str(m["items"]), str(m["failed"]), str(m["retries"]),
            f"{m['busy_pct']:.0f}%",
            _seconds(m["starved_s"], m["starved_pct"]),
            _seconds(m["blocked_s"], m["blocked_pct"]),
            _seconds(m["io_s"], m["io_pct_of_busy"]),
            compute_text,
        )
    parts: list[RenderableType] = [head, Text("  " + items), table]
    verdict = analysis.bottleneck(report, metrics)
    if verdict["stage"] is not None:
        parts.append(Text.assemble(("bottleneck: ", "bold"), (str(verdict["stage"]), "bold yellow"),
                                   f" - {verdict['message']}"))
    else:
        parts.append(Text.assemble(("bottleneck: ", "bold"), f"none found - {verdict['message']}"))
    if verdict.get("advice"):
        parts.append(Text.assemble(("  try: ", "bold"), verdict["advice"]))
    for note in verdict.get("notes", []):
        parts.append(Text(f"  note: {note}"))
    failures = report.get("failures", [])
    for f in failures[:10]:
        parts.append(Text(f"  FAILED {f['key']} in {f['stage']} ({f['worker']}): {f['message']}",
                          style="red"))
    if len(failures) > 10:
        parts.append(Text(f"  ... and {len(failures) - 10} more failures in the report"))
    if report.get("results_path"):
        parts.append(Text(f"  results: {report['results_path']}"))
    return Group(*parts)


def summary(report: dict[str, Any], width: int = 120) -> str:
    """The summary as plain text (no colour, no control characters)."""
    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(render_summary(report, ascii_only=True))
    return console.export_text()
