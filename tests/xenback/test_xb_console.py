"""examples/console_backend.py against a simulated guest writing to its
console ring."""

from __future__ import annotations

import errno
import os
import select
import struct
import subprocess
import sys
import threading
import time

import pytest
from scripts import ROOT, load_script

from tests.xenback.xbhelpers import TIMEOUT, Census, check_public_apis_only, leaked_threads
from xenback import BackendDevice, FlexRing, XenbusState, wire

S = XenbusState
console_backend = load_script(ROOT / "examples" / "console_backend.py", "console_backend")

IFACE = "struct xencons_interface"
IDX = wire.offsetof(IFACE, "in_cons")


class Guest:
    """The guest side of a console: its rings as the producer of ``out``
    and the consumer of ``in``, laid out from ``console.h``'s offsets here
    rather than by the example's ``console_rings``, so that a mistake there
    shows up as garbled bytes."""

    def __init__(self, fe) -> None:
        self.fe = fe
        fe.share()
        page = fe.pages.buffer
        idx = page[IDX : IDX + 16]

        def off(f: str) -> int:
            return wire.offsetof(IFACE, f) - IDX

        out, inp = wire.offsetof(IFACE, "out"), wire.offsetof(IFACE, "in")
        self.out = FlexRing(page[out : out + 2048], idx, prod_offset=off("out_prod"),
                            cons_offset=off("out_cons"))
        self.inp = FlexRing(page[inp : inp + 1024], idx, prod_offset=off("in_prod"),
                            cons_offset=off("in_cons"))
        self.page = page

    def wait_event(self) -> None:
        ready, _, _ = select.select([self.fe.evtchn.fileno()], [], [], TIMEOUT)
        assert ready, "no event from the backend"
        port = self.fe.evtchn.pending()
        if port is not None:
            self.fe.evtchn.unmask(port)

    def write(self, data: bytes) -> None:
        """Write everything, waiting for the backend to make room."""
        while data:
            done = 0
            for view in self.out.writable():
                n = min(len(view), len(data) - done)
                view[:n] = data[done : done + n]
                done += n
            self.out.produce(done)
            self.fe.evtchn.notify(self.fe.port)
            data = data[done:]
            if data:
                self.wait_event()

    def read(self) -> bytes:
        data = b"".join(bytes(v) for v in self.inp.readable())
        self.inp.consume(len(data))
        return data

    def read_exactly(self, size: int) -> bytes:
        """Read ``size`` bytes of input, telling the backend whenever it
        freed space (the backend refills the ring then)."""
        got = self.read()
        while len(got) < size:
            self.fe.evtchn.notify(self.fe.port)
            self.wait_event()
            got += self.read()
        return got


@pytest.fixture
def console(host, tmp_path):
    before = {t.ident for t in threading.enumerate()}
    received: list[tuple[int, bytes]] = []
    cond = threading.Condition()

    def on_output(domid: int, data: bytes) -> None:
        with cond:
            received.append((domid, data))
            cond.notify_all()

    backend = console_backend.ConsoleBackend(host.dom0, tmp_path, on_output=on_output)
    backend.received, backend.cond = received, cond

    def wait_output(domid: int, size: int) -> bytes:
        def got() -> bytes:
            return b"".join(d for i, d in received if i == domid)

        with cond:
            assert cond.wait_for(lambda: len(got()) >= size, TIMEOUT), got()
            return got()

    backend.wait_output = wait_output
    with backend:
        yield backend
    assert not leaked_threads(before)


def _start(host, frontends, name="guest"):
    domain = host.create_domain(name)
    dev = host.toolstack.add_device("console", domain.domid)
    fe = frontends(domain, dev)
    fe.wait_backend(S.INIT_WAIT)
    guest = Guest(fe)
    return domain, dev, fe, guest


def test_guest_output_is_logged_across_ring_wraps(host, console, frontends, tmp_path) -> None:
    domain, dev, fe, guest = _start(host, frontends)
    guest.write(b"early output, before the backend connected\n")
    fe.publish()
    fe.wait_backend(S.CONNECTED)
    text = os.urandom(3000).hex().encode() + b"\n"  # 6001 bytes: three trips round a 2 KiB ring
    guest.write(text)
    expected = b"early output, before the backend connected\n" + text
    assert console.wait_output(domain.domid, len(expected)) == expected
    assert (tmp_path / f"console-{domain.domid}.log").read_bytes() == expected
    prod, cons = struct.unpack_from("<II", guest.page, IDX + 8)
    assert cons == prod == len(expected)


