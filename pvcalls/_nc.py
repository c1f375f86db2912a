"""``pvcalls-nc``: a guest-side netcat for the simulated host.

It joins a running simulated host (``xenback-sim --run-dir DIR``) as guest
domain ``--domid``, connects its ``pvcalls`` frontend to the backend
(``pvcalls-backend serve --platform sim --run-dir DIR``), and pipes standard
input and output through one PV Calls connection::

    echo hello | pvcalls-nc --run-dir DIR --domid 1 127.0.0.1 8080
    pvcalls-nc --run-dir DIR --domid 1 -l 9000      # accept one connection

PV Calls cannot half-close a connection, so end of input is not passed on:
the tool keeps printing what arrives until the other side closes, or, with
``-q SECS``, until nothing arrived for SECS seconds after end of input.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .frontend import Frontend, PVSocket

__all__ = ["main"]

logger = logging.getLogger(__name__)

_CHUNK = 64 * 1024
#: Domain ids from here up are reserved (DOMID_FIRST_RESERVED): no guest has one.
_DOMID_LIMIT = 0x7FF0


def _domid(text: str) -> int:
    """A guest domain id: dom0 is the backend's, and it cannot be its own guest."""
    try:
        domid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a domain id") from None
    if not 0 < domid < _DOMID_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{text} is not a guest domain id (1 to {_DOMID_LIMIT - 1})"
        )
    return domid


def _seconds(text: str) -> float:
    """A time in seconds that the waits can take: NaN would never compare
    as over, and past threading.TIMEOUT_MAX Event.wait() raises."""
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pvcalls-nc",
        description="Pipe stdin/stdout through a PV Calls connection of a simulated guest.",
    )
    p.add_argument("--run-dir", required=True, type=Path, help="run directory of the xenback-sim host")
    p.add_argument("--domid", required=True, type=_domid, help="guest domain to act as (not 0)")
    p.add_argument("-l", "--listen", action="store_true", help="listen on PORT and accept one connection")
    p.add_argument(
        "-q",
        "--quit-after",
        type=_seconds,
        default=None,
        metavar="SECS",
        help="after end of input, quit once nothing arrived for SECS seconds",
    )
    p.add_argument(
        "-w", "--wait", type=_seconds, default=None, metavar="SECS", help="timeout for connect/accept"
    )
    p.add_argument("-v", "--verbose", action="store_true",
                   help="say on stderr when listening, connected and done")
    p.add_argument("--log-level", default="WARNING", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: WARNING")
    p.add_argument("host", nargs="?", metavar="HOST",
                   help="IPv4 address to connect to (with -l: to listen on, default 0.0.0.0)")
    p.add_argument("port", metavar="PORT", help="TCP port")
    return p


def _parse_address(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, int]:
    host, port_text = args.host, args.port
    if host is None:
        if not args.listen:
            p.error("give HOST PORT to connect to (or -l [HOST] PORT to listen)")
        host = "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        p.error(f"port {port_text!r} is not a number")
    if not 0 <= port <= 65535 or (port == 0 and not args.listen):
        p.error(f"port {port} is out of range")
    return host, port


class _Failed(Exception):
    """A failure already put in words for the one-line error message."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def _at(host: str, port: int) -> Iterator[None]:
    """Name the address in the errors of connecting or binding to it:
    getaddrinfo()'s "Name or service not known" does not say which name."""
    try:
        yield
    except socket.gaierror as exc:
        raise _Failed(f"{host}:{port}: {exc.strerror}") from None
    except OSError as exc:
        raise _Failed(f"{host}:{port}: {exc}") from None


class _Pump(threading.Thread):
    """Socket -> stdout until end of stream; remembers when data last came."""

    def __init__(self, sock: PVSocket, out: BinaryIO) -> None:
        super().__init__(name="pvcalls-nc-recv", daemon=True)
        self.sock = sock
        self.out = out
        self.last = time.monotonic()
        self.done = threading.Event()
        self.stopping = False  # set before we close the socket under it

    def run(self) -> None:
        view = memoryview(bytearray(_CHUNK))
        try:
            while (n := self.sock.recv_into(view)) > 0:
                self.last = time.monotonic()
                self.out.write(view[:n])
                self.out.flush()
        except OSError as exc:
            if not self.stopping:
                logger.error("receive failed: %s", exc)
        finally:
            self.done.set()


def _say(args: argparse.Namespace, message: str) -> None:
    if args.verbose:
        print(f"pvcalls-nc: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, host: str, port: int, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Join the host, connect or accept, and pipe until the other side
    closes (or, with ``-q``, the connection idles after end of input)."""
    from xenback.sim import attach

    domain = attach(args.run_dir, args.domid)
    with Frontend(domain) as fe, fe.socket() as s:
        s.settimeout(args.wait)
        if args.listen:
            with _at(host, port):
                s.bind((host, port))
            s.listen(1)
            _say(args, f"listening on {host}:{port} (in the backend's domain)")
            conn, _ = s.accept()
            _say(args, "connection accepted")
        else:
            with _at(host, port):
                s.connect((host, port))
            _say(args, f"connected to {host}:{port}")
            conn = s
        with conn:
            conn.settimeout(None)
            pump = _Pump(conn, stdout)
            pump.start()
            while not pump.done.is_set():
                data = os.read(stdin.fileno(), _CHUNK)
                if not data:
                    break
                conn.sendall(data)
            if args.quit_after is None:
                pump.done.wait()
            else:
                while not pump.done.wait(args.quit_after):
                    if time.monotonic() - pump.last >= args.quit_after:
                        break
            pump.stopping = True
        pump.join()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    host, port = _parse_address(p, args)
    logging.basicConfig(level=args.log_level, format="pvcalls-nc: %(levelname)s %(message)s")
    try:
        return run(args, host, port, sys.stdin.buffer, sys.stdout.buffer)
    except KeyboardInterrupt:
        return 130
    except _Failed as exc:
        print(f"pvcalls-nc: {exc}", file=sys.stderr)
        return exc.status
    except (OSError, TimeoutError) as exc:
        print(f"pvcalls-nc: {exc}", file=sys.stderr)
        return 1
