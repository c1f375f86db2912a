"""The pvcalls-backend command line: option errors, and serve against a
xenback-sim daemon (with pvcalls-nc as the guest) until SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import io
import logging
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from pvcalls_rawfront import RawFrontend

import pvcalls
import pvcalls._cli as cli
from pvcalls._cli import main
from workqueue import Topology

TIMEOUT = 30.0
BIN = Path(sys.executable).parent


#: The environment of a child that may hang: SIGABRT then makes Python
#: print every thread's stack (see reap).  Without the NOTIFY_SOCKET of a
#: service manager the tests may run under: a serve would tell it that it
#: is ready, and stopping.
FAULTHANDLER_ENV = {**{name: value for name, value in os.environ.items()
                       if name != "NOTIFY_SOCKET"},
                    "PYTHONFAULTHANDLER": "1"}


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if a failed test left it running, printing (with the
    test's output) where its threads were, if it runs with FAULTHANDLER_ENV
    and its stderr is a pipe."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            print(f"{proc.args!r} was still running; its stderr:")
            print(proc.stderr.read().decode(errors="replace"))


def unused_port() -> int:
    """A TCP port of 127.0.0.1 that nothing is bound to, for a guest to
    listen on.  Taken below the range the kernel picks local ports from, so
    that no connect() in any process can take it before the guest binds it
    (as one can a port that a bind to port 0 has just given back)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(1024, low - 16384), low), 64):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no port below {low} is free")


def script(name: str) -> list[str]:
    """The console script if installed next to the interpreter, else the
    same entry point through ``python -c``."""
    path = BIN / name
    if path.exists():
        return [str(path)]
    module = {"pvcalls-backend": "pvcalls._cli", "pvcalls-nc": "pvcalls._nc",
              "xenback-sim": "xenback.sim._daemon"}[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What ``main(argv)`` says as it exits with status 2 (refused)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["serve"], "the following arguments are required: --platform"),
        (["serve", "--platform", "vmware"], "invalid choice"),
        (["serve", "--platform", "sim"], "error: --platform sim needs --run-dir DIR"),
        (["serve", "--platform", "sim", "--run-dir", "/nonexistent/run"], "no such directory"),
        (["serve", "--platform", "sim", "--run-dir", "/dev/null"],
         "--run-dir /dev/null: not a directory"),
        # One the kernel will not look up: stat() fails with other than
        # ENOENT, which Path.exists() raised, a traceback.
        (["serve", "--platform", "sim", "--run-dir", "/" + "r" * 256],
         f"--run-dir /{'r' * 256}: File name too long"),
        # Path("") is the current directory: an unset $RUN_DIR would go there.
        (["serve", "--platform", "sim", "--run-dir", ""], "argument --run-dir: empty path"),
        (["serve", "--platform", "xen", "--run-dir", "/tmp"], "only applies to --platform sim"),
        # As --run-dir: it was read as ".", "cannot read policy: Is a directory".
        (["serve", "--platform", "xen", "--policy", ""], "argument --policy: empty path"),
        (["demo", "--max-ioworkers", "0"], "at least 1"),
        (["demo", "--max-ioworkers", "many"], "not a whole number"),
        # A negative number is a whole number: say what is wrong with it.
        (["demo", "--max-ioworkers", "-1"], "argument --max-ioworkers: -1 must be at least 1"),
        (["demo", "--max-page-order", "-4"], "argument --max-page-order: -4 must be at least 1"),
        # int() takes these; a number on a command line is plain digits.
        (["demo", "--max-ioworkers", "1_0"], "'1_0' is not a whole number"),
        (["demo", "--max-ioworkers", " 4"], "' 4' is not a whole number"),
        (["demo", "--max-page-order", "\uff14"], "'\uff14' is not a whole number"),
        (["demo", "--max-page-order", "99"], "most one indexes page"),
        (["demo", "--max-page-order", "10"],
         "argument --max-page-order: 10 is above 9, the most one indexes page can describe"),
        # More digits than int() converts (sys.get_int_max_str_digits()):
        # argparse then said "invalid _positive_int value", naming our code.
        (["demo", "--max-ioworkers", "9" * 5000], f"argument --max-ioworkers: {'9' * 5000} is too"),
        (["demo", "--max-page-order", "9" * 5000], "9 is too large"),
        (["demo", "--max-page-order", "-" + "9" * 5000], "9 is too small"),
        (["demo", "--log-level", "LOUD"], "invalid choice"),
    ],
)
def test_bad_options(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(argv, capsys)
    assert message in err
    assert "usage: pvcalls-backend" in err


@pytest.mark.parametrize(("argv", "expected"), [
    (["serve", "--platform", "xen"], ("WARNING", pvcalls.DEFAULT_MAX_IOWORKERS)),
    # Before the command, as git's and pip's common options may go: it
    # was "invalid choice: 'debug' (choose from 'demo', 'serve')".
    (["--log-level", "debug", "--max-ioworkers", "2", "serve", "--platform", "xen"],
     ("DEBUG", 2)),
    (["--max-ioworkers", "2", "demo"], ("WARNING", 2)),
    (["--max-ioworkers", "2", "demo", "--max-ioworkers", "3"], ("WARNING", 3)),  # the last one
])
def test_common_options_go_before_or_after_the_command(
        argv: list[str], expected: tuple[str, int]) -> None:
    parser, _ = cli._parser()
    args = parser.parse_args(argv)
    assert (args.log_level, args.max_ioworkers) == expected


def test_a_bad_common_option_before_the_command_is_said(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(["--max-ioworkers", "0", "demo"], capsys)
    assert "argument --max-ioworkers: 0 must be at least 1" in err


def test_the_largest_page_order_is_taken() -> None:
    parser, _ = cli._parser()
    assert parser.parse_args(["demo", "--max-page-order", "9"]).max_page_order == 9


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1024 * 1024 - 52, "1023.9 KiB"),
    (1024 * 1024, "1.0 MiB"), (5 * 1024 * 1024 * 1024, "5120.0 MiB"),
])
def test_byte_counts_are_printed_in_the_largest_unit_under_1024(n: int, text: str) -> None:
    assert cli._fmt_bytes(n) == text


