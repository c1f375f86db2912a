"""Ctrl-C reaches a main thread that waits for work items.

The kernel gives a process's signal to any thread that does not block it
(a worker being started takes one that is pending), CPython runs the
handler in the main thread only, and a main thread asleep in a lock wakes
only for a signal given to it.  Each wait of the main thread must still let
the handler run soon, not when the work item ends.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import os
import sys
import threading
import time
import unittest.mock
from collections.abc import Callable
from typing import Any

import pytest
from racewindow import Attempt, stands_at
from stolensignal import (
    OUTLASTS_THE_TEST,
    Interrupted,
    interrupt,
    interrupted_as_call_returns,
    interrupted_as_frame_starts,
    interrupted_at,
    main_thread_in,
    main_thread_within,
    signal_taken_elsewhere,
)
from wqhelpers import wait_until

import workqueue
from workqueue import DelayedWork, Work, Workqueue, _pool, _serial, _timer
from workqueue._future import LeanFuture, _sleeping, cancel_pending_futures
from workqueue._serial import cancel_serial_calls, close_serial
from workqueue._topology import idempotent_notifier

TIMEOUT = 10.0


def main_sleeps_in_a_wait() -> bool:
    return main_thread_in("sleep_on", "wait", "_wait", path="/workqueue/")


@pytest.mark.parametrize("call", ["flush", "cancel_sync", "flush_workqueue", "drain", "result"])
def test_a_signal_another_thread_took_interrupts_a_wait(
        make_wq: Callable[..., Workqueue], call: str) -> None:
    wq = make_wq()
    release = threading.Event()
    started = threading.Semaphore(0)

    def stuck(work: Work) -> None:
        started.release()
        # Released at the end of the test: a wait that the signal did not
        # end, but the item's end would, is a test timeout.
        assert release.wait(OUTLASTS_THE_TEST)

    work = Work(stuck)
    calls: dict[str, Callable[[], object]] = {
        "flush": work.flush,
        "cancel_sync": work.cancel_sync,
        "flush_workqueue": wq.flush,
        "drain": wq.drain,
        "result": lambda: wq.submit(stuck, work).result(),
    }
    if call != "result":
        wq.queue_work(work)
        assert started.acquire(timeout=TIMEOUT)

    try:
        with signal_taken_elsewhere(main_sleeps_in_a_wait):
            with pytest.raises(Interrupted):
                calls[call]()
    finally:
        release.set()
    work.flush()
    # The interrupted call left nothing behind: the item queues and runs.
    assert wq.queue_work(work)
    work.flush()


@pytest.mark.parametrize("then", ["destroy", "shutdown"])
@pytest.mark.parametrize("call", ["destroy", "shutdown"])
def test_an_interrupted_destroy_still_waits_for_the_items(
        make_wq: Callable[..., Workqueue], call: str, then: str) -> None:
    """Ctrl-C while destroy() (or shutdown()) drains: the workqueue must
    not be released under items still queued or running.  Its destruction
    goes on without the caller; a second destroy() or shutdown(wait=True)
    waits for its end, and the items run to the end, queueing themselves
    again (as drain allows)."""
    wq = make_wq()
    release = threading.Event()
    started = threading.Semaphore(0)
    runs: list[int] = []

    def stuck(work: Work) -> None:
        started.release()
        assert release.wait(TIMEOUT)
        runs.append(len(runs))
        if len(runs) < 3:
            wq.queue_work(work)  # chained: allowed while draining

    work = Work(stuck)
    wq.queue_work(work)
    assert started.acquire(timeout=TIMEOUT)
    try:
        interrupt(main_sleeps_in_a_wait, wq.destroy if call == "destroy" else wq.shutdown)
        assert not wq._destroyed.is_set()
        errors: list[BaseException] = []

        def wait_for_the_end() -> None:
            try:
                getattr(wq, then)()
            except BaseException as exc:
                errors.append(exc)

        waiter = threading.Thread(target=wait_for_the_end)
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()  # the item still runs
    finally:
        release.set()
    waiter.join(TIMEOUT)
    assert not waiter.is_alive() and errors == []
    assert runs == [0, 1, 2]
    assert not work.pending and not work.running
    assert wq._destroyed.is_set()
    with pytest.raises(RuntimeError):
        wq.queue_work(work)
    getattr(wq, then)()  # and again: the destruction is over


@pytest.mark.parametrize("call", ["result", "exception"])
def test_an_interrupted_result_leaves_no_sleeper_behind(
        make_wq: Callable[..., Workqueue], call: str) -> None:
    """Ctrl-C in Future.result(): the lock it slept on leaves the future's
    list, as after a timeout (each interrupted call would add one more)."""
    wq = make_wq()
    release = threading.Event()
    future: Any = wq.submit(release.wait, TIMEOUT)
    try:
        for _ in range(2):
            interrupt(main_sleeps_in_a_wait, lambda: getattr(future, call)())
            assert not future._blocked
    finally:
        release.set()
    assert future.result(TIMEOUT) is True


@pytest.mark.parametrize("call", ["result", "exception"])
def test_ctrl_c_anywhere_in_result_leaves_no_sleeper_behind(call: str) -> None:
    """Wherever Ctrl-C lands in Future.result() or exception() on a future
    not done, the lock it would sleep on is not left on the future's list
    (it was, with Ctrl-C as it was put there, one more per call) and the
    future, done later, wakes nobody twice."""

    def attempt(interrupted: Callable[[Callable[[], object]], None]) -> None:
        future = LeanFuture()
        interrupted(lambda: getattr(future, call)(0.001))
        assert not future._blocked, future._blocked
        future.set_result(1)
        assert getattr(future, call)(0) == (1 if call == "result" else None)

    assert at_every_place(attempt) > 3


def test_a_drain_failing_in_a_destruction_leaves_no_uncaught_exception(
        make_wq: Callable[..., Workqueue], monkeypatch: pytest.MonkeyPatch) -> None:
    """destroy()'s drain fails, and the caller hears it.  The destruction
    still ends, in the thread that destroy() hands it to, which logs its
    own drain's failure instead of dying with a traceback.  (A freeze was
    such a failure once; now refused once the destruction began.)"""
    wq = make_wq()

    def failing(deadline: float | None) -> bool:
        raise RuntimeError("the drain failed")

    wq._drain = failing  # type: ignore[method-assign]
    uncaught: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    with pytest.raises(RuntimeError, match="the drain failed"):
        wq.destroy()
    assert wq._destroyed.wait(TIMEOUT)
    for t in threading.enumerate():
        if t.name == f"{wq.name}-shutdown":
            t.join(TIMEOUT)
    assert uncaught == []


@pytest.mark.parametrize("where", [
    "as __enter__ took the lock",  # the with block not yet entered
    "as __exit__ started",  # the with block left, the lock not yet released
])
def test_an_interrupt_as_a_delayed_item_is_queued_leaves_the_timer_free(
        make_wq: Callable[..., Workqueue], where: str) -> None:
    # The timer's blocks were ``with`` on a threading.Condition, whose
    # __enter__ and __exit__ are Python functions: Ctrl-C in the main
    # thread as it went in or out left the timer's lock held, and every
    # delayed item of the process stood still (each later queue_delayed_work
    # from the main thread hung).
    wq = make_wq()
    # The timer thread started first: Thread.start() waits on a Condition
    # of threading's own, which the interrupt would otherwise find.
    started = threading.Event()
    assert wq.queue_delayed_work(DelayedWork(lambda w: started.set()), 0.001)
    assert started.wait(TIMEOUT)
    first = DelayedWork(lambda w: None)
    if "__enter__" in where:
        interrupted_as_call_returns(threading.Condition.__enter__.__code__, 0,
                                    lambda: wq.queue_delayed_work(first, 60))
    else:
        interrupted_as_frame_starts(threading.Condition.__exit__.__code__,
                                    lambda: wq.queue_delayed_work(first, 60))
    ran = threading.Event()
    later = DelayedWork(lambda w: ran.set())
    queued = threading.Thread(target=wq.queue_delayed_work, args=(later, 0.01), daemon=True)
    queued.start()
    assert ran.wait(TIMEOUT), "the timer stood still"
    first.cancel_sync()


def test_an_interrupt_as_the_timer_thread_starts_leaves_a_timer_thread_that_fires() -> None:
    """Ctrl-C at each place of the add_timer() that starts the timer
    thread, Thread.start() starting included: a later timer fires, on the
    thread the timer records (recorded before its start, a thread that
    Ctrl-C kept from starting was taken for the timer thread, and no timer
    of the process fired again)."""

    def attempt(interrupted: Callable[[Callable[[], object]], bool]) -> bool:
        timer = _timer._TimerBase()  # one of its own, with no thread yet
        before = set(threading.enumerate())
        landed = interrupted(lambda: timer.add(0.0, lambda arg: None, None))
        if any(t.name == "wq-timer" for t in set(threading.enumerate()) - before):
            # Started, whether recorded or not: it runs as the timer thread.
            wait_until(lambda: timer._thread is not None, "the timer thread is recorded")
        fired_on: list[threading.Thread] = []
        fired = threading.Event()

        def record(arg: object) -> None:
            fired_on.append(threading.current_thread())
            fired.set()

        timer.add(0.0, record, None)
        assert fired.wait(TIMEOUT), "the timer never fired"
        with timer._lock:
            assert fired_on == [timer._thread]
        return landed

    assert attempt(lambda call: interrupted_as_frame_starts(threading.Thread.start.__code__,
                                                            call))
    n = 0
    while attempt(lambda call, n=n: interrupted_as_call_returns(_timer._TimerBase.add.__code__,
                                                                n, call)):
        n += 1
    assert n >= 5


def test_a_timer_thread_started_again_before_the_first_records_itself_leaves_one() -> None:
    """Ctrl-C as the Thread.start() of the timer thread returns, and the
    next add_timer() taking the lock before the thread started: that one
    starts another, and the first ends at once, leaving one thread to
    fire the timers (two would run callbacks side by side, and a timer
    callback may assume it has the timer thread to itself)."""

    def attempt(n: int) -> bool:
        gate = threading.Event()

        class Gated(_timer._TimerBase):
            def _run(self) -> None:
                assert gate.wait(TIMEOUT)  # both started before either looks
                super()._run()

        timer = Gated()
        before = set(threading.enumerate())
        fired = threading.Event()
        fired_on: list[threading.Thread] = []
        try:
            landed = interrupted_as_call_returns(_timer._TimerBase.add.__code__, n,
                                                 lambda: timer.add(0.0, lambda arg: None, None))
            left = [t for t in set(threading.enumerate()) - before if t.name == "wq-timer"]
            timer.add(0.0, lambda arg: (fired_on.append(threading.current_thread()),
                                        fired.set()), None)
        finally:
            gate.set()
        assert fired.wait(TIMEOUT)
        assert fired_on == [timer._thread]
        for thread in left:
            if thread is not timer._thread:
                thread.join(TIMEOUT)
                assert not thread.is_alive(), f"Ctrl-C at call {n}: two timer threads run"
        return landed

    n = 0
    while attempt(n):
        n += 1
    assert n >= 5


@pytest.mark.parametrize("call", ["flush", "cancel_sync", "flush_workqueue", "drain"])
def test_an_interrupted_wait_leaves_what_a_timeout_leaves(
        make_wq: Callable[..., Workqueue], call: str) -> None:
    """Ctrl-C in a wait is a timeout that raised something else: no flush
    stays registered (each interrupted call would leave one more behind),
    a drain() leaves the workqueue running, and a cancel_sync() goes on
    without its caller -- the item stays cancelling, refusing to be queued
    (by the run it waited for, too), until that run ends (see
    test_timeouts)."""
    wq = make_wq()
    release = threading.Event()
    started = threading.Semaphore(0)
    requeued: list[bool] = []

    def stuck(work: Work) -> None:
        started.release()
        assert release.wait(TIMEOUT)
        if not requeued:  # once: more would keep it queueing itself
            requeued.append(wq.queue_work(work))

    work = Work(stuck)
    wq.queue_work(work)
    assert started.acquire(timeout=TIMEOUT)
    calls: dict[str, Callable[[], object]] = {
        "flush": work.flush, "cancel_sync": work.cancel_sync,
        "flush_workqueue": wq.flush, "drain": wq.drain,
    }
    try:
        interrupt(main_sleeps_in_a_wait, calls[call])
        assert wq._flushers == []
        assert wq._nr_drainers == 0 and "running" in repr(wq)
        if call == "cancel_sync":
            # Only what drops the hold once the run ends.
            assert [type(f).__name__ for _, f in work._flushers or ()] == ["_CancelSync"]
            assert work.disabled and "cancelling" in repr(work)
            assert wq.queue_work(work) is False
        else:
            assert work._flushers is None
    finally:
        release.set()
    work.flush(timeout=TIMEOUT)  # the run, and the one it queued, if it could
    assert requeued == [call != "cancel_sync"]
    work.cancel_sync(timeout=TIMEOUT)
    assert not work.disabled and wq.queue_work(work)
    work.cancel_sync(timeout=TIMEOUT)


def test_an_interrupt_as_cancel_sync_wakes_drops_its_hold(
        make_wq: Callable[..., Workqueue], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C just after the run that cancel_sync() waited for ended (the
    handler runs as the wait returns): nobody is left to drop the item's
    hold but the interrupted call, which must."""
    from workqueue._pool import Completion

    wq = make_wq()
    release = threading.Event()
    started = threading.Semaphore(0)

    def stuck(work: Work) -> None:
        started.release()
        assert release.wait(TIMEOUT)

    work = Work(stuck)
    wq.queue_work(work)
    assert started.acquire(timeout=TIMEOUT)
    real_wait = Completion.wait

    def woke_then_interrupted(self: Completion, timeout: float | None = None) -> bool:
        release.set()
        assert real_wait(self, TIMEOUT)
        raise Interrupted

    monkeypatch.setattr(Completion, "wait", woke_then_interrupted)
    with pytest.raises(Interrupted):
        work.cancel_sync()
    monkeypatch.undo()
    assert not work.disabled and not work.running and work._flushers is None
    assert wq.queue_work(work)
    work.flush(timeout=TIMEOUT)


