"""pvcalls-nc as a guest of a xenback-sim daemon served by pvcalls-backend:
how it ends (the other side closes, the backend or the host goes away, a
signal, a broken stdout) and what it says then."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pyxs
from scripts import helper_path
from test_cli import FAULTHANDLER_ENV, TIMEOUT, Lines, reap, run_daemon, script, unused_port

from pvcalls import _nc

# Runs its arguments with SIGINT's and SIGHUP's default actions: a test run
# in the background of a shell ignores SIGINT, one run under nohup ignores
# SIGHUP, and their children would too.
_SIGNALS_DEFAULT = [
    sys.executable, "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "signal.signal(signal.SIGHUP, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])",
]


@dataclasses.dataclass
class Guest:
    """A simulated host with one guest, and a backend serving it."""

    run_dir: Path
    domid: int
    host: subprocess.Popen[bytes]  # xenback-sim
    backend: subprocess.Popen[bytes]  # pvcalls-backend serve
    log: Lines  # the backend's stderr

    def nc(self, *args: str, interruptible: bool = False,
           **popen: Any) -> subprocess.Popen[bytes]:
        """Start pvcalls-nc as this guest; stdio are pipes unless given.
        ``interruptible``: with SIGINT and SIGHUP not ignored, whatever we
        inherited."""
        for stream in ("stdin", "stdout", "stderr"):
            popen.setdefault(stream, subprocess.PIPE)
        popen.setdefault("env", FAULTHANDLER_ENV)
        return subprocess.Popen(
            [*(_SIGNALS_DEFAULT if interruptible else []), *script("pvcalls-nc"),
             "--run-dir", str(self.run_dir), "--domid", str(self.domid), *args],
            **popen,
        )


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    run_dir = tmp_path / "run"
    with run_daemon(run_dir) as (host, domid):
        backend = subprocess.Popen(
            [*script("pvcalls-backend"), "serve", "--platform", "sim", "--run-dir", str(run_dir),
             "--log-level", "INFO"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            log = Lines(backend.stderr)
            log.wait_for("serving")
            yield Guest(run_dir, domid, host, backend, log)
        finally:
            backend.send_signal(signal.SIGTERM)
            try:
                backend.wait(TIMEOUT)
            finally:
                reap(backend)


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """A host TCP server for the guest to connect to."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(TIMEOUT)
        yield sock


def address(sock: socket.socket) -> list[str]:
    host, port = sock.getsockname()
    return [host, str(port)]


def finish(nc: subprocess.Popen[bytes]) -> tuple[int, bytes, bytes]:
    """Wait for ``nc`` to exit by itself (a stdin pipe is left open until
    then): its status, stdout and stderr."""
    try:
        nc.wait(TIMEOUT)
        out, err = nc.communicate(timeout=TIMEOUT)
    finally:
        reap(nc)
    return nc.returncode, out, err


def connect(guest: Guest, server: socket.socket, *args: str,
            **popen: Any) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start pvcalls-nc ARGS to ``server``: it and the host's end of its connection."""
    nc = guest.nc(*args, *address(server), **popen)
    try:
        conn, _ = server.accept()
    except BaseException:
        reap(nc)
        raise
    return nc, conn


def connected(guest: Guest, server: socket.socket,
              **popen: Any) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """As :func:`connect`, and wait until pvcalls-nc's connect() returned
    too (the host accepts before the backend's answer reaches the guest):
    stderr then holds only what comes after."""
    nc, conn = connect(guest, server, "-v", **popen)
    assert nc.stderr is not None
    if b"connected to" not in nc.stderr.readline():
        conn.close()
        reap(nc)
        pytest.fail("pvcalls-nc did not connect")
    return nc, conn


def assert_closed(conn: socket.socket) -> None:
    """The guest's connection ends (the backend let it go)."""
    conn.settimeout(TIMEOUT)
    try:
        assert conn.recv(1) == b""
    except ConnectionResetError:
        pass


def stdin_of(kind: str) -> int:
    return subprocess.PIPE if kind == "open" else subprocess.DEVNULL


# "a..b": a malformed name is the resolver's to refuse, as an unknown one
# (it used to end in a UnicodeError traceback).
@pytest.mark.parametrize("name", ["no-such-host.invalid", "a..b"])
def test_unknown_host_is_named(guest: Guest, name: str) -> None:
    nc = guest.nc("-w", "10", name, "80", stdin=subprocess.DEVNULL)
    status, _, err = finish(nc)
    assert status == 1
    assert err.decode().startswith(f"pvcalls-nc: {name}:80: ")
    assert err.count(b"\n") == 1


