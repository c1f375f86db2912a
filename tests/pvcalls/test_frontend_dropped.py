"""A PVSocket the program drops without close() is released, as a
socket.socket closes itself: with a ResourceWarning, its RELEASE sent by
the frontend, its place in the domain's socket limit free again."""

from __future__ import annotations

import errno
import gc
import socket
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pvcalls_rawfront import Call, hold_accepts, wait_until

import pvcalls
from pvcalls._policy import Policy
from pvcalls.frontend._socket import ReadyFd
from xenback.sim import SimHost

TIMEOUT = 10.0

# Two sockets at most: a dropped socket that kept its place would show.
POLICY = """
[default]
max_sockets = 2
"""


@pytest.fixture(scope="module")
def host() -> Iterator[SimHost]:
    with SimHost() as h:
        yield h


@pytest.fixture(scope="module")
def backend(host: SimHost) -> Iterator[pvcalls.Backend]:
    with pvcalls.Backend(host.dom0, max_ioworkers=1, policy=Policy.from_toml(POLICY)) as b:
        yield b


@pytest.fixture(scope="module")
def fe(host: SimHost, backend: pvcalls.Backend) -> Iterator[pvcalls.Frontend]:
    with pvcalls.Frontend(host.create_domain("dropping"), timeout=TIMEOUT) as f:
        yield f


@pytest.fixture(autouse=True)
def _nothing_left(fe: pvcalls.Frontend, backend: pvcalls.Backend) -> Iterator[None]:
    yield
    # Each test leaves the domain's two places free for the next.
    wait_until(lambda: not held(backend, fe))


def held(backend: pvcalls.Backend, fe: pvcalls.Frontend) -> set[int]:
    """The ids of the sockets the backend keeps for ``fe``'s domain."""
    return {row.id for row in backend.stats().sockets if row.domain == fe.domain.domid}


def listen_address(backend: pvcalls.Backend, sock_id: int) -> tuple[str, int]:
    """Where the backend listens for the passive socket ``sock_id``."""
    for row in backend.stats().sockets:
        if row.id == sock_id and row.address is not None:
            return row.address
    raise AssertionError(f"no passive socket {sock_id:#x} in backend stats")


def drop(box: list[Any], state: str) -> int:
    """Drop the only reference to the socket in ``box``: the finaliser
    says ``unclosed <PVSocket id=... state>``.  Returns its id."""
    sock_id: int = box[0].id
    with pytest.warns(ResourceWarning, match=f"^unclosed <PVSocket id={sock_id:#x} {state}>$"):
        box.clear()
        gc.collect()
    return sock_id


def quiet_drop(box: list[Any]) -> None:
    """Drop the reference in ``box``: no ResourceWarning (the socket
    stays, or was closed)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        box.clear()
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def test_a_dropped_connected_socket_is_released_and_its_place_freed(
        fe: pvcalls.Frontend, backend: pvcalls.Backend, echo_server: Any) -> None:
    """The domain's limit reached, one socket dropped while connected: it
    warns, the backend lets go of it, its ring comes back to the frontend
    for reuse (the backend answered the RELEASE), and a new socket can be
    made."""
    s = fe.socket()
    s.settimeout(TIMEOUT)
    s.connect(echo_server.address)
    pooled = len(fe._ring_pool)
    other = fe.socket()
    try:
        with pytest.raises(OSError) as info:
            fe.socket()
        assert info.value.errno == errno.EMFILE
        box = [s]
        del s
        sock_id = drop(box, "active")
        assert all(sock.id != sock_id for sock in fe.sockets())
        wait_until(lambda: sock_id not in held(backend, fe))
        wait_until(lambda: len(fe._ring_pool) > pooled)
        with fe.socket() as again:  # its place is free
            again.settimeout(TIMEOUT)
            again.connect(echo_server.address)
            again.sendall(b"ping")
            assert again.recv(4) == b"ping"
    finally:
        other.close()


@pytest.mark.parametrize("state", ["new", "bound", "listening"])
def test_a_dropped_socket_is_released_whatever_it_was(
        fe: pvcalls.Frontend, backend: pvcalls.Backend, state: str) -> None:
    s = fe.socket()
    if state != "new":
        s.bind(("127.0.0.1", 0))
    if state == "listening":
        s.listen()
        s.fileno()  # a POLL in flight, answered (or not) after the socket went
    assert s.id in held(backend, fe)
    box = [s]
    del s
    sock_id = drop(box, state)
    wait_until(lambda: sock_id not in held(backend, fe))
    wait_until(lambda: not fe._releases)


def test_a_dropped_socket_whose_descriptor_failed_to_close_is_released_and_said_so(
        fe: pvcalls.Frontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Closing the descriptor fileno() gave a dropped socket fails (EBADF:
    the program closed it): the reaper releases the socket all the same,
    then says why, as close() would have raised it."""
    s = fe.socket()
    s.fileno()
    readyfd = s._st.readyfd
    assert readyfd is not None
    close = ReadyFd.close

    def closed_by_the_program(fd: ReadyFd) -> None:
        close(fd)
        if fd is readyfd:
            # Not closed for real before: another thread may reuse its number.
            raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(ReadyFd, "close", closed_by_the_program)
    box = [s]
    del s
    sock_id = drop(box, "new")
    wait_until(lambda: sock_id not in held(backend, fe))
    wait_until(lambda: any(r.exc_info is not None and "releasing dropped socket" in r.getMessage()
                           for r in caplog.records))
    [said] = [r for r in caplog.records if "releasing dropped socket" in r.getMessage()]
    assert said.getMessage() == f"pvcalls frontend: releasing dropped socket {sock_id:#x}"
    assert said.exc_info is not None and isinstance(said.exc_info[1], OSError)
    assert said.exc_info[1].errno == errno.EBADF


