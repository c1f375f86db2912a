"""bench/workqueue_bench.py on Ctrl-C: the first ends the measurement under
way as usual and then the run, the second ends it at once; either way it
says so, exits 130 with no traceback and no table, and leaves no
workqueue or thread of its own running."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from benchrun import BENCH_DIR, interrupt
from scripts import load_script

BENCH = BENCH_DIR / "workqueue_bench.py"


def test_ctrl_c_from_the_terminal(tmp_path: Path) -> None:
    run = interrupt([sys.executable, str(BENCH), "--quick", "--no-write"],
                    "(a) queue_work of distinct Work items")
    assert run.returncode == 130, run.stderr
    assert "interrupted: stopping once this measurement is done" in run.stderr
    assert run.stderr.endswith("workqueue_bench: interrupted, no results\n"), run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout == ""  # no table
    assert not run.left_running


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The benchmark as a module, recording the workqueues it makes and
    which scenarios ran to their end."""
    module: Any = load_script(BENCH, "workqueue_bench")
    module.made, module.ran = [], []
    # What the run must leave: the default handler, or SIG_IGN in a
    # pytest started in the background (a shell's job ignores SIGINT).
    module.sigint_before = signal.getsignal(signal.SIGINT)
    alloc = module.alloc_workqueue

    def alloc_recorded(*args: Any, **kwargs: Any) -> Any:
        wq = alloc(*args, **kwargs)
        module.made.append(wq)
        return wq

    monkeypatch.setattr(module, "alloc_workqueue", alloc_recorded)
    for name in ("a_workqueue", "a_tpe", "b_workqueue", "b_tpe"):
        monkeypatch.setattr(module, name, _recorded(module, name, getattr(module, name)))
    return module


def _recorded(module: Any, name: str, scenario: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        result = scenario(*args)
        module.ran.append(name)
        return result

    return run


def _ctrl_c(module: ModuleType, name: str, times: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make scenario ``name`` press Ctrl-C ``times`` times as it starts."""
    scenario = getattr(module, name)

    def interrupted(*args: Any) -> Any:
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)
        return scenario(*args)

    monkeypatch.setattr(module, name, interrupted)


def _own_threads(before: set[int | None]) -> list[str]:
    # The workqueue's shared pool workers and timer belong to the process,
    # as kworkers do, not to a workqueue: they stay.
    return [t.name for t in threading.enumerate()
            if t.ident not in before and not t.name.startswith(("kworker/", "wq-"))]


def _check_stopped(bench: Any, capsys: pytest.CaptureFixture[str], before: set[int | None]) -> None:
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("workqueue_bench: interrupted, no results\n"), err
    assert signal.getsignal(signal.SIGINT) is bench.sigint_before
    assert bench.made
    for wq in bench.made:
        with pytest.raises(RuntimeError, match="is destroyed"):
            wq.queue_work(bench.Work(print))
    assert _own_threads(before) == []


def test_the_first_ctrl_c_ends_the_measurement_under_way(
        bench: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _ctrl_c(bench, "a_workqueue", 1, monkeypatch)
    before = {t.ident for t in threading.enumerate()}
    assert bench.main(["--quick", "--no-write"]) == 130
    # (a) ran to its end, both sides; nothing after it started.
    assert bench.ran == ["a_workqueue", "a_tpe"]
    _check_stopped(bench, capsys, before)


def test_a_second_ctrl_c_ends_the_run_at_once(
        bench: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _ctrl_c(bench, "b_tpe", 2, monkeypatch)
    before = {t.ident for t in threading.enumerate()}
    assert bench.main(["--quick", "--no-write"]) == 130
    assert "b_tpe" not in bench.ran and "b_workqueue" in bench.ran
    _check_stopped(bench, capsys, before)


def test_the_table_says_which_way_its_ratios_go(capsys: pytest.CaptureFixture[str]) -> None:
    bench: Any = load_script(BENCH, "workqueue_bench")
    assert bench.main(["--quick", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "| ratio (> 1x: workqueue better) | ratio by CPU time |" in out
    assert bench.RATIOS in out
    # The latency rows' ratio is TPE's time over workqueue's.
    row = next(line for line in out.splitlines() if "latency p50" in line)
    ours, base, ratio = (float(cell.strip().rstrip("x").replace(",", ""))
                         for cell in row.split("|")[3:6])
    # The cells are rounded (times to 0.1 us, the ratio to 0.01): at a
    # microsecond or two that moves base / ours by several percent, so the
    # ratio is checked against the bounds the rounded times allow.
    low = (base - 0.05) / (ours + 0.05) - 0.005
    high = (base + 0.05) / max(ours - 0.05, 1e-9) + 0.005
    assert low <= ratio <= high, (ours, base, ratio)


def test_a_ctrl_c_while_profiling_ends_the_run_with_no_profile(
        bench: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # The profiled scenario is the measurement under way: it ends, and
    # then the run, with no results, as the table's run does.
    _ctrl_c(bench, "a_workqueue", 1, monkeypatch)
    before = {t.ident for t in threading.enumerate()}
    assert bench.main(["--quick", "--profile", "a"]) == 130
    assert bench.ran == ["a_workqueue"]
    _check_stopped(bench, capsys, before)


def test_a_measurement_that_fails_its_check_fails_the_run_with_why(
        bench: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    check = bench.c_check

    def out_of_order(seen: dict[int, list[int]], keys: int, per_key: int) -> None:
        seen[0].reverse()  # as if key 0's calls had run out of order
        check(seen, keys, per_key)

    monkeypatch.setattr(bench, "c_check", out_of_order)
    assert bench.main(["--quick", "--no-write"]) == 1
    out, err = capsys.readouterr()
    assert out == ""  # no table
    assert err.endswith(
        "workqueue_bench: FAILED, no results: key 0 ran out of order or lost items\n"), err
    assert "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is bench.sigint_before
    for wq in bench.made:  # the failing scenario's workqueue too
        with pytest.raises(RuntimeError, match="is destroyed"):
            wq.queue_work(bench.Work(print))


def test_a_quick_run_leaves_the_results_file_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bench: Any = load_script(BENCH, "workqueue_bench")
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "workqueue.md")
    assert bench.main(["--quick"]) == 0  # a smoke run, as its --help says
    assert "| benchmark |" in capsys.readouterr().out
    assert not (tmp_path / "workqueue.md").exists()


def test_a_sigterm_ends_the_run_at_once(
        bench: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Only Ctrl-C waits for the measurement under way.
    scenario = bench.b_tpe

    def terminated(*args: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return scenario(*args)

    monkeypatch.setattr(bench, "b_tpe", terminated)
    before = {t.ident for t in threading.enumerate()}
    sigterm_before = signal.getsignal(signal.SIGTERM)
    assert bench.main(["--quick", "--no-write"]) == 143
    assert "b_tpe" not in bench.ran and "b_workqueue" in bench.ran
    assert signal.getsignal(signal.SIGTERM) is sigterm_before
    _check_stopped(bench, capsys, before)