def test_statistics_show_each_socket_and_the_online_cpus(
        raw: RawFrontend, backend: Any, topology: Topology, echo_server: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """SIGUSR1's log lines and the demo's table: a line per socket, with
    its CPU (an active one's) and its address; the socket count of each
    online CPU, and of no offline one."""
    topology.cpu_down(3)
    listener, _ = raw.socket()
    port = unused_port()
    assert raw.bind(listener, ("127.0.0.1", port)).ret == 0
    assert raw.listen(listener).ret == 0
    active, _ = raw.socket()
    assert raw.response(raw.push_connect(active, echo_server.address, raw.new_ring())).ret == 0
    stats = backend.stats()
    cpu = next(row.cpu for row in stats.sockets if row.id == active)
    domid = raw.guest.domid
    counts = ", ".join(f"CPU {c}: {int(c == cpu)}" for c in range(3))

    with caplog.at_level(logging.WARNING, logger="pvcalls._cli"):
        cli._log_stats(stats)
    assert sorted(r.getMessage() for r in caplog.records) == sorted([
        f"1 frontends, 2 sockets; active sockets per CPU: {counts}",
        f"  dom{domid} dev0 {listener:#x} passive cpu=- out=0 in=0 127.0.0.1:{port}",
        f"  dom{domid} dev0 {active:#x} active cpu={cpu} out=0 in=0 "
        f"{echo_server.address[0]}:{echo_server.address[1]}",
    ])

    out = io.StringIO()
    cli._print_stats(stats, {domid: "guest"}, out)
    table = out.getvalue().splitlines()
    assert re.fullmatch(rf"  guest +{listener:#018x} +passive +- +0 B +0 B", table[3])
    assert re.fullmatch(rf"  guest +{active:#018x} +active +{cpu} +0 B +0 B", table[4])
    assert table[5:] == [f"Active sockets per ioworker CPU: {counts}"]
    # In that order whatever order the snapshot lists them in.
    out = io.StringIO()
    cli._print_stats(dataclasses.replace(stats, sockets=stats.sockets[::-1]), {domid: "guest"}, out)
    assert out.getvalue().splitlines() == table
    raw.close()


def test_bad_policy_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[default]\nmax_sockets = 'lots'\n")
    argv = ["serve", "--platform", "sim", "--run-dir", str(tmp_path), "--policy", str(policy)]
    assert f"--policy {policy}" in usage_error(argv, capsys)


def test_endless_policy_file(tmp_path: Path) -> None:
    # --policy /dev/zero (or a huge file given by mistake) must be refused,
    # not read until memory runs out: 1 GiB of address space is plenty.
    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    serve = subprocess.run(
        [*script("pvcalls-backend"), "serve", "--platform", "sim", "--run-dir", str(tmp_path),
         "--policy", "/dev/zero"],
        capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=limit_memory,
    )
    assert serve.returncode == 2, serve.stderr
    assert serve.stderr.splitlines()[-1] == (
        "pvcalls-backend serve: error: --policy /dev/zero: larger than 1 MiB, "
        "too large for a policy file")


def test_serve_xen_without_xen_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    if Path("/dev/xen/evtchn").exists():
        pytest.skip("this machine runs Xen")
    assert "cannot open the Xen platform" in usage_error(["serve", "--platform", "xen"], capsys)


# -- serve + pvcalls-nc against a xenback-sim daemon ------------------------------------


class Lines:
    """The lines of a subprocess pipe, read by a thread as they come."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            with self._cond:
                self.lines.append(raw.decode(errors="replace"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        """The first line containing ``text``, waiting for it to arrive."""
        def found() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None or self._eof, timeout)
            line = found()
        assert line is not None, f"no {text!r} in {self.lines}"
        return line


@contextlib.contextmanager
def run_daemon(run_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A ``xenback-sim`` daemon with one guest: ``(process, domid)``; on
    leaving, SIGTERM if it is still running, and it must exit 0."""
    proc = subprocess.Popen(
        [*script("xenback-sim"), "--run-dir", str(run_dir), "--domain", "nc-guest"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        ready = Lines(proc.stdout).wait_for("DOMAIN nc-guest")  # printed once ready
        yield proc, int(ready.split()[2])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A ``xenback-sim`` daemon with one guest: ``(run_dir, domid)``."""
    run_dir = tmp_path / "run"
    with run_daemon(run_dir) as (_, domid):
        yield run_dir, domid


class EchoServer:
    """Host echo server that closes after ``expected`` bytes, so that the
    guest side sees end of stream (PV Calls cannot half-close)."""

    def __init__(self, expected: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.expected = expected
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            got = 0
            while got < self.expected:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
                got += len(data)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(TIMEOUT)


def test_serve_and_nc_then_sigterm(daemon: tuple[Path, int]) -> None:
    run_dir, domid = daemon
    serve = subprocess.Popen(
        [*script("pvcalls-backend"), "serve", "--platform", "sim", "--run-dir", str(run_dir),
         "--max-ioworkers", "2", "--log-level", "INFO"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    log = Lines(serve.stderr)
    try:
        log.wait_for("serving")

        data = os.urandom(200_000)
        echo = EchoServer(len(data))
        try:
            nc = subprocess.run(
                [*script("pvcalls-nc"), "--run-dir", str(run_dir), "--domid", str(domid),
                 "-w", "10", *map(str, echo.address)],
                input=data, capture_output=True, timeout=TIMEOUT,
            )
        finally:
            echo.close()
        assert nc.returncode == 0, nc.stderr.decode()
        assert nc.stdout == data

        # Listening: a host client reaches the guest's pvcalls-nc -l.
        port = unused_port()
        listener = subprocess.Popen(
            [*script("pvcalls-nc"), "--run-dir", str(run_dir), "--domid", str(domid),
             "-v", "-l", "127.0.0.1", str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            assert listener.stdin is not None and listener.stdout is not None
            listener.stdin.write(b"from the guest")
            listener.stdin.close()
            said = Lines(listener.stderr)
            said.wait_for("listening on 127.0.0.1")
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
                client.sendall(b"from the host")
                got = b""
                while len(got) < 14 and (chunk := client.recv(100)):
                    got += chunk
                assert got == b"from the guest"
            assert listener.wait(TIMEOUT) == 0, said.lines
            assert listener.stdout.read() == b"from the host"
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()

        # SIGUSR1: the backend logs its sockets (the guests have gone).
        serve.send_signal(signal.SIGUSR1)
        assert "0 sockets" in log.wait_for("frontends,")

        # SIGTERM with a guest connected (waiting in accept): the backend
        # closes its frontend, which sees the backend go and gives up.
        waiting = subprocess.Popen(
            [*script("pvcalls-nc"), "--run-dir", str(run_dir), "--domid", str(domid),
             "-v", "-l", "127.0.0.1", str(unused_port())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            said = Lines(waiting.stderr)
            said.wait_for("listening on 127.0.0.1")
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(TIMEOUT) == 0
            assert waiting.wait(TIMEOUT) != 0
            # Its accept failed: the backend went Closing or Closed.
            said.wait_for(f"[Errno {errno.ENOTCONN}] the PV Calls backend went away")
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    log.wait_for("closing every frontend")
    log.wait_for("pvcalls backend stopped")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["127.0.0.1"], "HOST PORT"),
        (["127.0.0.1", "http"], "not a number"),
        (["127.0.0.1", "8_0"], "port '8_0' is not a number"),
        (["127.0.0.1", "0"], "out of range"),
        # A negative number is a number, and out of range: said as the
        # backend's --max-ioworkers says it, not "is not a number".
        (["127.0.0.1", "-5"], "port -5 is out of range"),
        (["-l", "-5"], "port -5 is out of range"),
        # The kernel would pick a port, but PV Calls never tells the guest
        # which: nobody could reach the listener.
        (["-l", "0"], "port 0: the guest would never learn the port the backend picks; "
                      "give one (1-65535)"),
        (["-l", "127.0.0.1", "00"], "port 00: the guest would never learn"),
        # Names the resolver could not even be asked about (IDNA refuses
        # the first; the second is an undecodable byte of the command line).
        (["b\u00fccher..de", "80"], "host 'b\u00fccher..de' is not a valid host name"),
        (["\udcff", "80"], "host '\\udcff' is not a valid host name"),
        (["-l", "b\u00fccher..de", "80"], "host 'b\u00fccher..de' is not a valid host name"),
        (["--run-dir", "", "127.0.0.1", "80"], "argument --run-dir: empty path"),
        (["--domid", "0", "127.0.0.1", "80"], "argument --domid: 0 is not a guest"),
        (["--domid", "32752", "127.0.0.1", "80"], "argument --domid: 32752 is not a guest"),
        (["--domid", "9" * 30, "127.0.0.1", "80"], f"argument --domid: {'9' * 30} is not"),
        # More digits than int() converts: a traceback for the port, and
        # "invalid _domid value" (our function's name) for the domid.
        (["127.0.0.1", "9" * 5000], f"port {'9' * 5000} is out of range"),
        # Just past int()'s limit (0: none), whatever it is set to.
        (["127.0.0.1", "9" * ((sys.get_int_max_str_digits() or 4300) + 1)], "is out of range"),
        (["--domid", "9" * 5000, "127.0.0.1", "80"],
         f"argument --domid: {'9' * 5000} is not a guest domain id"),
        (["--domid", "one", "127.0.0.1", "80"], "argument --domid: 'one' is not"),
        (["--domid", "-1", "127.0.0.1", "80"],
         "argument --domid: -1 is not a guest domain id (1 to 32751)"),
        (["--domid", "1_0", "127.0.0.1", "80"], "argument --domid: '1_0' is not"),
        (["--domid", "\uff11", "127.0.0.1", "80"], "argument --domid: '\uff11' is not"),
        (["-w", "nan", "127.0.0.1", "80"], "argument -w/--wait: nan is not"),
        (["-w", "inf", "127.0.0.1", "80"], "argument -w/--wait: inf is too long"),
        (["-w", "1e300", "127.0.0.1", "80"], "argument -w/--wait: 1e300 is too long"),
        (["-w", "-1", "127.0.0.1", "80"], "argument -w/--wait: -1 is not"),
        # A timeout of 0 would make the socket non-blocking: connect and
        # accept would fail at once, with EAGAIN ("no connection pending").
        (["-w", "0", "127.0.0.1", "80"], "argument -w/--wait: 0 is not more than 0 seconds"),
        (["-w", "0.0", "-l", "80"], "argument -w/--wait: 0.0 is not more than 0 seconds"),
        (["-w", "1e-400", "127.0.0.1", "80"], "argument -w/--wait: 1e-400 is not more than 0"),
        (["-w", "soon", "127.0.0.1", "80"], "argument -w/--wait: 'soon' is not"),
        (["-q", "nan", "127.0.0.1", "80"], "argument -q/--quit-after: nan is not"),
        (["-q", "inf", "127.0.0.1", "80"], "argument -q/--quit-after: inf is too long"),
    ],
)
def test_nc_bad_options(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pvcalls._nc import main as nc_main

    with pytest.raises(SystemExit) as info:
        nc_main(["--run-dir", "/nonexistent", "--domid", "1", *options])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: pvcalls-nc" in err


@pytest.mark.parametrize(("options", "domid", "address"), [
    (["-l", "80"], 1, ("0.0.0.0", 80)),  # -l without HOST: every address
    (["-l", "127.0.0.1", "1"], 1, ("127.0.0.1", 1)),
    (["127.0.0.1", "65535"], 1, ("127.0.0.1", 65535)),
    # Leading zeros do not count towards the number's length.
    (["--domid", "00000000032751", "127.0.0.1", "00000000080"], 32751, ("127.0.0.1", 80)),
])
def test_nc_options_taken(options: list[str], domid: int, address: tuple[str, int]) -> None:
    from pvcalls._nc import _parse_address, _parser

    parser = _parser()
    args = parser.parse_args(["--run-dir", "/nonexistent", "--domid", "1", *options])
    assert (args.domid, _parse_address(parser, args)) == (domid, address)


def test_nc_takes_the_log_levels_pvcalls_backend_takes() -> None:
    from pvcalls._nc import _parser

    def levels(parser: argparse.ArgumentParser) -> list[str]:
        (action,) = [a for a in parser._actions if a.dest == "log_level"]
        return list(action.choices or ())

    assert levels(_parser()) == levels(cli._parser()[0])
    args = _parser().parse_args(["--run-dir", "/x", "--domid", "1", "--log-level", "critical",
                                 "127.0.0.1", "80"])
    assert args.log_level == "CRITICAL"


def test_nc_help_lists_its_exit_statuses() -> None:
    """As serve's does: a script's author looks there, not in the code."""
    from pvcalls._nc import _parser

    text = _parser().format_help()
    _, _, table = text.partition("\nexit status:\n")
    statuses = re.findall(r"^  (\d+) ", table, re.MULTILINE)
    assert statuses == ["0", "1", "2", "129", "130", "141", "143"], text


def test_nc_without_host_fails_clearly(tmp_path: Path) -> None:
    nc = subprocess.run(
        [*script("pvcalls-nc"), "--run-dir", str(tmp_path), "--domid", "1", "127.0.0.1", "80"],
        input=b"", capture_output=True, timeout=TIMEOUT,
    )
    assert nc.returncode == 1
    assert b"pvcalls-nc:" in nc.stderr and b"Traceback" not in nc.stderr


@pytest.mark.parametrize(("name", "make", "said"), [
    ("run", False, "no such directory (is xenback-sim running?)"),
    ("run", True, "not a directory"),
    # Not even looked up: it said "[Errno 36] File name too long: 'DIR'".
    ("r" * 256, False, "File name too long"),
])
def test_nc_on_a_run_dir_that_is_none_says_so(
        tmp_path: Path, name: str, make: bool, said: str) -> None:
    # As serve says it.  It used to be "no domain 1 on a simulated host in
    # DIR (DIR/domains/1/hypervisor: ...)": as if the host were there.
    run_dir = tmp_path / name
    if make:
        run_dir.touch()
    nc = subprocess.run(
        [*script("pvcalls-nc"), "--run-dir", str(run_dir), "--domid", "1", "127.0.0.1", "80"],
        input=b"", capture_output=True, timeout=TIMEOUT,
    )
    assert (nc.returncode, nc.stderr.decode()) == (
        1, f"pvcalls-nc: --run-dir {run_dir}: {said}\n")
