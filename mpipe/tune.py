"""``mpipe tune CONFIG``: measure a short sample with several worker counts.

Each trial is a real ``mpipe run --limit N --fresh`` in a subprocess, so it
measures exactly what a run does (start-up, queues, the writer), and a crash
in a trial cannot take the tuner with it.  Trials run in a scratch workdir,
``<workdir>/.mpipe/tune/<pipeline>/``, whose top-level entries are symlinks to
the real workdir's, except the output directories, the results file and
``.mpipe``: inputs are shared, while the declared outputs (``output_dirs``),
results and the ledger of the real workdir are never touched.  A stage that
writes anywhere else writes through those symlinks into the real workdir:
the tuner says so when ``output_dirs`` is empty.  The tuner holds the real workdir's run lock
meanwhile, so no real run competes for the cores it measures.

Stages are tuned one at a time, in order (coordinate descent): each stage tries
every candidate count while the stages before it keep the count chosen for
them and the stages after it keep their configured count.  The recommendation
is the smallest count within :data:`TOLERANCE` of the best items/s: a worker
that does not make the run faster only costs memory.

Items/s is measured between the first item's start and the last item's end
(from the trial's report), so the start-up of the processes, the same for every
count, does not flatten the differences.  CPU % is the CPU time of the trial's
whole process tree (sampled from ``/proc``) over its wall time and the cores.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpipe import analysis
from mpipe.config import LoadedConfig
from mpipe.cores import usable_cores
from mpipe.errors import ConfigError, OutputError, PipelineBrokenError
from mpipe.outputs import unlink_durably
from mpipe.runlock import RunLock
from mpipe.state import RunPaths

logger = logging.getLogger(__name__)

# Counts within this share of the best rate are as good as the best.
TOLERANCE = 0.05
SAMPLE_PERIOD_S = 0.2


@dataclass(frozen=True)
class Trial:
    stage: str  # the stage being tuned
    workers: dict[str, int]  # every stage's count in this trial
    items: int
    items_per_s: float
    cpu_pct: float
    wall_s: float
    exit_code: int
    bottleneck: str | None
    reused: bool = False  # the same counts were measured for an earlier stage


@dataclass
class TuneResult:
    trials: list[Trial] = field(default_factory=list)
    recommended: dict[str, int] = field(default_factory=dict)
    current: dict[str, int] = field(default_factory=dict)
    limit: int = 0
    cores: int = 1


def default_candidates(cores: int, *, fsync: bool = False) -> list[int]:
    """1, the cores and twice them; with fsync also as many per core as the run
    summary advises for a stage waiting on its outputs' fsyncs (3: a waiting
    worker leaves its core to another; docs/BENCHMARKS.md, "Durable outputs")."""
    extra = [analysis.WORKERS_PER_CPU_SLOT_FOR_COMMITS * cores] if fsync else []
    return sorted({1, cores, 2 * cores, *extra})


def default_limit(candidates: Sequence[int]) -> int:
    # Enough items for the largest count to have every worker busy twice.
    return max(8, 2 * max(candidates))


def scratch_dir(paths: RunPaths, pipeline: str) -> Path:
    return paths.workdir / ".mpipe" / "tune" / pipeline


def _kept_out(loaded: LoadedConfig, paths: RunPaths) -> set[Path]:
    """Workdir-relative paths the trials must not share with the real workdir."""
    kept = {Path(".mpipe")}
    named = [("writer.path", paths.results), *(
        (f"output_dirs.{i}", d) for i, d in enumerate(paths.output_dirs))]
    for key, path in named:
        try:
            kept.add(path.relative_to(paths.workdir))
        except ValueError:
            raise ConfigError(
                f"{key} ({path}) is outside the workdir {paths.workdir}: tune cannot keep the "
                "sample runs from writing there",
                hint="tune a copy of the config whose outputs are inside its workdir") from None
    return kept


def mirror(real: Path, scratch: Path, kept_out: set[Path]) -> None:
    """Symlink ``real``'s entries into ``scratch``, except ``kept_out`` (relative
    paths); a directory above a kept-out path is made, and mirrored one level down."""
    def walk(rel: Path) -> None:
        (scratch / rel).mkdir(parents=True, exist_ok=True)
        src = real / rel
        if not src.is_dir():
            return
        for entry in sorted(src.iterdir()):
            child = rel / entry.name
            if child in kept_out:
                continue
            if any(child in k.parents for k in kept_out):
                if entry.is_dir() and not entry.is_symlink():
                    walk(child)
                continue
            (scratch / child).symlink_to(entry)
    walk(Path("."))
    for k in kept_out:
        # Where outputs and results go must exist in the scratch as a real directory.
        if k != Path(".mpipe"):
            (scratch / k).parent.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------ measuring


def _proc_stat(pid: int) -> tuple[int, int, float] | None:
    """(ppid, starttime, cpu seconds) from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(")") + 2:].split()
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / ticks
    except (IndexError, ValueError):
        return None


