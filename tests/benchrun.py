"""Run a benchmark (or any program) and interrupt it as a terminal's
Ctrl-C does, for the tests of what it leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"

# How long the process group may outlive its leader: multiprocessing's
# resource tracker, a process of the group too, exits once it reads the
# end of its pipe, a moment after the last process holding that pipe.
GRACE = 5.0


@dataclass
class Interrupted:
    returncode: int
    stdout: str
    stderr: str
    #: Whether any process of the run's process group outlived it.
    left_running: bool


def interrupt(cmd: list[str], started: str, *, sig: int = signal.SIGINT,
              env: dict[str, str] | None = None, timeout: float = 60) -> Interrupted:
    """Start ``cmd`` in a process group of its own, wait for a line of its
    stderr that contains ``started``, then send ``sig`` to the whole group
    (a terminal's Ctrl-C reaches every process of its foreground group,
    children included) and wait for ``cmd`` to exit."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, process_group=0)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if started in line:
                break
        else:
            pytest.fail(f"{cmd} ended before saying {started!r}: {''.join(seen)}")
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left_running = not _group_gone(proc.pid, GRACE)
    if left_running:
        os.killpg(proc.pid, signal.SIGKILL)  # not left to the next test
    return Interrupted(proc.returncode, out, "".join(seen) + err, left_running)


def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
