"""A raw PV Calls frontend for tests: every request byte under the test's control.

Unlike :class:`pvcalls.Frontend`, this helper hides nothing: a test builds
each request (``req_id`` = slot index and pointer-sized ids as Linux does,
or garbage), pushes it, and reads the responses and the data ring indexes
itself.  It is single-threaded: :meth:`RawFrontend.wait` drains the guest's
event channel and the command ring until a condition holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from racewindow import stands_at

from pvcalls import Backend, _wire
from pvcalls._socket import ActiveSocket, PassiveSocket
from pvcalls._wire import ffi
from xenback.ring import FlexRing, FrontRing, mb
from xenback.xenstore import XenStore

TIMEOUT = 10.0


def wait_until(cond: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Re-check ``cond`` until it holds, for state that has no event to wait
    on (a backend's internal bookkeeping); TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        pause.wait(0.01)


class LogWatch(logging.Handler):
    """A logger's records (those of a thread of the backend's or the
    frontend's as they come), with a wait for one that matches."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def messages(self, level: int = logging.WARNING) -> list[str]:
        with self._cond:
            return [r.getMessage() for r in self.records if r.levelno >= level]

    def wait(self, text: str, level: int = logging.WARNING) -> str:
        """The first message at ``level`` or above containing ``text``."""
        with self._cond:
            found: list[str] = []

            def seen() -> bool:
                found[:] = [m for r in self.records if r.levelno >= level
                            and text in (m := r.getMessage())]
                return bool(found)

            assert self._cond.wait_for(seen, TIMEOUT), f"no log line with {text!r}"
            return found[0]


def threads() -> list[str]:
    """The names of the threads a test may leave behind by mistake: not the
    workqueues' workers, nor the process's one timer thread, which the
    first timer armed starts and which then lives as long as the process
    (workqueue/_timer.py): a fuzzer seed that armed the first one (--abrupt
    seed 13180, the first of its run) was said to have left it."""
    return sorted(t.name for t in threading.enumerate()
                  if not t.name.startswith("kworker/") and t.name != "wq-timer")