@pytest.mark.parametrize("listen", [False, True], ids=["connect", "listen"])
def test_an_unknown_host_is_named_before_the_guest_joins(tmp_path: Path, listen: bool) -> None:
    # With no backend serving, it used to add its device and wait 10 s for
    # a handshake, then blame the backend: the name was looked up last.
    run_dir = tmp_path / "run"
    with run_daemon(run_dir) as (_, domid), pyxs.Client(
            unix_socket_path=str(run_dir / "xenstored" / "socket")) as xs:
        nc = subprocess.run(
            [*script("pvcalls-nc"), "--run-dir", str(run_dir), "--domid", str(domid),
             *(["-l"] if listen else []), "no-such-host.invalid", "80"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT, env=FAULTHANDLER_ENV)
        assert nc.returncode == 1
        assert nc.stderr.decode().startswith("pvcalls-nc: no-such-host.invalid:80: ")
        assert nc.stderr.count(b"\n") == 1
        # No device was ever added for it.
        assert b"pvcalls" not in xs.list(f"/local/domain/{domid}/device".encode())


@pytest.mark.parametrize("stdin", ["open", "at end"])
def test_other_side_closing_ends_it(guest: Guest, server: socket.socket, stdin: str) -> None:
    nc, conn = connect(guest, server, stdin=stdin_of(stdin))
    with conn:
        conn.sendall(b"bye")
    status, out, err = finish(nc)
    assert (status, out, err) == (0, b"bye", b"")


@pytest.mark.parametrize("stdin", ["open", "at end"])
@pytest.mark.parametrize(("stopped", "why"), [
    ("backend", "the PV Calls backend went away"),
    ("host", "lost XenStore (is the host gone?)"),
])
def test_losing_the_backend_or_the_host_is_an_error(
        guest: Guest, server: socket.socket, stdin: str, stopped: str, why: str) -> None:
    nc, conn = connected(guest, server, stdin=stdin_of(stdin))
    with conn:
        proc = guest.backend if stopped == "backend" else guest.host
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        status, _, err = finish(nc)
        if stopped == "backend":
            assert_closed(conn)
    assert status == 1
    assert err.decode() == f"pvcalls-nc: receive failed: [Errno {errno.ENOTCONN}] {why}\n"


def test_closed_stdout_pipe_ends_it_quietly(guest: Guest, server: socket.socket) -> None:
    # As a tool killed by SIGPIPE, but with its connection closed cleanly.
    r, w = os.pipe()
    os.close(r)
    try:
        nc, conn = connect(guest, server, stdin=subprocess.DEVNULL, stdout=w)
    finally:
        os.close(w)
    with conn:
        conn.sendall(b"for nobody")
        status, _, err = finish(nc)
        assert_closed(conn)
    assert (status, err) == (141, b"")


def test_stdout_error_is_reported(guest: Guest, server: socket.socket) -> None:
    with open("/dev/full", "wb") as full:
        nc, conn = connect(guest, server, stdin=subprocess.DEVNULL, stdout=full)
    with conn:
        conn.sendall(b"too much")
        status, _, err = finish(nc)
        assert_closed(conn)
    assert status == 1
    assert err.decode() == (
        f"pvcalls-nc: writing standard output: [Errno {errno.ENOSPC}] "
        f"{os.strerror(errno.ENOSPC)}\n"
    )


def test_non_blocking_stdout_loses_nothing(guest: Guest, server: socket.socket) -> None:
    # Another program may have set O_NONBLOCK on the pipe or terminal that
    # is our stdout: a full pipe is then EAGAIN, which must mean "wait".
    data = os.urandom(1_000_000)
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        try:
            nc, conn = connect(guest, server, stdin=subprocess.DEVNULL, stdout=w)
        finally:
            os.close(w)
        with conn:
            threading.Thread(target=conn.sendall, args=(data,), daemon=True).start()
            # Read nothing until the pipe is full, pvcalls-nc facing EAGAIN.
            capacity = fcntl.fcntl(r, fcntl.F_GETPIPE_SZ)
            deadline = time.monotonic() + TIMEOUT
            while int.from_bytes(fcntl.ioctl(r, termios.FIONREAD, bytes(4)),
                                 sys.byteorder) < capacity:
                assert time.monotonic() < deadline, "the pipe never filled"
                time.sleep(0.01)
            got = bytearray()
            while len(got) < len(data) and (chunk := os.read(r, 65536)):
                got += chunk
        status, _, err = finish(nc)
        assert (status, err) == (0, b"")
        assert got == data
    finally:
        os.close(r)


def test_quit_after_idling(guest: Guest, server: socket.socket) -> None:
    nc, conn = connect(guest, server, "-q", "0.1", stdin=subprocess.DEVNULL)
    with conn:
        status, out, err = finish(nc)  # although the other side stays
        assert_closed(conn)
    assert (status, out, err) == (0, b"", b"")


@pytest.mark.parametrize(("signum", "status"),
                         [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_closes_the_connection(
    guest: Guest, server: socket.socket, signum: int, status: int
) -> None:
    nc, conn = connected(guest, server, interruptible=True)  # stdin stays open
    assert nc.stdout is not None and nc.stderr is not None
    with conn:
        try:
            conn.sendall(b"ping")
            assert nc.stdout.read(4) == b"ping"  # it is piping
            nc.send_signal(signum)
            returncode = nc.wait(TIMEOUT)
        finally:
            reap(nc)
        err = nc.stderr.read()
        assert (returncode, err.decode()) == (status, ""), err.decode()  # quietly
        assert_closed(conn)
    guest.log.wait_for("pvcalls frontend disconnected")


def test_refused_connection_names_the_address_once(guest: Guest) -> None:
    port = unused_port()  # nobody listens there
    nc = guest.nc("127.0.0.1", str(port), stdin=subprocess.DEVNULL)
    status, _, err = finish(nc)
    assert status == 1
    assert err.decode() == (
        f"pvcalls-nc: [Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)} "
        f"(connect to 127.0.0.1:{port})\n"
    )


def test_closed_stderr_keeps_messages_out_of_the_output(guest: Guest,
                                                        server: socket.socket) -> None:
    # With descriptor 2 closed, Python leaves sys.stderr None, and
    # print(file=None) writes to stdout: the error message went into the
    # data.  Without a place for messages, the exit status tells.
    def nc_without_stderr(*args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["sh", "-c", 'exec "$@" 2>&-', "sh", *script("pvcalls-nc"),
             "--run-dir", str(guest.run_dir), "--domid", str(guest.domid), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )

    refused = nc_without_stderr("-v", "127.0.0.1", str(unused_port()))
    assert finish(refused)[:2] == (1, b"")
    nc = nc_without_stderr("-v", *address(server))
    try:
        conn, _ = server.accept()
    except BaseException:
        reap(nc)
        raise
    with conn:
        conn.sendall(b"only this")
    assert finish(nc)[:2] == (0, b"only this")


def test_closed_stderr_keeps_messages_out_of_the_output_of_main_itself(tmp_path: Path) -> None:
    # As above, for main() run without the console script's wrapper (which
    # takes care of a closed stderr too): python -c, as a script's caller.
    done = subprocess.run(
        ["sh", "-c", 'exec "$@" 2>&-', "sh", sys.executable, "-c",
         "import sys; from pvcalls._nc import main; sys.exit(main())",
         "--run-dir", str(tmp_path / "none"), "--domid", "1", "127.0.0.1", "80"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, timeout=TIMEOUT)
    assert (done.returncode, done.stdout) == (1, b"")


def test_accept_timeout_says_what_timed_out(guest: Guest) -> None:
    port = unused_port()
    nc = guest.nc("-w", "0.1", "-l", "127.0.0.1", str(port), stdin=subprocess.DEVNULL)
    status, _, err = finish(nc)
    assert (status, err.decode()) == (
        1, f"pvcalls-nc: waiting for a connection on 127.0.0.1:{port} timed out after 0.1 s "
           "(-w)\n")


def test_connect_timeout_says_what_timed_out(guest: Guest) -> None:
    # A listener whose backlog is full: Linux drops further SYNs.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued = [socket.socket() for _ in range(4)]
        try:
            for sock in queued:
                sock.setblocking(False)
                sock.connect_ex(full.getsockname())
            with socket.socket() as probe:
                probe.settimeout(0.5)
                try:
                    probe.connect(full.getsockname())
                    pytest.skip("this host accepts beyond a full backlog")
                except TimeoutError:
                    pass
            host, port = address(full)
            nc = guest.nc("-w", "0.5", host, port, stdin=subprocess.DEVNULL)
            status, _, err = finish(nc)
        finally:
            for sock in queued:
                sock.close()
    assert (status, err.decode()) == (
        1, f"pvcalls-nc: connect to {host}:{port} timed out after 0.5 s (-w)\n")


def test_listen_takes_one_connection(guest: Guest) -> None:
    # As nc -l: once it accepted, it stops listening.  A second host client
    # must be refused, not queued behind the first and its data dropped.
    port = unused_port()
    nc = guest.nc("-v", "-l", "127.0.0.1", str(port))
    try:
        said = Lines(nc.stderr)
        said.wait_for("listening on")
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as first:
            said.wait_for("connection accepted")
            # Its RELEASE of the listener is answered after a moment.  A
            # client that lands in the backlog just as the listener closes
            # is reset: that too is a refusal, only not the final one.
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
                except ConnectionRefusedError:
                    break
                except ConnectionResetError:
                    pass
                assert time.monotonic() < deadline, "still listening after the accept"
                time.sleep(0.01)
            first.sendall(b"still here")
            assert nc.stdout is not None and nc.stdout.read(10) == b"still here"
        assert nc.wait(TIMEOUT) == 0
    finally:
        reap(nc)


def test_two_at_once_as_one_guest(guest: Guest) -> None:
    # As two nc on one machine: a listener and a client that reaches it,
    # both the same guest.  Each takes a device of its own; the second
    # used to take the first's (the toolstack re-adds a device that is
    # there), and the first died with "the PV Calls backend went away".
    port = unused_port()
    listener = guest.nc("-v", "-q", "0.5", "-l", "127.0.0.1", str(port))
    client = None
    try:
        Lines(listener.stderr).wait_for("listening on")
        client = guest.nc("-v", "127.0.0.1", str(port))
        Lines(client.stderr).wait_for("connected to")
        assert listener.stdin is not None and client.stdin is not None
        assert listener.stdout is not None and client.stdout is not None
        client.stdin.write(b"ping")
        client.stdin.flush()
        assert listener.stdout.read(4) == b"ping"
        listener.stdin.write(b"pong")
        listener.stdin.close()  # it quits 0.5 s later, closing the connection
        assert client.stdout.read() == b"pong"
        assert (listener.wait(TIMEOUT), client.wait(TIMEOUT)) == (0, 0)
    finally:
        reap(listener)
        if client is not None:
            reap(client)


def test_a_device_id_is_claimed_until_let_go(tmp_path: Path) -> None:
    first, devid = _nc._claim_devid(tmp_path, 1)
    with first:
        second, other = _nc._claim_devid(tmp_path, 1)
        with second:
            assert (devid, other) == (0, 1)
            # Per host and per guest.
            for run_dir, domid in ((tmp_path / "other", 1), (tmp_path, 2)):
                third, free = _nc._claim_devid(run_dir, domid)
                with third:
                    assert free == 0
    again, devid = _nc._claim_devid(tmp_path, 1)
    with again:
        assert devid == 0
        # The host, however its run directory is spelled (a symbolic link).
        (tmp_path.parent / f"{tmp_path.name}-link").symlink_to(tmp_path)
        linked, other = _nc._claim_devid(tmp_path.parent / f"{tmp_path.name}-link", 1)
        with linked:
            assert other == 1


def test_no_device_id_left_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_nc, "_MAX_DEVICES", 1)
    claim, _ = _nc._claim_devid(tmp_path, 1)
    with claim, pytest.raises(_nc._Failed) as info:
        _nc._claim_devid(tmp_path, 1)
    assert info.value.message == ("1 pvcalls-nc run as domain 1 already: "
                                  "it has no pvcalls device left")


@pytest.mark.parametrize(("redirect", "message"), [
    ("<&-", "standard input must be open for reading: it is closed"),
    (">&-", "standard output must be open for writing: it is closed"),
    # Python opens descriptors 0 and 1 as stdin and stdout whatever their
    # mode: the first read or write failed with EBADF, once the guest had
    # joined and the connection was made.
    ("0>/dev/null", "standard input must be open for reading: it is open only for writing"),
    ("1</dev/null", "standard output must be open for writing: it is open only for reading"),
])
def test_unusable_stdin_or_stdout_is_a_usage_error(tmp_path: Path, redirect: str,
                                                    message: str) -> None:
    # No host runs in tmp_path: said before joining one, or it would say that.
    nc = subprocess.run(
        ["sh", "-c", f'exec "$@" {redirect}', "sh", *script("pvcalls-nc"),
         "--run-dir", str(tmp_path), "--domid", "1", "127.0.0.1", "80"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, timeout=TIMEOUT,
    )
    assert nc.returncode == 2
    assert nc.stderr.endswith(f"pvcalls-nc: error: {message}\n")


def wait_for_node(xs: pyxs.Client, path: str, ok: Callable[[bytes | None], bool]) -> None:
    """Wait (on a XenStore watch) until the value at ``path`` is ``ok``."""
    def value() -> bytes | None:
        try:
            node: bytes = xs.read(path.encode())
        except pyxs.PyXSError:
            return None
        return node

    deadline = time.monotonic() + TIMEOUT
    with xs.monitor() as monitor:
        monitor.watch(path.encode(), b"test")
        while not ok(value()):
            monitor.events.get(timeout=max(0.0, deadline - time.monotonic()))


# pvcalls-nc with SIGTERM arriving just after the toolstack added its device,
# before add_device() returned it: a signal in the middle of joining.
_SIGNAL_IN_ADD_DEVICE = """
import os, signal, sys
from xenback.sim._toolstack import Toolstack
from pvcalls._nc import main

add_device = Toolstack.add_device

def add_device_then_signal(self, *args, **kwargs):
    device = add_device(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here
    return device

Toolstack.add_device = add_device_then_signal
sys.exit(main(sys.argv[1:]))
"""


def test_signals_leave_no_device_behind(tmp_path: Path) -> None:
    # A signal while pvcalls-nc joins, and a second one while it cleans up:
    # neither may leave its device in XenStore.  The test plays the backend.
    run_dir = tmp_path / "run"
    with run_daemon(run_dir) as (_, domid), \
            pyxs.Client(unix_socket_path=str(run_dir / "xenstored" / "socket")) as xs:
        backend = f"/local/domain/0/backend/pvcalls/{domid}/0"
        frontend = f"/local/domain/{domid}/device/pvcalls/0"
        nc = subprocess.Popen(
            [sys.executable, "-c", _SIGNAL_IN_ADD_DEVICE, "--run-dir", str(run_dir),
             "--domid", str(domid), "127.0.0.1", "80"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=FAULTHANDLER_ENV,
        )
        try:
            wait_for_node(xs, f"{backend}/state", lambda value: value is not None)
            for key, value in [("versions", b"1"), ("max-page-order", b"4"),
                               ("function-calls", b"1"), ("state", b"2")]:  # InitWait
                xs.write(f"{backend}/{key}".encode(), value)
            wait_for_node(xs, f"{frontend}/state", lambda value: value == b"3")  # Initialised
            xs.write(f"{backend}/state".encode(), b"4")  # Connected
            # The held-back SIGTERM now closes it: Closing, waiting for us.
            wait_for_node(xs, f"{frontend}/state", lambda value: value == b"5")
            nc.send_signal(signal.SIGTERM)
            xs.write(f"{backend}/state".encode(), b"6")  # Closed
            assert nc.wait(TIMEOUT) == 143
        finally:
            reap(nc)
        assert nc.stderr is not None and nc.stderr.read() == b""
        for path in (f"/local/domain/0/backend/pvcalls/{domid}",
                     f"/local/domain/{domid}/device/pvcalls", f"/libxl/{domid}"):
            with pytest.raises(pyxs.PyXSError):
                xs.read(path.encode())




# A signal that another thread takes (or that comes just before poll()
# blocks) runs its handler in the main thread only when the main thread
# next runs Python code: pvcalls-nc's waits watch signal.set_wakeup_fd()'s
# pipe, so that its handler runs, and stops it, at once.
_SIGNAL_WHILE_WAITING = """
import os, signal, sys, threading, time
sys.path[:0] = sys.argv[1:]
from racewindow import stands_at
from pvcalls._nc import _wait_readable

class Stop(Exception):
    pass

def handler(signum, frame):
    raise Stop

signal.signal(signal.SIGUSR1, handler)
wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
never, _ = os.pipe()
main = threading.get_ident()
main_wchan = f"/proc/self/task/{threading.get_native_id()}/wchan"

def signal_from_here():
    while not stands_at(main, _wait_readable, "poller.poll("):
        threading.Event().wait(0.001)
    # Asleep in the system call, not about to enter it: a signal now is
    # seen only through the wakeup fd (a fixed nap hoped for that).
    deadline = time.monotonic() + 10
    while True:
        with open(main_wchan) as wchan:
            if "poll" in wchan.read():
                break
        if time.monotonic() > deadline:
            sys.stderr.write("the main thread never slept in poll()\\n")
            os._exit(3)
        threading.Event().wait(0.001)
    signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # to this thread

threading.Thread(target=signal_from_here).start()
try:
    _wait_readable([never], None, wake_r)
except Stop:
    print("stopped")
"""


def test_a_signal_taken_by_another_thread_ends_a_wait() -> None:
    done = subprocess.run([sys.executable, "-c", _SIGNAL_WHILE_WAITING, *helper_path()],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert (done.returncode, done.stdout) == (0, "stopped\n"), done.stderr


def test_a_wait_longer_than_poll_takes_is_no_error() -> None:
    # -q accepts up to threading.TIMEOUT_MAX seconds; poll() takes 2**31 - 1 ms.
    from pvcalls._nc import _wait_readable

    r, w = os.pipe()
    try:
        os.write(w, b"x")
        assert _wait_readable([r], threading.TIMEOUT_MAX, None) == {r}
    finally:
        os.close(r)
        os.close(w)


def test_a_signal_s_wake_up_byte_is_taken_not_returned() -> None:
    from pvcalls._nc import _wait_readable

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    never, never_w = os.pipe()
    try:
        os.write(wake_w, bytes([signal.SIGTERM]))  # as signal.set_wakeup_fd() writes it
        assert _wait_readable([never], 10, wake_r) == set()  # as after a timeout
        with pytest.raises(BlockingIOError):
            os.read(wake_r, 1)  # taken: the next wait waits
    finally:
        for fd in (wake_r, wake_w, never, never_w):
            os.close(fd)


def test_an_idle_connection_outlasts_the_connect_timeout(guest: Guest,
                                                         server: socket.socket) -> None:
    # -w is for connect and accept only: piping waits for as long as it takes.
    nc, conn = connect(guest, server, "-w", "0.1", stdin=subprocess.DEVNULL)
    with conn:
        threading.Event().wait(0.3)  # idle, longer than -w
        conn.sendall(b"late")
    assert finish(nc) == (0, b"late", b"")


def test_an_unreadable_stdin_is_an_error(tmp_path: Path) -> None:
    # Reading stdin failing ends the tool at once, although the other side
    # stays.  (A directory: Python refuses one as its stdin, not os.read().)
    fd = os.open(tmp_path, os.O_RDONLY)
    done_r, done_w = os.pipe()
    try:
        with pytest.raises(_nc._Failed) as info:
            _nc._send_input(None, fd, done_r, None)  # type: ignore[arg-type]
        assert info.value.message == (
            f"reading standard input: [Errno {errno.EISDIR}] {os.strerror(errno.EISDIR)}")
    finally:
        for each in (fd, done_r, done_w):
            os.close(each)


def test_a_failed_send_stops_sending_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """As OpenBSD's nc: sending failed, but the connection may still
    deliver; the failure is said once the other side closes."""
    r, w = os.pipe()
    done_r, done_w = os.pipe()
    try:
        os.write(w, b"input")

        class Conn:
            def sendall(self, data: bytes) -> None:
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        failure = _nc._send_input(Conn(), r, done_r, None)  # type: ignore[arg-type]
        assert failure is not None and failure.status == 1
        assert failure.message == f"send failed: [Errno {errno.EPIPE}] Broken pipe"
    finally:
        for fd in (r, w, done_r, done_w):
            os.close(fd)


class _FakeConn:
    """A PV Calls socket's stand-in for run(): connects at once; recv_into
    raises ``recv_error``, or says the end of the stream."""

    def __init__(self, recv_error: OSError | None = None) -> None:
        self.recv_error = recv_error

    def __enter__(self) -> _FakeConn:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def settimeout(self, timeout: float | None) -> None:
        pass

    def connect(self, address: tuple[str, int]) -> None:
        pass

    def recv_into(self, view: memoryview) -> int:
        if self.recv_error is not None:
            raise self.recv_error
        return 0


def _run_on_a_fake_frontend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, conn: _FakeConn,
                            gate: _nc._SignalGate | None = None) -> int:
    """run() connecting to 127.0.0.1:80 through ``conn``, with no host or device."""
    import xenback.sim

    class Frontend:
        def __init__(self, domain: object, devid: int) -> None:
            pass

        def __enter__(self) -> Frontend:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def socket(self) -> _FakeConn:
            return conn

    monkeypatch.setattr(xenback.sim, "attach", lambda *args: None)
    monkeypatch.setattr(_nc, "Frontend", Frontend)
    args = _nc._parser().parse_args(["--run-dir", str(tmp_path), "--domid", "1",
                                     "127.0.0.1", "80"])
    with open(os.devnull, "rb") as stdin, open(os.devnull, "wb") as stdout:
        return _nc.run(args, "127.0.0.1", 80, stdin, stdout, gate)


def test_both_sides_failing_is_told_as_the_receiving_side_s_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sending failed, then receiving: the receiving side's failure is the
    one said (it is the one that says 141 when the output's reader went)."""
    def send_input(conn: object, stdin_fd: int, done_r: int, wake_fd: int | None) -> _nc._Failed:
        assert os.read(done_r, 1) == b""  # the pump failed and hung up
        return _nc._Failed("send failed: [Errno 32] Broken pipe")

    monkeypatch.setattr(_nc, "_send_input", send_input)
    reset = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    with pytest.raises(_nc._Failed) as info:
        _run_on_a_fake_frontend(monkeypatch, tmp_path, _FakeConn(reset))
    assert info.value.message == (
        f"receive failed: [Errno {errno.ECONNRESET}] Connection reset by peer")


def test_a_signal_while_the_pump_starts_waits_until_it_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Thread.start() waits on a Condition, which an exception raised in
    # that wait can leave without its lock.
    gate = _nc._SignalGate()
    started: list[bool] = []
    start = _nc._Pump.start

    def signalled_start(self: _nc._Pump) -> None:
        gate.handler(signal.SIGTERM, None)  # as start() waits
        start(self)
        started.append(True)

    monkeypatch.setattr(_nc._Pump, "start", signalled_start)
    with pytest.raises(_nc._Signalled) as info:
        _run_on_a_fake_frontend(monkeypatch, tmp_path, _FakeConn(), gate)
    assert (info.value.signum, started) == (signal.SIGTERM, [True])


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """pvcalls-nc's time.monotonic(), as the test sets it."""
    now = [100.0]
    monkeypatch.setattr(_nc, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_data_coming_in_is_noted_for_quit_after(clock: list[float]) -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        pump = _nc._Pump(a, w)  # type: ignore[arg-type]
        clock[0] = 107.0
        pump.start()
        b.sendall(b"x")
        assert os.read(r, 1) == b"x"
        b.close()
        pump.join(TIMEOUT)
        assert (pump.last, pump.failure) == (107.0, None)
        assert os.read(pump.done_r, 1) == b""  # it hung up
    finally:
        for fd in (r, w, pump.done_r):
            os.close(fd)
        a.close()
        b.close()


def test_quit_after_counts_from_the_last_data(clock: list[float],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """-q 1 after end of input at 100 s, data at 100.8 s: it quits at 101.8 s."""
    pump = types.SimpleNamespace(last=50.0, done_r=-1)
    waits: list[float | None] = []

    def wait_readable(fds: list[int], timeout: float | None, wake_fd: int | None) -> set[int]:
        waits.append(timeout)
        if len(waits) == 1:  # data 0.8 s into the first wait
            clock[0] += 0.8
            pump.last = clock[0]
        else:
            clock[0] += timeout or 0
        return set()

    monkeypatch.setattr(_nc, "_wait_readable", wait_readable)
    _nc._linger(pump, 1.0, None)  # type: ignore[arg-type]
    assert waits == [1.0, pytest.approx(1.0)]
    assert clock[0] == pytest.approx(101.8)


def test_quit_after_0_quits_at_the_end_of_input(clock: list[float],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """-q 0 is a time too, not "no -q": nothing is waited for."""
    pump = types.SimpleNamespace(last=50.0, done_r=-1)
    waits: list[float | None] = []

    def wait_readable(fds: list[int], timeout: float | None, wake_fd: int | None) -> set[int]:
        waits.append(timeout)
        return {pump.done_r}  # ends the test either way

    monkeypatch.setattr(_nc, "_wait_readable", wait_readable)
    _nc._linger(pump, 0.0, None)  # type: ignore[arg-type]
    assert waits == []


def test_a_signal_before_the_gate_opens_is_raised_there() -> None:
    gate = _nc._SignalGate()
    gate.handler(signal.SIGTERM, None)  # closed: kept for later
    gate.handler(signal.SIGINT, None)  # the first one says how it ends
    assert gate.pending == signal.SIGTERM
    with pytest.raises(_nc._Signalled) as info, gate.opened():
        pytest.fail("the gate let a pending signal through")
    assert info.value.signum == signal.SIGTERM


def test_a_signal_interrupts_the_open_gate_once() -> None:
    gate = _nc._SignalGate()
    with gate.opened():
        with pytest.raises(_nc._Signalled):
            gate.handler(signal.SIGHUP, None)
        gate.handler(signal.SIGTERM, None)  # in the clean-up: not again
    assert gate.pending == signal.SIGHUP


def test_a_signal_held_back_is_raised_once_the_hold_ends() -> None:
    # Around the pump's start(): kept while held, raised right after, not
    # left for a second signal to bring out.
    gate = _nc._SignalGate()
    with pytest.raises(_nc._Signalled) as info, gate.opened():
        with gate.held():
            gate.handler(signal.SIGTERM, None)  # held: kept
        pytest.fail("the held signal was not raised when the hold ended")
    assert info.value.signum == signal.SIGTERM


@pytest.mark.parametrize("then", ["returned", "failed"])
def test_a_signal_kept_until_the_end_is_the_exit_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        then: str) -> None:
    # SIGTERM while the device closes (the gate closed): run() ends as it
    # would have, and the status is the signal's all the same, quietly.
    def run(args: object, host: str, port: int, stdin: object, stdout: object,
            gate: _nc._SignalGate) -> int:
        gate.handler(signal.SIGTERM, None)
        if then == "failed":
            raise _nc._Failed("removing the device failed")  # most likely its doing
        return 0

    monkeypatch.setattr(_nc, "run", run)
    with open(os.devnull) as stdin, open(os.devnull, "w") as stdout:
        monkeypatch.setattr(sys, "stdin", stdin)
        monkeypatch.setattr(sys, "stdout", stdout)
        assert _nc.main(["--run-dir", str(tmp_path), "--domid", "1", "127.0.0.1", "80"]) == 143
    assert capsys.readouterr().err == ""


def test_the_gate_takes_the_signals_not_ignored_and_gives_them_back() -> None:
    r, w = os.pipe2(os.O_NONBLOCK)
    old = {signum: signal.getsignal(signum)
           for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    # Set, not inherited: a run in the background of a shell ignores
    # SIGINT, one under nohup SIGHUP.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup
    previous_wake = signal.set_wakeup_fd(w)
    try:
        before = {signum: signal.getsignal(signum) for signum in old}
        gate = _nc._SignalGate()
        with gate.installed():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == gate.handler
            assert signal.getsignal(signal.SIGINT) == gate.handler
        assert {signum: signal.getsignal(signum) for signum in old} == before
        assert signal.set_wakeup_fd(previous_wake) == w
    finally:
        # Before w closes: a signal would be written to whatever took its number.
        signal.set_wakeup_fd(previous_wake)
        for signum, handler in old.items():
            signal.signal(signum, handler)
        os.close(r)
        os.close(w)


def test_a_signal_during_the_host_look_up_ends_it_before_the_guest_joins(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The look-up moved before the device, out of the open gate: a Ctrl-C
    # while a slow resolver answered was kept, and the guest joined and
    # waited for its handshake (10 s with no backend) before it ended.
    import xenback.sim

    gate = _nc._SignalGate()
    attached: list[object] = []

    def resolve(address: tuple[str, int]) -> tuple[str, int]:
        gate.handler(signal.SIGINT, None)  # as the resolver answers
        return "192.0.2.1", address[1]

    monkeypatch.setattr(_nc, "resolve", resolve)
    monkeypatch.setattr(xenback.sim, "attach", lambda *args: attached.append(args))
    args = _nc._parser().parse_args(["--run-dir", str(tmp_path), "--domid", "1",
                                     "slow.example", "80"])
    with pytest.raises(_nc._Signalled) as info:
        _nc.run(args, "slow.example", 80, sys.stdin.buffer, sys.stdout.buffer, gate)
    assert info.value.signum == signal.SIGINT
    assert attached == []
