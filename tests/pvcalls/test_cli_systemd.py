"""The systemd unit of pvcalls-backend serve (contrib/systemd/), held to the
command line it runs, so that the two cannot drift apart: its ExecStart
parses as serve's arguments, and the exit statuses it names are the ones
serve documents.  (What serve tells systemd is tested with the rest of its
life, in test_cli_lifecycle.)"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import BIN, TIMEOUT

import pvcalls._cli as cli

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "contrib" / "systemd" / "pvcalls-backend.service"


def unit_settings(text: str) -> dict[str, list[str]]:
    """``"Section.Key"`` -> its values, in order, of a unit file (one
    setting a line: the unit continues none)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        assert not line.endswith("\\"), f"a continued line: {line}"
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def documented_exit_statuses() -> dict[int, str]:
    """Status -> meaning, from the list ``pvcalls-backend serve --help``
    ends with."""
    epilog = cli._parser()[1]["serve"].epilog or ""
    _, _, table = epilog.partition("exit status:\n")
    statuses: dict[int, str] = {}
    status = None
    for line in table.splitlines():
        if match := re.fullmatch(r"  (\d+) +(.*)", line):
            status = int(match[1])
            statuses[status] = match[2]
        else:
            assert status is not None and line.startswith("     "), line
            statuses[status] += " " + line.strip()
    assert statuses, f"no exit statuses in serve's epilog {epilog!r}"
    return statuses


def test_the_unit_runs_serve_on_xen_as_a_notify_service(tmp_path: Path) -> None:
    text = UNIT.read_text()
    unit = unit_settings(text)
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.KillSignal"] == ["SIGTERM"]
    # SIGHUP stops serve, and the policy is read once: a reload command
    # would stop the service.
    assert "Service.ExecReload" not in unit
    [exec_start] = unit["Service.ExecStart"]
    program, *argv = shlex.split(exec_start)
    assert Path(program).name == "pvcalls-backend"
    # As main() takes them: its parser (a bad option exits 2 here, saying
    # which), then the check it makes after (--run-dir is for sim only).
    args = cli._parser()[0].parse_args(argv)
    assert (args.command, args.platform, args.run_dir) == ("serve", "xen", None)

    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        # Its program as installed here: verify wants it executable.
        installed = BIN / "pvcalls-backend"
        here = str(installed) if installed.exists() else sys.executable
        verified = tmp_path / UNIT.name
        verified.write_text(text.replace(f"ExecStart={program}", f"ExecStart={here}"))
        done = subprocess.run([analyze, "verify", str(verified)], capture_output=True,
                              text=True, timeout=TIMEOUT)
        # Unknown keys and bad values are only warned about: rc 0.
        assert (done.returncode, done.stderr, done.stdout) == (0, "", ""), done.stderr


def test_the_unit_restarts_serve_when_starting_again_may_help() -> None:
    unit = unit_settings(UNIT.read_text())
    documented = documented_exit_statuses()
    assert unit["Service.Restart"] == ["on-failure"]
    prevented = {int(status) for value in unit.get("Service.RestartPreventExitStatus", [])
                 for status in value.split()}
    named = prevented | {int(status) for key in ("SuccessExitStatus", "RestartForceExitStatus")
                         for value in unit.get(f"Service.{key}", []) for status in value.split()}
    assert named <= set(documented), f"the unit names statuses serve does not document: {named}"
    assert prevented == {status for status, meaning in documented.items()
                         if "would fail the same way" in meaning}, documented
    # A bad option (argparse's status) is one of them.
    with pytest.raises(SystemExit) as usage:
        cli._parser()[0].parse_args(["serve"])
    assert usage.value.code in prevented
    # A lost XenStore connection is restarted, as a crash (a traceback,
    # status 1 too) is: a host that is still there is served again.
    [lost] = [status for status, meaning in documented.items() if "XenStore" in meaning]
    assert lost not in prevented
