"""The toolstack: devices added and removed with exactly libxl's nodes."""

from __future__ import annotations

import contextlib
import errno
import inspect
import itertools
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyxs
from fdcensus import open_sockets
from highfds import descriptors_past_fd_setsize, past_fd_setsize
from hosthelpers import SIM_CODE, eventually, hang_up_after_one_request, serve_one_client
from pyxs._internal import Op
from racewindow import TIMEOUT, Attempt, PauseAt, stands_at
from stolensignal import (
    OUTLASTS_THE_TEST,
    interrupt,
    interrupted_as_call_returns,
    interrupted_at,
    main_thread_in,
    main_thread_within,
)

from xenback import XenStore
from xenback.sim import Device, Domain, SimHost, Toolstack


def tree(c: pyxs.Client, path: str) -> dict[str, str]:
    out = {}
    for node, value, _ in c.walk(path.encode()):
        out[node.decode()[len(path) :] or "."] = value.decode()
    return out


def test_add_writes_exactly_libxls_nodes(host: SimHost, guest: Domain) -> None:
    dev = host.toolstack.add_device(
        "pvcalls", guest.domid, backend_nodes={"extra": "1"}, frontend_nodes={"hint": "x"}
    )
    assert dev == Device("pvcalls", 1, 0, 0)
    assert dev.backend_path == "/local/domain/0/backend/pvcalls/1/0"
    assert dev.frontend_path == "/local/domain/1/device/pvcalls/0"
    with host.dom0.xenstore() as c:
        assert tree(c, dev.backend_path) == {
            ".": "",
            "/frontend": dev.frontend_path,
            "/frontend-id": "1",
            "/online": "1",
            "/state": "1",
            "/extra": "1",
        }
        assert tree(c, dev.frontend_path) == {
            ".": "",
            "/backend": dev.backend_path,
            "/backend-id": "0",
            "/state": "1",
            "/hint": "x",
        }
        assert c.get_perms(dev.backend_path.encode()) == [b"n0", b"r1"]
        assert c.get_perms(dev.backend_path.encode() + b"/state") == [b"n0", b"r1"]
        assert c.get_perms(dev.frontend_path.encode()) == [b"n1", b"r0"]
        assert c.get_perms(dev.frontend_path.encode() + b"/state") == [b"n1", b"r0"]
        assert c.get_perms(dev.libxl_path.encode()) == [b"n0"]  # dom0's alone
        assert tree(c, dev.libxl_path) == {
            ".": "",
            "/frontend": dev.frontend_path,
            "/backend": dev.backend_path,
            "/frontend-id": "1",
            "/online": "1",
            "/state": "1",
        }
    assert host.toolstack.devices() == [dev]


def test_each_side_reads_the_other_and_writes_only_its_own(host: SimHost, guest: Domain) -> None:
    dev = host.toolstack.add_device("vif", guest.domid, devid=3)
    with guest.xenstore() as c:
        assert c.read(dev.backend_path.encode() + b"/state") == b"1"
        c.write(dev.frontend_path.encode() + b"/state", b"3")
        with pytest.raises(pyxs.PyXSError) as info:
            c.write(dev.backend_path.encode() + b"/state", b"4")
        assert info.value.args[0] == errno.EACCES


def test_driver_domain_backend(host: SimHost, guest: Domain) -> None:
    driver = host.create_domain("driver")
    dev = host.toolstack.add_device("pvcalls", guest.domid, backend_id=driver.domid)
    assert dev.backend_path == f"/local/domain/{driver.domid}/backend/pvcalls/1/0"
    with driver.xenstore() as c:
        c.write(dev.backend_path.encode() + b"/state", b"2")
        assert c.read(dev.frontend_path.encode() + b"/backend-id") == str(driver.domid).encode()


def backend_that_closes(host: SimHost, dev: Device, seen: list[bytes]) -> threading.Thread:
    """A minimal backend: answers Closing with Closed, recording ``online``."""
    client = host.dom0.xenstore()
    client.connect()
    monitor = client.monitor()
    state = dev.backend_path.encode() + b"/state"
    monitor.watch(state, b"t")

    def run() -> None:
        try:
            while True:
                monitor.events.get(timeout=10)
                if client.read(state) == b"5":
                    seen.append(client.read(dev.backend_path.encode() + b"/online"))
                    client.write(state, b"6")
                    return
        finally:
            client.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_remove_the_libxl_way(host: SimHost, guest: Domain) -> None:
    dev = host.toolstack.add_device("vif", guest.domid)
    seen: list[bytes] = []
    backend = backend_that_closes(host, dev, seen)
    assert host.toolstack.remove_device(dev) is True
    backend.join(TIMEOUT)
    assert seen == [b"0"]  # online=0 was written with Closing
    with host.dom0.xenstore() as c:
        for path in (dev.backend_path, dev.frontend_path, dev.libxl_path):
            assert not c.exists(path.encode())
    assert host.toolstack.devices() == []


