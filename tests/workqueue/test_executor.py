"""The Executor face (Part 3: 14), trace hooks and stats (13), bad input (15)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import dataclasses
import gc
import logging
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED
from typing import Any

import pytest
from racewindow import Attempt, PauseAt
from stolensignal import OUTLASTS_THE_TEST
from wqhelpers import REPR_CALL_BOUND, CallsInEqHook, CallsInReprHook, bounded, named_unlocked

from workqueue import (
    TRACE_EVENTS,
    WQ_MAX_ACTIVE,
    WQ_UNBOUND,
    DelayedWork,
    LoadIndex,
    Topology,
    Work,
    WorkqueueStats,
    WQFlags,
    _pool,
    alloc_ordered_workqueue,
    alloc_workqueue,
)
from workqueue._future import LeanFuture, _sleeping, cancel_pending_futures

TIMEOUT = 10.0


def test_submit_results_and_exceptions_travel_in_futures(make_wq: Any) -> None:
    wq = make_wq()
    assert wq.submit(pow, 2, 10).result(TIMEOUT) == 1024
    assert wq.submit(dict, a=1).result(TIMEOUT) == {"a": 1}
    f = wq.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        f.result(TIMEOUT)
    assert isinstance(f.exception(TIMEOUT), ZeroDivisionError)
    assert wq.stats().failed == 0  # an exception in a future is not a failed item


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("executor", ["workqueue", "serial"])
def test_a_call_raising_a_base_exception_passes_it_to_its_future(
        make_wq: Any, exc: type[BaseException], executor: str) -> None:
    """As a ThreadPoolExecutor's work item does: whatever the call raises,
    SystemExit and KeyboardInterrupt too, is its future's outcome -- not
    the work item's failure, with the future left running for ever."""
    wq = make_wq()
    ex = wq if executor == "workqueue" else wq.serial("key")
    raised = exc("out of a call")
    f = ex.submit(_raise, raised)
    assert f.exception(TIMEOUT) is raised
    with pytest.raises(exc):
        f.result(0)
    wq.flush(timeout=TIMEOUT)
    assert wq.stats().failed == 0


@pytest.mark.parametrize("executor", ["workqueue", "serial"])
@pytest.mark.parametrize("fails", [False, True])
def test_a_done_future_is_freed_without_the_cyclic_collector(
    make_wq: Any, executor: str, fails: bool
) -> None:
    # A failed call's traceback keeps the frames that ran it: none of them
    # may lead back to the future, which holds the traceback.
    wq = make_wq()
    ex = wq if executor == "workqueue" else wq.serial("k")
    arg = Work(lambda w: None)  # any object we can hold a weak reference to
    gc.disable()
    try:
        f = ex.submit(lambda a: 1 / 0 if fails else a, arg)
        cf.wait([f], TIMEOUT)
        assert (f.exception() is not None) is fails
        # Done is not over: the worker still runs the item that settled the
        # future, and may hold it a while yet.
        wq.flush(timeout=TIMEOUT)
        future_ref, arg_ref = weakref.ref(f), weakref.ref(arg)
        del f, arg
        assert future_ref() is None and arg_ref() is None
    finally:
        gc.enable()


def test_map_as_completed_and_wait(make_wq: Any) -> None:
    wq = make_wq(flags=WQ_UNBOUND)
    assert list(wq.map(abs, range(-5, 0), timeout=TIMEOUT)) == [5, 4, 3, 2, 1]
    fs = [wq.submit(lambda i=i: i * i) for i in range(20)]
    assert sorted(f.result() for f in cf.as_completed(fs, timeout=TIMEOUT)) == [
        i * i for i in range(20)]
    gate = threading.Event()
    slow = wq.submit(gate.wait, TIMEOUT)
    fast = wq.submit(int)
    done, not_done = cf.wait([slow, fast], timeout=TIMEOUT, return_when=cf.FIRST_COMPLETED)
    assert fast in done
    gate.set()
    done, not_done = cf.wait([slow, fast], timeout=TIMEOUT)
    assert not not_done and slow.result() is True


def test_wait_and_callbacks_see_completion_racing_with_them(make_wq: Any) -> None:
    wq = make_wq(flags=WQ_UNBOUND)
    for _ in range(200):
        seen = threading.Event()
        f = wq.submit(int, "7")
        f.add_done_callback(lambda fut, seen=seen: seen.set())
        assert cf.wait([f], timeout=TIMEOUT).done == {f}
        assert seen.wait(TIMEOUT)
        assert f.result() == 7


def test_future_cancel_while_pending_and_not_once_running(make_wq: Any) -> None:
    wq = make_wq(ordered=True)
    release = threading.Event()
    started = threading.Event()
    first = wq.submit(lambda: (started.set(), release.wait(TIMEOUT)))
    assert started.wait(TIMEOUT)
    second = wq.submit(print, "never")
    callbacks: list[bool] = []
    second.add_done_callback(lambda f: callbacks.append(f.cancelled()))
    assert first.running() and not first.cancel()
    assert second.cancel() is True
    assert second.cancel() is True and second.cancelled() and second.done()
    assert callbacks == [True]
    with pytest.raises(cf.CancelledError):
        second.result(TIMEOUT)
    release.set()
    assert first.result(TIMEOUT) == (None, True)
    assert cf.wait([first, second], timeout=TIMEOUT).not_done == set()


def test_a_call_cancelled_unwatched_lets_go_of_its_arguments(make_wq: Any) -> None:
    """A done future lets go of its call: one cancelled while pending, that
    nobody watched (no condition of its own, no done-callback), too, or
    its arguments lived as long as the future."""
    wq = make_wq(ordered=True)
    release, started = threading.Event(), threading.Event()
    first = wq.submit(lambda: (started.set(), release.wait(TIMEOUT)))
    assert started.wait(TIMEOUT)
    arg = Work(lambda w: None)  # any object we can hold a weak reference to
    arg_ref = weakref.ref(arg)
    gc.disable()
    try:
        second = wq.submit(id, arg)
        del arg
        assert second.cancel() is True
        assert arg_ref() is None
    finally:
        gc.enable()
        release.set()
    assert first.result(TIMEOUT) == (None, True)


def _queued_behind_a_running_call(wq: Any) -> tuple[cf.Future[Any], threading.Event]:
    """A call of ordered *wq* waiting behind a running one, and the event
    that lets the running one end."""
    release, started = threading.Event(), threading.Event()
    wq.submit(lambda: (started.set(), release.wait(TIMEOUT)))
    assert started.wait(TIMEOUT)
    return wq.submit(int), release


def test_cancel_wakes_every_thread_asleep_in_result(make_wq: Any) -> None:
    """Each thread asleep in result() of a call cancelled is woken at once
    with CancelledError, not when its own timeout ends (one sleeper
    released twice and the others never would be)."""
    wq = make_wq(ordered=True)
    future, release = _queued_behind_a_running_call(wq)
    try:
        def outcome() -> str:
            try:
                future.result(TIMEOUT)
            except cf.CancelledError:
                return "cancelled"
            except TimeoutError:
                return "timed out"
            return "ran"

        with cf.ThreadPoolExecutor(3) as sleepers:
            outcomes = [sleepers.submit(outcome) for _ in range(3)]
            assert _within(TIMEOUT, lambda: len(future._blocked or ()) == 3)
            assert future.cancel() is True
        assert [o.result() for o in outcomes] == ["cancelled"] * 3
    finally:
        release.set()


@pytest.mark.parametrize("watched", [False, True])
@pytest.mark.parametrize("finish", ["call", "set_result", "set_exception", "cancel"])
def test_the_end_of_a_future_wakes_every_thread_asleep_in_result_at_once(
        make_wq: Any, finish: str, watched: bool) -> None:
    """Each thread asleep in result() or exception() wakes as the future is
    done, not when its own (longer) timeout ends and it finds the future
    done all the same -- whether the future has a condition of its own (a
    watcher) or not, and whoever finishes it."""
    if finish == "call":
        release = threading.Event()
        future = make_wq().submit(release.wait, TIMEOUT)
        end: Callable[[], object] = release.set
    elif finish == "cancel":
        future, release = _queued_behind_a_running_call(make_wq(ordered=True))
        end = future.cancel
    else:
        future = LeanFuture()
        future.set_running_or_notify_cancel()
        end = _finisher(future, finish.removeprefix("set_"), None)
    if watched:
        future.add_done_callback(lambda _f: None)

    def sleep_in(call: str) -> None:
        with contextlib.suppress(ValueError, cf.CancelledError):  # set_exception()'s, cancel()'s
            getattr(future, call)(OUTLASTS_THE_TEST)

    sleepers = [threading.Thread(target=sleep_in, args=(call,), daemon=True)
                for call in ("result", "exception", "result")]
    for sleeper in sleepers:
        sleeper.start()
    assert _within(TIMEOUT, lambda: len(future._blocked or ()) == 3)
    end()
    for sleeper in sleepers:
        sleeper.join(TIMEOUT)
    assert not any(sleeper.is_alive() for sleeper in sleepers)
    assert not future._blocked
    if finish in ("call", "cancel"):
        release.set()


