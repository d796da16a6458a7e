"""What a stage's code is, as a digest: part of every item's fingerprint.

A finished item is skipped by the next run only if its fingerprint is the one
it was committed with (:func:`mpipe.state.config_fingerprint`).  With the
stage's code in it, the fix of a bug in a stage redoes its items (all of
them: whether the bug touched one is not known), as joblib's ``Memory`` (the
function's code), Snakemake (a rule's code) and DVC (code files as
dependencies) redo work whose code changed; without it they would stay
"done" with wrong results.

The digest follows what the stage function can reach in its own module: its
source lines, its default arguments and closure, and then, for every global
name its code uses, the functions (through decorators: ``functools.wraps``'
``__wrapped__``), the classes (their methods and simple attributes) and the
simple constants (numbers, strings, tuples of them) of that module; a
decorator's wrapper counts too.  Not the rest of the module: adding items to
a source function or editing the consumer in the same file must not redo
every item.  Not other modules it imports, nor values that are not simple
constants (a dict, an array), nor data it reads other than its ``inputs``:
after changing those, ``--fresh``.  A stage that is not a function at all (a
``functools.partial``, a callable object) is covered by its module's whole
source file instead.

Source text, not bytecode: bytecode changes with every Python version, and a
Python upgrade must not redo a finished month of work.  Line endings are
normalised (a CRLF checkout is the same code).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Values whose repr, taken as the base type, is their value and the same in every run.
_CONSTANT_TYPES = (bool, int, float, complex, str, bytes)


def code_digest(fn: Callable[..., Any], module_name: str) -> str:
    """A digest of ``fn``'s code, as described above; ``module_name`` is where the
    config names it (``module:function``)."""
    functions = [f for f in _unwrapped(fn) if isinstance(f, types.FunctionType)]
    if functions:
        # Home is the module the config names and the one that defines the
        # stage: a decorator from another module without functools.wraps
        # leaves only its wrapper (the stage is in its closure), and a package
        # may re-export a stage defined in one of its modules.
        named = sys.modules.get(module_name)
        homes = [functions[-1].__globals__] + ([vars(named)] if named is not None else [])
        try:
            return _Walk(homes).digest(functions)
        except Exception as exc:  # a user object this walk did not foresee
            # The whole module then, rather than no run at all; said, since a walk
            # that fails only sometimes would flip the digest and redo items.
            logger.warning("the code digest of %s could not follow what it uses (%s: %s); "
                           "its whole module file is digested instead", module_name,
                           type(exc).__name__, exc)
    return hashlib.sha256(_module_source(module_name)).hexdigest()[:16]


class _Walk:
    """Everything one stage reaches in its own modules (``homes``: their globals)."""

    def __init__(self, homes: list[dict[str, Any]]) -> None:
        self.homes = homes
        self.hash = hashlib.sha256()
        self.seen: set[int] = set()  # ids, only while the walk runs (never hashed)

    def digest(self, roots: list[types.FunctionType]) -> str:
        for function in roots:  # the stage and its wrappers, wherever those live
            self.function(function)
        return self.hash.hexdigest()[:16]

    def add(self, *parts: str | bytes) -> None:
        for part in parts:
            self.hash.update(b"\0" + (part.encode() if isinstance(part, str) else part))

    def function(self, function: types.FunctionType) -> None:
        if id(function) in self.seen:
            return
        self.seen.add(id(function))
        code = function.__code__
        self.add(f"def {function.__qualname__}", _source(code))
        self.value("defaults", function.__defaults__)
        self.value("kwdefaults", tuple(sorted((function.__kwdefaults__ or {}).items())))
        for name, cell in zip(code.co_freevars, function.__closure__ or (), strict=False):
            try:
                self.value(name, cell.cell_contents)
            except ValueError:  # an empty cell: a name assigned after the def
                pass
        # Only names the function's own module defines (builtins and attribute
        # names that are not globals are skipped), looked up in its dict, not
        # with getattr: the module's own __getattr__ is never called.
        for name in sorted(_global_names(code)):
            if name in function.__globals__:
                self.value(name, function.__globals__[name])

    def value(self, name: str, value: object) -> None:
        constant = _constant(value)
        if constant is not None:
            self.add(f"{name}={constant}")
        elif isinstance(value, tuple):  # defaults with functions in them
            for i, each in enumerate(value):
                self.value(f"{name}[{i}]", each)
        elif isinstance(value, type):
            if self.defined_here(value):
                self.cls(value)
        elif isinstance(value, types.ModuleType):
            pass  # another module (asking it for __wrapped__ could start a lazy import)
        else:
            # Functions of this module, also behind a decorator (lru_cache, or one
            # from another module that used functools.wraps).
            for inner in _unwrapped(value):
                if isinstance(inner, types.FunctionType) and self.at_home(inner.__globals__):
                    self.function(inner)

    def defined_here(self, cls: type) -> bool:
        return self.at_home(getattr(sys.modules.get(cls.__module__), "__dict__", None))

    def at_home(self, globals_: object) -> bool:
        return any(globals_ is home for home in self.homes)

    def cls(self, cls: type) -> None:
        """A class and its bases from this module: what a method it inherits does counts."""
        for each in cls.__mro__:
            if id(each) in self.seen or not self.defined_here(each):
                continue
            self.seen.add(id(each))
            self.add(f"class {each.__qualname__}")
            for name, member in sorted(vars(each).items()):
                if isinstance(member, staticmethod | classmethod):
                    member = member.__func__
                if isinstance(member, property):
                    member = member.fget
                self.value(f"{each.__qualname__}.{name}", member)


def _unwrapped(value: object) -> list[object]:
    """``value`` and what it wraps (``__wrapped__``, as functools.wraps sets it)."""
    chain = [value]
    while len(chain) < 100:
        try:
            inner = getattr(chain[-1], "__wrapped__", None)
        except Exception:  # a __getattr__ that raises KeyError, ...
            inner = None
        if inner is None:
            break
        chain.append(inner)
    return chain


def _constant(value: object) -> str | None:
    """The repr of a simple constant (of its base type: numpy 2's float64 repr is
    "np.float64(1.0)", numpy 1's "1.0"), or None."""
    if value is None:
        return "None"
    for kind in _CONSTANT_TYPES:
        if isinstance(value, kind):
            as_base: object = kind(value)  # type: ignore[arg-type]
            return repr(as_base)
    if isinstance(value, tuple):
        parts = [_constant(each) for each in value]
        if all(part is not None for part in parts):
            return "(" + ", ".join(str(part) for part in parts) + ")"
    return None


def _source(code: types.CodeType) -> bytes:
    """The function's lines of its source file, decorators included.

    Found from the code object's own line numbers (``co_firstlineno`` and the
    last ``end_lineno`` of its instructions and its nested functions'), not
    ``inspect.getsource``, whose tokenizing took 10 ms of the name check,
    which every run waits for.  Comments after its last statement are not
    part of it, and do not change what it computes.
    """
    lines = _file_lines(code.co_filename)
    last = max((end for each in _codes(code) for *_, end, _, _ in each.co_positions()
                if end is not None), default=0)
    if not lines or last < code.co_firstlineno:  # no source: a .pyc alone, exec()
        return _compiled(code)
    return b"".join(lines[code.co_firstlineno - 1:last])


def _compiled(code: types.CodeType) -> bytes:
    """Without source: the bytecode with its constants and names (``v * 2`` and
    ``v * 3`` differ only in a constant)."""
    parts = [code.co_code, repr(code.co_names).encode()]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            parts.append(_compiled(const))
        elif isinstance(const, frozenset):  # `x in {"a", "b"}`: its repr's order varies
            parts.append(repr(sorted(map(repr, const))).encode())
        else:
            parts.append(repr(const).encode())
    return b"\0".join(parts)


def _codes(code: types.CodeType) -> list[types.CodeType]:
    """A code object and the code of the functions, lambdas and classes inside it."""
    found = [code]
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found += _codes(const)
    return found


def _global_names(code: types.CodeType) -> set[str]:
    """The global (or attribute) names a function's code and its nested code use."""
    return {name for each in _codes(code) for name in each.co_names}


# A file's lines, until it changes (a long-lived process: tests, a notebook).
_lines: dict[str, tuple[tuple[int, int], list[bytes]]] = {}


def _file_lines(filename: str) -> list[bytes]:
    try:
        stat = os.stat(filename)
    except OSError:
        return []
    version = (stat.st_mtime_ns, stat.st_size)
    cached = _lines.get(filename)
    if cached is None or cached[0] != version:
        try:
            text = Path(filename).read_bytes().replace(b"\r\n", b"\n")
        except OSError:
            return []
        cached = _lines[filename] = (version, text.splitlines(keepends=True))
    return cached[1]


def _module_source(module_name: str) -> bytes:
    source = getattr(sys.modules.get(module_name), "__file__", None)
    lines = _file_lines(source) if source else []
    return b"".join(lines) if lines else module_name.encode()
