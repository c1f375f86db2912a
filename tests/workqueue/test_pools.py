"""Pools, CPU selection, max_active, ordered queues, concurrency management (Part 3: 3, 4, 5)."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import pytest
from wqhelpers import wait_until

import workqueue._pool as pool_module
from workqueue import (
    WQ_CPU_INTENSIVE,
    WQ_HIGHPRI,
    WQ_UNBOUND,
    Topology,
    Work,
    alloc_workqueue,
    blocking,
)
from workqueue._pool import current_worker
from workqueue._timer import armed_timers

TIMEOUT = 10.0


class Item(Work):
    """A Work with room for the test's own fields."""


def test_queue_work_from_a_worker_stays_on_its_cpu(make_wq: Any, tracer: Any) -> None:
    wq = make_wq()
    wq.add_trace_hook(tracer)
    inner = Work(lambda w: None)
    outer = Work(lambda w: wq.queue_work(inner))
    for cpu in (0, 1):
        wq.queue_work_on(cpu, outer)
        outer.flush()
        inner.flush()
        assert tracer.cpus("queue", inner)[-1] == cpu
        assert tracer.cpus("execute_start", inner)[-1] == cpu


def test_queue_work_from_a_thread_uses_the_cpu_it_runs_on(
        make_wq: Any, tracer: Any, can_pin: bool) -> None:
    host = sorted(os.sched_getaffinity(0))
    if not can_pin or len(host) < 2:
        pytest.skip("needs two CPUs and sched_setaffinity")
    wq = make_wq(topology=Topology())
    wq.add_trace_hook(tracer)
    w = Work(lambda work: None)
    seen = []

    def pinned_producer(cpu: int) -> None:
        os.sched_setaffinity(0, {cpu})
        wq.queue_work(w)
        w.flush()
        seen.append((cpu, tracer.cpus("queue", w)[-1]))

    for cpu in host[:2]:
        t = threading.Thread(target=pinned_producer, args=(cpu,))
        t.start()
        t.join(TIMEOUT)
    assert seen == [(cpu, cpu) for cpu in host[:2]]


def test_logical_cpus_beyond_the_host_map_onto_host_cpus_and_pin_there(
        make_wq: Any, can_pin: bool) -> None:
    topo = Topology(8)
    host = sorted(os.sched_getaffinity(0))
    assert [topo.real_cpu(c) for c in range(8)] == [
        c if c in host else host[c % len(host)] for c in range(8)]
    # A thread that is not a worker counts as the lowest logical CPU of its host CPU.
    assert topo.current_cpu() in topo.online()
    assert topo.real_cpu(topo.current_cpu()) in host
    wq = make_wq(topology=topo)
    affinity: dict[int, set[int]] = {}
    cpus: dict[int, int] = {}

    def record(work: Any) -> None:
        affinity[work.cpu] = os.sched_getaffinity(0)
        cpus[work.cpu] = topo.current_cpu()

    items = []
    for cpu in range(8):
        w = Item(record)
        w.cpu = cpu
        items.append(w)
        wq.queue_work_on(cpu, w)
    for w in items:
        w.flush()
    assert cpus == {cpu: cpu for cpu in range(8)}  # a worker is on its own CPU
    if can_pin:
        assert affinity == {cpu: {topo.real_cpu(cpu)} for cpu in range(8)}


def test_a_thread_counts_as_the_lowest_online_logical_cpu_of_its_host_cpu(
        make_wq: Any, tracer: Any, can_pin: bool) -> None:
    host = sorted(os.sched_getaffinity(0))
    if not can_pin or len(host) < 2:
        pytest.skip("needs two CPUs and sched_setaffinity")
    ncpus = 4 * len(host)
    topo = Topology(ncpus)
    wq = make_wq(topology=topo)
    wq.add_trace_hook(tracer)
    w = Work(lambda work: None)
    target = host[1]
    mapped = [c for c in range(ncpus) if topo.real_cpu(c) == target]
    assert len(mapped) >= 2
    seen: list[tuple[int, int | None]] = []

    def pinned_producer() -> None:
        os.sched_setaffinity(0, {target})
        seen.append((topo.current_cpu(), None))
        wq.queue_work(w)
        w.flush()
        seen[-1] = (seen[-1][0], tracer.cpus("queue", w)[-1])

    def run() -> None:
        t = threading.Thread(target=pinned_producer)
        t.start()
        t.join(TIMEOUT)
        assert not t.is_alive()

    run()
    topo.cpu_down(mapped[0])  # the next logical CPU of that host CPU takes over
    run()
    topo.cpu_up(mapped[0])
    run()
    assert seen == [(mapped[0], mapped[0]), (mapped[1], mapped[1]), (mapped[0], mapped[0])]


