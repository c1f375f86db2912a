"""A PVSocket does what a TCP socket.socket does: each test runs the same
steps on a loopback TCP socket and on a PVSocket (``kind``), so that the
expectation is the real socket's, quirks of CPython's included.  What PV
Calls cannot do is tested at the end, for its error."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import select
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from pvcalls_rawfront import Call, wait_until
from test_frontend import recv_exactly

import pvcalls
from xenback.sim import SimHost

TIMEOUT = 10.0

PEEK, DONTWAIT, WAITALL = socket.MSG_PEEK, socket.MSG_DONTWAIT, socket.MSG_WAITALL


@pytest.fixture(scope="module")
def host() -> Iterator[SimHost]:
    with SimHost() as h:
        yield h


@pytest.fixture(scope="module")
def fe(host: SimHost) -> Iterator[pvcalls.Frontend]:
    with pvcalls.Backend(host.dom0, max_ioworkers=1), \
            pvcalls.Frontend(host.create_domain("parity"), timeout=TIMEOUT) as f:
        yield f


@pytest.fixture(params=["real", "pv"])
def make(request: pytest.FixtureRequest, fe: pvcalls.Frontend) -> Iterator[Callable[[], Any]]:
    """make(): a new unconnected socket of the kind under test."""
    made: list[Any] = []

    def new() -> Any:
        s = socket.socket() if request.param == "real" else fe.socket()
        made.append(s)
        return s

    yield new
    for s in made:
        s.close()


def _fails_as_cpythons(call: Callable[[Any], Any], s: Any,
                       kind: type[Exception] = Exception) -> None:
    """``call`` fails on ``s`` as on a new socket of CPython's: with the same
    exception (of ``kind``, and no OSError: refused before any system
    call) and message."""
    with socket.socket() as real, pytest.raises(kind) as expected:
        call(real)
    assert not isinstance(expected.value, OSError), expected.value
    with pytest.raises(type(expected.value)) as got:
        call(s)
    assert str(got.value) == str(expected.value)


@pytest.fixture
def pair(make: Callable[[], Any]) -> Iterator[tuple[Any, socket.socket]]:
    """A connected socket of the kind under test, and its peer on the host."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        c = make()
        c.settimeout(TIMEOUT)
        c.connect(listener.getsockname())
        listener.settimeout(TIMEOUT)
        peer, _ = listener.accept()
    with peer:
        peer.settimeout(TIMEOUT)
        yield c, peer


def wait_readable(s: Any) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(s, selectors.EVENT_READ)
        assert sel.select(TIMEOUT), "never readable"


def arrived(c: Any, data: bytes) -> None:
    """Wait until ``data`` is all in ``c``, unread."""
    timeout = c.gettimeout()
    c.settimeout(None)
    try:
        assert c.recv(len(data), PEEK | WAITALL) == data
    finally:
        c.settimeout(timeout)


# -- recv and send flags ---------------------------------------------------------------


def _refused_address() -> tuple[str, int]:
    """A loopback address nobody listens on: a port bound, never listened on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()


def _refused_with_a_timeout(make: Callable[[], Any]) -> tuple[Any, tuple[str, int]]:
    """A socket made by ``make`` whose connect() with a timeout was
    refused, and the address that refused it."""
    refused = _refused_address()
    s = make()
    s.settimeout(TIMEOUT)
    with pytest.raises(ConnectionRefusedError):
        s.connect(refused)
    return s, refused


def test_msg_peek_leaves_the_data_to_the_next_recv(pair: tuple[Any, socket.socket]) -> None:
    c, peer = pair
    peer.sendall(b"abc")
    c.settimeout(None)
    assert c.recv(3, PEEK | WAITALL) == b"abc"
    assert c.recv(2, PEEK) == b"ab"
    buf = bytearray(5)
    assert c.recv_into(buf, 0, PEEK) == 3 and buf[:3] == b"abc"
    assert c.recv(10) == b"abc"
    peer.close()
    assert c.recv(10, PEEK) == b""
    assert c.recv(10) == b""


def test_msg_dontwait_makes_one_call_non_blocking(pair: tuple[Any, socket.socket]) -> None:
    """Only in blocking mode: with a timeout, CPython waits for readiness
    whatever the flags say, and the call times out."""
    c, peer = pair
    c.settimeout(None)
    with pytest.raises(BlockingIOError):
        c.recv(10, DONTWAIT)
    with pytest.raises(BlockingIOError):
        c.recv_into(bytearray(10), 0, DONTWAIT)
    peer.sendall(b"xy")
    wait_readable(c)
    assert c.recv(10, DONTWAIT) == b"xy"
    assert c.gettimeout() is None  # the socket's mode is unchanged
    assert c.send(b"z", DONTWAIT) == 1
    assert recv_exactly(peer, 1) == b"z"
    c.settimeout(0.05)
    with pytest.raises(TimeoutError):
        c.recv(10, DONTWAIT)


def test_msg_dontwait_send_on_a_full_socket(pair: tuple[Any, socket.socket]) -> None:
    c, peer = pair
    c.settimeout(None)
    chunk = bytes(65536)
    sent = 0
    with pytest.raises(BlockingIOError):
        for _ in range(10_000):  # the peer reads nothing: buffers fill
            sent += c.send(chunk, DONTWAIT)
    assert sent > 0
    # sendall() too, as soon as it would wait (for more than any buffer holds).
    sending = Call(lambda: c.sendall(bytes(64 << 20), DONTWAIT)).join()
    assert isinstance(sending.error, BlockingIOError), sending.error


def test_msg_waitall_waits_for_all_in_blocking_mode(pair: tuple[Any, socket.socket]) -> None:
    c, peer = pair
    c.settimeout(None)
    peer.sendall(b"ab")
    wait_readable(c)
    receiving = Call(lambda: c.recv(4, WAITALL))  # with "ab" there: it waits for more
    peer.sendall(b"cd")
    assert receiving.join().result == b"abcd"
    # With a timeout, CPython's recv() returns what is there.
    peer.sendall(b"gh")
    arrived(c, b"gh")
    c.settimeout(3600.0)  # returns at once: waiting out the timeout fails the join
    assert Call(lambda: c.recv(10, WAITALL)).join().result == b"gh"
    c.setblocking(False)
    with pytest.raises(BlockingIOError):
        c.recv(10, WAITALL)
    # The end of the stream ends the wait with what came.
    c.settimeout(None)
    peer.sendall(b"ef")
    peer.close()
    assert Call(lambda: c.recv(10, PEEK | WAITALL)).join().result == b"ef"  # a peek too
    assert c.recv(10, WAITALL) == b"ef"
    assert c.recv(10, WAITALL) == b""


def test_a_blocking_send_sends_all(pair: tuple[Any, socket.socket]) -> None:
    """In blocking mode send() waits for room for every byte, as the
    kernel's does: a program that ignores its count loses nothing.  (With
    a timeout, socket.socket's sends what fits.)"""
    c, peer = pair
    c.settimeout(None)
    data = os.urandom(1 << 20)  # far more than socket buffers or rings hold
    reading = Call(lambda: recv_exactly(peer, len(data)))
    assert c.send(data) == len(data)
    assert reading.join().result == data


