"""One timer thread for the whole process (the kernel's timer wheel, reduced).

Delayed work, the concurrency manager's CPU-intensive tick, the worker
creation retry and the watchdog all arm timers here.  A timer callback runs on
the timer thread and must be short: it typically takes the engine lock and
queues a work item.

A timer never fires early: it fires once time.monotonic() has reached its
deadline, checked after every wake-up, because a timed wait may return a
little before its timeout.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["TimerHandle", "add_timer", "armed_timers", "del_timer", "timer_pending"]

logger = logging.getLogger(__name__)


class TimerHandle:
    """An armed timer.  `callback` is None once it fired or was deleted."""

    __slots__ = ("deadline", "callback", "arg")

    def __init__(self, deadline: float, callback: Callable[[Any], None], arg: Any) -> None:
        self.deadline = deadline
        self.callback: Callable[[Any], None] | None = callback
        self.arg = arg


class _TimerBase:
    def __init__(self) -> None:
        # _cond's lock guards _heap, _nr_dead and _thread.  It is a leaf lock:
        # callers may hold the engine lock when they add or delete a timer,
        # and the timer thread never holds it while running a callback, so
        # a callback may take the engine lock (order: engine lock -> _cond).
        # Blocks take the lock itself, not the Condition: its __enter__ and
        # __exit__ are Python functions, where a signal's handler may run
        # in the main thread between the lock and the with block, and leave
        # the lock held for good when it raises (Ctrl-C).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Invariant: _heap holds (deadline, seq, handle) for every armed
        # handle, plus _nr_dead entries whose handle was deleted (lazy
        # deletion; compacted when they are the majority).
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._nr_dead = 0
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, delay: float, callback: Callable[[Any], None], arg: Any) -> TimerHandle:
        handle = TimerHandle(time.monotonic() + delay, callback, arg)
        with self._lock:
            first = not self._heap or handle.deadline < self._heap[0][0]
            heapq.heappush(self._heap, (handle.deadline, next(self._seq), handle))
            if self._thread is None:
                # Recorded once started, in the same hold: recorded first, a
                # thread that Ctrl-C kept from starting (as start() began,
                # in the main thread) was the timer thread for good, and no
                # timer fired again.  Ctrl-C as start() returns skips the
                # record instead: the thread then records itself (see _run).
                thread = threading.Thread(target=self._run, name="wq-timer", daemon=True)
                thread.start()
                self._thread = thread
            elif first:
                self._cond.notify()
        return handle

    def delete(self, handle: TimerHandle) -> bool:
        """Disarm *handle*; True if it was armed (the kernel's del_timer)."""
        with self._lock:
            if handle.callback is None:
                return False
            handle.callback = None
            handle.arg = None
            self._nr_dead += 1
            if self._nr_dead > 64 and self._nr_dead * 2 > len(self._heap):
                self._heap[:] = [e for e in self._heap if e[2].callback is not None]
                heapq.heapify(self._heap)
                self._nr_dead = 0
            return True

    def armed(self) -> list[tuple[Callable[[Any], None], Any]]:
        with self._lock:
            return [(handle.callback, handle.arg) for _, _, handle in self._heap
                    if handle.callback is not None]

    def _run(self) -> None:
        me = threading.current_thread()
        with self._lock:
            if self._thread is None:
                self._thread = me  # Ctrl-C skipped the record: see add()
            elif self._thread is not me:
                return  # started again as Ctrl-C skipped our record: the other one runs
        heap = self._heap  # compacted in place, never replaced
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    while heap and heap[0][2].callback is None:
                        heapq.heappop(heap)
                        self._nr_dead -= 1
                    if heap and heap[0][0] <= now:
                        break
                    # Delays are checked against TIMEOUT_MAX where they
                    # come in; min() keeps this thread, which every timer
                    # of the process needs, alive whatever happens.
                    self._cond.wait(min(heap[0][0] - now, threading.TIMEOUT_MAX)
                                    if heap else None)
                _, _, handle = heapq.heappop(heap)
                callback, arg = handle.callback, handle.arg
                handle.callback = None
                handle.arg = None
            assert callback is not None
            try:
                callback(arg)
            except BaseException:
                # Whatever it is, as a work function's (see _pool's
                # process_works): a SystemExit or another BaseException
                # that ended this thread would leave every later timer of
                # the process unfired, delayed work never queued, without
                # a word.  No signal's handler runs here (CPython runs
                # them in the main thread), so this swallows no Ctrl-C.
                logger.exception("timer callback %r failed", callback)
            del callback, arg, handle


_timer = _TimerBase()


def add_timer(delay: float, callback: Callable[[Any], None], arg: Any = None) -> TimerHandle:
    """Call callback(arg) on the timer thread once *delay* seconds have passed."""
    return _timer.add(delay, callback, arg)


def del_timer(handle: TimerHandle) -> bool:
    """Disarm a timer; True if it had not fired yet."""
    return _timer.delete(handle)


def armed_timers() -> list[tuple[Callable[[Any], None], Any]]:
    """The callback and argument of each timer armed now, in no
    particular order.  Read under the timer's lock: a handle's own fields
    may be cleared at any time by the timer thread, which holds only that
    lock as it takes a timer that is due."""
    return _timer.armed()


def timer_pending(handle: TimerHandle | None) -> bool:
    """True if *handle* is armed and has not fired."""
    return handle is not None and handle.callback is not None


def _after_fork_in_child() -> None:
    """A forked child has no timer thread: the next add_timer() starts one.
    The parent's timers would queue the parent's delayed items, which do
    not run in the child (see _pool._after_fork_in_child): they are
    disarmed, as if deleted."""
    timer = _timer
    timer._lock = threading.Lock()  # a thread of the parent may hold it
    timer._cond = threading.Condition(timer._lock)
    for _, _, handle in timer._heap:
        handle.callback = None
        handle.arg = None
    timer._heap.clear()
    timer._nr_dead = 0
    timer._thread = None


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)