def test_an_event_before_the_port_is_known_loses_no_notify(
        host, console, frontends, monkeypatch) -> None:
    """The guest may notify as soon as the backend binds its port, before
    bind_evtchn() has returned it: a run then must not drain the ring and
    notify a port the console does not know yet (0, dropped), or a guest
    waiting for room waits for ever.  Here that event comes at the worst
    moment, and its work, if queued, runs before bind_evtchn() returns."""
    real_bind = BackendDevice.bind_evtchn

    def bind_then_event(dev, remote_port, callback):
        port = real_bind(dev, remote_port, callback)
        callback(port)
        dev.driver_data.flush()
        return port

    monkeypatch.setattr(BackendDevice, "bind_evtchn", bind_then_event)
    domain, dev, fe, guest = _start(host, frontends)
    guest.write(b"output the guest waits to see consumed\n")
    fe.publish()
    fe.wait_backend(S.CONNECTED)
    # The backend consumed it and said so, on the right port (a wake-up
    # with no port pending is allowed: look again).
    deadline = time.monotonic() + TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fe.evtchn.fileno()], [], [], left)[0]:
            if fe.evtchn.pending() == fe.port:
                break
    else:
        raise AssertionError("no event from the backend")
    prod, cons = struct.unpack_from("<II", guest.page, IDX + 8)
    assert cons == prod


def test_input_is_forwarded(host, console, frontends) -> None:
    domain, dev, fe, guest = _start(host, frontends)
    fe.publish()
    fe.wait_backend(S.CONNECTED)
    assert console.send_input(domain.domid, b"root\n") is True
    assert console.send_input(domain.domid + 40, b"x") is False
    assert guest.read_exactly(5) == b"root\n"
    # More input than the 1 KiB ring holds goes in as the guest reads.
    big = bytes(range(256)) * 6
    console.send_input(domain.domid, big)
    assert guest.read_exactly(len(big)) == big


def test_two_guests_and_a_hostile_one(host, console, frontends, dom0_xs, tmp_path) -> None:
    good, _, good_fe, good_guest = _start(host, frontends, "good")
    good_fe.publish()
    good_fe.wait_backend(S.CONNECTED)
    census = Census(host, console)
    bad, bad_dev, bad_fe, bad_guest = _start(host, frontends, "bad")
    bad_fe.publish()
    bad_fe.wait_backend(S.CONNECTED)
    struct.pack_into("<II", bad_guest.page, IDX + 8, 0, 4096)  # out_cons 0, out_prod 4096
    bad_fe.evtchn.notify(bad_fe.port)
    bad_fe.wait_backend(S.CLOSING)
    relative = bad_dev.backend_path[len("/local/domain/0/"):]
    error = dom0_xs.read(f"/local/domain/0/error/{relative}/error")
    assert error is not None and error.startswith(f"{errno.EPROTO} console ring:")
    good_guest.write(b"still here\n")
    assert console.wait_output(good.domid, 11) == b"still here\n"
    # The hostile guest is destroyed: its device goes away, nothing leaks.
    (dev,) = [d for d in console.devices() if d.frontend_id == bad.domid]
    bad_fe.close()
    host.destroy_domain(bad)
    dom0_xs.wait_for(bad_dev.backend_path, lambda v: v is None, timeout=TIMEOUT)
    dev.events.flush()
    assert dev.gone and dev.resources == (0, 0)
    assert [d.frontend_id for d in console.devices()] == [good.domid]
    census.check()


def test_a_ring_ref_that_is_not_plain_digits_fails_the_device(
        host, console, frontends, dom0_xs) -> None:
    """Read as Linux's %u would not half-read it: a space int() would skip
    is refused, naming the node, rather than mapped as a grant."""
    _, dev, fe, _ = _start(host, frontends)
    fe.publish({"ring-ref": f" {fe.pages.refs[0]}", "port": fe.port})
    fe.wait_backend(S.CLOSING)
    relative = dev.backend_path[len("/local/domain/0/"):]
    assert dom0_xs.read(f"/local/domain/0/error/{relative}/error") == (
        f"{errno.EINVAL} connecting: frontend node {dev.frontend_path}/ring-ref is not a "
        f"decimal number: ' {fe.pages.refs[0]}'")
    assert console.devices()[0].resources == (0, 0)


