"""Several workqueues, CPU hotplug, delayed work and drain/destroy against a
reference model of the kernel's semantics (hypothesis, stateful).

test_model.py walks one ordered workqueue; this one drives, on one
two-CPU Topology, a bound workqueue, a bound one with max_active 1 per CPU,
an unbound one with max_active 2 and an ordered one, sharing three Work and
two DelayedWork items.  Every step is deterministic:

* every run of an item blocks, inside workqueue.blocking() (so that the
  pool starts the next item at once, as the kernel does when a work item
  sleeps), until the test releases it -- possibly with an action for the
  item to do first (queue an item: chained queueing, which drain and
  destroy allow from the workqueue's own items only);
* the delayed items' timers are the test's: queue_delayed_work() arms a
  timer that fires only when a rule fires it, on the test's thread (as the
  timer thread would: the engine's delayed_work_timer_fn);
* calls that wait (flush, cancel_sync, flush_workqueue, drain, destroy) run
  in threads; the test checks that they wait while the model says they
  must, and that they return, with the model's answer, once it says they
  may.

After every step the test waits (with a timeout, on the items' own
conditions) until the engine has started and finished exactly the runs the
model predicts, where the model predicts (which workqueue and pool), then
compares pending/running/disabled.  Every item checks that it never runs
concurrently with itself.

The model (kernel/workqueue.c is the reference; function names cited at
the rules): per pool_workqueue, max_active and a FIFO of inactive items; an
active item starts as soon as its previous run (on any workqueue) is over.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from wqhelpers import wait_until

from workqueue import (
    WQ_UNBOUND,
    DelayedWork,
    Topology,
    Work,
    Workqueue,
    _pool,
    _topology,
    _work,
    _workqueue,
    alloc_ordered_workqueue,
    alloc_workqueue,
    blocking,
)
from workqueue._pool import Completion, current_worker
from workqueue._timer import TimerHandle

TIMEOUT = 10.0

WQS = ("b", "b1", "u", "o")          # bound, bound max_active 1, unbound 2, ordered
MAX_ACTIVE = {"b": 256, "b1": 1, "u": 2, "o": 1}
BOUND = {"b": True, "b1": True, "u": False, "o": False}
WORKS = ("w0", "w1", "w2")
DWORKS = ("d0", "d1")
ITEMS = WORKS + DWORKS
CPUS = (0, 1)
LONG = 3600.0  # a delay that only a rule ends

PwqKey = tuple[str, "int | None"]  # (workqueue name, pool CPU or None)


# -- the test's timers ---------------------------------------------------------

class FakeTimers:
    """Replaces the timers of delayed work (and only those): armed timers
    fire when fire() is called, never by themselves."""

    def __init__(self) -> None:
        self.armed: set[TimerHandle] = set()
        self._real_del = _pool.del_timer

    def add(self, delay: float, callback: Callable[[Any], None], arg: Any) -> TimerHandle:
        handle = TimerHandle(float("inf"), callback, arg)
        self.armed.add(handle)
        return handle

    def delete(self, handle: TimerHandle) -> bool:
        if handle in self.armed:
            self.armed.discard(handle)
            was = handle.callback is not None
            handle.callback = None
            handle.arg = None
            return was
        return self._real_del(handle)

    def fire(self, handle: TimerHandle) -> None:
        """What the timer thread does with a due timer (_TimerBase._run)."""
        assert handle in self.armed
        self.armed.discard(handle)
        callback, arg = handle.callback, handle.arg
        handle.callback = None
        handle.arg = None
        assert callback is not None
        callback(arg)

    def install(self) -> Callable[[], None]:
        saved = (_workqueue.add_timer, _pool.del_timer, _work.del_timer)
        _workqueue.add_timer = self.add  # type: ignore[assignment]
        _pool.del_timer = self.delete
        _work.del_timer = self.delete

        def restore() -> None:
            _workqueue.add_timer, _pool.del_timer, _work.del_timer = saved
        return restore


# -- the items -------------------------------------------------------------------

class Probe:
    """What an item's runs did, and the gate each run waits at."""

    def __init__(self, name: str, log: list[tuple[str, PwqKey]], log_lock: threading.Lock) -> None:
        self.name = name
        self.cond = threading.Condition()
        self.starts = 0
        self.finishes = 0
        self.inside = 0
        self.overlap = False
        self.stuck = False
        self.where: list[PwqKey] = []
        self.results: list[object] = []
        self.worker_cpu: int | None = None
        self.gate: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self.log = log
        self.log_lock = log_lock

    def body(self) -> None:
        worker = current_worker()
        assert worker is not None and worker.current_pwq is not None
        pwq = worker.current_pwq
        where = (pwq.wq.name, pwq.pool.cpu)
        # The worker's own pool may be another one: an item still running
        # elsewhere is handed to the worker running it (see _work).
        assert worker.pool is not None
        self.worker_cpu = worker.pool.cpu
        with self.cond:
            if self.inside:
                self.overlap = True  # ran concurrently with itself
            self.inside += 1
            self.starts += 1
            self.where.append(where)
            with self.log_lock:
                self.log.append((self.name, where))
            self.cond.notify_all()
        with blocking():
            try:
                action = self.gate.get(timeout=TIMEOUT * 3)
            except queue.Empty:
                self.stuck = True
                action = None
        result: object = None
        if action is not None:
            try:
                result = action()
            except RuntimeError as exc:
                result = exc
        with self.cond:
            self.results.append(result)
            self.inside -= 1
            self.finishes += 1
            self.cond.notify_all()

    def wait_count(self, attr: str, value: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: getattr(self, attr) >= value, timeout=TIMEOUT):
                pytest.fail(f"{self.name}.{attr} never reached {value} (is {getattr(self, attr)})")
            assert getattr(self, attr) == value, f"{self.name}.{attr} is {getattr(self, attr)}, " \
                                                 f"the model says {value}"


