"""The scripts run by hand, and the suite's child processes, from a working
directory outside the repository.

``tests/workqueue``, ``tests/xenback`` and ``tests/pvcalls`` have no
``__init__.py``: a process with ``tests`` on ``sys.path`` and not the
repository root takes them for namespace packages named as the real ones.
The editable install's finder comes after the path-based one on
``sys.meta_path``, so it never gets to serve the real package.  A
working directory of the repository root hid that (``python -c`` puts it
first on ``sys.path``); anywhere else, ``import workqueue`` gave an empty
namespace package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from scripts import ROOT

TIMEOUT = 120.0


@pytest.mark.parametrize("script", [
    ["tests/pvcalls/pvcalls_fuzz.py", "--seeds", "0", "--steps", "5"],
    ["tests/xenback/xenbus_fuzz.py", "--seeds", "0", "--steps", "5"],
    ["tools/wq_model_campaign.py", "1", "5", "1"],
], ids=lambda script: Path(script[0]).stem)
def test_a_script_run_by_hand_from_elsewhere_imports_the_real_packages(
        tmp_path: Path, script: list[str]) -> None:
    """The README's long runs, one short seed each, from elsewhere."""
    done = subprocess.run([sys.executable, str(ROOT / script[0]), *script[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_suites_child_processes_run_from_elsewhere(tmp_path: Path) -> None:
    """pytest run from another directory: the tests whose child processes
    put the tests' helpers on ``sys.path`` (a console script with
    interruptimport, pvcalls_rawfront, racewindow) still pass."""
    tests = [
        "tests/test_console_scripts.py::"
        "test_without_a_stderr_a_failing_command_writes_nothing_on_stdout[xenback-sim]",
        "tests/pvcalls/test_backend_data.py::test_a_send_into_a_reset_connection_raises_no_sigpipe",
        "tests/pvcalls/test_nc.py::test_a_signal_taken_by_another_thread_ends_a_wait",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         *(str(ROOT / test) for test in tests)],
        cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