def test_a_toolstack_holding_1024_descriptors_adds_and_removes(
        host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each operation opens its own XenStore connection: one numbered past
    FD_SETSIZE, which select() refuses, must work all the same."""
    plain = Toolstack._client
    numbers: list[int] = []  # of every connection's socket and wake-up pipe

    @contextlib.contextmanager
    def recorded(toolstack: Toolstack, *args: Any, **kwargs: Any) -> Iterator[pyxs.Client]:
        filled.refill()  # what a thread of the host closed since
        with plain(toolstack, *args, **kwargs) as client:
            router = client.router
            numbers.extend((router.connection.fileno(), router.r_terminator.fileno()))
            yield client

    monkeypatch.setattr(Toolstack, "_client", recorded)
    with descriptors_past_fd_setsize() as filled:
        dev = host.toolstack.add_device("vif", guest.domid)
        assert host.toolstack.devices() == [dev]
        with XenStore(host.dom0.xenstore()) as backend:
            state = dev.backend_path + "/state"

            def close() -> None:  # the backend's side of the removal
                backend.wait_for(state, "5", timeout=TIMEOUT)
                backend.write(state, "6")

            closer = threading.Thread(target=close)
            closer.start()
            try:
                assert host.toolstack.remove_device(dev, timeout=TIMEOUT) is True
            finally:
                closer.join(TIMEOUT)
        assert host.toolstack.devices() == []
    assert numbers and past_fd_setsize(*numbers), numbers


def test_a_signal_another_thread_took_interrupts_the_wait_for_closed(
        host: SimHost, guest: Domain) -> None:
    """The main thread waiting for a backend to close runs a signal's
    handler soon, not at the timeout, whichever thread took the signal;
    removing the device again then finishes the job.  (The timeout given
    outlasts the test: a wait the signal did not end is a test timeout.)"""
    dev = host.toolstack.add_device("vif", guest.domid)

    def main_waits() -> bool:
        return (main_thread_in("wait", path="threading")
                and main_thread_within("_wait_closed", depth=3))

    interrupt(main_waits, lambda: host.toolstack.remove_device(dev, timeout=OUTLASTS_THE_TEST))
    assert host.toolstack.remove_device(dev, timeout=0.1) is False
    assert host.toolstack.devices() == []


def test_remove_forces_after_the_timeout(host: SimHost, guest: Domain) -> None:
    timeout = inspect.signature(host.toolstack.remove_device).parameters["timeout"]
    assert timeout.default == 10.0  # libxl's
    dev = host.toolstack.add_device("vif", guest.domid)
    start = time.monotonic()
    assert host.toolstack.remove_device(dev, timeout=0.3) is False
    assert time.monotonic() - start >= 0.3
    with host.dom0.xenstore() as c:
        assert not c.exists(dev.backend_path.encode())
        assert not c.exists(dev.frontend_path.encode())


def test_remove_of_a_closed_backend_does_not_wait(host: SimHost, guest: Domain) -> None:
    dev = host.toolstack.add_device("vif", guest.domid)
    with host.dom0.xenstore() as c:
        c.write(dev.backend_path.encode() + b"/state", b"6")
    assert host.toolstack.remove_device(dev, timeout=30) is True


def test_destroying_a_domain_removes_its_devices(
        host: SimHost, guest: Domain, caplog: pytest.LogCaptureFixture) -> None:
    timeout = inspect.signature(host.destroy_domain).parameters["timeout"]
    assert timeout.default == 10.0  # libxl's LIBXL_DESTROY_TIMEOUT
    dev = host.toolstack.add_device("vif", guest.domid)
    other = host.toolstack.add_device("vif", host.create_domain("other").domid)
    start = time.monotonic()
    host.destroy_domain(guest, timeout=0.3)  # nobody closes the backend
    assert time.monotonic() - start >= 0.3
    # It gave up at the timeout given, not at libxl's 10 s.
    assert f"backend {dev.backend_path} did not close within 0.3 s" in caplog.text
    with host.dom0.xenstore() as c:
        assert not c.exists(dev.backend_path.encode())
        assert not c.exists(f"/local/domain/{guest.domid}".encode())
    assert host.toolstack.devices() == [other]


class Recorder:
    """Every change XenStore reports to a dom0 watch on ``/`` and on
    ``@releaseDomain``, in the order the store made them."""

    def __init__(self, host: SimHost) -> None:
        self.client = host.dom0.xenstore()
        self.client.connect()
        self.monitor = self.client.monitor()
        self.monitor.watch(b"/", b"all")
        self.monitor.watch(b"@releaseDomain", b"release")
        self.marks = 0
        self.paths()  # the watches' first events

    def paths(self) -> list[str]:
        """The changes since the last call: a marker node written now is
        reported after all of them, on the same connection."""
        self.marks += 1
        mark = f"/mark{self.marks}".encode()
        self.client.write(mark, b"1")
        out: list[str] = []
        while True:
            event = self.monitor.events.get(timeout=10)
            if event.path == mark:
                self.client.delete(mark)
                self.monitor.events.get(timeout=10)  # the delete
                return out
            out.append(event.path.decode())

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def recorder(host: SimHost) -> Iterator[Recorder]:
    rec = Recorder(host)
    yield rec
    rec.close()


def test_add_device_order(host: SimHost, guest: Domain, recorder: Recorder) -> None:
    dev = host.toolstack.add_device("pvcalls", guest.domid)
    changes = recorder.paths()
    lx = dev.libxl_path
    order = [lx, f"{lx}/backend", dev.frontend_path, f"{dev.frontend_path}/state",
             dev.backend_path, f"{dev.backend_path}/state", f"{lx}/frontend-id", f"{lx}/state"]
    assert [changes.index(path) for path in order] == sorted(changes.index(p) for p in order)


def test_remove_device_order_and_pruned_parents(
    host: SimHost, guest: Domain, recorder: Recorder
) -> None:
    dev = host.toolstack.add_device("vif", guest.domid)
    host.toolstack.add_device("console", guest.domid)  # keeps the common parents
    backend = backend_that_closes(host, dev, [])
    recorder.paths()
    assert host.toolstack.remove_device(dev) is True
    backend.join(10)
    be, fe, lx = dev.backend_path, dev.frontend_path, dev.libxl_path
    assert recorder.paths() == [
        # libxl__initiate_device_generic_remove: one transaction, whose
        # events come in the order it first touched the nodes (cxenstored's
        # access list): it reads state before it writes online.
        f"{be}/state",
        f"{be}/online",
        # The backend closes.
        f"{be}/state",
        # libxl__device_destroy: one transaction, each path with the
        # parents it leaves empty, up to backend/<type> itself.
        fe,
        fe.rsplit("/", 1)[0],
        lx,
        lx.rsplit("/", 1)[0],
        be,
        f"/local/domain/0/backend/vif/{guest.domid}",
        "/local/domain/0/backend/vif",
    ]
    with host.dom0.xenstore() as c:
        assert c.exists(b"/local/domain/0/backend/console")
        assert c.exists(f"/local/domain/{guest.domid}/device/console".encode())


def test_destroy_domain_order(host: SimHost, guest: Domain, recorder: Recorder) -> None:
    dev = host.toolstack.add_device("pvcalls", guest.domid)
    seen: list[bytes] = []
    backend = backend_that_closes(host, dev, seen)
    recorder.paths()
    host.destroy_domain(guest)
    backend.join(10)
    assert seen == [b"0"]
    be, fe, lx = dev.backend_path, dev.frontend_path, dev.libxl_path
    home = f"/local/domain/{guest.domid}"
    assert recorder.paths() == [
        # libxl__devices_destroy: the frontend goes first (device/ itself
        # stays: libxl made device/suspend/event-channel in it)...
        fe,
        f"{home}/device/pvcalls",
        # ...then the backend is asked to close (one transaction that read
        # state first: see above), and does...
        f"{be}/state",
        f"{be}/online",
        f"{be}/state",
        # ...and the rest is removed, with every parent left empty.
        lx,
        "/libxl/1/device/pvcalls",
        "/libxl/1/device",
        "/libxl/1",
        "/libxl",
        be,
        "/local/domain/0/backend/pvcalls/1",
        "/local/domain/0/backend/pvcalls",
        "/local/domain/0/backend",
        # Then the home, and last the domain itself.
        home,
        "@releaseDomain",
    ]


def test_destroy_domain_of_a_closed_backend_writes_only_online(
    host: SimHost, guest: Domain, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    dev = host.toolstack.add_device("pvcalls", guest.domid)
    with host.dom0.xenstore() as c:
        c.write(dev.backend_path.encode() + b"/state", b"6")
    recorder.paths()
    host.destroy_domain(guest, timeout=30)
    assert "did not close" not in caplog.text  # no wait for a Closed backend ran out
    changes = recorder.paths()
    # After the frontend directory and the parent it empties:
    fe_gone = changes.index(dev.frontend_path.rsplit("/", 1)[0]) + 1
    assert changes[fe_gone : fe_gone + 2] == [f"{dev.backend_path}/online", dev.libxl_path]


def test_domain_toolstack_acts_as_dom0(host: SimHost, guest: Domain) -> None:
    with guest.toolstack as ts:
        dev = ts.add_device("console", guest.domid)
        assert ts.remove_device(dev, timeout=0.1) is False


def test_remove_of_a_device_whose_backend_is_gone(host: SimHost, guest: Domain) -> None:
    dev = host.toolstack.add_device("vif", guest.domid)
    with host.dom0.xenstore() as c:
        c.delete(dev.backend_path.encode())
    assert host.toolstack.remove_device(dev, timeout=30) is True
    with host.dom0.xenstore() as c:
        assert not c.exists(dev.frontend_path.encode())
    assert host.toolstack.devices() == []


def test_backend_vanishing_during_removal_counts_as_closed(host: SimHost, guest: Domain) -> None:
    dev = host.toolstack.add_device("vif", guest.domid)
    client = host.dom0.xenstore()
    client.connect()
    monitor = client.monitor()
    monitor.watch(dev.backend_path.encode() + b"/state", b"t")

    def backend() -> None:
        while client.read(dev.backend_path.encode() + b"/state", b"") != b"5":
            monitor.events.get(timeout=10)
        client.delete(dev.backend_path.encode())

    thread = threading.Thread(target=backend)
    thread.start()
    try:
        assert host.toolstack.remove_device(dev, timeout=30) is True
    finally:
        thread.join(10)
        client.close()


def test_a_request_the_host_never_answers_fails(tmp_path) -> None:
    # The host going away under a request: it fails with ENOTCONN instead
    # of waiting forever for its reply (and pyxs's thread dies quietly).
    path = str(tmp_path / "xenstored")
    server = hang_up_after_one_request(path)
    caller = Attempt(lambda: Toolstack(path).devices())
    exc = caller.result(msg="the request is still waiting for its reply")
    assert isinstance(exc, pyxs.PyXSError) and exc.args[0] == errno.ENOTCONN, exc
    server.join(10)


def test_adding_over_leftovers_starts_afresh(host: SimHost, guest: Domain) -> None:
    """libxl deletes each directory before it makes it again: nodes a
    previous device left behind (its backend directory gone, else the
    device still exists) do not reach the new one."""
    first = host.toolstack.add_device("vif", guest.domid, backend_nodes={"extra": "1"})
    with host.dom0.xenstore() as c:
        trees = {p: tree(c, p) for p in (first.backend_path, first.frontend_path, first.libxl_path)}
        c.delete(first.backend_path.encode())
        for path in (first.frontend_path, first.libxl_path):
            c.write(path.encode() + b"/stale", b"x")
    again = host.toolstack.add_device("vif", guest.domid, backend_nodes={"extra": "1"})
    assert again == first
    with host.dom0.xenstore() as c:
        assert {p: tree(c, p) for p in trees} == trees


def test_the_callers_nodes_come_after_libxls(
    host: SimHost, guest: Domain, recorder: Recorder
) -> None:
    # libxl's device_add: backend-id and state (frontend-id, online and
    # state) first, then the type's own nodes.
    dev = host.toolstack.add_device(
        "pvcalls", guest.domid, backend_nodes={"extra": "1"}, frontend_nodes={"hint": "x"}
    )
    changes = recorder.paths()
    fe, be = dev.frontend_path, dev.backend_path
    order = [f"{fe}/backend-id", f"{fe}/state", f"{fe}/hint",
             f"{be}/frontend-id", f"{be}/online", f"{be}/state", f"{be}/extra"]
    assert [changes.index(path) for path in order] == sorted(changes.index(p) for p in order)


def test_a_conflicting_transaction_runs_again(host: SimHost) -> None:
    """A commit that fails with EAGAIN (a write in between) is retried
    from the start, reading what the other write left."""
    seen: list[bytes] = []
    with host.dom0.xenstore() as other:

        def body(c: pyxs.Client) -> bytes:
            value = c.read(b"/counter", b"0")
            seen.append(value)
            if len(seen) == 1:
                other.write(b"/counter", b"1")  # meanwhile, outside it
            c.write(b"/counter", str(int(value) + 10).encode())
            return value

        assert host.toolstack.transaction(body) == b"1"
        assert seen == [b"0", b"1"]
        assert other.read(b"/counter") == b"11"



def test_only_the_commit_that_went_is_told(host: SimHost) -> None:
    """The callback of a transaction's commit (add_device()'s listing of
    its device) runs for the commit that went, not for one refused with
    EAGAIN before it."""
    seen: list[bytes] = []
    told: list[int] = []
    with host.dom0.xenstore() as other:

        def body(c: pyxs.Client) -> None:
            seen.append(c.read(b"/counter", b"0"))
            if len(seen) == 1:
                other.write(b"/counter", b"1")  # meanwhile, outside it
            c.write(b"/counter", b"2")

        host.toolstack._transaction(body, lambda: told.append(len(seen)))
    assert told == [2]


def test_an_add_interrupted_anywhere_in_its_commit_lists_the_device_it_added(
        host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing as any call of add_device(into=)'s commit returns,
    with XenStore's reply to the commit held back until the add waits for
    it or has given up: once the commit went, the device is in the store,
    and into= must list it for the caller to remove.  The add waits for
    the reply before it goes on; going straight on, it closed its
    connection on the way out with the reply unread, the device was
    never listed, and every later add of it refused (FileExistsError)."""
    from xenback.xenstore import _commit

    dispatcher = host._xenstored._dispatcher
    real_send = dispatcher._send
    over = threading.Event()  # the add has returned (or raised)
    late: list[str] = []

    def send(conn: Any, data: bytes) -> None:
        # On XenStore's thread: the commit is done, its reply not sent yet.
        op = struct.unpack_from("<I", data)[0]
        if op == Op.TRANSACTION_END and data[16:] == b"OK\0":
            deadline = time.monotonic() + TIMEOUT
            while not (over.is_set() or (main_thread_in("wait", path="threading")
                                         and main_thread_within("_commit", depth=3))):
                if time.monotonic() >= deadline:
                    late.append("the add neither returned nor waited for the commit's reply")
                    break
                time.sleep(0.001)
        real_send(conn, data)

    monkeypatch.setattr(dispatcher, "_send", send)
    for n in itertools.count():
        ours: list[Device] = []
        over.clear()
        try:
            landed = interrupted_as_call_returns(
                _commit.__code__, n,
                lambda ours=ours: host.toolstack.add_device("vif", guest.domid, into=ours))
        finally:
            over.set()
        assert not late, late
        left = host.toolstack.devices(guest.domid)
        assert left == ours, (f"interrupted as call {n} of _commit returned: "
                              f"{left} left, {ours} listed")
        for device in left:
            host.toolstack.destroy_device(device)  # for the next round
        if not landed:
            break
    assert n > 3, n


