"""A hostile backend never crashes, hangs or corrupts the guest's frontend.

The backend here is a fake in dom0: it does the backend half of the xenbus
handshake by hand, maps the real :class:`pvcalls.Frontend`'s command ring
and data rings as any backend would, and then answers under the test's
control, wrongly if the test says so.  Every call of the frontend must end
with a result, a clear :class:`OSError` (or ``TimeoutError`` when it has a
timeout), never another exception, a hang, or a copy from outside its ring.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import io
import itertools
import logging
import os
import queue
import select
import socket
import struct
import sys
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pvcalls_rawfront import Call, LogWatch, done_or_at, sleeping_in_wait, wait_until
from racewindow import PauseAt, stands_at
from stolensignal import (
    Interrupted,
    interrupted_as_frame_starts,
    interrupted_at,
    signal_taken_elsewhere,
)

import pvcalls
import workqueue
from pvcalls import _errno as pvcalls_errno
from pvcalls import _wire
from pvcalls._wire import (
    IN_CONS_OFFSET,
    IN_ERROR_OFFSET,
    IN_PROD_OFFSET,
    OUT_CONS_OFFSET,
    OUT_ERROR_OFFSET,
    OUT_PROD_OFFSET,
    PVCALLS_ACCEPT,
    PVCALLS_BIND,
    PVCALLS_CONNECT,
    PVCALLS_LISTEN,
    PVCALLS_POLL,
    PVCALLS_RELEASE,
    PVCALLS_SOCKET,
    RING_SLOTS,
    SLOT_SIZE,
    ffi,
)
from pvcalls.frontend import _common, _frontend
from tests.xenback.xbhelpers import fails_once
from xenback import _wire as _xb_wire
from xenback.platform import EventChannelError, GrantMapping
from xenback.ring import _REQ_EVENT, BackRing, FlexRing, FrontRing
from xenback.sim import SimHost
from xenback.xenstore import XenStore

TIMEOUT = 10.0
#: Xen errno values (negative on the wire).
EADDRINUSE, EINVAL, ENOTSUPP, ENOTCONN, ECONNREFUSED = 98, 22, 524, 107, 111
EAGAIN, EINPROGRESS, EINTR, ETIMEDOUT = 11, 115, 4, 110
_RSP_PROD_OFFSET = _xb_wire.ffi.offsetof("struct xen_sring_header", "rsp_prod")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")


@dataclass(frozen=True)
class Request:
    req_id: int
    cmd: int
    id: int
    id_new: int = 0  # ACCEPT
    ref: int = 0  # CONNECT, ACCEPT
    evtchn: int = 0  # CONNECT, ACCEPT


class FakeDataRing:
    """The backend's mapping of one active socket's indexes and data pages."""

    def __init__(self, fake: FakeBackend, ref: int, remote_port: int) -> None:
        self.indexes_map: GrantMapping = fake.gnttab.map_grant_refs(fake.domid, [ref])
        idx = self.indexes_map.buffer
        order = _U32.unpack_from(idx, _wire.RING_ORDER_OFFSET)[0]
        refs = struct.unpack_from(f"={1 << order}I", idx, _wire.REF_OFFSET)
        self.data_map: GrantMapping = fake.gnttab.map_grant_refs(fake.domid, refs)
        self.size = _wire.flex_ring_size(order)
        self._fake = fake
        self.port = fake.evtchn.bind_interdomain(fake.domid, remote_port)

    def get(self, offset: int) -> int:
        return int(_U32.unpack_from(self.indexes_map.buffer, offset)[0])

    def put(self, offset: int, value: int) -> None:
        """Store ``value`` modulo 2**32 into the indexes page."""
        _U32.pack_into(self.indexes_map.buffer, offset, value & 0xFFFFFFFF)

    def set_error(self, offset: int, value: int) -> None:
        _I32.pack_into(self.indexes_map.buffer, offset, value)

    def produce(self, data: bytes) -> None:
        """Put ``data`` into the in ring as a correct backend would."""
        prod = self.get(IN_PROD_OFFSET)
        buf = self.data_map.buffer
        for i, byte in enumerate(data):
            buf[(prod + i) & (self.size - 1)] = byte
        self.put(IN_PROD_OFFSET, prod + len(data))
        self.notify()

    def notify(self) -> None:
        self._fake.evtchn.notify(self.port)

    def close(self) -> None:
        try:
            self._fake.evtchn.unbind(self.port)
        except OSError:
            pass
        self.data_map.unmap()
        self.indexes_map.unmap()


class FakeBackend:
    """dom0's side of one guest's pvcalls device, done by hand.

    By default every command is answered correctly at once (``ret`` 0, or
    ``rets[cmd]``; CONNECT and ACCEPT map the data ring offered, RELEASE
    unmaps it).  Commands in ``hold`` go to ``requests`` instead, for the
    test to answer (or not) with :meth:`respond` or anything more hostile.
    """

    def __init__(self, host: SimHost, guest: Any) -> None:
        self.guest = guest
        self.domid: int = guest.domid
        self.be = f"/local/domain/0/backend/pvcalls/{self.domid}/0"
        self.fe = f"/local/domain/{self.domid}/device/pvcalls/0"
        self.xs = XenStore.connect_to(host.dom0)
        self.gnttab = host.dom0.gnttab()
        self.evtchn = host.dom0.evtchn()
        self.hold: set[int] = set()
        self.rets: dict[int, int] = {}
        self.requests: queue.Queue[Request] = queue.Queue()
        self.rings: dict[int, FakeDataRing] = {}  # by socket id
        self.failures: list[BaseException] = []
        self.ring: BackRing | None = None
        self.mapping: GrantMapping | None = None
        self.port = -1
        self._lock = threading.Lock()  # the ring's producer side
        self._closed_once = False
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._watch = self.xs.watch(f"{self.fe}/state", self._on_frontend_state)
        self._thread = threading.Thread(target=self._run, name="fake-backend", daemon=True)
        self._thread.start()

    # -- the handshake and the command loop ------------------------------------

    def _run(self) -> None:
        try:
            self._handshake()
            self._serve()
        except BaseException as exc:
            self.failures.append(exc)

    def _handshake(self) -> None:
        xs = self.xs
        xs.wait_for(f"{self.be}/state", "1", timeout=TIMEOUT)  # the toolstack's
        for key, value in {"versions": "1", "max-page-order": "4", "function-calls": "1"}.items():
            xs.write(f"{self.be}/{key}", value)
        xs.write(f"{self.be}/state", "2")  # InitWait
        xs.wait_for(f"{self.fe}/state", "3", timeout=TIMEOUT)  # Initialised
        ring_ref = int(xs.read(f"{self.fe}/ring-ref") or "")
        remote_port = int(xs.read(f"{self.fe}/port") or "")
        self.mapping = self.gnttab.map_grant_refs(self.domid, [ring_ref])
        self.ring = BackRing(self.mapping.buffer, SLOT_SIZE)
        self.port = self.evtchn.bind_interdomain(self.domid, remote_port)
        xs.write(f"{self.be}/state", "4")  # Connected

    def _serve(self) -> None:
        assert self.ring is not None
        fds = [self.evtchn.fileno(), self._stop_r]
        while True:
            readable, _, _ = select.select(fds, [], [])
            if self._stop_r in readable:
                return
            while (port := self.evtchn.pending()) is not None:
                self.evtchn.unmask(port)
            with self._lock:
                while True:
                    for raw in self.ring.requests():
                        self._handle(ffi.from_buffer("struct xen_pvcalls_request *", raw))
                    if not self.ring.final_check_for_requests():
                        break

    def _handle(self, r: Any) -> None:
        """Under _lock: one request from the ring."""
        req = Request(r.req_id, r.cmd, r.u.socket.id)
        if r.cmd == PVCALLS_CONNECT:
            req = Request(r.req_id, r.cmd, r.u.connect.id, 0, r.u.connect.ref, r.u.connect.evtchn)
        elif r.cmd == PVCALLS_ACCEPT:
            req = Request(r.req_id, r.cmd, r.u.accept.id, r.u.accept.id_new,
                          r.u.accept.ref, r.u.accept.evtchn)
        if req.cmd in self.hold:
            self.requests.put(req)
            return
        ret = self.rets.get(req.cmd, 0)
        if ret == 0 and req.cmd == PVCALLS_CONNECT:
            self.rings[req.id] = FakeDataRing(self, req.ref, req.evtchn)
        elif ret == 0 and req.cmd == PVCALLS_ACCEPT:
            self.rings[req.id_new] = FakeDataRing(self, req.ref, req.evtchn)
        elif req.cmd == PVCALLS_RELEASE and req.id in self.rings:
            self.rings.pop(req.id).close()
        self._push([self._response(req, ret)])

    # -- answering -------------------------------------------------------------

    @staticmethod
    def _response(req: Request, ret: int, *, req_id: int | None = None, cmd: int | None = None,
                  sock_id: int | None = None) -> bytes:
        rsp = ffi.new("struct xen_pvcalls_response *")
        rsp.req_id = req.req_id if req_id is None else req_id
        rsp.cmd = req.cmd if cmd is None else cmd
        rsp.ret = ret
        rsp.u.socket.id = req.id if sock_id is None else sock_id
        return bytes(ffi.buffer(rsp))

    def _push(self, responses: list[bytes]) -> None:
        assert self.ring is not None
        for rsp in responses:
            self.ring.push_response(rsp)
        if self.ring.push_responses():
            self.evtchn.notify(self.port)

    def respond(self, req: Request, ret: int, **fields: int) -> None:
        """Answer ``req`` (its response slot); ``fields`` (req_id, cmd,
        sock_id) put something else in the response."""
        self.respond_many([(req, ret, fields)])

    def respond_many(self, answers: list[tuple[Request, int, dict[str, int]]]) -> None:
        """Several responses, published together with one notification."""
        with self._lock:
            self._push([self._response(req, ret, **fields) for req, ret, fields in answers])

    def set_rsp_prod(self, value: int) -> None:
        """Publish a response producer index of the test's choosing."""
        assert self.mapping is not None
        with self._lock:
            _U32.pack_into(self.mapping.buffer, _RSP_PROD_OFFSET, value & 0xFFFFFFFF)
            self.evtchn.notify(self.port)

    @property
    def rsp_prod_pvt(self) -> int:
        assert self.ring is not None
        return self.ring.rsp_prod_pvt

    def next_request(self, cmd: int) -> Request:
        req = self.requests.get(timeout=TIMEOUT)
        assert req.cmd == cmd, req
        return req

    def set_state(self, state: int) -> None:
        self.xs.write(f"{self.be}/state", str(state))

    def _on_frontend_state(self, _path: str) -> None:
        """The frontend closing: go Closed, as a backend does."""
        try:
            if self._closed_once or self.xs.read(f"{self.fe}/state") not in ("5", "6"):
                return
            self._closed_once = True
            self.xs.write(f"{self.be}/state", "6")
        except (OSError, ConnectionError):
            pass

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(TIMEOUT)
        try:
            self._watch.unwatch()
        except OSError:
            pass
        for ring in self.rings.values():
            ring.close()
        if self.ring is not None:
            self.ring.release()
        if self.mapping is not None:
            self.mapping.unmap()
        self.evtchn.close()
        self.gnttab.close()
        self.xs.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


@pytest.fixture
def log() -> Iterator[LogWatch]:
    watch = LogWatch()
    logger = logging.getLogger("pvcalls.frontend")
    logger.addHandler(watch)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    yield watch
    logger.setLevel(old)
    logger.removeHandler(watch)


@pytest.fixture
def fake(host: SimHost) -> Iterator[FakeBackend]:
    fb = FakeBackend(host, host.create_domain("victim"))
    yield fb
    fb.close()
    assert fb.failures == []


@pytest.fixture
def fe(fake: FakeBackend) -> Iterator[pvcalls.Frontend]:
    f = pvcalls.Frontend(fake.guest, timeout=TIMEOUT)
    f.open()
    yield f
    done = Call(f.close).join()  # close() must return, whatever the backend did
    assert done.error is None, done.error


def connected(fe: pvcalls.Frontend, fake: FakeBackend) -> tuple[pvcalls.PVSocket, FakeDataRing]:
    """A socket connected through the fake (which maps its data ring)."""
    s = fe.socket()
    s.connect(("127.0.0.1", 7))
    return s, fake.rings[s.id]


def _listener(fe: pvcalls.Frontend) -> pvcalls.PVSocket:
    """A socket listening on port 4000, with the test's timeout."""
    ls = fe.socket()
    ls.bind(("127.0.0.1", 4000))
    ls.listen()
    ls.settimeout(TIMEOUT)
    return ls


# -- responses that answer nothing -------------------------------------------------


_BOGUS: dict[str, Callable[[Request, Request, pvcalls.PVSocket], dict[str, int]]] = {
    # Linux's frontend would index its response table with these.
    "req_id one ring beyond": lambda b, c, other: {"req_id": b.req_id + RING_SLOTS},
    "req_id one past the table": lambda b, c, other: {"req_id": RING_SLOTS},
    "req_id 0xffffffff": lambda b, c, other: {"req_id": 0xFFFFFFFF},
    "req_id of a free slot": lambda b, c, other: {
        "req_id": next(i for i in range(RING_SLOTS) if i not in (b.req_id, c.req_id))},
    "wrong cmd": lambda b, c, other: {"cmd": PVCALLS_LISTEN},
    "wrong socket id": lambda b, c, other: {"sock_id": other.id},
}


def _bind_in_flight(fe: pvcalls.Frontend, fake: FakeBackend
                    ) -> tuple[pvcalls.PVSocket, pvcalls.PVSocket, Call, Request, Request]:
    """A BIND held by the backend (``s``, ``binding``, ``bind_req``), and a
    second request whose response slot can carry a bogus answer (the ring
    cannot hold more responses than requests): a CONNECT of ``other``,
    given up by its caller."""
    s, other = fe.socket(), fe.socket()
    fake.hold = {PVCALLS_BIND, PVCALLS_CONNECT}
    binding = Call(lambda: s.bind(("127.0.0.1", 4000)))
    bind_req = fake.next_request(PVCALLS_BIND)
    other.settimeout(0.05)
    with pytest.raises(TimeoutError):
        other.connect(("127.0.0.1", 4001))
    return s, other, binding, bind_req, fake.next_request(PVCALLS_CONNECT)


def _accept_in_flight(fe: pvcalls.Frontend, fake: FakeBackend
                      ) -> tuple[pvcalls.PVSocket, Request, Any, pvcalls.PVSocket]:
    """A non-blocking listener whose accept() took a POLL's answer and
    sent its ACCEPT, which the backend holds (``fake.hold`` must hold
    ACCEPT): the listener, the request, its response slot and the socket
    it offers.  (The accept() that sends it has a short timeout: a
    non-blocking one would wait the frontend's timeout for the answer.)"""
    ls = fe.socket()
    ls.bind(("127.0.0.1", 4000))
    ls.listen()
    ls.setblocking(False)
    # The POLL is held until accept() has returned: answered at once, it
    # could come before accept() looks, which would then take it and send
    # the ACCEPT itself.
    held = fake.hold
    fake.hold = held | {PVCALLS_POLL}
    with pytest.raises(BlockingIOError):
        ls.accept()  # its POLL goes out
    poll = fake.next_request(PVCALLS_POLL)
    fake.hold = held
    fake.respond(poll, 0)
    wait_until(lambda: ls._poll_ready)
    ls.settimeout(0.05)
    with pytest.raises(TimeoutError):
        ls.accept()  # its ACCEPT goes out, held
    ls.setblocking(False)
    req = fake.next_request(PVCALLS_ACCEPT)
    assert ls._st.accept_inflight is not None
    _, slot, new = ls._st.accept_inflight
    return ls, req, slot, new


@pytest.mark.parametrize("kind", list(_BOGUS))
def test_a_response_that_matches_no_request_is_dropped_with_a_warning(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch, kind: str) -> None:
    """A BIND is in flight; the backend answers with a response that looks
    like its answer (an error) but differs in req_id, cmd or id.  It is
    dropped with a warning and the BIND still waits; the real answer then
    completes it."""
    s, other, binding, bind_req, carrier = _bind_in_flight(fe, fake)
    fields = {"req_id": bind_req.req_id, "cmd": PVCALLS_BIND, "sock_id": s.id}
    fields.update(_BOGUS[kind](bind_req, carrier, other))
    fake.respond(carrier, -EADDRINUSE, **fields)
    said = log.wait("dropping unexpected response")
    assert f"req_id={fields['req_id']} cmd={fields['cmd']} id={fields['sock_id']:#x}" in said
    with fe._lock:
        slot = fe._slots[bind_req.req_id]
        assert slot is not None and not slot.done  # taken for nothing
    assert binding.alive()
    fake.respond(bind_req, 0)
    assert binding.join().error is None
    assert s.getsockname() == ("127.0.0.1", 4000)
    s.close()
    other.close()


