"""``xenback-sim``: the simulated host as a daemon."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pyxs
from fdcensus import descriptors
from hosthelpers import wait_pending
from racewindow import TIMEOUT

from xenback.platform import EventChannelError, GrantError
from xenback.sim import EventChannel, _daemon, attach, stdio_to_devnull
from xenback.sim._xenstored._server import MIN_QUEUED


def start(run_dir: Path, *args: str, sighup: signal.Handlers = signal.SIG_DFL,
          preexec: Callable[[], object] | None = None, **popen: Any) -> subprocess.Popen[str]:
    """``xenback-sim --run-dir run_dir *args``, its output piped as text;
    ``preexec`` runs in the child before it starts, ``popen`` goes to Popen."""
    # The SIGHUP disposition is set, not inherited: under nohup the tests'
    # own is SIG_IGN.
    # Nor is PYTHONUNBUFFERED: the daemon flushes its ready lines itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def child() -> None:
        signal.signal(signal.SIGHUP, sighup)
        if preexec is not None:
            preexec()

    return subprocess.Popen(
        [sys.executable, "-m", "xenback.sim._daemon", "--run-dir", str(run_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=child,
        **popen,
    )


@contextlib.contextmanager
def started(run_dir: Path, *args: str, **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    """:func:`start`, and at the end the process killed if it still runs
    and its pipes read and closed: also for a test expecting it to exit by
    itself, which on a regression would leave it running (communicate()'s
    timeout does not kill it)."""
    proc = start(run_dir, *args, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, list[str]]]:
    """A daemon with one guest: (process, run dir, its first output lines)."""
    run_dir = tmp_path / "run"
    with started(run_dir, "--domain", "guest") as proc:
        assert proc.stdout is not None
        yield proc, run_dir, [proc.stdout.readline().strip(), proc.stdout.readline().strip()]


def test_prints_the_socket_then_the_domains(
    daemon: tuple[subprocess.Popen[str], Path, list[str]],
) -> None:
    _, run_dir, lines = daemon
    assert lines == [f"XENSTORED_PATH={run_dir / 'xenstored' / 'socket'}", "DOMAIN guest 1"]


def test_clients_find_it_by_path_and_by_rundir(
    daemon: tuple[subprocess.Popen[str], Path, list[str]],
) -> None:
    _, run_dir, lines = daemon
    path = lines[0].split("=", 1)[1]
    with pyxs.Client(unix_socket_path=path) as c:
        assert c.read(b"/local/domain/1/name") == b"guest"
    if shutil.which("xenstore-read") is None:
        pytest.skip("xenstore-utils is not installed")
    for env in ({"XENSTORED_PATH": path}, {"XENSTORED_RUNDIR": str(run_dir / "xenstored")}):
        out = subprocess.run(
            ["xenstore-read", "/local/domain/1/name"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert out.stdout.strip() == "guest", (env, out.stderr)


def test_processes_join_through_the_run_dir(
    daemon: tuple[subprocess.Popen[str], Path, list[str]],
) -> None:
    _, run_dir, _ = daemon
    dom0, guest = attach(run_dir, 0), attach(run_dir, 1)
    with guest.gntshr() as shr, dom0.gnttab() as tab:
        pages = shr.share_pages(0, 1)
        pages.buffer[0:3] = b"abc"
        with tab.map_grant_refs(1, pages.refs) as mapping:
            assert bytes(mapping.buffer[0:3]) == b"abc"
    with guest.evtchn() as e1, dom0.evtchn() as e0:
        p0 = e0.bind_interdomain(1, e1.bind_unbound_port(0))
        e1.notify(e1.ports()[0])
        assert wait_pending(e0) == p0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_closes_everything_and_exits_0(
    daemon: tuple[subprocess.Popen[str], Path, list[str]], sig: signal.Signals
) -> None:
    proc, run_dir, _ = daemon
    proc.send_signal(sig)
    assert proc.wait(10) == 0
    leftovers = [p for p in run_dir.rglob("*") if not p.is_dir()]
    assert leftovers == []


def test_under_nohup_sighup_is_ignored(tmp_path: Path) -> None:
    with started(tmp_path / "run", "-v", sighup=signal.SIG_IGN) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("XENSTORED_PATH=")
        # Both pending at once if SIGHUP were waited for: sigwait takes the
        # lower number, SIGHUP's, first.
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "SIGTERM: shutting down" in err and "SIGHUP" not in err


def test_unusable_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with started(not_a_dir) as proc:
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1
    # Not mkdir()'s "File exists": it does, and is no directory.
    assert err == (f"xenback-sim: cannot start in {not_a_dir}: "
                   f"[Errno {errno.ENOTDIR}] Not a directory: '{not_a_dir}'\n"), err


def test_an_empty_run_dir_is_a_usage_error(tmp_path: Path) -> None:
    # Path("") is the current directory: `--run-dir "$RUN_DIR"` with the
    # variable unset would have served from wherever it was started.
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenback.sim._daemon", "--run-dir", ""],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert (proc.returncode, out) == (2, "")
    assert "xenback-sim: error: argument --run-dir: empty path" in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def signal_mask() -> Iterator[None]:
    """This process's signal mask, as it was before the test: main() blocks
    the stop signals for its sigwait, and they are not this process's."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@pytest.fixture