def test_an_output_callback_that_raises_fails_that_console_only(
        host, console, frontends, dom0_xs) -> None:
    """``on_output`` is the program's code, run by the console's Work, a
    DeviceWork: what it raises fails that guest's console (error node,
    Closing) rather than leave its output unread for ever, and the guest
    can start it again."""
    good, _, good_fe, good_guest = _start(host, frontends, "good")
    good_fe.publish()
    good_fe.wait_backend(S.CONNECTED)
    census = Census(host, console)
    on_output = console.on_output

    def picky(domid: int, data: bytes) -> None:
        if data.startswith(b"crash"):
            raise LookupError("no terminal for this guest")
        on_output(domid, data)

    console.on_output = picky  # for the consoles connected from now on
    bad, bad_dev, bad_fe, bad_guest = _start(host, frontends, "bad")
    bad_fe.publish()
    bad_fe.wait_backend(S.CONNECTED)
    (dev,) = [d for d in console.devices() if d.frontend_id == bad.domid]
    bad_guest.write(b"crash\n")
    bad_fe.wait_backend(S.CLOSING)
    relative = bad_dev.backend_path[len("/local/domain/0/"):]
    assert dom0_xs.read(f"/local/domain/0/error/{relative}/error") == (
        f"{errno.EIO} work Console.run: LookupError: no terminal for this guest")
    dev.events.flush()
    assert dev.resources == (0, 0) and dev.driver_data is None
    good_guest.write(b"still here\n")
    assert console.wait_output(good.domid, 11) == b"still here\n"
    bad_fe.set_state(S.INITIALISING)
    bad_fe.wait_backend(S.INIT_WAIT)
    bad_fe.publish()
    bad_fe.wait_backend(S.CONNECTED)
    bad_guest.write(b"fine now\n")
    assert console.wait_output(bad.domid, 9) == b"fine now\n"
    bad_fe.close()
    host.destroy_domain(bad)
    dom0_xs.wait_for(bad_dev.backend_path, lambda v: v is None, timeout=TIMEOUT)
    dev.events.flush()
    assert dev.gone
    census.check()


def test_backend_and_guest_through_the_run_directory(host, tmp_path) -> None:
    """The backend and the guest each join the host by its run directory
    (as separate processes would), not through the embedded objects."""
    from tests.xenback.xbhelpers import SimFrontend
    from xenback.sim import attach

    before = {t.ident for t in threading.enumerate()}
    domain = host.create_domain("remote")
    dev = host.toolstack.add_device("console", domain.domid)
    logged = threading.Event()
    platform = attach(host.run_dir, 0)
    with console_backend.ConsoleBackend(platform, tmp_path,
                                        on_output=lambda d, b: logged.set()) as backend:
        fe = SimFrontend(attach(host.run_dir, domain.domid), dev)
        try:
            fe.wait_backend(S.INIT_WAIT)
            guest = Guest(fe)
            fe.publish()
            fe.wait_backend(S.CONNECTED)
            guest.write(b"over the run directory\n")
            assert logged.wait(TIMEOUT)
            log = tmp_path / f"console-{domain.domid}.log"
            assert log.read_bytes() == b"over the run directory\n"
            assert backend.send_input(domain.domid, b"ok") is True
            assert guest.read_exactly(2) == b"ok"
        finally:
            fe.close()
    assert not leaked_threads(before)


def test_one_console_backend_per_domain_on_a_host(host, tmp_path) -> None:
    """A second would connect every console too, each logging its output:
    it is refused before it starts, whichever process it is in, and the
    first's stop() lets the next in."""
    from xenback import HostLockHeld

    lock = host.run_dir / "xenback-console.dom0.lock"
    before = {t.ident for t in threading.enumerate()}
    with console_backend.ConsoleBackend(host.dom0, tmp_path):
        assert lock.read_text() == f"{os.getpid()}\n"
        second = console_backend.ConsoleBackend(host.dom0, tmp_path)
        with pytest.raises(HostLockHeld, match=(
                rf"^domain 0 of this host has a xenback-console already, in process "
                rf"{os.getpid()} \(it holds {lock}\)$")):
            second.start()
        with pytest.raises(RuntimeError, match="is not started"):
            second.xenstore  # noqa: B018 (the refusal is the point)
        second.stop()  # nothing to stop, and not the first's lock to let go of
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()
    with console_backend.ConsoleBackend(host.dom0, tmp_path):
        assert lock.exists()
    assert not lock.exists()
    assert not leaked_threads(before)


def test_the_example_uses_only_public_apis() -> None:
    check_public_apis_only(console_backend.__file__)


def test_the_demo_runs(capsys) -> None:
    console_backend._demo()
    assert capsys.readouterr().out == "Hello from a simulated guest's console\n"


