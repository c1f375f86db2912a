"""A bug in what a driver runs for a device after connect() (a call queued
with BackendDevice.queue(), the callback of a port bound with
BackendDevice.bind_evtchn(), a DeviceWork) fails that device as a failed
connect() does: its traceback logged once, disconnect() once, its grants
and ports released, the error node and Closing, and the frontend may start
again.  Not when it comes of our own domain going away, and never by
raising out of the thread that ran it, however failing fails in turn."""

from __future__ import annotations

import errno
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.xenback.xbhelpers import (
    TIMEOUT,
    Census,
    RecordingDriver,
    backend_device,
    connected,
    error_node,
    leaked_threads,
)
from xenback import BackendDevice, DeviceWork, XenbusState
from xenback.sim import SimHost

S = XenbusState

#: How a driver's code runs for a device later (see _run).
PATHS = ["call", "port", "work"]

#: What runs that code, and only logged what escaped it before: a record
#: of theirs means the exception was not taken care of.
RUNNERS = ("xenback._eventqueue", "xenback.events", "workqueue._pool")


def _run(path: str, driver: RecordingDriver, bdev: BackendDevice, fe: Any,
         fn: Callable[[], object]) -> Callable[[], str]:
    """Make ``driver`` call ``fn()`` for ``bdev`` later, as ``path`` says:
    queued on the device, from its port's callback (the frontend
    notifies), or in a DeviceWork.  Returns what tells the name the error
    node gives the failing code (a port's is known once it fired)."""
    if path == "call":
        assert bdev.queue(fn)
        return lambda: f"call {fn.__qualname__}"
    if path == "port":
        fired: list[int] = []

        def hook(dev: BackendDevice, port: int) -> None:
            if dev is bdev:
                fired.append(port)
                fn()

        driver.event_hook = hook
        fe.evtchn.notify(fe.port)
        return lambda: f"callback of event channel port {fired[0]}"
    def serve(_work: object) -> None:
        fn()

    assert driver.workqueue.queue_work(DeviceWork(bdev, serve))
    return lambda: f"work {serve.__qualname__}"


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info and r.levelno >= logging.WARNING]


def _unhandled(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name in RUNNERS and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("make, text", [
    (lambda: RuntimeError("boom"), f"{errno.EIO} {{what}}: RuntimeError: boom"),
    (lambda: OSError(errno.ENOSPC, "No space left on device"),
     f"{errno.ENOSPC} {{what}}: No space left on device"),
], ids=["RuntimeError", "OSError"])
def test_an_exception_in_deferred_code_fails_its_device_only(
        host, driver, frontends, dom0_xs, caplog, path, make, text) -> None:
    """As for an exception from connect(): EIO, or an OSError's errno, and
    what failed in the error node, disconnect() and the release, Closing;
    the traceback logged once, by the framework rather than by whatever
    ran the code.  The frontend connects again after it, and the driver's
    other device goes on as if nothing happened."""
    good_guest, good_dev, _ = connected(host, frontends, "good")
    good = backend_device(driver, good_guest.domid)
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends, "bad")
    bdev = backend_device(driver, guest.domid)
    exc = make()

    def broken() -> None:
        raise exc

    what = _run(path, driver, bdev, fe, broken)
    fe.wait_backend(S.CLOSING)
    bdev.events.flush()
    assert error_node(dom0_xs, dev) == text.format(what=what())
    # disconnect() once (on the device's queue: the driver fixture checks),
    # and what the device held given back.
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect"]
    assert bdev.resources == (0, 0) and not bdev.gone
    (logged,) = _tracebacks(caplog)
    assert logged.exc_info is not None and logged.exc_info[1] is exc
    assert bdev.nodename in logged.getMessage()
    assert _unhandled(caplog) == []
    assert driver.workqueue.stats().failed == 0
    # The other device is served on, untouched.
    assert good.state == S.CONNECTED and good.resources == (1, 1)
    assert driver.calls_of(good_guest.domid) == ["probe", "connect"]
    assert error_node(dom0_xs, good_dev) is None

    # As after any fatal error, the frontend starts again and connects.
    driver.event_hook = None
    fe.set_state(S.INITIALISING)
    fe.wait_backend(S.INIT_WAIT)
    fe.publish()
    fe.wait_backend(S.CONNECTED)
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "connect"]
    assert bdev.resources == (1, 1)
    fe.evtchn.notify(fe.port)  # served again
    driver.wait(lambda: len(driver.events_seen) >= (2 if path == "port" else 1))

    fe.close()
    host.destroy_domain(guest)
    dom0_xs.wait_for(dev.backend_path, lambda v: v is None, timeout=TIMEOUT)
    bdev.events.flush()
    census.check()


