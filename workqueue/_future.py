"""The executor face: a lean Future and the work item that runs a submitted call.

concurrent.futures.Future makes a Condition (and with it an RLock) in its
constructor, and concurrent.futures.wait() takes every future's condition:
both cost more than queueing a work item.  A LeanFuture has no condition of
its own.  Its `_condition`, which wait(), as_completed(), add_done_callback()
and the other standard methods take to look at the state and the waiter
lists, is one re-entrant lock shared by all lean futures (wait() takes it
once per future; re-entrancy makes that cheap).  Nobody ever sleeps on that
condition: result() and exception() sleep on a private lock per blocked
thread, which the finishing side releases.

The one rule: a future's state becomes final only under `_condition`, in the
same hold that tells its watchers.  concurrent.futures.wait() and
as_completed() look at the state twice while holding it (once to find the
finished futures, once to count the pending ones their waiter must hear
from), then install their waiter on every future.  A future that finished
between the two looks would be counted by neither and still notify the
waiter; one whose telling came in a later hold than its state write could be
counted as done by a look in between and then notify the waiter anyway.
Either way the waiter returns early.  So completion and cancellation write
the state and tell the watchers in one hold of the shared lock; only the
telling is skipped for a future nobody watches: a future is *watched* once
anybody asked for its _condition, which happens before they take it, so a
finisher that takes the lock after them sees it.  (PENDING -> RUNNING needs
no lock: both read as "not done".)

Cancellation goes through the work item: a future can be cancelled exactly
while its item is pending, which the engine lock decides (the state moves to
CANCELLED_AND_NOTIFIED under it, since no worker will ever pick the item up).
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

# The `_condition` of every LeanFuture.  It guards the waiter lists
# (_waiters, _blocked, _done_callbacks) of watched futures and orders a
# watcher's look at the state against completion.  Held only for list
# operations, never while user code runs; re-entrant because wait() takes it
# once per future.  Lock order: this lock -> engine lock (cancel decides under
# both); never the other way round: nothing takes this lock while holding the
# engine lock.
_futures_cond = threading.Condition(threading.RLock())


class LeanFuture(Future[Any]):
    """A Future that costs little until somebody waits on it.

    LeanFuture(work) is the future of a CallWork: cancel() succeeds exactly
    while the item is pending.  LeanFuture() stands alone, for executors
    built on the engine (e.g. a serial executor): they call
    set_running_or_notify_cancel() before running the call, as with any
    Future, and cancel() succeeds until then.  Either way the state changes
    under the engine lock, which is what makes cancel and start exclusive.
    """

    _watched = False
    _blocked: list[threading.Lock] | None = None  # result()/exception() sleepers

    def __init__(self, work: CallWork | None = None) -> None:  # no super().__init__(): that is the cost
        self._work = work
        self._state = PENDING
        self._result = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Future[Any]], object]] = []

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        self._watched = True  # before the caller reads the state under it
        return _futures_cond

    def __repr__(self) -> str:
        return f"<LeanFuture state={self._state} work={self._work!r}>"

    def cancel(self) -> bool:
        with _futures_cond:
            with _pool.lock:
                state = self._state
                if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                    return True
                if state != PENDING:
                    return False
                if self._work is not None and not try_to_grab_pending(self._work):
                    return False
                # Nobody will run it, so there is nothing left to notify later.
                self._state = CANCELLED_AND_NOTIFIED
            self._notify(None, cancelled=True)  # the engine lock is not held while telling
        if self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    def set_running_or_notify_cancel(self) -> bool:
        with _futures_cond, _pool.lock:
            state = self._state
            if state == PENDING:
                self._state = RUNNING
                return True
            if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return False
        raise InvalidStateError(f"{self!r} cannot start: it is {state}")

    def done(self) -> bool:
        return self._state in _DONE

    def _wait(self, timeout: float | None) -> None:
        """Sleep until done or *timeout* seconds passed."""
        if self._state in _DONE:
            return
        with _futures_cond:
            self._watched = True
            if self._state in _DONE:
                return
            sleeper = threading.Lock()
            sleeper.acquire()
            if self._blocked is None:
                self._blocked = []
            self._blocked.append(sleeper)
        with _pool.blocking():  # a worker waiting here lets its pool run others
            woke = sleeper.acquire(timeout=-1 if timeout is None else timeout)
        if not woke:
            with _futures_cond:
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

    def set_result(self, result: Any) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception)

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        self._result = result
        self._exception = exception
        with _futures_cond:  # final and told in one hold (see module doc)
            self._state = FINISHED
            self._notify(exception)
        if self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]

    def _notify(self, exception: BaseException | None, cancelled: bool = False) -> None:
        """Wake whoever watches this future, made final in this very hold of
        _futures_cond."""
        if not self._watched:
            return
        for waiter in self._waiters:
            if cancelled:
                waiter.add_cancelled(self)
            elif exception is None:
                waiter.add_result(self)
            else:
                waiter.add_exception(self)
        blocked, self._blocked = self._blocked, None
        for sleeper in blocked or ():
            sleeper.release()
        _futures_cond.notify_all()  # for code that waits on _condition itself


class CallWork(Work):
    """The work item behind Workqueue.submit(fn, *args, **kwargs)."""

    __slots__ = ("future", "fn", "args", "kwargs")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        Work.__init__(self, _run_call)
        self.future = LeanFuture(self)
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        return f"<CallWork {name}>"


def _run_call(work: CallWork) -> None:
    future = work.future
    future._state = RUNNING  # cancel() can no longer win: the item is not pending
    try:
        result = work.fn(*work.args, **work.kwargs)
    except BaseException as exc:
        future._finish(None, exc)
    else:
        future._finish(result, None)
    # Drop what the call no longer needs, and break the work <-> future
    # cycle (the future keeps its work for cancel()), so that a finished
    # call is freed by reference counting, not by the cyclic collector.  The
    # del also clears this frame, which a raised exception's traceback keeps.
    work.future = work.fn = work.args = work.kwargs = None  # type: ignore[assignment]
    del work, future


def cancel_pending_futures(wq: Workqueue) -> int:
    """Cancel the submitted calls of *wq* that have not started; how many."""
    cancelled = []
    with _futures_cond:
        with _pool.lock:
            for pwq in wq._all_pwqs():
                for work in [*pwq.inactive, *(w for w in pwq.pool.worklist if w._pwq is pwq)]:
                    if isinstance(work, CallWork) and try_to_grab_pending(work):
                        cancelled.append(work.future)
        for future in cancelled:
            future._state = CANCELLED_AND_NOTIFIED
            future._notify(None, cancelled=True)
    for future in cancelled:
        if future._done_callbacks:
            future._invoke_callbacks()  # type: ignore[attr-defined]
    return len(cancelled)
