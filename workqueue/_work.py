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
from ._pool import Completion, Worker, WorkList, current_work, current_worker, try_to_grab_pending
from ._timer import TimerHandle, del_timer

if TYPE_CHECKING:
    from ._pool import PoolWorkqueue
    from ._workqueue import Workqueue

__all__ = ["Work", "DelayedWork", "current_work"]

#: What a waiting cancel_sync() adds to Work._disable: more than any number
#: of disable() calls a program makes, so the two counts never mix.
_CANCEL_HOLD = 1 << 32


class Work:
    """A work item: Work(func) runs func(work) on a workqueue.

    Subclass it to carry your own fields, calling super().__init__(func)
    (see the module's docstring).  Its function's return value is dropped,
    and an exception it raises goes nowhere but the log: logged with its
    traceback (logger ``workqueue._pool``, ERROR) and counted in the
    workqueue's stats().failed, the worker going on with the next item.
    Use Workqueue.submit() for a call whose result or exception you want.

    At interpreter exit, items still pending are dropped without a word
    and running ones stop with the process, as the kernel does not wait
    for work at power-off; only submitted calls are waited for.
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
        # and a waiting cancel_sync() _CANCEL_HOLD: its hold is not the
        # caller's to enable(), which sees only the remainder.
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
        enable() calls, or a cancel_sync() is waiting."""
        return self._disable > 0

    def flush(self) -> bool:
        """Wait for the last queueing of this item to finish (flush_work).

        Returns True if it waited for a pending or running instance, False if
        the item was idle.  An item pending only on its timer is not waited
        for (use DelayedWork.flush()).
        """
        completion = None
        with _pool.lock:
            completion = self._start_flush()
        if completion is None:
            return False
        completion.wait()
        return True

    def _start_flush(self) -> Completion | None:
        """Register a flusher of the current instance (engine lock held)."""
        if not (self._pending and self._entry is not None) and self._worker is None:
            return None
        self._check_not_own_function("flush")
        completion = Completion()
        if self._flushers is None:
            self._flushers = []
        self._flushers.append((self._seq, completion))
        return completion

    def _check_not_own_function(self, what: str) -> None:
        """Refuse to wait for ourselves (engine lock held)."""
        worker = current_worker()
        if worker is not None and self._worker is worker:
            raise RuntimeError(f"{what}() of {self!r} from its own function would deadlock")

    def cancel(self) -> bool:
        """Remove the item if pending (cancel_work); True if it was pending.

        Does not wait for a running instance: see cancel_sync().
        """
        with _pool.lock:
            return try_to_grab_pending(self)

    def cancel_sync(self) -> bool:
        """Cancel and wait for a running instance (cancel_work_sync).

        Returns True if the item was pending.  When it returns, the item is
        neither pending nor running; re-queueing, by the item itself or
        anyone, is refused while it waits.
        """
        return self._cancel(disable=False, sync=True)

    def disable(self) -> bool:
        """Cancel and disable the item (disable_work); True if it was pending.

        Disabling nests; queueing a disabled item returns False.  Does not
        wait for a running instance: see disable_sync().
        """
        return self._cancel(disable=True, sync=False)

    def disable_sync(self) -> bool:
        """disable() and wait for a running instance (disable_work_sync)."""
        return self._cancel(disable=True, sync=True)

    def enable(self) -> bool:
        """Undo one disable() (enable_work); True when no disable is left.

        RuntimeError if the item is not disabled.
        """
        with _pool.lock:
            if not self._disable % _CANCEL_HOLD:
                raise RuntimeError(f"enable() of {self!r}, which is not disabled")
            self._disable -= 1
            return not self._disable % _CANCEL_HOLD

    def _cancel(self, *, disable: bool, sync: bool) -> bool:
        with _pool.lock:
            if sync:
                self._check_not_own_function("disable_sync" if disable else "cancel_sync")
            # Disabled while we wait, so that nobody re-queues it meanwhile.
            hold = 1 if disable else _CANCEL_HOLD
            self._disable += hold
            was_pending = try_to_grab_pending(self)
            completion = self._start_flush() if sync else None
        try:
            if completion is not None:
                completion.wait()
        finally:
            # Also when the wait ends in an exception (Ctrl-C): the hold
            # left behind would refuse all queueing of the item for ever.
            if not disable:
                with _pool.lock:
                    self._disable -= hold
        return was_pending


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

    def flush(self) -> bool:
        """Queue at once if on the timer, then wait (flush_delayed_work).

        Returns True if it waited for a pending or running instance.
        """
        dropped_by = None
        with _pool.lock:
            # Before the timer is touched: a refused flush changes nothing.
            self._check_not_own_function("flush")
            if self._timer is not None:
                # Even if it just fired: its callback will find _timer None.
                del_timer(self._timer)
                self._timer = None
                wq = self._wq
                assert wq is not None
                if not wq._timer_queue_locked(self):
                    dropped_by = wq
            completion = self._start_flush()
        if dropped_by is not None:
            dropped_by._log_dropped(self)
        if completion is None:
            return False
        completion.wait()
        return True


#: The slots Work.__init__ and DelayedWork.__init__ set (see Work.__getattr__).
_SLOTS = frozenset(Work.__slots__) | frozenset(DelayedWork.__slots__)