class Call:
    """``fn()`` in a thread of its own: a call that may block."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = TIMEOUT) -> Call:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the call still blocks after {timeout} s"
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def ident(self) -> int:
        assert self._thread.ident is not None
        return self._thread.ident

    def oserror(self) -> OSError:
        """Joined, the OSError it raised (exactly OSError or a subclass)."""
        self.join()
        assert isinstance(self.error, OSError), repr(self.error)
        return self.error


def sleeping_in_wait(s: Any) -> bool:
    """Whether a caller of ``s`` (a :class:`pvcalls.PVSocket`) sleeps in
    its ``_wait``: polling the ring's own handle (``_polling``, set under
    ``_cond`` after the last check) or waiting on ``_cond`` (a waiter is
    queued before ``_cond`` is let go)."""
    with s._cond:
        return any(s._polling) or bool(s._cond._waiters)


def echo_through(s: Any, data: bytes, timeout: float = TIMEOUT) -> None:
    """Send ``data`` on ``s`` (a connected socket of :class:`pvcalls.Frontend`
    whose peer echoes) while a thread reads the echo; assert that all of it
    came back, in order."""
    received = bytearray()

    def reader() -> None:
        while len(received) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                return
            received.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    s.sendall(data)
    t.join(timeout)
    assert not t.is_alive(), f"{len(received)} of {len(data)} bytes echoed"
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


def done_or_at(call: Call, func: Callable[..., Any], text: str) -> bool:
    """Whether ``call`` has returned, or stands at the first line of
    ``func`` that contains ``text`` (see :func:`racewindow.stands_at`)."""
    return not call.alive() or stands_at(call.ident, func, text)


def hold_accepts(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """From now on the backend answers an ACCEPT only once the returned
    event is set.  Call it before the listener is made: a listener's Work
    takes its function as it is made."""
    run = PassiveSocket._run
    release = threading.Event()

    def held(self: PassiveSocket) -> None:
        with self._lock:
            waiting = self.waiting
        if waiting is not None and waiting[1] is not None:
            release.wait(TIMEOUT)  # an ACCEPT
        run(self)

    monkeypatch.setattr(PassiveSocket, "_run", held)
    return release


@dataclass(frozen=True)
class Response:
    req_id: int
    cmd: int
    ret: int
    id: int


@dataclass(frozen=True)
class Pages:
    """Granted pages of the guest seen as one: a slice of a larger share
    (``buffer`` and ``refs`` as :class:`xenback.platform.SharedPages` has
    them), for a ring laid out on pages the guest shared before."""

    buffer: memoryview
    refs: tuple[int, ...]

    @classmethod
    def window(cls, share: Any, first: int, count: int) -> Pages:
        """``count`` pages of ``share`` from its page ``first``."""
        return cls(share.buffer[first * _wire.PAGE_SIZE : (first + count) * _wire.PAGE_SIZE],
                   tuple(share.refs[first : first + count]))


class DataRing:
    """The guest's side of one active socket's data ring.

    Its pages are new unless given: ``indexes`` (a share of one page) and
    ``data`` (2**order pages, a share or :class:`Pages`) the guest gives
    again, as a frontend recycling its rings does, its indexes and errors
    back to zero then.  ``refs`` and ``ring_order`` replace what is laid
    out in the indexes page (hostile)."""

    def __init__(self, fe: RawFrontend, order: int = 4, *, refs: list[int] | None = None,
                 ring_order: int | None = None, indexes: Any = None,
                 data: Any = None) -> None:
        self.fe = fe
        self.order = order
        self.indexes = fe.gntshr.share_pages(fe.backend_id, 1) if indexes is None else indexes
        self.data = fe.gntshr.share_pages(fe.backend_id, 1 << order) if data is None else data
        page = self.indexes.buffer
        words = page.cast("I")
        if indexes is not None:
            for offset in (_wire.IN_CONS_OFFSET, _wire.IN_PROD_OFFSET, _wire.IN_ERROR_OFFSET,
                           _wire.OUT_CONS_OFFSET, _wire.OUT_PROD_OFFSET,
                           _wire.OUT_ERROR_OFFSET):
                words[offset // 4] = 0
        # What the indexes page says, as the backend is to read it.
        self.ring_order = order if ring_order is None else ring_order
        self.refs = tuple(refs if refs is not None else self.data.refs)
        words[_wire.RING_ORDER_OFFSET // 4] = self.ring_order
        for i, ref in enumerate(self.refs):
            words[_wire.REF_OFFSET // 4 + i] = ref
        words.release()
        self.ref = self.indexes.refs[0]
        self.port = fe.evtchn.bind_unbound_port(fe.backend_id)
        size = _wire.flex_ring_size(order)
        self.size = size
        self.in_ring = FlexRing(self.data.buffer[:size], page, prod_offset=_wire.IN_PROD_OFFSET,
                                cons_offset=_wire.IN_CONS_OFFSET)
        self.out_ring = FlexRing(self.data.buffer[size:], page, prod_offset=_wire.OUT_PROD_OFFSET,
                                 cons_offset=_wire.OUT_CONS_OFFSET)
        self._words = page[:256].cast("i")
        self.closed = False
        self._bound = True

    # Raw index access (tests write hostile values through these).
    def get(self, offset: int) -> int:
        return self._words[offset // 4]

    def put(self, offset: int, value: int) -> None:
        """Store ``value`` modulo 2**32 (as the int32 the view holds)."""
        value &= 0xFFFFFFFF
        self._words[offset // 4] = value - (1 << 32) if value >= 1 << 31 else value

    @property
    def in_error(self) -> int:
        return self.get(_wire.IN_ERROR_OFFSET)

    @property
    def out_error(self) -> int:
        return self.get(_wire.OUT_ERROR_OFFSET)

    def write(self, data: bytes | memoryview, *, notify: bool = True) -> int:
        """Copy as much of ``data`` as fits into the out ring; notify
        (unless told not to: the backend then does not look)."""
        done = 0
        for view in self.out_ring.writable():
            n = min(len(view), len(data) - done)
            view[:n] = data[done : done + n]
            done += n
        if done:
            self.out_ring.produce(done)
            if notify:
                self.fe.evtchn.notify(self.port)
        return done

    def read(self, limit: int = 1 << 30, *, notify: bool = True,
             only_if_full: bool = False) -> bytes:
        """Take what the in ring holds (at most ``limit``); notify (unless
        told not to).  ``only_if_full``: only if the ring was full before,
        decided as pvcalls.frontend does (in_was_full): by in_prod read
        again after our in_cons store and a full barrier, against the
        backend's in_prod store and its read of in_cons."""
        chunks = []
        taken = 0
        cons = self.get(_wire.IN_CONS_OFFSET) & 0xFFFFFFFF
        for view in self.in_ring.readable():
            n = min(len(view), limit - taken)
            chunks.append(bytes(view[:n]))
            taken += n
        if taken:
            self.in_ring.consume(taken)
            if only_if_full:
                mb()
                prod = self.get(_wire.IN_PROD_OFFSET) & 0xFFFFFFFF
                notify = notify and (prod - cons) & 0xFFFFFFFF >= self.size
            if notify:
                self.fe.evtchn.notify(self.port)
        return b"".join(chunks)

    def close(self) -> None:
        """Release the views and unbind the port; idempotent (a second
        unbind could hit the port's number bound again since, for another
        ring or the command ring)."""
        if self.closed:
            return
        self.closed = True
        self.in_ring.release()
        self.out_ring.release()
        self._words.release()
        self.unbind()

    def unbind(self) -> None:
        """Close the guest's end of the ring's event channel, once (see
        close())."""
        if self._bound:
            self._bound = False
            with contextlib.suppress(OSError):
                self.fe.evtchn.unbind(self.port)


