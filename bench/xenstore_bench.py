"""XenStore round trips per second: the simulated host's xenstored against a
bare Python Unix-socket echo server, measured in the same run.

    .venv/bin/python bench/xenstore_bench.py [--seconds 1] [--rounds 3] [--clients 8]
        [--evtchn-rounds N | --no-evtchn]

Each server runs in a process of its own (as the daemon would), each client
in a process of its own, so no GIL is shared between them.  Two clients:

* pyxs, the project's XenStore client (a router thread per connection);
* raw: one blocking socket, one request in flight (the thinnest possible
  Python client).

Baselines: the echo server answers every request by sending the same bytes
back.  With the raw client the requests are 16-byte headers; pyxs gets its
own packets echoed back, which it accepts as replies.  So "pyxs vs echo" is
what the server costs compared to doing nothing, with the client held
fixed; "raw vs echo (16 B)" is the same for the thinnest client.

Prints a Markdown table and writes it to bench/results/xenstore.md, then runs
bench/evtchn_bench.py (event-channel notify-to-wakeup latency against a bare
pipe/eventfd round trip), so that one run covers the simulated host;
``--evtchn-rounds N`` is its ``--rounds N`` (shorter with fewer), ``--no-evtchn``
skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import queue
import selectors
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Barrier
from pathlib import Path

import benchlib

HEADER = struct.Struct("<IIII")
READ, WRITE = 2, 11
RESULTS = Path(__file__).resolve().parent / "results" / "xenstore.md"
# Seconds both servers have to say they are ready: only to turn a hang into
# a failure, a server that dies starting fails the run as it exits.
START_TIMEOUT = 30.0


class BenchError(Exception):
    """The benchmark could not measure: it prints why and exits 1."""


# --- servers (each in its own process) -----------------------------------------
#
# A server process says it is ready on a pipe and serves until the parent
# terminates it: it has nothing to clean up that the parent does not (the
# run's directory), and no lock of multiprocessing's is shared with it, which
# it could die holding (a SIGTERM to the process group ends it first).


def serve_xenstored(run_dir: str, ready: Connection) -> None:
    from xenback.sim._xenstored import RawClient, XenStored

    with XenStored(Path(run_dir)) as xsd:
        with RawClient(xsd.path) as c:
            c.write("/bench/node", b"v" * 16)
        ready.send("ready")
        while True:
            signal.pause()


def echo_server(path: str, ready: Connection) -> None:
    serve_echo(path, lambda: ready.send("ready"))


def serve_echo(path: str, ready: Callable[[], None],
               stopped: Callable[[], bool] | None = None) -> None:
    """The baseline: a selector loop sending back whatever arrives, until
    ``stopped()``, or for ever."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    ready()
    # As lean as it gets: nothing but select, recv and send (``stopped`` is
    # looked at only when idle; the bench is done with it by then).
    while True:
        events = sel.select(timeout=None if stopped is None else 0.2)
        if not events and stopped is not None and stopped():
            break
        for key, _mask in events:
            if key.data is None:
                conn, _ = listener.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, conn)
                continue
            conn = key.data
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(conn)
                conn.close()
                continue
            conn.sendall(data)  # tiny replies: the kernel always takes them


# --- clients (each in its own process) --------------------------------------------


def timed(one: Callable[[], None], batch: int, seconds: float, start: Barrier,
          out: mp.Queue) -> None:
    """Warm up with one round trip, wait for the other clients, then run
    ``one`` in batches of ``batch`` for ``seconds``; put (count, elapsed)."""
    one()
    start.wait()
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(batch):
            one()
        n += batch
        if time.perf_counter() >= deadline:
            break
    out.put((n, time.perf_counter() - t0))


def pyxs_client(path: str, op: int, seconds: float, start: Barrier, out: mp.Queue,
                echo: bool) -> None:
    import pyxs
    from pyxs._internal import Op

    with pyxs.Client(unix_socket_path=path) as c:
        if echo:
            # The echoed packet is a valid reply for execute_command(), not
            # for write(), which insists on "OK": same round trip, no check.
            args = (b"/bench/node\0",) if op == READ else (b"/bench/w\0", b"0123456789abcdef")

            def one() -> None:
                c.execute_command(Op.READ if op == READ else Op.WRITE, *args)
        elif op == READ:
            def one() -> None:
                c.read(b"/bench/node")
        else:
            def one() -> None:
                c.write(b"/bench/w", b"0123456789abcdef")
        timed(one, 50, seconds, start, out)


def raw_client(path: str, op: int, seconds: float, start: Barrier, out: mp.Queue,
               echo: bool) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    if echo:
        request = HEADER.pack(op, 1, 0, 0)  # 16 bytes
    elif op == READ:
        request = HEADER.pack(READ, 1, 0, 12) + b"/bench/node\0"
    else:
        request = HEADER.pack(WRITE, 1, 0, 25) + b"/bench/w\0" + b"0123456789abcdef"
    recv_into = sock.recv_into
    buf = bytearray(65536)
    view = memoryview(buf)

    def one() -> None:
        sock.sendall(request)
        got = recv_into(view)
        while got < 16 or got < 16 + HEADER.unpack_from(buf)[3]:
            got += recv_into(view[got:])

    timed(one, 100, seconds, start, out)
    sock.close()


