"""``pvcalls-backend``: run the PV Calls backend, or watch it work in a demo.

``pvcalls-backend demo``
    Everything in one process on an embedded simulated Xen host: the
    backend, and two guests.  Guest 1 fetches a page from an HTTP server on
    the host through PV Calls; guest 2 runs an echo server that a host
    client reaches through the guest's passive PV Calls socket.  Prints
    where each socket ran and how many bytes it moved.

``pvcalls-backend serve --platform sim --run-dir DIR``
    Serve the guests of a running ``xenback-sim --run-dir DIR`` host as its
    domain 0 (``--platform xen``: a real dom0).  SIGTERM, SIGINT or SIGHUP
    (unless started ignored: nohup, a script's background job) closes
    every frontend cleanly and exits 0.  Under a systemd ``Type=notify``
    unit (``contrib/systemd/``) it says when it is ready and when it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.server
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]

logger = logging.getLogger(__name__)


# -- the demo ------------------------------------------------------------------

_PAGE = (
    b"<!doctype html>\n<title>Hello from the host</title>\n"
    b"<p>This page left the host through a real TCP socket of the PV Calls backend\n"
    b"and reached the guest through Xen shared memory.</p>\n"
)


class _PageHandler(http.server.BaseHTTPRequestHandler):
    """Serves one small page; quiet (the demo prints its own story)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(_PAGE)))
        self.end_headers()
        self.wfile.write(_PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http server: " + format, *args)


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def _http_get(fe: Any, host: str, port: int) -> tuple[Any, str, bytes]:
    """GET / over a new PV Calls socket: ``(socket, status line, body)``.

    The socket is left open (the server has closed its end) so that the
    backend still lists it when the demo prints its statistics.
    """
    s = fe.socket()
    s.settimeout(10)
    s.connect((host, port))
    s.sendall(f"GET / HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
    with s.makefile("rb") as f:
        status = f.readline().decode("latin-1").strip()
        while f.readline() not in (b"\r\n", b"\n", b""):
            pass  # headers
        body = f.read()
    return s, status, body


class _EchoServer(threading.Thread):
    """Guest 2's echo server: a thread per connection, echo until EOF."""

    def __init__(self, listener: Any) -> None:
        super().__init__(name="demo-echo", daemon=True)
        self.listener = listener
        self.errors: list[BaseException] = []
        self.conns: list[threading.Thread] = []

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # listener closed: the demo is over
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            t.start()
            self.conns.append(t)

    def _echo(self, conn: Any) -> None:
        try:
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)
        except BaseException as exc:  # reported by the main thread
            self.errors.append(exc)


def _echo_client(address: tuple[str, int], message: bytes) -> tuple[socket.socket, bool]:
    """Send ``message`` to the guest's echo server from the host and check
    the echo; the connection stays open for the statistics."""
    client = socket.create_connection(address, timeout=10)
    sender = threading.Thread(target=client.sendall, args=(message,), daemon=True)
    sender.start()
    echoed = bytearray()
    while len(echoed) < len(message):
        chunk = client.recv(65536)
        if not chunk:
            break
        echoed += chunk
    sender.join(10)
    return client, bytes(echoed) == message


def _passive_address(backend: Any, domid: int, sock_id: int) -> tuple[str, int]:
    """The host address of a guest's listening socket, from the backend's
    statistics (PV Calls does not tell the guest the port it got)."""
    for row in backend.stats().sockets:
        if row.domain == domid and row.id == sock_id and row.address is not None:
            host, port = row.address
            return str(host), int(port)
    raise RuntimeError(f"backend has no listening socket {sock_id:#x} of domain {domid}")


def _print_stats(stats: Any, names: Mapping[int, str], out: Any) -> None:
    """The socket table of a :class:`pvcalls.BackendStats` snapshot."""
    print("\nSockets in the backend (CPU = the ioworker CPU the socket is bound to):", file=out)
    print(f"  {'guest':<8} {'socket id':<20} {'kind':<8} {'CPU':>3}  "
          f"{'guest->host':>11}  {'host->guest':>11}", file=out)
    for row in sorted(stats.sockets, key=lambda r: (r.domain, r.id)):
        print(
            f"  {names.get(row.domain, str(row.domain)):<8} {row.id:#018x}   {row.kind:<8} "
            f"{'-' if row.cpu is None else row.cpu:>3}  "
            f"{_fmt_bytes(row.bytes_out):>11}  {_fmt_bytes(row.bytes_in):>11}",
            file=out,
        )
    counts = ", ".join(f"CPU {c.cpu}: {c.sockets}" for c in stats.cpus if c.online)
    print(f"Active sockets per ioworker CPU: {counts}", file=out)


def demo(args: argparse.Namespace, out: Any = None) -> int:
    """Run the demo; returns the exit status."""
    from xenback.sim import SimHost

    try:
        host = SimHost().start()
    except OSError as exc:
        # Where it runs is wrong, not the demo: a TMPDIR too deep for the
        # names of the host's sockets, no room or descriptors left.
        # start() took down what it had made.
        print(f"pvcalls-backend: demo: cannot start the simulated host: {exc}",
              file=sys.stderr)
        return 1
    with contextlib.closing(host):
        return _demo_on(host, args, out or sys.stdout)


def _demo_on(host: Any, args: argparse.Namespace, out: Any) -> int:
    """The demo on a started :class:`xenback.sim.SimHost`; its exit status."""
    import pvcalls

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="demo-http", daemon=True).start()
    web_host, web_port = str(httpd.server_address[0]), int(httpd.server_address[1])
    try:
        with pvcalls.Backend(
            host.dom0, max_ioworkers=args.max_ioworkers, max_page_order=args.max_page_order
        ) as backend:
            print(f"Simulated Xen host in {host.run_dir}; PV Calls backend running in domain 0.",
                  file=out, flush=True)
            guest1 = host.create_domain("guest1")
            guest2 = host.create_domain("guest2")
            names = {0: "dom0", guest1.domid: "guest1", guest2.domid: "guest2"}
            with pvcalls.Frontend(guest1) as fe1, pvcalls.Frontend(guest2) as fe2:
                # Guest 1: a web client.
                page_sock, status, body = _http_get(fe1, web_host, web_port)
                print(f"guest1 (domain {guest1.domid}): GET http://{web_host}:{web_port}/ "
                      f"-> {status!r}, {len(body)} bytes", file=out, flush=True)

                # Guest 2: an echo server behind a passive PV Calls socket.
                listener = fe2.socket()
                listener.bind(("127.0.0.1", 0))
                listener.listen()
                addr = _passive_address(backend, guest2.domid, listener.id)
                server = _EchoServer(listener)
                server.start()
                print(f"guest2 (domain {guest2.domid}): echo server listening; the backend "
                      f"holds its host socket at {addr[0]}:{addr[1]}", file=out, flush=True)
                clients = []
                ok = True
                for size in (10_000, 300_000, 2_000_000):
                    message = os.urandom(size)
                    client, same = _echo_client(addr, message)
                    clients.append(client)
                    ok = ok and same
                    print(f"host client -> guest2 -> host client: {_fmt_bytes(size)} sent, "
                          f"echoed back {'identical' if same else 'DIFFERENT'}",
                          file=out, flush=True)
                # Statistics while every connection is still open.
                _print_stats(backend.stats(), names, out)
                for client in clients:
                    client.close()
                page_sock.close()
                listener.close()
                server.join(10)
                for t in server.conns:
                    t.join(10)
                if server.errors:
                    raise server.errors[0]
                if not ok or status.split()[1:2] != ["200"]:
                    print("demo FAILED", file=out, flush=True)
                    return 1
            print("\nGuests disconnected; backend stopped cleanly.", file=out, flush=True)
    finally:
        httpd.shutdown()
        httpd.server_close()
    return 0


