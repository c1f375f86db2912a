"""Non-blocking connect() against the real backend, under stress: many at
once from several threads and from asyncio, closed before, while and after
the answer comes, dropped unclosed, and cut short by the frontend closing
or the backend going away.  After each test nothing is left: no response
table entry, RELEASE, socket in the backend, grant or port, thread or
descriptor, and the event thread logged no exception."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import itertools
import logging
import os
import random
import select
import selectors
import socket
import threading
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fdcensus import descriptors
from pvcalls_rawfront import Call, wait_until
from racewindow import PauseAt

import pvcalls
from pvcalls import _wire
from xenback.sim import SimHost
from xenback.xenstore import XenStore

TIMEOUT = 10.0
SOL, SO_ERROR = socket.SOL_SOCKET, socket.SO_ERROR


@pytest.fixture(scope="module")
def host() -> Iterator[SimHost]:
    with SimHost() as h:
        yield h


@pytest.fixture(scope="module")
def backend(host: SimHost) -> Iterator[pvcalls.Backend]:
    with pvcalls.Backend(host.dom0, max_ioworkers=2) as b:
        yield b


_names = itertools.count()


class Baseline:
    """What the process and the host hold before a frontend opens, and the
    check that its close() gave all of it back (the backend's sockets,
    grants and ports, threads, descriptors) and that it logged nothing
    amiss."""

    def __init__(self, host: SimHost) -> None:
        self.host = host
        self.hypervisor = host.hypervisor.stats()
        self.threads = set(threading.enumerate())
        self.fds = descriptors()

    def check(self, backend: pvcalls.Backend, fe: pvcalls.Frontend,
              caplog: pytest.LogCaptureFixture) -> None:
        fe.close()
        with fe._lock:
            assert fe._slots == [None] * _wire.RING_SLOTS
            assert not fe._releases and not fe._sockets and not fe._dropped
        wait_until(lambda: not held(backend, fe))
        wait_until(lambda: all(self.host.hypervisor.stats()[k] <= self.hypervisor[k]
                               for k in ("grants", "ports")))
        # Not the backend's workqueue threads: its pools grow and shrink.
        wait_until(lambda: not [t for t in set(threading.enumerate()) - self.threads
                                if not t.name.startswith("kworker/")])
        # Each by number and what it is: a count would let another thread's
        # close hide one left open.
        wait_until(lambda: descriptors() <= self.fds)
        # Not "completing a command" (an exception in the event thread),
        # nor a RELEASE that failed or went unanswered.
        logged = [r for r in caplog.records if r.name.startswith("pvcalls.frontend")
                  and r.levelno >= logging.WARNING]
        assert logged == [], [r.getMessage() for r in logged]


def held(backend: pvcalls.Backend, fe: pvcalls.Frontend) -> list[Any]:
    """The guest's sockets the backend still has."""
    return [row for row in backend.stats().sockets if row.domain == fe.domain.domid]


def settled(fe: pvcalls.Frontend) -> bool:
    """Nothing in flight or waiting to be released."""
    with fe._lock:
        return (fe._slots == [None] * _wire.RING_SLOTS and not fe._releases
                and not fe._dropped and fe._reaper is None and not fe._sockets)