def test_the_warning_of_a_dropped_socket_points_at_the_code_that_dropped_it(
        fe: pvcalls.Frontend, backend: pvcalls.Backend) -> None:
    """As socket.socket's ResourceWarning, it is said where the program
    dropped the socket: not in the frontend, nor in weakref's finalize
    that calls it."""
    box = [fe.socket()]
    sock_id = box[0].id
    with pytest.warns(ResourceWarning, match="^unclosed <PVSocket") as caught:
        box.clear()
        gc.collect()
    assert [w.filename for w in caught] == [__file__]
    wait_until(lambda: sock_id not in held(backend, fe))


def test_the_finaliser_takes_no_lock(fe: pvcalls.Frontend, backend: pvcalls.Backend) -> None:
    """The last reference goes in a thread that holds the frontend's lock
    (as the event thread does while it reads answers) and the socket's
    own: the finaliser runs there and then, so it must not wait for any
    of them (it would wait for ever: none is reentrant)."""
    box = [fe.socket()]
    sock = box[0]
    locks = [fe._lock, sock._cond, sock._recv_lock, sock._send_lock, sock._accept_lock]
    sock_id = sock.id
    del sock
    ran = threading.Event()

    def drop_holding_the_locks() -> None:
        for lock in locks:
            lock.acquire()
        try:
            box.clear()
            gc.collect()
            ran.set()
        finally:
            for lock in reversed(locks):
                lock.release()

    with pytest.warns(ResourceWarning, match=f"unclosed <PVSocket id={sock_id:#x} new>"):
        Call(drop_holding_the_locks).join()
    assert ran.is_set()
    wait_until(lambda: sock_id not in held(backend, fe))


def test_a_dropped_accepted_socket_is_released(
        fe: pvcalls.Frontend, backend: pvcalls.Backend) -> None:
    with fe.socket() as ls:
        ls.settimeout(TIMEOUT)
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        with socket.create_connection(listen_address(backend, ls.id), timeout=TIMEOUT) as client:
            box = [ls.accept()[0]]
            sock_id = drop(box, "active")
            wait_until(lambda: sock_id not in held(backend, fe))
            client.settimeout(TIMEOUT)
            assert client.recv(10) == b""  # the RELEASE closed the host socket