@pytest.mark.parametrize("path", ["port", "work"])
def test_failures_handed_over_together_fail_the_device_once(
        host, driver, frontends, dom0_xs, caplog, monkeypatch, path) -> None:
    """A port's callback or a Work hands its failure over to the device's
    queue; until that has run, the code may fail again (the guest notifies
    again, the Work is queued again): each failure is logged, the device
    failed once, for the first."""
    guest, dev, fe = connected(host, frontends, "bad")
    bdev = backend_device(driver, guest.domid)
    tries = _count_fatal(bdev, monkeypatch)
    held, holding = threading.Event(), threading.Event()

    def hold() -> None:  # the device's queue, until both failures are handed over
        holding.set()
        assert held.wait(TIMEOUT)

    assert bdev.queue(hold)
    assert holding.wait(TIMEOUT)
    failures = iter([RuntimeError("first"), RuntimeError("second")])
    if path == "port":
        fired = threading.Semaphore(0)

        def hook(d: BackendDevice, _port: int) -> None:
            if d is bdev:
                fired.release()
                exc = next(failures, None)
                if exc is not None:
                    raise exc

        driver.event_hook = hook
        # One callback at a time: the third runs once the second is over.
        for _ in range(3):
            fe.evtchn.notify(fe.port)
            assert fired.acquire(timeout=TIMEOUT)
    else:
        def serve(_work: object) -> None:
            raise next(failures)

        work = DeviceWork(bdev, serve)
        for _ in range(2):
            assert driver.workqueue.queue_work(work)
            work.flush()
    held.set()
    fe.wait_backend(S.CLOSING)
    bdev.events.flush()
    assert len(tries) == 1 and tries[0].endswith(": RuntimeError: first")
    assert error_node(dom0_xs, dev) == f"{errno.EIO} {tries[0]}"
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect"]
    assert [str(r.exc_info[1]) for r in _tracebacks(caplog)] == [  # type: ignore[index]
        "first", "second"]
    assert _unhandled(caplog) == []


@pytest.mark.parametrize("path", PATHS)
def test_code_failing_as_our_domain_goes_does_not_fail_the_device(
        host, dom0_xs, frontends, caplog, path) -> None:
    """Our driver domain going away fails every request on its nodes
    (EACCES: its home is gone): the code that fails so has no bug, and its
    device is dropped with the others, disconnect() once, without a
    traceback or an error node."""
    before = {t.ident for t in threading.enumerate()}
    drvdom = host.create_domain("driver-domain")
    drv = RecordingDriver(drvdom)
    drv.start()
    try:
        guest = host.create_domain("guest")
        dev = host.toolstack.add_device("xbtest", guest.domid, backend_id=drvdom.domid)
        fe = frontends(guest, dev)
        fe.wait_backend(S.INIT_WAIT)
        fe.publish()
        fe.wait_backend(S.CONNECTED)
        bdev = backend_device(drv, guest.domid)
        started, home_gone = threading.Event(), threading.Event()

        def read_our_node() -> None:
            started.set()
            assert home_gone.wait(TIMEOUT)
            bdev.read("state")

        _run(path, drv, bdev, fe, read_our_node)
        assert started.wait(TIMEOUT)
        dom0_xs.rm(f"/local/domain/{drvdom.domid}")
        home_gone.set()
        drv.wait_call("remove", guest.domid)
        bdev.events.flush()
        assert drv.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]
        assert bdev.gone and bdev.resources == (0, 0)
        assert _tracebacks(caplog) == []
        assert _unhandled(caplog) == []
        if path == "work":
            assert drv.workqueue.stats().failed == 0
        fe.close()
    finally:
        drv.stop()
    assert not leaked_threads(before)
    assert drv.unordered == []


