"""xenback.sim.FrontendDevice: a device's frontend on a simulated guest,
against the framework's own BackendDriver (the tests' RecordingDriver)."""

from __future__ import annotations

import errno
import multiprocessing
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.stolensignal import OUTLASTS_THE_TEST, Interrupted
from tests.xenback.xbhelpers import (
    TIMEOUT,
    Census,
    frontend_in_child,
    handed_over,
    leaked_threads,
)
from xenback import GrantError, XenbusState
from xenback.sim import FrontendDevice, Toolstack

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
    results, seen = spawn.Queue(), spawn.Event()
    child = spawn.Process(target=frontend_in_child,
                          args=(str(host.run_dir), guest.domid, dev, results, seen))
    child.start()
    try:
        assert results.get(timeout=TIMEOUT * 3)[:2] == ("connected", "CONNECTED")
        driver.wait(lambda: len(driver.events_seen) == 1)
        seen.set()
        assert results.get(timeout=TIMEOUT) == (
            "closed", f"<FrontendDevice {dev.frontend_path} closed>", None)
    finally:
        child.join(TIMEOUT)
        if child.exitcode is None:
            child.kill()
    assert child.exitcode == 0
    assert len(driver.events_seen) == 1
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


def test_close_of_a_device_no_backend_took_up_does_not_wait(host, dom0_xs, caplog) -> None:
    """Nobody answers, nobody needs to: the device goes at once, not after
    libxl's wait for a backend to close it.  (A wait of the handshake that
    ran out would make close() raise TimeoutError; one of the toolstack's,
    the toolstack say so.)"""
    guest = host.create_domain("guest")
    fe = FrontendDevice.add(guest, "xbtest", timeout=60)
    fe.close()
    assert "did not close" not in caplog.text
    assert not dom0_xs.exists(fe.device.backend_path)
    assert not dom0_xs.exists(fe.device.frontend_path)


def test_close_of_a_device_whose_backend_failed_its_probe_does_not_wait(
        host, driver, dom0_xs, caplog) -> None:
    """A backend whose probe failed went Closing and watches no frontend:
    it would never answer the frontend's Closed, so close() waited its
    whole timeout, raised TimeoutError, and left the toolstack no time
    for the removal (forced, said as a warning).  A frontend that never
    published has nothing to hand back: it writes Closed and lets the
    removal, which such a backend answers at once, end the device."""
    def fail(_dev: Any) -> None:
        raise OSError(errno.ENOMEM, "injected")

    driver.probe_hook = fail
    guest = host.create_domain("guest")
    fe = FrontendDevice.add(guest, "xbtest", timeout=60)
    # Not wait_backend(InitWait) refused: a Closing seen first (the probe
    # failed before the wait began) is not taken for a refusal.
    fe.wait_backend(S.CLOSING)
    started = time.monotonic()
    fe.close()
    assert time.monotonic() - started < TIMEOUT
    assert "did not close" not in caplog.text
    assert not dom0_xs.exists(fe.device.backend_path)
    driver.wait_call("remove", guest.domid)


def test_close_after_the_domain_was_destroyed_has_nobody_to_tell(host, driver) -> None:
    """A test that destroys the guest inside ``with FrontendDevice.add()``
    (a domain dying under its backend) got ConnectionError 'not connected
    to XenStore' at the block's end: the guest's connection went with its
    domain.  A frontend whose domain is gone has nobody to close with:
    close() only releases what is left."""
    guest = host.create_domain("guest")
    with FrontendDevice.add(guest, "xbtest") as fe:
        _connect(fe)
        host.destroy_domain(guest)
    stats = host.hypervisor.stats()
    assert (stats["grants"], stats["ports"]) == (0, 0)
    # The drop goes on after the Closed the toolstack waited for.
    driver.wait_removed(guest.domid)
    assert driver.devices() == []