def test_a_future_done_as_result_goes_to_sleep_wakes_it() -> None:
    """The future becomes done between result()'s first look at it and
    the hold of the lock where it would put its sleeper on the list:
    result() looks again there, instead of sleeping with nobody left to
    wake it."""
    f = LeanFuture()
    f.set_running_or_notify_cancel()
    pause = PauseAt(LeanFuture._wait, "where the state becomes done")
    sleeper = Attempt(lambda: pause.run(lambda: f.result(OUTLASTS_THE_TEST)))
    try:
        assert pause.reached.wait(TIMEOUT)
        f.set_result(1)
    finally:
        pause.resume()
    assert sleeper.result(msg="result() sleeps on a future done") == 1


@pytest.mark.parametrize("finish", ["cancel", "set_result"])
def test_a_failing_done_callback_is_logged_and_the_others_still_run_in_order(
        make_wq: Any, caplog: pytest.LogCaptureFixture, finish: str) -> None:
    """As concurrent.futures does: the done-callbacks run in the order they
    were added, and one that raises is logged (on its logger), not raised
    into whoever made the future done, and the rest still run."""
    wq = make_wq(ordered=True)
    release = threading.Event()
    if finish == "cancel":
        future, release = _queued_behind_a_running_call(wq)
    else:
        future = LeanFuture()
        future.set_running_or_notify_cancel()
    calls: list[str] = []
    bug = ValueError("a bug in a done-callback")

    def failing(_f: cf.Future[Any]) -> None:
        calls.append("failing")
        raise bug

    future.add_done_callback(lambda _f: calls.append("first"))
    future.add_done_callback(failing)
    future.add_done_callback(lambda _f: calls.append("last"))
    try:
        with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
            if finish == "cancel":
                assert future.cancel() is True
            else:
                future.set_result(1)
        assert calls == ["first", "failing", "last"]
        assert [rec.exc_info[1] if rec.exc_info else None for rec in caplog.records
                if rec.name == "concurrent.futures"] == [bug]
    finally:
        release.set()


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("executor", ["workqueue", "serial"])
def test_a_done_callback_raising_a_base_exception_on_a_worker_leaves_no_callback_uncalled(
        make_wq: Any, caplog: pytest.LogCaptureFixture, exc: type[BaseException],
        executor: str) -> None:
    """A done-callback that raises what concurrent.futures does not log
    (SystemExit, KeyboardInterrupt) as the call ends on a worker: the
    callbacks added after it still run, in order -- nobody else would ever
    call them, and an asyncio task awaiting the future through one would
    wait for ever -- and the exception is logged as the item's, the
    workers going on (ThreadPoolExecutor loses its worker there)."""
    wq = make_wq()
    ex = wq if executor == "workqueue" else wq.serial("key")
    release = threading.Event()
    future = ex.submit(release.wait, TIMEOUT)
    calls: list[str] = []
    done = threading.Event()

    def escaping(_f: cf.Future[Any]) -> None:
        calls.append("escaping")
        raise exc("out of a done-callback")

    future.add_done_callback(lambda _f: calls.append("first"))
    future.add_done_callback(escaping)
    future.add_done_callback(escaping)
    future.add_done_callback(lambda _f: (calls.append("last"), done.set()))
    with caplog.at_level(logging.ERROR):
        release.set()
        assert done.wait(TIMEOUT), calls
        assert future.result(TIMEOUT) is True
        assert calls == ["first", "escaping", "escaping", "last"]
        assert ex.submit(pow, 2, 5).result(TIMEOUT) == 32  # the workers go on
        wq.flush(timeout=TIMEOUT)
    # The first as the item's failure; the second on concurrent.futures'
    # logger, as a failing callback is.
    failures = [r for r in caplog.records
                if r.name in ("workqueue._pool", "concurrent.futures")]
    assert sorted(r.name for r in failures) == ["concurrent.futures", "workqueue._pool"]
    assert all(r.exc_info and isinstance(r.exc_info[1], exc) for r in failures)
    # The item's report says what it was, not "None" for a call let go of.
    item = next(r.getMessage() for r in failures if r.name == "workqueue._pool")
    assert "None" not in item, item
    if executor == "workqueue":
        assert "call has ended" in item, item


def test_a_refused_cancel_of_a_watched_running_call_calls_no_callback(make_wq: Any) -> None:
    """cancel() of a call already running is refused, and tells nobody: its
    done-callbacks run once, when the call ends (also with the future's
    condition made, by a watcher, which takes cancel() another way)."""
    wq = make_wq()
    started, release = threading.Event(), threading.Event()
    future = wq.submit(lambda: (started.set(), release.wait(TIMEOUT)))
    try:
        assert started.wait(TIMEOUT)
        calls: list[cf.Future[Any]] = []
        future.add_done_callback(calls.append)
        assert cf.wait([future], timeout=0).not_done == {future}  # a watcher came and went
        assert future.cancel() is False
        assert calls == []
    finally:
        release.set()
    assert future.result(TIMEOUT) == (None, True)
    assert _within(TIMEOUT, lambda: calls == [future])


def test_cancel_pending_futures_calls_the_callbacks_of_every_call(make_wq: Any) -> None:
    wq = make_wq(ordered=True)
    first, release = _queued_behind_a_running_call(wq)
    try:
        futures = [first, wq.submit(int), wq.submit(int)]
        calls: list[cf.Future[Any]] = []
        for future in futures:
            future.add_done_callback(calls.append)
        assert cancel_pending_futures(wq) == 3
        assert calls == futures
    finally:
        release.set()


def test_cancel_pending_futures_leaves_another_workqueues_calls_in_the_pool(
        make_wq: Any) -> None:
    """Workqueues share a CPU's pool and its worklist: cancelling the
    pending calls of one leaves those of another waiting there alone."""
    topo = Topology(1, cpu_intensive_thresh=60.0)  # the calls wait behind the running item
    mine, other = make_wq("mine", topology=topo), make_wq("other", topology=topo)
    started, gate = threading.Event(), threading.Event()
    mine.submit(lambda: (started.set(), gate.wait(TIMEOUT)))
    try:
        assert started.wait(TIMEOUT)
        theirs = other.submit(int, 7)
        queued = mine.submit(int, 8)
        assert cancel_pending_futures(mine) == 1
        assert queued.cancelled() and not theirs.cancelled()
    finally:
        gate.set()
    assert theirs.result(TIMEOUT) == 7


