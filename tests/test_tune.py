"""``mpipe tune``: sample runs in a scratch workdir, a measured table, --write."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

from mpipe.errors import ConfigError
from mpipe.tune import Trial, mirror, recommend, write_workers
from tests.conftest import make_inputs, mpipe

CONFIG = """\
# The notes workload, small.
pipeline: notes
workdir: .
params: {tasks: 3, repeat: 0, seed: 0}
source: {fn: mpipe.workloads.notes:tasks}
stages:
  compute:
    fn: mpipe.workloads.notes:process_task
    # tuned by mpipe tune --write
    workers: 3   # keep this comment
    queue_size: 4
consumer: {fn: mpipe.workloads.notes:accumulate}
writer: {path: results.h5}
output_dirs: [output]   # outputs of the real runs
shutdown_grace_s: 5
"""


def test_tune_measures_recommends_and_writes_keeping_comments(tmp_path: Path) -> None:
    make_inputs(tmp_path, 3)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(CONFIG)
    proc = mpipe("tune", cfg, "--workers", "1,2", "--write", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "items/s" in out and "CPU %" in out
    assert re.search(r"compute=1: [\d.]+ items/s, CPU \d+%", out), out
    assert re.search(r"compute=2: [\d.]+ items/s, CPU \d+%", out), out
    [chosen] = re.findall(r"recommended: stages\.compute\.workers: change 3 -> (\d)", out)
    assert chosen in {"1", "2"}
    assert "wrote stages.compute.workers" in out
    text = cfg.read_text()
    assert f"    workers: {chosen}   # keep this comment\n" in text
    assert "# tuned by mpipe tune --write" in text and "# The notes workload, small." in text
    assert "# outputs of the real runs" in text
    assert text.replace(f"workers: {chosen} ", "workers: 3 ") == CONFIG
    # The real workdir is untouched: no outputs, results or ledger; the scratch is gone.
    assert not (tmp_path / "output").exists()
    assert not (tmp_path / "results.h5").exists()
    assert not (tmp_path / ".mpipe" / "notes").exists()
    assert not (tmp_path / ".mpipe" / "tune").exists()
    # And the written config runs.
    assert mpipe("validate", cfg).returncode == 0


def test_mirror_shares_inputs_but_not_outputs(tmp_path: Path) -> None:
    real, scratch = tmp_path / "real", tmp_path / "real/.mpipe/tune/p"
    for d in ("input", "data/output", "data/other", ".mpipe/p"):
        (real / d).mkdir(parents=True)
    (real / "results.h5").write_text("real results")
    (real / "pipeline.yaml").write_text("x")
    mirror(real, scratch, {Path(".mpipe"), Path("results.h5"), Path("data/output")})
    assert (scratch / "input").is_symlink() and (scratch / "pipeline.yaml").is_symlink()
    assert (scratch / "data").is_dir() and not (scratch / "data").is_symlink()
    assert (scratch / "data/other").is_symlink()
    assert not (scratch / "data/output").exists()
    assert not (scratch / "results.h5").exists() and not (scratch / ".mpipe").exists()


def test_tune_refuses_outputs_outside_the_workdir(tmp_path: Path) -> None:
    cfg = tmp_path / "work" / "pipeline.yaml"
    cfg.parent.mkdir()
    cfg.write_text(CONFIG.replace("output_dirs: [output]", "output_dirs: [../elsewhere]")
                   + "allow_outside_workdir: true\n")
    proc = mpipe("tune", cfg, "--workers", "1")
    assert proc.returncode == 2
    assert "output_dirs.0" in proc.stderr and "outside the workdir" in proc.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_tune_warns_that_undeclared_outputs_are_the_real_ones(tmp_path: Path) -> None:
    # Only output_dirs, writer.path and .mpipe are the sample's own: a stage that
    # writes elsewhere writes through the scratch's symlinks into the real workdir.
    make_inputs(tmp_path, 3)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(CONFIG.replace("output_dirs: [output]   # outputs of the real runs\n", ""))
    proc = mpipe("tune", cfg, "--workers", "1", "--limit", "1")
    assert proc.returncode == 0, proc.stderr
    assert "output_dirs is empty" in proc.stderr and "real workdir" in proc.stderr


def _trial(n: int, rate: float) -> Trial:
    return Trial("s", {"s": n}, 8, rate, 50.0, 1.0, 0, "s")


def test_with_fsync_tune_also_tries_three_workers_per_core(tmp_path: Path) -> None:
    from mpipe.cores import usable_cores
    from mpipe.tune import default_candidates, default_limit

    assert default_candidates(2) == [1, 2, 4]
    assert default_candidates(2, fsync=True) == [1, 2, 4, 6]
    assert default_candidates(1, fsync=True) == [1, 2, 3]
    assert default_limit(default_candidates(2, fsync=True)) == 12
    # The command takes fsync from the config as --set leaves it.
    make_inputs(tmp_path, 1)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(CONFIG.replace("tasks: 3", "tasks: 1"))
    cores = usable_cores()
    for setting, counts in (("fsync=true", default_candidates(cores, fsync=True)),
                            ("fsync=false", default_candidates(cores))):
        proc = mpipe("tune", cfg, "--limit", "1", "--set", setting, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"worker counts {', '.join(map(str, counts))}, {cores} cores" in proc.stdout, \
            proc.stdout


def test_recommend_takes_the_smallest_count_near_the_best() -> None:
    assert recommend([_trial(1, 1.0), _trial(2, 1.9), _trial(4, 2.0)], "s") == 2
    assert recommend([_trial(1, 1.0), _trial(2, 1.5), _trial(4, 2.0)], "s") == 4
    assert recommend([_trial(2, 0.0), _trial(4, 0.0)], "s") == 2


def test_write_workers_keeps_flow_style_and_comments(tmp_path: Path) -> None:
    cfg = tmp_path / "p.yaml"
    original = textwrap.dedent("""\
        pipeline: p   # name
        stages:
          a: {fn: m:a, workers: 2}   # flow style
          b:
            fn: m:b
        allowed_modules:
          - m    # an indented list
        """)
    cfg.write_text(original)
    # Existing keys: only the value's characters change.
    assert write_workers(cfg, {"a": 12}) == ["stages.a.workers"]
    assert cfg.read_text() == original.replace("workers: 2}", "workers: 12}")
    # A missing key: the document is re-emitted by ruamel, comments kept.
    assert write_workers(cfg, {"a": 4, "b": 1}) == ["stages.a.workers", "stages.b.workers"]
    text = cfg.read_text()
    assert "a: {fn: m:a, workers: 4}" in text and "# flow style" in text
    assert "fn: m:b\n" in text and "workers: 1\n" in text
    assert "pipeline: p   # name" in text and "# an indented list" in text
    assert write_workers(cfg, {"a": 4}) == []
    with pytest.raises(ConfigError, match="no stage 'c'"):
        write_workers(cfg, {"c": 1})


def test_missing_ruamel_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text("stages: {a: {workers: 1}}\n")
    monkeypatch.setitem(sys.modules, "ruamel.yaml", None)
    with pytest.raises(ConfigError) as info:
        write_workers(cfg, {"a": 2})
    assert "pip install 'mpipe[tune]'" in str(info.value)


def test_tune_takes_the_real_workdir_clean_exit_mark_away(tmp_path: Path) -> None:
    # Sample runs write what is not their own through the scratch's links into
    # the real workdir: a killed one may leave a temporary file there, which
    # the next real run must look for (mpipe.runner.Runner._remove_leftovers).
    make_inputs(tmp_path, 3)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(CONFIG)
    assert mpipe("run", cfg).returncode == 0
    assert (tmp_path / ".mpipe" / "clean-exit").exists()
    proc = mpipe("tune", cfg, "--workers", "1", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / ".mpipe" / "clean-exit").exists()