class TreeCpu:
    """CPU seconds of a process and all its descendants, sampled periodically.

    A process that exits between two samples loses at most one period of CPU
    time; the workers live for the whole trial, so that is small.
    """

    def __init__(self, root: int, period_s: float = SAMPLE_PERIOD_S) -> None:
        self.root = root
        self.period_s = period_s
        self._seen: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tune-cpu", daemon=True)

    def sample(self) -> None:
        stats: dict[int, tuple[int, int, float]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                st = _proc_stat(int(entry.name))
                if st is not None:
                    stats[int(entry.name)] = st
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        todo = [self.root]
        while todo:
            pid = todo.pop()
            if pid in stats:
                _, start, cpu = stats[pid]
                key = (pid, start)
                self._seen[key] = max(self._seen.get(key, 0.0), cpu)
            todo.extend(children.get(pid, []))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def __enter__(self) -> TreeCpu:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    @property
    def cpu_s(self) -> float:
        return sum(self._seen.values())


def measured_rate(report: dict[str, Any]) -> tuple[int, float]:
    """(items through the last stage, items/s between first start and last end)."""
    stages = list(report.get("stages", {}).values())
    items = int(stages[-1].get("done", 0)) if stages else 0
    span = analysis.timeline_span(report)
    if span is None or items == 0:
        return items, 0.0
    return items, items / max(span[1] - span[0], 1e-6)


# ------------------------------------------------------------------ the trials


class Tuner:
    def __init__(self, loaded: LoadedConfig, overrides: Sequence[str], *,
                 candidates: Sequence[int] | None = None, limit: int | None = None,
                 timeout_s: float = 600.0, log_level: str = "WARNING",
                 on_trial: Callable[[Trial], None] | None = None) -> None:
        self.loaded = loaded
        self.overrides = list(overrides)
        self.cores = usable_cores()
        self.candidates = sorted(set(candidates or default_candidates(
            self.cores, fsync=loaded.config.fsync)))
        if not self.candidates or min(self.candidates) < 1:
            raise ConfigError(f"worker counts to try must be >= 1 (got {self.candidates})")
        self.limit = limit or default_limit(self.candidates)
        self.timeout_s = timeout_s
        self.log_level = log_level
        self.on_trial = on_trial
        self.paths = RunPaths.for_config(loaded)
        self.scratch = scratch_dir(self.paths, loaded.config.pipeline)
        self._cache: dict[tuple[int, ...], Trial] = {}
        self._serial = 0

    def run(self, keep: bool = False) -> TuneResult:
        stages = list(self.loaded.config.stages)
        current = {name: self.loaded.worker_count(name) for name in stages}
        result = TuneResult(current=dict(current), limit=self.limit, cores=self.cores)
        kept_out = _kept_out(self.loaded, self.paths)
        if not self.paths.output_dirs:
            logger.warning(
                "output_dirs is empty: files the stages write in the sample runs go into the "
                "real workdir %s (only output_dirs, writer.path and .mpipe are the sample's "
                "own); declare the stages' output directories in output_dirs",
                self.paths.workdir)
        lock = RunLock(self.paths.lock)
        lock.acquire()
        try:
            # Sample runs write what is not their own through the scratch's
            # links into this workdir, and one killed there may leave a
            # temporary: the next real run looks for it (Runner._remove_leftovers).
            unlink_durably(self.paths.clean_exit, fsync=self.loaded.config.fsync)
            shutil.rmtree(self.scratch, ignore_errors=True)
            mirror(self.paths.workdir, self.scratch, kept_out)
            chosen = dict(current)
            for name in stages:
                trials = []
                for n in self.candidates:
                    counts = {**chosen, name: n}
                    trial = self._trial(name, counts)
                    trials.append(trial)
                    result.trials.append(trial)
                chosen[name] = recommend(trials, name)
            result.recommended = chosen
        finally:
            lock.release()
            if not keep:
                shutil.rmtree(self.scratch, ignore_errors=True)
                try:
                    self.scratch.parent.rmdir()  # .mpipe/tune, if no other pipeline's
                except OSError:
                    pass
        return result

    def _trial(self, stage: str, counts: dict[str, int]) -> Trial:
        key = tuple(counts.values())
        if key in self._cache:
            cached = self._cache[key]
            trial = Trial(stage, dict(counts), cached.items, cached.items_per_s, cached.cpu_pct,
                          cached.wall_s, cached.exit_code, cached.bottleneck, reused=True)
        else:
            trial = self._measure(stage, counts)
            self._cache[key] = trial
        if self.on_trial is not None:
            self.on_trial(trial)
        return trial

    def _measure(self, stage: str, counts: dict[str, int]) -> Trial:
        self._serial += 1
        report_path = self.scratch / ".mpipe" / f"trial-{self._serial}.json"
        sets = [*self.overrides,
                # JSON strings are YAML strings: any path survives --set's YAML parsing.
                f"workdir={json.dumps(str(self.scratch))}",
                "allow_outside_workdir=true",
                *(f"stages.{n}.workers={w}" for n, w in counts.items())]
        cmd = [sys.executable, "-m", "mpipe", "run", str(self.loaded.path),
               *(arg for s in sets for arg in ("--set", s)),
               "--fresh", "--limit", str(self.limit), "--no-progress", "--quiet",
               "--report", str(report_path), "--log-level", self.log_level]
        logger.info("tune trial: %s", " ".join(cmd))
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            with TreeCpu(proc.pid) as cpu:
                _, stderr = proc.communicate(timeout=self.timeout_s)
        except BaseException:
            # SIGKILL: the trial's children follow it through their lifeline.
            proc.kill()
            proc.wait()
            raise
        wall = time.monotonic() - started
        described = ", ".join(f"{n}={w}" for n, w in counts.items())
        if proc.returncode not in (0, 1) or not report_path.exists():
            tail = "\n".join(stderr.strip().splitlines()[-15:])
            raise PipelineBrokenError(
                f"the sample run with workers {described} exited with {proc.returncode}:\n{tail}",
                hint="run it by hand: mpipe run CONFIG --limit N --set stages.<name>.workers=K")
        report = json.loads(report_path.read_text(encoding="utf-8"))
        if proc.returncode == 1:
            logger.warning("sample run with %s: %d item(s) failed; its rate counts only the "
                           "others", described, report["counts"]["failed"])
        items, rate = measured_rate(report)
        verdict = report.get("analysis", {}).get("bottleneck", {}).get("stage")
        return Trial(stage=stage, workers=dict(counts), items=items, items_per_s=rate,
                     cpu_pct=100.0 * cpu.cpu_s / max(wall * self.cores, 1e-6), wall_s=wall,
                     exit_code=proc.returncode, bottleneck=verdict)


def recommend(trials: Sequence[Trial], stage: str) -> int:
    """The smallest count of ``stage`` within TOLERANCE of the best rate."""
    best = max(t.items_per_s for t in trials)
    if best <= 0:
        return min(t.workers[stage] for t in trials)
    good = [t.workers[stage] for t in trials if t.items_per_s >= (1 - TOLERANCE) * best]
    return min(good)


# ------------------------------------------------------------------ --write


def write_workers(path: Path, counts: dict[str, int]) -> list[str]:
    """Set ``stages.<name>.workers`` in the YAML file, keeping comments and layout.

    ruamel.yaml's round-trip loader says where each existing value is; the new
    count replaces exactly that token in the text, so every other byte of the
    file stays as the user wrote it.  Only a stage without a ``workers`` key
    needs the document re-emitted (by ruamel, comments kept).  The result is
    read back and checked before it replaces the file, atomically.
    """
    try:
        from ruamel.yaml import YAML
        from ruamel.yaml.util import load_yaml_guess_indent
    except ImportError:
        raise ConfigError("tune --write needs ruamel.yaml to keep the file's comments",
                          hint="pip install 'mpipe[tune]'") from None
    text = path.read_text(encoding="utf-8")
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap the user's long lines
    data = yaml.load(text)
    stages: Any = data.get("stages") if hasattr(data, "get") else None
    if stages is None or not hasattr(stages, "get"):
        raise ConfigError(f"{path}: no stages mapping to write worker counts into")
    changed: list[str] = []
    splices: list[tuple[int, int, int]] = []  # (line, column, count)
    missing = False
    for name, n in counts.items():
        stage: Any = stages.get(name)
        if stage is None or not hasattr(stage, "get"):
            raise ConfigError(f"{path}: no stage {name!r} (was it added by --set?)")
        old = stage.get("workers")
        if old == n:
            continue
        if isinstance(old, str) and "${" in old:
            logger.warning("stages.%s.workers was %r: replaced by %d", name, old, n)
        changed.append(f"stages.{name}.workers")
        if "workers" in stage:
            line, column = stage.lc.value("workers")
            splices.append((line, column, n))
        else:
            stage["workers"] = n
            missing = True
    if not changed:
        return changed
    if missing:
        for name, n in counts.items():
            stages[name]["workers"] = n
        _, indent, block_seq_indent = load_yaml_guess_indent(text)
        yaml.indent(mapping=indent or 2, sequence=indent or 2, offset=block_seq_indent or 0)
        out = io.StringIO()
        yaml.dump(data, out)
        new_text = out.getvalue()
    else:
        new_text = _splice(text, splices)
    check = YAML(typ="safe").load(new_text)
    for name, n in counts.items():
        if check["stages"][name].get("workers") != n:
            raise ConfigError(f"{path}: could not set stages.{name}.workers safely; "
                              f"set it to {n} by hand")
    tmp = path.with_name(f".{path.name}.mpipe-tune-{os.getpid()}")
    try:
        tmp.write_text(new_text, encoding="utf-8")
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    return changed


def _splice(text: str, splices: list[tuple[int, int, int]]) -> str:
    """Replace the scalar starting at each (line, column) by a count."""
    lines = text.splitlines(keepends=True)
    for line, column, n in splices:
        row = lines[line]
        rest = row[column:]
        if rest[:1] in ("'", '"'):
            end = column + 1 + rest[1:].index(rest[0]) + 1
        else:
            match = re.match(r"[^,}\]#\r\n]*", rest)
            token = match.group(0).rstrip() if match else ""
            end = column + len(token)
        lines[line] = row[:column] + str(n) + row[end:]
    return "".join(lines)