def test_a_fatal_that_raises_is_logged_not_raised_nor_retried(
        host, driver, frontends, dom0_xs, caplog, monkeypatch) -> None:
    census = Census(host, driver)
    guest, dev, fe = connected(host, frontends, "bad")
    bdev = backend_device(driver, guest.domid)
    tries: list[tuple[int, str]] = []

    def fatal(err: int, message: str) -> None:
        tries.append((err, message))
        raise RuntimeError("fatal broke")

    monkeypatch.setattr(bdev, "fatal", fatal)
    _run("work", driver, bdev, fe, lambda: 1 / 0)
    driver.wait_call("disconnect", guest.domid)
    bdev.events.flush()
    assert [e for e, _ in tries] == [errno.EIO]
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect"]
    assert bdev.resources == (0, 0)
    # The bug, then what failing it ran into: both with their traceback.
    assert [type(r.exc_info[1]) for r in _tracebacks(caplog)] == [  # type: ignore[index]
        ZeroDivisionError, RuntimeError]
    assert _unhandled(caplog) == []
    assert driver.workqueue.stats().failed == 0
    # The device still closes, and goes with its guest.
    fe.set_state(S.CLOSING)
    fe.wait_backend(S.CLOSING)
    fe.close()
    host.destroy_domain(guest)
    dom0_xs.wait_for(dev.backend_path, lambda v: v is None, timeout=TIMEOUT)
    census.check()


def test_a_work_failing_after_its_device_was_removed_is_only_logged(
        host, driver, frontends, dom0_xs, caplog) -> None:
    guest, dev, fe = connected(host, frontends, "gone")
    other, _, _ = connected(host, frontends, "other")
    bdev = backend_device(driver, guest.domid)
    dropped = threading.Event()
    _run("work", driver, bdev, fe, lambda: (dropped.wait(TIMEOUT), 1 / 0))
    fe.close()
    host.destroy_domain(guest)
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert bdev.gone
    dropped.set()
    driver.workqueue.flush()
    (logged,) = _tracebacks(caplog)
    assert isinstance(logged.exc_info[1], ZeroDivisionError)  # type: ignore[index]
    assert bdev.nodename in logged.getMessage()
    assert _unhandled(caplog) == []
    assert driver.workqueue.stats().failed == 0
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]
    assert error_node(dom0_xs, dev) is None
    assert backend_device(driver, other.domid).state == S.CONNECTED


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_work_failing_once_the_host_is_gone_is_logged_not_raised(frontends, caplog) -> None:
    """XenStore and the hypervisor gone, failing the device fails at each
    step; that is the host's loss, said once, and the driver's bug is
    still logged, nothing raised out of the worker."""
    before = {t.ident for t in threading.enumerate()}
    host = SimHost()
    host.start()
    drv = RecordingDriver(host.dom0)
    drv.start()
    try:
        guest, _, fe = connected(host, frontends, "guest")
        bdev = backend_device(drv, guest.domid)
    finally:
        host.close()
    assert drv.xenstore.connection_lost.wait(TIMEOUT)
    caplog.clear()
    _run("work", drv, bdev, fe, lambda: 1 / 0)
    drv.workqueue.flush()
    bdev.events.flush()
    assert [type(r.exc_info[1]) for r in _tracebacks(caplog)] == [  # type: ignore[index]
        ZeroDivisionError]
    assert _unhandled(caplog) == []
    assert drv.workqueue.stats().failed == 0
    assert drv.calls_of(guest.domid) == ["probe", "connect", "disconnect"]
    drv.stop()
    assert bdev.gone and drv.devices() == []
    fe.close()
    assert not leaked_threads(before)



