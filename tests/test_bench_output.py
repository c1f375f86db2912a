"""Where bench/pvcalls_bench.py writes its table: a run of some of the
measurements leaves the recorded table alone, unless told where to write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"

# A short run of one measurement, with the recorded table moved to ``rec``
# so that a bug cannot overwrite the repository's.
_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, {bench!r})
import pvcalls_bench
pvcalls_bench.RESULTS = Path({rec!r})
sys.exit(pvcalls_bench.main({argv!r}))
"""

_QUICK = ["--only", "rr", "--seconds", "0.05", "--rounds", "1", "--large-order", "4"]


def _run(tmp_path: Path, *extra: str) -> Path:
    rec = tmp_path / "recorded.md"
    code = _RUN.format(bench=str(BENCH_DIR), rec=str(rec), argv=[*_QUICK, *extra])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| measurement |" in proc.stdout  # the table is printed either way
    return rec


def test_a_partial_run_leaves_the_recorded_table_alone(tmp_path: Path) -> None:
    assert not _run(tmp_path).exists()


def test_a_partial_run_writes_where_it_is_told(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "rr.md"
    rec = _run(tmp_path, "--output", str(out))
    assert not rec.exists()
    table = out.read_text()
    assert "64-byte round trips" in table
    # Which way the ratio goes, and of what.
    assert "| pvcalls / direct loopback, median of the rounds (range) |" in table
    assert "single stream" not in table
    # --large-order 4: Linux's order alone, which no frontend has to ask for.
    assert "- ring order 4 is what Linux's pvcalls-front uses\n" in table
    assert "needs a frontend" not in table
    assert " then 1 round; in each," in table  # --rounds 1


def test_max_ioworkers_reaches_the_backend(tmp_path: Path) -> None:
    out = tmp_path / "streams.md"
    _run(tmp_path, "--only", "streams", "--max-ioworkers", "1", "--output", str(out))
    table = out.read_text()
    # One ioworker: every stream's socket on CPU 0, whatever the machine has.
    assert "sockets per ioworker CPU with 256 streams open: CPU 0: 256 (max - min = 0" in table
    assert "backend max_ioworkers 1;" in table



def test_cpus_pins_every_process(tmp_path: Path) -> None:
    out = tmp_path / "rr.md"
    _run(tmp_path, "--cpus", "0", "--output", str(out))
    # Read back from every party's affinity, not from the option.
    assert "every process (echo server, backend, clients) on CPU 0 (--cpus);" in out.read_text()


def test_unpinned_runs_say_where_they_ran(tmp_path: Path) -> None:
    import os

    out = tmp_path / "rr.md"
    _run(tmp_path, "--output", str(out))
    allowed = sorted(os.sched_getaffinity(0))
    where = f"CPU {allowed[0]}" if len(allowed) == 1 else f"CPUs {allowed[0]}-{allowed[-1]}"
    assert f"every process (echo server, backend, clients) on {where};" in out.read_text()
