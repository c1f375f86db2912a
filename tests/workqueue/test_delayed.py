"""Delayed work (Part 3: 6)."""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from typing import Any

import pytest
from wqhelpers import assert_next_run_waits, wait_until

from workqueue import DelayedWork, Topology, Work, _timer
from workqueue._timer import add_timer

TIMEOUT = 10.0


class HeldTimers:
    """Holds the (single) timer thread in a callback until released, so that
    a test decides when due timers fire, however loaded the machine is."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()
        add_timer(0, self._hold)
        assert self.holding.wait(TIMEOUT)

    def _hold(self, arg: object) -> None:
        self.holding.set()
        assert self.release.wait(TIMEOUT)


def test_timer_never_fires_early(make_wq: Any) -> None:
    wq = make_wq()
    ran = threading.Event()
    at: list[float] = []
    dw = DelayedWork(lambda w: (at.append(time.monotonic()), ran.set()))
    for delay in (0.001, 0.01, 0.03):
        ran.clear()
        at.clear()
        t0 = time.monotonic()
        assert wq.queue_delayed_work(dw, delay) is True
        assert dw.pending
        assert ran.wait(TIMEOUT)
        assert at[0] - t0 >= delay


def test_delay_zero_queues_at_once(make_wq: Any, tracer: Any) -> None:
    wq = make_wq(ordered=True)
    wq.add_trace_hook(tracer)
    dw = DelayedWork(lambda w: None)
    assert wq.queue_delayed_work(dw, 0) is True
    assert tracer.of(dw)[:2] == ["queue", "activate"]  # synchronously, inside the call
    dw.flush()


def test_queue_delayed_work_while_pending_returns_false(make_wq: Any) -> None:
    wq = make_wq()
    dw = DelayedWork(lambda w: None)
    assert wq.queue_delayed_work(dw, 60) is True
    assert wq.queue_delayed_work(dw, 0) is False
    assert wq.queue_work(dw) is False
    assert dw.cancel() is True


def test_queue_delayed_work_of_a_disabled_item_returns_false(make_wq: Any) -> None:
    """Disabled refuses every way of queueing, the delayed ones too, and
    leaves the item idle: no timer armed, nothing pending."""
    wq = make_wq()
    dw = DelayedWork(lambda w: None)
    assert dw.disable() is False
    assert wq.queue_delayed_work(dw, 60) is False
    assert wq.queue_delayed_work_on(1, dw, 0) is False
    assert not dw.pending and dw._timer is None
    assert dw.enable() is True
    assert wq.queue_delayed_work(dw, 60) is True
    assert dw.cancel() is True


def test_mod_delayed_work_return_values_and_effect(make_wq: Any) -> None:
    wq = make_wq()
    ran = threading.Event()
    dw = DelayedWork(lambda w: ran.set())
    assert wq.mod_delayed_work(dw, 60) is False   # idle: queued
    assert dw.pending
    assert wq.mod_delayed_work(dw, 0) is True     # pending: timer modified
    assert ran.wait(TIMEOUT)
    dw.flush()
    assert not dw.pending
    # A disabled item is not queued by mod_delayed_work.
    dw.disable()
    assert wq.mod_delayed_work(dw, 0) is False
    assert not dw.pending
    dw.enable()


def test_mod_delayed_work_on_moves_the_item_to_that_cpu(make_wq: Any, tracer: Any) -> None:
    wq = make_wq()
    wq.add_trace_hook(tracer)
    dw = DelayedWork(lambda w: None)
    assert wq.queue_delayed_work_on(0, dw, 60) is True
    assert wq.mod_delayed_work_on(1, dw, 0) is True  # pending: re-armed, and moved
    tracer.wait_for(lambda: "execute_end" in tracer.of(dw))
    dw.flush()
    assert tracer.cpus("execute_start", dw) == [1]
    assert wq.mod_delayed_work_on(0, dw, 0) is False  # idle: queued
    tracer.wait_for(lambda: tracer.of(dw).count("execute_end") == 2)
    assert tracer.cpus("execute_start", dw) == [1, 0]
    with pytest.raises(ValueError):
        wq.mod_delayed_work_on(7, dw, 0)
    assert not dw.pending


def test_many_cancelled_timers_leave_the_armed_ones_alone(make_wq: Any) -> None:
    """Cancelled delayed items leave dead timers behind, swept out once
    they are the majority; the timers still armed must all survive that."""
    wq = make_wq()
    ran = threading.Semaphore(0)
    kept = [DelayedWork(lambda w: ran.release()) for _ in range(10)]
    doomed = [DelayedWork(lambda w: None) for _ in range(200)]
    for dw in kept:
        assert wq.queue_delayed_work(dw, 0.3) is True
    for dw in doomed:
        assert wq.queue_delayed_work(dw, 60) is True
    for dw in doomed:
        assert dw.cancel() is True
    for _ in kept:
        assert ran.acquire(timeout=TIMEOUT)
    assert not any(dw.pending for dw in kept + doomed)


@pytest.mark.parametrize("take", ["cancel", "flush"])
def test_a_delayed_item_taken_off_its_timer_is_not_kept_by_it(make_wq: Any, take: str) -> None:
    """cancel() disarms the timer (del_timer), and so does flush(), which
    queues the item at once: an item taken off its timer an hour before it
    was due is not held by the timer thread until then."""
    wq = make_wq()
    dw = DelayedWork(lambda w: None)
    assert wq.queue_delayed_work(dw, 3600) is True
    assert getattr(dw, take)() is True
    gone = weakref.ref(dw)
    del dw
    gc.collect()
    assert gone() is None, f"the timer that {take}() took the item off still holds it"


def test_cancel_on_the_timer_and_later_timers_fire_in_order(make_wq: Any) -> None:
    wq = make_wq()
    ran: list[str] = []
    later = threading.Event()
    first = DelayedWork(lambda w: ran.append("first"))
    second = DelayedWork(lambda w: (ran.append("second"), later.set()))
    timers = HeldTimers()
    assert wq.queue_delayed_work(first, 0.001) is True
    assert wq.queue_delayed_work(second, 0.002) is True
    assert first.cancel() is True
    timers.release.set()
    assert first.cancel() is False
    assert later.wait(TIMEOUT)
    second.flush()
    assert ran == ["second"]


class _LockRacedByTheTimer:
    """Stands in for the engine lock in workqueue._workqueue: the first time
    the timer thread comes to take it, ``meanwhile()`` runs first there (as
    another thread could, having the lock first), and ``done`` is set once
    the timer thread has let go of the lock again."""

    def __init__(self, real: Any, meanwhile: Any) -> None:
        self.real = real
        self.meanwhile = meanwhile
        self.raced = False
        self.holding = False
        self.done = threading.Event()

    def __enter__(self) -> None:
        if threading.current_thread().name == "wq-timer" and not self.raced:
            self.raced = True
            self.meanwhile()  # takes the lock itself, through this object
            self.real.acquire()
            self.holding = True
        else:
            self.real.acquire()

    def __exit__(self, *exc: object) -> None:
        self.real.release()
        if self.holding:
            self.holding = False
            self.done.set()


def test_a_timer_that_fired_as_it_was_rearmed_does_nothing(
        make_wq: Any, tracer: Any, monkeypatch: Any) -> None:
    """A timer fires; before its callback gets the engine lock,
    mod_delayed_work() re-arms the item for a minute.  The callback then
    finds a newer timer and does nothing: the item is not run early."""
    from workqueue import _workqueue

    wq = make_wq()
    wq.add_trace_hook(tracer)
    dw = DelayedWork(lambda w: None)
    rearmed: list[bool] = []
    racing = _LockRacedByTheTimer(
        _workqueue.lock, lambda: rearmed.append(wq.mod_delayed_work_on(0, dw, 60)))
    monkeypatch.setattr(_workqueue, "lock", racing)
    assert wq.queue_delayed_work_on(0, dw, 0.001) is True
    assert racing.done.wait(TIMEOUT)
    assert rearmed == [True]  # it was pending (on the timer that fired)
    assert tracer.of(dw) == []  # not queued by the stale timer
    assert dw.pending and dw._timer is not None
    assert dw.cancel() is True


def test_flush_of_delayed_work_runs_it_now(make_wq: Any) -> None:
    """flush() of an item on its timer queues it at once and waits for
    that run.  (The timer is set for longer than the test may last: a
    flush that waited for it would be a test timeout.)"""
    wq = make_wq()
    ran: list[int] = []
    dw = DelayedWork(lambda w: ran.append(1))
    assert dw.flush() is False
    wq.queue_delayed_work(dw, 3600)
    assert dw.flush() is True
    assert ran == [1]
    assert not dw.pending
    assert dw.flush() is False  # idle now: nothing to wait for, nothing run
    wq.flush()  # (anything it queued would have run by now)
    assert ran == [1] and not dw.pending


def test_flush_from_its_own_function_is_refused_before_anything_changes(
        make_wq: Any) -> None:
    wq = make_wq()
    errors: list[str] = []

    def func(dw: DelayedWork) -> None:
        if errors:
            return
        wq.queue_delayed_work(dw, 60)  # on its timer again
        try:
            dw.flush()
        except RuntimeError as exc:
            errors.append(str(exc))

    dw = DelayedWork(func)
    wq.queue_delayed_work(dw, 0)
    wq.flush()  # the first run, queued before this flush, is over
    assert errors and "deadlock" in errors[0]
    assert dw._timer is not None  # still on its 60 s timer, not queued to run now
    assert dw.cancel() is True


def test_cancel_sync_of_delayed_work_waits_for_the_run(make_wq: Any) -> None:
    wq = make_wq()
    started = threading.Event()
    release = threading.Event()

    def func(work: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)

    dw = DelayedWork(func)
    wq.queue_delayed_work(dw, 0)
    assert started.wait(TIMEOUT)
    wq.queue_delayed_work(dw, 60)  # pending on its timer while running
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(dw.cancel_sync()))
    t.start()
    release.set()
    t.join(TIMEOUT)
    assert result == [True]
    assert not dw.pending and not dw.running


def test_delayed_work_runs_on_the_cpu_it_was_queued_on(make_wq: Any, tracer: Any) -> None:
    wq = make_wq()
    wq.add_trace_hook(tracer)
    dw = DelayedWork(lambda w: None)
    for cpu in (1, 0):
        wq.queue_delayed_work_on(cpu, dw, 0.001)
        tracer.wait_for(lambda: "execute_end" in tracer.of(dw))
        dw.flush()
        assert tracer.cpus("execute_start", dw) == [cpu]
        tracer.events.clear()


def test_a_timer_for_a_cpu_that_went_down_queues_the_item_there_to_run_unbound(
        make_wq: Any, tracer: Any) -> None:
    """The timer of an item queued on a CPU fires after that CPU went down:
    the item is queued on the CPU's pool, which runs unbound on the CPUs
    still online (as queue_work_on() an offline CPU does), once."""
    topo = Topology(2, cpu_intensive_thresh=60.0)
    wq = make_wq(topology=topo)
    wq.add_trace_hook(tracer)
    ran: list[str] = []
    done = threading.Event()
    dw = DelayedWork(lambda w: (ran.append(threading.current_thread().name), done.set()))
    timers = HeldTimers()
    assert wq.queue_delayed_work_on(1, dw, 0.001) is True
    topo.cpu_down(1)
    timers.release.set()  # the timer fires, not a flush()
    assert done.wait(TIMEOUT)
    dw.flush(timeout=TIMEOUT)
    assert len(ran) == 1 and ran[0].startswith("kworker/cpu1:")
    assert tracer.cpus("execute_start", dw) == [1]
    assert not wq.stats().pools[1].bound
    topo.cpu_up(1)


def test_delayed_work_queued_by_a_worker_runs_on_the_workers_cpu(
        make_wq: Any, tracer: Any) -> None:
    # CPU 3 of four logical CPUs is never where a thread that is not a worker
    # (the timer thread) counts as running: the CPU is the queueing caller's.
    wq = make_wq(topology=Topology(4, cpu_intensive_thresh=60.0))
    wq.add_trace_hook(tracer)
    dw = DelayedWork(lambda w: None)
    outer = Work(lambda w: wq.queue_delayed_work(dw, 0.001))
    wq.queue_work_on(3, outer)
    outer.flush()
    tracer.wait_for(lambda: "execute_end" in tracer.of(dw))
    assert tracer.cpus("execute_start", dw) == [3]


def _held(wq: Any) -> threading.Event:
    """Keep ``wq`` from draining at once: an item runs on it until the
    returned event is set."""
    release, started = threading.Event(), threading.Event()

    def blocker(work: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)

    wq.queue_work(Work(blocker))
    assert started.wait(TIMEOUT)
    return release


def test_timer_firing_during_drain_is_dropped_and_logged(make_wq: Any, log_waiter: Any) -> None:
    wq = make_wq()
    logged = log_waiter("workqueue._workqueue", "not run")
    release = _held(wq)
    ran: list[int] = []
    dw = DelayedWork(lambda w: ran.append(1))
    timers = HeldTimers()
    wq.queue_delayed_work(dw, 0.001)
    drainer = threading.Thread(target=wq.drain)
    drainer.start()
    while wq._state == 0:  # until drain() has started
        drainer.join(0.001)
    timers.release.set()
    assert logged.seen.wait(TIMEOUT)
    release.set()
    drainer.join(TIMEOUT)
    assert not drainer.is_alive()
    assert ran == [] and not dw.pending
    assert "draining" in logged.records[0].getMessage()
    assert logged.records[0].levelno == logging.ERROR


def test_flush_of_delayed_work_during_drain_drops_and_logs_it(
        make_wq: Any, log_waiter: Any) -> None:
    """flush() queues an item on its timer at once; a draining workqueue
    refuses that as it refuses the timer: dropped, logged, not waited for."""
    wq = make_wq()
    logged = log_waiter("workqueue._workqueue", "not run")
    release = _held(wq)
    ran: list[int] = []
    dw = DelayedWork(lambda w: ran.append(1))
    assert wq.queue_delayed_work(dw, 3600) is True
    drainer = threading.Thread(target=wq.drain)
    drainer.start()
    try:
        while wq._state == 0:  # until drain() has started
            drainer.join(0.001)
        assert dw.flush() is False
        assert not dw.pending and dw._timer is None
        assert logged.records and "draining" in logged.records[0].getMessage()
    finally:
        release.set()
    drainer.join(TIMEOUT)
    assert not drainer.is_alive()
    assert ran == []


def test_a_timer_dropped_during_drain_leaves_a_flush_of_the_run_waiting(
        make_wq: Any, log_waiter: Any) -> None:
    """An item queued on its timer while it runs, whose timer a draining
    workqueue refuses: the drop ends the pending instance, not the run,
    which a flush() registered before still waits for."""
    wq = make_wq()
    logged = log_waiter("workqueue._workqueue", "not run")
    started, release = threading.Event(), threading.Event()

    def func(work: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)

    dw = DelayedWork(func)
    wq.queue_work(dw)
    assert started.wait(TIMEOUT)
    result: list[bool] = []
    flusher = threading.Thread(target=lambda: result.append(dw.flush()), daemon=True)
    drainer = threading.Thread(target=wq.drain, daemon=True)
    try:
        flusher.start()
        wait_until(lambda: dw._flushers, "the flush is registered")
        timers = HeldTimers()
        assert wq.queue_delayed_work(dw, 0.001) is True
        drainer.start()
        while wq._state == 0:  # until drain() has started
            drainer.join(0.001)
        timers.release.set()
        assert logged.seen.wait(TIMEOUT)
        assert not dw.pending and dw.running
        flusher.join(0.05)
        assert flusher.is_alive() and dw._flushers, "the dropped timer ended the flush"
    finally:
        release.set()
    flusher.join(TIMEOUT)
    drainer.join(TIMEOUT)
    assert result == [True] and not drainer.is_alive()


def test_work_flush_does_not_wait_for_an_item_on_its_timer(make_wq: Any) -> None:
    """Work.flush() (flush_work) waits for queued or running instances
    only; the timer is DelayedWork.flush()'s business."""
    wq = make_wq()
    dw = DelayedWork(lambda w: None)
    assert wq.queue_delayed_work(dw, 3600) is True
    result: list[bool] = []
    flusher = threading.Thread(target=lambda: result.append(Work.flush(dw)), daemon=True)
    flusher.start()
    flusher.join(TIMEOUT)
    assert result == [False], "Work.flush() waited for the timer"
    assert dw.pending
    assert dw.cancel() is True
    flusher.join(TIMEOUT)