def test_close_of_a_device_the_toolstack_took_away_writes_nothing(host, dom0_xs) -> None:
    """A dying domain's devices lose their frontend directory first
    (libxl__devices_destroy), the domain still there: its frontend has
    nobody to tell, and a state written would make the guest a stray
    directory of a device that no longer exists."""
    census = Census(host)
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)  # no backend serves it
    fe = FrontendDevice(guest, dev)
    fe.share()
    fe.bind_port()
    assert host.toolstack.destroy_devices(guest.domid, timeout=0) == [dev]
    fe.close()
    assert not dom0_xs.exists(f"{guest.path}/device/xbtest")
    census.check()


def test_close_of_an_unserved_device_whose_backend_failed_its_probe_writes_closed(
        host, driver, dom0_xs) -> None:
    """A device the test added itself (not add()'s): no removal follows
    close() to end it, so the frontend's Closed is all the backend gets,
    written at once (the failed backend answers nothing)."""
    def fail(_dev: Any) -> None:
        raise OSError(errno.ENOMEM, "injected")

    driver.probe_hook = fail
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = FrontendDevice(guest, dev, timeout=60)
    fe.wait_backend(S.CLOSING)
    started = time.monotonic()
    fe.close()
    assert time.monotonic() - started < TIMEOUT
    assert dom0_xs.read(f"{dev.frontend_path}/state") == str(int(S.CLOSED))
    host.toolstack.remove_device(dev, timeout=TIMEOUT)


def test_close_of_a_published_frontend_waits_for_a_closing_backend_s_closed(
        host, dom0_xs) -> None:
    """Only a frontend that published nothing is spared the wait for a
    Closing backend's Closed: one that handed the backend its pages (any
    state past Initialising) releases them only once the backend closed,
    or its time is up."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = FrontendDevice(guest, dev)
    fe.publish({"ring-ref": fe.share().refs[0]})
    dom0_xs.write(f"{dev.backend_path}/state", int(S.CLOSING))  # and never closes
    with pytest.raises(TimeoutError, match=r"did not close within 0 s \(it is Closing\)"):
        fe.close(timeout=0)
    assert dom0_xs.read(f"{dev.frontend_path}/state") == str(int(S.CLOSED))
    host.toolstack.destroy_device(dev)


def test_close_of_a_frontend_closed_already_waits_for_the_backend_s_closed(
        host, dom0_xs) -> None:
    """A frontend that published Closed itself waits, as any, for the
    backend's Closed, not its Closing: its pages go once the backend let go."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = FrontendDevice(guest, dev)
    fe.publish({"ring-ref": fe.share().refs[0]}, state=S.CLOSED)
    dom0_xs.write(f"{dev.backend_path}/state", int(S.CLOSING))  # and never closes
    with pytest.raises(TimeoutError, match=r"did not close within 0 s \(it is Closing\)"):
        fe.close(timeout=0)
    host.toolstack.destroy_device(dev)


def test_close_after_the_guest_lost_its_xenstore_connection_says_so(host, driver) -> None:
    """Only a destroyed domain's frontend closes quietly without its
    connection: a living guest's lost one is an error, raised once what
    is left is released and the device removed (without a wait: the
    backend cannot hear the frontend any more)."""
    guest = host.create_domain("guest")
    fe = FrontendDevice.add(guest, "xbtest", timeout=60)
    _connect(fe)
    fe.xenstore.close()  # the connection goes; the domain lives
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        fe.close()
    assert time.monotonic() - started < TIMEOUT
    assert not host.toolstack.transaction(lambda c: c.exists(fe.device.backend_path.encode()))
    # The grant goes once the backend, told by the removal, unmaps it.
    driver.wait_removed(guest.domid)
    stats = host.hypervisor.stats()
    assert (stats["grants"], stats["ports"]) == (0, 0)


