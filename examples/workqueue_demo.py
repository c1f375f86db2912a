"""A tour of the workqueue package in a second.

    .venv/bin/python examples/workqueue_demo.py

Each section prints what happens: queue_work and the container_of idiom,
pending-bit coalescing, delayed work, per-key serial executors, a LoadIndex
re-homing its keys when a CPU goes down, and the statistics and dump.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Hashable

from workqueue import DelayedWork, LoadIndex, Topology, Work, alloc_workqueue


def section(title: str) -> None:
    print(f"\n== {title}")


class Greeting(Work):
    """A Work carrying its own fields: the kernel's container_of idiom."""

    def __init__(self, who: str) -> None:
        super().__init__(Greeting.run)
        self.who = who
        self.said = ""

    def run(self) -> None:
        # Said here, printed by the main thread once the item has run: a
        # worker printing while the main thread prints can splice the two
        # lines together.
        self.said = (
            f"hello {self.who}, from CPU {topology.current_cpu()} "
            f"({threading.current_thread().name})"
        )


class Counter(Work):
    """Blocks in its first run so that we can queue it while it runs."""

    def __init__(self) -> None:
        super().__init__(Counter.run)
        self.runs = 0
        self.entered = threading.Event()
        self.gate = threading.Event()

    def run(self) -> None:
        self.runs += 1
        if self.runs == 1:
            self.entered.set()
            self.gate.wait(5)


topology = Topology(4)  # four logical CPUs, whatever this machine has


def main() -> None:
    wq = alloc_workqueue("demo", topology=topology)
    try:
        section("queue_work: a Work runs on the CPU it was queued on")
        for cpu, who in enumerate(["ring", "socket", "device"]):
            work = Greeting(who)
            queued = wq.queue_work_on(cpu, work)
            work.flush()
            print(f"  queue_work_on({cpu}, {who}) -> {queued}")
            print(f"  {work.said}")

        section(
            "pending bit: queueing a pending item does nothing; "
            "queueing a running one runs it once more"
        )
        counter = Counter()
        print(f"  queue_work -> {wq.queue_work(counter)}")
        counter.entered.wait(5)
        answers = [wq.queue_work(counter) for _ in range(5)]
        print(f"  while it runs, queue_work x5 -> {answers}")
        counter.gate.set()
        counter.flush()
        print(f"  it ran {counter.runs} times in all")

        section("delayed work: mod_delayed_work moves the timer")
        fired = threading.Event()
        dw = DelayedWork(lambda work: fired.set())
        start = time.monotonic()
        print(f"  queue_delayed_work(1.0 s) -> {wq.queue_delayed_work(dw, 1.0)}")
        print(f"  mod_delayed_work(0.1 s)   -> {wq.mod_delayed_work(dw, 0.1)}")
        fired.wait(5)
        print(f"  fired after {time.monotonic() - start:.2f} s")

        section("serial(key): one key's calls run in order, keys in parallel")
        log: dict[str, list[int]] = {}
        futures = []
        for i in range(5):
            for key in ("sock-a", "sock-b", "sock-c"):
                futures.append(wq.serial(key).submit(log.setdefault(key, []).append, i))
        for future in futures:
            future.result(5)
        for key in ("sock-a", "sock-b", "sock-c"):
            print(f"  {key} on CPU {wq.serial(key).cpu}: ran {log[key]}")

        section("LoadIndex: keys spread evenly; cpu_down re-homes them, synchronously")

        def on_move(key: Hashable, old: int, new: int) -> None:
            print(f"  on_move: {key} CPU {old} -> CPU {new}")

        with LoadIndex(topology, on_move=on_move) as index:
            for n in range(8):
                index.assign(f"sock{n}")
            print(f"  loads: {dict(index.statistics().loads)}")
            print("  cpu_down(2):")
            topology.cpu_down(2)
            print(f"  loads: {dict(index.statistics().loads)}  (cpu_down has returned)")
            print(
                f"  the workqueue's own keys moved too: sock-c is now on CPU "
                f"{wq.serial('sock-c').cpu}, and still runs in order: "
                f"{wq.serial('sock-c').submit(lambda: 'ok').result(5)}"
            )
            topology.cpu_up(2)
            print(f"  cpu_up(2); a new key goes to the emptiest CPU: {index.assign('sock8')}")

        section("stats() and dump(), with one item running and two waiting on CPU 0")
        gate = threading.Event()
        blocker = Work(lambda work: gate.wait(5))
        waiting = [Greeting("late"), Greeting("later")]
        wq.queue_work_on(0, blocker)
        for work in waiting:
            wq.queue_work_on(0, work)
        while not blocker.running:  # the demo's only poll: wait for the worker to pick it up
            time.sleep(0.001)
        print(wq.dump())
        gate.set()
        wq.flush()
        for work in waiting:
            print(f"  {work.said}")
        for pool in wq.stats().pools:
            print(
                f"  pool {pool.pool}: queued={pool.queued} completed={pool.completed} "
                f"failed={pool.failed} workers={pool.nr_workers}"
            )
    finally:
        wq.destroy()


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    main()
