"""Every benchmark refuses a bad option as a usage error: exit status 2,
one line naming the option and what was wrong with it, and nothing
started (no process, no measurement) before it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from scripts import load_script

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"

BAD = [
    ("xenstore_bench", "--seconds", "0", "more than 0"),
    ("xenstore_bench", "--seconds", "-1", "more than 0"),
    ("xenstore_bench", "--seconds", "nan", "more than 0"),
    ("xenstore_bench", "--seconds", "inf", "finite"),
    ("xenstore_bench", "--seconds", "soon", "not a number"),
    ("xenstore_bench", "--rounds", "0", "at least 1"),
    ("xenstore_bench", "--rounds", "-2", "at least 1"),
    ("xenstore_bench", "--rounds", "1.5", "not a whole number"),
    ("xenstore_bench", "--clients", "0", "at least 1"),
    ("xenstore_bench", "--clients", "-3", "at least 1"),
    ("xenstore_bench", "--evtchn-rounds", "0", "at least 1"),
    ("xenstore_bench", "--evtchn-rounds", "many", "not a whole number"),
    ("pvcalls_bench", "--large-order", "3", "4..9"),
    ("pvcalls_bench", "--large-order", "10", "4..9"),
    ("pvcalls_bench", "--large-order", "30", "4..9"),
    ("pvcalls_bench", "--seconds", "0", "more than 0"),
    ("pvcalls_bench", "--seconds", "nan", "more than 0"),
    ("pvcalls_bench", "--seconds", "inf", "finite"),
    ("pvcalls_bench", "--rounds", "0", "at least 1"),
    ("pvcalls_bench", "--warmup", "-1", "not be negative"),
    ("pvcalls_bench", "--warmup", "nan", "not be negative"),
    ("pvcalls_bench", "--warmup", "inf", "finite"),
    ("pvcalls_bench", "--max-ioworkers", "0", "at least 1"),
    ("pvcalls_bench", "--only", "rr,bogus", "'bogus'"),
    ("pvcalls_bench", "--only", ",", "some of single,streams,rr,connects"),
    ("pvcalls_bench", "--output", ".", "'.' is a directory"),
    # Under a file: mkdir() would fail it only after the whole run.
    ("pvcalls_bench", "--output", str(BENCH_DIR / "benchlib.py" / "table.md"),
     f"{str(BENCH_DIR / 'benchlib.py')!r} is not a directory"),
    ("pvcalls_bench", "--output", str(BENCH_DIR / "benchlib.py" / "new" / "table.md"),
     f"{str(BENCH_DIR / 'benchlib.py')!r} is not a directory"),
    ("pvcalls_bench", "--cpus", "", "no CPU"),
    ("pvcalls_bench", "--cpus", "one", "'one' is not a CPU list"),
    ("pvcalls_bench", "--cpus", "0,,1", "'0,,1' is not a CPU list"),
    ("pvcalls_bench", "--cpus", "1-0", "'1-0' is not a CPU list"),
    ("pvcalls_bench", "--cpus", "0-", "'0-' is not a CPU list"),
    ("pvcalls_bench", "--cpus", "0-1-2", "'0-1-2' is not a CPU list"),
    ("pvcalls_bench", "--cpus", "4096", "CPU 4096 is not one this process may run on"),
    ("evtchn_bench", "--rounds", "0", "at least 1"),
    ("evtchn_bench", "--rounds", "many", "not a whole number"),
    ("evtchn_bench", "--rounds", "\uff15", "not a whole number"),  # int() takes it
    ("evtchn_bench", "--rounds", "9" * 5000, "is too large"),  # int() refuses it
    # Refused without building the range.
    ("pvcalls_bench", "--cpus", "0-99999999999", "is not one this process may run on"),
]


@pytest.mark.parametrize(("bench", "option", "value", "why"), BAD)
def test_a_bad_option_is_a_usage_error(bench: str, option: str, value: str, why: str,
                                       tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    extra = ["--output", str(out)] if bench == "pvcalls_bench" else ["--no-write"]
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / f"{bench}.py"), *extra, f"{option}={value}"],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert error.startswith(f"{bench}.py: error: argument {option}: "), error
    assert why in error, error
    assert "Traceback" not in proc.stderr
    # Refused before anything started: no progress line, no table.
    assert proc.stderr.startswith("usage:") and proc.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize(("bench", "measures", "baseline"), [
    ("workqueue_bench", "workqueue", "ThreadPoolExecutor"),
    ("xenstore_bench", "round trips per second of the simulated host's xenstored",
     "a bare Python Unix-socket echo server"),
    ("evtchn_bench", "Notify-to-wakeup round trips of the simulated host's event channels",
     "bare pipes and eventfds"),
    ("pvcalls_bench", "guests through the PV Calls backend", "direct loopback TCP"),
])
def test_help_says_what_is_measured_against_what(bench: str, measures: str,
                                                 baseline: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCH_DIR / f"{bench}.py"), "--help"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # unwrapped
    assert measures in text and f"baseline: {baseline}" in text, text
    assert f"bench/results/{bench.removesuffix('_bench')}.md" in text
    assert "Exit status: 0 when done, 1 when a measurement failed" in text
    assert "130 (143) when interrupted by Ctrl-C (SIGTERM)" in text


def test_only_takes_each_measurement_once_in_the_order_given() -> None:
    bench = load_script(BENCH_DIR / "pvcalls_bench.py", "pvcalls_bench")
    assert bench._keys("rr,single,rr,,rr") == ["rr", "single"]


def test_the_option_types_take_the_ends_of_their_ranges() -> None:
    # The refusals above must not reach the values a run can use.
    import benchlib

    assert benchlib.at_least(1)("1") == 1
    assert benchlib.at_least(4, 9)("4") == 4 and benchlib.at_least(4, 9)("9") == 9
    assert benchlib.seconds_or_none("0") == 0.0  # --warmup 0: none
    assert benchlib.seconds("1e-9") == 1e-9


def test_the_warm_up_is_seconds_at_most_half_a_second_unless_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_script(BENCH_DIR / "pvcalls_bench.py", "pvcalls_bench")
    warmups: list[float] = []

    def record(args: object, keys: object, warmup: float, interrupts: object) -> int:
        warmups.append(warmup)
        return 0

    monkeypatch.setattr(bench, "_bench", record)
    for argv in (["--seconds", "2"], ["--seconds", "0.2"], ["--seconds", "2", "--warmup", "0"],
                 ["--warmup", "1.5"]):
        assert bench.main(argv) == 0
    assert warmups == [0.5, 0.2, 0.0, 1.5]