def test_current_cpu_asks_the_host_cpu_unless_the_thread_is_a_worker_of_this_topology(
        make_wq: Any, can_pin: bool) -> None:
    """A worker of another topology is any thread to this one: it is on
    the lowest online logical CPU of its host CPU, not on the number its
    own topology gave it.  A thread on a host CPU none of whose logical
    CPUs is online is on the lowest online CPU."""
    host = sorted(os.sched_getaffinity(0))
    if not can_pin or len(host) < 2:
        pytest.skip("needs two CPUs and sched_setaffinity")
    ncpus = 4 * len(host)
    topo = Topology(ncpus)
    other = Topology(ncpus)
    on_first = [c for c in range(ncpus) if topo.real_cpu(c) == host[0]]
    assert len(on_first) >= 2
    seen: list[int] = []
    w = Work(lambda work: seen.append(topo.current_cpu()))
    wq = make_wq(topology=other)
    wq.queue_work_on(on_first[1], w)  # its worker runs on host[0]
    w.flush()
    assert seen == [on_first[0]]

    for cpu in range(ncpus):
        if topo.real_cpu(cpu) == host[1]:
            topo.cpu_down(cpu)

    def pinned() -> None:
        os.sched_setaffinity(0, {host[1]})
        seen.append(topo.current_cpu())

    t = threading.Thread(target=pinned)
    t.start()
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert seen[1:] == [topo.online()[0]] and topo.online()[0] != topo.online()[-1]


def test_highpri_and_normal_pools_are_separate_and_shared_between_queues(
        make_wq: Any, topo: Any) -> None:
    a = make_wq("a")
    b = make_wq("b")
    h = make_wq("h", WQ_HIGHPRI)
    for cpu in topo.possible():
        assert a._pwqs[cpu].pool is b._pwqs[cpu].pool
        assert h._pwqs[cpu].pool is not a._pwqs[cpu].pool
    assert [p.pool for p in h.stats().pools] == ["cpu0H", "cpu1H"]
    assert [p.pool for p in a.stats().pools] == ["cpu0", "cpu1"]
    u = make_wq("u", WQ_UNBOUND)
    assert [p.pool for p in u.stats().pools] == ["unbound"]


def test_a_cpu_runs_one_item_at_a_time_unless_it_blocks(make_wq: Any) -> None:
    # The threshold is 60 s in this topology: only blocking() lets B start.
    wq = make_wq()
    a_done = threading.Event()
    b_saw_a_done: list[bool] = []
    a_started = threading.Event()
    release_a = threading.Event()

    def a(work: Work) -> None:
        a_started.set()
        assert release_a.wait(TIMEOUT)
        a_done.set()

    wq.queue_work_on(0, Work(a))
    assert a_started.wait(TIMEOUT)
    b = Work(lambda w: b_saw_a_done.append(a_done.is_set()))
    wq.queue_work_on(0, b)
    stats = wq.stats().pools[0]
    assert (stats.started, stats.nr_active, stats.nr_running) == (1, 2, 1)
    release_a.set()
    b.flush()
    assert b_saw_a_done == [True]


def test_blocking_lets_the_pool_start_the_next_item(make_wq: Any) -> None:
    wq = make_wq()
    b_ran = threading.Event()
    a_saw: list[bool] = []

    def a(work: Work) -> None:
        with blocking():
            a_saw.append(b_ran.wait(TIMEOUT))

    wq.queue_work_on(0, Work(a))
    b = Work(lambda w: b_ran.set())
    wq.queue_work_on(0, b)
    wq.flush()
    assert a_saw == [True]


@pytest.mark.parametrize("b_then", ["blocks", "ends"])
def test_blocking_starts_another_item_only_when_no_item_counts(
        make_wq: Any, b_then: str) -> None:
    """A blocks, so B starts; A comes back and counts again.  When B then
    blocks, or ends, A still runs on the CPU: C must wait for it (a pool
    wakes a worker only when nr_running drops to zero, not whenever one
    blocks; and of two counted workers, the one that finishes an item
    stops: keep_working)."""
    wq = make_wq()
    ev = {name: threading.Event() for name in (
        "a_started", "a_unblock", "a_back", "release_a",
        "b_started", "b_block", "b_blocking", "release_b", "c_started")}

    def a(work: Work) -> None:
        ev["a_started"].set()
        with blocking():
            assert ev["a_unblock"].wait(TIMEOUT)
        ev["a_back"].set()
        assert ev["release_a"].wait(TIMEOUT)  # running, and counted (60 s threshold)

    def b(work: Work) -> None:
        ev["b_started"].set()
        assert ev["b_block"].wait(TIMEOUT)
        if b_then == "ends":
            ev["b_blocking"].set()
            return
        with blocking():
            ev["b_blocking"].set()
            assert ev["release_b"].wait(TIMEOUT)

    for func in (a, b, lambda w: ev["c_started"].set()):
        wq.queue_work_on(0, Work(func))
    try:
        assert ev["a_started"].wait(TIMEOUT)
        assert ev["b_started"].wait(TIMEOUT)  # A blocked: B got a worker
        ev["a_unblock"].set()
        assert ev["a_back"].wait(TIMEOUT)
        ev["b_block"].set()
        assert ev["b_blocking"].wait(TIMEOUT)
        assert not ev["c_started"].wait(0.2), f"B {b_then}: C started while A ran, counted"
        ev["release_a"].set()
        assert ev["c_started"].wait(TIMEOUT)
    finally:
        for event in ev.values():
            event.set()
    wq.flush()


