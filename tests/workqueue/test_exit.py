"""What interpreter exit does to work items (see workqueue._atexit): the
program waits for submitted calls, and says which work items it drops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

_DROPPING_SCRIPT = r"""
import logging
import threading
from workqueue import DelayedWork, Topology, Work, alloc_ordered_workqueue, alloc_workqueue

logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
never = threading.Event()  # never set: the item runs until the process ends

def hold(work):
    never.wait()

def named(tag):
    def func(work):
        pass
    func.__qualname__ = tag
    return func

topo = Topology(2)
busy = alloc_ordered_workqueue("busy", topology=topo)
busy.queue_work(Work(hold))
for i in range(5):  # behind the held one: an ordered workqueue runs one at a time
    busy.queue_work(Work(named(f"item{i}")))
timers = alloc_workqueue("timers", topology=topo)
timers.queue_delayed_work(DelayedWork(named("tick")), 3600)
idle = alloc_workqueue("idle", topology=topo)
ran = Work(named("ran"))
idle.queue_work(ran)
ran.flush()
idle.submit(int)  # waited for at exit, not dropped
gone = alloc_workqueue("destroyed", topology=topo)
gone.destroy()
"""


def run(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "exit.py"
    script.write_text(text)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return done


def test_the_work_items_dropped_at_exit_are_logged_once(tmp_path: Path) -> None:
    """The kernel does not wait for work at power-off, and neither does
    the exit of a program; but a program that meant its items to run must
    hear that they did not: one warning, counting them per workqueue, with
    the first few of each."""
    stderr = run(tmp_path, _DROPPING_SCRIPT).stderr
    assert stderr.count("WARNING workqueue._atexit: interpreter exit drops") == 1, stderr
    assert "interpreter exit drops 6 pending work items of 2 workqueues" in stderr, stderr
    assert ("workqueue 'busy': 5 pending: <Work item0 pending>, <Work item1 pending>, "
            "<Work item2 pending> and 2 more") in stderr, stderr
    assert "workqueue 'timers': 1 pending: <DelayedWork tick pending>" in stderr, stderr
    # The running item is not dropped (it stops with the process), nor are
    # calls (run before exit), nor items of the other workqueues.
    assert "hold" not in stderr and "'idle'" not in stderr and "'destroyed'" not in stderr


def test_a_program_that_drops_nothing_says_nothing(tmp_path: Path) -> None:
    done = run(tmp_path, r"""
import logging
from workqueue import DelayedWork, Topology, Work, alloc_workqueue

logging.basicConfig()
wq = alloc_workqueue("tidy", topology=Topology(2))
work = Work(lambda work: None)
wq.queue_work(work)
work.flush()
dwork = DelayedWork(lambda work: None)
wq.queue_delayed_work(dwork, 3600)
dwork.cancel()
wq.submit(int)
""")
    assert done.stderr == ""


def test_a_work_item_whose_repr_fails_is_named_all_the_same(tmp_path: Path) -> None:
    """The exit names the items it drops with their repr(), which is the
    program's: one that raises (a connection's, on its closed socket)
    must not end the exit hook, which would leave unsaid what it had to
    say and skip what follows it at exit -- the wait for the program's
    own threads, here one that runs to its end once the main thread
    has."""
    done = run(tmp_path, r"""
import logging
import socket
import threading
from workqueue import Topology, Work, alloc_ordered_workqueue

logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")

class Conn(Work):
    def __init__(self, sock):
        super().__init__(Conn.poll)
        self.sock = sock

    def poll(self):
        pass

    def __repr__(self):
        return f"<Conn {self.sock.getpeername()}>"

never = threading.Event()
wq = alloc_ordered_workqueue("conns", topology=Topology(2))
wq.queue_work(Work(lambda work: never.wait()))
closed, _ = socket.socketpair()
closed.close()
wq.queue_work(Conn(closed))  # pending behind the held one

def last():
    threading.main_thread().join()
    print("the program's last thread ran to its end", flush=True)

threading.Thread(target=last).start()
""")
    assert "Traceback" not in done.stderr, done.stderr
    assert "interpreter exit drops 1 pending work item of 1 workqueue" in done.stderr, done.stderr
    assert "workqueue 'conns': 1 pending: <__main__.Conn object at 0x" in done.stderr
    assert "(its repr() raised OSError)" in done.stderr, done.stderr
    assert done.stdout == "the program's last thread ran to its end\n"

