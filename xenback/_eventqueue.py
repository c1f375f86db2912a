"""Ordered delivery of callbacks on a shared workqueue.

The kernel's xenbus runs every watch callback on one ``xenwatch`` thread, so
events for one device can never overtake each other, and a slow device holds
up all the others.  Here each device (or any other consumer) gets an
:class:`EventQueue`: a deque of pending calls drained by one work item on a
shared workqueue.  A work item never runs concurrently with itself and is
re-run when queued while running, so the calls of one queue run one at a
time in the order they were queued, while different queues run in parallel
on the workqueue's workers.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from workqueue import Work, current_work

if TYPE_CHECKING:
    from workqueue import Workqueue

logger = logging.getLogger(__name__)

__all__ = ["EventQueue"]


def check_callback(callback: object, name: str = "callback") -> None:
    """Refuse what cannot be called when it is given, not later on another
    thread, where the TypeError would only be logged, once per event.
    ``name``: the argument's, for the error."""
    if not callable(callback):
        raise TypeError(f"{name} must be callable, not {type(callback).__name__}")


class EventQueue:
    """Calls ``fn(*args)`` for each :meth:`call`, one at a time, in order.

    ``workqueue`` is shared by many queues (a :func:`workqueue.alloc_workqueue`
    queue).  An exception in a call is logged and does not stop the calls
    after it (SystemExit, say, ends the Work's run, which logs it, and they
    run in the next).  ``handled(exc)``, if given, sees it first: True means
    its owner knows why the call failed and said so already, and nothing
    more is logged.
    """

    def __init__(
        self,
        workqueue: Workqueue,
        name: str = "",
        *,
        handled: Callable[[Exception], bool] | None = None,
    ) -> None:
        self.name = name
        self._workqueue = workqueue
        self._handled = handled
        # _lock guards _calls and _closed, and is held while call() queues
        # the Work, so that close(), which takes it, then flushes every call
        # it let in (queueing after letting go of it raced with a close()
        # and a destroy() of the workqueue).  Never held while a call runs.
        self._lock = threading.Lock()
        self._calls: deque[tuple[Callable[..., object], tuple[object, ...]]] = deque()
        self._closed = False
        # Calls let in (under _lock), and calls that ended, however (written
        # by _drain alone: the Work runs one at a time; read as a snapshot).
        # flush() waits until the second reaches what the first was.
        self._queued = 0
        self._ended = 0
        self._work: Work = Work(self._drain)

    def __repr__(self) -> str:
        # A snapshot, without _lock: a debugger stopped where it is held
        # would hang showing us.
        return f"<EventQueue {self.name!r} pending={len(self._calls)}>"

    def call(self, fn: Callable[..., object], *args: object) -> bool:
        """Queue ``fn(*args)`` behind every earlier call.  Returns False
        (and drops the call) once the queue is closed; RuntimeError if the
        workqueue refuses the queue's Work (draining or destroyed), the
        call not taken."""
        check_callback(fn)
        with self._lock:
            if self._closed:
                return False
            # Counted first: a Ctrl-C as append() returns must not leave a
            # call in that flush() does not count (it would return as the
            # run ending at that call's count ends, with calls behind it
            # still to run); one counted that never came in only costs a
            # flush one more look at an idle Work.  The Work queued before
            # the call goes in: refused (a workqueue draining or destroyed),
            # the call is not taken, as call() raising says, and does not
            # run when a later call() queues the Work.  Queued first, it
            # finds the call all the same: _drain looks under our _lock.
            self._queued += 1
            self._workqueue.queue_work(self._work)
            self._calls.append((fn, args))
        return True

    def _drain(self, _work: object) -> None:
        # The pending bit of our Work is cleared before this runs, so a call
        # appended after the deque looked empty re-queues the Work: no call
        # is ever left behind, and the Work's non-reentrancy keeps the order.
        try:
            while True:
                with self._lock:
                    if not self._calls:
                        return
                    fn, args = self._calls.popleft()
                try:
                    fn(*args)
                except Exception as exc:
                    self._failed(fn, exc)
                finally:
                    self._ended += 1
        except BaseException:
            # SystemExit, say, from a call or from ``handled``: it ends this
            # run, and the worker logs it.  The calls behind it run in the
            # next one, not whenever another call() queues the Work again
            # (flush() would not wait for them).
            with self._lock:
                if self._calls:
                    self._workqueue.queue_work(self._work)
            raise

    def _failed(self, fn: Callable[..., object], exc: Exception) -> None:
        """Say that the call of ``fn`` raised ``exc``, unless ``handled`` did."""
        if self._explained(exc):
            return
        if isinstance(exc, ConnectionError) and exc.errno == errno.ENOTCONN:
            # XenStore (or the host) went away under the call: not a bug of
            # the callback, and every later call says the same.
            logger.warning("%s: callback %r: %s", self.name or "event queue", fn, exc)
        else:
            logger.exception("%s: callback %r failed", self.name or "event queue", fn)

    def _explained(self, exc: Exception) -> bool:
        """Whether ``handled`` took care of ``exc``."""
        if self._handled is None:
            return False
        try:
            return self._handled(exc)
        except Exception:
            # Logged below with the call's own exception; the calls behind
            # this one must still run.
            logger.exception("%s: handling %r failed", self.name or "event queue", exc)
            return False

    def in_queue(self) -> bool:
        """True when called from one of this queue's calls."""
        return current_work() is self._work

    def flush(self) -> None:
        """Wait until every call queued so far has run.  From a call of this
        queue it returns at once (waiting for itself would never end).
        Not once nothing will run them: the Work idle, its workqueue
        destroyed, say, as a run ended past Exception."""
        if self.in_queue():
            return
        with self._lock:
            target = self._queued
        # The Work's flush waits for its queueing as it stands now; a run
        # that something past Exception ended queued it anew for the calls
        # behind (see _drain), and those must be waited for too.  Not once
        # the Work is idle with calls left: nothing will run them (its
        # workqueue refused it), and waiting would never end.
        while self._work.flush() and self._ended < target:
            pass

    def close(self, *, wait: bool = True) -> None:
        """Refuse further calls; with ``wait``, let the queued ones finish
        (not when called from this queue: the rest then runs after the
        current call returns)."""
        with self._lock:
            self._closed = True
        if wait:
            self.flush()
