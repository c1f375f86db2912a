"""Bounded waits: the timeout of flush, cancel_sync, drain, destroy and freeze.

A timed-out call raises the builtin TimeoutError, saying what it still
waited for, and leaves a state that later calls handle as the kernel's
would: no flush is left registered (a later flush waits for what it
should, no more), a cancel_sync() goes on without its caller until the run
it waited for ends, a drain() leaves the workqueue running, a destroy()
goes on without its caller and a second destroy() waits for its end, a
freeze() leaves the workqueue frozen.  Without a timeout, or one that does
not expire, the calls return what the kernel's return.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from wqhelpers import (
    CallsInRepr,
    DelayedCallsInRepr,
    assert_waits_until_released,
    bounded,
    named_unlocked,
    wait_until,
)

from workqueue import WQ_FREEZABLE, DelayedWork, Topology, Work, Workqueue
from workqueue._pool import WAIT_SLICE, Completion, wait_slice

TIMEOUT = 10.0
# How long the timed-out calls below wait: the items they wait for are
# held by events, so the call times out whatever this is.
SHORT = 0.05


class Held:
    """A work function that says when it started, then waits to be released."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.release = threading.Event()
        self.runs = 0
        self.requeue: Callable[[Work], bool] | None = None
        self.requeued: list[bool] = []

    def __call__(self, work: Work) -> None:
        self.runs += 1
        self.started.release()
        assert self.release.wait(TIMEOUT)
        if self.requeue is not None:
            self.requeued.append(self.requeue(work))

    def wait_started(self) -> None:
        assert self.started.acquire(timeout=TIMEOUT)


def running(wq: Workqueue, held: Held, kind: Callable[[Held], Work] = Work) -> Work:
    """An item of ``held``, made by ``kind``, that runs on ``wq``, held."""
    work = kind(held)
    assert wq.queue_work(work)
    held.wait_started()
    return work


def times_out(call: Callable[[], object], *, timeout: float = SHORT) -> str:
    """call() must raise TimeoutError, the builtin, no sooner than
    ``timeout``; its message.  (A call that waited longer than its timeout
    would not raise at all: what it waits for ends -- a Held item stops
    waiting for its release after TIMEOUT -- and it would return.)"""
    began = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        call()
    took = time.monotonic() - began
    assert type(info.value) is TimeoutError
    assert took >= timeout, f"timed out early, after {took:.3f} s"
    return str(info.value)


@pytest.fixture
def held() -> Any:
    held = Held()
    yield held
    held.release.set()  # whatever the test did, nothing stays held


# -- flush_work --------------------------------------------------------------

def test_flush_of_a_running_item_times_out_and_takes_its_flush_back(
        make_wq: Any, held: Held) -> None:
    wq = make_wq()
    work = running(wq, held)
    message = times_out(lambda: work.flush(timeout=SHORT))
    assert f"flush() of {work!r} timed out after {SHORT:g} s" in message
    assert "has run on kworker/" in message, message
    # Nobody waits for it any more: nothing of it stays on the item.
    assert work._flushers is None
    assert work.running and not work.pending
    held.release.set()
    work.flush(timeout=TIMEOUT)
    assert not work.running and work._flushers is None
    assert work.flush(timeout=TIMEOUT) is False  # idle
    assert held.runs == 1


def test_flush_of_an_item_pending_behind_another_says_what_holds_it(
        make_wq: Any, held: Held) -> None:
    wq = make_wq(ordered=True)
    blocker = running(wq, held)
    work = Work(lambda w: None)
    assert wq.queue_work(work)
    message = times_out(lambda: work.flush(timeout=SHORT))
    assert repr(work) in message and "pending" in message
    # The workqueue's dump: the item that runs, and ours behind it.
    assert "in-flight: kworker/" in message and repr(blocker) in message, message
    assert work.pending and work._flushers is None  # only the wait is over
    held.release.set()
    work.flush(timeout=TIMEOUT)
    assert not work.pending and not work.running


class _Conn(Work):
    """An item whose repr() fails: a connection naming its peer, on a
    socket closed since."""

    def __repr__(self) -> str:
        raise OSError("the socket is closed")


def test_a_timed_out_flush_names_an_item_whose_repr_fails(make_wq: Any, held: Held) -> None:
    """The TimeoutError is the contract, whatever the item's repr() does,
    and the workqueue's dump, which it carries, names the items anyway."""
    wq = make_wq(ordered=True)
    blocker = running(wq, held, _Conn)
    work = _Conn(lambda w: None)
    assert wq.queue_work(work)
    message = times_out(lambda: work.flush(timeout=SHORT))
    assert "_Conn object at" in message and "its repr() raised OSError" in message, message
    dump = wq.dump()
    assert dump.count("its repr() raised OSError") == 2, dump
    held.release.set()
    work.flush(timeout=TIMEOUT)
    assert not blocker.running


