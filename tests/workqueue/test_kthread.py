"""The workqueue's threads take no process signals, as kthreads take none."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from threadsignals import blocked_signals

from workqueue import DelayedWork, KThread, Work, Workqueue, kthread_run

TIMEOUT = 10.0

HANDLED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGALRM,
           signal.SIGCHLD}
THREAD_DIRECTED = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGPIPE}


def this_threads_mask() -> set[int]:
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_kthread_run_blocks_the_process_signals_only() -> None:
    seen: list[set[int]] = []
    before = this_threads_mask()
    thread = kthread_run(lambda: seen.append(this_threads_mask()), "test-kthread")
    thread.join(TIMEOUT)
    assert thread.daemon and thread.name == "test-kthread"
    assert HANDLED <= seen[0] and not THREAD_DIRECTED & seen[0]
    assert seen[0] == before | KThread.blocked_signals
    assert this_threads_mask() == before  # the caller's own mask is back


def test_every_thread_of_a_workqueue_blocks_them(make_wq: Callable[..., Workqueue]) -> None:
    wq = make_wq()
    in_work: list[set[int]] = []
    w = Work(lambda work: in_work.append(this_threads_mask()))
    wq.queue_work(w)
    w.flush()
    assert HANDLED <= in_work[0]
    timer_fired = threading.Event()
    wq.queue_delayed_work(DelayedWork(lambda work: timer_fired.set()), 0.01)  # the timer's thread
    assert timer_fired.wait(TIMEOUT)
    threads = [t for t in threading.enumerate()
               if t.name.startswith("kworker/") or t.name == "wq-timer"]
    assert {"kworker", "wq-timer"} <= {t.name.split("/")[0] for t in threads}
    for t in threads:
        assert HANDLED <= blocked_signals(t), t.name


# Ctrl-C while the main thread waits for a work item, and the pool keeps
# starting and retiring workers: the handler must run at once.  Before, a
# starting worker could take the signal, and the main thread slept on.
_FLUSH_WHILE_WORKERS_COME_AND_GO = """
import signal, threading, time
import workqueue
from workqueue import Topology, Work, alloc_workqueue

workqueue._pool.IDLE_WORKER_TIMEOUT = 0.001  # surplus workers retire at once

class Stop(Exception):
    pass

def stop(signum, frame):
    raise Stop

def churn(work):
    with workqueue.blocking():  # the pool starts a worker for the other
        time.sleep(0.001)
    wq.queue_work(work)

signal.signal(signal.SIGTERM, stop)
wq = alloc_workqueue("churn", topology=Topology(1))
for _ in range(2):
    wq.queue_work(Work(churn))
never = Work(lambda work: threading.Event().wait())
wq.queue_work(never)
try:
    print("flushing", flush=True)
    never.flush()
except Stop:
    print("stopped", flush=True)
"""


def test_a_signal_reaches_the_main_thread_while_workers_come_and_go() -> None:
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _FLUSH_WHILE_WORKERS_COME_AND_GO],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "flushing\n"
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=TIMEOUT)
            assert out == "stopped\n"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
