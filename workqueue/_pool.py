"""Worker pools: the threads that run work items, and the engine lock.

This is kernel/workqueue.c's middle layer, on Python threads:

* A worker pool (struct worker_pool) owns a worklist of active items and the
  worker threads that run them.  Every online CPU of a topology has two bound
  pools, normal and high-priority; the topology also has one unbound pool of
  each priority.  Pools are shared by all workqueues that use them.

* A pool_workqueue (struct pool_workqueue) links one workqueue to one pool.
  It enforces the workqueue's max_active there: items beyond it wait, in FIFO
  order, on the pwq's inactive list.

* Bound pools are concurrency-managed (cmwq): nr_running counts the pool's
  workers that are running an item and have not said they are blocking.  A
  pool starts (wakes) another worker only when nr_running drops to zero, so
  normally one item runs per CPU at a time.  An item that blocks without
  saying so stops counting after topology.cpu_intensive_thresh, as with the
  kernel's wq_cpu_intensive_thresh_us.  Unbound pools, and the pools of an
  offline CPU, are not concurrency-managed: every waiting active item gets a
  worker.

* Every pool keeps an idle worker in reserve: a worker about to run items
  first makes sure another one is idle (may_start_working/manage_workers), so
  that a blocking item can be backed up at once.  If no thread can be
  created, workqueues with WQ_MEM_RECLAIM get their items run by their
  rescuer thread (send_mayday/rescuer_thread).

Work-item bookkeeping that the pools do on behalf of workqueues (flush
colors, freeze) is at the end of process_works and in try_to_grab_pending.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._shown import shown
from ._timer import TimerHandle, add_timer, del_timer, timer_pending
from ._topology import Topology, _this_thread, idempotent_notifier

if TYPE_CHECKING:
    from ._work import Work
    from ._workqueue import Workqueue

__all__ = ["lock", "blocking", "current_work", "current_workqueue"]

logger = logging.getLogger(__name__)

# The engine lock.
#
# It guards all mutable engine state: every Work's pending bit, disable
# count, list membership and flushers; every pool's worklist, idle list,
# workers and nr_running, and its workers' flags; every pool_workqueue's
# counters and inactive list; every Workqueue's state, flush colors and
# in-flight counts.  One lock rather than the kernel's per-pool locks: under
# the GIL finer locks buy no parallelism, and a single lock makes the pending
# bit, non-reentrancy and hotplug simple to get right.
#
# Rules: it is held only for bookkeeping, never while a work function runs
# and never while waiting for anything but itself -- with one exception:
# threads are started while it is held, workers, the thread a destroy()
# hands its destruction to, and the timer thread, which the first
# add_timer() starts (Thread.start() waits only for the new thread to
# exist, which needs nothing of ours).  Trace hooks run under
# it, like kernel tracepoints, so they must be quick and must not call back
# into the workqueue.  Work items' repr()s, which the program writes and
# which may call into the workqueue (or wait for a thread that does), run
# outside it: the dumps, the watchdog's reports and the errors that name an
# item take the items under the lock and name them once it is free (see
# Draft); a trace hook is named as it is added, and compared (==) for its
# removal with the lock free (see add_trace_hook, remove_trace_hook).  A
# few records are logged under it (a worker that cannot be made or pinned,
# a trace hook that failed), as the kernel's printk under a pool lock: a
# logging handler must not call into the workqueue, nor wait for a thread
# that does.
# Lock order: topology hotplug lock -> engine lock -> timer lock.  A
# future's condition is never taken while it is held.
#
# Everything it guards is written only with it held.  Reads without it are
# allowed where one attribute's value at one instant is enough: queue_work()
# returns False at once for an item it sees pending or disabled (as the
# kernel tests the PENDING bit without the pool lock), and the properties
# Work.pending and Work.running are snapshots.
lock = threading.Lock()
# Its methods bound once, for the per-item paths (queue_work, process_works):
# calling these is some 60 ns cheaper than lock.acquire() and lock.release().
lock_acquire = lock.acquire
lock_release = lock.release

# Taking the engine lock when another thread holds it (the per-item paths).
#
# Under the GIL, a thread that finds the lock held holds the GIL itself, so
# the owner is not running: it waits for the GIL, a few bytecodes short of
# its release.  Sleeping on the lock then starts a convoy.  A worker drops
# the lock only around each item's function, and any of those drops can wake
# the sleeper (a futex wake on another CPU), which finds the lock taken again
# and sleeps once more, for as long as the worker has items.  Queueing 50,000
# items to a busy worker on another CPU cost 3,000 to 7,000 context switches
# that way, and half the throughput.
# Yielding the GIL instead lets the owner run on to its release, and the lock
# is free when the GIL comes back: no wake-up at all.  The yields are bounded
# for the lock rule's one exception (an owner starting a thread);
# after them we sleep on the lock.
_CONTENDED_YIELDS = 8
_yield_gil = os.sched_yield  # drops the GIL around sched_yield(2)


def lock_acquire_contended() -> None:
    """Take the engine lock, which ``lock_acquire(False)`` found held."""
    for _ in range(_CONTENDED_YIELDS):
        _yield_gil()
        if lock_acquire(False):
            return
    lock_acquire()


# Taking the lock where Ctrl-C may land (queue_work(), in the main thread).
#
# CPython runs a signal's handler as a call returns to Python code: after
# ``lock_acquire(False)`` returned True and before a ``try`` began, a
# KeyboardInterrupt left the lock held for good.  A ``with lock`` has no
# such window, but sleeps on a held lock at once, the convoy above, and
# yielding until the lock looks free does not help: a worker woken on the
# lock takes it without the GIL, between our look and our ``with`` (a
# fifth of submit()'s throughput).  So the caller takes it inside its
# ``try``, through ``taken.extend(map(lock_acquire, ...))``: list.extend()
# stores what acquire() returned before control is back in Python code,
# where a handler could run, and the ``finally`` releases the lock if
# ``taken`` ends with True.
NOWAIT = (False,)
WAIT = (True,)


def lock_take_contended(taken: list[bool]) -> None:
    """Take the engine lock, which ``taken.extend(map(lock_acquire,
    NOWAIT))`` found held, appending to ``taken`` what each attempt
    returned: it ends with True once the lock is ours (see above)."""
    for _ in range(_CONTENDED_YIELDS):
        _yield_gil()
        taken.extend(map(lock_acquire, NOWAIT))
        if taken[-1]:
            return
    taken.extend(map(lock_acquire, WAIT))


_monotonic = time.monotonic

# How long a surplus idle worker lingers before it exits (IDLE_WORKER_TIMEOUT).
IDLE_WORKER_TIMEOUT = 300.0
# How often a pool that cannot create a worker tries again (MAYDAY_INTERVAL).
MAYDAY_INTERVAL = 0.1

# Worker flags.  A worker counts in its pool's nr_running exactly when its
# flags are all clear (the kernel's WORKER_NOT_RUNNING set).
WORKER_PREP = 1 << 0           # not inside the run loop (idle, or managing)
WORKER_UNBOUND = 1 << 1        # its pool is unbound or its CPU is offline
WORKER_CPU_INTENSIVE = 1 << 2  # current item is WQ_CPU_INTENSIVE or ran too long
WORKER_BLOCKED = 1 << 3        # inside blocking(): the kernel's "sleeping"
WORKER_RESCUER = 1 << 4        # a rescuer never counts
WORKER_REBOUND = 1 << 5        # its CPU came back during this run loop


# The longest the main thread sleeps at a time in a call that waits for
# other threads (flush, cancel_sync, Future.result; pvcalls' sockets too).
# The kernel gives a signal sent to the process to any thread that does not
# block it (often a worker being started, which takes one pending as it
# sets its mask), and a main thread asleep in a lock or poll() wakes only
# for a signal given to it; but CPython runs handlers in the main thread
# only.  Looking again at least this often, the main thread runs Ctrl-C's
# handler soon, whoever took it.  (Workers blocking signals instead would
# pass the blocked mask on to every process a work item starts.)  Other
# threads run no handlers: they sleep in one go.
WAIT_SLICE = 0.5


def wait_slice(left: float | None) -> float | None:
    """How long the calling thread sleeps in one go in a wait with ``left``
    seconds to go (``None``: no limit): all of it, or in the main thread
    :data:`WAIT_SLICE` (half a second) at most.

    The rule every wait of this library follows, so that Ctrl-C's handler
    runs soon in a main thread blocked in it (see :data:`WAIT_SLICE` for
    why); public so that libraries built on it (``xenback``, ``pvcalls``)
    and programs can wait the same way::

        deadline = time.monotonic() + timeout
        while not event.wait(wait_slice(deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError

    A ``left`` below 0 (the deadline passed) gives 0, never a negative
    sleep, which ``lock.acquire(timeout=-1)`` takes for no limit; one
    beyond ``threading.TIMEOUT_MAX`` (a deadline at infinity) gives that,
    the longest sleep a lock takes (it refuses more: OverflowError); NaN
    is refused (ValueError), as the library's own timeouts are.
    """
    if left is not None:
        if isinstance(left, bool) or not isinstance(left, (int, float)):
            raise TypeError(f"wait_slice() takes seconds or None, not {type(left).__name__}")
        if not left > 0:
            if left != left:
                raise ValueError("wait_slice() takes seconds or None, not nan")
            left = 0.0
        elif left > threading.TIMEOUT_MAX:
            left = threading.TIMEOUT_MAX
    if threading.get_ident() != threading.main_thread().ident:
        return left
    return WAIT_SLICE if left is None else min(left, WAIT_SLICE)


def sleep_on(lock: threading.Lock, timeout: float | None = None) -> bool:
    """``lock.acquire(timeout=...)`` (``None``: no limit), in slices of
    :func:`wait_slice`."""
    deadline = None if timeout is None else _monotonic() + timeout
    while True:
        left = None if deadline is None else max(deadline - _monotonic(), 0)
        nap = wait_slice(left)
        if lock.acquire(timeout=-1 if nap is None else nap):
            return True
        if nap == left:  # that was all the time left
            return False


def check_timeout(timeout: float | None) -> float | None:
    """The ``timeout`` of a call that waits, checked: None (no limit), or
    seconds, 0 or more.  One beyond threading.TIMEOUT_MAX (about 292 years;
    infinity) is no limit either: no lock takes it.  NaN is refused, as a
    wait for ever would be the wrong answer to a limit never reached."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError("timeout must be a number of seconds or None, "
                        f"not {type(timeout).__name__}")
    if not timeout >= 0:
        raise ValueError(f"timeout must be 0 or more seconds, or None; got {shown(timeout)}")
    return None if timeout > threading.TIMEOUT_MAX else float(timeout)


def deadline_of(timeout: float | None) -> float | None:
    """When a wait of ``timeout`` seconds (checked) that starts now ends."""
    return None if timeout is None else _monotonic() + timeout


def time_left(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (None: no limit), never below 0."""
    return None if deadline is None else max(deadline - _monotonic(), 0.0)


class Completion:
    """A one-shot event (the kernel's struct completion), as cheap as a lock."""

    __slots__ = ("_lock", "done")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.done = False

    def complete(self) -> None:
        # Once only, however often called: Ctrl-C may cut short a loop
        # that completes several, and the loop is then run again (see
        # settle()).  The test, `done` and the release with no call in
        # between, where Ctrl-C would land.
        if self.done:
            return
        self.done = True
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        # A worker waiting here sleeps, as in the kernel: its pool may run
        # the next item meanwhile (often the very one we wait for).
        with _Blocking():
            return sleep_on(self._lock, timeout)


def work_name(work: object) -> str:
    """repr(work), for the engine's reports: dumps, the watchdog, timeouts,
    the log, the exit hook's warning.  A work item's repr() is the
    program's code, and may fail (a connection naming its peer, on a
    socket closed since); the report must not fail with it -- a watchdog
    silenced for good, a TimeoutError turned into the repr's error, the
    traceback of an item that raised lost to a "Logging error", an exit
    hook cut short with what follows it at exit -- so it names the item
    without it then."""
    try:
        return repr(work)
    except Exception as exc:
        return f"{object.__repr__(work)} (its repr() raised {type(exc).__name__})"


class Draft:
    """A report's text, written under the engine lock with its work items
    left to be named: text() names them (work_name) once the lock is
    free.  An item's repr() is the program's code, and may call into the
    workqueue, or wait for a thread that does: under the lock, that
    deadlocks every workqueue of the process -- the watchdog's first."""

    __slots__ = ("_parts",)

    def __init__(self, text: str = "") -> None:
        # A str is text; a 1-tuple holds an item to name.
        self._parts: list[str | tuple[object]] = [text]

    def add(self, text: str) -> None:
        self._parts.append(text)

    def item(self, work: object) -> None:
        self._parts.append((work,))

    def items(self, works: Iterable[object]) -> None:
        """*works*, ", "-separated."""
        first = True
        for work in works:
            if not first:
                self._parts.append(", ")
            first = False
            self._parts.append((work,))

    def text(self) -> str:
        """The report, its items named (engine lock not held)."""
        return "".join(part if isinstance(part, str) else work_name(part[0])
                       for part in self._parts)


class WorkList:
    """A FIFO of pending work items with O(1) removal.

    Removal (cancel) leaves a tombstone: the dead entry stays in the deque and
    is skipped when it reaches the front.  A Work has at most one live entry
    in the whole engine (it is pending at most once), and its dead entries in
    a list always precede its live entry there, so pop() can tell them apart
    by counting: while dead[id(work)] > 0, the next occurrence is dead.

    Tombstones are counted by identity: a Work subclass may compare by value
    (a dataclass does), and then be unhashable, or equal to another item on
    the same list, whose live entry would pass for dead.  (An id cannot be
    reused while its tombstone counts: the dead entry keeps the item.)

    `items` is never replaced, only mutated, so a worker may bind its
    methods once and keep them while it drops the engine lock.
    """

    __slots__ = ("items", "dead", "nr", "active", "owner")

    def __init__(self, active: bool, owner: object) -> None:
        self.items: deque[Work] = deque()
        self.dead: dict[int, int] = {}  # id(work) -> its dead entries here
        self.nr = 0            # live entries
        self.active = active   # True: items count in their pwq's nr_active
        self.owner = owner     # the pool, pwq or worker the list belongs to

    def push(self, work: Work) -> None:
        self.items.append(work)
        work._entry = self
        self.nr += 1

    def pop(self) -> Work | None:
        items = self.items
        while items:
            work = items.popleft()
            if self.dead:
                key = id(work)
                n = self.dead.get(key)
                if n:
                    if n == 1:
                        del self.dead[key]
                    else:
                        self.dead[key] = n - 1
                    continue
            self.nr -= 1
            return work
        return None

    def kill(self, work: Work) -> None:
        """Turn the live entry of *work* into a tombstone."""
        key = id(work)
        self.dead[key] = self.dead.get(key, 0) + 1
        self.nr -= 1

    def __iter__(self) -> Iterator[Work]:
        """The live entries, in order."""
        dead = dict(self.dead)
        for work in self.items:
            n = dead.get(id(work))
            if n:
                dead[id(work)] = n - 1
                continue
            yield work

    def extract(self, pred: Callable[[Work], bool]) -> list[Work]:
        """Remove and return the live entries that satisfy *pred*, in order."""
        keep: list[Work] = []
        taken: list[Work] = []
        for work in self:
            (taken if pred(work) else keep).append(work)
        # In place: a worker dropping the lock around an item keeps using
        # self.items (see process_works).
        self.items.clear()
        self.items.extend(keep)
        self.dead.clear()
        self.nr = len(keep)
        return taken


class Worker:
    """A worker thread (struct worker)."""

    __slots__ = (
        "pool", "thread", "wake", "idle", "woken", "flags", "current", "current_pwq", "start",
        "scheduled", "die", "reported", "rescuer_of",
    )

    def __init__(self, pool: WorkerPool | None, flags: int) -> None:
        self.pool = pool
        self.thread: threading.Thread | None = None
        # wake is a binary semaphore: an idle worker sleeps acquiring it, and
        # a waker releases it once, setting `woken` (both under the engine
        # lock), so a wake-up is never lost nor doubled.  The worker stays on
        # pool.idle until it runs (worker_leave_idle): waking the first idle
        # worker again while it gets going is then a no-op, not a second
        # worker woken for nothing.
        self.wake = threading.Lock()
        self.wake.acquire()
        self.idle = False
        self.woken = False
        self.flags = flags
        self.current: Work | None = None
        self.current_pwq: PoolWorkqueue | None = None
        self.start = 0.0
        # Items that collided with the one this worker runs (their previous
        # run was still going when they were dequeued): they run here next.
        self.scheduled = WorkList(active=True, owner=self)
        self.die = False
        self.reported = -1.0   # watchdog: start time of the run last reported
        self.rescuer_of: Workqueue | None = None

    @property
    def name(self) -> str:
        return self.thread.name if self.thread is not None else "worker"


def set_flags(worker: Worker, flags: int) -> None:
    """worker_set_flags: leaving the running state drops nr_running."""
    if not worker.flags and worker.pool is not None:
        worker.pool.nr_running -= 1
    worker.flags |= flags


def clr_flags(worker: Worker, flags: int) -> None:
    """worker_clr_flags: entering the running state raises nr_running."""
    old = worker.flags
    worker.flags = old & ~flags
    if old and not worker.flags and worker.pool is not None:
        worker.pool.nr_running += 1


class PoolWorkqueue:
    """The link between a workqueue and a pool (struct pool_workqueue).

    Invariants: nr_active is the number of this pwq's items on the pool's
    worklist, on workers' scheduled lists or running; it exceeds max_active
    only after max_active was lowered.  Items beyond it wait on `inactive`,
    and `inactive` is non-empty only while nr_active >= max_active: every
    place that lowers nr_active or raises max_active activates at once, so
    a newly queued item can never overtake an inactive one.
    """

    __slots__ = (
        "wq", "pool", "nr_active", "max_active", "inactive",
        "nr_queued", "nr_cancelled_inactive", "nr_started", "nr_failed",
        "nr_cpu_intensive",
    )

    def __init__(self, wq: Workqueue, pool: WorkerPool, max_active: int) -> None:
        self.wq = wq
        self.pool = pool
        self.nr_active = 0
        self.max_active = max_active
        self.inactive = WorkList(active=False, owner=self)
        # Counters for the trace points queue, activate, execute_start and
        # execute_end.  Only queue and execute_start are counted on the hot
        # path; the other two follow (see activated, running_workers): every queued
        # item is activated unless it still waits on `inactive` or was
        # cancelled there, and is completed once it started and no worker
        # runs it any longer.
        self.nr_queued = 0
        self.nr_cancelled_inactive = 0
        self.nr_started = 0
        self.nr_failed = 0
        self.nr_cpu_intensive = 0

    @property
    def activated(self) -> int:
        """Items that entered the worklist (engine lock held)."""
        return self.nr_queued - self.inactive.nr - self.nr_cancelled_inactive



def every_worker(pwqs: list[PoolWorkqueue]) -> list[Worker]:
    """Every worker that may run an item of one workqueue's ``pwqs``: those
    of every pool of its pool set, and its rescuer (engine lock held)."""
    if not pwqs:
        return []
    workers = [w for pool in pwqs[0].pool.pset.pools() for w in pool.workers]
    rescuer = pwqs[0].wq._rescuer
    if rescuer is not None:
        workers.append(rescuer)
    return workers


def running_workers(pwqs: list[PoolWorkqueue]) -> dict[PoolWorkqueue, list[Worker]]:
    """The workers running an item of each of one workqueue's ``pwqs``
    (engine lock held), in one pass over the workers.

    Not only each pwq's own pool's: an item still running on another pool's
    worker (for another workqueue) is handed to that worker, which runs it
    next as ours (see process_works).  An item started and not running any
    more is completed (see PoolWorkqueue: the counters).
    """
    found: dict[PoolWorkqueue, list[Worker]] = {pwq: [] for pwq in pwqs}
    for worker in every_worker(pwqs):
        running = found.get(worker.current_pwq)  # type: ignore[arg-type]
        if running is not None:
            running.append(worker)
    return found


class WorkerPool:
    """A pool of workers for one CPU and priority, or unbound (cpu None)."""

    def __init__(self, pset: PoolSet, pool_id: int, cpu: int | None, highpri: bool) -> None:
        self.pset = pset
        self.id = pool_id
        self.cpu = cpu
        self.highpri = highpri
        self.worklist = WorkList(active=True, owner=self)
        self.idle: list[Worker] = []       # LIFO: the most recently idle runs next
        self.workers: set[Worker] = set()  # every worker of the pool, idle or not
        self.nr_running = 0
        # An unbound pool, or the pool of an offline CPU, is disassociated:
        # its workers run anywhere and are not concurrency-managed.
        self.disassociated = cpu is None or not pset.topology.is_online(cpu)
        self.pwqs: list[PoolWorkqueue] = []  # users; none left means workers exit
        self.tick: TimerHandle | None = None   # CPU-intensive check, when armed
        self.retry: TimerHandle | None = None  # worker creation retry, when armed
        self.create_failed = False
        # The watchdog's view of the worklist (see _watchdog): since when
        # it has waited with no item started (None: seen empty), each
        # pwq's count of starts it saw then, and the stall it last reported.
        # The checks see the worklist empty only when it is so as they
        # look; the few places that empty it without starting an item (a
        # cancel, a hand-over to the worker still running the item, the
        # rescuer's take) set watchdog_ts to None themselves, else a stall
        # of the next item queued is timed from before its queueing.
        # Engine lock, as the worklist they describe: the checks read and
        # write them under it, and each clear is made in the hold that
        # empties the worklist, so that no item is queued, and seen by a
        # check under the old stamp, between the emptying and the clear.
        self.watchdog_ts: float | None = None
        self.watchdog_started: dict[PoolWorkqueue, int] = {}
        self.watchdog_reported: float | None = None

    def __repr__(self) -> str:
        return f"<WorkerPool {self.name}>"

    @property
    def name(self) -> str:
        base = "unbound" if self.cpu is None else f"cpu{self.cpu}"
        return base + ("H" if self.highpri else "")

    def cpumask(self) -> set[int]:
        """The host CPUs this pool's workers may run on now."""
        topo = self.pset.topology
        if self.disassociated:
            return {topo.real_cpu(c) for c in topo.online()}
        assert self.cpu is not None
        return {topo.real_cpu(self.cpu)}

    def busy_workers(self) -> list[Worker]:
        """The workers running an item of this pool now (engine lock held):
        its own, and a rescuer working on it.  The kernel attaches a rescuer
        to the pool it rescues (worker_attach_to_pool), so the watchdog and
        the dumps see its item; ours only points at the pool, which keeps it
        out of the pool's idle accounting, hence this look at the rescuers."""
        busy = [w for w in self.workers if w.current is not None]
        for pwq in self.pwqs:
            rescuer = pwq.wq._rescuer
            if rescuer is not None and rescuer.pool is self and rescuer.current is not None:
                busy.append(rescuer)
        return busy

    def draft(self, now: float | None = None) -> Draft:
        """One pool, like the kernel's show_one_worker_pool (engine lock
        held); its items are named once the lock is free (Draft.text()).
        Runs are aged at *now*, time.monotonic() if None: a report's own
        clock, so that the dump and the report agree."""
        busy = self.busy_workers()
        idle = " ".join(w.name for w in self.idle)
        draft = Draft(
            f"pool {self.id} ({self.name}): cpus={sorted(self.cpumask())} "
            f"flags={'disassociated' if self.disassociated else 'bound'} "
            f"nr_running={self.nr_running} workers={len(self.workers)} idle: {idle}")
        if now is None:
            now = time.monotonic()
        for w in busy:
            draft.add(f"\n  in-flight: {w.name}:")
            draft.item(w.current)
            draft.add(f" for {now - w.start:.3f}s")
        if self.worklist.nr:
            draft.add("\n  pending: ")
            draft.items(self.worklist)
        return draft

    def dump(self) -> str:
        """draft() as text, for tests and debugging: it names the items
        where it is called, engine lock held or not."""
        return self.draft().text()


class PoolSet:
    """The pools of one topology, made on demand, and its hotplug notifier."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.bound: dict[tuple[int, bool], WorkerPool] = {}
        self.unbound: dict[bool, WorkerPool] = {}
        self.next_id = 0  # the id of the next pool made here (engine lock held)
        self.watchdog: TimerHandle | None = None

    def get_pool(self, cpu: int | None, highpri: bool) -> WorkerPool:
        """The pool for *cpu* (None: unbound) and priority (engine lock held)."""
        pool = self.bound.get((cpu, highpri)) if cpu is not None else self.unbound.get(highpri)
        if pool is None:
            pool = WorkerPool(self, self.next_id, cpu, highpri)
            self.next_id += 1
            if cpu is None:
                self.unbound[highpri] = pool
            else:
                self.bound[cpu, highpri] = pool
        return pool

    def pools(self) -> list[WorkerPool]:
        return [*self.bound.values(), *self.unbound.values()]

    def rearm_checks(self) -> None:
        """A tunable of the topology changed: arm again the checks armed
        with its old value -- each pool's CPU-intensive tick and the
        watchdog -- so that the new one applies at once, as the kernel's
        does (wq_watchdog_set_thresh re-arms; wq_worker_tick reads the
        threshold on every scheduler tick).  A check whose timer is firing
        now reads the new value itself.

        Each new timer is armed before the old one is deleted: Ctrl-C in
        between (see insert_work) leaves both armed; the other way round it
        would leave a stall unwatched.  The old one may also fire in
        between, its callback waiting for the lock held here.  Either way
        the old check finds the new one armed and leaves the watching to
        it (see _cpu_intensive_tick), rather than run a second chain of
        checks beside it, which nothing would delete."""
        with lock:
            for pool in self.pools():
                handle = pool.tick
                if handle is not None and timer_pending(handle):
                    arm_tick(pool)
                    del_timer(handle)
            handle = self.watchdog
            if handle is not None and timer_pending(handle):
                _arm_watchdog(self)
                del_timer(handle)

    @idempotent_notifier
    def hotplug(self, cpu: int, online: bool) -> None:
        """The topology notifier: unbind_workers / rebind_workers.

        Called again for the same change, it changes nothing more: the
        topology calls it again if Ctrl-C lands as it starts (see
        Topology._change)."""
        with lock:
            try:
                self._hotplug_locked(cpu, online)
            except BaseException:
                # Ctrl-C (see insert_work): a worker left counted on an
                # offline CPU would stay counted for good once it came
                # back.  Every step can be done twice under one hold of
                # the lock, so all of them are, to the end.
                self._hotplug_locked(cpu, online)
                raise

    def _hotplug_locked(self, cpu: int, online: bool) -> None:
        """hotplug(), engine lock held."""
        for highpri in (False, True):
            pool = self.bound.get((cpu, highpri))
            if pool is None:
                continue
            # The workers first and the pool's state last, so that a
            # pool in the CPU's state is done with: a call again finds
            # nothing to do there (a worker that started its run loop
            # since would lose its count to WORKER_REBOUND set again).
            if pool.disassociated is online:
                for worker in pool.workers:
                    if online:
                        # Still not counted (rebind_workers): a worker busy
                        # with items taken while the CPU was away counts
                        # from its next run loop on, so that what is queued
                        # now is not held back behind them.
                        worker.flags = worker.flags & ~WORKER_UNBOUND | WORKER_REBOUND
                    else:
                        set_flags(worker, WORKER_UNBOUND)
                pool.disassociated = not online
            # Offline: nr_running is now 0, so every waiting item gets a
            # worker, on another CPU; order and non-reentrancy hold since
            # the items stay in this pool.
            if pool.worklist.nr and pool.nr_running == 0:
                kick_pool(pool)
        for pool in self.pools():
            if pool.disassociated or pool.cpu == cpu:
                for worker in pool.workers:
                    pin_worker(worker)


# Serialises the creation of a topology's PoolSet (and the registration of
# its hotplug notifier, which takes the hotplug lock); never taken with the
# engine lock held.
_pool_set_lock = threading.Lock()
# Every PoolSet made, for a forked child to leave behind (_after_fork_in_child).
_pool_sets: weakref.WeakSet[PoolSet] = weakref.WeakSet()


def pool_set(topology: Topology) -> PoolSet:
    """The PoolSet of *topology*, made on first use."""
    pset: PoolSet | None = topology._pools
    if pset is None:
        with _pool_set_lock:
            pset = topology._pools
            if pset is None:
                pset = PoolSet(topology)
                topology.add_hotplug_notifier(pset.hotplug)
                topology._pools = pset
                _pool_sets.add(pset)
    return pset


def _after_fork_in_child() -> None:
    """A forked child has one thread, the one that forked: the workers of
    every pool made so far stayed in the parent, and a wake-up sent to one
    of them would be lost.  So each topology leaves its pools to the
    workqueues the child inherited -- the parent's, which the child must not
    use -- and makes new ones, with workers of the child's own, for the
    workqueues the child makes, as a ThreadPoolExecutor made in a child
    gets threads of its own.  A lock that a thread of the parent held at the fork would
    never be released: the engine's are made anew."""
    lock._at_fork_reinit()  # type: ignore[attr-defined]  # in place: bound methods stay valid
    _pool_set_lock._at_fork_reinit()  # type: ignore[attr-defined]
    _this_thread.worker = None  # the forking thread may have been a worker
    _this_thread.binding = None
    for pset in list(_pool_sets):
        topology = pset.topology
        topology._hotplug_lock = threading.Lock()
        topology.remove_hotplug_notifier(pset.hotplug)
        topology._pools = None
    _pool_sets.clear()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- workers ---------------------------------------------------------------

# Numbers the worker threads, for their names (kworker/<pool>:<n>).  One
# counter for the process, not one per PoolSet: every topology has pools of
# the same names, so per-topology numbers would repeat the same names.
# next() on a count is atomic under the GIL; it needs no lock.
_worker_numbers = itertools.count()


def _start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a worker thread.  Tests replace this to make creation fail."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def pin_worker(worker: Worker) -> None:
    """Pin *worker* to its pool's CPUs, where the OS allows (engine lock held)."""
    pool, thread = worker.pool, worker.thread
    if pool is None or thread is None or thread.native_id is None:
        return
    try:
        os.sched_setaffinity(thread.native_id, pool.cpumask())
    except OSError as exc:
        logger.debug("cannot pin %s to %s: %s", thread.name, pool.cpumask(), exc)


def create_worker(pool: WorkerPool) -> bool:
    """Add an idle worker to *pool* (engine lock held); False if it failed.

    On failure the workqueues with a rescuer that have items waiting here
    get a mayday, and creation is retried after MAYDAY_INTERVAL.
    """
    worker = Worker(pool, WORKER_PREP | (WORKER_UNBOUND if pool.disassociated else 0))
    name = f"kworker/{pool.name}:{next(_worker_numbers)}"
    try:
        worker.thread = _start_thread(lambda: _worker_thread(worker), name)
    except RuntimeError as exc:
        if not pool.create_failed:
            logger.warning("workqueue: cannot create a worker for pool %s: %s", pool.name, exc)
        pool.create_failed = True
        send_mayday(pool)
        if pool.retry is None:
            pool.retry = add_timer(MAYDAY_INTERVAL, _retry_create, pool)
        if pool.pset.watchdog is None:
            # No worker runs, so none arms the watchdog: a pool that no
            # rescuer helps would starve unreported.
            _arm_watchdog(pool.pset)
        return False
    except BaseException:
        # Ctrl-C as the thread starts (see insert_work): it may run
        # already, on none of the pool's lists, where nobody would ever
        # wake it.  It exits as it wakes.
        worker.die = True
        worker.wake.release()
        raise
    # Onto both lists with no call in between, where Ctrl-C would land:
    # a worker on one only was never woken, or never left.
    pool.create_failed = False
    pool.workers |= {worker}
    worker.idle = True
    pool.idle += [worker]
    pin_worker(worker)
    if pool.highpri:
        try:  # HIGHPRI_NICE_LEVEL; only privileged processes may raise priority
            os.setpriority(os.PRIO_PROCESS, worker.thread.native_id or 0, -20)
        except OSError:
            pass
    return True


def _retry_create(pool: WorkerPool) -> None:
    with lock:
        pool.retry = None
        # A failure here sends the maydays and arms the next retry itself.
        if pool.pwqs and pool.create_failed and not pool.idle:
            if create_worker(pool) and need_more_worker(pool):
                kick_pool(pool)


def need_more_worker(pool: WorkerPool) -> bool:
    return pool.worklist.nr > 0 and pool.nr_running == 0


def kick_pool(pool: WorkerPool) -> None:
    """Wake an idle worker of *pool* (engine lock held).

    A pool keeps an idle worker in reserve, so there is normally one.  A
    brand-new pool has no worker yet, a pool whose last creation failed may
    have none, and so may one that a workqueue takes up again while the
    only workers left from its last user (release_pwq) are busy with items
    handed over by other pools: then one is created here.  (A worker that
    leaves the idle list makes its reserve under the same hold of the lock,
    so no idle worker never means that one is on its way.)
    """
    if not pool.idle and not create_worker(pool):
        return
    worker = pool.idle[-1]
    if not worker.woken:
        worker.woken = True
        worker.wake.release()


def arm_tick(pool: WorkerPool) -> None:
    """Arm the CPU-intensive check for the earliest running item (lock held)."""
    thresh = pool.pset.topology.cpu_intensive_thresh
    now = time.monotonic()
    soonest = now + thresh
    for w in pool.workers:
        if w.current is not None and not w.flags:
            soonest = min(soonest, w.start + thresh)
    pool.tick = add_timer(max(soonest - now, 0.0), _cpu_intensive_tick, pool)


def _cpu_intensive_tick(pool: WorkerPool) -> None:
    """wq_worker_tick: items running longer than the threshold stop counting."""
    hogs: list[tuple[Work, float]] = []
    with lock:
        if timer_pending(pool.tick):
            # Superseded: armed again (PoolSet.rearm_checks) as we fired.
            return
        pool.tick = None
        if not pool.worklist.nr or pool.nr_running == 0:
            if pool.worklist.nr:
                kick_pool(pool)
            return
        thresh = pool.pset.topology.cpu_intensive_thresh
        now = time.monotonic()
        for w in list(pool.workers):
            if w.current is not None and not w.flags and now - w.start >= thresh:
                set_flags(w, WORKER_CPU_INTENSIVE)
                if w.current_pwq is not None:
                    w.current_pwq.nr_cpu_intensive += 1
                if logger.isEnabledFor(logging.DEBUG):
                    hogs.append((w.current, (now - w.start) * 1e3))
        if pool.worklist.nr:
            if pool.nr_running == 0:
                kick_pool(pool)
            else:
                arm_tick(pool)
    for work, ms in hogs:  # named with the lock free (see Draft)
        logger.debug("workqueue: %s hogged %s for %.1f ms; no longer counted",
                     work_name(work), pool.name, ms)


def _worker_thread(worker: Worker) -> None:
    """worker_thread: sleep until woken, run items, go idle again."""
    pool = worker.pool
    assert pool is not None
    _this_thread.worker = worker
    _this_thread.binding = (pool.pset.topology, pool.cpu)
    try:
        while True:
            # Asleep: on pool.idle, or just taken off it by a waker.
            woke = worker.wake.acquire(timeout=IDLE_WORKER_TIMEOUT)
            if not lock_acquire(False):
                lock_acquire_contended()
            try:
                if not woke:
                    if not worker.woken:
                        if worker.die or _too_many_workers(pool):
                            pool.idle.remove(worker)
                            pool.workers.discard(worker)
                            return
                        continue
                    worker.wake.acquire()  # our waker raced with the timeout
                worker.woken = False
                if worker.die:
                    # Off pool.workers already, unless Ctrl-C cut short the
                    # release_pwq() that told us to exit, as it woke us.
                    pool.workers.discard(worker)
                    return
                # worker_leave_idle
                idle = pool.idle
                if idle and idle[-1] is worker:
                    idle.pop()
                else:
                    idle.remove(worker)
                worker.idle = False
                _worker_run(worker, pool)
                if not pool.pwqs and not pool.worklist.nr:
                    # No workqueue uses the pool any longer.
                    pool.workers.discard(worker)
                    return
                worker.idle = True
                pool.idle.append(worker)
            finally:
                lock.release()
    finally:
        _this_thread.worker = None
        _this_thread.binding = None


def _too_many_workers(pool: WorkerPool) -> bool:
    nr_idle = len(pool.idle)
    nr_busy = len(pool.workers) - nr_idle
    return not pool.pwqs or (nr_idle > 2 and (nr_idle - 2) * 4 >= nr_busy)


def _worker_run(worker: Worker, pool: WorkerPool) -> None:
    """Run items while the pool needs this worker (engine lock held)."""
    if not need_more_worker(pool):
        return
    if not pool.idle:
        create_worker(pool)  # keep one in reserve (may_start_working)
    if pool.pset.watchdog is None:
        _arm_watchdog(pool.pset)
    clr_flags(worker, WORKER_PREP | WORKER_REBOUND)
    process_works(worker, pool.worklist, keep_working=True)
    set_flags(worker, WORKER_PREP)


def _arm_watchdog(pset: PoolSet) -> None:
    """Arm the lockup watchdog of *pset* before running items (lock held).

    Once per run of a worker rather than once per item: while a worker is
    in process_works() and the lock is free, it has a current item, which
    keeps the watchdog armed (it re-arms itself while any worker is busy
    or any worklist holds items).  A pool that cannot make a worker arms
    it too (create_worker).
    """
    from ._watchdog import arm_watchdog
    arm_watchdog(pset)


def process_works(worker: Worker, worklist: WorkList, keep_working: bool) -> None:
    """Run the items of *worklist* on *worker* (engine lock held on entry and exit).

    This is the kernel's worker loop, assign_work() and process_one_work()
    in one function, because it is the hot path of every item: the lock is
    dropped only around each item's function, and what the loop needs is
    bound to locals once.

    Non-reentrancy (find_worker_executing_work): an item whose previous run
    is still going on another worker is handed to that worker, which runs it
    next, from its `scheduled` list.  Items on our own `scheduled` list run
    first, before the next one of *worklist*.

    With keep_working, the loop stops as soon as another worker of the pool
    counts toward nr_running (one running item per CPU unless it blocks);
    the rescuer passes False, to run all it took.
    """
    pool: WorkerPool = worker.pool  # type: ignore[assignment]
    pool_worklist = pool.worklist
    scheduled = worker.scheduled
    # WorkList.items is never replaced (see WorkList), so these stay valid
    # while the lock is dropped.
    popleft = worklist.items.popleft
    acquire = lock_acquire
    acquire_contended = lock_acquire_contended
    release = lock_release
    monotonic = _monotonic
    while True:
        if scheduled.nr:
            work = scheduled.pop()
            assert work is not None
        elif worklist.nr:
            if worklist.dead:
                work = worklist.pop()
                assert work is not None
            else:  # worklist.pop(), inlined
                work = popleft()
                worklist.nr -= 1
            collision = work._worker
            if collision is not None:
                collision.scheduled.push(work)
                if not worklist.nr and worklist is pool_worklist:
                    pool.watchdog_ts = None  # emptied, nothing started: see WorkerPool
                continue
        else:
            return

        # process_one_work: start the item.
        pwq: PoolWorkqueue = work._pwq  # type: ignore[assignment]
        wq = pwq.wq
        color = work._color
        # The pending bit clears just before the function runs: queueing it
        # from now on runs it once more, afterwards.
        work._pending = False
        work._worker = worker
        worker.current = work
        worker.current_pwq = pwq
        worker.start = monotonic()
        if wq._cpu_intensive:
            set_flags(worker, WORKER_CPU_INTENSIVE)
        if pool_worklist.nr:
            if pool.nr_running == 0:
                kick_pool(pool)  # unbound pools and intensive items fan out
            elif pool.tick is None:
                arm_tick(pool)  # others wait for this item: watch its run time
        pwq.nr_started += 1
        if wq._trace_hooks:
            wq._trace("execute_start", work, pool)
        release()
        try:
            work.func(work)
        except BaseException:
            # Named now: the logging module would format the message
            # late, in a handler, where a failing repr() loses the record.
            logger.exception("workqueue %s: work item %s raised", wq.name, work_name(work))
            if not acquire(False):
                acquire_contended()
            pwq.nr_failed += 1
        else:
            if not acquire(False):
                acquire_contended()

        # The item is done.
        if worker.flags & WORKER_CPU_INTENSIVE:
            clr_flags(worker, WORKER_CPU_INTENSIVE)
        worker.current = None
        worker.current_pwq = None
        work._worker = None
        if wq._trace_hooks:
            wq._trace("execute_end", work, pool)
        # dec_nr_in_flight(pwq, color, True), inlined.  When items wait for
        # max_active, the slot this one frees goes straight to the oldest
        # (activate_inactive() for one item, inlined: it is the common case
        # of a workqueue queued faster than it runs).
        inactive = pwq.inactive
        if inactive.nr and pwq.nr_active == pwq.max_active and not inactive.dead:
            next_work = inactive.items.popleft()
            inactive.nr -= 1
            target = pwq.pool  # not always ours: see non-reentrancy above
            target_list = target.worklist
            target_list.items.append(next_work)
            next_work._entry = target_list
            target_list.nr += 1
            if wq._trace_hooks:
                wq._trace("activate", next_work, target)
            if target.nr_running == 0:
                kick_pool(target)
            elif target.tick is None:
                arm_tick(target)
        else:
            pwq.nr_active -= 1
            if inactive.nr and pwq.nr_active < pwq.max_active:
                activate_inactive(pwq)
        if color == wq._work_color:
            wq._nr_current -= 1
        else:
            dec_old_color(wq, color)
        if wq._freezing is not None and not pwq.nr_active:
            wq._freeze_progress()
        if work._flushers:
            # Every queueing of the item is over now but one pending on a
            # list (one on a timer has no number yet; _entry means nothing
            # unless pending).  Not just this run's: a queueing taken back
            # meanwhile (cancel, mod_delayed_work) will never run, and its
            # flushers wait no longer (Linux's barrier stays queued when
            # try_to_grab_pending takes the work away).
            on_list = work._pending and work._entry is not None
            wake_work_flushers(work, work._seq - 1 if on_list else work._seq)

        # keep_working: one running item per CPU, unless it blocks.
        if keep_working and pool.nr_running > 1 and not scheduled.nr:
            return


def wake_work_flushers(work: Work, done: int) -> None:
    """Complete the flushes of *work* that queueing number *done* satisfied (lock held)."""
    flushers = work._flushers
    assert flushers is not None
    left = []
    for target, completion in flushers:
        if target <= done:
            completion.complete()
        else:
            left.append((target, completion))
    work._flushers = left or None


def insert_work(pwq: PoolWorkqueue, work: Work) -> None:
    """Make *work* pending on *pwq* (engine lock held): __queue_work's tail.

    The main thread may run this, and Ctrl-C lands there as any call
    returns or starts, under the lock too: the item must be queued whole
    or not at all.  So the pool is woken first (which may start a worker:
    Ctrl-C there leaves a spare idle one), then the item is accounted with
    no call in between, and put on its list by the last call, after which
    it is queued whatever happens.  (The woken worker waits for the lock,
    and finds the item.)

    Workqueue.queue_work() has a copy of this, inlined: keep them alike.
    """
    wq = pwq.wq
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
    work._color = wq._work_color
    wq._nr_current += 1
    pwq.nr_queued += 1
    work._entry = worklist  # worklist.push(work), inlined
    worklist.nr += 1
    worklist.items.append(work)
    if wq._trace_hooks:  # under the lock: nobody sees the item yet
        wq._trace("queue", work, pool)
        if active:
            wq._trace("activate", work, pool)


def activate_inactive(pwq: PoolWorkqueue) -> None:
    """Move inactive items to the worklist while max_active allows (lock held).

    On the hot path too: a workqueue queued faster than it runs keeps
    max_active items active and the rest inactive, so every finished item
    activates the next one.  Hence WorkList.pop() and push() inlined.

    In the main thread, Ctrl-C may land at any call (see insert_work): the
    pool is woken first, and each item moved with no call in between, so
    that every item is on one list, counted there, whatever happens (and
    settle() can finish the moves).
    """
    inactive = pwq.inactive
    if not inactive.nr or pwq.nr_active >= pwq.max_active:
        return
    pool = pwq.pool
    if pool.nr_running == 0:
        kick_pool(pool)
    elif pool.tick is None:
        arm_tick(pool)
    items = inactive.items
    dead = inactive.dead
    worklist = pool.worklist
    wq = pwq.wq
    while inactive.nr and pwq.nr_active < pwq.max_active:
        work = items[0]
        if dead:
            key = id(work)
            n = dead.get(key)
            if n:  # a tombstone (see WorkList.pop)
                del items[0]
                if n == 1:
                    del dead[key]
                else:
                    dead[key] = n - 1
                continue
        del items[0]
        inactive.nr -= 1
        pwq.nr_active += 1
        work._entry = worklist
        worklist.nr += 1
        worklist.items.append(work)
        if wq._trace_hooks:
            wq._trace("activate", work, pool)


def settle(pwq: PoolWorkqueue, work: Work | None = None) -> None:
    """What follows from counts that went down on *pwq*, and from *work*
    leaving it (lock held): activate the inactive items that now fit,
    complete the flushes and freezes that nothing holds up any longer.

    Each step does nothing when there is nothing to do, so after Ctrl-C
    cut a change's own steps short, this finishes them (the change itself
    made with no call in between, see try_to_grab_pending).
    """
    activate_inactive(pwq)
    wq = pwq.wq
    if wq._flushers:
        wq._flush_progress()
    if wq._freezing is not None and not pwq.nr_active:
        wq._freeze_progress()
    if work is not None and work._worker is None and work._flushers:
        # As at the end of a run (see process_works).
        on_list = work._pending and work._entry is not None
        wake_work_flushers(work, work._seq - 1 if on_list else work._seq)


def dec_old_color(wq: Workqueue, color: int) -> None:
    """An item of a color older than the current one left *wq* (lock held)."""
    in_flight = wq._in_flight
    n = in_flight[color] - 1
    if n:
        in_flight[color] = n
    else:
        del in_flight[color]
        if wq._flushers:
            wq._flush_progress()


def try_to_grab_pending(work: Work) -> bool:
    """Take the pending bit away from a queued item (lock held).

    Returns True if the item was pending -- on a timer, an inactive list, a
    worklist or a worker's scheduled list -- and now is not.

    Ctrl-C may land at any call (see insert_work): the item leaves its
    list and its counts with no call in between, and settle() finishes
    what follows if Ctrl-C cuts that short.
    """
    if not work._pending:
        return False
    entry = work._entry
    if entry is None:  # on its timer
        handle = getattr(work, "_timer", None)
        work._pending = False
        if handle is not None:
            # Deleted last: a timer that fires meanwhile finds _timer None,
            # and does nothing.
            work._timer = None  # type: ignore[attr-defined]
            del_timer(handle)
        try:
            if work._worker is None and work._flushers:
                wake_work_flushers(work, work._seq)
        except BaseException:  # Ctrl-C: see settle()
            if work._worker is None and work._flushers:
                wake_work_flushers(work, work._seq)
            raise
        return True
    pwq = work._pwq
    assert pwq is not None
    wq = pwq.wq
    color = work._color
    key = id(work)
    dead = entry.dead.get(key, 0) + 1
    # entry.kill(work) and pwq_dec_nr_in_flight()'s counts, inlined.
    entry.dead[key] = dead
    entry.nr -= 1
    if not entry.nr and entry is pwq.pool.worklist:
        pwq.pool.watchdog_ts = None  # emptied, nothing started: see WorkerPool
    work._entry = None
    work._pending = False
    if entry.active:
        pwq.nr_active -= 1
    else:
        pwq.nr_cancelled_inactive += 1
    if color == wq._work_color:
        wq._nr_current -= 1
    else:
        in_flight = wq._in_flight
        n = in_flight[color] - 1
        if n:
            in_flight[color] = n
        else:
            del in_flight[color]
    try:
        settle(pwq, work)
    except BaseException:
        settle(pwq, work)
        raise
    return True


def release_pwq(pwq: PoolWorkqueue) -> None:
    """A destroyed workqueue stops using a pool (put_pwq, engine lock held).

    When no workqueue uses the pool any longer, its idle workers exit now and
    its busy ones (running items of other, already gone, users) as they finish.
    """
    pool = pwq.pool
    if pool.pwqs == [pwq]:
        idle = pool.idle
        while idle:
            # Off the idle list as it is told to exit, with no call in
            # between, where Ctrl-C lands: one told and left there was the
            # worker that kick_pool() woke for the items of a workqueue
            # taking the pool up before this was called again (which then
            # leaves the idle list alone), and it exited instead.
            worker = idle[-1]
            del idle[-1]
            worker.die = True
            worker.idle = False
            if not worker.woken:
                worker.woken = True
                worker.wake.release()
            pool.workers.discard(worker)  # also as it exits: see _worker_thread
        for handle in (pool.tick, pool.retry):
            if handle is not None:
                del_timer(handle)
        pool.tick = pool.retry = None
    # Last: a call that Ctrl-C cuts short leaves the pool in use, and
    # the destruction that takes up the destroy() calls this again (see
    # Workqueue._finish_destroy).
    pool.pwqs.remove(pwq)


def send_mayday(pool: WorkerPool) -> None:
    """Ask the rescuers of the workqueues with items waiting here (lock held)."""
    waiting = {w._pwq for w in pool.worklist}
    for pwq in pool.pwqs:
        rescuer = pwq.wq._rescuer
        if rescuer is not None and pwq in waiting and pwq not in pwq.wq._maydays:
            pwq.wq._maydays.append(pwq)
            if rescuer.idle:
                rescuer.idle = False
                rescuer.wake.release()


def _owned_by(pwq: PoolWorkqueue) -> Callable[[Work], bool]:
    return lambda work: work._pwq is pwq


def rescuer_thread(worker: Worker, wq: Workqueue) -> None:
    """rescuer_thread: run a workqueue's items on pools that cannot grow."""
    _this_thread.worker = worker
    try:
        while True:
            worker.wake.acquire()
            with lock:
                while wq._maydays and not worker.die:
                    pwq = wq._maydays.pop(0)
                    pool = pwq.pool
                    worker.pool = pool
                    _this_thread.binding = (pool.pset.topology, pool.cpu)
                    # assign_work: onto our `scheduled` list, where the
                    # items are found until they start (cancel_futures, the
                    # exit hook), or onto that of the worker still running
                    # one (non-reentrancy: the list is run without a check).
                    for work in pool.worklist.extract(_owned_by(pwq)):
                        collision = work._worker
                        target = collision if collision is not None else worker
                        target.scheduled.push(work)
                    if not pool.worklist.nr:
                        # Emptied, and its items may all have gone to the
                        # workers still running them, starting nothing:
                        # see WorkerPool.
                        pool.watchdog_ts = None
                    if pool.pset.watchdog is None:
                        _arm_watchdog(pool.pset)
                    process_works(worker, worker.scheduled, keep_working=False)
                    worker.pool = None
                    _this_thread.binding = None
                if worker.die:
                    return
                worker.idle = True
    finally:
        _this_thread.worker = None


def start_rescuer(wq: Workqueue) -> None:
    """Create the rescuer of a WQ_MEM_RECLAIM workqueue, at allocation time.

    The workqueue has it before its thread starts: Ctrl-C as it starts
    (see insert_work) leaves it to the workqueue to stop (see
    Workqueue._unmake), whether it runs already or not.
    """
    worker = Worker(None, WORKER_PREP | WORKER_RESCUER)
    worker.rescuer_of = wq
    worker.idle = True
    wq._rescuer = worker
    worker.thread = _start_thread(lambda: rescuer_thread(worker, wq), f"{wq.name}-rescuer")


# -- the calling thread ------------------------------------------------------

def current_worker() -> Worker | None:
    """The Worker the calling thread is, or None."""
    worker: Worker | None = _this_thread.worker
    return worker


def current_work() -> Work | None:
    """The work item the calling thread is running, or None (current_work())."""
    worker: Worker | None = _this_thread.worker
    return worker.current if worker is not None else None


def current_workqueue() -> Workqueue | None:
    """The workqueue of the work item the calling thread is running, or None.

    ``current_workqueue() is wq`` is the kernel's is_chained_work(wq):
    whether the caller is one of *wq*'s own items, which anything that
    waits for all of them (flush, drain, destroy) would wait for.  The
    workqueue the item was queued on, not the one whose worker runs it:
    an item a rescuer runs (its workqueue's, when no worker could be
    made, or another workqueue's, handed to it as the worker still
    running the item's previous run) answers as on a worker.  Inside
    blocking() the item still runs, and an item waiting for another (its
    flush(), a Future's result()) stays the calling thread's item: items
    never run nested on a thread, so there is no outer one to answer
    instead.
    """
    worker: Worker | None = _this_thread.worker
    if worker is None:
        return None
    # current_pwq, not current._pwq: the item may be queued again, on
    # another workqueue, while it runs.
    pwq = worker.current_pwq
    return pwq.wq if pwq is not None else None


class _Blocking:
    """The context manager blocking() returns."""

    __slots__ = ("_worker",)

    def __init__(self) -> None:
        self._worker: Worker | None = None

    def __enter__(self) -> _Blocking:
        worker: Worker | None = _this_thread.worker
        if worker is None or worker.current is None:
            return self
        with lock:
            if worker.flags & WORKER_BLOCKED:
                return self  # nested: the outermost one accounts
            self._worker = worker
            set_flags(worker, WORKER_BLOCKED)  # wq_worker_sleeping
            pool = worker.pool
            if pool is not None and need_more_worker(pool):
                kick_pool(pool)
        return self

    def __exit__(self, *exc: Any) -> None:
        worker = self._worker
        if worker is not None:
            self._worker = None
            with lock:
                clr_flags(worker, WORKER_BLOCKED)  # wq_worker_running


def blocking() -> _Blocking:
    """Say that the current work item is about to block.

        with workqueue.blocking():
            data = sock.recv(4096)

    Inside the block the item does not count toward its pool's concurrency
    limit, so the pool may start its next item on another worker at once
    (what the kernel's scheduler hooks do when a work item sleeps).  Outside
    a work item it does nothing.
    """
    return _Blocking()