def test_refusals_name_an_item_whose_repr_fails(make_wq: Any) -> None:
    """A misuse is a RuntimeError saying what was misused, whatever the
    item's repr() does, not the repr's own error."""
    named = r"<.*_Conn object at 0x[0-9a-f]+> \(its repr\(\) raised OSError\)"
    with pytest.raises(RuntimeError, match=f"^enable\\(\\) of {named}, which is not disabled$"):
        _Conn(lambda w: None).enable()
    refused: list[str] = []

    def flush_self(work: Work) -> None:
        with pytest.raises(RuntimeError) as info:
            work.flush(timeout=TIMEOUT)
        refused.append(str(info.value))

    work = _Conn(flush_self)
    assert make_wq().queue_work(work)
    work.flush(timeout=TIMEOUT)
    (message,) = refused
    assert re.match(f"^flush\\(\\) of {named} from its own function would deadlock$", message)


def test_dump_names_its_items_with_the_engine_lock_free(make_wq: Any, held: Held) -> None:
    """A work item's repr() is the program's code, which may call into
    the workqueue: dump() names the items once it has let go of the
    engine lock, in-flight, pending and inactive alike."""
    wq = make_wq(max_active=3)
    blocker = CallsInRepr(held, wq)
    assert wq.queue_work_on(0, blocker)
    held.wait_started()
    # Behind the running item, which does not say it blocks: pending on
    # the pool's worklist, then, past max_active, inactive.
    behind = [CallsInRepr(held, wq) for _ in range(4)]
    assert all(wq.queue_work_on(0, work) for work in behind)
    dump = bounded(wq.dump, "dump()")
    assert named_unlocked(blocker, *behind), dump
    assert ":<CallsInRepr>\n" in dump, dump
    assert "\n    pending: <CallsInRepr>, <CallsInRepr>\n" in dump, dump
    assert dump.endswith("\n    inactive: <CallsInRepr>, <CallsInRepr>"), dump
    # The pool's own dump, for debugging, is the text of its draft.
    pool_dump = bounded(wq._pwqs[0].pool.dump, "the pool's dump()")
    assert pool_dump.endswith("\n  pending: <CallsInRepr>, <CallsInRepr>"), pool_dump


def test_timeouts_name_their_items_with_the_engine_lock_free(
        make_wq: Any, held: Held) -> None:
    """A timed-out wait names the item and dumps the workqueue: neither
    repr() runs under the engine lock."""
    wq = make_wq(ordered=True)
    blocker = running(wq, held, lambda func: CallsInRepr(func, wq))
    work = CallsInRepr(lambda w: None, wq)
    assert wq.queue_work(work)
    message = bounded(lambda: times_out(lambda: work.flush(timeout=SHORT)), "flush()")
    assert message.startswith("flush() of <CallsInRepr> timed out"), message
    message = bounded(lambda: times_out(lambda: wq.flush(timeout=SHORT)), "wq.flush()")
    assert "in-flight: " in message and "inactive: <CallsInRepr>" in message, message
    assert named_unlocked(blocker, work)


def test_refusals_name_their_items_with_the_engine_lock_free(make_wq: Any) -> None:
    """The misuses that name the item -- enable() of one not disabled, a
    wait for an item from its own function -- name it with the engine
    lock free."""
    wq = make_wq()
    idle = CallsInRepr(lambda w: None, wq)
    with pytest.raises(RuntimeError, match=r"^enable\(\) of <CallsInRepr>, which is not"):
        bounded(idle.enable, "enable()")
    assert named_unlocked(idle)
    refused: list[str] = []

    def wait_for_self(work: Work) -> None:
        for wait in (work.flush, work.cancel_sync, work.disable_sync):
            # A timeout that is no timeout is refused first, as anywhere.
            with pytest.raises(ValueError, match="^timeout must be"):
                wait(timeout=-1)
            with pytest.raises(RuntimeError) as info:
                wait(timeout=TIMEOUT)
            refused.append(str(info.value))

    for kind in (CallsInRepr, DelayedCallsInRepr):
        refused.clear()
        work = kind(wait_for_self, wq)
        assert wq.queue_work(work)
        bounded(lambda work=work: work.flush(timeout=TIMEOUT), "the item's run")
        name = kind.__name__
        assert refused == [f"{what}() of <{name}> from its own function would deadlock"
                           for what in ("flush", "cancel_sync", "disable_sync")], refused
        assert named_unlocked(work)
        # Its disable_sync() was refused before it counted: nothing to undo.
        assert not work.disabled


