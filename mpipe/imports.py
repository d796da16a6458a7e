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
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mpipe.errors import ConfigError

logger = logging.getLogger(__name__)


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
        mine = [p for p in (base_dir / f"{top}.py", base_dir / top) if p.exists()]
        if mine:
            spec = importlib.util.find_spec(top)
            raise ConfigError(
                f"{key}: {mine[0]} has the name of another module, {top!r} from "
                f"{spec.origin if spec else '?'}, which Python finds first{where}",
                hint="rename your file (and the name in the config)")
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
        # The user's traceback: the line of their module that raised.
        raise ConfigError(f"{key}: importing {module_name!r} raised {type(exc).__name__}: "
                          f"{exc}{where}\n{_user_traceback(exc)}") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}{where}")
    if not callable(fn):
        raise ConfigError(f"{key}: {name} is not callable{where}")
    return fn  # type: ignore[no-any-return]


def _user_traceback(exc: BaseException) -> str:
    """``exc``'s traceback from the user's code on: no importlib or mpipe frames."""
    mine = str(Path(__file__).parent)
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(("<frozen ", mine)) and "importlib" not in f.filename]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames),
             *traceback.format_exception_only(exc)]
    return "".join(lines).rstrip()


def call_with_optional_context(fn: Callable[..., Any], *args: Any, ctx: Any) -> Any:
    """Call ``fn(*args, ctx)`` if :func:`takes_context` says so, else ``fn(*args)``.

    Stages are plain functions; only those that need the context ask for it.
    """
    if takes_context(fn, len(args)):
        return fn(*args, ctx)
    return fn(*args)


CTX = "ctx"
# How many values come before ctx, by config key: fn(ctx) / fn(value, ctx).
_N_ARGS = {"source.fn": 0, "prepare.fn": 0, "consumer.fn": 1, "stages.": 1}


def takes_context(fn: Callable[..., Any], n_args: int) -> bool:
    """Whether ``fn`` is called with ctx after its ``n_args`` values.

    ctx is passed only when ``fn`` clearly asks for it: ctx always goes
    positionally, right after the values (a stage's or consumer's second
    parameter, a source's or prepare's first), and it goes there when the
    parameter in that position

    * is named ``ctx``, with or without a default (``def f(x, ctx=None)``), or
    * has no default, whatever its name (``def load(task, context)``).

    A parameter there with a default and another name keeps its default:
    ``def last(x, negate=False)`` and ``def numbers(n=10)`` never get ctx.

    The signature is ``inspect.signature``'s: it follows ``__wrapped__``
    (``functools.wraps``), a ``functools.partial``'s remaining parameters and a
    class's ``__call__``.  With no parameter in that position but a ``*args``
    (a decorator's ``def wrapper(*args, **kwargs)`` without ``functools.wraps``,
    or a decorator class's ``__call__``): if the wrapper holds exactly one
    function (in its closure, or as an attribute), that function decides by the
    same rule; otherwise ctx is passed, as ``*args`` always got it, and
    :func:`check_names` warns.  A parameter named ``ctx`` without a default
    elsewhere (keyword-only, after a defaulted parameter, before the value)
    would never get it, and every call would fail: :func:`check_names` rejects
    it.  One with a default (``functools.partial(f, ctx=...)``) keeps it.
    """
    return _context_rule(fn, n_args)[0]


def _context_rule(fn: Callable[..., Any], n_args: int, depth: int = 0
                  ) -> tuple[bool, str | None]:
    """(whether ctx is passed, None or the trouble: "misplaced", "ambiguous")."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False, None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    slot = positional[n_args] if len(positional) > n_args else None
    passed = slot is not None and (slot.name == CTX or slot.default is slot.empty)
    # A ctx that can never be passed and has no value: every call would fail.
    # (One with a default, e.g. bound by functools.partial(f, ctx=...), is fine.)
    if any(p.name == CTX and p is not slot and p.default is p.empty for p in params):
        return passed, "misplaced"
    if slot is None and any(p.kind is p.VAR_POSITIONAL for p in params):
        inner = _wrapped(fn)
        if inner is not None and depth < 5:
            return _context_rule(inner, n_args, depth + 1)
        return True, "ambiguous"  # as before this rule: *args gets ctx
    return passed, None


def _wrapped(fn: Callable[..., Any]) -> Callable[..., Any] | None:
    """The one function a wrapper holds (what it wraps), if just one: in a
    closure (a decorator function) or in an instance's attributes (a decorator
    class whose ``__call__`` takes ``*args``)."""
    try:
        outer = inspect.unwrap(fn)
    except ValueError:  # a __wrapped__ cycle
        return None
    held: list[object] = []
    for cell in getattr(outer, "__closure__", None) or ():
        try:
            held.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    if not inspect.isfunction(outer) and not inspect.ismethod(outer):
        held += list(getattr(outer, "__dict__", {}).values())
    found = [v for v in held if inspect.isfunction(v) and v is not outer]
    return found[0] if len(found) == 1 else None


def _check_context(fn: Callable[..., Any], key: str, name: str, where: str) -> None:
    n_args = next((n for k, n in _N_ARGS.items() if key.startswith(k)), None)
    if n_args is None:
        return
    _, trouble = _context_rule(fn, n_args)
    form = "fn(ctx)" if n_args == 0 else "fn(value, ctx)"
    if trouble == "misplaced":
        raise ConfigError(
            f"{key}: {name} has a parameter 'ctx' where the context is never passed{where}",
            hint=f"ctx is passed positionally right after the value(s): {form}")
    if trouble == "ambiguous":
        logger.warning(
            "%s: %s takes *args where ctx would go%s, so it is passed ctx; if it wraps a "
            "function that takes none, decorate the wrapper with functools.wraps", key,
            name, where)


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
        _check_context(fn, key, name, where)
        if key.startswith("stages."):
            digests[key] = code_digest(fn, name.partition(":")[0])
    return digests