class PWork(Work):
    def __init__(self, probe: Probe) -> None:
        super().__init__(lambda w: probe.body())
        self.probe = probe


class PDelayedWork(DelayedWork):
    def __init__(self, probe: Probe) -> None:
        super().__init__(lambda w: probe.body())
        self.probe = probe


def waiting_in_completion(thread: threading.Thread) -> bool:
    """Whether *thread* sleeps in a Completion (flush, cancel_sync, drain)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code is Completion.wait.__code__:
            return True
        frame = frame.f_back
    return False


# -- the model ---------------------------------------------------------------------

@dataclass
class MItem:
    name: str
    delayed: bool
    pending: PwqKey | str | None = None  # a pwq (on its list), "timer", or None
    timer_wq: str | None = None           # DelayedWork: where the timer queues it
    timer_cpu: int | None = None
    running: PwqKey | None = None
    seq: int = 0                           # queueings onto a list
    pending_seq: int | None = None
    running_seq: int | None = None
    disable: int = 0
    holds: int = 0                         # waiting cancel_sync() calls
    starts: int = 0
    finishes: int = 0
    where: list[PwqKey] = field(default_factory=list)
    # The pool CPU of the worker running the item (None: unbound), "?" if
    # it may be either of two; and whether the pending queueing collides
    # with the run going on (activated while it runs) and was handed to
    # its worker ("collide": to be handed; "handed"; "racy": the run ended
    # in the step that queued it, so it may or may not have been).
    worker_cpu: int | str | None = None
    collision: str | None = None


@dataclass
class MPwq:
    max_active: int
    active: list[str] = field(default_factory=list)    # pending, activated
    inactive: list[str] = field(default_factory=list)  # pending, over max_active


@dataclass
class Waiter:
    what: str
    thread: threading.Thread
    result: list[object]
    done: Callable[[], bool]
    expected: object
    on_done: Callable[[], None] = lambda: None


class Refused(Exception):
    """The model's word for a RuntimeError the engine must raise."""


class WqModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.timers = FakeTimers()
        self.restore_timers = self.timers.install()
        self.topo = Topology(2, cpu_intensive_thresh=60.0)
        # Threads that are not workers of an online CPU all run on host
        # CPU real_cpu(0) as far as the engine can tell, so that the CPU
        # queue_work() picks for them is the model's: CPU 0, or the lowest
        # online CPU (wq_select_unbound_cpu's fallback, reduced).
        host0 = self.topo.real_cpu(0)
        saved_getcpu = (_workqueue._sched_getcpu, _topology._sched_getcpu)
        _workqueue._sched_getcpu = _topology._sched_getcpu = lambda: host0
        restore_timers = self.restore_timers

        def restore() -> None:
            restore_timers()
            _workqueue._sched_getcpu, _topology._sched_getcpu = saved_getcpu
        self.restore_timers = restore
        self.wqs: dict[str, Workqueue] = {
            "b": alloc_workqueue("b", topology=self.topo),
            "b1": alloc_workqueue("b1", 0, 1, topology=self.topo),
            "u": alloc_workqueue("u", WQ_UNBOUND, 2, topology=self.topo),
            "o": alloc_ordered_workqueue("o", topology=self.topo),
        }
        self.log: list[tuple[str, PwqKey]] = []
        self.log_lock = threading.Lock()
        self.probes = {n: Probe(n, self.log, self.log_lock) for n in ITEMS}
        self.items: dict[str, Work] = {n: PWork(self.probes[n]) for n in WORKS}
        self.items.update({n: PDelayedWork(self.probes[n]) for n in DWORKS})
        # The model.
        self.m = {n: MItem(n, n in DWORKS) for n in ITEMS}
        self.pwqs: dict[PwqKey, MPwq] = {}
        for wq in WQS:
            for cpu in (CPUS if BOUND[wq] else (None,)):
                self.pwqs[wq, cpu] = MPwq(MAX_ACTIVE[wq])
        self.state = dict.fromkeys(WQS, "running")  # running, draining, destroying, destroyed
        self.online = set(CPUS)
        self.ordered_log: list[str] = []
        self.waiters: list[Waiter] = []

    # -- model mechanics ---------------------------------------------------------

    def nr_active(self, key: PwqKey) -> int:
        return len(self.pwqs[key].active) + sum(1 for m in self.m.values() if m.running == key)

    def advance(self) -> None:
        """Activate inactive items (pwq_activate_first_inactive) and start
        every active item whose previous run is over (process_one_work;
        find_worker_executing_work hands a colliding item to the worker
        running it, which runs it next)."""
        changed = True
        while changed:
            changed = False
            for key, pwq in self.pwqs.items():
                while pwq.inactive and self.nr_active(key) < pwq.max_active:
                    name = pwq.inactive.pop(0)
                    pwq.active.append(name)
                    if self.m[name].running is not None:
                        self.m[name].collision = "collide"
                for name in list(pwq.active):
                    m = self.m[name]
                    if m.running is None:
                        pwq.active.remove(name)
                        m.pending = None
                        m.running = key
                        m.running_seq, m.pending_seq = m.pending_seq, None
                        m.starts += 1
                        m.where.append(key)
                        if m.collision == "racy":
                            m.worker_cpu = "?"
                        elif m.collision != "handed":
                            m.worker_cpu = key[1]
                        m.collision = None
                        if key[0] == "o":
                            self.ordered_log.append(name)
                        changed = True

    def in_flight(self, wq: str) -> set[tuple[str, int]]:
        """The queueings of *wq* on a list or running (what flush_workqueue
        waits for; items on their timers are not)."""
        found = set()
        for m in self.m.values():
            if isinstance(m.pending, tuple) and m.pending[0] == wq:
                assert m.pending_seq is not None
                found.add((m.name, m.pending_seq))
            if m.running is not None and m.running[0] == wq:
                assert m.running_seq is not None
                found.add((m.name, m.running_seq))
        return found

    def insert(self, m: MItem, wq: str, key: PwqKey) -> None:
        """__queue_work's tail: insert_work or onto pwq->inactive_works.
        A still-running item goes to the pwq it runs from, when that is
        one of *wq*'s (__queue_work: last_pool, non-reentrancy)."""
        if m.running is not None and m.running[0] == wq:
            key = m.running
        m.seq += 1
        m.pending = key
        m.pending_seq = m.seq
        pwq = self.pwqs[key]
        if self.nr_active(key) < pwq.max_active and not pwq.inactive:
            pwq.active.append(m.name)
            if m.running is not None:
                m.collision = "collide"
        else:
            pwq.inactive.append(m.name)

    def check_queueing(self, wq: str, chained_from: str | None) -> None:
        """__queue_work: a draining/dying workqueue takes chained work only
        (is_chained_work); a destroyed one nothing."""
        state = self.state[wq]
        if state == "destroyed":
            raise Refused
        if state != "running":
            src = self.m[chained_from].running if chained_from is not None else None
            if src is None or src[0] != wq:
                raise Refused

    def grab(self, m: MItem) -> bool:
        """try_to_grab_pending: True if it was pending, then it is not."""
        if m.pending is None:
            return False
        if m.pending == "timer":
            m.pending = None
            return True
        assert isinstance(m.pending, tuple)
        pwq = self.pwqs[m.pending]
        if m.name in pwq.active:
            pwq.active.remove(m.name)
        else:
            pwq.inactive.remove(m.name)
        m.pending = None
        m.pending_seq = None
        m.collision = None  # off the list (or the worker's scheduled list)
        return True

    def m_queue(self, name: str, wq: str, key: PwqKey | None,
                chained_from: str | None = None) -> bool:
        """queue_work_on: False if pending or disabled (test_and_set_bit of
        WORK_STRUCT_PENDING; clear_pending_if_disabled)."""
        m = self.m[name]
        if self.state[wq] == "destroyed":
            raise Refused
        if m.pending is not None or m.disable or m.holds:
            return False
        self.check_queueing(wq, chained_from)
        assert key is not None
        self.insert(m, wq, key)
        return True

    def timer_queue(self, m: MItem, chained_from: str | None = None) -> bool:
        """delayed_work_timer_fn / flush_delayed_work: queue a delayed item
        whose timer is over; a draining or destroyed workqueue drops it."""
        wq = m.timer_wq
        assert wq is not None
        try:
            self.check_queueing(wq, chained_from)
        except Refused:
            m.pending = None
            return False
        self.insert(m, wq, (wq, m.timer_cpu if BOUND[wq] else None))
        return True

    # -- engine observation ------------------------------------------------------

    def local_key(self, wq: str, worker_cpu: int | str | None) -> PwqKey:
        """Where queue_work() from a thread puts an item of *wq*: a worker
        of an online CPU queues on its CPU (raw_smp_processor_id), any
        other thread on the CPU it runs on (here: CPU 0 if online)."""
        if not BOUND[wq]:
            return (wq, None)
        if isinstance(worker_cpu, int) and worker_cpu in self.online:
            return (wq, worker_cpu)
        return (wq, min(self.online))

    def key_of(self, work: Work) -> PwqKey:
        pwq = work._pwq
        assert pwq is not None
        return (pwq.wq.name, pwq.pool.cpu)

    def settle(self) -> None:
        self.advance()
        for name, m in self.m.items():
            if m.collision == "collide":
                # find_worker_executing_work: the worker that dequeues it
                # hands it to the one running it.  Waited for, so that the
                # run does not end first (which would change the worker).
                item = self.items[name]
                wait_until(lambda item=item: isinstance(  # type: ignore[misc]
                    getattr(item._entry, "owner", None), _pool.Worker),
                    f"{name} is handed to the worker running it")
                m.collision = "handed"
        for name, probe in self.probes.items():
            m = self.m[name]
            probe.wait_count("starts", m.starts)
            probe.wait_count("finishes", m.finishes)
            if m.running is None:
                item = self.items[name]
                wait_until(lambda item=item: not item.running,  # type: ignore[misc]
                           f"{name} stops running")
            assert probe.where == m.where, f"{name} ran at {probe.where}, model {m.where}"
            if isinstance(m.pending, tuple):
                got = self.key_of(self.items[name])
                assert got == m.pending, f"{name} is pending at {got}, model {m.pending}"
            if m.running is not None and m.worker_cpu != "?":
                assert probe.worker_cpu == m.worker_cpu, \
                    f"{name} runs on a worker of pool CPU {probe.worker_cpu}, model {m.worker_cpu}"
        with self.log_lock:
            real_ordered = [n for n, (wq, _) in self.log if wq == "o"]
        assert real_ordered == self.ordered_log, "ordered workqueue ran out of order"
        self.check_waiters()

    def check_waiters(self) -> None:
        left = []
        for w in self.waiters:
            if w.done():
                w.thread.join(TIMEOUT)
                assert not w.thread.is_alive(), f"{w.what} did not return"
                assert w.result == [w.expected], f"{w.what} returned {w.result}, " \
                                                  f"model {w.expected}"
                w.on_done()
            else:
                assert w.thread.is_alive(), f"{w.what} returned too early ({w.result})"
                left.append(w)
        self.waiters = left

    def start_waiter(self, what: str, call: Callable[[], object], done: Callable[[], bool],
                     expected: object, on_done: Callable[[], None] = lambda: None) -> None:
        result: list[object] = []

        def run() -> None:
            try:
                result.append(call())
            except RuntimeError as exc:
                result.append(type(exc))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        # It has done what it does before it waits, or it returned.
        wait_until(lambda: not thread.is_alive() or waiting_in_completion(thread),
                   f"{what} waits or returns")
        self.waiters.append(Waiter(what, thread, result, done, expected, on_done))

    def expect(self, model: Callable[[], object], call: Callable[[], object], what: str) -> None:
        """Run the model's step and the engine's; a Refused step must be a
        RuntimeError."""
        try:
            expected = model()
        except Refused:
            with pytest.raises(RuntimeError):
                call()
            return
        got = call()
        assert got == expected, f"{what} returned {got}, model {expected}"

    # -- rules: queueing ------------------------------------------------------------

    @rule(name=st.sampled_from(ITEMS), wq=st.sampled_from(WQS))
    def queue_work(self, name: str, wq: str) -> None:
        """queue_work: the calling thread's CPU for a bound workqueue."""
        item = self.items[name]
        m = self.m[name]
        try:
            if self.state[wq] == "destroyed":
                raise Refused
            would = not (m.pending is not None or m.disable or m.holds)
            if would:
                self.check_queueing(wq, None)
        except Refused:
            with pytest.raises(RuntimeError):
                self.wqs[wq].queue_work(item)
            self.settle()
            return
        got = self.wqs[wq].queue_work(item)
        assert got is would, f"queue_work({name}) on {wq} returned {got}"
        if got:
            key = self.key_of(item)
            expected_key = self.local_key(wq, None)
            if m.running is not None and m.running[0] == wq:
                expected_key = m.running
            assert key == expected_key, f"queue_work({name}) went to {key}, model {expected_key}"
            self.insert(m, wq, key)
        self.settle()

    @rule(name=st.sampled_from(ITEMS), wq=st.sampled_from(WQS), cpu=st.sampled_from(CPUS))
    def queue_work_on(self, name: str, wq: str, cpu: int) -> None:
        key = (wq, cpu if BOUND[wq] else None)
        self.expect(lambda: self.m_queue(name, wq, key),
                    lambda: self.wqs[wq].queue_work_on(cpu, self.items[name]), "queue_work_on")
        self.settle()

    @rule(name=st.sampled_from(DWORKS), wq=st.sampled_from(WQS), cpu=st.sampled_from(CPUS),
          delay=st.sampled_from([0, LONG]))
    def queue_delayed_work_on(self, name: str, wq: str, cpu: int, delay: float) -> None:
        """queue_delayed_work_on: False if pending (on the timer or a list)
        or disabled; a zero delay queues at once (__queue_delayed_work)."""
        m = self.m[name]

        def model() -> bool:
            if self.state[wq] == "destroyed":
                raise Refused
            if m.pending is not None or m.disable or m.holds:
                return False
            self.check_queueing(wq, None)
            m.timer_wq, m.timer_cpu = wq, cpu
            if delay:
                m.pending = "timer"
            else:
                self.timer_queue(m)
            return True

        self.expect(model, lambda: self.wqs[wq].queue_delayed_work_on(
            cpu, self.items[name], delay), "queue_delayed_work_on")  # type: ignore[arg-type]
        self.settle()

    @rule(name=st.sampled_from(DWORKS), wq=st.sampled_from(WQS), cpu=st.sampled_from(CPUS),
          delay=st.sampled_from([0, LONG]))
    def mod_delayed_work_on(self, name: str, wq: str, cpu: int, delay: float) -> None:
        """mod_delayed_work_on: True if it was pending (and is re-armed),
        False if it was idle and got queued; a disabled item is only
        cancelled (clear_pending_if_disabled)."""
        m = self.m[name]

        def model() -> bool:
            self.check_queueing(wq, None)
            was = self.grab(m)
            if not (m.disable or m.holds):
                m.timer_wq, m.timer_cpu = wq, cpu
                if delay:
                    m.pending = "timer"
                else:
                    self.timer_queue(m)
            return was

        self.expect(model, lambda: self.wqs[wq].mod_delayed_work_on(
            cpu, self.items[name], delay), "mod_delayed_work_on")  # type: ignore[arg-type]
        self.settle()

    @precondition(lambda self: any(m.pending == "timer" for m in self.m.values()))
    @rule(data=st.data())
    def fire_timer(self, data: st.DataObject) -> None:
        """delayed_work_timer_fn, from the timer thread (here: ours)."""
        name = data.draw(st.sampled_from([n for n, m in self.m.items() if m.pending == "timer"]))
        dw = self.items[name]
        assert isinstance(dw, DelayedWork)
        handle = dw._timer
        assert handle is not None
        self.timer_queue(self.m[name])
        self.timers.fire(handle)
        self.settle()

    # -- rules: the items' runs ------------------------------------------------------

    def running_names(self) -> list[str]:
        return [n for n, m in self.m.items() if m.running is not None]

    @precondition(lambda self: any(m.running is not None for m in self.m.values()))
    @rule(data=st.data(), other_item=st.sampled_from(ITEMS),
          kind=st.sampled_from(["none", "own", "other", "own_on", "delayed_own"]),
          other=st.sampled_from(WQS), cpu=st.sampled_from(CPUS))
    def finish(self, data: st.DataObject, other_item: str, kind: str, other: str,
               cpu: int) -> None:
        """Let one run end, after it queued *target* (chained queueing: on
        its own workqueue always allowed, also while it drains)."""
        name = data.draw(st.sampled_from(self.running_names()))
        target = other_item
        m = self.m[name]
        assert m.running is not None
        own = m.running[0]
        target_item = self.items[target]
        action: Callable[[], object] | None = None
        expected: object = None
        observe_cpu = False
        if kind == "none":
            pass
        elif kind == "delayed_own":
            if target not in DWORKS:
                kind = "none"
            else:
                dw = target_item
                assert isinstance(dw, DelayedWork)
                wq_obj = self.wqs[own]
                tm = self.m[target]
                try:
                    if self.state[own] == "destroyed":
                        raise Refused
                    if tm.pending is not None or tm.disable or tm.holds:
                        expected = False
                    else:
                        self.check_queueing(own, name)
                        tm.timer_wq, tm.timer_cpu = own, cpu
                        tm.pending = "timer"
                        expected = True
                except Refused:
                    expected = RuntimeError
                action = lambda: wq_obj.queue_delayed_work_on(cpu, dw, LONG)  # noqa: E731
        else:
            wq = own if kind in ("own", "own_on") else other
            wq_obj = self.wqs[wq]
            if kind == "own_on":
                key: PwqKey = (wq, cpu if BOUND[wq] else None)
                try:
                    expected = self.m_queue(target, wq, key, chained_from=name)
                except Refused:
                    expected = RuntimeError
                action = lambda: wq_obj.queue_work_on(cpu, target_item)  # noqa: E731
            else:
                tm = self.m[target]
                local: PwqKey | None = self.local_key(wq, m.worker_cpu)
                if m.worker_cpu == "?" and BOUND[wq] and not (
                        tm.running is not None and tm.running[0] == wq):
                    local = None  # the model cannot tell: not tried
                if local is not None:
                    try:
                        expected = self.m_queue(target, wq, local, chained_from=name)
                    except Refused:
                        expected = RuntimeError
                    action = lambda: wq_obj.queue_work(target_item)  # noqa: E731
                    observe_cpu = expected is True
        probe = self.probes[name]
        n_results = len(probe.results)
        probe.gate.put(action)
        probe.wait_count("finishes", m.finishes + 1)
        got = probe.results[n_results]
        if isinstance(got, RuntimeError):
            got = RuntimeError
        assert got == expected, f"{name}'s {kind} queueing of {target} returned {got}, " \
                                f"model {expected}"
        if observe_cpu:
            # Where it went: the model's choice (m_queue) is checked here,
            # before the target may start.  (A worker's CPU is that of its
            # own pool, not always its item's pwq's: an item handed to the
            # worker running its previous run runs on that worker's pool.)
            tm = self.m[target]
            if tm.pending is not None and isinstance(tm.pending, tuple):
                key = self.key_of(target_item)
                assert key == tm.pending, f"{name} queued {target} at {key}, model {tm.pending}"
        if m.collision == "collide":
            m.collision = "racy"  # queued itself: handed over or not
        # process_one_work's end: the run is over.
        m.running = None
        m.running_seq = None
        m.finishes += 1
        self.settle()

    # -- rules: cancel, flush ----------------------------------------------------------

    @rule(name=st.sampled_from(ITEMS))
    def cancel(self, name: str) -> None:
        """cancel_work / cancel_delayed_work: True if it was pending."""
        self.expect(lambda: self.grab(self.m[name]), self.items[name].cancel, "cancel")
        self.settle()

    def run_done(self, m: MItem, seq: int | None) -> Callable[[], bool]:
        """Whether queueing *seq* of the item (None: the run going on now)
        is over: neither pending on a list nor running (flush_work)."""
        def done() -> bool:
            if m.running is not None and (seq is None or m.running_seq is not None
                                          and m.running_seq <= seq):
                return False
            if seq is not None and m.pending_seq is not None and m.pending_seq <= seq:
                return False
            return True
        return done

    def current_run_over(self, m: MItem) -> Callable[[], bool]:
        """Whether the run going on now (if any) is over: what
        cancel_work_sync and disable_work_sync wait for (__flush_work).
        Not "no run": enable_work() may let the item be queued and run
        again while disable_work_sync() still waits for the old run."""
        finishes = m.finishes + (1 if m.running is not None else 0)
        return lambda: m.finishes >= finishes

    @rule(name=st.sampled_from(ITEMS))
    def cancel_sync(self, name: str) -> None:
        """cancel_work_sync / cancel_delayed_work_sync: True if it was
        pending; returns once no run is left; queueing meanwhile fails."""
        m = self.m[name]
        was = self.grab(m)
        m.holds += 1

        def release() -> None:
            m.holds -= 1

        self.start_waiter(f"cancel_sync({name})", self.items[name].cancel_sync,
                          self.current_run_over(m), was, release)
        self.settle()

    @rule(name=st.sampled_from(ITEMS))
    def disable_sync(self, name: str) -> None:
        """disable_work_sync: disable_work, then wait for a running instance."""
        m = self.m[name]
        was = self.grab(m)
        m.disable += 1
        self.start_waiter(f"disable_sync({name})", self.items[name].disable_sync,
                          self.current_run_over(m), was)
        self.settle()

    @rule(wq=st.sampled_from(["b1", "u"]), n=st.integers(1, 3))
    def set_max_active(self, wq: str, n: int) -> None:
        """workqueue_set_max_active: lowering leaves the active items be;
        raising activates the oldest inactive ones at once."""
        if self.state[wq] == "destroyed":
            with pytest.raises(RuntimeError):
                self.wqs[wq].set_max_active(n)
            return
        self.wqs[wq].set_max_active(n)
        for key, pwq in self.pwqs.items():
            if key[0] == wq:
                pwq.max_active = n
        self.settle()

    @rule(name=st.sampled_from(ITEMS))
    def flush_work(self, name: str) -> None:
        """flush_work: True if it waited for a queueing on a list or a run
        (an item on its timer is not waited for)."""
        m = self.m[name]
        busy = isinstance(m.pending, tuple) or m.running is not None
        seq = m.pending_seq if isinstance(m.pending, tuple) else m.running_seq
        done = self.run_done(m, seq) if busy else (lambda: True)
        self.start_waiter(f"flush_work({name})", lambda: Work.flush(self.items[name]),
                          done, busy)
        self.settle()

    @rule(name=st.sampled_from(DWORKS))
    def flush_delayed_work(self, name: str) -> None:
        """flush_delayed_work: an item on its timer is queued at once
        (del_timer_sync then __queue_work), then flush_work."""
        m = self.m[name]
        if m.pending == "timer":
            self.timer_queue(m)
        busy = isinstance(m.pending, tuple) or m.running is not None
        seq = m.pending_seq if isinstance(m.pending, tuple) else m.running_seq
        done = self.run_done(m, seq) if busy else (lambda: True)
        self.start_waiter(f"flush_delayed_work({name})", self.items[name].flush, done, busy)
        self.settle()

    @precondition(lambda self: any(s not in ("destroying", "destroyed")
                                   for s in self.state.values()))
    @rule(data=st.data())
    def flush_workqueue(self, data: st.DataObject) -> None:
        """flush_workqueue: waits for what was queued before it."""
        wq = data.draw(st.sampled_from([w for w in WQS
                                        if self.state[w] not in ("destroying", "destroyed")]))
        target = self.in_flight(wq)
        self.start_waiter(f"flush_workqueue({wq})", self.wqs[wq].flush,
                          lambda: not (self.in_flight(wq) & target), None)
        self.settle()

    @precondition(lambda self: any(s == "running" for s in self.state.values()))
    @rule(data=st.data(), how=st.sampled_from(["drain", "drain", "drain", "destroy"]))
    def drain_or_destroy(self, data: st.DataObject, how: str) -> None:
        """drain_workqueue / destroy_workqueue: flush until nothing is in
        flight, refusing all queueing but chained (__queue_work's
        WARN_ON_ONCE(!is_chained_work(wq)) under __WQ_DRAINING); destroy
        then refuses everything."""
        wq = data.draw(st.sampled_from([w for w in WQS if self.state[w] == "running"]))
        destroy = how == "destroy"
        self.state[wq] = "destroying" if destroy else "draining"

        def over() -> None:
            self.state[wq] = "destroyed" if destroy else "running"

        wq_obj = self.wqs[wq]
        self.start_waiter(f"{'destroy' if destroy else 'drain'}({wq})",
                          wq_obj.destroy if destroy else wq_obj.drain,
                          lambda: not self.in_flight(wq), None, over)
        self.settle()

    # -- rules: disable, hotplug ---------------------------------------------------------

    @rule(name=st.sampled_from(ITEMS))
    def disable(self, name: str) -> None:
        """disable_work: cancel_work, and queueing fails until enable_work."""
        m = self.m[name]

        def model() -> bool:
            m.disable += 1
            return self.grab(m)

        self.expect(model, self.items[name].disable, "disable")
        self.settle()

    @precondition(lambda self: any(m.disable for m in self.m.values()))
    @rule(data=st.data())
    def enable(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from([n for n, m in self.m.items() if m.disable]))
        m = self.m[name]
        m.disable -= 1
        assert self.items[name].enable() is (m.disable == 0)
        self.settle()

    @rule(cpu=st.sampled_from(CPUS))
    def cpu_down(self, cpu: int) -> None:
        """The CPU's pools run unbound (unbind_workers): their items still
        run, in order and one at a time each."""
        if len(self.online) == 1 and cpu in self.online:
            with pytest.raises(ValueError):
                self.topo.cpu_down(cpu)
            return
        self.topo.cpu_down(cpu)
        self.online.discard(cpu)
        self.settle()

    @rule(cpu=st.sampled_from(CPUS))
    def cpu_up(self, cpu: int) -> None:
        self.topo.cpu_up(cpu)
        self.online.add(cpu)
        self.settle()

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def states_match(self) -> None:
        for name, item in self.items.items():
            m = self.m[name]
            probe = self.probes[name]
            assert not probe.overlap, f"{name} ran concurrently with itself"
            assert not probe.stuck, f"{name} was never released"
            assert item.pending is (m.pending is not None), f"{name}.pending"
            assert item.running is (m.running is not None), f"{name}.running"
            assert item.disabled is bool(m.disable or m.holds), f"{name}.disabled"

    def teardown(self) -> None:
        try:
            for name in ITEMS:
                self.items[name].cancel()
            deadline = time.monotonic() + TIMEOUT
            while any(w.thread.is_alive() for w in self.waiters) or any(
                    item.running for item in self.items.values()):
                for probe in self.probes.values():
                    if probe.inside:
                        probe.gate.put(None)
                for name in ITEMS:
                    self.items[name].cancel()
                time.sleep(0.002)
                assert time.monotonic() < deadline, "teardown: runs or waiters left"
            for wq in self.wqs.values():
                if wq._state < 2:
                    t = threading.Thread(target=wq.destroy, daemon=True)
                    t.start()
                    while t.is_alive():
                        for probe in self.probes.values():
                            if probe.inside:
                                probe.gate.put(None)
                        t.join(0.01)
                        assert time.monotonic() < deadline + TIMEOUT, "destroy() hung"
        finally:
            self.restore_timers()


WqModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                     derandomize=True)
test_workqueue_model = WqModel.TestCase
