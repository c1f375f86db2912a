"""xenback.ratelimit: the kernel's printk_ratelimited, for what a guest can
make a backend log."""

from __future__ import annotations

import itertools
import logging
import os
import threading
from pathlib import Path

import pytest

from tests.racewindow import TIMEOUT, PauseAt, stands_at
from tests.sim.hosthelpers import eventually
from tests.stolensignal import interrupted_at
from xenback import RateLimit

logger = logging.getLogger("xenback.test.ratelimit")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger.name]


def test_a_burst_per_interval_then_the_count_of_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=logger.name)
    clock = Clock()
    limit = RateLimit("dom7", interval=5.0, burst=3, clock=clock)
    sent = [limit.log(logger, logging.WARNING, "refused %d", i) for i in range(8)]
    assert sent == [True] * 3 + [False] * 5
    assert messages(caplog) == ["refused 0", "refused 1", "refused 2"]

    clock.now += 4.9  # the same interval
    assert not limit.log(logger, logging.WARNING, "refused %d", 8)
    clock.now += 0.1  # the next one: the count goes out before the message
    assert limit.log(logger, logging.WARNING, "refused %d", 9)
    assert messages(caplog)[3:] == ["dom7: 6 messages suppressed", "refused 9"]
    record = caplog.records[-2]
    assert record.levelno == logging.WARNING


def test_repr_says_whose_limit_it_is_and_what_it_holds_back() -> None:
    limit = RateLimit("dom8", interval=0.5, burst=1, clock=Clock())
    limit()
    limit()
    assert repr(limit) == "<RateLimit dom8 1 per 0.5 s missed=1>"


def test_close_reports_what_is_left_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=logger.name)
    limit = RateLimit("dom3", burst=1, clock=Clock())
    limit.close(logger)  # nothing suppressed: nothing said
    assert messages(caplog) == []
    limit.log(logger, logging.INFO, "first")
    limit.log(logger, logging.INFO, "second")
    limit.close(logger)
    limit.close(logger)
    assert messages(caplog) == ["first", "dom3: 1 message suppressed"]
    assert caplog.records[-1].levelno == logging.WARNING


def test_threads_share_one_burst() -> None:
    limit = RateLimit("dom1", burst=10, clock=Clock())
    results: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def take() -> None:
        start.wait()
        for _ in range(100):
            allowed, _ = limit()
            with lock:
                results.append(allowed)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 400
    assert results.count(True) == 10
    assert limit() == (False, 0)


def test_a_message_taken_between_the_check_and_the_count_waits() -> None:
    """One thread stopped after it found room in the burst, before it
    counted itself: another must wait for it, not find the same room."""
    limit = RateLimit("dom1", burst=1, clock=Clock())
    pause = PauseAt(RateLimit.__call__, "self._printed += 1")
    first: list[tuple[bool, int]] = []
    second: list[tuple[bool, int]] = []
    a = threading.Thread(target=lambda: first.append(pause.run(limit)))
    a.start()
    try:
        assert pause.reached.wait(TIMEOUT)
        b = threading.Thread(target=lambda: second.append(limit()))
        b.start()
        assert eventually(lambda: bool(second) or stands_at(
            b.ident or 0, RateLimit.__call__, "with self._lock:"), TIMEOUT)
    finally:
        pause.resume()
        a.join(TIMEOUT)
    b.join(TIMEOUT)
    assert (first, second) == ([(True, 0)], [(False, 0)])


@pytest.mark.parametrize(("kwargs", "exc", "said"), [
    ({"interval": 0}, ValueError, "interval must be a finite number of seconds above 0, got 0"),
    ({"interval": float("inf")}, ValueError, "got inf"),
    ({"interval": float("nan")}, ValueError, "got nan"),
    ({"interval": "5"}, TypeError, "interval must be a number of seconds, not str"),
    ({"interval": True}, TypeError, "not bool"),
    ({"burst": 0}, ValueError, "burst must be at least 1, got 0"),
    ({"burst": 2.0}, TypeError, "burst must be an int, not float"),
    ({"burst": True}, TypeError, "burst must be an int, not bool"),
])
def test_bad_arguments_are_refused(kwargs: dict[str, object], exc: type[Exception],
                                   said: str) -> None:
    with pytest.raises(exc, match=said):
        RateLimit("dom1", **kwargs)  # type: ignore[arg-type]