def test_send_flags_that_change_nothing_on_tcp(pair: tuple[Any, socket.socket]) -> None:
    c, peer = pair
    assert c.send(b"a", socket.MSG_NOSIGNAL) == 1
    assert c.send(b"b", socket.MSG_MORE) == 1  # a hint: the next send flushes
    c.sendall(b"c", socket.MSG_NOSIGNAL)
    assert recv_exactly(peer, 3) == b"abc"


# -- the peer ------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["recv", "send", "SO_ERROR"])
def test_a_reset_is_reported_once_then_the_connection_is_gone(
        pair: tuple[Any, socket.socket], first: str) -> None:
    """The first call after the peer's reset raises ConnectionResetError,
    whichever it is (or SO_ERROR says ECONNRESET); then recv() is at the
    end of the stream and send() fails with EPIPE, as nothing can reach
    the peer any more, and there is no peer name."""
    c, peer = pair
    c.sendall(b"x")
    assert peer.recv(1) == b"x"
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # with SO_LINGER 0: a reset
    wait_readable(c)
    with pytest.raises(OSError) as info:
        c.getpeername()
    assert info.value.errno == errno.ENOTCONN
    if first == "SO_ERROR":
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    else:
        with pytest.raises(ConnectionResetError):
            if first == "recv":
                c.recv(10)
            else:
                c.send(b"y")
    for _ in range(2):
        assert c.recv(10) == b""
        with pytest.raises(BrokenPipeError):
            c.send(b"z")
        with pytest.raises(BrokenPipeError):
            c.sendall(b"")


@pytest.mark.parametrize("first", ["send", "SO_ERROR"])
def test_a_reset_after_the_peers_fin_is_seen_before_a_send(
        pair: tuple[Any, socket.socket], first: str) -> None:
    """A reset after the peer's end of the stream: recv() stays at the
    end (no error), but the connection is gone, with no peer name, and
    the first send() fails with EPIPE, not taking the data (SO_ERROR says
    EPIPE once instead).  A PVSocket knows it only when the backend tells
    it (it once took the send, and learnt only when the backend failed
    to pass it on)."""
    c, peer = pair
    peer.shutdown(socket.SHUT_WR)
    assert c.recv(10) == b""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # with SO_LINGER 0: a reset
    deadline = time.monotonic() + TIMEOUT
    while True:  # the pv world hears of it through the backend: no call to wait in
        try:
            c.getpeername()
        except OSError as exc:
            assert exc.errno == errno.ENOTCONN
            break
        assert time.monotonic() < deadline, "the reset was never seen"
        time.sleep(0.001)
    assert c.recv(10) == b""
    if first == "SO_ERROR":
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.EPIPE
        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    for _ in range(2):
        with pytest.raises(BrokenPipeError):
            c.send(b"z")
        assert c.recv(10) == b""


def test_shutdown_after_a_reset_says_not_connected(pair: tuple[Any, socket.socket]) -> None:
    """Once the peer reset the connection, it is gone: shutdown() fails
    with ENOTCONN, as on any socket not connected, and leaves the error
    for the next call to report."""
    c, peer = pair
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    wait_readable(c)
    for how in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
        with pytest.raises(OSError) as info:
            c.shutdown(how)
        assert info.value.errno == errno.ENOTCONN
    with pytest.raises(ConnectionResetError):
        c.recv(1)


# -- the rest of socket.socket's calls -------------------------------------------------


@pytest.mark.parametrize("timeout", [None, TIMEOUT])
def test_connect_again_after_a_connect(make: Callable[[], Any], timeout: float | None) -> None:
    """With a timeout, CPython's connect() is a non-blocking connect and a
    wait for the handshake, which leaves Linux's socket connecting: the
    next connect() completes it and succeeds (connect_ex() returns 0)
    once, as after a non-blocking connect(), and only then is the socket
    connected (EISCONN).  A blocking connect() leaves it connected."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = listener.getsockname()
        s = make()
        s.settimeout(timeout)
        s.connect(address)
        if timeout is not None:
            assert s.connect_ex(address) == 0
        assert s.connect_ex(address) == errno.EISCONN
        with pytest.raises(OSError) as info:
            s.connect(address)
        assert info.value.errno == errno.EISCONN


@pytest.mark.parametrize("reported", [False, True])
def test_connect_again_after_a_reset_raises_it(make: Callable[[], Any], reported: bool) -> None:
    """The connect() that completes a connect() with a timeout (see
    above) reports the reset that came meanwhile, or ECONNABORTED if a
    call has reported it already.  That leaves the socket unconnected:
    recv() fails with ENOTCONN, not at the end of the stream as after a
    reset that recv() or send() reported."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = listener.getsockname()
        s = make()
        s.settimeout(TIMEOUT)
        s.connect(address)
        peer, _ = listener.accept()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    wait_readable(s)
    if reported:
        with pytest.raises(ConnectionResetError):
            s.recv(1)
    with pytest.raises(ConnectionAbortedError if reported else ConnectionResetError):
        s.connect(address)
    with pytest.raises(OSError) as info:
        s.recv(1)
    assert info.value.errno == errno.ENOTCONN
    with pytest.raises(BrokenPipeError):
        s.send(b"z")