def _hogged(make_wq: Any, held: Held, caplog: pytest.LogCaptureFixture, log_waiter: Any,
            kind: Callable[[Held, Workqueue], Work]) -> tuple[Work, list[str]]:
    """An item of ``held``, made by ``kind``, that runs past the
    CPU-intensive threshold, so that the item queued behind it runs; then
    released: that item, and the debug log's "hogged" lines once there is
    one (named with the lock free: after the item behind may have run)."""
    caplog.set_level(logging.DEBUG, logger="workqueue._pool")
    logged = log_waiter("workqueue._pool", "hogged")
    wq = make_wq(topology=Topology(1, cpu_intensive_thresh=0.01))
    hog = running(wq, held, lambda func: kind(func, wq))
    behind = threading.Event()
    assert wq.queue_work(Work(lambda w: behind.set()))
    try:
        assert behind.wait(TIMEOUT), "the item behind the hog did not run"
    finally:
        held.release.set()
    wq.flush(timeout=TIMEOUT)
    assert logged.seen.wait(TIMEOUT), "the hog was not logged"
    return hog, [r.getMessage() for r in logged.records]


def test_a_hog_is_named_in_the_debug_log_with_the_engine_lock_free(
        make_wq: Any, held: Held, caplog: pytest.LogCaptureFixture, log_waiter: Any) -> None:
    """The CPU-intensive check runs on the timer thread under the engine
    lock: it names the hog once it has let go of the lock."""
    hog, hogged = _hogged(make_wq, held, caplog, log_waiter, CallsInRepr)
    assert hogged[0].startswith("workqueue: <CallsInRepr> hogged "), hogged
    # In milliseconds, at least the threshold's 10.
    ms = re.search(r" for ([0-9.]+) ms; no longer counted$", hogged[0])
    assert ms and float(ms.group(1)) >= 10.0, hogged
    assert named_unlocked(hog)


class _DelayedConn(DelayedWork):
    def __repr__(self) -> str:
        raise OSError("the socket is closed")


def test_a_delayed_item_dropped_is_logged_though_its_repr_fails(
        make_wq: Any, log_waiter: Any) -> None:
    """The error that says a delayed item was not run is the one trace of
    it: a failing repr() must not lose it (on the timer thread, where the
    logging module would format it late)."""
    logged = log_waiter("workqueue._workqueue", "became due")
    wq = make_wq()
    assert wq.queue_delayed_work(_DelayedConn(lambda w: None), 0.01)
    wq.destroy(timeout=TIMEOUT)
    assert logged.seen.wait(TIMEOUT), "the dropped item was not logged"
    message = logged.records[0].getMessage()
    assert "_DelayedConn object at" in message and "its repr() raised OSError" in message


def test_a_hog_whose_repr_fails_is_named_in_the_debug_log(
        make_wq: Any, held: Held, caplog: pytest.LogCaptureFixture, log_waiter: Any) -> None:
    """The CPU-intensive check logs the item it stops counting, on the
    timer thread: a repr() that raised there would leave the pool's other
    items waiting behind the hog (or, now that it is named once the lock
    is free, after them: waited for)."""
    _, hogged = _hogged(make_wq, held, caplog, log_waiter, lambda func, wq: _Conn(func))
    assert "its repr() raised OSError" in hogged[0], hogged


def test_flush_with_a_timeout_that_does_not_expire_returns_the_kernels_value(
        make_wq: Any, held: Held) -> None:
    wq = make_wq()
    work = running(wq, held)
    result: list[bool] = []
    flusher = threading.Thread(target=lambda: result.append(work.flush(timeout=TIMEOUT)))
    flusher.start()
    wait_until(lambda: work._flushers)  # it waits
    held.release.set()
    flusher.join(TIMEOUT)
    assert result == [True]
    assert work.flush(timeout=0) is False
    assert work.flush(timeout=math.inf) is False  # no limit


def test_a_timed_out_flush_takes_back_its_own_flush_only(make_wq: Any, held: Held) -> None:
    wq = make_wq()
    work = running(wq, held)
    result: list[bool] = []
    flusher = threading.Thread(target=lambda: result.append(work.flush(timeout=TIMEOUT)))
    flusher.start()
    wait_until(lambda: work._flushers)
    times_out(lambda: work.flush(timeout=SHORT))
    assert work._flushers is not None and len(work._flushers) == 1  # the other one's
    held.release.set()
    flusher.join(TIMEOUT)
    assert result == [True]
    assert work._flushers is None


