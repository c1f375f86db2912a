"""Helpers of the xenback tests: a guest's frontend, a recording
backend driver, and leak counts (threads, event channels, grants)."""

from __future__ import annotations

import ast
import importlib
import itertools
import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xenback import BackendDevice, BackendDriver, XenbusState, XenStore

TIMEOUT = 10.0


class SimFrontend:
    """A guest's frontend as the tests need it: xenback.sim.FrontendDevice
    for the xenbus side, with the shortcuts the tests lean on (share() and
    publish() of one ring page and port), raw state writes for the garbage
    a test asks for, and a close() that says nothing to the backend, as a
    guest whose driver died (FrontendDevice.close() does the handshake)."""

    def __init__(self, guest: Any, device: Any) -> None:
        from xenback.sim import FrontendDevice

        self.guest = guest
        self.device = device
        self.path = device.frontend_path
        self.backend = device.backend_path
        self.frontend = FrontendDevice(guest, device, timeout=TIMEOUT)
        self.xs = self.frontend.xenstore
        self.evtchn = self.frontend.evtchn
        self.pages: Any = None
        self.port: int | None = None

    def set_state(self, state: XenbusState | str) -> None:
        self.xs.write(f"{self.path}/state", state if isinstance(state, str) else int(state))

    def share(self, npages: int = 1) -> None:
        self.pages = self.frontend.share(npages)
        self.port = self.frontend.bind_port()

    def publish(self, nodes: dict[str, str | int] | None = None,
                state: XenbusState = XenbusState.INITIALISED) -> None:
        """Write ring-ref/port (or ``nodes``) and ``state`` in one transaction."""
        if nodes is None:
            if self.pages is None:
                self.share()
            nodes = {"ring-ref": self.pages.refs[0], "port": self.port}
        self.frontend.publish(nodes, state=state)

    def wait_backend(self, state: XenbusState, timeout: float = TIMEOUT) -> None:
        self.frontend.wait_backend(state, timeout)

    def close(self) -> None:
        self.frontend.close(handshake=False)


