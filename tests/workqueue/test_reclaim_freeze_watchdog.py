"""Rescuer (Part 3: 10), freezing (11), watchdog (12)."""

from __future__ import annotations

import contextlib
import gc
import math
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from types import SimpleNamespace
from typing import Any

import pytest
from racewindow import line_of, stands_at
from wqhelpers import CallsInRepr, named_unlocked, wait_until

import workqueue._pool as pool_module
import workqueue._watchdog as _watchdog
from workqueue import (
    WQ_FREEZABLE,
    WQ_MEM_RECLAIM,
    WQ_UNBOUND,
    Topology,
    Work,
    alloc_workqueue,
    blocking,
    current_workqueue,
)
from workqueue._timer import add_timer, armed_timers, del_timer
from workqueue._watchdog import _pool_stalled, _watchdog_timer_fn

TIMEOUT = 10.0


def _no_threads(target: Any, name: str) -> threading.Thread:
    raise RuntimeError("can't start new thread")


@pytest.mark.parametrize("flags", [0, WQ_UNBOUND])
def test_rescuer_runs_items_when_no_worker_can_be_created(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch, flags: int) -> None:
    topo = Topology(2)
    reclaim = make_wq("reclaim", flags | WQ_MEM_RECLAIM, topology=topo)
    plain = make_wq("plain", flags, topology=topo)
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    threads: list[str] = []
    plain_ran = threading.Event()
    p = Work(lambda w: plain_ran.set())
    plain.queue_work_on(0, p)
    r = Work(lambda w: threads.append(threading.current_thread().name))
    reclaim.queue_work_on(0, r)
    r.flush()
    assert threads == ["reclaim-rescuer"]
    assert not plain_ran.is_set() and p.pending  # no worker, no rescuer: it waits
    monkeypatch.undo()  # threads can be made again: the retry timer makes a worker
    assert plain_ran.wait(TIMEOUT)
    p.flush()