def test_blocking_outside_a_work_item_does_nothing() -> None:
    with blocking():
        pass


def test_long_item_stops_counting_after_the_threshold(make_wq: Any) -> None:
    thresh = 0.02
    topo = Topology(1, cpu_intensive_thresh=thresh)
    wq = make_wq(topology=topo)
    b_ran = threading.Event()
    times: dict[str, float] = {}

    def a(work: Work) -> None:
        worker = current_worker()
        assert worker is not None
        times["a"] = worker.start  # the engine's clock for this item
        assert b_ran.wait(TIMEOUT)  # blocks without saying so

    def b(work: Work) -> None:
        times["b"] = time.monotonic()
        b_ran.set()

    wq.queue_work(Work(a))
    wq.queue_work(Work(b))
    wq.flush()
    # Held back the threshold at least: the tick never fires early.
    assert times["b"] - times["a"] >= thresh
    assert wq.stats().pools[0].cpu_intensive == 1


def test_long_item_stops_counting_soon_after_the_threshold(make_wq: Any) -> None:
    """The other side of the bound: once over the threshold, the hog stops
    holding the CPU at the next tick, not many thresholds later (B must
    start within TIMEOUT, forty thresholds here)."""
    topo = Topology(1, cpu_intensive_thresh=0.25)
    wq = make_wq(topology=topo)
    a_started, b_ran = threading.Event(), threading.Event()
    a_saw: list[bool] = []
    wq.queue_work(Work(lambda w: (a_started.set(), a_saw.append(b_ran.wait(TIMEOUT)))))
    assert a_started.wait(TIMEOUT)  # so that queueing B is what arms the tick
    wq.queue_work(Work(lambda w: b_ran.set()))
    wq.flush()
    assert a_saw == [True]
    assert wq.stats().pools[0].cpu_intensive == 1


def test_the_tick_watches_an_item_that_started_after_it_was_armed(make_wq: Any) -> None:
    """A (counted) arms the tick for C; A blocks, so B starts; A comes
    back.  When the tick finds A over the threshold and B, younger, not
    yet, it must come again for B -- or C waits for two hogs to end."""
    thresh = 0.3
    wq = make_wq(topology=Topology(1, cpu_intensive_thresh=thresh))
    a_started, go_block, b_started, c_ran = (threading.Event() for _ in range(4))
    saw: list[bool] = []

    def a(work: Work) -> None:
        a_started.set()
        assert go_block.wait(TIMEOUT)
        with blocking():
            assert b_started.wait(TIMEOUT)
        saw.append(c_ran.wait(TIMEOUT))  # a hog again, counted

    def b(work: Work) -> None:
        b_started.set()
        saw.append(c_ran.wait(TIMEOUT))  # a hog, counted

    for func in (a, b, lambda w: c_ran.set()):
        wq.queue_work(Work(func))
    assert a_started.wait(TIMEOUT)
    # B starts some half a threshold after A, so that the tick finds B
    # young.  Not a wait for anything to happen: whatever it lasts, the
    # test holds (a longer one only makes the tick's second look needless).
    threading.Event().wait(thresh / 2)
    go_block.set()
    wq.flush()
    assert saw == [True, True]


def test_cpu_intensive_items_do_not_hold_others_back(make_wq: Any) -> None:
    hog = make_wq("hog", WQ_CPU_INTENSIVE)
    normal = make_wq("normal")
    b_ran = threading.Event()
    a_saw: list[bool] = []
    hog.queue_work_on(0, Work(lambda w: a_saw.append(b_ran.wait(TIMEOUT))))
    normal.queue_work_on(0, Work(lambda w: b_ran.set()))
    hog.flush()
    assert a_saw == [True]


def test_unbound_pool_is_not_concurrency_managed(make_wq: Any) -> None:
    wq = make_wq(flags=WQ_UNBOUND)
    barrier = threading.Barrier(3)
    ok: list[bool] = []

    def meet(work: Work) -> None:
        barrier.wait(TIMEOUT)
        ok.append(True)

    for _ in range(3):
        wq.queue_work(Work(meet))
    wq.flush()
    assert ok == [True] * 3


