"""No process of a run starts a subprocess of its own.

Every process of an ``mpipe run`` is a fork of the runner or of its forkserver,
so an audit hook (PEP 578) installed in the runner by a ``sitecustomize``
module is in all of them.  A subprocess costs its parent a fork and an exec
(``uname -p``, run by h5py's import through ``platform``, cost the writer and
the sealer about 11 ms each).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.conftest import REPO, check_against_reference, make_inputs, mpipe, notes_config

_HOOK = '''\
import os, sys

def _hook(event, args, _path=os.environ["MPIPE_TEST_SUBPROCESS_LOG"]):
    if event in ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.system"):
        with open(_path, "a") as f:
            f.write(f"{os.getpid()} {event} {args[0] if args else ''}\\n")

sys.addaudithook(_hook)
'''


def test_a_run_starts_no_subprocess(tmp_path: Path) -> None:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(textwrap.dedent(_HOOK))
    log = tmp_path / "subprocesses.log"
    work = tmp_path / "work"
    work.mkdir()
    make_inputs(work, 2)
    cfg = notes_config(work, tasks=2, repeat=0)

    proc = mpipe("run", cfg, "--quiet", cwd=work, env={
        "PYTHONPATH": f"{hook_dir}:{REPO}", "MPIPE_TEST_SUBPROCESS_LOG": str(log)})

    assert proc.returncode == 0, proc.stderr
    check_against_reference(work, 2, 0)  # the writer and the sealer did import h5py
    assert not log.exists(), log.read_text()
