"""Which functions get ctx: only those that clearly ask for it.

ctx goes positionally right after the value(s) when the parameter there is
named ``ctx`` or has no default (:func:`mpipe.imports.takes_context`).  A
parameter with a default and another name keeps its default: before, ``def
last(x, negate=False)`` got ctx (truthy) as ``negate`` and every result came
out negated, with exit 0.
"""

from __future__ import annotations

import functools
import logging
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import pytest

from mpipe.errors import ConfigError
from mpipe.imports import call_with_optional_context, check_names, takes_context
from tests.conftest import mpipe

CTX = object()  # stands for a StageContext / SourceContext


# ---------------------------------------------------------------- the forms


def value_only(x: Any) -> Any:
    return x


def value_ctx(x: Any, ctx: Any) -> Any:
    return (x, ctx)


def value_context(task: Any, context: Any) -> Any:  # required, another name
    return (task, context)


def last(x: float, negate: bool = False) -> float:
    return -x if negate else x


def double(x: float, factor: float = 2) -> float:
    return x * factor


def value_ctx_default(x: Any, ctx: Any = None) -> Any:
    return (x, ctx)


def value_ctx_positional_only(x: Any, ctx: Any, /) -> Any:
    return (x, ctx)


def value_ctx_then_default(x: Any, ctx: Any, negate: bool = False) -> Any:
    return (x, ctx, negate)


def value_kwonly_ctx(x: Any, *, ctx: Any = None) -> Any:
    return (x, ctx)


def value_args(x: Any, *rest: Any) -> Any:
    return (x, rest)


def only_args(*args: Any, **kwargs: Any) -> Any:
    return args


def _plain_decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:  # no functools.wraps
        return fn(*args, **kwargs)
    return wrapper


def _wraps_decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)
    return wrapper


def _two_function_decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
    def log(*args: Any) -> None:
        pass

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        log(*args)
        return fn(*args, **kwargs)
    return wrapper


class Stage:
    def __call__(self, x: Any, ctx: Any) -> Any:
        return (x, ctx)


class Scaled:
    def __call__(self, x: float, scale: float = 3) -> float:
        return x * scale


def scale_by(factor: float, x: float, ctx: Any = None) -> Any:
    return (factor * x, ctx)


# (function, passed ctx as a stage: takes_context(fn, 1))
STAGE_FORMS: dict[str, tuple[Callable[..., Any], bool]] = {
    "value only": (value_only, False),
    "value, ctx": (value_ctx, True),
    "value, required param of another name": (value_context, True),
    "value, defaulted param (negate=False)": (last, False),
    "value, defaulted param (factor=2)": (double, False),
    "value, ctx=None": (value_ctx_default, True),
    "value, ctx positional-only": (value_ctx_positional_only, True),
    "value, ctx, defaulted param": (value_ctx_then_default, True),
    "value, keyword-only ctx": (value_kwonly_ctx, False),
    "value, *rest": (value_args, True),  # *args got ctx before the rule: still does
    "*args, **kwargs alone": (only_args, True),
    "wraps-decorated value only": (_wraps_decorator(value_only), False),
    "wraps-decorated value, ctx": (_wraps_decorator(value_ctx), True),
    "wraps-decorated value, defaulted param": (_wraps_decorator(last), False),
    "plain wrapper of value only": (_plain_decorator(value_only), False),
    "plain wrapper of value, ctx": (_plain_decorator(value_ctx), True),
    "plain wrapper of value, defaulted param": (_plain_decorator(last), False),
    "wrapper holding two functions": (_two_function_decorator(value_ctx), True),
    "class with __call__(x, ctx)": (Stage(), True),
    "class with __call__(x, scale=3)": (Scaled(), False),
    "partial leaving (x, ctx=None)": (functools.partial(scale_by, 2.0), True),
    "partial leaving (x) and keyword ctx": (functools.partial(scale_by, 2.0, ctx=None),
                                            False),
    "partial of a defaulted param": (functools.partial(double, factor=5), False),
    "builtin with a defaulted param": (dict.fromkeys, False),
    "builtin without a signature": (max, False),
}


@pytest.mark.parametrize("form", STAGE_FORMS)
def test_a_stage_gets_ctx_only_when_it_clearly_asks(form: str) -> None:
    fn, expected = STAGE_FORMS[form]
    assert takes_context(fn, 1) is expected


def test_a_defaulted_param_keeps_its_default() -> None:
    # The reviewer's cases: every result negated; every item a TypeError.
    assert call_with_optional_context(last, 5.0, ctx=CTX) == 5.0
    assert call_with_optional_context(double, 5.0, ctx=CTX) == 10.0
    assert call_with_optional_context(Scaled(), 5.0, ctx=CTX) == 15.0
    assert call_with_optional_context(_plain_decorator(last), 5.0, ctx=CTX) == 5.0


def test_the_documented_stage_forms_are_unchanged() -> None:
    assert call_with_optional_context(value_only, 1, ctx=CTX) == 1
    assert call_with_optional_context(value_ctx, 1, ctx=CTX) == (1, CTX)
    assert call_with_optional_context(value_context, 1, ctx=CTX) == (1, CTX)
    assert call_with_optional_context(value_ctx_default, 1, ctx=CTX) == (1, CTX)
    assert call_with_optional_context(value_ctx_then_default, 1, ctx=CTX) == (1, CTX, False)
    assert call_with_optional_context(Stage(), 1, ctx=CTX) == (1, CTX)
    assert call_with_optional_context(_plain_decorator(value_ctx), 1, ctx=CTX) == (1, CTX)


def source_ctx(ctx: Any) -> Any:
    return ["ctx", ctx]


def source_none() -> Any:
    return ["none"]


def source_ctx_default(ctx: Any = None) -> Any:
    return ["ctx", ctx]


