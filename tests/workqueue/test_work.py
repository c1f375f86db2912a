"""Work item life cycle: pending bit, non-reentrancy, flush, cancel, disable
(Part 3: 1, 2, 7, 8)."""

from __future__ import annotations

import enum
import os
import random
import threading
from typing import Any

import pytest
from wqhelpers import assert_next_run_waits, wait_until

import workqueue
from workqueue import DelayedWork, Work, blocking, current_work, current_workqueue
from workqueue._pool import Worker

TIMEOUT = 10.0


class Gate:
    """A work function that signals it started, then waits to be released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()
        self.runs = 0
        self.pending_at_start: list[bool] = []

    def __call__(self, work: Work) -> None:
        self.runs += 1
        self.pending_at_start.append(work.pending)
        self.started.set()
        assert self.release.wait(TIMEOUT)
        self.finished.set()


def in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    """Run fn() in a new thread; its result is appended to the list."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    return thread, result


def joined(thread: threading.Thread) -> None:
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"{thread.name} hung"


def held_ordered_queue(make_wq: Any) -> tuple[Any, Gate]:
    """An ordered workqueue whose running first item holds back the next ones."""
    wq = make_wq(ordered=True)
    blocker = Gate()
    wq.queue_work(Work(blocker))
    assert blocker.started.wait(TIMEOUT)
    return wq, blocker


def test_queue_work_returns_false_while_pending(make_wq: Any) -> None:
    wq, blocker = held_ordered_queue(make_wq)
    ran = []
    w = Work(lambda work: ran.append(work))
    assert wq.queue_work(w) is True
    assert w.pending and not w.running
    assert wq.queue_work(w) is False
    assert wq.queue_work_on(1, w) is False
    blocker.release.set()
    w.flush()
    assert ran == [w]
    assert not w.pending and not w.running


def test_pending_clears_before_func_so_requeue_runs_exactly_once_more(make_wq: Any) -> None:
    wq = make_wq()
    gate = Gate()
    w = Work(gate)
    assert wq.queue_work(w)
    assert gate.started.wait(TIMEOUT)
    assert w.running and not w.pending
    # Queued during the run: pending again, and further queueing coalesces.
    assert wq.queue_work(w) is True
    assert wq.queue_work(w) is False
    assert w.pending and w.running
    gate.release.set()
    w.flush()
    assert gate.runs == 2
    assert gate.pending_at_start == [False, False]
    assert w.flush() is False


