"""pvcalls.Frontend and its sockets against the real Backend on a SimHost.

One simulated host, backend and guest per module (setting them up is the
slow part); each test opens its own sockets and host servers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import gc
import io
import itertools
import linecache
import logging
import math
import os
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fdcensus import descriptors
from highfds import FD_SETSIZE, descriptors_past_fd_setsize
from pvcalls_rawfront import Call, echo_through, hold_accepts, sleeping_in_wait, wait_until
from pyxs._internal import Op, Packet
from racewindow import Attempt, PauseAt, line_of, stands_at
from stolensignal import (
    OUTLASTS_THE_TEST,
    Interrupted,
    interrupt,
    interrupted_as_call_returns,
    interrupted_as_frame_starts,
    interrupted_at,
    main_thread_in,
    signal_taken_elsewhere,
)

import pvcalls
from pvcalls import _errno, _wire
from pvcalls._socket import PassiveSocket
from pvcalls.frontend import _common, _frontend
from pvcalls.frontend._common import RECV, RESETS_IN_A_ROW, SEND, Deadline
from xenback.ring import _REQ_EVENT
from xenback.sim import SimHost
from xenback.sim._toolstack import Toolstack
from xenback.xenstore import XenStore

TIMEOUT = 10.0


class HostServer:
    """A host TCP server on 127.0.0.1 running ``handler(conn)`` per client."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.sock.getsockname()
        self.handler = handler
        self.errors: list[BaseException] = []
        self.accepted = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.release()
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(TIMEOUT)
                self.handler(conn)
            except BaseException as exc:
                self.errors.append(exc)

    def close(self) -> None:
        self.sock.close()
        for t in self._threads:
            t.join(TIMEOUT)
        assert not self.errors, self.errors


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def sink(conn: socket.socket) -> None:
    """Read everything, send nothing."""
    while conn.recv(65536):
        pass


@pytest.fixture(scope="module")
def host() -> Iterator[SimHost]:
    with SimHost() as h:
        yield h


@pytest.fixture(scope="module")
def backend(host: SimHost) -> Iterator[Any]:
    with pvcalls.Backend(host.dom0, max_ioworkers=2) as b:
        yield b


@pytest.fixture(scope="module")
def guest(host: SimHost, backend: Any) -> Any:
    return host.create_domain("guest")


@pytest.fixture(scope="module")
def fe(guest: Any) -> Iterator[pvcalls.Frontend]:
    with pvcalls.Frontend(guest) as f:
        yield f


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Callable[..., HostServer]]:
    servers: list[HostServer] = []

    def make(handler: Callable[[socket.socket], None] = echo) -> HostServer:
        s = HostServer(handler)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def connected(fe: pvcalls.Frontend, address: tuple[str, int]) -> pvcalls.PVSocket:
    s = fe.socket()
    s.settimeout(TIMEOUT)
    s.connect(address)
    return s