def test_connect_again_after_a_refused_connect_with_a_timeout(make: Callable[[], Any]) -> None:
    """A refused connect() with a timeout leaves Linux's socket
    connecting, as a successful one does (above): CPython took the
    refusal from SO_ERROR, so the next connect() finds the attempt over
    with no error and fails with ECONNABORTED, once; the one after that
    connects.  Meanwhile select() finds the socket readable and writable."""
    s, refused = _refused_with_a_timeout(make)
    assert select.select([s], [s], [], TIMEOUT)[:2] == ([s], [s])
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    assert s.connect_ex(refused) == errno.ECONNABORTED
    assert s.connect_ex(refused) == errno.ECONNREFUSED
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with pytest.raises(ConnectionAbortedError):
            s.connect(listener.getsockname())
        s.connect(listener.getsockname())
        assert s.getpeername() == listener.getsockname()


def test_bind_after_a_refused_connect_with_a_timeout_leaves_it_to_report(
        make: Callable[[], Any]) -> None:
    """A refused connect() with a timeout leaves Linux's socket connecting
    (above).  bind() succeeds (the handshake left the port), but listen()
    fails with EINVAL, as on any socket still connecting, until the next
    connect() has failed with ECONNABORTED: bind() does not take that
    report away."""
    s, refused = _refused_with_a_timeout(make)
    with pytest.raises(OSError) as info:
        s.listen()  # EINVAL before bind() too, not bind()'s want
    assert info.value.errno == errno.EINVAL
    s.bind(("127.0.0.1", 0))
    for _ in range(2):
        with pytest.raises(OSError) as info:
            s.listen()
        assert info.value.errno == errno.EINVAL
    assert select.select([s], [s], [], TIMEOUT)[:2] == ([s], [s])
    assert s.connect_ex(refused) == errno.ECONNABORTED


def test_bind_after_a_refused_nonblocking_connect_leaves_its_error_to_report(
        make: Callable[[], Any]) -> None:
    """A refused non-blocking connect() whose error nobody took (no
    SO_ERROR, no connect()): bind() leaves it, and the next connect()
    reports it, ECONNREFUSED (not the ECONNABORTED of an error taken);
    the one after starts over."""
    refused = _refused_address()
    s = make()
    s.setblocking(False)
    assert s.connect_ex(refused) == errno.EINPROGRESS
    assert select.select([], [s], [], TIMEOUT)[1] == [s]
    s.bind(("127.0.0.1", 0))
    assert s.connect_ex(refused) == errno.ECONNREFUSED
    assert s.connect_ex(refused) == errno.EINPROGRESS
    s.close()


def _ready(s: Any) -> tuple[bool, bool]:
    """Whether ``s`` polls (readable, writable) now."""
    readable, writable, _ = select.select([s], [s], [], 0)
    return bool(readable), bool(writable)


