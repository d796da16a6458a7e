"""``mpipe run`` validates each distinct input once (mpipe.validated).

The reference is pydantic's own validation of the same file
(``load_config`` without ``remembered``); a remembered config must equal it
in value and in type, field by field (``repr`` shows 1, 1.0 and True apart).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpipe import validated, validation
from mpipe.config import load_config
from mpipe.errors import ConfigError
from tests.conftest import REPO, check_against_reference, make_inputs, mpipe, notes_config
from tests.test_config import GOOD

# Every key the README documents, with the shapes users write: ints for
# floats, nested mappings, a date in params, a dask backend.
FULL = """\
pipeline: full.run-1
workdir: work
params: {tasks: 3, when: 2026-11-28, nested: {a: [1, 2.5, null, true]}}
prepare: {fn: mpipe.workloads.notes:make_inputs}
source: {fn: mpipe.workloads.notes:tasks, queue_size: 7}
stages:
  load:
    fn: mpipe.workloads.notes:process_task
    workers: 3
    queue_size: 4
    io_slots: 1
    retries: 0
    timeout_s: 30
  sum:
    fn: mpipe.workloads.notes:process_task
    backend: dask
    workers: auto
    timeout_s: 2.5
consumer: {fn: mpipe.workloads.notes:accumulate}
writer: {path: out/r.h5, workers: 2, queue_size: 9, lock_timeout_s: 5}
cpu_slots: 2
fsync: false
shutdown_grace_s: 0
allowed_modules: [mpipe.workloads, mystages]
allow_outside_workdir: true
output_dirs: [out]
backend: {dask: {local_workers: 2, threads_per_worker: 1}}
"""

CONFIGS = [REPO / "pipeline.yaml", *sorted(REPO.glob("examples/*/pipeline.yaml"))]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("MPIPE_CACHE_DIR", str(directory))
    monkeypatch.delenv("MPIPE_NO_CONFIG_CACHE", raising=False)
    return directory


def remembered(cache: Path) -> list[Path]:
    return sorted((cache / "validated").glob("*")) if (cache / "validated").exists() else []


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every call of pydantic's validation from here on, recorded."""
    calls: list[dict[str, Any]] = []
    real = validation.validate

    def counting(raw: dict[str, Any], *args: Any) -> Any:
        calls.append(raw)
        return real(raw, *args)

    monkeypatch.setattr(validation, "validate", counting)
    return calls


@pytest.mark.parametrize("config", [*CONFIGS, "full"],
                         ids=[*(str(c.relative_to(REPO)) for c in CONFIGS), "full"])
def test_a_remembered_config_is_what_pydantic_makes_of_it(
    tmp_path: Path, cache: Path, config: Path | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, FULL) if config == "full" else config
    assert isinstance(path, Path)
    reference = load_config(path)
    load_config(path, remembered=True)
    assert len(remembered(cache)) == 1

    def no_validation(*args: Any) -> None:
        raise AssertionError("a remembered input was validated again")

    monkeypatch.setattr(validation, "validate", no_validation)
    again = load_config(path, remembered=True)
    assert repr(again.config) == repr(reference.config)
    assert again.config == reference.config


def test_a_remembered_input_is_taken_without_pydantic(tmp_path: Path, cache: Path) -> None:
    path = write(tmp_path, GOOD)
    script = ("import sys; from mpipe.config import load_config; "
              "load_config(sys.argv[1], remembered=True); print('pydantic' in sys.modules)")

    def pydantic_imported() -> bool:
        proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                              text=True, timeout=60, check=True)
        return {"True": True, "False": False}[proc.stdout.strip()]

    assert pydantic_imported()
    assert not pydantic_imported()
    assert len(remembered(cache)) == 1


@pytest.mark.parametrize(("change", "fsync"), [(("workers: 2", "workers: '2'"), False),
                                               (("fsync: false", "fsync: 1"), True),
                                               (("fsync: false", "fsync: 'yes'"), True)],
                         ids=["str-for-int", "int-for-bool", "str-for-bool"])
def test_an_input_pydantic_converts_is_validated_every_time(
    tmp_path: Path, cache: Path, change: tuple[str, str], fsync: bool
) -> None:
    # pydantic turns "2" into 2, and 1 or "yes" into True; built without it,
    # the config would keep them as written, so such an input is never remembered.
    path = write(tmp_path, (GOOD + "fsync: false\n").replace(*change))
    for _ in range(2):
        cfg = load_config(path, remembered=True).config
        assert cfg.stages["compute"].workers == 2 and type(cfg.stages["compute"].workers) is int
        assert cfg.fsync is fsync
    assert remembered(cache) == []