def test_an_infinite_timeout_is_no_limit_in_any_thread(make_wq: Any, held: Held) -> None:
    """No lock takes a timeout beyond threading.TIMEOUT_MAX: a wait that
    has to sleep, in a thread whose sleep is not cut into slices (the
    main thread's is), must take it as none."""
    wq = make_wq()
    work = running(wq, held)
    result: list[bool] = []
    flusher = threading.Thread(target=lambda: result.append(work.flush(timeout=math.inf)))
    flusher.start()
    wait_until(lambda: work._flushers)
    held.release.set()
    flusher.join(TIMEOUT)
    assert result == [True]


def test_many_timed_out_flushes_leave_nothing_behind(make_wq: Any, held: Held) -> None:
    wq = make_wq()
    work = running(wq, held)
    for _ in range(5):
        times_out(lambda: work.flush(timeout=0.001), timeout=0.001)
        times_out(lambda: wq.flush(timeout=0.001), timeout=0.001)
    assert work._flushers is None and wq._flushers == []


def test_flush_of_delayed_work_that_times_out_leaves_it_queued(
        make_wq: Any, held: Held) -> None:
    wq = make_wq(ordered=True)
    running(wq, held)
    ran = threading.Event()
    dwork = DelayedWork(lambda w: ran.set())
    assert wq.queue_delayed_work(dwork, 3600)
    message = times_out(lambda: dwork.flush(timeout=SHORT))
    assert f"flush() of {dwork!r}" in message
    # flush_delayed_work queued it at once; the timeout ended only the wait.
    assert dwork.pending and dwork._timer is None and dwork._flushers is None
    held.release.set()
    assert ran.wait(TIMEOUT)
    dwork.flush(timeout=TIMEOUT)
    assert not dwork.pending and not dwork.running


# -- cancel_work_sync, disable_work_sync ---------------------------------------

def test_a_timed_out_cancel_sync_goes_on_until_the_run_ends(make_wq: Any, held: Held) -> None:
    """cancel_sync() marks the item cancelling while it waits (the kernel's
    WORK_OFFQ_CANCELING, its disable count since Linux 6.10): queueing it
    is refused.  When the wait times out, the cancel goes on without its
    caller: the item stays cancelling until the run it waited for ends --
    so that run cannot queue it again -- and is then idle and queueable,
    as a cancel_sync() that waited leaves it."""
    wq = make_wq()
    work = running(wq, held)
    assert wq.queue_work(work)  # pending behind its own run
    held.requeue = wq.queue_work
    message = times_out(lambda: work.cancel_sync(timeout=SHORT))
    assert f"cancel_sync() of {work!r} timed out after {SHORT:g} s" in message
    assert "has run on kworker/" in message and "cancelling" in message, message
    assert "its pending instance was cancelled" in message
    assert not work.pending and work.running
    assert work.disabled and "cancelling" in repr(work)
    assert wq.queue_work(work) is False  # refused, as while cancel_sync() waits
    with pytest.raises(RuntimeError, match="not disabled"):
        work.enable()  # the hold is not the caller's
    held.release.set()
    work.flush(timeout=TIMEOUT)
    assert held.requeued == [False]  # the run did not queue it again
    assert not work.disabled and not work.pending and not work.running
    assert work._flushers is None
    assert held.runs == 1
    held.requeue = None
    assert wq.queue_work(work) is True
    work.flush(timeout=TIMEOUT)
    assert held.runs == 2


def test_a_cancel_sync_after_a_timed_out_one_waits_for_the_same_run(
        make_wq: Any, held: Held) -> None:
    wq = make_wq()
    work = running(wq, held)
    message = times_out(lambda: work.cancel_sync(timeout=SHORT))
    assert "it was not pending" in message
    result: list[bool] = []
    canceller = threading.Thread(target=lambda: result.append(work.cancel_sync()))
    canceller.start()
    canceller.join(SHORT)
    assert canceller.is_alive()
    held.release.set()
    canceller.join(TIMEOUT)
    assert result == [False]  # it was not pending: the kernel's value
    assert not work.disabled and not work.running
    assert wq.queue_work(work) is True
    work.cancel_sync(timeout=TIMEOUT)
    assert not work.disabled and not work.pending and not work.running