@contextlib.contextmanager
def frontend(host: SimHost, backend: pvcalls.Backend,
             caplog: pytest.LogCaptureFixture) -> Iterator[pvcalls.Frontend]:
    """A frontend of a domain of its own; on leaving, it is closed and
    nothing of it may be left."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    domain = host.create_domain(f"nb{next(_names)}")
    base = Baseline(host)
    fe = pvcalls.Frontend(domain, timeout=TIMEOUT)
    fe.open()
    try:
        yield fe
    except BaseException:
        fe.close()
        raise
    base.check(backend, fe, caplog)


@pytest.fixture
def fe(host: SimHost, backend: pvcalls.Backend,
       caplog: pytest.LogCaptureFixture) -> Iterator[pvcalls.Frontend]:
    with frontend(host, backend, caplog) as f:
        yield f


@contextlib.contextmanager
def unanswered_listener() -> Iterator[tuple[tuple[str, int], Callable[[], None]]]:
    """The address of a host listener whose accept and SYN queues are full
    (SYNs to it are dropped: a connect stays in flight), and a function
    that starts accepting every connection, so that the next SYN
    retransmission (a second or so later) connects."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    accepted: list[socket.socket] = []
    stop = threading.Event()
    acceptor = threading.Thread(target=lambda: accept_all(listener, accepted, stop))
    try:
        for _ in range(3):
            f = socket.socket()
            fillers.append(f)
            f.setblocking(False)
            f.connect_ex(listener.getsockname())
        yield listener.getsockname(), acceptor.start
    finally:
        stop.set()
        if acceptor.ident is not None:
            acceptor.join(TIMEOUT)
        for f in (*fillers, *accepted):
            f.close()
        listener.close()


def accept_all(listener: socket.socket, accepted: list[socket.socket],
               stop: threading.Event) -> None:
    listener.settimeout(0.05)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            accepted.append(listener.accept()[0])


def refused_address() -> tuple[str, int]:
    closed = socket.create_server(("127.0.0.1", 0))
    address: tuple[str, int] = closed.getsockname()
    closed.close()
    return address


def start_connect(fe: pvcalls.Frontend, address: tuple[str, int]) -> pvcalls.PVSocket:
    """A non-blocking socket whose CONNECT went out."""
    s = fe.socket()
    s.setblocking(False)
    with pytest.raises(BlockingIOError) as info:
        s.connect(address)
    assert info.value.errno == errno.EINPROGRESS
    # The exception's traceback holds this frame, which holds ``info``: a
    # cycle that kept ``s`` alive until the next garbage collection, for a
    # caller that drops it and expects it gone at once.
    del info
    return s


def wait_writable(s: pvcalls.PVSocket, timeout: float = TIMEOUT) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(s, selectors.EVENT_WRITE)
        return bool(sel.select(timeout))


# -- what the stress below found ------------------------------------------------------


def test_a_connect_left_in_flight_does_not_stall_the_other_commands(
        fe: pvcalls.Frontend, backend: pvcalls.Backend) -> None:
    """A CONNECT to a peer that does not answer keeps its response table
    entry.  Each request took the entry of its slot index (req_id, as
    Linux's) and waited for it to be free: 31 commands later every one of
    them (the RELEASE that would have cut the CONNECT short too) timed out,
    and close() left the socket in the backend."""
    with unanswered_listener() as (address, _):
        s = start_connect(fe, address)
        for _ in range(2 * _wire.RING_SLOTS):
            fe.socket().close()  # a SOCKET and a RELEASE each
        s.close()
        wait_until(lambda: settled(fe) and not held(backend, fe))


def test_connects_in_flight_leave_room_for_their_releases(
        fe: pvcalls.Frontend, backend: pvcalls.Backend, echo_server: Any) -> None:
    """Non-blocking connects to a silent peer until the command ring has no
    room: they leave the last response entry free, so that each of them
    can still be closed at once (with every entry taken, every close()
    waited the frontend's timeout, failed to send its RELEASE and left the
    socket in the backend).  The one that finds no room fails with ENOBUFS,
    not a BlockingIOError: asyncio's sock_connect() took EAGAIN for
    EINPROGRESS and reported a connect that was never sent as done."""
    with unanswered_listener() as (address, _):
        mine = fe.socket()
        mine.setblocking(False)
        inflight = []
        for _ in range(2 * _wire.RING_SLOTS):
            s = fe.socket()
            s.setblocking(False)
            try:
                s.connect(address)
            except BlockingIOError as exc:
                assert exc.errno == errno.EINPROGRESS
                inflight.append(s)
                continue
            except OSError as exc:
                assert exc.errno == errno.ENOBUFS
                s.close()
                break
        assert len(inflight) == _wire.RING_SLOTS - 1

        async def sock_connect() -> None:
            loop = asyncio.get_running_loop()
            with pytest.raises(OSError) as info:
                await asyncio.wait_for(loop.sock_connect(mine, echo_server.address), TIMEOUT)
            assert info.value.errno == errno.ENOBUFS

        asyncio.run(sock_connect())
        closing = Call(lambda: [s.close() for s in inflight])
        assert closing.join(TIMEOUT / 2).error is None
        wait_until(lambda: settled_but(fe, mine) and not held_but(backend, fe, mine))
    mine.settimeout(TIMEOUT)
    mine.connect(echo_server.address)
    mine.sendall(b"room again")
    assert mine.recv(64) == b"room again"
    mine.close()