def embedded_client(path: str, op: int, seconds: float, start: Barrier, out: mp.Queue,
                    echo: bool) -> None:
    """pyxs against a server running as a thread of the client's own process
    (how tests and the demo run the simulated host: one GIL for both)."""
    import threading

    from xenback.sim._xenstored import RawClient, XenStored

    # In the run's directory (``path``), which the parent removes even if
    # this process is killed.
    with tempfile.TemporaryDirectory(prefix="xse", dir=path) as d:
        if echo:
            ready, stop = threading.Event(), threading.Event()
            local = os.path.join(d, "echo")
            server = threading.Thread(target=serve_echo, args=(local, ready.set, stop.is_set),
                                      daemon=True)
            server.start()
            ready.wait()
            try:
                pyxs_client(local, op, seconds, start, out, echo)
            finally:
                stop.set()
                server.join()
        else:
            with XenStored(Path(d)) as xsd:
                with RawClient(xsd.path) as c:
                    c.write("/bench/node", b"v" * 16)
                pyxs_client(str(xsd.path), op, seconds, start, out, echo)


def measure(client: str, path: str, op: int, nclients: int, seconds: float, echo: bool) -> float:
    """Round trips per second, summed over ``nclients`` client processes
    (for the embedded client, ``path`` is a directory for its server)."""
    ctx = mp.get_context("fork")
    # Made whole or not at all: multiprocessing's objects register
    # finalizers as they are made, and one stopped half made fails later
    # with a traceback ("Exception ignored in: <Finalize object, dead>").
    with benchlib.held_back():
        start = ctx.Barrier(nclients)
        out: mp.Queue = ctx.Queue()
    procs = []
    target = {"pyxs": pyxs_client, "raw": raw_client, "embedded": embedded_client}[client]
    for _ in range(nclients):
        procs.append(ctx.Process(target=target, args=(path, op, seconds, start, out, echo)))
    try:
        for p in procs:
            benchlib.start(p)
        results: list[tuple[int, float]] = []
        deadline = time.monotonic() + 60 + seconds
        while len(results) < nclients:
            try:
                results.append(out.get(timeout=1))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                    _kill(procs)
                    codes = [p.exitcode for p in procs]
                    server = "an embedded server" if client == "embedded" else path
                    raise BenchError(f"{client} clients against {server} failed or hung "
                                     f"(exit codes {codes}; their tracebacks, if any, "
                                     "are above)") from None
        for p in procs:
            p.join()
    finally:
        _kill(procs)  # interrupted: none outlives the measurement
    return sum(n / elapsed for n, elapsed in results)


def _kill(procs: list[BaseProcess]) -> None:
    """Kill and reap those of ``procs`` that were started and still run."""
    started = [p for p in procs if p.pid is not None]
    for p in started:
        if p.exitcode is None:
            p.kill()
    for p in started:
        p.join()


