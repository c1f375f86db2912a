"""pvcalls Backend: what the out ring still holds when a socket is released
reaches the peer, as what a host socket's buffer holds at close() does
(pvcalls._linger)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pvcalls_rawfront import (
    TIMEOUT,
    Call,
    DataRing,
    LogWatch,
    RawFrontend,
    socket_of,
    wait_until,
)
from racewindow import PauseAt, stands_at

import pvcalls
from pvcalls import _linger, _wire
from pvcalls._linger import Lingerer
from pvcalls._socket import ActiveSocket
from workqueue import DelayedWork, alloc_workqueue
from xenback import RateLimit
from xenback.events import EventDispatcher
from xenback.sim import SimHost


class Peer:
    """A host server taking one connection; reads only when told to."""

    def __init__(self, rcvbuf: int | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        if rcvbuf is not None:
            # Inherited by the accepted socket: a small window, so that the
            # backend's send buffer fills after a few KiB.
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.address = self.listener.getsockname()
        self.conn: socket.socket | None = None

    def accept(self) -> socket.socket:
        self.listener.settimeout(TIMEOUT)
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(TIMEOUT)
        return self.conn

    def read_to_eof(self) -> bytes:
        assert self.conn is not None
        chunks = []
        while chunk := self.conn.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer(rcvbuf=4096)
    yield p
    p.close()


@pytest.fixture
def log() -> Iterator[LogWatch]:
    """pvcalls' lines from INFO up, with a wait for one.  How a lingering
    socket ended is said after it is closed and counted out, on the thread
    that ended it: a test that saw the end waits for the line."""
    watch = LogWatch()
    logger = logging.getLogger("pvcalls")
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(old)


def _fill(raw: RawFrontend, ring: DataRing, sock: ActiveSocket) -> bytes:
    """Write into the out ring until it is full and the backend cannot send
    (the peer does not read): what was written."""
    # Small buffers on both host sockets: stuck after a few KiB, not after
    # the MiBs that autotuning would let the backend's take.
    assert sock.host is not None
    sock.host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    written = bytearray()
    block = os.urandom(8192)

    def stuck() -> bool:
        written.extend(block[: ring.write(block)])
        return not ring.out_ring.writable() and sock._out_armed

    raw.wait(stuck)
    return bytes(written)


def test_data_left_in_the_out_ring_at_release_reaches_the_peer(
        raw: RawFrontend, backend: pvcalls.Backend) -> None:
    """The guest wrote and released without the backend looking (no
    notify): RELEASE sends it before the host socket closes."""
    peer = Peer()
    try:
        sock_id, ring = raw.connect_socket(peer.address)
        peer.accept()
        data = os.urandom(20000)
        assert ring.write(data, notify=False) == len(data)
        assert raw.release(sock_id).ret == 0
        assert peer.read_to_eof() == data
        assert len(backend.lingerer) == 0
    finally:
        peer.close()


def _break_out_ring(ring: DataRing) -> None:
    cons = ring.get(_wire.OUT_CONS_OFFSET)
    ring.put(_wire.OUT_PROD_OFFSET, (cons + ring.size + 1) & 0xFFFFFFFF)


@pytest.mark.parametrize("when", ["before RELEASE", "as the release sends"])
def test_an_out_ring_made_impossible_at_release_is_dropped_and_said(
        raw: RawFrontend, backend: pvcalls.Backend, peer: Peer,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """Indexes a hostile guest breaks at release: nothing of the ring is
    sent or kept, the RELEASE is answered, and a line says why its data
    went nowhere.  "As the release sends": broken after the release's
    last send read them sound, before it copies the rest."""
    sock_id, ring = raw.connect_socket(peer.address)
    peer.accept()
    _fill(raw, ring, socket_of(backend, raw, sock_id))
    if when == "before RELEASE":
        _break_out_ring(ring)
    else:
        tx, flush_out = ActiveSocket._tx, ActiveSocket._flush_out
        flushing = threading.Event()

        def tx_then_break(self: ActiveSocket, *args: Any) -> int:
            try:
                return tx(self, *args)
            finally:
                if flushing.is_set():
                    _break_out_ring(ring)

        def flag_flush_out(self: ActiveSocket, *args: Any) -> bytes:
            flushing.set()
            return flush_out(self, *args)

        monkeypatch.setattr(ActiveSocket, "_tx", tx_then_break)
        monkeypatch.setattr(ActiveSocket, "_flush_out", flag_flush_out)
    with caplog.at_level(logging.WARNING, logger="pvcalls"):
        assert raw.release(sock_id).ret == 0
    assert len(backend.lingerer) == 0
    assert any(f"dom{raw.guest.domid} socket {sock_id:#x}: data ring protocol error"
               in r.getMessage() for r in caplog.records)


def test_what_the_peer_cannot_take_yet_is_sent_as_it_reads(
        raw: RawFrontend, backend: pvcalls.Backend, peer: Peer) -> None:
    sock_id, ring = raw.connect_socket(peer.address)
    peer.accept()
    written = _fill(raw, ring, socket_of(backend, raw, sock_id))
    assert raw.release(sock_id).ret == 0  # at once, the ring let go of
    assert len(backend.lingerer) == 1
    assert peer.read_to_eof() == written
    wait_until(lambda: len(backend.lingerer) == 0)


def test_a_peer_that_takes_nothing_is_closed_after_the_timeout(
        raw: RawFrontend, backend: pvcalls.Backend, peer: Peer, log: LogWatch) -> None:
    sock_id, ring = raw.connect_socket(peer.address)
    peer.accept()
    written = _fill(raw, ring, socket_of(backend, raw, sock_id))
    backend.lingerer.timeout = 0.05
    assert raw.release(sock_id).ret == 0
    wait_until(lambda: len(backend.lingerer) == 0)  # before the peer makes room
    # The host socket was closed with the rest: the peer gets what was in
    # flight, in order, then the end.
    got = peer.read_to_eof()
    assert len(got) < len(written) and written.startswith(got)
    log.wait("bytes unsent: timed out", logging.INFO)


def test_a_domain_lingers_at_most_its_share(
        raw: RawFrontend, backend: pvcalls.Backend, peer: Peer,
        caplog: pytest.LogCaptureFixture) -> None:
    sock_id, ring = raw.connect_socket(peer.address)
    peer.accept()
    written = _fill(raw, ring, socket_of(backend, raw, sock_id))
    backend.lingerer.max_bytes = 1000  # less than the out ring holds
    with caplog.at_level(logging.WARNING, logger="pvcalls"):
        assert raw.release(sock_id).ret == 0
    assert len(backend.lingerer) == 0
    got = peer.read_to_eof()
    assert len(got) < len(written) and written.startswith(got)
    assert any(f"dom{raw.guest.domid}: a released socket's last" in r.getMessage()
               for r in caplog.records)


def test_a_domain_may_linger_exactly_its_share(backend: pvcalls.Backend) -> None:
    """max_bytes is what a domain may hold: a rest of exactly that many
    bytes lingers, and reaches the peer."""
    lingerer = backend.lingerer
    lingerer.max_bytes = 10
    a, b = socket.socketpair()
    a.setblocking(False)
    with b:
        assert lingerer.adopt(a, 4242, b"0123456789", RateLimit("dom4242")) is True
        b.settimeout(TIMEOUT)
        got = b""
        while chunk := b.recv(64):  # until the lingerer closes a
            got += chunk
    assert got == b"0123456789"
    wait_until(lambda: len(lingerer) == 0)


def test_a_closed_lingerer_takes_no_more_sockets(backend: pvcalls.Backend) -> None:
    """After close() adopt() refuses, even while the dispatcher still
    works: nothing would end the socket but its timer."""
    lingerer = Lingerer(backend.dispatcher, backend.cmd_wq)
    lingerer.close()
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        assert lingerer.adopt(a, 4242, b"late", RateLimit("dom4242")) is False
        assert len(lingerer) == 0 and a.fileno() != -1  # still the caller's


def _stuck_pair() -> tuple[socket.socket, socket.socket]:
    """A non-blocking socket whose send buffer is full, and its peer."""
    a, b = socket.socketpair()
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with pytest.raises(BlockingIOError):
        while True:
            a.send(bytes(65536))
    return a, b


def _read_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(TIMEOUT)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


class _NumberKept(socket.socket):
    """A socket whose close() leaves /dev/null at its descriptor number:
    its file is closed (its peer reads the end), but no thread of the
    process can take the number until the test moves a file of its own
    there (see :func:`_moved_to`)."""

    def close(self) -> None:
        if self.fileno() == -1:
            return
        placeholder = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.dup2(placeholder, self.fileno())
        finally:
            os.close(placeholder)
        self.detach()


def _moved_to(sock: socket.socket, fd: int) -> socket.socket:
    """``sock``, moved to the number ``fd`` the test holds (dup2 replaces
    what is there in one step: no other thread can take the number)."""
    os.dup2(sock.fileno(), fd)
    sock.close()
    moved = socket.socket(fileno=fd)
    moved.setblocking(False)
    return moved


def test_a_late_timer_ends_only_its_own_socket(backend: pvcalls.Backend) -> None:
    """A socket's timer that was already running when the socket finished
    (cancel() does not wait for it) must not end the socket that has its
    descriptor number by then."""
    lingerer = backend.lingerer
    a, first_peer = _stuck_pair()
    first = _NumberKept(fileno=a.detach())
    first.setblocking(False)
    fd = first.fileno()
    assert lingerer.adopt(first, 4242, b"first", RateLimit("dom4242")) is True
    timer = lingerer._orphans[fd].timer
    assert timer is not None
    moved = False
    try:
        with first_peer:
            assert _read_to_eof(first_peer).endswith(b"first")  # finished, closed
        wait_until(lambda: len(lingerer) == 0)
        b, second_peer = _stuck_pair()
        second = _moved_to(b, fd)
        moved = True
    finally:
        if not moved and first.fileno() == -1:
            os.close(fd)  # the placeholder: the number is still the test's
    with second_peer:
        assert lingerer.adopt(second, 4242, b"second", RateLimit("dom4242")) is True
        timer.func(timer)  # the first socket's timer, late
        assert len(lingerer) == 1 and second.fileno() == fd
        assert _read_to_eof(second_peer).endswith(b"second")
    wait_until(lambda: len(lingerer) == 0)


def test_closing_the_backend_closes_lingering_sockets(
        host: SimHost, topology: Any, make_frontend: Any, peer: Peer,
        caplog: pytest.LogCaptureFixture) -> None:
    """With what they hold, and the loss said."""
    caplog.set_level(logging.INFO, logger="pvcalls")
    with pvcalls.Backend(host.dom0, topology=topology) as backend:
        raw = make_frontend("linger-close")
        sock_id, ring = raw.connect_socket(peer.address)
        peer.accept()
        sock = socket_of(backend, raw, sock_id)
        written = _fill(raw, ring, sock)
        assert raw.release(sock_id).ret == 0
        assert len(backend.lingerer) == 1
        raw.close()
    assert len(backend.lingerer) == 0
    assert sock.host is not None and sock.host.fileno() == -1
    got = peer.read_to_eof()
    assert len(got) < len(written) and written.startswith(got)
    assert any(f"dom{raw.guest.domid}: released socket closed with" in r.getMessage()
               and r.getMessage().endswith("bytes unsent: the backend is closing")
               for r in caplog.records)


def test_a_guest_that_sends_then_closes_loses_nothing(host: SimHost, backend: Any) -> None:
    """End to end, with the guest library: sendall() then close(), at once,
    as a program does with a host socket."""
    sizes = [1000, 100_000] * 10 + [3_000_000]
    digests: list[tuple[int, str]] = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(TIMEOUT)

    def serve() -> None:
        for _ in sizes:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                h, n = hashlib.sha256(), 0
                while chunk := conn.recv(65536):
                    h.update(chunk)
                    n += len(chunk)
                digests.append((n, h.hexdigest()))

    t = threading.Thread(target=serve)
    t.start()
    try:
        expected = []
        with pvcalls.Frontend(host.create_domain("sender")) as fe:
            for size in sizes:
                data = os.urandom(size)
                expected.append((size, hashlib.sha256(data).hexdigest()))
                s = fe.socket()
                s.connect(server.getsockname())
                s.sendall(data)
                s.close()
        t.join(TIMEOUT)
        assert digests == expected
    finally:
        server.close()
        t.join(TIMEOUT)


def test_a_domain_lingers_at_most_so_many_sockets(
        raw: RawFrontend, backend: pvcalls.Backend, peer: Peer,
        caplog: pytest.LogCaptureFixture) -> None:
    """Each lingering socket holds a host descriptor: a guest releasing
    sockets with a byte or two left each, to a peer that never reads, must
    not take the backend's descriptors (every domain's sockets) for the
    timeout, whatever the byte bound lets through."""
    backend.lingerer.max_sockets = 2
    stuck = []
    for _ in range(3):
        sock_id, ring = raw.connect_socket(peer.address)
        peer.accept()
        stuck.append((sock_id, peer.conn))
        _fill(raw, ring, socket_of(backend, raw, sock_id))
    with caplog.at_level(logging.WARNING, logger="pvcalls"):
        for sock_id, _conn in stuck:
            assert raw.release(sock_id).ret == 0
    assert len(backend.lingerer) == 2
    assert any(f"dom{raw.guest.domid}: a released socket's last" in r.getMessage()
               for r in caplog.records)
    for _sock_id, conn in stuck:
        assert conn is not None
        conn.close()


class Interrupted(BaseException):
    """Stands in for Ctrl-C (KeyboardInterrupt) in a wait of close()."""


def test_a_close_interrupted_while_it_ends_a_lingering_socket_is_finished_by_the_next(
        host: SimHost, topology: Any, make_frontend: Any, peer: Peer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while close() waits in remove_fd() for the sender (which
    waits without a timeout): the next close() must still close that
    lingering socket, not leave its descriptor open for ever."""
    backend = pvcalls.Backend(host.dom0, topology=topology)
    try:
        raw = make_frontend("linger-interrupted")
        sock_id, ring = raw.connect_socket(peer.address)
        peer.accept()
        sock = socket_of(backend, raw, sock_id)
        _fill(raw, ring, sock)
        assert raw.release(sock_id).ret == 0
        assert len(backend.lingerer) == 1
        assert sock.host is not None
        fd = sock.host.fileno()
        remove_fd = backend.dispatcher.remove_fd

        def interrupted(n: int) -> None:
            if n == fd:
                raise Interrupted
            remove_fd(n)

        monkeypatch.setattr(backend.dispatcher, "remove_fd", interrupted)
        with pytest.raises(Interrupted):
            backend.close()
        monkeypatch.undo()
    finally:
        backend.close()
    assert len(backend.lingerer) == 0
    assert sock.host.fileno() == -1


