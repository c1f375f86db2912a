"""Ctrl-C reaches a main thread that waits for work items.

The kernel gives a process's signal to any thread that does not block it
(a worker being started takes one that is pending), CPython runs the
handler in the main thread only, and a main thread asleep in a lock wakes
only for a signal given to it.  Each wait of the main thread must still let
the handler run soon, not when the work item ends.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from workqueue import Work, Workqueue

TIMEOUT = 10.0


class Interrupted(Exception):
    """Raised by the test's signal handler."""


@pytest.mark.parametrize("call", ["flush", "cancel_sync", "flush_workqueue", "drain", "result"])
def test_a_signal_another_thread_took_interrupts_a_wait(
        make_wq: Callable[..., Workqueue], call: str) -> None:
    assert threading.current_thread() is threading.main_thread()
    wq = make_wq()
    release = threading.Event()
    started = threading.Semaphore(0)

    def stuck(work: Work) -> None:
        started.release()
        assert release.wait(TIMEOUT)

    work = Work(stuck)
    if call != "result":
        wq.queue_work(work)
        assert started.acquire(timeout=TIMEOUT)

    calls: dict[str, Callable[[], object]] = {
        "flush": work.flush,
        "cancel_sync": work.cancel_sync,
        "flush_workqueue": wq.flush,
        "drain": wq.drain,
        "result": lambda: wq.submit(stuck, work).result(),
    }

    def main_sleeps_in_a_wait() -> bool:
        # The innermost Python frame of the main thread is the workqueue's
        # wait: it sleeps in the lock it acquires (or is about to).
        frame: Any = sys._current_frames()[threading.main_thread().ident]
        return "/workqueue/" in frame.f_code.co_filename and \
            frame.f_code.co_name in ("sleep_on", "wait", "_wait")

    def signal_when_asleep() -> None:
        deadline = time.monotonic() + TIMEOUT
        while not main_sleeps_in_a_wait() and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGUSR1)

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted

    # A thread that takes the signal: started before the main thread blocks
    # it, it does not block it.
    done = threading.Event()
    taker = threading.Thread(target=done.wait, args=(TIMEOUT,))
    taker.start()
    old = signal.signal(signal.SIGUSR1, handler)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    sender = threading.Thread(target=signal_when_asleep)
    try:
        sender.start()
        began = time.monotonic()
        with pytest.raises(Interrupted):
            calls[call]()
        # Well before the item ends (it waits TIMEOUT for its release).
        assert time.monotonic() - began < TIMEOUT / 2
    finally:
        release.set()
        sender.join(TIMEOUT)
        done.set()
        taker.join(TIMEOUT)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGUSR1, old)
    work.flush()
    # The interrupted call left nothing behind: the item queues and runs.
    assert wq.queue_work(work)
    work.flush()