# Every RawFrontend not yet disposed of, for dispose_all() at each test's
# end: their handles hold descriptors (a pipe per port, an epoll set per
# handle) that would otherwise outlive the test, hundreds over the suite,
# until pyxs's select() in a later test meets a descriptor past 1023.
_live: list[RawFrontend] = []


def dispose_all() -> None:
    """Release the handles of every RawFrontend made so far."""
    while _live:
        _live.pop().dispose()


class RawFrontend:
    """Adds a pvcalls device for ``guest``, handshakes, and speaks raw requests."""

    _ids = itertools.count(0xFFFF888000001000, 0x40)  # kernel-pointer-like ids

    def __init__(self, host: Any, guest: Any, *, devid: int = 0, connect: bool = True,
                 backend_id: int = 0) -> None:
        self.host = host
        self.guest = guest
        self.backend_id = backend_id
        self.device = host.toolstack.add_device("pvcalls", guest.domid, backend_id, devid)
        self.xs = XenStore.connect_to(guest)
        self.gntshr = guest.gntshr()
        self.evtchn = guest.evtchn()
        self.responses: dict[int, Response] = {}
        self.unexpected: list[Response] = []
        # Every response's req_id, in the order the responses came.
        self.arrived: list[int] = []
        self.ring: FrontRing | None = None
        self.rings: list[DataRing] = []
        _live.append(self)
        if connect:
            self.connect()

    @property
    def fe_path(self) -> str:
        return str(self.device.frontend_path)

    @property
    def be_path(self) -> str:
        return str(self.device.backend_path)

    def backend_state(self) -> int:
        return int(self.xs.read(f"{self.be_path}/state") or 0)

    def wait_backend_state(self, state: int, timeout: float = TIMEOUT) -> None:
        self.xs.wait_for(f"{self.be_path}/state", str(state), timeout=timeout)

    def connect(self, *, version: str = "1", ring_ref: str | None = None,
                port: str | None = None, wait: bool = True) -> None:
        """The frontend half of the handshake, as Linux's pvcalls-front
        (``wait=False``: up to Initialised, without waiting for Connected).
        ``ring_ref`` and ``port`` replace the values written; ``{}`` in
        them stands for the real one."""
        self.wait_backend_state(2)
        self.page = self.gntshr.share_pages(self.backend_id, 1)
        self.ring = FrontRing(self.page.buffer, _wire.SLOT_SIZE)
        self.port = self.evtchn.bind_unbound_port(self.backend_id)
        nodes = {
            "version": version,
            "ring-ref": (ring_ref if ring_ref is not None else "{}").format(self.page.refs[0]),
            "port": (port if port is not None else "{}").format(self.port),
        }
        for key, value in nodes.items():
            self.xs.write(f"{self.fe_path}/{key}", value)
        self.xs.write(f"{self.fe_path}/state", "3")
        if wait and ring_ref is None and port is None and version == "1":
            self.wait_backend_state(4)
            self.xs.write(f"{self.fe_path}/state", "4")

    def dispose(self) -> None:
        """Release every view and handle (at the test's end, with the host
        possibly gone already: what fails is gone already)."""
        for ring in self.rings:
            with contextlib.suppress(OSError, ValueError, BufferError):
                ring.close()
        if self.ring is not None:
            self.ring.release()
        for handle in (self.evtchn, self.gntshr, self.xs):
            with contextlib.suppress(OSError, ValueError, BufferError):
                handle.close()

    def close(self) -> None:
        """Close as Linux's frontend does (Closing, wait, Closed).  The
        XenStore connection stays open for the test's checks."""
        self.xs.write(f"{self.fe_path}/state", "5")
        self.xs.wait_for(f"{self.be_path}/state", lambda v: v in ("5", "6"), timeout=TIMEOUT)
        self.xs.write(f"{self.fe_path}/state", "6")
        self.xs.wait_for(f"{self.be_path}/state", "6", timeout=TIMEOUT)

    # -- requests ------------------------------------------------------------------

    @classmethod
    def new_id(cls) -> int:
        return next(cls._ids)

    def push(self, cmd: int, fill: Callable[[Any], None] | None = None, *,
             raw: bytes | None = None) -> int:
        """Push one request; returns its req_id (the slot index, like Linux)."""
        assert self.ring is not None
        req_id = self.ring.req_prod_pvt & (self.ring.nr_ents - 1)
        if raw is None:
            req = ffi.new("struct xen_pvcalls_request *")
            req.req_id = req_id
            req.cmd = cmd
            if fill is not None:
                fill(req)
            raw = bytes(ffi.buffer(req))
        self.ring.push_request(raw)
        if self.ring.push_requests():
            self.evtchn.notify(self.port)
        return req_id

    def call(self, cmd: int, fill: Callable[[Any], None] | None = None,
             timeout: float = TIMEOUT) -> Response:
        req_id = self.push(cmd, fill)
        return self.response(req_id, timeout)

    def response(self, req_id: int, timeout: float = TIMEOUT) -> Response:
        self.wait(lambda: req_id in self.responses, timeout)
        return self.responses.pop(req_id)

    def wait(self, cond: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Process events until ``cond()``; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll_responses()
            if cond():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("condition not reached")
            # The event channel wakes us; the short cap only bounds the cost
            # of a notification the backend was not asked to send (data
            # rings have no event index), the condition is re-checked.
            select.select([self.evtchn.fileno()], [], [], min(remaining, 0.05))
            while (port := self.evtchn.pending()) is not None:
                self.evtchn.unmask(port)

    def drain_events(self) -> None:
        """Forget every notification received so far."""
        while (port := self.evtchn.pending()) is not None:
            self.evtchn.unmask(port)

    def wait_notified(self, port: int, timeout: float = TIMEOUT) -> None:
        """Sleep on the guest's event channel until the backend notifies
        ``port`` (a frontend that waits for the backend does only that;
        unlike :meth:`wait`, no periodic re-check covers a missing notify)."""
        deadline = time.monotonic() + timeout
        while True:
            while (fired := self.evtchn.pending()) is not None:
                self.evtchn.unmask(fired)
                if fired == port:
                    return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"port {port} was not notified")
            select.select([self.evtchn.fileno()], [], [], remaining)

    def poll_responses(self) -> None:
        assert self.ring is not None
        while True:
            for raw in self.ring.responses():
                rsp = ffi.from_buffer("struct xen_pvcalls_response *", raw)
                r = Response(rsp.req_id, rsp.cmd, rsp.ret, rsp.u.socket.id)
                if r.req_id in self.responses:
                    self.unexpected.append(r)
                self.arrived.append(r.req_id)
                self.responses[r.req_id] = r
            if not self.ring.final_check_for_responses():
                return

    # -- commands as Linux sends them ---------------------------------------------------

    def socket(self, sock_id: int | None = None, domain: int = _wire.AF_INET,
               type_: int = _wire.SOCK_STREAM, protocol: int = 0) -> tuple[int, Response]:
        sock_id = self.new_id() if sock_id is None else sock_id

        def fill(req: Any) -> None:
            req.u.socket.id = sock_id
            req.u.socket.domain = domain
            req.u.socket.type = type_
            req.u.socket.protocol = protocol

        return sock_id, self.call(_wire.PVCALLS_SOCKET, fill)

    def new_ring(self, order: int = 4, **kwargs: Any) -> DataRing:
        ring = DataRing(self, order, **kwargs)
        self.rings.append(ring)
        return ring

    def push_connect(self, sock_id: int, address: tuple[str, int], ring: DataRing,
                     *, length: int = 16, ref: int | None = None,
                     evtchn: int | None = None) -> int:
        """``ref`` and ``evtchn`` replace the ring's (hostile)."""
        def fill(req: Any) -> None:
            req.u.connect.id = sock_id
            ffi.memmove(req.u.connect.addr, _wire.pack_sockaddr_in(*address), 16)
            req.u.connect.len = length
            req.u.connect.ref = ring.ref if ref is None else ref
            req.u.connect.evtchn = ring.port if evtchn is None else evtchn

        return self.push(_wire.PVCALLS_CONNECT, fill)

    def connect_socket(self, address: tuple[str, int], order: int = 4) -> tuple[int, DataRing]:
        sock_id, rsp = self.socket()
        assert rsp.ret == 0, rsp
        ring = self.new_ring(order)
        rsp = self.response(self.push_connect(sock_id, address, ring))
        assert rsp.ret == 0, rsp
        return sock_id, ring

    def bind(self, sock_id: int, address: tuple[str, int], *, length: int = 16) -> Response:
        def fill(req: Any) -> None:
            req.u.bind.id = sock_id
            ffi.memmove(req.u.bind.addr, _wire.pack_sockaddr_in(*address), 16)
            req.u.bind.len = length

        return self.call(_wire.PVCALLS_BIND, fill)

    def listen(self, sock_id: int, backlog: int = 16) -> Response:
        def fill(req: Any) -> None:
            req.u.listen.id = sock_id
            req.u.listen.backlog = backlog

        return self.call(_wire.PVCALLS_LISTEN, fill)

    def listening(self, backend: Backend, backlog: int = 16) -> tuple[int, tuple[str, int]]:
        """SOCKET, BIND to a free port of 127.0.0.1 and LISTEN, each answered
        0: the listener's id and the address host clients connect to (only
        the backend knows the port its host socket got)."""
        sock_id, rsp = self.socket()
        assert rsp.ret == 0, rsp
        assert self.bind(sock_id, ("127.0.0.1", 0)).ret == 0
        assert self.listen(sock_id, backlog).ret == 0
        return sock_id, address_of(backend, sock_id)

    def push_accept(self, sock_id: int, id_new: int, ring: DataRing) -> int:
        def fill(req: Any) -> None:
            req.u.accept.id = sock_id
            req.u.accept.id_new = id_new
            req.u.accept.ref = ring.ref
            req.u.accept.evtchn = ring.port

        return self.push(_wire.PVCALLS_ACCEPT, fill)

    def push_poll(self, sock_id: int) -> int:
        def fill(req: Any) -> None:
            req.u.poll.id = sock_id

        return self.push(_wire.PVCALLS_POLL, fill)

    def push_release(self, sock_id: int, reuse: int = 0) -> int:
        def fill(req: Any) -> None:
            req.u.release.id = sock_id
            req.u.release.reuse = reuse

        return self.push(_wire.PVCALLS_RELEASE, fill)

    def release(self, sock_id: int) -> Response:
        return self.response(self.push_release(sock_id))

    # -- data helpers ---------------------------------------------------------------------

    def recv_exactly(self, ring: DataRing, n: int, timeout: float = TIMEOUT) -> bytes:
        buf = bytearray()

        def got() -> bool:
            # The error first, then the data, as a frontend must read them:
            # the backend stores in_error after its last byte, so data that
            # is not there after the error was seen never comes.
            err = ring.in_error
            buf.extend(ring.read(n - len(buf)))
            return len(buf) >= n or err != 0

        self.wait(got, timeout)
        return bytes(buf)

    def send_all(self, ring: DataRing, data: bytes, timeout: float = TIMEOUT) -> None:
        view = memoryview(data)
        sent = 0

        def done() -> bool:
            nonlocal sent
            sent += ring.write(view[sent:])
            return sent == len(data)

        self.wait(done, timeout)

    def echo(self, ring: DataRing, data: bytes, timeout: float = TIMEOUT) -> None:
        """Send ``data`` on ``ring``, whose peer echoes, and check that all of
        it comes back (no more than the rings hold)."""
        self.send_all(ring, data, timeout)
        assert self.recv_exactly(ring, len(data), timeout) == data


