"""A backend directory naming a frontend domain past XenStore's domid_t
(the toolstack's to write, or a test's): xenback.XenStore now refuses such
a domid in a domain query with ValueError before anything is sent, where
XenStore answered an OSError EINVAL, and the backend must take that
ValueError as it took the OSError."""

from __future__ import annotations

import logging

from tests.xenback.xbhelpers import TIMEOUT, Census


def test_a_device_of_a_domid_past_a_domid_t_does_not_stop_release_domain(
        host, driver, dom0_xs, caplog) -> None:
    """@releaseDomain asks XenStore whether each device's frontend domain
    is introduced: the ValueError of domain 70000, registered first, cut
    the loop short, and the destroyed guest's device, whose frontend
    directory outlives it, was never torn down.  Domain 70000 is not
    alive (as when XenStore's EINVAL said so): its device goes too."""
    odd = "/local/domain/0/backend/xbtest/70000/0"

    def add_odd(t) -> None:
        t.write("/local/domain/0/fake-frontends/70000/state", 1)
        t.mkdir(odd)
        t.set_perms(odd, ["n0"])
        t.write(f"{odd}/frontend", "/local/domain/0/fake-frontends/70000")
        t.write(f"{odd}/frontend-id", 70000)
        t.write(f"{odd}/online", 1)
        t.write(f"{odd}/state", 1)

    dom0_xs.transaction(add_odd)
    dom0_xs.wait_for(f"{odd}/state", "2", timeout=TIMEOUT)
    (odd_dev,) = driver.devices()

    census = Census(host, driver)
    guest = host.create_domain("guest")
    pages = guest.gntshr().share_pages(0, 1)
    evtchn = guest.evtchn()
    port = evtchn.bind_unbound_port(0)
    frontend = "/local/domain/0/fake-frontends/1"
    base = f"/local/domain/0/backend/xbtest/{guest.domid}/0"

    def add(t) -> None:
        t.write(f"{frontend}/state", 1)
        t.mkdir(base)
        t.set_perms(base, ["n0", f"r{guest.domid}"])
        t.write(f"{base}/frontend", frontend)
        t.write(f"{base}/frontend-id", guest.domid)
        t.write(f"{base}/online", 1)
        t.write(f"{base}/state", 1)

    dom0_xs.transaction(add)
    dom0_xs.wait_for(f"{base}/state", "2", timeout=TIMEOUT)
    dom0_xs.transaction(lambda t: (t.write(f"{frontend}/ring-ref", pages.refs[0]),
                                   t.write(f"{frontend}/port", port),
                                   t.write(f"{frontend}/state", 3)))
    dom0_xs.wait_for(f"{base}/state", "4", timeout=TIMEOUT)
    (bdev,) = [d for d in driver.devices() if d is not odd_dev]
    evtchn.close()
    pages.unshare()
    host.destroy_domain(guest)
    dom0_xs.wait_for(f"{base}/state", "6", timeout=TIMEOUT)
    dom0_xs.wait_for(f"{odd}/state", "6", timeout=TIMEOUT)
    driver.wait_call("remove", guest.domid)
    for dev in (odd_dev, bdev):
        dev.events.flush()
        assert dev.gone
    assert driver.devices() == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    census.check()
