"""pvcalls Backend: the xenbus handshake, teardown, construction arguments."""

from __future__ import annotations

import _thread
import collections
import errno
import functools
import itertools
import logging
import operator
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import CodeType, FrameType
from typing import Any

import pytest
from fdcensus import descriptors
from pvcalls_rawfront import TIMEOUT, Call, LogWatch, RawFrontend, bound_ports, wait_until
from pvcalls_rawfront import DataRing as RawDataRing
from pvcalls_rawfront import threads as rawfront_threads
from racewindow import PauseAt, stands_at
from stolensignal import interrupt, main_thread_in

import pvcalls
from pvcalls import _wire
from pvcalls._backend import _Frontend
from pvcalls._socket import ActiveSocket, PassiveSocket, Request
from workqueue import Topology
from xenback.xenbus import BackendDevice


def test_feature_nodes_then_initwait(make_frontend: Any, backend: pvcalls.Backend) -> None:
    fe = make_frontend("g", connect=False)
    fe.wait_backend_state(2)
    be = fe.be_path
    assert fe.xs.read(f"{be}/versions") == "1"
    assert fe.xs.read(f"{be}/max-page-order") == "4"
    assert fe.xs.read(f"{be}/function-calls") == "1"
    fe.connect()
    assert fe.backend_state() == 4
    assert backend.stats().frontends == 1
    fe.close()
    assert fe.backend_state() == 6
    assert backend.stats().frontends == 0


def test_max_page_order_is_configurable(make_frontend: Any, host: Any, topology: Topology) -> None:
    with pvcalls.Backend(host.dom0, max_page_order=_wire.MAX_PAGE_ORDER_LIMIT,
                         topology=topology):
        fe = make_frontend("g", connect=False)
        fe.wait_backend_state(2)
        assert fe.xs.read(f"{fe.be_path}/max-page-order") == str(_wire.MAX_PAGE_ORDER_LIMIT)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_page_order": 0}, ValueError),
        ({"max_page_order": _wire.MAX_PAGE_ORDER_LIMIT + 1}, ValueError),
        ({"max_page_order": "4"}, TypeError),
        ({"max_ioworkers": 0}, ValueError),
        ({"max_ioworkers": 2.5}, TypeError),
        ({"policy": "allow all"}, TypeError),
        ({"cpus": 2, "topology": Topology(2)}, TypeError),
        ({"max_ioworkers": 2, "topology": Topology(4)}, ValueError),
    ],
)
def test_bad_arguments_are_refused(host: Any, kwargs: dict[str, Any],
                                   error: type[Exception]) -> None:
    with pytest.raises(error):
        pvcalls.Backend(host.dom0, **kwargs)


@pytest.mark.parametrize(
    ("platform", "kwargs", "error", "message"),
    [
        (None, {}, TypeError, "^platform must be a xenback.platform.Platform, not NoneType$"),
        ("dom0", {}, TypeError, "^platform must be a xenback.platform.Platform, not str$"),
        ("host", {"cpus": "2"}, TypeError, "^cpus must be an int, not str$"),
        ("host", {"cpus": 2.0}, TypeError, "^cpus must be an int, not float$"),
        ("host", {"cpus": 0}, ValueError, "^cpus must be at least 1, got 0$"),
        ("host", {"max_ioworkers": 0}, ValueError, "^max_ioworkers must be at least 1, got 0$"),
        ("host", {"topology": "2 CPUs"}, TypeError,
         "^topology must be a workqueue.Topology, not str$"),
        # A file's name is the likeliest mistake: say what reads one.
        ("host", {"policy": "/etc/pvcalls.toml"}, TypeError,
         r"^policy must be a pvcalls.Policy, not str \(Policy.from_file\(\) reads a file\)$"),
        ("host", {"policy": __import__("pathlib").Path("p.toml")}, TypeError,
         r"^policy must be a pvcalls.Policy, not PosixPath \(Policy.from_file\(\) reads a file\)$"),
        ("host", {"policy": pvcalls.DomainPolicy()}, TypeError,
         r"^policy must be a pvcalls.Policy, not DomainPolicy \(Policy\(default=rules\) "
         r"applies it to every domain\)$"),
        ("host", {"policy": {"default": {}}}, TypeError,
         r"^policy must be a pvcalls.Policy, not dict \(Policy.from_dict\(\) reads parsed TOML\)$"),
    ],
)
def test_bad_arguments_say_which_and_start_nothing(
        host: Any, platform: Any, kwargs: dict[str, Any], error: type[Exception],
        message: str) -> None:
    # Checked before the first thread starts, and named as Backend's
    # arguments (not as Topology's, or as a missing attribute).
    before = set(threading.enumerate())
    with pytest.raises(error, match=message):
        pvcalls.Backend(host.dom0 if platform == "host" else platform, **kwargs)
    assert set(threading.enumerate()) - before == set()


def test_a_platform_is_checked_without_reading_its_properties(host: Any) -> None:
    # As xenback.platform.check_platform, which BackendDriver uses: read by
    # Python 3.11's isinstance(), a property's own bug (an AttributeError)
    # made the platform "not a Platform", hiding where it was.
    class Buggy:
        run_dir = host.dom0.run_dir
        xenstore, gnttab = host.dom0.xenstore, host.dom0.gnttab
        gntshr, evtchn = host.dom0.gntshr, host.dom0.evtchn

        @property
        def domid(self) -> int:
            return self._domid  # type: ignore[attr-defined, no-any-return]

    with pytest.raises(AttributeError, match="_domid"):
        pvcalls.Backend(Buggy())


def test_nr_ioworkers_is_capped(host: Any) -> None:
    with pvcalls.Backend(host.dom0, max_ioworkers=3, cpus=8) as b:
        assert b.nr_ioworkers == 3
        assert len(b.stats().cpus) == 3
    with pvcalls.Backend(host.dom0, max_ioworkers=64, cpus=5) as b:
        assert b.nr_ioworkers == 5
    # The host's own CPUs (this machine's, at least one) are capped too.
    with pvcalls.Backend(host.dom0, max_ioworkers=1) as b:
        assert b.nr_ioworkers == 1 and len(b.stats().cpus) == 1
    # A given topology may have as many CPUs as the cap, not one more.
    with pvcalls.Backend(host.dom0, max_ioworkers=2, topology=Topology(2)) as b:
        assert b.nr_ioworkers == 2


def test_nr_ioworkers_counts_the_cpus_online_as_the_backend_starts(host: Any) -> None:
    """A given topology's offline CPUs are in stats() (they may come up)
    but are no ioworkers of the start."""
    topology = Topology(4)
    topology.cpu_down(2)
    with pvcalls.Backend(host.dom0, topology=topology) as b:
        assert b.nr_ioworkers == 3
        assert [(c.cpu, c.online) for c in b.stats().cpus] == [
            (0, True), (1, True), (2, False), (3, True)]


def test_bad_version_is_fatal(dom0_xs: Any, make_frontend: Any, host: Any,
                              backend: pvcalls.Backend) -> None:
    fe = make_frontend("g", connect=False)
    fe.connect(version="2")
    fe.wait_backend_state(5)
    error = dom0_xs.read(f"/local/domain/0/error/backend/pvcalls/{fe.guest.domid}/0/error")
    assert error is not None and "version" in error
    assert backend.stats().frontends == 0
    fe.xs.close()


@pytest.mark.parametrize("key", ["ring-ref", "port"])
def test_ring_ref_or_port_beyond_32_bits_is_fatal(dom0_xs: Any, make_frontend: Any,
                                                  backend: pvcalls.Backend, key: str) -> None:
    """2**32 is refused as out of range when the node is read, before it
    reaches a grant mapping or an event channel binding."""
    fe = make_frontend("g", connect=False)
    fe.connect(**{key.replace("-", "_"): str(1 << 32)})
    fe.wait_backend_state(5)
    error = dom0_xs.read(f"/local/domain/0/error/backend/pvcalls/{fe.guest.domid}/0/error")
    assert error == (f"{errno.EINVAL} connecting: frontend node {fe.fe_path}/{key} is out of "
                     f"range: {1 << 32}"), error
    assert backend.stats().frontends == 0
    fe.xs.close()


