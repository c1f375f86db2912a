"""bench/xenstore_bench.py when a server cannot start: exit status 1 with the
reason, promptly, and no server process left to keep the run from exiting.
And the evtchn_bench it runs: the options passed on to it, and its exit
status, which is the run's, however a stop comes."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from scripts import load_script

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"

_RUN = """
import signal, sys
sys.path.insert(0, {bench!r})
import xenstore_bench

def server(*args):
    {server}

xenstore_bench.serve_xenstored = server
xenstore_bench.START_TIMEOUT = {start_timeout!r}
sys.exit(xenstore_bench.main(["--seconds", "0.05", "--rounds", "1", "--clients", "1",
                              "--no-write", "--no-evtchn"]))
"""


def _run_with_xenstored(server: str, start_timeout: float,
                        hang: float = 60) -> subprocess.CompletedProcess[str]:
    """xenstore_bench run with ``server`` for the body of its xenstored
    process, and ``start_timeout`` for its START_TIMEOUT; a run not over
    in ``hang`` seconds fails the test."""
    return subprocess.run(
        [sys.executable, "-c",
         _RUN.format(bench=str(BENCH_DIR), server=server, start_timeout=start_timeout)],
        capture_output=True, text=True, timeout=hang)


def test_a_server_that_cannot_start_fails_the_run_at_once() -> None:
    # Before, the run raised SystemExit after 30 s and then hung for ever:
    # the echo server, a non-daemon child, was never told to stop.  "At
    # once" is which wait ended the run: the server's exit, with a start
    # timeout that would outlast the test's bound (rather than a bound on
    # the time taken, which a slow machine could fail).
    proc = _run_with_xenstored('raise RuntimeError("xenstored cannot start here")', 3600.0)
    assert proc.returncode == 1, proc.stderr
    assert "FAILED" in proc.stderr, proc.stderr
    assert "the xenstored exited as it started (exit code 1;" in proc.stderr, proc.stderr
    assert "did not start within" not in proc.stderr
    assert "xenstored cannot start here" in proc.stderr  # the server's own traceback


def test_a_server_that_never_says_it_is_ready_fails_the_run_at_the_start_timeout() -> None:
    # Alive but silent: only the start timeout ends the wait, the one
    # made short (the bound is far above it, far under the bench's own).
    import xenstore_bench

    proc = _run_with_xenstored("signal.pause()", 0.5, hang=xenstore_bench.START_TIMEOUT / 2)
    assert proc.returncode == 1, proc.stderr
    assert "FAILED" in proc.stderr and "the xenstored did not start within 0.5 s" in proc.stderr
    assert "exited" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_server_slow_to_start_is_waited_for() -> None:
    # Ready after some polls of its pipe: the run goes on to measure (and
    # fails there, the server gone once it said so), not at the start.
    import xenstore_bench

    proc = _run_with_xenstored("import time; time.sleep(0.5); args[1].send('ready')",
                               xenstore_bench.START_TIMEOUT)
    assert proc.returncode == 1, proc.stderr
    assert "FAILED" in proc.stderr and "pyxs clients against " in proc.stderr, proc.stderr
    assert "did not start" not in proc.stderr and "exited as it started" not in proc.stderr


def test_a_stop_never_lands_inside_the_making_of_a_measurements_objects(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C inside multiprocessing's making of a measurement's Barrier
    # left a Finalize half made, whose callback then failed, printing
    # "Exception ignored in: <Finalize object, dead>" and a traceback.
    import multiprocessing.util

    import benchlib
    import xenstore_bench

    made: list[object] = []
    init = multiprocessing.util.Finalize.__init__

    def ctrl_c_then_init(self: object, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        signal.raise_signal(signal.SIGINT)
        init(self, *args, **kwargs)

    monkeypatch.setattr(multiprocessing.util.Finalize, "__init__", ctrl_c_then_init)
    with benchlib.Interrupts(), pytest.raises(KeyboardInterrupt):
        xenstore_bench.measure("raw", "/nonexistent", 0, 1, 0.05, False)
    assert made, "no Finalize made: the test no longer tests anything"
    assert all(hasattr(f, "_key") for f in made), "a Finalize left half made"


def _evtchn_bench_is(script: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    """Make xenstore_bench's run (its XenStore part faked) start ``script``
    instead of evtchn_bench, and go on once ``script`` has printed "ready";
    the list returned gets the pid of each one started."""
    import xenstore_bench

    monkeypatch.setattr(xenstore_bench, "RESULTS", tmp_path / "xenstore.md")
    rows = [(client, op, 1, 1.0, 1.0) for client in ("pyxs", "raw") for op in ("READ", "WRITE")]
    monkeypatch.setattr(xenstore_bench, "_measure_all", lambda args, interrupts: rows)
    started: list[int] = []
    popen = subprocess.Popen

    def instead_of_evtchn_bench(args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        assert args[1].endswith("evtchn_bench.py"), args
        child = popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                      **kwargs)
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        child.stdout.close()
        started.append(child.pid)
        return child

    monkeypatch.setattr(subprocess, "Popen", instead_of_evtchn_bench)
    return started


_XENSTORE_BENCH = ["--seconds", "0.05", "--rounds", "1", "--clients", "1"]


def test_a_ctrl_c_as_evtchn_bench_is_reaped_keeps_its_exit_status(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Ctrl-C reaches both processes.  Under load, evtchn_bench could stop
    # and exit before this one ran again: its waitpid() then reaped it, and
    # the KeyboardInterrupt raised before subprocess noted the status made
    # the next waitpid() fail with ECHILD, which subprocess takes for an
    # exit status of 0.  The run "succeeded" with no event-channel table.
    import xenstore_bench

    started = _evtchn_bench_is("print('ready')\nraise SystemExit(130)", monkeypatch,
                               tmp_path)
    waitpid = xenstore_bench.os.waitpid

    def waitpid_then_ctrl_c(pid: int, options: int) -> tuple[int, int]:
        reaped = waitpid(pid, options)
        if started and reaped[0] == started[0]:
            signal.raise_signal(signal.SIGINT)
        return reaped

    monkeypatch.setattr(xenstore_bench.os, "waitpid", waitpid_then_ctrl_c)
    assert xenstore_bench.main(_XENSTORE_BENCH) == 130
    assert started, "evtchn_bench not run: the test no longer tests anything"


def test_a_stop_sent_to_xenstore_bench_alone_is_passed_on_to_evtchn_bench(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # As "kill PID" sends it: evtchn_bench stops as it does on its own.
    import xenstore_bench

    _evtchn_bench_is("import signal, sys\n"
                     "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
                     "print('ready', flush=True)\n"
                     "signal.pause()\n", monkeypatch, tmp_path)
    waitpid = xenstore_bench.os.waitpid

    def sigterm_then_waitpid(pid: int, options: int) -> tuple[int, int]:
        if options == 0:  # the wait for evtchn_bench
            signal.raise_signal(signal.SIGTERM)
        return waitpid(pid, options)

    monkeypatch.setattr(xenstore_bench.os, "waitpid", sigterm_then_waitpid)
    assert xenstore_bench.main(_XENSTORE_BENCH) == 143


def test_evtchn_bench_killed_by_a_signal_is_128_plus_the_signal(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Its -9 was passed to sys.exit(), for an exit status of 247.
    import xenstore_bench

    _evtchn_bench_is("import os, signal\nprint('ready', flush=True)\n"
                     "os.kill(os.getpid(), signal.SIGKILL)\n", monkeypatch, tmp_path)
    assert xenstore_bench.main(_XENSTORE_BENCH) == 128 + signal.SIGKILL


def _started_children(monkeypatch: pytest.MonkeyPatch, also: Any = None) -> list[Any]:
    """Make subprocess.Popen note each child it starts (and then call
    ``also()``); the list returned gets them."""
    started: list[subprocess.Popen[Any]] = []
    popen = subprocess.Popen

    def noting(args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        child = popen(args, **kwargs)
        started.append(child)
        if also is not None:
            also()
        return child

    monkeypatch.setattr(subprocess, "Popen", noting)
    return started


def _no_pidfd(pid: int, flags: int = 0) -> int:
    raise OSError(errno.EMFILE, "Too many open files")


_SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def test_a_child_whose_pidfd_cannot_be_opened_is_not_left_running(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Out of descriptors after Popen: the child was left running, and
    # unreaped, with nobody to wait for it.
    import benchlib

    started = _started_children(monkeypatch)
    monkeypatch.setattr(benchlib.os, "pidfd_open", _no_pidfd)
    try:
        with benchlib.Interrupts() as interrupts, pytest.raises(OSError) as failed:
            interrupts.call(_SLEEPER)
        assert failed.value.errno == errno.EMFILE
        assert len(started) == 1, "no child started: the test no longer tests anything"
        assert started[0].returncode is not None, "the child is left running"
    finally:
        for child in started:  # whatever the outcome, not for the next tests
            child.kill()
            child.wait()


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, id="SIGINT"),
                                 pytest.param(signal.SIGTERM, id="SIGTERM")])
def test_a_stop_as_a_childs_pidfd_fails_to_open_is_a_stop(
        monkeypatch: pytest.MonkeyPatch, sig: int) -> None:
    # The stop was kept for the child, which never got it: the run ended
    # with the EMFILE as if nobody had asked it to stop.
    import benchlib

    started = _started_children(monkeypatch, lambda: signal.raise_signal(sig))
    monkeypatch.setattr(benchlib.os, "pidfd_open", _no_pidfd)
    try:
        with benchlib.Interrupts() as interrupts, pytest.raises(KeyboardInterrupt):
            interrupts.call(_SLEEPER)
        assert interrupts.signum == sig
        assert len(started) == 1, "no child started: the test no longer tests anything"
        assert started[0].returncode is not None, "the child is left running"
    finally:
        for child in started:
            child.kill()
            child.wait()


def _bench_with_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, rows: list[Any],
                     status: int) -> tuple[Any, list[list[str]]]:
    """xenstore_bench, loaded afresh, its XenStore part faked to measure
    ``rows`` and its results file in ``tmp_path``; the event-channel part
    it starts only recorded (its command line, in the list returned) and
    answering ``status``."""
    bench: Any = load_script(BENCH_DIR / "xenstore_bench.py", "xenstore_bench")
    monkeypatch.setattr(bench, "_measure_all", lambda args, interrupts: rows)
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "xenstore.md")
    ran: list[list[str]] = []

    def call(interrupts: Any, cmd: list[str]) -> int:
        ran.append(cmd)
        return status

    monkeypatch.setattr(bench.benchlib.Interrupts, "call", call)
    return bench, ran


def test_the_table_and_the_event_channel_part_heed_no_write(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Made-up round trips per second: (client, op, clients, xenstored, echo).
    rows = [(client, op, n, 1.0, 2.0) for client in ("pyxs", "raw")
            for op in ("READ", "WRITE") for n in (1, 8)]
    rows += [("pyxs, server embedded", op, 1, 1.0, 2.0) for op in ("READ", "WRITE")]
    rows[0] = ("pyxs", "READ", 1, 150.0, 250.0)
    rows[4] = ("raw", "READ", 1, 1.0, 500.0)
    bench, ran = _bench_with_rows(monkeypatch, tmp_path, rows, status=7)
    evtchn = str(BENCH_DIR / "evtchn_bench.py")
    assert bench.main(["--no-write"]) == 7  # the event channel part's status is the run's
    assert ran[-1][1:] == [evtchn, "--no-write"]
    assert not (tmp_path / "xenstore.md").exists()
    out = capsys.readouterr().out
    assert "| pyxs | READ | 1 | 150 | 250 | 60% |" in out
    assert ("pyxs READ through xenstored vs the 16-byte raw echo limit (one client): 30% "
            "(pyxs's own cost included: pyxs vs echo is 50%).") in out
    assert bench.main([]) == 7
    assert ran[-1][1:] == [evtchn]
    assert (tmp_path / "xenstore.md").read_text() + "\n" == capsys.readouterr().out


def test_evtchn_rounds_shortens_the_event_channel_part(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Its 20000 round trips of each mechanism, twice, could only be run
    # whole or skipped (--no-evtchn).
    rows = [(client, op, 1, 1.0, 1.0) for client in ("pyxs", "raw") for op in ("READ", "WRITE")]
    bench, ran = _bench_with_rows(monkeypatch, tmp_path, rows, status=0)
    evtchn = str(BENCH_DIR / "evtchn_bench.py")
    assert bench.main(["--no-write", "--evtchn-rounds", "500"]) == 0
    assert ran[-1][1:] == [evtchn, "--rounds", "500", "--no-write"]
    assert bench.main(["--evtchn-rounds=1"]) == 0
    assert ran[-1][1:] == [evtchn, "--rounds", "1"]
    assert bench.main([]) == 0
    assert ran[-1][1:] == [evtchn]  # its own default
    assert len(ran) == 3
    assert bench.main(["--no-evtchn", "--evtchn-rounds", "500"]) == 0
    assert len(ran) == 3  # skipped all the same
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # checked as evtchn_bench checks --rounds
        bench.main(["--evtchn-rounds", "0"])
    assert refused.value.code == 2
    assert "argument --evtchn-rounds: 0 must be at least 1" in capsys.readouterr().err
    assert len(ran) == 3
