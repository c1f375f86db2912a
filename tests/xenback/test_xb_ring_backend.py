"""examples/ring_backend.py against simulated guests putting requests on
their ``ring.h`` rings."""

from __future__ import annotations

import errno
import os
import select
import signal
import struct
import subprocess
import sys
import threading

import pytest
from racewindow import stands_at
from scripts import ROOT, load_script

from tests.sim.hosthelpers import eventually
from tests.xenback.xbhelpers import TIMEOUT, Census, check_public_apis_only, leaked_threads
from xenback import FrontRing, XenbusState

S = XenbusState
SCRIPT = ROOT / "examples" / "ring_backend.py"
ring_backend = load_script(SCRIPT, "ring_backend")

# The device's layout written out here with struct rather than taken from
# the example's ffi, so that a mistake there shows up as garbled answers.
SLOT = 64
REQ = struct.Struct("<IH56s")  # id, len, data (then 2 bytes of padding)
RSP = struct.Struct("<IhH56s")  # id, status, len, data
EMSGSIZE = -errno.EMSGSIZE


class Guest:
    """The frontend's end of the ring, on the tests' SimFrontend."""

    def __init__(self, fe) -> None:
        self.fe = fe
        fe.share()
        self.ring = FrontRing(fe.pages.buffer, SLOT)

    def publish(self) -> None:
        self.fe.publish({"ring-ref": self.fe.pages.refs[0], "event-channel": self.fe.port})

    def send(self, req_id: int, data: bytes, length: int | None = None) -> None:
        self.ring.push_request(REQ.pack(req_id, len(data) if length is None else length, data))

    def flush(self) -> None:
        if self.ring.push_requests():
            self.fe.evtchn.notify(self.fe.port)

    def answers(self, count: int) -> list[tuple[int, int, int, bytes]]:
        """The next ``count`` responses, as (id, status, len, data)."""
        got: list[tuple[int, int, int, bytes]] = []
        while True:
            got += [RSP.unpack_from(raw) for raw in self.ring.responses()]
            if len(got) >= count:
                assert len(got) == count, got
                return got
            if not self.ring.final_check_for_responses():
                ready, _, _ = select.select([self.fe.evtchn.fileno()], [], [], TIMEOUT)
                assert ready, f"no event from the backend; answers so far: {got}"
                port = self.fe.evtchn.pending()
                if port is not None:
                    self.fe.evtchn.unmask(port)

    def ask(self, req_id: int, data: bytes, length: int | None = None) -> tuple[int, int, bytes]:
        self.send(req_id, data, length)
        self.flush()
        ((rid, status, n, payload),) = self.answers(1)
        return rid, status, payload[:n]


@pytest.fixture
def upper(host):
    before = {t.ident for t in threading.enumerate()}
    with ring_backend.UpperBackend(host.dom0) as backend:
        yield backend
    assert not leaked_threads(before)


def _start(host, frontends, name="guest"):
    domain = host.create_domain(name)
    dev = host.toolstack.add_device("uppercase", domain.domid)
    fe = frontends(domain, dev)
    fe.wait_backend(S.INIT_WAIT)
    return domain, dev, fe, Guest(fe)


def test_requests_are_answered_across_ring_wraps(host, upper, frontends) -> None:
    domain, dev, fe, guest = _start(host, frontends)
    guest.send(7, b"before the backend connected")
    guest.ring.push_requests()  # nobody to notify yet: connecting must find it
    guest.publish()
    fe.wait_backend(S.CONNECTED)
    assert guest.answers(1) == [(7, 0, 28, b"BEFORE THE BACKEND CONNECTED".ljust(56, b"\0"))]
    # 110 requests in batches, one filling the 32-slot ring: three trips round it.
    sent = 0
    for batch in (1, 32, 20, 32, 25):
        words = [f"word {sent + i} of many".encode() for i in range(batch)]
        for i, word in enumerate(words):
            guest.send(sent + i, word)
        guest.flush()
        got = [(rid, status, data[:n]) for rid, status, n, data in guest.answers(batch)]
        assert got == [(sent + i, 0, word.upper()) for i, word in enumerate(words)]
        sent += batch
    assert guest.ask(999, b"x" * 56) == (999, 0, b"X" * 56)  # a full data[]