def test_close_with_xenstore_itself_gone_says_so(host) -> None:
    """Whether the domain still exists cannot be asked either: the
    connection's error is raised, not taken for the domain's end."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = FrontendDevice(guest, dev)
    host.xenstored.stop()
    with pytest.raises(ConnectionError):
        fe.close()
    assert host.hypervisor.stats()["grants"] == 0


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


def wait_saw_backend_up() -> bool:
    """Whether the main thread is in a wait_backend() that has seen the
    backend below Closing (its ``up``), so that a Closing now is taken for
    the backend's answer."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        if frame.f_code.co_name == "_wait_backend":
            return frame.f_locals.get("up") is True
        frame = frame.f_back
    return False


def test_wait_backend_ends_when_the_backend_closes_instead(host, driver) -> None:
    """A backend that fails the device (connect() raised: its error node,
    then Closing) will not reach Connected until the frontend starts over:
    the wait ends with that, not with the whole timeout (a wait that ran
    out would raise TimeoutError, not ConnectionRefusedError).

    The backend fails the device once the wait has seen it up: one that
    went Closing before the wait first looked would be taken for what an
    earlier connection left (see wait_backend), and the wait would run
    out.  (The suite lost that race twice under load, with a hook that
    waited only for the wait to block: it blocks first for the reply to
    its watch, before it has read the backend's state.)"""
    waiting: list[bool] = []

    def refuse(dev: object) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not wait_saw_backend_up():
            time.sleep(0.001)
        waiting.append(wait_saw_backend_up())
        raise OSError(5, "no ring for you")

    driver.connect_hook = refuse
    guest = host.create_domain("guest")
    with FrontendDevice.add(guest, "xbtest", timeout=TIMEOUT) as fe:
        fe.wait_backend(S.INIT_WAIT)
        fe.publish({"ring-ref": fe.share().refs[0], "port": fe.bind_port()})
        with pytest.raises(ConnectionRefusedError, match=(
                f"backend {re.escape(fe.device.backend_path)} went Closing "
                "instead of reaching Connected")):
            fe.wait_backend(S.CONNECTED)
        assert waiting == [True]
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


def _acting_as_it_waits(fe: FrontendDevice, monkeypatch: pytest.MonkeyPatch,
                        act: Callable[[str | None], object]) -> None:
    """Make ``fe``'s waits call ``act(value)`` with each value of the
    backend's state they check, once checked: what ``act`` does happens
    while the wait is surely under way, having seen that value."""
    wait_for = fe.xenstore.wait_for

    def wait_for_acting(path: str, check: Callable[[str | None], bool],
                        timeout: float) -> str | None:
        def check_then_act(value: str | None) -> bool:
            done = check(value)
            act(value)
            return done

        return wait_for(path, check_then_act, timeout=timeout)

    monkeypatch.setattr(fe.xenstore, "wait_for", wait_for_acting)


