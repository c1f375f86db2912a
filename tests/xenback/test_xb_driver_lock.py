"""One BackendDriver of a device type per domain on a host.

Two drivers of one type serving one domain, in one process or two, would
both watch its backend directory and fight over every device (each
probing, connecting and closing it under the other).  start() takes the
domain's ``xenback-<type>`` HostLock before anything else, and stop()
lets go of it once every device is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.stolensignal import Interrupted, interrupt, main_thread_in
from tests.xenback.xbhelpers import (
    TIMEOUT,
    Census,
    RecordingDriver,
    leaked_threads,
    serve_in_child,
)
from xenback import HostLock, HostLockHeld, XenbusState, XenStore, xenbus
from xenback.sim import SimHost

S = XenbusState


class OtherDriver(RecordingDriver):
    device_type = "xbother"


def _lock(host: Any, domid: int = 0, device_type: str = "xbtest") -> Path:
    return host.run_dir / f"xenback-{device_type}.dom{domid}.lock"


def _refused(drv: RecordingDriver, host: Any, pid: int | None = None, domid: int = 0) -> None:
    """``drv.start()`` is refused, naming the holder and its lock file."""
    lock = _lock(host, domid, drv.device_type)
    with pytest.raises(HostLockHeld, match=(
            rf"^domain {domid} of this host has a xenback-{drv.device_type} already, in "
            rf"process {pid or os.getpid()} \(it holds {lock}\)$")) as info:
        drv.start()
    assert (info.value.pid, info.value.path) == (pid or os.getpid(), lock)


def _probed(host: Any, drv: RecordingDriver, name: str, backend_id: int = 0) -> Any:
    """A new guest with a device of ``drv``'s type: ``drv`` probes it."""
    guest = host.create_domain(name)
    host.toolstack.add_device(drv.device_type, guest.domid, backend_id=backend_id)
    drv.wait_call("probe", guest.domid)
    return guest


def test_a_second_driver_of_a_type_is_refused_before_it_starts_anything(
        host, driver, monkeypatch) -> None:
    census = Census(host)
    connects: list[object] = []
    connect_to = XenStore.connect_to
    monkeypatch.setattr(XenStore, "connect_to",
                        classmethod(lambda cls, *a, **k: (connects.append(a),
                                                          connect_to(*a, **k))[1]))
    second = RecordingDriver(host.dom0)
    _refused(second, host)
    assert connects == [], "the refused driver connected to XenStore"
    with pytest.raises(RuntimeError, match="RecordingDriver is not started"):
        second.workqueue  # noqa: B018
    census.check()
    second.stop()  # a no-op, which lets go of nobody's lock
    _refused(RecordingDriver(host.dom0), host)
    # The first serves alone.
    guest = _probed(host, driver, "guest")
    assert second.calls == []
    assert driver.calls_of(guest.domid) == ["probe"]


def test_drivers_of_other_types_serve_side_by_side(host, driver) -> None:
    with OtherDriver(host.dom0) as other:
        assert sorted(p.name for p in host.run_dir.glob("*.lock")) == [
            "xenback-xbother.dom0.lock", "xenback-xbtest.dom0.lock"]
        _probed(host, driver, "one")
        _probed(host, other, "two")


def test_a_driver_domain_s_driver_is_another_one(host, driver) -> None:
    drvdom = host.create_domain("driver-domain")
    with RecordingDriver(drvdom) as there:
        assert _lock(host, drvdom.domid).exists()
        _probed(host, there, "guest", backend_id=drvdom.domid)
        _refused(RecordingDriver(drvdom), host, domid=drvdom.domid)
    assert not _lock(host, drvdom.domid).exists()


def test_stop_lets_the_next_driver_in(host) -> None:
    first = RecordingDriver(host.dom0)
    with first:
        assert _lock(host).read_text() == f"{os.getpid()}\n"
    assert not _lock(host).exists()
    with RecordingDriver(host.dom0) as second:
        _probed(host, second, "guest")


def test_a_driver_started_again_holds_the_lock_again(host) -> None:
    drv = RecordingDriver(host.dom0)
    for run in ("first", "second"):
        with drv:
            _refused(RecordingDriver(host.dom0), host)
            _probed(host, drv, run)
        assert not _lock(host).exists()


@pytest.mark.parametrize("how", ["start", "with"])
def test_start_twice_keeps_the_lock(driver, host, how) -> None:
    # Refused as already started, not by its own lock, and nothing let go
    # (nor stopped by the ``with`` whose __enter__ was refused: the driver
    # is not that block's to stop).
    with pytest.raises(RuntimeError, match="RecordingDriver is already started"):
        if how == "start":
            driver.start()
        else:
            with driver:
                pass
    _refused(RecordingDriver(host.dom0), host)
    _probed(host, driver, "guest")