@pytest.mark.parametrize(("ring_ref", "port"), [("12345", None), ("x", None), (None, "999"),
                                                (None, "-1")])
def test_garbage_ring_ref_or_port_is_fatal(make_frontend: Any, host: Any, backend: pvcalls.Backend,
                                           ring_ref: str | None, port: str | None) -> None:
    fe = make_frontend("g", connect=False)
    fe.connect(ring_ref=ring_ref, port=port)
    fe.wait_backend_state(5)
    assert backend.stats().frontends == 0
    # A ring mapped before its port could not be bound is unmapped again.
    assert not backend.gnttab._live
    # The backend still serves a well-behaved frontend.
    good = make_frontend("good")
    _, rsp = good.socket()
    assert rsp.ret == 0
    good.close()
    fe.xs.close()


@pytest.mark.parametrize("template", ["+{}", " {}", "{} ", "0_{}"])
@pytest.mark.parametrize("key", ["ring-ref", "port"])
def test_ring_ref_and_port_are_plain_decimal(make_frontend: Any, backend: pvcalls.Backend,
                                             key: str, template: str) -> None:
    """ring-ref and port are ASCII decimal digits, as every number this
    project reads: int() alone would take a sign, white space and
    underscores (and other scripts' digits), none of which a frontend
    writes.  Each template here reads as the real value to int()."""
    fe = make_frontend("g", connect=False)
    fe.connect(**{key.replace("-", "_"): template}, wait=False)
    fe.wait_backend_state(5)
    assert backend.stats().frontends == 0
    fe.xs.close()


@pytest.mark.parametrize("key", ["ring-ref", "port"])
def test_ring_ref_and_port_may_have_leading_zeros(make_frontend: Any, backend: pvcalls.Backend,
                                                  key: str) -> None:
    """As Linux's xenbus_scanf("%u") reads them."""
    fe = make_frontend("g", connect=False)
    fe.connect(**{key.replace("-", "_"): "00{}"}, wait=False)
    fe.wait_backend_state(4)
    _, rsp = fe.socket()
    assert rsp.ret == 0
    fe.close()


def _held(host: Any) -> tuple[int, int, frozenset[tuple[int, str]]]:
    """What a frontend's sockets hold that could leak: grant entries (one
    stays while mapped, even after its domain died), event channel ports,
    and this process's descriptors (host sockets, mapped pages' files),
    each with what it refers to.  Collected first: what earlier tests left
    to the garbage collector must not close its descriptors in the middle
    of the count."""
    fds = descriptors()  # collects first
    hv = host.hypervisor.stats()
    return hv["grants"], hv["ports"], fds


def _wait_released(host: Any, before: tuple[int, int, frozenset[tuple[int, str]]]) -> None:
    """Wait until everything held now was held at ``before``: the grant and
    port counts are back, and the descriptors opened since are closed.
    (Descriptors of earlier tests, closed since by their threads, do not
    count as a difference.)  On timeout, say what is still held."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        grants, ports, fds = _held(host)
        if (grants, ports) == before[:2] and fds <= before[2]:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"still held: grants {grants} (was {before[0]}), ports {ports} "
                        f"(was {before[1]}), new descriptors {sorted(fds - before[2])}")
        threading.Event().wait(0.01)


def _busy(fe: RawFrontend, address: tuple[str, int]) -> None:
    """Every kind of socket: connected with data in flight, new, listening
    with an ACCEPT (its id_new ring mapped) and one with a POLL in flight."""
    for _ in range(3):
        _, ring = fe.connect_socket(address)
        fe.send_all(ring, b"in flight")
    fe.socket()
    for accept in (True, False):
        listener, _ = fe.socket()
        assert fe.bind(listener, ("127.0.0.1", 0)).ret == 0
        assert fe.listen(listener).ret == 0
        if accept:
            fe.push_accept(listener, fe.new_id(), fe.new_ring())
        else:
            fe.push_poll(listener)


def _end_guest_side(fe: RawFrontend) -> None:
    """Close the guest's own handles, so that only the backend's are counted."""
    for ring in fe.rings:
        ring.close()
    assert fe.ring is not None
    fe.ring.release()
    fe.page.unshare()
    fe.gntshr.close()
    fe.evtchn.close()
    fe.xs.close()


@pytest.mark.parametrize("end", ["closing", "domain death"])
def test_teardown_leaves_nothing_behind(host: Any, backend: pvcalls.Backend,
                                        echo_server: Any, end: str) -> None:
    threads = []
    for round in range(3):
        before = _held(host)
        guest = host.create_domain(f"g{round}")
        fe = RawFrontend(host, guest)
        _busy(fe, echo_server.address)
        assert backend.stats().frontends == 1 and len(backend.stats().sockets) == 7
        assert sum(c.sockets for c in backend.stats().cpus) == 3
        if end == "closing":
            fe.close()
            assert backend.stats().frontends == 0
            assert bound_ports(backend) == []
            _end_guest_side(fe)
            host.destroy_domain(guest)
        else:
            _end_guest_side(fe)
            host.destroy_domain(guest)
            wait_until(lambda: backend.stats().frontends == 0)
        assert backend.stats().sockets == ()
        assert all(c.sockets == 0 for c in backend.stats().cpus)
        assert bound_ports(backend) == []
        _wait_released(host, before)
        threads.append(rawfront_threads())
    # No thread per frontend or socket: beyond the workqueues' worker pools
    # (which grow and shrink with the load), the threads are those of the
    # backend, the host and the test, whatever was served.
    assert threads[0] == threads[1] == threads[2]


def test_a_frontends_close_closes_its_host_sockets(raw: RawFrontend,
                                                  backend: pvcalls.Backend) -> None:
    """As the frontend closes, the host sockets of its connected and
    listening sockets are closed, not left to the garbage collector: the
    peer sees the end of the stream, and nothing listens on the port any
    more.  (The test holds the socket objects, as a reference cycle or a
    traceback could: the descriptor counts of the tests above cannot see
    a socket the collector closes for them.)"""
    fe = backend._frontends[(raw.guest.domid, 0)]
    with socket.create_server(("127.0.0.1", 0)) as server:
        connected, _ = raw.connect_socket(server.getsockname())
        peer, _ = server.accept()
    with peer:
        listener, address = raw.listening(backend)
        active, passive = fe._sockets[connected], fe._sockets[listener]
        assert isinstance(active, ActiveSocket) and isinstance(passive, PassiveSocket)
        raw.close()
        assert active.host is not None
        assert (active.host.fileno(), passive.host.fileno()) == (-1, -1)
        peer.settimeout(TIMEOUT)
        assert peer.recv(1) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=TIMEOUT).close()


def test_close_closes_every_frontend(make_frontend: Any, host: Any, topology: Topology,
                                     echo_server: Any) -> None:
    backend = pvcalls.Backend(host.dom0, topology=topology)
    fes = [make_frontend(f"g{i}") for i in range(3)]
    for fe in fes:
        fe.connect_socket(echo_server.address)
    backend.close()
    for fe in fes:
        assert fe.backend_state() == 6
        fe.xs.close()
    assert bound_ports(backend) == []
    backend.close()  # idempotent



def test_close_goes_closing_with_everything_released_then_closed(
        make_frontend: Any, host: Any, topology: Topology, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Backend.close() takes each device through Closing, once its sockets
    and ring are released, before the driver's stop writes Closed: as
    xenbus says a backend closes (a frontend may start its own close on
    Closing)."""
    backend = pvcalls.Backend(host.dom0, topology=topology)
    fe = make_frontend("g")
    fe.connect_socket(echo_server.address)
    driver = backend._driver
    real_drop = driver._drop
    dropping = threading.Event()
    go = threading.Event()
    seen: list[object] = []

    def drop(dev: Any) -> None:  # the step that writes Closed
        seen.append((fe.backend_state(), backend.stats().frontends, bound_ports(backend)))
        dropping.set()
        go.wait(TIMEOUT)
        real_drop(dev)

    monkeypatch.setattr(driver, "_drop", drop)
    closer = Call(backend.close)
    try:
        assert dropping.wait(TIMEOUT)
    finally:
        go.set()
    closer.join()
    assert closer.error is None
    assert seen == [(5, 0, [])]
    assert fe.backend_state() == 6


