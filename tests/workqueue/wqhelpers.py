"""Checks shared by the workqueue tests: that something waits, and for
what (a bounded wait proves the first half, an event the second)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from workqueue import Work

TIMEOUT = 10.0


def wait_until(predicate: Callable[[], object], what: str = "the condition holds",
               timeout: float = TIMEOUT) -> None:
    """Poll a state that another thread (a worker, the timer thread)
    reaches, failing with *what* if it is not reached in time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.0005)


def assert_waits_until_released(call: Callable[[], object], release: threading.Event,
                                what: str) -> None:
    """Run ``call()`` in a thread: it must still be waiting a moment after
    it started, and return once ``release`` is set (set in any case, so
    that a failure leaves nothing held)."""
    thread = threading.Thread(target=call, daemon=True)
    try:
        thread.start()
        thread.join(0.05)
        assert thread.is_alive(), f"{what} returned before it was released"
    finally:
        release.set()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"{what} did not return once released"


def assert_next_run_waits(queue_first: Callable[[Any], bool],
                          queue_again: Callable[[Any], bool],
                          meanwhile: Callable[[], object] = lambda: None,
                          *, item: type[Work] = Work) -> Any:
    """Hold an item's run, queue it again where an idle worker could take
    it, and check that the second run waits for the first.  Returns the
    item (an ``item``: Work or DelayedWork), both runs over."""
    started, release, first_done, second = (threading.Event() for _ in range(4))
    saw: list[bool] = []

    def func(work: Work) -> None:
        if not started.is_set():
            started.set()
            assert release.wait(TIMEOUT)
            first_done.set()
        else:
            saw.append(first_done.is_set())
            second.set()

    w = item(func)
    assert queue_first(w) is True
    try:
        assert started.wait(TIMEOUT)
        meanwhile()
        assert queue_again(w) is True
        assert not second.wait(0.2), "second run started while the first was still running"
    finally:
        release.set()
    assert second.wait(TIMEOUT)
    w.flush()
    assert saw == [True]
    return w