def test_a_start_xenstore_refuses_lets_go_of_the_lock(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="xenback")
    with SimHost(tmp_path / "run") as host:
        socket = host.run_dir / "xenstored" / "socket"
        socket.rename(tmp_path / "socket")  # XenStore refuses our connection
        before = {t.ident for t in threading.enumerate()}
        try:
            drv = RecordingDriver(host.dom0)
            with pytest.raises(ConnectionError, match="cannot connect to XenStore"):
                drv.start()
        finally:
            (tmp_path / "socket").rename(socket)
        assert not _lock(host).exists()
        assert not leaked_threads(before)
        # Never started, so never said to be stopped.
        assert not [r for r in caplog.records if "stopped" in r.getMessage()]
        with drv:  # and it can be started once XenStore is back
            _probed(host, drv, "guest")


@pytest.mark.parametrize("step", ["alloc_workqueue", "watch"])
def test_a_start_that_fails_half_way_lets_go_of_the_lock(host, monkeypatch, step) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(f"no {step} today")

    if step == "watch":
        monkeypatch.setattr(XenStore, "watch", fail)
    else:
        monkeypatch.setattr(xenbus, "alloc_workqueue", fail)
    with pytest.raises(OSError, match=f"no {step} today"):
        RecordingDriver(host.dom0).start()
    assert not _lock(host).exists()
    monkeypatch.undo()
    with RecordingDriver(host.dom0) as drv:
        _probed(host, drv, "guest")


def test_a_stop_refused_from_a_callback_keeps_the_lock(host, driver) -> None:
    refused: list[BaseException] = []
    tried = threading.Event()

    def stop_from_callback(_dev) -> None:
        try:
            driver.stop()
        except RuntimeError as exc:
            refused.append(exc)
        tried.set()

    driver.probe_hook = stop_from_callback
    _probed(host, driver, "guest")
    assert tried.wait(TIMEOUT)
    assert len(refused) == 1
    _refused(RecordingDriver(host.dom0), host)


def test_a_stop_interrupted_half_way_keeps_the_lock_until_finished(
        host, driver, frontends) -> None:
    guest = host.create_domain("guest")
    fe = frontends(guest, host.toolstack.add_device("xbtest", guest.domid))
    fe.wait_backend(S.INIT_WAIT)
    fe.publish()
    fe.wait_backend(S.CONNECTED)
    release = threading.Event()
    driver.disconnect_hook = lambda dev: release.wait(TIMEOUT)
    try:
        # Ctrl-C while stop() waits for the disconnect: devices still served.
        interrupt(lambda: main_thread_in("sleep_on", path="/workqueue/"), driver.stop)
        _refused(RecordingDriver(host.dom0), host)
    finally:
        release.set()
    driver.stop()
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]
    assert not _lock(host).exists()
    with RecordingDriver(host.dom0):
        pass


def test_a_stop_interrupted_as_it_lets_go_of_the_lock_is_finished_by_the_next(
        host, monkeypatch) -> None:
    """Ctrl-C in the lock's close(), the last step: the driver is still
    started, and the next stop() lets go of the lock (one that said the
    driver stopped would return at once, the lock held for good)."""
    drv = RecordingDriver(host.dom0)
    drv.start()
    close = HostLock.close
    interrupted: list[HostLock] = []

    def close_once_interrupted(self: HostLock) -> None:
        if not interrupted:
            interrupted.append(self)
            raise Interrupted
        close(self)

    monkeypatch.setattr(HostLock, "close", close_once_interrupted)
    with pytest.raises(Interrupted):
        drv.stop()
    assert interrupted and _lock(host).exists()
    drv.stop()
    assert not _lock(host).exists()
    with RecordingDriver(host.dom0):
        pass


def test_a_driver_in_another_process_refuses_one_here(host) -> None:
    spawn = multiprocessing.get_context("spawn")
    serving, done = spawn.Event(), spawn.Event()
    child = spawn.Process(target=serve_in_child, args=(str(host.run_dir), 0, serving, done))
    child.start()
    try:
        assert serving.wait(TIMEOUT), "the child did not start serving"
        _refused(RecordingDriver(host.dom0), host, pid=child.pid)
    finally:
        done.set()
        child.join(TIMEOUT)
    assert child.exitcode == 0
    with RecordingDriver(host.dom0) as drv:
        _probed(host, drv, "guest")