def test_a_closed_frontend_answers_nothing(raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """Once the frontend is closed, an answer that still comes (from a
    socket's Work finishing as the frontend goes) is dropped: its ring is
    released, its port unbound."""
    fe = backend._frontends[(raw.guest.domid, 0)]
    # A CONNECT left unanswered: a listener that never accepts, its queue full.
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    filler = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
    assert select.select([listener], [], [], TIMEOUT)[0]  # the filler is queued: full
    try:
        sock_id, rsp = raw.socket()
        assert rsp.ret == 0
        req_id = raw.push_connect(sock_id, listener.getsockname(), raw.new_ring())
        wait_until(lambda: [s.state for s in backend.stats().sockets] == ["connecting"])
        raw.close()
        fe.respond(Request(req_id, _wire.PVCALLS_CONNECT, sock_id), 0)  # as its Work would
        raw.poll_responses()
        assert raw.responses == {} and raw.unexpected == []
    finally:
        filler.close()
        listener.close()


def test_a_command_handled_as_the_frontend_closes_is_not_answered(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command the Work finishes after the frontend's close began (the
    close waits for it) gets no answer: its port is unbound by then, and
    the frontend, closing, reads no more responses.  (Answered, it is
    written into a ring the guest is giving up, and notified on a port
    that is gone.)"""
    real_socket = _Frontend._socket
    handling = PauseAt(real_socket, "with self._lock, self.backend.limit_lock:")

    def socket_(self: _Frontend, request: Any, req: Any) -> int | None:
        result: int | None = handling.run(lambda: real_socket(self, request, req))
        return result

    monkeypatch.setitem(pvcalls._backend._HANDLERS, _wire.PVCALLS_SOCKET, socket_)
    sock_id = RawFrontend.new_id()

    def fill(req: Any) -> None:
        req.u.socket.id = sock_id
        req.u.socket.domain = _wire.AF_INET
        req.u.socket.type = _wire.SOCK_STREAM

    raw.push(_wire.PVCALLS_SOCKET, fill)
    assert handling.reached.wait(TIMEOUT)
    try:
        raw.xs.write(f"{raw.fe_path}/state", "5")  # Closing
        # The close stands waiting for the Work: past its point of no answer.
        wait_until(lambda: any(stands_at(tid, _Frontend.close, "self._work.disable_sync()")
                               for tid in sys._current_frames()))
    finally:
        handling.resume()
    raw.wait_backend_state(5)
    raw.poll_responses()
    assert raw.arrived == [] and raw.unexpected == []
    assert bound_ports(backend) == [] and backend.stats().frontends == 0


def test_close_waits_for_the_command_being_handled(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A frontend closing while a CONNECT is being handled: the close waits
    for it, then releases the socket it made with the rest.  (Not waiting,
    the close would clear the sockets table first, and the CONNECT then
    map a ring and bind a port that nothing releases.)"""
    fe = backend._frontends[(raw.guest.domid, 0)]
    real_connect = _Frontend._connect
    handling = PauseAt(real_connect, "host, port = self._address(")

    handled = threading.Event()

    def connect(self: _Frontend, request: Any, req: Any) -> int | None:
        try:
            result: int | None = handling.run(lambda: real_connect(self, request, req))
        finally:
            handled.set()
        return result

    monkeypatch.setattr(_Frontend, "_connect", connect)
    monkeypatch.setitem(pvcalls._backend._HANDLERS, _wire.PVCALLS_CONNECT, connect)
    sock_id, _ = raw.socket()
    raw.push_connect(sock_id, echo_server.address, raw.new_ring())
    assert handling.reached.wait(TIMEOUT)
    try:
        raw.xs.write(f"{raw.fe_path}/state", "5")  # Closing

        def close_waits_or_is_done() -> bool:
            return raw.backend_state() == 5 or any(
                stands_at(tid, _Frontend.close, "self._work.disable_sync()")
                for tid in sys._current_frames())

        wait_until(close_waits_or_is_done)
    finally:
        handling.resume()
    assert handled.wait(TIMEOUT)
    raw.wait_backend_state(5)
    assert fe._closed and fe._sockets == {}
    assert bound_ports(backend) == [] and backend.stats().sockets == ()
    assert len(backend.gnttab._live) == 0


def test_a_bug_in_the_command_rings_work_fails_that_device_only(
        dom0_xs: Any, make_frontend: Any, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An exception escaping a frontend's command Work outside the
    handlers (a bug of ours as it takes a request off the ring): what it
    took cannot be answered any more, and the device fails as a connect
    that failed does: its sockets released, its ring unmapped and port
    unbound, the error node saying what failed, Closing; the traceback is
    logged once.  Another guest's frontend carries on.  (The exception
    used to reach only the workqueue's log, and the guest waited for its
    answers for ever.)"""
    caplog.set_level(logging.ERROR)
    bystander = make_frontend("bystander")
    by_id, by_ring = bystander.connect_socket(echo_server.address)
    held = (sorted(bound_ports(backend)), len(backend.gnttab._live))
    fe = make_frontend("g")
    fe.connect_socket(echo_server.address)
    front = backend._frontends[(fe.guest.domid, 0)]
    handle = _Frontend._handle

    def buggy(self: _Frontend, raw: bytes) -> None:
        if self is front:
            raise RuntimeError("a bug")
        handle(self, raw)

    monkeypatch.setattr(_Frontend, "_handle", buggy)
    fe.push(_wire.PVCALLS_SOCKET)
    fe.wait_backend_state(5)
    error = dom0_xs.read(f"/local/domain/0/error/backend/pvcalls/{fe.guest.domid}/0/error")
    assert error == "5 work _Frontend._process_commands: RuntimeError: a bug"
    assert backend.stats().frontends == 1
    assert (sorted(bound_ports(backend)), len(backend.gnttab._live)) == held
    front.dev.events.flush()  # fatal() logs its error line after writing Closing
    bugs = [r for r in caplog.records if not r.name.startswith("workqueue") and r.exc_info]
    assert len(bugs) == 1, [r.getMessage() for r in bugs]
    bystander.echo(by_ring, b"undisturbed")
    assert bystander.release(by_id).ret == 0
    fe.close()


def test_missing_ring_ref_is_fatal(dom0_xs: Any, make_frontend: Any,
                                   backend: pvcalls.Backend) -> None:
    fe = make_frontend("g", connect=False)
    fe.wait_backend_state(2)
    fe.xs.write(f"{fe.fe_path}/version", "1")
    fe.xs.write(f"{fe.fe_path}/port", str(fe.evtchn.bind_unbound_port(0)))
    fe.xs.write(f"{fe.fe_path}/state", "3")
    fe.wait_backend_state(5)
    error = dom0_xs.read(f"/local/domain/0/error/backend/pvcalls/{fe.guest.domid}/0/error")
    assert error == f"{errno.ENOENT} connecting: frontend node is missing: {fe.fe_path}/ring-ref"
    assert backend.stats().frontends == 0


def test_backend_closing_during_a_handshake(
        dom0_xs: Any, make_frontend: Any, host: Any, backend: pvcalls.Backend,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """close() while a frontend's connect is being set up: that frontend is
    not connected (the guest is told why) and keeps nothing mapped or bound.
    It is closed without the backend's _lock held, which is never held
    while a frontend is set up or torn down (stats() waits on it)."""
    inside, go_on = threading.Event(), threading.Event()
    domain_name = pvcalls._backend._domain_name
    frontend_close = _Frontend.close
    lock_held_at_close: list[bool] = []

    def close_noting_the_lock(fe: _Frontend) -> None:
        lock_held_at_close.append(fe.backend._lock.locked())
        frontend_close(fe)

    monkeypatch.setattr(_Frontend, "close", close_noting_the_lock)

    def name_when_told(dev: Any, policy: Any) -> str | None:
        inside.set()
        go_on.wait(10)
        return domain_name(dev, policy)

    monkeypatch.setattr(pvcalls._backend, "_domain_name", name_when_told)
    fe = make_frontend("g", connect=False)
    fe.wait_backend_state(2)
    before = _held(host)
    fe.connect(wait=False)
    assert inside.wait(10)
    closer = threading.Thread(target=backend.close)
    closer.start()
    wait_until(lambda: backend._closed)
    go_on.set()
    closer.join(10)
    assert not closer.is_alive()
    error = dom0_xs.read(f"/local/domain/0/error/backend/pvcalls/{fe.guest.domid}/0/error")
    assert error is not None and error.endswith(": backend is closing")
    assert lock_held_at_close == [False]
    assert fe.backend_state() == 6
    assert backend.stats().frontends == 0
    assert bound_ports(backend) == []
    # Nothing of the handshake is left mapped or bound once the guest let
    # go of its side.
    _end_guest_side(fe)
    wait_until(lambda: _held(host)[:2] == before[:2])


def test_an_event_as_soon_as_the_command_port_is_bound(
        make_frontend: Any, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The guest may notify its port the moment the backend has bound it,
    before the frontend's set-up is over: the command Work that event
    queues must not run on a half-built frontend (and raise), and the
    requests are served once the frontend is connected."""
    bind_interdomain = backend.dispatcher.bind_interdomain
    ran = []

    def bind_then_event(domid: int, remote_port: int, callback: Any) -> int:
        port = bind_interdomain(domid, remote_port, callback)
        fe = getattr(callback, "__self__", None)
        if isinstance(fe, _Frontend):
            callback(port)  # what the guest's notification does
            fe._work.flush()
            ran.append(fe)
        return port

    monkeypatch.setattr(backend.dispatcher, "bind_interdomain", bind_then_event)
    fe = make_frontend("eager")
    assert ran
    _, rsp = fe.socket()
    assert rsp.ret == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_request_notified_as_the_frontend_starts_is_answered(
        make_frontend: Any, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request the guest pushes and notifies while the frontend is being
    started, before it counts as started (its notification then queues
    nothing): it is answered all the same, by the command Work that
    start() queues after that.  Queued first, that Work could run and find
    the ring empty before the request came, and the request then waited
    for a notification the guest, past req_event, never sends."""
    pause = PauseAt.in_method(monkeypatch, _Frontend, "start", "self._started = True")
    notified = threading.Event()
    on_event = _Frontend._on_event

    def noting_on_event(self: _Frontend, *args: object) -> None:
        on_event(self, *args)
        notified.set()

    # Before the frontend is made: its port is bound to the method then.
    monkeypatch.setattr(_Frontend, "_on_event", noting_on_event)
    raw = make_frontend("g", connect=False)
    raw.connect(wait=False)
    assert pause.reached.wait(TIMEOUT)
    fe = backend._frontends[(raw.guest.domid, 0)]
    try:
        fe._work.flush(timeout=TIMEOUT)  # no run of the Work under way
        sock_id = raw.new_id()

        def fill(req: Any) -> None:
            req.u.socket.id = sock_id
            req.u.socket.domain = _wire.AF_INET
            req.u.socket.type = _wire.SOCK_STREAM

        notified.clear()
        req_id = raw.push(_wire.PVCALLS_SOCKET, fill)
        assert notified.wait(TIMEOUT)  # the notification met a frontend not yet started
    finally:
        pause.resume()
    assert raw.response(req_id).ret == 0


def test_a_frontend_s_set_up_interrupted_as_any_of_its_calls_returns_holds_nothing(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """A Ctrl-C landing as any call made by _Frontend.__init__ returns (a
    device's connect): what the set-up made so far goes back, the command
    ring's mapping and its event channel port, before the interrupt goes
    on.  Each was recorded by the assignment of what its call returned
    (the port's record, for the except clause, only after that): one
    landing as map_grant_refs or bind_interdomain returned lost it, held
    for the life of the backend by a frontend that nobody had."""
    from stolensignal import interrupted_as_call_returns

    dev = backend._frontends[(raw.guest.domid, 0)].dev
    ports, mapped = sorted(backend.dispatcher.ports), len(backend.gnttab._live)
    landed = 0
    for n in itertools.count():
        ring = raw.new_ring(order=0)  # a page and an unbound port of the guest's
        made: list[_Frontend] = []
        interrupted = interrupted_as_call_returns(
            _Frontend.__init__.__code__, n,
            lambda ring=ring, made=made: made.append(
                _Frontend(backend, dev, ring.ref, ring.port)))
        if not interrupted:
            made[0].close()
        assert sorted(backend.dispatcher.ports) == ports, f"interrupted as call {n} returned"
        assert len(backend.gnttab._live) == mapped, f"interrupted as call {n} returned"
        ring.close()
        if not interrupted:
            break
        landed += 1
    assert landed >= 5  # every call of the set-up, the mapping and the binding among them


def test_a_frontend_s_set_up_failing_raises_its_own_error_whatever_the_undo_meets(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The command port cannot be bound, and the undo's unmapping of the
    command ring fails too: the set-up raises the bind's error, the one
    that says what went wrong, and the unmapping's is logged.  (Raised,
    the unmapping's replaced it, and a Ctrl-C that cut the set-up short
    likewise.)"""
    from xenback.platform import EventChannelError, GrantError

    dev = backend._frontends[(raw.guest.domid, 0)].dev
    ring = raw.new_ring(order=0)
    map_grant_refs = backend.gnttab.map_grant_refs
    mappings: list[Any] = []

    def mapped_unmap_refused(*args: Any, **kwargs: Any) -> Any:
        mapping = map_grant_refs(*args, **kwargs)
        mappings.append(mapping)
        unmap = mapping.unmap

        def refused() -> None:
            mapping.unmap = unmap  # once: the test gives it back below
            raise GrantError(errno.ENOMEM, "unmap refused")

        mapping.unmap = refused
        return mapping

    def bind_refused(*args: Any) -> int:
        raise EventChannelError(errno.ENOSPC, "no port to spare")

    monkeypatch.setattr(backend.gnttab, "map_grant_refs", mapped_unmap_refused)
    monkeypatch.setattr(backend.dispatcher, "bind_interdomain", bind_refused)
    with caplog.at_level(logging.ERROR, logger="pvcalls"), \
            pytest.raises(EventChannelError, match="no port to spare"):
        _Frontend(backend, dev, ring.ref, ring.port)
    assert "unmapping the command ring failed" in caplog.text
    assert len(mappings) == 1
    mappings[0].unmap()
    ring.close()


def _a_device_disconnected(
        raw: RawFrontend, backend: pvcalls.Backend) -> tuple[Any, Callable[[int], None]]:
    """The guest's device, disconnected, and a check that the backend then
    holds no more than it did at that point: no frontend for the device,
    no other port bound, no other page mapped; its failures name call n,
    the one the Ctrl-C landed as."""
    key = (raw.guest.domid, 0)
    dev = backend._frontends[key].dev
    backend._disconnect(dev)
    ports, mapped = sorted(backend.dispatcher.ports), len(backend.gnttab._live)

    def holds_no_more(n: int) -> None:
        where = f"interrupted as call {n} returned"
        assert key not in backend._frontends, where
        assert sorted(backend.dispatcher.ports) == ports, where
        assert len(backend.gnttab._live) == mapped, where

    return dev, holds_no_more


def test_a_device_s_connect_interrupted_as_any_of_its_calls_returns_holds_nothing_once_disconnected(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """A Ctrl-C landing as any call made by Backend._connect returns (a
    device's connect, on its queue): what is left of the frontend it made
    goes with the device's disconnect, its command ring's mapping and its
    port.  Recorded only by the assignment of what _Frontend() returned,
    and in the device's driver_data only at the end, a frontend that the
    interrupt kept from there was closed by nobody (or by the backend's
    close alone, if it was among its frontends by then)."""
    from stolensignal import interrupted_as_call_returns

    dev, holds_no_more = _a_device_disconnected(raw, backend)
    landed = 0
    for n in itertools.count():
        interrupted = interrupted_as_call_returns(
            pvcalls.Backend._connect.__code__, n, lambda: backend._connect(dev))
        backend._disconnect(dev)  # what the device's disconnect does
        holds_no_more(n)
        if not interrupted:
            break
        landed += 1
    assert landed >= 5  # the reads, the frontend's making and its start among them


def test_a_device_s_connect_interrupted_anywhere_in_our_code_holds_nothing_once_disconnected(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """A Ctrl-C landing at any place of a device's connect in pvcalls'
    code, inside the calls Backend._connect makes too (the frontend's
    set-up, the policy's lookup, its start() before or after it marks
    the frontend started): the device is not switched to Connected (the
    driver raised), and its next disconnect (the frontend closing, or
    connecting again, or the backend's close) gives back what the
    frontend held.  A frontend whose start() was cut short is in
    driver_data and among the backend's, where that disconnect finds it."""
    from stolensignal import interrupted_at

    dev, holds_no_more = _a_device_disconnected(raw, backend)
    landed: list[str] = []
    for n in itertools.count():
        where = interrupted_at(n, os.path.dirname(pvcalls.__file__),
                               lambda: backend._connect(dev))
        backend._disconnect(dev)  # what the device's disconnect does
        holds_no_more(n)
        assert dev.driver_data is None, where
        if not where:
            break
        landed.append(where)
    assert any("_Frontend.start" in where for where in landed), landed


def test_a_frontend_whose_start_fails_fails_its_device_and_holds_nothing(
        dom0_xs: Any, make_frontend: Any, host: Any, backend: pvcalls.Backend,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The frontend's start() raising (the command workqueue refusing its
    Work, say) as a device connects: the device fails as a connect that
    failed does (error node, Closing, never Connected), and the frontend
    made for it is let go of at once, its command ring unmapped and its
    port unbound."""
    def refused(self: _Frontend) -> None:
        raise RuntimeError("workqueue 'pvcalls_cmd' is destroyed")

    monkeypatch.setattr(_Frontend, "start", refused)
    fe = make_frontend("g", connect=False)
    fe.wait_backend_state(2)
    fe.connect(wait=False)
    fe.wait_backend_state(5)
    error = dom0_xs.read(f"/local/domain/0/error/backend/pvcalls/{fe.guest.domid}/0/error")
    assert error is not None and error.endswith("workqueue 'pvcalls_cmd' is destroyed")
    assert backend.stats().frontends == 0
    assert bound_ports(backend) == []
    assert len(backend.gnttab._live) == 0


def test_a_device_s_disconnect_cut_short_in_its_frontend_s_close_is_finished_by_its_next_connect(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """A Ctrl-C landing as any call made by the frontend's close() returns
    (a device's disconnect), the device then connected again and
    disconnected: the frontend the first close() left is finished, its
    command ring's mapping and its port given back.  Let go of by
    driver_data before its close(), it was found by no later disconnect
    or connect, and the new frontend took its place among the backend's:
    held for the life of the backend."""
    from stolensignal import interrupted_as_call_returns

    dev, holds_no_more = _a_device_disconnected(raw, backend)
    landed = 0
    for n in itertools.count():
        backend._connect(dev)
        interrupted = interrupted_as_call_returns(
            _Frontend.close.__code__, n, lambda: backend._disconnect(dev))
        backend._connect(dev)  # the device connected again
        backend._disconnect(dev)
        holds_no_more(n)
        if not interrupted:
            break
        landed += 1
    assert landed >= 3  # the unbinding, the wait for the Work, the unmapping among them


def test_a_device_s_connect_cut_short_then_its_frontend_s_close_too_holds_nothing_once_disconnected(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing as any call made by Backend._connect returns, and
    a second one as the close() of the frontend it made starts (in the
    except clause that gives it back): the device's disconnect still
    finds that frontend and gives back what it holds.  Closed from a
    local record alone, a frontend whose close() was cut short was in no
    place that a disconnect looks (and one among the backend's was
    replaced there by the device's next connect)."""
    from stolensignal import Interrupted, interrupted_as_call_returns

    dev, holds_no_more = _a_device_disconnected(raw, backend)
    close = _Frontend.close
    landed = 0
    for n in itertools.count():
        cut: list[_Frontend] = []

        def close_cut_once(fe: _Frontend, cut: list[_Frontend] = cut) -> None:
            # The only close() in the connect: the device had no frontend.
            if not cut:
                cut.append(fe)
                raise Interrupted
            return close(fe)

        monkeypatch.setattr(_Frontend, "close", close_cut_once)
        interrupted = interrupted_as_call_returns(
            pvcalls.Backend._connect.__code__, n, lambda: backend._connect(dev))
        monkeypatch.setattr(_Frontend, "close", close)
        backend._disconnect(dev)  # what the device's disconnect does
        holds_no_more(n)
        if not interrupted:
            break
        landed += 1 if cut else 0
    assert landed >= 2  # as the frontend was made, and as it was counted


def test_requests_before_the_connect_is_over_count_against_the_limit(
        make_frontend: Any, host: Any, topology: Topology,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests a guest pushes and notifies while its frontend is still being
    connected are served once it is, within the domain's socket limit: a
    frontend not yet among the backend's has sockets no limit check counts."""
    policy = pvcalls.Policy.from_toml("[default]\nmax_sockets = 1\n")
    constructed, go_on = threading.Event(), threading.Event()
    made: list[_Frontend] = []
    init = _Frontend.__init__

    def init_then_wait(self: _Frontend, *args: Any) -> None:
        init(self, *args)  # its port is bound: the guest may notify
        made.append(self)
        constructed.set()
        go_on.wait(TIMEOUT)

    monkeypatch.setattr(_Frontend, "__init__", init_then_wait)
    with pvcalls.Backend(host.dom0, policy=policy, topology=topology):
        fe = make_frontend("early", connect=False)
        fe.connect(wait=False)
        try:
            assert constructed.wait(TIMEOUT)
            first, second = fe.new_id(), fe.new_id()
            pushed = []
            for sock_id in (first, second):
                def fill(req: Any, sock_id: int = sock_id) -> None:
                    req.u.socket.id = sock_id
                    req.u.socket.domain = _wire.AF_INET
                    req.u.socket.type = _wire.SOCK_STREAM

                pushed.append(fe.push(_wire.PVCALLS_SOCKET, fill))
            made[0]._on_event()  # what the notifications do
            made[0]._work.flush()
        finally:
            go_on.set()
        fe.wait_backend_state(4)
        assert [fe.response(req_id).ret for req_id in pushed] == [0, -24]  # EMFILE
        fe.xs.write(f"{fe.fe_path}/state", "4")
        fe.close()


def test_connection_lost_when_the_host_goes(make_frontend: Any, host: Any,
                                           topology: Topology, echo_server: Any) -> None:
    backend = pvcalls.Backend(host.dom0, topology=topology)
    try:
        fe = make_frontend("g")
        fe.connect_socket(echo_server.address)
        assert not backend.connection_lost.is_set()
        host.close()
        assert backend.connection_lost.wait(10)
    finally:
        backend.close()  # all that is left, and it returns
    assert backend.stats().frontends == 0


def test_connection_lost_can_be_asked_after_close(host: Any, topology: Topology) -> None:
    """It used to raise "_PvcallsDriver is not started" once the backend
    was closed: the driver's XenStore connection it came from was gone."""
    backend = pvcalls.Backend(host.dom0, topology=topology)
    lost = backend.connection_lost
    backend.close()
    assert backend.connection_lost is lost
    assert not lost.is_set()  # we closed it: the host did not go


def hold_close_at_device(b: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch
                         ) -> tuple[threading.Event, threading.Event]:
    """Make ``b``'s close() stop at its first device: the first event is set
    once it is there, and it goes on once the second is set."""
    closing, release = threading.Event(), threading.Event()
    close_device = b._close_device

    def slow_close_device(dev: Any) -> None:
        closing.set()
        assert release.wait(TIMEOUT)
        close_device(dev)

    monkeypatch.setattr(b, "_close_device", slow_close_device)
    return closing, release


def test_a_close_interrupted_in_its_wait_can_be_finished_by_another(
        make_frontend: Any, host: Any, topology: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while close() waits for a device to close: nothing shared may
    be released under the device's callback still running, and a later
    close() must finish the job instead of returning at once."""
    b = pvcalls.Backend(host.dom0, topology=topology)
    fe = make_frontend("g")
    assert fe.backend_state() == 4
    closing, release = hold_close_at_device(b, monkeypatch)

    def main_waits() -> bool:
        return closing.is_set() and main_thread_in("sleep_on")

    try:
        interrupt(main_waits, b.close)
        assert not b.dispatcher._closed  # still in use by the device's callback
    finally:
        release.set()
    b.close()
    assert b._driver._xs is None and b.dispatcher._closed
    assert fe.backend_state() == 6


def test_a_close_interrupted_while_it_releases_can_be_finished_by_another(
        make_frontend: Any, host: Any, topology: Topology) -> None:
    """Ctrl-C while close() destroys the command workqueue (an item of it
    still runs): a later close() must release what is left (the ioworker
    workqueue) instead of returning at once."""
    from workqueue import Work

    b = pvcalls.Backend(host.dom0, topology=topology)
    release = threading.Event()
    running = threading.Event()

    def stuck(work: Any) -> None:
        running.set()
        assert release.wait(TIMEOUT)

    b.cmd_wq.queue_work(Work(stuck))
    assert running.wait(TIMEOUT)

    def main_waits() -> bool:
        return b._driver._xs is None and main_thread_in("sleep_on")

    try:
        interrupt(main_waits, b.close)
    finally:
        release.set()
    b.close()
    assert b.cmd_wq._destroyed.is_set() and b.io_wq._destroyed.is_set()
    assert not b._pollers


@pytest.mark.timeout(600)
def test_a_close_interrupted_anywhere_closes_every_frontend_when_called_again(
        host: Any, topology: Topology, echo_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing as any call made by close()'s own frames returns,
    then close() again: every frontend is closed, its ring, port and
    sockets released.  The frontends close() closes itself are those
    its devices' disconnect left (here, all of them); it took them all
    off its list before closing the first, so a Ctrl-C in the middle
    lost the rest, open for the life of the process.  And one as its
    first ``with self._lock`` ended left the backend counted as closed
    but not as unfinished: every later close() returned at once.  Nor
    may one in a frontend's own close() lose what that one still held:
    its second close() returned at once, its host sockets left open."""
    from stolensignal import interrupted_as_call_returns

    landed: dict[str, int] = {}
    for code in (pvcalls.Backend._close.__code__, pvcalls.Backend._close_frontends.__code__,
                 _Frontend.close.__code__):
        for n in itertools.count():
            where = f"call {n} returning in {code.co_name}"
            before = _held(host)
            b = pvcalls.Backend(host.dom0, topology=topology)
            fes = []
            for name in ("first", "second"):
                fe = RawFrontend(host, host.create_domain(name))
                fe.connect_socket(echo_server.address)
                fe.socket()
                fe.listening(b)
                fes.append(fe)
            assert b.stats().frontends == 2 and len(b.stats().sockets) == 6
            monkeypatch.setattr(b, "_disconnect", lambda dev: None)
            interrupted = interrupted_as_call_returns(code, n, b.close)
            b.close()
            assert b.stats().frontends == 0, where
            for fe in fes:
                _end_guest_side(fe)
                host.destroy_domain(fe.guest)
            try:
                _wait_released(host, before)
            except pytest.fail.Exception as exc:
                raise AssertionError(f"interrupted at {where}: {exc}") from None
            if not interrupted:
                break
            landed[code.co_name] = n + 1
    assert min(landed.get(name, 0) for name in ("_close", "_close_frontends", "close")) >= 5, \
        landed


def _stuck_connection(fe: RawFrontend, b: pvcalls.Backend,
                      peer: socket.socket) -> tuple[socket.socket, RawDataRing]:
    """A connected socket whose peer reads nothing, its out ring full: at
    teardown the rest goes to the lingerer.  The peer's end, and the ring."""
    sock_id, ring = fe.connect_socket(peer.getsockname())
    conn, _ = peer.accept()
    sock = b._frontends[(fe.guest.domid, 0)]._sockets[sock_id]
    assert isinstance(sock, ActiveSocket) and sock.host is not None
    # Small buffers: stuck after a few KiB, not after what autotuning allows.
    sock.host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    block = bytes(1 << 18)  # more than a ring: filled at once

    def stuck() -> bool:
        ring.write(block)
        return not ring.out_ring.writable() and sock._out_armed

    fe.wait(stuck)
    return conn, ring


def _on_stack(codes: frozenset[CodeType]) -> Callable[[], bool]:
    """Whether a frame of one of ``codes`` is on the caller's stack."""
    def on_stack() -> bool:
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            if frame.f_code in codes:
                return True
            frame = frame.f_back
        return False
    return on_stack


# Some 180 Backend() lives for pvcalls' places, 45 for xenback's: about 50
# s and 20 s on an idle machine, past the suite's 120 s on a loaded one.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("package", ["pvcalls", "xenback"])
def test_a_close_interrupted_in_any_frame_releases_everything_when_called_again(
        host: Any, monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """A Ctrl-C landing anywhere in what close() runs of pvcalls' code (a
    socket's teardown and its steps, the rings', the lingerer's, the
    pollers'), or of xenback's event dispatcher as it unbinds a port,
    stops watching a descriptor or closes, then close() again: every
    grant, port, descriptor and host socket is released.  A step that
    recorded a resource as gone before it was (a listening socket torn
    down before its host socket was closed, say) left the retry nothing
    to do, and the resource held for the life of the process.  Also in
    the simulated host's handles, which run in the backend's process (an
    event channel unbind cut short lost the port's pipe); not in a
    request's round trip to the host's service, which stands for the
    ioctl: no signal cuts one in half."""
    import importlib

    from stolensignal import interrupted_at

    from xenback.events import EventDispatcher

    within = os.path.dirname(importlib.import_module(package).__file__ or "")
    besides = os.path.join(within, "sim", "_proto.py") if package == "xenback" else ""
    unless: Callable[[], bool] = lambda: False  # noqa: E731
    if package == "xenback":
        releasing = _on_stack(frozenset(f.__code__ for f in (
            EventDispatcher.unbind, EventDispatcher.remove_fd, EventDispatcher.close)))
        unless = lambda: not releasing()  # noqa: E731
    landed: list[str] = []
    for n in itertools.count():
        before = _held(host)
        # One CPU: one poller, whose close() is swept as well as four.
        b = pvcalls.Backend(host.dom0, topology=Topology(1))
        peer = socket.create_server(("127.0.0.1", 0))
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        fe = RawFrontend(host, host.create_domain("g"))
        conn, _ = _stuck_connection(fe, b, peer)
        fe.socket()
        listener, _ = fe.listening(b)
        fe.push_accept(listener, fe.new_id(), fe.new_ring())
        # The ACCEPT's socket is in the table once its ring is mapped.
        wait_until(lambda b=b: len(b.stats().sockets) == 4)
        # Held here, so that no garbage collection closes what close() left.
        hosts = [sock.host for sock in b._frontends[(fe.guest.domid, 0)]._sockets.values()
                 if isinstance(sock, ActiveSocket | PassiveSocket) and sock.host is not None]
        assert len(hosts) == 2
        monkeypatch.setattr(b, "_disconnect", lambda dev: None)
        where = interrupted_at(n, within, b.close, unless, besides=besides)
        try:
            b.close()
            assert b.stats().frontends == 0
            assert len(b.lingerer) == 0
            assert [sock.fileno() for sock in hosts] == [-1, -1]
            conn.close()
            peer.close()
            _end_guest_side(fe)
            host.destroy_domain(fe.guest)
            _wait_released(host, before)
        except (AssertionError, pytest.fail.Exception) as exc:
            raise AssertionError(f"interrupted {where or 'nowhere'}: {exc}") from None
        if not where:
            break
        landed.append(where)
    assert len(landed) > (100 if package == "pvcalls" else 5), landed


def test_a_close_from_another_thread_returns_once_everything_is_released(
        make_frontend: Any, host: Any, topology: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    """A close() while another thread's close() is under way used to return
    at once, frontends still connected: its caller could not rely on
    "closed" meaning released (as Executor.shutdown()'s can)."""
    from racewindow import stands_at

    b = pvcalls.Backend(host.dom0, topology=topology)
    fe = make_frontend("g")
    assert fe.backend_state() == 4
    closing, release = hold_close_at_device(b, monkeypatch)
    first = Call(b.close)
    try:
        assert closing.wait(TIMEOUT)
        second = Call(lambda: (b.stats().frontends, b.dispatcher._closed))
        second.join()
        assert second.result == (1, False)  # the first close() is held up
        second = Call(lambda: (b.close(), b.stats().frontends, b.dispatcher._closed))
        wait_until(lambda: not second.alive()
                   or stands_at(second.ident, pvcalls.Backend.close, "_close_lock"))
    finally:
        release.set()
    first.join()
    assert second.join().error is None
    assert second.result == (None, 0, True)
    assert fe.backend_state() == 6


def test_a_second_backend_for_one_domain_is_refused(make_frontend: Any, host: Any,
                                                    backend: pvcalls.Backend) -> None:
    """Two drivers watching one backend directory would both handshake with
    each frontend, and the guest would be served by whichever won (and by a
    policy it cannot know): the second is refused, as Linux refuses a
    driver registered twice, and starts nothing."""
    from xenback.sim import attach

    before = set(threading.enumerate())
    for platform in (host.dom0, attach(host.run_dir, 0)):  # equal: one domain
        with pytest.raises(RuntimeError, match=r"^domain 0 .* served by <pvcalls.Backend dom0"):
            pvcalls.Backend(platform)
    # The first backend's workers come and go; a second one would have
    # started its event threads before any handshake.
    started = set(threading.enumerate()) - before
    assert [t.name for t in started if not t.name.startswith("kworker/")] == []
    fe = make_frontend("g")  # the first still serves, alone
    assert fe.backend_state() == 4
    assert backend.stats().frontends == 1


def test_a_closed_backend_lets_the_next_one_serve(make_frontend: Any, host: Any) -> None:
    pvcalls.Backend(host.dom0, cpus=1).close()
    with pytest.raises(ValueError):  # a failed start holds nothing either
        pvcalls.Backend(host.dom0, max_page_order=0)
    with pvcalls.Backend(host.dom0, cpus=1) as backend:
        assert make_frontend("g").backend_state() == 4
        assert backend.stats().frontends == 1
    # A driver domain is another domain: its backend is no second one.
    with pvcalls.Backend(host.dom0, cpus=1), \
            pvcalls.Backend(host.create_domain("driver"), cpus=1):
        pass


@pytest.mark.parametrize("name", ["platform", "topology", "nr_ioworkers", "max_page_order",
                                  "policy"])
def test_the_documented_read_only_attributes_are(backend: pvcalls.Backend, name: str) -> None:
    """Assigning ``policy`` used to take, and apply to the frontends
    connecting later only (each takes its rules as it connects), while
    those connected went on under the old rules: a policy reload that
    silently half happened.  The others would only make the backend
    describe itself wrongly (``max-page-order`` is offered at probe)."""
    value = getattr(backend, name)
    with pytest.raises(AttributeError):
        setattr(backend, name, value)
    assert getattr(backend, name) is value


# A sweep of a few hundred Backend() lives: some 35 s for xenback's places
# on an idle machine, past the suite's 120 s on a loaded one.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("package", ["pvcalls", "xenback", "workqueue"])
def test_a_backend_interrupted_anywhere_in_its_making_leaves_nothing(
        host: Any, package: str) -> None:
    """A Ctrl-C landing as any call of Backend() returns, in pvcalls' code
    or in what it calls of xenback's and workqueue's: the constructor
    raises having released all it made, or returns a Backend that serves
    and closes.  As ``self.x = Make()``, a Ctrl-C as Make() returned lost
    what it made: a workqueue with its rescuer, a LoadIndex registered
    with the topology for good, a grant handle's or a poller's
    descriptors, a started driver (its threads, the domain's lock)."""
    import importlib

    from stolensignal import interrupted_at

    from workqueue._loadindex import _HotplugNotifier
    from xenback.hostlock import HostLock

    def indexes(topology: Topology) -> list[object]:
        return [n for n in topology._notifiers if isinstance(n, _HotplugNotifier)]

    within = os.path.dirname(importlib.import_module(package).__file__ or "")
    landed: list[str] = []
    n = 0
    while True:
        topology = Topology(2)
        before_threads = {t.ident for t in threading.enumerate()}
        before = _held(host)
        made: list[pvcalls.Backend] = []
        # This lambda is no place of the package's: a Ctrl-C lands in
        # Backend() or not at all.
        where = interrupted_at(n, within, lambda made=made, topology=topology: made.append(
            pvcalls.Backend(host.dom0, topology=topology)))
        try:
            if where:
                assert made == []
            else:
                (backend,) = made
                with backend:
                    guest = host.create_domain("g")
                    fe = RawFrontend(host, guest)
                    assert fe.backend_state() == 4
                _end_guest_side(fe)  # what it holds is not the backend's
                host.destroy_domain(guest)
            assert indexes(topology) == []
            def new_threads(before_threads: set[int | None] = before_threads) -> list[str]:
                return [t.name for t in threading.enumerate() if t.ident not in before_threads
                        and not t.name.startswith(("kworker/", "wq-"))]
            try:
                wait_until(lambda: not new_threads())
            except TimeoutError:
                raise AssertionError(f"threads left: {new_threads()}") from None
            _wait_released(host, before)
            HostLock.for_domain(host.dom0, "xenback-pvcalls").close()
            pvcalls.Backend(host.dom0, cpus=1).close()  # the domain is nobody's
        except (AssertionError, RuntimeError, TimeoutError, pytest.fail.Exception) as exc:
            raise AssertionError(f"interrupted {where}: {exc!r}") from exc
        if not where:
            break
        landed.append(where)
        n += 1
    assert len(landed) > 10, landed


def test_a_backend_whose_undo_is_interrupted_undoes_the_rest(
        host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Backend() failed, and a second Ctrl-C cuts one step of its undo
    short (here, closing the last poller made): the steps after it are
    done all the same, as the ExitStack's callbacks were, and the domain
    is claimed no longer, or every later Backend would be refused."""
    from pvcalls import _backend, _poller
    from workqueue._loadindex import _HotplugNotifier

    def no_driver(*_args: Any) -> None:
        raise RuntimeError("no driver")

    real_close = _poller.CpuPoller.close
    cut: list[object] = []

    def close_cut_once(self: Any) -> None:
        if not cut:
            cut.append(self)
            real_close(self)
            raise KeyboardInterrupt
        real_close(self)

    topology = Topology(2)
    before = _held(host)
    monkeypatch.setattr(_backend, "_PvcallsDriver", no_driver)
    monkeypatch.setattr(_poller.CpuPoller, "close", close_cut_once)
    with pytest.raises(KeyboardInterrupt):
        pvcalls.Backend(host.dom0, topology=topology)
    assert len(cut) == 1
    _wait_released(host, before)  # the other poller's descriptors, the handles'
    assert not [n for n in topology._notifiers if isinstance(n, _HotplugNotifier)]
    monkeypatch.undo()
    pvcalls.Backend(host.dom0, cpus=1).close()  # the domain is nobody's


def _cut_once(real: Any) -> tuple[Any, list[object]]:
    """``real`` standing in for a method that a Ctrl-C cuts short once,
    as it returns (the first call does its work, then raises), and the
    list of the objects it was cut short on."""
    cut: list[object] = []

    def cut_once(self: Any, *args: Any) -> Any:
        result = real(self, *args)
        if not cut:
            cut.append(self)
            raise KeyboardInterrupt
        return result

    return cut_once, cut


@pytest.mark.parametrize("second", ["as close() starts", "in the driver's stop",
                                    "in a poller's close"])
def test_a_backend_whose_close_after_a_failed_start_is_interrupted_closes_all_the_same(
        host: Any, monkeypatch: pytest.MonkeyPatch, second: str) -> None:
    """A Ctrl-C landed as the driver started (or as its start returned),
    and a second one, as the user loses patience, cut the close() that
    undoes the backend short: the rest of it was never done (close() left
    it to a later close(), but nobody holds a Backend() that raised), and
    the domain stayed claimed, refusing every later Backend."""
    from pvcalls import _backend, _poller
    from workqueue._loadindex import _HotplugNotifier
    from xenback import xenbus
    from xenback.hostlock import HostLock

    real_start = _backend._PvcallsDriver.start
    cut_devices, cut = _cut_once(_backend._PvcallsDriver.devices)

    def started_then_ctrl_c(self: Any) -> None:
        if second != "in a poller's close":  # started: stop() has all to undo
            real_start(self)
        if second == "as close() starts":  # the first thing close() asks
            monkeypatch.setattr(_backend._PvcallsDriver, "devices", cut_devices)
        raise KeyboardInterrupt

    if second == "in a poller's close":
        cut_close, cut = _cut_once(_poller.CpuPoller.close)
        monkeypatch.setattr(_poller.CpuPoller, "close", cut_close)
    elif second == "in the driver's stop":
        cut_close, cut = _cut_once(lambda _self: None)  # before it stops anything
        real_stop = xenbus.BackendDriver._stop

        def stop_cut_at_its_start(self: Any, **kwargs: Any) -> None:
            cut_close(self)
            real_stop(self, **kwargs)

        monkeypatch.setattr(xenbus.BackendDriver, "_stop", stop_cut_at_its_start)
    topology = Topology(2)
    threads = {t.ident for t in threading.enumerate()}
    before = _held(host)
    monkeypatch.setattr(_backend._PvcallsDriver, "start", started_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        pvcalls.Backend(host.dom0, topology=topology)
    assert len(cut) == 1, "no second Ctrl-C: the test no longer tests anything"
    monkeypatch.undo()
    _wait_released(host, before)  # the pollers', the handles', the connection's
    assert not [n for n in topology._notifiers if isinstance(n, _HotplugNotifier)]
    wait_until(lambda: not [t for t in threading.enumerate() if t.ident not in threads
                            and not t.name.startswith(("kworker/", "wq-"))])
    HostLock.for_domain(host.dom0, "xenback-pvcalls").close()  # the domain's lock
    pvcalls.Backend(host.dom0, cpus=1).close()  # the domain is nobody's


def test_a_ctrl_c_as_the_undo_goes_round_again_lets_go_of_the_domain(
        host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Backend() failed, a second Ctrl-C cut its undo's close() short
    before it let go of the domain, and a third one's handler ran as the
    undo's loop went round to close() again.  CPython 3.11 looks up the
    handler of an exception raised there at the code unit before the
    loop's top: the try's own NOP, which its exception table leaves out,
    when the loop was the first thing in the try.  The finally was
    skipped, and the domain stayed claimed, refusing every later Backend.
    (No tracer lands there as a signal does: the signal is made pending by
    the call that cuts close() short, which raises from C, where no
    handler runs, so that the loop's jump back is the first place that
    runs it.)"""
    from pvcalls import _backend

    class Interrupted(BaseException):
        pass

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted

    real_start = _backend._PvcallsDriver.start
    real_close = _backend.Backend.close
    cut: list[Any] = []

    def started_then_ctrl_c(self: Any) -> None:
        real_start(self)
        raise KeyboardInterrupt

    def cut_short_then_ctrl_c(self: Any) -> None:
        cut.append(self)
        # One C call: the signal made pending (interrupt_main() runs no
        # handler, as os.kill() does), then SystemExit (a BaseException, as
        # a Ctrl-C is) raised, with no handler run in between.
        collections.deque(map(operator.call, (
            functools.partial(_thread.interrupt_main, signal.SIGUSR1),
            functools.partial(sys.exit, "cut short"))), 0)

    before = _held(host)
    monkeypatch.setattr(_backend._PvcallsDriver, "start", started_then_ctrl_c)
    monkeypatch.setattr(_backend.Backend, "close", cut_short_then_ctrl_c)
    old = signal.signal(signal.SIGUSR1, handler)
    try:
        with pytest.raises(Interrupted):
            pvcalls.Backend(host.dom0, topology=Topology(2))
    finally:
        signal.signal(signal.SIGUSR1, old)
    monkeypatch.undo()
    assert len(cut) == 1, "close() was called again: the test no longer tests anything"
    claimed = cut[0] in _backend._serving
    real_close(cut[0])  # what the third Ctrl-C left undone
    _wait_released(host, before)
    assert not claimed, "the domain stays claimed"
    pvcalls.Backend(host.dom0, cpus=1).close()  # the domain is nobody's


def test_a_close_interrupted_as_it_starts_is_finished_by_the_next(
        host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C as close() asked the driver for its devices, before what
    an interrupted close() marks for the next one to finish: the backend
    counted as closed, and every later close() returned at once, leaving
    it serving, its handles open and the domain claimed."""
    from pvcalls import _backend
    from workqueue._loadindex import _HotplugNotifier

    topology = Topology(2)
    before = _held(host)
    backend = pvcalls.Backend(host.dom0, topology=topology)
    cut_devices, cut = _cut_once(_backend._PvcallsDriver.devices)
    monkeypatch.setattr(_backend._PvcallsDriver, "devices", cut_devices)
    with pytest.raises(KeyboardInterrupt):
        backend.close()
    assert cut == [backend._driver], "cut short elsewhere: the test no longer tests anything"
    monkeypatch.undo()
    backend.close()
    _wait_released(host, before)
    assert not [n for n in topology._notifiers if isinstance(n, _HotplugNotifier)]
    pvcalls.Backend(host.dom0, cpus=1).close()  # the domain is nobody's


@pytest.fixture
def xenbus_log() -> Iterator[LogWatch]:
    """The xenbus layer's log lines, a device's error line among them.  A
    device's queue writes that line after the error node and Closing are
    committed: a test that saw them waits for the line (see
    test_a_long_version_is_quoted_short_on_one_line)."""
    watch = LogWatch()
    logger = logging.getLogger("xenback.xenbus")
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)


def test_a_long_version_is_quoted_short_on_one_line(
        dom0_xs: Any, make_frontend: Any, backend: pvcalls.Backend,
        monkeypatch: pytest.MonkeyPatch, xenbus_log: LogWatch) -> None:
    """The frontend's version node is the guest's, as long as XenStore
    lets it be (kilobytes): the error node and the host's log quote only
    its start, as every other node read from a frontend is quoted.

    The error line is held back until the test has seen Closing, as a
    loaded machine may leave the device's queue between the two: looked
    for in what was logged by then, it was missing."""
    logging_it = PauseAt.in_method(monkeypatch, BackendDevice, "_error",
                                   "self._log_error(err, message)", after="if not ours:")
    version = "2" + "x" * 1900
    fe = make_frontend("g", connect=False)
    fe.connect(version=version)
    try:
        fe.wait_backend_state(5)
        error = dom0_xs.read(f"/local/domain/0/error/backend/pvcalls/{fe.guest.domid}/0/error")
        assert error == (f"{errno.EINVAL} connecting: frontend protocol version "
                         f"{ascii(version[:32])} is not one of '1'"), error
        assert logging_it.reached.wait(TIMEOUT)
    finally:
        logging_it.resume()
    xenbus_log.wait("frontend protocol version", level=logging.ERROR)
    said = [r for r in xenbus_log.records if "version" in r.getMessage()]
    for record in said:
        text = logging.Formatter().format(record)
        assert "\n" not in record.getMessage() and len(text) < 1000, text[:200]
    assert backend.stats().frontends == 0
    fe.xs.close()
