"""The ``mpipe`` command line.  The one place that turns errors into exit codes.

Exit codes: 0 all done; 1 some items failed; 2 config or usage error; 3 the
pipeline broke; 74 output error (disk full, EIO); 75 another run holds the
workdir; 130 / 143 interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpipe import __version__
from mpipe.config import LoadedConfig, load_config
from mpipe.errors import MpipeError

logger = logging.getLogger("mpipe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpipe",
        description="Run config-driven, multiprocess batch pipelines.",
        epilog="exit codes: 0 done, 1 items failed, 2 config/usage error, 3 pipeline broken, "
        "74 output error, 75 workdir locked by another run, 130/143 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"mpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", type=Path, help="the pipeline YAML file")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="override a config value by dotted path, e.g. "
                       "--set stages.compute.workers=2 (repeatable; VALUE is YAML)")
        p.add_argument("--log-level", default="WARNING",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="log level for mpipe and its processes (default WARNING)")

    run = sub.add_parser("run", help="run a pipeline")
    with_config(run)
    run.add_argument("--fresh", action="store_true",
                     help="forget committed items and redo everything")
    run.add_argument("--report", type=Path, metavar="PATH",
                     help="also write the JSON run report here")
    run.add_argument("--quiet", action="store_true", help="print no summary")

    validate = sub.add_parser("validate", help="check a config; exit 0 if valid, 2 if not")
    with_config(validate)

    plan = sub.add_parser("plan", help="print the resolved topology without running")
    with_config(plan)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s [runner] %(name)s: %(message)s")
    try:
        code = COMMANDS[args.command](args)
    except MpipeError as exc:
        print(f"mpipe: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("mpipe: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def _load(args: argparse.Namespace) -> LoadedConfig:
    from mpipe import imports
    from mpipe.state import RunPaths

    loaded = load_config(args.config, args.overrides)
    cfg = loaded.config
    imports.add_pipeline_dir(loaded.base_dir)
    named = [("source.fn", cfg.source.fn)]
    named += [(f"stages.{n}.fn", s.fn) for n, s in cfg.stages.items()]
    if cfg.consumer:
        named.append(("consumer.fn", cfg.consumer.fn))
    if cfg.prepare:
        named.append(("prepare.fn", cfg.prepare.fn))
    for key, fn in named:
        imports.resolve(fn, key, cfg.allowed_modules, loaded.base_dir, where=loaded.where(key))
    RunPaths.for_config(loaded)  # path checks
    return loaded


def cmd_validate(args: argparse.Namespace) -> int:
    loaded = _load(args)
    print(f"{loaded.path}: valid")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from mpipe.state import RunPaths

    loaded = _load(args)
    cfg = loaded.config
    paths = RunPaths.for_config(loaded)
    print(f"pipeline {cfg.pipeline}  (config {loaded.path})")
    print(f"  workdir   {paths.workdir}")
    print(f"  source    {cfg.source.fn}  -> queue of {cfg.source.queue_size}")
    for name, s in cfg.stages.items():
        print(f"  stage     {name}: {s.fn}  workers={loaded.worker_count(name)} "
              f"queue_size={s.queue_size} io_slots={s.io_slots or loaded.worker_count(name)} "
              f"retries={s.retries} timeout_s={s.timeout_s}")
    print(f"  cpu_slots {loaded.cpu_slot_count()} (shared by all stages)")
    print(f"  consumer  {cfg.consumer.fn if cfg.consumer else '(none)'}")
    print(f"  writer    {paths.results}  (queue {cfg.writer.queue_size}, fsync={cfg.fsync})")
    print(f"  ledger    {paths.ledger}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mpipe import imports, report
    from mpipe.runner import Runner

    loaded = _load(args)
    cfg = loaded.config
    started = time.time()
    prepare = None
    if cfg.prepare:
        prepare = imports.resolve(cfg.prepare.fn, "prepare.fn", cfg.allowed_modules,
                                  loaded.base_dir, where=loaded.where("prepare.fn"))
    with Runner(loaded, fresh=args.fresh, log_level=getattr(logging, args.log_level),
                prepare=prepare) as runner:
        result = runner.run()
    error = result.error
    exit_code = error.exit_code if error else 0
    doc = report.build(loaded, result, exit_code, started)
    report.write(doc, runner.paths.default_report)
    if args.report:
        report.write(doc, args.report)
    if not args.quiet:
        print(report.summary(doc))
    if error is not None:
        print(f"mpipe: error: {error}", file=sys.stderr)
    return exit_code


COMMANDS: dict[str, Any] = {"run": cmd_run, "validate": cmd_validate, "plan": cmd_plan}