def source_count(n: int = 2) -> Any:
    return list(range(n))


def source_context(context: Any) -> Any:
    return ["context", context]


def source_kwonly(*, ctx: Any = None) -> Any:
    return ["kw", ctx]


def test_sources_and_prepare_get_ctx_by_the_same_rule() -> None:
    # fn(ctx) and fn() as documented; fn(n=10) keeps n; fn(ctx=None) gets ctx.
    assert call_with_optional_context(source_ctx, ctx=CTX) == ["ctx", CTX]
    assert call_with_optional_context(source_none, ctx=CTX) == ["none"]
    assert call_with_optional_context(source_ctx_default, ctx=CTX) == ["ctx", CTX]
    assert call_with_optional_context(source_context, ctx=CTX) == ["context", CTX]
    assert call_with_optional_context(source_count, ctx=CTX) == [0, 1]
    assert call_with_optional_context(functools.partial(source_count, 3), ctx=CTX) == [0, 1, 2]
    assert call_with_optional_context(source_kwonly, ctx=CTX) == ["kw", None]


def consumer(results: Any, ctx: Any) -> Any:
    return (list(results), ctx)


def consumer_scaled(results: Any, scale: float = 1) -> Any:
    return sum(results) * scale


def test_a_consumer_gets_ctx_by_the_same_rule() -> None:
    assert call_with_optional_context(consumer, iter([1, 2]), ctx=CTX) == ([1, 2], CTX)
    assert call_with_optional_context(consumer_scaled, iter([1, 2]), ctx=CTX) == 3


# ------------------------------------------------------- checked at config time

CHECKED = '''\
import functools


def fine(x, ctx=None):
    return x


def kwonly(x, *, ctx):
    return x


def after_default(x, negate=False, *, ctx):
    return x


def bound(x, *, ctx):
    return (x, ctx)


bound_ctx = functools.partial(bound, ctx="bound on purpose")


class Timed:
    """A decorator class: __call__ takes *args; the function it wraps decides."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _wants_ctx(x, ctx):
    return x


def _no_ctx(x, negate=False):
    return x


timed_wants = Timed(_wants_ctx)
timed_no = Timed(_no_ctx)


def stage_of_ctx_only(ctx):
    return ctx


def source_kwonly(*, ctx):
    return []


def _plain(fn):
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


class Opaque:
    def __call__(self, *args):
        return args[0]


opaque = Opaque()
wrapped = _plain(fine)
'''


@pytest.fixture
def checked_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"ctx_checked_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(CHECKED)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


@pytest.mark.parametrize(("key", "fn"), [
    ("stages.s.fn", "kwonly"),
    ("stages.s.fn", "after_default"),
    ("stages.s.fn", "stage_of_ctx_only"),
    ("source.fn", "source_kwonly"),
    ("prepare.fn", "source_kwonly"),
])
def test_a_ctx_parameter_that_would_never_get_it_is_a_config_error(
    checked_module: str, tmp_path: Path, key: str, fn: str
) -> None:
    with pytest.raises(ConfigError, match="parameter 'ctx' where the context is never passed"
                       ) as raised:
        check_names([(key, f"{checked_module}:{fn}", ", p.yaml line 3")], [], tmp_path)
    assert ", p.yaml line 3" in raised.value.message
    assert raised.value.hint and "right after the value" in raised.value.hint


def test_only_args_is_passed_ctx_and_warned_about(
    checked_module: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mpipe")
    check_names([("stages.a.fn", f"{checked_module}:fine", ""),
                 ("stages.b.fn", f"{checked_module}:wrapped", ""),
                 ("consumer.fn", f"{checked_module}:fine", "")], [], tmp_path)
    assert not caplog.records  # the closure told: the wrapper of fine gets ctx
    check_names([("stages.c.fn", f"{checked_module}:opaque", "")], [], tmp_path)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "stages.c.fn" in record.getMessage()
    assert "so it is passed ctx" in record.getMessage()
    assert "functools.wraps" in record.getMessage()


# ------------------------------------------------------------------ end to end

STAGES = '''\
def numbers(ctx):
    return [float(i + 1) for i in range(ctx.params["n"])]


def scaled(x, ctx):
    return x * ctx.params["scale"]


def last(x, negate=False):
    return -x if negate else x
'''


def test_a_run_leaves_a_defaulted_param_at_its_default(tmp_path: Path) -> None:
    (tmp_path / "ctx_stages.py").write_text(STAGES)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(textwrap.dedent("""\
        pipeline: takes-context
        workdir: .
        params: {n: 3, scale: 2.0}
        source: {fn: ctx_stages:numbers}
        stages:
          scaled: {fn: ctx_stages:scaled, workers: 1}
          last: {fn: ctx_stages:last, workers: 1}
        fsync: false
        """))
    result = mpipe("run", cfg, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "takes *args where ctx would go" not in result.stderr  # no warning for these
    with h5py.File(tmp_path / "results.h5") as f:
        assert f["results"][:].tolist() == [2.0, 4.0, 6.0]  # not negated
        assert f["done"][:].all()


def test_a_ctx_bound_by_partial_and_decorator_classes_are_fine(
    checked_module: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import importlib

    caplog.set_level(logging.WARNING, logger="mpipe")
    check_names([("stages.a.fn", f"{checked_module}:bound_ctx", ""),
                 ("stages.b.fn", f"{checked_module}:timed_wants", ""),
                 ("stages.c.fn", f"{checked_module}:timed_no", "")], [], tmp_path)
    assert not caplog.records
    module = importlib.import_module(checked_module)
    assert not takes_context(module.bound_ctx, 1)
    assert takes_context(module.timed_wants, 1)
    assert not takes_context(module.timed_no, 1)
