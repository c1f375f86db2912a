"""pvcalls Backend: the command ring, item by item (protocol reference, section 1)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import resource
import select
import socket
import struct
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pvcalls_rawfront import (
    TIMEOUT,
    Call,
    DataRing,
    RawFrontend,
    Response,
    address_of,
    bound_ports,
    resources,
    socket_of,
    wait_until,
    watched_fds,
)
from racewindow import PauseAt, stands_at

import pvcalls
import xenback
from pvcalls import _errno, _socket, _wire
from pvcalls._backend import _Frontend
from pvcalls._socket import ActiveSocket, CommandError, PassiveSocket, Request, SockState
from pvcalls._wire import ffi
from workqueue import _work
from xenback.events import EventDispatcher
from xenback.ratelimit import RateLimit

EBADF, EINVAL, EINTR, EEXIST = -9, -22, -4, -17
EAFNOSUPPORT, EISCONN, ECONNREFUSED, ENOTSUPP = -97, -106, -111, -524
EMFILE, EIO, EADDRINUSE, ENETUNREACH, ENOSPC = -24, -5, -98, -101, -28
ECONNRESET, ENOMEM = -104, -12


def test_errno_values_are_xen_numbering() -> None:
    assert (-_errno.EBADF, -_errno.EINVAL, -_errno.EINTR, -_errno.EEXIST) == (
        EBADF, EINVAL, EINTR, EEXIST)
    assert (-_errno.EAFNOSUPPORT, -_errno.EISCONN, -_errno.ECONNREFUSED, -_errno.ENOTSUPP) == (
        EAFNOSUPPORT, EISCONN, ECONNREFUSED, ENOTSUPP)
    assert _errno.ENOTCONN == 107 and _errno.EAGAIN == 11 and _errno.EADDRINUSE == 98


def test_host_errors_map_by_name() -> None:
    assert _errno.from_host_errno(errno.ECONNRESET) == 104
    assert _errno.from_oserror(ConnectionRefusedError(errno.ECONNREFUSED, "x")) == 111
    assert _errno.from_host_errno(None) == _errno.EIO
    assert _errno.from_host_errno(99999) == _errno.EIO
    assert _errno.name_of(-107) == "ENOTCONN"
    # A host error whose name Xen's table has not: EIO too.
    assert "ENOKEY" not in _errno.XEN_ERRNO
    assert _errno.from_host_errno(errno.ENOKEY) == _errno.EIO


def test_every_error_a_host_socket_reports_keeps_its_name() -> None:
    # accept(2) passes the new connection's pending network errors on
    # (ENONET, EPROTO among them) and tells servers to retry on them as on
    # EAGAIN; a TCP connect meeting ICMP "host isolated" fails with ENONET.
    # Read as EIO, each would end a guest's accept loop, or pass for a
    # local I/O failure: they go over with x86 Linux's numbers, as Linux's
    # backend passes them.
    accept_errors = {"ENETDOWN": 100, "EPROTO": 71, "ENOPROTOOPT": 92, "EHOSTDOWN": 112,
                     "ENONET": 64, "EHOSTUNREACH": 113, "EOPNOTSUPP": 95, "ENETUNREACH": 101}
    for name, value in accept_errors.items():
        assert _errno.from_host_errno(getattr(errno, name)) == value, name
        assert _errno.name_of(-value) == name


def test_errno_names_in_log_lines() -> None:
    # Of two names for one number, the usual one; a number without a name as it is.
    assert [_errno.name_of(n) for n in (-11, -95, -35, 524, -9999)] == [
        "EAGAIN", "EOPNOTSUPP", "EDEADLK", "ENOTSUPP", "-9999"]


def test_the_errno_table_is_xen_s_then_x86_linux_s() -> None:
    header = Path("/usr/include/xen/errno.h")
    if not header.exists():
        pytest.skip("no xen/errno.h")
    xen = {name: int(value) for name, value in
           re.findall(r"^XEN_ERRNO\((\w+),\s*(\d+)\)", header.read_text(), re.M)}
    assert len(xen) > 50
    table = _errno.XEN_ERRNO
    assert {name: table[name] for name in xen if name in table} == {
        name: value for name, value in xen.items() if name in table}
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "i686"):
        pytest.skip("the rest are x86 Linux's numbers: the host's here are not")
    linux = {name: getattr(errno, name) for name in table if hasattr(errno, name)}
    assert {name: table[name] for name in linux} == linux
    assert set(table) - set(linux) - set(xen) == {"ENOTSUPP"}
    # The names the backend uses are the table's numbers.
    for name in _errno.__all__:
        if name.startswith("E"):
            assert getattr(_errno, name) == table[name], name


def _fail_add_fd_once(monkeypatch: pytest.MonkeyPatch, *dispatchers: EventDispatcher,
                      err: int = errno.ENOMEM) -> list[int]:
    """The next add_fd of any of ``dispatchers`` fails with ``err`` (the host
    out of memory, or of epoll watches); the later ones work.  Returns the
    descriptors refused (one at most)."""
    refused: list[int] = []
    for dispatcher in dispatchers:
        def add_fd(fd: int, events: int, callback: Any,
                   real: Any = dispatcher.add_fd) -> None:
            if not refused:
                refused.append(fd)
                raise OSError(err, os.strerror(err))
            real(fd, events, callback)

        monkeypatch.setattr(dispatcher, "add_fd", add_fd)
    return refused


@pytest.fixture
def sends_blocked(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Once set, every send on a host socket that CONNECT made meets a
    full send buffer (EAGAIN), as when the peer stopped reading long ago."""
    blocked = threading.Event()

    class SendBlocks(socket.socket):
        def sendmsg(self, *args: Any) -> int:
            if blocked.is_set():
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            return super().sendmsg(*args)

    # pvcalls._socket's name for the module only: the rest of the process
    # (the simulated hypervisor, the test's servers) keeps its sockets.
    module = types.SimpleNamespace(**vars(socket))
    module.socket = SendBlocks
    monkeypatch.setattr(_socket, "socket", module)
    return blocked


# -- SOCKET ------------------------------------------------------------------------

def test_socket_echoes_req_id_cmd_and_id(raw: RawFrontend) -> None:
    sock_id = raw.new_id()
    req_id = raw.ring.req_prod_pvt & 31 if raw.ring else -1
    got_id, rsp = raw.socket(sock_id)
    assert rsp == type(rsp)(req_id, _wire.PVCALLS_SOCKET, 0, sock_id)
    assert got_id == sock_id


def test_every_bit_of_req_id_is_echoed(raw: RawFrontend) -> None:
    """req_id is the guest's (32 bits, echoed as they are): Linux's
    frontend uses the slot index, which leaves all but the 5 low bits 0,
    and a response that lost any other bit would go to the wrong
    request of a frontend that numbers its requests otherwise."""
    req_ids = [0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 0x12345678, 0xA5A5A5A5, 0x5A5A5A5A, 0x100]
    sock_ids = {}
    for req_id in req_ids:
        sock_id = raw.new_id()
        sock_ids[req_id] = sock_id

        def fill(req: Any, req_id: int = req_id, sock_id: int = sock_id) -> None:
            req.req_id = req_id
            _socket_fill(req, sock_id)

        raw.push(_wire.PVCALLS_SOCKET, fill)
    # Every answer, whatever req_id it carries; in ring order (SOCKET is
    # answered as it is handled).
    raw.wait(lambda: len(raw.arrived) == len(req_ids))
    assert raw.arrived == req_ids
    assert raw.responses == {
        req_id: Response(req_id, _wire.PVCALLS_SOCKET, 0, sock_ids[req_id]) for req_id in req_ids}
    assert raw.unexpected == []


@pytest.mark.parametrize(("domain", "type_", "protocol"),
                         [(10, 1, 0), (2, 2, 0), (2, 1, 6), (0, 0, 0), (2, 1, 2)])
def test_socket_only_inet_stream(raw: RawFrontend, domain: int, type_: int,
                                 protocol: int) -> None:
    _, rsp = raw.socket(domain=domain, type_=type_, protocol=protocol)
    assert rsp.ret == EAFNOSUPPORT


def test_socket_id_in_use(raw: RawFrontend) -> None:
    sock_id, rsp = raw.socket()
    assert rsp.ret == 0
    _, rsp = raw.socket(sock_id)
    assert rsp.ret == EEXIST and rsp.id == sock_id



def test_responses_are_notified_on_the_command_port(raw: RawFrontend) -> None:
    """A frontend that sleeps on its command port until answered (Linux's
    pvcalls-front waits in wait_event, woken by the interrupt) is notified
    of each response, by the PUSH_RESPONSES_AND_CHECK_NOTIFY rule: the
    second request, sent after the final check re-armed rsp_event, too."""
    assert raw.ring is not None
    for _ in range(2):
        raw.drain_events()
        sock_id = raw.new_id()
        req_id = raw.push(_wire.PVCALLS_SOCKET, lambda req, i=sock_id: _socket_fill(req, i))
        raw.wait_notified(raw.port)
        raw.poll_responses()  # ends with the final check: rsp_event = rsp_cons + 1
        assert raw.responses.pop(req_id) == Response(req_id, _wire.PVCALLS_SOCKET, 0, sock_id)


def test_a_frontend_that_did_not_ask_is_not_notified(raw: RawFrontend,
                                                     backend: pvcalls.Backend) -> None:
    """The other half of the rule: a frontend that took a response without
    the final check (rsp_event left behind, as a busy frontend polling its
    ring does) is not interrupted for the next one."""
    assert raw.ring is not None
    raw.drain_events()
    first = raw.new_id()
    req_id = raw.push(_wire.PVCALLS_SOCKET, lambda req: _socket_fill(req, first))
    raw.wait_notified(raw.port)
    assert len(list(raw.ring.responses())) == 1  # no final check: rsp_event stays
    second = raw.new_id()
    req_id = raw.push(_wire.PVCALLS_SOCKET, lambda req: _socket_fill(req, second))
    ring = raw.ring
    wait_until(lambda: ring.unconsumed_responses() == 1)  # no final check either
    backend.cmd_wq.flush(timeout=TIMEOUT)  # the response's notification, if any, is sent
    assert raw.evtchn.pending() is None
    rsp = ffi.from_buffer("struct xen_pvcalls_response *", next(raw.ring.responses()))
    assert (rsp.req_id, rsp.ret, rsp.u.socket.id) == (req_id, 0, second)


def _socket_fill(req: Any, sock_id: int) -> None:
    req.u.socket.id = sock_id
    req.u.socket.domain = _wire.AF_INET
    req.u.socket.type = _wire.SOCK_STREAM
    req.u.socket.protocol = 0


