"""Per-key serial executors: ``wq.serial(key)``.

Submissions with the same key run one at a time, in submission order, on the
key's CPU; different keys run in parallel.  This is what a backend wants for
a socket or a device: every request of one socket in order, the sockets
spread over the CPUs.

Each key owns one Work item (a _SerialWork) holding a deque of pending calls,
each riding in the LeanFuture that submit() returns (see _future).  submit()
appends a call and queues the Work on the key's CPU; the Work's function
drains the deque.  The workqueue's guarantees do the rest: the pending bit
coalesces the queueing of a busy key into one run, and a Work never runs
concurrently with itself, so the calls of one key never overlap and leave
the deque in the order they entered it.

The keys are placed with a LoadIndex over the workqueue's topology, one index
per workqueue, so the keys of a workqueue are spread evenly over its CPUs and
follow their CPU's hotplug: when a CPU goes down its keys are re-homed, and
their next runs are queued on the new CPU.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from . import _atexit
from ._future import LeanFuture
from ._loadindex import LoadIndex
from ._pool import current_work
from ._work import Work

if TYPE_CHECKING:
    from ._workqueue import Workqueue

__all__ = ["SerialExecutor", "cancel_serial_calls", "close_serial"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# How many calls one run of a key's Work executes before it requeues itself
# and lets the other items of its CPU's pool go first (not while the
# workqueue drains: see _drain).  Large enough that the queueing cost
# vanishes, small enough that one busy key cannot hog its CPU.
_BATCH = 64


class _SerialWork(Work):
    """The Work item of one key: runs the key's pending calls in order.

    ``cpu`` is where the next run is queued.  It is written only under the
    topology's hotplug lock (by the LoadIndex on_move callback) and read
    without a lock: a run queued on the old CPU just before a move still
    runs, unbound, on another CPU, and non-reentrancy keeps the order.
    """

    __slots__ = ("wq", "cpu", "calls")
    _is_call = True

    def __init__(self, wq: Workqueue, cpu: int) -> None:
        super().__init__(_drain)
        self.wq = wq
        self.cpu = cpu
        # Appended by submit() (which takes back one it could not queue),
        # popped by _drain() only: shutdown(cancel_futures=True) leaves the
        # calls it cancels for the run to skip (see _cancel_calls).  deque's
        # append, popleft and remove are atomic.
        self.calls: deque[LeanFuture] = deque()


def _drain(work: Work) -> None:
    """Run up to _BATCH of the key's calls, oldest first, then queue the
    Work again if calls are left.

    Not while the workqueue drains (drain(), destroy(), shutdown()): the
    requeueing would be chained queueing, which drain() counts as a round
    of an item that keeps queueing itself, and warns about after ten -- a
    key with a backlog of some hundred calls is no runaway chain.  The run
    then goes on to the end; the CPU's other items still get a worker once
    it has run cpu_intensive_thresh, as for any long item.

    The pending bit is cleared before this runs, so a submit() that lands
    after the final check below queues the Work again: no call is stranded.
    Nor by a run that fails: a done-callback may raise what its future
    passes on (SystemExit, say), and the calls behind it came in while
    this run was due, with no other queued.
    """
    assert isinstance(work, _SerialWork)
    popleft = work.calls.popleft
    wq = work.wq
    budget = _BATCH
    try:
        while True:
            try:
                future = popleft()
            except IndexError:
                return
            future._run()  # unless it was cancelled
            # A traceback the call raised keeps this frame: it must not hold
            # the future, which holds the traceback (see _run_call).
            del future
            budget -= 1
            if not budget:
                if not wq._state:  # running, not draining (one read: no lock needed)
                    break
                budget = _BATCH
    finally:
        if work.calls:
            wq.queue_work_on(work.cpu, work)


class _SerialDomain:
    """The serial executors of one workqueue and the LoadIndex placing them."""

    def __init__(self, wq: Workqueue) -> None:
        self.wq_ref = weakref.ref(wq)
        # _lock protects executors.  Lock order: topology hotplug lock ->
        # _lock -> the LoadIndex's lock (on_move runs under the hotplug lock
        # and takes _lock; serial() takes _lock, then assigns in the index).
        self._lock = threading.Lock()
        self.executors: dict[Hashable, SerialExecutor] = {}
        # The index registers with the topology: made through map(), it is
        # in `made` once made, with no return to Python code in between,
        # where Ctrl-C would land and lose it, registered for good (the
        # idiom of _pool.lock_take_contended).
        made: list[LoadIndex] = []
        try:
            made.extend(map(LoadIndex, (wq.topology,), (self._on_move,)))
            self.index = made[0]
        except BaseException:
            for index in made:
                index.close()
            raise

    def executor(self, key: Hashable) -> SerialExecutor:
        # Fast path without the lock (dict.get is atomic): a key in use.
        executor = self.executors.get(key)
        if executor is not None:
            return executor
        with self._lock:
            executor = self.executors.get(key)
            if executor is None:
                wq = self.wq_ref()
                assert wq is not None  # the caller holds it
                # A key is in the index exactly while it has an executor
                # here: cut short between the two (Ctrl-C, in the main
                # thread), the key is released again, or every later
                # assign() of it would raise.
                try:
                    cpu = self.index.assign(key)
                    executor = object.__new__(SerialExecutor)
                    executor._setup(self, key, _SerialWork(wq, cpu))
                    self.executors[key] = executor
                except BaseException:
                    if key not in self.executors and key in self.index:
                        self.index.release(key)
                    raise
            return executor

    def retire(self, executor: SerialExecutor) -> None:
        """Forget *executor*, and its key in the index, unless done already.

        Cut short (by Ctrl-C), it finishes the job when called again: the
        key is released first, and while the executor is here no other
        can take the key, so a key no longer in the index was released by
        the call cut short."""
        key = executor.key
        with self._lock:
            if self.executors.get(key) is executor:
                if key in self.index:
                    self.index.release(key)
                del self.executors[key]

    def _on_move(self, key: Hashable, old_cpu: int, new_cpu: int) -> None:
        with self._lock:
            executor = self.executors.get(key)
        if executor is not None:
            executor._work.cpu = new_cpu

    def close(self) -> None:
        self.index.close()


# -- the per-workqueue registry ------------------------------------------------

# A workqueue's _SerialDomain hangs off the workqueue itself, so that it lives
# exactly as long as the workqueue and no global table outlives a test.  The
# engine calls close_serial() when a workqueue is destroyed, which
# unregisters the domain's LoadIndex from the topology at once rather than
# when the workqueue is collected.
_DOMAIN_ATTR = "_serial_domain"
_domains_lock = threading.Lock()  # makes the first serial() of a workqueue create one domain
if hasattr(os, "register_at_fork"):  # a thread of the parent may hold it at a fork
    os.register_at_fork(after_in_child=_domains_lock._at_fork_reinit)  # type: ignore[attr-defined]
_CLOSED = "closed"  # the attribute's value after close_serial()


def _domain_of(wq: Workqueue) -> _SerialDomain:
    domain: _SerialDomain | str | None = getattr(wq, _DOMAIN_ATTR, None)
    if domain is None:
        with _domains_lock:
            domain = getattr(wq, _DOMAIN_ATTR, None)
            if domain is None:
                # Made whole or not at all, as its index is (see there): a
                # domain made and not stored would keep its index
                # registered with the topology for good.
                made: list[_SerialDomain] = []
                try:
                    made.extend(map(_SerialDomain, (wq,)))
                    domain = made[0]
                    setattr(wq, _DOMAIN_ATTR, domain)
                except BaseException:
                    if made and getattr(wq, _DOMAIN_ATTR, None) is not made[0]:
                        made[0].close()
                    raise
    if domain is _CLOSED:
        raise RuntimeError(f"workqueue {wq.name!r} is destroyed; it has no serial executors")
    assert isinstance(domain, _SerialDomain)
    return domain


def close_serial(wq: Workqueue) -> None:
    """Forget *wq*'s serial executors and unregister their LoadIndex.

    For Workqueue.destroy(), after the workqueue is drained.  Must be called
    without the engine lock and outside hotplug notifiers: it takes the
    topology's hotplug lock.  Executors of *wq* still held by someone keep
    working until they queue, which then fails as on any destroyed queue.
    """
    domain: _SerialDomain | str | None = None
    try:
        with _domains_lock:
            domain = getattr(wq, _DOMAIN_ATTR, None)
            setattr(wq, _DOMAIN_ATTR, _CLOSED)
        if isinstance(domain, _SerialDomain):
            domain.close()
    except BaseException:
        # Cut short (Ctrl-C) once the domain is no longer the
        # workqueue's, it would keep its index registered for good.
        # (LoadIndex.close() is whole or not at all, and idempotent.)
        if isinstance(domain, _SerialDomain) and getattr(wq, _DOMAIN_ATTR, None) is _CLOSED:
            domain.close()
        raise


def cancel_serial_calls(wq: Workqueue) -> int:
    """Cancel the calls waiting in *wq*'s serial executors; how many.

    For Workqueue.shutdown(cancel_futures=True): those were submitted to the
    workqueue too, through wq.serial(key).  Found by their Work items, so
    that executors already shut down without waiting count too.
    """
    return sum(_cancel_calls(work) for work in wq._call_works()
               if isinstance(work, _SerialWork))


def _cancel_calls(work: _SerialWork) -> int:
    """Cancel the calls of *work* that have not started; how many.

    They stay on the key's list, which its run empties, skipping them:
    a call taken off it here and not yet cancelled as Ctrl-C landed (as
    popleft() returned, in the main thread) was left pending for ever,
    with nobody to run it.  A run that takes one meanwhile starts it or
    finds it cancelled, whichever comes first (see LeanFuture).
    """
    cancelled = 0
    for future in list(work.calls):  # the list as it is: a run takes calls meanwhile
        if not future.done() and future.cancel():  # not one cancelled before
            cancelled += 1
    return cancelled


# -- the executor -------------------------------------------------------------


class SerialExecutor(Executor):
    """An Executor running the calls submitted to it one at a time, in order.

    Created by ``wq.serial(key)``; ``SerialExecutor(wq, key)`` is the same.
    While it is not shut down, every call for the same (wq, key) returns the
    same executor, so ``wq.serial(sock).submit(...)`` from anywhere keeps the
    order of one socket's requests.

    The calls run on the workqueue's worker of the key's CPU (``cpu``), which
    a LoadIndex chose as the least-loaded when the key was first used, and
    which changes if that CPU goes down.  A call may block, as any Work item
    may; a call that submits to its own key queues behind the calls already
    submitted.

    shutdown() releases the key: it no longer counts in the CPU's load, and
    the next ``wq.serial(key)`` creates a new executor, unrelated in order to
    calls of the old one that are still pending (shutdown(wait=True) leaves
    none).
    """

    # Set by _setup(), which __new__ calls under the domain's lock.
    _domain: _SerialDomain
    _key: Hashable
    _work: _SerialWork
    _shutdown: bool
    _lock: threading.Lock

    def __new__(cls, wq: Workqueue, key: Hashable) -> SerialExecutor:
        hash(key)  # an unhashable key fails here with the usual TypeError
        return _domain_of(wq).executor(key)

    def __init__(self, wq: Workqueue, key: Hashable) -> None:
        """Nothing to do: __new__ returned a fully set up executor."""

    def _setup(self, domain: _SerialDomain, key: Hashable, work: _SerialWork) -> None:
        self._domain = domain
        self._key = key
        self._work = work
        self._shutdown = False
        # _lock orders submit() against shutdown(): once shutdown() has set
        # _shutdown under it, no call can enter the deque.  It is a leaf
        # lock, held for a few bytecodes.  (Whether a call starts or is
        # cancelled, its future decides.)
        self._lock = threading.Lock()

    @property
    def key(self) -> Hashable:
        """The key this executor serialises."""
        return self._key

    @property
    def cpu(self) -> int:
        """The CPU the key's calls are queued on."""
        return self._work.cpu

    @property
    def pending(self) -> int:
        """Number of calls submitted and not started yet (cancelled ones included
        until the key's next run skips them)."""
        return len(self._work.calls)

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else f"cpu {self._work.cpu}"
        return f"<SerialExecutor key={self._key!r} {state}, {len(self._work.calls)} pending>"

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` after every call submitted before."""
        if not callable(fn):
            raise TypeError(f"submit() needs a callable, not {type(fn).__name__}")
        future = LeanFuture(fn, args, kwargs)
        work = self._work
        # From the append on, a call that no run is sure to find is taken
        # back: Ctrl-C lands in the main thread as any call returns, the
        # append's too, and a call left on the list with no run queued
        # would wait for the key's next submit(), and shutdown(wait=True)
        # for ever.  Set before the append, which Ctrl-C cannot cut short.
        appended = False
        try:
            with self._lock:
                # The workqueue's shutdown() refuses our calls too, as its
                # own submit()'s: they are the workqueue's calls (it cancels
                # them with cancel_futures), and a key whose Work is pending
                # would otherwise take one in without queueing anything.
                if self._shutdown or work.wq._shutdown:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                if _atexit._exiting:  # as Workqueue.submit()
                    raise RuntimeError("cannot schedule new futures after interpreter shutdown")
                appended = True
                work.calls.append(future)
            # If the Work is pending, its run has not started yet and will
            # find this call; otherwise queue it (again).  Reading the
            # pending bit without a lock is safe because the bit is cleared
            # before the run starts draining, never after.
            if not work._pending:
                work.wq.queue_work_on(work.cpu, work)
        except BaseException as exc:
            if not appended:
                raise
            try:
                work.calls.remove(future)
            except ValueError:
                # Already taken by a run that was going on (the pending bit
                # clears before a run drains): the call is accepted after
                # all, and a refusal would say it never runs.
                if isinstance(exc, Exception):
                    return future
            # The interrupt (Ctrl-C) or refusal itself: a bare raise in the
            # handler above would raise its ValueError instead.
            raise
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls, release the key, and optionally wait.

        With cancel_futures, the calls that have not started are cancelled.
        With wait, returns once every call that was not cancelled has run.
        """
        work = self._work
        if wait and current_work() is work:
            raise RuntimeError("shutdown(wait=True) from one of its own calls would deadlock")
        try:
            with self._lock:
                self._shutdown = True
            self._domain.retire(self)
        except BaseException:
            # Cut short (Ctrl-C), the key would be kept by an executor
            # that refuses every call, for wq.serial(key) to give out.
            if self._shutdown:
                self._domain.retire(self)
            raise
        if cancel_futures:
            _cancel_calls(work)
        if wait:
            # Each flush waits for the latest queueing of the Work; a run that
            # stops after _BATCH calls queues it again, hence the loop.
            while work.calls or work.pending or work.running:
                if not work.flush() and work.calls:
                    # Calls but no run: a submit() is between its append and
                    # its queue_work_on() (which, if it fails, takes the call
                    # back).  Give it the few bytecodes it needs.
                    time.sleep(0.0001)