def settled_but(fe: pvcalls.Frontend, sock: pvcalls.PVSocket) -> bool:
    with fe._lock:
        return (fe._slots == [None] * _wire.RING_SLOTS and not fe._releases
                and list(fe._sockets) == [sock.id])


def held_but(backend: pvcalls.Backend, fe: pvcalls.Frontend, sock: pvcalls.PVSocket) -> bool:
    return any(row.id != sock.id for row in held(backend, fe))


@pytest.mark.parametrize("how", ["backend closed", "frontend told Closing"])
def test_connects_in_flight_fail_cleanly_when_the_backend_goes(
        caplog: pytest.LogCaptureFixture, how: str) -> None:
    """The backend goes with CONNECTs in flight: every waiter fails with
    ENOTCONN, fileno() polls ready, and SO_ERROR says ENOTCONN too (it
    said 0, so select-based programs and asyncio's sock_connect() took the
    connect for done); nothing is left once the frontend closes."""
    # A host of its own: the module's backend must not serve this domain.
    with SimHost() as host:
        backend_goes(host, caplog, how)


def backend_goes(host: SimHost, caplog: pytest.LogCaptureFixture, how: str) -> None:
    backend = pvcalls.Backend(host.dom0, max_ioworkers=1)
    try:
        with frontend(host, backend, caplog) as fe, \
                unanswered_listener() as (address, _):
            polled = [start_connect(fe, address) for _ in range(3)]
            blocking = start_connect(fe, address)
            blocking.settimeout(None)  # with a timeout, connect() says EALREADY at once
            sending = start_connect(fe, address)
            sending.settimeout(TIMEOUT)
            dropped = weakref.ref(start_connect(fe, address))
            asyncio_sock = start_connect(fe, address)
            waiters = [Call(lambda: blocking.connect(address)),
                       Call(lambda: sending.sendall(b"x"))]
            wait_until(lambda: bool(blocking._cond._waiters)  # type: ignore[attr-defined]
                       and bool(sending._cond._waiters))  # type: ignore[attr-defined]

            async def sock_connect() -> BaseException | None:
                loop = asyncio.get_running_loop()
                s = fe.socket()
                s.setblocking(False)
                connecting = asyncio.ensure_future(loop.sock_connect(s, address))
                # Its first step runs in the loop's next round; the nap is
                # only for a wrongly done connect to show: longer is stricter.
                await asyncio.sleep(0.05)
                assert not connecting.done()
                gone.set()
                try:
                    await asyncio.wait_for(connecting, TIMEOUT)
                except OSError as exc:
                    return exc
                finally:
                    s.close()
                return None

            gone = threading.Event()

            def go() -> None:
                gone.wait(TIMEOUT)
                if how == "backend closed":
                    backend.close()
                else:
                    with XenStore.connect_to(host.dom0) as xs:
                        xs.write(f"{fe.device.frontend_path}/state", "5")

            goer = threading.Thread(target=go)
            goer.start()
            error = asyncio.run(sock_connect())
            goer.join(TIMEOUT)
            assert isinstance(error, OSError) and error.errno == errno.ENOTCONN, error
            wait_until(lambda: fe._dead)
            for call in waiters:
                assert call.oserror().errno == errno.ENOTCONN
            for s in polled:
                assert wait_writable(s)
                assert s.getsockopt(SOL, SO_ERROR) == errno.ENOTCONN
                with pytest.raises(OSError) as info:
                    s.connect(address)
                assert info.value.errno == errno.ENOTCONN
            assert dropped() is None  # garbage at once: its CONNECT's callback holds it weakly
            for s in (*polled, blocking, sending, asyncio_sock):
                s.close()
    finally:
        backend.close()