def test_a_listener_a_thread_waits_in_is_not_collected(
        fe: pvcalls.Frontend, backend: pvcalls.Backend) -> None:
    """The program drops its listener while a thread waits in its accept():
    that thread holds the socket, which stays and accepts."""
    ls = fe.socket()
    ls.settimeout(TIMEOUT)
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    address = listen_address(backend, ls.id)
    acceptor = Call(ls.accept)
    cond = ls._cond
    alive = weakref.ref(ls)
    box = [ls]
    del ls
    wait_until(lambda: bool(cond._waiters))  # type: ignore[attr-defined]
    quiet_drop(box)
    listener = alive()  # the program's again, to close it in the end
    assert listener is not None and not listener.closed
    with socket.create_connection(address, timeout=TIMEOUT):
        conn, _ = acceptor.join().result
    conn.close()
    listener.close()


def test_a_socket_offered_by_an_accept_in_flight_goes_with_its_listener(
        fe: pvcalls.Frontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """An accept() that timed out left its ACCEPT in flight: the socket it
    offers is the listener's (no warning of its own, not in sockets());
    dropped with the listener, both are released."""
    given_up = hold_accepts(monkeypatch)
    box = [fe.socket()]
    ls = box[0]
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    ls.setblocking(False)
    # Before the connection: a POLL answered at once could come before
    # accept() looks, which would then send the ACCEPT itself.
    with pytest.raises(BlockingIOError):
        ls.accept()  # its POLL goes out
    with socket.create_connection(listen_address(backend, ls.id), timeout=TIMEOUT):
        wait_until(lambda: box[0]._poll_ready)
        ls.settimeout(0.05)  # non-blocking, it would wait for the answer
        with pytest.raises(TimeoutError):
            ls.accept()  # its ACCEPT goes out
        given_up.set()
        assert ls._st.accept_inflight is not None
        _, slot, new = ls._st.accept_inflight
        offered = weakref.ref(new)
        new_id = new.id
        del new, ls
        wait_until(lambda: slot.done)  # the backend made the new socket
        assert new_id in held(backend, fe)
        assert all(sock.id != new_id for sock in fe.sockets())
        drop(box, "listening")  # the one warning: not the offered socket's
        wait_until(lambda: not held(backend, fe))
        wait_until(lambda: offered() is None)


def test_a_socket_with_an_open_makefile_stream_stays(
        fe: pvcalls.Frontend, backend: pvcalls.Backend, echo_server: Any) -> None:
    """The stream holds the socket, as with socket.socket: the socket goes
    (unclosed, so with a warning) only when the stream closes."""
    s = fe.socket()
    s.settimeout(TIMEOUT)
    s.connect(echo_server.address)
    sock_id = s.id
    stream = s.makefile("rwb")
    box = [s]
    del s
    quiet_drop(box)
    stream.write(b"line\n")
    stream.flush()
    assert stream.readline() == b"line\n"
    with pytest.warns(ResourceWarning, match=f"unclosed <PVSocket id={sock_id:#x} active>"):
        stream.close()
        del stream
        gc.collect()
    wait_until(lambda: sock_id not in held(backend, fe))


def test_a_closed_socket_dropped_is_no_warning(fe: pvcalls.Frontend) -> None:
    s = fe.socket()
    s.close()
    quiet_drop([s])


@pytest.fixture
def own_frontend(host: SimHost,
                 backend: pvcalls.Backend) -> Iterator[Callable[[str], pvcalls.Frontend]]:
    """own_frontend(name): an open frontend of a domain of its own."""
    made: list[pvcalls.Frontend] = []

    def make(name: str) -> pvcalls.Frontend:
        f = pvcalls.Frontend(host.create_domain(name), timeout=TIMEOUT)
        made.append(f)
        f.open()
        return f

    yield make
    for f in made:
        f.close()


def test_a_socket_dropped_after_its_frontend_closed_is_no_error(
        own_frontend: Callable[[str], pvcalls.Frontend]) -> None:
    """Frontend.close() released the socket: dropping it later does
    nothing (and says nothing: it is closed)."""
    f = own_frontend("closed-first")
    s = f.socket()
    s.bind(("127.0.0.1", 0))
    f.close()
    assert s.closed
    quiet_drop([s])


def test_a_socket_dropped_after_the_backend_left_is_freed() -> None:
    """The frontend is dead (its backend went): the dropped socket's ring
    is freed with no RELEASE to send, and nothing of it stays shared."""
    with SimHost() as host, socket.create_server(("127.0.0.1", 0)) as server:
        backend = pvcalls.Backend(host.dom0, max_ioworkers=1)
        try:
            with pvcalls.Frontend(host.create_domain("orphaned"), timeout=TIMEOUT) as f:
                idle = host.hypervisor.stats()
                s = f.socket()
                s.settimeout(TIMEOUT)
                s.connect(server.getsockname())
                backend.close()
                wait_until(lambda: f._dead)
                box = [s]
                del s
                drop(box, "active")
                wait_until(lambda: not f._sockets)
                wait_until(lambda: all(n <= idle[k] for k, n in host.hypervisor.stats().items()))
        finally:
            backend.close()


def test_frontend_close_releases_what_the_reaper_has_not(
        host: SimHost, backend: pvcalls.Backend,
        own_frontend: Callable[[str], pvcalls.Frontend],
        monkeypatch: pytest.MonkeyPatch, echo_server: Any) -> None:
    """A socket dropped just before Frontend.close(), whose release has not
    started: close() sends its RELEASE, and leaves nothing shared."""
    before = host.hypervisor.stats()
    f = own_frontend("closing-with-one-dropped")
    monkeypatch.setattr(f, "_start_reaper", lambda _: None)  # the reaper is late
    box = [f.socket()]
    box[0].settimeout(TIMEOUT)
    box[0].connect(echo_server.address)
    sock_id = drop(box, "active")
    assert sock_id in held(backend, f)
    f.close()
    wait_until(lambda: sock_id not in held(backend, f))
    # What it shared is unshared (its domain stays, with nothing of it).
    wait_until(lambda: all(host.hypervisor.stats()[k] <= before[k] for k in ("grants", "ports")))


def test_a_socket_made_while_frontend_close_runs_is_released_by_it(
        host: SimHost, backend: pvcalls.Backend,
        own_frontend: Callable[[str], pvcalls.Frontend],
        monkeypatch: pytest.MonkeyPatch, echo_server: Any) -> None:
    """Another thread makes and connects a socket after Frontend.close()
    looked at its sockets, before it ended the connection: close() releases
    it all the same.  Left to a finaliser that runs after close() (with no
    event thread to start the reaper), its state would stay in the table
    across open(), which empties the queue of dropped sockets, and its ring
    would stay shared."""
    before = host.hypervisor.stats()
    f = own_frontend("making-while-closing")
    late: list[Any] = []
    wait_releases = f._wait_releases

    def a_thread_makes_a_socket_meanwhile() -> None:
        s = f.socket()
        s.settimeout(TIMEOUT)
        s.connect(echo_server.address)
        late.append(s)
        wait_releases()

    monkeypatch.setattr(f, "_wait_releases", a_thread_makes_a_socket_meanwhile)
    f.close()
    monkeypatch.undo()
    assert late and late[0].closed
    assert not f._sockets
    quiet_drop(late)  # closed: no warning, nothing queued
    assert not f._dropped
    wait_until(lambda: all(host.hypervisor.stats()[k] <= before[k] for k in ("grants", "ports")))
    f.open()
    assert not f._sockets


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_the_last_reference_going_in_the_event_thread(
        fe: pvcalls.Frontend, backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event thread holds a listener while it hands it a POLL's answer,
    and the program drops it meanwhile: the finaliser runs in the event
    thread, which wakes itself, and the listener is released."""
    in_poll = threading.Event()
    go_on = threading.Event()
    on_poll = pvcalls.PVSocket._on_poll

    def slow_on_poll(self: pvcalls.PVSocket, ret: int) -> None:
        on_poll(self, ret)
        in_poll.set()
        go_on.wait(TIMEOUT)

    monkeypatch.setattr(pvcalls.PVSocket, "_on_poll", slow_on_poll)
    box = [fe.socket()]
    box[0].bind(("127.0.0.1", 0))
    box[0].listen()
    box[0].fileno()  # a POLL in flight
    sock_id = box[0].id
    alive = weakref.ref(box[0])
    with socket.create_connection(listen_address(backend, sock_id), timeout=TIMEOUT):
        assert in_poll.wait(TIMEOUT)
        box.clear()
        assert alive() is not None  # the event thread's now
        go_on.set()
        wait_until(lambda: alive() is None)
        wait_until(lambda: sock_id not in held(backend, fe))
    wait_until(lambda: not fe._sockets and not fe._dropped and not fe._releases)