def test_an_item_the_rescuer_runs_is_of_the_rescuer_s_workqueue(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rescuer runs its workqueue's items: current_workqueue() there
    answers as on a worker (and so does the is_chained() of a queueing
    from them while the workqueue drains)."""
    topo = Topology(1)
    reclaim = make_wq("reclaim", WQ_MEM_RECLAIM, topology=topo)
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    seen: list[tuple[str, Any]] = []
    r = Work(lambda w: seen.append((threading.current_thread().name, current_workqueue())))
    reclaim.queue_work(r)
    r.flush(timeout=TIMEOUT)
    assert seen == [("reclaim-rescuer", reclaim)]


def test_an_item_of_another_workqueue_a_rescuer_runs_is_of_its_own_workqueue(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rescuer runs another workqueue's item too: one that its own
    workqueue's item, run by it, queued there (non-reentrancy hands the
    second run to the worker running the first, the rescuer:
    find_worker_executing_work).  current_workqueue() answers the
    workqueue of the item being run, as the kernel's is_chained_work()
    reads the running item's pwq, not the rescuer's: a flush or drain of
    the rescuer's workqueue from there does not wait for itself, and one
    of the item's own does."""
    topo = Topology(1)
    a = make_wq("a", WQ_MEM_RECLAIM, topology=topo)
    b = make_wq("b", WQ_MEM_RECLAIM, topology=topo)  # its rescuer takes the queueing
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    seen: list[tuple[str, Any]] = []

    def func(work: Work) -> None:
        seen.append((threading.current_thread().name, current_workqueue()))
        if len(seen) == 1:
            assert b.queue_work(work) is True
            # Still running here: b's rescuer hands the run to ours.
            wait_until(lambda: a._rescuer.scheduled.nr == 1, "the run handed to a's rescuer")

    w = Work(func)
    a.queue_work(w)
    wait_until(lambda: len(seen) == 2, "the second run")
    assert seen == [("a-rescuer", a), ("a-rescuer", b)]


def test_rescuer_unblocks_an_item_waiting_for_another(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from workqueue import blocking
    topo = Topology(1, cpu_intensive_thresh=60.0)
    wq = make_wq("reclaim", WQ_MEM_RECLAIM, topology=topo)
    first_started = threading.Event()
    wq.queue_work(Work(lambda w: first_started.set()))
    assert first_started.wait(TIMEOUT)
    wq.flush()  # the pool now has a worker and an idle reserve
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    second_ran = threading.Event()
    got: list[bool] = []

    def first(work: Work) -> None:
        wq.queue_work(Work(lambda w: second_ran.set()))
        with blocking():
            got.append(second_ran.wait(TIMEOUT))

    # Use up the reserve with a blocked item, so the next needs a new thread.
    hold = threading.Event()
    holding = threading.Event()

    def holder(work: Work) -> None:
        holding.set()
        with blocking():
            assert hold.wait(TIMEOUT)

    wq.queue_work(Work(holder))
    assert holding.wait(TIMEOUT)
    f = Work(first)
    wq.queue_work(f)
    f.flush()
    hold.set()
    assert got == [True]


def test_the_rescuer_leaves_an_item_still_running_to_its_worker(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued again while it runs (blocked) on a worker, when no worker can
    be made, the item is taken by the rescuer -- which must hand it to the
    worker running it, not run it alongside (non-reentrancy)."""
    topo = Topology(1, cpu_intensive_thresh=60.0)
    wq = make_wq("reclaim", WQ_MEM_RECLAIM, topology=topo)
    warm = Work(lambda w: None)
    wq.queue_work(warm)
    warm.flush()  # the pool now has a worker and an idle reserve
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    hold, holding = threading.Event(), threading.Event()

    def holder(work: Work) -> None:
        holding.set()
        with blocking():
            assert hold.wait(TIMEOUT)

    started, release, first_done, second = (threading.Event() for _ in range(4))
    saw: list[tuple[bool, str]] = []

    def func(work: Work) -> None:
        if not started.is_set():
            started.set()
            with blocking():  # so that the pool wants another worker
                assert release.wait(TIMEOUT)
            first_done.set()
        else:
            saw.append((first_done.is_set(), threading.current_thread().name))
            second.set()

    w = Work(func)
    try:
        wq.queue_work(Work(holder))  # takes the reserve
        assert holding.wait(TIMEOUT)
        assert wq.queue_work(w) is True  # the last worker runs it
        assert started.wait(TIMEOUT)
        assert wq.queue_work(w) is True  # no worker left to make: a mayday
        assert not second.wait(0.2), "second run started while the first was still running"
    finally:
        release.set()
        hold.set()
    assert second.wait(TIMEOUT)
    assert saw[0][0] is True and "rescuer" not in saw[0][1]
    monkeypatch.undo()
    w.flush()


def test_the_rescuer_takes_an_item_cancelled_and_queued_again(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worklist the rescuer takes from holds a tombstone of the item
    (cancelled) before its live entry (queued again): the rescuer must
    take the live one, and leave no stale tombstone count behind that
    would hide the item's next queueing."""
    wq = make_wq("reclaim", WQ_MEM_RECLAIM, topology=Topology(1))
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)  # no worker, ever
    hold, holding = threading.Event(), threading.Event()
    runs = threading.Semaphore(0)
    x = Work(lambda w: runs.release())
    try:
        wq.queue_work(Work(lambda w: (holding.set(), hold.wait(TIMEOUT))))
        assert holding.wait(TIMEOUT)  # the rescuer runs it; the next mayday waits
        assert wq.queue_work(x) is True
        assert x.cancel() is True
        assert wq.queue_work(x) is True  # behind its tombstone
        hold.set()
        assert runs.acquire(timeout=TIMEOUT), "the rescuer lost the item"
        assert wq.queue_work(x) is True  # onto the list the rescuer took from
        assert runs.acquire(timeout=TIMEOUT), "the item's next queueing was lost"
    finally:
        hold.set()
        monkeypatch.undo()
    x.flush()


def test_a_mayday_is_sent_once_while_the_rescuer_has_not_taken_it(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool that cannot make a worker asks the rescuer at every kick;
    while its mayday waits for the busy rescuer, it is not queued again
    (the kernel's list_empty(&pwq->mayday_node)): the list of maydays
    does not grow with every item queued."""
    topo = Topology(1)
    wq = make_wq("reclaim", WQ_MEM_RECLAIM, topology=topo)
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    hold, holding = threading.Event(), threading.Event()
    ran = threading.Semaphore(0)
    items = [Work(lambda w: ran.release()) for _ in range(4)]
    try:
        wq.queue_work(Work(lambda w: (holding.set(), hold.wait(TIMEOUT))))
        assert holding.wait(TIMEOUT)  # the rescuer runs it
        for w in items:
            assert wq.queue_work(w) is True
        with pool_module.lock:
            assert len(wq._maydays) == 1
    finally:
        hold.set()
    for _ in items:
        assert ran.acquire(timeout=TIMEOUT)
    monkeypatch.undo()


def test_maydays_from_two_pools_in_one_step_wake_the_rescuer_once(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """set_max_active() activates the waiting items of every CPU under one
    hold of the engine lock; with no worker to be made, each pool sends
    the rescuer a mayday.  The second must not wake it again (its wake-up
    is a lock, released once), and the rescuer runs the items of both,
    the pool that asked first first."""
    monkeypatch.setattr(pool_module, "MAYDAY_INTERVAL", 3600.0)  # no retry meanwhile
    topo = Topology(2)
    wq = make_wq("reclaim", WQ_MEM_RECLAIM, max_active=1, topology=topo)
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    ran: list[tuple[int, str]] = []

    class Item(Work):
        def __init__(self, n: int) -> None:
            super().__init__(lambda w: ran.append((n, threading.current_thread().name)))

    items = [Item(n) for n in range(4)]
    for n, w in enumerate(items):  # per CPU: one active and waiting, one inactive
        assert wq.queue_work_on(n // 2, w) is True
    assert not ran
    wq.set_max_active(2)
    for w in items:
        w.flush(timeout=TIMEOUT)
    assert ran == [(n, "reclaim-rescuer") for n in range(4)]


def test_destroy_stops_the_rescuer(make_wq: Any) -> None:
    wq = make_wq("reclaim", WQ_MEM_RECLAIM)
    rescuer = wq._rescuer.thread
    assert rescuer.is_alive()
    wq.destroy()
    rescuer.join(TIMEOUT)
    assert not rescuer.is_alive(), "the rescuer of a destroyed workqueue lives on"


def test_shutdown_cancels_the_calls_the_rescuer_took_and_has_not_started(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rescuer takes all of a pool's items of its workqueue at once
    and runs them one after the other: those not started yet are still
    pending calls, which shutdown(cancel_futures=True) cancels and the exit
    hook finds (it kept them on a list of its own, where neither looked)."""
    topo = Topology(1, cpu_intensive_thresh=60.0)
    wq = make_wq("reclaim", WQ_MEM_RECLAIM, topology=topo)
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    hold_started, hold_release, first_started, first_release = (
        threading.Event() for _ in range(4))
    # The rescuer is busy with this one while both calls are queued, so
    # that it takes them together once it is done.
    wq.queue_work(Work(lambda w: (hold_started.set(), hold_release.wait(TIMEOUT))))
    assert hold_started.wait(TIMEOUT)
    first = wq.submit(lambda: (first_started.set(), first_release.wait(TIMEOUT)))
    second = wq.submit(lambda: "ran")
    hold_release.set()
    assert first_started.wait(TIMEOUT)
    try:
        assert len(wq._call_works()) == 2  # the exit hook's view: both calls
        wq.shutdown(wait=False, cancel_futures=True)
        assert second.cancelled()
    finally:
        first_release.set()
    assert first.result(TIMEOUT)[0] is None
    with pytest.raises(CancelledError):
        second.result(TIMEOUT)
    monkeypatch.undo()
    wq.shutdown(wait=True)


def test_freeze_waits_for_in_flight_and_holds_new_items(make_wq: Any) -> None:
    wq = make_wq("frz", WQ_FREEZABLE)
    release = threading.Event()
    started = threading.Event()
    order: list[str] = []

    def running(work: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)
        order.append("in-flight done")

    wq.queue_work(Work(running))
    assert started.wait(TIMEOUT)
    freezer = threading.Thread(target=lambda: (wq.freeze(), order.append("frozen")))
    freezer.start()
    while not wq._frozen:
        freezer.join(0.001)
    held = Work(lambda w: order.append("held ran"))
    assert wq.queue_work(held) is True
    release.set()
    freezer.join(TIMEOUT)
    assert order == ["in-flight done", "frozen"]
    assert held.pending and sum(p.nr_inactive for p in wq.stats().pools) == 1
    assert sum(p.max_active for p in wq.stats().pools) == 0
    wq.thaw()
    held.flush()
    assert order[-1] == "held ran"
    wq.thaw()  # not frozen: no-op


def test_freeze_waits_for_the_in_flight_items_of_every_cpu(make_wq: Any) -> None:
    """One CPU's items done is not enough: freeze() returns once no pool
    of the workqueue has an item in flight."""
    wq = make_wq("frz", WQ_FREEZABLE)
    started = [threading.Event(), threading.Event()]
    release = [threading.Event(), threading.Event()]
    for cpu in (0, 1):
        wq.queue_work_on(cpu, Work(lambda w, cpu=cpu: (
            started[cpu].set(), release[cpu].wait(TIMEOUT))))
    for event in started:
        assert event.wait(TIMEOUT)
    freezer = threading.Thread(target=wq.freeze, daemon=True)
    freezer.start()
    try:
        while not wq._frozen:
            freezer.join(0.001)
        release[0].set()
        while wq.stats().pools[0].nr_active:  # CPU 0's item is done
            freezer.join(0.001)
        freezer.join(0.05)
        assert freezer.is_alive(), "freeze() returned while CPU 1's item ran"
    finally:
        release[1].set()
    freezer.join(TIMEOUT)
    assert not freezer.is_alive()
    wq.thaw()


def test_thaw_releases_a_freeze_still_waiting_for_in_flight_items(make_wq: Any) -> None:
    """thaw() while freeze() waits for the in-flight items: the freeze is
    over, so freeze() returns, and the held items run."""
    wq = make_wq("frz", WQ_FREEZABLE)
    release = threading.Event()
    started = threading.Event()
    # Held longer than the freezer is waited for: only thaw() can end it.
    wq.queue_work(Work(lambda w: (started.set(), release.wait(3 * TIMEOUT))))
    assert started.wait(TIMEOUT)
    freezer = threading.Thread(target=wq.freeze, daemon=True)
    try:
        freezer.start()
        while not wq._frozen:
            freezer.join(0.001)
        held = Work(lambda w: None)
        wq.queue_work(held)
        freezer.join(0.05)
        assert freezer.is_alive(), "freeze() returned with an item in flight"
        wq.thaw()
        freezer.join(TIMEOUT)
        assert not freezer.is_alive(), "freeze() still waits after thaw()"
    finally:
        release.set()
    held.flush()
    assert not held.pending
    wq.freeze()  # and it can be frozen again: nothing in flight now
    wq.thaw()


def _running_then_chaining(wq: Any, chained: Work) -> threading.Event:
    """An item of ``wq`` started, running until the event returned is set,
    then queueing ``chained`` (allowed during a drain)."""
    started, release = threading.Event(), threading.Event()

    def running(w: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)
        wq.queue_work(chained)

    wq.queue_work(Work(running))
    assert started.wait(TIMEOUT)
    return release


@pytest.mark.parametrize("how", ["destroy timed out", "shutdown(wait=False)"])
def test_a_workqueue_being_destroyed_is_not_frozen(make_wq: Any, how: str) -> None:
    """A freeze during the destruction would hold what the running item
    chains, and with it the drain, shutdown(wait=True) and destroy(), until
    thaw(): refused, the destruction going on to its end, chained items
    included."""
    wq = make_wq("frz", WQ_FREEZABLE)
    chained = Work(lambda w: None)
    release = _running_then_chaining(wq, chained)
    if how == "destroy timed out":
        with pytest.raises(TimeoutError):
            wq.destroy(timeout=0.05)  # the item runs until released
    else:
        wq.shutdown(wait=False)
    with pytest.raises(RuntimeError, match="workqueue 'frz' is being destroyed: a freeze "
                       "would hold its drain until thaw"):
        wq.freeze(timeout=0.05)
    assert not wq._frozen
    release.set()
    wq.shutdown()
    assert wq._destroyed.is_set() and not chained.pending


def test_a_workqueue_draining_is_still_frozen(make_wq: Any) -> None:
    """Only the destruction refuses a freeze: a drain() going on is the
    program's own wait, which thaw() (or its timeout) ends.  The freeze
    holds what the running item chains, and the drain with it, until
    thaw()."""
    wq = make_wq("frz", WQ_FREEZABLE)
    chained_ran = threading.Event()
    chained = Work(lambda w: chained_ran.set())
    release = _running_then_chaining(wq, chained)
    drained: list[None] = []  # its None once it returned (not raised)
    drainer = threading.Thread(target=lambda: drained.append(wq.drain(timeout=TIMEOUT)))
    drainer.start()
    wait_until(lambda: wq._nr_drainers == 1)
    with pytest.raises(TimeoutError):  # the item runs until released
        wq.freeze(timeout=0.05)
    assert wq._frozen
    release.set()
    wq.freeze(timeout=TIMEOUT)  # the running item is done
    assert chained.pending and not chained_ran.is_set() and drainer.is_alive()
    wq.thaw()
    drainer.join(TIMEOUT)
    assert drained == [None] and chained_ran.is_set()


def test_set_max_active_while_frozen_holds_the_items_until_thaw(make_wq: Any) -> None:
    """The new limit waits for thaw(), as the kernel's max_active stays 0
    while its workqueues are frozen: raising it lets nothing run."""
    wq = make_wq("frz", WQ_FREEZABLE, 1)
    wq.freeze()
    ran: list[int] = []
    items = [Work(lambda w, i=i: ran.append(i)) for i in range(3)]
    for item in items:
        assert wq.queue_work_on(0, item) is True
    wq.set_max_active(4)
    assert all(item.pending for item in items) and ran == []
    assert sum(p.max_active for p in wq.stats().pools) == 0
    assert wq.stats().max_active == 4
    wq.thaw()
    wq.flush()
    assert sorted(ran) == [0, 1, 2]
    assert {p.max_active for p in wq.stats().pools} == {4}


def test_freeze_from_an_own_item_is_refused_before_anything_changes(make_wq: Any) -> None:
    """It would wait for the item that calls it."""
    wq = make_wq("frz", WQ_FREEZABLE)
    refused: list[BaseException] = []

    def freezing(work: Work) -> None:
        try:
            wq.freeze(timeout=TIMEOUT)
        except BaseException as e:
            refused.append(e)

    work = Work(freezing)
    assert wq.queue_work(work)
    work.flush(timeout=2 * TIMEOUT)
    assert [type(e) for e in refused] == [RuntimeError], refused
    assert "from one of its own work items would deadlock" in str(refused[0])
    assert not wq._frozen and "frozen" not in wq.dump()


def test_freeze_needs_wq_freezable_and_blocks_drain(make_wq: Any) -> None:
    wq = make_wq()
    with pytest.raises(RuntimeError, match="WQ_FREEZABLE"):
        wq.freeze()
    fz = make_wq("fz", WQ_FREEZABLE)
    fz.freeze()
    with pytest.raises(RuntimeError, match="thaw"):
        fz.drain()
    with pytest.raises(RuntimeError, match="thaw"):
        fz.destroy()
    # shutdown() too, before it changes anything: the queue keeps working.
    held = fz.submit(lambda: "ran after thaw")
    with pytest.raises(RuntimeError, match="thaw"):
        fz.shutdown()
    with pytest.raises(RuntimeError, match="thaw"):
        fz.shutdown(wait=False)
    assert "destroyed" not in repr(fz)
    fz.thaw()
    assert held.result(TIMEOUT) == "ran after thaw"
    assert fz.submit(len, "abc").result(TIMEOUT) == 3


def _watched() -> Topology:
    """One CPU whose watchdog reports a stall after 0.05 s, and whose items
    never count as CPU-intensive: one that runs on holds up the pool."""
    return Topology(1, watchdog_thresh=0.05, cpu_intensive_thresh=60.0)


def _several_watchdog_periods() -> None:
    """Wait through several periods of a _watched() watchdog: the timers
    fire in deadline order, so its checks of the time before have run."""
    later = threading.Event()
    add_timer(0.2, lambda arg: later.set())
    assert later.wait(TIMEOUT)


def test_watchdog_reports_a_stall_once_with_the_pool_dump(make_wq: Any, log_waiter: Any) -> None:
    wq = make_wq(topology=_watched())
    logged = log_waiter("workqueue._watchdog", "lockup")
    release = threading.Event()

    def stuck(work: Work) -> None:
        assert release.wait(TIMEOUT)

    wq.queue_work(Work(stuck))
    assert logged.seen.wait(TIMEOUT)
    _several_watchdog_periods()
    release.set()
    wq.flush()
    assert len(logged.records) == 1
    message = logged.records[0].getMessage()
    assert "stuck" in message and "pool " in message and "in-flight" in message
    # Once per stall, not once at all: the next stall is reported again,
    # also once the watchdog has gone quiet, nothing to watch meanwhile.
    pset = wq._all_pwqs()[0].pool.pset

    def quiet() -> bool:  # under the lock: a check unarms and rearms it in one go
        with pool_module.lock:
            return pset.watchdog is None

    wait_until(quiet, "the watchdog went quiet")
    logged.seen.clear()
    release.clear()
    wq.queue_work(Work(stuck))
    assert logged.seen.wait(TIMEOUT)
    release.set()
    wq.flush()
    assert len(logged.records) == 2


@contextlib.contextmanager
def _a_run_held(wq: Any) -> Iterator[Work]:
    """One item of *wq*'s started and held running (neither returning nor
    blocking) until the block ends: that item."""
    started, release = threading.Event(), threading.Event()

    # Named so: a report naming the item says "stuck", as tests check.
    def stuck(work: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)

    w = Work(stuck)
    assert wq.queue_work(w)
    try:
        assert started.wait(TIMEOUT)
        yield w
    finally:
        release.set()


def _the_run_s_start(pset: Any) -> float:
    """When the one busy worker of *pset* started its run."""
    with pool_module.lock:
        (worker,) = [w for pool in pset.pools() for w in pool.busy_workers()]
        return worker.start


def _watchdog_checks_at(monkeypatch: pytest.MonkeyPatch, pset: Any, now: float) -> None:
    """The watchdog's timer run by hand, its clock reading *now*."""
    monkeypatch.setattr(_watchdog, "time", SimpleNamespace(monotonic=lambda: now))
    assert del_timer(pset.watchdog)  # as the timer thread takes it when due
    _watchdog_timer_fn(pset)


def test_watchdog_reports_a_run_once_it_has_lasted_the_threshold_not_before(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch, log_waiter: Any) -> None:
    """The check of a running item, called with the clock in the test's
    hand: the run is reported once it has lasted watchdog_thresh, the
    threshold included, not a tick before -- and then once only."""
    topo = Topology(1, watchdog_thresh=3600.0, cpu_intensive_thresh=60.0)
    wq = make_wq(topology=topo)
    pset = topo._pools
    logged = log_waiter("workqueue._watchdog", "has been running")
    with _a_run_held(wq):
        start = _the_run_s_start(pset)
        due = start + 3600.0
        topo.watchdog_thresh = due - start  # exactly, in floating point
        for now, reports in ((math.nextafter(due, 0.0), 0), (due, 1), (due + 60.0, 1)):
            _watchdog_checks_at(monkeypatch, pset, now)
            assert len(logged.records) == reports, now - start
    # Nothing pending: the pool's dump ends with the run, no empty list.
    # The dump ages it by the watchdog's clock, as the report itself does.
    message = logged.records[0].getMessage()
    assert " for 3600.0s\n" in message, message
    last = message.splitlines()[-1]
    assert last.startswith("  in-flight: ") and last.endswith(" for 3600.000s"), message


def test_watchdog_dumps_a_stalled_pool_by_its_own_clock(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch, log_waiter: Any) -> None:
    """The pool check, called with the clock in the test's hand: the dump
    of a stalled pool ages the run that holds its worklist up by that
    clock too, as the stall itself."""
    topo = Topology(1, watchdog_thresh=3600.0, cpu_intensive_thresh=60.0)
    wq = make_wq(topology=topo)
    pset = topo._pools
    logged = log_waiter("workqueue._watchdog", "stuck for")
    with _a_run_held(wq):
        assert wq.queue_work(Work(lambda work: None))  # waits: the run neither returns nor blocks
        start = _the_run_s_start(pset)
        # First seen waiting, then stalled: 3610 s on, not 3600, which the
        # clock's floating point may put a hair below the threshold.
        for now in (start + 10.0, start + 3620.0):
            _watchdog_checks_at(monkeypatch, pset, now)
    wq.flush()
    (record,) = logged.records
    message = record.getMessage()
    assert " stuck for 3610.0s: " in message, message
    assert re.search(r"\n  in-flight: \S+:<Work .*> for 3620\.000s\n  pending: <", message), message


def test_watchdog_reports_a_stall_of_an_item_the_rescuer_runs(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch, log_waiter: Any) -> None:
    """The rescuer runs items exactly when a pool is in trouble (no worker
    can be made): an item of its that stalls is the one stall most worth
    hearing of, and it is no worker of the pool."""
    wq = make_wq("reclaim", WQ_MEM_RECLAIM, topology=_watched())
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    # The run, not the pool: the rescuer may take the item only once the
    # pool has waited long enough to be reported as well.
    logged = log_waiter("workqueue._watchdog", "has been running")
    with _a_run_held(wq) as w:
        assert logged.seen.wait(TIMEOUT), "the rescuer's stalled item was not reported"
    w.flush()
    message = logged.records[0].getMessage()
    assert "reclaim-rescuer" in message and "stuck" in message


def test_the_rescuer_arms_the_watchdog_for_the_items_it_runs(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch, log_waiter: Any) -> None:
    """The failed creation of a worker arms the watchdog after sending its
    maydays, and Ctrl-C in the main thread may land in between: the
    rescuer, which runs the items then, arms it too, and a stall of its
    item is reported all the same."""
    wq = make_wq("reclaim", WQ_MEM_RECLAIM, topology=_watched())
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    real_arm = pool_module._arm_watchdog

    def arm_but_from_a_failed_creation(pset: Any) -> None:
        if sys._getframe(1).f_code is not pool_module.create_worker.__code__:
            real_arm(pset)

    monkeypatch.setattr(pool_module, "_arm_watchdog", arm_but_from_a_failed_creation)
    logged = log_waiter("workqueue._watchdog", "has been running")
    with _a_run_held(wq) as w:
        assert logged.seen.wait(TIMEOUT), "the rescuer's stalled item was not reported"
    w.flush()
    assert "reclaim-rescuer" in logged.records[0].getMessage()


def test_watchdog_reports_a_stall_of_an_item_whose_repr_fails(
        make_wq: Any, log_waiter: Any) -> None:
    """A failing repr() of one item must not silence the watchdog: it
    names the item anyway, and stays armed for the stalls to come."""

    class Conn(Work):
        def __repr__(self) -> str:
            raise OSError("the socket is closed")

    wq = make_wq(topology=_watched())
    logged = log_waiter("workqueue._watchdog", "lockup")
    release = threading.Event()

    def stuck(work: Work) -> None:
        assert release.wait(TIMEOUT)

    for _ in range(2):  # the second stall is reported too
        logged.seen.clear()
        release.clear()
        wq.queue_work(Conn(stuck))
        wq.queue_work(Conn(lambda w: None))  # pending behind it, in the pool's dump
        try:
            assert logged.seen.wait(TIMEOUT), "the stall was not reported"
        finally:
            release.set()
        wq.flush()
    message = logged.records[-1].getMessage()
    assert "Conn object at" in message and "its repr() raised OSError" in message, message
    assert "pending: <" in message and message.count("its repr() raised OSError") == 3, message


def test_watchdog_names_the_items_it_reports_with_the_engine_lock_free(
        make_wq: Any, log_waiter: Any) -> None:
    """The watchdog checks under the engine lock, on the timer thread that
    every timer needs: it names the items of its reports (and of its
    pools' dumps) once it has let go of the lock, as a repr() may call
    into the workqueue."""
    wq = make_wq(topology=_watched())
    ran_long = log_waiter("workqueue._watchdog", "has been running")
    stuck = log_waiter("workqueue._watchdog", "stuck for")
    release = threading.Event()
    hog = CallsInRepr(lambda work: release.wait(TIMEOUT), wq)
    behind = CallsInRepr(lambda work: None, wq)
    assert wq.queue_work(hog) and wq.queue_work(behind)
    try:
        assert ran_long.seen.wait(TIMEOUT), "the long run was not reported"
        assert stuck.seen.wait(TIMEOUT), "the stuck pool was not reported"
    finally:
        release.set()
    wq.flush()
    assert named_unlocked(hog, behind)
    message = ran_long.records[0].getMessage()
    assert " has been running <CallsInRepr> for " in message, message
    # The dump's in-flight line, a line of its own.
    assert re.search(r"\n  in-flight: \S+:<CallsInRepr> for ", message), message
    assert message.endswith("\n  pending: <CallsInRepr>"), message
    message = stuck.records[0].getMessage()
    assert ": <CallsInRepr> waits, " in message, message
    assert message.endswith("\n  pending: <CallsInRepr>"), message


def test_watchdog_reports_a_pool_that_cannot_start_its_items_once_per_stall(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch, log_waiter: Any) -> None:
    """The kernel's other lockup: a worklist that does not move, no item
    of it started for watchdog_thresh -- here no worker can be made, and
    no rescuer helps.  No item runs, so no run is too long: the pool
    itself is reported, once per stall, with its dump."""
    wq = make_wq(topology=_watched())
    logged = log_waiter("workqueue._watchdog", "stuck for")
    ran = threading.Event()
    starved = Work(lambda work: ran.set())
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    assert wq.queue_work(starved)
    assert logged.seen.wait(TIMEOUT), "the starved pool was not reported"
    _several_watchdog_periods()
    assert len(logged.records) == 1, [r.getMessage() for r in logged.records]
    message = logged.records[0].getMessage()
    assert message.startswith("BUG: workqueue lockup - pool cpu0 stuck for "), message
    assert f"{starved!r} waits" in message and f"pending: {starved!r}" in message, message
    assert "pool 0 (cpu0)" in message, message  # the dump
    monkeypatch.undo()  # the pool's retry makes a worker now
    assert ran.wait(TIMEOUT)


def test_watchdog_reports_each_stall_of_a_pool_whose_workers_are_all_busy(
        make_wq: Any, log_waiter: Any) -> None:
    """An item that hogs a concurrency-managed pool (it neither returns
    nor says it blocks, and the CPU-intensive threshold is far) holds up
    the items behind it: the running item is reported, and the pool whose
    worklist stopped moving too.  Once it moves again, the next stall is
    a new one, reported again."""
    wq = make_wq(topology=_watched())
    logged = log_waiter("workqueue._watchdog", "stuck for")
    release = threading.Event()

    def hog(work: Work) -> None:
        assert release.wait(TIMEOUT)

    def behind(work: Work) -> None:
        pass

    for stall in (1, 2):
        release.clear()
        logged.seen.clear()
        assert wq.queue_work(Work(hog))
        assert wq.queue_work(Work(behind))
        try:
            assert logged.seen.wait(TIMEOUT), f"stall {stall} was not reported"
        finally:
            release.set()
        wq.flush()
        assert len(logged.records) == stall
        message = logged.records[-1].getMessage()
        assert ".behind pending> waits" in message and ".hog running> for" in message, message


def test_watchdog_reports_a_stall_once_when_another_user_of_the_pool_goes(
        make_wq: Any, log_waiter: Any) -> None:
    """A workqueue destroyed while another one's items stall on a pool it
    used takes its count of started items with it: that is no start of
    an item, and the stall goes on -- neither reported again nor timed
    afresh."""
    topo = _watched()
    other = make_wq("other", topology=topo)
    assert other.queue_work(Work(lambda work: None))
    other.flush()  # its pwq of cpu0 has started an item
    wq = make_wq(topology=topo)
    logged = log_waiter("workqueue._watchdog", "stuck for")
    release = threading.Event()

    def hog(work: Work) -> None:
        assert release.wait(TIMEOUT)

    try:
        assert wq.queue_work(Work(hog))
        assert wq.queue_work(Work(lambda work: None))
        assert logged.seen.wait(TIMEOUT), "the stall was not reported"
        other.destroy(timeout=TIMEOUT)
        _several_watchdog_periods()
    finally:
        release.set()
    assert len(logged.records) == 1, [r.getMessage() for r in logged.records]


@pytest.mark.parametrize("thresh", [40.0, 0.05])
@pytest.mark.parametrize("stall", ["an item runs", "no worker can be made"])
def test_the_watchdog_checks_every_quarter_threshold(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch, thresh: float, stall: str) -> None:
    """A stall is reported at most a quarter threshold late: while an item
    runs, or one waits with no worker to be had, the next check is never
    further away than that (not just at the pool's next creation retry)."""
    wq = make_wq(topology=Topology(1, watchdog_thresh=thresh, cpu_intensive_thresh=60.0))
    pset = wq._all_pwqs()[0].pool.pset
    started, release = threading.Event(), threading.Event()
    if stall == "no worker can be made":
        monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
        started.set()
    assert wq.queue_work(Work(lambda work: (started.set(), release.wait(TIMEOUT))))
    try:
        assert started.wait(TIMEOUT)
        for _ in range(5):
            with pool_module.lock:
                handle = pset.watchdog
                assert handle is not None
                ahead = handle.deadline - time.monotonic()
            assert ahead <= thresh / 4, f"the next check is {ahead:.3f}s away"
            _several_watchdog_periods()
    finally:
        release.set()
        monkeypatch.undo()  # the pool's retry makes a worker now


def test_the_watchdog_keeps_no_destroyed_workqueue_alive() -> None:
    """The check notes the started counts of the pwqs it saw while items
    waited; once it has seen the worklist empty it forgets them, so a
    workqueue destroyed since is not kept alive until the pool's next
    stall (its pwq holds it)."""
    topo = _watched()
    wq = alloc_workqueue("gone", topology=topo)
    pool = wq._all_pwqs()[0].pool
    release = threading.Event()
    assert wq.queue_work(Work(lambda work: release.wait(TIMEOUT)))
    assert wq.queue_work(Work(lambda work: None))  # waits behind it, for the check to see

    def seen_waiting() -> bool:
        with pool_module.lock:
            return bool(pool.watchdog_started)

    try:
        wait_until(seen_waiting, "a check saw the item wait")
    finally:
        release.set()
    wq.flush()

    def quiet() -> bool:  # its last check saw the worklist empty
        with pool_module.lock:
            return topo._pools.watchdog is None

    wait_until(quiet, "the watchdog went quiet")
    wq.destroy()
    gone = weakref.ref(wq)
    del wq
    gc.collect()
    assert gone() is None, "the watchdog keeps the destroyed workqueue"


def _checks_of(wq: Any) -> Callable[[float], float | None]:
    """The pool check of *wq*'s one pool, with a threshold of 1 s, called
    with the clock in the test's hand at the times it is given.  The real
    checks run on the timer thread every quarter of the topology's
    watchdog_thresh (workqueue._watchdog): the callers' hour keeps them
    15 minutes apart, the first 15 minutes after a worker is busy or an
    item waits, past the suite's timeout; one in a test would stamp the
    pool by the real clock, under the test's."""
    assert wq.topology.watchdog_thresh >= 3600.0
    (pwq,) = wq._all_pwqs()

    def stalled(now: float) -> float | None:
        with pool_module.lock:
            return _pool_stalled(pwq.pool, now, 1.0)

    return stalled


@pytest.mark.parametrize("emptied", ["seen empty", "emptied between two checks"])
def test_watchdog_times_a_pool_stall_from_when_it_first_saw_the_item_wait(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch, emptied: str) -> None:
    """The pool check, called with the clock in the test's hand, on a pool
    that has never started an item (no worker can be made): a stall is
    timed from the first check that saw an item wait, afresh once the
    worklist was empty -- an item cancelled is no stall of the one queued
    after it, also when no check saw the worklist empty in between (the
    kernel stamps the new item's queueing; timed from the cancelled one,
    it was reported early) -- not from when a new workqueue joins the
    pool, and is reported once it has lasted the threshold, not before."""
    topo = Topology(1, watchdog_thresh=3600.0)
    wq = make_wq(topology=topo)
    stalled = _checks_of(wq)
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    cancelled = Work(lambda work: None)
    assert wq.queue_work(cancelled)
    assert stalled(100.0) is None  # first seen waiting
    assert cancelled.cancel()
    if emptied == "seen empty":
        assert stalled(100.5) is None
    ran = threading.Event()
    assert wq.queue_work(Work(lambda work: ran.set()))
    assert stalled(101.5) is None  # first seen waiting: timed from here
    make_wq("late", topology=topo)  # a pwq of the pool that started nothing
    assert stalled(102.4) is None
    assert stalled(102.5) == 1.0
    assert stalled(103.5) is None  # reported already
    monkeypatch.undo()  # the pool's retry makes a worker now
    assert ran.wait(TIMEOUT)


def test_watchdog_times_afresh_a_stall_after_a_worklist_seen_empty(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool check, called with the clock in the test's hand: a check
    that sees the worklist empty forgets when it first saw items wait, so
    the next stall is timed from the next check that sees one wait -- also
    when the items that moved the worklist were the only starts, and
    their workqueue is gone since (a newcomer that has started nothing
    does not look like a move, and its item was reported early, timed
    from before it was queued)."""
    topo = Topology(1, watchdog_thresh=3600.0, cpu_intensive_thresh=60.0)
    first = make_wq("first", topology=topo)
    started, release, ran = threading.Event(), threading.Event(), threading.Event()
    assert first.queue_work(Work(lambda work: (started.set(), release.wait(TIMEOUT))))
    assert started.wait(TIMEOUT)
    assert first.queue_work(Work(lambda work: None))  # waits behind the run
    (pwq,) = first._all_pwqs()
    pool = pwq.pool

    def stalled(now: float) -> float | None:
        with pool_module.lock:
            return _pool_stalled(pool, now, 1.0)

    assert stalled(100.0) is None  # first seen waiting
    release.set()
    first.flush()
    assert stalled(100.5) is None  # seen empty
    first.destroy(timeout=TIMEOUT)

    def no_workers() -> bool:
        with pool_module.lock:
            return not pool.workers

    wait_until(no_workers, "the pool's workers exited")
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    second = make_wq("second", topology=topo)
    assert second.queue_work(Work(lambda work: ran.set()))  # no worker: it waits
    assert stalled(101.4) is None  # first seen waiting: timed from here
    assert stalled(102.4) == 1.0
    monkeypatch.undo()  # the pool's retry makes a worker now
    assert ran.wait(TIMEOUT)


def test_watchdog_goes_on_timing_a_stall_when_a_cancel_leaves_items_waiting(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a cancel that empties the worklist times the next stall
    afresh: one that leaves an item waiting there, or that empties an
    inactive list, is no start, and the pool has not moved since the
    first check saw it wait.  (Timed afresh at each cancel, a stall of a
    pool whose items are cancelled and queued again would never be
    reported.)"""
    topo = Topology(1, watchdog_thresh=3600.0)
    wq = make_wq("wq", 0, 2, topology=topo)
    stalled = _checks_of(wq)
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    ran = threading.Event()
    first, second, third = (Work(lambda work: None), Work(lambda work: ran.set()),
                            Work(lambda work: None))
    for work in (first, second, third):
        assert wq.queue_work(work)
    (pwq,) = wq._all_pwqs()
    assert third._entry is pwq.inactive  # max_active 2
    assert stalled(100.0) is None  # first seen waiting
    assert third.cancel()  # the inactive list empties
    assert first.cancel()  # the worklist keeps the second
    assert stalled(100.5) is None
    assert stalled(101.25) == 1.25  # for how long it has waited, not the threshold
    monkeypatch.undo()  # the pool's retry makes a worker now
    assert ran.wait(TIMEOUT)


def test_watchdog_times_a_stall_afresh_when_a_user_that_started_items_goes(
        make_wq: Any) -> None:
    """The items the pool started count even when the workqueue that
    started them is destroyed before the next check: the worklist moved,
    and a stall of an item queued after it is timed from the check that
    first saw that item wait, not from before (the check compared only the
    pwqs still in the pool, and reported it early)."""
    topo = Topology(1, watchdog_thresh=3600.0, cpu_intensive_thresh=60.0)
    wq = make_wq("wq", topology=topo)
    gone = make_wq("gone", topology=topo)
    stalled = _checks_of(wq)
    gate, release = threading.Event(), threading.Event()
    started, started_gone, waited = threading.Event(), threading.Event(), threading.Event()

    def hog(work: Work) -> None:  # counts, so that what is queued waits
        started.set()
        assert gate.wait(TIMEOUT)
        with blocking():  # but not while the other workqueue's item starts
            assert started_gone.wait(TIMEOUT)
        waited.set()
        assert release.wait(TIMEOUT)

    try:
        assert wq.queue_work(Work(hog))
        assert started.wait(TIMEOUT)
        assert gone.queue_work(Work(lambda work: started_gone.set()))
        assert stalled(100.0) is None  # first seen waiting
        gate.set()
        assert waited.wait(TIMEOUT)
        gone.destroy(timeout=TIMEOUT)  # its pwq leaves the pool, and its count
        ran = threading.Event()
        assert wq.queue_work(Work(lambda work: ran.set()))  # waits behind the hog
        assert stalled(100.5) is None  # first seen waiting: timed from here
        assert stalled(101.0) is None
        assert stalled(101.5) == 1.0
    finally:
        gate.set()
        release.set()
    assert ran.wait(TIMEOUT)


def test_watchdog_times_a_stall_afresh_when_a_user_that_joined_since_starts_items(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start counts also when its pwq joined the pool after the check
    that stamped the stall: here a rescuer, which no worker shortage
    stops, runs the item of a workqueue made since, while the item
    first seen waiting stays (its workqueue has no rescuer)."""
    topo = Topology(1, watchdog_thresh=3600.0)
    wq = make_wq("plain", topology=topo)
    stalled = _checks_of(wq)
    real_start = pool_module._start_thread

    def no_workers(target: Any, name: str) -> threading.Thread:
        if name.endswith("-rescuer"):
            return real_start(target, name)
        return _no_threads(target, name)

    monkeypatch.setattr(pool_module, "_start_thread", no_workers)
    waited, rescued = threading.Event(), threading.Event()
    assert wq.queue_work(Work(lambda work: waited.set()))
    assert stalled(100.0) is None  # first seen waiting
    late = make_wq("reclaim", WQ_MEM_RECLAIM, topology=topo)
    assert late.queue_work(Work(lambda work: rescued.set()))
    assert rescued.wait(TIMEOUT)  # the pool's retry sent the rescuer
    assert stalled(100.5) is None  # an item started: timed afresh
    assert stalled(101.0) is None
    assert stalled(101.5) == 1.0
    monkeypatch.undo()  # the pool's retry makes a worker now
    assert waited.wait(TIMEOUT)


@pytest.mark.parametrize("taker", ["an idle worker", "the rescuer",
                                   "the rescuer, another item waiting"])
def test_watchdog_times_a_pool_stall_afresh_when_its_item_went_to_its_runner(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch, tracer: Any, taker: str) -> None:
    """An item queued again while it runs, taken off the worklist and
    handed to the worker still running it (non-reentrancy) -- by another
    worker, or by the rescuer when no worker can be made -- starts
    nothing: the worklist is empty until the next queueing, and a stall of
    that one is timed from there, not from when the check saw the item
    that left wait.  Cancelled from the runner's list, the item leaves
    the worklist's stall as it was.  So does a rescuer's take that
    leaves another item waiting: the worklist never emptied, and nothing
    started."""
    topo = Topology(1, watchdog_thresh=3600.0, cpu_intensive_thresh=60.0)
    rescued = taker.startswith("the rescuer")
    behind = taker.endswith("another item waiting")
    wq = make_wq("reclaim" if rescued else "wq", WQ_MEM_RECLAIM if rescued else 0,
                 topology=topo)
    plain = make_wq("plain", topology=topo)  # whose items no rescuer takes
    plain.add_trace_hook(tracer)
    stalled = _checks_of(wq)
    pool = wq._all_pwqs()[0].pool
    gates = [threading.Event() for _ in range(4)]
    started, holding = threading.Event(), threading.Event()

    def func(work: Work) -> None:
        if started.is_set():
            return
        started.set()
        assert gates[0].wait(TIMEOUT)
        with blocking():  # the pool wants a worker for the item's next queueing
            assert gates[1].wait(TIMEOUT)
        assert gates[2].wait(TIMEOUT)  # and this one runs it again, next

    def holder(work: Work) -> None:
        holding.set()
        with blocking():
            assert gates[3].wait(TIMEOUT)

    w = Work(func)
    waiting = Work(lambda work: None)
    try:
        if rescued:
            warm = Work(lambda work: None)
            assert wq.queue_work(warm)
            warm.flush()  # the pool now has a worker and an idle reserve
            monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
            assert wq.queue_work(Work(holder))  # takes the reserve
            assert holding.wait(TIMEOUT)
        assert wq.queue_work(w)
        assert started.wait(TIMEOUT)
        assert wq.queue_work(w)  # waits on the worklist: the running item counts
        if behind:
            assert plain.queue_work(waiting)
        assert stalled(100.0) is None  # first seen waiting
        with pool_module.lock:
            (runner,) = [x for x in pool.workers if x.current is w]
        gates[0].set()
        wait_until(lambda: w._entry is runner.scheduled,
                   f"{taker} handed the item to its runner")
        gates[1].set()  # the runner counts again: what is queued now waits
        wait_until(lambda: pool.nr_running == 1, "the runner left blocking()")
        if behind:
            assert stalled(100.25) is None
            assert w.cancel()  # from the runner's list: the worklist did not move
            assert stalled(101.0) == 1.0  # waiting since 100.0, nothing started
        else:
            assert plain.queue_work(waiting)
            assert stalled(100.25) is None  # the queueing is before this, not before 100.0
            assert w.cancel()  # from the runner's list: the worklist did not move
            assert stalled(101.0) is None
            assert stalled(101.25) == 1.0
    finally:
        for gate in gates:
            gate.set()
    monkeypatch.undo()
    tracer.wait_for(lambda: "execute_end" in tracer.of(waiting))


def test_idle_workers_beyond_two_exit_after_the_idle_timeout(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five blocking items get cpu0's pool five busy workers and one in
    reserve; once they are all idle, those beyond two exit after
    IDLE_WORKER_TIMEOUT (shortened here), and the last two stay."""
    monkeypatch.setattr(pool_module, "IDLE_WORKER_TIMEOUT", 0.05)
    wq = make_wq()
    release = threading.Event()
    started = threading.Semaphore(0)

    def blocker(work: Work) -> None:
        with blocking():
            started.release()
            assert release.wait(TIMEOUT)

    def cpu0() -> Any:
        (stats,) = [p for p in wq.stats().pools if p.pool == "cpu0"]
        return stats

    items = [Work(blocker) for _ in range(5)]
    try:
        for w in items:
            assert wq.queue_work_on(0, w) is True
        for _ in items:
            assert started.acquire(timeout=TIMEOUT)
        busy = cpu0()
        assert busy.nr_workers - busy.nr_idle == 5
        assert busy.nr_workers >= 6  # a reserve worker is always idle
    finally:
        release.set()
    wq.flush()
    deadline = time.monotonic() + TIMEOUT
    while cpu0().nr_workers > 2:  # a bounded poll: worker exits have no event
        assert time.monotonic() < deadline, f"idle workers not reclaimed: {cpu0()}"
        threading.Event().wait(0.01)
    # The last two stay, however many timeouts go by.
    threading.Event().wait(0.3)
    idle = cpu0()
    assert (idle.nr_workers, idle.nr_idle) == (2, 2)
    # And they still run items.
    ran = threading.Event()
    assert wq.queue_work_on(0, Work(lambda work: ran.set())) is True
    assert ran.wait(TIMEOUT)


def test_a_wake_up_racing_the_idle_timeout_is_taken_once(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle worker whose timed sleep ends as a waker wakes it (the waker
    holds the engine lock that the worker then waits for) takes that
    wake-up all the same, and back on the idle list it sleeps on a wake
    lock taken again: left released, it woke once more for nothing, and a
    waker meanwhile released a released lock (RuntimeError)."""
    monkeypatch.setattr(pool_module, "IDLE_WORKER_TIMEOUT", 0.01)
    real_worker_thread = pool_module._worker_thread
    asleep = line_of(real_worker_thread, "worker.wake.acquire(timeout=IDLE_WORKER_TIMEOUT)")
    pause_next, paused, go = threading.Event(), threading.Event(), threading.Event()

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == asleep and pause_next.is_set() \
                and not paused.is_set():
            paused.set()  # about to sleep again, after the wake-up
            assert go.wait(TIMEOUT)
        return local

    def traced(worker: Any) -> None:
        sys.settrace(lambda frame, event, arg: (
            local if frame.f_code is real_worker_thread.__code__ else None))
        try:
            real_worker_thread(worker)
        finally:
            sys.settrace(None)

    monkeypatch.setattr(pool_module, "_worker_thread", traced)
    wq = make_wq(topology=Topology(1, watchdog_thresh=3600.0, cpu_intensive_thresh=60.0))
    pool = wq._all_pwqs()[0].pool
    try:
        with pool_module.lock:
            assert not pool.workers  # nothing queued yet: no worker made
            assert pool_module.create_worker(pool)
            (worker,) = pool.workers  # alone and idle: it times out, and sleeps again
            wait_until(lambda: stands_at(worker.thread.ident, real_worker_thread,
                                         "lock_acquire_contended()"),
                       "the worker's sleep timed out and it waits for the engine lock")
            pool_module.kick_pool(pool)  # the wake-up that raced the timeout
            assert worker.woken
            pause_next.set()
        assert paused.wait(TIMEOUT), "the worker did not go back to sleep"
        with pool_module.lock:
            assert worker.idle and not worker.woken and pool.idle == [worker]
            assert worker.wake.locked(), "the wake-up was left to be taken again"
            pool_module.kick_pool(pool)  # a waker now: no RuntimeError
    finally:
        go.set()
    monkeypatch.undo()
    ran = threading.Event()
    assert wq.queue_work(Work(lambda work: ran.set()))
    assert ran.wait(TIMEOUT)


def test_idle_workers_are_reaped_down_to_a_quarter_of_the_busy_ones_plus_two(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """too_many_workers: idle workers beyond two exit while they are at
    least a quarter of the busy ones (MAX_IDLE_WORKERS_RATIO): with four
    busy, three idle are one too many, and the pool keeps two."""
    monkeypatch.setattr(pool_module, "IDLE_WORKER_TIMEOUT", 0.05)
    wq = make_wq()
    releases = [threading.Event() for _ in range(7)]
    started = threading.Semaphore(0)

    def blocker(release: threading.Event) -> Work:
        def func(work: Work) -> None:
            with blocking():
                started.release()
                assert release.wait(TIMEOUT)
        return Work(func)

    def cpu0() -> tuple[int, int]:
        (stats,) = [p for p in wq.stats().pools if p.pool == "cpu0"]
        return stats.nr_workers - stats.nr_idle, stats.nr_idle

    items = [blocker(r) for r in releases]
    try:
        for w in items:
            assert wq.queue_work_on(0, w) is True
        for _ in items:
            assert started.acquire(timeout=TIMEOUT)
        for r, w in zip(releases[:3], items[:3], strict=True):
            r.set()
            w.flush(timeout=TIMEOUT)
        wait_until(lambda: cpu0() == (4, 2), "four busy workers and two idle ones are left")
    finally:
        for r in releases:
            r.set()


def test_a_pool_that_cannot_make_workers_arms_one_retry_however_often_kicked(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every item queued kicks the pool, which tries to make a worker and
    fails: one retry timer is armed for the pool, not one more per item
    (each of which would then go on retrying on its own, for ever)."""
    topo = Topology(1)
    wq = make_wq(topology=topo)
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    ran = threading.Semaphore(0)
    items = [Work(lambda w: ran.release()) for _ in range(3)]
    for w in items:
        assert wq.queue_work(w) is True
    retries = [arg for cb, arg in armed_timers()
               if cb is pool_module._retry_create and arg.pset.topology is topo]
    assert len(retries) == 1
    monkeypatch.undo()
    for _ in items:
        assert ran.acquire(timeout=TIMEOUT)


@contextlib.contextmanager
def _the_idle_worker_taken(wq: Any) -> Iterator[None]:
    """Of a pool with one worker and its idle reserve, and no thread to be
    made (``_start_thread`` patched by the caller): one item holds a worker
    (blocked, so the pool wants another), and a quick item takes the idle
    one, which fails to make a reserve.  The held item is let go as the
    block ends, however it ends."""
    hold, holding = threading.Event(), threading.Event()

    def holder(work: Work) -> None:
        holding.set()
        with blocking():
            assert hold.wait(TIMEOUT)

    try:
        assert wq.queue_work(Work(holder)) is True  # one worker busy, the other idle
        assert holding.wait(TIMEOUT)
        quick = Work(lambda w: None)
        assert wq.queue_work(quick) is True  # takes the idle one, which fails to make a reserve
        quick.flush(timeout=TIMEOUT)
        yield
    finally:
        hold.set()


def test_a_creation_retry_makes_no_worker_for_a_pool_with_one_idle(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool whose last worker creation failed retries it; a worker that
    went idle meanwhile is the reserve the retry was for, so the retry
    makes no surplus worker."""
    monkeypatch.setattr(pool_module, "MAYDAY_INTERVAL", 3600.0)  # the test fires the retry
    topo = Topology(1, cpu_intensive_thresh=60.0)
    wq = make_wq(topology=topo)
    warm = Work(lambda w: None)
    wq.queue_work(warm)
    warm.flush()  # a worker and its idle reserve
    real_start = pool_module._start_thread
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    with _the_idle_worker_taken(wq):
        pool = topo._pools.bound[0, False]
        with pool_module.lock:
            assert pool.create_failed and pool.retry is not None
        monkeypatch.setattr(pool_module, "_start_thread", real_start)
        pool_module._retry_create(pool)  # its worker is idle again by now: see process_works
        with pool_module.lock:
            assert (len(pool.workers), len(pool.idle)) == (2, 1)


def test_a_failure_to_make_a_worker_is_logged_once_per_run_of_failures(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The warning comes with the first failure, not with every retry;
    once a worker could be made, the next failure is news again."""
    topo = Topology(1, cpu_intensive_thresh=60.0)
    wq = make_wq(topology=topo)
    real_start = pool_module._start_thread

    def warnings() -> int:
        return sum("cannot create a worker" in r.getMessage() for r in caplog.records)

    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    first = Work(lambda w: None)
    assert wq.queue_work(first) is True
    assert wq.queue_work(Work(lambda w: None)) is True  # fails again: no new warning
    assert warnings() == 1
    monkeypatch.setattr(pool_module, "_start_thread", real_start)  # the retry makes one
    first.flush(timeout=TIMEOUT)
    monkeypatch.setattr(pool_module, "_start_thread", _no_threads)
    try:
        with _the_idle_worker_taken(wq):
            assert warnings() == 2
    finally:
        monkeypatch.setattr(pool_module, "_start_thread", real_start)