# -- Ctrl-C anywhere ----------------------------------------------------------
#
# CPython runs a signal's handler in the main thread as a function starts
# or as a call returns, wherever that is; Ctrl-C in a call of ours may land
# at any of them, not only in its wait.  The tests below land it at each
# such place of one call in turn, in every frame of the package, and check
# what the call leaves: never a hold, a flush, a drain or a destruction
# that nothing will end.
#
# But not while the engine lock is held: its blocks are the engine's
# bookkeeping, which Ctrl-C there leaves half-done wherever it lands
# (queue_work() starting a worker, say).  The places of a call between its
# blocks are what the call itself must get right.  (The lock is taken to
# be the caller's when it is held: the other threads here take it only
# for a moment, so a place they make this skip is a rare one left out.)

PACKAGE = os.path.dirname(workqueue.__file__)


def at_every_place(attempt: Callable[[Callable[[Callable[[], object]], None]], None], *,
                   under_the_lock: bool = False) -> int:
    """attempt(interrupted) once per place (see interrupted_at), until
    there is none left: ``interrupted(call)`` runs ``call()`` with Ctrl-C
    landing at the place, a TimeoutError from it being its normal end.
    The places where the engine lock is held count only ``under_the_lock``.
    How many places there were."""
    unless = (lambda: False) if under_the_lock else _pool.lock.locked
    n = 0
    while True:
        landed: list[str] = []

        def interrupted(call: Callable[[], object], n: int = n,
                        landed: list[str] = landed) -> None:
            def ending_in_time() -> None:
                try:
                    call()
                except TimeoutError:
                    pass

            landed.append(interrupted_at(n, PACKAGE, ending_in_time, unless=unless))

        try:
            attempt(interrupted)
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"with Ctrl-C at place {n}, {landed}: {exc}") from exc
        assert len(landed) == 1
        if not landed[0]:
            return n
        n += 1


class Stuck:
    """A work function that runs until released, then tries once to queue
    its item again, as a poller does."""

    def __init__(self, wq: Workqueue, wait: float = TIMEOUT) -> None:
        self.wq = wq
        self.wait = wait  # for its release, at most
        self.started = threading.Event()
        self.release = threading.Event()
        self.requeued: list[bool] = []
        self.tried = threading.Event()

    def __call__(self, work: Work) -> None:
        if self.tried.is_set():
            return
        self.started.set()
        assert self.release.wait(self.wait)
        self.requeued.append(self.wq.queue_work(work))
        self.tried.set()

    def running(self, kind: type[Work] = Work) -> Work:
        work = kind(self)
        assert self.wq.queue_work(work)
        assert self.started.wait(TIMEOUT)
        return work

    def finish(self, work: Work) -> None:
        """Let the run end, and what it queued run too."""
        self.release.set()
        assert self.tried.wait(TIMEOUT)
        work.flush(timeout=TIMEOUT)


def released_as_the_caller_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[Stuck]:
    """The run the main thread waits for ends as it starts to sleep, so
    that a wait without a timeout ends: the Stuck put in the list is
    released there."""
    real_sleep_on = _pool.sleep_on
    current: list[Stuck] = []

    def releasing(lock: Any, timeout: float | None = None) -> bool:
        for stuck in current:
            stuck.release.set()
        return real_sleep_on(lock, TIMEOUT if timeout is None else timeout)

    monkeypatch.setattr(_pool, "sleep_on", releasing)
    return current


@pytest.mark.parametrize("timeout", [0.0, None])
def test_ctrl_c_anywhere_in_cancel_sync_holds_the_item_until_the_run_ends_and_no_longer(
        make_wq: Callable[..., Workqueue], monkeypatch: pytest.MonkeyPatch,
        timeout: float | None) -> None:
    """cancel_sync() interrupted wherever: the item is left either as the
    cancel found it, or cancelling until the run it waits for ends, its
    own queueing refused meanwhile -- and then queueable again (a hold
    left with nobody to drop it refused the item for ever)."""
    wq = make_wq()
    current = released_as_the_caller_sleeps(monkeypatch)

    def attempt(interrupted: Callable[[Callable[[], object]], None]) -> None:
        stuck = Stuck(wq)
        try:
            work = stuck.running()
            current[:] = [stuck] if timeout is None else []
            interrupted(lambda: work.cancel_sync(timeout=timeout))
            with _pool.lock:
                holding = work._disable and work._worker is not None
            stuck.finish(work)
            if holding:
                assert stuck.requeued == [False]
            with _pool.lock:
                assert not work._disable and work._flushers is None, repr(work)
            assert wq.queue_work(work)
            # Not asserted True: an idle worker may take the item (whose
            # run now returns at once) before this finds it pending.
            work.cancel_sync(timeout=TIMEOUT)
        finally:
            stuck.release.set()  # a failed check must not leave it running

    assert at_every_place(attempt) > 10


