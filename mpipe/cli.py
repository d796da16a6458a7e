"""The ``mpipe`` command line.  The one place that turns errors into exit codes.

Exit codes: 0 all done; 1 some items failed; 2 config or usage error; 3 the
pipeline broke; 70 a bug in mpipe (traceback printed); 74 output error (disk
full, EIO); 75 another run holds the workdir; 130 / 143 interrupted by SIGINT /
SIGTERM; 141 stdout closed early (``mpipe plan ... | head``).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import select
import signal
import stat
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpipe import __version__, logsetup
from mpipe.errors import ConfigError, InternalError, MpipeError, OutputError, RunLockedError

if TYPE_CHECKING:
    # Imported where used: `mpipe run` starts the forkserver before paying for
    # yaml, the config and rich (see mpipe.forkserver).
    from rich.console import Console

    from mpipe.config import LoadedConfig
    from mpipe.sealer import Sealer

logger = logging.getLogger("mpipe")

COMMANDS_HELP = """\
commands (`mpipe COMMAND --help` for details):
  run CONFIG        run a pipeline: live progress, then a summary naming the bottleneck
                    [--fresh] [--limit N] [--report PATH] [--quiet]
                    [--progress | --no-progress] [--progress-interval SECONDS]
  validate CONFIG   check a config; exit 0 if valid, 2 if not
  plan CONFIG       the resolved topology, where outputs go, what a resume would skip
                    [--items]
  report REPORT     print a run report's summary [--plot OUT.png]
  tune CONFIG       measure worker counts on a sample and recommend them
                    [--workers N,N,...] [--limit N] [--write] [--keep]
                    [--trial-timeout SECONDS]
  bench             measure mpipe against its peers

flags of run, validate, plan and tune:
  --set KEY=VALUE   override a config value by dotted path (repeatable; VALUE is YAML)
and of those and report:
  --log-level L     DEBUG, INFO, WARNING (default), ERROR
  --log-file PATH   append log records to PATH instead of stderr
  --log-format F    text (default) or json (one object per line)

exit codes: 0 done, 1 items failed, 2 config/usage error, 3 pipeline broken,
70 a bug in mpipe, 74 output error, 75 workdir locked by another run,
130/143 interrupted"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    # nan passed `<= 0` and made the progress line spin; inf overflowed its timer.
    if not 0 < value < MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be > 0 and < {MAX_SECONDS:.0f} (got {text})")
    return value


