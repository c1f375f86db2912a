"""A backend under libxl's way of removing devices, as seen on real Xen.

Real libxl 4.17 deletes a dead domain's frontend directory first, then
writes the backend's ``online`` = 0 (and Closing unless it is Closed),
waits for Closed, and deletes the backend directory with every parent this
leaves empty: the last device of a type takes ``backend/<type>``, the
directory the backend watches, with it.  The backend must let its devices
go without writing into the deleted directories, and still find the
devices of the next domain under the re-created directory.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.xenback.xbhelpers import Census, backend_device, connected
from xenback import XenbusState as S

TIMEOUT = 10.0


def _linux_shutdown(fe: Any) -> None:
    """What Linux's xenbus_dev_shutdown does before the domain dies:
    Closing, wait for the backend to follow, Closed, wait again."""
    fe.set_state(S.CLOSING)
    fe.wait_backend(S.CLOSING)
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)


def _no_forced_removal(caplog: pytest.LogCaptureFixture) -> None:
    forced = [r.getMessage() for r in caplog.records if "did not close" in r.getMessage()]
    assert forced == [], "the backend kept the toolstack waiting"


def _gone_for_good(driver: Any, dom0_xs: Any, bdev: Any) -> None:
    """``bdev`` was dropped, and nothing wrote into the deleted directories
    afterwards (a write would have re-created them)."""
    driver.wait_removed(bdev.frontend_id, bdev.devid)
    assert bdev.gone and bdev.resources == (0, 0) and driver.devices() == []
    assert not dom0_xs.exists(driver.backend_root)
    assert not dom0_xs.exists("/local/domain/0/error")


@pytest.mark.parametrize("shutdown", ["linux", "crash"])
def test_domain_death_then_a_new_domain_under_the_recreated_root(
    host: Any, driver: Any, frontends: Any, dom0_xs: Any, caplog: Any, shutdown: str
) -> None:
    caplog.set_level(logging.WARNING, logger="xenback.sim._toolstack")
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends, "first")
    bdev = backend_device(driver, guest.domid)
    if shutdown == "linux":
        _linux_shutdown(fe)
        # Closed is written before the callback that handled the frontend's
        # Closed has finished (a drop would come after): let it finish.
        bdev.events.flush()
        assert not bdev.gone  # online is still 1: it waits for the toolstack
    fe.close()  # the guest's grants and ports go with it
    host.destroy_domain(guest)
    _no_forced_removal(caplog)
    _gone_for_good(driver, dom0_xs, bdev)
    census.check()

    # backend/xbtest was deleted and is re-created for the next domain:
    # the watch on it still fires, and the device is found and connects.
    guest, dev, fe = connected(host, frontends, "second")
    assert driver.calls_of(guest.domid) == ["probe", "connect"]
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CONNECTED))
    bdev = backend_device(driver, guest.domid)
    fe.close()
    host.destroy_domain(guest)
    _no_forced_removal(caplog)
    _gone_for_good(driver, dom0_xs, bdev)
    census.check()


def test_hot_unplug_of_the_last_device_then_a_new_one(
    host: Any, driver: Any, frontends: Any, dom0_xs: Any, caplog: Any
) -> None:
    caplog.set_level(logging.WARNING, logger="xenback.sim._toolstack")
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends, "guest")
    bdev = backend_device(driver, guest.domid)
    # A frontend that answers the backend's Closing as Linux's does.
    fe.xs.watch(f"{dev.backend_path}/state", lambda _p: _follow(fe, dev))
    assert host.toolstack.remove_device(dev, timeout=TIMEOUT) is True
    _gone_for_good(driver, dom0_xs, bdev)
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]
    fe.close()

    dev = host.toolstack.add_device("xbtest", guest.domid, devid=1)
    fe = frontends(guest, dev)
    fe.wait_backend(S.INIT_WAIT)
    fe.publish()
    fe.wait_backend(S.CONNECTED)
    fe.close()
    host.destroy_domain(guest)
    _no_forced_removal(caplog)
    driver.wait_removed(guest.domid, devid=1)
    assert driver.devices() == []
    census.check()


def _follow(fe: Any, dev: Any) -> None:
    try:
        state = fe.xs.read(f"{dev.backend_path}/state")
    except (AttributeError, OSError):
        return  # the frontend was closed, or the directory deleted
    if state == str(int(S.CLOSING)):
        fe.set_state(S.CLOSED)