@pytest.mark.parametrize("length", [57, 0xFFFF])
def test_a_length_past_the_slot_is_refused_and_the_device_serves_on(
    host, upper, frontends, length
) -> None:
    domain, dev, fe, guest = _start(host, frontends)
    guest.publish()
    fe.wait_backend(S.CONNECTED)
    guest.send(1, b"secret" * 9, length=length)
    guest.flush()
    # No byte of the request, nor of the slots after it, comes back.
    assert guest.answers(1) == [(1, EMSGSIZE, 0, bytes(56))]
    assert guest.ask(2, b"still served") == (2, 0, b"STILL SERVED")
    (device,) = upper.devices()
    # The switch to Connected sets device.state after its write: the
    # guest, served once the write is seen, can get here in between.
    device.events.flush()
    assert device.state == S.CONNECTED


def test_broken_ring_indexes_close_only_that_device(host, upper, frontends, dom0_xs) -> None:
    good, _, good_fe, good_guest = _start(host, frontends, "good")
    good_guest.publish()
    good_fe.wait_backend(S.CONNECTED)
    census = Census(host, upper)
    bad, bad_dev, bad_fe, bad_guest = _start(host, frontends, "bad")
    bad_guest.publish()
    bad_fe.wait_backend(S.CONNECTED)
    struct.pack_into("<I", bad_fe.pages.buffer, 0, 1000)  # req_prod: 1000 requests in 32 slots
    bad_fe.evtchn.notify(bad_fe.port)
    bad_fe.wait_backend(S.CLOSING)
    relative = bad_dev.backend_path[len("/local/domain/0/"):]
    error = dom0_xs.read(f"/local/domain/0/error/{relative}/error")
    assert error is not None and error.startswith(f"{errno.EPROTO} uppercase ring: req_prod 1000")
    assert good_guest.ask(1, b"unaffected") == (1, 0, b"UNAFFECTED")
    # The device stays Closing until its frontend closes, or, here, dies.
    (device,) = [d for d in upper.devices() if d.frontend_id == bad.domid]
    bad_fe.close()
    host.destroy_domain(bad)
    dom0_xs.wait_for(bad_dev.backend_path, lambda v: v is None, timeout=TIMEOUT)
    device.events.flush()
    assert device.gone and device.resources == (0, 0)
    census.check()


def test_a_broken_ring_stops_its_work_and_fails_the_device_on_its_queue(
        host, upper, frontends, monkeypatch) -> None:
    """The Work stops serving the ring at the first broken index (the
    guest's notifies run it no more), and leaves failing the device to
    the device's queue, ordered with its xenbus events: never from the
    worker, where its Closing could land after the frontend's Closed was
    answered, and stay."""
    domain, dev, fe, guest = _start(host, frontends)
    guest.publish()
    fe.wait_backend(S.CONNECTED)
    (device,) = upper.devices()
    work = device.driver_data
    fatal = device.fatal
    tries: list[str] = []

    def counted(err: int, message: str) -> bool:
        tries.append(message)
        return fatal(err, message)

    monkeypatch.setattr(device, "fatal", counted)
    held, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        assert held.wait(TIMEOUT)

    assert device.queue(hold)
    assert holding.wait(TIMEOUT)
    try:
        struct.pack_into("<I", fe.pages.buffer, 0, 1000)  # req_prod: 1000 requests in 32 slots
        fe.evtchn.notify(fe.port)
        assert eventually(lambda: work.disabled), "the Work serves the broken ring on"
        assert tries == [] and device.state == S.CONNECTED  # the queue is held
    finally:
        held.set()
    fe.wait_backend(S.CLOSING)
    device.events.flush()
    assert len(tries) == 1 and tries[0].startswith("uppercase ring: req_prod 1000"), tries