def test_each_interval_reports_only_its_own_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=logger.name)
    clock = Clock()
    limit = RateLimit("dom2", interval=5.0, burst=1, clock=clock)
    for n in (3, 2, 1):  # 2, then 1 suppressed in the intervals after the first
        for _ in range(n):
            limit.log(logger, logging.WARNING, "refused")
        clock.now += 5.0
    limit.close(logger)  # nothing left
    assert messages(caplog) == ["refused", "dom2: 2 messages suppressed", "refused",
                                "dom2: 1 message suppressed", "refused"]


def test_the_count_goes_out_at_the_level_of_the_message_after_it(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=logger.name)
    clock = Clock()
    limit = RateLimit("dom4", burst=1, clock=clock)
    limit.log(logger, logging.INFO, "first")
    limit.log(logger, logging.INFO, "second")
    clock.now += limit.interval
    limit.log(logger, logging.INFO, "third")
    assert [(r.getMessage(), r.levelno) for r in caplog.records if r.name == logger.name] == [
        ("first", logging.INFO),
        ("dom4: 1 message suppressed", logging.INFO),
        ("third", logging.INFO),
    ]


def test_a_line_let_through_carries_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A driver's bug that the guest can set off again and again is worth
    its traceback, within the guest's budget like any other line."""
    caplog.set_level(logging.INFO, logger=logger.name)
    limit = RateLimit("dom5", burst=1, clock=Clock())
    try:
        raise LookupError("no such queue")
    except LookupError as exc:
        caught = exc
    assert limit.log(logger, logging.ERROR, "failed: %s", "x", exc_info=caught)
    assert not limit.log(logger, logging.ERROR, "failed again", exc_info=caught)
    (record,) = [r for r in caplog.records if r.name == logger.name]
    assert record.getMessage() == "failed: x"
    assert record.exc_info is not None and record.exc_info[1] is caught
    assert "LookupError: no such queue" in caplog.text


def test_a_line_names_its_caller_not_the_rate_limit(caplog: pytest.LogCaptureFixture) -> None:
    """The log's file and line are where the line was said: every line of
    every guest's rate limit came from ratelimit.py, which tells nothing."""
    caplog.set_level(logging.INFO, logger=logger.name)
    limit = RateLimit("dom6", burst=1, clock=Clock())
    limit.log(logger, logging.INFO, "said here")
    limit.log(logger, logging.INFO, "suppressed")
    limit.close(logger)
    said, suppressed = [r for r in caplog.records if r.name == logger.name]
    here = (Path(__file__).name, "test_a_line_names_its_caller_not_the_rate_limit")
    assert (said.filename, said.funcName) == here
    assert (suppressed.filename, suppressed.funcName) == here


def _suppressed(caplog: pytest.LogCaptureFixture) -> int:
    """How many suppressed messages the lines said so far counted."""
    said = 0
    for line in messages(caplog):
        if line.startswith("dom5: ") and "suppressed" in line:
            said += int(line.split()[1])
    return said


@pytest.mark.parametrize("how", ["close", "log"])
def test_a_count_reported_as_a_ctrl_c_lands_anywhere_is_said_once(
        caplog: pytest.LogCaptureFixture, how: str) -> None:
    """A Ctrl-C landing anywhere in close(), or in a log() that reports
    the count as a new interval begins: the count taken off the limit
    and not said yet was lost.  Said by the call, or by the next report,
    once."""
    import xenback.ratelimit

    within = os.path.dirname(xenback.ratelimit.__file__)
    caplog.set_level(logging.INFO, logger=logger.name)
    landed: list[str] = []
    for n in itertools.count():
        caplog.clear()
        clock = Clock()
        limit = RateLimit("dom5", burst=1, clock=clock)
        for _ in range(4):
            limit.log(logger, logging.WARNING, "refused")  # 3 suppressed
        clock.now += limit.interval

        def report(limit: RateLimit = limit) -> None:
            if how == "close":
                limit.close(logger)
            else:
                limit.log(logger, logging.WARNING, "refused")

        where = interrupted_at(n, within, report)
        if where:
            limit.close(logger)  # the next report
        assert _suppressed(caplog) == 3, f"interrupted {where}: {messages(caplog)}"
        if not where:
            break
        landed.append(where)
    assert any("RateLimit" in where for where in landed), landed
