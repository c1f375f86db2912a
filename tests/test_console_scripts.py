"""The console scripts as pip installs them, from pyproject's
``[project.scripts]``: what Ctrl-C does to one before it is under way."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from scripts import helper_path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0


def console_script(name: str) -> list[str]:
    """The command that runs console script ``name`` as pip's wrapper does
    (``from MODULE import FUNC; sys.exit(FUNC())``), with the test-only
    :mod:`interruptimport` imported first."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        entry = tomllib.load(f)["project"]["scripts"][name]
    module, func = entry.split(":")
    return [sys.executable, "-c",
            f"import sys, interruptimport\nfrom {module} import {func}\nsys.exit({func}())"]


def script_env() -> dict[str, str]:
    """The environment :func:`console_script`'s command needs (it imports
    :mod:`interruptimport` from ``tests``)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [*helper_path(), os.environ.get("PYTHONPATH")]))}


def _sigint_default() -> None:
    # Run in the background (a shell's job, nohup), the tests pass SIGINT
    # on ignored, and Python then leaves it ignored: the command would
    # never see our Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupted_while_importing(argv: list[str], module: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv``, SIGINT it once it imports ``module``, and wait for it."""
    mark_r, mark_w = os.pipe()
    env = {**script_env(), "INTERRUPT_IMPORT": module, "INTERRUPT_IMPORT_FD": str(mark_w)}
    try:
        with subprocess.Popen(argv, env=env, pass_fds=(mark_w,), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=_sigint_default) as proc:
            os.close(mark_w)
            mark_w = -1
            try:
                ready, _, _ = select.select([mark_r], [], [], TIMEOUT)
                assert ready and os.read(mark_r, 256) == f"{module}\n".encode(), \
                    f"{argv} never imported {module}"
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        os.close(mark_r)
        if mark_w >= 0:
            os.close(mark_w)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.parametrize(("name", "args", "module", "said"), [
    # As the console script imports the command's module...
    ("pvcalls-backend", ["demo"], "pvcalls._backend", "pvcalls-backend: interrupted\n"),
    ("xenback-sim", ["--run-dir", "{tmp}"], "xenback.sim._host", "xenback-sim: interrupted\n"),
    # ...quietly, as its signals later: closed what it opened, it says nothing.
    ("pvcalls-nc", ["--run-dir", "{tmp}", "--domid", "1", "127.0.0.1", "80"],
     "pvcalls._backend", ""),
    # ...and in main(), before the demo takes SIGINT itself.
    ("pvcalls-backend", ["demo"], "pvcalls._nc", "pvcalls-backend: interrupted\n"),
], ids=["pvcalls-backend", "xenback-sim", "pvcalls-nc", "pvcalls-backend-main"])
def test_ctrl_c_as_a_command_starts_is_one_line(
        tmp_path: Path, name: str, args: list[str], module: str, said: str) -> None:
    argv = [*console_script(name), *(a.format(tmp=tmp_path) for a in args)]
    done = interrupted_while_importing(argv, module)
    assert (done.returncode, done.stderr, done.stdout) == (130, said, "")


def test_ctrl_c_as_a_command_starts_without_a_stderr_is_quiet(tmp_path: Path) -> None:
    """With descriptor 2 closed, sys.stderr is None: print(file=None)
    would have put the line on stdout, the command's output."""
    argv = ["sh", "-c", 'exec "$@" 2>&-', "sh", *console_script("pvcalls-backend"), "demo"]
    done = interrupted_while_importing(argv, "pvcalls._backend")
    assert (done.returncode, done.stdout) == (130, "")


@pytest.mark.parametrize(("name", "args", "status"), [
    ("pvcalls-backend", ["--bogus"], 2),
    ("pvcalls-backend", ["serve", "--platform", "sim", "--run-dir", "{tmp}/none"], 2),
    ("pvcalls-nc", ["--bogus"], 2),
    ("xenback-sim", ["--bogus"], 2),
    # A message of its own, not argparse's.
    ("xenback-sim", ["--run-dir", "{tmp}/file/run"], 1),
], ids=["pvcalls-backend", "pvcalls-backend-serve", "pvcalls-nc", "xenback-sim",
        "xenback-sim-cannot-start"])
def test_without_a_stderr_a_failing_command_writes_nothing_on_stdout(
        tmp_path: Path, name: str, args: list[str], status: int) -> None:
    """With descriptor 2 closed, sys.stderr is None, and both argparse's
    usage (print_usage() defaults to stdout) and print(file=None) would
    put the message on stdout, where a pipeline reads data."""
    (tmp_path / "file").touch()
    argv = ["sh", "-c", 'exec "$@" 2>&-', "sh", *console_script(name),
            *(a.format(tmp=tmp_path) for a in args)]
    done = subprocess.run(argv, env=script_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert (done.returncode, done.stdout) == (status, "")


def test_ctrl_c_as_a_closed_stderr_is_replaced_writes_nothing_on_stdout(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C can land as the stand-in for a closed stderr is opened:
    sys.stderr is still None there, and print(file=None) would have put
    the line on stdout, the command's output."""
    import _xenback_scripts

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(_xenback_scripts, "open", interrupted, raising=False)
    monkeypatch.setattr(sys, "stderr", None)
    assert _xenback_scripts._run("json", "prog") == 130
    assert capsys.readouterr().out == ""
