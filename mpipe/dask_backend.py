"""Run a stage on a Dask cluster instead of local worker processes.

::

    RUNNER (main thread)                                  DASK CLUSTER
    +-------------------------+  client.submit(run_item,   +-----------+   +----------------+
    | DaskStagePool           |  TaskSpec, WorkItem)       | scheduler |-->| worker thread  |
    |  queue (deque)          |--------------------------->|           |   |  run_item():   |
    |  _attempts: key->item   |   at most `size` at once   +-----------+   |  import fn by  |
    |                         |                                            |  name, read    |
    |  wait_objects():        |  <- ItemDone / ItemFailure (small, pickled |  inputs BY     |
    |   {wake socket: drain}  |     bytes inside) gathered by the          |  PATH, write   |
    +-------------------------+     Dask-Callback-Thread, which queues     |  outputs with  |
              ^                     the outcome and writes one byte        |  atomic_dir    |
              +------------- socketpair <------------------------------------+----------------+

* **runner**: ``dispatch`` submits one Dask task per item, never more than
  ``size`` at once (the runner only dispatches into ``idle()`` capacity), so
  memory stays flat on both sides however many items there are.  Values go
  as the pickled bytes the runner already holds; the task returns pickled
  bytes.  Only paths travel for the notes workload: a task reads its inputs
  and writes its outputs on the worker, through the shared filesystem.
* **Dask-Callback-Thread** (Dask's own, one per process): when a future is
  done it fetches the small result, appends ``(key, outcome)`` to a deque and
  writes a byte to a socket the runner waits on, so the runner's single
  thread wakes at once, never polls, and is the only one to touch the pool.
* **worker thread**: :func:`run_item` builds a :class:`DaskStageContext`
  (``params``, ``path()``, ``output_dir()`` with the local backend's atomic
  semantics) and runs the stage through :func:`mpipe.worker._run_one`, so an
  exception, an unpicklable result or a full disk is classified exactly as on
  the local backend.

Failure semantics match :class:`mpipe.pool.StagePool`: one ``on_done`` or one
retry-or-``on_failed`` per attempt, with the same ``retries`` policy.  A Dask
worker that dies holding an item surfaces as Dask's ``KilledWorker``
(immediately on a LocalCluster we start, where ``allowed-failures`` is 0; after
the scheduler's own retries on a cluster of yours) and is reported with the
item and the worker's address.  An item past ``timeout_s`` is cancelled and
the worker running it restarted through its nanny, since a Python thread
cannot be interrupted.

This is the only module that imports Dask: the local backend never does.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpipe import allocator, imports, procs
from mpipe.context import TimeSpans, WorkdirPaths
from mpipe.errors import ConfigError, MpipeError, PipelineBrokenError
from mpipe.messages import ItemDone, ItemFailure, WorkItem
from mpipe.retry import settle_failed_attempt
from mpipe.worker import WorkerSpec, _run_one

if TYPE_CHECKING:
    # Not at run time: Dask workers import this module for run_item(), and
    # mpipe.config (yaml and the config types, via mpipe.pool) would add to
    # each worker's start for nothing.
    from mpipe.config import DaskConfig, StageConfig

try:
    import dask
    import distributed
    from distributed import KilledWorker, get_worker
except ImportError as exc:  # an optional extra: say how to get it
    raise ConfigError(
        f"the dask backend needs the 'distributed' package, which cannot be imported: {exc}",
        hint="pip install 'mpipe[dask]'",
    ) from exc

logger = logging.getLogger(__name__)

# distributed is only partly annotated; its unannotated API is reached through
# this Any so that `mypy --strict` (no-untyped-call) stays on for the rest.
_dd: Any = distributed

CONNECT_TIMEOUT_S = 20.0
WORKER_WAIT_S = 60.0
CLOSE_TIMEOUT_S = 10.0
# How long the callback thread may wait to fetch a finished result: a result
# lost with its worker is recomputed by Dask before it can be fetched.
RESULT_TIMEOUT_S = 120.0

# Set while *we* start a LocalCluster (never on a cluster of yours).
LOCAL_CLUSTER_CONFIG: dict[str, Any] = {
    # (And the workers' malloc settings, mpipe.allocator.nanny_environ, added
    # by connect: the nanny's default MALLOC_TRIM_THRESHOLD_=65536 made the
    # notes workload ~40% slower, PITFALLS.md.)
    # A worker death fails the task at once with KilledWorker, so that
    # mpipe's own `retries` decide, as on the local backend.
    "distributed.scheduler.allowed-failures": 0,
    # A worker is sent only as many tasks as it has threads: a killed worker
    # then takes down only the items it was actually running.
    "distributed.scheduler.worker-saturation": 1.0,
}


# --------------------------------------------------------------------- session


class DaskSession:
    """A client connected to a scheduler, and the LocalCluster if we started it.

    One per run; the runner calls :meth:`close` in its teardown.
    """

    def __init__(self, client: Any, cluster: Any, where: str) -> None:
        self.client = client
        self.cluster = cluster
        self.where = where
        self.allowed_failures = 0 if cluster is not None else _allowed_failures(client)
        # Restarts of workers stuck past timeout_s take seconds: never in the
        # runner's loop.
        self._restarts = ThreadPoolExecutor(1, thread_name_prefix="mpipe-dask-restart")

    def total_threads(self) -> int:
        return sum(self.client.nthreads().values())

    def restart_worker(self, address: str, then: Callable[[], None]) -> None:
        """Restart one worker through its nanny, in the background; then call ``then``."""
        self._restarts.submit(self._restart, address, then)

    def _restart(self, address: str, then: Callable[[], None]) -> None:
        try:
            status = self.client.restart_workers([address], timeout=30, raise_for_error=False)
        except Exception as exc:
            status = {address: repr(exc)}
        if status.get(address) != "OK":
            logger.warning("could not restart Dask worker %s (%s): the thread stuck past "
                           "timeout_s keeps running there; start workers with a nanny",
                           address, status.get(address))
        then()

    def close(self) -> None:
        self._restarts.shutdown(wait=True, cancel_futures=True)
        for name, thing in (("client", self.client), ("LocalCluster", self.cluster)):
            if thing is None:
                continue
            try:
                thing.close(timeout=CLOSE_TIMEOUT_S)
            except Exception as exc:
                logger.warning("closing the Dask %s failed: %r", name, exc)


def connect(cfg: DaskConfig, keep_freed_memory_mb: int = 0) -> DaskSession:
    """Connect to ``cfg.address``, or start a LocalCluster of ``cfg.local_workers``
    whose workers keep freed memory as local stage workers do (:mod:`mpipe.allocator`)."""
    _quiet_dask_logging()
    if cfg.address is not None:
        try:
            client = _dd.Client(cfg.address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except ValueError as exc:
            raise ConfigError(f"backend.dask.address: {exc}",
                              hint="write it as tcp://host:port") from exc
        except (OSError, TimeoutError) as exc:
            raise PipelineBrokenError(
                f"cannot reach the Dask scheduler at {cfg.address}: {exc}",
                hint="start it (dask scheduler --port PORT) or fix backend.dask.address",
            ) from exc
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except (OSError, TimeoutError) as exc:
            client.close()
            raise PipelineBrokenError(
                f"no Dask worker joined the scheduler at {cfg.address} "
                f"within {WORKER_WAIT_S:.0f}s",
                hint=f"start one: dask worker {cfg.address}") from exc
        session = DaskSession(client, None, cfg.address)
        _warn_about_cluster_settings(session)
        return session
    assert cfg.local_workers is not None  # config validation: exactly one of the two
    try:
        # None removes a variable (distributed.nanny._get_env_variables).
        malloc = {f"distributed.nanny.pre-spawn-environ.{var}": value
                  for var, value in allocator.nanny_environ(keep_freed_memory_mb).items()}
        # The nanny also writes its pre-spawn environment into this process's
        # own (distributed.nanny): put the malloc variables back as they were,
        # or a later run in this process would take them for the user's.
        before = {var: os.environ.get(var) for var in allocator.USER_SETTINGS}
        with dask.config.set({**LOCAL_CLUSTER_CONFIG, **malloc}), _restored(before):
            cluster = _dd.LocalCluster(
                n_workers=cfg.local_workers, threads_per_worker=cfg.threads_per_worker,
                processes=True, host="127.0.0.1", silence_logs=_dask_log_level(),
                # No dashboard; the scheduler's small HTTP server (health,
                # metrics) still starts, on any free port rather than 8787.
                dashboard_address=None,
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                preload=[__name__])  # runs dask_setup() below in each worker
    except Exception as exc:
        raise PipelineBrokenError(f"could not start a Dask LocalCluster of "
                                  f"{cfg.local_workers} workers: {exc!r}") from exc
    try:
        client = _dd.Client(cluster, set_as_default=False)
    except BaseException:
        cluster.close()
        raise
    logger.info("started a Dask LocalCluster of %d workers at %s", cfg.local_workers,
                cluster.scheduler_address)
    return DaskSession(client, cluster, cluster.scheduler_address)


@contextmanager
def _restored(environ: dict[str, str | None]) -> Iterator[None]:
    """Put these variables back as given (None: unset) when the block ends."""
    try:
        yield
    finally:
        for var, value in environ.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, run in each LocalCluster worker process we start.

    Like mpipe's own children they ignore SIGINT and SIGTERM: Ctrl-C and
    systemd signal the whole process group, and the runner alone decides what
    a signal means (in-flight items get ``shutdown_grace_s``, then teardown).
    Otherwise a Ctrl-C kills them mid-item.  They still end with the runner:
    the nanny holds a pipe to each and escalates to SIGKILL on close, and a
    worker exits when that pipe breaks (``distributed.process``).
    """
    try:
        procs.ignore_stop_signals()  # see mpipe.procs: what a stage starts inherits
    except ValueError:  # not the main thread (a worker run in-process)
        pass


