"""Ordering under contention: eight or more producer threads at once.

Each producer records what it queues under a lock held across the queueing,
so the recorded order is the order the engine saw; the consumers' order must
match it exactly.  Nothing here sleeps to let things happen: producers start
together on a Barrier and the test waits with flush() and Futures.
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from concurrent.futures import Future, wait

import pytest
from wqhelpers import assert_next_run_waits

from workqueue import WQ_UNBOUND, Topology, Work, alloc_ordered_workqueue, alloc_workqueue

PRODUCERS = 8
TIMEOUT = 30.0


def run_producers(target: object, n: int = PRODUCERS) -> None:
    """Run target(p) in n threads started together; re-raise their errors."""
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(p: int) -> None:
        try:
            start.wait(timeout=TIMEOUT)
            target(p)  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(p,)) for p in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "producer hung"
    if errors:
        raise errors[0]


class Overlap:
    """Counts how many runs are inside a section at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0

    def __enter__(self) -> None:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.inside -= 1


class Tagged(Work):
    def __init__(self, tag: tuple[int, int], ran: list[tuple[int, int]], overlap: Overlap) -> None:
        super().__init__(Tagged.run)
        self.tag = tag
        self.ran = ran
        self.overlap = overlap

    def run(self) -> None:
        with self.overlap:
            self.ran.append(self.tag)
            if self.tag[1] % 16 == 0:
                threading.Event().wait(0)  # give the GIL away mid-item


def test_ordered_workqueue_is_strictly_fifo_across_producers() -> None:
    owq = alloc_ordered_workqueue("fifo")
    per_producer = 300
    queued: list[tuple[int, int]] = []
    ran: list[tuple[int, int]] = []
    overlap = Overlap()
    queue_lock = threading.Lock()
    items = {
        (p, i): Tagged((p, i), ran, overlap) for p in range(PRODUCERS) for i in range(per_producer)
    }

    def produce(p: int) -> None:
        for i in range(per_producer):
            with queue_lock:  # the recorded order is the order queue_work saw
                queued.append((p, i))
                assert owq.queue_work(items[p, i])

    try:
        run_producers(produce)
        owq.flush()
        assert len(ran) == PRODUCERS * per_producer
        assert ran == queued
        assert overlap.most == 1
    finally:
        owq.destroy()


def test_ordered_workqueue_keeps_each_producers_order_without_a_common_lock() -> None:
    owq = alloc_ordered_workqueue("fifo-free")
    per_producer = 300
    ran: list[tuple[int, int]] = []
    overlap = Overlap()
    items = {
        (p, i): Tagged((p, i), ran, overlap) for p in range(PRODUCERS) for i in range(per_producer)
    }

    def produce(p: int) -> None:
        for i in range(per_producer):
            assert owq.queue_work(items[p, i])

    try:
        run_producers(produce)
        owq.flush()
        assert sorted(ran) == sorted(items)
        for p in range(PRODUCERS):
            assert [i for q, i in ran if q == p] == list(range(per_producer))
        assert overlap.most == 1
    finally:
        owq.destroy()


def test_serial_keys_keep_submission_order_on_their_cpu() -> None:
    serial_keys_keep_order(hotplug=False)


def test_serial_keys_keep_submission_order_through_cpu_hotplug() -> None:
    serial_keys_keep_order(hotplug=True)


def serial_keys_keep_order(*, hotplug: bool) -> None:
    topo = Topology(4)
    wq = alloc_workqueue("serial-order", topology=topo)
    keys = [f"sock{k}" for k in range(24)]
    per_key_per_producer = 40
    submitted: dict[str, list[tuple[int, int]]] = defaultdict(list)
    ran: dict[str, list[tuple[int, int]]] = defaultdict(list)
    key_locks = {key: threading.Lock() for key in keys}
    overlaps = {key: Overlap() for key in keys}
    wrong_cpu: list[tuple[str, int, int]] = []
    futures: list[Future[None]] = []
    futures_lock = threading.Lock()
    producing = threading.Event()
    producing.set()

    def call(key: str, tag: tuple[int, int]) -> None:
        with overlaps[key]:
            cpu = wq.serial(key).cpu
            if not hotplug and topo.current_cpu() != cpu:
                wrong_cpu.append((key, topo.current_cpu(), cpu))
            ran[key].append(tag)

    def produce(p: int) -> None:
        rng = random.Random(p)
        mine: list[Future[None]] = []
        for i in range(per_key_per_producer):
            for key in rng.sample(keys, len(keys)):
                with key_locks[key]:
                    submitted[key].append((p, i))
                    mine.append(wq.serial(key).submit(call, key, (p, i)))
        with futures_lock:
            futures.extend(mine)

    def toggle_cpus() -> None:
        n = 0
        while producing.is_set():
            topo.cpu_down(1 + n % 3)
            topo.cpu_up(1 + n % 3)
            n += 1

    toggler = threading.Thread(target=toggle_cpus)
    try:
        if hotplug:
            toggler.start()
        try:
            run_producers(produce)
        finally:
            producing.clear()
            if hotplug:
                toggler.join(TIMEOUT)
        done, not_done = wait(futures, timeout=TIMEOUT)
        assert not not_done
        for future in done:
            future.result()
        for key in keys:
            assert ran[key] == submitted[key], key
            assert overlaps[key].most == 1, key
        assert not wrong_cpu
        per_cpu: dict[int, int] = defaultdict(int)
        for key in keys:
            per_cpu[wq.serial(key).cpu] += 1
        if not hotplug:  # the keys were spread evenly over the four CPUs
            assert sorted(per_cpu.values()) == [6, 6, 6, 6]
        else:  # every key is on an online CPU (all are online again)
            assert set(per_cpu) <= set(topo.online())
    finally:
        for key in keys:
            wq.serial(key).shutdown(wait=True)
        wq.destroy()