def no_host(monkeypatch: pytest.MonkeyPatch, signal_mask: None) -> None:
    """main() in this process must stop before it makes the host: were an
    option it should refuse taken, the test fails there, rather than wait
    in sigwait for a signal that never comes."""
    def made(*_args: object, **_kwargs: object) -> None:
        pytest.fail("the host was made: the option was taken")

    monkeypatch.setattr(_daemon, "SimHost", made)


@pytest.mark.parametrize("domains", [["", "g"], ["a/b"], ["g", "h", "g"], ["caf\u00e9"]])
def test_a_bad_domain_name_is_a_usage_error_before_the_host_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_host: None,
        domains: list[str]) -> None:
    run_dir = tmp_path / "run"
    argv = ["--run-dir", str(run_dir)]
    for name in domains:
        argv += ["--domain", name]
    with pytest.raises(SystemExit) as exit_:
        _daemon.main(argv)
    assert exit_.value.code == 2
    assert "xenback-sim: error: argument --domain: " in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--timeout", "watch-event=-1"], "argument -w/--timeout: watch-event must be"),
    (["--timeout", "watch-event=soon"], "argument -w/--timeout: watch-event must be"),
    (["--timeout", "watch-event=nan"], "argument -w/--timeout: watch-event must be"),
    # Never is 0, as in cxenstored.
    (["--timeout", "watch-event=inf"], "argument -w/--timeout: watch-event must be"),
    (["--timeout", "watch-event=1e400"], "argument -w/--timeout: watch-event must be"),
    (["--timeout", "event=5"], "argument -w/--timeout: unknown timeout 'event'"),
    (["-w", "20"], "argument -w/--timeout: expected WHAT=SECONDS"),
    (["--max-queued", "1000"], "argument --max-queued: must be at least"),
    (["--max-queued", "lots"], "argument --max-queued: not a number of bytes: 'lots'"),
])
def test_a_bad_xenstored_option_is_a_usage_error_before_the_host_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], no_host: None,
        args: list[str], message: str) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        _daemon.main(["--run-dir", str(run_dir), *args])
    assert exit_.value.code == 2
    assert f"xenback-sim: error: {message}" in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.parametrize(("args", "expected"), [
    ([], {"max_queued": 1 << 20, "watch_event_timeout": 20.0}),
    (["-w", "watch-event=2.5", "--max-queued", "300000"],
     {"max_queued": 300000, "watch_event_timeout": 2.5}),
    # 0: never, as cxenstored's -w watch-event=0.
    (["--timeout", "watch-event=0"], {"max_queued": 1 << 20, "watch_event_timeout": None}),
    # The last -w wins, as in cxenstored; the least --max-queued is taken.
    (["-w", "watch-event=5", "-w", "watch-event=2.5", "--max-queued", str(MIN_QUEUED)],
     {"max_queued": MIN_QUEUED, "watch_event_timeout": 2.5}),
    # Past cxenstored's C ints, as SimHost takes them: limits never reached.
    (["-w", "watch-event=1e300", "--max-queued", str(2 ** 100)],
     {"max_queued": 2 ** 100, "watch_event_timeout": 1e300}),
])
def test_xenstored_options_reach_the_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        signal_mask: None, args: list[str], expected: dict[str, object]) -> None:
    made: list[dict[str, object]] = []

    class Host:
        def __init__(self, _run_dir: Path, **kwargs: object) -> None:
            made.append(kwargs)

        def start(self) -> None:
            raise OSError(errno.EACCES, "no")  # enough: it was made

    monkeypatch.setattr(_daemon, "SimHost", Host)
    assert _daemon.main(["--run-dir", str(tmp_path / "run"), *args]) == 1
    assert made == [expected]
    assert "cannot start" in capsys.readouterr().err