def test_a_parent_with_a_value_is_not_pruned(host: SimHost, guest: Domain) -> None:
    # libxl__xs_path_cleanup stops at the first parent that has a value.
    dev = host.toolstack.add_device("vif", guest.domid)
    parent = dev.backend_path.rsplit("/", 1)[0].encode()
    with host.dom0.xenstore() as c:
        c.write(parent, b"kept")
    host.toolstack.destroy_device(dev)
    with host.dom0.xenstore() as c:
        assert not c.exists(dev.backend_path.encode())
        assert c.read(parent) == b"kept"


def test_a_libxl_entry_without_a_backend_is_no_device(host: SimHost, guest: Domain) -> None:
    dev = host.toolstack.add_device("vif", guest.domid)
    with host.dom0.xenstore() as c:  # half written, by someone else
        c.write(f"/libxl/{guest.domid}/device/vif/7/frontend".encode(), b"x")
    assert host.toolstack.devices() == [dev]
    assert host.toolstack.devices(guest.domid) == [dev]


def test_destroy_devices_waits_once_for_all_backends(
    host: SimHost, guest: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timeout is for all the devices of the dying domain together, as
    libxl's: three backends that never close cost it once, not three
    times.  Each wait is given the one deadline set before the first."""
    toolstack = host.toolstack
    devs = [toolstack.add_device("vif", guest.domid, devid=i) for i in range(3)]
    deadlines = []
    wait_closed = toolstack._wait_closed

    def recorded(path: bytes, events: Any, deadline: float) -> bool:
        deadlines.append(deadline)
        return wait_closed(path, events, deadline)

    monkeypatch.setattr(toolstack, "_wait_closed", recorded)
    start = time.monotonic()
    late = toolstack.destroy_devices(guest.domid, timeout=0.8)
    assert time.monotonic() - start >= 0.8
    assert sorted(late, key=lambda d: d.devid) == devs
    assert len(deadlines) == 3 and len(set(deadlines)) == 1
    assert start + 0.8 <= deadlines[0] <= time.monotonic()
    assert toolstack.devices() == []


def test_destroy_devices_leaves_a_domains_own_backends(host: SimHost, guest: Domain) -> None:
    """A device the dying domain serves itself has nobody left to close
    it: destroy_devices does not wait for it (destroy_domain deletes it at
    once, with the other devices of its backend)."""
    own = host.toolstack.add_device("vif", guest.domid, backend_id=guest.domid)
    assert host.toolstack.destroy_devices(guest.domid, timeout=1) == []
    assert host.toolstack.devices() == [own]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "said"),
    [
        (("", 1), {}, ValueError, "device_type must be a non-empty XenStore path element, not ''"),
        (("a/b", 1), {}, ValueError, "device_type must be a non-empty XenStore path element"),
        (("v\u00ebf", 1), {}, ValueError, "device_type must be a non-empty XenStore path element"),
        ((5, 1), {}, TypeError, "device_type must be a str, not int 5"),
        (("vif", -1), {}, ValueError, "frontend_id must be a domain id (0 to 32751), not -1"),
        (("vif", 0x7FF0), {}, ValueError,
         "frontend_id must be a domain id (0 to 32751), not 32752"),
        (("vif", True), {}, TypeError, "frontend_id must be an int (a domain id), not bool True"),
        (("vif", 1, "0"), {}, TypeError, "backend_id must be an int (a domain id), not str '0'"),
        (("vif", 1, 0, -1), {}, ValueError,
         "devid must be 0 to 2147483647 (a libxl_devid, a C int), not -1"),
        (("vif", 1, 0, 2**31), {}, ValueError,
         "devid must be 0 to 2147483647 (a libxl_devid, a C int), not 2147483648"),
        # str() of it failed with Python's 4300-digit limit instead.
        (("vif", 1, 0, 10**5000), {}, ValueError,
         "devid must be 0 to 2147483647 (a libxl_devid, a C int), "
         "not about 10**5000 (an int of 16610 bits)"),
        (("vif", 1, 0, "0"), {}, TypeError, "devid must be an int, not str '0'"),
        (("vif", 1, 0, 1.0), {}, TypeError, "devid must be an int, not float 1.0"),
        (("vif", 1), {"backend_nodes": {"a/b": "x"}}, ValueError, "node name must be"),
        (("vif", 1), {"frontend_nodes": {"": "x"}}, ValueError, "node name must be"),
        (("vif", 1), {"frontend_nodes": {5: "x"}}, TypeError, "node name must be a str, not int 5"),
    ],
)
def test_bad_devices_are_refused_saying_why(
    host: SimHost,
    args: tuple,  # type: ignore[type-arg]
    kwargs: dict,  # type: ignore[type-arg]
    error: type[Exception],
    said: str,
) -> None:
    """As Python's own calls: TypeError for an argument of the wrong
    type, ValueError for a wrong value of the right one; each naming the
    argument, and showing a huge number by its size."""
    with pytest.raises(error, match=f"^{re.escape(said)}"):
        host.toolstack.add_device(*args, **kwargs)
    assert host.toolstack.devices() == []


def test_names_may_hold_what_a_xenstore_path_element_may(host: SimHost, guest: Domain) -> None:
    """Letters, digits, '-' and '_' (xenstore.txt's path characters, but
    '/' and '@'): a name refused here could not be a device of libxl's."""
    dev = host.toolstack.add_device("my_vif-2", guest.domid, backend_nodes={"feature_x-1": "1"},
                                    frontend_nodes={"ring_ref": "8"})
    with host.dom0.xenstore() as c:
        assert c.read(dev.backend_path.encode() + b"/feature_x-1") == b"1"
        assert c.read(dev.frontend_path.encode() + b"/ring_ref") == b"8"
    assert host.toolstack.devices() == [dev]


def test_the_largest_devid_is_a_c_int_s(host: SimHost, guest: Domain) -> None:
    """libxl's devid is an int, -1 meaning "pick one": 0 to 2**31 - 1."""
    dev = host.toolstack.add_device("vbd", guest.domid, devid=2**31 - 1)
    assert dev.backend_path == f"/local/domain/0/backend/vbd/{guest.domid}/2147483647"
    assert host.toolstack.devices() == [dev]


@pytest.mark.parametrize(
    ("fields", "error", "said"),
    [
        (("vif", 1, 0, 10**5000), ValueError, "devid must be 0 to 2147483647"),
        (("vif", 1, 0, -1), ValueError, "devid must be 0 to 2147483647"),
        (("vif", 1, 0, "0"), TypeError, "devid must be an int, not str '0'"),
        (("vif", 10**5000, 0, 0), ValueError, "frontend_id must be a domain id (0 to 32751), "
                                              "not about 10**5000"),
        (("vif", 1, None, 0), TypeError, "backend_id must be an int (a domain id), not NoneType"),
        (("a/b", 1, 0, 0), ValueError, "device_type must be a non-empty XenStore path element"),
    ],
)
def test_a_device_is_checked_as_it_is_made(
    fields: tuple, error: type[Exception], said: str  # type: ignore[type-arg]
) -> None:
    """A Device made by hand, to remove one say, is checked as add_device()
    checks: its paths failed later, inside str(), for a 4300-digit devid."""
    with pytest.raises(error, match=f"^{re.escape(said)}"):
        Device(*fields)


def test_a_device_keeps_plain_ints() -> None:
    import enum

    Dom = enum.IntEnum("Dom", {"GUEST": 3})
    dev = Device("vif", Dom.GUEST, 0, Dom.GUEST)
    assert (type(dev.frontend_id), type(dev.devid)) == (int, int)
    assert dev.frontend_path == "/local/domain/3/device/vif/3"


@pytest.mark.parametrize(("domid", "error"), [(-1, ValueError), (0x7FF0, ValueError),
                                              (True, TypeError), ("1", TypeError)])
def test_destroy_devices_refuses_what_is_not_a_domain_id(
        host: SimHost, domid: int, error: type[Exception]) -> None:
    with pytest.raises(error, match="^domid must be a"):
        host.toolstack.destroy_devices(domid)


def test_a_device_that_exists_is_not_added_again(host: SimHost, guest: Domain) -> None:
    # libxl__device_add_async: ERROR_DEVICE_EXISTS, nothing written.  A
    # second add must not wipe the directories a backend serves.
    dev = host.toolstack.add_device("vif", guest.domid, devid=5, backend_nodes={"mac": "m"})
    with host.dom0.xenstore() as c:
        c.write(f"{dev.backend_path}/state".encode(), b"4")
        before = tree(c, f"/local/domain/0/backend/vif/{guest.domid}")
        with pytest.raises(FileExistsError, match=f"^.*{re.escape(dev.backend_path)} exists"):
            host.toolstack.add_device("vif", guest.domid, devid=5)
        assert tree(c, f"/local/domain/0/backend/vif/{guest.domid}") == before
    assert host.toolstack.devices() == [dev]


@pytest.mark.parametrize("side", ["frontend_id", "backend_id"])
def test_a_device_of_no_domain_is_not_added(host: SimHost, guest: Domain, side: str) -> None:
    ids = {"frontend_id": guest.domid, "backend_id": 0, side: 42}
    with pytest.raises(LookupError, match="^no domain 42"):
        host.toolstack.add_device("vif", **ids)
    assert host.toolstack.devices() == []
    with host.dom0.xenstore() as c:
        assert not c.exists(b"/local/domain/42")


def test_replace_writes_a_device_that_exists_afresh(host: SimHost, guest: Domain) -> None:
    dev = host.toolstack.add_device("vif", guest.domid, backend_nodes={"old": "1"})
    with host.dom0.xenstore() as c:
        c.write(f"{dev.backend_path}/state".encode(), b"4")
        assert host.toolstack.add_device("vif", guest.domid, replace=True) == dev
        assert tree(c, dev.backend_path) == {
            ".": "", "/frontend": dev.frontend_path, "/frontend-id": str(guest.domid),
            "/online": "1", "/state": "1"}


def test_replace_must_be_true_or_false(host: SimHost, guest: Domain) -> None:
    """replace="no" is not read for its truth: it would rewrite a live
    backend's directory.  TypeError naming the argument, nothing written."""
    dev = host.toolstack.add_device("vif", guest.domid, backend_nodes={"old": "1"})
    with host.dom0.xenstore() as c:
        before = tree(c, dev.backend_path)
        with pytest.raises(TypeError, match="replace must be True or False, not str 'no'"):
            host.toolstack.add_device("vif", guest.domid, replace="no")  # type: ignore[arg-type]
        assert tree(c, dev.backend_path) == before
    with pytest.raises(TypeError, match="replace must be True or False, not int 0"):
        host.toolstack.add_device("vif", guest.domid, devid=1, replace=0)  # type: ignore[arg-type]
    assert host.toolstack.devices(guest.domid) == [dev]


@pytest.mark.parametrize(("timeout", "error"), [(-1, ValueError), (float("nan"), ValueError),
                                               ("1", TypeError), (None, TypeError),
                                               (True, TypeError)])
def test_removal_refuses_a_timeout_that_is_no_time(
    host: SimHost, guest: Domain, timeout: float, error: type[Exception]
) -> None:
    # As destroy_domain: not a removal forced at once.
    dev = host.toolstack.add_device("vif", guest.domid)
    for remove in (lambda: host.toolstack.remove_device(dev, timeout),
                   lambda: host.toolstack.destroy_devices(guest.domid, timeout)):
        with pytest.raises(error, match="^timeout must be a"):
            remove()
    assert host.toolstack.devices() == [dev]


@pytest.mark.parametrize(("domid", "error"), [(-1, ValueError), (True, TypeError),
                                              ("1", TypeError)])
def test_devices_refuses_what_is_not_a_domain_id(
        host: SimHost, guest: Domain, domid: int, error: type[Exception]) -> None:
    host.toolstack.add_device("vif", guest.domid)
    with pytest.raises(error, match="^domid must be a"):
        host.toolstack.devices(domid)


def test_remove_device_refuses_what_is_not_a_device(host: SimHost, guest: Domain) -> None:
    dev = host.toolstack.add_device("vif", guest.domid)
    for remove in (host.toolstack.remove_device, host.toolstack.destroy_device):
        with pytest.raises(TypeError, match="^device must be a xenback.sim.Device, not str 'vif'"):
            remove("vif")  # type: ignore[operator]
    assert host.toolstack.devices() == [dev]


def test_a_removal_waiting_for_a_backend_fails_at_once_when_xenstore_goes() -> None:
    host = SimHost()
    host.start()
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("vif", guest.domid)
    outcome: list[BaseException] = []

    def remove() -> None:
        try:
            host.toolstack.remove_device(dev, timeout=600)
        except BaseException as e:
            outcome.append(e)

    state = f"{dev.backend_path}/state".encode()
    with host.dom0.xenstore() as c:
        monitor = c.monitor()
        monitor.watch(state, b"t")
        remover = threading.Thread(target=remove)
        remover.start()
        while c.read(state) != b"5":  # asked to close
            monitor.events.get(timeout=TIMEOUT)
    # Waiting for an event, not about to connect (that would fail at once).
    assert eventually(lambda: stands_at(remover.ident, Toolstack._wait_closed, "events.get("))
    host.close()
    remover.join(TIMEOUT)
    assert not remover.is_alive()
    (error,) = outcome
    assert isinstance(error, pyxs.ConnectionError)
    assert f"XenStore went away while waiting for {dev.backend_path}/state" in str(error)


def test_a_removal_woken_by_an_event_as_xenstore_goes_says_it_went_away() -> None:
    """An event that wakes the wait for Closed just before XenStore goes
    (one still on its way as the host closes): the read that follows
    fails, and says so as the wait itself would have."""
    host = SimHost()
    host.start()
    guest = host.create_domain("guest")
    dev = host.toolstack.add_device("vif", guest.domid)
    outcome: list[BaseException] = []
    # The second read: the one after an event (the watch's first, at least).
    pause = PauseAt(Toolstack._wait_closed, "state = _read(client, path)", skip=1)

    def remove() -> None:
        try:
            host.toolstack.remove_device(dev, timeout=600)
        except BaseException as e:
            outcome.append(e)

    remover = threading.Thread(target=pause.run, args=(remove,))
    remover.start()
    try:
        assert pause.reached.wait(TIMEOUT)
        host.close()
    finally:
        pause.resume()
    remover.join(TIMEOUT)
    assert not remover.is_alive()
    (error,) = outcome
    assert isinstance(error, pyxs.ConnectionError)
    assert f"XenStore went away while waiting for {dev.backend_path}/state" in str(error)


def test_a_client_closed_as_xenstore_hangs_up_is_quiet(tmp_path, monkeypatch) -> None:
    """Each operation closes its client as it ends: pyxs's terminate()
    tests that the connection is up and then writes to the router's
    terminator pair, which the router closes as it ends when XenStore
    hangs up in between.  The operation, done, failed with EBADF."""
    from pyxs.client import Router

    from xenback.sim import _toolstack as toolstack

    path = str(tmp_path / "xenstored")
    hang_up = threading.Event()

    def answer_then_hang_up(conn: socket.socket) -> None:
        _op, rq_id, tx_id, size = struct.unpack("<4I", conn.recv(16, socket.MSG_WAITALL))
        conn.recv(size, socket.MSG_WAITALL)
        error = b"ENOENT\0"  # no /libxl: no devices
        conn.sendall(struct.pack("<4I", 16, rq_id, tx_id, len(error)) + error)
        hang_up.wait(TIMEOUT)

    server = serve_one_client(path, answer_then_hang_up)
    routers: list[Any] = []
    adopt = toolstack.adopt_router

    def adopt_and_keep(router: Any, *args: Any, **kwargs: Any) -> None:
        adopt(router, *args, **kwargs)
        routers.append(router)

    monkeypatch.setattr(toolstack, "adopt_router", adopt_and_keep)
    pause = PauseAt.in_method(monkeypatch, Router, "terminate", "self.w_terminator.sendall")
    caller = Attempt(lambda: Toolstack(path).devices())
    assert pause.reached.wait(TIMEOUT)
    hang_up.set()
    server.join(TIMEOUT)
    (router,) = routers
    router.thread.join(TIMEOUT)
    assert not router.thread.is_alive()
    pause.resume()
    assert caller.result() == []


def test_a_ctrl_c_as_an_operation_closes_its_client_leaves_no_router(
        host: SimHost, guest: Domain) -> None:
    """Each operation's client is closed again when a Ctrl-C lands in its
    close (as a call of close_client returns): nobody else has the client,
    and its router thread would run for as long as XenStore does."""
    from xenback.xenstore import close_client

    host.toolstack.add_device("vif", guest.domid)
    for n in itertools.count():
        landed = interrupted_as_call_returns(close_client.__code__, n, host.toolstack.devices)
        routers = [t for t in threading.enumerate() if t.name == "toolstack-xenstore"]
        assert routers == [], f"interrupted as call {n} of close_client returned: {routers}"
        if not landed:
            break
    assert n > 1, n


def test_an_operation_cut_short_by_ctrl_c_anywhere_in_the_toolstack_leaves_no_socket(
        host: SimHost, guest: Domain) -> None:
    """A Ctrl-C landing anywhere in the toolstack's own code as an
    operation runs: no socket of its client is left open (nor router).
    One landing as the client's router was adopted, before the try that
    closes the client, left its terminator pair to the collector."""
    from xenback.sim import _toolstack

    host.toolstack.add_device("vif", guest.domid)
    elsewhere = tuple(os.fspath(p) for p in Path(SIM_CODE).iterdir()
                      if p.name != os.path.basename(_toolstack.__file__))
    client_code = _toolstack.Toolstack._client.__wrapped__.__code__  # type: ignore[attr-defined]

    def no_client_yet() -> bool:
        # Not as pyxs.Client() returns: the client is lost before any code
        # of ours has it, in a reference cycle (its router's thread runs
        # the router) that only the collector frees.
        frame = sys._getframe(1)
        while frame is not None and frame.f_code is not client_code:
            frame = frame.f_back  # type: ignore[assignment]
        return frame is not None and "client" not in frame.f_locals

    landed = []
    for n in itertools.count():
        sockets = open_sockets()
        where = interrupted_at(n, SIM_CODE, host.toolstack.devices, no_client_yet,
                               besides=elsewhere)
        assert eventually(lambda sockets=sockets: open_sockets() <= sockets), (
            f"interrupted {where}: sockets left {open_sockets() - sockets}")
        routers = [t for t in threading.enumerate() if t.name == "toolstack-xenstore"]
        assert routers == [], f"interrupted {where}: {routers}"
        if not where:
            break
        landed.append(where)
    assert any("_client" in where for where in landed), landed


class Interrupted(BaseException):
    pass


def _fail_as_the_connection_goes(path: str) -> None:
    """A transaction whose body fails (Interrupted) as its connection to
    the XenStore at ``path`` goes: its rollback fails too."""

    def start_then_hang_up(conn: socket.socket) -> None:
        op, rq_id, tx_id, size = struct.unpack("<4I", conn.recv(16, socket.MSG_WAITALL))
        conn.recv(size, socket.MSG_WAITALL)
        reply = b"1\0"  # the transaction's id
        conn.sendall(struct.pack("<4I", op, rq_id, tx_id, len(reply)) + reply)

    server = serve_one_client(path, start_then_hang_up)

    def body(c: pyxs.Client) -> None:
        server.join(TIMEOUT)
        assert eventually(lambda: not c.router.is_connected, TIMEOUT)
        raise Interrupted  # as a KeyboardInterrupt would, but pytest's own

    Toolstack(path).transaction(body)


def test_a_failing_transaction_on_a_lost_connection_says_why_it_failed(tmp_path) -> None:
    """The rollback's error replaced the body's (even a KeyboardInterrupt),
    although the connection's end drops the transaction anyway."""
    with pytest.raises(Interrupted):
        _fail_as_the_connection_goes(str(tmp_path / "xenstored"))


def test_a_failed_rollback_leaves_a_trace(tmp_path, caplog) -> None:
    """The body's error is the one raised, but the rollback's is not lost:
    a DEBUG record says why it failed."""
    caplog.set_level(logging.DEBUG, logger="xenback.sim._toolstack")
    with pytest.raises(Interrupted):
        _fail_as_the_connection_goes(str(tmp_path / "xenstored"))
    [record] = [r for r in caplog.records if "rollback" in r.getMessage()]
    assert (record.name, record.levelno) == ("xenback.sim._toolstack", logging.DEBUG)
    assert isinstance(record.args and record.args[0], pyxs.PyXSError), record.args