def test_a_notification_as_the_command_port_is_bound_waits_for_the_frontend(
        make_frontend: Any, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The guest may notify its command port the moment the backend binds
    it, before the frontend is set up and counted: that event does not run
    the command Work (on a frontend without its ring yet); its requests
    are served once the frontend starts."""
    caplog.set_level(logging.ERROR)
    building = PauseAt.in_method(monkeypatch, _Frontend, "__init__", "self.ring = ring")
    notified = threading.Event()
    real_on_event = _Frontend._on_event

    def on_event(self: _Frontend, *args: object) -> None:
        real_on_event(self, *args)
        notified.set()

    monkeypatch.setattr(_Frontend, "_on_event", on_event)  # bound as the port is
    raw = make_frontend("early-guest", connect=False)
    raw.connect(wait=False)
    assert building.reached.wait(TIMEOUT)  # the command port is bound
    try:
        assert raw.ring is not None
        sock_id = raw.new_id()
        req_id = raw.push(_wire.PVCALLS_SOCKET, lambda req: _socket_fill(req, sock_id))
        for _ in range(int(TIMEOUT / 0.05)):  # the guest may learn of the binding late
            if notified.wait(0.05):
                break
            raw.evtchn.notify(raw.port)
        assert notified.is_set(), "the notification never came"
        backend.cmd_wq.flush(timeout=TIMEOUT)  # whatever the event queued has run
    finally:
        building.resume()
    assert raw.response(req_id) == Response(req_id, _wire.PVCALLS_SOCKET, 0, sock_id)
    raw.wait_backend_state(4)
    assert [r.getMessage() for r in caplog.records] == []


def test_a_run_answers_at_most_command_budget_requests_and_goes_on(
        make_frontend: Any, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of a frontend's command Work handles COMMAND_BUDGET requests
    at most, then gives way to the other items of the command workqueue
    and goes on by itself: a guest that keeps its ring full cannot keep a
    worker for ever, and needs no new notification for the rest."""
    monkeypatch.setattr(pvcalls._backend, "COMMAND_BUDGET", 2)
    runs: list[list[int]] = []  # per run of the Work: the req_ids it handled
    real_process, real_handle = _Frontend._process_commands, _Frontend._handle

    def process(self: _Frontend, work: Any) -> None:
        runs.append([])
        real_process(self, work)

    def handle(self: _Frontend, raw_req: bytes) -> None:
        runs[-1].append(int(ffi.from_buffer("struct xen_pvcalls_request *", raw_req).req_id))
        real_handle(self, raw_req)

    # Before the frontend connects: its Work takes the bound method then.
    monkeypatch.setattr(_Frontend, "_process_commands", process)
    monkeypatch.setattr(_Frontend, "_handle", handle)
    raw = make_frontend("busy-guest")
    assert raw.ring is not None
    req_ids = []
    for _ in range(5):  # all in the ring before the one notification
        req = ffi.new("struct xen_pvcalls_request *")
        req.req_id = raw.ring.req_prod_pvt & (raw.ring.nr_ents - 1)
        req.cmd = _wire.PVCALLS_SOCKET
        _socket_fill(req, raw.new_id())
        req_ids.append(int(req.req_id))
        raw.ring.push_request(bytes(ffi.buffer(req)))
    if raw.ring.push_requests():
        raw.evtchn.notify(raw.port)
    for req_id in req_ids:
        assert raw.response(req_id).ret == 0
    handled = [r for r in runs if r]
    assert [req_id for run in handled for req_id in run] == req_ids
    assert [len(run) for run in handled] == [2, 2, 1]


def test_an_interrupt_escaping_a_command_leaves_the_rest_of_the_ring_served(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An interrupt escaping a command's handler (no Exception: the command
    Work lets it through, to the workqueue's log) leaves that command
    unanswered, and the ring served: the request behind it in the ring,
    and the one the frontend sends later, are answered.  The run ended
    there left req_event where it was (it is moved on only once the ring
    is found empty): the request behind waited for a notification, and
    the frontend, which notifies only past req_event, sent none again."""
    cut = _cut_short_once(monkeypatch, _Frontend, "_lookup", KeyboardInterrupt())
    ring = raw.ring
    assert ring is not None
    behind = raw.new_id()
    fills = [(_wire.PVCALLS_POLL, lambda req: setattr(req.u.poll, "id", raw.new_id())),
             (_wire.PVCALLS_SOCKET, lambda req: _socket_fill(req, behind))]
    req_ids = []
    for cmd, fill in fills:  # both in the ring before the one notification
        req = ffi.new("struct xen_pvcalls_request *")
        req.req_id = ring.req_prod_pvt & (ring.nr_ents - 1)
        req.cmd = cmd
        fill(req)
        req_ids.append(int(req.req_id))
        ring.push_request(bytes(ffi.buffer(req)))
    if ring.push_requests():
        raw.evtchn.notify(raw.port)
    interrupted, socket_req = req_ids
    assert raw.response(socket_req).ret == 0
    assert cut.is_set()
    # The interrupt went on, to the workqueue's log (before the run that
    # answered the SOCKET could start), not swallowed by the run again.
    assert [r.exc_info[0] for r in caplog.records
            if r.name == "workqueue._pool" and r.exc_info] == [KeyboardInterrupt]
    later, answer = raw.socket()
    assert answer.ret == 0
    assert interrupted not in raw.responses
    assert {row.id for row in backend.stats().sockets} == {behind, later}
    assert raw.unexpected == []


# -- unknown commands and ids -------------------------------------------------------------

@pytest.mark.parametrize("cmd", [7, 8, 0x7FFFFFFF, 0xFFFFFFFF])
def test_unknown_command_is_enotsupp_with_id_echoed(raw: RawFrontend, cmd: int) -> None:
    def fill(req: Any) -> None:
        req.u.socket.id = 0xDEADBEEFCAFEF00D

    rsp = raw.call(cmd, fill)
    assert (rsp.cmd, rsp.ret, rsp.id) == (cmd, ENOTSUPP, 0xDEADBEEFCAFEF00D)


@pytest.mark.parametrize("cmd", [_wire.PVCALLS_CONNECT, _wire.PVCALLS_RELEASE,
                                 _wire.PVCALLS_BIND, _wire.PVCALLS_LISTEN,
                                 _wire.PVCALLS_ACCEPT, _wire.PVCALLS_POLL])
def test_unknown_id_is_answered_ebadf(raw: RawFrontend, cmd: int) -> None:
    unknown = 0xFFFF8880DEAD0000

    def fill(req: Any) -> None:
        req.u.socket.id = unknown

    rsp = raw.call(cmd, fill)
    assert (rsp.cmd, rsp.ret, rsp.id) == (cmd, EBADF, unknown)


def test_a_failing_handler_is_eio_and_the_ring_goes_on(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a command's handler (no real trigger: faked) answers that
    command -EIO, is logged with its traceback, and the next commands are
    served."""
    def broken(self: PassiveSocket, backlog: int) -> None:
        raise RuntimeError("bug in listen")

    monkeypatch.setattr(PassiveSocket, "listen", broken)
    sock_id, _ = raw.socket()
    assert raw.bind(sock_id, ("127.0.0.1", 0)).ret == 0
    rsp = raw.listen(sock_id)
    assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_LISTEN, EIO, sock_id)
    record, = (r for r in caplog.records if r.levelno >= logging.ERROR)
    assert record.getMessage() == f"dom{raw.guest.domid}: LISTEN id {sock_id:#x} failed"
    assert record.exc_info is not None and str(record.exc_info[1]) == "bug in listen"
    assert raw.release(sock_id).ret == 0
    _, rsp = raw.socket()
    assert rsp.ret == 0 and raw.unexpected == []


def test_failing_handlers_are_logged_through_the_rate_limit(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The guest decides how often a handler's bug is set off: each time
    it is answered -EIO, but the tracebacks go through the guest's rate
    limit, 10 per interval, not one per command."""
    caplog.set_level(logging.ERROR)
    fe = backend._frontends[(raw.guest.domid, 0)]
    fe.ratelimit = RateLimit(f"dom{raw.guest.domid}", clock=lambda: 0.0)  # one interval

    def broken(self: _Frontend, request: Request, req: Any) -> int:
        raise RuntimeError("bug in socket")

    monkeypatch.setitem(pvcalls._backend._HANDLERS, _wire.PVCALLS_SOCKET, broken)
    for _ in range(12):
        assert raw.socket()[1].ret == EIO
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failed) == 10
    assert all(r.exc_info is not None and str(r.exc_info[1]) == "bug in socket"
               for r in failed)


# -- CONNECT ---------------------------------------------------------------------------

def test_connect_and_echo(raw: RawFrontend, echo_server: Any, backend: pvcalls.Backend) -> None:
    sock_id, rsp = raw.socket()
    ring = raw.new_ring()
    req_id = raw.push_connect(sock_id, echo_server.address, ring)
    rsp = raw.response(req_id)
    assert (rsp.req_id, rsp.cmd, rsp.ret, rsp.id) == (req_id, _wire.PVCALLS_CONNECT, 0, sock_id)
    raw.echo(ring, b"hello pvcalls")
    row, = backend.stats().sockets
    assert (row.domain, row.id, row.kind, row.state) == (raw.guest.domid, sock_id, "active",
                                                          "connected")
    assert row.bytes_out == row.bytes_in == 13
    assert row.cpu in backend.topology.online()
    assert row.address == echo_server.address
    assert raw.release(sock_id).ret == 0
    assert backend.stats().sockets == ()


def test_a_connect_answered_at_once_runs_the_socket_for_its_events_only(
        raw: RawFrontend, echo_server: Any, backend: pvcalls.Backend,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A connect that completes within the CONNECT (loopback) queues no
    run of the socket's Work that nothing asked for: a wake-up of a worker
    per connect.  The first event runs it."""
    runs: list[SockState] = []
    real_run = ActiveSocket._run

    def counted(self: ActiveSocket) -> None:
        runs.append(self.state)
        real_run(self)

    monkeypatch.setattr(ActiveSocket, "_run", counted)
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    assert raw.response(raw.push_connect(sock_id, echo_server.address, ring)).ret == 0
    sock = socket_of(backend, raw, sock_id)
    sock.flush()
    assert runs == []
    raw.echo(ring, b"first")
    assert runs and set(runs) == {SockState.CONNECTED}
    assert raw.release(sock_id).ret == 0


def test_a_notification_while_the_connect_is_set_up_is_not_lost(
        raw: RawFrontend, echo_server: Any, backend: pvcalls.Backend,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The frontend writes and notifies while its CONNECT is still being
    processed (the port is bound, the socket not yet CONNECTED): the Work
    that this runs finds the socket NEW and does nothing, and the CONNECT,
    connected at once, runs it again, which sends the bytes."""
    # Connected and watched, not yet CONNECTED: the first "with" of
    # start_connect is the connected-at-once path's.
    starting = PauseAt.in_method(monkeypatch, ActiveSocket, "start_connect",
                                 "with self._lock:")
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    connect_req = raw.push_connect(sock_id, echo_server.address, ring)
    assert starting.reached.wait(TIMEOUT)
    try:
        sock = socket_of(backend, raw, sock_id)
        assert ring.write(b"early") == 5  # and notifies
        wait_until(lambda: sock._missed)  # the Work ran, NEW
        assert connect_req not in raw.responses
    finally:
        starting.resume()
    assert raw.response(connect_req).ret == 0
    assert raw.recv_exactly(ring, 5) == b"early"
    assert raw.release(sock_id).ret == 0



class _Greeter:
    """A host server that sends ``greeting`` on each connection as it
    accepts it, and keeps the connection open."""

    def __init__(self, greeting: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.conns: list[socket.socket] = []
        self._greeting = greeting
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            self.conns.append(conn)
            conn.sendall(self._greeting)

    def close(self) -> None:
        self.listener.close()
        self._thread.join(TIMEOUT)
        for conn in self.conns:
            conn.close()


@pytest.fixture
def greeter() -> Iterator[_Greeter]:
    server = _Greeter(b"hello")
    yield server
    server.close()


def test_data_from_the_peer_while_the_connect_is_set_up_is_not_lost(
        raw: RawFrontend, greeter: _Greeter, backend: pvcalls.Backend,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer sends as it accepts, while the CONNECT is still being
    processed (the host socket watched, the socket not yet CONNECTED): the
    Work its edge runs finds the socket NEW, and the guest wrote nothing,
    so only the note of that run makes the CONNECT run it again.  No
    other edge comes: without it, the bytes would wait in the host socket
    for ever."""
    starting = PauseAt.in_method(monkeypatch, ActiveSocket, "start_connect",
                                 "with self._lock:")
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    connect_req = raw.push_connect(sock_id, greeter.address, ring)
    assert starting.reached.wait(TIMEOUT)
    try:
        sock = socket_of(backend, raw, sock_id)
        wait_until(lambda: sock._missed)  # the host's edge ran the Work, NEW
    finally:
        starting.resume()
    assert raw.response(connect_req).ret == 0
    assert raw.recv_exactly(ring, 5) == b"hello"
    assert raw.release(sock_id).ret == 0


def test_a_work_that_found_the_socket_new_as_it_connected_runs_again(
        raw: RawFrontend, greeter: _Greeter, backend: pvcalls.Backend,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The Work, run by the peer's edge, read the state NEW, and the
    CONNECT made the socket CONNECTED before the Work could note that it
    ran: the CONNECT found no note, so the Work, seeing the state changed
    under the lock, runs again itself."""
    starting = PauseAt.in_method(monkeypatch, ActiveSocket, "start_connect",
                                 "with self._lock:")
    noting = PauseAt.in_method(monkeypatch, ActiveSocket, "_missed_run", "with self._lock:")
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    connect_req = raw.push_connect(sock_id, greeter.address, ring)
    try:
        assert starting.reached.wait(TIMEOUT)
        assert noting.reached.wait(TIMEOUT)  # the edge came; the Work read NEW
    finally:
        starting.resume()
    try:
        assert raw.response(connect_req).ret == 0
        sock = socket_of(backend, raw, sock_id)
        assert sock.state is SockState.CONNECTED and not sock._missed
    finally:
        noting.resume()
    assert raw.recv_exactly(ring, 5) == b"hello"
    assert raw.release(sock_id).ret == 0


def test_connect_refused(raw: RawFrontend) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    address = closed.getsockname()
    closed.close()
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    rsp = raw.response(raw.push_connect(sock_id, address, ring))
    assert rsp.ret == ECONNREFUSED
    # The id is usable again: connect it somewhere else, or release it.
    assert raw.release(sock_id).ret == 0


def test_connect_twice_is_eisconn(raw: RawFrontend, echo_server: Any) -> None:
    sock_id, _ = raw.connect_socket(echo_server.address)
    rsp = raw.response(raw.push_connect(sock_id, echo_server.address, raw.new_ring()))
    assert rsp.ret == EISCONN


@pytest.mark.parametrize("length", [0, 7, 29, 0xFFFFFFFF])
def test_connect_bad_address_length(raw: RawFrontend, echo_server: Any, length: int) -> None:
    sock_id, _ = raw.socket()
    rsp = raw.response(raw.push_connect(sock_id, echo_server.address, raw.new_ring(),
                                        length=length))
    assert rsp.ret == EINVAL


def test_connect_bad_family(raw: RawFrontend) -> None:
    sock_id, _ = raw.socket()
    ring = raw.new_ring()

    def fill(req: Any) -> None:
        req.u.connect.id = sock_id
        ffi.memmove(req.u.connect.addr, b"\x0a\x00" + bytes(14), 16)
        req.u.connect.len = 16
        req.u.connect.ref = ring.ref
        req.u.connect.evtchn = ring.port

    assert raw.call(_wire.PVCALLS_CONNECT, fill).ret == EAFNOSUPPORT


@pytest.mark.parametrize("length", [8, 16, 28])
def test_connect_and_bind_take_any_address_length_from_8_to_28(
        raw: RawFrontend, echo_server: Any, length: int) -> None:
    """8 bytes carry family, port and address; 28 is the wire field's
    size (Linux sends 16, sizeof(struct sockaddr))."""
    sock_id, _ = raw.socket()
    rsp = raw.response(raw.push_connect(sock_id, echo_server.address, raw.new_ring(),
                                        length=length))
    assert rsp.ret == 0
    bound, _ = raw.socket()
    assert raw.bind(bound, ("127.0.0.1", 0), length=length).ret == 0


@pytest.mark.parametrize("length", [0, 7, 29, 0xFFFFFFFF])
def test_bind_bad_address_length(raw: RawFrontend, length: int) -> None:
    """BIND's len is checked as CONNECT's; the socket stays NEW."""
    sock_id, _ = raw.socket()
    assert raw.bind(sock_id, ("127.0.0.1", 0), length=length).ret == EINVAL
    assert raw.bind(sock_id, ("127.0.0.1", 0)).ret == 0


def test_bind_bad_family(raw: RawFrontend) -> None:
    sock_id, _ = raw.socket()

    def fill(req: Any) -> None:
        req.u.bind.id = sock_id
        ffi.memmove(req.u.bind.addr, b"\x0a\x00" + bytes(14), 16)
        req.u.bind.len = 16

    assert raw.call(_wire.PVCALLS_BIND, fill).ret == EAFNOSUPPORT


@pytest.mark.parametrize("address", ["255.255.255.255", "224.0.0.1"])
def test_connect_failing_at_once_leaves_a_new_socket(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any, address: str) -> None:
    """Linux refuses a TCP connect to a broadcast or multicast address within
    connect() itself: the CONNECT is answered with that error, everything
    set up for it is let go, and the id is NEW again, ring reusable."""
    ports = sorted(bound_ports(backend))
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    rsp = raw.response(raw.push_connect(sock_id, (address, 80), ring))
    assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_CONNECT, ENETUNREACH, sock_id)
    row, = backend.stats().sockets
    assert (row.id, row.kind, row.state) == (sock_id, "new", "new")
    assert sorted(bound_ports(backend)) == ports
    assert all(c.sockets == 0 for c in backend.stats().cpus)
    # The guest retries with the same ring, as Linux's frontend would.
    assert raw.response(raw.push_connect(sock_id, echo_server.address, ring)).ret == 0
    raw.echo(ring, b"second try")
    assert raw.unexpected == []


@pytest.mark.parametrize("bad", ["ref", "ring_order", "data_refs", "evtchn"])
def test_connect_with_a_bad_ring_or_event_channel_holds_nothing(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any, bad: str) -> None:
    """A CONNECT refused -EINVAL for its data ring or event channel lets go
    of everything set up for it: the pages it mapped (the indexes page
    when the data pages cannot be, or the whole ring when the event channel
    cannot be bound) and the CPU it was homed on (else a guest could pin
    the backend's memory or load the CPUs' counts at will); the id stays
    NEW."""
    ports = sorted(bound_ports(backend))
    mappings = len(backend.gnttab._live)  # the backend's grant mappings
    sock_id, _ = raw.socket()
    if bad == "ring_order":
        ring = raw.new_ring(ring_order=0)
    elif bad == "data_refs":
        ring = raw.new_ring(4, refs=[0xFFFF0000 + i for i in range(16)])
    else:
        ring = raw.new_ring()
    req_id = raw.push_connect(sock_id, echo_server.address, ring,
                              ref=0xFFFFFFFF if bad == "ref" else None,
                              evtchn=4000 if bad == "evtchn" else None)
    assert raw.response(req_id).ret == EINVAL
    row, = backend.stats().sockets
    assert (row.id, row.kind, row.state) == (sock_id, "new", "new")
    assert all(c.sockets == 0 for c in backend.stats().cpus)
    # The index's own count: stats() counts the table's rows, which the
    # id left as NEW.
    assert all(backend.load_index.load(cpu) == 0 for cpu in backend.topology.possible())
    assert sorted(bound_ports(backend)) == ports
    assert len(backend.gnttab._live) == mappings


@pytest.mark.parametrize(("command", "where"), [
    ("connect", "homing"), ("connect", "mapping"), ("connect", "binding"),
    ("accept", "mapping"), ("accept", "binding")])
def test_a_connect_or_accept_cut_short_setting_up_its_ring_holds_nothing(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, command: str, where: str) -> None:
    """An interrupt as a CONNECT's or ACCEPT's data ring is set up (as a
    CONNECT's socket is homed on a CPU, as its pages are mapped, or as its
    event channel is bound, the pages mapped): the command, cut short, is
    not answered, the id stays free (NEW for a CONNECT), and what was set
    up for it goes back at once: the CPU a CONNECT was homed on, the
    pages.  Torn down only for a CommandError, the socket, in no table,
    held them for the life of the backend."""
    fe = backend._frontends[(raw.guest.domid, 0)]
    ports = sorted(bound_ports(backend))
    mappings = len(backend.gnttab._live)
    if where == "homing":
        cut = _cut_short_once(monkeypatch, ActiveSocket, "place", KeyboardInterrupt(), after=True)
    elif where == "mapping":
        cut = _cut_short_once(monkeypatch, _socket.DataRing, "__init__", KeyboardInterrupt())
    else:
        cut = _cut_short_once(monkeypatch, EventDispatcher, "bind_interdomain",
                              KeyboardInterrupt())
    if command == "connect":
        sock_id, _ = raw.socket()
        req_id = raw.push_connect(sock_id, echo_server.address, raw.new_ring())
        left = [(sock_id, "new")]
    else:
        listener, _ = raw.listening(backend)
        sock_id = raw.new_id()
        req_id = raw.push_accept(listener, sock_id, raw.new_ring())
        left = [(listener, "listening")]
    assert cut.wait(TIMEOUT)
    fe._work.flush(timeout=TIMEOUT)  # the command handled, cut short
    raw.poll_responses()
    assert req_id not in raw.responses
    assert [(row.id, row.state) for row in backend.stats().sockets] == left
    assert fe.nr_sockets == 1
    assert all(backend.load_index.load(cpu) == 0 for cpu in backend.topology.possible())
    assert sorted(bound_ports(backend)) == ports
    assert len(backend.gnttab._live) == mappings
    assert raw.unexpected == []


def _closed_holds_nothing(raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """The frontend closed, the backend holds nothing of it: no frontend,
    no bound port, no mapped page, no socket counted on any CPU, and no
    response the guest did not ask for."""
    raw.close()
    assert backend.stats().frontends == 0
    assert bound_ports(backend) == []
    assert len(backend.gnttab._live) == 0
    assert all(backend.load_index.load(cpu) == 0 for cpu in backend.topology.possible())
    assert raw.unexpected == []


@pytest.mark.parametrize("command", ["connect", "accept"])
def test_a_connect_or_accept_whose_undo_is_cut_short_too_holds_nothing_once_closed(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """An interrupt as a CONNECT's or ACCEPT's data ring is set up (as
    attach_ring returns, a CONNECT's socket homed), and a second one as
    the teardown that gives them back starts: the frontend's close still
    gives back what the socket holds.  That socket is in no table, and
    its teardown, done by nobody else, held the pages, the port, the CPU
    slot for the life of the backend."""
    cut = _cut_short_once(monkeypatch, ActiveSocket, "attach_ring", KeyboardInterrupt(),
                          after=True)
    undo_cut = _cut_short_once(monkeypatch, ActiveSocket, "teardown", KeyboardInterrupt())
    if command == "connect":
        sock_id, _ = raw.socket()
        req_id = raw.push_connect(sock_id, echo_server.address, raw.new_ring())
    else:
        listener, _ = raw.listening(backend)
        req_id = raw.push_accept(listener, raw.new_id(), raw.new_ring())
    assert cut.wait(TIMEOUT) and undo_cut.wait(TIMEOUT)
    fe = backend._frontends[(raw.guest.domid, 0)]
    fe._work.flush(timeout=TIMEOUT)  # the command handled, cut short twice
    raw.poll_responses()
    assert req_id not in raw.responses
    _closed_holds_nothing(raw, backend)


def test_an_accept_cut_short_twice_as_it_gives_back_its_reservation_counts_no_socket(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt as an ACCEPT's data ring is set up, the id_new counted
    against the socket limit, and a second one as the frontend's lock would
    be taken to give that count back: the id_new is counted no more, and
    its socket given back at once.  The count given back under that lock,
    the second interrupt kept it, the domain's limit one lower for as long
    as the frontend is connected."""
    fe = backend._frontends[(raw.guest.domid, 0)]
    listener, _ = raw.listening(backend)
    counted = fe.nr_sockets
    cut = _cut_short_once(monkeypatch, ActiveSocket, "attach_ring", KeyboardInterrupt(),
                          after=True)
    lock = _CutLock(fe._lock, _Frontend._accept, on="enter", armed=cut)
    monkeypatch.setattr(fe, "_lock", lock)
    req_id = raw.push_accept(listener, raw.new_id(), raw.new_ring())
    assert cut.wait(TIMEOUT)
    fe._work.flush(timeout=TIMEOUT)  # the command handled, cut short
    raw.poll_responses()
    assert req_id not in raw.responses
    assert fe.nr_sockets == counted
    assert fe._undone == []
    _closed_holds_nothing(raw, backend)


def test_two_connects_whose_undo_is_cut_short_too_hold_nothing_once_closed(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two CONNECTs, each cut short as its data ring is set up and again
    as the teardown that gives it back starts: the frontend's close gives
    back what both sockets hold.  Its loop over those sockets takes each
    off the record as it is done: over the record itself, not a copy, it
    skipped the one behind each it took off."""
    attach, teardown = ActiveSocket.attach_ring, ActiveSocket.teardown
    cuts: list[str] = []

    def cut_attach(self: ActiveSocket, *args: Any) -> None:
        attach(self, *args)
        if cuts.count("attach") < 2:
            cuts.append("attach")
            raise KeyboardInterrupt

    def cut_teardown(self: ActiveSocket, **kwargs: Any) -> None:
        if cuts.count("teardown") < 2:
            cuts.append("teardown")
            raise KeyboardInterrupt
        teardown(self, **kwargs)

    monkeypatch.setattr(ActiveSocket, "attach_ring", cut_attach)
    monkeypatch.setattr(ActiveSocket, "teardown", cut_teardown)
    fe = backend._frontends[(raw.guest.domid, 0)]
    for n in (1, 2):
        sock_id, _ = raw.socket()
        raw.push_connect(sock_id, echo_server.address, raw.new_ring())
        wait_until(lambda n=n: len(fe._undone) == n)
    fe._work.flush(timeout=TIMEOUT)  # the commands handled, each cut short twice
    _closed_holds_nothing(raw, backend)


@pytest.mark.parametrize(("command", "where"), [
    ("connect", "stored"), ("accept", "reserved"), ("accept", "stored")])
def test_a_connect_or_accept_cut_short_as_its_socket_is_stored_holds_nothing(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, command: str, where: str) -> None:
    """An interrupt after a CONNECT's or ACCEPT's data ring is set up, as
    the frontend's lock is taken to put the socket in the table (or, for
    an ACCEPT, as that lock is let go once id_new is counted against the
    socket limit, before anything is set up): the command, cut short, is
    not answered, what was set up goes back at once, and the id_new is
    counted no more.  Between the end of the set-up's try and the table,
    the socket was in no place close() looks: its pages, port and CPU
    slot held for the life of the backend, and an ACCEPT's reservation
    kept the domain's socket limit one lower for good."""
    fe = backend._frontends[(raw.guest.domid, 0)]
    handler = _Frontend._connect if command == "connect" else _Frontend._accept
    attached = threading.Event()
    attach_ring = ActiveSocket.attach_ring

    def attach(self: ActiveSocket, *args: Any) -> None:
        attach_ring(self, *args)
        attached.set()

    monkeypatch.setattr(ActiveSocket, "attach_ring", attach)
    lock = _CutLock(fe._lock, handler, on="enter" if where == "stored" else "exit",
                    armed=attached if where == "stored" else None)
    monkeypatch.setattr(fe, "_lock", lock)
    ring = raw.new_ring()
    if command == "connect":
        sock_id, _ = raw.socket()
        before = resources(backend, host)
        req_id = raw.push_connect(sock_id, echo_server.address, ring)
        left = [(sock_id, "new")]
    else:
        listener, _ = raw.listening(backend)
        before = resources(backend, host)
        req_id = raw.push_accept(listener, raw.new_id(), ring)
        left = [(listener, "listening")]
    assert lock.cut.wait(TIMEOUT)
    fe._work.flush(timeout=TIMEOUT)  # the command handled, cut short
    raw.poll_responses()
    assert req_id not in raw.responses
    assert [(row.id, row.state) for row in backend.stats().sockets] == left
    assert fe.nr_sockets == 1
    assert resources(backend, host) == before
    assert fe._undone == []
    assert all(backend.load_index.load(cpu) == 0 for cpu in backend.topology.possible())
    _closed_holds_nothing(raw, backend)


@pytest.mark.parametrize("anywhere", [False, True], ids=["handler", "anywhere"])
@pytest.mark.parametrize("command", ["connect", "accept"])
def test_a_connect_or_accept_interrupted_as_any_of_its_calls_returns_holds_nothing_for_good(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, command: str, anywhere: bool) -> None:
    """A Ctrl-C landing as any call made by the CONNECT's or ACCEPT's
    handler returns (the recording of its socket, the set-up of its ring,
    the taking and letting go of the table's lock, the connect's start),
    or (``anywhere``) at any place of pvcalls' code the handler runs (the
    mapping of the ring's pages, the socket's homing): the socket is in
    the table, for a RELEASE to free, or given back at once, and then
    nothing is held: no port, page or CPU slot, no socket left on the
    frontend's record, none counted against the domain's limit.  A socket
    between its record and the table in neither of them was held for
    good; an ACCEPT's reservation kept, the limit one lower; a mapping
    kept from the ring by an interrupt as the map call returned, held."""
    from stolensignal import interrupted_as_call_returns, interrupted_at

    fe = backend._frontends[(raw.guest.domid, 0)]
    listener = raw.listening(backend)[0] if command == "accept" else None
    # The requests handled here were never on the ring: their answers
    # (an ACCEPT's -EINTR, as its id_new is released) are kept aside.
    answered: dict[int, int] = {}
    respond = fe.respond

    def kept_aside(request: Request, ret: int) -> None:
        if request.req_id >= 10000:
            answered[request.req_id] = ret
        else:
            respond(request, ret)

    monkeypatch.setattr(fe, "respond", kept_aside)
    landed = 0
    for n in itertools.count():
        before, counted = resources(backend, host), fe.nr_sockets
        ring = raw.new_ring()
        req = ffi.new("struct xen_pvcalls_request *")
        if listener is None:
            sock_id, _ = raw.socket()
            req.u.connect.id = sock_id
            ffi.memmove(req.u.connect.addr, _wire.pack_sockaddr_in(*echo_server.address), 16)
            req.u.connect.len = 16
            req.u.connect.ref, req.u.connect.evtchn = ring.ref, ring.port
            request = Request(10000 + n, _wire.PVCALLS_CONNECT, sock_id)
            handler: Any = _Frontend._connect
        else:
            sock_id = raw.new_id()
            req.u.accept.id, req.u.accept.id_new = listener, sock_id
            req.u.accept.ref, req.u.accept.evtchn = ring.ref, ring.port
            request = Request(10000 + n, _wire.PVCALLS_ACCEPT, listener)
            handler = _Frontend._accept
        def call(request: Request = request, req: Any = req, handler: Any = handler) -> None:
            handler(fe, request, req)

        if anywhere:
            where = interrupted_at(n, os.path.dirname(pvcalls.__file__), call)
            interrupted = bool(where)
        else:
            where = f"interrupted as call {n} returned"
            interrupted = interrupted_as_call_returns(handler.__code__, n, call)
        assert fe._undone == [], where
        if sock_id in fe._sockets:
            assert raw.release(sock_id).ret == 0, where
        ring.close()
        assert resources(backend, host) == before, where
        assert fe.nr_sockets == counted, where
        if not interrupted:
            break
        landed += 1
    assert landed >= 6  # the record, the mapping, the table's lock among them
    assert raw.unexpected == []


def test_an_event_channel_the_platform_calls_out_of_range_is_einval(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bind_interdomain() refusing the guest's port with ValueError (a
    platform's check of its range), not OSError: the CONNECT is still
    -EINVAL, the guest's fault, not -EIO, a bug of ours, and the ring
    mapped for it goes back."""
    mappings = len(backend.gnttab._live)
    _cut_short_once(monkeypatch, EventDispatcher, "bind_interdomain",
                    ValueError("port out of range"))
    sock_id, _ = raw.socket()
    assert raw.response(raw.push_connect(sock_id, echo_server.address, raw.new_ring())
                        ).ret == EINVAL
    assert len(backend.gnttab._live) == mappings
    # Nor is the socket kept for close() to tear down again: a guest
    # refused so, at will, would grow that record for the life of its
    # frontend.
    assert backend._frontends[(raw.guest.domid, 0)]._undone == []
    assert raw.unexpected == []


@pytest.mark.parametrize("command", ["connect", "accept"])
def test_a_ring_attached_with_an_interrupt_as_any_of_its_calls_returns_holds_nothing(
        raw: RawFrontend, backend: pvcalls.Backend, command: str) -> None:
    """A Ctrl-C landing as any call made by ActiveSocket.attach_ring
    returns (a CONNECT's socket, homed first, or an ACCEPT's id_new): the
    teardown that the command's except clause does gives back what it
    made, the data ring's mapping and its event channel port.  Recorded
    by the assignment of what DataRing() or bind_interdomain() returned,
    one the interrupt lost as its call returned was held for the life of
    the backend."""
    from stolensignal import interrupted_as_call_returns

    fe = backend._frontends[(raw.guest.domid, 0)]
    ports, mapped = sorted(bound_ports(backend)), len(backend.gnttab._live)
    landed = 0
    for n in itertools.count():
        ring = raw.new_ring()
        sock = ActiveSocket(fe, raw.new_id())

        def attach(sock: ActiveSocket = sock, ring: Any = ring) -> None:
            try:
                if command == "connect":
                    sock.place()
                sock.attach_ring(ring.ref, ring.port)
            except BaseException:
                sock.teardown()  # as _Frontend._connect and _accept do
                raise

        interrupted = interrupted_as_call_returns(ActiveSocket.attach_ring.__code__, n, attach)
        if not interrupted:
            sock.teardown()
        assert sorted(bound_ports(backend)) == ports, f"interrupted as call {n} returned"
        assert len(backend.gnttab._live) == mapped, f"interrupted as call {n} returned"
        ring.close()
        if not interrupted:
            break
        landed += 1
    assert landed >= 5  # the mapping and the binding among them
    assert all(backend.load_index.load(cpu) == 0 for cpu in backend.topology.possible())


def test_the_ring_hints_keep_their_bound_however_an_attach_is_cut_short(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing as any call made by ActiveSocket.attach_ring
    returns, where it takes a ring's own hint out (the ring given again)
    or the oldest out for the bound (one ring's refs here): the next
    attach still works, its hint the one kept.  With a count of the refs
    kept tracked beside the hints, an interrupt between a hint's removal
    and the count's left the count too high for good, and the bound's
    loop, emptying the hints, ran out of them (StopIteration, and every
    CONNECT of the frontend -EIO from then on)."""
    from stolensignal import interrupted_as_call_returns

    monkeypatch.setattr(_socket, "RING_HINTS", 1)
    monkeypatch.setattr(_socket, "RING_HINT_REFS", 16)  # one ring of order 4
    fe = backend._frontends[(raw.guest.domid, 0)]
    first, second = raw.new_ring(), raw.new_ring()

    def attach(ring: DataRing) -> None:
        sock = ActiveSocket(fe, raw.new_id())
        try:
            sock.attach_ring(ring.ref, ring.port)
        finally:
            sock.teardown()

    attach(first)
    landed = 0
    for n in itertools.count():
        # The ring's own hint out, then the oldest (first's) for second's.
        interrupted = interrupted_as_call_returns(
            ActiveSocket.attach_ring.__code__, n, lambda: attach(first))
        attach(second)
        assert fe.ring_hints == {second.ref: second.refs}, f"interrupted as call {n} returned"
        assert fe.ring_hint_refs == 16, f"interrupted as call {n} returned"
        attach(first)  # its hint back for the next round
        if not interrupted:
            break
        landed += 1
    assert landed >= 3
    first.close()
    second.close()


def test_a_connect_whose_socket_cannot_be_watched_holds_nothing(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, sends_blocked: threading.Event) -> None:
    """The connected host socket cannot join its CPU's epoll set (the host
    out of memory): CONNECT is answered with that errno and everything set
    up for it goes back (event channel, data ring, CPU slot), even though
    the teardown met more trouble: bytes the guest wrote early into the
    out ring, which the send buffer would not take.  The id is NEW, and a
    retry with the same ring works and sends those bytes."""
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    before = resources(backend, host)
    assert ring.write(b"early", notify=False) == 5
    sends_blocked.set()
    refused = _fail_add_fd_once(monkeypatch, *(p.events for p in backend._pollers.values()))
    rsp = raw.response(raw.push_connect(sock_id, echo_server.address, ring))
    assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_CONNECT, ENOMEM, sock_id)
    assert len(refused) == 1
    row, = backend.stats().sockets
    assert (row.id, row.kind, row.state) == (sock_id, "new", "new")
    assert backend.domain_sockets(raw.guest.domid) == 1
    assert resources(backend, host) == before
    sends_blocked.clear()
    assert raw.response(raw.push_connect(sock_id, echo_server.address, ring)).ret == 0
    raw.evtchn.notify(ring.port)  # for the bytes written before
    assert raw.recv_exactly(ring, 5) == b"early"
    assert raw.unexpected == []


def test_a_failed_connect_sends_nothing_the_guest_wrote_early(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CONNECT answered with an error (here: its host socket cannot be
    watched) has sent nothing of what the guest wrote into the out ring
    before the answer: the peer sees that connection close empty, and the
    bytes go to the connection of the retry, without a notification (the
    one the guest gave may have come while the socket was not connected)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(TIMEOUT)
        sock_id, _ = raw.socket()
        ring = raw.new_ring()
        assert ring.write(b"early", notify=False) == 5
        _fail_add_fd_once(monkeypatch, *(p.events for p in backend._pollers.values()))
        rsp = raw.response(raw.push_connect(sock_id, server.getsockname(), ring))
        assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_CONNECT, ENOMEM, sock_id)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            assert conn.recv(16) == b""
        assert raw.response(raw.push_connect(sock_id, server.getsockname(), ring)).ret == 0
        conn, _ = server.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            received = b""
            while len(received) < 5 and (chunk := conn.recv(16)):
                received += chunk
            assert received == b"early"
    assert raw.unexpected == []


def test_connect_is_answered_once_when_its_work_runs_meanwhile(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The frontend may notify a new ring's port while its CONNECT is being
    processed, and so run the socket's Work in the middle of it: still
    exactly one answer, whether the connect succeeds or is refused."""
    place = ActiveSocket.place

    def place_and_run_the_work(self: ActiveSocket) -> None:
        place(self)
        if self.host is not None:  # in start_connect, after connect_ex
            self.kick()  # what the frontend's notification does
            self.flush()

    monkeypatch.setattr(ActiveSocket, "place", place_and_run_the_work)
    # A request in flight: a second answer to a CONNECT would take its slot.
    listener, listening = raw.listening(backend)
    poll = raw.push_poll(listener)
    closed = socket.create_server(("127.0.0.1", 0))
    refused = closed.getsockname()
    closed.close()
    for address, ret in ((echo_server.address, 0), (refused, ECONNREFUSED)):
        sock_id, _ = raw.socket()
        req_id = raw.push_connect(sock_id, address, raw.new_ring())
        assert raw.response(req_id).ret == ret
        _, after = raw.socket()  # answered after anything more for the CONNECT
        assert after.ret == 0
        assert req_id not in raw.responses and raw.unexpected == []
        assert raw.release(sock_id).ret == 0
    with socket.create_connection(listening, timeout=TIMEOUT):
        rsp = raw.response(poll)
    assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_POLL, 0, listener)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_connect_reset_as_it_completes_is_answered(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection established within connect() and reset by the peer
    just after the backend found it connected: the CONNECT is answered, and
    the reset reaches the frontend.  Reading SO_ERROR to confirm the connect
    would take the reset's error: the socket would then be neither connected
    nor failed, and no later event would ever answer the CONNECT."""
    server = socket.create_server(("127.0.0.1", 0))
    reset: list[socket.socket] = []

    class ResetOnceConnected:
        """The backend's host socket, whose peer resets the connection as
        soon as getpeername() has shown it established."""

        def __init__(self, sock: socket.socket) -> None:
            self._sock = sock

        def getpeername(self) -> Any:
            name = self._sock.getpeername()
            peer, _ = server.accept()
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()  # RST
            # poll() sees the reset arrive without taking the socket's error.
            arrived = select.poll()
            arrived.register(self._sock.fileno(), select.POLLIN)
            assert arrived.poll(TIMEOUT * 1000)
            reset.append(self._sock)
            return name

        def __getattr__(self, name: str) -> Any:
            return getattr(self._sock, name)

    real_connected = _socket._connected
    monkeypatch.setattr(
        _socket, "_connected",
        lambda sock: real_connected(ResetOnceConnected(sock)))  # type: ignore[arg-type]
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    rsp = raw.response(raw.push_connect(sock_id, server.getsockname(), ring))
    if not reset:
        pytest.skip("connect_ex() completed the connect: no window to reset in")
    if rsp.ret == 0:  # connected, then reset: the data ring says so
        raw.wait(lambda: ring.in_error != 0)
        assert ring.in_error == ECONNRESET
    else:
        assert rsp.ret == ECONNRESET
    assert raw.release(sock_id).ret == 0
    server.close()


def _full_listener() -> tuple[socket.socket, socket.socket]:
    """A host listener whose accept queue is full, and the connection that
    fills it.  The kernel drops every SYN to a listener with a full accept
    queue, retransmissions too, so a connect to it stays in progress until
    the listener accepts."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # room for one connection
    filler = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
    # Readable once the filler is in the accept queue; then it is full:
    # TCP_INFO of a listener has the queue length and its limit.
    assert select.select([listener], [], [], TIMEOUT)[0]
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    queued, limit = struct.unpack_from("=II", info, 24)  # tcpi_unacked, tcpi_sacked
    assert queued > limit
    return listener, filler



def _connecting(raw: RawFrontend, ring: DataRing | None = None,
                ) -> tuple[socket.socket, socket.socket, int, int]:
    """A CONNECT to a full listener (see :func:`_full_listener`), processed
    and in progress: the listener, its filler, the socket's id and the
    CONNECT's req_id."""
    listener, filler = _full_listener()
    sock_id, _ = raw.socket()
    connect_req = raw.push_connect(sock_id, listener.getsockname(), ring or raw.new_ring())
    _, rsp = raw.socket()  # the CONNECT was processed, and is in progress
    assert rsp.ret == 0 and connect_req not in raw.responses
    return listener, filler, sock_id, connect_req


def test_slow_connect_does_not_stall_the_ring(raw: RawFrontend,
                                              backend: pvcalls.Backend) -> None:
    """A connect whose SYN is dropped (full accept queue) stays in progress;
    other commands are answered meanwhile; RELEASE answers it -EINTR first."""
    listener, filler = _full_listener()
    sock_id, _ = raw.socket()
    connect_req = raw.push_connect(sock_id, listener.getsockname(), raw.new_ring())
    # Commands behind it are served at once.
    other, rsp = raw.socket()
    assert rsp.ret == 0
    assert raw.bind(other, ("127.0.0.1", 0)).ret == 0
    assert connect_req not in raw.responses
    # A second CONNECT meanwhile: already in progress.
    again = raw.response(raw.push_connect(sock_id, listener.getsockname(), raw.new_ring()))
    assert again.ret == -114  # EALREADY
    # Its Work woken meanwhile (a notification on its ring, say) finds the
    # connect in progress and answers nothing.
    sock = socket_of(backend, raw, sock_id)
    sock.kick()
    sock.flush()
    raw.poll_responses()
    assert connect_req not in raw.responses
    # Still in progress, and it cannot complete: the queue stays full (the
    # listener never accepts), so the RELEASE is what answers the CONNECT.
    row, = (r for r in backend.stats().sockets if r.id == sock_id)
    assert row.state == "connecting"
    release_req = raw.push_release(sock_id)
    raw.wait(lambda: release_req in raw.responses)
    assert raw.responses.pop(connect_req).ret == EINTR
    assert raw.responses.pop(release_req).ret == 0
    assert raw.arrived[-2:] == [connect_req, release_req]
    assert raw.unexpected == []
    filler.close()
    listener.close()


def test_a_connect_failing_later_is_answered_before_the_release_behind_it(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connect that fails after its CONNECT was processed (its SYN was
    dropped; the listener goes, and the retransmission is refused) is
    answered by the socket's Work.  A RELEASE sent meanwhile is answered
    after it, as the backend promises, even when it comes while the Work
    is about to answer."""
    fe = backend._frontends[(raw.guest.domid, 0)]
    answering, go = threading.Event(), threading.Event()
    under_lock: list[bool] = []
    respond = type(fe).respond

    def held_respond(self: Any, request: Any, ret: int) -> None:
        if request.cmd == _wire.PVCALLS_CONNECT and ret < 0:
            under_lock.append(fe._lock.locked())  # the sockets table's
            answering.set()
            go.wait(TIMEOUT)
        respond(self, request, ret)

    monkeypatch.setattr(type(fe), "respond", held_respond)
    releasing = threading.Event()  # a RELEASE tears the active socket down
    teardown = ActiveSocket.teardown

    def watched_teardown(self: ActiveSocket, *, from_work: bool = False) -> Any:
        if not from_work:
            releasing.set()
        return teardown(self, from_work=from_work)

    monkeypatch.setattr(ActiveSocket, "teardown", watched_teardown)
    listener, filler, sock_id, connect_req = _connecting(raw)
    filler.close()
    listener.close()  # the next SYN is refused
    try:
        assert answering.wait(TIMEOUT)
        release_req = raw.push_release(sock_id)
        if not under_lock[0]:
            # Nothing keeps the RELEASE from the id meanwhile: let it be
            # answered, or start waiting for the Work, before the Work goes on.
            raw.wait(lambda: release_req in raw.responses or releasing.is_set())
    finally:
        go.set()
    raw.wait(lambda: release_req in raw.responses and connect_req in raw.responses)
    assert raw.responses.pop(connect_req).ret == ECONNREFUSED
    assert raw.responses.pop(release_req).ret == 0
    assert raw.arrived[-2:] == [connect_req, release_req]
    assert raw.unexpected == []


def test_a_connect_failing_later_holds_nothing(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any) -> None:
    """A connect failing after its CONNECT was processed gives back, before
    it is answered, all the socket held: the data ring, the event channel,
    the CPU slot; the id is NEW again."""
    listener, filler = _full_listener()
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    before = resources(backend, host)
    connect_req = raw.push_connect(sock_id, listener.getsockname(), ring)
    _, rsp = raw.socket()  # the CONNECT was processed, and is in progress
    assert rsp.ret == 0 and connect_req not in raw.responses
    assert resources(backend, host) != before
    filler.close()
    listener.close()  # the next SYN is refused
    assert raw.response(connect_req).ret == ECONNREFUSED
    assert resources(backend, host) == before
    assert next(r.state for r in backend.stats().sockets if r.id == sock_id) == "new"


def test_a_release_taking_the_id_of_a_failing_connect_frees_it(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A RELEASE that takes the id while the Work is failing its connect
    (after the teardown, before the id goes back to NEW): the Work must not
    put the released id back in the table."""
    failing = PauseAt.in_method(monkeypatch, _Frontend, "connect_failed", "with self._lock:")
    listener, filler, sock_id, connect_req = _connecting(raw)
    filler.close()
    listener.close()  # the next SYN is refused
    assert failing.reached.wait(TIMEOUT)
    try:
        release_req = raw.push_release(sock_id)

        def release_waits_for_the_work() -> bool:
            return any(stands_at(tid, ActiveSocket.teardown, "self.disable_sync()")
                       for tid in sys._current_frames())

        wait_until(release_waits_for_the_work)  # the RELEASE has taken the id
    finally:
        failing.resume()
    raw.wait(lambda: release_req in raw.responses and connect_req in raw.responses)
    assert raw.responses.pop(connect_req).ret == ECONNREFUSED
    assert raw.responses.pop(release_req).ret == 0
    assert [r.id for r in backend.stats().sockets if r.id == sock_id] == []
    assert raw.socket(sock_id)[1].ret == 0  # the id is free


def _connect_in_progress(raw: RawFrontend, backend: pvcalls.Backend, host: Any
                         ) -> tuple[socket.socket, socket.socket, ActiveSocket, Request, Any]:
    """A new socket's CONNECT to a listener whose backlog is full, processed
    and in progress: the listener and what fills it, the backend's socket,
    the request, and the backend's resources before it."""
    listener, filler = _full_listener()
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    before = resources(backend, host)
    connect_req = raw.push_connect(sock_id, listener.getsockname(), ring)
    _, rsp = raw.socket()  # the CONNECT was processed, and is in progress
    assert rsp.ret == 0 and connect_req not in raw.responses
    sock = socket_of(backend, raw, sock_id)
    return listener, filler, sock, connect_req, before


def test_a_bug_while_a_connect_is_in_progress_answers_it_eio(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An exception escaping the socket's Work (a bug of ours) while its
    connect is in progress: the CONNECT is answered -EIO, once, what the
    socket held goes back, and the id is NEW again, as after a connect
    that failed; the traceback is logged once.  (The CONNECT used to wait
    for ever.)"""
    caplog.set_level(logging.ERROR)
    listener, filler, sock, connect_req, before = _connect_in_progress(raw, backend, host)
    sock_id = sock.id

    def finish_connect(self: ActiveSocket) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ActiveSocket, "_finish_connect", finish_connect)
    sock.kick()
    assert raw.response(connect_req).ret == EIO
    assert resources(backend, host) == before
    assert next(r.state for r in backend.stats().sockets if r.id == sock_id) == "new"
    sock.kick()  # woken again: nothing more is answered
    sock.flush()
    raw.poll_responses()
    assert raw.unexpected == [] and connect_req not in raw.responses
    bugs = [r for r in caplog.records if r.name.startswith("pvcalls") and r.exc_info]
    assert len(bugs) == 1 and f"socket {sock_id:#x}" in bugs[0].getMessage()
    assert raw.release(sock_id).ret == 0
    filler.close()
    listener.close()


def test_a_bug_after_a_connect_failed_leaves_the_socket_as_its_failure_did(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An exception escaping the socket's Work after the connect's failure
    tore the socket down and answered the CONNECT: the socket is not
    failed on top of it (its ring is unmapped, its port unbound), nothing
    more is answered, and the bug is the one traceback logged."""
    caplog.set_level(logging.ERROR)
    connect_failed = _Frontend.connect_failed

    def buggy(self: _Frontend, sock: ActiveSocket, request: Request | None, ret: int) -> None:
        connect_failed(self, sock, request, ret)
        raise RuntimeError("a bug")

    monkeypatch.setattr(_Frontend, "connect_failed", buggy)
    listener, filler, sock, connect_req, before = _connect_in_progress(raw, backend, host)
    sock_id = sock.id
    filler.close()
    listener.close()  # the next SYN is refused
    assert raw.response(connect_req).ret == ECONNREFUSED
    sock.flush()  # the run that failed is over
    assert resources(backend, host) == before
    assert next(r.state for r in backend.stats().sockets if r.id == sock_id) == "new"
    logged = [r for r in caplog.records if r.name.startswith("pvcalls") and r.exc_info]
    assert [type(r.exc_info[1]) for r in logged if r.exc_info] == [RuntimeError], \
        [r.getMessage() for r in logged]
    raw.poll_responses()
    assert raw.unexpected == []
    assert raw.release(sock_id).ret == 0


def test_a_connect_whose_completion_cannot_be_watched_is_answered(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A connect completing after its CONNECT was processed, whose host
    socket then cannot stop watching for write space (epoll_ctl failing:
    the host out of memory): the CONNECT is answered -EIO, not left
    unanswered, and the socket holds nothing."""
    # The connect completes within the CONNECT, as on loopback it does,
    # but is taken for one in progress: the Work completes it.
    monkeypatch.setattr(_socket, "_connected", lambda sock: False)
    refused: list[int] = []
    for poller in backend._pollers.values():
        def modify_fd(fd: int, events: int, real: Any = poller.events.modify_fd) -> None:
            if not events & select.EPOLLOUT and not refused:
                refused.append(fd)
                raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
            real(fd, events)

        monkeypatch.setattr(poller.events, "modify_fd", modify_fd)
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    before = resources(backend, host)
    assert raw.response(raw.push_connect(sock_id, echo_server.address, ring)).ret == EIO
    assert len(refused) == 1
    assert resources(backend, host) == before
    assert next(r.state for r in backend.stats().sockets if r.id == sock_id) == "new"
    assert raw.release(sock_id).ret == 0


def test_a_connect_completing_as_it_starts_is_answered(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connect in progress that completes after its host socket is
    watched but before it is CONNECTING: its one edge ran the Work while
    NEW, which only noted the run it missed; the run start_connect queues
    once it is CONNECTING answers it.  Paused before start_connect takes
    the socket's lock for that: paused under it (as this test once was),
    the Work's run waited for the lock until PauseAt's 10 s timeout, and
    then, finding CONNECTING, answered by itself, kick or no kick."""
    starting = PauseAt.in_method(monkeypatch, ActiveSocket, "start_connect",
                                 "with self._lock:", after="ACTIVE_EVENTS_OUT")
    listener, filler = _full_listener()
    sock_id, _ = raw.socket()
    connect_req = raw.push_connect(sock_id, listener.getsockname(), raw.new_ring())
    assert starting.reached.wait(TIMEOUT)
    try:
        sock = socket_of(backend, raw, sock_id)
        filler.close()
        listener.settimeout(TIMEOUT)
        listener.accept()[0].close()  # room: the SYN retransmission completes the connect
        # Its edge came (EPOLLOUT) and ran the Work, still NEW, which noted
        # the run it missed (in the lock that start_connect holds no more).
        wait_until(lambda: sock._missed, timeout=30)
        assert sock.state is SockState.NEW and connect_req not in raw.responses
    finally:
        starting.resume()
    assert raw.response(connect_req).ret == 0
    listener.close()


def test_slow_connect_is_answered_when_it_completes(
        raw: RawFrontend, backend: pvcalls.Backend,
        write_space_watches: list[tuple[int, bool]]) -> None:
    """The same dropped SYN; once the listener makes room, the kernel's SYN
    retransmission (about 1 s) completes the connect and only then does the
    CONNECT get its answer.  EPOLLOUT, which told of the completion, is
    dropped before the answer."""
    ring = raw.new_ring()
    listener, filler, sock_id, connect_req = _connecting(raw, ring)
    filler.close()
    listener.setblocking(False)
    accepted: list[socket.socket] = []

    def answered() -> bool:
        try:
            accepted.append(listener.accept()[0])
        except BlockingIOError:
            pass
        return connect_req in raw.responses

    raw.wait(answered, timeout=30)
    assert raw.responses.pop(connect_req).ret == 0
    sock = backend._frontends[(raw.guest.domid, 0)]._sockets[sock_id]
    assert isinstance(sock, ActiveSocket) and sock.host is not None
    assert write_space_watches == [(sock.host.fileno(), False)]
    raw.send_all(ring, b"late but fine")
    while True:  # ours and the filler (closed: it reads as EOF)
        try:
            accepted.append(listener.accept()[0])
        except BlockingIOError:
            break
    received = set()
    for conn in accepted:
        conn.settimeout(TIMEOUT)
        received.add(conn.recv(64))
        conn.close()
    assert b"late but fine" in received
    listener.close()


# -- BIND / LISTEN / ACCEPT / POLL -------------------------------------------------------

def test_accept_answered_only_when_a_connection_arrives(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    listener, address = raw.listening(backend)
    id_new = raw.new_id()
    ring = raw.new_ring()
    req_id = raw.push_accept(listener, id_new, ring)
    with pytest.raises(TimeoutError):
        raw.wait(lambda: req_id in raw.responses, timeout=0.3)
    # The guest notifies the new ring before there is a connection: the
    # socket has no CPU to run on yet, and nothing to do.
    raw.evtchn.notify(ring.port)
    new = backend._frontends[(raw.guest.domid, 0)]._sockets[id_new]
    assert isinstance(new, ActiveSocket) and new.cpu == -1
    row = next(r for r in backend.stats().sockets if r.id == id_new)
    assert (row.kind, row.state, row.cpu) == ("active", "accepting", None)
    new.kick()  # what the notification does
    client = socket.create_connection(address, timeout=TIMEOUT)  # its recv() below too
    rsp = raw.response(req_id)
    assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_ACCEPT, 0, listener)
    client.sendall(b"ping")
    assert raw.recv_exactly(ring, 4) == b"ping"
    raw.send_all(ring, b"pong")
    assert client.recv(4) == b"pong"
    rows = {r.id: r for r in backend.stats().sockets}
    assert rows[id_new].kind == "active" and rows[id_new].cpu is not None
    assert rows[id_new].state == "connected"
    assert rows[id_new].address == client.getsockname()  # its peer
    client.close()
    raw.wait(lambda: ring.in_error != 0)
    assert ring.in_error == -_errno.ENOTCONN


def test_data_that_came_before_the_accept_is_delivered(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends at once: its data is in the host socket when
    the backend accepts it, and the first edge (epoll_ctl reports it as
    the socket is watched) may run the new socket's Work before it is
    CONNECTED, which then does nothing.  The run queued once the ACCEPT
    is answered delivers it, with no notification from the guest."""
    listener, address = raw.listening(backend)
    client = socket.create_connection(address)
    client.sendall(b"early")
    watched = PauseAt.in_method(monkeypatch, ActiveSocket, "start_accepted",
                                "self.state = SockState.CONNECTED")
    id_new = raw.new_id()
    ring = raw.new_ring()
    req_id = raw.push_accept(listener, id_new, ring)
    assert watched.reached.wait(TIMEOUT)
    try:
        new = socket_of(backend, raw, id_new)
        wait_until(lambda: new._host_ready)  # the edge came, and queued the Work
        new.flush()  # which ran, still ACCEPTING
        assert ring.get(_wire.IN_PROD_OFFSET) == 0
    finally:
        watched.resume()
    assert raw.response(req_id).ret == 0
    got = bytearray()

    def arrived() -> bool:
        got.extend(ring.read(notify=False))  # the guest notifies nothing
        return len(got) >= 5

    raw.wait(arrived)
    assert bytes(got) == b"early"
    client.close()


def test_poll_answered_when_a_connection_is_pending(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    listener, address = raw.listening(backend)
    req_id = raw.push_poll(listener)
    with pytest.raises(TimeoutError):
        raw.wait(lambda: req_id in raw.responses, timeout=0.3)
    client = socket.create_connection(address)
    rsp = raw.response(req_id)
    assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_POLL, 0, listener)
    # POLL did not take the connection: ACCEPT gets it at once.
    ring = raw.new_ring()
    assert raw.response(raw.push_accept(listener, raw.new_id(), ring)).ret == 0
    client.close()


def test_second_accept_or_poll_is_eintr(raw: RawFrontend, backend: pvcalls.Backend) -> None:
    listener, _ = raw.listening(backend)
    first = raw.push_accept(listener, raw.new_id(), raw.new_ring())
    assert raw.response(raw.push_poll(listener)).ret == EINTR
    assert raw.response(raw.push_accept(listener, raw.new_id(), raw.new_ring())).ret == EINTR
    # Refused before its id_new is looked at or its ring mapped: an id_new
    # in use makes it no other error.
    assert raw.response(raw.push_accept(listener, listener, raw.new_ring())).ret == EINTR
    # Releasing the listener answers the ACCEPT in flight, then the RELEASE.
    release = raw.push_release(listener)
    raw.wait(lambda: release in raw.responses)
    assert raw.responses[first].ret == EINTR
    assert raw.responses[release].ret == 0
    assert backend.stats().sockets == ()


@pytest.mark.parametrize("released", ["listener", "id_new"])
def test_an_accept_cancelled_by_a_release_gives_its_id_new_back_before_its_answer(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any,
        monkeypatch: pytest.MonkeyPatch, released: str) -> None:
    """The ACCEPT answered -EINTR by a RELEASE (of its listener or of its
    id_new) gives its id_new's ring back before that answer: a frontend
    ends the grants of the ring as it learns the ACCEPT failed (Linux
    frees the map), and the RELEASE is answered after the ACCEPT."""
    listener, _ = raw.listening(backend)
    ring = raw.new_ring()
    before = resources(backend, host)
    id_new = raw.new_id()
    accept = raw.push_accept(listener, id_new, ring)
    wait_until(lambda: resources(backend, host) != before)  # its ring is mapped
    held: dict[int, tuple[object, ...]] = {}
    real_respond = _Frontend.respond

    def respond(self: _Frontend, request: Request, ret: int) -> None:
        held[request.cmd] = resources(backend, host)
        real_respond(self, request, ret)

    monkeypatch.setattr(_Frontend, "respond", respond)
    assert raw.release(listener if released == "listener" else id_new).ret == 0
    assert raw.response(accept).ret == EINTR
    assert held[_wire.PVCALLS_ACCEPT] == before


@pytest.mark.parametrize("raised", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("released", ["listener", "id_new"])
def test_an_accept_cancelled_by_a_release_is_answered_though_its_id_new_teardown_raised(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        released: str, raised: type[BaseException]) -> None:
    """The teardown of the id_new raising (a bug of ours, or an interrupt)
    still answers the ACCEPT -EINTR, before the RELEASE (-EIO for a bug;
    an interrupt leaves the RELEASE unanswered): the guest must not wait
    for it for ever."""
    listener, _ = raw.listening(backend)
    id_new = raw.new_id()
    teardown = ActiveSocket.teardown

    def raising_teardown(self: ActiveSocket, *, from_work: bool = False) -> Request | None:
        teardown(self, from_work=from_work)
        if self.id == id_new:
            raise raised("in the teardown")
        return None

    accept = raw.push_accept(listener, id_new, raw.new_ring())
    wait_until(lambda: id_new in {row.id for row in backend.stats().sockets})
    monkeypatch.setattr(ActiveSocket, "teardown", raising_teardown)
    release = raw.push_release(listener if released == "listener" else id_new)
    assert raw.response(accept).ret == EINTR
    if raised is RuntimeError:
        assert raw.response(release).ret == EIO
        assert raw.arrived[-2:] == [accept, release]
    assert raw.unexpected == []


def _cut_short_once(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str,
                    raised: BaseException, only: Any = None, *,
                    after: bool = False) -> threading.Event:
    """Make ``owner.name`` raise ``raised`` once (for the argument ``only``,
    if given), without doing its work (with ``after``: as it returns, its
    work done); the event is set when it has."""
    real = getattr(owner, name)
    done = threading.Event()

    def cut(*args: Any, **kwargs: Any) -> Any:
        if not done.is_set() and (only is None or only in args):
            done.set()
            if after:
                real(*args, **kwargs)
            raise raised
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, cut)
    return done


@pytest.mark.parametrize("kind", ["connected", "id_new", "id_new's ACCEPT", "listener"])
def test_a_release_cut_short_leaves_the_socket_to_the_frontend_s_close(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """An interrupt in a step of a RELEASE's teardown (the unbinding of a
    port, the taking back of an id_new's ACCEPT, the unwatching of a
    listener's host socket) leaves what that step held, and the RELEASE
    unanswered: the socket stays in the table, where
    the frontend's close finishes its teardown.  Taken out of the table
    first, it was found by nothing: its port stayed bound (the listener's
    host socket open) for the life of the backend."""
    fe = backend._frontends[(raw.guest.domid, 0)]
    accept = None
    if kind == "connected":
        sock_id, _ = raw.connect_socket(echo_server.address)
        cut = _cut_short_once(monkeypatch, ActiveSocket, "_unbind", KeyboardInterrupt())
    elif kind.startswith("id_new"):
        listener, _ = raw.listening(backend)
        sock_id = raw.new_id()
        accept = raw.push_accept(listener, sock_id, raw.new_ring())
        wait_until(lambda: sock_id in fe._sockets)
        if kind == "id_new":
            cut = _cut_short_once(monkeypatch, ActiveSocket, "_unbind", KeyboardInterrupt())
        else:
            # Not taken back: the listener's teardown, at close, has it.
            cut = _cut_short_once(monkeypatch, PassiveSocket, "flush", KeyboardInterrupt())
            accept = None
    else:
        sock_id, _ = raw.listening(backend)
        passive = fe._sockets[sock_id]
        assert isinstance(passive, PassiveSocket)
        raw.push_poll(sock_id)
        wait_until(lambda: passive.waiting is not None)
        cut = _cut_short_once(monkeypatch, backend.dispatcher, "remove_fd", KeyboardInterrupt(),
                              passive.host.fileno())
    host_socket = fe._sockets[sock_id].host
    release = raw.push_release(sock_id)
    assert cut.wait(TIMEOUT)
    fe._work.flush(timeout=TIMEOUT)  # the RELEASE handled, cut short
    if accept is not None:
        # Answered before the interrupt went on (see the test above).
        assert raw.response(accept).ret == EINTR
    assert release not in raw.responses and sock_id in fe._sockets
    _closed_holds_nothing(raw, backend)
    if host_socket is not None:
        assert host_socket.fileno() == -1


@pytest.mark.parametrize("kind", ["connected", "listener"])
def test_a_release_interrupted_as_any_of_its_calls_returns_leaves_the_socket_to_a_release_again(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any, echo_server: Any,
        kind: str) -> None:
    """A Ctrl-C landing as any call made by _Frontend._release returns
    (the taking of the socket out of the table, its teardown, the putting
    back): the socket is where a RELEASE again finds it, or its teardown
    is done, and once released again nothing is held: its port, its
    pages, its CPU slot, its host socket.  Taken out of the table by the
    call whose return the Ctrl-C landed as, it was in no place anyone
    looks, and held all of it for the life of the backend."""
    from stolensignal import interrupted_as_call_returns

    fe = backend._frontends[(raw.guest.domid, 0)]
    before = resources(backend, host)
    landed = 0
    for n in itertools.count():
        ring = None
        if kind == "connected":
            sock_id, ring = raw.connect_socket(echo_server.address)
        else:
            sock_id, _ = raw.listening(backend)
        host_socket = fe._sockets[sock_id].host
        request = Request(0, _wire.PVCALLS_RELEASE, sock_id)
        interrupted = interrupted_as_call_returns(
            _Frontend._release.__code__, n, lambda request=request: fe._release(request, None))
        if sock_id in fe._sockets:
            assert interrupted, f"not released, interrupted as call {n} returned"
            assert raw.release(sock_id).ret == 0
        if ring is not None:
            ring.close()
        assert resources(backend, host) == before, f"interrupted as call {n} returned"
        assert host_socket is None or host_socket.fileno() == -1
        assert fe._undone == [] and not fe._sockets
        if not interrupted:
            break
        landed += 1
    assert landed >= 3  # the taking out, the teardown, the putting back among them
    assert raw.unexpected == []


@pytest.mark.parametrize("unbind", ["interrupted", "failed"])
def test_a_release_cut_short_as_its_port_is_unbound_leaves_the_number_to_its_next_owner(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, unbind: str) -> None:
    """An interrupt as the unbinding of a connected socket's port returns
    (or after an unbinding that failed, in the next step): the socket, put
    back for a RELEASE again, records that port no more, and the number
    stays its next owner's (a socket connected meanwhile, on the same
    poller).  Recorded still, the RELEASE done again unbound the other
    socket's port."""
    fe = backend._frontends[(raw.guest.domid, 0)]
    first, _ = raw.connect_socket(echo_server.address)
    sock = fe._sockets[first]
    assert isinstance(sock, ActiveSocket) and sock.events is not None
    port = sock.port
    if unbind == "interrupted":
        cut = _cut_short_once(monkeypatch, sock.events, "unbind", KeyboardInterrupt(), port,
                              after=True)
    else:
        _cut_short_once(monkeypatch, sock.events, "unbind", OSError(errno.EIO, "unbind failed"),
                        port, after=True)
        cut = _cut_short_once(monkeypatch, _socket.DataRing, "close", KeyboardInterrupt(),
                              sock.ring)
    release = raw.push_release(first)
    assert cut.wait(TIMEOUT)
    fe._work.flush(timeout=TIMEOUT)  # the RELEASE handled, cut short
    assert fe._sockets.get(first) is sock
    second, ring = raw.connect_socket(echo_server.address)
    other = fe._sockets[second]
    assert isinstance(other, ActiveSocket)
    assert (other.port, other.events) == (port, sock.events)  # the number given again
    assert raw.release(first).ret == 0
    assert port in sock.events.ports
    raw.send_all(ring, b"still bound")
    assert raw.recv_exactly(ring, 11) == b"still bound"
    assert release not in raw.responses
    assert raw.unexpected == []


def _running(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> Callable[[], bool]:
    """Wrap ``owner``'s function ``name`` (a class's method, or a module's
    function) and return whether a call of it is under way: a sweep's
    ``unless``, so that it lands inside that call only."""
    real = getattr(owner, name)
    depth = 0

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal depth
        depth += 1
        try:
            return real(*args, **kwargs)
        finally:
            depth -= 1

    monkeypatch.setattr(owner, name, counted)
    return lambda: depth > 0


@pytest.mark.parametrize("code", [pvcalls, xenback], ids=["pvcalls", "xenback"])
def test_a_release_cut_short_anywhere_in_its_unbinding_leaves_no_port_bound(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, code: types.ModuleType) -> None:
    """A Ctrl-C landing anywhere in the unbinding of a connected socket's
    port, in ``code`` (not in the handle's frames: see EventDispatcher.
    unbind): the RELEASE done again leaves nothing of the socket held.
    Off the record before the unbind, the port was left bound by one
    landing as the unbind started, known to nobody, until the poller's
    dispatcher closed with the backend."""
    from stolensignal import interrupted_at

    fe = backend._frontends[(raw.guest.domid, 0)]
    within = os.path.dirname(code.__file__)
    besides = (os.path.join(within, "sim"), os.path.join(within, "platform.py"))
    unbinding = _running(monkeypatch, ActiveSocket, "_unbind")
    landed = 0
    for n in itertools.count():
        before = resources(backend, host)
        sock_id, ring = raw.connect_socket(echo_server.address)
        req = ffi.new("struct xen_pvcalls_request *")
        req.u.release.id = sock_id
        request = Request(10000 + n, _wire.PVCALLS_RELEASE, sock_id)

        def call(request: Request = request, req: Any = req) -> None:
            assert _Frontend._release(fe, request, req) == 0

        where = interrupted_at(n, within, call, lambda: not unbinding(), besides=besides)
        if where:
            assert sock_id in fe._sockets, where
            assert raw.release(sock_id).ret == 0, where
        ring.close()
        assert resources(backend, host) == before, where
        if not where:
            break
        landed += 1
    assert landed >= 3  # unbind_quietly's start among them
    assert raw.unexpected == []


def test_a_release_of_a_connecting_socket_cut_short_leaves_its_connect_to_the_next(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt in a step of the teardown of a socket whose CONNECT is
    in progress (as its port is unbound): the RELEASE, cut short, is not
    answered and the socket is put back with its CONNECT, which the
    RELEASE done again answers -EINTR first, as any RELEASE of a connecting
    socket.  Taken at the start of the teardown cut short, the CONNECT was
    lost with the interrupt, and never answered."""
    listener, filler, sock_id, connect_req = _connecting(raw)
    fe = backend._frontends[(raw.guest.domid, 0)]
    cut = _cut_short_once(monkeypatch, ActiveSocket, "_unbind", KeyboardInterrupt(), after=True)
    release = raw.push_release(sock_id)
    assert cut.wait(TIMEOUT)
    fe._work.flush(timeout=TIMEOUT)  # the RELEASE handled, cut short
    raw.poll_responses()
    assert release not in raw.responses and connect_req not in raw.responses
    assert fe._sockets.get(sock_id) is not None
    again = raw.push_release(sock_id)
    raw.wait(lambda: again in raw.responses)
    assert raw.responses.pop(connect_req).ret == EINTR
    assert raw.responses.pop(again).ret == 0
    assert raw.arrived[-2:] == [connect_req, again]
    assert sock_id not in {row.id for row in backend.stats().sockets}
    assert raw.unexpected == []
    filler.close()
    listener.close()


@pytest.mark.parametrize("kind", ["listener", "connecting"])
def test_a_release_cut_short_as_the_teardown_returns_answers_what_it_took(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        kind: str) -> None:
    """An interrupt as the teardown of a RELEASE returns, everything done
    and the request in flight on the socket taken (a listener's ACCEPT, a
    connecting socket's CONNECT): that request is answered -EINTR all the
    same (an ACCEPT's id_new given back), the RELEASE, cut short, is not,
    and the RELEASE done again finishes.  Lost with the interrupt in the
    value teardown() returned, it was never answered."""
    fe = backend._frontends[(raw.guest.domid, 0)]
    held: list[socket.socket] = []
    id_new = None
    if kind == "listener":
        sock_id, _ = raw.listening(backend)
        id_new = raw.new_id()
        waiting = raw.push_accept(sock_id, id_new, raw.new_ring())
        wait_until(lambda: id_new in fe._sockets)
        cls: Any = PassiveSocket
    else:
        listener, filler, sock_id, waiting = _connecting(raw)
        held += [listener, filler]
        cls = ActiveSocket
    cut = _cut_short_once(monkeypatch, cls, "teardown", KeyboardInterrupt(), fe._sockets[sock_id],
                          after=True)
    release = raw.push_release(sock_id)
    assert raw.response(waiting).ret == EINTR
    assert cut.is_set()
    fe._work.flush(timeout=TIMEOUT)  # the RELEASE handled, cut short
    raw.poll_responses()
    assert release not in raw.responses and sock_id in fe._sockets
    assert id_new not in fe._sockets
    assert raw.release(sock_id).ret == 0
    assert raw.arrived.count(waiting) == 1  # not again by the RELEASE done again
    assert sock_id not in {row.id for row in backend.stats().sockets}
    assert raw.unexpected == []
    for s in held:
        s.close()


def test_a_frontend_s_close_cut_short_as_its_port_is_unbound_leaves_the_number_to_its_next_owner(
        make_frontend: Any, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt as the unbinding of a frontend's command port returns
    (a Ctrl-C in Backend.close(), which closes the frontends their devices
    left): the close() done again unbinds that number no more, and it stays
    its next owner's (another frontend's command port, on the same shared
    dispatcher).  Recorded still, the close() done again unbound the other
    frontend's port, which was never served again."""
    first = make_frontend("first")
    fe = backend._frontends[(first.guest.domid, 0)]
    port = fe.port
    cut = _cut_short_once(monkeypatch, backend.dispatcher, "unbind", KeyboardInterrupt(), port,
                          after=True)
    with pytest.raises(KeyboardInterrupt):
        fe.close()
    assert cut.is_set() and port not in backend.dispatcher.ports
    second = make_frontend("second")
    other = backend._frontends[(second.guest.domid, 0)]
    assert other.port == port  # the number given again
    fe.close()
    assert port in backend.dispatcher.ports
    _, answer = second.socket()
    assert answer.ret == 0
    assert first.unexpected == [] and second.unexpected == []


@pytest.mark.parametrize("code", [pvcalls, xenback], ids=["pvcalls", "xenback"])
def test_a_frontend_s_close_cut_short_anywhere_in_its_unbinding_leaves_no_port_bound(
        make_frontend: Any, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        code: types.ModuleType) -> None:
    """A Ctrl-C landing anywhere in the unbinding of a frontend's command
    port, in ``code`` (not in the handle's frames: see EventDispatcher.
    unbind): the close() done again leaves the port unbound.  Off the
    record before the unbind, the port was left bound by one landing as
    the unbind started, until the backend's dispatcher closed."""
    from stolensignal import interrupted_at

    within = os.path.dirname(code.__file__)
    besides = (os.path.join(within, "sim"), os.path.join(within, "platform.py"))
    unbinding = _running(monkeypatch, pvcalls._backend, "unbind_quietly")
    landed = 0
    for n in itertools.count():
        guest = make_frontend(f"guest{n}")
        fe = backend._frontends[(guest.guest.domid, 0)]
        port = fe.port
        where = interrupted_at(n, within, fe.close, lambda: not unbinding(), besides=besides)
        fe.close()
        assert port not in backend.dispatcher.ports, where
        assert guest.unexpected == []
        if not where:
            break
        landed += 1
    assert landed >= 2  # unbind_quietly's start among them


def _called_from(func: Any) -> bool:
    """Whether the calling thread is inside ``func``."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is func.__code__:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class _CutLock:
    """``real``, a lock, whose taking (``on="enter"``: not taken, as a
    Ctrl-C ends an acquire) or letting go (``on="exit"``: as it returns)
    by a with statement of ``func`` itself raises KeyboardInterrupt once,
    as Ctrl-C would; only once ``armed`` is set, if given.  ``cut`` is set
    once it did."""

    def __init__(self, real: Any, func: Any, *, on: str = "exit",
                 armed: threading.Event | None = None) -> None:
        self.real, self.code, self.on, self.armed = real, func.__code__, on, armed
        self.cut = threading.Event()

    def _now(self, where: str) -> bool:
        if (self.cut.is_set() or where != self.on or sys._getframe(2).f_code is not self.code
                or (self.armed is not None and not self.armed.is_set())):
            return False
        self.cut.set()
        return True

    def __enter__(self) -> Any:
        if self._now("enter"):
            raise KeyboardInterrupt
        return self.real.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.real.__exit__(*exc)
        if self._now("exit"):
            raise KeyboardInterrupt


def _cut_wait_in(monkeypatch: pytest.MonkeyPatch, func: Any) -> threading.Event:
    """The first wait for a run (a workqueue Completion) inside ``func``
    raises KeyboardInterrupt, as Ctrl-C would; the Event is set once it
    did."""
    cut = threading.Event()

    class CutShort(_work.Completion):
        def wait(self, timeout: float | None = None) -> bool:
            if cut.is_set() or not _called_from(func):
                return super().wait(timeout)
            cut.set()
            raise KeyboardInterrupt

    monkeypatch.setattr(_work, "Completion", CutShort)
    return cut


def _held_listener_runs(monkeypatch: pytest.MonkeyPatch,
                        ) -> tuple[threading.Event, threading.Event]:
    """Hold every listener's run (PassiveSocket._serve) until the second
    Event is set; the first is set as one is held."""
    running, go_on = threading.Event(), threading.Event()
    serve = PassiveSocket._serve

    def held_serve(self: PassiveSocket, *args: Any) -> int | None:
        if not go_on.is_set():
            running.set()
            go_on.wait(TIMEOUT)
        return serve(self, *args)

    monkeypatch.setattr(PassiveSocket, "_serve", held_serve)
    return running, go_on


def test_a_release_of_an_id_new_cut_short_waiting_for_its_listener_leaves_it_enabled(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt while the RELEASE of an ACCEPT's id_new waits for the
    listener's run in progress: the listener's Work is enabled again, and
    its ACCEPT answered once a connection arrives.  disable_sync() keeps
    its disable when its wait is cut short (the disable is the caller's):
    taken outside the try that enables it again, the listener stayed
    disabled for good, and every ACCEPT or POLL on it waited for ever."""
    listener, address = raw.listening(backend)
    fe = backend._frontends[(raw.guest.domid, 0)]
    passive = fe._sockets[listener]
    assert isinstance(passive, PassiveSocket)
    running, go_on = _held_listener_runs(monkeypatch)
    id_new = raw.new_id()
    accept = raw.push_accept(listener, id_new, raw.new_ring())
    assert running.wait(TIMEOUT)
    cut = _cut_wait_in(monkeypatch, _Frontend._cancel_accept)
    release = raw.push_release(id_new)
    assert cut.wait(TIMEOUT)
    go_on.set()
    fe._work.flush(timeout=TIMEOUT)  # the RELEASE handled, cut short
    # The held run over before the connection comes, else it accepts it.
    passive.flush(timeout=TIMEOUT)
    assert release not in raw.responses and id_new in fe._sockets
    client = socket.create_connection(address, timeout=TIMEOUT)
    with client:
        assert raw.response(accept).ret == 0
        row = next(r for r in backend.stats().sockets if r.id == id_new)
        assert row.state == "connected"
    assert raw.unexpected == []


@pytest.mark.parametrize(("command", "finish"),
                         [("accept", "release"), ("poll", "close"), ("listen", "release")])
def test_a_listener_s_release_cut_short_waiting_for_its_run_refuses_what_follows(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        command: str, finish: str) -> None:
    """An interrupt while a listener's RELEASE waits for the listener's run
    in progress (its teardown's disable_sync(), which keeps its disable):
    the socket is put back CLOSED, so an ACCEPT, POLL or LISTEN sent after
    that unanswered RELEASE is refused at once (-EINVAL, as on a socket
    not listening), and the RELEASE done again, or the frontend's close,
    finishes it.  Put back
    LISTENING, an ACCEPT or POLL was taken and waited for a run of the
    disabled Work, which never came, until the frontend closed."""
    listener, address = raw.listening(backend)
    fe = backend._frontends[(raw.guest.domid, 0)]
    passive = fe._sockets[listener]
    assert isinstance(passive, PassiveSocket)
    running, go_on = _held_listener_runs(monkeypatch)
    poll = raw.push_poll(listener)
    assert running.wait(TIMEOUT)
    cut = _cut_wait_in(monkeypatch, PassiveSocket.teardown)
    release = raw.push_release(listener)
    assert cut.wait(TIMEOUT)
    fe._work.flush(timeout=TIMEOUT)  # the RELEASE handled, cut short
    with socket.create_connection(address, timeout=TIMEOUT):
        # The held run answers its POLL (a connection is there) and ends:
        # nothing is in flight on the listener any more.
        go_on.set()
        assert raw.response(poll).ret == 0
        passive.flush(timeout=TIMEOUT)
        assert passive.waiting is None and fe._sockets.get(listener) is passive
        if command == "accept":
            answer = raw.response(raw.push_accept(listener, raw.new_id(), raw.new_ring()))
        elif command == "poll":
            answer = raw.response(raw.push_poll(listener))
        else:
            answer = raw.listen(listener)
        assert answer.ret == EINVAL
        if finish == "release":
            assert raw.release(listener).ret == 0
            assert backend.stats().sockets == ()
        else:
            raw.close()
            assert backend.stats().frontends == 0
    assert release not in raw.responses
    assert passive.host.fileno() == -1 and watched_fds(backend) == []
    assert raw.unexpected == []


def test_a_connected_socket_s_release_cut_short_waiting_for_its_run_still_sends_what_it_holds(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt while a connected socket's RELEASE waits for the
    socket's run in progress (its teardown's disable_sync(), which keeps
    its disable): the socket is put back still CONNECTED (unlike a
    listener, which goes back CLOSED: nothing a guest sends to an active
    id waits for its Work), and the RELEASE done again sends the peer what
    the out ring held.  Put back CLOSED, the RELEASE done again took it
    for a socket that never connected and closed the connection without
    that flush: the guest's last bytes were lost."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock_id, ring = raw.connect_socket(server.getsockname())
        peer, _ = server.accept()
    fe = backend._frontends[(raw.guest.domid, 0)]
    sock = socket_of(backend, raw, sock_id)
    with peer:
        sock.flush()  # its Work idle: the run below is the one the RELEASE waits for
        running, go_on = threading.Event(), threading.Event()
        rx = ActiveSocket._rx

        def held_rx(self: ActiveSocket, *args: Any) -> int:
            if self is sock and not go_on.is_set():
                running.set()
                go_on.wait(TIMEOUT)
            return rx(self, *args)

        monkeypatch.setattr(ActiveSocket, "_rx", held_rx)
        sock.kick()
        assert running.wait(TIMEOUT)  # past its send: the bytes below wait for the RELEASE
        assert ring.write(b"unsent", notify=False) == 6
        cut = _cut_wait_in(monkeypatch, ActiveSocket.teardown)
        release = raw.push_release(sock_id)
        assert cut.wait(TIMEOUT)
        fe._work.flush(timeout=TIMEOUT)  # the RELEASE handled, cut short
        go_on.set()
        sock.flush(timeout=TIMEOUT)  # the held run is over, and none follows
        assert fe._sockets.get(sock_id) is sock
        row = next(r for r in backend.stats().sockets if r.id == sock_id)
        assert row.state == "connected"
        assert raw.release(sock_id).ret == 0
        assert backend.stats().sockets == ()
        peer.settimeout(TIMEOUT)
        got = b""
        while chunk := peer.recv(64):
            got += chunk
    assert got == b"unsent"
    assert release not in raw.responses
    assert raw.unexpected == []


@pytest.mark.parametrize("where", ["enable", "lock", "return", "append"])
def test_a_release_of_an_id_new_cut_short_as_its_listener_is_enabled_answers_the_accept(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        where: str) -> None:
    """An interrupt as the RELEASE of an ACCEPT's id_new takes that ACCEPT
    off the listener (as the listener's lock is let go, as the listener is
    enabled again, as the taking returns to the RELEASE, or as the ACCEPT
    goes into the RELEASE's list): the ACCEPT is answered -EINTR all the
    same, once (the RELEASE, cut short, is not), the RELEASE done again
    finishes the id_new, and the listener serves the next ACCEPT.  Lost
    with the interrupt, the ACCEPT was never answered; left on the
    listener as well as in the list, it was answered twice."""
    listener, address = raw.listening(backend)
    fe = backend._frontends[(raw.guest.domid, 0)]
    passive = fe._sockets[listener]
    assert isinstance(passive, PassiveSocket)
    id_new = raw.new_id()
    accept = raw.push_accept(listener, id_new, raw.new_ring())
    wait_until(lambda: id_new in fe._sockets)
    if where == "enable":
        cut = _cut_short_once(monkeypatch, PassiveSocket, "enable", KeyboardInterrupt(),
                              passive, after=True)
    elif where == "return":
        cut = _cut_short_once(monkeypatch, _Frontend, "_cancel_accept", KeyboardInterrupt(),
                              after=True)
    elif where == "append":
        cut = threading.Event()
        cancel_accept = _Frontend._cancel_accept

        class CutAppend:
            """The RELEASE's list, whose append is cut short once, as it
            returns."""

            def __init__(self, real: list[Any]) -> None:
                self.real = real

            def append(self, item: Any) -> None:
                self.real.append(item)
                if not cut.is_set():
                    cut.set()
                    raise KeyboardInterrupt

        def cut_append(fe_: Any, parent: Any, new: Any, into: list[Any]) -> None:
            cancel_accept(fe_, parent, new, CutAppend(into))

        monkeypatch.setattr(_Frontend, "_cancel_accept", cut_append)
    else:
        # The listener's lock, whose release in _cancel_accept is cut short
        # once, as it returns.
        lock = _CutLock(passive._lock, _Frontend._cancel_accept)
        cut = lock.cut
        monkeypatch.setattr(passive, "_lock", lock)
    release = raw.push_release(id_new)
    assert raw.response(accept).ret == EINTR
    assert cut.is_set()
    fe._work.flush(timeout=TIMEOUT)  # the RELEASE handled, cut short
    assert id_new in fe._sockets
    assert raw.release(id_new).ret == 0
    assert release not in raw.responses
    again = raw.push_accept(listener, raw.new_id(), raw.new_ring())
    with socket.create_connection(address, timeout=TIMEOUT):
        assert raw.response(again).ret == 0
    assert raw.arrived.count(accept) == 1
    assert raw.unexpected == []


def test_a_release_of_an_id_new_whose_listener_cannot_be_kicked_gives_everything_back(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener's run after its ACCEPT was taken back cannot be queued
    (its workqueue destroyed, say): the ACCEPT it took is answered -EINTR
    all the same, the id_new's ring and port given back, and the RELEASE
    answered -EIO.  Raising as it was taken back, it left the ACCEPT
    unanswered for ever and the id_new's ring mapped."""
    listener, _ = raw.listening(backend)
    ring = raw.new_ring()
    before = resources(backend, host)
    id_new = raw.new_id()
    accept = raw.push_accept(listener, id_new, ring)
    fe = backend._frontends[(raw.guest.domid, 0)]
    wait_until(lambda: id_new in fe._sockets)
    fe._work.flush(timeout=TIMEOUT)  # the ACCEPT's own kick done
    _cut_short_once(monkeypatch, PassiveSocket, "kick",
                    RuntimeError("workqueue 'pvcalls-cmd' is destroyed"))
    release = raw.push_release(id_new)
    assert raw.response(accept).ret == EINTR
    assert raw.response(release).ret == EIO
    assert raw.arrived[-2:] == [accept, release]
    assert resources(backend, host) == before
    assert [row.id for row in backend.stats().sockets] == [listener]
    assert raw.unexpected == []


def test_a_release_of_an_id_new_cut_short_whose_listener_cannot_be_kicked_stays_cut_short(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The teardown of an ACCEPT's id_new cut short (an interrupt as its
    port is unbound), and the listener's run after it refused (its
    workqueue destroyed): the interrupt goes on, the refusal is logged.
    The ACCEPT is answered -EINTR, the RELEASE not, the id_new put back
    for the RELEASE done again.  The refusal replaced the interrupt: the
    RELEASE was answered -EIO, as if released, for a socket still held."""
    listener, _ = raw.listening(backend)
    fe = backend._frontends[(raw.guest.domid, 0)]
    id_new = raw.new_id()
    accept = raw.push_accept(listener, id_new, raw.new_ring())
    wait_until(lambda: id_new in fe._sockets)
    fe._work.flush(timeout=TIMEOUT)  # the ACCEPT's own kick done
    cut = _cut_short_once(monkeypatch, ActiveSocket, "_unbind", KeyboardInterrupt())
    _cut_short_once(monkeypatch, PassiveSocket, "kick",
                    RuntimeError("workqueue 'pvcalls-cmd' is destroyed"))
    release = raw.push_release(id_new)
    assert raw.response(accept).ret == EINTR
    assert cut.is_set()
    fe._work.flush(timeout=TIMEOUT)  # the RELEASE handled, cut short
    raw.poll_responses()
    assert release not in raw.responses and id_new in fe._sockets
    refused = [r for r in caplog.records
               if r.exc_info is not None and isinstance(r.exc_info[1], RuntimeError)]
    assert len(refused) == 1 and refused[0].name == "pvcalls._backend"
    assert raw.release(id_new).ret == 0
    assert [row.id for row in backend.stats().sockets] == [listener]
    assert raw.unexpected == []


@pytest.mark.parametrize("waiting", ["accept", "poll"])
def test_a_listener_whose_host_socket_fails_to_close_answers_what_waits_on_it(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any,
        monkeypatch: pytest.MonkeyPatch, waiting: str) -> None:
    """close() of the listener's host socket fails (after letting go of the
    descriptor, as Linux's close does): logged, and the teardown goes on as
    an active socket's does, so the ACCEPT or POLL it took is answered
    -EINTR, the ACCEPT's id_new given back, and the RELEASE answered 0.
    Raising, it lost them: the guest waited for ever, its id_new held
    until the frontend closed."""
    fe = backend._frontends[(raw.guest.domid, 0)]
    listener, _ = raw.listening(backend)
    passive = fe._sockets[listener]
    assert isinstance(passive, PassiveSocket)
    ring = raw.new_ring()
    before = resources(backend, host)
    if waiting == "accept":
        pending = raw.push_accept(listener, raw.new_id(), ring)
    else:
        pending = raw.push_poll(listener)
    wait_until(lambda: passive.waiting is not None)
    close = socket.socket.close

    def failing_close(sock: socket.socket) -> None:
        close(sock)
        if sock is passive.host:
            raise OSError(errno.EIO, "close failed")

    monkeypatch.setattr(socket.socket, "close", failing_close)
    release = raw.push_release(listener)
    assert raw.response(pending).ret == EINTR
    assert raw.response(release).ret == 0
    assert raw.arrived[-2:] == [pending, release]
    assert passive.host.fileno() == -1
    assert resources(backend, host) == before
    assert backend.stats().sockets == ()
    assert raw.unexpected == []


@pytest.mark.parametrize("where", ["unwatching", "closing"])
def test_a_listener_s_teardown_cut_short_leaves_what_waits_to_the_next(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, where: str) -> None:
    """An interrupt as the listener's host socket is unwatched (it stays
    open: it may still be watched) or before it is closed: the POLL in
    flight stays the socket's, and the teardown done again closes the host
    socket and hands on the POLL, for its caller to answer.  Taken first,
    it was lost with the interrupt.  A host socket unwatched already is
    no failure of the teardown done again: nothing logged."""
    listener, _ = raw.listening(backend)
    passive = backend._frontends[(raw.guest.domid, 0)]._sockets[listener]
    assert isinstance(passive, PassiveSocket)
    poll = raw.push_poll(listener)
    wait_until(lambda: passive.waiting is not None)
    fd = passive.host.fileno()
    if where == "unwatching":
        _cut_short_once(monkeypatch, backend.dispatcher, "remove_fd", KeyboardInterrupt(), fd)
    else:
        _cut_short_once(monkeypatch, socket.socket, "close", KeyboardInterrupt(), passive.host)
    with pytest.raises(KeyboardInterrupt):
        passive.teardown()
    assert passive.host.fileno() == fd
    assert (fd in watched_fds(backend)) is (where == "unwatching")
    caplog.clear()
    taken: list[Any] = []
    passive.teardown(taken)
    assert [request.req_id for request, _ in taken] == [poll]
    assert passive.host.fileno() == -1 and fd not in watched_fds(backend)
    passive.teardown(taken)
    assert len(taken) == 1
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_release_of_accept_id_new_answers_the_accept(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    listener, address = raw.listening(backend)
    id_new = raw.new_id()
    accept = raw.push_accept(listener, id_new, raw.new_ring())
    release = raw.push_release(id_new)
    raw.wait(lambda: release in raw.responses)
    assert raw.responses.pop(accept).ret == EINTR
    assert raw.responses.pop(release).ret == 0
    # The listener is intact: the cancelled ACCEPT no longer counts as in
    # flight, so a new one is taken (not -EINTR) and gets the next connection.
    again = raw.push_accept(listener, raw.new_id(), raw.new_ring())
    with socket.create_connection(address, timeout=TIMEOUT):
        assert raw.response(again).ret == 0
    assert raw.unexpected == []


def test_release_of_id_new_while_its_accept_completes(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """RELEASE of id_new arriving while the listener's Work takes over the
    connection: the ACCEPT is answered first, then the RELEASE, and the
    socket leaves no CPU slot behind."""
    listener, address = raw.listening(backend)
    id_new = raw.new_id()
    inside, go_on = threading.Event(), threading.Event()
    place = ActiveSocket.place

    def place_when_told(self: ActiveSocket) -> None:
        if self.id == id_new:  # in start_accepted, on the listener's Work
            inside.set()
            go_on.wait(TIMEOUT)
        place(self)

    monkeypatch.setattr(ActiveSocket, "place", place_when_told)
    accept = raw.push_accept(listener, id_new, raw.new_ring())
    with socket.create_connection(address, timeout=TIMEOUT):
        assert inside.wait(TIMEOUT)
        release = raw.push_release(id_new)
        # The RELEASE is being processed once it waits for the listener's
        # run (the id leaves the table only once it is torn down).
        wait_until(lambda: any(stands_at(tid, _Frontend._cancel_accept, "parent.flush()")
                               for tid in sys._current_frames()))
        go_on.set()
        raw.wait(lambda: accept in raw.responses and release in raw.responses)
    assert raw.responses[accept].ret == 0
    assert raw.responses[release].ret == 0
    assert raw.unexpected == []
    assert sum(cpu.sockets for cpu in backend.stats().cpus) == 0


def test_release_of_an_accepted_id_new_keeps_the_next_accept_awake(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """RELEASE of an id_new whose ACCEPT the listener's Work is still
    finishing, with the next ACCEPT waiting and a connection queued: the
    RELEASE waits for that Work, and the run queued for the next ACCEPT
    (and the connection's wake-up) is not lost with it."""
    on_event = PassiveSocket._on_event
    edges = []

    def counting_on_event(self: PassiveSocket, *args: object) -> None:
        on_event(self, *args)
        edges.append(self)

    monkeypatch.setattr(PassiveSocket, "_on_event", counting_on_event)
    listener, address = raw.listening(backend)
    passive = backend._frontends[(raw.guest.domid, 0)]._sockets[listener]
    assert isinstance(passive, PassiveSocket)
    inside, go_on = threading.Event(), threading.Event()
    respond = _Frontend.respond

    def respond_then_hold(self: _Frontend, request: Request, ret: int) -> None:
        respond(self, request, ret)
        if request.cmd == _wire.PVCALLS_ACCEPT and not inside.is_set():
            inside.set()  # on the listener's Work, before it lets go of id_new
            go_on.wait(TIMEOUT)

    monkeypatch.setattr(_Frontend, "respond", respond_then_hold)
    first = raw.new_id()
    accept = raw.push_accept(listener, first, raw.new_ring())
    with contextlib.ExitStack() as clients:
        clients.enter_context(socket.create_connection(address, timeout=TIMEOUT))
        assert inside.wait(TIMEOUT)
        assert raw.response(accept).ret == 0
        # A second connection waits in the backlog; its edge has come.
        seen = len(edges)
        clients.enter_context(socket.create_connection(address, timeout=TIMEOUT))
        wait_until(lambda: len(edges) > seen)
        again = raw.push_accept(listener, raw.new_id(), raw.new_ring())
        wait_until(lambda: passive.waiting is not None and passive.waiting[0].req_id == again)
        release = raw.push_release(first)
        wait_until(lambda: passive.disabled)  # the RELEASE waits for the Work
        go_on.set()
        assert raw.response(release).ret == 0
        assert raw.response(again).ret == 0
    assert raw.unexpected == []


def test_accept_id_new_in_use(raw: RawFrontend, backend: pvcalls.Backend) -> None:
    listener, _ = raw.listening(backend)
    existing, _ = raw.socket()
    assert raw.response(raw.push_accept(listener, existing, raw.new_ring())).ret == EEXIST


def test_listen_and_accept_need_the_right_state(raw: RawFrontend, backend: pvcalls.Backend,
                                                 echo_server: Any) -> None:
    fresh, _ = raw.socket()
    assert raw.listen(fresh).ret == EINVAL
    assert raw.response(raw.push_accept(fresh, raw.new_id(), raw.new_ring())).ret == EINVAL
    bound, _ = raw.socket()
    assert raw.bind(bound, ("127.0.0.1", 0)).ret == 0
    assert raw.response(raw.push_poll(bound)).ret == EINVAL
    assert raw.bind(bound, ("127.0.0.1", 0)).ret == EINVAL
    assert raw.response(raw.push_connect(bound, echo_server.address, raw.new_ring())).ret == EINVAL
    active, ring = raw.connect_socket(echo_server.address)
    assert raw.bind(active, ("127.0.0.1", 0)).ret == EINVAL
    # A connected socket cannot be made to listen, nor waited on as one.
    assert raw.listen(active).ret == EINVAL
    assert raw.response(raw.push_poll(active)).ret == EINVAL
    assert raw.response(raw.push_accept(active, raw.new_id(), raw.new_ring())).ret == EINVAL
    # ... and none of those harmed it.
    raw.echo(ring, b"still connected")


def test_bind_address_in_use(raw: RawFrontend, monkeypatch: pytest.MonkeyPatch) -> None:
    """EADDRINUSE; the host socket made for it is closed then, not left to
    the garbage collector (the test holds it, as a cycle could)."""
    made: list[socket.socket] = []

    class Recorded(socket.socket):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.append(self)

    module = types.SimpleNamespace(**vars(socket))
    module.socket = Recorded
    monkeypatch.setattr(pvcalls._backend, "socket", module)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    sock_id, _ = raw.socket()
    assert raw.bind(sock_id, taken.getsockname()).ret == -98  # EADDRINUSE
    taken.close()
    assert len(made) == 1 and made[0].fileno() == -1


def test_listen_on_a_port_another_socket_listens_on(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """BIND sets SO_REUSEADDR, so two sockets may bind one port; only one
    may listen on it.  The other's LISTEN fails and leaves it bound, ready
    to listen once the port is free."""
    first, _ = raw.socket()
    assert raw.bind(first, ("127.0.0.1", 0)).ret == 0
    address = address_of(backend, first)
    second, _ = raw.socket()
    assert raw.bind(second, address).ret == 0
    assert raw.listen(first).ret == 0
    rsp = raw.listen(second)
    assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_LISTEN, EADDRINUSE, second)
    rows = {r.id: r for r in backend.stats().sockets}
    assert (rows[second].kind, rows[second].state) == ("passive", "bound")
    assert rows[first].state == "listening"
    # Nor is it watched: the failed listen() took back the watch LISTEN added.
    passive = backend._frontends[(raw.guest.domid, 0)]._sockets[second]
    assert isinstance(passive, PassiveSocket)
    assert passive.host.fileno() not in backend.dispatcher._fds
    assert raw.release(first).ret == 0
    assert raw.listen(second).ret == 0
    assert passive.host.fileno() in backend.dispatcher._fds  # watched again
    accept = raw.push_accept(second, raw.new_id(), raw.new_ring())
    # The ACCEPT waits, its connection to come: only the edge can answer it.
    _, rsp = raw.socket()
    assert rsp.ret == 0
    passive.flush()
    assert accept not in raw.responses
    with socket.create_connection(address, timeout=TIMEOUT):
        assert raw.response(accept).ret == 0


def test_a_listen_whose_socket_cannot_be_watched_leaves_it_bound(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listening socket cannot join the event thread's epoll set: LISTEN
    is answered with that errno and leaves the socket as it was, bound and
    not listening, on the host too (a connection there is refused, not
    queued for an ACCEPT that could never be told of it).  ACCEPT and POLL
    are -EINVAL as on any socket not listening, rather than taken and never
    answered; the LISTEN retried once the host recovers works."""
    sock_id, _ = raw.socket()
    assert raw.bind(sock_id, ("127.0.0.1", 0)).ret == 0
    address = address_of(backend, sock_id)
    refused = _fail_add_fd_once(monkeypatch, backend.dispatcher)
    rsp = raw.listen(sock_id)
    assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_LISTEN, ENOMEM, sock_id)
    assert len(refused) == 1
    row, = backend.stats().sockets
    assert (row.kind, row.state) == ("passive", "bound")
    passive = backend._frontends[(raw.guest.domid, 0)]._sockets[sock_id]
    assert isinstance(passive, PassiveSocket)
    assert passive.host.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=TIMEOUT).close()
    rsp = raw.response(raw.push_accept(sock_id, raw.new_id(), raw.new_ring()))
    assert (rsp.cmd, rsp.ret) == (_wire.PVCALLS_ACCEPT, EINVAL)
    rsp = raw.response(raw.push_poll(sock_id))
    assert (rsp.cmd, rsp.ret) == (_wire.PVCALLS_POLL, EINVAL)
    assert [r.id for r in backend.stats().sockets] == [sock_id]
    assert passive.host.fileno() not in watched_fds(backend)
    assert raw.listen(sock_id).ret == 0
    # Watched again: the edge of a connection coming after the ACCEPT
    # waits must reach it, whichever of the two comes first here.
    assert passive.host.fileno() in watched_fds(backend)
    _accepts_one(raw, sock_id, address)
    assert raw.unexpected == []


def _accepts_and_lets_go(raw: RawFrontend, backend: pvcalls.Backend, sock_id: int,
                         address: tuple[str, int], watched: list[int], where: str) -> None:
    """The listening ``sock_id`` accepts a connection, then both are
    released: the backend watches what it did before (``watched``)."""
    new_id = raw.new_id()
    accept = raw.push_accept(sock_id, new_id, raw.new_ring())
    with socket.create_connection(address, timeout=TIMEOUT):
        assert raw.response(accept).ret == 0, where
    assert raw.release(new_id).ret == 0, where
    assert raw.release(sock_id).ret == 0, where
    assert watched_fds(backend) == watched, where


@pytest.mark.parametrize("anywhere", [False, True], ids=["listen", "anywhere"])
def test_a_listen_interrupted_anywhere_leaves_no_descriptor_watched_for_good(
        raw: RawFrontend, backend: pvcalls.Backend, anywhere: bool) -> None:
    """A Ctrl-C landing as any call of a LISTEN's set-up returns (or, with
    ``anywhere``, at any place of pvcalls' code the handler runs): the
    LISTEN done again works, and once the socket is released no descriptor
    is left watched.  The watch recorded after add_fd() returned, one as
    it returned left the host socket watched with nobody to unwatch it:
    its number refused to the next socket that got it (fd already
    registered), and the LISTEN done again failed the same way."""
    from stolensignal import interrupted_as_call_returns, interrupted_at

    fe = backend._frontends[(raw.guest.domid, 0)]
    watched = watched_fds(backend)
    landed = 0
    for n in itertools.count():
        sock_id, _ = raw.socket()
        assert raw.bind(sock_id, ("127.0.0.1", 0)).ret == 0
        address = address_of(backend, sock_id)
        req = ffi.new("struct xen_pvcalls_request *")
        req.u.listen.id, req.u.listen.backlog = sock_id, 16
        request = Request(10000 + n, _wire.PVCALLS_LISTEN, sock_id)

        def call(request: Request = request, req: Any = req) -> None:
            assert _Frontend._listen(fe, request, req) == 0

        if anywhere:
            where = interrupted_at(n, os.path.dirname(pvcalls.__file__), call)
            interrupted = bool(where)
        else:
            where = f"interrupted as call {n} of listen() returned"
            interrupted = interrupted_as_call_returns(PassiveSocket.listen.__code__, n, call)
        assert raw.listen(sock_id).ret == 0, where
        _accepts_and_lets_go(raw, backend, sock_id, address, watched, where)
        if not interrupted:
            break
        landed += 1
    assert landed >= 3  # add_fd's return among them
    assert raw.unexpected == []


@pytest.mark.parametrize("code", [pvcalls, xenback], ids=["pvcalls", "xenback"])
@pytest.mark.parametrize("first", ["ctrl-c", "in use"])
def test_a_listen_whose_undo_is_cut_short_leaves_a_retry_watched(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        first: str, code: types.ModuleType) -> None:
    """A LISTEN fails after its host socket was watched (a Ctrl-C as
    add_fd() returns, or listen() finding the port in use), and a Ctrl-C
    lands at any place of the undo that takes the watch back, in ``code``:
    the LISTEN done again leaves the socket watched, its connection
    reported, and once released no descriptor is left watched.  Cut short
    as remove_fd() returned, the undo left the record of a watch that was
    gone, and the LISTEN done again, trusting it, listened unwatched: an
    ACCEPT waited for an edge that nobody would report.  Cut short inside
    remove_fd(), it left the descriptor in the epoll set, unlisted, and
    the LISTEN done again was refused (EEXIST) for good."""
    from stolensignal import interrupted_at

    fe = backend._frontends[(raw.guest.domid, 0)]
    watched = watched_fds(backend)
    add_fd = backend.dispatcher.add_fd
    cutting = False

    def cut_add_fd(fd: int, events: int, callback: Any) -> None:
        add_fd(fd, events, callback)
        if cutting:
            raise KeyboardInterrupt

    if first == "ctrl-c":
        monkeypatch.setattr(backend.dispatcher, "add_fd", cut_add_fd)
    undoing = _running(monkeypatch, PassiveSocket, "_unregister")
    landed = 0
    for n in itertools.count():
        sock_id, _ = raw.socket()
        assert raw.bind(sock_id, ("127.0.0.1", 0)).ret == 0
        address = address_of(backend, sock_id)
        passive = fe._sockets[sock_id]
        assert isinstance(passive, PassiveSocket)
        taken = socket.socket()
        if first == "in use":
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taken.bind(address)
            taken.listen()
        req = ffi.new("struct xen_pvcalls_request *")
        req.u.listen.id, req.u.listen.backlog = sock_id, 16
        request = Request(10000 + n, _wire.PVCALLS_LISTEN, sock_id)

        failed: list[BaseException] = []

        def call(request: Request = request, req: Any = req,
                 failed: list[BaseException] = failed) -> None:
            nonlocal cutting
            cutting = True
            try:
                _Frontend._listen(fe, request, req)
            except (KeyboardInterrupt, CommandError) as exc:
                failed.append(exc)  # the first failure, its undo not cut short
            finally:
                cutting = False

        where = interrupted_at(n, os.path.dirname(code.__file__), call, lambda: not undoing())
        taken.close()
        assert where or len(failed) == 1
        assert passive.state is SockState.BOUND, where
        assert raw.listen(sock_id).ret == 0, where
        assert passive.host.fileno() in watched_fds(backend), where
        _accepts_and_lets_go(raw, backend, sock_id, address, watched, where)
        if not where:
            break
        landed += 1
    assert landed >= 3  # remove_fd()'s return, or epoll's unregister's, among them
    assert raw.unexpected == []


def test_listen_again_only_changes_the_backlog(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """LISTEN on a listening socket is allowed, as listen() twice on Linux;
    the socket goes on accepting."""
    listener, address = raw.listening(backend)
    assert _backlog(backend, raw, listener) == 16
    assert raw.listen(listener, backlog=1).ret == 0
    assert _backlog(backend, raw, listener) == 1
    _accepts_one(raw, listener, address)


def _backlog(backend: pvcalls.Backend, raw: RawFrontend, sock_id: int) -> int:
    """The accept queue limit of a listening socket's host socket (TCP_INFO
    of a listener: tcpi_sacked)."""
    passive = backend._frontends[(raw.guest.domid, 0)]._sockets[sock_id]
    assert isinstance(passive, PassiveSocket)
    info = passive.host.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    limit: int = struct.unpack_from("=I", info, 28)[0]
    return limit


def _accepts_one(raw: RawFrontend, listener: int, address: tuple[str, int]) -> None:
    """``listener`` accepts a host client at ``address``, whose data arrives."""
    ring = raw.new_ring()
    accept = raw.push_accept(listener, raw.new_id(), ring)
    with socket.create_connection(address, timeout=TIMEOUT) as client:
        assert raw.response(accept).ret == 0
        client.sendall(b"accepted")
        assert raw.recv_exactly(ring, 8) == b"accepted"


@pytest.mark.parametrize("backlog", [0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
def test_listen_with_a_huge_backlog_is_clamped(raw: RawFrontend, backend: pvcalls.Backend,
                                               backlog: int) -> None:
    """The guest's u32 backlog beyond what the host's listen() takes (a C
    int) is clamped to SOMAXCONN, not a failed LISTEN."""
    sock_id, address = raw.listening(backend, backlog)
    assert _backlog(backend, raw, sock_id) == socket.SOMAXCONN
    _accepts_one(raw, sock_id, address)


@contextlib.contextmanager
def _no_more_descriptors() -> Iterator[None]:
    """The process may open no more descriptors (EMFILE) until the block
    ends: RLIMIT_NOFILE at 0.  Only for steps that open none but the one
    expected to fail (the simulated hypervisor passes descriptors for
    grant mappings and event channels).

    Not at the lowest free number: other threads of the process (the
    simulated host's service thread, the garbage collector closing a
    socket) may close a descriptor meanwhile, and the step would take its
    number.  At 0 no number is free to it, whatever closes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_bind_without_a_descriptor_left_is_emfile(
        raw: RawFrontend, backend: pvcalls.Backend, caplog: pytest.LogCaptureFixture) -> None:
    """The host out of descriptors: BIND is answered -EMFILE (as CONNECT
    and ACCEPT are), not -EIO with an internal error logged, and the id
    stays NEW for a later BIND."""
    sock_id, _ = raw.socket()
    with _no_more_descriptors():
        rsp = raw.bind(sock_id, ("127.0.0.1", 0))
    assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_BIND, EMFILE, sock_id)
    row, = backend.stats().sockets
    assert (row.id, row.state) == (sock_id, "new")
    assert raw.bind(sock_id, ("127.0.0.1", 0)).ret == 0
    # The command Work answers the next request only once it has done with
    # the first, whatever it logs after its answer.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_connect_without_a_descriptor_left_is_emfile(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The host cannot give the CONNECT its host socket (no descriptor
    left; here only that socket() fails, the ring's mapping needing
    descriptors of the simulated hypervisor): -EMFILE, everything set up
    for it let go, no error logged, and the id NEW for a later CONNECT."""
    ports = sorted(bound_ports(backend))
    mappings = len(backend.gnttab._live)
    sock_id, _ = raw.socket()
    ring = raw.new_ring()

    class NoDescriptor:
        def __getattr__(self, name: str) -> Any:
            return getattr(socket, name)

        @staticmethod
        def socket(*args: Any) -> socket.socket:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(_socket, "socket", NoDescriptor())
    rsp = raw.response(raw.push_connect(sock_id, echo_server.address, ring))
    monkeypatch.undo()
    assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_CONNECT, EMFILE, sock_id)
    row, = backend.stats().sockets
    assert (row.id, row.kind, row.state) == (sock_id, "new", "new")
    assert all(backend.load_index.load(cpu) == 0 for cpu in backend.topology.possible())
    assert sorted(bound_ports(backend)) == ports
    assert len(backend.gnttab._live) == mappings
    assert raw.response(raw.push_connect(sock_id, echo_server.address, ring)).ret == 0
    # Answered once the command Work has done with the first CONNECT.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    raw.echo(ring, b"a descriptor again")


def test_accept_without_a_descriptor_left_is_emfile(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """The host cannot take the connection (no descriptor left): the ACCEPT
    is answered -EMFILE and its id_new given up; the connection stays
    queued for the next ACCEPT."""
    listener, address = raw.listening(backend)
    id_new = raw.new_id()
    accept = raw.push_accept(listener, id_new, raw.new_ring())
    wait_until(lambda: any(r.id == id_new for r in backend.stats().sockets))
    client = socket.socket()  # its descriptor before the limit
    with _no_more_descriptors():
        client.connect(address)
        rsp = raw.response(accept)
    assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_ACCEPT, EMFILE, listener)
    assert id_new not in {r.id for r in backend.stats().sockets}
    assert all(c.sockets == 0 for c in backend.stats().cpus)
    ring = raw.new_ring()
    assert raw.response(raw.push_accept(listener, id_new, ring)).ret == 0
    with client:
        client.sendall(b"queued")
        assert raw.recv_exactly(ring, 6) == b"queued"


@pytest.mark.parametrize("early", [b"", b"early"])
def test_an_accepted_connection_that_cannot_be_watched_fails_the_accept(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, early: bytes) -> None:
    """The accepted connection cannot join its CPU's epoll set (the host
    out of memory or of epoll watches): the ACCEPT is answered with that
    errno rather than never, and its id_new is given up, with nothing sent
    to the client of what the guest wrote early into its out ring.  No
    traceback: the teardown's unwatching of a socket never watched is no
    failure."""
    listener, address = raw.listening(backend)
    id_new = raw.new_id()
    ring = raw.new_ring()
    assert ring.write(early, notify=False) == len(early)
    accept = raw.push_accept(listener, id_new, ring)
    wait_until(lambda: any(r.id == id_new for r in backend.stats().sockets))

    def no_watch(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(EventDispatcher, "add_fd", no_watch)
    with socket.create_connection(address) as client:
        rsp = raw.response(accept)
        assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_ACCEPT, ENOSPC, listener)
        assert id_new not in {r.id for r in backend.stats().sockets}
        assert all(c.sockets == 0 for c in backend.stats().cpus)
        # The host's end was closed with the id: the client sees it go.
        client.settimeout(TIMEOUT)
        assert client.recv(1) == b""
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    monkeypatch.undo()
    with socket.create_connection(address) as client:
        ring = raw.new_ring()
        assert raw.response(raw.push_accept(listener, id_new, ring)).ret == 0
        client.sendall(b"next")
        assert raw.recv_exactly(ring, 4) == b"next"


def _bugs_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The tracebacks of our bugs that pvcalls logged (not the workqueue)."""
    return [r for r in caplog.records if r.name.startswith("pvcalls")
            and r.exc_info and isinstance(r.exc_info[1], RuntimeError)]


def test_a_bug_answering_a_poll_fails_that_listener_only(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An exception escaping a listening socket's Work (a bug of ours):
    the POLL it served is answered -EIO, the host socket is closed (no
    connection is taken any more) and so is every later ACCEPT, POLL or
    LISTEN; the traceback is logged once.  RELEASE is answered as for any
    listener.  The other listeners and sockets of the guest carry on.
    (The POLL used to wait for ever.)"""
    caplog.set_level(logging.ERROR)
    good, good_address = raw.listening(backend)
    conn_id, ring = raw.connect_socket(echo_server.address)
    watched = watched_fds(backend)
    listener, address = raw.listening(backend)
    readable = _socket._readable
    bad = backend._frontends[(raw.guest.domid, 0)]._sockets[listener]

    def buggy(sock: socket.socket) -> bool:
        if sock is bad.host:
            raise RuntimeError("a bug")
        return readable(sock)

    monkeypatch.setattr(_socket, "_readable", buggy)
    assert raw.response(raw.push_poll(listener)).ret == EIO
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=TIMEOUT).close()
    assert raw.response(raw.push_poll(listener)).ret == EIO
    id_new = raw.new_id()
    assert raw.response(raw.push_accept(listener, id_new, raw.new_ring())).ret == EIO
    assert raw.listen(listener).ret == EIO
    row = next(r for r in backend.stats().sockets if r.id == listener)
    assert (row.kind, row.state) == ("passive", "failed")
    assert id_new not in {r.id for r in backend.stats().sockets}
    bugs = _bugs_logged(caplog)
    assert len(bugs) == 1 and f"socket {listener:#x}" in bugs[0].getMessage()
    # The one traceback: neither the Work's end nor the LISTEN refused
    # after it raised anything more.
    assert [r for r in caplog.records if r.exc_info] == bugs
    poll = raw.push_poll(good)
    with socket.create_connection(good_address, timeout=TIMEOUT):
        assert raw.response(poll).ret == 0
    raw.echo(ring, b"still fine")
    assert raw.release(listener).ret == 0
    assert raw.unexpected == []
    assert {r.id for r in backend.stats().sockets} == {good, conn_id}
    assert watched_fds(backend) == watched


def test_bugs_serving_listeners_are_logged_through_the_rate_limit(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Each listener's failure is logged through its guest's rate limit: a
    guest that can set a bug of ours off, listener after listener, gets
    10 lines per interval, not one per listener."""
    caplog.set_level(logging.ERROR)
    fe = backend._frontends[(raw.guest.domid, 0)]
    fe.ratelimit = RateLimit(f"dom{raw.guest.domid}", clock=lambda: 0.0)  # one interval

    def buggy(sock: socket.socket) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(_socket, "_readable", buggy)
    for _ in range(12):
        listener, _ = raw.listening(backend)
        assert raw.response(raw.push_poll(listener)).ret == EIO
        assert raw.release(listener).ret == 0
    assert len(_bugs_logged(caplog)) == 10


def test_a_bug_taking_an_accepted_connection_answers_the_accept_eio(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The same as the ACCEPT's connection is taken over: the ACCEPT is
    answered -EIO, its id_new gives back all it held, the client sees its
    connection closed, and the listener takes no more."""
    caplog.set_level(logging.ERROR)
    listener, address = raw.listening(backend)
    id_new = raw.new_id()
    ring = raw.new_ring()
    before = resources(backend, host)

    def start_accepted(self: ActiveSocket, conn: socket.socket, peer: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ActiveSocket, "start_accepted", start_accepted)
    accept = raw.push_accept(listener, id_new, ring)
    with socket.create_connection(address, timeout=TIMEOUT) as client:
        assert raw.response(accept).ret == EIO
        assert client.recv(1) == b""
    assert resources(backend, host) == before
    assert id_new not in {r.id for r in backend.stats().sockets}
    assert len(_bugs_logged(caplog)) == 1
    assert raw.response(raw.push_accept(listener, id_new, ring)).ret == EIO
    assert resources(backend, host) == before
    assert raw.release(listener).ret == 0
    assert backend.stats().sockets == ()
    assert raw.unexpected == []


def _accepts_fail_when_let(monkeypatch: pytest.MonkeyPatch
                           ) -> tuple[threading.Event, threading.Event]:
    """From now on, a listener's Work taking a connection in for an ACCEPT
    sets the first event returned (serving), waits for the second (go),
    and then fails there, as a bug of ours would (RuntimeError): what
    comes in meanwhile meets a listener about to fail."""
    serving, go = threading.Event(), threading.Event()

    def start_accepted(self: ActiveSocket, conn: socket.socket, peer: Any) -> None:
        serving.set()
        assert go.wait(TIMEOUT)
        raise RuntimeError("a bug")

    monkeypatch.setattr(ActiveSocket, "start_accepted", start_accepted)
    return serving, go


@pytest.mark.parametrize("second", ["accept", "poll"])
def test_an_accept_or_poll_sent_as_the_listener_fails_is_answered_eio(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, second: str) -> None:
    """An ACCEPT or POLL taken in while the listener's Work is failing,
    serving the ACCEPT before it: it gets -EIO as every later one does,
    an ACCEPT gives back what its id_new held, and the failure is logged
    once."""
    caplog.set_level(logging.ERROR)
    listener, address = raw.listening(backend)
    passive = backend._frontends[(raw.guest.domid, 0)]._sockets[listener]
    assert isinstance(passive, PassiveSocket)
    serving, go = _accepts_fail_when_let(monkeypatch)
    first_ring, second_ring = raw.new_ring(), raw.new_ring()
    before = resources(backend, host)
    first = raw.push_accept(listener, raw.new_id(), first_ring)
    with socket.create_connection(address, timeout=TIMEOUT):
        assert serving.wait(TIMEOUT)
        try:
            if second == "accept":
                taken_in = raw.push_accept(listener, raw.new_id(), second_ring)
            else:
                taken_in = raw.push_poll(listener)
            wait_until(lambda: passive.waiting is not None)
        finally:
            go.set()
        assert raw.response(first).ret == EIO
        assert raw.response(taken_in).ret == EIO
    assert resources(backend, host) == before
    assert len([r for r in caplog.records if r.exc_info]) == 1
    assert raw.release(listener).ret == 0
    assert raw.unexpected == []


def test_an_accept_whose_listener_fails_as_it_is_taken_in_gives_back_id_new(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An ACCEPT found the listener listening, and the listener's Work
    failed before the ACCEPT could wait on it: the ACCEPT is answered
    -EIO, and what its id_new was given (the socket in the table, its
    mapped ring, its bound port) goes with it: the id is free again."""
    caplog.set_level(logging.ERROR)
    listener, address = raw.listening(backend)
    serving, go = _accepts_fail_when_let(monkeypatch)
    first_ring, second_ring = raw.new_ring(), raw.new_ring()
    before = resources(backend, host)
    first = raw.push_accept(listener, raw.new_id(), first_ring)
    with socket.create_connection(address, timeout=TIMEOUT):
        assert serving.wait(TIMEOUT)  # the first ACCEPT is taken: none waits
        real = _Frontend._accept
        waiting = PauseAt(real, "passive.wait(request, new)")
        monkeypatch.setitem(pvcalls._backend._HANDLERS, _wire.PVCALLS_ACCEPT,
                            lambda fe, request, req: waiting.run(lambda: real(fe, request, req)))
        id_new = raw.new_id()
        second = raw.push_accept(listener, id_new, second_ring)
        assert waiting.reached.wait(TIMEOUT)  # past the checks, its socket set up
        go.set()
        assert raw.response(first).ret == EIO  # the listener failed
        waiting.resume()
        assert raw.response(second).ret == EIO
    assert resources(backend, host) == before
    assert [r.id for r in backend.stats().sockets] == [listener]
    assert raw.socket(id_new)[1].ret == 0
    assert raw.release(listener).ret == 0
    assert raw.unexpected == []


def test_a_listen_again_as_the_listener_fails_is_answered_eio(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A second LISTEN (a new backlog) while the listener's Work fails
    serving an ACCEPT: the LISTEN is answered -EIO and the socket stays
    FAILED, not LISTENING again over a closed host socket (whose next
    ACCEPT would get -EBADF from it)."""
    caplog.set_level(logging.ERROR)
    listener, address = raw.listening(backend)
    passive = backend._frontends[(raw.guest.domid, 0)]._sockets[listener]
    assert isinstance(passive, PassiveSocket)
    serving, go = _accepts_fail_when_let(monkeypatch)
    first = raw.push_accept(listener, raw.new_id(), raw.new_ring())
    with socket.create_connection(address, timeout=TIMEOUT):
        assert serving.wait(TIMEOUT)
        listening = PauseAt.in_method(monkeypatch, PassiveSocket, "listen", "with self._lock:")
        again = raw.push(_wire.PVCALLS_LISTEN, lambda req: setattr(req.u.listen, "id", listener))
        assert listening.reached.wait(TIMEOUT)  # its host socket listens again
        go.set()
        assert raw.response(first).ret == EIO  # the listener failed
        listening.resume()
        assert raw.response(again).ret == EIO
    assert passive.state is SockState.FAILED
    assert raw.call(_wire.PVCALLS_POLL, lambda req: setattr(req.u.poll, "id", listener)).ret == EIO
    assert raw.release(listener).ret == 0
    assert raw.unexpected == []


# -- RELEASE ------------------------------------------------------------------------------

def test_release_frees_everything_before_answering(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any) -> None:
    sock_id, ring = raw.connect_socket(echo_server.address)
    sock = backend._frontends[(raw.guest.domid, 0)]._sockets[sock_id]
    port = sock.port
    assert port in bound_ports(backend)
    assert raw.release(sock_id).ret == 0
    # By the time the answer was written everything was gone.
    assert port not in bound_ports(backend)
    assert sock.ring._maps == []
    assert sock.host.fileno() == -1
    assert all(c.sockets == 0 for c in backend.stats().cpus)
    assert raw.release(sock_id).ret == EBADF


@pytest.fixture
def write_space_watches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Every change of a watched descriptor's events, as (fd, EPOLLOUT in
    them), in order."""
    changes: list[tuple[int, bool]] = []
    real = EventDispatcher.modify_fd

    def modify_fd(self: EventDispatcher, fd: int, events: int) -> None:
        changes.append((fd, bool(events & select.EPOLLOUT)))
        real(self, fd, events)

    monkeypatch.setattr(EventDispatcher, "modify_fd", modify_fd)
    return changes


@pytest.mark.parametrize("wrapped", [False, True])
def test_write_space_is_watched_only_while_a_send_is_blocked(
        raw: RawFrontend, backend: pvcalls.Backend, sends_blocked: threading.Event,
        write_space_watches: list[tuple[int, bool]], wrapped: bool) -> None:
    """EPOLLOUT is added when a send meets a full send buffer, and dropped
    once the Work has sent all the out ring held: left on, every ACK of
    the peer would wake the Work for nothing.  Also when what it held
    wraps around the ring's end (two pieces, both sent)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock_id, ring = raw.connect_socket(server.getsockname(), order=1)
        peer, _ = server.accept()
    sock = backend._frontends[(raw.guest.domid, 0)]._sockets[sock_id]
    assert isinstance(sock, ActiveSocket) and sock.host is not None
    fd = sock.host.fileno()
    peer.settimeout(TIMEOUT)
    start = ring.size - 4 if wrapped else 0  # 4 bytes before the end, 13 after
    if start:
        assert ring.write(b"x" * start) == start
        got = b""
        while len(got) < start:
            got += peer.recv(start)
        wait_until(lambda: ring.get(_wire.OUT_CONS_OFFSET) == start)
    sends_blocked.set()
    ring.write(b"blocked ")
    wait_until(lambda: write_space_watches == [(fd, True)])
    # Written while blocked too: whichever run comes after the clear
    # (the notification's below, or an earlier one late) sends all 17
    # bytes at once, in two pieces when wrapped.
    ring.write(b"then sent")
    sends_blocked.clear()
    raw.evtchn.notify(ring.port)
    got = b""
    while len(got) < 17:
        got += peer.recv(64)
    assert got == b"blocked then sent"
    wait_until(lambda: ring.get(_wire.OUT_CONS_OFFSET) == start + 17)
    sock.flush()
    assert write_space_watches == [(fd, True), (fd, False)]
    peer.close()


def test_host_sockets_are_watched_edge_triggered_and_not_for_write_space(
        raw: RawFrontend, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A listening socket is watched edge-triggered: level-triggered, a
    connection waiting for an ACCEPT would run its Work without end.  A
    connected socket, by CONNECT or accepted, is watched edge-triggered for
    data and the peer's end, not for write space: every ACK of the peer
    would wake its Work (EPOLLOUT is added only while a send is blocked)."""
    watched: dict[int, int] = {}
    real = EventDispatcher.add_fd

    def add_fd(self: EventDispatcher, fd: int, events: int, callback: Any) -> None:
        watched[fd] = events
        real(self, fd, events, callback)

    monkeypatch.setattr(EventDispatcher, "add_fd", add_fd)
    sockets = backend._frontends[(raw.guest.domid, 0)]._sockets
    listener, address = raw.listening(backend)
    id_new = raw.new_id()
    accept_req = raw.push_accept(listener, id_new, raw.new_ring())
    client = socket.create_connection(address)
    assert raw.response(accept_req).ret == 0
    connected, _ = raw.connect_socket(echo_server.address)
    data_events = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
    assert watched[sockets[listener].host.fileno()] == select.EPOLLIN | select.EPOLLET
    assert watched[sockets[id_new].host.fileno()] == data_events
    assert watched[sockets[connected].host.fileno()] == data_events
    client.close()


def test_a_release_whose_flush_fails_still_frees_everything(
        raw: RawFrontend, backend: pvcalls.Backend, host: Any, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """RELEASE first sends what the out ring still holds (pvcalls._linger).
    When that fails (here the copy of the rest for the lingerer, out of
    memory), the failure is logged with its traceback and the teardown goes
    on: the host socket, the event channel, the data ring, the CPU slot and
    the domain's count all go back, and RELEASE is answered 0, as any
    RELEASE of a known id."""
    sock_id, _ = raw.socket()
    ring = raw.new_ring()
    before = resources(backend, host)
    assert raw.response(raw.push_connect(sock_id, echo_server.address, ring)).ret == 0
    sock = socket_of(backend, raw, sock_id)
    assert sock.events is not None and sock.host is not None
    sock.flush()  # its Work idle: the bytes below wait for the RELEASE
    fd = sock.host.fileno()
    assert ring.write(b"unsent", notify=False) == 6
    failed = []

    def no_memory(self: ActiveSocket, host: socket.socket) -> bytes:
        failed.append(host.fileno())
        raise MemoryError

    monkeypatch.setattr(ActiveSocket, "_flush_out", no_memory)
    rsp = raw.release(sock_id)
    assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_RELEASE, 0, sock_id)
    assert failed == [fd]
    assert backend.stats().sockets == ()
    assert backend.domain_sockets(raw.guest.domid) == 0
    assert resources(backend, host) == before
    assert fd not in sock.events._fds and sock.host.fileno() == -1
    assert len(backend.lingerer) == 0
    record, = (r for r in caplog.records if r.levelno >= logging.ERROR)
    assert record.exc_info is not None and isinstance(record.exc_info[1], MemoryError)
    assert raw.unexpected == []


def test_a_release_whose_watch_for_room_fails_still_lingers_the_rest(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, sends_blocked: threading.Event) -> None:
    """The RELEASE's last send finds the host socket's buffer full and would
    watch it for room, of no use at teardown: epoll failing there (out of
    memory) must not drop what the out ring holds.  It goes to the lingerer,
    and the peer gets it."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock_id, ring = raw.connect_socket(server.getsockname())
        peer, _ = server.accept()
    with peer:
        sock = socket_of(backend, raw, sock_id)
        assert sock.events is not None and sock.host is not None
        sock.flush()  # its Work idle: the bytes below wait for the RELEASE
        assert ring.write(b"unsent", notify=False) == 6
        sends_blocked.set()
        failed = []

        def no_memory(fd: int, events: int) -> None:
            failed.append(fd)
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

        monkeypatch.setattr(sock.events, "modify_fd", no_memory)
        rsp = raw.release(sock_id)
        assert (rsp.cmd, rsp.ret, rsp.id) == (_wire.PVCALLS_RELEASE, 0, sock_id)
        assert failed  # the watch was asked for, and failed
        assert backend.stats().sockets == ()
        assert backend.domain_sockets(raw.guest.domid) == 0
        assert sock.port is None
        peer.settimeout(TIMEOUT)
        assert peer.recv(64) == b"unsent"  # the lingerer's send, not sendmsg
        assert peer.recv(64) == b""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert raw.unexpected == []


def test_release_waits_for_the_sockets_work(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A RELEASE while the socket's Work is sending from the ring: the
    teardown waits for that run, then closes the host socket and unmaps
    the ring.  (Not waiting, the Work would go on with a closed socket and
    released views: an error in the Work, and the peer's data in doubt.)"""
    sending = PauseAt.in_method(monkeypatch, ActiveSocket, "_tx", "sent = host.sendmsg(")
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock_id, ring = raw.connect_socket(server.getsockname())
        peer, _ = server.accept()
    sock = socket_of(backend, raw, sock_id)
    with peer:
        ring.write(b"in flight")
        assert sending.reached.wait(TIMEOUT)
        try:
            release_req = raw.push_release(sock_id)

            def release_waits_or_is_answered() -> bool:
                raw.poll_responses()
                return release_req in raw.responses or any(
                    stands_at(tid, ActiveSocket.teardown, "self.disable_sync()")
                    for tid in sys._current_frames())

            wait_until(release_waits_or_is_answered)
        finally:
            sending.resume()
        assert raw.response(release_req).ret == 0
        sock.flush()  # the Work's run is over
        peer.settimeout(TIMEOUT)
        got = b""
        while chunk := peer.recv(64):
            got += chunk
    assert got == b"in flight"
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_release_of_a_listener_closes_its_host_socket(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """After RELEASE of a listening socket nothing listens on its port:
    closed by the release, not left to the garbage collector (the test
    holds the socket object, as a reference cycle or a traceback could)."""
    listener, address = raw.listening(backend)
    passive = backend._frontends[(raw.guest.domid, 0)]._sockets[listener]
    assert isinstance(passive, PassiveSocket)
    assert raw.release(listener).ret == 0
    assert passive.host.fileno() == -1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=TIMEOUT).close()


def test_release_of_a_listener_stops_watching_its_host_socket(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """RELEASE of a listening socket (one with a POLL in flight, one
    without) takes its host socket out of the dispatcher before closing
    it: a descriptor left registered would keep its number from the next
    socket the host gives it to (its add_fd refused), and its callback
    from going."""
    watched = watched_fds(backend)
    fe = backend._frontends[(raw.guest.domid, 0)]
    for poll in (False, True):
        listener, _ = raw.listening(backend)
        passive = fe._sockets[listener]
        assert isinstance(passive, PassiveSocket)
        fd = passive.host.fileno()
        assert fd in watched_fds(backend)
        if poll:
            req_id = raw.push_poll(listener)
        assert raw.release(listener).ret == 0
        if poll:
            assert raw.response(req_id).ret == EINTR
        assert watched_fds(backend) == watched
    assert raw.unexpected == []


def test_release_of_new_socket(raw: RawFrontend, backend: pvcalls.Backend) -> None:
    sock_id, _ = raw.socket()
    assert raw.release(sock_id).ret == 0
    assert backend.stats().sockets == ()


# -- the Linux frontend's exact sequences -------------------------------------------------

def test_linux_like_sequence_on_one_ring(raw: RawFrontend, echo_server: Any,
                                         backend: pvcalls.Backend) -> None:
    """req_id = slot index across a ring wrap, pointer ids, len = 16."""
    assert raw.ring is not None
    seen = []
    for _ in range(3):  # 3 x 12 requests > 32 slots: req_ids wrap
        for _ in range(4):
            sock_id, ring = raw.connect_socket(echo_server.address)
            raw.echo(ring, b"x" * 100)
            rsp = raw.release(sock_id)
            assert rsp.ret == 0
            seen.append(rsp.req_id)
            # Linux writes -EBADF into in_error after RELEASE.
            ring.put(_wire.IN_ERROR_OFFSET, -_errno.EBADF)
    # Each response was found under the slot index it was pushed with
    # (RawFrontend.response waits for exactly that req_id), across a wrap.
    assert raw.ring.req_prod_pvt > 32
    assert all(0 <= r < 32 for r in seen)
    assert raw.unexpected == []
    assert backend.stats().sockets == ()


def test_many_sockets_spread_evenly(raw: RawFrontend, echo_server: Any,
                                    backend: pvcalls.Backend) -> None:
    def counts() -> dict[int, int]:
        return {c.cpu: c.sockets for c in backend.stats().cpus if c.online}

    ids = []
    for n in range(1, 11):  # balanced after every socket added
        ids.append(raw.connect_socket(echo_server.address, order=1)[0])
        spread = counts().values()
        assert sum(spread) == n and max(spread) - min(spread) <= 1
    # Empty one CPU and take one socket off another: new sockets go to the
    # emptiest CPUs, first to the empty one.
    cpu_of = {r.id: r.cpu for r in backend.stats().sockets}
    emptied = cpu_of[ids[0]]
    released = [i for i in ids if cpu_of[i] == emptied]
    released.append(next(i for i in ids if cpu_of[i] != emptied))
    for sock_id in released:
        assert raw.release(sock_id).ret == 0
    assert counts()[emptied] == 0
    for _ in range(len(released)):
        before = counts()
        new_id = raw.connect_socket(echo_server.address, order=1)[0]
        cpu = next(r.cpu for r in backend.stats().sockets if r.id == new_id)
        assert cpu is not None and before[cpu] == min(before.values())
    spread = counts().values()
    assert sum(spread) == 10 and max(spread) - min(spread) <= 1


def test_responses_from_many_threads_share_one_producer(make_frontend: Any,
        host: Any, backend: pvcalls.Backend, echo_server: Any) -> None:
    """Several frontends at once; each gets exactly one response per request."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fe = make_frontend(f"t{i}")
            for _ in range(5):
                sock_id, ring = fe.connect_socket(echo_server.address, order=1)
                fe.echo(ring, b"abc")
                assert fe.release(sock_id).ret == 0
            assert fe.unexpected == [] and fe.responses == {}
            fe.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a frontend is still waiting"
    assert errors == []
    wait_until(lambda: backend.stats().frontends == 0)


def test_a_frontend_closing_as_an_accept_completes_lets_the_connection_go(
        raw: RawFrontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The frontend closes while the listener's Work takes over a
    connection for an ACCEPT: the listener is torn down first (waiting for
    that Work), then the ACCEPT's socket, which by then holds the
    connection and closes it.  The other way round, the ACCEPT's socket
    was torn down empty, and the connection the Work gave it afterwards
    stayed open and watched for good."""
    listener, address = raw.listening(backend)
    taking_over = PauseAt.in_method(monkeypatch, PassiveSocket, "_serve",
                                    "new.start_accepted(conn, address)")
    raw.push_accept(listener, raw.new_id(), raw.new_ring())
    with socket.create_connection(address, timeout=TIMEOUT) as client:
        assert taking_over.reached.wait(TIMEOUT)
        closing = Call(raw.close)
        try:
            # The close waits for the Work to let the listener go.
            wait_until(lambda: any(stands_at(t, PassiveSocket.teardown, "self.disable_sync()")
                                   for t in sys._current_frames()))
        finally:
            taking_over.resume()
        closing.join()
        assert closing.error is None
        assert client.recv(1) == b""  # the backend's end is closed
    assert watched_fds(backend) == [] and bound_ports(backend) == []