def test_guests_are_created_from_other_processes(
    daemon: tuple[subprocess.Popen[str], Path, list[str]],
) -> None:
    from xenback.sim import create_domain, destroy_domain

    _, run_dir, _ = daemon
    guest = create_domain(run_dir, "late")
    assert guest.domid == 2
    assert attach(run_dir, 2).name == "late"
    with guest.xenstore() as c:
        assert c.read(b"domid") == b"2"
    destroy_domain(run_dir, 2)
    with pytest.raises(OSError):
        attach(run_dir, 2)


def test_the_installed_command_prints_one_line_and_stops_cleanly(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "xenback-sim"
    if not script.exists():
        pytest.skip(f"the xenback-sim console script is not installed at {script}")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [script, "--run-dir", run_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready == f"XENSTORED_PATH={run_dir / 'xenstored' / 'socket'}\n"
        with pyxs.Client(unix_socket_path=ready.strip().split("=", 1)[1]) as c:
            assert c.read(b"/local/domain/0/name") == b"Domain-0"
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert (proc.returncode, out, err) == (0, "", "")


class OutOfDescriptors:
    """A daemon whose guest has used up every descriptor of the service
    (see :func:`out_of_descriptors`)."""

    def __init__(self, proc: subprocess.Popen[str], run_dir: Path) -> None:
        self.proc = proc
        self.run_dir = run_dir
        self.hostile: list[EventChannel] = []
        self.idle: list[socket.socket] = []

    def release(self) -> None:
        """The guest lets go of everything it took."""
        for ch in self.hostile:
            ch.close()
        for sock in self.idle:
            sock.close()
        self.hostile, self.idle = [], []

    def first_request(self, domid: int) -> OSError | None:
        """How the first request of a new handle of ``domid`` fails (None:
        it did not fail in the service, only for what it asked)."""
        result: list[OSError | None] = []

        def call() -> None:
            try:
                with attach(self.run_dir, domid).gnttab() as tab:
                    tab.map_grant_refs(1, [8])
            except GrantError as e:
                result.append(None if e.errno == errno.EINVAL else e)  # ref 8: not granted
            except OSError as e:
                result.append(e)
            else:
                result.append(None)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        thread.join(TIMEOUT)
        assert result, f"a handle of domain {domid} waits forever for the service"
        return result[0]


@contextlib.contextmanager
def out_of_descriptors(run_dir: Path) -> Iterator[OutOfDescriptors]:
    """A daemon with one guest (domain 1) that has used up every
    descriptor of the service, under a low RLIMIT_NOFILE: every port it
    binds is a descriptor in the service."""

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    with started(run_dir, "--domain", "g", preexec=low_limit) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("XENSTORED_PATH=")
        assert proc.stdout.readline().strip() == "DOMAIN g 1"
        state = OutOfDescriptors(proc, run_dir)
        guest = attach(run_dir, 1)
        try:
            with pytest.raises(EventChannelError) as info:
                for _ in range(4):  # at most 256 ports per handle would be needed
                    state.hostile.append(guest.evtchn())
                    for _ in range(100):
                        state.hostile[-1].bind_unbound_port(0)
            assert info.value.errno == errno.EMFILE
            # A pipe takes two descriptors: the last one goes to an idle
            # handle (each costs the service its connection), and any more
            # wait.
            for _ in range(3):
                state.idle.append(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
                state.idle[-1].connect(str(run_dir / "domains" / "1" / "hypervisor"))
            yield state
        finally:
            state.release()


def test_a_guest_that_uses_up_the_descriptors_gets_errors_and_hangs_nobody(
    tmp_path: Path,
) -> None:
    """Once a guest has used up the service's descriptors, its requests
    fail with EMFILE rather than an internal error with a traceback, and a
    new handle, of any domain, fails at once, with EMFILE too (the service
    is short, no domain or host is missing), rather than waiting forever
    in the backlog of a listener the service can no longer accept from
    (while spinning on it)."""
    with out_of_descriptors(tmp_path / "run") as host:
        for domid in (1, 0):
            error = host.first_request(domid)
            assert isinstance(error, OSError) and error.errno == errno.EMFILE, error
            assert "out of descriptors" in str(error), error
        # Once the guest lets go, everybody is served again.
        host.release()
        deadline = time.monotonic() + TIMEOUT  # the service sees the closes asynchronously
        while (error := host.first_request(0)) is not None and error.errno == errno.EMFILE:
            assert time.monotonic() < deadline, "the service never got its descriptors back"
        assert error is None, error
        host.proc.terminate()
        _, err = host.proc.communicate(timeout=TIMEOUT)
        assert host.proc.returncode == 0
        assert "Traceback" not in err
        assert "out of descriptors" in err


def test_serve_on_a_host_out_of_descriptors_is_worth_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """``pvcalls-backend serve`` on a host that cannot take its handles
    exits 1, which its systemd unit restarts on (the host may have
    descriptors again by then), not 2 (no host, never restarted)."""
    from pvcalls._cli import main

    with out_of_descriptors(tmp_path / "run") as host:
        with pytest.raises(SystemExit) as info:
            main(["serve", "--platform", "sim", "--run-dir", str(host.run_dir)])
    err = capsys.readouterr().err
    assert info.value.code == 1, err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(
        "pvcalls-backend serve: error: cannot open the platform "
        f"(short of resources, worth a restart): [Errno {errno.EMFILE}] "), err


def test_only_its_user_may_connect_whatever_the_umask(tmp_path: Path) -> None:
    """Whoever connects to a domain's socket acts as that domain (dom0's
    may create and destroy guests and map what they grant to dom0): the
    sockets are the user's alone, as a real xenstored's is root's, even
    when the daemon runs under a permissive umask."""
    run_dir = tmp_path / "run"
    with started(run_dir, "--domain", "g", umask=0) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("XENSTORED_PATH=")
        assert proc.stdout.readline().strip() == "DOMAIN g 1"
        sockets = [p for p in run_dir.rglob("*") if p.is_socket()]
        assert len(sockets) == 4  # xenstored, dom0's hypervisor, the guest's two
        modes = {p.relative_to(run_dir).as_posix(): oct(p.stat().st_mode & 0o777) for p in sockets}
        assert modes == dict.fromkeys(modes, oct(0o600))
        proc.terminate()
        assert proc.wait(TIMEOUT) == 0


def test_a_guest_named_like_dom0_exits_2_and_leaves_nothing(tmp_path: Path) -> None:
    # Only the running host knows the name is taken: it stops again.
    run_dir = tmp_path / "run"
    with started(run_dir, "--domain", "Domain-0") as proc:
        out, err = proc.communicate(timeout=TIMEOUT)
    assert (proc.returncode, out) == (2, "")
    assert err == "xenback-sim: a domain named 'Domain-0' exists already\n"
    assert not run_dir.exists()


def test_the_descriptor_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    """Every event channel costs the service descriptors: it lifts its soft
    limit as far as it may go, as servers of many connections do."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard descriptor limit ({hard}) leaves nothing to raise")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    with started(tmp_path / "run", preexec=low_soft_limit) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("XENSTORED_PATH=")
        soft, _ = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        assert soft == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
        proc.terminate()
        assert proc.wait(TIMEOUT) == 0


def test_a_run_dir_left_by_a_killed_daemon_is_reused_and_left_clean(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with started(run_dir, "--domain", "a", "--domain", "b") as killed:
        assert killed.stdout is not None
        assert killed.stdout.readline().startswith("XENSTORED_PATH=")
        assert killed.stdout.readline().strip() == "DOMAIN a 1"
        assert killed.stdout.readline().strip() == "DOMAIN b 2"
        killed.kill()
        killed.wait(TIMEOUT)
    assert (run_dir / "domains" / "2" / "hypervisor").is_socket()  # its leftovers
    with started(run_dir, "--domain", "x") as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("XENSTORED_PATH=")
        assert proc.stdout.readline().strip() == "DOMAIN x 1"
        # Domain 2 is no more: nothing of it is left to be mistaken for it.
        assert not (run_dir / "domains" / "2").exists()
        with pytest.raises(OSError) as no_domain:
            attach(run_dir, 2)
        assert no_domain.value.errno == errno.ENOENT
        proc.terminate()
        assert proc.wait(TIMEOUT) == 0
    assert list(run_dir.rglob("*")) == []


def test_a_closed_stdout_stops_it_cleanly_saying_why(tmp_path: Path) -> None:
    # Nobody will read the ready lines (the reader is gone): exit 1 and
    # a word on stderr, no traceback, nothing left in the run dir.
    run_dir = tmp_path / "run"
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xenback.sim", "--run-dir", str(run_dir), "--domain", "g"],
            stdout=w, stderr=subprocess.PIPE, text=True,
        )
    finally:
        os.close(w)
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert "Traceback" not in err and "Exception ignored" not in err
    assert err.startswith("xenback-sim: cannot write to stdout: ")
    assert not run_dir.exists()


@pytest.mark.parametrize(("redirect", "why"), [
    # Descriptor 1 closed: Python's print() quietly wrote nothing: it
    # served on, its ready lines lost, and its sockets took descriptor 1.
    (">&-", "it is closed"),
    # Python opens descriptor 1 as stdout whatever its mode: the host
    # started, then the ready lines failed with EBADF.
    ("1</dev/null", "it is open only for reading"),
])
def test_an_unusable_stdout_is_said_before_the_host_starts(tmp_path: Path, redirect: str,
                                                           why: str) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        ["sh", "-c", f'exec "$@" {redirect}', "sh", sys.executable, "-m", "xenback.sim",
         "--run-dir", str(run_dir), "--domain", "g"],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT,
    )
    assert (proc.returncode, proc.stderr) == (1, f"xenback-sim: cannot write to stdout: {why}\n")
    assert not run_dir.exists()


def test_a_domain_the_host_cannot_create_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    # Room in the socket paths for domids 0..9, not for 10: the tenth
    # guest's hypervisor socket path is one byte too long.
    longest = len("/domains/10/hypervisor")
    pad = 107 - longest + 1 - len(str(tmp_path)) - 1
    if pad < 1:
        pytest.skip(f"{tmp_path} is too long for this test")
    run_dir = tmp_path / ("r" * pad)
    args = [arg for i in range(1, 11) for arg in ("--domain", f"g{i}")]
    with started(run_dir, *args) as proc:
        out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1
    assert "Traceback" not in err
    assert err.startswith("xenback-sim: cannot create domain 'g10': ")
    assert "AF_UNIX path too long" in err
    assert out == ""
    assert not run_dir.exists()


def on_devnull() -> set[int]:
    """This process's descriptors open on /dev/null: what stdio_to_devnull()
    opens, told apart from what other threads (one an earlier test left,
    say) open and close meanwhile, which a census of the whole process
    would count."""
    return {fd for fd, what in descriptors() if what == os.devnull}


def test_stdio_to_devnull_quiets_an_output_whose_reader_is_gone() -> None:
    # What xenback-sim and pvcalls-backend demo do on EPIPE: the stream's
    # descriptor becomes /dev/null (its buffer then flushes quietly at
    # exit), and nothing else is left open.
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as stream:
        before = on_devnull()
        stream.write("never read")
        stdio_to_devnull(stream)
        after = on_devnull()
        stream.flush()  # no BrokenPipeError
    assert after == before | {write_end}


def test_stdio_to_devnull_leaves_nothing_open_when_it_fails() -> None:
    # A descriptor number past any the process may hold: dup2 refuses it
    # (EBADF), and the /dev/null opened for it is closed all the same.
    class Stream:
        def fileno(self) -> int:
            return 2 ** 31 - 1

    before = on_devnull()
    with pytest.raises(OSError) as raised:
        stdio_to_devnull(Stream())  # type: ignore[arg-type]
    assert raised.value.errno == errno.EBADF
    assert on_devnull() == before