class RecordingDriver(BackendDriver):
    """A test backend: writes a feature, maps ``ring-ref`` and binds
    ``port`` on connect, and records every hook call."""

    device_type = "xbtest"

    def __init__(self, platform: Any, **kwargs: Any) -> None:
        super().__init__(platform, **kwargs)
        self.calls: list[tuple[str, int, int]] = []
        self.changed = threading.Condition()
        self.probe_hook: Callable[[BackendDevice], None] | None = None
        self.connect_hook: Callable[[BackendDevice], None] | None = None
        self.disconnect_hook: Callable[[BackendDevice], None] | None = None
        #: Called by a device's event channel callback, on the dispatcher
        #: thread, with the device and the port, after the event is recorded.
        self.event_hook: Callable[[BackendDevice, int], None] | None = None
        self.events_seen: list[int] = []
        #: The devices remove() was called for, in order (see wait_removed).
        self.removed: list[BackendDevice] = []
        #: Hooks that ran outside their device's queue (the ``driver``
        #: fixture fails the test if any did).
        self.unordered: list[str] = []

    def _record(self, name: str, dev: BackendDevice) -> None:
        # A device's queue runs one call at a time: a hook running anywhere
        # else could overlap with, or overtake, that device's other hooks.
        with self.changed:
            if not dev.events.in_queue():
                self.unordered.append(f"{name} of {dev.nodename}")
            self.calls.append((name, dev.frontend_id, dev.devid))
            self.changed.notify_all()

    def calls_of(self, dev_or_fe: Any, devid: int = 0) -> list[str]:
        fe = dev_or_fe if isinstance(dev_or_fe, int) else dev_or_fe.frontend_id
        with self.changed:
            return [n for n, f, d in self.calls if (f, d) == (fe, devid)]

    def wait(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        with self.changed:
            if not self.changed.wait_for(predicate, timeout):
                raise AssertionError(f"timed out; calls so far: {self.calls}")

    def wait_call(self, name: str, fe: int, devid: int = 0, count: int = 1) -> None:
        self.wait(lambda: sum((n, f, d) == (name, fe, devid) for n, f, d in self.calls) >= count)

    def wait_removed(self, fe: int, devid: int = 0, count: int = 1) -> BackendDevice:
        """Wait for the ``count``-th remove() of frontend ``fe``'s device
        ``devid``, then for the rest of its drop, and return that device.
        remove() is called before the drop marks the device gone and
        forgets it, and nothing notifies ``changed`` then: the drop runs on
        the device's queue, whose flush waits for it (closed as it is by
        then).  The drop's look at the path, queued on the bus last, may
        still be to come (flush the bus for it)."""
        self.wait_call("remove", fe, devid, count)
        with self.changed:
            dev = [d for d in self.removed if (d.frontend_id, d.devid) == (fe, devid)][count - 1]
        dev.events.flush()
        return dev

    def probe(self, dev: BackendDevice) -> None:
        self._record("probe", dev)
        dev.write("feature-test", 1)
        if self.probe_hook is not None:
            self.probe_hook(dev)

    def connect(self, dev: BackendDevice) -> None:
        self._record("connect", dev)
        if self.connect_hook is not None:
            self.connect_hook(dev)
        ref = dev.read_otherend_int("ring-ref")
        port = dev.read_otherend_int("port")
        if ref is None or port is None:
            raise FileNotFoundError(2, "frontend did not publish ring-ref and port")
        dev.driver_data = dev.map_grant_refs([ref])
        dev.bind_evtchn(port, lambda local: self._event(dev, local))

    def _event(self, dev: BackendDevice, port: int) -> None:
        with self.changed:
            self.events_seen.append(port)
            self.changed.notify_all()
        if self.event_hook is not None:
            self.event_hook(dev, port)

    def disconnect(self, dev: BackendDevice) -> None:
        self._record("disconnect", dev)
        dev.driver_data = None
        if self.disconnect_hook is not None:
            self.disconnect_hook(dev)

    def remove(self, dev: BackendDevice) -> None:
        with self.changed:
            self.removed.append(dev)
        self._record("remove", dev)


def connected(host: Any, frontends: Any, name: str = "guest",
              devid: int = 0) -> tuple[Any, Any, Any]:
    """A new guest ``name`` whose ``xbtest`` device is Connected:
    ``(guest, toolstack device, frontend)``."""
    guest = host.create_domain(name)
    dev = host.toolstack.add_device("xbtest", guest.domid, devid=devid)
    fe = frontends(guest, dev)
    fe.wait_backend(XenbusState.INIT_WAIT)
    fe.publish()
    fe.wait_backend(XenbusState.CONNECTED)
    return guest, dev, fe


def backend_device(driver: BackendDriver, fe_id: int, devid: int = 0) -> BackendDevice:
    """The device ``driver`` serves for frontend domain ``fe_id``."""
    (dev,) = [d for d in driver.devices() if (d.frontend_id, d.devid) == (fe_id, devid)]
    return dev


def error_node(dom0_xs: XenStore, dev: Any) -> str | None:
    """What dom0's backend wrote to the error node of toolstack device ``dev``."""
    relative = dev.backend_path[len("/local/domain/0/"):]
    return dom0_xs.read(f"/local/domain/0/error/{relative}/error")


def handed_over(xs: XenStore, tag: str, base: str = "/ord-sync") -> None:
    """Return once every watch event XenStore sent ``xs`` so far has been
    handed to its callback or its EventQueue: the events of one connection
    come in order, and a watch without a queue runs on the watch thread.
    ``base`` must be writable by ``xs``'s domain."""
    node = f"{base}/{tag}"
    synced = threading.Event()
    sentinel = xs.watch(node, lambda p: synced.set() if p == f"{node}/x" else None)
    xs.write(f"{node}/x", 1)
    assert synced.wait(TIMEOUT)
    sentinel.unwatch()


def assert_dispatches(dispatcher: Any, where: str) -> None:
    """That ``dispatcher`` (an EventDispatcher with its thread) runs: a
    pipe made readable calls its callback.  ``where`` says, on failure,
    where the test had interrupted its making."""
    fired = threading.Event()
    r, w = os.pipe()
    try:
        dispatcher.add_fd(r, select.EPOLLIN, lambda _fd, _ev: fired.set())
        os.write(w, b"x")
        assert fired.wait(TIMEOUT), f"interrupted {where}"
        dispatcher.remove_fd(r)
    finally:
        os.close(r)
        os.close(w)


def leaked_threads(before: set[int | None]) -> list[str]:
    """Threads started since ``before`` that still run, except the
    workqueue's shared pool workers and timer: like the kernel's kworkers
    they belong to the process, not to the queue that first needed them."""
    return [
        t.name
        for t in threading.enumerate()
        if t.ident not in before and t.is_alive() and not t.name.startswith(("kworker/", "wq-"))
    ]


def _process_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if not t.name.startswith(("kworker/", "wq-"))]


