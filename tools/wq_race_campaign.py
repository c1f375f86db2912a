"""A racing counterpart of tests/workqueue/test_wq_model.py (not part of the suite).

Threads queue, cancel, mod_delayed_work, flush and hotplug the same few items
on several workqueues at once, with no step waiting for the last, while the
items' runs requeue themselves now and then.  The model here is only what
must hold whatever the interleaving, counted per item from the calls'
answers (kernel/workqueue.c):

* an item becomes pending once per True from queue_work*/queue_delayed_work*
  (test_and_set_bit(WORK_STRUCT_PENDING)), and once per mod_delayed_work*
  that leaves it pending; it stops being pending without a run once per True
  from cancel()/cancel_sync()/mod_delayed_work* (try_to_grab_pending);
  so, once everything is quiet, runs == became pending - taken back;
* an item never runs concurrently with itself;
* cancel_sync() returns with the item neither pending nor running.

    python tools/wq_race_campaign.py [rounds] [seed]
"""

from __future__ import annotations

import argparse
import random
import threading
import time

from toolargs import whole

from workqueue import (
    WQ_UNBOUND,
    DelayedWork,
    Topology,
    Work,
    Workqueue,
    alloc_ordered_workqueue,
    alloc_workqueue,
)

TIMEOUT = 20.0


