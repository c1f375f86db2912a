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

# Runs a benchmark with its recorded table moved to argv[1], so that a bug
# cannot overwrite the repository's.
_RUN = """
import sys
from pathlib import Path
import {bench}
{bench}.RESULTS = Path(sys.argv[1])
sys.exit({bench}.main(sys.argv[2:]))
"""


def _interrupt(tmp_path: Path, bench: str, args: list[str], started: str,
               sig: int) -> Interrupted:
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PYTHONPATH": str(BENCH_DIR)}
    return interrupt([sys.executable, "-c", _RUN.format(bench=bench),
                      str(tmp_path / "results.md"), *args], started, sig=sig, env=env)


def _check(tmp_path: Path, bench: str, run: Interrupted, sig: int) -> None:
    assert run.returncode == 128 + sig, run.stderr
    assert f"{bench}: interrupted, no results" in run.stderr
    assert "Traceback" not in run.stderr and "FAILED" not in run.stderr, run.stderr
    assert run.stdout == ""  # no table
    assert not (tmp_path / "results.md").exists()
    assert not run.left_running
    assert list((tmp_path / "tmp").iterdir()) == []  # run directories, sockets


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("started", ["pyxs READ  x1:", "raw  READ  x1:"])
def test_xenstore_bench(tmp_path: Path, started: str, sig: int) -> None:
    # After the first row (pyxs) or the eighth (raw, whose next rows are
    # raw clients, against xenstored or the echo server).
    run = _interrupt(tmp_path, "xenstore_bench",
                     ["--seconds", "0.5", "--rounds", "1", "--clients", "2", "--no-evtchn"],
                     started, sig)
    _check(tmp_path, "xenstore_bench", run, sig)


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("started", ["pipe ...", "evtchn ..."])
def test_xenstore_bench_in_its_event_channel_part(tmp_path: Path, started: str,
                                                  sig: int) -> None:
    # The XenStore table is done (and written); evtchn_bench, a process of
    # its own, has none.
    run = _interrupt(tmp_path, "xenstore_bench",
                     ["--seconds", "0.05", "--rounds", "1", "--clients", "1"],
                     f"run 1 of 2: {started}", sig)
    assert run.returncode == 128 + sig, run.stderr
    assert "evtchn_bench: interrupted, no results" in run.stderr
    assert "Traceback" not in run.stderr and "FAILED" not in run.stderr, run.stderr
    assert "| xenstored round trips/s |" in run.stdout
    assert "| mechanism |" not in run.stdout
    assert not run.left_running
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("started", ["pipe ...", "evtchn ..."])
def test_evtchn_bench(tmp_path: Path, started: str, sig: int) -> None:
    # Each measurement takes a second or so, the signal comes in the first
    # milliseconds of the one named.
    run = _interrupt(tmp_path, "evtchn_bench", ["--rounds", "20000"], started, sig)
    _check(tmp_path, "evtchn_bench", run, sig)

