"""The schedules shipped under deploy/ are valid and match mpipe's stop protocol.

Each runs ``mpipe run ... --set shutdown_grace_s=N``; the scheduler's stop
timeout must leave the run N seconds plus a margin to commit and shut down.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpipe.cli import build_parser
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
INSTALL = "/opt/mpipe"  # where the shipped files expect mpipe to be installed
MARGIN_S = 10  # at least this much beyond shutdown_grace_s


def grace_of(args: list[str]) -> float:
    """The shutdown_grace_s a command line pins, checking that it parses as mpipe's CLI."""
    parsed = build_parser().parse_args(args)
    assert parsed.command == "run"
    graces = [float(o.split("=", 1)[1]) for o in parsed.overrides
              if o.startswith("shutdown_grace_s=")]
    assert graces, f"no --set shutdown_grace_s=N in {args}"
    return graces[-1]


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_systemd_units_match_the_grace_period() -> None:
    service = unit(DEPLOY / "systemd/mpipe-notes.service")["Service"]
    timer = unit(DEPLOY / "systemd/mpipe-notes.timer")
    exec_start = shlex.split(service["ExecStart"])
    assert exec_start[0] == f"{INSTALL}/.venv/bin/mpipe"
    grace = grace_of(exec_start[1:])
    assert float(service["TimeoutStopSec"]) >= grace + MARGIN_S
    # SIGTERM to mpipe alone, then mpipe stops its children in order.
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert service["Type"] == "oneshot"
    assert service["StandardOutput"] == "journal" and service["StandardError"] == "journal"
    assert "143" in service["SuccessExitStatus"].split()
    assert timer["Timer"]["Unit"] == "mpipe-notes.service"
    assert timer["Timer"]["OnCalendar"]
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_systemd_units_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed: the units are checked by parsing only")
    # Verify the units as installed here: ExecStart must point at a real executable.
    if not (REPO / ".venv/bin/mpipe").exists():
        pytest.skip("no .venv/bin/mpipe in this checkout to stand for the installed one")
    for name in ("mpipe-notes.service", "mpipe-notes.timer"):
        text = (DEPLOY / "systemd" / name).read_text().replace(INSTALL, str(REPO))
        (tmp_path / name).write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "mpipe-notes.service"),
         str(tmp_path / "mpipe-notes.timer")],
        capture_output=True, text=True, timeout=60)
    # verify only warns (exit 0) about unknown keys and bad values: any word about
    # our files is a failure.
    about_ours = [line for line in (proc.stdout + proc.stderr).splitlines()
                  if "mpipe-notes" in line]
    assert proc.returncode == 0 and not about_ours, proc.stdout + proc.stderr


CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def test_crontab_line_runs_an_existing_command() -> None:
    lines = [line for line in (DEPLOY / "cron/mpipe-notes.crontab").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    [line] = lines
    fields = line.split(None, 5)
    for field, (low, high) in zip(fields[:5], [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)],
                                  strict=True):
        assert CRON_FIELD.match(field), field
        for number in re.findall(r"\d+", field.split("/")[0]):
            assert low <= int(number) <= high, field
    command = fields[5]
    assert "%" not in command, "an unescaped % ends a crontab command"
    cd, _, rest = command.partition(" && ")
    assert shlex.split(cd) == ["cd", INSTALL]
    words = shlex.split(rest)
    args = words[:words.index(">>")] if ">>" in words else words
    program = args[0]
    assert program == ".venv/bin/mpipe"
    # The command exists where the line expects it (this checkout standing for INSTALL).
    installed = REPO / program
    if not installed.exists():
        pytest.skip("no .venv/bin/mpipe in this checkout")
    assert os.access(installed, os.X_OK)
    grace_of(args[1:])
    proc = subprocess.run([str(installed), *args[1:3], "--help"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0 and "--log-format" in proc.stdout, proc.stderr


def test_kubernetes_cronjob() -> None:
    [doc] = list(yaml.safe_load_all((DEPLOY / "kubernetes/mpipe-notes-cronjob.yaml").read_text()))
    assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "CronJob"
    spec: dict[str, Any] = doc["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    [container] = pod["containers"]
    command = [str(c) for c in container["command"]]
    assert command[0] == "mpipe"
    grace = grace_of(command[1:])
    assert pod["terminationGracePeriodSeconds"] >= grace + MARGIN_S
    # The workdir (ledger) must outlive the pod for a retry to resume.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    parsed = build_parser().parse_args(command[1:])
    [workdir] = [o.split("=", 1)[1] for o in parsed.overrides if o.startswith("workdir=")]
    [data] = [name for name, path in mounts.items() if path == workdir]
    assert "persistentVolumeClaim" in volumes[data]


def test_scheduling_doc_links_every_shipped_file() -> None:
    doc = (REPO / "docs/SCHEDULING.md").read_text()
    shipped = sorted(p.relative_to(REPO) for p in DEPLOY.rglob("*") if p.is_file())
    assert shipped
    for path in shipped:
        assert f"](../{path})" in doc, f"docs/SCHEDULING.md does not link {path}"