def test_max_active_per_cpu_fifo_and_set_max_active(make_wq: Any, tracer: Any) -> None:
    wq = make_wq(max_active=2)
    wq.add_trace_hook(tracer)
    release = threading.Event()
    started: list[int] = []
    lock = threading.Lock()

    def item(work: Any) -> None:
        with lock:
            started.append(work.n)
        with blocking():  # so that concurrency management does not limit us
            assert release.wait(TIMEOUT)

    items = []
    for n in range(6):
        w = Item(item)
        w.n = n
        items.append(w)
        wq.queue_work_on(0, w)
    tracer.wait_for(lambda: sum(e == "execute_start" for e, _, _ in tracer.events) == 2)
    pool = wq.stats().pools[0]
    assert (pool.nr_active, pool.nr_inactive) == (2, 4)
    assert wq.stats().pools[1].nr_active == 0
    wq.set_max_active(4)
    tracer.wait_for(lambda: sum(e == "execute_start" for e, _, _ in tracer.events) == 4)
    assert wq.stats().pools[0].nr_inactive == 2
    release.set()
    wq.flush()
    assert sorted(started[:2]) == [0, 1]
    assert sorted(started[2:4]) == [2, 3]
    assert sorted(started[4:]) == [4, 5]
    # Activation is FIFO: the inactive items were activated in queueing order.
    activated = [w.n for e, w, _ in tracer.events if e == "activate"]
    assert activated == list(range(6))


def test_stats_counters_agree_with_the_trace_points(make_wq: Any, tracer: Any) -> None:
    # stats() derives some counters (activated, completed) instead of
    # counting them on the hot path: they must still match the trace points
    # while items run, wait on max_active, are activated late or cancelled.
    wq = make_wq("st", max_active=2)
    wq.add_trace_hook(tracer)
    release = threading.Event()
    gate = Work(lambda w: release.wait(TIMEOUT))
    waiting, deferred, dropped = Work(lambda w: None), Work(lambda w: None), Work(lambda w: None)
    wq.queue_work_on(0, gate)
    tracer.wait_for(lambda: gate.running)
    for w in (waiting, deferred, dropped):  # waiting: on the worklist; others: inactive
        assert wq.queue_work_on(0, w)

    def check(started: int, completed: int) -> None:
        pool = wq.stats().pools[0]
        events = [e for e, _, cpu in tracer.events if cpu == 0]
        assert (pool.queued, pool.activated, pool.started, pool.completed) == (
            events.count("queue"), events.count("activate"),
            events.count("execute_start"), events.count("execute_end"))
        assert (pool.started, pool.completed) == (started, completed)

    check(started=1, completed=0)
    assert waiting.cancel()   # an active item: `deferred` is activated late
    assert dropped.cancel()   # an inactive one
    pool = wq.stats().pools[0]
    assert (pool.queued, pool.activated, pool.nr_active, pool.nr_inactive) == (4, 3, 2, 0)
    check(started=1, completed=0)
    release.set()
    wq.flush()
    check(started=2, completed=2)


def test_max_active_is_per_queue_for_unbound(make_wq: Any, topo: Any) -> None:
    wq = make_wq(flags=WQ_UNBOUND, max_active=2)
    release = threading.Event()
    lock = threading.Lock()
    state = {"active": 0, "max": 0}
    two_running = threading.Event()

    def item(work: Work) -> None:
        with lock:
            state["active"] += 1
            state["max"] = max(state["max"], state["active"])
            if state["active"] == 2:
                two_running.set()
        assert release.wait(TIMEOUT)
        with lock:
            state["active"] -= 1

    for n in range(6):
        wq.queue_work_on(n % 2, Work(item))
    assert two_running.wait(TIMEOUT)
    assert wq.stats().pools[0].nr_inactive == 4
    release.set()
    wq.flush()
    assert state["max"] == 2


def test_ordered_queue_runs_one_at_a_time_in_queueing_order(make_wq: Any, tracer: Any) -> None:
    wq = make_wq(ordered=True)
    # As the kernel's alloc_ordered_workqueue(): unbound, which it says.
    assert wq.flags & WQ_UNBOUND and wq.stats().flags & WQ_UNBOUND
    wq.add_trace_hook(tracer)
    lock = threading.Lock()
    state = {"active": 0, "max": 0}
    ran: list[Work] = []

    def item(work: Work) -> None:
        with lock:
            state["active"] += 1
            state["max"] = max(state["max"], state["active"])
        with blocking():
            ran.append(work)
        with lock:
            state["active"] -= 1

    start = threading.Barrier(4)

    def producer() -> None:
        start.wait(TIMEOUT)
        for _ in range(50):
            wq.queue_work(Work(item))

    threads = [threading.Thread(target=producer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    wq.flush()
    queued = [w for e, w, _ in tracer.events if e == "queue"]
    assert ran == queued and len(ran) == 200
    assert state["max"] == 1
    with pytest.raises(RuntimeError, match="ordered"):
        wq.set_max_active(2)


def test_destroy_releases_pools_and_their_idle_workers_exit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    failed: list[str] = []  # a worker must exit by returning, not by an exception
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: failed.append(f"{args.thread}: {args.exc_value!r}"))
    topo = Topology(2)
    a = alloc_workqueue("a", topology=topo)
    b = alloc_workqueue("b", topology=topo)
    u = alloc_workqueue("u", WQ_UNBOUND, topology=topo)
    for wq in (a, b, u):
        for cpu in (0, 1):
            wq.queue_work_on(cpu, Work(lambda w: None))
        wq.flush()
    pools = topo._pools.pools()
    threads = [w.thread for p in pools for w in p.workers]
    assert threads and all(t.is_alive() for t in threads)
    a.destroy()
    # b still uses the bound pools: none of their workers was told to exit
    # (a worker told to would be gone from its pool at once, and its thread soon).
    assert {w.thread for p in pools for w in p.workers} == set(threads)
    assert all(t.is_alive() for t in threads)
    b.destroy()
    u.destroy()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), t
    assert failed == []
    assert all(not p.workers for p in pools)
    # A new workqueue brings the pools back to life.
    c = alloc_workqueue("c", topology=topo)
    ran = threading.Event()
    w = Work(lambda w: ran.set())
    c.queue_work(w)
    assert ran.wait(TIMEOUT)
    c.destroy()