def _dask_log_level() -> int:
    # mpipe reports what matters (deaths, retries) itself, with the item;
    # Dask's own records repeat them without it.
    return logging.WARNING if logger.isEnabledFor(logging.DEBUG) else logging.CRITICAL


def _quiet_dask_logging() -> None:
    level = _dask_log_level()
    # Dask's logging config sets some children (distributed.client, ...)
    # explicitly, so the parent's level alone would not reach them.
    names = [name for name in logging.root.manager.loggerDict
             if name.split(".", 1)[0] in ("distributed", "tornado")]
    for name in {"distributed", "tornado", *names}:
        logging.getLogger(name).setLevel(level)


def _allowed_failures(client: Any) -> int:
    try:
        return int(client.run_on_scheduler(_scheduler_allowed_failures))
    except Exception:
        return int(dask.config.get("distributed.scheduler.allowed-failures"))


def _scheduler_allowed_failures(dask_scheduler: Any) -> int:
    return int(dask_scheduler.allowed_failures)


def _malloc_settings() -> dict[str, str]:
    """The malloc variables this process started with: what glibc read (os.environ
    may hold more, set since by Dask's ``distributed.nanny.environ``)."""
    with open("/proc/self/environ", "rb") as f:
        entries = [e.decode(errors="replace").partition("=") for e in f.read().split(b"\0")]
    return {k: v for k, _, v in entries if k in allocator.START_SETTINGS}