def _scripted_backend(host: Any, dom0_xs: Any, monkeypatch: pytest.MonkeyPatch,
                      script: dict[str | None, Callable[[str], None]]
                      ) -> tuple[Any, FrontendDevice]:
    """A frontend whose backend is the test: in InitWait, and as a wait of
    the frontend first checks each value of the backend's state node,
    ``script[value]`` is called with the backend's path."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    dom0_xs.write(f"{dev.backend_path}/state", int(S.INIT_WAIT))
    fe = FrontendDevice(guest, dev, timeout=TIMEOUT)
    pending = dict(script)

    def act(value: str | None) -> None:
        step = pending.pop(value, None)
        if step is not None:
            step(dev.backend_path)

    _acting_as_it_waits(fe, monkeypatch, act)
    return dev, fe


def test_waiting_for_closed_goes_through_the_backend_s_closing(
        host, dom0_xs, monkeypatch) -> None:
    """Closing on the way to an awaited Closed is no refusal: it is the
    way there."""
    dev, fe = _scripted_backend(host, dom0_xs, monkeypatch, {
        str(int(S.INIT_WAIT)): lambda path: dom0_xs.write(f"{path}/state", int(S.CLOSING)),
        str(int(S.CLOSING)): lambda path: dom0_xs.write(f"{path}/state", int(S.CLOSED)),
    })
    try:
        assert fe.wait_backend(S.CLOSED) is S.CLOSED
    finally:
        fe.close(handshake=False)
        host.toolstack.destroy_device(dev)


def test_wait_backend_says_a_backend_gone_went_away(host, dom0_xs, monkeypatch) -> None:
    dev, fe = _scripted_backend(host, dom0_xs, monkeypatch, {
        str(int(S.INIT_WAIT)): lambda path: dom0_xs.rm(f"{path}/state"),
    })
    try:
        with pytest.raises(ConnectionRefusedError, match=(
                f"backend {re.escape(dev.backend_path)} went away instead of reaching "
                "Connected$")):
            fe.wait_backend(S.CONNECTED)
    finally:
        fe.close(handshake=False)
        host.toolstack.destroy_device(dev)


def test_close_interrupted_in_the_handshake_still_releases_everything(
        host, dom0_xs, monkeypatch) -> None:
    """Ctrl-C as close() waits for the backend: the pages, the ports and
    the guest's handles go all the same, before the interrupt goes on."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    dom0_xs.write(f"{dev.backend_path}/state", int(S.CONNECTED))  # and never answers
    census = Census(host)
    fe = FrontendDevice(guest, dev, timeout=TIMEOUT)
    fe.share()
    fe.bind_port()

    def interrupted(*args: object, **kwargs: object) -> None:
        raise Interrupted

    monkeypatch.setattr(fe.xenstore, "wait_for", interrupted)
    with pytest.raises(Interrupted):
        fe.close()
    census.check()
    assert dom0_xs.read(f"{dev.frontend_path}/state") == str(int(S.CLOSING))
    host.toolstack.destroy_device(dev)


def test_close_interrupted_in_the_handshake_removes_its_device_without_a_wait(
        host, dom0_xs, monkeypatch) -> None:
    """Ctrl-C as close() waits for the backend: the device add() added is
    removed at once (forced), not after the time the handshake had left.
    (That time outlasts the test: a removal that waited is a test timeout.)"""
    guest = host.create_domain("guest")
    fe = FrontendDevice.add(guest, "xbtest", timeout=OUTLASTS_THE_TEST)
    dom0_xs.write(f"{fe.device.backend_path}/state", int(S.CONNECTED))  # and never answers

    def interrupted(*args: object, **kwargs: object) -> None:
        raise Interrupted

    monkeypatch.setattr(fe.xenstore, "wait_for", interrupted)
    with pytest.raises(Interrupted):
        fe.close()
    assert not dom0_xs.exists(fe.device.backend_path)
    assert not dom0_xs.exists(fe.device.frontend_path)