class Counted(Work):
    """Detects a run overlapping another run of the same item."""

    def __init__(self, index: int) -> None:
        super().__init__(Counted.run)
        self.index = index
        self.active = False
        self.runs = 0
        self.overlaps = 0
        self.requeues_left = 50
        self.requeued = 0
        self.wq: object = None

    def run(self) -> None:
        # Only the engine serialises runs of one item, so these plain
        # read-modify-writes are safe exactly when non-reentrancy holds.
        if self.active:
            self.overlaps += 1
        self.active = True
        self.runs += 1
        if self.runs % 8 == 0:
            threading.Event().wait(0)  # give the GIL away while "active"
        if self.requeues_left > 0:
            # Chained queueing from the item itself, onto its own CPU.
            self.requeues_left -= 1
            if self.wq.queue_work(self):  # type: ignore[attr-defined]
                self.requeued += 1
        self.active = False


@pytest.mark.parametrize(
    ("flags", "hotplug"),
    [(0, False), (WQ_UNBOUND, False), (0, True)],
    ids=["bound", "unbound", "bound+hotplug"],
)
def test_work_never_runs_concurrently_with_itself(flags: int, hotplug: bool) -> None:
    topo = Topology(4)
    wq = alloc_workqueue("reentrancy", flags=flags, topology=topo)
    items = [Counted(k) for k in range(6)]
    for item in items:
        item.wq = wq
    accepted = [[0] * len(items) for _ in range(PRODUCERS)]
    producing = threading.Event()
    producing.set()
    toggled = threading.Event()
    toggles = [0]
    if not hotplug:
        toggled.set()

    def produce(p: int) -> None:
        rng = random.Random(1000 + p)
        assert toggled.wait(TIMEOUT)  # with hotplug: the CPUs are already moving
        for _ in range(1500):
            k = rng.randrange(len(items))
            if rng.random() < 0.5:
                ok = wq.queue_work_on(rng.randrange(4), items[k])
            else:
                ok = wq.queue_work(items[k])
            accepted[p][k] += ok

    def toggle_cpus() -> None:
        # CPUs 1-3 go down and up under the producers' feet; items queued on
        # an offline CPU run unbound and must still never overlap themselves.
        while producing.is_set():
            cpu = 1 + toggles[0] % 3
            topo.cpu_down(cpu)
            topo.cpu_up(cpu)
            toggles[0] += 1
            toggled.set()

    toggler = threading.Thread(target=toggle_cpus) if hotplug else None
    try:
        # First, deterministically: a run held on one CPU (or worker), the
        # item queued again where a free worker would take it at once.
        if flags & WQ_UNBOUND:  # every waiting item of an unbound pool gets a worker
            assert_next_run_waits(wq.queue_work, wq.queue_work)
        elif not hotplug:  # CPU 1's pool is idle while CPU 0 runs the item
            assert_next_run_waits(lambda w: wq.queue_work_on(0, w),
                                  lambda w: wq.queue_work_on(1, w))
        else:  # CPU 1 goes down under the run: its pool is unbound now
            assert_next_run_waits(lambda w: wq.queue_work_on(1, w),
                                  lambda w: wq.queue_work_on(1, w),
                                  meanwhile=lambda: topo.cpu_down(1))
            topo.cpu_up(1)
        # Then under contention.
        if toggler is not None:
            toggler.start()
        try:
            run_producers(produce)
        finally:
            producing.clear()
            if toggler is not None:
                toggler.join(TIMEOUT)
        wq.flush()
        # Items queue themselves again for a while: flush until all is quiet.
        while any(item.pending or item.running for item in items):
            for item in items:
                item.flush()
        assert toggles[0] >= hotplug
        for k, item in enumerate(items):
            assert item.overlaps == 0, f"item {k} ran concurrently with itself"
            # Every accepted queueing is exactly one run: the pending bit
            # coalesces, it never loses or duplicates.
            assert item.runs == sum(row[k] for row in accepted) + item.requeued
            assert not item.pending and not item.running
    finally:
        wq.destroy()
