"""A value results.h5 cannot hold is named where it is made.

A last stage's None used to reach the consumer first, whose fold raised: the
whole run broke (exit 3), blamed on the writer.  A consumer's dict used to fail
only when the file was sealed, with h5py's words and no name.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import h5py
import pytest

from tests.conftest import mpipe


def _config(workdir: Path, consumer: str, stage: str = "none_for_two", retries: int = 0) -> Path:
    cfg = workdir / "pipeline.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        pipeline: results
        workdir: .
        params: {{n: 4}}
        source: {{fn: tests.result_stages:numbers}}
        stages:
          last: {{fn: tests.result_stages:{stage}, workers: 2, retries: {retries}}}
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


@pytest.mark.parametrize(("stage", "kind"), [("none_for_two", "result"),
                                             ("lock_for_two", "pickle"),
                                             ("escapes_for_two", "raised")])
def test_a_value_no_attempt_could_store_is_not_retried(tmp_path: Path, stage: str,
                                                       kind: str) -> None:
    # Another attempt would return the same None or lock: the item fails at
    # once, its retries unspent, and the log says why.
    proc = mpipe("run", _config(tmp_path, "total", stage=stage, retries=2), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads((tmp_path / ".mpipe/results/last-run.json").read_text())
    [failure] = doc["failures"]
    assert failure["key"] == "2" and failure["kind"] == kind
    last = doc["stages"]["last"]
    assert (last["failed"], last["retries"]) == (1, 0)
    assert doc["counts"]["committed"] == 3
    assert "failed for good after 1 attempt(s) (not retried: another attempt would " \
           "fail the same way)" in proc.stderr, proc.stderr
    assert "retrying" not in proc.stderr


def test_a_memory_error_while_pickling_a_result_is_retried(tmp_path: Path) -> None:
    # Out of memory is the moment, not the value: the retries are spent.
    proc = mpipe("run", _config(tmp_path, "total", stage="out_of_memory_for_two", retries=2),
                 cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads((tmp_path / ".mpipe/results/last-run.json").read_text())
    [failure] = doc["failures"]
    assert failure["kind"] == "pickle" and "no memory left" in failure["message"]
    assert (doc["stages"]["last"]["failed"], doc["stages"]["last"]["retries"]) == (1, 2)
    assert "failed for good after 3 attempt(s): " in proc.stderr, proc.stderr


def test_what_as_row_met_on_the_way_decides_whether_to_retry() -> None:
    # as_row turns whatever np.asarray raised into a TypeError; the worker looks
    # at what it was: out of memory or an OSError is the moment, not the value.
    from types import SimpleNamespace

    from mpipe.messages import ItemFailure, WorkItem, dumps
    from mpipe.rows import as_row
    from mpipe.worker import _run_one
    from tests.result_stages import ArrayRaising as Raising

    def retryable(value: object) -> bool:
        ctx = SimpleNamespace(stage="last", worker="w", key="", attempt=0, io_s=0.0,
                              cpu_wait_s=0.0, output_commit_s=0.0, reset_times=lambda: None)
        reply, _ = _run_one(lambda _: value, False, ctx, WorkItem(0, "k", 1, dumps(0)),
                            row_check=as_row)
        assert isinstance(reply, ItemFailure) and reply.kind == "result", reply
        return reply.retryable

    assert retryable(Raising(MemoryError())) is True
    assert retryable(Raising(OSError(5, "lazy load failed"))) is True
    assert retryable(Raising(ValueError("ragged"))) is False
    assert retryable(None) is False
    assert retryable("text") is False


def test_a_consumer_returning_a_dict_is_named(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "summary")
    proc = mpipe("run", cfg, "--quiet", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "consumer.fn tests.result_stages:summary" in proc.stderr, proc.stderr
    assert "got dict" in proc.stderr and "raised" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(("consumer", "total"), [("log_only", None), ("complex_total", 6 + 1j)])
def test_a_consumer_returning_none_or_a_complex_number_is_stored_as_before(
        tmp_path: Path, consumer: str, total: complex | None) -> None:
    proc = mpipe("run", _config(tmp_path, consumer, stage="as_float"), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "results.h5") as f:
        assert (f["total"][()] if "total" in f else None) == total


def test_a_value_whose_array_conversion_raises_fails_its_item_not_its_worker(
        tmp_path: Path) -> None:
    proc = mpipe("run", _config(tmp_path, "total", stage="unarrayable"), "--quiet",
                 cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads((tmp_path / ".mpipe/results/last-run.json").read_text())
    [failure] = doc["failures"]
    assert failure["kind"] == "result" and "refuses to become an array" in failure["message"]


def test_rows_the_writer_rejects_leave_no_total_and_a_replayed_one_is_counted_once(
        tmp_path: Path) -> None:
    # The consumer folds a value as it forwards it to the writer, which may
    # still refuse its row (a shape unlike the first row's): the sealed total
    # included the refused values.  And an item committed by an earlier run,
    # refused when replayed (this run's first row had another shape), was
    # counted skipped and failed: "invariant broken", exit 3, on every resume.
    cfg = _config(tmp_path, "vector_total", stage="three_for_zero")
    text = cfg.read_text().replace("tests.result_stages:numbers}",
                                   "tests.result_stages:numbers_zero_last}")
    cfg.write_text(text.replace("workers: 2", "workers: 1"))
    proc = mpipe("run", cfg, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads((tmp_path / ".mpipe/results/last-run.json").read_text())
    assert doc["counts"]["committed"] == 1
    assert sorted(f["key"] for f in doc["failures"]) == ["1", "2", "3"]
    with h5py.File(tmp_path / "results.h5") as f:
        assert list(f["done"]) == [True, False, False, False]
        assert "total" not in f  # it was 0*3 + 1*2 + 2*2 + 3*2, with the refused rows
    assert "the results file gets no total" in proc.stderr, proc.stderr

    # Items 1-3 are done again first, as rows of 2; "0", replayed, is refused.
    proc = mpipe("run", cfg, cwd=tmp_path, env={"MPIPE_TEST_ZERO_LAST": "1"})
    assert proc.returncode == 1, proc.stderr
    doc = json.loads((tmp_path / ".mpipe/results/last-run.json").read_text())
    counts = doc["counts"]
    assert (counts["produced"], counts["committed"], counts["skipped"]) == (4, 3, 0), counts
    [failure] = doc["failures"]
    assert failure["key"] == "0" and "committed by an earlier run, and stays so" in \
        failure["message"], failure

    # Committed work is never dropped: the next run replays all four, refuses
    # "0" again (its shape still differs), counted once, exit 1, not 3.
    proc = mpipe("run", cfg, cwd=tmp_path, env={"MPIPE_TEST_ZERO_LAST": "1"})
    assert proc.returncode == 1, proc.stderr
    doc = json.loads((tmp_path / ".mpipe/results/last-run.json").read_text())
    counts = doc["counts"]
    assert (counts["produced"], counts["committed"], counts["skipped"]) == (4, 0, 3), counts
    assert doc["stages"]["last"]["done"] == 0, doc["stages"]["last"]
    [failure] = doc["failures"]
    assert failure["key"] == "0" and "earlier run" in failure["message"], failure


@pytest.mark.parametrize(("source", "said"), [
    ("source_returning_none", "the source function returned NoneType, not an iterable of "
     "items: return a list (or any iterable) or yield the items"),
    ("source_with_a_repeated_key", "the source function yielded the key 'a' twice: keys "
     "name items in the ledger and must be unique"),
])
def test_a_source_that_gives_what_mpipe_cannot_take_is_told_so_plainly(
        tmp_path: Path, source: str, said: str) -> None:
    # Was "the source function raised TypeError: 'NoneType' object is not
    # iterable" and, for a repeated key, a traceback into mpipe/producer.py.
    cfg = _config(tmp_path, "total")
    proc = mpipe("run", cfg, "--set", f"source.fn=tests.result_stages:{source}", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert said in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