def test_a_worker_busy_when_its_pool_is_released_exits_once_done(
        make_wq: Any, topo: Any) -> None:
    """Its pool's last workqueue destroyed while it runs an item handed by
    another pool (non-reentrancy), a worker exits as soon as that item is
    done, rather than idling on a pool nobody uses; and leaves the pool,
    which counts no worker then."""
    from workqueue import WQ_UNBOUND
    bound = make_wq("bound")
    unbound = make_wq("unbound", WQ_UNBOUND)
    runs = [threading.Event(), threading.Event()]
    release = [threading.Event(), threading.Event()]
    workers: list[threading.Thread] = []

    def func(work: Work) -> None:
        n = 0 if not runs[0].is_set() else 1
        workers.append(threading.current_thread())
        runs[n].set()
        assert release[n].wait(TIMEOUT)

    w = Work(func)
    try:
        assert bound.queue_work_on(0, w) is True
        assert runs[0].wait(TIMEOUT)
        assert unbound.queue_work(w) is True
        deadline = time.monotonic() + TIMEOUT
        while not (w._entry is not None and w._entry.owner is w._worker):
            assert time.monotonic() < deadline, "not handed to the worker running it"
            runs[1].wait(0.001)  # polling: the hand-over has no event of its own
        release[0].set()
        assert runs[1].wait(TIMEOUT)  # cpu0's worker runs it for unbound
        bound.destroy()  # the cpu pools' only user
    finally:
        release[0].set()
        release[1].set()
    w.flush()
    assert workers[0] is workers[1]
    workers[0].join(TIMEOUT)
    assert not workers[0].is_alive(), "the worker lingers on a pool nobody uses"
    with pool_module.lock:
        assert not topo._pools.bound[0, False].workers


def test_a_pool_taken_up_again_while_its_last_worker_runs_a_handed_item_gets_workers(
        make_wq: Any) -> None:
    """When its last workqueue goes, a pool's idle workers exit; a worker
    still running an item another pool handed to it (non-reentrancy) stays,
    alone.  A workqueue that takes the pool up again must get a worker of
    its own while that one blocks: here the handed item waits for ours,
    which kick_pool() left unrun (no idle worker, and one busy) until the
    handed item ended -- a deadlock had it waited for good."""
    bound = make_wq("bound")
    unbound = make_wq("unbound", WQ_UNBOUND)
    started, release, handed_runs, ran = (threading.Event() for _ in range(4))
    waited: list[bool] = []

    def func(work: Work) -> None:
        if not started.is_set():
            started.set()
            assert release.wait(TIMEOUT)
        else:
            handed_runs.set()
            with blocking():
                waited.append(ran.wait(TIMEOUT))

    item = Work(func)
    bound.queue_work_on(0, item)
    assert started.wait(TIMEOUT)
    assert unbound.queue_work(item) is True
    # Dequeued by an unbound worker and handed to the CPU 0 worker running it.
    deadline = time.monotonic() + TIMEOUT
    while not (item._entry is not None and item._entry.owner is item._worker):
        assert time.monotonic() < deadline, "the item was not handed over"
        threading.Event().wait(0.001)
    release.set()
    assert handed_runs.wait(TIMEOUT)
    bound.destroy()  # CPU 0's pool loses its last user; its idle workers exit
    again = make_wq("again")
    again.queue_work_on(0, Work(lambda w: ran.set()))
    unbound.flush()
    assert waited == [True], "the pool's new user got no worker while the handed item blocked"


def test_a_pool_no_workqueue_uses_leaves_no_timer_armed(make_wq: Any) -> None:
    """Released by its last workqueue, a pool deletes its timers (the
    CPU-intensive check and the creation retry): armed, they would keep
    it, and its topology, alive until they fire, to find nothing to do."""
    topo = Topology(1, cpu_intensive_thresh=60.0)
    wq = make_wq(topology=topo)
    gate, started = threading.Event(), threading.Event()
    first = Work(lambda w: (started.set(), gate.wait(TIMEOUT)))
    assert wq.queue_work(first) is True
    assert started.wait(TIMEOUT)
    assert wq.queue_work(Work(lambda w: None)) is True  # waits: its pool's check is armed

    def pool_timers() -> list[Any]:
        return [arg for cb, arg in armed_timers()
                if isinstance(arg, pool_module.WorkerPool) and arg.pset.topology is topo]

    assert pool_timers()
    gate.set()
    wq.destroy(timeout=TIMEOUT)
    assert pool_timers() == []


