"""What interpreter exit does to work items (see workqueue._atexit): the
program waits for submitted calls, and says which work items it drops."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest
from racewindow import Attempt, PauseAt, stands_at
from wqhelpers import wait_until

from workqueue import (
    WQ_FREEZABLE,
    DelayedWork,
    Topology,
    Work,
    Workqueue,
    _atexit,
    _timer,
    blocking,
)
from workqueue._pool import lock as engine_lock
from workqueue._serial import _BATCH
from workqueue._timer import del_timer

ROOT = Path(__file__).resolve().parent.parent.parent
TIMEOUT = 10.0

_DROPPING_SCRIPT = r"""
import logging
import threading
from workqueue import DelayedWork, Topology, Work, alloc_ordered_workqueue, alloc_workqueue

logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
never = threading.Event()  # never set: the item runs until the process ends
holding = threading.Event()

def hold(work):
    holding.set()
    never.wait()

def named(tag):
    def func(work):
        pass
    func.__qualname__ = tag
    return func

topo = Topology(2)
busy = alloc_ordered_workqueue("busy", topology=topo)
busy.queue_work(Work(hold))
holding.wait()  # running, not pending: the exit does not count it
for i in range(5):  # behind the held one: an ordered workqueue runs one at a time
    busy.queue_work(Work(named(f"item{i}")))
timers = alloc_workqueue("timers", topology=topo)
for i in range(3):  # as many as the warning names: all of them, and no "more"
    timers.queue_delayed_work(DelayedWork(named(f"tick{i}")), 3600 + i)
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
    assert stderr.count("WARNING workqueue._atexit: interpreter exit does not wait for") == 1, \
        stderr
    assert "exit does not wait for 8 pending work items of 2 workqueues" in stderr, stderr
    assert ("workqueue 'busy': 5 pending: <Work item0 pending>, <Work item1 pending>, "
            "<Work item2 pending> and 2 more") in stderr, stderr
    timers = [line for line in stderr.splitlines() if "workqueue 'timers'" in line]
    assert len(timers) == 1, stderr
    # In the timer's order, which is its own.
    assert timers[0].startswith("  workqueue 'timers': 3 pending: <DelayedWork tick"), timers
    assert sorted(timers[0].split(": ", 2)[2].split(", ")) == [
        f"<DelayedWork tick{i} pending>" for i in range(3)], timers
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

never, running = threading.Event(), threading.Event()
wq = alloc_ordered_workqueue("conns", topology=Topology(2))
wq.queue_work(Work(lambda work: (running.set(), never.wait())))
running.wait()  # running, not pending: the exit counts only the Conn
closed, _ = socket.socketpair()
closed.close()
wq.queue_work(Conn(closed))  # pending behind the held one

def last():
    threading.main_thread().join()
    print("the program's last thread ran to its end", flush=True)