def test_close_with_no_time_left_says_the_backend_was_late(host, dom0_xs) -> None:
    """timeout=0: no wait at all, the time up before the first one began;
    the refusal is the late backend's, not a wait's for less than none."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = FrontendDevice(guest, dev)
    dom0_xs.write(f"{dev.backend_path}/state", int(S.CONNECTED))  # and never answers
    with pytest.raises(TimeoutError, match=(
            f"backend {re.escape(dev.backend_path)} did not close within 0 s "
            r"\(it is Connected\)")):
        fe.close(timeout=0)
    assert dom0_xs.read(f"{dev.frontend_path}/state") == str(int(S.CLOSED))
    host.toolstack.destroy_device(dev)


def test_close_whose_wait_for_closing_ran_out_says_so_even_if_closed_by_then(
        host, dom0_xs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline is the verdict: a backend not Closing by then is late,
    although it went Closed just after (read by a wait with no time left)."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = FrontendDevice(guest, dev)
    fe.publish({"ring-ref": fe.share().refs[0]})
    dom0_xs.write(f"{dev.backend_path}/state", int(S.CONNECTED))
    closed: list[str] = []

    def close_once_seen_connected(value: str | None) -> None:
        # After the wait for Closing checked Connected: with no time
        # left it reads no more.
        if value == str(int(S.CONNECTED)) and not closed:
            closed.append(dev.backend_path)
            dom0_xs.write(f"{dev.backend_path}/state", int(S.CLOSED))

    _acting_as_it_waits(fe, monkeypatch, close_once_seen_connected)
    with pytest.raises(TimeoutError, match=r"did not close within 0 s \(it is Closed\)"):
        fe.close(timeout=0)
    assert closed
    host.toolstack.destroy_device(dev)


def test_close_without_the_handshake_leaves_an_added_device(host, driver, dom0_xs) -> None:
    """The device added by add() too: removing it is the toolstack's job
    then, as for a guest whose driver died."""
    guest = host.create_domain("guest")
    fe = FrontendDevice.add(guest, "xbtest")
    _connect(fe)
    fe.close(handshake=False)
    assert dom0_xs.read(f"{fe.device.frontend_path}/state") == str(int(S.INITIALISED))
    assert dom0_xs.read(f"{fe.device.backend_path}/state") == str(int(S.CONNECTED))
    host.toolstack.destroy_device(fe.device)


def test_close_tries_every_step_and_raises_the_first_failure(
        host, caplog, monkeypatch) -> None:
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)  # no backend serves it
    fe = FrontendDevice(guest, dev)
    ports, xenstore = fe.evtchn.close, fe.xenstore.close

    def failing(what: str, close: Callable[[], None]) -> Callable[[], None]:
        def closed_then_failed() -> None:
            close()
            raise OSError(errno.EIO, f"{what} broke")
        return closed_then_failed

    monkeypatch.setattr(fe.evtchn, "close", failing("unbinding", ports))
    monkeypatch.setattr(fe.xenstore, "close", failing("closing", xenstore))
    with pytest.raises(OSError, match="unbinding broke"):
        fe.close()
    assert [r.getMessage() for r in caplog.records if r.name == "xenback.sim._frontend"] == [
        f"frontend of {dev.frontend_path}: unbinding its ports: [Errno 5] unbinding broke",
        f"frontend of {dev.frontend_path}: closing its XenStore connection: "
        "[Errno 5] closing broke",
    ]
    host.toolstack.destroy_device(dev)


def test_publish_writes_nodes_given_by_name_too(host, dom0_xs) -> None:
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    with FrontendDevice(guest, dev) as fe:
        fe.publish({"ring-ref": 8}, port=3, state=S.INITIALISING)
        assert [dom0_xs.read(f"{dev.frontend_path}/{key}") for key in ("ring-ref", "port", "state")
                ] == ["8", "3", str(int(S.INITIALISING))]
        fe.close(handshake=False)
    host.toolstack.destroy_device(dev)


def test_a_frontend_is_refused_another_domain_s_device(host) -> None:
    guest, other = host.create_domain("guest"), host.create_domain("other")
    dev = host.toolstack.add_device("xbtest", other.domid)
    with pytest.raises(ValueError, match=(
            f"device {re.escape(dev.frontend_path)} is domain {other.domid}'s, "
            f"not domain {guest.domid}'s")):
        FrontendDevice(guest, dev)
    host.toolstack.destroy_device(dev)


def test_add_removes_the_device_again_if_the_frontend_cannot_be_made(
        host, dom0_xs, monkeypatch) -> None:
    guest = host.create_domain("guest")

    def no_gntshr() -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(guest, "gntshr", no_gntshr)
    with pytest.raises(OSError, match="Too many open files"):
        FrontendDevice.add(guest, "xbtest")
    assert not dom0_xs.exists(f"/local/domain/{guest.domid}/device/xbtest/0")
    assert not dom0_xs.exists(f"/local/domain/0/backend/xbtest/{guest.domid}/0")
    monkeypatch.undo()
    with FrontendDevice.add(guest, "xbtest"):  # not refused: nothing was left
        pass


@pytest.mark.parametrize("failing", ["gntshr", "evtchn"])
def test_a_frontend_that_cannot_be_made_closes_what_it_had_opened(
        host, monkeypatch, failing: str) -> None:
    """Made for a device of its own (not by add()), a frontend that fails
    halfway closes the handles it had opened: its XenStore connection's
    router thread, and the grant handle, ran on for nobody."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    opened: list[Any] = []
    real_gntshr = guest.gntshr

    def gntshr() -> Any:
        opened.append(real_gntshr())
        return opened[-1]

    def refused() -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(guest, "gntshr", refused if failing == "gntshr" else gntshr)
    monkeypatch.setattr(guest, "evtchn", refused)
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(OSError, match="Too many open files"):
        FrontendDevice(guest, dev)
    assert not leaked_threads(before)
    for handle in opened:
        with pytest.raises(GrantError):
            handle.share_pages(0, 1)  # closed
    monkeypatch.undo()
    host.toolstack.destroy_device(dev)