def test_cancel_sync_with_a_timeout_that_does_not_expire(make_wq: Any, held: Held) -> None:
    wq = make_wq()
    work = running(wq, held)
    assert wq.queue_work(work)
    result: list[bool] = []
    canceller = threading.Thread(target=lambda: result.append(work.cancel_sync(timeout=TIMEOUT)))
    canceller.start()
    wait_until(lambda: work.disabled)  # it took the pending instance, and waits
    held.release.set()
    canceller.join(TIMEOUT)
    assert result == [True]
    assert not work.disabled and not work.pending and not work.running
    assert work.cancel_sync(timeout=0) is False


def test_a_timed_out_disable_sync_leaves_the_item_disabled_by_its_caller(
        make_wq: Any, held: Held) -> None:
    wq = make_wq()
    work = running(wq, held)
    message = times_out(lambda: work.disable_sync(timeout=SHORT))
    assert f"disable_sync() of {work!r}" in message
    assert work.disabled and work._flushers is None
    held.release.set()
    work.flush(timeout=TIMEOUT)
    assert work.disabled  # the caller's disable, which the timeout does not undo
    assert wq.queue_work(work) is False
    assert work.enable() is True
    assert wq.queue_work(work) is True
    work.flush(timeout=TIMEOUT)
    assert held.runs == 2


def test_a_timed_out_cancel_sync_of_delayed_work_takes_it_off_its_timer(
        make_wq: Any, held: Held) -> None:
    wq = make_wq()
    dwork = DelayedWork(held)
    assert wq.queue_delayed_work(dwork, 0)
    held.wait_started()
    assert wq.queue_delayed_work(dwork, 3600)
    message = times_out(lambda: dwork.cancel_sync(timeout=SHORT))
    assert "its pending instance was cancelled" in message
    assert not dwork.pending and dwork._timer is None and dwork.disabled
    assert wq.queue_delayed_work(dwork, 0) is False
    held.release.set()
    dwork.flush(timeout=TIMEOUT)
    assert not dwork.disabled and not dwork.running
    assert wq.mod_delayed_work(dwork, 3600) is False  # idle: queued
    assert dwork.cancel_sync(timeout=TIMEOUT) is True


# -- flush_workqueue, drain_workqueue, destroy_workqueue ------------------------

def test_flush_workqueue_times_out_and_a_later_flush_waits_as_the_kernels(
        make_wq: Any, held: Held) -> None:
    wq = make_wq(ordered=True)
    blocker = running(wq, held)
    message = times_out(lambda: wq.flush(timeout=SHORT))
    assert f"flush() of workqueue {wq.name!r} timed out after {SHORT:g} s" in message
    assert repr(blocker) in message and "in-flight: kworker/" in message, message
    assert wq._flushers == []  # taken back
    # Later flushes wait for what was queued before them, no more, no less.
    times_out(lambda: wq.flush(timeout=SHORT))
    held.release.set()
    wq.flush(timeout=TIMEOUT)
    assert not blocker.running
    assert wq.flush(timeout=0) is None  # idle: returns at once


def test_flush_workqueue_with_a_timeout_that_does_not_expire(make_wq: Any, held: Held) -> None:
    wq = make_wq()
    work = running(wq, held)
    assert_waits_until_released(lambda: wq.flush(timeout=TIMEOUT), held.release, "flush()")
    assert not work.running


def test_a_timed_out_drain_leaves_the_workqueue_running(make_wq: Any, held: Held) -> None:
    wq = make_wq()
    work = running(wq, held)
    message = times_out(lambda: wq.drain(timeout=SHORT))
    assert f"drain() of workqueue {wq.name!r} timed out after {SHORT:g} s" in message
    assert repr(work) in message
    assert wq._nr_drainers == 0 and wq._flushers == [] and "running" in repr(wq)
    other = Work(lambda w: None)
    assert wq.queue_work(other)  # anyone may queue again, as after a drain
    held.release.set()
    wq.drain(timeout=TIMEOUT)
    assert not work.running and not other.pending


def test_a_timed_out_drain_leaves_another_drain_holding_the_workqueue(
        make_wq: Any, held: Held) -> None:
    wq = make_wq()
    work = running(wq, held)
    drainer = threading.Thread(target=lambda: wq.drain(timeout=TIMEOUT))
    drainer.start()
    wait_until(lambda: wq._nr_drainers)
    times_out(lambda: wq.drain(timeout=SHORT))
    assert wq._nr_drainers == 1 and "draining" in repr(wq)
    with pytest.raises(RuntimeError, match="only its own work items may queue"):
        wq.queue_work(Work(lambda w: None))
    held.release.set()
    drainer.join(TIMEOUT)
    assert not drainer.is_alive() and not work.running
    assert wq._nr_drainers == 0 and "running" in repr(wq)