# -- serve -----------------------------------------------------------------------

def _log_stats(stats: Any) -> None:
    """Log a :class:`pvcalls.BackendStats` snapshot, one line per socket."""
    counts = ", ".join(f"CPU {c.cpu}: {c.sockets}" for c in stats.cpus if c.online)
    logger.warning("%d frontends, %d sockets; active sockets per CPU: %s",
                   stats.frontends, len(stats.sockets), counts)
    for row in stats.sockets:
        # The device too: two frontends of one domain use the same ids.
        logger.warning("  dom%d dev%d %#x %s cpu=%s out=%d in=%d %s", row.domain, row.device,
                       row.id, row.kind,
                       "-" if row.cpu is None else row.cpu, row.bytes_out, row.bytes_in,
                       "" if row.address is None else f"{row.address[0]}:{row.address[1]}")


def _open_platform(args: argparse.Namespace, error: Callable[[str], Any]) -> Any:
    from xenback.platform import PlatformUnavailable

    if args.platform == "sim":
        from xenback.sim import attach

        if args.run_dir is None:
            error("--platform sim needs --run-dir DIR (the run directory of xenback-sim)")
        try:
            exists, is_dir = args.run_dir.exists(), args.run_dir.is_dir()
        except OSError as exc:  # a name too long, a directory we may not search
            error(f"--run-dir {args.run_dir}: {exc.strerror}")
        if exists and not is_dir:
            error(f"--run-dir {args.run_dir}: not a directory")
        if not is_dir:
            error(f"--run-dir {args.run_dir}: no such directory (is xenback-sim running?)")
        try:
            return attach(args.run_dir, 0)
        except PlatformUnavailable as exc:
            if exc.errno in _SHORT_OF_RESOURCES:
                raise  # for serve(): no host missing, and worth a restart
            error(f"--run-dir {args.run_dir}: cannot join the simulated host as domain 0 "
                  f"(is xenback-sim running there?): {exc}")
    from xenback.xen import open as open_xen

    try:
        return open_xen()
    except PlatformUnavailable as exc:
        if exc.errno in _SHORT_OF_RESOURCES:
            raise  # for serve(): no Xen missing, and worth a restart
        error(f"cannot open the Xen platform: {exc}")


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Serve until SIGTERM, SIGINT or SIGHUP (or the host goes); returns the exit
    status.  ``parser`` (serve's) tells what stops it from starting."""
    import pvcalls
    from pvcalls._policy import Policy, PolicyError
    from xenback.hostlock import HostLockHeld
    from xenback.platform import EventChannelError, GrantError

    from ._sdnotify import Notifier

    error = parser.error
    service_manager = Notifier(os.environ.get("NOTIFY_SOCKET"))
    policy = None
    if args.policy is not None:
        try:
            policy = Policy.from_file(args.policy)
        except PolicyError as exc:  # names the file, and what is wrong where
            # The read's OSError is the cause (see from_file()): a shortage
            # there is no bad file.
            failed = exc.__cause__
            if isinstance(failed, OSError) and failed.errno in _SHORT_OF_RESOURCES:
                _exit_short_of_resources(parser, "read the policy file", failed)
            error(f"--policy {exc}")
    # The signals are blocked before any thread starts, so that every thread
    # inherits the block and the main thread alone takes them, with
    # sigwait().  With handlers instead, the kernel may deliver a signal to
    # any thread; the handler then waits for the main thread's next bytecode,
    # which never comes while it sleeps in a wait that nothing else ends.
    # SIGUSR2 is how the thread watching the XenStore connection wakes us.
    signals = {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}
    # SIGHUP (its terminal closed) and SIGINT stop it as SIGTERM does,
    # unless ignored: that is what nohup asked for, and what a shell
    # asks of a script's background job (Ctrl-C is for the foreground
    # command).  A blocked signal is queued even when ignored, so sigwait()
    # would take it: those are left out.
    for stop_signal in (signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(stop_signal) is not signal.SIG_IGN:
            signals.add(stop_signal)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    status = 0
    # stop_lock orders the watcher's SIGUSR2 before our stopping.set().
    stop_lock = threading.Lock()
    stopping = threading.Event()
    try:
        try:
            platform = _open_platform(args, error)
        except OSError as exc:
            # The expected failures are error()s already, but for a
            # shortage; anything else goes on as the surprise it is.
            if exc.errno in _SHORT_OF_RESOURCES:
                _exit_short_of_resources(parser, "open the platform", exc)
            raise
        try:
            backend = pvcalls.Backend(
                platform,
                max_ioworkers=args.max_ioworkers,
                max_page_order=args.max_page_order,
                policy=policy,
            )
        except HostLockHeld as exc:
            # Whoever holds it, serve or a script of its own: two backends
            # would both answer every frontend's handshake and fight over
            # its devices (the one without a policy serving guests the
            # other's refuses).
            error(f"another pvcalls-backend (pid {'?' if exc.pid is None else exc.pid}) "
                  f"serves this host already; it holds {exc.path}")
        except OSError as exc:
            if exc.errno in _SHORT_OF_RESOURCES:
                # Whatever failed for it: the XenStore connection's socket
                # as well.
                _exit_short_of_resources(parser, "start serving the host's guests", exc)
            if isinstance(exc, ConnectionError | GrantError | EventChannelError):
                # XenStore refused us or hung up, or the simulated
                # hypervisor did (Xen's device nodes failing to open are
                # PlatformUnavailable): the host went between joining it
                # and starting on it.  As a missing host, one line, not a
                # traceback.  The backend released what it took.
                error(f"cannot start serving the host's guests (is the host gone?): {exc}")
            # Not the host: a lock file its run directory refuses, a device
            # node we may not open.  The error says which; a guess at the
            # host would only mislead.
            error(f"cannot start serving the host's guests: {exc}")
        with backend:
            logger.warning("pvcalls backend serving domain %d's guests (%s platform); "
                           "SIGUSR1 logs its sockets, SIGTERM stops it",
                           platform.domid, args.platform)
            main_thread = threading.get_ident()

            def wake_on_lost_connection() -> None:
                # Blocked here for the life of the process if the connection
                # stays up: a daemon thread, and serve() runs once.
                backend.connection_lost.wait()
                with stop_lock:  # not once we stopped: see finally
                    if not stopping.is_set():
                        signal.pthread_kill(main_thread, signal.SIGUSR2)

            threading.Thread(target=wake_on_lost_connection, name="xenstore-watcher",
                             daemon=True).start()
            # systemd takes us as started now, not once forked: units
            # ordered after ours (guests that need PV Calls) start now.
            n = backend.nr_ioworkers
            service_manager.notify(
                "READY=1", f"STATUS=serving domain {platform.domid}'s guests, "
                           f"{n} ioworker{'' if n == 1 else 's'}")
            while True:
                signum = signal.sigwait(signals)
                if signum == signal.SIGUSR1:
                    _log_stats(backend.stats())
                elif signum != signal.SIGUSR2:
                    why = f"{signal.Signals(signum).name}: closing every frontend"
                    logger.warning("%s", why)
                    service_manager.notify("STOPPING=1", f"STATUS={why}")
                    break
                elif backend.connection_lost.is_set():
                    logger.error("lost the XenStore connection (is the host gone?): "
                                 "there is nobody left to serve")
                    # Stopping of our own accord: systemd's status says why.
                    service_manager.notify(
                        "STOPPING=1", "STATUS=lost the XenStore connection (is the host gone?)")
                    status = 1
                    break
        logger.warning("pvcalls backend stopped")
    finally:
        # The connection may go while the backend closes (the host stopping
        # with us): no SIGUSR2 from now on, and one sent already is taken
        # here, or restoring the mask would deliver it, and its default
        # action is to terminate the process.
        with stop_lock:
            stopping.set()
        # So is a SIGTERM or SIGINT that came while we stopped (Ctrl-C
        # pressed twice): it asks for what is done, and once unblocked it
        # would kill the process (SIGTERM, as SIGUSR1 would) or raise
        # KeyboardInterrupt.
        while signal.sigtimedwait(signals, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return status


# -- arguments ---------------------------------------------------------------------

def _positive_int(text: str) -> int:
    # Decimal ASCII digits only: int() would also take " 5", "1_0" and "５".
    # A minus sign is let through, so that "-1" is told it is too small
    # rather than that it is not a whole number.
    digits = text.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    try:
        value = int(text)
    except ValueError:
        # More digits than int() converts (sys.get_int_max_str_digits()):
        # argparse would say "invalid _positive_int value".
        raise argparse.ArgumentTypeError(
            f"{text} is too {'small' if text.startswith('-') else 'large'}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _page_order(text: str) -> int:
    from ._wire import MAX_PAGE_ORDER_LIMIT

    value = _positive_int(text)
    if value > MAX_PAGE_ORDER_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{value} is above {MAX_PAGE_ORDER_LIMIT}, the most one indexes page can describe"
        )
    return value


def _policy_file(text: str) -> Path:
    # Path("") is the current directory: an unset $POLICY would be read
    # as ".", and told "Is a directory".
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    return Path(text)


# Why a start may fail that a later one would not: the process's or the
# system's descriptors, memory, room in the run directory.
_SHORT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC,
                                 errno.EDQUOT})


def _exit_short_of_resources(parser: argparse.ArgumentParser, what: str,
                             exc: OSError) -> NoReturn:
    """Exit 1: what the host lacks now it may have again later, the one
    start failure a supervisor's restart may cure."""
    parser.exit(1, f"{parser.prog}: error: cannot {what} "
                   f"(short of resources, worth a restart): {exc}\n")


# What a supervisor needs to know (contrib/systemd's unit restarts on the
# ones a restart may cure; its test reads this).
_SERVE_EXIT_STATUSES = """\
exit status:
  0    stopped by SIGTERM, SIGINT or SIGHUP, every frontend closed
  1    lost the XenStore connection (the host went away), short (or the
       simulated host short) of descriptors, memory or disk space as it
       started, or failed with a traceback
  2    bad options, no host, a bad policy file, a lock file the run directory
       refuses, or another backend serving the host: started again, it would
       fail the same way
  130  SIGINT before serving (as it starts, or while it reads the policy file)
"""


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the sub-parsers by command (for their errors)."""
    from xenback.sim import run_dir_argument

    from ._backend import DEFAULT_MAX_IOWORKERS
    from ._nc import LOG_LEVELS
    from ._wire import DEFAULT_MAX_PAGE_ORDER

    def common(parser: argparse.ArgumentParser, *, defaults: bool) -> argparse.ArgumentParser:
        # The options common to the commands go before the command or
        # after it.  The sub-parsers' copies default to nothing: argparse
        # sets what a sub-parser's namespace holds over what was parsed
        # before it, so their defaults would undo an option given first.
        def default(value: object) -> object:
            return value if defaults else argparse.SUPPRESS

        parser.add_argument("--log-level", default=default("WARNING"), type=str.upper,
                            choices=LOG_LEVELS,
                            help="logging threshold (default: WARNING, which also shows "
                                 "what serve's SIGUSR1 logs)")
        parser.add_argument("--max-ioworkers", type=_positive_int,
                            default=default(DEFAULT_MAX_IOWORKERS), metavar="N",
                            help=f"at most N ioworker CPUs (default: {DEFAULT_MAX_IOWORKERS})")
        parser.add_argument("--max-page-order", type=_page_order,
                            default=default(DEFAULT_MAX_PAGE_ORDER), metavar="ORDER",
                            help="largest data ring a frontend may use, 2**ORDER pages "
                                 f"(default: {DEFAULT_MAX_PAGE_ORDER}; Linux needs 4)")
        return parser

    p = common(argparse.ArgumentParser(
        prog="pvcalls-backend",
        description="Xen PV Calls backend: guests' socket calls served by host sockets.",
    ), defaults=True)
    options = common(argparse.ArgumentParser(add_help=False), defaults=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", parents=[options], help="two guests on an embedded simulated host",
                       description="Run the backend and two guests on an embedded simulated host.")
    s = sub.add_parser("serve", parents=[options], help="serve the guests of a host",
                       description="Serve every pvcalls device of a host until SIGTERM, "
                                   "SIGINT or SIGHUP.",
                       epilog=_SERVE_EXIT_STATUSES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--platform", choices=["sim", "xen"], required=True,
                   help="sim: join a xenback-sim host; xen: a real dom0")
    s.add_argument("--run-dir", type=run_dir_argument, help="run directory of the xenback-sim host")
    s.add_argument("--policy", type=_policy_file, metavar="FILE",
                   help="TOML access policy (per-domain connect/bind rules, socket limits)")
    return p, {"demo": d, "serve": s}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pvcalls-backend`` console script."""
    from .frontend import FRONTEND_RING_ORDER

    p, commands = _parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from xenback.sim import stdio_problem  # the demo's host is simulated anyway

        if args.max_page_order < FRONTEND_RING_ORDER:
            commands["demo"].error(
                f"argument --max-page-order: {args.max_page_order} is below "
                f"{FRONTEND_RING_ORDER}, the ring order of the demo's guests (Linux's)")
        if stdio_problem(sys.stdout, writing=True) is not None:
            # Descriptor 1 closed (>&-): print() would write nothing, and
            # the demo end with 0 having shown nothing.  Open only for
            # reading (1</dev/null), its first print() would fail midway.
            commands["demo"].error("standard output must be open for writing (the demo's "
                                   "output is what it shows)")
        return _run_demo(args)
    serve_parser = commands["serve"]
    if args.platform == "xen" and args.run_dir is not None:
        serve_parser.error("--run-dir only applies to --platform sim")
    try:
        return serve(args, serve_parser)
    except KeyboardInterrupt:
        # Only before serve() blocks SIGINT for sigwait(): while it reads
        # the policy (a FIFO, a slow disk).  Nothing is up yet to close.
        print("pvcalls-backend: interrupted before serving", file=sys.stderr)
        return 128 + signal.SIGINT


class _OutputGone(BaseException):
    """Whoever read the demo's output went away (``| head``).  Not an
    OSError: the demo's own sockets fail with BrokenPipeError too, and
    that is a demo gone wrong, told as such."""


class _OutputFailed(BaseException):
    """The demo's output could not be written (a full disk, /dev/full):
    not an OSError, for the reason :class:`_OutputGone` is not one."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class _Output:
    """The demo's standard output, raising :class:`_OutputGone` when its
    reader went away, :class:`_OutputFailed` when it fails otherwise."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            raise _OutputGone from None
        except OSError as exc:
            raise _OutputFailed(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise _OutputGone from None
        except OSError as exc:
            raise _OutputFailed(exc) from None


class _Terminated(BaseException):
    """SIGTERM or SIGHUP during the demo, raised in the main thread like
    KeyboardInterrupt, so that its ``with`` blocks take the simulated host
    (and its run directory) down on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _run_demo(args: argparse.Namespace) -> int:
    from xenback.sim import stdio_to_devnull  # the demo's host is simulated anyway

    def stop(signum: int, frame: Any) -> None:
        # Once: a second signal (Ctrl-C pressed twice) raised in the with
        # blocks' clean-up that the first started would cut it short, and
        # leave the simulated host and its run directory.
        for taken in old:
            signal.signal(taken, signal.SIG_IGN)
        raise KeyboardInterrupt if signum == signal.SIGINT else _Terminated(signum)

    # SIGHUP (its terminal closed) as serve takes it.  SIGINT and SIGHUP
    # not if ignored: a shell's background job, nohup.
    old: dict[int, Any] = {}  # filled as taken: stop() may run at once
    try:
        old[signal.SIGTERM] = signal.signal(signal.SIGTERM, stop)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            old[signal.SIGINT] = signal.signal(signal.SIGINT, stop)
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
            old[signal.SIGHUP] = signal.signal(signal.SIGHUP, stop)
        return demo(args, None if sys.stdout is None else _Output(sys.stdout))
    except _OutputGone:
        # Quietly, with a shell's status for SIGPIPE, as pvcalls-nc.
        stdio_to_devnull(sys.stdout)
        return 128 + signal.SIGPIPE
    except _OutputFailed as exc:
        stdio_to_devnull(sys.stdout)
        print(f"pvcalls-backend: cannot write the demo's output: "
              f"{exc.error.strerror or exc.error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pvcalls-backend: demo interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except _Terminated as exc:
        said = "hung up" if exc.signum == signal.SIGHUP else "terminated"
        print(f"pvcalls-backend: demo {said}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        for signum, handler in old.items():
            if handler is not None:
                signal.signal(signum, handler)
