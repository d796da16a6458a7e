"""What a stage's code is, as a digest: part of every item's fingerprint.

A finished item is skipped by the next run only if its fingerprint is the one
it was committed with (:func:`mpipe.state.config_fingerprint`).  With the
stage's code in it, the fix of a bug in a stage redoes its items (all of
them: whether the bug touched one is not known), as joblib's ``Memory`` (the
function's code), Snakemake (a rule's code) and DVC (code files as
dependencies) redo work whose code changed; without it they would stay
"done" with wrong results.

The digest covers the source text of the stage function and, transitively, of
the functions of its own module that it names (the helpers beside it), and the
values of the simple module-level constants it names (numbers, strings,
tuples of them).  Not the rest of the module: adding items to a source
function or editing the consumer in the same file must not redo every item.
Not other modules it imports, nor data it reads other than its ``inputs``:
after changing those, ``--fresh``.  A decorated stage counts with its
wrappers (``functools.wraps``' ``__wrapped__`` chain).  A stage that is not a
plain function (a ``functools.partial``, a callable object) is covered by its
module's whole source file instead.

Source text, not bytecode: bytecode changes with every Python version, and a
Python upgrade must not redo a finished month of work.
"""

from __future__ import annotations

import hashlib
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
    # A decorated stage: the wrappers too (functools.wraps' __wrapped__ chain), as
    # they may change what it returns.
    chain: list[object] = [fn]
    while hasattr(chain[-1], "__wrapped__") and len(chain) < 100:
        chain.append(chain[-1].__wrapped__)
    todo = [f for f in chain if isinstance(f, types.FunctionType)]
    if not todo:
        digest.update(_module_source(module_name))
        return digest.hexdigest()[:16]
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
    """The function's lines of its source file, decorators included.

    Found from the code object's own line numbers (``co_firstlineno`` and the
    last ``end_lineno`` of its instructions and its nested functions'), not
    ``inspect.getsource``, whose tokenizing took 10 ms of the name check,
    which every run waits for.  Comments after its last statement are not
    part of it, and do not change what it computes.
    """
    code = function.__code__
    lines = _file_lines(code.co_filename)
    last = max((end for each in _codes(code) for *_, end, _, _ in each.co_positions()
                if end is not None), default=0)
    if not lines or last < code.co_firstlineno:  # no source file: a .pyc alone, exec()
        return code.co_code
    return b"".join(lines[code.co_firstlineno - 1:last])


def _codes(code: types.CodeType) -> list[types.CodeType]:
    """A code object and the code of the functions, lambdas and classes inside it."""
    found = [code]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found += _codes(const)
    return found


_lines: dict[str, list[bytes]] = {}


def _file_lines(filename: str) -> list[bytes]:
    if filename not in _lines:
        try:
            _lines[filename] = Path(filename).read_bytes().splitlines(keepends=True)
        except OSError:
            _lines[filename] = []
    return _lines[filename]


def _global_names(code: types.CodeType) -> set[str]:
    """The global (or attribute) names a function's code and its nested code use."""
    return {name for each in _codes(code) for name in each.co_names}


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
