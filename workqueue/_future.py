"""The executors' Future: LeanFuture, and the work item that runs a submitted call.

concurrent.futures.Future makes a Condition (and with it an RLock) and two
lists in its constructor, and leaves them for the cyclic garbage collector to
scan while the call waits; concurrent.futures.wait() then takes every
future's condition.  All of that costs more than queueing a work item.  A
LeanFuture is one slotted object that carries its call, and makes what only
a watcher needs -- its condition, the waiter list, the done-callbacks, the
threads asleep in result() -- when the first watcher asks for it.
Workqueue.submit() and wq.serial(key).submit() both return one.

A future is *watched* once anybody asked for its `_condition` while it was
not done (wait(), as_completed(), add_done_callback(), asyncio): that makes
its own condition (an _OwnCondition: a re-entrant lock), once, under
_futures_lock, and the future keeps it.  An unwatched future has none, and
its state is guarded by _futures_lock alone, which every LeanFuture shares:
starting and finishing take only that lock, once.  A future asked for its
`_condition` once it is final gets a lock that locks nothing (_SETTLED),
unless it has its own already: a final state never changes again, so there
is nothing left to guard, and wait() over futures that are done makes no
locks.  result() and exception() make no condition either: they sleep on a
private lock per blocked thread (on the future's `_blocked` list, under
_futures_lock), which the finishing side releases.

Why not one condition for them all, on one re-entrant lock, which wait()
would take cheaply once per future?  Because wait() and as_completed() take
their futures' conditions in the order of the futures' ids, and a standard
Future, with a condition of its own, can sit between two LeanFutures in that
order: a wait() on {A, L1} (A a standard future first) would hold A's and
want the shared lock, while a wait() on {L2, A} (L2 first) held the shared
lock and wanted A's -- a deadlock that standard futures, one condition
each, cannot have.  Conditions of their own put LeanFutures back in that
order.

The one rule: a future's state becomes final only under its condition, in
the same hold that tells its watchers.  concurrent.futures.wait() and
as_completed() look at the states twice while holding the conditions (once
to find the finished futures, once to count the pending ones their waiter
must hear from) and then install their waiter on every future.  A future
made final between the two looks would be counted by neither, and still
count the waiter down; a future told of in a later hold than the one that
made it final could be counted as done by a look in between, and then count
the waiter down once more.  Either way wait() would return with futures not
done.  (PENDING -> RUNNING needs no such care: both read as "not done"; nor
PENDING -> CANCELLED, which concurrent.futures reads as "not done" as well:
see cancel_pending_futures.)  For an unwatched future "its condition" is
_futures_lock: while that is held nobody can make it one, as that takes the
lock, so the state made final in that hold has nobody to tell.

A future can be cancelled until it starts, and who decides that depends on
who runs it.  The future of a submitted call (a CallWork's) can be cancelled
exactly while its work item is pending, which the engine lock decides.  Any
other LeanFuture -- a serial executor's, or a bare LeanFuture() -- until its
executor calls set_running_or_notify_cancel(), which decides under
_futures_lock.
"""

from __future__ import annotations

import _thread
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import (  # the states, as concurrent.futures spells them
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import TYPE_CHECKING, Any, TypeVar

from . import _pool
from ._pool import try_to_grab_pending
from ._work import Work

if TYPE_CHECKING:
    from ._workqueue import Workqueue

# Where concurrent.futures logs a failed done-callback; so do we.
_cf_logger = logging.getLogger("concurrent.futures")

_T = TypeVar("_T")

__all__ = ["LeanFuture", "CallWork", "cancel_pending_futures"]

_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)  # done(): no outcome to come
_FINAL = (CANCELLED_AND_NOTIFIED, FINISHED)  # and every watcher told (what wait() counts)

