"""Workqueues: alloc_workqueue(), queueing, flush/drain/destroy, and the Executor face.

A Workqueue is a name, flags and a max_active limit, plus one
pool_workqueue per pool it uses: for a bound workqueue (the default) one per
CPU of its topology, for an unbound or ordered one a single one.  The pools
themselves, and their threads, are shared (see _pool).

Queueing picks the pool (__queue_work):

* bound: queue_work() uses the CPU the caller runs on (a worker's own CPU,
  else the topology's idea of the calling thread's CPU); queue_work_on(cpu)
  the given one, online or not -- an offline CPU's pool runs unbound;
* unbound and ordered: the topology's unbound pool;
* in both cases, if the item is still running on a pool of this workqueue,
  that pool, so that it does not run concurrently with itself (and should
  it run elsewhere, the worker that dequeues it hands it to the one running
  it: see _pool.process_works).

Flushing uses flush colors: every queued item takes the workqueue's current
color; flush() starts a new color and waits until no item of an older color
is in flight, so items queued after flush() started cannot hold it up.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from . import _atexit, _pool
from ._flags import WQ_DFL_ACTIVE, WQ_MAX_ACTIVE, WQ_ORDERED, WQ_USER_FLAGS, WQFlags
from ._future import CallWork, cancel_pending_futures
from ._pool import (
    NOWAIT,
    Completion,
    Draft,
    PoolWorkqueue,
    WorkerPool,
    activate_inactive,
    arm_tick,
    check_timeout,
    current_workqueue,
    deadline_of,
    every_worker,
    insert_work,
    kick_pool,
    lock,
    lock_acquire,
    lock_release,
    lock_take_contended,
    pool_set,
    release_pwq,
    running_workers,
    start_rescuer,
    time_left,
    try_to_grab_pending,
    wait_slice,
    wake_work_flushers,
    work_name,
)
from ._shown import shown
from ._stats import PoolStats, TraceHook, WorkqueueStats
from ._timer import add_timer, armed_timers
from ._topology import Topology, _sched_getcpu, _this_thread
from ._work import DelayedWork, Work

if TYPE_CHECKING:
    from ._serial import SerialExecutor  # which imports us

__all__ = ["Workqueue", "alloc_workqueue", "alloc_ordered_workqueue", "default_topology"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Workqueue states, in the order a workqueue goes through them.
_RUNNING, _DRAINING, _DESTROYING, _DESTROYED = range(4)
_STATE_NAMES = ("running", "draining", "being destroyed", "destroyed")

_default_topology: Topology | None = None
_default_topology_lock = threading.Lock()  # guards the creation of _default_topology
if hasattr(os, "register_at_fork"):  # a thread of the parent may hold it at a fork
    os.register_at_fork(
        after_in_child=_default_topology_lock._at_fork_reinit)  # type: ignore[attr-defined]


def default_topology() -> Topology:
    """The topology of this process's CPUs, shared by workqueues made without one."""
    global _default_topology
    with _default_topology_lock:
        if _default_topology is None:
            _default_topology = Topology()
        return _default_topology


def _check_delay(delay: float) -> float:
    if isinstance(delay, bool) or not isinstance(delay, (int, float)):
        raise TypeError(f"delay must be a number of seconds, not {type(delay).__name__}")
    # The timer thread waits with Condition.wait(), which takes at most
    # threading.TIMEOUT_MAX (about 292 years).
    if not 0 <= delay <= threading.TIMEOUT_MAX:
        raise ValueError(f"delay must be a number of seconds from 0 to threading.TIMEOUT_MAX "
                         f"({threading.TIMEOUT_MAX:g}), got {shown(delay)}")
    return float(delay)


def _check_flags(flags: object) -> None:
    if isinstance(flags, bool) or not isinstance(flags, int):
        raise TypeError(f"flags must be an int of WQ_* flags, not {type(flags).__name__}")
    if flags < 0:
        # Its two's complement has every high bit set: not an unknown flag,
        # a number that is no combination of flags at all.
        raise ValueError(f"flags must be a non-negative combination of WQ_* flags, "
                         f"got {shown(flags)}")


def _check_work(work: object, kind: type[Work] = Work) -> None:
    if not isinstance(work, kind):
        hint = ""
        if callable(work) and not isinstance(work, type):
            # What a concurrent.futures user passes first.
            hint = (f": make it a {kind.__name__}(func), which calls func(work), "
                    "or submit() the call")
        raise TypeError(f"expected a {kind.__name__}, not {type(work).__name__}{hint}")