def test_a_pool_taken_up_again_after_its_release_arms_its_check_again(make_wq: Any) -> None:
    """Released with its CPU-intensive check armed, a pool forgets the
    deleted timer: a workqueue taking it up again gets the check, and a
    hog stops holding back the item behind it (a deleted handle left in
    place looked armed to insert_work(), which then armed none)."""
    topo = Topology(1, cpu_intensive_thresh=60.0)
    old = make_wq("old", topology=topo)
    gate, started = threading.Event(), threading.Event()
    assert old.queue_work(Work(lambda w: (started.set(), gate.wait(TIMEOUT))))
    assert started.wait(TIMEOUT)
    assert old.queue_work(Work(lambda w: None))  # waits: its pool's check is armed
    gate.set()
    old.destroy(timeout=TIMEOUT)
    topo.cpu_intensive_thresh = 0.02
    new = make_wq("new", topology=topo)
    release, ran = threading.Event(), threading.Event()
    try:
        assert new.queue_work(Work(lambda w: release.wait(TIMEOUT)))  # blocks without saying so
        assert new.queue_work(Work(lambda w: ran.set()))
        assert ran.wait(TIMEOUT), new.dump()
    finally:
        release.set()


def test_an_item_handed_to_another_pool_s_worker_activates_the_next_in_its_own_pool(
        make_wq: Any, tracer: Any) -> None:
    """An unbound item still running on a CPU's worker is run there again
    (non-reentrancy); when that run ends, the next item of its workqueue,
    waiting for max_active, goes to the unbound pool, not to the CPU's."""
    bound = make_wq("bound")
    unbound = make_wq("unbound", WQ_UNBOUND, max_active=1)
    unbound.add_trace_hook(tracer)
    started, release = threading.Event(), threading.Event()
    item = Work(lambda w: None if started.is_set() else (started.set(), release.wait(TIMEOUT)))
    after = Work(lambda w: None)
    try:
        assert bound.queue_work_on(0, item) is True
        assert started.wait(TIMEOUT)
        assert unbound.queue_work(item) is True
        assert unbound.queue_work(after) is True  # waits for max_active
        wait_until(lambda: item._entry is not None and item._entry.owner is item._worker,
                   "the item is handed to the worker running it")
    finally:
        release.set()
    after.flush(timeout=TIMEOUT)
    assert tracer.cpus("execute_start", item) == [0]
    assert tracer.cpus("execute_start", after) == [None]


def test_a_worker_runs_the_item_handed_to_it_even_when_another_counts(make_wq: Any) -> None:
    """A worker that is not needed any more (another of its CPU counts as
    running) still runs the items handed to it first: they are on its own
    list, where no other worker looks, and would wait there until it is
    woken again, maybe never."""
    bound = make_wq("bound")
    unbound = make_wq("unbound", WQ_UNBOUND)
    b_in, b_go, b_counted, b_release = (threading.Event() for _ in range(4))
    x_started, x_release, second = (threading.Event() for _ in range(3))

    def b_func(work: Work) -> None:
        with blocking():
            b_in.set()
            assert b_go.wait(TIMEOUT)
        b_counted.set()  # counts again, beside the worker running x
        assert b_release.wait(TIMEOUT)

    def x_func(work: Work) -> None:
        if x_started.is_set():
            second.set()
        else:
            x_started.set()
            assert x_release.wait(TIMEOUT)

    x = Work(x_func)
    try:
        assert bound.queue_work_on(0, Work(b_func)) is True
        assert b_in.wait(TIMEOUT)
        assert bound.queue_work_on(0, x) is True  # on another worker: b blocks
        assert x_started.wait(TIMEOUT)
        assert unbound.queue_work(x) is True
        wait_until(lambda: x._entry is not None and x._entry.owner is x._worker,
                   "x is handed to the worker running it")
        b_go.set()
        assert b_counted.wait(TIMEOUT)
        x_release.set()
        assert second.wait(TIMEOUT), "the handed run waits on its worker's list"
    finally:
        b_go.set()
        x_release.set()
        b_release.set()


def test_a_worker_counts_again_once_its_cpu_intensive_item_is_done(make_wq: Any) -> None:
    """WORKER_CPU_INTENSIVE holds for one item: the worker that ran a
    WQ_CPU_INTENSIVE item counts toward concurrency with its next one."""
    topo = Topology(1, cpu_intensive_thresh=60.0)
    intensive = make_wq("intensive", WQ_CPU_INTENSIVE, topology=topo)
    wq = make_wq("plain", topology=topo)
    ran_on: list[Any] = []
    first = Work(lambda w: ran_on.append(current_worker()))
    intensive.queue_work(first)
    first.flush()
    started, release = threading.Event(), threading.Event()

    def holder(work: Work) -> None:
        ran_on.append(current_worker())
        started.set()
        assert release.wait(TIMEOUT)

    try:
        wq.queue_work(Work(holder))  # the most recently idle worker: the same one
        assert started.wait(TIMEOUT)
        assert ran_on[0] is ran_on[1]
        assert wq.stats().pools[0].nr_running == 1
    finally:
        release.set()


