"""The xenbus state machine on the simulated host: every transition and
failure path of the backend lifecycle checklist."""

from __future__ import annotations

import contextlib
import enum
import errno
import functools
import gc
import itertools
import logging
import os
import queue
import re
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

import workqueue._pool as wq_pool
from tests.racewindow import Attempt, PauseAt, stands_at
from tests.sim.hosthelpers import eventually
from tests.stolensignal import interrupt, interrupted_at, main_thread_in
from tests.xenback.xbhelpers import (
    TIMEOUT,
    Census,
    RecordingDriver,
    assert_dispatches,
    backend_device,
    connected,
    error_node,
    fails_once,
    handed_over,
    leaked_threads,
)
from workqueue import (
    WQ_MEM_RECLAIM,
    WQ_UNBOUND,
    Topology,
    Work,
    alloc_ordered_workqueue,
    alloc_workqueue,
)
from xenback import BackendDriver, RateLimit, XenbusState, XenStore, xenbus
from xenback import xenstore as xenstore_module
from xenback.sim import SimHost
from xenback.sim._xenstored import RawClient
from xenback.xenstore import Transaction

S = XenbusState


def _ports(host) -> int:
    return host.hypervisor.stats()["ports"]


def _grants(host) -> int:
    """Live grant entries: a shared page the guest stopped sharing stays
    alive exactly as long as somebody still maps it."""
    return host.hypervisor.stats()["grants"]


def _at_init_wait(host, frontends, name="guest", devid=0):
    """A new guest with an xbtest device whose backend reached InitWait:
    ``(guest, device, frontend)``."""
    guest = host.create_domain(name)
    dev = host.toolstack.add_device("xbtest", guest.domid, devid=devid)
    fe = frontends(guest, dev)
    fe.wait_backend(S.INIT_WAIT)
    return guest, dev, fe


def _connect(frontends, guest, dev):
    """A frontend for ``dev`` that waits for InitWait, publishes and waits
    for Connected."""
    fe = frontends(guest, dev)
    fe.wait_backend(S.INIT_WAIT)
    fe.publish()
    fe.wait_backend(S.CONNECTED)
    return fe


def _re_created_while_held(drv, host, frontends, dom0_xs, guest, dev, fe, old, go):
    """While ``old``, the backend device of ``dev``, is held until ``go``
    is set: its frontend closes and the toolstack deletes it and makes it
    again at the same path; then it is let go.  The new device must be
    probed and connected, the old one dropped.  Returns the new toolstack
    device and its connected frontend."""
    fe.close()
    dom0_xs.rm(dev.backend_path)
    dom0_xs.rm(dev.frontend_path)
    again = host.toolstack.add_device("xbtest", guest.domid)
    go.set()
    fe = _connect(frontends, guest, again)
    assert backend_device(drv, guest.domid) is not old and old.gone
    assert drv.calls_of(guest.domid).count("probe") == 2
    return again, fe


def _re_created_behind(drv, host, frontends, dom0_xs, guest, dev, fe, *behind):
    """:func:`_re_created_while_held`, the device held by its own queue
    (and the calls ``behind`` after the hold)."""
    old = backend_device(drv, guest.domid)
    stalled, go = threading.Event(), threading.Event()
    old.queue(lambda: (stalled.set(), go.wait(TIMEOUT)))  # its events wait
    for call in behind:
        old.queue(*call)
    assert stalled.wait(TIMEOUT)
    return _re_created_while_held(drv, host, frontends, dom0_xs, guest, dev, fe, old, go)


def _watches_on(host, path: str) -> int:
    """Watches on exactly ``path`` in the host's XenStore (asked on its loop thread)."""
    xsd = host._xenstored
    return xsd._call(lambda: len(xsd._dispatcher.watches.matching(path, False)))


def test_state_values_and_parsing() -> None:
    assert [s.value for s in S] == list(range(9))
    assert S.parse(None) is S.UNKNOWN
    assert S.parse("4") is S.CONNECTED
    assert S.parse(" 4\n") is S.CONNECTED  # as Linux's "%d" reads it
    # Other scripts' digits too: int() takes them, and a frontend writing
    # "\u0664" (Arabic-Indic four) must not be read as Connected.
    for bad in ("", "9", "-1", "4x", "connected", "\u0664", "\uff14"):
        with pytest.raises(ValueError, match="invalid xenbus state"):
            S.parse(bad)


def test_an_invalid_state_is_quoted_short_and_escaped() -> None:
    """The state is the frontend's, kilobytes of it if it likes: its error
    (the error node's text, and the log line's) quotes its start only."""
    with pytest.raises(ValueError) as caught:
        S.parse("\x1b[2J" + "9" * 2000)
    assert str(caught.value) == f"invalid xenbus state {ascii(chr(27) + '[2J' + '9' * 28)}"


def test_driver_needs_a_device_type(host) -> None:
    from xenback import BackendDriver

    with pytest.raises(TypeError, match="device_type"):
        BackendDriver(host.dom0)


@pytest.mark.parametrize("platform", [None, "/tmp/run", 0], ids=["None", "str", "int"])
def test_a_driver_s_platform_of_the_wrong_type_is_named(platform: object) -> None:
    # Used unchecked, it was "'NoneType' object has no attribute 'domid'".
    from xenback import BackendDriver

    class Toy(BackendDriver):
        device_type = "toy"

    with pytest.raises(TypeError, match=f"^platform must be a xenback.platform.Platform, "
                                        f"not {type(platform).__name__}$"):
        Toy(platform)  # type: ignore[arg-type]


def test_a_driver_s_workqueue_of_the_wrong_type_is_named(host) -> None:
    # Taken unchecked, it failed at start() with an AttributeError.
    from xenback import BackendDriver

    class Toy(BackendDriver):
        device_type = "toy"

    with pytest.raises(TypeError, match="^workqueue must be a workqueue.Workqueue or None, "
                                        "not int$"):
        Toy(host.dom0, workqueue=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("device_type", ["vif/x", "v if", "v\u00eff", "vif\n", 5, b"vif"])
def test_a_device_type_that_cannot_name_a_directory_is_refused_at_once(
        host, device_type) -> None:
    """device_type names a XenStore directory: one XenStore would refuse
    failed only at start(), as an invalid path, naming neither the class
    nor its attribute."""
    from xenback import BackendDriver

    class Misnamed(BackendDriver):
        pass

    Misnamed.device_type = device_type  # type: ignore[assignment]
    with pytest.raises(TypeError, match=f"Misnamed must set device_type to a device type "
                                        f"name .*, not {re.escape(repr(device_type))}"):
        Misnamed(host.dom0)


def test_lifecycle_connect_close_reconnect_remove(host, driver, frontends, dom0_xs) -> None:
    baseline_ports = _ports(host)
    guest, dev, fe = _at_init_wait(host, frontends, "guest")
    # The features are written before InitWait is.
    assert fe.xs.read(f"{dev.backend_path}/feature-test") == "1"
    assert driver.calls_of(guest.domid) == ["probe"]

    fe.publish()
    fe.wait_backend(S.CONNECTED)
    bdev = backend_device(driver, guest.domid)
    assert bdev.resources == (1, 1)
    assert bdev.otherend == dev.frontend_path
    assert bdev.frontend_state == S.INITIALISED
    assert _ports(host) == baseline_ports + 2  # frontend's and backend's ends

    fe.set_state(S.CLOSING)
    fe.wait_backend(S.CLOSING)
    assert bdev.resources == (0, 0)
    assert bdev.frontend_state == S.CLOSING
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect"]

    # Reconnect from Closed: Initialising brings InitWait back, then connect.
    fe.set_state(S.INITIALISING)
    fe.wait_backend(S.INIT_WAIT)
    fe.set_state(S.CONNECTED)  # a frontend may skip Initialised
    fe.wait_backend(S.CONNECTED)
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "connect"]
    assert bdev.resources == (1, 1)

    # Removal the way libxl does it, with a frontend that follows the
    # backend to Closed: online=0, Closing, wait for Closed, delete.
    def follow() -> None:
        fe.wait_backend(S.CLOSING)
        fe.set_state(S.CLOSING)
        fe.set_state(S.CLOSED)

    follower = threading.Thread(target=follow)
    follower.start()
    assert host.toolstack.remove_device(dev, timeout=TIMEOUT) is True
    follower.join(TIMEOUT)
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert driver.devices() == []
    assert bdev.gone and bdev.resources == (0, 0)
    assert driver.calls_of(guest.domid)[-2:] == ["disconnect", "remove"]
    assert _ports(host) == baseline_ports + 1  # only the frontend's own port
    assert error_node(dom0_xs, dev) is None
    fe.pages.unshare()
    assert _grants(host) == 0  # nobody maps the ring page any more


def test_a_frontend_may_connect_again_straight_from_closed(host, driver, frontends) -> None:
    """After Closed (the device stays online) a frontend may publish its
    ring and go Initialised without passing through Initialising: as
    Linux's backends, connect from any state but Closing."""
    guest, dev, fe = connected(host, frontends)
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)
    fe.publish()
    fe.wait_backend(S.CONNECTED)
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "connect"]
    assert backend_device(driver, guest.domid).resources == (1, 1)


def test_init_wait_comes_after_the_features(host, driver, frontends, dom0_xs) -> None:
    """The frontend may read the features as soon as it sees InitWait, so
    InitWait is written only once probe() has returned."""
    in_probe, release = threading.Event(), threading.Event()

    def hold(dev) -> None:
        in_probe.set()
        release.wait(TIMEOUT)

    driver.probe_hook = hold
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    assert in_probe.wait(TIMEOUT)
    assert dom0_xs.read(f"{dev.backend_path}/feature-test") == "1"
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.INITIALISING))
    release.set()
    dom0_xs.wait_for(f"{dev.backend_path}/state", str(int(S.INIT_WAIT)), timeout=TIMEOUT)


def test_removal_of_a_device_whose_frontend_never_connected(host, driver, frontends) -> None:
    census = Census(host, driver)
    guest, dev, fe = _at_init_wait(host, frontends, "idle")
    # The guest never loads its driver; libxl must not wait 10 s for us.
    assert host.toolstack.remove_device(dev, timeout=TIMEOUT) is True
    driver.wait_call("remove", guest.domid)
    assert driver.calls_of(guest.domid) == ["probe", "remove"]
    fe.close()
    census.check()
    connected(host, frontends, "other")


@pytest.mark.parametrize("connect", [False, True], ids=["init-wait", "connected"])
def test_a_removal_of_a_probed_device_is_answered_by_its_own_drop(
        host, driver, frontends, dom0_xs, caplog, connect: bool) -> None:
    """A removal (online=0, Closing) of a device we probed is answered by
    its drop, which writes Closed over the toolstack's Closing before
    remove(); not left to the look at the path that comes after the drop,
    which answers only devices never probed (_close_unprobed), and would
    hide a Closed refused by the device's own switch behind a line saying
    the device was removed before it was probed."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest, dev, fe = connected(host, frontends) if connect else _at_init_wait(host, frontends)
    bdev = backend_device(driver, guest.domid)
    at_remove: list[S] = []
    plain = driver.remove

    def remove(d: Any) -> None:
        at_remove.append(d.state)  # as last written: the toolstack may delete it now
        plain(d)

    driver.remove = remove  # type: ignore[method-assign]

    def follow() -> None:
        fe.wait_backend(S.CLOSING)
        fe.set_state(S.CLOSING)
        fe.set_state(S.CLOSED)

    follower = threading.Thread(target=follow)
    if connect:
        follower.start()
    assert host.toolstack.remove_device(dev, timeout=TIMEOUT) is True
    if connect:
        follower.join(TIMEOUT)
    assert driver.wait_removed(guest.domid) is bdev
    driver._bus.flush()  # the drop's look at the path, last
    assert at_remove == [S.CLOSED]
    assert not [r for r in caplog.records if "before it was probed" in r.getMessage()]


def test_a_device_gone_from_the_list_was_said_removed(
        host, driver, frontends, monkeypatch, caplog) -> None:
    """The drop says a device removed (with the count of its lines
    suppressed) while devices() still lists it: whoever sees it gone there
    finds the line.  (Said after, a test that waited for the list read
    the log before it.)"""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    pause = PauseAt.in_method(monkeypatch, type(driver), "_forget", 'logger.info("%s: removed"')

    def follow() -> None:
        fe.wait_backend(S.CLOSING)
        fe.set_state(S.CLOSING)
        fe.set_state(S.CLOSED)

    follower = Attempt(follow)
    removal = Attempt(lambda: host.toolstack.remove_device(dev, timeout=TIMEOUT))
    try:
        assert pause.reached.wait(TIMEOUT)
        listed = driver.devices()
    finally:
        pause.resume()
    assert follower.result() is None and removal.result() is True
    assert listed == [bdev]
    driver.wait(lambda: driver.devices() == [])
    assert f"{bdev.nodename}: removed" in [r.getMessage() for r in caplog.records]


def test_a_device_dropped_twice_is_said_removed_once(host, driver, frontends, caplog) -> None:
    """Two drops queued behind each other (its frontend's domain dead,
    and stop()'s, say): the second finds the device gone and forgotten,
    and says nothing more (it finishes a drop cut short, which had not
    said the removal yet, see _forget)."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    held, go = threading.Event(), threading.Event()
    bdev.queue(lambda: (held.set(), go.wait(TIMEOUT)))
    assert held.wait(TIMEOUT)
    bdev.events.call(driver._domain_dead, bdev)
    bdev.events.call(driver._drop, bdev)
    go.set()
    bdev.events.flush()
    assert bdev.gone and driver.devices() == []
    said = [r.getMessage() for r in caplog.records]
    assert said.count(f"{bdev.nodename}: removed") == 1, said


def test_connect_is_not_repeated_while_connected(host, driver, frontends) -> None:
    guest, dev, fe = connected(host, frontends)
    fe.set_state(S.CONNECTED)  # Initialised -> Connected on the frontend
    fe.set_state(S.CONNECTED)
    fe.xs.write(f"{dev.frontend_path}/unrelated", "x")
    fe.set_state(S.CLOSING)
    fe.wait_backend(S.CLOSING)
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect"]


def test_tracked_resources_can_be_released_early(host, driver, frontends) -> None:
    """A driver may unmap and unbind before disconnect; what it released
    is no longer tracked, and disconnect releases only the rest."""
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    (port,) = driver.events.ports
    # A port number that only equals the port (1.0 == 1) is refused, the
    # port still tracked: dropped from the list first, it was lost to
    # disconnect once the dispatcher refused it.
    for wrong in [float(port)] + ([True] if port == 1 else []):
        with pytest.raises(TypeError, match=f"port must be an int, not {type(wrong).__name__}"):
            bdev.unbind_evtchn(wrong)  # type: ignore[arg-type]
    assert bdev.resources == (1, 1) and driver.events.ports == [port]
    # An int subclass is the port (the xen platform takes it: a uint32_t).
    bdev.unbind_evtchn(enum.IntEnum("Port", {"RING": port}).RING)
    assert bdev.resources == (1, 0) and driver.events.ports == []
    bdev.unmap(bdev.driver_data)
    assert bdev.resources == (0, 0)
    with pytest.raises(KeyError):
        driver.events.unbind(port)
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)
    fe.close()
    census.check()


def test_notify_takes_a_port_by_the_rule_of_ports(host, driver, frontends, monkeypatch) -> None:
    """notify(True) found port 1 in the device's list (True == 1) and the
    handle then refused it; notify("1") was quietly not sent.  Refused
    first, as unbind_evtchn() refuses them, naming the argument; an int
    subclass is the port."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    (port,) = driver.events.ports
    sent: list[int] = []
    monkeypatch.setattr(driver.events, "notify", sent.append)
    for wrong in (True, False, float(port), str(port), None):
        with pytest.raises(TypeError, match=f"^port must be an int, not {type(wrong).__name__}$"):
            bdev.notify(wrong)  # type: ignore[arg-type]
    assert sent == []
    bdev.notify(enum.IntEnum("Port", {"RING": port}).RING)
    assert sent == [port]


def test_releasing_what_the_framework_released_already(host, driver, frontends) -> None:
    """A driver's own work item may unmap or unbind after disconnect
    released everything: unmapping again is a no-op, as it is for the
    mapping itself; unbinding says which port the device does not hold."""
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    mapping = bdev.driver_data
    (port,) = driver.events.ports
    fe.set_state(S.CLOSING)
    fe.wait_backend(S.CLOSING)
    assert bdev.resources == (0, 0)
    bdev.unmap(mapping)
    with pytest.raises(KeyError, match=f"port {port} is not bound by {dev.backend_path}"):
        bdev.unbind_evtchn(port)
    # A mapping the device never held is left alone too, mapped.
    with driver.gnttab.map_grant_refs(guest.domid, [fe.pages.refs[0]]) as other:
        bdev.unmap(other)
        assert len(other.buffer) == 4096
    fe.close()
    census.check()


def _unbind_as_stop_closes_the_dispatcher(
        driver: BackendDriver, unbind: Callable[[], object], forgotten: bool) -> None:
    """``unbind()`` on a driver's own thread, paused at the dispatcher's
    unbind, once the port has left the device; stop() meanwhile drops
    the device and closes the dispatcher (which unbinds every port), and
    forgets it, or is held just after closing it.  Both end, unbind()
    returning None."""
    unbinding = PauseAt(xenbus.BackendDevice._unbind, "record.events.unbind(port")
    closing = PauseAt(xenbus.BackendDriver._stop, "self._events = None")
    stopping = None
    unbinder = Attempt(lambda: unbinding.run(unbind))
    try:
        assert unbinding.reached.wait(TIMEOUT)
        if forgotten:
            driver.stop()
        else:
            stopping = Attempt(lambda: closing.run(driver.stop))
            assert closing.reached.wait(TIMEOUT)
    finally:
        unbinding.resume()
    try:
        assert unbinder.result() is None
    finally:
        closing.resume()
    if stopping is not None:
        assert stopping.result() is None


@pytest.mark.parametrize("forgotten", [True, False], ids=["forgotten", "closed"])
def test_a_port_unbound_as_stop_closes_the_dispatcher_is_unbound_quietly(
        host, driver, frontends, forgotten: bool) -> None:
    """A driver's own thread unbinds its port, and stop() drops the
    device and closes the dispatcher (which unbinds every port) between
    the port's leaving the device and its unbind: once the dispatcher
    is forgotten, or only closed.  The port is unbound, as asked: the
    unbind raised the RuntimeError of a driver stopped, or the KeyError
    of a port the closed dispatcher no longer held, as if the driver
    had unbound a port it did not hold."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    (port,) = bdev._ports
    _unbind_as_stop_closes_the_dispatcher(driver, lambda: bdev.unbind_evtchn(port), forgotten)
    assert bdev.gone and bdev.resources == (0, 0)
    assert _ports(host) == 1  # the frontend's own
    fe.close()


def _unbind_across_a_restart(host, driver, frontends, fe, unbind: Callable[[], object]) -> None:
    """``unbind()`` on a driver's own thread, paused at the dispatcher's
    unbind, once the port has left the device; meanwhile stop(), the
    frontend ``fe`` closed, start(), and another guest's device connected.
    unbind() returns None, and the new device's port stays bound."""
    unbinding = PauseAt(xenbus.BackendDevice._unbind, "record.events.unbind(port")
    unbinder = Attempt(lambda: unbinding.run(unbind))
    try:
        assert unbinding.reached.wait(TIMEOUT)
        driver.stop()
        fe.close()
        driver.start()
        other, _, _ = connected(host, frontends, name="other")
        (new_port,) = backend_device(driver, other.domid)._ports
        bound = _ports(host)
    finally:
        unbinding.resume()
    assert unbinder.result() is None
    assert new_port in driver.events._ports, "the new device's port was unbound"
    assert _ports(host) == bound


def test_a_port_unbound_across_a_restart_leaves_the_new_dispatcher_alone(
        host, driver, frontends) -> None:
    """A driver's own thread unbinds its port, and stop() and start()
    come between the port's leaving the device and its unbind: stop()'s
    dispatcher unbound the port as it closed.  The unbind went to the
    restarted driver's new dispatcher, where the number may be a new
    device's port by now: that port was unbound under the new device
    (its events lost), or, another number, the KeyError of a port the
    driver never held raised, as if its own bug."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    (port,) = bdev._ports
    _unbind_across_a_restart(host, driver, frontends, fe, lambda: bdev.unbind_evtchn(port))
    assert bdev.gone and bdev.resources == (0, 0)


def test_a_release_across_a_restart_leaves_the_new_dispatcher_alone(
        host, driver, frontends) -> None:
    """release_resources() on a driver's own thread, as
    test_a_port_unbound_across_a_restart_leaves_the_new_dispatcher_alone
    unbinds: a stop() and a start() between the ports' leaving the
    device and their unbind.  The old port's number, a new device's
    port by then, was unbound on the new dispatcher."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    _unbind_across_a_restart(host, driver, frontends, fe, bdev.release_resources)
    assert bdev.gone and bdev.resources == (0, 0)


@pytest.mark.parametrize("forgotten", [True, False], ids=["forgotten", "closed"])
def test_a_release_as_stop_closes_the_dispatcher_says_no_failure(
        host, driver, frontends, caplog, forgotten: bool) -> None:
    """release_resources() on a driver's own thread, as
    test_a_port_unbound_as_stop_closes_the_dispatcher_is_unbound_quietly
    unbinds: stop() drops the device and closes the dispatcher (which
    unbinds every port) between the ports' leaving the device and their
    unbind, once the dispatcher is forgotten or only closed.  The ports
    are unbound, as asked: the KeyError of a closed dispatcher was said
    as a failed unbind, with its traceback, as if the driver had
    unbound a port behind the device's back."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    _unbind_as_stop_closes_the_dispatcher(driver, bdev.release_resources, forgotten)
    assert bdev.gone and bdev.resources == (0, 0)
    assert _ports(host) == 1  # the frontend's own
    assert not [r for r in caplog.records if r.msg == "%s: unbinding port %d failed"]
    fe.close()


def test_a_port_s_unbind_cut_short_as_the_device_is_dropped_leaves_it_unbound(
        host, driver, frontends, dom0_xs, monkeypatch) -> None:
    """A driver's thread unbinds its port as the device is dropped, the
    release coming while that unbind is under way, before the
    dispatcher's; then a Ctrl-C lands as the dispatcher's unbind
    starts.  The release left the port to that unbind, and the device
    went: the port stayed bound, known to nobody, until stop().  It is
    unbound, once."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    (port,) = bdev._ports
    events = driver.events
    handle = events._evtchn
    real_unbind, real_events_unbind = handle.unbind, events.unbind
    unbound: list[int] = []
    unbinders: list[threading.Thread] = []

    def unbind(number: int) -> None:
        real_unbind(number)
        unbound.append(number)

    def events_unbind(number: int, callback: object = None) -> None:
        if threading.current_thread() in unbinders:
            raise KeyboardInterrupt  # a Ctrl-C as the dispatcher's unbind starts
        real_events_unbind(number, callback)

    monkeypatch.setattr(handle, "unbind", unbind)
    monkeypatch.setattr(events, "unbind", events_unbind)
    unbinding = PauseAt(xenbus.BackendDevice._unbind, "record.events.unbind(port")
    unbinder = Attempt(lambda: unbinding.run(lambda: bdev.unbind_evtchn(port)))
    unbinders.append(unbinder.thread)
    try:
        assert unbinding.reached.wait(TIMEOUT)
        dom0_xs.rm(dev.frontend_path)  # Unknown: Closed, and dropped
        driver.wait_removed(guest.domid)
        assert bdev.gone
    finally:
        unbinding.resume()
    outcome = unbinder.result()
    assert outcome is None or isinstance(outcome, KeyboardInterrupt), outcome
    driver._bus.flush()
    assert unbound == [port]
    assert port not in driver.events.ports
    assert bdev.resources == (0, 0)


def test_a_port_s_unbind_overtaken_by_the_drop_s_release_is_a_key_error(
        host, driver, frontends, dom0_xs, monkeypatch) -> None:
    """A driver's thread unbinds its port as the device is dropped, the
    drop's release coming while that unbind is under way, before the
    dispatcher's: the release, the device's last, unbinds the port, once,
    and the driver's call then meets the dispatcher's KeyError, as for a
    port released already."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    (port,) = bdev._ports
    handle = driver.events._evtchn
    real_unbind = handle.unbind
    unbound: list[int] = []

    def unbind(number: int) -> None:
        real_unbind(number)
        unbound.append(number)

    monkeypatch.setattr(handle, "unbind", unbind)
    unbinding = PauseAt(xenbus.BackendDevice._unbind, "record.events.unbind(port")
    unbinder = Attempt(lambda: unbinding.run(lambda: bdev.unbind_evtchn(port)))
    try:
        assert unbinding.reached.wait(TIMEOUT)
        dom0_xs.rm(dev.frontend_path)  # Unknown: Closed, and dropped
        driver.wait_removed(guest.domid)
        assert unbound == [port]
        assert bdev.resources == (0, 0)
    finally:
        unbinding.resume()
    outcome = unbinder.result()
    assert isinstance(outcome, KeyError) and f"port {port} is not bound here" in str(outcome)
    assert unbound == [port]


@pytest.mark.timeout(300)
def test_a_port_s_unbind_cut_short_twice_as_the_device_is_dropped_leaves_it_unbound(
        host, driver, frontends, dom0_xs, monkeypatch) -> None:
    """As test_a_port_s_unbind_cut_short_as_the_device_is_dropped_leaves_it_unbound,
    on the main thread, a second Ctrl-C landing anywhere after the first:
    one in the call's hand-off of the port to a release on the bus, before
    it was queued, left the port bound, known to nobody, until stop().
    The drop's release takes the port over instead (there is no hand-off
    left, nor a place for the second to land)."""
    within = os.path.dirname(xenbus.__file__)
    events = driver.events
    real_events_unbind = events.unbind
    cut: list[int] = []

    def events_unbind(number: int, callback: object = None) -> None:
        if threading.current_thread() is not threading.main_thread():
            real_events_unbind(number, callback)
            return
        dom0_xs.rm(dropping.frontend_path)  # Unknown: Closed, and dropped
        driver.wait_removed(guest.domid)
        cut.append(number)
        raise KeyboardInterrupt  # a Ctrl-C as the dispatcher's unbind starts

    monkeypatch.setattr(events, "unbind", events_unbind)
    for n in itertools.count():
        cut.clear()
        guest, dropping, fe = connected(host, frontends, name=f"guest{n}")
        bdev = backend_device(driver, guest.domid)
        (port,) = bdev._ports

        def unbind(bdev: xenbus.BackendDevice = bdev, port: int = port) -> None:
            with contextlib.suppress(KeyboardInterrupt):  # the first: a second may land
                bdev.unbind_evtchn(port)

        where = interrupted_at(n, within, unbind, unless=lambda: not cut)
        assert cut == [port], f"interrupted {where}"
        driver._bus.flush()
        assert port not in events.ports, f"interrupted {where}"
        assert bdev.resources == (0, 0), f"interrupted {where}"
        fe.close()
        if not where:
            break


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["unbind_evtchn", "release_resources"])
def test_an_unbind_interrupted_anywhere_is_finished_by_the_next(
        host, driver, frontends, monkeypatch, how: str) -> None:
    """A Ctrl-C landing anywhere in unbind_evtchn() or release_resources()
    (but inside the simulated hypervisor, whose unbind the dispatcher
    cannot tell done or not: see EventDispatcher.unbind).  One once the
    port had left the device's list, before or inside the dispatcher's
    unbind, left the port bound for good, unknown to the device; and a
    release took every port off at once, so one there lost each port it
    had not unbound yet, and every mapping (taken off at once too).  The
    next call for the port, or the next release, finishes the job: every
    port unbound, and only once, and every mapping unmapped."""
    within = os.path.dirname(xenbus.__file__)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    handle = driver.events._evtchn
    real_unbind = handle.unbind
    unbound: list[int] = []

    def counted(port: int) -> None:
        real_unbind(port)
        unbound.append(port)

    monkeypatch.setattr(handle, "unbind", counted)
    landed: list[str] = []
    for n in itertools.count():
        mine = [bdev.bind_evtchn(fe.frontend.bind_port(), lambda port: None) for _ in range(2)]
        if how == "release_resources":
            bdev.map_grant_refs([fe.pages.refs[0]])
        held = sorted(bdev._ports)
        expected = held if how == "release_resources" else mine
        bound = _ports(host)
        mapped, maps = host.hypervisor.stats()["mappings"], bdev.resources[0]
        unbound.clear()

        def unbind(mine: list[int] = mine) -> None:
            if how == "release_resources":
                bdev.release_resources()
            else:
                for port in mine:
                    with contextlib.suppress(KeyError):  # unbound by the call cut short
                        bdev.unbind_evtchn(port)

        # The handle's own code (its checks in platform.py too) left out.
        where = interrupted_at(n, within, unbind, besides=(os.path.join(within, "sim"),
                                                           os.path.join(within, "platform.py")))
        if where:
            unbind()  # again
        assert sorted(unbound) == expected, f"interrupted {where}"
        assert _ports(host) == bound - len(expected), f"interrupted {where}"
        assert sorted(bdev._ports) == [p for p in held if p not in expected], f"interrupted {where}"
        assert bdev.resources[1] == len(held) - len(expected), f"interrupted {where}"
        if how == "release_resources":
            assert bdev.resources[0] == 0, f"interrupted {where}"
            assert host.hypervisor.stats()["mappings"] == mapped - maps, f"interrupted {where}"
        if not where:
            break
        landed.append(where)
    assert any("BackendDevice._unbind" in where for where in landed), landed
    assert any("EventDispatcher.unbind" in where for where in landed), landed


def test_a_second_unbind_of_a_port_whose_unbind_is_under_way_is_a_key_error(
        host, driver, frontends) -> None:
    """A driver's thread unbinds its port; meanwhile, before the
    dispatcher's unbind, the driver unbinds it again on another thread.
    The port is the first call's: the second raises KeyError, as for a
    port the device does not hold, and the first unbinds it.  Taken by
    both, the dispatcher unbound it for the second, and the first, its
    owner, met a KeyError that says a bug that is none."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    port = bdev.bind_evtchn(fe.frontend.bind_port(), lambda port: None)
    held = bdev.resources[1]
    unbinding = PauseAt(xenbus.BackendDevice._unbind, "record.events.unbind(port")
    unbinder = Attempt(lambda: unbinding.run(lambda: bdev.unbind_evtchn(port)))
    try:
        assert unbinding.reached.wait(TIMEOUT)
        with pytest.raises(KeyError, match=f"port {port} is not bound by"):
            bdev.unbind_evtchn(port)
        assert port in driver.events.ports
    finally:
        unbinding.resume()
    assert unbinder.result() is None
    assert port not in driver.events.ports
    assert bdev.resources[1] == held - 1


def test_a_release_while_the_device_is_there_leaves_a_port_under_way_to_its_unbind(
        host, driver, frontends) -> None:
    """A driver's thread unbinds its port; meanwhile, before the
    dispatcher's unbind, a release comes (a disconnect's: the device is
    still there).  The port is the driver's call's: the release leaves
    it, and that call unbinds it and returns.  Taken by both, the
    dispatcher unbound it for one, and the driver's call could meet a
    KeyError for a port it held; only the device's last release (once it
    is gone) takes it over, as nothing may come after it."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    port = bdev.bind_evtchn(fe.frontend.bind_port(), lambda port: None)
    unbinding = PauseAt(xenbus.BackendDevice._unbind, "record.events.unbind(port")
    unbinder = Attempt(lambda: unbinding.run(lambda: bdev.unbind_evtchn(port)))
    try:
        assert unbinding.reached.wait(TIMEOUT)
        bdev.release_resources()
        assert port in driver.events.ports
        assert bdev.resources == (0, 1)
    finally:
        unbinding.resume()
    assert unbinder.result() is None
    assert port not in driver.events.ports
    assert bdev.resources == (0, 0)


def test_no_event_is_sent_on_a_port_whose_unbind_is_under_way(
        host, driver, frontends, monkeypatch) -> None:
    """notify() as unbind_evtchn() of the port, on another thread, has
    taken it and not yet unbound it: nothing is sent (the port is going,
    and its number may be another's by the time a send gets there), as
    once it is unbound."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    port = bdev.bind_evtchn(fe.frontend.bind_port(), lambda port: None)
    sent: list[int] = []
    monkeypatch.setattr(driver.events, "notify", sent.append)
    bdev.notify(port)
    assert sent == [port]
    unbinding = PauseAt(xenbus.BackendDevice._unbind, "record.events.unbind(port")
    unbinder = Attempt(lambda: unbinding.run(lambda: bdev.unbind_evtchn(port)))
    try:
        assert unbinding.reached.wait(TIMEOUT)
        bdev.notify(port)
    finally:
        unbinding.resume()
    assert unbinder.result() is None
    bdev.notify(port)
    assert sent == [port]


def _an_unbind_cut_short_once_done(host, driver, frontends, monkeypatch):
    """A guest's device with a port bound, whose unbind_evtchn() a Ctrl-C
    cut short as the handle's unbind returned: the port is unbound, but
    the device cannot tell, and keeps it on record.  The device, the
    guest's frontend, the port, and the number of ports the device held
    before it bound it."""
    guest, _, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    held = bdev.resources[1]
    port = bdev.bind_evtchn(fe.frontend.bind_port(), lambda port: None)
    handle = driver.events._evtchn
    real_unbind = handle.unbind

    def unbind(number: int) -> None:
        real_unbind(number)
        raise KeyboardInterrupt  # a Ctrl-C as the handle's unbind returns

    monkeypatch.setattr(handle, "unbind", unbind)
    with pytest.raises(KeyboardInterrupt):
        bdev.unbind_evtchn(port)
    monkeypatch.setattr(handle, "unbind", real_unbind)
    assert port not in driver.events.ports
    return bdev, fe, port, held


@pytest.mark.parametrize("how", ["unbind_evtchn", "release_resources"])
def test_an_unbind_cut_short_once_done_is_finished_quietly(
        host, driver, frontends, monkeypatch, caplog, how: str) -> None:
    """unbind_evtchn() cut short by a Ctrl-C as the handle's unbind
    returned: the port is unbound, but the device cannot tell, and keeps
    it on record.  The next unbind_evtchn() of it, or the next release,
    finishes the job without a word: the dispatcher's KeyError then says
    the job was done, not that the driver unbound the port behind the
    device's back."""
    bdev, _, port, held = _an_unbind_cut_short_once_done(
        host, driver, frontends, monkeypatch)
    if how == "unbind_evtchn":
        assert bdev.unbind_evtchn(port) is None
        assert bdev.resources[1] == held
    else:
        bdev.release_resources()
        assert bdev.resources == (0, 0)
        assert not [r for r in caplog.records if r.msg == "%s: unbinding port %d failed"]


def test_a_port_number_bound_again_after_an_unbind_cut_short_counts_once(
        host, driver, frontends, monkeypatch) -> None:
    """unbind_evtchn() cut short by a Ctrl-C as the handle's unbind
    returned: the port is unbound, and kept on record for the next call
    to finish.  The device binds again and the dispatcher gives it the
    same number: resources counted that port twice, on record and
    bound, until its next unbind.  Given out again, the number's record
    is over: the port counts once."""
    bdev, fe, port, held = _an_unbind_cut_short_once_done(
        host, driver, frontends, monkeypatch)
    assert bdev.resources[1] == held + 1  # on record, as far as the device can tell
    again = bdev.bind_evtchn(fe.frontend.bind_port(), lambda port: None)
    assert again == port  # the number freed, taken again
    assert bdev.resources[1] == held + 1
    bdev.unbind_evtchn(again)
    assert again not in driver.events.ports
    assert bdev.resources[1] == held


def test_a_release_leaves_a_number_another_bound_after_an_unbind_cut_short_alone(
        host, driver, frontends, monkeypatch, caplog) -> None:
    """unbind_evtchn() cut short by a Ctrl-C as the handle's unbind
    returned: the port is unbound, and kept on record for the next call
    to finish.  Another owner binds the number on the same dispatcher.
    The release, finishing the record, must not unbind that owner's
    port: the dispatcher's unbind is given the record's callback, which
    is not that owner's, and says so with a KeyError the release takes
    for the job done."""
    bdev, fe, port, held = _an_unbind_cut_short_once_done(
        host, driver, frontends, monkeypatch)
    other = driver.events.bind_unbound_port(bdev.frontend_id, lambda port: None)
    assert other == port  # the number freed, taken again
    bdev.release_resources()
    assert other in driver.events.ports
    assert bdev.resources == (0, 0)
    assert not [r for r in caplog.records if r.msg == "%s: unbinding port %d failed"]
    driver.events.unbind(other)


def test_no_event_is_sent_on_a_number_another_bound_after_an_unbind_cut_short(
        host, driver, frontends, monkeypatch) -> None:
    """unbind_evtchn() cut short by a Ctrl-C as the handle's unbind
    returned: the port is unbound, and kept on record for the next call
    to finish.  Another owner binds the number on the same dispatcher.
    The device's notify() of its old number sends nothing: the event
    would reach the other owner's frontend."""
    bdev, fe, port, held = _an_unbind_cut_short_once_done(
        host, driver, frontends, monkeypatch)
    other = driver.events.bind_unbound_port(bdev.frontend_id, lambda port: None)
    assert other == port  # the number freed, taken again
    sent: list[int] = []
    monkeypatch.setattr(driver.events, "notify", sent.append)
    bdev.notify(port)
    assert sent == []
    driver.events.unbind(other)


def test_an_unbind_ending_after_its_number_was_bound_again_leaves_the_new_record(
        host, driver, frontends) -> None:
    """unbind_evtchn() of a port, held once the dispatcher has unbound it
    and before it takes the port off its record; meanwhile the device
    binds again, gets the same number, and unbinds that port too, on
    another thread, held before the dispatcher.  The first, ending,
    takes off its own record, not the second's: the port being unbound
    is still held, until that second unbind is over."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    held = bdev.resources[1]
    port = bdev.bind_evtchn(fe.frontend.bind_port(), lambda port: None)
    ending = PauseAt(xenbus.BackendDevice._unbind, "with self._lock:",
                     after="record.events.unbind(port")
    first = Attempt(lambda: ending.run(lambda: bdev.unbind_evtchn(port)))
    unbinding = PauseAt(xenbus.BackendDevice._unbind, "record.events.unbind(port")
    second = None
    try:
        assert ending.reached.wait(TIMEOUT)
        assert port not in driver.events.ports
        again = bdev.bind_evtchn(fe.frontend.bind_port(), lambda port: None)
        assert again == port  # the number freed, taken again
        second = Attempt(lambda: unbinding.run(lambda: bdev.unbind_evtchn(again)))
        assert unbinding.reached.wait(TIMEOUT)
    finally:
        ending.resume()
    try:
        assert first.result() is None
        assert bdev.resources[1] == held + 1
    finally:
        unbinding.resume()
    assert second is not None and second.result() is None
    assert again not in driver.events.ports
    assert bdev.resources[1] == held


def _refused(real: Callable[..., Any], refused: object, times: int,
             calls: list[object]) -> Callable[..., Any]:
    """A GrantMapping's ``real`` unmap, refused with ENOMEM (which Linux
    says may be tried again) before doing anything, the first ``times``
    calls for mapping ``refused``; ``calls`` gets each call's mapping."""
    def unmap(mapping: Any) -> None:
        calls.append(mapping)
        if mapping is refused and calls.count(mapping) <= times:
            raise OSError(errno.ENOMEM, "unmap refused")
        real(mapping)

    return unmap


def test_an_unmap_the_grant_handle_refuses_is_raised_and_held_for_the_next(
        host, driver, frontends, monkeypatch) -> None:
    """The grant handle refuses a driver's unmap() (ENOMEM): the driver
    sees the OSError, as the unmap's own, and the mapping, still
    mapped, stays the device's.  Forgotten, it was mapped until the
    handle closed, and no release tried again; the next unmap() does."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    mapping = bdev.map_grant_refs([fe.pages.refs[0]])
    maps = bdev.resources[0]
    mapped = host.hypervisor.stats()["mappings"]
    calls: list[object] = []
    monkeypatch.setattr(type(mapping), "unmap", _refused(type(mapping).unmap, mapping, 1, calls))
    with pytest.raises(OSError, match="unmap refused"):
        bdev.unmap(mapping)
    assert bdev.resources[0] == maps
    assert host.hypervisor.stats()["mappings"] == mapped
    bdev.unmap(mapping)
    assert bdev.resources[0] == maps - 1
    assert host.hypervisor.stats()["mappings"] == mapped - 1
    assert calls == [mapping, mapping]


def test_a_mapping_whose_unmap_a_release_refuses_is_tried_again_and_said_once(
        host, driver, frontends, monkeypatch, caplog) -> None:
    """A release whose unmap the grant handle refuses (ENOMEM), twice:
    the mapping, still mapped, stays the device's, said once (not at
    each release), and the next release unmaps it.  Forgotten, it was
    mapped until the handle closed; once unmapped, no release unmaps it
    again."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    mapping = bdev.map_grant_refs([fe.pages.refs[0]])
    mapped = host.hypervisor.stats()["mappings"]
    calls: list[object] = []
    monkeypatch.setattr(type(mapping), "unmap", _refused(type(mapping).unmap, mapping, 2, calls))
    with caplog.at_level(logging.DEBUG, logger="xenback"):
        for _ in range(2):
            bdev.release_resources()
            assert bdev.resources[0] == 1
            assert host.hypervisor.stats()["mappings"] == mapped - 1  # the connection's went
        said = [r for r in caplog.records if r.msg == "%s: unmapping %s failed"]
        assert [(r.levelno, r.args) for r in said] == [
            (logging.WARNING, (bdev.nodename, mapping))]
        bdev.release_resources()
        bdev.release_resources()
    assert bdev.resources[0] == 0
    assert host.hypervisor.stats()["mappings"] == mapped - 2
    assert [m for m in calls if m is mapping] == [mapping] * 3


def test_a_refusal_two_releases_meet_at_once_is_said_once(
        host, driver, frontends, monkeypatch, caplog) -> None:
    """Two releases at once, whose unmap of one mapping the grant handle
    refuses (ENOMEM): each looked whether the refusal was said, and
    marked it said in a second step, after saying it; the second release
    looking in between said it too."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    mapping = bdev.map_grant_refs([fe.pages.refs[0]])
    calls: list[object] = []
    monkeypatch.setattr(type(mapping), "unmap", _refused(type(mapping).unmap, mapping, 2, calls))
    saying = PauseAt.in_method(monkeypatch, xenbus.BackendDevice, "_unmap_refused",
                               "self._release_failed(")
    with caplog.at_level(logging.DEBUG, logger="xenback"):
        first = Attempt(bdev.release_resources)
        try:
            assert saying.reached.wait(TIMEOUT)
            bdev.release_resources()
        finally:
            saying.resume()
        assert first.result() is None
    said = [r for r in caplog.records if r.msg == "%s: unmapping %s failed"]
    assert [(r.levelno, r.args) for r in said] == [(logging.WARNING, (bdev.nodename, mapping))]
    assert bdev.resources[0] == 1
    bdev.release_resources()
    assert bdev.resources[0] == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("said_before", [False, True])
def test_a_refusal_said_as_a_ctrl_c_lands_anywhere_is_said_once(
        host, driver, frontends, monkeypatch, caplog, said_before: bool) -> None:
    """A Ctrl-C landing anywhere in a release whose unmap the grant
    handle refuses (ENOMEM), after one that said so or not, and a
    release refused again after it: the refusal is said once by them
    all.  One landing once it was said, before it was marked so, had
    the next release say it again."""
    within = os.path.dirname(xenbus.__file__)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    bdev.release_resources()  # the connection's: the sweep is of one mapping's
    refused: list[object] = []
    mapping = bdev.map_grant_refs([fe.pages.refs[0]])
    real = type(mapping).unmap

    def unmap(unmapping: Any) -> None:
        if unmapping in refused:
            raise OSError(errno.ENOMEM, "unmap refused")
        real(unmapping)

    monkeypatch.setattr(type(mapping), "unmap", unmap)
    caplog.set_level(logging.DEBUG, logger="xenback")
    landed: list[str] = []
    for n in itertools.count():
        refused[:] = [mapping]
        caplog.clear()
        if said_before:
            bdev.release_resources()
        where = interrupted_at(n, within, bdev.release_resources,
                               besides=os.path.join(within, "sim"))
        bdev.release_resources()
        said = [r for r in caplog.records
                if r.msg == "%s: unmapping %s failed" and r.levelno == logging.WARNING]
        assert [r.args for r in said] == [(bdev.nodename, mapping)], f"interrupted {where}"
        refused.clear()
        bdev.release_resources()
        assert bdev.resources[0] == 0, f"interrupted {where}"
        if not where:
            break
        landed.append(where)
        mapping = bdev.map_grant_refs([fe.pages.refs[0]])
    assert any("_unmap_refused" in where for where in landed), landed


def test_a_refused_mapping_a_drop_leaves_is_said_left_to_the_grant_handle(
        host, driver, dom0_xs, frontends, monkeypatch, caplog) -> None:
    """A device dropped with a mapping whose unmap the grant handle
    refuses (ENOMEM) at every release: the disconnect's release says it
    held for the next, and the drop's, the last (nothing releases a
    forgotten device), said only that it failed again, at DEBUG, as if
    a release were to come.  It says, as a warning, that the mapping is
    left to the grant handle's close."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    mapping = bdev.map_grant_refs([fe.pages.refs[0]])
    calls: list[object] = []
    monkeypatch.setattr(type(mapping), "unmap",
                        _refused(type(mapping).unmap, mapping, 1000, calls))
    with caplog.at_level(logging.DEBUG, logger="xenback"):
        dom0_xs.rm(dev.frontend_path)  # Unknown: Closed, and dropped
        driver.wait_removed(guest.domid)
        assert bdev.gone
    said = [(r.msg, r.args) for r in caplog.records
            if r.levelno == logging.WARNING and "unmapping %s failed" in str(r.msg)]
    assert said == [("%s: unmapping %s failed", (bdev.nodename, mapping)),
                    ("%s: unmapping %s failed; it is left to the grant handle's close",
                     (bdev.nodename, mapping))]
    assert calls.count(mapping) == 2


def test_a_refused_mapping_once_unmapped_is_held_by_nothing_of_the_device(
        host, driver, frontends, monkeypatch) -> None:
    """A mapping whose unmap a release refused, and said, then unmapped
    by the next: the device keeps nothing of it.  Its record of the
    refusal said, kept, held the mapping for the device's life."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    mapping = bdev.map_grant_refs([fe.pages.refs[0]])
    calls: list[object] = []
    monkeypatch.setattr(type(mapping), "unmap", _refused(type(mapping).unmap, mapping, 1, calls))
    bdev.release_resources()
    assert mapping in bdev._unmap_said
    bdev.release_resources()
    assert bdev.resources[0] == 0
    held = [r for r in gc.get_referrers(mapping) if r is bdev._mappings or r is bdev._unmap_said]
    assert held == []


def test_a_mapping_whose_unmap_says_its_service_went_is_forgotten_by_the_release(
        host, driver, frontends, monkeypatch, caplog) -> None:
    """A release whose unmap the grant handle answers ENODEV: its service
    went, and the mapping with it.  Said, and the mapping is the device's
    no longer: held, it was counted in resources, and tried again by
    every release, for ever."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    mapping = bdev.map_grant_refs([fe.pages.refs[0]])
    real = type(mapping).unmap

    def unmap(unmapping: Any) -> None:
        if unmapping is mapping:
            raise OSError(errno.ENODEV, "the service went")
        real(unmapping)

    monkeypatch.setattr(type(mapping), "unmap", unmap)
    with caplog.at_level(logging.WARNING, logger="xenback"):
        bdev.release_resources()
    assert bdev.resources == (0, 0)
    said = [r for r in caplog.records if r.msg == "%s: unmapping %s failed: %s"]
    assert [r.args[1] for r in said] == [mapping]  # type: ignore[index]


@pytest.mark.timeout(300)
def test_an_unmap_interrupted_anywhere_is_finished_by_the_next(host, driver, frontends) -> None:
    """A Ctrl-C landing anywhere in unmap() (but inside the simulated
    host's own code): one once the mapping had left the device's list,
    before or inside its unmap, left it mapped, unknown to the device
    and so to the release, until the grant handle closed.  The next
    unmap() finishes the job."""
    within = os.path.dirname(xenbus.__file__)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    landed: list[str] = []
    for n in itertools.count():
        mapping = bdev.map_grant_refs([fe.pages.refs[0]])
        mapped, maps = host.hypervisor.stats()["mappings"], bdev.resources[0]
        where = interrupted_at(n, within, lambda mapping=mapping: bdev.unmap(mapping),
                               besides=(os.path.join(within, "sim"),
                                        os.path.join(within, "platform.py")))
        if where:
            bdev.unmap(mapping)  # again
        assert bdev.resources[0] == maps - 1, f"interrupted {where}"
        assert host.hypervisor.stats()["mappings"] == mapped - 1, f"interrupted {where}"
        if not where:
            break
        landed.append(where)
    assert any("BackendDevice.unmap" in where for where in landed), landed


def _closes_without_error(dom0_xs, driver, guest, dev, fe) -> None:
    """The frontend closes ``dev``: the backend follows to Closed, and
    writes no error node (a failed release is the driver's, not the
    frontend's, and the device goes on closing)."""
    fe.set_state(S.CLOSING)
    fe.wait_backend(S.CLOSING)
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)
    assert error_node(dom0_xs, dev) is None
    assert backend_device(driver, guest.domid).resources == (0, 0)


def test_a_port_unbound_behind_the_device_s_back_does_not_stop_its_release(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """A driver that unbinds a port through the dispatcher, not
    unbind_evtchn(): the release after disconnect() meets KeyError, says
    so, and releases the rest, the device closing as ever."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    (port,) = driver.events.ports
    driver.events.unbind(port)
    _closes_without_error(dom0_xs, driver, guest, dev, fe)
    (unbind,) = [r for r in caplog.records if r.msg == "%s: unbinding port %d failed"]
    assert unbind.args == (bdev.nodename, port)
    fe.close()


def test_a_port_unbound_behind_the_device_s_back_is_a_key_error_to_unbind_evtchn(
        host, driver, frontends) -> None:
    """A driver that unbinds a port through the dispatcher, then through
    unbind_evtchn(), while the driver runs: the KeyError of the second
    says the bug (only a dispatcher that stop() closed, which unbound
    the port, spares it: see
    test_a_port_unbound_as_stop_closes_the_dispatcher_is_unbound_quietly)."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    (port,) = driver.events.ports
    driver.events.unbind(port)
    with pytest.raises(KeyError, match=f"port {port} is not bound here"):
        bdev.unbind_evtchn(port)
    assert bdev.resources == (1, 0)
    fe.close()


def test_a_port_unbound_behind_the_device_s_back_and_bound_again_is_left_alone(
        host, driver, frontends) -> None:
    """As test_a_port_unbound_behind_the_device_s_back_is_a_key_error_to_unbind_evtchn,
    the number bound again meanwhile, on the same dispatcher, by another
    owner: unbind_evtchn() unbound that owner's port, and raised
    nothing.  The KeyError says the driver's bug, and the port stays
    bound to its owner."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    (port,) = driver.events.ports
    driver.events.unbind(port)
    other = driver.events.bind_unbound_port(guest.domid, lambda port: None)
    assert other == port  # the number freed, taken again
    with pytest.raises(KeyError, match=f"port {port} is not bound here with that callback"):
        bdev.unbind_evtchn(port)
    assert driver.events.ports == [other]
    driver.events.unbind(other)
    fe.close()


def test_a_port_unbound_behind_the_device_s_back_is_a_key_error_as_stop_closes(
        host, driver, frontends) -> None:
    """As test_a_port_unbound_behind_the_device_s_back_is_a_key_error_to_unbind_evtchn,
    with stop() between its dropping the devices and its closing the
    dispatcher as unbind_evtchn() reaches the dispatcher: the KeyError
    was taken for the closed dispatcher's, which has not closed yet, and
    the driver's bug hidden.  It is raised, as at any other time."""
    from xenback.events import EventDispatcher

    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    (port,) = driver.events.ports
    driver.events.unbind(port)
    unbinding = PauseAt(EventDispatcher.unbind, "with self._lock")
    closing = PauseAt(xenbus.BackendDriver._stop, "self._events.close()")
    unbinder = Attempt(lambda: unbinding.run(lambda: bdev.unbind_evtchn(port)))
    try:
        assert unbinding.reached.wait(TIMEOUT)
        stopping = Attempt(lambda: closing.run(driver.stop))
        assert closing.reached.wait(TIMEOUT)
    finally:
        unbinding.resume()
    try:
        outcome = unbinder.result()
    finally:
        closing.resume()
    assert stopping.result() is None
    assert isinstance(outcome, KeyError) and f"port {port} is not bound here" in str(outcome)
    assert bdev.gone and bdev.resources == (0, 0)
    fe.close()


def test_a_mapping_that_fails_to_unmap_does_not_stop_the_release(
        host, driver, frontends, dom0_xs, caplog, monkeypatch) -> None:
    """The grant handle refuses an unmap (EIO): said, with its traceback,
    and the device closes as ever, rather than the OSError escaping the
    release into the frontend's Closing, failing the device."""
    guest, dev, fe = connected(host, frontends)
    mapping = backend_device(driver, guest.domid).driver_data
    real = type(mapping).unmap
    monkeypatch.setattr(type(mapping), "unmap", fails_once(
        real, OSError(errno.EIO, "unmap refused"), after=True))
    _closes_without_error(dom0_xs, driver, guest, dev, fe)
    (unmap,) = [r for r in caplog.records if r.msg == "%s: unmapping %s failed"]
    assert unmap.args[1] is mapping and unmap.exc_info is not None  # type: ignore[index]
    fe.close()


def test_an_os_error_without_an_errno_fails_the_device_as_eio(
        host, driver, frontends, dom0_xs) -> None:
    """OSError("text") has no errno: the error node says EIO and the
    exception, as for any other exception, not a number it does not have."""
    def hook(_dev) -> None:
        raise OSError("no errno here")

    driver.connect_hook = hook
    guest, dev, fe = _at_init_wait(host, frontends, "bad")
    fe.publish()
    fe.wait_backend(S.CLOSING)
    assert error_node(dom0_xs, dev) == "5 connecting: OSError: no errno here"


@pytest.mark.parametrize("kind", [ValueError, TypeError])
def test_a_value_or_type_error_fails_the_device_as_einval(
        host, driver, frontends, dom0_xs, kind) -> None:
    """As the module docstring says: EINVAL for a ValueError or a
    TypeError (a driver's wrong argument is as much an invalid value),
    with the exception's text alone."""
    def hook(_dev) -> None:
        raise kind("not what the frontend should have written")

    driver.connect_hook = hook
    guest, dev, fe = _at_init_wait(host, frontends, "bad")
    fe.publish()
    fe.wait_backend(S.CLOSING)
    assert error_node(dom0_xs, dev) == (
        f"{errno.EINVAL} connecting: not what the frontend should have written")


def test_a_removed_device_takes_no_new_resources(host, driver, frontends) -> None:
    """A driver's own work item may try to map or bind after the device was
    dropped: it gets ENODEV and nothing stays mapped or bound."""
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    fe.set_state(S.CLOSED)
    fe.xs.rm(f"{dev.frontend_path}/state")  # Unknown: the device is dropped
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert bdev.gone
    with pytest.raises(OSError) as info:
        bdev.map_grant_refs([fe.pages.refs[0]])
    assert info.value.errno == errno.ENODEV
    with pytest.raises(OSError) as info:
        bdev.bind_evtchn(fe.port, lambda port: None)
    assert info.value.errno == errno.ENODEV
    assert bdev.resources == (0, 0)
    fe.close()
    census.check()


def test_a_mapping_flag_must_be_true_or_false(host, driver, frontends, monkeypatch) -> None:
    """writable="no" is refused by the device itself, before any platform
    (one that read it for its truth would map the frontend's pages
    writable): TypeError naming the argument, nothing mapped."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    resources = bdev.resources
    asked: list[object] = []
    monkeypatch.setattr(driver.gnttab, "map_grant_refs", lambda *a, **kw: asked.append(kw))
    with pytest.raises(TypeError, match="writable must be True or False, not str 'no'"):
        bdev.map_grant_refs([fe.pages.refs[0]], writable="no")
    assert asked == []
    assert bdev.resources == resources


@pytest.mark.parametrize(("refs", "shown"), [(5, "int 5"), ("8", "str '8'"), (b"8", "bytes b'8'"),
                                             ({8}, "set {8}"), (None, "NoneType None")])
def test_refs_must_be_a_sequence_of_grant_references(
        host, driver, frontends, monkeypatch, refs, shown) -> None:
    """map_grant_refs(5) failed in the platform with "'int' object is not
    iterable", naming no argument, and b"8" mapped grant 56: refused by
    the device itself, whatever its platform, naming refs."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    resources = bdev.resources
    asked: list[object] = []
    monkeypatch.setattr(driver.gnttab, "map_grant_refs", lambda *a, **kw: asked.append(a))
    with pytest.raises(TypeError, match=rf"^refs must be a sequence of grant references "
                                        rf"\(ints\), not {re.escape(shown)}$"):
        bdev.map_grant_refs(refs)
    assert asked == []
    assert bdev.resources == resources


def test_resources_taken_while_the_device_is_being_dropped_are_released(
        host, driver, frontends) -> None:
    """A driver's own work item may map and bind after the drop's
    disconnect released everything, until the device is gone: here as
    remove() runs.  What it took is released with the device."""
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    plain_remove = driver.remove

    def remove_racing_a_work_item(d) -> None:
        d.map_grant_refs([fe.pages.refs[0]])
        d.bind_evtchn(fe.port, lambda port: None)
        plain_remove(d)

    driver.remove = remove_racing_a_work_item
    fe.set_state(S.CLOSED)
    fe.xs.rm(f"{dev.frontend_path}/state")  # Unknown: the device is dropped
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert bdev.gone and bdev.resources == (0, 0)
    fe.close()
    census.check()


@pytest.mark.parametrize("what", ["map", "bind"])
def test_a_resource_taken_as_the_device_is_dropped_is_given_back_not_tracked(
        host, driver, frontends, monkeypatch, what) -> None:
    """A driver's work item maps (or binds) while the device is dropped:
    past the look at ``gone`` before the platform call, the drop done by
    the time that call returns.  What it took is given back at once and
    ENODEV raised: tracked by a device already gone, nothing would
    release it."""
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    target = driver.gnttab if what == "map" else driver.events
    name = "map_grant_refs" if what == "map" else "bind_interdomain"
    platform_call = getattr(target, name)

    def dropped_meanwhile(*args, **kwargs):
        taken = platform_call(*args, **kwargs)
        fe.xs.rm(f"{dev.frontend_path}/state")  # Unknown: the device is dropped
        driver.wait_removed(guest.domid)
        assert bdev.gone
        return taken

    spare = fe.frontend.bind_port()  # the connection holds fe.port
    monkeypatch.setattr(target, name, dropped_meanwhile)
    with pytest.raises(OSError) as info:
        if what == "map":
            bdev.map_grant_refs([fe.pages.refs[0]])
        else:
            bdev.bind_evtchn(spare, lambda port: None)
    assert info.value.errno == errno.ENODEV
    assert bdev.resources == (0, 0)
    monkeypatch.undo()
    fe.close()
    census.check()


@pytest.mark.parametrize("what", ["map", "bind"])
def test_a_resource_taken_as_the_driver_stops_is_given_back_and_enodev_raised(
        host, driver, frontends, monkeypatch, caplog, what) -> None:
    """As test_a_resource_taken_as_the_device_is_dropped_is_given_back_not_tracked,
    but stop() drops the device as the platform's call returns, and
    closes the driver's dispatcher and grant handle.  The caller gets
    ENODEV all the same: not the KeyError of an unbind() asked of a
    dispatcher made anew for it (the closed one's close() had unbound
    the port), whose thread nobody would stop, nor the error of an unmap
    that fails (ENOMEM), which is logged."""
    from xenback.platform import GrantError

    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    target = driver.gnttab if what == "map" else driver.events
    name = "map_grant_refs" if what == "map" else "bind_interdomain"
    platform_call = getattr(target, name)

    def stopped_meanwhile(*args, **kwargs):
        taken = platform_call(*args, **kwargs)
        if what == "map":
            real_unmap = taken.unmap

            def unmap() -> None:
                real_unmap()  # the test's host keeps nothing mapped
                raise GrantError(errno.ENOMEM, "unmapping: out of memory")

            taken.unmap = unmap
        driver.stop()
        assert bdev.gone
        return taken

    spare = fe.frontend.bind_port()  # the connection holds fe.port
    monkeypatch.setattr(target, name, stopped_meanwhile)
    threads = set(threading.enumerate())
    with caplog.at_level(logging.WARNING, logger="xenback"):
        with pytest.raises(OSError) as info:
            if what == "map":
                bdev.map_grant_refs([fe.pages.refs[0]])
            else:
                bdev.bind_evtchn(spare, lambda port: None)
    assert info.value.errno == errno.ENODEV
    assert [t.name for t in threading.enumerate() if t not in threads] == []
    assert driver._events is None
    said = [r for r in caplog.records if r.msg == "%s: unmapping %s failed; it is left to "
            "the grant handle's close"]
    assert len(said) == (what == "map")


@pytest.mark.parametrize(("what", "text"), [
    # Right after the look at _gone.
    ("map", "made: list[GrantMapping] = []"),
    ("bind", "def guarded"),
    # Right after the handle is taken, before the platform's call.
    ("map", "made.extend("),
    ("bind", "bound.extend("),
])
def test_a_map_or_bind_that_stop_overtakes_raises_enodev_and_makes_no_handle(
        host, driver, frontends, what, text) -> None:
    """stop() runs whole after a map's (or bind's) look at whether the
    device is gone: ENODEV, as for a map after the drop, whether it had
    asked the driver for the grant handle (or the dispatcher) before,
    which stop() closed (not the EBADF of the closed handle, nor the
    RuntimeError of the closed dispatcher), or does after: no handle
    is made anew for it, which nobody would close (a dispatcher's
    thread running for ever)."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    spare = fe.frontend.bind_port()  # the connection holds fe.port
    if what == "map":
        pause = PauseAt(xenbus.BackendDevice.map_grant_refs, text)
        taking = Attempt(lambda: pause.run(lambda: bdev.map_grant_refs([fe.pages.refs[0]])))
    else:
        pause = PauseAt(xenbus.BackendDevice.bind_evtchn, text)
        taking = Attempt(lambda: pause.run(lambda: bdev.bind_evtchn(spare, lambda port: None)))
    try:
        assert pause.reached.wait(TIMEOUT)
        driver.stop()
        assert bdev.gone
        threads = set(threading.enumerate())
    finally:
        pause.resume()
    outcome = taking.result()
    assert isinstance(outcome, OSError) and outcome.errno == errno.ENODEV, outcome
    assert (driver._events, driver._gnttab) == (None, None)
    assert [t.name for t in threading.enumerate() if t not in threads] == []


@pytest.mark.parametrize("what", ["map", "bind"])
def test_a_resource_taken_as_a_call_returns_into_an_interrupt_is_tracked_or_given_back(
        host, driver, frontends, what) -> None:
    """A Ctrl-C landing as any call of map_grant_refs() (bind_evtchn())
    returns: the mapping (port) is either the device's, released with it,
    or given back.  Landing as the platform's call returned, it was lost
    before the device tracked it: held until the driver's handle closed,
    by nobody."""
    from tests.stolensignal import interrupted_as_call_returns

    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    stat = "mappings" if what == "map" else "ports"
    code = (xenbus.BackendDevice.map_grant_refs if what == "map"
            else xenbus.BackendDevice.bind_evtchn).__code__
    for n in itertools.count():
        # A port of the guest's for each bind: the connection holds fe.port.
        remote = fe.frontend.bind_port() if what == "bind" else 0

        def take(remote: int = remote) -> object:
            if what == "map":
                return bdev.map_grant_refs([fe.pages.refs[0]])
            return bdev.bind_evtchn(remote, lambda port: None)

        mappings, ports = list(bdev._mappings), list(bdev._ports)
        before = host.hypervisor.stats()[stat]
        landed = interrupted_as_call_returns(code, n, take)
        taken = ([m for m in bdev._mappings if m not in mappings] if what == "map"
                 else [p for p in bdev._ports if p not in ports])
        assert host.hypervisor.stats()[stat] == before + len(taken), f"place {n}"
        for resource in taken:
            if what == "map":
                bdev.unmap(resource)  # type: ignore[arg-type]
            else:
                bdev.unbind_evtchn(resource)  # type: ignore[arg-type]
        if not landed:
            break
    assert n > 2


def test_each_bind_and_map_returns_what_it_took_not_one_the_device_held(
        host, driver, frontends) -> None:
    """A device holding mappings and ports already: bind_evtchn() returns
    the port it bound (the one whose events its callback gets), and
    map_grant_refs() the mapping it made (read-only if asked so)."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    fired: queue.Queue[tuple[str, int]] = queue.Queue()
    remotes = {name: fe.frontend.bind_port() for name in ("first", "second")}
    local = {name: bdev.bind_evtchn(remote, functools.partial(lambda n, p: fired.put((n, p)),
                                                               name))
             for name, remote in remotes.items()}
    fe.frontend.evtchn.notify(remotes["second"])
    assert fired.get(timeout=TIMEOUT) == ("second", local["second"])
    first = bdev.map_grant_refs([fe.pages.refs[0]])
    second = bdev.map_grant_refs([fe.pages.refs[0]], writable=False)
    assert (first.buffer.readonly, second.buffer.readonly) == (False, True)


class _Interrupting:
    """A device's lock whose first taking (the hand-over of what a map or
    bind took) is where a Ctrl-C lands, once ``first()`` has run."""

    def __init__(self, lock: Any, first: Callable[[], object] = lambda: None) -> None:
        self.lock, self.first, self.armed = lock, first, True

    def __enter__(self) -> None:
        if not self.armed:
            self.lock.__enter__()
            return
        self.armed = False
        self.first()
        raise KeyboardInterrupt

    def __exit__(self, *exc_info: object) -> None:
        self.lock.__exit__(*exc_info)


@pytest.mark.parametrize("what", ["map", "bind"])
def test_a_give_back_that_fails_after_an_interrupt_raises_the_interrupt(
        host, driver, frontends, monkeypatch, caplog, what) -> None:
    """A Ctrl-C landing once the platform's call returned, and the give-back
    of what it took failing: the driver's dispatcher closed meanwhile (its
    unbind() raising KeyError: its close() unbound the port), or the unmap
    refused (ENOMEM).  The caller gets the Ctrl-C, not that error, which an
    except of its own for it would swallow; a refused unmap is logged, and
    the mapping held for the next release (see
    test_a_mapping_given_back_whose_unmap_is_refused_is_held_for_the_release)."""
    from xenback.platform import GrantError

    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    before = bdev.resources
    if what == "map":
        real_map = driver.gnttab.map_grant_refs

        def map_refusing_unmap(*args: Any, **kwargs: Any) -> Any:
            mapping = real_map(*args, **kwargs)
            real_unmap = mapping.unmap

            def unmap() -> None:
                real_unmap()  # the test's host keeps nothing mapped
                raise GrantError(errno.ENOMEM, "unmapping: out of memory")

            mapping.unmap = unmap
            return mapping

        monkeypatch.setattr(driver.gnttab, "map_grant_refs", map_refusing_unmap)
    lock = bdev._lock
    monkeypatch.setattr(bdev, "_lock", _Interrupting(
        lock, driver.events.close if what == "bind" else lambda: None))
    with caplog.at_level(logging.WARNING, logger="xenback"):
        with pytest.raises(KeyboardInterrupt):
            if what == "map":
                bdev.map_grant_refs([fe.pages.refs[0]])
            else:
                bdev.bind_evtchn(fe.frontend.bind_port(), lambda port: None)
    monkeypatch.setattr(bdev, "_lock", lock)
    if what == "map":
        assert bdev.resources == (before[0] + 1, before[1])  # refused: held
        assert host.hypervisor.stats()["mappings"] == before[0]
        assert "out of memory" in caplog.text
    else:
        assert bdev.resources == before
        assert driver.events.ports == []  # closed


@pytest.mark.parametrize("code", [errno.ENOMEM, errno.ENODEV], ids=["ENOMEM", "ENODEV"])
def test_a_mapping_given_back_whose_unmap_is_refused_is_held_for_the_release(
        host, driver, frontends, monkeypatch, caplog, code: int) -> None:
    """A Ctrl-C landing once the platform's map returned, before the
    device took the mapping, and the give-back's unmap refused (ENOMEM,
    which Linux says may be tried again): the mapping, still mapped,
    becomes the device's, said once, and its next release unmaps it, as
    a release leaves one whose unmap it is refused.  Forgotten, it was
    mapped until the handle closed.  But not for ENODEV, as a release:
    the handle's service went, and the mapping with it."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    maps = bdev.resources[0]
    mapped = host.hypervisor.stats()["mappings"]
    made: list[object] = []
    real_map = driver.gnttab.map_grant_refs

    def map_grant_refs(*args: Any, **kwargs: Any) -> Any:
        made.append(real_map(*args, **kwargs))
        return made[-1]

    calls: list[object] = []
    real_unmap = type(bdev.driver_data).unmap

    def unmap(mapping: Any) -> None:
        calls.append(mapping)
        if mapping in made and calls.count(mapping) == 1:
            raise OSError(code, "unmap refused")
        real_unmap(mapping)

    monkeypatch.setattr(driver.gnttab, "map_grant_refs", map_grant_refs)
    monkeypatch.setattr(type(bdev.driver_data), "unmap", unmap)
    monkeypatch.setattr(bdev, "_lock", _Interrupting(bdev._lock))
    with caplog.at_level(logging.DEBUG, logger="xenback"):
        with pytest.raises(KeyboardInterrupt):
            bdev.map_grant_refs([fe.pages.refs[0]])
        (mapping,) = made
        held = code != errno.ENODEV
        assert bdev.resources[0] == maps + held
        assert host.hypervisor.stats()["mappings"] == mapped + 1  # refused before it unmapped
        bdev.release_resources()
    assert bdev.resources[0] == 0
    # The connection's went too; a forgotten one stays, in the test's host.
    assert host.hypervisor.stats()["mappings"] == mapped - maps + (not held)
    assert calls.count(mapping) == 1 + held
    said = [r for r in caplog.records if r.msg.startswith("%s: unmapping %s failed")]
    assert [r.args[1] for r in said] == [mapping]  # type: ignore[index]


def test_a_stopped_driver_opens_no_handles_for_a_late_work_item(host, driver, frontends) -> None:
    """A driver's work item on a workqueue of its own may still map or bind
    after stop(): it gets ENODEV, and the driver does not open a new event
    dispatcher (a thread) or grant handle that nobody would close."""
    def handles() -> int:
        return host.hypervisor.stats()["connections"]

    before = handles()
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    driver.stop()
    threads = set(threading.enumerate())
    with pytest.raises(OSError) as info:
        bdev.bind_evtchn(fe.port, lambda port: None)
    assert info.value.errno == errno.ENODEV
    with pytest.raises(OSError) as info:
        bdev.map_grant_refs([fe.pages.refs[0]])
    assert info.value.errno == errno.ENODEV
    assert [t.name for t in threading.enumerate() if t not in threads] == []
    # Only the frontend's two handles are left.  The host forgets the ones
    # stop() closed on its service thread, after close() returned: poll.
    deadline = time.monotonic() + TIMEOUT
    while handles() != before + 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert handles() == before + 2


def test_frontend_that_never_appears(host, driver, frontends, dom0_xs) -> None:
    """The backend directory names a frontend path that does not exist."""
    census = Census(host, driver)
    guest = host.create_domain("ghost")
    base = f"/local/domain/0/backend/xbtest/{guest.domid}/0"

    def tx(t):
        t.write(f"{base}/frontend", f"/local/domain/{guest.domid}/device/xbtest/0")
        t.write(f"{base}/frontend-id", guest.domid)
        t.write(f"{base}/online", 1)
        t.write(f"{base}/state", 1)

    dom0_xs.transaction(tx)
    dom0_xs.wait_for(f"{base}/state", "5", timeout=TIMEOUT)
    relative = base[len("/local/domain/0/"):]
    error = dom0_xs.read(f"/local/domain/0/error/{relative}/error")
    assert error == (
        f"{errno.ENOENT} probing: frontend does not exist: "
        f"/local/domain/{guest.domid}/device/xbtest/0"
    )  # the error names the node, as the OSError did
    assert driver.calls_of(guest.domid) == []  # the driver was never bothered

    # The toolstack gives up on it: online=0 + Closing; we go Closed at once.
    dom0_xs.transaction(lambda t: (t.write(f"{base}/online", 0), t.write(f"{base}/state", 5)))
    dom0_xs.wait_for(f"{base}/state", "6", timeout=TIMEOUT)
    driver.wait(lambda: driver.devices() == [])
    # Nor for its removal: remove() undoes probe(), which never ran.
    assert driver.calls_of(guest.domid) == []
    census.check()
    # And the backend still serves other devices.
    connected(host, frontends, "other")


@pytest.mark.parametrize("lie", ["frontend-id", "relative frontend"])
def test_frontend_id_that_does_not_match_the_path(host, driver, frontends, dom0_xs, lie) -> None:
    """``frontend-id`` must name the domain the device directory is filed
    under: a backend must not map grants of one domain for another.  And
    ``frontend`` must be absolute: a relative one would be looked up in
    the backend's own home."""
    census = Census(host, driver)
    guest = host.create_domain("liar")
    base = f"/local/domain/0/backend/xbtest/{guest.domid}/0"
    frontend = f"/local/domain/{guest.domid}/device/xbtest/0"

    def tx(t):
        t.write(f"{frontend}/state", 1)
        if lie == "frontend-id":
            t.write(f"{base}/frontend", frontend)
            t.write(f"{base}/frontend-id", guest.domid + 1)
        else:
            t.write(f"{base}/frontend", frontend.lstrip("/"))
            t.write(f"{base}/frontend-id", guest.domid)
        t.write(f"{base}/online", 1)
        t.write(f"{base}/state", 1)

    dom0_xs.transaction(tx)
    dom0_xs.wait_for(f"{base}/state", "5", timeout=TIMEOUT)
    relative = base[len("/local/domain/0/"):]
    error = dom0_xs.read(f"/local/domain/0/error/{relative}/error")
    assert error is not None and error.startswith(f"{errno.EINVAL} probing: ")
    assert "does not match" in error
    assert driver.calls_of(guest.domid) == []
    census.check()
    connected(host, frontends, "other")


@pytest.mark.parametrize(
    "nodes, err, text",
    [
        ({"ring-ref": "banana", "port": "3"}, errno.EINVAL, "expected an integer"),
        ({"ring-ref": "1", "port": "3 4; rm -rf /"}, errno.EINVAL, "expected an integer"),
        ({"port": "3"}, errno.ENOENT, "did not publish"),
        ({"ring-ref": "4000", "port": "1"}, None, "connecting"),  # a grant never made
        ({"ring-ref": "-1", "port": "1"}, None, "connecting"),
        ({"ring-ref": str(2**64), "port": "1"}, None, "connecting"),
    ],
    ids=["garbage-ring-ref", "garbage-port", "missing-ring-ref", "grant-never-made",
         "negative-ring-ref", "huge-ring-ref"],
)
def test_frontend_garbage_fails_the_device_only(
        host, driver, frontends, dom0_xs, nodes, err, text) -> None:
    census = Census(host, driver)
    guest, dev, fe = _at_init_wait(host, frontends, "bad")
    fe.publish(nodes)
    fe.wait_backend(S.CLOSING)
    error = error_node(dom0_xs, dev)
    assert error is not None and text in error, error
    code = int(error.split()[0])
    assert code > 0 and (err is None or code == err)
    bdev = backend_device(driver, guest.domid)
    assert bdev.resources == (0, 0)
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect"]
    # A Connected written now is ignored: the frontend must close first.
    fe.set_state(S.CONNECTED)
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)
    assert driver.calls_of(guest.domid).count("connect") == 1
    fe.close()
    census.check()
    connected(host, frontends, "good")


def test_bad_event_channel_releases_the_grant_already_mapped(
        host, driver, frontends, dom0_xs) -> None:
    census = Census(host, driver)
    guest, dev, fe = _at_init_wait(host, frontends, "bad")
    fe.share()
    fe.publish({"ring-ref": fe.pages.refs[0], "port": fe.port + 100})
    fe.wait_backend(S.CLOSING)
    assert backend_device(driver, guest.domid).resources == (0, 0)
    error = error_node(dom0_xs, dev)
    assert error is not None and error.startswith(f"{errno.EINVAL} connecting: ")
    # The page is no longer mapped by anyone: once the guest ends access,
    # its grant entry is gone.
    fe.close()
    census.check()
    connected(host, frontends, "good")


def test_frontend_state_vanishing_drops_the_device(host, driver, frontends, dom0_xs) -> None:
    """A missing frontend ``state`` reads as Unknown: Closed, then dropped."""
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    state = f"{dev.frontend_path}/state"
    assert _watches_on(host, state) == 1
    fe.xs.rm(state)
    fe.wait_backend(S.CLOSED)
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert bdev.gone and driver.devices() == []
    # Nor does it watch the frontend any more: a driver domain has 128 watches.
    assert _watches_on(host, state) == 0
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]
    assert error_node(dom0_xs, dev) is None
    fe.close()
    census.check()
    connected(host, frontends, "next")


def test_state_is_written_only_when_it_changes(host, driver, frontends, dom0_xs) -> None:
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    writes: list[str] = []
    seen = threading.Event()

    def count(path: str) -> None:
        writes.append(path)
        seen.set()

    dom0_xs.watch(f"{dev.backend_path}/state", count)
    assert seen.wait(TIMEOUT)  # the first event of every new watch
    assert bdev.switch_state(S.CONNECTED) is False
    assert bdev.switch_state(S.CLOSING) is True
    # XenStore sends one connection's watch events in order: once an event
    # for a later write arrived, the state watch has seen all it will.
    synced = threading.Event()
    dom0_xs.watch("/sync", lambda path: synced.set() if path == "/sync/done" else None)
    dom0_xs.write("/sync/done", 1)
    assert synced.wait(TIMEOUT)
    # The unchanged state fired no watch: the first event and one change.
    assert writes == [f"{dev.backend_path}/state"] * 2


def test_a_blocked_device_holds_up_only_itself(host, driver, frontends) -> None:
    """Each device's callbacks run in order on its own queue; one device
    stuck in connect() does not delay another."""
    entered, release = threading.Event(), threading.Event()
    slow = host.create_domain("slow")

    def hook(dev) -> None:
        if dev.frontend_id == slow.domid:
            entered.set()
            release.wait(TIMEOUT)

    driver.connect_hook = hook
    dev = host.toolstack.add_device("xbtest", slow.domid)
    fe = frontends(slow, dev)
    fe.wait_backend(S.INIT_WAIT)
    fe.publish()
    assert entered.wait(TIMEOUT)
    # Events for the stuck device pile up behind its connect, in order.
    fe.set_state(S.CLOSING)
    fe.set_state(S.CLOSED)
    # Meanwhile another device goes all the way through.
    fast, _, fast_fe = connected(host, frontends, "fast")
    fast_fe.set_state(S.CLOSED)
    fast_fe.wait_backend(S.CLOSED)
    assert driver.calls_of(slow.domid) == ["probe", "connect"]
    release.set()
    fe.wait_backend(S.CLOSED)
    driver.wait(lambda: driver.calls_of(slow.domid)[-1:] == ["disconnect"])
    assert driver.calls_of(slow.domid) == ["probe", "connect", "disconnect"]
    assert driver.calls_of(fast.domid) == ["probe", "connect", "disconnect"]


def test_backend_events_go_straight_to_their_device(host, driver, frontends, dom0_xs) -> None:
    """An event under a known device's directory is queued on that
    device's queue by the watch thread, in arrival order with its
    frontend's events; it does not wait behind discovery (the bus queue)."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    in_bus, release = threading.Event(), threading.Event()
    driver._bus.call(lambda: (in_bus.set(), release.wait(TIMEOUT)))
    try:
        assert in_bus.wait(TIMEOUT)
        dom0_xs.rm(dev.backend_path)  # handled while discovery is stuck
        driver.wait_call("remove", guest.domid)
        bdev.events.flush()
        assert bdev.gone and driver.devices() == []
    finally:
        release.set()


@pytest.mark.parametrize("value", ["7", "banana", "2"])
def test_impossible_frontend_state_is_fatal(host, driver, frontends, dom0_xs, value) -> None:
    census = Census(host, driver)
    guest, dev, fe = _at_init_wait(host, frontends, "odd")
    fe.set_state(value)
    fe.wait_backend(S.CLOSING)
    assert error_node(dom0_xs, dev).startswith(f"{errno.EINVAL} ")
    fe.close()
    census.check()
    connected(host, frontends, "good")


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info and r.levelno >= logging.WARNING]


def _failed_without_tracebacks(caplog: pytest.LogCaptureFixture, driver: BackendDriver,
                               fe_id: int) -> list[str]:
    """_no_tracebacks() once the device's queue is through with its failure:
    fatal() logs the error line after writing Closing, which the frontend
    may have seen first."""
    backend_device(driver, fe_id).events.flush()
    return _no_tracebacks(caplog)


@pytest.mark.parametrize(
    "nodes, text",
    [
        ({"state": b"\xff"}, r"22 frontend invalid xenbus state '\ufffd'"),
        ({"state": "\u00e9".encode()}, r"22 frontend invalid xenbus state '\xe9'"),
        ({"ring-ref": b"\xff", "state": b"3"},
         r"22 connecting: /local/domain/{fe}/device/xbtest/0/ring-ref: "
         r"expected an integer, found '\ufffd'"),
    ],
    ids=["state-xff", "state-utf8", "ring-ref-xff"],
)
def test_non_ascii_from_the_frontend_is_reported_and_fatal(
    host, driver, frontends, dom0_xs, caplog, nodes, text
) -> None:
    # XenStore takes any bytes; the error node, written through pyxs, only
    # printable ASCII.  Quoting the frontend's bytes must not keep the
    # device from reporting the error and going Closing.
    guest, dev, fe = _at_init_wait(host, frontends, "odd")
    fe.share()
    with RawClient(guest.xenstore_path) as raw:  # the guest's own connection
        raw.write(f"{dev.frontend_path}/port", str(fe.port))
        for key, value in nodes.items():
            raw.write(f"{dev.frontend_path}/{key}", value)
    fe.wait_backend(S.CLOSING)
    assert error_node(dom0_xs, dev) == text.format(fe=guest.domid)
    assert _failed_without_tracebacks(caplog, driver, guest.domid) == []


def test_error_message_is_escaped_for_the_error_node(
        host, driver, frontends, dom0_xs, caplog) -> None:
    def hook(_dev) -> None:
        raise ValueError("caf\u00e9\nor\ttea")

    driver.connect_hook = hook
    guest, dev, fe = _at_init_wait(host, frontends, "bad")
    fe.publish()
    fe.wait_backend(S.CLOSING)
    assert error_node(dom0_xs, dev) == r"22 connecting: caf\xe9\nor\ttea"
    assert _failed_without_tracebacks(caplog, driver, guest.domid) == []


def test_an_errno_given_negative_as_in_the_kernel_is_written_positive(
        host, driver, frontends, dom0_xs) -> None:
    """Kernel drivers pass -ENOMEM to xenbus_dev_error(), which writes the
    positive number: a driver ported from one may do the same here."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    bdev.error(-errno.ENOMEM, "no memory")
    assert error_node(dom0_xs, dev) == "12 no memory"
    bdev.queue(bdev.fatal, -errno.EIO, "broken")
    fe.wait_backend(S.CLOSING)
    assert error_node(dom0_xs, dev) == "5 broken"


def test_a_long_error_message_is_cut_to_what_the_error_node_holds(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """XenStore takes at most 4096 bytes a value: a driver's message (that
    may quote what the frontend wrote) past that would have its error node
    refused.  The line is cut to 1024 characters, and written."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    assert bdev.error(errno.EINVAL, "x" * 5000) is True
    assert error_node(dom0_xs, dev) == ("22 " + "x" * 5000)[:1024]
    bdev.queue(bdev.fatal, errno.EIO, "y" * 5000)
    fe.wait_backend(S.CLOSING)
    assert error_node(dom0_xs, dev) == ("5 " + "y" * 5000)[:1024]
    assert not [r for r in caplog.records if "could not write" in r.getMessage()]


def test_a_long_error_message_is_logged_cut_as_the_error_node_holds_it(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """The log line quotes the message as the error node holds it: escaped,
    then cut to the node's 1024 characters.  A driver's message may quote
    whatever the frontend wrote; logged whole, a guest wrote megabytes of
    it into the host's log per failure.  So is the line of a failure not
    reported there, the directory deleted meanwhile."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    assert bdev.error(errno.EINVAL, "\x1b" * 5000) is True
    line = error_node(dom0_xs, dev)
    assert line == "22 " + r"\x1b" * 255  # whole escapes: see the next test
    logged = [r.getMessage() for r in caplog.records if "error 22" in r.getMessage()]
    assert logged == [f"{bdev.nodename}: error 22: {line[3:]}"]
    dom0_xs.rm(dev.backend_path)
    driver.wait_call("remove", guest.domid)
    assert bdev.error(errno.EINVAL, "\x1b" * 5000) is False
    said = [r.getMessage() for r in caplog.records if "not reported there" in r.getMessage()]
    assert said == [f"{bdev.nodename}: {line[3:]} (errno 22), and the device directory was "
                    "deleted: not reported there"]


def test_a_driver_s_long_failure_not_reported_there_is_logged_cut_as_the_node_would_hold_it(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """A driver's hook failing with a long message (quoting what the
    frontend wrote, say) once the device directory is gone: the line
    that says the failure is not reported there quotes it escaped and
    cut as its error node would have held it, not whole."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest, dev, fe = _at_init_wait(host, frontends, "bad")

    def hook(_dev: Any) -> None:
        dom0_xs.rm(dev.backend_path)
        raise ValueError("\x1b" * 5000)

    driver.connect_hook = hook
    fe.publish()

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if "not reported there" in r.getMessage()]

    driver.wait(lambda: bool(said()))
    bdev = f"{driver.backend_root}/{guest.domid}/0"
    escape = r"\x1b"
    quoted = escape * ((1024 - len("22 connecting: ")) // len(escape))
    assert said() == [f"{bdev}: connecting: {quoted} (errno 22), and the device directory "
                      "was deleted: not reported there"]


@pytest.mark.parametrize("char", ["\n", "\x1b", "\u00e9", "\u2028", "\U0001f600"])
def test_a_long_error_message_is_cut_before_an_escape_that_does_not_fit_whole(
        host, driver, frontends, dom0_xs, caplog, char) -> None:
    """The error line ends on a whole character of the message: an escape
    that would reach past 1024 characters goes whole.  Cut in half, its
    start (a backslash, "\\u20") read as text the message never held."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    escaped = ascii(char)[1:-1]
    for kept in range(len(escaped)):
        before = "x" * (1021 - kept)
        assert bdev.error(errno.EINVAL, before + char + "y") is True
        assert error_node(dom0_xs, dev) == "22 " + before, kept
        logged = [r.getMessage() for r in caplog.records if "error 22" in r.getMessage()]
        assert logged[-1] == f"{bdev.nodename}: error 22: {before}", kept
    before = "x" * (1021 - len(escaped))
    assert bdev.error(errno.EINVAL, before + char + "y") is True
    assert error_node(dom0_xs, dev) == "22 " + before + escaped


def test_device_directory_deleted_under_the_backend(host, driver, frontends, dom0_xs,
                                                   caplog) -> None:
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    dom0_xs.rm(dev.backend_path)
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert driver.devices() == [] and bdev.resources == (0, 0)
    assert f"{bdev.nodename}: the device directory was deleted" in [
        r.getMessage() for r in caplog.records]
    # Nothing was written into the deleted directory (no resurrection),
    # and nothing can be.
    assert not dom0_xs.exists(dev.backend_path)
    with pytest.raises(FileNotFoundError, match="device directory was deleted"):
        bdev.write("feature-late", 1)
    assert bdev.switch_state(S.CONNECTED) is False
    assert not dom0_xs.exists(dev.backend_path)
    fe.set_state(S.CLOSED)
    fe.close()
    census.check()
    connected(host, frontends, "next")
    assert not dom0_xs.exists(dev.backend_path)


def test_a_frontend_domains_backend_directory_deleted_drops_its_devices(
        host, driver, frontends, dom0_xs) -> None:
    """libxl prunes ``backend/<type>/<domid>`` with a domain's last device:
    then the one event names that directory, not the device's."""
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    dom0_xs.rm(dev.backend_path.rsplit("/", 1)[0])
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert driver.devices() == [] and bdev.resources == (0, 0)
    assert not dom0_xs.exists(dev.backend_path)  # no resurrection
    fe.set_state(S.CLOSED)
    fe.close()
    census.check()


def test_a_rescan_leaves_devices_that_were_dropped_alone(host, driver, frontends, dom0_xs) -> None:
    """Only the first listing of the backend directory takes over devices
    in any state: a later one (another frontend domain's directory
    pruned) must not pick up again a device dropped and left Closed for
    the toolstack to delete."""
    g1, dev1, fe1 = connected(host, frontends, "closed")
    dom0_xs.write(f"{dev1.backend_path}/online", 0)
    fe1.set_state(S.CLOSED)
    fe1.wait_backend(S.CLOSED)
    driver.wait_removed(g1.domid)  # forgotten before the listing, or it proves nothing
    g2, dev2, fe2 = connected(host, frontends, "pruned")
    dom0_xs.rm(dev2.backend_path.rsplit("/", 1)[0])  # the whole directory is listed again
    driver.wait_removed(g2.domid)
    assert driver.devices() == []
    assert driver.calls_of(g1.domid) == ["probe", "connect", "disconnect", "remove"]
    assert dom0_xs.read(f"{dev1.backend_path}/state") == str(int(S.CLOSED))


@pytest.mark.parametrize("noticed", ["frontend gone", "backend re-created"])
def test_a_device_re_created_at_the_same_path_is_served(
        host, driver, frontends, dom0_xs, noticed: str) -> None:
    # The toolstack removes a device and adds it again at the same path
    # while the backend still knows the old one: the old one must neither
    # write into the new directory nor keep the new device from its probe.
    guest, dev, fe = connected(host, frontends)
    old = backend_device(driver, guest.domid)
    stalled, go = threading.Event(), threading.Event()

    def stall(bdev: Any) -> None:
        if bdev is old and not stalled.is_set():
            stalled.set()
            assert go.wait(TIMEOUT)

    if noticed == "frontend gone":
        # The old device drops itself, and stalls before writing Closed.
        driver.disconnect_hook = stall
        dom0_xs.rm(dev.frontend_path)
        assert stalled.wait(TIMEOUT)
    else:
        # The old device is busy; its events wait in its queue.
        old.queue(stall, old)
        assert stalled.wait(TIMEOUT)
    fe.close()
    dom0_xs.rm(dev.backend_path)
    dom0_xs.rm(dev.frontend_path)
    again = host.toolstack.add_device("xbtest", guest.domid)
    assert again.backend_path == dev.backend_path
    # Not even from a work item of its driver's, while it is not gone yet.
    with pytest.raises(FileNotFoundError, match="device directory was deleted"):
        old.write("feature-late", 1)
    assert dom0_xs.read(f"{again.backend_path}/feature-late") is None
    go.set()
    fe = _connect(frontends, guest, again)
    assert backend_device(driver, guest.domid) is not old and old.gone
    assert driver.calls_of(guest.domid).count("probe") == 2


def _first_probe_held(host, driver, then=lambda _dev: None):
    """A device whose first probe() (RecordingDriver's, after it wrote
    feature-test) is held until the returned Event is set, then runs
    ``then(dev)``: ``(guest, the toolstack device, that Event)``."""
    entered, release = threading.Event(), threading.Event()

    def hold(dev) -> None:
        if not entered.is_set():
            entered.set()
            assert release.wait(TIMEOUT)
            then(dev)

    driver.probe_hook = hold
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    assert entered.wait(TIMEOUT)
    return guest, dev, release


def _probe_across_re_creation(host, driver, then):
    """Block the first probe() (after it wrote feature-test), have the
    toolstack delete the device and make it again at the same path (one
    transaction, as libxl's re-add), then run ``then(dev)`` in that probe:
    ``(guest, the new toolstack device)``."""
    guest, dev, release = _first_probe_held(host, driver, then)
    again = host.toolstack.add_device("xbtest", guest.domid, replace=True)
    assert again.backend_path == dev.backend_path
    release.set()
    return guest, again


def test_a_device_re_created_while_probe_runs_gets_its_features(
        host, driver, frontends, dom0_xs) -> None:
    """The toolstack removes and re-adds a device at the same path while
    probe() runs, after probe() wrote its features: they went with the
    old directory.  InitWait in the new one would tell the frontend to
    read features that are not there; the new device must be probed."""
    guest, again = _probe_across_re_creation(host, driver, lambda _dev: None)
    fe = _connect(frontends, guest, again)
    assert dom0_xs.read(f"{again.backend_path}/feature-test") == "1"
    assert driver.calls_of(guest.domid) == ["probe", "remove", "probe", "connect"]
    assert error_node(dom0_xs, again) is None
    # The old device, dropped, set no watch on the frontend: the new one's alone.
    assert _watches_on(host, f"{again.frontend_path}/state") == 1
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)


def test_a_probe_failing_after_the_device_was_re_created_leaves_the_new_one_alone(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """probe() fails once the toolstack deleted its device and made a new
    one at the same path: the failure is the old device's.  Its error
    node and Closing, written there, would greet the new device, which
    its frontend would then see fail before it was even probed; the new
    device must be probed afresh, and the old failure only logged."""

    def fail(_dev) -> None:
        raise RuntimeError("the old device's failure")

    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest, again = _probe_across_re_creation(host, driver, fail)
    fe = _connect(frontends, guest, again)
    assert driver.calls_of(guest.domid) == ["probe", "remove", "probe", "connect"]
    assert error_node(dom0_xs, again) is None
    said = [r for r in caplog.records if "the old device's failure" in r.getMessage()]
    # Not as a failure of the device, which a log watcher would count
    # against the new one.
    assert [r.levelno for r in said] == [logging.INFO]
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)


@pytest.mark.parametrize("found", [
    "frontend gone", "frontend node missing", "frontend-id not ours"])
def test_a_failed_look_at_the_frontend_re_created_in_its_moment_is_not_reported_there(
        host, driver, frontends, dom0_xs, caplog, monkeypatch, found: str) -> None:
    """The reads before probe() (our frontend and frontend-id nodes, the
    frontend's directory) fail, and the toolstack deletes the device and
    makes it again at the same path before the failure is written: a
    forced removal and an add (libxl's, both directories in one
    transaction each) in the microseconds between the two.  probe() wrote
    nothing to tell the directories apart by, but the new one no longer
    fails as the reads did: the failure is the old device's, only logged,
    and the new device is probed and served.  Its frontend must not
    start with an error node and Closing it did nothing to earn."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest = host.create_domain("guest")
    devices: list[Any] = []
    watched = f"/local/domain/{guest.domid}/device/xbtest/0"
    plain_exists = driver.xenstore.exists
    first_added = threading.Event()

    def exists(path: str) -> bool:
        if path != watched or found != "frontend gone" or len(devices) > 1:
            return plain_exists(path)
        # The driver can look before add_device() has returned the device
        # whose commit it saw.
        assert first_added.wait(TIMEOUT)
        host.toolstack.destroy_device(devices[0])
        seen = plain_exists(path)
        devices.append(host.toolstack.add_device("xbtest", guest.domid))
        return seen

    monkeypatch.setattr(driver.xenstore, "exists", exists)
    if found == "frontend gone":
        devices.append(host.toolstack.add_device("xbtest", guest.domid))
        first_added.set()
    else:
        # A directory made by hand without its frontend node (the look
        # fails on its first read, ENOENT), or with a frontend-id another
        # domain's (on its second, EINVAL), and the toolstack makes the
        # device again, whole, then.
        base = f"{driver.backend_root}/{guest.domid}/0"
        plain_read = driver.xenstore.read
        node = "frontend" if found == "frontend node missing" else "frontend-id"

        def read(path: str, *args: Any) -> Any:
            value = plain_read(path, *args)
            if path == f"{base}/{node}" and not devices:
                devices.append(None)
                dom0_xs.rm(base)
                devices.append(host.toolstack.add_device("xbtest", guest.domid))
            return value

        def make(t: Transaction) -> None:
            if found == "frontend-id not ours":
                t.write(f"{base}/frontend", watched)
                t.write(f"{base}/frontend-id", guest.domid + 1)
            else:
                t.write(f"{base}/frontend-id", guest.domid)
            t.write(f"{base}/online", 1)
            t.write(f"{base}/state", 1)

        monkeypatch.setattr(driver.xenstore, "read", read)
        dom0_xs.transaction(make)
    driver.wait(lambda: len(devices) == 2)
    again = devices[1]
    fe = _connect(frontends, guest, again)
    assert error_node(dom0_xs, again) is None
    assert driver.calls_of(guest.domid) == ["probe", "connect"]
    said = [r for r in caplog.records if "not reported there" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)


def test_a_failed_look_at_the_frontend_that_the_new_directory_fails_too_is_reported(
        host, driver, dom0_xs, monkeypatch) -> None:
    """As above, but the directory made again lacks its frontend node as
    the first did: the look fails the same way in the transaction that
    writes the failure, and the directory is taken as the device's (the
    two cannot be told apart).  What is written is what the new device's
    own probe would write: its error node and Closing, once."""
    guest = host.create_domain("guest")
    base = f"{driver.backend_root}/{guest.domid}/0"

    def make(t: Transaction) -> None:
        t.write(f"{base}/frontend-id", guest.domid)
        t.write(f"{base}/online", 1)
        t.write(f"{base}/state", 1)

    plain_read = driver.xenstore.read
    made: list[bool] = []

    def read(path: str, *args: Any) -> Any:
        value = plain_read(path, *args)
        if path == f"{base}/frontend" and not made:
            made.append(True)
            dom0_xs.rm(base)
            dom0_xs.transaction(make)
        return value

    monkeypatch.setattr(driver.xenstore, "read", read)
    dom0_xs.transaction(make)
    dom0_xs.wait_for(f"{base}/state", str(int(S.CLOSING)), timeout=TIMEOUT)
    relative = base[len("/local/domain/0/"):]
    assert dom0_xs.read(f"/local/domain/0/error/{relative}/error") == (
        f"{errno.ENOENT} probing: reading other end details: {base}")
    assert made == [True]
    assert driver.calls_of(guest.domid) == []


def test_a_failed_look_at_the_frontend_that_the_new_directory_fails_otherwise_is_not_its(
        host, driver, dom0_xs, caplog, monkeypatch) -> None:
    """As above, but the directory made again (whole, by the toolstack)
    fails the look otherwise: its frontend's directory is gone (the
    guest's doing, say), the same errno as the old one's missing
    frontend node, with another message.  The failure is the old
    device's, only logged; the new device is probed and fails on its
    own, and its error node says its own failure, not the old one's."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest = host.create_domain("guest")
    base = f"{driver.backend_root}/{guest.domid}/0"
    plain_read = driver.xenstore.read
    devices: list[Any] = []

    def read(path: str, *args: Any) -> Any:
        value = plain_read(path, *args)
        if path == f"{base}/frontend" and not devices:
            assert value is None
            dom0_xs.rm(base)
            devices.append(host.toolstack.add_device("xbtest", guest.domid))
            dom0_xs.rm(devices[0].frontend_path)
        return value

    monkeypatch.setattr(driver.xenstore, "read", read)
    dom0_xs.transaction(lambda t: (t.write(f"{base}/frontend-id", guest.domid),
                                   t.write(f"{base}/online", 1),
                                   t.write(f"{base}/state", 1)))
    dom0_xs.wait_for(f"{base}/state", str(int(S.CLOSING)), timeout=TIMEOUT)
    (device,) = devices
    assert error_node(dom0_xs, device) == (
        f"{errno.ENOENT} probing: frontend does not exist: {device.frontend_path}")
    said = [r for r in caplog.records if "not reported there" in r.getMessage()]
    assert [r.getMessage().split(": ", 2)[1:] for r in said] == [
        ["probing", f"reading other end details: {base} (errno {errno.ENOENT}), and the look "
         "at the frontend fails otherwise now (its nodes changed since, or the device "
         "directory was made again for a new device): not reported there"]]
    assert driver.calls_of(guest.domid) == []


def test_a_failed_look_at_the_frontend_made_again_in_a_conflicting_transaction_is_reported(
        host, driver, dom0_xs, monkeypatch) -> None:
    """The look before probe() fails, and its look again, in the
    transaction that writes the failure, meets an EAGAIN (a request
    inside a transaction may, and the transaction is then run anew).
    That is no answer of the look's: the transaction runs again, the
    look fails as before, and the failure is written, once, with
    Closing.  Taken for a look that fails otherwise, the device would
    be dropped, and the drop's own look, failing alike, would write
    Closed over a failure nobody was told of."""
    guest = host.create_domain("guest")
    watched = f"/local/domain/{guest.domid}/device/xbtest/0"
    plain_exists = driver.xenstore.exists
    tx_exists = Transaction.exists
    conflicts: list[str] = []

    def exists(path: str) -> bool:
        if path == watched:
            driver.xenstore.rm(watched)  # the guest's doing, say
        return plain_exists(path)

    def exists_in_tx(t: Transaction, path: str) -> bool:
        if path == watched and not conflicts:
            conflicts.append(path)
            raise BlockingIOError(errno.EAGAIN, "conflict under us")
        return tx_exists(t, path)

    monkeypatch.setattr(driver.xenstore, "exists", exists)
    monkeypatch.setattr(Transaction, "exists", exists_in_tx)
    device = host.toolstack.add_device("xbtest", guest.domid)
    ended = (str(int(S.CLOSING)), str(int(S.CLOSED)))
    state = dom0_xs.wait_for(f"{device.backend_path}/state", lambda v: v in ended,
                             timeout=TIMEOUT)
    assert state == str(int(S.CLOSING))
    assert conflicts == [watched]
    assert error_node(dom0_xs, device) == (
        f"{errno.ENOENT} probing: frontend does not exist: {watched}")
    assert driver.calls_of(guest.domid) == []


_FAILED_ON_LOSS = "%s backend: a callback failed as %s"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failed_look_at_the_frontend_whose_look_again_loses_xenstore_is_no_re_creation(
        caplog, monkeypatch) -> None:
    """The look before probe() fails (the frontend's directory is gone),
    and XenStore ends our connection as the look is made again to tell
    whose the directory is.  That is XenStore's error, not the look's
    answer: it goes to the callback's handler, which leaves the loss to
    its one warning, as for every other read deciding whose the
    directory is (see _fatal_or_drop).  Taken for a look that fails
    otherwise, it would say the directory was made again for a new
    device, which nobody did."""
    caplog.set_level(logging.DEBUG, logger="xenback.xenbus")
    before = {t.ident for t in threading.enumerate()}
    host = SimHost()
    host.start()
    drv = RecordingDriver(host.dom0)
    drv.start()
    looks: list[str] = []
    try:
        guest = host.create_domain("guest")
        watched = f"/local/domain/{guest.domid}/device/xbtest/0"
        plain_exists = drv.xenstore.exists

        def exists(path: str) -> bool:
            if path != watched:
                return plain_exists(path)
            looks.append(path)
            if len(looks) == 1:
                drv.xenstore.rm(watched)  # the guest's doing, say
            else:
                host.close()
                assert drv.xenstore.connection_lost.wait(TIMEOUT)
            return plain_exists(path)

        monkeypatch.setattr(drv.xenstore, "exists", exists)
        host.toolstack.add_device("xbtest", guest.domid)
        # The probe's callback has ended: failed on the loss, or (what
        # must not be) dropped the device.
        assert eventually(lambda: any(
            r.msg in (_FAILED_ON_LOSS, "%s: removed") for r in caplog.records))
        assert len(looks) == 2
        assert not [r for r in caplog.records if "not reported there" in r.getMessage()]
        # on_lost's warning: XenStore calls it after setting connection_lost,
        # which the look waited for, maybe after the callback's end.
        assert eventually(lambda: bool(_backend_warnings(caplog)))
        said = _backend_warnings(caplog)
        assert [r.getMessage().split(":")[0] for r in said] == ["XenStore connection lost"], said
    finally:
        host.close()
        drv.stop()
    assert drv.calls_of(guest.domid) == []
    assert not leaked_threads(before)


def test_a_failed_look_at_the_frontend_whose_look_again_meets_our_domain_going_is_no_re_creation(
        host, dom0_xs, frontends, caplog, monkeypatch) -> None:
    """As above, but it is our own domain that goes (a driver domain
    whose home libxl deletes) as the look is made again: the EACCES its
    read of our ``frontend`` gets is no answer of the look's either, but
    our domain going, said once for all, and the device dropped with
    every other one, writing nothing.  Taken for a look that fails
    otherwise, it was said as the directory made again for a new device
    (or the frontend's nodes changed), which nobody did."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    drvdom, drv, (fe,) = _driver_domain_backend(host, dom0_xs, frontends, ("one",), (0,))
    try:
        guest = fe.guest
        home = f"/local/domain/{drvdom.domid}"
        frontend = f"{drv.backend_root}/{guest.domid}/1/frontend"
        plain_read = drv.xenstore.read
        looks: list[str] = []

        def read(path: str, *args: Any) -> Any:
            if path == frontend:
                looks.append(path)
                if len(looks) == 1:
                    dom0_xs.rm(path)  # the look fails: no frontend named
                else:
                    dom0_xs.rm(home)  # our domain goes
            return plain_read(path, *args)

        monkeypatch.setattr(drv.xenstore, "read", read)
        caplog.clear()
        host.toolstack.add_device("xbtest", guest.domid, devid=1, backend_id=drvdom.domid)
        drv.wait(lambda: drv.devices() == [])
        drv._bus.flush()
        assert len(looks) == 2
        assert not [r for r in caplog.records if "not reported there" in r.getMessage()
                    or "the look at the frontend" in r.getMessage()]
        assert _going_said(caplog) == []
        assert drv.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]
    finally:
        drv.stop()


def test_a_probe_failing_after_the_device_was_re_created_and_removed_lets_the_toolstack_go(
        host, driver, dom0_xs) -> None:
    """As above, but the toolstack also asked for the new device's
    removal (online=0, Closing) before the probe failed: the old device
    is dropped without the look at a removal that a failed probe makes,
    so the drop's look at the path must answer it, or libxl waits its
    whole timeout for a device nobody serves."""
    entered, release = threading.Event(), threading.Event()

    def hold_then_fail(_dev) -> None:
        entered.set()
        assert release.wait(TIMEOUT)
        raise RuntimeError("the old device's failure")

    driver.probe_hook = hold_then_fail
    guest = host.create_domain("guest")
    host.toolstack.add_device("xbtest", guest.domid)
    assert entered.wait(TIMEOUT)
    again = host.toolstack.add_device("xbtest", guest.domid, replace=True)
    remover, closed = _remove_in_background(host, again, destroy=False)
    dom0_xs.wait_for(f"{again.backend_path}/state", str(int(S.CLOSING)), timeout=TIMEOUT)
    release.set()
    remover.join(2 * TIMEOUT)
    assert closed == [True]
    driver.wait(lambda: driver.devices() == [])
    assert driver.calls_of(guest.domid) == ["probe", "remove"]


def test_fatal_re_created_before_its_closing_leaves_the_new_device_nothing(
        host, driver, frontends, dom0_xs, caplog, monkeypatch) -> None:
    """fatal() on a connected device, and the toolstack deletes it and
    makes it again at the same path (libxl's re-add) just before Closing
    is written.  The error node's path is the new device's as much as
    the old one's: written apart from Closing, the error node stayed
    where the new device starts, and only Closing was kept out.  The two
    are written together or not at all: the write finds the re-creation
    (its transaction, conflicting, is run again), nothing is written,
    and the failure is the old device's, only logged."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest, dev, fe = connected(host, frontends)
    old = backend_device(driver, guest.domid)
    fe.close()
    closing = f"{old.nodename}/state"
    made: list[Any] = []
    plain_write = Transaction.write

    def write(t: Transaction, path: str, value: Any) -> None:
        if path == closing and str(value) == str(int(S.CLOSING)) and not made:
            made.append(host.toolstack.add_device("xbtest", guest.domid, replace=True))
        plain_write(t, path, value)

    monkeypatch.setattr(Transaction, "write", write)
    reported: list[bool] = []
    assert old.queue(lambda: reported.append(old.fatal(errno.EIO, "the old device's failure")))
    driver.wait(lambda: old.gone)
    assert len(made) == 1, "Closing was never written: the test no longer tests anything"
    again = made[0]
    assert again.backend_path == dev.backend_path
    fe = _connect(frontends, guest, again)
    assert error_node(dom0_xs, again) is None
    assert reported == [False]
    said = [r for r in caplog.records if "the old device's failure" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove",
                                            "probe", "connect"]
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)


def test_fatal_whose_write_conflicts_writes_both_when_run_again(
        host, driver, frontends, dom0_xs, monkeypatch) -> None:
    """The transaction that writes fatal()'s error node and Closing
    conflicts (another writer touched the state it read: EAGAIN on
    commit) with the directory still the device's: run again from
    scratch, it writes both, once, and the failure is reported."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    state = f"{bdev.nodename}/state"
    touched: list[bool] = []
    plain_write = Transaction.write

    attempts: list[str] = []

    def write(t: Transaction, path: str, value: Any) -> None:
        if path == bdev.error_path:
            attempts.append(value)
        if path == state and str(value) == str(int(S.CLOSING)) and not touched:
            touched.append(True)
            dom0_xs.write(state, int(S.CONNECTED))  # what it holds: only a conflict
        plain_write(t, path, value)

    monkeypatch.setattr(Transaction, "write", write)
    reported: list[bool] = []
    assert bdev.queue(lambda: reported.append(bdev.fatal(errno.EIO, "conflicted")))
    fe.wait_backend(S.CLOSING)
    bdev.events.flush()
    assert touched == [True]
    assert attempts == [f"{errno.EIO} conflicted"] * 2, "no conflict: the test tests nothing"
    assert reported == [True]
    assert error_node(dom0_xs, dev) == f"{errno.EIO} conflicted"


@pytest.mark.parametrize("how", ["destroyed and added", "replaced"])
def test_a_failed_device_re_created_leaves_the_new_one_no_error_node(
        host, driver, frontends, dom0_xs, how: str) -> None:
    """fatal() reported a failure (error node and Closing), then the
    toolstack deleted the device and made it again at the same path (a
    forced removal and an add, or the two in one transaction) while the
    old device's queue was busy.  The deletion's events found the new
    directory there, so nothing forgot the old error node, which the new
    device, probed and connected, then had in its error path.  An error
    node at the path of a device about to be probed is an old one's."""
    guest, dev, fe = connected(host, frontends)
    old = backend_device(driver, guest.domid)
    fe.close()
    go = threading.Event()
    assert old.queue(lambda: (old.fatal(errno.EIO, "the old device's failure"), go.wait(TIMEOUT)))
    dom0_xs.wait_for(f"{dev.backend_path}/state", str(int(S.CLOSING)), timeout=TIMEOUT)
    assert error_node(dom0_xs, dev) == f"{errno.EIO} the old device's failure"
    if how == "destroyed and added":
        host.toolstack.destroy_device(dev)
        again = host.toolstack.add_device("xbtest", guest.domid)
    else:
        again = host.toolstack.add_device("xbtest", guest.domid, replace=True)
    go.set()
    fe = _connect(frontends, guest, again)
    assert old.gone
    assert error_node(dom0_xs, again) is None
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)


def test_a_probe_writing_after_the_device_was_re_created_writes_nothing_there(
        host, driver, frontends, dom0_xs) -> None:
    """A probe() that goes on writing features once its directory was
    made again writes into a new device's directory, which the toolstack
    alone may fill before that device is probed: refused, as a write into
    a deleted directory is."""
    refused: list[BaseException] = []

    def write_late(dev) -> None:
        try:
            dev.write("feature-late", 1)
        except FileNotFoundError as exc:
            refused.append(exc)
            raise

    guest, again = _probe_across_re_creation(host, driver, write_late)
    fe = _connect(frontends, guest, again)
    assert len(refused) == 1
    assert dom0_xs.read(f"{again.backend_path}/feature-late") is None
    assert driver.calls_of(guest.domid) == ["probe", "remove", "probe", "connect"]
    assert error_node(dom0_xs, again) is None
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)


def test_a_node_probe_wrote_changed_by_the_toolstack_before_init_wait_is_a_re_probe(
        host, driver, frontends, dom0_xs) -> None:
    """Before the first switch, what probe() wrote is all that tells our
    directory from one made again at its path, and a node of it with
    another value cannot be told from a re-creation: the device is
    dropped, without writing anything, and probed again, which writes the
    node again.  A node with two writers loses one of them whatever the
    order; what is pinned here is that the device goes on, and its
    frontend only ever sees one probe's InitWait."""
    guest, dev, release = _first_probe_held(host, driver)
    dom0_xs.write(f"{dev.backend_path}/feature-test", "0")
    release.set()
    fe = _connect(frontends, guest, dev)
    # The second probe says the drop wrote no Closed (nor Closing): only
    # a device still Initialising is probed.
    assert driver.calls_of(guest.domid) == ["probe", "remove", "probe", "connect"]
    assert dom0_xs.read(f"{dev.backend_path}/feature-test") == "1"
    assert error_node(dom0_xs, dev) is None
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)


class _SilentProbe(RecordingDriver):
    """A driver whose probe() writes no node (BackendDriver's default):
    it only reads the toolstack's ``params`` (into ``params_read``)."""

    def __init__(self, platform: Any) -> None:
        super().__init__(platform)
        self.params_read: list[str | None] = []

    def probe(self, dev: Any) -> None:
        self._record("probe", dev)
        self.params_read.append(dev.read("params"))
        if self.probe_hook is not None:
            self.probe_hook(dev)


def test_a_device_re_created_while_a_silent_probe_runs_is_served_by_that_probe(
        host, frontends, dom0_xs) -> None:
    """The window BackendDevice._ours documents: a probe() that writes
    nothing leaves nothing to tell its directory from one the toolstack
    made again at the path (a forced removal and an add of the same
    device, both within probe()): the device carries on there, with what
    probe() read of the old one, rather than being probed again.  Pinned
    so that closing the window is a decision: nothing stalls, nothing is
    written twice, and the new device's frontend connects."""
    with _SilentProbe(host.dom0) as drv:
        entered, release = threading.Event(), threading.Event()

        def hold(_dev) -> None:
            entered.set()
            assert release.wait(TIMEOUT)

        drv.probe_hook = hold
        guest = host.create_domain("guest")
        dev = host.toolstack.add_device("xbtest", guest.domid, backend_nodes={"params": "old"})
        assert entered.wait(TIMEOUT)
        host.toolstack.destroy_device(dev)  # libxl's forced removal
        again = host.toolstack.add_device("xbtest", guest.domid, backend_nodes={"params": "new"})
        release.set()
        fe = _connect(frontends, guest, again)
        assert drv.calls_of(guest.domid) == ["probe", "connect"]
        assert drv.params_read == ["old"]
        assert dom0_xs.read(f"{again.backend_path}/params") == "new"
        fe.set_state(S.CLOSED)
        fe.wait_backend(S.CLOSED)


def test_a_connected_device_failing_after_it_was_re_created_leaves_no_error_node(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """A driver's own call fails its device with fatal() while the
    toolstack deleted it and made a new one at the same path (its events
    still wait behind the failure): the error node's path is the new
    device's too, which must not start its life reporting the old one's
    failure, nor must the log, where a watcher would count an error line
    against the path.  fatal() says it reported nothing."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest, dev, fe = connected(host, frontends)
    old = backend_device(driver, guest.domid)
    reported: list[object] = []
    again, fe = _re_created_behind(
        driver, host, frontends, dom0_xs, guest, dev, fe,
        (lambda: reported.append(old.fatal(errno.EIO, "the old device's failure\n\x1b[2J")),))
    assert reported == [False]
    assert error_node(dom0_xs, again) is None
    assert dom0_xs.read(f"{again.backend_path}/state") == str(int(S.CONNECTED))
    assert not [r for r in caplog.records
                if r.levelno >= logging.WARNING and again.backend_path in r.getMessage()]
    said = [r for r in caplog.records if "the old device's failure" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]
    assert said[0].getMessage().isprintable() and "failure\\n\\x1b[2J" in said[0].getMessage()


@pytest.mark.parametrize("failing", ["connect", "queued call", "frontend_changed"])
def test_a_failure_after_the_device_was_re_created_is_not_reported_as_the_new_ones(
        host, driver, frontends, dom0_xs, caplog, failing: str) -> None:
    """The driver's code for a device fails while the toolstack deletes
    the device and makes it again at the same path.  The failure is the
    old device's: nothing of it may be written there (error node,
    Closing), and it is not reported as a failure of the device at that
    path, which a log watcher would count against the new one (as for a
    probe failing so).  The old device is dropped and the new one
    probed and connected."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    entered, release = threading.Event(), threading.Event()
    old: list[Any] = []

    def hold_then_fail(*_args: Any) -> None:
        entered.set()
        assert release.wait(TIMEOUT)
        # What a driver's message may quote of the guest's: a line of its own.
        raise RuntimeError("the old device's failure\n\x1b[2J")

    if failing == "connect":
        driver.connect_hook = lambda d: hold_then_fail() if d in old else None
        guest, dev, fe = _at_init_wait(host, frontends)
        old.append(backend_device(driver, guest.domid))
        fe.publish()
    elif failing == "queued call":
        guest, dev, fe = connected(host, frontends)
        old.append(backend_device(driver, guest.domid))
        old[0].queue(hold_then_fail)
    else:
        handle = driver.frontend_changed

        def extended(d: Any, state: S) -> None:
            if d in old and not entered.is_set():
                hold_then_fail()
            handle(d, state)

        driver.frontend_changed = extended  # type: ignore[method-assign]
        guest, dev, fe = connected(host, frontends)
        old.append(backend_device(driver, guest.domid))
        fe.set_state(S.CONNECTED)  # an event; the table does nothing for it
    assert entered.wait(TIMEOUT)
    again, fe = _re_created_while_held(
        driver, host, frontends, dom0_xs, guest, dev, fe, old[0], release)
    assert error_node(dom0_xs, again) is None
    said = [r for r in caplog.records if "the old device's failure" in r.getMessage()]
    # Said once, as information, and escaped as fatal() escapes it.
    assert [r.levelno for r in said] == [logging.INFO]
    assert said[0].getMessage().isprintable() and "failure\\n\\x1b[2J" in said[0].getMessage()
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)


@pytest.mark.parametrize("value, error", [
    ("7", "22 saw state 7 at frontend"),  # no row of the table
    ("banana", "22 frontend invalid xenbus state 'banana'"),  # no state at all
])
def test_an_impossible_frontend_state_met_after_the_device_was_re_created_is_the_new_ones(
        host, driver, frontends, dom0_xs, caplog, value: str, error: str) -> None:
    """The base's own failures for a frontend state are met as any other:
    the old device's frontend event, waiting behind a busy call, reads the
    state of the frontend made again with the device, whose frontend
    wrote something impossible.  That is the new device's to report,
    once, when it is probed; the old device reporting it too would count
    it twice against the path."""
    guest, dev, fe = connected(host, frontends)
    old = backend_device(driver, guest.domid)
    stalled, go = threading.Event(), threading.Event()
    old.queue(lambda: (stalled.set(), go.wait(TIMEOUT)))
    assert stalled.wait(TIMEOUT)
    fe.set_state(S.CONNECTED)  # an event for the old device, ahead of the deletion's
    fe.close()
    dom0_xs.rm(dev.backend_path)
    dom0_xs.rm(dev.frontend_path)
    again = host.toolstack.add_device("xbtest", guest.domid)
    frontends(guest, again).set_state(value)
    go.set()
    driver.wait_call("probe", guest.domid, count=2)
    dom0_xs.wait_for(f"{again.backend_path}/state", str(int(S.CLOSING)), timeout=TIMEOUT)
    # The error line comes once fatal()'s transaction is committed.
    backend_device(driver, guest.domid).events.flush()
    assert old.gone
    assert error_node(dom0_xs, again) == error
    said = [r for r in caplog.records
            if r.levelno >= logging.WARNING and error[3:] in r.getMessage()]
    assert len(said) == 1


def test_a_dropped_device_writes_nothing_into_the_new_one_at_its_path(
        host, driver, frontends, dom0_xs) -> None:
    """A driver's thread may hold a device after it was dropped, and the
    toolstack made a new device at its path, probed and connected by now:
    its state is no longer Initialising, so only the old object's being
    gone can tell.  Whatever it writes would be the new device's: its
    nodes, its state, its error node."""
    guest, dev, fe = connected(host, frontends)
    old = backend_device(driver, guest.domid)
    fe.close()
    dom0_xs.rm(dev.backend_path)
    dom0_xs.rm(dev.frontend_path)
    driver.wait_removed(guest.domid)
    assert old.gone
    again = host.toolstack.add_device("xbtest", guest.domid)
    fe = _connect(frontends, guest, again)
    with pytest.raises(OSError, match="device was removed") as refused:
        old.write("feature-late", 1)
    assert refused.value.errno == errno.ENODEV
    assert old.switch_state(S.CLOSING) is False
    old.fatal(errno.EIO, "the old device's failure")
    assert dom0_xs.read(f"{again.backend_path}/feature-late") is None
    assert dom0_xs.read(f"{again.backend_path}/state") == str(int(S.CONNECTED))
    assert error_node(dom0_xs, again) is None
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)


def test_a_dropped_device_s_late_failure_says_what_the_nodes_show(
        host, driver, frontends, caplog) -> None:
    """A driver's thread fails a device after it was dropped, its
    directory made again for a new device still Initialising (its probe
    held): the line that says the failure is not reported there says what
    the nodes show, the directory made again, rather than only that the
    device was removed (see BackendDevice._stale)."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest, dev, fe = connected(host, frontends)
    old = backend_device(driver, guest.domid)
    entered, release = threading.Event(), threading.Event()

    def hold(_dev: Any) -> None:
        entered.set()
        assert release.wait(TIMEOUT)

    driver.probe_hook = hold
    try:
        fe.close()
        host.toolstack.add_device("xbtest", guest.domid, replace=True)
        assert entered.wait(TIMEOUT)
        assert old.gone
        assert old.fatal(errno.EIO, "late") is False
        (said,) = [r.getMessage() for r in caplog.records
                   if "not reported there" in r.getMessage()]
        assert said == (f"{old.nodename}: late (errno {errno.EIO}), and the device directory "
                        "was made again for a new device: not reported there"), said
    finally:
        release.set()


def test_a_device_removed_before_it_was_probed_lets_the_toolstack_go(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """The toolstack re-adds a device at the path of one still being
    dropped, and removes the new one (online=0, Closing) before the drop
    is over: by the time the backend looks at the path, the new device is
    no longer Initialising, so it is never probed.  Nothing was ever
    connected, so nothing is left to close, yet without Closed libxl
    waits its whole timeout (10 s) for a backend that never answers."""
    guest, dev, fe = _at_init_wait(host, frontends)
    entered, release = threading.Event(), threading.Event()

    def hold(_dev) -> None:
        entered.set()
        assert release.wait(TIMEOUT)

    driver.remove = hold  # type: ignore[method-assign]
    fe.close()
    host.toolstack.destroy_device(dev)
    assert entered.wait(TIMEOUT)  # the old device is being dropped
    again = host.toolstack.add_device("xbtest", guest.domid)
    removed: list[bool] = []
    remover = threading.Thread(
        target=lambda: removed.append(host.toolstack.remove_device(again, timeout=TIMEOUT)))
    remover.start()
    dom0_xs.wait_for(f"{again.backend_path}/state", str(int(S.CLOSING)), timeout=TIMEOUT)
    release.set()
    remover.join(2 * TIMEOUT)
    assert removed == [True]
    assert not [r for r in caplog.records if "did not close" in r.getMessage()]
    assert driver.devices() == [] and driver.calls_of(guest.domid) == ["probe"]


@pytest.mark.parametrize("failing", [False, True])
def test_a_removal_of_the_device_re_created_behind_a_switched_one_is_answered(
        host, driver, frontends, dom0_xs, caplog, failing: bool) -> None:
    """The toolstack deletes a connected device (a forced removal), makes
    it again at the same path and removes the new one (online=0, Closing)
    before the old device, busy, saw any of it.  Once switched, the old
    device tells a new directory only by its Initialising, which the
    removal replaced: it takes the removal for its own and writes Closed
    there, which is what libxl waits for, and what the new device, never
    probed, would get anyway (see _close_unprobed).  Pinned: libxl goes
    on in time, the new device is neither probed nor connected, and the
    old one is dropped once; a failure of the old device in that window
    may only leave an error node that goes with the directory."""
    guest, dev, fe = connected(host, frontends)
    old = backend_device(driver, guest.domid)
    stalled, go = threading.Event(), threading.Event()

    def hold() -> None:
        stalled.set()
        assert go.wait(TIMEOUT)
        if failing:
            raise RuntimeError("the old device's failure")

    old.queue(hold)  # its events wait
    assert stalled.wait(TIMEOUT)
    fe.close()  # says nothing: the guest sees its device vanish
    host.toolstack.destroy_device(dev)
    again = host.toolstack.add_device("xbtest", guest.domid)
    remover, closed = _remove_in_background(host, again, destroy=False)
    dom0_xs.wait_for(f"{again.backend_path}/state", str(int(S.CLOSING)), timeout=TIMEOUT)
    go.set()
    remover.join(2 * TIMEOUT)
    assert closed == [True]
    driver.wait(lambda: driver.devices() == [] and old.gone)
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]
    assert not [r for r in caplog.records if "did not close" in r.getMessage()]
    assert not dom0_xs.exists(again.backend_path)
    assert eventually(lambda: error_node(dom0_xs, again) is None)


def test_the_error_node_goes_with_the_device(host, driver, frontends, dom0_xs) -> None:
    """A failed device leaves ``error/backend/<type>/<fe>/<devid>/error``
    in the backend domain's home, owned by the backend domain.  Once the
    toolstack deleted the device, nobody will read it: left there, every
    failed device of every guest that ever ran would stay in XenStore,
    against the node quota of a driver domain, until the backend cannot
    write its nodes any more."""
    guest, dev, fe = _at_init_wait(host, frontends)
    fe.set_state("9")
    fe.wait_backend(S.CLOSING)
    assert error_node(dom0_xs, dev) == f"{errno.EINVAL} frontend invalid xenbus state '9'"
    fe.set_state(S.CLOSED)
    assert host.toolstack.remove_device(dev, timeout=TIMEOUT)
    driver.wait_call("remove", guest.domid)
    errors = f"/local/domain/0/error/backend/xbtest/{guest.domid}"
    dom0_xs.wait_for(errors, lambda v: v is None, timeout=TIMEOUT)
    assert dom0_xs.ls("/local/domain/0/error/backend/xbtest") == []
    # A device made again at the path fails and reports as the first did.
    again = host.toolstack.add_device("xbtest", guest.domid)
    fe2 = frontends(guest, again)
    fe2.wait_backend(S.INIT_WAIT)
    fe2.set_state("9")
    fe2.wait_backend(S.CLOSING)
    assert error_node(dom0_xs, again) == f"{errno.EINVAL} frontend invalid xenbus state '9'"


def test_forgetting_an_error_node_checks_the_device_again_in_its_transaction(
        host, driver, frontends, dom0_xs) -> None:
    """_forget_error() runs on what a listing or a read showed a moment
    before: the device may have been made again (or not deleted) since.
    Its transaction looks again, and an error node whose device is there
    (the failed one itself, Closing) is kept, asked as deleted or as made
    again alike."""
    guest, dev, fe = _at_init_wait(host, frontends)
    fe.set_state("9")
    fe.wait_backend(S.CLOSING)
    said = f"{errno.EINVAL} frontend invalid xenbus state '9'"
    assert error_node(dom0_xs, dev) == said
    for made_again in (False, True):
        driver._forget_error(str(guest.domid), "0", made_again=made_again)
        assert error_node(dom0_xs, dev) == said


def test_a_taken_over_device_re_created_at_the_same_path_is_served(
        host, frontends, dom0_xs) -> None:
    """A device taken over at InitWait has not written its state itself,
    yet the state there is a backend's: Initialising appearing in its
    directory means the toolstack made a new device, to be probed."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = frontends(guest, dev)
    dom0_xs.write(f"{dev.backend_path}/state", int(S.INIT_WAIT))  # an earlier backend's
    with RecordingDriver(host.dom0) as drv:
        drv.wait_call("probe", guest.domid)
        _re_created_behind(drv, host, frontends, dom0_xs, guest, dev, fe)


def test_domain_destroyed_while_connected(host, driver, frontends) -> None:
    other, _, other_fe = connected(host, frontends, "other")
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    fe.close()  # the guest's own connections die with it
    host.destroy_domain(guest)
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert bdev.gone and bdev.resources == (0, 0)
    assert [d.frontend_id for d in driver.devices()] == [other.domid]
    census.check()  # only the other device's ports and ring page remain
    other_fe.set_state(S.CLOSING)
    other_fe.wait_backend(S.CLOSING)  # and it is still served



def _add_device_by_hand(
    xs: XenStore, base: str, frontend: str, frontend_id: int, backend_id: int = 0
) -> None:
    """Add a device as a toolstack does, with its frontend directory at
    ``frontend`` (the simulated toolstack puts it in the guest's home).
    The backend directory is the backend domain's, as libxl makes it: in a
    driver domain's home, which is dom0's, it could not write it else."""
    def tx(t):
        t.write(f"{frontend}/state", 1)
        t.mkdir(base)
        t.set_perms(base, [f"n{backend_id}", f"r{frontend_id}"])
        t.write(f"{base}/frontend", frontend)
        t.write(f"{base}/frontend-id", frontend_id)
        t.write(f"{base}/online", 1)
        t.write(f"{base}/state", 1)

    xs.transaction(tx)


def _publish_by_hand(xs: XenStore, frontend: str, ref: int, port: int) -> None:
    """What a frontend publishes to connect: ring-ref, port, Initialised."""
    xs.transaction(lambda t: (t.write(f"{frontend}/ring-ref", ref),
                              t.write(f"{frontend}/port", port),
                              t.write(f"{frontend}/state", 3)))


def _destroyed_outliving_its_frontend(host, driver, dom0_xs) -> tuple[Any, Any, str, str]:
    """A guest connected to a device whose frontend directory is outside
    its home, then destroyed: the guest, the driver's device, its
    frontend directory and its backend directory, which the destruction
    left Closed."""
    guest = host.create_domain("guest")
    pages = guest.gntshr().share_pages(0, 1)
    evtchn = guest.evtchn()
    port = evtchn.bind_unbound_port(0)
    frontend = "/local/domain/0/fake-frontends/1"
    base = f"/local/domain/0/backend/xbtest/{guest.domid}/0"
    _add_device_by_hand(dom0_xs, base, frontend, guest.domid)
    dom0_xs.wait_for(f"{base}/state", "2", timeout=TIMEOUT)
    _publish_by_hand(dom0_xs, frontend, pages.refs[0], port)
    dom0_xs.wait_for(f"{base}/state", "4", timeout=TIMEOUT)
    bdev = backend_device(driver, guest.domid)
    evtchn.close()
    pages.unshare()
    host.destroy_domain(guest)
    dom0_xs.wait_for(f"{base}/state", "6", timeout=TIMEOUT)
    return guest, bdev, frontend, base


def test_release_domain_alone_tears_the_device_down(host, driver, dom0_xs) -> None:
    """A frontend directory outside the guest's home survives the guest's
    destruction, so only @releaseDomain can tell the backend."""
    census = Census(host, driver)
    guest, bdev, frontend, base = _destroyed_outliving_its_frontend(host, driver, dom0_xs)
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert bdev.gone and bdev.resources == (0, 0) and driver.devices() == []
    assert dom0_xs.read(f"{frontend}/state") == "3"  # still there: not how we learnt
    census.check()


def test_a_device_of_a_domid_past_a_domid_t_does_not_stop_release_domain(
        host, driver, dom0_xs, caplog) -> None:
    """A backend directory naming a frontend domain past XenStore's
    domid_t (the toolstack's to write): @releaseDomain asks XenStore
    whether each device's frontend domain is introduced, and
    xenback.XenStore refuses such a domid with ValueError before anything
    is sent.  That ValueError, of domain 70000 registered first, cut the
    loop short, and the destroyed guest's device, whose frontend
    directory outlives it, was never torn down.  Domain 70000 is not
    alive (as when XenStore's EINVAL said so): its device goes too."""
    odd = "/local/domain/0/backend/xbtest/70000/0"

    def add_odd(t) -> None:
        t.write("/local/domain/0/fake-frontends/70000/state", 1)
        t.mkdir(odd)
        t.set_perms(odd, ["n0"])  # r70000 is refused: no domid_t
        t.write(f"{odd}/frontend", "/local/domain/0/fake-frontends/70000")
        t.write(f"{odd}/frontend-id", 70000)
        t.write(f"{odd}/online", 1)
        t.write(f"{odd}/state", 1)

    # The first event of the driver's @releaseDomain watch handled first
    # (its watch fires once as it is made): handled after the odd device
    # came, it finds domain 70000 not alive and drops its device there.
    handed_over(driver.xenstore, "started")
    driver._bus.flush()
    dom0_xs.transaction(add_odd)
    dom0_xs.wait_for(f"{odd}/state", "2", timeout=TIMEOUT)
    (odd_dev,) = driver.devices()

    census = Census(host, driver)
    guest, bdev, _frontend, _base = _destroyed_outliving_its_frontend(host, driver, dom0_xs)
    dom0_xs.wait_for(f"{odd}/state", "6", timeout=TIMEOUT)
    driver.wait_call("remove", guest.domid)
    for dev in (odd_dev, bdev):
        dev.events.flush()
        assert dev.gone
    assert driver.devices() == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    census.check()


def test_domain_destroyed_mid_connect(host, driver, frontends) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_connect(dev) -> None:
        entered.set()
        release.wait(TIMEOUT)

    driver.connect_hook = slow_connect
    census = Census(host, driver)
    guest, dev, fe = _at_init_wait(host, frontends, "dying")
    fe.publish()
    assert entered.wait(TIMEOUT)
    bdev = backend_device(driver, guest.domid)
    fe.close()
    # The stuck backend cannot close: libxl removes the device anyway after
    # its timeout (shortened here), then destroys the domain.
    host.destroy_domain(guest, timeout=0.2)
    release.set()  # connect now maps grants of a dead domain
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert bdev.gone and bdev.resources == (0, 0) and driver.devices() == []
    census.check()
    driver.connect_hook = None
    connected(host, frontends, "survivor")


def test_devices_are_found_at_start_and_stop_closes_them(host, frontends) -> None:
    guest = host.create_domain("early")
    dev = host.toolstack.add_device("xbtest", guest.domid, devid=3)
    fe = frontends(guest, dev)
    drv = RecordingDriver(host.dom0)
    with drv:
        fe.wait_backend(S.INIT_WAIT)
        fe.publish()
        fe.wait_backend(S.CONNECTED)
        (bdev,) = drv.devices()
        assert (bdev.frontend_id, bdev.devid) == (guest.domid, 3)
    assert drv.calls_of(guest.domid, 3) == ["probe", "connect", "disconnect", "remove"]
    assert fe.xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSED))
    assert bdev.resources == (0, 0)


def test_a_device_found_as_the_driver_stops_is_left_to_the_next_backend(
        host, dom0_xs, monkeypatch) -> None:
    """A device appears while stop() runs: the discovery under way when
    stop() began must not probe it (it would be closed at once, and a
    frontend could take Closed for the answer); it stays Initialising."""
    drv = RecordingDriver(host.dom0)
    drv.start()
    guest = host.create_domain("guest")
    state = f"{drv.backend_root}/{guest.domid}/0/state"
    looking, go = threading.Event(), threading.Event()
    plain_read = drv.xenstore.read

    def read(path, *args):
        if path == state and not looking.is_set():
            looking.set()  # discovery reads the new device's state ...
            assert go.wait(TIMEOUT)  # ... and stop() begins meanwhile
        return plain_read(path, *args)

    monkeypatch.setattr(drv.xenstore, "read", read)
    try:
        dev = host.toolstack.add_device("xbtest", guest.domid)
        assert looking.wait(TIMEOUT)
        stopper = threading.Thread(target=drv.stop)
        stopper.start()
        assert eventually(lambda: drv._stopping)
        go.set()
        stopper.join(TIMEOUT)
        assert not stopper.is_alive()
    finally:
        go.set()
        drv.stop()
    assert drv.calls_of(guest.domid) == []
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.INITIALISING))


_NOT_DOMID_DEVID = ("-1/0", "abc/0", "1/x", "01/0", "1/00")


def test_directories_that_are_not_domid_devid_are_ignored(
        host, driver, frontends, dom0_xs, caplog) -> None:
    for junk in _NOT_DOMID_DEVID:
        base = f"/local/domain/0/backend/xbtest/{junk}"
        dom0_xs.transaction(lambda t, base=base: (t.write(f"{base}/frontend-id", 1),
                                                  t.write(f"{base}/state", 1)))
    guest, dev, fe = connected(host, frontends)  # discovery went past them
    assert [(d.frontend_id, d.devid) for d in driver.devices()] == [(guest.domid, 0)]
    assert not dom0_xs.exists("/local/domain/0/error")
    said = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for junk in _NOT_DOMID_DEVID:
        assert dom0_xs.read(f"/local/domain/0/backend/xbtest/{junk}/state") == "1"
        # "01/0" would be served as device 1/0, whose directory does not exist
        assert f"xbtest/{junk}: not <domid>/<devid>" in said


class _Discovery:
    """Junk in the backend directory, and a way to know that the driver's
    discovery has seen every event so far: it takes them one at a time, in
    the order the watch fired, so a device added after them and probed
    (InitWait) comes after them all."""

    def __init__(self, host, dom0_xs, caplog) -> None:
        self.root = "/local/domain/0/backend/xbtest"
        self.xs = dom0_xs
        self.caplog = caplog
        self.toolstack = host.toolstack
        self.guest = host.create_domain("guest")
        self.devid = 0

    def write(self, junk: str, node: str = "state", value: int = 1) -> None:
        self.xs.write(f"{self.root}/{junk}/{node}", value)

    def rm(self, junk: str) -> None:
        self.xs.rm(f"{self.root}/{junk}")

    def seen(self) -> None:
        dev = self.toolstack.add_device("xbtest", self.guest.domid, devid=self.devid)
        self.devid += 1
        self.xs.wait_for(f"{dev.backend_path}/state", str(int(S.INIT_WAIT)), timeout=TIMEOUT)

    def warnings(self, junk: str) -> int:
        return sum(f"xbtest/{junk}: not <domid>/<devid>" in r.getMessage()
                   for r in self.caplog.records if r.levelno == logging.WARNING)


def test_a_junk_directory_is_reported_once_until_it_goes(
        host, driver, dom0_xs, caplog) -> None:
    """Every change under the backend directory used to say again what it
    ignores: one line per junk directory per event flooded the log.  Once
    per directory now, again only after it went away and came back."""
    d = _Discovery(host, dom0_xs, caplog)
    for junk in ("01/0", "1/x"):
        d.write(junk)
    d.seen()
    assert (d.warnings("01/0"), d.warnings("1/x")) == (1, 1)
    for value in range(5):
        d.write("01/0", value=value)           # the junk's own nodes change
        d.write("01/0", node=f"n{value}")
        d.xs.write(f"{d.root}/leaf", value)    # a whole listing (depth 1)
    d.seen()                                   # other devices come and go
    assert (d.warnings("01/0"), d.warnings("1/x")) == (1, 1)
    d.rm("01/0")
    d.seen()
    d.write("01/0")                            # back: said again
    d.seen()
    assert (d.warnings("01/0"), d.warnings("1/x")) == (2, 1)
    d.rm("01")                                 # gone with its parent (a listing)
    d.seen()
    d.write("01/0")
    d.seen()
    assert (d.warnings("01/0"), d.warnings("1/x")) == (3, 1)
    # What the driver remembers is what exists, however many came and went.
    for n in range(20):
        d.write(f"dom{n}/0")
        d.rm(f"dom{n}")
    d.rm("1/x")
    d.seen()
    assert driver._junk == {("01", "0")}


def test_a_junk_directory_is_said_again_in_a_new_run(host, driver, dom0_xs, caplog) -> None:
    """What a run said it ignores, a new run (the driver stopped and
    started again) says again: its log may be read alone."""
    d = _Discovery(host, dom0_xs, caplog)
    d.write("01/0")
    d.seen()
    assert d.warnings("01/0") == 1
    driver.stop()
    driver.start()
    d.seen()
    assert d.warnings("01/0") == 2


def test_junk_beyond_what_the_driver_remembers_is_rate_limited(
        host, driver, dom0_xs, caplog, monkeypatch) -> None:
    """A toolstack may make more junk than is worth remembering (dom0 has
    no XenStore quota): past the bound, it is said at a bounded rate."""
    monkeypatch.setattr(xenbus, "_MAX_JUNK", 2)
    driver._junk_ratelimit = RateLimit("xbtest backend", burst=3, clock=lambda: 0.0)
    d = _Discovery(host, dom0_xs, caplog)
    for n in range(5):
        d.write(f"0{n}/0")
    for _ in range(5):
        d.xs.write(f"{d.root}/leaf", 1)        # each a listing of all five
    d.seen()
    assert len(driver._junk) == 2
    remembered = [f"{fe}/{devid}" for fe, devid in sorted(driver._junk)]
    assert [d.warnings(junk) for junk in remembered] == [1, 1]
    assert sum(d.warnings(f"0{n}/0") for n in range(5)) == 2 + 3


def test_a_driver_can_be_started_again(host, frontends) -> None:
    """After stop(), start() serves as the first one did: the devices the
    first run left Closed are taken over, and new ones are probed."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = frontends(guest, dev)
    drv = RecordingDriver(host.dom0)
    with drv:
        fe.wait_backend(S.INIT_WAIT)
        fe.publish()
        fe.wait_backend(S.CONNECTED)
    fe.wait_backend(S.CLOSED)  # what stop() leaves
    fe.set_state(S.CLOSED)
    with drv:
        fe.set_state(S.INITIALISING)  # reconnect after Closed
        fe.wait_backend(S.INIT_WAIT)
        fe.publish()
        fe.wait_backend(S.CONNECTED)
        other = host.create_domain("other")
        dev2 = host.toolstack.add_device("xbtest", other.domid)
        frontends(other, dev2).wait_backend(S.INIT_WAIT)


def test_a_stopped_driver_keeps_nothing_of_its_run(host) -> None:
    """stop() lets go of what start() made: the XenStore connection (its
    watches name it) and the domain's lock.  A driver kept to be started
    again held on to every run's closed connection, one more each run."""
    drv = RecordingDriver(host.dom0)
    for _ in range(2):
        drv.start()
        made = [weakref.ref(drv.xenstore), weakref.ref(drv._host_lock)]
        drv.stop()
        gc.collect()
        assert [ref() for ref in made] == [None, None]


def test_only_initialising_devices_are_probed(host, driver, frontends, dom0_xs) -> None:
    guest = host.create_domain("guest")
    root = f"/local/domain/0/backend/xbtest/{guest.domid}"
    frontend = f"/local/domain/{guest.domid}/device/xbtest"

    def tx(t):
        for devid, state in ((5, "6"), (6, None), (7, "2")):
            t.write(f"{root}/{devid}/frontend", f"{frontend}/{devid}")
            t.write(f"{root}/{devid}/frontend-id", guest.domid)
            if state is not None:
                t.write(f"{root}/{devid}/state", state)
        t.write(f"{root}/notanumber/state", 1)

    dom0_xs.transaction(tx)
    connected(host, frontends, "good")
    assert all(d.frontend_id != guest.domid for d in driver.devices())
    assert dom0_xs.read(f"{root}/5/state") == "6" and dom0_xs.read(f"{root}/6/state") is None


def test_many_devices_at_once(host, driver, frontends) -> None:
    """Sixteen devices connect in parallel; half die with their domains,
    the rest are removed by the toolstack; nothing is left behind."""
    baseline_ports, baseline_grants = _ports(host), _grants(host)
    guests = [host.create_domain(f"g{i}") for i in range(8)]
    fes = []
    for guest in guests:
        for devid in (0, 1):
            dev = host.toolstack.add_device("xbtest", guest.domid, devid=devid)
            fes.append(frontends(guest, dev))
    for fe in fes:
        fe.wait_backend(S.INIT_WAIT)
        fe.publish()
    for fe in fes:
        fe.wait_backend(S.CONNECTED)
    assert len(driver.devices()) == 16
    assert sum(d.resources[0] for d in driver.devices()) == 16

    dying = guests[:4]
    for fe in fes[:8]:
        fe.close()
    for guest in dying:
        host.destroy_domain(guest)
    for fe in fes[8:]:
        fe.set_state(S.CLOSED)
        fe.wait_backend(S.CLOSED)
    removers = [threading.Thread(target=host.toolstack.remove_device, args=(fe.device, TIMEOUT))
                for fe in fes[8:]]
    for t in removers:
        t.start()
    for t in removers:
        t.join(TIMEOUT)
    for guest in guests:
        for devid in (0, 1):
            driver.wait_call("remove", guest.domid, devid)
    for fe in fes[8:]:
        fe.close()
    driver.stop()  # waits for every device queue
    assert driver.devices() == []
    # The host unbinds a closed handle's ports on its service thread, after
    # close() returned: wait for the counts.
    deadline = time.monotonic() + TIMEOUT
    while (_ports(host), _grants(host)) != (baseline_ports, baseline_grants):
        assert time.monotonic() < deadline, (_ports(host), _grants(host))
        threading.Event().wait(0.01)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_driver_stops_after_the_host_went_away(frontends) -> None:
    """XenStore dies under a connected backend: stop() still returns and
    releases every thread of the driver."""
    before = {t.ident for t in threading.enumerate()}
    host = SimHost()
    host.start()
    drv = RecordingDriver(host.dom0)
    drv.start()
    try:
        guest, dev, fe = connected(host, frontends)
        fe.set_state(S.CLOSED)  # ports and grants released while the host lives
        fe.wait_backend(S.CLOSED)
        fe.close()
    finally:
        host.close()
    drv.stop()
    assert not leaked_threads(before)  # pyxs's router threads saw the reset and ended


def test_any_other_driver_exception_is_reported_as_eio(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """An exception that is neither an OSError nor a ValueError/TypeError
    still fails the device cleanly: EIO, the exception's type and text."""

    def hook(_dev) -> None:
        raise LookupError("no such queue")

    driver.connect_hook = hook
    census = Census(host, driver)
    guest, dev, fe = _at_init_wait(host, frontends, "bad")
    fe.publish()
    fe.wait_backend(S.CLOSING)
    assert error_node(dom0_xs, dev) == f"{errno.EIO} connecting: LookupError: no such queue"
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect"]
    assert _failed_without_tracebacks(caplog, driver, guest.domid) == []
    fe.close()
    census.check()


@pytest.mark.parametrize("online", ["0", None, "yes"])
def test_frontend_closed_while_offline_drops_the_device(
        host, driver, frontends, dom0_xs, online) -> None:
    """``online`` = 0 (or missing or garbled, as xenbus_dev_is_online() reads it) and
    the frontend closes: Closed is written and the device dropped, though
    the toolstack has not deleted its directory."""
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    if online is None:
        dom0_xs.rm(f"{dev.backend_path}/online")
    else:
        dom0_xs.write(f"{dev.backend_path}/online", online)
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert bdev.gone and driver.devices() == []
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSED))
    assert error_node(dom0_xs, dev) is None
    fe.close()
    census.check()


def test_a_removal_with_a_garbled_frontend_state_is_answered_at_once(
        host, driver, frontends, dom0_xs) -> None:
    """The frontend writes a state that is none (the device fails for it,
    Closing) and the toolstack removes the device: a frontend whose state
    is garbage will never say Closed, so it reads as Unknown, and Closed
    is written at once rather than after libxl's timeout."""
    guest, dev, fe = connected(host, frontends)
    fe.set_state("connected")
    fe.wait_backend(S.CLOSING)
    assert error_node(dom0_xs, dev) == "22 frontend invalid xenbus state 'connected'"
    assert host.toolstack.remove_device(dev, timeout=TIMEOUT) is True
    driver.wait_removed(guest.domid)
    assert driver.devices() == []
    fe.close()


def test_start_twice_is_refused(driver) -> None:
    with pytest.raises(RuntimeError, match="RecordingDriver is already started"):
        driver.start()


def test_a_workqueue_passed_in_is_the_driver_s_before_start_and_after_stop(host) -> None:
    """BackendDriver.workqueue: one passed in is there from the start,
    and stays the caller's after stop(); the driver's own only while it
    is started."""
    wq = alloc_workqueue("given", WQ_UNBOUND)
    try:
        drv = RecordingDriver(host.dom0, workqueue=wq)
        assert drv.workqueue is wq
        drv.start()
        drv.stop()
        assert drv.workqueue is wq
    finally:
        wq.destroy()
    own = RecordingDriver(host.dom0)
    with pytest.raises(RuntimeError, match="RecordingDriver is not started"):
        own.workqueue  # noqa: B018
    with own:
        assert own.workqueue is not wq
    with pytest.raises(RuntimeError, match="RecordingDriver is not started"):
        own.workqueue  # noqa: B018


def test_start_without_xenstore_fails_and_holds_nothing(tmp_path) -> None:
    # A run directory of ours, which outlives the host: in the host's own,
    # removed with it, start() would fail at its lock file, before XenStore.
    with SimHost(tmp_path) as host:
        dom0 = host.dom0
    before = {t.ident for t in threading.enumerate()}
    drv = RecordingDriver(dom0)
    for _ in range(2):  # a failed start can be tried again
        with pytest.raises(ConnectionError, match="cannot connect to XenStore"):
            drv.start()
        # Its own workqueue was destroyed again, and nothing is started.
        with pytest.raises(RuntimeError, match="RecordingDriver is not started"):
            drv.workqueue  # noqa: B018
        with pytest.raises(RuntimeError, match="RecordingDriver is not started"):
            drv.xenstore  # noqa: B018
    drv.stop()  # a no-op
    assert not leaked_threads(before)
    assert list(tmp_path.glob("*.lock")) == []


@pytest.mark.timeout(300)
@pytest.mark.parametrize("package", ["xenback", "pyxs"])
@pytest.mark.parametrize("how", ["start", "with"])
def test_a_start_interrupted_anywhere_leaves_nothing_stop_cannot_undo(
        host, package: str, how: str) -> None:
    """A Ctrl-C landing as any call of start() returns (in xenback's code
    or pyxs's): the domain's lock taken or the XenStore connection (its
    router thread) opened but not yet recorded, out of stop()'s reach, the
    lock refusing every later driver of the process; or start() ended
    with the connection recorded and no event queue, on which stop()
    failed an assertion.  After it, stop() leaves nothing behind: no
    thread, and the domain's lock free for the next driver.  In ``with``,
    a Ctrl-C as start() returned in __enter__ left it started, with no
    __exit__ to stop it: there, nothing is left without a stop()."""
    import importlib
    import os

    from tests.stolensignal import interrupted_at
    from xenback.hostlock import HostLock

    within = os.path.dirname(importlib.import_module(package).__file__ or "")
    landed: list[str] = []
    for n in itertools.count():
        before = {t.ident for t in threading.enumerate()}
        drv = RecordingDriver(host.dom0)
        # Once in the with block: a Ctrl-C in __exit__ is one in stop().
        inside: list[bool] = []

        def starting(drv: RecordingDriver = drv, inside: list[bool] = inside) -> None:
            if how == "start":
                drv.start()
                return
            with drv:
                inside.append(True)

        where = interrupted_at(n, within, starting, unless=lambda inside=inside: bool(inside))
        if how == "start":
            drv.stop()
        assert not leaked_threads(before), f"interrupted {where}: {leaked_threads(before)}"
        try:
            HostLock.for_domain(host.dom0, "xenback-xbtest").close()
        except RuntimeError as exc:
            raise AssertionError(f"interrupted {where}: {exc}") from exc
        if not where:
            break
        landed.append(where)
    assert len(landed) > 20, landed


def _stop_returns(drv: RecordingDriver) -> None:
    """``drv.stop()`` returns within TIMEOUT (run in a thread, so that a
    hang fails the test instead of blocking it)."""
    stopper = threading.Thread(target=drv.stop, name="test-stop")
    stopper.start()
    stopper.join(TIMEOUT)
    assert not stopper.is_alive(), "stop() hangs"


def _backend_warnings(caplog) -> list[logging.LogRecord]:
    """What xenback, not the simulated host, logged at WARNING and above."""
    return [r for r in caplog.records if r.levelno >= logging.WARNING
            and r.name.startswith("xenback.") and not r.name.startswith("xenback.sim")]


@contextlib.contextmanager
def _host_that_dies(frontends) -> Iterator[tuple[SimHost, RecordingDriver, Any, Any, Any]]:
    """A started RecordingDriver on a host of its own, with one connected
    device: yields ``(host, driver, guest, bdev, fe)``.  The host closes
    as the block ends, and the driver has lost XenStore after it, and has
    been told: ``connection_lost`` is set before ``on_lost`` is called
    (the driver's warning), which is the router thread's last act."""
    host = SimHost()
    host.start()
    drv = RecordingDriver(host.dom0)
    drv.start()
    try:
        guest, dev, fe = connected(host, frontends)
        yield host, drv, guest, backend_device(drv, guest.domid), fe
    finally:
        host.close()
    assert drv.xenstore.connection_lost.wait(TIMEOUT)
    router = drv.xenstore._client.router.thread
    router.join(TIMEOUT)
    assert not router.is_alive()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_host_dying_under_a_connected_device(frontends, caplog) -> None:
    """XenStore and the hypervisor go away while a device holds a mapping
    and a port: fatal() reports what it could not do instead of raising,
    and stop() still forgets every resource and thread."""
    before = {t.ident for t in threading.enumerate()}
    with _host_that_dies(frontends) as (host, drv, guest, bdev, fe):
        assert bdev.resources == (1, 1)
        assert bdev.platform is host.dom0
    caplog.clear()
    bdev.fatal(errno.EIO, "too late")  # does not raise
    # (The XenStore connection's threads may still be logging its loss.)
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and r.name == "xenback.xenbus"]
    # What failed and why, without a traceback (XenStore's loss is no bug),
    # once: the Closing refused for the same loss would say it again.
    assert [r.msg for r in warnings] == ["%s: could not write the error node: %s"]
    assert all(r.args[0] == bdev.nodename and str(r.args[1])  # type: ignore[index]
               and r.exc_info is None for r in warnings)
    caplog.clear()
    drv.stop()
    assert bdev.gone and bdev.resources == (0, 0) and drv.devices() == []
    (closed,) = [r for r in caplog.records if r.msg == "%s: could not switch to Closed: %s"]
    assert closed.exc_info is None
    # The port went with the hypervisor's handle: the error says so, and
    # a traceback would add nothing.
    (unbind,) = [r for r in caplog.records if r.msg == "%s: unbinding port %d failed: %s"]
    assert unbind.exc_info is None and unbind.args[2].errno == errno.ENODEV  # type: ignore[index]
    port = unbind.args[1]  # type: ignore[index]
    assert drv.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]
    assert port > 0
    fe.close()
    assert not leaked_threads(before)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_lost_connection_is_said_once_not_per_callback(frontends, caplog) -> None:
    """XenStore ends the backend's connection: that is one warning; the
    callbacks that fail on it afterwards (every device's, every watch's)
    add nothing to it.  stop() still releases everything."""
    before = {t.ident for t in threading.enumerate()}
    with _host_that_dies(frontends) as (_host, drv, _guest, bdev, fe):
        fe.close()
    for key in ("state", "frontend", "online"):  # a driver's own work items
        assert bdev.queue(bdev.read, key)
    bdev.events.flush()
    said = _backend_warnings(caplog)
    assert [r.getMessage().split(":")[0] for r in said] == ["XenStore connection lost"]
    assert said[0].exc_info is None
    drv.stop()
    assert bdev.gone and drv.devices() == []
    assert not leaked_threads(before)


def test_release_domain_in_a_driver_domain(host, frontends, caplog) -> None:
    """A backend in a driver domain may neither ask XenStore whether a
    domain is introduced nor look at another domain's home: @releaseDomain
    must not fail there.  The dead frontend's device goes when its
    directory does, and the other devices are not disturbed."""

    drvdom = host.create_domain("driver-domain")
    with XenStore(host.dom0.xenstore()) as dom0_xs:
        # As libxl lets a driver domain hear of its frontends' deaths.
        dom0_xs.set_perms("@releaseDomain", ["n0", f"r{drvdom.domid}"])
    drv = RecordingDriver(drvdom)
    with drv:
        with pytest.raises(PermissionError):
            drv.xenstore.is_domain_introduced(0)
        fes = []
        for name in ("dying", "living"):
            guest = host.create_domain(name)
            dev = host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
            fe = _connect(frontends, guest, dev)
            fes.append(fe)
        dying, living = fes
        dying.close()
        caplog.clear()
        host.destroy_domain(dying.guest)
        drv.wait_removed(dying.guest.domid)
        # The @releaseDomain event has reached the bus queue, and ran.
        handed_over(drv.xenstore, "released", base=f"/local/domain/{drvdom.domid}/data/sync")
        drv._bus.flush()
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        # The dying device closed at once: the toolstack did not time out.
        assert not [r for r in caplog.records if "did not close" in r.getMessage()]
        (bdev,) = drv.devices()
        assert bdev.frontend_id == living.guest.domid and bdev.resources == (1, 1)
        living.set_state(S.CLOSING)
        living.wait_backend(S.CLOSING)
    assert drv.calls_of(living.guest.domid) == ["probe", "connect", "disconnect", "remove"]


def test_a_driver_domain_that_may_not_watch_release_domain_still_serves(
        host, frontends, caplog, monkeypatch) -> None:
    """A XenStore that refuses a driver domain's watch on @releaseDomain
    (cxenstored only filters its events, as the simulated one does):
    start() says so and serves all the same, learning of a frontend's
    death from its directory vanishing."""
    drvdom = host.create_domain("driver-domain")
    drv = RecordingDriver(drvdom)
    plain = XenStore.watch

    def watch(xs: XenStore, path: str, *args: Any, **kwargs: Any) -> Any:
        if path == "@releaseDomain":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return plain(xs, path, *args, **kwargs)

    monkeypatch.setattr(XenStore, "watch", watch)
    with drv:
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
            "cannot watch @releaseDomain: relying on frontend removal"]
        guest = host.create_domain("guest")
        dev = host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
        fe = _connect(frontends, guest, dev)
        fe.close()
        host.destroy_domain(guest)
        drv.wait_removed(guest.domid)
        assert drv.devices() == []


def test_a_probe_queued_before_our_domain_went_probes_nothing(
        host, driver, dom0_xs, monkeypatch) -> None:
    """A new device's probe queued, then our domain found going before it
    ran: nothing is served any more, so nothing is probed (probe() would
    write features, and InitWait, where our home is going)."""
    plain = driver._probe
    ran: list[xenbus.BackendDevice] = []
    done = threading.Event()

    def probe(dev: Any, taken_over: bool = False) -> None:
        ran.append(dev)
        driver._lose_domain()
        try:
            plain(dev, taken_over)
        finally:
            done.set()

    monkeypatch.setattr(driver, "_probe", probe)
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    assert done.wait(TIMEOUT)
    ran[0].events.flush()  # its drop, queued by _lose_domain
    assert driver.calls_of(guest.domid) == [] and driver.devices() == []
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.INITIALISING))


def test_a_driver_whose_domain_went_in_a_run_before_serves_in_the_next(
        host, dom0_xs, frontends) -> None:
    """Our domain going (see _lose_domain) ends a run, not the driver: one
    stopped and started again serves new devices."""
    drvdom, drv, fes = _driver_domain_backend(host, dom0_xs, frontends, ("one",), (0,))
    try:
        drv._lose_domain()
        drv.wait_removed(fes[0].guest.domid)
        for fe in fes:
            fe.close()
        drv.stop()
        drv.start()
        guest = host.create_domain("two")
        dev = host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
        _connect(frontends, guest, dev)
    finally:
        drv.stop()


def test_release_domain_in_a_driver_domain_that_may_look_at_homes(host) -> None:
    """A driver domain may not ask whether a domain is introduced, but
    where it may read /local/domain a home that is gone tells it: the
    device goes on @releaseDomain, even with a frontend directory that
    outlives the guest (as in test_release_domain_alone_tears_the_device_down)."""
    drvdom = host.create_domain("driver-domain")
    guest = host.create_domain("guest")
    pages = guest.gntshr().share_pages(drvdom.domid, 1)
    evtchn = guest.evtchn()
    port = evtchn.bind_unbound_port(drvdom.domid)
    home = f"/local/domain/{drvdom.domid}"
    frontend = f"{home}/fake-frontends/{guest.domid}"
    base = f"{home}/backend/xbtest/{guest.domid}/0"

    with XenStore(host.dom0.xenstore()) as dom0_xs:
        dom0_xs.set_perms("@releaseDomain", ["n0", f"r{drvdom.domid}"])
        dom0_xs.set_perms("/local/domain", ["n0", f"r{drvdom.domid}"])
        with RecordingDriver(drvdom) as drv:
            _add_device_by_hand(dom0_xs, base, frontend, guest.domid, drvdom.domid)
            dom0_xs.wait_for(f"{base}/state", "2", timeout=TIMEOUT)
            _publish_by_hand(dom0_xs, frontend, pages.refs[0], port)
            dom0_xs.wait_for(f"{base}/state", "4", timeout=TIMEOUT)
            evtchn.close()
            pages.unshare()
            host.destroy_domain(guest)
            dom0_xs.wait_for(f"{base}/state", "6", timeout=TIMEOUT)
            drv.wait_removed(guest.domid)
            assert drv.devices() == []
            assert dom0_xs.read(f"{frontend}/state") == "3"  # not how it learnt


def _driver_domain_backend(host, dom0_xs, frontends, guests=("one", "two"), devids=(0, 1)):
    """A started RecordingDriver in a new driver domain, serving a
    connected device per guest and devid: ``(drvdom, driver, frontends)``."""
    drvdom = host.create_domain("driver-domain")
    # As libxl lets a driver domain hear of its frontends' deaths.
    dom0_xs.set_perms("@releaseDomain", ["n0", f"r{drvdom.domid}"])
    drv = RecordingDriver(drvdom)
    drv.start()
    fes = []
    for name in guests:
        guest = host.create_domain(name)
        for devid in devids:
            dev = host.toolstack.add_device("xbtest", guest.domid, devid=devid,
                                            backend_id=drvdom.domid)
            fes.append(_connect(frontends, guest, dev))
    return drvdom, drv, fes


@contextlib.contextmanager
def _driver_domain_device(host, dom0_xs, frontends) -> Iterator[tuple[Any, Any, Any, Any]]:
    """_driver_domain_backend() serving one guest's one device:
    ``(drvdom, driver, frontend, the driver's device)``, the driver
    stopped on the way out."""
    drvdom, drv, (fe,) = _driver_domain_backend(host, dom0_xs, frontends, ("one",), (0,))
    try:
        yield drvdom, drv, fe, backend_device(drv, fe.guest.domid)
    finally:
        drv.stop()


def test_the_driver_domain_going_away_under_its_backend(host, dom0_xs, frontends, caplog) -> None:
    """libxl destroys a domain by deleting its devices, then its home, then
    the domain.  Once the home is gone, every request of a driver domain's
    backend on its own nodes fails with EACCES (it may not read
    /local/domain, so ENOENT is not what it gets): its domain's end, said
    once, not a traceback per device and watch.  Every device is dropped
    there and then without writing (disconnect, remove, grants and ports
    released while the domain still has them); when the domain and its
    XenStore connection go, nothing more is said, and stop() returns
    leaving no thread."""
    before = {t.ident for t in threading.enumerate()}
    drvdom, drv, fes = _driver_domain_backend(host, dom0_xs, frontends)
    try:
        bdevs = drv.devices()
        assert len(bdevs) == 4 and all(b.resources == (1, 1) for b in bdevs)
        ports = _ports(host)
        caplog.clear()
        # The devices are left in place: the backend must tear them down
        # itself, as it must when libxl's deletions race with its work.
        dom0_xs.rm(f"/local/domain/{drvdom.domid}")
        drv.wait(lambda: [n for n, _, _ in drv.calls].count("remove") == 4)
        for bdev in bdevs:
            bdev.events.flush()
            assert bdev.gone and bdev.resources == (0, 0)
            assert drv.calls_of(bdev.frontend_id, bdev.devid) == [
                "probe", "connect", "disconnect", "remove"]
        assert drv.devices() == []
        assert eventually(lambda: _ports(host) == ports - 4)  # the backend's ends
        host.destroy_domain(drvdom)
        assert drv.xenstore.connection_lost.wait(TIMEOUT)
        for fe in fes:  # the guests' own connections, counted as threads
            fe.close()
        _stop_returns(drv)
    finally:
        drv.stop()
    assert not leaked_threads(before)
    assert drv.unordered == []
    said = _backend_warnings(caplog)
    assert [r.getMessage() for r in said] == [
        f"xbtest backend: domain {drvdom.domid} is going away (its XenStore home "
        f"/local/domain/{drvdom.domid} is gone): dropping its 4 devices"]
    assert said[0].exc_info is None


def test_the_driver_domain_destroyed_under_devices_being_dropped(
        host, dom0_xs, frontends, caplog) -> None:
    """The driver domain is destroyed while its backend is still dropping
    the devices libxl deleted first (their disconnect() is slow): the
    domain, its XenStore connection and its ports go under the drops.
    What could not be done is said without a traceback, the domain's end
    once, every device still ends with remove(), and stop() returns
    leaving no thread."""
    before = {t.ident for t in threading.enumerate()}
    drvdom, drv, fes = _driver_domain_backend(host, dom0_xs, frontends, ("one", "two"), (0,))
    try:
        drv.disconnect_hook = lambda _dev: drv.xenstore.connection_lost.wait(TIMEOUT)
        caplog.clear()
        # destroy_domain()'s first step on its own, so that every drop is
        # under way before the rest comes.  In one call, a device whose
        # deletion the backend gets to only once the connection is gone
        # is not dropped then: with XenStore lost it cannot tell a deleted
        # device from a live one, and keeps serving it until stop(), as
        # when the whole host goes (see the next test).
        for dev in host.toolstack.devices():
            if dev.backend_id == drvdom.domid:
                host.toolstack.destroy_device(dev)
        drv.wait(lambda: [n for n, _, _ in drv.calls].count("disconnect") == 2)
        host.destroy_domain(drvdom)
        for fe in fes:
            drv.wait_removed(fe.guest.domid)
        assert drv.devices() == []
        for fe in fes:
            fe.close()
        _stop_returns(drv)
    finally:
        drv.stop()
    assert not leaked_threads(before)
    for fe in fes:
        assert drv.calls_of(fe.guest.domid) == ["probe", "connect", "disconnect", "remove"]
    said = _backend_warnings(caplog)
    assert [r for r in said if r.exc_info] == []
    assert [r.getMessage() for r in said if r.levelno >= logging.ERROR] == []
    # How the backend learns of the end depends on when its discovery
    # (on the bus queue, still listing the deleted directories) asks
    # XenStore: between the home's deletion and the domain's, it gets
    # EACCES and says the domain is going; after, the connection's loss
    # says it.  Either way once, and never both.
    ends = [r.msg for r in said if r.msg == "XenStore connection lost: %s"
            or r.getMessage().startswith(f"xbtest backend: domain {drvdom.domid} is going away")]
    assert len(ends) == 1, ends


def test_a_deletion_met_only_once_the_connection_is_lost_is_left_to_stop(
        host, dom0_xs, frontends) -> None:
    """The driver domain is destroyed while its backend is busy with a
    device (a call of the driver's own holds its queue), so that the
    device's deletion may be met only once the XenStore connection is
    gone.  Its callbacks then fail as the connection's loss, said once
    already, and the device cannot be told from a live one: it is not
    leaked, stop() still drops it with disconnect() and remove(), and
    releases its grant and port."""
    before = {t.ident for t in threading.enumerate()}
    drvdom, drv, (fe,) = _driver_domain_backend(host, dom0_xs, frontends, ("one",), (0,))
    bdev = backend_device(drv, fe.guest.domid)
    busy = threading.Event()

    def hold() -> None:
        busy.set()
        drv.xenstore.connection_lost.wait(TIMEOUT)

    try:
        assert bdev.queue(hold)
        assert busy.wait(TIMEOUT)
        host.destroy_domain(drvdom)
        assert drv.xenstore.connection_lost.wait(TIMEOUT)
        bdev.events.flush()
        fe.close()
        _stop_returns(drv)
    finally:
        drv.stop()
    assert not leaked_threads(before)
    assert drv.calls_of(fe.guest.domid) == ["probe", "connect", "disconnect", "remove"]
    assert bdev.gone and bdev.resources == (0, 0) and drv.devices() == []


def test_the_domain_going_learnt_as_its_connection_goes_is_said_once(
        host, dom0_xs, frontends, caplog, monkeypatch) -> None:
    """A callback learns from EACCES with our home gone that our domain is
    going, but the domain and its XenStore connection go before it says so
    (it is held here, as a loaded machine may hold it): the connection's
    loss, said first, was the end already, and the domain's going is not
    said again.  Every device is still dropped."""
    lose_domain = xenbus.BackendDriver._lose_domain
    learnt, go = threading.Event(), threading.Event()

    def late(self: xenbus.BackendDriver) -> None:
        learnt.set()
        go.wait(TIMEOUT)
        lose_domain(self)

    monkeypatch.setattr(xenbus.BackendDriver, "_lose_domain", late)
    drvdom, drv, fes = _driver_domain_backend(host, dom0_xs, frontends, ("one",), (0,))
    try:
        caplog.clear()
        dom0_xs.rm(f"/local/domain/{drvdom.domid}")  # libxl's step before the last
        assert learnt.wait(TIMEOUT)
        host.destroy_domain(drvdom)
        assert eventually(lambda: any(r.msg == "XenStore connection lost: %s"
                                      for r in _backend_warnings(caplog)))
        go.set()
        for fe in fes:
            drv.wait_removed(fe.guest.domid)
        assert drv.devices() == []
        for fe in fes:
            fe.close()
        _stop_returns(drv)
    finally:
        go.set()
        drv.stop()
    said = [r.msg for r in _backend_warnings(caplog)]
    assert [m for m in said if "going away" in m or "connection lost" in m] == [
        "XenStore connection lost: %s"]



def test_a_connection_lost_in_a_run_before_says_nothing_of_this_one(
        host, dom0_xs, frontends, caplog) -> None:
    """The loss of XenStore in a run before (a driver stopped and started
    again) is not this run's end: the domain going in this run is said
    as a warning, as in a run that lost nothing."""
    drvdom, drv, fes = _driver_domain_backend(host, dom0_xs, frontends, ("one",), (0,))
    try:
        drv._xenstore_lost(ConnectionError(errno.ENOTCONN, "an earlier loss"))
        for fe in fes:
            fe.close()
        drv.stop()
        drv.start()
        caplog.clear()
        dom0_xs.rm(f"/local/domain/{drvdom.domid}")
        assert eventually(lambda: any("is going away" in r.getMessage()
                                      for r in _backend_warnings(caplog)))
    finally:
        drv.stop()


def _closed_refused_in_stop(host, dom0_xs, frontends, monkeypatch, refuse, then) -> None:
    """stop() a driver domain's backend whose Closed is refused with
    EACCES: ``refuse(drvdom, bdev)`` runs just before the switch (where no
    watch or bus callback can learn of it first: stop() has ended them),
    ``then(drvdom)`` just after it failed."""
    drvdom, drv, (fe,) = _driver_domain_backend(host, dom0_xs, frontends, ("one",), (0,))
    switch_state = xenbus.BackendDevice.switch_state
    refused: list[BaseException] = []

    def refused_then(self: xenbus.BackendDevice, state: XenbusState) -> bool:
        if state != S.CLOSED:
            return switch_state(self, state)
        refuse(drvdom, self)
        try:
            return switch_state(self, state)
        except PermissionError as exc:
            refused.append(exc)
            then(drvdom)
            raise

    monkeypatch.setattr(xenbus.BackendDevice, "switch_state", refused_then)
    try:
        fe.close()  # no frontend left to wait for the backend's Closed
        _stop_returns(drv)
    finally:
        drv.stop()
    assert refused, "Closed was not refused: the test no longer tests anything"
    assert drv.calls_of(fe.guest.domid) == ["probe", "connect", "disconnect", "remove"]


def test_closed_refused_as_the_domain_goes_the_rest_of_the_way_says_nothing_more(
        host, dom0_xs, frontends, caplog, monkeypatch) -> None:
    """libxl deletes the driver domain's home (its Closed is refused with
    EACCES), then destroys it before the backend could ask whether the
    home is gone: XenStore can no longer tell why, and the connection's
    loss, said already, was the cause.  "could not switch to Closed:
    Permission denied" said a refusal that nobody made."""
    def rm_home(drvdom, _bdev) -> None:
        dom0_xs.rm(f"/local/domain/{drvdom.domid}")

    def destroy(drvdom) -> None:
        host.destroy_domain(drvdom)
        assert eventually(lambda: any(r.msg == "XenStore connection lost: %s"
                                      for r in _backend_warnings(caplog)))

    caplog.clear()
    _closed_refused_in_stop(host, dom0_xs, frontends, monkeypatch, rm_home, destroy)
    said = [r.getMessage() for r in _backend_warnings(caplog)]
    assert [m.split(":")[0] for m in said] == ["XenStore connection lost"], said


@pytest.mark.parametrize("read_only", [False, True], ids=["taken", "read-only"])
def test_closed_refused_in_a_live_driver_domain_is_still_said(
        host, dom0_xs, frontends, caplog, monkeypatch, read_only) -> None:
    """EACCES on Closed while the backend's domain, home and connection
    live is a refusal of its own, and nothing else says it: a state left
    to us to read only, as a Closed that could not be written; one taken
    (we may not even read it), as every taking is said (see
    test_a_device_dropped_for_its_frontend_on_a_node_taken_says_the_taking_once)."""
    taken: list[str] = []

    def take_the_state_node(drvdom, bdev) -> None:
        taken.append(f"{bdev.nodename}/state")
        dom0_xs.set_perms(taken[0], ["n0", f"r{drvdom.domid}"] if read_only else ["n0"])

    caplog.clear()
    _closed_refused_in_stop(host, dom0_xs, frontends, monkeypatch, take_the_state_node,
                            lambda _drvdom: None)
    (said,) = _backend_warnings(caplog)
    assert said.msg == ("%s: could not switch to Closed: %s" if read_only else
                        "%s: its own node may not be read any more (%s): dropping the "
                        "device, writing nothing there")
    assert isinstance(said.args[1], PermissionError)  # type: ignore[index]
    assert said.args[1].filename == taken[0]  # type: ignore[index]
    assert said.exc_info is None


def _error_refused_as_the_domain_goes(host, dom0_xs, frontends, caplog, monkeypatch,
                                      report) -> list[logging.LogRecord]:
    """``report(bdev)``, error() or fatal(), in a driver domain whose
    error node is refused with EACCES as libxl deletes its home, and
    whose XenStore connection is lost, as libxl destroys the domain,
    before the backend can ask why: what xenback logged at WARNING and
    above meanwhile (the failure's own ERROR line left out)."""
    drvdom, drv, (fe,) = _driver_domain_backend(host, dom0_xs, frontends, ("one",), (0,))
    bdev = backend_device(drv, fe.guest.domid)
    xs = drv.xenstore
    write = Transaction.write
    refused: list[BaseException] = []
    told: list[bool] = []

    def refused_then(t: Transaction, path: str, value: str | int) -> None:
        if path != bdev.error_path:
            return write(t, path, value)
        dom0_xs.rm(f"/local/domain/{drvdom.domid}")
        try:
            return write(t, path, value)
        except PermissionError as exc:
            refused.append(exc)
            host.destroy_domain(drvdom)
            # on_lost, which says the loss, is the router thread's last act.
            router = xs._client.router.thread
            router.join(TIMEOUT)
            told.append(not router.is_alive() and not drv._domain_gone)
            raise

    # The error node is written in a transaction (see BackendDevice._error).
    monkeypatch.setattr(Transaction, "write", refused_then)
    # Nothing may learn of the home's deletion first, and so of the
    # domain going (see _lost_domain): discovery waits, and report()
    # runs on the device's queue.
    in_bus, release = threading.Event(), threading.Event()
    drv._bus.call(lambda: (in_bus.set(), release.wait(TIMEOUT)))
    try:
        assert in_bus.wait(TIMEOUT)
        caplog.clear()
        assert bdev.events.call(report, bdev)
        bdev.events.flush()
        said = [r for r in _backend_warnings(caplog) if r.msg != "%s: error %d: %s"]
    finally:
        release.set()
        drv.stop()
    assert refused, "the error node was not refused: the test no longer tests anything"
    assert told == [True], "the loss was not said first: the test no longer tests anything"
    return said


@pytest.mark.parametrize("report", ["error", "fatal"])
def test_an_error_node_refused_as_the_domain_goes_says_nothing_more(
        host, dom0_xs, frontends, caplog, monkeypatch, report) -> None:
    """The error node refused with EACCES as our home goes, and the
    connection lost before XenStore could tell why: the loss, said
    already, was the cause, and "could not write the error node:
    Permission denied" said a refusal that nobody made.  Nor does
    fatal()'s Closing, refused for the same loss, say more."""
    said = _error_refused_as_the_domain_goes(
        host, dom0_xs, frontends, caplog, monkeypatch,
        lambda bdev: getattr(bdev, report)(errno.EIO, "too late"))
    assert [r.getMessage().split(":")[0] for r in said] == ["XenStore connection lost"], \
        [r.getMessage() for r in said]


def _take_error_directory(dom0_xs: Any, drvdom: Any) -> str:
    """Take the driver domain's ``error`` directory from it, as a
    toolstack may (n0: it can neither read nor write there); its path."""
    errors = f"/local/domain/{drvdom.domid}/error"
    dom0_xs.write(errors, "")
    dom0_xs.set_perms(errors, ["n0"])
    return errors


def _at_first_look_again(drv: Any, bdev: Any, monkeypatch: Any,
                         action: Callable[[], None]) -> list[str]:
    """Have ``action`` happen as ``bdev``'s directory is first read
    again (a refused report's look at whether a node of ours was taken:
    see BackendDevice._taken_from_us); the list of those looks, to be
    checked after the report.

    Only once the watch events of our own switches have run: one still
    queued reads our directory too (_backend_changed), and took the
    action away from the report when the frontend saw Connected first."""
    handed_over(drv.xenstore, "look-again", base=f"/local/domain/{drv.platform.domid}/data/sync")
    drv._bus.flush()  # which may queue more for the device
    bdev.events.flush()
    plain_read = drv.xenstore.read
    looks: list[str] = []

    def read(path: str, *args: Any) -> Any:
        if path == bdev.nodename and not looks:
            looks.append(path)
            action()
        return plain_read(path, *args)

    monkeypatch.setattr(drv.xenstore, "read", read)
    return looks


def test_an_error_node_refused_in_a_live_driver_domain_is_still_said(
        host, dom0_xs, frontends, caplog) -> None:
    """EACCES on the error node while the backend's domain, home and
    connection live is a refusal of its own, and nothing else says it;
    the device still goes Closing."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        _take_error_directory(dom0_xs, drvdom)
        caplog.clear()
        bdev.fatal(errno.EIO, "refused")
        fe.wait_backend(S.CLOSING)
        (unwritten,) = [r for r in _backend_warnings(caplog) if r.msg != "%s: error %d: %s"]
        assert unwritten.msg == "%s: could not write the error node: %s"
        assert isinstance(unwritten.args[1], PermissionError)  # type: ignore[index]
        assert unwritten.exc_info is None


def test_eacces_in_a_live_driver_domain_is_still_an_error(host, dom0_xs, frontends, caplog) -> None:
    """EACCES while the backend's domain and home live is a refusal, not
    the domain's end: the device it hit fails as ever (error node, Closing),
    from a queued call too, which is logged with its traceback, while the
    other devices go on being served."""
    drvdom, drv, fes = _driver_domain_backend(host, dom0_xs, frontends, ("hider", "other"), (0,))
    hider, other = fes
    try:
        caplog.clear()
        # The guest takes the backend's right to read its ring-ref away.
        hider.xs.set_perms(f"{hider.path}/ring-ref", [f"n{hider.guest.domid}"])
        bdev = backend_device(drv, hider.guest.domid)
        assert bdev.queue(bdev.read_otherend, "ring-ref")
        hider.wait_backend(S.CLOSING)
        bdev.events.flush()
        (failed,) = [r for r in caplog.records if r.exc_info is not None]
        assert failed.levelno == logging.ERROR and failed.exc_info is not None
        assert isinstance(failed.exc_info[1], PermissionError)
        error = dom0_xs.read(f"/local/domain/{drvdom.domid}/error/backend/xbtest/"
                             f"{hider.guest.domid}/0/error")
        assert error == (f"{errno.EACCES} call BackendDevice.read_otherend: "
                         f"Permission denied: {hider.path}/ring-ref")
        # Reconnecting needs the ring-ref: connect() fails on it.
        hider.set_state(S.CLOSED)
        hider.wait_backend(S.CLOSED)
        hider.set_state(S.INITIALISING)
        hider.wait_backend(S.INIT_WAIT)
        hider.set_state(S.INITIALISED)
        hider.wait_backend(S.CLOSING)
        error = dom0_xs.read(f"/local/domain/{drvdom.domid}/error/backend/xbtest/"
                             f"{hider.guest.domid}/0/error")
        assert error is not None and error.startswith(f"{errno.EACCES} connecting: ")
        assert not [r for r in caplog.records if "going away" in r.getMessage()]
        assert len(drv.devices()) == 2
        other.set_state(S.CLOSING)  # still served
        other.wait_backend(S.CLOSING)
    finally:
        drv.stop()


def test_a_probe_failing_on_its_deleted_directory_reports_nothing(
        host, driver, frontends, dom0_xs) -> None:
    """The toolstack deleted the device while probe() ran, and probe()'s
    write failed for that: the device is dropped, and no error node is
    left for a device that is no more."""
    entered, release = threading.Event(), threading.Event()

    def hook(dev) -> None:
        entered.set()
        release.wait(TIMEOUT)
        dev.write("feature-late", 1)  # FileNotFoundError: the directory is gone

    driver.probe_hook = hook
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    assert entered.wait(TIMEOUT)
    host.toolstack.destroy_device(dev)
    release.set()
    driver.wait_removed(guest.domid)
    assert driver.devices() == []
    assert error_node(dom0_xs, dev) is None
    assert not dom0_xs.exists(dev.backend_path)


@pytest.mark.parametrize("busy_in", ["probe", "connect"])
def test_removal_while_probe_or_connect_runs_is_not_overwritten(
        host, driver, frontends, dom0_xs, caplog, busy_in: str) -> None:
    """libxl writes online=0 and Closing while the backend is still in
    probe() or connect(): the InitWait or Connected that follows must not
    overwrite Closing, or libxl waits its whole timeout for a Closed that
    only comes once a frontend happens to close."""
    census = Census(host, driver)
    entered, release = threading.Event(), threading.Event()

    def hold(_dev) -> None:
        entered.set()
        assert release.wait(TIMEOUT)

    if busy_in == "probe":
        # The guest has not loaded its frontend driver (yet).
        driver.probe_hook = hold
        guest = host.create_domain("guest")
        dev = host.toolstack.add_device("xbtest", guest.domid)
        fe = frontends(guest, dev)
    else:
        driver.connect_hook = hold
        guest, dev, fe = _at_init_wait(host, frontends)
        fe.publish()
    assert entered.wait(TIMEOUT)
    bdev = backend_device(driver, guest.domid)
    removed: list[bool] = []
    remover = threading.Thread(
        target=lambda: removed.append(host.toolstack.remove_device(dev, timeout=TIMEOUT)))
    remover.start()
    dom0_xs.wait_for(f"{dev.backend_path}/online", "0", timeout=TIMEOUT)
    release.set()
    if busy_in == "connect":
        bdev.events.flush()  # connect() returned, and the toolstack's events ran
        assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSING))
        assert bdev.resources == (1, 1)  # until the frontend closes
        fe.set_state(S.CLOSED)
    remover.join(2 * TIMEOUT)
    assert removed == [True]
    assert not [r for r in caplog.records if "did not close" in r.getMessage()]
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert bdev.gone and driver.devices() == []
    fe.close()
    census.check()


def test_a_frontend_flooding_its_state_queues_one_event(host, driver, frontends) -> None:
    """A frontend may rewrite its ``state`` as fast as XenStore lets it:
    each write fires the backend's watch.  While one event waits in the
    device's queue, the next ones are dropped (XSA-349, Linux's
    frontend_will_handle()): the waiting one reads the newest state
    anyway, and the queue cannot grow without bound."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    # The events of the connection (the frontend's publish fires one per
    # node it wrote) are over before counting: one still on its way would
    # run ahead of the blocker and count the frontend's state before the
    # flood.
    handed_over(driver.xenstore, "connected")
    bdev.events.flush()
    seen: list[S] = []
    handle = driver.frontend_changed

    def count(d, state) -> None:
        seen.append(state)
        handle(d, state)

    driver.frontend_changed = count  # type: ignore[method-assign]
    entered, release = threading.Event(), threading.Event()
    # The flood's 200 writes may take seconds on a loaded machine: the
    # blocker must outlast them (a blocker that gave up would let events
    # through one by one), and says so if it did not.
    released: list[bool] = []
    bdev.queue(lambda: (entered.set(), released.append(release.wait(6 * TIMEOUT))))
    try:
        assert entered.wait(TIMEOUT)
        for _ in range(100):
            fe.set_state(S.INITIALISED)
            fe.set_state(S.CONNECTED)
        handed_over(driver.xenstore, "flood")  # every event reached the queue
    finally:
        release.set()
    bdev.events.flush()
    assert released == [True], "the flood outlasted the blocked queue"
    assert seen == [S.CONNECTED]
    assert driver.calls_of(guest.domid) == ["probe", "connect"]
    # Events after the one that ran are handled as ever.
    fe.set_state(S.CLOSING)
    fe.wait_backend(S.CLOSING)
    assert bdev.resources == (0, 0)


def test_a_stop_interrupted_in_its_wait_can_be_finished_by_another(host, driver, frontends) -> None:
    """Ctrl-C while stop() waits for a device's queue (its disconnect hook
    still runs): a later stop() must do what is left, not return at once
    with the devices, threads and XenStore connection still there."""
    guest, _dev, fe = connected(host, frontends)
    release = threading.Event()
    driver.disconnect_hook = lambda dev: release.wait(TIMEOUT)

    def main_waits() -> bool:
        return main_thread_in("sleep_on", path="/workqueue/")

    try:
        interrupt(main_waits, driver.stop)
    finally:
        release.set()
    driver.stop()
    assert driver.devices() == [] and driver._xs is None
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]


def test_a_drop_that_stop_queued_and_that_did_not_finish_is_done_by_stop(
        host, frontends, dom0_xs) -> None:
    """A device whose drop, queued by stop(), ended early (its driver's
    disconnect() raised SystemExit, which the hooks' handling leaves
    alone, and the worker only logs) is still there once its queue is
    closed: stop() drops it itself, or it would outlive the driver, its
    Closed never written and remove() never called.  Its ports went
    with the dispatcher, which stop() closes: none is made anew to
    unbind them, whose thread nobody would stop."""
    before = {t.ident for t in threading.enumerate()}
    drv = RecordingDriver(host.dom0)
    drv.start()
    try:
        guest, dev, _fe = connected(host, frontends)
        bdev = backend_device(drv, guest.domid)

        def exits(_dev: Any) -> None:
            drv.disconnect_hook = None  # once
            raise SystemExit("disconnect() exits")

        drv.disconnect_hook = exits
    finally:
        drv.stop()
    assert drv.devices() == [] and bdev.gone and bdev.resources == (0, 0)
    assert drv.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]
    # remove() ran on stop()'s thread: the device's queue was closed.
    assert drv.unordered == [f"remove of {bdev.nodename}"]
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSED))
    assert "xbtest-events" not in leaked_threads(before)  # the frontend's run on


@pytest.mark.parametrize("was", [S.CONNECTED, S.CLOSING])
def test_a_frontend_restarting_without_closing_can_connect_again(
        host, driver, frontends, dom0_xs, was: S) -> None:
    """A frontend that crashed, was kexec'd or had its driver reloaded
    writes Initialising without going through Closed.  The backend must
    drop its stale connection and offer InitWait again (as pvcalls-back's
    and netback's set_backend_state do), or the new frontend waits for an
    InitWait that never comes while the old ring stays mapped."""
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    if was == S.CLOSING:
        fe.set_state(S.CLOSING)
        fe.wait_backend(S.CLOSING)
    old = fe.pages
    fe.set_state(S.INITIALISING)
    fe.wait_backend(S.INIT_WAIT)
    assert bdev.resources == (0, 0)
    old.unshare()  # nobody maps the old ring any more: its grant goes
    fe.pages = None
    fe.publish()  # a fresh ring and port
    fe.wait_backend(S.CONNECTED)
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "connect"]
    assert bdev.resources == (1, 1)
    assert error_node(dom0_xs, dev) is None
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)
    fe.close()
    census.check()


def test_a_frontend_restarting_during_removal_lets_the_toolstack_go(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """The toolstack asked for removal (online=0, Closing) and the frontend
    restarts instead of closing: a frontend in Initialising has nothing to
    close, so the device goes Closed at once, as when the toolstack finds
    the frontend in Initialising; libxl must not wait out its timeout."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    removed: list[bool] = []
    remover = threading.Thread(
        target=lambda: removed.append(host.toolstack.remove_device(dev, timeout=TIMEOUT)))
    remover.start()
    fe.wait_backend(S.CLOSING)
    dom0_xs.wait_for(f"{dev.backend_path}/online", "0", timeout=TIMEOUT)
    # The backend has seen the toolstack's writes (and kept waiting for
    # the connected frontend) before the frontend restarts.
    handed_over(driver.xenstore, "removing")
    bdev.events.flush()
    assert bdev.resources == (1, 1)
    fe.set_state(S.INITIALISING)
    remover.join(2 * TIMEOUT)
    assert removed == [True]
    assert not [r for r in caplog.records if "did not close" in r.getMessage()]
    driver.wait_call("remove", guest.domid)
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]


def test_a_frontend_changed_that_raises_fails_the_device(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """frontend_changed() may be overridden to extend the table; whatever
    it raises (or a XenStore error under it) fails the device as
    xenbus_dev_fatal does: an error node and Closing, not a traceback in
    the log with the device left where it was and the frontend waiting."""
    census = Census(host, driver)
    handle = driver.frontend_changed

    def extended(d, state) -> None:
        if state == S.INITIALISED:
            raise LookupError("no queue for this frontend")
        handle(d, state)

    driver.frontend_changed = extended  # type: ignore[method-assign]
    guest, dev, fe = _at_init_wait(host, frontends, "bad")
    fe.publish()
    fe.wait_backend(S.CLOSING)
    assert error_node(dom0_xs, dev) == (
        f"{errno.EIO} frontend state 3: LookupError: no queue for this frontend")
    assert _failed_without_tracebacks(caplog, driver, guest.domid) == []
    fe.set_state(S.CLOSED)  # and the device still closes
    fe.wait_backend(S.CLOSED)
    assert driver.calls_of(guest.domid) == ["probe"]
    fe.close()
    census.check()


def test_a_frontend_changed_that_raises_after_dropping_the_device(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """An extension that raises after the base class dropped the device
    (frontend Closed, online=0): the Closed written stays, or the toolstack
    waits for it in vain.  The failure is still the driver's bug, said as
    an error: the directory is there, and was never made again."""
    handle = driver.frontend_changed

    def extended(d, state) -> None:
        handle(d, state)
        if state == S.CLOSED:
            raise LookupError("no queue for this frontend")

    driver.frontend_changed = extended  # type: ignore[method-assign]
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    dom0_xs.write(f"{dev.backend_path}/online", 0)
    fe.set_state(S.CLOSED)
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert bdev.gone
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSED))
    assert error_node(dom0_xs, dev) is None
    said = [r for r in caplog.records if "no queue for this frontend" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.ERROR]


@pytest.mark.parametrize("left", [S.INIT_WAIT, S.INITIALISED, S.CONNECTED, S.CLOSING, S.CLOSED])
def test_a_device_an_earlier_backend_left_is_taken_over(
        host, frontends, dom0_xs, left: S) -> None:
    """The backend was restarted (stopped: it left Closed; killed: it left
    whatever state it was in) while the guest kept its device.  The new
    backend must serve it: a frontend at InitWait connects, one that was
    connected is told to close (the old connection's state is gone), and
    after Closed the frontend can connect again.  A backend that only
    probes Initialising devices ignores it, and the guest waits forever."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = frontends(guest, dev)
    # What the earlier backend and the frontend left in XenStore.
    dom0_xs.write(f"{dev.backend_path}/state", int(left))
    if left in (S.INITIALISED, S.CONNECTED):  # mid-connect, or connected
        fe.publish(state=left)
    elif left in (S.CLOSING, S.CLOSED):
        fe.set_state(left)
    drv = RecordingDriver(host.dom0)
    with drv:
        if left in (S.INITIALISED, S.CONNECTED):
            fe.wait_backend(S.CLOSING)
            fe.set_state(S.CLOSED)
            fe.wait_backend(S.CLOSED)
        elif left == S.CLOSING:
            fe.set_state(S.CLOSED)
            fe.wait_backend(S.CLOSED)
        if left != S.INIT_WAIT:
            fe.set_state(S.INITIALISING)  # reconnect after Closed
            fe.wait_backend(S.INIT_WAIT)
        fe.publish()
        fe.wait_backend(S.CONNECTED)
        bdev = backend_device(drv, guest.domid)
        assert bdev.resources == (1, 1)
        assert error_node(dom0_xs, dev) is None
        fe.set_state(S.CLOSED)
        fe.wait_backend(S.CLOSED)
        assert bdev.resources == (0, 0)
    assert drv.calls_of(guest.domid)[:2] == ["probe", "connect"]


def test_a_frontend_still_connected_to_a_stopped_backend_is_not_reconnected_as_it_is(
        host, frontends, dom0_xs) -> None:
    """stop() leaves Closed, and the next backend may start before the
    frontend has seen it: the frontend is still Connected, its ring still
    holds the earlier backend's indexes.  Connecting to it as a new ring
    (index 0) replays every request the earlier backend answered, so the
    new backend must not connect until the frontend starts again; it tells
    the frontend to close, as it does a killed backend's connection."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = frontends(guest, dev)
    first = RecordingDriver(host.dom0)
    with first:
        fe.wait_backend(S.INIT_WAIT)
        fe.publish(state=S.CONNECTED)
        fe.wait_backend(S.CONNECTED)
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSED))
    second = RecordingDriver(host.dom0)
    with second:
        fe.wait_backend(S.CLOSING)
        assert second.calls_of(guest.domid) == ["probe"]
        fe.set_state(S.CLOSED)
        fe.wait_backend(S.CLOSED)
        fe.set_state(S.INITIALISING)
        fe.wait_backend(S.INIT_WAIT)
        fe.publish()
        fe.wait_backend(S.CONNECTED)
        assert second.calls_of(guest.domid)[:2] == ["probe", "connect"]
        assert error_node(dom0_xs, dev) is None


def _remove_in_background(host, dev, *, destroy: bool) -> tuple[threading.Thread, list[bool]]:
    """The toolstack's removal of ``dev`` (``destroy``: as its domain's
    destruction does, the frontend directory deleted first) on a thread of
    its own, as libxl's wait runs: ``(thread, [closed in time])``."""
    closed: list[bool] = []

    def remove() -> None:
        if destroy:
            closed.append(host.toolstack.destroy_devices(dev.frontend_id, timeout=TIMEOUT) == [])
        else:
            closed.append(host.toolstack.remove_device(dev, timeout=TIMEOUT))

    remover = threading.Thread(target=remove)
    remover.start()
    return remover, closed


@pytest.mark.parametrize("why", ["frontend gone", "probe raises"])
def test_a_removal_asked_before_start_is_answered_when_the_probe_fails(
        host, frontends, dom0_xs, caplog, why: str) -> None:
    """The toolstack removes a device (online=0, Closing) while no backend
    runs, between a stop and the next start, and libxl waits for Closed.
    The next backend takes the device over at start, and its probe fails:
    the frontend's directory is gone (the guest is being destroyed), or
    probe() raised.  The failure leaves Closing and no watch on the
    frontend, and the removal's writes came before the backend looked, so
    no event follows: unless the probe's end looks at the removal, libxl
    waits its whole timeout for a device that holds nothing."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    remover, closed = _remove_in_background(host, dev, destroy=why == "frontend gone")
    dom0_xs.wait_for(f"{dev.backend_path}/state", str(int(S.CLOSING)), timeout=TIMEOUT)
    drv = RecordingDriver(host.dom0)
    probed: list[int] = []
    if why == "probe raises":
        def fail(bdev) -> None:
            # Before writing anything: a write into the device's directory
            # would fire the backend's watch, and that event would look
            # at the removal.
            probed.append(bdev.frontend_id)
            raise OSError(errno.ENOMEM, "injected")

        drv.probe = fail  # type: ignore[method-assign]
    with drv:
        remover.join(2 * TIMEOUT)
        assert closed == [True]
        drv.wait(lambda: drv.devices() == [])
    assert not [r for r in caplog.records if "did not close" in r.getMessage()]
    assert probed == ([] if why == "frontend gone" else [guest.domid])


@pytest.mark.parametrize("why", ["frontend gone", "probe raises"])
def test_a_failed_probe_answers_a_removal_with_its_error_then_closed_for_good(
        host, frontends, dom0_xs, why: str) -> None:
    """As above, but the toolstack looks before it deletes anything: the
    error node must be there when it sees Closed (the failure is what it
    would report), and Closed must be the last word.  The failure's own
    Closing, written after the removal was answered, would replace it:
    a Closed already read stays, but a toolstack that reads the state
    again (or a frontend) would see a device that is failing anew."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    base = dev.backend_path
    if why == "frontend gone":
        dom0_xs.rm(dev.frontend_path)
    # libxl__initiate_device_generic_remove's transaction, nobody serving.
    dom0_xs.transaction(lambda t: (t.write(f"{base}/online", 0), t.write(f"{base}/state", 5)))
    drv = RecordingDriver(host.dom0)
    if why == "probe raises":
        def fail(_bdev) -> None:
            raise OSError(errno.ENOMEM, "injected")

        drv.probe_hook = fail
    with drv:
        dom0_xs.wait_for(f"{base}/state", str(int(S.CLOSED)), timeout=TIMEOUT)
        error = error_node(dom0_xs, dev)
        drv.wait(lambda: drv.devices() == [])
    # stop() waited for the workqueue: what the failure had left to do is done.
    expected = errno.ENOENT if why == "frontend gone" else errno.ENOMEM
    assert error is not None and error.startswith(f"{expected} probing: ")
    assert dom0_xs.read(f"{base}/state") == str(int(S.CLOSED))
    assert error_node(dom0_xs, dev) == error
    # remove() undoes a probe() that ran, even one that raised.
    assert drv.calls_of(guest.domid) == ([] if why == "frontend gone" else ["probe", "remove"])


def test_a_directory_without_state_found_at_start_is_not_taken_over(
        host, frontends, dom0_xs) -> None:
    """At start, a device in any state is an earlier backend's, but a
    directory with no ``state`` at all is no device (libxl writes it with
    the rest): nothing is probed, and nothing written into it."""
    guest = host.create_domain("guest")
    base = f"/local/domain/0/backend/xbtest/{guest.domid}/0"
    dom0_xs.transaction(lambda t: (
        t.write(f"{base}/frontend", f"/local/domain/{guest.domid}/device/xbtest/0"),
        t.write(f"{base}/frontend-id", guest.domid)))
    drv = RecordingDriver(host.dom0)
    with drv:
        # The watch's first event is on the bus, then its listing is done.
        handed_over(drv.xenstore, "stateless")
        assert drv._bus is not None
        drv._bus.flush()
        assert drv.devices() == []
    assert dom0_xs.read(f"{base}/state") is None
    assert drv.calls_of(guest.domid) == []


def test_a_removal_of_a_device_whose_frontend_never_started_is_answered(
        host, driver, dom0_xs) -> None:
    """The guest never loaded its frontend driver (Initialising) when the
    toolstack removes the device, waiting in InitWait: there is nothing to
    close, and the frontend's state will not change to say so."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    dom0_xs.wait_for(f"{dev.backend_path}/state", str(int(S.INIT_WAIT)), timeout=TIMEOUT)
    # The probe is over (its watch on the frontend set), and that watch's
    # first event ran: from now on only the removal can answer itself.
    bdev = backend_device(driver, guest.domid)
    bdev.events.flush()
    handed_over(driver.xenstore, "never-started")
    bdev.events.flush()
    assert host.toolstack.remove_device(dev, timeout=TIMEOUT)
    driver.wait_removed(guest.domid)
    assert driver.devices() == []


def test_a_device_whose_frontend_watch_failed_is_removed_with_its_probe_undone(
        host, driver, frontends, dom0_xs, monkeypatch) -> None:
    """probe() succeeded and the device went InitWait, but the watch on the
    frontend's state could not be set (XenStore's watch quota, say): the
    device fails, hearing nothing from the frontend, which may go on to
    publish its ring.  A removal must not wait for a frontend Closed the
    device cannot hear, and remove() must undo the probe() that ran."""
    guest = host.create_domain("guest")
    watch = driver.xenstore.watch

    def refuse(path: str, *args: Any, **kwargs: Any) -> Any:
        if path.startswith(f"/local/domain/{guest.domid}/"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return watch(path, *args, **kwargs)

    monkeypatch.setattr(driver.xenstore, "watch", refuse)
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = frontends(guest, dev)
    fe.wait_backend(S.CLOSING)
    error = error_node(dom0_xs, dev)
    assert error is not None and error.startswith(f"{errno.ENOSPC} probing: ")
    fe.publish()  # it had seen InitWait
    assert host.toolstack.remove_device(dev, timeout=TIMEOUT)
    driver.wait_call("remove", guest.domid)
    assert driver.calls_of(guest.domid) == ["probe", "remove"]


@pytest.mark.parametrize("frontend", ["gone", "closed"])
def test_a_removal_an_earlier_backend_answered_is_left_alone_at_start(
        host, frontends, dom0_xs, frontend: str) -> None:
    """An earlier backend answered a removal (online=0, Closed) and was
    stopped before the toolstack deleted the device, which it does next.
    The device is done with: taken over, its probe would fail (a dying
    domain's frontend directory goes first), and the failure would put an
    error node and Closing over the Closed the toolstack may read again."""
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    base = dev.backend_path
    if frontend == "gone":
        dom0_xs.rm(dev.frontend_path)
    else:
        dom0_xs.write(f"{dev.frontend_path}/state", int(S.CLOSED))
    dom0_xs.transaction(lambda t: (t.write(f"{base}/online", 0), t.write(f"{base}/state", 6)))
    drv = RecordingDriver(host.dom0)
    with drv:
        # The watch's first event is on the bus, then the listing it makes
        # is done (a device it took over has its probe queued).
        handed_over(drv.xenstore, "earlier-answered")
        assert drv._bus is not None
        drv._bus.flush()
        drv.wait(lambda: drv.devices() == [])
    # stop() waited for the workqueue: anything a device had left is done.
    assert dom0_xs.read(f"{base}/state") == str(int(S.CLOSED))
    assert error_node(dom0_xs, dev) is None
    assert drv.calls_of(guest.domid) == []


def test_a_device_whose_probe_failed_lets_a_removal_go_whatever_its_frontend_says(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """A failed probe leaves the device Closing with no watch on its
    frontend: it connected nothing, and it cannot hear the frontend's
    state change.  The guest is still Closing (about to write Closed, as
    a Linux frontend answers a backend's Closing, or never) when the
    toolstack removes the device: waiting for a Closed the backend would
    never see makes libxl wait its whole timeout."""
    def fail(_dev) -> None:
        raise OSError(errno.ENOMEM, "injected")

    driver.probe_hook = fail
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = frontends(guest, dev)
    fe.wait_backend(S.CLOSING)
    fe.set_state(S.CLOSING)
    bdev = backend_device(driver, guest.domid)
    remover, closed = _remove_in_background(host, dev, destroy=False)
    remover.join(2 * TIMEOUT)
    assert closed == [True]
    assert not [r for r in caplog.records if "did not close" in r.getMessage()]
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert bdev.gone and driver.devices() == []


@pytest.mark.parametrize("hook", ["probe", "connect"])
def test_stop_from_a_driver_callback_is_refused_before_it_does_anything(
        host, driver, frontends, hook) -> None:
    """stop() waits for every device's queue, its own included: called from
    a callback, it used to unwatch, drop devices and close handles, then
    fail at the workqueue's shutdown, leaving a half-stopped driver.  It
    is refused before it touches anything, and the driver goes on."""
    refused: list[BaseException] = []

    def stop_from_callback(_dev) -> None:
        try:
            driver.stop()
        except RuntimeError as exc:
            refused.append(exc)

    setattr(driver, f"{hook}_hook", stop_from_callback)
    guest, dev, fe = connected(host, frontends)
    assert len(refused) == 1
    assert "stop() from a callback of RecordingDriver" in str(refused[0])
    assert driver.calls_of(guest.domid) == ["probe", "connect"]
    # Still serving: a second device comes and connects.
    connected(host, frontends, name="guest2")


class _Stopper:
    """A callback (of a work item, a port, anything) that calls
    ``driver.stop()``: what that met, ``"stopped"`` or the exception, in
    ``outcome``; ``ran`` set once it returned."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.outcome: list[object] = []
        self.ran = threading.Event()

    def __call__(self, *_args: object) -> None:
        try:
            self.driver.stop()
            self.outcome.append("stopped")
        except Exception as exc:
            self.outcome.append(exc)
        finally:
            self.ran.set()

    def refused(self) -> bool:
        """Whether it returned, stop() refused as one from a callback."""
        assert self.ran.wait(TIMEOUT)
        (met,) = self.outcome
        return (isinstance(met, RuntimeError)
                and "stop() from a callback of RecordingDriver" in str(met))


@pytest.mark.parametrize("where", ["device work", "port callback"])
def test_stop_from_a_device_work_or_port_callback_is_refused(
        host, driver, frontends, where) -> None:
    """A driver's own DeviceWork and the callback of a port it bound run
    for a device too: stop() there waited for ever, the device's drop
    waiting (disconnect()'s disable_sync, the port's unbind) for the very
    item or callback that called it.  Refused before it does anything, as
    from a xenbus callback, and the driver goes on serving."""
    stop_here = _Stopper(driver)
    guest, _dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    if where == "device work":
        work = xenbus.DeviceWork(bdev, stop_here)
        # As a driver's disconnect() stops its device's work (both examples).
        driver.disconnect_hook = lambda _dev: work.disable_sync()
        driver.workqueue.queue_work(work)
    else:
        driver.event_hook = stop_here
        fe.evtchn.notify(fe.port)
    assert stop_here.refused()
    connected(host, frontends, name="guest2")


@pytest.mark.parametrize("where", ["another driver's device work", "another workqueue's work"])
def test_stop_from_a_work_that_is_none_of_its_devices_stops_it(
        host, driver, frontends, where) -> None:
    """Only the driver's own devices' work waits for itself in stop(): a
    DeviceWork of another driver's device, or a plain Work on a workqueue
    not the driver's, stops it as any other thread does."""
    stop_here = _Stopper(driver)
    guest, _dev, _fe = connected(host, frontends)
    with contextlib.ExitStack() as stack:
        if where == "another driver's device work":
            class OtherDriver(RecordingDriver):
                device_type = "xbother"

            other = OtherDriver(host.dom0)
            other.start()
            stack.callback(other.stop)
            other_guest = host.create_domain("other")
            host.toolstack.add_device("xbother", other_guest.domid)
            other.wait_call("probe", other_guest.domid)
            other.workqueue.queue_work(
                xenbus.DeviceWork(backend_device(other, other_guest.domid), stop_here))
        else:
            wq = alloc_workqueue("not-the-driver-s", WQ_UNBOUND)
            stack.callback(wq.destroy)
            wq.queue_work(Work(stop_here))
        assert stop_here.ran.wait(TIMEOUT)
    assert stop_here.outcome == ["stopped"]
    assert driver.calls_of(guest.domid)[-1] == "remove"


def _goes_on_serving(drv: RecordingDriver, host: Any, frontends: Any, dom0_xs: Any,
                     guest: Any, dev: Any) -> None:
    """A stop() refused left ``drv`` serving: ``guest``'s device ``dev``
    still connected, never disconnected, and a new guest's connects."""
    assert drv.calls_of(guest.domid) == ["probe", "connect"]
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CONNECTED))
    connected(host, frontends, name="guest2")


@contextlib.contextmanager
def _driver_given(host: Any, wq: Any) -> Iterator[RecordingDriver]:
    """A driver given the workqueue ``wq``, started, then stopped, and
    ``wq`` destroyed after it (a workqueue passed in is the caller's)."""
    drv = RecordingDriver(host.dom0, workqueue=wq)
    try:
        drv.start()
        try:
            yield drv
        finally:
            drv.stop()
    finally:
        wq.destroy()


def test_stop_from_a_work_on_the_driver_s_own_workqueue_is_refused_before_it_does_anything(
        host, driver, frontends, dom0_xs) -> None:
    """A plain Work the driver's author queues on the workqueue the driver
    made (and destroys in stop()): stop() there got as far as the
    workqueue's shutdown, which cannot wait for the item running it,
    with the devices dropped and the handles closed already.  Refused
    before it does anything, and the driver goes on serving."""
    stop_here = _Stopper(driver)
    guest, dev, _fe = connected(host, frontends)
    driver.workqueue.queue_work(Work(stop_here))
    assert stop_here.refused()
    _goes_on_serving(driver, host, frontends, dom0_xs, guest, dev)


def test_stop_from_a_work_on_a_workqueue_the_driver_was_given_stops_it(
        host, frontends) -> None:
    """A workqueue passed in is the caller's: stop() leaves it running,
    so nothing in it waits for the item that calls it, which stops the
    driver as any thread does."""
    wq = alloc_workqueue("given", WQ_UNBOUND)
    with _driver_given(host, wq) as drv:
        stop_here = _Stopper(drv)
        guest, _dev, _fe = connected(host, frontends)
        wq.queue_work(Work(stop_here))
        assert stop_here.ran.wait(TIMEOUT)
    assert stop_here.outcome == ["stopped"]
    assert drv.calls_of(guest.domid)[-1] == "remove"


def test_stop_on_a_workqueue_it_was_given_waits_for_a_discovery_under_way(
        host, caplog, monkeypatch) -> None:
    """A workqueue passed in goes on running after stop(), which does
    not shut it down: a look at a new device under way on the bus as
    stop() begins is waited for, or it ran on after stop() returned,
    on a connection stop() closed."""
    wq = alloc_workqueue("given", WQ_UNBOUND)
    with _driver_given(host, wq) as drv:
        assert drv._bus is not None
        bus_close = drv._bus.close
        check_device = drv._check_device
        entered, release = threading.Event(), threading.Event()
        running: list[int] = []
        at_close: list[int] = []

        def looking(*args: Any, **kwargs: Any) -> None:
            running.append(1)
            try:
                if not entered.is_set():
                    entered.set()
                    assert release.wait(TIMEOUT)
                check_device(*args, **kwargs)
            finally:
                running.pop()

        def closing(*, wait: bool = True) -> None:
            release.set()
            bus_close(wait=wait)
            at_close.append(len(running))

        monkeypatch.setattr(drv, "_check_device", looking)
        monkeypatch.setattr(drv._bus, "close", closing)
        guest = host.create_domain("guest")
        host.toolstack.add_device("xbtest", guest.domid)
        assert entered.wait(TIMEOUT)
        drv.stop()
        assert at_close == [0]
        assert drv.calls_of(guest.domid) == []  # stopping: not probed
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("hook", ["probe", "connect"])
def test_stop_from_a_driver_callback_on_a_workqueue_it_was_given_is_refused(
        host, frontends, dom0_xs, hook) -> None:
    """A workqueue passed in that runs many items at once lets a plain
    work item of its stop the driver, but not a device's xenbus callback
    run there: the device's drop waits for its queue, the caller's.
    Refused before it does anything, as on the workqueue the driver
    made, and the driver goes on serving."""
    wq = alloc_workqueue("given", WQ_UNBOUND)
    with _driver_given(host, wq) as drv:
        stop_here = _Stopper(drv)
        setattr(drv, f"{hook}_hook", stop_here)
        guest, dev, _fe = connected(host, frontends)
        assert stop_here.refused()
        setattr(drv, f"{hook}_hook", None)
        _goes_on_serving(drv, host, frontends, dom0_xs, guest, dev)


@pytest.mark.parametrize("make", [
    lambda: alloc_ordered_workqueue("given-ordered"),
    lambda: alloc_workqueue("given-one", WQ_UNBOUND, 1),
], ids=["ordered", "max_active-1"])
def test_stop_from_a_work_on_a_one_at_a_time_workqueue_it_was_given_is_refused(
        host, frontends, dom0_xs, make) -> None:
    """A workqueue passed in that runs one item at a time: stop() would
    wait for the drops it queues on its devices' queues, behind the item
    that calls it, which never returns (it hung).  Refused up front, as
    on a workqueue the driver made, and the driver goes on serving."""
    wq = make()
    with _driver_given(host, wq) as drv:
        stop_here = _Stopper(drv)
        guest, dev, _fe = connected(host, frontends)
        wq.queue_work(Work(stop_here))
        assert stop_here.refused()
        _goes_on_serving(drv, host, frontends, dom0_xs, guest, dev)
    assert drv.calls_of(guest.domid)[-1] == "remove"


def _no_workers_on(monkeypatch: Any, topology: Topology) -> None:
    """No worker thread can be made for the pools of ``topology`` (as
    when the host runs out of threads): its workqueues' items run on
    their rescuers.  The other pools of the process make theirs."""
    create_worker, start_thread = wq_pool.create_worker, wq_pool._start_thread
    refusing = threading.local()

    def create(pool: Any) -> bool:
        refusing.on = pool.pset.topology is topology
        try:
            return create_worker(pool)
        finally:
            refusing.on = False

    def start(target: Any, name: str) -> threading.Thread:
        if getattr(refusing, "on", False):
            raise RuntimeError("can't start new thread")
        return start_thread(target, name)

    monkeypatch.setattr(wq_pool, "create_worker", create)
    monkeypatch.setattr(wq_pool, "_start_thread", start)


@pytest.mark.parametrize("runner", ["a worker", "its rescuer"])
def test_stop_from_a_work_on_a_reclaim_workqueue_it_was_given_is_refused(
        host, frontends, dom0_xs, monkeypatch, runner) -> None:
    """A WQ_MEM_RECLAIM workqueue passed in runs an item on its rescuer
    when no worker thread can be made, and the rescuer runs one item at a
    time: stop() there would wait for the drops it queues on its devices'
    queues, which need a worker that cannot be made, or the rescuer, busy
    with the caller (and those it took with the caller run only after
    it): it hung.  Refused up front, whichever thread runs the item, so
    that the mistake shows every time, not only when threads run out (as
    lockdep reports a dependency, not the deadlock); the driver goes on
    serving."""
    topology = Topology(1)
    if runner == "its rescuer":
        _no_workers_on(monkeypatch, topology)  # every item of the driver's: the rescuer's
    wq = alloc_workqueue("given-reclaim", WQ_MEM_RECLAIM, topology=topology)
    names: list[str] = []
    with _driver_given(host, wq) as drv:
        stop_here = _Stopper(drv)
        guest, dev, _fe = connected(host, frontends)
        wq.queue_work(Work(lambda w: (names.append(threading.current_thread().name),
                                      stop_here())))
        assert stop_here.refused(), (names, stop_here.outcome)
        assert (names[0] == "given-reclaim-rescuer") is (runner == "its rescuer"), names
        _goes_on_serving(drv, host, frontends, dom0_xs, guest, dev)
    assert drv.calls_of(guest.domid)[-1] == "remove"


def test_stop_while_another_has_let_go_of_the_workqueue_waits_for_it(
        host, frontends, monkeypatch) -> None:
    """A stop() called outside any work item while another thread's has
    destroyed the driver's workqueue and not yet finished: no workqueue
    is what current_workqueue() says there too, which is no item of
    ours.  It waits for that stop() and returns, not refused."""
    drv = RecordingDriver(host.dom0)
    drv.start()
    connected(host, frontends)
    in_close, go, waiting = threading.Event(), threading.Event(), threading.Event()
    xs = drv.xenstore
    real_close = xs.close

    def held_close() -> None:
        in_close.set()
        assert go.wait(TIMEOUT)
        real_close()

    monkeypatch.setattr(xs, "close", held_close)
    cond = drv._stop_done

    class Spy:
        def wait(self, timeout: float | None = None) -> bool:
            waiting.set()
            return cond.wait(timeout)

        def notify_all(self) -> None:
            cond.notify_all()

    drv._stop_done = Spy()
    first = threading.Thread(target=drv.stop)
    first.start()
    outcome: list[object] = []
    try:
        assert in_close.wait(TIMEOUT)
        second = threading.Thread(
            target=lambda: outcome.append(_outcome_of(drv.stop)))
        second.start()
        assert eventually(lambda: waiting.is_set() or not second.is_alive(), TIMEOUT)
    finally:
        go.set()
        first.join(TIMEOUT)
    second.join(TIMEOUT)
    assert outcome == ["returned"]
    assert not first.is_alive()


def _outcome_of(fn) -> object:
    try:
        fn()
    except Exception as exc:
        return exc
    return "returned"


def test_stop_from_an_fd_callback_of_the_driver_s_dispatcher_stops_it(
        host, driver, frontends, caplog) -> None:
    """A driver may watch a descriptor of its own on ``driver.events`` (a
    control pipe, say) and stop itself from its callback: no device's drop
    waits for an fd's callback (only a port's), and the dispatcher's
    close() from its own thread does not wait for itself.  It stopped the
    driver before port callbacks were refused, and still does."""
    outcome: list[object] = []
    ran = threading.Event()
    read_end, write_end = os.pipe2(os.O_CLOEXEC)

    def on_readable(fd: int, _events: int) -> None:
        os.read(fd, 1)
        try:
            driver.stop()
            outcome.append("stopped")
        except Exception as exc:
            outcome.append(exc)
        finally:
            ran.set()

    guest, _dev, _fe = connected(host, frontends)
    try:
        driver.events.add_fd(read_end, select.EPOLLIN, on_readable)
        os.write(write_end, b"x")
        assert ran.wait(TIMEOUT)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert outcome == ["stopped"]
    assert driver.calls_of(guest.domid)[-1] == "remove"
    assert _no_tracebacks(caplog) == []


def test_error_and_fatal_name_a_wrong_argument(host, driver, frontends, dom0_xs) -> None:
    """A driver's error path calls error()/fatal(): a wrong argument there
    is named (not abs()'s 'bad operand type' or 'NoneType' has no attribute
    'isascii'), and nothing is written nor switched."""
    raised: list[BaseException] = []

    def misuse(dev) -> None:
        for call in (lambda: dev.error("EIO", "m"), lambda: dev.fatal(None, "m"),
                     lambda: dev.error(True, "m"), lambda: dev.fatal(5, None),
                     lambda: dev.error(5, b"bytes")):
            try:
                call()
            except TypeError as exc:
                raised.append(exc)

    driver.connect_hook = misuse
    guest, dev, fe = connected(host, frontends)
    assert [str(e) for e in raised] == [
        "error number must be an int, not str",
        "error number must be an int, not NoneType",
        "error number must be an int, not bool",
        "error message must be a str, not NoneType",
        "error message must be a str, not bytes",
    ]
    assert error_node(dom0_xs, dev) is None


def test_a_device_notifies_only_ports_it_holds(host, driver, frontends, monkeypatch) -> None:
    """BackendDevice.notify() of a port the device no longer holds (a
    driver's work item running after disconnect released it) sent the
    event anyway, on whatever that number is bound to by then: another
    device's frontend, in another guest.  It is not sent."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    (port,) = bdev._ports
    sent: list[int] = []
    notify = driver.events.notify
    monkeypatch.setattr(driver.events, "notify", lambda p: (sent.append(p), notify(p)))
    bdev.notify(port)
    assert sent == [port]
    fe.set_state(S.CLOSED)
    fe.xs.rm(f"{dev.frontend_path}/state")  # Unknown: the device is dropped
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert bdev.gone
    bdev.notify(port)
    assert sent == [port], "a port released with the device was notified"


def _in_stack(thread: threading.Thread, *names: str) -> bool:
    """Whether each of ``names`` is a function on ``thread``'s stack now."""
    frame = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
    on_stack = set()
    while frame is not None:
        on_stack.add(frame.f_code.co_name)
        frame = frame.f_back
    return all(name in on_stack for name in names)


def test_a_second_stop_returns_only_once_the_driver_is_stopped(host, driver, frontends) -> None:
    """stop() from two threads at once (a signal handler's thread and the
    main thread's finally, say): the second returned at once, while the
    first was still disconnecting devices, and its caller went on to tear
    down what the driver still used.  It waits for the first to finish."""
    guest, _dev, _fe = connected(host, frontends)
    in_hook = threading.Event()
    release = threading.Event()

    def hold(_dev) -> None:
        in_hook.set()
        release.wait(TIMEOUT)

    driver.disconnect_hook = hold
    first = threading.Thread(target=driver.stop)
    first.start()
    assert in_hook.wait(TIMEOUT)
    outcome: list[tuple[bool, list[Any]]] = []

    def stop_again() -> None:
        driver.stop()
        outcome.append((driver._xs is None, driver.devices()))

    second = threading.Thread(target=stop_again)
    second.start()
    try:
        assert eventually(lambda: not second.is_alive() or _in_stack(second, "stop", "wait"))
    finally:
        release.set()
        first.join(TIMEOUT)
        second.join(TIMEOUT)
    assert outcome == [(True, [])], "the second stop() returned before the driver was stopped"
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]


def test_a_driver_dispatcher_interrupted_in_its_making_is_kept_for_stop(host) -> None:
    """A Ctrl-C landing as any call of the making of a driver's event
    dispatcher returns (the first use of ``events``), the constructor's
    own return included: there the dispatcher was lost, its thread
    running, and unknown to stop().  (Device callbacks, which make it,
    run on workers, which get no KeyboardInterrupt; a driver's code in
    the main thread may make it too.)  Whatever the place, stop() leaves
    no thread, and the next use finds a running dispatcher."""
    import os

    from tests.stolensignal import interrupted_at

    within = os.path.dirname(xenbus.__file__)
    landed: list[str] = []
    for n in itertools.count():
        before = {t.ident for t in threading.enumerate()}
        drv = RecordingDriver(host.dom0)
        drv.start()
        try:
            where = interrupted_at(n, within, lambda drv=drv: drv.events)
            assert_dispatches(drv.events, where)
        finally:
            drv.stop()
        assert not leaked_threads(before), f"interrupted {where}: {leaked_threads(before)}"
        if not where:
            break
        landed.append(where)
    assert any("BackendDriver.events" in where for where in landed), landed


@pytest.mark.timeout(300)
def test_a_stop_interrupted_anywhere_is_finished_by_the_next(host) -> None:
    """A Ctrl-C landing as any call of stop() returns: one as stop()
    let go of the driver's lock, having said that a stop() was under way,
    left it saying so, and every later stop() waited for it for ever.
    One that landed once stop() had taken the driver's dispatcher and
    grant handle off it to close them, and before it had (as the lock
    was let go of, or between the two closes), lost them to the next
    stop(): the dispatcher's thread ran for ever, the handle stayed open.
    The next stop() finishes the job: no thread left, the handle closed,
    and the domain's lock free."""
    import os

    from tests.stolensignal import interrupted_at
    from xenback.hostlock import HostLock

    within = os.path.dirname(xenbus.__file__)
    landed: list[str] = []
    for n in itertools.count():
        before = {t.ident for t in threading.enumerate()}
        drv = RecordingDriver(host.dom0)
        drv.start()
        try:
            gnttab = drv.gnttab
            assert_dispatches(drv.events, "before stop()")
            where = interrupted_at(n, within, drv.stop)
        finally:
            _stop_returns(drv)
        assert drv._xs is None, f"interrupted {where}: still started"
        assert not leaked_threads(before), f"interrupted {where}: {leaked_threads(before)}"
        assert gnttab._closed, f"interrupted {where}: the grant handle is open"
        try:
            HostLock.for_domain(host.dom0, "xenback-xbtest").close()
        except RuntimeError as exc:
            raise AssertionError(f"interrupted {where}: {exc}") from exc
        if not where:
            break
        landed.append(where)
    assert any("BackendDriver._stop" in where for where in landed), landed


@pytest.mark.timeout(300)
def test_a_leftover_drop_interrupted_once_gone_is_finished_by_the_next_stop(
        host, frontends, caplog) -> None:
    """A drop on the device's queue ended by something past Exception (a
    SystemExit from remove()) leaves the device to stop()'s own drop, in
    the caller's thread, once its queue is closed.  A Ctrl-C landing
    there once the device is marked gone: the next stop() found it gone
    and did nothing, and the device stayed listed after the driver
    stopped; started again, the driver passed every event of a new
    device at that path to the old one's closed queue, and never served
    it.  The next stop() forgets it, and a restart serves the path.  It
    says the device removed before it forgets it, as the drop does (cut
    short before the line, the device was forgotten unsaid)."""
    import os

    from tests.stolensignal import interrupted_at

    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    within = os.path.dirname(xenbus.__file__)
    guest = host.create_domain("guest")
    landed: list[str] = []
    for n in itertools.count():
        caplog.clear()
        drv = RecordingDriver(host.dom0)
        drv.start()
        try:
            dev = host.toolstack.add_device("xbtest", guest.domid)
            fe = _connect(frontends, guest, dev)
            bdev = backend_device(drv, guest.domid)
            remove = drv.remove
            exits = [SystemExit("remove() failed past Exception")]

            def failing(dev: xenbus.BackendDevice, exits: list[SystemExit] = exits,
                        remove: Callable[[xenbus.BackendDevice], None] = remove) -> None:
                if exits:
                    raise exits.pop()
                remove(dev)

            drv.remove = failing  # type: ignore[method-assign]
            where = interrupted_at(n, within, drv.stop,
                                   unless=lambda bdev=bdev: not bdev.gone)
        finally:
            drv.stop()
        assert drv.devices() == [], f"interrupted {where}: {drv.devices()}"
        assert bdev.resources == (0, 0), f"interrupted {where}"
        said = [r.getMessage() for r in caplog.records]
        assert f"{bdev.nodename}: removed" in said, f"interrupted {where}"
        fe.close()
        host.toolstack.destroy_device(dev)
        with drv:  # started again, it serves a new device at the path
            dev = host.toolstack.add_device("xbtest", guest.domid)
            _connect(frontends, guest, dev).close()
        host.toolstack.destroy_device(dev)
        if not where:
            break
        landed.append(where)
    assert any("BackendDriver._forget" in where for where in landed), landed


class _ExitsOnce(logging.Handler):
    """A logging handler that raises SystemExit at the first record of
    ``msg`` (the first ``times``; None: at every one): something past
    Exception, from a driver's own code, in the middle of what logs it."""

    def __init__(self, msg: str, times: int | None = 1) -> None:
        super().__init__()
        self.msg = msg
        self.times = times
        self.exits = 0
        self.exited = threading.Event()  # the last time

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == self.msg and (self.times is None or self.exits < self.times):
            self.exits += 1
            if self.exits == self.times:
                self.exited.set()
            raise SystemExit(f"a logging handler exits at {self.msg!r}")


def _re_created_as_a_handler_exits(host, driver, frontends, dom0_xs,
                                    msg: str) -> xenbus.BackendDevice:
    """A connected device dropped, the drop ended by SystemExit from a
    logging handler at its first record of ``msg`` (see _ExitsOnce), and
    a new device made at its path behind it (see _re_created_behind):
    the old device, once it has left the driver."""
    exiting = _ExitsOnce(msg)
    xblog = logging.getLogger("xenback.xenbus")
    xblog.addHandler(exiting)
    try:
        guest, dev, fe = connected(host, frontends)
        old = backend_device(driver, guest.domid)
        _re_created_behind(driver, host, frontends, dom0_xs, guest, dev, fe)
        assert exiting.exited.is_set()
    finally:
        xblog.removeHandler(exiting)
    assert old not in driver.devices()
    return old


def test_a_drop_ended_past_exception_once_gone_still_looks_at_the_path(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """A drop on the device's queue ended by something past Exception
    once the device was gone: SystemExit from a logging handler at its
    "removed" line.  The device stayed listed until stop(), its queue
    closed, and the drop's look at the path was never queued: a new
    device the toolstack made there as the old one went, whose events
    went to the old one's queue, was never served, nor would one made
    later be (its events refused by that queue).  The look is queued all
    the same, and finishes the drop: the old device leaves, said
    removed, and the new one connects."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    old = _re_created_as_a_handler_exits(host, driver, frontends, dom0_xs, "%s: removed")
    said = [r.getMessage() for r in caplog.records]
    # The look's: the drop's own line got no further than the handler.
    assert said.count(f"{old.nodename}: removed") == 1


def test_a_drop_ended_past_exception_before_gone_is_done_again_by_the_next_event(
        host, driver, frontends, dom0_xs, caplog, monkeypatch) -> None:
    """A drop on the device's queue ended by something past Exception
    before the device was gone: SystemExit from a logging handler at the
    line of a remove() that failed.  No look at the path is queued (the
    device is not gone), but its queue is still open: the events of a
    new device the toolstack makes at the path go to it, and drop the
    old device again, which this time ends, and looks; the new one is
    served."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    fails = [RuntimeError("remove() fails once")]
    remove = driver.remove

    def failing(dev: xenbus.BackendDevice) -> None:
        if fails:
            raise fails.pop()
        remove(dev)

    monkeypatch.setattr(driver, "remove", failing)
    old = _re_created_as_a_handler_exits(host, driver, frontends, dom0_xs, "%s: remove failed")
    said = [r.getMessage() for r in caplog.records]
    assert said.count(f"{old.nodename}: removed") == 1


def test_a_drop_whose_look_ended_past_exception_too_is_finished_by_a_full_scan(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """As test_a_drop_ended_past_exception_once_gone_still_looks_at_the_path,
    every look that would finish it ended so too (the drop's, and that of
    the event of its own Closed): the device stayed listed, its queue
    closed.  The toolstack then deletes the frontend domain's whole
    directory, whose event names only that directory: the scan of the
    whole tree finds the device listed and no longer there, and finishes
    the drop, said removed once."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    exiting = _ExitsOnce("%s: removed", times=None)
    xblog = logging.getLogger("xenback.xenbus")
    guest, dev, fe = connected(host, frontends)
    old = backend_device(driver, guest.domid)
    xblog.addHandler(exiting)
    try:
        dom0_xs.rm(dev.frontend_path)  # Unknown: Closed, and dropped
        assert eventually(lambda: old.gone)
        old.events.flush()  # the drop, which queued its look before it ended
        driver._bus.flush()  # every look
    finally:
        xblog.removeHandler(exiting)
    assert exiting.exits >= 2 and old in driver.devices()
    dom0_xs.rm(f"{driver.backend_root}/{guest.domid}")
    assert eventually(lambda: old not in driver.devices())
    said = [r.getMessage() for r in caplog.records]
    assert said.count(f"{old.nodename}: removed") == 1


@contextlib.contextmanager
def _a_look_as_the_drop_forgets(driver, dom0_xs, dev, old, monkeypatch,
                                pause: PauseAt) -> Iterator[None]:
    """The drop of ``old`` (``dev``'s frontend directory removed: Closed),
    held by ``pause`` in its forget, the device gone; meanwhile a look at
    its path (an event there), done.  For the block, the drop still held;
    at its end, let go and done, with its own look at the path."""
    real = xenbus.BackendDriver._forget

    def forget(self: BackendDriver, dev: xenbus.BackendDevice) -> None:
        if dev.events.in_queue():  # the drop's, not a look's
            pause.run(lambda: real(self, dev))
        else:
            real(self, dev)

    monkeypatch.setattr(xenbus.BackendDriver, "_forget", forget)
    # Held until the drop stands at the pause: a look at the path (the
    # event of its own Closed) coming first would take the device first.
    in_bus, release = threading.Event(), threading.Event()
    driver._bus.call(lambda: (in_bus.set(), release.wait(TIMEOUT)))
    try:
        assert in_bus.wait(TIMEOUT)
        dom0_xs.rm(dev.frontend_path)  # Unknown: Closed, and dropped
        assert pause.reached.wait(TIMEOUT)
        assert old.gone
        dom0_xs.write(f"{dev.backend_path}/poke", "1")  # an event at its path
        handed_over(driver.xenstore, "poke")
        release.set()
        driver._bus.flush()
        yield
    finally:
        release.set()
        pause.resume()
    old.events.flush()  # the drop
    driver._bus.flush()  # and its look at the path


def test_a_look_at_the_path_during_the_drop_s_own_forget_says_removed_once(
        host, driver, frontends, dom0_xs, caplog, monkeypatch) -> None:
    """The look at the path that finishes a drop cut short once gone
    (see test_a_drop_ended_past_exception_once_gone_still_looks_at_the_path)
    comes while the drop itself, not cut short, is forgetting the device
    on its queue, both past the look at devices(): the device was said
    removed twice, once by each.  One says it, and the device leaves."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest, dev, fe = connected(host, frontends)
    old = backend_device(driver, guest.domid)
    saying = PauseAt(xenbus.BackendDriver._forget, "dev.ratelimit.close(logger)")
    with _a_look_as_the_drop_forgets(driver, dom0_xs, dev, old, monkeypatch, saying):
        pass
    assert old not in driver.devices()
    said = [r.getMessage() for r in caplog.records]
    assert said.count(f"{old.nodename}: removed") == 1


def test_a_look_as_the_drop_releases_what_remove_took_leaves_the_device_to_it(
        host, driver, frontends, dom0_xs, caplog, monkeypatch) -> None:
    """remove() binds a port (a driver's own work item may, until the
    device is gone), and the drop's forget, once the device is gone, is
    unbinding it as a look at the path comes.  The look's forget found
    the port being unbound, left it, and said the device removed, taking it off
    devices() with the port still bound.  The device is the drop's until
    its release is done: said removed once, holding nothing."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest, dev, fe = connected(host, frontends)
    old = backend_device(driver, guest.domid)
    plain_remove = driver.remove

    def remove_racing_a_work_item(d) -> None:
        d.bind_evtchn(fe.frontend.bind_port(), lambda port: None)
        plain_remove(d)

    driver.remove = remove_racing_a_work_item
    unbinding = PauseAt(xenbus.BackendDevice._unbind, "record.events.unbind(port")
    with _a_look_as_the_drop_forgets(driver, dom0_xs, dev, old, monkeypatch, unbinding):
        assert old.resources == (0, 1)  # the port the drop is unbinding
        assert old in driver.devices()
        assert f"{old.nodename}: removed" not in [r.getMessage() for r in caplog.records]
    assert old not in driver.devices() and old.resources == (0, 0)
    said = [r.getMessage() for r in caplog.records]
    assert said.count(f"{old.nodename}: removed") == 1


@pytest.mark.parametrize("how", ["path", "scan"])
def test_a_look_as_the_drop_closes_the_device_s_queue_leaves_it_to_the_drop(
        host, driver, frontends, dom0_xs, caplog, monkeypatch, how: str) -> None:
    """The drop has closed the device's queue, and not yet marked it gone,
    as a look at its path comes (an event there, refused by that queue),
    or the scan of the whole tree (the frontend domain's directory
    deleted).  The drop is not cut short: it is still the device's, which
    stays listed, not said removed (a look that finished it there would
    say it before the device was gone).  Said removed once, by the drop."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest, dev, fe = connected(host, frontends)
    old = backend_device(driver, guest.domid)
    closing = PauseAt.in_method(monkeypatch, xenbus.BackendDriver, "_take_down",
                                "with dev._lock:", after="dev.events.close(")
    try:
        dom0_xs.rm(dev.frontend_path)  # Unknown: Closed, and dropped
        assert closing.reached.wait(TIMEOUT)
        if how == "path":
            dom0_xs.write(f"{dev.backend_path}/poke", "1")
        else:
            dom0_xs.rm(f"{driver.backend_root}/{guest.domid}")
        handed_over(driver.xenstore, "poke")
        driver._bus.flush()
        assert old in driver.devices() and not old.gone
        assert f"{old.nodename}: removed" not in [r.getMessage() for r in caplog.records]
    finally:
        closing.resume()
    old.events.flush()  # the drop
    driver._bus.flush()  # and its look at the path
    assert old not in driver.devices()
    said = [r.getMessage() for r in caplog.records]
    assert said.count(f"{old.nodename}: removed") == 1


def test_a_driver_domain_s_transaction_quota_full_for_a_moment_stalls_nothing(
        host, dom0_xs, frontends, monkeypatch) -> None:
    """cxenstored lets a driver domain hold 10 transactions open at once,
    all its processes and devices together (Linux's /dev/xen/xenbus shares
    the kernel's one connection), and refuses the 11th's start with ENOSPC.
    Every write of a device is a transaction: one refused so, while others
    ran, failed the probe, whose error node and Closing were refused too,
    and the device stayed Initialising for good.  A full quota empties
    within moments: the start is tried again."""
    drvdom = host.create_domain("driver-domain")
    refused = threading.Event()
    begin = xenstore_module._begin

    def counting_begin(client) -> None:
        try:
            begin(client)
        except Exception as exc:
            if getattr(exc, "args", (None,))[0] == errno.ENOSPC:
                refused.set()
            raise

    monkeypatch.setattr(xenstore_module, "_begin", counting_begin)
    with RawClient(drvdom.xenstore_path) as other, RecordingDriver(drvdom) as drv:
        # Another process of the driver domain holds the whole quota.
        held = [other.transaction_start() for _ in range(10)]
        guest = host.create_domain("guest")
        dev = host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
        assert refused.wait(TIMEOUT)
        for tx in held:
            other.transaction_end(tx, commit=False)
        fe = _connect(frontends, guest, dev)
        errors = f"/local/domain/{drvdom.domid}/error/backend/xbtest/{guest.domid}/0"
        assert dom0_xs.read(f"{errors}/error") is None
        assert drv.calls_of(guest.domid) == ["probe", "connect"]
        fe.set_state(S.CLOSED)
        fe.wait_backend(S.CLOSED)


def test_a_new_device_is_served_when_the_error_directory_may_not_be_read(
        host, dom0_xs, frontends, caplog) -> None:
    """The look for an earlier device's error node before a new device is
    probed is tidying up: refused (our home's ``error`` directory taken
    by the toolstack, EACCES to a driver domain), it must not keep the
    device from being probed and served, as it was before that look."""
    drvdom, drv, (fe,) = _driver_domain_backend(host, dom0_xs, frontends, ("one",), (0,))
    try:
        errors = _take_error_directory(dom0_xs, drvdom)
        with pytest.raises(PermissionError):
            drv.xenstore.read(f"{errors}/backend/xbtest/{fe.guest.domid}/1")
        dev = host.toolstack.add_device("xbtest", fe.guest.domid, devid=1,
                                        backend_id=drvdom.domid)
        fe2 = _connect(frontends, fe.guest, dev)
        assert drv.calls_of(fe.guest.domid, 1) == ["probe", "connect"]
        fe2.set_state(S.CLOSED)
        fe2.wait_backend(S.CLOSED)
    finally:
        drv.stop()


def test_discovery_of_a_probing_device_leaves_its_own_error_node(
        host, frontends, dom0_xs, monkeypatch) -> None:
    """A new device found at start (the listing, adopt=True) calls
    error() in its probe(), which leaves it Initialising, and holds
    there.  Discovery looking at its key again meanwhile (the listing
    again, and a _check_device as a drop queues it) must not take that
    error node for an earlier device's: every look runs on the bus
    queue, one at a time, and finds the device registered, so the
    look for an earlier error node, made once before it was, is not
    made again.  Nor can two looks at the key overlap: one held in its
    read of the error path keeps the next one waiting."""
    guest = host.create_domain("early")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = frontends(guest, dev)
    drv = RecordingDriver(host.dom0)
    in_probe, go = threading.Event(), threading.Event()

    def probe(bdev: Any) -> None:
        bdev.error(errno.EIO, "its own")
        in_probe.set()
        assert go.wait(TIMEOUT)

    drv.probe_hook = probe
    entered: list[str] = []
    plain_check = drv._check_device

    def check(fe_text: str, devid_text: str, **kwargs: Any) -> None:
        entered.append(fe_text)
        plain_check(fe_text, devid_text, **kwargs)

    drv._check_device = check  # type: ignore[method-assign]
    # Whether the device was registered (and its probe queued) when its
    # error path was looked at.
    looks: list[bool] = []
    class_read = XenStore.read

    def read_looked(xs: XenStore, path: str, default: str | None = None) -> str | None:
        if xs is drv.xenstore and path.startswith(drv.error_root):
            looks.append((guest.domid, 0) in drv._devices)
        return class_read(xs, path, default)

    monkeypatch.setattr(XenStore, "read", read_looked)
    with drv:
        assert in_probe.wait(TIMEOUT)
        assert entered == [str(guest.domid)]  # the listing at start
        assert looks == [False], "looked once its probe could write there"
        assert error_node(dom0_xs, dev) == f"{errno.EIO} its own"
        # One look held in its read of the error path keeps the next out.
        held, release = threading.Event(), threading.Event()
        xs = drv.xenstore
        plain_read = xs.read

        def read(path: str, default: str | None = None) -> str | None:
            if path.startswith(drv.error_root) and not held.is_set():
                held.set()
                assert release.wait(TIMEOUT)
            return plain_read(path, default)

        xs.read = read  # type: ignore[method-assign]
        try:
            other = host.toolstack.add_device("xbtest", guest.domid, devid=1)
            assert held.wait(TIMEOUT)
            drv._bus.call(drv._backend_event, drv.backend_root)
            drv._bus.call(drv._check_device, str(guest.domid), "0")
            assert len(entered) == 2, f"a second look overlapped the held one: {entered}"
            release.set()
            drv._bus.flush()
        finally:
            release.set()
            del xs.read
        assert error_node(dom0_xs, dev) == f"{errno.EIO} its own"
        go.set()
        fe.wait_backend(S.INIT_WAIT)
        assert error_node(dom0_xs, dev) == f"{errno.EIO} its own"
        frontends(guest, other).wait_backend(S.INIT_WAIT)


def test_fatal_on_a_deleted_directory_leaves_the_state_as_it_was(
        host, driver, frontends, dom0_xs) -> None:
    """fatal() finding its directory deleted writes nothing, and the
    device's ``state``, which says what was last written, is left as it
    was: no Closing was."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    # The event of our own Connected may be queued still: it would find
    # the directory deleted and drop the device before fatal() runs.
    handed_over(driver.xenstore, "connected")
    bdev.events.flush()
    go = threading.Event()
    seen: list[tuple[bool, XenbusState]] = []
    assert bdev.queue(lambda: (go.wait(TIMEOUT),
                               seen.append((bdev.fatal(errno.EIO, "gone"), bdev.state))))
    host.toolstack.destroy_device(dev)
    go.set()
    driver.wait(lambda: bdev.gone)
    assert seen == [(False, S.CONNECTED)]
    assert error_node(dom0_xs, dev) is None


def test_fatal_is_one_transaction_on_a_closing_device_too(
        host, driver, frontends, dom0_xs, monkeypatch) -> None:
    """fatal() writes its error node and Closing in one transaction, and
    nothing more once that one committed.  On a device Closing already
    (a failure met again) the error node is still written and the
    failure reported: the state needed no write, but the directory is
    the device's."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    plain = XenStore.transaction
    made: list[bool] = []

    def transaction(xs: XenStore, fn: Any, **kwargs: Any) -> Any:
        if xs is driver.xenstore and bdev.events.in_queue():
            made.append(True)
        return plain(xs, fn, **kwargs)

    monkeypatch.setattr(XenStore, "transaction", transaction)
    reported: list[bool] = []
    for message in ("first", "again"):
        made.clear()
        assert bdev.queue(lambda m=message: reported.append(bdev.fatal(errno.EIO, m)))
        bdev.events.flush()
        assert made == [True], message
        assert error_node(dom0_xs, dev) == f"{errno.EIO} {message}"
    assert reported == [True, True]
    assert not bdev.gone and bdev.state == S.CLOSING
    fe.wait_backend(S.CLOSING)


def test_closing_refused_after_the_error_node_in_a_live_driver_domain_is_said(
        host, dom0_xs, frontends, caplog) -> None:
    """fatal()'s transaction refused (its error node), and Closing, tried
    alone, refused too (our state node left to us to read, not to write),
    while the domain, home and connection live: each refusal is its own,
    and both are said, in the order they were met."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        _take_error_directory(dom0_xs, drvdom)
        dom0_xs.set_perms(f"{bdev.nodename}/state", ["n0", f"r{drvdom.domid}"])
        caplog.clear()
        assert bdev.events.call(lambda: bdev.fatal(errno.EIO, "refused"))
        bdev.events.flush()
        said = [r.msg for r in _backend_warnings(caplog) if "could not" in r.msg]
        assert said == ["%s: could not write the error node: %s",
                        "%s: could not switch to Closing: %s"], said
        assert not bdev.gone


def _driver_domain_error(dom0_xs: Any, drvdom: Any, fe: Any) -> str | None:
    """The error node a driver domain's backend wrote for ``fe``'s device 0."""
    return dom0_xs.read(f"/local/domain/{drvdom.domid}/error/backend/xbtest/"
                      f"{fe.guest.domid}/0/error")


@pytest.mark.parametrize("write_only", [False, True], ids=["state", "state-write-only"])
def test_a_state_node_the_toolstack_takes_drops_its_device_and_says_so(
        host, dom0_xs, frontends, caplog, write_only) -> None:
    """The toolstack takes a device's own ``state`` from the driver
    domain's backend (set_perms: it may no longer read it).  Whose the
    directory is, only that node tells once we switched (see
    BackendDevice._ours), and every switch reads it first: the device can
    never again tell its frontend anything, nor be told from a new device
    made at its path.  It is dropped (disconnect, remove, grants and ports
    released), nothing written there, the error node included, and said
    once, without a traceback (its watch event fired on its queue, and the
    look at the path that a drop queues on the bus ran too); the other
    devices are served as before, and a new one is probed.  A state left
    to us to write, not to read, is taken all the same: every write of
    ours reads it first (as Linux's switches do), and nothing is
    written there either."""
    drvdom, drv, (taken, other) = _driver_domain_backend(
        host, dom0_xs, frontends, ("taken", "other"), (0,))
    try:
        bdev = backend_device(drv, taken.guest.domid)
        caplog.clear()
        dom0_xs.set_perms(f"{bdev.nodename}/state",
                          _left_by_a_taking(drvdom, write_only))
        drv.wait_removed(taken.guest.domid)
        assert bdev.gone and bdev.resources == (0, 0)
        assert drv.calls_of(taken.guest.domid) == ["probe", "connect", "disconnect", "remove"]
        drv._bus.flush()  # the drop's look at the path
        assert not [r for r in caplog.records if r.exc_info is not None]
        (said,) = _backend_warnings(caplog)
        assert said.args[0] == bdev.nodename  # type: ignore[index]
        assert isinstance(said.args[1], PermissionError)  # type: ignore[index]
        assert said.args[1].filename == f"{bdev.nodename}/state"  # type: ignore[index]
        assert dom0_xs.read(f"{bdev.nodename}/state") == str(int(S.CONNECTED))
        assert _driver_domain_error(dom0_xs, drvdom, taken) is None
        other.set_state(S.CLOSING)
        other.wait_backend(S.CLOSING)
        dev = host.toolstack.add_device("xbtest", taken.guest.domid, devid=1,
                                        backend_id=drvdom.domid)
        _connect(frontends, taken.guest, dev)
        assert not [r for r in caplog.records if r.exc_info is not None]
    finally:
        drv.stop()


def test_a_failure_met_as_the_state_node_is_taken_drops_the_device_without_a_traceback(
        host, dom0_xs, frontends, caplog) -> None:
    """As above, but the device fails (its frontend writes a state there
    is none of) before its queue reads the taken node on the watch's
    event: the look before fatal() is refused.  The failure cannot be
    written (whose directory it is, nobody can tell), so it is logged,
    and the device dropped, as above, without a traceback: the failure
    said first, as a failure met as a device is dropped is (its device's
    rate limit counts what it suppressed as the device goes, and the line
    that says it was removed is its last)."""
    drvdom, drv, (taken,) = _driver_domain_backend(host, dom0_xs, frontends, ("taken",), (0,))
    try:
        bdev = backend_device(drv, taken.guest.domid)
        # The watch events of its connecting over first: one of our own
        # writes still on its way would reach the queue after the blocker
        # and read the taken node before the frontend's state 9 is seen.
        handed_over(drv.xenstore, "connected", base=f"/local/domain/{drvdom.domid}/data")
        bdev.events.flush()
        held, go = threading.Event(), threading.Event()
        assert bdev.queue(lambda: (held.set(), go.wait(TIMEOUT)))
        assert held.wait(TIMEOUT)
        caplog.set_level(logging.INFO, logger="xenback.xenbus")
        caplog.clear()
        taken.set_state("9")
        dom0_xs.set_perms(f"{bdev.nodename}/state", ["n0"])
        go.set()
        drv.wait_call("remove", taken.guest.domid)
        bdev.events.flush()
        drv._bus.flush()
        assert not [r for r in caplog.records if r.exc_info is not None]
        assert [r.args[1].filename for r in _backend_warnings(caplog)  # type: ignore[index]
                ] == [f"{bdev.nodename}/state"]
        assert _driver_domain_error(dom0_xs, drvdom, taken) is None
        said = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith(bdev.nodename + ": ")]
        assert [m.split(": ", 1)[1] for m in said
                if "not reported there" in m or m.endswith(": removed")] == [
            f"frontend invalid xenbus state '9' (errno {errno.EINVAL}), and "
            f"{bdev.nodename}/state may not be read: not reported there",
            "removed"], said
    finally:
        drv.stop()


@pytest.mark.parametrize("write_only", [False, True], ids=["state", "state-write-only"])
def test_a_state_node_taken_while_probe_runs_drops_the_device_writing_nothing(
        host, dom0_xs, caplog, write_only) -> None:
    """The toolstack takes our ``state`` while probe() runs, before our
    first switch: the switch to InitWait is refused, and the device's
    failure met so cannot be told from the refusal.  As for a device that
    switched: dropped, nothing written, the error node included, said
    once as a warning (the failure, as one not reported), not as an
    error of the device's, a refused Closing, and then the refusal."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    drvdom = host.create_domain("driver-domain")
    drv = RecordingDriver(drvdom)
    entered, release = threading.Event(), threading.Event()

    def hold(_dev: Any) -> None:
        entered.set()
        assert release.wait(TIMEOUT)

    drv.probe_hook = hold
    drv.start()
    try:
        guest = host.create_domain("guest")
        dev = host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
        assert entered.wait(TIMEOUT)
        dom0_xs.set_perms(f"{dev.backend_path}/state",
                          _left_by_a_taking(drvdom, write_only))
        release.set()
        drv.wait_removed(guest.domid)
        drv._bus.flush()
        assert drv.calls_of(guest.domid) == ["probe", "remove"]
        assert not [r for r in caplog.records if r.exc_info is not None]
        said = [r.msg for r in _backend_warnings(caplog)]
        assert said == ["%s: its own node may not be read any more (%s): dropping the device, "
                        "writing nothing there"], said
        assert [r.getMessage().split(", and ", 1)[1] for r in caplog.records
                if "not reported there" in r.getMessage()] == [
            f"{dev.backend_path}/state may not be read: not reported there"]
        assert dom0_xs.read(f"/local/domain/{drvdom.domid}/error/backend/xbtest/"
                            f"{guest.domid}/0/error") is None
        assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.INITIALISING))
    finally:
        drv.stop()


@pytest.mark.parametrize("closing", [False, True], ids=["error", "fatal"])
@pytest.mark.parametrize("write_only", [False, True], ids=["state", "state-write-only"])
def test_a_failure_reported_by_probe_on_a_state_taken_is_said_once(
        host, dom0_xs, caplog, closing, write_only) -> None:
    """probe() itself reports a failure (error() or fatal()) once the
    toolstack took our ``state``, before our first switch: nothing tells
    whose the directory is then but the nodes probe() wrote, yet a state
    we may not read is a node taken as it is after it (see
    _fatal_or_drop, which reads it for that alone), and nothing is
    written, the error node included: the failure said as not reported,
    False told, the refusal said once as the device is dropped.  The
    switch to InitWait that follows, refused by the same taking, is that
    report's sequel: no second failure said, nor a second refusal (see
    test_fatal_from_connect_on_a_node_taken_is_said_once)."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    drvdom = host.create_domain("driver-domain")
    drv = RecordingDriver(drvdom)
    told: list[bool] = []

    def report(dev: Any) -> None:
        dom0_xs.set_perms(f"{dev.nodename}/state",
                          _left_by_a_taking(drvdom, write_only))
        told.append((dev.fatal if closing else dev.error)(errno.EIO, "in probe"))

    drv.probe_hook = report
    drv.start()
    try:
        guest = host.create_domain("guest")
        dev = host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
        drv.wait_removed(guest.domid)
        drv._bus.flush()
        state = f"{dev.backend_path}/state"
        assert told == [False]
        _said_once(caplog, state, "in probe")
        assert dom0_xs.read(f"/local/domain/{drvdom.domid}/error/backend/xbtest/"
                            f"{guest.domid}/0/error") is None
        assert dom0_xs.read(state) == str(int(S.INITIALISING))
    finally:
        drv.stop()


def test_a_new_device_whose_state_we_may_only_write_is_not_probed(
        host, dom0_xs, frontends, caplog) -> None:
    """A device whose ``state`` the toolstack leaves us to write, not to
    read: as Linux's probe, which reads it (xenbus_read_driver_state: an
    unreadable one is Unknown), it is no Initialising device, and is not
    probed, nothing written there nor said but at debug level; given
    back, it is probed and served."""
    drvdom = host.create_domain("driver-domain")
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
    state = f"{dev.backend_path}/state"
    perms = dom0_xs.get_perms(state)
    dom0_xs.set_perms(state, ["n0", f"w{drvdom.domid}"])
    drv = RecordingDriver(drvdom)
    caplog.clear()
    drv.start()
    try:
        handed_over(drv.xenstore, "started", base=f"/local/domain/{drvdom.domid}/data")
        drv._bus.flush()
        assert drv.devices() == [] and drv.calls == []
        assert dom0_xs.read(state) == str(int(S.INITIALISING))
        assert _backend_warnings(caplog) == []
        dom0_xs.set_perms(state, perms)
        _connect(frontends, guest, dev)
        assert drv.calls_of(guest.domid) == ["probe", "connect"]
    finally:
        drv.stop()


def test_fatal_whose_state_is_refused_still_writes_its_error_node(
        host, dom0_xs, frontends, caplog) -> None:
    """fatal() writes its error node and Closing in one transaction; the
    toolstack leaves our ``state`` readable but no longer writable, and
    that transaction fails.  The error node is then written alone, as
    Linux's xenbus_dev_fatal() writes it whatever becomes of the switch,
    and the refused Closing is said (not as an error node refused).  The
    device's own switches fail so in turn, and are reported alike."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        dom0_xs.set_perms(f"{bdev.nodename}/state", ["n0", f"r{drvdom.domid}"])
        caplog.clear()
        told: list[bool] = []
        assert bdev.events.call(lambda: told.append(bdev.fatal(errno.EIO, "state refused")))
        bdev.events.flush()
        assert told == [True]
        assert _driver_domain_error(dom0_xs, drvdom, fe) == f"{errno.EIO} state refused"
        assert dom0_xs.read(f"{bdev.nodename}/state") == str(int(S.CONNECTED))
        said = [r for r in _backend_warnings(caplog) if r.msg != "%s: error %d: %s"]
        assert [r.msg for r in said] == ["%s: could not switch to Closing: %s"]
        assert said[0].args[1].filename == f"{bdev.nodename}/state"  # type: ignore[index]
        assert not bdev.gone
        # So does the table's next switch, as the frontend closes.
        fe.set_state(S.CLOSING)
        error = dom0_xs.wait_for(
            f"/local/domain/{drvdom.domid}/error/backend/xbtest/{fe.guest.domid}/0/error",
            lambda v: v is not None and v.startswith(f"{errno.EACCES} "), timeout=TIMEOUT)
        assert error == (f"{errno.EACCES} frontend state {int(S.CLOSING)}: Permission denied: "
                         f"{bdev.nodename}/state")
        assert dom0_xs.read(f"{bdev.nodename}/state") == str(int(S.CONNECTED))


def test_fatal_whose_state_is_refused_writes_no_error_node_into_a_new_device(
        host, dom0_xs, frontends, monkeypatch, caplog) -> None:
    """As above, but the toolstack deletes the device and makes it again
    at its path between the refused transaction and the error node's
    own: the failure is the old device's, and the new one must not start
    with its error node (the one transaction fatal() makes was for that).
    Nor is it logged against the path, where a log watcher would count
    it against the new device: the failure is information, and so is its
    refused Closing."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        dev = fe.device
        dom0_xs.set_perms(f"{bdev.nodename}/state", ["n0", f"r{drvdom.domid}"])
        plain = XenStore.transaction
        refused: list[BaseException] = []

        def transaction(xs: XenStore, fn: Any, **kwargs: Any) -> Any:
            if xs is not drv.xenstore or not bdev.events.in_queue() or refused:
                return plain(xs, fn, **kwargs)
            try:
                return plain(xs, fn, **kwargs)
            except PermissionError as exc:
                refused.append(exc)
                fe.close()
                host.toolstack.destroy_device(dev)
                host.toolstack.add_device("xbtest", fe.guest.domid, backend_id=drvdom.domid)
                raise

        monkeypatch.setattr(XenStore, "transaction", transaction)
        caplog.set_level(logging.INFO, logger="xenback.xenbus")
        caplog.clear()
        told: list[bool] = []
        assert bdev.events.call(lambda: told.append(bdev.fatal(errno.EIO, "old")))
        bdev.events.flush()
        assert told == [False] and refused
        # The old device's drop, and the new one's probe after it, may
        # still write there and say so: looked at once the new device is
        # probed, and its queue done with that.
        drv.wait_removed(fe.guest.domid)
        drv.wait_call("probe", fe.guest.domid, count=2)
        backend_device(drv, fe.guest.domid).events.flush()
        assert _driver_domain_error(dom0_xs, drvdom, fe) is None
        assert dom0_xs.read(f"{bdev.nodename}/state") == str(int(S.INIT_WAIT))
        assert _backend_warnings(caplog) == []
        (said,) = [r.getMessage() for r in caplog.records if "not reported there" in r.getMessage()]
        assert said.endswith(f"old (errno {errno.EIO}), and the device directory was made again "
                             "for a new device: not reported there"), said


def _refused_under(bdev: Any, dom0_xs: Any, call: Any, *, node: str = "state",
                   perms: list[str] | None = None) -> list[Any]:
    """Run ``call()`` on ``bdev``'s queue once the toolstack took its
    ``node`` (``perms``: none for us by default, so unreadable to the
    driver domain), before the queue handles the event of that: what it
    returned, in a list."""
    held, go = threading.Event(), threading.Event()
    told: list[Any] = []

    def hold() -> None:
        held.set()
        assert go.wait(TIMEOUT)
        told.append(call())

    assert bdev.events.call(hold)
    assert held.wait(TIMEOUT)
    dom0_xs.set_perms(f"{bdev.nodename}/{node}".rstrip("/"), perms or ["n0"])
    go.set()
    return told


def _taking_warned_once(caplog: Any, taken: str) -> None:
    """The log says a device's own node (``taken``) may not be read, once,
    as the warning of the device dropped for it, naming the node; no
    traceback."""
    assert not [r for r in caplog.records if r.exc_info is not None]
    said = _backend_warnings(caplog)
    assert [r.msg for r in said] == [
        "%s: its own node may not be read any more (%s): dropping the device, "
        "writing nothing there"], [r.getMessage() for r in said]
    assert said[0].args[1].filename == taken  # type: ignore[index]


def _said_once(caplog: Any, taken: str, message: str, *, then: Sequence[str] = ()) -> None:
    """What a failure (EIO, ``message``) met on a node of a device's own
    we may not read (``taken``) leaves in the log: the failure as one not
    reported there, naming the node (then the failures ``then`` says,
    whole), and the refusal, once, as a warning; no traceback."""
    _taking_warned_once(caplog, taken)
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records
            if "not reported there" in r.getMessage()] == [
        f"{message} (errno {errno.EIO}), and {taken} may not be read: not reported there",
        *then]


def _dropped_writing_nothing(caplog: Any, dom0_xs: Any, drvdom: Any, fe: Any, bdev: Any,
                             taken: str, message: str, *, state: S = S.CONNECTED) -> None:
    """``bdev``, whose failure (``message``) met a node of its own taken
    (``taken``), was dropped as the failure says (see _said_once), and
    nothing was written: no error node, and its state left as it was
    (``state``)."""
    _said_once(caplog, taken, message)
    assert _driver_domain_error(dom0_xs, drvdom, fe) is None
    assert dom0_xs.read(f"{bdev.nodename}/state") == str(int(state))


def _removed(drv: Any, fe: Any, bdev: Any) -> None:
    """Wait until ``drv`` has removed ``fe``'s device, and everything its
    removal queued (on the device's queue and on the bus) has run."""
    drv.wait_call("remove", fe.guest.domid)
    bdev.events.flush()
    drv._bus.flush()


def _starting_over_with(drv: Any, fe: Any, bdev: Any, connect: Any) -> None:
    """Give ``drv`` the connect() ``connect``, and have ``fe`` start over
    (Initialising), waiting until the backend waits for it again, at
    Init-wait, and the events of that are handled: the next Initialised
    calls ``connect``."""
    drv.connect = connect
    fe.set_state(S.INITIALISING)
    fe.wait_backend(S.INIT_WAIT)
    # The watch events of our own writes on the device's queue first: one
    # still on its way would be handled after the caller's next step.
    handed_over(drv.xenstore, "started-over", base=f"/local/domain/{drv.platform.domid}/data")
    bdev.events.flush()


# What the toolstack may leave us of a node it takes: nothing, or the
# right to write it (and not read it): every write of ours to our
# directory reads its state first, as Linux's xenbus_switch_state() does,
# so one is as unreadable as the other.
_TAKINGS = [pytest.param("state", False, id="state"),
            pytest.param("state", True, id="state-write-only"),
            pytest.param("", False, id="directory")]


def _left_by_a_taking(drvdom: Any, write_only: bool) -> list[str]:
    """The permissions a node taken as _TAKINGS says has: nothing for
    ``drvdom``, or (``write_only``) the right to write it only."""
    return ["n0", f"w{drvdom.domid}"] if write_only else ["n0"]


@pytest.mark.parametrize("closing", [False, True], ids=["error", "fatal"])
@pytest.mark.parametrize(("node", "write_only"), _TAKINGS)
def test_a_failure_reported_on_a_node_we_may_not_read_is_said_once(
        host, dom0_xs, frontends, caplog, closing, node, write_only) -> None:
    """A driver's error() or fatal() met with our ``state`` (or our
    directory) unreadable, its watch event not handled yet: the look at
    whose directory it is reads that node first, so nothing can be
    written, the error node included.  Said once, as every taking is:
    the failure as one not reported there, naming the node (information:
    whose the directory is, nobody can tell), and the refusal as a
    warning as the device is dropped, writing nothing (not even into a
    state left to us to write); no error line, nor a line per write
    refused.  The caller is told False, as for a directory no longer
    the device's: the device is dropped next."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        taken = f"{bdev.nodename}/{node}".rstrip("/")
        perms = _left_by_a_taking(drvdom, write_only)
        caplog.clear()
        report = bdev.fatal if closing else bdev.error
        told = _refused_under(bdev, dom0_xs, lambda: report(errno.EIO, "unreadable"),
                              node=node, perms=perms)
        _removed(drv, fe, bdev)
        assert told == [False]
        _dropped_writing_nothing(caplog, dom0_xs, drvdom, fe, bdev, taken, "unreadable")


@pytest.mark.parametrize("how", ["frontend vanishes", "frontend domain dies"])
@pytest.mark.parametrize(("node", "write_only"), _TAKINGS)
def test_a_device_dropped_for_its_frontend_on_a_node_taken_says_the_taking_once(
        host, dom0_xs, frontends, caplog, how, node, write_only) -> None:
    """The toolstack took our ``state`` (or directory), and before the
    device's queue handles that, the frontend vanishes (its directory
    deleted: Unknown) or its domain dies (@releaseDomain): the device is
    dropped there, and its Closed, whose switch reads the node first, is
    refused.  Said as every taking is, once, as the warning of the
    taking, naming the node; not as a Closed that could not be written
    ("Permission denied" alone says no taking), and nothing is written."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        taken = f"{bdev.nodename}/{node}".rstrip("/")
        perms = _left_by_a_taking(drvdom, write_only)
        caplog.clear()

        def vanish() -> None:
            # On the queue, after the taking: its event cannot come first.
            dom0_xs.rm(fe.device.frontend_path)
            drv._otherend_changed(bdev)

        call = vanish if how == "frontend vanishes" else lambda: drv._domain_dead(bdev)
        _refused_under(bdev, dom0_xs, call, node=node, perms=perms)
        _removed(drv, fe, bdev)
        assert bdev.gone
        _taking_warned_once(caplog, taken)
        assert _driver_domain_error(dom0_xs, drvdom, fe) is None
        assert dom0_xs.read(f"{bdev.nodename}/state") == str(int(S.CONNECTED))


def test_a_fatal_wrapped_to_return_none_is_no_drop(
        host, driver, frontends, dom0_xs, monkeypatch) -> None:
    """fatal() wrapped (by a driver, or a tracer) so that it returns None
    reported all the same: the device stays, Closing, for its frontend to
    start again; only False (nothing reported: the directory not ours)
    drops it."""
    real = xenbus.BackendDevice.fatal

    def wrapped(self, err: int, message: str) -> None:
        real(self, err, message)

    monkeypatch.setattr(xenbus.BackendDevice, "fatal", wrapped)

    def hook(_dev) -> None:
        raise ValueError("no ring for you")

    driver.connect_hook = hook
    guest, dev, fe = _at_init_wait(host, frontends, "bad")
    bdev = backend_device(driver, guest.domid)
    fe.publish()
    fe.wait_backend(S.CLOSING)
    bdev.events.flush()
    assert not bdev.gone and driver.devices() == [bdev]
    assert error_node(dom0_xs, dev) == "22 connecting: no ring for you"


def test_a_connect_again_first_undoes_the_one_before(host, driver, frontends) -> None:
    """_connect() on a device still connected (its Connected refused, say:
    the frontend then publishes again) disconnects first: connect() is
    never called twice without a disconnect() between, and nothing the
    first held is held twice."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    assert bdev.queue(driver._connect, bdev)
    bdev.events.flush()
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "connect"]
    assert bdev.resources == (1, 1)


def test_a_connect_that_reports_its_own_failure_and_returns_is_not_connected(
        host, driver, frontends, dom0_xs) -> None:
    """A driver's connect() that says its failure itself, as Linux's
    backends do (fatal(): error node and Closing), and returns: Connected
    was written over its Closing, and the frontend, told the device
    failed, then saw it connected, to a ring the driver never mapped.
    Its Closing stays, and what it set up is undone at once, as for a
    connect() that raised; the frontend may start again."""
    told: list[bool] = []
    plain = driver.connect

    def connect(dev: Any) -> None:
        driver._record("connect", dev)
        told.append(dev.fatal(errno.EIO, "no ring for you"))

    driver.connect = connect  # type: ignore[method-assign]
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = frontends(guest, dev)
    fe.wait_backend(S.INIT_WAIT)
    fe.publish()
    driver.wait_call("connect", guest.domid)
    bdev = backend_device(driver, guest.domid)
    bdev.events.flush()
    assert told == [True]
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSING))
    assert dom0_xs.read(f"/local/domain/0/error/backend/xbtest/{guest.domid}/0/error") == (
        f"{errno.EIO} no ring for you")
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect"]
    assert bdev.resources == (0, 0)
    driver.connect = plain  # type: ignore[method-assign]  # it starts again, and connects
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)
    fe.set_state(S.INITIALISING)
    fe.wait_backend(S.INIT_WAIT)
    fe.publish()
    fe.wait_backend(S.CONNECTED)


@pytest.mark.parametrize("then", ["returns", "raises"])
@pytest.mark.parametrize(("node", "write_only"), _TAKINGS)
def test_fatal_from_connect_on_a_node_taken_is_said_once(
        host, dom0_xs, frontends, caplog, then, node, write_only) -> None:
    """A driver's connect() calls fatal() with our ``state`` (or
    directory) taken, the taking's event not handled yet: fatal() is told
    False, and the driver returns (or raises, giving up).  One event, one
    failure: said once, as every taking is, and not again as the failure
    of the connect (the Connected it would write, or what it raised),
    which the same taking refuses and which reached nobody either."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        taken = f"{bdev.nodename}/{node}".rstrip("/")
        told: list[bool] = []

        def connect(dev: Any) -> None:
            drv._record("connect", dev)
            told.append(dev.fatal(errno.EIO, "in connect"))
            if then == "raises":
                raise OSError(errno.EIO, "gave up")

        _starting_over_with(drv, fe, bdev, connect)
        held, go = threading.Event(), threading.Event()
        assert bdev.events.call(lambda: (held.set(), go.wait(TIMEOUT)))
        assert held.wait(TIMEOUT)
        caplog.clear()
        fe.set_state(S.INITIALISED)  # its event waits behind the hold...
        dom0_xs.set_perms(taken, _left_by_a_taking(drvdom, write_only))
        go.set()  # ...and comes before the taking's, which goes by the bus
        _removed(drv, fe, bdev)
        assert told == [False]
        _dropped_writing_nothing(caplog, dom0_xs, drvdom, fe, bdev, taken, "in connect",
                                 state=S.INIT_WAIT)


def test_a_failure_reported_off_the_queue_on_a_state_taken_and_given_back_drops_the_device(
        host, dom0_xs, frontends, caplog) -> None:
    """As above, but from a thread of the driver's own, and the state is
    given back before the device's queue handles the events: fatal() told
    the driver False, and the failure reached nobody; the device is
    dropped all the same (left Connected, its frontend would wait on a
    driver that gave up), said once."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        state = f"{bdev.nodename}/state"
        held, go = threading.Event(), threading.Event()
        assert bdev.queue(lambda: (held.set(), go.wait(TIMEOUT)))
        assert held.wait(TIMEOUT)
        caplog.clear()
        dom0_xs.set_perms(state, ["n0"])
        told = bdev.fatal(errno.EIO, "off the queue")
        dom0_xs.set_perms(state, [f"n{drvdom.domid}", f"r{fe.guest.domid}"])
        go.set()
        _removed(drv, fe, bdev)
        assert told is False and bdev.gone
        _dropped_writing_nothing(caplog, dom0_xs, drvdom, fe, bdev, state, "off the queue")


def test_a_report_on_a_state_taken_leaves_a_device_made_again_before_its_drop_alone(
        host, dom0_xs, frontends, caplog) -> None:
    """As above, but before the device's queue gets to the drop that
    fatal() queued, the toolstack deletes the device (a forced removal)
    and makes it again at the same path: the drop is the old device's
    alone, writing nothing; the new one is probed and served, nothing
    of the old failure reported there."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    drvdom, drv, (fe,) = _driver_domain_backend(host, dom0_xs, frontends, ("one",), (0,))
    try:
        guest = fe.guest
        old = backend_device(drv, guest.domid)
        held, go = threading.Event(), threading.Event()
        assert old.queue(lambda: (held.set(), go.wait(TIMEOUT)))
        assert held.wait(TIMEOUT)
        caplog.clear()
        dom0_xs.set_perms(f"{old.nodename}/state", ["n0"])
        told = old.fatal(errno.EIO, "the old device's failure")
        host.toolstack.destroy_device(fe.device)
        again = host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
        go.set()
        fe = _connect(frontends, guest, again)
        new = backend_device(drv, guest.domid)
        assert told is False and old.gone and new is not old and not new.gone
        assert drv.calls_of(guest.domid) == [
            "probe", "connect", "disconnect", "remove", "probe", "connect"]
        assert _driver_domain_error(dom0_xs, drvdom, fe) is None
        assert dom0_xs.read(f"{again.backend_path}/state") == str(int(S.CONNECTED))
        # The old device's taking, if said, is its only warning.
        assert [r.msg for r in _backend_warnings(caplog)] in ([], [
            "%s: its own node may not be read any more (%s): dropping the device, "
            "writing nothing there"])
        said = [r for r in caplog.records if "the old device's failure" in r.getMessage()]
        assert [r.levelno for r in said] == [logging.INFO]
    finally:
        drv.stop()


@pytest.mark.parametrize("write_only", [False, True], ids=["state", "state-write-only"])
def test_a_state_taken_between_the_look_and_fatal_is_said_once(
        host, dom0_xs, frontends, monkeypatch, caplog, write_only) -> None:
    """A failure of the device (_fatal_or_drop) whose look at the
    directory reads our state fine, the toolstack taking it just before
    fatal()'s transaction: fatal() finds it taken and tells False; the
    device is dropped as for a taking, writing nothing (no Closed tried,
    and said refused), said once."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        state = f"{bdev.nodename}/state"
        perms = _left_by_a_taking(drvdom, write_only)
        plain = type(bdev).fatal

        def fatal(err: int, message: str) -> bool:
            dom0_xs.set_perms(state, perms)
            return plain(bdev, err, message)

        monkeypatch.setattr(bdev, "fatal", fatal)
        caplog.clear()
        told = _fatal_or_drop_after(bdev, drv, lambda: None)
        drv._bus.flush()
        assert told == [False] and bdev.gone
        _dropped_writing_nothing(caplog, dom0_xs, drvdom, fe, bdev, state, "failed")


def test_a_report_refused_whose_nodes_read_again_lose_xenstore_raises_nothing(
        frontends, caplog, monkeypatch) -> None:
    """error() whose error node is refused (EACCES: the toolstack took
    our ``error`` directory), and XenStore ends our connection as our
    nodes are read again to tell whether one of them was taken (see
    BackendDevice._taken_from_us): no taking, and reporting an error
    raises none; the failure is said as ours, as for any report whose
    transaction fails so, and the loss once, by itself."""
    caplog.set_level(logging.DEBUG, logger="xenback.xenbus")
    host = SimHost()
    host.start()
    try:
        with XenStore(host.dom0.xenstore()) as dom0_xs:
            drvdom, drv, (fe,) = _driver_domain_backend(host, dom0_xs, frontends, ("one",), (0,))
            try:
                bdev = backend_device(drv, fe.guest.domid)
                _take_error_directory(dom0_xs, drvdom)

                def lose_xenstore() -> None:
                    host.close()
                    assert drv.xenstore.connection_lost.wait(TIMEOUT)

                looks = _at_first_look_again(drv, bdev, monkeypatch, lose_xenstore)
                caplog.clear()
                told = bdev.error(errno.EIO, "as XenStore goes")  # does not raise
                assert looks == [bdev.nodename]
                assert told is True
                assert not [r for r in caplog.records if "not reported there" in r.getMessage()]
                assert [r.msg for r in caplog.records
                        if r.name == "xenback.xenbus" and r.levelno >= logging.ERROR] == [
                    "%s: error %d: %s"]
                (unwritten,) = [r for r in caplog.records
                                if r.msg == "%s: could not write the error node: %s"]
                assert isinstance(unwritten.args[1], PermissionError)  # type: ignore[index]
                # The loss said it: no refusal of ours.
                assert unwritten.levelno == logging.DEBUG
            finally:
                drv.stop()
    finally:
        host.close()


def test_a_report_refused_whose_nodes_read_again_meet_our_domain_going_is_no_taking(
        host, dom0_xs, frontends, caplog, monkeypatch) -> None:
    """As above, but it is our own domain that goes (libxl deletes our
    home) as our nodes are read again: the EACCES they get is our
    domain going, said once for all, and no taking of a node of ours,
    which would be said as a refusal of its own."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        _take_error_directory(dom0_xs, drvdom)
        looks = _at_first_look_again(  # our domain goes
            drv, bdev, monkeypatch, lambda: dom0_xs.rm(f"/local/domain/{drvdom.domid}"))
        caplog.clear()
        bdev.error(errno.EIO, "as our domain goes")
        drv.wait(lambda: drv.devices() == [])
        bdev.events.flush()
        drv._bus.flush()
        assert looks == [bdev.nodename]
        assert not [r for r in caplog.records if "not reported there" in r.getMessage()]
        # The failure said as ours, as for any report whose transaction
        # fails so; the refused error node's line is the going's.
        assert _going_said(caplog) == [f"{bdev.nodename}: error {errno.EIO}: as our domain goes"]
        assert drv.calls_of(fe.guest.domid) == ["probe", "connect", "disconnect", "remove"]


def test_a_frontend_a_driver_domain_may_not_read_at_probe_is_the_probes_failure(
        host, dom0_xs, caplog) -> None:
    """A driver domain's backend looks, before probe(), at a frontend
    directory it may not read (its guest took it away, or it went as the
    device was made: a driver domain may not read ``/local/domain``
    either).  That EACCES is the look's answer, the probe's failure, and
    is reported as every failed look is (error node and Closing), the
    look made again as the failure is written finding it alike: no node
    of ours taken, nor our domain going (see _how_lookup_fails)."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    drvdom = host.create_domain("driver-domain")
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
    dom0_xs.set_perms(dev.frontend_path, [f"n{guest.domid}"])  # the guest's doing, say
    drv = RecordingDriver(drvdom)
    caplog.clear()
    drv.start()
    try:
        error = f"/local/domain/{drvdom.domid}/error/backend/xbtest/{guest.domid}/0/error"
        assert eventually(
            lambda: dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSING)))
        assert dom0_xs.read(error) == (
            f"{errno.EACCES} probing: Permission denied: {dev.frontend_path}")
        (bdev,) = drv.devices()
        bdev.events.flush()  # the failure is logged once its Closing is written
        assert drv.calls == []
        assert [r.msg for r in _backend_warnings(caplog)] == ["%s: error %d: %s"]
        assert not [r for r in caplog.records if "not reported there" in r.getMessage()]
    finally:
        drv.stop()


def test_a_state_taken_after_its_write_was_refused_is_said_once(
        host, dom0_xs, frontends, monkeypatch, caplog) -> None:
    """fatal() with our ``state`` left to us to read only: its Closing is
    refused, and the error node goes alone, in a transaction of its own;
    the toolstack takes the state outright between the two.  The error
    node's transaction finds it taken: the refused Closing is then the
    taking's, and said by it, as the failure is (see
    BackendDevice._refused_report): nothing written, False told, the
    device dropped, one warning."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        state = f"{bdev.nodename}/state"
        xs = drv.xenstore
        plain = xs.transaction
        runs: list[int] = []

        def transaction(body: Any, *args: Any, **kwargs: Any) -> Any:
            runs.append(len(runs))
            if len(runs) == 2:
                dom0_xs.set_perms(state, ["n0"])  # taken outright
            return plain(body, *args, **kwargs)

        told = _refused_under(
            bdev, dom0_xs,
            lambda: (monkeypatch.setattr(xs, "transaction", transaction),
                     bdev.fatal(errno.EIO, "unreadable"))[1],
            perms=["n0", f"r{drvdom.domid}"])
        _removed(drv, fe, bdev)
        assert len(runs) >= 2, "the error node's own transaction was not run"
        assert told == [False]
        _dropped_writing_nothing(caplog, dom0_xs, drvdom, fe, bdev, state, "unreadable")


def test_a_failure_whose_look_passes_as_a_report_meets_the_state_taken_is_still_reported(
        host, dom0_xs, frontends, monkeypatch, caplog) -> None:
    """A failure of the device (_fatal_or_drop) whose look at the
    directory finds it ours, as a report of another thread of the
    driver's meets our state taken and queues the drop (see
    BackendDevice._refused_report), the toolstack giving the state back
    at once: the failure met now is reported as ever (error node and
    Closing: fatal() finds nothing taken), not lost for the other's
    refusal; the drop queued follows, said once."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        state = f"{bdev.nodename}/state"
        perms = dom0_xs.get_perms(state)
        plain = bdev._stale
        other: list[bool] = []
        armed: list[bool] = []

        def stale(t: Any) -> str | None:
            why = plain(t)
            if armed and not other:  # the look of _fatal_or_drop
                dom0_xs.set_perms(state, ["n0"])
                other.append(bdev.error(errno.EIO, "the other's"))
                dom0_xs.set_perms(state, perms)
            return why

        monkeypatch.setattr(bdev, "_stale", stale)
        caplog.clear()
        # A change in our directory handled first (a watch of our own
        # writes can still be on its way) looks too: not the look meant.
        assert bdev.events.call(drv._backend_changed, bdev)
        told = _fatal_or_drop_after(bdev, drv, lambda: armed.append(True))
        _removed(drv, fe, bdev)
        assert other == [False] and told == [True]
        assert _driver_domain_error(dom0_xs, drvdom, fe) == f"{errno.EIO} failed"
        assert dom0_xs.read(state) == str(int(S.CLOSING))
        assert not [r for r in caplog.records if r.exc_info is not None]
        assert [r.msg for r in _backend_warnings(caplog)] == [
            "%s: error %d: %s",
            "%s: its own node may not be read any more (%s): dropping the device, "
            "writing nothing there"]
        said = [r.getMessage() for r in caplog.records]
        assert [m for m in said if "not reported there" in m] == [
            f"{bdev.nodename}: the other's (errno {errno.EIO}), and {state} may not be read: "
            "not reported there"]


def _fatal_or_drop_after(bdev: Any, drv: Any, then: Any) -> list[BaseException | bool]:
    """On ``bdev``'s queue, ``then()`` and a failure of the device
    (_fatal_or_drop, as the frontend_changed table's would be): what it
    returned or raised, in a list."""
    told: list[BaseException | bool] = []

    def fail() -> None:
        then()
        try:
            told.append(drv._fatal_or_drop(bdev, errno.EIO, "failed"))
        except PermissionError as exc:
            told.append(exc)

    assert bdev.events.call(fail)
    bdev.events.flush()
    return told


def test_a_failure_met_as_our_domain_goes_is_no_refusal_of_our_state(
        host, dom0_xs, frontends, caplog) -> None:
    """Our home deleted (our domain going), the look at whose directory a
    failure is reads EACCES too: the domain's end, not a node the
    toolstack took.  It goes to the callback's handler, which says the
    cause once (see _lost_domain); no refusal is said, nor the failure as
    one not reported, and the device is dropped as the domain's every
    device is."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        caplog.clear()
        told = _fatal_or_drop_after(bdev, drv, lambda: dom0_xs.rm(f"/local/domain/{drvdom.domid}"))
        assert [type(t) for t in told] == [PermissionError], told
        drv.wait_removed(fe.guest.domid)
        assert not [r for r in caplog.records if "may not be read" in r.getMessage()
                    or "not reported there" in r.getMessage()]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failure_met_as_xenstore_goes_is_no_refusal_of_our_state(
        frontends, caplog, monkeypatch) -> None:
    """As above, but XenStore ends our connection and an EACCES it could
    no longer explain reaches the look (see _said_already): the loss is
    said once, by itself; the device is neither said refused nor dropped
    for it."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    host = SimHost()
    host.start()
    drv = RecordingDriver(host.dom0)
    drv.start()
    try:
        guest = host.create_domain("guest")
        dev = host.toolstack.add_device("xbtest", guest.domid)
        _connect(frontends, guest, dev)
        bdev = backend_device(drv, guest.domid)

        def lose() -> None:
            host.close()
            assert drv.xenstore.connection_lost.wait(TIMEOUT)

            def read(path: str, *args: Any) -> Any:
                raise PermissionError(errno.EACCES, "Permission denied", path)

            monkeypatch.setattr(drv.xenstore, "read", read)

        caplog.clear()
        told = _fatal_or_drop_after(bdev, drv, lose)
        assert [type(t) for t in told] == [PermissionError], told
        assert not bdev.gone
        assert not [r for r in caplog.records if "may not be read" in r.getMessage()
                    or "not reported there" in r.getMessage()]
    finally:
        host.close()
        drv.stop()


def test_a_failed_look_at_the_frontend_that_then_appeared_says_so(
        host, driver, frontends, dom0_xs, caplog, monkeypatch) -> None:
    """The look before probe() finds no frontend directory, which then
    appears (a toolstack that writes the backend first) before the look
    made again to write the failure: the directory is probed anew and
    served, as a re-created one would be, but it was never deleted nor
    made again, and the line that says why the failure is not reported
    must not say it was."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    guest = host.create_domain("guest")
    watched = f"/local/domain/{guest.domid}/device/xbtest/0"
    plain_exists = driver.xenstore.exists
    lied: list[str] = []

    def exists(path: str) -> bool:
        if path == watched and not lied:
            lied.append(path)
            return False  # not there yet, as far as this look saw
        return plain_exists(path)

    monkeypatch.setattr(driver.xenstore, "exists", exists)
    dev = host.toolstack.add_device("xbtest", guest.domid)
    fe = _connect(frontends, guest, dev)
    assert lied == [watched]
    assert error_node(dom0_xs, dev) is None
    assert driver.calls_of(guest.domid) == ["probe", "connect"]
    (said,) = [r.getMessage() for r in caplog.records if "not reported there" in r.getMessage()]
    assert "deleted" not in said and "the frontend appeared since" in said, said
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)


def test_a_removal_we_may_not_close_is_said_not_a_traceback(
        host, dom0_xs, frontends, caplog) -> None:
    """A device we do not serve (dropped as the toolstack took its state)
    whose state is given back read-only, then removed (``online`` = 0,
    Closing): the look at the path would close it for the toolstack
    (_close_unprobed), but may not write its state: said once as a
    warning (the removal is an event for each node it writes), not a
    traceback on the bus queue.  With its ``online`` taken in turn, no
    removal can be told: nothing is said.  Either way the toolstack
    waits its timeout, as it made it so."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        state = f"{bdev.nodename}/state"
        for refused, perms, warned in ((state, ["n0", f"r{drvdom.domid}"], [state]),
                                       (f"{bdev.nodename}/online", ["n0"], [])):
            dom0_xs.set_perms(state, ["n0"])
            drv.wait(lambda bdev=bdev: bdev.gone)
            dom0_xs.set_perms(state, ["n0", f"r{drvdom.domid}"])
            dom0_xs.set_perms(refused, perms)
            caplog.clear()
            assert not host.toolstack.remove_device(fe.device, 0.2)
            drv._bus.flush()
            assert not [r for r in caplog.records if r.exc_info is not None]
            said = [r for r in _backend_warnings(caplog)]
            assert [r.args[-1].filename for r in said] == warned, said  # type: ignore[index]
            # The next device at the path is served as ever.
            dev = host.toolstack.add_device("xbtest", fe.guest.domid, backend_id=drvdom.domid)
            fe = _connect(frontends, fe.guest, dev)
            bdev = backend_device(drv, fe.guest.domid)


@pytest.mark.parametrize("closing", [True, False], ids=["closing-first", "closed-at-once"])
def test_an_online_node_the_toolstack_takes_drops_the_device_as_its_frontend_closes(
        host, dom0_xs, frontends, caplog, closing) -> None:
    """The toolstack takes a device's ``online`` from the driver domain's
    backend.  As its frontend closes, the backend reads it to know
    whether to drop the device (at its own Closing, or at the frontend's
    Closed): refused, that is a node of our own we may no longer read, as
    a taken state, and the device is dropped, said once as a warning, not
    failed with an error node and a Closing over the Closed its frontend
    was answered.  At our own Closing, with its frontend still there to
    close, that is not yet: as Linux, which reads ``online`` only at the
    frontend's Closed, the device is served until then, and the frontend
    gets its Closed."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        online = f"{bdev.nodename}/online"
        dom0_xs.set_perms(online, ["n0"])
        caplog.clear()
        if closing:
            fe.set_state(S.CLOSING)
            fe.wait_backend(S.CLOSING)
            # Our Closing's watch event on the queue, and run: handled
            # after the frontend's Closed, it would find online taken and
            # drop the device before the Closed is answered.
            handed_over(drv.xenstore, "closing", base=f"/local/domain/{drvdom.domid}/data")
            bdev.events.flush()
            assert not bdev.gone and _backend_warnings(caplog) == []
        fe.set_state(S.CLOSED)
        _removed(drv, fe, bdev)
        assert dom0_xs.read(f"{bdev.nodename}/state") == str(int(S.CLOSED))
        assert _driver_domain_error(dom0_xs, drvdom, fe) is None
        assert not [r for r in caplog.records if r.exc_info is not None]
        (said,) = _backend_warnings(caplog)
        assert said.args[1].filename == online  # type: ignore[index]


def test_a_frontend_starting_over_after_our_closing_with_online_taken_is_served(
        host, dom0_xs, frontends, caplog) -> None:
    """The toolstack takes a device's ``online`` from the driver domain's
    backend, and the device goes Closing for a failure (here an
    impossible frontend state).  A frontend starting over (Initialising)
    gets InitWait, as in Linux, whose switches never read ``online``:
    whether our Closing was a removal's, nobody can tell, and, as at our
    own Closing (see above), that is no removal yet.  The switch's look
    at ``online``, refused, failed the device again instead (error 13 and
    a traceback), and left it Closing for good."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        dom0_xs.set_perms(f"{bdev.nodename}/online", ["n0"])
        fe.set_state(S.INIT_WAIT)  # a backend's state: impossible for a frontend
        fe.wait_backend(S.CLOSING)
        # Our Closing seen first, its frontend still there to close it
        # (the frontend starting over by then leaves nothing to close it:
        # the device is dropped then, see _backend_changed): its watch
        # event on the device's queue, and run.
        handed_over(drv.xenstore, "closing", base=f"/local/domain/{drvdom.domid}/data")
        bdev.events.flush()
        caplog.clear()
        fe.set_state(S.INITIALISING)
        fe.wait_backend(S.INIT_WAIT)
        bdev.events.flush()
        assert not bdev.gone
        assert not [r for r in caplog.records if r.exc_info is not None]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_directory_the_toolstack_takes_is_not_probed_again_and_again(
        host, dom0_xs, frontends, caplog) -> None:
    """The toolstack takes a device's directory itself from the driver
    domain's backend (its ``state`` still readable): the device is
    dropped, as for a taken state, since every look at whose the
    directory is reads it first.  An Initialising state there then (the
    toolstack's own write) is no new device for us: probed, it would be
    dropped at its first look for the same reason, and the drop's look at
    the path would probe it again, for ever, a warning each time.  Given
    back, the directory is served as a new device."""
    drvdom, drv, (fe,) = _driver_domain_backend(host, dom0_xs, frontends, ("one",), (0,))
    try:
        guest, dev = fe.guest, fe.device
        bdev = backend_device(drv, guest.domid)
        caplog.clear()
        dom0_xs.set_perms(bdev.nodename, ["n0"])
        drv.wait_removed(guest.domid)
        fe.close()
        dom0_xs.write(f"{bdev.nodename}/state", str(int(S.INITIALISING)))
        handed_over(drv.xenstore, "taken", base=f"/local/domain/{drvdom.domid}/data")
        drv._bus.flush()
        assert drv.devices() == []
        # The guest's driver starts over before the directory is given
        # back: the dead one's Connected, its ring-ref's grant gone, would
        # be connected to at once, and fail.
        dom0_xs.write(f"{dev.frontend_path}/state", str(int(S.INITIALISING)))
        dom0_xs.set_perms(bdev.nodename, [f"n{drvdom.domid}", f"r{guest.domid}"])
        fe = _connect(frontends, guest, dev)
        assert drv.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove",
                                             "probe", "connect"]
        assert not [r for r in caplog.records if r.exc_info is not None]
        (said,) = _backend_warnings(caplog)
        assert said.args[1].filename == bdev.nodename  # type: ignore[index]
    finally:
        drv.stop()


@pytest.mark.parametrize("deleted", ["parent", "device"])
def test_a_removal_we_may_not_close_is_said_again_for_the_next_device_once_deleted(
        host, dom0_xs, frontends, caplog, deleted) -> None:
    """A removal whose Closed we may not write is said once while the
    state stays Closing (every device listed looked at again does not
    say it again), and forgotten once the device is deleted: by itself,
    or with the frontend's whole directory under ``backend/<type>``,
    whose one event names that directory alone (the look at every device
    listed, which sees no such device any more).  The next device made at the path, already removed
    when we first look (online = 0, Closing, its state read-only to us,
    in one transaction), is another removal we may not close: said as a
    warning too, not taken for the one said already."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        path, state = bdev.nodename, f"{bdev.nodename}/state"
        read_only = ["n0", f"r{drvdom.domid}"]
        dom0_xs.set_perms(state, ["n0"])
        drv.wait(lambda: bdev.gone)
        dom0_xs.set_perms(state, read_only)
        fe.close()
        data = f"/local/domain/{drvdom.domid}/data"

        def removed(t: Transaction) -> None:
            t.write(f"{path}/online", "0")
            t.write(state, str(int(S.CLOSING)))
            t.set_perms(state, read_only)

        for i in range(2):
            handed_over(drv.xenstore, f"before{i}", base=data)
            drv._bus.flush()
            caplog.clear()
            dom0_xs.transaction(removed)
            handed_over(drv.xenstore, f"removed{i}", base=data)
            drv._bus.flush()
            said = _backend_warnings(caplog)
            assert [r.args[-1].filename for r in said] == [state], said  # type: ignore[index]
            # Once only, though every device listed is looked at again.
            dom0_xs.write(f"{drv.backend_root}/999", "")
            dom0_xs.rm(f"{drv.backend_root}/999")
            handed_over(drv.xenstore, f"looked{i}", base=data)
            drv._bus.flush()
            assert _backend_warnings(caplog) == said
            dom0_xs.rm(path.rsplit("/", 1)[0] if deleted == "parent" else path)
            handed_over(drv.xenstore, f"deleted{i}", base=data)
            drv._bus.flush()
            assert drv.devices() == []


def _going_said(caplog) -> list[str]:
    """The warnings xenback said, but that the domain goes (said once)."""
    said = [r.getMessage() for r in _backend_warnings(caplog)]
    going = [m for m in said if "is going away" in m]
    assert len(going) == 1, said
    return [m for m in said if m not in going]


@pytest.mark.parametrize("closing", ["frontend", "toolstack"])
def test_an_online_refused_as_the_domain_goes_is_no_refusal_of_ours(
        host, dom0_xs, frontends, caplog, monkeypatch, closing) -> None:
    """Our home deleted (libxl destroying our driver domain) just before
    a device reads its ``online``, at its frontend's Closed or at the
    Closing the toolstack wrote: the EACCES is our domain going, said
    once for all, not a node the toolstack took ("its own node may not be
    read any more"), which nobody did."""
    drvdom, drv, (fe,) = _driver_domain_backend(host, dom0_xs, frontends, ("one",), (0,))
    bdev = backend_device(drv, fe.guest.domid)
    online = f"{bdev.nodename}/online"
    read_int = drv.xenstore.read_int
    armed, refused = threading.Event(), []

    def home_gone_then(path: str, default: Any = None) -> Any:
        if path != online or not armed.is_set():
            return read_int(path, default)
        armed.clear()
        dom0_xs.rm(f"/local/domain/{drvdom.domid}")
        try:
            return read_int(path, default)
        except PermissionError as exc:
            refused.append(exc)
            raise

    monkeypatch.setattr(drv.xenstore, "read_int", home_gone_then)
    try:
        if closing == "toolstack":
            fe.set_state(S.CLOSED)
            fe.wait_backend(S.CLOSED)
            bdev.events.flush()
        caplog.clear()
        armed.set()
        if closing == "toolstack":
            dom0_xs.write(f"{bdev.nodename}/state", str(int(S.CLOSING)))
        else:
            fe.set_state(S.CLOSED)
        drv.wait_removed(fe.guest.domid)
        assert refused, "online was not refused: the test no longer tests anything"
        assert _going_said(caplog) == []
    finally:
        drv.stop()


@pytest.mark.parametrize("where", ["taken-over", "new", "new-state", "removed"])
def test_a_read_refused_as_the_domain_goes_is_not_passed_over_by_discovery(
        host, dom0_xs, frontends, caplog, monkeypatch, where) -> None:
    """Our home deleted just before discovery reads a device's node: the
    ``online`` of one left Closed at start, the directory or the state of
    a new one, the state of one removed before we saw it.  The EACCES is our domain
    going, learnt there and then and said once, not a node the toolstack
    took, which discovery passes over ("not served", "not closed") for
    the next request to learn of the domain's going."""
    drvdom = host.create_domain("driver-domain")
    dom0_xs.set_perms("@releaseDomain", ["n0", f"r{drvdom.domid}"])
    guest = host.create_domain("one")
    drv = RecordingDriver(drvdom)
    home = f"/local/domain/{drvdom.domid}"
    path = f"{home}/backend/xbtest/{guest.domid}/0"
    node = {"taken-over": f"{path}/online", "new": path, "new-state": f"{path}/state",
            "removed": f"{path}/state"}[where]
    armed, refused = threading.Event(), []

    def home_gone_then(store: Any, read: Any, p: str, *args: Any) -> Any:
        if p != node or not armed.is_set() or drv._bus is None:
            return read(store, p, *args)
        armed.clear()
        dom0_xs.rm(home)
        try:
            return read(store, p, *args)
        except PermissionError as exc:
            refused.append(exc)
            raise

    cls = Transaction if where == "removed" else XenStore
    monkeypatch.setattr(cls, "read", functools.partialmethod(home_gone_then, cls.read))
    caplog.set_level(logging.DEBUG, logger="xenback.xenbus")
    try:
        if where == "taken-over":
            host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
            dom0_xs.write(f"{path}/state", str(int(S.CLOSED)))
            armed.set()
            drv.start()
        else:
            drv.start()
            # Its first look, which would take a device found over.
            handed_over(drv.xenstore, "started", base=f"{home}/data")
            drv._bus.flush()
            armed.set()
            if where.startswith("new"):
                host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
            else:
                def removed(t: Transaction) -> None:
                    t.write(f"{path}/online", "0")
                    t.write(f"{path}/state", str(int(S.CLOSING)))
                dom0_xs.transaction(removed)
        assert eventually(lambda: refused and drv._domain_gone)
        drv._bus.flush()
        assert drv.devices() == [] and drv.calls == []
        assert _going_said(caplog) == []
        passed = [r.getMessage() for r in caplog.records
                  if r.msg in ("%s: not served: %s", "%s: not closed: %s")]
        assert passed == []
    finally:
        drv.stop()


def test_an_online_we_may_not_read_at_start_is_no_device_to_take_over(
        host, dom0_xs, frontends, caplog) -> None:
    """A device an earlier backend left Closed, whose ``online`` the
    toolstack took from us: read as 0 (a removal answered), as Linux's
    xenbus_dev_is_online() reads any failure, it is not taken over, and
    nothing is written there or said."""
    drvdom = host.create_domain("driver-domain")
    guest = host.create_domain("one")
    dev = host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
    dom0_xs.write(f"{dev.backend_path}/state", str(int(S.CLOSED)))
    dom0_xs.set_perms(f"{dev.backend_path}/online", ["n0"])
    drv = RecordingDriver(drvdom)
    caplog.clear()
    drv.start()
    try:
        handed_over(drv.xenstore, "started", base=f"/local/domain/{drvdom.domid}/data")
        drv._bus.flush()
        assert drv.devices() == [] and drv.calls == []
        assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSED))
        assert _backend_warnings(caplog) == []
    finally:
        drv.stop()


def test_a_removal_we_may_not_close_is_said_again_in_a_new_run(
        host, dom0_xs, frontends, caplog) -> None:
    """A removal whose Closed we may not write, said in one run, is said
    again in the next: a new run says what it leaves (as it says the
    junk it ignores), here once the toolstack gives back the state it
    had taken as the run started."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        path, state = bdev.nodename, f"{bdev.nodename}/state"
        read_only = ["n0", f"r{drvdom.domid}"]
        data = f"/local/domain/{drvdom.domid}/data"
        dom0_xs.set_perms(state, ["n0"])
        drv.wait(lambda: bdev.gone)
        fe.close()

        def removed(t: Transaction) -> None:
            t.write(f"{path}/online", "0")
            t.write(state, str(int(S.CLOSING)))
            t.set_perms(state, read_only)

        dom0_xs.transaction(removed)
        handed_over(drv.xenstore, "removed", base=data)
        drv._bus.flush()
        dom0_xs.set_perms(state, ["n0"])
        drv.stop()
        drv.start()
        handed_over(drv.xenstore, "started", base=data)
        drv._bus.flush()
        caplog.clear()
        dom0_xs.set_perms(state, read_only)
        handed_over(drv.xenstore, "given", base=data)
        drv._bus.flush()
        said = _backend_warnings(caplog)
        assert [r.args[-1].filename for r in said] == [state], said  # type: ignore[index]


def test_an_online_node_taken_with_no_frontend_left_drops_the_device_at_a_removal(
        host, dom0_xs, frontends, caplog) -> None:
    """The toolstack takes a device's ``online`` and writes Closing (a
    removal, as it were) while its frontend is Closed: no frontend is
    left to close it, so the device is dropped there and then, as a
    removal would be, said once as a warning and nothing written (the
    Closing stays), as for a state taken."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        fe.set_state(S.CLOSED)
        fe.wait_backend(S.CLOSED)
        # The backend's Closed may answer an earlier event that read the
        # frontend's Closed already: the Closed's own event, still on the
        # watch thread, would write Closed over the toolstack's Closing.
        handed_over(drv.xenstore, "closed", base=f"/local/domain/{drvdom.domid}/data")
        bdev.events.flush()
        online = f"{bdev.nodename}/online"
        dom0_xs.set_perms(online, ["n0"])
        caplog.clear()
        dom0_xs.write(f"{bdev.nodename}/state", str(int(S.CLOSING)))
        drv.wait_removed(fe.guest.domid)
        drv._bus.flush()
        assert dom0_xs.read(f"{bdev.nodename}/state") == str(int(S.CLOSING))
        (said,) = _backend_warnings(caplog)
        assert said.args[1].filename == online  # type: ignore[index]


def test_a_removal_closed_then_taken_as_its_transaction_retries_is_not_said(
        host, dom0_xs, frontends, caplog, monkeypatch) -> None:
    """The toolstack takes the state of a removal we close for it (a
    device we never served) while our transaction writes Closed: the
    commit conflicts, and the retry may not read the state.  Nodes we may
    not read tell no removal, as the docstring of _close_unprobed says:
    nothing said, though the attempt before had found one asked for."""
    drvdom, drv, _ = _driver_domain_backend(host, dom0_xs, frontends, (), ())
    guest = host.create_domain("one")
    home = f"/local/domain/{drvdom.domid}"
    path = f"{home}/backend/xbtest/{guest.domid}/0"
    state = f"{path}/state"
    write = Transaction.write
    taken: list[str] = []

    def taken_then(t: Transaction, p: str, value: str | int) -> None:
        write(t, p, value)
        if p == state and not taken:
            taken.append(p)
            dom0_xs.set_perms(state, ["n0"])  # the commit conflicts

    try:
        handed_over(drv.xenstore, "started", base=f"{home}/data")
        drv._bus.flush()
        monkeypatch.setattr(Transaction, "write", taken_then)

        def removed(t: Transaction) -> None:
            t.write(f"{path}/online", "0")
            write(t, state, str(int(S.CLOSING)))
            t.set_perms(state, [f"n{drvdom.domid}"])

        caplog.clear()
        dom0_xs.transaction(removed)
        handed_over(drv.xenstore, "removed", base=f"{home}/data")
        drv._bus.flush()
        assert taken, "Closed was not written: the test no longer tests anything"
        assert _backend_warnings(caplog) == []
        assert dom0_xs.read(state) == str(int(S.CLOSING))
    finally:
        drv.stop()


def test_a_connect_that_reports_its_own_failure_on_a_read_only_state_is_not_connected(
        host, dom0_xs, frontends, caplog) -> None:
    """As above, with our state left to us to read only (the toolstack's
    set_perms): fatal() writes the error node alone, says its Closing
    refused, and tells True, our state unchanged.  The connect() failed
    all the same: no Connected tried over it (refused too, it was said as
    a second failure, "Permission denied", whose error node replaced the
    driver's), and what connect() set up is undone at once."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        told: list[bool] = []

        def connect(dev: Any) -> None:
            drv._record("connect", dev)
            told.append(dev.fatal(errno.EIO, "in connect"))

        _starting_over_with(drv, fe, bdev, connect)
        dom0_xs.set_perms(f"{bdev.nodename}/state", ["n0", f"r{drvdom.domid}"])
        bdev.events.flush()
        caplog.clear()
        fe.set_state(S.INITIALISED)
        drv.wait_call("connect", fe.guest.domid, count=2)
        bdev.events.flush()
        assert told == [True]
        assert drv.calls_of(fe.guest.domid)[-2:] == ["connect", "disconnect"]
        assert bdev.resources == (0, 0)
        assert _driver_domain_error(dom0_xs, drvdom, fe) == f"{errno.EIO} in connect"
        errors = [r.getMessage() for r in caplog.records
                  if r.levelno >= logging.ERROR and r.name == "xenback.xenbus"]
        assert errors == [f"{bdev.nodename}: error {errno.EIO}: in connect"], errors
        assert [r.msg for r in _backend_warnings(caplog) if r.levelno == logging.WARNING] == [
            "%s: could not switch to Closing: %s"]
        assert not bdev.gone


def test_a_connected_refused_on_a_read_only_state_undoes_the_connection(
        host, dom0_xs, frontends, caplog) -> None:
    """connect() succeeds, but the switch to Connected is refused (our state
    left to us to read only, the toolstack's set_perms): the device fails
    (error node; its Closing is refused too) and, as for a connect() that
    raised, what connect() set up is undone at once.  Kept, the frontend's
    ring stayed mapped and its port bound for a connection the frontend
    was never told of, and never could be told to close: nothing but its
    own next state, or the device's removal, released them."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        _starting_over_with(drv, fe, bdev, drv.connect)
        dom0_xs.set_perms(f"{bdev.nodename}/state", ["n0", f"r{drvdom.domid}"])
        bdev.events.flush()
        caplog.clear()
        fe.set_state(S.INITIALISED)
        drv.wait_call("connect", fe.guest.domid, count=2)
        bdev.events.flush()
        assert _driver_domain_error(dom0_xs, drvdom, fe) == (
            f"{errno.EACCES} frontend state {int(S.INITIALISED)}: Permission denied: "
            f"{bdev.nodename}/state")
        assert drv.calls_of(fe.guest.domid)[-2:] == ["connect", "disconnect"]
        assert bdev.resources == (0, 0)
        assert dom0_xs.read(f"{bdev.nodename}/state") == str(int(S.INIT_WAIT))
        assert not bdev.gone
        # The frontend may publish again: connected anew, and refused again.
        fe.set_state(S.CONNECTED)
        drv.wait_call("connect", fe.guest.domid, count=3)
        bdev.events.flush()
        assert drv.calls_of(fe.guest.domid)[-2:] == ["connect", "disconnect"]
        assert bdev.resources == (0, 0)


def test_a_connected_xenstore_refuses_otherwise_undoes_the_connection_before_closing(
        host, driver, dom0_xs, frontends, monkeypatch) -> None:
    """The switch to Connected fails with another error than a state left
    to us to read only (ENOSPC here, a quota of XenStore's, say): undone
    all the same, before the Closing the failure's report writes, as for
    a connect() that failed.  Only a refused state undone, the device
    would say Closing with the frontend's ring still mapped and its port
    bound, until the frontend answered."""
    guest = host.create_domain("guest")
    device = host.toolstack.add_device("xbtest", guest.domid)
    fe = frontends(guest, device)
    fe.wait_backend(S.INIT_WAIT)
    bdev = backend_device(driver, guest.domid)
    state_path = f"{bdev.nodename}/state"
    plain_write = Transaction.write
    refused: list[str] = []

    def write(t: Transaction, path: str, value: str | int) -> None:
        if path == state_path and str(value) == str(int(S.CONNECTED)) and not refused:
            refused.append(path)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        plain_write(t, path, value)

    monkeypatch.setattr(Transaction, "write", write)
    fe.publish()
    fe.wait_backend(S.CLOSING)
    bdev.events.flush()
    assert refused == [state_path]
    assert error_node(dom0_xs, device) == (
        f"{errno.ENOSPC} frontend state {int(S.INITIALISED)}: No space left on device: "
        f"{state_path}")
    # Undone at once: the frontend has not answered the Closing.
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect"]
    assert bdev.resources == (0, 0)
    # It starts over, and is connected.
    fe.set_state(S.INITIALISING)
    fe.wait_backend(S.INIT_WAIT)
    fe.publish()
    fe.wait_backend(S.CONNECTED)
    bdev.events.flush()
    assert driver.calls_of(guest.domid)[-1] == "connect"
    assert bdev.resources == (1, 1)


@pytest.mark.parametrize(("node", "write_only"), _TAKINGS)
def test_a_connect_that_gives_up_after_a_report_met_a_node_taken_writes_nothing(
        host, dom0_xs, frontends, caplog, node, write_only) -> None:
    """A driver's connect() calls fatal() with our ``state`` (or
    directory) taken, is told False, and gives up, raising; the toolstack
    gave the node back meanwhile.  That failure is the report's sequel:
    only a debug line, the device dropped as the taking says, and still
    nothing written (a Closed tried now would be written), as the
    report's own drop would."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        taken = f"{bdev.nodename}/{node}".rstrip("/")
        perms = dom0_xs.get_perms(taken)
        told: list[bool] = []

        def connect(dev: Any) -> None:
            drv._record("connect", dev)
            dom0_xs.set_perms(taken, _left_by_a_taking(drvdom, write_only))
            told.append(dev.fatal(errno.EIO, "in connect"))
            dom0_xs.set_perms(taken, perms)
            raise OSError(errno.EIO, "gave up")

        _starting_over_with(drv, fe, bdev, connect)
        caplog.clear()
        fe.set_state(S.INITIALISED)
        _removed(drv, fe, bdev)
        assert told == [False]
        _dropped_writing_nothing(caplog, dom0_xs, drvdom, fe, bdev, taken, "in connect",
                                 state=S.INIT_WAIT)
        assert not [r for r in caplog.records if "after a report met a node taken" in r.msg]


@pytest.mark.parametrize(("node", "write_only"), _TAKINGS)
def test_a_failure_whose_fatal_meets_a_node_taken_and_given_back_writes_nothing(
        host, dom0_xs, frontends, caplog, node, write_only, monkeypatch) -> None:
    """connect() raises, and the toolstack takes our ``state`` (or
    directory) after the look at our directory, before fatal() (then
    gives it back): fatal() is told False for the taking, and the device
    dropped as the taking says, writing nothing, a Closed included,
    though one could be written by then."""
    caplog.set_level(logging.INFO, logger="xenback.xenbus")
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        taken = f"{bdev.nodename}/{node}".rstrip("/")
        perms = dom0_xs.get_perms(taken)
        fatal = bdev.fatal
        told: list[bool] = []

        def taking_fatal(err: int, message: str) -> bool:
            dom0_xs.set_perms(taken, _left_by_a_taking(drvdom, write_only))
            told.append(fatal(err, message))
            dom0_xs.set_perms(taken, perms)
            return told[-1]

        def connect(dev: Any) -> None:
            drv._record("connect", dev)
            raise OSError(errno.EIO, "boom")

        _starting_over_with(drv, fe, bdev, connect)
        monkeypatch.setattr(bdev, "fatal", taking_fatal)
        caplog.clear()
        fe.set_state(S.INITIALISED)
        _removed(drv, fe, bdev)
        assert told == [False]
        _dropped_writing_nothing(caplog, dom0_xs, drvdom, fe, bdev, taken, "connecting: boom",
                                 state=S.INIT_WAIT)


def test_queue_refuses_a_call_once_the_device_is_gone(host, driver, frontends) -> None:
    """queue() says False once the device is gone, as its docstring has
    it: here asked in the drop's last release, after ``gone`` is set
    (a driver's work item may ask at any moment).  Taken, the call would
    run later on a device nobody serves any more."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    plain_release = bdev.release_resources
    asked: list[bool] = []
    ran: list[object] = []

    def release_then_queue() -> None:
        plain_release()
        if bdev.gone:
            asked.append(bdev.queue(ran.append, "late"))

    bdev.release_resources = release_then_queue  # type: ignore[method-assign]
    fe.xs.rm(f"{dev.frontend_path}/state")  # Unknown: the device is dropped
    driver.wait_removed(guest.domid)
    bdev.events.flush()
    assert asked == [False]
    assert ran == []
    fe.close()


@pytest.mark.parametrize("busy_in", ["probe", "connect"])
def test_a_removal_while_probe_or_connect_runs_with_online_taken_is_not_overwritten(
        host, dom0_xs, frontends, caplog, busy_in: str) -> None:
    """The toolstack takes a device's ``online`` from the driver domain's
    backend while probe() or connect() runs, then asks for its removal
    (online=0 and Closing, in one transaction, as libxl does).  A Closing
    the backend did not write is the toolstack's, and it writes one only
    to remove: the InitWait or Connected that follows must not replace
    it, ``online`` read or not (as for a readable one, see
    test_removal_while_probe_or_connect_runs_is_not_overwritten), or the
    guest is told to go on with a device being removed (found by
    xenbus_fuzz.py, seed 8655).  Then, as for any Closing with ``online``
    taken (see _backend_changed): a frontend with nothing to close has its
    device dropped at once, writing nothing, said once; a connected one
    closes first."""
    drvdom, drv, _ = _driver_domain_backend(host, dom0_xs, frontends, (), ())
    entered, release = threading.Event(), threading.Event()

    def hold(_dev) -> None:
        entered.set()
        assert release.wait(TIMEOUT)

    setattr(drv, f"{busy_in}_hook", hold)
    home = f"/local/domain/{drvdom.domid}"
    try:
        guest = host.create_domain("guest")
        dev = host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
        fe = frontends(guest, dev)
        if busy_in == "connect":
            fe.wait_backend(S.INIT_WAIT)
            fe.publish()
        assert entered.wait(TIMEOUT)
        bdev = backend_device(drv, guest.domid)
        online, state = f"{dev.backend_path}/online", f"{dev.backend_path}/state"
        dom0_xs.set_perms(online, ["n0"])
        caplog.clear()

        def removed(t: Transaction) -> None:
            t.write(online, "0")
            t.write(state, str(int(S.CLOSING)))

        dom0_xs.transaction(removed)
        # The removal's watch event queued behind the hook.
        handed_over(drv.xenstore, "removed", base=f"{home}/data")
        release.set()
        bdev.events.flush()
        assert dom0_xs.read(state) == str(int(S.CLOSING))
        if busy_in == "connect":
            assert not bdev.gone  # until its frontend closes
            fe.set_state(S.CLOSED)
            drv.wait_removed(guest.domid)
            assert dom0_xs.read(state) == str(int(S.CLOSED))
        assert bdev.gone and drv.devices() == []
        assert bdev.resources == (0, 0)
        assert not [r for r in caplog.records if r.exc_info is not None]
        (said,) = _backend_warnings(caplog)
        assert said.args[1].filename == online  # type: ignore[index]
    finally:
        release.set()
        drv.stop()


@pytest.mark.parametrize("closed_before", [False, True])
def test_a_frontend_starting_over_during_a_removal_read_back_with_online_taken_is_not_served(
        host, dom0_xs, frontends, caplog, closed_before: bool) -> None:
    """The toolstack takes a connected device's ``online`` from the driver
    domain's backend and asks for its removal (online=0 and Closing, in
    one transaction); its event runs first, reading that Closing back into
    our state, and the connected frontend is left to close.  It starts
    over (Initialising) instead: the InitWait that follows must not
    replace the removal's Closing any more than the one after probe()
    (see test_a_removal_while_probe_or_connect_runs_with_online_taken_is_not_overwritten)
    does: we wrote no Closing, so it is the toolstack's, read back or not.
    ``closed_before``: a Closing of ours came and went first (a failure,
    the frontend starting over and connecting again): our last state is
    what counts, not any Closing we ever wrote."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        online, state = f"{bdev.nodename}/online", f"{bdev.nodename}/state"
        dom0_xs.set_perms(online, ["n0"])
        if closed_before:
            fe.set_state(S.INIT_WAIT)  # a backend's state: impossible for a frontend
            fe.wait_backend(S.CLOSING)
            handed_over(drv.xenstore, "closing", base=f"/local/domain/{drvdom.domid}/data")
            bdev.events.flush()
            fe.set_state(S.INITIALISING)
            fe.wait_backend(S.INIT_WAIT)
            fe.publish()
            fe.wait_backend(S.CONNECTED)

        def removed(t: Transaction) -> None:
            t.write(online, "0")
            t.write(state, str(int(S.CLOSING)))

        dom0_xs.transaction(removed)
        handed_over(drv.xenstore, "removed", base=f"/local/domain/{drvdom.domid}/data")
        bdev.events.flush()
        assert not bdev.gone  # its frontend, connected, is to close it
        caplog.clear()
        fe.set_state(S.INITIALISING)
        handed_over(drv.xenstore, "over", base=f"/local/domain/{drvdom.domid}/data")
        bdev.events.flush()
        assert dom0_xs.read(state) != str(int(S.INIT_WAIT))
        assert bdev.gone and drv.devices() == []
        assert bdev.resources == (0, 0)
        assert not [r for r in caplog.records if r.exc_info is not None]


def _waits_for_state() -> bool:
    """Whether some thread waits for a device's _switch_lock (held by a
    switch, paused): another switch, or a read-back of our state."""
    return any(stands_at(t.ident, xenbus.BackendDevice._switch, "with self._switch_lock")
               or stands_at(t.ident, xenbus.BackendDriver._backend_changed,
                            "with dev._switch_lock")
               for t in threading.enumerate() if t.ident is not None)


def test_a_frontend_starting_over_as_our_fatal_commits_with_online_taken_is_served(
        host, dom0_xs, frontends, caplog, monkeypatch) -> None:
    """As test_a_frontend_starting_over_after_our_closing_with_online_taken_is_served,
    but the driver's own thread calls fatal() as the frontend starts over
    (Initialising, its event queued first), and the frontend's event is
    handled between our Closing's commit and the rest of that switch, or
    waits for it to end: the Closing is ours all the same, and the
    frontend gets InitWait.  Taken
    for the toolstack's (our state not yet Closing), it dropped the
    device, the frontend left waiting for ever."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        dom0_xs.set_perms(f"{bdev.nodename}/online", ["n0"])
        # Its event run first: it would read our Closing back.
        handed_over(drv.xenstore, "taken", base=f"/local/domain/{drvdom.domid}/data")
        bdev.events.flush()
        committed, release = threading.Event(), threading.Event()
        busy, free = threading.Event(), threading.Event()
        transaction = drv.xenstore.transaction

        def held(fn: Callable[[Transaction], Any], **kwargs: Any) -> Any:
            result = transaction(fn, **kwargs)
            if threading.current_thread() is failing:
                committed.set()
                assert release.wait(TIMEOUT)
            return result

        def hold() -> None:
            busy.set()
            assert free.wait(TIMEOUT)

        monkeypatch.setattr(drv.xenstore, "transaction", held)
        failing = threading.Thread(target=bdev.fatal, args=(errno.EIO, "driver failed"))
        try:
            assert bdev.events.call(hold)
            assert busy.wait(TIMEOUT)
            fe.set_state(S.INITIALISING)
            handed_over(drv.xenstore, "over", base=f"/local/domain/{drvdom.domid}/data")
            failing.start()
            assert committed.wait(TIMEOUT)
            free.set()
            # Handled (the frontend got InitWait), or waiting for our switch to end.
            assert eventually(lambda: _waits_for_state() or dom0_xs.read(
                f"{bdev.nodename}/state") == str(int(S.INIT_WAIT)))
            release.set()
            handed_over(drv.xenstore, "closing", base=f"/local/domain/{drvdom.domid}/data")
            bdev.events.flush()
            assert dom0_xs.read(f"{bdev.nodename}/state") == str(int(S.INIT_WAIT))
            assert not bdev.gone
        finally:
            free.set()
            release.set()
            failing.join(TIMEOUT)
        assert not [r for r in caplog.records if r.exc_info is not None]


def test_a_switch_that_commits_later_keeps_the_state_over_one_that_finishes_later(
        host, driver, frontends, dom0_xs) -> None:
    """A driver's thread calls fatal(), and stops between its Closing's
    commit and its setting of ``state``; meanwhile the frontend starts
    over (Initialising) and the queue switches to InitWait, or waits to.
    The state is InitWait in the end, in XenStore and for the device:
    the fatal() that finishes last must not set the Closing that InitWait
    replaced, or the frontend's Initialised that follows is ignored (only
    InitWait, Initialised and Closed are connected from), the frontend
    left waiting until some other event reads the state back."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    # Right after the transaction: its Closing committed, the state not yet set.
    pause = PauseAt(xenbus.BackendDevice._switch, "if stale is not None")
    failing = Attempt(lambda: pause.run(lambda: bdev.fatal(errno.EIO, "driver failed")))
    try:
        assert pause.reached.wait(TIMEOUT)
        fe.set_state(S.INITIALISING)
        # Switched (and every read-back of it run), or waiting to.
        assert eventually(lambda: _waits_for_state() or bdev.state == S.INIT_WAIT)
        handed_over(driver.xenstore, "initwait")
    finally:
        pause.resume()
    assert failing.result() is True
    fe.wait_backend(S.INIT_WAIT)
    bdev.events.flush()
    assert bdev.state == S.INIT_WAIT
    assert dom0_xs.read(f"{bdev.nodename}/state") == str(int(S.INIT_WAIT))
    fe.pages = None
    fe.publish()  # a fresh ring and port
    fe.wait_backend(S.CONNECTED)
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "connect"]


def test_a_closing_of_ours_between_a_switch_and_its_clearing_stays_ours(
        host, dom0_xs, frontends, monkeypatch, caplog) -> None:
    """The driver's own thread calls fatal() as the queue's Connected (the
    frontend connecting again) has committed and is about to clear
    _closing_ours.  The Closing is ours all the same: with
    ``online`` taken, a frontend starting over then gets InitWait (see
    test_a_frontend_starting_over_after_our_closing_with_online_taken_is_served).
    Cleared by the Connected that committed before the Closing, it was
    taken for the toolstack's removal, and the device dropped."""
    switch = xenbus.BackendDevice._switch  # the one the pause below runs
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        dom0_xs.set_perms(f"{bdev.nodename}/online", ["n0"])
        fe.set_state(S.INITIALISING)
        fe.wait_backend(S.INIT_WAIT)
        pause = PauseAt.in_method(monkeypatch, xenbus.BackendDevice, "_switch",
                                  "self._closing_ours = False")
        fe.pages = None
        fe.publish()  # a fresh ring and port
        try:
            assert pause.reached.wait(TIMEOUT)
            failing = Attempt(lambda: bdev.fatal(errno.EIO, "driver failed"))
            # Its Closing made, or waiting for the clearing to end.
            assert eventually(lambda: not failing.thread.is_alive() or stands_at(
                failing.thread.ident, switch, "with self._switch_lock"))
        finally:
            pause.resume()
        assert failing.result() is True
        monkeypatch.undo()
        fe.wait_backend(S.CLOSING)
        # Our Closing read back, its frontend connected: not dropped.
        handed_over(drv.xenstore, "closing", base=f"/local/domain/{drvdom.domid}/data")
        bdev.events.flush()
        assert not bdev.gone
        fe.set_state(S.INITIALISING)
        fe.wait_backend(S.INIT_WAIT)
        bdev.events.flush()
        assert not bdev.gone
        assert not [r for r in caplog.records if r.exc_info is not None]


def test_a_switch_retried_after_a_ctrl_c_as_it_committed_forgets_our_closing(
        host, dom0_xs, frontends, monkeypatch, caplog) -> None:
    """After our own Closing, a switch to InitWait commits, and a Ctrl-C
    lands as its transaction returns; done again, it finds InitWait
    there and writes nothing.  Our Closing is gone from XenStore all the
    same: the retry must forget it, or, with ``online`` taken, the
    toolstack's removal that follows is taken for ours, and a frontend
    starting over is served over it (see
    test_a_frontend_starting_over_during_a_removal_read_back_with_online_taken_is_not_served)."""
    from tests.stolensignal import Interrupted

    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        online, state = f"{bdev.nodename}/online", f"{bdev.nodename}/state"
        dom0_xs.set_perms(online, ["n0"])
        base = f"/local/domain/{drvdom.domid}/data"
        assert bdev.fatal(errno.EIO, "driver failed") is True
        fe.wait_backend(S.CLOSING)
        handed_over(drv.xenstore, "closing", base=base)
        bdev.events.flush()
        transaction = drv.xenstore.transaction

        def interrupted(fn: Callable[[Transaction], Any], **kwargs: Any) -> Any:
            monkeypatch.undo()  # once
            transaction(fn, **kwargs)
            raise Interrupted  # as the call returns

        monkeypatch.setattr(drv.xenstore, "transaction", interrupted)
        with pytest.raises(Interrupted):
            bdev.switch_state(S.INIT_WAIT)
        assert dom0_xs.read(state) == str(int(S.INIT_WAIT))
        assert bdev.switch_state(S.INIT_WAIT) is False  # there already
        handed_over(drv.xenstore, "initwait", base=base)
        bdev.events.flush()

        def removed(t: Transaction) -> None:
            t.write(online, "0")
            t.write(state, str(int(S.CLOSING)))

        dom0_xs.transaction(removed)
        handed_over(drv.xenstore, "removed", base=base)
        bdev.events.flush()
        fe.set_state(S.INITIALISING)
        handed_over(drv.xenstore, "over", base=base)
        bdev.events.flush()
        assert dom0_xs.read(state) in (str(int(S.CLOSING)), str(int(S.CLOSED)))
        assert not [r for r in caplog.records if r.exc_info is not None]


def _starting_over_after_the_removal(dom0_xs, drv, fe, bdev, base: str, caplog) -> None:
    """The toolstack's removal of ``bdev`` (online=0 and Closing, online
    taken) committed: once its event is handled, the frontend, connected,
    starts over (Initialising) instead of closing.  No InitWait is
    written over the removal's Closing, the device goes, and nothing
    failed with a traceback.  ``base``: a directory of the driver
    domain's, for handed_over()."""
    handed_over(drv.xenstore, "removed", base=base)
    bdev.events.flush()
    assert not bdev.gone  # its frontend, connected, is to close it
    fe.set_state(S.INITIALISING)
    handed_over(drv.xenstore, "over", base=base)
    bdev.events.flush()
    assert dom0_xs.read(f"{bdev.nodename}/state") != str(int(S.INIT_WAIT))
    assert bdev.gone and drv.devices() == []
    assert not [r for r in caplog.records if r.exc_info is not None]


@pytest.mark.parametrize("err", [errno.EAGAIN, errno.ENOSPC], ids=["conflicts", "quota"])
def test_a_closing_whose_commit_failed_is_not_taken_for_ours(
        host, dom0_xs, frontends, monkeypatch, caplog, err: int) -> None:
    """A driver's thread switches to Closing and its transaction fails
    (EAGAIN to the last attempt, a write refused for a quota): nothing
    committed, the frontend still Connected.  Then the toolstack, which
    took ``online``, asks for removal, and the frontend starts over
    (Initialising) instead of closing: the Closing there is the
    toolstack's, and the InitWait must not replace it (see
    test_a_frontend_starting_over_during_a_removal_read_back_with_online_taken_is_not_served).
    The failed switch had marked a Closing of ours as it made it, and
    left the mark: the removal was taken for our Closing, the InitWait
    written over it, and the toolstack left waiting for Closed."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        online, state = f"{bdev.nodename}/online", f"{bdev.nodename}/state"
        base = f"/local/domain/{drvdom.domid}/data"
        dom0_xs.set_perms(online, ["n0"])
        # Its event read back before the switch: after, the read-back of
        # Connected would clear a mark the failed switch left.
        handed_over(drv.xenstore, "taken", base=base)
        bdev.events.flush()
        transaction = drv.xenstore.transaction

        def failing(fn: Callable[[Transaction], Any], **kwargs: Any) -> Any:
            def then_refused(t: Transaction) -> Any:
                fn(t)
                raise OSError(err, os.strerror(err))

            return transaction(then_refused, attempts=1)

        monkeypatch.setattr(drv.xenstore, "transaction", failing)
        with pytest.raises(OSError) as raised:
            bdev.switch_state(S.CLOSING)
        assert raised.value.errno == err
        monkeypatch.undo()
        assert dom0_xs.read(state) == str(int(S.CONNECTED))

        def removed(t: Transaction) -> None:
            t.write(online, "0")
            t.write(state, str(int(S.CLOSING)))

        dom0_xs.transaction(removed)
        _starting_over_after_the_removal(dom0_xs, drv, fe, bdev, base, caplog)


def test_a_closing_found_on_a_retry_after_a_conflict_is_not_taken_for_ours(
        host, dom0_xs, frontends, caplog) -> None:
    """A driver's thread switches to Closing, and the toolstack's removal
    (``online`` = 0 and Closing, ``online`` then taken) commits between
    the switch's first attempt and its commit: that one conflicts, and
    the attempt again finds Closing there and writes nothing.  The
    Closing is the toolstack's, as if the switch had found it at once.
    The first attempt had marked a Closing of ours as it made it, and
    the attempt that wrote nothing left the mark: a frontend starting
    over (Initialising) got InitWait written over the removal, and the
    toolstack was left waiting for Closed (see
    test_a_closing_whose_commit_failed_is_not_taken_for_ours)."""
    with _driver_domain_device(host, dom0_xs, frontends) as (drvdom, drv, fe, bdev):
        online, state = f"{bdev.nodename}/online", f"{bdev.nodename}/state"
        base = f"/local/domain/{drvdom.domid}/data"
        transaction = drv.xenstore.transaction
        attempts: list[Transaction] = []

        def removed(t: Transaction) -> None:
            t.write(online, "0")
            t.write(state, str(int(S.CLOSING)))

        def racing(fn: Callable[[Transaction], Any], **kwargs: Any) -> Any:
            def then_removed(t: Transaction) -> Any:
                result = fn(t)
                attempts.append(t)
                if len(attempts) == 1:
                    dom0_xs.transaction(removed)
                    dom0_xs.set_perms(online, ["n0"])
                return result

            return transaction(then_removed, **kwargs)

        drv.xenstore.transaction = racing  # type: ignore[method-assign]
        try:
            assert bdev.switch_state(S.CLOSING) is False
        finally:
            del drv.xenstore.transaction
        assert len(attempts) == 2  # the first conflicted
        _starting_over_after_the_removal(dom0_xs, drv, fe, bdev, base, caplog)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("start, target, fatal", [(S.CONNECTED, S.CLOSING, False),
                                                   (S.CLOSING, S.CONNECTED, False),
                                                   (S.CONNECTED, S.CLOSING, True)],
                         ids=["to-closing", "from-closing", "fatal"])
def test_a_switch_interrupted_anywhere(host, driver, frontends, dom0_xs, start: S,
                                       target: S, fatal: bool) -> None:
    """A Ctrl-C landing at any place of a driver's switch_state() in the
    main thread, or of its fatal() (the switch with the error node).
    Its lock is free afterwards, and once our directory's
    events are read back the device's state is XenStore's, and a
    Closing there is ours; one gone from there is no longer ours: cut
    short as it committed our Closing's replacement, the switch left
    the mark, and the toolstack's removal that came next, with ``online``
    taken, would be taken for our Closing (see
    test_a_switch_retried_after_a_ctrl_c_as_it_committed_forgets_our_closing).
    One cut short before it committed Closing may leave it marked ours,
    as one that may have gone.  The switch done again works."""
    import os

    from tests.stolensignal import interrupted_at

    within = os.path.dirname(xenbus.__file__)
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    state = f"{bdev.nodename}/state"
    landed: list[str] = []
    for n in itertools.count():
        bdev.switch_state(start)
        handed_over(driver.xenstore, f"start-{n}")
        bdev.events.flush()
        switch = (functools.partial(bdev.fatal, errno.EIO, "driver failed") if fatal
                  else functools.partial(bdev.switch_state, target))
        where = interrupted_at(n, within, switch, besides=os.path.join(within, "sim"))
        assert not bdev._switch_lock.locked(), f"interrupted {where}: the lock is held"
        handed_over(driver.xenstore, f"interrupted-{n}")
        bdev.events.flush()
        now = S(int(dom0_xs.read(state)))
        assert now in (start, target), f"interrupted {where}: {now!r}"
        assert bdev.state == now, f"interrupted {where}: {bdev.state!r} for {now!r}"
        if now == S.CLOSING:
            assert bdev._closing_ours, f"interrupted {where}: our Closing is not ours"
        elif now == target:
            assert not bdev._closing_ours, f"interrupted {where}: {now!r} is ours"
        assert switch() is (fatal or now != target), f"interrupted {where}"
        assert bdev.state == target and dom0_xs.read(state) == str(int(target))
        assert bdev._closing_ours is (target == S.CLOSING), f"interrupted {where}"
        if not where:
            break
        landed.append(where)
    assert any("BackendDevice._switch" in where for where in landed), landed
    assert not bdev.gone


def test_a_switch_that_only_reads_and_commits_first_leaves_the_state_to_the_other(
        host, driver, frontends, dom0_xs) -> None:
    """fatal() on a driver's thread has made its Closing, not yet
    committed, when another driver's thread switches to Connected, which
    XenStore holds still: nothing to write, its transaction only reads,
    and its commit, first, cannot fail the other's, which commits Closing
    second.  The device's state must end as XenStore's: the switch that
    wrote nothing must not set its Connected after the Closing was read
    back (nothing would read it back again), nor may fatal() leave its
    Closing unset for having decided first."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    committing = PauseAt(XenStore.transaction, "committed = client.commit()")
    failing = Attempt(lambda: committing.run(lambda: bdev.fatal(errno.EIO, "driver failed")))
    # Right after its transaction, its state not yet set.
    setting = PauseAt(xenbus.BackendDevice._switch, "if stale is not None")
    switching = None
    try:
        assert committing.reached.wait(TIMEOUT)
        switching = Attempt(lambda: setting.run(lambda: bdev.switch_state(S.CONNECTED)))
        # Committed (it read Connected), or waiting its turn.
        assert eventually(lambda: setting.reached.is_set() or stands_at(
            switching.thread.ident, xenbus.BackendDevice._switch, "with self._switch_lock"))
    finally:
        committing.resume()
        if switching is None:
            setting.resume()
    try:
        assert failing.result() is True
        assert setting.reached.wait(TIMEOUT)
        # The Closing read back before the switch goes on, or waiting to.
        assert eventually(lambda: _waits_for_state() or bdev.state == S.CLOSING)
    finally:
        setting.resume()
    switching.result()
    handed_over(driver.xenstore, "readonly-after")
    bdev.events.flush()
    assert bdev.state == S(int(dom0_xs.read(f"{bdev.nodename}/state")))


def test_a_switch_overtaken_by_the_toolstacks_removal_keeps_the_state_read_back(
        host, driver, frontends, dom0_xs) -> None:
    """A driver's thread switches to Closed, and stops between its commit
    and its setting of ``state``; meanwhile the toolstack asks for
    removal (online=0, Closing), and our read-back of it runs, or waits
    for the switch to end.  The state is Closing in the end, as in
    XenStore: the switch that finishes last must not set the Closed that
    the toolstack's Closing replaced, for nothing would read it back."""
    guest, dev, fe = connected(host, frontends)
    bdev = backend_device(driver, guest.domid)
    pause = PauseAt(xenbus.BackendDevice._switch, "if stale is not None")
    switching = Attempt(lambda: pause.run(lambda: bdev.switch_state(S.CLOSED)))

    def remove(t: Transaction) -> None:
        t.write(f"{bdev.nodename}/online", "0")
        t.write(f"{bdev.nodename}/state", str(int(S.CLOSING)))

    try:
        assert pause.reached.wait(TIMEOUT)
        dom0_xs.transaction(remove)
        # Read back (our Closed, then the toolstack's Closing), or waiting to.
        assert eventually(lambda: _waits_for_state() or bdev.state == S.CLOSING)
        handed_over(driver.xenstore, "removal")
    finally:
        pause.resume()
    assert switching.result() is True
    bdev.events.flush()
    assert dom0_xs.read(f"{bdev.nodename}/state") == str(int(S.CLOSING))
    assert bdev.state == S.CLOSING
    assert not bdev.gone  # its frontend, still connected, closes first
