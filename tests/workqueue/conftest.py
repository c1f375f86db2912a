"""Fixtures for the workqueue engine tests.

Every test gets its own Topology, hence its own pools and threads, and every
workqueue made through `make_wq` is destroyed at the end of the test (a test
that leaves an item blocked fails here rather than hanging the run).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from workqueue import Topology, Work, Workqueue, alloc_ordered_workqueue, alloc_workqueue
from workqueue._timer import add_timer

TIMEOUT = 10.0


@pytest.fixture(scope="session")
def can_pin() -> bool:
    """Whether this process may pin threads (sched_setaffinity)."""
    try:
        os.sched_setaffinity(0, os.sched_getaffinity(0))
    except OSError:
        return False
    return True


@pytest.fixture
def topo() -> Topology:
    return Topology(2, cpu_intensive_thresh=60.0)


@pytest.fixture
def make_wq(topo: Topology) -> Iterator[Callable[..., Workqueue]]:
    made: list[Workqueue] = []

    def make(name: str = "test", flags: int = 0, max_active: int = 0, *,
             ordered: bool = False, topology: Topology | None = None) -> Workqueue:
        if ordered:
            wq = alloc_ordered_workqueue(name, flags, topology=topology or topo)
        else:
            wq = alloc_workqueue(name, flags, max_active, topology=topology or topo)
        made.append(wq)
        return wq

    yield make
    for wq in made:
        if wq._state < 2:  # not being destroyed or destroyed
            wq.thaw()
            t = threading.Thread(target=wq.destroy, daemon=True)
            t.start()
            t.join(TIMEOUT)
            assert not t.is_alive(), f"destroy() of {wq!r} hung:\n{wq.dump()}"


class Tracer:
    """A trace hook that records (event, work, cpu) and lets tests wait on them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: list[tuple[str, Work, int | None]] = []

    def __call__(self, event: str, work: Any, cpu: int | None) -> None:
        with self.cond:
            self.events.append((event, work, cpu))
            self.cond.notify_all()

    def of(self, work: Work) -> list[str]:
        with self.cond:
            return [e for e, w, _ in self.events if w is work]

    def cpus(self, event: str, work: Work) -> list[int | None]:
        with self.cond:
            return [c for e, w, c in self.events if w is work and e == event]

    def wait_for(self, pred: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        with self.cond:
            assert self.cond.wait_for(pred, timeout), f"timed out; events: {self.events}"


class LogWaiter(logging.Handler):
    """A logging handler that lets a test wait for a matching record."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.records: list[logging.LogRecord] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.records.append(record)
            self.seen.set()


@pytest.fixture
def log_waiter() -> Iterator[Callable[[str, str], LogWaiter]]:
    installed: list[tuple[logging.Logger, LogWaiter]] = []

    def install(logger_name: str, needle: str) -> LogWaiter:
        handler = LogWaiter(needle)
        logger = logging.getLogger(logger_name)
        logger.addHandler(handler)
        installed.append((logger, handler))
        # The timer thread outlives every test: a callback of an earlier
        # test's (a watchdog check, which logs once it dropped the engine
        # lock) may still be logging, about a pool named as this test's
        # are.  Timers fire in deadline order on that one thread, so once
        # a timer due now has fired, that callback is over; what it
        # logged is not this test's, which starts what it waits for only
        # after installing the handler.
        done = threading.Event()
        add_timer(0, lambda arg: done.set())
        assert done.wait(TIMEOUT), "the timer thread is stuck in a callback"
        handler.records.clear()
        handler.seen.clear()
        return handler

    yield install
    for logger, handler in installed:
        logger.removeHandler(handler)


@pytest.fixture
def tracer() -> Tracer:
    return Tracer()
