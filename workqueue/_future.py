"""The executor face: a lean Future and the work item that runs a submitted call.

concurrent.futures.Future makes a Condition (and with it an RLock) in its
constructor, which costs more than queueing a work item.  LeanFuture makes
its condition only when someone waits on it, adds a callback or installs a
wait()/as_completed() waiter; a future that is done before anyone looks at it
never has one.  Everything else is the standard Future, so wait(),
as_completed(), add_done_callback() and asyncio's wrap_future() work as usual.

Why the lock-free completion is safe (under the GIL, whose operations are
sequentially consistent): the finishing side writes the new state, *then*
looks for the condition; a waiting side makes the condition, *then* reads the
state under it.  Either the finisher sees the condition and notifies under
it, or the waiter sees the final state and does not wait.

Cancellation goes through the work item: a future can be cancelled exactly
while its item is pending, which the engine lock decides (the state moves to
CANCELLED_AND_NOTIFIED under it, since no worker will ever pick the item up).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
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


class LeanFuture(Future[Any]):
    """A Future whose condition is made on first use.

    LeanFuture(work) is the future of a CallWork: cancel() succeeds exactly
    while the item is pending.  LeanFuture() stands alone, for executors
    built on the engine (e.g. a serial executor): they call
    set_running_or_notify_cancel() before running the call, as with any
    Future, and cancel() succeeds until then.  Either way the state changes
    under the engine lock, which is what makes cancel and start exclusive.
    """

    def __init__(self, work: CallWork | None = None) -> None:  # no super().__init__(): that is the cost
        self._work = work
        self._state = PENDING
        self._result = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Future[Any]], object]] = []

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond: threading.Condition | None = self.__dict__.get("_cond")
        if cond is None:
            # setdefault is atomic: two first users end up with one condition.
            cond = self.__dict__.setdefault("_cond", threading.Condition())
        return cond

    def __repr__(self) -> str:
        return f"<LeanFuture state={self._state} work={self._work!r}>"

    def cancel(self) -> bool:
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
        self._notify_cancelled()
        return True

    def set_running_or_notify_cancel(self) -> bool:
        with _pool.lock:
            state = self._state
            if state == PENDING:
                self._state = RUNNING
                return True
            if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return False
        raise InvalidStateError(f"{self!r} cannot start: it is {state}")

    def _notify_cancelled(self) -> None:
        cond = self.__dict__.get("_cond")
        if cond is not None:
            with cond:
                for waiter in self._waiters:
                    waiter.add_cancelled(self)
                cond.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]

    def done(self) -> bool:
        return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)

    def result(self, timeout: float | None = None) -> Any:
        if self._state == FINISHED and self._exception is None:
            return self._result
        return super().result(timeout)

    def set_result(self, result: Any) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception)

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        self._result = result
        self._exception = exception
        self._state = FINISHED  # publish, then look for waiters (see module doc)
        cond = self.__dict__.get("_cond")
        if cond is not None:
            with cond:
                for waiter in self._waiters:
                    if exception is None:
                        waiter.add_result(self)
                    else:
                        waiter.add_exception(self)
                cond.notify_all()
        if self._done_callbacks:
            self._invoke_callbacks()  # type: ignore[attr-defined]


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
    with _pool.lock:
        for pwq in wq._all_pwqs():
            for work in [*pwq.inactive, *(w for w in pwq.pool.worklist if w._pwq is pwq)]:
                if isinstance(work, CallWork) and try_to_grab_pending(work):
                    work.future._state = CANCELLED_AND_NOTIFIED
                    cancelled.append(work.future)
    for future in cancelled:
        future._notify_cancelled()
    return len(cancelled)
