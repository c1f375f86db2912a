"""The CPUs a workqueue runs on, and CPU hotplug.

A Topology is the set of *logical* CPUs the workqueue engine schedules on.
By default it is this process's CPUs (os.sched_getaffinity), but it may have
more logical CPUs than the machine has, to model a large dom0 on a laptop:
logical CPU n is then mapped onto a host CPU (real_cpu), and the workers of
CPU n are pinned there.

Hotplug follows the kernel's cpuhp model, reduced to one state: cpu_down()
and cpu_up() are synchronous, and run the registered notifiers one after the
other under the topology's hotplug lock -- in registration order when a CPU
comes up, in reverse order when it goes down (teardown mirrors setup).  When
cpu_down() returns, every notifier has seen the CPU go: the worker pools of
that CPU are unbound, every LoadIndex has re-homed its keys.

The topology also carries the two system-wide tunables of the engine that
runs on it (the kernel's wq_cpu_intensive_thresh_us and wq_watchdog_thresh),
so that tests can change them without touching global state.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Iterable
from itertools import pairwise
from typing import Any, NamedTuple, TypeVar

from ._shown import shown

__all__ = ["Topology"]

logger = logging.getLogger(__name__)

HotplugNotifier = Callable[[int, bool], None]

#: The most CPUs a topology has: Linux's largest NR_CPUS (x86-64's
#: NR_CPUS_RANGE_END with CPUMASK_OFFSTACK).  A larger count is a mistake,
#: and Topology(10**8) would take gigabytes before anything said so.
NR_CPUS_MAX = 8192


def _load_sched_getcpu() -> Callable[[], int] | None:
    """glibc's sched_getcpu(), which the os module does not offer.

    Loaded through PyDLL, which keeps the GIL across the call: a CDLL call
    drops it, and a queue_work() that gives the GIL to a worker on every call
    runs ten times slower.
    """
    try:
        fn = ctypes.PyDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = ()
    return fn  # type: ignore[no-any-return,unused-ignore]


_sched_getcpu = _load_sched_getcpu()


def cpu_not_possible(cpu: int) -> ValueError:
    """The error for an int CPU number that is not a CPU of a topology.

    One that no Linux has (the kernel's cpumask helpers warn of a CPU
    number >= nr_cpu_ids) says the range; one in range that the topology
    lacks, that it lacks it.
    """
    if not 0 <= cpu < NR_CPUS_MAX:
        return ValueError(f"CPU {shown(cpu)} is not a possible CPU: CPU numbers are 0 to "
                          f"{NR_CPUS_MAX - 1} (NR_CPUS_MAX {NR_CPUS_MAX}, Linux's most)")
    return ValueError(f"CPU {cpu} is not a possible CPU of this topology")


def check_cpu_type(cpu: object) -> None:
    """Refuse anything but an int as a CPU number, with TypeError: True
    and 1.0 hash like CPU 1, and a lookup in a set or dict of CPUs would
    take them for it."""
    if isinstance(cpu, bool) or not isinstance(cpu, int):
        raise TypeError(f"a CPU number must be an int, not {type(cpu).__name__}")


def _check_thresh(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    # Timers wait with Condition.wait(), which takes at most threading.TIMEOUT_MAX.
    if not 0 < value <= threading.TIMEOUT_MAX:
        raise ValueError(f"{name} must be a number of seconds > 0 and at most "
                         f"threading.TIMEOUT_MAX ({threading.TIMEOUT_MAX:g}), got {shown(value)}")
    return float(value)


def _not_cpus(cpus: object) -> str:
    """What is wrong with a *cpus* that is not an iterable."""
    message = f"cpus must be an iterable of CPU numbers (ints), not {type(cpus).__name__}"
    if type(cpus) is int and 1 <= cpus <= NR_CPUS_MAX:  # a count, meant as ncpus
        message += f": for CPUs 0 to {cpus - 1}, give ncpus={cpus}"
    return message


_T = TypeVar("_T")


def idempotent_notifier(fn: _T) -> _T:
    """Mark a hotplug notifier (a function, or a class of callables) as one
    that may be called twice for one change, the second call changing
    nothing that the first has done: cpu_down() and cpu_up() call it again
    when Ctrl-C cuts them short after it (see Topology._change), as it may
    have been cut short itself as it started."""
    fn.hotplug_idempotent = True  # type: ignore[attr-defined]
    return fn


class _ThreadState(threading.local):
    """What the engine knows about the calling thread.

    Worker threads set `binding` to (topology, cpu) -- cpu None for an
    unbound pool -- and `worker` to their Worker; other threads leave the
    class defaults, which also make reading them cheap (a missing attribute
    of a threading.local costs an exception inside getattr).
    """

    binding: tuple[Topology, int | None] | None = None
    worker: Any = None


_this_thread = _ThreadState()


class _Online(NamedTuple):
    """The online CPUs, in the three forms the readers want, made together
    and replaced whole: a reader that takes it once sees them agree."""

    cpus: frozenset[int]
    ordered: tuple[int, ...]  # sorted
    #: Each host CPU's lowest online logical CPU; never mutated.
    by_host: dict[int, int]


class Topology:
    """A set of logical CPUs, some of them online, with hotplug notifiers.

    Topology(ncpus) has logical CPUs 0..ncpus-1; Topology(cpus=[...]) has the
    given CPU numbers, each from 0 to NR_CPUS_MAX-1 (8191); Topology() has
    the CPUs this process may run on.

    The tunables of the engine on it, in seconds: ``cpu_intensive_thresh``
    (default 0.01), after which a running item stops counting for
    concurrency management (wq_cpu_intensive_thresh_us), and
    ``watchdog_thresh`` (default 30), after which a running item, or a
    pool none of whose waiting items starts, is reported as stalled
    (wq_watchdog_thresh).
    """

    def __init__(
        self,
        ncpus: int | None = None,
        *,
        cpus: Iterable[int] | None = None,
        cpu_intensive_thresh: float = 0.010,
        watchdog_thresh: float = 30.0,
    ) -> None:
        host = sorted(os.sched_getaffinity(0))
        if ncpus is not None and cpus is not None:
            raise TypeError("give either ncpus or cpus, not both")
        if ncpus is not None:
            if isinstance(ncpus, bool) or not isinstance(ncpus, int):
                raise TypeError(f"ncpus must be an int, not {type(ncpus).__name__}")
            if ncpus < 1:
                raise ValueError(f"ncpus must be at least 1, got {shown(ncpus)}")
            if ncpus > NR_CPUS_MAX:
                raise ValueError(f"ncpus must be at most {NR_CPUS_MAX} (Linux's most), "
                                 f"got {shown(ncpus)}")
            possible = list(range(ncpus))
        elif cpus is not None:
            try:
                given = iter(cpus)
            except TypeError:
                raise TypeError(_not_cpus(cpus)) from None
            possible = []
            for cpu in given:
                if isinstance(cpu, bool) or not isinstance(cpu, int):
                    raise TypeError(f"CPU numbers must be ints, got {shown(cpu)}")
                if len(possible) == NR_CPUS_MAX:  # before an endless iterable fills memory
                    raise ValueError(f"a topology has at most {NR_CPUS_MAX} CPUs (Linux's most)")
                if not 0 <= cpu < NR_CPUS_MAX:
                    raise cpu_not_possible(cpu)
                possible.append(cpu)
            if not possible:
                raise ValueError("a topology needs at least one CPU")
            possible.sort()
            if len(set(possible)) != len(possible):
                twice = sorted({a for a, b in pairwise(possible) if a == b})
                raise ValueError(f"duplicate CPU numbers: {shown(twice)}")
        else:
            possible = list(host)
        self._possible: tuple[int, ...] = tuple(possible)
        self._possible_set = frozenset(possible)
        # A logical CPU that is also a host CPU runs there; the others are
        # spread round-robin over the host CPUs.
        host_set = frozenset(host)
        self._real: dict[int, int] = {
            cpu: cpu if cpu in host_set else host[cpu % len(host)] for cpu in possible
        }
        # _hotplug_lock serialises cpu_down/cpu_up and notifier (un)registration,
        # so a notifier sees every transition exactly once, in order.  It is
        # held while notifiers run: a notifier must not call cpu_down/cpu_up.
        # Readers (online, is_online, current_cpu, and queue_work's copy
        # of the latter) take no lock: they read _online once, a snapshot
        # replaced whole by one store, never mutated.
        self._hotplug_lock = threading.Lock()
        self._notifiers: list[HotplugNotifier] = []
        self._online = self._snapshot(self._possible_set)

        # The worker pools of this topology (workqueue._pool.PoolSet), made
        # on first use.  It lives here, not in a module global, so that each
        # topology -- and each test -- gets its own pools.  Written under
        # _pool's _pool_set_lock (see pool_set()), read without it: a
        # reference, replaced whole.
        self._pools: Any = None
        # The tunables after _pools, which their setters read.
        self.cpu_intensive_thresh = cpu_intensive_thresh
        self.watchdog_thresh = watchdog_thresh

    def __repr__(self) -> str:
        return f"<Topology possible={list(self._possible)} online={list(self._online.ordered)}>"

    # -- tunables ---------------------------------------------------------
    #
    # Writable at run time, as the kernel's module parameters are, and
    # checked when written: a bad value would otherwise be found only by
    # the timer thread, or by a queue_work() arming a check with it after
    # it had queued its item.  A new value applies at once: the checks
    # armed with the old one are armed again (see PoolSet.rearm_checks).
    # Not to be written under the engine lock (a trace hook), which that
    # takes.

    @property
    def cpu_intensive_thresh(self) -> float:
        """Seconds after which a running item stops counting for concurrency
        management (wq_cpu_intensive_thresh_us)."""
        return self._cpu_intensive_thresh

    @cpu_intensive_thresh.setter
    def cpu_intensive_thresh(self, value: float) -> None:
        self._cpu_intensive_thresh = _check_thresh("cpu_intensive_thresh", value)
        if self._pools is not None:
            self._pools.rearm_checks()

    @property
    def watchdog_thresh(self) -> float:
        """Seconds after which a running item, or a pool none of whose
        waiting items starts, is reported as stalled (wq_watchdog_thresh)."""
        return self._watchdog_thresh

    @watchdog_thresh.setter
    def watchdog_thresh(self, value: float) -> None:
        self._watchdog_thresh = _check_thresh("watchdog_thresh", value)
        if self._pools is not None:
            self._pools.rearm_checks()

    # -- queries ----------------------------------------------------------

    def possible(self) -> list[int]:
        """Every logical CPU of the topology, online or not, sorted."""
        return list(self._possible)

    def online(self) -> list[int]:
        """The online logical CPUs, sorted."""
        return list(self._online.ordered)

    def is_online(self, cpu: int) -> bool:
        """True if *cpu* is online; ValueError if it is not a CPU of this topology."""
        self._check_cpu(cpu)
        return cpu in self._online.cpus

    def real_cpu(self, cpu: int) -> int:
        """The host CPU the workers of logical CPU *cpu* are pinned to."""
        self._check_cpu(cpu)
        return self._real[cpu]

    def current_cpu(self) -> int:
        """The logical CPU the calling thread counts as running on.

        A worker of an online CPU of this topology is on its CPU.  Any other
        thread is on the lowest online logical CPU mapped to the host CPU it
        runs on right now (or the lowest online CPU if none is mapped there).
        """
        # Workqueue.queue_work() inlines the path of a thread that is not a
        # worker (measured: the method call alone is some 3% of that call);
        # keep the two alike.
        online = self._online  # once: a CPU it names is online in all its forms
        binding = _this_thread.binding
        if binding is not None and binding[0] is self and binding[1] in online.cpus:
            cpu = binding[1]
            assert cpu is not None
            return cpu
        if _sched_getcpu is not None:
            found = online.by_host.get(_sched_getcpu())
            if found is not None:
                return found
        return online.ordered[0]

    def _check_cpu(self, cpu: int) -> None:
        # type() first: True and 1.0 are in the set too (they hash like 1).
        if type(cpu) is not int or cpu not in self._possible_set:
            check_cpu_type(cpu)
            if cpu not in self._possible_set:
                raise cpu_not_possible(cpu)

    def _snapshot(self, cpus: frozenset[int]) -> _Online:
        """The readers' view with *cpus* online."""
        ordered = tuple(sorted(cpus))
        by_host: dict[int, int] = {}
        for cpu in ordered:  # ascending: the lowest wins
            by_host.setdefault(self._real[cpu], cpu)
        return _Online(cpus, ordered, by_host)

    # -- hotplug ----------------------------------------------------------

    def add_hotplug_notifier(self, fn: HotplugNotifier) -> None:
        """Call fn(cpu, online) inside every later cpu_down/cpu_up.

        Notifiers run synchronously, under the hotplug lock: in registration
        order for cpu_up, in reverse order for cpu_down.  When fn runs the
        CPU is already in (up) or already out of (down) online().
        """
        if not callable(fn):
            raise TypeError(f"hotplug notifier must be callable, not {type(fn).__name__}")
        with self._hotplug_lock:
            self._notifiers.append(fn)

    def remove_hotplug_notifier(self, fn: HotplugNotifier) -> None:
        """Unregister *fn*; ValueError if it was not registered."""
        with self._hotplug_lock:
            try:
                self._notifiers.remove(fn)
            except ValueError:
                raise ValueError(f"{fn!r} is not a registered hotplug notifier") from None

    def cpu_down(self, cpu: int) -> None:
        """Take *cpu* offline, synchronously (a no-op if it is offline).

        ValueError for an unknown CPU or for the last online CPU.  Ctrl-C
        in it leaves the CPU online and no notifier called, or offline
        and every notifier called (see _change: once, or again if it is
        an idempotent_notifier).
        """
        self._check_cpu(cpu)
        with self._hotplug_lock:
            online = self._online.cpus
            if cpu not in online:
                return
            if len(online) == 1:
                raise ValueError(f"CPU {cpu} is the last online CPU; it cannot go down")
            self._change(cpu, False, online - {cpu}, self._notifiers[::-1])

    def cpu_up(self, cpu: int) -> None:
        """Bring *cpu* online, synchronously (a no-op if it is online).

        Ctrl-C in it leaves the CPU offline and no notifier called, or
        online and every notifier called (see _change: once, or again if
        it is an idempotent_notifier).
        """
        self._check_cpu(cpu)
        with self._hotplug_lock:
            online = self._online.cpus
            if cpu in online:
                return
            self._change(cpu, True, online | {cpu}, self._notifiers[:])

    def _change(self, cpu: int, online: bool, cpus: frozenset[int],
                notifiers: list[HotplugNotifier]) -> None:
        """Make *cpus* the online ones, *cpu* going up or down, and tell
        *notifiers*, in that order (hotplug lock held).

        Whole or not at all when Ctrl-C lands in the main thread, as any
        call returns (see _pool.insert_work): the new state is made first,
        then switched to by one store, which is also what lets the readers
        go without the lock (they see all of it or none of it); from then
        on every notifier is called, and Ctrl-C is passed on after the
        last: once, but for those marked idempotent_notifier, which are
        called again if Ctrl-C came after their call began (it may have
        cut them short).
        Nothing can be undone once a notifier has run, and one left out
        would never hear of the change: the next cpu_down() or cpu_up()
        of the CPU finds nothing to do, or tells of the opposite change.
        """
        self._online = self._snapshot(cpus)
        # Each notifier counted as called before its call, with no call in
        # between, and called here, not through _notify(), where Ctrl-C
        # could land before the call: it lands as the notifier starts, or
        # once it has run, which is the notifier's own business, as any
        # exception it raises.
        called = 0
        try:
            for fn in notifiers:
                called += 1
                try:
                    fn(cpu, online)
                except Exception:
                    self._failed(fn, cpu, online)
        except BaseException:
            # A notifier cut short as it started has done nothing: the
            # engine's pools' left them bound as the CPU was, a LoadIndex
            # its keys on it.  Those marked idempotent_notifier, called
            # again, finish what is not done, and nothing more.
            for fn in notifiers[:called]:
                if getattr(fn, "hotplug_idempotent", False) is True:
                    self._notify(fn, cpu, online)
            for fn in notifiers[called:]:
                self._notify(fn, cpu, online)
            raise

    @staticmethod
    def _failed(fn: HotplugNotifier, cpu: int, online: bool) -> None:
        # Hotplug cannot be rolled back half-way: a failing notifier is a bug
        # in its owner, reported, and the others still run.
        logger.exception("hotplug notifier %r failed for CPU %d going %s",
                         fn, cpu, "up" if online else "down")

    @classmethod
    def _notify(cls, fn: HotplugNotifier, cpu: int, online: bool) -> None:
        try:
            fn(cpu, online)
        except Exception:
            cls._failed(fn, cpu, online)