def test_a_changed_input_is_validated_again(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A changed variable, --set or file is a new input.  (A variable in an int
    # key is a string that pydantic converts: never remembered, see above.)
    path = write(tmp_path, GOOD.replace("pipeline: notes", "pipeline: ${MPIPE_TEST_NAME}"))
    monkeypatch.setenv("MPIPE_TEST_NAME", "notes")
    assert load_config(path, remembered=True).config.pipeline == "notes"
    assert len(remembered(cache)) == 1
    monkeypatch.setenv("MPIPE_TEST_NAME", "no spaces allowed")
    with pytest.raises(ConfigError, match=r"pipeline: String should match.*line 1"):
        load_config(path, remembered=True)
    monkeypatch.setenv("MPIPE_TEST_NAME", "notes")
    with pytest.raises(ConfigError, match=r"stages.compute.workers.*\(from --set\)"):
        load_config(path, ["stages.compute.workers=0"], remembered=True)
    path.write_text(path.read_text().replace("workers: 2", "wokers: 2"))
    with pytest.raises(ConfigError, match=r"stages\.compute\.wokers: unknown key"):
        load_config(path, remembered=True)
    assert len(remembered(cache)) == 1


def test_remembering_off_or_impossible_is_no_error(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("MPIPE_NO_CONFIG_CACHE", "1")
    assert load_config(path, remembered=True).config.stages["compute"].workers == 2
    assert remembered(cache) == []
    monkeypatch.delenv("MPIPE_NO_CONFIG_CACHE")
    cache.write_text("a file where the cache directory would go")
    assert load_config(path, remembered=True).config.stages["compute"].workers == 2


def test_other_rules_a_planted_marker_or_a_stranger_s_marker_are_not_trusted(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch,
    validations: list[dict[str, Any]]
) -> None:
    path = write(tmp_path, GOOD)
    load_config(path, remembered=True)
    load_config(path, remembered=True)
    assert len(validations) == 1
    # Another mpipe's rules, Python or pydantic: another input.
    monkeypatch.setattr(validated, "_RULES_IDENTITY", "other rules")
    load_config(path, remembered=True)
    assert len(validations) == 2 and len(remembered(cache)) == 2
    # A marker for an input pydantic rejects (planted, or from rules this file
    # does not know): the run validates and says what is wrong.
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("workers: 2", "wokers: 2"))
    raw = yaml.safe_load(bad.read_text())  # what load_config reads (no ${VAR} in it)
    planted = validated._marker(raw)
    assert planted is not None
    planted.touch()
    with pytest.raises(ConfigError, match=r"stages\.compute\.wokers: unknown key"):
        load_config(bad, remembered=True)
    bad.write_text(GOOD.replace("stages:\n  compute:\n", "stages:\n- compute:\n"))
    planted = validated._marker(yaml.safe_load(bad.read_text()))
    assert planted is not None
    planted.touch()
    with pytest.raises(ConfigError, match=r"stages: .*dictionary"):
        load_config(bad, remembered=True)
    if os.geteuid() == 0:  # only root can give a file away
        for marker in remembered(cache):
            os.chown(marker, 4242, 4242)
        before = len(validations)
        load_config(path, remembered=True)
        assert len(validations) == before + 1


def test_an_unreadable_cache_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, validations: list[dict[str, Any]]
) -> None:
    # A name too long to look up: stat fails with ENAMETOOLONG, as it fails
    # with EACCES in a directory this user may not enter.
    monkeypatch.setenv("MPIPE_CACHE_DIR", str(tmp_path / ("x" * 300)))
    monkeypatch.delenv("MPIPE_NO_CONFIG_CACHE", raising=False)
    path = write(tmp_path, GOOD)
    for _ in range(2):
        assert load_config(path, remembered=True).config.stages["compute"].workers == 2
    assert len(validations) == 2


def test_markers_unused_for_30_days_are_forgotten(tmp_path: Path, cache: Path) -> None:
    (cache / "validated").mkdir(parents=True)
    old, recent = cache / "validated" / "old", cache / "validated" / "recent"
    old.touch()
    recent.touch()
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))
    load_config(write(tmp_path, GOOD), remembered=True)
    assert not old.exists() and recent.exists()
    assert len(remembered(cache)) == 2


def test_mpipe_run_twice_from_a_remembered_config(tmp_path: Path) -> None:
    # The second run takes the config without validating it, and computes the same.
    make_inputs(tmp_path, tasks=3)
    cfg = notes_config(tmp_path, tasks=3, repeat=0)
    env = {"MPIPE_CACHE_DIR": str(tmp_path / "cache")}
    for _ in range(2):
        proc = mpipe("run", cfg, "--fresh", "--quiet", cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        check_against_reference(tmp_path, tasks=3, repeat=0)
    assert len(remembered(tmp_path / "cache")) == 1
    validate = mpipe("validate", cfg, cwd=tmp_path, env=env)
    assert validate.returncode == 0, validate.stderr