def test_a_fileno_racing_with_a_refused_connect_leaves_the_ring_to_its_next_socket(
        fe: pvcalls.Frontend, monkeypatch: pytest.MonkeyPatch) -> None:
    """fileno() reads the ring under the socket's condition and relays it
    after letting go.  If meanwhile the CONNECT was refused, the ring went
    back to the pool and on to another socket, the late relay was for the
    old socket, and the new one's relay found the ring relayed: its
    fileno() never polled readable for the data that came."""
    echo = socket.create_server(("127.0.0.1", 0))
    answering = PauseAt.in_method(monkeypatch, pvcalls.PVSocket, "_connect_answered",
                                  "with self._mutex:")
    relaying = PauseAt(pvcalls.PVSocket.fileno, "self._fe._relay(ring, self._st)")
    old = start_connect(fe, refused_address())
    assert answering.reached.wait(TIMEOUT)  # the refusal came: the event thread holds it
    ring = old._st.ring
    assert ring is not None and ring.direct
    filenoing = Call(lambda: relaying.run(old.fileno))
    assert relaying.reached.wait(TIMEOUT)  # read the ring: about to relay it
    answering.resume()
    wait_until(lambda: ring in fe._ring_pool)
    monkeypatch.undo()
    new = fe.socket()
    new.settimeout(TIMEOUT)
    new.connect(echo.getsockname())
    conn, _ = echo.accept()
    try:
        assert new._st.ring is ring
        relaying.resume()
        assert filenoing.join().error is None
        with selectors.DefaultSelector() as sel:
            sel.register(new, selectors.EVENT_READ)
            conn.sendall(b"hello")
            assert [key.fileobj for key, _ in sel.select(TIMEOUT)] == [new]
        assert new.recv(5) == b"hello"
    finally:
        conn.close()
        echo.close()
        new.close()
        old.close()


def test_a_socket_whose_connect_failed_listens_once_connect_reported_it(
        fe: pvcalls.Frontend, backend: pvcalls.Backend) -> None:
    """A refused non-blocking connect (its error taken by SO_ERROR, as
    asyncio takes it), then bind(): listen() fails with EINVAL, as
    Linux's on a socket still connecting, which polls readable and
    writable, until connect() has reported the failure (ECONNABORTED).
    Then it listens, and polls neither readable nor writable until a
    connection comes: no accept() loop around it spins."""
    s = start_connect(fe, refused_address())
    assert wait_writable(s)
    assert s.getsockopt(SOL, SO_ERROR) == errno.ECONNREFUSED
    s.bind(("127.0.0.1", 0))
    with pytest.raises(OSError) as info:
        s.listen()
    assert info.value.errno == errno.EINVAL
    assert select.select([s], [s], [], 0) == ([s], [s], [])
    assert s.connect_ex(refused_address()) == errno.ECONNABORTED
    s.listen()
    assert select.select([s], [s], [], 0) == ([], [], [])
    (address,) = [row.address for row in held(backend, fe) if row.id == s.id]
    with socket.create_connection(address, timeout=TIMEOUT):
        assert select.select([s], [s], [], TIMEOUT) == ([s], [], [])
        conn, _ = s.accept()
        conn.close()
    s.close()


# -- the rest, bounded stress ---------------------------------------------------------


def connect_slot(fe: pvcalls.Frontend, sock_id: int) -> bool:
    """Whether a CONNECT of ``sock_id`` still waits in the response table."""
    with fe._lock:
        return any(slot is not None and slot.sock_id == sock_id
                   and slot.cmd == _wire.PVCALLS_CONNECT for slot in fe._slots)


