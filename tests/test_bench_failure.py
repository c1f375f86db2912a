"""bench/pvcalls_bench.py on failure: a clear message, exit status 1, no
table (no ratio against a measurement that did not happen), and nothing
left behind."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from scripts import load_script

BENCH = Path(__file__).resolve().parents[1] / "bench" / "pvcalls_bench.py"


def _bench() -> ModuleType:
    return load_script(BENCH, "pvcalls_bench")


# The backend process is given max-page-order 30, which pvcalls.Backend
# refuses (the bench itself refuses --large-order 30 as a usage error).  A
# module of its own, so that the spawned backend process finds the function.
_FAILING = """
import pvcalls_bench

def backend_main(conn, run_dir, max_page_order, *rest):
    pvcalls_bench.backend_main(conn, run_dir, 30, *rest)
"""

_RUN = """
import sys
import failing, pvcalls_bench
pvcalls_bench.backend_main = failing.backend_main
sys.exit(pvcalls_bench.main(sys.argv[1:]))
"""


def test_a_failing_party_fails_the_run_with_its_reason(short_tmp: Path) -> None:
    (short_tmp / "failing.py").write_text(_FAILING)
    out = short_tmp / "table.md"
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, "--only", "rr", "--seconds", "0.05", "--rounds", "1",
         "--output", str(out)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "TMPDIR": str(short_tmp),
             "PYTHONPATH": os.pathsep.join([str(short_tmp), str(BENCH.parent)])},
    )
    assert proc.returncode == 1, proc.stderr
    assert "FAILED" in proc.stderr and "max_page_order" in proc.stderr
    assert proc.stderr.count("Traceback") == 1  # said once, by the parent
    assert "round trips" not in proc.stdout and not out.exists()
    assert not list(short_tmp.glob("pvcalls-bench-*"))  # the host's directory is gone


class _Answers:
    name = "direct client 1"

    def __init__(self, value: Any) -> None:
        self.value = value

    def ask(self, *msg: Any, timeout: float = 0) -> Any:
        return self.value


def test_a_measurement_of_nothing_is_a_failure_not_a_ratio() -> None:
    bench = _bench()
    with pytest.raises(bench.BenchError, match="measured nothing"):
        bench.measure("rr", [_Answers(0.0)], 0.1, {})
    assert bench.measure("rr", [_Answers(5.0)], 0.1, {})[0] == 5.0


def _dies(conn: Any) -> None:
    os._exit(3)


def test_a_party_that_dies_without_answering_is_said_to_have_exited() -> None:
    # Not a wait of the whole timeout for an answer that cannot come: the
    # parent holds no copy of the child's end of the pipe, so its death is
    # an end of file at once.
    bench = _bench()
    party = bench.Party(multiprocessing.get_context("fork"), "doomed", _dies)
    with pytest.raises(bench.BenchError, match=r"doomed \(pid \d+\) exited \(code 3\) without"):
        party.ask(timeout=30)
