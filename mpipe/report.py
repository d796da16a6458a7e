"""The run report: one JSON document per run, for people and for cron.

Written atomically (temporary file, then rename) to ``--report PATH`` if given
and always to ``<workdir>/.mpipe/<pipeline>/last-run.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mpipe.config import LoadedConfig
from mpipe.runner import RunResult
from mpipe.state import versions


def build(loaded: LoadedConfig, result: RunResult, exit_code: int, started_at: float
          ) -> dict[str, Any]:
    stages = {}
    for name, stats in result.stages.items():
        entry = asdict(stats)
        entry["workers"] = loaded.worker_count(name)
        stages[name] = entry
    return {
        "pipeline": loaded.config.pipeline,
        "config_path": str(loaded.path),
        "status": result.status,
        "exit_code": exit_code,
        "error": str(result.error) if result.error else None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
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
                "index": f.index,
                "stage": f.stage,
                "worker": f.worker,
                "kind": f.kind,
                "message": f.message,
                "traceback": f.traceback,
            }
            for f in result.failures
        ],
        "stages": stages,
        "results_path": result.results_path,
        "versions": versions(),
    }


def write(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.mpipe-tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def summary(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = [
        f"pipeline {report['pipeline']}: {report['status']} in {report['wall_s']:.2f}s "
        f"(start-up {report['startup_s']:.2f}s)",
        f"  items: {c['produced']} produced, {c['committed']} done, {c['skipped']} skipped "
        f"(already done), {c['failed']} failed"
        + (f", {c['not_started']} not finished" if c["not_started"] else ""),
    ]
    for name, s in report["stages"].items():
        lines.append(
            f"  stage {name}: {s['done']} done, {s['failed']} failed, {s['retries']} retries, "
            f"{s['workers']} workers, busy {s['busy_s']:.2f}s (io {s['io_s']:.2f}s, "
            f"waiting for cpu {s['cpu_wait_s']:.2f}s)"
        )
    for f in report["failures"][:10]:
        lines.append(f"  FAILED {f['key']} in {f['stage']} ({f['worker']}): {f['message']}")
    if len(report["failures"]) > 10:
        lines.append(f"  ... and {len(report['failures']) - 10} more failures in the report")
    if report["results_path"]:
        lines.append(f"  results: {report['results_path']}")
    return "\n".join(lines)