class Counted:
    """Per-item books: the calls' answers, and the runs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.became = 0
        self.taken = 0
        self.runs = 0
        self.inside = 0
        self.overlap = False


def make_item(delayed: bool, requeue: list[Workqueue | None]) -> tuple[Work, Counted]:
    books = Counted()

    def func(work: Work) -> None:
        with books.lock:
            if books.inside:
                books.overlap = True
            books.inside += 1
            books.runs += 1
        time.sleep(random.random() * 0.0003)
        # Chained queueing now and then (on the workqueue it runs on).
        wq = requeue[0]
        if wq is not None and random.random() < 0.2:
            try:
                if wq.queue_work(work):
                    with books.lock:
                        books.became += 1
            except RuntimeError:
                pass
        with books.lock:
            books.inside -= 1

    item: Work = DelayedWork(func) if delayed else Work(func)
    return item, books


def one_round(rng: random.Random) -> None:
    topo = Topology(2, cpu_intensive_thresh=0.005)
    wqs = [
        alloc_workqueue("b", topology=topo),
        alloc_workqueue("b1", 0, 1, topology=topo),
        alloc_workqueue("u", WQ_UNBOUND, 2, topology=topo),
        alloc_ordered_workqueue("o", topology=topo),
    ]
    requeue: list[Workqueue | None] = [None]
    items = [make_item(i >= 3, requeue) for i in range(5)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def actor(seed: int) -> None:
        r = random.Random(seed)
        try:
            while not stop.is_set():
                item, books = r.choice(items)
                wq = r.choice(wqs)
                op = r.randrange(9)
                cpu = r.randrange(2)
                if op == 0:
                    if wq.queue_work(item):
                        with books.lock:
                            books.became += 1
                elif op == 1:
                    if wq.queue_work_on(cpu, item):
                        with books.lock:
                            books.became += 1
                elif op == 2 and isinstance(item, DelayedWork):
                    if wq.queue_delayed_work_on(cpu, item, r.choice([0, 0.0005, 0.002])):
                        with books.lock:
                            books.became += 1
                elif op == 3 and isinstance(item, DelayedWork):
                    # The answer and the pending state after it are one
                    # step of the engine; count both under our lock so the
                    # books cannot see a run in between out of order.
                    was = wq.mod_delayed_work_on(cpu, item, r.choice([0, 0.0005, 0.002]))
                    with books.lock:
                        books.became += 1
                        if was:
                            books.taken += 1
                elif op == 4:
                    if item.cancel():
                        with books.lock:
                            books.taken += 1
                elif op == 5 and not isinstance(item, DelayedWork):
                    # (Not of a DelayedWork: a mod_delayed_work() racing
                    # with the wait would only cancel, and the books could
                    # not tell.)
                    if item.cancel_sync():
                        with books.lock:
                            books.taken += 1
                elif op == 6:
                    item.flush()
                elif op == 7:
                    requeue[0] = r.choice([None, *wqs])
                else:
                    time.sleep(0.0002)
        except BaseException as exc:  # noqa: BLE001 - reported by the round
            errors.append(exc)
            stop.set()

    def hotplug(seed: int) -> None:
        r = random.Random(seed)
        while not stop.is_set():
            cpu = r.randrange(2)
            if cpu in topo.online() and len(topo.online()) > 1:
                topo.cpu_down(cpu)
            else:
                topo.cpu_up(cpu)
            time.sleep(r.random() * 0.002)

    threads = [threading.Thread(target=actor, args=(rng.random(),)) for _ in range(3)]
    threads.append(threading.Thread(target=hotplug, args=(rng.random(),)))
    for t in threads:
        t.start()
    time.sleep(rng.choice([0.05, 0.2]))
    stop.set()
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "an actor hung"
    if errors:
        raise errors[0]
    requeue[0] = None
    # Quiesce: mod_delayed_work with a delay leaves items on their timers.
    for item, _ in items:
        if isinstance(item, DelayedWork):
            item.flush()
    for wq in wqs:
        wq.flush()
    deadline = time.monotonic() + TIMEOUT
    while any(item.pending or item.running for item, _ in items):
        assert time.monotonic() < deadline, "items never went quiet"
        for wq in wqs:
            wq.flush()
    for i, (_item, books) in enumerate(items):
        assert not books.overlap, f"item {i} ran concurrently with itself"
        assert books.runs == books.became - books.taken, (
            f"item {i}: {books.runs} runs, became pending {books.became} times, "
            f"taken back {books.taken} times")
    for wq in wqs:
        wq.destroy()


def serial_round(rng: random.Random) -> None:
    """wq.serial(key): each key's calls run one at a time and in order,
    also while its CPU goes down and comes back (re-homed by the LoadIndex:
    the kernel's unbound fallback keeps the runs going)."""
    topo = Topology(3, cpu_intensive_thresh=0.005)
    wq = alloc_workqueue("s", topology=topo)
    keys = [f"k{i}" for i in range(6)]
    seen: dict[str, list[int]] = {k: [] for k in keys}
    inside = dict.fromkeys(keys, 0)
    overlap: list[str] = []
    guard = threading.Lock()
    stop = threading.Event()

    def call(key: str, n: int) -> int:
        with guard:
            if inside[key]:
                overlap.append(key)
            inside[key] += 1
        time.sleep(random.random() * 0.0002)
        with guard:
            seen[key].append(n)
            inside[key] -= 1
        return n

    def hotplug(seed: int) -> None:
        r = random.Random(seed)
        while not stop.is_set():
            cpu = r.randrange(3)
            if cpu in topo.online() and len(topo.online()) > 1:
                topo.cpu_down(cpu)
            else:
                topo.cpu_up(cpu)
            time.sleep(r.random() * 0.002)

    plugger = threading.Thread(target=hotplug, args=(rng.random(),))
    plugger.start()
    futures = []
    counts = dict.fromkeys(keys, 0)
    try:
        for _ in range(2000):
            key = rng.choice(keys)
            futures.append(wq.serial(key).submit(call, key, counts[key]))
            counts[key] += 1
            if rng.random() < 0.01:
                time.sleep(0.001)
    finally:
        stop.set()
        plugger.join(TIMEOUT)
    for f in futures:
        f.result(TIMEOUT)
    assert not overlap, f"serial calls of {overlap[0]} overlapped"
    for key in keys:
        assert seen[key] == list(range(counts[key])), f"{key}'s calls ran out of order"
    wq.destroy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rounds", nargs="?", type=whole(1), default=20,
                   help="rounds to run (default 20)")
    p.add_argument("seed", nargs="?", type=int, default=1, help="the rounds' seed (default 1)")
    args = p.parse_args()
    rounds, seed = args.rounds, args.seed
    rng = random.Random(seed)
    random.seed(seed)
    for n in range(rounds):
        one_round(rng)
        serial_round(rng)
        print(f"round {n} ok", flush=True)
    print(f"seed {seed}: {rounds} rounds ok")


if __name__ == "__main__":
    main()
