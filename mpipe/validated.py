"""``mpipe run`` validates each distinct config input once.

A pipeline run from cron or a timer reads the same ``pipeline.yaml`` every
time, and importing pydantic and building the config's validator took about
0.13 s of each run's start (loading pipeline.yaml: 0.19-0.20 s validating,
0.065-0.066 s remembered; docs/BENCHMARKS.md, "What changed since run 7").  Validation
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
validated every time; a changed file, variable or ``--set`` is a new input,
and so is any change to mpipe's rules, Python, or the installed versions of
pydantic and the packages it validates with.

Where: ``$MPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mpipe``, else
``~/.cache/mpipe``; under ``validated/`` (mode 0700; a marker that another
user owns is ignored).  A marker is refreshed when used, and markers unused
for 30 days are deleted when a new one is written (a config with
``${RUN_DATE}`` is a new input every day).  Deleting the directory is always
safe.  ``MPIPE_NO_CONFIG_CACHE=1`` turns remembering off.  A cache that cannot
be read or written is not an error, and neither is a marker whose input no
longer assembles: the run validates.  ``mpipe validate`` never consults it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import logging
import math
import os
import sys
import time
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpipe import __version__
from mpipe.config import PipelineConfig

logger = logging.getLogger("mpipe")

_FORMAT = "1"
# The modules whose code decides what is valid and what is assembled, and the
# distributions pydantic validates with.
_RULES = ("config.py", "validation.py", "validated.py")
_VALIDATING_DISTRIBUTIONS = ("pydantic", "pydantic_core", "annotated_types",
                             "typing_extensions", "typing_inspection")
UNUSED_FOR_S = 30 * 86400


def validate_once(raw: dict[str, Any], path: Path, lines: Mapping[str, int]) -> PipelineConfig:
    try:
        marker = _marker(raw)
        remembered = marker is not None and _is_ours(marker)
    except OSError as exc:  # unreadable cache directory, a name too long...
        logger.debug("not using remembered configs: %s", exc)
        marker, remembered = None, False
    if marker is not None and remembered:
        try:
            config: PipelineConfig = assemble(PipelineConfig, raw)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            # Only a marker that lies (planted, or from rules this file does
            # not know) gets here: validate, and say what is wrong.
            logger.debug("a remembered config no longer assembles (%s): validating", exc)
        else:
            _refresh(marker)
            return config
    from mpipe import validation

    config = validation.validate(raw, path, lines)
    if marker is not None and _assembles_to(raw, config):
        _remember(marker)
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
    except (TypeError, ValueError, KeyError, AttributeError):  # only pydantic's conversions fit
        return False


@functools.cache
def _field_types(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind)  # Annotated[...] stripped to the type


def _is_ours(marker: Path) -> bool:
    try:
        return marker.stat().st_uid == os.getuid()
    except FileNotFoundError:
        return False


def _refresh(marker: Path) -> None:
    try:
        os.utime(marker)
    except OSError:
        pass  # a read-only cache still serves


def _remember(marker: Path) -> None:
    try:
        marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        marker.touch()
        _forget_unused(marker.parent)
    except OSError as exc:
        logger.debug("not remembering the validated config: %s", exc)


def _forget_unused(directory: Path) -> None:
    cutoff = time.time() - UNUSED_FOR_S
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass  # another run got there first, or not ours to delete


def _marker(raw: dict[str, Any]) -> Path | None:
    if os.environ.get("MPIPE_NO_CONFIG_CACHE") or _RULES_IDENTITY is None:
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
    for part in (_FORMAT, __version__, _RULES_IDENTITY, repr(raw)):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return Path(root) / "validated" / digest.hexdigest()


def _rules_identity() -> str:
    """This mpipe's rules, this Python, and the validating distributions' versions.

    Computed as this module is imported, with the rules' source as it is then.
    """
    digest = hashlib.sha256(sys.version.encode())
    here = Path(__file__).parent
    for name in _RULES:
        digest.update((here / name).read_bytes())
    spec = importlib.util.find_spec("pydantic")
    site = Path(spec.origin).parent.parent if spec is not None and spec.origin else None
    if site is not None:
        # "pydantic-2.14.4.dist-info": the versions, without importlib.metadata.
        with os.scandir(site) as entries:
            names = sorted(e.name for e in entries if e.name.endswith(".dist-info")
                           and e.name.split("-")[0].lower() in _VALIDATING_DISTRIBUTIONS)
        digest.update("\n".join(names).encode())
    return digest.hexdigest()


try:
    _RULES_IDENTITY: str | None = _rules_identity()
except OSError:  # installed without its source: nothing is remembered
    _RULES_IDENTITY = None
