"""Work items: Work (struct work_struct) and DelayedWork (struct delayed_work).

A Work is a function plus the state the engine keeps for it.  It is queued
with Workqueue.queue_work(); it is *pending* from then until just before its
function starts, and *running* while the function runs.  The life cycle
follows the kernel's, including the return values:

    queue_work      False if already pending (or disabled): items coalesce
    cancel          True if it was pending (cancel_work)
    cancel_sync     True if it was pending; on return it is neither pending
                    nor running (cancel_work_sync)
    flush           True if it waited for a pending or running instance
    disable/enable  a nesting count; queueing a disabled item returns False

The calls that wait (flush, cancel_sync, disable_sync) take a keyword-only
timeout in seconds, as threading's and concurrent.futures' waits do, and
raise TimeoutError when it passes first.  Only the wait is over then: no
flush stays registered, and the item is left as the call left it before
waiting -- a pending instance cancelled (and a cancel_sync() goes on
without its caller: see there), a DelayedWork taken off its timer by
flush() queued.  Ctrl-C in the wait leaves the same.

Carry your own fields by subclassing (the kernel's container_of idiom):

    class Conn(Work):
        def __init__(self, sock):
            super().__init__(Conn.poll)
            self.sock = sock
        def poll(self): ...

A Work never runs concurrently with itself, whichever threads, CPUs and
workqueues queue it: a worker that dequeues an item whose previous run is
still going hands it to the worker running it, which runs it next (the
kernel promises this per workqueue; one engine lock lets us promise it for
all of them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _pool
from ._pool import (
    Completion,
    Worker,
    WorkList,
    check_timeout,
    current_work,
    current_worker,
    try_to_grab_pending,
    work_name,
)
from ._timer import TimerHandle, del_timer

if TYPE_CHECKING:
    from ._pool import PoolWorkqueue
    from ._workqueue import Workqueue

__all__ = ["Work", "DelayedWork", "current_work"]

#: What a cancel_sync() under way adds to Work._disable, until the run it
#: waits for ends: more than any number of disable() calls a program makes,
#: so the two counts never mix.
_CANCEL_HOLD = 1 << 32


class Work:
    """A work item: Work(func) runs func(work) on a workqueue.

    Subclass it to carry your own fields, calling super().__init__(func)
    (see the module's docstring).  Its function's return value is dropped,
    and an exception it raises goes nowhere but the log: logged with its
    traceback (logger ``workqueue._pool``, ERROR) and counted in the
    workqueue's stats().failed, the worker going on with the next item.
    Use Workqueue.submit() for a call whose result or exception you want.

    At interpreter exit, items still pending are dropped (with a logged
    warning that counts them) and running ones stop with the process, as
    the kernel does not wait for work at power-off; only submitted calls
    are waited for.
    """

    # All fields below are guarded by the engine lock (_pool.lock).
    __slots__ = (
        "func", "_pending", "_disable", "_entry", "_pwq", "_color", "_seq",
        "_worker", "_flushers", "__weakref__",
    )
    #: Whether the item runs calls accepted by an Executor's submit(), which
    #: the program waits for at exit (see _atexit).
    _is_call = False

    def __init__(self, func: Callable[[Any], object]) -> None:
        if not callable(func):
            raise TypeError(f"Work needs a callable, not {type(func).__name__}")
        self.func = func
        # Invariants: _pending is True from a successful queue_work until just
        # before func runs (or until cancelled).  While pending on a list,
        # _entry is that list and _pwq/_color say where it is accounted;
        # pending on a timer (DelayedWork), _entry is None.  While not
        # pending, _entry means nothing (it is not cleared when the item
        # starts: every way to become pending sets it).  _seq counts the
        # queueings onto a list; a flush registered at queueing n completes
        # once queueing n has run, or has been taken back (cancel,
        # mod_delayed_work) and no run of the item is left (see
        # wake_work_flushers and its callers).
        # _worker is the worker running func, or None.
        self._pending = False
        # Queueing is refused while non-zero.  disable() calls count 1 each,
        # and a cancel_sync() under way _CANCEL_HOLD, which its _CancelSync
        # holds: not the caller's to enable(), which sees only the remainder.
        self._disable = 0
        self._entry: WorkList | None = None
        self._pwq: PoolWorkqueue | None = None
        self._color = 0
        self._seq = 0
        self._worker: Worker | None = None
        self._flushers: list[tuple[int, Completion]] | None = None

    if not TYPE_CHECKING:  # a __getattr__ would let mypy pass any attribute

        def __getattr__(self, name: str) -> Any:
            # Only reached when normal lookup failed: an unset slot of ours
            # means that a subclass's __init__ never called Work.__init__.
            # Said so, rather than that some '_pending' is missing (which
            # would surface from deep inside queue_work()).
            if name in _SLOTS:
                raise AttributeError(
                    f"{type(self).__name__} object was not set up as a work item: "
                    f"its __init__ must call super().__init__(func)", name=name, obj=self)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}",
                                 name=name, obj=self)

    def __repr__(self) -> str:
        func = self.func
        name = getattr(func, "__qualname__", None) or repr(func)
        state = " pending" if self._pending else ""
        state += " running" if self._worker is not None else ""
        disabled, cancelling = self._disable % _CANCEL_HOLD, self._disable // _CANCEL_HOLD
        state += f" disabled={disabled}" if disabled else ""
        state += " cancelling" if cancelling else ""
        return f"<{type(self).__name__} {name}{state}>"

    @property
    def pending(self) -> bool:
        """True while queued (or on its timer) and not yet started (work_pending)."""
        return self._pending

    @property
    def running(self) -> bool:
        """True while its function runs (work_busy & WORK_BUSY_RUNNING)."""
        return self._worker is not None

    @property
    def disabled(self) -> bool:
        """True while queueing is refused: disable() calls outnumber
        enable() calls, or a cancel_sync() is under way (see there)."""
        return self._disable > 0

    def flush(self, *, timeout: float | None = None) -> bool:
        """Wait for the last queueing of this item to finish (flush_work).

        Returns True if it waited for a pending or running instance, False if
        the item was idle.  An item pending only on its timer is not waited
        for (use DelayedWork.flush()).  TimeoutError if *timeout* seconds
        pass first, saying where the item is; the item goes on unchanged.
        """
        return self._flush(timeout, from_timer=False)

    def _flush(self, timeout: float | None, *, from_timer: bool, at_exit: bool = False) -> bool:
        """flush(), queueing the item at once first if *from_timer* and it
        is on its timer (DelayedWork.flush()).  With *at_exit*, the exit
        hook's wait (see _atexit): a pending queueing that a freeze holds
        back is not waited for, only the run going on now, if any -- else
        the wait would last until a thaw() that nobody will call."""
        timeout = check_timeout(timeout)
        # Before anything, a DelayedWork's timer too: a refused flush
        # changes nothing.
        self._check_not_own_function("flush")
        completion = Completion()
        # The flush is registered, and taken back when the wait times out,
        # inside the try that takes it back on any other way out: Ctrl-C,
        # wherever it lands, leaves none behind.
        try:
            with _pool.lock:
                dropped_by = None
                if from_timer:
                    assert isinstance(self, DelayedWork)
                    dropped_by = self._queue_from_timer()
                waiting = self._start_flush(completion, at_exit=at_exit)
            if dropped_by is not None:
                assert isinstance(self, DelayedWork)
                dropped_by._log_dropped(self)
            if not waiting:
                return False
            if completion.wait(timeout):
                return True
            with _pool.lock:
                if not self._take_back_flush(completion):
                    return True  # it completed as the wait ended
        except BaseException:
            with _pool.lock:
                self._take_back_flush(completion)
            raise
        raise self._timed_out("flush", timeout)

    def _start_flush(self, completion: Completion, hold: int = 0, *,
                     at_exit: bool = False) -> bool:
        """Register *completion* to complete once the current instance of
        the item is over (with *at_exit*, its run going on now if a freeze
        holds back its pending queueing), and add *hold* to its disable
        count; False, doing neither, if there is none (engine lock held)."""
        on_list = self._pending and self._entry is not None
        # Read here, under the lock that registers the wait, not where the
        # exit hook looked: a run may have queued its item again since.
        held = at_exit and self._held_by_freeze()
        if self._worker is None and (held or not on_list):
            return False
        flushers = self._flushers
        if flushers is None:
            flushers = self._flushers = []
        # The hold, then its owner, with no call in between: Ctrl-C lands
        # as a call returns, and it must find both or neither.
        self._disable += hold
        # The queueing that runs now is an earlier one than the pending
        # queueing's, which is the last (see wake_work_flushers).
        flushers.append((self._seq - 1 if held else self._seq, completion))
        return True

    def _held_by_freeze(self) -> bool:
        """Whether the item is pending on an inactive list of a frozen
        workqueue, where only thaw() lets it run (engine lock held)."""
        entry = self._entry
        pwq = self._pwq
        return (self._pending and entry is not None and not entry.active
                and pwq is not None and pwq.wq._frozen)

    def _take_back_flush(self, completion: Completion) -> bool:
        """Unregister a flush that its caller stopped waiting for (timeout,
        Ctrl-C); False if it is not registered: not yet, or completed
        (engine lock held)."""
        flushers = self._flushers
        for i, (_, registered) in enumerate(flushers or ()):
            if registered is completion:
                assert flushers is not None
                if len(flushers) > 1:
                    del flushers[i]
                else:
                    self._flushers = None
                return True
        return False

    def _timed_out(self, what: str, timeout: float | None, then: str = "") -> TimeoutError:
        """The TimeoutError of a wait for this item, saying where it is now,
        and then *then*."""
        assert timeout is not None  # only a bounded wait times out
        wq = None
        with _pool.lock:
            where = []
            worker = self._worker
            if worker is not None:
                where.append(f"it has run on {worker.name} "
                             f"for {_pool._monotonic() - worker.start:.3f} s")
            if self._pending and self._entry is not None and self._pwq is not None:
                wq = self._pwq.wq
                where.append(f"it is pending on workqueue {wq.name!r}")
        # Named with the lock free (see Draft).
        text = f"{what}() of {work_name(self)} timed out after {timeout:g} s"
        if where:
            text += ": " + ", and ".join(where)
        text += then
        if wq is not None:  # what runs ahead of it; dump() takes the engine lock
            text += f"; there:\n{wq.dump()}"
        return TimeoutError(text)

    def _check_not_own_function(self, what: str) -> None:
        """Refuse to wait for ourselves (engine lock not held: the error
        names the item, see Draft).  Without the lock, _worker is our
        worker exactly when the lock would say so: only our own thread
        sets it to our worker, and only it clears it."""
        worker = current_worker()
        if worker is not None and self._worker is worker:
            raise RuntimeError(f"{what}() of {work_name(self)} from its own function "
                               "would deadlock")

    def cancel(self) -> bool:
        """Remove the item if pending (cancel_work); True if it was pending.

        Does not wait for a running instance: see cancel_sync().
        """
        with _pool.lock:
            return try_to_grab_pending(self)

    def cancel_sync(self, *, timeout: float | None = None) -> bool:
        """Cancel and wait for a running instance (cancel_work_sync).

        Returns True if the item was pending.  When it returns, the item is
        neither pending nor running; re-queueing, by the item itself or
        anyone, is refused while it waits (the item is *cancelling*).

        TimeoutError if *timeout* seconds pass before the run ends.  The
        cancel then goes on without its caller: the item stays cancelling
        until that run ends -- queue_work() returns False, also from the
        run itself -- and is then idle and can be queued again, as if
        cancel_sync() had waited.  A later cancel_sync() waits for the same
        run.  Ctrl-C in the wait leaves the same.
        """
        return self._cancel(disable=False, sync=True, timeout=timeout)

    def disable(self) -> bool:
        """Cancel and disable the item (disable_work); True if it was pending.

        Disabling nests; queueing a disabled item returns False.  Does not
        wait for a running instance: see disable_sync().
        """
        return self._cancel(disable=True, sync=False)

    def disable_sync(self, *, timeout: float | None = None) -> bool:
        """disable() and wait for a running instance (disable_work_sync).

        TimeoutError if *timeout* seconds pass before the run ends; the
        item stays disabled, as the call's disable() is the caller's.
        """
        return self._cancel(disable=True, sync=True, timeout=timeout)

    def enable(self) -> bool:
        """Undo one disable() (enable_work); True when no disable is left.

        RuntimeError if the item is not disabled.
        """
        with _pool.lock:
            if self._disable % _CANCEL_HOLD:
                self._disable -= 1
                return not self._disable % _CANCEL_HOLD
        # Named with the lock free (see Draft).
        raise RuntimeError(f"enable() of {work_name(self)}, which is not disabled")

    def _cancel(self, *, disable: bool, sync: bool, timeout: float | None = None) -> bool:
        what = "disable_sync" if disable else "cancel_sync"
        timeout = check_timeout(timeout)
        # Nobody may queue the item again while we wait for its run: the
        # caller's disable() refuses it, or a cancel_sync()'s own hold,
        # which its wait holds (see _CancelSync).
        completion = None
        if sync:
            self._check_not_own_function(what)
            completion = Completion() if disable else _CancelSync(self)
        try:
            with _pool.lock:
                if disable:
                    self._disable += 1
                was_pending = try_to_grab_pending(self)
                waiting = completion is not None and self._start_flush(
                    completion, 0 if disable else _CANCEL_HOLD)
            if not waiting:
                return was_pending
            assert completion is not None
            if completion.wait(timeout):
                return was_pending
            # Timed out: unless it completed as the wait ended, a
            # disable_sync()'s flush is taken back (see flush()); a
            # cancel_sync()'s stays, and the item cancelling, until the
            # run ends.
            if not disable:
                if completion.wait(0):
                    return was_pending
            else:
                with _pool.lock:
                    if not self._take_back_flush(completion):
                        return was_pending
        except BaseException:
            if disable and completion is not None:
                with _pool.lock:
                    self._take_back_flush(completion)
            raise
        then = "; its pending instance was cancelled" if was_pending else "; it was not pending"
        then += (", and it stays disabled" if disable else
                 ", and it stays cancelling (queueing it is refused) until that run ends")
        raise self._timed_out(what, timeout, then)


class DelayedWork(Work):
    """A work item queued after a delay (struct delayed_work).

    Queue it with Workqueue.queue_delayed_work() or mod_delayed_work().  Its
    timer runs on the engine's single timer thread and never fires early.
    """

    # Guarded by the engine lock: _timer is the armed timer while pending on
    # it; _wq and _cpu are where the timer queues the item.
    __slots__ = ("_timer", "_wq", "_cpu")

    def __init__(self, func: Callable[[Any], object]) -> None:
        super().__init__(func)
        self._timer: TimerHandle | None = None
        self._wq: Workqueue | None = None
        self._cpu: int | None = None

    def flush(self, *, timeout: float | None = None) -> bool:
        """Queue at once if on the timer, then wait (flush_delayed_work).

        Returns True if it waited for a pending or running instance.
        TimeoutError if *timeout* seconds pass first; the item stays queued.
        """
        return self._flush(timeout, from_timer=True)

    def _queue_from_timer(self) -> Workqueue | None:
        """Queue at once if on the timer; the workqueue that refused it,
        if one did (engine lock held)."""
        handle = self._timer
        if handle is None:
            return None
        wq = self._wq
        assert wq is not None
        # Queued while its timer is still armed, and the timer deleted
        # last: Ctrl-C before the item is on its list (see insert_work)
        # leaves it on its timer, and after, with a timer that finds
        # _timer None as it fires and does nothing -- as does one that
        # fires as we queue the item.
        self._timer = None
        try:
            queued = wq._timer_queue_locked(self)
        except BaseException:
            if self._pending and self._entry is None:
                self._timer = handle
            raise
        del_timer(handle)
        return None if queued else wq


class _CancelSync(Completion):
    """The wait of a cancel_sync(), which holds the item: registered as a
    flush of its running instance together with _CANCEL_HOLD on the item
    (see Work._start_flush), it drops the hold as it completes, once that
    run is over.  Whether its caller still waits then or stopped waiting
    (timeout, Ctrl-C), the run cannot queue the item again meanwhile, and
    nothing but the run's end is needed to end the hold: the item ends as
    cancel_sync() leaves it, neither pending, nor running, nor cancelling."""

    __slots__ = ("work",)

    def __init__(self, work: Work) -> None:
        super().__init__()
        self.work = work

    def complete(self) -> None:  # engine lock held
        # Once only, as Completion.complete(), and the hold dropped with
        # it: no call in between, where Ctrl-C would land.
        if self.done:
            return
        self.work._disable -= _CANCEL_HOLD
        self.done = True
        self._lock.release()


#: The slots Work.__init__ and DelayedWork.__init__ set (see Work.__getattr__).
_SLOTS = frozenset(Work.__slots__) | frozenset(DelayedWork.__slots__)