def test_an_add_that_conflicts_with_another_s_removes_none_of_it(
        host, dom0_xs, monkeypatch) -> None:
    """Another toolstack call adds the same device while our transaction
    is open: ours conflicts (EAGAIN) and its retry finds the device
    there, FileExistsError.  The device it had listed in its first
    attempt is not ours: the failed add must leave it alone."""
    guest = host.create_domain("guest")
    toolstack = guest.toolstack
    real = Toolstack._transaction
    theirs: list[Any] = []
    inner: list[bool] = []

    def conflicting(self: Toolstack, body: Callable[[Any], Any], *args: Any) -> Any:
        if inner:
            return real(self, body, *args)

        def another_adds_it_meanwhile(c: Any) -> Any:
            result = body(c)
            if not theirs:
                inner.append(True)
                try:
                    theirs.append(toolstack.add_device("xbtest", guest.domid))
                finally:
                    inner.clear()
            return result

        return real(self, another_adds_it_meanwhile, *args)

    monkeypatch.setattr(Toolstack, "_transaction", conflicting)
    with pytest.raises(FileExistsError):
        FrontendDevice.add(guest, "xbtest")
    assert theirs
    assert dom0_xs.exists(f"/local/domain/{guest.domid}/device/xbtest/0")
    assert dom0_xs.exists(f"/local/domain/0/backend/xbtest/{guest.domid}/0")
    monkeypatch.undo()
    toolstack.destroy_device(theirs[0])


def test_wait_backend_says_the_backend_is_gone_and_refuses_once_closed(host, dom0_xs) -> None:
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    dom0_xs.rm(f"{dev.backend_path}/state")
    fe = FrontendDevice(guest, dev)
    with pytest.raises(TimeoutError, match=r"did not reach Connected within 0 s \(it is gone\)"):
        fe.wait_backend(S.CONNECTED, timeout=0)
    fe.close()
    with pytest.raises(RuntimeError, match=f"frontend of {re.escape(dev.frontend_path)} is closed"):
        fe.wait_backend(S.CONNECTED)
    host.toolstack.destroy_device(dev)


def test_pages_shared_read_only_cannot_be_mapped_writable(host) -> None:
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    gnttab = host.dom0.gnttab()
    try:
        with FrontendDevice(guest, dev) as fe:
            page = fe.share(writable=False)
            with pytest.raises(GrantError):
                gnttab.map_grant_refs(guest.domid, page.refs, writable=True)
            gnttab.map_grant_refs(guest.domid, page.refs, writable=False).unmap()
            fe.close(handshake=False)
    finally:
        gnttab.close()
        host.toolstack.destroy_device(dev)


