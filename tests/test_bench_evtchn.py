"""bench/evtchn_bench.py when an echo process dies: exit status 1 with the
reason, instead of blocking for ever in a read nobody will answer."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"

_RUN = """
import os, sys
sys.path.insert(0, {bench!r})
import evtchn_bench

def dies(rfd, wfd, rounds, ctl, size, cpu=None):
    ctl.send("ready")
    os.read(rfd, size)
    os._exit(3)  # after one ping, before its pong

evtchn_bench.fd_echo = dies
sys.exit(evtchn_bench.main(["--rounds", "10", "--no-write"]))
"""


def test_an_echo_process_that_dies_fails_the_run() -> None:
    proc = subprocess.run([sys.executable, "-c", _RUN.format(bench=str(BENCH_DIR))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "FAILED" in proc.stderr and "exited (code 3) mid-run" in proc.stderr
    assert "vs fastest bare" not in proc.stdout


def test_a_stop_as_the_watchdog_starts_leaves_no_watchdog(monkeypatch: Any) -> None:
    # Ctrl-C while watched() waits for its watchdog thread to start: the
    # watchdog used to be left running, its SIGUSR1 handler installed, and
    # the child's kill in the clean-up was then taken for a failure (a
    # BenchError traceback from wherever the main thread was).
    import threading

    import benchlib
    import evtchn_bench

    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    child.start()
    start = threading.Thread.start

    def start_then_ctrl_c(thread: threading.Thread) -> None:
        start(thread)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(threading.Thread, "start", start_then_ctrl_c)
    usr1 = signal.getsignal(signal.SIGUSR1)
    before = set(threading.enumerate())
    try:
        with benchlib.Interrupts(), pytest.raises(KeyboardInterrupt):
            with evtchn_bench.watched(child, "test", 60):
                pytest.fail("the body ran after Ctrl-C")
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGUSR1) is usr1
        assert set(threading.enumerate()) <= before  # the watchdog ended
    finally:
        child.kill()
        child.join()
