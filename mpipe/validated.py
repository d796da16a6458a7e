"""``mpipe run`` validates each distinct config input once.

A pipeline run from cron or a timer reads the same ``pipeline.yaml`` every
time, and importing pydantic and building the config's validator is
0.1-0.15 s of each run's start (docs/BENCHMARKS.md, "Start-up").  Validation
is a function of the input alone: the raw mapping after ``${VAR}`` expansion
and ``--set``, under the rules of this mpipe and this pydantic.  So its answer
can be remembered, as black remembers which files it has formatted.

After pydantic accepts an input, the config is built once more from the raw
input without pydantic (:func:`assemble`: the dataclasses' own constructors,
nested as their annotations say).  Only when the two are identical (same
values, same types, same order) is the input remembered: an empty file named
by a hash of the input, mpipe's version, the source of the modules that hold
the rules, and the installed pydantic.  The next run with the same input
assembles it without importing pydantic.  An input that pydantic had to
convert (``workers: "2"``, ``fsync: 1``) is never remembered, so it is
validated every time, and a changed file, variable, ``--set``, mpipe or
pydantic is a new input.

Where: ``$MPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mpipe``, else
``~/.cache/mpipe``; under ``validated/``.  Deleting it is always safe.
``MPIPE_NO_CONFIG_CACHE=1`` turns remembering off.  A cache that cannot be read
or written is not an error: the run validates.  ``mpipe validate`` never
consults it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import logging
import math
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpipe import __version__
from mpipe.config import PipelineConfig

logger = logging.getLogger("mpipe")

_FORMAT = "1"
# The modules whose code decides what is valid and what is assembled.
_RULES = ("config.py", "validation.py", "validated.py")


def validate_once(raw: dict[str, Any], path: Path, lines: Mapping[str, int]) -> PipelineConfig:
    marker = _marker(raw)
    if marker is not None and marker.exists():
        config: PipelineConfig = assemble(PipelineConfig, raw)
        return config
    from mpipe import validation

    config = validation.validate(raw, path, lines)
    if marker is not None and _assembles_to(raw, config):
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError as exc:
            logger.debug("not remembering the validated config: %s", exc)
    return config


def assemble(kind: Any, value: Any) -> Any:
    """``value`` (from YAML) as ``kind`` (a config annotation), without checking it."""
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            return value
        fields = _field_types(kind)
        return kind(**{key: assemble(fields[key], v) for key, v in value.items()})
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is dict and isinstance(value, dict):
        return {key: assemble(args[1], v) for key, v in value.items()}
    if origin is list and isinstance(value, list):
        return [assemble(args[0], v) for v in value]
    if origin in (typing.Union, types.UnionType):
        for member in args:
            if isinstance(value, dict) and dataclasses.is_dataclass(member):
                return assemble(member, value)
        kind = float if float in args else None
    if kind is float and type(value) is int:
        return float(value)  # pydantic does the same: `timeout_s: 30` is 30.0
    return value


def identical(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (``1``, ``1.0`` and ``True`` differ)."""
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        return all(identical(getattr(a, f.name), getattr(b, f.name))
                   for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return (len(a) == len(b) and all(identical(ka, kb) for ka, kb in zip(a, b, strict=True))
                and all(identical(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def _assembles_to(raw: dict[str, Any], config: PipelineConfig) -> bool:
    try:
        return identical(assemble(PipelineConfig, raw), config)
    except (TypeError, ValueError):  # a shape only pydantic's conversions accept
        return False


@functools.cache
def _field_types(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind)  # Annotated[...] stripped to the type


def _marker(raw: dict[str, Any]) -> Path | None:
    if os.environ.get("MPIPE_NO_CONFIG_CACHE"):
        return None
    root = os.environ.get("MPIPE_CACHE_DIR")
    if not root:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        if cache_home.startswith("~"):  # no home directory to expand
            return None
        root = os.path.join(cache_home, "mpipe")
    digest = hashlib.sha256()
    # repr, not JSON: it keeps the order of keys (the stages' order is the
    # pipeline's) and tells 1 from 1.0, True and "1".
    for part in (_FORMAT, __version__, _rules_identity(), repr(raw)):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return Path(root) / "validated" / digest.hexdigest()


@functools.cache
def _rules_identity() -> str:
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in _RULES:
        digest.update((here / name).read_bytes())
    for package in ("pydantic", "pydantic_core"):
        spec = importlib.util.find_spec(package)
        origin = spec.origin if spec is not None else None
        if origin is None:
            digest.update(b"missing")
            continue
        stat = os.stat(origin)
        digest.update(f"{origin} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()
