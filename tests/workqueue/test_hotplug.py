"""CPU hotplug (Part 3: 9) and the Topology contract."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from workqueue import WQ_UNBOUND, DelayedWork, LoadIndex, Topology, Work, _pool, _topology, blocking
from workqueue._timer import armed_timers, del_timer
from workqueue._watchdog import _watchdog_timer_fn

TIMEOUT = 10.0


def test_cpu_down_runs_the_waiting_items_of_that_cpu_unbound(make_wq: Any, topo: Any) -> None:
    wq = make_wq()
    release = threading.Event()
    started = threading.Event()

    def blocker(work: Work) -> None:  # holds CPU 1 without saying it blocks
        started.set()
        assert release.wait(TIMEOUT)

    wq.queue_work_on(1, Work(blocker))
    assert started.wait(TIMEOUT)
    ran = threading.Barrier(4)  # three waiting items plus this thread
    for _ in range(3):
        wq.queue_work_on(1, Work(lambda w: ran.wait(TIMEOUT)))
    assert wq.stats().pools[1].nr_running == 1
    topo.cpu_down(1)
    # Unbound now: the three run concurrently although the blocker still runs.
    ran.wait(TIMEOUT)
    stats = wq.stats().pools[1]
    assert not stats.bound and stats.nr_running == 0
    release.set()
    wq.flush()
    topo.cpu_up(1)
    assert wq.stats().pools[1].bound


def test_items_taken_while_offline_do_not_hold_back_those_queued_after_cpu_up(
        make_wq: Any, topo: Any) -> None:
    """Workers busy with items they took while their CPU was offline count
    for concurrency only from their next run loop (Linux's WORKER_REBOUND):
    an item queued once the CPU is back gets a worker at once, not after
    them (or after the CPU-intensive threshold, a minute in these tests)."""
    wq = make_wq()
    topo.cpu_down(1)
    release = threading.Event()
    started = [threading.Event(), threading.Event()]

    def holder(i: int) -> Work:
        def func(work: Work) -> None:  # holds its worker without saying it blocks
            started[i].set()
            assert release.wait(TIMEOUT)
        return Work(func)

    later = threading.Event()
    try:
        assert wq.queue_work_on(1, holder(0)) and wq.queue_work_on(1, holder(1))
        assert started[0].wait(TIMEOUT) and started[1].wait(TIMEOUT)
        topo.cpu_up(1)
        assert wq.stats().pools[1].nr_running == 0
        assert wq.queue_work_on(1, Work(lambda w: later.set()))
        assert later.wait(TIMEOUT), "held back behind the items taken while CPU 1 was offline"
    finally:
        release.set()
    wq.flush()
    # Their next run loop counts them again: one item at a time per CPU.
    gate = threading.Event()
    ran = threading.Event()
    wq.queue_work_on(1, Work(lambda w: gate.wait(TIMEOUT)))
    wq.queue_work_on(1, Work(lambda w: ran.set()))
    assert not ran.wait(0.2), "the second item ran beside the first on a bound CPU"
    gate.set()
    assert ran.wait(TIMEOUT)


def test_items_queued_on_an_offline_cpu_still_run_elsewhere(
        make_wq: Any, topo: Any, can_pin: bool) -> None:
    wq = make_wq()
    topo.cpu_down(1)
    seen: list[Any] = []
    w = Work(lambda work: seen.append((topo.current_cpu(), os.sched_getaffinity(0))))
    assert wq.queue_work_on(1, w) is True
    w.flush()
    cpu, affinity = seen[0]
    assert cpu == 0  # a worker of an offline CPU counts as where it runs
    if can_pin:
        assert affinity == {topo.real_cpu(0)}
    # queue_work() from CPU 0's worker never picks the offline CPU.
    inner = Work(lambda work: seen.append(topo.current_cpu()))
    outer = Work(lambda work: wq.queue_work(inner))
    wq.queue_work_on(1, outer)
    outer.flush()
    inner.flush()
    assert seen[-1] == 0
    topo.cpu_up(1)
    w2 = Work(lambda work: seen.append(("up", topo.current_cpu(), os.sched_getaffinity(0))))
    wq.queue_work_on(1, w2)
    w2.flush()
    assert seen[-1][:2] == ("up", 1)
    if can_pin:
        assert seen[-1][2] == {topo.real_cpu(1)}


def test_cpu_down_and_up_repin_the_workers_that_run_anywhere(
        make_wq: Any, can_pin: bool) -> None:
    """The workers of the unbound pool, and of the pool of a CPU already
    offline, run on the online CPUs: a CPU that goes or comes back changes
    where they may run, not only the workers of its own pools."""
    host = sorted(os.sched_getaffinity(0))
    if not can_pin or len(host) < 2:
        pytest.skip("needs two host CPUs and the right to pin")
    topo = Topology(3, cpu_intensive_thresh=60.0)  # CPU 2 shares host[0] with CPU 0
    bound = make_wq("bound", topology=topo)
    unbound = make_wq("unbound", WQ_UNBOUND, topology=topo)
    topo.cpu_down(2)
    for wq, cpu in ((bound, 2), (unbound, 0)):
        w = Work(lambda work: None)
        assert wq.queue_work_on(cpu, w) is True
        w.flush()

    def affinities() -> dict[str, set[frozenset[int]]]:
        with _pool.lock:
            pools = {pool.name: list(pool.workers) for pool in topo._pools.pools()
                     if pool.name in ("cpu2", "unbound")}
        return {name: {frozenset(os.sched_getaffinity(w.thread.native_id)) for w in workers}
                for name, workers in pools.items()}

    both = {frozenset({topo.real_cpu(0), topo.real_cpu(1)})}
    assert affinities() == {"cpu2": both, "unbound": both}
    topo.cpu_down(1)
    cpu0 = {frozenset({topo.real_cpu(0)})}
    assert affinities() == {"cpu2": cpu0, "unbound": cpu0}
    topo.cpu_up(1)
    assert affinities() == {"cpu2": both, "unbound": both}


def test_a_workqueue_made_while_a_cpu_is_offline_uses_it_too(
        make_wq: Any, topo: Any, tracer: Any) -> None:
    """A bound workqueue has a pool_workqueue for every possible CPU, not
    only for those online when it is made: queue_work_on() an offline CPU
    works, and once the CPU is up its items run there."""
    topo.cpu_down(1)
    wq = make_wq()
    wq.add_trace_hook(tracer)
    w = Work(lambda work: None)
    assert wq.queue_work_on(1, w) is True
    w.flush()
    topo.cpu_up(1)
    assert wq.queue_work_on(1, w) is True
    w.flush()
    assert tracer.cpus("execute_start", w) == [1, 1]  # its pool, unbound while offline


def test_hotplug_keeps_non_reentrancy_order_and_loses_nothing(make_wq: Any, tracer: Any) -> None:
    topo = Topology(4)
    wq = make_wq(topology=topo, max_active=16)
    wq.add_trace_hook(tracer)
    lock = threading.Lock()
    state = {"active": 0, "max": 0, "runs": 0}
    held, release, second = (threading.Event() for _ in range(3))

    def func(work: Work) -> None:
        with lock:
            state["active"] += 1
            state["max"] = max(state["max"], state["active"])
            state["runs"] += 1
            first = state["runs"] == 1
        with blocking():  # its pool may start another worker meanwhile
            if first:
                held.set()
                assert release.wait(TIMEOUT)
            else:
                second.set()
                os.sched_yield()  # give the GIL away while "active", so overlaps show
        with lock:
            state["active"] -= 1

    shared = Work(func)

    # Deterministically first: CPU 1 goes down under a run of `shared`, which
    # says it blocks; queued there again, its pool (unbound now) has a free
    # worker, which must leave it to the worker still running it.
    assert wq.queue_work_on(1, shared) is True
    try:
        assert held.wait(TIMEOUT)
        topo.cpu_down(1)
        assert wq.queue_work_on(1, shared) is True
        assert not second.wait(0.2), "second run started while the first was still running"
        topo.cpu_up(1)
    finally:
        release.set()
    assert second.wait(TIMEOUT)
    shared.flush()

    ran: list[int] = []

    class Seq(Work):
        def __init__(self, n: int) -> None:
            super().__init__(Seq.run)
            self.n = n

        def run(self) -> None:
            with blocking():
                ran.append(self.n)

    stop = threading.Event()
    first_queued = threading.Event()
    queued = [0]
    shared_accepted = [0]

    def producer() -> None:
        n = 0
        while not stop.is_set() or n < 200:
            shared_accepted[0] += wq.queue_work_on(n % 4, shared)
            wq.queue_work_on(n % 4, Seq(n))
            n += 1
            first_queued.set()
        queued[0] = n

    p = threading.Thread(target=producer)
    p.start()
    try:
        assert first_queued.wait(TIMEOUT)  # the CPUs move while items are queued
        for _ in range(5):
            for cpu in (1, 2, 3):
                topo.cpu_down(cpu)
            for cpu in (3, 1, 2):
                topo.cpu_up(cpu)
    finally:
        stop.set()
        p.join(TIMEOUT)
    assert not p.is_alive(), "producer hung"
    wq.flush()
    shared.flush()
    assert state["max"] == 1  # the shared item never ran concurrently with itself
    # Every accepted queueing ran once (the two runs above included).
    assert state["runs"] == 2 + shared_accepted[0]
    assert sorted(ran) == list(range(queued[0]))  # nothing lost
    # Items queued on one CPU's pool start in queueing order, hotplug or not.
    with tracer.cond:
        starts = [(cpu, w.n) for e, w, cpu in tracer.events
                  if e == "execute_start" and isinstance(w, Seq)]
    for cpu in range(4):
        ns = [n for c, n in starts if c == cpu]
        assert ns == list(range(cpu, queued[0], 4))


def test_an_ordered_workqueue_stays_ordered_across_cpu_down_and_up(make_wq: Any) -> None:
    """Whatever CPU each item is queued on, and whichever CPUs come and go
    while they wait, an ordered workqueue runs them one at a time, in the
    order they were queued."""
    topo = Topology(3, cpu_intensive_thresh=60.0)
    wq = make_wq(ordered=True, topology=topo)
    lock = threading.Lock()
    ran: list[int] = []
    overlaps: list[int] = []
    running = [0]
    release = threading.Event()

    def item(n: int) -> Work:
        def func(work: Work) -> None:
            with lock:
                running[0] += 1
                if running[0] > 1:
                    overlaps.append(n)
            if n == 0:  # holds the queue while the CPUs change under the rest
                assert release.wait(TIMEOUT)
            with lock:
                ran.append(n)
                running[0] -= 1
        return Work(func)

    plan = [lambda: topo.cpu_down(1), lambda: topo.cpu_down(2), lambda: topo.cpu_up(1),
            lambda: topo.cpu_down(0), lambda: topo.cpu_up(2), lambda: topo.cpu_up(0)]
    n = 0
    try:
        for change in plan:
            for _ in range(5):
                assert wq.queue_work_on(n % 3, item(n))
                n += 1
            change()
    finally:
        release.set()
    wq.flush()
    assert ran == list(range(n)) and overlaps == []


def test_loadindex_rehomes_keys_on_cpu_down(topo: Any) -> None:
    moves: list[tuple[object, int, int]] = []
    with LoadIndex(topo, on_move=lambda k, old, new: moves.append((k, old, new))) as index:
        cpus = {k: index.assign(k) for k in "abcd"}
        topo.cpu_down(1)  # synchronous: the moves are reported when it returns
        assert sorted(moves) == sorted((k, 1, 0) for k, c in cpus.items() if c == 1)
        assert all(index.cpu_of(k) == 0 for k in "abcd")


def test_topology_contract_and_errors() -> None:
    topo = Topology(cpus=[3, 1, 2])
    assert topo.possible() == [1, 2, 3] and topo.online() == [1, 2, 3]
    calls: list[tuple[str, int, bool]] = []
    first = lambda cpu, online: calls.append(("first", cpu, online))  # noqa: E731
    second = lambda cpu, online: calls.append(("second", cpu, online))  # noqa: E731
    topo.add_hotplug_notifier(first)
    topo.add_hotplug_notifier(second)
    topo.cpu_down(2)
    assert not topo.is_online(2) and topo.online() == [1, 3]
    topo.cpu_down(2)  # already offline: no-op
    topo.cpu_up(2)
    topo.cpu_up(2)  # already online: no-op
    assert calls == [("second", 2, False), ("first", 2, False),
                     ("first", 2, True), ("second", 2, True)]
    topo.remove_hotplug_notifier(first)
    with pytest.raises(ValueError, match="not a registered"):
        topo.remove_hotplug_notifier(first)
    with pytest.raises(ValueError, match="CPU 0 is not a possible CPU"):
        topo.cpu_down(0)
    with pytest.raises(TypeError, match="must be an int"):
        topo.cpu_up("1")  # type: ignore[arg-type]
    for not_an_int in (True, 1.0):  # both hash like 1
        with pytest.raises(TypeError, match="must be an int"):
            topo.cpu_down(not_an_int)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="must be an int"):
            topo.is_online(not_an_int)  # type: ignore[arg-type]
    topo.cpu_down(1)
    topo.cpu_down(2)
    with pytest.raises(ValueError, match="last online CPU"):
        topo.cpu_down(3)
    with pytest.raises(TypeError):
        topo.add_hotplug_notifier(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        Topology(0)
    with pytest.raises(TypeError, match="either ncpus or cpus"):
        Topology(2, cpus=[0])
    with pytest.raises(ValueError, match=r"^duplicate CPU numbers: \[1\]$"):
        Topology(cpus=[2, 1, 1])
    # The duplicates named, not the whole list given (up to 8192 numbers).
    with pytest.raises(ValueError, match=r"^duplicate CPU numbers: \[0, 1, 2, 3, 4, 5, \.\.\.\]$"):
        Topology(cpus=[*range(4096), *range(4096)])
    with pytest.raises(ValueError, match="CPU -1 is not a possible CPU: CPU numbers are 0 to 8191"):
        Topology(cpus=[-1])
    assert Topology().possible() == sorted(os.sched_getaffinity(0))
    # The kernel's defaults: wq_cpu_intensive_thresh_us 10 ms, wq_watchdog_thresh 30 s.
    assert (topo.cpu_intensive_thresh, topo.watchdog_thresh) == (0.010, 30.0)
    for bad in (0, -1.0, float("nan"), float("inf"), 1e11):  # 1e11: beyond TIMEOUT_MAX
        with pytest.raises(ValueError, match="watchdog_thresh"):
            Topology(1, watchdog_thresh=bad)
        with pytest.raises(ValueError, match="cpu_intensive_thresh"):
            Topology(1, cpu_intensive_thresh=bad)
    with pytest.raises(TypeError, match="watchdog_thresh"):
        Topology(1, watchdog_thresh="30")  # type: ignore[arg-type]


def test_the_tunables_are_checked_when_changed_too(make_wq: Any) -> None:
    # The tunables may be changed at run time, as the kernel's module
    # parameters can; a bad value is refused there as in the constructor,
    # not found later by the timer thread or the queue_work() that arms a
    # check with it (after queueing the item).
    topo = Topology(2)
    for name in ("cpu_intensive_thresh", "watchdog_thresh"):
        for bad in (0, -1.0, float("nan"), float("inf"), 1e11):
            with pytest.raises(ValueError, match=name):
                setattr(topo, name, bad)
        with pytest.raises(TypeError, match=name):
            setattr(topo, name, "30")
        setattr(topo, name, 2)
        assert getattr(topo, name) == 2.0 and type(getattr(topo, name)) is float
    assert (topo.cpu_intensive_thresh, topo.watchdog_thresh) == (2.0, 2.0)
    # The engine uses a changed value.
    topo.cpu_intensive_thresh = 0.001
    wq = make_wq(topology=topo)
    done = threading.Event()
    hog = threading.Event()
    wq.queue_work_on(0, Work(lambda work: hog.wait(10)))
    wq.queue_work_on(0, Work(lambda work: done.set()))
    try:
        assert done.wait(10), "the hog kept counting: the new threshold was not used"
    finally:
        hog.set()


def test_a_tunable_lowered_applies_to_the_checks_already_armed(
        make_wq: Any, log_waiter: Any) -> None:
    """Lowered while an item runs, a tunable applies to it at once, as
    the kernel's do (wq_watchdog_set_thresh re-arms the watchdog; the
    CPU-intensive check runs on every scheduler tick), not once the checks
    armed with the old value, an hour away here, come due."""
    topo = Topology(1, cpu_intensive_thresh=3600.0, watchdog_thresh=3600.0)
    wq = make_wq(topology=topo)
    logged = log_waiter("workqueue._watchdog", "lockup")
    started, release, done = threading.Event(), threading.Event(), threading.Event()

    def hog(work: Work) -> None:
        started.set()
        assert release.wait(10)

    wq.queue_work(Work(hog))
    try:
        assert started.wait(10)
        wq.queue_work(Work(lambda work: done.set()))  # waits behind the hog
        topo.cpu_intensive_thresh = 0.001
        assert done.wait(10), "the hog kept counting: the lowered threshold was not used"
        topo.watchdog_thresh = 0.05
        assert logged.seen.wait(10), "the stall was not reported: the watchdog slept on"
    finally:
        release.set()


@pytest.mark.parametrize("tunable", ["watchdog_thresh", "cpu_intensive_thresh"])
def test_a_tunable_set_as_its_check_fires_leaves_one_check_armed(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch, tunable: str) -> None:
    """The check that a tunable times -- the watchdog of the pool set, or
    the CPU-intensive tick of a pool -- may fire while the setter re-arms
    it (the timer thread takes it, then its callback waits for the engine
    lock the setter holds).  The callback then arms the next check itself:
    the one the setter armed must not be left armed beside it, a second
    chain of checks re-arming itself for as long as items run, that
    nothing deletes."""
    topo = Topology(1, cpu_intensive_thresh=3600.0, watchdog_thresh=3600.0)
    wq = make_wq(topology=topo)
    started, release = threading.Event(), threading.Event()
    watchdog = tunable == "watchdog_thresh"
    arm_name, check, handle = (("_arm_watchdog", _watchdog_timer_fn, "watchdog") if watchdog
                               else ("arm_tick", _pool._cpu_intensive_tick, "tick"))
    arm = getattr(_pool, arm_name)
    firing: list[threading.Thread] = []

    def arm_as_the_old_check_fires(owner: Any) -> None:
        # What the timer thread does with a due timer: take it, and call
        # its callback, which waits for the lock the setter holds.
        assert del_timer(getattr(owner, handle))
        firing.append(threading.Thread(target=check, args=(owner,)))
        firing[0].start()
        arm(owner)

    wq.queue_work(Work(lambda work: (started.set(), release.wait(TIMEOUT))))
    try:
        assert started.wait(TIMEOUT)
        if watchdog:
            owner: Any = topo._pools
            assert owner.watchdog is not None  # armed before the item ran
        else:
            wq.queue_work(Work(lambda work: None))  # waits: the hog's run time is watched
            (owner,) = [p for p in topo._pools.pools() if p.tick is not None]
        monkeypatch.setattr(_pool, arm_name, arm_as_the_old_check_fires)
        setattr(topo, tunable, 1800.0)
        monkeypatch.undo()
        firing[0].join(TIMEOUT)
        assert not firing[0].is_alive()
        with _pool.lock:
            armed = [fn for fn, arg in armed_timers() if arg is owner]
            assert armed == [check] and getattr(owner, handle) is not None
    finally:
        release.set()


def test_a_tunable_set_cut_short_by_ctrl_c_leaves_one_check_running(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between the arming of the new check and the deletion of the
    old one leaves both armed: the old one, when it fires, must leave the
    watching to the new one, not start a second chain of checks."""
    topo = Topology(1, cpu_intensive_thresh=3600.0, watchdog_thresh=3600.0)
    wq = make_wq(topology=topo)
    started, release = threading.Event(), threading.Event()

    def ctrl_c(handle: Any) -> bool:
        raise KeyboardInterrupt

    wq.queue_work(Work(lambda work: (started.set(), release.wait(TIMEOUT))))
    try:
        assert started.wait(TIMEOUT)
        pset = topo._pools
        old = pset.watchdog
        assert old is not None  # armed before the item ran
        monkeypatch.setattr(_pool, "del_timer", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            topo.watchdog_thresh = 1800.0
        monkeypatch.undo()
        assert del_timer(old)  # as the timer thread takes it when due
        _watchdog_timer_fn(pset)
        with _pool.lock:
            armed = [fn for fn, arg in armed_timers() if arg is pset]
            assert armed == [_watchdog_timer_fn] and pset.watchdog is not None
    finally:
        release.set()


def test_a_topology_has_at_most_nr_cpus_cpus() -> None:
    # Topology(10**8) built a list of 10**8 CPUs (gigabytes; 10**7 took
    # 1.2 GB), and a workqueue on 10**7 of them did not start in minutes.
    with pytest.raises(ValueError, match=r"^ncpus must be at most 8192 \(Linux's most\), "
                                         r"got 8193$"):
        Topology(8193)
    with pytest.raises(ValueError, match=r"^a topology has at most 8192 CPUs \(Linux's most\)$"):
        Topology(cpus=range(8193))
    assert len(Topology(8192).possible()) == 8192
    # 8192 CPUs, but not numbered 0 to 8191: CPU 8192 is beyond Linux's most.
    with pytest.raises(ValueError, match=r"^CPU 8192 is not a possible CPU: "
                                         r"CPU numbers are 0 to 8191"):
        Topology(cpus=range(1, 8193))


def test_cpus_that_are_not_an_iterable_say_what_cpus_must_be() -> None:
    # Topology(cpus=3) said only "'int' object is not iterable".
    with pytest.raises(TypeError, match=r"^cpus must be an iterable of CPU numbers \(ints\), "
                                        r"not int: for CPUs 0 to 2, give ncpus=3$"):
        Topology(cpus=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^cpus must be an iterable of CPU numbers \(ints\), "
                                        r"not float$"):
        Topology(cpus=2.0)  # type: ignore[arg-type]
    assert Topology(cpus=iter([2, 0])).possible() == [0, 2]
    # The hint only for a count a topology may have: 1 to NR_CPUS_MAX.
    with pytest.raises(TypeError, match=r"^cpus must be an iterable of CPU numbers \(ints\), "
                                        r"not int: for CPUs 0 to 8191, give ncpus=8192$"):
        Topology(cpus=8192)  # type: ignore[arg-type]
    for count in (0, 8193, -1):
        with pytest.raises(TypeError, match=r"^cpus must be an iterable of CPU numbers \(ints\), "
                                            r"not int$"):
            Topology(cpus=count)  # type: ignore[arg-type]


def test_true_is_not_a_count_a_cpu_or_a_number_of_seconds() -> None:
    # True is an int to isinstance(), and would pass for 1.
    with pytest.raises(TypeError, match=r"^ncpus must be an int, not bool$"):
        Topology(True)
    with pytest.raises(TypeError, match=r"^CPU numbers must be ints, got True$"):
        Topology(cpus=[0, True])
    message = r"^cpus must be an iterable of CPU numbers \(ints\), not bool$"
    with pytest.raises(TypeError, match=message):
        Topology(cpus=True)  # type: ignore[arg-type]
    for name in ("cpu_intensive_thresh", "watchdog_thresh"):
        with pytest.raises(TypeError, match=rf"^{name} must be a number of seconds, not bool$"):
            Topology(1, **{name: True})


def test_a_topology_of_no_cpus_is_refused() -> None:
    for empty in ([], iter(())):
        with pytest.raises(ValueError, match=r"^a topology needs at least one CPU$"):
            Topology(cpus=empty)


def test_the_tunables_take_up_to_timeout_max() -> None:
    # The most a Condition.wait() takes, so the most a timer can wait.
    most = threading.TIMEOUT_MAX
    topo = Topology(1, cpu_intensive_thresh=most, watchdog_thresh=most)
    assert (topo.cpu_intensive_thresh, topo.watchdog_thresh) == (most, most)


def test_repr_shows_the_possible_and_the_online_cpus() -> None:
    topo = Topology(3)
    topo.cpu_down(1)
    assert repr(topo) == "<Topology possible=[0, 1, 2] online=[0, 2]>"


def test_a_logical_cpu_that_is_a_host_cpu_runs_there(monkeypatch: pytest.MonkeyPatch) -> None:
    """The others go round-robin over the host CPUs; on a host whose CPUs
    are 0 to n-1 both rules agree, so the host here has CPUs 1 and 2."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1, 2})
    topo = Topology(4)
    monkeypatch.undo()
    assert [topo.real_cpu(cpu) for cpu in range(4)] == [1, 1, 2, 2]


def test_a_cpu_number_is_shown_whole_up_to_64_bits() -> None:
    # Beyond 64 bits by its size, its power of ten the nearest one
    # (2**64 is some 1.8 * 10**19), its sign kept.
    rng = r"is not a possible CPU: CPU numbers are 0 to 8191"
    for whole in (2**64 - 1, -(2**64 - 1)):
        with pytest.raises(ValueError, match=rf"^CPU {whole} {rng}"):
            Topology(cpus=[whole])
    for big, said in ((2**64, "10"), (-2**64, "-10"), (10**20, "10")):
        power = 19 if abs(big) == 2**64 else 20
        bits = big.bit_length()
        with pytest.raises(ValueError, match=rf"^CPU about {said}\*\*{power} "
                                             rf"\(an int of {bits} bits\) {rng}"):
            Topology(cpus=[big])


def test_cpu_numbers_beyond_nr_cpus_are_refused_wherever_they_come_in(make_wq: Any) -> None:
    # Topology(cpus=[9000]) was taken, though no Linux has a CPU 9000
    # (NR_CPUS_MAX is 8192).  The kernel's cpumask helpers warn of a CPU
    # number >= nr_cpu_ids, and cpu_up() refuses one that is not possible;
    # here every CPU number is checked against the same range, and says it.
    rng = r"CPU numbers are 0 to 8191 \(NR_CPUS_MAX 8192, Linux's most\)"
    for bad in (8192, 9000, -1):
        with pytest.raises(ValueError, match=rf"^CPU {bad} is not a possible CPU: {rng}$"):
            Topology(cpus=[0, bad])
    assert Topology(cpus=[8191]).possible() == [8191]
    topo = Topology(cpus=[0, 1])
    wq = make_wq(topology=topo)
    dwork = DelayedWork(lambda w: None)
    index = LoadIndex(topo)
    try:
        takers: list[tuple[Callable[..., object], tuple[object, ...]]] = [
            (topo.cpu_up, ()), (topo.cpu_down, ()), (topo.is_online, ()), (topo.real_cpu, ()),
            (wq.queue_work_on, (Work(lambda w: None),)),
            (wq.queue_delayed_work_on, (dwork, 1.0)), (wq.mod_delayed_work_on, (dwork, 1.0)),
            (index.load, ()), (index.keys_on, ())]
        for fn, rest in takers:
            for bad in (8192, 9000, -1):
                with pytest.raises(ValueError, match=rf"^CPU {bad} is not a possible CPU: {rng}$"):
                    fn(bad, *rest)
            # A CPU number in range that the topology lacks says so, as before,
            # up to the last one Linux may have.
            for lacked in (5, 8191):
                with pytest.raises(ValueError, match=rf"^CPU {lacked} is not a possible CPU "
                                                     r"of this topology$"):
                    fn(lacked, *rest)
        assert not dwork.pending
    finally:
        index.close()


def test_a_failing_notifier_is_logged_and_the_others_run(caplog: pytest.LogCaptureFixture) -> None:
    topo = Topology(2)
    seen: list[int] = []

    def bad(cpu: int, online: bool) -> None:
        raise RuntimeError("notifier bug")

    topo.add_hotplug_notifier(lambda cpu, online: seen.append(cpu))
    topo.add_hotplug_notifier(bad)
    with caplog.at_level("ERROR", logger="workqueue._topology"):
        topo.cpu_down(0)
    assert seen == [0]
    assert "notifier" in caplog.text and "CPU 0 going down" in caplog.text


class _WatchedTopology(Topology):
    """A Topology that runs ``watch`` after every attribute it stores, in
    the storing thread: what a reader on another thread may see between
    two stores, looked at without a thread."""

    watch: Callable[[], None] | None = None

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if self.watch is not None:
            self.watch()


def test_readers_never_see_a_hotplug_half_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """online(), is_online() and current_cpu() agree at every instant of a
    cpu_down() or cpu_up(), as a reader that takes no lock sees them.  The
    online set, its sorted list and the host CPUs' map were replaced one
    after the other: between two of them CPU 1 was offline by is_online()
    and still listed by online(), and current_cpu() named it."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5, 6, 7})
    topo = _WatchedTopology(cpus=[5, 6, 7, 10])
    monkeypatch.undo()
    assert topo.real_cpu(10) == 6
    # A thread running on host CPU 6, whose logical CPU is the lowest
    # online one mapped there: 6, or 10 while 6 is offline.
    monkeypatch.setattr(_topology, "_sched_getcpu", lambda: 6)
    seen: list[tuple[list[int], list[int], int]] = []

    def consistent() -> None:
        online = topo.online()
        by_is_online = [cpu for cpu in topo.possible() if topo.is_online(cpu)]
        current = topo.current_cpu()
        seen.append((online, by_is_online, current))
        assert online == by_is_online, seen
        assert current in online, seen
        assert repr(topo) == f"<Topology possible=[5, 6, 7, 10] online={online}>"

    topo.watch = consistent
    for _ in range(2):
        topo.cpu_down(6)
        assert topo.online() == [5, 7, 10] and topo.current_cpu() == 10
        topo.cpu_down(10)
        assert topo.online() == [5, 7] and topo.current_cpu() == 5
        topo.cpu_up(10)
        topo.cpu_up(6)
        assert topo.online() == [5, 6, 7, 10] and topo.current_cpu() == 6
    assert seen, "no store was watched"