def test_a_worker_woken_when_another_counts_again_leaves_the_items_to_it(
        make_wq: Any) -> None:
    """A wake-up can be stale when its worker runs: the item that blocked
    (and made the pool wake it) may count again.  The worker then goes
    back to idle, leaving the waiting items to the one running: one item
    at a time per CPU."""
    topo = Topology(1, cpu_intensive_thresh=60.0)
    wq = make_wq(topology=topo)
    started, release, b_ran = (threading.Event() for _ in range(3))

    def holder(work: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)

    try:
        wq.queue_work(Work(holder))
        assert started.wait(TIMEOUT)
        wq.queue_work(Work(lambda w: b_ran.set()))  # waits: the holder counts
        pool = topo._pools.bound[0, False]
        with pool_module.lock:
            assert pool.nr_running == 1 and pool.idle
            pool_module.kick_pool(pool)  # as a wake-up sent before the holder counted again
        assert not b_ran.wait(0.2), "the woken worker ran an item beside the holder"
    finally:
        release.set()
    assert b_ran.wait(TIMEOUT)


def test_the_cpu_intensive_check_leaves_out_an_item_that_said_it_blocks(make_wq: Any) -> None:
    """The check counts out the items that run on beyond the threshold
    while counted; one inside blocking() does not count already, and is
    no CPU hog."""
    topo = Topology(1, cpu_intensive_thresh=0.02)
    wq = make_wq(topology=topo)
    a_in, a_go, b_started, release, c_ran = (threading.Event() for _ in range(5))

    def a(work: Work) -> None:
        with blocking():
            a_in.set()
            assert a_go.wait(TIMEOUT)

    def b(work: Work) -> None:  # hogs the CPU: blocks without saying so
        b_started.set()
        assert release.wait(TIMEOUT)

    try:
        wq.queue_work(Work(a))
        assert a_in.wait(TIMEOUT)
        wq.queue_work(Work(b))
        assert b_started.wait(TIMEOUT)
        wq.queue_work(Work(lambda w: c_ran.set()))  # waits for the check to count b out
        assert c_ran.wait(TIMEOUT)
        assert wq.stats().pools[0].cpu_intensive == 1
    finally:
        a_go.set()
        release.set()


@pytest.mark.parametrize("uncounted", ["blocks", "cpu-intensive"])
def test_the_cpu_intensive_check_is_timed_by_the_runs_that_count(
        make_wq: Any, uncounted: str) -> None:
    """The check is armed for the earliest run that still counts: one
    older, but inside blocking() or CPU-intensive already, is none of its
    business (timed by that one, the check came due at once, found
    nothing to count out, and was armed at once again: a busy loop of the
    timer thread until the counted run reached the threshold)."""
    thresh = 60.0
    topo = Topology(1, cpu_intensive_thresh=thresh)
    old = make_wq("old", WQ_CPU_INTENSIVE if uncounted == "cpu-intensive" else 0, topology=topo)
    wq = make_wq(topology=topo)
    old_in, b_started, release = (threading.Event() for _ in range(3))

    def a(work: Work) -> None:
        if uncounted == "blocks":
            with blocking():
                old_in.set()
                assert release.wait(TIMEOUT)
        else:
            old_in.set()
            assert release.wait(TIMEOUT)

    def b(work: Work) -> None:
        b_started.set()
        assert release.wait(TIMEOUT)

    pool = topo._pools.bound[0, False]
    try:
        assert old.queue_work(Work(a))
        assert old_in.wait(TIMEOUT)
        with pool_module.lock:
            (a_worker,) = pool.busy_workers()
            a_start = a_worker.start
        # A run older than b's by far more than arming a timer takes.
        wait_until(lambda: time.monotonic() - a_start >= 0.05, "the uncounted run aged")
        assert wq.queue_work(Work(b))
        assert b_started.wait(TIMEOUT)
        assert wq.queue_work(Work(lambda w: None))  # waits behind b: the check is armed
        with pool_module.lock:
            (b_worker,) = [w for w in pool.busy_workers() if w is not a_worker]
            assert pool.nr_running == 1 and pool.tick is not None, pool.dump()
            due = pool.tick.deadline
        assert due >= b_worker.start + thresh - 1e-6, (due - a_start, b_worker.start - a_start)
    finally:
        release.set()


