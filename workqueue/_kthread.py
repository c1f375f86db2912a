"""Threads that take no signals, as Linux's kernel threads take none.

The kernel gives a signal sent to a process to any one of its threads that
does not block it, and a thread that is being started takes one that is
pending as it sets its signal mask.  CPython runs signal handlers in the
main thread only, and a main thread asleep in a lock (``Future.result()``,
``flush_work()``, ``Event.wait()``) or in ``poll()`` wakes only for a signal
given to it.  So in a program whose pools start and retire workers, Ctrl-C
could be taken by a worker and leave the main thread asleep: the handler
ran when the main thread next woke, late or never.

Like a kthread, then, every thread of this package (and of the packages
built on it) blocks the signals that a program handles, from its first
instruction: the starting thread blocks them around ``start()``, so that
the new thread inherits the mask and has no moment in which it could take
one.  Signals that belong to the thread that causes them (a fault, a write
to a broken pipe) stay unblocked: they are not the process's to route.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import ClassVar

__all__ = ["KThread", "kthread_run"]

# The thread-directed signals: raised by what the thread itself did, so no
# other thread could take them, and blocking them would only change how the
# fault is handled.  SIGKILL and SIGSTOP cannot be blocked at all.
_THREAD_DIRECTED = {
    signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP,
    signal.SIGSYS, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGKILL, signal.SIGSTOP,
}


class KThread(threading.Thread):
    """A :class:`threading.Thread` that takes no process signals.

    It blocks :attr:`blocked_signals` for its whole life, so that they
    reach the program's own threads, and the main thread's handlers run at
    once rather than when it next wakes.  Everything else is
    :class:`threading.Thread`'s.
    """

    blocked_signals: ClassVar[frozenset[int]] = frozenset(
        signal.valid_signals() - _THREAD_DIRECTED)

    def start(self) -> None:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, self.blocked_signals)
        try:
            super().start()
        finally:
            # One that came meanwhile was left pending: it is taken now.
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def kthread_run(target: Callable[[], object], name: str, *, daemon: bool = True) -> KThread:
    """Create a :class:`KThread` running ``target()`` and start it, as the
    kernel's ``kthread_run()`` creates a kthread and wakes it up."""
    thread = KThread(target=target, name=name, daemon=daemon)
    thread.start()
    return thread