@pytest.mark.parametrize("call", ["flush", "disable_sync", "DelayedWork.flush"])
def test_ctrl_c_anywhere_in_a_flush_of_an_item_leaves_no_flush_registered(
        make_wq: Callable[..., Workqueue], call: str) -> None:
    wq = make_wq()

    def attempt(interrupted: Callable[[Callable[[], object]], None]) -> None:
        stuck = Stuck(wq)
        try:
            work = stuck.running(DelayedWork if call == "DelayedWork.flush" else Work)
            if isinstance(work, DelayedWork):
                assert wq.queue_delayed_work(work, 3600)  # flush() queues it at once
            method = work.disable_sync if call == "disable_sync" else work.flush
            interrupted(lambda: method(timeout=0))
            with _pool.lock:
                assert work._flushers is None, repr(work)
                assert work._disable in ((0, 1) if call == "disable_sync" else (0,)), repr(work)
            if work.disabled:
                assert work.enable()
            stuck.finish(work)
            work.cancel_sync(timeout=TIMEOUT)
        finally:
            stuck.release.set()  # a failed check must not leave it running

    assert at_every_place(attempt) > 10


@pytest.mark.parametrize("call", ["flush", "drain"])
def test_ctrl_c_anywhere_in_a_flush_of_the_workqueue_leaves_it_as_it_was(
        make_wq: Callable[..., Workqueue], call: str) -> None:
    """No flush registered, no drain left holding the workqueue (one left
    refused everyone's queueing for ever)."""
    wq = make_wq()

    def attempt(interrupted: Callable[[Callable[[], object]], None]) -> None:
        stuck = Stuck(wq)
        try:
            work = stuck.running()
            interrupted(lambda: getattr(wq, call)(timeout=0))
            with _pool.lock:
                left = wq._flushers, wq._nr_drainers
            assert left == ([], 0), wq.dump()
            assert "running" in repr(wq)
            other = Work(lambda w: None)
            assert wq.queue_work(other)
            stuck.finish(work)
            other.flush(timeout=TIMEOUT)
        finally:
            stuck.release.set()  # a failed check must not leave it running

    assert at_every_place(attempt) > 10


@pytest.mark.parametrize("call", ["destroy", "shutdown"])
def test_ctrl_c_anywhere_in_destroy_leaves_a_destruction_that_ends(
        make_wq: Callable[..., Workqueue], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, call: str) -> None:
    """destroy() (or shutdown(), cancelling futures) interrupted wherever:
    the workqueue is left as it was, or its destruction goes on without
    the caller and ends, a second destroy() waiting for it; "already
    destroyed" only once it is (one left half-way was never released, and
    a shutdown(wait=True) elsewhere waited for ever).  On one thread at
    most, which finds nothing wrong (one handed a destruction that was
    over drained a destroyed workqueue, and logged that it failed)."""
    current = released_as_the_caller_sleeps(monkeypatch)
    handed: list[Workqueue] = []
    real_drain_and_release = Workqueue._drain_and_release

    def drain_and_release(wq: Workqueue) -> None:
        handed.append(wq)
        real_drain_and_release(wq)

    monkeypatch.setattr(Workqueue, "_drain_and_release", drain_and_release)
    caplog.set_level(logging.ERROR, logger="workqueue")

    def attempt(interrupted: Callable[[Callable[[], object]], None]) -> None:
        wq = make_wq()
        stuck = Stuck(wq)
        try:
            work = stuck.running()
            if call == "destroy":
                interrupted(lambda: wq.destroy(timeout=0))
            else:
                current[:] = [stuck]
                interrupted(lambda: wq.shutdown(cancel_futures=True))
            stuck.release.set()
            try:
                wq.destroy(timeout=TIMEOUT)
            except RuntimeError as exc:
                assert "already destroyed" in str(exc)
                assert wq._destroyed.is_set(), wq.dump()
            assert wq._destroyed.wait(TIMEOUT), wq.dump()
            assert not work.pending and not work.running
            with pytest.raises(RuntimeError, match="destroyed"):
                wq.queue_work(work)
            thread = wq._destroy_thread
            if thread is not None:
                thread.join(TIMEOUT)
            assert handed.count(wq) <= 1, "the destruction was handed off twice"
            assert not caplog.records, caplog.text
        finally:
            stuck.release.set()  # a failed check must not leave it running

    assert at_every_place(attempt) > 10


def test_an_interrupted_freeze_leaves_what_a_timeout_leaves(
        make_wq: Callable[..., Workqueue]) -> None:
    """The workqueue stays frozen, and nobody waits for the freeze: its
    completion left in _freezing (one more for every such call) would be
    completed only by the next time nothing is in flight, or thaw()."""
    wq = make_wq("frz", workqueue.WQ_FREEZABLE)
    stuck = Stuck(wq)
    try:
        work = stuck.running()
        interrupt(main_sleeps_in_a_wait, wq.freeze)
        with _pool.lock:
            left = wq._frozen, wq._freezing
        assert left == (True, None), wq.dump()
        later = Work(lambda w: None)
        assert wq.queue_work(later)
        stuck.release.set()
        wq.freeze(timeout=TIMEOUT)  # the run ends, and queues its item again
        assert stuck.requeued == [True]
        assert later.pending and work.pending  # held back: still frozen
        wq.thaw()
        later.flush(timeout=TIMEOUT)
        work.flush(timeout=TIMEOUT)
        assert not later.pending and not work.pending
    finally:
        stuck.release.set()


@pytest.mark.parametrize("another", [False, True])
def test_ctrl_c_anywhere_in_freeze_leaves_it_frozen_or_as_it_was(
        make_wq: Callable[..., Workqueue], another: bool) -> None:
    """freeze() interrupted wherever: the workqueue is frozen, or as the
    call found it, with its freeze no longer waiting in _freezing, and
    another's (*another*) still there; thaw() and freeze() work as ever."""
    wq = make_wq("frz", workqueue.WQ_FREEZABLE)

    def attempt(interrupted: Callable[[Callable[[], object]], None]) -> None:
        stuck = Stuck(wq)
        freezer = threading.Thread(target=lambda: wq.freeze(timeout=TIMEOUT))
        try:
            work = stuck.running()
            if another:
                freezer.start()
                while not wq._freezing:
                    freezer.join(0.001)
            interrupted(lambda: wq.freeze(timeout=0))
            with _pool.lock:
                frozen, freezing = wq._frozen, list(wq._freezing or ())
            assert len(freezing) == another, wq.dump()
            later = Work(lambda w: None)
            assert wq.queue_work(later)
            stuck.release.set()
            wq.freeze(timeout=TIMEOUT)  # the run ends, and queues its item again
            assert stuck.requeued == [True]
            if frozen:  # held back
                assert later.pending and work.pending
            wq.thaw()
            later.flush(timeout=TIMEOUT)
            work.flush(timeout=TIMEOUT)
            assert not later.pending and not work.pending and not wq._frozen
        finally:
            stuck.release.set()  # a failed check must not leave it running
            if another:
                freezer.join(TIMEOUT)

    assert at_every_place(attempt) > 5


@pytest.mark.parametrize("call", ["cancel_sync", "disable_sync", "flush"])
def test_ctrl_c_as_a_wait_is_registered_leaves_its_hold_and_owner_together(
        make_wq: Callable[..., Workqueue], call: str) -> None:
    """Ctrl-C as a call returns while the engine lock is held, in the one
    block where a wait on an item is registered (which the tests above
    leave out): a cancel_sync()'s hold is there with its owner, which
    drops it as the run ends, or neither is (an owner without its hold
    dropped one nobody took, and the item's count went below zero)."""
    from workqueue._work import _CANCEL_HOLD, _CancelSync

    wq = make_wq()
    n = 0
    while True:
        stuck = Stuck(wq)
        try:
            work = stuck.running()
            method = getattr(work, call)

            def ending_in_time(wait: Callable[..., object] = method) -> None:
                try:
                    wait(timeout=0)
                except TimeoutError:
                    pass

            landed = interrupted_as_call_returns(Work._start_flush.__code__, n, ending_in_time)
            with _pool.lock:
                disable, flushers = work._disable, list(work._flushers or ())
            holds = [f for _, f in flushers if isinstance(f, _CancelSync)]
            assert disable - (call == "disable_sync") == _CANCEL_HOLD * len(holds), repr(work)
            stuck.finish(work)
            with _pool.lock:
                disable, flushers = work._disable, work._flushers
            assert (disable, flushers) == (int(call == "disable_sync"), None), repr(work)
            if work.disabled:
                assert work.enable()
            work.cancel_sync(timeout=TIMEOUT)
        finally:
            stuck.release.set()
        if not landed:
            break
        n += 1
    # One place: the append that registers the wait, after the hold (the
    # check of a wait from the item's own function is made before the
    # lock is taken, as its error names the item).
    assert n >= 1


@pytest.mark.parametrize("then", ["destroy", "shutdown"])
def test_a_signal_another_thread_took_interrupts_a_wait_for_a_handed_off_destruction(
        make_wq: Callable[..., Workqueue], then: str) -> None:
    """A second destroy() (or shutdown(wait=True)) waits for the end of
    the destruction an earlier destroy() left going on; in the main
    thread, Ctrl-C ends that wait soon too, whoever took the signal.  (The
    item waits for its release longer than the test may run: a wait that
    the signal did not end, but the item's end would, is a test timeout.)"""
    wq = make_wq()
    stuck = Stuck(wq, wait=OUTLASTS_THE_TEST)
    try:
        work = stuck.running()
        with pytest.raises(TimeoutError):
            wq.destroy(timeout=0)
        with signal_taken_elsewhere(lambda: main_thread_within("_wait_destroyed", 3)):
            with pytest.raises(Interrupted):
                getattr(wq, then)()
        assert not wq._destroyed.is_set()
    finally:
        stuck.release.set()
    assert stuck.tried.wait(TIMEOUT)
    wq.destroy(timeout=TIMEOUT)
    assert wq._destroyed.is_set() and not work.pending


