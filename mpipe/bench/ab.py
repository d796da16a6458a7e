"""``python -m mpipe.bench.ab REV CONFIG...``: this tree against an earlier commit.

A change's own effect, measured as this machine allows: whole ``mpipe run``
processes of the tree at ``REV`` (exported with ``git archive``) and of this
tree, alternating within each pair (the order flips from pair to pair), on the
same configs, each run timed from its start to its exit.  It prints, per
config, both trees' median wall time and the median over pairs of this / REV.
Alternating in the same minutes is what makes a 5% change visible on a machine
that drifts by 20% between ``make bench`` runs.

    .venv/bin/python -m mpipe.bench.ab 0198e35 --pairs 15 \
        bench-results/configs/notes-T0-R0-W2-fsync.yaml

Both trees run as ``python -m mpipe run CONFIG --fresh --quiet`` (as ``make
bench`` runs mpipe) with this interpreter, the tree first on ``PYTHONPATH``,
and bytecode cached under a scratch directory.  The configs' workdirs are
shared by both trees: use configs whose runs may overwrite each other
(``make bench`` writes such configs under ``bench-results/configs``).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _export(rev: str, dest: Path) -> None:
    tar = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev],
                         check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(dest, filter="data")


def _run(tree: Path, config: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mpipe", "run", str(config), "--fresh",
                             "--quiet"], cwd=tree, env={**env, "PYTHONPATH": str(tree)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: mpipe run {config} exited {proc.returncode}:\n"
                         f"{err.decode(errors='replace')[-2000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpipe.bench.ab",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("rev", help="the earlier commit (anything `git archive` takes)")
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--pairs", type=int, default=10)
    opts = parser.parse_args(argv)
    configs = [c.resolve() for c in opts.configs]
    with tempfile.TemporaryDirectory(prefix="mpipe-ab-") as tmp:
        base = Path(tmp) / "base"
        _export(opts.rev, base)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        trees = {opts.rev: base, "this tree": REPO}
        for tree in trees.values():  # untimed: bytecode and page caches
            _run(tree, configs[0], env)
        walls: dict[tuple[str, Path], list[float]] = {}
        for i in range(opts.pairs):
            order = list(trees.items()) if i % 2 == 0 else list(trees.items())[::-1]
            for config in configs:
                for name, tree in order:
                    walls.setdefault((name, config), []).append(_run(tree, config, env))
    for config in configs:
        old, new = walls[(opts.rev, config)], walls[("this tree", config)]
        ratio = statistics.median(n / o for n, o in zip(new, old, strict=True))
        print(f"{config.name}: {opts.rev} {statistics.median(old):.3f} s, this tree "
              f"{statistics.median(new):.3f} s (medians of {opts.pairs}); "
              f"this / {opts.rev} per pair: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
