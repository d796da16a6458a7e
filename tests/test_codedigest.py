"""A stage's code digest (mpipe.codedigest): what changes it and what must not.

Each version of a user module is written to its own directory and imported
fresh under the same name, as the next run would import the edited file.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from mpipe.codedigest import code_digest
from tests.conftest import REPO

V1 = textwrap.dedent("""\
    import functools

    SCALE = 2.0
    UNUSED = "not read by the stage"


    def numbers(ctx):
        return [1.0, 2.0, 3.0]


    def _helper(value):
        return value * SCALE


    def scale(value):
        return _helper(value) + 1


    def total(results):
        return sum(results)


    scale_partial = functools.partial(scale)
    """)


Loader = Callable[[str], ModuleType]


@pytest.fixture
def load(tmp_path: Path) -> Iterator[Loader]:
    versions = iter(range(100))

    def load(text: str) -> ModuleType:
        directory = tmp_path / f"v{next(versions)}"
        directory.mkdir()
        (directory / "userstages.py").write_text(text)
        sys.modules.pop("userstages", None)
        sys.path.insert(0, str(directory))
        try:
            return importlib.import_module("userstages")
        finally:
            sys.path.remove(str(directory))

    yield load
    sys.modules.pop("userstages", None)


def digest(module: ModuleType, name: str = "scale") -> str:
    return code_digest(getattr(module, name), "userstages")


CHANGES = {
    # What the stage computes: its body, a helper it calls, a constant it reads.
    "the stage's body": ("_helper(value) + 1", "_helper(value) + 2", True),
    "a helper it calls": ("return value * SCALE", "return value * SCALE * 1", True),
    "a constant it reads": ("SCALE = 2.0", "SCALE = 2.5", True),
    # What it does not: the source, the consumer, an unused constant, layout.
    "the source function": ("[1.0, 2.0, 3.0]", "[1.0, 2.0, 3.0, 4.0]", False),
    "the consumer": ("sum(results)", "sum(results) + 0", False),
    "an unused constant": ('"not read by the stage"', '"still not read"', False),
    "lines added above it": ("import functools\n", "import functools\n\n\n# a note\n", False),
}


@pytest.mark.parametrize("change", CHANGES)
def test_what_changes_a_stages_digest(load: Loader, change: str) -> None:
    old, new, changes = CHANGES[change]
    assert old in V1
    before = digest(load(V1))
    after = digest(load(V1.replace(old, new)))
    assert (before != after) is changes


def test_the_last_line_of_a_long_expression_and_a_decorated_stage(load: Loader) -> None:
    # The function's lines end at its last instruction's end (co_positions), not
    # at the line where its last statement starts; a decorator's wrapper counts
    # as well as the function it wraps.
    text = V1 + textwrap.dedent("""\

        def traced(fn):
            @functools.wraps(fn)
            def wrapper(value):
                return fn(value)
            return wrapper


        @traced
        def spread(value):
            return (value
                    * 2.0)
        """)
    before = digest(load(text), "spread")
    assert digest(load(text.replace("* 2.0)", "* 2.5)")), "spread") != before
    assert digest(load(text.replace("return fn(value)", "return fn(value) + 1")),
                  "spread") != before


def test_a_stage_behind_another_modules_decorator_without_wraps(load: Loader) -> None:
    # Only the wrapper is visible (no __wrapped__); the stage is in its closure.
    text = V1 + textwrap.dedent("""\

        from tests.codedigest_deco import timed


        @timed
        def doubled(value):
            return value * 2
        """)
    before = digest(load(text), "doubled")
    assert digest(load(text.replace("value * 2", "value * 3")), "doubled") != before
    assert digest(load(text + "\n# a comment\n"), "doubled") == before


def test_a_stage_a_package_re_exports_follows_its_own_modules_helpers(tmp_path: Path) -> None:
    # fn: userpkg:stage, defined in userpkg/impl.py with its helper and constant.
    def digest_of(factor: str) -> str:
        root = tmp_path / f"f{factor}"
        (root / "userpkg").mkdir(parents=True)
        (root / "userpkg" / "__init__.py").write_text("from userpkg.impl import stage\n")
        (root / "userpkg" / "impl.py").write_text(textwrap.dedent(f"""\
            FACTOR = {factor}


            def helper(value):
                return value * FACTOR


            def stage(value):
                return helper(value)
            """))
        for name in ("userpkg", "userpkg.impl"):
            sys.modules.pop(name, None)
        sys.path.insert(0, str(root))
        try:
            return code_digest(importlib.import_module("userpkg").stage, "userpkg")
        finally:
            sys.path.remove(str(root))
            for name in ("userpkg", "userpkg.impl"):
                sys.modules.pop(name, None)

    assert digest_of("2") != digest_of("100")


def test_a_stage_that_is_not_a_plain_function_is_covered_by_its_whole_module(
        load: Loader) -> None:
    before = digest(load(V1), "scale_partial")
    after = digest(load(V1.replace("[1.0, 2.0, 3.0]", "[1.0]")),
                   "scale_partial")
    assert before != after


# What else a stage reaches in its own module, each edited once below.
REACH = textwrap.dedent("""\
    import contextlib
    import functools

    FACTOR = 2.0
    NAMES = ("a", "b")


    @functools.lru_cache(maxsize=None)
    def cached(value):
        return value * 2.0


    @contextlib.contextmanager
    def opened(value):
        yield value * 2.0


    class Base:
        def base(self, value):
            return value * 2.0


    class Scaler(Base):
        offset = 1.0

        def apply(self, value):
            return value * 2.0 + self.offset + self.base(value)


    class Strict:
        # A config object whose __getattr__ raises KeyError for any other name.

        def __init__(self):
            self.known = {"x": 1.0}

        def __getattr__(self, name):
            return self.known[name]


    CFG = Strict()


    def make(k):
        def inner(value):
            return value * k
        return inner


    made = make(3.0)


    def stage(value, factor=FACTOR):
        with opened(value) as v:
            return (cached(v) + Scaler().apply(v) * factor + made(value) + len(NAMES)
                    + CFG.x)
    """)

REACHED = {
    "a default argument's constant": ("FACTOR = 2.0", "FACTOR = 2.5"),
    "a helper behind lru_cache": ("return value * 2.0\n\n\n@contextlib",
                                  "return value * 2.5\n\n\n@contextlib"),
    "a helper behind a decorator from another module": ("yield value * 2.0", "yield value * 2.5"),
    "a method of a class it uses": ("value * 2.0 + self.offset", "value * 2.5 + self.offset"),
    "a method that class inherits": ("return value * 2.0\n\n\nclass Scaler",
                                     "return value * 2.5\n\n\nclass Scaler"),
    "a class attribute": ("offset = 1.0", "offset = 1.5"),
    "a closure's value": ("make(3.0)", "make(3.5)"),
    "a tuple constant": ('NAMES = ("a", "b")', 'NAMES = ("a", "b", "c")'),
}


@pytest.mark.parametrize("change", REACHED)
def test_what_a_stage_reaches_changes_its_digest(load: Loader, change: str) -> None:
    old, new = REACHED[change]
    assert REACH.count(old) == 1
    assert digest(load(REACH), "stage") != digest(load(REACH.replace(old, new)), "stage")


def test_what_a_stage_does_not_reach_leaves_its_digest(load: Loader) -> None:
    # Also a proof that the walk went through (a walk that fails falls back to
    # the whole file, which this edit changes): CFG's __getattr__ raises KeyError.
    edited = REACH + "\n\ndef unrelated(value):\n    return value * 7\n"
    assert digest(load(REACH), "stage") == digest(load(edited), "stage")


def test_line_endings_and_a_reread_file(load: Loader, tmp_path: Path) -> None:
    # A CRLF checkout is the same code; a file rewritten in place (a notebook,
    # a test) is read again, not taken from a cache of the old lines.
    assert digest(load(V1)) == digest(load(V1.replace("\n", "\r\n")))
    directory = tmp_path / "inplace"
    directory.mkdir()
    module = directory / "userstages.py"
    module.write_text(V1)
    sys.path.insert(0, str(directory))
    try:
        sys.modules.pop("userstages", None)
        before = digest(importlib.import_module("userstages"))
        module.write_text(V1.replace("_helper(value) + 1", "_helper(value) + 10"))
        sys.modules.pop("userstages", None)
        importlib.invalidate_caches()
        assert digest(importlib.import_module("userstages")) != before
    finally:
        sys.path.remove(str(directory))


def test_a_stage_without_a_source_file_is_digested_with_its_constants() -> None:
    def made(factor: int) -> Callable[..., object]:
        namespace: dict[str, Callable[..., object]] = {}
        exec(compile(f"def stage(v):\n    return v * {factor}\n", "<generated>", "exec"),
             namespace)
        return namespace["stage"]

    assert code_digest(made(2), "x") != code_digest(made(3), "x")
    assert code_digest(made(2), "x") == code_digest(made(2), "x")


def test_the_digest_is_the_same_in_every_process(tmp_path: Path) -> None:
    # Set order and hash seeds differ between processes; the digest must not:
    # a stage that reaches several helpers, constants, a class and a closure.
    (tmp_path / "userstages.py").write_text(REACH)
    script = ("import userstages; from mpipe.codedigest import code_digest; "
              "print(code_digest(userstages.stage, 'userstages'))")
    seen = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True, cwd=tmp_path, timeout=60,
                           env={**os.environ, "PYTHONHASHSEED": seed,
                                "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}).stdout
            for seed in ("1", "2", "3", "4", "5")}
    assert len(seen) == 1 and len(seen.pop().strip()) == 16


def test_a_walk_that_fails_falls_back_to_the_module_and_says_so(
        load: Loader, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import mpipe.codedigest

    module = load(V1)
    walked = digest(module)

    def fails(self: object, name: str, value: object) -> None:
        raise RuntimeError("an object nobody foresaw")

    monkeypatch.setattr(mpipe.codedigest._Walk, "value", fails)
    with caplog.at_level("WARNING", logger="mpipe.codedigest"):
        whole = digest(module)
    assert whole != walked
    assert "whole module file" in caplog.text and "an object nobody foresaw" in caplog.text
