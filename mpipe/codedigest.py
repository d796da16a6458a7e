"""What a stage's code is, as a digest: part of every item's fingerprint.

A finished item is skipped by the next run only if its fingerprint is the one
it was committed with (:func:`mpipe.state.config_fingerprint`).  With the
stage's code in it, the fix of a bug in a stage redoes the items the bug
touched, as joblib's ``Memory`` (the function's code), Snakemake (a rule's
code) and DVC (code files as dependencies) redo work whose code changed;
without it they would stay "done" with wrong results.

The digest covers the source text of the stage function and, transitively, of
the functions of its own module that it names (the helpers beside it), and the
values of the simple module-level constants it names (numbers, strings,
tuples of them).  Not the rest of the module: adding items to a source
function or editing the consumer in the same file must not redo every item.
Not other modules it imports, nor data it reads other than its ``inputs``:
after changing those, ``--fresh``.  A stage that is not a plain function (a
``functools.partial``, a callable object) is covered by its module's whole
source file instead.

Source text, not bytecode: bytecode changes with every Python version, and a
Python upgrade must not redo a finished month of work.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Module-level values whose repr is their value (and stable between runs).
_CONSTANT_TYPES = (int, float, complex, str, bytes, bool, type(None))


def code_digest(fn: Callable[..., Any], module_name: str) -> str:
    """A digest of ``fn``'s code, as described above; ``module_name`` is where the
    config names it (``module:function``)."""
    digest = hashlib.sha256()
    target = inspect.unwrap(fn)
    if not isinstance(target, types.FunctionType):
        digest.update(_module_source(module_name))
        return digest.hexdigest()[:16]
    todo: list[types.FunctionType] = [target]
    seen: set[types.CodeType] = set()
    while todo:
        function = todo.pop()
        if function.__code__ in seen:
            continue
        seen.add(function.__code__)
        digest.update(f"\0{function.__module__}:{function.__qualname__}\0".encode())
        digest.update(_source(function))
        module = sys.modules.get(function.__module__)
        names = sorted(_global_names(function.__code__))
        for name in names:
            value = getattr(module, name, None)
            if (isinstance(value, types.FunctionType)
                    and value.__module__ == function.__module__):
                todo.append(value)
            elif _is_constant(value):
                digest.update(f"\0{name}={value!r}".encode())
    return digest.hexdigest()[:16]


def _source(function: types.FunctionType) -> bytes:
    try:
        return inspect.getsource(function).encode()
    except (OSError, TypeError):  # no source file (a .pyc alone, made at run time)
        return function.__code__.co_code


def _global_names(code: types.CodeType) -> set[str]:
    """The global (or attribute) names a function's code and its nested code use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _is_constant(value: object) -> bool:
    if isinstance(value, tuple):  # not sets: their repr's order changes between runs
        return all(_is_constant(v) for v in value)
    return isinstance(value, _CONSTANT_TYPES)


def _module_source(module_name: str) -> bytes:
    source = getattr(sys.modules.get(module_name), "__file__", None)
    if source:
        try:
            return Path(source).read_bytes()
        except OSError:
            pass
    return module_name.encode()
