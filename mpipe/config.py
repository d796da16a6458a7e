"""Reading, overriding and validating ``pipeline.yaml``.

Validation happens here, at the boundary, before any process starts: nothing
reaches the runner that pydantic has not accepted (now, or for the same input
before: :mod:`mpipe.validated`).  Errors name the file, the dotted key and the
YAML line ("stages.compute.workers: must be >= 1 (got 0), pipeline.yaml line 12").

The file is read with ``yaml.SafeLoader`` only: the default and Full loaders have
executed arbitrary code (CVE-2017-18342, CVE-2020-1747, CVE-2020-14343), so a
``!!python/object`` tag is a config error here.

The config's types are frozen standard dataclasses, and pydantic validates them
(:mod:`mpipe.validation`): the rules are written once, here, as annotations
pydantic reads (:class:`Rule`, :class:`Check`), yet the runner, its children
and Dask workers use the types without importing pydantic (loading
pipeline.yaml takes about 0.19 s with it, 0.065 s without, on the machine of
docs/BENCHMARKS.md).  ``mpipe run`` validates each distinct input once
(:mod:`mpipe.validated`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml

from mpipe.cores import usable_cores
from mpipe.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import GetCoreSchemaHandler
    from pydantic_core import CoreSchema

FROM_COMMAND_LINE = -1
FN_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


# Ten days: longer than any item should take, shorter than epoll's limit (24.8 days).
MAX_WAIT_S = 864_000.0

# Freed memory a stage worker keeps for its next items (mpipe.allocator).
DEFAULT_KEEP_FREED_MB = 256


class Rule:
    """Constraints on one field, as ``pydantic.Field`` takes them (``ge=1``).

    Read by pydantic only when it validates; pydantic is imported then, not
    when this module is.
    """

    def __init__(self, **constraints: Any) -> None:
        self.constraints = constraints

    def __get_pydantic_core_schema__(self, source: Any,
                                     handler: GetCoreSchemaHandler) -> CoreSchema:
        from pydantic import Field

        return handler(Annotated[source, Field(**self.constraints)])


class Check:
    """A function that checks (and returns) a field's value once pydantic has it."""

    def __init__(self, check: Callable[[Any], Any]) -> None:
        self.check = check

    def __get_pydantic_core_schema__(self, source: Any,
                                     handler: GetCoreSchemaHandler) -> CoreSchema:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self.check, handler(source))


# Unknown keys are errors: a misspelt "wokers: 8" must not be ignored.
_FORBID_UNKNOWN_KEYS = {"extra": "forbid"}
FnName = Annotated[str, Rule(pattern=FN_PATTERN)]


def _workers_positive(v: int | str) -> int | str:
    if isinstance(v, int) and v < 1:
        raise ValueError(f"must be >= 1 or 'auto' (got {v})")
    return v


def _keep_zero_or_enough(v: int) -> int:
    # Below 32 MiB (mpipe.allocator.MMAP_THRESHOLD_MAX, not imported: it loads
    # ctypes), blocks glibc's own settings keep on the heap would be mmapped.
    if 0 < v < 32:
        raise ValueError(f"must be 0 (glibc's own settings) or 32 to 2047 (got {v})")
    return v


def _stage_names(v: dict[str, StageConfig]) -> dict[str, StageConfig]:
    for name in v:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"stage name {name!r} must be letters, digits, '_' or '-'")
    return v


@dataclass(frozen=True)
class PrepareConfig:
    """A function run once before the pipeline (e.g. make missing inputs)."""

    __pydantic_config__ = _FORBID_UNKNOWN_KEYS
    fn: FnName


@dataclass(frozen=True)
class SourceConfig:
    __pydantic_config__ = _FORBID_UNKNOWN_KEYS
    fn: FnName
    # Bound of the producer -> first stage queue.  64 and 32 (stages), not
    # fewer: quick items travel in batches that these bounds cap, and each
    # message costs the same whatever it carries (docs/BENCHMARKS.md, "Per
    # item").  Memory: the items themselves, pickled.
    queue_size: Annotated[int, Rule(ge=1)] = 64


@dataclass(frozen=True)
class DaskConfig:
    """Where a ``dask`` stage runs: an existing scheduler, or a LocalCluster."""

    __pydantic_config__ = _FORBID_UNKNOWN_KEYS
    address: str | None = None  # tcp://host:8786 of a running scheduler
    local_workers: Annotated[int | None, Rule(ge=1)] = None  # start a LocalCluster of N
    threads_per_worker: Annotated[int, Rule(ge=1)] = 1