def _warn_about_cluster_settings(session: DaskSession) -> None:
    try:
        settings = session.client.run(_malloc_settings)
    except Exception:
        settings = {}
    slow = sorted(addr for addr, environ in settings.items()
                  if allocator.pins_mmap_threshold_low(environ))
    if slow:
        logger.warning(
            "Dask worker(s) %s started with a malloc trim threshold (or top pad) and no "
            "mmap threshold (the nanny's default MALLOC_TRIM_THRESHOLD_=65536): large "
            "numpy temporaries are then mmapped afresh each time, ~40%% slower; see "
            "docs/DISTRIBUTED.md to set both", ", ".join(slow))
    if session.allowed_failures:
        logger.warning(
            "the scheduler at %s retries a task whose worker died up to %d time(s) itself "
            "before mpipe sees KilledWorker and applies `retries`",
            session.where, session.allowed_failures)


# --------------------------------------------------------------------- worker side


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What a Dask task needs besides its item; small and picklable."""

    stage: str
    fn: str
    params: dict[str, Any]
    workdir: str
    fsync: bool
    allow_outside_workdir: bool
    # Where the stage's top-level module lives on the runner's machine: added
    # to sys.path on a worker that cannot import it otherwise (a module next
    # to the pipeline file, on a shared filesystem).
    module_root: str | None = None
    last_stage: bool = False  # see WorkerSpec


@dataclass
class DaskStageContext(WorkdirPaths):
    """The ``ctx`` a stage function gets on a Dask worker.

    ``params``, ``path()`` and ``output_dir()`` behave exactly as on the local
    backend.  ``io()`` only times its block and ``cpu()`` does nothing: the
    slots that bound one machine's disks and cores are the cluster's business
    here (threads per worker).  ``stop_requested()`` is always False.
    """

    stage: str
    worker: str
    params: dict[str, Any]
    workdir: Path
    fsync: bool
    allow_outside_workdir: bool
    key: str = ""
    attempt: int = 1
    cpu_wait_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    _io_spans: TimeSpans = field(default_factory=TimeSpans, repr=False)
    _commit_spans: TimeSpans = field(default_factory=TimeSpans, repr=False)

    @contextmanager
    def io(self) -> Iterator[None]:
        # Blocks that overlap (nested, other threads) count once, as locally.
        self._io_spans.enter()
        try:
            yield
        finally:
            self._io_spans.exit()

    @contextmanager
    def cpu(self) -> Iterator[None]:
        yield

    def stop_requested(self) -> bool:
        return False


_functions: dict[tuple[str, str | None], tuple[Callable[..., Any], bool]] = {}
_functions_lock = threading.Lock()


def _stage_function(spec: TaskSpec) -> tuple[Callable[..., Any], bool]:
    # Imported once per worker process, by name: the function itself never
    # travels, so a worker runs the code installed (or shared) where it is.
    with _functions_lock:
        found = _functions.get((spec.fn, spec.module_root))
        if found is None:
            module, _, attr = spec.fn.partition(":")
            top = module.split(".", 1)[0]
            if spec.module_root and importlib.util.find_spec(top) is None:
                imports.add_pipeline_dir(Path(spec.module_root))
            fn = getattr(__import__(module, fromlist=[attr]), attr)
            found = _functions[spec.fn, spec.module_root] = (fn, imports.takes_context(fn, 1))
        return found


def run_item(spec: TaskSpec, item: WorkItem) -> ItemDone | ItemFailure:
    """The Dask task: run one item of one stage; never raises."""
    address = _worker_address()
    try:
        fn, with_ctx = _stage_function(spec)
    except Exception as exc:
        return ItemFailure(
            seq=item.seq, key=item.key, stage=spec.stage, worker=address, kind="raised",
            message=f"cannot import {spec.fn} on Dask worker {address}: {exc!r} (install "
            "the module on the workers, or put it on a filesystem they share)")
    ctx = DaskStageContext(stage=spec.stage, worker=address, params=spec.params,
                           workdir=Path(spec.workdir), fsync=spec.fsync,
                           allow_outside_workdir=spec.allow_outside_workdir)
    # The same _run_one as a local worker: the failure kinds are identical.
    if spec.last_stage:
        from mpipe.rows import as_row

        reply, exit_code = _run_one(fn, with_ctx, ctx, item, row_check=as_row)
    else:
        reply, exit_code = _run_one(fn, with_ctx, ctx, item)
    if exit_code is not None and isinstance(reply, ItemFailure):
        # SystemExit in a Dask thread must not end the worker's other tasks.
        message = reply.message.removesuffix("; its worker exits")
        reply = reply._replace(message=f"{message}; the Dask worker is kept")
    return reply


def _worker_address() -> str:
    try:
        return str(get_worker().address)
    except ValueError:  # not on a Dask worker (called directly)
        return f"pid-{os.getpid()}"


# --------------------------------------------------------------------- runner side


@dataclass(eq=False)
class _Attempt:
    item: WorkItem
    future: Any
    deadline: float | None


class _Cancelled:
    """Outcome of a future that Dask cancelled (not us)."""


RESTARTED = "restarted"  # an _outcomes key: a worker restart has finished


class DaskStagePool:
    """A stage run on Dask, with :class:`mpipe.pool.StagePool`'s interface and policy."""

    def __init__(
        self,
        *,
        name: str,
        config: StageConfig,
        workers: int | None,
        session: DaskSession,
        spec: WorkerSpec,
        on_done: Callable[[str, ItemDone], None],
        on_failed: Callable[[str, ItemFailure], None],
        on_fatal: Callable[[MpipeError], None],
        stop_requested: Callable[[], bool] | None = None,
    ) -> None:
        from mpipe.pool import StageStats  # runner side only (see the imports)

        self.name = name
        self.config = config
        self._session = session
        self._client = session.client
        self.size = workers if workers is not None else max(1, session.total_threads())
        self.queue: deque[WorkItem] = deque()
        self.stats = StageStats()
        self._task = TaskSpec(stage=name, fn=spec.fn, params=spec.params, workdir=spec.workdir,
                              fsync=spec.fsync, allow_outside_workdir=spec.allow_outside_workdir,
                              module_root=_module_root(spec.fn), last_stage=spec.last_stage)
        self._on_done = on_done
        self._on_failed = on_failed
        self._on_fatal = on_fatal
        self._stop_requested = stop_requested or (lambda: False)
        self._attempts: dict[str, _Attempt] = {}
        # Filled by Dask's callback thread, emptied by the runner's thread.
        self._outcomes: deque[tuple[str, object]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closed = False
        self._broken = False  # the scheduler is gone: no retry can succeed
        # Workers stuck past timeout_s being restarted.  Nothing is submitted
        # meanwhile: once the stuck task is cancelled the scheduler sees that
        # worker free, and a task it sent there would die in the restart.
        self._restarting = 0

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        logger.info("stage %s runs on Dask at %s, at most %d item(s) in flight",
                    self.name, self._session.where, self.size)
        threads = self._session.total_threads()
        self.stats.dask_threads = threads  # what the run summary's advice is measured against
        if self.config.timeout_s and self.size > threads:
            logger.warning(
                "stage %s: %d items in flight on %d Dask threads: items wait on the scheduler, "
                "and timeout_s=%s counts from submission; set workers <= %d (or auto)",
                self.name, self.size, threads, self.config.timeout_s, threads)

    def processes(self) -> list[BaseProcess]:
        return []  # the cluster's processes are not ours to kill

    def exited_cleanly(self) -> bool:
        return False  # the cluster's workers are not ours to watch

    def shutdown(self, grace_s: float) -> None:
        """Cancel what is still in flight; results arriving later are dropped."""
        if self._closed:
            return
        self._closed = True
        self._cancel([a.future for a in self._attempts.values()])
        self._attempts.clear()
        self._outcomes.clear()
        self._wake_w.close()
        self._wake_r.close()

    # ---------------------------------------------------------------- scheduling

    @property
    def in_flight(self) -> int:
        return len(self._attempts)

    def idle(self) -> int:
        if self._closed or self._broken or self._restarting:
            return 0
        return max(0, self.size - len(self._attempts))

    def busy_workers(self) -> list[str]:
        return [f"a Dask task of {self.name} ({a.item.key})" for a in self._attempts.values()]

    def dispatch(self, limit: int) -> int:
        """Submit queued items, at most ``limit`` and never beyond ``size`` in flight."""
        sent = 0
        for _ in range(min(limit, self.idle(), len(self.queue))):
            item = self.queue.popleft()
            # One prefix per stage, so Dask's duration estimates are per stage.
            key = f"mpipe-{self.name}-{uuid.uuid4().hex}"
            try:
                future = self._client.submit(run_item, self._task, item, key=key, pure=False)
                future.add_done_callback(functools.partial(self._on_future_done, key))
            except Exception as exc:
                self.queue.appendleft(item)
                self._lost_scheduler(f"submitting item {item.key} failed: {exc!r}")
                return sent
            logger.debug("%s: item %s (attempt %d) is Dask task %s", self.name, item.key,
                         item.attempt, key)
            deadline = time.monotonic() + self.config.timeout_s if self.config.timeout_s else None
            self._attempts[key] = _Attempt(item, future, deadline)
            sent += 1
        return sent

    def forget_items(self) -> None:
        """After the grace period: drop what is in flight (it is not committed)."""
        if self._attempts:
            logger.warning("%s: abandoning %d item(s) running on Dask", self.name,
                           len(self._attempts))
        self._cancel([a.future for a in self._attempts.values()])
        self._attempts.clear()

    def next_deadline(self) -> float | None:
        deadlines = [a.deadline for a in self._attempts.values() if a.deadline is not None]
        return min(deadlines) if deadlines else None

    def expire(self, now: float) -> None:
        """Fail or retry items past ``timeout_s``; restart the worker running each."""
        late = [(k, a) for k, a in self._attempts.items()
                if a.deadline is not None and a.deadline <= now]
        if not late:
            return
        running_on = self._running_on({k for k, _ in late})
        for key, attempt in late:
            del self._attempts[key]
            item = attempt.item
            where = running_on.get(key)
            self._cancel([attempt.future])
            if where is not None:
                # The thread cannot be interrupted; only its process can go.
                self._restarting += 1
                self._session.restart_worker(where, self._on_restarted)
            logger.warning("%s: item %s ran past timeout_s=%s on Dask worker %s; cancelled%s",
                           self.name, item.key, self.config.timeout_s, where or "(unknown)",
                           ", restarting that worker" if where else "")
            self.stats.timeouts += 1
            self._attempt_failed(item, ItemFailure(
                seq=item.seq, key=item.key, stage=self.name, worker=where or "dask",
                kind="timeout",
                message=f"ran longer than timeout_s={self.config.timeout_s}s; task cancelled"
                + (f" and Dask worker {where} restarted" if where else ""),
                busy_s=float(self.config.timeout_s or 0.0),
                started_at=time.time() - float(self.config.timeout_s or 0.0),
            ))

    def _running_on(self, keys: set[str]) -> dict[str, str]:
        try:
            processing = self._client.processing()
        except Exception as exc:
            logger.warning("cannot ask the Dask scheduler where tasks run: %r", exc)
            return {}
        return {key: worker for worker, running in processing.items()
                for key in running if key in keys}

    def _cancel(self, futures: list[Any]) -> None:
        if not futures:
            return
        try:
            self._client.cancel(futures)
        except Exception as exc:
            logger.debug("cancelling Dask futures failed: %r", exc)

    # ---------------------------------------------------------------- events

    def wait_objects(self) -> dict[Any, Callable[[], object]]:
        return {} if self._closed else {self._wake_r: self._on_wakeup}

    def _on_restarted(self) -> None:
        self._outcomes.append((RESTARTED, None))  # the restart thread
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # closed at shutdown, or full: the runner is awake already

    def _on_future_done(self, key: str, future: Any) -> None:
        # Dask's callback thread.  Fetching the result here keeps the
        # runner's loop from ever blocking on the network.
        outcome: object
        status = future.status
        try:
            if status == "cancelled":
                outcome = _Cancelled()
            elif status == "error":
                outcome = future.exception(timeout=RESULT_TIMEOUT_S)
            else:  # finished, or lost with its worker and being recomputed
                outcome = future.result(timeout=RESULT_TIMEOUT_S)
        except BaseException as exc:
            # Whatever happened, the runner must hear of this attempt once:
            # an attempt with no outcome would stay in flight for ever.
            outcome = exc
        self._outcomes.append((key, outcome))
        self._wake()

    def _on_wakeup(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while self._outcomes:
            key, outcome = self._outcomes.popleft()
            if key == RESTARTED:
                self._restarting -= 1
                continue
            attempt = self._attempts.pop(key, None)
            if attempt is None:
                continue  # timed out or abandoned already: a late answer
            attempt.future.release()
            self._settle(attempt.item, outcome)

    def _settle(self, item: WorkItem, outcome: object) -> None:
        if isinstance(outcome, ItemDone):
            self._done(outcome)
        elif isinstance(outcome, ItemFailure):
            self._attempt_failed(item, outcome)
        elif isinstance(outcome, KilledWorker):
            address = str(getattr(outcome.last_worker, "address", outcome.last_worker))
            self.stats.deaths += 1
            logger.warning("%s: Dask worker %s died while running item %s",
                           self.name, address, item.key)
            self._attempt_failed(item, ItemFailure(
                seq=item.seq, key=item.key, stage=self.name, worker=address, kind="died",
                message=f"Dask worker {address} died while running it (KilledWorker after "
                f"{outcome.allowed_failures + 1} worker death(s)): the OS may have killed it "
                "for running out of memory (check the worker's log and dmesg)",
            ))
        elif isinstance(outcome, _Cancelled):
            if self._client.status not in ("running", "connecting"):
                self._lost_scheduler(f"client {self._client.status}")
            self._attempt_failed(item, ItemFailure(
                seq=item.seq, key=item.key, stage=self.name, worker="dask", kind="died",
                message="Dask cancelled the task (the scheduler restarted or lost this client)"))
        else:
            hint = (" (are mpipe and the stage's modules installed on the workers?)"
                    if isinstance(outcome, ImportError) else "")
            self._attempt_failed(item, ItemFailure(
                seq=item.seq, key=item.key, stage=self.name, worker="dask", kind="raised",
                message=f"Dask could not run the task: {type(outcome).__name__}: {outcome}"
                + hint))

    def _lost_scheduler(self, why: str) -> None:
        if self._broken:
            return
        self._broken = True
        self._on_fatal(PipelineBrokenError(
            f"lost the Dask scheduler at {self._session.where} ({why})",
            hint="check the scheduler; run the same command again to resume"))

    def _done(self, reply: ItemDone) -> None:
        self.stats.record(reply)
        self._on_done(self.name, reply)

    def _attempt_failed(self, item: WorkItem, failure: ItemFailure) -> None:
        settle_failed_attempt(
            stage=self.name, item=item, failure=failure, retries=self.config.retries,
            may_retry=not (self._broken or self._stop_requested()), stats=self.stats,
            queue=self.queue, on_failed=self._on_failed, on_fatal=self._on_fatal)


def _module_root(fn: str) -> str | None:
    top = fn.partition(":")[0].split(".", 1)[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if found is None:
        return None
    if found.submodule_search_locations:
        return str(Path(next(iter(found.submodule_search_locations))).parent)
    return str(Path(found.origin).parent) if found.origin else None