def recv_exactly(s: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def assert_fails(err: int, *calls: Callable[[], object], strerror: str | None = None) -> None:
    """Each of ``calls`` raises OSError with errno ``err`` (and ``strerror``)."""
    for call in calls:
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == err, (call, info.value)
        if strerror is not None:
            assert info.value.strerror == strerror


def blocked_recv(s: pvcalls.PVSocket) -> Call:
    """``s.recv`` blocked (without timeout) in a thread.  Returns once the
    thread sleeps in the wait, past its last look at the socket's state:
    only a wake-up gets it out."""
    s.settimeout(None)
    call = Call(lambda: s.recv(10))
    wait_until(lambda: sleeping_in_wait(s))  # no event says so
    assert call.alive() and call.error is None
    return call


def listen_address(backend: Any, domid: int, sock_id: int) -> tuple[str, int]:
    """Where the backend listens for a guest's passive socket."""
    for row in backend.stats().sockets:
        if row.domain == domid and row.id == sock_id:
            host, port = row.address
            return host, port
    raise AssertionError(f"no passive socket {sock_id:#x} in backend stats")


# -- active sockets -------------------------------------------------------------


def test_echo_through_host_server(fe: pvcalls.Frontend, server: Any) -> None:
    srv = server()
    data = os.urandom(300_000)  # ~10 times the 32 KiB ring: wraps many times
    with connected(fe, srv.address) as s:
        assert s.getpeername() == srv.address
        echo_through(s, data)


def test_recv_into_and_nbytes(fe: pvcalls.Frontend, server: Any) -> None:
    srv = server()
    with connected(fe, srv.address) as s:
        s.sendall(b"0123456789")
        buf = bytearray(16)
        got = 0
        while got < 4:
            got += s.recv_into(memoryview(buf)[got:], 4 - got)
        assert bytes(buf[:4]) == b"0123"
        assert recv_exactly(s, 6) == b"456789"
        assert s.recv_into(bytearray(0)) == 0


def test_makefile_lines(fe: pvcalls.Frontend, server: Any) -> None:
    srv = server()
    with connected(fe, srv.address) as s:
        with s.makefile("rw", encoding="utf-8", newline="\n") as f:
            f.write("hello\nworld\n")
            f.flush()
            assert f.readline() == "hello\n"
            assert f.readline() == "world\n"
    assert s.closed


def test_recv_timeout_then_still_usable(fe: pvcalls.Frontend, server: Any) -> None:
    srv = server()
    with connected(fe, srv.address) as s:
        s.settimeout(0.1)
        assert s.gettimeout() == 0.1
        with pytest.raises(TimeoutError):
            s.recv(10)
        s.settimeout(TIMEOUT)
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"


def test_nonblocking_recv(fe: pvcalls.Frontend, server: Any) -> None:
    srv = server()
    with connected(fe, srv.address) as s:
        s.setblocking(False)
        assert not s.getblocking()
        with pytest.raises(BlockingIOError):
            s.recv(10)


def test_eof_when_host_closes(fe: pvcalls.Frontend, server: Any) -> None:
    def say_bye(conn: socket.socket) -> None:
        conn.sendall(b"bye")

    srv = server(say_bye)
    with connected(fe, srv.address) as s:
        assert recv_exactly(s, 3) == b"bye"
        assert s.recv(10) == b""  # in_error = -ENOTCONN
        assert s.recv(10) == b""


def test_connect_refused(fe: pvcalls.Frontend) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    address = closed.getsockname()
    closed.close()
    s = fe.socket()
    with s, pytest.raises(ConnectionRefusedError) as info:
        s.settimeout(TIMEOUT)
        s.connect(address)
    assert info.value.errno == errno.ECONNREFUSED


def test_reset_by_the_peer_is_an_error_not_eof(fe: pvcalls.Frontend, server: Any) -> None:
    def reset(conn: socket.socket) -> None:
        conn.recv(1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # Closed on return: a reset, not an orderly end.

    srv = server(reset)
    with connected(fe, srv.address) as s:
        s.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            s.recv(10)
        # Said once, as by socket.socket: then the connection is gone.
        assert s.recv(10) == b""
        with pytest.raises(BrokenPipeError):
            s.send(b"into a dead connection")  # it took it, and it was lost
        # Nothing to send is no way round the error, as with socket.socket
        # (whose sendall() calls send() once even then) and send() here.
        for call in (lambda: s.send(b""), lambda: s.sendall(b"")):
            with pytest.raises(BrokenPipeError):
                call()


def test_close_wakes_a_blocked_sender(fe: pvcalls.Frontend, server: Any) -> None:
    release = threading.Event()

    def sluggish(conn: socket.socket) -> None:
        release.wait(TIMEOUT)

    srv = server(sluggish)
    srv.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    s = connected(fe, srv.address)
    s.settimeout(0.2)
    with pytest.raises(TimeoutError):  # the out ring is full, and stays so
        for _ in range(1000):  # far more than ring and socket buffers hold
            s.sendall(bytes(65536))
    s.settimeout(None)
    sender = Call(lambda: s.send(b"x"))
    try:
        wait_until(lambda: sleeping_in_wait(s))
        s.close()
        assert sender.oserror().errno == errno.EBADF
    finally:
        release.set()


def test_close_ends_a_blocked_send_with_what_it_sent(fe: pvcalls.Frontend, server: Any) -> None:
    """A blocking send() that filled the out ring and waits for room
    returns how much went into the ring when another thread closes the
    socket (the next call says EBADF), as it does on a failed connection."""
    release = threading.Event()

    def sluggish(conn: socket.socket) -> None:
        release.wait(TIMEOUT)

    srv = server(sluggish)
    s = connected(fe, srv.address)
    s.settimeout(None)
    data = bytes(64 << 20)  # far more than the ring and socket buffers hold
    sender = Call(lambda: s.send(data))
    try:
        wait_until(lambda: sleeping_in_wait(s))
        s.close()
        sent = sender.join().result
        assert sender.error is None and 0 < sent < len(data), sender.error
        assert_fails(errno.EBADF, lambda: s.send(b"x"))
    finally:
        release.set()


class _PausedPoller:
    """Stands in for a data ring's ``select.poll`` of one caller: its first
    ``poll()`` stops (``paused`` set) until ``go`` is set."""

    def __init__(self, poller: Any) -> None:
        self.poller = poller
        self.paused, self.go = threading.Event(), threading.Event()

    def poll(self, timeout: int | None = None) -> list[tuple[int, int]]:
        if not self.paused.is_set():
            self.paused.set()
            assert self.go.wait(TIMEOUT)
        return self.poller.poll(timeout)


def test_a_receiver_that_takes_the_senders_event_wakes_it(
    fe: pvcalls.Frontend, server: Any
) -> None:
    """A reader and a writer thread block on one socket at once, each
    polling the ring's handle.  The backend's "room again" event is taken by
    whichever wakes first; here the reader, while the writer is between its
    last look at the ring and its poll.  The reader must wake the writer:
    no other event will come (the host only reads)."""
    srv = server(sink)
    s = connected(fe, srv.address)
    ring = s._st.ring
    assert ring is not None and ring.direct
    reader = Call(lambda: s.recv(1))
    wait_until(lambda: s._polling[RECV])
    paused = _PausedPoller(ring.pollers[SEND])
    ring.pollers = (ring.pollers[RECV], paused)
    data = os.urandom(1 << 20)  # the writer finds the 32 KiB ring full
    writer = Call(lambda: s.sendall(data))
    try:
        assert paused.paused.wait(TIMEOUT)
        # The backend drains the ring it saw full and notifies; the reader
        # takes that event and writes the writer's wakefd.
        assert select.select([ring.wakefds[SEND]], [], [], TIMEOUT)[0], \
            "the reader took the writer's event and did not wake it"
    finally:
        paused.go.set()
    assert writer.join().error is None  # it did not miss its wake-up
    s.close()
    reader.oserror()


def test_socket_calls_refused_as_socket_socket_refuses_them(
    fe: pvcalls.Frontend, server: Any
) -> None:
    srv = server()
    with fe.socket() as s:
        assert repr(s) == f"<PVSocket id={s.id:#x} new>"
        with pytest.raises(OSError) as info:
            s.getpeername()
        assert info.value.errno == errno.ENOTCONN
        with pytest.raises(ValueError, match="negative"):
            s.recv(-1)
        s.bind(("", 0))  # "" is INADDR_ANY, as for socket.socket
        assert s.getsockname() == ("0.0.0.0", 0)
        assert repr(s) == f"<PVSocket id={s.id:#x} bound>"
        with pytest.raises(OSError) as info:
            s.bind(("127.0.0.1", 0))
        assert info.value.errno == errno.EINVAL
        s.listen()
        assert repr(s) == f"<PVSocket id={s.id:#x} listening>"
    assert repr(s) == f"<PVSocket id={s.id:#x} closed>"
    with connected(fe, srv.address) as s:
        assert repr(s) == f"<PVSocket id={s.id:#x} active>"
        assert s.send(b"") == 0
        assert_fails(errno.EOPNOTSUPP, lambda: s.shutdown(socket.SHUT_WR), s.detach)
        echo_through(s, b"still fine")


def test_connect_to_the_broadcast_address_is_unreachable(
    fe: pvcalls.Frontend, server: Any
) -> None:
    """"<broadcast>" means 255.255.255.255, as for socket.socket; the
    backend's host refuses a TCP connect to it at once.  The socket may
    connect elsewhere afterwards."""
    srv = server()
    with fe.socket() as s:
        s.settimeout(TIMEOUT)
        with pytest.raises(OSError) as info:
            s.connect(("<broadcast>", srv.address[1]))
        assert info.value.errno == errno.ENETUNREACH
        with pytest.raises(OSError):
            s.getpeername()
        s.connect(srv.address)
        echo_through(s, b"reachable")


def test_makefile_modes_as_socket_socket(fe: pvcalls.Frontend, server: Any) -> None:
    srv = server()
    with connected(fe, srv.address) as s:
        with pytest.raises(ValueError, match="invalid mode"):
            s.makefile("rx")
        with pytest.raises(ValueError, match="unbuffered streams must be binary"):
            s.makefile("r", buffering=0)
        raw = s.makefile("rwb", buffering=0)
        assert isinstance(raw, socket.SocketIO)
        with s.makefile("w", encoding="ascii") as w, s.makefile("rb") as r:
            assert isinstance(w.buffer, io.BufferedWriter)
            w.write("through a writer\n")
            w.flush()
            assert r.readline() == b"through a writer\n"
        raw.write(b"raw\n")
        assert recv_exactly(s, 4) == b"raw\n"
        raw.close()


def test_send_recv_on_unconnected_socket(fe: pvcalls.Frontend) -> None:
    with fe.socket() as s:
        with pytest.raises(OSError) as info:
            s.send(b"x")
        assert info.value.errno == errno.ENOTCONN


def test_close_semantics(fe: pvcalls.Frontend, server: Any) -> None:
    srv = server()
    s = connected(fe, srv.address)
    reader = blocked_recv(s)
    s.close()
    assert reader.oserror().errno == errno.EBADF
    s.close()  # twice is fine
    assert_fails(errno.EBADF, lambda: s.send(b"x"), lambda: s.sendall(b""), lambda: s.recv(1),
                 lambda: s.connect(srv.address))
    # The addresses too, as socket.socket's (its getsockname() asks the fd).
    assert_fails(errno.EBADF, s.getsockname, s.getpeername)
    assert s.fileno() == -1  # as socket.socket's
    assert s not in fe.sockets()


def test_close_after_the_fileno_was_closed_still_releases(
        fe: pvcalls.Frontend, server: Any, backend: Any, guest: Any) -> None:
    """A program closed the descriptor fileno() gave it (socket.close(fd),
    as CPython's test_socket does).  close() then fails with EBADF, as
    socket.socket's does, but the socket is released all the same: its
    peer sees the end of the stream, and it holds nothing in the backend
    (close() used to stop at the dead descriptor, before the RELEASE, and
    leave the connection open until the frontend went).

    The descriptor is replaced by a read-only one rather than closed:
    writing to it fails with EBADF as to a closed one, and no file another
    thread opens meanwhile can take its number (close() would then act on
    that file, as socket.socket's would).  close() leaves that file
    alone, the program's: before, it closed it."""
    ended = threading.Event()

    def until_eof(conn: socket.socket) -> None:
        while conn.recv(65536):
            pass
        ended.set()

    srv = server(until_eof)
    s = connected(fe, srv.address)
    assert srv.accepted.acquire(timeout=TIMEOUT)
    fd = s.fileno()
    readonly = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(readonly, fd)
        with pytest.raises(OSError) as info:
            s.close()
        assert os.path.samestat(os.fstat(fd), os.fstat(readonly)), "closed the program's file"
    finally:
        os.close(readonly)
    os.close(fd)
    assert info.value.errno == errno.EBADF
    assert s.closed and s not in fe.sockets()
    assert ended.wait(TIMEOUT), "the peer never saw the end of the stream"
    wait_until(lambda: all(row.id != s.id for row in backend.stats().sockets
                           if row.domain == guest.domid))
    s.close()  # twice is fine


def test_a_selector_unregisters_a_closed_socket(fe: pvcalls.Frontend, server: Any) -> None:
    """As with socket.socket: fileno() is -1 once closed, and selectors
    then find the socket's key by the object."""
    s = connected(fe, server().address)
    with selectors.DefaultSelector() as sel:
        sel.register(s, selectors.EVENT_READ)
        s.close()
        assert sel.unregister(s).fileobj is s


def test_recv_of_nothing_does_not_wait_for_another_receiver(
        fe: pvcalls.Frontend, server: Any) -> None:
    """recv(0) returns b"" at once, as socket.socket's, also while another
    thread is blocked in recv() (it used to wait for that one's lock)."""
    s = connected(fe, server().address)
    reader = blocked_recv(s)
    try:
        assert Call(lambda: s.recv(0)).join().result == b""
        assert s.recv_into(bytearray(0)) == 0
    finally:
        s.close()
    assert reader.oserror().errno == errno.EBADF
    with fe.socket() as unconnected:
        # Not even looked at, as by socket.socket's recv(0); recvmsg(0)
        # reaches the kernel, which says the socket is not connected.
        assert unconnected.recv(0) == b""
        assert_fails(errno.ENOTCONN, lambda: unconnected.recvmsg(0))


@pytest.mark.parametrize("mode", ["timeout", "non-blocking"])
def test_accept_keeps_its_timeout_while_another_thread_accepts(
        fe: pvcalls.Frontend, mode: str) -> None:
    """A second accept() on a listener where a first one blocks returns
    within its own timeout (or at once, non-blocking), as socket.socket's
    does, instead of waiting for the first one's lock."""
    ls = fe.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    try:
        first = Call(ls.accept)  # no timeout
        wait_until(lambda: sleeping_in_wait(ls))
        ls.settimeout(0.2 if mode == "timeout" else 0.0)
        second = Call(ls.accept).join()
        assert isinstance(second.error, TimeoutError if mode == "timeout" else BlockingIOError)
    finally:
        ls.close()
    assert first.oserror().errno == errno.EBADF


@pytest.mark.parametrize("where", ["data", "accept", "socket lock"])
def test_a_signal_another_thread_took_interrupts_a_blocked_call(
        fe: pvcalls.Frontend, server: Any, where: str) -> None:
    """Ctrl-C to a program blocked in recv() or accept(): the kernel gives
    the signal to any thread not blocking it, CPython runs the handler in
    the main thread, and a main thread asleep in the kernel wakes only for
    a signal given to it.  The call must still let the handler run (and
    its exception out) soon, not at its timeout or never.  (Its timeout
    outlasts the test, as does the server's silence: a call the signal did
    not end is a test timeout.)"""
    assert threading.current_thread() is threading.main_thread()

    def silent(conn: socket.socket) -> None:
        conn.settimeout(OUTLASTS_THE_TEST)  # no end of the connection to wake the recv()
        sink(conn)

    srv = server(silent)
    ls = fe.socket()
    s = fe.socket()
    blocked = s
    first: Call | None = None
    if where == "accept":
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        blocked = ls
    else:
        s.connect(srv.address)
        if where == "socket lock":  # recv() waits for another receiver's lock
            first = blocked_recv(s)

    def main_waits_for(lock: Any) -> bool:
        # In Deadline.take's blocking try: past its first (False, in
        # taken) and its nap's reckoning.  (A look for a frame named
        # "acquire", from before take(), never held: the signal came as
        # the sender gave up, 10 s on, wherever the main thread was.)
        frame = sys._current_frames()[threading.main_thread().ident]
        if frame.f_code is not Deadline.take.__code__:
            return False
        names = frame.f_locals
        taken = names.get("taken")
        return names.get("lock") is lock and "nap" in names and bool(taken) and not taken[-1]

    def blocked_in_the_call() -> bool:
        return sleeping_in_wait(blocked) if first is None else main_waits_for(s._recv_lock)

    blocked.settimeout(OUTLASTS_THE_TEST)
    try:
        with signal_taken_elsewhere(blocked_in_the_call):
            with pytest.raises(Interrupted):
                if where == "accept":
                    ls.accept()
                else:
                    s.recv(10)
    finally:
        s.close()
        ls.close()
    if first is not None:
        assert first.join().oserror().errno == errno.EBADF


def test_sendfile_of_a_pipe_sends_what_it_reads(fe: pvcalls.Frontend, server: Any) -> None:
    """A file that cannot tell its position (a pipe) is read to its end
    and sent, its position asked for neither before nor after.  (CPython's
    sendfile() sends nothing from a pipe: its fstat size 0 is taken for
    an empty file.)"""
    srv = server()  # echoes
    r, w = os.pipe()
    os.write(w, b"hello")
    os.close(w)
    with connected(fe, srv.address) as s, os.fdopen(r, "rb") as f:
        assert s.sendfile(f) == 5
        assert recv_exactly(s, 5) == b"hello"


def test_makefile_keeps_socket_open_until_closed(fe: pvcalls.Frontend, server: Any) -> None:
    srv = server()
    s = connected(fe, srv.address)
    f = s.makefile("rwb")
    s.close()  # the file still holds it, as with socket.socket
    f.write(b"still here\n")
    f.flush()
    assert f.readline() == b"still here\n"
    f.close()
    with pytest.raises(OSError):
        s.send(b"x")


def test_fileno_waits_for_data(fe: pvcalls.Frontend, server: Any) -> None:
    srv = server()
    with connected(fe, srv.address) as s, selectors.DefaultSelector() as sel:
        sel.register(s, selectors.EVENT_READ)
        assert sel.select(0) == []
        s.sendall(b"hello")
        assert [key.fileobj for key, _ in sel.select(TIMEOUT)] == [s]
        assert recv_exactly(s, 5) == b"hello"
        assert sel.select(0) == []


def test_fileno_read_after_many_updates_while_readable_polls_unreadable(
        fe: pvcalls.Frontend, server: Any) -> None:
    """Every send() and every event updates the descriptor; the many that
    find it readable already must leave it as one update did, so that
    taking the data clears it (a byte written per update was more than
    the clearing read takes)."""
    srv = server()
    with connected(fe, srv.address) as s, selectors.DefaultSelector() as sel:
        sel.register(s, selectors.EVENT_READ)
        s.sendall(b"hello")
        assert [key.fileobj for key, _ in sel.select(TIMEOUT)] == [s]
        for _ in range(40):  # each updates the descriptor, readable throughout
            assert s.send(b"x") == 1
        assert recv_exactly(s, 45) == b"hello" + b"x" * 40
        assert sel.select(0) == []


def test_a_ring_relayed_late_for_its_old_socket_serves_the_next_one(
        fe: pvcalls.Frontend, server: Any) -> None:
    """A fileno() that read a socket's ring just before a refused
    non-blocking connect gave the ring back to the pool relays it after
    it was unrelayed: that relay does nothing now (the socket no longer
    has the ring; test_frontend_nbconnect has the race itself).  The
    socket the ring serves next must see its data through fileno()."""
    srv = server()
    with connected(fe, srv.address) as old:
        ring = old._st.ring
        assert ring is not None and ring.direct
        old_st = old._st
    wait_until(lambda: ring in fe._ring_pool)
    fe._relay(ring, old_st)  # the late relay
    assert not ring.relayed
    with fe.socket() as s, selectors.DefaultSelector() as sel:
        s.fileno()
        s.settimeout(TIMEOUT)
        s.connect(srv.address)
        assert s._st.ring is ring
        sel.register(s, selectors.EVENT_READ)
        s.sendall(b"hello")
        assert [key.fileobj for key, _ in sel.select(TIMEOUT)] == [s]
        assert recv_exactly(s, 5) == b"hello"


def test_notifications_after_consuming_only_for_a_full_ring(
        fe: pvcalls.Frontend, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend waits for a consume only when the in ring was full: a
    64-byte reply costs no notification, a consume from a full ring one."""
    from pvcalls.frontend._ring import DataRing

    notified: list[int] = []
    notify = DataRing.notify

    def counting(ring: DataRing) -> None:
        notified.append(ring.port)
        notify(ring)

    monkeypatch.setattr(DataRing, "notify", counting)
    more = threading.Event()

    def talk_then_flood(conn: socket.socket) -> None:
        for _ in range(20):
            conn.sendall(conn.recv(64))
        more.wait(TIMEOUT)
        conn.sendall(b"y" * 200_000)  # far more than the 32 KiB ring
        conn.recv(1)

    srv = server(talk_then_flood)
    with connected(fe, srv.address) as s:
        ring = s._st.ring
        assert ring is not None
        notified.clear()
        for _ in range(20):
            s.sendall(b"x" * 64)
            assert recv_exactly(s, 64) == b"x" * 64
        assert len(notified) == 20  # the sends only
        assert s.send(b"") == 0
        s.sendall(b"")
        assert len(notified) == 20  # nothing produced, nothing to tell
        notified.clear()
        more.set()
        wait_until(lambda: ring.in_was_full(_wire_u32(ring, "in_cons")))  # the backend filled it
        assert s.recv(1000) == b"y" * 1000
        assert notified == [ring.port]
        assert recv_exactly(s, 199_000) == b"y" * 199_000  # and the backend refilled it
        s.sendall(b"z")


def _wire_u32(ring: Any, name: str) -> int:
    offset = {"in_cons": _wire.IN_CONS_OFFSET, "in_prod": _wire.IN_PROD_OFFSET}[name]
    return int(struct.unpack_from("=I", ring.indexes, offset)[0])


def test_fileno_and_a_blocked_receiver_both_see_data(fe: pvcalls.Frontend, server: Any) -> None:
    """One thread blocked in recv() (polling the ring's handle itself)
    while another selects on fileno() (the event thread relays): whoever
    takes the backend's event, both wake."""
    srv = server()
    with connected(fe, srv.address) as s, selectors.DefaultSelector() as sel:
        got: list[bytes] = []
        t = threading.Thread(target=lambda: got.append(recv_exactly(s, 5)))
        t.start()
        sel.register(s, selectors.EVENT_READ)
        s.sendall(b"first")
        t.join(TIMEOUT)
        assert got == [b"first"]
        s.sendall(b"again")
        assert [key.fileobj for key, _ in sel.select(TIMEOUT)] == [s]
        assert recv_exactly(s, 5) == b"again"


def test_fileno_before_connect(fe: pvcalls.Frontend, server: Any) -> None:
    srv = server()
    with fe.socket() as s, selectors.DefaultSelector() as sel:
        s.settimeout(TIMEOUT)
        sel.register(s, selectors.EVENT_READ)
        s.connect(srv.address)
        assert sel.select(0) == []
        s.sendall(b"hello")
        assert [key.fileobj for key, _ in sel.select(TIMEOUT)] == [s]
        assert recv_exactly(s, 5) == b"hello"


def test_rings_share_the_frontend_handle_when_no_other_can_be_opened(
        host: SimHost, backend: Any, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the host's limit on event channel handles the data ring's port
    goes on the frontend's own handle and its event thread relays."""
    srv = server()
    with pvcalls.Frontend(host.create_domain("no-more-handles")) as other:
        def refuse() -> Any:
            raise OSError(errno.EMFILE, "too many handles")

        monkeypatch.setattr(other.domain, "evtchn", refuse)
        with connected(other, srv.address) as s:
            assert s._st.ring is not None and not s._st.ring.direct
            assert s._st.ring.evtchn is other._evtchn
            data = os.urandom(200_000)
            t = threading.Thread(target=s.sendall, args=(data,))
            t.start()
            assert recv_exactly(s, len(data)) == data
            t.join(TIMEOUT)


def test_a_freed_ring_on_the_shared_handle_unbinds_its_port(
        host: SimHost, backend: Any, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data ring on the frontend's own handle that is freed (not pooled)
    unbinds its port: that handle lives on, and would keep every released
    socket's port bound until the frontend closes.  And its handler goes:
    the hand-out of every port after an overflow, unmasking a port no
    longer bound, would fail the event thread."""
    from pvcalls.frontend import _frontend

    srv = server()
    monkeypatch.setattr(_frontend, "_RING_POOL_MAX", 0)  # every ring is freed
    with pvcalls.Frontend(host.create_domain("shared-handle-free")) as other:
        def refuse() -> Any:
            raise OSError(errno.EMFILE, "too many handles")

        monkeypatch.setattr(other.domain, "evtchn", refuse)
        s = connected(other, srv.address)
        assert s._st.ring is not None and not s._st.ring.direct
        port = s._st.ring.port
        assert other._evtchn is not None
        bound = other._evtchn._ports  # type: ignore[attr-defined]
        assert port in bound
        s.close()  # the ring is freed once the backend answers the RELEASE
        wait_until(lambda: port not in bound)
        assert other._wakeup is not None
        # As the hand-out after an overflow.
        other._handle_port(other._evtchn, port, other._wakeup)


def _on_the_shared_handle(fe: pvcalls.Frontend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put every data ring ``fe`` makes from now on its shared handle."""
    def refuse() -> Any:
        raise OSError(errno.EMFILE, "too many handles")

    monkeypatch.setattr(fe.domain, "evtchn", refuse)


def test_an_overflowed_handle_is_reset_and_loses_no_event(
        host: SimHost, backend: Any, server: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The handle's pending() failing with EFBIG is Linux's evtchn device
    saying that its queue of fired ports overflowed: the ports that fired
    and were not taken are masked, their events lost.  The event thread
    resets the handle and hands every port out again (the command ring's
    answers are taken, the data rings' waiters woken); it failed the
    frontend instead.  Here the command ring's port fires, and is lost,
    while the event thread is held in a data ring's handler."""
    srv = server()
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    with pvcalls.Frontend(host.create_domain("overflowed")) as other:
        _on_the_shared_handle(other, monkeypatch)
        handle = other._evtchn
        assert handle is not None
        with connected(other, srv.address) as s:
            ring = s._st.ring
            assert ring is not None and not ring.direct
            holding, held = threading.Event(), threading.Event()
            on_event = other._handlers[ring.port]

            def hold() -> None:
                if not holding.is_set():
                    holding.set()
                    assert held.wait(TIMEOUT)
                on_event()

            other._handlers[ring.port] = hold
            s.sendall(b"ping")  # its echo fires the data ring's port
            assert holding.wait(TIMEOUT)
            try:
                opening = Call(other.socket)  # its answer fires the command ring's
                assert select.select([handle.fileno()], [], [], TIMEOUT)[0]
                handle.overflow()
            finally:
                held.set()
            opening.join(TIMEOUT)
            assert opening.error is None, opening.error
            opening.result.close()
            assert recv_exactly(s, 4) == b"ping"
            other.socket().close()  # the frontend lives on
            echo_through(s, b"pong")
            assert "handle overflowed: reset" in caplog.text


def test_overflows_under_traffic_hang_no_call_and_lose_no_data(
        host: SimHost, backend: Any, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The frontend's handle overflowing again and again while data goes
    both ways on rings of that handle and commands are in flight: every
    call returns and every byte comes back.  Each overflow comes once the
    event thread has read the handle's queue empty since the last reset,
    as Linux's can overflow again (one that overflows before is broken).

    Between overflows the traffic pauses: each stream finishes the chunk
    it was echoing when the handle overflowed (its events lost with the
    queue, so only the hand-out after the reset lets it finish) and the
    open/close loop its call.  Only then is the handle waited on to be
    read empty: under endless traffic an event thread slower than the
    backend always finds a port pending, and never reads it empty.
    No naps: one would end a stream's wait for an event the reset lost,
    and hide it."""
    _no_naps(monkeypatch)
    srv = server()
    streams = 3
    with pvcalls.Frontend(host.create_domain("overflowing")) as other:
        _on_the_shared_handle(other, monkeypatch)
        handle = other._evtchn
        assert handle is not None
        # Each traffic thread meets the test at both barriers when asked
        # to pause: once stopped, once to go on (or to end).
        stopped = threading.Barrier(streams + 2, timeout=TIMEOUT * 3)
        going = threading.Barrier(streams + 2, timeout=TIMEOUT * 3)
        pause = threading.Event()
        end = threading.Event()
        chunks = [0] * streams  # echoed whole, per stream
        errors: list[BaseException] = []

        def paused() -> bool:
            """At a pause: meet the test; True if the traffic is to end."""
            if not pause.is_set():
                return False
            stopped.wait()
            going.wait()
            return end.is_set()

        def failed(exc: BaseException) -> None:
            errors.append(exc)
            stopped.abort()  # the test stops waiting for this thread
            going.abort()

        def echo_some(seed: int) -> None:
            try:
                with connected(other, srv.address) as s:
                    assert s._st.ring is not None and not s._st.ring.direct
                    while not paused():
                        data = os.urandom(100_000 + seed)
                        sender = Call(lambda data=data: s.sendall(data))
                        assert recv_exactly(s, len(data)) == data
                        sender.join(TIMEOUT)
                        assert sender.error is None, sender.error
                        chunks[seed] += 1
            except BaseException as exc:
                failed(exc)

        def open_and_close() -> None:
            try:
                while not paused():
                    other.socket().close()
            except BaseException as exc:
                failed(exc)

        def meet(barrier: threading.Barrier) -> None:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                raise AssertionError(f"a call hangs, or failed: {errors}") from None

        def flowing(since: list[int]) -> bool:
            return bool(errors) or all(now > then for now, then in zip(chunks, since, strict=True))

        threads = [threading.Thread(target=echo_some, args=(i,)) for i in range(streams)]
        threads.append(threading.Thread(target=open_and_close))
        for t in threads:
            t.start()
        try:
            for overflows in range(1, 6):
                # Under traffic: every stream has echoed a chunk since it
                # went on, and is at its next.
                since = list(chunks)
                wait_until(functools.partial(flowing, since))
                handle.overflow()  # type: ignore[attr-defined]
                pause.set()
                meet(stopped)  # every call returned, every chunk came back
                # Reset by the event thread (or the frontend failed), then
                # one event after the reset (it counted before it cleared
                # the overflow): the round that takes it reads the handle
                # empty, with no traffic to keep a port pending.
                wait_until(lambda: not handle._overflowed)  # type: ignore[attr-defined]
                other.socket().close()
                wait_until(lambda: other._resets == 0)
                # Said before they go on, so that each sees it.
                if overflows == 5:
                    end.set()
                pause.clear()
                meet(going)
        except BaseException:
            # No thread waits for the test at a barrier.  Not on success:
            # a thread yet to wake from the last would find it broken.
            stopped.abort()
            going.abort()
            raise
        finally:
            for t in threads:
                t.join(TIMEOUT * 3)
        assert not any(t.is_alive() for t in threads), "a call hangs"
        assert not errors, errors
        with connected(other, srv.address) as s:  # and the frontend still works
            echo_through(s, b"after")


def test_a_handle_that_overflows_again_at_once_fails_the_frontend(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Linux's reset empties the handle's queue of fired ports: one that
    overflows again before it was once read empty since, reset after
    reset, is broken.  The event thread reset it for ever, at full speed
    (a reset, a hand-out of every port and a warning per round); after a
    few resets in a row it fails the frontend, as a handle that fails
    otherwise does: every call fails with EIO, saying why.  At once: not
    taken for a failure that a hand-out of every port may get over."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    with pvcalls.Frontend(host.create_domain("overflowing-for-good")) as other:
        handle = other._evtchn
        thread = other._thread
        assert handle is not None and thread is not None
        real_reset = handle.reset
        resets: list[None] = []

        def reset() -> None:
            real_reset()
            resets.append(None)
            handle.overflow()  # type: ignore[attr-defined]

        monkeypatch.setattr(handle, "reset", reset)
        handle.overflow()  # type: ignore[attr-defined]
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the event thread resets the handle for ever"
        assert len(resets) == RESETS_IN_A_ROW
        with pytest.raises(OSError) as info:
            other.socket()
        assert info.value.errno == errno.EIO
        assert "overflowed again" in info.value.strerror, info.value.strerror
        assert f"OSError: [Errno {errno.EFBIG}]" in info.value.strerror, info.value.strerror
        # The error logged says which overflow it was.
        [failed] = [r for r in caplog.records if "its event thread failed" in r.getMessage()]
        assert failed.exc_info is not None
        logged = failed.exc_info[1]
        assert isinstance(logged, OSError) and isinstance(logged.__cause__, OSError)
        assert logged.__cause__.errno == errno.EFBIG
        # Failed once, not first retried as a failure a hand-out gets over.
        assert [r.getMessage() for r in caplog.records
                if "event thread failed; every port" in r.getMessage()] == []


def test_a_handle_that_overflows_again_after_one_reset_lives_on(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-out after a reset unmasks every port, and a storm on every
    port may overflow the queue once more before it is read: two resets
    in a row are no broken handle.  The frontend resets it again, and
    lives on."""
    with pvcalls.Frontend(host.create_domain("overflowing-twice")) as other:
        handle = other._evtchn
        assert handle is not None
        real_reset = handle.reset
        resets: list[None] = []

        def reset() -> None:
            real_reset()
            resets.append(None)
            if len(resets) == 1:
                handle.overflow()  # type: ignore[attr-defined]

        monkeypatch.setattr(handle, "reset", reset)
        handle.overflow()  # type: ignore[attr-defined]
        wait_until(
            lambda: len(resets) == 2 and not handle._overflowed)  # type: ignore[attr-defined]
        other.socket().close()  # its answer is taken: the event thread lives
        assert not other._dead


def test_overflows_are_logged_within_a_rate_limit(
        host: SimHost, backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Each overflow after the handle was read empty is reset, as often as
    it comes; its warning goes out within the kernel's rate limit (10 per
    5 s), not once per reset, and the others are counted: by the close()
    at the latest."""
    from xenback.ratelimit import DEFAULT_RATELIMIT_BURST, DEFAULT_RATELIMIT_INTERVAL

    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    with pvcalls.Frontend(host.create_domain("overflowing-often")) as other:
        handle = other._evtchn
        assert handle is not None

        began = time.monotonic()
        for _ in range(3 * DEFAULT_RATELIMIT_BURST):
            handle.overflow()  # type: ignore[attr-defined]
            wait_until(lambda: not handle._overflowed)  # type: ignore[attr-defined]
            # One event after the reset (it counted before it cleared the
            # overflow): the round that takes it reads the handle empty.
            # Not one per check: a thread slower than the checks would
            # find a fresh event each time it looked, never an empty queue.
            other.socket().close()
            wait_until(lambda: other._resets == 0)
        windows = 1 + (time.monotonic() - began) // DEFAULT_RATELIMIT_INTERVAL
        said = [r for r in caplog.records if "overflowed: reset" in r.getMessage()]
        assert 0 < len(said) <= DEFAULT_RATELIMIT_BURST * windows
        assert not other._dead
    counted = [r.args[1] for r in caplog.records  # type: ignore[index]
               if r.getMessage().startswith(f"pvcalls frontend of domain {other.domain.domid}: ")
               and "suppressed" in r.getMessage()]
    assert len(said) + sum(counted) == 3 * DEFAULT_RATELIMIT_BURST  # type: ignore[arg-type]


def _data_once_told(server: Any, go: threading.Event, *, first: bytes = b"") -> Any:
    """A server that sends ``first`` at once, b"data" once ``go`` is set,
    then echoes."""
    def later(conn: socket.socket) -> None:
        if first:
            conn.sendall(first)
        assert go.wait(TIMEOUT)
        conn.sendall(b"data")
        echo(conn)

    return server(later)


def test_a_rings_own_handle_overflowed_is_reset_by_its_waiter(
        fe: pvcalls.Frontend, server: Any) -> None:
    """A data ring's own handle (one port, always taken before it is
    unmasked: Linux's would not overflow) that reports EFBIG all the
    same is reset by whoever waits on it, and its port taken as fired:
    the waiter did not reset it and spun on the readable descriptor."""
    go = threading.Event()
    srv = _data_once_told(server, go)
    with connected(fe, srv.address) as s:
        ring = s._st.ring
        assert ring is not None and ring.direct
        call = blocked_recv(s)
        try:
            ring.evtchn.overflow()  # type: ignore[attr-defined]
            wait_until(lambda: not ring.evtchn._overflowed)  # type: ignore[attr-defined]
        finally:
            go.set()
        assert call.join().result == b"data"
        echo_through(s, b"more")


def test_a_rings_own_handle_overflowed_with_its_port_fired_is_unmasked_after_the_reset(
        fe: pvcalls.Frontend, server: Any) -> None:
    """The reset leaves a port that fired and was not taken masked, as if
    taken: the waiter that reset the handle takes the port as fired and
    unmasks it.  Left masked, the ring's events no longer came: its
    waiters saw the data only as their naps ended."""
    go = threading.Event()
    srv = _data_once_told(server, go, first=b"ping")
    with connected(fe, srv.address) as s:
        ring = s._st.ring
        assert ring is not None and ring.direct
        # The ping fires the ring's port, which nobody takes, and then the
        # handle overflows: the reset that the first wait makes masks it.
        assert select.select([ring.evtchn.fileno()], [], [], TIMEOUT)[0]
        ring.evtchn.overflow()  # type: ignore[attr-defined]
        call = Call(lambda: recv_exactly(s, 8))  # the ping at once, then a wait
        try:
            wait_until(lambda: not ring.evtchn._overflowed)  # type: ignore[attr-defined]
        finally:
            go.set()
        assert call.join().result == b"pingdata"
        echo_through(s, b"more")
        # Only a waiter takes (and so masks) the port, and none is left.
        assert not ring.evtchn._ports[ring.port].masked  # type: ignore[attr-defined]


def _overflowing_after_every_reset(ring: Any, monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """Have ``ring``'s own handle overflow now, and again at once after
    every reset: a handle broken for good.  The list returned grows by
    one per reset."""
    handle = ring.evtchn
    real_reset = handle.reset
    resets: list[None] = []

    def reset() -> None:
        real_reset()
        resets.append(None)
        handle.overflow()

    monkeypatch.setattr(handle, "reset", reset)
    handle.overflow()
    return resets


def test_a_rings_own_handle_that_overflows_again_at_once_fails_its_socket(
        fe: pvcalls.Frontend, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A data ring's own handle that overflows again after every reset is
    broken: its waiter reset it, took the port as fired and polled it
    again at once, spinning until its timeout (for ever without one).
    After as many resets in a row as the frontend's shared handle gets,
    every call of the socket that waits for the ring fails with EIO,
    saying why (not the frontend, whose other sockets go on).  Counted in
    resets, not in time."""
    go = threading.Event()
    srv = _data_once_told(server, go)
    with connected(fe, srv.address) as s:
        ring = s._st.ring
        assert ring is not None and ring.direct
        call = blocked_recv(s)
        try:
            resets = _overflowing_after_every_reset(ring, monkeypatch)
            call.join(TIMEOUT)
        finally:
            go.set()
        assert isinstance(call.error, OSError), call.error
        assert call.error.errno == errno.EIO
        assert "overflowed again" in call.error.strerror, call.error.strerror
        assert len(resets) == RESETS_IN_A_ROW
        wait_until(ring.in_pending)  # the data the ring holds is read still
        assert s.recv(4) == b"data"
        for failing in (lambda: s.recv(4), lambda: s.recv(4, socket.MSG_DONTWAIT)):
            with pytest.raises(OSError) as info:
                failing()
            assert info.value.errno == errno.EIO
        fd = s.fileno()  # readable: recv() fails at once
        assert select.select([fd], [], [], 0)[0] == [fd]
        assert len(resets) == RESETS_IN_A_ROW  # no waiter asks it again
    with connected(fe, srv.address) as other:  # the frontend goes on
        go.set()
        assert recv_exactly(other, 4) == b"data"
        echo_through(other, b"more")



def test_a_rings_own_handle_that_overflows_now_and_then_goes_on(
        fe: pvcalls.Frontend, server: Any) -> None:
    """Overflows of a ring's own handle with its port taken between them
    (the handle working again after each reset) are no resets in a row:
    however many there are, the ring goes on."""
    srv = server()
    with connected(fe, srv.address) as s:
        ring = s._st.ring
        assert ring is not None and ring.direct
        for _ in range(RESETS_IN_A_ROW + 1):
            ring.evtchn.overflow()
            assert ring.consume_events()  # reset: taken as fired
            s.sendall(b"x")
            wait_until(ring.in_pending)  # the echo, then its event
            assert select.select([ring.evtchn.fileno()], [], [], TIMEOUT)[0]
            assert ring.consume_events()  # taken: the handle works again
            assert recv_exactly(s, 1) == b"x"
        assert ring.failure is None
        echo_through(s, b"more")



def _no_naps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waits that end only when something wakes them: no nap of
    ``RECHECK`` (a second) ends them and hides a wake-up that never came."""
    monkeypatch.setattr(_common, "RECHECK", 3600.0)


def test_a_waiter_on_a_rings_own_handle_is_woken_by_the_rings_event(
        fe: pvcalls.Frontend, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blocked recv() on a ring with a handle of its own (no readiness
    descriptor: nobody relays it) polls that handle: the backend's event
    wakes it.  Polling its wakefd alone, it saw the data only as its
    nap ended."""
    _no_naps(monkeypatch)
    go = threading.Event()
    srv = _data_once_told(server, go)
    with connected(fe, srv.address) as s:
        ring = s._st.ring
        assert ring is not None and ring.direct and not ring.relayed
        call = blocked_recv(s)
        go.set()
        assert call.join().result == b"data"


def test_a_waiter_on_the_shared_handle_is_woken_by_the_rings_event(
        host: SimHost, backend: Any, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, for a ring on the frontend's shared handle: the event
    thread takes its event and wakes the blocked recv() (PVSocket._on_event
    notifying its condition), which no nap's end would stand in for."""
    _no_naps(monkeypatch)
    go = threading.Event()
    srv = _data_once_told(server, go)
    # A frontend of its own: the module's has rings of their own handles
    # in its pool.
    with pvcalls.Frontend(host.create_domain("woken-on-the-shared-handle")) as other:
        _on_the_shared_handle(other, monkeypatch)
        with connected(other, srv.address) as s:
            ring = s._st.ring
            assert ring is not None and not ring.direct
            call = blocked_recv(s)
            go.set()
            assert call.join().result == b"data"


def test_taking_a_rings_own_event_says_whether_its_port_fired(
        fe: pvcalls.Frontend, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """consume_events() is True only for a port that fired: a waiter told
    True takes the ring's state as news.  And a handle that fails
    otherwise than by overflowing (EFBIG) raises that error: it is not
    reset, nor the port taken as fired."""
    srv = server()
    with connected(fe, srv.address) as s:
        ring = s._st.ring
        assert ring is not None and ring.direct
        ring.consume_events()  # whatever came with the connect
        assert not ring.consume_events()
        s.sendall(b"x")
        wait_until(ring.in_pending)  # the echo, then its event
        assert select.select([ring.evtchn.fileno()], [], [], TIMEOUT)[0]
        assert ring.consume_events()
        resets: list[None] = []
        with monkeypatch.context() as m:
            def pending() -> None:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))

            m.setattr(ring.evtchn, "pending", pending)
            m.setattr(ring.evtchn, "reset", lambda: resets.append(None))
            with pytest.raises(OSError) as info:
                ring.consume_events()
        assert info.value.errno == errno.EBADF
        assert resets == [] and ring.failure is None
        assert recv_exactly(s, 1) == b"x"
        echo_through(s, b"more")


@pytest.mark.parametrize("unbind_fails", [False, True])
def test_a_data_ring_that_cannot_be_made_whole_gives_back_what_it_took(
        fe: pvcalls.Frontend, monkeypatch: pytest.MonkeyPatch, unbind_fails: bool) -> None:
    """Short of descriptors for its eventfds, a new data ring unshares the
    pages it granted and unbinds the port it bound, and the error that
    stopped it goes out: also when the unbind fails (it is only logged),
    or the pages stayed granted for good and the unbind's error hid why."""
    from pvcalls.frontend import _ring

    gntshr, handle = fe._gntshr, fe.domain.evtchn()
    assert gntshr is not None
    shared: list[Any] = []
    bound: list[int] = []
    real_share, real_bind = gntshr.share_pages, handle.bind_unbound_port

    def share_pages(*args: Any) -> Any:
        shared.append(real_share(*args))
        return shared[-1]

    def bind_unbound_port(*args: Any) -> int:
        bound.append(real_bind(*args))
        return bound[-1]

    def eventfd(*args: Any) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    def unbind(port: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    try:
        with monkeypatch.context() as m:
            m.setattr(gntshr, "share_pages", share_pages)
            m.setattr(handle, "bind_unbound_port", bind_unbound_port)
            m.setattr(_ring.os, "eventfd", eventfd)
            if unbind_fails:
                m.setattr(handle, "unbind", unbind)
            with pytest.raises(OSError) as info:
                _ring.DataRing(gntshr, handle, fe.backend_id, 0, direct=True)
        assert info.value.errno == errno.EMFILE
        assert len(shared) == 1 and len(bound) == 1
        with pytest.raises(ValueError, match="unshared"):
            assert shared[0].buffer is None
        if not unbind_fails:
            with pytest.raises(OSError):
                handle.unbind(bound[0])  # unbound already
    finally:
        handle.close()  # the caller's still


def test_a_recycled_ring_starts_with_no_resets(fe: pvcalls.Frontend, server: Any) -> None:
    """The resets in a row of a ring's own handle are its socket's: the
    next socket that gets the ring recycled has as many before its ring
    is taken for broken as a new one."""
    srv = server()
    with connected(fe, srv.address) as s:
        ring = s._st.ring
        assert ring is not None and ring.direct
    wait_until(lambda: ring in fe._ring_pool)  # released (asynchronously)
    for _ in range(RESETS_IN_A_ROW - 1):  # nobody else takes its events now
        ring.evtchn.overflow()
        assert ring.consume_events()
    ring.evtchn.overflow()  # and once more, for the recycling to reset
    with connected(fe, srv.address) as s:
        assert s._st.ring is ring
        # One reset in a row so far, the recycling's: as many to come as
        # for a new ring's handle that overflowed once.
        for _ in range(RESETS_IN_A_ROW - 1):
            ring.evtchn.overflow()
            assert ring.consume_events()
        assert ring.failure is None


def test_a_rings_own_handle_taken_for_broken_says_so_once(
        fe: pvcalls.Frontend, server: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The verdict on a ring whose own handle overflows after every reset
    is logged once, however many calls meet it afterwards."""
    srv = server()
    with connected(fe, srv.address) as s:
        ring = s._st.ring
        assert ring is not None and ring.direct
        _overflowing_after_every_reset(ring, monkeypatch)
        with caplog.at_level(logging.WARNING, logger="pvcalls.frontend"):
            for _ in range(RESETS_IN_A_ROW):
                assert ring.consume_events()
            for _ in range(3):
                with pytest.raises(OSError) as info:
                    ring.consume_events()
                assert info.value.errno == errno.EIO
        said = [r for r in caplog.records if "data ring on port" in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in said]



def test_a_rings_own_handle_whose_reset_fails_is_taken_for_broken(
        fe: pvcalls.Frontend, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reset that fails counts among the resets in a row: a handle that
    cannot be reset is broken too, not reset again at every call."""
    srv = server()
    with connected(fe, srv.address) as s:
        ring = s._st.ring
        assert ring is not None and ring.direct
        handle = ring.evtchn

        def reset() -> None:
            raise OSError(errno.EIO, "no reset today")

        monkeypatch.setattr(handle, "reset", reset)
        handle.overflow()
        for _ in range(RESETS_IN_A_ROW):
            with pytest.raises(OSError, match="no reset today"):
                ring.consume_events()
        with pytest.raises(OSError) as info:
            ring.consume_events()
        assert info.value.errno == errno.EIO
        assert ring.failure is not None and "overflowed again" in ring.failure


def test_a_relayed_rings_own_handle_that_overflows_again_at_once_is_relayed_no_more(
        fe: pvcalls.Frontend, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the socket selected (its fileno() given out) and nobody in
    its calls, the event thread takes the ring's events: a handle that
    overflows again after every reset had the thread spin on it.  After
    the resets in a row the ring failed, its handle is watched no more,
    and fileno() says readable: the call that comes fails with EIO."""
    srv = server()
    with connected(fe, srv.address) as s:
        ring = s._st.ring
        assert ring is not None and ring.direct
        fd = s.fileno()
        wait_until(lambda: ring.relayed)
        resets = _overflowing_after_every_reset(ring, monkeypatch)
        assert select.select([fd], [], [], TIMEOUT)[0]
        wait_until(lambda: not ring.relayed)
        assert len(resets) == RESETS_IN_A_ROW
        with pytest.raises(OSError) as info:
            s.recv(4, socket.MSG_DONTWAIT)
        assert info.value.errno == errno.EIO
        assert len(resets) == RESETS_IN_A_ROW
    with connected(fe, srv.address) as other:
        echo_through(other, b"more")


@pytest.mark.parametrize("batch", [None, 1], ids=["rounds as long as they take", "one port"])
def test_the_event_thread_hands_out_only_the_ports_that_fired(
        fe: pvcalls.Frontend, server: Any, monkeypatch: pytest.MonkeyPatch,
        batch: int | None) -> None:
    """With nothing failing, each port the event thread hands out is one
    the shared handle said fired: every port is handed out again only
    after a failure or a reset (a round that said so when it had not
    cost every event a call of every port's handler).  Also a round that
    stops at its _PORT_BATCH (here of one port, for every round to)."""
    if batch is not None:
        monkeypatch.setattr(_frontend, "_PORT_BATCH", batch)
    evtchn = fe._evtchn
    assert evtchn is not None
    taken: list[int] = []
    handled: list[int] = []
    real_pending, real_handle_port = evtchn.pending, fe._handle_port

    def pending() -> int | None:
        port = real_pending()
        if port is not None:
            taken.append(port)
        return port

    def handle_port(evtchn: Any, port: int, wakeup: Any) -> None:
        handled.append(port)
        real_handle_port(evtchn, port, wakeup)

    monkeypatch.setattr(evtchn, "pending", pending)
    monkeypatch.setattr(fe, "_handle_port", handle_port)
    srv = server()
    for _ in range(3):  # commands, each answered on the command ring
        with connected(fe, srv.address) as s:
            echo_through(s, b"x")
    assert taken
    # One may have been taken just before the patch, and handled after it.
    extra = collections.Counter(handled) - collections.Counter(taken)
    assert sum(extra.values()) <= 1, (handled, taken)


def test_many_threads_many_sockets(fe: pvcalls.Frontend, server: Any) -> None:
    srv = server()
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            data = os.urandom(50_000 + seed)
            with connected(fe, srv.address) as s:
                for i in range(0, len(data), 7000):
                    s.sendall(data[i : i + 7000])
                    assert recv_exactly(s, len(data[i : i + 7000])) == data[i : i + 7000]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
    assert not errors, errors


# -- passive sockets --------------------------------------------------------------


def test_bind_listen_accept_from_host(fe: pvcalls.Frontend, backend: Any, guest: Any) -> None:
    with fe.socket() as ls:
        ls.settimeout(TIMEOUT)
        ls.bind(("127.0.0.1", 0))
        assert ls.getsockname() == ("127.0.0.1", 0)
        ls.listen()
        address = listen_address(backend, guest.domid, ls.id)
        with socket.create_connection(address, timeout=TIMEOUT) as client:
            conn, peer = ls.accept()
            with conn:
                assert peer == ("0.0.0.0", 0)
                conn.settimeout(TIMEOUT)
                client.sendall(b"to the guest")
                assert recv_exactly(conn, 12) == b"to the guest"
                conn.sendall(b"to the host")
                assert recv_exactly(client, 11) == b"to the host"
                conn.close()
                assert client.recv(10) == b""  # RELEASE closed the host socket


def test_accept_timeout_keeps_poll_in_flight(fe: pvcalls.Frontend, backend: Any,
                                             guest: Any) -> None:
    with fe.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(4)
        ls.settimeout(0.1)
        with pytest.raises(TimeoutError):
            ls.accept()
        ls.setblocking(False)
        with pytest.raises(BlockingIOError):
            ls.accept()
        address = listen_address(backend, guest.domid, ls.id)
        with selectors.DefaultSelector() as sel:
            sel.register(ls, selectors.EVENT_READ)
            assert sel.select(0) == []
            with socket.create_connection(address, timeout=TIMEOUT) as client:
                assert [k.fileobj for k, _ in sel.select(TIMEOUT)] == [ls]
                ls.settimeout(TIMEOUT)
                conn, _ = ls.accept()
                with conn:
                    client.sendall(b"x")
                    conn.settimeout(TIMEOUT)
                    assert conn.recv(1) == b"x"


def test_listen_needs_bind_and_accept_needs_listen(fe: pvcalls.Frontend) -> None:
    with fe.socket() as s:
        with pytest.raises(OSError) as info:
            s.listen()
        assert info.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as info:
            s.accept()
        assert info.value.errno == errno.EINVAL


def test_listen_on_a_connected_socket_is_einval_as_for_socket_socket(
    fe: pvcalls.Frontend, server: Any
) -> None:
    """Not EOPNOTSUPP "needs bind() first": binding would not help either
    (bind() on it is EINVAL too)."""
    srv = server()
    with connected(fe, srv.address) as s, socket.create_connection(srv.address) as real:
        for sock in (s, real):
            with pytest.raises(OSError) as info:
                sock.listen()
            assert info.value.errno == errno.EINVAL, (sock, info.value)
        echo_through(s, b"still connected")


def test_bind_address_in_use(fe: pvcalls.Frontend) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        with fe.socket() as s, pytest.raises(OSError) as info:
            s.bind(taken.getsockname())
        assert info.value.errno == errno.EADDRINUSE
    finally:
        taken.close()


def test_listen_takes_the_backlogs_socket_socket_takes(fe: pvcalls.Frontend) -> None:
    """An integer that fits a C int, a negative one meaning 0; a string or
    a float is a TypeError, not a backlog of int(it)."""
    with fe.socket() as s, socket.socket() as real:
        s.bind(("127.0.0.1", 0))
        real.bind(("127.0.0.1", 0))
        for backlog, error in [("5", TypeError), (1.5, TypeError),
                               (2**31, OverflowError), (-2**31 - 1, OverflowError)]:
            for sock in (s, real):
                with pytest.raises(error):
                    sock.listen(backlog)
        s.listen(-5)
        real.listen(-5)
        assert repr(s) == f"<PVSocket id={s.id:#x} listening>"


def test_listen_on_a_port_another_socket_listens_on(fe: pvcalls.Frontend) -> None:
    """Two sockets may bind one port (the backend sets SO_REUSEADDR), one
    may listen; the other listens once the port is free again."""
    free = socket.create_server(("127.0.0.1", 0))
    address = free.getsockname()
    free.close()
    with fe.socket() as first, fe.socket() as second:
        first.bind(address)
        second.bind(address)
        first.listen()
        with pytest.raises(OSError) as info:
            second.listen()
        assert info.value.errno == errno.EADDRINUSE
        first.close()
        second.listen()
        second.settimeout(TIMEOUT)
        with socket.create_connection(address, timeout=TIMEOUT):
            conn, _ = second.accept()
            conn.close()


def test_fileno_before_listen_waits_for_connections(
    fe: pvcalls.Frontend, backend: Any, guest: Any
) -> None:
    """select() on a socket asked for its fileno() while only bound: once
    it listens, a pending connection makes it readable."""
    with fe.socket() as ls, selectors.DefaultSelector() as sel:
        ls.bind(("127.0.0.1", 0))
        sel.register(ls, selectors.EVENT_READ)
        ls.listen()
        assert sel.select(0) == []
        address = listen_address(backend, guest.domid, ls.id)
        with socket.create_connection(address, timeout=TIMEOUT):
            assert [key.fileobj for key, _ in sel.select(TIMEOUT)] == [ls]
            ls.settimeout(TIMEOUT)
            conn, _ = ls.accept()
            conn.close()


@pytest.mark.timeout(300)
def test_a_listen_interrupted_anywhere_after_fileno_still_polls(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing anywhere in listen() on a socket whose fileno()
    a selector holds, and the program going on with it (calling listen()
    again only if the LISTEN never went out): with no further fileno(), a
    pending connection makes the descriptor readable.  The answer's own
    mark (see PVSocket._on_success), on the event thread, sends the POLL
    that a Ctrl-C in listen()'s may have cut short."""
    within = os.path.dirname(_frontend.__file__)
    with pvcalls.Frontend(host.create_domain("listen-interrupted"), timeout=TIMEOUT) as fe:
        listens: list[Any] = []
        submit = fe._submit

        def recording(slot: Any, *args: Any, **kwargs: Any) -> int:
            if slot.cmd == _wire.PVCALLS_LISTEN:
                listens.append(slot)
            return submit(slot, *args, **kwargs)

        monkeypatch.setattr(fe, "_submit", recording)
        for n in itertools.count():
            with fe.socket() as ls:
                ls.bind(("127.0.0.1", 0))
                fd = ls.fileno()
                del listens[:]
                where = interrupted_at(n, within, ls.listen)
                said = f"interrupted {where or 'nowhere'}"
                if listens and listens[-1].sent:
                    wait_until(lambda ls=ls: ls._st.listening)
                else:
                    ls.listen()
                with socket.create_connection(
                        listen_address(backend, fe.domain.domid, ls.id), timeout=TIMEOUT):
                    assert select.select([fd], [], [], TIMEOUT)[0], f"{said}: never readable"
                    ls.settimeout(TIMEOUT)
                    ls.accept()[0].close()
            if not where:
                break
        assert n >= 20  # it landed past the LISTEN's answer, in listen()'s own mark


def test_close_wakes_accept(fe: pvcalls.Frontend) -> None:
    ls = fe.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    acceptor = Call(ls.accept)
    # The accept is parked once its POLL is in flight.
    with ls._cond:
        assert ls._cond.wait_for(lambda: ls._poll_inflight, TIMEOUT)
    ls.close()
    assert acceptor.oserror().errno == errno.EBADF


def test_close_wakes_accept_whose_poll_its_release_answered(fe: pvcalls.Frontend) -> None:
    """close() while accept() is between sending its POLL and looking at
    the answer: the RELEASE cuts the POLL short, which the backend answers
    -EINTR (as Linux's does), and the answer is in before accept() looks.
    accept() says EBADF, as socket.socket's does when another thread closes
    it, not the EINTR it took for the POLL's own error (EPROTO)."""
    ls = fe.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    looking = PauseAt(pvcalls.PVSocket._wait_pending_connection, "err = 0")
    acceptor = Call(lambda: looking.run(ls.accept))
    try:
        assert looking.reached.wait(TIMEOUT)
        assert ls._poll_inflight
        # On a thread: close() then waits for the accept lock accept() holds.
        closing = Attempt(ls.close)
        with ls._cond:
            assert ls._cond.wait_for(lambda: ls._poll_error, TIMEOUT)
        assert _errno.name_of(ls._poll_error) == "EINTR"
    finally:
        looking.resume()
    assert acceptor.oserror().errno == errno.EBADF
    assert closing.result() is None


def test_close_wakes_accept_whose_accept_its_release_answered(
        fe: pvcalls.Frontend, backend: Any, guest: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with the ACCEPT: close() while accept() is about to wait
    for its ACCEPT's answer, which the backend has not given (its host
    accept() would block), and the RELEASE's -EINTR for it is in before
    accept() looks: EBADF, not EPROTO."""
    serve = PassiveSocket._serve

    def no_connection_yet(self: PassiveSocket, request: Any, new: Any) -> int | None:
        return None if new is not None else serve(self, request, new)

    monkeypatch.setattr(PassiveSocket, "_serve", no_connection_yet)
    ls = fe.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    waiting = PauseAt(pvcalls.PVSocket.accept, "ret = self._fe._wait_slot(")
    with socket.create_connection(listen_address(backend, guest.domid, ls.id), timeout=TIMEOUT):
        acceptor = Call(lambda: waiting.run(ls.accept))
        try:
            assert waiting.reached.wait(TIMEOUT)
            assert ls._st.accept_inflight is not None
            _, slot, _ = ls._st.accept_inflight
            # On a thread: close() then waits for the accept lock accept() holds.
            closing = Attempt(ls.close)
            with fe._lock:
                assert fe._cmd_cond.wait_for(lambda: slot.done, TIMEOUT)
            assert _errno.name_of(slot.ret) == "EINTR"
        finally:
            waiting.resume()
        assert acceptor.oserror().errno == errno.EBADF
        assert closing.result() is None


# -- the frontend itself ------------------------------------------------------------


def test_frontend_lifecycle(host: SimHost, backend: Any, server: Any) -> None:
    guest = host.create_domain("short-lived")
    srv = server()
    fe = pvcalls.Frontend(guest)
    with fe:
        device = fe.device
        with guest.xenstore() as xs:
            state = xs.read(f"{device.frontend_path}/state".encode())
            assert state == b"4"
            assert xs.read(f"{device.frontend_path}/version".encode()) == b"1"
        s = connected(fe, srv.address)
        s.sendall(b"abc")
        assert recv_exactly(s, 3) == b"abc"
        assert any(r.domain == guest.domid for r in backend.stats().sockets)
        # Left open on purpose: closing the frontend releases it.
    assert s.closed
    assert not any(r.domain == guest.domid for r in backend.stats().sockets)
    with host.dom0.xenstore() as xs:
        assert not xs.exists(device.backend_path.encode())
    with pytest.raises(OSError):
        fe.socket()
    fe.close()  # idempotent


def test_open_twice_is_refused(fe: pvcalls.Frontend) -> None:
    device = fe.device
    with pytest.raises(RuntimeError, match="already open"):
        fe.open()
    assert fe.device is device
    with fe.socket():
        pass


@pytest.mark.parametrize(("timeout", "exc"), [
    (None, TypeError), ("10", TypeError), (0, ValueError), (-1, ValueError),
    (math.nan, ValueError), (math.inf, OverflowError),
])
def test_a_bad_timeout_is_refused_at_once(guest: Any, timeout: Any,
                                           exc: type[Exception]) -> None:
    """Not at open(), with a TypeError from deep inside or a handshake
    "timed out" at once that blames the backend."""
    with pytest.raises(exc, match="timeout"):
        pvcalls.Frontend(guest, timeout=timeout)


@pytest.mark.parametrize(("domain", "kwargs", "exc", "message"), [
    (None, {}, TypeError, "^domain must be a guest's Platform with a toolstack "
                          r"\(a xenback.sim.Domain\), not NoneType$"),
    ("guest", {"backend_id": "0"}, TypeError, "^backend_id must be an int, not str$"),
    ("guest", {"backend_id": 0.0}, TypeError, "^backend_id must be an int, not float$"),
    ("guest", {"backend_id": -1}, ValueError, "^backend_id must be a domain id "
                                             r"\(0 to 32751\), got -1$"),
    ("guest", {"backend_id": 0x7FF0}, ValueError, "got 32752$"),
    ("guest", {"devid": True}, TypeError, "^devid must be an int, not bool$"),
    ("guest", {"devid": -1}, ValueError, "^devid must be at least 0, got -1$"),
    # Not settimeout()'s "a float, an int or None": a frontend takes no None.
    ("guest", {"timeout": "1"}, TypeError, "^timeout must be a number of seconds, not str$"),
    ("guest", {"timeout": None}, TypeError, "^timeout must be a number of seconds, not NoneType$"),
])
def test_a_bad_argument_is_refused_at_once(guest: Any, domain: Any, kwargs: dict[str, Any],
                                           exc: type[Exception], message: str) -> None:
    """As a bad timeout: by the constructor, as a TypeError for a wrong type,
    not at open() by the toolstack (a ValueError even for backend_id="0")
    or as a missing attribute."""
    with pytest.raises(exc, match=message):
        pvcalls.Frontend(guest if domain == "guest" else domain, **kwargs)


def test_the_domain_check_reads_no_property(guest: Any) -> None:
    """A platform that is no guest's (no toolstack) is told so whatever
    its properties would do if read: isinstance() against the Platform
    Protocol reads them on Python 3.11, and let their error out instead."""

    class Asking:
        @property
        def domid(self) -> int:
            raise RuntimeError("domid read by a type check")

        run_dir = guest.run_dir
        xenstore = gnttab = gntshr = evtchn = staticmethod(lambda: None)

    with pytest.raises(TypeError, match="^domain must be a guest's Platform with a toolstack "):
        pvcalls.Frontend(Asking())


def test_linux_enotsupp_is_eopnotsupp_and_unnamed_errors_eio() -> None:
    from pvcalls.frontend._common import host_error

    assert host_error(-524, "poll").errno == errno.EOPNOTSUPP
    assert host_error(-9999, "poll").errno == errno.EIO
    assert host_error(-111, "connect").errno == errno.ECONNREFUSED


def test_socket_ids_look_like_pointers_and_are_unique(fe: pvcalls.Frontend) -> None:
    socks = [fe.socket() for _ in range(3)]
    ids = [s.id for s in socks]
    for s in socks:
        s.close()
    assert len(set(ids)) == 3
    assert all(i >> 63 for i in ids)  # kernel-half pointers, as Linux sends
    # Aligned as a slab object's address is: no two ids one byte apart.
    assert all(i % 0x100 == 0 for i in ids)
    with fe.socket() as s:
        assert s.id not in ids


# -- on the wire: what Linux's pvcalls-front sends ------------------------------------


def test_requests_on_the_wire_are_linux_like(
    fe: pvcalls.Frontend, backend: Any, guest: Any, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pvcalls import _wire
    from pvcalls.frontend import FRONTEND_RING_ORDER

    ring = fe._ring
    assert ring is not None
    sent: list[tuple[int, int, int, bytes]] = []
    push = ring.push_request

    def record(req: bytes) -> None:
        r = _wire.ffi.from_buffer("struct xen_pvcalls_request *", req)
        slot = ring.req_prod_pvt & (_wire.RING_SLOTS - 1)
        assert r.req_id == slot  # req_id is the slot index
        sent.append((r.cmd, r.u.socket.id, r.u.connect.len, bytes(req)))
        push(req)

    monkeypatch.setattr(ring, "push_request", record)
    in_error_at_free: list[int] = []
    freed = threading.Condition()
    give_back = fe._give_back

    def give_back_and_record(holder: Any, *, reusable: bool) -> None:
        ring = holder.ring
        if ring is not None:
            with freed:
                in_error_at_free.append(ring.in_error())
                freed.notify_all()
            assert _wire.ffi.from_buffer("struct pvcalls_data_intf *",
                                         ring.indexes).ring_order == FRONTEND_RING_ORDER
        give_back(holder, reusable=reusable)

    monkeypatch.setattr(fe, "_give_back", give_back_and_record)

    srv = server()
    with connected(fe, srv.address) as s:
        s.sendall(b"x")
        assert s.recv(1) == b"x"
    with fe.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(5)
        address = listen_address(backend, guest.domid, ls.id)
        with socket.create_connection(address, timeout=TIMEOUT):
            ls.settimeout(TIMEOUT)
            conn, _ = ls.accept()
            conn.close()

    S, C, R, B, L, A, P = (_wire.PVCALLS_SOCKET, _wire.PVCALLS_CONNECT, _wire.PVCALLS_RELEASE,
                           _wire.PVCALLS_BIND, _wire.PVCALLS_LISTEN, _wire.PVCALLS_ACCEPT,
                           _wire.PVCALLS_POLL)
    assert [cmd for cmd, *_ in sent] == [S, C, R, S, B, L, P, A, R, R]
    connect = sent[1]
    assert connect[2] == _wire.SOCKADDR_IN_LEN == 16  # len = sizeof(struct sockaddr)
    bind = _wire.ffi.from_buffer("struct xen_pvcalls_request *", sent[4][3])
    assert bind.u.bind.len == 16
    assert _wire.unpack_sockaddr_in(bytes(bind.u.bind.addr), 16) == ("127.0.0.1", 0)
    # RELEASE names the socket and asks for no reuse of its id.
    release = _wire.ffi.from_buffer("struct xen_pvcalls_request *", sent[2][3])
    assert (release.u.release.id, release.u.release.reuse) == (sent[1][1], 0)
    # The accepted socket is the ACCEPT's id_new; POLL and ACCEPT name the listener.
    accept = _wire.ffi.from_buffer("struct xen_pvcalls_request *", sent[7][3])
    assert sent[6][1] == accept.u.accept.id == sent[9][1]
    assert accept.u.accept.id_new == sent[8][1]
    # Linux writes -EBADF into in_error after RELEASE of an active socket.
    # (close() does not wait for RELEASE's answer: the rings come back with it.)
    with freed:
        assert freed.wait_for(lambda: len(in_error_at_free) == 2, TIMEOUT)
    assert in_error_at_free == [-9, -9]


def test_frontend_close_waits_for_releases_in_flight(
        host: SimHost, backend: Any, server: Any) -> None:
    """close() of a socket does not wait for RELEASE's answer; closing the
    frontend right after still gets every ring back and frees it."""
    srv = server()
    with pvcalls.Frontend(host.create_domain("quick-close")) as f:
        socks = [connected(f, srv.address) for _ in range(4)]
        for s in socks:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
            s.close()
            assert s.closed
            with pytest.raises(OSError):
                s.send(b"x")
    assert not f._releases
    assert not f._ring_pool
    domid = f.domain.domid
    assert not [row for row in backend.stats().sockets if row.domain == domid]


def accept_left_in_flight(ls: pvcalls.PVSocket, sel: selectors.BaseSelector,
                          release: threading.Event) -> tuple[Any, Any]:
    """With a connection coming to the non-blocking listener ``ls``, whose
    ACCEPTs the backend holds until ``release`` (:func:`hold_accepts`):
    once select() says the connection is pending, an accept() with a short
    timeout sends the ACCEPT and gives up before its answer.  Returns that
    ACCEPT's slot and new socket; the backend answers it soon after."""
    sel.register(ls, selectors.EVENT_READ)
    assert sel.select(TIMEOUT)  # the POLL's answer: a connection is pending
    ls.settimeout(0.05)  # non-blocking, it would wait for the answer
    with pytest.raises(TimeoutError):
        ls.accept()
    ls.setblocking(False)
    assert ls._st.accept_inflight is not None
    release.set()
    _, slot, new = ls._st.accept_inflight
    return slot, new


def fill_command_ring(fe: pvcalls.Frontend, backend: Any,
                      connections: list[socket.socket]) -> Callable[[int], None]:
    """Fill ``fe``'s command ring for CONNECT, ACCEPT and POLL: as many
    idle listeners as it has slots but one (which only commands answered
    at once may take), each selected (fileno()), keep a POLL in flight that
    the backend answers only once a connection comes.  Returns a function
    that frees ``n`` slots (a connection to as many of them, added to
    ``connections``)."""
    listeners = []
    for _ in range(_wire.RING_SLOTS - 1):
        ls = fe.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        ls.fileno()
        listeners.append(ls)

    def free_slots(n: int) -> None:
        for ls in [ls for ls in listeners if ls._poll_inflight][:n]:
            connections.append(socket.create_connection(
                listen_address(backend, fe.domain.domid, ls.id), timeout=TIMEOUT))
            wait_until(lambda ls=ls: not ls._poll_inflight)

    return free_slots


def test_calls_waiting_for_room_on_the_command_ring(host: SimHost, backend: Any,
                                                    server: Any) -> None:
    """With the command ring full, accept() and connect() keep their
    timeouts (or fail at once, non-blocking: connect() with ENOBUFS, not
    the EINPROGRESS of a BlockingIOError); a connect() that found no room
    may be tried again, since nothing went out; and close() ends an
    accept() waiting for room, its RELEASE taking the slot left for it."""
    srv = server()
    connections: list[socket.socket] = []
    with pvcalls.Frontend(host.create_domain("full-ring")) as fe:
        try:
            ls = fe.socket()
            ls.bind(("127.0.0.1", 0))
            ls.listen()
            s = fe.socket()
            free_slots = fill_command_ring(fe, backend, connections)
            for timeout, error, connect_error in ((0.2, TimeoutError, TimeoutError),
                                                  (0.0, BlockingIOError, OSError)):
                ls.settimeout(timeout)
                s.settimeout(timeout)
                with pytest.raises(error):
                    ls.accept()  # its POLL finds no room
                with pytest.raises(connect_error) as info:
                    s.connect(srv.address)  # nor does its CONNECT
            assert info.value.errno == errno.ENOBUFS
            ls.settimeout(None)
            acceptor = Call(ls.accept)
            wait_until(lambda: bool(fe._cmd_cond._waiters))  # for room
            assert Call(ls.close).join().error is None
            assert acceptor.oserror().errno == errno.EBADF
            free_slots(1)
            s.settimeout(TIMEOUT)
            s.connect(srv.address)
            echo_through(s, b"room again")
        finally:
            free_slots(_wire.RING_SLOTS)  # or closing the frontend waits for room
            for c in connections:
                c.close()


class _JumpingClock:
    """time.monotonic() plus what the test has made pass: a deadline's
    time goes by at once, with no sleeping and no race with the machine."""

    def __init__(self) -> None:
        self.passed = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.passed


def test_a_timed_connect_s_timeout_bounds_the_wait_for_room_and_answer_together(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """settimeout() bounds every call: a timed connect() that spent part
    of its timeout waiting for room on the command ring waits for the
    backend's answer only for what is left (as socket.socket's connect()
    waits for its handshake), not for a whole timeout more."""
    clock = _JumpingClock()
    monkeypatch.setattr(_common, "time", clock)
    connections: list[socket.socket] = []
    with pvcalls.Frontend(host.create_domain("room-then-silence")) as fe, \
            unanswered_listener() as address:
        free_slots: Callable[[int], None] = lambda n: None  # noqa: E731
        s = fe.socket()
        try:
            free_slots = fill_command_ring(fe, backend, connections)
            s.settimeout(100.0)
            connector = Call(lambda: s.connect(address))
            wait_until(lambda: bool(fe._cmd_cond._waiters))  # for room
            clock.passed += 60.0
            free_slots(1)
            wait_until(lambda: s._last_connect is not None and s._last_connect.sent)
            clock.passed += 60.0  # 120 s since it set out: past its timeout
            error = connector.join().error
            assert isinstance(error, TimeoutError), error
        finally:
            s.close()
            free_slots(_wire.RING_SLOTS)  # or closing the frontend waits for room
            for c in connections:
                c.close()


def test_a_timed_connect_whose_answer_came_as_its_time_ran_out_connects(
        fe: pvcalls.Frontend, server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one deadline for the wait for room and the wait for the answer
    (see above), the latter may start with the time over.  An answer
    already in is the outcome: the backend connected, and connect()
    returns, rather than raising TimeoutError over a connection made."""
    clock = _JumpingClock()
    monkeypatch.setattr(_common, "time", clock)
    srv = server()
    wait_slot = fe._wait_slot

    def answered_then_late(req_id: int, slot: Any, deadline: Deadline,
                           sock: pvcalls.PVSocket | None = None) -> int:
        if slot.cmd == _wire.PVCALLS_CONNECT:
            wait_until(lambda: slot.done)
            clock.passed += 2 * TIMEOUT  # past the connect's timeout
        return wait_slot(req_id, slot, deadline, sock)

    monkeypatch.setattr(fe, "_wait_slot", answered_then_late)
    s = fe.socket()
    try:
        s.settimeout(TIMEOUT)
        s.connect(srv.address)
        assert s.getpeername() == srv.address
    finally:
        s.close()


def test_a_listener_waits_for_room_without_blocking_or_spinning(
        host: SimHost, backend: Any) -> None:
    """With the command ring full, a listener's fileno() returns at once
    (its POLL goes out by itself once answers make room), and a
    non-blocking accept() that finds no room for its ACCEPT leaves
    fileno() unreadable, so that a selector or asyncio loop sleeps instead
    of calling accept() over and over, until there is room; then accept()
    returns the connection."""
    connections: list[socket.socket] = []
    with pvcalls.Frontend(host.create_domain("room-waiters")) as fe:
        free_slots: Callable[[int], None] = lambda n: None  # noqa: E731
        try:
            ls = fe.socket()
            ls.bind(("127.0.0.1", 0))
            ls.listen()
            ls.setblocking(False)
            free_slots = fill_command_ring(fe, backend, connections)
            fd = Call(ls.fileno).join().result  # no waiting for room
            assert not ls._poll_inflight
            connections.append(socket.create_connection(
                listen_address(backend, fe.domain.domid, ls.id), timeout=TIMEOUT))
            assert not select.select([fd], [], [], 0.1)[0]  # its POLL has not gone out
            free_slots(1)
            assert select.select([fd], [], [], TIMEOUT)[0]  # it went out, and was answered
            other = fe.socket()  # takes the room its ACCEPT would need
            other.bind(("127.0.0.1", 0))
            other.listen()
            other.fileno()
            with pytest.raises(BlockingIOError):
                ls.accept()
            assert not select.select([fd], [], [], 0.1)[0]  # no busy loop
            free_slots(1)
            assert select.select([fd], [], [], TIMEOUT)[0]
            conn, _ = ls.accept()
            conn.close()
        finally:
            free_slots(_wire.RING_SLOTS)  # or closing the frontend waits for room
            for c in connections:
                c.close()


def _no_room_for_long_lived(fe: pvcalls.Frontend) -> bool:
    """The command ring has no room for a CONNECT, ACCEPT or POLL."""
    with fe._lock:
        return not fe._has_room(1)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("timeout", [0.0, 0.05], ids=["non-blocking", "timed"])
def test_an_accept_finding_no_room_interrupted_anywhere_leaves_fileno_right(
        host: SimHost, backend: Any, timeout: float) -> None:
    """A Ctrl-C landing anywhere in an accept() whose ACCEPT finds no room
    on the command ring, select() having said a connection is pending:
    fileno() then polls as the listener's state says, becomes readable
    once answers make room, and accept() returns the connection.  Before,
    one landing in the update that gives the readiness back after the
    failed send left the descriptor unreadable with the connection
    pending, and one landing between marking the listener as waiting for
    room and asking to be told of it left it unreadable for good: a
    selector waited for a connection accept() would have returned."""
    within = os.path.dirname(_frontend.__file__)
    connections: list[socket.socket] = []
    with pvcalls.Frontend(host.create_domain(f"no-room-{timeout}"), timeout=TIMEOUT) as fe:
        free_slots: Callable[[int], None] = lambda n: None  # noqa: E731
        try:
            ls = fe.socket()
            ls.bind(("127.0.0.1", 0))
            ls.listen()
            fd = ls.fileno()
            pending_at = listen_address(backend, fe.domain.domid, ls.id)
            free_slots = fill_command_ring(fe, backend, connections)
            connections.append(socket.create_connection(pending_at, timeout=TIMEOUT))

            escaped: list[bool] = []

            def attempt() -> None:
                try:
                    with pytest.raises(BlockingIOError if timeout == 0.0 else TimeoutError):
                        ls.accept()
                except Interrupted:
                    escaped.append(True)
                    raise

            for n in itertools.count():
                # A connection pending and known, and no room for its ACCEPT.
                assert select.select([fd], [], [], TIMEOUT)[0]
                wait_until(lambda: _no_room_for_long_lived(fe))
                ls.settimeout(timeout)
                del escaped[:]
                where = interrupted_at(n, within, attempt)
                said = f"interrupted {where or 'nowhere'}"
                assert bool(escaped) == bool(where), f"{said}: the Ctrl-C was swallowed"
                r, w, _ = select.select([fd], [fd], [], 0)
                with ls._mutex:
                    state = ls._readable(), ls._writable()
                assert (fd in r, fd in w) == state, said
                free_slots(1)
                assert select.select([fd], [], [], TIMEOUT)[0], f"{said}: not readable with room"
                ls.settimeout(TIMEOUT)
                conn, _ = ls.accept()
                conn.close()
                if not where:
                    break
                # Back as before: the listener freed above takes its
                # connection and POLLs again, once this one's POLL (sent
                # again after the accept) is answered.
                freed = [s for s in fe.sockets() if s is not ls and s._poll_ready]
                assert len(freed) == 1, said
                connections.append(socket.create_connection(pending_at, timeout=TIMEOUT))
                assert select.select([fd], [], [], TIMEOUT)[0], said
                freed[0].settimeout(TIMEOUT)
                freed[0].accept()[0].close()
                wait_until(lambda s=freed[0]: s._poll_inflight)
            assert n >= 20  # it landed in the accept's path, not only in held()
        finally:
            free_slots(_wire.RING_SLOTS)  # or closing the frontend waits for room
            for c in connections:
                c.close()


def test_no_room_marked_as_the_event_thread_tells_of_room_is_not_left_set(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener's fileno() whose POLL finds no room marks it as waiting
    for room while answers make room on the event thread: the mark is set
    with the registration, under the frontend's lock, so the event thread
    tells the listener only after it, and clears it.  Set after letting go
    of the lock, the event thread's _on_room could clear it first, and a
    listener with a connection pending never polled readable."""
    connections: list[socket.socket] = []
    with pvcalls.Frontend(host.create_domain("no-room-race"), timeout=TIMEOUT) as fe:
        free_slots: Callable[[int], None] = lambda n: None  # noqa: E731
        try:
            ls = fe.socket()
            ls.bind(("127.0.0.1", 0))
            ls.listen()
            connections.append(socket.create_connection(
                listen_address(backend, fe.domain.domid, ls.id), timeout=TIMEOUT))
            free_slots = fill_command_ring(fe, backend, connections)
            told = threading.Event()
            on_room = pvcalls.PVSocket._on_room

            def telling(sock: pvcalls.PVSocket) -> None:
                on_room(sock)
                if sock is ls:
                    told.set()

            monkeypatch.setattr(pvcalls.PVSocket, "_on_room", telling)
            # Its POLL answered makes room (fe.sockets() would wait for
            # the lock the paused thread holds).
            filler = next(s for s in fe.sockets() if s is not ls and s._poll_inflight)
            pause = PauseAt(_frontend.Frontend._want_room, "with sock._mutex:")
            asking = Attempt(lambda: pause.run(ls.fileno))
            try:
                assert pause.reached.wait(TIMEOUT)
                connections.append(socket.create_connection(
                    listen_address(backend, fe.domain.domid, filler.id), timeout=TIMEOUT))
                assert fe._thread is not None and fe._thread.ident is not None
                thread = fe._thread.ident


                def blocked() -> bool:  # on the lock the paused thread holds
                    frame = sys._current_frames().get(thread)
                    return frame is not None and "with self._lock:" in linecache.getline(
                        frame.f_code.co_filename, frame.f_lineno)

                wait_until(lambda: told.is_set() or blocked())
            finally:
                pause.resume()
            fd = asking.result()
            assert isinstance(fd, int)
            assert select.select([fd], [], [], TIMEOUT)[0], "never readable"
            ls.settimeout(TIMEOUT)
            ls.accept()[0].close()
        finally:
            free_slots(_wire.RING_SLOTS)
            for c in connections:
                c.close()


def _cut_first_submit_short(monkeypatch: pytest.MonkeyPatch, fe: pvcalls.Frontend,
                            cmd: int) -> tuple[threading.Event, threading.Event]:
    """Make ``fe``'s first submit of a ``cmd`` request stop as it starts
    (set ``reached``), then, once ``go`` is set, raise Interrupted there:
    a Ctrl-C landing with nothing on its way yet.  Returns (reached, go)."""
    reached, go = threading.Event(), threading.Event()
    submit = fe._submit

    def cut_short(slot: Any, *args: Any, **kwargs: Any) -> Any:
        if slot.cmd == cmd and not reached.is_set():
            reached.set()
            assert go.wait(TIMEOUT)
            raise Interrupted
        return submit(slot, *args, **kwargs)

    monkeypatch.setattr(fe, "_submit", cut_short)
    return reached, go


def _interrupted_yet_polled(first: Attempt, fd: int, ls: Any,
                            client: socket.socket) -> None:
    """The interrupted fileno() ``first`` raised the Ctrl-C, and the POLL
    went out all the same: ``fd`` polls readable, the connection of
    ``client`` pending, and accept() takes it."""
    assert isinstance(first.result(), Interrupted)
    try:
        assert select.select([fd], [], [], TIMEOUT)[0], "never readable: no POLL went out"
        ls.settimeout(TIMEOUT)
        ls.accept()[0].close()
    finally:
        client.close()


def test_a_poll_cut_short_while_another_fileno_saw_it_marked_still_goes_out(
        fe: pvcalls.Frontend, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing in one thread's fileno() of a listener after it
    marked its POLL in flight and before the POLL went out, while another
    thread's fileno() saw the mark and returned: the POLL goes out all the
    same, and the descriptor the other thread got polls readable with a
    connection pending.  Before, the interrupted call took its mark back
    and nobody sent the POLL: a selector on that descriptor waited for
    good (until the next fileno() or accept())."""
    ls = fe.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    client = socket.create_connection(listen_address(backend, fe.domain.domid, ls.id),
                                      timeout=TIMEOUT)
    reached, go = _cut_first_submit_short(monkeypatch, fe, _wire.PVCALLS_POLL)
    first = Attempt(ls.fileno)
    try:
        assert reached.wait(TIMEOUT)
        assert ls._poll_inflight  # what the other fileno() sees
        fd = ls.fileno()
    finally:
        go.set()
    _interrupted_yet_polled(first, fd, ls, client)


def test_a_ctrl_c_in_accept_comes_out_as_one_though_the_fileno_was_closed(
        fe: pvcalls.Frontend, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C landing in accept() before its ACCEPT went out, after the
    program closed the descriptor fileno() gave it: accept() raises the
    Ctrl-C.  Before, giving the POLL's readiness back to that descriptor
    failed with EBADF, and the EBADF came out instead: a program's
    ``except KeyboardInterrupt`` never ran.

    The descriptor is replaced by a read-only one rather than closed (see
    test_close_after_the_fileno_was_closed_still_releases)."""
    ls = fe.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    client = socket.create_connection(listen_address(backend, fe.domain.domid, ls.id),
                                      timeout=TIMEOUT)
    try:
        fd = ls.fileno()
        assert select.select([fd], [], [], TIMEOUT)[0], "never readable"
        reached, go = _cut_first_submit_short(monkeypatch, fe, _wire.PVCALLS_ACCEPT)
        ls.settimeout(TIMEOUT)
        acceptor = Attempt(ls.accept)
        try:
            assert reached.wait(TIMEOUT)
            readonly = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.dup2(readonly, fd)
            finally:
                os.close(readonly)
        finally:
            go.set()
        outcome = acceptor.result()
        assert isinstance(outcome, Interrupted), f"the Ctrl-C came out as {outcome!r}"
        monkeypatch.undo()
        ls.accept()[0].close()  # the connection is still pending
        with pytest.raises(OSError) as info:
            ls.close()
        assert info.value.errno == errno.EBADF
        os.close(fd)  # the read-only one, which close() leaves alone
    finally:
        client.close()


def test_a_poll_cut_short_while_the_event_threads_on_room_saw_it_marked_still_goes_out(
        fe: pvcalls.Frontend, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, with the event thread as the other caller: its _on_room
    (the ring has room again for the POLL this listener would not wait
    for) runs while the interrupted fileno() holds the mark, sees it and
    returns, counting on that POLL.  It goes out all the same, and
    fileno()'s descriptor polls readable with a connection pending."""
    ls = fe.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    client = socket.create_connection(listen_address(backend, fe.domain.domid, ls.id),
                                      timeout=TIMEOUT)
    on_room_ran = threading.Event()
    on_room = ls._on_room

    def on_room_seen() -> None:
        on_room()
        if threading.current_thread() is fe._thread:
            on_room_ran.set()

    reached, go = _cut_first_submit_short(monkeypatch, fe, _wire.PVCALLS_POLL)
    monkeypatch.setattr(ls, "_on_room", on_room_seen)
    first = Attempt(ls.fileno)
    try:
        assert reached.wait(TIMEOUT)
        assert ls._poll_inflight  # what _on_room sees
        # The event thread's _on_room, as once the ring has room.
        fe._poll_later(ls)
        assert on_room_ran.wait(TIMEOUT)
        assert ls._poll_inflight and not ls._poll_ready
        fd = ls._st.readyfd.fileno()
    finally:
        go.set()
    _interrupted_yet_polled(first, fd, ls, client)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("room", [True, False], ids=["room", "no-room"])
def test_a_listeners_fileno_interrupted_anywhere_then_asked_again_polls_right(
        host: SimHost, backend: Any, room: bool) -> None:
    """A Ctrl-C landing anywhere in a listener's first fileno(), with a
    connection pending: a program asking fileno() again gets a descriptor
    that polls readable (once answers make room for the POLL, when there
    was none), and accept() returns the connection.  Before, one landing
    after the listener was marked as keeping a POLL in flight and before
    the POLL went out (or asked to be told of room) left it with none,
    and no later fileno() sent one: a selector waited for good."""
    within = os.path.dirname(_frontend.__file__)
    connections: list[socket.socket] = []
    with pvcalls.Frontend(host.create_domain(f"fileno-{room}"), timeout=TIMEOUT) as fe:
        free_slots: Callable[[int], None] = lambda n: None  # noqa: E731
        try:
            for n in itertools.count():
                ls = fe.socket()
                ls.bind(("127.0.0.1", 0))
                ls.listen()
                connections.append(socket.create_connection(
                    listen_address(backend, fe.domain.domid, ls.id), timeout=TIMEOUT))
                if not room:
                    free_slots = fill_command_ring(fe, backend, connections)
                where = interrupted_at(n, within, ls.fileno)
                said = f"interrupted {where or 'nowhere'}"
                fd = ls.fileno()

                def as_its_state(fd: int = fd, ls: pvcalls.PVSocket = ls) -> bool:
                    r, w, _ = select.select([fd], [fd], [], 0)
                    with ls._mutex:  # the POLL's answer may come meanwhile
                        return (fd in r, fd in w) == (ls._readable(), ls._writable())

                try:
                    wait_until(as_its_state)
                except TimeoutError:
                    raise AssertionError(f"{said}: not polling as its state says") from None
                free_slots(_wire.RING_SLOTS)
                assert select.select([fd], [], [], TIMEOUT)[0], f"{said}: never readable"
                ls.settimeout(TIMEOUT)
                ls.accept()[0].close()
                for s in fe.sockets():
                    s.close()
                free_slots = lambda n: None  # noqa: E731
                while connections:  # or the descriptors pass what select() takes
                    connections.pop().close()
                if not where:
                    break
            assert n >= 10
        finally:
            free_slots(_wire.RING_SLOTS)
            for c in connections:
                c.close()


@pytest.mark.timeout(600)
def test_a_fileno_interrupted_anywhere_leaves_no_descriptor_to_the_collector(
        host: SimHost, backend: Any) -> None:
    """A Ctrl-C landing anywhere in a socket's first fileno(): the socket
    pair behind the descriptor is the socket's (its close() closes it) or
    closed, never left for the garbage collector to find ("unclosed
    <socket.socket ...>").  Before, one landing as ReadyFd() returned
    dropped the pair that was about to be the socket's."""
    within = os.path.dirname(_frontend.__file__)
    with (pvcalls.Frontend(host.create_domain("fileno-census"), timeout=TIMEOUT) as fe,
          warnings.catch_warnings(record=True) as caught):
        warnings.simplefilter("always")
        landed = []
        for n in itertools.count():
            sock = fe.socket()
            before = descriptors()
            where = interrupted_at(n, within, sock.fileno)
            said = f"interrupted {where or 'nowhere'}"
            assert _unclosed(caught) == [], said
            sock.close()
            # None new; the backend's threads may close one of theirs meanwhile.
            assert descriptors() <= before, (said, sorted(descriptors() - before))
            assert _unclosed(caught) == [], said
            if not where:
                break
            landed.append(where)
        assert any("ReadyFd.__init__" in where for where in landed), landed


def _in_socketpair() -> bool:
    """Whether the caller runs within socket.socketpair() (a frame of its
    or of a call it made is on the stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is socket.socketpair.__code__:
            return True
        frame = frame.f_back
    return False


@pytest.mark.timeout(600)
def test_a_fileno_interrupted_anywhere_in_making_the_pair_leaks_no_descriptor(
        host: SimHost, backend: Any) -> None:
    """As above, with the Ctrl-C landing in the making of the socket pair
    itself: the standard library's socket.socketpair() is Python code,
    which detaches each descriptor from the pair the system call gave
    and wraps it anew, and a handler may run as any of those calls
    returns.  Before, ReadyFd made the pair with it: one landing as a
    detach() returned left a descriptor that nothing held, open until
    the process ended; one landing after a wrapping left that socket to
    the collector ("unclosed <socket.socket ...>")."""
    stdlib = os.path.dirname(socket.__file__)
    with (pvcalls.Frontend(host.create_domain("socketpair-census"), timeout=TIMEOUT) as fe,
          warnings.catch_warnings(record=True) as caught):
        warnings.simplefilter("always")
        for n in itertools.count():
            sock = fe.socket()
            before = descriptors()
            # Only there: elsewhere in the standard library (threading's
            # Conditions, say) the frontend's rules let no Ctrl-C land.
            where = interrupted_at(n, stdlib, sock.fileno, lambda: not _in_socketpair())
            said = f"interrupted {where or 'nowhere'}"
            sock.close()
            gc.collect()
            assert _unclosed(caught) == [], said
            # None new; the backend's threads may close one of theirs meanwhile.
            assert descriptors() <= before, (said, sorted(descriptors() - before))
            if not where:
                break


@contextlib.contextmanager
def backend_of_its_own(name: str) -> Iterator[tuple[Any, pvcalls.Frontend]]:
    """A host, a backend and a frontend (domain ``name``) of the test's own,
    for a test that closes the backend under the frontend."""
    with SimHost() as host:
        backend = pvcalls.Backend(host.dom0, max_ioworkers=1)
        try:
            with pvcalls.Frontend(host.create_domain(name)) as fe:
                yield backend, fe
        finally:
            backend.close()


@contextlib.contextmanager
def listener_left_by_its_backend(name: str) -> Iterator[tuple[pvcalls.Frontend, pvcalls.PVSocket]]:
    """A frontend of :func:`backend_of_its_own` and a socket listening on
    it when the backend closed: ``(frontend, listener)``, the frontend
    seen dead."""
    with backend_of_its_own(name) as (backend, fe):
        ls = fe.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        backend.close()
        wait_until(lambda: fe._dead)
        yield fe, ls


def test_backend_going_away_fails_waiters(server: Any) -> None:
    srv = server()
    with backend_of_its_own("orphan") as (backend, fe):
        s = connected(fe, srv.address)
        reader = blocked_recv(s)
        ls = fe.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        acceptor = Call(ls.accept)
        wait_until(lambda: sleeping_in_wait(ls))  # for its POLL's answer
        backend.close()
        for call in (reader, acceptor):
            # Woken by the backend leaving (the socket is still open).
            error = call.oserror()
            assert error.errno == errno.ENOTCONN
            assert error.strerror == "the PV Calls backend went away"
        with pytest.raises(OSError):
            fe.socket()


def test_a_frontend_opened_again_sees_its_next_backend_go_away_too(server: Any) -> None:
    """A frontend whose backend went away, closed and opened again with a
    new backend: that backend going away fails its waiters too (the
    departure answered for the first connection is not taken for the
    next one's)."""
    srv = server()
    with SimHost() as host:
        fe = pvcalls.Frontend(host.create_domain("orphan-twice"), timeout=TIMEOUT)
        for _ in range(2):
            with pvcalls.Backend(host.dom0, max_ioworkers=1) as backend, fe:
                s = connected(fe, srv.address)
                reader = blocked_recv(s)
                backend.close()
                error = reader.oserror()
                assert (error.errno, error.strerror) == (errno.ENOTCONN,
                                                         "the PV Calls backend went away")
                s.close()


def test_non_blocking_calls_after_the_backend_left_say_so(server: Any) -> None:
    """Non-blocking, recv() and accept() fail as blocking ones do once the
    backend has gone, not with EAGAIN (for ever); and a selector sees both
    sockets ready, since neither call would block."""
    srv = server()
    with backend_of_its_own("non-blocking-orphan") as (backend, fe):
        s = connected(fe, srv.address)
        ls = fe.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        with selectors.DefaultSelector() as sel:
            sel.register(s, selectors.EVENT_READ)
            sel.register(ls, selectors.EVENT_READ)
            assert sel.select(0) == []
            backend.close()
            wait_until(lambda: fe._dead)
            assert {key.fileobj for key, _ in sel.select(TIMEOUT)} == {s, ls}
        s.setblocking(False)
        ls.setblocking(False)
        assert_fails(errno.ENOTCONN, lambda: s.recv(1), ls.accept,
                     strerror="the PV Calls backend went away")


def test_a_listeners_fileno_after_the_backend_left_polls_readable() -> None:
    """A listener registered with a selector once the backend has gone,
    and unregistered again: each fileno() gives the descriptor, which
    polls readable, and accept() says why, as socket.socket's fileno()
    never fails on an open socket.  Before, fileno() failed with ENOTCONN
    as it tried to send the POLL, and every call of it since it tries at
    each: a selector could neither take the listener nor let go of it."""
    with listener_left_by_its_backend("listener-orphan") as (_fe, ls):
        with selectors.DefaultSelector() as sel:
            sel.register(ls, selectors.EVENT_READ)
            assert [key.fileobj for key, _ in sel.select(TIMEOUT)] == [ls]
            sel.unregister(ls)
        ls.setblocking(False)
        assert_fails(errno.ENOTCONN, ls.accept, strerror="the PV Calls backend went away")


def test_a_call_after_the_backend_left_says_so() -> None:
    # The same error whether the backend left during the call or before it.
    with listener_left_by_its_backend("late") as (fe, ls):
        assert_fails(errno.ENOTCONN, ls.accept, fe.socket,
                     strerror="the PV Calls backend went away")


def test_closing_a_listener_after_the_backend_left_frees_its_accept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An ACCEPT left in flight (and answered) when the backend goes away:
    closing the listener then frees the socket it offered, and its ring is
    not kept for reuse (no RELEASE answer says the backend let go of it)."""
    release = hold_accepts(monkeypatch)
    with backend_of_its_own("stranded-listener") as (backend, fe):
        ls = fe.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        ls.setblocking(False)
        address = listen_address(backend, fe.domain.domid, ls.id)
        with socket.create_connection(address, timeout=TIMEOUT), \
                selectors.DefaultSelector() as sel:
            slot, new = accept_left_in_flight(ls, sel, release)
            ring = new._st.ring
            backend.close()
            wait_until(lambda: fe._dead)
            ls.close()
        assert new.closed and fe.sockets() == []
        assert ring not in fe._ring_pool


def test_no_backend_is_a_timeout_that_says_what_it_waited_for() -> None:
    with SimHost() as host:
        fe = pvcalls.Frontend(host.create_domain("alone"), timeout=0.2)
        with pytest.raises(TimeoutError, match=r"did not reach InitWait \(is a pvcalls "
                           r"backend serving domain 0\?\) within 0.2 s \(state 1\)"):
            fe.open()
        assert fe.device is None  # and the device it added is gone again


def test_a_socket_of_a_frontend_not_open_says_how_to_open_it(host: SimHost,
                                                            backend: Any) -> None:
    """The README opens a Frontend with ``with``: one made without it, or
    closed, said only "frontend is not connected", as if the backend had
    gone."""
    fe = pvcalls.Frontend(host.create_domain("not-open"), timeout=TIMEOUT)
    said = (f"^\\[Errno {errno.ENOTCONN}\\] the frontend is not open: use it in a with "
            f"block, or open\\(\\) it first$")
    with pytest.raises(OSError, match=said):
        fe.socket()
    with fe:
        fe.socket().close()
    with pytest.raises(OSError, match=said):
        fe.socket()


def test_a_close_before_open_leaves_the_frontend_to_open(host: SimHost, backend: Any) -> None:
    """A close() before open() has nothing to release, and must not keep
    the event thread that open() starts from running: every command would
    time out."""
    fe = pvcalls.Frontend(host.create_domain("closed-first"), timeout=TIMEOUT)
    fe.close()
    with fe:
        s = fe.socket()
        s.close()


def test_waking_everyone_reads_the_sockets_table_under_the_lock(
        host: SimHost, backend: Any) -> None:
    """The sockets table is under the frontend's _lock: the wake-up of
    every waiter, as the frontend dies or closes, lists it there too (a
    socket made or released by another thread meanwhile changes it)."""
    unlocked: list[str] = []

    class Checked(dict[int, Any]):
        def values(self) -> Any:
            if not fe._lock.locked():
                unlocked.append("values() without _lock")
            return super().values()

    fe = pvcalls.Frontend(host.create_domain("wakes-all"), timeout=TIMEOUT)
    with fe:
        s = fe.socket()
        fe._sockets = Checked(fe._sockets)
        fe._wake_everyone()
        s.close()
    assert unlocked == []


def _in_function(thread: threading.Thread, name: str) -> bool:
    """Whether ``thread`` runs ``name`` itself (not a function it called)."""
    frame = sys._current_frames().get(thread.ident or -1)
    return frame is not None and frame.f_code.co_name == name


def test_close_stops_the_event_thread_without_waiting_it_out(
        host: SimHost, backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    """close() wakes the event thread, asleep in its wait, to stop it: not
    woken, close() waited out its 10 s for it, then said it did not stop."""
    fe = pvcalls.Frontend(host.create_domain("stops"), timeout=TIMEOUT)
    with fe:
        thread = fe._thread
        assert thread is not None
        wait_until(lambda: _in_function(thread, "_serve_events"))  # in epoll.poll()
    assert not thread.is_alive()
    assert "did not stop" not in caplog.text


def test_a_frontend_opens_again_after_a_failed_open_or_a_close(server: Any) -> None:
    """open() again, after one that failed (no backend yet: retried once
    it runs) or after a close(), gives a working frontend, not one whose
    every call says it is closed."""
    srv = server()
    with SimHost() as host:
        fe = pvcalls.Frontend(host.create_domain("early"), timeout=0.2)
        with pytest.raises(TimeoutError):
            fe.open()
        with pvcalls.Backend(host.dom0, max_ioworkers=1) as backend:
            fe.timeout = TIMEOUT
            for _ in range(2):  # after the failed open, then after a close
                with fe:
                    with connected(fe, srv.address) as s:
                        echo_through(s, b"open again")
                assert backend.stats().frontends == 0


def _write_any(xs: XenStore, path: str, value: str) -> None:
    """Write ``value`` (UTF-8) as another domain may: any bytes (pyxs and
    XenStore.write take 7-bit ASCII only)."""
    payload = f"{path}\0{value}".encode()
    reply = xs._client.router.send(Packet(Op.WRITE, payload, rq_id=0, tx_id=0)).get()
    assert (reply.op, reply.payload) == (Op.WRITE, b"OK\0"), reply


_GOOD_BACKEND_NODES = {"versions": "1", "max-page-order": "4", "function-calls": "1"}


@pytest.mark.parametrize(("nodes", "states", "err", "said"), [
    ({"versions": "2"}, ["2"], errno.EPROTONOSUPPORT, "backend offers versions '2', need 1"),
    # A list of versions, not a string that contains "1".
    ({"versions": "10,2"}, ["2"], errno.EPROTONOSUPPORT,
     "backend offers versions '10,2', need 1"),
    ({"max-page-order": "3"}, ["2"], errno.EPROTONOSUPPORT,
     "backend max-page-order '3' is below the ring order 4"),
    ({"max-page-order": "four"}, ["2"], errno.EPROTONOSUPPORT,
     "backend max-page-order 'four' is below the ring order 4"),
    # A digit to str.isdigit(), not to int() (it used to raise ValueError).
    ({"max-page-order": "\u00b2"}, ["2"], errno.EPROTONOSUPPORT,
     "backend max-page-order '\\xb2' is below the ring order 4"),
    ({"function-calls": "0"}, ["2"], errno.EPROTONOSUPPORT,
     "backend does not offer function-calls 1"),
    ({}, ["5"], errno.EPROTO, "backend went to state 5 instead of InitWait"),
    ({}, ["2", "5"], errno.ECONNREFUSED, "backend went to state 5 instead of Connected"),
], ids=["versions", "versions-10", "order", "order-not-a-number", "order-unicode-digit",
        "function-calls", "no-initwait", "no-connected"])
def test_a_backend_that_does_not_conform_fails_the_handshake(
        nodes: dict[str, str], states: list[str], err: int, said: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend (faked in dom0's XenStore) that offers the wrong protocol,
    or leaves the handshake: open() says what was wrong, in an errno and a
    message, and takes back all it set up, giving the backend that never
    connected 2 s to close (not the whole timeout: it may be no backend)."""
    removals: list[float] = []
    remove_device = Toolstack.remove_device

    def recorded(self: Toolstack, device: Any, timeout: float) -> bool:
        removals.append(timeout)
        return remove_device(self, device, timeout)

    monkeypatch.setattr(Toolstack, "remove_device", recorded)
    with SimHost() as host, XenStore.connect_to(host.dom0) as xs:
        guest = host.create_domain("picky")
        be = f"/local/domain/0/backend/pvcalls/{guest.domid}/0"
        fe_state = f"/local/domain/{guest.domid}/device/pvcalls/0/state"
        failures: list[BaseException] = []

        def fake_backend() -> None:
            try:
                xs.wait_for(f"{be}/state", "1", timeout=TIMEOUT)  # the toolstack's
                for key, value in {**_GOOD_BACKEND_NODES, **nodes}.items():
                    _write_any(xs, f"{be}/{key}", value)
                xs.write(f"{be}/state", states[0])
                if len(states) > 1:
                    xs.wait_for(fe_state, "3", timeout=TIMEOUT)  # Initialised
                    xs.write(f"{be}/state", states[1])
                # Closed once the toolstack asks, as any backend: else the
                # removal waits out the 2 s it gives one that never
                # connected, and the test with it.
                xs.wait_for(f"{be}/online", "0", timeout=TIMEOUT)
                xs.write(f"{be}/state", "6")
            except BaseException as exc:
                failures.append(exc)

        t = threading.Thread(target=fake_backend, daemon=True)
        t.start()
        fe = pvcalls.Frontend(guest, timeout=TIMEOUT)
        with pytest.raises(OSError) as info:
            fe.open()
        t.join(TIMEOUT)
        assert failures == []
        assert info.value.errno == err and info.value.strerror == said
        assert fe.device is None and not xs.exists(be)
        assert removals == [2.0]
        # The command ring's page, unshared (a closed handle's, on the
        # host's service thread after close() returned).
        wait_until(lambda: host.hypervisor.stats()["grants"] == 0)
        with pytest.raises(OSError):
            fe.socket()


def test_a_backend_state_that_is_no_state_is_waited_past_as_unknown() -> None:
    """A backend state node that holds no state (garbage) reads as Unknown,
    as Linux's xenbus reads it: the handshake goes on waiting for InitWait
    (and times out saying state 0), rather than taking it for a state the
    backend went to."""
    with SimHost() as host, XenStore.connect_to(host.dom0) as xs:
        guest = host.create_domain("garbled")
        be = f"/local/domain/0/backend/pvcalls/{guest.domid}/0"
        failures: list[BaseException] = []

        def fake_backend() -> None:
            try:
                xs.wait_for(f"{be}/state", "1", timeout=TIMEOUT)  # the toolstack's
                for key, value in _GOOD_BACKEND_NODES.items():
                    xs.write(f"{be}/{key}", value)
                xs.write(f"{be}/state", "bogus")
            except BaseException as exc:
                failures.append(exc)
            finally:
                written.set()

        written = threading.Event()
        t = threading.Thread(target=fake_backend, daemon=True)
        t.start()
        fe = pvcalls.Frontend(guest, timeout=1.0)
        wait_backend = fe._wait_backend

        def after_the_garbage(*args: Any) -> Any:
            # Its 1 s from the garbage on: a loaded machine may take longer
            # to write it, and the timeout would then say state 1.
            assert written.wait(TIMEOUT)
            return wait_backend(*args)

        fe._wait_backend = after_the_garbage  # type: ignore[method-assign]
        with pytest.raises(TimeoutError, match=r"did not reach InitWait .*\(state 0\)$"):
            fe.open()
        t.join(TIMEOUT)
        assert failures == []
        assert fe.device is None and not xs.exists(be)


def test_host_going_away_fails_a_handshake_at_once() -> None:
    host = SimHost().start()
    try:
        domain = host.create_domain("stranded")
        fe = pvcalls.Frontend(domain, timeout=600)
        opener = Call(fe.open)
        wait_until(lambda: fe._xs is not None and bool(fe._xs._waiters))  # for InitWait
        host.close()
        # (Not waiting for its timeout.)
        assert opener.oserror().errno == errno.ENOTCONN
    finally:
        host.close()


def test_a_frontend_whose_host_went_away_closes_without_asking_xenstore(
        caplog: pytest.LogCaptureFixture) -> None:
    """Once XenStore dropped the connection (the host is gone), close()
    neither goes Closing nor removes the device through it: it says, once,
    that XenStore is gone, and warns of nothing it tried and failed."""
    host = SimHost().start()
    try:
        domain = host.create_domain("orphaned")
        with pvcalls.Backend(host.dom0, max_ioworkers=1):
            fe = pvcalls.Frontend(domain, timeout=TIMEOUT)
            fe.open()
            host.close()
            wait_until(lambda: fe._dead)
            with caplog.at_level(logging.DEBUG, logger="pvcalls.frontend"):
                fe.close()
            assert fe.device is None
            assert "not removing pvcalls device" in caplog.text
            assert [r.getMessage() for r in caplog.records
                    if r.name == "pvcalls.frontend" and r.levelno >= logging.WARNING] == []
    finally:
        host.close()


def test_a_handshake_failing_as_xenstore_goes_closes_as_xenstore_gone(
        caplog: pytest.LogCaptureFixture) -> None:
    """XenStore wakes the handshake's wait (ENOTCONN) before it calls
    on_lost: open()'s close() ran with the loss not yet recorded, asked
    the XenStore that was gone for the backend's state, and warned
    ("removing pvcalls device ...") where it says that XenStore is gone."""
    host = SimHost().start()
    try:
        domain = host.create_domain("stranded")
        fe = pvcalls.Frontend(domain, timeout=600)
        real_lost, real_close_device = fe._lost_xenstore, fe._close_device
        device_closed = threading.Event()

        def lost_late(exc: Exception) -> None:
            # On the router thread: let go once the device's part of
            # close() is done, before XenStore's close() joins us.
            assert device_closed.wait(TIMEOUT)
            real_lost(exc)

        def close_device() -> None:
            try:
                real_close_device()
            finally:
                device_closed.set()

        fe._lost_xenstore = lost_late  # type: ignore[method-assign]
        fe._close_device = close_device  # type: ignore[method-assign]
        with caplog.at_level(logging.DEBUG, logger="pvcalls.frontend"):
            opener = Call(fe.open)
            wait_until(lambda: fe._xs is not None and bool(fe._xs._waiters))  # for InitWait
            host.close()
            assert opener.oserror().errno == errno.ENOTCONN
        assert "not removing pvcalls device" in caplog.text
        assert [r.getMessage() for r in caplog.records
                if r.name == "pvcalls.frontend" and r.levelno >= logging.WARNING] == []
    finally:
        host.close()


def test_a_handshake_whose_read_fails_as_xenstore_goes_closes_as_xenstore_gone(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, for a request of the handshake: XenStore fails it before
    it sets connection_lost, let alone calls on_lost."""
    host = SimHost().start()
    try:
        domain = host.create_domain("stranded")
        fe = pvcalls.Frontend(domain, timeout=600)
        real_lost, real_close_device = XenStore._lost, fe._close_device
        device_closed = threading.Event()

        def lost_late(xs: XenStore, exc: Exception) -> None:
            if xs is fe._xs:  # not the toolstack's
                assert device_closed.wait(TIMEOUT)
            real_lost(xs, exc)

        def read_as_xenstore_goes(done: Any, what: str) -> Any:
            wait_until(lambda: not fe._xs.connected)
            return fe._backend_state()  # ENOTCONN

        def close_device() -> None:
            try:
                real_close_device()
            finally:
                device_closed.set()

        monkeypatch.setattr(XenStore, "_lost", lost_late)
        fe._wait_backend = read_as_xenstore_goes  # type: ignore[method-assign]
        fe._close_device = close_device  # type: ignore[method-assign]
        with caplog.at_level(logging.DEBUG, logger="pvcalls.frontend"):
            opener = Call(fe.open)
            wait_until(lambda: fe._xs is not None and fe._xs.connected)
            host.close()
            assert opener.oserror().errno == errno.ENOTCONN
        assert "not removing pvcalls device" in caplog.text
        assert [r.getMessage() for r in caplog.records
                if r.name == "pvcalls.frontend" and r.levelno >= logging.WARNING] == []
    finally:
        host.close()


def test_released_rings_are_reused(fe: pvcalls.Frontend, server: Any) -> None:
    srv = server()
    ports = set()
    for i in range(5):
        with connected(fe, srv.address) as s:
            ring = s._st.ring
            assert ring is not None
            ports.add(ring.port)
            s.sendall(b"round %d" % i)  # the indexes start from zero again
            assert recv_exactly(s, 7) == b"round %d" % i
    assert len(ports) == 1


def test_broken_data_ring_is_an_error_of_that_socket(fe: pvcalls.Frontend, server: Any) -> None:
    from pvcalls import _wire

    srv = server()
    with connected(fe, srv.address) as bad, connected(fe, srv.address) as good:
        ring = bad._st.ring
        assert ring is not None
        # A backend claiming more bytes than the ring holds.
        intf = _wire.ffi.from_buffer("struct pvcalls_data_intf *", ring.indexes)
        intf.in_prod = (intf.in_cons + 2 * ring.inq.size) & 0xFFFFFFFF
        _wire.ffi.release(intf)
        with pytest.raises(OSError) as info:
            bad.recv(10)
        assert info.value.errno == errno.EPROTO
        good.sendall(b"unaffected")
        assert recv_exactly(good, 10) == b"unaffected"


def test_send_waits_for_room_and_times_out(fe: pvcalls.Frontend, server: Any) -> None:
    """A host peer that does not read: the out ring and the host's socket
    buffers fill, then send() blocks; timeouts and non-blocking mode apply."""
    release = threading.Event()

    def sluggish(conn: socket.socket) -> None:
        release.wait(TIMEOUT)
        while conn.recv(65536):
            pass

    srv = server(sluggish)
    # A fixed receive buffer (inherited by the accepted connection) bounds
    # what the host holds: no receive autotuning, and once the peer reads
    # again it drains at loopback speed (a tiny buffer, say 4 KiB, would
    # crawl through the sender's megabytes of send buffer, ACK by ACK).
    srv.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    with connected(fe, srv.address) as s:
        s.settimeout(0.2)
        chunk = b"x" * 65536
        with pytest.raises(TimeoutError):
            for _ in range(1000):  # far more than ring and socket buffers hold
                s.sendall(chunk)
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.send(chunk)
        release.set()  # the peer reads again: room comes back
        s.settimeout(TIMEOUT)
        s.sendall(chunk)


# -- what socket.socket takes and rejects -------------------------------------------


def test_addresses_as_socket_socket_takes_them(fe: pvcalls.Frontend, server: Any) -> None:
    srv = server()
    port = srv.address[1]
    for host in ("127.1", b"127.0.0.1", bytearray(b"127.0.0.1"), "localhost"):
        with fe.socket() as s:
            s.settimeout(TIMEOUT)
            s.connect((host, port))
            assert s.getpeername() == ("127.0.0.1", port)
            echo_through(s, b"ok")


def test_bad_addresses_and_families(fe: pvcalls.Frontend, monkeypatch: pytest.MonkeyPatch) -> None:
    bad: list[tuple[Any, type[Exception]]] = [
        ((2130706433, 80), TypeError),  # ipaddress would take these two
        ((b"\x7f\0\0\x01", 80), TypeError),
        ((None, 80), TypeError),
        (("127.0.0.1", "80"), TypeError),
        (("127.0.0.1", 70000), OverflowError),
        (("127.0.0.1", -1), OverflowError),
        ("127.0.0.1", TypeError),
        (("127.0.0.1", 80, 0), TypeError),
    ]
    with fe.socket() as s:
        for address, error in bad:
            with pytest.raises(error):
                s.connect(address)
            with pytest.raises(error):
                s.bind(address)
            with socket.socket() as real, pytest.raises(error):
                real.connect(address)

    # Names are resolved in the guest, IPv4 only, and a failure is the
    # resolver's, as with socket.socket (without asking a real DNS server).
    asked: list[tuple[Any, ...]] = []

    def no_such_name(*args: Any) -> Any:
        asked.append(args)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    with fe.socket() as s, pytest.raises(socket.gaierror):
        s.connect(("no-such-host.invalid", 80))
    assert asked == [(b"no-such-host.invalid", 80, socket.AF_INET, socket.SOCK_STREAM)]
    # connect_ex() returns the errors of the connect, not of resolving the
    # name: a gaierror's "errno" (-2 here) is no errno at all.
    with fe.socket() as s, pytest.raises(socket.gaierror):
        s.connect_ex(("no-such-host.invalid", 80))
    # A name is looked up as the bytes socket.socket looks up (IDNA for a
    # name that is not ASCII): a malformed one is the resolver's to refuse,
    # not a UnicodeError; one that cannot be encoded is a TypeError.
    asked.clear()
    for host in ("a..b", b"a..b", b"\xff", "b\u00fccher.de"):
        with fe.socket() as s, pytest.raises(socket.gaierror):
            s.connect((host, 80))
    assert [args[0] for args in asked] == [b"a..b", b"a..b", b"\xff", b"xn--bcher-kva.de"]
    for host in ("b\u00fccher..de", "\udcff"):
        with fe.socket() as s, pytest.raises(TypeError, match="encoding of hostname failed"):
            s.connect((host, 80))
        with socket.socket() as real, pytest.raises(TypeError, match="encoding of hostname"):
            real.connect((host, 80))

    with pytest.raises(OSError) as info:
        fe.socket(socket.AF_INET6)
    assert info.value.errno == errno.EAFNOSUPPORT
    # TCP named, as socket.socket takes it (SOCKET still carries protocol 0).
    with fe.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as s:
        assert s.proto == 0
    # Any other protocol is none PV Calls carries.
    with pytest.raises(OSError) as info:
        fe.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_UDP)
    assert info.value.errno == errno.EAFNOSUPPORT


def test_settimeout_takes_what_socket_socket_takes(fe: pvcalls.Frontend) -> None:
    s = fe.socket()
    s.settimeout(2.5)
    for value, error in [(math.nan, ValueError), (-1, ValueError), (math.inf, OverflowError),
                         (1e300, OverflowError), ("1", TypeError)]:
        with pytest.raises(error):
            s.settimeout(value)
        with socket.socket() as real, pytest.raises(error):
            real.settimeout(value)
    assert s.gettimeout() == 2.5
    # setblocking() takes an integer (a bool included), nothing else: None
    # must not quietly make the socket non-blocking.
    for flag in (None, "yes", 1.5):
        with pytest.raises(TypeError):
            s.setblocking(flag)  # type: ignore[arg-type]
        with socket.socket() as real, pytest.raises(TypeError):
            real.setblocking(flag)  # type: ignore[arg-type]
    assert s.gettimeout() == 2.5
    # A timeout is blocking mode, as for socket.socket: only 0.0 is not.
    with socket.socket() as real:
        real.settimeout(2.5)
        assert s.getblocking() is real.getblocking() is True
    s.setblocking(0)
    assert s.gettimeout() == 0.0
    assert not s.getblocking()
    s.setblocking(True)
    assert s.gettimeout() is None
    assert s.getblocking()
    s.close()
    assert_fails(errno.EBADF, lambda: s.settimeout(1), lambda: s.setblocking(True))


def test_arguments_are_checked_before_waiting(fe: pvcalls.Frontend, server: Any) -> None:
    """Each of these would otherwise wait TIMEOUT for data that never comes."""
    srv = server()
    with connected(fe, srv.address) as s:
        for nbytes in (5, 10):  # one past the buffer is too many already
            with pytest.raises(ValueError, match="buffer too small"):
                s.recv_into(bytearray(4), nbytes)
        with pytest.raises(ValueError, match="negative"):
            s.recv_into(bytearray(4), -1)
        for nbytes in (1.5, "2", None):  # socket.socket wants an integer
            with pytest.raises(TypeError):
                s.recv_into(bytearray(4), nbytes)
        for readonly in (b"xxxx", memoryview(bytearray(4)).toreadonly()):
            with pytest.raises(TypeError):
                s.recv_into(readonly)
        assert_fails(errno.EOPNOTSUPP, lambda: s.recv(4, socket.MSG_OOB),
                     lambda: s.send(b"x", socket.MSG_OOB), lambda: s.sendall(b"x", socket.MSG_OOB))
        echo_through(s, b"still fine")


def test_a_buffer_send_cannot_take_is_a_buffererror_as_for_socket_socket(
    fe: pvcalls.Frontend, server: Any
) -> None:
    """A strided view is no simple buffer: BufferError, not TypeError;
    C-contiguous views of any format and shape are sent as their bytes."""
    srv = server()
    strided = memoryview(b"abcdef")[::2]
    with connected(fe, srv.address) as s, socket.create_connection(srv.address) as real:
        for sock in (s, real):
            for call in (sock.send, sock.sendall):
                with pytest.raises(BufferError):
                    call(strided)
        s.sendall(memoryview(bytes(range(12))).cast("B", (3, 4)))
        assert recv_exactly(s, 12) == bytes(range(12))


def test_a_busy_socket_does_not_hold_calls_past_their_timeout(
    fe: pvcalls.Frontend, server: Any
) -> None:
    """One thread blocked in recv() holds the socket's receive side; the
    others' calls still fail at once or time out, as on socket.socket."""
    srv = server()
    s = connected(fe, srv.address)
    s.connect(srv.address)  # after a connect() with a timeout, succeeds once more
    reader = blocked_recv(s)  # holding s._recv_lock
    s.settimeout(1.0)
    with pytest.raises(OSError) as info:
        s.connect(srv.address)
    assert info.value.errno == errno.EISCONN
    s.setblocking(False)
    with pytest.raises(BlockingIOError):
        s.recv(10)
    s.settimeout(0.05)
    with pytest.raises(TimeoutError):
        s.recv(10)
    s.close()
    assert reader.oserror().errno == errno.EBADF


@pytest.mark.parametrize("timeout", [0.0, 0.001], ids=["non-blocking", "short-timeout"])
def test_accept_that_gave_up_leaves_the_socket_readable(
    fe: pvcalls.Frontend, backend: Any, guest: Any, timeout: float
) -> None:
    """The selectors (and asyncio) server pattern: select() says readable,
    accept() sends ACCEPT; one with a short timeout may give up before its
    answer, which must then make the socket readable again, and the next
    accept() return it (non-blocking, accept() waits for that answer)."""
    with fe.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        ls.settimeout(timeout)
        address = listen_address(backend, guest.domid, ls.id)
        with selectors.DefaultSelector() as sel, \
                socket.create_connection(address, timeout=TIMEOUT) as client:
            sel.register(ls, selectors.EVENT_READ)
            conn = None
            for _ in range(3):  # POLL answered, then ACCEPT answered
                assert sel.select(TIMEOUT), "the pending connection was lost"
                try:
                    conn, _ = ls.accept()
                    break
                except (BlockingIOError, TimeoutError):
                    pass
            assert conn is not None
            with conn:
                conn.settimeout(TIMEOUT)
                client.sendall(b"x")
                assert conn.recv(1) == b"x"
            assert sel.select(0) == []


def test_a_non_blocking_accept_returns_what_select_said_is_pending(
    fe: pvcalls.Frontend, backend: Any, guest: Any
) -> None:
    """The selectors pattern as Python's documentation writes it: a
    non-blocking listener, select() says readable, accept() "should be
    ready" and returns the connection.  The POLL's answer said one is
    pending; the ACCEPT that accept() sends for it is answered at once, and
    waiting for that answer is not blocking on the network (as a
    non-blocking connect() waits for CONNECT's).  A BlockingIOError there
    broke servers that do not expect one after select()."""
    with fe.socket() as ls, selectors.DefaultSelector() as sel:
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        ls.setblocking(False)
        sel.register(ls, selectors.EVENT_READ)
        address = listen_address(backend, guest.domid, ls.id)
        for n in range(3):
            with socket.create_connection(address, timeout=TIMEOUT) as client:
                assert [key.fileobj for key, _ in sel.select(TIMEOUT)] == [ls]
                conn, _ = ls.accept()
                with conn:
                    assert conn.gettimeout() is None  # as socket.socket's
                    conn.settimeout(TIMEOUT)
                    client.sendall(b"%d" % n)
                    assert conn.recv(1) == b"%d" % n
            assert sel.select(0) == []


def test_a_non_blocking_accept_waits_for_its_accept_no_longer_than_the_frontend_timeout(
    host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend that does not answer the ACCEPT (Linux's does not while
    the host's accept() finds nothing): the non-blocking accept() gives up
    at the frontend's timeout with BlockingIOError, as "would block", not
    a timeout the socket never had; the ACCEPT stays in flight, and once
    answered the socket is readable and the next accept() returns it."""
    release = hold_accepts(monkeypatch)
    with pvcalls.Frontend(host.create_domain("held-accept"), timeout=TIMEOUT) as fe2, \
            fe2.socket() as ls, selectors.DefaultSelector() as sel:
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        ls.setblocking(False)
        # The accept()'s only: the handshake, bind() and listen() need their
        # answers, which a loaded machine can take longer than 0.2 s to give.
        fe2.timeout = 0.2
        sel.register(ls, selectors.EVENT_READ)
        address = listen_address(backend, fe2.domain.domid, ls.id)
        with socket.create_connection(address, timeout=TIMEOUT) as client:
            assert sel.select(TIMEOUT)
            started = time.monotonic()
            with pytest.raises(BlockingIOError):
                ls.accept()
            assert time.monotonic() - started >= 0.2
            assert ls._st.accept_inflight is not None
            assert sel.select(0) == []
            release.set()
            assert [key.fileobj for key, _ in sel.select(TIMEOUT)] == [ls]
            conn, _ = ls.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                client.sendall(b"x")
                assert conn.recv(1) == b"x"


def test_closing_a_listener_releases_what_its_pending_accept_got(
    fe: pvcalls.Frontend, backend: Any, guest: Any, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An accept() that timed out left its ACCEPT in flight, and the backend
    accepted a connection into its new socket; then the listener is closed.
    That connection is the guest's, not the listener's: it is released too
    (the host's peer sees it end), and its ring is never handed to another
    socket while the backend still writes into it."""
    release = hold_accepts(monkeypatch)
    with fe.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        ls.setblocking(False)
        address = listen_address(backend, guest.domid, ls.id)
        client = socket.create_connection(address, timeout=TIMEOUT)
        with selectors.DefaultSelector() as sel:
            slot, new = accept_left_in_flight(ls, sel, release)
            assert sel.select(TIMEOUT)  # the ACCEPT's answer came
            assert slot.done and slot.ret == 0
    with client:
        assert client.recv(1) == b""  # the backend closed it: released
        wait_until(lambda: all(r.id != new.id for r in backend.stats().sockets))
        srv = server()
        with connected(fe, srv.address) as s:  # may get a ring from the pool
            echo_through(s, b"only mine")


@contextlib.contextmanager
def unanswered_listener() -> Iterator[tuple[str, int]]:
    """The address of a host listener whose accept and SYN queues are full:
    it drops SYNs, so a connect to it stays in progress while the block runs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(3):  # fill the accept queue and the SYN queue: SYNs are dropped
            f = socket.socket()
            fillers.append(f)
            f.setblocking(False)
            f.connect_ex(listener.getsockname())
        yield listener.getsockname()
    finally:
        for f in fillers:
            f.close()
        listener.close()


def test_close_during_connect_is_ebadf_for_the_connecting_thread(fe: pvcalls.Frontend) -> None:
    s = fe.socket()
    with unanswered_listener() as address:
        connector = Call(lambda: s.connect(address))
        wait_until(lambda: s._st.ring is not None)  # CONNECT in flight
        s.close()
        assert connector.oserror().errno == errno.EBADF


def test_a_connect_that_timed_out_leaves_a_socket_only_to_close(
    fe: pvcalls.Frontend, backend: Any
) -> None:
    """connect_ex() gives up at its timeout (EAGAIN, as socket.socket's);
    the CONNECT stays in flight, so the socket can do nothing but close.
    Its late answer (-EINTR, from the RELEASE) frees its ring slot."""
    s = fe.socket()
    with unanswered_listener() as address:
        s.settimeout(0.2)
        assert s.connect_ex(address) == errno.EAGAIN
        for call, error in ((lambda: s.connect(address), errno.EISCONN),
                            (lambda: s.bind(("127.0.0.1", 0)), errno.EINVAL),
                            (s.listen, errno.EINVAL),
                            (lambda: s.send(b"x"), errno.ENOTCONN),
                            (lambda: s.recv(1), errno.ENOTCONN)):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == error
        row, = (r for r in backend.stats().sockets if r.id == s.id)
        assert row.state == "connecting"
        s.close()
        wait_until(lambda: all(r.id != s.id for r in backend.stats().sockets))
    wait_until(lambda: not fe._releases)
    with fe._lock:
        assert fe._slots == [None] * len(fe._slots)
    with fe.socket() as again:  # the frontend is fine
        again.bind(("127.0.0.1", 0))


def test_a_backend_and_frontend_holding_1024_descriptors_still_work(server: Any) -> None:
    """A backend serving hundreds of sockets holds more than 1024
    descriptors: everything opened from there on (the host, XenStore
    connections, event channels, sockets) is out of select()'s range."""
    with descriptors_past_fd_setsize():
        filled = descriptors()
        # Made here: the server thread's accept() takes the number of the
        # socket it returns as it starts waiting, the lowest free then.
        srv = server()
        with SimHost() as host, pvcalls.Backend(host.dom0, max_ioworkers=2):
            guest = host.create_domain("fd-guest")
            with pvcalls.Frontend(guest) as fe, connected(fe, srv.address) as s:
                echo_through(s, os.urandom(100_000))
                opened = descriptors() - filled
                assert any(fd >= FD_SETSIZE for fd, _ in opened), sorted(opened)
                # Past FD_SETSIZE but for numbers another thread's file
                # freed meanwhile (a lingering thread of an earlier test):
                # none below it that was free before the fill (a thread
                # waiting in accept() then), nor a filler's (closed by the
                # code under test: a double close).
                theirs = {fd for fd, what in filled if what != os.devnull}
                low = sorted((fd, what) for fd, what in opened
                             if fd < FD_SETSIZE and fd not in theirs)
                assert not low, low


def test_connect_ex_returns_the_errno(fe: pvcalls.Frontend, server: Any) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    refused = closed.getsockname()
    closed.close()
    srv = server()
    with fe.socket() as s:
        s.settimeout(TIMEOUT)
        assert s.connect_ex(refused) == errno.ECONNREFUSED
        # Once, as Linux's socket after a refused connect() with a
        # timeout (test_frontend_socket_parity.py).
        assert s.connect_ex(srv.address) == errno.ECONNABORTED
        assert s.connect_ex(srv.address) == 0
        echo_through(s, b"connected")


def test_frontend_exit_frees_a_socket_kept_by_a_makefile_stream(
    host: SimHost, backend: Any, server: Any
) -> None:
    srv = server()
    guest = host.create_domain("makefile-at-exit")
    before = host.hypervisor.stats()
    with pvcalls.Frontend(guest) as fe:
        s = connected(fe, srv.address)
        f = s.makefile("rb")
        s.close()  # the stream keeps it open, as with socket.socket
        assert not s.closed
    assert s.closed
    assert not any(r.domain == guest.domid for r in backend.stats().sockets)
    # The socket's event channel handle and port are gone with the frontend.
    wait_until(lambda: all(n <= before[k] for k, n in host.hypervisor.stats().items()))
    with pytest.raises(OSError):
        f.read(1)
    f.close()


# -- calls interrupted in their waits (Ctrl-C) -----------------------------------


@pytest.mark.parametrize("how", ["timeout", "interrupt"])
def test_a_socket_call_given_up_on_releases_what_the_backend_makes_late(
    host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A SOCKET whose caller gave up (its timeout, or Ctrl-C) and that the
    backend answers later: the socket the backend made for nobody is
    released, not kept (and counted against the domain's limit) until the
    frontend goes."""
    from pvcalls import _backend

    arrived = threading.Event()
    answer = threading.Event()
    made = threading.Event()
    make_socket = _backend._HANDLERS[_wire.PVCALLS_SOCKET]

    def slow_socket(fe: Any, request: Any, req: Any) -> Any:
        arrived.set()
        assert answer.wait(TIMEOUT)
        try:
            return make_socket(fe, request, req)
        finally:
            made.set()

    guest = host.create_domain(f"late-socket-{how}")
    with pvcalls.Frontend(guest, timeout=TIMEOUT) as fe:
        monkeypatch.setitem(_backend._HANDLERS, _wire.PVCALLS_SOCKET,  # type: ignore[index]
                            slow_socket)
        try:
            if how == "timeout":
                fe.timeout = 0.5  # for this call only: not the handshake's or close()'s
                with pytest.raises(TimeoutError):
                    fe.socket()
                fe.timeout = TIMEOUT
            else:
                interrupt(lambda: arrived.is_set() and bool(fe._cmd_cond._waiters), fe.socket)
            assert fe.sockets() == []
        finally:
            answer.set()
        monkeypatch.undo()
        assert made.wait(TIMEOUT)
        wait_until(lambda: all(r.domain != guest.domid for r in backend.stats().sockets))
        wait_until(lambda: not fe._releases)
        with fe._lock:
            assert fe._slots == [None] * len(fe._slots)
        s = fe.socket()  # the frontend goes on as before
        s.close()


def test_an_interrupted_connect_leaves_a_socket_only_to_close(
    fe: pvcalls.Frontend, backend: Any
) -> None:
    """Ctrl-C while connect() waits for the backend's answer: the CONNECT
    stays in flight, as after a timeout, and whether the socket will be
    connected is unknown; it must not pass for connected (recv() would
    wait on a ring the backend may never use)."""
    s = fe.socket()
    with unanswered_listener() as address:
        s.settimeout(TIMEOUT)
        interrupt(lambda: s._st.ring is not None and bool(fe._cmd_cond._waiters),
                  lambda: s.connect(address))
        s.settimeout(0.2)  # without the fix: TimeoutError, not ENOTCONN
        assert_fails(errno.ENOTCONN, lambda: s.recv(1), lambda: s.send(b"x"))
        assert_fails(errno.EISCONN, lambda: s.connect(address))
        s.close()
        wait_until(lambda: all(r.id != s.id for r in backend.stats().sockets))
    wait_until(lambda: not fe._releases)
    with fe._lock:
        assert fe._slots == [None] * len(fe._slots)


def test_a_close_interrupted_before_its_release_went_out_is_finished_by_the_next(
    host: SimHost, backend: Any, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while close() waits for room on the command ring for its
    RELEASE: the interrupt goes through and the socket is closed for its
    calls, but it is still the backend's, and the next close() releases
    it (before, it returned at once, and the socket and its ring stayed in
    the backend for the life of the frontend).  The frontend's timeout
    outlasts the test: a RELEASE that never goes out is a test timeout."""
    srv = server()
    guest = host.create_domain("interrupted-close")
    before = host.hypervisor.stats()
    with pvcalls.Frontend(guest, timeout=OUTLASTS_THE_TEST) as fe:
        s = connected(fe, srv.address)
        submit = fe._submit

        def interrupted_release(slot: Any, *args: Any, **kwargs: Any) -> Any:
            if slot.cmd == _wire.PVCALLS_RELEASE:
                raise Interrupted  # as from the wait for a free slot
            return submit(slot, *args, **kwargs)

        monkeypatch.setattr(fe, "_submit", interrupted_release)
        with pytest.raises(Interrupted):
            s.close()
        monkeypatch.undo()
        assert s.closed
        assert_fails(errno.EBADF, lambda: s.recv(1))
        assert s not in fe.sockets()
        assert any(r.domain == guest.domid for r in backend.stats().sockets)
        s.close()  # releases it
        wait_until(lambda: all(r.domain != guest.domid for r in backend.stats().sockets))
        wait_until(lambda: not fe._releases)
        assert s._st.ring is None and s._st.id not in fe._sockets
        s.close()  # nothing left to do
    wait_until(lambda: all(n <= before[k] for k, n in host.hypervisor.stats().items()))


def test_a_close_racing_a_claim_given_back_leaves_it_to_the_next(
    host: SimHost, backend: Any, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads close a socket; the first's claim of the release is
    given back (a Ctrl-C before its RELEASE went out) after the second
    found it claimed, before it looked whether it was settled.  The give-back
    takes no lock (see SocketState.release), so the second must read the
    claim once: it read it again and failed with AttributeError on None.
    Now it leaves the socket to the next close(), as when it comes a moment
    earlier."""
    srv = server()
    guest = host.create_domain("claim-given-back")
    with pvcalls.Frontend(guest, timeout=TIMEOUT) as fe:
        s = connected(fe, srv.address)
        submit = fe._submit
        in_submit, go = threading.Event(), threading.Event()

        def interrupted_release(slot: Any, *args: Any, **kwargs: Any) -> Any:
            if slot.cmd == _wire.PVCALLS_RELEASE:
                in_submit.set()
                assert go.wait(TIMEOUT)
                raise Interrupted  # as from the wait for a free slot
            return submit(slot, *args, **kwargs)

        monkeypatch.setattr(fe, "_submit", interrupted_release)
        pause = PauseAt.in_method(monkeypatch, _frontend.Frontend, "_release",
                                  "if not claim.settled")
        first = Attempt(s.close)
        assert in_submit.wait(TIMEOUT)
        second = Attempt(s.close)
        assert pause.reached.wait(TIMEOUT)
        go.set()
        wait_until(lambda: s._st.release is None)  # given back, the second still paused
        pause.resume()
        assert isinstance(first.result(), Interrupted)
        assert second.result() is None
        monkeypatch.undo()
        assert any(r.domain == guest.domid for r in backend.stats().sockets)
        s.close()  # releases it
        wait_until(lambda: all(r.domain != guest.domid for r in backend.stats().sockets))
        assert s.id not in fe._sockets


def test_a_close_interrupted_twice_after_its_release_went_out_is_finished_by_the_next(
    host: SimHost, backend: Any, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two Ctrl-Cs in one close(): the first between its RELEASE's push and
    the notify (the RELEASE went out: close() goes on to finish the
    release), the second as it goes on to take the socket's ring.  The
    next close() finishes the release, the ring back in the pool once
    answered.  Before, it took the release for one that another thread was
    still sending and returned at once: the socket stayed in the
    frontend's table, its ring never freed."""
    srv = server()
    guest = host.create_domain("twice-interrupted-close")
    with pvcalls.Frontend(guest, timeout=TIMEOUT) as fe:
        s = connected(fe, srv.address)
        ring = s._st.ring
        notify, held = fe._notify, _frontend.held
        landed: list[str] = []

        def interrupted_notify(port: int) -> None:
            monkeypatch.setattr(fe, "_notify", notify)
            landed.append("notify")
            raise Interrupted

        def interrupted_held(*args: Any) -> Any:
            monkeypatch.setattr(_frontend, "held", held)
            landed.append("held")
            raise Interrupted

        monkeypatch.setattr(fe, "_notify", interrupted_notify)
        monkeypatch.setattr(_frontend, "held", interrupted_held)
        wait_until(lambda: _command_ring_idle(fe))  # the RELEASE needs a notify
        with pytest.raises(Interrupted):
            s.close()
        assert landed == ["notify", "held"]
        s.close()
        assert s.id not in fe._sockets
        wait_until(lambda: ring in fe._ring_pool)


@pytest.mark.parametrize("then", ["close", "open"])
def test_a_close_interrupted_while_its_thread_stops_is_finished_by_the_next(
    host: SimHost, backend: Any, then: str
) -> None:
    """Ctrl-C while close() waits for the frontend's event thread to end:
    the handles the thread uses must stay until it has, and the next
    close() must release them instead of returning at once.  So must an
    open() (a program retrying), before it sets up handles of its own."""
    guest = host.create_domain(f"interrupted-stop-{then}")
    before = host.hypervisor.stats()
    fe = pvcalls.Frontend(guest)
    fe.open()
    inside = threading.Event()
    release = threading.Event()
    r, w = os.pipe()
    try:
        def stuck() -> None:  # a relay the event thread runs
            inside.set()
            assert release.wait(TIMEOUT)

        with fe._lock:
            assert fe._event_epoll is not None
            fe._relays[r] = stuck
            fe._event_epoll.register(r, select.EPOLLIN)
        os.write(w, b"x")
        assert inside.wait(TIMEOUT)
        try:
            # After the device part (other joins are in it), in the join.
            interrupt(lambda: fe.device is None and main_thread_in(
                "_wait_for_tstate_lock", path="threading"), fe.close)
            assert fe.device is None  # the device part was done
            assert fe._evtchn is not None and fe._xs is not None  # in use by the thread
        finally:
            release.set()
        if then == "open":
            old_thread = fe._thread
            assert old_thread is not None
            fe.open()
            assert not old_thread.is_alive()
            fe.socket().close()  # the new connection works
        fe.close()
        assert fe._thread is None and fe._evtchn is None and fe._xs is None
        wait_until(lambda: all(n <= before[k] for k, n in host.hypervisor.stats().items()))
    finally:
        release.set()
        fe.close()
        os.close(r)
        os.close(w)


def _closed_for_good(fe: pvcalls.Frontend) -> bool:
    return (fe.device is None and fe._thread is None and fe._evtchn is None
            and fe._xs is None and fe._gntshr is None and fe._ring is None)


@pytest.mark.parametrize("where", [("_close_device", "self._release_sockets()"),
                                   ("_release_handles", "self._evtchn.close()")])
def test_a_close_while_another_thread_closes_waits_for_it(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, where: tuple[str, str]) -> None:
    """Two threads close a frontend at once, the first stopped in the
    device part or as it closes its handles: the second waits for the
    first to end and returns once the frontend is closed.  Before, both
    ran: the second closed it all, then the first took what it had
    checked for a handle for one (AttributeError on None), or went on to
    remove the device through the XenStore connection closed meanwhile
    (a warning)."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fe = pvcalls.Frontend(host.create_domain(f"close-twice-{where[0]}"), timeout=TIMEOUT)
    fe.open()
    pause = PauseAt.in_method(monkeypatch, _frontend.Frontend, *where)
    first = Attempt(fe.close)
    try:
        assert pause.reached.wait(TIMEOUT)
        second = Attempt(fe.close)
        waited = second.waits_at(pvcalls.Frontend.close, "self._close_lock")
        assert waited, "the second close() did not wait for the first"
    finally:
        pause.resume()
    assert first.result() is None
    assert second.result() is None
    assert _closed_for_good(fe)
    assert not caplog.records, caplog.text


def test_a_close_from_a_signal_handler_inside_close_leaves_it_to_that_one(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A signal's handler that closes the frontend runs while the main
    thread is in close(): the handler's close() returns at once and the
    one it interrupted finishes.  Before, the handler's closed it all, and
    the one it interrupted went on to remove the device through the
    XenStore connection closed under it (a warning)."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    assert threading.current_thread() is threading.main_thread()
    fe = pvcalls.Frontend(host.create_domain("close-in-handler"), timeout=TIMEOUT)
    fe.open()
    handled: list[None] = []
    wait_releases = fe._wait_releases

    def signalled() -> None:
        monkeypatch.setattr(fe, "_wait_releases", wait_releases)  # one signal
        wait_releases()
        signal.raise_signal(signal.SIGUSR1)  # its handler runs as this call returns

    old = signal.signal(signal.SIGUSR1, lambda *_: handled.append(fe.close()))
    try:
        monkeypatch.setattr(fe, "_wait_releases", signalled)
        fe.close()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert handled == [None]
    assert _closed_for_good(fe)
    assert not caplog.records, caplog.text


def _closing_at(fe: pvcalls.Frontend, func: Callable[..., Any], text: str,
                call: Callable[[], Any], msg: str = "the call has not ended",
                ) -> tuple[list[None], Any]:
    """``call()`` on a thread of its own, with ``fe.close()`` run the first
    time it gets to the line of ``func`` holding ``text`` (untraced, as a
    signal's handler run there would): what that close() returned (none
    if it did not run), and what ``call()`` returned or raised."""
    code = func.__code__
    line = line_of(func, text)
    inner: list[None] = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == line and not inner:
            inner.append(fe.close())
        return local

    def traced() -> Any:
        sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
        try:
            return call()
        finally:
            sys.settrace(None)

    return inner, Attempt(traced).result(msg=msg)


def test_a_close_inside_close_as_it_takes_its_lock_does_not_wait_for_itself(
        host: SimHost, backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A close() runs in a close() of the same thread that has taken its
    lock but not yet said that it closes (where a signal's handler may
    run, as the lock's taking returns): the inner one closes the
    frontend, and the outer finds it closed.  With a plain lock the
    inner one waited for good for the lock its own thread held."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fe = pvcalls.Frontend(host.create_domain("close-as-it-locks"), timeout=TIMEOUT)
    fe.open()
    inner, outcome = _closing_at(fe, pvcalls.Frontend.close, "self._closer = me", fe.close,
                                 msg="the close() inside close() waits for itself")
    assert outcome is None
    assert inner == [None]
    assert _closed_for_good(fe)
    assert not caplog.records, caplog.text


@contextlib.contextmanager
def _closing_on_the_event_thread(
        fe: pvcalls.Frontend, until: threading.Event | None = None,
) -> Iterator[tuple[Callable[[], object], threading.Event]]:
    """For the block, a relay of ``fe``'s event thread (as a finaliser it
    runs would) that closes ``fe`` once the callable yielded is called;
    the event yielded is set once that close() has returned.  With
    ``until``, the relay stays in its handler after the close() until it
    is set (at the end of the block at the latest).  At the end, once the
    close() has returned (if it ran), ``fe`` is closed, and the relay's
    pipe."""
    r, w = os.pipe()
    asked, returned = threading.Event(), threading.Event()

    def closing() -> None:
        os.read(r, 1)
        fe.close()
        returned.set()
        if until is not None:
            until.wait(TIMEOUT)

    def close_there() -> None:
        asked.set()
        os.write(w, b"x")

    try:
        with fe._lock:
            assert fe._event_epoll is not None
            fe._relays[r] = closing
            fe._event_epoll.register(r, select.EPOLLIN)
        yield close_there, returned
    finally:
        if until is not None:
            until.set()
        if asked.is_set():
            returned.wait(TIMEOUT)  # not beside that close(), should it run late
        fe.close()
        os.close(r)
        os.close(w)


def test_a_close_of_the_event_thread_while_another_thread_closes_returns_at_once(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The event thread closes the frontend (a finaliser it runs, say)
    while another thread's close() is in the device part: it returns at
    once, for that close() waits for it to end.  Before, it closed the
    frontend under the other, which then went on to remove the device
    through the XenStore connection closed meanwhile (a warning)."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fe = pvcalls.Frontend(host.create_domain("close-in-event-thread"), timeout=TIMEOUT)
    fe.open()
    with _closing_on_the_event_thread(fe) as (close_there, returned):
        pause = PauseAt.in_method(monkeypatch, _frontend.Frontend, "_close_device",
                                  "self._release_sockets()")
        first = Attempt(fe.close)
        try:
            assert pause.reached.wait(TIMEOUT)
            close_there()
            assert returned.wait(TIMEOUT)
        finally:
            pause.resume()
        assert first.result() is None
        assert _closed_for_good(fe)
        assert not caplog.records, caplog.text


def test_a_close_of_xenstores_thread_while_another_thread_closes_returns_at_once(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """XenStore's watch thread closes the frontend (a finaliser it runs,
    say) while another thread's close() is in the device part: it returns
    at once, for that close() waits for it to end (closing the XenStore
    connection).  Before, it waited for that close() for good, and that
    close() for it."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fe = pvcalls.Frontend(host.create_domain("close-in-xenstore-thread"), timeout=TIMEOUT)
    fe.open()
    assert fe._xs is not None
    node = f"{fe.device.frontend_path}/closes-here"
    armed = threading.Event()
    returned = threading.Event()

    def closing(_path: str) -> None:  # on the watch thread
        if armed.is_set() and not returned.is_set():
            fe.close()
            returned.set()

    fe._xs.watch(node, closing)
    pause = PauseAt.in_method(monkeypatch, _frontend.Frontend, "_close_device",
                              "self._release_sockets()")
    first = Attempt(fe.close)
    assert pause.reached.wait(TIMEOUT)
    armed.set()
    fe._xs.write(node, "1")
    # Not resumed unless it returned: that close() would then wait in its
    # join of the watch thread for good (a daemon thread, left behind).
    assert returned.wait(TIMEOUT), "the watch thread's close() waits for the other"
    pause.resume()
    assert first.result() is None
    assert _closed_for_good(fe)
    assert not caplog.records, caplog.text


def test_a_close_of_xenstores_watch_thread_alone_closes_the_device(
        host: SimHost, backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    """XenStore's watch thread closes the frontend (a finaliser it runs,
    say), no other close() running: it closes it all, the device
    removed.  Before, its wait for the backend's Closing, on the very
    thread that would tell it, raised RuntimeError, and left the device
    added and the handles open."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fe = pvcalls.Frontend(host.create_domain("close-alone-in-xenstore-thread"),
                          timeout=TIMEOUT)
    fe.open()
    assert fe._xs is not None
    device = fe.device
    node = f"{device.frontend_path}/closes-here"
    returned: list[BaseException | None] = []
    ran = threading.Event()

    def closing(_path: str) -> None:  # on the watch thread
        if ran.is_set():
            return
        try:
            fe.close()
            returned.append(None)
        except BaseException as exc:
            returned.append(exc)
        ran.set()

    try:
        fe._xs.watch(node, closing)
        fe._xs.write(node, "1")
        assert ran.wait(TIMEOUT)
        assert returned == [None]
        assert _closed_for_good(fe)
        with XenStore.connect_to(host.dom0) as xs:
            assert xs.read(f"{device.backend_path}/state") is None
        assert not caplog.records, caplog.text
    finally:
        fe.close()


def test_a_close_in_the_backend_watchs_callback_closes_the_frontend(
        caplog: pytest.LogCaptureFixture) -> None:
    """The frontend's own watch of the backend's state closes the
    frontend from inside its callback (a logging handler told that the
    backend left, a finaliser run there): the close() runs whole, and the
    callback then ends quietly.  Before, that close() waited for good for
    the lock the callback held (_watch_lock), on the watch thread."""
    caplog.set_level(logging.INFO, logger="pvcalls.frontend")
    returned: list[BaseException | None] = []
    ran = threading.Event()

    class Closing(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "went to state" not in record.msg or ran.is_set():
                return
            try:
                fe.close()
                returned.append(None)
            except BaseException as exc:
                returned.append(exc)
            ran.set()

    handler = Closing()
    with SimHost() as host:
        backend = pvcalls.Backend(host.dom0, max_ioworkers=1)
        fe = pvcalls.Frontend(host.create_domain("close-in-backend-watch"), timeout=TIMEOUT)
        _frontend.logger.addHandler(handler)
        try:
            fe.open()
            assert fe._xs is not None
            watching = fe._xs._thread
            assert watching is not None
            backend.close()
            assert ran.wait(TIMEOUT), "the close() in the watch's callback waits for itself"
            assert returned == [None]
            # Once the callback is over: it must not act after the close().
            watching.join(TIMEOUT)
            assert not watching.is_alive()
            assert _closed_for_good(fe)
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        finally:
            _frontend.logger.removeHandler(handler)
            if ran.is_set():
                fe.close()
            backend.close()


def test_a_close_of_the_event_thread_takes_the_answers_to_its_releases(
        host: SimHost, backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The event thread closes the frontend (a finaliser it runs, say),
    no other close() running, with a socket open: it takes the answer
    to the socket's RELEASE itself, as nobody else would.  Before, it
    waited the whole timeout for it, then gave it up (a warning)."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fe = pvcalls.Frontend(host.create_domain("event-thread-releases"), timeout=TIMEOUT)
    fe.open()
    with (contextlib.closing(fe.socket()),
          _closing_on_the_event_thread(fe) as (close_there, returned)):
        close_there()
        assert returned.wait(TIMEOUT / 2), "the event thread's close() waited for itself"
        assert fe.device is None
        assert not caplog.records, caplog.text


def test_an_open_after_the_event_thread_closed_waits_for_it_to_end(
        host: SimHost, backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The event thread closes the frontend (a finaliser it runs, say),
    and before it is back in its loop another thread opens the frontend
    again: the open() waits for that thread to end, and the frontend it
    opens works.  Before, nothing waited for it: the open() cleared the
    flag that stopped it (one for every thread then), and the old thread
    went on with the handles closed under it, handed the new command
    ring's port out to itself, and failed the new frontend (EIO) as it
    failed."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fe = pvcalls.Frontend(host.create_domain("open-after-event-thread-closed"),
                          timeout=TIMEOUT)
    fe.open()
    old = fe._thread
    assert old is not None
    go_on = threading.Event()
    with _closing_on_the_event_thread(fe, until=go_on) as (close_there, closed):
        close_there()
        assert closed.wait(TIMEOUT)
        assert fe.device is None
        opening = Attempt(fe.open)
        # No two event threads at once, even one that would stop.
        waited = opening.waits_at(_frontend.Frontend._stop_thread, "thread.join(")
        assert waited, "the open() did not wait for the old thread"
        go_on.set()
        assert opening.result() is None
        old.join(TIMEOUT)
        assert not old.is_alive()
        assert fe._thread is not old and fe._thread is not None and fe._thread.is_alive()
        fe.socket().close()
        assert not caplog.records, caplog.text


def test_an_event_thread_outliving_the_wait_for_it_stops_all_the_same(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """As above, but the old event thread stays in its handler past the
    time an open() waits for it (a warning), and the open() goes on with
    a new thread: the old one, back in its loop, stops, and the frontend
    that open() opened works.  Before, the open() had cleared the flag
    that stopped it: it went on with the handles closed under it, and
    failed the new frontend."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    monkeypatch.setattr(_frontend, "_THREAD_STOP_WAIT", 0.1)
    fe = pvcalls.Frontend(host.create_domain("event-thread-outlives-stop"), timeout=TIMEOUT)
    fe.open()
    old = fe._thread
    assert old is not None
    go_on = threading.Event()
    with _closing_on_the_event_thread(fe, until=go_on) as (close_there, closed):
        close_there()
        assert closed.wait(TIMEOUT)
        fe.open()
        assert [r.getMessage() for r in caplog.records] == [
            f"{old.name} of domain {fe.domain.domid} did not stop"]
        caplog.clear()
        go_on.set()
        old.join(TIMEOUT)
        assert not old.is_alive()
        assert fe._thread is not None and fe._thread.is_alive()
        fe.socket().close()
        assert not caplog.records, caplog.text


def test_an_open_while_another_thread_closes_waits_for_it(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A thread opens the frontend again while another's close() is
    closing its handles: the open() waits for the close() to end, then
    opens it afresh.  Before, it closed what that close() had not yet
    (open() finishes an interrupted close), made its own handles, and
    the close() then went on to close those: the frontend open() left
    open had no event channel, no XenStore connection."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fe = pvcalls.Frontend(host.create_domain("open-while-closing"), timeout=TIMEOUT)
    fe.open()
    pause = PauseAt.in_method(monkeypatch, _frontend.Frontend, "_release_handles",
                              "self._evtchn.close()")
    first = Attempt(fe.close)
    try:
        assert pause.reached.wait(TIMEOUT)
        opening = Attempt(fe.open)
        waited = opening.waits_at(pvcalls.Frontend.open, "self._close_lock")
        assert waited, "the open() did not wait for the close()"
    finally:
        pause.resume()
    try:
        assert first.result() is None
        assert opening.result() is None
        assert fe.device is not None and fe._evtchn is not None and fe._xs is not None
        fe.socket().close()
        assert not caplog.records, caplog.text
    finally:
        fe.close()


@pytest.mark.parametrize("line", ["handles.extend(", "self._thread.start()",
                                  "self._connected = True"])
def test_a_close_while_another_thread_opens_waits_and_fails_the_open(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, line: str) -> None:
    """A thread closes the frontend while another's open() is in its
    handshake: the close() waits for the open(), which fails with
    ECANCELED having closed all it opened; the frontend opens again
    afterwards.  Before, the close() closed the handles the handshake was
    making under it: the open() failed on a handle gone (AttributeError
    on None), or went on to make new ones that nothing closed."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    name = line.split("(")[0].split(".")[-1].split(" ")[0].strip("_")
    fe = pvcalls.Frontend(host.create_domain(f"close-while-opening-{name}"), timeout=TIMEOUT)
    before = _held(host)
    pause = PauseAt.in_method(monkeypatch, _frontend.Frontend, "_connect", line)
    opening = Attempt(fe.open)
    try:
        assert pause.reached.wait(TIMEOUT)
        closing = Attempt(fe.close)
        waited = closing.waits_at(pvcalls.Frontend.close, "self._close_lock")
        assert waited, "the close() did not wait for the open()"
    finally:
        pause.resume()
    try:
        err = opening.result()
        assert isinstance(err, OSError) and err.errno == errno.ECANCELED, repr(err)
        assert closing.result() is None
        assert _closed_for_good(fe)
        _wait_released(host, before, f"a close() while the open() stood at {line!r}")
        assert not caplog.records, caplog.text
        monkeypatch.undo()
        fe.open()
        fe.socket().close()
    finally:
        fe.close()


def _watch_fires(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set once a watch's callback first runs (XenStore fires every new
    watch once, at a moment of its own): a wait_for() may read its node
    again then."""
    fired = threading.Event()
    watch = XenStore._watch

    def noted(self: XenStore, path: str, callback: Callable[[str], object],
              *args: Any, **kwargs: Any) -> Any:
        def called(p: str) -> object:
            fired.set()
            return callback(p)

        return watch(self, path, called, *args, **kwargs)

    monkeypatch.setattr(XenStore, "_watch", noted)
    return fired


def test_a_close_as_open_takes_its_lock_fails_the_open(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A thread closes the frontend just as another's open() has taken
    close()'s lock: the close() waits for the open(), which fails with
    ECANCELED, as any close() made while it runs makes it.  Before, the
    open() cleared the close()'s request under the lock it had just
    taken: it opened, and the close() closed the frontend after it."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fe = pvcalls.Frontend(host.create_domain("close-as-open-locks"), timeout=TIMEOUT)
    before = _held(host)
    pause = PauseAt.in_method(monkeypatch, pvcalls.Frontend, "open",
                              "if self.device is not None:")
    opening = Attempt(fe.open)
    try:
        assert pause.reached.wait(TIMEOUT)
        closing = Attempt(fe.close)
        waited = closing.waits_at(pvcalls.Frontend.close, "self._close_lock")
        assert waited, "the close() did not wait for the open()"
    finally:
        pause.resume()
    err = opening.result()
    assert isinstance(err, OSError) and err.errno == errno.ECANCELED, repr(err)
    assert closing.result() is None
    assert _closed_for_good(fe)
    _wait_released(host, before, "a close() as the open() took its lock")
    assert not caplog.records, caplog.text


def test_a_close_from_another_thread_cuts_a_hung_open_short(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No backend answers (none runs), and open() would wait its whole
    timeout for InitWait: a close() from another thread (a program that
    gives up on it) ends that wait, and the open() fails with ECANCELED
    having closed all it opened.  Before, the close() waited for the
    open() to time out."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fired = _watch_fires(monkeypatch)
    read_since = threading.Event()
    read = XenStore.read

    def noted(self: XenStore, path: str) -> Any:
        if fired.is_set():
            read_since.set()
        return read(self, path)

    monkeypatch.setattr(XenStore, "read", noted)
    with SimHost() as host:  # of its own: no backend
        fe = pvcalls.Frontend(host.create_domain("close-cuts-open-short"),
                              timeout=OUTLASTS_THE_TEST)
        before = _held(host)
        opening = Attempt(fe.open)
        # Asleep once it read the state since its watch's first event and
        # found it wanting: a close() before that read, or that event,
        # would be seen there with no waking.
        wait_until(lambda: not opening.thread.is_alive() or (
            read_since.is_set()
            and stands_at(opening.thread.ident or -1, XenStore.wait_for, "changed.wait(")))
        assert opening.thread.is_alive(), repr(opening.result())
        closing = Attempt(fe.close)
        assert closing.result(msg="the close() waits for the open() to time out") is None
        err = opening.result()
        assert isinstance(err, OSError) and err.errno == errno.ECANCELED, repr(err)
        assert _closed_for_good(fe)
        _wait_released(host, before, "a close() that cut the open() short")
        assert not caplog.records, caplog.text


def test_a_close_of_the_openers_own_thread_fails_the_hung_open_as_cancelled(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """No backend answers, and a close() runs inside open()'s wait for it
    on the same thread (a signal's handler, which cannot wake the wait):
    the wait runs to its timeout, and the open() then fails with
    ECANCELED, as the close() asked, having closed all it opened.  Before,
    it failed with the TimeoutError, as if nobody had closed it."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fired = _watch_fires(monkeypatch)
    with SimHost() as host:  # of its own: no backend
        fe = pvcalls.Frontend(host.create_domain("close-in-hung-open"), timeout=0.3)
        before = _held(host)
        code = XenStore.wait_for.__code__
        # Past a test of the predicate, where the wait begins; in a pass
        # begun once the watch's first event came: no other wakes it.
        clear = line_of(XenStore.wait_for, "changed.clear()")
        line = line_of(XenStore.wait_for, "remaining = deadline - time.monotonic()")
        inner: list[None] = []
        settled: list[bool] = []

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_lineno == clear:
                settled.append(fired.is_set())
            elif event == "line" and frame.f_lineno == line and settled[-1] and not inner:
                inner.append(fe.close())  # as a handler run there would (untraced)
            return local

        def traced() -> None:
            sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
            try:
                fe.open()
            finally:
                sys.settrace(None)

        err = Attempt(traced).result()
        assert inner == [None]
        assert isinstance(err, OSError) and err.errno == errno.ECANCELED, repr(err)
        assert _closed_for_good(fe)
        _wait_released(host, before, "a close() inside the open()'s wait")
        assert not caplog.records, caplog.text


def test_a_close_inside_open_as_xenstore_holds_its_lock_returns(
        caplog: pytest.LogCaptureFixture) -> None:
    """A close() runs inside open()'s wait for the backend on the same
    thread (a signal's handler) just as the wait holds its XenStore
    connection's lock: it returns, not waking the wait (which would take
    that lock again, for good), and the open() fails with ECANCELED."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    with SimHost() as host:  # of its own: no backend
        fe = pvcalls.Frontend(host.create_domain("close-under-xs-lock"), timeout=TIMEOUT)
        before = _held(host)
        inner, err = _closing_at(fe, XenStore.wait_for, "self._waiters.add(changed)", fe.open,
                                 msg="the close() waits for the lock its thread holds")
        assert inner == [None]
        assert isinstance(err, OSError) and err.errno == errno.ECANCELED, repr(err)
        assert _closed_for_good(fe)
        _wait_released(host, before, "a close() as the open()'s wait held XenStore's lock")
        assert not caplog.records, caplog.text


def _open_closing_at_line(fe: pvcalls.Frontend, n: int,
                          codes: tuple[Any, ...]) -> tuple[list[tuple[str, int]], Any]:
    """``fe.open()`` on a thread of its own, with ``fe.close()`` run at
    the ``n``-th line it gets to in a frame of ``codes`` (untraced, as a
    signal's handler run there would): where it ran (none if fewer
    lines), and what the open() returned or raised."""
    lines = itertools.count()
    inner: list[tuple[str, int]] = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and not inner and next(lines) == n:
            inner.append((frame.f_code.co_name, frame.f_lineno))
            fe.close()
        return local

    def traced() -> None:
        sys.settrace(lambda frame, event, arg: local if frame.f_code in codes else None)
        try:
            fe.open()
        finally:
            sys.settrace(None)

    outcome = Attempt(traced).result(msg="the close() inside open() waits for itself")
    return inner, outcome


def test_a_close_inside_open_anywhere_fails_it_or_runs_before_it(
        host: SimHost, backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A close() runs inside an open() of the same thread (as a signal's
    handler would), at each line of open() and of its handshake in turn:
    one once the open() has said that it opens makes it fail with
    ECANCELED, having closed all it opened; one before that closes the
    frontend whole, and the open() opens it afresh.  Before, it closed
    the handles under the open(), which then failed on one gone
    (AttributeError on None), or went on to make new ones that nothing
    closed."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    guest = host.create_domain("close-inside-open")
    codes = (pvcalls.Frontend.open.__code__, _frontend.Frontend._connect.__code__)
    outcomes: list[str] = []
    for n in itertools.count():
        fe = pvcalls.Frontend(guest, timeout=TIMEOUT)
        before = _held(host)
        inner, outcome = _open_closing_at_line(fe, n, codes)
        if not inner:
            assert outcome is None
            assert fe.device is not None
            fe.close()
            break
        where = f"a close() at {inner[0]}"
        if outcome is None:
            assert fe.device is not None, where  # it ran before the open()
            fe.close()
        try:
            assert outcome is None or (isinstance(outcome, OSError)
                                       and outcome.errno == errno.ECANCELED), (where, outcome)
            assert _closed_for_good(fe), where
            _wait_released(host, before, where)
            assert not caplog.records, (where, caplog.text)
        finally:
            fe.close()
        outcomes.append("failed" if outcome is not None else "opened")
    assert "failed" in outcomes and "opened" in outcomes, outcomes


def test_a_close_of_the_reaper_while_another_thread_closes_returns_at_once(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The reaper closes the frontend (a finaliser it runs, say) while
    another thread's close() is in the device part: it returns at once,
    for that close() waits for it to end.  Were it to wait for the other,
    that close() would give up on the reaper (a warning) and go on with
    it still running."""
    caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    fe = pvcalls.Frontend(host.create_domain("close-in-reaper"), timeout=TIMEOUT)
    fe.open()
    returned = threading.Event()
    release = fe._release

    def closing(st: Any, sock: Any = None) -> None:  # on the reaper
        if threading.current_thread() is fe._reaper and not returned.is_set():
            fe.close()
            returned.set()
        release(st, sock)

    pause = PauseAt.in_method(monkeypatch, _frontend.Frontend, "_close_device",
                              "self._release_sockets()")
    first = Attempt(fe.close)
    try:
        assert pause.reached.wait(TIMEOUT)
        monkeypatch.setattr(fe, "_release", closing)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sock = fe.socket()
            del sock
            gc.collect()
        assert _unclosed(caught)
        assert returned.wait(TIMEOUT), "the reaper's close() waits for the other"
    finally:
        pause.resume()
    assert first.result() is None
    assert _closed_for_good(fe)
    assert not caplog.records, caplog.text


@pytest.mark.parametrize("call", ["send", "recv", "peek"])
def test_a_call_resuming_after_close_gave_up_its_lock_says_ebadf(
        host: SimHost, backend: Any, server: Any, caplog: pytest.LogCaptureFixture,
        call: str) -> None:
    """A send() or recv() holds its lock while the frontend's close() runs
    in it (a signal's handler, as the call looks at the ring): close()
    gives up on that lock within its timeout (a warning) and closes the
    frontend, its handles and shares.  The call then says EBADF, and
    takes nothing it copied for sent or received.  Before, it copied to
    (or from) the zero pages that the ended shares left, and said it
    sent 100 bytes (or returned 100 zero bytes)."""
    srv = server()
    fe = pvcalls.Frontend(host.create_domain(f"resume-after-close-{call}"), timeout=0.2)
    fe.open()
    try:
        s = connected(fe, srv.address)
        if call != "send":
            s.sendall(b"x" * 100)
            wait_until(lambda: s._st.ring is not None and s._st.ring.in_available() >= 100)
        func = pvcalls.PVSocket._send if call == "send" else pvcalls.PVSocket._receive
        text = "_checked(ring.outq.writable)" if call == "send" else "cons = ring.inq.position"

        def calling() -> Any:
            if call == "send":
                return s.send(b"y" * 100)
            return s.recv(100, socket.MSG_PEEK if call == "peek" else 0)

        inner, outcome = _closing_at(fe, func, text, calling)
        assert inner == [None]
        assert isinstance(outcome, OSError) and outcome.errno == errno.EBADF, repr(outcome)
        s.close()
    finally:
        fe.close()


@pytest.mark.parametrize("call", ["send", "recv"])
def test_a_call_closed_as_it_copies_more_returns_what_went_before(
        host: SimHost, backend: Any, server: Any, call: str) -> None:
    """As above, but the blocking call had moved bytes already (a send()
    larger than its ring, a recv() with MSG_WAITALL) when the close()
    runs in it, as it copies more: it returns those bytes, and takes
    none of what it copied since for sent or received."""
    srv = server()
    fe = pvcalls.Frontend(host.create_domain(f"closed-copying-more-{call}"), timeout=0.2)
    fe.open()
    try:
        s = connected(fe, srv.address)
        s.settimeout(None)  # MSG_WAITALL waits for all only so
        ring = s._st.ring
        assert ring is not None
        if call == "send":
            func, text, moved = pvcalls.PVSocket._send, "sent = 0", "total"
        else:
            func, text, moved = pvcalls.PVSocket._receive, "cons = ring.inq.position", "got"
            s.sendall(b"x" * 50)
            wait_until(lambda: ring.in_available() >= 50)
        code = func.__code__
        line = line_of(func, text)
        before: list[int] = []

        def local(frame: Any, event: str, arg: Any) -> Any:
            if (event == "line" and frame.f_lineno == line and not before
                    and frame.f_locals[moved] > 0 and frame.f_locals["parts"]):
                before.append(frame.f_locals[moved])
                fe.close()  # as a handler run there would (untraced)
            return local

        def traced() -> Any:
            sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
            try:
                if call == "send":
                    return s.send(b"y" * (3 * ring.outq.size))
                return s.recv(100, socket.MSG_WAITALL)
            finally:
                sys.settrace(None)

        calling = Attempt(traced)
        if call == "recv":
            # More to take once the first 50 bytes are: a second pass.
            wait_until(lambda: ring.in_available() == 0 or not calling.thread.is_alive())
            s.sendall(b"x" * 50)
        outcome = calling.result()
        assert before, f"no close() in the call: {outcome!r}"
        if call == "send":
            assert outcome == before[0], (outcome, before)
        else:
            assert outcome == b"x" * before[0], (outcome, before)
        s.close()
    finally:
        fe.close()


def _close_lock_free_elsewhere(fe: pvcalls.Frontend) -> bool:
    """Whether another thread finds close()'s lock free (an RLock: the
    thread that left it held would take it again)."""
    def take() -> bool:
        got = fe._close_lock.acquire(False)
        if got:
            fe._close_lock.release()
        return got
    return bool(Attempt(take).result())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("call", ["close", "open"])
def test_an_open_or_close_interrupted_anywhere_leaves_close_to_any_thread(
        host: SimHost, backend: Any, call: str) -> None:
    """A Ctrl-C landing anywhere in the frontend's code during close()
    (or open(), which holds close()'s lock too) leaves that lock free
    for every thread, and no thread marked as closing or opening, so a
    close() of another thread finishes it.  Held by the main thread, its
    later close() would take it again, and only other threads' would
    wait for good; marked as closing, its later close() would return at
    once."""
    within = os.path.dirname(_frontend.__file__)
    guest = host.create_domain(f"interrupted-{call}-lock")
    landed = []
    for n in itertools.count():
        fe = pvcalls.Frontend(guest, timeout=TIMEOUT)
        try:
            if call == "close":
                fe.open()
                where = interrupted_at(n, within, fe.close)
            else:
                where = interrupted_at(n, within, fe.open)
            assert _close_lock_free_elsewhere(fe), f"close()'s lock left held, landing {where}"
            assert fe._closer is None, f"a closer left, landing {where}"
            assert fe._opener is None, f"an opener left, landing {where}"
            assert Attempt(fe.close).result() is None
            assert _closed_for_good(fe), where
        finally:
            fe.close()
        if not where:
            break
        landed.append(where)
    assert any("held" in where for where in landed), landed


def _held(host: SimHost) -> tuple[dict[str, int], frozenset[tuple[int, str]]]:
    """The host's counts and this process's descriptors, each with what it
    refers to; collected first, so that what only waits for the garbage
    collector does not count as held."""
    fds = descriptors()  # collects first
    return host.hypervisor.stats(), fds


def _released(host: SimHost, before: tuple[dict[str, int], frozenset[tuple[int, str]]]) -> bool:
    stats, fds = _held(host)
    return all(n <= before[0][k] for k, n in stats.items()) and fds <= before[1]


def _wait_released(host: SimHost, before: tuple[dict[str, int], frozenset[tuple[int, str]]],
                   what: str) -> None:
    """Wait until all held since ``before`` is released, else fail saying
    what is still held after ``what``."""
    try:
        wait_until(lambda: _released(host, before))
    except TimeoutError:
        raise AssertionError(
            f"{what}: still held {_held(host)[0]} (was {before[0]}), "
            f"new descriptors {sorted(_held(host)[1] - before[1])}") from None


@pytest.mark.timeout(600)
def test_a_frontend_interrupted_anywhere_in_its_connection_leaves_nothing(
    host: SimHost, backend: Any
) -> None:
    """A Ctrl-C landing as any call made by the handshake's own frame
    (Frontend._connect) returns: open() raises having released all it
    opened.  As ``self._evtchn = domain.evtchn()``, one as the factory
    returned lost the handle before close() could see it, and its
    eventfd with it, for the life of the process."""
    guest = host.create_domain("interrupted-connect")
    fe = pvcalls.Frontend(guest, timeout=TIMEOUT)
    landed = 0
    for n in itertools.count():
        before = _held(host)
        if not interrupted_as_call_returns(_frontend.Frontend._connect.__code__, n, fe.open):
            break
        landed += 1
        fe.close()
        _wait_released(host, before, f"call {n} returning in _connect")
    try:  # opened, undisturbed
        fe.socket().close()
    finally:
        fe.close()
    assert landed > 10


def test_a_data_ring_that_cannot_share_its_pages_closes_its_own_handle(
    host: SimHost, backend: Any, server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No grant left for a new socket's data ring: the connect fails, and
    the event channel handle opened for the ring is closed, not left with
    its eventfd open for the life of the process."""
    srv = server()
    guest = host.create_domain("ring-without-grants")
    with pvcalls.Frontend(guest, timeout=TIMEOUT) as fe:
        with fe.socket() as s:  # the frontend's own handles are made
            before = _held(host)
            assert fe._gntshr is not None

            def no_grants(*args: Any, **kwargs: Any) -> Any:
                raise OSError(errno.ENOSPC, "no grant references left")

            monkeypatch.setattr(fe._gntshr, "share_pages", no_grants)
            with pytest.raises(OSError, match="no grant references left"):
                s.connect(srv.address)
            # Waited for: the backend, in this process, may hold a
            # descriptor of its own for a moment.
            _wait_released(host, before, "a connect without grants")


def _command_ring_idle(fe: pvcalls.Frontend) -> bool:
    """The backend has taken every request and waits for the next one's
    notify (its req_event is just past our req_prod)."""
    ring = fe._ring
    assert ring is not None
    return ring._idx[_REQ_EVENT] == (ring.req_prod_pvt + 1) & 0xFFFFFFFF


def _sweep_interrupts(host: SimHost, name: str,
                      prepare: Callable[[pvcalls.Frontend], pvcalls.PVSocket],
                      call: Callable[[pvcalls.PVSocket], object],
                      after: Callable[[], object] = lambda: None,
                      then: Callable[[pvcalls.Frontend], object] | None = None,
                      unless: Callable[[], bool] = lambda: False,
                      closed: Callable[[pvcalls.Frontend], object] = lambda fe: None
                      ) -> list[str]:
    """Land a Ctrl-C at each place where CPython may run a signal's
    handler in the frontend library's code during ``call(s)``, ``s``
    being ``prepare(fe)`` on a frontend of its own each time, then
    ``then(fe)`` (by default a SOCKET and its RELEASE: the frontend still
    answers), then close ``s``, check ``closed(fe)``, close the frontend,
    and call ``after()``: all
    they held is released (what the call had made included) whichever
    place it was.  Not where ``unless()`` holds.  Where it landed, in
    order.

    Also between a command's push onto the command ring and its notify:
    a kick lost there stalled the command ring for good (the pushes after
    it did not notify), and the caller took the command for one that did
    not go out."""
    within = os.path.dirname(_frontend.__file__)
    guest = host.create_domain(name)
    landed: list[str] = []
    for n in itertools.count():
        before = _held(host)
        fe = pvcalls.Frontend(guest, timeout=TIMEOUT)
        try:
            fe.open()
            what = prepare(fe)
            # The backend waits for a notify before the call, as the
            # sweep's "landed in _notify" assertions want: a backend still
            # in its last check of the command ring needs none (ring.h's
            # req_event), and a loaded machine made that happen.
            wait_until(lambda fe=fe: _command_ring_idle(fe))
            where = interrupted_at(n, within, lambda what=what: call(what), unless)
            try:
                if then is None:
                    fe.socket().close()
                else:
                    then(fe)
            except Exception as exc:
                raise AssertionError(f"interrupted {where or 'nowhere'}: then {exc!r}") from exc
            # Not waiting long for a lock that the interrupt left held,
            # which close() leaves alone (see
            # test_close_does_not_hang_on_a_lock_an_interrupt_left_held).
            fe.timeout = 1.0
            what.close()
            fe.timeout = TIMEOUT
            try:
                closed(fe)
            except Exception as exc:
                raise AssertionError(f"interrupted {where or 'nowhere'}: closed, {exc!r}") from exc
        finally:
            fe.close()
            after()
        _wait_released(host, before, f"interrupted {where or 'nowhere'}")
        if not where:
            return landed
        landed.append(where)
    raise AssertionError("unreachable")


def _pool_one_ring(fe: pvcalls.Frontend, address: tuple[str, int]) -> None:
    connected(fe, address).close()
    wait_until(lambda: len(fe._ring_pool) == 1)  # back once the RELEASE is answered


@pytest.mark.timeout(600)
@pytest.mark.parametrize("pooled", [False, True], ids=["new-ring", "pooled-ring"])
def test_a_connect_interrupted_anywhere_loses_no_data_ring(
        host: SimHost, backend: Any, server: Any, pooled: bool) -> None:
    """A Ctrl-C landing anywhere in connect(): the data ring it took from
    the pool, or made, is the socket's or the frontend's, never lost.
    Between _new_data_ring taking the ring and storing it in the socket's
    state it was in no list that close() frees: its granted pages, port
    and (a ring of its own handle) eventfd stayed for the life of the
    process."""
    srv = server()

    def prepare(fe: pvcalls.Frontend) -> pvcalls.PVSocket:
        if pooled:
            _pool_one_ring(fe, srv.address)
        s = fe.socket()
        s.settimeout(TIMEOUT)
        return s

    landed = _sweep_interrupts(host, f"connect-{pooled}", prepare,
                               lambda s: s.connect(srv.address), then=_connects(srv.address))
    assert any("_new_data_ring" in where for where in landed), landed
    assert any("Frontend._notify" in where for where in landed), landed


@pytest.mark.timeout(600)
@pytest.mark.parametrize("pooled", [False, True], ids=["new-ring", "pooled-ring"])
def test_an_accept_interrupted_anywhere_loses_no_data_ring(
        host: SimHost, backend: Any, server: Any, pooled: bool) -> None:
    """As for connect(): the ring of the socket an ACCEPT offers (its
    id_new) is taken by the same _new_data_ring, and whatever interrupts
    accept() it is the pool's, the listener's (with the ACCEPT in flight)
    or the new socket's."""
    srv = server()
    clients: list[socket.socket] = []
    name = f"accept-{pooled}"

    def prepare(fe: pvcalls.Frontend) -> pvcalls.PVSocket:
        if pooled:
            _pool_one_ring(fe, srv.address)
        ls = fe.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        ls.settimeout(TIMEOUT)
        domid = fe.domain.domid
        clients.append(socket.create_connection(listen_address(backend, domid, ls.id),
                                                timeout=TIMEOUT))
        return ls

    accepted: list[pvcalls.PVSocket] = []

    def close_clients() -> None:
        accepted.clear()  # released by the frontend's close()
        while clients:
            clients.pop().close()

    # The accepted socket is left to the frontend's close(): the sweep is
    # of accept(), not of the socket's close().
    try:
        landed = _sweep_interrupts(host, name, prepare,
                                   lambda ls: accepted.append(ls.accept()[0]), close_clients,
                                   then=_connects(srv.address))
    finally:
        close_clients()
    assert any("_new_data_ring" in where for where in landed), landed
    assert any("Frontend._notify" in where for where in landed), landed


def _refused_address() -> tuple[str, int]:
    """An address on this host nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()  # type: ignore[no-any-return]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("pooled", [True, False], ids=["to-the-pool", "freed"])
def test_a_refused_connect_interrupted_anywhere_loses_no_data_ring(
        host: SimHost, backend: Any, server: Any, monkeypatch: pytest.MonkeyPatch,
        pooled: bool) -> None:
    """A Ctrl-C landing anywhere in a connect() the backend refuses, as
    it gives the socket's ring back: to the pool, or (the pool full) to be
    freed, the interrupt in the middle of DataRing.free() included.  The
    ring is the socket's, the pool's or the frontend's to free, never
    lost: before, one landing as the socket's state had let go of it and
    the pool or free() had not got it yet lost its pages, port and
    eventfds for the life of the process."""
    srv = server()
    if not pooled:
        monkeypatch.setattr(_frontend, "_RING_POOL_MAX", 0)
    refused = _refused_address()

    def prepare(fe: pvcalls.Frontend) -> pvcalls.PVSocket:
        s = fe.socket()
        s.settimeout(TIMEOUT)
        return s

    def connect(s: pvcalls.PVSocket) -> object:
        with contextlib.suppress(ConnectionRefusedError):
            s.connect(refused)
        return None

    landed = _sweep_interrupts(host, f"refused-{pooled}", prepare, connect,
                               then=_connects(srv.address))
    assert any("_put_data_ring" in where for where in landed), landed
    if pooled:
        assert any("_return_rings" in where for where in landed), landed
    else:
        assert any("DataRing.free" in where for where in landed), landed
        assert any("Frontend._free_rings" in where for where in landed), landed


def test_a_ring_given_back_as_another_goes_to_the_pool_goes_there_too_each_once(
        fe: pvcalls.Frontend) -> None:
    """Two refused connect()s give their rings back at once, the second as
    the first takes what is on its way to the pool (under the frontend's
    lock; a ring is given back without it): both reach the pool, each
    once.  None is lost, nor pooled twice (two sockets would share it)."""
    refused = _refused_address()
    first, second = fe.socket(), fe.socket()
    first.settimeout(TIMEOUT)
    second.settimeout(TIMEOUT)
    giving = PauseAt(_frontend.Frontend._put_data_ring, "self._give_back(holder")
    taking = PauseAt(_frontend.Frontend._return_rings, "while given:")
    seconds = Call(lambda: giving.run(lambda: second.connect(refused)))
    assert giving.reached.wait(TIMEOUT)
    firsts = Call(lambda: taking.run(lambda: first.connect(refused)))
    assert taking.reached.wait(TIMEOUT)
    [(one, _)] = fe._given_back
    giving.resume()
    wait_until(lambda: len(fe._given_back) == 2)  # its return waits for the lock
    [_, (other, _)] = fe._given_back
    taking.resume()
    for call in (firsts, seconds):
        assert isinstance(call.join().error, ConnectionRefusedError), call.error
    pool = fe._ring_pool
    assert one in pool and other in pool and len({id(ring) for ring in pool}) == len(pool)
    first.close()
    second.close()


class _Rings:
    """A frontend for _sweep_interrupts whose close() is the call swept."""

    def __init__(self, fe: pvcalls.Frontend) -> None:
        self.fe = fe

    def close(self) -> None:
        self.fe.close()


@pytest.mark.timeout(600)
def test_a_frontend_close_interrupted_anywhere_frees_its_pooled_rings(
        host: SimHost, backend: Any, server: Any) -> None:
    """A Ctrl-C landing anywhere in Frontend.close() of a frontend with
    rings in its pool: the next close() frees those the interrupted one
    did not.  Before, it took the pool whole and freed its rings from a
    list of its own, and a Ctrl-C lost the rest of them."""
    srv = server()

    def prepare(fe: pvcalls.Frontend) -> _Rings:
        both = [connected(fe, srv.address) for _ in range(2)]
        for s in both:
            s.close()
        wait_until(lambda: len(fe._ring_pool) == 2)  # back once the RELEASEs are answered
        return _Rings(fe)

    landed = _sweep_interrupts(host, "close-pool", prepare,  # type: ignore[arg-type]
                               lambda rings: rings.close(), then=lambda fe: None)
    assert any("DataRing.free" in where for where in landed), landed
    assert any("_free_every_ring" in where for where in landed), landed


@pytest.mark.timeout(600)
@pytest.mark.parametrize("then", ["close-again", "frontend-close"])
def test_a_close_interrupted_anywhere_releases_the_socket_once(
        host: SimHost, backend: Any, server: Any, then: str) -> None:
    """A Ctrl-C landing anywhere in a connected socket's close(), then
    close() again, or Frontend.close(): the backend holds no socket of the
    guest any more, its RELEASE went out exactly once, and all the socket
    shared is freed.  Before, a close() cut short once it had marked the
    socket closed and before its RELEASE went out left it in the backend,
    and the next close() returned at once."""
    srv = server()
    releases: list[int] = []
    swept: list[pvcalls.PVSocket] = []

    def prepare(fe: pvcalls.Frontend) -> pvcalls.PVSocket:
        releases.clear()
        s = connected(fe, srv.address)
        swept[:] = [s]
        submit = fe._submit

        def counted(slot: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return submit(slot, *args, **kwargs)
            finally:
                if slot.cmd == _wire.PVCALLS_RELEASE and slot.sent:
                    releases.append(slot.sock_id)

        fe._submit = counted  # type: ignore[method-assign]
        return s

    def after_close(fe: pvcalls.Frontend) -> None:
        if then == "frontend-close":
            # The device goes, and with it the backend's sockets: what
            # is checked is the RELEASE and what the socket shared.
            fe.close()
        else:
            domid = fe.domain.domid
            wait_until(lambda: all(r.domain != domid for r in backend.stats().sockets))
        assert releases.count(swept[0].id) == 1, releases

    landed = _sweep_interrupts(
        host, f"close-{then}", prepare, lambda s: s.close(), closed=after_close,
        then=_connects(srv.address) if then == "close-again" else lambda fe: fe.close())
    assert any("Frontend._release" in where for where in landed), landed
    assert any("Frontend._notify" in where for where in landed), landed


def _unclosed(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if w.category is ResourceWarning]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("alive", [False, True], ids=["backend-gone", "answered"])
def test_a_listener_close_interrupted_anywhere_loses_no_pending_accept(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch, alive: bool) -> None:
    """A Ctrl-C landing anywhere in close() of a listener with an ACCEPT
    in flight: the data ring of the socket the ACCEPT offers is freed by
    the next close() or Frontend.close(), and nobody is told of an
    "unclosed" socket the program never had.  Before, _finish_release held
    that socket in a local variable from taking it out of the release to
    dropping it, and one landing there lost it: only its finaliser (with
    that warning) or nothing got it back.  With the backend gone,
    close() finishes the release itself; answered, only if the answer
    came before it looked."""

    def held_accepts(self: PassiveSocket) -> None:
        with self._lock:
            waiting = self.waiting
        if waiting is not None and waiting[1] is not None:
            return  # an ACCEPT: stays in flight until the RELEASE
        run(self)

    run = PassiveSocket._run
    monkeypatch.setattr(PassiveSocket, "_run", held_accepts)
    clients: list[socket.socket] = []

    def prepare(fe: pvcalls.Frontend) -> pvcalls.PVSocket:
        ls = fe.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        ls.setblocking(False)
        with pytest.raises(BlockingIOError):
            ls.accept()  # its POLL goes out
        clients.append(socket.create_connection(
            listen_address(backend, fe.domain.domid, ls.id), timeout=TIMEOUT))
        wait_until(lambda: ls._poll_ready)
        ls.settimeout(0.05)
        with pytest.raises(TimeoutError):
            ls.accept()  # its ACCEPT goes out, and stays
        assert ls._st.accept_inflight is not None
        if not alive:
            fe._die("the PV Calls backend went away")  # as its state watch does
        return ls

    def close_clients() -> None:
        while clients:
            clients.pop().close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            landed = _sweep_interrupts(host, f"listener-close-{alive}", prepare,
                                       lambda ls: ls.close(), close_clients,
                                       then=lambda fe: None)
        finally:
            close_clients()
    assert _unclosed(caught) == []
    if not alive:
        assert any("_finish_release" in where for where in landed), landed
        assert any("_drop_socket" in where for where in landed), landed


def _hold_until_waited_for(lock: threading.Lock, taken: threading.Event,
                           done: threading.Event) -> None:
    """Hold ``lock`` until the main thread waits for it in the frontend's
    Deadline code (or ``done`` is set); ``taken`` once held."""
    with lock:
        taken.set()
        while not done.is_set() and not main_thread_in("acquire", "take", path="_common"):
            done.wait(0.001)


def _accept_handed_over() -> bool:
    """Whether a signal's handler run here (from a tracer) runs where
    accept() has handed the connection to its caller and lets go of its
    lock in held(), or returns: a Ctrl-C there loses the connection, as
    one in socket.socket.accept() after its _accept() does.  Not in the
    POLL for fileno() and the readiness update before that, whose try
    gives the answer back."""
    within = os.path.dirname(_frontend.__file__)
    accept_file = pvcalls.PVSocket.accept.__code__.co_filename
    frame = sys._getframe(1)
    inner: list[str] = []  # the frontend's frames inside accept()
    while frame.f_code.co_name != "accept" or frame.f_code.co_filename != accept_file:
        if frame.f_code.co_filename.startswith(within):
            inner.append(frame.f_code.co_name)
        if frame.f_back is None:
            return False
        frame = frame.f_back
    new = frame.f_locals.get("new")
    if new is None or new._offered or frame.f_locals["self"]._st.accept_inflight is not None:
        return False
    if inner:
        return inner[-1] == "held"
    # In accept() itself: as the with block's exit returns.
    return linecache.getline(accept_file, frame.f_lineno).lstrip().startswith("with held(")


def test_an_accept_interrupted_as_it_hands_over_releases_what_it_lost(
        host: SimHost, backend: Any) -> None:
    """Where the accept() sweep lands no Ctrl-C (see _accept_handed_over),
    one loses the connection, and the library cannot give it back: the
    caller's own frame can lose a return value too.  What it can do, it
    does: the socket goes as one the program dropped unclosed (one
    ResourceWarning, a RELEASE: the peer sees the end), and the next
    accept() gets the next connection."""
    guest = host.create_domain("accept-lost")
    within = os.path.dirname(_frontend.__file__)
    clients: list[socket.socket] = []
    accepted: list[pvcalls.PVSocket] = []
    with (pvcalls.Frontend(guest, timeout=TIMEOUT) as fe,
          warnings.catch_warnings(record=True) as caught):
        warnings.simplefilter("always")
        s = fe.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        s.settimeout(TIMEOUT)
        pending_at = listen_address(backend, fe.domain.domid, s.id)

        def in_backend() -> int:
            return len([row for row in backend.stats().sockets if row.domain == fe.domain.domid])

        try:
            landed = 0
            for n in itertools.count():
                clients.append(socket.create_connection(pending_at, timeout=TIMEOUT))
                where = interrupted_at(n, within, lambda: accepted.append(s.accept()[0]),
                                       lambda: not _accept_handed_over())
                if not where:
                    break
                landed += 1
                gc.collect()
                assert len(_unclosed(caught)) == 1, where
                caught.clear()
                assert clients[-1].recv(1) == b"", where  # released
                wait_until(lambda: in_backend() == 1 + len(accepted))
            assert landed >= 2  # held() letting go, the with block's exit
            assert _unclosed(caught) == []
        finally:
            for sock in (*accepted, s):
                sock.close()
            for client in clients:
                client.close()


@pytest.mark.parametrize("start", list(itertools.product((False, True), repeat=2)),
                         ids=lambda rw: f"r{int(rw[0])}w{int(rw[1])}")
def test_a_readiness_update_interrupted_anywhere_leaves_the_descriptor_as_recorded(
        start: tuple[bool, bool]) -> None:
    """A Ctrl-C landing anywhere in ReadyFd.set leaves the descriptor
    polling as its record says, so that the next set() makes it right.
    Before, one landing as the recv() that clears readability returned
    left the record readable and the descriptor not: every later set()
    to readable did nothing, and a selector waited for good for what
    accept() would return at once."""
    from pvcalls.frontend._socket import ReadyFd

    within = os.path.dirname(_frontend.__file__)
    for to in itertools.product((False, True), repeat=2):
        for n in itertools.count():
            fd = ReadyFd()
            try:
                fd.set(*start)
                where = interrupted_at(n, within, functools.partial(fd.set, *to))
                r, w, _ = select.select([fd], [fd], [], 0)
                assert ((fd in r), (fd in w)) == (fd.readable, fd.writable), (
                    f"{start} to {to}, interrupted {where or 'nowhere'}")
                fd.set(*to)
                r, w, _ = select.select([fd], [fd], [], 0)
                assert ((fd in r), (fd in w)) == to, f"{start} to {to}, then again"
            finally:
                fd.close()
            if not where:
                break


@pytest.mark.parametrize(("start", "to"), [
    ((False, True), (True, True)),  # the byte that makes it readable
    ((True, True), (False, True)),  # the read that clears it
    ((False, True), (False, False)),  # the send buffer that makes it unwritable
    ((False, False), (False, True)),  # and writable again
], ids=["to-readable", "to-unreadable", "to-unwritable", "to-writable"])
def test_a_readiness_update_a_closed_descriptor_fails_is_tried_again_by_the_next(
        start: tuple[bool, bool], to: tuple[bool, bool]) -> None:
    """The program closed the descriptor fileno() gave it (another file
    took its number): a set() that cannot make it poll as asked raises
    EBADF and keeps the record as it was, so that the next set() tries
    again and raises too, and every later call says so (see
    PVSocket._repair_ready), rather than one only.  Before, a set() that
    read or set the descriptor said ENOTSOCK, the other file's error."""
    from pvcalls.frontend._socket import ReadyFd

    fd = ReadyFd()
    try:
        fd.set(*start)
        readonly = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.dup2(readonly, fd.fileno())
        finally:
            os.close(readonly)
        for _ in range(2):
            with pytest.raises(OSError) as info:
                fd.set(*to)
            assert (fd.readable, fd.writable) == start
            # Not the byte's EPIPE (its send meets the closed peer), nor
            # the other file's ENOTSOCK: EBADF, as its docstring says.
            assert info.value.errno == errno.EBADF, info.value
    finally:
        number = fd.user.fileno()
        with contextlib.suppress(OSError):
            fd.close()  # leaves alone the read-only one, which took the number
        with contextlib.suppress(OSError):
            os.close(number)


@pytest.mark.parametrize("to", [(False, True), (True, False)],
                         ids=["to-unreadable", "to-unwritable"])
def test_a_readiness_update_leaves_alone_a_socket_that_took_the_descriptors_number(
        to: tuple[bool, bool]) -> None:
    """The program closed the descriptor fileno() gave it, and a socket
    of its own took the number: set() and close() fail with EBADF and
    leave that socket alone.  Before, the recv() that clears readability
    took what the socket had received, the update of writability set its
    send buffer, and close() closed it."""
    from pvcalls.frontend._socket import ReadyFd

    fd = ReadyFd()
    other, peer = socket.socketpair()
    try:
        fd.set(True, True)
        sndbuf = other.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        peer.sendall(b"the program's")
        os.dup2(other.fileno(), fd.fileno())
        other.close()
        other = socket.socket(fileno=fd.user.fileno())  # the program's socket
        with pytest.raises(OSError) as info:
            fd.set(*to)
        assert info.value.errno == errno.EBADF, info.value
        assert (fd.readable, fd.writable) == (True, True)
        assert other.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == sndbuf
        other.setblocking(False)
        assert other.recv(64) == b"the program's"
        ours = fd.ours
        with pytest.raises(OSError) as info:
            fd.close()
        assert info.value.errno == errno.EBADF, info.value
        # Let go of, not left for the collector to close.
        assert ours.fileno() == -1 and fd.user.fileno() == -1
        other.setblocking(True)
        peer.sendall(b"still")
        assert other.recv(64) == b"still"
    finally:
        with contextlib.suppress(OSError):
            fd.close()
        other.close()
        peer.close()


class _SendFails:
    """A socket whose send() fails with ``errno`` (ENOBUFS: the kernel
    short of memory), the rest of it the socket's."""

    def __init__(self, sock: Any, err: int) -> None:
        self._sock = sock
        self._err = err

    def send(self, data: bytes) -> int:
        raise OSError(self._err, os.strerror(self._err))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_a_readiness_update_whose_byte_fails_to_go_is_tried_again_by_the_next() -> None:
    """A set() to readable whose byte cannot be sent for a reason of the
    kernel's (not the program's closing the descriptor) raises that and
    keeps the record unreadable, as its docstring says of any call that
    fails: the next set() sends the byte.  Before, only a broken pipe put
    the record back: any other error left it readable and the descriptor
    not, every later set() to readable did nothing, and a selector waited
    for good."""
    from pvcalls.frontend._socket import ReadyFd

    fd = ReadyFd()
    ours = fd.ours
    try:
        fd.ours = _SendFails(ours, errno.ENOBUFS)
        with pytest.raises(OSError) as info:
            fd.set(True, True)
        assert info.value.errno == errno.ENOBUFS
        assert not fd.readable
        fd.ours = ours
        fd.set(True, True)
        assert select.select([fd], [], [], 0)[0]
    finally:
        fd.ours = ours
        fd.close()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("contended", [False, True], ids=["free", "contended"])
@pytest.mark.parametrize("call", ["recv", "send", "connect", "accept", "accept-nonblocking"])
def test_a_call_interrupted_anywhere_leaves_its_socket_locks_free(
        host: SimHost, backend: Any, server: Any, call: str, contended: bool) -> None:
    """A Ctrl-C landing anywhere in recv(), send(), connect() or accept()
    (with a timeout, or none when contended; or non-blocking, once a POLL
    said a connection is pending), the lock it takes free or held by
    another thread for a moment: the socket's locks are free afterwards.
    Before, one landing as the acquire returned (in the call, or in
    Deadline.acquire), before the try that lets go of it, left the lock
    held for good: every later call waited for it, and close() left the
    socket's ring alone.

    accept() has one connection pending each time, which the next accept()
    takes if the interrupted one did not: it lost no POLL, pending
    connection or ACCEPT.  Before, one landing once _arm_poll had marked
    a POLL in flight and before it went out, or once accept() had taken a
    POLL's readiness and before its ACCEPT was on the way, left every
    later accept() waiting for an answer that would never come."""
    def greet_and_sink(conn: socket.socket) -> None:
        conn.settimeout(None)  # the sweep may outlast the server's timeout
        try:
            conn.sendall(b"for recv to find")
            sink(conn)
        except ConnectionResetError:
            # A socket released with the greeting still in its host
            # socket (not yet moved to the ring) is closed with data
            # unread: the kernel resets the connection.  Whether it was
            # moved first is a race, and neither way is what is tested.
            pass

    srv = server(greet_and_sink)
    guest = host.create_domain(f"locks-{call}-{contended}")
    within = os.path.dirname(_frontend.__file__)
    made: list[pvcalls.PVSocket] = []
    clients: list[socket.socket] = []
    accepted: list[pvcalls.PVSocket] = []
    accepts = call.startswith("accept")
    with (pvcalls.Frontend(guest, timeout=TIMEOUT) as fe,
          warnings.catch_warnings(record=True) as caught):
        warnings.simplefilter("always")
        if accepts:
            s = fe.socket()
            s.bind(("127.0.0.1", 0))
            s.listen()
            pending_at = listen_address(backend, fe.domain.domid, s.id)
        else:
            s = connected(fe, srv.address)
        timeout = 0.0 if call == "accept-nonblocking" else None if contended else TIMEOUT
        s.settimeout(timeout)
        selector = selectors.DefaultSelector()
        if call == "accept-nonblocking":
            # A POLL in flight from now on (fileno()), as under a selector.
            selector.register(s, selectors.EVENT_READ)
        lock_name = "_accept_lock" if accepts else {
            "recv": "_recv_lock", "send": "_send_lock", "connect": "_recv_lock"}[call]

        def run() -> object:
            if call == "recv":
                return s.recv(1, socket.MSG_PEEK)
            if call == "send":
                return s.send(b"x")
            if accepts:
                with contextlib.suppress(BlockingIOError):  # the lock held
                    accepted.append(s.accept()[0])
                return None
            with contextlib.suppress(OSError):  # refused: the lock is what counts
                made[-1].connect(srv.address)
            return None

        def accept_the_pending_one(where: str) -> None:
            # The program has the sockets accept() returned, and no other:
            # not the one of an ACCEPT an interrupted accept() put back.
            assert set(fe.sockets()) == {s, *accepted}, f"interrupted {where or 'nowhere'}"
            if len(accepted) == len(clients):
                return
            if call == "accept-nonblocking":
                # A selector wakes for what the next accept() returns at
                # once: registered before, it asks fileno() nothing more.
                assert selector.select(TIMEOUT) != [], (
                    f"interrupted {where or 'nowhere'}: fileno() never readable")
            s.settimeout(TIMEOUT)
            try:
                accepted.append(s.accept()[0])
            except TimeoutError:
                raise AssertionError(f"interrupted {where or 'nowhere'}: "
                                     "the next accept() found no connection") from None
            s.settimeout(timeout)

        landed = 0
        try:
            for n in itertools.count():
                if call == "connect":  # a socket of its own each time
                    made.append(fe.socket())
                    made[-1].settimeout(TIMEOUT)
                if accepts:
                    clients.append(socket.create_connection(pending_at, timeout=TIMEOUT))
                    if call == "accept-nonblocking":
                        wait_until(lambda: s._poll_ready)
                swept = made[-1] if call == "connect" else s
                done = threading.Event()
                taken = threading.Event()
                holder = threading.Thread(target=_hold_until_waited_for, args=(
                    getattr(swept, lock_name), taken, done)) if contended else None
                if holder is not None:
                    holder.start()
                    assert taken.wait(TIMEOUT)
                try:
                    # In the socket's and the deadline's code: the command
                    # ring's and the data ring's take no socket lock.
                    where = interrupted_at(
                        n, within, run, _accept_handed_over if accepts else lambda: False,
                        besides=(_frontend.__file__, os.path.join(within, "_ring.py")))
                finally:
                    done.set()
                    if holder is not None:
                        holder.join(TIMEOUT)
                left = [name for name in ("_recv_lock", "_send_lock", "_accept_lock")
                        if getattr(swept, name).locked()]
                assert left == [], f"interrupted {where or 'nowhere'}: {left} left held"
                if accepts:
                    accept_the_pending_one(where)
                if not where:
                    break
                landed += 1
            assert landed > 3
            # Nor did the program get a socket it never had: the one an
            # ACCEPT was to offer, made and dropped.
            assert _unclosed(caught) == []
        finally:
            selector.close()
            fe.timeout = 1.0  # a lock left held is not waited for
            for sock in (*accepted, *made, s):
                sock.close()
            for client in clients:
                client.close()


class _Dropped:
    """A socket for _sweep_interrupts that the check after the call drops."""

    def __init__(self, s: pvcalls.PVSocket) -> None:
        self.box = [s]
        self.id = s.id

    def close(self) -> None:
        pass  # dropped by then


def test_a_socket_call_interrupted_anywhere_leaves_no_socket_it_did_not_give(
        host: SimHost, backend: Any) -> None:
    """A Ctrl-C landing anywhere in Frontend.socket() leaves no socket
    that the program never had in the frontend's table: none to warn of
    as "unclosed", none to send a RELEASE for, none left in the backend.
    Before, one landing as
    _new_socket() returned (or as its with block's exit did), once the
    socket was in the table, dropped it there: the finaliser warned of
    an "unclosed <PVSocket new>" and the reaper's RELEASE got EBADF."""
    guest = host.create_domain("socket-dropped-as-made")
    within = os.path.dirname(_frontend.__file__)
    with (pvcalls.Frontend(guest, timeout=TIMEOUT) as fe,
          warnings.catch_warnings(record=True) as caught):
        warnings.simplefilter("always")
        landed = 0
        made: list[pvcalls.PVSocket] = []
        for n in itertools.count():
            where = interrupted_at(n, within, lambda: made.append(fe.socket()))
            for sock in made:
                sock.close()
            made.clear()
            gc.collect()
            assert _unclosed(caught) == [], f"interrupted {where or 'nowhere'}"
            # Released, also the one whose SOCKET a Ctrl-C gave up on once
            # it went out (the event thread releases it on its answer).
            wait_until(lambda: not fe._sockets and not fe._releases)
            # Nor one the backend made for nobody: counted against the
            # domain's max_sockets until the frontend went.
            try:
                wait_until(lambda: not [row for row in backend.stats().sockets
                                        if row.domain == fe.domain.domid])
            except TimeoutError:
                raise AssertionError(f"interrupted {where or 'nowhere'}: "
                                     "a socket left in the backend") from None
            if not where:
                break
            landed += 1
        assert landed > 3


@pytest.mark.timeout(600)
def test_a_socket_dropped_after_an_interrupted_close_is_no_unclosed_socket(
        host: SimHost, backend: Any, server: Any) -> None:
    """A Ctrl-C landing anywhere in close(), then the program drops the
    socket: no "unclosed" ResourceWarning (the program did close it), and
    the release is finished all the same, by the frontend's reaper with
    no call of the program's, and the backend lets go of the socket.
    Only a Ctrl-C as close() starts, before it did anything, leaves an
    unclosed socket.  Before, every one landing before the release was
    done warned."""
    srv = server()
    swept: list[_Dropped] = []

    def prepare(fe: pvcalls.Frontend) -> _Dropped:
        swept[:] = [_Dropped(connected(fe, srv.address))]
        return swept[0]

    def drop(fe: pvcalls.Frontend) -> None:
        dropping = swept[0]
        started = dropping.box[0]._close_requested  # close() did something
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dropping.box.clear()
            gc.collect()
        expected = [] if started else [f"unclosed <PVSocket id={dropping.id:#x} active>"]
        assert _unclosed(caught) == expected
        wait_until(lambda: dropping.id not in fe._sockets)
        domid = fe.domain.domid
        wait_until(lambda: all(r.domain != domid for r in backend.stats().sockets))
        _connects(srv.address)(fe)

    landed = _sweep_interrupts(host, "dropped-after-close", prepare,  # type: ignore[arg-type]
                               lambda d: d.box[0].close(), then=drop)
    assert any("Frontend._release" in where for where in landed), landed


def test_a_release_claimed_as_the_frontend_closes_and_never_answered_frees_its_ring(
        host: SimHost, backend: Any, server: Any) -> None:
    """A socket made and closed by another thread while Frontend.close()
    is past its wait for the RELEASEs in flight, and before the frontend
    is dead:
    its RELEASE goes out, and no answer comes (the backend goes with the
    device).  Frontend.close() frees its ring all the same, once no answer
    can come any more.  Before, the ring waited for that answer, its pages,
    port and eventfds kept for the life of the process."""
    srv = server()
    guest = host.create_domain("late-release")
    before = _held(host)
    fe = pvcalls.Frontend(guest, timeout=TIMEOUT)
    try:
        fe.open()
        wait_releases = fe._wait_releases

        def then_a_close() -> None:
            wait_releases()
            # Another thread's socket, made and closed meanwhile.
            s = connected(fe, srv.address)
            # The answer is lost (dropped here, as a backend gone drops it).
            fe._released = lambda rel, ret: None  # type: ignore[method-assign]
            s.close()
            assert fe._releases  # in flight, unanswered

        fe._wait_releases = then_a_close  # type: ignore[method-assign]
        fe.close()
        assert not fe._releases
    finally:
        fe.close()
    _wait_released(host, before, "a RELEASE claimed after the wait")


def _connects(address: tuple[str, int]) -> Callable[[pvcalls.Frontend], None]:
    """A check for _sweep_interrupts: the frontend still connects, and
    with a ring that the backend does not hold (the pool's, if it has
    one: a ring that the interrupted call offered the backend and put
    back in the pool was refused with EINVAL)."""

    def check(fe: pvcalls.Frontend) -> None:
        with connected(fe, address) as s:
            echo_through(s, b"still connects")

    return check


def test_a_kick_an_interrupt_cut_off_goes_out_with_no_command_after_it(
        host: SimHost, backend: Any, server: Any) -> None:
    """A Ctrl-C between a CONNECT's push and its notify, and nothing sent
    after it: the event thread sends the notify that the backend's
    req_event waits for, and the CONNECT reaches the peer.  Before, it
    lay on the ring for good (the pushes after it did not notify), and
    connect() had put back in the pool a ring the backend then held."""
    srv = server()
    guest = host.create_domain("owed-kick")
    with pvcalls.Frontend(guest, timeout=TIMEOUT) as fe:
        s = fe.socket()
        s.settimeout(TIMEOUT)
        assert interrupted_as_frame_starts(_frontend.Frontend._notify.__code__,
                                           lambda: s.connect(srv.address))
        assert srv.accepted.acquire(timeout=TIMEOUT)
        assert not fe._ring_pool
        with connected(fe, srv.address) as again:
            echo_through(again, b"kicked")
        s.close()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("command", ["socket", "bind", "listen", "poll", "release"])
def test_a_command_interrupted_anywhere_leaves_the_frontend_working(
        host: SimHost, backend: Any, server: Any, command: str) -> None:
    """A Ctrl-C landing anywhere in the call that sends SOCKET, BIND,
    LISTEN, POLL (fileno() of a listener) or RELEASE (close()), the
    places between the command's push and its notify included: the
    frontend answers the next command, and closing leaves nothing held.
    A kick lost there stalled the command ring for good, and a command
    that went out was taken for one that did not."""
    srv = server()
    made: list[pvcalls.PVSocket] = []

    def prepare(fe: pvcalls.Frontend) -> pvcalls.PVSocket:
        s = fe.socket()
        if command in ("listen", "poll"):
            s.bind(("127.0.0.1", 0))
        if command == "poll":
            s.listen()
        if command == "release":
            s.close()
            s = connected(fe, srv.address)
        return s

    def call(s: pvcalls.PVSocket) -> object:
        if command == "socket":
            made.append(s._fe.socket())
            return None
        if command == "bind":
            return s.bind(("127.0.0.1", 0))
        if command == "listen":
            return s.listen()
        if command == "poll":
            return s.fileno()
        return s.close()

    def outside_submit() -> bool:
        # Of close(), only its RELEASE's _submit is swept here: the rest
        # in test_a_close_interrupted_anywhere_releases_the_socket_once.
        frame: Any = sys._getframe(1)
        while frame is not None and frame.f_code is not _frontend.Frontend._submit.__code__:
            frame = frame.f_back
        return command == "release" and frame is None

    # A socket made is left to the frontend's close(), as is the one a
    # SOCKET answered late makes.
    landed = _sweep_interrupts(host, f"cmd-{command}", prepare, call, made.clear,
                               then=_connects(srv.address), unless=outside_submit)
    assert any("Frontend._notify" in where for where in landed), landed


@pytest.mark.parametrize("lock", ["_recv_lock", "_send_lock", "_accept_lock"])
def test_close_does_not_hang_on_a_lock_an_interrupt_left_held(
    host: SimHost, backend: Any, server: Any, caplog: pytest.LogCaptureFixture, lock: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket lock that stays held (a call that never returns: no
    interrupt leaves one held any more, see test_a_call_interrupted_
    anywhere_leaves_its_socket_locks_free) must not make close() wait for
    ever.  It gives up on the ring at the frontend's timeout, says so, and
    the frontend goes on.  (Its waits are watched through the deadlines
    they are given.)"""
    srv = server()
    guest = host.create_domain(f"left-{lock}")
    with pvcalls.Frontend(guest, timeout=TIMEOUT) as fe:
        s = connected(fe, srv.address)
        getattr(s, lock).acquire()  # as a call that never returns holds it
        fe.timeout = 0.5
        deadlines: list[float | None] = []

        class Watched(Deadline):
            def __init__(self, timeout: float | None) -> None:
                super().__init__(timeout)
                deadlines.append(timeout)

        with monkeypatch.context() as patched:
            patched.setattr(_frontend, "Deadline", Watched)
            s.close()
        # Still the call's that holds it: close() lets go only of a lock
        # it took, or two calls would be in at once.
        assert getattr(s, lock).locked()
        # Within the timeout of now, not another (none: for ever).
        assert deadlines and all(timeout == 0.5 for timeout in deadlines), deadlines
        fe.timeout = TIMEOUT
        assert s.closed and s not in fe.sockets()
        assert "lock is still held" in caplog.text
        wait_until(lambda: all(r.id != s.id for r in backend.stats().sockets))
        wait_until(lambda: not fe._releases)
        # Only what the left lock guards stays: with the accept lock, the
        # ring was freed (the pool has it back for the next socket).
        assert (lock == "_accept_lock") == bool(fe._ring_pool)
        with connected(fe, srv.address) as again:
            echo_through(again, b"still works")


@pytest.mark.parametrize("where", [
    "as __enter__ took the lock",  # the with block not yet entered
    "as __exit__ started",  # the with block left, the lock not yet released
])
def test_an_interrupt_as_a_socket_takes_or_leaves_its_condition_leaves_it_free(
        host: SimHost, backend: Any, server: Any, where: str) -> None:
    """Ctrl-C (any signal whose handler raises) in the main thread as it
    went in or out of ``with`` on a socket's threading.Condition, whose
    __enter__ and __exit__ are Python functions, left the condition's lock
    held: the socket's close() then waited for it for ever (the demo
    stopped by SIGTERM hung so, in its Frontend's clean-up)."""
    srv = server()
    guest = host.create_domain(f"cond-{where.split()[1].strip('_')}")
    with pvcalls.Frontend(guest, timeout=TIMEOUT) as fe:
        s = connected(fe, srv.address)

        def so_error() -> object:
            return s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)

        if "__enter__" in where:
            interrupted_as_call_returns(threading.Condition.__enter__.__code__, 0, so_error)
        else:
            interrupted_as_frame_starts(threading.Condition.__exit__.__code__, so_error)
        for cond in (s._cond, fe._cmd_cond):
            assert cond.acquire(timeout=TIMEOUT), "left held"
            cond.release()
        s.close()


def test_close_with_an_accept_in_flight_releases_the_listener_only(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Frontend.close() while an ACCEPT is in flight: the listener's RELEASE
    ends the ACCEPT and its id_new with it (the backend answers -EINTR), so
    the socket the ACCEPT offered gets no RELEASE of its own (it used to,
    after the listener's, answered EBADF with a warning)."""
    run = PassiveSocket._run

    def hold_accepts(self: PassiveSocket) -> None:
        with self._lock:
            waiting = self.waiting
        if waiting is not None and waiting[1] is not None:
            return  # an ACCEPT: stays in flight
        run(self)

    monkeypatch.setattr(PassiveSocket, "_run", hold_accepts)
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # a free port for the guest's listener
    fe = pvcalls.Frontend(host.create_domain("accept-at-close"))
    fe.open()
    try:
        ls = fe.socket()
        ls.bind(("127.0.0.1", port))
        ls.listen()
        ls.setblocking(False)
        with pytest.raises(BlockingIOError):
            ls.accept()  # its POLL goes out
        client = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        wait_until(lambda: ls._poll_ready)
        ls.settimeout(0.05)  # non-blocking, it would wait fe.timeout for the answer
        with pytest.raises(TimeoutError):
            ls.accept()  # its ACCEPT goes out, held
        assert ls._st.accept_inflight is not None
        caplog.set_level(logging.WARNING, logger="pvcalls.frontend")
    finally:
        fe.close()
    client.close()
    assert not [r for r in caplog.records if "RELEASE" in r.getMessage()], caplog.text


def test_a_backend_state_it_may_no_longer_read_ends_the_frontend(
        host: SimHost, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend's state changed, and the guest may no longer read it (a
    simulated host destroyed the domain under the running program): the
    backend is gone as far as the frontend can tell, and its calls fail
    with ENOTCONN.  The watch's callback does not fail (it used to, with a
    PermissionError that XenStore's watch thread logged as a traceback)."""
    fe = pvcalls.Frontend(host.create_domain("backend-state-unreadable"))
    fe.open()
    try:
        def unreadable() -> None:
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(fe, "_backend_state", unreadable)
        fe._on_backend_state(f"{fe.device.backend_path}/state")
        with pytest.raises(OSError) as info:
            fe.socket()
        assert info.value.errno == errno.ENOTCONN
        monkeypatch.undo()
    finally:
        fe.close()


def test_closing_a_stale_frontend_leaves_the_device_of_the_next_one(
        server: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A frontend whose backend went away, left unclosed while the program
    opens a new one of the same devid (which adds the device again, for
    the next backend): closing the stale one afterwards must not close or
    remove the new one's device."""
    srv = server()
    with SimHost() as host:
        domain = host.create_domain("stale")
        first = pvcalls.Backend(host.dom0, max_ioworkers=1)
        try:
            stale = pvcalls.Frontend(domain, timeout=TIMEOUT)
            stale.open()
        finally:
            first.close()
        try:
            wait_until(lambda: stale._dead)
            with pvcalls.Backend(host.dom0, max_ioworkers=1) as backend:
                with pvcalls.Frontend(domain, timeout=TIMEOUT) as fresh:
                    with caplog.at_level(logging.DEBUG, logger="pvcalls"):
                        stale.close()
                    # Seen as the next one's before anything was tried on it.
                    assert "is no longer this frontend's" in caplog.text
                    assert stale.device is None
                    assert not fresh._dead
                    with connected(fresh, srv.address) as s:
                        echo_through(s, b"still mine")
                assert backend.stats().frontends == 0
                assert host.toolstack.devices(domain.domid) == []
        finally:
            stale.close()
        assert "Permission denied" not in caplog.text



def test_a_request_whose_entry_awaits_an_uncollected_answer_takes_the_next(
        host: SimHost, backend: Any) -> None:
    """req_id is the response slot's index (as Linux's), but a request
    whose slot comes round to an answer nobody has taken yet (the ACCEPT of
    an accept() about to take it) does not wait for it: it takes the next
    free entry at once, and the answer is still the accept()'s.  (Waiting
    for the entry stalled every command behind a CONNECT left in flight.)"""
    guest = host.create_domain("slot-wrap")
    with pvcalls.Frontend(guest, timeout=6 * TIMEOUT) as fe:
        ls = fe.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        pause = PauseAt(pvcalls.PVSocket.accept, "ret = self._fe._wait_slot(")
        accepted: list[tuple[pvcalls.PVSocket, Any]] = []
        others: list[pvcalls.PVSocket] = []
        with socket.create_connection(listen_address(backend, guest.domid, ls.id),
                                      timeout=TIMEOUT):
            acceptor = threading.Thread(target=lambda: accepted.append(pause.run(ls.accept)))
            acceptor.start()
            try:
                assert pause.reached.wait(TIMEOUT)
                assert ls._st.accept_inflight is not None
                req_id, slot, _ = ls._st.accept_inflight
                wait_until(lambda: slot.done)  # answered, not taken
                assert fe._ring is not None
                while fe._ring.req_prod_pvt % _wire.RING_SLOTS != req_id:
                    others.append(fe.socket())
                making = Call(fe.socket)
                assert making.join().error is None, "the request waited for the taken entry"
                others.append(making.result)
                assert fe._slots[req_id] is slot
            finally:
                pause.resume()
                acceptor.join(TIMEOUT)
        assert accepted
        for s in (*others, accepted[0][0], ls):
            s.close()


def test_the_event_threads_wake_up_is_taken_once_served(fe: pvcalls.Frontend) -> None:
    """The event thread clears its wake-up descriptor as it serves it: left
    readable, every wait of the thread returned at once, and it spun."""
    wakeup = fe._wakeup
    assert wakeup is not None
    wakeup.set()
    poller = select.poll()
    poller.register(wakeup.fd, select.POLLIN)
    wait_until(lambda: not poller.poll(0))


def test_a_request_takes_the_one_free_entry_wherever_it_is(fe: pvcalls.Frontend) -> None:
    """Every response table entry taken but the one just before the slot
    index (answers not yet collected, CONNECTs in flight): a SOCKET, which
    may take the last free entry, takes that one at once, the search for
    a free entry going all the way round."""
    assert fe._ring is not None
    with fe._lock:
        free = (fe._ring.req_prod_pvt - 1) % _wire.RING_SLOTS
        held = [i for i in range(_wire.RING_SLOTS) if i != free]
        for i in held:
            fe._slots[i] = _common.Slot(_wire.PVCALLS_CONNECT, 0)
    try:
        making = Call(fe.socket)
        assert making.join().error is None, "the request waited for an entry"
        making.result.close()
    finally:
        with fe._lock:
            for i in held:
                fe._slots[i] = None


def test_fileno_is_writable_only_while_the_out_ring_has_room(
        fe: pvcalls.Frontend, server: Any) -> None:
    """EVENT_WRITE means send() would not block, as for a socket.socket: a
    full out ring is not writable, and becomes so once the backend made
    room.  A descriptor that is always writable made every selectors loop
    and asyncio's sock_sendall() and transports spin while the peer was
    slow to read."""
    release = threading.Event()

    def sluggish(conn: socket.socket) -> None:
        release.wait(TIMEOUT)
        sink(conn)

    srv = server(sluggish)
    srv.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    with connected(fe, srv.address) as s, selectors.DefaultSelector() as sel:
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        assert sel.select(0) == [(sel.get_key(s), selectors.EVENT_WRITE)]
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):  # the out ring is full, and stays so
            for _ in range(1000):  # far more than ring and socket buffers hold
                s.sendall(bytes(65536))
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.send(b"x")
        assert sel.select(0) == []
        release.set()
        assert sel.select(TIMEOUT) == [(sel.get_key(s), selectors.EVENT_WRITE)]
        assert s.send(b"x") == 1


def test_asyncio_sock_sendall_waits_for_a_slow_reader(
        fe: pvcalls.Frontend, server: Any) -> None:
    """asyncio's sock_sendall() sends until BlockingIOError, then waits for
    the descriptor to be writable: it must sleep while the out ring is
    full, not call send() over and over, and all the data arrives."""
    release = threading.Event()
    received = bytearray()

    def slow(conn: socket.socket) -> None:
        release.wait(TIMEOUT)
        while data := conn.recv(65536):
            received.extend(data)

    srv = server(slow)
    srv.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    payload = os.urandom(8 * 1024 * 1024)  # far more than ring and socket buffers hold
    sends = 0

    with connected(fe, srv.address) as s:
        send = s.send

        def counting(data: Any, flags: int = 0) -> int:
            nonlocal sends
            sends += 1
            return send(data, flags)

        s.send = counting  # type: ignore[method-assign]
        s.setblocking(False)

        async def main() -> int:
            loop = asyncio.get_running_loop()
            task = asyncio.ensure_future(loop.sock_sendall(s, payload))
            # Until the reader starts, the ring fills once and the loop
            # sleeps; a few rounds of the loop must not mean more sends.
            waited = loop.create_future()
            loop.call_later(0.3, waited.set_result, None)
            await waited
            stalled = sends
            release.set()
            await asyncio.wait_for(task, TIMEOUT)
            return stalled

        stalled = asyncio.run(main())
    assert stalled < 300, f"{stalled} send() calls while the reader slept: a busy loop"
    wait_until(lambda: len(received) == len(payload))
    assert bytes(received) == payload


def test_asyncio_sock_sendfile_delivers_the_file(
        fe: pvcalls.Frontend, server: Any, tmp_path: Any) -> None:
    """asyncio's sock_sendfile() first tries os.sendfile() onto fileno():
    that must fail (the descriptor is not the connection) so that asyncio
    falls back to send(), rather than the file vanishing into it."""
    received = bytearray()
    ended = threading.Event()

    def collect(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            received.extend(data)
        ended.set()

    srv = server(collect)
    payload = os.urandom(300_000)
    path = tmp_path / "payload"
    path.write_bytes(payload)
    with connected(fe, srv.address) as s, open(path, "rb") as f:
        s.setblocking(False)

        async def main() -> int:
            return await asyncio.get_running_loop().sock_sendfile(s, f)

        assert asyncio.run(main()) == len(payload)
    assert ended.wait(TIMEOUT)
    assert bytes(received) == payload


def test_asyncio_client_calls_the_docstring_lists(fe: pvcalls.Frontend, server: Any) -> None:
    """The package docstring lists sock_recv_into and create_connection's
    ``sock`` among what works on the default event loop, and that the
    transport's socket answers SO_ERROR and SO_TYPE."""
    srv = server()

    async def main() -> tuple[bytes, bytes, int]:
        loop = asyncio.get_running_loop()
        with fe.socket() as s:
            s.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(s, srv.address), TIMEOUT)
            await loop.sock_sendall(s, b"into")
            buf = bytearray(16)
            n = await asyncio.wait_for(loop.sock_recv_into(s, buf), TIMEOUT)
        s = fe.socket()
        s.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(s, srv.address), TIMEOUT)
        echoed: asyncio.Future[bytes] = loop.create_future()

        class Echoed(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                echoed.set_result(data)

        transport, _ = await loop.create_connection(Echoed, sock=s)
        transport.write(b"transport")
        via_transport = await asyncio.wait_for(echoed, TIMEOUT)
        sock = transport.get_extra_info("socket")
        so_type = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert transport.get_extra_info("peername") == srv.address
        transport.close()
        return bytes(buf[:n]), via_transport, so_type

    assert asyncio.run(main()) == (b"into", b"transport", socket.SOCK_STREAM)


def test_asyncio_server_calls_the_docstring_lists(fe: pvcalls.Frontend, backend: Any,
                                                  guest: Any) -> None:
    """A guest's listening PVSocket under sock_accept, as the ``sock`` of
    start_server, and an accepted one under connect_accepted_socket, with
    host clients on the same loop."""

    def listening() -> tuple[pvcalls.PVSocket, tuple[str, int]]:
        listener = fe.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        return listener, listen_address(backend, guest.domid, listener.id)

    async def ask(address: tuple[str, int], line: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(line)
        answer = await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.close()
        await writer.wait_closed()
        return answer

    class Shout(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data.upper())

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        answers = []
        # sock_accept
        listener, address = listening()
        with listener:
            asked = asyncio.ensure_future(ask(address, b"accepted\n"))
            conn, _ = await asyncio.wait_for(loop.sock_accept(listener), TIMEOUT)
            with conn:
                conn.setblocking(False)
                line = await asyncio.wait_for(loop.sock_recv(conn, 100), TIMEOUT)
                await loop.sock_sendall(conn, line.upper())
                answers.append(await asyncio.wait_for(asked, TIMEOUT))

        # start_server(sock=...)
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write((await reader.readline()).upper())
            await writer.drain()
            writer.close()

        listener, address = listening()
        served = await asyncio.start_server(handle, sock=listener)
        async with served:
            answers.append(await ask(address, b"served\n"))

        # connect_accepted_socket
        listener, address = listening()
        with listener:
            asked = asyncio.ensure_future(ask(address, b"adopted\n"))
            conn, _ = await asyncio.wait_for(loop.sock_accept(listener), TIMEOUT)
            transport, _ = await loop.connect_accepted_socket(Shout, sock=conn)
            answers.append(await asyncio.wait_for(asked, TIMEOUT))
            transport.close()
        return answers

    assert asyncio.run(main()) == [b"ACCEPTED\n", b"SERVED\n", b"ADOPTED\n"]


def test_asyncio_sock_connect_does_not_hold_up_the_loop(
        fe: pvcalls.Frontend, server: Any) -> None:
    """loop.sock_connect() on a non-blocking socket: EINPROGRESS, then
    fileno() writable and SO_ERROR, as with a TCP socket.  A connect the
    peer does not answer leaves the loop running (other tasks tick, and
    asyncio.wait_for gives up on it); a refused one raises
    ConnectionRefusedError; an answered one carries data."""
    srv = server()
    closed = socket.create_server(("127.0.0.1", 0))
    refused = closed.getsockname()
    closed.close()

    async def main(unanswered: tuple[str, int]) -> int:
        loop = asyncio.get_running_loop()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.ensure_future(ticker())
        with fe.socket() as s:
            s.setblocking(False)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(loop.sock_connect(s, unanswered), 0.3)
            during = ticks
        with fe.socket() as s:
            s.setblocking(False)
            with pytest.raises(ConnectionRefusedError):
                await asyncio.wait_for(loop.sock_connect(s, refused), TIMEOUT)
        with fe.socket() as s:
            s.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(s, srv.address), TIMEOUT)
            assert s.getpeername() == srv.address
            await loop.sock_sendall(s, b"ping")
            got = b""
            while len(got) < 4:
                got += await asyncio.wait_for(loop.sock_recv(s, 4 - len(got)), TIMEOUT)
            assert got == b"ping"
        ticking.cancel()
        return during

    with unanswered_listener() as address:
        during = asyncio.run(main(address))
    # The ticker's first run is before sock_connect; any more are during it.
    assert during >= 2, f"the loop ran {during} times in 0.3 s of sock_connect: it was held up"


def test_socket_options_are_only_what_the_frontend_knows(fe: pvcalls.Frontend) -> None:
    """getsockopt answers SO_ERROR, SO_TYPE, SO_DOMAIN and SO_ACCEPTCONN;
    every other option is ENOPROTOOPT, as is setsockopt but for turning
    SO_REUSEADDR on (what the backend does anyway); a closed socket is
    EBADF; a buflen is checked as socket.socket checks it."""
    sol = socket.SOL_SOCKET
    with fe.socket() as s:
        assert s.getsockopt(sol, socket.SO_TYPE) == socket.SOCK_STREAM
        assert s.getsockopt(sol, socket.SO_DOMAIN) == socket.AF_INET
        assert s.getsockopt(sol, socket.SO_TYPE, 4) == struct.pack("=i", socket.SOCK_STREAM)
        assert s.getsockopt(sol, socket.SO_TYPE, 2) == struct.pack("=i", socket.SOCK_STREAM)[:2]
        for buflen in (0, 1025, -1):
            with pytest.raises(OSError, match="buflen out of range"):
                s.getsockopt(sol, socket.SO_TYPE, buflen)
        assert s.getsockopt(sol, socket.SO_ERROR) == 0
        assert s.getsockopt(sol, socket.SO_ACCEPTCONN) == 0
        s.setsockopt(sol, socket.SO_REUSEADDR, 1)
        for call in (lambda: s.getsockopt(sol, socket.SO_RCVBUF),
                     lambda: s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                     lambda: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
                     lambda: s.setsockopt(sol, socket.SO_REUSEADDR, 0),
                     lambda: s.setsockopt(sol, socket.SO_REUSEADDR, b"\1\0\0\0")):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.ENOPROTOOPT
        with pytest.raises(TypeError):
            s.getsockopt("SOL_SOCKET", socket.SO_TYPE)  # type: ignore[arg-type]
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert s.getsockopt(sol, socket.SO_ACCEPTCONN) == 1
    for call in (lambda: s.getsockopt(sol, socket.SO_ERROR),
                 lambda: s.setsockopt(sol, socket.SO_REUSEADDR, 1)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF


def test_a_listening_socket_is_never_writable(fe: pvcalls.Frontend, backend: Any,
                                              guest: Any) -> None:
    """As a TCP listener (and Linux's pvcalls-front, whose passive poll
    says only EPOLLIN): there is nothing to send on it, and a loop that
    registered it for EVENT_WRITE too must not spin."""
    with fe.socket() as ls, selectors.DefaultSelector() as sel:
        ls.bind(("127.0.0.1", 0))
        sel.register(ls, selectors.EVENT_READ | selectors.EVENT_WRITE)
        ls.listen()  # registered before: what the selector waits on changes
        ls.setblocking(False)
        assert sel.select(0) == []
        address = listen_address(backend, guest.domid, ls.id)
        with socket.create_connection(address, timeout=TIMEOUT):
            assert sel.select(TIMEOUT) == [(sel.get_key(ls), selectors.EVENT_READ)]
            conn, _ = ls.accept()
            conn.close()