@dataclass(frozen=True)
class BackendConfig:
    __pydantic_config__ = _FORBID_UNKNOWN_KEYS
    dask: DaskConfig


@dataclass(frozen=True)
class StageConfig:
    __pydantic_config__ = _FORBID_UNKNOWN_KEYS
    fn: FnName
    backend: Literal["local", "dask"] | None = None  # default: the pipeline's backend
    workers: Annotated[int | Literal["auto"], Check(_workers_positive)] = "auto"
    queue_size: Annotated[int, Rule(ge=1)] = 32  # bound of this stage's input queue
    io_slots: Annotated[int | None, Rule(ge=1)] = None  # workers in file IO at once
    retries: Annotated[int, Rule(ge=0)] = 2
    # At most MAX_WAIT_S: the runner's wait (epoll) takes no longer timeout.
    timeout_s: Annotated[float | None, Rule(gt=0, le=MAX_WAIT_S)] = None
    # A fresh worker that has not imported its stage in this long is killed,
    # as a start-up crash; default: with timeout_s, max(30, timeout_s).
    # Local stages only (a Dask worker imports a stage at its first task).
    startup_timeout_s: Annotated[float | None, Rule(gt=0, le=MAX_WAIT_S)] = None


@dataclass(frozen=True)
class ConsumerConfig:
    __pydantic_config__ = _FORBID_UNKNOWN_KEYS
    fn: FnName


@dataclass(frozen=True)
class WriterConfig:
    __pydantic_config__ = _FORBID_UNKNOWN_KEYS
    path: str = "results.h5"
    # Writer processes; they take turns on the results file under the results lock.
    workers: Annotated[int, Rule(ge=1, le=8)] = 1
    queue_size: Annotated[int, Rule(ge=1)] = 64  # finished items in flight to the writer
    lock_timeout_s: Annotated[float, Rule(gt=0)] = 60.0


@dataclass(frozen=True)
class PipelineConfig:
    __pydantic_config__ = _FORBID_UNKNOWN_KEYS
    pipeline: Annotated[str, Rule(pattern=r"^[A-Za-z0-9_.-]+$")]
    source: SourceConfig
    stages: Annotated[dict[str, StageConfig], Rule(min_length=1), Check(_stage_names)]
    workdir: str = "."
    params: dict[str, Any] = field(default_factory=dict)
    prepare: PrepareConfig | None = None
    consumer: ConsumerConfig | None = None
    writer: WriterConfig = field(default_factory=WriterConfig)
    # Workers computing at once (until the last wave); default (None, "auto"): the cores.
    cpu_slots: Annotated[int | Literal["auto"] | None, Check(_workers_positive)] = None
    # Freed memory each stage worker keeps for its next items (mpipe.allocator);
    # 0: the C library's own settings.  mallopt takes a C int: at most 2047 MiB.
    keep_freed_memory_mb: Annotated[int, Rule(ge=0, le=2047),
                                    Check(_keep_zero_or_enough)] = DEFAULT_KEEP_FREED_MB
    fsync: bool = True
    shutdown_grace_s: Annotated[float, Rule(ge=0, le=MAX_WAIT_S)] = 30.0
    allowed_modules: list[str] = field(default_factory=lambda: ["mpipe.workloads"])
    allow_outside_workdir: bool = False
    output_dirs: list[str] = field(default_factory=list)
    backend: Literal["local"] | BackendConfig = "local"

    def __post_init__(self) -> None:
        # Rules across keys.  pydantic reports a ValueError raised here as a
        # validation error of the whole file.
        for name, stage in self.stages.items():
            if stage.backend == "dask" and not isinstance(self.backend, BackendConfig):
                raise ValueError(
                    f"stages.{name}.backend is dask, but there is no top-level "
                    "backend: {dask: {address: ...}} or {dask: {local_workers: N}}")
        if isinstance(self.backend, BackendConfig):
            d = self.backend.dask
            if (d.address is None) == (d.local_workers is None):
                raise ValueError("backend.dask needs exactly one of address or local_workers")


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config plus where it came from."""

    config: PipelineConfig
    path: Path
    raw: dict[str, Any]
    lines: dict[str, int]
    # Each stage function's code digest by config key, once the functions were
    # imported and checked (mpipe.cli, mpipe.imports.check_names, mpipe.codedigest).
    code: Mapping[str, str] = field(default_factory=dict)

    def where(self, key: str) -> str:
        """", pipeline.yaml line 12" for a dotted key (or its nearest parent)."""
        return locate(self.path, self.lines, key)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def workdir(self) -> Path:
        return (self.base_dir / self.config.workdir).resolve()

    def worker_count(self, stage: str) -> int:
        workers = self.config.stages[stage].workers
        return usable_cores() if workers == "auto" else workers

    def stage_backend(self, stage: str) -> str:
        """"local" or "dask" for one stage."""
        chosen = self.config.stages[stage].backend
        if chosen is not None:
            return chosen
        return "local" if self.config.backend == "local" else "dask"

    def cpu_slot_count(self) -> int:
        slots = self.config.cpu_slots
        return usable_cores() if slots in (None, "auto") else int(slots)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: Sequence[str] = (), *,
                remembered: bool = False) -> LoadedConfig:
    """Read, interpolate, override and validate a pipeline file.

    With ``remembered``, an input that validated before, with this mpipe and
    this pydantic, is taken without validating it again (:mod:`mpipe.validated`).
    Raises :class:`ConfigError` naming the file, key and line on any problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    lines, raw = _parse_yaml(text, path)
    if raw is None:
        raise ConfigError(f"{path}: the file is empty",
                          hint="start from the repository's pipeline.yaml")
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {kind}")
    raw = _interpolate_env(raw, path, lines)
    for item in overrides:
        for key in _apply_override(raw, item):
            lines[key] = FROM_COMMAND_LINE
    if remembered:
        from mpipe import validated

        config = validated.validate_once(raw, path, lines)
    else:
        from mpipe import validation

        config = validation.validate(raw, path, lines)
    return LoadedConfig(config=config, path=path.resolve(), raw=raw, lines=lines)


