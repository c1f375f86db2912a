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
from scripts import load_script

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


def test_the_table_keeps_each_mechanism_s_faster_run_against_the_faster_bare_one(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    bench: Any = load_script(BENCH_DIR / "evtchn_bench.py", "evtchn_bench")
    # Made-up round trips in us: each mechanism's second run twice as fast.
    first = {"pipe": 20.0, "eventfd": 16.0, "epoll+pipe": 40.0, "evtchn": 40.0,
             "evtchn-wait": 32.0, "pipe, one CPU": 4.0}
    runs: dict[str, int] = {}

    def times(name: str) -> list[float]:
        runs[name] = runs.get(name, 0) + 1
        return [first[name] / runs[name]] * 5

    def run_fd(rounds: int, make: Any, size: int, cpu: int | None = None) -> list[float]:
        if cpu is not None:
            return times("pipe, one CPU")
        return times("pipe" if make is bench.make_pipe else "eventfd")

    monkeypatch.setattr(bench, "run_fd", run_fd)
    monkeypatch.setattr(bench, "run_epoll_floor", lambda rounds: times("epoll+pipe"))
    monkeypatch.setattr(bench, "run_evtchn",
                        lambda rounds, blocking: times("evtchn-wait" if blocking else "evtchn"))
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "evtchn.md")
    assert bench.main(["--rounds", "5"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "evtchn.md").read_text() + "\n" == out
    for row in ("| eventfd | 125,000 | 8.0 | 8.0 | 100% |",
                "| pipe | 100,000 | 10.0 | 10.0 | 80% |",
                "| evtchn | 50,000 | 20.0 | 20.0 | 40% |",
                "| pipe, one CPU | 500,000 | 2.0 | 2.0 | 400% |"):
        assert row in out, out
    assert ("evtchn round trips vs the fastest bare baseline (eventfd): 40% "
            "(target >= 50%: NOT met).") in out
    assert ("evtchn-wait round trips vs the fastest bare baseline (eventfd): 50% "
            "(target >= 50%: met).") in out


def test_only_the_round_trips_after_the_warm_up_are_timed() -> None:
    bench: Any = load_script(BENCH_DIR / "evtchn_bench.py", "evtchn_bench")
    calls = []
    times = bench.timed(bench.WARMUP + 3, lambda: calls.append(None))
    assert len(calls) == bench.WARMUP + 3 and len(times) == 3


def test_a_watched_body_that_fails_leaves_no_echo_process() -> None:
    bench: Any = load_script(BENCH_DIR / "evtchn_bench.py", "evtchn_bench")
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    child.start()
    try:
        with pytest.raises(RuntimeError, match="the body failed"):
            with bench.watched(child, "test", 60):
                raise RuntimeError("the body failed")
        assert not child.is_alive() and child.exitcode == -signal.SIGKILL
    finally:
        if child.is_alive():
            child.kill()
        child.join()
