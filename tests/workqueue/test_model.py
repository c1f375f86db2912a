"""The Work state machine against a small reference model (hypothesis).

Three Work items share one ordered workqueue, so at most one of them runs and
the others wait in FIFO order.  Each item's function blocks until the test
releases it, so "pending" and "running" are states the test controls, not
races it observes: after every step the test waits (with a timeout) until the
engine has reached the state the model predicts, then compares.

The model, per the kernel's rules:
  - queue_work: False if disabled or already pending; else pending, at the
    tail of the queue.  The pending bit clears just before the function runs.
  - cancel: True if it took the item off the queue.
  - cancel_sync: as cancel, then waits for a running instance.
  - disable: increments the disable count, and cancels like cancel;
    disable_sync also waits like cancel_sync.
  - enable: decrements; True when the count reaches zero.
  - flush: True if the item was pending or running; returns once the last
    queueing before the call has finished running.
  - with a timeout, the waiting calls (flush, cancel_sync, disable_sync,
    the workqueue's flush) raise TimeoutError when they would wait for a
    run the test holds, having changed what the call changes before it
    waits; a cancel_sync leaves the item cancelling -- queueing refused --
    until its running instance finishes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from wqhelpers import wait_until

from workqueue import Work, alloc_ordered_workqueue

NAMES = ("a", "b", "c")
TIMEOUT = 10.0


class Item(Work):
    """A Work whose every run blocks until the test releases it."""

    def __init__(self, name: str) -> None:
        super().__init__(Item.run)
        self.name = name
        self.cond = threading.Condition()
        self.starts = 0
        self.finishes = 0
        self.releases = threading.Semaphore(0)
        self.stuck = False

    def run(self) -> None:
        with self.cond:
            self.starts += 1
            self.cond.notify_all()
        if not self.releases.acquire(timeout=TIMEOUT * 3):
            self.stuck = True
        with self.cond:
            self.finishes += 1
            self.cond.notify_all()

    def wait_count(self, attr: str, value: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: getattr(self, attr) >= value, timeout=TIMEOUT):
                pytest.fail(f"{self.name}.{attr} never reached {value} (is {getattr(self, attr)})")


class WorkModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.wq = alloc_ordered_workqueue("model")
        self.items = {name: Item(name) for name in NAMES}
        # The model.
        self.queue: list[str] = []  # pending items, FIFO
        self.running: str | None = None
        self.disabled = dict.fromkeys(NAMES, 0)
        # cancel_syncs that timed out while the item ran: until that run
        # finishes, they refuse its queueing.
        self.cancelling = dict.fromkeys(NAMES, 0)
        self.starts = dict.fromkeys(NAMES, 0)
        self.finishes = dict.fromkeys(NAMES, 0)

    # -- keeping engine and model in step ---------------------------------

    def advance(self) -> None:
        """The ordered queue starts its head item when nothing runs."""
        if self.running is None and self.queue:
            self.running = self.queue.pop(0)
            self.starts[self.running] += 1

    def settle(self) -> None:
        """Wait until the engine is where the model says it is."""
        self.advance()
        for name, item in self.items.items():
            item.wait_count("starts", self.starts[name])
            item.wait_count("finishes", self.finishes[name])
            if self.running != name:
                wait_until(lambda item=item: not item.running,  # type: ignore[misc]
                           f"{name} stops running")
            assert item.starts == self.starts[name], name

    def finish_running(self) -> None:
        """Release the running item's current run."""
        assert self.running is not None
        name = self.running
        self.items[name].releases.release()
        self.finishes[name] += 1
        self.cancelling[name] = 0
        self.running = None
        self.settle()

    def in_thread(self, fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
        result: list[object] = []
        thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
        thread.start()
        return thread, result

    def finish_until(self, done: Callable[[], bool], waiter: threading.Thread, what: str) -> None:
        """Finish runs one by one until done(); *waiter* must not return before."""
        wait = 0.05  # the first time, also long enough for the thread to get going
        while not done():
            waiter.join(wait)
            assert waiter.is_alive(), f"{what} returned before the runs it waits for"
            wait = 0.01
            self.finish_running()
        waiter.join(TIMEOUT)
        assert not waiter.is_alive(), f"{what} did not return"

    # -- rules -------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES))
    def queue_work(self, name: str) -> None:
        expected = not self.disabled[name] and not self.cancelling[name] and name not in self.queue
        assert self.wq.queue_work(self.items[name]) is expected
        if expected:
            self.queue.append(name)
        self.settle()

    @rule(name=st.sampled_from(NAMES))
    def cancel(self, name: str) -> None:
        expected = name in self.queue
        assert self.items[name].cancel() is expected
        if expected:
            self.queue.remove(name)
        self.settle()

    def cancel_and_wait(self, name: str, *, disable: bool) -> None:
        """cancel_sync() or disable_sync(): cancel, then wait for a run."""
        item = self.items[name]
        call = item.disable_sync if disable else item.cancel_sync
        expected = name in self.queue
        if disable:
            self.disabled[name] += 1
        if self.running != name:
            assert call() is expected
            if expected:
                self.queue.remove(name)
            self.settle()
        else:
            # It waits for the running instance: let that finish, but only
            # once the pending instance (if any) is gone, or the queue would
            # start it again before the call sees it.
            thread, result = self.in_thread(call)
            wait_until(lambda: not item.pending, f"{call.__name__} takes {name} off the queue")
            if expected:
                self.queue.remove(name)
            self.finish_running()
            thread.join(TIMEOUT)
            assert not thread.is_alive(), f"{call.__name__} did not return"
            assert result == [expected]
        assert not item.pending and not item.running

    @rule(name=st.sampled_from(NAMES))
    def cancel_sync(self, name: str) -> None:
        self.cancel_and_wait(name, disable=False)

    @rule(name=st.sampled_from(NAMES))
    def disable_sync(self, name: str) -> None:
        self.cancel_and_wait(name, disable=True)

    def cancel_with_timeout(self, name: str, *, disable: bool) -> None:
        """cancel_sync() or disable_sync() with a timeout: as without one,
        but a wait for the run, which the test holds, times out."""
        item = self.items[name]
        call = item.disable_sync if disable else item.cancel_sync
        expected = name in self.queue
        if disable:
            self.disabled[name] += 1
        if expected:
            self.queue.remove(name)
        if self.running != name:
            assert call(timeout=0.001) is expected
        else:
            with pytest.raises(TimeoutError, match="pending instance was cancelled" if expected
                               else "it was not pending"):
                call(timeout=0.001)
            if not disable:
                self.cancelling[name] += 1
        self.settle()

    @rule(name=st.sampled_from(NAMES))
    def cancel_sync_with_timeout(self, name: str) -> None:
        self.cancel_with_timeout(name, disable=False)

    @rule(name=st.sampled_from(NAMES))
    def disable_sync_with_timeout(self, name: str) -> None:
        self.cancel_with_timeout(name, disable=True)

    @rule(name=st.sampled_from(NAMES))
    def disable(self, name: str) -> None:
        expected = name in self.queue
        assert self.items[name].disable() is expected
        self.disabled[name] += 1
        if expected:
            self.queue.remove(name)
        self.settle()

    @precondition(lambda self: any(self.disabled.values()))
    @rule(data=st.data())
    def enable(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from([n for n in NAMES if self.disabled[n]]))
        self.disabled[name] -= 1
        assert self.items[name].enable() is (self.disabled[name] == 0)
        self.settle()

    @precondition(lambda self: self.running is not None)
    @rule()
    def finish(self) -> None:
        self.finish_running()

    @rule(name=st.sampled_from(NAMES))
    def flush(self, name: str) -> None:
        item = self.items[name]
        busy = name in self.queue or self.running == name
        if not busy:
            assert item.flush() is False
            return
        # The run that flush must wait for: the pending one if any, else the
        # running one.  Other items' runs may come first (the queue is FIFO).
        target = self.starts[name] + (1 if name in self.queue else 0)
        # What the flusher saw as flush() returned: its result, and how many
        # runs of the item had finished by then.
        thread, result = self.in_thread(lambda: (item.flush(), item.finishes))
        self.finish_until(lambda: self.finishes[name] >= target, thread, f"{name}.flush()")
        assert result == [(True, target)]

    @rule(name=st.sampled_from(NAMES))
    def flush_with_timeout(self, name: str) -> None:
        """A busy item's flush waits for a run the test holds: it times out,
        changing nothing."""
        item = self.items[name]
        if name in self.queue or self.running == name:
            with pytest.raises(TimeoutError, match=r"flush\(\) of <Item"):
                item.flush(timeout=0.001)
        else:
            assert item.flush(timeout=0.001) is False
        self.settle()

    @rule()
    def flush_workqueue_with_timeout(self) -> None:
        if self.running is not None:
            with pytest.raises(TimeoutError, match=r"flush\(\) of workqueue 'model'"):
                self.wq.flush(timeout=0.001)
        else:
            self.wq.flush(timeout=0.001)
        self.settle()

    @precondition(lambda self: bool(self.queue))
    @rule(data=st.data())
    def flush_queued(self, data: st.DataObject) -> None:
        """flush() of a pending item, which the walks rarely pick otherwise."""
        self.flush(data.draw(st.sampled_from(self.queue)))

    @rule()
    def flush_workqueue(self) -> None:
        def flush_and_look() -> list[bool]:
            self.wq.flush()
            # Everything in the model's queue was queued before the call.
            return [item.pending or item.running for item in self.items.values()]

        thread, result = self.in_thread(flush_and_look)
        self.finish_until(lambda: self.running is None, thread, "wq.flush()")
        assert not self.queue
        assert result == [[False] * len(NAMES)], "wq.flush() returned with items in flight"

    # -- invariants --------------------------------------------------------

    @invariant()
    def states_match(self) -> None:
        for name, item in self.items.items():
            assert item.pending is (name in self.queue), f"{name}.pending"
            assert item.running is (self.running == name), f"{name}.running"
            assert item.disabled is (self.disabled[name] + self.cancelling[name] > 0), \
                f"{name}.disabled"
            assert ("cancelling" in repr(item)) is (self.cancelling[name] > 0), repr(item)
            # Nothing of the timed-out waits stays behind; what a timed-out
            # cancel_sync left is dropped as the run ends.
            assert len(item._flushers or ()) == self.cancelling[name], f"{name}._flushers"
            assert not item.stuck

    def teardown(self) -> None:
        for item in self.items.values():
            item.cancel()
        if self.running is not None:
            self.items[self.running].releases.release()
        self.wq.destroy()


WorkModel.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_work_state_machine = WorkModel.TestCase


def test_flush_of_a_queued_item_waits_for_its_run() -> None:
    """The walks above reach these cases only now and then; here they are
    every run: flush() of an item queued behind another item's run, and of
    an item that runs and is queued again."""
    machine = WorkModel()
    try:
        machine.queue_work("a")  # runs (held)
        machine.queue_work("b")  # pending behind a
        machine.states_match()
        machine.flush("b")  # waits for a's run, then b's
        machine.queue_work("a")  # runs
        machine.queue_work("b")
        machine.queue_work("a")  # pending behind its own run and b
        machine.states_match()
        machine.flush("a")  # waits for a, b, then a again
        machine.queue_work("c")
        machine.queue_work("a")
        machine.queue_work("b")
        machine.flush_workqueue()
        machine.states_match()
    finally:
        machine.teardown()