def _parse_yaml(text: str, path: Path) -> tuple[dict[str, int], Any]:
    """Return (dotted key -> line number, data), via the safe loader only."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or str(exc)
        hint = ""
        if "python/" in problem or "constructor" in problem:
            hint = " (mpipe reads YAML with the safe loader: Python tags are not allowed)"
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}{hint}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    lines: dict[str, int] = {}
    if node is not None:
        _record_lines(node, "", lines, path)
    return lines, data


def _record_lines(node: yaml.Node, prefix: str, lines: dict[str, int], path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in lines:
                # PyYAML keeps the last of two equal keys without a word: a
                # second "workers:" would silently win.
                raise ConfigError(f"{key}: duplicate key, {path.name} line {line} "
                                  f"(first at line {lines[key]})")
            lines[key] = line
            _record_lines(value_node, key, lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            key = f"{prefix}.{i}"
            lines[key] = child.start_mark.line + 1
            _record_lines(child, key, lines, path)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate_env(value: Any, path: Path, lines: Mapping[str, int], key: str = "") -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in string values."""
    if isinstance(value, dict):
        return {k: _interpolate_env(v, path, lines, f"{key}.{k}" if key else str(k))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate_env(v, path, lines, f"{key}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def expand(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(
            f"{key}: environment variable ${{{name}}} is not set{locate(path, lines, key)}",
            hint=f"export {name}=... or write ${{{name}:-default}}",
        )

    return _ENV_REF.sub(expand, value)


def _apply_override(raw: dict[str, Any], item: str) -> list[str]:
    """Apply one ``--set dotted.key=value``; the value is parsed as YAML.

    Returns the dotted keys it wrote: the key, and every mapping it had to
    create on the way (``stages.comput`` of a mistyped stage name), so that
    an error about them points at the command line, not at the file.
    """
    if "=" not in item:
        raise ConfigError(
            f"--set {item!r}: expected KEY=VALUE, e.g. --set stages.compute.workers=2")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key segment in {dotted!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from None
    target: dict[str, Any] = raw
    written = []
    for depth, part in enumerate(parts[:-1], start=1):
        child = target.get(part)
        if child is None:
            child = {}
            target[part] = child
            written.append(".".join(parts[:depth]))
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a mapping, cannot set a key in it")
        target = child
    target[parts[-1]] = value
    return [*written, ".".join(parts)]


def locate(path: Path, lines: Mapping[str, int], key: str) -> str:
    # Walk up the dotted key: an unknown key deep inside a mapping still points
    # at the nearest line the user wrote.
    parts = key.split(".")
    while parts:
        line = lines.get(".".join(parts))
        if line == FROM_COMMAND_LINE:
            return " (from --set)"
        if line is not None:
            return f", {path.name} line {line}"
        parts.pop()
    return f", {path.name}"  # a key the file lacks: no line to point at
