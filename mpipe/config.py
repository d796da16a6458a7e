"""Reading, overriding and validating ``pipeline.yaml``.

Validation happens here, at the boundary, before any process starts: nothing
unvalidated reaches the runner.  Errors name the file, the dotted key and the
YAML line ("stages.compute.workers: must be >= 1 (got 0), pipeline.yaml line 12").

The file is read with ``yaml.SafeLoader`` only: the default and Full loaders have
executed arbitrary code (CVE-2017-18342, CVE-2020-1747, CVE-2020-14343), so a
``!!python/object`` tag is a config error here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mpipe.errors import ConfigError

FROM_COMMAND_LINE = -1
FN_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class _Strict(BaseModel):
    # Unknown keys are errors: a misspelt "wokers: 8" must not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrepareConfig(_Strict):
    """A function run once before the pipeline (e.g. make missing inputs)."""

    fn: str = Field(pattern=FN_PATTERN)


class SourceConfig(_Strict):
    fn: str = Field(pattern=FN_PATTERN)
    # 64 and 32 (stages), not fewer: quick items travel in batches that these
    # bounds cap, and each message costs the same whatever it carries
    # (docs/BENCHMARKS.md, "Per item").  Memory: the items themselves, pickled.
    queue_size: int = Field(64, ge=1, description="bound of the producer -> first stage queue")


class DaskConfig(_Strict):
    """Where a ``dask`` stage runs: an existing scheduler, or a LocalCluster."""

    address: str | None = Field(None, description="tcp://host:8786 of a running scheduler")
    local_workers: int | None = Field(None, ge=1, description="start a LocalCluster of N")
    threads_per_worker: int = Field(1, ge=1)


class BackendConfig(_Strict):
    dask: DaskConfig


class StageConfig(_Strict):
    fn: str = Field(pattern=FN_PATTERN)
    backend: Literal["local", "dask"] | None = Field(
        None, description="where this stage runs; default: the pipeline's backend")
    workers: int | Literal["auto"] = "auto"
    queue_size: int = Field(32, ge=1, description="bound of this stage's input queue")
    io_slots: int | None = Field(None, ge=1, description="workers in file IO at once")
    retries: int = Field(2, ge=0)
    timeout_s: float | None = Field(None, gt=0)

    @field_validator("workers")
    @classmethod
    def _workers_positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be >= 1 or 'auto' (got {v})")
        return v


class ConsumerConfig(_Strict):
    fn: str = Field(pattern=FN_PATTERN)


class WriterConfig(_Strict):
    path: str = "results.h5"
    workers: int = Field(1, ge=1, le=8, description="writer processes; they take turns on "
                         "the results file under the results lock")
    queue_size: int = Field(64, ge=1, description="finished items in flight to the writer")
    lock_timeout_s: float = Field(60.0, gt=0)


class PipelineConfig(_Strict):
    pipeline: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    workdir: str = "."
    params: dict[str, Any] = Field(default_factory=dict)
    prepare: PrepareConfig | None = None
    source: SourceConfig
    stages: dict[str, StageConfig] = Field(min_length=1)
    consumer: ConsumerConfig | None = None
    writer: WriterConfig = Field(default_factory=WriterConfig)
    cpu_slots: int | None = Field(None, ge=1,
                                  description="workers computing at once (until the last wave)")
    fsync: bool = True
    shutdown_grace_s: float = Field(30.0, ge=0)
    allowed_modules: list[str] = Field(default_factory=lambda: ["mpipe.workloads"])
    allow_outside_workdir: bool = False
    output_dirs: list[str] = Field(default_factory=list)
    backend: Literal["local"] | BackendConfig = "local"

    @model_validator(mode="after")
    def _dask_stages_need_a_cluster(self) -> PipelineConfig:
        for name, stage in self.stages.items():
            if stage.backend == "dask" and not isinstance(self.backend, BackendConfig):
                raise ValueError(
                    f"stages.{name}.backend is dask, but there is no top-level "
                    "backend: {dask: {address: ...}} or {dask: {local_workers: N}}")
        if isinstance(self.backend, BackendConfig):
            d = self.backend.dask
            if (d.address is None) == (d.local_workers is None):
                raise ValueError("backend.dask needs exactly one of address or local_workers")
        return self

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, v: dict[str, StageConfig]) -> dict[str, StageConfig]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"stage name {name!r} must be letters, digits, '_' or '-'")
        return v


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config plus where it came from."""

    config: PipelineConfig
    path: Path
    raw: dict[str, Any]
    lines: dict[str, int]

    def where(self, key: str) -> str:
        """", pipeline.yaml line 12" for a dotted key (or its nearest parent)."""
        return _where(self.path, self.lines, key)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def workdir(self) -> Path:
        return (self.base_dir / self.config.workdir).resolve()

    def worker_count(self, stage: str) -> int:
        workers = self.config.stages[stage].workers
        return cpu_count() if workers == "auto" else workers

    def stage_backend(self, stage: str) -> str:
        """"local" or "dask" for one stage."""
        chosen = self.config.stages[stage].backend
        if chosen is not None:
            return chosen
        return "local" if self.config.backend == "local" else "dask"

    def cpu_slot_count(self) -> int:
        return self.config.cpu_slots or cpu_count()


def cpu_count() -> int:
    # The affinity mask, not os.cpu_count(): a container or taskset may give
    # this process fewer cores than the machine has.
    return len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> LoadedConfig:
    """Read, interpolate, override and validate a pipeline file.

    Raises :class:`ConfigError` naming the file, key and line on any problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    lines, raw = _parse_yaml(text, path)
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {kind}")
    raw = _interpolate_env(raw, path, lines)
    for item in overrides:
        key = _apply_override(raw, item)
        lines[key] = FROM_COMMAND_LINE
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe_validation(exc, path, lines)) from None
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
            f"{key}: environment variable ${{{name}}} is not set{_where(path, lines, key)}",
            hint=f"export {name}=... or write ${{{name}:-default}}",
        )

    return _ENV_REF.sub(expand, value)


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Apply one ``--set dotted.key=value``; the value is parsed as YAML."""
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
    for part in parts[:-1]:
        child = target.get(part)
        if child is None:
            child = {}
            target[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a mapping, cannot set a key in it")
        target = child
    target[parts[-1]] = value
    return ".".join(parts)


def _where(path: Path, lines: Mapping[str, int], key: str) -> str:
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
    return f", {path.name}" if not key else f", {path.name} (set on the command line)"


def _describe_validation(exc: ValidationError, path: Path, lines: Mapping[str, int]) -> str:
    messages = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"] if not str(p).startswith(("function-", "literal["))]
        # pydantic reports a union's failure once per member ("int", "literal['auto']").
        loc = [p for p in loc if p not in {"int", "str", "float", "bool"}]
        key = ".".join(loc)
        kind = error["type"]
        got = error.get("input")
        if kind == "extra_forbidden":
            text = "unknown key (check its spelling against the README's YAML reference)"
        elif kind == "missing":
            text = "required key is missing"
        elif not key or isinstance(got, dict):
            text = error["msg"].removeprefix("Value error, ")
        else:
            text = f"{error['msg'].removeprefix('Value error, ')} (got {got!r})"
        line = f"{key}: {text}{_where(path, lines, key)}" if key else f"{text}, {path.name}"
        if line not in messages:
            messages.append(line)
    return f"invalid config {path}:\n  " + "\n  ".join(messages)
