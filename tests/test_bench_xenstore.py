"""bench/xenstore_bench.py when a server cannot start: exit status 1 with the
reason, promptly, and no server process left to keep the run from exiting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"

_RUN = """
import sys
sys.path.insert(0, {bench!r})
import xenstore_bench

def boom(*args):
    raise RuntimeError("xenstored cannot start here")

xenstore_bench.serve_xenstored = boom
sys.exit(xenstore_bench.main(["--seconds", "0.05", "--rounds", "1", "--clients", "1",
                              "--no-write", "--no-evtchn"]))
"""


def test_a_server_that_cannot_start_fails_the_run_at_once() -> None:
    # Before, the run raised SystemExit after 30 s and then hung for ever:
    # the echo server, a non-daemon child, was never told to stop.
    proc = subprocess.run([sys.executable, "-c", _RUN.format(bench=str(BENCH_DIR))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "FAILED" in proc.stderr and "xenstored did not start" in proc.stderr
    assert "xenstored cannot start here" in proc.stderr  # the server's own traceback