def test_a_call_whose_item_has_started_cannot_be_cancelled(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A submitted call can be cancelled exactly while its work item is
    pending.  Its worker has taken the item (the pending bit is clear) and
    has not yet marked the future running: cancel() must fail, and the
    call runs."""
    from workqueue import _future

    entered, go = threading.Event(), threading.Event()
    run_call = _future._run_call

    def paused_run_call(work: Any) -> None:  # between the item's start and the call's
        entered.set()
        assert go.wait(TIMEOUT)
        run_call(work)

    monkeypatch.setattr(_future, "_run_call", paused_run_call)
    wq = make_wq()
    future = wq.submit(lambda: "ran")
    try:
        assert entered.wait(TIMEOUT)
        assert not future.running() and not future.done()
        assert future.cancel() is False
        assert not future.cancelled()
    finally:
        go.set()
    assert future.result(TIMEOUT) == "ran"


def test_result_and_exception_time_out_and_the_future_stays_usable(make_wq: Any) -> None:
    wq = make_wq(ordered=True)
    release = threading.Event()
    started = threading.Event()
    slow = wq.submit(lambda: (started.set(), release.wait(TIMEOUT), "done")[2])
    failing = wq.submit(lambda: 1 / 0)
    assert started.wait(TIMEOUT)
    try:
        with pytest.raises(cf.TimeoutError):
            slow.result(timeout=0.01)
        with pytest.raises(cf.TimeoutError):
            failing.exception(timeout=0)
        # As a standard Future's (Condition.wait): NaN waits not at all.
        with pytest.raises(cf.TimeoutError):
            slow.result(timeout=math.nan)
        with pytest.raises(cf.TimeoutError):
            failing.exception(timeout=math.nan)
        assert not slow.done() and not failing.done()
    finally:
        release.set()
    assert slow.result(TIMEOUT) == "done"
    assert isinstance(failing.exception(TIMEOUT), ZeroDivisionError)


def test_a_failing_trace_hook_is_logged_and_the_items_still_run(
        make_wq: Any, tracer: Any, caplog: pytest.LogCaptureFixture) -> None:
    wq = make_wq()

    def broken(event: str, work: Any, cpu: int | None) -> None:
        raise RuntimeError(f"hook broke at {event}")

    wq.add_trace_hook(broken)
    wq.add_trace_hook(tracer)  # hooks after the broken one still run
    w = Work(lambda work: None)
    wq.queue_work(w)
    w.flush()
    assert tracer.of(w) == ["queue", "activate", "execute_start", "execute_end"]
    failures = [r for r in caplog.records if r.getMessage().startswith("trace hook ")]
    assert [str(r.exc_info[1]) for r in failures if r.exc_info] == [
        f"hook broke at {event}" for event in ("queue", "activate", "execute_start", "execute_end")
    ]


def test_a_trace_hook_is_named_with_the_engine_lock_free(
        make_wq: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A hook runs inside a step of the engine, under its lock, but its
    repr() is the program's code and may call into the workqueue: a
    failing hook is logged, and one that remove_trace_hook() does not
    know is refused, naming it as its repr() did with the lock free (under
    the lock, that deadlocks every workqueue of the process)."""
    wq = make_wq()

    def broken(event: str, work: Any, cpu: int | None) -> None:
        if event == "queue":
            raise RuntimeError("hook broke")

    hook = CallsInReprHook(broken, wq)
    wq.add_trace_hook(hook)
    w = Work(lambda work: None)
    assert wq.queue_work(w)
    w.flush()
    failures = [r for r in caplog.records if r.getMessage().startswith("trace hook ")]
    assert [r.getMessage() for r in failures] == ["trace hook <CallsInReprHook> failed"]
    stranger = CallsInReprHook(broken, wq)
    with pytest.raises(ValueError, match=r"^<CallsInReprHook> is not a trace hook of 'test'$"):
        wq.remove_trace_hook(stranger)
    assert named_unlocked(hook, stranger)
    wq.remove_trace_hook(hook)  # the one added, found by itself, not by its name


def test_a_bound_method_is_a_trace_hook_whatever_its_repr(
        make_wq: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A hook is found for removal as list.remove() finds it, by ==: a
    bound method, made anew at each attribute access, is removed by the
    expression that added it.  Its repr() (its object's) may fail: the
    hook is added all the same, and named without it when it fails."""
    wq = make_wq()

    class Conn:
        def __init__(self) -> None:
            self.events: list[str] = []

        def on_trace(self, event: str, work: Any, cpu: int | None) -> None:
            self.events.append(event)
            if event == "queue":
                raise RuntimeError("hook broke")

        def __repr__(self) -> str:
            raise OSError("the socket is closed")

    conn = Conn()
    wq.add_trace_hook(conn.on_trace)
    w = Work(lambda work: None)
    assert wq.queue_work(w)
    w.flush()
    assert conn.events == list(TRACE_EVENTS)
    (failure,) = [r for r in caplog.records if r.getMessage().startswith("trace hook ")]
    assert failure.getMessage().endswith(" (its repr() raised OSError) failed"), failure
    wq.remove_trace_hook(conn.on_trace)
    assert wq.queue_work(w)
    w.flush()
    assert conn.events == list(TRACE_EVENTS)  # not called since


def _queue_hook(order: list[str], name: str) -> Callable[[str, Any, int | None], None]:
    """A trace hook that appends ``name`` to ``order`` at each item queued."""
    return lambda event, work, cpu: order.append(name) if event == "queue" else None


def _run_one_item(wq: Any) -> None:
    """Queue an item that does nothing and wait for it to run: every
    trace hook has had its events."""
    w = Work(lambda work: None)
    assert wq.queue_work(w)
    w.flush()


def test_a_hook_added_twice_is_removed_as_list_remove_would(make_wq: Any) -> None:
    """Hooks run in the order added, and removing one added twice takes
    the first of the two, as list.remove() does: the rest keep their
    order."""
    wq = make_wq()
    order: list[str] = []

    a, b = _queue_hook(order, "a"), _queue_hook(order, "b")
    for added in (a, b, a):
        wq.add_trace_hook(added)
    wq.remove_trace_hook(a)
    _run_one_item(wq)
    assert order == ["b", "a"]


def test_a_trace_hook_is_compared_with_the_engine_lock_free(make_wq: Any) -> None:
    """remove_trace_hook() finds a hook by ==, as list.remove() does, and
    a hook's == is the program's code, as its repr() is, which may call
    into the workqueue: compared under the engine lock, that deadlocks
    every workqueue of the process."""
    wq = make_wq()
    events: list[str] = []
    first = CallsInEqHook(lambda event, work, cpu: None, wq)
    second = CallsInEqHook(lambda event, work, cpu: events.append(event), wq)
    wq.add_trace_hook(first)
    wq.add_trace_hook(second)
    wq.remove_trace_hook(second)  # compared with the first on the way
    with pytest.raises(ValueError, match=r" is not a trace hook of 'test'$"):
        wq.remove_trace_hook(second)
    assert first.eqs and all(first.eqs), first.eqs
    _run_one_item(wq)
    assert events == []
    wq.remove_trace_hook(first)


def test_trace_hooks_changed_as_one_is_removed_are_kept_as_changed(make_wq: Any) -> None:
    """The hooks are compared with the engine lock free: those added and
    removed meanwhile (here by a hook's own ==, one before the hook being
    removed) stay so, and the one removed is the one asked for, found
    again among the hooks as they are now."""
    wq = make_wq()
    order: list[str] = []
    meddled = threading.Event()

    early, late, gone = (_queue_hook(order, name) for name in ("early", "late", "gone"))

    class Meddler:
        def __call__(self, event: str, work: Any, cpu: int | None) -> None:
            if event == "queue":
                order.append("meddler")

        def __eq__(self, other: object) -> bool:
            if not meddled.is_set():
                meddled.set()
                bounded(lambda: (wq.remove_trace_hook(early), wq.add_trace_hook(late)),
                        "hooks changed from a hook's ==", REPR_CALL_BOUND)
            return self is other

        __hash__ = object.__hash__

    for added in (early, Meddler(), gone):
        wq.add_trace_hook(added)
    wq.remove_trace_hook(gone)
    assert meddled.is_set()
    _run_one_item(wq)
    assert order == ["meddler", "late"]


def test_trace_hooks_changed_at_every_compare_do_not_make_a_removal_compare_again(
        make_wq: Any) -> None:
    """Hooks that other threads keep adding while one is being removed
    (here one at each == of a hook before it) do not make the removal
    compare the hooks again: the one found is found again, by identity,
    among the hooks as they are now; once compared, it is removed."""
    wq = make_wq()
    order: list[str] = []
    adds = 3  # each compare adds one, these many times at most

    class Meddler:
        def __init__(self) -> None:
            self.eqs = 0

        def __call__(self, event: str, work: Any, cpu: int | None) -> None:
            if event == "queue":
                order.append("meddler")

        def __eq__(self, other: object) -> bool:
            self.eqs += 1
            if self.eqs <= adds:
                bounded(lambda: wq.add_trace_hook(_queue_hook(order, f"late{self.eqs}")),
                        "a hook added from a hook's ==", REPR_CALL_BOUND)
            return self is other

        __hash__ = object.__hash__

    meddler, gone = Meddler(), _queue_hook(order, "gone")
    wq.add_trace_hook(meddler)
    wq.add_trace_hook(gone)
    wq.remove_trace_hook(gone)
    assert meddler.eqs == 1, f"the hooks were compared {meddler.eqs} times"
    _run_one_item(wq)
    assert order == ["meddler", "late1"]


def test_a_trace_hook_removed_as_it_is_found_is_looked_for_again(make_wq: Any) -> None:
    """The hook found equal may be removed by another thread before the
    removal takes it: the hooks are then looked at again, as they are
    now, and the next one equal is removed, as list.remove() would, not
    the next one added by the same hook; with none left, ValueError."""
    wq = make_wq()
    order: list[str] = []
    meddled = threading.Event()

    class Twin:
        """Equal to the key and to every Twin."""

        def __init__(self, name: str) -> None:
            self.name = name

        def __call__(self, event: str, work: Any, cpu: int | None) -> None:
            if event == "queue":
                order.append(self.name)

        def __eq__(self, other: object) -> bool:
            if self.name == "first" and not meddled.is_set():
                meddled.set()  # the first one found goes, by another thread
                bounded(lambda: wq.remove_trace_hook(self), "a hook removed from its own ==",
                        REPR_CALL_BOUND)
            return isinstance(other, Twin)

        __hash__ = object.__hash__

    first, second, key = Twin("first"), Twin("second"), Twin("key")
    for added in (first, second, first):
        wq.add_trace_hook(added)
    wq.remove_trace_hook(key)
    assert meddled.is_set()
    _run_one_item(wq)
    assert order == ["first"]  # the first one gone by the meddling, second by the removal
    wq.remove_trace_hook(key)
    with pytest.raises(ValueError, match=r" is not a trace hook of 'test'$"):
        wq.remove_trace_hook(key)


def test_a_trace_hook_is_found_by_itself_whatever_its_eq(make_wq: Any) -> None:
    """As list.remove() does, a hook is found by identity before ==: one
    whose == says it equals nothing is removed all the same.  A hook not
    added is refused, named without its repr() if that fails."""
    wq = make_wq()
    calls: list[str] = []

    class Unequal:
        def __call__(self, event: str, work: Any, cpu: int | None) -> None:
            calls.append(event)

        def __eq__(self, other: object) -> bool:
            return False

        __hash__ = object.__hash__

        def __repr__(self) -> str:
            raise OSError("the socket is closed")

    hook = Unequal()
    wq.add_trace_hook(hook)
    wq.remove_trace_hook(hook)
    _run_one_item(wq)
    assert calls == []
    with pytest.raises(ValueError, match=r"^<.*Unequal object at 0x[0-9a-f]+> \(its repr\(\) "
                                         r"raised OSError\) is not a trace hook of 'test'$"):
        wq.remove_trace_hook(hook)


class HookEscape(BaseException):
    """Raised by a hostile trace hook: no Exception, as KeyboardInterrupt."""


def _pools_whole(wq: Any) -> None:
    """Every worker of *wq*'s pools is alive, and each pool's nr_running
    counts those whose flags are all clear (engine lock free)."""
    with _pool.lock:
        for pool in {pwq.pool for pwq in wq._all_pwqs()}:
            for worker in pool.workers:
                assert worker.thread is not None and worker.thread.is_alive(), pool.dump()
            assert pool.nr_running == sum(not w.flags for w in pool.workers), pool.dump()
            assert set(pool.idle) <= pool.workers, pool.dump()


@pytest.mark.parametrize("exc", [HookEscape, SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("event", ["activate", "execute_start", "execute_end", "delayed queue"])
def test_a_trace_hook_raising_a_base_exception_is_logged_and_the_workers_go_on(
        make_wq: Any, caplog: pytest.LogCaptureFixture, exc: type[BaseException],
        event: str) -> None:
    """A hook that raises what is no Exception, in a worker or on the
    timer thread, is logged as a failing hook is, and the engine goes on,
    as a worker goes on after a work function that raises it (it killed
    the worker in the middle of its item, left counted in its pool and
    the item never run; on the timer thread, every later timer of the
    process)."""
    wq = make_wq(max_active=1)  # the later items activate as one ends: in the worker
    raised: list[str] = []

    def hostile(ev: str, work: Any, cpu: int | None) -> None:
        if threading.current_thread() is not threading.main_thread() and (
                ev == event or f"delayed {ev}" == event):
            raised.append(threading.current_thread().name)
            raise exc(f"hook escaped at {ev}")

    wq.add_trace_hook(hostile)
    ran: list[int] = []
    for round_ in range(2):  # the second after the hook raised, on the same workers
        works = [Work(lambda w, n=n: ran.append(n)) for n in range(3)]
        due = threading.Event()
        delayed = DelayedWork(lambda w, due=due: (ran.append(-1), due.set()))
        for w in works:
            assert wq.queue_work_on(0, w)
        assert wq.queue_delayed_work_on(0, delayed, 0.001)
        # Queued by its timer, not by a flush() that finds it still there.
        assert due.wait(TIMEOUT)
        for w in [*works, delayed]:
            w.flush(timeout=TIMEOUT)
        assert sorted(ran) == [-1, 0, 1, 2], (round_, ran)
        ran.clear()
        _pools_whole(wq)
    assert raised, "the hook never raised"
    failures = [r for r in caplog.records if r.getMessage().startswith("trace hook ")]
    assert len(failures) == len(raised)
    assert all(r.exc_info and isinstance(r.exc_info[1], exc) for r in failures)


def test_shutdown_cancel_futures_cancels_what_has_not_started(make_wq: Any) -> None:
    wq = make_wq(ordered=True)
    release = threading.Event()
    started = threading.Event()
    running = wq.submit(lambda: (started.set(), release.wait(TIMEOUT)))
    assert started.wait(TIMEOUT)
    waiting = [wq.submit(int) for _ in range(5)]
    stopper = threading.Thread(target=lambda: wq.shutdown(wait=True, cancel_futures=True))
    stopper.start()
    for f in waiting:
        with pytest.raises(cf.CancelledError):
            f.result(TIMEOUT)
    release.set()
    stopper.join(TIMEOUT)
    assert not stopper.is_alive()
    assert running.result() == (None, True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        wq.submit(int)
    wq.shutdown()  # again: harmless


def test_shutdown_without_wait_and_context_manager() -> None:
    topo = Topology(2)
    wq = alloc_workqueue("nowait", topology=topo)
    f = wq.submit(sum, [1, 2])
    wq.shutdown(wait=False)
    assert f.result(TIMEOUT) == 3
    assert wq._destroyed.wait(TIMEOUT)
    with alloc_ordered_workqueue("ctx", topology=topo) as owq:
        g = owq.submit(len, "abc")
    assert g.done() and g.result() == 3


def test_shutdown_with_wait_after_one_without_waits_for_the_calls(make_wq: Any) -> None:
    """As ThreadPoolExecutor's: a shutdown(wait=True) that finds the
    shutdown under way returns once the calls are done, the workqueue
    destroyed; shutdown(wait=False) from a call of its own is fine."""
    wq = make_wq(flags=WQ_UNBOUND)  # the second call runs beside the held one
    release, started = threading.Event(), threading.Event()
    held = wq.submit(lambda: (started.set(), release.wait(TIMEOUT)))
    assert started.wait(TIMEOUT)
    assert wq.submit(wq.shutdown, wait=False).result(TIMEOUT) is None
    waiter = threading.Thread(target=wq.shutdown, daemon=True)
    waiter.start()
    try:
        waiter.join(0.05)
        assert waiter.is_alive(), "shutdown() returned while a call still ran"
    finally:
        release.set()
    waiter.join(TIMEOUT)
    assert not waiter.is_alive()
    assert held.done() and wq._destroyed.is_set()


def test_asyncio_run_in_executor(make_wq: Any) -> None:
    wq = make_wq()

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(wq, pow, 3, i) for i in range(5))))

    assert asyncio.run(main()) == [1, 3, 9, 27, 81]


def test_asyncio_cancellation_reaches_the_pending_call(make_wq: Any) -> None:
    wq = make_wq(ordered=True)
    release = threading.Event()
    started = threading.Event()
    wq.submit(lambda: (started.set(), release.wait(TIMEOUT)))
    assert started.wait(TIMEOUT)
    ran: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(wq, ran.append, 1)
        fut.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fut

    asyncio.run(main())
    release.set()
    wq.flush()
    assert ran == []


@pytest.mark.parametrize("finish", ["result", "cancel"])
def test_wait_is_not_fooled_by_a_future_finishing_between_its_two_looks(
    monkeypatch: pytest.MonkeyPatch, finish: str
) -> None:
    # concurrent.futures.wait() looks at the states twice under the futures'
    # conditions: to split done from not done, then to count what its waiter
    # must hear from.  A future made final between the two looks must not be
    # able to count down the waiter (which then returns with work not done):
    # its finisher has to wait for the lock.
    later, racing = LeanFuture(), LeanFuture()
    finisher_done = threading.Event()

    def finish_racing() -> None:
        if finish == "result":
            racing.set_result(2)
        else:
            racing.cancel()
        finisher_done.set()

    original = cf._base._create_and_install_waiters  # type: ignore[attr-defined]

    def between_the_looks(fs: Any, return_when: str) -> Any:
        threading.Thread(target=finish_racing).start()
        # With the bug the finisher completes here at once; with the rule it
        # blocks on the condition that wait() holds, so this wait times out.
        assert not finisher_done.wait(0.2), "a future became final under wait()'s lock"
        return original(fs, return_when)

    monkeypatch.setattr(cf._base, "_create_and_install_waiters", between_the_looks)
    threading.Timer(0.3, later.set_result, (1,)).start()
    done, not_done = cf.wait([later, racing], timeout=10)
    assert not not_done and done == {later, racing}
    assert finisher_done.wait(10)


class _PausingFuture(LeanFuture):
    """A LeanFuture whose finisher stops the first time it tells the
    watchers, which it does once the state is final."""

    def __init__(self) -> None:
        super().__init__()
        self.finisher: threading.Thread | None = None
        self.paused = threading.Event()
        self.resume = threading.Event()

    def _tell_watchers(self, own: Any) -> None:
        if threading.current_thread() is self.finisher and not self.paused.is_set():
            self.paused.set()
            assert self.resume.wait(TIMEOUT)
        super()._tell_watchers(own)


@pytest.mark.parametrize("finish", ["result", "cancel"])
def test_wait_is_not_fooled_by_a_future_notifying_after_its_state_is_final(
    finish: str
) -> None:
    # The other half of the rule above: the hold of the condition that makes
    # a future final must also be the one that tells its watchers.  If the
    # telling came in a later hold, a wait() could look in between, count the
    # future as done, install its waiter -- and then be told again, counting
    # down for a future that is still pending.
    paused, pending = _PausingFuture(), LeanFuture()
    paused.add_done_callback(lambda f: None)  # watched: an unwatched one has nobody to tell
    paused.finisher = threading.Thread(
        target=paused.set_result if finish == "result" else paused.cancel,
        args=(1,) if finish == "result" else ())
    paused.finisher.start()
    assert paused.paused.wait(TIMEOUT)
    outcome: list[Any] = []
    waiter = threading.Thread(target=lambda: outcome.append(cf.wait([paused, pending], TIMEOUT)))
    waiter.start()
    # With the rule, wait() cannot look: it waits for the condition the
    # paused finisher holds.  With the bug, it looks now and installs its
    # waiter on both futures; give it the time to.
    _within(0.5, lambda: bool(pending._waiter_list))
    paused.resume.set()
    paused.finisher.join(TIMEOUT)
    waiter.join(0.5)  # with the bug, told twice for paused, wait() returns
    assert waiter.is_alive(), f"wait() returned with a future pending: {outcome}"
    pending.set_result(2)
    waiter.join(TIMEOUT)
    done, not_done = outcome[0]
    assert not not_done and done == {paused, pending}


@pytest.mark.parametrize("how", ["bare", "call"])
def test_cancelling_a_cancelled_future_again_tells_no_waiter(make_wq: Any, how: str) -> None:
    """cancel() of a future cancelled already answers True and changes
    nothing: a wait() that counted it done as it installed its waiter is
    not told of it once more, which would count the waiter down for a
    future still pending and end an ALL_COMPLETED wait early."""
    if how == "bare":
        cancelled = LeanFuture()
    else:
        cancelled, release = _queued_behind_a_running_call(make_wq(ordered=True))
    cancelled.add_done_callback(lambda _f: None)  # watched: it has waiters to tell
    assert cancelled.cancel() is True
    pending = LeanFuture()
    outcome: list[Any] = []
    waiter = threading.Thread(target=lambda: outcome.append(cf.wait([cancelled, pending],
                                                                    TIMEOUT)))
    waiter.start()
    assert _within(TIMEOUT, lambda: bool(pending._waiter_list))
    (installed,) = cancelled._waiters
    assert cancelled.cancel() is True
    assert not installed.event.is_set(), "told again of a future it counted done"
    pending.set_result(2)
    waiter.join(TIMEOUT)
    done, not_done = outcome[0]
    assert not not_done and done == {cancelled, pending}
    if how == "call":
        release.set()


def _within(seconds: float, predicate: Callable[[], bool]) -> bool:
    """Whether ``predicate`` comes true within ``seconds`` (for what a
    correct implementation never does, so the wait is bounded by design)."""
    deadline = time.monotonic() + seconds
    pause = threading.Event()
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        pause.wait(0.001)
    return True


class _SignallingLock:
    """An RLock that says when a thread other than *owner* takes it."""

    def __init__(self, owner: threading.Thread) -> None:
        self._lock, self.taken, self._owner = threading.RLock(), threading.Event(), owner

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got and threading.current_thread() is not self._owner:
            self.taken.set()
        return got

    def release(self) -> None:
        self._lock.release()

    def _is_owned(self) -> bool:  # for Condition.notify_all()
        return self._lock._is_owned()  # type: ignore[attr-defined]

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()


@pytest.mark.parametrize("done", [True, False])
def test_wait_over_mixed_futures_takes_their_locks_in_one_order(done: bool) -> None:
    # concurrent.futures.wait() takes its futures' conditions in the order of
    # their ids.  Thread W waits on {A, L1}, A a standard future first; the
    # test stands for a second wait() on {L2, A}, L2 first: it holds L2's
    # condition, then asks for A's.  Were L1's and L2's one lock shared by
    # LeanFutures, W would hold A's and wait for it: a lock-order cycle.
    lock = _SignallingLock(threading.current_thread())
    # Futures of both kinds, made in turns, until a standard one has
    # LeanFutures on both sides in id order (they come from different
    # allocator pools, which end up interleaved).
    leans: list[LeanFuture] = []
    standards: list[cf.Future[int]] = []
    while True:
        f = LeanFuture()
        f.set_running_or_notify_cancel()
        if done:
            f.set_result(1)
        leans.append(f)
        standards.append(cf.Future())
        lo, hi = min(map(id, leans)), max(map(id, leans))
        a = next((s for s in standards if lo < id(s) < hi), None)
        if a is not None:
            break
    a._condition = threading.Condition(lock)  # type: ignore[arg-type]
    a.set_result(0)
    l1 = min((f for f in leans if id(f) > id(a)), key=id)
    l2 = max((f for f in leans if id(f) < id(a)), key=id)
    with l2._condition:
        w = threading.Thread(target=cf.wait, args=([a, l1], TIMEOUT), daemon=True)
        w.start()
        assert lock.taken.wait(TIMEOUT)
        # W lets go of A's lock once it has taken L1's: with the cycle, never.
        got = lock.acquire(timeout=TIMEOUT)
        if got:
            lock.release()
    for f in leans:
        if not f.done():
            f.set_result(1)
    w.join(TIMEOUT)
    assert got, "wait() on {A, L1} holds A's lock and waits for L2's"
    assert not w.is_alive()


def _outcome(go: threading.Event, ran: set[int], i: int) -> int:
    assert go.wait(TIMEOUT)
    ran.add(i)
    if i % 5 == 0:
        raise ValueError(i)
    return i


def _check_wait(fs: list[cf.Future[Any]], how: str) -> None:
    """Wait on *fs* as *how* says, and check what comes back against what
    wait() and as_completed() promise."""
    if how == "as_completed":
        seen = list(cf.as_completed(fs, timeout=TIMEOUT))  # TimeoutError if one is lost
        assert len(seen) == len(fs) and set(seen) == set(fs)
        assert all(f.done() for f in seen)
        return
    done, not_done = cf.wait(fs, timeout=TIMEOUT, return_when=how)
    assert done | not_done == set(fs) and not done & not_done
    assert all(f.done() for f in done), f"{how}: wait() returned {done} as done"
    if how == cf.ALL_COMPLETED:
        assert not not_done, f"all futures finish, yet {not_done} are not done"
    elif how == cf.FIRST_COMPLETED:
        assert done, "FIRST_COMPLETED returned with none done"
    else:
        assert not not_done or any(
            not f.cancelled() and f.exception() is not None for f in done
        ), "FIRST_EXCEPTION returned with none failed and some not done"


def _mixed_round(wq: Any, serials: list[Any], seed: int) -> None:
    """One round of the test below."""
    rng = random.Random(seed)
    go, ran, failures = threading.Event(), set[int](), list[BaseException]()
    standards: list[cf.Future[Any]] = [cf.Future() for _ in range(6)]
    bare: list[cf.Future[Any]] = [LeanFuture() for _ in range(6)]
    calls = [wq.submit(_outcome, go, ran, i) for i in range(12)]
    calls += [serials[i % 3].submit(_outcome, go, ran, 100 + i) for i in range(6)]
    ids = [*range(12), *range(100, 106)]
    everything = standards + bare + calls

    def guarded(fn: Callable[..., None], *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:
                failures.append(exc)

        return threading.Thread(target=run, daemon=True)

    def finish(driven: list[cf.Future[Any]]) -> None:
        for n, f in enumerate(driven):
            if n == len(driven) // 2:
                go.set()
            if n % 3 == 0 and f.cancel():
                f.set_running_or_notify_cancel()  # tells a standard one's waiters
                continue
            f.set_running_or_notify_cancel()
            if n % 3 == 1:
                f.set_exception(ValueError(n))
            else:
                f.set_result(n)

    def cancel(chosen: list[cf.Future[Any]], all_pending: bool) -> None:
        for f in chosen:
            f.cancel()
        if all_pending:
            cancel_pending_futures(wq)

    def wait(sets: list[list[cf.Future[Any]]], how: str) -> None:
        for fs in sets:  # the later ones mostly over futures done already
            _check_wait(fs, how)

    hows = [cf.ALL_COMPLETED, cf.FIRST_COMPLETED, cf.FIRST_EXCEPTION, "as_completed"]
    threads = [
        guarded(wait, [rng.sample(everything, rng.randint(2, len(everything)))
                       for _ in range(50)], how)
        for how in hows for _ in range(2)
    ]
    threads.append(guarded(finish, rng.sample(standards + bare, 12)))
    threads.append(guarded(cancel, rng.sample(calls, 5), rng.random() < 0.5))
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), f"round {seed}: {t} hangs"
    assert not failures, f"round {seed}: {failures!r}"
    assert not cf.wait(calls, TIMEOUT).not_done
    for i, f in zip(ids, calls, strict=True):
        assert f.cancelled() is (i not in ran), f"round {seed}: call {i}: {f}"


def test_wait_and_as_completed_over_mixed_futures_from_many_threads(make_wq: Any) -> None:
    # Standard futures and LeanFutures of every kind -- submitted calls,
    # serial calls, bare ones -- finishing, failing and being cancelled (one
    # by one, and all of a workqueue's at once) while threads wait on mixed
    # sets of them in every way concurrent.futures offers.  Every wait must
    # come back, and come back right; a cancelled call must not have run.
    wq = make_wq(flags=WQ_UNBOUND)
    serials = [wq.serial(key) for key in range(3)]
    deadline = time.monotonic() + 2.0
    rounds = 0
    while time.monotonic() < deadline:
        _mixed_round(wq, serials, rounds)
        rounds += 1
    assert rounds > 1, rounds


def _finisher(future: cf.Future[Any], finish: str, wq: Any) -> Callable[[], object]:
    return {
        "result": lambda: future.set_result(1),
        "exception": lambda: future.set_exception(ValueError()),
        "cancel": future.cancel,
        "cancel_pending": lambda: cancel_pending_futures(wq),
    }[finish]


@pytest.mark.parametrize("finish", ["result", "exception", "cancel", "cancel_pending"])
def test_a_callback_runs_once_on_a_future_watched_as_it_finishes(
    make_wq: Any, finish: str
) -> None:
    # add_done_callback() asks for the condition (which makes it) while the
    # future is finishing: however the two interleave, the callback runs
    # once -- by the finisher if it was added first, else by the adder.
    wq = make_wq(ordered=True)
    for _ in range(300):
        calls: list[cf.Future[Any]] = []
        if finish.startswith("cancel"):
            release = threading.Event()
            wq.submit(release.wait, TIMEOUT)  # the rest stay pending behind it
            future = wq.submit(int)
        else:
            future = LeanFuture()
            future.set_running_or_notify_cancel()
        finisher = threading.Thread(target=_finisher(future, finish, wq))
        finisher.start()
        future.add_done_callback(calls.append)
        future.add_done_callback(calls.append)
        finisher.join(TIMEOUT)
        if finish.startswith("cancel"):
            release.set()
        assert calls == [future, future]
        assert cf.wait([future], timeout=TIMEOUT).done == {future}


def test_cancel_pending_futures_makes_a_watched_future_final_under_its_condition(
    make_wq: Any,
) -> None:
    # cancel_pending_futures() takes the calls back under _futures_lock,
    # where it cannot take a future's own condition (the lock order): a
    # watched future is cancelled there but final only later, under its
    # condition.  Meanwhile it is cancelled for everybody but wait().
    wq = make_wq(ordered=True)
    release, started = threading.Event(), threading.Event()
    wq.submit(lambda: (started.set(), release.wait(TIMEOUT)))
    assert started.wait(TIMEOUT)
    future = wq.submit(int)
    canceller = threading.Thread(target=cancel_pending_futures, args=(wq,))
    with future._condition:  # as wait() holds it between its two looks
        canceller.start()
        assert _within(TIMEOUT, future.cancelled)
        assert future._state == CANCELLED  # which wait() counts as not done
        assert future.cancel() is True and future.done()
        with pytest.raises(cf.CancelledError):
            future.result(0)
        with pytest.raises(cf.CancelledError):
            future.exception(0)
        assert canceller.is_alive()
    canceller.join(TIMEOUT)
    assert future._state == CANCELLED_AND_NOTIFIED
    assert cf.wait([future], timeout=TIMEOUT).done == {future}
    release.set()


class _AsksInRepr:
    """A call whose repr() asks a workqueue for a result (as a repr that
    shows its executor's load may), recording in ``reprs`` whether the
    answer came: it waits REPR_CALL_BOUND at most, so that a repr() made
    under _futures_lock, which a worker takes to start a call, fails the
    test rather than deadlock it."""

    def __init__(self, wq: Any) -> None:
        self.wq = wq
        self.reprs: list[bool] = []

    def __call__(self) -> None:
        pass

    def __repr__(self) -> str:
        try:
            self.wq.submit(int).result(REPR_CALL_BOUND)
            self.reprs.append(True)
        except cf.TimeoutError:
            self.reprs.append(False)
        return "<AsksInRepr>"


def test_a_second_outcome_is_refused_naming_the_call_with_the_futures_lock_free(
    make_wq: Any,
) -> None:
    # A cancelled call not yet let go of (cancel_pending_futures() waits
    # for the future's condition to make it final): the InvalidStateError
    # names it by its call's repr(), the program's code, which may wait
    # for a worker -- that takes _futures_lock to start the call.
    wq = make_wq(ordered=True)
    other = make_wq("other")
    release, started = threading.Event(), threading.Event()
    wq.submit(lambda: (started.set(), release.wait(TIMEOUT)))
    assert started.wait(TIMEOUT)
    call = _AsksInRepr(other)
    future = wq.submit(call)
    canceller = threading.Thread(target=cancel_pending_futures, args=(wq,))
    try:
        with future._condition:
            canceller.start()
            assert _within(TIMEOUT, future.cancelled)
            with pytest.raises(cf.InvalidStateError, match=r"^CANCELLED: <LeanFuture "):
                future.set_result(1)
    finally:
        canceller.join(TIMEOUT)
        release.set()
    assert call.reprs and all(call.reprs), call.reprs
    assert future._state == CANCELLED_AND_NOTIFIED


def test_code_that_waits_on_the_condition_itself_is_woken() -> None:
    """Each thread waiting on the condition is notified when the future is
    done: wait() answers True, not False at its timeout (wait_for() would
    answer True either way, with the future done by then)."""
    f = LeanFuture()
    f.set_running_or_notify_cancel()
    woken: list[bool] = []

    def sleeper(i: int) -> None:
        with f._condition:
            if i:
                woken.append(f._condition.wait(TIMEOUT))
            else:
                woken.append(f._condition.wait_for(f.done, TIMEOUT))

    threads = [threading.Thread(target=sleeper, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    # Asleep once they let go of the lock, in wait_for().
    assert _within(TIMEOUT, lambda: f._own is not None and _sleeping.get(f._own, [0, 0])[1] == 3)
    f.set_result(1)
    for t in threads:
        t.join(TIMEOUT)
    assert woken == [True] * 3 and not _sleeping


def test_code_that_waits_on_the_condition_of_a_future_done_before_returns_at_once() -> None:
    """As on a standard Future's condition: wait_for() of what holds
    already returns it without waiting, also on a future that was done
    before anybody asked for its condition (it raised AttributeError)."""
    f = LeanFuture()
    f.set_result(1)
    with f._condition:
        assert f._condition.wait_for(f.done, TIMEOUT) is True
    # What will never hold does not wait for ever: nothing will notify it.
    with f._condition, pytest.raises(RuntimeError, match="nothing will notify it"):
        f._condition.wait_for(f.cancelled)


def test_a_future_done_as_its_condition_is_made_is_settled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A future made final between the first look of `_condition` and the
    hold that would keep the condition made gets none either: it is as
    one done before anybody asked, with nobody to tell."""
    from workqueue import _future

    f = LeanFuture()
    f.set_running_or_notify_cancel()
    real = _future._OwnCondition

    def made_as_the_future_finishes() -> Any:
        f.set_result(1)
        return real()

    monkeypatch.setattr(_future, "_OwnCondition", made_as_the_future_finishes)
    with f._condition:
        assert f._own is None
        with pytest.raises(RuntimeError, match="nothing will notify it"):
            f._condition.wait_for(f.cancelled, 0)


@pytest.mark.parametrize("executor", ["submit", "serial"])
def test_a_call_finishes_its_future_off_the_main_thread(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch, executor: str) -> None:
    """What LeanFuture._finish() counts on, to tell the watchers with no
    care for Ctrl-C (which lands in the main thread only): a call's
    future is finished on a worker, never in the main thread, even when
    that is the one waiting for it."""
    real = LeanFuture._finish
    where: list[threading.Thread] = []

    def finish(self: LeanFuture, *outcome: Any) -> None:
        where.append(threading.current_thread())
        real(self, *outcome)

    monkeypatch.setattr(LeanFuture, "_finish", finish)
    wq = make_wq()
    ex = wq if executor == "submit" else wq.serial("key")
    assert ex.submit(pow, 2, 3).result(TIMEOUT) == 8
    assert len(where) == 1 and where[0] is not threading.main_thread()


def test_standalone_lean_future() -> None:
    f = LeanFuture()
    assert f.set_running_or_notify_cancel() is True
    assert f.cancel() is False
    f.set_result(5)
    assert f.result() == 5 and f.done() and not f.running()
    g = LeanFuture()
    waiter = cf.wait([g], timeout=0)
    assert waiter.not_done == {g}
    assert g.cancel() is True
    assert g.set_running_or_notify_cancel() is False
    assert cf.wait([g], timeout=TIMEOUT).done == {g}
    h = LeanFuture()
    h.set_running_or_notify_cancel()
    with pytest.raises(RuntimeError, match="cannot start: it is RUNNING"):
        h.set_running_or_notify_cancel()  # as a standard Future
    # As a standard Future: a done future takes no second outcome, and its
    # callbacks run once.
    called: list[int] = []
    h.add_done_callback(lambda fut: called.append(fut.result()))
    h.set_result(1)
    for second in (lambda: h.set_result(2), lambda: h.set_exception(ValueError())):
        with pytest.raises(cf.InvalidStateError):
            second()
    assert h.result() == 1 and called == [1]
    with pytest.raises(RuntimeError, match="cannot start: it is FINISHED"):
        h.set_running_or_notify_cancel()
    with pytest.raises(cf.InvalidStateError):
        g.set_result(3)  # cancelled
    assert g.cancelled()
    e = LeanFuture()
    e.set_running_or_notify_cancel()
    error = ValueError("the outcome")
    e.set_exception(error)
    assert e.exception() is error and e.done() and not e.cancelled()
    with pytest.raises(ValueError, match="the outcome"):
        e.result()


def test_trace_hooks_see_the_four_trace_points(make_wq: Any, tracer: Any) -> None:
    wq = make_wq(ordered=True)
    wq.add_trace_hook(tracer)
    release = threading.Event()
    started = threading.Event()
    a = Work(lambda w: (started.set(), release.wait(TIMEOUT)))
    b = Work(lambda w: None)
    wq.queue_work(a)
    assert started.wait(TIMEOUT)
    wq.queue_work(b)
    assert tracer.of(a) == ["queue", "activate", "execute_start"]
    assert tracer.of(b) == ["queue"]  # inactive behind a: max_active is 1
    release.set()
    wq.flush()
    assert tracer.of(a) == ["queue", "activate", "execute_start", "execute_end"]
    assert tracer.of(b) == ["queue", "activate", "execute_start", "execute_end"]
    assert tracer.of(b) == list(TRACE_EVENTS)  # the order in which they fire
    assert {cpu for _, _, cpu in tracer.events} == {None}
    wq.remove_trace_hook(tracer)
    with pytest.raises(ValueError, match="not a trace hook"):
        wq.remove_trace_hook(tracer)
    with pytest.raises(TypeError):
        wq.add_trace_hook("nope")


def test_stats_is_a_frozen_snapshot(make_wq: Any) -> None:
    wq = make_wq("st", max_active=3)
    for cpu in (0, 1, 1):
        w = Work(lambda w: None)
        wq.queue_work_on(cpu, w)
        w.flush()
    stats = wq.stats()
    assert isinstance(stats, WorkqueueStats)
    assert (stats.name, stats.max_active) == ("st", 3)
    assert [(p.pool, p.cpu, p.bound, p.queued, p.activated, p.started, p.completed)
            for p in stats.pools] == [("cpu0", 0, True, 1, 1, 1, 1), ("cpu1", 1, True, 2, 2, 2, 2)]
    assert (stats.queued, stats.started, stats.completed, stats.in_flight) == (3, 3, 3, 0)
    with pytest.raises(AttributeError):
        stats.name = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        stats.pools[0].queued = 9  # type: ignore[misc]
    # Values: a copy is equal, and hashes alike, so that snapshots compare.
    assert dataclasses.replace(stats) == stats
    assert hash(dataclasses.replace(stats)) == hash(stats)
    assert dataclasses.replace(stats.pools[0]) == stats.pools[0]
    assert dataclasses.replace(stats.pools[0], queued=9) != stats.pools[0]
    wq.queue_work(Work(lambda w: None))
    assert stats.queued == 3  # a snapshot does not move


def test_stats_count_the_items_waiting_for_max_active_in_flight(make_wq: Any) -> None:
    wq = make_wq("st", max_active=1)
    started, release = threading.Event(), threading.Event()
    running = Work(lambda w: (started.set(), release.wait(TIMEOUT)))
    waiting = Work(lambda w: None)
    try:
        wq.queue_work_on(0, running)
        assert started.wait(TIMEOUT)
        wq.queue_work_on(0, waiting)
        stats = wq.stats()
        cpu0 = stats.pools[0]
        assert (cpu0.queued, cpu0.started, cpu0.completed) == (2, 1, 0)
        assert (cpu0.nr_active, cpu0.nr_inactive) == (1, 1)
        # The workqueue's sums: each its own counter (queued is not started).
        assert (stats.queued, stats.started, stats.completed, stats.in_flight) == (2, 1, 0, 2)
    finally:
        release.set()
    wq.flush()
    assert wq.stats().in_flight == 0


def test_bad_input_gets_clear_errors(make_wq: Any, topo: Any) -> None:
    with pytest.raises(ValueError, match="name must not be empty"):
        alloc_workqueue("", topology=topo)
    with pytest.raises(TypeError, match="name must be a str, not bytes"):
        alloc_workqueue(b"x", topology=topo)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="flags"):
        alloc_workqueue("x", "0", topology=topo)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^unknown workqueue flags 0x40000000$"):
        alloc_workqueue("x", 1 << 30, topology=topo)
    # A negative int has every high bit set: "unknown workqueue flags
    # -0x2003f" said nothing of what was wrong.
    for negative, said in ((-1, "-1"), (-4, "-4"), (-WQ_UNBOUND, "-2"),
                           (-10**400, r"about -10\*\*400 \(an int of 1329 bits\)")):
        for alloc in (alloc_workqueue, alloc_ordered_workqueue):
            with pytest.raises(ValueError, match=rf"^flags must be a non-negative combination of "
                                                 rf"WQ_\* flags, got {said}$"):
                alloc("x", negative, topology=topo)
    # The ordered flag is alloc_ordered_workqueue()'s, which runs one item
    # at a time: with more, the queue would call itself ordered and not be.
    with pytest.raises(ValueError, match="alloc_ordered_workqueue"):
        alloc_workqueue("x", WQFlags._WQ_ORDERED, topology=topo)
    with pytest.raises(ValueError, match="max_active"):
        alloc_workqueue("x", 0, -1, topology=topo)
    with pytest.raises(ValueError, match="max_active"):
        alloc_workqueue("x", 0, 100000, topology=topo)
    with pytest.raises(TypeError, match="max_active"):
        alloc_workqueue("x", 0, 1.5, topology=topo)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"max_active must be 0 \(default\) to {WQ_MAX_ACTIVE}"):
        alloc_workqueue("x", 0, WQ_MAX_ACTIVE + 1, topology=topo)
    top = make_wq("top", 0, WQ_MAX_ACTIVE)  # the bound itself is fine
    assert top.stats().max_active == WQ_MAX_ACTIVE
    top.set_max_active(WQ_MAX_ACTIVE)
    with pytest.raises(ValueError, match=rf"max_active must be 1 to {WQ_MAX_ACTIVE}"):
        top.set_max_active(WQ_MAX_ACTIVE + 1)
    with pytest.raises(TypeError, match="topology"):
        alloc_workqueue("x", topology="cpu0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="flags"):
        alloc_ordered_workqueue("x", None, topology=topo)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        Work(42)  # type: ignore[arg-type]
    wq = make_wq()
    # A function is what a concurrent.futures user passes first: say what to do.
    with pytest.raises(TypeError, match=r"expected a Work, not builtin_function_or_method: "
                                        r"make it a Work\(func\), which calls func\(work\), "
                                        r"or submit\(\) the call"):
        wq.queue_work(print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a Work"):
        wq.queue_work_on(0, None)  # type: ignore[arg-type]
    # A class is callable too, but what it lacks is only its instance.
    with pytest.raises(TypeError, match=r"expected a Work, not type$"):
        wq.queue_work(Work)  # type: ignore[arg-type]
    w = Work(lambda w: None)
    with pytest.raises(ValueError, match="CPU 5 is not a possible CPU"):
        wq.queue_work_on(5, w)
    with pytest.raises(TypeError, match="CPU number must be an int"):
        wq.queue_work_on("0", w)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_active"):
        wq.set_max_active(0)
    with pytest.raises(TypeError, match="max_active"):
        wq.set_max_active("2")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        wq.submit(42)  # type: ignore[arg-type]
    assert not w.pending


@pytest.mark.parametrize(("huge", "approx"), [(10**400, "10**400"), (-10**400, "-10**400"),
                                               (10**5000, "10**5000")],
                         ids=["1e400", "-1e400", "1e5000"])
def test_errors_show_a_huge_number_short(make_wq: Any, topo: Any, huge: int, approx: str) -> None:
    # A delay of 10**400 printed all 401 digits in its error, and one of
    # 10**5000 said instead that Python would not print an int of more
    # than 4300 digits.  Every message that prints a number the caller
    # gave prints a huge one by its size.
    wq = make_wq()
    index = LoadIndex(topo)
    calls: list[tuple[str, Callable[[], object]]] = [
        ("delay", lambda: wq.queue_delayed_work(DelayedWork(lambda w: None), huge)),
        ("delay", lambda: wq.mod_delayed_work_on(0, DelayedWork(lambda w: None), huge)),
        ("max_active", lambda: alloc_workqueue("x", 0, huge, topology=topo)),
        ("max_active", lambda: wq.set_max_active(huge)),
        ("ncpus", lambda: Topology(huge)),
        ("CPU", lambda: Topology(cpus=[huge])),
        ("CPU", lambda: topo.cpu_up(huge)),
        ("CPU", lambda: wq.queue_work_on(huge, Work(lambda w: None))),
        ("CPU", lambda: index.load(huge)),
        ("watchdog_thresh", lambda: Topology(1, watchdog_thresh=huge)),
        ("cpu_intensive_thresh", lambda: setattr(topo, "cpu_intensive_thresh", huge)),
    ]
    if huge < 0:
        calls += [("timeout", lambda: wq.flush(timeout=huge)),
                  ("weight", lambda: index.assign("k", weight=huge))]
    else:
        calls += [("unknown workqueue flags",
                   lambda: alloc_workqueue("x", huge << 6, topology=topo))]
    try:
        for what, call in calls:
            with pytest.raises(ValueError) as caught:
                call()
            message = str(caught.value)
            assert what in message and len(message) < 200, message
            assert (f"about {approx} (an int of " in message
                    or what == "unknown workqueue flags"), message
    finally:
        index.close()


@pytest.mark.parametrize("unknown", [1 << 64, 10**400 << 6, (1 << 20000) | (1 << 6)],
                         ids=["2**64", "1e400", "2**20000"])
def test_unknown_flags_past_64_bits_are_shown_in_hex(topo: Any, unknown: int) -> None:
    """As every other flag error, in hex: past 64 bits they were "about
    10**400", which says nothing of which bits were set.  Past 20 hex
    digits, the first and last 8 of them, the middle cut out."""
    text = format(unknown, "x")
    if len(text) > 20:
        text = f"{text[:8]}...{text[-8:]}"
    with pytest.raises(ValueError) as caught:
        alloc_workqueue("x", unknown | int(WQ_UNBOUND), topology=topo)
    assert str(caught.value) == (f"unknown workqueue flags 0x{text} "
                                 f"(an int of {unknown.bit_length()} bits)")
    assert len(str(caught.value)) < 100


_EXIT_SCRIPT = r"""
import os
import math
import os
import threading
from workqueue import WQ_FREEZABLE, Topology, alloc_workqueue

# Opened only once the interpreter exits, so every call below is still
# pending then: by an exit hook of threading's, registered after
# workqueue's, hence run before it.
gate = threading.Event()
threading._register_atexit(gate.set)

def job(tag):
    assert gate.wait(30)
    os.write(1, f"{tag}\n".encode())  # one write: lines of several threads never mix

topo = Topology(2)
kept = alloc_workqueue("never-shut-down", topology=topo)
for i in range(3):
    kept.submit(job, f"call {i}")
kept.serial("key").submit(job, "serial 0")
kept.serial("key").submit(job, "serial 1")
left = alloc_workqueue("shut-down-without-waiting", topology=topo)
left.submit(job, "call after shutdown(wait=False)")
left.shutdown(wait=False)
frozen = alloc_workqueue("frozen", WQ_FREEZABLE, topology=topo)
frozen.freeze()
frozen.submit(job, "call of a frozen workqueue")
"""


def test_accepted_calls_run_before_the_interpreter_exits(tmp_path: Any) -> None:
    """As ThreadPoolExecutor's: the program does not exit before the calls
    that submit() accepted are done, shut down or not; a frozen
    workqueue's, which cannot run, are dropped with a warning."""
    import os
    import subprocess
    import sys

    script = tmp_path / "exit.py"
    script.write_text(_EXIT_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == [
        "call 0", "call 1", "call 2", "call after shutdown(wait=False)",
        "serial 0", "serial 1"]
    assert "'frozen' is frozen at exit: 1 submitted calls will not run" in done.stderr


def test_no_new_calls_once_the_interpreter_exits(make_wq: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from workqueue import _atexit
    wq = make_wq()
    monkeypatch.setattr(_atexit, "_exiting", True)
    for submit in (wq.submit, wq.serial("k").submit):
        with pytest.raises(RuntimeError, match="interpreter shutdown"):
            submit(int)


# The end of the fork tests' scripts: wait (within a limit) for the child
# the script forked, and print how it ended.
_REAP = r"""
import os
import time

def reap(pid, limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print("child exited", os.waitstatus_to_exitcode(status))
            return
        time.sleep(0.01)  # no event for a child's exit: poll, within the limit
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("child hung")
"""


def run_fork_script(tmp_path: Any, text: str, timeout: float) -> list[str]:
    """Run ``text`` (ending with _REAP's reap()) in a fresh interpreter, as
    forking needs; its output lines, after checking that it succeeded."""
    import subprocess
    import sys

    script = tmp_path / "fork.py"
    script.write_text(_REAP + text)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


_FORK_SCRIPT = r"""
import sys
import threading
from workqueue import Topology, alloc_workqueue

wq = alloc_workqueue("forked", topology=Topology(2))
started, release = threading.Event(), threading.Event()
running = wq.submit(lambda: (started.set(), release.wait(30)))
queued = wq.serial("key").submit(int)
assert started.wait(10)
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a normal exit: the child runs its exit hooks
release.set()
assert running.result(10) == (None, True) and queued.result(10) == 0
reap(pid, 30)
wq.shutdown()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_a_forked_child_does_not_wait_at_exit_for_its_parents_calls(tmp_path: Any) -> None:
    """Only the forking thread lives on in a child: the workers that would
    run the calls it inherited are the parent's, so the child's exit must
    not wait for those calls.  (A ThreadPoolExecutor's child exits at once:
    its exit hook joins threads that the child does not have.)"""
    assert run_fork_script(tmp_path, _FORK_SCRIPT, 60) == ["child exited 0"]


_FORK_NEW_QUEUE_SCRIPT = r"""
import threading
from workqueue import DelayedWork, Topology, Work, alloc_workqueue

def ran_on_every_cpu(wq):
    for cpu in wq.topology.online():
        done = threading.Event()
        wq.queue_work_on(cpu, Work(lambda work: done.set()))
        if not done.wait(10):
            return False
    return True

topo = Topology(2)
parent = alloc_workqueue("parent", topology=topo)
assert ran_on_every_cpu(parent)  # every pool has workers, the timer its thread
fired = threading.Event()
parent.queue_delayed_work(DelayedWork(lambda work: fired.set()), 0.01)
assert fired.wait(10)
pid = os.fork()
if pid == 0:
    child = alloc_workqueue("child", topology=topo)
    fired = threading.Event()
    child.queue_delayed_work(DelayedWork(lambda work: fired.set()), 0.01)
    print("child items ran:", ran_on_every_cpu(child), flush=True)
    print("child delayed item ran:", fired.wait(10), flush=True)
    print("child calls ran:", child.submit(pow, 2, 5).result(10),
          child.serial("key").submit(pow, 3, 2).result(10), flush=True)
    child.shutdown()
    os._exit(0)
reap(pid, 30)
parent.destroy()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_a_forked_child_runs_the_items_of_its_own_workqueues(tmp_path: Any) -> None:
    """A child inherits the parent's pools and timer, but not their threads:
    a workqueue it makes must get workers (and timers) of its own, as a
    ThreadPoolExecutor made in a child gets threads (multiprocessing forks
    its workers by default on Linux)."""
    assert run_fork_script(tmp_path, _FORK_NEW_QUEUE_SCRIPT, 90) == [
        "child items ran: True", "child delayed item ran: True", "child calls ran: 32 9",
        "child exited 0"]


_FORK_FROM_AN_ITEM_SCRIPT = r"""
from workqueue import Topology, Work, alloc_workqueue, current_work, current_workqueue

wq = alloc_workqueue("parent", topology=Topology(2))
pids = []

def fork_here(work):
    pid = os.fork()
    if pid == 0:
        print("child runs:", current_work(), current_workqueue(), flush=True)
        os._exit(0)
    pids.append(pid)

item = Work(fork_here)
wq.queue_work(item)
item.flush()
reap(pids[0], 30)
wq.destroy()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_a_child_forked_by_a_work_item_runs_no_item(tmp_path: Any) -> None:
    """The thread that forked lives on in the child; if it was a worker,
    it is not one there (the item it ran is the parent's): the child's
    current_work() is None, as in any thread that runs no item."""
    assert run_fork_script(tmp_path, _FORK_FROM_AN_ITEM_SCRIPT, 60) == [
        "child runs: None None", "child exited 0"]


_FORK_WITH_LOCKS_HELD_SCRIPT = r"""
import threading
from workqueue import DelayedWork, Topology, alloc_workqueue, _serial, _timer

held, release = threading.Event(), threading.Event()

def holder():
    # As the first wq.serial() of a workqueue does, and add_timer().
    with _serial._domains_lock, _timer._timer._lock:
        held.set()
        release.wait(30)

parents_timer = _timer.add_timer(3600, print)
thread = threading.Thread(target=holder)
thread.start()
assert held.wait(10)
pid = os.fork()
if pid == 0:
    print("parent's timer armed:", _timer.timer_pending(parents_timer), flush=True)
    wq = alloc_workqueue("child", topology=Topology(2))
    print("child serial call ran:", wq.serial("key").submit(pow, 3, 2).result(10), flush=True)
    fired = threading.Event()
    wq.queue_delayed_work(DelayedWork(lambda work: fired.set()), 0.01)
    print("child delayed item ran:", fired.wait(10), flush=True)
    wq.shutdown()
    os._exit(0)
release.set()
thread.join(10)
reap(pid, 30)
_timer.del_timer(parents_timer)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_a_forked_child_makes_serial_executors_and_timers_whatever_lock_a_parents_thread_held(
        tmp_path: Any) -> None:
    """A lock that another thread of the parent held at the fork stays held
    for good in the child, where that thread does not exist: the child's
    first wq.serial() and its first timer must not wait for it.  (The
    parent's timers are disarmed there: their items do not run in it.)"""
    assert run_fork_script(tmp_path, _FORK_WITH_LOCKS_HELD_SCRIPT, 60) == [
        "parent's timer armed: False", "child serial call ran: 9", "child delayed item ran: True",
        "child exited 0"]
