"""Workqueue flush, drain and destroy (Part 3: 7)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from wqhelpers import assert_waits_until_released

from workqueue import WQ_FREEZABLE, DelayedWork, Work, _workqueue, blocking

TIMEOUT = 10.0


def test_flush_waits_for_everything_queued_before(make_wq: Any) -> None:
    wq = make_wq(max_active=4)
    release = threading.Event()
    order: list[str] = []
    lock = threading.Lock()

    def item(work: Work) -> None:
        assert release.wait(TIMEOUT)
        with lock:
            order.append("item")

    for cpu in (0, 1, 0, 1):
        wq.queue_work_on(cpu, Work(item))

    def flush() -> None:
        wq.flush()
        with lock:
            order.append("flushed")

    assert_waits_until_released(flush, release, "flush() of held items")
    assert order == ["item"] * 4 + ["flushed"]


def test_flush_is_not_livelocked_by_later_queueing(make_wq: Any) -> None:
    wq = make_wq()
    stop = threading.Event()
    held, release = threading.Event(), threading.Event()
    runs = [0]

    def forever(work: Work) -> None:  # re-queues itself until told to stop
        runs[0] += 1
        if not stop.is_set():
            wq.queue_work(work)

    def gate(work: Work) -> None:
        held.set()
        with blocking():  # the others keep running on its CPU meanwhile
            assert release.wait(TIMEOUT)

    wq.queue_work(Work(forever))
    wq.queue_work(Work(gate))
    assert held.wait(TIMEOUT)

    def producer() -> None:
        while not stop.is_set():
            wq.queue_work(Work(lambda work: None))

    # The runs of `forever` when flush() started and when it returned.
    seen: list[int] = []

    def flush() -> None:
        seen.append(runs[0])
        wq.flush()
        seen.append(runs[0])

    p = threading.Thread(target=producer)
    p.start()
    try:
        # It waits for the held item queued before it, and not for ever.
        assert_waits_until_released(flush, release, "flush() under constant queueing")
    finally:
        stop.set()
        p.join(TIMEOUT)
    assert not p.is_alive(), "producer hung"
    # Items were queued all along the flush (it was not waiting for quiet).
    assert seen[1] > seen[0]


def test_a_flush_waits_for_its_own_color_when_an_older_one_drains(make_wq: Any) -> None:
    """Two flushes, each with an item of its color in flight: the older
    color draining ends the first flush only; the second waits for its own
    item (flush_workqueue's colors: one drained color frees the flushes up
    to it, not the next)."""
    wq = make_wq()
    release_a, release_b = threading.Event(), threading.Event()
    wq.queue_work_on(0, Work(lambda w: release_a.wait(TIMEOUT)))
    first = threading.Thread(target=wq.flush, daemon=True)
    first.start()
    while len(wq._flushers) < 1:  # until it waits for the first color
        first.join(0.001)
    wq.queue_work_on(1, Work(lambda w: release_b.wait(TIMEOUT)))
    second = threading.Thread(target=wq.flush, daemon=True)
    second.start()
    while len(wq._flushers) < 2:
        second.join(0.001)
    try:
        release_a.set()
        first.join(TIMEOUT)
        assert not first.is_alive()
        second.join(0.05)  # a moment to return, if it wrongly were done
        assert second.is_alive(), "flush() returned while an item of its color ran"
    finally:
        release_b.set()
    second.join(TIMEOUT)
    assert not second.is_alive()


def test_flush_of_an_idle_queue_returns_at_once(make_wq: Any) -> None:
    wq = make_wq()
    wq.flush()
    wq.flush()


def test_drain_allows_chained_queueing_only(make_wq: Any) -> None:
    wq = make_wq()
    release = threading.Event()
    started = threading.Event()
    chain = [0]

    def chained(work: Work) -> None:
        chain[0] += 1
        if chain[0] < 20:
            wq.queue_work(work)

    def gate(work: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)
        wq.queue_work(Work(chained))  # chained: from an item of this queue

    wq.queue_work(Work(gate))
    assert started.wait(TIMEOUT)
    drainer = threading.Thread(target=wq.drain)
    drainer.start()
    while wq._state == 0:
        drainer.join(0.001)
    with pytest.raises(RuntimeError, match="draining: only its own work items"):
        wq.queue_work(Work(lambda w: None))
    with pytest.raises(RuntimeError, match="draining"):
        wq.submit(print)
    release.set()
    drainer.join(TIMEOUT)
    assert not drainer.is_alive()
    assert chain[0] == 20
    # After drain() the queue takes work again.
    w = Work(lambda w: None)
    assert wq.queue_work(w) is True
    w.flush()


def test_destroy_lets_its_own_items_chain_until_drained(make_wq: Any) -> None:
    """destroy() drains as drain() does: its items may still queue (the
    workqueue is not destroyed yet), others may not, and queueing an item
    that is pending there coalesces, as ever."""
    wq = make_wq(ordered=True)
    release, started = threading.Event(), threading.Event()
    chain = [0]

    def chained(work: Work) -> None:
        chain[0] += 1
        if chain[0] < 20:
            assert wq.queue_work(work) is True

    def gate(work: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)
        assert wq.queue_work(Work(chained)) is True

    behind = Work(lambda w: None)
    wq.queue_work(Work(gate))
    wq.queue_work(behind)  # pending behind the gate: the workqueue is ordered
    assert started.wait(TIMEOUT)
    destroyer = threading.Thread(target=wq.destroy, daemon=True)
    destroyer.start()
    try:
        while wq._state < _workqueue._DESTROYING:
            destroyer.join(0.001)
        assert wq.queue_work(behind) is False
        with pytest.raises(RuntimeError, match="being destroyed: only its own work items"):
            wq.queue_work(Work(lambda w: None))
    finally:
        release.set()
    destroyer.join(TIMEOUT)
    assert not destroyer.is_alive()
    assert chain[0] == 20 and not behind.pending
    assert wq._state == _workqueue._DESTROYED


def test_destroy_drains_then_refuses_everything(make_wq: Any) -> None:
    wq = make_wq(flags=WQ_FREEZABLE)
    ran: list[int] = []
    for i in range(10):
        wq.queue_work(Work(lambda w, i=i: ran.append(i)))
    wq.destroy()
    assert sorted(ran) == list(range(10))
    w = Work(lambda w: None)
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.queue_work(w)
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.queue_work_on(0, w)
    dw = DelayedWork(lambda w: None)
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.queue_delayed_work(dw, 0)
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.mod_delayed_work(dw, 1)
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.mod_delayed_work_on(1, dw, 1)
    assert not dw.pending
    with pytest.raises(RuntimeError, match="workqueue 'test' is destroyed"):
        wq.set_max_active(4)
    with pytest.raises(RuntimeError, match="workqueue 'test' is destroyed"):
        wq.freeze()
    with pytest.raises(RuntimeError, match="after shutdown"):
        wq.submit(print)
    with pytest.raises(RuntimeError, match="already destroyed"):
        wq.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.drain()
    assert not w.pending
    # Also an item that is pending elsewhere, or disabled, which queueing
    # leaves alone: the mistake is the destroyed queue, and it is said.
    other = make_wq("other")
    gate = threading.Event()
    busy = Work(lambda w: gate.wait(TIMEOUT))
    pending = Work(lambda w: None)
    other.queue_work_on(0, busy)
    other.queue_work_on(0, pending)
    disabled_dw = DelayedWork(lambda w: None)
    disabled_dw.disable()
    try:
        assert pending.pending
        for queue in (lambda: wq.queue_work(pending), lambda: wq.queue_work_on(0, pending),
                      lambda: wq.queue_work(disabled_dw),
                      lambda: wq.queue_delayed_work(disabled_dw, 0),
                      lambda: wq.queue_delayed_work_on(1, disabled_dw, 0)):
            with pytest.raises(RuntimeError, match="workqueue 'test' is destroyed"):
                queue()
    finally:
        gate.set()
    wq.flush()  # nothing in flight: returns
    wq.shutdown()  # harmless after destroy


@pytest.mark.parametrize("call", ["queue_work", "queue_work_on"])
def test_a_destroyed_queue_raises_also_for_an_item_queued_elsewhere_meanwhile(
        make_wq: Any, monkeypatch: pytest.MonkeyPatch, call: str) -> None:
    """The item turns pending on another queue between the lock-free look
    and the one under the engine lock: still the destroyed queue's error,
    not a quiet False."""
    dead = make_wq()
    dead.destroy()
    other = make_wq("other")
    dwork = DelayedWork(lambda w: None)
    real_acquire = _workqueue.lock_acquire
    armed = [True]

    def acquire_after_another_queueing(blocking: bool = True) -> bool:
        if armed[0]:
            armed[0] = False
            assert other.queue_delayed_work(dwork, 60)  # pending on its timer
        return real_acquire(blocking)

    monkeypatch.setattr(_workqueue, "lock_acquire", acquire_after_another_queueing)
    queue = dead.queue_work if call == "queue_work" else lambda w: dead.queue_work_on(0, w)
    try:
        with pytest.raises(RuntimeError, match="workqueue 'test' is destroyed"):
            queue(dwork)
        assert not armed[0]  # the race was run
    finally:
        monkeypatch.undo()
        dwork.cancel()


@contextlib.contextmanager
def _destroying(wq: Any) -> Iterator[threading.Event]:
    """A destroy() of ``wq`` in another thread, draining an item held until
    the event yielded is set, or the block ends: it must end then."""
    started, release = threading.Event(), threading.Event()
    wq.queue_work(Work(lambda w: (started.set(), release.wait(TIMEOUT))))
    assert started.wait(TIMEOUT)
    first = threading.Thread(target=wq.destroy, daemon=True)
    first.start()
    try:
        while wq._state < _workqueue._DESTROYING:
            first.join(0.001)
        yield release
    finally:
        release.set()
    first.join(TIMEOUT)
    assert not first.is_alive() and wq._destroyed.is_set()


def test_destroy_while_another_destroy_drains_is_refused(make_wq: Any) -> None:
    wq = make_wq()
    with _destroying(wq), pytest.raises(RuntimeError, match="already destroyed"):
        wq.destroy()
    assert wq._state == _workqueue._DESTROYED


def test_shutdown_while_a_destroy_drains_joins_it(make_wq: Any) -> None:
    """shutdown() of a workqueue that a destroy() is destroying starts no
    destruction of its own (no second drain, no thread): with wait, it
    waits for the end of that one."""
    wq = make_wq()
    with _destroying(wq) as release:
        wq.shutdown(wait=False)
        assert wq._destroy_thread is None and wq._nr_drainers == 1
        assert_waits_until_released(wq.shutdown, release, "shutdown() during destroy()")


def test_flush_drain_destroy_from_own_item_raise(make_wq: Any) -> None:
    wq = make_wq()
    errors: list[str] = []

    def func(work: Work) -> None:
        for op in (wq.flush, wq.drain, wq.destroy):
            try:
                op()
            except RuntimeError as exc:
                errors.append(str(exc))

    w = Work(func)
    wq.queue_work(w)
    w.flush()
    assert errors == [f"{op}() of workqueue 'test' from one of its own work items would deadlock"
                      for op in ("flush", "drain", "destroy")]
    assert "running" in repr(wq) and wq._nr_drainers == 0  # as it was


def test_shutdown_with_wait_from_own_item_raises_and_changes_nothing(make_wq: Any) -> None:
    wq = make_wq()
    errors: list[str] = []

    def func(work: Work) -> None:
        try:
            wq.shutdown(wait=True)
        except RuntimeError as exc:
            errors.append(str(exc))

    w = Work(func)
    wq.queue_work(w)
    w.flush()
    assert len(errors) == 1 and "deadlock" in errors[0]
    assert wq.submit(lambda: "still open").result(TIMEOUT) == "still open"
    assert wq._state == _workqueue._RUNNING


def test_dump_shows_running_pending_and_inactive_items(make_wq: Any) -> None:
    wq = make_wq("dumpme", max_active=1)
    release = threading.Event()
    started = threading.Event()

    def running_item(work: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)

    def inactive_item(work: Work) -> None:
        pass

    wq.queue_work_on(0, Work(running_item))
    assert started.wait(TIMEOUT)
    wq.queue_work_on(0, Work(inactive_item))
    text = wq.dump()
    release.set()
    assert text.startswith("workqueue dumpme:")
    assert "cpu0 active=1/1 inactive=1" in text
    assert "in-flight: kworker/cpu0" in text and "running_item" in text
    assert "inactive: <Work " in text and "inactive_item" in text
    wq.flush()
    assert wq.dump().splitlines() == [wq.dump().splitlines()[0]]


def test_destroy_closes_the_serial_executors(make_wq: Any, topo: Any) -> None:
    wq = make_wq()
    assert wq.serial("k").submit(len, "ab").result(TIMEOUT) == 2
    notifiers = len(topo._notifiers)
    wq.destroy()
    assert len(topo._notifiers) == notifiers - 1  # the LoadIndex left the topology
    with pytest.raises(RuntimeError, match="destroyed"):
        wq.serial("k")


def test_drain_warns_once_when_a_self_queueing_chain_outlasts_ten_flushes(
        make_wq: Any, log_waiter: Any) -> None:
    """Each link of the chain waits until drain() has started the flush that
    waits for it before it re-queues itself, so every link costs drain() one
    try: ten links, ten tries, one warning, which names the item still
    there (the kernel's says only how many tries, leaving its reader to
    guess which of the queue's items keeps queueing itself)."""
    wq = make_wq("drainme")
    warned = log_waiter("workqueue._workqueue", "isn't complete")
    started, release = threading.Event(), threading.Event()
    links = [0]
    color0 = wq._work_color

    def wait_for_flush(n: int) -> None:
        """Until drain() has started its n-th flush (a bounded poll)."""
        deadline = time.monotonic() + TIMEOUT
        while wq._work_color < color0 + n:
            assert time.monotonic() < deadline, f"drain() did not start flush {n}"
            threading.Event().wait(0.001)

    def link(work: Work) -> None:
        links[0] += 1
        # Still in flight when the flush waiting for it started: that flush
        # cannot find the queue empty.
        wait_for_flush(links[0] + 1)
        if links[0] < 10:
            assert wq.queue_work(work) is True

    def gate(work: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)
        wait_for_flush(1)
        assert wq.queue_work(Work(link)) is True

    wq.queue_work(Work(gate))
    assert started.wait(TIMEOUT)
    drainer = threading.Thread(target=wq.drain)
    drainer.start()
    release.set()
    drainer.join(TIMEOUT)
    assert not drainer.is_alive()
    assert links[0] == 10
    [message] = [r.getMessage() for r in warned.records]
    first, *busy = message.splitlines()
    assert first == "workqueue drainme: drain() isn't complete after 10 tries; still there:"
    assert any("link" in line for line in busy), message
    assert [r.levelno for r in warned.records] == [logging.WARNING]


def test_dump_lists_pending_items_and_not_cancelled_ones(make_wq: Any) -> None:
    wq = make_wq("dumppending")
    started, release = threading.Event(), threading.Event()

    def hog(work: Work) -> None:
        started.set()
        assert release.wait(TIMEOUT)

    def waiting_item(work: Work) -> None:
        pass

    def cancelled_item(work: Work) -> None:
        pass

    try:
        wq.queue_work_on(0, Work(hog))
        assert started.wait(TIMEOUT)
        # The hog counts toward cpu0's concurrency: the others stay pending.
        waiting, cancelled = Work(waiting_item), Work(cancelled_item)
        assert wq.queue_work_on(0, waiting) is True
        assert wq.queue_work_on(0, cancelled) is True
        assert cancelled.cancel() is True
        lines = wq.dump().splitlines()
    finally:
        release.set()
    assert lines[0].startswith("workqueue dumppending: ")
    assert (lines[1].startswith("  pwq ")
            and lines[1].endswith(": cpu0 active=2/256 inactive=0")), lines
    assert lines[2].startswith("    in-flight: kworker/cpu0") and "hog" in lines[2]
    assert lines[3] == f"    pending: {waiting!r}"
    assert len(lines) == 4, lines
    wq.flush()
    assert len(wq.dump().splitlines()) == 1