class Workqueue(Executor):
    """A workqueue; make one with alloc_workqueue() or alloc_ordered_workqueue().

    The kernel's interface, on a Work (or DelayedWork) you allocate:

        queue_work(w) / queue_work_on(cpu, w)              -> bool
        queue_delayed_work(dw, s) / queue_delayed_work_on(cpu, dw, s) -> bool
        mod_delayed_work(dw, s) / mod_delayed_work_on(cpu, dw, s)     -> bool
        flush(), drain(), destroy(), set_max_active(n), freeze(), thaw()
        stats(), dump(), add_trace_hook(hook), remove_trace_hook(hook)

    flush(), drain(), destroy() and freeze() take a keyword-only timeout
    (seconds), past which they raise TimeoutError (see each).

    The Executor interface, where each call becomes a work item of its own:

        submit(fn, *args, **kwargs) -> Future, map(...), shutdown(...),
        serial(key) -> an Executor running one key's calls in order

    shutdown() is destroy() for executors: it drains, then releases the
    pools; like destroy(), it refuses all queueing but chained queueing
    from the workqueue's own items as soon as it starts (submit() is
    refused even from those, as ThreadPoolExecutor's is from its tasks).

    Where it differs from ThreadPoolExecutor, on purpose (kernel semantics):
    there is no max_workers -- calls run up to max_active at a time per pool,
    and concurrency management runs one per CPU unless it blocks (see
    blocking()) or runs long; submit() raises on a draining workqueue
    (drain()), and a frozen one holds its calls until thaw(); a
    non-callable fn is a TypeError from submit() itself, not in the future;
    shutdown() refuses what would deadlock or never end (see there); and
    a workqueue is freed only once destroyed (or shut down): until then its
    pools hold it, as the kernel's pools hold a workqueue until
    destroy_workqueue(), so one merely dropped stays, with its rescuer
    thread, for the life of its topology (a ThreadPoolExecutor dropped
    without shutdown() is collected and its threads exit).  Use it in a
    with block, or shut it down.
    """

    def __init__(self, name: str, flags: int = 0, max_active: int = 0,
                 topology: Topology | None = None) -> None:
        if not isinstance(name, str):
            raise TypeError(f"a workqueue name must be a str, not {type(name).__name__}")
        if not name:
            raise ValueError("a workqueue name must not be empty")
        _check_flags(flags)
        unknown = int(flags) & ~int(WQ_USER_FLAGS | WQ_ORDERED)  # int: ~IntFlag keeps known bits
        if unknown:
            raise ValueError(f"unknown workqueue flags {shown(unknown, '#x')}")
        if isinstance(max_active, bool) or not isinstance(max_active, int):
            raise TypeError(f"max_active must be an int, not {type(max_active).__name__}")
        if not 0 <= max_active <= WQ_MAX_ACTIVE:
            raise ValueError(f"max_active must be 0 (default) to {WQ_MAX_ACTIVE}, "
                             f"got {shown(max_active)}")
        if flags & WQ_ORDERED and max_active != 1:
            # An ordered queue runs one item at a time; with more it would
            # refuse set_max_active() as ordered and still not be.
            raise ValueError(f"the ordered flag needs max_active 1, got {shown(max_active)}: "
                             "use alloc_ordered_workqueue()")
        if topology is None:
            topology = default_topology()
        elif not isinstance(topology, Topology):
            raise TypeError(f"topology must be a Topology, not {type(topology).__name__}")
        self.name = name
        self.flags = WQFlags(flags)
        self.topology = topology
        self._ordered = bool(flags & WQ_ORDERED)
        self._max_active = max_active or WQ_DFL_ACTIVE
        self._cpu_intensive = bool(flags & WQFlags.WQ_CPU_INTENSIVE)
        highpri = bool(flags & WQFlags.WQ_HIGHPRI)
        # Everything below is guarded by the engine lock, but _destroyed (an
        # Event) and _serial_domain (see there); start_rescuer() sets
        # _rescuer without it, before any item can be queued.
        self._state = _RUNNING
        self._nr_drainers = 0
        self._shutdown = False
        # A destroy() (or shutdown(wait=True)) stopped waiting in its drain
        # (interrupted, or timed out) and left the rest to a thread of its
        # own (see _hand_off_destroy), which is _destroy_thread; a
        # shutdown(wait=False)'s is too.
        self._destroy_handed_off = False
        self._destroy_thread: threading.Thread | None = None
        self._destroyed = threading.Event()
        # Flush colors.  Every item queued now takes color _work_color, and
        # _nr_current counts those not yet finished (or cancelled).  For
        # each older color c, _in_flight[c] counts its unfinished items; it
        # has no zero entries.  (The current color is a plain int because
        # every queueing and every finished item touches it.)
        self._work_color = 0
        self._nr_current = 0
        self._in_flight: dict[int, int] = {}
        self._flushers: list[tuple[int, Completion]] = []
        self._frozen = False
        self._freezing: list[Completion] | None = None
        # Each hook with its name, for the log should it fail (see add_trace_hook).
        self._trace_hooks: tuple[tuple[TraceHook, str], ...] = ()
        self._maydays: list[PoolWorkqueue] = []
        self._rescuer: _pool.Worker | None = None
        # serial(key)'s executors and their LoadIndex (see _serial), made on
        # first use; guarded by _serial's own lock.
        self._serial_domain: object = None
        pset = pool_set(topology)
        # Made whole or not at all: the pools would hold a workqueue that
        # Ctrl-C kept from its caller, who cannot destroy it, for good.
        try:
            with lock:
                if flags & (WQFlags.WQ_UNBOUND | WQ_ORDERED):
                    self._pwqs: dict[int, PoolWorkqueue] = {}
                    self._unbound_pwq: PoolWorkqueue | None = self._link(
                        pset.get_pool(None, highpri))
                else:
                    self._unbound_pwq = None
                    self._pwqs = {cpu: self._link(pset.get_pool(cpu, highpri))
                                  for cpu in topology.possible()}
            if flags & WQFlags.WQ_MEM_RECLAIM:
                # Made now, while threads can still be made (the point of a rescuer).
                start_rescuer(self)
            _atexit.register(self)
        except BaseException:
            self._unmake(pset)
            raise

    def _unmake(self, pset: _pool.PoolSet) -> None:
        """Undo an __init__ that Ctrl-C cut short (see _pool.insert_work)."""
        with lock:
            for pool in pset.pools():
                if any(pwq.wq is self for pwq in pool.pwqs):
                    pool.pwqs[:] = [pwq for pwq in pool.pwqs if pwq.wq is not self]
            rescuer = self._rescuer
            if rescuer is not None:
                rescuer.die = True
                if rescuer.idle:
                    rescuer.idle = False
                    rescuer.wake.release()

    def _link(self, pool: WorkerPool) -> PoolWorkqueue:
        pwq = PoolWorkqueue(self, pool, self._max_active)
        pool.pwqs.append(pwq)
        return pwq

    def _all_pwqs(self) -> list[PoolWorkqueue]:
        if self._unbound_pwq is not None:
            return [self._unbound_pwq]
        return list(self._pwqs.values())

    def __repr__(self) -> str:
        return (f"<Workqueue {self.name!r} flags={self.flags!r} max_active={self._max_active} "
                f"{_STATE_NAMES[self._state]}>")

    # -- queueing -----------------------------------------------------------

    def queue_work(self, work: Work) -> bool:
        """Queue *work* on the calling thread's CPU (queue_work).

        Returns False, doing nothing, if it is already pending or disabled.
        An item that is running on one of this workqueue's pools is queued
        on that pool instead, whatever CPU is asked for, as the kernel's
        __queue_work does: that is how it never runs concurrently with
        itself.  So an item that queues itself again from its own function
        stays on the pool it runs on: it moves to another CPU only when
        queued there while it is not running.
        """
        if not isinstance(work, Work):
            _check_work(work)
        # Lock-free early out, like the kernel's test_and_set_bit(PENDING):
        # an item seen pending (or disabled) at this instant coalesces with
        # its pending instance, which has yet to start -- just as if we had
        # looked under the lock.  (One attribute read is atomic under the GIL.)
        if work._pending or work._disable:
            self._check_not_destroyed()
            return False
        pwq = self._unbound_pwq
        if pwq is None:
            # topology.current_cpu(), inlined for threads that are not
            # workers (keep them alike): a call costs some 3% of this one.
            topology = self.topology
            cpu = None
            if _this_thread.binding is None and _sched_getcpu is not None:
                cpu = topology._online.by_host.get(_sched_getcpu())
            if cpu is None:
                cpu = topology.current_cpu()
            pwq = self._pwqs[cpu]
        # Taken inside the try, for Ctrl-C, and not with a `with`, for
        # the convoy (see lock_take_contended).
        taken: list[bool] = []
        try:
            taken.extend(map(lock_acquire, NOWAIT))
            if not taken[-1]:
                lock_take_contended(taken)
            if work._pending or work._disable:
                # Turned so since the look above: as there, a destroyed
                # queue is said to be one whatever the item's state.
                self._check_not_destroyed()
                return False
            if self._state:
                self._check_queueing()
            worker = work._worker
            if worker is not None:
                pwq = self._last_pwq(worker, pwq)
            # insert_work(pwq, work), inlined: the hot path (keep them
            # alike).  In that order for Ctrl-C: see there.
            pool = pwq.pool
            active = pwq.nr_active < pwq.max_active
            if active:
                if pool.nr_running == 0:
                    kick_pool(pool)
                elif pool.tick is None:
                    arm_tick(pool)
                pwq.nr_active += 1
                worklist = pool.worklist
            else:
                worklist = pwq.inactive
            work._pending = True
            work._pwq = pwq
            work._seq += 1
            work._color = self._work_color
            self._nr_current += 1
            pwq.nr_queued += 1
            work._entry = worklist
            worklist.nr += 1
            worklist.items.append(work)
            if self._trace_hooks:  # under the lock: nobody sees the item yet
                self._trace("queue", work, pool)
                if active:
                    self._trace("activate", work, pool)
        finally:
            if taken and taken[-1]:
                lock_release()
        return True

    def queue_work_on(self, cpu: int, work: Work) -> bool:
        """Queue *work* on *cpu*'s pool (queue_work_on); see queue_work().

        The CPU may be offline: its pool then runs unbound.  For unbound
        workqueues the CPU is only checked, as the kernel treats it as a hint.
        An item still running on another of this workqueue's pools is queued
        there, not on *cpu* (see queue_work()).
        """
        pwq = self._unbound_pwq
        if pwq is None:
            if type(cpu) is not int:
                # True and 1.0 would find CPU 1's pwq: refused; an int
                # subclass (an IntEnum) is taken as the int it is.
                self.topology._check_cpu(cpu)
                cpu = int(cpu)
            pwq = self._pwqs.get(cpu)
            if pwq is None:
                self.topology._check_cpu(cpu)  # raises: every possible CPU has a pwq
                raise AssertionError(f"no pool_workqueue for CPU {cpu}")
        else:
            self.topology._check_cpu(cpu)
        if not isinstance(work, Work):
            _check_work(work)
        if work._pending or work._disable:  # lock-free early out: see queue_work()
            self._check_not_destroyed()
            return False
        taken: list[bool] = []
        try:  # as in queue_work()
            taken.extend(map(lock_acquire, NOWAIT))
            if not taken[-1]:
                lock_take_contended(taken)
            if work._pending or work._disable:
                # Turned so since the look above: as there, a destroyed
                # queue is said to be one whatever the item's state.
                self._check_not_destroyed()
                return False
            if self._state:
                self._check_queueing()
            worker = work._worker
            if worker is not None:
                pwq = self._last_pwq(worker, pwq)
            insert_work(pwq, work)
        finally:
            if taken and taken[-1]:
                lock_release()
        return True

    def _last_pwq(self, worker: _pool.Worker, pwq: PoolWorkqueue) -> PoolWorkqueue:
        """Where a still-running item goes (non-reentrancy, lock held)."""
        last = worker.current_pwq
        if last is not None and last.wq is self:
            return last
        return pwq

    def _is_chained(self) -> bool:
        """True if the calling thread runs an item of this workqueue (is_chained_work)."""
        return current_workqueue() is self

    def _check_not_destroyed(self) -> None:
        """Refuse queueing on a destroyed queue, also of an item whose
        queueing would be a no-op (pending elsewhere, or disabled): the
        mistake is the queue, whatever the item's state."""
        if self._state == _DESTROYED:
            raise RuntimeError(f"workqueue {self.name!r} is destroyed; nothing can be queued on it")

    def _check_queueing(self) -> None:
        """Refuse queueing on a destroyed or draining queue, except chained work."""
        self._check_not_destroyed()
        if not self._is_chained():
            raise RuntimeError(
                f"workqueue {self.name!r} is {_STATE_NAMES[self._state]}: only its own "
                f"work items may queue on it now")

    def queue_delayed_work(self, dwork: DelayedWork, delay: float) -> bool:
        """Queue *dwork* after *delay* seconds (queue_delayed_work).

        A delay of 0 queues at once.  Returns False if already pending (on
        its timer or queued) or disabled.  The item is queued on the CPU the
        caller runs on now.
        """
        return self._queue_delayed(None, dwork, delay)

    def queue_delayed_work_on(self, cpu: int, dwork: DelayedWork, delay: float) -> bool:
        """Queue *dwork* on *cpu* after *delay* seconds (queue_delayed_work_on)."""
        self.topology._check_cpu(cpu)
        return self._queue_delayed(cpu, dwork, delay)

    def _delayed_args(self, cpu: int | None, dwork: DelayedWork,
                      delay: float) -> tuple[int | None, float]:
        """Check a delayed queueing's arguments; return its CPU and delay.

        A bound workqueue's item goes to the given CPU, else to the CPU the
        caller runs on now; an unbound one's CPU is None.
        """
        _check_work(dwork, DelayedWork)
        delay = _check_delay(delay)
        if cpu is None and self._unbound_pwq is None:
            cpu = self.topology.current_cpu()
        return cpu, delay

    def _queue_delayed(self, cpu: int | None, dwork: DelayedWork, delay: float) -> bool:
        cpu, delay = self._delayed_args(cpu, dwork, delay)
        with lock:
            if dwork._pending or dwork._disable:
                self._check_not_destroyed()
                return False
            if self._state:
                self._check_queueing()
            self._arm_delayed(cpu, dwork, delay)
        return True

    def mod_delayed_work(self, dwork: DelayedWork, delay: float) -> bool:
        """(Re)queue *dwork* to run *delay* seconds from now (mod_delayed_work).

        Whether it was pending or not, it is pending afterwards (unless
        disabled).  Returns True if it was pending (its timer was modified),
        False if it was idle and got queued.
        """
        return self._mod_delayed(None, dwork, delay)

    def mod_delayed_work_on(self, cpu: int, dwork: DelayedWork, delay: float) -> bool:
        """mod_delayed_work() on *cpu* (mod_delayed_work_on)."""
        self.topology._check_cpu(cpu)
        return self._mod_delayed(cpu, dwork, delay)

    def _mod_delayed(self, cpu: int | None, dwork: DelayedWork, delay: float) -> bool:
        cpu, delay = self._delayed_args(cpu, dwork, delay)
        with lock:
            if self._state:
                self._check_queueing()
            was_pending = try_to_grab_pending(dwork)
            if not dwork._disable:
                self._arm_delayed(cpu, dwork, delay)
            return was_pending

    def _arm_delayed(self, cpu: int | None, dwork: DelayedWork, delay: float) -> None:
        """__queue_delayed_work: make *dwork*, checked, pending (lock held).

        Pending on its timer from the last call on, as insert_work()
        makes it pending on a list (see there, for Ctrl-C): a timer armed
        by a call cut short finds _timer None as it fires, and does
        nothing.
        """
        dwork._wq = self
        dwork._cpu = cpu
        if delay == 0:
            self._timer_queue_locked(dwork)
        else:
            handle = add_timer(delay, self._delayed_work_timer_fn, dwork)
            dwork._entry = None  # pending on the timer, not on a list
            dwork._timer = handle
            dwork._pending = True

    def _delayed_work_timer_fn(self, dwork: DelayedWork) -> None:
        """delayed_work_timer_fn: runs on the timer thread."""
        with lock:
            handle = dwork._timer
            # A timer that fired as it was being deleted finds a new timer
            # (or none): then it is stale and does nothing.
            if handle is None or handle.callback is not None:
                return
            dwork._timer = None
            queued = self._timer_queue_locked(dwork)
        if not queued:
            self._log_dropped(dwork)

    def _log_dropped(self, dwork: DelayedWork) -> None:
        logger.error(
            "workqueue %s: delayed work %s became due while the workqueue is %s; "
            "it is not run (cancel delayed work before drain() or destroy())",
            self.name, work_name(dwork), _STATE_NAMES[self._state])

    def _timer_queue_locked(self, dwork: DelayedWork) -> bool:
        """Queue a delayed item whose delay is over, or that has none (lock held).

        False if the workqueue refused it (draining or destroyed, and not
        chained): the item is then idle, and the caller logs that after
        dropping the lock.
        """
        if self._state:
            if self._state == _DESTROYED or not self._is_chained():
                dwork._pending = False
                if dwork._worker is None and dwork._flushers:
                    wake_work_flushers(dwork, dwork._seq)
                return False
        pwq = self._unbound_pwq
        if pwq is None:
            cpu = dwork._cpu
            assert cpu is not None  # a bound workqueue's item always has its CPU
            pwq = self._pwqs[cpu]
        worker = dwork._worker
        if worker is not None:
            pwq = self._last_pwq(worker, pwq)
        insert_work(pwq, dwork)
        return True

    # -- flush, drain, destroy -----------------------------------------------

    def _check_not_own_item(self, what: str) -> None:
        if self._is_chained():
            raise RuntimeError(
                f"{what}() of workqueue {self.name!r} from one of its own work items "
                "would deadlock")

    def flush(self, *, timeout: float | None = None) -> None:
        """Wait for every item queued before the call (flush_workqueue).

        Items queued meanwhile do not delay it.  Delayed items still on their
        timers are not waited for.  TimeoutError if *timeout* seconds pass
        first, with the workqueue's dump(); later flushes wait as if this
        one had never been.
        """
        timeout = check_timeout(timeout)
        if not self._flush(deadline_of(timeout)):
            raise self._timed_out("flush", timeout)

    def _flush(self, deadline: float | None) -> bool:
        """flush(); False if *deadline* (None: none) passed first."""
        completion = Completion()
        # Registered, and taken back when the wait times out, inside the try
        # that takes it back on any other way out: Ctrl-C, wherever it
        # lands, leaves no flush behind (it would stay until its color
        # drains, one more for every such call).  The new color stays: it
        # is the one every item queued since has, and an older color only
        # ever completes flushes sooner.
        try:
            with lock:
                self._check_not_own_item("flush")
                color = self._work_color
                if self._nr_current:
                    self._in_flight[color] = self._nr_current
                    self._nr_current = 0
                self._work_color = color + 1
                if not self._in_flight or min(self._in_flight) > color:
                    return True
                self._flushers.append((color, completion))
            if completion.wait(time_left(deadline)):
                return True
            with lock:
                return not self._take_back_flush(completion)  # or it completed as the wait ended
        except BaseException:
            with lock:
                self._take_back_flush(completion)
            raise

    def _take_back_flush(self, completion: Completion) -> bool:
        """Unregister a flush that its caller stopped waiting for (timeout,
        Ctrl-C); False if it is not registered: not yet, or completed
        (engine lock held)."""
        for i, (_, registered) in enumerate(self._flushers):
            if registered is completion:
                del self._flushers[i]
                return True
        return False

    def _timed_out(self, what: str, timeout: float | None, then: str = "") -> TimeoutError:
        """The TimeoutError of a wait for the workqueue: what is still
        there (its dump()), after *then*."""
        assert timeout is not None  # only a bounded wait times out
        return TimeoutError(f"{what}() of workqueue {self.name!r} timed out after {timeout:g} s"
                            f"{then}; still there:\n{self.dump()}")

    def _flush_progress(self) -> None:
        """A flush color drained: complete the flushes it held (lock held)."""
        oldest = min(self._in_flight) if self._in_flight else math.inf
        left = []
        for color, completion in self._flushers:
            if color < oldest:
                completion.complete()
            else:
                left.append((color, completion))
        self._flushers = left

    def drain(self, *, timeout: float | None = None) -> None:
        """Flush until empty, refusing all but chained queueing (drain_workqueue).

        While it runs, only this workqueue's own items may queue on it; other
        queueing raises RuntimeError.  Cancel delayed items first: one whose
        timer fires meanwhile is dropped and logged.  TimeoutError if
        *timeout* seconds pass first, with the workqueue's dump(): the
        workqueue then takes everyone's items again, as after a drain
        (unless another drain, or a destroy(), is under way).
        """
        timeout = check_timeout(timeout)
        if not self._drain(deadline_of(timeout)):
            raise self._timed_out("drain", timeout)

    def _drain(self, deadline: float | None) -> bool:
        """drain(); False if *deadline* (None: none) passed first."""
        draining = False
        # Counted inside the try that ends it, in the same breath as the
        # count (no call in between, where Ctrl-C lands): a drain left
        # counted would refuse everyone's queueing for ever.
        try:
            with lock:
                self._check_not_own_item("drain")
                if self._state == _DESTROYED:
                    raise RuntimeError(f"workqueue {self.name!r} is destroyed")
                if self._frozen:
                    raise RuntimeError(f"drain() of frozen workqueue {self.name!r} would wait "
                                       "for thaw(); thaw it first")
                self._nr_drainers += 1
                draining = True
                if self._state == _RUNNING:
                    self._state = _DRAINING
            tries = 0
            while True:
                if not self._flush(deadline):
                    return False
                with lock:
                    if not self._in_flight and not self._nr_current:
                        return True
                tries += 1
                if tries == 10 or tries % 100 == 0:
                    # What is still there is what keeps queueing itself.
                    logger.warning("workqueue %s: drain() isn't complete after %d tries; "
                                   "still there:\n%s", self.name, tries, self.dump())
        finally:
            if draining:
                with lock:
                    self._nr_drainers -= 1
                    if not self._nr_drainers and self._state == _DRAINING:
                        self._state = _RUNNING

    def destroy(self, *, timeout: float | None = None) -> None:
        """Drain, then release the pools and stop the rescuer (destroy_workqueue).

        Later queueing raises RuntimeError.  Idle workers of pools that no
        workqueue uses any longer exit.

        TimeoutError if *timeout* seconds pass before the drain ends, with
        the workqueue's dump().  The destruction then goes on without its
        caller, on a thread of its own: the workqueue refuses all but
        chained queueing, as it did, and freeze() (see there), and is
        released once its items are done; Ctrl-C in the wait does the
        same.  Destroying a workqueue twice is an error, except after a
        destroy() that stopped waiting: a second destroy() waits for the
        end of the first one's destruction (with a timeout of its own),
        and may be called again.
        """
        timeout = check_timeout(timeout)
        deadline = deadline_of(timeout)
        ours = False
        # The destruction is ours from the moment the workqueue says so, in
        # the same breath (no call in between, where Ctrl-C lands), and
        # inside the try that hands it off if the call ends early: never
        # left half-way with nobody to end it.
        try:
            with lock:
                self._check_not_own_item("destroy")
                resume = self._destroy_handed_off
                if self._state >= _DESTROYING and not resume:
                    raise RuntimeError(f"workqueue {self.name!r} is already destroyed")
                if not resume:
                    if self._frozen:
                        raise RuntimeError(f"destroy() of frozen workqueue {self.name!r} would "
                                           "wait for thaw(); thaw it first")
                    self._shutdown = True
                    self._state = _DESTROYING
                    ours = True
            if resume:
                if not self._wait_destroyed(deadline):
                    raise self._timed_out("destroy", timeout, " waiting for the end of the "
                                          "destruction an earlier destroy() left going on")
                return
            if not self._destroy(deadline):
                self._hand_off_destroy()
                ours = False
                raise self._timed_out("destroy", timeout, (
                    f"; its destruction goes on in thread {self.name}-shutdown, "
                    "and destroy() again waits for its end"))
        except BaseException:
            if ours:
                self._hand_off_destroy()
            raise

    def _wait_destroyed(self, deadline: float | None = None) -> bool:
        """Wait for the end of destroy(); False if *deadline* passed first."""
        while True:
            left = time_left(deadline)
            nap = wait_slice(left)
            if self._destroyed.wait(nap):
                return True
            if nap == left:  # that was all the time left
                return False

    def _destroy(self, deadline: float | None) -> bool:
        """The rest of a destroy() that marked the workqueue: drain, then
        release; False if *deadline* passed first, nothing released."""
        if not self._drain(deadline):
            return False
        self._finish_destroy()
        return True

    def _hand_off_destroy(self, resumable: bool = True) -> None:
        """The destruction goes on without its caller, on a thread of its
        own: shutdown(wait=False)'s, or the rest of a destroy() that
        stopped waiting (Ctrl-C, timeout).  The items still queued or
        running must not lose their pools and rescuer, nor chained
        queueing be refused, nor shutdown(wait=True) elsewhere return
        before they end.  If *resumable*, a second destroy() waits for it
        instead of calling it an error.  Calling this again starts no
        second thread; after the end of the destruction, one that ends
        at once."""
        with lock:
            if self._destroy_thread is None:
                # Started under the lock, as workers are (see the lock's
                # rules in _pool), and recorded in the same hold: no other
                # thread sees it started and not recorded.  Ctrl-C as
                # start() returns may still skip the record; the thread
                # then records itself, or ends at once if the caller's
                # cleanup, calling this again, started another (see
                # _drain_and_release).
                thread = threading.Thread(target=self._drain_and_release,
                                          name=f"{self.name}-shutdown", daemon=True)
                thread.start()
                self._destroy_thread = thread
            if resumable:
                self._destroy_handed_off = True

    def _drain_and_release(self) -> None:
        """destroy() on a thread of its own (shutdown(wait=False), or the
        rest of a destroy() that stopped waiting).  A drain() that fails is
        logged: nobody waits here to hear it, and it must not end up as a
        traceback of the library's thread.  The workqueue is released
        either way, as destroy() does."""
        me = threading.current_thread()
        with lock:
            if self._destroy_thread is None:
                self._destroy_thread = me  # Ctrl-C skipped the record: see _hand_off_destroy
            elif self._destroy_thread is not me:
                return  # started again as Ctrl-C skipped our record: the other one goes on
        try:
            if self._state != _DESTROYED:  # see _finish_destroy
                self._drain(None)
        except Exception:
            logger.exception("workqueue %s: drain() failed while destroying it", self.name)
        finally:
            self._finish_destroy()

    def _finish_destroy(self) -> None:
        """The end of destroy(), once drained (or drain() failed).  Once
        more does no harm: a destroy() that Ctrl-C cut short as it ended
        hands off a destruction that is over, or all but."""
        with lock:
            # Each step once, and taken up again after a call that Ctrl-C
            # cut short (see _pool.insert_work).
            self._state = _DESTROYED
            for pwq in self._all_pwqs():
                if pwq in pwq.pool.pwqs:
                    release_pwq(pwq)
            rescuer = self._rescuer
            if rescuer is not None:
                rescuer.die = True
                if rescuer.idle:
                    rescuer.idle = False
                    rescuer.wake.release()
        # Also when serial() was never used: it is refused from now on.
        # Without the engine lock: it takes the topology's hotplug lock.
        from ._serial import close_serial
        close_serial(self)
        self._destroyed.set()

    # -- tuning ----------------------------------------------------------------

    def set_max_active(self, max_active: int) -> None:
        """Change max_active at run time (workqueue_set_max_active).

        Where the kernel warns and clamps, or ignores the call, this raises:
        ValueError for a max_active outside 1 to WQ_MAX_ACTIVE, and
        RuntimeError on an ordered workqueue, which runs one item at a time,
        or a destroyed one."""
        if isinstance(max_active, bool) or not isinstance(max_active, int):
            raise TypeError(f"max_active must be an int, not {type(max_active).__name__}")
        if not 1 <= max_active <= WQ_MAX_ACTIVE:
            raise ValueError(f"max_active must be 1 to {WQ_MAX_ACTIVE}, got {shown(max_active)}")
        with lock:
            if self._ordered:
                raise RuntimeError(f"{self.name!r} is ordered: it runs one item at a time")
            if self._state == _DESTROYED:
                raise RuntimeError(f"workqueue {self.name!r} is destroyed")
            self._max_active = max_active
            if not self._frozen:
                self._set_pwqs_max_active(max_active)

    def _set_pwqs_max_active(self, max_active: int) -> None:
        """Give every pwq *max_active*, and activate what fits (lock held).

        A pwq whose max_active went up with its inactive items left there
        would keep them waiting: Ctrl-C in the loop (see insert_work) has
        it run again, to the end.
        """
        pwqs = self._all_pwqs()
        try:
            for pwq in pwqs:
                pwq.max_active = max_active
                activate_inactive(pwq)
        except BaseException:
            for pwq in pwqs:
                pwq.max_active = max_active
                activate_inactive(pwq)
            raise

    def freeze(self, *, timeout: float | None = None) -> None:
        """Hold new items back, and return once in-flight ones are done.

        Only for WQ_FREEZABLE workqueues (freeze_workqueues_begin/busy).
        Items queued while frozen wait, in order, until thaw().

        TimeoutError if *timeout* seconds pass while items are still in
        flight, with the workqueue's dump(), which names them.  Only the
        wait is over: the workqueue stays frozen, the items in flight go
        on, and thaw() or another freeze() work as ever.  Ctrl-C in the
        wait leaves the same.

        RuntimeError on a workqueue being destroyed: the freeze would hold
        the destruction's drain, and whoever waits for it, until thaw()
        (destroy() and shutdown() refuse a frozen workqueue in turn).

        RuntimeError once the interpreter exits (see _atexit), as the
        kernel's suspend fails with -EBUSY once a reboot has begun: the
        exit waits for the submitted calls, and one that a freeze held back
        from then on would wait for a thaw() that nobody calls any more.
        A freeze() that came first stands: the exit drops the calls it
        holds back, and waits for those it lets run.
        """
        timeout = check_timeout(timeout)
        if not self.flags & WQFlags.WQ_FREEZABLE:
            raise RuntimeError(f"workqueue {self.name!r} was not allocated with WQ_FREEZABLE")
        completion = Completion()
        # Registered, and taken back when the wait times out, inside the try
        # that takes it back on any other way out (see _flush()).
        try:
            with lock:
                self._check_not_own_item("freeze")
                if self._state == _DESTROYED:
                    raise RuntimeError(f"workqueue {self.name!r} is destroyed")
                # Checked under the lock under which destroy() and shutdown()
                # check for a freeze and mark the destruction: one of the two
                # refuses the other.  A freeze would hold the destruction's
                # drain, and whoever waits for it, until thaw().
                if self._state == _DESTROYING:
                    raise RuntimeError(f"workqueue {self.name!r} is being destroyed: a freeze "
                                       "would hold its drain until thaw()")
                # Read under the lock that the exit hook's every look at our
                # calls takes, after setting it: a freeze either comes
                # before a look, which sees it, or refuses.
                if _atexit._exiting:
                    raise RuntimeError(f"cannot freeze workqueue {self.name!r} after "
                                       "interpreter exit began")
                self._frozen = True
                self._set_pwqs_max_active(0)
                if not any(pwq.nr_active for pwq in self._all_pwqs()):
                    return
                freezing = self._freezing
                if freezing is None:
                    freezing = self._freezing = []
                freezing.append(completion)
            if completion.wait(timeout):
                return
            with lock:
                if not self._take_back_freeze(completion):
                    return  # it completed as the wait ended
        except BaseException:
            with lock:
                self._take_back_freeze(completion)
            raise
        raise self._timed_out("freeze", timeout, " with items still in flight; it stays "
                              "frozen (thaw() lets the held-back items run)")

    def _take_back_freeze(self, completion: Completion) -> bool:
        """Unregister a freeze() that its caller stopped waiting for
        (timeout, Ctrl-C); False if it is not registered: not yet, or
        completed (engine lock held).  With the last one taken back,
        _freezing is None again: the engine looks for a freeze to complete
        while it is set."""
        freezing = self._freezing
        if freezing is None or completion not in freezing:
            return False
        freezing.remove(completion)
        if not freezing:
            self._freezing = None
        return True

    def _freeze_progress(self) -> None:
        """A pwq went idle while freezing (lock held)."""
        if self._freezing is not None and not any(p.nr_active for p in self._all_pwqs()):
            self._complete_freezes()

    def thaw(self) -> None:
        """Let held-back items run again (thaw_workqueues); a no-op if not frozen."""
        with lock:
            if not self._frozen:
                return
            self._frozen = False
            self._set_pwqs_max_active(self._max_active)
            if self._freezing is not None:
                self._complete_freezes()

    def _complete_freezes(self) -> None:
        """Complete every freeze() waiting (lock held), even if Ctrl-C
        cuts the loop short: it runs again (completing is idempotent)."""
        freezing = self._freezing
        assert freezing is not None
        try:
            for completion in freezing:
                completion.complete()
        except BaseException:
            for completion in freezing:
                completion.complete()
            raise
        finally:
            self._freezing = None

    # -- introspection -------------------------------------------------------

    def add_trace_hook(self, hook: TraceHook) -> None:
        """Call hook(event, work, cpu) at every trace point.

        ``event`` is one of TRACE_EVENTS, the kernel's trace points: "queue"
        (queue_work() took the item), "activate" (it entered its pool's
        worklist), "execute_start" and "execute_end"; ``cpu`` is the CPU of
        the item's pool, None for an unbound one.  Hooks must be quick and
        must not call into the workqueue.  Whatever a hook raises,
        KeyboardInterrupt and SystemExit included, is logged and the engine
        goes on, as after a work function that raises: hooks run under the
        engine lock, inside its steps.  The log names the hook as its
        repr() did here."""
        if not callable(hook):
            raise TypeError(f"a trace hook must be callable, not {type(hook).__name__}")
        # Named now, the engine lock free: a hook fails under it, where its
        # repr() -- the program's code, which may call into the workqueue
        # -- would deadlock every workqueue of the process (see Draft).
        named = (hook, work_name(hook))
        with lock:
            self._trace_hooks = (*self._trace_hooks, named)

    def remove_trace_hook(self, hook: TraceHook) -> None:
        """Remove a hook added with add_trace_hook(), the first one added
        that list.remove() would take (``is``, then ==); ValueError if
        absent.  The hooks are compared with the engine lock free."""
        hooks = self._trace_hooks
        while True:
            # == is the program's code, as a hook's repr() is (see
            # add_trace_hook): the hooks are compared as they were at one
            # instant, with the lock free.  The entry found is then taken
            # by identity from the hooks as they are now: one made per
            # add, it is none other, and hooks come at the end, so none
            # added meanwhile is one list.remove() would take before it.
            # Only its own removal meanwhile makes it look again: compared
            # again at every change, other threads adding hooks could keep
            # it comparing for ever.
            found = next((named for named in hooks if named[0] is hook or named[0] == hook),
                         None)
            if found is None:
                raise ValueError(f"{work_name(hook)} is not a trace hook of {self.name!r}")
            with lock:
                hooks = self._trace_hooks
                for i, named in enumerate(hooks):
                    if named is found:
                        self._trace_hooks = (*hooks[:i], *hooks[i + 1:])
                        return

    def _trace(self, event: str, work: Work, pool: WorkerPool) -> None:
        for hook, name in self._trace_hooks:
            try:
                hook(event, work, pool.cpu)
            except BaseException:
                # Whatever it is, as a work function's (see process_works):
                # a hook runs inside a step of the engine, under its lock,
                # and one that raised out of it killed a worker in the
                # middle of its item, counted in its pool for good, or the
                # timer thread every timer needs.  In the main thread, a
                # hook raising every time would also cut short the steps
                # that finish what a Ctrl-C cut short.  The price: Ctrl-C
                # landing inside a hook of the main thread is logged here,
                # not raised (a hook must be quick: that window is short).
                logger.exception("trace hook %s failed", name)

    def stats(self) -> WorkqueueStats:
        """A frozen snapshot of this workqueue's counters, per pool."""
        with lock:
            running = running_workers(self._all_pwqs())
            return WorkqueueStats(
                name=self.name, flags=int(self.flags), max_active=self._max_active,
                pools=tuple(PoolStats.of(pwq, len(workers)) for pwq, workers in running.items()))

    def dump(self) -> str:
        """The workqueue's busy pools and items, like show_one_workqueue()."""
        with lock:
            draft = Draft(f"workqueue {self.name}: flags={self.flags!r} "
                          f"max_active={self._max_active} {_STATE_NAMES[self._state]}"
                          + (" frozen" if self._frozen else ""))
            for pwq, running in running_workers(self._all_pwqs()).items():
                pool = pwq.pool
                pending = [w for w in pool.worklist if w._pwq is pwq]
                if not (running or pending or pwq.inactive.nr):
                    continue
                draft.add(f"\n  pwq {pool.id}: {pool.name} active={pwq.nr_active}/"
                          f"{pwq.max_active} inactive={pwq.inactive.nr}")
                if running:
                    draft.add("\n    in-flight: ")
                    for i, w in enumerate(running):
                        draft.add(f"{', ' if i else ''}{w.name}:")
                        draft.item(w.current)
                if pending:
                    draft.add("\n    pending: ")
                    draft.items(pending)
                if pwq.inactive.nr:
                    draft.add("\n    inactive: ")
                    draft.items(pwq.inactive)
        return draft.text()  # the items named with the lock free (see Draft)

    # -- the Executor face --------------------------------------------------

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Run fn(*args, **kwargs) as a work item; return its Future.

        As with ThreadPoolExecutor, the program does not exit before the
        call has run (see _atexit).
        """
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _atexit._exiting:  # no call: submit() is a hot path
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, not {type(fn).__name__}")
        work = CallWork(fn, args, kwargs)
        future = work.future  # before queueing: a finished call drops it
        self.queue_work(work)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work, then destroy the workqueue.

        As ThreadPoolExecutor.shutdown(): submit() raises RuntimeError from
        now on, and so does the submit() of every serial(key) executor;
        with cancel_futures, submitted calls that have not started are
        cancelled; with wait, return once the workqueue is drained and
        destroyed.  Calling it again is harmless.

        Unlike ThreadPoolExecutor's, it raises RuntimeError, changing
        nothing, where it could not finish: with wait from one of the
        workqueue's own items (which would wait for itself; there,
        ThreadPoolExecutor shuts down and then fails to join its own
        thread), and on a frozen workqueue (the drain would wait for
        thaw()).  shutdown(wait=False) from an item is fine.
        """
        ours = False
        try:  # as in destroy(): the destruction we start is never left half-way
            with lock:
                if wait:
                    self._check_not_own_item("shutdown")
                start = self._state < _DESTROYING
                if start and self._frozen:
                    raise RuntimeError(f"shutdown() of frozen workqueue {self.name!r} would "
                                       "wait for thaw(); thaw it first")
                self._shutdown = True
                if start:
                    self._state = _DESTROYING
                    ours = True
            if cancel_futures:
                from ._serial import cancel_serial_calls
                cancel_pending_futures(self)
                cancel_serial_calls(self)
            if not start:
                if wait:
                    self._wait_destroyed()
            elif wait:
                self._destroy(None)
            else:
                self._hand_off_destroy(resumable=False)
        except BaseException:
            if ours:
                self._hand_off_destroy()
            raise

    def _call_works(self) -> list[Work]:
        """The items behind the calls that submit() and our serial
        executors accepted and that have not finished: queued, waiting for
        max_active, handed to a busy worker or taken by the rescuer, or
        running.  For the exit hook (see _calls_at_exit), and for
        shutdown(cancel_futures=True), which cancels the calls waiting in
        the serial ones."""
        with lock:
            return self._call_works_locked()

    def _calls_at_exit(self) -> tuple[list[Work], list[Work]]:
        """_call_works() in two: the items whose pending queueing will run,
        or that only run now, which the exit hook flushes; and those whose
        pending queueing waits on an inactive list of a frozen workqueue,
        which only thaw() would let run (some may still run now: the hook
        waits for that run, and drops the queueing)."""
        with lock:
            found = self._call_works_locked()
            if not self._frozen:
                return found, []
            will_run: list[Work] = []
            held: list[Work] = []
            for work in found:
                if work._held_by_freeze():
                    held.append(work)
                else:
                    will_run.append(work)
            return will_run, held

    def _call_works_locked(self) -> list[Work]:
        """_call_works(), engine lock held."""
        pwqs = self._all_pwqs()
        pools = {pwq.pool for pwq in pwqs}
        # Any pool's: a call still running elsewhere is handed to the
        # worker running it (see _pool.process_works).
        workers = every_worker(pwqs)
        lists = [pwq.inactive for pwq in pwqs]
        lists += [pool.worklist for pool in pools]
        lists += [w.scheduled for w in workers]
        mine = set(pwqs)
        found = {work: None for lst in lists for work in lst.items
                 if work._is_call and work._entry is lst and work._pwq in mine}
        found.update((w.current, None) for w in workers
                     if w.current is not None and w.current._is_call
                     and w.current_pwq in mine)
        return list(found)

    def _dropped_at_exit(self) -> list[Work]:
        """The items that the exit of the program drops (see _atexit): those
        pending -- in the order they would run, then those on their timers
        -- but the calls of submit(), which the exit waits for."""
        with lock:
            pwqs = self._all_pwqs()
            mine = set(pwqs)
            lists = [w.scheduled for w in every_worker(pwqs)]
            lists += [pool.worklist for pool in {pwq.pool: None for pwq in pwqs}]
            lists += [pwq.inactive for pwq in pwqs]
            # A list's live entries (its iterator): an item cancelled and
            # queued again on the same list still has a dead entry where it
            # was, ahead of where it runs now.
            works = [work for lst in lists for work in lst if work._pwq in mine]
            timer_fn = self._delayed_work_timer_fn
            # One whose timer the timer thread took as we look, its callback
            # yet to queue it, is in neither place: left out.
            works += [arg for callback, arg in armed_timers() if callback == timer_fn]
            # By identity: a Work subclass may compare by value (see WorkList).
            dropped = {id(work): work for work in works if work._pending and not work._is_call}
            return list(dropped.values())

    def serial(self, key: Hashable) -> SerialExecutor:
        """An Executor whose calls run one at a time, in order, on *key*'s CPU.

        Every call for the same key returns the same executor, until it is
        shut down; keys run in parallel, spread over the CPUs by a LoadIndex
        and re-homed when their CPU goes down (its ``cpu`` says where).  A
        key is held until its executor's shutdown(), which releases it: shut
        down the executor of a key you are done with (a connection that
        closed, say), or the workqueue keeps every key it was ever given.
        """
        from ._serial import SerialExecutor
        return SerialExecutor(self, key)


def alloc_workqueue(name: str, flags: int = 0, max_active: int = 0,
                    topology: Topology | None = None) -> Workqueue:
    """Make a workqueue (alloc_workqueue).

    flags: WQ_UNBOUND, WQ_HIGHPRI, WQ_CPU_INTENSIVE, WQ_FREEZABLE, WQ_MEM_RECLAIM.
    max_active: items in flight per CPU (bound) or in all (unbound); 0 means
    WQ_DFL_ACTIVE.  topology: default, the CPUs of this process.

    Beyond the kernel: a max_active below 0 or above WQ_MAX_ACTIVE is a
    ValueError (the kernel clamps it, with a warning), and unknown flags,
    or a negative flags value, are one too.
    """
    return Workqueue(name, flags, max_active, topology)


def alloc_ordered_workqueue(name: str, flags: int = 0,
                            topology: Topology | None = None) -> Workqueue:
    """Make an ordered workqueue: one item at a time, in queueing order."""
    _check_flags(flags)  # before the flags are added to, which would change a negative one
    return Workqueue(name, flags | WQFlags.WQ_UNBOUND | WQ_ORDERED, 1, topology)