_SERVE_DOM0 = """
import runpy, sys
import xenback.sim, xenback.xen
run_dir, log_dir = sys.argv[1:3]
xenback.xen.open = lambda: xenback.sim.attach(run_dir, 0)  # the sim's dom0 as the real one
sys.argv = ["console_backend.py", "--log-dir", log_dir]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_serving_dom0_stops_cleanly_on_a_signal(host, tmp_path, sig) -> None:
    """``--log-dir`` (serve the real dom0) waits in sigwait() for SIGINT or
    SIGTERM: they must be blocked in every thread for that, or SIGTERM's
    default action kills the process before the backend closes its
    devices (and SIGINT may go to a worker, leaving sigwait waiting)."""
    import signal
    import subprocess
    import sys

    code = _SERVE_DOM0.format(script=str(ROOT / "examples" / "console_backend.py"))
    proc = subprocess.Popen([sys.executable, "-c", code, str(host.run_dir), str(tmp_path)],
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:  # wait until it serves: it logs so at INFO
            lines.append(line)
            if "console backend serving" in line:
                break
        else:
            pytest.fail(f"the backend did not start: {''.join(lines)}")
        assert (host.run_dir / "xenback-console.dom0.lock").read_text() == f"{proc.pid}\n"
        proc.send_signal(getattr(signal, sig))
        rest = proc.stderr.read()
        assert proc.wait(TIMEOUT) == 0, rest
        assert "console backend stopped" in rest
        assert not (host.run_dir / "xenback-console.dom0.lock").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serving_dom0_is_refused_while_another_backend_serves_it(host, tmp_path) -> None:
    lock = host.run_dir / "xenback-console.dom0.lock"
    code = _SERVE_DOM0.format(script=str(ROOT / "examples" / "console_backend.py"))
    with console_backend.ConsoleBackend(host.dom0, tmp_path):
        second = subprocess.run([sys.executable, "-c", code, str(host.run_dir), str(tmp_path)],
                                capture_output=True, text=True, timeout=TIMEOUT * 3)
        assert second.returncode == 2, second.stderr
        assert second.stderr.endswith(
            f"console_backend.py: error: another console backend (pid {os.getpid()}) "
            f"serves this host already; it holds {lock}\n"), second.stderr
        assert "Traceback" not in second.stderr
        assert lock.read_text() == f"{os.getpid()}\n"  # still ours


_NO_XEN = """
import errno, runpy, sys
import xenback, xenback.xen

def unavailable():
    raise xenback.PlatformUnavailable(errno.ENODEV, "Xen is not available here; missing: it all")

xenback.xen.open = unavailable  # as on a machine without Xen, wherever the test runs
sys.argv = ["console_backend.py", *sys.argv[1:]]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_serving_dom0_without_xen_is_a_usage_error(tmp_path) -> None:
    """No Xen is something to say in one line, with status 2 as
    pvcalls-backend says it (starting again would fail the same way),
    not a traceback and status 1."""
    code = _NO_XEN.format(script=str(ROOT / "examples" / "console_backend.py"))
    result = subprocess.run([sys.executable, "-c", code, "--log-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=TIMEOUT * 3)
    assert result.returncode == 2, result.stderr
    assert result.stderr.endswith(
        "console_backend.py: error: cannot open the Xen platform: "
        "[Errno 19] Xen is not available here; missing: it all\n"), result.stderr
    assert "Traceback" not in result.stderr


def _run_example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-X", "dev", "-W", "error::ResourceWarning",
                           str(ROOT / "examples" / "console_backend.py"), *args],
                          capture_output=True, text=True, timeout=TIMEOUT * 3)


def test_the_demo_closes_what_it_opens() -> None:
    # -X dev shows every ResourceWarning: a handle left to the garbage
    # collector (the guest's grant-sharing and event channel handles were).
    result = _run_example("--demo")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello from a simulated guest's console\n"
    assert "ResourceWarning" not in result.stderr and "unclosed" not in result.stderr


@pytest.mark.parametrize(("args", "why"), [
    (["--demo", "--log-dir", "."], "argument --log-dir: not allowed with argument --demo"),
    (["--log-dir", "no/such/dir"], "argument --log-dir: 'no/such/dir' is not a directory"),
])
def test_wrong_options_are_usage_errors(args: list[str], why: str) -> None:
    result = _run_example(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.endswith(f"error: {why}\n"), result.stderr
    assert result.stdout == ""