# -- Ctrl-C under the engine lock ---------------------------------------------
#
# The blocks of a call that the main thread runs under the engine lock are
# not spared either: Ctrl-C lands there as anywhere else.  Such a block
# must leave the engine as it found it or as the call would have, and
# never the lock held.


def assert_lists_consistent(wq: Workqueue) -> None:
    """Every list of *wq*'s pools counts its live entries, and each of them
    is a pending item that knows it is there (engine lock free)."""
    # Not lock.locked(): a worker may hold it for a moment.
    if not _pool.lock.acquire(timeout=TIMEOUT):
        _pool.lock.release()  # left held by us: the rest of the run needs it
        raise AssertionError("the engine lock was left held")
    try:
        for pwq in wq._all_pwqs():
            for lst in (pwq.pool.worklist, pwq.inactive):
                live = list(lst)
                assert lst.nr == len(live), f"{lst.owner}: nr {lst.nr}, {len(live)} live"
                for work in live:
                    assert work._pending and work._entry is lst, repr(work)
            if pwq.inactive.nr:
                assert pwq.nr_active >= pwq.max_active, "an item waits with a slot free"
    finally:
        _pool.lock.release()


# A worker that Ctrl-C left on no list as it started must exit as it wakes,
# not die of finding itself off the idle list: nothing else shows that (an
# exception that kills a thread fails the test: see pyproject.toml).
@pytest.mark.parametrize("call", ["queue_work", "queue_work_on", "behind max_active"])
def test_ctrl_c_anywhere_in_queue_work_queues_the_item_whole_or_not_at_all(
        make_wq: Callable[..., Workqueue], call: str) -> None:
    """Wherever Ctrl-C lands in queue_work(), the lock held or not, the
    engine lock is free afterwards (once left held, nothing was ever
    queued again), and the item is either not queued or queued whole and
    runs (once left on its pool's list uncounted, or counted with no
    worker woken, it stayed pending for ever).  Each attempt on pools of
    its own, so that the first queueing starts a worker."""

    def attempt(interrupted: Callable[[Callable[[], object]], None]) -> None:
        wq = make_wq(max_active=1, topology=workqueue.Topology(2, cpu_intensive_thresh=60.0))
        stuck = Stuck(wq)
        ran = threading.Event()
        work = Work(lambda w: ran.set())
        try:
            first = stuck.running() if call == "behind max_active" else None
            interrupted(lambda: wq.queue_work_on(0, work) if call == "queue_work_on"
                        else wq.queue_work(work))
            assert_lists_consistent(wq)
            with _pool.lock:  # or it ran already
                queued = work.pending or work.running or ran.is_set()
            stuck.release.set()
            if first is not None:
                stuck.finish(first)
            work.flush(timeout=TIMEOUT)
            assert ran.is_set() is queued
            assert_lists_consistent(wq)
        finally:
            stuck.release.set()  # a failed check must not leave it running

    assert at_every_place(attempt, under_the_lock=True) > 5


def assert_nothing_left(wq: Workqueue, works: list[Work]) -> None:
    """Once every item is done: no item pending, nothing counted in flight."""
    with _pool.lock:
        for work in works:
            assert not work._pending, repr(work)
        assert (wq._nr_current, wq._in_flight) == (0, {}), wq.dump()
        for pwq in wq._all_pwqs():
            assert (pwq.nr_active, pwq.inactive.nr) == (0, 0), wq.dump()


CALLS: dict[str, Callable[[Workqueue, list[Work], list[DelayedWork]], object]] = {
    # ws[0] and ws[1] wait behind the running item, ws[0] active (max_active 2).
    "cancel": lambda wq, ws, dws: ws[0].cancel(),
    "cancel behind max_active": lambda wq, ws, dws: ws[1].cancel(),
    "disable": lambda wq, ws, dws: ws[0].disable(),
    "set_max_active": lambda wq, ws, dws: wq.set_max_active(3),
    "queue_delayed_work": lambda wq, ws, dws: wq.queue_delayed_work_on(0, dws[0], 3600),
    "queue_delayed_work at once": lambda wq, ws, dws: wq.queue_delayed_work_on(0, dws[0], 0),
    "mod_delayed_work": lambda wq, ws, dws: wq.mod_delayed_work_on(0, dws[1], 0),
    "DelayedWork.flush": lambda wq, ws, dws: dws[1].flush(timeout=0),
}


@pytest.mark.parametrize("call", CALLS)
def test_ctrl_c_anywhere_in_a_call_that_moves_items_leaves_them_whole(
        make_wq: Callable[..., Workqueue], call: str) -> None:
    """Wherever Ctrl-C lands, the engine lock held or not, a call that
    queues, cancels or activates items leaves each of them pending on a
    list that counts it, or on its timer, or not pending, and counted in
    flight exactly while pending or running: once everything has run,
    nothing is left pending or counted (an item once left pending on no
    list and no timer was never run, nor queued again; a count left
    behind made flush() and destroy() wait for ever)."""

    def attempt(interrupted: Callable[[Callable[[], object]], None]) -> None:
        wq = make_wq(max_active=2)
        stuck = Stuck(wq)
        ws = [Work(lambda w: None) for _ in range(2)]
        dws = [DelayedWork(lambda w: None) for _ in range(2)]
        try:
            first = stuck.running()
            for work in ws:
                assert wq.queue_work_on(0, work)
            assert wq.queue_delayed_work_on(0, dws[1], 3600)
            interrupted(lambda: CALLS[call](wq, ws, dws))
            assert_lists_consistent(wq)
            with _pool.lock:
                for dwork in dws:
                    on_timer = dwork._timer is not None
                    assert not dwork._pending or on_timer or dwork._entry, repr(dwork)
                    # And its timer only while it waits on it: one left to a
                    # queued item queued it again as it fired.
                    assert not on_timer or dwork._pending and dwork._entry is None, repr(dwork)
            for dwork in dws:
                dwork.cancel()
            stuck.finish(first)
            for work in [*ws, *dws]:
                work.flush(timeout=TIMEOUT)
            assert_nothing_left(wq, [*ws, *dws])
            wq.destroy(timeout=TIMEOUT)
        finally:
            stuck.release.set()  # a failed check must not leave it running

    # Some places at least (the sweep ran).  How many varies from run to
    # run with what the earlier attempts left (cancel: 9 or 10 alone, 4
    # once after other files' tests): the invariants above are the test.
    assert at_every_place(attempt, under_the_lock=True) >= 3


@pytest.mark.parametrize("first", ["cleanup", "thread"])
@pytest.mark.parametrize("call", ["destroy", "shutdown"])
def test_ctrl_c_as_destroy_hands_itself_off_starts_one_thread(
        make_wq: Callable[..., Workqueue], monkeypatch: pytest.MonkeyPatch, call: str,
        first: str) -> None:
    """Ctrl-C at each call of the hand-off of a destruction, the engine
    lock held (as Thread.start() returns, say): one thread goes on with
    the destruction, which ends, and a destroy() again waits for that end
    (the thread started and not yet recorded was started again by the
    caller's cleanup, and two threads drained and released the
    workqueue).  Whichever takes the engine lock first: the caller's
    cleanup, handing off again (as it mostly does, holding the GIL), or
    the thread left unrecorded, which must record itself."""
    finished: list[Workqueue] = []
    real_finish_destroy = Workqueue._finish_destroy
    real_hand_off = Workqueue._hand_off_destroy

    def finish_destroy(wq: Workqueue) -> None:
        finished.append(wq)
        real_finish_destroy(wq)

    def hand_off_after_the_thread(wq: Workqueue, resumable: bool = True) -> None:
        if wq._destroy_thread is None and any(
                t.name == f"{wq.name}-shutdown" for t in threading.enumerate()):
            wait_until(lambda: wq._destroy_thread is not None,
                       "the thread left unrecorded records itself")
        real_hand_off(wq, resumable)

    monkeypatch.setattr(Workqueue, "_finish_destroy", finish_destroy)
    if first == "thread":
        monkeypatch.setattr(Workqueue, "_hand_off_destroy", hand_off_after_the_thread)

    def attempt(n: int) -> bool:
        """Ctrl-C as call n returns; n = -1: as Thread.start() begins (the
        hand-off's is the first: the stuck item's spare worker is made)."""
        wq = make_wq()
        stuck = Stuck(wq)
        try:
            work = stuck.running()

            def hand_off() -> None:
                if call == "shutdown":
                    wq.shutdown(wait=False)
                    return
                with pytest.raises(TimeoutError):  # the drain: the item runs on
                    wq.destroy(timeout=0)

            if n < 0:
                landed = interrupted_as_frame_starts(threading.Thread.start.__code__, hand_off)
            else:
                landed = interrupted_as_call_returns(real_hand_off.__code__, n, hand_off)
            # Each thread started, recorded or not (a second one, joined
            # alone, let the first's release come after the count below).
            started = [t for t in threading.enumerate() if t.name == f"{wq.name}-shutdown"]
            stuck.release.set()
            if landed or call == "destroy":
                wq.destroy(timeout=TIMEOUT)  # waits for the destruction handed off
            assert wq._destroyed.wait(TIMEOUT), wq.dump()
            assert not work.pending and not work.running
            assert wq._destroy_thread in started
            for thread in started:
                thread.join(TIMEOUT)
                assert not thread.is_alive()
            assert finished.count(wq) == 1, "two threads went on with the destruction"
        finally:
            stuck.release.set()  # a failed check must not leave it running
        return landed

    assert attempt(-1)
    n = 0
    while attempt(n):
        n += 1
    assert n >= 2  # the thread made, and started