@pytest.mark.parametrize("answer", ["never", "before its release"])
def test_a_socket_dropped_while_connecting_is_released(
        fe: pvcalls.Frontend, host: SimHost, backend: pvcalls.Backend, echo_server: Any,
        monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    """A socket dropped unclosed while its CONNECT waits for a silent peer
    is garbage at once, as any dropped socket: the CONNECT's callback held
    it, and with it its two descriptors, its ring and the backend's socket,
    until the peer answered (maybe never) or Frontend.close().  Its RELEASE
    cuts the CONNECT short, and that answer (-EINTR), or the peer's if it
    came before the release, is taken with no warning; the ring goes back
    to the pool, and nothing else of the socket is left."""
    with fe.socket() as warm:  # a pooled ring: the dropped socket reuses it
        warm.settimeout(TIMEOUT)
        warm.connect(echo_server.address)
    wait_until(lambda: settled(fe) and len(fe._ring_pool) == 1)
    shared = host.hypervisor.stats()
    if answer != "never":
        monkeypatch.setattr(fe, "_start_reaper", lambda _: None)  # the reaper is late
    with unanswered_listener() as (address, make_room):
        s = start_connect(fe, address)
        s.fileno()
        readyfd = s._st.readyfd  # its two descriptors
        sock_id, ring, ref = s.id, s._st.ring, weakref.ref(s)
        assert readyfd is not None and connect_slot(fe, sock_id)
        with pytest.warns(ResourceWarning,
                          match=f"^unclosed <PVSocket id={sock_id:#x} connecting>$"):
            del s
            gc.collect()
        assert ref() is None
        if answer != "never":
            make_room()  # the next SYN retransmission connects
            wait_until(lambda: not connect_slot(fe, sock_id))
            assert [r.id for r in held(backend, fe)] == [sock_id]
            monkeypatch.undo()
            assert fe._wakeup is not None
            fe._wakeup.set()  # the reaper's turn
        wait_until(lambda: not held(backend, fe))
        wait_until(lambda: settled(fe) and fe._ring_pool == [ring])
        assert readyfd.user.fileno() == readyfd.ours.fileno() == -1
        assert all(host.hypervisor.stats()[k] <= shared[k] for k in ("grants", "ports"))


def test_closing_the_frontend_with_connects_in_flight(
        host: SimHost, backend: pvcalls.Backend, caplog: pytest.LogCaptureFixture) -> None:
    """Frontend.close() with CONNECTs in flight, some of their sockets
    dropped unclosed, others waited for: every one is released, the
    waiters fail, nothing is left (checked by frontend())."""
    with unanswered_listener() as (address, _):
        with frontend(host, backend, caplog) as fe:
            kept = [start_connect(fe, address) for _ in range(12)]
            for _ in range(8):
                start_connect(fe, address).fileno()  # dropped
            kept[0].settimeout(None)  # with a timeout, connect() says EALREADY at once
            waiting = Call(lambda: kept[0].connect(address))
            wait_until(lambda: bool(kept[0]._cond._waiters))  # type: ignore[attr-defined]
            closing = Call(fe.close)
            assert waiting.oserror().errno in (errno.EBADF, errno.ENOTCONN)
            assert closing.join().error is None
            for s in kept:
                assert s.closed
                assert s.fileno() == -1


def test_many_threads_connect_non_blocking_and_close_at_any_time(
        fe: pvcalls.Frontend, backend: pvcalls.Backend, echo_server: Any) -> None:
    """200 non-blocking connects from 8 threads to answering, refusing and
    silent peers, each closed before its answer, racing with it (from
    another thread), after it (selectors, SO_ERROR, exact echo) or dropped
    unclosed, with fileno() asked for or not."""
    threads, per_thread = 8, 25
    echo = echo_server
    refused = refused_address()
    outcomes: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        rnd = random.Random(n)
        for i in range(per_thread):
            kind = rnd.choice(["echo", "refused", "silent"])
            how = rnd.choice(["before", "racing", "after", "drop"])
            address = {"echo": echo.address, "refused": refused, "silent": silent}[kind]
            try:
                s = fe.socket()
                if rnd.random() < 0.5:
                    s.fileno()
                s.setblocking(False)
                try:
                    s.connect(address)
                except BlockingIOError as exc:
                    assert exc.errno == errno.EINPROGRESS, exc
                if how == "before":
                    s.close()
                elif how == "racing":
                    closer = threading.Thread(target=s.close)
                    closer.start()
                    with contextlib.suppress(OSError):
                        s.getsockopt(SOL, SO_ERROR)
                    closer.join(TIMEOUT)
                    assert s.closed
                elif how == "after" and kind == "silent":
                    assert not wait_writable(s, 0.01)
                    assert s.connect_ex(address) == errno.EALREADY
                    s.close()
                elif how == "after":
                    assert wait_writable(s)
                    err = s.getsockopt(SOL, SO_ERROR)
                    if kind == "refused":
                        assert err == errno.ECONNREFUSED
                    else:
                        assert err == 0
                        s.settimeout(TIMEOUT)
                        payload = b"%d:%d " % (n, i) * (i + 1)
                        s.sendall(payload)
                        got = b""
                        while len(got) < len(payload):
                            chunk = s.recv(len(payload) - len(got))
                            assert chunk
                            got += chunk
                        assert got == payload
                    s.close()
                del s
                with lock:
                    outcomes[f"{kind} {how}"] += 1
            except BaseException as exc:
                errors.append(exc)
                return

    with unanswered_listener() as (silent, _), warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
            assert not t.is_alive()
        assert errors == []
        assert sum(outcomes.values()) == threads * per_thread
    wait_until(lambda: settled(fe) and not held(backend, fe))


def test_asyncio_connects_timeouts_and_cancellations(
        fe: pvcalls.Frontend, backend: pvcalls.Backend, echo_server: Any) -> None:
    """Many concurrent loop.sock_connect() on the default (selector) loop:
    those to a silent peer end in asyncio.wait_for's timeout or are
    cancelled, refused ones raise ConnectionRefusedError, the others carry
    an exact echo with sock_sendall and sock_recv."""
    echo = echo_server
    refused = refused_address()

    async def one(n: int, kind: str, address: tuple[str, int]) -> str:
        loop = asyncio.get_running_loop()
        s = fe.socket()
        s.setblocking(False)
        try:
            if kind == "silent":
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(loop.sock_connect(s, address), 0.05 * (n % 4))
                return "timed out"
            if kind == "cancelled":
                task = asyncio.ensure_future(loop.sock_connect(s, address))
                await asyncio.sleep(0.01 * (n % 3))
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                return "cancelled"
            if kind == "refused":
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.wait_for(loop.sock_connect(s, address), TIMEOUT)
                return "refused"
            await asyncio.wait_for(loop.sock_connect(s, address), TIMEOUT)
            payload = os.urandom(1000 * (n % 50) + 1)
            await loop.sock_sendall(s, payload)
            got = bytearray()
            while len(got) < len(payload):
                chunk = await asyncio.wait_for(loop.sock_recv(s, 65536), TIMEOUT)
                assert chunk
                got += chunk
            assert got == payload
            return "echoed"
        finally:
            s.close()

    async def main(silent: tuple[str, int]) -> Counter[str]:
        kinds = ["echo", "refused", "silent", "cancelled"]
        addresses = {"echo": echo.address, "refused": refused, "silent": silent,
                     "cancelled": silent}
        results: Counter[str] = Counter()
        for _ in range(4):  # waves of 24: each wave's silent ones hold entries till closed
            wave = [one(n, kinds[n % 4], addresses[kinds[n % 4]]) for n in range(24)]
            results.update(await asyncio.gather(*wave))
        return results

    with unanswered_listener() as (silent, _):
        results = asyncio.run(main(silent))
    assert results == {"echoed": 24, "refused": 24, "timed out": 24, "cancelled": 24}
    wait_until(lambda: settled(fe) and not held(backend, fe))