def _measure_all(args: argparse.Namespace,
                 interrupts: benchlib.Interrupts) -> list[tuple[str, str, int, float, float]]:
    """Both servers in processes of their own, every row measured; the
    servers are gone when this returns or raises."""
    ctx = mp.get_context("fork")
    with contextlib.ExitStack() as stack:
        with benchlib.held_back():
            d = stack.enter_context(tempfile.TemporaryDirectory(prefix="xsb"))
        (ready_x, said_x), (ready_e, said_e) = ctx.Pipe(duplex=False), ctx.Pipe(duplex=False)
        echo_path = os.path.join(d, "echo")
        servers = [
            ctx.Process(target=serve_xenstored, args=(d, said_x), name="xenstored"),
            ctx.Process(target=echo_server, args=(echo_path, said_e), name="echo server"),
        ]
        xs_path = os.path.join(d, "xenstored", "socket")
        rows = []
        try:
            for p in servers:
                benchlib.start(p)
            deadline = time.monotonic() + START_TIMEOUT
            for p, ready in zip(servers, (ready_x, ready_e), strict=True):
                # Waiting on the pipe and on the process's exit together:
                # a server that dies starting fails the run at once.  Which
                # one ended the wait is said: a slow start is not a crash.
                while not ready.poll(0.1):
                    if not p.is_alive():
                        raise BenchError(f"the {p.name} exited as it started (exit code "
                                         f"{p.exitcode}; its traceback, if any, is above)")
                    if time.monotonic() > deadline:
                        raise BenchError(f"the {p.name} did not start within "
                                         f"{START_TIMEOUT:g} s")
            for client in ("pyxs", "raw"):
                for op, opname in ((READ, "READ"), (WRITE, "WRITE")):
                    for n in (1, args.clients):
                        # Interleaved rounds, best of each: this machine is
                        # shared, and noise only ever makes a run slower.
                        ours = base = 0.0
                        for _ in range(args.rounds):
                            interrupts.checkpoint()
                            ours = max(ours, measure(client, xs_path, op, n, args.seconds, False))
                            base = max(base, measure(client, echo_path, op, n, args.seconds, True))
                        rows.append((client, opname, n, ours, base))
                        print(f"  {client:4} {opname:5} x{n}: {ours:9.0f}/s vs echo {base:9.0f}/s",
                              file=sys.stderr)
            for op, opname in ((READ, "READ"), (WRITE, "WRITE")):
                ours = base = 0.0
                for _ in range(args.rounds):
                    interrupts.checkpoint()
                    ours = max(ours, measure("embedded", d, op, 1, args.seconds, False))
                    base = max(base, measure("embedded", d, op, 1, args.seconds, True))
                rows.append(("pyxs, server embedded", opname, 1, ours, base))
                print(f"  embedded {opname:5} x1: {ours:9.0f}/s vs echo {base:9.0f}/s",
                      file=sys.stderr)
        finally:
            for p in servers:
                if p.pid is not None:  # started
                    p.terminate()
                    p.join()
            benchlib.reap_children()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="XenStore round trips per second of the simulated host's xenstored "
        "against a baseline: a bare Python Unix-socket echo server, with the same clients "
        "(pyxs, and the thinnest raw socket client), each in a process of its own, measured "
        "in the same run.  Prints a Markdown table with xenstored / echo for each client, "
        "operation and number of clients and writes bench/results/xenstore.md; then runs "
        "bench/evtchn_bench.py (the event channels), so that one run covers the simulated "
        "host.",
        epilog=benchlib.EPILOG)
    parser.add_argument("--seconds", type=benchlib.seconds, default=1.0,
                        help="seconds of each measurement (default: %(default)s)")
    parser.add_argument("--rounds", type=benchlib.at_least(1), default=3,
                        help="rounds of each measurement, the best counts "
                             "(default: %(default)s)")
    parser.add_argument("--clients", type=benchlib.at_least(1), default=8,
                        help="client processes of the many-clients rows (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true",
                        help="print the tables only: no bench/results/xenstore.md, nor "
                             "evtchn.md")
    parser.add_argument("--no-evtchn", action="store_true",
                        help="skip the event-channel part (bench/evtchn_bench.py)")
    parser.add_argument("--evtchn-rounds", type=benchlib.at_least(1), metavar="N",
                        help="timed round trips of each event-channel run, its --rounds: "
                             "fewer for a shorter run (default: evtchn_bench.py's)")
    args = parser.parse_args(argv)
    return benchlib.run("xenstore_bench", lambda interrupts: _bench(args, interrupts),
                        failure=BenchError)


def _bench(args: argparse.Namespace, interrupts: benchlib.Interrupts) -> int:
    rows = _measure_all(args, interrupts)
    interrupts.checkpoint()
    pyxs_echo_1 = {op: base for c, op, n, _o, base in rows if c == "pyxs" and n == 1}
    raw_echo_1 = next(base for c, op, n, _o, base in rows if c == "raw" and n == 1)
    lines = [
        "# XenStore benchmark",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()};"
        f" best of {args.rounds} interleaved runs of {args.seconds:g} s;"
        " server and clients in separate processes, except for the embedded rows (server"
        " thread in the client's process, as in the tests and the demo).",
        "",
        "| client | op | clients | xenstored round trips/s | echo round trips/s "
        "| xenstored / echo |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for client, opname, n, ours, base in rows:
        lines.append(f"| {client} | {opname} | {n} | {ours:,.0f} | {base:,.0f} "
                     f"| {ours / base:.0%} |")
    lines += [
        "",
        "Echo = bare Python Unix-socket echo server (selector loop, sends back what it"
        " receives); the raw client sends it 16-byte requests, pyxs gets its own packets back."
        " pyxs writes header and payload separately and the echo server answers each part as"
        " it arrives, so pyxs wakes twice per echoed reply but once per xenstored reply, which"
        " waits for the whole request: that is how xenstored can beat echo with pyxs.",
        f"pyxs READ through xenstored vs the 16-byte raw echo limit (one client):"
        f" {rows[0][3] / raw_echo_1:.0%}"
        f" (pyxs's own cost included: pyxs vs echo is {pyxs_echo_1['READ'] / raw_echo_1:.0%}).",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(table)
    if not args.no_evtchn:
        # A process of its own: it needs the "fork" start method for itself.
        evtchn = Path(__file__).with_name("evtchn_bench.py")
        extra = [] if args.evtchn_rounds is None else ["--rounds", str(args.evtchn_rounds)]
        if args.no_write:
            extra.append("--no-write")
        # A stop is its to take, and to say so: this process waits for it.
        try:
            return interrupts.call([sys.executable, str(evtchn), *extra])
        except OSError as exc:  # it could not be started (a stop wins: raised)
            raise BenchError(f"cannot run {evtchn.name}: {exc}") from None
    return 0


if __name__ == "__main__":
    benchlib.stay_stopped()
    sys.exit(main())