def test_destroy_from_its_own_item_is_refused_before_anything_changes(make_wq: Any) -> None:
    wq = make_wq()
    refused: list[str] = []

    def destroying(work: Work) -> None:
        with pytest.raises(RuntimeError) as info:
            wq.destroy(timeout=TIMEOUT)
        refused.append(str(info.value))

    work = Work(destroying)
    assert wq.queue_work(work)
    work.flush(timeout=TIMEOUT)
    assert refused == [f"destroy() of workqueue {wq.name!r} from one of its own work items "
                       "would deadlock"]
    assert "running" in repr(wq) and wq._destroy_thread is None
    assert wq.queue_work(work)  # as ever
    work.flush(timeout=TIMEOUT)


def test_a_destroy_after_shutdown_without_waiting_is_an_error(
        make_wq: Any, held: Held) -> None:
    """Only a destroy() that stopped waiting lets a second one wait for
    its end: shutdown(wait=False) is not one, as the kernel's second
    destroy_workqueue() is a bug."""
    wq = make_wq()
    running(wq, held)
    wq.shutdown(wait=False)
    with pytest.raises(RuntimeError, match="already destroyed"):
        wq.destroy(timeout=TIMEOUT)
    held.release.set()
    assert wq._destroyed.wait(TIMEOUT)


def test_a_timed_out_destroy_goes_on_and_a_second_destroy_waits_for_it(
        make_wq: Any, held: Held) -> None:
    wq = make_wq()
    work = running(wq, held)
    message = times_out(lambda: wq.destroy(timeout=SHORT))
    assert f"destroy() of workqueue {wq.name!r} timed out after {SHORT:g} s" in message
    assert "destroy() again waits" in message and repr(work) in message, message
    assert not wq._destroyed.is_set()
    # Still being destroyed: the end of the drain that timed out does not
    # make it running (nor draining) again.
    assert "being destroyed" in repr(wq)
    with pytest.raises(RuntimeError, match="is being destroyed: only its own work items may"):
        wq.queue_work(Work(lambda w: None))
    # Not "already destroyed": the second destroy() waits, within its own limit.
    message = times_out(lambda: wq.destroy(timeout=SHORT))
    assert "destroy() of workqueue" in message and "earlier destroy()" in message, message
    held.release.set()
    wq.destroy(timeout=TIMEOUT)
    assert wq._destroyed.is_set() and not work.running
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.queue_work(work)
    wq.destroy()  # and again: the destruction is over
    wq.shutdown()


def test_destroy_with_a_timeout_that_does_not_expire(make_wq: Any, held: Held) -> None:
    wq = make_wq()
    work = running(wq, held)
    assert_waits_until_released(lambda: wq.destroy(timeout=TIMEOUT), held.release, "destroy()")
    assert wq._destroyed.is_set() and not work.running
    with pytest.raises(RuntimeError, match="already destroyed"):
        wq.destroy(timeout=TIMEOUT)  # one that was not cut short: as the kernel's


def test_an_idle_workqueue_is_destroyed_with_a_zero_timeout(make_wq: Any) -> None:
    wq = make_wq()
    wq.flush(timeout=0)
    wq.drain(timeout=0)
    wq.destroy(timeout=0)
    assert wq._destroyed.is_set()


# -- freeze ------------------------------------------------------------------

def test_a_timed_out_freeze_leaves_the_workqueue_frozen_and_says_what_is_in_flight(
        make_wq: Any, held: Held) -> None:
    wq = make_wq("frz", WQ_FREEZABLE)
    work = running(wq, held)
    message = times_out(lambda: wq.freeze(timeout=SHORT))
    assert f"freeze() of workqueue 'frz' timed out after {SHORT:g} s" in message
    assert "stays frozen" in message, message
    assert repr(work) in message and "in-flight: kworker/" in message, message
    assert wq._frozen and "running frozen" in wq.dump()
    assert wq._freezing is None  # nobody waits for the freeze any more
    later = Work(lambda w: None)
    assert wq.queue_work(later)
    held.release.set()
    work.flush(timeout=TIMEOUT)
    assert later.pending  # held back: still frozen
    assert wq._freezing is None
    wq.freeze(timeout=0)  # nothing in flight now: frozen at once
    wq.thaw()
    later.flush(timeout=TIMEOUT)
    assert not later.pending and not wq._frozen