def _count_fatal(bdev: BackendDevice, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The messages of every fatal() of ``bdev`` from now on."""
    tries: list[str] = []
    fatal = bdev.fatal

    def counted(err: int, message: str) -> bool:
        tries.append(message)
        return fatal(err, message)

    monkeypatch.setattr(bdev, "fatal", counted)
    return tries


def _queue_failing_in_disconnect(driver: RecordingDriver, bdev: BackendDevice,
                                 message: str) -> None:
    """Queue a DeviceWork of ``bdev`` that raises RuntimeError(message)
    once the driver's disconnect() of ``bdev`` has begun, which waits for
    it (disable_sync(), as a driver stops its work items); return once it
    runs.  Only a running Work fails so: one still pending when
    disconnect() comes is cancelled, and never runs."""
    running, disconnecting = threading.Event(), threading.Event()

    def serve(_work: object) -> None:
        running.set()
        assert disconnecting.wait(TIMEOUT)
        raise RuntimeError(message)

    work = DeviceWork(bdev, serve)

    def disconnect(d: BackendDevice) -> None:
        if d is bdev:
            disconnecting.set()
            work.disable_sync(timeout=TIMEOUT)

    driver.disconnect_hook = disconnect
    assert driver.workqueue.queue_work(work)
    assert running.wait(TIMEOUT)


def test_a_failure_while_the_device_is_failed_leaves_the_first_error(
        host, driver, frontends, dom0_xs, caplog, monkeypatch) -> None:
    """Two works of a device running at once, the second failing while
    disconnect() waits for it, as the first one's failure is being dealt
    with: the error node keeps the first failure, the second is logged."""
    guest, dev, fe = connected(host, frontends, "bad")
    bdev = backend_device(driver, guest.domid)
    tries = _count_fatal(bdev, monkeypatch)

    def first(_work: object) -> None:
        raise RuntimeError("first")

    _queue_failing_in_disconnect(driver, bdev, "second")
    assert driver.workqueue.queue_work(DeviceWork(bdev, first))
    fe.wait_backend(S.CLOSING)
    driver.workqueue.flush()
    bdev.events.flush()
    assert len(tries) == 1 and tries[0].endswith(": RuntimeError: first"), tries
    assert error_node(dom0_xs, dev) == f"{errno.EIO} {tries[0]}"
    assert [str(r.exc_info[1]) for r in _tracebacks(caplog)] == [  # type: ignore[index]
        "first", "second"]
    assert "failing already" in _tracebacks(caplog)[1].getMessage()
    assert _unhandled(caplog) == []


def test_a_work_failing_as_its_frontend_closes_leaves_the_device_closed(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """The failure of a Work that disconnect() waited for comes after the
    frontend's Closed was answered: the connection it would end is over,
    and a Closing then would stay, with an error for a guest that left."""
    guest, dev, fe = connected(host, frontends, "leaving")
    bdev = backend_device(driver, guest.domid)
    _queue_failing_in_disconnect(driver, bdev, "too late")
    fe.set_state(S.CLOSED)
    fe.wait_backend(S.CLOSED)
    bdev.events.flush()
    assert dom0_xs.read(f"{dev.backend_path}/state") == str(int(S.CLOSED))
    assert error_node(dom0_xs, dev) is None
    (logged,) = _tracebacks(caplog)
    assert str(logged.exc_info[1]) == "too late"  # type: ignore[index]
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect"]
    assert _unhandled(caplog) == []


def test_a_queued_call_failing_while_a_failure_waits_is_only_logged(
        host, driver, frontends, dom0_xs, caplog, monkeypatch) -> None:
    """A call queued before a Work's failure was handed over runs first,
    and fails: the device is failing for the Work's bug already, so the
    call's is only logged, and the error node keeps the first."""
    guest, dev, fe = connected(host, frontends, "bad")
    bdev = backend_device(driver, guest.domid)
    tries = _count_fatal(bdev, monkeypatch)
    held, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        assert held.wait(TIMEOUT)

    def second() -> None:
        raise RuntimeError("second")

    def first(_work: object) -> None:
        raise RuntimeError("first")

    assert bdev.queue(hold)
    assert holding.wait(TIMEOUT)
    assert bdev.queue(second)
    work = DeviceWork(bdev, first)
    assert driver.workqueue.queue_work(work)
    work.flush()  # the failure is handed over, behind second()
    held.set()
    fe.wait_backend(S.CLOSING)
    bdev.events.flush()
    assert len(tries) == 1 and tries[0].endswith(": RuntimeError: first"), tries
    assert error_node(dom0_xs, dev) == f"{errno.EIO} {tries[0]}"
    logged = _tracebacks(caplog)
    assert [str(r.exc_info[1]) for r in logged] == ["first", "second"]  # type: ignore[index]
    assert "failing already" in logged[1].getMessage()
    assert _unhandled(caplog) == []


@pytest.mark.parametrize("path", PATHS)
def test_a_device_connected_again_after_a_failure_fails_again(
        host, driver, frontends, monkeypatch, path) -> None:
    """Failing the device for one bug leaves nothing that would spare the
    next connection's: it fails as the first did, for its own."""
    guest, dev, fe = connected(host, frontends, "bad")
    bdev = backend_device(driver, guest.domid)
    tries = _count_fatal(bdev, monkeypatch)
    for n, name in enumerate(["first", "second"], 1):
        def broken(name: str = name) -> None:
            raise RuntimeError(name)

        _run(path, driver, bdev, fe, broken)
        fe.wait_backend(S.CLOSING)
        bdev.events.flush()
        assert len(tries) == n and tries[-1].endswith(f": RuntimeError: {name}"), tries
        driver.event_hook = None
        fe.set_state(S.INITIALISING)
        fe.wait_backend(S.INIT_WAIT)
        fe.publish()
        fe.wait_backend(S.CONNECTED)
    assert driver.calls_of(guest.domid) == [
        "probe", "connect", "disconnect", "connect", "disconnect", "connect"]


def test_what_cannot_be_called_is_refused_when_given(host, driver, frontends) -> None:
    """Not later on the device's queue or the dispatcher thread, where it
    would fail the device for a bug of the call that gave it."""
    guest, _, fe = connected(host, frontends, "guest")
    bdev = backend_device(driver, guest.domid)
    with pytest.raises(TypeError, match="callback must be callable, not NoneType"):
        bdev.queue(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="DeviceWork needs a callable, not int"):
        DeviceWork(bdev, 42)  # type: ignore[arg-type]
    port = fe.frontend.bind_port()
    with pytest.raises(TypeError, match="callback must be callable, not str"):
        bdev.bind_evtchn(port, "kick")  # type: ignore[arg-type]
    assert bdev.resources == (1, 1)  # nothing bound
    bdev.events.flush()
    assert bdev.state == S.CONNECTED


def test_the_error_node_names_a_callable_by_its_type_not_its_address(
        host, driver, frontends, dom0_xs) -> None:
    """A call without a name of its own (a partial, an object with
    __call__) is named by its type: its repr() would show the guest an
    address of ours."""
    guest, dev, fe = connected(host, frontends, "bad")
    bdev = backend_device(driver, guest.domid)

    def broken(what: str) -> None:
        raise RuntimeError(what)

    assert bdev.queue(functools.partial(broken, "boom"))
    fe.wait_backend(S.CLOSING)
    bdev.events.flush()
    assert error_node(dom0_xs, dev) == f"{errno.EIO} call partial: RuntimeError: boom"


def test_a_device_work_shows_its_function_as_a_work_does(host, driver, frontends) -> None:
    guest, _, _ = connected(host, frontends, "guest")
    bdev = backend_device(driver, guest.domid)

    def serve_the_ring(_work: object) -> None:
        pass

    assert serve_the_ring.__qualname__ in repr(DeviceWork(bdev, serve_the_ring))


def test_a_failure_after_the_device_directory_went_drops_the_device(
        host, driver, frontends, dom0_xs, caplog) -> None:
    """The toolstack deleted the device's directory while the failure
    waited: there is nothing to write Closing or an error into, so the
    device is dropped, as after a failed connect(), and no error node is
    made for a device that is gone."""
    guest, dev, fe = connected(host, frontends, "bad")
    bdev = backend_device(driver, guest.domid)
    held, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        assert held.wait(TIMEOUT)

    def broken() -> None:
        raise RuntimeError("boom")

    assert bdev.queue(hold)
    assert holding.wait(TIMEOUT)
    assert bdev.queue(broken)
    dom0_xs.rm(dev.backend_path)
    held.set()
    driver.wait_call("remove", guest.domid)
    bdev.events.flush()
    assert bdev.gone and bdev.resources == (0, 0)
    assert driver.calls_of(guest.domid) == ["probe", "connect", "disconnect", "remove"]
    assert error_node(dom0_xs, dev) is None
    assert dom0_xs.read(dev.backend_path) is None
    (logged,) = _tracebacks(caplog)
    assert str(logged.exc_info[1]) == "boom"  # type: ignore[index]
