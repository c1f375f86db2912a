"""xenback.sim.FrontendDevice: a device's frontend on a simulated guest,
against the framework's own BackendDriver (the tests' RecordingDriver)."""

from __future__ import annotations

import multiprocessing
import re
import time

import pytest

from tests.xenback.xbhelpers import TIMEOUT, Census, frontend_in_child, handed_over
from xenback import XenbusState
from xenback.sim import FrontendDevice

S = XenbusState


def _connect(fe: FrontendDevice) -> int:
    """Share a ring page, bind a port, publish both and wait for Connected:
    a frontend driver's probe.  Returns the port."""
    fe.wait_backend(S.INIT_WAIT)
    page = fe.share()
    port = fe.bind_port()
    fe.publish({"ring-ref": page.refs[0], "port": port})
    assert fe.wait_backend(S.CONNECTED) is S.CONNECTED
    return port


def test_handshake_reaches_connected_and_events_flow(host, driver, dom0_xs) -> None:
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = FrontendDevice(guest, dev)
    try:
        # The features a backend writes before InitWait are there to read.
        assert fe.wait_backend(S.INIT_WAIT) is S.INIT_WAIT
        assert fe.xenstore.read(f"{dev.backend_path}/feature-test") == "1"
        port = _connect(fe)
        assert driver.calls_of(guest.domid) == ["probe", "connect"]
        assert dom0_xs.read(f"{dev.frontend_path}/state") == str(int(S.INITIALISED))
        fe.evtchn.notify(port)
        driver.wait(lambda: len(driver.events_seen) == 1)
    finally:
        fe.close()


def test_close_does_the_handshake_and_releases_everything(host, driver, dom0_xs) -> None:
    census = Census(host, driver)
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = FrontendDevice(guest, dev)
    _connect(fe)
    fe.close()
    # Closing, the backend's Closing, Closed, the backend's Closed.
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSED))
    assert dom0_xs.read(f"{dev.frontend_path}/state") == str(int(S.CLOSED))
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect"]
    census.check()  # no grant mapped or shared, no port bound, on either side
    fe.close()  # idempotent
    with pytest.raises(RuntimeError, match=f"frontend of {re.escape(dev.frontend_path)} is closed"):
        fe.share()


def test_close_against_a_backend_that_does_not_answer(host, dom0_xs) -> None:
    census = Census(host)
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = FrontendDevice(guest, dev)
    fe.share()
    fe.bind_port()
    # A backend that took the device up, then hangs: nothing changes its state.
    dom0_xs.write(f"{dev.backend_path}/state", int(S.CONNECTED))
    with pytest.raises(TimeoutError, match=(
            f"backend {re.escape(dev.backend_path)} did not close within 0.2 s "
            r"\(it is Connected\); the frontend's pages and ports are released anyway")):
        fe.close(timeout=0.2)
    assert dom0_xs.read(f"{dev.frontend_path}/state") == str(int(S.CLOSED))
    census.check()
    fe.close()  # nothing left to do, nothing raised again


def test_wait_backend_timeout_names_the_device_and_the_state(host) -> None:
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)  # no backend serves it
    with FrontendDevice(guest, dev, timeout=0.2) as fe:
        with pytest.raises(TimeoutError, match=(
                f"backend {re.escape(dev.backend_path)} did not reach Connected within 0.2 s "
                r"\(it is Initialising\)")):
            fe.wait_backend(S.CONNECTED)
        with pytest.raises(TimeoutError, match=r"did not satisfy backend_gone within 0.1 s"):
            def backend_gone(state: XenbusState) -> bool:
                return state is S.UNKNOWN
            fe.wait_backend(backend_gone, timeout=0.1)


def test_with_block_adds_and_removes_its_device(host, driver, dom0_xs) -> None:
    census = Census(host, driver)
    guest = host.create_domain("guest")
    with FrontendDevice.add(guest, "xbtest", devid=3) as fe:
        assert fe.device.devid == 3
        _connect(fe)
    assert not dom0_xs.exists(fe.device.backend_path)
    assert not dom0_xs.exists(fe.device.frontend_path)
    driver.wait_call("remove", guest.domid, 3)
    assert driver.calls_of(guest.domid, 3) == ["probe", "connect", "disconnect", "remove"]
    census.check()
    # The device is gone: the same one can be added again.
    with FrontendDevice.add(guest, "xbtest", devid=3) as again:
        _connect(again)