def address_of(backend: Backend, sock_id: int) -> tuple[str, int]:
    """The host address of a bound socket of the backend's, from its stats."""
    address = next(r.address for r in backend.stats().sockets if r.id == sock_id)
    assert address is not None
    return address


def socket_of(backend: Backend, fe: RawFrontend, sock_id: int) -> ActiveSocket:
    """The backend's active socket ``sock_id`` of ``fe`` (its device 0)."""
    sock = backend._frontends[(fe.guest.domid, 0)]._sockets[sock_id]
    assert isinstance(sock, ActiveSocket)
    return sock


def bound_ports(backend: Any) -> list[int]:
    """Every event channel port the backend has bound: the command rings'
    (its event thread) and the active sockets' (its per-CPU pollers)."""
    ports = list(backend.dispatcher.ports)
    for poller in backend._pollers.values():
        ports += poller.events.ports
    return ports


def watched_fds(backend: Any) -> list[int]:
    """Every host descriptor the backend watches: its listeners' and
    lingering sockets' (its event thread) and the active sockets' (its
    per-CPU pollers).  One left behind by a socket that closed its host
    socket keeps the number from the next socket that gets it."""
    fds = []
    for events in [backend.dispatcher, *(p.events for p in backend._pollers.values())]:
        with events._lock:
            fds += events._fds
    return sorted(fds)


def resources(backend: Any, host: Any) -> tuple[object, ...]:
    """What active sockets hold: the backend's event channel ports (and the
    hypervisor's count of ports), its grant mappings, and the CPUs' loads."""
    return (sorted(bound_ports(backend)), host.hypervisor.stats()["ports"],
            len(backend.gnttab._live), [c.sockets for c in backend.stats().cpus])