threading.Thread(target=last).start()
""")
    assert "Traceback" not in done.stderr, done.stderr
    assert "exit does not wait for 1 pending work item of 1 workqueue (flush" in done.stderr, \
        done.stderr
    assert "workqueue 'conns': 1 pending: <__main__.Conn object at 0x" in done.stderr
    assert "(its repr() raised OSError)" in done.stderr, done.stderr
    assert done.stdout == "the program's last thread ran to its end\n"


def test_the_exit_warning_lists_the_workqueues_by_name(
        make_wq: Callable[..., Workqueue], caplog: pytest.LogCaptureFixture) -> None:
    """Whatever order the workqueues are found in (a WeakSet's)."""
    found = [make_wq(name) for name in ("zeta", "alpha", "mu")]
    dworks = [DelayedWork(lambda work: None) for _ in found]
    for wq, dwork in zip(found, dworks, strict=True):
        assert wq.queue_delayed_work(dwork, 3600)
    with caplog.at_level(logging.WARNING, logger="workqueue._atexit"):
        _atexit._warn_dropped(found)
    [record] = caplog.records
    lines = record.getMessage().splitlines()
    assert lines[0].startswith(
        "interpreter exit does not wait for 3 pending work items of 3 workqueues"), lines
    assert [line.split("'")[1] for line in lines[1:]] == ["alpha", "mu", "zeta"], lines
    for dwork in dworks:
        assert dwork.cancel()


def test_each_workqueue_lists_its_own_pending_items_and_no_call(
        make_wq: Callable[..., Workqueue]) -> None:
    """Bound workqueues share their CPUs' pools, and a pool's list holds
    the items of every workqueue on it: each lists only its own.  And
    the calls of submit() pending there are not dropped: the exit waits
    for them (or, on a frozen workqueue, drops them with a warning of
    their own)."""
    mine, theirs = make_wq("mine"), make_wq("theirs")
    started, release = threading.Event(), threading.Event()
    held = Work(lambda work: (started.set(), release.wait(TIMEOUT)))
    try:
        assert mine.queue_work_on(0, held)
        assert started.wait(TIMEOUT)
        # Behind the held item, on the pool of CPU 0, which runs one at a time.
        ours, other = Work(lambda work: None), Work(lambda work: None)
        assert mine.queue_work_on(0, ours)
        assert theirs.queue_work_on(0, other)
        assert mine._dropped_at_exit() == [ours]
        assert theirs._dropped_at_exit() == [other]
        calls = make_wq("calls", ordered=True)
        started.clear()
        assert calls.queue_work(Work(lambda work: (started.set(), release.wait(TIMEOUT))))
        assert started.wait(TIMEOUT)
        call = calls.submit(int)
        pending = Work(lambda work: None)
        assert calls.queue_work(pending)
        assert calls._dropped_at_exit() == [pending]
    finally:
        release.set()
    assert call.result(TIMEOUT) == 0
    for work in (held, ours, other, pending):
        work.flush(timeout=TIMEOUT)


def test_the_exit_lists_the_items_in_the_order_they_would_run(
        make_wq: Callable[..., Workqueue]) -> None:
    """An item cancelled and queued again runs after those queued
    meanwhile: listed where it is now, not where its cancelled entry
    still lies (a tombstone, see WorkList)."""
    wq = make_wq("order")
    started, release = threading.Event(), threading.Event()
    held = Work(lambda work: (started.set(), release.wait(TIMEOUT)))
    first, second = Work(lambda work: None), Work(lambda work: None)
    try:
        assert wq.queue_work_on(0, held)
        assert started.wait(TIMEOUT)
        assert wq.queue_work_on(0, first)
        assert wq.queue_work_on(0, second)
        assert first.cancel()
        assert wq.queue_work_on(0, first)
        assert wq._dropped_at_exit() == [second, first]
    finally:
        release.set()
    for work in (held, first, second):
        work.flush(timeout=TIMEOUT)


def test_the_exit_lists_an_item_handed_to_the_worker_still_running_it(
        make_wq: Callable[..., Workqueue]) -> None:
    """An item queued again while it runs, and taken by another worker of
    its pool, waits on the scheduled list of the worker running it (it
    never runs concurrently with itself): pending there, it is listed."""
    wq = make_wq("handed")
    started, release = threading.Event(), threading.Event()

    def func(work: Work) -> None:
        if not started.is_set():
            started.set()
            with blocking():  # the pool runs its next item meanwhile
                release.wait(TIMEOUT)

    work = Work(func)
    try:
        assert wq.queue_work_on(0, work)
        assert started.wait(TIMEOUT)
        assert wq.queue_work_on(0, work)
        deadline = time.monotonic() + TIMEOUT
        while work._entry is not work._worker.scheduled:
            assert time.monotonic() < deadline, wq.dump()
            threading.Event().wait(0.001)
        assert wq._dropped_at_exit() == [work]
    finally:
        release.set()
    work.flush(timeout=TIMEOUT)


def _codes(code: CodeType) -> set[CodeType]:
    """``code`` and the code of the comprehensions and functions in it."""
    found = {code}
    for const in code.co_consts:
        if isinstance(const, CodeType):
            found |= _codes(const)
    return found


def dropped_with_the_timer_firing_at(instruction: int, wq: Workqueue,
                                     dwork: DelayedWork) -> tuple[list[Any], bool]:
    """wq._dropped_at_exit(), with the timer of *dwork* taken as the
    timer thread takes one that is due (callback and argument cleared
    under the timer's lock, as del_timer() does) at that instruction of
    the listing; and whether the listing had so many."""
    codes = _codes(Workqueue._dropped_at_exit.__code__)
    handle = dwork._timer
    assert handle is not None
    seen = 0
    fired = False

    def trace(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal seen, fired
        if frame.f_code not in codes:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode":
            if seen == instruction:
                fired = del_timer(handle)
            seen += 1
        return trace

    sys.settrace(trace)
    try:
        return wq._dropped_at_exit(), fired
    finally:
        sys.settrace(None)


def test_a_timer_that_fires_as_the_exit_counts_its_item_fails_nothing(
        make_wq: Callable[..., Workqueue]) -> None:
    """The timer thread takes a timer that is due -- clearing its callback
    and argument under the timer's lock only -- whenever it likes, also
    while the exit lists the items it drops, which holds the engine lock
    but not the timer's.  Here it does so at each instruction of the
    listing in turn: the item is listed or not, and the listing never
    reads what the timer cleared (None's _pending, which raised
    AttributeError out of the exit hook)."""
    wq = make_wq()
    instruction = 0
    while True:
        dwork = DelayedWork(lambda work: None)
        assert wq.queue_delayed_work(dwork, 3600)
        dropped, fired = dropped_with_the_timer_firing_at(instruction, wq, dwork)
        assert dropped in ([dwork], []), dropped
        assert dwork.cancel()
        if not fired:
            break
        instruction += 1
    assert instruction > 10


def armed_with_the_timer_taken_at(instruction: int, handle: Any) -> tuple[list[Any], bool]:
    """armed_timers(), with another thread taking the timer of *handle*
    (del_timer(), as the timer thread does) at that instruction of the
    reading of *handle* (the heap holds others, dead ones too); and
    whether the reading had so many."""
    codes = _codes(_timer._TimerBase.armed.__code__)
    seen = 0
    taker: threading.Thread | None = None

    def trace(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal seen, taker
        if frame.f_code not in codes:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode" and frame.f_locals.get("handle") is handle:
            if seen == instruction:
                taker = threading.Thread(target=del_timer, args=(handle,))
                taker.start()
                # Done by now, unless the lock it takes is held, as it
                # must be: then it waits for the reading to end.
                taker.join(0.05)
            seen += 1
        return trace

    sys.settrace(trace)
    try:
        armed = _timer.armed_timers()
    finally:
        sys.settrace(None)
    if taker is not None:
        taker.join(TIMEOUT)
    return armed, taker is not None


def test_the_timers_are_read_whole_as_the_timer_thread_takes_one(
        make_wq: Callable[..., Workqueue]) -> None:
    """armed_timers() reads each timer's callback and argument together,
    while the timer thread, taking a timer that is due, clears both under
    the timer's lock: at each instruction of the reading in turn, an
    entry is whole or absent, never a callback with no argument."""
    wq = make_wq()
    instruction = 0
    while True:
        dwork = DelayedWork(lambda work: None)
        assert wq.queue_delayed_work(dwork, 3600)
        armed, taken = armed_with_the_timer_taken_at(instruction, dwork._timer)
        assert all(callback is not None and arg is not None for callback, arg in armed), armed
        assert dwork.cancel()
        if not taken:
            break
        instruction += 1
    assert instruction > 3


@pytest.fixture
def hook_of_our_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """For a test that runs the exit hook in this process: the hook sees
    only the test's workqueues, and its mark of the exit is undone after."""
    monkeypatch.setattr(_atexit, "_exiting", False)
    monkeypatch.setattr(_atexit, "_live", weakref.WeakSet())


@pytest.mark.usefixtures("hook_of_our_own")
@pytest.mark.parametrize("copy", ["the calls'", "the dropped items'"])
def test_a_workqueue_made_as_the_exit_hook_copies_the_live_ones_waits(
        make_wq: Callable[..., Workqueue], copy: str) -> None:
    """Another thread makes a workqueue while the exit hook goes through
    the live ones (to wait for their calls, then to count their dropped
    items): it waits for the hook's copy, which a WeakSet growing under
    its iterator would end with "Set changed size during iteration"."""
    make_wq("first")
    # One live workqueue: the hook's first pass over them yields once.
    pause = PauseAt(weakref.WeakSet.__iter__, "yield item", skip=copy != "the calls'")
    hook = Attempt(lambda: pause.run(_atexit.wait_for_calls))
    try:
        assert pause.reached.wait(TIMEOUT)
        maker = Attempt(lambda: make_wq("late"))
        deadline = time.monotonic() + TIMEOUT
        while maker.thread.is_alive() and not stands_at(
                maker.thread.ident or 0, _atexit.register, "with _lock"):
            assert time.monotonic() < deadline, "register() neither waits nor returns"
            maker.thread.join(0.001)
    finally:
        pause.resume()
    assert hook.result() is None
    assert isinstance(maker.result(), Workqueue)
    assert sorted(wq.name for wq in _atexit._live) == ["first", "late"]


def test_the_exit_waits_for_the_calls_a_frozen_workqueue_runs(tmp_path: Path) -> None:
    """A freeze holds back what is queued after it, not what runs: freeze()
    waits for those calls (here it timed out waiting, and the workqueue
    stays frozen), and so does the exit, as for any workqueue's calls.
    Only the calls that wait for a thaw() are dropped, and counted --
    also when the serial executor whose next run is held back is still
    running, and runs the call behind that queueing itself."""
    done = run(tmp_path, r"""
import logging
import os
import threading
from workqueue import WQ_FREEZABLE, Topology, alloc_workqueue

logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
# Opened only once the interpreter exits, by an exit hook of threading's,
# registered after workqueue's, hence run before it.
gate = threading.Event()
threading._register_atexit(gate.set)

def job(started, tag):
    started.set()
    assert gate.wait(30)
    os.write(2, f"{tag} ran\n".encode())

wq = alloc_workqueue("frozen", WQ_FREEZABLE, topology=Topology(2))
started = [threading.Event(), threading.Event()]
wq.submit(job, started[0], "the running call")
wq.serial("key").submit(job, started[1], "serial 0")
for event in started:
    assert event.wait(30)
try:
    wq.freeze(timeout=0)
except TimeoutError:
    pass
else:
    raise AssertionError("frozen with calls in flight")
wq.submit(job, threading.Event(), "the held call")
wq.serial("key").submit(job, threading.Event(), "serial 1")  # run by the run of serial 0
""")
    lines = done.stderr.splitlines()
    warning = "WARNING workqueue._atexit: workqueue 'frozen' is frozen at exit: 1 submitted calls"
    assert lines[-1].startswith(warning), done.stderr
    assert sorted(lines[:-1]) == ["serial 0 ran", "serial 1 ran", "the running call ran"], \
        done.stderr


@pytest.mark.usefixtures("hook_of_our_own")
def test_the_exit_waits_for_no_thaw_when_a_run_queues_its_call_item_again(
        make_wq: Callable[..., Workqueue], tracer: Any,
        log_waiter: Any) -> None:
    """A serial executor's run that ends its batch queues its item again,
    behind the freeze, as the exit hook looks: the hook found the item
    running and nothing more, and must not then wait for the queueing
    held back for a thaw() that nobody will call.  What holds it back is
    read where the wait is registered: only that run is waited for, and
    the call it left is dropped, and counted."""
    wq = make_wq("frozen", WQ_FREEZABLE)
    wq.add_trace_hook(tracer)
    logged = log_waiter("workqueue._atexit", "is frozen at exit")
    first, second = threading.Event(), threading.Event()
    gates = [threading.Event(), threading.Event()]

    def blocker(started: threading.Event, gate: threading.Event) -> None:
        started.set()
        assert gate.wait(TIMEOUT)

    key = wq.serial("key")
    # The first run: the blocker and _BATCH - 1 more calls; the second:
    # one call, the blocker and _BATCH - 2 more, which leaves one call.
    key.submit(blocker, first, gates[0])
    assert first.wait(TIMEOUT)
    for _ in range(_BATCH):
        key.submit(int)
    key.submit(blocker, second, gates[1])
    for _ in range(_BATCH - 1):
        key.submit(int)
    gates[0].set()
    assert second.wait(TIMEOUT)
    with pytest.raises(TimeoutError):
        wq.freeze(timeout=0)
    (work,) = wq._call_works()
    assert work.running and not work.pending
    # Past the look at the workqueue's calls, before the wait for them.
    pause = PauseAt(_atexit.wait_for_calls, "for work in will_run")
    hook = Attempt(lambda: pause.run(_atexit.wait_for_calls))
    try:
        assert pause.reached.wait(TIMEOUT)
        gates[1].set()
        tracer.wait_for(lambda: tracer.of(work).count("execute_end") == 2)
        assert work.pending and not work.running
    finally:
        pause.resume()
    assert hook.result(msg="the exit waits for a thaw()") is None
    assert [r.getMessage() for r in logged.records] == [
        "workqueue 'frozen' is frozen at exit: 1 submitted calls will not run"]


@pytest.mark.usefixtures("hook_of_our_own")
@pytest.mark.parametrize("behind", ["the worklist of a frozen workqueue",
                                    "max_active, on an inactive list"])
def test_the_exit_waits_for_a_call_queued_behind_a_running_item(
        make_wq: Callable[..., Workqueue], log_waiter: Any,
        behind: str) -> None:
    """A call that waits behind an item still running will run once that
    item ends: on the worklist, where a freeze leaves it, or on an
    inactive list of a workqueue not frozen.  The exit waits for it, in a
    wait for its run -- not in a loop that looks again and again until
    the item ahead ends.  Nor may a freeze() hold it back then: once the
    exit began, freeze() is refused, as the kernel's suspend is once a
    reboot began (-EBUSY)."""
    topo = Topology(1, cpu_intensive_thresh=60.0)  # the call waits behind the running item
    frozen = behind.endswith("frozen workqueue")
    wq = make_wq("wq", WQ_FREEZABLE, 0 if frozen else 1, topology=topo)
    logged = log_waiter("workqueue._atexit", "is frozen at exit")
    started, gate = threading.Event(), threading.Event()

    def hog(work: Work) -> None:
        started.set()
        assert gate.wait(TIMEOUT)

    try:
        assert wq.queue_work(Work(hog))  # no call: the exit does not wait for it
        assert started.wait(TIMEOUT)
        call = wq.submit(int, 7)
        if frozen:
            with pytest.raises(TimeoutError):
                wq.freeze(timeout=0)
        (work,) = wq._call_works()
        assert work.pending and work._entry is not None and work._entry.active is frozen
        hook = Attempt(_atexit.wait_for_calls)
        deadline = time.monotonic() + TIMEOUT
        while not stands_at(hook.thread.ident or 0, Work._flush, "completion.wait(timeout)"):
            assert hook.thread.is_alive(), "the exit did not wait for the call"
            assert time.monotonic() < deadline, "the exit does not wait in a flush"
            hook.thread.join(0.001)
        # A freeze from now on would hold the call back for a thaw() that
        # nobody calls (from its inactive list: max_active 0), and the
        # exit would never end.
        with pytest.raises(RuntimeError, match="after interpreter exit began"):
            wq.freeze(timeout=0)
        assert wq._frozen is frozen  # refused, it changed nothing
    finally:
        gate.set()
    assert hook.result() is None
    assert call.done() and call.result() == 7
    assert not logged.records


def _flushing(thread: threading.Thread, work: Work) -> bool:
    """Whether *thread* waits in the flush of *work*."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None and frame.f_code is not Work._flush.__code__:
        frame = frame.f_back
    return frame is not None and frame.f_locals.get("self") is work


@pytest.mark.usefixtures("hook_of_our_own")
def test_the_exit_waits_for_the_run_of_an_item_a_freeze_holds_back(
        make_wq: Callable[..., Workqueue]) -> None:
    """A serial executor's item queued again behind a freeze while its run
    goes on: the exit waits for that run (and the calls it takes), as
    freeze() does, and drops only the queueing -- deterministically, not
    as a race with the run's end."""
    wq = make_wq("frozen", WQ_FREEZABLE)
    started, gate = threading.Event(), threading.Event()
    key = wq.serial("key")
    first = key.submit(lambda: (started.set(), gate.wait(TIMEOUT))[1])
    assert started.wait(TIMEOUT)
    with pytest.raises(TimeoutError):
        wq.freeze(timeout=0)
    second = key.submit(int, 7)  # queues the key's item again, behind the freeze
    (work,) = wq._call_works()
    assert work.running and work.pending
    try:
        hook = Attempt(_atexit.wait_for_calls)
        wait_until(lambda: _flushing(hook.thread, work) or not hook.thread.is_alive(),
                   "the exit waits for the run")
        assert hook.thread.is_alive(), "the exit did not wait for the run going on"
    finally:
        gate.set()
    assert hook.result() is None
    assert first.result(0) is True and second.result(0) == 7  # the run took both


@pytest.mark.usefixtures("hook_of_our_own")
def test_the_exit_waits_for_the_calls_a_thaw_lets_run_during_its_wait(
        make_wq: Callable[..., Workqueue], log_waiter: Any) -> None:
    """The run the exit waits for thaws its workqueue: the call left
    behind that run's batch, held back by the freeze as the exit looked,
    may run now, and the exit looks again and waits for it, rather than
    drop it as frozen."""
    wq = make_wq("frozen", WQ_FREEZABLE)
    logged = log_waiter("workqueue._atexit", "is frozen at exit")
    started, gate = threading.Event(), threading.Event()
    last_started, last_gate = threading.Event(), threading.Event()

    def thawer() -> None:
        started.set()
        assert gate.wait(TIMEOUT)
        wq.thaw()

    def last_call() -> None:
        last_started.set()
        assert last_gate.wait(TIMEOUT)

    key = wq.serial("key")
    key.submit(thawer)
    assert started.wait(TIMEOUT)
    with pytest.raises(TimeoutError):
        wq.freeze(timeout=0)
    for _ in range(_BATCH - 1):  # the rest of the thawer's run
        key.submit(int)
    last = key.submit(last_call)  # for the next run, behind the freeze
    (work,) = wq._call_works()
    assert work.running and work.pending
    try:
        hook = Attempt(_atexit.wait_for_calls)
        wait_until(lambda: _flushing(hook.thread, work) or not hook.thread.is_alive(),
                   "the exit waits for the run")
        gate.set()  # the run thaws the workqueue and ends
        wait_until(lambda: last_started.is_set() or not hook.thread.is_alive(),
                   "the call behind the run starts, or the exit ends")
        assert hook.thread.is_alive(), "the exit did not wait for the call the thaw let run"
    finally:
        gate.set()
        last_gate.set()
    assert hook.result() is None
    assert last.done()
    assert not logged.records


@pytest.mark.usefixtures("hook_of_our_own")
def test_a_freeze_waiting_for_the_engine_lock_as_the_exit_begins_is_refused(
        make_wq: Callable[..., Workqueue]) -> None:
    """A freeze() that waits for the engine lock as the exit hook marks the
    exit refuses, whichever of the two then takes the lock first: one that
    had looked at the mark before would freeze after the hook saw a call
    that will run, and hold it back on its inactive list for good (or,
    first to the lock, have the hook drop a call it had accepted)."""
    topo = Topology(1, cpu_intensive_thresh=60.0)  # the call waits behind the running item
    wq = make_wq("wq", WQ_FREEZABLE, 1, topology=topo)
    started, gate = threading.Event(), threading.Event()

    def hog(work: Work) -> None:
        started.set()
        assert gate.wait(TIMEOUT)

    try:
        assert wq.queue_work(Work(hog))
        assert started.wait(TIMEOUT)
        call = wq.submit(int, 7)  # on the inactive list: max_active 1
        with engine_lock:
            freeze = Attempt(lambda: wq.freeze(timeout=0))
            hook = Attempt(_atexit.wait_for_calls)
            wait_until(lambda: stands_at(freeze.thread.ident or 0, Workqueue.freeze, "with lock:")
                       and stands_at(hook.thread.ident or 0, Workqueue._calls_at_exit,
                                     "with lock:"),
                       "both wait for the engine lock")
        refused = freeze.result()
        assert isinstance(refused, RuntimeError), refused
        assert "after interpreter exit began" in str(refused)
        assert not wq._frozen
    finally:
        gate.set()
    assert hook.result(msg="the exit waits for a call that a freeze holds back") is None
    assert call.done() and call.result() == 7


@pytest.mark.usefixtures("hook_of_our_own")
def test_the_exit_counts_no_call_for_a_held_item_whose_run_took_them_all(
        make_wq: Callable[..., Workqueue], tracer: Any,
        log_waiter: Any) -> None:
    """A call submitted to a serial executor whose run goes on queues its
    item again, behind the freeze; the run takes that call all the same.
    The item left queued holds no call: nothing is dropped, and the exit
    says nothing of a frozen workqueue."""
    wq = make_wq("frozen", WQ_FREEZABLE)
    wq.add_trace_hook(tracer)
    logged = log_waiter("workqueue._atexit", "is frozen at exit")
    started, gate = threading.Event(), threading.Event()

    def blocker() -> None:
        started.set()
        assert gate.wait(TIMEOUT)

    key = wq.serial("key")
    key.submit(blocker)
    assert started.wait(TIMEOUT)
    with pytest.raises(TimeoutError):
        wq.freeze(timeout=0)
    later = key.submit(int, 3)
    (work,) = wq._call_works()
    gate.set()
    tracer.wait_for(lambda: "execute_end" in tracer.of(work))
    assert later.result(0) == 3 and work.pending and not work.calls
    assert _atexit.wait_for_calls() is None
    assert not logged.records
