"""A value results.h5 cannot hold is named where it is made.

A last stage's None used to reach the consumer first, whose fold raised: the
whole run broke (exit 3), blamed on the writer.  A consumer's dict used to fail
only when the file was sealed, with h5py's words and no name.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from tests.conftest import mpipe


def _config(workdir: Path, consumer: str) -> Path:
    cfg = workdir / "pipeline.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        pipeline: results
        workdir: .
        params: {{n: 4}}
        source: {{fn: tests.result_stages:numbers}}
        stages:
          last: {{fn: tests.result_stages:none_for_two, workers: 2, retries: 0}}
        consumer: {{fn: tests.result_stages:{consumer}}}
        writer: {{path: results.h5}}
        allowed_modules: [tests.result_stages]
        fsync: false
        """))
    return cfg


def test_a_last_stage_returning_none_fails_that_item_at_that_stage(tmp_path: Path) -> None:
    proc = mpipe("run", _config(tmp_path, "total"), "--quiet", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # the item's failure; the run went on
    doc = json.loads((tmp_path / ".mpipe/results/last-run.json").read_text())
    [failure] = doc["failures"]
    assert failure["key"] == "2" and failure["stage"] == "last" and failure["kind"] == "result"
    assert "must be a number or a numeric array, got NoneType" in failure["message"]
    assert doc["counts"]["committed"] == 3


def test_a_consumer_returning_a_dict_is_named(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "summary")
    proc = mpipe("run", cfg, "--quiet", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "consumer.fn tests.result_stages:summary" in proc.stderr, proc.stderr
    assert "got dict" in proc.stderr, proc.stderr