def test_work_never_runs_concurrently_with_itself(make_wq: Any, topo: Any) -> None:
    wq = make_wq(max_active=8)
    lock = threading.Lock()
    state = {"active": 0, "max": 0, "runs": 0}
    first_started, release, second = (threading.Event() for _ in range(3))

    def func(work: Work) -> None:
        with lock:
            state["active"] += 1
            state["max"] = max(state["max"], state["active"])
            state["runs"] += 1
            first = state["runs"] == 1
        if first:  # the first run holds CPU 0 until released
            first_started.set()
            assert release.wait(TIMEOUT)
        else:
            second.set()
            os.sched_yield()  # give the GIL away while "active", so overlaps show
        with lock:
            state["active"] -= 1

    w = Work(func)

    def hammer() -> int:
        """Eight threads queue w from everywhere at once; how many were accepted."""
        accepted = [0] * 8
        start = threading.Barrier(8)

        def producer(p: int) -> None:
            rng = random.Random(p)
            start.wait(TIMEOUT)
            for _ in range(300):
                if rng.random() < 0.5:
                    accepted[p] += wq.queue_work(w)
                else:
                    accepted[p] += wq.queue_work_on(rng.choice(topo.possible()), w)

        threads = [threading.Thread(target=producer, args=(p,)) for p in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            joined(t)
        return sum(accepted)

    assert wq.queue_work_on(0, w) is True
    try:
        assert first_started.wait(TIMEOUT)
        # Queued on the other CPU while it runs on CPU 0: CPU 1's pool is
        # idle, yet the second run must wait for the first.
        assert wq.queue_work_on(1, w) is True
        assert not second.wait(0.2), "second run started while the first was still running"
        # Still pending: every queueing from every thread coalesces into it.
        assert hammer() == 0
        assert w.pending and w.running
    finally:
        release.set()
    assert second.wait(TIMEOUT)
    # Now free-running: whatever the producers queue runs once per acceptance,
    # never two at a time.
    accepted = hammer()
    w.flush()  # waits for the last queueing: the producers have stopped
    assert not w.pending and not w.running
    assert state["max"] == 1
    assert state["runs"] == 2 + accepted


def test_flush_returns_whether_it_waited(make_wq: Any) -> None:
    wq, blocker = held_ordered_queue(make_wq)
    gate = Gate()
    w = Work(gate)
    assert w.flush() is False  # never queued
    assert wq.queue_work(w) is True  # pending behind the blocker
    pending_flush, pending_result = in_thread(w.flush)
    pending_flush.join(0.05)
    assert pending_flush.is_alive(), "flush() of a pending item returned"
    blocker.release.set()
    assert gate.started.wait(TIMEOUT)
    running_flush, running_result = in_thread(w.flush)  # while it runs
    running_flush.join(0.05)
    assert running_flush.is_alive(), "flush() of a running item returned"
    assert pending_flush.is_alive()
    gate.release.set()
    joined(pending_flush)
    joined(running_flush)
    assert pending_result == [True]
    assert running_result == [True]
    assert w.flush() is False  # idle again


def test_flush_waits_for_the_running_instance(make_wq: Any) -> None:
    wq = make_wq()
    gate = Gate()
    w = Work(gate)
    wq.queue_work(w)
    assert gate.started.wait(TIMEOUT)
    # What the flusher saw when flush() returned: its result, and whether
    # the run had finished by then.
    flusher, result = in_thread(lambda: (w.flush(), gate.finished.is_set()))
    flusher.join(0.05)
    assert flusher.is_alive(), "flush() returned while the item was running"
    gate.release.set()
    joined(flusher)
    assert result == [(True, True)]


def test_flush_of_the_running_instance_does_not_wait_for_a_later_queueing(
        make_wq: Any) -> None:
    """flush_work() waits for the instance there was when it was called:
    queued again meanwhile, the item's next run does not hold it up."""
    wq = make_wq()
    first, second = Gate(), Gate()
    w = Work(lambda work: (first if not first.started.is_set() else second)(work))
    wq.queue_work(w)
    assert first.started.wait(TIMEOUT)
    flusher, result = in_thread(w.flush)
    try:
        wait_until(lambda: w._flushers)  # it waits for the running instance
        assert wq.queue_work(w) is True  # queued again while it runs
        first.release.set()
        joined(flusher)  # with the first run, the second one still held
        assert result == [True]
        assert not second.finished.is_set()
    finally:
        first.release.set()
        second.release.set()
    w.flush()
    assert second.finished.is_set()


def test_cancel_returns_true_only_for_a_pending_item(make_wq: Any) -> None:
    wq, blocker = held_ordered_queue(make_wq)
    ran: list[int] = []
    w = Work(lambda work: ran.append(1))
    assert w.cancel() is False
    wq.queue_work(w)
    assert w.cancel() is True
    assert not w.pending
    assert w.cancel() is False
    # It can be queued again, and then runs once.
    assert wq.queue_work(w) is True
    blocker.release.set()
    wq.flush()
    assert ran == [1]


def test_cancel_of_a_running_item_does_not_wait(make_wq: Any) -> None:
    wq = make_wq()
    gate = Gate()
    w = Work(gate)
    wq.queue_work(w)
    assert gate.started.wait(TIMEOUT)
    assert w.cancel() is False
    assert w.running
    gate.release.set()
    w.flush()


def test_cancel_sync_leaves_item_neither_pending_nor_running(make_wq: Any) -> None:
    wq = make_wq()
    gate = Gate()
    w = Work(gate)
    wq.queue_work(w)
    assert gate.started.wait(TIMEOUT)
    wq.queue_work(w)  # pending behind its own run
    result: list[bool] = []
    canceller = threading.Thread(target=lambda: result.append(w.cancel_sync()))
    canceller.start()
    # While cancel_sync waits, the item cannot be queued again.
    wait_until(lambda: w.disabled)
    assert wq.queue_work(w) is False
    gate.release.set()
    canceller.join(TIMEOUT)
    assert result == [True]
    assert not w.pending and not w.running and not w.disabled
    assert gate.runs == 1
    assert w.cancel_sync() is False
    assert wq.queue_work(w) is True  # usable again afterwards
    w.flush()
    assert gate.runs == 2


def test_cancel_sync_refuses_self_requeue_while_waiting(make_wq: Any) -> None:
    wq = make_wq()
    started = threading.Event()
    release = threading.Event()
    requeued: list[bool] = []

    def func(work: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)
        requeued.append(wq.queue_work(work))

    w = Work(func)
    wq.queue_work(w)
    assert started.wait(TIMEOUT)
    canceller = threading.Thread(target=w.cancel_sync)
    canceller.start()
    wait_until(lambda: w.disabled)  # cancel_sync has disabled it: it is waiting
    release.set()
    canceller.join(TIMEOUT)
    assert requeued == [False]
    assert not w.pending and not w.running


def test_enable_while_cancel_sync_waits_is_still_unbalanced(make_wq: Any) -> None:
    """cancel_sync() disables the item while it waits; that hold is not
    the caller's to enable() (the kernel never lets the count go below 0)."""
    wq = make_wq()
    gate = Gate()
    w = Work(gate)
    wq.queue_work(w)
    assert gate.started.wait(TIMEOUT)
    canceller = threading.Thread(target=w.cancel_sync)
    canceller.start()
    wait_until(lambda: w.disabled)  # cancel_sync holds it
    with pytest.raises(RuntimeError, match="not disabled"):
        w.enable()
    assert wq.queue_work(w) is False  # refused while cancel_sync waits
    # The caller's own disable() nests apart from the hold: undoing it
    # leaves no disable of the caller's, which enable() says.
    assert w.disable() is False
    assert w.enable() is True
    assert w.disabled  # the hold is still there
    gate.release.set()
    canceller.join(TIMEOUT)
    assert not w.disabled
    assert wq.queue_work(w) is True
    w.flush()
    assert gate.runs == 2


def test_the_wait_of_a_cancel_sync_completes_and_drops_its_hold_once() -> None:
    """Completing is idempotent, as for every Completion: a loop that
    completes flushes and that Ctrl-C cut short runs again (see
    _pool.settle), and the hold must not go twice."""
    from workqueue._work import _CANCEL_HOLD, _CancelSync

    w = Work(lambda work: None)
    w.disable()
    hold = _CancelSync(w)
    w._disable += _CANCEL_HOLD  # as Work._start_flush adds it
    hold.complete()
    hold.complete()
    assert hold.wait(0) and w._disable == 1 and w.enable() is True


def test_an_int_subclass_is_a_cpu_number(make_wq: Any) -> None:
    class Cpu(enum.IntEnum):
        FIRST = 0

    wq = make_wq()
    ran = threading.Event()
    assert wq.queue_work_on(Cpu.FIRST, Work(lambda work: ran.set())) is True
    assert ran.wait(TIMEOUT)
    # But True and 1.0, which find CPU 1 in a dict, are no CPU numbers.
    w = Work(lambda work: None)
    for cpu in (True, 1.0):
        with pytest.raises(TypeError, match="CPU number must be an int"):
            wq.queue_work_on(cpu, w)
    assert not w.pending


def test_flush_and_cancel_sync_from_own_function_raise(make_wq: Any) -> None:
    wq = make_wq()
    errors: list[str] = []

    def func(work: Work) -> None:
        wq.queue_work(work)  # pending: a flush would wait for ourselves
        for op in (work.flush, work.cancel_sync):
            try:
                op()
            except RuntimeError as exc:
                errors.append(str(exc))
        work.cancel()

    w = Work(func)
    wq.queue_work(w)
    wq.flush()
    assert len(errors) == 2
    assert "flush()" in errors[0] and "deadlock" in errors[0]
    assert "cancel_sync()" in errors[1]


def test_an_item_may_wait_for_another_running_item(make_wq: Any) -> None:
    """Only a wait for the caller's own item is refused: an item's function
    may flush, cancel_sync() or disable_sync() another item running on
    another worker, and waits for that run."""
    wq = make_wq()
    other = Gate()
    a = Work(other)
    assert wq.queue_work_on(0, a)
    assert other.started.wait(TIMEOUT)
    outcomes: list[tuple[str, object]] = []
    lock = threading.Lock()

    def waiter(op: str) -> Any:
        def func(work: Work) -> None:
            try:
                outcome: object = getattr(a, op)(timeout=TIMEOUT)
            except RuntimeError as exc:
                outcome = exc
            with lock:
                outcomes.append((op, outcome))
        return func

    ops = ("flush", "cancel_sync", "disable_sync")
    for op in ops:
        assert wq.queue_work_on(1, Work(waiter(op)))
    try:
        # Each wait registered on a's run (or, refused, over) before a ends.
        wait_until(lambda: len(a._flushers or ()) + len(outcomes) == len(ops),
                   "the three waits are registered")
    finally:
        other.release.set()
    wq.flush(timeout=TIMEOUT)
    assert sorted(outcomes, key=lambda o: ops.index(o[0])) == [
        ("flush", True), ("cancel_sync", False), ("disable_sync", False)], outcomes
    assert a.disabled and a.enable() is True


def test_disable_enable_counter_and_return_values(make_wq: Any) -> None:
    wq, blocker = held_ordered_queue(make_wq)
    ran: list[int] = []
    w = Work(lambda work: ran.append(1))
    wq.queue_work(w)
    assert w.disable() is True       # cancelled the pending item
    assert w.disable() is False      # nothing pending; count is 2
    assert w.disabled and not w.pending
    assert wq.queue_work(w) is False
    assert w.enable() is False       # count 1
    assert wq.queue_work(w) is False
    assert w.enable() is True        # count 0
    with pytest.raises(RuntimeError, match="not disabled"):
        w.enable()
    assert wq.queue_work(w) is True
    blocker.release.set()
    wq.flush()
    assert ran == [1]


def test_repr_says_pending_running_disabled_and_cancelling(make_wq: Any) -> None:
    """repr() shows the item's state: the caller's disable count apart
    from a cancel_sync()'s hold, which shows as cancelling."""
    wq = make_wq()
    gate = Gate()
    w = Work(gate)
    assert not any(s in repr(w) for s in ("pending", "running", "disabled", "cancelling"))
    wq.queue_work(w)
    assert gate.started.wait(TIMEOUT)
    assert repr(w).endswith(" running>"), repr(w)
    wq.queue_work(w)
    assert repr(w).endswith(" pending running>"), repr(w)
    canceller = threading.Thread(target=w.cancel_sync)
    canceller.start()
    wait_until(lambda: w.disabled)
    assert repr(w).endswith(" running cancelling>"), repr(w)
    w.disable()
    w.disable()
    assert repr(w).endswith(" running disabled=2 cancelling>"), repr(w)
    gate.release.set()
    joined(canceller)
    assert repr(w).endswith(" disabled=2>"), repr(w)


def test_disable_sync_waits_for_the_running_instance(make_wq: Any) -> None:
    wq = make_wq()
    gate = Gate()
    w = Work(gate)
    wq.queue_work(w)
    assert gate.started.wait(TIMEOUT)
    done: list[bool] = []
    t = threading.Thread(target=lambda: done.append(w.disable_sync()))
    t.start()
    wait_until(lambda: w.disabled)
    assert t.is_alive() and w.running  # disabled, and waiting for the run to end
    gate.release.set()
    t.join(TIMEOUT)
    assert done == [False]
    assert not w.running and w.disabled
    assert w.enable() is True


def test_an_item_may_cancel_and_disable_itself_without_waiting(make_wq: Any) -> None:
    """cancel() and disable() wait for nothing, so an item's own function
    may call them, as the kernel's may (the waiting ones would deadlock)."""
    wq = make_wq()
    results: list[bool] = []

    def func(work: Work) -> None:
        results.append(wq.queue_work(work))  # pending again behind its own run
        results.append(work.cancel())
        results.append(wq.queue_work(work))
        results.append(work.disable())
        with pytest.raises(RuntimeError, match="would deadlock"):
            work.disable_sync()

    w = Work(func)
    assert wq.queue_work(w)
    w.flush(timeout=TIMEOUT)
    assert results == [True, True, True, True]
    assert not w.pending and w.disabled
    assert w.enable() is True  # the refused disable_sync() took none


def test_current_work_is_the_running_item(make_wq: Any) -> None:
    wq = make_wq()
    seen: list[Any] = []
    w = Work(lambda work: seen.append(current_work()))
    assert current_work() is None
    wq.queue_work(w)
    w.flush()
    assert seen == [w]


def test_current_workqueue_is_the_running_item_s(make_wq: Any) -> None:
    """The workqueue of the item the thread runs, for as long as it runs
    it: inside blocking(), and while it waits for an item of another
    workqueue (which runs on a thread of its own, and sees its own);
    a Future's function is an item of the workqueue it was submitted to."""
    wq, other = make_wq("mine"), make_wq("other")
    seen: dict[str, Any] = {}

    def inner(work: Work) -> None:
        seen["inner"] = current_workqueue()

    def outer(work: Work) -> None:
        seen["outer"] = current_workqueue()
        with blocking():
            seen["blocking"] = current_workqueue()
        w = Work(inner)
        other.queue_work(w)
        w.flush(timeout=TIMEOUT)
        seen["after"] = current_workqueue()

    assert current_workqueue() is None
    w = Work(outer)
    wq.queue_work(w)
    w.flush(timeout=TIMEOUT)
    assert seen == {"outer": wq, "blocking": wq, "inner": other, "after": wq}
    assert wq.submit(current_workqueue).result(TIMEOUT) is wq
    assert current_workqueue() is None


def test_current_workqueue_of_an_item_queued_again_elsewhere_while_it_runs(
        make_wq: Any) -> None:
    """Queued on another workqueue while it runs, the item still runs as
    the first one's (whose flush waits for it): the pending queueing
    answers only when it runs."""
    a, b = make_wq("a"), make_wq("b")
    seen: list[Any] = []

    def func(work: Work) -> None:
        seen.append(current_workqueue())
        if len(seen) == 1:
            b.queue_work(work)
            seen.append(current_workqueue())

    w = Work(func)
    a.queue_work(w)
    wait_until(lambda: len(seen) == 3, "the item ran again on b")
    assert seen == [a, a, b]


def test_an_item_of_another_workqueue_is_not_chained(make_wq: Any) -> None:
    """A draining workqueue takes only its own items' queueings: one from
    an item of another workqueue is refused, as from any thread."""
    wq, other = make_wq("draining"), make_wq("other")
    release, started = threading.Event(), threading.Event()

    def gate(work: Work) -> None:
        started.set()
        with blocking():  # else the foreign item may wait for its CPU's pool
            assert release.wait(TIMEOUT)

    refused: list[BaseException] = []

    def foreign(work: Work) -> None:
        try:
            wq.queue_work(Work(lambda w: None))
        except RuntimeError as exc:
            refused.append(exc)

    wq.queue_work(Work(gate))
    assert started.wait(TIMEOUT)
    drainer = threading.Thread(target=wq.drain)
    drainer.start()
    try:
        wait_until(lambda: wq._state != 0, "the drain started")
        f = Work(foreign)
        other.queue_work(f)
        f.flush(timeout=TIMEOUT)
    finally:
        release.set()
        drainer.join(TIMEOUT)
    assert not drainer.is_alive()
    assert len(refused) == 1 and "draining" in str(refused[0])


def test_current_workqueue_in_a_trace_hook_on_the_worker(make_wq: Any) -> None:
    """A trace hook runs on the worker at an item's start, the item then
    the thread's, and at its end, when the worker runs none."""
    wq = make_wq("traced")
    seen: list[tuple[str, Any]] = []

    def hook(event: str, work: Any, cpu: int | None) -> None:
        if event.startswith("execute"):
            seen.append((event, current_workqueue()))

    wq.add_trace_hook(hook)
    w = Work(lambda w: None)
    wq.queue_work(w)
    w.flush(timeout=TIMEOUT)
    wait_until(lambda: len(seen) == 2, "both execute events")
    assert seen == [("execute_start", wq), ("execute_end", None)]


def test_current_workqueue_is_exported() -> None:
    assert "current_workqueue" in workqueue.__all__
    assert workqueue.current_workqueue is current_workqueue


def test_subclass_carries_fields(make_wq: Any) -> None:
    class Conn(Work):
        def __init__(self, n: int) -> None:
            super().__init__(Conn.handle)
            self.n = n
            self.seen = 0

        def handle(self) -> None:
            self.seen = self.n

    wq = make_wq()
    c = Conn(7)
    wq.queue_work(c)
    c.flush()
    assert c.seen == 7
    assert "Conn" in repr(c)


@pytest.mark.parametrize("base", [Work, DelayedWork])
def test_a_subclass_that_skips_work_init_is_told_so(make_wq: Any, base: type[Work]) -> None:
    # Forgetting super().__init__() leaves the engine's slots unset: the
    # error names the mistake, not the first private slot queue_work reads.
    class Conn(base):  # type: ignore[valid-type,misc]
        def __init__(self) -> None:
            self.n = 1

    wq = make_wq()
    conn = Conn()
    with pytest.raises(AttributeError, match=r"Conn object was not set up as a work item: "
                       r"its __init__ must call super\(\)\.__init__\(func\)"):
        wq.queue_work(conn)
    with pytest.raises(AttributeError, match=r"^'Conn' object has no attribute 'm'$"):
        conn.m  # noqa: B018
    assert conn.n == 1 and not hasattr(conn, "m")
    assert wq.stats().queued == 0


def test_non_reentrancy_holds_across_workqueues(make_wq: Any) -> None:
    from workqueue import WQ_UNBOUND
    bound = make_wq("bound")
    unbound = make_wq("unbound", WQ_UNBOUND)
    # An idle unbound worker picks it up, but must leave it for the first run.
    assert_next_run_waits(lambda w: bound.queue_work_on(0, w), unbound.queue_work)
    unbound.flush()


def test_a_running_item_queued_for_another_cpu_goes_to_the_pool_running_it(
        make_wq: Any, tracer: Any) -> None:
    """__queue_work: an item still running on one of the workqueue's pools
    is queued there, not on the CPU asked for (queue_work_on) nor on the
    caller's (queue_work): its pool's max_active and counters take it."""
    wq = make_wq()
    other = make_wq("other")
    wq.add_trace_hook(tracer)
    gate = Gate()
    w = Work(gate)
    assert wq.queue_work_on(0, w) is True
    assert gate.started.wait(TIMEOUT)
    assert wq.queue_work_on(1, w) is True
    assert w.cancel() is True
    queued: list[bool] = []
    on_cpu1 = Work(lambda work: queued.append(wq.queue_work(w)))  # a caller on CPU 1
    other.queue_work_on(1, on_cpu1)
    on_cpu1.flush()
    assert queued == [True]
    gate.release.set()
    w.flush()
    assert tracer.cpus("queue", w) == [0, 0, 0]
    assert tracer.cpus("execute_start", w) == [0, 0]


def test_queue_work_on_an_unbound_workqueue_still_checks_the_cpu(make_wq: Any) -> None:
    """The CPU is only a hint to an unbound workqueue, but it must be one
    of the topology's: CPU 7 of two is a caller's mistake, said at once."""
    from workqueue import WQ_UNBOUND
    wq = make_wq("unbound", WQ_UNBOUND)
    ran = threading.Event()
    w = Work(lambda work: ran.set())
    with pytest.raises(ValueError, match="CPU 7"):
        wq.queue_work_on(7, w)
    with pytest.raises(TypeError):
        wq.queue_work_on("0", w)  # type: ignore[arg-type]
    assert not w.pending
    assert wq.queue_work_on(1, w) is True
    assert ran.wait(TIMEOUT)


def test_an_item_run_by_another_pools_worker_counts_as_running(make_wq: Any) -> None:
    """Handed to the worker still running it for another workqueue, the
    item runs there as the second workqueue's: its stats and dump say so."""
    from workqueue import WQ_UNBOUND
    bound = make_wq("bound")
    unbound = make_wq("unbound", WQ_UNBOUND)
    first, second = Gate(), Gate()
    w = Work(lambda work: (first if not first.started.is_set() else second)(work))
    bound.queue_work_on(0, w)
    assert first.started.wait(TIMEOUT)
    assert unbound.queue_work(w) is True
    # Dequeued by an unbound worker and handed to the one running it.
    wait_until(lambda: w._entry is not None and isinstance(w._entry.owner, Worker))
    first.release.set()
    assert second.started.wait(TIMEOUT)
    stats = unbound.stats()
    assert (stats.started, stats.completed) == (1, 0)
    assert "in-flight" in unbound.dump()
    second.release.set()
    w.flush()
    assert unbound.stats().completed == 1


def test_cancel_wakes_a_flush_waiting_for_the_pending_item(make_wq: Any) -> None:
    """flush() of a pending item waits for its run; cancelling the item
    instead ends that wait at once (the run will never come)."""
    wq, blocker = held_ordered_queue(make_wq)
    ran: list[int] = []
    w = Work(lambda work: ran.append(1))
    wq.queue_work(w)
    result: list[bool] = []
    flusher = threading.Thread(target=lambda: result.append(w.flush()), daemon=True)
    try:
        flusher.start()
        wait_until(lambda: w._flushers)  # it waits for the run
        assert w.cancel() is True
        flusher.join(TIMEOUT)
        assert not flusher.is_alive(), "flush() still waits for a cancelled item"
        assert result == [True]  # it did wait
    finally:
        blocker.release.set()
    wq.flush()
    assert ran == [] and not w.pending


@pytest.mark.parametrize("take_back", ["mod_delayed_work", "cancel, then queue again"])
def test_flush_does_not_wait_for_a_queueing_made_after_its_instance_was_taken_back(
        make_wq: Any, take_back: str) -> None:
    """flush() of an item running and pending again waits for the pending
    instance.  Taken back while the earlier run goes on and queued anew (on
    a timer an hour away here), that instance will never run: the flush
    ends with the earlier run, as Linux's flush_work does (its barrier stays
    queued when try_to_grab_pending takes the work away)."""
    wq = make_wq()
    gate = Gate()
    w = DelayedWork(gate)
    assert wq.queue_work_on(0, w) is True
    try:
        assert gate.started.wait(TIMEOUT)
        assert wq.queue_work_on(0, w) is True  # pending again behind the run
        flusher, result = in_thread(lambda: (w.flush(), gate.finished.is_set()))
        wait_until(lambda: w._flushers)  # it waits for the pending instance
        if take_back == "mod_delayed_work":
            assert wq.mod_delayed_work(w, 3600) is True
        else:
            assert w.cancel() is True
            assert wq.queue_delayed_work(w, 3600) is True
        flusher.join(0.05)
        assert flusher.is_alive(), "flush() returned while the earlier run went on"
        gate.release.set()
        flusher.join(TIMEOUT)
        assert not flusher.is_alive(), "flush() waits for the queueing made after it"
        assert result == [(True, True)] and gate.runs == 1 and w.pending
    finally:
        gate.release.set()
        w.cancel_sync()


def test_cancel_and_requeue_while_the_pool_is_busy_runs_it_once(make_wq: Any, tracer: Any) -> None:
    """Cancelled and re-queued five times while its pool is busy, the item
    leaves tombstones on the worklist; it runs once per effective queueing,
    never concurrently with itself."""
    wq = make_wq()
    wq.add_trace_hook(tracer)
    started, release = threading.Event(), threading.Event()
    lock = threading.Lock()
    running = [0]
    most = [0]
    runs = [0]

    def hog(work: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)

    def func(work: Work) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            runs[0] += 1
        with lock:
            running[0] -= 1

    w = Work(func)
    others = [Work(lambda work: None) for _ in range(5)]
    try:
        wq.queue_work_on(0, Work(hog))
        assert started.wait(TIMEOUT)
        assert wq.queue_work_on(0, w) is True
        for other in others:
            assert w.cancel() is True
            assert w.pending is False
            assert wq.queue_work_on(0, other) is True
            assert wq.queue_work_on(0, w) is True
            assert wq.queue_work_on(0, w) is False  # pending: coalesces
        assert w.pending is True
    finally:
        release.set()
    w.flush()
    wq.flush()
    assert runs[0] == 1
    assert tracer.of(w) == ["queue", "activate"] * 6 + ["execute_start", "execute_end"]
    # It ran from its last place in the queue, after the items queued
    # before that, not from one of its cancelled places.
    with tracer.cond:
        order = [work for event, work, _ in tracer.events if event == "execute_start"]
    assert order[1:] == [*others, w]
    assert runs[0] == 1
    # No tombstone is left to swallow, or duplicate, the next queueing.
    assert wq.queue_work_on(0, w) is True
    w.flush()
    assert runs[0] == 2
    assert runs[0] == 2
    assert most[0] == 1
    assert wq.stats().started == 8  # the hog, the others, and w twice


class _ValueWork(Work):
    """A Work that compares by value, as a dataclass subclass does: equal to
    any other of the same tag, and unhashable unless it says how to hash."""

    def __init__(self, tag: str, ran: list[Work]) -> None:
        super().__init__(_ValueWork.run)
        self.tag = tag
        self.ran = ran

    def run(self) -> None:
        self.ran.append(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ValueWork) and other.tag == self.tag

    __hash__ = None  # type: ignore[assignment]


class _HashedValueWork(_ValueWork):
    def __hash__(self) -> int:
        return hash(self.tag)


@pytest.mark.parametrize("kind", [_ValueWork, _HashedValueWork])
@pytest.mark.parametrize("ordered", [False, True])  # the pool's worklist, or the inactive list
def test_items_are_told_apart_by_identity_not_equality(make_wq: Any, kind: Any,
                                                       ordered: bool) -> None:
    # Subclassing is how an item carries its fields, and a dataclass
    # subclass compares by value.  A cancelled item's tombstone on its list
    # must name that item: not be refused because the item is unhashable,
    # nor make an equal item that is queued too pass for the cancelled one.
    if ordered:
        wq, blocker = held_ordered_queue(make_wq)
        queue: Any = wq.queue_work
    else:  # one item per CPU: the others wait on CPU 0's worklist
        wq = make_wq()
        blocker = Gate()
        wq.queue_work_on(0, Work(blocker))
        assert blocker.started.wait(TIMEOUT)
        queue = lambda work: wq.queue_work_on(0, work)  # noqa: E731
    ran: list[Work] = []
    kept, cancelled = kind("same", ran), kind("same", ran)
    last = threading.Event()
    try:
        assert queue(kept) and queue(cancelled)
        assert cancelled.cancel() is True
        assert not cancelled.pending and kept.pending
        assert queue(cancelled) and cancelled.cancel() is True  # again: a second tombstone
        assert queue(Work(lambda work: last.set()))  # starts after the others, in order
    finally:
        blocker.release.set()
    assert last.wait(TIMEOUT)
    wait_until(lambda: len(ran) > 0)
    assert len(ran) == 1 and ran[0] is kept, f"ran {ran}, not only the item kept"

