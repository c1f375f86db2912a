"""bench/evtchn_bench.py when an echo process dies: exit status 1 with the
reason, instead of blocking for ever in a read nobody will answer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
