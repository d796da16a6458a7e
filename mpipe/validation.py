"""Validating a raw config with pydantic, and saying what is wrong in the user's terms.

The only module that imports pydantic (about 0.1 s): :mod:`mpipe.config`
imports it when a config is validated, never when the types are used.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from mpipe import config
from mpipe.config import PipelineConfig
from mpipe.errors import ConfigError

# pydantic names a union's member in an error's location ("int",
# "literal['auto']", "BackendConfig": the one config type in a union); the
# user wrote none of them.
_MEMBER_NAMES = {"int", "str", "float", "bool", config.BackendConfig.__name__}


@functools.cache
def _adapter() -> TypeAdapter[PipelineConfig]:
    return TypeAdapter(PipelineConfig)


def validate(raw: dict[str, Any], path: Path, lines: Mapping[str, int]) -> PipelineConfig:
    """The validated config; :class:`ConfigError` naming each bad key and its line."""
    try:
        return _adapter().validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(describe(exc, path, lines)) from None


def describe(exc: ValidationError, path: Path, lines: Mapping[str, int]) -> str:
    messages = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"] if not str(p).startswith(("function-", "literal["))]
        loc = [p for p in loc if p not in _MEMBER_NAMES]
        key = ".".join(loc)
        kind = error["type"]
        got = error.get("input")
        if kind in ("extra_forbidden", "unexpected_keyword_argument"):
            text = "unknown key (check its spelling against the README's YAML reference)"
        elif kind in ("missing", "missing_argument"):
            text = "required key is missing"
        elif kind == "string_pattern_mismatch" and key.endswith(".fn"):
            text = f"expected module:function, e.g. my_stages:process (got {got!r})"
        elif not key or isinstance(got, dict) or "(got " in error["msg"]:
            # mpipe's own checks name the value themselves.
            text = error["msg"].removeprefix("Value error, ")
        else:
            text = f"{error['msg'].removeprefix('Value error, ')} (got {got!r})"
        line = (f"{key}: {text}{config.locate(path, lines, key)}" if key
                else f"{text}, {path.name}")
        if line not in messages:
            messages.append(line)
    return f"invalid config {path}:\n  " + "\n  ".join(messages)