MAX_SECONDS = 864_000.0  # ten days, as config.MAX_WAIT_S bounds the YAML's durations


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {text})")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part.strip()]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; given the ``command`` about to run, only what it needs.

    `mpipe bench`'s arguments live in mpipe.bench, whose import (with
    platform's) made building the parser take 24 ms instead of 6, before
    `mpipe run` could start its forkserver.
    """
    parser = argparse.ArgumentParser(
        prog="mpipe",
        description="Run config-driven, multiprocess batch pipelines.",
        epilog=COMMANDS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_logging(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log-level", default="WARNING",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="log level for mpipe and its processes (default WARNING)")
        p.add_argument("--log-file", type=Path, metavar="PATH",
                       help="append log records to PATH instead of stderr (created if "
                       "missing; errors that end the command still go to stderr)")
        p.add_argument("--log-format", default="text", choices=logsetup.FORMATS,
                       help="text (default) or json: one JSON object per line with ts, "
                       "level, process, pid, logger, message")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", type=Path, help="the pipeline YAML file")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="override a config value by dotted path, e.g. "
                       "--set stages.compute.workers=2 (repeatable; VALUE is YAML)")
        with_logging(p)

    run = sub.add_parser(
        "run", help="run a pipeline",
        description="Run a pipeline: live progress while it runs (a display on a terminal, "
        "plain lines otherwise), then a summary table per stage that names the bottleneck. "
        "The JSON report goes to <workdir>/.mpipe/<pipeline>/last-run.json.")
    with_config(run)
    run.add_argument("--fresh", action="store_true",
                     help="forget committed items and redo everything")
    run.add_argument("--report", type=Path, metavar="PATH",
                     help="also write the JSON run report here")
    run.add_argument("--quiet", action="store_true",
                     help="no progress and no summary (errors still go to stderr)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="show progress (default: a live display when stdout is a terminal, "
                     "a plain line every --progress-interval seconds when it is not)")
    run.add_argument("--progress-interval", type=_positive_float, default=10.0,
                     metavar="SECONDS",
                     help="seconds between plain progress lines when stdout is not a "
                     "terminal (default 10)")
    run.add_argument("--limit", type=_positive_int, metavar="N",
                     help="take only the first N items of the source (a sample run)")

    validate = sub.add_parser("validate", help="check a config; exit 0 if valid, 2 if not")
    with_config(validate)

    plan = sub.add_parser(
        "plan", help="print the resolved topology without running",
        description="Print the resolved topology (stages, workers, queues and their bounds, "
        "io and cpu slots), where outputs go, and what a resumed run would skip.")
    with_config(plan)
    plan.add_argument("--items", action="store_true",
                      help="also run the source function (not the stages) to count exactly "
                      "which items a run would skip and which it would redo")

    rep = sub.add_parser(
        "report", help="summarise a run report; --plot draws its timeline",
        description="Print the summary of a JSON run report (the bottleneck included) and, "
        "with --plot, draw its timeline: one row per worker, busy/IO/idle.")
    rep.add_argument("report", type=Path, metavar="REPORT.json",
                     help="a run report, e.g. <workdir>/.mpipe/<pipeline>/last-run.json")
    rep.add_argument("--plot", type=Path, metavar="OUT.png",
                     help="draw the timeline to this file (png, svg or pdf; needs "
                     "pip install 'mpipe[plot]')")
    with_logging(rep)

    tune = sub.add_parser(
        "tune", help="measure worker counts on a sample and recommend them",
        description="Run a short sample of the workload (mpipe run --limit N) with several "
        "worker counts per stage, in a scratch workdir under <workdir>/.mpipe/tune/ (the real "
        "output_dirs, results and ledger untouched), print items/s and CPU % per count and "
        "recommend counts; --write puts them in the YAML, keeping its comments.")
    with_config(tune)
    tune.add_argument("--workers", type=_int_list, metavar="N,N,...",
                      help="worker counts to try per stage (default: 1, cores, 2*cores, and "
                      "3*cores with fsync on)")
    tune.add_argument("--limit", type=_positive_int, metavar="N",
                      help="items per sample run (default: max(8, 2 * the largest count))")
    tune.add_argument("--write", action="store_true",
                      help="write the recommended counts into CONFIG (needs pip install "
                      "'mpipe[tune]')")
    tune.add_argument("--keep", action="store_true",
                      help="keep the scratch workdir and the trial reports")
    tune.add_argument("--trial-timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                      help="give up on a sample run after this long (default 600)")

    bench = sub.add_parser("bench", help="measure mpipe against its peers and the floor")
    if command in (None, "bench"):
        from mpipe.bench import add_arguments as add_bench_arguments

        add_bench_arguments(bench)
    return parser


# Set by `mpipe run` when this process ran none of the pipeline's own code
# (no `prepare`): only then may entry() skip the interpreter's tear-down.
_skip_teardown = False


def entry() -> None:
    """The ``mpipe`` command: :func:`main`, then, after ``mpipe run``, a quick exit.

    A normal exit frees every module and object of the interpreter (some 300
    modules after a run) once the atexit handlers have run: 30-60 ms at the
    end of every run, for memory the kernel frees at once anyway.  So once the
    atexit handlers have run (logging flushed, multiprocessing's finalizers)
    and stdout and stderr are flushed, a run's process ends with ``os._exit``.
    Not when the process ran user code (a ``prepare`` function, whose objects
    might rely on garbage collection to flush a file), nor when a profiler or
    tracer hosts mpipe (it reports after SystemExit), nor while a non-daemon
    thread runs, nor when a stream cannot be flushed: those take the normal way out.
    """
    main_module = sys.modules["__main__"]
    if getattr(main_module, "__spec__", None) is None:
        # The console script has no module spec, so multiprocessing re-runs the
        # script file in every child it starts (as __mp_main__: mpipe.cli's
        # imports, some 6 ms of CPU per child).  Preloading "__main__" in the
        # forkserver would avoid that, but does nothing before Python 3.13.8
        # (CPython gh-126631).  Named as `python -m mpipe` names it, children
        # skip the step.
        import importlib.util

        main_module.__spec__ = importlib.util.find_spec("mpipe.__main__")
    try:
        main()
    except SystemExit as exc:
        if _skip_teardown and (exc.code is None or isinstance(exc.code, int)):
            from mpipe.forkstart import hosted  # imported by `mpipe run` already

            if not hosted():
                _exit_now(exc.code or 0)
        raise


def _exit_now(code: int) -> None:
    import atexit
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None when the shell closed it (`2>&-`)
                stream.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    _streams_that_exist()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        logsetup.configure(getattr(logging, getattr(args, "log_level", "WARNING")),
                           log_file=getattr(args, "log_file", None),
                           log_format=getattr(args, "log_format", "text"))
    except OSError as exc:
        print(f"mpipe: error: cannot open the log file {args.log_file}: {exc.strerror}",
              file=sys.stderr)
        sys.exit(2)
    global _log_json, _log_to_file
    _log_json = getattr(args, "log_format", "text") == "json"
    _log_to_file = getattr(args, "log_file", None) is not None
    try:
        if args.command == "run":
            from mpipe import forkserver

            forkserver.start(fork=True)
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that left shows here, not at interpreter exit
    except MpipeError as exc:
        _print_error(exc)
        code = exc.exit_code
    except KeyboardInterrupt:
        _say("interrupted", exit_code=130)
        code = 130
    except OSError as exc:
        code = _stdout_failed(exc)
    except Exception:
        code = _internal_error()
    sys.exit(code)


def _stdout_failed(exc: OSError) -> int:
    """An OSError out of a command that mpipe did not turn into one of its errors."""
    if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
        # `mpipe plan ... | head`: the reader left; nothing to say to it.
        _silence_stdout()
        return 128 + signal.SIGPIPE
    if exc.errno in OUTPUT_ERRNOS:
        # A full or failing disk under a write mpipe has no message for, most
        # often stdout's (`> /dev/full`, `> log` on a full disk): said so only
        # if stdout fails again (what it could not write is still buffered).
        where = exc.filename
        if where is None:
            try:
                sys.stdout.flush()
            except OSError:
                where = "standard output"
                _silence_stdout()
        _say(f"error: cannot write{f' to {where}' if where else ''}: {exc.strerror}",
             exit_code=OutputError.exit_code)
        return OutputError.exit_code
    return _internal_error()


OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


def _silence_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered then goes nowhere quietly,
    instead of failing again at the interpreter's exit (which would exit 120)."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll says POLLERR)."""
    try:
        if not stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode):
            return False
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _internal_error() -> int:
    _say(f"internal error: a bug in mpipe {__version__}; please report it with "
         "its traceback. Committed items are kept: the same command resumes.",
         exit_code=InternalError.exit_code, exc_info=True)
    return InternalError.exit_code