def test_publish_and_share_say_what_was_wrong(host) -> None:
    guest = host.create_domain("guest")
    with FrontendDevice.add(guest, "xbtest") as fe:
        with pytest.raises(ValueError, match="'state' is publish\\(\\)'s state argument"):
            fe.publish({"state": 4})
        with pytest.raises(OSError, match=f"{re.escape(fe.device.frontend_path)}: sharing 0 "
                                          "pages with domain 0: can share 1..\\d+ pages"):
            fe.share(0)
        with pytest.raises(TypeError, match="state must be a XenbusState or a function of one, "
                                            "not bool"):
            fe.wait_backend(True)  # type: ignore[arg-type]


def test_a_guest_in_another_process(host, driver, dom0_xs) -> None:
    guest = host.create_domain("remote")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    child = spawn.Process(target=frontend_in_child,
                          args=(str(host.run_dir), guest.domid, dev, results))
    child.start()
    try:
        assert results.get(timeout=TIMEOUT * 3)[:2] == ("connected", "CONNECTED")
        assert results.get(timeout=TIMEOUT) == (
            "closed", f"<FrontendDevice {dev.frontend_path} closed>", None)
    finally:
        child.join(TIMEOUT)
        if child.exitcode is None:
            child.kill()
    assert child.exitcode == 0
    driver.wait(lambda: len(driver.events_seen) == 1)
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect"]
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSED))


def test_close_without_the_handshake_leaves_the_backend_connected(host, driver, dom0_xs) -> None:
    """As a guest whose driver died: for testing how a backend copes."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = FrontendDevice(guest, dev)
    _connect(fe)
    fe.close(handshake=False)
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CONNECTED))
    assert dom0_xs.read(f"{dev.frontend_path}/state") == str(int(S.INITIALISED))
    assert driver.calls_of(guest.domid) == ["probe", "connect"]


def test_close_of_a_device_no_backend_took_up_does_not_wait(host, dom0_xs) -> None:
    """Nobody answers, nobody needs to: the device goes at once, not after
    libxl's wait for a backend to close it."""
    guest = host.create_domain("guest")
    fe = FrontendDevice.add(guest, "xbtest", timeout=60)
    started = time.monotonic()
    fe.close()
    assert time.monotonic() - started < 5
    assert not dom0_xs.exists(fe.device.backend_path)
    assert not dom0_xs.exists(fe.device.frontend_path)


def test_close_after_the_frontend_closed_itself_does_not_go_back_to_closing(
        host, driver, dom0_xs) -> None:
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = FrontendDevice(guest, dev)
    _connect(fe)
    fe.publish(state=S.CLOSED)
    fe.wait_backend(S.CLOSED)
    states: list[str | None] = []
    watch = dom0_xs.watch(f"{dev.frontend_path}/state",
                          lambda path: states.append(dom0_xs.read(path)))
    fe.close()
    handed_over(dom0_xs, "closed-itself")
    watch.unwatch()
    assert str(int(S.CLOSING)) not in states, states
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSED))


def test_wait_backend_ends_when_the_backend_closes_instead(host, driver) -> None:
    """A backend that fails the device (connect() raised: its error node,
    then Closing) will not reach Connected until the frontend starts over:
    the wait ends with that, not with the whole timeout."""
    def refuse(dev: object) -> None:
        raise OSError(5, "no ring for you")

    driver.connect_hook = refuse
    guest = host.create_domain("guest")
    with FrontendDevice.add(guest, "xbtest", timeout=TIMEOUT) as fe:
        fe.wait_backend(S.INIT_WAIT)
        fe.publish({"ring-ref": fe.share().refs[0], "port": fe.bind_port()})
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError, match=(
                f"backend {re.escape(fe.device.backend_path)} went Closing "
                "instead of reaching Connected")):
            fe.wait_backend(S.CONNECTED)
        assert time.monotonic() - started < TIMEOUT / 2
        # What the backend is waiting for now is still there to wait for.
        assert fe.wait_backend(S.CLOSING) is S.CLOSING


def test_wait_backend_from_a_closed_backend_waits_for_it_to_come_back(host, driver,
                                                                      dom0_xs) -> None:
    """A Closed backend seen first is one the frontend may be restarting:
    only a close seen after a state below Closing ends the wait early."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = FrontendDevice(guest, dev)
    try:
        _connect(fe)
        fe.close()  # both sides Closed; the device stays
        assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSED))
    finally:
        fe.close()
    again = FrontendDevice(guest, dev)
    try:
        again.publish(state=S.INITIALISING)  # starting over: the backend probes anew
        _connect(again)
    finally:
        again.close()
