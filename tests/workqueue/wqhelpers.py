"""Checks shared by the workqueue tests: that something waits, and for
what (a bounded wait proves the first half, an event the second)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from workqueue import DelayedWork, Work, Workqueue

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


# How long a repr() of CallsInRepr waits for its call into the workqueue:
# the engine lock is held for bookkeeping only, never this long, unless
# the repr itself runs under it.
REPR_CALL_BOUND = 5.0


def calls_into(wq: Workqueue) -> bool:
    """Whether a call into *wq* (``wq.stats()``), made from another thread,
    got through within REPR_CALL_BOUND: made by the program's code that
    the engine runs, a False says it ran under the engine lock (which is
    not reentrant), and fails the test rather than deadlock it."""
    done = threading.Event()

    def call_in() -> None:
        wq.stats()
        done.set()

    threading.Thread(target=call_in, daemon=True).start()
    return done.wait(REPR_CALL_BOUND)


class _CallsInRepr:
    """A work item whose repr() calls into its workqueue (``wq.stats()``,
    as a repr that shows its queue's load may) and records, in ``reprs``,
    whether the call got through.  It makes the call from another thread,
    for at most REPR_CALL_BOUND: a repr() that the engine runs under its
    lock then fails the test rather than deadlock every workqueue of the
    process (the lock is not reentrant)."""

    wq: Workqueue
    reprs: list[bool]

    def __init__(self, func: Callable[[Any], object], wq: Workqueue) -> None:
        super().__init__(func)  # type: ignore[call-arg]  # the Work's
        self.wq = wq
        self.reprs = []

    def __repr__(self) -> str:
        got_through = calls_into(self.wq)
        self.reprs.append(got_through)
        name = type(self).__name__
        return f"<{name}>" if got_through else f"<{name} named under the engine lock>"


class CallsInRepr(_CallsInRepr, Work):
    pass


class DelayedCallsInRepr(_CallsInRepr, DelayedWork):
    pass


class _Hook:
    """A trace hook that hands each trace point to *func*."""

    def __init__(self, func: Callable[[str, Any, int | None], object]) -> None:
        self.func = func

    def __call__(self, event: str, work: Any, cpu: int | None) -> None:
        self.func(event, work, cpu)


class CallsInReprHook(_CallsInRepr, _Hook):
    pass


class CallsInEqHook(_Hook):
    """A trace hook whose == calls into *wq* (as a hook comparing the
    state of its connection may) and records, in ``eqs``, whether the
    call got through (see calls_into); equal to itself alone."""

    def __init__(self, func: Callable[[str, Any, int | None], object], wq: Workqueue) -> None:
        super().__init__(func)
        self.wq = wq
        self.eqs: list[bool] = []

    def __eq__(self, other: object) -> bool:
        self.eqs.append(calls_into(self.wq))
        return self is other

    __hash__ = object.__hash__


def named_unlocked(*items: _CallsInRepr) -> bool:
    """Whether every repr() of *items* ran with the engine lock free (and
    each was named at least once)."""
    return all(item.reprs and all(item.reprs) for item in items)


def bounded(call: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """``call()`` in a daemon thread: what it returned, or raise what it
    raised; fail saying *what* hung if it is not over in *timeout* (a
    deadlock then leaves only that thread stuck, not the run)."""
    outcome: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the test's thread
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(timeout), f"{what} hung"
    ((returned, value),) = outcome
    if not returned:
        raise value
    return value
