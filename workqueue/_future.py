"""The executors' Future: LeanFuture, and the work item that runs a submitted call.

concurrent.futures.Future makes a Condition (and with it an RLock) and two
lists in its constructor, and leaves them for the cyclic garbage collector to
scan while the call waits; concurrent.futures.wait() then takes every
future's condition.  All of that costs more than queueing a work item.  A
LeanFuture is one slotted object that carries its call, and makes what only
a watcher needs -- the waiter list, the done-callbacks, the threads asleep in
result() -- when the first watcher asks for it.  Workqueue.submit() and
wq.serial(key).submit() both return one.

All LeanFutures share one `_condition`, on a re-entrant lock: wait() takes
it once per future, which re-entrancy makes cheap, where a condition per
future, however lazily made, would cost as much as a standard Future.
Nobody sleeps on it: result() and exception() sleep on a private lock per
blocked thread, which the finishing side releases.  A future is *watched*
once anybody asked for its `_condition`, which they do before taking it;
only a watched future has anybody to tell when it is done.

The one rule: a future's state becomes final only under its condition, in
the same hold that tells its watchers.  concurrent.futures.wait() and
as_completed() look at the states twice while holding the conditions (once
to find the finished futures, once to count the pending ones their waiter
must hear from) and then install their waiter on every future.  A future
made final between the two looks would be counted by neither, and still
count the waiter down; a future told of in a later hold than the one that
made it final could be counted as done by a look in between, and then count
the waiter down once more.  Either way wait() would return with futures not
done.  (PENDING -> RUNNING needs no such care: both read as "not done".)

A future can be cancelled until it starts, and who decides that depends on
who runs it.  The future of a submitted call (a CallWork's) can be cancelled
exactly while its work item is pending, which the engine lock decides.  Any
other LeanFuture -- a serial executor's, or a bare LeanFuture() -- until its
executor calls set_running_or_notify_cancel(), which decides under the
condition.
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Any

from . import _pool
from ._pool import try_to_grab_pending
from ._work import Work

if TYPE_CHECKING:
    from ._workqueue import Workqueue

__all__ = ["LeanFuture", "CallWork", "cancel_pending_futures"]

_DONE = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)

# The lock of every LeanFuture's `_condition`.  Final states are written under
# it (the rule in the module docstring), and it guards the watchers' lists
# (_waiter_list, _callback_list, _blocked).  Held only for those few
# operations, never while user code runs; re-entrant because wait() takes it
# once per future.  Lock order: this lock -> engine lock (cancelling a
# submitted call decides under both); nothing takes this lock while holding
# the engine lock.
#
# Every worker takes it twice per call, so on the per-call paths (start,
# finish) the hold calls no Python function: a call is where the GIL may
# change hands, and the other workers would then queue on this lock behind a
# thread that is not running (bench (c) lost a third of its speed to that).
# For the same reason our code takes the lock itself, not the Condition,
# whose __enter__ and __exit__ are Python functions.
_futures_lock = threading.RLock()
_futures_cond = threading.Condition(_futures_lock)


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
    """

    # The fields every future needs are slots; _result and _exception are
    # set when it finishes, and nothing reads them before.  The fields only a
    # watched future needs are the class attributes below until a watcher
    # sets them in the instance (under _futures_lock, except _watched: see
    # the module docstring).
    __slots__ = ("_state", "_result", "_exception", "_fn", "_args", "_kwargs", "_work")
    _watched = False
    _waiter_list: list[Any] | None = None  # concurrent.futures' waiters
    _callback_list: list[Callable[[Future[Any]], object]] | None = None
    _blocked: list[threading.Lock] | None = None  # a lock per thread asleep in result()

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
    # the lists only while holding _condition, hence they are made under it.

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        self._watched = True  # before the caller takes it and looks at the state
        return _futures_cond

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        if self._waiter_list is None:
            self._waiter_list = []
        return self._waiter_list

    @property
    def _done_callbacks(self) -> list[Callable[[Future[Any]], object]]:
        if self._callback_list is None:
            self._callback_list = []
        return self._callback_list

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
        with _futures_lock:  # where cancel() decides too
            state = self._state
            if state == PENDING:
                self._state = RUNNING
                return True
            if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return False  # and cancel() has told the watchers
        raise InvalidStateError(f"{self!r} cannot start: it is {state}")

    def set_result(self, result: Any) -> None:
        self._set_final(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._set_final(None, exception)

    def _set_final(self, result: Any, exception: BaseException | None) -> None:
        """set_result() and set_exception(): as a standard Future's, they
        refuse a future already done (its maker's bug; _run() never does)."""
        with _futures_lock:
            if self._state in _DONE:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._exception = exception
            self._state = FINISHED
            if self._watched:
                self._tell_watchers()
        self._let_go()

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        self._result = result
        self._exception = exception
        with _futures_lock:  # final, and told, in one hold (see the module docstring)
            self._state = FINISHED
            if self._watched:
                self._tell_watchers()
        self._let_go()

    def _tell_watchers(self) -> None:
        """Tell the watchers that the future is done (_futures_lock held, in
        the hold that made its state final)."""
        for waiter in self._waiter_list or ():
            if self._state != FINISHED:
                waiter.add_cancelled(self)
            elif self._exception is None:
                waiter.add_result(self)
            else:
                waiter.add_exception(self)
        blocked, self._blocked = self._blocked, None
        for sleeper in blocked or ():
            sleeper.release()
        _futures_cond.notify_all()  # for code that waits on _condition itself

    def _let_go(self) -> None:
        """Drop the call and run the done-callbacks, once final (no lock held:
        callbacks, and the __del__ of a dropped argument, are user code)."""
        self._fn = self._kwargs = self._work = None
        self._args = ()
        if self._callback_list:
            self._invoke_callbacks()  # type: ignore[attr-defined]

    # -- the caller's side ------------------------------------------------

    def cancel(self) -> bool:
        with _futures_lock:
            state = self._state
            if state != PENDING:
                return state in (CANCELLED, CANCELLED_AND_NOTIFIED)
            work = self._work
            if work is not None:
                with _pool.lock:  # only a pending item can be taken back
                    if not try_to_grab_pending(work):
                        return False
            # Nobody will run it, so there is nothing left to notify later.
            self._state = CANCELLED_AND_NOTIFIED
            if self._watched:
                self._tell_watchers()
        self._let_go()
        return True

    def done(self) -> bool:
        return self._state in _DONE

    def _wait(self, timeout: float | None) -> None:
        """Sleep until done or *timeout* seconds passed."""
        if self._state in _DONE:
            return
        sleeper = threading.Lock()  # made before the hold, which then calls nothing
        sleeper.acquire()
        with _futures_lock:
            self._watched = True
            if self._state in _DONE:
                return
            if self._blocked is None:
                self._blocked = []
            self._blocked.append(sleeper)
        woke = False
        try:
            with _pool.blocking():  # a worker waiting here lets its pool run others
                woke = _pool.sleep_on(sleeper, None if timeout is None else max(timeout, 0))
        finally:
            # Timed out, or interrupted (Ctrl-C in the main thread): nobody
            # sleeps on it any more, and every interrupted call would leave
            # one more lock on the list until the future is done.
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

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        Work.__init__(self, _run_call)
        self.future = LeanFuture(fn, args, kwargs, self)

    def __repr__(self) -> str:
        future = self.future  # None once it has run
        return f"<CallWork {_call_name(None if future is None else future._fn)}>"


def _run_call(work: CallWork) -> None:
    work.future._run()
    # A traceback the call raised keeps this frame and, through f_back, the
    # engine's frames that called it, which hold the item.  The item must not
    # lead back to the future, which holds the traceback, or a failed call
    # would wait for the cyclic collector instead of being freed by reference
    # counting.
    work.future = None  # type: ignore[assignment]


def cancel_pending_futures(wq: Workqueue) -> int:
    """Cancel the submitted calls of *wq* that have not started; how many."""
    with _futures_lock:
        with _pool.lock:  # all at once: no call of *wq* starts meanwhile
            cancelled = [
                work.future
                for pwq in wq._all_pwqs()
                for work in [*pwq.inactive, *(w for w in pwq.pool.worklist if w._pwq is pwq)]
                if isinstance(work, CallWork) and try_to_grab_pending(work)
            ]
        for future in cancelled:
            future._state = CANCELLED_AND_NOTIFIED
            if future._watched:
                future._tell_watchers()
    for future in cancelled:
        future._let_go()
    return len(cancelled)
