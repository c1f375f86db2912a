"""bench/xenstore_bench.py when a server cannot start: exit status 1 with the
reason, promptly, and no server process left to keep the run from exiting."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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
