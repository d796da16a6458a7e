"""Where a run keeps its state, and what identifies its work.

Layout under the workdir::

    <workdir>/.mpipe/lock                       one run at a time (flock)
    <workdir>/.mpipe/clean-exit                 the last run left no temporary file
                                                (holds when the workdir was last walked)
    <workdir>/.mpipe/<pipeline>/ledger.sqlite   committed items (resume)
    <workdir>/.mpipe/<pipeline>/last-run.json   the latest run report
    <workdir>/<writer.path>                     results.h5, replaced whole
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpipe import __version__
from mpipe.config import LoadedConfig, PipelineConfig
from mpipe.context import PathEscapeError, resolve_inside
from mpipe.errors import ConfigError
from mpipe.outputs import TMP_MARK

if TYPE_CHECKING:
    from mpipe.runner import RunResult


@dataclass(frozen=True)
class RunPaths:
    workdir: Path
    lock: Path
    clean_exit: Path
    state_dir: Path
    ledger: Path
    results: Path
    results_tmp: Path
    default_report: Path
    output_dirs: tuple[Path, ...]

    @classmethod
    def for_config(cls, loaded: LoadedConfig) -> RunPaths:
        cfg = loaded.config
        workdir = loaded.workdir
        state = workdir / ".mpipe" / cfg.pipeline

        def inside(key: str, value: str) -> Path:
            try:
                return resolve_inside(workdir, value, allow_outside=cfg.allow_outside_workdir)
            except PathEscapeError as exc:
                raise ConfigError(f"{key}: {exc}{loaded.where(key)}") from None

        results = inside("writer.path", cfg.writer.path)
        if results.is_relative_to((workdir / ".mpipe").resolve()):
            # mpipe's own: the state directory is cleaned and locked by runs.
            raise ConfigError(
                f"writer.path: {results} is inside mpipe's state directory "
                f"{workdir / '.mpipe'}{loaded.where('writer.path')}",
                hint="put the results file elsewhere in the workdir, e.g. results.h5")
        if results.is_dir():
            # Found now, not when the run is over and its results are renamed there.
            raise ConfigError(
                f"writer.path: {results} is a directory{loaded.where('writer.path')}",
                hint="name the results file, e.g. writer.path: results.h5")
        return cls(
            workdir=workdir,
            lock=workdir / ".mpipe" / "lock",
            clean_exit=workdir / ".mpipe" / "clean-exit",
            state_dir=state,
            ledger=state / "ledger.sqlite",
            results=results,
            results_tmp=results.with_name(f"{results.name}{TMP_MARK}{os.getpid()}"),
            default_report=state / "last-run.json",
            output_dirs=tuple(
                inside(f"output_dirs.{i}", d) for i, d in enumerate(cfg.output_dirs)
            ),
        )


def config_fingerprint(cfg: PipelineConfig, code: Mapping[str, str]) -> str:
    """What makes an item's result what it is: params, stage functions and their code.

    ``code`` is :func:`mpipe.imports.check_names`'s answer (each stage's code
    digest, :mod:`mpipe.codedigest`, by config key).  Worker counts, queue
    sizes and the like are left out: changing them must not redo finished work.
    """
    identity = {
        "pipeline": cfg.pipeline,
        "params": cfg.params,
        "source": cfg.source.fn,
        "stages": [[name, stage.fn] for name, stage in cfg.stages.items()],
        "code": {key: digest for key, digest in code.items() if key.startswith("stages.")},
    }
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def versions() -> dict[str, str]:
    """mpipe's, Python's and the platform's.

    The libraries' (numpy, h5py, HDF5) come from the sealer, which loads them
    (:class:`mpipe.messages.Sealed`); the runner never imports numpy.
    """
    return {
        "mpipe": __version__,
        "python": sys.version.split()[0],
        "platform": _platform(),
    }


def installed_version(package: str) -> str:
    """For a run that never sealed its results: what the environment holds."""
    import importlib.metadata  # 20 ms: only on this path

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _platform() -> str:
    # Not platform.platform(): on Linux it runs `uname -p` in a subprocess
    # (5-10 ms at the end of each run).
    u = os.uname()
    parts = [u.sysname, u.release, u.machine]
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (ValueError, OSError):  # not glibc: unknown name, or EINVAL on musl
        libc = None
    return "-".join(parts + ([libc.replace(" ", "")] if libc else []))


def _as_json(value: Any) -> Any:
    """What YAML can hold, as strict JSON can: as pydantic's JSON mode wrote it.

    Dates and times in ISO 8601, sets as lists, bytes as text, NaN and the
    infinities as null (JSON has none; jq and the like reject them).
    """
    if isinstance(value, dict):
        return {str(k): _as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [_as_json(v) for v in sorted(value, key=repr)]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if value is None or isinstance(value, (str, int, float)):
        return value
    return str(value)


def run_metadata(loaded: LoadedConfig, result: RunResult) -> dict[str, Any]:
    return {
        "pipeline": loaded.config.pipeline,
        "config": _as_json(dataclasses.asdict(loaded.config)),
        "config_path": str(loaded.path),
        "versions": versions(),
        "counts": {
            "produced": result.produced,
            "committed": result.committed,
            "skipped": result.skipped,
            "failed": result.failed,
        },
        "status": "complete" if not result.failed else "items_failed",
        "timings": {
            "startup_s": round(result.startup_s, 4),
            # The file is sealed as the run ends: this is the run's wall time
            # up to the seal, which is all of it but the last few milliseconds.
            "wall_s": round(result.wall_s, 4),
            "stages": {
                name: {"busy_s": round(stats.busy_s, 4), "io_s": round(stats.io_s, 4),
                       "output_commit_s": round(stats.output_commit_s, 4),
                       "cpu_wait_s": round(stats.cpu_wait_s, 4), "done": stats.done}
                for name, stats in result.stages.items()
            },
        },
    }