def test_a_second_answer_to_one_request_is_dropped(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """The answer, then the same answer again with an error, published
    together: the first counts, the second is dropped with a warning."""
    s, other, binding, bind_req, carrier = _bind_in_flight(fe, fake)
    again = {"req_id": bind_req.req_id, "cmd": PVCALLS_BIND, "sock_id": s.id}
    fake.respond_many([(bind_req, 0, {}), (carrier, -EADDRINUSE, again)])
    assert binding.join().error is None
    log.wait(f"dropping unexpected response req_id={bind_req.req_id} cmd={PVCALLS_BIND}")
    s.close()
    other.close()


# -- error numbers ---------------------------------------------------------------------


_ERRNOS = [
    (-EADDRINUSE, errno.EADDRINUSE),
    (-ENOTSUPP, errno.EOPNOTSUPP),  # Linux's internal ENOTSUPP
    (-4000, errno.EIO),  # no such errno
    (-(1 << 31), errno.EIO),
    # Not BlockingIOError or InterruptedError, which callers take for "try
    # again": a makefile() reader took EAGAIN in in_error for the end of the
    # stream, and a select() loop spun on a readable fileno() whose recv()
    # said it would block.
    (-EAGAIN, errno.EPROTO),
    (-EINPROGRESS, errno.EPROTO),
    (-EINTR, errno.EPROTO),
]


@pytest.mark.parametrize(("ret", "expected"), _ERRNOS)
@pytest.mark.parametrize("cmd", ["socket", "bind", "listen", "connect", "accept"])
def test_an_error_in_ret_is_an_oserror_by_name(
        fe: pvcalls.Frontend, fake: FakeBackend, cmd: str, ret: int, expected: int) -> None:
    """Each command answered with ``ret``: an OSError with the host's errno
    of the same name, EIO for one without a name; the frontend goes on."""
    s = fe.socket()
    s.settimeout(TIMEOUT)
    call: Callable[[], Any]
    if cmd == "socket":
        fake.rets[PVCALLS_SOCKET] = ret
        call = fe.socket
    elif cmd == "bind":
        fake.rets[PVCALLS_BIND] = ret
        call = lambda: s.bind(("127.0.0.1", 4000))  # noqa: E731
    elif cmd == "listen":
        s.bind(("127.0.0.1", 4000))
        fake.rets[PVCALLS_LISTEN] = ret
        call = s.listen
    elif cmd == "connect":
        fake.rets[PVCALLS_CONNECT] = ret
        call = lambda: s.connect(("127.0.0.1", 4000))  # noqa: E731
    else:
        s.bind(("127.0.0.1", 4000))
        s.listen()
        fake.rets[PVCALLS_ACCEPT] = ret
        call = s.accept
    with pytest.raises(OSError) as info:
        call()
    assert info.value.errno == expected
    assert type(info.value) is type(OSError(expected, "x"))
    fake.rets.clear()
    with fe.socket():  # nothing else broke
        pass
    if cmd == "connect":  # the id is a new socket again, as the backend said
        s.connect(("127.0.0.1", 4000))
        assert s.getpeername() == ("127.0.0.1", 4000)
    s.close()


def test_connect_ex_returns_the_backends_etimedout(fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A CONNECT answered -ETIMEDOUT (the backend's host gave up on the
    peer): connect_ex() returns ETIMEDOUT, as socket.socket's does, not the
    EAGAIN it returns when its own timeout is over (it used to: the
    TimeoutError of both looked the same to it)."""
    s = fe.socket()
    s.settimeout(TIMEOUT)
    fake.rets[PVCALLS_CONNECT] = -ETIMEDOUT
    assert s.connect_ex(("127.0.0.1", 4000)) == errno.ETIMEDOUT
    s.close()


@pytest.mark.parametrize(("err", "timed", "aborted"), [
    (errno.ECONNREFUSED, True, True), (errno.ETIMEDOUT, True, True),
    (errno.EHOSTUNREACH, True, True), (errno.ECONNREFUSED, False, False),
    (errno.EACCES, True, False), (errno.ENETUNREACH, True, False),
    (errno.EADDRNOTAVAIL, True, False)],
    ids=["refused", "timed-out", "host-unreachable", "refused-blocking", "denied",
         "net-unreachable", "address-not-available"])
def test_which_failed_connects_make_the_next_one_fail_with_econnaborted(
        fe: pvcalls.Frontend, fake: FakeBackend, err: int, timed: bool, aborted: bool) -> None:
    """After a connect() with a timeout that the handshake failed (a
    refusal, no answer, an ICMP host unreachable: errors Linux's TCP
    meets after the SYN, which CPython reads from SO_ERROR) the next
    connect() fails with ECONNABORTED, once, as Linux's (see
    test_frontend_socket_parity.py); not after one without a timeout,
    nor after an error Linux's connect() raises before any handshake
    (the policy's EACCES, no route, no such local address).  (Xen's
    numbers for these are Linux's, the host's.)"""
    fake.rets[PVCALLS_CONNECT] = -err
    with fe.socket() as s:
        s.settimeout(TIMEOUT if timed else None)
        assert s.connect_ex(_ADDRESS) == err
        if aborted:
            assert s.connect_ex(_ADDRESS) == errno.ECONNABORTED
        assert s.connect_ex(_ADDRESS) == err  # started over


@pytest.mark.parametrize(("ret", "expected"), [*_ERRNOS, (5, errno.EIO)])
def test_an_error_in_the_data_ring_is_an_oserror_by_name(
        fe: pvcalls.Frontend, fake: FakeBackend, ret: int, expected: int) -> None:
    # A socket each: an error is the connection's, said once (then EOF
    # and EPIPE, as a TCP socket's).
    calls: list[tuple[int, Callable[[pvcalls.PVSocket], object]]] = [
        (IN_ERROR_OFFSET, lambda s: s.recv(10)), (OUT_ERROR_OFFSET, lambda s: s.send(b"x"))]
    for offset, call in calls:
        s, ring = connected(fe, fake)
        s.settimeout(TIMEOUT)
        ring.set_error(offset, ret)
        ring.notify()
        with pytest.raises(OSError) as info:
            call(s)
        assert info.value.errno == expected
        s.close()


@pytest.mark.parametrize("first", ["send", "SO_ERROR", "recv"])
def test_a_reset_the_backend_s_reader_took_is_said_before_its_sender_s_epipe(
        fe: pvcalls.Frontend, fake: FakeBackend, first: str) -> None:
    """The host socket reset: the backend's reader got ECONNRESET (the
    socket's pending error, taken), its sender then EPIPE.  The guest's
    first send() says the reset, as a TCP socket's first call after one
    does, or SO_ERROR or recv() does; then send() says EPIPE, and recv()
    the end of the stream (said once, as a TCP socket's pending error)."""
    s, ring = connected(fe, fake)
    s.settimeout(TIMEOUT)
    ring.set_error(OUT_ERROR_OFFSET, -32)  # EPIPE
    ring.set_error(IN_ERROR_OFFSET, -104)  # ECONNRESET
    ring.notify()
    try:
        if first == "send":
            with pytest.raises(ConnectionResetError):
                s.send(b"x")
        elif first == "SO_ERROR":
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
        else:
            with pytest.raises(ConnectionResetError):
                s.recv(1)
        with pytest.raises(BrokenPipeError):
            s.send(b"x")
        assert s.recv(1) == b""
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    finally:
        s.close()


@pytest.mark.parametrize("first", ["send", "SO_ERROR"])
def test_a_senders_error_other_than_epipe_is_said_before_the_readers(
        fe: pvcalls.Frontend, fake: FakeBackend, first: str) -> None:
    """Only EPIPE (the sender meeting an error its reader took) gives way
    to in_error's failure: any other out_error is the backend's word on
    the connection, said first, and said once."""
    s, ring = connected(fe, fake)
    s.settimeout(TIMEOUT)
    ring.set_error(OUT_ERROR_OFFSET, -110)  # ETIMEDOUT
    ring.set_error(IN_ERROR_OFFSET, -104)  # ECONNRESET
    ring.notify()
    try:
        if first == "send":
            with pytest.raises(TimeoutError):
                s.send(b"x")
        else:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ETIMEDOUT
        with pytest.raises(BrokenPipeError):
            s.send(b"x")
        assert s.recv(1) == b""  # the reset is not said again
    finally:
        s.close()


# -- broken indexes --------------------------------------------------------------------


@pytest.mark.parametrize("delta", [RING_SLOTS + 1, 1 << 31, -1])
def test_a_response_producer_beyond_the_requests_fails_every_waiter(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch, delta: int) -> None:
    """``rsp_prod`` more responses ahead than requests were made (or behind
    the frontend's consumer): the command ring cannot be trusted any more.
    A CONNECT and a recv() waiting without a timeout fail with ENOTCONN
    that says why, as does every later call; the slots behind the index are not read as
    responses.  (It used to log a traceback per event and leave the
    waiter blocked forever.)"""
    r, _ = connected(fe, fake)
    r.settimeout(None)
    receiving = Call(lambda: r.recv(10))
    wait_until(lambda: sleeping_in_wait(r))
    s = fe.socket()
    fake.hold = {PVCALLS_CONNECT}
    connecting = Call(lambda: s.connect(("127.0.0.1", 4000)))
    fake.next_request(PVCALLS_CONNECT)
    fake.set_rsp_prod(fake.rsp_prod_pvt + delta)
    for call in (connecting, receiving):
        err = call.oserror()
        assert err.errno == errno.ENOTCONN
        assert err.strerror == "the PV Calls backend broke the command ring"
    assert "rsp_prod" in log.wait("broke the command ring")
    with pytest.raises(OSError) as info:
        fe.socket()
    assert info.value.errno == errno.ENOTCONN
    assert info.value.strerror == "the PV Calls backend broke the command ring"
    r.close()
    s.close()


def _counted_command_events(fe: pvcalls.Frontend) -> threading.Semaphore:
    """A semaphore released each time the command ring's handler has run."""
    handled = threading.Semaphore(0)
    with fe._lock:
        handler = fe._handlers[fe._port]

        def counted() -> None:
            try:
                handler()
            finally:
                handled.release()

        fe._handlers[fe._port] = counted
    return handled


def test_a_broken_command_ring_is_read_no_more(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """Once ``rsp_prod`` was impossible, nothing on the command ring can be
    trusted, and every waiter has failed with ENOTCONN: the next events,
    the ring still broken or ``rsp_prod`` set right again with an answer
    behind it, read nothing (no answer comes to a caller who gave up, no
    entry is freed on the backend's word), and the break is logged once,
    not once per event."""
    s = fe.socket()
    fake.hold = {PVCALLS_BIND}
    binding = Call(lambda: s.bind(("127.0.0.1", 4000)))
    bind = fake.next_request(PVCALLS_BIND)
    handled = _counted_command_events(fe)
    fake.set_rsp_prod(fake.rsp_prod_pvt + 2 * RING_SLOTS)
    assert handled.acquire(timeout=TIMEOUT)
    assert binding.oserror().errno == errno.ENOTCONN
    fake.set_rsp_prod(fake.rsp_prod_pvt + 2 * RING_SLOTS)  # an event more, still broken
    assert handled.acquire(timeout=TIMEOUT)
    fake.respond(bind, 0)  # rsp_prod right again, this answer behind it
    assert handled.acquire(timeout=TIMEOUT)
    assert [m for m in log.messages() if "broke the command ring" in m] == [
        log.wait("broke the command ring")]
    assert not [m for m in log.messages(logging.DEBUG) if m.startswith("<- BIND")]
    with fe._lock:
        assert fe._slots[bind.req_id] is not None
    s.close()


def test_a_frontend_opened_again_after_its_command_ring_broke_reads_the_new_one(
        host: SimHost, log: LogWatch) -> None:
    """A broken command ring is the connection's, not the frontend's: once
    closed and opened again (with a backend that behaves), the frontend
    reads the new ring's answers rather than ignoring them as the broken
    ring's."""
    guest = host.create_domain("reopened")
    fe = pvcalls.Frontend(guest, timeout=TIMEOUT)
    first = FakeBackend(host, guest)
    try:
        fe.open()
        first.set_rsp_prod(first.rsp_prod_pvt + 2 * RING_SLOTS)
        log.wait("broke the command ring")
        assert Call(fe.close).join().error is None
    finally:
        first.close()
    assert first.failures == []
    second = FakeBackend(host, guest)
    try:
        fe.open()
        with fe.socket():
            pass
        assert Call(fe.close).join().error is None
    finally:
        fe.close()
        second.close()
    assert second.failures == []


def test_a_kick_owed_on_the_first_request_after_a_reopen_goes_out(
        host: SimHost) -> None:
    """A Ctrl-C between the push and the notify of the first request of a
    frontend opened again: the notify it owes goes out, though the last
    connection ended with as many requests pushed as the new one has now
    (one).  Its notify index is the new ring's, not the old one's, which
    took the request for notified: it and every one after it waited for
    a notify that never came."""
    guest = host.create_domain("kicked-again")
    fe = pvcalls.Frontend(guest, timeout=TIMEOUT)
    first = FakeBackend(host, guest)
    try:
        fe.open()
        first.rets[PVCALLS_SOCKET] = -pvcalls_errno.EMFILE
        with pytest.raises(OSError):
            fe.socket()  # the one request of this connection
        assert Call(fe.close).join().error is None
    finally:
        first.close()
    assert first.failures == []
    second = FakeBackend(host, guest)
    try:
        fe.open()
        second.hold = {PVCALLS_SOCKET}
        assert interrupted_as_frame_starts(_frontend.Frontend._notify.__code__, fe.socket)
        second.next_request(PVCALLS_SOCKET)  # it reached the backend
        second.hold = set()
        with fe.socket():
            pass
        assert Call(fe.close).join().error is None
    finally:
        fe.close()
        second.close()
    assert second.failures == []


def test_room_a_caller_makes_is_told_to_a_listener_waiting_for_it(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A listener's fileno() finds no response table entry to spare for its
    POLL; the entry a caller frees as it collects its answer (no command
    event after it) is room, and the event thread, woken for it, sends the
    POLL: the listener polls readable."""
    ls = _listener(fe)
    assert fe._ring is not None
    with fe._lock:
        taken = {i: _common.Slot(PVCALLS_CONNECT, 0) for i in range(RING_SLOTS - 1)}
        for i, slot in taken.items():
            fe._slots[i] = slot
    try:
        fd = ls.fileno()
        assert not ls._poll_inflight and not select.select([fd], [], [], 0)[0]
        collected = taken.pop(0)
        collected.done = True
        # A caller collecting an answer, as _call() does after the event.
        assert fe._wait_slot(0, collected, _common.Deadline(TIMEOUT)) == 0
        assert select.select([fd], [], [], TIMEOUT)[0], "the POLL did not go out"
    finally:
        with fe._lock:
            for i in taken:
                fe._slots[i] = None
    ls.close()


def test_one_reaper_at_a_time_releases_the_sockets_dropped(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket dropped while the reaper is busy releasing another is left
    to that reaper (it runs until the queue is empty): the event thread
    starts no second one.  Both are released."""
    release = fe._release
    entered = threading.Semaphore(0)
    go = threading.Event()

    def held_release(st: Any, sock: Any = None) -> None:
        entered.release()
        assert go.wait(TIMEOUT)
        release(st, sock)

    monkeypatch.setattr(fe, "_release", held_release)
    wakeup = fe._wakeup
    assert wakeup is not None
    poller = select.poll()
    poller.register(wakeup.fd, select.POLLIN)

    def round_served() -> None:
        # A round is over once the next one has taken its wake-up.
        wakeup.set()
        wait_until(lambda: not poller.poll(0))

    def reapers() -> list[threading.Thread]:
        return [t for t in threading.enumerate()
                if t.name == f"pvcalls-reap-{fe.domain.domid}" and t.is_alive()]

    ids = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for _ in range(2):
            box = [fe.socket()]
            ids.append(box[0].id)
            box.clear()
            gc.collect()
            if len(ids) == 1:
                assert entered.acquire(timeout=TIMEOUT)  # the first reaper holds it
            round_served()
            round_served()
    try:
        assert len(reapers()) == 1
    finally:
        go.set()
    wait_until(lambda: not reapers())
    with fe._lock:
        assert not set(ids) & set(fe._sockets)  # both released


def test_a_backend_notifying_without_end_starves_nothing(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """A backend that fires the command port again while each event is
    handled keeps it always pending: the event thread still goes back to
    its other descriptors, here the wake-up close() sends, and stops."""
    handled = _counted_command_events(fe)
    with fe._lock:
        counted = fe._handlers[fe._port]

        def fired_again() -> None:
            fake.evtchn.notify(fake.port)  # while the port is masked
            counted()

        fe._handlers[fe._port] = fired_again
    fake.evtchn.notify(fake.port)
    # It fires again: served on, round after round (the handle's descriptor
    # stays readable while the port is pending).
    for _ in range(2 * _frontend._PORT_BATCH + 1):
        assert handled.acquire(timeout=TIMEOUT)
    thread = fe._thread
    assert thread is not None
    assert Call(fe.close).join().error is None
    assert not thread.is_alive()
    assert not [m for m in log.messages() if "did not stop" in m]


def test_a_round_that_takes_the_last_port_at_its_limit_finds_the_queue_empty(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A round that stops at _PORT_BATCH having taken the last port
    pending read no empty queue, and the next wait blocks: the handle
    still counted its reset, and the next overflow, whenever it came,
    made one more in a row, as if the thread had never caught up since.
    Caught up each time, the frontend outlives any number of overflows,
    each reset the first in a row.  (A batch of one port: every round
    stops at its limit.)"""
    handle = fe._evtchn
    assert handle is not None
    handled = _counted_command_events(fe)
    monkeypatch.setattr(_frontend, "_PORT_BATCH", 1)
    # The count each reset leaves, taken in the event thread: a stray
    # round in between (a late event of the handshake) cannot hide it.
    in_a_row: list[int] = []
    real_reset = fe._reset

    def reset(evtchn: Any, overflow: OSError) -> None:
        real_reset(evtchn, overflow)
        in_a_row.append(fe._resets)

    monkeypatch.setattr(fe, "_reset", reset)
    for overflows in range(1, _common.RESETS_IN_A_ROW + 2):
        handle.overflow()  # type: ignore[attr-defined]
        wait_until(lambda n=overflows: len(in_a_row) == n)
        assert handled.acquire(timeout=TIMEOUT)  # the hand-out after the reset
        fake.evtchn.notify(fake.port)
        assert handled.acquire(timeout=TIMEOUT)
        wait_until(lambda: fe._resets == 0)  # the queue is empty after all
    assert in_a_row == [1] * (_common.RESETS_IN_A_ROW + 1)
    assert not fe._dead
    fe.socket().close()


def test_a_handle_overflowing_after_every_reset_under_a_steady_port_is_broken(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds that stop at _PORT_BATCH with a port still pending (the
    backend fires it again as each event is handled) never found the
    queue empty: a handle that overflows again after each reset is still
    taken for broken after RESETS_IN_A_ROW of them, not reset for ever.
    (A batch of one port; each overflow comes in the round after the
    hand-out, as the round stops at its limit.)"""
    handle = fe._evtchn
    assert handle is not None
    thread = fe._thread
    assert thread is not None
    monkeypatch.setattr(_frontend, "_PORT_BATCH", 1)
    real_reset = handle.reset
    since_reset = [0]
    left = [_common.RESETS_IN_A_ROW + 2]  # a bound for a frontend that never gives up

    def reset() -> None:
        real_reset()
        since_reset[0] = 0

    with fe._lock:
        handler = fe._handlers[fe._port]

        def fired_again() -> None:
            handler()
            since_reset[0] += 1
            if left[0]:
                fake.evtchn.notify(fake.port)  # while the port is masked
                if since_reset[0] == 2:  # in the round after the hand-out
                    left[0] -= 1
                    handle.overflow()  # type: ignore[attr-defined]

        fe._handlers[fe._port] = fired_again
    monkeypatch.setattr(handle, "reset", reset)
    handle.overflow()  # type: ignore[attr-defined]
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the event thread resets the handle for ever"
    with pytest.raises(OSError) as info:
        fe.socket()
    assert info.value.errno == errno.EIO
    assert "overflowed again" in info.value.strerror, info.value.strerror


def _in_far_ahead(ring: FakeDataRing) -> None:
    ring.put(IN_PROD_OFFSET, ring.get(IN_CONS_OFFSET) + 2 * ring.size)


def _in_cons_beyond_prod(ring: FakeDataRing) -> None:
    ring.put(IN_CONS_OFFSET, ring.get(IN_PROD_OFFSET) + 3)


def _in_one_too_many(ring: FakeDataRing) -> None:
    ring.put(IN_PROD_OFFSET, ring.get(IN_CONS_OFFSET) + ring.size + 1)


_IN_BREAKS = {"prod far ahead": _in_far_ahead, "cons beyond prod": _in_cons_beyond_prod,
              "one byte too many": _in_one_too_many}


@pytest.mark.parametrize("blocked", [False, True], ids=["ready", "blocked"])
@pytest.mark.parametrize("brk", list(_IN_BREAKS))
def test_broken_in_indexes_fail_recv_with_eproto(
        fe: pvcalls.Frontend, fake: FakeBackend, brk: str, blocked: bool) -> None:
    """In-ring indexes that claim more than the ring holds: recv() (already
    waiting without timeout, or called after) raises EPROTO and copies
    nothing; the buffer is untouched."""
    s, ring = connected(fe, fake)
    ring.produce(b"hello")  # wrap-free, correct data first
    assert s.recv(5) == b"hello"
    buf = bytearray(b"-" * 64)
    s.settimeout(None)
    receiving = Call(lambda: s.recv_into(buf))
    if blocked:
        wait_until(lambda: sleeping_in_wait(s))
    _IN_BREAKS[brk](ring)
    ring.notify()
    err = receiving.oserror()
    assert err.errno == errno.EPROTO, err
    assert "broke the data ring" in str(err)
    assert buf == b"-" * 64
    s.close()


def test_whether_the_in_ring_was_full_is_judged_by_the_index_consumed_from(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """recv() reads in_cons from the page once: the index it consumes from
    also decides whether the ring was full (and the backend waits for a
    notify), however the backend rewrites the word meanwhile."""
    s, ring = connected(fe, fake)
    ring.produce(bytes(ring.size))  # full
    inq = s._st.ring.inq
    readable = FlexRing.readable

    def backend_stores_then_readable(self: FlexRing) -> tuple[memoryview, ...]:
        if self is inq:
            ring.put(IN_CONS_OFFSET, 1)  # the backend, on another CPU: "one byte was read"
        return readable(self)

    notified: list[int] = []
    monkeypatch.setattr(FlexRing, "readable", backend_stores_then_readable)
    monkeypatch.setattr(s._st.ring, "notify", lambda: notified.append(1))
    assert len(s.recv(ring.size)) == ring.size - 1
    assert notified == []  # the ring it read from held size - 1 bytes: not full
    s.close()


def _fill_out_ring(s: pvcalls.PVSocket, ring: FakeDataRing) -> None:
    s.settimeout(0.0)
    sent = 0
    while True:
        try:
            sent += s.send(b"z" * ring.size)
        except BlockingIOError:
            break
    assert sent == ring.size
    assert ring.get(OUT_PROD_OFFSET) - ring.get(OUT_CONS_OFFSET) == ring.size


def _out_cons_beyond_prod(ring: FakeDataRing) -> None:
    ring.put(OUT_CONS_OFFSET, ring.get(OUT_PROD_OFFSET) + 100)


def _out_cons_far_behind(ring: FakeDataRing) -> None:
    ring.put(OUT_CONS_OFFSET, ring.get(OUT_PROD_OFFSET) - 2 * ring.size)


_OUT_BREAKS = {"cons beyond prod": _out_cons_beyond_prod, "cons far behind": _out_cons_far_behind}


@pytest.mark.parametrize("blocked", [False, True], ids=["ready", "blocked"])
@pytest.mark.parametrize("brk", list(_OUT_BREAKS))
def test_broken_out_indexes_fail_send_with_eproto(
        fe: pvcalls.Frontend, fake: FakeBackend, brk: str, blocked: bool) -> None:
    """``out_cons`` moved where no consumer can be: send() raises EPROTO
    and writes nothing, also a send() already waiting (no timeout) for room
    in a full ring when the backend breaks the index and notifies."""
    s, ring = connected(fe, fake)
    _fill_out_ring(s, ring)
    before = bytes(ring.data_map.buffer)
    prod = ring.get(OUT_PROD_OFFSET)
    s.settimeout(None)
    sending = Call(lambda: s.send(b"y" * 10))
    if blocked:
        wait_until(lambda: sleeping_in_wait(s))
    _OUT_BREAKS[brk](ring)
    ring.notify()
    err = sending.oserror()
    assert err.errno == errno.EPROTO, err
    assert ring.get(OUT_PROD_OFFSET) == prod
    assert bytes(ring.data_map.buffer) == before
    s.close()


# -- timeouts ------------------------------------------------------------------------------


def test_the_sendall_timeout_bounds_the_whole_call(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer taking 4 KiB every 0.6 s keeps each wait for room short, but
    sendall() with a 1 s timeout times out after the second one: since
    Python 3.5 socket.socket's timeout is the most the whole call may take.
    (It used to restart with every chunk sent.)  The frontend's clock is
    the test's, so no wait is real."""
    s, ring = connected(fe, fake)
    now = [time.monotonic()]
    monkeypatch.setattr(pvcalls.frontend._common, "time",
                        types.SimpleNamespace(monotonic=lambda: now[0]))
    s.settimeout(1.0)
    step = 4096
    prod0 = ring.get(OUT_PROD_OFFSET)
    sender = Call(lambda: s.sendall(bytes(ring.size + 4 * step)))
    copied = ring.size
    for _ in range(4):
        # All that fits is in the ring, and the sender sleeps for room.
        wait_until(lambda copied=copied: not sender.alive() or (
            (ring.get(OUT_PROD_OFFSET) - prod0) & 0xFFFFFFFF == copied
            and sleeping_in_wait(s)))
        if not sender.alive():
            break
        now[0] += 0.6
        ring.put(OUT_CONS_OFFSET, ring.get(OUT_CONS_OFFSET) + step)
        ring.notify()
        copied += step
    assert isinstance(sender.join().error, TimeoutError), sender.error
    assert copied == ring.size + 2 * step  # 1.2 s: out of time at the second wait
    s.close()


# -- POLL --------------------------------------------------------------------------------


@pytest.mark.parametrize(("ret", "expected"), _ERRNOS)
def test_a_poll_answered_with_an_error_fails_that_accept_only(
        fe: pvcalls.Frontend, fake: FakeBackend, ret: int, expected: int) -> None:
    ls = _listener(fe)
    fake.rets[PVCALLS_POLL] = ret
    with pytest.raises(OSError) as info:
        ls.accept()
    assert info.value.errno == expected
    assert "accept (poll)" in str(info.value)
    fake.rets.clear()
    new, peer = ls.accept()  # a new POLL, then ACCEPT
    assert peer == ("0.0.0.0", 0) and new.id in fake.rings
    new.close()
    ls.close()


def test_a_poll_error_makes_fileno_readable(fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """The error answering fileno()'s POLL makes the descriptor readable
    and is what the next accept() raises, even non-blocking (it used to be
    wiped by a new POLL: EAGAIN, the error never seen)."""
    ls = fe.socket()
    ls.bind(("127.0.0.1", 4000))
    ls.listen()
    fake.hold = {PVCALLS_POLL}
    fd = ls.fileno()
    poll = fake.next_request(PVCALLS_POLL)
    assert select.select([fd], [], [], 0)[0] == []
    fake.respond(poll, -EINVAL)
    assert select.select([fd], [], [], TIMEOUT)[0] == [fd]
    ls.setblocking(False)
    with pytest.raises(OSError) as info:
        ls.accept()  # what the readable descriptor promised: no EAGAIN
    assert info.value.errno == errno.EINVAL
    assert "accept (poll)" in str(info.value)
    # Reported once; the descriptor waits again, on a new POLL.
    poll = fake.next_request(PVCALLS_POLL)
    assert select.select([fd], [], [], 0)[0] == []
    fake.respond(poll, 0)
    assert select.select([fd], [], [], TIMEOUT)[0] == [fd]
    ls.settimeout(TIMEOUT)  # non-blocking, the ACCEPT would be left in flight
    new, _ = ls.accept()
    new.close()
    ls.close()


def test_no_poll_goes_out_while_accept_sends_its_accept(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the POLL's answer and the ACCEPT going out, a first fileno()
    in another thread (a selector registering the listener) sends no POLL:
    a POLL and an ACCEPT in flight together get the ACCEPT -EINTR from
    Linux's backend and ours."""
    ls = fe.socket()
    ls.bind(("127.0.0.1", 4000))
    ls.listen()
    fake.hold = {PVCALLS_POLL, PVCALLS_ACCEPT}
    in_window, go = threading.Event(), threading.Event()
    new_socket = fe._new_socket

    def paused(**kwargs: bool) -> pvcalls.PVSocket:  # accept() between the answer and its ACCEPT
        in_window.set()
        assert go.wait(TIMEOUT)
        return new_socket(**kwargs)

    monkeypatch.setattr(fe, "_new_socket", paused)
    acceptor = Call(ls.accept)
    try:
        fake.respond(fake.next_request(PVCALLS_POLL), 0)  # a connection is pending
        assert in_window.wait(TIMEOUT)
        monkeypatch.setattr(fe, "_new_socket", new_socket)
        ls.fileno()
    finally:
        go.set()
    accept = fake.next_request(PVCALLS_ACCEPT)  # not a second POLL first
    fake.respond(accept, 0)
    new, _ = acceptor.join().result
    new.close()
    ls.close()


def test_the_socket_an_accept_offers_is_not_listed_until_accepted(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """Frontend.sockets() lists the caller's sockets: not the one an ACCEPT
    in flight offers the backend (a caller closing every socket listed
    would release it, and the backend answer the ACCEPT -EINTR)."""
    ls = fe.socket()
    ls.bind(("127.0.0.1", 4000))
    ls.listen()
    fake.hold = {PVCALLS_ACCEPT}
    acceptor = Call(ls.accept)  # its POLL answered at once
    accept = fake.next_request(PVCALLS_ACCEPT)
    assert fe.sockets() == [ls]
    fake.respond(accept, 0)
    new, _ = acceptor.join().result
    assert fe.sockets() == [ls, new]
    new.close()
    ls.close()


def test_a_positive_accept_answer_is_a_connection_to_release(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """An ACCEPT answered with a positive ``ret`` (only 0 or a negative
    errno may be) is read as a connection, as accept() reads it: closing
    the listener before accept() took it releases that socket, not drop it
    with no RELEASE and hand its ring, still the backend's, to the next
    socket (it used to: only a ``ret`` of 0 counted there)."""
    fake.hold = {PVCALLS_ACCEPT}
    ls, req, slot, new = _accept_in_flight(fe, fake)
    fake.rings[req.id_new] = FakeDataRing(fake, req.ref, req.evtchn)  # a connection
    fake.respond(req, 1)
    wait_until(lambda: slot.done)
    assert "ret 1" in log.wait("positive ret")
    ls.close()
    wait_until(lambda: new.id not in fe._sockets)
    with fe.socket():  # answered after every command sent before it
        pass
    assert new.id not in fake.rings  # released


def test_two_threads_closing_one_socket_send_one_release(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """close() in two threads at once sends one RELEASE: a second would be
    answered EBADF (with a warning), or release a socket of the same id
    made since."""
    s, _ = connected(fe, fake)
    fake.hold = {PVCALLS_RELEASE}
    real_close = pvcalls.PVSocket._real_close
    pause = PauseAt(real_close, "self._closed = True")
    first = Call(lambda: pause.run(s.close))
    try:
        assert pause.reached.wait(TIMEOUT)
        second = Call(s.close)
        # Either the second close() went all the way (the race), or it
        # waits for the first to have marked the socket closed.
        wait_until(lambda: done_or_at(second, real_close, "with self._mutex"))
    finally:
        pause.resume()
    first.join()
    second.join()
    fence = fe.socket()  # answered after every command sent before it
    assert fake.requests.qsize() == 1
    fake.hold = set()
    fake.respond(fake.next_request(PVCALLS_RELEASE), 0)
    fence.close()


def test_fileno_racing_close_keeps_no_descriptor(fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """fileno() that saw the socket open, then lost the race with close(),
    makes no eventfd (close() had nothing to close) and returns -1."""
    s, _ = connected(fe, fake)
    pause = PauseAt(pvcalls.PVSocket.fileno, "with self._mutex")
    call = Call(lambda: pause.run(s.fileno))
    try:
        assert pause.reached.wait(TIMEOUT)
        s.close()
    finally:
        pause.resume()
    assert call.join().result == -1
    assert s._st.readyfd is None


@pytest.mark.parametrize("failing", ["_new_data_ring", "_submit"])
def test_a_failed_accept_leaves_the_connection_pending(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        failing: str) -> None:
    """accept() that took the POLL's answer but could not send its ACCEPT
    (no descriptor for the new socket's ring, or no room for the command)
    leaves the connection for the next accept(), with no new POLL, and
    keeps nothing of the socket it made for it."""
    ls = fe.socket()
    ls.bind(("127.0.0.1", 4000))
    ls.listen()
    fake.hold = {PVCALLS_POLL, PVCALLS_ACCEPT}
    held = dict(fe._sockets)

    def cannot(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    fd = ls.fileno()  # its POLL goes out before the failure is set up
    poll = fake.next_request(PVCALLS_POLL)
    monkeypatch.setattr(fe, failing, cannot)
    acceptor = Call(ls.accept)
    fake.respond(poll, 0)
    assert acceptor.oserror().errno == errno.EMFILE
    monkeypatch.undo()
    assert fe._sockets == held
    assert select.select([fd], [], [], 0)[0] == [fd]  # accept() would not block
    ls.settimeout(TIMEOUT)
    acceptor = Call(ls.accept)
    fake.respond(fake.next_request(PVCALLS_ACCEPT), 0)  # straight to the ACCEPT
    new, _ = acceptor.join().result
    new.close()
    ls.close()


# -- silence and departure ---------------------------------------------------------------


def test_a_backend_that_never_answers(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """Every call with a timeout times out; close() of a socket returns at
    once and close() of the frontend within its timeout (the join says
    whether it returned, and the log that it gave up on the answers)."""
    s = fe.socket()
    ls = fe.socket()
    ls.bind(("127.0.0.1", 4000))
    ls.listen()
    fake.hold = {PVCALLS_SOCKET, PVCALLS_CONNECT, PVCALLS_BIND, PVCALLS_LISTEN,
                 PVCALLS_ACCEPT, PVCALLS_POLL, PVCALLS_RELEASE}
    fe.timeout = 0.3
    assert isinstance(Call(fe.socket).join().error, TimeoutError)
    s.settimeout(0.3)
    assert isinstance(Call(lambda: s.connect(("127.0.0.1", 4001))).join().error, TimeoutError)
    with pytest.raises(OSError) as info:
        s.recv(1)  # the CONNECT that timed out left the socket unusable
    assert info.value.errno == errno.ENOTCONN
    ls.settimeout(0.3)
    assert isinstance(Call(ls.accept).join().error, TimeoutError)
    Call(s.close).join(TIMEOUT)
    Call(ls.close).join(TIMEOUT)
    closing = Call(fe.close).join(TIMEOUT)
    assert closing.error is None
    log.wait("not answered")


def test_a_release_sent_as_the_frontend_gives_up_on_it_frees_the_ring(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket's close() whose RELEASE goes out (slowly: it waited for
    room, say) just as Frontend.close() gives up waiting for the answers:
    the ring that close() then takes from the socket is freed, by it or by
    Frontend.close().  Before, Frontend.close() freed what the release held
    (nothing yet) and only then gave it up, and a close() that took the
    ring in between left it to an answer that was no longer waited for:
    its pages, port and eventfds kept for the life of the process."""
    from pvcalls.frontend import _frontend
    from pvcalls.frontend._ring import DataRing

    s, _ = connected(fe, fake)
    ring = s._st.ring
    assert ring is not None
    freed: list[DataRing] = []
    free = DataRing.free

    def recorded(self: DataRing) -> None:
        freed.append(self)
        free(self)

    monkeypatch.setattr(DataRing, "free", recorded)
    fake.hold = {PVCALLS_RELEASE}
    fe.timeout = 0.3  # how long Frontend.close() waits for the answer
    sending = PauseAt.in_method(monkeypatch, _frontend.Frontend, "_send_release",
                                "rel.settled = True")
    gave_up, go = threading.Event(), threading.Event()
    waiting = threading.local()
    wait_releases, finish = fe._wait_releases, fe._finish_release

    def marked() -> None:
        waiting.on = True
        wait_releases()

    def finish_then_pause(rel: Any, *, released: bool) -> None:
        finish(rel, released=released)
        if getattr(waiting, "on", False) and not gave_up.is_set():
            gave_up.set()
            go.wait(TIMEOUT)

    monkeypatch.setattr(fe, "_wait_releases", marked)
    monkeypatch.setattr(fe, "_finish_release", finish_then_pause)
    closing = Call(s.close)
    assert sending.reached.wait(TIMEOUT)  # the RELEASE went out
    frontend_closing = Call(fe.close)
    assert gave_up.wait(TIMEOUT)  # not answered: what the release held is freed
    sending.resume()
    assert closing.join().error is None  # took the ring, for the answer
    go.set()
    assert frontend_closing.join().error is None
    assert ring in freed


def test_a_data_ring_whose_view_is_held_is_freed_all_the_same(
        host: SimHost, fe: pvcalls.Frontend, fake: FakeBackend,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A data ring freed while something holds a buffer exported from
    one of its views (a cffi buffer over it, here): the view cannot be
    released, and stays on the zero pages its grants leave behind, but
    the rest is freed, and so are the rings freed after it.  Before, the
    BufferError stopped DataRing.free() before the pages were unshared,
    left the ring first in line to be freed, and came out of every later
    ring's return (each socket's close, Frontend.close()) with none of
    them freed."""
    from pvcalls.frontend import _frontend

    monkeypatch.setattr(_frontend, "_RING_POOL_MAX", 0)  # freed, not pooled
    before = host.hypervisor.stats()
    s, _ = connected(fe, fake)
    assert s._st.ring is not None
    pin = _wire.ffi.from_buffer("char[]", s._st.ring.indexes)
    s.close()
    other, _ = connected(fe, fake)
    other.close()
    wait_until(lambda: not fe._releases)
    assert Call(fe.close).join().error is None
    wait_until(lambda: all(n <= before[k] for k, n in host.hypervisor.stats().items()))
    assert pin[0] == b"\0"  # on the zero pages
    del pin


def test_a_data_ring_whose_port_cannot_be_unbound_is_freed_all_the_same(
        host: SimHost, fe: pvcalls.Frontend, fake: FakeBackend,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A data ring freed when unbinding its port fails (the host no longer
    has it): the failed step is done, and the rest of the ring is freed
    (its handle, eventfds and pages) by the same free().  Taken for a step
    still to do, it would be tried again for ever, with the event thread
    that frees the ring on the RELEASE answer."""
    from pvcalls.frontend import _frontend

    monkeypatch.setattr(_frontend, "_RING_POOL_MAX", 0)  # freed, not pooled
    before = host.hypervisor.stats()
    s, _ = connected(fe, fake)
    ring = s._st.ring
    assert ring is not None and ring.direct

    def gone(port: int) -> None:
        raise OSError(errno.EINVAL, f"port {port} is not bound")

    monkeypatch.setattr(ring.evtchn, "unbind", gone)
    s.close()
    wait_until(lambda: not fe._releases and not fe._rings_to_free)
    # Its own handle closed: the port went with it.
    wait_until(lambda: all(n <= before[k] for k, n in host.hypervisor.stats().items()))


def test_a_data_ring_whose_pages_cannot_be_unshared_says_so(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Unsharing a data ring's pages fails (ENOMEM, which libxengntshr
    may return): the pages stay granted for the life of the process, and
    a warning says so; the rest of the ring was freed before."""
    from pvcalls.frontend import _frontend

    monkeypatch.setattr(_frontend, "_RING_POOL_MAX", 0)  # freed, not pooled
    s, _ = connected(fe, fake)
    ring = s._st.ring
    assert ring is not None

    def refused() -> None:
        raise OSError(errno.ENOMEM, "cannot unmap")

    monkeypatch.setattr(ring.pages, "unshare", refused)
    with caplog.at_level(logging.DEBUG, logger="pvcalls.frontend"):
        s.close()
        wait_until(lambda: not fe._releases and not fe._rings_to_free)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("unsharing its pages" in m and "cannot unmap" in m for m in warned), warned


def test_a_close_racing_one_cut_short_leaves_the_socket_to_the_next(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() in a second thread while the first is sending the RELEASE:
    it leaves the socket to the first, whose release it is.  The first,
    cut short before the RELEASE went out (a Ctrl-C, made here by its
    wait for room raising KeyboardInterrupt), gives the release back, and
    the next close() releases the socket.  A second close() that went on
    as if the RELEASE had gone out would take the socket out of the
    frontend's table, and the next close() would find it released: the
    socket kept in the backend for good."""
    s, _ = connected(fe, fake)
    submit = fe._submit
    waiting, go = threading.Event(), threading.Event()

    def cut_short(slot: Any, *args: Any, **kwargs: Any) -> Any:
        if slot.cmd == PVCALLS_RELEASE and not waiting.is_set():
            waiting.set()
            go.wait(TIMEOUT)
            raise KeyboardInterrupt  # nothing went out
        return submit(slot, *args, **kwargs)

    monkeypatch.setattr(fe, "_submit", cut_short)
    first = Call(s.close)
    assert waiting.wait(TIMEOUT)
    assert Call(s.close).join().error is None
    go.set()
    assert isinstance(first.join().error, KeyboardInterrupt)
    assert s.id in fake.rings  # not released yet
    s.close()
    wait_until(lambda: s.id not in fake.rings)  # the backend had its RELEASE


def test_a_blocking_send_the_backend_leaves_mid_call_returns_what_went(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A blocking send() that filled the out ring and waits for room when
    the backend goes Closing returns how much went into the ring; the
    next call says that the backend went away."""
    s, ring = connected(fe, fake)
    s.settimeout(None)
    sending = Call(lambda: s.send(bytes(2 * ring.size)))
    wait_until(lambda: sleeping_in_wait(s))
    fake.set_state(5)
    assert sending.join().error is None, sending.error
    assert sending.result == ring.size
    with pytest.raises(OSError) as info:
        s.send(b"x")
    assert (info.value.errno, info.value.strerror) == (
        errno.ENOTCONN, "the PV Calls backend went away")
    s.close()


def test_sendfile_out_of_time_leaves_the_position_after_the_last_byte_sent(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """sendfile() from a file that is no regular one, cut short by its
    timeout with some sent, leaves the file's position after the last byte
    sent (as socket.socket's), not after what it read."""
    s, ring = connected(fe, fake)
    s.settimeout(0.05)
    f = io.BytesIO(bytes(4 * ring.size))
    with pytest.raises(TimeoutError):
        s.sendfile(f)  # the backend consumes nothing
    assert f.tell() == ring.size
    s.close()


def test_a_sendall_out_of_time_with_a_byte_left_raises(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """sendall() whose timeout passes with all but one byte sent raises
    TimeoutError: it did not send all."""
    s, ring = connected(fe, fake)
    s.settimeout(0.05)
    with pytest.raises(TimeoutError):
        s.sendall(bytes(ring.size + 1))  # the backend consumes nothing
    assert ring.get(OUT_PROD_OFFSET) - ring.get(OUT_CONS_OFFSET) == ring.size
    s.close()


def test_the_backend_closing_mid_call_fails_the_waiters(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """Calls blocked without a timeout (a CONNECT, a SOCKET, a recv) when
    the backend goes Closing: each fails with ENOTCONN saying so."""
    s, ring = connected(fe, fake)
    s.settimeout(None)
    c = fe.socket()
    c.settimeout(None)
    fake.hold = {PVCALLS_SOCKET, PVCALLS_CONNECT}
    receiving = Call(lambda: s.recv(10))
    connecting = Call(lambda: c.connect(("127.0.0.1", 4000)))
    creating = Call(fe.socket)
    held = {fake.requests.get(timeout=TIMEOUT).cmd for _ in range(2)}
    assert held == {PVCALLS_SOCKET, PVCALLS_CONNECT}
    wait_until(lambda: sleeping_in_wait(s))
    fake.set_state(5)
    for call in (receiving, connecting, creating):
        err = call.oserror()
        assert err.errno == errno.ENOTCONN
        assert err.strerror == "the PV Calls backend went away"
    s.close()
    c.close()


@pytest.mark.parametrize("closer", ["socket", "frontend"])
def test_close_returns_while_a_connect_waits_for_an_answer_that_never_comes(
        fe: pvcalls.Frontend, fake: FakeBackend, closer: str) -> None:
    """A CONNECT the backend never answers, waited for without a timeout:
    close() of the socket (or of the frontend) from another thread returns,
    and the blocked connect() fails with EBADF as close() promises.  (Both
    used to hang: connect() did not look at the socket closing, and close()
    waits for the socket's locks, which connect() held.)"""
    s = fe.socket()
    s.settimeout(None)
    fake.hold = {PVCALLS_CONNECT, PVCALLS_RELEASE}
    fe.timeout = 0.3  # close() of the frontend waits this long for RELEASE
    connecting = Call(lambda: s.connect(("127.0.0.1", 4000)))
    fake.next_request(PVCALLS_CONNECT)
    closing = Call(s.close if closer == "socket" else fe.close).join()
    assert closing.error is None
    assert connecting.oserror().errno == errno.EBADF
    assert s.closed


def test_a_release_the_event_thread_cannot_send_is_given_up_at_once(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing a listener whose ACCEPT was answered with a connection
    releases that connection's socket from the event thread, which must not
    wait for a command slot (only it frees them).  If no response table
    entry is free (made to look so here: a request no longer waits for the
    one entry of its slot index, and the listener's answered RELEASE frees
    one), the RELEASE is given up with a warning, its ring is not reused,
    and the frontend goes on."""
    fake.hold = {PVCALLS_ACCEPT}
    ls, accept_req, slot, new = _accept_in_flight(fe, fake)
    ring = new._st.ring
    fake.respond(accept_req, 0)  # a connection, that nobody accept()s
    wait_until(lambda: slot.done)
    free_entry = fe._free_entry

    def none_for_the_event_thread() -> int | None:
        return None if threading.current_thread() is fe._thread else free_entry()

    monkeypatch.setattr(fe, "_free_entry", none_for_the_event_thread)
    ls.close()
    assert f"RELEASE of {new.id:#x} failed" in log.wait("RELEASE of")
    assert new.closed
    wait_until(lambda: new not in fe.sockets())  # the event thread goes on to free it
    assert ring is not None and ring not in fe._ring_pool
    monkeypatch.undo()
    s = fe.socket()
    s.bind(("127.0.0.1", 4002))
    s.close()


def test_a_frontend_close_waiting_for_a_release_that_cannot_go_out_ends_with_it(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frontend.close() (not in the main thread: it waits with no recheck)
    waits for another thread's RELEASE, which finds no room on the command
    ring until its timeout: once that gives up, close() goes on at once,
    not at its own timeout."""
    s = fe.socket()
    monkeypatch.setattr(fe, "_free_entry", lambda: None)  # no room for anyone
    fe.timeout = 0.5
    closing = Call(s.close)  # its RELEASE waits for room
    # Or has given up already: a main thread stalled past the 0.5 s (a
    # loaded machine) sees no waiter ever, and Frontend.close() none to wait for.
    wait_until(lambda: bool(fe._cmd_cond._waiters) or not closing.alive())
    fe.timeout = TIMEOUT  # for Frontend.close(): the RELEASE's wait began
    frontend_closing = Call(fe.close)
    wait_until(lambda: done_or_at(frontend_closing, pvcalls.Frontend._wait_releases,
                                  "self._cmd_cond.wait("))
    assert closing.join().error is None  # the RELEASE given up, the socket freed
    assert frontend_closing.join(TIMEOUT / 2).error is None


def test_close_leaves_a_pending_accept_to_the_call_that_holds_its_lock(
        fe: pvcalls.Frontend, fake: FakeBackend, caplog: pytest.LogCaptureFixture) -> None:
    """close() finds the listener's accept lock held (by a call that never
    returns): it says so at the frontend's timeout and leaves the pending
    ACCEPT, and the socket it offers, to that call, also once it took
    the recv and send locks that guard the ring (before, the ACCEPT was
    taken from under the lock then, its socket freed under its user)."""
    fake.hold = {PVCALLS_ACCEPT}
    ls, _, _, new = _accept_in_flight(fe, fake)
    inflight = ls._st.accept_inflight
    ring = new._st.ring
    ls._accept_lock.acquire()  # as a call that never returns holds it
    fe.timeout = 0.5
    ls.close()
    fe.timeout = TIMEOUT
    assert "its accept lock is still held" in caplog.text
    assert ls._st.accept_inflight is inflight
    assert ring is not None and new._st.ring is ring and not _freed(ring)


def test_a_release_the_backend_left_before_it_went_out_is_no_warning(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """close() waits for room for its RELEASE, and the backend goes away
    meanwhile: the socket it would release went with the backend, so the
    RELEASE that cannot go out is nothing to warn about (it used to be a
    warning per socket whenever closes raced the backend's end)."""
    s = fe.socket()
    s.bind(("127.0.0.1", 4003))
    monkeypatch.setattr(fe, "_free_entry", lambda: None)  # no room for anyone
    closing = Call(s.close)
    wait_until(lambda: bool(fe._cmd_cond._waiters))  # close() waits for room
    fake.set_state(5)  # Closing
    closing.join()
    assert closing.error is None and s.closed
    assert "RELEASE of" in log.wait("RELEASE of", logging.DEBUG)
    assert not [m for m in log.messages() if "RELEASE" in m], log.messages()


def test_with_no_backend_the_device_goes_without_waiting_for_one(
        host: SimHost, caplog: pytest.LogCaptureFixture) -> None:
    """No backend runs: open() fails at its timeout, and the device goes at
    once, without asking a backend that never took it up to close (and
    warning, after a wait, that it did not)."""
    caplog.set_level(logging.INFO)
    guest = host.create_domain("alone")
    fe = pvcalls.Frontend(guest, timeout=0.1)
    with pytest.raises(OSError):
        fe.open()
    assert host.toolstack.devices(guest.domid) == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("ret", [0, -EINTR])
def test_a_connect_answered_as_the_socket_closes_is_ebadf(
        fe: pvcalls.Frontend, fake: FakeBackend, ret: int) -> None:
    """close() from another thread after the CONNECT's answer came but
    before connect() returned: connect() fails with EBADF as close()
    promises, neither succeeding on a closed socket nor reporting the
    -EINTR that the RELEASE made of the CONNECT."""
    s = fe.socket()
    s.settimeout(None)
    fake.hold = {PVCALLS_CONNECT}
    pause = PauseAt(pvcalls.PVSocket.connect, "if ret < 0:")
    connecting = Call(lambda: pause.run(lambda: s.connect(("127.0.0.1", 4000))))
    closing = None
    try:
        fake.respond(fake.next_request(PVCALLS_CONNECT), ret)
        assert pause.reached.wait(TIMEOUT)  # the answer is in, connect() goes on
        # close() marks the socket closed, then waits for connect()'s locks.
        closing = Call(s.close)
        wait_until(lambda: s.closed)
    finally:
        pause.resume()
    assert connecting.oserror().errno == errno.EBADF
    assert closing.join().error is None


def test_an_accepted_socket_has_the_default_timeout_not_the_listeners(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """As socket.socket's accept(): the new socket starts with
    socket.getdefaulttimeout() (None: blocking), whatever the listener's."""
    assert socket.getdefaulttimeout() is None
    ls = _listener(fe)
    new, _ = ls.accept()  # POLL and ACCEPT answered at once
    assert new.gettimeout() is None
    assert new.getblocking()
    new.close()
    ls.close()


def test_an_accept_the_backend_refuses_keeps_nothing_of_its_new_socket(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """ACCEPT answered with an error: accept() raises it, and the socket
    it offered (which the backend never made) is gone from the frontend's
    table, with no RELEASE for it, its ring back in the pool.  The next
    accept() sends an ACCEPT of its own: the refusal was reported once."""
    ls = _listener(fe)
    held = dict(fe._sockets)
    fake.rets[PVCALLS_ACCEPT] = -EINVAL
    with pytest.raises(OSError) as info:
        ls.accept()
    assert info.value.errno == errno.EINVAL
    assert fe._sockets == held
    assert len(fe._ring_pool) == 1  # reusable: the backend did not take it
    del fake.rets[PVCALLS_ACCEPT]
    new, _ = ls.accept()
    assert new.id not in held
    new.close()
    ls.close()


@pytest.mark.parametrize("side", ["recv", "send"])
def test_close_wakes_a_blocked_call_before_the_backend_answers(
        fe: pvcalls.Frontend, fake: FakeBackend, side: str) -> None:
    """close() itself wakes a recv() or send() blocked without a timeout,
    which fails with EBADF at once: not only once the backend, answering
    the RELEASE, unbinds the ring's port (this backend holds the RELEASE)."""
    s, ring = connected(fe, fake)
    if side == "send":
        _fill_out_ring(s, ring)
    s.settimeout(None)
    fake.hold = {PVCALLS_RELEASE}
    blocked = Call(lambda: s.recv(1) if side == "recv" else s.send(b"x"))
    wait_until(lambda: sleeping_in_wait(s))
    closing = Call(s.close)
    assert blocked.oserror().errno == errno.EBADF
    assert closing.join().error is None
    # Taken before hold is cleared: the fake may not have read it yet.
    release = fake.next_request(PVCALLS_RELEASE)
    fake.hold = set()
    fake.respond(release, 0)


def test_a_socket_the_backend_refuses_is_not_kept(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """SOCKET answered with an error: socket() raises it and keeps no
    entry for the id (which would later get a RELEASE for a socket the
    backend never made)."""
    held = dict(fe._sockets)
    fake.rets[PVCALLS_SOCKET] = -EINVAL
    with pytest.raises(OSError) as info:
        fe.socket()
    assert info.value.errno == errno.EINVAL
    assert fe._sockets == held


def _readiness(s: pvcalls.PVSocket) -> tuple[bool, bool]:
    """Whether fileno() polls readable and writable, now."""
    fd = s.fileno()
    readable, writable, _ = select.select([fd], [fd], [], 0)
    return bool(readable), bool(writable)


_ADDRESS = ("127.0.0.1", 4000)


def _connecting(fe: pvcalls.Frontend, fake: FakeBackend) -> tuple[pvcalls.PVSocket, Request]:
    """A non-blocking socket whose CONNECT the backend holds, and that
    CONNECT.  fileno() is asked for first, as asyncio's sock_connect does."""
    s = fe.socket()
    s.setblocking(False)
    assert _readiness(s) == (True, True)  # a new socket: recv() and send() fail at once
    fake.hold = {PVCALLS_CONNECT}
    with pytest.raises(BlockingIOError) as info:
        s.connect(_ADDRESS)
    assert info.value.errno == errno.EINPROGRESS
    return s, fake.next_request(PVCALLS_CONNECT)


def test_a_non_blocking_connect_completes_when_the_answer_comes(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """As a TCP socket's: connect() fails with EINPROGRESS once the
    CONNECT is out; meanwhile the socket polls neither readable nor
    writable, data calls would block and connect() says EALREADY; the
    answer makes it writable with SO_ERROR 0, and the next connect()
    returns once, as Linux's, before EISCONN."""
    s, req = _connecting(fe, fake)
    assert repr(s) == f"<PVSocket id={s.id:#x} connecting>"
    assert _readiness(s) == (False, False)
    assert s.connect_ex(_ADDRESS) == errno.EALREADY
    for call in (lambda: s.recv(1), lambda: s.send(b"x")):
        with pytest.raises(BlockingIOError) as info:
            call()
        assert info.value.errno == errno.EAGAIN
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    with pytest.raises(OSError) as info:
        s.getpeername()
    assert info.value.errno == errno.ENOTCONN

    fake.respond(req, 0)
    wait_until(lambda: _readiness(s) == (False, True))
    assert repr(s) == f"<PVSocket id={s.id:#x} active>"
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    assert s.getpeername() == _ADDRESS
    assert s.connect_ex(_ADDRESS) == 0
    assert s.connect_ex(_ADDRESS) == errno.EISCONN
    assert s.send(b"x") == 1
    s.close()
    wait_until(lambda: not fe._releases)
    with fe._lock:
        assert fe._slots == [None] * len(fe._slots)


@pytest.mark.parametrize("report", ["getsockopt", "connect"])
def test_a_non_blocking_connect_that_fails_says_so_once(
        fe: pvcalls.Frontend, fake: FakeBackend, report: str) -> None:
    """A refused CONNECT: the socket polls readable and writable, its
    ring goes back to the pool (the backend let go of it), and the error
    is reported once, by getsockopt(SO_ERROR) or by the next connect()
    (ECONNABORTED after SO_ERROR took it, as Linux's); then the socket is
    unconnected and may connect again."""
    s, req = _connecting(fe, fake)
    ring = s._st.ring
    fake.respond(req, -111)  # ECONNREFUSED
    wait_until(lambda: _readiness(s) == (True, True))
    assert s._st.ring is None
    # Given back by the event thread once it let go of the socket's lock,
    # which fileno() takes to say the socket is ready.
    wait_until(lambda: ring in fe._ring_pool)
    assert fe._ring_pool.count(ring) == 1
    if report == "getsockopt":
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR, 4) == \
            struct.pack("=i", errno.ECONNREFUSED)  # with a buflen: as bytes
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert s.connect_ex(_ADDRESS) == errno.ECONNABORTED
    else:
        assert s.connect_ex(_ADDRESS) == errno.ECONNREFUSED
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    fake.hold = set()
    s.setblocking(True)
    s.connect(_ADDRESS)  # starts over, answered at once
    assert s.getpeername() == _ADDRESS
    s.close()


@pytest.mark.parametrize("ret", [0, -111])
def test_blocking_calls_wait_for_a_non_blocking_connect(
        fe: pvcalls.Frontend, fake: FakeBackend, ret: int) -> None:
    """Switched to blocking mode while its CONNECT is in flight, the
    socket's calls wait for the answer, as a TCP socket's wait for its
    handshake: then connect() returns (or raises the error) and send()
    goes on; a recv() that was waiting for a refused connect gets the
    error.  (Not recv(0): it returns at once, as socket.socket's, which
    makes no system call for it.)  In blocking mode proper: with a
    timeout connect() says EALREADY at once, as socket.socket's."""
    s, req = _connecting(fe, fake)
    s.settimeout(None)
    calls = [Call(lambda: s.connect(_ADDRESS))]
    if ret == 0:
        calls.append(Call(lambda: s.send(b"x")))
    wait_until(lambda: len(s._cond._waiters) == len(calls))  # type: ignore[attr-defined]
    assert s.recv(0) == b""
    fake.respond(req, ret)
    for call in calls:
        call.join()
    if ret == 0:
        assert [c.error for c in calls] == [None, None]
        assert calls[1].result == 1
    else:
        assert calls[0].oserror().errno == errno.ECONNREFUSED
        with pytest.raises(OSError) as info:
            s.recv(1)
        assert info.value.errno == errno.ENOTCONN  # reported once, by connect()
    s.close()


def test_a_recv_waiting_for_a_refused_connect_gets_the_error(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    s, req = _connecting(fe, fake)
    s.settimeout(TIMEOUT)
    receiving = Call(lambda: s.recv(1))
    wait_until(lambda: len(s._cond._waiters) == 1)  # type: ignore[attr-defined]
    fake.respond(req, -111)
    assert receiving.oserror().errno == errno.ECONNREFUSED
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # taken by recv()
    s.close()


def test_a_non_blocking_connect_answered_after_close_is_ignored(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """close() with the CONNECT in flight: the RELEASE owns the ring, and
    the late answer (here after the RELEASE's) frees only the slot."""
    s, req = _connecting(fe, fake)
    ring = s._st.ring
    s.close()
    wait_until(lambda: not fe._releases)  # RELEASE answered: the ring is back
    fake.respond(req, -EINTR)
    wait_until(lambda: fe._slots == [None] * len(fe._slots))
    assert fe._ring_pool.count(ring) == 1
    assert s._st.ring is None
    with pytest.raises(OSError) as info:
        s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    assert info.value.errno == errno.EBADF


def test_a_ring_whose_release_failed_is_not_reused(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """RELEASE answered with an error: the backend did not say it let go
    of the data ring, so it is freed, never handed to the next socket."""
    s, _ = connected(fe, fake)
    ring = s._st.ring
    assert ring is not None
    fake.rets[PVCALLS_RELEASE] = -EINVAL
    s.close()
    wait_until(lambda: _freed(ring) or ring in fe._ring_pool)
    assert ring not in fe._ring_pool


def test_a_ring_whose_release_failed_before_close_took_it_is_not_reused(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """As above, the error answered before close() took the ring from the
    socket: close() frees it then, whoever answered, never pooling it."""
    s, _ = connected(fe, fake)
    ring = s._st.ring
    assert ring is not None
    fake.rets[PVCALLS_RELEASE] = -EINVAL
    pause = PauseAt(pvcalls.Frontend._release, "deadline = Deadline(self.timeout)")
    closing = Call(lambda: pause.run(s.close))
    assert pause.reached.wait(TIMEOUT)
    wait_until(lambda: not fe._releases)  # answered
    assert s._st.ring is ring  # not taken yet
    pause.resume()
    assert closing.join().error is None
    assert _freed(ring) and ring not in fe._ring_pool


def _freed(ring: Any) -> bool:
    """Whether the data ring ``ring`` was freed (its pages unshared)."""
    try:
        ring.indexes.nbytes  # noqa: B018 (raises once released)
    except ValueError:
        return True
    return False


def test_a_release_whose_notify_failed_waits_for_its_answer(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A RELEASE whose notify failed went out all the same: it is on the
    ring, and the next notify (owed, see _kick_owed) has the backend
    answer it.  Its data ring waits for that answer and then goes to the
    pool, as any released one; freed at once, as if the RELEASE never
    went out, it was unshared while the backend still mapped it."""
    s, _ = connected(fe, fake)
    ring = s._st.ring
    assert ring is not None
    fake.hold = {PVCALLS_RELEASE}
    notify = fe._notify

    def fail_once(port: int) -> None:
        monkeypatch.setattr(fe, "_notify", notify)
        raise OSError(errno.EIO, "the notify failed")

    monkeypatch.setattr(fe, "_notify", fail_once)
    cmd_ring = fe._ring
    assert cmd_ring is not None
    # Waiting for a notify (see ring.h's req_event), or the RELEASE needs none.
    wait_until(lambda: cmd_ring._idx[_REQ_EVENT] == (cmd_ring.req_prod_pvt + 1) & 0xFFFFFFFF)
    s.close()
    assert f"RELEASE of {s.id:#x} failed: [Errno {errno.EIO}] the notify failed" in caplog.text
    req = fake.next_request(PVCALLS_RELEASE)
    assert not _freed(ring) and ring not in fe._ring_pool  # the answer not in yet
    fake.respond(req, 0)
    wait_until(lambda: _freed(ring) or ring in fe._ring_pool)
    assert ring in fe._ring_pool
    fake.hold = set()


@pytest.mark.parametrize("call", ["bind", "listen"])
def test_bind_and_listen_wait_for_their_answer_in_non_blocking_mode(
        fe: pvcalls.Frontend, fake: FakeBackend, call: str) -> None:
    """As socket.socket's, bind() and listen() do not fail with
    BlockingIOError in non-blocking mode: their answer is waited for
    (within the frontend's timeout)."""
    s = fe.socket()
    if call == "listen":
        s.bind(("127.0.0.1", 4000))
    s.setblocking(False)
    cmd = PVCALLS_BIND if call == "bind" else PVCALLS_LISTEN
    fake.hold = {cmd}
    calling = Call(lambda: s.bind(("127.0.0.1", 4000)) if call == "bind" else s.listen())
    req = fake.next_request(cmd)
    wait_until(lambda: done_or_at(calling, pvcalls.Frontend._wait_slot, "self._cmd_cond.wait("))
    fake.respond(req, 0)
    assert calling.join().error is None
    fake.hold = set()
    s.close()


@pytest.mark.parametrize("bound", [False, True])
def test_accept_on_a_socket_not_listening_sends_nothing(
        fe: pvcalls.Frontend, fake: FakeBackend, bound: bool) -> None:
    """EINVAL at once, as socket.socket's (also in non-blocking mode,
    where it is not EAGAIN), with no POLL or ACCEPT on the wire."""
    s = fe.socket()
    if bound:
        s.bind(("127.0.0.1", 4000))
    fake.hold = {PVCALLS_POLL, PVCALLS_ACCEPT}
    for timeout in (0.0, TIMEOUT):
        s.settimeout(timeout)
        with pytest.raises(OSError) as info:
            s.accept()
        assert info.value.errno == errno.EINVAL
    fence = fe.socket()  # answered after every command sent before it
    assert fake.requests.empty()
    fake.hold = set()
    fence.close()
    s.close()


# -- a bug of the frontend's own ------------------------------------------------------------


def _pending_raises(exc: Exception) -> Callable[[pvcalls.Frontend, pytest.MonkeyPatch], None]:
    def inject(fe: pvcalls.Frontend, monkeypatch: pytest.MonkeyPatch) -> None:
        def pending() -> int | None:
            raise exc

        monkeypatch.setattr(fe._evtchn, "pending", pending)

    return inject


def _consuming_raises(fe: pvcalls.Frontend, monkeypatch: pytest.MonkeyPatch) -> None:
    def consume(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(fe, "_consume_responses", consume)


_EVENT_THREAD_BUGS = {
    # A bug of ours in the event thread's own loop.
    "the loop": _pending_raises(RuntimeError("a bug")),
    # The frontend's event channel handle failing.
    "the handle": _pending_raises(OSError(errno.EBADF, "Bad file descriptor")),
    # A bug of ours taking the answers off the command ring: what it took
    # is lost to the callers that wait for it.
    "the command ring": _consuming_raises,
}


@pytest.mark.parametrize("where", list(_EVENT_THREAD_BUGS))
def test_a_failing_event_thread_fails_every_call_with_eio(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch,
        monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The frontend's event thread fails (a bug of ours, or its event
    channel handle): nobody is left to take the backend's answers, so
    every call waiting for one (a CONNECT's, or data, without a timeout)
    fails with EIO saying that the frontend failed, as does every later
    call; the failure is logged with its traceback.  close() still
    closes the device with the backend.  (The thread ended, with a line
    in the log at most, and every blocked call of the guest waited for
    ever.)  A failure of the handle is one that stays: the thread goes
    on after the first (see below), not after the second."""
    r, _ = connected(fe, fake)
    r.settimeout(None)
    receiving = Call(lambda: r.recv(10))
    wait_until(lambda: sleeping_in_wait(r))
    fake.hold = {PVCALLS_CONNECT}
    n = fe.socket()
    n.setblocking(False)
    with pytest.raises(BlockingIOError):
        n.connect(("127.0.0.1", 4001))
    fake.next_request(PVCALLS_CONNECT)
    s = fe.socket()
    s.settimeout(None)
    connecting = Call(lambda: s.connect(("127.0.0.1", 4000)))
    req = fake.next_request(PVCALLS_CONNECT)
    wait_until(lambda: done_or_at(connecting, pvcalls.Frontend._wait_slot,
                                  "self._cmd_cond.wait("))
    _EVENT_THREAD_BUGS[where](fe, monkeypatch)
    fake.respond(req, 0)  # the event that sets it off
    calls = [connecting, receiving]
    if where != "the command ring":
        # The thread survives the first failure, and its hand-out of
        # every port takes the CONNECT's answer; the failure that stays
        # fails the frontend.
        assert connecting.join().error is None
        calls.remove(connecting)
    for call in calls:
        err = call.oserror()
        assert err.errno == errno.EIO
        assert err.strerror.startswith("the PV Calls frontend failed"), err.strerror
    with pytest.raises(OSError) as info:
        fe.socket()
    assert info.value.errno == errno.EIO
    # The non-blocking connect's outcome, as select-based programs ask it.
    assert n.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.EIO
    assert "failed" in log.wait("frontend of domain", level=logging.ERROR)
    failed = [rec for rec in log.records if rec.levelno >= logging.ERROR and rec.exc_info]
    assert len(failed) == 1
    r.close()
    s.close()
    n.close()
    monkeypatch.undo()
    assert Call(fe.close).join().error is None
    assert fake._closed_once  # the frontend went Closing with the backend


@pytest.mark.parametrize("step, exc, after", [
    # The command ring's port taken, masked, and lost with the failure.
    ("pending", RuntimeError("a bug"), True),
    # The port left masked.
    ("unmask", EventChannelError(errno.EIO, "a transient failure"), False),
    ("unmask", RuntimeError("a bug"), False),
], ids=["pending", "unmask-oserror", "unmask-bug"])
def test_an_event_channel_handle_failing_once_fails_nothing(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch,
        monkeypatch: pytest.MonkeyPatch, step: str, exc: Exception, after: bool) -> None:
    """A failure of the handle's pending() or unmask() that does not stay:
    the event thread logs it, runs every port's handler once more and
    unmasks the port, and goes on; the calls are answered.  (An unmask
    failing with an OSError was taken for the port unbound meanwhile,
    leaving the command ring's port masked: every call waited for its
    answer until its timeout; any other failure failed every call with
    EIO.)  A failure that stays still does (see above)."""
    handle = fe._evtchn
    assert handle is not None
    monkeypatch.setattr(handle, step, fails_once(getattr(handle, step), exc, after=after))
    for _ in range(3):
        fe.socket().close()
    assert "handed out again" in log.wait("event thread failed")
    failed = [rec for rec in log.records if rec.levelno >= logging.WARNING and rec.exc_info]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert failed[0].levelno == logging.WARNING and failed[0].exc_info[1] is exc


def test_an_event_channel_handle_failing_now_and_then_fails_nothing(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure that does not stay, then rounds that go well, then another
    such failure: the second is one more that does not stay (only one in
    the round right after a failure does), and the calls are answered."""
    handle = fe._evtchn
    assert handle is not None
    for n in (1, 2):
        monkeypatch.setattr(handle, "pending", fails_once(
            handle.pending, EventChannelError(errno.EIO, f"transient failure {n}")))
        for _ in range(3):
            fe.socket().close()
        wait_until(lambda: len(log.messages()) == n)  # noqa: B023
    assert all("handed out again" in m for m in log.messages())
    assert not fe._dead


def test_a_failing_backend_state_watch_fails_every_call_with_eio(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug of ours in the watch on the backend's state: whether the
    backend is still there is unknown, and calls waiting for it fail with
    EIO rather than wait for ever.  (The backend left unnoticed.)  The
    event thread failing next changes nothing: calls go on saying what
    failed first."""
    r, _ = connected(fe, fake)
    r.settimeout(None)
    receiving = Call(lambda: r.recv(10))
    wait_until(lambda: sleeping_in_wait(r))

    def backend_state() -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(fe, "_backend_state", backend_state)
    fake.set_state(5)
    err = receiving.oserror()
    assert err.errno == errno.EIO
    assert err.strerror.startswith("the PV Calls frontend failed"), err.strerror
    log.wait("frontend of domain", level=logging.ERROR)
    _pending_raises(RuntimeError("a bug"))(fe, monkeypatch)
    fake.evtchn.notify(fake.port)
    thread = fe._thread
    assert thread is not None
    thread.join(TIMEOUT)  # its failure is over
    assert not thread.is_alive()
    log.wait("its event thread failed", level=logging.ERROR)
    with pytest.raises(OSError) as info:
        r.recv(10)
    assert (info.value.errno, info.value.strerror) == (errno.EIO, err.strerror)
    r.close()
    monkeypatch.undo()
    assert Call(fe.close).join().error is None


_DEATHS: dict[str, tuple[Callable[[pvcalls.Frontend, FakeBackend], None], str]] = {
    "the ring broken": (lambda fe, fake: fake.set_rsp_prod(fake.rsp_prod_pvt + 2 * RING_SLOTS),
                        "the PV Calls backend broke the command ring"),
    "the frontend failed": (lambda fe, fake: fe._fail("a test", RuntimeError("a bug")),
                            "the PV Calls frontend failed"),
}


@pytest.mark.parametrize("death", list(_DEATHS))
def test_a_frontend_dead_already_answers_the_backend_leaving_with_closed(
        fe: pvcalls.Frontend, fake: FakeBackend, death: str) -> None:
    """The frontend dead for a reason of its own (the command ring broken,
    a failure of its own threads), not closed yet: the backend leaving
    Connected (it is closing, or the toolstack removes the device) is
    answered all the same, the frontend going Closed, as Linux's does: the
    backend waits in Closing for that, and a removal waits for the
    backend.  (The frontend stayed Connected until the program closed it.)
    Calls go on saying what killed the frontend first."""
    kill, why = _DEATHS[death]
    kill(fe, fake)
    wait_until(lambda: fe._dead)
    fake.set_state(5)  # Closing
    fake.xs.wait_for(f"{fake.fe}/state", "6", timeout=TIMEOUT)
    fake.xs.wait_for(f"{fake.be}/state", "6", timeout=TIMEOUT)  # and the backend closes
    with pytest.raises(OSError) as info:
        fe.socket()
    assert str(info.value.strerror).startswith(why), info.value.strerror


def test_the_backend_leaving_is_answered_once(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once answered, the backend's leaving is not answered again as its
    state goes on changing (Closing, then Closed as it closes, then gone
    with the device): no second Closed written, no second line said."""
    fake.set_state(5)  # Closing
    fake.xs.wait_for(f"{fake.fe}/state", "6", timeout=TIMEOUT)
    writes: list[dict[str, str]] = []
    monkeypatch.setattr(fe, "_write_own_nodes", lambda nodes: writes.append(nodes) or True)
    fe._on_backend_state(f"{fake.be}/state")  # as the watch does at each change
    assert writes == []
    said = [m for m in log.messages(logging.INFO) if "went to state" in m]
    assert said == [f"pvcalls backend of domain {fe.domain.domid} went to state 5: "
                    "disconnecting"], said


def test_the_backend_leaving_is_not_answered_over_a_frontend_that_took_the_device(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """The backend leaves as the device is added again for another frontend,
    whose ring-ref and port are in the frontend directory by the time the
    watch acts: this frontend does not write Closed over that one's state
    (the write checks, in its transaction, that the nodes are its own)."""
    fake.xs.transaction(lambda t: [t.write(f"{fake.fe}/{key}", value) for key, value in
                                   (("ring-ref", "4095"), ("port", "4095"), ("state", "3"))])
    fake.set_state(5)  # Closing
    wait_until(lambda: fe._backend_left)
    with fe._watch_lock:  # held by the watch while it acts
        pass
    assert fake.xs.read(f"{fake.fe}/state") == "3"


def test_close_does_not_wait_for_a_backend_whose_state_is_gone(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """The backend's state node removed (the backend gone with its
    directory) reads as Unknown: close() goes Closing and finds nobody to
    wait for, rather than waiting out its timeout for the backend to go
    Closing and warning that it did not."""
    fake._closed_once = True  # nothing writes the backend's state again
    fake.xs.rm(f"{fake.be}/state")
    wait_until(lambda: fe._backend_left)
    assert Call(fe.close).join().error is None
    assert fe.device is None
    assert [m for m in log.messages() if "closing frontend" in m] == []


def test_only_the_event_thread_reads_the_shared_handles_fired_ports(
        fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Data rings on the frontend's shared handle (no handle of their own to
    be had): freeing one reads nothing off the shared handle's queue, which
    holds every port's events (the command ring's among them) and is the
    event thread's: an event taken there by another thread was lost to
    its handler."""

    def no_handle_of_its_own() -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    fe = pvcalls.Frontend(fake.guest, timeout=TIMEOUT)
    fe.open()
    try:
        monkeypatch.setattr(fe.domain, "evtchn", no_handle_of_its_own)
        handle = fe._evtchn
        assert handle is not None
        readers: set[str] = set()
        pending = handle.pending

        def recorded() -> Any:
            readers.add(threading.current_thread().name)
            return pending()

        monkeypatch.setattr(handle, "pending", recorded)
        s, _ = connected(fe, fake)
        assert s._st.ring is not None and not s._st.ring.direct
        s.close()
        wait_until(lambda: bool(fe._ring_pool))  # the RELEASE answered
    finally:
        assert Call(fe.close).join().error is None  # frees the pool's ring
    assert readers == {f"pvcalls-front-{fake.domid}"}


def test_a_failing_data_ring_handler_fails_nothing_else(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug of ours in a data ring's handler on the frontend's shared
    event channel handle is logged with its traceback, and that is all:
    such a handler only wakes its socket's callers, and the frontend goes
    on (only the command ring's handler fails it, see above)."""

    def no_handle_of_its_own() -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(fe.domain, "evtchn", no_handle_of_its_own)
    s, ring = connected(fe, fake)
    assert s._st.ring is not None and not s._st.ring.direct

    def broken() -> None:
        raise RuntimeError("a bug")

    with fe._lock:
        fe._handlers[s._st.ring.port] = broken
    ring.produce(b"x")
    wait_until(lambda: any(rec.exc_info and isinstance(rec.exc_info[1], RuntimeError)
                           for rec in caplog.records))
    with fe.socket():  # the command ring is still served
        pass
    assert not fe._dead
    s.close()


#: The numbers _descriptor_closed() gave to /dev/null in a test: closed
#: after it, unless it did (the socket's close() leaves alone a file that
#: took its fileno()'s number).
_NULLED: list[int] = []


@pytest.fixture(autouse=True)
def _close_nulled() -> Iterator[None]:
    yield
    null = os.stat(os.devnull)
    while _NULLED:
        fd = _NULLED.pop()
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), null):
                os.close(fd)


def _descriptor_closed(fd: int) -> None:
    """Close ``fd`` as a program that closed a socket's fileno() would,
    with no file taking its number (/dev/null holds it, until the test
    ends)."""
    readonly = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(readonly, fd)
        _NULLED.append(fd)
    finally:
        os.close(readonly)


def test_a_send_whose_readiness_update_fails_says_how_many_bytes_went(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """The program closed the socket's fileno() descriptor, and data came
    meanwhile (the byte that makes it readable cannot go: EBADF, tried
    again by every update).  A send() puts its bytes on the out ring, then
    brings the descriptor up to date, which fails: it returns how many
    went, as after any error that comes once some did.  It raised EBADF,
    and told the program that bytes the backend has were never sent: one
    that sent them again sent them twice."""
    s, ring = connected(fe, fake)
    _descriptor_closed(s.fileno())
    ring.produce(b"x")
    st_ring = s._st.ring
    assert st_ring is not None
    wait_until(st_ring.in_pending)
    prod = ring.get(OUT_PROD_OFFSET)
    assert s.send(b"abc") == 3
    assert ring.get(OUT_PROD_OFFSET) - prod == 3
    assert s.recv(1) == b"x"
    with pytest.raises(OSError) as info:
        s.close()  # the program's closing is said still, as socket.socket's
    assert info.value.errno == errno.EBADF


def test_a_recv_whose_readiness_update_fails_loses_no_data(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """As for send(): a recv() takes its bytes off the in ring, then brings
    the descriptor up to date (readable still, more is there), which fails.
    It returns the bytes: raising EBADF, it lost them (taken off the ring,
    given to nobody)."""
    s, ring = connected(fe, fake)
    _descriptor_closed(s.fileno())
    ring.produce(b"xy")
    st_ring = s._st.ring
    assert st_ring is not None
    wait_until(lambda: st_ring.in_available() == 2)
    assert s.recv(1) == b"x"
    assert s.recv(1) == b"y"
    with pytest.raises(OSError) as info:
        s.close()
    assert info.value.errno == errno.EBADF


def test_a_socket_whose_descriptor_was_closed_does_not_keep_the_others_asleep(
        fe: pvcalls.Frontend, fake: FakeBackend, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend goes away: every blocked call is woken, also behind a
    socket whose fileno() descriptor the program closed (its readiness
    cannot be set: EBADF), where the wake-ups used to stop, leaving the
    calls after it waiting for ever.  That is the program's doing, which
    its calls report: no error of ours in the log.  (The recheck that
    would also end the wait is set to an hour: only the wake-up may.)"""
    monkeypatch.setattr(_common, "RECHECK", 3600.0)
    a, _ = connected(fe, fake)
    _descriptor_closed(a.fileno())
    r, _ = connected(fe, fake)
    r.settimeout(None)
    receiving = Call(lambda: r.recv(10))
    wait_until(lambda: sleeping_in_wait(r))
    fake.set_state(5)
    err = receiving.oserror()
    assert (err.errno, err.strerror) == (errno.ENOTCONN, "the PV Calls backend went away")
    assert [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR] == []
    with pytest.raises(OSError) as info:
        a.close()
    assert info.value.errno == errno.EBADF
    r.close()


def test_a_socket_failing_to_be_woken_keeps_no_other_asleep(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug of ours in waking one socket (anything but the EBADF of a
    closed descriptor, above) is logged with its traceback, and the
    sockets after it are woken all the same: it escaped the wake-ups, and
    the blocked calls after it waited for ever."""
    a, _ = connected(fe, fake)
    r, _ = connected(fe, fake)

    def broken() -> None:
        raise RuntimeError("cannot wake")

    monkeypatch.setattr(a, "_on_event", broken)
    r.settimeout(None)
    receiving = Call(lambda: r.recv(10))
    wait_until(lambda: sleeping_in_wait(r))
    fake.set_state(5)
    err = receiving.oserror()
    assert (err.errno, err.strerror) == (errno.ENOTCONN, "the PV Calls backend went away")

    def failures() -> list[logging.LogRecord]:
        return [rec for rec in caplog.records
                if rec.exc_info and isinstance(rec.exc_info[1], RuntimeError)]

    # The recv may end before the wake-ups reach it (its recheck sees the
    # frontend dead), so before the failure is logged.
    wait_until(lambda: failures() != [])
    (logged,) = failures()
    assert str(logged.exc_info[1]) == "cannot wake"  # type: ignore[index]
    monkeypatch.undo()
    a.close()
    r.close()


def test_a_dropped_socket_not_yet_released_holds_up_no_wake_up(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The backend goes away while a socket the program dropped unclosed
    waits for its release: it is no one's to wake, and is passed over
    without a word (no traceback for a socket that is gone), and the
    sockets after it are woken all the same: the waits' recheck is an hour
    here, so that only the wake-up ends them."""
    monkeypatch.setattr(fe, "_start_reaper", lambda _: None)  # it stays in the table
    monkeypatch.setattr(_common, "RECHECK", 3600.0)
    dropped, _ = connected(fe, fake)
    ref = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert ref() is None
    r, _ = connected(fe, fake)
    r.settimeout(None)
    receiving = Call(lambda: r.recv(10))
    wait_until(lambda: sleeping_in_wait(r))
    fake.set_state(5)
    assert receiving.oserror().errno == errno.ENOTCONN
    assert [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR] == []
    monkeypatch.undo()
    r.close()


def test_an_answer_whose_socket_cannot_take_it_holds_up_no_other(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """Answers published together: the first, a POLL's, for a listener
    whose fileno() descriptor the program closed (its readiness cannot be
    set: EBADF); the next, a non-blocking connect()'s CONNECT, still
    completes that connect.  (The first one's error ended the handing
    over, and the connect waited for ever.)"""
    ls = fe.socket()
    ls.bind(("127.0.0.1", 4000))
    ls.listen()
    fake.hold = {PVCALLS_POLL, PVCALLS_CONNECT}
    fd = ls.fileno()  # keeps a POLL in flight
    poll = fake.next_request(PVCALLS_POLL)
    _descriptor_closed(fd)
    _the_next_connect_completes(fe, fake, poll, ls)


def _the_next_connect_completes(fe: pvcalls.Frontend, fake: FakeBackend, first: Any,
                                blind: Any) -> None:
    """A non-blocking connect() whose answer comes right behind ``first``'s
    (answered 0) completes; ``blind``, whose fileno() descriptor the
    program closed, says EBADF as it closes."""
    s = fe.socket()
    s.setblocking(False)
    with pytest.raises(BlockingIOError):
        s.connect(("127.0.0.1", 4001))
    connect = fake.next_request(PVCALLS_CONNECT)
    fake.respond_many([(first, 0, {}), (connect, 0, {})])
    # Blocking: waits for the answer (with a timeout connect() says
    # EALREADY until it came, as socket.socket's).
    s.settimeout(None)
    assert Call(lambda: s.connect(("127.0.0.1", 4001))).join().error is None
    assert s.getpeername() == ("127.0.0.1", 4001)
    fake.hold = set()
    with pytest.raises(OSError) as info:
        blind.close()
    assert info.value.errno == errno.EBADF
    s.close()


@pytest.mark.parametrize("first", ["accept", "connect"])
def test_an_accept_or_connect_answer_whose_socket_cannot_take_it_holds_up_no_other(
        fe: pvcalls.Frontend, fake: FakeBackend, first: str) -> None:
    """As above, the first answer an ACCEPT's, kept for the listener's
    next accept(), or a non-blocking connect()'s, for sockets whose
    fileno() descriptor the program closed: the next answer, a
    non-blocking connect()'s, still completes that connect."""
    if first == "accept":
        fake.hold = {PVCALLS_ACCEPT}
        blind, req, _, _ = _accept_in_flight(fe, fake)
        fake.rings[req.id_new] = FakeDataRing(fake, req.ref, req.evtchn)
        fake.hold = {PVCALLS_CONNECT}
        _descriptor_closed(blind.fileno())
    else:
        fake.hold = {PVCALLS_CONNECT}
        blind = fe.socket()
        blind.setblocking(False)
        fd = blind.fileno()
        with pytest.raises(BlockingIOError):
            blind.connect(("127.0.0.1", 4002))
        req = fake.next_request(PVCALLS_CONNECT)
        _descriptor_closed(fd)
    _the_next_connect_completes(fe, fake, req, blind)


# -- refusals cut short by a Ctrl-C --------------------------------------------------


def _refusal_taken(fe: pvcalls.Frontend, cmd: int) -> list[int]:
    """A list that gets the socket id of each ``cmd`` whose answer a wait
    of the frontend's (_wait_slot) returns: from then on, the caller is on
    the path of the answer.  For a sweep's ``unless``, which lands no
    Ctrl-C before that (in the wait, say, which other sweeps cover)."""
    taken: list[int] = []
    wait = fe._wait_slot

    def watched(req_id: int, slot: Any, *args: Any, **kwargs: Any) -> int:
        try:
            return wait(req_id, slot, *args, **kwargs)
        finally:
            if slot.cmd == cmd and slot.done:
                taken.append(slot.sock_id)

    fe._wait_slot = watched  # type: ignore[method-assign]
    return taken


def _connects_submitted(fe: pvcalls.Frontend) -> list[Any]:
    """A list that gets the slot of each CONNECT given to the frontend's
    _submit: whether it went out is its ``sent``, its answer its ``done``."""
    connects: list[Any] = []
    submit = fe._submit

    def recorded(slot: Any, *args: Any, **kwargs: Any) -> int:
        if slot.cmd == PVCALLS_CONNECT:
            connects.append(slot)
        return submit(slot, *args, **kwargs)

    fe._submit = recorded  # type: ignore[method-assign]
    return connects


def _connect_waiting_for_its_answer(fe: pvcalls.Frontend, fake: FakeBackend,
                                    s: pvcalls.PVSocket) -> tuple[Call, Request]:
    """A connect() of ``s`` on a thread of its own, once it waits for the
    answer to its CONNECT, which ``fake`` holds (answered with
    ``fake.respond(req, ...)``)."""
    fake.hold = {PVCALLS_CONNECT}
    first = Call(functools.partial(s.connect, _ADDRESS))
    req = fake.next_request(PVCALLS_CONNECT)
    wait_until(lambda: bool(fe._cmd_cond._waiters))
    return first, req


def _connect_waiting_on_the_one_under_way(s: pvcalls.PVSocket,
                                          pause: PauseAt | None = None) -> Call:
    """A second connect() of ``s`` on a thread of its own (under
    ``pause``), once it waits for the connect() under way to end: for the
    socket's connect lock, in _join_connect.  It failing at once instead
    fails the test."""
    connect = functools.partial(s.connect, _ADDRESS)
    second = Call(connect if pause is None else lambda: pause.run(connect))
    wait_until(lambda: stands_at(second.ident, pvcalls.PVSocket._join_connect,
                                 "held(self._connect_lock") or not second.alive())
    assert second.alive(), f"did not wait: {second.error!r}"
    return second


def _main_thread_waits_on_the_connect_under_way() -> bool:
    """Whether the main thread's connect() waits for another thread's to
    end (for the socket's connect lock, in _join_connect)."""
    main = threading.main_thread().ident
    assert main is not None
    return stands_at(main, pvcalls.PVSocket._join_connect, "held(self._connect_lock")


def _connect_interrupted_at(n: int, within: str, s: pvcalls.PVSocket,
                            meanwhile: Callable[[threading.Event], None]) -> str:
    """``interrupted_at(n, within, ...)`` of a connect() of ``s`` in the
    main thread, with ``meanwhile(over)`` on a thread of its own, ``over``
    set once that connect() has ended (so that it stops waiting for a
    main thread the Ctrl-C took out of the connect())."""
    over = threading.Event()
    # Kept, and reported as this attempt's failure: a helper whose wait ran
    # out (a stalled machine) otherwise shows as a thread's error apart
    # from the connect() it then never answers.
    failed: list[BaseException] = []

    def run() -> None:
        try:
            meanwhile(over)
        except BaseException as exc:
            failed.append(exc)

    helper = threading.Thread(target=run)
    helper.start()
    try:
        where = interrupted_at(n, within, functools.partial(s.connect, _ADDRESS))
    finally:
        over.set()
        helper.join(TIMEOUT)
    assert not helper.is_alive(), f"{where}: the backend's side still runs after {TIMEOUT} s"
    if failed:
        raise AssertionError(f"{where}: the backend's side failed") from failed[0]
    return where


def _starved_threads(fe: pvcalls.Frontend, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list of thread idents for which the command ring has no room
    (their calls wait for room, or fail with ENOBUFS, sending nothing);
    other threads' calls find room as before."""
    has_room = fe._has_room
    starved: list[int] = []

    def room(spare: int) -> bool:
        return threading.get_ident() not in starved and has_room(spare)

    monkeypatch.setattr(fe, "_has_room", room)
    return starved


def _refused(call: Callable[[], object], err: int) -> Callable[[], None]:
    """``call()``, which is to fail with ``err``."""
    def run() -> None:
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == err, info.value
    return run


def _unclosed(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if w.category is ResourceWarning]


def _sweep(attempt: Callable[[int], str], check: Callable[[str], object], *,
           through: tuple[str, ...] = ()) -> list[str]:
    """Land a Ctrl-C at every place of a call in turn: ``attempt(n)`` runs
    it with one at its n-th place (interrupted_at's answer: where, or ''
    once there are fewer places), then ``check(where)`` asserts what it
    left, its failure prefixed with where.  Until the call ran
    undisturbed (checked too); returns where it landed, having checked
    that it landed somewhere in each function named in ``through`` (the
    window the sweep is for: a sweep that no longer reaches it passes
    for nothing)."""
    landed: list[str] = []
    for n in itertools.count():
        where = attempt(n)
        try:
            check(where)
        except AssertionError as exc:
            raise AssertionError(f"interrupted {where or 'nowhere'}: {exc}") from None
        if not where:
            for name in through:
                assert any(name in where for where in landed), (name, landed)
            return landed
        landed.append(where)
    raise AssertionError("unreachable")


def test_a_refused_accept_keeps_a_poll_in_flight_for_fileno(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """ACCEPT refused on a listener whose fileno() is in use: a POLL goes
    out again, as after an ACCEPT answered, so that the descriptor polls
    readable again once a connection is pending.  Before, none went out:
    once anything brought the descriptor up to date (a selector's
    register() calling fileno()), it polled neither way, for good."""
    ls = _listener(fe)
    fd = ls.fileno()  # its POLL goes out, answered at once
    fake.rets[PVCALLS_ACCEPT] = -EINVAL
    _refused(ls.accept, errno.EINVAL)()
    assert ls.fileno() == fd
    wait_until(lambda: select.select([fd], [], [], 0)[0] != [])
    assert ls._poll_ready
    ls.close()


@pytest.mark.parametrize("armed", [False, True], ids=["plain", "fileno"])
def test_a_refused_accept_interrupted_anywhere_keeps_nothing_of_its_new_socket(
        fe: pvcalls.Frontend, fake: FakeBackend, armed: bool) -> None:
    """A Ctrl-C landing anywhere along an accept() whose ACCEPT the
    backend refuses, once accept() has the answer: the socket the ACCEPT
    offered, which the backend never made, is still the listener's (its
    ACCEPT's, for the next accept() to report and drop) or gone from the
    frontend's table, its ring back in the pool; and the next accept()
    leaves nothing of it.  Before, one landing once accept() had let go
    of the ACCEPT and before the socket was dropped (as _drop_socket
    started, or in it) left the socket in the table, with its ring, until
    the frontend closed (or warned of it as "unclosed", and sent a
    RELEASE for an id the backend never had).

    With fileno() in use, its descriptor brought up to date after the
    Ctrl-C polls readable again: the refusal is back for the next
    accept() to report, or a POLL is in flight (see
    test_a_refused_accept_keeps_a_poll_in_flight_for_fileno)."""
    within = os.path.dirname(_frontend.__file__)
    ls = _listener(fe)
    fd = ls.fileno() if armed else -1
    fake.rets[PVCALLS_ACCEPT] = -EINVAL
    taken = _refusal_taken(fe, PVCALLS_ACCEPT)
    offered: list[int] = []  # the id of the socket each ACCEPT offers
    start = fe._new_socket

    def recorded(*args: Any, **kwargs: Any) -> pvcalls.PVSocket:
        new = start(*args, **kwargs)
        offered.append(new.id)
        return new

    fe._new_socket = recorded  # type: ignore[method-assign]

    def attempt(n: int) -> str:
        taken.clear()
        offered.clear()
        return interrupted_at(n, within, _refused(ls.accept, errno.EINVAL), lambda: not taken)

    def check(where: str) -> None:
        (new_id,) = offered
        inflight = ls._st.accept_inflight
        kept = inflight is not None and inflight[2].id == new_id
        assert kept or new_id not in fe._sockets, "the refused socket left in the table"
        if armed:
            assert ls.fileno() == fd  # up to date, as a selector's register() has it
            try:
                wait_until(lambda: select.select([fd], [], [], 0)[0] != [])
            except TimeoutError:
                raise AssertionError("the listener never polls readable again") from None
        # Reports the refusal cut short, or one of its own.
        _refused(ls.accept, errno.EINVAL)()
        gc.collect()
        assert set(fe._sockets) == {ls.id}
        assert ls._st.accept_inflight is None
        assert fe._given_back == [] and fe._accepts_to_end == []
        # The one ring every ACCEPT offered: back each time.
        assert len(fe._ring_pool) == 1
        assert _unclosed(caught) == []

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sweep(attempt, check, through=("_drop_socket",))
    ls.close()


def test_a_refused_socket_interrupted_anywhere_keeps_nothing_of_it(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A Ctrl-C landing anywhere along a socket() whose SOCKET the
    backend refuses, once socket() has the answer: the socket is gone
    from the frontend's table, and its finaliser neither warns of an
    "unclosed" socket the program never had nor queues it for a RELEASE.
    Before, one landing as _forget started left the socket listed, for
    the finaliser to warn of and the reaper to release; one landing as
    its finaliser's detach() returned left it in the table until the
    frontend closed."""
    within = os.path.dirname(_frontend.__file__)
    fake.rets[PVCALLS_SOCKET] = -EINVAL
    taken = _refusal_taken(fe, PVCALLS_SOCKET)

    def attempt(n: int) -> str:
        taken.clear()
        return interrupted_at(n, within, _refused(fe.socket, errno.EINVAL), lambda: not taken)

    def check(where: str) -> None:
        gc.collect()  # the finaliser runs, if the socket is garbage
        assert fe._sockets == {}, "left in the table"
        assert not fe._dropped and _unclosed(caught) == [], "dropped as unclosed"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sweep(attempt, check, through=("_forget",))


def _poll_refusal_taken() -> bool:
    """For a sweep's ``unless`` (called in the main thread, under the
    tracer): whether accept() has taken a refused POLL's error, which
    _wait_pending_connection then reports."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_wait_pending_connection":
            return bool(frame.f_locals.get("err"))
        frame = frame.f_back
    return False


def test_a_refused_poll_interrupted_anywhere_leaves_the_listener_readable(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A Ctrl-C landing anywhere along an accept() that reports a POLL
    the backend refused, on a listener whose fileno() is in use: the
    descriptor, brought up to date, still polls readable (the error is
    back for the next accept() to report, or a POLL is in flight), and
    the next accept() reports the refusal.  Before, one landing once the
    error was taken and before the POLL that fileno() needs went out (as
    _arm_poll started, or in it) left neither: the descriptor polled
    readable only until anything brought it up to date (a selector's
    register() calling fileno()), and then waited for good."""
    within = os.path.dirname(_frontend.__file__)
    ls = _listener(fe)
    fake.rets[PVCALLS_POLL] = -EINVAL
    fd = ls.fileno()  # its POLL goes out, refused

    def readable() -> bool:
        return select.select([fd], [], [], 0)[0] != []

    def attempt(n: int) -> str:
        wait_until(readable)
        return interrupted_at(n, within, _refused(ls.accept, errno.EINVAL),
                              lambda: not _poll_refusal_taken())

    def check(where: str) -> None:
        # As a selector registering the listener (again) does: the
        # descriptor follows the listener's state.
        assert ls.fileno() == fd
        try:
            wait_until(readable)
        except TimeoutError:
            raise AssertionError("the listener never polls readable again") from None
        _refused(ls.accept, errno.EINVAL)()

    _sweep(attempt, check, through=("_arm_poll",))
    ls.close()


def test_a_refused_connect_interrupted_anywhere_leaves_the_socket_unconnected(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A Ctrl-C landing anywhere along a connect() whose CONNECT the
    backend refuses, once connect() has the answer: the socket's ring is
    given back (the backend let go of it) and the socket is unconnected,
    so that connect() may be tried again and is refused again, as after
    the refusal reported.  Before, one landing as the wait returned the
    refusal took the socket for one whose CONNECT may have succeeded
    (only close() was left), and one landing before the ring was given
    back (as _put_data_ring started) kept it in the socket: either way
    the next connect() failed with EISCONN, and the ring stayed the
    socket's until it closed."""
    within = os.path.dirname(_frontend.__file__)
    s = fe.socket()
    s.settimeout(TIMEOUT)
    fake.rets[PVCALLS_CONNECT] = -ECONNREFUSED
    taken = _refusal_taken(fe, PVCALLS_CONNECT)
    refused = _refused(lambda: s.connect(("127.0.0.1", 7)), errno.ECONNREFUSED)

    def attempt(n: int) -> str:
        taken.clear()
        return interrupted_at(n, within, refused, lambda: not taken)

    def check(where: str) -> None:
        assert s._st.ring is None, "the ring kept"
        # As after a refused connect() with a timeout: Linux's socket
        # is left connecting, and the next connect() says so, once.
        aborted = _refused(lambda: s.connect(("127.0.0.1", 7)), errno.ECONNABORTED)
        aborted()
        refused()  # again
        aborted()  # which leaves it so too: the next attempt starts over
        assert fe._given_back == [] and len(fe._ring_pool) == 1

    _sweep(attempt, check, through=("_give_back", "_return_rings"))
    s.close()


@pytest.mark.parametrize("timed", [False, True], ids=["blocking", "timeout"])
def test_a_connect_interrupted_anywhere_once_answered_polls_as_connected(
        fe: pvcalls.Frontend, fake: FakeBackend, timed: bool) -> None:
    """A Ctrl-C landing anywhere along a connect() that the backend
    accepted, once connect() has the answer, on a socket whose fileno()
    was asked for (it polled readable and writable, unconnected): the
    descriptor polls as a connected socket with nothing to read,
    writable only, as after connect() returned.  Before, one landing
    before its last update (as the with block that marks a connect()
    with a timeout returned, or as _update_ready started) left it
    readable while recv() would block, for as long as the peer sent
    nothing: a selectors or asyncio loop called recv() over and over."""
    within = os.path.dirname(_frontend.__file__)
    taken = _refusal_taken(fe, PVCALLS_CONNECT)  # the answer's, here
    socks: list[pvcalls.PVSocket] = []

    def attempt(n: int) -> str:
        socks[:] = [s := fe.socket()]
        s.settimeout(TIMEOUT if timed else None)
        assert _readiness(s) == (True, True)
        taken.clear()
        return interrupted_at(n, within, functools.partial(s.connect, _ADDRESS),
                              lambda: not taken)

    def check(where: str) -> None:
        (s,) = socks
        assert s.getpeername() == _ADDRESS
        # Not by fileno(), which brings the descriptor up to date.
        fd = s._st.readyfd.fileno()
        readable, writable, _ = select.select([fd], [fd], [], 0)
        assert (bool(readable), bool(writable)) == (False, True)
        s.close()

    _sweep(attempt, check, through=("_update_ready",))


def _polls(s: pvcalls.PVSocket) -> tuple[bool, bool]:
    """How fileno()'s descriptor polls, not brought up to date by a
    fileno() call: as a selector that registered the socket before sees it."""
    fd = s._st.readyfd.fileno()
    readable, writable, _ = select.select([fd], [fd], [], 0)
    return bool(readable), bool(writable)


@pytest.mark.parametrize("answer", ["accepted", "refused", "none"])
@pytest.mark.parametrize("timed", [False, True], ids=["blocking", "timeout"])
def test_a_connect_waiting_for_its_answer_polls_neither_way(
        fe: pvcalls.Frontend, fake: FakeBackend, timed: bool, answer: str) -> None:
    """A blocking or timed connect() whose CONNECT waits for the backend's
    answer: the descriptor of a fileno() asked for before polls neither
    readable nor writable meanwhile, as a TCP socket's in its handshake,
    and no fileno() is needed for it (a selector registered the socket
    before).  Then as the answer says: writable once connected, both once
    refused (unconnected), writable once the timeout passed (the socket
    is good only for close(): see the module's notes).  Before, it went
    on polling as the unconnected socket, readable and writable, and as a
    connected one once a fileno() brought it up to date: a loop around
    recv() in another thread spun for as long as the handshake took."""
    s = fe.socket()
    s.settimeout((0.3 if answer == "none" else TIMEOUT) if timed else None)
    assert _readiness(s) == (True, True)
    fake.hold = {PVCALLS_CONNECT}
    call = Call(functools.partial(s.connect, _ADDRESS))
    req = fake.next_request(PVCALLS_CONNECT)
    wait_until(lambda: bool(fe._cmd_cond._waiters))  # connect() waits for the answer
    assert _polls(s) == (False, False)
    if answer == "none":
        if not timed:
            s.close()  # the only way out of a blocking one
            assert call.oserror().errno == errno.EBADF
            return
        assert isinstance(call.oserror(), TimeoutError)
        assert _polls(s) == (False, True)
        s.close()
        return
    fake.respond(req, 0 if answer == "accepted" else -ECONNREFUSED)
    if answer == "accepted":
        assert call.join().error is None, call.error
        assert _polls(s) == (False, True)
    else:
        assert isinstance(call.oserror(), ConnectionRefusedError)
        assert _polls(s) == (True, True)
    s.close()


@pytest.mark.parametrize("timeout", [0.0, 0.2], ids=["non-blocking", "timed"])
def test_a_connect_that_sent_nothing_polls_as_unconnected_though_updated_meanwhile(
        fe: pvcalls.Frontend, fake: FakeBackend, timeout: float) -> None:
    """A connect() whose CONNECT finds no room on the command ring in
    time, while another thread's fileno() brings the descriptor up to
    date: the socket has its ring then, and polls as in its handshake,
    neither way.  Once the connect() failed (nothing went out: ENOBUFS,
    or its timeout), it polls as the unconnected socket it is, readable
    and writable.  Before, the failure gave the ring back and left the
    descriptor as that fileno() made it: a selector waiting either way
    waited for good."""
    s = fe.socket()
    s.settimeout(timeout)
    assert _readiness(s) == (True, True)
    submit = fe._submit

    def no_room(slot: Any, *args: Any, **kwargs: Any) -> int:
        if slot.cmd == PVCALLS_CONNECT:
            assert Call(s.fileno).join().error is None  # another thread's
            assert _polls(s) == (False, False)  # as in its handshake
            if timeout == 0.0:
                raise BlockingIOError(errno.EAGAIN, "the command ring is full")
            raise TimeoutError("no room on the command ring in time")
        return submit(slot, *args, **kwargs)

    fe._submit = no_room  # type: ignore[method-assign]
    with pytest.raises(OSError) as info:
        s.connect(_ADDRESS)
    if timeout == 0.0:
        assert info.value.errno == errno.ENOBUFS
    else:
        assert isinstance(info.value, TimeoutError)
    assert s._st.ring is None
    assert _polls(s) == (True, True)
    s.close()


@pytest.mark.parametrize("timed", [False, True], ids=["blocking", "timeout"])
def test_a_refused_connect_polls_as_unconnected_though_updated_while_it_waited(
        fe: pvcalls.Frontend, fake: FakeBackend, timed: bool) -> None:
    """A connect() that the backend refuses, while another thread's
    fileno() brought the descriptor up to date (the socket had its data
    ring then: not readable, with nothing in it): once refused, the
    socket is unconnected and polls so, readable and writable (recv() and
    send() fail at once).  Before, one without a timeout left the
    descriptor unreadable: a selector waiting to read waited for good."""
    s = fe.socket()
    s.settimeout(TIMEOUT if timed else None)
    assert _readiness(s) == (True, True)
    fake.hold = {PVCALLS_CONNECT}
    call = Call(functools.partial(s.connect, _ADDRESS))
    req = fake.next_request(PVCALLS_CONNECT)
    # Another thread's, as connect() waits: the handshake's, neither.
    assert _readiness(s) == (False, False)
    fake.respond(req, -ECONNREFUSED)
    assert isinstance(call.oserror(), ConnectionRefusedError)
    fd = s._st.readyfd.fileno()  # not by fileno(), which updates it
    readable, writable, _ = select.select([fd], [fd], [], 0)
    assert (bool(readable), bool(writable)) == (True, True)
    s.close()


@pytest.mark.parametrize("timed", [False, True], ids=["blocking", "timeout"])
def test_a_refused_connect_interrupted_anywhere_polls_as_unconnected(
        fe: pvcalls.Frontend, fake: FakeBackend, timed: bool) -> None:
    """As above, with a Ctrl-C landing anywhere once connect() has the
    refusal: the descriptor polls as the unconnected socket's, readable
    and writable, though it polled as the ring said when the answer came
    (brought up to date then, as by another thread's fileno())."""
    within = os.path.dirname(_frontend.__file__)
    s = fe.socket()
    s.settimeout(TIMEOUT if timed else None)
    assert _readiness(s) == (True, True)
    fake.rets[PVCALLS_CONNECT] = -ECONNREFUSED
    taken: list[int] = []
    wait = fe._wait_slot

    def waited(req_id: int, slot: Any, *args: Any, **kwargs: Any) -> int:
        try:
            return wait(req_id, slot, *args, **kwargs)
        finally:
            if slot.cmd == PVCALLS_CONNECT and slot.done:
                s._update_ready()  # with the ring: not readable
                taken.append(slot.sock_id)

    fe._wait_slot = waited  # type: ignore[method-assign]
    refused = _refused(functools.partial(s.connect, _ADDRESS), errno.ECONNREFUSED)

    def attempt(n: int) -> str:
        taken.clear()
        return interrupted_at(n, within, refused, lambda: not taken)

    def check(where: str) -> None:
        fd = s._st.readyfd.fileno()  # not by fileno(), which updates it
        readable, writable, _ = select.select([fd], [fd], [], 0)
        assert (bool(readable), bool(writable)) == (True, True)
        if timed:
            _refused(functools.partial(s.connect, _ADDRESS), errno.ECONNABORTED)()

    _sweep(attempt, check, through=("_give_back", "_return_rings"))
    s.close()


def test_a_refused_nonblocking_connect_interrupted_anywhere_is_completed(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A Ctrl-C landing anywhere in a non-blocking connect() whose
    CONNECT the backend refuses: the refusal, if the CONNECT went out,
    completes the connect all the same (SO_ERROR says ECONNREFUSED, the
    ring is given back), and no response table entry stays taken.
    Before, one landing once the CONNECT was out and before its answer
    had a taker (as _connect_in_background or its _abandon started) left
    the answer to nobody: the socket connecting for good, its entry taken
    until the frontend closed; and one landing in the taker connect()
    ran itself, for an answer that came first, could leave the socket
    with the ring the backend had let go of."""
    within = os.path.dirname(_frontend.__file__)
    fake.rets[PVCALLS_CONNECT] = -ECONNREFUSED
    connects = _connects_submitted(fe)
    socks: list[pvcalls.PVSocket] = []  # the one each attempt connects

    def attempt(n: int) -> str:
        # The same path each time: a ring from the pool.  (A Ctrl-C in
        # the making of one leaves none; the connect sweeps of
        # test_frontend.py cover the making.)
        if not fe._ring_pool:
            with fe.socket() as first:
                first.settimeout(TIMEOUT)
                _refused(functools.partial(first.connect, ("127.0.0.1", 7)),
                         errno.ECONNREFUSED)()
        connects.clear()
        socks[:] = [fe.socket()]
        socks[0].setblocking(False)
        return interrupted_at(n, within, _refused(
            functools.partial(socks[0].connect, ("127.0.0.1", 7)), errno.EINPROGRESS))

    def check(where: str) -> None:
        (s,) = socks
        try:
            wait_until(lambda: not s._connecting)
        except TimeoutError:
            raise AssertionError("connecting for good") from None
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        sent = bool(connects) and connects[0].sent
        assert err == (errno.ECONNREFUSED if sent else 0)
        assert s._st.ring is None, "the ring kept"
        assert fe._slots.count(None) == RING_SLOTS, "a response table entry kept"
        # Unconnected, as a TCP socket whose connect failed: connect() may
        # be tried again (after the failure said once more, as by Linux's
        # second connect(), ECONNABORTED once SO_ERROR took it).
        s.settimeout(TIMEOUT)
        again = functools.partial(s.connect, ("127.0.0.1", 7))
        if sent:
            _refused(again, errno.ECONNABORTED)()
        _refused(again, errno.ECONNREFUSED)()
        s.close()

    _sweep(attempt, check, through=("_connect_taker", "Frontend._notify"))


def test_a_nonblocking_connect_interrupted_anywhere_polls_as_connecting(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A Ctrl-C landing anywhere in a non-blocking connect() of a socket
    whose fileno() was asked for first (as asyncio's sock_connect does):
    once the CONNECT is out, the descriptor polls neither readable nor
    writable until the answer, as a TCP socket's in its handshake (recv()
    and send() would block); if nothing went out, as before (both: the
    calls fail at once).  Before, one landing after the push (in the
    submit's notify, as it returned, or as the update after it started)
    left the descriptor polling as the unconnected socket had, readable
    and writable, for as long as the handshake took: a loop called
    recv() over and over, and asyncio took the writable descriptor and
    SO_ERROR's 0 for a connect done."""
    within = os.path.dirname(_frontend.__file__)
    fake.hold = {PVCALLS_CONNECT}
    connects = _connects_submitted(fe)
    socks: list[pvcalls.PVSocket] = []
    # Every attempt takes a pooled ring: one made by an attempt goes to the
    # pool, and the later attempts, going by fewer places (no pages laid
    # out), had the sweep skip a run of them, the submit's among them.
    primer = fe.socket()
    primer.setblocking(False)
    _refused(functools.partial(primer.connect, _ADDRESS), errno.EINPROGRESS)()
    fake.next_request(PVCALLS_CONNECT)
    primer.close()

    def attempt(n: int) -> str:
        wait_until(lambda: len(fe._ring_pool) == 1)  # back once the RELEASE is answered
        connects.clear()
        socks[:] = [s := fe.socket()]
        s.setblocking(False)
        assert _readiness(s) == (True, True)
        return interrupted_at(n, within, _refused(functools.partial(s.connect, _ADDRESS),
                                                  errno.EINPROGRESS))

    def check(where: str) -> None:
        (s,) = socks
        sent = bool(connects) and connects[0].sent
        assert s._connecting == sent
        fd = s._st.readyfd.fileno()  # not by fileno(), which updates it
        readable, writable, _ = select.select([fd], [fd], [], 0)
        assert (bool(readable), bool(writable)) == (not sent, not sent)
        if sent:
            with pytest.raises(BlockingIOError):
                s.recv(1)
            # Taken, not left to the next attempt, and answered: unanswered,
            # each kept its response table entry, and once the sweep had
            # more places after the push than the table has entries, the
            # next attempt found none (ENOBUFS).
            fake.respond(fake.next_request(PVCALLS_CONNECT),
                         -pvcalls_errno.from_host_errno(errno.ECONNREFUSED))
        s.close()

    _sweep(attempt, check, through=("Frontend._notify",))


def test_a_connect_interrupted_anywhere_before_its_answer_polls_as_what_it_left(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A Ctrl-C landing anywhere in a connect() with a timeout whose
    CONNECT the backend holds, on a socket whose fileno() was asked for
    first: the descriptor, which polls neither way once the connect()
    started (as a TCP socket's in its handshake), polls as what the
    Ctrl-C left.  Writable only once the CONNECT is out (the socket is
    good only for close(): send() fails at once); readable and writable
    if nothing went out (unconnected: recv() and send() fail at once,
    and connect() may be tried again).  Undisturbed, the timeout leaves
    it writable.  Left polling neither way, a selector waiting to write
    (or to read, before anything went out) waited for good.

    Not once the timeout passed: a Ctrl-C landing in the handling of the
    timeout cuts the call short a second time, and the descriptor's
    update there is a call, in which a handler may run."""
    within = os.path.dirname(_frontend.__file__)
    fake.hold = {PVCALLS_CONNECT}
    connects = _connects_submitted(fe)
    socks: list[pvcalls.PVSocket] = []
    timed_out: list[bool] = []
    wait = fe._wait_slot

    def waited(*args: Any, **kwargs: Any) -> int:
        try:
            return wait(*args, **kwargs)
        except TimeoutError:
            timed_out.append(True)
            raise

    fe._wait_slot = waited  # type: ignore[method-assign]

    def attempt(n: int) -> str:
        # The same path each time: a ring from the pool (as in the sweep
        # above).
        if not fe._ring_pool:
            fake.hold = set()
            fake.rets[PVCALLS_CONNECT] = -ECONNREFUSED
            with fe.socket() as first:
                _refused(functools.partial(first.connect, _ADDRESS), errno.ECONNREFUSED)()
            del fake.rets[PVCALLS_CONNECT]
            fake.hold = {PVCALLS_CONNECT}
        connects.clear()
        timed_out.clear()
        socks[:] = [s := fe.socket()]
        s.settimeout(0.2)
        assert _readiness(s) == (True, True)
        return interrupted_at(n, within, functools.partial(_times_out, s),
                              lambda: bool(timed_out))

    def check(where: str) -> None:
        (s,) = socks
        sent = bool(connects) and connects[0].sent
        assert _polls(s) == (not sent, True)
        if sent:
            with pytest.raises(OSError) as info:
                s.send(b"x")
            assert info.value.errno == errno.ENOTCONN
            # Answered, late: its response table entry is free for the
            # next attempt's CONNECT (held ones would fill the ring).
            fake.respond(fake.next_request(PVCALLS_CONNECT), -ECONNREFUSED)
        else:
            assert s._st.ring is None
        s.close()

    _sweep(attempt, check, through=("_update_ready", "Frontend._notify"))


def _times_out(s: pvcalls.PVSocket) -> None:
    with pytest.raises(TimeoutError):
        s.connect(_ADDRESS)


def _sweep_failed_timed_connects(fe: pvcalls.Frontend, timeout: float, failed: list[bool], *,
                                 through: tuple[str, ...]) -> None:
    """Sweep a connect() with ``timeout`` that times out (``failed``,
    cleared before each attempt, set by the step the test made fail it),
    a Ctrl-C landing anywhere: the socket must be left unconnected (its
    ring given back) or given up on, never holding a ring with no peer
    and no mark (a handshake's look: polling neither way, for good),
    and its descriptor must poll writable at least."""
    within = os.path.dirname(_frontend.__file__)
    socks: list[pvcalls.PVSocket] = []

    def attempt(n: int) -> str:
        failed.clear()
        socks[:] = [s := fe.socket()]
        s.settimeout(timeout)
        assert _readiness(s) == (True, True)
        return interrupted_at(n, within, functools.partial(_times_out, s), lambda: not failed)

    def check(where: str) -> None:
        (s,) = socks
        assert s._st.ring is None or s._broken, "kept its ring, and not given up on"
        readable, writable = _polls(s)
        assert writable, (readable, writable)
        s.close()

    _sweep(attempt, check, through=through)


def test_a_connect_timed_out_as_refused_interrupted_anywhere_is_not_left_in_its_handshake(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A connect() with a timeout whose wait gives up as the refusal
    comes in (the answer is in when the handler looks), and a Ctrl-C
    landing anywhere in that handling: the socket is left unconnected
    (its ring given back) or given up on (good only for close()), and
    its descriptor, which polled neither way while the CONNECT waited,
    polls writable at least (send() fails at once).  Before, one landing
    in the refusal's handling once the socket was taken back from given
    up on, but before its ring was given back, left it with the ring, no
    peer and not given up on: polling as in its handshake, neither way,
    for good (and connect() said EISCONN for good)."""
    fake.hold = {PVCALLS_CONNECT}
    timed_out: list[bool] = []
    wait = fe._wait_slot

    def gives_up_as_refused(req_id: int, slot: Any, *args: Any, **kwargs: Any) -> int:
        if slot.cmd != PVCALLS_CONNECT:
            return wait(req_id, slot, *args, **kwargs)
        fake.respond(fake.next_request(PVCALLS_CONNECT), -ECONNREFUSED)
        wait_until(lambda: slot.done)
        timed_out.append(True)
        raise TimeoutError("timed out")

    fe._wait_slot = gives_up_as_refused  # type: ignore[method-assign]
    _sweep_failed_timed_connects(fe, TIMEOUT, timed_out, through=("_connect_cut_short",))


def test_a_timed_connect_that_sent_nothing_interrupted_anywhere_is_not_left_in_its_handshake(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A connect() with a timeout whose CONNECT finds no room on the
    command ring in time, and a Ctrl-C landing anywhere in the handling
    of that: the socket is left unconnected (its ring given back,
    connect() may be tried again) or given up on (good only for
    close()), and its descriptor polls writable at least.  Before, one
    landing as the ring was given back left the ring with no peer and no
    mark, which is what a handshake looks like: polling neither way for
    good, and connect() saying EISCONN for good.  (For a non-blocking
    one see the test below.)"""
    failed: list[bool] = []
    submit = fe._submit

    def no_room(slot: Any, *args: Any, **kwargs: Any) -> int:
        if slot.cmd == PVCALLS_CONNECT:
            failed.append(True)
            raise TimeoutError("no room on the command ring in time")
        return submit(slot, *args, **kwargs)

    fe._submit = no_room  # type: ignore[method-assign]
    _sweep_failed_timed_connects(fe, 0.2, failed, through=("_give_back", "_return_rings"))


@pytest.mark.parametrize("after", [False, True], ids=["anywhere", "once-failed"])
def test_a_nonblocking_connect_that_sent_nothing_interrupted_anywhere_is_not_left_connecting(
        fe: pvcalls.Frontend, fake: FakeBackend, after: bool) -> None:
    """A non-blocking connect() whose CONNECT finds no room on the
    command ring, and a Ctrl-C landing anywhere in it (``once-failed``:
    anywhere once the submit failed, the window this is about): nothing
    went out, so no answer will come, and the socket must not be left
    connecting (connect() saying EALREADY, recv() EAGAIN, polling neither
    way, for good).  It is left unconnected (connect() may be tried
    again) or given up on (good only for close()), polling writable at
    least.  Before, one landing as the handling of the failure marked it
    connecting no longer left it connecting for good."""
    within = os.path.dirname(_frontend.__file__)
    socks: list[pvcalls.PVSocket] = []
    failed: list[bool] = []
    submit = fe._submit

    def no_room(slot: Any, *args: Any, **kwargs: Any) -> int:
        if slot.cmd == PVCALLS_CONNECT:
            failed.append(True)
            raise BlockingIOError(errno.EAGAIN, "the command ring is full")
        return submit(slot, *args, **kwargs)

    fe._submit = no_room  # type: ignore[method-assign]

    def attempt(n: int) -> str:
        failed.clear()
        socks[:] = [s := fe.socket()]
        s.setblocking(False)
        assert _readiness(s) == (True, True)
        return interrupted_at(n, within, _refused(functools.partial(s.connect, _ADDRESS),
                                                  errno.ENOBUFS),
                              (lambda: not failed) if after else (lambda: False))

    def check(where: str) -> None:
        (s,) = socks
        assert not s._connecting, "connecting, with nothing sent"
        assert s._st.ring is None or s._broken, "kept its ring, and not given up on"
        readable, writable = _polls(s)
        assert writable, (readable, writable)
        if not s._broken:
            # Unconnected: connect() starts over (and finds no room again).
            _refused(functools.partial(s.connect, _ADDRESS), errno.ENOBUFS)()
        s.close()

    _sweep(attempt, check, through=("connect",))


def test_a_connect_whose_submit_failed_once_sent_interrupted_anywhere_is_given_up_on(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A connect() whose submit fails once the CONNECT went out (its
    notify, say), the backend holding the CONNECT, and a Ctrl-C landing
    anywhere in the handling of that: the socket is given up on (the
    answer is unknown: good only for close()), and its descriptor polls
    writable, send() failing at once.  Marked only where the answer is
    found missing, one landing as that handling started left the ring
    with no peer and no mark, the handshake's look: neither way, for
    good."""
    within = os.path.dirname(_frontend.__file__)
    fake.hold = {PVCALLS_CONNECT}
    socks: list[pvcalls.PVSocket] = []
    failed: list[bool] = []
    submit = fe._submit

    def fails_once_sent(slot: Any, *args: Any, **kwargs: Any) -> int:
        req_id = submit(slot, *args, **kwargs)
        if slot.cmd == PVCALLS_CONNECT:
            failed.append(True)
            raise OSError(errno.EIO, "the notify failed")
        return req_id

    fe._submit = fails_once_sent  # type: ignore[method-assign]

    def attempt(n: int) -> str:
        failed.clear()
        socks[:] = [s := fe.socket()]
        s.settimeout(TIMEOUT)
        assert _readiness(s) == (True, True)
        return interrupted_at(n, within, _refused(functools.partial(s.connect, _ADDRESS),
                                                  errno.EIO), lambda: not failed)

    def check(where: str) -> None:
        (s,) = socks
        assert s._broken, "not given up on"
        readable, writable = _polls(s)
        assert writable, (readable, writable)
        # Answered, late: its response table entry is free for the next
        # attempt's CONNECT.
        fake.respond(fake.next_request(PVCALLS_CONNECT), -ECONNREFUSED)
        s.close()

    _sweep(attempt, check, through=("_connect_cut_short",))


def test_data_before_the_connect_answer_polls_as_the_handshake(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A backend that puts data into the ring of a CONNECT it has not
    answered yet: the socket, in its handshake, polls neither readable
    nor writable all the same (its recv() waits for the connect()), and
    once connected, readable with that data."""
    s = fe.socket()
    s.settimeout(TIMEOUT)
    assert _readiness(s) == (True, True)
    fake.hold = {PVCALLS_CONNECT}
    call = Call(functools.partial(s.connect, _ADDRESS))
    req = fake.next_request(PVCALLS_CONNECT)
    wait_until(lambda: bool(fe._cmd_cond._waiters))  # connect() waits for the answer
    fake.rings[req.id] = ring = FakeDataRing(fake, req.ref, req.evtchn)
    ring.produce(b"early")
    assert Call(s.fileno).join().error is None  # another thread's: brought up to date
    assert _polls(s) == (False, False)
    fake.respond(req, 0)
    assert call.join().error is None, call.error
    assert _polls(s) == (True, True)
    assert s.recv(16) == b"early"
    s.close()


def test_a_refused_accept_leaves_the_listener_unreadable_until_a_connection_is_pending(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """ACCEPT refused on a listener whose fileno() is in use: its
    descriptor, readable while the answer was there for accept() to take,
    polls unreadable once accept() reported it, while the POLL sent again
    waits for a connection, and readable once that POLL says one is
    pending.  A descriptor left readable had a selector call accept()
    over and over, each failing with EAGAIN."""
    ls = _listener(fe)
    fd = ls.fileno()  # its POLL goes out, answered at once
    wait_until(lambda: ls._poll_ready)
    fake.rets[PVCALLS_ACCEPT] = -EINVAL
    fake.hold.add(PVCALLS_POLL)
    _refused(ls.accept, errno.EINVAL)()
    req = fake.next_request(PVCALLS_POLL)
    # Not brought up to date by fileno(): as a selector that registered
    # the listener before.
    assert select.select([fd], [], [], 0)[0] == []
    fake.respond(req, 0)
    wait_until(lambda: select.select([fd], [], [], 0)[0] != [])
    ls.close()


def _refused_poll_listener(fe: pvcalls.Frontend, fake: FakeBackend) -> tuple[pvcalls.PVSocket, int]:
    """A listener whose fileno() is in use, with a refused POLL's error
    for accept() to report."""
    ls = _listener(fe)
    fake.rets[PVCALLS_POLL] = -EINVAL
    fd = ls.fileno()  # its POLL goes out, refused
    wait_until(lambda: select.select([fd], [], [], 0)[0] != [])
    del fake.rets[PVCALLS_POLL]
    return ls, fd


def test_a_refused_poll_cut_short_once_a_connection_is_pending_gives_the_connection(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A Ctrl-C cutting short accept()'s report of a refused POLL once
    the POLL sent again (for fileno()) said a connection is pending: the
    next accept() takes the connection.  The newer answer stands; the
    refusal given back as well failed that accept() with a stale error."""
    ls, _ = _refused_poll_listener(fe, fake)
    arm = ls._arm_poll

    def arm_then_answered(deadline: Any = None) -> None:
        arm(deadline)
        if ls._poll_inflight or ls._poll_ready:  # the POLL sent again
            wait_until(lambda: ls._poll_ready)

    ls._arm_poll = arm_then_answered  # type: ignore[method-assign]
    assert interrupted_as_frame_starts(pvcalls.PVSocket._update_ready.__code__, ls.accept)
    del ls._arm_poll
    conn, _ = ls.accept()
    conn.close()
    ls.close()


def test_a_refused_poll_cut_short_as_the_descriptor_was_updated_leaves_it_readable(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A Ctrl-C cutting short accept()'s report of a refused POLL as it
    brought fileno()'s descriptor up to date (unreadable, the POLL sent
    again unanswered): the refusal is back for the next accept() to
    report, and the descriptor says so at once, without a fileno() call
    (a selector that registered the listener makes none)."""
    ls, fd = _refused_poll_listener(fe, fake)
    fake.hold.add(PVCALLS_POLL)
    update = ls._update_ready
    cut: list[bool] = []

    def then_cut() -> None:
        update()
        if threading.current_thread() is threading.main_thread() and not cut:
            cut.append(True)
            raise Interrupted

    ls._update_ready = then_cut  # type: ignore[method-assign]
    with pytest.raises(Interrupted):
        ls.accept()
    del ls._update_ready
    req = fake.next_request(PVCALLS_POLL)  # sent again, for fileno()
    assert select.select([fd], [], [], 0)[0] != []
    _refused(ls.accept, errno.EINVAL)()
    fake.respond(req, 0)
    conn, _ = ls.accept()
    conn.close()
    ls.close()


def test_a_refused_connect_cut_short_in_its_wait_frees_its_entry(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A Ctrl-C landing in a blocking connect()'s wait once the refusal
    came (as the wait wakes for it, before it freed the response table
    entry): the entry is freed all the same, the ring given back, and
    connect() may be tried again."""
    within = os.path.dirname(_frontend.__file__)
    s = fe.socket()
    s.settimeout(TIMEOUT)
    fake.hold.add(PVCALLS_CONNECT)
    connects = _connects_submitted(fe)

    def answer() -> None:
        req = fake.next_request(PVCALLS_CONNECT)
        wait_until(lambda: bool(fe._cmd_cond._waiters))  # connect() waits for it
        fake.respond(req, -ECONNREFUSED)

    answerer = threading.Thread(target=answer)
    answerer.start()
    where = interrupted_at(0, within, lambda: s.connect(("127.0.0.1", 7)),
                           lambda: not (connects and connects[0].done))
    answerer.join(TIMEOUT)
    assert "_wait_slot" in where, where
    assert fe._slots.count(None) == RING_SLOTS, "the response table entry kept"
    assert s._st.ring is None
    fake.hold.discard(PVCALLS_CONNECT)
    fake.rets[PVCALLS_CONNECT] = -ECONNREFUSED
    # Once ECONNABORTED, as after a refused connect() with a timeout.
    _refused(lambda: s.connect(("127.0.0.1", 7)), errno.ECONNABORTED)()
    _refused(lambda: s.connect(("127.0.0.1", 7)), errno.ECONNREFUSED)()
    s.close()


def _waiter_as_the_connect_finds_no_room(fe: pvcalls.Frontend, s: Any) -> list[Call]:
    """Have ``s``'s next CONNECT find the command ring full (nothing
    sent), once another thread's blocking connect() (the one Call in the
    list returned, filled then) waits for its answer."""
    submit = fe._submit
    waiting: list[Call] = []

    def full(slot: Any, *args: Any, **kwargs: Any) -> int:
        if slot.cmd == PVCALLS_CONNECT and not waiting:
            s._timeout = None  # as another thread's settimeout(None) meanwhile
            waiting.append(Call(lambda: s.connect(("127.0.0.1", 7))))
            wait_until(lambda: bool(s._cond._waiters))  # waits for the answer
            raise BlockingIOError(errno.EAGAIN, "the command ring is full")
        return submit(slot, *args, **kwargs)

    fe._submit = full  # type: ignore[method-assign]
    return waiting


def test_a_connect_waiting_on_a_nonblocking_one_that_sent_nothing_goes_on(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A non-blocking connect() is connecting from before its CONNECT goes
    out (so that a Ctrl-C after the push leaves its answer a taker).  A
    blocking connect() of another thread that came meanwhile waits for
    that answer; when the CONNECT could not go out (the command ring
    full), it is told, and connects.  Before, it was not: it slept until
    the socket closed."""
    s = fe.socket()
    s.setblocking(False)
    waiting = _waiter_as_the_connect_finds_no_room(fe, s)
    with pytest.raises(OSError) as info:
        s.connect(("127.0.0.1", 7))
    assert info.value.errno == errno.ENOBUFS
    (other,) = waiting
    assert other.join().error is None  # connected
    assert s.getpeername() == ("127.0.0.1", 7)
    s.close()


def test_a_connect_waiting_on_a_nonblocking_one_that_sent_nothing_goes_on_despite_a_ctrl_c(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """As above, with a Ctrl-C landing as the non-blocking connect()'s
    handler starts to wake the waiter (as ``notify_all`` starts, once the
    socket is marked connecting no longer): no wake-up comes, and the
    waiter must see for itself that the connect it waits for is over.
    Before, it slept until the socket closed."""
    s = fe.socket()
    s.setblocking(False)

    class Noting(threading.Condition):
        """The socket's condition, noting the main thread's wake-ups."""

        def notify(self, n: int = 1) -> None:
            if threading.current_thread() is threading.main_thread():
                woken.append(n)
            super().notify(n)

    woken: list[int] = []
    s._cond = Noting(s._mutex)
    waiting = _waiter_as_the_connect_finds_no_room(fe, s)
    assert interrupted_as_frame_starts(threading.Condition.notify_all.__code__,
                                       lambda: s.connect(("127.0.0.1", 7)))
    # Landed as the handler's wake-up started: none came, and the socket
    # is connecting no longer.
    assert woken == [] and not s._connecting
    (other,) = waiting
    assert other.join().error is None  # connected
    assert s.getpeername() == ("127.0.0.1", 7)
    s.close()


def test_a_wait_that_close_ends_looks_again_each_second_and_keeps_its_time() -> None:
    """Deadline.recheck(), the slice of every wait another thread's
    close() ends: RECHECK at most in any thread, with a limit or not (a
    lost wake-up costs a second, not the call's whole timeout); in the
    main thread the half second of every wait (workqueue.wait_slice); the
    time left if less (the call's timeout is not stretched); and
    TimeoutError once it is over."""
    assert _common.Deadline(None).recheck() == workqueue.wait_slice(None)  # the main thread
    for timeout in (None, 6 * TIMEOUT):
        assert Call(_common.Deadline(timeout).recheck).join().result == _common.RECHECK
    assert 0 < Call(_common.Deadline(0.05).recheck).join().result <= 0.05
    assert isinstance(Call(_common.Deadline(0.0).recheck).join().error, TimeoutError)


@pytest.mark.parametrize("timeout", [None, 6 * TIMEOUT])
@pytest.mark.parametrize("call", ["recv", "recv (shared handle)", "send", "accept (poll)",
                                  "accept (answer)", "connect", "connect (no room)"])
def test_a_blocking_call_in_another_thread_ends_when_a_ctrl_c_lands_as_close_wakes_it(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        call: str, timeout: float | None) -> None:
    """A call with no timeout in another thread, asleep until something
    comes (data, a POLL's or a command's answer, room on the command
    ring), and close() in the main thread, a Ctrl-C landing as its first
    ``notify_all`` starts (the command condition's, before the socket's:
    neither wakes anyone).  The
    socket is closed to its calls all the same, and the call must see it
    for itself: EBADF.  Before, it slept until the next close() finished
    the release, on a socket already closed, and for good if none came
    (the program exiting on that Ctrl-C waited for its thread).  A call
    with a timeout longer than the test's sees it as soon: not when its
    time is over."""
    if call == "recv (shared handle)":

        def no_handle_of_its_own() -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(fe.domain, "evtchn", no_handle_of_its_own)
    if call.startswith("accept"):
        s = fe.socket()
        s.bind(("127.0.0.1", 4000))
        s.listen()
        s.settimeout(timeout)
        cmd = PVCALLS_POLL if call == "accept (poll)" else PVCALLS_ACCEPT
        fake.hold = {cmd}
        blocked = Call(s.accept)
        fake.next_request(cmd)
    elif call == "connect":
        s = fe.socket()
        s.settimeout(timeout)
        fake.hold = {PVCALLS_CONNECT}
        blocked = Call(lambda: s.connect(("127.0.0.1", 7)))
        fake.next_request(PVCALLS_CONNECT)
    elif call == "connect (no room)":
        s = fe.socket()
        s.settimeout(timeout)
        monkeypatch.setattr(fe, "_has_room", lambda spare: False)  # the command ring full
        blocked = Call(lambda: s.connect(("127.0.0.1", 7)))
    else:
        s, ring = connected(fe, fake)
        assert s._st.ring is not None and s._st.ring.direct == (call != "recv (shared handle)")
        s.settimeout(timeout)
        if call == "send":
            blocked = Call(lambda: s.sendall(bytes(2 * ring.size)))  # the fake reads none
        else:
            blocked = Call(lambda: s.recv(10))
    cmd_cond: Any = fe._cmd_cond
    wait_until(lambda: sleeping_in_wait(s) or bool(cmd_cond._waiters))
    assert interrupted_as_frame_starts(threading.Condition.notify_all.__code__, s.close)
    assert s.closed
    assert blocked.oserror().errno == errno.EBADF
    monkeypatch.undo()  # room for the RELEASE
    s.close()  # finishes the release


@pytest.mark.parametrize("end", ["accepted", "refused", "closed", "interrupted", "gone"])
def test_a_blocking_connect_while_another_threads_waits_reports_how_that_one_ended(
        fe: pvcalls.Frontend, fake: FakeBackend, end: str) -> None:
    """A blocking connect() while another thread's blocking connect()
    waits for its CONNECT's answer waits for that one to end (as Linux's
    for the handshake), sends nothing of its own, and says how it ended:
    it returns once connected; EPIPE once refused (the other says the
    refusal), the socket left unconnected; EBADF once closed; EISCONN
    once the other was cut short by a Ctrl-C (the socket given up on,
    good only for close()); the frontend's error once the backend went.
    Before, it failed with EISCONN at once."""
    s = fe.socket()
    s.settimeout(None)
    fake.hold = {PVCALLS_CONNECT}
    connects = _connects_submitted(fe)
    calls: list[Call] = []

    def waiting() -> bool:
        return bool(calls) and stands_at(calls[-1].ident, pvcalls.PVSocket._join_connect,
                                         "held(self._connect_lock")

    def second_when_first_waits() -> None:
        req = fake.next_request(PVCALLS_CONNECT)
        wait_until(lambda: bool(fe._cmd_cond._waiters))  # the first waits for the answer
        calls.append(Call(functools.partial(s.connect, _ADDRESS)))
        wait_until(lambda: waiting() or not calls[-1].alive())  # failed at once, before
        requests.append(req)

    requests: list[Request] = []
    starter = threading.Thread(target=second_when_first_waits)
    starter.start()
    if end == "interrupted":
        with signal_taken_elsewhere(lambda: bool(requests)), pytest.raises(Interrupted):
            s.connect(_ADDRESS)
        starter.join(TIMEOUT)
        assert s._broken
        assert requests and calls[0].oserror().errno == errno.EISCONN
        fake.respond(requests[0], 0)  # late: nobody takes it
        s.close()
        return
    first = Call(functools.partial(s.connect, _ADDRESS))
    starter.join(TIMEOUT)
    (req,) = requests
    (second,) = calls
    assert second.alive(), f"did not wait: {second.error!r}"
    assert first.alive()
    if end == "accepted":
        fake.respond(req, 0)
        assert first.join().error is None, first.error
        assert second.join().error is None, second.error
        assert s.getpeername() == _ADDRESS
        _refused(functools.partial(s.connect, _ADDRESS), errno.EISCONN)()
    elif end == "refused":
        fake.respond(req, -ECONNREFUSED)
        assert isinstance(first.oserror(), ConnectionRefusedError)
        assert second.oserror().errno == errno.EPIPE
        assert s._st.ring is None and not s._broken
        assert _readiness(s) == (True, True)
    elif end == "closed":
        s.close()
        assert first.oserror().errno == errno.EBADF
        assert second.oserror().errno == errno.EBADF
    else:
        fake.set_state(5)  # Closing: the backend goes away
        assert first.oserror().errno == second.oserror().errno != errno.EISCONN
    assert len(connects) == 1, "the second sent a CONNECT of its own"
    s.close()


@pytest.mark.parametrize("refused", [False, True], ids=["accepted", "refused"])
def test_a_blocking_connect_while_another_threads_timed_one_waits(
        fe: pvcalls.Frontend, fake: FakeBackend, refused: bool) -> None:
    """As above, the first connect() with a timeout (the socket made
    blocking meanwhile): that one leaves its outcome to the next
    connect() (see connect()), which the waiting one is.  Connected, both
    return and the next says EISCONN, as on Linux (6.18, measured).
    Refused, the first says so and the waiting one ECONNABORTED, as the
    connect() after any refused timed one; the next starts over.  (Linux's
    gives the refusal to the blocking one, and the timed one, finding
    SO_ERROR taken, returns as if connected.)"""
    s = fe.socket()
    s.settimeout(TIMEOUT)
    connects = _connects_submitted(fe)
    first, req = _connect_waiting_for_its_answer(fe, fake, s)
    s.settimeout(None)
    second = _connect_waiting_on_the_one_under_way(s)
    fake.respond(req, -ECONNREFUSED if refused else 0)
    if refused:
        assert isinstance(first.oserror(), ConnectionRefusedError)
        assert second.oserror().errno == errno.ECONNABORTED
        assert s._st.ring is None and not s._broken
        fake.hold = set()
        fake.rets[PVCALLS_CONNECT] = -ECONNREFUSED
        _refused(functools.partial(s.connect, _ADDRESS), errno.ECONNREFUSED)()
        assert len(connects) == 2, "did not start over"
    else:
        assert first.join().error is None, first.error
        assert second.join().error is None, second.error
        _refused(functools.partial(s.connect, _ADDRESS), errno.EISCONN)()
        assert len(connects) == 1
    s.close()


@pytest.mark.parametrize("timeout", [0.0, 0.2], ids=["nonblocking", "timed"])
def test_a_connect_while_another_threads_sets_out_waits_no_longer_than_its_timeout(
        fe: pvcalls.Frontend, fake: FakeBackend, timeout: float) -> None:
    """A non-blocking or timed connect() while another thread's (of the
    same mode) takes its first steps, its data ring not made yet (so not
    in its handshake, see _handshaking): it waits for that one within its
    own timeout only, as for any lock of the socket: non-blocking, it
    fails at once with EALREADY (a BlockingIOError: Linux's finds the
    other's in SS_CONNECTING once it has its socket lock; before, EAGAIN);
    timed, with TimeoutError once its time is over.  It sends nothing,
    and the other goes on."""
    s = fe.socket()
    s.settimeout(timeout)
    connects = _connects_submitted(fe)
    pause = PauseAt(pvcalls.PVSocket.connect, "sockaddr = pack_sockaddr_in(host, port)")
    first = Call(lambda: pause.run(lambda: s.connect(_ADDRESS)))
    assert pause.reached.wait(TIMEOUT)
    started = time.monotonic()
    try:
        with pytest.raises(BlockingIOError if timeout == 0.0 else TimeoutError) as info:
            s.connect(_ADDRESS)
        assert time.monotonic() - started < TIMEOUT / 2, "waited for the other connect()"
        if timeout == 0.0:
            assert info.value.errno == errno.EALREADY, info.value
    finally:
        pause.resume()
    if timeout == 0.0:
        assert first.oserror().errno == errno.EINPROGRESS
        wait_until(lambda: not s._connecting)  # answered
    else:
        assert first.join().error is None, first.error
    assert s.getpeername() == _ADDRESS
    assert len(connects) == 1
    s.close()


def test_a_blocking_connect_while_a_nonblocking_one_sets_out_waits_for_its_answer(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A blocking connect() while another thread's non-blocking one has
    made its data ring (in its handshake, see _handshaking) but is not yet
    marked connecting: it waits for that connect() to return, and then,
    its CONNECT in flight, for the answer, as for any non-blocking
    connect()'s; it returns once connected, having sent nothing."""
    s = fe.socket()
    s.setblocking(False)
    fake.hold = {PVCALLS_CONNECT}
    connects = _connects_submitted(fe)
    pause = PauseAt(pvcalls.PVSocket.connect, "slot.on_done = self._connect_taker(host, port)")
    first = Call(lambda: pause.run(lambda: s.connect(_ADDRESS)))
    assert pause.reached.wait(TIMEOUT)
    s.settimeout(None)  # as another thread's meanwhile: the first is non-blocking already
    second = _connect_waiting_on_the_one_under_way(s)
    pause.resume()
    assert first.oserror().errno == errno.EINPROGRESS
    req = fake.next_request(PVCALLS_CONNECT)
    wait_until(lambda: bool(s._cond._waiters) or not second.alive())
    assert second.alive(), f"did not wait for the answer: {second.error!r}"
    fake.respond(req, 0)
    assert second.join().error is None, second.error
    assert s.getpeername() == _ADDRESS
    assert len(connects) == 1
    s.close()


def test_a_connect_that_waited_on_a_refused_one_says_so_whatever_comes_next(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A blocking connect() that waited for another thread's, refused,
    fails with EPIPE (as above) also when a third thread's connect()
    comes as it looks at how the other ended: that one sets out once this
    one has told.  Before, the waiting one let go of the connect lock
    first, the third made the socket its own (a ring, its CONNECT in
    flight), and the waiting one said EISCONN, reporting the third's
    connect rather than the one it waited for."""
    s = fe.socket()
    s.settimeout(None)
    connects = _connects_submitted(fe)
    first, req = _connect_waiting_for_its_answer(fe, fake, s)
    # Stopped as it looks whether the socket is unconnected, the other over.
    pause = PauseAt(pvcalls.PVSocket._check_unconnected, "if self._st.ring")
    second = _connect_waiting_on_the_one_under_way(s, pause)
    fake.respond(req, -ECONNREFUSED)
    assert isinstance(first.oserror(), ConnectionRefusedError)
    assert pause.reached.wait(TIMEOUT)
    third = Call(functools.partial(s.connect, _ADDRESS))
    try:
        # Its CONNECT made, or waiting for the connect lock, or for the
        # socket's state, which the waiting one looks at under its lock.
        wait_until(lambda: s._st.ring is not None or stands_at(
            third.ident, pvcalls.frontend._common.Deadline.take, "(True,)") or stands_at(
            third.ident, pvcalls.PVSocket.connect, "with self._mutex:"))
    finally:
        pause.resume()
    assert second.oserror().errno == errno.EPIPE
    fake.respond(fake.next_request(PVCALLS_CONNECT), 0)
    assert third.join().error is None, third.error
    assert s.getpeername() == _ADDRESS
    assert len(connects) == 2
    s.close()


def test_a_connect_waiting_on_another_threads_interrupted_anywhere_leaves_it_alone(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A Ctrl-C landing anywhere in a blocking connect() that waits for
    another thread's (see above), which the backend then accepts: the
    other one connects the socket all the same, and no lock of the
    socket is left held (the next connect() says EISCONN, a recv() and
    a send() go on)."""
    within = os.path.dirname(_frontend.__file__)
    fake.hold = {PVCALLS_CONNECT}
    socks: list[pvcalls.PVSocket] = []
    firsts: list[Call] = []

    def answer_once_waiting(over: threading.Event) -> None:
        req = fake.next_request(PVCALLS_CONNECT)
        # Once the main thread waits for the first (or the Ctrl-C ended
        # its connect() before).
        wait_until(lambda: over.is_set() or _main_thread_waits_on_the_connect_under_way())
        fake.respond(req, 0)

    def attempt(n: int) -> str:
        socks[:] = [s := fe.socket()]
        s.settimeout(None)
        firsts[:] = [Call(functools.partial(s.connect, _ADDRESS))]
        wait_until(lambda: s._handshaking())
        return _connect_interrupted_at(n, within, s, answer_once_waiting)

    def check(where: str) -> None:
        (s,), (first,) = socks, firsts
        assert first.join().error is None, first.error
        assert s.getpeername() == _ADDRESS
        assert not s._connect_lock.locked(), "left held"
        _refused(functools.partial(s.connect, _ADDRESS), errno.EISCONN)()
        s.close()

    _sweep(attempt, check, through=("_join_connect",))


@pytest.mark.parametrize("how", ["no room", "interrupted"])
def test_a_blocking_connect_behind_one_that_sent_nothing_sends_its_own(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        how: str) -> None:
    """A blocking connect() that waits for another thread's (in its
    handshake: a data ring, no peer), which then sends nothing (no room
    on the command ring: ENOBUFS; or a Ctrl-C as it waits for room): it
    starts a connect of its own, as Linux's would on the socket left
    unconnected, and connects.  Before, it failed with EPIPE as if the
    other's CONNECT had been refused."""
    s = fe.socket()
    s.settimeout(0.0 if how == "no room" else None)
    fake.hold = {PVCALLS_CONNECT}
    connects = _connects_submitted(fe)
    starved = _starved_threads(fe, monkeypatch)  # the thread of the first connect(): no room for it
    seconds: list[Call] = []

    def joined() -> bool:
        return bool(seconds) and stands_at(seconds[-1].ident, pvcalls.PVSocket._join_connect,
                                           "held(self._connect_lock")

    if how == "no room":
        # Its ring made, not yet marked connecting (see _handshaking).
        pause = PauseAt(pvcalls.PVSocket.connect, "slot.on_done = self._connect_taker(host, port)")
        first = Call(lambda: pause.run(lambda: s.connect(_ADDRESS)))
        starved.append(first.ident)
        assert pause.reached.wait(TIMEOUT)
        assert s._handshaking() and not s._connecting
        s.settimeout(None)  # as another thread's: the first is non-blocking already
        seconds.append(Call(lambda: s.connect(_ADDRESS)))
        wait_until(lambda: joined() or not seconds[-1].alive())
        pause.resume()
        assert first.oserror().errno == errno.ENOBUFS
    else:
        starved.append(threading.get_ident())
        cmd_cond: Any = fe._cmd_cond

        def second_when_first_waits() -> None:
            wait_until(lambda: bool(cmd_cond._waiters))  # the first waits for room
            seconds.append(Call(lambda: s.connect(_ADDRESS)))
            wait_until(lambda: joined() or not seconds[-1].alive())

        starter = threading.Thread(target=second_when_first_waits)
        starter.start()
        try:
            with signal_taken_elsewhere(lambda: not starter.is_alive()), \
                    pytest.raises(Interrupted):
                s.connect(_ADDRESS)
        finally:
            starter.join(TIMEOUT)
    (second,) = seconds
    assert second.alive(), f"sent nothing: {second.error!r}"
    fake.respond(fake.next_request(PVCALLS_CONNECT), 0)
    assert second.join().error is None, second.error
    assert s.getpeername() == _ADDRESS
    assert [slot.sent for slot in connects] == [False, True]
    # Room for this thread again: its close()'s RELEASE waited out the
    # frontend's timeout for room, and logged it failed.
    starved.clear()
    s.close()


def test_a_nonblocking_connect_while_another_threads_settles_its_refusal_says_ealready(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A non-blocking connect() while another thread's blocking one,
    refused, holds the socket's connect lock to put the socket back as
    it was: a connect() of another thread is under way, and it fails
    with EALREADY (BlockingIOError), as on a socket in its handshake,
    not EAGAIN (which a TCP connect() says for no free local port).  It
    does not wait for the lock (no non-blocking call does), and the next
    connect() starts over."""
    s = fe.socket()
    s.settimeout(None)
    fake.hold = {PVCALLS_CONNECT}
    connects = _connects_submitted(fe)
    pause = PauseAt(pvcalls.PVSocket.connect, "self._update_ready_or_log()",
                    after="self._fe._put_data_ring(self._st, reusable=True)")
    first = Call(lambda: pause.run(lambda: s.connect(_ADDRESS)))
    fake.respond(fake.next_request(PVCALLS_CONNECT), -ECONNREFUSED)
    assert pause.reached.wait(TIMEOUT)
    try:
        assert s._st.ring is None and s._connect_lock.locked()
        s.setblocking(False)
        with pytest.raises(BlockingIOError) as info:
            s.connect(_ADDRESS)
        assert info.value.errno == errno.EALREADY, info.value
    finally:
        pause.resume()
    assert isinstance(first.oserror(), ConnectionRefusedError)
    fake.hold = set()
    s.setblocking(True)
    s.connect(_ADDRESS)
    assert s.getpeername() == _ADDRESS
    assert len(connects) == 2
    s.close()


@pytest.mark.parametrize("third", ["connect", "close"])
def test_a_connect_that_waited_on_one_whose_outcome_another_took_says_it_failed(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        third: str) -> None:
    """A blocking connect() (the second) waits for another thread's timed
    one, refused; a third thread's connect() takes the outcome the timed
    one left to the next (ECONNABORTED) before the second does, and then
    connects again, or closes the socket.  The second fails with EPIPE
    (the connect it waited for failed), or EBADF once closed: how it
    ended is told as it finds the outcome taken, under the socket's
    lock.  Before, it looked later, and reported the third's connect in
    its handshake as its own: EISCONN."""
    s = fe.socket()
    s.settimeout(TIMEOUT)
    first, req = _connect_waiting_for_its_answer(fe, fake, s)
    s.settimeout(None)
    at_finish = PauseAt(pvcalls.PVSocket._join_connect, "self._finish_connect(Deadline(None)")
    # Stopped once it found nothing to report, as it returns (old code).
    taken = PauseAt.in_method(monkeypatch, pvcalls.PVSocket, "_finish_connect", "return False")
    second = _connect_waiting_on_the_one_under_way(s, at_finish)
    fake.respond(req, -ECONNREFUSED)
    assert isinstance(first.oserror(), ConnectionRefusedError)
    assert at_finish.reached.wait(TIMEOUT)
    try:
        s.settimeout(0.0)
        _refused(functools.partial(s.connect, _ADDRESS), errno.ECONNABORTED)()
    finally:
        at_finish.resume()
    wait_until(lambda: taken.reached.is_set() or not second.alive())
    if not taken.reached.is_set():
        # The second is over, not stopped: nobody is to stop there (the
        # third's connect() looks there too, with the socket's locks).
        taken.resume()
    requests: list[Request] = []
    try:
        if third == "connect":
            s.settimeout(None)
            third_call = Call(functools.partial(s.connect, _ADDRESS))
            requests.append(fake.next_request(PVCALLS_CONNECT))  # in its handshake
        else:
            s.close()
    finally:
        taken.resume()
    if third == "connect":
        assert second.oserror().errno == errno.EPIPE
        fake.respond(requests[0], 0)
        assert third_call.join().error is None, third_call.error
        assert s.getpeername() == _ADDRESS
    else:
        assert second.oserror().errno in (errno.EPIPE, errno.EBADF)
    s.close()


@pytest.mark.parametrize("cmd", [PVCALLS_BIND, PVCALLS_LISTEN], ids=["bind", "listen"])
def test_a_bind_or_listen_waiting_for_its_answer_ends_when_another_thread_closes(
        fe: pvcalls.Frontend, fake: FakeBackend, cmd: int) -> None:
    """bind() or listen() waiting for the backend's answer, and close()
    in another thread: the call fails with EBADF at once, as a recv(),
    accept() or connect() waiting does, not once the frontend's timeout
    is over; the answer that comes later frees its response table entry
    and marks nothing."""
    s = fe.socket()
    if cmd == PVCALLS_LISTEN:
        s.bind(_ADDRESS)
    fake.hold = {cmd}
    waiting = Call(functools.partial(s.bind, _ADDRESS) if cmd == PVCALLS_BIND else s.listen)
    req = fake.next_request(cmd)
    cmd_cond: Any = fe._cmd_cond
    wait_until(lambda: bool(cmd_cond._waiters) or not waiting.alive())  # waits for the answer
    s.close()
    assert waiting.join(TIMEOUT / 2).oserror().errno == errno.EBADF
    fake.respond(req, 0)  # late: nobody waits for it
    wait_until(lambda: all(slot is None for slot in fe._slots))
    assert not s._st.listening and (cmd == PVCALLS_LISTEN) == s._st.bound


@pytest.mark.parametrize("how", ["sent nothing", "refused as its time ran out"])
@pytest.mark.parametrize("timeout", [None, 0.0], ids=["blocking", "nonblocking"])
def test_a_connect_while_another_threads_failed_one_gives_back_its_ring_is_not_eisconn(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        timeout: float | None, how: str) -> None:
    """A connect() while another thread's timed one gives the socket's
    ring back, the socket marked given up on meanwhile (see connect()),
    as that one found no room on the command ring in its time and sent
    nothing, or its time ran out as the refusal came in: the socket is
    being put back as it was, unconnected, not connected.  A blocking
    connect() waits for the other to end and sets out itself; a
    non-blocking one fails with EALREADY (see _connect_busy), as while
    the other puts back a refused one.  Before, both said EISCONN, as
    on a socket given up on for good.  (The connect() after a timed one
    refused fails with ECONNABORTED: see _failed_in_time.)"""
    s = fe.socket()
    s.settimeout(0.2 if how == "sent nothing" else TIMEOUT)
    firsts: list[int] = []  # the thread of the first connect()
    has_room = fe._has_room
    wait_slot = fe._wait_slot

    def room(spare: int) -> bool:
        return (how != "sent nothing" or threading.get_ident() not in firsts) and has_room(spare)

    def timed_out_as_answered(req_id: int, slot: Any, deadline: Any, sock: Any = None) -> int:
        if threading.get_ident() not in firsts:
            return wait_slot(req_id, slot, deadline, sock)
        wait_until(lambda: slot.done)
        raise TimeoutError("timed out")

    monkeypatch.setattr(fe, "_has_room", room)
    monkeypatch.setattr(fe, "_wait_slot", timed_out_as_answered)
    if how == "sent nothing":
        pause = PauseAt(pvcalls.PVSocket.connect, "self._fe._give_back(self._st, reusable=True)",
                        after="# Nothing went out")
    else:
        fake.rets[PVCALLS_CONNECT] = -ECONNREFUSED
        pause = PauseAt(pvcalls.PVSocket._connect_cut_short,
                        "self._fe._give_back(self._st, reusable=True)")

    def first_connect() -> None:
        firsts.append(threading.get_ident())
        pause.run(functools.partial(s.connect, _ADDRESS))

    first = Call(first_connect)
    assert pause.reached.wait(TIMEOUT)
    fake.rets.clear()
    try:
        assert s._broken and s._connect_lock.locked()
        s.settimeout(timeout)
        if timeout == 0.0:
            with pytest.raises(BlockingIOError) as info:
                s.connect(_ADDRESS)
            assert info.value.errno == errno.EALREADY, info.value
        else:
            second = Call(functools.partial(s.connect, _ADDRESS))
            wait_until(lambda: stands_at(second.ident, _common.Deadline.take, "(True,)")
                       or not second.alive())
            assert second.alive(), f"did not wait: {second.error!r}"
    finally:
        pause.resume()
    assert isinstance(first.join().error, TimeoutError), first.error
    if timeout == 0.0:
        s.settimeout(None)
        if how != "sent nothing":
            # The failure the timed one left to the next (_failed_in_time).
            _refused(functools.partial(s.connect, _ADDRESS), errno.ECONNABORTED)()
        s.connect(_ADDRESS)
    elif how == "sent nothing":
        assert second.join().error is None, second.error
    else:
        # The next connect(), although it passed that point before: it
        # looks again once it has the locks.  Setting out instead, it
        # left the failure to the one after, on the connected socket.
        assert second.oserror().errno == errno.ECONNABORTED
        s.connect(_ADDRESS)
    assert not s._connect_failed
    assert s.getpeername() == _ADDRESS
    s.close()


def test_a_connect_that_waited_looking_during_a_third_ones_handshake_says_epipe(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """As above, the third thread's connect() in its handshake (a data
    ring, no peer) by the time the second looks how the one it waited
    for ended: that ring is the third's, and the second says EPIPE (the
    one it waited for failed), not EISCONN; the third connects."""
    s = fe.socket()
    s.settimeout(TIMEOUT)
    first, req = _connect_waiting_for_its_answer(fe, fake, s)
    s.settimeout(None)
    at_finish = PauseAt(pvcalls.PVSocket._join_connect, "self._finish_connect(Deadline(None)")
    second = _connect_waiting_on_the_one_under_way(s, at_finish)
    fake.respond(req, -ECONNREFUSED)
    assert isinstance(first.oserror(), ConnectionRefusedError)
    assert at_finish.reached.wait(TIMEOUT)
    try:
        s.settimeout(0.0)
        _refused(functools.partial(s.connect, _ADDRESS), errno.ECONNABORTED)()
        s.settimeout(None)
        third = Call(functools.partial(s.connect, _ADDRESS))
        third_req = fake.next_request(PVCALLS_CONNECT)
        assert s._handshaking()
    finally:
        at_finish.resume()
    assert second.oserror().errno == errno.EPIPE
    fake.respond(third_req, 0)
    assert third.join().error is None, third.error
    assert s.getpeername() == _ADDRESS
    s.close()


def test_a_connect_that_waited_on_a_refused_one_says_ebadf_once_closed_as_it_looks(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A blocking connect() that waited for another thread's, refused,
    and finds the socket closed as it looks how that one ended (a close()
    after its first look, before it takes the socket's state lock): EBADF,
    as for a close() at any time before, not the EPIPE of the refusal."""
    s = fe.socket()
    s.settimeout(None)
    first, req = _connect_waiting_for_its_answer(fe, fake, s)
    pause = PauseAt(pvcalls.PVSocket._join_connect, "if self._fe._dead:")
    second = _connect_waiting_on_the_one_under_way(s, pause)
    fake.respond(req, -ECONNREFUSED)
    assert isinstance(first.oserror(), ConnectionRefusedError)
    assert pause.reached.wait(TIMEOUT)
    try:
        s.close()
    finally:
        pause.resume()
    assert second.oserror().errno == errno.EBADF


def test_a_blocking_connect_waits_for_its_answer_in_the_mode_it_was_called_in(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A settimeout(0.0) of another thread while a blocking connect()
    sends its CONNECT changes the next call, not this one (as
    socket.socket's): it waits for the answer and connects, rather than
    giving up on the socket at once as a wait that may not block."""
    s = fe.socket()
    s.settimeout(None)
    fake.hold = {PVCALLS_CONNECT}
    pause = PauseAt(pvcalls.PVSocket.connect, "req_id = self._fe._submit(slot, fill")
    first = Call(lambda: pause.run(functools.partial(s.connect, _ADDRESS)))
    assert pause.reached.wait(TIMEOUT)
    try:
        s.settimeout(0.0)
    finally:
        pause.resume()
    req = fake.next_request(PVCALLS_CONNECT)
    wait_until(lambda: bool(fe._cmd_cond._waiters) or not first.alive())
    fake.respond(req, 0)
    assert first.join().error is None, first.error
    assert s.getpeername() == _ADDRESS
    s.close()


@pytest.mark.parametrize("cmd", [PVCALLS_BIND, PVCALLS_LISTEN], ids=["bind", "listen"])
def test_a_bind_or_listen_waiting_for_room_ends_when_another_thread_closes(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        cmd: int) -> None:
    """bind() or listen() waiting for room on the command ring, and
    close() in another thread: the call fails with EBADF at once, as one
    waiting for its answer (see above), having sent nothing, not once the
    frontend's timeout is over."""
    s = fe.socket()
    if cmd == PVCALLS_LISTEN:
        s.bind(_ADDRESS)
    starved = _starved_threads(fe, monkeypatch)  # the thread of the call: no room for it
    monkeypatch.setattr(fe, "timeout", 2 * TIMEOUT)
    fake.hold = {cmd}

    def call() -> None:
        starved.append(threading.get_ident())
        if cmd == PVCALLS_BIND:
            s.bind(_ADDRESS)
        else:
            s.listen()

    waiting = Call(call)
    cmd_cond: Any = fe._cmd_cond
    wait_until(lambda: bool(cmd_cond._waiters) or not waiting.alive())  # waits for room
    s.close()  # its RELEASE has room
    assert waiting.join(TIMEOUT / 2).oserror().errno == errno.EBADF
    assert fake.requests.empty(), "sent its command"


@pytest.mark.parametrize("cmd", [PVCALLS_BIND, PVCALLS_LISTEN], ids=["bind", "listen"])
def test_the_late_answers_of_binds_or_listens_a_close_cut_short_free_the_command_ring(
        fe: pvcalls.Frontend, fake: FakeBackend, cmd: int) -> None:
    """Twice as many bind() or listen() calls as the command ring has
    slots, each ended by another thread's close() (see above) and
    answered late: each answer frees its response table entry, and the
    ring then takes as many commands in flight at once as it has slots.
    One entry kept per such call left the frontend with no room at the
    33rd."""
    cmd_cond: Any = fe._cmd_cond
    for _ in range(2 * RING_SLOTS):
        s = fe.socket()
        if cmd == PVCALLS_LISTEN:
            s.bind(_ADDRESS)
        fake.hold = {cmd}
        waiting = Call(functools.partial(s.bind, _ADDRESS) if cmd == PVCALLS_BIND else s.listen)
        req = fake.next_request(cmd)
        wait_until(functools.partial(lambda w: bool(cmd_cond._waiters) or not w.alive(), waiting))
        s.close()
        assert waiting.join(TIMEOUT / 2).oserror().errno == errno.EBADF
        fake.hold = set()
        fake.respond(req, 0)
    wait_until(lambda: all(slot is None for slot in fe._slots))
    socks = [fe.socket() for _ in range(RING_SLOTS)]
    if cmd == PVCALLS_LISTEN:
        for s in socks:
            s.bind(_ADDRESS)
    fake.hold = {cmd}
    calls = [Call(functools.partial(s.bind, _ADDRESS) if cmd == PVCALLS_BIND else s.listen)
             for s in socks]
    requests = [fake.next_request(cmd) for _ in socks]  # all in flight at once
    fake.respond_many([(req, 0, {}) for req in requests])
    for call in calls:
        assert call.join().error is None, call.error
    fake.hold = set()
    for s in socks:
        s.close()


def test_a_connect_behind_one_that_sent_nothing_interrupted_anywhere_is_left_usable(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing anywhere in a blocking connect() that waits for
    another thread's non-blocking one in its first steps (a data ring, no
    CONNECT yet), which then sends nothing (no room: ENOBUFS), so that
    this one goes round and sets out itself (see above): no lock of the
    socket is left held, the socket is left unconnected (readable and
    writable, and the next connect() connects), connected, or given up
    on, never in its handshake for good, and every response table entry
    is freed once the answers are in."""
    within = os.path.dirname(_frontend.__file__)
    connects = _connects_submitted(fe)
    # The threads of the first connect(): no room for them.
    starved = _starved_threads(fe, monkeypatch)
    socks: list[pvcalls.PVSocket] = []
    firsts: list[Call] = []

    def resume_once_waiting(pause: PauseAt, over: threading.Event) -> None:
        wait_until(lambda: over.is_set() or _main_thread_waits_on_the_connect_under_way())
        pause.resume()

    def attempt(n: int) -> str:
        socks[:] = [s := fe.socket()]
        s.settimeout(0.0)
        pause = PauseAt(pvcalls.PVSocket.connect,
                        "slot.on_done = self._connect_taker(host, port)")

        def first_connect() -> None:
            starved.append(threading.get_ident())
            pause.run(functools.partial(s.connect, _ADDRESS))

        firsts[:] = [Call(first_connect)]
        assert pause.reached.wait(TIMEOUT)
        s.settimeout(None)
        return _connect_interrupted_at(n, within, s,
                                       functools.partial(resume_once_waiting, pause))

    def check(where: str) -> None:
        (s,), (first,) = socks, firsts
        assert first.oserror().errno == errno.ENOBUFS
        for lock in (s._connect_lock, s._recv_lock, s._send_lock):
            assert not lock.locked(), "left held"
        wait_until(lambda: all(slot.done for slot in connects if slot.sent))
        wait_until(lambda: all(slot is None for slot in fe._slots))
        assert not s._handshaking(), "in its handshake for good"
        if s._broken:
            _refused(functools.partial(s.connect, _ADDRESS), errno.EISCONN)()
        elif s._st.ring is None:
            assert _readiness(s) == (True, True)
            s.connect(_ADDRESS)
        assert s._broken or s.getpeername() == _ADDRESS
        s.close()

    _sweep(attempt, check, through=("_join_connect",))


@pytest.mark.parametrize("err", [errno.EAGAIN, errno.EBADF], ids=["no-room", "ebadf"])
def test_an_accept_that_sent_nothing_interrupted_anywhere_keeps_nothing_of_its_new_socket(
        fe: pvcalls.Frontend, fake: FakeBackend, err: int) -> None:
    """A Ctrl-C landing anywhere along an accept() whose ACCEPT could not
    go out (no room on the command ring, or the listener closed by
    another thread: EBADF), once it failed: the socket the ACCEPT would
    have offered, which nobody ever had, is gone from the frontend's
    table, its ring back in the pool, once the next accept() or the
    listener's close() comes (each after every other landing: the sweep
    is one of the costly ones).  Before, one landing as _start_accept's
    drop of it started left it in the table until the frontend closed,
    and the listener taken for one accepting: no POLL went out any
    more, and the next accept() waited for good."""
    within = os.path.dirname(_frontend.__file__)
    ls = _listener(fe)
    failed: list[int] = []
    submit = fe._submit

    def cannot(slot: Any, *args: Any, **kwargs: Any) -> int:
        if slot.cmd == PVCALLS_ACCEPT:
            failed.append(slot.sock_id)
            if err == errno.EAGAIN:
                raise BlockingIOError(errno.EAGAIN, "the command ring is full")
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return submit(slot, *args, **kwargs)

    fe._submit = cannot  # type: ignore[method-assign]
    listeners = [ls]
    accepts = itertools.count()

    def attempt(n: int) -> str:
        failed.clear()
        return interrupted_at(n, within, _refused(listeners[0].accept, err), lambda: not failed)

    def check(where: str) -> None:
        if next(accepts) % 2 == 0:
            _refused(listeners[0].accept, err)()  # fails as the first did, and drops what is left
            assert set(fe._sockets) == {listeners[0].id}
            assert len(fe._ring_pool) == 1
        else:
            listeners[0].close()
            assert fe._sockets == {}
            listeners[0] = _listener(fe)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        landed = _sweep(attempt, check)
        gc.collect()  # once: each costs as much as a landing
        assert _unclosed(caught) == []
    assert any("_drop_socket" in where for where in landed), landed
    listeners[0].close()


@pytest.mark.parametrize("call", ["connect", "bind", "listen"])
def test_an_answered_call_interrupted_anywhere_keeps_what_the_backend_did(
        fe: pvcalls.Frontend, fake: FakeBackend, call: str) -> None:
    """A Ctrl-C landing anywhere along a connect(), bind() or listen()
    once it has the backend's success: the socket is what the backend
    made of it, connected, bound or listening.  The backend's answer
    came, so that is the truth, whatever the program was told; a socket
    left unmarked said EINVAL or EOPNOTSUPP to the listen() or accept()
    that followed, on a socket the backend has bound or listening.
    Before, one landing as the wait returned the answer marked a
    connected socket broken (only close() was left), and lost BIND's and
    LISTEN's marks."""
    within = os.path.dirname(_frontend.__file__)
    cmd = {"connect": PVCALLS_CONNECT, "bind": PVCALLS_BIND, "listen": PVCALLS_LISTEN}[call]
    taken = _refusal_taken(fe, cmd)
    socks: list[pvcalls.PVSocket] = []  # the one each attempt calls

    def attempt(n: int) -> str:
        socks[:] = [s := fe.socket()]
        s.settimeout(TIMEOUT)
        if call == "listen":
            s.bind(("127.0.0.1", 4000))
        taken.clear()
        run = {"connect": functools.partial(s.connect, ("127.0.0.1", 7)),
               "bind": functools.partial(s.bind, ("127.0.0.1", 4000)),
               "listen": s.listen}[call]
        return interrupted_at(n, within, run, lambda: not taken)

    def check(where: str) -> None:
        (s,) = socks
        if call == "connect":
            # As after connect() returned.
            assert not s._broken, "marked broken"
            assert s._st.ring is not None, "no ring"
            assert s.getpeername() == ("127.0.0.1", 7)
            assert fe._slots.count(None) == RING_SLOTS
            assert s.send(b"x") == 1
        else:
            # Marked by the event thread as it takes the answer, maybe
            # only after the caller woke for it.
            flag = "bound" if call == "bind" else "listening"
            try:
                wait_until(functools.partial(getattr, s._st, flag))
            except TimeoutError:
                raise AssertionError(f"not {flag}") from None
        if call == "bind":
            assert s.getsockname() == ("127.0.0.1", 4000)
            s.listen()
        elif call == "listen":
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.accept()  # not EINVAL: listening
        s.close()

    landed = _sweep(attempt, check)
    # As the wait for the answer returned to the call (through _call's).
    assert landed[0].startswith(f"as a call returns in PVSocket.{call},"), landed


@pytest.mark.parametrize("ret", [0, -ECONNREFUSED], ids=["connected", "refused"])
def test_a_connect_answered_before_its_submit_returned_keeps_the_answer(
        fe: pvcalls.Frontend, fake: FakeBackend, ret: int) -> None:
    """A Ctrl-C landing anywhere along a connect() whose CONNECT was
    answered before the submit returned to it (a fast backend, or the
    answer taken as the notify went out): the socket is as the answer
    says, as when the Ctrl-C lands after the wait (see
    test_an_answered_call_interrupted_anywhere_keeps_what_the_backend_did):
    connected, and the next connect() with a timeout succeeds once more,
    or unconnected, refused again.  Before, the submit's own handler took
    the answer for one unknown: the socket was marked broken, a refused
    one kept the ring the backend had let go of, and connect() said
    EISCONN for good."""
    within = os.path.dirname(_frontend.__file__)
    fake.rets[PVCALLS_CONNECT] = ret
    submit = fe._submit
    answered: list[int] = []

    def answered_first(slot: Any, *args: Any, **kwargs: Any) -> int:
        req_id = submit(slot, *args, **kwargs)
        if slot.cmd == PVCALLS_CONNECT:
            wait_until(lambda: slot.done)
            answered.append(slot.sock_id)
        return req_id

    fe._submit = answered_first  # type: ignore[method-assign]
    socks: list[pvcalls.PVSocket] = []  # the one each attempt connects

    def attempt(n: int) -> str:
        socks[:] = [s := fe.socket()]
        s.settimeout(TIMEOUT)
        answered.clear()
        run = functools.partial(s.connect, ("127.0.0.1", 7))
        if ret < 0:
            run = _refused(run, errno.ECONNREFUSED)
        return interrupted_at(n, within, run, lambda: not answered)

    def check(where: str) -> None:
        (s,) = socks
        assert fe._slots.count(None) == RING_SLOTS, "a response table entry kept"
        if ret == 0:
            assert not s._broken, "marked broken"
            assert s.getpeername() == ("127.0.0.1", 7)
            assert s.send(b"x") == 1
            s.connect(("127.0.0.1", 7))  # the success, reported once
            _refused(functools.partial(s.connect, ("127.0.0.1", 7)), errno.EISCONN)()
        else:
            assert s._st.ring is None, "the ring kept"
            # Once ECONNABORTED, as after a refused connect() with a timeout.
            _refused(functools.partial(s.connect, ("127.0.0.1", 7)), errno.ECONNABORTED)()
            _refused(functools.partial(s.connect, ("127.0.0.1", 7)), errno.ECONNREFUSED)()
            assert fe._given_back == [] and len(fe._ring_pool) == 1
        s.close()

    landed = _sweep(attempt, check)
    assert landed[0].startswith("as a call returns in PVSocket.connect,"), landed


@pytest.mark.parametrize("call", ["bind", "listen"])
def test_bind_and_listen_return_marked_before_the_event_thread_marks(
        fe: pvcalls.Frontend, fake: FakeBackend, call: str) -> None:
    """bind() and listen() return with the socket bound or listening,
    however late the event thread gets to the mark it makes as it takes
    the answer (see _on_success): the waiter wakes before the event
    thread runs the answer's callbacks, and a listen() or accept() right
    after the return must not find the socket unmarked."""
    s = fe.socket()
    if call == "listen":
        s.bind(("127.0.0.1", 4000))
    late = threading.Event()
    held: list[str] = []
    complete = fe._complete

    def held_back(fn: Callable[..., None], *args: Any) -> None:
        if "_on_success" in getattr(fn, "__qualname__", ""):
            held.append(fn.__qualname__)
            late.wait(TIMEOUT)
        complete(fn, *args)

    fe._complete = held_back  # type: ignore[method-assign]
    try:
        if call == "bind":
            s.bind(("127.0.0.1", 4000))
            assert s._st.bound and s.getsockname() == ("127.0.0.1", 4000)
        else:
            s.listen()
            assert s._st.listening
        wait_until(lambda: held != [])  # the event thread's mark was held back
    finally:
        late.set()
    s.close()


@pytest.mark.parametrize("how", ["dropped", "closed"])
def test_a_dropped_listener_drops_the_socket_an_accept_cut_short_left(
        fe: pvcalls.Frontend, fake: FakeBackend, how: str) -> None:
    """A listener dropped unclosed (or closed) whose last accept() left the
    socket of an ACCEPT that did not go out in its ``unsent`` (a Ctrl-C
    in the drop): its release drops that socket too, with no RELEASE of
    its own (the backend never made it) and no warning (the program never
    had it).  Left there, it went with the listener's state as a socket
    dropped unclosed: a ResourceWarning, and a RELEASE of an id the
    backend does not know."""
    ls = _listener(fe)
    submit, drop = fe._submit, fe._drop_socket
    released: list[int] = []

    def no_room(slot: Any, *args: Any, **kwargs: Any) -> int:
        if slot.cmd == PVCALLS_ACCEPT:
            raise BlockingIOError(errno.EAGAIN, "the command ring is full")
        if slot.cmd == PVCALLS_RELEASE:
            released.append(slot.sock_id)
        return submit(slot, *args, **kwargs)

    def cut_short(*args: Any, **kwargs: Any) -> None:
        fe._drop_socket = drop  # type: ignore[method-assign]
        raise Interrupted

    fe._submit = no_room  # type: ignore[method-assign]
    fe._drop_socket = cut_short  # type: ignore[method-assign]
    try:
        ls.accept()
    except Interrupted:
        pass
    else:
        raise AssertionError("accept() was not cut short")
    (left,) = ls._st.unsent
    assert left.id in fe._sockets
    ls_id, ls_ref = ls.id, weakref.ref(ls)
    del left
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "closed":
            ls.close()
        del ls
        gc.collect()
        assert ls_ref() is None
        wait_until(lambda: fe._sockets == {})
        gc.collect()
    assert released == [ls_id]
    assert len(_unclosed(caught)) == (how == "dropped")  # the listener's
    assert len(fe._ring_pool) == 1


def _a_bind_timed_out(
        fe: pvcalls.Frontend, fake: FakeBackend) -> tuple[pvcalls.PVSocket, Request]:
    """A socket whose bind() timed out, and its BIND, held unanswered by
    the backend (``fake.hold`` still holds BINDs); the frontend's timeout
    is TIMEOUT again."""
    s = fe.socket()
    fake.hold = {PVCALLS_BIND}
    fe.timeout = 0.05
    with pytest.raises(TimeoutError):
        s.bind(("127.0.0.1", 4000))
    fe.timeout = TIMEOUT
    return s, fake.next_request(PVCALLS_BIND)


def test_a_socket_dropped_with_its_bind_unanswered_is_released(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """The BIND's answer may never come, so what marks the socket as it
    comes holds it weakly: a socket dropped while its BIND is unanswered
    (its bind() timed out) is garbage at once and released, as any; the
    late answer then marks nothing."""
    s, bind = _a_bind_timed_out(fe, fake)
    ref = weakref.ref(s)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        del s
        gc.collect()
    assert ref() is None, "kept by its BIND's slot"
    wait_until(lambda: fe._sockets == {})
    fake.respond(bind, 0)
    wait_until(lambda: fe._slots.count(None) == RING_SLOTS)


def test_a_listen_answered_with_no_room_for_the_poll_leaves_fileno_alive(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A socket whose fileno() is in use starts listening when the
    command ring has no room for the POLL fileno() needs: the mark (the
    caller's, and the event thread's, which never waits for room) leaves
    the POLL to go out once answers make room, and the descriptor polls
    readable once it says a connection is pending.  Lost, the descriptor
    never polled readable again."""
    s = fe.socket()
    s.bind(("127.0.0.1", 4000))
    fd = s.fileno()  # armed: listen()'s mark sends the POLL
    full = [True]
    has_room = fe._has_room
    fe._has_room = (  # type: ignore[method-assign]
        lambda spare: has_room(spare) and not (full[0] and spare))
    polls: list[int] = []
    submit = fe._submit

    def recorded(slot: Any, *args: Any, **kwargs: Any) -> int:
        req_id = submit(slot, *args, **kwargs)
        if slot.cmd == PVCALLS_POLL:
            polls.append(slot.sock_id)
        return req_id

    fe._submit = recorded  # type: ignore[method-assign]
    s.listen()
    assert polls == [] and select.select([fd], [], [], 0)[0] == []
    full[0] = False
    fe.socket().close()  # answers: the event thread finds room
    wait_until(lambda: polls == [s.id])
    wait_until(lambda: select.select([fd], [], [], 0)[0] == [fd])  # the POLL said: pending
    s.close()


def test_recv_waitall_sees_the_data_across_the_in_index_wrap(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """How many bytes the in ring holds is counted modulo 2**32: a
    recv(MSG_PEEK | MSG_WAITALL) waiting for 4 bytes, 2 of them before
    in_prod wraps past 2**32 and 2 after, gets them.  Counted as plain
    ints, the ring held -2**32 + 4 bytes, never enough, and the call
    waited on."""
    s, ring = connected(fe, fake)
    for offset in (IN_CONS_OFFSET, IN_PROD_OFFSET):
        ring.put(offset, 0xFFFF_FFFD)
    ring.produce(b"ab")
    s.settimeout(None)  # MSG_WAITALL waits for all only without a timeout
    receiving = Call(lambda: s.recv(4, socket.MSG_PEEK | socket.MSG_WAITALL))
    wait_until(lambda: sleeping_in_wait(s))
    ring.produce(b"cd")  # in_prod wraps to 1
    try:
        assert receiving.join().result == b"abcd"
    finally:
        s.close()  # ends the call if it waits on


def test_a_receive_across_the_end_of_the_in_ring_takes_what_was_asked(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """Data that runs past the end of the in ring's pages comes in two
    pieces: a receive of fewer bytes than the buffer holds, taking from
    both, copies what was asked for and no more (peeking or not), and
    the rest stays for the next call, in order."""
    s, ring = connected(fe, fake)
    for offset in (IN_CONS_OFFSET, IN_PROD_OFFSET):
        ring.put(offset, ring.size - 3)
    data = bytes(range(1, 11))
    ring.produce(data)  # 3 bytes at the end of the pages, 7 at the start
    s.settimeout(TIMEOUT)
    try:
        for flags in (socket.MSG_PEEK, 0):
            buf = bytearray(20)
            assert s.recv_into(buf, 5, flags) == 5
            assert buf == data[:5] + bytes(15)
        assert s.recv(100) == data[5:]
    finally:
        s.close()


def test_a_recv_for_all_into_a_larger_buffer_takes_what_was_asked(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """recv_into(MSG_WAITALL) of fewer bytes than the buffer holds, its
    data coming in two goes, takes what was asked for and no more: the
    rest stays for the next call."""
    s, ring = connected(fe, fake)
    s.settimeout(None)
    ring.produce(b"ab")
    buf = bytearray(20)
    receiving = Call(lambda: s.recv_into(buf, 4, socket.MSG_WAITALL))
    wait_until(lambda: sleeping_in_wait(s))  # "ab" taken, waiting for more
    ring.produce(b"cdefgh")
    try:
        assert receiving.join().result == 4
        assert buf == b"abcd" + bytes(16)
        assert s.recv(10) == b"efgh"
    finally:
        s.close()


def test_a_peek_for_all_of_more_than_the_ring_holds_returns_a_full_ring(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """recv(MSG_PEEK | MSG_WAITALL) of more than the in ring can hold
    waits for a full ring, not for ever (more never comes in while the
    data stays), and returns it."""
    s, ring = connected(fe, fake)
    s.settimeout(None)
    data = os.urandom(ring.size)
    ring.produce(data[:10])
    peeking = Call(lambda: s.recv(2 * ring.size, socket.MSG_PEEK | socket.MSG_WAITALL))
    wait_until(lambda: sleeping_in_wait(s))
    ring.produce(data[10:])
    try:
        assert peeking.join().result == data
    finally:
        s.close()  # ends the call if it waits on


def test_a_recycled_ring_starts_with_no_errors(fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A ring whose backend wrote in_error and out_error (the host socket
    failed), back in the pool once its socket is released, is clean for
    the next socket it serves: that one's send() and recv() do not fail
    with the last one's errors.  (After RELEASE the frontend writes
    -EBADF into in_error itself, as Linux's does.)"""
    s, ring = connected(fe, fake)
    ring.set_error(OUT_ERROR_OFFSET, -32)  # EPIPE
    ring.set_error(IN_ERROR_OFFSET, -104)  # ECONNRESET
    used = s._st.ring
    s.close()
    assert used is not None
    wait_until(lambda: used.in_error() == -9)  # EBADF, once RELEASE is answered
    assert used.out_error() == -32  # the backend's
    s2, ring2 = connected(fe, fake)
    assert s2._st.ring is used  # recycled
    assert ring2.get(IN_ERROR_OFFSET) == ring2.get(OUT_ERROR_OFFSET) == 0
    assert s2.send(b"x") == 1
    ring2.produce(b"y")
    s2.settimeout(TIMEOUT)
    assert s2.recv(1) == b"y"
    s2.close()


def test_a_full_out_ring_across_the_index_wrap_is_not_writable(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """How much of the out ring is used is counted modulo 2**32: full with
    out_prod wrapped past 2**32 and out_cons not, the socket's descriptor
    does not poll writable (a select() loop would spin on send()'s
    EAGAIN), until the backend consumes."""
    s, ring = connected(fe, fake)
    for offset in (OUT_CONS_OFFSET, OUT_PROD_OFFSET):
        ring.put(offset, 0xFFFF_FFF0)
    fd = s.fileno()
    s.settimeout(0.0)
    sent = 0
    with pytest.raises(BlockingIOError):
        while True:
            sent += s.send(b"z" * ring.size)
    assert sent == ring.size
    assert ring.get(OUT_PROD_OFFSET) < ring.get(OUT_CONS_OFFSET)  # wrapped
    assert not select.select([], [fd], [], 0)[1]
    ring.put(OUT_CONS_OFFSET, ring.get(OUT_PROD_OFFSET))  # all consumed
    ring.notify()
    assert select.select([], [fd], [], TIMEOUT)[1]
    s.close()


# -- the command ring's response table -----------------------------------------------------


def _answered_accepts(fe: pvcalls.Frontend, fake: FakeBackend, n: int) -> list[pvcalls.PVSocket]:
    """``n`` listeners, each with an ACCEPT the backend answered and the
    listener has not taken yet: each holds a response entry, and no slot
    of the command ring."""
    fake.hold = {PVCALLS_ACCEPT}
    listeners = []
    for _ in range(n):
        ls = _listener(fe)
        ls.settimeout(0.05)
        # Its POLL is answered, its ACCEPT held; an answer slower than the
        # timeout (a loaded machine) leaves the ACCEPT unsent: again.
        while ls._st.accept_inflight is None:
            with pytest.raises(TimeoutError):
                ls.accept()
        listeners.append(ls)
    accepts = [fake.next_request(PVCALLS_ACCEPT) for _ in listeners]
    fake.respond_many([(req, 0, {}) for req in accepts])

    def answered() -> bool:
        with fe._lock:
            taken = [slot for slot in fe._slots if slot is not None]
            return len(taken) == n and all(slot.done for slot in taken)

    wait_until(answered)
    fake.hold = set()
    return listeners


def test_a_connect_leaves_the_last_response_entry_even_with_ring_slots_free(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """Answered ACCEPTs that their listeners have not taken yet hold their
    response entries, not their ring slots.  With every entry but one so
    held, a non-blocking connect finds no room (ENOBUFS, nothing sent)
    although the ring has slots free: the last entry is the RELEASE's that
    a close() must be able to send.  (Judged by the ring alone, the
    CONNECT took it.)"""
    listeners = _answered_accepts(fe, fake, RING_SLOTS - 1)
    s = fe.socket()
    s.setblocking(False)
    fake.hold = {PVCALLS_CONNECT}
    with pytest.raises(OSError) as info:
        s.connect(("127.0.0.1", 7))
    assert info.value.errno == errno.ENOBUFS
    assert fake.requests.empty()
    closing = Call(listeners[0].close)  # its RELEASE goes out at once
    assert closing.join().error is None
    s.close()
    for ls in listeners[1:]:
        ls.close()


def test_nothing_goes_on_the_command_ring_once_the_backend_went_away(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """Once the backend left Connected, a SOCKET, a BIND or a CONNECT
    fails with ENOTCONN before it is put on the command ring: a backend
    still reading the ring as it closes would make a socket for nobody,
    which would count against the domain until the device goes."""
    s = fe.socket()
    fake.set_state(5)  # Closing
    wait_until(lambda: fe._dead)
    assert fe._ring is not None
    prod = fe._ring.req_prod_pvt
    for call in (fe.socket, lambda: s.bind(("127.0.0.1", 4000)),
                 lambda: s.connect(("127.0.0.1", 4000))):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.ENOTCONN
        assert info.value.strerror == "the PV Calls backend went away"
    assert fe._ring.req_prod_pvt == prod
    s.close()


def test_a_request_an_interrupt_kept_off_the_ring_gives_its_entry_back(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A Ctrl-C as the request is about to be written to the command ring
    (the index not moved: nothing went out) gives the response entry
    reserved for it back.  Kept, it waited for an answer that never comes:
    every such Ctrl-C took one of the 32 for the life of the connection."""
    s = fe.socket()
    assert interrupted_as_frame_starts(FrontRing.push_request.__code__,
                                       lambda: s.bind(("127.0.0.1", 4000)))
    with fe._lock:
        assert fe._slots == [None] * RING_SLOTS
    s.bind(("127.0.0.1", 4000))
    s.close()


def _a_socket_waiting_for_an_entry(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[pvcalls.PVSocket], pvcalls.PVSocket, Call, Request, Call]:
    """Every response entry taken (31 by answered ACCEPTs of ``listeners``
    not taken yet, one by ``s``'s BIND held in flight, its call
    ``binding`` and request ``bind``), with ring slots free: a socket()
    (``creating``) waits for an entry.  The recheck and the frontend's
    timeout are an hour, so that only a wake-up can end its wait."""
    listeners = _answered_accepts(fe, fake, RING_SLOTS - 1)
    s = fe.socket()
    fake.hold = {PVCALLS_BIND}
    binding = Call(lambda: s.bind(("127.0.0.1", 4000)))
    bind = fake.next_request(PVCALLS_BIND)
    monkeypatch.setattr(_common, "RECHECK", 3600.0)
    fe.timeout = 3600.0
    creating = Call(fe.socket)
    wait_until(lambda: done_or_at(creating, pvcalls.Frontend._submit, "self._cmd_cond.wait("))
    return listeners, s, binding, bind, creating


def test_an_answer_taken_wakes_a_command_waiting_for_its_entry(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every response entry taken (31 by answered ACCEPTs not taken yet,
    one by a BIND in flight), with ring slots free: a socket() waits for
    an entry.  A listener's accept() taking its answer frees one, and
    wakes it then, not only as its wait's recheck ends (set to an hour
    here, so that only the wake-up can end the wait)."""
    listeners, s, binding, bind, creating = _a_socket_waiting_for_an_entry(fe, fake, monkeypatch)
    assert creating.alive()
    new, _ = listeners[0].accept()
    made = creating.join().result
    assert made is not None
    fake.respond(bind, 0)
    assert binding.join().error is None
    for sock in (made, new, s, *listeners):
        sock.close()


def _backend_gone(fe: pvcalls.Frontend, fake: FakeBackend, bind: Request,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    fake.set_state(5)  # Closing


def _ring_broken(fe: pvcalls.Frontend, fake: FakeBackend, bind: Request,
                 monkeypatch: pytest.MonkeyPatch) -> None:
    fake.set_rsp_prod(fake.rsp_prod_pvt + 2 * RING_SLOTS)


def _watch_failed(fe: pvcalls.Frontend, fake: FakeBackend, bind: Request,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    def backend_state() -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(fe, "_backend_state", backend_state)
    fake.set_state(5)


def _frontend_closed(fe: pvcalls.Frontend, fake: FakeBackend, bind: Request,
                     monkeypatch: pytest.MonkeyPatch) -> Call:
    fe.timeout = 0.3  # close() waits this long for the BIND's socket's RELEASE
    return Call(fe.close)


# What wakes every call waiting for the backend (and the call it left
# running, for the test to see end), and the error it then raises (None:
# the answer itself).
_WAKE_UPS: dict[str, tuple[Callable[..., Call | None], tuple[int, str] | None]] = {
    "the answer": (lambda fe, fake, bind, mp: fake.respond(bind, 0), None),
    "the backend gone": (_backend_gone, (errno.ENOTCONN, "the PV Calls backend went away")),
    "the ring broken": (_ring_broken,
                        (errno.ENOTCONN, "the PV Calls backend broke the command ring")),
    "the frontend failed": (_watch_failed, (errno.EIO, "the PV Calls frontend failed")),
    "the frontend closed": (_frontend_closed, (errno.EBADF, "")),
    # What the XenStore connection's router thread calls as it ends.
    "XenStore lost": (lambda fe, fake, bind, mp: fe._lost_xenstore(ConnectionError("gone")),
                      (errno.ENOTCONN, "lost XenStore (is the host gone?)")),
}


@pytest.mark.parametrize("wake_up", list(_WAKE_UPS))
def test_waiters_wake_at_once_not_at_their_recheck(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        wake_up: str) -> None:
    """A bind() waiting for its answer, a socket() waiting for its
    SOCKET's and a recv() waiting for data, all without a timeout, end as
    soon as what they wait for comes (the answer), or what ends every wait
    (the backend leaving, the command ring broken, the frontend failing
    or closing, XenStore lost).  The recheck that also ends their waits is set to an
    hour here: a wake-up that never came (a notify dropped, or sent
    before the frontend was marked dead) is not hidden by it."""
    monkeypatch.setattr(_common, "RECHECK", 3600.0)
    r, _ = connected(fe, fake)
    r.settimeout(None)
    receiving = Call(lambda: r.recv(10))
    wait_until(lambda: sleeping_in_wait(r))
    s = fe.socket()
    s.settimeout(None)
    fake.hold = {PVCALLS_BIND, PVCALLS_SOCKET}
    # The frontend's timeout bounds the waits for BIND's and SOCKET's
    # answers: at its end a wait looks at the answer too.
    fe.timeout = 3600.0
    binding = Call(lambda: s.bind(("127.0.0.1", 4000)))
    bind = fake.next_request(PVCALLS_BIND)
    creating = Call(fe.socket)
    fake.next_request(PVCALLS_SOCKET)
    wait_until(lambda: all(done_or_at(call, pvcalls.Frontend._wait_slot, "self._cmd_cond.wait(")
                           for call in (binding, creating)))
    trigger, expected = _WAKE_UPS[wake_up]
    left_running = trigger(fe, fake, bind, monkeypatch)
    if expected is None:
        assert binding.join().error is None
        assert receiving.alive() and creating.alive()
        fe.timeout = 0.3  # the fixture's close() waits this long for a RELEASE
        return
    for call in (binding, creating, receiving):
        err = call.oserror()
        if wake_up == "the frontend closed":
            # The frontend's close() closes the sockets first.
            expected = ((errno.ENOTCONN, "the PV Calls frontend is closed") if call is creating
                        else (errno.EBADF, os.strerror(errno.EBADF)))
        assert expected is not None
        assert (err.errno, str(err.strerror)[:len(expected[1])]) == expected
    if left_running is not None:
        # Over before the fixture's close() starts: two close() calls at
        # once are not what this tests (the second may find a handle
        # checked, then taken by the first: AttributeError).
        assert left_running.join().error is None
    monkeypatch.undo()


def test_calls_on_sockets_the_frontend_closes_say_ebadf_however_late_they_look(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frontend.close() closes the sockets (waking their calls), waits for
    their RELEASEs, then marks the frontend closed.  A bind() waiting for
    its answer and a recv() waiting for data that look only after that
    (their threads slow to run again, on a loaded machine) fail with
    EBADF, as those that look at once do: their socket was closed under
    them.  Not ENOTCONN, the frontend closed: which error a call saw
    depended on when its thread ran."""
    monkeypatch.setattr(_common, "RECHECK", 3600.0)
    r, _ = connected(fe, fake)
    r.settimeout(None)
    s = fe.socket()
    fake.hold = {PVCALLS_BIND}
    fe.timeout = 3600.0
    # recv() stops once its wait ended, before it looks at the frontend;
    # bind() as its wait returns, before it takes the lock back to look.
    late_recv = PauseAt(pvcalls.PVSocket._wait, "if self._fe._dead", after="while not ready()")
    late_bind = PauseAt(threading.Condition.wait, "self._acquire_restore(")
    receiving = Call(lambda: late_recv.run(lambda: r.recv(10)))
    binding = Call(lambda: late_bind.run(lambda: s.bind(("127.0.0.1", 4000))))
    fake.next_request(PVCALLS_BIND)
    wait_until(lambda: sleeping_in_wait(r))
    wait_until(lambda: done_or_at(binding, pvcalls.Frontend._wait_slot, "self._cmd_cond.wait("))
    # close() waits this long for the paused recv() to leave the socket
    # (then leaves its ring alone), and for the RELEASEs.
    fe.timeout = 0.3
    closing = Call(fe.close)
    for pause in (late_recv, late_bind):
        assert pause.reached.wait(TIMEOUT)
    wait_until(lambda: fe._dead)
    late_recv.resume()
    late_bind.resume()
    for call in (binding, receiving):
        err = call.oserror()
        assert (err.errno, err.strerror) == (errno.EBADF, os.strerror(errno.EBADF))
    closing.join()


@pytest.mark.parametrize("closer", ["socket", "frontend"])
@pytest.mark.parametrize("side", ["recv", "send"])
def test_a_non_blocking_call_on_a_socket_closed_after_its_check_says_ebadf(
        fe: pvcalls.Frontend, fake: FakeBackend, side: str, closer: str) -> None:
    """A non-blocking recv() or send() that finds its socket open, then
    another thread closes it (the socket alone, or the frontend, which
    also dies), before it finds nothing to do: EBADF, as a blocking one
    woken by the close says.  Before, it said EAGAIN, or the frontend's
    ENOTCONN, for a socket closed under it."""
    r, _ = connected(fe, fake)
    r.setblocking(False)
    if side == "recv":
        late = PauseAt(pvcalls.PVSocket._receive, "err = ring.in_error()")
        calling = Call(lambda: late.run(lambda: r.recv(10)))
    else:
        while r.send(bytes(1 << 16)) == 1 << 16:  # the fake reads nothing: fill the ring
            pass
        with pytest.raises(BlockingIOError):
            r.send(b"x")
        late = PauseAt(pvcalls.PVSocket._send, "err = _connection_error(ring)")
        calling = Call(lambda: late.run(lambda: r.send(b"x")))
    assert late.reached.wait(TIMEOUT)
    if closer == "socket":
        closing = Call(r.close)
        wait_until(lambda: r._closed)
    else:
        # Frontend.close() dies only once its release of the socket is
        # over: it waits this long for the paused call to leave the
        # socket (then leaves its ring alone), and for the RELEASE.
        fe.timeout = 0.3
        # Dead, it stops before it closes its handles: closing the grant
        # share handle ends the shares still live, the ring left alone
        # among them, and the simulated host puts zero pages in their
        # place.  The call, looking then, found an empty ring with room,
        # and sent into it.
        handles = PauseAt(pvcalls.Frontend.close, "self._release_handles()")
        closing = Call(lambda: handles.run(fe.close))
        assert handles.reached.wait(TIMEOUT)
        assert fe._dead
    late.resume()
    calling.join()
    if closer == "frontend":
        handles.resume()
    err = calling.oserror()
    assert (err.errno, err.strerror) == (errno.EBADF, os.strerror(errno.EBADF))
    assert closing.join().error is None


def test_an_answered_entry_given_up_wakes_a_command_waiting_for_it(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every response entry taken (31 by answered ACCEPTs, one by a BIND
    in flight): a socket() waits for an entry.  Giving up on an answered
    ACCEPT (as a released listener's is given up on, see _end_accept)
    frees its entry and wakes the waiter then, not as its recheck ends
    (set to an hour here)."""
    listeners, s, binding, bind, creating = _a_socket_waiting_for_an_entry(fe, fake, monkeypatch)
    inflight = listeners[0]._st.accept_inflight
    assert inflight is not None
    req_id, slot, _ = inflight
    fe._abandon(req_id, slot)
    made = creating.join().result
    assert made is not None
    fake.respond(bind, 0)
    assert binding.join().error is None
    fe.timeout = TIMEOUT
    for sock in (made, s, *listeners):
        sock.close()


def test_a_command_given_up_on_gives_its_entry_back_when_answered_late(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A BIND whose answer does not come within the frontend's timeout
    fails with TimeoutError; its answer, coming later, frees its response
    entry (nobody waits for it): kept, every such timeout took one of the
    32 for the life of the connection."""
    s, bind = _a_bind_timed_out(fe, fake)
    fake.respond(bind, 0)
    fake.hold = set()

    def entries_free() -> bool:
        with fe._lock:
            return fe._slots == [None] * RING_SLOTS

    wait_until(entries_free)
    s.close()


def test_a_second_answer_to_an_accept_not_yet_taken_is_dropped(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """An ACCEPT answered with a connection, its answer not yet taken by
    the listener's accept() (its entry still holds it), then answered
    again with an error: the second answer is dropped with a warning, and
    accept() returns the connection.  (Taken, it overwrote the first:
    the connection the backend made was lost, its socket never released.)"""
    fake.hold = {PVCALLS_ACCEPT, PVCALLS_CONNECT}
    ls, req, slot, new = _accept_in_flight(fe, fake)
    # A request whose response slot carries the second answer (the ring
    # holds no more responses than requests): a CONNECT given up on.
    other = fe.socket()
    other.settimeout(0.05)
    with pytest.raises(TimeoutError):
        other.connect(("127.0.0.1", 4001))
    carrier = fake.next_request(PVCALLS_CONNECT)
    fake.respond(req, 0)
    wait_until(lambda: slot.done)
    fake.respond(carrier, -EINVAL, req_id=req.req_id, cmd=PVCALLS_ACCEPT, sock_id=req.id)
    log.wait(f"dropping unexpected response req_id={req.req_id} cmd={PVCALLS_ACCEPT}")
    assert slot.ret == 0
    accepted, _ = ls.accept()
    assert accepted is new
    accepted.close()
    ls.close()
    other.close()


class _UpdateFails:
    """One end of a readiness descriptor's pair whose ``call`` (``recv``
    of the user's end, ``send`` of ours) fails with ``err`` while it is
    set (ENOBUFS: the kernel short of memory); counted, and the rest of
    it the socket's."""

    def __init__(self, sock: Any, call: str, err: int) -> None:
        self._sock = sock
        self._call = call
        self.err = err
        self.tries = 0

    def __getattr__(self, name: str) -> Any:
        if name != self._call or not self.err:
            return getattr(self._sock, name)

        def fail(*args: Any) -> Any:
            self.tries += 1
            raise OSError(self.err, os.strerror(self.err))

        return fail


def _ready_warnings(log: LogWatch) -> list[str]:
    return [m for m in log.messages(logging.DEBUG) if "descriptor cannot be brought up" in m]


def _logged_failures(log: LogWatch, *errs: int) -> list[logging.LogRecord]:
    """The records at WARNING or above of an error in ``errs``: said in
    the message, or as its traceback."""
    said = [os.strerror(err) for err in errs]
    return [r for r in log.records if r.levelno >= logging.WARNING
            and (any(text in r.getMessage() for text in said)
                 or (r.exc_info is not None and isinstance(r.exc_info[1], OSError)
                     and r.exc_info[1].errno in errs))]


def test_a_connect_whose_readiness_update_fails_says_it_connected(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """connect() connected, then bringing the descriptor up to date
    (readable no longer) failed: connect() returns, as the socket is
    connected, and the error is logged, once, and left to the next update,
    which meets it again or not.  Before, connect() raised it, and the
    program closed, or connected again, a connected socket."""
    s = fe.socket()
    s.fileno()
    readyfd = s._st.readyfd
    user = readyfd.user
    failing = readyfd.user = _UpdateFails(user, "recv", errno.ENOBUFS)
    try:
        s.connect(("127.0.0.1", 7))
        assert s.getpeername() == ("127.0.0.1", 7)
        assert failing.tries >= 1
        (said,) = _ready_warnings(log)
        assert said.endswith(os.strerror(errno.ENOBUFS)), said
        assert s.send(b"x") == 1  # connected: not ENOTCONN
        failing.err = 0  # the kernel has memory again
        fd = s.fileno()  # the next update, which makes it right
        assert select.select([fd], [fd], [], 0)[:2] == ([], [fd])
    finally:
        readyfd.user = user
        s.close()


def test_a_connect_whose_descriptor_was_closed_says_it_connected(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """As above, the program having closed the descriptor fileno() gave
    it: connect() returns, and the next call that brings the descriptor
    up to date says EBADF."""
    s = fe.socket()
    _descriptor_closed(s.fileno())
    try:
        s.connect(("127.0.0.1", 7))
        assert s.getpeername() == ("127.0.0.1", 7)
        with pytest.raises(OSError) as info:
            s.fileno()
        assert info.value.errno == errno.EBADF
    finally:
        with contextlib.suppress(OSError):
            s.close()


def test_a_refused_connect_whose_readiness_update_fails_says_refused(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """The backend refused the CONNECT, and bringing the descriptor up to
    date failed: connect() raises the refusal, not the update's error,
    and the socket may connect again.  Before, the update's error replaced
    the refusal."""
    fake.rets[PVCALLS_CONNECT] = -pvcalls_errno.from_host_errno(errno.ECONNREFUSED)
    s = fe.socket()
    s.fileno()
    readyfd = s._st.readyfd
    ours = readyfd.ours
    # Unconnected again: readable, which the byte's send makes it.
    failing = readyfd.ours = _UpdateFails(ours, "send", errno.ENOBUFS)
    try:
        with pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", 7))
        assert failing.tries >= 1
        failing.err = 0
        del fake.rets[PVCALLS_CONNECT]
        s.connect(("127.0.0.1", 7))
    finally:
        readyfd.ours = ours
        s.close()


def test_a_readiness_update_failing_for_good_is_logged_once_for_each_error(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """Every event of a socket's data ring brings its descriptor up to
    date, in the event thread, where an error is logged: an update that
    fails for good (ENOBUFS) is logged once, not at every event, and
    once more for another error.  Before, every event logged it."""
    s, ring = connected(fe, fake)
    s.fileno()  # relayed: the event thread keeps the descriptor up to date
    readyfd = s._st.readyfd
    ours = readyfd.ours
    failing = readyfd.ours = _UpdateFails(ours, "send", errno.ENOBUFS)
    try:
        ring.produce(b"x")  # readable, which the byte's send makes it
        for err in (errno.ENOBUFS, errno.ENOMEM):
            failing.err = err
            for _ in range(3):
                tries = failing.tries
                ring.notify()
                wait_until(lambda tries=tries: failing.tries > tries)  # type: ignore[misc]
        logged = _logged_failures(log, errno.ENOBUFS, errno.ENOMEM)
        assert [r.getMessage() for r in logged] == _ready_warnings(log)
        assert len(logged) == 2, [r.getMessage() for r in logged]
    finally:
        readyfd.ours = ours
        s.close()


@pytest.mark.parametrize("timeout", [0.0, 0.01], ids=["nonblocking", "timed"])
@pytest.mark.parametrize("cmd", ["bind", "listen"])
def test_bind_and_listen_wait_for_the_answer_whatever_the_sockets_timeout(
        fe: pvcalls.Frontend, fake: FakeBackend, cmd: str, timeout: float) -> None:
    """bind() and listen(), which socket.socket's never make wait, wait
    for the backend's answer up to the frontend's timeout, not the
    socket's (see PVSocket.settimeout): an answer that comes after the
    socket's timeout passed is what they say."""
    s = fe.socket()
    if cmd == "listen":
        s.bind(("127.0.0.1", 4000))
    s.settimeout(timeout)
    held_cmd = PVCALLS_BIND if cmd == "bind" else PVCALLS_LISTEN
    fake.hold = {held_cmd}
    call = Call(lambda: s.bind(("127.0.0.1", 4000)) if cmd == "bind" else s.listen())
    req = fake.next_request(held_cmd)
    try:
        # Ten times the socket's timeout since the request went out.
        passed = time.monotonic() + 10 * max(timeout, 0.01)
        wait_until(lambda: time.monotonic() > passed)
        assert call.alive(), call.join().error
    finally:
        fake.respond(req, 0)
    assert call.join().error is None, call.error
    if cmd == "listen":
        fake.hold = set()
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    else:
        assert s.getsockname() == ("127.0.0.1", 4000)
    s.close()


@pytest.mark.parametrize("err", [errno.ENOBUFS, errno.EBADF])
def test_a_nonblocking_connects_answer_whose_readiness_update_fails_is_logged_once(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch, err: int) -> None:
    """The event thread completes a non-blocking connect() with the
    backend's answer and brings the descriptor up to date (writable),
    which fails: logged as every update of the event thread's (see
    _update_ready_or_log), once, EBADF (the program closed the
    descriptor) at debug level.  Before, the completion's handler logged
    it as a failure of the frontend, with its traceback, EBADF too."""
    s, req = _connecting(fe, fake)
    readyfd = s._st.readyfd
    assert readyfd is not None
    user = readyfd.user
    if err == errno.EBADF:
        _descriptor_closed(s.fileno())
    else:
        readyfd.user = _UpdateFails(user, "setsockopt", err)
    try:
        fake.respond(req, 0)
        wait_until(lambda: bool(_ready_warnings(log) or _logged_failures(log, err)))
        assert _logged_failures(log, err) == [] if err == errno.EBADF else (
            [r.getMessage() for r in _logged_failures(log, err)] == _ready_warnings(log))
        (said,) = _ready_warnings(log)
        assert said.endswith(os.strerror(err)), said
        assert s.getpeername() == _ADDRESS
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    finally:
        readyfd.user = user
        with contextlib.suppress(OSError):
            s.close()


def test_a_nonblocking_connect_whose_readiness_update_fails_says_einprogress(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """A non-blocking connect() sent its CONNECT, then bringing the
    descriptor up to date (neither readable nor writable) failed: it says
    EINPROGRESS all the same, as the CONNECT is in flight and its answer
    completes the connect, and the error is logged once, as after a
    blocking one (see connect()).  Before, it raised the update's error:
    ENOBUFS, which connect() says when nothing was sent, and a program
    that took it so gave up on a socket that then connected."""
    s = fe.socket()
    s.setblocking(False)
    s.fileno()
    readyfd = s._st.readyfd
    assert readyfd is not None
    user = readyfd.user
    # Readable no longer: the recv() that clears it fails.
    failing = readyfd.user = _UpdateFails(user, "recv", errno.ENOBUFS)
    fake.hold = {PVCALLS_CONNECT}
    try:
        with pytest.raises(BlockingIOError) as info:
            s.connect(_ADDRESS)
        assert info.value.errno == errno.EINPROGRESS
        assert failing.tries >= 1
        (said,) = _ready_warnings(log)
        assert said.endswith(os.strerror(errno.ENOBUFS)), said
        failing.err = 0
        fake.respond(fake.next_request(PVCALLS_CONNECT), 0)
        wait_until(lambda: _readiness(s) == (False, True))
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert s.getpeername() == _ADDRESS
    finally:
        readyfd.user = user
        s.close()


@pytest.mark.parametrize("logging_too", [False, True], ids=["frontend", "Logger.log"])
def test_a_readiness_update_failure_interrupted_anywhere_is_logged_still(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch, logging_too: bool) -> None:
    """connect() brings the descriptor up to date in the main thread,
    where a Ctrl-C may land anywhere in _update_ready_or_log, or as the
    logging call starts: the error of an update that fails for good is
    logged, at the latest by the next update, however the one before was
    cut short (twice at worst).  Before, one landing as the record's lock
    was let go of, or as Logger.log started, left the error recorded as
    told and not told: no later update said it.  (Not swept through the
    logging module, whose handlers' locks a Ctrl-C can leave held.)"""
    from pvcalls.frontend._socket import ReadyFd

    within = os.path.dirname(_frontend.__file__)
    socks: list[tuple[pvcalls.PVSocket, Any, Any]] = []

    def attempt(n: int) -> str:
        s, ring = connected(fe, fake)
        # Not fileno(), whose relay of the ring's events has the event
        # thread bring the descriptor up to date too: its update could
        # fail and log first, leaving this one nothing to tell.
        readyfd = ReadyFd(into=s._st)
        ours = readyfd.ours
        socks[:] = [(s, readyfd, ours)]
        # Readable, which the byte's send makes it, and which fails.
        readyfd.ours = _UpdateFails(ours, "send", errno.ENOBUFS)
        ring.produce(b"x")
        if not logging_too:
            return interrupted_at(n, within, s._update_ready_or_log)
        if n == 0:
            assert interrupted_as_frame_starts(logging.Logger.log.__code__,
                                               s._update_ready_or_log)
            return "as Logger.log started"
        s._update_ready_or_log()
        return ""

    def check(where: str) -> None:
        s, readyfd, ours = socks[0]
        try:
            s._update_ready_or_log()
            said = [m for m in _ready_warnings(log) if f"id={s.id:#x}" in m]
            assert 1 <= len(said) <= 2, said
        finally:
            readyfd.ours = ours
            s.close()

    _sweep(attempt, check, through=() if logging_too else ("_update_ready_or_log",))


def test_a_polls_answer_whose_readiness_update_fails_is_logged_once(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """The event thread takes the answer to a listener's POLL (kept in
    flight for fileno()) and makes the descriptor readable, which fails
    (ENOBUFS): logged once, as every update of the event thread's, not by
    the completion's handler as a failure of the frontend's."""
    ls = _listener(fe)
    fake.hold = {PVCALLS_POLL}
    ls.fileno()
    req = fake.next_request(PVCALLS_POLL)
    readyfd = ls._st.readyfd
    assert readyfd is not None
    ours = readyfd.ours
    failing = readyfd.ours = _UpdateFails(ours, "send", errno.ENOBUFS)
    try:
        fake.respond(req, 0)
        wait_until(lambda: bool(_ready_warnings(log) or _logged_failures(log, errno.ENOBUFS)))
        assert failing.tries >= 1
        logged = _logged_failures(log, errno.ENOBUFS)
        assert [r.getMessage() for r in logged] == _ready_warnings(log)
        assert len(logged) == 1, [r.getMessage() for r in logged]
    finally:
        readyfd.ours = ours
        ls.close()


def test_room_whose_readiness_update_fails_is_logged_once_and_tells_the_others(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """A listener whose accept() found no room on the command ring polls
    unreadable with its connection pending (as _want_room leaves it); room
    comes, and the event thread's _on_room makes the descriptor readable,
    which fails (ENOBUFS): logged once, as every update of the event
    thread's, and the other listener waiting for room is told all the
    same.  (Raised, _tell_room_waiters logged it as a failure of the
    frontend's, with its traceback, at every room.)"""
    listeners = [_listener(fe), fe.socket()]
    listeners[1].bind(("127.0.0.1", 4001))
    listeners[1].listen()
    fake.hold = {PVCALLS_POLL}
    fds = [ls.fileno() for ls in listeners]
    for _ in listeners:
        fake.respond(fake.next_request(PVCALLS_POLL), 0)
    for fd in fds:
        assert select.select([fd], [], [], TIMEOUT)[0], "never readable"
    first = listeners[0]._st.readyfd
    assert first is not None
    ours = first.ours
    for ls in listeners:
        with ls._mutex:
            ls._no_room = True  # as _want_room leaves it, with no room
        ls._update_ready()
    assert not any(select.select(fds, [], [], 0)[0])
    failing = first.ours = _UpdateFails(ours, "send", errno.ENOBUFS)
    try:
        for ls in listeners:
            fe._poll_later(ls)  # the event thread tells them, as once there is room
        assert select.select([fds[1]], [], [], TIMEOUT)[0], "the other never told"
        wait_until(lambda: failing.tries >= 1 and not listeners[0]._no_room)
        wait_until(lambda: bool(_ready_warnings(log) or log.messages(logging.ERROR)))
        assert log.messages(logging.ERROR) == []
        (said,) = _ready_warnings(log)
        assert said.endswith(os.strerror(errno.ENOBUFS)), said
        failing.err = 0
        assert listeners[0].fileno() == fds[0]  # the next update makes it right
        assert select.select([fds[0]], [], [], TIMEOUT)[0]
    finally:
        first.ours = ours
        for ls in listeners:
            ls.close()


def test_a_readiness_update_failure_told_and_interrupted_anywhere_is_told_once(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """As above, the error told already: a Ctrl-C landing anywhere in
    the next failing update takes nothing back, and no later update says
    it again."""
    from pvcalls.frontend._socket import ReadyFd

    within = os.path.dirname(_frontend.__file__)
    socks: list[tuple[pvcalls.PVSocket, Any, Any]] = []

    def attempt(n: int) -> str:
        s, ring = connected(fe, fake)
        readyfd = ReadyFd(into=s._st)  # not fileno(): see above
        ours = readyfd.ours
        socks[:] = [(s, readyfd, ours)]
        readyfd.ours = _UpdateFails(ours, "send", errno.ENOBUFS)
        ring.produce(b"x")
        s._update_ready_or_log()  # told
        return interrupted_at(n, within, s._update_ready_or_log)

    def check(where: str) -> None:
        s, readyfd, ours = socks[0]
        try:
            s._update_ready_or_log()
            said = [m for m in _ready_warnings(log) if f"id={s.id:#x}" in m]
            assert len(said) == 1, said
        finally:
            readyfd.ours = ours
            s.close()

    _sweep(attempt, check, through=("_update_ready_or_log",))


@pytest.mark.parametrize("later", ["an hour later", "flapping"])
def test_a_readiness_update_error_that_comes_back_is_logged_again_at_most_so_often(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch, later: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An update fails (ENOBUFS), fails again, goes through, then fails
    again.  Failing still, it is said once; gone and come back, it is
    said again, as an operator reading the log is to know it came back,
    but no more often than _RETELL_AFTER (a minute: made 0 here, the
    recurrence coming "an hour later"), as an error that comes and goes
    at every event would fill the log.  Before, it was said once for the
    life of the socket: ENOBUFS then, fine for an hour, ENOBUFS again,
    and the log said nothing."""
    from pvcalls.frontend import _socket as socket_module
    from pvcalls.frontend._socket import ReadyFd

    if later == "an hour later":
        monkeypatch.setattr(socket_module, "_RETELL_AFTER", 0.0)
    s, ring = connected(fe, fake)
    readyfd = ReadyFd(into=s._st)  # not fileno(): see above
    ours = readyfd.ours
    st_ring = s._st.ring
    assert st_ring is not None
    # Readable, which the byte's send makes it, and which fails.
    failing = readyfd.ours = _UpdateFails(ours, "send", errno.ENOBUFS)
    try:
        ring.produce(b"x")
        wait_until(st_ring.in_pending)
        s._update_ready_or_log()
        s._update_ready_or_log()  # failing still
        failing.err = 0
        s._update_ready_or_log()  # gone: readable
        assert readyfd.readable
        assert s.recv(1) == b"x"  # unreadable again, which goes through
        failing.err = errno.ENOBUFS
        ring.produce(b"y")
        wait_until(st_ring.in_pending)
        s._update_ready_or_log()  # back
        assert failing.tries == 3
        said = _ready_warnings(log)
        assert len(said) == (2 if later == "an hour later" else 1), said
        assert all(m.endswith(os.strerror(errno.ENOBUFS)) for m in said), said
    finally:
        readyfd.ours = ours
        s.close()


def test_a_descriptor_the_program_closed_is_logged_once_for_good(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The program closed the socket's fileno() descriptor: data comes
    (its update fails, EBADF, said at DEBUG), recv() takes it (an update
    that changes nothing goes through), and more data comes an hour later
    (_RETELL_AFTER made 0).  Said once: the descriptor is as closed as it
    was.  Before, each such round said it again, a line a minute for a
    socket whose data comes and goes."""
    from pvcalls.frontend import _socket as socket_module

    monkeypatch.setattr(socket_module, "_RETELL_AFTER", 0.0)
    s, ring = connected(fe, fake)
    st_ring = s._st.ring
    assert st_ring is not None
    _descriptor_closed(s.fileno())
    try:
        for data in (b"x", b"y"):
            ring.produce(data)
            wait_until(st_ring.in_pending)
            s._update_ready_or_log()  # readable: fails (if the event thread's has not)
            assert s._ready_errors == {errno.EBADF}
            assert s.recv(1) == data  # unreadable, as the record was: goes through
            assert not s._ready_errors
        said = _ready_warnings(log)
        assert len(said) == 1, said
        assert said[0].endswith(os.strerror(errno.EBADF))
    finally:
        with pytest.raises(OSError) as closing:
            s.close()
        assert closing.value.errno == errno.EBADF


def test_a_readiness_update_error_gone_at_fileno_is_logged_when_it_comes_back(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As above (_RETELL_AFTER made 0: the recurrence comes an hour
    later), the update that goes through being fileno()'s, which raises
    its errors rather than logging them: the error is gone all the same,
    and said again when it comes back.  Before, only an update that logs
    its errors took them for gone: after fileno()'s, one that came back
    at the next event stayed unsaid."""
    from pvcalls.frontend import _socket as socket_module
    from pvcalls.frontend._socket import ReadyFd

    monkeypatch.setattr(socket_module, "_RETELL_AFTER", 0.0)
    s, ring = connected(fe, fake)
    readyfd = ReadyFd(into=s._st)  # not fileno(): see above
    user = readyfd.user
    st_ring = s._st.ring
    assert st_ring is not None
    try:
        ring.produce(b"x")
        wait_until(st_ring.in_pending)
        s._update_ready()
        assert readyfd.readable
        # Unreadable, once "x" is taken, which fails.
        failing = readyfd.user = _UpdateFails(user, "recv", errno.ENOBUFS)
        assert s.recv(1) == b"x"
        assert len(_ready_warnings(log)) == 1
        failing.err = 0
        s._update_ready()  # fileno()'s update, which goes through
        assert not readyfd.readable
        failing.err = errno.ENOBUFS
        ring.produce(b"y")
        wait_until(st_ring.in_pending)
        s._update_ready()  # readable, which goes through too (fileno()'s)
        assert s.recv(1) == b"y"  # unreadable again: fails, back
        assert failing.tries == 2
        said = _ready_warnings(log)
        assert len(said) == 2, said
        assert all(m.endswith(os.strerror(errno.ENOBUFS)) for m in said), said
    finally:
        readyfd.user = user
        s.close()


def test_a_close_whose_readiness_update_fails_releases_and_says_nothing(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """close() makes the descriptor poll readable and writable, for a
    selector waiting on it, which fails (ENOBUFS): the socket is released
    and its descriptor closed all the same, and close() returns, the
    error logged once, as every update's that is nobody's to raise.
    Before, close() raised ENOBUFS once everything was released, and a
    program took the socket for one still open."""
    s, _ = connected(fe, fake)
    s.fileno()
    readyfd = s._st.readyfd
    assert readyfd is not None
    failing = readyfd.ours = _UpdateFails(readyfd.ours, "send", errno.ENOBUFS)
    s.close()
    assert failing.tries >= 1
    assert s.closed and s not in fe.sockets()
    assert readyfd.user.fileno() == -1 and failing.fileno() == -1
    (said,) = _ready_warnings(log)
    assert said.endswith(os.strerror(errno.ENOBUFS)), said


def test_a_close_whose_wake_up_fails_releases_all_the_same(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """close() wakes the socket's waiters, which fails (an injected
    OSError: writing a waiter's eventfd is known to fail nowhere): the
    socket is released all the same, its descriptor closed, and close()
    returns, the error logged; the waiter finds the socket closed at its
    re-check (shortened here), and says EBADF.  Before, close() raised
    the error with nothing released, and so did every close() after it:
    the socket stayed in the backend until the frontend closed."""
    monkeypatch.setattr(_common, "RECHECK", 0.05)
    s, _ = connected(fe, fake)
    s.fileno()
    readyfd = s._st.readyfd
    assert readyfd is not None
    receiving = Call(lambda: s.recv(1))
    wait_until(lambda: sleeping_in_wait(s))

    def wake() -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(s, "_wake", wake)
    fake.hold = {PVCALLS_RELEASE}
    s.close()
    assert s.closed and s not in fe.sockets()
    assert readyfd.user.fileno() == -1 and readyfd.ours.fileno() == -1
    fake.respond(fake.next_request(PVCALLS_RELEASE), 0)
    assert receiving.oserror().errno == errno.EBADF
    (said,) = [r for r in log.records if "injected" in r.getMessage()
               or (r.exc_info is not None and "injected" in str(r.exc_info[1]))]
    assert said.levelno == logging.WARNING


@pytest.mark.parametrize("owner", ["close", "dropped"])
def test_a_release_interrupted_anywhere_closes_the_readiness_pair(
        fe: pvcalls.Frontend, fake: FakeBackend, owner: str) -> None:
    """A Ctrl-C landing anywhere in the release of a socket whose
    fileno() was asked for (its close(), or the release of one dropped
    unclosed, which Frontend.close() makes in the main thread), then the
    release taken up again: both ends of the readiness pair are closed,
    and the second release says nothing (the program left the descriptor
    alone).  Before, one landing between taking the pair out of the
    socket's state and closing it (as the lock it was taken under was let
    go of, or as ReadyFd.close started) left the pair to the collector, an
    "unclosed socket" for each end, and open until then."""
    from pvcalls.frontend._socket import ReadyFd

    within = os.path.dirname(_frontend.__file__)
    made: list[tuple[pvcalls.PVSocket, ReadyFd]] = []

    def release(s: pvcalls.PVSocket) -> None:
        if owner == "close":
            s.close()
        else:
            fe._release(s._st)

    def attempt(n: int) -> str:
        s, _ = connected(fe, fake)
        if owner == "dropped":
            # As a dropped socket's, which has run.  Left alive, the
            # socket's collection (where the garbage collector comes to it:
            # in a later attempt's sweep, or a later test's) ran _collect,
            # a place where that sweep landed, in a finaliser, which drops
            # what it raises: a Ctrl-C "swallowed", by nothing under test.
            s._finalizer.detach()
        s.fileno()
        readyfd = s._st.readyfd
        assert readyfd is not None
        made[:] = [(s, readyfd)]
        return interrupted_at(n, within, functools.partial(release, s))

    def check(where: str) -> None:
        s, readyfd = made[0]
        release(s)
        assert s._st.readyfd is None
        assert readyfd.user.fileno() == -1 and readyfd.ours.fileno() == -1, "left open"
        s.close()

    landed = _sweep(attempt, check, through=("Frontend._release", "ReadyFd.close"))
    assert landed


@pytest.mark.parametrize("program", ["left it", "closed it"])
def test_a_readiness_pair_close_cut_short_closes_what_it_may_at_once(program: str) -> None:
    """A Ctrl-C landing anywhere in ReadyFd.close but as it starts: our
    end is closed at once, and the user's end too if the program left it
    alone (its number is checked again after the interrupt).  If the
    program closed it and another file took the number, that file stays,
    and the next close says EBADF, unless the first had let go of the
    number already.  Before, one landing in the number's check left both
    ends open until the next release (Frontend.close(), maybe)."""
    from pvcalls.frontend._socket import ReadyFd

    within = os.path.dirname(_frontend.__file__)
    null = os.stat(os.devnull)
    landed = []
    for n in itertools.count():
        rfd = ReadyFd()
        fd = rfd.fileno()
        if program == "closed it":
            _descriptor_closed(fd)  # /dev/null takes the number
        try:
            where = interrupted_at(n, within, rfd.close)
        except OSError as exc:
            assert program == "closed it" and exc.errno == errno.EBADF
            where = ""
        if not where:
            break
        landed.append(where)
        if where.startswith("as it starts: ReadyFd.close,"):
            assert rfd.ours.fileno() != -1
        else:
            assert rfd.ours.fileno() == -1, f"ours left open, landing {where}"
            if program == "left it":
                assert rfd.user.fileno() == -1, f"the user's end left open, landing {where}"
        let_go = rfd.user.fileno() == -1
        try:
            rfd.close()  # the next release
        except OSError as exc:
            assert program == "closed it" and not let_go and exc.errno == errno.EBADF
        else:
            assert program == "left it" or let_go, f"no EBADF said, landing {where}"
        assert rfd.user.fileno() == -1 and rfd.ours.fileno() == -1
        if program == "closed it":
            now = os.fstat(fd)
            assert (now.st_dev, now.st_ino) == (null.st_dev, null.st_ino), where
            _NULLED.remove(fd)
            os.close(fd)
    assert any("_check_user" in where for where in landed), landed


def test_a_release_interrupted_anywhere_leaves_the_file_that_took_the_number(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """The program closed the descriptor fileno() gave it, and another
    file took its number; a Ctrl-C lands anywhere in close(), then
    close() is called again: that file stays open (the closes say EBADF,
    once), both ends of the pair ours are closed.  Before, one landing as
    ReadyFd.close checked the number (as _check_user started, or as its
    fstat returned) closed the end by its number all the same, and with
    it the program's file: a trade made while a release cut short left
    the pair to the collector, which it no longer does."""
    from pvcalls.frontend._socket import ReadyFd

    within = os.path.dirname(_frontend.__file__)
    null = os.stat(os.devnull)
    made: list[tuple[pvcalls.PVSocket, ReadyFd, int]] = []
    said: list[OSError] = []

    def close(s: pvcalls.PVSocket) -> None:
        try:
            s.close()
        except OSError as exc:
            said.append(exc)

    def attempt(n: int) -> str:
        said.clear()
        gc.collect()  # not a socket of an earlier test's, in the sweep
        s, _ = connected(fe, fake)
        fd = s.fileno()
        readyfd = s._st.readyfd
        assert readyfd is not None
        _descriptor_closed(fd)  # /dev/null takes the number
        made[:] = [(s, readyfd, fd)]
        return interrupted_at(n, within, functools.partial(close, s))

    def check(where: str) -> None:
        s, readyfd, fd = made[0]
        close(s)
        assert os.path.samestat(os.fstat(fd), null), "the program's file closed"
        assert s._st.readyfd is None
        assert readyfd.user.fileno() == -1 and readyfd.ours.fileno() == -1, "left open"
        assert [exc.errno for exc in said] in ([], [errno.EBADF]), said

    landed = _sweep(attempt, check, through=("ReadyFd._check_user",))
    assert landed


@pytest.mark.parametrize("err", [errno.ENOBUFS, errno.EBADF])
@pytest.mark.parametrize("call", ["recv", "send"])
def test_a_blocked_call_whose_readiness_update_fails_as_it_wakes_does_its_job(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch, call: str, err: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A recv() or send() blocked on the ring's own handle takes the
    backend's event itself (data came, or room) and brings the descriptor
    up to date, which fails: ENOBUFS, or EBADF (the program closed the
    descriptor).  The call returns its data, or sends, the error logged
    once, as recv() and send() do when the update fails after their
    bytes.  Before, it raised the error with the data in the ring."""
    from pvcalls.frontend._socket import ReadyFd

    # The event is to be what wakes the call: its poll's periodic re-check
    # ending between the fake's store of the index and its notify, the
    # call found the data without taking the event (once in CI).
    monkeypatch.setattr(_common, "RECHECK", 3600.0)
    s, ring = connected(fe, fake)
    # Not fileno(), whose relay has the event thread take the events.
    readyfd = ReadyFd(into=s._st)
    user, ours = readyfd.user, readyfd.ours
    assert s._st.ring is not None and s._st.ring.direct
    # Nor the news of the fake's bind, which the simulated hypervisor
    # sends the ring's handle before the CONNECT is answered: the call's
    # first poll woke on it, and found the data stored, not yet notified.
    # Taken here, the handle wakes for the event alone.
    assert not s._st.ring.consume_events()
    if call == "send":
        assert s.send(bytes(ring.size)) == ring.size  # the fake reads none
        blocked = Call(lambda: s.send(b"more"))
    else:
        blocked = Call(lambda: s.recv(10))
    wait_until(lambda: sleeping_in_wait(s))
    number = readyfd.fileno()
    if err == errno.EBADF:
        _descriptor_closed(number)  # and left to this test to close
    elif call == "send":
        readyfd.user = _UpdateFails(user, "setsockopt", err)  # writable again
    else:
        readyfd.ours = _UpdateFails(ours, "send", err)  # readable
    try:
        if call == "send":
            # Room for its bytes alone: the send() fills the ring again,
            # and its own update after them changes nothing, so makes no
            # call that fails in the wake-up's stead.
            ring.put(OUT_CONS_OFFSET, ring.get(OUT_CONS_OFFSET) + 4)
            ring.notify()
            assert blocked.join().error is None, blocked.error
            assert blocked.result == 4
        else:
            ring.produce(b"data")
            assert blocked.join().error is None, blocked.error
            assert blocked.result == b"data"
        (said,) = _ready_warnings(log)
        assert said.endswith(os.strerror(err)), said
    finally:
        readyfd.user, readyfd.ours = user, ours
        with contextlib.suppress(OSError):
            s.close()
        if err == errno.EBADF:
            os.close(number)


@pytest.mark.parametrize("call", ["recv", "send"])
def test_a_call_whose_readiness_update_fails_after_its_bytes_logs_it_once(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch, call: str) -> None:
    """A recv() that takes bytes and leaves more (readable now: the
    event that brought them went to nobody), or a send() that fills the
    ring (writable no longer), brings the descriptor up to date, which
    fails (ENOBUFS).  The call returns its bytes, as raising would lose
    them, and the error is logged once, as every update's that is
    nobody's to raise.  Before, it was dropped without a word: the
    descriptor lied to a selector and nothing said why."""
    from pvcalls.frontend._socket import ReadyFd

    s, ring = connected(fe, fake)
    # Not fileno(), whose relay has the event thread take the events
    # (and make the update that would fail in the call's stead).
    readyfd = ReadyFd(into=s._st)
    user, ours = readyfd.user, readyfd.ours
    try:
        if call == "send":
            readyfd.user = failing = _UpdateFails(user, "setsockopt", errno.ENOBUFS)
            assert s.send(bytes(ring.size)) == ring.size  # the fake reads none
        else:
            ring.produce(b"datamore")
            st_ring = s._st.ring
            assert st_ring is not None
            wait_until(lambda: st_ring.in_available() == 8)
            readyfd.ours = failing = _UpdateFails(ours, "send", errno.ENOBUFS)
            assert s.recv(4) == b"data"
        assert failing.tries == 1
        (said,) = _ready_warnings(log)
        assert said.endswith(os.strerror(errno.ENOBUFS)), said
        assert [r.levelno for r in log.records if r.getMessage() == said] == [logging.WARNING]
        if call == "recv":
            assert s.recv(4) == b"more"  # nothing lost
    finally:
        readyfd.user, readyfd.ours = user, ours
        s.close()


@pytest.mark.parametrize("call", ["recv", "send"])
def test_a_call_whose_readiness_update_fails_after_its_bytes_goes_on(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch, call: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A recv() with MSG_WAITALL that takes part of what it waits for, or
    a blocking send() that fills the ring with part of its bytes, brings
    the descriptor up to date, which fails (ENOBUFS): the error is the
    descriptor's, logged once, and the call goes on for the rest, as it
    would have.  Before, it returned short, as if the connection had
    failed: MSG_WAITALL gave half, and a send() whose every update
    failed returned a ring-full at a time."""
    from pvcalls.frontend._socket import ReadyFd

    monkeypatch.setattr(_common, "RECHECK", 3600.0)  # the event wakes it: see above
    s, ring = connected(fe, fake)
    readyfd = ReadyFd(into=s._st)  # not fileno(): see above
    user = readyfd.user
    try:
        if call == "send":
            # Writable no longer, once the ring is full.
            readyfd.user = failing = _UpdateFails(user, "setsockopt", errno.ENOBUFS)
            going = Call(lambda: s.send(bytes(ring.size + 4)))
        else:
            ring.produce(b"data")
            st_ring = s._st.ring
            assert st_ring is not None
            wait_until(lambda: st_ring.in_available() == 4)
            s._update_ready()
            assert readyfd.readable
            # Readable no longer, once "data" is taken.
            readyfd.user = failing = _UpdateFails(user, "recv", errno.ENOBUFS)
            going = Call(lambda: s.recv(8, socket.MSG_WAITALL))
        wait_until(lambda: sleeping_in_wait(s) or not going.alive())
        if call == "send":
            ring.put(OUT_CONS_OFFSET, ring.get(OUT_PROD_OFFSET))
            ring.notify()
        else:
            ring.produce(b"more")
        assert going.join().error is None, going.error
        assert going.result == (ring.size + 4 if call == "send" else b"datamore")
        assert failing.tries >= 1
        (said,) = _ready_warnings(log)
        assert said.endswith(os.strerror(errno.ENOBUFS)), said
    finally:
        readyfd.user = user
        s.close()


def test_a_listen_whose_readiness_update_fails_says_it_listens(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch) -> None:
    """listen() on a socket whose fileno() was asked for makes the
    descriptor poll as a listener's (not writable), which fails
    (ENOBUFS): listen() returns, as the backend has the socket listening,
    and the error is logged once.  Before, listen() raised it (or the
    event thread's handler of the answer logged it as the frontend's
    failure), and a program gave up on a listening socket."""
    s = fe.socket()
    s.bind(_ADDRESS)
    s.fileno()
    readyfd = s._st.readyfd
    assert readyfd is not None
    user = readyfd.user
    failing = readyfd.user = _UpdateFails(user, "setsockopt", errno.ENOBUFS)
    try:
        s.listen()
        assert failing.tries >= 1
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        (said,) = _ready_warnings(log)
        assert said.endswith(os.strerror(errno.ENOBUFS)), said
        assert [r.getMessage() for r in _logged_failures(log, errno.ENOBUFS)] == [said]
    finally:
        readyfd.user = user
        s.close()


@pytest.mark.parametrize("connection", ["pending", "answered"])
def test_an_accept_whose_descriptor_was_closed_hands_the_connection_over(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch, connection: str) -> None:
    """A listener's fileno() polls readable, a POLL having said a
    connection is pending (or its ACCEPT, left in flight by an accept()
    that timed out, having been answered), and the program closes the
    descriptor.  accept() takes the readiness (or the answer), which
    would make the descriptor unreadable, and that update fails (EBADF):
    accept() hands the connection over all the same, as connect(),
    listen(), recv() and send() do what they are for, and the error is
    logged, at debug level.  (socket.socket's accept() fails with EBADF
    for good: its descriptor is the socket; this one only says readiness.)
    Before, accept() raised EBADF at every call: after an ACCEPT answered,
    it put the connection back each time for the next one to take."""
    fake.hold = {PVCALLS_ACCEPT, PVCALLS_POLL}
    if connection == "answered":
        ls, req, _, offered = _accept_in_flight(fe, fake)
        fd = ls.fileno()
        fake.respond(req, 0)
    else:
        ls = _listener(fe)
        fd = ls.fileno()
        fake.respond(fake.next_request(PVCALLS_POLL), 0)
        fake.hold = {PVCALLS_POLL}
    assert select.select([fd], [], [], TIMEOUT)[0], "never readable"
    _descriptor_closed(fd)
    try:
        accepted, _ = ls.accept()
        if connection == "answered":
            assert accepted is offered
        assert accepted.getpeername() == ("0.0.0.0", 0)
        accepted.close()
        said = [m for m in _ready_warnings(log) if f"id={ls.id:#x}" in m]
        assert said and said[0].endswith(os.strerror(errno.EBADF)), said
        ls.setblocking(False)
        with pytest.raises(BlockingIOError):
            ls.accept()  # handed over once: its POLL is held
    finally:
        with pytest.raises(OSError) as info:
            ls.close()  # the program's closing is said still, as socket.socket's
        assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("refused", [PVCALLS_ACCEPT, PVCALLS_POLL], ids=["ACCEPT", "POLL"])
def test_a_refusal_whose_descriptor_was_closed_is_what_accept_says(
        fe: pvcalls.Frontend, fake: FakeBackend, log: LogWatch, refused: int) -> None:
    """As above, a listener's fileno() polls readable, and the program
    closes the descriptor; the backend refuses the ACCEPT (or had refused
    the POLL, which made it readable).  accept() says the refusal
    (EINVAL); the update that follows it, which fails (EBADF), is logged.
    Raised instead, it hid the refusal, which went back for the next
    accept() to meet, and the next, each failing with EBADF."""
    if refused == PVCALLS_POLL:
        ls, fd = _refused_poll_listener(fe, fake)
        fake.hold = {PVCALLS_POLL}  # the one sent again stays unanswered
    else:
        ls = _listener(fe)
        fake.rets[PVCALLS_ACCEPT] = -EINVAL
        fd = ls.fileno()  # its POLL goes out, answered at once
        wait_until(lambda: select.select([fd], [], [], 0)[0] != [])
        fake.hold = {PVCALLS_POLL}
    _descriptor_closed(fd)
    try:
        _refused(ls.accept, errno.EINVAL)()
        said = [m for m in _ready_warnings(log) if f"id={ls.id:#x}" in m]
        assert said and said[0].endswith(os.strerror(errno.EBADF)), said
        ls.setblocking(False)
        with pytest.raises(BlockingIOError):
            ls.accept()  # said once: nothing is pending
    finally:
        with pytest.raises(OSError) as info:
            ls.close()
        assert info.value.errno == errno.EBADF


def test_a_timed_connect_that_connected_interrupted_anywhere_succeeds_once_more(
        fe: pvcalls.Frontend, fake: FakeBackend) -> None:
    """A connect() with a timeout that the backend accepts, a Ctrl-C
    landing anywhere in it: once the socket is connected (the answer
    came), it is as after that connect() returned, the next connect()
    succeeding once more (see connect()), then EISCONN.  Landing in the
    last update of the descriptor, made before the socket was marked so,
    left it connected with connect() saying EISCONN at once."""
    within = os.path.dirname(_frontend.__file__)
    socks: list[pvcalls.PVSocket] = []

    def attempt(n: int) -> str:
        socks[:] = [s := fe.socket()]
        s.settimeout(TIMEOUT)
        s.fileno()
        return interrupted_at(n, within, functools.partial(s.connect, _ADDRESS))

    def check(where: str) -> None:
        (s,) = socks
        try:
            if s._peername is None or s._broken:
                return  # the answer not in: good only for close()
            assert s.getpeername() == _ADDRESS
            try:
                s.connect(_ADDRESS)
            except OSError as exc:
                raise AssertionError(f"connected, the next connect() said {exc!r}") from None
            with pytest.raises(OSError) as info:
                s.connect(_ADDRESS)
            assert info.value.errno == errno.EISCONN
        finally:
            s.close()

    _sweep(attempt, check, through=("_update_ready_or_log",))


def test_a_close_of_the_event_thread_amid_answers_takes_those_already_taken(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The answers to two sockets' RELEASEs, taken off the command ring
    together; handing over the first, the event thread closes the
    frontend (a finaliser it runs there, say).  That close() counts the
    second as answered: it is off the ring, its hand-over to come.
    Before, it waited for an answer that nobody would take off the ring
    any more, the whole timeout, then gave that RELEASE up (a warning)."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fake.hold = {PVCALLS_RELEASE}
    first, _ = connected(fe, fake)
    second, _ = connected(fe, fake)
    returned = threading.Event()
    real = _frontend.Frontend._released

    def released(self: pvcalls.Frontend, rel: Any, ret: int) -> None:
        real(self, rel, ret)
        if rel.sock_id == first.id:
            self.close()
            returned.set()

    monkeypatch.setattr(_frontend.Frontend, "_released", released)
    first.close()
    second.close()
    answers = [(fake.next_request(PVCALLS_RELEASE), 0, {}) for _ in range(2)]
    assert [req.id for req, _, _ in answers] == [first.id, second.id]
    fake.respond_many(answers)
    assert returned.wait(TIMEOUT / 2), "the event thread's close() waited for an answer taken"
    assert fe.device is None
    assert not [r for r in caplog.records if "not answered" in r.getMessage()], caplog.text


def test_a_close_of_the_event_thread_in_a_ports_handler_ends_the_thread_quietly(
        fe: pvcalls.Frontend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The event thread closes the frontend as it runs the command
    port's handler (a finaliser it runs there, say): once the handler
    returns, the thread ends, no failure logged.  Before, it went on to
    unmask the port on the handle the close() had closed, and logged
    that it failed, with the handle's EBADF."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fake.hold = {PVCALLS_RELEASE}
    s, _ = connected(fe, fake)
    thread = fe._thread
    assert thread is not None
    real = _frontend.Frontend._released

    def released(self: pvcalls.Frontend, rel: Any, ret: int) -> None:
        real(self, rel, ret)
        self.close()

    monkeypatch.setattr(_frontend.Frontend, "_released", released)
    s.close()
    fake.respond(fake.next_request(PVCALLS_RELEASE), 0)
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert fe.device is None
    assert not caplog.records, caplog.text