def test_a_close_interrupted_as_the_lingerer_takes_a_socket_leaves_it_the_lingerer_s(
        host: SimHost, topology: Any, make_frontend: Any, peer: Peer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C as adopt() returns: the lingerer holds the host socket, and
    the teardown never learnt so.  Neither it nor the teardown done again
    may close the socket under the lingerer, which still has the rest of
    the out ring to send; close() ends it, as every lingering socket."""
    backend = pvcalls.Backend(host.dom0, topology=topology)
    try:
        raw = make_frontend("linger-adopt-interrupted")
        sock_id, ring = raw.connect_socket(peer.address)
        peer.accept()
        sock = socket_of(backend, raw, sock_id)
        _fill(raw, ring, sock)
        assert sock.host is not None
        adopt = backend.lingerer.adopt

        def interrupted(*args: Any, **kwargs: Any) -> bool:
            adopt(*args, **kwargs)
            raise Interrupted

        monkeypatch.setattr(backend.lingerer, "adopt", interrupted)
        with pytest.raises(Interrupted):
            sock.teardown()  # as the RELEASE's, or close()'s
        monkeypatch.undo()
        assert backend.lingerer.holds(sock.host)
        assert sock.host.fileno() != -1
        sock.teardown()  # done again: leaves the socket to the lingerer
        assert backend.lingerer.holds(sock.host)
        assert sock.host.fileno() != -1
        # Taken once: given again, it was counted twice against the
        # domain's bounds, and the first timer, no longer its orphan's,
        # stayed queued.
        assert backend.lingerer._count == {raw.guest.domid: 1}
    finally:
        backend.close()
    assert len(backend.lingerer) == 0
    assert sock.host.fileno() == -1


def _connected_and_filled(
        raw: RawFrontend, backend: pvcalls.Backend, peer: Peer) -> tuple[int, ActiveSocket, bytes]:
    """A socket connected to the peer, its out ring filled (_fill): its id,
    the backend's socket and what was written."""
    sock_id, ring = raw.connect_socket(peer.address)
    peer.accept()
    sock = socket_of(backend, raw, sock_id)
    return sock_id, sock, _fill(raw, ring, sock)


def _cut_the_flush_s_send(monkeypatch: pytest.MonkeyPatch, sock: ActiveSocket) -> None:
    """Ctrl-C at the first send of sock's teardown flush, once: other
    sockets' sends, and sends from elsewhere, go through."""
    tx, flush_out = ActiveSocket._tx, ActiveSocket._flush_out

    def cut_tx(self: ActiveSocket, *args: Any) -> int:
        if self is sock and sys._getframe(1).f_code is flush_out.__code__:
            monkeypatch.setattr(ActiveSocket, "_tx", tx)
            raise Interrupted
        return tx(self, *args)

    monkeypatch.setattr(ActiveSocket, "_tx", cut_tx)


def _release_hands_every_byte_on(
        raw: RawFrontend, backend: pvcalls.Backend, peer: Peer, sock_id: int,
        written: bytes) -> None:
    """RELEASE answered, every byte written read at the peer, in order, and
    the lingerer then empty (what it held finished, not dropped)."""
    assert raw.release(sock_id).ret == 0
    assert peer.read_to_eof() == written
    wait_until(lambda: len(backend.lingerer) == 0)


def test_a_teardown_interrupted_before_the_lingerer_takes_the_socket_hands_it_on_when_done_again(
        backend: pvcalls.Backend, raw: RawFrontend, peer: Peer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C as the teardown's adopt() starts, the host socket not taken:
    the teardown done again (the RELEASE put back, done again) hands it
    to the lingerer with the rest of the out ring, and every byte reaches
    the peer.  Closed on the way out of the step cut short, the socket
    went with that rest, which nothing had said was dropped."""
    sock_id, sock, written = _connected_and_filled(raw, backend, peer)
    adopt = backend.lingerer.adopt

    def cut_adopt(*args: Any, **kwargs: Any) -> bool:
        monkeypatch.setattr(backend.lingerer, "adopt", adopt)
        raise Interrupted

    monkeypatch.setattr(backend.lingerer, "adopt", cut_adopt)
    with pytest.raises(Interrupted):
        sock.teardown()
    _release_hands_every_byte_on(raw, backend, peer, sock_id, written)  # the teardown done again
    assert raw.unexpected == []


def test_a_bug_in_the_lingerer_s_adopt_still_closes_the_host_socket(
        backend: pvcalls.Backend, raw: RawFrontend, peer: Peer,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An exception out of adopt() (a bug of ours), given a released
    socket with bytes left: the teardown says so and still closes the
    host socket, whose peer sees the end of the stream.  That step counts
    as done, and no teardown after it would close the socket."""
    sock_id, sock, _ = _connected_and_filled(raw, backend, peer)
    host = sock.host
    assert host is not None

    def bug(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(backend.lingerer, "adopt", bug)
    caplog.set_level(logging.ERROR, logger="pvcalls._socket")
    assert raw.release(sock_id).ret == 0
    assert host.fileno() == -1
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "teardown: closing the host socket failed"]
    assert raw.unexpected == []


def test_a_bug_in_the_lingerer_s_adopt_after_it_took_the_socket_leaves_it_the_lingerer_s(
        backend: pvcalls.Backend, raw: RawFrontend, peer: Peer,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An exception out of adopt() (a bug of ours) once it took the host
    socket: the teardown says so, and leaves the socket to the lingerer,
    which sends the rest of the out ring to the peer.  Closed on the way
    out whoever held it, the socket went under the lingerer, with that
    rest."""
    sock_id, sock, written = _connected_and_filled(raw, backend, peer)
    adopt = backend.lingerer.adopt

    def taken_then_bug(*args: Any, **kwargs: Any) -> bool:
        assert adopt(*args, **kwargs)
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(backend.lingerer, "adopt", taken_then_bug)
    caplog.set_level(logging.ERROR, logger="pvcalls._socket")
    _release_hands_every_byte_on(raw, backend, peer, sock_id, written)
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "teardown: closing the host socket failed"]
    assert raw.unexpected == []


def test_a_teardown_interrupted_as_it_unwatches_the_host_socket_leaves_it_open(
        backend: pvcalls.Backend, raw: RawFrontend, peer: Peer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the unwatching of the host socket: it may still be
    watched, so it stays open (closed, its number could be another file's
    while the poller still reports it); the teardown done again unwatches
    and closes it."""
    sock_id, ring = raw.connect_socket(peer.address)
    peer.accept()
    sock = socket_of(backend, raw, sock_id)
    assert sock.host is not None and sock.events is not None
    fd = sock.host.fileno()
    remove_fd = sock.events.remove_fd

    def interrupted(n: int) -> None:
        raise Interrupted

    monkeypatch.setattr(sock.events, "remove_fd", interrupted)
    with pytest.raises(Interrupted):
        sock.teardown()
    monkeypatch.setattr(sock.events, "remove_fd", remove_fd)
    assert sock.host.fileno() == fd and fd in sock.events._fds
    sock.teardown()
    assert sock.host.fileno() == -1 and fd not in sock.events._fds
    assert raw.release(sock_id).ret == 0


@pytest.mark.parametrize("where", ["sending", "unwatching"])
def test_a_teardown_interrupted_after_it_found_the_socket_connected_still_sends_what_it_holds(
        backend: pvcalls.Backend, raw: RawFrontend, peer: Peer,
        monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Ctrl-C as the teardown of a connected socket sends what its out ring
    holds (the socket CLOSED by then), or once that is done, as it
    unwatches the host socket (the rest the peer cannot take yet copied
    out, the ring unmapped next): the teardown done again (the RELEASE put
    back, done again) still gets every byte to the peer, the rest through
    the lingerer.  Taken for a socket that never connected, it closed the
    host socket without sending, the ring unmapped by the first."""
    sock_id, sock, written = _connected_and_filled(raw, backend, peer)
    assert sock.events is not None
    if where == "sending":
        _cut_the_flush_s_send(monkeypatch, sock)
    else:
        remove_fd = sock.events.remove_fd

        def cut_remove_fd(fd: int) -> None:
            monkeypatch.setattr(sock.events, "remove_fd", remove_fd)
            raise Interrupted

        monkeypatch.setattr(sock.events, "remove_fd", cut_remove_fd)
    with pytest.raises(Interrupted):
        sock.teardown()
    assert sock.state is pvcalls._socket.SockState.CLOSED
    _release_hands_every_byte_on(raw, backend, peer, sock_id, written)  # the teardown done again
    assert raw.unexpected == []


def test_a_flush_done_again_that_finds_the_host_socket_full_still_hands_the_rest_on(
        backend: pvcalls.Backend, raw: RawFrontend, peer: Peer,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Ctrl-C as the teardown of a connected socket starts sending what its
    out ring holds, the host socket full, its room not watched (the
    Work's last send took all it had): the teardown done again finds the
    host socket unwatched by the first, and the room it would watch for
    is none of its business: every byte still reaches the peer, and
    nothing is said to have failed.  The watch's KeyError ended that
    flush, logged with a traceback, the rest lost."""
    sock_id, sock, written = _connected_and_filled(raw, backend, peer)
    assert sock.host is not None
    # As after a send that took all the ring had, the host socket full.
    sock._watch_write_space(sock.host, False)
    _cut_the_flush_s_send(monkeypatch, sock)
    with pytest.raises(Interrupted):
        sock.teardown()
    caplog.set_level(logging.DEBUG, logger="pvcalls._socket")
    _release_hands_every_byte_on(raw, backend, peer, sock_id, written)  # the teardown done again
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert raw.unexpected == []


def test_a_teardown_done_again_leaves_a_host_socket_closed_by_the_one_cut_short_alone(
        backend: pvcalls.Backend, raw: RawFrontend, peer: Peer,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Ctrl-C as the host socket's close() returns (the lingerer not
    taking it): the teardown done again, with the rest the flush left
    still to hand on, neither gives the lingerer that closed socket nor
    says its bytes were dropped.  Given it, the lingerer recorded and
    watched descriptor -1."""
    sock_id, sock, _ = _connected_and_filled(raw, backend, peer)
    host = sock.host
    assert host is not None
    adopt = backend.lingerer.adopt

    def refused_then_cut(h: socket.socket, *args: Any, **kwargs: Any) -> bool:
        monkeypatch.setattr(backend.lingerer, "adopt", adopt)
        h.close()  # what the caller does with a socket not taken, done
        raise Interrupted

    monkeypatch.setattr(backend.lingerer, "adopt", refused_then_cut)
    with pytest.raises(Interrupted):
        sock.teardown()
    assert host.fileno() == -1 and not sock._host_released
    caplog.set_level(logging.INFO, logger="pvcalls._linger")
    sock.teardown()  # done again
    assert len(backend.lingerer) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "pvcalls._linger"] == []
    assert raw.release(sock_id).ret == 0


def test_the_timeout_cannot_end_a_socket_before_it_is_watched(backend: pvcalls.Backend) -> None:
    """adopt() queues the timer, then watches the socket: a timer that ran
    in between closed the socket, and adopt() then watched its number,
    maybe another file's by then (left registered for ever, and the next
    socket to get that number could not be adopted)."""
    lingerer = backend.lingerer
    lingerer.timeout = 0  # fires at once
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with pytest.raises(BlockingIOError):
            while True:
                a.send(bytes(65536))
        fd = a.fileno()
        pause = PauseAt(Lingerer.adopt, "self._dispatcher.add_fd(")
        call = Call(lambda: pause.run(
            lambda: lingerer.adopt(a, 4242, bytes(1000), RateLimit("dom4242"))))
        assert pause.reached.wait(TIMEOUT)

        def timer_waits() -> bool:
            return any(stands_at(tid, Lingerer._finish, "with self._lock:")
                       for tid in sys._current_frames())

        try:
            wait_until(lambda: a.fileno() == -1 or timer_waits())
            assert a.fileno() == fd
        finally:
            pause.resume()
        assert call.join().error is None and call.result is True
        # The socket's close is _finish's last step (after it leaves the
        # count and the dispatcher): waited for, not the count.
        wait_until(lambda: a.fileno() == -1)
        assert len(lingerer) == 0
        assert fd not in backend.dispatcher._fds


def test_one_domain_dropping_lingering_data_does_not_silence_another(
        raw: RawFrontend, backend: pvcalls.Backend, peer: Peer,
        caplog: pytest.LogCaptureFixture) -> None:
    """The warnings of data dropped at RELEASE go through the frontend's
    RateLimit, as its other warnings: another domain's flood of them (here
    more than a burst, straight to adopt()) leaves this one's logged."""
    backend.lingerer.max_sockets = 0  # nothing lingers: every rest is dropped
    other = RateLimit("dom4242")
    for _ in range(20):
        a, b = socket.socketpair()
        with a, b:
            assert not backend.lingerer.adopt(a, 4242, b"x", other)
    sock_id, ring = raw.connect_socket(peer.address)
    peer.accept()
    _fill(raw, ring, socket_of(backend, raw, sock_id))
    with caplog.at_level(logging.WARNING, logger="pvcalls"):
        assert raw.release(sock_id).ret == 0
    assert any(f"dom{raw.guest.domid}: a released socket's last" in r.getMessage()
               for r in caplog.records)


def test_a_guest_cannot_flood_the_log_with_lingering_sockets_its_peers_reset(
        backend: pvcalls.Backend, log: LogWatch) -> None:
    """Each lingering socket that ends with data unsent says so; a guest
    whose peer (its own server, say) resets each connection at once can end
    them as fast as it releases them: those lines go through the guest's
    RateLimit, as its other ones."""
    # One interval however long the loop takes: slowed down (0.3 s before
    # each line the lingerer logs), it took more than one, and a second
    # burst came through.
    ratelimit = RateLimit("dom4242", clock=lambda: 0.0)
    for _ in range(3 * ratelimit.burst):
        a, b = _stuck_pair()
        assert backend.lingerer.adopt(a, 4242, b"x" * 1000, ratelimit)
        b.close()  # the peer goes: the next send fails
        wait_until(lambda a=a: a.fileno() == -1)
    # A socket's line comes after its close, but the dispatcher's thread,
    # which ends them all, says it before it ends the next: only the last
    # one's may come late, and the limit holds it back.
    unsent = [m for m in log.messages(logging.INFO) if "bytes unsent: send failed" in m]
    assert len(unsent) == ratelimit.burst


def test_a_bug_sending_what_a_released_socket_holds_ends_that_socket(
        backend: pvcalls.Backend, caplog: pytest.LogCaptureFixture) -> None:
    """An exception escaping the send of a lingering socket (a bug of ours):
    the socket is closed with what it holds, and the traceback logged once,
    through its guest's rate limit.  (The socket, still writable, had the
    backend's event thread, which serves every guest's commands, call it
    again at every turn, a traceback each time, until its timeout.)"""
    caplog.set_level(logging.ERROR)

    class BuggySend(socket.socket):
        def send(self, *args: Any) -> int:
            raise RuntimeError("a bug")

    a, b = socket.socketpair()
    buggy = BuggySend(fileno=a.detach())
    buggy.setblocking(False)
    with b:
        assert backend.lingerer.adopt(buggy, 4242, b"lost", RateLimit("dom4242")) is True
        wait_until(lambda: len(backend.lingerer) == 0)
        assert buggy.fileno() == -1
        b.settimeout(TIMEOUT)
        assert b.recv(16) == b""
    bugs = [r for r in caplog.records if r.exc_info]
    assert len(bugs) == 1, [r.getMessage() for r in bugs]
    assert bugs[0].name.startswith("pvcalls") and "dom4242" in bugs[0].getMessage()


@pytest.mark.parametrize("loss", ["dropped", "unwatchable", "bug"])
def test_every_line_a_guest_s_released_sockets_cause_goes_through_its_rate_limit(
        backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, loss: str) -> None:
    """A guest releases sockets as fast as it likes: what each costs the
    log (its rest dropped over the domain's bounds, refused a watch, or a
    bug of ours sending it) comes out of the guest's budget, 10 lines per
    interval, not one per socket."""
    caplog.set_level(logging.INFO, logger="pvcalls")
    lingerer = backend.lingerer
    ratelimit = RateLimit("dom4242", clock=lambda: 0.0)  # one interval
    if loss == "dropped":
        lingerer.max_sockets = 0
    elif loss == "unwatchable":
        def out_of_watches(fd: int, events: int, callback: Any) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(backend.dispatcher, "add_fd", out_of_watches)

    class BuggySend(socket.socket):
        def send(self, *args: Any) -> int:
            raise RuntimeError("a bug")

    for _ in range(3 * ratelimit.burst):
        a, b = socket.socketpair()
        with b:
            if loss == "bug":
                buggy = BuggySend(fileno=a.detach())
                buggy.setblocking(False)
                assert lingerer.adopt(buggy, 4242, b"lost", ratelimit) is True
                wait_until(lambda: len(lingerer) == 0)
            else:
                with a:
                    assert lingerer.adopt(a, 4242, b"lost", ratelimit) is False
    said = [r for r in caplog.records if r.getMessage().startswith("dom4242: ")]
    assert len(said) == ratelimit.burst, [r.getMessage() for r in said]


def test_a_domain_with_a_socket_limit_lingers_no_more_sockets_than_it(
        host: SimHost, topology: Any, make_frontend: Any, peer: Peer) -> None:
    """A lingering socket holds a host descriptor the domain's limit no
    longer counts: with a limit of 1, a guest releasing a stuck socket and
    opening the next held 32 host sockets at a time (the lingerer's own
    bound), not about 1."""
    policy = pvcalls.Policy.from_toml("[default]\nmax_sockets = 1\n")
    with pvcalls.Backend(host.dom0, policy=policy, topology=topology) as backend:
        raw = make_frontend("linger-limited")
        conns = []
        for _ in range(3):
            sock_id, ring = raw.connect_socket(peer.address)
            conns.append(peer.accept())
            _fill(raw, ring, socket_of(backend, raw, sock_id))
            assert raw.release(sock_id).ret == 0
        assert len(backend.lingerer) == 1
        raw.close()
    for conn in conns:
        conn.close()



def _drain(sock: socket.socket) -> None:
    """Read what ``sock`` has received, without waiting for more."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        pass


def test_a_socket_that_cannot_be_watched_stays_the_caller_s_and_its_loss_is_said(
        backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """add_fd() failing (out of epoll watches): adopt() refuses the socket,
    left to the caller, and says the data is lost.  Nothing of it stays:
    neither its count against its domain's bounds, nor its timer queued,
    nor a view of the caller's buffer."""
    caplog.set_level(logging.INFO, logger="pvcalls")
    lingerer = backend.lingerer
    lingerer.max_sockets = 1
    timers: list[DelayedWork] = []

    def delayed_work(func: Any) -> DelayedWork:
        timers.append(DelayedWork(func))  # kept: the orphan it holds too
        return timers[-1]

    def out_of_watches(fd: int, events: int, callback: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_linger, "DelayedWork", delayed_work)
    monkeypatch.setattr(backend.dispatcher, "add_fd", out_of_watches)
    data = bytearray(b"0123456789")
    a, b = _stuck_pair()
    with a, b:
        assert lingerer.adopt(a, 4242, data, RateLimit("dom4242")) is False
        assert len(lingerer) == 0 and not lingerer.holds(a) and a.fileno() != -1
        assert len(timers) == 1 and not timers[0].pending
        data.extend(b"!")  # BufferError while a view of it is kept
    assert any(r.getMessage() == "dom4242: a released socket's last 10 bytes dropped: "
               f"cannot watch it: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"
               for r in caplog.records)
    monkeypatch.undo()
    # The domain's one socket is free again.
    c, d = _stuck_pair()
    with d:
        assert lingerer.adopt(c, 4242, b"next", RateLimit("dom4242")) is True
        assert _read_to_eof(d).endswith(b"next")
    wait_until(lambda: len(lingerer) == 0)


def test_a_lingerer_whose_dispatcher_has_closed_takes_no_socket(
        host: SimHost, backend: pvcalls.Backend) -> None:
    """add_fd()'s RuntimeError: refused as when out of watches, the socket
    the caller's to close, not raised with the socket counted as ours."""
    dispatcher = EventDispatcher(host.dom0, thread=False)
    dispatcher.close()
    lingerer = Lingerer(dispatcher, backend.cmd_wq)
    a, b = _stuck_pair()
    with a, b:
        assert lingerer.adopt(a, 4242, b"late", RateLimit("dom4242")) is False
        assert len(lingerer) == 0 and not lingerer.holds(a) and a.fileno() != -1


def test_a_lingerer_whose_workqueue_is_destroyed_takes_no_socket_and_says_why(
        backend: pvcalls.Backend, caplog: pytest.LogCaptureFixture) -> None:
    """queue_delayed_work()'s RuntimeError: refused, the socket the
    caller's, unwatched, and the loss said as what it was (no timer)."""
    caplog.set_level(logging.INFO, logger="pvcalls")
    wq = alloc_workqueue("linger-test")
    wq.destroy()
    lingerer = Lingerer(backend.dispatcher, wq)
    a, b = _stuck_pair()
    with a, b:
        assert lingerer.adopt(a, 4242, b"late", RateLimit("dom4242")) is False
        assert len(lingerer) == 0 and not lingerer.holds(a) and a.fileno() != -1
        assert a.fileno() not in backend.dispatcher._fds
    assert any(r.getMessage() == "dom4242: a released socket's last 4 bytes dropped: "
               "cannot time it: workqueue 'linger-test' is destroyed; nothing can be "
               "queued on it" for r in caplog.records)


def test_a_socket_ended_as_it_becomes_writable_is_left_alone(
        host: SimHost, backend: pvcalls.Backend, caplog: pytest.LogCaptureFixture) -> None:
    """Its timeout ends it (out of the table, not yet unwatched) as the
    peer makes room: the wakeup that comes meanwhile finds nothing to send,
    and is no failure."""
    caplog.set_level(logging.ERROR)
    with EventDispatcher(host.dom0, thread=False) as dispatcher:
        lingerer = Lingerer(dispatcher, backend.cmd_wq)
        a, b = _stuck_pair()
        with b:
            assert lingerer.adopt(a, 4242, b"rest", RateLimit("dom4242")) is True
            timer = lingerer._orphans[a.fileno()].timer
            assert timer is not None
            pause = PauseAt(Lingerer._finish, "self._dispatcher.remove_fd(fd)")
            call = Call(lambda: pause.run(lambda: timer.func(timer)))
            try:
                assert pause.reached.wait(TIMEOUT)
                _drain(b)
                assert dispatcher.poll(TIMEOUT) == 1  # a's wakeup
            finally:
                pause.resume()
            assert call.join().error is None
            assert a.fileno() == -1 and len(lingerer) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_wakeup_with_no_room_leaves_the_socket_lingering(
        host: SimHost, backend: pvcalls.Backend) -> None:
    """A send that finds no room (EAGAIN: a wakeup for room taken since)
    is no failure: the socket lingers on, and sends its rest once the peer
    reads."""
    with EventDispatcher(host.dom0, thread=False) as dispatcher:
        lingerer = Lingerer(dispatcher, backend.cmd_wq)
        a, b = _stuck_pair()
        with b:
            assert lingerer.adopt(a, 4242, b"rest", RateLimit("dom4242")) is True
            lingerer._on_writable(a.fileno(), select.EPOLLOUT)
            assert lingerer.holds(a)
            _drain(b)
            assert dispatcher.poll(TIMEOUT) == 1
            assert a.fileno() == -1 and len(lingerer) == 0
            assert _read_to_eof(b) == b"rest"


def test_a_peer_that_has_gone_raises_no_sigpipe(
        host: SimHost, backend: pvcalls.Backend) -> None:
    """A program embedding the backend may give SIGPIPE its default action
    (Python ignores it, a tool often does not): sending to a peer that has
    gone is an EPIPE that ends the socket, not a signal that ends the
    process.  The send runs in this thread (poll mode), so a SIGPIPE's
    Python handler runs before the check."""
    pipes: list[int] = []
    old = signal.signal(signal.SIGPIPE, lambda signum, _frame: pipes.append(signum))
    try:
        with EventDispatcher(host.dom0, thread=False) as dispatcher:
            lingerer = Lingerer(dispatcher, backend.cmd_wq)
            a, b = socket.socketpair()
            a.setblocking(False)
            b.close()
            assert lingerer.adopt(a, 4242, b"lost", RateLimit("dom4242")) is True
            assert dispatcher.poll(TIMEOUT) == 1
            assert a.fileno() == -1 and len(lingerer) == 0
        assert pipes == []
    finally:
        signal.signal(signal.SIGPIPE, old)


def test_a_socket_that_ends_gives_its_domain_its_share_back(backend: pvcalls.Backend) -> None:
    """Its bytes and its place leave the domain's count as it ends, its
    timer is cancelled, and a domain with none lingering is forgotten."""
    lingerer = backend.lingerer
    lingerer.max_bytes = 10
    ratelimit = RateLimit("dom4242")
    first, first_peer = _stuck_pair()
    second, second_peer = _stuck_pair()
    with first_peer, second_peer:
        assert lingerer.adopt(first, 4242, b"012345", ratelimit) is True
        assert lingerer.adopt(second, 4242, b"6789", ratelimit) is True
        timer = lingerer._orphans[second.fileno()].timer
        assert timer is not None
        assert _read_to_eof(second_peer).endswith(b"6789")  # ended
        assert not timer.pending
        third, third_peer = _stuck_pair()
        with third_peer:
            assert lingerer.adopt(third, 4242, b"abcd", ratelimit) is True  # 6 + 4
            assert _read_to_eof(third_peer).endswith(b"abcd")
        assert _read_to_eof(first_peer).endswith(b"012345")
    wait_until(lambda: len(lingerer) == 0)
    assert (lingerer._bytes, lingerer._count) == ({}, {})


def test_a_socket_whose_unwatching_fails_is_closed_all_the_same(
        backend: pvcalls.Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """remove_fd() raising OSError (epoll_ctl refusing, the watch already
    forgotten): the socket is closed with the rest, close() raises nothing."""
    lingerer = backend.lingerer
    remove_fd = backend.dispatcher.remove_fd

    def refused(fd: int) -> None:
        remove_fd(fd)
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    a, b = _stuck_pair()
    with b:
        assert lingerer.adopt(a, 4242, b"rest", RateLimit("dom4242")) is True
        monkeypatch.setattr(backend.dispatcher, "remove_fd", refused)
        lingerer.close()
        assert a.fileno() == -1 and len(lingerer) == 0


def test_a_socket_that_ends_lets_go_of_the_data_it_was_given(backend: pvcalls.Backend) -> None:
    """The buffer handed to adopt() is free again once its socket ends, not
    when the cycle collector finds the orphan (its timer refers to it, and
    it to its timer): up to a ring's worth per socket, kept for nothing."""
    lingerer = backend.lingerer
    data = bytearray(b"rest")
    a, b = _stuck_pair()
    with b:
        assert lingerer.adopt(a, 4242, data, RateLimit("dom4242")) is True
        timer = lingerer._orphans[a.fileno()].timer  # the orphan, kept alive
        assert timer is not None
        lingerer.close()  # ends it in this thread
        assert a.fileno() == -1
        data.extend(b"!")  # BufferError while a view of it is kept


def test_a_domain_s_lingering_sockets_share_its_bytes(
        backend: pvcalls.Backend, caplog: pytest.LogCaptureFixture) -> None:
    """max_bytes bounds what all of a domain's lingering sockets hold
    together, not each: a rest that would take it past is dropped, and
    the warning says what the domain holds already."""
    lingerer = backend.lingerer
    lingerer.max_bytes = 10
    first, first_peer = _stuck_pair()
    second, second_peer = _stuck_pair()
    with first_peer, second, second_peer:
        assert lingerer.adopt(first, 4242, b"012345", RateLimit("dom4242")) is True
        with caplog.at_level(logging.WARNING, logger="pvcalls"):
            assert lingerer.adopt(second, 4242, b"6789!", RateLimit("dom4242")) is False
        assert len(lingerer) == 1
        assert [r.getMessage() for r in caplog.records if r.name.startswith("pvcalls")] == [
            "dom4242: a released socket's last 5 bytes dropped: the domain's 1 released "
            "sockets hold 6 bytes already (at most 10 in 32)"]
        assert _read_to_eof(first_peer).endswith(b"012345")
    wait_until(lambda: len(lingerer) == 0)
