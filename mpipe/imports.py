"""Resolving ``"module:function"`` names from the config, safely.

Importing a module runs its code, so a name is checked against what the config
allows *before* it is imported: a module is allowed if it is (or is inside) one
of ``allowed_modules``, or if its top-level package lives in the pipeline file's
own directory.  ``importlib.util.find_spec`` on a top-level name locates the
file without executing it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mpipe.errors import ConfigError


def add_pipeline_dir(base_dir: Path) -> None:
    """Make the pipeline's own modules importable here (children: :func:`import_checked`)."""
    entry = str(base_dir)
    if entry not in sys.path:
        sys.path.insert(0, entry)


def import_checked(name: str, pipeline_dir: str) -> Callable[..., Any]:
    """Import ``"module:function"`` in a child; the runner has checked the name.

    The forkserver may have started before the config was read (``mpipe run``
    starts it first, to overlap its imports with the runner's), so a child
    cannot rely on an inherited ``sys.path`` for the pipeline's own modules.
    """
    add_pipeline_dir(Path(pipeline_dir))
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def is_allowed(module: str, allowed: Sequence[str], base_dir: Path) -> bool:
    for prefix in allowed:
        if module == prefix or module.startswith(prefix + "."):
            return True
    top = module.split(".", 1)[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    locations = [spec.origin] if spec.origin else []
    locations += list(spec.submodule_search_locations or [])
    base = base_dir.resolve()
    return any(Path(loc).resolve().is_relative_to(base) for loc in locations if loc)


def resolve(name: str, key: str, allowed: Sequence[str], base_dir: Path, *,
            where: str = "") -> Callable[..., Any]:
    """Import ``"module:function"`` named by config ``key``, if allowed.

    ``where`` (", pipeline.yaml line 9") is appended to every message.
    """
    module_name, _, attr = name.partition(":")
    top = module_name.split(".", 1)[0]
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(
            f"{key}: cannot import {name!r}: no module named {top!r}{where}",
            hint="check the spelling; a module of your own goes next to the pipeline file",
        )
    if not is_allowed(module_name, allowed, base_dir):
        raise ConfigError(
            f"{key}: module {module_name!r} is not allowed{where}",
            hint=(
                f"add it to allowed_modules (now {list(allowed)}), or put it next to "
                "the pipeline file"
            ),
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name!r}: {exc}{where}") from exc
    except Exception as exc:
        raise ConfigError(f"{key}: importing {module_name!r} raised {exc!r}{where}") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}{where}")
    if not callable(fn):
        raise ConfigError(f"{key}: {name} is not callable{where}")
    return fn  # type: ignore[no-any-return]


def call_with_optional_context(fn: Callable[..., Any], *args: Any, ctx: Any) -> Any:
    """Call ``fn(*args, ctx)`` if it takes one more argument, else ``fn(*args)``.

    Stages are plain functions; only those that need the context ask for it.
    """
    if takes_context(fn, len(args)):
        return fn(*args, ctx)
    return fn(*args)


def takes_context(fn: Callable[..., Any], n_args: int) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) > n_args


# (config key, "module:function", where) of each function a config names.
Named = tuple[str, str, str]


def check_names(named: Sequence[Named], allowed: Sequence[str], base_dir: Path
                ) -> dict[str, str]:
    """Import and check every named function; raise the first :class:`ConfigError`.

    Returns each stage function's code digest (:mod:`mpipe.codedigest`), by
    config key: what an item's fingerprint holds of the code.
    """
    from mpipe.codedigest import code_digest

    add_pipeline_dir(base_dir)
    digests = {}
    for key, name, where in named:
        fn = resolve(name, key, allowed, base_dir, where=where)
        if key.startswith("stages."):
            digests[key] = code_digest(fn, name.partition(":")[0])
    return digests