def test_a_freeze_after_a_timed_out_one_waits_for_the_same_items(
        make_wq: Any, held: Held) -> None:
    wq = make_wq("frz", WQ_FREEZABLE)
    work = running(wq, held)
    times_out(lambda: wq.freeze(timeout=SHORT))
    times_out(lambda: wq.freeze(timeout=SHORT))  # the item is still in flight
    assert wq._freezing is None
    freezer = threading.Thread(target=lambda: wq.freeze(timeout=TIMEOUT))
    freezer.start()
    wait_until(lambda: wq._freezing)  # it waits
    held.release.set()
    freezer.join(TIMEOUT)
    assert not freezer.is_alive() and not work.running
    assert wq._frozen and wq._freezing is None
    wq.thaw()


def test_thaw_after_a_timed_out_freeze_lets_the_held_items_run(
        make_wq: Any, held: Held) -> None:
    wq = make_wq("frz", WQ_FREEZABLE)
    work = running(wq, held)
    times_out(lambda: wq.freeze(timeout=SHORT))
    later = Work(lambda w: None)
    assert wq.queue_work(later)
    wq.thaw()  # with the item still in flight
    assert not wq._frozen and wq._freezing is None
    held.release.set()
    later.flush(timeout=TIMEOUT)
    work.flush(timeout=TIMEOUT)
    assert not later.pending
    assert wq.queue_work(work)  # as ever
    work.flush(timeout=TIMEOUT)
    assert held.runs == 2


def test_freeze_with_a_timeout_that_does_not_expire(make_wq: Any, held: Held) -> None:
    wq = make_wq("frz", WQ_FREEZABLE)
    work = running(wq, held)
    assert_waits_until_released(lambda: wq.freeze(timeout=TIMEOUT), held.release, "freeze()")
    assert not work.running
    assert wq._frozen and wq._freezing is None
    wq.thaw()
    wq.freeze(timeout=0)  # idle: frozen at once
    wq.thaw()


# -- a timeout as the wait ends -------------------------------------------------

@pytest.mark.parametrize("call", [
    "Work.flush", "Work.cancel_sync", "Work.disable_sync", "Workqueue.flush",
    "Workqueue.drain", "Workqueue.freeze"])
def test_a_wait_that_times_out_as_it_completes_is_no_timeout(
        make_wq: Any, held: Held, monkeypatch: pytest.MonkeyPatch, call: str) -> None:
    """The wait's time passes just as the run it waits for ends: the call
    finds its wait completed as it takes it back, and returns what it
    would have returned had it woken a moment sooner."""
    wq = make_wq("late", WQ_FREEZABLE)
    work = running(wq, held)
    assert wq.queue_work(work)  # and pending behind its run
    real_wait = Completion.wait

    def completed_as_it_times_out(self: Completion, timeout: float | None = None) -> bool:
        monkeypatch.setattr(Completion, "wait", real_wait)  # once
        held.release.set()
        assert real_wait(self, TIMEOUT)
        self._lock.release()  # completed, as it was before this wait took it
        return False

    calls: dict[str, tuple[Callable[..., object], object]] = {
        "Work.flush": (work.flush, True), "Work.cancel_sync": (work.cancel_sync, True),
        "Work.disable_sync": (work.disable_sync, True), "Workqueue.flush": (wq.flush, None),
        "Workqueue.drain": (wq.drain, None), "Workqueue.freeze": (wq.freeze, None),
    }
    method, expected = calls[call]
    monkeypatch.setattr(Completion, "wait", completed_as_it_times_out)
    assert method(timeout=SHORT) == expected
    monkeypatch.undo()
    assert work._flushers is None and wq._flushers == [] and wq._freezing is None
    assert wq._nr_drainers == 0
    wq.thaw()
    if call == "Work.disable_sync":
        assert work.enable()
    work.cancel_sync(timeout=TIMEOUT)
    assert not work.disabled


# -- the argument -------------------------------------------------------------

def waiting_calls(wq: Workqueue, work: Work,
                  dwork: DelayedWork) -> dict[str, Callable[..., object]]:
    return {
        "Work.flush": work.flush, "Work.cancel_sync": work.cancel_sync,
        "Work.disable_sync": work.disable_sync,
        "DelayedWork.flush": dwork.flush, "DelayedWork.cancel_sync": dwork.cancel_sync,
        "Workqueue.flush": wq.flush, "Workqueue.drain": wq.drain,
        "Workqueue.destroy": wq.destroy, "Workqueue.freeze": wq.freeze,
    }


