"""``pvcalls-nc``: a guest-side netcat for the simulated host.

It joins a running simulated host (``xenback-sim --run-dir DIR``) as guest
domain ``--domid``, connects its ``pvcalls`` frontend to the backend
(``pvcalls-backend serve --platform sim --run-dir DIR``), and pipes standard
input and output through one PV Calls connection::

    echo hello | pvcalls-nc --run-dir DIR --domid 1 127.0.0.1 8080
    pvcalls-nc --run-dir DIR --domid 1 -l 9000      # accept one connection

Several may run as one guest at once: each adds a pvcalls device of its own.

PV Calls cannot half-close a connection, so end of input is not passed on:
the tool keeps printing what arrives until the other side closes, or, with
``-q SECS``, until nothing arrived for SECS seconds after end of input.  The
other side closing ends it at once, even while input is still open.

Exit status: 0 when the other side closed (or ``-q`` expired); 1 when
anything failed (receiving, sending, reading input, writing output, the
backend or the host going away), said in one line on stderr; 2 for a usage
error; 141 when whoever read the output went away, and 130, 143 and 129
for SIGINT, SIGTERM and SIGHUP (its terminal closed): a shell's statuses for
a tool killed by those signals, but the tool closes its connection and
device first, quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import logging
import math
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from xenback.platform import DOMID_FIRST_RESERVED

from .frontend import Frontend, PVSocket
from .frontend._common import host_bytes, resolve

__all__ = ["main"]

_CHUNK = 64 * 1024
#: The exit status a shell reports for a command killed by SIGPIPE.
_STATUS_SIGPIPE = 128 + signal.SIGPIPE
#: The --log-level choices, pvcalls-backend's too.
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
#: How many pvcalls-nc may run as one guest at once (a device each).
_MAX_DEVICES = 64


def _is_decimal(text: str) -> bool:
    """Whether ``text`` is ASCII decimal digits, after a minus sign maybe:
    "-1" is a number, too small, and told so rather than that it is not
    a number (as pvcalls-backend tells it)."""
    digits = text.removeprefix("-")
    return digits.isascii() and digits.isdigit()


def _small(text: str) -> int | None:
    """The magnitude of ``text`` (:func:`_is_decimal`), None if it has
    more than 9 significant digits: far above any domain id or port, and
    int() refuses more than sys.get_int_max_str_digits() with a ValueError
    (a traceback for a port, "invalid _domid value" from argparse for a
    domid).  The caller checks the sign."""
    digits = text.removeprefix("-").lstrip("0") or "0"
    return int(digits) if len(digits) <= 9 else None


def _domid(text: str) -> int:
    """A guest domain id: dom0 is the backend's, and it cannot be its own guest."""
    # Decimal ASCII digits only: int() would also take " 5", "1_0" and "５".
    if not _is_decimal(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a domain id")
    domid = _small(text)
    if domid is None or text.startswith("-") or not 0 < domid < DOMID_FIRST_RESERVED:
        raise argparse.ArgumentTypeError(
            f"{text} is not a guest domain id (1 to {DOMID_FIRST_RESERVED - 1})"
        )
    return domid


def _seconds(text: str) -> float:
    """A time in seconds that the waits can take: NaN would never compare
    as over, and past threading.TIMEOUT_MAX the socket's waits raise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds (0 or more)")
    if value > threading.TIMEOUT_MAX:
        raise argparse.ArgumentTypeError(
            f"{text} is too long (at most {threading.TIMEOUT_MAX:g} seconds)"
        )
    return value


def _timeout(text: str) -> float:
    """A -w timeout: as :func:`_seconds`, but more than 0.  A socket's
    timeout of 0 makes it non-blocking, and connect and accept would fail
    at once (EINPROGRESS, or EAGAIN "no connection pending"), not time out."""
    value = _seconds(text)
    if not value:
        raise argparse.ArgumentTypeError(f"{text} is not more than 0 seconds")
    return value



_EXIT_STATUSES = """\
exit status:
  0    the other side closed the connection (or -q SECS passed)
  1    anything failed (receiving, sending, reading input, writing output,
       the backend or the host going away), said in one line on stderr
  2    a usage error
  129  SIGHUP (its terminal closed), having closed its connection first
  130  SIGINT, the same
  141  whoever read its output went away
  143  SIGTERM, having closed its connection first
"""


def _parser() -> argparse.ArgumentParser:
    from xenback.sim import run_dir_argument

    p = argparse.ArgumentParser(
        prog="pvcalls-nc",
        description="Pipe stdin/stdout through a PV Calls connection of a simulated guest.",
        epilog=_EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", required=True, type=run_dir_argument,
                   help="run directory of the xenback-sim host")
    p.add_argument("--domid", required=True, type=_domid, help="guest domain to act as (not 0)")
    p.add_argument("-l", "--listen", action="store_true",
                   help="listen on PORT and accept one connection")
    p.add_argument(
        "-q",
        "--quit-after",
        type=_seconds,
        default=None,
        metavar="SECS",
        help="after end of input, quit once nothing arrived for SECS seconds",
    )
    p.add_argument(
        "-w", "--wait", type=_timeout, default=None, metavar="SECS",
        help="timeout for connect/accept (more than 0)"
    )
    p.add_argument("-v", "--verbose", action="store_true",
                   help="say on stderr when listening and when connected")
    p.add_argument("--log-level", default="WARNING", type=str.upper,
                   choices=LOG_LEVELS, help="default: WARNING")
    p.add_argument("host", nargs="?", metavar="HOST",
                   help="IPv4 address or host name to connect to "
                        "(with -l: to listen on, default 0.0.0.0)")
    p.add_argument("port", metavar="PORT", help="TCP port, 1-65535")
    return p


def _parse_address(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, int]:
    host, port_text = args.host, args.port
    if host is None:
        if not args.listen:
            p.error("give HOST PORT to connect to (or -l [HOST] PORT to listen)")
        host = "0.0.0.0"
    # Encoded as the frontend will: a name that cannot be (or a byte of
    # the command line that was not UTF-8) would otherwise be a TypeError
    # once the guest is up, and a traceback.
    try:
        host_bytes(host)
    except TypeError:
        p.error(f"host {host!r} is not a valid host name")
    if not _is_decimal(port_text):  # as _domid
        p.error(f"port {port_text!r} is not a number")
    port = _small(port_text)
    if port == 0 and args.listen:
        # The backend's kernel would pick a port, but a BIND's answer
        # carries no address: the listener could never be found.
        p.error(f"port {port_text}: the guest would never learn the port the backend "
                "picks; give one (1-65535)")
    if port is None or port_text.startswith("-") or port == 0 or port > 65535:
        p.error(f"port {port_text} is out of range")
    return host, port


class _Failed(Exception):
    """A failure already put in words for the one-line error message
    (``None``: nothing to say), and the exit status it calls for."""

    def __init__(self, message: str | None, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@contextlib.contextmanager
def _at(host: str, port: int) -> Iterator[None]:
    """Name the address in a failure to resolve it: getaddrinfo()'s "Name
    or service not known" does not say which name.  (The frontend's own
    errors of connect() and bind() name it already.)"""
    try:
        yield
    except socket.gaierror as exc:
        raise _Failed(f"{host}:{port}: {exc.strerror}") from None


@contextlib.contextmanager
def _within(what: str, wait: float | None) -> Iterator[None]:
    """Say what ran out of the -w time: a socket's TimeoutError says only
    "timed out"."""
    try:
        yield
    except TimeoutError:
        after = "" if wait is None else f" after {wait:g} s (-w)"
        raise _Failed(f"{what} timed out{after}") from None


class _Pump(threading.Thread):
    """Socket -> stdout until end of stream.  Remembers when data last
    came and how the stream ended (``failure``).  ``done_r`` hangs up when
    it is over, for the main thread to poll along with stdin; closing it is
    up to the main thread."""

    def __init__(self, sock: PVSocket, out_fd: int) -> None:
        super().__init__(name="pvcalls-nc-recv", daemon=True)
        self.sock = sock
        self.out_fd = out_fd
        self.done_r, self._done_w = os.pipe2(os.O_CLOEXEC)
        self.last = time.monotonic()
        self.failure: _Failed | None = None
        self.stopping = False  # set before we close the socket under it

    def run(self) -> None:
        view = memoryview(bytearray(_CHUNK))
        try:
            while True:
                try:
                    n = self.sock.recv_into(view)
                except OSError as exc:
                    if not self.stopping:
                        self.failure = _Failed(f"receive failed: {exc}")
                    return
                if n == 0:
                    return
                self.last = time.monotonic()
                try:
                    _write_all(self.out_fd, view[:n])
                except BrokenPipeError:
                    # Whoever read our output is gone, as with `| head`:
                    # quit quietly, with a shell's status for SIGPIPE.
                    self.failure = _Failed(None, _STATUS_SIGPIPE)
                    return
                except OSError as exc:
                    self.failure = _Failed(f"writing standard output: {exc}")
                    return
        finally:
            os.close(self._done_w)


def _write_all(fd: int, data: memoryview) -> None:
    # os.write(), not the BufferedWriter of sys.stdout: a daemon thread
    # blocked in it, holding its lock, would make flushing it at exit fail.
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            # Another program set O_NONBLOCK on the pipe or terminal we
            # share: it is full, not broken.  Wait until it takes more (or
            # its reader goes: POLLERR, and the next write says EPIPE).
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll()


class _Signalled(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: leave, through the with blocks that
    release the socket and close the device.  Dying of the signal would
    leave both, and the host TCP connection, to the backend."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _SignalGate:
    """Where SIGINT, SIGTERM and SIGHUP may interrupt pvcalls-nc.

    Raised from the handler, :class:`_Signalled` lands wherever the main
    thread is.  In a XenStore request (joining the host, the handshake,
    removing the device) that can leave half a message on the connection
    (pyxs sends a header and its payload in two calls): XenStore then
    drops the connection and the device stays behind.  In the middle of
    the clean-up a first signal started, it cuts that short.  So it is
    raised only while the gate is :meth:`opened` (the socket calls and
    the piping, whose waits are safe to leave by an exception), and only
    once; a signal at any other time is kept in ``pending``, raised when
    the gate opens, or else reported once everything is closed.
    """

    def __init__(self) -> None:
        self.pending: int | None = None
        self._open = False
        # The read end of signal.set_wakeup_fd()'s pipe while installed():
        # see _wait_readable.
        self.wake_fd: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Take SIGINT, SIGTERM and SIGHUP through this gate (not those
        ignored: that is what nohup, or a shell starting a background job,
        asked for), with a wake-up pipe; all as before on the way out."""
        self.wake_fd, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        previous_wake = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, self.handler)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(previous_wake)
            os.close(self.wake_fd)
            os.close(wake_w)
            self.wake_fd = None

    def handler(self, signum: int, frame: object) -> None:
        if self.pending is None:
            self.pending = signum  # the first one says how we end
        if self._open:
            self._open = False  # once: not again in the clean-up it starts
            raise _Signalled(self.pending)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Inside :meth:`opened`, keep a signal pending through the body,
        then raise it: around what threading does under a Condition
        (Thread.start() waits on one), whose wait a handler's exception
        can leave without its lock, failing with 'release unlocked lock'
        instead of the signal."""
        was, self._open = self._open, False
        try:
            yield
        finally:
            self._open = was
        if was:
            self._raise_pending()

    @contextlib.contextmanager
    def opened(self) -> Iterator[None]:
        self._open = True
        try:
            # A signal kept from before (or come just now) is raised here.
            self._raise_pending()
            yield
        finally:
            self._open = False

    def _raise_pending(self) -> None:
        """Raise the signal kept, if any, with the gate closed (once)."""
        if self.pending is not None:
            self._open = False
            raise _Signalled(self.pending)


def _say(args: argparse.Namespace, message: str) -> None:
    if args.verbose:
        print(f"pvcalls-nc: {message}", file=sys.stderr, flush=True)


def _wait_readable(fds: list[int], timeout: float | None, wake_fd: int | None) -> set[int]:
    """Those of ``fds`` that are readable (or hung up), waiting up to
    ``timeout`` seconds; empty after the timeout or a signal.

    ``wake_fd`` is watched too: a signal that comes just before poll()
    blocks (after the interpreter last looked for signals) makes it
    readable, so poll() returns and the signal's handler runs at once,
    rather than when something else wakes us up.
    """
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    if wake_fd is not None:
        poller.register(wake_fd, select.POLLIN)
    # poll() takes at most 2**31 - 1 ms; the callers wait again if need be.
    ms = None if timeout is None else min(timeout * 1000, 2**31 - 1)
    ready = {fd for fd, _ in poller.poll(ms)}
    if wake_fd in ready:
        with contextlib.suppress(BlockingIOError):
            os.read(wake_fd, 64)
        ready.discard(wake_fd)
    return ready


def _send_input(conn: PVSocket, stdin_fd: int, done_r: int,
                wake_fd: int | None) -> _Failed | None:
    """stdin -> socket until end of input or until the pump is done
    (``done_r`` hangs up): waiting for both, so that the other side
    closing ends the tool even while stdin stays open.  Returns why
    sending failed, if it did."""
    while True:
        ready = _wait_readable([stdin_fd, done_r], None, wake_fd)
        if done_r in ready:
            return None
        if stdin_fd not in ready:
            continue
        try:
            data = os.read(stdin_fd, _CHUNK)
        except OSError as exc:
            raise _Failed(f"reading standard input: {exc}") from None
        if not data:
            return None
        try:
            conn.sendall(data)
        except OSError as exc:
            # As OpenBSD's nc: stop sending, but print what still arrives.
            return _Failed(f"send failed: {exc}")


def _linger(pump: _Pump, quit_after: float | None, wake_fd: int | None) -> None:
    """After input ends, wait for the other side to close or, with -q,
    for ``quit_after`` seconds in which nothing arrived."""
    eof = time.monotonic()
    while True:
        left = None
        if quit_after is not None:
            left = max(pump.last, eof) + quit_after - time.monotonic()
            if left <= 0:
                return
        if _wait_readable([pump.done_r], left, wake_fd):
            return


def _claim_devid(run_dir: Path, domid: int) -> tuple[socket.socket, int]:
    """A pvcalls device id of guest ``domid`` that no other pvcalls-nc
    uses, and the socket that holds it for as long as it is open.

    Each pvcalls-nc needs a device of its own: the toolstack re-adds one
    that is there, which takes it from under the pvcalls-nc using it (a
    listener and a client as one guest, as two nc on one machine).  The
    claim is a name in Linux's abstract socket namespace: taking it is
    atomic, and it goes with its process, however that ends (a device
    left behind by a killed pvcalls-nc is then simply added afresh).
    """
    host = hashlib.sha256(os.fsencode(os.path.realpath(run_dir))).hexdigest()[:32]
    for devid in range(_MAX_DEVICES):
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            claim.bind(f"\0pvcalls-nc/{host}/{domid}/{devid}")
        except OSError as exc:
            claim.close()
            if exc.errno == errno.EADDRINUSE:
                continue
            raise _Failed(f"cannot claim a pvcalls device of domain {domid}: {exc}") from None
        return claim, devid
    raise _Failed(f"{_MAX_DEVICES} pvcalls-nc run as domain {domid} already: "
                  "it has no pvcalls device left")


def run(args: argparse.Namespace, host: str, port: int, stdin: BinaryIO, stdout: BinaryIO,
        gate: _SignalGate | None = None) -> int:
    """Join the host, connect or accept, and pipe until the other side
    closes (or, with ``-q``, the connection idles after end of input).
    Raises :class:`_Failed` for a failure it put in words, else the
    OSError of the call that failed (joining the host, the handshake's
    TimeoutError, a refused connect), which says what; SIGINT, SIGTERM
    and SIGHUP interrupt it only where ``gate`` lets them (see _SignalGate)."""
    from xenback.sim import attach

    gate = gate or _SignalGate()
    # As serve says it: attach() would say there is no such domain on a
    # host in that directory, as if the host were there.
    try:
        exists, is_dir = args.run_dir.exists(), args.run_dir.is_dir()
    except OSError as exc:  # a name too long, a directory we may not search
        raise _Failed(f"--run-dir {args.run_dir}: {exc.strerror}") from None
    if not is_dir:
        raise _Failed(f"--run-dir {args.run_dir}: " + (
            "not a directory" if exists else "no such directory (is xenback-sim running?)"))
    # Looked up here, in the guest, as the frontend would at connect() or
    # bind(), but before the device is added: a name that does not resolve
    # is said at once, not after a handshake (10 s with no backend serving).
    # In the open gate, as it was in connect(): a signal while a slow
    # resolver answers ends the run then, before the guest joins.
    with gate.opened(), _at(host, port):
        address = resolve((host, port))
    domain = attach(args.run_dir, args.domid)
    claim, devid = _claim_devid(args.run_dir, args.domid)
    # Signals wait while Frontend() adds the device and does the handshake
    # (up to its 10 s timeout), and while it closes and removes the device.
    # The claim is let go only once the device is gone.
    with claim, Frontend(domain, devid=devid) as fe, gate.opened(), fe.socket() as s:
        s.settimeout(args.wait)
        if args.listen:
            s.bind(address)
            s.listen(1)
            _say(args, f"listening on {host}:{port} (in the backend's domain)")
            with _within(f"waiting for a connection on {host}:{port}", args.wait):
                conn, _ = s.accept()
            # One connection, as nc -l: stop listening, or the next client's
            # connect would succeed into the backlog and its data be lost.
            s.close()
            _say(args, "connection accepted")
        else:
            with _within(f"connect to {host}:{port}", args.wait):
                s.connect(address)
            _say(args, f"connected to {host}:{port}")
            conn = s
        with conn:
            conn.settimeout(None)
            pump = _Pump(conn, stdout.fileno())
            try:
                with gate.held():
                    pump.start()
                send_failure = _send_input(conn, stdin.fileno(), pump.done_r, gate.wake_fd)
                _linger(pump, args.quit_after, gate.wake_fd)
            finally:
                # However we leave, the pump's recv() failing on the socket
                # closed under it is no news.
                pump.stopping = True
                os.close(pump.done_r)
        pump.join()
    # Both sides failed: the receiving side's failure is the one reported
    # (141 and no message if whoever read our output went away, as in a
    # shell pipeline whose reader quit).
    failure = pump.failure or send_failure
    if failure is not None:
        raise failure
    return 0


def main(argv: list[str] | None = None) -> int:
    from xenback.sim import stdio_problem

    if sys.stderr is None:
        # Descriptor 2 is closed (2>&-): messages go nowhere, rather than
        # to stdout, into the data (print(file=None) writes there), or into
        # whatever the frontend opens next, which would take number 2.
        sys.stderr = open(os.devnull, "w")  # for the life of the process
    p = _parser()
    args = p.parse_args(argv)
    host, port = _parse_address(p, args)
    # Before the guest joins: closed, the frontend's next descriptors would
    # take their numbers; open only the other way, the first read or write
    # would fail (EBADF) once the connection was made.
    for name, stream, writing in (("input", sys.stdin, False), ("output", sys.stdout, True)):
        unusable = stdio_problem(stream, writing=writing)
        if unusable is not None:
            p.error(f"standard {name} must be open for {'writing' if writing else 'reading'}: "
                    f"{unusable}")
    logging.basicConfig(level=args.log_level, format="pvcalls-nc: %(levelname)s %(message)s")
    gate = _SignalGate()
    with gate.installed():
        try:
            status, message = run(args, host, port, sys.stdin.buffer, sys.stdout.buffer,
                                  gate), None
        except _Signalled as exc:
            status, message = 128 + exc.signum, None
        except _Failed as exc:
            status, message = exc.status, exc.message
        except (OSError, TimeoutError) as exc:
            status, message = 1, str(exc)
    if gate.pending is not None:
        # Quietly, as the shell's own status for it, also when the signal
        # was held back until the clean-up was over (what failed meanwhile
        # is most likely its doing).
        return 128 + gate.pending
    if message is not None:
        print(f"pvcalls-nc: {message}", file=sys.stderr)
    return status