def test_a_destruction_thread_left_unrecorded_records_itself_under_the_engine_lock(
        make_wq: Callable[..., Workqueue], monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread of a hand-off that Ctrl-C left unrecorded (as start()
    returned) looks for the record under the engine lock: the caller's
    cleanup hands off again in one hold of it, starting a second thread
    and recording it, and the first must find that one and leave the
    destruction to it.  (Read without the lock, the record was found
    missing between that start and that record, and two threads drained
    and released the workqueue.)"""
    wq = make_wq()
    finished: list[Workqueue] = []
    real_finish_destroy = Workqueue._finish_destroy
    monkeypatch.setattr(Workqueue, "_finish_destroy",
                        lambda self: (finished.append(self), real_finish_destroy(self)))
    cleanups = threading.Thread(target=lambda: None)  # what the cleanup starts and records
    try:
        with _pool.lock:  # the cleanup's hold, between its start() and its record
            first = Attempt(wq._drain_and_release)
            wait_until(lambda: wq._destroy_thread is not None or not first.thread.is_alive()
                       or stands_at(first.thread.ident or 0, Workqueue._drain_and_release,
                                    "with lock:"),
                       "the unrecorded thread waits for the engine lock")
            assert wq._destroy_thread is None, "it recorded itself without the engine lock"
            wq._destroy_thread = cleanups
        assert first.result() is None
        assert finished == [], "the unrecorded thread went on with the destruction too"
    finally:
        wq._destroy_thread = None


def test_ctrl_c_anywhere_in_destroy_releases_every_pool(
        make_wq: Callable[..., Workqueue]) -> None:
    """Wherever Ctrl-C lands in destroy(), the engine lock held or not,
    the destruction that goes on without the caller releases every pool
    (one cut short as it released them left the rest holding the
    workqueue, and their idle workers, for ever)."""

    def attempt(interrupted: Callable[[Callable[[], object]], None]) -> None:
        wq = make_wq(topology=workqueue.Topology(2, cpu_intensive_thresh=60.0))
        work = Work(lambda w: None)
        for cpu in (0, 1):  # a worker on each pool
            assert wq.queue_work_on(cpu, work)
            work.flush(timeout=TIMEOUT)
        interrupted(lambda: wq.destroy(timeout=TIMEOUT))
        try:
            wq.destroy(timeout=TIMEOUT)
        except RuntimeError as exc:
            assert "already destroyed" in str(exc)
        assert wq._destroyed.wait(TIMEOUT)
        thread = wq._destroy_thread
        if thread is not None:
            thread.join(TIMEOUT)
        with _pool.lock:
            for pwq in wq._all_pwqs():
                assert pwq not in pwq.pool.pwqs, pwq.pool.dump()

    assert at_every_place(attempt, under_the_lock=True) > 5


def test_ctrl_c_as_destroy_tells_idle_workers_to_exit_leaves_the_pool_working(
        make_wq: Callable[..., Workqueue]) -> None:
    """Ctrl-C at each call of release_pwq(), as it tells the idle workers
    of a pool that no workqueue uses any longer to exit, and a workqueue
    taking the pool up before the destruction goes on: that one's items
    run (a worker told to exit and left on the idle list was the one
    woken for them, and exited instead), and the pool ends up counting no
    worker that has exited."""
    def attempt(n: int) -> bool:
        topology = workqueue.Topology(1, cpu_intensive_thresh=60.0)
        wq = make_wq("old", workqueue.WQ_UNBOUND, topology=topology)
        work = Work(lambda w: None)
        assert wq.queue_work(work)
        work.flush(timeout=TIMEOUT)  # the pool has workers: the one that ran it and its spare
        pool = wq._all_pwqs()[0].pool
        resume = threading.Event()
        go_on = wq._drain_and_release

        def held() -> None:
            resume.wait()  # set in any case, by the finally below
            go_on()

        # The destruction goes on only once the new workqueue uses the pool.
        wq._drain_and_release = held  # type: ignore[method-assign]
        try:
            landed = interrupted_as_call_returns(
                _pool.release_pwq.__code__, n, lambda: wq.destroy(timeout=TIMEOUT))
            if landed:
                new = make_wq("new", workqueue.WQ_UNBOUND, topology=topology)
                assert new._all_pwqs()[0].pool is pool
                ran = threading.Event()
                assert new.queue_work(Work(lambda w: ran.set()))
                assert ran.wait(TIMEOUT), f"Ctrl-C at call {n}: the item never ran\n{new.dump()}"
        finally:
            resume.set()
        assert wq._destroyed.wait(TIMEOUT)
        if landed:
            wait_until(lambda: all(w.thread.is_alive() for w in pool.workers),
                       f"the pool counts no exited worker (Ctrl-C at call {n})")
            new.destroy(timeout=TIMEOUT)
        return landed

    n = 0
    while attempt(n):
        n += 1
    assert n >= 5  # two workers told, the list cleared, the pool left


def assert_pools_count_their_workers(topology: workqueue.Topology) -> None:
    """Each pool is bound exactly while its CPU is online, its workers
    say so, and nr_running counts those whose flags are all clear."""
    pset = topology._pools
    with _pool.lock:
        for pool in pset.pools():
            online = pool.cpu is not None and topology.is_online(pool.cpu)
            assert pool.disassociated is not online, pool.dump()
            for worker in pool.workers:
                assert bool(worker.flags & _pool.WORKER_UNBOUND) is not online, pool.dump()
            assert pool.nr_running == sum(not w.flags for w in pool.workers), pool.dump()


def test_ctrl_c_in_a_notifier_after_the_pools_one_leaves_their_workers_counted(
        make_wq: Callable[..., Workqueue]) -> None:
    """Ctrl-C in a notifier that cpu_up() calls after the pools' one: it
    calls the pools' notifier again (cut short as it started, that one
    would have left them unbound), which must then change nothing.  Set
    again, WORKER_REBOUND took its count from a worker that had since
    started an item, as a notifier may have made one do."""
    topology = workqueue.Topology(2, cpu_intensive_thresh=60.0)
    wq = make_wq(topology=topology)
    assert wq.queue_work_on(0, Work(lambda w: None))  # makes the pools: their notifier first
    topology.cpu_down(0)
    stuck = Stuck(wq)

    def busy_then_interrupted(cpu: int, online: bool) -> None:
        if online:
            assert wq.queue_work_on(cpu, Work(stuck))
            assert stuck.started.wait(TIMEOUT)  # a worker of the CPU counted, running it
            raise KeyboardInterrupt

    topology.add_hotplug_notifier(busy_then_interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            topology.cpu_up(0)
        assert topology.is_online(0)
        assert_pools_count_their_workers(topology)
    finally:
        stuck.release.set()
    assert stuck.tried.wait(TIMEOUT)
    assert_pools_count_their_workers(topology)


@pytest.mark.parametrize("going", ["down", "up"])
def test_ctrl_c_anywhere_in_the_pools_hotplug_notifier_leaves_them_whole(
        make_wq: Callable[..., Workqueue], going: str) -> None:
    """Ctrl-C in the pools' hotplug notifier as it holds the engine lock:
    every pool of the CPU is left bound or not as the CPU is, with all
    its workers (a worker left counted on an offline CPU's pool was never
    counted out, its pool thinking it busy for ever once the CPU came
    back), and the items run.  (Ctrl-C in cpu_down() or cpu_up() outside
    the notifier: test_ctrl_c_anywhere_in_cpu_down_or_up_changes_all_or_nothing.)"""
    hotplug = _pool.PoolSet.hotplug.__code__

    def outside_the_notifier() -> bool:
        if not _pool.lock.locked():  # the other threads here hardly take it
            return True
        frame: Any = sys._getframe()
        while frame is not None:
            if frame.f_code is hotplug:
                return False
            frame = frame.f_back
        return True

    n = 0
    while True:
        topology = workqueue.Topology(2, cpu_intensive_thresh=60.0)
        wq = make_wq(topology=topology)
        if going == "up":
            topology.cpu_down(0)
        stuck = Stuck(wq)
        try:
            first = Work(stuck)
            assert wq.queue_work_on(0, first)
            assert stuck.started.wait(TIMEOUT)
            waiting = Work(lambda w: None)
            assert wq.queue_work_on(0, waiting)
            change = topology.cpu_down if going == "down" else topology.cpu_up
            landed = interrupted_at(n, PACKAGE, functools.partial(change, 0),
                                    unless=outside_the_notifier)
            try:
                assert_pools_count_their_workers(topology)
                stuck.release.set()
                assert stuck.tried.wait(TIMEOUT)
                for work in (first, waiting):
                    work.flush(timeout=TIMEOUT)
                (topology.cpu_up if going == "down" else topology.cpu_down)(0)
                assert_pools_count_their_workers(topology)
                assert wq.queue_work_on(0, waiting)
                waiting.flush(timeout=TIMEOUT)
                assert_pools_count_their_workers(topology)
            except (AssertionError, TimeoutError) as exc:
                raise AssertionError(f"with Ctrl-C at place {n}, {landed!r}: {exc}") from exc
        finally:
            stuck.release.set()
        if not landed:
            break
        n += 1
    assert n > 5


@pytest.mark.parametrize("flags", [0, workqueue.WQ_UNBOUND | workqueue.WQ_MEM_RECLAIM])
def test_ctrl_c_anywhere_in_making_a_workqueue_leaves_none_behind(flags: int) -> None:
    """Ctrl-C in Workqueue(), the engine lock held or not: the caller
    gets a workqueue, or none is left in the pools (which held the one
    it never got, and their idle workers, for ever) and no rescuer
    thread of it waits for a mayday that will never come.  (Not through
    alloc_workqueue(): Ctrl-C as the constructor returns there loses the
    workqueue as any call loses what it was about to return.)"""
    n = 0
    while True:
        topology = workqueue.Topology(2, cpu_intensive_thresh=60.0)
        made: list[Workqueue] = []
        before = {t.name for t in threading.enumerate()}

        def alloc(made: list[Workqueue] = made, topology: workqueue.Topology = topology) -> None:
            made.append(Workqueue("made", flags, topology=topology))

        landed = interrupted_at(n, PACKAGE, alloc)
        try:
            pools = topology._pools.pools() if topology._pools is not None else []
            with _pool.lock:
                users = {pwq.wq for pool in pools for pwq in pool.pwqs}
            assert users == set(made), f"with Ctrl-C at place {n}, {landed!r}"
        finally:
            for wq in made:
                wq.destroy(timeout=TIMEOUT)
        for thread in threading.enumerate():
            if thread.name == "made-rescuer" and thread.name not in before:
                thread.join(TIMEOUT)
                assert not thread.is_alive(), f"with Ctrl-C at place {n}, {landed!r}"
        if not landed:
            break
        n += 1
    assert n > 5


# -- Ctrl-C as a submitted call is cancelled -----------------------------------


class _Told:
    """A watcher as concurrent.futures' own (wait(), as_completed()) are
    to a future: told of its outcome through one of these calls, each
    of which counts (told twice, wait() counts the future twice)."""

    def __init__(self, future: cf.Future[Any]) -> None:
        self.told: list[str] = []
        with future._condition:  # type: ignore[attr-defined]
            future._waiters.append(self)  # type: ignore[attr-defined]

    def add_result(self, future: cf.Future[Any]) -> None:
        self.told.append("result")

    def add_exception(self, future: cf.Future[Any]) -> None:
        self.told.append("exception")

    def add_cancelled(self, future: cf.Future[Any]) -> None:
        self.told.append("cancelled")


def _watching(future: cf.Future[Any], watch: str) -> Attempt | None:
    """Somebody waiting for *future*, as *watch* says, asleep once this
    returns: a thread in result() (a sleeper, with no condition made), or
    one in concurrent.futures.wait() (a waiter on the future's own
    condition).  None for nobody."""
    if watch == "unwatched":
        return None
    if watch == "result":
        def outcome() -> object:
            try:
                return future.result(TIMEOUT)
            except cf.CancelledError:
                return "cancelled"

        sleeping = Attempt(outcome)
        asleep: Callable[[], object] = lambda: future._blocked  # noqa: E731
    else:
        sleeping = Attempt(lambda: cf.wait([future], TIMEOUT).done)
        asleep = lambda: future._waiter_list  # noqa: E731
    deadline = time.monotonic() + TIMEOUT
    while not asleep():
        assert time.monotonic() < deadline, "the watcher never went to sleep"
        time.sleep(0.001)
    return sleeping


CANCELS: dict[str, Callable[[Workqueue, cf.Future[Any]], object]] = {
    "Future.cancel": lambda wq, future: future.cancel(),
    "cancel_pending_futures": lambda wq, future: cancel_pending_futures(wq),
    # The calls of a serial executor: cancelled one by one, or all at once
    # as shutdown(cancel_futures=True) does.
    "serial Future.cancel": lambda wq, future: future.cancel(),
    "cancel_serial_calls": lambda wq, future: cancel_serial_calls(wq),
    # Both, and the destruction that drains what is left.
    "shutdown": lambda wq, future: wq.shutdown(wait=False, cancel_futures=True),
    "serial shutdown": lambda wq, future: wq.shutdown(wait=False, cancel_futures=True),
}


@pytest.mark.parametrize("watch", ["unwatched", "result", "wait", "result and wait"])
@pytest.mark.parametrize("how", CANCELS)
def test_ctrl_c_anywhere_in_cancelling_a_call_leaves_it_cancelled_or_to_run(
        make_wq: Callable[..., Workqueue], how: str, watch: str) -> None:
    """Wherever Ctrl-C lands as a submitted call waiting its turn is
    cancelled, the engine lock held or not, the call is either cancelled
    -- done, its waiters woken and told and its done-callbacks called,
    once -- or still queued, and runs (a call taken back from its list
    with its future left pending was never run, nor cancelled: result()
    and concurrent.futures.wait() waited for ever)."""

    def attempt(interrupted: Callable[[Callable[[], object]], None]) -> None:
        wq = make_wq(ordered=True)  # the call waits behind the running one
        executor: Any = wq.serial("key") if "serial" in how else wq
        release, started = threading.Event(), threading.Event()
        executor.submit(lambda: (started.set(), release.wait(TIMEOUT)))
        ran: list[int] = []
        called: list[cf.Future[Any]] = []
        try:
            assert started.wait(TIMEOUT)
            future = executor.submit(ran.append, 1)
            if "wait" in watch:
                future.add_done_callback(called.append)
            watcher = _watching(future, "wait" if "wait" in watch else watch)
            sleeper = _watching(future, "result") if watch == "result and wait" else None
            told = _Told(future) if "wait" in watch else None
            interrupted(lambda: CANCELS[how](wq, future))
            assert_lists_consistent(wq)
            cancelled = future.cancelled()
            if cancelled:
                # Done now, for everybody: nothing else will make it so.
                assert cf.wait([future], timeout=0).done == {future}, repr(future)
            release.set()
            if how.endswith("shutdown"):
                # A destruction goes on, that a second one waits for.
                try:
                    wq.destroy(timeout=TIMEOUT)
                except RuntimeError as exc:
                    assert "already destroyed" in str(exc)
                assert wq._destroyed.wait(TIMEOUT)
            else:
                wq.flush(timeout=TIMEOUT)
            assert ran == ([] if cancelled else [1]), repr(future)
            assert cf.wait([future], timeout=TIMEOUT).done == {future}, repr(future)
            if watcher is not None:
                outcome = watcher.result(msg=f"the watcher of {future!r} still sleeps")
                assert outcome == ({future} if "wait" in watch
                                   else "cancelled" if cancelled else None), repr(future)
            if sleeper is not None:
                outcome = sleeper.result(msg=f"the sleeper in {future!r} still sleeps")
                assert outcome == ("cancelled" if cancelled else None), repr(future)
            if told is not None:
                assert told.told == ["cancelled" if cancelled else "result"], repr(future)
            assert called == ([future] if "wait" in watch else []), repr(future)
        finally:
            release.set()  # a failed check must not leave it running

    assert at_every_place(attempt, under_the_lock=True) > 3


class _InterruptingWaiter:
    """A watcher of a future whose telling is cut short by Ctrl-C, once,
    after another thread's concurrent.futures.wait() has put its waiter on
    *other*, a future told of already: as a Ctrl-C landing in that telling
    while a wait() in another thread starts."""

    def __init__(self, other: cf.Future[Any], pending: cf.Future[Any]) -> None:
        self.other, self.pending = other, pending
        self.waiting: Attempt | None = None
        self.installed: Any = None  # the wait()'s waiter

    def add_cancelled(self, future: cf.Future[Any]) -> None:
        if self.waiting is not None:
            return
        other = self.other
        self.waiting = Attempt(lambda: cf.wait([other, self.pending], TIMEOUT))
        deadline = time.monotonic() + TIMEOUT
        while not other._waiters:
            assert time.monotonic() < deadline, "the wait() never put its waiter on"
            time.sleep(0.001)
        self.installed = other._waiters[0]
        raise Interrupted

    add_result = add_exception = add_cancelled


def test_ctrl_c_as_cancel_pending_futures_tells_a_watcher_tells_no_later_one(
        make_wq: Callable[..., Workqueue]) -> None:
    """Ctrl-C landing as cancel_pending_futures() tells the watchers of its
    second future: taken up again, it tells each watcher of the first
    future once, and not a wait() that came for it once it was final (its
    waiter would count it done twice: the wait() for it and another future
    returned with the other not done)."""
    wq = make_wq(ordered=True)  # the calls wait behind the running one
    release, started = threading.Event(), threading.Event()
    wq.submit(lambda: (started.set(), release.wait(TIMEOUT)))
    try:
        assert started.wait(TIMEOUT)
        first, second = wq.submit(int), wq.submit(int)
        assert first._condition is not None  # watched: it has its own condition
        pending: cf.Future[Any] = cf.Future()
        waiter = _InterruptingWaiter(first, pending)
        with second._condition:
            second._waiters.append(waiter)
        with pytest.raises(Interrupted):
            cancel_pending_futures(wq)
        assert first.cancelled() and second.cancelled()
        assert waiter.waiting is not None
        # Set by the telling alone, not by the wait()'s thread: no race.
        assert not waiter.installed.event.is_set(), "the wait() was told of the first twice"
        pending.set_result(None)
        done, not_done = waiter.waiting.result(msg="the wait() still sleeps")
        assert (done, not_done) == ({first, pending}, set()), "the wait() returned early"
    finally:
        release.set()


# -- Ctrl-C as a bare LeanFuture is given its outcome --------------------------


def _asleep_until(what: str, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert time.monotonic() < deadline, f"{what} never went to sleep"
        time.sleep(0.001)


@pytest.mark.parametrize("outcome", ["result", "exception"])
@pytest.mark.parametrize("watch", ["result", "everybody"])
@pytest.mark.parametrize("start", ["pending", "running"])
def test_ctrl_c_anywhere_in_finishing_a_bare_future_tells_every_watcher_once(
        start: str, watch: str, outcome: str) -> None:
    """Wherever Ctrl-C lands as the main thread gives a bare LeanFuture its
    outcome (set_result(), set_exception()), the future is either still
    not done, with nobody told, and takes the outcome when given it again,
    or done: then every thread asleep in result() returns, every wait()
    and as_completed() counts it once, everybody waiting on its condition
    wakes, and each done-callback is called once (cut short, the telling
    left the future final with some of them never told)."""
    failure = ValueError("the outcome")

    def finish(future: LeanFuture) -> None:
        if outcome == "result":
            future.set_result(42)
        else:
            future.set_exception(failure)

    def attempt(interrupted: Callable[[Callable[[], object]], None]) -> None:
        future = LeanFuture()
        if start == "running":
            assert future.set_running_or_notify_cancel()
        # Done after the checks: a wait() that counted the future twice
        # would have returned before it.
        later: cf.Future[Any] = cf.Future()

        def result() -> object:
            try:
                return future.result(OUTLASTS_THE_TEST)
            except ValueError as exc:
                return exc

        sleepers = [Attempt(result) for _ in range(2)]
        _asleep_until("result()", lambda: len(future._blocked or ()) == 2)
        waits: list[Attempt] = []
        told: list[_Told] = []
        called: list[list[cf.Future[Any]]] = []
        if watch == "everybody":
            told = [_Told(future), _Told(future)]
            waits = [
                Attempt(lambda: cf.wait([future, later], OUTLASTS_THE_TEST)),
                Attempt(lambda: cf.wait([future, later], OUTLASTS_THE_TEST,
                                        return_when=cf.FIRST_COMPLETED)),
                Attempt(lambda: list(cf.as_completed([future, later], OUTLASTS_THE_TEST))),
            ]
            _asleep_until("wait()", lambda: len(future._waiter_list or ()) == 5)

            def on_condition() -> bool:
                with future._condition:
                    return bool(future._condition.wait_for(future.done, OUTLASTS_THE_TEST))

            waits.append(Attempt(on_condition))
            _asleep_until("a wait on the condition",
                          lambda: _sleeping.get(future._own, [0, 0])[1] == 1)
            for _ in range(3):
                called.append([])
                future.add_done_callback(called[-1].append)
        interrupted(lambda: finish(future))
        if not future.done():
            # Nothing done: nobody told, and the outcome can be given again.
            assert all(told_.told == [] for told_ in told)
            assert called == [[] for _ in called]
            assert all(attempt.thread.is_alive() for attempt in sleepers + waits)
            finish(future)
        expected = 42 if outcome == "result" else failure
        for sleeper in sleepers:
            assert sleeper.result(msg=f"a sleeper in {future!r} still sleeps") is expected
        assert all(told_.told == [outcome] for told_ in told), [t.told for t in told]
        assert called == [[future] for _ in called]
        if waits:
            first = waits[1].result(msg=f"a wait(FIRST_COMPLETED) for {future!r} still sleeps")
            assert first == ({future}, {later})
            assert waits[3].result(msg=f"a wait on the condition of {future!r} still sleeps")
            later.set_result(None)
            done = waits[0].result(msg=f"a wait() for {future!r} still sleeps")
            assert done == ({future, later}, set()), "wait() returned early"
            seen = waits[2].result(msg=f"an as_completed() over {future!r} still sleeps")
            assert seen == [future, later], seen

    assert at_every_place(attempt, under_the_lock=True) > 5


@pytest.mark.parametrize("first", ["result", "cancel"])
def test_ctrl_c_anywhere_in_refusing_a_second_outcome_leaves_the_first(first: str) -> None:
    """Wherever Ctrl-C lands as the main thread gives a done LeanFuture a
    second outcome -- in the hold that refuses it, or as the refusal is
    named once that is over -- the future keeps its first outcome, and
    its done-callbacks are not called again."""

    def attempt(interrupted: Callable[[Callable[[], object]], None]) -> None:
        future = LeanFuture()
        called: list[cf.Future[Any]] = []
        future.add_done_callback(called.append)
        if first == "result":
            future.set_result(1)
        else:
            assert future.cancel()

        def second() -> None:
            with pytest.raises(cf.InvalidStateError, match=r"^(FINISHED|CANCELLED\S*): "):
                future.set_result(2)

        interrupted(second)
        assert called == [future]
        if first == "result":
            assert future.result(0) == 1
        else:
            assert future.cancelled()

    assert at_every_place(attempt, under_the_lock=True) > 5


# -- Ctrl-C as a call is submitted to a serial executor ------------------------


def test_ctrl_c_anywhere_in_a_serial_submit_leaves_no_call_stranded(
        make_wq: Callable[..., Workqueue]) -> None:
    """Wherever Ctrl-C lands as the main thread submits a call to an idle
    key, the call is taken back or runs: none is left on the key's list
    with no run queued (found by no run until the key's next submit, and
    waited for by shutdown(wait=True) for ever)."""

    def attempt(interrupted: Callable[[Callable[[], object]], None]) -> None:
        executor = make_wq().serial("key")
        calls = executor._work.calls
        ran: list[int] = []
        interrupted(lambda: executor.submit(ran.append, 1))
        ending = Attempt(lambda: executor.shutdown(wait=True))
        assert ending.result(msg=f"shutdown() waits for {list(calls)!r}, with no run") is None
        assert not calls and ran in ([], [1])

    assert at_every_place(attempt) > 3


@pytest.mark.parametrize("call", ["serial", "shutdown"])
def test_ctrl_c_anywhere_in_making_or_shutting_down_a_keys_executor_keeps_the_key(
        make_wq: Callable[..., Workqueue], call: str) -> None:
    """Wherever Ctrl-C lands as wq.serial(key) makes the key's executor, or
    as its shutdown() releases the key (but under the engine's lock, whose
    bookkeeping is its own), the key stays usable:
    the next wq.serial(key) gives an executor that runs its calls and
    counts once in the index, and whose shutdown() releases the key.  (Cut
    short between the index and the executors, a key was placed in the
    index with no executor, or kept by an executor shut down: every later
    serial(key) raised ValueError, or gave the executor that refuses
    calls.)"""
    n = 0
    while True:
        wq = make_wq()
        other = wq.serial("other")  # the serial executors' bookkeeping, made
        domain: Any = wq._serial_domain  # type: ignore[attr-defined]
        index = domain.index
        if call == "serial":
            change = functools.partial(wq.serial, "key")
        else:
            change = functools.partial(wq.serial("key").shutdown, wait=False)
        landed = interrupted_at(n, PACKAGE, change, unless=_pool.lock.locked)
        try:
            assert_index_whole(index, wq.topology)
            executor = wq.serial("key")
            assert executor.submit(int, 7).result(TIMEOUT) == 7
            assert len(index) == 2 and set(domain.executors) == {"other", "key"}
            executor.shutdown()
            assert "key" not in index and domain.executors == {"other": other}
        except (AssertionError, TimeoutError, RuntimeError, ValueError) as exc:
            raise AssertionError(f"with Ctrl-C at place {n}, {landed!r}: {exc!r}") from exc
        if not landed:
            break
        n += 1
    assert n > 3


@pytest.mark.parametrize("going", ["down", "up"])
def test_ctrl_c_anywhere_in_cpu_down_or_up_changes_all_or_nothing(
        make_wq: Callable[..., Workqueue], going: str) -> None:
    """Wherever Ctrl-C lands in cpu_down() or cpu_up(), the hotplug lock
    held or not: either the CPU is as it was and no notifier heard of it,
    or it changed and every notifier heard of it once, in order (a CPU
    taken out of online() with notifiers left uncalled had pools bound
    to it for good: a second cpu_down() found nothing to do, and the
    cpu_up() that followed told every notifier of a change that half of
    them had never seen).  Once also for a notifier whose every attribute
    is true, as a Mock's are: only idempotent_notifier marks one to be
    called again."""
    n = 0
    while True:
        topology = workqueue.Topology(2, cpu_intensive_thresh=60.0)
        heard: list[tuple[str, int, bool]] = []
        topology.add_hotplug_notifier(unittest.mock.Mock(
            side_effect=lambda cpu, online, heard=heard: heard.append(("first", cpu, online))))
        wq = make_wq(topology=topology)
        assert wq.queue_work_on(0, Work(lambda w: None))  # makes the pools: a notifier
        topology.add_hotplug_notifier(
            lambda cpu, online, heard=heard: heard.append(("last", cpu, online)))
        if going == "up":
            topology.cpu_down(0)
            heard.clear()
        online = going == "up"
        change = topology.cpu_up if online else topology.cpu_down
        landed = interrupted_at(n, PACKAGE, functools.partial(change, 0))
        try:
            if topology.is_online(0) is online:
                order = ["first", "last"] if online else ["last", "first"]
                assert heard == [(name, 0, online) for name in order]
            else:
                assert heard == []
            assert topology.online() == sorted({1} | ({0} if topology.is_online(0) else set()))
            assert_pools_count_their_workers(topology)
            heard.clear()
            # And back: each notifier hears of that once too.
            back = not topology.is_online(0)
            (topology.cpu_up if back else topology.cpu_down)(0)
            order = ["first", "last"] if back else ["last", "first"]
            assert heard == [(name, 0, back) for name in order]
            assert_pools_count_their_workers(topology)
            work = Work(lambda w: None)
            assert wq.queue_work_on(0, work)
            work.flush(timeout=TIMEOUT)
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"with Ctrl-C at place {n}, {landed!r}: {exc}") from exc
        if not landed:
            break
        n += 1
    assert n > 5


# -- Ctrl-C in a LoadIndex ----------------------------------------------------
#
# Anywhere, its lock held or not: the index is the caller's bookkeeping,
# used by pvcalls in the main thread, and a CPU left out of its sorted
# list was never picked again, a load left stale skewed every placement.


def assert_index_whole(index: workqueue.LoadIndex, topology: workqueue.Topology) -> None:
    """Every online CPU in the index's sorted list once, with its true
    load (the sum of the weights of its keys); every key on one online CPU,
    counted there once."""
    online = topology.online()
    assert index._online == set(online)
    assert list(index._index) == sorted((index._load[cpu], cpu) for cpu in online)
    assert index._cpu_of.keys() == index._weight.keys()
    for cpu, keys in index._keys_on.items():
        assert all(index._cpu_of[key] == cpu for key in keys), (cpu, keys, index._cpu_of)
        assert index._load[cpu] == sum(index._weight[key] for key in keys), (cpu, index._load)
    assert sum(map(len, index._keys_on.values())) == len(index._cpu_of)
    assert set(index._cpu_of.values()) <= set(online)


def assert_adding_evens_out(index: workqueue.LoadIndex, keys: range) -> None:
    """Each key of weight 1 goes to a least-loaded CPU, and by the last
    the loads differ by one at most (they do all along, once they do)."""
    even = False
    for key in keys:
        loads = dict(index.statistics().loads)
        even = even or max(loads.values()) - min(loads.values()) <= 1
        assert not even or max(loads.values()) - min(loads.values()) <= 1, loads
        assert loads[index.assign(key)] == min(loads.values()), loads
    loads = dict(index.statistics().loads)
    assert max(loads.values()) - min(loads.values()) <= 1, loads


@pytest.mark.parametrize("call", ["assign", "release"])
def test_ctrl_c_anywhere_in_assign_or_release_leaves_the_index_whole(call: str) -> None:
    """Wherever Ctrl-C lands in assign() or release(), the key is placed
    (released) or not, and the index is whole: a CPU popped off the sorted
    list and not put back was never picked again, and a release cut short
    left a load that counted a key no longer there."""
    n = 0
    while True:
        topology = workqueue.Topology(4)
        index = workqueue.LoadIndex(topology)
        for key in range(6):
            index.assign(key)
        before = set(index._cpu_of)
        if call == "assign":
            key: object = "key"
            landed = interrupted_at(n, PACKAGE, functools.partial(index.assign, key))
        else:
            key = 2
            landed = interrupted_at(n, PACKAGE, functools.partial(index.release, key))
        try:
            assert set(index._cpu_of) in (before, before ^ {key})
            assert_index_whole(index, topology)
            assert_adding_evens_out(index, range(100, 120))
            assert_index_whole(index, topology)
        except AssertionError as exc:
            raise AssertionError(f"with Ctrl-C at place {n}, {landed!r}: {exc}") from exc
        finally:
            index.close()
        if not landed:
            break
        n += 1
    assert n > 3


@pytest.mark.parametrize("going", ["down", "up"])
def test_ctrl_c_anywhere_in_cpu_down_or_up_leaves_a_load_index_whole(going: str) -> None:
    """Wherever Ctrl-C lands in cpu_down() or cpu_up(), in the topology or
    in the index's notifier: the index follows the topology's online CPUs
    (cut short as its notifier started, it kept a CPU that went down, with
    its keys, or never had the one that came up), and the owner of each
    key moved off the CPU is told where it went."""
    n = 0
    while True:
        topology = workqueue.Topology(4)
        told: dict[object, int] = {}
        index = workqueue.LoadIndex(
            topology, on_move=lambda key, old, new, told=told: told.__setitem__(key, new))
        if going == "up":
            topology.cpu_down(1)
        for key in range(10):
            index.assign(key)
        homes = dict(index._cpu_of)
        change = topology.cpu_down if going == "down" else topology.cpu_up
        landed = interrupted_at(n, PACKAGE, functools.partial(change, 1))
        try:
            assert_index_whole(index, topology)
            moved = {key: cpu for key, cpu in index._cpu_of.items() if cpu != homes[key]}
            assert told == moved
            if going == "down" and not topology.is_online(1):
                assert set(moved) == {key for key, cpu in homes.items() if cpu == 1}
            assert_adding_evens_out(index, range(100, 130))
            assert_index_whole(index, topology)
        except AssertionError as exc:
            raise AssertionError(f"with Ctrl-C at place {n}, {landed!r}: {exc}") from exc
        finally:
            index.close()
        if not landed:
            break
        n += 1
    assert n > 3


def test_ctrl_c_in_a_load_index_cpu_down_leaves_its_books_straight_until_called_again() -> None:
    """Cut short by Ctrl-C, the index's part of cpu_down() has changed
    nothing yet: between then and the topology's calling it again, its
    lock is free, and another thread reading or releasing keys finds each
    key listed only on its CPU (a move worked out on the live per-CPU key
    lists listed a key on the CPU it was going to before it went there:
    released then, it stayed listed there for good)."""
    n = 0
    while True:
        topology = workqueue.Topology(4)
        index = workqueue.LoadIndex(topology)
        for key in range(10):
            index.assign(key, weight=1 + key % 3)
        checking = [False]
        crooked: list[str] = []

        @idempotent_notifier
        def between(cpu: int, online: bool, index: Any = index, topology: Any = topology,
                    checking: list[bool] = checking, crooked: list[str] = crooked) -> None:
            # Registered after the index, so called before it on the way
            # down, and again before it when Ctrl-C cuts the index short.
            checking[0] = True
            try:
                for c in topology.possible():
                    keys = index.keys_on(c)
                    if any(index.cpu_of(k) != c for k in keys) or index.load(c) != sum(
                            map(index.weight_of, keys)):
                        crooked.append(f"CPU {c}: {keys} {[index.cpu_of(k) for k in keys]}")
            finally:
                checking[0] = False

        topology.add_hotplug_notifier(between)
        landed = interrupted_at(n, PACKAGE, functools.partial(topology.cpu_down, 1),
                                unless=lambda checking=checking: checking[0])
        try:
            assert crooked == []
            assert_index_whole(index, topology)
        except AssertionError as exc:
            raise AssertionError(f"with Ctrl-C at place {n}, {landed!r}: {exc}") from exc
        finally:
            index.close()
        if not landed:
            break
        n += 1
    assert n > 3


@pytest.mark.parametrize("call", ["make", "close"])
def test_ctrl_c_anywhere_in_making_or_closing_a_load_index_leaves_no_notifier_behind(
        call: str) -> None:
    """Wherever Ctrl-C lands in LoadIndex() or close(): the index is
    registered with the topology exactly while it is made and not closed
    (cut short, a notifier that does nothing stayed registered for good,
    or a closed index kept its own)."""
    n = 0
    while True:
        topology = workqueue.Topology(2)
        made: list[workqueue.LoadIndex] = []
        if call == "make":
            landed = interrupted_at(
                n, PACKAGE, lambda made=made, topology=topology: made.append(
                    workqueue.LoadIndex(topology)))
        else:
            made.append(workqueue.LoadIndex(topology))
            made[0].assign("key")
            landed = interrupted_at(n, PACKAGE, made[0].close)
        try:
            open_ = [index for index in made if not index._closed]
            assert len(topology._notifiers) == len(open_)
            for index in open_:
                assert_index_whole(index, topology)
                topology.cpu_down(0)
                assert_index_whole(index, topology)
                index.close()
                index.close()
            assert topology._notifiers == []
        except AssertionError as exc:
            raise AssertionError(f"with Ctrl-C at place {n}, {landed!r}: {exc}") from exc
        if not landed:
            break
        n += 1
    assert n > 3


@pytest.mark.parametrize("call", ["serial", "close_serial"])
def test_ctrl_c_anywhere_in_making_or_closing_the_serial_executors_leaves_no_notifier(
        make_wq: Callable[..., Workqueue], call: str) -> None:
    """Wherever Ctrl-C lands as a workqueue's first serial() makes its
    serial executors' LoadIndex, or as close_serial() (its destroy())
    unregisters it: the workqueue has the index registered, or none is
    (a domain made and not stored, or stored as closed and not closed,
    left a notifier with the topology that did nothing, for good)."""
    n = 0
    while True:
        topology = workqueue.Topology(2, cpu_intensive_thresh=60.0)
        wq = make_wq(topology=topology)
        assert wq.queue_work_on(0, Work(lambda w: None))  # makes the pools: their notifier
        pools_only = list(topology._notifiers)
        if call == "serial":
            landed = interrupted_at(n, PACKAGE, functools.partial(wq.serial, "key"))
        else:
            wq.serial("key")
            landed = interrupted_at(n, PACKAGE, functools.partial(close_serial, wq))
        try:
            domain: Any = wq._serial_domain  # type: ignore[attr-defined]
            in_use = domain not in (None, _serial._CLOSED)
            assert len(topology._notifiers) == len(pools_only) + in_use
            if in_use:
                assert wq.serial("key").submit(int, 7).result(TIMEOUT) == 7
                assert len(topology._notifiers) == len(pools_only) + 1
            wq.destroy(timeout=TIMEOUT)
            assert topology._notifiers == pools_only
        except (AssertionError, TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"with Ctrl-C at place {n}, {landed!r}: {exc!r}") from exc
        if not landed:
            break
        n += 1
    assert n > 3
