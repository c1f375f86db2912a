#!/usr/bin/env python3
"""PV Calls against direct loopback TCP, in one run.

Processes (so that no two parties share a GIL, as guests and dom0 would not):

* an **echo server** (selectors, one thread) on 127.0.0.1, used by both
  measurements;
* the **backend**: an embedded simulated host (``xenback.sim.SimHost``) with
  four guest domains and ``pvcalls.Backend`` serving them;
* **clients**: for PV Calls, one process per guest that joins the host with
  ``xenback.sim.attach(run_dir, domid)`` and uses ``pvcalls.Frontend``; for
  the baseline, the same client code on plain ``socket`` objects.

Measurements:

1. single stream guest -> echo server -> guest, 64 KiB writes (a writer and
   a reader thread), MB/s;
2. 256 concurrent streams from 4 guests (64 each, one thread per stream,
   64 KiB write then read it back), aggregate MB/s, plus the backend's
   per-CPU socket counts while they are open;
3. 64-byte request/response round trips per second on one connection;
4. connects per second (socket, connect, close);
5. backend memory per active socket beyond its ring pages: growth of the
   backend process's anonymous RSS (``RssAnon``: the mapped ring pages are
   shared memory and not in it) with the 256 streams connected, per socket.

Each PV Calls measurement is made twice, with separate guests: with data rings
of order 4 (32 KiB each way), what Linux's ``pvcalls-front`` always uses, and
with a larger order (``--large-order``, default 6: 128 KiB each way), which
the protocol allows up to the backend's ``max-page-order`` (set to that
order here) but Linux's frontend never asks for.  Only the order 4 rows say
what a Linux guest would see.

Nothing is timed until every process is set up (each guest's frontend
connected); a warm-up of every measurement with every setup (``--warmup``)
precedes the counted rounds.  A failure in any process ends the run with its
traceback and exit status 1, and no table.

Targets (from the issue): (1) and (2) >= 50 % of loopback, (3) >= 33 %,
per-CPU counts max - min <= 1.  Prints a Markdown table and writes
``bench/results/pvcalls.md``.  Run: ``.venv/bin/python bench/pvcalls_bench.py``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import selectors
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

import benchlib

CHUNK = 64 * 1024
NR_GUESTS = 4
STREAMS = 256
RR_SIZE = 64
LINUX_ORDER = 4


def _raise_nofile() -> None:
    # 256 sockets, their grant mappings and event channel pipes need more
    # than the usual 1024 descriptors in the backend process.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class BenchError(Exception):
    """The benchmark could not measure: it prints why and exits 1."""


def _failed(conn: Connection) -> NoReturn:
    """Tell the parent why this process is failing (call from ``except``),
    and exit: the parent prints the traceback, once."""
    try:
        conn.send(("error", traceback.format_exc()))
    except OSError:
        traceback.print_exc()  # the parent is gone: say it here
    sys.exit(1)


def _ok(conn: Connection, value: Any) -> None:
    conn.send(("ok", value))


# -- echo server ---------------------------------------------------------------

def echo_main(conn: Connection) -> None:
    """Echo every connection until it closes; one thread, non-blocking."""
    try:
        _echo(conn)
    except BaseException:
        _failed(conn)


def _echo(conn: Connection) -> None:
    _raise_nofile()
    sel = selectors.DefaultSelector()
    lsock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    _ok(conn, lsock.getsockname())
    pending: dict[socket.socket, bytearray] = {}
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    stop_r, stop_w = socket.socketpair()
    sel.register(stop_r, selectors.EVENT_READ, "stop")
    threading.Thread(target=lambda: (conn.recv(), stop_w.send(b"x")), daemon=True).start()
    while True:
        for key, events in sel.select():
            if key.data == "stop":
                _ok(conn, "bye")
                return
            if key.fileobj is lsock:
                try:
                    while True:
                        c, _ = lsock.accept()
                        c.setblocking(False)
                        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        pending[c] = bytearray()
                        sel.register(c, selectors.EVENT_READ, None)
                except BlockingIOError:
                    pass
                continue
            s = key.fileobj
            assert isinstance(s, socket.socket)
            out = pending[s]
            if events & selectors.EVENT_WRITE and out:
                try:
                    n = s.send(out)
                    del out[:n]
                except BlockingIOError:
                    pass
            if events & selectors.EVENT_READ and not out:
                try:
                    n = s.recv_into(view)
                except (BlockingIOError, ConnectionResetError):
                    n = -1
                if n == 0:
                    sel.unregister(s)
                    del pending[s]
                    s.close()
                    continue
                if n > 0:
                    try:
                        sent = s.send(view[:n])
                    except BlockingIOError:
                        sent = 0
                    out += view[sent:n]
            sel.modify(s, selectors.EVENT_WRITE if out else selectors.EVENT_READ, None)


# -- backend -------------------------------------------------------------------

def backend_main(conn: Connection, run_dir: str, max_page_order: int, nr_domains: int,
                 max_ioworkers: int) -> None:
    """SimHost + Backend; answers "stats" until "quit"."""
    try:
        _raise_nofile()
        import pvcalls
        from xenback.sim import SimHost

        with SimHost(Path(run_dir)) as host, \
                pvcalls.Backend(host.dom0, max_page_order=max_page_order,
                                max_ioworkers=max_ioworkers) as backend:
            domids = [host.create_domain(f"guest{i + 1}").domid for i in range(nr_domains)]
            _ok(conn, domids)
            while True:
                cmd = conn.recv()
                if cmd == "quit":
                    break
                if cmd == "stats":
                    _ok(conn, (backend.stats().as_dict(), _rss_anon()))
    except BaseException:
        _failed(conn)
    _ok(conn, "bye")


# -- clients -------------------------------------------------------------------

def _recv_exactly(s: Any, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = s.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("echo server closed the connection")
        got += n


def single_stream(connect: Callable[[], Any], seconds: float) -> float:
    """Bytes per second through one echoed stream of 64 KiB writes."""
    s = connect()
    chunk = os.urandom(CHUNK)
    # The writer fixes the total before it sends its last chunk, so the
    # reader blocks in recv only while more data is sure to come.  (Counting
    # after each sendall let the reader take the last echo before the count
    # and the end flag and then block forever in recv.)
    total = 0
    done = threading.Event()

    def writer() -> None:
        nonlocal total
        end = time.perf_counter() + seconds
        sent = 0
        while True:
            sent += len(chunk)
            if time.perf_counter() >= end:
                total = sent
                done.set()
                s.sendall(chunk)
                return
            s.sendall(chunk)

    start = time.perf_counter()
    t = threading.Thread(target=writer)
    t.start()
    received = 0
    view = memoryview(bytearray(CHUNK))
    while not (done.is_set() and received >= total):
        n = s.recv_into(view)
        if n == 0:
            raise ConnectionError("echo server closed the connection")
        received += n
    elapsed = time.perf_counter() - start
    t.join()
    s.close()
    return received / elapsed


def streams(socks: list[Any], seconds: float,
            go: threading.Barrier | None = None) -> tuple[int, float]:
    """Every socket in its own thread: write 64 KiB, read it back, repeat."""
    total = [0] * len(socks)
    chunk = os.urandom(CHUNK)
    start_barrier = threading.Barrier(len(socks) + 1)
    end_at = [0.0]

    def run(i: int) -> None:
        s = socks[i]
        view = memoryview(bytearray(CHUNK))
        start_barrier.wait()
        while time.perf_counter() < end_at[0]:
            s.sendall(chunk)
            _recv_exactly(s, view)
            total[i] += CHUNK

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(socks))]
    for t in threads:
        t.start()
    start = time.perf_counter()
    end_at[0] = start + seconds
    start_barrier.wait()
    for t in threads:
        t.join()
    return sum(total), time.perf_counter() - start


def round_trips(connect: Callable[[], Any], seconds: float) -> float:
    s = connect()
    msg = b"x" * RR_SIZE
    view = memoryview(bytearray(RR_SIZE))
    count = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        s.sendall(msg)
        _recv_exactly(s, view)
        count += 1
    elapsed = time.perf_counter() - start
    s.close()
    return count / elapsed


def connects(connect: Callable[[], Any], seconds: float) -> float:
    count = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        connect().close()
        count += 1
    return count / (time.perf_counter() - start)


def client_main(conn: Connection, run_dir: str | None, domid: int | None, addr: tuple[str, int],
                ring_order: int = LINUX_ORDER) -> None:
    """One client process: a guest (``domid``) or plain loopback (None).
    Says "ready" once set up (a guest's frontend connected), so that no
    measurement runs while another party is still starting."""
    fe = None
    try:
        _raise_nofile()
        if domid is not None:
            import pvcalls
            from xenback.sim import attach

            fe = pvcalls.Frontend(attach(Path(str(run_dir)), domid), ring_order=ring_order)
            fe.open()
    except BaseException:
        _failed(conn)
    _ok(conn, "ready")

    def connect() -> Any:
        if fe is None:
            s = socket.create_connection(addr)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        pv = fe.socket()
        pv.connect(addr)
        return pv

    socks: list[Any] = []
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "quit":
                break
            if cmd == "single":
                _ok(conn, single_stream(connect, arg))
            elif cmd == "rr":
                _ok(conn, round_trips(connect, arg))
            elif cmd == "connects":
                _ok(conn, connects(connect, arg))
            elif cmd == "open":
                socks = [connect() for _ in range(arg)]
                _ok(conn, len(socks))
            elif cmd == "streams":
                result = streams(socks, arg)
                # Closed before answering: the next measurement must not
                # overlap this teardown (nor see these sockets in the
                # backend's counts).
                for s in socks:
                    s.close()
                socks = []
                _ok(conn, result)
    except BaseException:
        _failed(conn)
    finally:
        if fe is not None:
            fe.close()
    _ok(conn, "bye")


# -- orchestration --------------------------------------------------------------

class Party:
    """A child process and its end of a pipe."""

    def __init__(self, ctx: Any, name: str, target: Callable[..., None], *args: Any) -> None:
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True, name=name)
        benchlib.start(self.proc)
        # Only the child holds its end now: should it die, ask() sees EOF
        # at once instead of waiting out its timeout.
        child.close()

    def ask(self, *msg: Any, timeout: float = 120.0) -> Any:
        """Send ``msg`` (if any) and return the answer; :class:`BenchError`
        if the process failed, died or did not answer in time."""
        what = f"{self.name} (pid {self.proc.pid})"
        try:
            if msg:
                self.conn.send(msg if len(msg) > 1 else msg[0])
            if not self.conn.poll(timeout):
                raise BenchError(f"{what} did not answer {msg!r} within {timeout:.0f} s")
            status, value = self.conn.recv()
        except (OSError, EOFError):
            self.proc.join(5)
            raise BenchError(f"{what} exited (code {self.proc.exitcode}) without answering "
                             f"{msg!r}") from None
        if status == "error":
            raise BenchError(f"{what} failed on {msg!r}:\n{value}")
        return value

    def close(self, quit_msg: Any) -> None:
        try:
            self.conn.send(quit_msg)
            self.conn.poll(30)
        except (OSError, EOFError):
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used by groups of processes during a phase, in cores (CPU
    seconds per wall-clock second): where the time goes."""

    def __init__(self, groups: dict[str, list[Party]]) -> None:
        self.groups = groups

    def __enter__(self) -> CpuMeter:
        self.start = time.perf_counter()
        self.before = {g: [_cpu_seconds(p.proc.pid) for p in ps] for g, ps in self.groups.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.start
        self.cores = {
            g: sum(_cpu_seconds(p.proc.pid) - b for p, b in zip(ps, self.before[g], strict=True))
            / wall
            for g, ps in self.groups.items()
        }


KEYS = ("single", "streams", "rr", "connects")
RESULTS = Path(__file__).resolve().parent / "results" / "pvcalls.md"


def _keys(text: str) -> list[str]:
    """``--only``'s comma-separated measurements, checked."""
    keys = list(dict.fromkeys(key for key in text.split(",") if key))  # each once
    unknown = [key for key in keys if key not in KEYS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"no measurement {', '.join(map(repr, unknown))} (there are {','.join(KEYS)})")
    if not keys:
        raise argparse.ArgumentTypeError(f"takes some of {','.join(KEYS)}, got {text!r}")
    return keys


def _output(text: str) -> Path:
    # Found out now rather than after the whole run, with no table written.
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    # The directories missing are made then, but none under a file.
    nearest = next((parent for parent in path.parents if parent.exists()), None)
    if nearest is not None and not nearest.is_dir():
        raise argparse.ArgumentTypeError(f"{str(nearest)!r} is not a directory")
    return path


def measure(key: str, clients: list[Party], seconds: float, groups: dict[str, list[Party]],
            on_open: Callable[[], Any] | None = None) -> tuple[float, dict[str, float], Any]:
    """One measurement ``key`` with ``clients``: (value, CPU cores used by
    each group of processes, what ``on_open`` said with the streams open)."""
    opened = None
    if key == "streams":
        per = STREAMS // len(clients)
        for c in clients:
            c.conn.send(("open", per))
        for c in clients:
            c.ask()
        opened = on_open() if on_open else None
        with CpuMeter(groups) as meter:
            for c in clients:
                c.conn.send(("streams", seconds))
            results = [c.ask() for c in clients]
        value = sum(b for b, _ in results) / max(t for _, t in results)
    else:
        with CpuMeter(groups) as meter:
            value = clients[0].ask(key, seconds)
    if not value > 0:
        # A ratio against (or of) nothing would be printed as 0 % or not at
        # all: say that the measurement failed instead.
        raise BenchError(f"{key} with {clients[0].name} and the rest of its setup measured "
                         f"nothing ({value!r}) in {seconds:g} s")
    return value, meter.cores, opened


def main(argv: list[str] | None = None) -> int:
    from pvcalls._wire import MAX_PAGE_ORDER_LIMIT

    p = argparse.ArgumentParser(
        description="Throughput, round trips and connects of guests through the PV Calls "
        "backend, each guest and the backend in a process of their own on a simulated host, "
        "against a baseline: direct loopback TCP, the same client code on plain sockets, "
        "measured in the same run (rounds of back-to-back pairs).  Prints a Markdown table "
        "with pvcalls / direct loopback for each measurement and ring order and writes "
        "bench/results/pvcalls.md (only a run of every measurement; see --output).",
        epilog=benchlib.EPILOG)
    p.add_argument("--seconds", type=benchlib.seconds, default=2.0,
                   help="duration of each measurement (default: %(default)s)")
    p.add_argument("--rounds", type=benchlib.at_least(1), default=5,
                   help="rounds; in each, every measurement is made with direct loopback and "
                        "with each ring order, back to back (in reverse order every other "
                        "round, so that a drifting load favours neither) (default: "
                        "%(default)s)")
    p.add_argument("--large-order", type=benchlib.at_least(LINUX_ORDER, MAX_PAGE_ORDER_LIMIT),
                   default=6,
                   help="the ring order of the second set of PV Calls rows (and the "
                        f"backend's max-page-order): {LINUX_ORDER}, Linux's, up to "
                        f"{MAX_PAGE_ORDER_LIMIT}, the most one indexes page can describe "
                        "(default: %(default)s)")
    p.add_argument("--only", type=_keys, default=list(KEYS),
                   help=f"comma-separated measurements to make, of {','.join(KEYS)} "
                        "(for working on one; the README's table is of all, the default)")
    p.add_argument("--warmup", type=benchlib.seconds_or_none, default=None,
                   help="seconds of each measurement made once, with every setup alike, "
                        "before the first round and not counted (default: --seconds, at "
                        "most 0.5; 0 for none)")
    p.add_argument("--max-ioworkers", type=benchlib.at_least(1), default=None,
                   help="the backend's max_ioworkers (default: the backend's own, "
                        "DEFAULT_MAX_IOWORKERS, so one ioworker per CPU here); 1 shows "
                        "what the second ioworker of one process costs under the GIL")
    p.add_argument("--cpus", type=benchlib.cpu_list, default=None,
                   help="run every process (echo server, backend, clients) on these CPUs "
                        "only, as taskset -c takes them (0, 0,2, 0-3): 0 shows what the path "
                        "costs when no wake-up has to reach another CPU (default: wherever "
                        "this process may run)")
    p.add_argument("--output", type=_output, default=None,
                   help="where to write the table (default: the recorded table, "
                        "bench/results/pvcalls.md, and only by a run of every "
                        "measurement)")
    args = p.parse_args(argv)
    warmup = min(args.seconds, 0.5) if args.warmup is None else args.warmup
    keys = args.only
    return benchlib.run(
        "pvcalls_bench", lambda interrupts: _bench(args, keys, warmup, interrupts),
        failure=BenchError)


def _bench(args: argparse.Namespace, keys: list[str], warmup: float,
           interrupts: benchlib.Interrupts) -> int:
    orders = sorted({LINUX_ORDER, args.large_order})
    _raise_nofile()
    load_before = Path("/proc/loadavg").read_text().split()[0]
    runs, opened, rss_before, placed = _run(args, keys, orders, warmup, interrupts)
    interrupts.checkpoint()

    measurements = {
        "single": ("single stream, 64 KiB writes (MB/s)", 1e6, 0.50),
        "streams": (f"{STREAMS} streams from {NR_GUESTS} guests (MB/s)", 1e6, 0.50),
        "rr": (f"{RR_SIZE}-byte round trips (/s)", 1.0, 0.33),
        "connects": ("connects (/s)", 1.0, None),
    }

    median = statistics.median

    def cpu_text(cores: list[dict[str, float]], names: tuple[str, ...]) -> str:
        return " / ".join(f"{median([c[n] for c in cores]):.2f}" for n in names)

    lines = [
        "| measurement | ring order | pvcalls | direct loopback | "
        "pvcalls / direct loopback, median of the rounds (range) | "
        "target | CPU cores used, pvcalls (guests / backend / echo) | "
        "CPU cores used, direct (clients / echo) |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]
    for key in keys:
        name, unit, target = measurements[key]
        base = runs["direct"][key]
        for order in orders:
            pv = runs[order][key]
            # Each round's pair was measured back to back: its ratio is the
            # least disturbed by the machine's other load.
            ratios = [a / b if b else 0.0 for (a, _), (b, _) in zip(pv, base, strict=True)]
            rt = median(ratios)
            verdict = "" if target is None else (
                f">= {target:.0%} {'met' if rt >= target else 'NOT met'}")
            label = f"{order} (Linux)" if order == LINUX_ORDER else f"{order} (not Linux)"
            lines.append(
                f"| {name} | {label} | {median([v for v, _ in pv]) / unit:.0f} | "
                f"{median([v for v, _ in base]) / unit:.0f} | "
                f"{rt:.0%} ({min(ratios):.0%}-{max(ratios):.0%}) | {verdict} | "
                f"{cpu_text([c for _, c in pv], ('guests', 'backend', 'echo'))} | "
                f"{cpu_text([c for _, c in base], ('clients', 'echo'))} |")
    lines.append("")
    for order in orders if "streams" in keys else ():
        stats, rss_open = opened[order]
        per_cpu = _per_cpu_counts(stats)
        spread = max(per_cpu.values()) - min(per_cpu.values()) if per_cpu else None
        mem_per_socket = (rss_open - rss_before[order]) / STREAMS
        counts = ", ".join(f"CPU {c}: {n}" for c, n in sorted(per_cpu.items()))
        if sum(per_cpu.values()) != STREAMS:  # sockets not of these streams counted too
            counts += f" (total {sum(per_cpu.values())}, not {STREAMS})"
        met = "met" if spread is not None and spread <= 1 else "NOT met"
        lines += [
            f"- ring order {order}: sockets per ioworker CPU with {STREAMS} streams open: "
            f"{counts} (max - min = {spread}; target <= 1: {met}); backend memory per active "
            f"socket beyond its ring pages: {mem_per_socket / 1024:.1f} KiB "
            f"(RssAnon growth / {STREAMS}, the first time they were open)",
        ]
    large = max(orders)
    lines += [
        f"- ring order {LINUX_ORDER} is what Linux's pvcalls-front uses" + (
            f"; order {large} needs a frontend that asks for it "
            f"(pvcalls.Frontend(ring_order=...)) and a backend offering "
            f"max-page-order >= {large}" if large != LINUX_ORDER else ""),
        f"- every party set up (guests' frontends connected) before anything was timed; "
        f"then {warmup:g} s of each measurement with each setup, not counted; then "
        f"{args.rounds} round{'s' if args.rounds != 1 else ''}; in each, every measurement "
        f"ran with direct loopback and "
        f"each ring order back to back (reversed every other round); values and CPU are "
        f"medians over the rounds, the ratio is the median of the rounds' ratios (their range "
        f"in brackets); the machine is shared, so single rounds can be far off",
        f"- machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{args.seconds:g} s per measurement; guests and backend in separate processes; "
        f"backend max_ioworkers {args.max_ioworkers or 'default'}; "
        f"every process (echo server, backend, clients) on {benchlib.cpus_text(placed)}"
        f"{' (--cpus)' if args.cpus else ''}; "
        f"load average before the run {load_before}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    output = args.output
    if output is None:
        if len(keys) < len(KEYS):
            return 0  # a partial run does not replace the recorded table
        output = RESULTS
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("# PV Calls benchmark\n\nProduced by `bench/pvcalls_bench.py`.\n\n" + text)
    return 0


Runs = dict[Any, dict[str, list[tuple[float, dict[str, float]]]]]


def _run(args: argparse.Namespace, keys: list[str], orders: list[int], warmup: float,
         interrupts: benchlib.Interrupts
         ) -> tuple[Runs, dict[int, Any], dict[int, int], set[int]]:
    """Start every party, wait until all are set up, warm up, then make the
    rounds; also returns the CPUs the parties could run on.  Every process
    and the simulated host's directory are gone when this returns, whether
    or not it raises."""
    ctx = mp.get_context("spawn")
    parties: list[tuple[Party, Any]] = []
    # runs[setup][key]: (value, cores) of each round; setup "direct" or an order.
    runs: Runs = {}
    opened: dict[int, Any] = {}
    rss_before: dict[int, int] = {}
    from pvcalls import DEFAULT_MAX_IOWORKERS

    max_ioworkers = args.max_ioworkers or DEFAULT_MAX_IOWORKERS
    run_dir = None
    placed: set[int] = set()
    allowed = os.sched_getaffinity(0)
    try:
        if args.cpus:
            os.sched_setaffinity(0, args.cpus)  # inherited by every party
        with benchlib.held_back():
            run_dir = tempfile.mkdtemp(prefix="pvcalls-bench-")
        print(f"starting the echo server, the backend and {NR_GUESTS * (1 + len(orders))} "
              "clients ...", file=sys.stderr, flush=True)
        echo = Party(ctx, "echo server", echo_main)
        parties.append((echo, "quit"))
        addr = tuple(echo.ask())
        backend = Party(ctx, "backend", backend_main, run_dir, max(orders),
                        NR_GUESTS * len(orders), max_ioworkers)
        parties.append((backend, "quit"))
        domids = backend.ask(timeout=60)

        direct = [Party(ctx, f"direct client {i + 1}", client_main, None, None, addr)
                  for i in range(NR_GUESTS)]
        parties += [(c, ("quit", None)) for c in direct]
        setups: list[tuple[Any, list[Party], dict[str, list[Party]]]] = [
            ("direct", direct, {"clients": direct, "echo": [echo]})]
        for n, order in enumerate(orders):
            mine = domids[n * NR_GUESTS : (n + 1) * NR_GUESTS]
            guests = [Party(ctx, f"guest dom{d} (ring order {order})", client_main,
                            run_dir, d, addr, order) for d in mine]
            parties += [(g, ("quit", None)) for g in guests]
            setups.append((order, guests, {"guests": guests, "backend": [backend], "echo": [echo]}))
        # Every client is set up (imported, attached, frontend connected)
        # before anything is timed: a guest still starting would take CPU
        # from whichever measurement came first.
        for setup in setups:
            for c in setup[1]:
                if c.ask(timeout=60) != "ready":
                    raise BenchError(f"{c.name} did not say it was ready")
        # Read from each party, which --cpus reached only by inheritance.
        for party, _ in parties:
            assert party.proc.pid is not None
            placed |= os.sched_getaffinity(party.proc.pid)

        def on_open() -> Any:
            return backend.ask("stats")

        def one(key: str, setup: Any, clients: list[Party], groups: dict[str, list[Party]],
                seconds: float) -> tuple[float, dict[str, float]]:
            # The backend's memory per socket: RssAnon before and with the
            # streams open the first time (later, freed memory is reused).
            if key == "streams" and setup != "direct" and setup not in rss_before:
                rss_before[setup] = backend.ask("stats")[1]
            value, cores, stats = measure(
                key, clients, seconds, groups, None if setup == "direct" else on_open)
            if stats is not None and setup not in opened:
                opened[setup] = stats
            return value, cores

        if warmup > 0:
            print(f"warm-up, {warmup:g} s each ...", file=sys.stderr)
            for key in keys:
                for setup, clients, groups in setups:
                    interrupts.checkpoint()
                    one(key, setup, clients, groups, warmup)
        for rnd in range(args.rounds):
            print(f"round {rnd + 1} of {args.rounds} ...", file=sys.stderr)
            for key in keys:
                for setup, clients, groups in setups[:: -1 if rnd % 2 else 1]:
                    interrupts.checkpoint()
                    runs.setdefault(setup, {}).setdefault(key, []).append(
                        one(key, setup, clients, groups, args.seconds))
    finally:
        for party, quit_msg in reversed(parties):
            party.close(quit_msg)
        benchlib.reap_children()  # one a stop caught before it was in parties
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        os.sched_setaffinity(0, allowed)
    return runs, opened, rss_before, placed


def _per_cpu_counts(stats: Any) -> dict[int, int]:
    cpus = stats.get("cpus", {})
    return {int(c): int(n if isinstance(n, int) else n.get("sockets", 0)) for c, n in cpus.items()}


if __name__ == "__main__":
    benchlib.stay_stopped()
    sys.exit(main())
