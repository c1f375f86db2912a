"""Placing long-lived keys on the least-loaded online CPU of a Topology.

A backend that owns many long-lived objects (sockets, devices, rings) wants
each object's work to run on one CPU, and wants the objects spread evenly over
the CPUs.  When a CPU goes offline, the objects homed there must move, and
their owner must hear about it so that it can re-home whatever it keeps per
CPU.  LoadIndex does the bookkeeping:

    index = LoadIndex(topology, on_move=rehome)
    cpu = index.assign(sock)           # least-loaded online CPU
    ...
    index.release(sock)

The index keeps every online CPU in a sorted list of (load, cpu) pairs, so
that placing a key takes the head and finds where it goes back by bisection:
for a 640-CPU dom0 with tens of thousands of sockets, a memmove of a few
hundred pointers.  A plain list, not a tree such as sortedcontainers': its
changes are single calls into C, which Ctrl-C cannot cut in half (see
LoadIndex).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from ._shown import shown
from ._topology import check_cpu_type, cpu_not_possible, idempotent_notifier

if TYPE_CHECKING:
    from ._topology import Topology

__all__ = ["LoadIndex", "LoadIndexStats"]

logger = logging.getLogger(__name__)

OnMove = Callable[[Hashable, int, int], None]


class _HotplugSource(Protocol):
    """The part of Topology that LoadIndex uses (see workqueue/_topology.py)."""

    def possible(self) -> list[int]: ...
    def online(self) -> list[int]: ...
    def add_hotplug_notifier(self, fn: Callable[[int, bool], None]) -> None: ...
    def remove_hotplug_notifier(self, fn: Callable[[int, bool], None]) -> None: ...


@dataclass(frozen=True, slots=True)
class LoadIndexStats:
    """A consistent snapshot of a LoadIndex, taken under its lock."""

    keys: int
    """Number of keys currently assigned."""
    total_load: int
    """Sum of the weights of all assigned keys."""
    # Left out of the hash, which a mappingproxy does not have: equal
    # snapshots still hash alike, and the snapshot stays hashable like any
    # other frozen dataclass.
    loads: Mapping[int, int] = field(hash=False)
    """Load of every online CPU, by CPU number (read-only)."""
    offline: tuple[int, ...]
    """Possible CPUs that are offline; they carry no keys."""
    moves: int
    """Keys moved off offline CPUs since the index was created."""


def _take_head(index: list[tuple[int, int]], weight: int) -> tuple[int, int, int]:
    """The CPU at the head of *index* (the least loaded), its load with
    *weight* added, and where its entry goes with that load once the head
    is deleted.  Changes nothing."""
    load, cpu = index[0]
    load += weight
    return cpu, load, bisect_left(index, (load, cpu)) - 1


@idempotent_notifier
class _HotplugNotifier:
    """The callable registered with the topology on behalf of a LoadIndex.

    It holds the index weakly, so that the topology, which typically outlives
    its users, does not keep a forgotten index (and its keys) alive.  Once the
    index is gone the notifier does nothing; close() removes it.
    """

    __slots__ = ("_ref",)

    def __init__(self, index: LoadIndex) -> None:
        self._ref = weakref.ref(index)

    def __call__(self, cpu: int, online: bool) -> None:
        index = self._ref()
        if index is not None:
            index._hotplug(cpu, online)


class LoadIndex:
    """Assign keys to the least-loaded online CPU of *topology*.

    assign(key, weight) puts *key* on the online CPU with the smallest load
    (the sum of the weights of its keys), the lowest CPU number on a tie, and
    keeps it there until release(key) or until that CPU goes offline.

    Hotplug.  The index registers a notifier on the topology.  When a CPU goes
    down, its keys are moved, heaviest first, each onto the then least-loaded
    online CPU, and on_move(key, old_cpu, new_cpu) is called for each of them
    before Topology.cpu_down() returns.  When a CPU comes up, nothing moves
    back; new keys fill it first since it is the emptiest.  on_move is where
    a key's owner notes its new CPU for its next queue_work_on(); a Work
    that queues itself again from its own function is queued where it runs
    (see Workqueue.queue_work()): it moves only once queued while not
    running, as pvcalls' sockets are, by their events.

    Evenness.  Each assignment and each move goes to a least-loaded CPU, so
    while keys of weight 1 are only added (and CPUs only taken down), the
    numbers of keys on any two online CPUs differ by at most one.  In general
    neither an assignment nor a cpu_down ever widens the spread between the
    most and the least loaded online CPU beyond max(spread, largest weight).

    Threads.  Every method may be called from any thread.  on_move is called
    from the thread running cpu_down, without the index's lock held, so it
    may call back into the index; it must not call close() or take the CPU
    hotplug lock (it already runs under it).  A key released concurrently
    with a cpu_down may still be reported as moved.

    Call close() (or use the index as a context manager) to unregister from
    the topology; after close() the index refuses new keys.

    Ctrl-C.  Every method, and the index's part of a cpu_down() or cpu_up(),
    is whole or not at all when Ctrl-C lands in the main thread, where
    CPython runs its handler as a function starts or a call returns: the
    call raises with the key placed or not (released or not, the index made
    or closed or not), and the books straight.  So each change is made of
    statements that call nothing, and at most one call into C, last; what
    they need is worked out before, changing nothing.  A cpu_down()
    cut short in the notifier has it called again (see Topology._change),
    which finishes the job; on_move, cut short, is called again for the
    same move, so it must not mind being told twice (noting the new CPU
    does not).  A key whose __hash__ or __eq__ is Python code has Ctrl-C
    land in every dict operation on it: keys hashed in C (ints, strings,
    tuples of them, objects hashed by identity, as pvcalls' sockets) are
    safe.
    """

    def __init__(self, topology: Topology | _HotplugSource, on_move: OnMove | None = None) -> None:
        # What it uses of a Topology, checked here: a wrong argument would
        # otherwise fail as a missing attribute, half set up.  The class
        # itself has the methods, unbound.
        missing = [name for name in ("possible", "online", "add_hotplug_notifier",
                                     "remove_hotplug_notifier")
                   if not callable(getattr(topology, name, None))]
        if missing or isinstance(topology, type):
            what = (f"the class {topology.__name__}" if isinstance(topology, type)
                    else type(topology).__name__)
            raise TypeError(f"topology must be a workqueue.Topology, not {what}")
        if on_move is not None and not callable(on_move):
            raise TypeError(f"on_move must be callable or None, not {type(on_move).__name__}")
        self._topology = topology
        self._on_move = on_move

        # _lock protects every field below.  It is a leaf lock: nothing else is
        # acquired while it is held, except the topology's lock inside
        # add_hotplug_notifier() during __init__, when no notifier of ours can
        # be running yet.  Lock order: topology hotplug lock -> _lock.
        self._lock = threading.Lock()

        # Invariants, whenever _lock is free:
        #  - _cpu_of and _weight have the same keys, and _cpu_of[k] is in
        #    _online (which a closed index no longer changes: it keeps the
        #    CPUs online at close());
        #  - _keys_on[cpu] holds exactly the keys k with _cpu_of[k] == cpu, in
        #    the order they came to it (dicts keep insertion order);
        #  - _load[cpu] is the sum of _weight over _keys_on[cpu];
        #  - _index holds (_load[cpu], cpu) for exactly the CPUs in _online,
        #    sorted.
        self._cpu_of: dict[Hashable, int] = {}
        self._weight: dict[Hashable, int] = {}
        possible = list(topology.possible())
        self._keys_on: dict[int, dict[Hashable, None]] = {cpu: {} for cpu in possible}
        self._load: dict[int, int] = dict.fromkeys(possible, 0)
        self._online: set[int] = set()
        self._index: list[tuple[int, int]] = []
        self._moves = 0
        self._closed = False
        # The moves that on_move has not been told of yet, oldest first.
        # Only the hotplug notifier uses it, which the topology serialises.
        self._untold: deque[tuple[Hashable, int, int]] = deque()

        self._notifier = _HotplugNotifier(self)
        # Counted as registered before the call, which Ctrl-C may cut short
        # as it returns: an __init__ that raises must leave no notifier with
        # the topology, which would keep it for good.
        registering = False
        try:
            with self._lock:
                # Register first, then read the online set, both under
                # _lock: a hotplug event racing with us blocks in
                # _hotplug() until the index is initialised, and _hotplug()
                # ignores an event that the online set we read already
                # reflects.
                registering = True
                topology.add_hotplug_notifier(self._notifier)
                online = set(topology.online())
                if not online:
                    raise ValueError("topology has no online CPU")
                self._online = online
                self._index = [(0, cpu) for cpu in sorted(online)]
        except BaseException:
            if registering:
                # Outside _lock, as in close().
                self._unregister()
            raise

    # -- placing keys ---------------------------------------------------------

    def assign(self, key: Hashable, weight: int = 1) -> int:
        """Place *key* on the least-loaded online CPU and return that CPU.

        *weight* (a positive int) is what the key adds to its CPU's load.
        Assigning a key that is already assigned raises ValueError: release
        it first.  After close(), RuntimeError.
        """
        if not isinstance(weight, int) or isinstance(weight, bool):
            raise TypeError(f"weight must be an int, not {type(weight).__name__}")
        if weight <= 0:
            raise ValueError(f"weight must be positive, got {shown(weight)}")
        hash(key)  # an unhashable key fails here with the usual TypeError
        with self._lock:
            if self._closed:
                raise RuntimeError("LoadIndex is closed")
            if key in self._cpu_of:
                raise ValueError(
                    f"key {key!r} is already assigned to CPU {self._cpu_of[key]}; release it first"
                )
            return self._place(key, weight)

    def release(self, key: Hashable) -> None:
        """Forget *key*; its weight no longer counts.  KeyError if unknown."""
        with self._lock:
            try:
                cpu = self._cpu_of[key]
            except KeyError:
                raise KeyError(key) from None
            load = self._load[cpu] - self._weight[key]
            index = self._index
            # Where the CPU's entry is (a key's CPU has one), and where it
            # goes, lighter now.
            at = bisect_left(index, (self._load[cpu], cpu))
            to = bisect_left(index, (load, cpu))
            # The change (see the class on Ctrl-C).
            del self._cpu_of[key]
            del self._weight[key]
            del self._keys_on[cpu][key]
            self._load[cpu] = load
            del index[at]
            index.insert(to, (load, cpu))

    def cpu_of(self, key: Hashable) -> int:
        """The CPU *key* is assigned to.  KeyError if unknown."""
        with self._lock:
            try:
                return self._cpu_of[key]
            except KeyError:
                raise KeyError(key) from None

    def weight_of(self, key: Hashable) -> int:
        """The weight *key* was assigned with.  KeyError if unknown."""
        with self._lock:
            try:
                return self._weight[key]
            except KeyError:
                raise KeyError(key) from None

    def load(self, cpu: int) -> int:
        """The load of *cpu*: the sum of the weights of its keys (0 if offline).

        TypeError if *cpu* is not an int, ValueError if it is not a possible CPU."""
        check_cpu_type(cpu)
        with self._lock:
            try:
                return self._load[cpu]
            except KeyError:
                raise cpu_not_possible(cpu) from None

    def least_loaded(self) -> int:
        """The CPU assign() would pick now: the least-loaded online CPU,
        lowest number on a tie.  Nothing is assigned; a concurrent assign()
        may take it first."""
        with self._lock:
            return self._index[0][1]

    def keys_on(self, cpu: int) -> list[Hashable]:
        """The keys on *cpu*, in the order they came to it: assigned there,
        or moved there by a cpu_down() (after its own, however old).
        Errors as load()."""
        check_cpu_type(cpu)
        with self._lock:
            try:
                return list(self._keys_on[cpu])
            except KeyError:
                raise cpu_not_possible(cpu) from None

    def statistics(self) -> LoadIndexStats:
        """A frozen snapshot of the index."""
        with self._lock:
            loads = {cpu: self._load[cpu] for cpu in sorted(self._online)}
            return LoadIndexStats(
                keys=len(self._cpu_of),
                total_load=sum(self._load.values()),
                loads=MappingProxyType(loads),
                offline=tuple(sorted(set(self._load) - self._online)),
                moves=self._moves,
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._cpu_of)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._cpu_of

    def __repr__(self) -> str:
        with self._lock:
            state = "closed" if self._closed else f"{len(self._online)} online CPUs"
            return f"<LoadIndex {len(self._cpu_of)} keys, {state}>"

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Unregister from the topology and refuse new keys.  Idempotent.

        Assigned keys stay readable and releasable.  Must not be called from
        on_move.
        """
        closing = False
        try:
            with self._lock:
                if self._closed:
                    return
                closing = self._closed = True
            # Outside _lock: removing may wait for the topology's hotplug
            # lock, whose holder may be waiting for _lock in _hotplug().
            self._topology.remove_hotplug_notifier(self._notifier)
        except BaseException:
            # Cut short (Ctrl-C), the index would refuse keys and keep its
            # notifier for good: the next close() returns at once.
            if closing:
                self._unregister()
            raise

    def _unregister(self) -> None:
        """Remove the notifier, unless a call that Ctrl-C cut short as it
        returned did (the topology then says it is not registered)."""
        with contextlib.suppress(ValueError):
            self._topology.remove_hotplug_notifier(self._notifier)

    def __enter__(self) -> LoadIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals (callers hold _lock) ---------------------------------------

    def _place(self, key: Hashable, weight: int) -> int:
        """Put *key* on the least-loaded online CPU, lowest number on a tie."""
        index = self._index
        cpu, load, to = _take_head(index, weight)
        # The change (see the class on Ctrl-C).
        self._load[cpu] = load
        self._keys_on[cpu][key] = None
        self._cpu_of[key] = cpu
        self._weight[key] = weight
        del index[0]
        index.insert(to, (load, cpu))
        return cpu

    # -- hotplug --------------------------------------------------------------

    def _hotplug(self, cpu: int, online: bool) -> None:
        """Topology notifier: runs inside cpu_down()/cpu_up(), serialised.

        Called again for the same change, it changes nothing more, and
        tells the moves not told yet: the topology calls it again when
        Ctrl-C cuts it short (see Topology._change)."""
        moved = 0
        with self._lock:
            if self._closed:
                pass
            elif online:
                self._cpu_up(cpu)
            elif cpu not in self._online:
                pass  # done already, or reflected in the online set read by __init__
            elif len(self._online) == 1:
                # The topology refuses to take its last CPU down, so this
                # means the index and the topology disagree; keep the keys.
                logger.error("LoadIndex: CPU %d going down but it is the last online CPU", cpu)
            else:
                moved = self._cpu_down(cpu)
        if moved:
            logger.debug("LoadIndex: CPU %d down, moved %d keys", cpu, moved)
        self._tell()

    def _cpu_up(self, cpu: int) -> None:
        """Put *cpu* in the index, unless it is there (or not possible)."""
        if cpu not in self._online and cpu in self._load:
            entry = (self._load[cpu], cpu)
            at = bisect_left(self._index, entry)
            # The change (see the class on Ctrl-C): |= calls nothing.
            self._online |= {cpu}
            self._index.insert(at, entry)

    def _cpu_down(self, cpu: int) -> int:
        """Take online *cpu* out of the index and move its keys; how many.

        Heaviest first, each to the then least-loaded CPU (greedy LPT):
        this keeps the online CPUs as even as a one-pass move can.  Worked
        out on copies of what changes, which are then switched in."""
        index = self._index.copy()
        del index[bisect_left(index, (self._load[cpu], cpu))]
        weight = self._weight
        loads = {cpu: 0}
        keys_on: dict[int, dict[Hashable, None]] = {cpu: {}}
        cpu_of: dict[Hashable, int] = {}
        moved: list[tuple[Hashable, int, int]] = []
        for key in sorted(self._keys_on[cpu], key=weight.__getitem__, reverse=True):
            new_cpu, load, to = _take_head(index, weight[key])
            del index[0]
            index.insert(to, (load, new_cpu))
            loads[new_cpu] = load
            if new_cpu not in keys_on:
                keys_on[new_cpu] = self._keys_on[new_cpu].copy()
            keys_on[new_cpu][key] = None
            cpu_of[key] = new_cpu
            moved.append((key, cpu, new_cpu))
        moves = self._moves + len(moved)
        # The change (see the class on Ctrl-C): in-place operators and
        # stores, calling nothing.
        self._cpu_of |= cpu_of
        self._keys_on |= keys_on
        self._load |= loads
        self._index = index
        self._moves = moves
        if self._on_move is not None:
            self._untold += moved
        self._online -= {cpu}
        return len(moved)

    def _tell(self) -> None:
        """Call on_move for each move not told yet, oldest first.

        A move leaves the list once on_move has returned for it: Ctrl-C
        (in the main thread, running cpu_down) as on_move starts or
        returns leaves it to the notifier's next call, which tells it
        again."""
        on_move = self._on_move
        untold = self._untold
        while untold:
            assert on_move is not None  # nothing is left untold without one
            key, old_cpu, new_cpu = untold[0]
            try:
                on_move(key, old_cpu, new_cpu)
            except Exception:
                # One owner's bug must not stop the others' keys from being
                # re-homed, nor make cpu_down fail half way.
                logger.exception("LoadIndex on_move(%r, %d, %d) raised", key, old_cpu, new_cpu)
            untold.popleft()
