#!/usr/bin/env python3
"""Event channel notify-to-wakeup latency against a bare pipe and eventfd.

    .venv/bin/python bench/evtchn_bench.py [--rounds N]

Ping-pong between two processes (so that they do not share a GIL, as a guest
and its backend would not):

* **evtchn**: an embedded ``SimHost``; dom0 in this process, a guest in a
  child process that joins with ``xenback.sim.attach``.  Each side waits for
  its handle's descriptor with ``poll``, takes the port with ``pending()``,
  ``unmask()``s it and ``notify()``s the other side: what a backend's event
  loop does per event.  (``pending()`` reads the last port's pipe directly,
  so this makes one system call fewer than the handle's design otherwise
  would: ``poll``, ``read``, ``write``.)
* **evtchn-wait**: the same, waiting with the blocking ``wait()``.
* **pipe**: the limit, two pipes and blocking one-byte ``read``/``write``.
* **eventfd**: the same with two eventfds.
* **epoll+pipe**: the system calls evtchn-wait makes, from bare Python: the
  floor of this design in this language.
* **pipe, one CPU** (information only): the pipe row with both processes
  pinned to one CPU, where a wake-up never has to reach another CPU.  Its
  gap to the pipe row is what waking an idle CPU costs on this machine (on
  a VM whose idle vCPUs halt, most of a cross-process round trip).

Every round trip is timed; the table shows the median and 99th percentile
round trip and the rate the median gives.  The target is >= 50 % of the faster bare
baseline.  Prints a Markdown table and writes ``bench/results/evtchn.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import multiprocessing.connection
import os
import platform
import select
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import benchlib

WARMUP = 1000
RESULTS = Path(__file__).resolve().parent / "results" / "evtchn.md"


class BenchError(Exception):
    """The benchmark could not measure: it prints why and exits 1."""


def _interrupt(signum: int, frame: object) -> None:
    raise BenchError(_why[0])


_why = [""]


@contextmanager
def watched(child: BaseProcess, what: str, timeout: float) -> Iterator[None]:
    """Run the body in the main thread while a watchdog waits for ``child``
    to exit early or for ``timeout`` to pass; either interrupts the body
    (blocked in a read of a pipe the dead child never writes, or in the
    event channel's wait) with :class:`BenchError`, instead of a hang."""
    stop_r, stop_w = os.pipe()
    main = threading.main_thread().ident
    assert main == threading.get_ident(), "the watched body runs in the main thread"
    fired = threading.Event()

    def watch() -> None:
        ready = multiprocessing.connection.wait([child.sentinel, stop_r], timeout)
        if stop_r in ready:
            return
        if ready:
            child.join(1)
            _why[0] = f"{what}: the echo process exited (code {child.exitcode}) mid-run"
        else:
            _why[0] = f"{what}: no progress within {timeout:.0f} s"
        fired.set()
        assert main is not None
        signal.pthread_kill(main, signal.SIGUSR1)

    watcher = threading.Thread(target=watch, daemon=True)
    previous = signal.getsignal(signal.SIGUSR1)
    done = False
    try:
        signal.signal(signal.SIGUSR1, _interrupt)
        # A stop is held back while the watchdog starts: one raised inside
        # start() (which waits for the thread) would leave it unknown to
        # the join below, and alive to take the child's kill for a failure.
        with benchlib.held_back():
            watcher.start()
        yield
        done = True
    finally:
        os.write(stop_w, b"x")
        if watcher.ident is not None:  # started: a stop comes before or after
            watcher.join()
        os.close(stop_r)
        os.close(stop_w)
        signal.signal(signal.SIGUSR1, previous)
        # Killed only now that the watchdog is gone: its death must not
        # be taken for a failure (of a run stopped by Ctrl-C, say).
        if not done and child.is_alive():
            child.kill()
            child.join()
    if fired.is_set():  # fired as the body ended: the run is still suspect
        raise BenchError(_why[0])


def run_timeout(rounds: int) -> float:
    """Time a run may take: generous, only to turn a hang into a failure."""
    return 60.0 + rounds * 0.005


# -- the echo side (child process) --------------------------------------------


def take_event(ch: Any, port: int, poller: select.poll, blocking: bool) -> None:
    """Wait until ``port`` fires on ``ch``, take its event and unmask it:
    with the blocking wait(), or as an event loop would (poll, pending)."""
    if blocking:
        while ch.wait() != port:
            pass
    else:
        poller.poll()
        while ch.pending() != port:
            poller.poll()
    ch.unmask(port)


def evtchn_echo(
    run_dir: str, domid: int, remote_port: int, rounds: int, ctl: Connection, blocking: bool
) -> None:
    from xenback.sim import attach

    with attach(run_dir, domid).evtchn() as ch:
        port = ch.bind_interdomain(0, remote_port)
        poller = select.poll()
        poller.register(ch.fileno(), select.POLLIN)
        ctl.send("ready")
        for _ in range(rounds):
            take_event(ch, port, poller, blocking)
            ch.notify(port)
        ctl.recv()  # keep the port bound until the parent is done


def epoll_echo(rfd: int, wfd: int, rounds: int, ctl: Connection) -> None:
    ep = select.epoll()
    ep.register(rfd, select.EPOLLIN)
    ctl.send("ready")
    for _ in range(rounds):
        ep.poll(-1, 1)
        os.read(rfd, 64)
        os.write(wfd, b"\x00")
    ctl.recv()


def fd_echo(rfd: int, wfd: int, rounds: int, ctl: Connection, size: int,
            cpu: int | None = None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    ctl.send("ready")
    data = b"\x00" if size == 1 else (1).to_bytes(8, sys.byteorder)
    for _ in range(rounds):
        os.read(rfd, size)
        os.write(wfd, data)
    ctl.recv()


# -- the timing side (this process) --------------------------------------------


def timed(rounds: int, one_round: Callable[[], None]) -> list[float]:
    times = []
    clock = time.perf_counter_ns
    for i in range(rounds):
        start = clock()
        one_round()
        if i >= WARMUP:
            times.append((clock() - start) / 1000)
    return times


def run_evtchn(rounds: int, blocking: bool) -> list[float]:
    from xenback.sim import SimHost

    with SimHost() as host:
        guest = host.create_domain("bench")
        with host.dom0.evtchn() as ch:
            port = ch.bind_unbound_port(guest.domid)
            ctl, child_ctl = mp.get_context("spawn").Pipe()
            child = mp.get_context("spawn").Process(
                target=evtchn_echo,
                args=(str(host.run_dir), guest.domid, port, rounds, child_ctl, blocking),
            )
            benchlib.start(child)
            child_ctl.close()
            poller = select.poll()
            poller.register(ch.fileno(), select.POLLIN)

            def one_round() -> None:
                ch.notify(port)
                take_event(ch, port, poller, blocking)

            with watched(child, "evtchn" + ("-wait" if blocking else ""), run_timeout(rounds)):
                _ready(ctl)
                times = timed(rounds, one_round)
            _finish(ctl, child)
    return times


def _ready(ctl: Connection) -> None:
    try:
        said = ctl.recv()
    except (EOFError, OSError):
        said = None
    if said != "ready":
        raise BenchError("the echo process did not start (its traceback, if any, is above)")


def _finish(ctl: Connection, child: BaseProcess) -> None:
    """Let the echo process go and reap it."""
    ctl.send("done")
    child.join(30)
    if child.is_alive():
        child.kill()
        child.join()
        raise BenchError("the echo process did not exit when told to")


def run_fd(rounds: int, make: Callable[[], tuple[int, int]], size: int,
           cpu: int | None = None) -> list[float]:
    """Bare ping-pong; with ``cpu``, both processes pinned to that CPU."""
    ping_r, ping_w = make()
    pong_r, pong_w = make()
    ctl, child_ctl = mp.Pipe()
    child = mp.Process(target=fd_echo, args=(ping_r, pong_w, rounds, child_ctl, size, cpu))
    benchlib.start(child)
    child_ctl.close()
    data = b"\x00" if size == 1 else (1).to_bytes(8, sys.byteorder)

    def one_round() -> None:
        os.write(ping_w, data)
        os.read(pong_r, size)

    allowed = os.sched_getaffinity(0)
    try:
        with watched(child, f"bare ping-pong ({size}-byte)", run_timeout(rounds)):
            _ready(ctl)
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            times = timed(rounds, one_round)
        _finish(ctl, child)
    finally:
        os.sched_setaffinity(0, allowed)
        for fd in {ping_r, ping_w, pong_r, pong_w}:
            os.close(fd)
    return times


def run_epoll_floor(rounds: int) -> list[float]:
    """The kernel work of evtchn-wait without its Python: epoll_wait on a
    pipe, read it, write the other side's pipe."""
    ping_r, ping_w = make_pipe()
    pong_r, pong_w = make_pipe()
    ctl, child_ctl = mp.Pipe()
    child = mp.Process(target=epoll_echo, args=(ping_r, pong_w, rounds, child_ctl))
    benchlib.start(child)
    child_ctl.close()
    ep = select.epoll()
    ep.register(pong_r, select.EPOLLIN)

    def one_round() -> None:
        os.write(ping_w, b"\x00")
        ep.poll(-1, 1)
        os.read(pong_r, 64)

    try:
        with watched(child, "epoll+pipe", run_timeout(rounds)):
            _ready(ctl)
            times = timed(rounds, one_round)
        _finish(ctl, child)
    finally:
        ep.close()
        for fd in (ping_r, ping_w, pong_r, pong_w):
            os.close(fd)
    return times


def make_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_inheritable(r, True)
    os.set_inheritable(w, True)
    return r, w


def make_eventfd() -> tuple[int, int]:
    fd = os.eventfd(0)
    os.set_inheritable(fd, True)
    return fd, fd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Notify-to-wakeup round trips of the simulated host's event channels "
        "between two processes, against a baseline: bare pipes and eventfds (and "
        "epoll+pipe, the system calls of the event channel's design without its Python), "
        "measured in the same run.  Prints a Markdown table of each mechanism's median and "
        "99th percentile round trip and its rate as a share of the fastest bare baseline's, "
        "and writes bench/results/evtchn.md.",
        epilog=benchlib.EPILOG)
    parser.add_argument("--rounds", type=benchlib.at_least(1), default=20000,
                        help=f"timed round trips of each run, after {WARMUP} not timed "
                             "(default: %(default)s)")
    parser.add_argument("--no-write", action="store_true",
                        help="print the table only: no bench/results/evtchn.md")
    args = parser.parse_args(argv)
    return benchlib.run("evtchn_bench", lambda interrupts: _main(args, interrupts),
                        failure=BenchError)


def _main(args: argparse.Namespace, interrupts: benchlib.Interrupts) -> int:
    try:
        return _bench(args, interrupts)
    finally:
        benchlib.reap_children()  # those a stop left between start and watch


def _bench(args: argparse.Namespace, interrupts: benchlib.Interrupts) -> int:
    # fork: the bare baselines' children inherit their descriptors.  The
    # evtchn child is spawned: the host in this process runs threads.
    mp.set_start_method("fork", force=True)
    rounds = args.rounds + WARMUP
    one_cpu = min(os.sched_getaffinity(0))

    results: dict[str, list[float]] = {}
    # Interleave so that drifting machine load hits all of them alike.
    for n in range(2):
        for name, run in (
            ("pipe", lambda: run_fd(rounds, make_pipe, 1)),
            ("eventfd", lambda: run_fd(rounds, make_eventfd, 8)),
            ("epoll+pipe", lambda: run_epoll_floor(rounds)),
            ("evtchn", lambda: run_evtchn(rounds, False)),
            ("evtchn-wait", lambda: run_evtchn(rounds, True)),
            ("pipe, one CPU", lambda: run_fd(rounds, make_pipe, 1, one_cpu)),
        ):
            interrupts.checkpoint()
            print(f"run {n + 1} of 2: {name} ...", file=sys.stderr, flush=True)
            times = run()
            if name not in results or statistics.median(times) < statistics.median(results[name]):
                results[name] = times

    def row(name: str) -> tuple[float, float, float]:
        # Rates from the median: on a shared machine the mean is mostly
        # other processes' scheduling noise.
        t = sorted(results[name])
        med = statistics.median(t)
        return 1e6 / med, med, t[int(len(t) * 0.99)]

    best = min(("pipe", "eventfd"), key=lambda n: statistics.median(results[n]))
    base_rate = row(best)[0]
    lines = [
        "# Event channel benchmark",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; "
        f"{args.rounds} timed round trips (after {WARMUP} warm-up), ping-pong between two "
        "processes, best of 2 interleaved runs.",
        "",
        "| mechanism | round trips/s (at the median) | median round trip (us) | p99 (us) "
        "| vs fastest bare |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("pipe", "eventfd", "epoll+pipe", "evtchn", "evtchn-wait", "pipe, one CPU"):
        rate, med, p99 = row(name)
        lines.append(f"| {name} | {rate:,.0f} | {med:.1f} | {p99:.1f} | {rate / base_rate:.0%} |")
    lines += [
        "",
        "evtchn = `xenback.sim` event channel, dom0 here and a guest in another process: "
        "per event `poll()` on the handle's descriptor, `pending()` (which reads the pipe of "
        "the port it returned last before asking its epoll), `unmask()`, `notify()` "
        "(what an event loop multiplexing other descriptors does).  evtchn-wait = the same "
        "with the blocking `wait()` instead of `poll()` + `pending()` (a thread that waits "
        "for events only, as with libxenevtchn's blocking `xenevtchn_pending`).  "
        "pipe / eventfd = blocking one-byte (eight-byte) `read` and `write`, nothing else.  "
        "epoll+pipe = the kernel work evtchn-wait cannot avoid (`epoll_wait`, `read` to clear "
        "the pending bit, `write` to notify) without any of its Python: the gap between it and "
        "evtchn-wait is the cost of the handle's Python code (locks, port lookup, masking).  "
        "pipe, one CPU = the pipe row with both processes pinned to one CPU (information "
        "only, not a baseline): no wake-up has to reach another CPU, so its gap to the pipe "
        "row is what waking an idle CPU costs on this machine.",
    ]
    for name in ("evtchn", "evtchn-wait"):
        ratio = row(name)[0] / base_rate
        lines.append(
            f"{name} round trips vs the fastest bare baseline ({best}): {ratio:.0%} "
            f"(target >= 50%: {'met' if ratio >= 0.5 else 'NOT met'})."
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    benchlib.stay_stopped()
    sys.exit(main())
