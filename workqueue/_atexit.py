"""Interpreter exit: the submitted calls of every live workqueue finish first.

concurrent.futures promises that, "regardless of the value of wait, the
entire Python program will not exit until all pending futures are done
executing".  Our workers are daemon threads -- a program need not destroy
its workqueues to exit, as nothing in the kernel waits for a workqueue at
power-off -- so that promise is kept here, for the calls a Workqueue or one
of its serial executors accepted with submit(): at exit, new calls are
refused (RuntimeError, as ThreadPoolExecutor's), and the work items behind
the calls already accepted are flushed until none is left.  Plain work
items are not waited for: a workqueue's own items (pollers that queue
themselves again, say) may never be done, and the kernel does not wait for
them either.  But a program that meant them to run must hear that they may
not: the items still pending then -- queued, or on their timers -- are
counted in one warning, per workqueue, with the first few of each.  The
workers go on until the process ends, so some of those may yet start (and
stop with it, as running ones do, unsaid): dropped means not waited for.

A frozen workqueue's calls queued since the freeze cannot run until thaw(),
which nobody will call any more: they are dropped, with a warning.  Those
it still runs -- a freeze() that timed out leaves them running, and one
still waiting lets them run -- are waited for, as freeze() waits for them.
A freeze() once the exit began is refused (RuntimeError), as the kernel
refuses to suspend once a reboot began: it would hold back a call that
the exit already waits for.

Nor can the calls run that a forked child inherits: only the forking
thread lives on in the child, not the workers, so the child forgets the
workqueues it inherited and exits without waiting for them (a
ThreadPoolExecutor's child does too: its exit hook joins threads that the
child does not have).

The hook is threading's, not atexit's, as concurrent.futures' is: it runs
before the interpreter starts refusing new threads, which a pool may need
(a blocked worker gets a replacement).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING

from ._pool import work_name

if TYPE_CHECKING:
    from ._work import Work
    from ._workqueue import Workqueue

__all__ = ["register", "wait_for_calls"]

logger = logging.getLogger(__name__)

#: How many of a workqueue's dropped items the exit warning names.
_SHOWN_DROPPED = 3

# Every workqueue not yet collected.  _lock makes register() and the
# snapshot in wait_for_calls() exclusive: a WeakSet must not grow while
# it is iterated.  Collected workqueues leave the set by themselves, so
# nothing here outlives a test.
_lock = threading.Lock()
_live: weakref.WeakSet[Workqueue] = weakref.WeakSet()
# True once the interpreter exits: submit() (of a workqueue and of a serial
# executor) reads it and refuses new calls.
_exiting = False


def register(wq: Workqueue) -> None:
    """Called by every new Workqueue."""
    with _lock:
        _live.add(wq)


def wait_for_calls() -> None:
    """Refuse new calls, then wait until every accepted call has run, and
    say which work items are dropped."""
    global _exiting
    _exiting = True
    while True:
        with _lock:
            live = list(_live)
        held: dict[Workqueue, list[Work]] = {}
        waited = False
        for wq in live:
            will_run, held_back = wq._calls_at_exit()
            # Each wait is for what its item holds as it is registered: a
            # run that ends its batch may have queued its item again since,
            # behind the freeze (the next pass finds it held back).
            for work in will_run:
                work._flush(None, from_timer=False, at_exit=True)
                waited = True
            # A freeze holds back the next run of these, not the one going
            # on, which freeze() itself waits for: so does the exit.
            for work in held_back:
                waited |= work._flush(None, from_timer=False, at_exit=True)
            if held_back:
                held[wq] = held_back
        if not waited:
            break
    for wq, works in held.items():
        nr_calls = sum(map(_calls_of, works))
        if nr_calls:
            logger.warning("workqueue %r is frozen at exit: %d submitted calls will not run",
                           wq.name, nr_calls)
    with _lock:
        everyone = list(_live)
    _warn_dropped(everyone)


def _calls_of(work: Work) -> int:
    """How many calls *work*, a call item, would run: a serial executor's
    item runs those of its key still waiting; a run of it that ended as
    the exit waited may have run them all."""
    from ._serial import _SerialWork
    return len(work.calls) if isinstance(work, _SerialWork) else 1


def _warn_dropped(wqs: list[Workqueue]) -> None:
    """One warning for the work items of *wqs* the exit does not wait for, if any."""
    lines = []
    total = 0
    for wq in sorted(wqs, key=lambda wq: wq.name):
        works = wq._dropped_at_exit()
        if not works:
            continue
        total += len(works)
        shown = ", ".join(map(work_name, works[:_SHOWN_DROPPED]))
        if len(works) > _SHOWN_DROPPED:
            shown += f" and {len(works) - _SHOWN_DROPPED} more"
        lines.append(f"  workqueue {wq.name!r}: {len(works)} pending: {shown}")
    if lines:
        logger.warning("interpreter exit does not wait for %d pending work item%s of %d "
                       "workqueue%s (flush or cancel them, or destroy their workqueues, before "
                       "the program ends):\n%s", total, "" if total == 1 else "s",
                       len(lines), "" if len(lines) == 1 else "s", "\n".join(lines))


def _forget_inherited() -> None:
    """In a forked child: the live workqueues are the parent's, whose calls
    no thread of the child will run.  The lock, which another thread may
    have held at the fork, is made anew as well."""
    global _lock, _live
    _lock = threading.Lock()
    _live = weakref.WeakSet()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_forget_inherited)

try:
    _register_atexit = threading._register_atexit  # type: ignore[attr-defined]
except AttributeError:  # not CPython: atexit runs while daemon threads still do
    import atexit

    atexit.register(wait_for_calls)
else:
    _register_atexit(wait_for_calls)