@pytest.mark.parametrize("bad, error, text", [
    ("1", TypeError, "timeout must be a number of seconds or None, not str"),
    (True, TypeError, "timeout must be a number of seconds or None, not bool"),
    (-1, ValueError, "timeout must be 0 or more seconds, or None; got -1"),
    (-0.5, ValueError, "got -0.5"),
    (math.nan, ValueError, "got nan"),
])
def test_a_bad_timeout_is_refused_before_anything_changes(
        make_wq: Any, held: Held, bad: object, error: type[Exception], text: str) -> None:
    # Everything stays pending behind the held item.
    wq = make_wq(flags=WQ_FREEZABLE, ordered=True)
    running(wq, held)
    work = Work(lambda w: None)
    dwork = DelayedWork(lambda w: None)
    for name, call in waiting_calls(wq, work, dwork).items():
        assert wq.queue_work(work) or work.pending
        assert wq.queue_delayed_work(dwork, 3600) or dwork.pending
        with pytest.raises(error, match=text):
            call(timeout=bad)
        # Nothing was cancelled, queued early, disabled or destroyed.
        assert work.pending and not work.disabled, name
        assert dwork.pending and dwork._timer is not None and not dwork.disabled, name
        assert work._flushers is None and wq._flushers == [], name
        assert "running" in repr(wq) and not wq._frozen, name
    dwork.cancel()


def test_the_timeout_is_keyword_only(make_wq: Any) -> None:
    wq = make_wq(flags=WQ_FREEZABLE)
    work = Work(lambda w: None)
    for call in waiting_calls(wq, work, DelayedWork(lambda w: None)).values():
        with pytest.raises(TypeError):
            call(1.0)


def test_wait_slice_never_gives_a_negative_or_nan_sleep() -> None:
    """wait_slice(), public for programs' own waits, is given the time
    left to a deadline, which is below 0 once the deadline passed: that is
    no sleep at all, not a negative one (lock.acquire(timeout=-1) waits
    for ever, queue.get() refuses one), in the main thread or any other.
    NaN and what is no number are refused, saying so, as the timeouts of
    the library's own waits are."""
    results: dict[str, Any] = {}

    def slices() -> dict[str, Any]:
        got: dict[str, Any] = {"passed": wait_slice(-1), "long passed": wait_slice(-7.5),
                               "zero": wait_slice(0), "short": wait_slice(0.01)}
        for bad in (math.nan, "1", True):
            try:
                wait_slice(bad)  # type: ignore[arg-type]
            except (TypeError, ValueError) as exc:
                got[repr(bad)] = (type(exc), str(exc))
        return got

    thread = threading.Thread(target=lambda: results.update(slices()))
    thread.start()
    thread.join(TIMEOUT)
    for got in (slices(), results):
        assert (got["passed"], got["long passed"], got["zero"], got["short"]) == (0, 0, 0, 0.01)
        # Its own words (naming it), not a comparison's failing on a str.
        for key, kind, named in (("nan", ValueError, "nan"), ("'1'", TypeError, "str"),
                                 ("True", TypeError, "bool")):
            assert got[key][0] is kind and named in got[key][1], got[key]
            assert got[key][1].startswith("wait_slice() takes seconds or None"), got[key]
    assert wait_slice(None) == WAIT_SLICE and wait_slice(60) == WAIT_SLICE  # the main thread's


def test_wait_slice_of_a_deadline_at_infinity_is_a_sleep_a_lock_takes() -> None:
    """The docstring's own loop with a timeout of math.inf (which the
    library's waits take as no limit) asks wait_slice() for infinity: a
    thread other than the main one was given it whole, a sleep no lock,
    Event or Condition takes (OverflowError).  It gets
    threading.TIMEOUT_MAX at most, what they all take."""
    results: dict[str, Any] = {}

    def sleeps() -> None:
        for left in (math.inf, 1e300, threading.TIMEOUT_MAX * 2):
            nap = wait_slice(left)
            try:
                # Unlocked: acquired at once, once the timeout is taken.
                results[repr(left)] = (nap, threading.Lock().acquire(timeout=nap))
            except OverflowError as exc:
                results[repr(left)] = (nap, exc)

    thread = threading.Thread(target=sleeps)
    thread.start()
    thread.join(TIMEOUT)
    assert results == {repr(left): (threading.TIMEOUT_MAX, True)
                       for left in (math.inf, 1e300, threading.TIMEOUT_MAX * 2)}
    assert wait_slice(math.inf) == WAIT_SLICE  # the main thread's
