"""Large values between quick stages: the runner and a worker never block each other.

Both send on their pipe, and a send larger than the socket buffer waits for the
other side to read.  Values of 1 MB through two quick stages made the runner
send a prefetching worker more work while that worker was sending its answers:
each waited for the other, for ever (5 of 6 runs, before mpipe.pool's
"never two blocked senders").
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import h5py
import numpy as np

from tests.conftest import mpipe


def test_large_values_through_quick_stages_never_deadlock(tmp_path: Path) -> None:
    n = 300
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        pipeline: large
        workdir: .
        params: {{n: {n}, size: 1000000}}
        source: {{fn: tests.large_values:blobs}}
        stages:
          a: {{fn: tests.large_values:same, workers: 1}}
          b: {{fn: tests.large_values:digest_head, workers: 1}}
        writer: {{path: results.h5}}
        allowed_modules: [tests.large_values]
        fsync: false
        """))
    proc = mpipe("run", cfg, "--quiet", cwd=tmp_path, timeout=90)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "results.h5") as f:
        np.testing.assert_array_equal(f["results"][:], np.arange(n, dtype=float))