def test_disconnect_waits_for_a_run_under_way_before_the_ring_goes(
        host, upper, frontends, monkeypatch) -> None:
    """The frontend closes while the Work answers a request: disconnect()
    returns, and the framework unmaps the page, only once that run is
    over (a run left going would write its answer into a ring let go
    of)."""
    domain, dev, fe, guest = _start(host, frontends)
    guest.publish()
    fe.wait_backend(S.CONNECTED)
    (device,) = upper.devices()
    work = device.driver_data
    answer = ring_backend.answer
    answering, answered = threading.Event(), threading.Event()

    def slow_answer(raw: bytes) -> bytes:
        answering.set()
        assert answered.wait(TIMEOUT)
        return answer(raw)

    monkeypatch.setattr(ring_backend, "answer", slow_answer)
    disconnect = upper.disconnect
    waiter: list[int] = []
    running_after: list[bool] = []

    def watched_disconnect(d: object) -> None:
        waiter.append(threading.get_ident())
        disconnect(d)
        running_after.append(work.running)

    monkeypatch.setattr(upper, "disconnect", watched_disconnect)
    guest.send(1, b"slow")
    guest.flush()
    assert answering.wait(TIMEOUT)
    fe.set_state(S.CLOSING)
    try:
        # Until disconnect() has returned, or waits for the run.
        assert eventually(lambda: bool(running_after) or bool(waiter) and stands_at(
            waiter[0], ring_backend.UpperBackend.disconnect, "upper.disable_sync()"))
    finally:
        answered.set()
    fe.wait_backend(S.CLOSING)
    device.events.flush()
    assert running_after == [False]


def test_a_bug_in_the_work_fails_its_device_only(
        host, upper, frontends, dom0_xs, monkeypatch) -> None:
    """The example's Work is a DeviceWork: what escapes it (a bug, here
    answer() made to fail on one request) fails that device, error node
    and Closing, instead of leaving its guest waiting for an answer for
    ever; the guest starts again and is served."""
    good, _, good_fe, good_guest = _start(host, frontends, "good")
    good_guest.publish()
    good_fe.wait_backend(S.CONNECTED)
    census = Census(host, upper)
    answer = ring_backend.answer

    def buggy(raw: bytes) -> bytes:
        if b"crash" in raw:
            raise ZeroDivisionError("a bug")
        return answer(raw)

    monkeypatch.setattr(ring_backend, "answer", buggy)
    bad, bad_dev, bad_fe, bad_guest = _start(host, frontends, "bad")
    bad_guest.publish()
    bad_fe.wait_backend(S.CONNECTED)
    (device,) = [d for d in upper.devices() if d.frontend_id == bad.domid]
    bad_guest.send(1, b"crash")
    bad_guest.flush()
    bad_fe.wait_backend(S.CLOSING)
    relative = bad_dev.backend_path[len("/local/domain/0/"):]
    assert dom0_xs.read(f"/local/domain/0/error/{relative}/error") == (
        f"{errno.EIO} work Upper.run: ZeroDivisionError: a bug")
    device.events.flush()
    assert device.resources == (0, 0) and device.driver_data is None
    assert good_guest.ask(1, b"unaffected") == (1, 0, b"UNAFFECTED")
    # As after any fatal error: Initialising, a ring made anew, Connected.
    bad_fe.set_state(S.INITIALISING)
    bad_fe.wait_backend(S.INIT_WAIT)
    bad_guest.ring = FrontRing(bad_fe.pages.buffer, SLOT)
    bad_guest.publish()
    bad_fe.wait_backend(S.CONNECTED)
    assert bad_guest.ask(2, b"served again") == (2, 0, b"SERVED AGAIN")
    bad_fe.close()
    host.destroy_domain(bad)
    dom0_xs.wait_for(bad_dev.backend_path, lambda v: v is None, timeout=TIMEOUT)
    device.events.flush()
    assert device.gone
    census.check()


@pytest.mark.parametrize("end", ["frontend closes", "domain destroyed"])
def test_teardown_leaves_no_grants_or_ports(host, upper, frontends, dom0_xs, end) -> None:
    domain = host.create_domain("guest")
    census = Census(host, upper)
    dev = host.toolstack.add_device("uppercase", domain.domid)
    fe = frontends(domain, dev)
    fe.wait_backend(S.INIT_WAIT)
    guest = Guest(fe)
    guest.publish()
    fe.wait_backend(S.CONNECTED)
    assert guest.ask(1, b"hello") == (1, 0, b"HELLO")
    (device,) = upper.devices()
    assert device.resources == (1, 1)
    if end == "frontend closes":
        fe.set_state(S.CLOSING)
        fe.wait_backend(S.CLOSING)
        assert device.resources == (0, 0) and device.driver_data is None
        fe.set_state(S.CLOSED)
        fe.wait_backend(S.CLOSED)
        fe.close()
        # What the guest shared is gone with its handles: the backend maps nothing of it.
        census.check()
    else:
        host.destroy_domain(domain)  # with the frontend still Connected
        dom0_xs.wait_for(dev.backend_path, lambda v: v is None, timeout=TIMEOUT)
        device.events.flush()
        assert device.gone and device.resources == (0, 0)
        assert upper.devices() == []
        fe.close()
        census.check()