def _streams_that_exist() -> None:
    """Started with stdin, stdout or stderr closed (a cron line ending in ``>&-
    2>&-``), Python has None for them and every print would raise, and the next
    file or pipe opened would take their descriptor: a child writing to "its
    stderr" would write into it.  They are pointed at /dev/null, as ``>/dev/null``
    would have, before anything else is opened."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)  # inheritable, as 0-2 are
                os.close(null)
            else:
                os.set_inheritable(fd, True)  # os.open's are not: children need it
    for name, fd in (("stdout", 1), ("stderr", 2)):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "w", closefd=False))  # noqa: SIM115 (kept for the run)


def _console() -> Console:
    from rich.console import Console

    class PipeAwareConsole(Console):
        def on_broken_pipe(self) -> None:
            # rich's own exits 1 ("some items failed" to a cron wrapper) from
            # inside the command; main() tells a reader that left (141).
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    # A pipe has no width: rich would assume 80 columns and fold the table; a
    # log (cron, a journal) keeps each sentence on one line. The table itself
    # takes only the width its columns need.
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    return PipeAwareConsole(file=sys.stdout, width=None if wide else 1000)


def _load(args: argparse.Namespace, *,
          meanwhile: Callable[[], object] | None = None) -> LoadedConfig:
    """Load and check the config; ``mpipe run`` checks the names in a child,
    and calls ``meanwhile`` while that child works."""
    from mpipe import imports
    from mpipe.config import load_config
    from mpipe.state import RunPaths

    # `mpipe run` takes an input that validated before without pydantic;
    # `validate`, `plan` and `tune` always validate.
    loaded = load_config(args.config, args.overrides, remembered=args.command == "run")
    cfg = loaded.config
    imports.add_pipeline_dir(loaded.base_dir)
    named = [("source.fn", cfg.source.fn)]
    named += [(f"stages.{n}.fn", s.fn) for n, s in cfg.stages.items()]
    if cfg.consumer:
        named.append(("consumer.fn", cfg.consumer.fn))
    if cfg.prepare:
        named.append(("prepare.fn", cfg.prepare.fn))
    # Imported before anything starts: a misspelt name is a config error (exit
    # 2) with its YAML line, and no run state is created.  `mpipe run` imports
    # them in a child of its forkserver, which has numpy loaded already.
    checks = [(key, fn, loaded.where(key)) for key, fn in named]
    if args.command == "run":
        from mpipe import forkserver

        # Not with a prepare: a process it forks and leaves running would hold
        # the sealer's pipes open.
        code = forkserver.check_names(checks, cfg.allowed_modules, loaded.base_dir,
                                      getattr(logging, args.log_level),
                                      meanwhile if cfg.prepare is None else None)
    else:
        code = imports.check_names(checks, cfg.allowed_modules, loaded.base_dir)
    loaded = dataclasses.replace(loaded, code=code)
    if any(loaded.stage_backend(name) == "dask" for name in cfg.stages):
        # A missing `mpipe[dask]` extra is a config error found before anything starts.
        import mpipe.dask_backend  # noqa: F401
    RunPaths.for_config(loaded)  # path checks
    return loaded


def cmd_validate(args: argparse.Namespace) -> int:
    loaded = _load(args)
    print(f"{loaded.path}: valid")
    return 0


def _where_outputs_go(paths: Any) -> list[str]:
    lines = [f"  results   {paths.results}"
             + ("  (exists: replaced whole at the end of a run)" if paths.results.exists()
                else "  (not written yet)")]
    for d in paths.output_dirs:
        if d.is_dir():
            state = f"exists, {sum(1 for _ in d.iterdir())} entries"
        else:
            state = "created by the run"
        lines.append(f"  outputs   {d}  ({state}; checked writable before any compute)")
    lines.append(f"  report    {paths.default_report}")
    return lines


def _resume_summary(loaded: LoadedConfig, paths: Any, exact: bool) -> list[str]:
    import sqlite3

    from mpipe import ledger

    cfg = loaded.config
    committed = ledger.open_for_reading(paths.ledger)
    if committed is None:
        return [f"  ledger    {paths.ledger}",
                "  resume    nothing committed yet: a run does every item"]
    try:
        held = committed.count()
    except sqlite3.Error as exc:
        return [f"  ledger    {paths.ledger}", f"  resume    the ledger cannot be read ({exc})"]
    finally:
        committed.close()
    lines = [f"  ledger    {paths.ledger}",
             f"  resume    the ledger holds {held} committed item(s) of pipeline "
             f"{cfg.pipeline}: a run skips each whose config, stage code, value and input "
             "files are unchanged and whose outputs exist",
             f"            --fresh would forget them and redo all {held}"]
    if exact:
        skip, redo = _count_skips(loaded, paths)
        lines.append(f"  items     the source yields {skip + redo}: a run would skip {skip} "
                     f"and do {redo}")
    else:
        lines.append("            (mpipe plan --items runs the source to count exactly)")
    return lines


def _count_skips(loaded: LoadedConfig, paths: Any) -> tuple[int, int]:
    """What the producer would decide for each item, without starting it."""
    from mpipe import imports, ledger
    from mpipe.errors import PipelineBrokenError
    from mpipe.messages import Task, dumps
    from mpipe.producer import SourceContext, item_fingerprint
    from mpipe.state import config_fingerprint

    cfg = loaded.config
    fn = imports.resolve(cfg.source.fn, "source.fn", cfg.allowed_modules, loaded.base_dir,
                         where=loaded.where("source.fn"))
    ctx = SourceContext(dict(cfg.params), paths.workdir, cfg.allow_outside_workdir)
    config_fp = config_fingerprint(cfg, loaded.code)
    committed = ledger.open_for_reading(paths.ledger)
    skip = redo = 0
    try:
        for index, raw in enumerate(imports.call_with_optional_context(fn, ctx=ctx)):
            task = raw if isinstance(raw, Task) else Task(key=str(index), value=raw)
            entry = committed.lookup(task.key) if committed else None
            if entry is None:
                redo += 1
                continue
            fingerprint = item_fingerprint(config_fp, task, dumps(task.value), ctx)
            if entry.fingerprint == fingerprint and all(ctx.path(p).exists()
                                                        for p in task.outputs):
                skip += 1
            else:
                redo += 1
    except MpipeError:
        raise
    except Exception as exc:
        raise PipelineBrokenError(f"the source function raised {type(exc).__name__}: {exc}"
                                  ) from exc
    finally:
        if committed is not None:
            committed.close()
    return skip, redo


def _freed_memory_plan(keep_mb: int) -> str:
    from mpipe import allocator

    if allocator.user_has_chosen():
        return ("the C library's malloc thresholds from the environment (MALLOC_*_THRESHOLD_ "
                "or GLIBC_TUNABLES); keep_freed_memory_mb is not applied")
    if keep_mb == 0:
        return "stage workers use the C library's malloc settings (keep_freed_memory_mb: 0)"
    return (f"stage workers keep freed memory for their next items until {keep_mb} MiB is "
            "free (keep_freed_memory_mb; glibc's malloc only; on Dask, a LocalCluster mpipe "
            "starts)")


def cmd_plan(args: argparse.Namespace) -> int:
    from mpipe.state import RunPaths

    loaded = _load(args)
    cfg = loaded.config
    paths = RunPaths.for_config(loaded)
    print(f"pipeline {cfg.pipeline}  (config {loaded.path})")
    print(f"  workdir   {paths.workdir}")
    if cfg.prepare:
        print(f"  prepare   {cfg.prepare.fn}  (once, before the pipeline, under the run lock)")
    print(f"  source    {cfg.source.fn}  -> queue of {cfg.source.queue_size}")
    for name, s in cfg.stages.items():
        if loaded.stage_backend(name) == "dask":
            # No local workers or slots: the cluster's threads run it (as many
            # at once as `workers`, or all of them with auto).
            at_once = "the cluster's threads" if s.workers == "auto" else str(s.workers)
            print(f"  stage     {name}: {s.fn}  on Dask, items at once={at_once} "
                  f"retries={s.retries} timeout_s={s.timeout_s}")
            continue
        print(f"  stage     {name}: {s.fn}  workers={loaded.worker_count(name)} "
              f"queue_size={s.queue_size} io_slots={s.io_slots or loaded.worker_count(name)} "
              f"retries={s.retries} timeout_s={s.timeout_s}"
              + ("  (auto: the usable cores)" if s.workers == "auto" else ""))
    print(f"  cpu_slots {loaded.cpu_slot_count()} (shared by all stages)")
    print(f"  memory    {_freed_memory_plan(cfg.keep_freed_memory_mb)}")
    print(f"  consumer  {cfg.consumer.fn if cfg.consumer else '(none)'}")
    print(f"  writer    {paths.results}  (queue {cfg.writer.queue_size}, fsync={cfg.fsync})")
    for line in _where_outputs_go(paths):
        print(line)
    for line in _resume_summary(loaded, paths, exact=args.items):
        print(line)
    print(f"  stop      on SIGINT/SIGTERM in-flight items get shutdown_grace_s="
          f"{cfg.shutdown_grace_s:g}s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mpipe import forkserver
    from mpipe.sealer import Sealer

    # The sealer starts while the config's names are checked (mpipe.sealer);
    # the runner stops it, or, if the run never starts, this does.
    sealers: list[Sealer] = []

    def start_sealer() -> None:
        try:
            sealers.append(Sealer(forkserver.context(), getattr(logging, args.log_level)))
        except (OSError, MpipeError) as exc:
            # A limit of the machine's: the run meets it again as it starts
            # its processes, and says so (exit 3, with a report).
            logging.getLogger("mpipe").info("could not start the sealer early: %s", exc)

    try:
        return _run(args, start_sealer, sealers)
    finally:
        for sealer in sealers:
            sealer.stop(grace_s=5.0)  # nothing to do once the runner has stopped it


def _run(args: argparse.Namespace, start_sealer: Callable[[], object],
         sealers: list[Sealer]) -> int:
    from mpipe import imports, progress, report
    from mpipe.runner import Runner

    global _skip_teardown
    if args.report is not None and args.report.is_dir():
        # Found now, not when the run is over and its report cannot be written.
        raise ConfigError(f"--report {args.report}: is a directory",
                          hint="name the report file, e.g. --report run.json")
    loaded = _load(args, meanwhile=start_sealer)
    cfg = loaded.config
    _skip_teardown = cfg.prepare is None
    started = time.time()
    prepare = None
    if cfg.prepare:
        prepare = imports.resolve(cfg.prepare.fn, "prepare.fn", cfg.allowed_modules,
                                  loaded.base_dir, where=loaded.where("prepare.fn"))
    reporter = progress.choose(cfg.pipeline, sys.stdout, enabled=args.progress,
                               quiet=args.quiet, interval_s=args.progress_interval)
    runner = Runner(loaded, fresh=args.fresh, log_level=getattr(logging, args.log_level),
                    prepare=prepare, limit=args.limit, progress=reporter,
                    sealer=sealers[0] if sealers else None,
                    reports=[args.report] if args.report else [])
    # Every run leaves a report for cron and monitoring, even one that could not
    # start.  Not in the default place when the workdir is locked: that one
    # belongs to the run holding the lock.
    targets = [runner.paths.default_report] + ([args.report] if args.report else [])
    try:
        with runner:
            result = runner.run()
    except MpipeError as exc:  # could not start (locked, outputs unwritable), or stopped
        own = targets[1:] if isinstance(exc, RunLockedError) else targets
        _write_reports(report.build(loaded, runner.counts_so_far(exc), exc.exit_code, started),
                       own, failing=exc)
        raise
    except Exception as exc:  # a bug: say so in the report, not leave the last run's
        bug: MpipeError = InternalError(f"{type(exc).__name__}: {exc}")
        status = "internal_error"
        if isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS:  # as main() says
            bug, status = OutputError(f"cannot write: {exc.strerror}"), "broken"
        try:
            doc = report.build(loaded, runner.counts_so_far(bug, status), bug.exit_code,
                               started)
        except Exception:
            pass  # the report's own code may be what failed
        else:
            _write_reports(doc, targets, failing=exc)
        raise
    error = result.error
    exit_code = error.exit_code if error else 0
    doc = report.build(loaded, result, exit_code, started, prepare_s=runner.prepare_s)
    unwritten = _write_reports(doc, targets, failing=error)
    if error is None and unwritten is not None:
        exit_code = unwritten.exit_code  # all went well but the report (printed above)
    if not args.quiet:
        console = _console()
        try:
            console.print(report.render_summary(doc, ascii_only=not console.is_terminal))
            console.print(f"  report: {args.report or runner.paths.default_report}",
                          highlight=False)
        except BrokenPipeError:
            if exit_code == 0:
                raise  # nothing else to tell: the reader left (141)
            # A failed run's code says more than the pipe's: keep it.
            _silence_stdout()
    if error is not None:
        _print_error(error)
    return exit_code


def _print_error(error: MpipeError) -> None:
    notes = "".join(f"\n  also: {note}" for note in getattr(error, "__notes__", ()))
    first_line = error.message.split("\n", 1)[0]
    _say(f"error: {error}{notes}", exit_code=error.exit_code,
         # The log has it whole already (its traceback too): the closing record
         # says how the run ended and why, in a line.
         record=f"exit {error.exit_code}: {first_line} (logged above){notes}"
         if getattr(error, "logged", False) else None)


# Where the closing error goes besides stderr's text: as a log record, in the
# log's own format, when the log is JSON (a collector reading stderr as JSON
# lines would choke on text) or goes to a file (which should hold the outcome).
_log_json = False
_log_to_file = False


def _say(text: str, *, exit_code: int, exc_info: bool = False,
         record: str | None = None) -> None:
    """``mpipe: <text>`` on stderr, and/or a log record of it, or of ``record``
    if given (see above)."""
    if _log_json or _log_to_file:
        logging.getLogger("mpipe").error("%s", record or text, exc_info=exc_info,
                                         extra={"exit_code": exit_code})
    if not _log_json or _log_to_file:
        if exc_info:
            traceback.print_exc()
        print(f"mpipe: {text}", file=sys.stderr)


def _write_reports(doc: dict[str, Any], targets: list[Path], *,
                   failing: BaseException | None = None) -> MpipeError | None:
    """Write the report to each target; print and return the first failure, if any.

    When the run itself is ``failing``, a report that cannot be written is a
    note on that error, printed after it: its cause is often the run's own (a
    file where the state directory should be), and the run's error comes first.
    """
    from mpipe import report

    failed = None
    for target in targets:
        try:
            report.write(doc, target)
        except MpipeError as exc:
            if failing is not None:
                failing.add_note(exc.message)
            else:
                _say(f"error: {exc}", exit_code=exc.exit_code)
            failed = failed or exc
    return failed


def cmd_report(args: argparse.Namespace) -> int:
    from mpipe import report

    doc = report.read(args.report)
    console = _console()
    console.print(report.render_summary(doc, ascii_only=not console.is_terminal))
    if args.plot:
        from mpipe.plot import plot_timeline

        info = plot_timeline(doc, args.plot)
        console.print(f"  timeline: {info.path} ({len(info.rows)} workers, {info.bars} items)",
                      highlight=False)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from rich import box
    from rich.table import Table

    from mpipe.tune import Trial, Tuner, write_workers

    loaded = _load(args)
    console = _console()

    def show(trial: Trial) -> None:
        counts = " ".join(f"{n}={w}" for n, w in trial.workers.items())
        again = " (measured above)" if trial.reused else ""
        console.print(f"  {counts}: {trial.items_per_s:.2f} items/s, CPU {trial.cpu_pct:.0f}%"
                      f"{again}", highlight=False)

    tuner = Tuner(loaded, args.overrides, candidates=args.workers, limit=args.limit,
                  timeout_s=args.trial_timeout, log_level=args.log_level, on_trial=show)
    console.print(f"tuning {loaded.config.pipeline}: up to {tuner.limit} items per sample, worker "
                  f"counts {', '.join(map(str, tuner.candidates))}, {tuner.cores} cores; "
                  f"scratch {tuner.scratch}", highlight=False)
    result = tuner.run(keep=args.keep)
    table = Table(title=f"measured (samples of up to {result.limit} items, {result.cores} cores)",
                  box=box.HEAVY_HEAD if console.is_terminal else box.ASCII)
    table.add_column("stage tuned")
    table.add_column("workers")
    table.add_column("items/s", justify="right")
    table.add_column(f"CPU % of {result.cores} cores", justify="right")
    table.add_column("wall s", justify="right")
    table.add_column("bottleneck")
    for t in result.trials:
        mark = " *" if t.workers == result.recommended else ""
        table.add_row(t.stage, " ".join(f"{n}={w}" for n, w in t.workers.items()) + mark,
                      f"{t.items_per_s:.2f}", f"{t.cpu_pct:.0f}", f"{t.wall_s:.1f}",
                      t.bottleneck or "-")
    console.print(table)
    changes = {n: w for n, w in result.recommended.items() if result.current.get(n) != w}
    for name, n in result.recommended.items():
        was = result.current[name]
        verb = "keep" if n == was else f"change {was} ->"
        console.print(f"recommended: stages.{name}.workers: {verb} {n}", highlight=False)
    if args.write:
        written = write_workers(loaded.path, result.recommended)
        if written:
            console.print(f"wrote {', '.join(written)} to {loaded.path}", highlight=False)
        else:
            console.print(f"{loaded.path} already has these counts", highlight=False)
    elif changes:
        console.print(f"run again with --write to put them in {loaded.path}", highlight=False)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mpipe.bench import main as bench_main

    return bench_main(args)


COMMANDS: dict[str, Any] = {"run": cmd_run, "validate": cmd_validate, "plan": cmd_plan,
                            "report": cmd_report, "tune": cmd_tune, "bench": cmd_bench}
