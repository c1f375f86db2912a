"""Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or
SIGTERM during a benchmark of several processes: one line saying so, exit
status 128 + the signal, no traceback from any process, no results file,
and no process, run directory or socket left behind."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from benchrun import BENCH_DIR, Interrupted, interrupt

SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]

# Runs a benchmark as its __main__ does, with its recorded table moved to
# argv[1], so that a bug cannot overwrite the repository's.
_RUN = """
import sys
from pathlib import Path
import benchlib
import {bench}
benchlib.stay_stopped()
{bench}.RESULTS = Path(sys.argv[1])
sys.exit({bench}.main(sys.argv[2:]))
"""


def _interrupt(short_tmp: Path, bench: str, args: list[str], started: str,
               sig: int) -> Interrupted:
    (short_tmp / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(short_tmp / "tmp"), "PYTHONPATH": str(BENCH_DIR)}
    return interrupt([sys.executable, "-c", _RUN.format(bench=bench),
                      str(short_tmp / "results.md"), *args], started, sig=sig, env=env)


def _check(short_tmp: Path, bench: str, run: Interrupted, sig: int) -> None:
    assert run.returncode == 128 + sig, run.stderr
    assert f"{bench}: interrupted, no results" in run.stderr
    assert "Traceback" not in run.stderr and "FAILED" not in run.stderr, run.stderr
    assert run.stdout == ""  # no table
    assert not (short_tmp / "results.md").exists()
    assert not run.left_running
    assert list((short_tmp / "tmp").iterdir()) == []  # run directories, sockets


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("started", ["pyxs READ  x1:", "raw  READ  x1:"])
def test_xenstore_bench(short_tmp: Path, started: str, sig: int) -> None:
    # After the first row (pyxs) or the eighth (raw, whose next rows are
    # raw clients, against xenstored or the echo server).
    run = _interrupt(short_tmp, "xenstore_bench",
                     ["--seconds", "0.2", "--rounds", "1", "--clients", "2", "--no-evtchn"],
                     started, sig)
    _check(short_tmp, "xenstore_bench", run, sig)


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("started", ["pipe ...", "evtchn ..."])
def test_xenstore_bench_in_its_event_channel_part(short_tmp: Path, started: str,
                                                  sig: int) -> None:
    # The XenStore table is done; evtchn_bench, a process of its own, has
    # none.  --no-write: evtchn_bench's results file is the repository's
    # (only xenstore_bench's is moved), which a bug letting it finish
    # would overwrite.  --evtchn-rounds: the runs before the one stopped
    # are short (and evtchn_bench must take the option as it is passed on).
    run = _interrupt(short_tmp, "xenstore_bench",
                     ["--seconds", "0.05", "--rounds", "1", "--clients", "1", "--no-write",
                      "--evtchn-rounds", "100"],
                     f"run 1 of 2: {started}", sig)
    assert run.returncode == 128 + sig, run.stderr
    assert "evtchn_bench: interrupted, no results" in run.stderr
    assert "Traceback" not in run.stderr and "FAILED" not in run.stderr, run.stderr
    assert "| xenstored round trips/s |" in run.stdout
    assert "| mechanism |" not in run.stdout
    assert not run.left_running
    assert list((short_tmp / "tmp").iterdir()) == []


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("started", ["pipe ...", "evtchn ..."])
def test_evtchn_bench(short_tmp: Path, started: str, sig: int) -> None:
    # Each measurement takes a second or so, the signal comes in the first
    # milliseconds of the one named.
    run = _interrupt(short_tmp, "evtchn_bench", ["--rounds", "20000"], started, sig)
    _check(short_tmp, "evtchn_bench", run, sig)


# evtchn_bench run as xenstore_bench runs it, with a repeat of the stop just
# after its run ended: xenstore_bench passes on the Ctrl-C that reached it
# as well, and that can come as late as this.
_REPEATED = """
import runpy
import signal
import sys
import benchlib
run = benchlib.run

def run_then_the_stop_again(*args, **kwargs):
    status = run(*args, **kwargs)
    signal.raise_signal(signal.{sig})
    return status

