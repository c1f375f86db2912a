"""The race-window helpers (tests/racewindow.py): a pause that the test
itself outwaited fails it, and a recurring line is found past another."""

from __future__ import annotations

import threading

import pytest
import racewindow
from racewindow import PauseAt, line_of


def _twice() -> int:
    n = 0
    with threading.Lock():
        n += 1
    marker = n
    with threading.Lock():
        n += marker
    return n


def test_a_recurring_line_is_found_past_another() -> None:
    first = line_of(_twice, "with threading.Lock():")
    second = line_of(_twice, "with threading.Lock():", after="marker = n")
    assert second == first + 3
    with pytest.raises(ValueError, match="past 'return n'"):
        line_of(_twice, "with threading.Lock():", after="return n")


def test_a_pause_that_went_on_at_its_timeout_fails_the_resume(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(racewindow, "TIMEOUT", 0.05)
    pause = PauseAt(_twice, "marker = n")
    assert pause.run(_twice) == 2  # here: nobody resumes it
    with pytest.raises(AssertionError, match=r"line \d+ of _twice went on at its 0.05 s timeout"):
        pause.resume()


def test_a_pause_resumed_in_time_passes() -> None:
    pause = PauseAt(_twice, "marker = n")
    results: list[int] = []
    paused = threading.Thread(target=lambda: results.append(pause.run(_twice)))
    paused.start()
    assert pause.reached.wait(racewindow.TIMEOUT)
    assert results == []
    pause.resume()
    paused.join(racewindow.TIMEOUT)
    assert results == [2]
