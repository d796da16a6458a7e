"""Logging for the runner and its children: text or JSON lines, stderr or a file.

``mpipe run --log-file PATH --log-format json`` configures the runner's root
logger here.  The choice is also exported in the environment
(``MPIPE_LOG_FILE``, ``MPIPE_LOG_FORMAT``) before any child starts: the
forkserver, and every child it forks, inherits the environment of the moment it
is started, so :func:`configure_child` can apply the same choice in each child
without widening every process spec.

Several processes append to one log file: each record is one ``write`` of one
line to a file opened with ``O_APPEND``, so lines do not interleave mid-line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import TextIO

logger = logging.getLogger(__name__)

ENV_FILE = "MPIPE_LOG_FILE"
ENV_FORMAT = "MPIPE_LOG_FORMAT"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (journald, Loki, CloudWatch)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created).astimezone().isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "process": self.process,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        exit_code = getattr(record, "exit_code", None)
        if exit_code is not None:  # the closing error of mpipe.cli
            doc["exit_code"] = exit_code
        return json.dumps(doc, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is *now*.

    rich's live display swaps ``sys.stderr`` for a proxy that prints above the
    progress lines; a handler that kept the original stream would tear them.
    """

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # always sys.stderr


def text_format(process: str) -> str:
    return f"%(asctime)s %(levelname)s [{process}] %(name)s: %(message)s"


def configure(level: int, *, log_file: Path | None = None, log_format: str = "text",
              process: str = "runner", export: bool = True) -> None:
    """Configure the root logger; with ``export``, pass the choice on to children."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS} (got {log_format!r})")
    handler: logging.Handler
    if log_file is not None:
        log_file = log_file.expanduser().resolve()
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    else:
        handler = _StderrHandler()
    handler.setFormatter(JsonFormatter(process) if log_format == "json"
                         else logging.Formatter(text_format(process)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    if export:
        if log_file is not None:
            os.environ[ENV_FILE] = str(log_file)
        else:
            os.environ.pop(ENV_FILE, None)
        os.environ[ENV_FORMAT] = log_format


def configure_child(name: str, level: int) -> None:
    """What a child process calls at start-up (see :func:`mpipe.procs.child_setup`)."""
    log_file = os.environ.get(ENV_FILE)
    log_format = os.environ.get(ENV_FORMAT, "text")
    if log_format not in FORMATS:
        log_format = "text"
    configure(level, log_file=Path(log_file) if log_file else None, log_format=log_format,
              process=name, export=False)
