"""wq.serial(key): per-key order, one at a time, on the key's CPU."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future, as_completed, wait
from typing import Any

import pytest
from wqhelpers import assert_waits_until_released

from workqueue import WQ_FREEZABLE, Topology, Work, alloc_workqueue
from workqueue._serial import SerialExecutor, cancel_serial_calls, close_serial

TIMEOUT = 10.0


@pytest.fixture
def topo() -> Topology:
    return Topology(4)


@pytest.fixture
def wq(topo: Topology) -> Iterator[object]:
    wq = alloc_workqueue("serial-test", topology=topo)
    yield wq
    wq.destroy()


def done(*futures: Future[object]) -> None:
    finished, pending = wait(futures, timeout=TIMEOUT)
    assert not pending, f"{len(pending)} calls did not finish"


def test_one_executor_per_key(wq: object) -> None:
    a = wq.serial("a")  # type: ignore[attr-defined]
    assert isinstance(a, SerialExecutor)
    assert wq.serial("a") is a  # type: ignore[attr-defined]
    assert SerialExecutor(wq, "a") is a  # type: ignore[arg-type]
    assert wq.serial("b") is not a  # type: ignore[attr-defined]
    assert a.key == "a"
    assert "a" in repr(a)


def test_results_and_exceptions_travel_in_futures(wq: object) -> None:
    ex = wq.serial("k")  # type: ignore[attr-defined]

    def boom() -> None:
        raise ValueError("boom")

    f1 = ex.submit(pow, 2, 10)
    f2 = ex.submit(boom)
    f3 = ex.submit(lambda *, x: x + 1, x=41)
    assert f1.result(TIMEOUT) == 1024
    with pytest.raises(ValueError, match="boom"):
        f2.result(TIMEOUT)
    assert f3.result(TIMEOUT) == 42
    assert list(ex.map(abs, [-1, -2, 3], timeout=TIMEOUT)) == [1, 2, 3]


def test_calls_run_in_order_one_at_a_time_even_when_one_blocks(wq: object) -> None:
    ex = wq.serial("k")  # type: ignore[attr-defined]
    gate = threading.Event()
    entered = threading.Event()
    ran: list[int] = []
    inside = [0]

    def first() -> None:
        entered.set()
        assert gate.wait(TIMEOUT)
        ran.append(0)

    def later(i: int) -> None:
        inside[0] += 1
        assert inside[0] == 1
        ran.append(i)
        inside[0] -= 1

    futures = [ex.submit(first)] + [ex.submit(later, i) for i in range(1, 100)]
    assert entered.wait(TIMEOUT)
    assert ran == [] and ex.pending == 99  # all held behind the blocked call
    gate.set()
    done(*futures)
    for future in futures:
        future.result()
    assert ran == list(range(100))


def test_other_keys_run_while_one_key_blocks(wq: object) -> None:
    slow, fast = wq.serial("slow"), wq.serial("fast")  # type: ignore[attr-defined]
    assert slow.cpu != fast.cpu
    gate = threading.Event()
    blocked = slow.submit(gate.wait, TIMEOUT)
    try:
        assert fast.submit(lambda: "ok").result(TIMEOUT) == "ok"
        assert not blocked.done()
    finally:
        gate.set()
    assert blocked.result(TIMEOUT) is True


def test_keys_are_spread_evenly_and_run_on_their_cpu(wq: object, topo: Topology) -> None:
    executors = [wq.serial(k) for k in range(8)]  # type: ignore[attr-defined]
    assert sorted(ex.cpu for ex in executors) == [0, 0, 1, 1, 2, 2, 3, 3]
    futures = [ex.submit(topo.current_cpu) for ex in executors for _ in range(5)]
    done(*futures)
    for i, future in enumerate(futures):
        assert future.result() == executors[i // 5].cpu


def test_a_submit_from_a_call_queues_behind_the_pending_ones(wq: object) -> None:
    ex = wq.serial("k")  # type: ignore[attr-defined]
    ran: list[str] = []
    inner: list[Future[None]] = []
    gate = threading.Event()

    def outer() -> None:
        assert gate.wait(TIMEOUT)
        ran.append("outer")
        inner.append(ex.submit(ran.append, "inner"))

    first = ex.submit(outer)
    second = ex.submit(ran.append, "second")
    gate.set()
    done(first, second)
    done(inner[0])
    assert ran == ["outer", "second", "inner"]


def test_a_busy_key_does_not_starve_its_cpu_neighbour() -> None:
    topo = Topology(1)
    wq = alloc_workqueue("fair", topology=topo)
    try:
        busy, other = wq.serial("busy"), wq.serial("other")
        order: list[str] = []
        gate = threading.Event()
        first = busy.submit(gate.wait, TIMEOUT)
        futures = [busy.submit(order.append, "busy") for _ in range(1000)]
        futures.append(other.submit(order.append, "other"))
        gate.set()
        done(first, *futures)
        assert order.index("other") < 200
    finally:
        wq.destroy()


def test_shutdown_runs_a_keys_backlog_without_a_drain_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    # A key's run stops after a batch and queues itself again, to be fair
    # to its CPU's other items.  During a drain that requeueing is chained
    # queueing, which drain() counts as one more round of a work item that
    # keeps queueing itself, and warns about after ten: a plain shutdown()
    # of a key with a backlog of a few hundred calls warned of a runaway
    # chain.  While the workqueue drains, the run goes on to the end instead.
    wq = alloc_workqueue("backlog", topology=Topology(2))
    ex = wq.serial("key")
    started, gate = threading.Event(), threading.Event()
    first = ex.submit(lambda: (started.set(), gate.wait(TIMEOUT)))
    futures = [ex.submit(int) for _ in range(64 * 12)]
    assert started.wait(TIMEOUT)
    key_work = ex._work
    queueings: list[Work] = []
    wq.add_trace_hook(lambda event, work, cpu: (
        queueings.append(work) if event == "queue" and work is key_work else None))
    stopper = threading.Thread(target=wq.shutdown)
    stopper.start()
    try:
        while wq._state == 0:  # until shutdown() has started its drain
            assert stopper.is_alive(), "shutdown() returned before the key ran"
            gate.wait(0.001)
    finally:
        gate.set()
    stopper.join(TIMEOUT)
    assert not stopper.is_alive()
    assert first.done() and all(f.result() == 0 for f in futures)
    assert queueings == [], "the key queued itself again while the workqueue drained"
    assert "isn't complete" not in caplog.text


def test_cpu_down_rehomes_keys_and_keeps_their_order(wq: object, topo: Topology) -> None:
    executors = [wq.serial(k) for k in range(8)]  # type: ignore[attr-defined]
    victims = [ex for ex in executors if ex.cpu == 1]
    assert len(victims) == 2
    gate = threading.Event()
    ran: dict[int, list[int]] = {0: [], 1: []}
    futures: list[Future[object]] = []
    for v, ex in enumerate(victims):
        futures.append(ex.submit(gate.wait, TIMEOUT))
        futures += [ex.submit(ran[v].append, i) for i in range(50)]
    # cpu_down while the victims' calls are pending behind a blocked call:
    # nothing is lost, the order holds, later calls go to the new CPU.
    topo.cpu_down(1)
    new_cpus = {ex.cpu for ex in victims}
    assert 1 not in new_cpus and len(new_cpus) == 2
    gate.set()
    for v, ex in enumerate(victims):
        futures += [ex.submit(ran[v].append, i) for i in range(50, 100)]
    done(*futures)
    assert ran == {0: list(range(100)), 1: list(range(100))}
    # A run that set its last future may still be ending on the old pool,
    # and non-reentrancy would queue the next run there: let it end.
    for ex in victims:
        ex._work.flush()
    where = [ex.submit(topo.current_cpu) for ex in victims]
    done(*where)
    assert [f.result() for f in where] == [ex.cpu for ex in victims]
    # A new key goes to the least-loaded online CPU, never the offline one.
    assert wq.serial("new").cpu != 1  # type: ignore[attr-defined]
    topo.cpu_up(1)
    assert wq.serial("newer").cpu == 1  # type: ignore[attr-defined]


def test_shutdown_waits_and_refuses_new_calls(wq: object) -> None:
    ex = wq.serial("k")  # type: ignore[attr-defined]
    gate = threading.Event()
    ran: list[int] = []
    ex.submit(gate.wait, TIMEOUT)
    for i in range(20):
        ex.submit(ran.append, i)
    result: list[list[int]] = []

    def shutdown() -> None:
        ex.shutdown(wait=True)
        result.append(list(ran))  # what had run when it returned

    assert_waits_until_released(shutdown, gate, "shutdown(wait=True) with calls pending")
    assert result == [list(range(20))]
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(ran.append, 99)
    ex.shutdown()  # idempotent
    assert "shut down" in repr(ex)
    fresh = wq.serial("k")  # type: ignore[attr-defined]
    assert fresh is not ex and f"cpu {fresh.cpu}" in repr(fresh)
    assert fresh.submit(lambda: 7).result(TIMEOUT) == 7
    # Once more, now that the key has a new executor: it stays the key's.
    ex.shutdown()
    assert wq.serial("k") is fresh  # type: ignore[attr-defined]
    assert fresh.submit(lambda: 8).result(TIMEOUT) == 8


def test_shutdown_waits_for_the_call_running_when_none_is_pending(wq: object) -> None:
    ex = wq.serial("k")  # type: ignore[attr-defined]
    gate = threading.Event()
    running = submit_held(ex, gate)
    assert ex.pending == 0
    assert_waits_until_released(ex.shutdown, gate, "shutdown(wait=True) with a call running")
    assert running.done()


def test_shutdown_waits_for_a_call_whose_submit_has_not_queued_the_key_yet(
        wq: Any) -> None:
    """A submit() in another thread has put its call on the key's list and
    not yet queued the key's Work: shutdown(wait=True) waits for that call
    too, although no run of the key is pending or running yet."""
    ex = wq.serial("k")
    appended, release = threading.Event(), threading.Event()
    real_queue_work_on = wq.queue_work_on

    def queue_work_on(cpu: int, work: Any) -> bool:
        appended.set()
        assert release.wait(TIMEOUT)
        return real_queue_work_on(cpu, work)  # type: ignore[no-any-return]

    wq.queue_work_on = queue_work_on
    submitted: list[Future[int]] = []
    submitter = threading.Thread(target=lambda: submitted.append(ex.submit(int, 5)))
    try:
        submitter.start()
        assert appended.wait(TIMEOUT)
        assert ex.pending == 1 and not ex._work.pending and not ex._work.running
        assert_waits_until_released(ex.shutdown, release, "shutdown(wait=True)")
    finally:
        release.set()
        submitter.join(TIMEOUT)
        del wq.queue_work_on
    assert submitted[0].done() and submitted[0].result() == 5


def test_calls_submitted_while_the_key_runs_need_no_run_each(wq: object) -> None:
    """The calls that pile up behind a running call are taken by that same
    run, in one go: the key's Work is queued again once for all of them,
    not once per call."""
    ex = wq.serial("k")  # type: ignore[attr-defined]
    gate = threading.Event()
    running = submit_held(ex, gate)
    ran: list[int] = []
    futures = [ex.submit(ran.append, i) for i in range(20)]
    key_work = ex._work
    queueings: list[Work] = []
    wq.add_trace_hook(lambda event, work, cpu: (  # type: ignore[attr-defined]
        queueings.append(work) if event == "queue" and work is key_work else None))
    gate.set()
    done(running, *futures)
    key_work.flush()
    assert ran == list(range(20))
    assert queueings == [], f"the key was queued {len(queueings)} more times"


def submit_held(ex: Any, gate: threading.Event) -> Future[str]:
    """Submit to ``ex`` a call that holds its key until ``gate`` is set
    (then returns "first"); return once it runs."""
    entered = threading.Event()

    def first() -> str:
        entered.set()
        assert gate.wait(TIMEOUT)
        return "first"

    running: Future[str] = ex.submit(first)
    assert entered.wait(TIMEOUT)
    return running


def test_shutdown_cancel_futures_cancels_what_has_not_started(wq: object) -> None:
    ex = wq.serial("k")  # type: ignore[attr-defined]
    gate = threading.Event()
    running = submit_held(ex, gate)
    queued = [ex.submit(lambda: "never") for _ in range(10)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    gate.set()
    assert running.result(TIMEOUT) == "first"
    for future in queued:
        with pytest.raises(CancelledError):
            future.result(0)


@pytest.mark.parametrize("how", ["shutdown", "cancel_serial_calls"])
def test_cancelling_a_keys_calls_as_its_run_takes_them(wq: object, how: str) -> None:
    """The key's run takes calls off its list while shutdown() cancels them
    (here in a done-callback of the first one cancelled, as another CPU
    does at any time): each call is run or cancelled, and the shutdown
    goes on (walking the list itself, it failed: the deque mutated).
    The count is of the calls cancelled, not of those that ran."""
    ex = wq.serial("k")  # type: ignore[attr-defined]
    gate, second_gate = threading.Event(), threading.Event()
    second_started = threading.Event()
    submit_held(ex, gate)
    first = ex.submit(lambda: "never")
    second = ex.submit(lambda: (second_started.set(), second_gate.wait(TIMEOUT)))
    third = ex.submit(lambda: "never")

    def let_the_run_take_the_next_calls(_f: Future[Any]) -> None:
        gate.set()
        assert second_started.wait(TIMEOUT)  # first taken and skipped, second taken

    first.add_done_callback(let_the_run_take_the_next_calls)
    try:
        if how == "shutdown":
            ex.shutdown(wait=False, cancel_futures=True)
        else:
            assert cancel_serial_calls(wq) == 2  # type: ignore[arg-type]
        assert first.cancelled() and not second.cancelled() and third.cancelled()
    finally:
        gate.set()
        second_gate.set()
    assert second.result(TIMEOUT) == (None, True)


def test_cancel_serial_calls_counts_the_calls_it_cancelled(wq: object) -> None:
    ex = wq.serial("k")  # type: ignore[attr-defined]
    gate = threading.Event()
    submit_held(ex, gate)
    queued = [ex.submit(lambda: "never") for _ in range(3)]
    try:
        assert queued[1].cancel()
        assert cancel_serial_calls(wq) == 2  # type: ignore[arg-type]
        assert cancel_serial_calls(wq) == 0  # type: ignore[arg-type]
        assert all(f.cancelled() for f in queued)
    finally:
        gate.set()


def test_workqueue_shutdown_cancel_futures_cancels_the_serial_calls_too(topo: Topology) -> None:
    """wq.shutdown(cancel_futures=True) cancels every call submitted to the
    workqueue that has not started, those of its serial executors included
    (also of one already shut down without waiting), as
    ThreadPoolExecutor.shutdown does with all it was given."""
    wq = alloc_workqueue("serial-cancel", topology=topo)
    gate = threading.Event()
    ex = wq.serial("k")
    running = submit_held(ex, gate)
    queued = [ex.submit(lambda: "never") for _ in range(3)]
    retired = wq.serial("r")
    retired.submit(gate.wait, TIMEOUT)  # holds its key's Work too
    queued += [retired.submit(lambda: "never") for _ in range(3)]
    retired.shutdown(wait=False)
    stopper = threading.Thread(target=lambda: wq.shutdown(wait=True, cancel_futures=True))
    stopper.start()
    try:
        for future in queued:
            with pytest.raises(CancelledError):
                future.result(TIMEOUT)
    finally:
        gate.set()
    stopper.join(TIMEOUT)
    assert not stopper.is_alive()
    assert running.result(TIMEOUT) == "first"


def test_workqueue_shutdown_cancel_futures_leaves_another_workqueues_serial_calls(
        topo: Topology) -> None:
    """Another workqueue of the same topology shares the pools, and a key
    of its runs on a worker of a pool ours uses: its waiting calls are
    not ours to cancel."""
    wq = alloc_workqueue("serial-cancel", topology=topo)
    other = alloc_workqueue("serial-other", topology=topo)
    gate = threading.Event()
    try:
        ex = other.serial("k")
        running = submit_held(ex, gate)
        waiting = ex.submit(lambda: "ran")
        wq.shutdown(wait=True, cancel_futures=True)
        assert not waiting.cancelled()
    finally:
        gate.set()
    assert running.result(TIMEOUT) == "first" and waiting.result(TIMEOUT) == "ran"
    other.destroy()


def test_workqueue_shutdown_refuses_the_serial_calls_too(topo: Topology) -> None:
    """Once wq.shutdown() has started, its serial executors refuse new calls
    as wq.submit() does, whether or not the key's Work is pending (a pending
    one would have taken the call in without queueing anything)."""
    wq = alloc_workqueue("serial-refuse", topology=topo)
    gate = threading.Event()
    ex = wq.serial("k")
    running = submit_held(ex, gate)
    queued = ex.submit(lambda: "queued")  # the key's Work is pending again
    wq.shutdown(wait=False)
    try:
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit(lambda: "too late")
        with pytest.raises(RuntimeError, match="after shutdown"):
            wq.serial("idle").submit(lambda: "too late")
    finally:
        gate.set()
    assert running.result(TIMEOUT) == "first"
    assert queued.result(TIMEOUT) == "queued"
    assert wq._destroyed.wait(TIMEOUT)


def test_shutdown_releases_the_keys_cpu_slot(wq: object) -> None:
    executors = [wq.serial(k) for k in range(4)]  # type: ignore[attr-defined]
    on_cpu2 = next(ex for ex in executors if ex.cpu == 2)
    on_cpu2.shutdown()
    assert wq.serial("next").cpu == 2  # type: ignore[attr-defined]


def test_shutdown_wait_from_its_own_call_is_an_error(wq: object) -> None:
    ex = wq.serial("k")  # type: ignore[attr-defined]
    future = ex.submit(lambda: ex.shutdown(wait=True))
    with pytest.raises(RuntimeError, match="deadlock"):
        future.result(TIMEOUT)
    # Refused before anything changed: the executor is not shut down.
    assert ex.submit(lambda: "open").result(TIMEOUT) == "open"
    assert wq.serial("k") is ex  # type: ignore[attr-defined]
    ex.shutdown()


def test_shutdown_without_waiting_from_its_own_call_is_allowed(wq: object) -> None:
    ex = wq.serial("k")  # type: ignore[attr-defined]
    gate = threading.Event()
    running = submit_held(ex, gate)
    queued = ex.submit(lambda: "queued")
    stopping = ex.submit(lambda: ex.shutdown(wait=False))
    gate.set()
    assert stopping.result(TIMEOUT) is None
    assert running.result(TIMEOUT) == "first" and queued.result(TIMEOUT) == "queued"
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(int)
    assert wq.serial("k") is not ex  # type: ignore[attr-defined]


def test_with_block_shuts_down(wq: object) -> None:
    ran: list[int] = []
    with wq.serial("k") as ex:  # type: ignore[attr-defined]
        for i in range(10):
            ex.submit(ran.append, i)
    assert ran == list(range(10))
    with pytest.raises(RuntimeError):
        ex.submit(ran.append, 10)


def test_bad_input(wq: object) -> None:
    with pytest.raises(TypeError):
        wq.serial(["unhashable"])  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="callable"):
        wq.serial("k").submit(42)  # type: ignore[attr-defined]


def test_submit_to_a_destroyed_workqueue_fails_cleanly() -> None:
    wq = alloc_workqueue("gone", topology=Topology(2))
    ex = wq.serial("k")
    assert ex.submit(lambda: 1).result(TIMEOUT) == 1
    wq.destroy()
    with pytest.raises(RuntimeError):
        ex.submit(lambda: 2)
    assert ex.pending == 0


def test_serial_of_a_destroyed_workqueue_is_refused() -> None:
    topo = Topology(2)
    never_used = alloc_workqueue("never-used", topology=topo)
    never_used.destroy()
    notifiers = len(topo._notifiers)
    with pytest.raises(RuntimeError, match="destroyed"):
        never_used.serial("k")
    assert len(topo._notifiers) == notifiers  # no LoadIndex registered for it


def test_asyncio_run_in_executor(wq: object) -> None:
    ex = wq.serial("k")  # type: ignore[attr-defined]

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(ex, abs, -i) for i in range(5))))

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]


def test_wait_and_as_completed_never_miss_a_future_finishing_under_them(wq: object) -> None:
    # wait() reads each future's state twice under its condition; a future
    # finishing between the two reads must still be counted exactly once.
    # Each round races the waiter against calls finishing on four CPUs.
    executors = [wq.serial(k) for k in range(16)]  # type: ignore[attr-defined]
    for round_ in range(40):
        futures = [ex.submit(abs, -i) for i in range(25) for ex in executors]
        if round_ % 2:
            finished, pending = wait(futures, timeout=TIMEOUT)
            assert not pending and len(finished) == len(futures)
        else:
            assert len(list(as_completed(futures, timeout=TIMEOUT))) == len(futures)
        assert all(f.done() for f in futures)


def test_cancel_races_start_exactly_once(wq: object) -> None:
    # Every future ends either cancelled or run, never both, never neither.
    ex = wq.serial("k")  # type: ignore[attr-defined]
    ran: list[int] = []
    futures = [ex.submit(ran.append, i) for i in range(2000)]
    cancelled = {i for i, f in enumerate(futures) if i % 3 == 0 and f.cancel()}
    done(*futures)
    assert sorted(set(range(2000)) - cancelled) == ran
    for i, future in enumerate(futures):
        assert future.cancelled() is (i in cancelled)


def test_futures_behave_like_standard_ones(wq: object) -> None:
    ex = wq.serial("k")  # type: ignore[attr-defined]
    gate = threading.Event()
    blocker = ex.submit(gate.wait, TIMEOUT)
    ok = ex.submit(lambda: "ok")
    bad = ex.submit(lambda: 1 / 0)
    dropped = ex.submit(lambda: "never")
    seen: list[Future[object]] = []
    ok.add_done_callback(seen.append)
    assert not ok.done() and not ok.running() and dropped.cancel() and dropped.cancel()
    assert dropped.cancelled() and dropped.done()
    with pytest.raises(CancelledError):
        dropped.exception(0)
    gate.set()
    assert ok.result(TIMEOUT) == "ok" and seen == [ok]
    assert isinstance(bad.exception(TIMEOUT), ZeroDivisionError)
    assert not ok.cancel() and blocker.result(0) is True
    ok.add_done_callback(seen.append)  # already done: called at once
    assert seen == [ok, ok]
    # The run that came to the cancelled call skipped it: no call to make,
    # no failure of the key's work item.
    wq.flush(timeout=TIMEOUT)  # type: ignore[attr-defined]
    assert wq.stats().failed == 0  # type: ignore[attr-defined]


def test_close_serial_unregisters_the_keys_from_the_topology() -> None:
    topo = Topology(2)
    wq = alloc_workqueue("closing", topology=topo)
    ex = wq.serial("a")
    assert ex.cpu == 0
    wq.destroy()
    close_serial(wq)
    close_serial(wq)  # idempotent, whether or not destroy() already did it
    topo.cpu_down(0)
    assert ex.cpu == 0  # no longer re-homed: the index has left the topology
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.serial("b")


def test_a_workqueue_and_its_executors_can_be_collected() -> None:
    wq = alloc_workqueue("collected", topology=Topology(2))
    ex = wq.serial("a")
    assert ex.submit(lambda: 1).result(TIMEOUT) == 1
    refs = [weakref.ref(wq), weakref.ref(ex)]
    wq.destroy()
    del wq, ex
    gc.collect()
    assert [ref() for ref in refs] == [None, None]


def test_shutdown_racing_submitters_leaves_no_accepted_call_behind(wq: object) -> None:
    # Each submit either raises (after shutdown) or its call has run by the
    # time shutdown(wait=True) returns.
    ex = wq.serial("k")  # type: ignore[attr-defined]
    accepted: list[list[Future[None]]] = [[] for _ in range(8)]
    refused = [0] * 8
    start = threading.Barrier(9)

    def submitter(t: int) -> None:
        start.wait(TIMEOUT)
        while True:
            try:
                accepted[t].append(ex.submit(abs, -t))
            except RuntimeError:
                refused[t] += 1
                return

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    start.wait(TIMEOUT)
    while sum(map(len, accepted)) < 2000:  # let them get going
        threading.Event().wait(0.001)
    ex.shutdown(wait=True)
    for thread in threads:
        thread.join(TIMEOUT)
    assert refused == [1] * 8
    assert all(f.done() and not f.cancelled() for futures in accepted for f in futures)


def test_a_call_refused_by_a_draining_queue_but_taken_by_the_keys_run_is_accepted(
        wq: Any, topo: Topology) -> None:
    """submit() appends the call, then queues the key's Work; if that is
    refused (a drain is going on) but the key's run that was still going
    took the call meanwhile, the call runs: submit() must say it was
    accepted, not raise as if it would never run."""
    ex = wq.serial("k")
    gate, hold = threading.Event(), threading.Event()
    submit_held(ex, gate)
    # Keeps the drain going once the key's run is over (on another CPU).
    wq.queue_work_on((ex.cpu + 1) % len(topo.possible()), Work(lambda w: hold.wait(TIMEOUT)))
    drainer = threading.Thread(target=wq.drain, daemon=True)
    drainer.start()
    tick = threading.Event()
    for _ in range(int(TIMEOUT / 0.001)):
        if wq._state:  # draining
            break
        tick.wait(0.001)
    second_ran = threading.Event()
    real_queue_work_on = wq.queue_work_on

    def queue_work_on(cpu: int, work: Any) -> bool:
        # The held call ends and the key's run takes ours before the
        # queueing is refused.
        gate.set()
        assert second_ran.wait(TIMEOUT)
        return real_queue_work_on(cpu, work)  # type: ignore[no-any-return]

    wq.queue_work_on = queue_work_on
    try:
        second = ex.submit(second_ran.set)
    finally:
        del wq.queue_work_on
        gate.set()
        hold.set()
        drainer.join(TIMEOUT)
    assert second.result(TIMEOUT) is None
    assert second_ran.is_set()


def test_ctrl_c_as_a_submit_queues_a_call_the_keys_run_took_is_passed_on(wq: Any) -> None:
    """Ctrl-C lands as submit() queues the key's Work, which the key's run
    that was still going has taken the call from meanwhile: the call runs,
    and the interrupt is still passed on, not swallowed as a refusal is."""
    ex = wq.serial("k")
    gate = threading.Event()
    submit_held(ex, gate)
    second_ran = threading.Event()

    def queue_work_on(cpu: int, work: Any) -> bool:
        gate.set()  # the held call ends, and the key's run takes ours
        assert second_ran.wait(TIMEOUT)
        raise KeyboardInterrupt

    wq.queue_work_on = queue_work_on
    try:
        with pytest.raises(KeyboardInterrupt):
            ex.submit(second_ran.set)
    finally:
        del wq.queue_work_on
        gate.set()
    assert second_ran.is_set() and ex.pending == 0


def test_a_call_refused_by_a_draining_queue_while_its_key_is_idle_raises(
        wq: Any, topo: Topology) -> None:
    """The other way it goes: the queueing is refused (a drain is going
    on) and no run of the key is there to take the call.  submit() takes
    it back and raises what the queueing raised: a future handed back
    for it would never be done."""
    ex = wq.serial("k")
    hold = threading.Event()
    # Keeps the drain going (on another CPU than the key's).
    wq.queue_work_on((ex.cpu + 1) % len(topo.possible()), Work(lambda w: hold.wait(TIMEOUT)))
    drainer = threading.Thread(target=wq.drain, daemon=True)
    drainer.start()
    try:
        tick = threading.Event()
        for _ in range(int(TIMEOUT / 0.001)):
            if wq._state:  # draining
                break
            tick.wait(0.001)
        assert wq._state
        with pytest.raises(RuntimeError, match="draining"):
            ex.submit(int)
        assert ex.pending == 0
    finally:
        hold.set()
        drainer.join(TIMEOUT)
    assert ex.submit(int, 7).result(TIMEOUT) == 7  # the drain over, it takes calls


def test_serial_is_typed_as_what_it_returns() -> None:
    """A type checker sees wq.serial(key).cpu, .key and .pending: the
    demo shows .cpu, and an Executor has none of them."""
    import typing

    from workqueue import Workqueue, _serial, _workqueue

    hints = typing.get_type_hints(Workqueue.serial, vars(_workqueue) | vars(_serial))
    assert hints["return"] is SerialExecutor
    # And a program can name it in its own hints.
    import workqueue

    assert workqueue.SerialExecutor is SerialExecutor and "SerialExecutor" in workqueue.__all__


def test_a_done_callback_raising_a_base_exception_strands_no_call_of_its_key(
        topo: Topology) -> None:
    """A done-callback that raises what no callback should (SystemExit:
    concurrent.futures passes on all but an Exception) fails the run of
    the key that called it, which the engine logs; the key's later calls
    still run (they stayed on its list with no run queued)."""
    wq = alloc_workqueue("serial-frozen", WQ_FREEZABLE, topology=topo)
    try:
        ex = wq.serial("k")
        wq.freeze(timeout=TIMEOUT)  # both calls wait for one run of the key
        exiting = ex.submit(lambda: "exiting")
        later = ex.submit(lambda: "later")

        def exits(_f: Future[Any]) -> None:
            raise SystemExit("a done-callback that exits")

        exiting.add_done_callback(exits)
        wq.thaw()
        assert exiting.result(TIMEOUT) == "exiting"
        assert later.result(TIMEOUT) == "later"
    finally:
        wq.thaw()
        wq.destroy(timeout=TIMEOUT)