# Shared by every LeanFuture.  Every write of a future's _state is made under
# it, so that the decisions (start or cancel, result() going to sleep or not)
# see one order; it is the condition of an unwatched future (see the module
# docstring); it guards _blocked, and the making of a future's own
# condition (_own).  (Our code never takes it twice in a row.)
#
# Lock order: a future's own condition -> this lock -> engine lock
# (cancelling a submitted call decides under both).  So this lock is a leaf
# but for the engine lock: nothing may take a condition -- any future's,
# standard or lean -- while holding it, for wait() holds the conditions of
# the futures it has taken when it takes this lock in the `_condition` of
# the next (which makes that one's); and nothing takes it while holding the
# engine lock.  A future that has its own condition is made final by taking
# that, then this lock; one that has none, in a hold of this lock that finds
# it has none (none can be made until that hold ends).
#
# Every worker takes it twice per call, so on the per-call paths (start,
# finish) the hold calls no Python function: a call is where the GIL may
# change hands, and the other workers would then queue on this lock behind a
# thread that is not running (bench (c) lost a third of its speed to that).
# For the same reason our code takes the lock itself, not a Condition, whose
# __enter__ and __exit__ are Python functions, and tells a watched future's
# waiters after letting go of it, still under the future's own condition.
_futures_lock = threading.RLock()
if hasattr(os, "register_at_fork"):  # a thread of the parent may hold it at a fork
    os.register_at_fork(after_in_child=_futures_lock._at_fork_reinit)  # type: ignore[attr-defined]


class _OwnCondition(_thread.RLock):  # type: ignore[misc]  # final in the stubs only
    """A watched future's own condition: a re-entrant lock.

    That lock is all that concurrent.futures takes of a future's condition
    (it waits through result() and its waiters), and it is made twenty times
    faster than a threading.Condition -- which would cost a watched future
    as much as a standard Future, and asyncio watches every future it runs
    in an executor.  For code that waits on the condition itself, wait()
    makes a threading.Condition on this lock for as long as anybody waits,
    which notify() and notify_all() find.
    """

    __slots__ = ()

    def wait(self, timeout: float | None = None) -> bool:
        return self._as_condition(lambda condition: condition.wait(timeout))

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        return self._as_condition(lambda condition: condition.wait_for(predicate, timeout))

    def _as_condition(self, wait: Callable[[threading.Condition], Any]) -> Any:
        if not self._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError("cannot wait on un-acquired lock")
        entry = _sleeping.get(self)  # under this lock, as every use of it
        if entry is None:
            entry = _sleeping[self] = [threading.Condition(self), 0]
        entry[1] += 1
        try:
            return wait(entry[0])
        finally:
            entry[1] -= 1
            if not entry[1]:
                del _sleeping[self]

    def notify(self, n: int = 1) -> None:
        if not self._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError("cannot notify on un-acquired lock")
        entry = _sleeping.get(self)
        if entry is not None:
            entry[0].notify(n)

    def notify_all(self) -> None:
        self.notify(sys.maxsize)


# The conditions of the _OwnConditions somebody waits on, and how many wait.
_sleeping: dict[_OwnCondition, list[Any]] = {}