benchlib.run = run_then_the_stop_again
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("sig", SIGNALS)
def test_evtchn_bench_stopped_takes_a_repeat_of_the_stop_quietly(short_tmp: Path,
                                                                  sig: int) -> None:
    # A repeat in the interpreter's exit was a KeyboardInterrupt traceback
    # (or a death by the signal: xenstore_bench then exited 254 or 241).
    (short_tmp / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(short_tmp / "tmp"), "PYTHONPATH": str(BENCH_DIR)}
    run = interrupt([sys.executable, "-c", _REPEATED.format(sig=signal.Signals(sig).name),
                     str(BENCH_DIR / "evtchn_bench.py"), "--rounds", "20000", "--no-write"],
                    "run 1 of 2: pipe ...", sig=sig, env=env)
    assert run.returncode == 128 + sig, run.stderr
    assert run.stderr.endswith("evtchn_bench: interrupted, no results\n"), run.stderr
    assert not run.left_running
    assert list((short_tmp / "tmp").iterdir()) == []


# xenstore_bench, its XenStore part faked, stopped as the start of
# evtchn_bench fails (a fork short of memory, say).
_STOPPED_AS_POPEN_FAILS = """
import errno
import signal
import subprocess
import sys
import benchlib
import xenstore_bench
benchlib.stay_stopped()
rows = [(client, op, 1, 1.0, 1.0) for client in ("pyxs", "raw") for op in ("READ", "WRITE")]
xenstore_bench._measure_all = lambda args, interrupts: rows

def stopped_as_it_fails(*args, **kwargs):
    if {sig!r}:
        signal.raise_signal(signal.Signals[{sig!r}])
    raise OSError(errno.EAGAIN, "fork failed")

subprocess.Popen = stopped_as_it_fails
sys.exit(xenstore_bench.main(["--seconds", "0.05", "--rounds", "1", "--clients", "1",
                              "--no-write"]))
"""


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_stop_as_a_child_fails_to_start_is_a_stop(sig: int) -> None:
    # The stop is passed on to the child being started, not raised; when
    # there was no child to take it, the run ended with Popen's error (a
    # traceback, exit status 1) as if nobody had asked it to stop.
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(BENCH_DIR)}
    run = subprocess.run([sys.executable, "-c",
                          _STOPPED_AS_POPEN_FAILS.format(sig=signal.Signals(sig).name)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 128 + sig, run.stderr
    assert run.stderr.endswith("xenstore_bench: interrupted, no results\n"), run.stderr


def test_a_child_that_fails_to_start_unasked_fails_the_run() -> None:
    # Popen's OSError is no BenchError: the run ended with a traceback,
    # where every other failure says FAILED in one line.
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(BENCH_DIR)}
    run = subprocess.run([sys.executable, "-c", _STOPPED_AS_POPEN_FAILS.format(sig="")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert run.stderr.endswith("xenstore_bench: FAILED, no results: cannot run "
                               "evtchn_bench.py: [Errno 11] fork failed\n"), run.stderr


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("started", ["starting", "round 1 of"])
def test_pvcalls_bench(short_tmp: Path, started: str, sig: int) -> None:
    # While its processes start, and while it measures.
    run = _interrupt(short_tmp, "pvcalls_bench",
                     ["--only", "rr", "--seconds", "0.5", "--rounds", "3", "--warmup", "0",
                      "--large-order", "4", "--output", str(short_tmp / "results.md")],
                     started, sig)
    _check(short_tmp, "pvcalls_bench", run, sig)


# Starts children with benchlib.start() in a process of its own, where
# multiprocessing's resource tracker is not running yet, and prints each
# child's blocked signals, as /proc says them, in hex.
_BLOCKED = """
import multiprocessing as mp
import sys
import time
import benchlib

def blocked(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(line.split()[1] for line in status if line.startswith("SigBlk:"))

for method in sys.argv[1:]:
    child = mp.get_context(method).Process(target=time.sleep, args=(60,))
    benchlib.start(child)
    try:
        print(method, blocked(child.pid))
    finally:
        child.kill()
        child.join()
print("parent", blocked("self"))
"""


def test_a_child_starts_with_sigint_blocked_also_the_first_spawned() -> None:
    """benchlib.start() blocks SIGINT around Process.start(), for the child
    to inherit; but the first child of a spawn context starts
    multiprocessing's resource tracker, which blocks SIGINT and SIGTERM
    around its own start and then unblocks them, instead of putting the
    mask back: that first child (evtchn_bench's echo process) started with
    SIGINT open, and a terminal's Ctrl-C reached it as its own."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(BENCH_DIR)}
    out = subprocess.run([sys.executable, "-c", _BLOCKED, "spawn", "spawn", "fork"],
                         env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    masks = [line.split() for line in out.splitlines()]
    assert [who for who, _ in masks] == ["spawn", "spawn", "fork", "parent"], out
    sigint = 1 << (signal.SIGINT - 1)
    for _, mask in masks[:-1]:
        assert int(mask, 16) & sigint, out
    assert not int(masks[-1][1], 16) & sigint, out  # put back in the parent