def test_timer_firing_after_destroy_is_dropped_and_logged(make_wq: Any, log_waiter: Any) -> None:
    wq = make_wq()
    logged = log_waiter("workqueue._workqueue", "not run")
    ran: list[int] = []
    dw = DelayedWork(lambda w: ran.append(1))
    timers = HeldTimers()
    wq.queue_delayed_work(dw, 0.001)
    wq.destroy()
    timers.release.set()
    assert logged.seen.wait(TIMEOUT)
    assert ran == [] and not dw.pending
    assert "destroyed" in logged.records[0].getMessage()
    assert logged.records[0].levelno == logging.ERROR


def test_bad_delays_and_items(make_wq: Any) -> None:
    wq = make_wq()
    dw = DelayedWork(lambda w: None)
    with pytest.raises(ValueError, match="delay"):
        wq.queue_delayed_work(dw, -1)
    with pytest.raises(ValueError, match="delay"):
        wq.mod_delayed_work(dw, float("nan"))
    with pytest.raises(ValueError, match="delay"):
        wq.queue_delayed_work(dw, float("inf"))
    # Finite, but beyond what a timer can wait (threading.TIMEOUT_MAX): it
    # would have killed the timer thread of every workqueue of the process.
    for huge in (1e10, 10**400):
        with pytest.raises(ValueError, match="TIMEOUT_MAX"):
            wq.queue_delayed_work(dw, huge)
    ran = threading.Event()
    assert wq.queue_delayed_work(DelayedWork(lambda w: ran.set()), 0.01)
    assert ran.wait(TIMEOUT)
    with pytest.raises(TypeError, match="delay"):
        wq.queue_delayed_work(dw, "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not bool"):  # True is no number of seconds
        wq.mod_delayed_work(dw, True)
    with pytest.raises(TypeError, match="DelayedWork"):
        wq.queue_delayed_work(Work(lambda w: None), 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CPU 7"):
        wq.queue_delayed_work_on(7, dw, 1)
    assert not dw.pending


def test_mod_delayed_work_while_its_function_runs(make_wq: Any, tracer: Any) -> None:
    """Re-armed while it runs on cpu0, even toward cpu1, the item is queued
    again (mod_delayed_work returns False, then True once it is pending on
    its timer) and runs once more, after the first run, on the worker that
    ran it."""
    wq = make_wq()
    wq.add_trace_hook(tracer)

    def rearm(dw: DelayedWork) -> bool:
        assert dw.running is True and dw.pending is False
        assert wq.mod_delayed_work_on(1, dw, 60) is False  # idle: armed
        assert dw.pending is True
        return wq.mod_delayed_work_on(1, dw, 0)  # pending: re-armed, due now

    dw = assert_next_run_waits(lambda w: wq.queue_delayed_work_on(0, w, 0), rearm,
                               item=DelayedWork)
    assert tracer.cpus("execute_start", dw) == [0, 0]
    assert tracer.cpus("queue", dw) == [0, 0]  # on the pool running it, not on cpu1's
    assert tracer.of(dw) == ["queue", "activate", "execute_start", "queue", "activate",
                             "execute_end", "execute_start", "execute_end"]
    assert dw.pending is False


class _Stop(BaseException):
    """What no `except Exception` catches, as SystemExit is not."""


@pytest.mark.parametrize("exc", [SystemExit(3), _Stop("out")], ids=["SystemExit", "BaseException"])
def test_a_timer_callback_raising_a_base_exception_leaves_the_timers_running(
        exc: BaseException, log_waiter: Any) -> None:
    """The timer thread is every timer's, of every workqueue: a callback
    that raises, whatever it raises, is logged and the later timers still
    fire, as a worker logs a work function's and runs the next item.  (A
    private timer thread: the process's one must outlive the test even
    where this fails.)"""
    timers = _timer._TimerBase()
    logged = log_waiter("workqueue._timer", "timer callback")
    fired = threading.Event()

    def raising(arg: object) -> None:
        raise exc

    timers.add(0, raising, None)
    timers.add(0, lambda arg: fired.set(), None)  # due after it (FIFO for equal deadlines)
    assert fired.wait(TIMEOUT), "the timer thread died with the callback"
    assert len(logged.records) == 1
    assert logged.records[0].exc_info is not None and logged.records[0].exc_info[1] is exc


def test_timers_due_at_the_same_time_fire_in_the_order_they_were_armed() -> None:
    """Equal deadlines are told apart by the order of arming, never by
    the handles (which do not compare): here all are due at the same
    instant, long past.  (A private timer thread, as above.)"""
    timers = _timer._TimerBase()
    ran: list[int] = []
    done = threading.Event()
    for i in range(5):
        timers.add(float("-inf"), ran.append, i)
    timers.add(float("-inf"), lambda arg: done.set(), None)
    assert done.wait(TIMEOUT)
    assert ran == [0, 1, 2, 3, 4]


def test_a_fired_timer_keeps_nothing_of_its_argument_alive() -> None:
    """Once a timer has fired, neither its handle (still held here, as an
    item holds its timer's) nor the timer thread, waiting for the next
    one, keeps its argument."""

    class Arg:
        pass

    arg, fired = Arg(), threading.Event()
    handle = add_timer(0, lambda a: fired.set(), arg)
    assert fired.wait(TIMEOUT)
    gone = weakref.ref(arg)
    del arg

    def collected() -> bool:
        gc.collect()
        return gone() is None

    wait_until(collected, "the fired timer's argument was collected")
    assert not _timer.timer_pending(handle)


def test_timers_share_one_timer_thread() -> None:
    thread = _timer._timer._thread
    fired = threading.Semaphore(0)
    for _ in range(3):
        add_timer(0, lambda arg: fired.release())
        assert fired.acquire(timeout=TIMEOUT)
    assert _timer._timer._thread is thread or thread is None
    assert _timer._timer._thread is not None and _timer._timer._thread.is_alive()
    thread = _timer._timer._thread
    add_timer(0, lambda arg: fired.release())
    assert fired.acquire(timeout=TIMEOUT)
    assert _timer._timer._thread is thread


def test_deleted_timers_are_swept_out_of_the_heap_in_heap_order() -> None:
    """Lazy deletion leaves dead entries in the heap; once they are the
    majority they are swept out, and what is left is a heap again, the
    earliest deadline first.  (A private timer whose thread never starts:
    nothing fires.)"""
    timers = _timer._TimerBase()
    timers._thread = threading.current_thread()  # taken as started: none starts
    handles = [timers.add(3600.0 + 10 * (200 - i), lambda arg: None, i) for i in range(200)]
    for handle in handles[::2] + handles[1:100:2]:
        assert timers.delete(handle)
    assert len(timers._heap) < 200, "the dead timers were not swept out"
    heap = [entry for entry in timers._heap if entry[2].callback is not None]
    assert sorted(e[2].arg for e in heap) == list(range(101, 200, 2))
    assert all(timers._heap[(i - 1) // 2] <= timers._heap[i]
               for i in range(1, len(timers._heap))), "not a heap"


def test_del_timer_says_whether_it_disarmed_the_timer() -> None:
    """As the kernel's del_timer(): True if the timer was armed, False if
    it had fired or was deleted before."""
    fired = threading.Event()
    handle = add_timer(0, lambda arg: fired.set())
    assert fired.wait(TIMEOUT)
    assert _timer.del_timer(handle) is False
    armed = add_timer(3600, lambda arg: None)
    assert _timer.timer_pending(armed)
    assert _timer.del_timer(armed) is True
    assert not _timer.timer_pending(armed)
    assert _timer.del_timer(armed) is False


class _RecordedCondition:
    """Stands in for a timer's condition: records each timed wait of its
    thread."""

    def __init__(self, real: threading.Condition) -> None:
        self.real = real
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        return self.real.wait(timeout)

    def notify(self) -> None:
        self.real.notify()


def test_the_timer_thread_sleeps_until_the_next_deadline_not_past_it() -> None:
    """The timer thread wakes for the earliest deadline: it never sleeps
    longer than the time left to it.  (A private timer thread, as above.)"""
    timers = _timer._TimerBase()
    recorded = _RecordedCondition(timers._cond)
    timers._cond = recorded  # type: ignore[assignment]
    fired = threading.Event()
    timers.add(1.0, lambda arg: fired.set(), None)
    assert fired.wait(TIMEOUT)
    timed = [t for t in recorded.timeouts if t is not None]
    assert timed and all(t <= 1.0 for t in timed), recorded.timeouts