class _Settled:
    """The `_condition` of a future that was final before anybody watched it.

    A final state never changes, and a future has nobody to tell once it is
    final, so there is nothing left for a lock to guard: this one locks
    nothing, and is shared.  (wait() still adds its waiter to, and takes it
    off, the future's _waiters, which is atomic: see LeanFuture._waiters.)
    """

    __slots__ = ()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> bool:
        return True

    def __exit__(self, *exc: object) -> None:
        pass

    def notify(self, n: int = 1) -> None:
        pass

    def notify_all(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> bool:
        raise RuntimeError("waiting on the condition of a future that is done: "
                           "nothing will notify it")

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        # As Condition.wait_for: what holds already is no reason to wait.
        result = predicate()
        if not result:
            self.wait(timeout)
        return result


_SETTLED: Any = _Settled()


def _call_name(fn: Callable[..., Any] | None) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class LeanFuture(Future[Any]):
    """A Future that costs little until somebody watches it.

    LeanFuture(fn, args, kwargs) carries the call fn(*args, **kwargs), which
    its executor runs with _run(); a bare LeanFuture() carries none, and its
    maker drives it as any Future (set_running_or_notify_cancel(), then
    set_result() or set_exception()).  Given a work item (*work*, as CallWork
    does), the future is that item's: it starts when the item runs, and
    cancel() succeeds exactly while the item is pending.  A done future lets
    go of its call and its item.

    Its done-callbacks run as a standard Future's, an Exception from one
    logged on concurrent.futures' logger; but when its executor's worker
    finishes it, a callback raising something else (SystemExit,
    KeyboardInterrupt) stops neither the callbacks after it nor the
    worker: it is logged as the item's failure (a ThreadPoolExecutor
    loses the worker, and the callbacks after it are never called).
    """

    # The fields every future needs are slots; _result and _exception are
    # set when it finishes, and nothing reads them before.  The fields only a
    # watched future needs are the class attributes below until a watcher
    # sets them in the instance.
    __slots__ = ("_state", "_result", "_exception", "_fn", "_args", "_kwargs", "_work")
    # Its own condition: made under _futures_lock, never replaced.
    _own: _OwnCondition | None = None
    # Under the condition (with _waiters and _done_callbacks, which make them):
    _waiter_list: list[Any] | None = None  # concurrent.futures' waiters
    _callback_list: list[Callable[[Future[Any]], object]] | None = None
    # Under _futures_lock: a lock per thread asleep in result().
    _blocked: list[threading.Lock] | None = None
    # Under the condition: how many of _waiter_list were told the future is
    # done (see _tell_watchers).
    _told = 0

    def __init__(  # no super().__init__(): that is the cost
        self,
        fn: Callable[..., Any] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        work: Work | None = None,
    ) -> None:
        self._state = PENDING
        self._fn = fn
        self._args = args
        # An empty kwargs dict is dropped at once: one object less per
        # pending call for the cyclic collector to count and scan.
        self._kwargs = kwargs or None
        self._work = work

    # What concurrent.futures.Future keeps in plain attributes.  It touches
    # the lists only while holding _condition.

    @property
    def _condition(self) -> _OwnCondition:  # type: ignore[override]
        if self._state in _FINAL:
            # For good, so _own can no longer be made: it is None for good,
            # or was made before the state became final.
            own = self._own
            return _SETTLED if own is None else own
        own = self._own
        if own is not None:
            return own
        made = _OwnCondition()  # before the hold, which then calls nothing
        with _futures_lock:
            own = self._own
            if own is None:
                if self._state in _FINAL:
                    return _SETTLED
                self._own = own = made
        return own

    # A future's own condition guards its lists; a _SETTLED future's are
    # reached by more than one thread at once, so they are made atomically
    # (dict.setdefault), and used only through list methods, atomic as well.

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        waiters = self._waiter_list
        if waiters is None:
            waiters = vars(self).setdefault("_waiter_list", [])
        return waiters

    @property
    def _done_callbacks(self) -> list[Callable[[Future[Any]], object]]:
        callbacks = self._callback_list
        if callbacks is None:
            callbacks = vars(self).setdefault("_callback_list", [])
        return callbacks

    def __repr__(self) -> str:
        call = "" if self._fn is None else f" {_call_name(self._fn)}"
        return f"<LeanFuture{call} state={self._state}>"

    # -- the executor's side ----------------------------------------------

    def _run(self) -> None:
        """Run the call and finish with its outcome, unless cancelled first."""
        if not self.set_running_or_notify_cancel():
            return
        fn, args, kwargs = self._fn, self._args, self._kwargs
        assert fn is not None, "a LeanFuture without a call has nothing to run"
        try:
            result = fn(*args, **kwargs) if kwargs else fn(*args)
        except BaseException as exc:
            self._finish(None, exc)
            # The traceback keeps this frame: leave it neither the future (a
            # cycle through the exception) nor the call's arguments.
            self = fn = args = kwargs = None  # type: ignore[assignment]
        else:
            self._finish(result, None)

    def set_running_or_notify_cancel(self) -> bool:
        # A future already running or done is its maker's bug: RuntimeError,
        # the type a standard Future raises, so that code written against
        # one catches it here too.
        with _futures_lock:  # where cancel() decides too
            state = self._state
            if state == PENDING:
                self._state = RUNNING
                return True
            if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return False  # and whoever cancelled it tells the watchers
        raise RuntimeError(f"{self!r} cannot start: it is {state}")

    def set_result(self, result: Any) -> None:
        self._set_final(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._set_final(None, exception)

    def _set_final(self, result: Any, exception: BaseException | None) -> None:
        """set_result() and set_exception(): as a standard Future's, they
        refuse a future already done (its maker's bug; _run() never does).
        Its maker may call them in the main thread, where Ctrl-C lands:
        _settle() then tells everybody all the same."""
        refused = self._settle(lambda: self._finish_locked(result, exception))
        if refused is not None:
            # Named with _futures_lock free: the call's repr() is the
            # program's code, and may wait for a worker, which takes that
            # lock to start any call.
            raise InvalidStateError(f"{refused}: {self!r}")

    def _finish_locked(self, result: Any, exception: BaseException | None) -> str | None:
        """_set_final()'s step under _futures_lock: the state that refuses
        the outcome, None once the future has taken it."""
        state = self._state
        if state in _DONE:
            return state
        self._result = result
        self._exception = exception
        self._state = FINISHED
        if self._blocked is not None:
            self._wake_sleepers()
        return None

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        """_set_final() for _run(), on the per-call path: it runs on a
        worker only (the engine never runs an item in the thread that
        queues it), where no Ctrl-C lands, so it need not take up again
        what it tells, as _settle() does."""
        self._result = result
        self._exception = exception
        with _futures_lock:
            own = self._own
            if own is None:  # none can be made in this hold: final in it
                self._state = FINISHED
                if self._blocked is not None:
                    self._wake_sleepers()
        if own is not None:  # final, and told, in one hold of it
            with own:
                with _futures_lock:
                    self._state = FINISHED
                    if self._blocked is not None:
                        self._wake_sleepers()
                self._tell_watchers(own)
        try:
            self._let_go()
        except BaseException:
            # A done-callback raised what concurrent.futures does not log
            # (SystemExit, KeyboardInterrupt): it goes on to the engine,
            # which logs it as the item's, once the callbacks after it have
            # run -- on a worker nobody calls _let_go() again, as _settle()
            # does in the main thread, and one left uncalled (asyncio's)
            # waits for ever.  Any later escape is logged here.
            while True:
                try:
                    self._let_go()
                    break
                except BaseException:
                    _cf_logger.exception("exception calling callback for %r", self)
            raise

    def _wake_sleepers(self) -> None:
        """Release the threads asleep in result() (_futures_lock held, in
        the hold that made the state done).

        Each sleeper leaves the list with no call before its release,
        where Ctrl-C would land in the main thread: cut short, this
        wakes the rest when called again."""
        blocked = self._blocked
        while blocked:
            sleeper = blocked[-1]
            del blocked[-1]
            sleeper.release()

    def _tell_watchers(self, own: _OwnCondition) -> None:
        """Tell the watchers that the future is done (*own*, its condition,
        held since before the state became final; _futures_lock not held).

        Each waiter is counted as told before it is (a waiter told twice
        counts the future twice): cut short by Ctrl-C in the main thread,
        this tells the rest when called again in the same hold.  The one
        it was telling is not told again, and concurrent.futures' waiters
        are Python code, where Ctrl-C lands too (as add_result() starts,
        say): that one may stay untold, its wait() sleeping to its
        timeout.  Nothing here can tell how far it got, and told twice, a
        wait(ALL_COMPLETED) would return with a future not done, and
        as_completed() would fail with KeyError."""
        waiters = self._waiter_list
        if waiters:
            told = self._told
            for waiter in waiters[told:]:
                told += 1
                self._told = told
                if self._state != FINISHED:
                    waiter.add_cancelled(self)
                elif self._exception is None:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
        own.notify_all()  # for code that waits on _condition itself

    def _let_go(self) -> None:
        """Drop the call and run the done-callbacks, once final (no lock held:
        callbacks, and the __del__ of a dropped argument, are user code).
        add_done_callback() adds to them only under the condition, while the
        future is not done; they all came before the hold that made it so.

        Each callback leaves the list before it is called, as
        concurrent.futures logs what it raises: cut short by Ctrl-C in the
        main thread, this calls the rest, and none twice, when called
        again."""
        self._fn = self._kwargs = self._work = None
        self._args = ()
        callbacks = self._callback_list
        while callbacks:
            callback = callbacks[0]
            del callbacks[0]
            try:
                callback(self)
            except Exception:
                _cf_logger.exception("exception calling callback for %r", self)

    def _settle(self, decide: Callable[[], _T]) -> _T:
        """What decide() answers, called under _futures_lock (and first
        under the future's own condition, if it has one) to make the
        future final or leave it be; made final, it is told of at once,
        in that hold, to the threads asleep in result() and to the
        waiters, and then, with no lock held, to the done-callbacks.

        Ctrl-C may land in the main thread as any call returns (see
        _pool.insert_work).  Of a future made final here, this call alone
        tells the sleepers, the waiters and the callbacks, so each step
        that tells them is taken up again if cut short: each tells nobody
        twice.  Whether it was made final here: not final at the start
        of the hold that decides, and final at its end (nobody else makes
        it final in that hold, see the module docstring).
        """
        owed = False  # made final here: the done-callbacks are ours to call
        try:
            with _futures_lock:
                own = self._own
                if own is None:  # none can be made in this hold: final in it
                    before = self._state
                    try:
                        answer = decide()
                    except BaseException:
                        owed = before not in _FINAL and self._state in _FINAL
                        if owed:
                            self._wake_sleepers()
                        raise
                    owed = before not in _FINAL and self._state in _FINAL
            if own is not None:
                with own:
                    before = self._state
                    try:
                        with _futures_lock:
                            answer = decide()
                        owed = before not in _FINAL and self._state in _FINAL
                        if owed:
                            self._tell_watchers(own)
                    except BaseException:
                        owed = before not in _FINAL and self._state in _FINAL
                        if owed:
                            with _futures_lock:
                                self._wake_sleepers()
                            self._tell_watchers(own)
                        raise
            if owed:
                self._let_go()
        except BaseException:
            if owed:
                self._let_go()
            raise
        return answer

    # -- the caller's side ------------------------------------------------

    def cancel(self) -> bool:
        return self._settle(self._cancel_locked)

    def _cancel_locked(self) -> bool:
        """cancel()'s step under _futures_lock: whether the future is
        cancelled."""
        state = self._state
        if state != PENDING:
            return state in (CANCELLED, CANCELLED_AND_NOTIFIED)
        work = self._work
        if work is not None:
            with _pool.lock:  # only a pending item can be taken back
                if not work._pending:
                    return False
                try:
                    try_to_grab_pending(work)
                finally:
                    # Taken back, even if Ctrl-C cut short what follows in
                    # the engine (which try_to_grab_pending finishes): made
                    # final in the same hold of the engine lock, or it
                    # would stay pending, with nobody to run it.
                    if not work._pending:
                        self._state = CANCELLED_AND_NOTIFIED
        else:
            self._state = CANCELLED_AND_NOTIFIED
        # Nobody will run it, so there is nothing left to notify later.
        if self._blocked is not None:
            self._wake_sleepers()
        return True

    def cancelled(self) -> bool:  # one read, which needs no condition
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)

    def running(self) -> bool:
        return self._state == RUNNING

    def done(self) -> bool:
        return self._state in _DONE

    def _wait(self, timeout: float | None) -> None:
        """Sleep until done or *timeout* seconds passed."""
        if self._state in _DONE:
            return
        sleeper = threading.Lock()  # made before the hold, which then calls nothing
        sleeper.acquire()
        woke = False
        try:
            with _futures_lock:  # where the state becomes done
                if self._state in _DONE:
                    return
                if self._blocked is None:
                    self._blocked = []
                self._blocked.append(sleeper)
            with _pool.blocking():  # a worker waiting here lets its pool run others
                # Not max(timeout, 0), which keeps a NaN: as Condition.wait,
                # a timeout that is not above 0 (NaN included) waits not at all.
                woke = _pool.sleep_on(sleeper, None if timeout is None
                                      else timeout if timeout > 0 else 0)
        finally:
            # Timed out, or interrupted (Ctrl-C in the main thread, as soon
            # as the sleeper is on the list): nobody sleeps on it any more,
            # and every interrupted call would leave one more lock on the
            # list until the future is done.
            if not woke:
                with _futures_lock:
                    if self._blocked is not None and sleeper in self._blocked:
                        self._blocked.remove(sleeper)

    def result(self, timeout: float | None = None) -> Any:
        if self._state != FINISHED:
            self._wait(timeout)
        state = self._state
        if state == FINISHED:
            if self._exception is not None:
                try:
                    raise self._exception
                finally:
                    self = None  # type: ignore[assignment]  # break the traceback cycle
            return self._result
        if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            raise CancelledError()
        raise TimeoutError()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state != FINISHED:
            self._wait(timeout)
        state = self._state
        if state == FINISHED:
            return self._exception
        if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            raise CancelledError()
        raise TimeoutError()


class CallWork(Work):
    """The work item behind Workqueue.submit(fn, *args, **kwargs).

    Its future carries the call, and keeps the item (for cancel()) until it
    is done; the item keeps its future until it has run it.
    """

    __slots__ = ("future",)
    _is_call = True

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        Work.__init__(self, _run_call)
        self.future = LeanFuture(fn, args, kwargs, self)

    def __repr__(self) -> str:
        future = self.future  # None once it has run
        fn = None if future is None else future._fn
        if fn is None:  # let go of as the call ended: its done-callbacks run now, or ran
            return "<CallWork, its call has ended>"
        return f"<CallWork {_call_name(fn)}>"


def _run_call(work: CallWork) -> None:
    work.future._run()
    # A traceback the call raised keeps this frame and, through f_back, the
    # engine's frames that called it, which hold the item.  The item must not
    # lead back to the future, which holds the traceback, or a failed call
    # would wait for the cyclic collector instead of being freed by reference
    # counting.
    work.future = None  # type: ignore[assignment]


def cancel_pending_futures(wq: Workqueue) -> int:
    """Cancel the submitted calls of *wq* that have not started; how many.

    Ctrl-C may land in the main thread as any call returns (see
    _pool.insert_work): each step is taken up again if cut short, and
    does nothing twice (see _mark_cancelled, _tell_cancelled).
    """
    cancelled: list[LeanFuture] = []
    try:
        with _futures_lock:
            with _pool.lock:  # all at once: no call of *wq* starts meanwhile
                # A call is never handed to a worker running it (it runs
                # once), so it waits on an inactive list, a worklist, or the
                # list of the rescuer that took it from a worklist.
                rescuer = wq._rescuer
                taken = [*rescuer.scheduled] if rescuer is not None else []
                queued = [
                    work
                    for pwq in wq._all_pwqs()
                    for work in [*pwq.inactive, *(w for w in [*pwq.pool.worklist, *taken]
                                                  if w._pwq is pwq)]
                    if isinstance(work, CallWork)
                ]
                try:
                    for work in queued:
                        try_to_grab_pending(work)
                    cancelled = _mark_cancelled(queued)
                except BaseException:
                    cancelled = _mark_cancelled(queued)
                    raise
        _tell_cancelled(cancelled)
    except BaseException:
        _tell_cancelled(cancelled)
        raise
    return len(cancelled)


def _mark_cancelled(queued: list[CallWork]) -> list[LeanFuture]:
    """The futures of the calls of *queued* (all pending when listed) that
    were taken back, each one cancelled (_futures_lock and the engine lock
    held, since before the calls were listed: an item no longer pending
    was taken back, not started).  Again, it changes nothing more."""
    cancelled = []
    for work in queued:
        if work._pending:
            continue
        future = work.future
        cancelled.append(future)
        if future._state == PENDING:
            if future._own is None:  # none can be made in this hold: final in it
                future._state = CANCELLED_AND_NOTIFIED
            else:
                # Its own condition cannot be taken here (the lock order):
                # CANCELLED for now, as Future.cancel() leaves a standard
                # future.  cancel() answers True and result() raises
                # CancelledError at once; wait() and as_completed() count it
                # as not done, and hear of it in _tell_cancelled(), where it
                # becomes final.
                future._state = CANCELLED
        if future._blocked is not None:
            future._wake_sleepers()
    return cancelled


def _tell_cancelled(cancelled: list[LeanFuture]) -> None:
    """Make final the *cancelled* futures that have watchers, telling
    them, then call the done-callbacks (no lock held).  Again, it tells
    nobody twice.

    A future is told of only in the hold of its condition that makes it
    final, taken up again there if cut short: a future final already is
    skipped, for a wait() may have put its waiter on it once the hold
    that made it so ended, and counted it done; told again, the waiter
    would count it twice and return with futures not done."""
    for future in cancelled:
        own = future._own
        if own is not None:
            with own:
                if future._state == CANCELLED:
                    try:
                        with _futures_lock:
                            future._state = CANCELLED_AND_NOTIFIED
                        future._tell_watchers(own)
                    except BaseException:
                        if future._state == CANCELLED_AND_NOTIFIED:
                            future._tell_watchers(own)
                        raise
    for future in cancelled:
        future._let_go()
