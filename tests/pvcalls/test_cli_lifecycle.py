"""pvcalls-backend when its surroundings go wrong: no host, a lost host, a
second backend, signals in the middle of the demo."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scripts import helper_path
from stolensignal import OUTLASTS_THE_TEST
from test_cli import FAULTHANDLER_ENV, TIMEOUT, Lines, reap, script, usage_error

from pvcalls._cli import main


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str] | None = None,
            **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """A process, killed on the way out if the test left it running (and
    then, where its stderr is a pipe, its threads' stacks printed); ``env``
    is added to its environment."""
    proc = subprocess.Popen(argv, env={**FAULTHANDLER_ENV, **(env or {})}, **popen)
    try:
        yield proc
    finally:
        reap(proc)


@pytest.fixture
def sim_host(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A ``xenback-sim`` daemon: its run directory and its process."""
    run_dir = tmp_path / "run"
    with running([*script("xenback-sim"), "--run-dir", str(run_dir)],
                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as host:
        Lines(host.stdout).wait_for("XENSTORED_PATH=")
        yield run_dir, host


def serve_argv(run_dir: Path) -> list[str]:
    return [*script("pvcalls-backend"), "serve", "--platform", "sim", "--run-dir", str(run_dir)]


@contextlib.contextmanager
def service_manager(tmp_path: Path, *,
                    abstract: bool = False) -> Iterator[tuple[str, socket.socket]]:
    """What systemd listens on for the messages of a Type=notify service:
    ``(NOTIFY_SOCKET's value, the socket)``.  A file in ``tmp_path``, or a
    name in the abstract namespace, which NOTIFY_SOCKET writes with '@'."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if abstract:
            name = f"xenback-test-notify-{secrets.token_hex(8)}"
            sock.bind("\0" + name)
            notify_socket = "@" + name
        else:
            notify_socket = str(tmp_path / "notify")
            sock.bind(notify_socket)
        sock.settimeout(TIMEOUT)
        yield notify_socket, sock


def nothing_more_from(sock: socket.socket) -> None:
    """Assert that ``sock`` holds no datagram (its senders have exited)."""
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_serve_on_a_run_dir_without_a_host_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(["serve", "--platform", "sim", "--run-dir", str(tmp_path)], capsys)
    assert "cannot join the simulated host as domain 0" in err
    assert "Traceback" not in err


def test_a_demo_whose_host_cannot_start_says_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Its run directory goes in TMPDIR: one this deep leaves no room for
    # the name of a socket in it.  Where the demo runs is wrong, not the
    # demo: one line, not a traceback, and nothing left behind.
    import tempfile

    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    assert main(["demo"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert re.fullmatch(r"pvcalls-backend: demo: cannot start the simulated host: "
                        r"\[Errno 36\] cannot listen on .*: AF_UNIX path too long"
                        r" \(\d+ bytes, at most 107\)\n", err), err
    assert list(deep.iterdir()) == []


def test_demo_needs_the_ring_order_of_its_guests(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(["demo", "--max-page-order", "3"], capsys)
    assert "below 4, the ring order of the demo's guests" in err


# The demo with its first guest's fetch stuck: a signal then finds it in
# the middle, with the simulated host and both guests up, and the main
# thread blocked in a PV Calls recv() (the web server waits for a request
# that never comes), where the kernel may give the signal to another thread.
_STUCK_DEMO = """
import signal, sys
import pvcalls._cli as cli

# pytest started in the background (by a non-interactive shell) would pass
# SIGINT on ignored, and the demo would never see it.
signal.signal(signal.SIGINT, signal.default_int_handler)
# Nor SIGHUP under nohup.
signal.signal(signal.SIGHUP, signal.SIG_DFL)

def stuck(fe, host, port):
    s = fe.socket()
    s.connect((host, port))
    print("STUCK", flush=True)
    s.recv(1)

cli._http_get = stuck
sys.exit(cli.main(["demo"]))
"""


# The stuck demo again, signalled a second time while it cleans up (Ctrl-C
# pressed twice): the simulated host must still be closed.
_STUCK_DEMO_SIGNALLED_TWICE = _STUCK_DEMO.replace("cli._http_get = stuck", """
cli._http_get = stuck
import os
from xenback.sim import SimHost
close = SimHost.close
def close_signalled_again(self):
    os.kill(os.getpid(), int(sys.argv[1]))  # its handler runs here
    close(self)
SimHost.close = close_signalled_again
""")


# The stuck demo signalled by itself as its recv() lets go of the socket's
# condition to poll, where CPython may run the handler (as release()
# returns): the interrupt must not find the with block around the wait
# without its lock.
_STUCK_DEMO_SIGNALLED_AS_IT_POLLS = _STUCK_DEMO.replace("    s.recv(1)", """
    import os
    cond = s._cond
    release = cond.release
    def release_signalled():
        release()
        cond.release = release  # once
        os.kill(os.getpid(), int(sys.argv[1]))  # its handler runs here
    cond.release = release_signalled
    s.recv(1)""")

_STOP_SIGNALS = pytest.mark.parametrize(("signum", "status", "said"), [
    (signal.SIGTERM, 143, "demo terminated"),
    (signal.SIGINT, 130, "demo interrupted"),
    # Its terminal closed: it was killed, and left its run directory.
    (signal.SIGHUP, 129, "demo hung up"),
])


def run_signalled_demo(script: str, signum: int, status: int, said: str, *,
                       send: bool = True, before: int | None = None) -> None:
    """Run a stuck demo ``script`` until it exits after ``signum`` (sent
    once it is stuck, if ``send``, after ``before`` if given; else the
    script signals itself): with ``status``, having ``said`` so, and
    without its run directory."""
    with running([sys.executable, "-c", script, str(int(signum))],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        out = Lines(proc.stdout)
        match = re.search(r"Simulated Xen host in (\S+);", out.wait_for("Simulated Xen host"))
        assert match is not None
        run_dir = Path(match[1])
        if send:
            out.wait_for("STUCK")
            assert run_dir.is_dir()
            if before is not None:
                proc.send_signal(before)
            proc.send_signal(signum)
        returncode = proc.wait(TIMEOUT)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        # The status with what the demo said: a wrong one shows why.
        assert returncode == status and said in err and "Traceback" not in err, err
        assert not run_dir.exists()


@pytest.mark.parametrize("twice", [False, True], ids=["once", "again-while-cleaning-up"])
@_STOP_SIGNALS
def test_a_signal_in_the_middle_of_the_demo_cleans_up(
        signum: int, status: int, said: str, twice: bool) -> None:
    script = _STUCK_DEMO_SIGNALLED_TWICE if twice else _STUCK_DEMO
    run_signalled_demo(script, signum, status, said)


@_STOP_SIGNALS
def test_a_signal_as_the_demo_lets_go_of_a_lock_cleans_up(
        signum: int, status: int, said: str) -> None:
    run_signalled_demo(_STUCK_DEMO_SIGNALLED_AS_IT_POLLS, signum, status, said, send=False)


def test_the_demo_in_the_background_ignores_sigint() -> None:
    # A shell starts a background job with SIGINT ignored: Ctrl-C at the
    # terminal is not for it.  Python's SIGINT is delivered before SIGTERM.
    script = _STUCK_DEMO.replace("signal.signal(signal.SIGINT, signal.default_int_handler)",
                                 "signal.signal(signal.SIGINT, signal.SIG_IGN)")
    run_signalled_demo(script, signal.SIGTERM, 143, "demo terminated", before=signal.SIGINT)


def test_the_demo_in_the_background_ignores_sighup() -> None:
    # As under nohup: SIGHUP is left ignored.
    script = _STUCK_DEMO.replace("signal.signal(signal.SIGHUP, signal.SIG_DFL)",
                                 "signal.signal(signal.SIGHUP, signal.SIG_IGN)")
    run_signalled_demo(script, signal.SIGTERM, 143, "demo terminated", before=signal.SIGHUP)


def test_the_demo_gives_back_the_signal_handlers_it_took(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import pvcalls._cli as cli

    during = []
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def demo(args: Any, out: Any = None) -> int:
        during.append(tuple(signal.getsignal(signum) for signum in stops))
        return 0

    monkeypatch.setattr(cli, "demo", demo)
    old = {signum: signal.getsignal(signum) for signum in stops}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also in a background job
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # also under nohup
    try:
        assert main(["demo"]) == 0
        after = tuple(signal.getsignal(signum) for signum in stops)
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
    [(term, interrupt, hangup)] = during
    assert term is interrupt is hangup
    assert term not in (old[signal.SIGTERM], signal.default_int_handler, signal.SIG_DFL)
    assert after == (old[signal.SIGTERM], signal.default_int_handler, signal.SIG_DFL)


def test_the_demo_whose_reader_went_away_ends_quietly(short_tmp: Path) -> None:
    # As `pvcalls-backend demo | head -1`: it used to end in a
    # BrokenPipeError traceback, status 1.  Now as a tool killed by
    # SIGPIPE, but with its simulated host taken down.
    r, w = os.pipe()
    os.close(r)
    try:
        # Its run directory is made in TMPDIR.
        proc = subprocess.Popen([*script("pvcalls-backend"), "demo"], stdout=w,
                                stderr=subprocess.PIPE,
                                env={**FAULTHANDLER_ENV, "TMPDIR": str(short_tmp)})
    finally:
        os.close(w)
    try:
        returncode = proc.wait(TIMEOUT)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
    finally:
        reap(proc)
    assert (returncode, err) == (141, "")
    assert list(short_tmp.iterdir()) == []


@pytest.mark.parametrize("call", ["write", "flush"])
def test_the_demo_s_output_tells_a_reader_gone_from_a_failure(call: str) -> None:
    # Text written to a pipe may go out in write() or only in flush():
    # either says EPIPE when the reader went away.
    import pvcalls._cli as cli

    class Failing:
        def __init__(self, exc: OSError) -> None:
            self.exc = exc

        def write(self, text: str) -> int:
            raise self.exc

        def flush(self) -> None:
            raise self.exc

    def do(out: cli._Output) -> None:
        out.write("x") if call == "write" else out.flush()

    with pytest.raises(cli._OutputGone):
        do(cli._Output(Failing(BrokenPipeError(errno.EPIPE, "Broken pipe"))))
    with pytest.raises(cli._OutputFailed) as info:
        do(cli._Output(Failing(OSError(errno.ENOSPC, "No space left on device"))))
    assert info.value.error.errno == errno.ENOSPC


def test_a_demo_failing_on_a_socket_is_not_taken_for_a_broken_stdout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import pvcalls._cli as cli

    def demo(args: Any, out: Any = None) -> int:
        raise BrokenPipeError(32, "Broken pipe")  # a socket's, as sendall's

    monkeypatch.setattr(cli, "demo", demo)
    with pytest.raises(BrokenPipeError):
        main(["demo"])


@pytest.mark.parametrize("broken", ["echo", "first echo", "page"])
def test_a_demo_that_went_wrong_says_so(monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    import argparse
    import io

    import pvcalls._cli as cli

    echo_client = cli._echo_client
    if broken == "echo":
        monkeypatch.setattr(cli, "_echo_client",
                            lambda address, message: (echo_client(address, message)[0], False))
    elif broken == "first echo":
        # The later echoes coming back right do not make up for it.
        echoed: list[bytes] = []

        def first_differs(address: tuple[str, int], message: bytes) -> tuple[Any, bool]:
            client, same = echo_client(address, message)
            echoed.append(message)
            return client, same and len(echoed) > 1

        monkeypatch.setattr(cli, "_echo_client", first_differs)
    else:
        http_get = cli._http_get
        monkeypatch.setattr(cli, "_http_get", lambda *args: (
            http_get(*args)[0], "HTTP/1.0 404 Not Found", b""))
    out = io.StringIO()
    args = argparse.Namespace(max_ioworkers=1, max_page_order=4)
    assert cli.demo(args, out) == 1
    assert out.getvalue().splitlines()[-1] == "demo FAILED"


def test_a_demo_whose_guest_echo_server_failed_raises_its_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest's echo failing is the demo gone wrong, and its error is
    what tells why (not only "demo FAILED")."""
    import argparse
    import io

    import pvcalls._cli as cli

    class SendFails:
        def __init__(self, conn: Any) -> None:
            self.conn = conn

        def __enter__(self) -> SendFails:
            return self

        def __exit__(self, *exc: object) -> None:
            self.conn.close()

        def recv(self, n: int) -> bytes:
            return bytes(self.conn.recv(n))

        def sendall(self, data: bytes) -> None:
            raise ConnectionResetError(errno.ECONNRESET, "reset by the test")

    echo = cli._EchoServer._echo
    conns: list[Any] = []

    def first_fails(self: Any, conn: Any) -> None:
        conns.append(conn)
        echo(self, SendFails(conn) if len(conns) == 1 else conn)

    monkeypatch.setattr(cli._EchoServer, "_echo", first_fails)
    args = argparse.Namespace(max_ioworkers=1, max_page_order=4)
    with pytest.raises(ConnectionResetError, match="reset by the test"):
        cli.demo(args, io.StringIO())


@pytest.mark.parametrize("reply", ["altered", "short"])
def test_the_demo_s_echo_client_tells_a_wrong_echo(reply: str) -> None:
    """What the demo prints as "identical" is compared: an echo server
    that changes a byte, or closes before it echoed everything, is not."""
    import threading

    import pvcalls._cli as cli

    message = bytes(range(256)) * 40
    with socket.create_server(("127.0.0.1", 0)) as server:
        def serve_once() -> None:
            conn, _ = server.accept()
            with conn:
                got = bytearray()
                while len(got) < len(message) and (chunk := conn.recv(65536)):
                    got += chunk
                if reply == "altered":
                    got[1000] ^= 0xFF
                    conn.sendall(got)
                else:
                    conn.sendall(got[:len(got) // 2])  # and hang up

        thread = threading.Thread(target=serve_once, daemon=True)
        thread.start()
        client, same = cli._echo_client(server.getsockname(), message)
        client.close()
        thread.join(TIMEOUT)
    assert not same


def test_serve_stops_when_it_loses_its_host(
        sim_host: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    run_dir, host = sim_host
    with service_manager(tmp_path) as (notify_socket, manager), \
            running(serve_argv(run_dir), env={"NOTIFY_SOCKET": notify_socket},
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as serve:
        log = Lines(serve.stderr)
        assert manager.recv(4096).startswith(b"READY=1\n")
        host.send_signal(signal.SIGTERM)
        assert host.wait(TIMEOUT) == 0
        # Stopping of its own accord, and systemd's status says why.
        assert manager.recv(4096) == (b"STOPPING=1\n"
                                      b"STATUS=lost the XenStore connection (is the host gone?)")
        assert serve.wait(TIMEOUT) == 1
        nothing_more_from(manager)
        log.wait_for("pvcalls backend stopped")
        assert "lost the XenStore connection" in "".join(log.lines)
        assert "Traceback" not in "".join(log.lines), "".join(log.lines)
    # The host removed what it made; serve's backend, its lock file.  (Which
    # of them was last decides whether the run directory the host made is
    # gone too.)
    assert not run_dir.exists() or list(run_dir.iterdir()) == []


def sighup_set_to(disposition: signal.Handlers) -> Any:
    """A ``preexec_fn`` giving the child that SIGHUP disposition, whatever
    the tests run under (``nohup`` passes SIG_IGN on to every child)."""
    def preexec() -> None:
        signal.signal(signal.SIGHUP, disposition)

    return preexec


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_serve_leaves_nothing_in_the_run_dir(
        sim_host: tuple[Path, subprocess.Popen[bytes]], signum: str) -> None:
    # SIGHUP: the terminal it ran in was closed.
    run_dir = sim_host[0]
    before = sorted(run_dir.rglob("*"))
    with running(serve_argv(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 preexec_fn=sighup_set_to(signal.SIG_DFL)) as serve:
        log = Lines(serve.stderr)
        log.wait_for("serving")
        assert (run_dir / "xenback-pvcalls.dom0.lock").exists()
        serve.send_signal(getattr(signal, signum))
        assert serve.wait(TIMEOUT) == 0
        log.wait_for("pvcalls backend stopped")
        assert f"{signum}: closing every frontend" in "".join(log.lines)
        # Not under systemd: nothing to tell it, and nothing said of it.
        assert "NOTIFY_SOCKET" not in "".join(log.lines)
    assert sorted(run_dir.rglob("*")) == before


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_serve_tells_systemd_once_it_serves_and_as_it_stops(
        sim_host: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path, abstract: bool) -> None:
    """Under a Type=notify unit: READY=1 once guests are served, so that
    units ordered after it start then, and STOPPING=1 on SIGTERM, before
    the frontends close."""
    run_dir = sim_host[0]
    with service_manager(tmp_path, abstract=abstract) as (notify_socket, manager), \
            running(serve_argv(run_dir), env={"NOTIFY_SOCKET": notify_socket},
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as serve:
        log = Lines(serve.stderr)
        ready = manager.recv(4096).decode()
        # Its first word, and only once its backend has started: it holds
        # the host's lock, which it takes before it watches for frontends.
        assert (run_dir / "xenback-pvcalls.dom0.lock").exists()
        said = re.fullmatch(r"READY=1\nSTATUS=serving domain 0's guests, ([1-9]\d*) ioworker(s?)",
                            ready)
        assert said and (said[1] == "1") == (said[2] == ""), ready  # one ioworker, or 2 ioworkers
        serve.send_signal(signal.SIGUSR1)  # logs, tells systemd nothing
        log.wait_for("active sockets per CPU")
        serve.send_signal(signal.SIGTERM)
        assert manager.recv(4096) == b"STOPPING=1\nSTATUS=SIGTERM: closing every frontend"
        assert serve.wait(TIMEOUT) == 0
        nothing_more_from(manager)
        log.wait_for("pvcalls backend stopped")
        assert "NOTIFY_SOCKET" not in "".join(log.lines)


@pytest.mark.parametrize("unreachable", ["missing", "file", "stream", "too-long", "relative"])
def test_serve_serves_all_the_same_when_systemd_cannot_be_told(
        sim_host: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path, unreachable: str) -> None:
    """A NOTIFY_SOCKET serve cannot send to is a broken service manager
    or a stray variable, no reason not to serve: it says once what was
    wrong, and goes on."""
    with contextlib.ExitStack() as stack:
        notify_socket = str(tmp_path / "notify")
        if unreachable == "file":
            Path(notify_socket).touch()
        elif unreachable == "stream":
            listener = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            listener.bind(notify_socket)
            listener.listen()
        elif unreachable == "too-long":
            notify_socket = "/" + "n" * 200
        elif unreachable == "relative":
            notify_socket = "notify"
        said = {"missing": f"{notify_socket}: [Errno 2] No such file or directory",
                "file": f"{notify_socket}: not a socket",
                "stream": f"{notify_socket}: [Errno 91] Protocol wrong type for socket",
                "too-long": "AF_UNIX path too long",
                "relative": "notify: neither an absolute path nor '@' and an abstract name",
                }[unreachable]
        serve = stack.enter_context(running(
            serve_argv(sim_host[0]), env={"NOTIFY_SOCKET": notify_socket},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        log = Lines(serve.stderr)
        log.wait_for("serving")
        warning = log.wait_for("NOTIFY_SOCKET")
        assert " WARNING " in warning and said in warning, warning
        serve.send_signal(signal.SIGUSR1)  # still serving
        log.wait_for("active sockets per CPU")
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(TIMEOUT) == 0
        log.wait_for("pvcalls backend stopped")
    # Once, though STOPPING=1 could not be sent either.
    assert [line for line in log.lines if "NOTIFY_SOCKET" in line] == [warning]
    assert "Traceback" not in "".join(log.lines)


@pytest.mark.parametrize("stray", [signal.SIGHUP, signal.SIGUSR2], ids=["SIGHUP", "SIGUSR2"])
def test_serve_ignores_a_stray_signal(
        sim_host: tuple[Path, subprocess.Popen[bytes]], stray: signal.Signals) -> None:
    """A SIGHUP under nohup, whose SIG_IGN serve keeps, and a SIGUSR2,
    which is how its own thread says the host went: from anyone else, the
    host still there, it stops nothing."""
    with running(serve_argv(sim_host[0]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 preexec_fn=sighup_set_to(signal.SIG_IGN)) as serve:
        log = Lines(serve.stderr)
        log.wait_for("serving")
        serve.send_signal(stray)
        serve.send_signal(signal.SIGUSR1)  # after the stray one: still serving
        log.wait_for("active sockets per CPU")
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(TIMEOUT) == 0
        log.wait_for("SIGTERM: closing every frontend")
        assert "lost the XenStore connection" not in "".join(log.lines)


def test_serve_in_a_script_s_background_keeps_sigint_ignored(
        sim_host: tuple[Path, subprocess.Popen[bytes]]) -> None:
    """``pvcalls-backend serve ... &`` in a script starts with SIGINT
    ignored, so that Ctrl-C meant for the script's foreground command
    (sent to the whole process group) leaves it running: serve keeps the
    disposition, as it does SIGHUP's under nohup, and as the demo does."""
    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with running(serve_argv(sim_host[0]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 preexec_fn=ignore_sigint) as serve:
        log = Lines(serve.stderr)
        log.wait_for("serving")
        serve.send_signal(signal.SIGINT)
        serve.send_signal(signal.SIGUSR1)  # after the SIGINT: still serving
        log.wait_for("active sockets per CPU")
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(TIMEOUT) == 0
        log.wait_for("SIGTERM: closing every frontend")
        assert "SIGINT" not in "".join(log.lines)


@pytest.mark.parametrize("gone", ["host", "xenstored"])
def test_a_host_gone_during_start_up_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], gone: str) -> None:
    # The host goes after serve joined it, before the backend starts on it
    # (the simulated hypervisor refuses the backend first); or only its
    # XenStore does (XenStore refuses it).
    import pvcalls._cli as cli
    from xenback.sim import SimHost, attach

    run_dir = tmp_path / "run"
    run_dir.mkdir()  # stays when the host goes: the backend locks it next
    host = SimHost(run_dir).start()
    xenstored = run_dir / "xenstored" / "socket"

    def join_then_lose_the_host(args: Any, error: Any) -> Any:
        platform = attach(run_dir, 0)
        if gone == "host":
            host.close()
        else:
            xenstored.rename(tmp_path / "socket")
        return platform

    monkeypatch.setattr(cli, "_open_platform", join_then_lose_the_host)
    try:
        with pytest.raises(SystemExit) as info:
            main(["serve", "--platform", "sim", "--run-dir", str(run_dir)])
    finally:
        if gone == "xenstored":
            (tmp_path / "socket").rename(xenstored)  # for the host to close as usual
        host.close()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(
        "pvcalls-backend serve: error: cannot start serving the host's guests "
        "(is the host gone?): "), err
    assert ("cannot connect to XenStore" in err) == (gone == "xenstored"), err


def test_a_lock_file_that_cannot_be_opened_is_said_as_it_is(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The host is there, but not the lock file: its run directory refuses
    # it (a directory in its place here; elsewhere a run directory that is
    # not writable).  Nothing points at the host.
    from xenback.sim import SimHost

    run_dir = tmp_path / "run"
    lock = run_dir / "xenback-pvcalls.dom0.lock"
    with SimHost(run_dir):
        lock.mkdir()
        with pytest.raises(SystemExit) as info:
            main(["serve", "--platform", "sim", "--run-dir", str(run_dir)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "pvcalls-backend serve: error: cannot start serving the host's guests: "
        f"[Errno 21] cannot open the lock file {lock}: Is a directory"), err


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC,
                                  errno.EDQUOT])
def test_a_host_short_of_resources_at_start_is_worth_a_restart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        code: int) -> None:
    # No descriptors, memory or room in the run directory left as it
    # starts: what the host is short of now it may have again later, so
    # status 1, which the systemd unit restarts on (2 it does not: the same
    # options would fail the same way).
    import pvcalls
    from xenback.sim import SimHost

    def short(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(pvcalls, "Backend", short)
    run_dir = tmp_path / "run"
    with SimHost(run_dir):
        with pytest.raises(SystemExit) as info:
            main(["serve", "--platform", "sim", "--run-dir", str(run_dir)])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1] == (
        "pvcalls-backend serve: error: cannot start serving the host's guests "
        f"(short of resources, worth a restart): [Errno {code}] {os.strerror(code)}"), err


def _no_socket_left(code: int) -> type:
    """pyxs's view of the socket module on a host short of descriptors
    or memory: every new socket fails with ``code``."""

    class NoSocket:
        AF_UNIX, SOCK_STREAM, SHUT_RDWR = socket.AF_UNIX, socket.SOCK_STREAM, socket.SHUT_RDWR
        error = OSError

        @staticmethod
        def socket(*_args: Any) -> socket.socket:
            raise OSError(code, os.strerror(code))

    return NoSocket


def _said_worth_a_restart(info: pytest.ExceptionInfo[SystemExit],
                          capsys: pytest.CaptureFixture[str], what: str, code: int) -> None:
    """serve exited 1, saying in one line that it could not ``what`` for
    the shortage ``code``."""
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(
        f"pvcalls-backend serve: error: cannot {what} "
        f"(short of resources, worth a restart): [Errno {code}] "), err


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM])
def test_no_socket_left_for_xenstore_at_start_is_worth_a_restart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        code: int) -> None:
    # The backend's first descriptor of its own is its XenStore socket:
    # the host short of descriptors or memory fails it, which is no host
    # gone (status 2, never restarted) but a shortage (status 1).
    import pyxs.connection

    import pvcalls._cli as cli
    from xenback.sim import SimHost

    open_platform = cli._open_platform

    def then_no_socket(args: Any, error: Any) -> Any:
        platform = open_platform(args, error)

        monkeypatch.setattr(pyxs.connection, "socket", _no_socket_left(code))
        return platform

    monkeypatch.setattr(cli, "_open_platform", then_no_socket)
    run_dir = tmp_path / "run"
    with SimHost(run_dir):
        with pytest.raises(SystemExit) as info:
            main(["serve", "--platform", "sim", "--run-dir", str(run_dir)])
    _said_worth_a_restart(info, capsys, "start serving the host's guests", code)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM])
def test_no_socket_left_to_open_xen_is_worth_a_restart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        code: int) -> None:
    # On Xen the first socket is the one that reads our domid, as the
    # platform opens: the shortage is no missing Xen (status 2).
    import pyxs.connection

    from xenback.xen import _platform

    monkeypatch.setattr(_platform, "missing_pieces", lambda: [])
    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "socket"))
    monkeypatch.setattr(pyxs.connection, "socket", _no_socket_left(code))
    with pytest.raises(SystemExit) as info:
        main(["serve", "--platform", "xen"])
    _said_worth_a_restart(info, capsys, "open the platform", code)


def _joining_dom0_fails(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Connecting to domain 0's hypervisor socket fails with ``code``, as
    serve joins the simulated host; the host's own sockets work."""
    connect = socket.socket.connect

    def failing_connect(sock: socket.socket, address: Any) -> None:
        if str(address).endswith("/domains/0/hypervisor"):
            raise OSError(code, os.strerror(code))
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", failing_connect)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM])
def test_a_shortage_as_serve_joins_the_simulated_host_is_worth_a_restart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        code: int) -> None:
    # The host is there: what serve lacks to join it is no missing host
    # (status 2, never restarted).
    from xenback.sim import SimHost

    run_dir = tmp_path / "run"
    with SimHost(run_dir):
        _joining_dom0_fails(monkeypatch, code)
        with pytest.raises(SystemExit) as info:
            main(["serve", "--platform", "sim", "--run-dir", str(run_dir)])
    _said_worth_a_restart(info, capsys, "open the platform", code)


def test_a_host_refusing_serve_is_still_no_host(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A host whose socket is there but nobody listens (it was killed)
    # is a missing host, whatever else an errno may now mean.
    from xenback.sim import SimHost

    run_dir = tmp_path / "run"
    with SimHost(run_dir):
        _joining_dom0_fails(monkeypatch, errno.ECONNREFUSED)
        with pytest.raises(SystemExit) as info:
            main(["serve", "--platform", "sim", "--run-dir", str(run_dir)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "short of resources" not in err, err
    assert "cannot join the simulated host as domain 0" in err.splitlines()[-1], err


def test_only_a_shortage_as_the_platform_opens_is_called_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Any other OSError out of joining the host is not "short of
    # resources, worth a restart": it goes on as the error it is.
    import xenback.sim

    def refused(*_args: Any, **_kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "refused for the test")

    monkeypatch.setattr(xenback.sim, "attach", refused)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(PermissionError, match="refused for the test"):
        main(["serve", "--platform", "sim", "--run-dir", str(run_dir)])
    assert "short of resources" not in capsys.readouterr().err


def test_a_second_backend_on_one_host_is_refused(
        sim_host: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    argv = serve_argv(sim_host[0])
    with running(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as first, \
            service_manager(tmp_path) as (notify_socket, manager):
        Lines(first.stderr).wait_for("serving")
        second = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                                env={**FAULTHANDLER_ENV, "NOTIFY_SOCKET": notify_socket})
        assert second.returncode == 2
        assert f"another pvcalls-backend (pid {first.pid}) serves this host" in second.stderr
        # systemd is not told that a backend refused before it served is
        # ready: it sees the start fail.
        nothing_more_from(manager)
        first.send_signal(signal.SIGTERM)
        assert first.wait(TIMEOUT) == 0
    # Its lock went with it: a new backend may serve the host.
    with running(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as again:
        Lines(again.stderr).wait_for("serving")
        again.send_signal(signal.SIGTERM)
        assert again.wait(TIMEOUT) == 0


def test_a_lock_holder_that_has_not_written_its_pid_is_said_as_such(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Its lock taken, its pid not written yet: "pid ?", not "pid None".
    import types

    import pvcalls
    import pvcalls._cli as cli
    from xenback.hostlock import HostLockHeld

    lock = tmp_path / "pvcalls-backend.lock"

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise HostLockHeld(lock, None)

    monkeypatch.setattr(pvcalls, "Backend", refused)
    monkeypatch.setattr(cli, "_open_platform", lambda args, error: types.SimpleNamespace(domid=0))
    assert usage_error(["serve", "--platform", "xen"], capsys).endswith(
        f"error: another pvcalls-backend (pid ?) serves this host already; it holds {lock}\n")


def test_serve_is_refused_by_a_backend_a_script_started(
        sim_host: tuple[Path, subprocess.Popen[bytes]]) -> None:
    # Not only a serve keeps a second backend out: any pvcalls.Backend.
    import pvcalls
    from xenback.sim import attach

    argv = serve_argv(sim_host[0])
    with pvcalls.Backend(attach(sim_host[0], 0), cpus=1):
        second = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    assert second.returncode == 2
    assert f"another pvcalls-backend (pid {os.getpid()}) serves this host" in second.stderr
    assert "Traceback" not in second.stderr


def test_sigint_while_reading_the_policy_is_quiet(tmp_path: Path) -> None:
    # A policy file that is a FIFO nobody writes: serve waits to open it,
    # before it blocks SIGINT for sigwait(); Ctrl-C there is no crash.
    policy = tmp_path / "policy.fifo"
    os.mkfifo(policy)
    argv = [sys.executable, "-c",
            "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from pvcalls._cli import main; sys.exit(main(sys.argv[1:]))",
            "serve", "--platform", "sim", "--run-dir", str(tmp_path), "--policy", str(policy)]
    with running(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as serve:
        # Once blocked in open() for sure: Python sees a signal that comes
        # just before a blocking call only once the call returns.
        wchan = Path(f"/proc/{serve.pid}/wchan")
        deadline = time.monotonic() + TIMEOUT
        while (where := wchan.read_text()) != "wait_for_partner":
            assert time.monotonic() < deadline, f"serve is in {where}, not opening the FIFO"
            time.sleep(0.01)
        serve.send_signal(signal.SIGINT)
        assert serve.wait(TIMEOUT) == 130
        assert serve.stderr is not None
        assert serve.stderr.read().decode() == "pvcalls-backend: interrupted before serving\n"


def test_a_bad_policy_file_is_named_once(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[default]\nmax_sockets = 'lots'\n")
    argv = ["serve", "--platform", "sim", "--run-dir", str(tmp_path), "--policy", str(policy)]
    err = usage_error(argv, capsys)
    assert err.count(str(policy)) == 1 and "max_sockets" in err


def _serve_reading_a_policy_that_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       code: int) -> tuple[pytest.ExceptionInfo[SystemExit], Path]:
    """serve's exit, and the policy file, whose open() fails with ``code``."""
    policy = tmp_path / "policy.toml"
    policy.write_text("[default]\n")
    path_open = Path.open

    def failing_open(path: Path, *args: Any, **kwargs: Any) -> Any:
        if path == policy:
            raise OSError(code, os.strerror(code), str(path))
        return path_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", failing_open)
    with pytest.raises(SystemExit) as info:
        main(["serve", "--platform", "sim", "--run-dir", str(tmp_path), "--policy", str(policy)])
    return info, policy


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM])
def test_a_shortage_as_serve_reads_its_policy_is_worth_a_restart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        code: int) -> None:
    # Reading the policy is the first thing serve does as it starts: a host
    # short of descriptors or memory there has no bad policy file (status
    # 2, never restarted), but a shortage (status 1), as --help says.
    info, _ = _serve_reading_a_policy_that_fails(tmp_path, monkeypatch, code)
    _said_worth_a_restart(info, capsys, "read the policy file", code)


@pytest.mark.parametrize("code", [errno.ENOENT, errno.EACCES, errno.EISDIR, errno.EIO])
def test_a_policy_file_that_cannot_be_read_is_refused_not_restarted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        code: int) -> None:
    # Any other error reading it is the file's (or its path's): status 2,
    # which the unit does not restart, as for a file that does not parse.
    info, policy = _serve_reading_a_policy_that_fails(tmp_path, monkeypatch, code)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"pvcalls-backend serve: error: --policy {policy}: cannot read policy: "
        f"{os.strerror(code)}")


def serve_with(backend: str, *args: str) -> subprocess.CompletedProcess[str]:
    """serve() in a child process, on a stand-in platform, with the class
    ``Backend`` defined by the source ``backend`` (its ``__enter__`` and
    ``__exit__`` are where serve starts and stops serving; it has the
    ``connection_lost`` and ``nr_ioworkers`` serve reads); ``args`` are the
    child's sys.argv[1:]."""
    child = f"""
import argparse, os, signal, sys, threading
from pathlib import Path
import pvcalls, pvcalls._cli as cli

{backend}

class Platform:
    domid = 0

cli._open_platform = lambda args, error: Platform()
pvcalls.Backend = Backend
args = argparse.Namespace(policy=None, platform="sim", run_dir=Path("."), max_ioworkers=1,
                          max_page_order=4)
status = cli.serve(args, argparse.ArgumentParser("serve"))
print("serve returned", status, flush=True)
"""
    return subprocess.run([sys.executable, "-c", child, *args], capture_output=True,
                          text=True, timeout=TIMEOUT)


# A backend whose XenStore connection goes while it closes (the host
# stopping together with it), after SIGTERM: the watcher's SIGUSR2 is sent,
# and must not kill the process once serve() restores its mask.
_LOST_WHILE_CLOSING = """
class Backend:
    nr_ioworkers = 1

    def __init__(self, *args, **kwargs):
        self.connection_lost = threading.Event()
    def __enter__(self):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # pending
        return self
    def __exit__(self, *exc):
        self.connection_lost.set()
        watcher, = [t for t in threading.enumerate() if t.name == "xenstore-watcher"]
        watcher.join(30)  # its SIGUSR2 is sent
"""


def test_a_connection_lost_while_closing_does_not_kill_serve() -> None:
    done = serve_with(_LOST_WHILE_CLOSING)
    assert (done.returncode, done.stdout) == (0, "serve returned 0\n"), done.stderr


# Told to stop, and told again while its backend closes (Ctrl-C pressed
# twice, or a second SIGTERM): the second asks for what is under way
# already, and must not kill the process once serve() restores its mask.
_STOP_TWICE = """
signal.signal(signal.SIGINT, signal.default_int_handler)
signum = signal.Signals[sys.argv[1]]

class Backend:
    nr_ioworkers = 1

    def __init__(self, *args, **kwargs):
        self.connection_lost = threading.Event()
    def __enter__(self):
        signal.pthread_kill(threading.main_thread().ident, signum)  # pending
        return self
    def __exit__(self, *exc):
        os.kill(os.getpid(), signum)  # again, while closing
"""


# As _LOST_WHILE_CLOSING, but the watcher is held just before it sends its
# SIGUSR2 until serve() is about to stop taking signals (or has returned):
# that one must come before serve() stops, or not at all.
_LOST_AS_SERVE_STOPS = """
sys.path[:0] = sys.argv[1:]
from racewindow import stands_at

pthread_kill = signal.pthread_kill
main = threading.get_ident()
sending = threading.Event()

def in_serve():
    frame = sys._current_frames().get(main)
    while frame is not None and frame.f_code is not cli.serve.__code__:
        frame = frame.f_back
    return frame is not None

def pthread_kill_late(thread_id, signum):
    if signum == signal.SIGUSR2:
        sending.set()
        while in_serve() and not stands_at(main, cli.serve, "with stop_lock:\\n"):
            threading.Event().wait(0.001)
    pthread_kill(thread_id, signum)

signal.pthread_kill = pthread_kill_late

class Backend:
    nr_ioworkers = 1

    def __init__(self, *args, **kwargs):
        self.connection_lost = threading.Event()
    def __enter__(self):
        pthread_kill(main, signal.SIGTERM)  # pending
        return self
    def __exit__(self, *exc):
        self.connection_lost.set()
        sending.wait(30)  # the watcher is on its way

import atexit
atexit.register(lambda: [t.join(30) for t in threading.enumerate() if t.name == "xenstore-watcher"])
"""


def test_a_connection_lost_as_serve_stops_does_not_kill_it() -> None:
    done = serve_with(_LOST_AS_SERVE_STOPS, *helper_path())
    assert (done.returncode, done.stdout) == (0, "serve returned 0\n"), done.stderr


# The connection goes only once serve() returned (the host stopping just
# after us): the watcher, a daemon thread, wakes then, and must send no
# SIGUSR2, whose default action would kill the process on its way out.
_LOST_AFTER_SERVE = """
import atexit

backends = []

class Backend:
    nr_ioworkers = 1

    def __init__(self, *args, **kwargs):
        self.connection_lost = threading.Event()
        backends.append(self)
    def __enter__(self):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # pending
        return self
    def __exit__(self, *exc):
        pass

def lose_the_connection():
    backends[0].connection_lost.set()
    watcher, = [t for t in threading.enumerate() if t.name == "xenstore-watcher"]
    watcher.join(30)  # a SIGUSR2 it sent has come

atexit.register(lose_the_connection)
"""


def test_a_connection_lost_after_serve_returned_does_not_kill_the_process() -> None:
    done = serve_with(_LOST_AFTER_SERVE)
    assert (done.returncode, done.stdout) == (0, "serve returned 0\n"), done.stderr


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_second_stop_signal_while_closing_is_no_crash(signum: str) -> None:
    done = serve_with(_STOP_TWICE, signum)
    assert (done.returncode, done.stdout) == (0, "serve returned 0\n"), done.stderr
    assert "Traceback" not in done.stderr


def test_a_guest_connected_to_a_killed_backend_reconnects_to_the_next(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # serve killed (no clean-up: its device stays Connected) and started
    # again while the guest keeps its frontend: the new backend must tell
    # the frontend that its connection is gone (or every call of the guest
    # times out, and a blocking one waits forever), and the guest must be
    # able to connect again; the killed backend's grant mappings and ports
    # must not outlive it.  The frontend's timeout outlasts the test: a
    # close() that waited for the gone backend's answers is a test timeout.
    import pvcalls
    from xenback.sim import SimHost
    from xenback.xenstore import XenStore

    run_dir = tmp_path / "run"
    with SimHost(run_dir) as host, XenStore.connect_to(host.dom0) as xs:
        guest = host.create_domain("guest")
        idle = host.hypervisor.stats()
        with running(serve_argv(run_dir), stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE) as first:
            Lines(first.stderr).wait_for("serving")
            fe = pvcalls.Frontend(guest, timeout=OUTLASTS_THE_TEST)
            fe.open()
            fe.socket().close()
            first.kill()
            first.wait(TIMEOUT)
        fe_state = f"{fe.device.frontend_path}/state"
        assert xs.read(fe_state) == "4"
        with running(serve_argv(run_dir), stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE) as second:
            Lines(second.stderr).wait_for("serving")
            # The frontend saw the backend leave Connected, and closed.
            xs.wait_for(fe_state, "6", timeout=TIMEOUT)
            with pytest.raises(OSError) as info:
                fe.socket()
            assert "backend went away" in str(info.value)
            caplog.clear()
            fe.close()
            # Nor a wait for the new backend to close (at most 2 s, for a
            # frontend not connected), which the toolstack would report.
            assert "did not close" not in caplog.text
            fe.open()
            fe.socket().close()
            fe.close()
            second.send_signal(signal.SIGTERM)
            assert second.wait(TIMEOUT) == 0
        stats = host.hypervisor.stats()
        assert (stats["ports"], stats["grants"]) == (idle["ports"], idle["grants"])