class Census:
    """What a failure path must give back: live event-channel ports and
    grant entries on the simulated host, and threads of this process.

    A grant entry outlives its guest's unsharing exactly as long as
    somebody still maps it, so equal grant counts once the guest let go
    prove that the backend holds no mapping of it.  Take the census when
    the backend is idle, let the failure happen, close the failing guest's
    handles, then :meth:`check`.
    """

    def __init__(self, host: Any, driver: BackendDriver | None = None) -> None:
        self.host = host
        self.driver = driver
        if driver is not None:
            # The driver's dispatcher thread lives from the first bind to
            # stop(); start it now so that only per-device threads count.
            driver.events  # noqa: B018
        self.before = self._counts()
        self.threads = set(threading.enumerate())

    def _counts(self) -> dict[str, int]:
        stats = self.host.hypervisor.stats()
        counts = {"ports": stats["ports"], "grants": stats["grants"]}
        if self.driver is not None:
            held = [d.resources for d in self.driver.devices() if not d.gone]
            counts["mapped"] = sum(m for m, _ in held)
            counts["bound"] = sum(p for _, p in held)
        return counts

    def check(self, timeout: float = TIMEOUT) -> None:
        """Assert that nothing is left over since the census was taken;
        threads that are ending get until ``timeout`` to end."""
        deadline = time.monotonic() + timeout
        for t in _process_threads():
            if t not in self.threads:
                t.join(max(0.0, deadline - time.monotonic()))
        new = [t.name for t in _process_threads() if t not in self.threads]
        assert new == [], f"threads left behind: {new}"
        # The host frees a closed handle's ports and grants on its service
        # thread, after close() returned, and tells nobody: poll until the
        # counts are back or the deadline passed.
        now = self._counts()
        while now != self.before and time.monotonic() < deadline:
            time.sleep(0.005)
            now = self._counts()
        assert now == self.before, f"left behind: {now}, before: {self.before}"


def check_public_apis_only(script: str | Path) -> None:
    """Assert that an example leans on no framework internals: every name
    it imports from workqueue or xenback is exported (``__all__``), and it
    touches no underscored attribute of anything.  What a newcomer copies
    must keep working when the internals change."""
    tree = ast.parse(Path(script).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
            "workqueue", "xenback"
        ):
            exported = importlib.import_module(node.module).__all__
            for alias in node.names:
                assert alias.name in exported, f"{node.module}.{alias.name} is not public"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert not any(part.startswith("_") for part in alias.name.split(".")), alias.name
        elif isinstance(node, ast.Attribute):
            name = node.attr
            assert not name.startswith("_") or (name.startswith("__") and name.endswith("__")), (
                f"line {node.lineno}: .{name}"
            )


def serve_in_child(run_dir: str, domid: int, serving: Any, done: Any) -> None:
    """A process's RecordingDriver for domain ``domid`` of the simulated
    host in ``run_dir``: sets ``serving`` once started, stops when ``done``
    is set (multiprocessing Events; the target of a spawned Process)."""
    from xenback.sim import attach

    with RecordingDriver(attach(run_dir, domid)):
        serving.set()
        done.wait(TIMEOUT)


def frontend_in_child(run_dir: str, domid: int, device: Any, results: Any,
                      seen: Any) -> None:
    """A guest process's frontend for ``device`` of domain ``domid`` on the
    simulated host in ``run_dir``: handshakes to Connected, notifies the
    backend once, closes once ``seen`` is set, and puts each step's outcome
    on ``results`` (``seen`` a multiprocessing Event, ``results`` a Queue;
    the target of a spawned Process).

    Closing waits for the parent to have seen the event: a port's pending
    event is lost when disconnect unbinds it, as on Xen, so a close right
    after the notify races the backend's dispatcher thread."""
    from xenback.sim import FrontendDevice, attach

    try:
        with FrontendDevice(attach(run_dir, domid), device, timeout=TIMEOUT) as fe:
            page = fe.share()
            port = fe.bind_port()
            fe.publish({"ring-ref": page.refs[0], "port": port})
            results.put(("connected", fe.wait_backend(XenbusState.CONNECTED).name, port))
            fe.evtchn.notify(port)
            if not seen.wait(TIMEOUT):
                raise TimeoutError("the parent did not see the event")
        results.put(("closed", repr(fe), None))
    except BaseException as exc:  # the parent reports it, not a lost child
        results.put(("error", f"{type(exc).__name__}: {exc}", None))


def fails_once(real: Callable[..., Any], exc: Exception, *, after: bool = False
               ) -> Callable[..., Any]:
    """``real``, but its first call raises ``exc``: before doing anything,
    or (``after``) once it has done its work, as a handle whose reply was
    lost on the way back (an event channel handle's pending() or unmask()
    failing once, say)."""
    calls = itertools.count()

    def call(*args: Any) -> Any:
        if next(calls):
            return real(*args)
        if after:
            real(*args)
        raise exc

    return call