def test_an_item_handed_to_a_worker_runs_before_the_pool_s_waiting_ones(make_wq: Any) -> None:
    """An item handed to the worker still running its previous run
    (non-reentrancy) is next on that worker: it has waited for that run
    already, and the items waiting on the pool do not overtake it."""
    bound = make_wq("bound")
    unbound = make_wq("unbound", WQ_UNBOUND)
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def x_func(work: Work) -> None:
        if started.is_set():
            order.append("x")
        else:
            started.set()
            assert release.wait(TIMEOUT)

    x = Work(x_func)
    y = Work(lambda w: order.append("y"))
    try:
        assert bound.queue_work_on(0, x) is True
        assert started.wait(TIMEOUT)
        assert unbound.queue_work(x) is True
        wait_until(lambda: x._entry is not None and x._entry.owner is x._worker,
                   "x is handed to the worker running it")
        assert bound.queue_work_on(0, y) is True  # waits: x's first run counts
    finally:
        release.set()
    x.flush(timeout=TIMEOUT)
    y.flush(timeout=TIMEOUT)
    assert order == ["x", "y"]


def test_worker_thread_names_are_unique_across_topologies(make_wq: Any) -> None:
    # Each topology has its own pools, numbered from 0: the names of their
    # workers must not repeat all the same (logs and dumps go by them).
    seen: dict[str, set[str]] = {"first": set(), "second": set()}
    for name in seen:
        wq = make_wq(name, topology=Topology(2))
        for cpu in (0, 1):
            w = Work(lambda w, name=name: seen[name].add(threading.current_thread().name))
            wq.queue_work_on(cpu, w)
            w.flush()
        workers = [w.name for p in wq.topology._pools.pools() for w in p.workers]
        assert workers and all(n.startswith("kworker/cpu") for n in workers)
        seen[name].update(workers)
    assert seen["first"] and seen["second"]
    assert not seen["first"] & seen["second"]
    alive = [t.name for t in threading.enumerate() if t.name.startswith("kworker/")]
    assert len(alive) == len(set(alive))


def test_an_exception_is_logged_with_the_item_and_the_worker_survives(
        make_wq: Any, caplog: pytest.LogCaptureFixture) -> None:
    wq = make_wq()
    threads: list[threading.Thread] = []

    def boom(work: Work) -> None:
        threads.append(threading.current_thread())
        raise ValueError("kaboom")

    w = Work(boom)
    with caplog.at_level("ERROR", logger="workqueue"):
        for _ in range(3):
            wq.queue_work_on(0, w)
            w.flush()
    assert len(threads) == 3 and len(set(threads)) == 1  # the same worker every time
    failures = [r for r in caplog.records if r.exc_info and "kaboom" in str(r.exc_info[1])]
    assert len(failures) == 3
    assert "boom" in caplog.records[0].getMessage()
    assert wq.stats().failed == 3


def test_the_exception_of_an_item_whose_repr_fails_is_logged_all_the_same(
        make_wq: Any) -> None:
    """The log is where the exception goes: a message that cannot be
    formatted (the logging module formats it late, in the handler) would
    lose it to a "Logging error" on stderr."""

    class Conn(Work):
        def __repr__(self) -> str:
            raise OSError("the socket is closed")

    def boom(work: Work) -> None:
        raise ValueError("kaboom")

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[assignment,method-assign]
    logger = logging.getLogger("workqueue")
    logger.addHandler(handler)
    try:
        w = Conn(boom)
        make_wq().queue_work(w)
        w.flush()
    finally:
        logger.removeHandler(handler)
    (record,) = records
    assert record.exc_info is not None and "kaboom" in str(record.exc_info[1])
    message = record.getMessage()
    assert "Conn object at" in message and "its repr() raised OSError" in message, message


def test_waiting_in_flush_or_result_lets_the_pool_run_the_awaited_item(make_wq: Any) -> None:
    # One CPU and a 60 s threshold: only the implicit blocking() of the
    # engine's own waits lets the awaited item start.
    wq = make_wq(topology=Topology(1, cpu_intensive_thresh=60.0))
    got: list[object] = []

    def flusher(work: Work) -> None:
        inner = Work(lambda w: got.append("inner"))
        wq.queue_work(inner)
        got.append(inner.flush())
        got.append(wq.submit(len, "abc").result(TIMEOUT))

    outer = Work(flusher)
    wq.queue_work(outer)
    outer.flush()
    assert got == ["inner", True, 3]


def test_nested_blocking_is_accounted_by_the_outermost_only(make_wq: Any) -> None:
    """Inside nested blocking() blocks the item stops counting toward its
    pool's concurrency at the outer entry and counts again only at the
    outer exit; the inner exit changes nothing."""
    wq = make_wq()
    seen: dict[str, int] = {}
    done = threading.Event()

    def nr_running() -> int:
        (cpu0,) = [p for p in wq.stats().pools if p.pool == "cpu0"]
        return cpu0.nr_running

    def func(work: Work) -> None:
        seen["before"] = nr_running()
        with blocking():
            seen["outer"] = nr_running()
            with blocking():
                seen["inner"] = nr_running()
            seen["after inner"] = nr_running()
        seen["after outer"] = nr_running()
        done.set()

    wq.queue_work_on(0, Work(func))
    assert done.wait(TIMEOUT)
    assert seen == {"before": 1, "outer": 0, "inner": 0, "after inner": 0, "after outer": 1}
    wq.flush()
    assert nr_running() == 0