def test_the_example_uses_only_public_apis() -> None:
    check_public_apis_only(SCRIPT)


DEMO_OUTPUT = """\
request 0: b'HELLO FROM THE GUEST'
request 1: b'XEN SPLIT DRIVERS'
request 2: error EMSGSIZE
"""


def test_the_demo_runs(capsys) -> None:
    ring_backend._demo()
    assert capsys.readouterr().out == DEMO_OUTPUT


def _run_example(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-X", "dev", "-W", "error::ResourceWarning",
                           str(SCRIPT), *args], capture_output=True, text=True, timeout=TIMEOUT * 3)


def test_the_demo_exits_0_and_closes_what_it_opens() -> None:
    # -X dev shows every ResourceWarning: a handle left to the garbage collector.
    for args in ([], ["--demo"]):
        result = _run_example(*args)
        assert result.returncode == 0, result.stderr
        assert result.stdout == DEMO_OUTPUT
        assert "ResourceWarning" not in result.stderr and "unclosed" not in result.stderr


def test_demo_and_serve_together_are_a_usage_error() -> None:
    result = _run_example("--demo", "--serve")
    assert result.returncode == 2, result.stderr
    assert result.stderr.endswith("error: argument --serve: not allowed with argument --demo\n")
    assert result.stdout == ""


_SERVE_DOM0 = """
import runpy, sys
import xenback.sim, xenback.xen
run_dir = sys.argv[1]
xenback.xen.open = lambda: xenback.sim.attach(run_dir, 0)  # the sim's dom0 as the real one
sys.argv = ["ring_backend.py", "--serve"]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serving_dom0_answers_then_stops_cleanly_on_a_signal(host, frontends, sig) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SERVE_DOM0.format(script=str(SCRIPT)),
                             str(host.run_dir)], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:  # wait until it serves: it logs so at INFO
            lines.append(line)
            if "uppercase backend serving" in line:
                break
        else:
            pytest.fail(f"the backend did not start: {''.join(lines)}")
        domain, dev, fe, guest = _start(host, frontends)
        guest.publish()
        fe.wait_backend(S.CONNECTED)
        assert guest.ask(1, b"from another process") == (1, 0, b"FROM ANOTHER PROCESS")
        proc.send_signal(sig)
        rest = proc.stderr.read()
        assert proc.wait(TIMEOUT) == 0, rest
        assert "uppercase backend stopped" in rest
        fe.wait_backend(S.CLOSED)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serving_dom0_is_refused_while_another_backend_serves_it(host) -> None:
    lock = host.run_dir / "xenback-uppercase.dom0.lock"
    with ring_backend.UpperBackend(host.dom0):
        second = subprocess.run([sys.executable, "-c", _SERVE_DOM0.format(script=str(SCRIPT)),
                                 str(host.run_dir)],
                                capture_output=True, text=True, timeout=TIMEOUT * 3)
        assert second.returncode == 2, second.stderr
        assert second.stderr.endswith(
            f"ring_backend.py: error: another uppercase backend (pid {os.getpid()}) "
            f"serves this host already; it holds {lock}\n"), second.stderr
        assert "Traceback" not in second.stderr
        assert lock.read_text() == f"{os.getpid()}\n"  # still ours


_NO_XEN = """
import errno, runpy, sys
import xenback, xenback.xen

def unavailable():
    raise xenback.PlatformUnavailable(errno.ENODEV, "Xen is not available here; missing: it all")

xenback.xen.open = unavailable  # as on a machine without Xen, wherever the test runs
sys.argv = ["ring_backend.py", "--serve"]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_serving_dom0_without_xen_is_a_usage_error() -> None:
    """As pvcalls-backend serve says it: one line, status 2."""
    result = subprocess.run([sys.executable, "-c", _NO_XEN.format(script=str(SCRIPT))],
                            capture_output=True, text=True, timeout=TIMEOUT * 3)
    assert result.returncode == 2, result.stderr
    assert result.stderr.endswith(
        "ring_backend.py: error: cannot open the Xen platform: "
        "[Errno 19] Xen is not available here; missing: it all\n"), result.stderr
    assert "Traceback" not in result.stderr