def test_a_backend_state_that_is_no_state_satisfies_no_wait(host, dom0_xs) -> None:
    """Garbage in the backend's state node is waited past, and named."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    dom0_xs.write(f"{dev.backend_path}/state", "garbage")
    with FrontendDevice(guest, dev) as fe:
        with pytest.raises(TimeoutError, match=(
                r"did not satisfy the predicate within 0 s \(it is in no state: 'garbage'\)")):
            fe.wait_backend(lambda _state: True, timeout=0)
        fe.close(handshake=False)
    host.toolstack.destroy_device(dev)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("package", ["xenback", "pyxs"])
def test_an_add_interrupted_anywhere_is_whole_or_leaves_nothing(host, package: str) -> None:
    """A Ctrl-C landing as any call of add() returns (in xenback's code or
    pyxs's): the toolstack's device added, or the frontend's XenStore
    connection opened, but neither yet handed back, so that nobody could
    remove or close them (the device refused every later add with
    FileExistsError; the router thread ran for ever).  Either add()
    returns a whole frontend, or it leaves nothing."""
    import importlib
    import itertools
    import os
    import threading

    from tests.stolensignal import interrupted_at
    from tests.xenback.xbhelpers import leaked_threads

    within = os.path.dirname(importlib.import_module(package).__file__ or "")
    guest = host.create_domain("guest")
    landed: list[str] = []
    for n in itertools.count():
        before = {t.ident for t in threading.enumerate()}
        made: list[FrontendDevice] = []
        where = interrupted_at(n, within,
                               lambda made=made: made.append(FrontendDevice.add(guest, "xbtest")))
        for fe in made:  # interrupted as the append returned: add() was whole
            fe.close()
        assert not leaked_threads(before), f"interrupted {where}: {leaked_threads(before)}"
        left = host.toolstack.devices(guest.domid)
        for device in left:
            host.toolstack.destroy_device(device)  # for the next round
        assert left == [], f"interrupted {where}: {left} left behind"
        if not where:
            break
        landed.append(where)
    assert len(landed) > 100, landed


class _RacedNodes(dict[str, str]):
    """Backend nodes whose first reading (in the add's transaction, after
    it found the device absent) lets another adder add the same device
    first: the add's commit then fails with EAGAIN."""

    def __init__(self, rival: Callable[[], object]) -> None:
        super().__init__()
        self._rival: Callable[[], object] | None = rival

    def items(self) -> Any:
        rival, self._rival = self._rival, None
        if rival is not None:
            from tests.racewindow import Attempt

            # On a thread of its own: the Ctrl-C sweep is of this one.
            outcome = Attempt(rival).result()
            assert not isinstance(outcome, BaseException), outcome
        return super().items()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("package", ["xenback", "pyxs"])
def test_an_add_that_lost_the_race_lists_nothing_wherever_interrupted(host, package: str) -> None:
    """Two adders race for one device: ours finds it absent, the other
    adds it, our commit fails (EAGAIN), and a Ctrl-C lands anywhere in
    our add_device(into=), before or while it tries again.  into= listed
    the device from before the failed commit until the next attempt
    began, so that FrontendDevice.add()'s way out removed the other
    adder's device.  Now into= lists only a device this call added: here
    none, and the other's stays."""
    import importlib
    import itertools
    import os

    from tests.stolensignal import interrupted_at

    toolstack = host.toolstack
    guest = host.create_domain("guest")
    within = os.path.dirname(importlib.import_module(package).__file__ or "")
    landed: list[str] = []
    for n in itertools.count():
        theirs: list[Any] = []
        ours: list[Any] = []
        rival = _RacedNodes(lambda theirs=theirs: theirs.append(
            toolstack.add_device("xbtest", guest.domid)))

        def adding(ours: list[Any] = ours, rival: _RacedNodes = rival) -> None:
            with pytest.raises(FileExistsError):
                toolstack.add_device("xbtest", guest.domid, backend_nodes=rival, into=ours)

        where = interrupted_at(n, within, adding)
        assert ours == [], f"interrupted {where}: the other adder's device listed as ours"
        left = toolstack.devices(guest.domid)
        for device in left:
            toolstack.destroy_device(device)  # for the next round
        if theirs:
            assert left == theirs, f"interrupted {where}: {left}"
        if not where:
            break
        landed.append(where)
    assert len(landed) > 20, landed