@contextlib.contextmanager
def _full_accept_queue() -> Iterator[tuple[socket.socket, Any]]:
    """A loopback listener whose accept queue is full (backlog 0, one
    connection queued), and its address.  Linux drops a SYN to it and
    sends it again a second later: a connect() there waits in its
    handshake until the queued connection is accepted (or, the listener
    closed, the SYN sent again is refused)."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        address = listener.getsockname()
        with socket.create_connection(address, timeout=TIMEOUT):  # the queue's one
            assert select.select([listener], [], [], TIMEOUT)[0]  # queued: full
            yield listener, address


@pytest.mark.parametrize("timeout", [None, TIMEOUT])
def test_a_socket_whose_connect_waits_for_the_handshake_polls_neither_way(
        make: Callable[[], Any], timeout: float | None) -> None:
    """While one thread's connect() waits for the handshake, a TCP socket
    polls neither readable nor writable (its recv() and send() would wait
    for the handshake), whatever another thread's select() asks; once
    connected, writable only.  The handshake is held up by a listener
    whose accept queue is full (Linux drops the SYN, and sends it again a
    second later), until the queued connection is accepted."""
    with _full_accept_queue() as (listener, address):
        s = make()
        s.settimeout(timeout)
        assert _ready(s) == (True, True)  # unconnected
        call = Call(lambda: s.connect(address))
        wait_until(lambda: _ready(s) != (True, True))  # the SYN is out
        assert _ready(s) == (False, False), "polls as the handshake"
        # Not woken meanwhile, a selector waiting either way.
        assert select.select([s], [s], [], 0.2)[:2] == ([], [])
        assert call.alive()
        listener.accept()[0].close()  # room: the SYN sent again gets in
        call.join()
        assert call.error is None, repr(call.error)
        assert _ready(s) == (False, True)
        listener.accept()[0].close()


@pytest.mark.parametrize("outcome", ["connected", "refused"])
@pytest.mark.parametrize("timeout", [None, TIMEOUT])
def test_a_connect_while_another_threads_waits_for_the_handshake(
        make: Callable[[], Any], timeout: float | None, outcome: str) -> None:
    """A second thread's connect() while a first one's waits for the
    handshake (held up as above).  With a timeout (CPython's connect()
    is a non-blocking one then, and a wait) it fails at once with
    EALREADY, and leaves the first one's to go on as if it had not come.
    In blocking mode Linux's waits for the handshake too, and reports
    its outcome: both return once connected; refused, one of the two
    fails with the refusal and the other with EPIPE (which one is the
    kernel's wake-up order: on Linux 6.18 the later), leaving the socket
    unconnected."""
    def connect_fails(s: Any, err: int) -> None:
        with pytest.raises(OSError) as info:
            s.connect(address)
        assert info.value.errno == err, info.value

    with _full_accept_queue() as (listener, address):
        s = make()
        s.settimeout(timeout)
        calls = [Call(lambda: s.connect(address))]
        wait_until(lambda: _ready(s) == (False, False))  # the SYN is out
        if timeout is None:
            calls.append(Call(lambda: s.connect(address)))
            # Still waiting, with the first, for the handshake.
            assert select.select([s], [s], [], 0.2)[:2] == ([], [])
            assert [c.alive() for c in calls] == [True, True]
        else:
            connect_fails(s, errno.EALREADY)
            assert s.connect_ex(address) == errno.EALREADY
            assert calls[0].alive()
        if outcome == "connected":
            listener.accept()[0].close()  # room: the SYN sent again gets in
        else:
            listener.close()  # the SYN sent again is refused
        errors = [c.join().error for c in calls]
        if outcome == "connected":
            assert errors == [None] * len(calls)
            if timeout is not None:
                s.connect(address)  # once more, as after any connect() with a timeout
            connect_fails(s, errno.EISCONN)
            return
    assert all(isinstance(e, OSError) for e in errors), errors
    said = sorted(e.errno for e in errors if isinstance(e, OSError))
    if timeout is None:
        assert said == sorted([errno.ECONNREFUSED, errno.EPIPE]), errors
    else:
        assert said == [errno.ECONNREFUSED], errors
        connect_fails(s, errno.ECONNABORTED)  # as after any refused connect() with a timeout
    connect_fails(s, errno.ECONNREFUSED)  # unconnected: it starts over
    assert _ready(s) == (True, True)


@pytest.mark.parametrize("timeout", [0.0, TIMEOUT, None])
def test_a_connect_after_a_nonblocking_one_still_in_its_handshake(
        make: Callable[[], Any], timeout: float | None) -> None:
    """connect() again while a non-blocking one's handshake is held up
    (as above): non-blocking, and also with a timeout (CPython's
    connect() is a non-blocking one then), it fails with EALREADY at
    once; in blocking mode it waits for the handshake and returns once
    connected, after which connect() fails with EISCONN."""
    with _full_accept_queue() as (listener, address):
        s = make()
        s.setblocking(False)
        with pytest.raises(BlockingIOError) as info:
            s.connect(address)
        assert info.value.errno == errno.EINPROGRESS
        s.settimeout(timeout)
        if timeout is None:
            call = Call(lambda: s.connect(address))
            assert select.select([s], [s], [], 0.2)[:2] == ([], [])
            assert call.alive()
            listener.accept()[0].close()  # room: the SYN sent again gets in
            assert call.join().error is None, repr(call.error)
        else:
            started = time.monotonic()
            with pytest.raises(BlockingIOError) as info:
                s.connect(address)
            assert info.value.errno == errno.EALREADY
            assert time.monotonic() - started < TIMEOUT / 2, "waited"
            listener.accept()[0].close()
            assert select.select([], [s], [], TIMEOUT)[1]
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            s.connect(address)  # completes it, as after any non-blocking one
        with pytest.raises(OSError) as failed:
            s.connect(address)
        assert failed.value.errno == errno.EISCONN
        listener.accept()[0].close()


def test_a_socket_neither_connected_nor_listening_polls_readable_and_writable(
        make: Callable[[], Any]) -> None:
    """Its recv() and send() fail at once (ENOTCONN; EPIPE, which PV
    Calls says ENOTCONN), and Linux's TCP polls it readable and writable
    (POLLHUP), new, bound, or refused.  Once connected, or listening, it
    polls as what it has become."""
    refused = _refused_address()
    s = make()
    assert _ready(s) == (True, True)
    with pytest.raises(ConnectionRefusedError):
        s.connect(refused)  # blocking: unconnected after it
    assert _ready(s) == (True, True)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        s.connect(listener.getsockname())
        assert _ready(s) == (False, True)
    bound = make()
    bound.bind(("127.0.0.1", 0))
    assert _ready(bound) == (True, True)
    bound.listen()
    assert _ready(bound) == (False, False)


def test_getsockopt_gives_plain_integers(make: Callable[[], Any]) -> None:
    """As the kernel's values: ``int``, not the socket module's enums
    (whose repr and str differ: "SocketKind.SOCK_STREAM")."""
    s = make()
    for option, value in ((socket.SO_TYPE, 1), (socket.SO_DOMAIN, 2), (socket.SO_ERROR, 0),
                          (socket.SO_ACCEPTCONN, 0)):
        got = s.getsockopt(socket.SOL_SOCKET, option)
        assert type(got) is int and got == value and repr(got) == repr(value)


def test_recvfrom_and_recvmsg(pair: tuple[Any, socket.socket]) -> None:
    c, peer = pair
    peer.sendall(b"one")
    arrived(c, b"one")
    assert c.recvfrom(10) == (b"one", None)
    peer.sendall(b"two")
    arrived(c, b"two")
    buf = bytearray(10)
    assert c.recvfrom_into(buf) == (3, None) and buf[:3] == b"two"
    peer.sendall(b"three")
    arrived(c, b"three")
    assert c.recvmsg(10) == (b"three", [], 0, None)
    peer.sendall(b"four")
    arrived(c, b"four")
    assert c.recvmsg(10, 64, 0) == (b"four", [], 0, None)
    peer.sendall(b"fives")
    arrived(c, b"fives")
    first, second = bytearray(2), bytearray(10)
    assert c.recvmsg_into([first, second]) == (5, [], 0, None)
    assert first == b"fi" and second[:3] == b"ves"
    peer.sendall(b"six")
    arrived(c, b"six")
    assert c.recvfrom(10, PEEK) == (b"six", None)
    assert c.recvmsg(10, 0, DONTWAIT) == (b"six", [], 0, None)
    with pytest.raises(ValueError):
        c.recvmsg(-1)
    with pytest.raises(ValueError):
        c.recvmsg(10, -1)
    # recvmsg_into() fills only what it received, and refuses before it
    # takes any data.
    peer.sendall(b"seven")
    arrived(c, b"seven")
    with pytest.raises(ValueError):
        c.recvmsg_into([bytearray(10)], -1)
    with pytest.raises(TypeError):
        c.recvmsg_into([bytearray(10), b"read-only"])
    first, second, third = bytearray(b"????"), bytearray(b"????"), bytearray(b"????")
    assert c.recvmsg_into([first, second, third]) == (5, [], 0, None)
    assert (first, second, third) == (b"seve", b"n???", b"????")


#: The receives of nothing that reach the kernel (CPython's recv() and
#: recv_into() of nothing return before it).
RECEIVES_OF_NOTHING: list[Callable[[Any], Any]] = [
    lambda s: s.recvfrom(0),
    lambda s: s.recvfrom_into(bytearray()),
    lambda s: s.recvmsg(0),
    lambda s: s.recvmsg_into([]),
    lambda s: s.recvmsg_into([bytearray()]),
]


def test_recv_of_nothing_returns_at_once_whatever_the_state(make: Callable[[], Any]) -> None:
    """CPython's recv() and recv_into() of nothing make no system call:
    they return nothing at once, unconnected, connected or closed."""
    s = make()
    assert s.recv(0) == b"" and s.recv_into(bytearray()) == 0
    with socket.create_server(("127.0.0.1", 0)) as listener:
        s.settimeout(TIMEOUT)
        s.connect(listener.getsockname())
    assert s.recv(0) == b"" and s.recv_into(bytearray()) == 0
    s.close()
    assert s.recv(0) == b"" and s.recv_into(bytearray()) == 0


@pytest.mark.parametrize("bufsize", ["10", 1.5, None, Decimal(3)],
                         ids=["str", "float", "None", "Decimal"])
def test_a_receive_size_that_is_not_an_integer_is_said_so(
        make: Callable[[], Any], bufsize: object) -> None:
    """Any object not an integer fails as CPython's says it ("'str' object
    cannot be interpreted as an integer"), before anything is received."""
    _fails_as_cpythons(lambda s: s.recv(bufsize), make(), TypeError)


@pytest.mark.parametrize("call", [
    lambda s: s.recv(-1), lambda s: s.recvfrom(-1),
    lambda s: s.recv_into(bytearray(4), -1), lambda s: s.recvfrom_into(bytearray(4), -1),
], ids=["recv", "recvfrom", "recv_into", "recvfrom_into"])
def test_a_negative_receive_size_names_the_call(make: Callable[[], Any],
                                                call: Callable[[Any], Any]) -> None:
    _fails_as_cpythons(call, make(), ValueError)


#: Receives with wrong arguments, which CPython's refuses before any system call.
WRONG_RECEIVES: dict[str, Callable[[Any], Any]] = {
    "recvmsg negative": lambda s: s.recvmsg(-1),
    "recvmsg negative ancillary": lambda s: s.recvmsg(1, -1),
    "recvmsg huge": lambda s: s.recvmsg(1 << 70),
    "recvmsg huge ancillary": lambda s: s.recvmsg(1, 1 << 70),
    "recvmsg_into negative ancillary": lambda s: s.recvmsg_into([bytearray(1)], -1),
    "recvmsg_into huge ancillary": lambda s: s.recvmsg_into([bytearray(1)], 1 << 70),
    "recvmsg_into no iterable": lambda s: s.recvmsg_into(5),
    "recvmsg_into no buffer": lambda s: s.recvmsg_into([bytearray(1), 5]),
    "recvmsg_into read-only": lambda s: s.recvmsg_into([bytearray(1), b"x"]),
    "recvmsg_into str": lambda s: s.recvmsg_into("ab"),
    "recvmsg_into not contiguous": lambda s: s.recvmsg_into([memoryview(bytearray(4))[::2]]),
    "recvfrom huge": lambda s: s.recvfrom(1 << 70),
    "recvfrom_into read-only": lambda s: s.recvfrom_into(b"x"),
    "recvfrom_into no buffer": lambda s: s.recvfrom_into(5),
    "recvfrom_into too small": lambda s: s.recvfrom_into(bytearray(1), 2),
    "recvfrom_into huge": lambda s: s.recvfrom_into(bytearray(1), 1 << 70),
    "recv_into no buffer": lambda s: s.recv_into(5),
    "recv_into not contiguous": lambda s: s.recv_into(memoryview(bytearray(4))[::2]),
    "recv_into too small": lambda s: s.recv_into(bytearray(1), 2),
    "recv huge": lambda s: s.recv(1 << 70),
}


@pytest.mark.parametrize("call", WRONG_RECEIVES.values(), ids=WRONG_RECEIVES.keys())
def test_a_receive_with_wrong_arguments_fails_as_cpythons(
        make: Callable[[], Any], call: Callable[[Any], Any]) -> None:
    """Each fails with CPython's exception and message, naming its call,
    before anything is received (here on an unconnected socket, which
    would fail otherwise)."""
    _fails_as_cpythons(call, make())


def test_a_receive_of_nothing_waits_as_the_kernels(pair: tuple[Any, socket.socket]) -> None:
    """recvfrom(), recvmsg() and their _into forms of nothing reach the
    kernel, which waits as for a receive of one byte (for data, the end
    of the stream or an error) and takes nothing."""
    c, peer = pair
    c.setblocking(False)
    for call in RECEIVES_OF_NOTHING:
        with pytest.raises(BlockingIOError):
            call(c)
    c.settimeout(0.01)
    for call in RECEIVES_OF_NOTHING:
        with pytest.raises(TimeoutError):
            call(c)
    peer.sendall(b"data")
    arrived(c, b"data")
    assert [call(c)[0] for call in RECEIVES_OF_NOTHING] == [b"", 0, b"", 0, 0]
    assert c.recv(10) == b"data"  # none of it taken
    c.settimeout(None)
    receiving = Call(lambda: c.recvmsg(0))  # blocks until something comes
    peer.sendall(b"x")
    assert receiving.join().result == (b"", [], 0, None)
    assert c.recv(10) == b"x"
    peer.close()
    assert [call(c)[0] for call in RECEIVES_OF_NOTHING] == [b"", 0, b"", 0, 0]


@pytest.mark.parametrize("state", ["unconnected", "closed", "reset"])
def test_a_receive_of_nothing_fails_as_a_receive(
        make: Callable[[], Any], state: str) -> None:
    errnos = {"unconnected": errno.ENOTCONN, "closed": errno.EBADF, "reset": errno.ECONNRESET}
    for call in RECEIVES_OF_NOTHING:
        s = make()
        if state == "closed":
            s.close()
        elif state == "reset":
            with socket.create_server(("127.0.0.1", 0)) as listener:
                s.settimeout(TIMEOUT)
                s.connect(listener.getsockname())
                peer, _ = listener.accept()
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()
            wait_readable(s)
        with pytest.raises(OSError) as info:
            call(s)
        assert info.value.errno == errnos[state]
        if state == "reset":
            # Reported once, as by a receive of data: then the end.
            assert call(s)[0] in (b"", 0)
            assert s.recv(1) == b""


def test_sendto_and_sendmsg(pair: tuple[Any, socket.socket]) -> None:
    """On a connected TCP socket the address is checked, then ignored."""
    c, peer = pair
    elsewhere = ("127.0.0.1", 9)
    assert c.sendto(b"a", elsewhere) == 1
    assert c.sendto(b"b", 0, elsewhere) == 1
    assert c.sendmsg([b"c", bytearray(b"d"), memoryview(b"e")]) == 3
    assert c.sendmsg([b"f"], [], 0, elsewhere) == 1
    assert c.sendmsg([]) == 0
    assert recv_exactly(peer, 6) == b"abcdef"
    with pytest.raises(TypeError):
        c.sendto(b"x", None)
    with pytest.raises(TypeError):
        c.sendto(b"x")  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        c.sendmsg(b"not a list of buffers")
    with pytest.raises(TypeError):
        c.sendto(b"x", 0, elsewhere, None)  # type: ignore[call-overload]
    # The flags are checked, also where the address is.
    with pytest.raises(TypeError):
        c.sendto(b"x", "no flags", elsewhere)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        c.sendmsg([b"x"], [], "no flags")


#: Addresses CPython's AF_INET socket refuses before any system call.
WRONG_ADDRESSES: dict[str, object] = {
    "str": "127.0.0.1", "list": ["127.0.0.1", 9], "None": None, "one": ("127.0.0.1",),
    "three": ("127.0.0.1", 9, 0), "host None": (None, 9), "host int": (1, 9),
    "port str": ("127.0.0.1", "9"), "port float": ("127.0.0.1", 9.0),
    "port big": ("127.0.0.1", 1 << 16), "port negative": ("127.0.0.1", -1),
    "port huge": (b"127.0.0.1", 1 << 70), "null": ("a\0b", 9),
    "null before port": ("a\0b", "9"), "host before port": (None, "9"),
}

#: The calls that take an address, each with its other arguments right.
ADDRESS_CALLS: dict[str, Callable[[Any, object], Any]] = {
    "connect": lambda s, a: s.connect(a),
    "connect_ex": lambda s, a: s.connect_ex(a),
    "bind": lambda s, a: s.bind(a),
    "sendto": lambda s, a: s.sendto(b"x", a),
    "sendto flags": lambda s, a: s.sendto(b"x", 0, a),
    "sendmsg": lambda s, a: s.sendmsg([b"x"], [], 0, a),
}


@pytest.mark.parametrize(("call", "address"), [
    pytest.param(call, address, id=f"{name}-{what}")
    for name, call in ADDRESS_CALLS.items() for what, address in WRONG_ADDRESSES.items()
    if not (name == "sendmsg" and address is None)  # sendmsg()'s None: no address
])
def test_a_wrong_address_fails_as_cpythons(make: Callable[[], Any],
                                           call: Callable[[Any, object], Any],
                                           address: object) -> None:
    """Refused with CPython's exception and message (which names the call
    for some), before anything else is done."""
    _fails_as_cpythons(lambda s: call(s, address), make())


#: sendmsg() and sendto() with wrong arguments: refused as CPython's
#: refuses them, in its order.
WRONG_SENDMSGS: dict[str, Callable[[Any], Any]] = {
    "address before buffers": lambda s: s.sendmsg(5, [], 0, "x"),
    "address before ancillary data": lambda s: s.sendmsg([b"x"], [(1, 1, b"")], 0, "x"),
    "flags before address": lambda s: s.sendmsg([b"x"], [], "no flags", "x"),
    "no iterable": lambda s: s.sendmsg(5),
    "no buffer": lambda s: s.sendmsg([b"x", "y"]),
    "ancillary data no iterable": lambda s: s.sendmsg([b"x"], 5),
    "send str": lambda s: s.send("x"),
    "sendto data before address": lambda s: s.sendto("x", "x"),
    "sendto flags before address": lambda s: s.sendto(b"x", "no flags", "x"),
}


@pytest.mark.parametrize("call", WRONG_SENDMSGS.values(), ids=WRONG_SENDMSGS.keys())
def test_a_sendmsg_with_wrong_arguments_fails_as_cpythons(
        make: Callable[[], Any], call: Callable[[Any], Any]) -> None:
    _fails_as_cpythons(call, make())


def test_sendfile_sends_from_the_offset_and_moves_the_file_position(
        pair: tuple[Any, socket.socket], tmp_path: Path) -> None:
    c, peer = pair
    data = bytes(range(256)) * 400
    path = tmp_path / "data"
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert c.sendfile(f, 10, 5000) == 5000
        assert f.tell() == 5010
        assert recv_exactly(peer, 5000) == data[10:5010]
        f.seek(7)
        assert c.sendfile(f) == len(data)  # from offset 0, not the file position
        assert f.tell() == len(data)
        assert recv_exactly(peer, len(data)) == data
        f.seek(3)
        assert c.sendfile(f, len(data)) == 0
        assert f.tell() == 3  # nothing sent: where it was
        with pytest.raises(TypeError):
            c.sendfile(f, 0, "10")
        with pytest.raises(ValueError):
            c.sendfile(f, 0, 0)
        c.setblocking(False)
        with pytest.raises(ValueError, match="non-blocking"):
            c.sendfile(f)
    with open(path) as text:
        with pytest.raises(ValueError, match="binary"):
            c.sendfile(text)


def test_sendfile_of_a_file_that_is_not_a_regular_one(pair: tuple[Any, socket.socket]) -> None:
    c, peer = pair
    f = io.BytesIO(b"0123456789")
    assert c.sendfile(f) == 10 and f.tell() == 10
    assert c.sendfile(f, 4, 3) == 3 and f.tell() == 7
    assert recv_exactly(peer, 13) == b"0123456789456"


@pytest.mark.parametrize("state", ["closed", "non-blocking", "unconnected"])
def test_sendfile_of_an_empty_file_sends_nothing_whatever_the_socket(
        make: Callable[[], Any], tmp_path: Path, state: str) -> None:
    """CPython's sendfile() returns 0 for an empty regular file before it
    looks at the socket: closed, non-blocking or not connected (and the
    file's position stays where it was, whatever the offset)."""
    s = make()
    if state == "closed":
        s.close()
    elif state == "non-blocking":
        s.setblocking(False)
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with open(path, "rb") as f:
        assert s.sendfile(f) == 0
        assert s.sendfile(f, 5) == 0 and f.tell() == 0
        # Its arguments are checked all the same.
        with pytest.raises(TypeError):
            s.sendfile(f, 0, 1.5)
    with open(path, encoding="ascii") as f, pytest.raises(ValueError):  # text, not binary
        s.sendfile(f)


def test_a_blocking_send_cut_short_by_a_reset_returns_what_went(
        pair: tuple[Any, socket.socket]) -> None:
    """A blocking send() waiting for room when the peer resets returns
    how much it sent (as Linux's does once it copied some), and the next
    send() raises the reset."""
    c, peer = pair
    c.settimeout(None)
    data = bytes(64 << 20)  # far more than the socket's buffers (or the ring) hold
    sending = Call(lambda: c.send(data))
    assert peer.recv(1) == b"\0"  # the send is under way
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # with SO_LINGER 0: a reset
    sent = sending.join().result
    assert sending.error is None and 0 < sent < len(data), sending.error
    # Over PV Calls the backend's sender may have got EPIPE, its reader
    # having taken the reset: the reset is said all the same.
    with pytest.raises(ConnectionResetError):
        c.send(b"y")


def test_sendfile_of_a_file_whose_descriptor_is_no_file_sends_what_it_reads(
        pair: tuple[Any, socket.socket]) -> None:
    """A file object whose fileno() names no open file (fstat fails) is
    read and sent as one with no descriptor: CPython gives up on
    os.sendfile() for it, and falls back to send()."""

    class NoFile(io.BytesIO):
        def fileno(self) -> int:
            return -1

    c, peer = pair
    f = NoFile(b"0123456789")
    assert c.sendfile(f, 2) == 8 and f.tell() == 10
    assert recv_exactly(peer, 8) == b"23456789"


def test_sendfile_of_a_count_from_a_file_that_reads_short_sends_the_count(
        pair: tuple[Any, socket.socket]) -> None:
    """A file whose reads return fewer bytes than asked for (a raw one)
    gives sendfile() exactly ``count`` bytes: each read asks for no more
    than is left to send."""

    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data, self.pos = data, 0

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def seek(self, pos: int, whence: int = 0) -> int:
            assert whence == 0
            self.pos = pos
            return pos

        def tell(self) -> int:
            return self.pos

        def readinto(self, buffer: Any) -> int:
            n = min(3, len(buffer), len(self.data) - self.pos)
            buffer[:n] = self.data[self.pos : self.pos + n]
            self.pos += n
            return n

    c, peer = pair
    f = Trickle(b"abcdefgh")
    assert c.sendfile(f, count=4) == 4
    assert f.tell() == 4
    assert recv_exactly(peer, 4) == b"abcd"


def test_makefile_takes_a_negative_buffering_for_the_default_and_says_its_mode(
        pair: tuple[Any, socket.socket]) -> None:
    c, peer = pair
    with c.makefile("rb", -1) as f:
        peer.sendall(b"line\n")
        assert f.readline() == b"line\n"
    with c.makefile("r") as text:
        assert text.mode == "r"


@pytest.mark.parametrize("mode", ["b", "", "rb", "wb", "rwb", "w", "rw", "br", "bw"])
@pytest.mark.parametrize("buffering", [None, 0], ids=["buffered", "unbuffered"])
def test_makefile_modes(pair: tuple[Any, socket.socket], mode: str,
                        buffering: int | None) -> None:
    """A mode without "w" reads ("b" alone too), one with "b" is binary,
    and a text one says the mode it was given; unbuffered only binary."""
    c, peer = pair
    binary = "b" in mode
    if buffering == 0 and not binary:
        _fails_as_cpythons(lambda s: s.makefile(mode, 0), c, ValueError)
        return
    with c.makefile(mode, buffering) as f:
        reading, writing = "r" in mode or "w" not in mode, "w" in mode
        assert (f.readable(), f.writable()) == (reading, writing)
        assert isinstance(f, io.TextIOBase) != binary
        raw_mode = ("r" if reading else "") + ("w" if writing else "") + "b"
        pair_of_buffers = reading and writing and buffering is None  # BufferedRWPair: no mode
        assert getattr(f, "mode", None) == (
            mode if not binary else None if pair_of_buffers else raw_mode)
        if writing:
            f.write(b"out\n" if binary else "out\n")
            f.flush()
            assert recv_exactly(peer, 4) == b"out\n"
        if reading:
            peer.sendall(b"in\n")
            assert f.readline() == (b"in\n" if binary else "in\n")


def test_a_socketio_closed_before_makefile_does_not_close_the_sockets_file(
        pair: tuple[Any, socket.socket]) -> None:
    """A SocketIO made by hand and closed counts no file of makefile()'s:
    close() of the socket still waits for the one makefile() gives after."""
    c, peer = pair
    socket.SocketIO(c, "rb").close()
    with c.makefile("rb") as f:
        c.close()
        peer.sendall(b"line\n")
        assert f.readline() == b"line\n"


def test_a_send_with_a_timeout_returns_once_some_went(pair: tuple[Any, socket.socket]) -> None:
    """With a timeout, send() returns what went once the buffers are full
    (as a non-blocking one, after waiting for room for a first byte),
    rather than waiting within the timeout for room for all of it."""
    c, peer = pair
    c.settimeout(3600)
    data = bytes(64 << 20)  # far more than the socket's buffers (or the ring) hold
    sent = Call(lambda: c.send(data)).join().result
    assert 0 < sent < len(data)


def test_the_timeout_attribute(make: Callable[[], Any]) -> None:
    s = make()
    s.settimeout(2.5)
    assert s.timeout == 2.5
    s.setblocking(False)
    assert s.timeout == 0.0


def test_settimeout_takes_a_float_or_an_integer(make: Callable[[], Any]) -> None:
    """Not any number float() takes: a Decimal or a Fraction is a TypeError."""
    s = make()
    s.settimeout(2.5)
    for value in (Decimal("1.5"), Fraction(1, 2), 1j, "1", b"1"):
        with pytest.raises(TypeError):
            s.settimeout(value)
    assert s.gettimeout() == 2.5
    s.settimeout(True)
    assert s.gettimeout() == 1.0
    s.settimeout(-0.0)
    assert str(s.gettimeout()) == "0.0" and not s.getblocking()


def test_settimeout_of_a_closed_socket_fails_but_sets_it(make: Callable[[], Any]) -> None:
    """CPython sets the timeout, then fails to set the descriptor's mode
    (EBADF): gettimeout() says the new one.  A bad value is refused first."""
    s = make()
    s.close()
    with pytest.raises(OSError) as info:
        s.settimeout(2.5)
    assert info.value.errno == errno.EBADF
    assert s.gettimeout() == 2.5
    with pytest.raises(OSError) as info:
        s.setblocking(False)
    assert info.value.errno == errno.EBADF
    assert s.gettimeout() == 0.0 and not s.getblocking()
    with pytest.raises(TypeError):
        s.settimeout("1")
    with pytest.raises(ValueError):
        s.settimeout(-1)
    assert s.gettimeout() == 0.0


def test_detach_of_a_closed_socket(make: Callable[[], Any]) -> None:
    s = make()
    s.close()
    assert s.detach() == -1


def test_shutdown_checks_its_argument_and_the_socket(
        make: Callable[[], Any], pair: tuple[Any, socket.socket]) -> None:
    c, _ = pair
    for how in (-1, 3):
        with pytest.raises(OSError) as info:
            c.shutdown(how)
        assert info.value.errno == errno.EINVAL
    for bad in ("x", 1.0, None):
        with pytest.raises(TypeError):
            c.shutdown(bad)
    unconnected = make()
    with pytest.raises(OSError) as info:
        unconnected.shutdown(socket.SHUT_RDWR)
    assert info.value.errno == errno.ENOTCONN
    unconnected.bind(("127.0.0.1", 0))
    with pytest.raises(OSError) as info:
        unconnected.shutdown(socket.SHUT_RD)
    assert info.value.errno == errno.ENOTCONN
    unconnected.close()
    with pytest.raises(OSError) as info:
        unconnected.shutdown(socket.SHUT_RD)
    assert info.value.errno == errno.EBADF


# -- what PV Calls cannot do: a clear error ---------------------------------------------


@pytest.fixture
def pv_pair(fe: pvcalls.Frontend) -> Iterator[tuple[pvcalls.PVSocket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener, fe.socket() as c:
        c.settimeout(TIMEOUT)
        c.connect(listener.getsockname())
        listener.settimeout(TIMEOUT)
        peer, _ = listener.accept()
        with peer:
            yield c, peer


def test_what_pv_calls_cannot_do_fails_with_eopnotsupp_saying_so(
        pv_pair: tuple[pvcalls.PVSocket, socket.socket]) -> None:
    c, peer = pv_pair
    cannot: list[tuple[Callable[[], object], str]] = [
        (lambda: c.shutdown(socket.SHUT_WR), "no shutdown"),
        (lambda: c.recv(1, socket.MSG_OOB), "MSG_OOB"),
        (lambda: c.recvmsg(1, 0, socket.MSG_OOB), "MSG_OOB"),
        (lambda: c.send(b"x", socket.MSG_OOB), "MSG_OOB"),
        (lambda: c.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(4))]),
         "ancillary data"),
        (c.dup, "dup"),
        (c.detach, "detach"),
        (lambda: c.set_inheritable(True), "inherit"),
    ]
    for call, says in cannot:
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EOPNOTSUPP, (says, info.value)
        assert says in str(info.value)
    # Nothing was sent by the calls that failed.
    assert not c.get_inheritable()
    c.set_inheritable(False)
    c.sendall(b"still fine")
    assert recv_exactly(peer, 10) == b"still fine"


def test_a_reset_behind_data_not_yet_read_comes_after_it(
        pair: tuple[Any, socket.socket]) -> None:
    """The peer sends more than the receiver holds, then resets: recv()
    hands out what had arrived and then fails with ECONNRESET, not an
    orderly end.  For a PV socket, more than its in ring holds: the
    backend still has some in its host socket when the reset comes, and
    the error is the receive's to report, not SO_ERROR's to take."""
    c, peer = pair
    peer.setblocking(False)
    chunk = b"x" * 65536
    sent = 0
    deadline = time.monotonic() + TIMEOUT
    while sent < 4 * len(chunk):  # past the in ring, once the backend filled it
        try:
            sent += peer.send(chunk)
        except BlockingIOError:
            assert time.monotonic() < deadline, f"{sent} bytes went, then nothing"
            time.sleep(0.01)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # with SO_LINGER 0: a reset
    got = 0
    with pytest.raises(ConnectionResetError):
        while True:
            data = c.recv(65536)
            assert data, f"an orderly end after {got} of {sent} bytes"
            got += len(data)
    assert got <= sent
