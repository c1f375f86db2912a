"""``pvcalls-backend demo``: the README's main command runs and says what it did."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from test_cli import script

TIMEOUT = 90


def test_demo_runs_and_reports_cpus_and_bytes() -> None:
    result = subprocess.run([*script("pvcalls-backend"), "demo", "--max-ioworkers", "2"],
                            capture_output=True, text=True, timeout=TIMEOUT)
    out = result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
    # Guest 1 fetched the page through pvcalls.
    assert re.search(r"guest1 .*GET http://127\.0\.0\.1:\d+/ -> "
                     r"'HTTP/1\.\d 200 OK', \d+ bytes", out)
    # The host client's data went through guest 2's echo server unchanged.
    assert "identical" in out
    # The socket table: each active socket with its CPU and bytes each way.
    rows = re.findall(r"^\s+(guest\d)\s+0x[0-9a-f]+\s+(active|passive|new)\s+(\d+|-)\s+"
                      r"([\d.]+ (?:B|KiB|MiB))\s+([\d.]+ (?:B|KiB|MiB))$", out, re.M)
    active = [r for r in rows if r[1] == "active"]
    assert any(r[0] == "guest2" for r in active), out
    assert all(r[2].isdigit() for r in active), out
    assert any(r[3] != "0 B" and r[4] != "0 B" for r in active), out
    assert re.search(r"Active sockets per ioworker CPU: CPU \d+: \d+", out)
    assert "Traceback" not in result.stderr


def test_the_log_level_is_taken() -> None:
    result = subprocess.run([*script("pvcalls-backend"), "--log-level", "debug", "demo"],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    # The page's request, which the demo's HTTP server logs at DEBUG.
    assert re.search(r" DEBUG pvcalls\._cli: http server: \"GET / HTTP/1\.0\" 200 ", result.stderr)


def _refused_as_a_usage_error(redirect: str) -> None:
    """The demo run with its standard output redirected by ``redirect``
    (a shell's) is refused before it starts."""
    exe = Path(sys.executable).parent / "pvcalls-backend"
    result = subprocess.run(["sh", "-c", f'exec "$@" {redirect}', "sh", str(exe), "demo"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 2
    assert result.stderr.endswith(
        "pvcalls-backend demo: error: standard output must be open for writing (the demo's "
        "output is what it shows)\n")


def test_a_demo_with_its_stdout_closed_is_a_usage_error() -> None:
    # With descriptor 1 closed (>&-) Python's print() writes nothing: the
    # demo ran, showed nothing, and exited 0, as if all had been said.
    _refused_as_a_usage_error(">&-")


def test_a_demo_with_its_stdout_open_only_for_reading_is_a_usage_error() -> None:
    # 1</dev/null: not None, so it passed the closed check, and the first
    # print() ended the demo in an OSError traceback.
    _refused_as_a_usage_error("1</dev/null")


def test_a_demo_whose_output_cannot_be_written_says_why() -> None:
    # /dev/full: every write fails with ENOSPC, which was a traceback.
    exe = Path(sys.executable).parent / "pvcalls-backend"
    with open("/dev/full", "w") as full:
        result = subprocess.run([str(exe), "demo"], stdin=subprocess.DEVNULL, stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=TIMEOUT)
    assert (result.returncode, result.stderr) == (
        1, "pvcalls-backend: cannot write the demo's output: No space left on device\n")


def test_a_demo_on_a_stdout_open_for_reading_and_writing_runs(tmp_path: Path) -> None:
    # A terminal is open O_RDWR: writable, though not write-only.
    exe = Path(sys.executable).parent / "pvcalls-backend"
    with open(tmp_path / "out", "w+") as out:
        result = subprocess.run([str(exe), "demo"], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.PIPE, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "backend stopped cleanly" in (tmp_path / "out").read_text()
